//! confgen against a real etcd and a real HAProxy: watch semantics (start mid-stream, etcd
//! restart, compaction behind a cut-off watch), coalescing, 1000 keys, bad keys, templates,
//! the Watch/Report/Status API, `--output`, and golden outputs that `haproxy -c` accepts.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Client, Txn, TxnOp};
use legate_confgen::model::{Registry, Slots};
use legate_confgen::render::{DEFAULT_TEMPLATE, Renderer, Settings, View};
use legate_proto::registry::{Prefix, Schema};
use legate_proto::snapshot;
use legate_proto::v1;
use legate_proto::v1::confgen_client::ConfgenClient;
use legate_tests::backend::Backend;
use legate_tests::confgen::Snapshots;
use legate_tests::etcd::{self, Etcd};
use legate_tests::haproxy::{self, Haproxy};
use legate_tests::proxy::{Proxy, Upstream};
use legate_tests::service::Service;
use legate_tests::{WAIT, free_port, http_get, load, wait_for};
use tonic::transport::Channel;

fn id(n: u32) -> String {
    format!("{:08x}{n:056x}", n.wrapping_mul(2_654_435_761))
}

fn app_key(domain: &str, n: u32, endpoint: &str) -> String {
    format!("/apps/{domain}/{}/{endpoint}", id(n))
}

fn service_key(name: &str, port: u16, n: u32, endpoint: &str) -> String {
    format!("/services/{name}/{port}/{}/{endpoint}", id(n))
}

/// Starts confgen on `etcd` (an endpoint URL) with the HTTP frontend on a free loopback port.
async fn start_confgen(etcd: &str, args: &[&str]) -> Service {
    let mut confgen = Service::confgen(etcd, free_port().unwrap(), args, &[]).unwrap();
    confgen.wait_serving().await.unwrap();
    confgen
}

async fn client(confgen: &Service) -> ConfgenClient<Channel> {
    let channel = confgen.connect().await.unwrap();
    ConfgenClient::new(channel).max_decoding_message_size(64 << 20)
}

async fn status(confgen: &Service) -> v1::ConfgenStatus {
    client(confgen)
        .await
        .status(v1::ConfgenStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn subscribe(confgen: &Service, node: &str) -> Snapshots {
    subscribe_with(confgen, node, false).await
}

async fn subscribe_with(confgen: &Service, node: &str, omit_model: bool) -> Snapshots {
    let channel = confgen.connect().await.unwrap();
    Snapshots::subscribe(channel, node, omit_model)
        .await
        .unwrap()
}

/// Reads snapshots until one satisfies `done`; checks that versions never go back.
async fn until(
    stream: &mut Snapshots,
    what: &str,
    done: impl Fn(&v1::ConfigSnapshot) -> bool,
) -> v1::ConfigSnapshot {
    let mut last_version = 0;
    let wait = async {
        loop {
            let snapshot = stream.message().await.unwrap().expect("stream ended");
            assert!(
                snapshot.version >= last_version,
                "version went back from {last_version} to {}",
                snapshot.version
            );
            last_version = snapshot.version;
            if done(&snapshot) {
                return snapshot;
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for a snapshot with {what}"))
}

fn model(snapshot: &v1::ConfigSnapshot) -> &v1::Model {
    snapshot.model.as_ref().unwrap()
}

fn app_servers(snapshot: &v1::ConfigSnapshot) -> usize {
    model(snapshot).apps.iter().map(|a| a.servers.len()).sum()
}

/// A real HAProxy running `snapshot`'s configuration and maps.
async fn run_haproxy(snapshot: &v1::ConfigSnapshot) -> Haproxy {
    let maps: Vec<(&str, &str)> = snapshot
        .maps
        .iter()
        .map(|m| (m.name.as_str(), m.content.as_str()))
        .collect();
    Haproxy::start_with(&snapshot.haproxy_config, &maps)
        .await
        .unwrap()
}

/// A metric's value summed over its label sets; 0 when absent.
async fn metric(service: &Service, name: &str) -> f64 {
    service.metric(name).await.unwrap()
}

async fn put_all(client: &mut Client, kvs: &[(String, String)]) {
    etcd::put_all(client, kvs).await.unwrap();
}

/// Puts app `a<n>.example.com` with one server.
async fn put_app(kv: &mut Client, n: u32) {
    kv.put(
        app_key(&format!("a{n}.example.com"), n, "10.0.0.1:80"),
        "",
        None,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn routes_http_by_host_and_tcp_by_port_through_a_real_haproxy() {
    let etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    let blog = Backend::start("blog", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let wild = Backend::start("wild", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let db = Backend::start("db", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let service_port = free_port().unwrap();
    put_all(
        &mut kv,
        &[
            (
                app_key("blog.example.com", 1, &blog.addr().to_string()),
                r#"{"host_id":"h1","container_name":"blog"}"#.to_owned(),
            ),
            // A seed-era key: the value is ip:port only.
            (
                app_key("*.apps.example.com", 2, &wild.addr().to_string()),
                wild.addr().to_string(),
            ),
            (
                service_key("db", service_port, 3, &db.addr().to_string()),
                String::new(),
            ),
        ],
    )
    .await;
    let http_port = free_port().unwrap();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let mut confgen = Service::confgen(&etcd.endpoint(), http_port, &[], &[]).unwrap();
    confgen.wait_serving().await.unwrap();
    let mut stream = subscribe(&confgen, "node-a").await;
    let snapshot = until(&mut stream, "3 routes", |s| {
        model(s).apps.len() == 2 && model(s).services.len() == 1
    })
    .await;
    let haproxy = run_haproxy(&snapshot).await;

    let (status, body) = http_get(http, "blog.example.com", "/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "blog\n"));
    let (status, body) = http_get(http, "BLOG.example.com:8080", "/").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "blog\n"),
        "case and port ignored"
    );
    let (status, body) = http_get(http, "x.apps.example.com", "/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "wild\n"));
    let (status, _) = http_get(http, "apps.example.com", "/").await.unwrap();
    assert_eq!(status, 503, "a wildcard does not match its bare suffix");
    let (status, _) = http_get(http, "unknown.example.com", "/").await.unwrap();
    assert_eq!(status, 503);
    let tcp = SocketAddr::from(([127, 0, 0, 1], service_port));
    let (status, body) = http_get(tcp, "anything", "/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "db\n"));
    drop(haproxy);
}

#[tokio::test]
async fn golden_outputs_are_stable_and_haproxy_accepts_them() {
    let value = r#"{"host_id":"host-a","container_name":"web-1"}"#;
    let registries: [(&str, Vec<(String, String)>); 3] = [
        ("empty", Vec::new()),
        (
            "seed",
            vec![
                (
                    app_key("blog.example.com", 1, "10.0.0.1:32768"),
                    "10.0.0.1:32768".to_owned(),
                ),
                (
                    service_key("mysql", 3306, 2, "10.0.0.2:32769"),
                    String::new(),
                ),
            ],
        ),
        (
            "mixed",
            vec![
                (
                    app_key("blog.example.com", 1, "10.0.0.1:32768"),
                    value.to_owned(),
                ),
                (
                    app_key("blog.example.com", 2, "10.0.0.10:32768"),
                    r#"{"weight":0}"#.to_owned(),
                ),
                (
                    app_key("api.example.com", 3, "[2001:db8::5]:8080"),
                    r#"{"check_path":"/healthz","weight":50}"#.to_owned(),
                ),
                (app_key("*.example.com", 4, "10.0.0.2:80"), value.to_owned()),
                (
                    app_key("*.eu.example.com", 5, "10.0.0.3:80"),
                    value.to_owned(),
                ),
                (
                    service_key("mysql", 3306, 6, "10.0.0.1:33060"),
                    value.to_owned(),
                ),
                (
                    service_key("mariadb", 3306, 7, "10.0.0.2:33060"),
                    value.to_owned(),
                ),
                (
                    service_key("redis", 6379, 8, "10.0.0.3:6379"),
                    value.to_owned(),
                ),
                // Skipped: a hostile domain and a service on the HTTP port.
                (
                    format!("/apps/a.com\nbackend evil/{}/10.0.0.1:80", id(9)),
                    String::new(),
                ),
                (service_key("web", 80, 10, "10.0.0.4:80"), String::new()),
                (
                    "/hosts/host-a".to_owned(),
                    r#"{"ip":"10.0.0.1","instance":"i","version":"0.1.0"}"#.to_owned(),
                ),
            ],
        ),
    ];
    let mut renderer = Renderer::new(DEFAULT_TEMPLATE).unwrap();
    let settings = Settings {
        binds: vec!["0.0.0.0".parse().unwrap()],
        http_port: 80,
        generator: "confgen@golden".to_owned(),
        allowed_file_dirs: Vec::new(),
    };
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/confgen");
    let update = std::env::var_os("LEGATE_UPDATE_GOLDEN").is_some();
    for (name, kvs) in registries {
        let mut registry = Registry::new(Schema::new(Prefix::default()));
        let kvs = kvs
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_bytes()));
        registry.reset(kvs, 1);
        let mut model = registry.model(&[80]);
        Slots::default().assign(&mut model);
        let rendered = renderer.render(&View::of_model(&model), &settings).unwrap();
        let mut files = vec![("haproxy.cfg", rendered.config.as_str())];
        files.extend(
            rendered
                .maps
                .iter()
                .map(|m| (m.name.as_str(), m.content.as_str())),
        );
        let dir = golden.join(name);
        for (file, content) in &files {
            let path = dir.join(file);
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, content).unwrap();
            }
            let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (LEGATE_UPDATE_GOLDEN=1 writes it)", path.display())
            });
            assert_eq!(
                content, &expected,
                "{name}/{file} differs from its golden file"
            );
        }
        haproxy::check_with(&rendered.config, &files[1..])
            .unwrap_or_else(|e| panic!("golden registry {name}: {e:#}"));
    }
}

#[tokio::test]
async fn starts_mid_stream_and_converges_on_what_etcd_holds() {
    let etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    let before: Vec<(String, String)> = (0..50)
        .map(|n| {
            (
                app_key(&format!("a{n}.example.com"), n, "10.0.0.1:80"),
                String::new(),
            )
        })
        .collect();
    put_all(&mut kv, &before).await;
    // A writer keeps changing the registry while confgen starts: puts, and deletes of keys
    // written before.
    let writer = {
        let mut kv = kv.clone();
        tokio::spawn(async move {
            for n in 0..300u32 {
                let key = app_key(&format!("b{n}.example.com"), n, "10.0.0.2:80");
                kv.put(key, "", None).await.unwrap();
                if n % 6 == 0 {
                    let old = app_key(&format!("a{}.example.com", n / 6), n / 6, "10.0.0.1:80");
                    kv.delete(old, None).await.unwrap();
                }
            }
        })
    };
    let confgen = start_confgen(&etcd.endpoint(), &[]).await;
    writer.await.unwrap();
    // Every a-key was deleted (n / 6 covers 0..50), every b-key written.
    let expected: BTreeSet<String> = (0..300).map(|n| format!("b{n}.example.com")).collect();
    let mut stream = subscribe(&confgen, "node-a").await;
    let snapshot = until(&mut stream, "the writer's last change", |s| {
        model(s).apps.iter().all(|a| a.domain.starts_with('b')) && model(s).apps.len() == 300
    })
    .await;
    let domains: BTreeSet<String> = model(&snapshot)
        .apps
        .iter()
        .map(|a| a.domain.clone())
        .collect();
    assert_eq!(domains, expected);
    let revision = kv
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(
        snapshot.version, revision as u64,
        "version is the etcd revision"
    );
}

#[tokio::test]
async fn keeps_its_snapshot_through_an_etcd_restart_and_follows_after() {
    let mut etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    kv.put(app_key("a.example.com", 1, "10.0.0.1:80"), "", None)
        .await
        .unwrap();
    let confgen = start_confgen(&etcd.endpoint(), &[]).await;
    let mut stream = subscribe(&confgen, "node-a").await;
    let first = until(&mut stream, "one app", |s| model(s).apps.len() == 1).await;

    etcd.kill();
    // While etcd is down, the last snapshot is still served to a new subscriber.
    let mut during = subscribe(&confgen, "node-b").await;
    let served = until(&mut during, "the current snapshot", |_| true).await;
    assert_eq!(served.checksum, first.checksum);

    etcd.restart().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    kv.put(app_key("b.example.com", 2, "10.0.0.2:80"), "", None)
        .await
        .unwrap();
    let after = until(&mut stream, "the app put after the restart", |s| {
        model(s).apps.len() == 2
    })
    .await;
    assert!(after.version > first.version);
    assert!(metric(&confgen, "legate_confgen_watch_restarts_total").await >= 1.0);
}

#[tokio::test]
async fn lists_again_when_compaction_passed_a_cut_off_watch() {
    let etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    let proxy = Proxy::start(Upstream::Tcp(etcd.addr())).await.unwrap();
    for n in 0..5 {
        put_app(&mut kv, n).await;
    }
    let confgen = start_confgen(&format!("http://{}", proxy.addr()), &[]).await;
    let mut stream = subscribe(&confgen, "node-a").await;
    until(&mut stream, "5 apps", |s| model(s).apps.len() == 5).await;

    // Cut confgen off; change the registry; compact the history it would resume from.
    proxy.cut();
    kv.delete(app_key("a0.example.com", 0, "10.0.0.1:80"), None)
        .await
        .unwrap();
    for n in 5..8 {
        put_app(&mut kv, n).await;
    }
    let revision = kv
        .put("/unrelated", "", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    kv.compact(revision, None).await.unwrap();
    proxy.resume();

    let snapshot = until(&mut stream, "7 apps after the relist", |s| {
        model(s).apps.len() == 7
    })
    .await;
    assert!(
        !model(&snapshot)
            .apps
            .iter()
            .any(|a| a.domain == "a0.example.com")
    );
    wait_for("a compaction restart in the metrics", WAIT, || async {
        let restarts = confgen.metrics_text().await?;
        Ok(restarts
            .lines()
            .any(|l| l.starts_with("legate_confgen_watch_restarts_total{reason=\"compacted\"}"))
            .then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bursts_are_coalesced_and_identical_output_is_not_sent_again() {
    let etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    let confgen = start_confgen(&etcd.endpoint(), &["--wait", "300ms:5s"]).await;
    let mut stream = subscribe(&confgen, "node-a").await;
    until(&mut stream, "the empty registry", |_| true).await;
    let before = metric(&confgen, "legate_confgen_snapshots_total").await;
    assert_eq!(before, 1.0);
    // 100 separate writes, well within 300 ms of each other.
    for n in 0..100 {
        put_app(&mut kv, n).await;
    }
    until(&mut stream, "100 apps", |s| model(s).apps.len() == 100).await;
    let after = metric(&confgen, "legate_confgen_snapshots_total").await;
    assert!(
        after - before <= 3.0,
        "100 writes in one burst made {} snapshots",
        after - before
    );

    // Rewriting a value identically renders, but sends nothing new.
    let unchanged = metric(
        &confgen,
        "legate_confgen_renders_total{result=\"unchanged\"}",
    )
    .await;
    put_app(&mut kv, 1).await;
    wait_for("an unchanged render", WAIT, || async {
        let now = metric(
            &confgen,
            "legate_confgen_renders_total{result=\"unchanged\"}",
        )
        .await;
        Ok((now > unchanged).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(
        metric(&confgen, "legate_confgen_snapshots_total").await,
        after
    );
}

#[tokio::test]
async fn renders_a_thousand_keys_that_haproxy_accepts() {
    let etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    // 100 services, 900 app servers over 300 domains.
    let kvs: Vec<(String, String)> = (0..1000u32)
        .map(|n| {
            let key = if n % 10 == 0 {
                service_key(&format!("svc{n}"), 20000 + n as u16, n, "10.0.1.1:3306")
            } else {
                app_key(
                    &format!("app{}.example.com", (n - n / 10 - 1) / 3),
                    n,
                    &format!("10.0.{}.{}:80", n / 250, n % 250),
                )
            };
            (key, r#"{"host_id":"h"}"#.to_owned())
        })
        .collect();
    put_all(&mut kv, &kvs).await;
    let confgen = start_confgen(&etcd.endpoint(), &[]).await;
    let mut stream = subscribe(&confgen, "node-a").await;
    let snapshot = until(&mut stream, "1000 keys", |s| {
        app_servers(s) == 900 && model(s).services.len() == 100
    })
    .await;
    assert_eq!(model(&snapshot).apps.len(), 300);
    // A supervisor asks for snapshots without the model: the same configuration, no model.
    let mut lean = subscribe_with(&confgen, "node-b", true).await;
    let without = lean.message().await.unwrap().unwrap();
    assert_eq!(without.model, None);
    assert_eq!(
        (&without.checksum, &without.haproxy_config, &without.maps),
        (&snapshot.checksum, &snapshot.haproxy_config, &snapshot.maps)
    );
    let maps: Vec<(&str, &str)> = snapshot
        .maps
        .iter()
        .map(|m| (m.name.as_str(), m.content.as_str()))
        .collect();
    haproxy::check_with(&snapshot.haproxy_config, &maps).unwrap();
}

/// A delta stream (the supervisor's) rebuilds every snapshot that a whole stream gets, each
/// message after the first a delta; a subscriber that does not ask for deltas (a supervisor of
/// an earlier version), or asks for them with the first delta streams' field, gets whole
/// snapshots with the earliest scheme's checksum.
#[tokio::test]
async fn a_delta_stream_rebuilds_what_a_whole_stream_gets() {
    let etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    let confgen = start_confgen(&etcd.endpoint(), &[]).await;
    let mut deltas = subscribe_with(&confgen, "node-a", true).await;
    let mut wholes = Vec::new();
    for (node, earlier_deltas) in [("node-b", false), ("node-c", true)] {
        let stream = client(&confgen)
            .await
            .watch(v1::WatchRequest {
                node_id: node.to_owned(),
                omit_model: true,
                deltas: earlier_deltas,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        wholes.push(stream);
    }
    until(&mut deltas, "the empty registry", |_| true).await;
    for n in 1..=5 {
        let domain = format!("app{n}.example.com");
        kv.put(app_key(&domain, n, &format!("10.0.0.{n}:80")), "", None)
            .await
            .unwrap();
        let rebuilt = until(&mut deltas, &domain, |s| {
            s.maps.iter().any(|m| m.content.contains(&domain))
        })
        .await;
        for whole in &mut wholes {
            let sent = loop {
                let sent = whole.message().await.unwrap().unwrap();
                if sent.version >= rebuilt.version {
                    break sent;
                }
            };
            assert!(sent.delta.is_none());
            assert!(
                sent.checksum.starts_with(snapshot::LEGACY_SCHEME),
                "{}",
                sent.checksum
            );
            assert!(snapshot::verify(
                &sent.checksum,
                &sent.haproxy_config,
                &sent.maps
            ));
            assert_eq!(
                (&sent.version, &sent.haproxy_config, &sent.maps),
                (&rebuilt.version, &rebuilt.haproxy_config, &rebuilt.maps)
            );
        }
        assert!(rebuilt.checksum.starts_with(snapshot::SCHEME));
        assert_eq!(
            rebuilt.checksum,
            snapshot::checksum(&rebuilt.haproxy_config, &rebuilt.maps)
        );
    }
    assert!(deltas.deltas >= 5, "{} deltas", deltas.deltas);
    let status = status(&confgen).await;
    assert_eq!(status.checksum, deltas.last().unwrap().checksum);
}

#[tokio::test]
async fn bad_keys_are_skipped_reported_and_never_rendered() {
    let etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    let confgen = start_confgen(&etcd.endpoint(), &["--prefix", "/legate"]).await;
    let mut stream = subscribe(&confgen, "node-a").await;
    until(&mut stream, "the empty registry", |_| true).await;
    let good = format!("/legate{}", app_key("ok.example.com", 1, "10.0.0.1:80"));
    let hostile: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (
            format!("/legate/apps/a.com\nbackend evil/{}/10.0.0.1:80", id(2)).into_bytes(),
            Vec::new(),
        ),
        (
            format!("/legate/apps/b.com/{}/10.0.0.1:80 # evil", id(3)).into_bytes(),
            Vec::new(),
        ),
        (
            format!("/legate/services/db/99999/{}/10.0.0.1:80", id(4)).into_bytes(),
            Vec::new(),
        ),
        (
            format!("/legate/apps/c.com/{}/10.0.0.1:80", id(5)).into_bytes(),
            b"{\"check_path\":\"/x\\nbackend evil\"}".to_vec(),
        ),
        (
            format!("/legate/apps/d.com/{}/10.0.0.1:80", id(6)).into_bytes(),
            b"\xff\xfe".to_vec(),
        ),
        (b"/legate/hosts/\xffevil".to_vec(), Vec::new()),
    ];
    let mut ops = vec![TxnOp::put(good.as_str(), "", None)];
    ops.extend(
        hostile
            .iter()
            .map(|(k, v)| TxnOp::put(k.clone(), v.clone(), None)),
    );
    kv.txn(Txn::new().and_then(ops)).await.unwrap();
    let snapshot = until(&mut stream, "the good app", |s| model(s).apps.len() == 1).await;
    assert!(!snapshot.haproxy_config.contains("evil"));
    assert!(snapshot.maps.iter().all(|m| !m.content.contains("evil")));
    assert_eq!(model(&snapshot).skipped.len(), hostile.len());

    let status = status(&confgen).await;
    assert_eq!(status.version, snapshot.version);
    let skipped: BTreeSet<Vec<u8>> = status.skipped.iter().map(|s| s.key.clone()).collect();
    let expected: BTreeSet<Vec<u8>> = hostile.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(skipped, expected);
    assert!(status.skipped.iter().all(|s| !s.reason.is_empty()));
    assert_eq!(metric(&confgen, "legate_confgen_skipped_keys").await, 6.0);
    // Each is in the log with its reason, escaped onto one line.
    let log = confgen.log();
    assert_eq!(log.matches("registry key skipped").count(), 6, "{log}");
    assert!(!log.lines().any(|l| l.starts_with("backend evil")), "{log}");
}

/// Regression (#13, item 9): one app that failed a strict render failed the whole render, and
/// every later change waited behind it. That app is left out with its reason; the rest renders
/// and changes keep flowing. A failure that is no app's (the template's own) still keeps the
/// last good snapshot.
#[tokio::test]
async fn an_app_that_fails_the_template_is_left_out_and_the_rest_renders() {
    let etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("custom.cfg.hbs");
    // A custom template; strict mode makes a field that does not exist an error. It refers to
    // one only for apps with a check path (an app's fault), and only when there is a service
    // (the template's own fault: outside any app or service).
    std::fs::write(
        &template,
        "defaults\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\n\
         {{#if service_count}}{{no_such_root_field}}{{/if}}\
         {{#apps}}# app {{domain}} on {{@root.http_port}}{{#if check_path}} {{no_such_field}}{{/if}}\n{{/apps}}",
    )
    .unwrap();
    let output = dir.path().join("out");
    let confgen = start_confgen(
        &etcd.endpoint(),
        &[
            "--template",
            template.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ],
    )
    .await;
    let mut stream = subscribe(&confgen, "node-a").await;
    kv.put(app_key("a.example.com", 1, "10.0.0.1:80"), "", None)
        .await
        .unwrap();
    let good = until(&mut stream, "the custom rendering", |s| {
        s.haproxy_config.contains("# app a.example.com on")
    })
    .await;
    // --output holds the same files.
    assert_eq!(
        std::fs::read_to_string(output.join("haproxy.cfg")).unwrap(),
        good.haproxy_config
    );
    assert_eq!(
        std::fs::read_to_string(output.join("hosts.map")).unwrap(),
        "a.example.com slot_1\n"
    );

    kv.put(
        app_key("b.example.com", 2, "10.0.0.1:81"),
        r#"{"check_path":"/health"}"#,
        None,
    )
    .await
    .unwrap();
    kv.put(app_key("c.example.com", 3, "10.0.0.1:82"), "", None)
        .await
        .unwrap();
    let with_c = until(&mut stream, "the app put after the failing one", |s| {
        s.haproxy_config.contains("# app c.example.com")
    })
    .await;
    assert!(!with_c.haproxy_config.contains("b.example.com"));
    let domains: Vec<&str> = model(&with_c)
        .apps
        .iter()
        .map(|a| a.domain.as_str())
        .collect();
    assert_eq!(domains, ["a.example.com", "c.example.com"]);
    let mut api = client(&confgen).await;
    let status = api
        .status(v1::ConfgenStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.last_render_error, "");
    let skipped: Vec<(String, &str)> = status
        .skipped
        .iter()
        .map(|k| {
            (
                String::from_utf8_lossy(&k.key).into_owned(),
                k.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, "/apps/b.example.com/");
    assert!(skipped[0].1.contains("no_such_field"), "{skipped:?}");
    assert!(metric(&confgen, "legate_confgen_render_failures_total").await >= 1.0);

    // The template's own failure: the last good snapshot stays, with the error in the status.
    kv.put(service_key("db", 5432, 4, "10.0.0.1:5432"), "", None)
        .await
        .unwrap();
    let status = wait_for("the render error in the status", WAIT, || {
        let mut api = api.clone();
        async move {
            let status = api.status(v1::ConfgenStatusRequest {}).await?.into_inner();
            Ok((!status.last_render_error.is_empty()).then_some(status))
        }
    })
    .await
    .unwrap();
    assert!(
        status.last_render_error.contains("no_such_root_field"),
        "{}",
        status.last_render_error
    );
    assert_eq!(
        status.checksum, with_c.checksum,
        "the last good snapshot stays"
    );
    assert!(metric(&confgen, "legate_confgen_renders_total{result=\"error\"}").await >= 1.0);

    kv.delete(service_key("db", 5432, 4, "10.0.0.1:5432"), None)
        .await
        .unwrap();
    kv.put(app_key("d.example.com", 5, "10.0.0.1:83"), "", None)
        .await
        .unwrap();
    until(&mut stream, "a render after the fix", |s| {
        s.haproxy_config.contains("# app d.example.com")
    })
    .await;
    let status = api
        .status(v1::ConfgenStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.last_render_error, "");
}

#[tokio::test]
async fn a_template_that_does_not_compile_stops_confgen_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("broken.hbs");
    std::fs::write(&template, "{{#each apps}}\n").unwrap();
    let mut confgen = Service::start(
        "legate-confgen",
        &["--template", template.to_str().unwrap()],
        &[],
    )
    .unwrap();
    let status = confgen.wait_exit(WAIT).await.unwrap();
    assert!(!status.success());
    let log = confgen.log();
    assert!(
        log.contains("broken.hbs") && log.contains("template"),
        "{log}"
    );
}

#[tokio::test]
async fn nodes_report_outcomes_that_the_status_shows() {
    let etcd = Etcd::start().await.unwrap();
    let confgen = start_confgen(&etcd.endpoint(), &[]).await;
    let mut stream = subscribe(&confgen, "node-a").await;
    let snapshot = until(&mut stream, "the first snapshot", |_| true).await;
    let mut api = client(&confgen).await;
    let report = |node: &str, outcome: v1::ApplyOutcome, message: &str| v1::ApplyReport {
        node_id: node.to_owned(),
        result: Some(v1::ApplyResult {
            outcome: outcome as i32,
            message: message.to_owned(),
            duration_us: 1200,
            version: snapshot.version,
            checksum: snapshot.checksum.clone(),
        }),
    };
    api.report(report("node-a", v1::ApplyOutcome::Reloaded, "reloaded"))
        .await
        .unwrap();
    api.report(report(
        "node-b",
        v1::ApplyOutcome::Rejected,
        "[ALERT] parsing error",
    ))
    .await
    .unwrap();
    let bad = api
        .report(report("no\nde", v1::ApplyOutcome::Reloaded, ""))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let status = api
        .status(v1::ConfgenStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.nodes.len(), 2);
    let a = &status.nodes[0];
    assert_eq!(a.node_id, "node-a");
    assert!(a.connected);
    assert_eq!(a.running_checksum, snapshot.checksum);
    assert_eq!(a.running_version, snapshot.version);
    let b = &status.nodes[1];
    assert!(!b.connected);
    assert_eq!(b.running_checksum, "", "a rejected config is not running");
    let last = b.last_result.as_ref().unwrap();
    assert_eq!(last.outcome, v1::ApplyOutcome::Rejected as i32);
    assert_eq!(last.message, "[ALERT] parsing error");

    drop(stream);
    wait_for("node-a to show disconnected", WAIT, || {
        let mut api = api.clone();
        async move {
            let status = api.status(v1::ConfgenStatusRequest {}).await?.into_inner();
            Ok((!status.nodes[0].connected).then_some(()))
        }
    })
    .await
    .unwrap();
}

/// Regression (#13, item 3): confgen pinged etcd every 2 s, below etcd's default
/// `--grpc-keepalive-min-time` of 5 s, so etcd closed the idle watch's connection every ~8 s and
/// changes waited out the backoff. An idle confgen keeps its one watch, and follows at once.
#[tokio::test]
async fn an_idle_watch_is_never_closed_by_etcds_keepalive_policy() {
    let etcd = Etcd::start().await.unwrap();
    let confgen = start_confgen(&etcd.endpoint(), &[]).await;
    let mut stream = subscribe(&confgen, "node-a").await;
    until(&mut stream, "the first snapshot", |_| true).await;
    // Idle for three of the old loss periods: nothing to wait for but time itself.
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(
        metric(&confgen, "legate_confgen_watch_restarts_total").await,
        0.0,
        "{}",
        confgen.log()
    );
    let mut kv = etcd.client().await.unwrap();
    put_app(&mut kv, 1).await;
    until(&mut stream, "the app put after the idle spell", |s| {
        model(s).apps.len() == 1
    })
    .await;
}

/// Regression (#13, item 4): confgen against a 3-member etcd, the leader killed: once confgen
/// has seen the member go, the watch stays on the members that answer (no restart) and every
/// change is followed.
#[tokio::test]
async fn follows_changes_with_the_etcd_leader_down() {
    let mut cluster = etcd::Cluster::start(3).await.unwrap();
    let confgen = start_confgen(&cluster.endpoints(), &[]).await;
    let mut stream = subscribe(&confgen, "node-a").await;
    let leader = cluster.leader().await.unwrap();
    let mut kv = cluster.members[(leader + 1) % 3].client().await.unwrap();
    put_app(&mut kv, 1).await;
    until(&mut stream, "the first app", |s| model(s).apps.len() == 1).await;

    cluster.members[leader].kill();
    wait_for("confgen to see the member gone", WAIT, || async {
        Ok((metric(&confgen, "legate_etcd_members_answering").await == 2.0).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", confgen.log()));
    // The test's own writes wait for the election; then the watch, which may have been on
    // the killed member, settles on a live one.
    wait_for("a new leader", WAIT, || async {
        Ok(cluster.leader().await.ok())
    })
    .await
    .unwrap();
    put_app(&mut kv, 2).await;
    until(&mut stream, "the app put after the kill", |s| {
        model(s).apps.len() == 2
    })
    .await;
    let restarts = metric(&confgen, "legate_confgen_watch_restarts_total").await;
    for n in 3..8 {
        put_app(&mut kv, n).await;
        until(&mut stream, "each later app", |s| {
            model(s).apps.len() == n as usize
        })
        .await;
    }
    assert_eq!(
        metric(&confgen, "legate_confgen_watch_restarts_total").await,
        restarts,
        "{}",
        confgen.log()
    );
}

/// Regression (#13, item 6): a backend whose process is frozen (the kernel still accepts its
/// connections) stayed UP under the TCP check and, with round robin, took its share of the
/// requests, each waiting for `timeout server`: with keep-alive clients, every connection ended
/// up stuck on it. With the built-in template a hung server among two costs under 1 % of the
/// requests (the ones it holds when it hangs, until `timeout server`).
#[tokio::test]
async fn a_hung_server_among_two_costs_under_one_percent_of_requests() {
    let etcd = Etcd::start().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    let good = Backend::start("good", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hung_addr = legate_tests::free_addr().unwrap();
    let mut command =
        std::process::Command::new(legate_tests::service::binary("legate-backend").unwrap());
    command.args(["--listen", &hung_addr.to_string(), "--name", "hung"]);
    let hung = legate_tests::process::ChildGuard::spawn(
        "legate-backend",
        &command,
        &dir.path().join("backend.log"),
    )
    .unwrap();
    wait_for("the second backend to answer", WAIT, || async {
        Ok(http_get(hung_addr, "x", "/").await.ok())
    })
    .await
    .unwrap();
    put_all(
        &mut kv,
        &[
            (
                app_key("hung.example.com", 1, &good.addr().to_string()),
                String::new(),
            ),
            (
                app_key("hung.example.com", 2, &hung_addr.to_string()),
                String::new(),
            ),
        ],
    )
    .await;
    let http_port = free_port().unwrap();
    let mut confgen = Service::confgen(&etcd.endpoint(), http_port, &[], &[]).unwrap();
    confgen.wait_serving().await.unwrap();
    let mut stream = subscribe(&confgen, "node-a").await;
    let snapshot = until(&mut stream, "two servers", |s| app_servers(s) == 2).await;
    let _haproxy = run_haproxy(&snapshot).await;
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    wait_for("both servers to answer", WAIT, || async {
        let (_, body) = http_get(http, "hung.example.com", "/").await?;
        Ok((body.trim() == "hung").then_some(()))
    })
    .await
    .unwrap();

    hung.signal(nix::sys::signal::Signal::SIGSTOP).unwrap();
    let report = load::wrk(http, "hung.example.com", Duration::from_secs(10), 16, false)
        .await
        .unwrap();
    hung.signal(nix::sys::signal::Signal::SIGCONT).unwrap();
    let failed = report.socket_errors + report.non_2xx;
    println!(
        "hung server: {failed} failed of {} requests\n{}",
        report.requests, report.output
    );
    assert!(
        report.requests > 1000 && failed * 100 < report.requests,
        "{failed} of {} requests failed:\n{}",
        report.requests,
        report.output
    );
}

/// #20: `Confgen.Status.nodes` is bounded: disconnected nodes that do not report leave after
/// `--node-expiry`, and beyond `--max-nodes` the disconnected ones seen longest ago go first;
/// a connected node always stays. (It grew by one entry per node id ever seen, for good.)
#[tokio::test]
async fn nodes_that_left_are_forgotten_and_their_number_is_capped() {
    let etcd = Etcd::start().await.unwrap();
    let confgen = start_confgen(
        &etcd.endpoint(),
        &["--node-expiry", "2s", "--max-nodes", "3"],
    )
    .await;
    let mut staying = subscribe(&confgen, "staying").await;
    until(&mut staying, "the first snapshot", |_| true).await;
    for n in 0..6 {
        let mut stream = subscribe(&confgen, &format!("passing-{n}")).await;
        until(&mut stream, "the first snapshot", |_| true).await;
    }
    let mut api = client(&confgen).await;
    let nodes = |status: v1::ConfgenStatus| -> Vec<String> {
        status.nodes.into_iter().map(|n| n.node_id).collect()
    };
    let now = nodes(
        api.status(v1::ConfgenStatusRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(
        now.len() <= 3 && now.contains(&"staying".to_owned()),
        "{now:?}"
    );
    let left = wait_for("the passing nodes to expire", WAIT, || {
        let mut api = api.clone();
        async move {
            let now = nodes(api.status(v1::ConfgenStatusRequest {}).await?.into_inner());
            Ok((now.len() == 1).then_some(now))
        }
    })
    .await
    .unwrap();
    assert_eq!(left, ["staying"]);
    assert_eq!(metric(&confgen, "legate_confgen_nodes_known").await, 1.0);
    assert_eq!(
        metric(&confgen, "legate_confgen_nodes_connected").await,
        1.0
    );
    drop(staying);
}
