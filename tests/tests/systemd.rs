//! The systemd deployment form under a real systemd: the units of `deploy/systemd`, with etcd's
//! own Debian unit, run by systemd as PID 1 of a container made from the legate image. Each unit
//! is restarted in turn, then the binaries are upgraded in place and the units restarted, then a
//! new TCP service makes HAProxy reload, all under `wrk` and fresh-connection probes of an app
//! and a TCP service: no request fails or is misrouted, and HAProxy's listening sockets are the
//! same sockets (`ss` inode) from the first step to the last.
//!
//! A test binary of its own: it builds an image (`deploy/stack build`, then systemd on top).

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests themselves

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use legate_tests::docker::{self, Container, Network, RUN_LABEL, TEST_LABEL, images};
use legate_tests::{WAIT, free_port, http_get, load, repo, tcp_banner, wait_for, which};

/// Builds the legate image (`deploy/stack build`: release binaries, base image, image).
async fn legate_image() -> Result<()> {
    let mut command = tokio::process::Command::new("bash");
    command
        .arg(repo().join("deploy/stack"))
        .arg("build")
        .current_dir(repo())
        .env_remove("LEGATE_IMAGE")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(25 * 60), command.output())
        .await
        .context("deploy/stack build took over 25 minutes")??;
    if !output.status.success() {
        bail!(
            "deploy/stack build failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The legate image with systemd, the units of `deploy/systemd` installed as the README says
/// (units in /etc/systemd/system, the sysusers file), Debian's haproxy.service masked (the
/// supervisor's unit conflicts with it), and a `docker` group owning the engine's socket as on
/// the host. Tagged by what it is made of, kept like the other test images.
async fn systemd_image() -> Result<String> {
    let socket_group = std::fs::metadata("/var/run/docker.sock")
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .context("the Docker engine's socket")?;
    let base =
        docker::docker(&["image", "inspect", "--format", "{{.Id}}", "legate:latest"]).await?;
    let context = tempfile::Builder::new()
        .prefix("legate-systemd-image-")
        .tempdir()?;
    let units = repo().join("deploy/systemd");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&units)? {
        let name = entry?.file_name().into_string().unwrap();
        if name.ends_with(".service") || name.ends_with(".conf") {
            std::fs::copy(units.join(&name), context.path().join(&name))?;
            files.push(std::fs::read(units.join(&name))?);
        }
    }
    let dockerfile = format!(
        "FROM legate:latest\n\
         RUN apt-get update \\\n \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
         systemd systemd-sysv iproute2 \\\n \
         && rm -rf /var/lib/apt/lists/* \\\n \
         && systemctl mask haproxy.service getty.target console-getty.service \\\n \
         && groupadd --gid {socket_group} docker\n\
         COPY legate-*.service /etc/systemd/system/\n\
         COPY legate.sysusers.conf /etc/sysusers.d/legate.conf\n\
         STOPSIGNAL SIGRTMIN+3\n\
         CMD [\"/lib/systemd/systemd\"]\n"
    );
    std::fs::write(context.path().join("Dockerfile"), &dockerfile)?;
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&(&base, &dockerfile, &files), &mut hasher);
    let tag = format!(
        "legate-test-systemd:{:016x}",
        std::hash::Hasher::finish(&hasher)
    );
    let context = context.path().to_str().unwrap();
    let label = format!("{TEST_LABEL}=1");
    docker::docker(&[
        "build", "--quiet", "--label", &label, "--tag", &tag, context,
    ])
    .await?;
    Ok(tag)
}

/// A machine run by systemd: a container of the systemd image, its HTTP frontend and one TCP
/// port published on loopback.
struct Machine {
    container: Container,
    http: SocketAddr,
    service: SocketAddr,
}

impl Machine {
    /// Boots systemd in a container of `image` with the engine's socket and `args` (network,
    /// ports, mounts); `http` and `service` say where the ambassador will answer, from the
    /// container once it exists.
    async fn boot(
        image: &str,
        args: &[&str],
        addresses: impl AsyncFnOnce(&Container) -> Result<(SocketAddr, SocketAddr)>,
    ) -> Result<Self> {
        let mut all = vec![
            "--cap-add",
            "SYS_ADMIN",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "--volume",
            "/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "--volume",
            "/var/run/docker.sock:/var/run/docker.sock",
        ];
        all.extend_from_slice(args);
        all.push(image);
        let container = Container::run(&all).await?;
        let (http, service) = addresses(&container).await?;
        let machine = Self {
            container,
            http,
            service,
        };
        wait_for("systemd to boot", WAIT, || async {
            let state = machine.exec(&["systemctl", "is-system-running"]).await;
            Ok(state
                .is_ok_and(|s| s == "running" || s == "degraded")
                .then_some(()))
        })
        .await?;
        Ok(machine)
    }

    async fn exec(&self, command: &[&str]) -> Result<String> {
        let mut args = vec!["exec", self.container.id()];
        args.extend_from_slice(command);
        docker::docker(&args).await
    }

    /// Writes `text` into the file `path` of the machine.
    async fn write(&self, path: &str, text: &str) -> Result<()> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), text)?;
        let dir = Path::new(path).parent().context("a file in a directory")?;
        self.exec(&["mkdir", "-p", dir.to_str().unwrap()]).await?;
        let target = format!("{}:{path}", self.container.id());
        docker::docker(&["cp", file.path().to_str().unwrap(), &target]).await?;
        self.exec(&["chmod", "644", path]).await.map(drop)
    }

    /// A unit's main pid (0 when it is not running).
    async fn main_pid(&self, unit: &str) -> Result<u32> {
        let pid = self
            .exec(&[
                "systemctl",
                "show",
                "--property",
                "MainPID",
                "--value",
                unit,
            ])
            .await?;
        Ok(pid.parse()?)
    }

    /// The HAProxy master's pid from the supervisor's pidfile.
    async fn haproxy_master(&self) -> Result<u32> {
        Ok(self
            .exec(&["cat", "/run/legate/haproxy.pid"])
            .await?
            .parse()?)
    }

    /// The TCP sockets listening on `ports` in the machine, as (port, inode).
    async fn listeners(&self, ports: &[u16]) -> Result<Vec<(u16, String)>> {
        let ss = self.exec(&load::SS_LISTENING).await?;
        Ok(load::listening_sockets(&ss, ports))
    }

    /// Waits until the app `sd.test` and the service of [`docker::run_app_and_service`] answer
    /// through `haproxy`; fails with the machine's journal.
    async fn wait_routed(&self, haproxy: &str) {
        let what = format!("the app and the service through {haproxy}");
        let routed = wait_for(&what, WAIT * 2, || async {
            let (status, body) = http_get(self.http, "sd.test", "/").await?;
            let banner = tcp_banner(self.service).await?;
            Ok((status == 200 && body.trim() == "sd-app" && banner == "sd-service").then_some(()))
        })
        .await;
        if let Err(e) = routed {
            panic!("{e:#}\n{}", self.journal().await);
        }
    }

    async fn journal(&self) -> String {
        self.exec(&["journalctl", "--no-pager", "--lines", "80"])
            .await
            .unwrap_or_else(|e| e.to_string())
    }
}

/// One step under load: `wrk` keep-alive and `Connection: close` on the app plus the probes,
/// while `action` runs; asserts that nothing failed.
async fn under_load<F, Fut>(machine: &Machine, step: &str, action: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let load = |close: bool| {
        tokio::spawn(load::wrk(
            machine.http,
            "sd.test",
            Duration::from_secs(8),
            8,
            close,
        ))
    };
    let probe = load::Probe::start(
        machine.http,
        "sd.test",
        "sd-app",
        machine.service,
        "sd-service",
    )
    .unwrap();
    let (keep_alive, fresh) = (load(false), load(true));
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let Err(e) = action().await {
        panic!("{step}: {e:#}\n{}", machine.journal().await);
    }
    for (kind, report) in [
        ("keep-alive", keep_alive.await.unwrap().unwrap()),
        ("Connection: close", fresh.await.unwrap().unwrap()),
    ] {
        eprintln!(
            "{step} under wrk ({kind}): {} requests, {} socket errors, {} non-2xx",
            report.requests, report.socket_errors, report.non_2xx
        );
        assert!(report.requests > 100, "{step}: {}", report.output);
        assert_eq!(
            (report.socket_errors, report.non_2xx),
            (0, 0),
            "{step}: requests failed\n{}\n{}",
            report.output,
            machine.journal().await
        );
    }
    probe.stop().await.unwrap().assert_clean(step);
}

/// #19, systemd form: every unit restarted in turn, the binaries upgraded in place, and a
/// reload of HAProxy, under load: 0 failed requests, 0 misroutes, the same listening sockets.
#[tokio::test]
async fn the_systemd_units_restart_and_upgrade_without_dropping_a_request() {
    let _one = ONE_AT_A_TIME.lock().await;
    legate_image().await.unwrap();
    let image = systemd_image().await.unwrap();
    let images = images().unwrap();
    let network = Network::create("systemd").await.unwrap();
    let gateway = network.gateway().await.unwrap();
    let (service_port, new_port) = (free_port().unwrap(), free_port().unwrap());
    let service_publish = format!("127.0.0.1::{service_port}");
    let args = [
        "--network",
        network.name(),
        "--publish",
        "127.0.0.1::80",
        "--publish",
        &service_publish,
    ];
    let machine = Machine::boot(&image, &args, async |container: &Container| {
        let http = container.published("80/tcp").await?;
        let service = container.published(&format!("{service_port}/tcp")).await?;
        Ok((http, service))
    })
    .await
    .unwrap();

    // The host's settings, as an operator writes them (deploy/systemd/legate.env); etcd is
    // Debian's (started at boot), on loopback. The machine's containers are this run's only.
    let settings = format!(
        "HOST_IP={gateway}\nHOST_ID=systemd-test\nLEGATE_BIND_ADDRESS=0.0.0.0\n\
         LEGATE_LEASE_TTL=10\nLEGATE_CONTAINER_FILTER=label={RUN_LABEL}={}\n",
        docker::run_id()
    );
    machine
        .write("/etc/legate/legate.env", &settings)
        .await
        .unwrap();
    let started = machine
        .exec(&[
            "systemctl",
            "start",
            "etcd.service",
            "legate-registrar.service",
            "legate-confgen.service",
            "legate-supervisor.service",
        ])
        .await;
    if let Err(e) = started {
        panic!("{e:#}\n{}", machine.journal().await);
    }

    let _containers = docker::run_app_and_service("sd.test", "sd-app", service_port, "sd-service")
        .await
        .unwrap();
    machine.wait_routed("systemd's HAProxy").await;

    let ports = [80, service_port];
    let listening = machine.listeners(&ports).await.unwrap();
    assert_eq!(listening.len(), 2, "{listening:?}");
    let master = machine.haproxy_master().await.unwrap();
    for unit in [
        "legate-registrar.service",
        "legate-confgen.service",
        "legate-supervisor.service",
        "etcd.service",
    ] {
        let before = machine.main_pid(unit).await.unwrap();
        under_load(&machine, &format!("systemctl restart {unit}"), || async {
            machine
                .exec(&["systemctl", "restart", unit])
                .await
                .map(drop)
        })
        .await;
        let after = machine.main_pid(unit).await.unwrap();
        assert!(after != 0 && after != before, "{unit}: {before} -> {after}");
        assert_eq!(
            machine.listeners(&ports).await.unwrap(),
            listening,
            "HAProxy's listening sockets changed while {unit} restarted"
        );
        assert_eq!(machine.haproxy_master().await.unwrap(), master);
    }

    // An upgrade as a package does it: each binary replaced by a new file (rename over the
    // old one), then the units restarted in order.
    under_load(&machine, "binaries upgraded, units restarted", || async {
        for service in ["legate-registrar", "legate-confgen", "legate-supervisor"] {
            let built = legate_tests::service::binary(service)?;
            let staged = format!("/usr/local/bin/.{service}.new");
            let target = format!("{}:{staged}", machine.container.id());
            docker::docker(&["cp", built.to_str().unwrap(), &target]).await?;
            machine
                .exec(&["mv", &staged, &format!("/usr/local/bin/{service}")])
                .await?;
        }
        for unit in ["legate-registrar", "legate-confgen", "legate-supervisor"] {
            machine.exec(&["systemctl", "restart", unit]).await?;
        }
        Ok(())
    })
    .await;
    assert_eq!(machine.listeners(&ports).await.unwrap(), listening);

    // A new TCP service port: a reload of HAProxy (new workers, the listening sockets passed
    // on to them), under load.
    let (new_env, new_port_env, new_publish) = (
        format!("SERVICE_PORT={new_port}"),
        format!("PORT={new_port}"),
        new_port.to_string(),
    );
    let mut new_service = None;
    under_load(&machine, "a new service port (HAProxy reloads)", || async {
        new_service = Some(
            Container::run(&[
                "-e",
                &new_env,
                "-e",
                &new_port_env,
                "-e",
                "RESPONSE=sd-new",
                "-p",
                &new_publish,
                &images.tcp_service,
            ])
            .await?,
        );
        wait_for("a listener on the new port", WAIT, || async {
            Ok((machine.listeners(&[new_port]).await?.len() == 1).then_some(()))
        })
        .await
        .map(drop)
    })
    .await;
    assert_eq!(machine.listeners(&ports).await.unwrap(), listening);
    assert_eq!(machine.haproxy_master().await.unwrap(), master);
    assert!(new_service.is_some());
}

/// The containers and volumes the fleet unit makes, by their fixed names.
const FLEET_CONTAINERS: [&str; 5] = [
    "legate-registrar",
    "legate-confgen",
    "legate-supervisor",
    "legate-haproxy",
    "legate-haproxy-next",
];
const FLEET_VOLUMES: [&str; 2] = ["legate-supervisor", "legate-haproxy"];
/// Host directories the fleet unit mounts, which the engine creates when they are missing.
const FLEET_HOST_DIRS: [&str; 2] = ["/run/legate", "/etc/legate/tls"];

/// What the fleet unit left on the engine and the host, removed when dropped: its containers
/// (by the ids they had), its volumes, and the host directories the test made.
struct FleetLeftovers {
    made_dirs: Vec<&'static str>,
    /// Images the test built, removed last.
    images: Vec<String>,
}

impl FleetLeftovers {
    /// Fails if this host already runs a fleet ambassador: the test would replace it.
    fn claim() -> Result<Self> {
        for name in FLEET_CONTAINERS {
            let found = std::process::Command::new("docker")
                .args(["container", "inspect", name])
                .output()?;
            if found.status.success() {
                bail!("a container {name} exists on this host: it runs an ambassador, not a test");
            }
        }
        let made_dirs = FLEET_HOST_DIRS
            .into_iter()
            .filter(|dir| !Path::new(dir).exists())
            .collect();
        Ok(Self {
            made_dirs,
            images: Vec::new(),
        })
    }
}

impl Drop for FleetLeftovers {
    fn drop(&mut self) {
        for name in FLEET_CONTAINERS {
            let id = std::process::Command::new("docker")
                .args(["container", "inspect", "--format", "{{.Id}}", name])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
            if let Some(id) = id {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "--force", &id])
                    .output();
            }
        }
        let _ = std::process::Command::new("docker")
            .args(["volume", "rm"])
            .args(FLEET_VOLUMES)
            .output();
        for dir in &self.made_dirs {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir("/etc/legate");
        for image in &self.images {
            let _ = std::process::Command::new("docker")
                .args(["rmi", "--force", image])
                .output();
        }
    }
}

/// Tests of this binary one at a time: each boots a machine and loads it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// #19, fleet form: the unit template `ambassador@.service` run by systemd (what fleet does
/// on each machine), its containers on the engine of this host: the unit restarted, its
/// containers restarted, then an upgrade to a rebuilt image (the unit restarted with a new
/// LEGATE_IMAGE), under load: 0 failed requests, 0 misroutes, HAProxy's listening sockets the
/// same sockets throughout while its container is replaced.
#[tokio::test]
async fn the_fleet_unit_restarts_and_upgrades_without_dropping_a_request() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut leftovers = FleetLeftovers::claim().unwrap();
    legate_image().await.unwrap();
    let image = systemd_image().await.unwrap();
    // The rebuilt image of the upgrade: the same content, another image id.
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!(
            "FROM legate:latest\nLABEL legate.test.rebuilt={}\n",
            docker::run_id()
        ),
    )
    .unwrap();
    let rebuilt = format!("legate-test-rebuilt:{}", docker::run_id());
    let label = format!("{TEST_LABEL}=1");
    docker::docker(&[
        "build",
        "--quiet",
        "--label",
        &label,
        "--tag",
        &rebuilt,
        context.path().to_str().unwrap(),
    ])
    .await
    .unwrap();
    leftovers.images.push(rebuilt.clone());
    let etcd = legate_tests::etcd::Etcd::start().await.unwrap();
    let (http_port, service_port) = (free_port().unwrap(), free_port().unwrap());
    let docker_cli = which("docker").expect("docker in PATH");
    let docker_mount = format!("{}:/usr/bin/docker:ro", docker_cli.display());
    let machine = Machine::boot(
        &image,
        &["--volume", &docker_mount],
        async |_: &Container| {
            Ok((
                SocketAddr::from(([127, 0, 0, 1], http_port)),
                SocketAddr::from(([127, 0, 0, 1], service_port)),
            ))
        },
    )
    .await
    .unwrap();

    // fleet's machine: CoreOS's /etc/environment, the unit template, the settings file.
    let settings = |image: &str| {
        format!(
            "LEGATE_IMAGE={image}\nETCD_PORT={}\nLEGATE_HTTP_PORT={http_port}\n\
             LEGATE_BIND_ADDRESS=127.0.0.1\nLEGATE_LEASE_TTL=10\n\
             LEGATE_CONTAINER_FILTER=label={RUN_LABEL}={}\n",
            etcd.addr().port(),
            docker::run_id()
        )
    };
    machine
        .write("/etc/environment", "COREOS_PRIVATE_IPV4=127.0.0.1\n")
        .await
        .unwrap();
    let template =
        std::fs::read_to_string(repo().join("deploy/fleet/ambassador@.service")).unwrap();
    machine
        .write("/etc/systemd/system/ambassador@.service", &template)
        .await
        .unwrap();
    machine
        .write("/etc/legate/legate.env", &settings("legate:latest"))
        .await
        .unwrap();
    // The unit requires docker.service: the engine is this host's, reached through its
    // socket, so the machine's docker.service only says it is there.
    machine
        .write(
            "/etc/systemd/system/docker.service",
            "[Unit]\nDescription=the host's Docker engine, through its socket\n\n\
             [Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/docker version\n",
        )
        .await
        .unwrap();
    machine.exec(&["systemctl", "daemon-reload"]).await.unwrap();
    let unit = "ambassador@1.service";
    if let Err(e) = machine.exec(&["systemctl", "start", unit]).await {
        panic!("{e:#}\n{}", machine.journal().await);
    }

    let _containers = docker::run_app_and_service("sd.test", "sd-app", service_port, "sd-service")
        .await
        .unwrap();
    machine.wait_routed("the fleet unit's HAProxy").await;

    // HAProxy runs on the host's network: its sockets are the host's.
    let ports = [http_port, service_port];
    let host_listeners = || load::host_listening_sockets(&ports);
    let listening = host_listeners();
    assert_eq!(listening.len(), 2, "{listening:?}");
    let container_id = |name: &'static str| async move {
        docker::docker(&["inspect", "--format", "{{.Id}}", name])
            .await
            .unwrap()
    };
    let haproxy = container_id("legate-haproxy").await;

    let before = machine.main_pid(unit).await.unwrap();
    under_load(&machine, "systemctl restart ambassador@1", || async {
        machine
            .exec(&["systemctl", "restart", unit])
            .await
            .map(drop)
    })
    .await;
    assert_ne!(machine.main_pid(unit).await.unwrap(), before);
    assert_eq!(
        host_listeners(),
        listening,
        "the unit's restart changed the listening sockets"
    );
    assert_eq!(
        container_id("legate-haproxy").await,
        haproxy,
        "HAProxy's container was replaced"
    );

    for name in ["legate-registrar", "legate-confgen"] {
        let before = container_id(name).await;
        under_load(&machine, &format!("docker restart {name}"), || async {
            docker::docker(&["restart", "--time", "10", name])
                .await
                .map(drop)
        })
        .await;
        assert_eq!(container_id(name).await, before);
        assert_eq!(
            host_listeners(),
            listening,
            "{name}'s restart changed the listening sockets"
        );
    }

    // The upgrade: a new image named in the settings, the unit restarted.
    machine
        .write("/etc/legate/legate.env", &settings(&rebuilt))
        .await
        .unwrap();
    under_load(
        &machine,
        "upgrade: LEGATE_IMAGE changed, the unit restarted",
        || async {
            machine
                .exec(&["systemctl", "restart", unit])
                .await
                .map(drop)
        },
    )
    .await;
    let wanted = docker::docker(&["image", "inspect", "--format", "{{.Id}}", &rebuilt])
        .await
        .unwrap();
    for name in [
        "legate-registrar",
        "legate-confgen",
        "legate-supervisor",
        "legate-haproxy",
    ] {
        let running = docker::docker(&["inspect", "--format", "{{.Image}}", name])
            .await
            .unwrap();
        assert_eq!(running, wanted, "{name} does not run the new image");
    }
    assert_ne!(container_id("legate-haproxy").await, haproxy);
    assert_eq!(
        host_listeners(),
        listening,
        "the upgrade changed the listening sockets"
    );

    if let Err(e) = machine.exec(&["systemctl", "stop", unit]).await {
        panic!("{e:#}\n{}", machine.journal().await);
    }
    drop(machine);
    drop(leftovers);
}
