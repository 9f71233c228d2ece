//! The registrar against a real Docker engine and a real etcd.
//!
//! Each test runs its own etcd and registrar; the registrar only sees the containers of its
//! test (a `legate.test.case` label filter), so tests run side by side on one engine.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests themselves

use std::collections::BTreeMap;
use std::time::Duration;

use legate_proto::v1;
use legate_proto::v1::registrar_client::RegistrarClient;
use legate_tests::docker::{self, Container};
use legate_tests::etcd::{Cluster, Etcd};
use legate_tests::pki::{Issued, Pki};
use legate_tests::proxy::{Proxy, Upstream};
use legate_tests::service::Service;
use legate_tests::{WAIT, http_get, tcp_banner, wait_for};

const TTL: &str = "3";

struct Fixture {
    etcd: Etcd,
    registrar: Service,
    case: String,
    host_id: String,
}

impl Fixture {
    async fn start(extra: &[&str]) -> Self {
        let etcd = Etcd::start().await.unwrap();
        let endpoint = etcd.endpoint();
        Self::start_with(etcd, &endpoint, extra).await
    }

    /// A registrar that reaches `etcd` at `endpoint` (e.g. through a [`Proxy`]).
    async fn start_with(etcd: Etcd, endpoint: &str, extra: &[&str]) -> Self {
        let case = format!(
            "{}-{}",
            docker::run_id(),
            legate_tests::free_port().unwrap()
        );
        let host_id = format!("host-{}", legate_tests::free_port().unwrap());
        let registrar = start_registrar(endpoint, &case, &host_id, extra).await;
        Self {
            etcd,
            registrar,
            case,
            host_id,
        }
    }

    /// Runs a container of this test: `args` are docker run options, the image and command.
    async fn run(&self, args: &[&str]) -> Container {
        let label = format!("legate.test.case={}", self.case);
        let mut full = vec!["--label", &label];
        full.extend_from_slice(args);
        Container::run(&full).await.unwrap()
    }

    /// Every key and value in etcd.
    async fn keys(&self) -> BTreeMap<String, String> {
        all_keys(&self.etcd).await
    }

    /// Waits until the registration keys (apps and services) satisfy `check`.
    async fn wait_keys(
        &self,
        what: &str,
        check: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        wait_for(what, WAIT, || async {
            let keys = registrations(&self.keys().await);
            Ok(check(&keys).then_some(keys))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\nregistrar log:\n{}", self.registrar.log()))
    }

    /// Runs an HTTP app for `domain`, its port 80 published on loopback.
    async fn run_app(&self, domain: &str) -> Container {
        let env = format!("DOMAIN_NAME={domain}");
        self.run(&["-e", &env, "-p", "127.0.0.1::80", &images().http_app])
            .await
    }

    /// Runs an app for `domain` and waits until it is the one registration.
    async fn registered_app(&self, domain: &str) -> (Container, BTreeMap<String, String>) {
        let app = self.run_app(domain).await;
        let keys = self.wait_keys("the app registered", |k| k.len() == 1).await;
        (app, keys)
    }

    async fn client(&self) -> RegistrarClient<tonic::transport::Channel> {
        RegistrarClient::new(self.registrar.connect().await.unwrap())
    }
}

async fn start_registrar(endpoint: &str, case: &str, host_id: &str, extra: &[&str]) -> Service {
    let filter = format!("label=legate.test.case={case}");
    let mut args = vec![
        "--etcd-endpoints",
        endpoint,
        "--filter",
        &filter,
        "--lease-ttl",
        TTL,
    ];
    args.extend_from_slice(extra);
    let mut registrar = Service::start(
        "legate-registrar",
        &args,
        &[
            ("HOST_IP", "127.0.0.1"),
            ("HOST_ID", host_id),
            ("LEGATE_LOG", "info,legate_registrar=debug"),
        ],
    )
    .unwrap();
    registrar.wait_serving().await.unwrap();
    registrar
}

async fn all_keys(etcd: &Etcd) -> BTreeMap<String, String> {
    let mut client = etcd.client().await.unwrap();
    let response = client
        .get("/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    response
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_owned(),
                kv.value_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Waits until a lease of the registrar's TTL, granted now and never kept alive, has expired in
/// etcd: a key the registrar stopped keeping alive meanwhile would be gone by then. (etcd's
/// clock decides, not the test's.)
async fn a_ttl_later(etcd: &Etcd) {
    let mut client = etcd.client().await.unwrap();
    let probe = client
        .lease_grant(TTL.parse().unwrap(), None)
        .await
        .unwrap()
        .id();
    wait_for("a lease of the TTL to expire", WAIT, || {
        let mut client = client.clone();
        async move {
            let left = client.lease_time_to_live(probe, None).await?.ttl();
            Ok((left <= 0).then_some(()))
        }
    })
    .await
    .unwrap();
}

fn registrations(keys: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    keys.iter()
        .filter(|(k, _)| k.starts_with("/apps/") || k.starts_with("/services/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn images() -> &'static docker::Images {
    docker::images().unwrap()
}

/// The `<ip>:<port>` at the end of a key.
fn endpoint_of(key: &str) -> std::net::SocketAddr {
    key.rsplit('/').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn seed_scenario_registers_service_and_app_and_follows_their_lifecycle() {
    let f = Fixture::start(&[]).await;
    let mysql = f
        .run(&[
            "--name",
            &format!("some-mysql-{}", f.case),
            "-e",
            "SERVICE_PORT=3306",
            "-p",
            "127.0.0.1::3306",
            &images().tcp_service,
        ])
        .await;
    let wordpress = f.run_app("blog.example.com").await;
    let service_port = mysql.published("3306/tcp").await.unwrap();
    let app_port = wordpress.published("80/tcp").await.unwrap();

    let service_key = format!(
        "/services/some-mysql-{}/3306/{}/{service_port}",
        f.case,
        mysql.id()
    );
    let app_key = format!("/apps/blog.example.com/{}/{app_port}", wordpress.id());
    let keys = f
        .wait_keys("both containers registered", |k| {
            k.contains_key(&service_key) && k.contains_key(&app_key)
        })
        .await;
    assert_eq!(keys.len(), 2, "{keys:#?}");
    let value: serde_json::Value = serde_json::from_str(&keys[&app_key]).unwrap();
    assert_eq!(value["host_id"], f.host_id.as_str());
    let all = f.keys().await;
    let record: serde_json::Value =
        serde_json::from_str(&all[&format!("/hosts/{}", f.host_id)]).unwrap();
    assert_eq!(record["ip"], "127.0.0.1");

    // The registered addresses reach the containers, once their servers listen: a container is
    // registered when it runs, and its server may still be starting (docker-proxy then accepts
    // and resets the connection).
    let (status, body) = wait_for("the app at its registered address", WAIT, || async {
        Ok(Some(
            http_get(endpoint_of(&app_key), "blog.example.com", "/").await?,
        ))
    })
    .await
    .unwrap();
    assert_eq!((status, body.trim()), (200, &wordpress.id()[..12]));
    let banner = wait_for("the service at its registered address", WAIT, || async {
        let banner = tcp_banner(endpoint_of(&service_key)).await?;
        Ok((!banner.is_empty()).then_some(banner))
    })
    .await
    .unwrap();
    assert_eq!(banner, mysql.id()[..12]);

    // stop → gone; start → back (Docker may publish another port); kill → gone.
    wordpress.command("stop").await.unwrap();
    f.wait_keys("the stopped app deregistered", |k| {
        !k.keys().any(|k| k.starts_with("/apps/"))
    })
    .await;
    wordpress.command("start").await.unwrap();
    let new_port = wordpress.published("80/tcp").await.unwrap();
    let new_key = format!("/apps/blog.example.com/{}/{new_port}", wordpress.id());
    f.wait_keys("the restarted app registered", |k| k.contains_key(&new_key))
        .await;
    mysql.command("kill").await.unwrap();
    f.wait_keys("the killed service deregistered", |k| {
        !k.contains_key(&service_key)
    })
    .await;
    drop(mysql);
    drop(wordpress);
    f.wait_keys("removed containers deregistered", BTreeMap::is_empty)
        .await;
}

#[tokio::test]
async fn containers_running_before_the_registrar_starts_are_registered() {
    let etcd = Etcd::start().await.unwrap();
    let case = format!(
        "{}-pre-{}",
        docker::run_id(),
        legate_tests::free_port().unwrap()
    );
    let label = format!("legate.test.case={case}");
    let app = Container::run(&[
        "--label",
        &label,
        "-e",
        "DOMAIN_NAME=early.example.com",
        "-p",
        "127.0.0.1::80",
        &images().http_app,
    ])
    .await
    .unwrap();
    let port = app.published("80/tcp").await.unwrap();
    let registrar = start_registrar(&etcd.endpoint(), &case, "early-host", &[]).await;
    let key = format!("/apps/early.example.com/{}/{port}", app.id());
    wait_for("the early container registered", WAIT, || async {
        Ok(all_keys(&etcd).await.contains_key(&key).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", registrar.log()));
}

#[tokio::test]
async fn health_transitions_register_only_healthy_containers() {
    let f = Fixture::start(&[]).await;
    let app = f
        .run(&[
            "-e",
            "DOMAIN_NAME=healthy.example.com",
            "-p",
            "127.0.0.1::80",
            "--health-cmd",
            "test -f /tmp/healthy",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            &images().http_app,
        ])
        .await;
    // Starting, then unhealthy: not routed.
    wait_for("the container to be unhealthy", WAIT, || async {
        let info = app.inspect().await?;
        Ok((info["State"]["Health"]["Status"] == "unhealthy").then_some(()))
    })
    .await
    .unwrap();
    let mut client = f.client().await;
    client.resync(v1::ResyncRequest {}).await.unwrap();
    assert!(
        registrations(&f.keys().await).is_empty(),
        "an unhealthy container is not registered"
    );

    docker::docker(&["exec", app.id(), "touch", "/tmp/healthy"])
        .await
        .unwrap();
    f.wait_keys("the healthy container registered", |k| {
        k.keys()
            .any(|k| k.starts_with("/apps/healthy.example.com/"))
    })
    .await;
    docker::docker(&["exec", app.id(), "rm", "/tmp/healthy"])
        .await
        .unwrap();
    f.wait_keys("the unhealthy container deregistered", BTreeMap::is_empty)
        .await;
}

#[tokio::test]
async fn comma_lists_and_labels_over_environment() {
    let f = Fixture::start(&[]).await;
    let c = f
        .run(&[
            "-e",
            "DOMAIN_NAME=env.example.com",
            "--label",
            "legate.domain=a.example.com,B.example.com",
            "-e",
            "SERVICE_PORT=5432,6379",
            "-e",
            "SERVICE_NAME=cache",
            "-p",
            "127.0.0.1::80",
            "-p",
            "127.0.0.1::5432",
            "-p",
            "127.0.0.1::6379",
            &images().http_app,
        ])
        .await;
    let web = c.published("80/tcp").await.unwrap();
    let pg = c.published("5432/tcp").await.unwrap();
    let redis = c.published("6379/tcp").await.unwrap();
    let id = c.id();
    let expected: Vec<String> = vec![
        format!("/apps/a.example.com/{id}/{web}"),
        format!("/apps/b.example.com/{id}/{web}"),
        format!("/services/cache/5432/{id}/{pg}"),
        format!("/services/cache/6379/{id}/{redis}"),
    ];
    let keys = f.wait_keys("lists registered", |k| k.len() == 4).await;
    assert_eq!(keys.keys().cloned().collect::<Vec<_>>(), expected);
}

/// Hostile container configurations: each is refused with a reason, never reaches etcd, and
/// does not disturb a good container.
#[tokio::test]
async fn hostile_containers_are_refused_and_listed_with_reasons() {
    let f = Fixture::start(&[]).await;
    let long = format!("DOMAIN_NAME={}.com", "x".repeat(300));
    let hostile: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-e", "DOMAIN_NAME=a b.com"], "character ' ' at byte 1"),
        (
            vec!["-e", "DOMAIN_NAME=a.com\nbackend evil"],
            "character '\\n' at byte 5",
        ),
        (vec!["-e", "DOMAIN_NAME=a.com;x"], "character ';'"),
        (vec!["-e", "DOMAIN_NAME=a.com#x"], "character '#'"),
        (vec!["-e", "DOMAIN_NAME=a'.com"], "character '\\''"),
        (vec!["-e", "DOMAIN_NAME=a\".com"], "character '\\\"'"),
        (vec!["-e", "DOMAIN_NAME=-a.com"], "starts or ends with '-'"),
        (vec!["-e", "DOMAIN_NAME=a..com"], "empty label"),
        (vec!["-e", "DOMAIN_NAME=.a.com"], "empty label"),
        (vec!["-e", "DOMAIN_NAME=a.com."], "empty label"),
        (vec!["-e", "DOMAIN_NAME=*.*.com"], "'*' is only allowed"),
        (vec!["-e", "DOMAIN_NAME=bücher.de"], "character '\\u{fc}'"),
        (vec!["-e", &long], "at most 253"),
        (vec!["-e", "DOMAIN_NAME=a.com,"], "is empty"),
        (vec!["-e", "DOMAIN_NAME=10.0.0.1"], "all digits"),
        (vec!["-e", "DOMAIN_NAME=a.com\tb"], "character '\\t'"),
        (vec!["-e", "DOMAIN_NAME={{x}}.com"], "character '{'"),
        (vec!["-e", "SERVICE_PORT=mysql"], "not a decimal number"),
        (vec!["-e", "SERVICE_PORT=0"], "out of range"),
        (vec!["-e", "SERVICE_PORT=70000"], "out of range"),
        (vec!["-e", "SERVICE_PORT=3306 "], "not a decimal number"),
        (vec!["-e", "SERVICE_PORT=080"], "leading zero"),
        (vec!["-e", "SERVICE_PORT=9999"], "9999/tcp is not published"),
        (
            vec!["-e", "DOMAIN_NAME=a.com", "-e", "APP_PORT=8o"],
            "APP_PORT",
        ),
        (
            vec!["-e", "SERVICE_PORT=3306", "-e", "SERVICE_NAME=my sql"],
            "SERVICE_NAME",
        ),
        (
            vec![
                "--label",
                "legate.domain=a b.com",
                "-e",
                "DOMAIN_NAME=ok.example.com",
            ],
            "legate.domain",
        ),
        (
            vec!["--label", "legate.ignore=yes", "-e", "DOMAIN_NAME=a.com"],
            "legate.ignore",
        ),
    ];
    let mut containers = Vec::new();
    for (options, reason) in &hostile {
        let mut args = options.clone();
        args.extend_from_slice(&[
            "-p",
            "127.0.0.1::80",
            "-p",
            "127.0.0.1::3306",
            &images().http_app,
        ]);
        containers.push((f.run(&args).await, *reason));
    }
    let good = f.run_app("good.example.com").await;

    let mut client = f.client().await;
    let list = wait_for("every hostile container refused", WAIT, || {
        let mut client = client.clone();
        let expected = containers.len();
        async move {
            client.resync(v1::ResyncRequest {}).await?;
            let list = client.list(v1::ListRequest {}).await?.into_inner();
            Ok((list.refused.len() == expected && list.registrations.len() == 1).then_some(list))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", f.registrar.log()));
    for (container, reason) in &containers {
        let refused = list
            .refused
            .iter()
            .find(|r| r.container_id == container.id())
            .unwrap();
        assert!(
            refused.reason.contains(reason),
            "reason {:?} does not say {reason:?}",
            refused.reason
        );
    }
    assert_eq!(list.registrations[0].container_id, good.id());
    assert_eq!(list.registrations[0].domain, "good.example.com");
    let keys = registrations(&f.keys().await);
    assert_eq!(
        keys.len(),
        1,
        "only the good container is in etcd: {keys:#?}"
    );
    assert!(keys.keys().all(|k| k.contains(good.id())));

    // Each refusal is in etcd too, under the host's lease, for the operators of every host.
    let all = f.keys().await;
    for (container, reason) in &containers {
        let key = format!("/refused/{}/{}", f.host_id, container.id());
        let value = all
            .get(&key)
            .unwrap_or_else(|| panic!("no {key} in etcd: {all:#?}"));
        let refusal = legate_proto::registry::Refusal::parse(value.as_bytes()).unwrap();
        assert!(refusal.reason.contains(reason), "{key}: {refusal:?}");
        assert!(!refusal.reason.contains(char::is_control), "{refusal:?}");
    }
    let refused = all.keys().filter(|k| k.starts_with("/refused/")).count();
    assert_eq!(refused, containers.len(), "{all:#?}");

    // Refusals are logged once per change, not on every reconcile.
    client.resync(v1::ResyncRequest {}).await.unwrap();
    let log = f.registrar.log();
    assert_eq!(
        log.matches("container refused").count(),
        containers.len(),
        "{log}"
    );
    let metrics = f.registrar.metrics_text().await.unwrap();
    assert!(
        metrics.contains(&format!("legate_registrar_refused {}", containers.len())),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_lost_lease_re_registers_everything() {
    let f = Fixture::start(&[]).await;
    let (_app, keys) = f.registered_app("lease.example.com").await;
    let mut client = f.etcd.client().await.unwrap();
    let before = client
        .get(keys.keys().next().unwrap().as_str(), None)
        .await
        .unwrap()
        .kvs()[0]
        .lease();
    // Revoking the lease is what its expiry does: every key attached to it is deleted.
    client.lease_revoke(before).await.unwrap();
    let after = wait_for("re-registration under a new lease", WAIT, || {
        let mut client = client.clone();
        let key = keys.keys().next().unwrap().clone();
        async move {
            let response = client.get(key.as_str(), None).await?;
            Ok(response
                .kvs()
                .first()
                .map(|kv| kv.lease())
                .filter(|l| *l != before))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", f.registrar.log()));
    let host = client
        .get(format!("/hosts/{}", f.host_id), None)
        .await
        .unwrap();
    assert_eq!(
        host.kvs()[0].lease(),
        after,
        "the host record is back under the new lease"
    );
}

#[tokio::test]
async fn etcd_restart_keeps_or_restores_every_key() {
    let mut f = Fixture::start(&[]).await;
    let (_app, keys) = f.registered_app("outage.example.com").await;
    f.etcd.kill();
    // Down for longer than the lease TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    f.etcd.restart().await.unwrap();
    let _ = f
        .wait_keys("the app registered after the outage", |k| *k == keys)
        .await;
    // And the lease is kept alive afterwards: the keys outlive several TTLs.
    for _ in 0..2 {
        a_ttl_later(&f.etcd).await;
    }
    assert_eq!(
        registrations(&f.keys().await),
        keys,
        "{}",
        f.registrar.log()
    );
}

#[tokio::test]
async fn a_restarted_registrar_adopts_its_keys_without_deleting_them() {
    let mut f = Fixture::start(&[]).await;
    let _app = f.registered_app("restart.example.com").await;
    let mut client = f.etcd.client().await.unwrap();
    let revision = client
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    let status = f.registrar.terminate(WAIT).await.unwrap();
    assert!(status.success(), "{status}");
    f.registrar = start_registrar(&f.etcd.endpoint(), &f.case, &f.host_id, &[]).await;
    let mut registrar_client = f.client().await;
    registrar_client.resync(v1::ResyncRequest {}).await.unwrap();
    // Past the old lease's TTL: had it not been adopted, the keys would be gone now.
    a_ttl_later(&f.etcd).await;
    registrar_client.resync(v1::ResyncRequest {}).await.unwrap();

    let now = client
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let options = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut watch = client.watch("/", Some(options)).await.unwrap();
    let mut deletes = Vec::new();
    let mut seen = revision;
    while seen < now {
        let response = tokio::time::timeout(WAIT, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for event in response.events() {
            let kv = event.kv().unwrap();
            seen = seen.max(kv.mod_revision());
            if event.event_type() == etcd_client::EventType::Delete {
                deletes.push(kv.key_str().unwrap().to_owned());
            }
        }
    }
    assert!(deletes.is_empty(), "the restart deleted {deletes:?}");
    assert_eq!(registrations(&f.keys().await).len(), 1);
}

#[tokio::test]
async fn a_lost_docker_event_stream_reconnects_and_resyncs() {
    let proxy = Proxy::start(Upstream::Unix("/var/run/docker.sock".into()))
        .await
        .unwrap();
    let host = format!("tcp://{}", proxy.addr());
    let f = Fixture::start(&["--docker-host", &host]).await;
    let _first = f.run_app("first.example.com").await;
    f.wait_keys("the first app registered", |k| k.len() == 1)
        .await;

    // The engine "restarts": the event stream is lost, and a container starts meanwhile.
    proxy.cut();
    let _second = f.run_app("second.example.com").await;
    wait_for("the registrar to notice the lost stream", WAIT, || async {
        Ok(f.registrar
            .log()
            .contains("Docker event stream")
            .then_some(()))
    })
    .await
    .unwrap();
    proxy.resume();
    f.wait_keys("the container started during the outage registered", |k| {
        k.len() == 2
    })
    .await;
    let metrics = f.registrar.metrics_text().await.unwrap();
    assert!(
        metrics.contains("legate_registrar_event_stream_restarts_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_killed_registrars_keys_expire_with_the_ttl() {
    let mut f = Fixture::start(&[]).await;
    let _app = f.registered_app("dead.example.com").await;
    f.registrar.kill();
    wait_for("the dead host's keys to expire", WAIT, || async {
        Ok(f.keys().await.is_empty().then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn deregister_on_exit_removes_the_keys_at_once() {
    let mut f = Fixture::start(&["--deregister-on-exit"]).await;
    let _app = f.registered_app("bye.example.com").await;
    let status = f.registrar.terminate(WAIT).await.unwrap();
    assert!(status.success());
    assert!(
        f.keys().await.is_empty(),
        "keys left after --deregister-on-exit"
    );
}

#[tokio::test]
async fn a_second_registrar_with_the_same_host_id_is_refused() {
    let f = Fixture::start(&[]).await;
    let (_app, keys) = f.registered_app("first.example.com").await;
    let filter = format!("label=legate.test.case={}", f.case);
    let endpoint = f.etcd.endpoint();
    let mut second = Service::start(
        "legate-registrar",
        &[
            "--etcd-endpoints",
            &endpoint,
            "--filter",
            &filter,
            "--lease-ttl",
            TTL,
        ],
        &[("HOST_IP", "127.0.0.1"), ("HOST_ID", &f.host_id)],
    )
    .unwrap();
    let status = second.wait_exit(WAIT).await.unwrap();
    assert!(!status.success(), "the second registrar kept running");
    assert!(
        second.log().contains("another registrar"),
        "{}",
        second.log()
    );
    // The first one keeps its registrations and its host record.
    a_ttl_later(&f.etcd).await;
    assert_eq!(registrations(&f.keys().await), keys);
    assert!(
        f.registrar
            .log()
            .contains("another registrar with this host id"),
        "{}",
        f.registrar.log()
    );
}

/// The lease of the registration keys, once they are back under a lease other than `old`.
async fn wait_new_lease(f: &Fixture, keys: &BTreeMap<String, String>, old: i64) -> i64 {
    let key = keys.keys().next().unwrap().clone();
    wait_for("the keys back under a new lease", WAIT, || {
        let key = key.clone();
        async move {
            let mut client = f.etcd.client().await?;
            let response = client.get(key.as_str(), None).await?;
            Ok(response
                .kvs()
                .first()
                .map(|kv| kv.lease())
                .filter(|l| *l != old))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nregistrar log:\n{}", f.registrar.log()))
}

async fn lease_of(f: &Fixture, keys: &BTreeMap<String, String>) -> i64 {
    let mut client = f.etcd.client().await.unwrap();
    client
        .get(keys.keys().next().unwrap().as_str(), None)
        .await
        .unwrap()
        .kvs()[0]
        .lease()
}

/// Regression (#13, item 1): etcd frozen past the lease TTL expires the lease when it runs
/// again; the registrar took the keep-alive's "lease not found" for a transient error and
/// retried the dead lease for ever, its containers unrouted.
#[tokio::test]
async fn a_lease_that_expired_while_etcd_was_frozen_is_replaced() {
    let f = Fixture::start(&[]).await;
    let (_app, keys) = f.registered_app("frozen.example.com").await;
    let before = lease_of(&f, &keys).await;
    f.etcd.freeze().unwrap();
    // The outage itself: longer than the 3 s TTL, and long enough for the HTTP/2 keep-alive to
    // give the connection up (a 6 s ping unanswered for 3 s), so that the registrar opens a new
    // keep-alive stream for its dead lease. A shorter freeze keeps the old stream, whose TTL-0
    // answer was always recognised.
    tokio::time::sleep(Duration::from_secs(12)).await;
    f.etcd.thaw().unwrap();
    let thawed = std::time::Instant::now();
    let after = wait_new_lease(&f, &keys, before).await;
    println!(
        "registrations back {:?} after etcd was thawed",
        thawed.elapsed()
    );
    assert_eq!(registrations(&f.keys().await), keys);
    let host = f
        .etcd
        .client()
        .await
        .unwrap()
        .get(format!("/hosts/{}", f.host_id), None)
        .await
        .unwrap();
    assert_eq!(host.kvs()[0].lease(), after, "the host record is back too");
    let metrics = f.registrar.metrics_text().await.unwrap();
    assert!(
        metrics.contains("legate_registrar_leases_lost_total 1"),
        "{metrics}"
    );
}

/// Regression (#13, item 1): the same when only the registrar is cut off from etcd (a
/// partition of its host), past the TTL: etcd expires the lease while the registrar cannot
/// reach it, and the registrar registers everything again once it can.
#[tokio::test]
async fn a_lease_that_expired_while_the_registrar_was_cut_off_is_replaced() {
    let etcd = Etcd::start().await.unwrap();
    let proxy = Proxy::start(Upstream::Tcp(etcd.addr())).await.unwrap();
    let f = Fixture::start_with(etcd, &format!("http://{}", proxy.addr()), &[]).await;
    let (_app, keys) = f.registered_app("partition.example.com").await;
    let before = lease_of(&f, &keys).await;
    proxy.cut();
    wait_for(
        "the lease to expire while the registrar is cut off",
        WAIT,
        || async { Ok(registrations(&f.keys().await).is_empty().then_some(())) },
    )
    .await
    .unwrap();
    proxy.resume();
    let resumed = std::time::Instant::now();
    wait_new_lease(&f, &keys, before).await;
    println!(
        "registrations back {:?} after the partition healed",
        resumed.elapsed()
    );
    assert_eq!(registrations(&f.keys().await), keys);
}

/// Regression (#13, item 10): `Registrar.List` never passes for the truth when it cannot be:
/// before a first reconcile it is UNAVAILABLE (not an empty list), and while etcd fails the
/// last list stays, with the error that makes it possibly stale.
#[tokio::test]
async fn list_says_when_it_cannot_know_or_may_be_stale() {
    let etcd = Etcd::start().await.unwrap();
    let proxy = Proxy::start(Upstream::Tcp(etcd.addr())).await.unwrap();
    let f = Fixture::start_with(etcd, &format!("http://{}", proxy.addr()), &[]).await;
    let (_app, keys) = f.registered_app("list.example.com").await;
    let mut client = f.client().await;
    // The key is in etcd once the write commits; the registrar lists it once it has the answer.
    let list = wait_for("the registration listed", WAIT, || {
        let mut client = client.clone();
        async move {
            let list = client.list(v1::ListRequest {}).await?.into_inner();
            Ok((list.registrations.len() == 1).then_some(list))
        }
    })
    .await
    .unwrap();
    assert!(list.reconciled_at_unix_ms > 0);
    assert_eq!(list.error, "");

    proxy.cut();
    client.resync(v1::ResyncRequest {}).await.unwrap_err();
    let stale = client.list(v1::ListRequest {}).await.unwrap().into_inner();
    assert_eq!(
        stale.registrations, list.registrations,
        "the last list is kept"
    );
    assert!(!stale.error.is_empty(), "the failure is shown: {stale:?}");
    proxy.resume();
    client.resync(v1::ResyncRequest {}).await.unwrap();
    let list = client.list(v1::ListRequest {}).await.unwrap().into_inner();
    assert_eq!(list.error, "");
    assert_eq!(
        list.registrations
            .iter()
            .map(|r| r.key.clone())
            .collect::<Vec<_>>(),
        keys.keys().cloned().collect::<Vec<_>>()
    );

    // A registrar that cannot reach etcd at all answers UNAVAILABLE with the reason.
    let mut lonely = Service::start(
        "legate-registrar",
        &[
            "--etcd-endpoints",
            "http://127.0.0.1:9",
            "--filter",
            "label=legate.none",
        ],
        &[("HOST_IP", "127.0.0.1"), ("HOST_ID", "lonely")],
    )
    .unwrap();
    let mut client = RegistrarClient::new(lonely.connect().await.unwrap());
    let status = client.list(v1::ListRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    lonely.kill();
}

/// A metric's value, summed over its label sets; 0 when absent.
async fn metric(service: &Service, name: &str) -> f64 {
    service.metric(name).await.unwrap()
}

/// Regression (#13, item 4): with a 3-member etcd and every endpoint given, the client kept
/// sending calls to a killed member ("tcp connect error"), and registrations took from 2.4 to
/// over 12 s until it came back. Once the registrar has seen the member go (here the leader,
/// so an election follows) and a new leader is elected, no call goes to the dead member:
/// containers register, and not one reconcile fails.
#[tokio::test]
async fn registrations_keep_flowing_with_the_etcd_leader_down() {
    let mut cluster = Cluster::start(3).await.unwrap();
    let case = format!(
        "{}-{}",
        docker::run_id(),
        legate_tests::free_port().unwrap()
    );
    let host_id = format!("host-{}", legate_tests::free_port().unwrap());
    let registrar = start_registrar(&cluster.endpoints(), &case, &host_id, &[]).await;
    let label = format!("legate.test.case={case}");
    let run_app = |domain: String| {
        let label = label.clone();
        async move {
            let env = format!("DOMAIN_NAME={domain}");
            let args = ["--label", &label, "-e", &env, "-p", "127.0.0.1::80"];
            let mut all = args.to_vec();
            all.push(&images().http_app);
            Container::run(&all).await.unwrap()
        }
    };
    let leader = cluster.leader().await.unwrap();
    let survivor = (leader + 1) % 3;
    let survivor = cluster.members[survivor].endpoint();
    let registered = |count: usize| {
        let survivor = survivor.clone();
        let registrar = &registrar;
        async move {
            wait_for(&format!("{count} registrations"), WAIT, || async {
                let mut client = etcd_client::Client::connect([&survivor], None).await?;
                let keys = client
                    .get("/apps/", Some(etcd_client::GetOptions::new().with_prefix()))
                    .await?;
                Ok((keys.kvs().len() == count).then_some(()))
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\nregistrar log:\n{}", registrar.log()));
        }
    };
    let mut apps = vec![run_app("first.example.com".to_owned()).await];
    registered(1).await;

    cluster.members[leader].kill();
    wait_for("the registrar to see the member gone", WAIT, || async {
        Ok((metric(&registrar, "legate_etcd_members_answering").await == 2.0).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nregistrar log:\n{}", registrar.log()));
    // Calls made during the election fail with "leader changed" and are retried: count from
    // once a new leader is elected.
    wait_for("a new leader", WAIT, || async {
        Ok(cluster.leader().await.ok())
    })
    .await
    .unwrap();
    let errors = metric(&registrar, "legate_registrar_reconcile_errors_total").await;
    for i in 0..5 {
        apps.push(run_app(format!("app{i}.example.com")).await);
        registered(apps.len()).await;
    }
    assert_eq!(
        metric(&registrar, "legate_registrar_reconcile_errors_total").await,
        errors,
        "a call went to the dead member:\n{}",
        registrar.log()
    );
    docker::remove_all(apps).await;
}

/// Regression: when a keep-alive answer did not come within the keep-alive period and the lease
/// turned out to be alive (etcd slow or frozen for less than the TTL, a member lost under the
/// stream), the keeper took that for a shutdown and stopped: the lease expired one TTL later
/// and nothing registered the containers again. Found by `bench faults` (etcd leader killed).
#[tokio::test]
async fn the_lease_is_kept_after_a_keep_alive_answer_comes_late() {
    let f = Fixture::start(&[]).await;
    let (_app, keys) = f.registered_app("late.example.com").await;
    // Frozen for 1.5 s: longer than the keep-alive period (a third of the 3 s TTL), shorter
    // than the TTL. A keep-alive sent early in the freeze gets no answer within the period, and
    // the lease is still alive when etcd answers; where in the period the freeze falls is
    // chance, so four of them.
    for _ in 0..4 {
        f.etcd.freeze().unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        f.etcd.thaw().unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // Three TTLs later the keys are there: kept alive, or at worst registered again.
    for _ in 0..3 {
        a_ttl_later(&f.etcd).await;
    }
    assert_eq!(
        registrations(&f.keys().await),
        keys,
        "{}",
        f.registrar.log()
    );
}

/// #15, item 2: the first sign of a stop unroutes a container at once, while its process still
/// runs (here for the 5 s `docker stop` gives it: busybox httpd as PID 1 ignores SIGTERM), and
/// a signal that does not stop it (SIGHUP, a reload) changes nothing.
#[tokio::test]
async fn a_stop_signal_unroutes_at_once_and_a_reload_signal_does_not() {
    let f = Fixture::start(&[]).await;
    let (app, keys) = f.registered_app("signals.example.com").await;
    docker::docker(&["kill", "--signal", "HUP", app.id()])
        .await
        .unwrap();
    // A resync is a reconcile after the event: the HUP has been seen.
    f.client().await.resync(v1::ResyncRequest {}).await.unwrap();
    assert_eq!(registrations(&f.keys().await), keys, "a SIGHUP unrouted it");

    let id = app.id().to_owned();
    let stop = tokio::spawn(async move { docker::docker(&["stop", "--time", "5", &id]).await });
    f.wait_keys("the key gone at the stop signal", BTreeMap::is_empty)
        .await;
    let state = app.inspect().await.unwrap();
    assert_eq!(
        state["State"]["Running"], true,
        "unrouted only once the process was gone: {}",
        state["State"]
    );
    stop.await.unwrap().unwrap();
}

/// #15, item 2: a paused container gets no new request: unrouted on `pause`, routed again on
/// `unpause`.
#[tokio::test]
async fn a_paused_container_is_unrouted_until_it_is_unpaused() {
    let f = Fixture::start(&[]).await;
    let (app, keys) = f.registered_app("paused.example.com").await;
    app.command("pause").await.unwrap();
    f.wait_keys("the key gone at pause", BTreeMap::is_empty)
        .await;
    app.command("unpause").await.unwrap();
    f.wait_keys("the key back at unpause", |k| *k == keys).await;
}

/// #14: the Docker engine over TCP with TLS, reached as the docker CLI reaches it (a `tcp://`
/// host, `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH` holding `ca.pem`, `cert.pem`, `key.pem`): the
/// registrar registers through it. With a client certificate the engine does not trust, it
/// is not served, and the registrar's log says why.
#[tokio::test]
async fn docker_over_tls_with_the_docker_clis_settings() {
    let pki = Pki::new("docker CA").unwrap();
    let engine = Proxy::start_tls(
        Upstream::Unix("/var/run/docker.sock".into()),
        pki.server_config(&["127.0.0.1"]).unwrap(),
    )
    .await
    .unwrap();
    let host = format!("tcp://{}", engine.addr());
    let cert_dir = |client: &Issued| {
        let dir = tempfile::tempdir().unwrap();
        for (from, to) in [
            (&client.ca, "ca.pem"),
            (&client.cert, "cert.pem"),
            (&client.key, "key.pem"),
        ] {
            std::fs::copy(from, dir.path().join(to)).unwrap();
        }
        dir
    };
    let trusted = cert_dir(&pki.issue(&["registrar"]).unwrap());
    let path = trusted.path().display().to_string();
    let f = Fixture::start(&[
        "--docker-host",
        &host,
        "--docker-tls-verify",
        "--docker-cert-path",
        &path,
    ])
    .await;
    f.registered_app("docker-tls.example.com").await;

    let other_ca = Pki::new("another CA").unwrap();
    let mut stranger = other_ca.issue(&["registrar"]).unwrap();
    stranger.ca = pki.ca_file();
    let untrusted = cert_dir(&stranger);
    let path = untrusted.path().display().to_string();
    let registrar = Service::start(
        "legate-registrar",
        &[
            "--etcd-endpoints",
            &f.etcd.endpoint(),
            "--docker-host",
            &host,
            "--docker-cert-path",
            &path,
        ],
        &[
            ("HOST_IP", "127.0.0.1"),
            ("HOST_ID", "untrusted"),
            ("DOCKER_TLS_VERIFY", "1"),
        ],
    )
    .unwrap();
    wait_for("the registrar to say why Docker fails", WAIT, || async {
        let log = registrar.log();
        Ok(log
            .lines()
            .any(|l| l.contains("connecting to Docker") && l.contains("UnknownCA"))
            .then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", registrar.log()));
}
