//! The Docker side of the harness: test images built locally (there is no registry here), and
//! containers and networks that are removed, by id, when their guard drops.
//!
//! Every container and network gets the labels `legate.test=1` and `legate.test.run=<run id>`
//! so that an operator can tell where it came from; cleanup only ever uses the ids this process
//! created, never a name or label filter, so nothing else on the engine is touched.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::process::Command as StdCommand;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// Where Debian's `busybox-static` installs busybox.
pub const BUSYBOX: &str = "/bin/busybox";

/// Label put on everything the harness creates.
pub const TEST_LABEL: &str = "legate.test";
/// Label carrying this process's run id.
pub const RUN_LABEL: &str = "legate.test.run";

const HTTP_APP_SCRIPT: &str = r#"#!/bin/sh
# Serves "$RESPONSE" (default: the container's host name) on $PORT (default 80), and at
# /cgi-bin/upstream the first line that the TCP service at $UPSTREAM (host:port) sends.
mkdir -p /www/cgi-bin
echo "${RESPONSE:-$(hostname)}" > /www/index.html
echo ok > /www/health
cp /bin/upstream /www/cgi-bin/upstream
exec httpd -f -p "${PORT:-80}" -h /www
"#;

const UPSTREAM_CGI: &str = r#"#!/bin/sh
# nc runs the reader on the connection: with stdin closed instead, nc would quit before a
# banner that takes a moment (through a proxy) arrived.
printf 'Content-Type: text/plain\r\n\r\n'
line=/tmp/upstream.$$
nc -w 5 "${UPSTREAM%:*}" "${UPSTREAM##*:}" -e /bin/sh -c "read -r line; echo \"\$line\" > $line"
cat "$line"
rm -f "$line"
"#;

const TCP_SERVICE_SCRIPT: &str = r#"#!/bin/sh
# Listens on $PORT (default 3306); each connection gets a banner line, then an echo.
exec nc -ll -p "${PORT:-3306}" -e /bin/tcp-reply
"#;

const TCP_REPLY_SCRIPT: &str = r#"#!/bin/sh
echo "${RESPONSE:-$(hostname)}"
exec cat
"#;

const DOCKERFILE_HEAD: &str = "FROM scratch\n\
    COPY busybox /bin/busybox\n\
    RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
    RUN [\"/bin/busybox\", \"mkdir\", \"-p\", \"/tmp\"]\n";

/// The locally built test images.
#[derive(Debug, Clone)]
pub struct Images {
    /// HTTP app: busybox httpd on port 80 answering its host name (or `$RESPONSE`); at
    /// `/cgi-bin/upstream`, the first line of the TCP service at `$UPSTREAM` (`host:port`).
    pub http_app: String,
    /// TCP service: busybox nc on port 3306 sending its host name (or `$RESPONSE`), then echo.
    pub tcp_service: String,
}

/// The test images, built once per process, and only when the engine lacks them: their tags
/// carry a hash of their content.
pub fn images() -> Result<&'static Images> {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    if let Some(images) = IMAGES.get() {
        return Ok(images);
    }
    let _building = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(images) = IMAGES.get() {
        return Ok(images);
    }
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX}: install Debian's busybox-static"))?;
    let http_app = build_image(
        "legate-test-http",
        &busybox,
        &format!(
            "{DOCKERFILE_HEAD}COPY http-app /bin/http-app\nCOPY upstream /bin/upstream\n\
             EXPOSE 80\nCMD [\"/bin/http-app\"]\n"
        ),
        &[("http-app", HTTP_APP_SCRIPT), ("upstream", UPSTREAM_CGI)],
    )?;
    let tcp_service = build_image(
        "legate-test-tcp",
        &busybox,
        &format!(
            "{DOCKERFILE_HEAD}COPY tcp-service /bin/tcp-service\nCOPY tcp-reply /bin/tcp-reply\n\
             EXPOSE 3306\nCMD [\"/bin/tcp-service\"]\n"
        ),
        &[
            ("tcp-service", TCP_SERVICE_SCRIPT),
            ("tcp-reply", TCP_REPLY_SCRIPT),
        ],
    )?;
    Ok(IMAGES.get_or_init(|| Images {
        http_app,
        tcp_service,
    }))
}

fn build_image(
    name: &str,
    busybox: &[u8],
    dockerfile: &str,
    scripts: &[(&str, &str)],
) -> Result<String> {
    let mut hasher = DefaultHasher::new();
    (busybox, dockerfile, scripts).hash(&mut hasher);
    let tag = format!("{name}:{:016x}", hasher.finish());
    let present = StdCommand::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &tag])
        .output()
        .context("running docker: is the engine installed?")?;
    if present.status.success() {
        return Ok(tag);
    }
    let context = tempfile::Builder::new().prefix("legate-image-").tempdir()?;
    std::fs::write(context.path().join("busybox"), busybox)?;
    std::fs::set_permissions(
        context.path().join("busybox"),
        PermissionsExt::from_mode(0o755),
    )?;
    std::fs::write(context.path().join("Dockerfile"), dockerfile)?;
    for (file, text) in scripts {
        let path = context.path().join(file);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, PermissionsExt::from_mode(0o755))?;
    }
    let output = StdCommand::new("docker")
        .args([
            "build",
            "--quiet",
            "--label",
            &format!("{TEST_LABEL}=1"),
            "--tag",
            &tag,
        ])
        .arg(context.path())
        .output()
        .context("running docker build")?;
    if !output.status.success() {
        bail!(
            "docker build of {tag} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(tag)
}

/// This process's run id: distinguishes its containers from those of concurrent test runs.
pub fn run_id() -> &'static str {
    static RUN_ID: OnceLock<String> = OnceLock::new();
    RUN_ID.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!("{}-{nanos:x}", std::process::id())
    })
}

/// Runs `docker` with `args`, returning its trimmed stdout; fails with its stderr.
pub async fn docker(args: &[&str]) -> Result<String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .await
        .context("running docker")?;
    if !output.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// A container this process started; force-removed, with its anonymous volumes, on drop.
#[derive(Debug)]
pub struct Container {
    id: String,
}

impl Container {
    /// `docker run -d` with the harness labels, then `args` (options, image, command).
    pub async fn run(args: &[&str]) -> Result<Self> {
        Self::new(&["run", "-d"], args).await
    }

    /// `docker create`, like [`Container::run`] but not started.
    pub async fn create(args: &[&str]) -> Result<Self> {
        Self::new(&["create"], args).await
    }

    async fn new(verb: &[&str], args: &[&str]) -> Result<Self> {
        let test_label = format!("{TEST_LABEL}=1");
        let run_label = format!("{RUN_LABEL}={}", run_id());
        let mut full = verb.to_vec();
        full.extend_from_slice(&["--label", &test_label, "--label", &run_label]);
        full.extend_from_slice(args);
        let id = docker(&full).await?;
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "docker {} printed {id:?}, not a container id",
                verb.join(" ")
            );
        }
        Ok(Self { id })
    }

    /// The full container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `docker inspect` of the container.
    pub async fn inspect(&self) -> Result<serde_json::Value> {
        let text = docker(&["inspect", &self.id]).await?;
        let mut list: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        list.pop().context("docker inspect returned nothing")
    }

    /// The host address `container_port` (e.g. `80/tcp`) is published on, waiting for Docker
    /// to report it.
    pub async fn published(&self, container_port: &str) -> Result<SocketAddr> {
        let what = format!("container {} to publish {container_port}", &self.id[..12]);
        crate::wait_for(&what, crate::WAIT, || async {
            let info = self.inspect().await?;
            let bindings = &info["NetworkSettings"]["Ports"][container_port];
            let Some(binding) = bindings.as_array().and_then(|b| b.first()) else {
                return Ok(None);
            };
            let port: u16 = binding["HostPort"].as_str().unwrap_or("").parse()?;
            let ip = match binding["HostIp"].as_str() {
                Some("") | Some("0.0.0.0") | None => Ipv4Addr::LOCALHOST.into(),
                Some(ip) => ip.parse()?,
            };
            Ok(Some(SocketAddr::new(ip, port)))
        })
        .await
    }

    /// Runs `docker <verb> <id>` (stop, kill, start, pause, unpause, ...).
    pub async fn command(&self, verb: &str) -> Result<()> {
        docker(&[verb, &self.id]).await.map(drop)
    }
}

/// Runs the test HTTP app for `domain` answering `response`, publishing port 80 on an
/// ephemeral host port, and the test TCP service on `service_port` (its `SERVICE_PORT`,
/// published on the same host port) sending `banner`.
pub async fn run_app_and_service(
    domain: &str,
    response: &str,
    service_port: u16,
    banner: &str,
) -> Result<(Container, Container)> {
    let images = images()?;
    let (domain, response) = (
        format!("DOMAIN_NAME={domain}"),
        format!("RESPONSE={response}"),
    );
    let app =
        Container::run(&["-e", &domain, "-e", &response, "-p", "80", &images.http_app]).await?;
    let (service_env, port_env, banner, publish) = (
        format!("SERVICE_PORT={service_port}"),
        format!("PORT={service_port}"),
        format!("RESPONSE={banner}"),
        service_port.to_string(),
    );
    let service = Container::run(&[
        "-e",
        &service_env,
        "-e",
        &port_env,
        "-e",
        &banner,
        "-p",
        &publish,
        &images.tcp_service,
    ])
    .await?;
    Ok((app, service))
}

/// Force-removes `containers` with a few `docker rm` commands instead of one each; those that
/// a command failed to remove are left to their own drop.
pub async fn remove_all(containers: Vec<Container>) {
    let mut containers = containers.into_iter();
    loop {
        let mut chunk: Vec<Container> = containers.by_ref().take(100).collect();
        if chunk.is_empty() {
            return;
        }
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(chunk.iter().map(Container::id));
        match docker(&args).await {
            Ok(_) => chunk.iter_mut().for_each(|c| c.id.clear()),
            Err(e) => eprintln!("harness: {e:#}"),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if !self.id.is_empty() {
            remove_by_id("rm", &["-f", "-v"], &self.id);
        }
    }
}

/// GETs `url` with the Host header `host` from a new container on `network` (busybox wget in
/// the HTTP app image) and returns the body; the container is removed afterwards.
pub async fn get_from_container(network: &Network, url: &str, host: &str) -> Result<String> {
    let header = format!("Host: {host}");
    let consumer = Container::create(&[
        "--network",
        network.name(),
        // What the README's usage does: the host's ambassador by name.
        "--add-host",
        "legate-ambassador:host-gateway",
        &images()?.http_app,
        // No `-T`: busybox 1.35's wget crashes with it; the timeout below bounds the request.
        "wget",
        "-q",
        "-O",
        "-",
        "--header",
        &header,
        url,
    ])
    .await?;
    tokio::time::timeout(crate::WAIT, docker(&["start", "--attach", consumer.id()]))
        .await
        .with_context(|| format!("the request to {url} from a container did not finish"))?
}

/// A user-defined bridge network this process created; removed on drop.
#[derive(Debug)]
pub struct Network {
    id: String,
    name: String,
}

impl Network {
    /// Creates a network with a name unique to this run.
    pub async fn create(purpose: &str) -> Result<Self> {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("legate-test-{purpose}-{}-{n}", run_id());
        let test_label = format!("{TEST_LABEL}=1");
        let run_label = format!("{RUN_LABEL}={}", run_id());
        let id = docker(&[
            "network",
            "create",
            "--label",
            &test_label,
            "--label",
            &run_label,
            &name,
        ])
        .await?;
        Ok(Self { id, name })
    }

    /// The network id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The network name, for `--network`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of the host on this network (the bridge's gateway): containers on the
    /// network reach the host's listeners there.
    pub async fn gateway(&self) -> Result<std::net::IpAddr> {
        let text = docker(&[
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
            &self.id,
        ])
        .await?;
        text.split_whitespace()
            .find_map(|a| a.parse::<Ipv4Addr>().ok())
            .map(Into::into)
            .with_context(|| format!("network {} has no IPv4 gateway: {text:?}", self.name))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        remove_by_id("network", &["rm"], &self.id);
    }
}

fn remove_by_id(verb: &str, args: &[&str], id: &str) {
    let result = StdCommand::new("docker")
        .arg(verb)
        .args(args)
        .arg(id)
        .output();
    match result {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !stderr.contains("No such") {
                eprintln!("harness: docker {verb} {id}: {}", stderr.trim());
            }
        }
        Err(e) => eprintln!("harness: docker {verb} {id}: {e}"),
    }
}

/// Whether the Docker engine has an object (container, network, image) with this id.
pub fn exists(id: &str) -> bool {
    StdCommand::new("docker")
        .args(["inspect", "--format", "{{.Id}}", id])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Fails clearly when the Docker engine does not answer.
pub fn engine_answers() -> Result<()> {
    let output = StdCommand::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .context("running docker")?;
    if !output.status.success() {
        bail!(
            "the Docker engine does not answer: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
