//! What operators see: per-route traffic metrics and `Supervisor.Routes` from a real HAProxy,
//! and the `legate` command against a running ambassador with real containers.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests themselves

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Output;

use legate_proto::v1;
use legate_tests::ambassador::{Ambassador, Host};
use legate_tests::backend::Backend;
use legate_tests::docker::{self, Container, images};
use legate_tests::{WAIT, free_port, wait_for};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn container_id(n: u32) -> String {
    format!("{n:064x}")
}

/// The value of the series `name{labels}` in Prometheus text, if present.
fn series(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the supervisor's metrics satisfy `check` (its poll runs every 200 ms here), as
/// read by a poll that began after every request sent so far had been answered.
async fn wait_metrics(ambassador: &Ambassador, what: &str, check: impl Fn(&str) -> bool) -> String {
    let sent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    wait_for("a poll after the last request", WAIT, || async {
        Ok((live(ambassador).await.polled_at_unix_ms > sent).then_some(()))
    })
    .await
    .unwrap();
    wait_for(what, WAIT, || async {
        let text = ambassador.supervisor.metrics_text().await?;
        Ok(check(&text).then_some(text))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(&[])))
}

async fn requests(ambassador: &Ambassador, domain: &str, count: usize) {
    for _ in 0..count {
        let (status, body) = ambassador.get(domain, "/").await.unwrap();
        assert_eq!(
            (status, body.trim()),
            (200, domain),
            "a request for {domain}"
        );
    }
}

fn supervisor(
    ambassador: &Ambassador,
) -> v1::supervisor_client::SupervisorClient<tonic::transport::Channel> {
    v1::supervisor_client::SupervisorClient::new(ambassador.supervisor.channel().unwrap())
}

async fn live(ambassador: &Ambassador) -> v1::RoutesResponse {
    let routes = supervisor(ambassador).routes(v1::RoutesRequest {}).await;
    routes.unwrap().into_inner()
}

async fn reloads(ambassador: &Ambassador) -> u64 {
    let status = supervisor(ambassador)
        .status(v1::SupervisorStatusRequest::default())
        .await;
    status.unwrap().into_inner().reloads
}

/// Waits until `domain` answers through the ambassador; returns how many requests that took.
async fn wait_routed(ambassador: &Ambassador, domain: &str) -> u64 {
    let sent = std::sync::atomic::AtomicU64::new(0);
    wait_for(&format!("{domain} routed"), WAIT, || async {
        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (status, body) = ambassador.get(domain, "/").await?;
        Ok((status == 200 && body.trim() == domain).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(&[])));
    sent.into_inner()
}

/// HAProxy counts per backend, and a pooled backend serves one domain after another: the
/// series carry the domain, count every request exactly once, never give one domain's
/// requests to the next owner of its slot, and stay monotonic across a reload.
#[tokio::test]
async fn traffic_is_counted_per_domain_across_slot_changes_and_reloads() {
    let flags = [
        "--stats-interval",
        "200ms",
        "--haproxy-log",
        "stdout format raw local0 info",
    ];
    let ambassador = Ambassador::start_with(LOCALHOST, &flags).await.unwrap();
    let mut kv = ambassador.etcd.client().await.unwrap();
    let any = SocketAddr::new(LOCALHOST, 0);
    let (a, b, c) = (
        Backend::start("a.test", any).await.unwrap(),
        Backend::start("b.test", any).await.unwrap(),
        Backend::start("c.test", any).await.unwrap(),
    );
    let key = |domain: &str, n: u32, backend: &Backend| {
        format!("/apps/{domain}/{}/{}", container_id(n), backend.addr())
    };
    kv.put(key("a.test", 1, &a), "", None).await.unwrap();
    // b.test asks for an active check; the others do not: HAProxy does not probe them.
    kv.put(key("b.test", 2, &b), r#"{"check":"tcp"}"#, None)
        .await
        .unwrap();
    wait_routed(&ambassador, "a.test").await;
    wait_routed(&ambassador, "b.test").await;
    let requests_of = |domain: &str| {
        let labels = format!("domain=\"{domain}\"");
        move |text: &str| series(text, "legate_route_requests_total", &labels)
    };
    let text = wait_metrics(&ambassador, "a series per domain", |t| {
        requests_of("a.test")(t).is_some() && requests_of("b.test")(t).is_some()
    })
    .await;
    let (a0, b0) = (
        requests_of("a.test")(&text).unwrap(),
        requests_of("b.test")(&text).unwrap(),
    );

    // Exactly what was sent, under each domain (no series names a slot).
    requests(&ambassador, "a.test", 30).await;
    requests(&ambassador, "b.test", 20).await;
    let text = wait_metrics(&ambassador, "30 more for a.test, 20 for b.test", |t| {
        requests_of("a.test")(t) == Some(a0 + 30.0) && requests_of("b.test")(t) == Some(b0 + 20.0)
    })
    .await;
    assert!(!text.contains("slot_"), "{text}");
    assert_eq!(
        series(
            &text,
            "legate_route_responses_total",
            "domain=\"a.test\",code=\"2xx\""
        ),
        Some(a0 + 30.0),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "legate_route_servers",
            "domain=\"a.test\",state=\"up\""
        ),
        Some(1.0),
        "{text}"
    );
    let b_total = b0 + 20.0;

    // a.test goes; c.test takes its slot (the lowest free one): c.test's series starts from
    // what c.test was sent, not from what the slot counted for a.test.
    let slot_of = |routes: &v1::RoutesResponse, domain: &str| {
        routes
            .routes
            .iter()
            .find(|r| r.domains.iter().any(|d| d == domain))
            .map(|r| r.backend.clone())
    };
    let a_slot = slot_of(&live(&ambassador).await, "a.test").unwrap();
    kv.delete(key("a.test", 1, &a), None).await.unwrap();
    kv.put(key("c.test", 3, &c), "", None).await.unwrap();
    let warm = wait_routed(&ambassador, "c.test").await;
    let text = wait_metrics(&ambassador, "a.test gone, c.test counted", |t| {
        requests_of("a.test")(t).is_none() && requests_of("c.test")(t).is_some()
    })
    .await;
    let routes = live(&ambassador).await;
    assert_eq!(
        slot_of(&routes, "c.test"),
        Some(a_slot.clone()),
        "{routes:#?}"
    );
    let c0 = requests_of("c.test")(&text).unwrap();
    assert!(
        c0 <= warm as f64,
        "c.test inherited a.test's count: {c0} after {warm} requests of its own\n{text}"
    );
    requests(&ambassador, "c.test", 10).await;
    wait_metrics(&ambassador, "10 more for c.test", |t| {
        requests_of("c.test")(t) == Some(c0 + 10.0)
    })
    .await;

    // A reload (a new service port) starts a new worker whose counters start at 0: the
    // series go on from where they were.
    let before = reloads(&ambassador).await;
    let port = free_port().unwrap();
    let service = format!("/services/db/{port}/{}/{}", container_id(4), b.addr());
    kv.put(service, "", None).await.unwrap();
    wait_for("a reload", WAIT, || async {
        Ok((reloads(&ambassador).await > before).then_some(()))
    })
    .await
    .unwrap();
    requests(&ambassador, "b.test", 5).await;
    let text = wait_metrics(&ambassador, "b.test counted on after the reload", |t| {
        requests_of("b.test")(t) == Some(b_total + 5.0)
            && series(
                t,
                "legate_route_requests_total",
                &format!("service_port=\"{port}\""),
            )
            .is_some()
    })
    .await;
    assert!(
        text.contains("# TYPE legate_route_requests_total counter"),
        "{text}"
    );

    // Supervisor.Routes: the same figures, with the servers' live states.
    let routes = live(&ambassador).await;
    let route = routes
        .routes
        .iter()
        .find(|r| r.domains == ["b.test"])
        .unwrap_or_else(|| panic!("{routes:#?}"));
    assert_eq!(route.requests_total as f64, b_total + 5.0, "{route:#?}");
    assert_eq!(route.servers.len(), 1, "{route:#?}");
    assert_eq!(route.servers[0].address, b.addr().to_string(), "{route:#?}");
    assert!(route.servers[0].state.starts_with("UP"), "{route:#?}");
    let unchecked = routes
        .routes
        .iter()
        .find(|r| r.domains == ["c.test"])
        .unwrap_or_else(|| panic!("{routes:#?}"));
    assert_eq!(unchecked.servers[0].state, "no check", "{unchecked:#?}");
    assert!(
        routes.error.is_empty() && routes.polled_at_unix_ms > 0,
        "{routes:#?}"
    );

    // The traffic log names the domain (HAProxy's captured request field).
    let log = ambassador.supervisor.log();
    assert!(log.contains("{c.test}"), "no log line names c.test:\n{log}");
}

/// Runs `legate` with `args` only.
async fn legate_alone(args: &[&str]) -> Output {
    let binary = legate_tests::service::binary("legate").unwrap();
    tokio::process::Command::new(binary)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap()
}

/// Runs `legate` with the ambassador's sources and `args`.
async fn legate(ambassador: &Ambassador, host: &Host, args: &[&str]) -> Output {
    let (etcd, registrar, confgen, supervisor) = (
        ambassador.etcd.endpoint(),
        host.registrar.grpc(),
        ambassador.confgen.grpc(),
        ambassador.supervisor.grpc(),
    );
    let mut all = vec![
        "--etcd-endpoints",
        &etcd,
        "--registrar",
        &registrar,
        "--confgen",
        &confgen,
        "--supervisor",
        &supervisor,
    ];
    all.extend_from_slice(args);
    legate_alone(&all).await
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// An ambassador whose supervisor polls HAProxy every 200 ms, one host's registrar, and a
/// name unique to this test.
async fn ambassador_with_host() -> (Ambassador, Host, String) {
    let ambassador = Ambassador::start_with(LOCALHOST, &["--stats-interval", "200ms"])
        .await
        .unwrap();
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await.unwrap();
    let case = format!("{}-{}", docker::run_id(), free_port().unwrap());
    (ambassador, host, case)
}

/// `legate routes`, `hosts`, `refused`, `status` and `explain` against a running ambassador
/// with a routed container, a refused one, a skipped key, and sources that are down.
#[tokio::test]
async fn the_legate_command_shows_the_fleet_and_explains_a_container() {
    let (ambassador, host, case) = ambassador_with_host().await;
    let images = images().unwrap();
    let (good_name, bad_name) = (format!("cli-good-{case}"), format!("cli-bad-{case}"));
    let good: Container = host
        .run(
            &[80],
            &[
                "--name",
                &good_name,
                "-e",
                "DOMAIN_NAME=cli.test",
                "-e",
                "HEALTH_CHECK=tcp",
                &images.http_app,
            ],
        )
        .await
        .unwrap();
    let bad: Container = host
        .run(
            &[80],
            &[
                "--name",
                &bad_name,
                "-e",
                "DOMAIN_NAME=bad name.test",
                &images.http_app,
            ],
        )
        .await
        .unwrap();
    let mut kv = ambassador.etcd.client().await.unwrap();
    kv.put(
        format!("/apps/x y.test/{}/10.0.0.1:80", container_id(9)),
        "",
        None,
    )
    .await
    .unwrap();
    wait_routed_any(&ambassador, "cli.test").await;

    // routes: the container's server, with its live state in this host's HAProxy.
    let routes = wait_for("cli.test UP in legate routes", WAIT, || async {
        let output = legate(&ambassador, &host, &["routes", "-o", "json"]).await;
        let routes = json(&output);
        let up = routes.as_array().unwrap().iter().any(|r| {
            r["domain"] == "cli.test"
                && r["servers"][0]["state"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("UP"))
        });
        Ok((output.status.success() && up).then_some(routes))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(&[&host])));
    let route = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == "cli.test")
        .unwrap();
    assert_eq!(
        route["servers"][0]["container_name"],
        good_name.as_str(),
        "{route}"
    );
    assert_eq!(route["servers"][0]["container_id"], good.id(), "{route}");
    assert_eq!(route["servers"][0]["host_id"], host.id(), "{route}");
    assert!(
        route["backend"].as_str().unwrap().starts_with("slot_"),
        "{route}"
    );
    let table = text(&legate(&ambassador, &host, &["routes", "cli"]).await);
    let row = table
        .lines()
        .find(|l| l.starts_with("cli.test"))
        .unwrap_or_else(|| panic!("{table}"));
    for word in [good_name.as_str(), host.id(), "UP"] {
        assert!(row.contains(word), "{word} missing from {row:?}\n{table}");
    }
    assert!(table.starts_with("ROUTE"), "{table}");
    assert!(
        !table.contains("x y.test"),
        "the filter keeps only cli: {table}"
    );

    // hosts: the registrar, its lease, one registration and one refusal.
    let hosts = json(&legate(&ambassador, &host, &["hosts", "-o", "json"]).await);
    let me = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host_id"] == host.id())
        .unwrap_or_else(|| panic!("{hosts}"));
    assert_eq!(
        (me["registrations"].as_u64(), me["refused"].as_u64()),
        (Some(1), Some(1)),
        "{me}"
    );
    assert_eq!(me["ip"], "127.0.0.1", "{me}");
    let ttl = me["lease_ttl_left_s"].as_i64().unwrap();
    assert!((1..=10).contains(&ttl), "{me}");

    // refused: the registrar's refusal and confgen's skipped key, with their reasons.
    let output = legate(&ambassador, &host, &["refused", "-o", "json"]).await;
    assert!(output.status.success(), "{}", text(&output));
    let refused = json(&output);
    let refused = refused.as_array().unwrap();
    let registrar = format!("registrar@{}", host.id());
    assert!(
        refused.iter().any(|r| r["source"] == registrar.as_str()
            && r["subject"] == bad_name.as_str()
            && r["reason"].as_str().unwrap().contains("character ' '")),
        "{refused:#?}"
    );
    assert!(
        refused.iter().any(
            |r| r["source"] == "confgen" && r["subject"].as_str().unwrap().contains("x y.test")
        ),
        "{refused:#?}"
    );

    // status: confgen's version, and this supervisor current on it.
    let output = legate(&ambassador, &host, &["status", "-o", "json"]).await;
    assert!(output.status.success(), "{}", text(&output));
    let status = json(&output);
    let version = status["confgen"]["version"].as_u64().unwrap();
    assert!(version > 0, "{status}");
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{status}");
    assert_eq!(nodes[0]["state"], "current", "{status}");
    assert_eq!(
        status["supervisor"]["running_checksum"],
        status["confgen"]["checksum"]
    );
    let table = text(&legate(&ambassador, &host, &["status"]).await);
    assert!(
        table.contains("current") && table.contains("supervisor (this host)"),
        "{table}"
    );

    // explain: the routed container step by step, the refused one, a domain, nothing.
    let output = legate(&ambassador, &host, &["explain", &good_name, "-o", "json"]).await;
    let explained = json(&output);
    assert!(output.status.success(), "{explained:#}\n{}", text(&output));
    assert_eq!(explained["routed"], true, "{explained:#}");
    let steps: Vec<&str> = explained["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "docker",
            "conventions",
            "registrar",
            "etcd cli.test",
            "confgen",
            "supervisor",
            "haproxy"
        ],
        "{explained:#}"
    );
    let output = legate(&ambassador, &host, &["explain", &bad_name]).await;
    let said = text(&output);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("FAIL conventions") && said.contains("character ' '"),
        "{said}"
    );
    let output = legate(&ambassador, &host, &["explain", "cli.test"]).await;
    assert!(output.status.success(), "{}", text(&output));
    let output = legate(&ambassador, &host, &["explain", "nothing-like-it.test"]).await;
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("no container, domain or service port"),
        "{}",
        text(&output)
    );

    // A source that is down: named, with what to do; the exit status says it.
    let supervisor = ambassador.supervisor.grpc();
    let output = legate_alone(&[
        "--confgen",
        "unix:/nonexistent/confgen.sock",
        "--supervisor",
        &supervisor,
        "status",
    ])
    .await;
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("confgen at unix:/nonexistent/confgen.sock")
            && said.contains("is legate-confgen running"),
        "{said}"
    );
    assert!(
        said.contains("supervisor (this host)"),
        "the supervisor's part is still shown: {said}"
    );
    let output = legate_alone(&["--etcd-endpoints", "127.0.0.1:1", "routes"]).await;
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("etcd at") && said.contains("127.0.0.1:1 does not answer"),
        "{said}"
    );

    // Completions for the shells.
    let output = legate(&ambassador, &host, &["completions", "bash"]).await;
    assert!(
        output.status.success() && text(&output).contains("explain"),
        "{}",
        text(&output)
    );
    drop((good, bad));
}

/// Waits until `domain` answers 200 through the ambassador (whatever the body).
async fn wait_routed_any(ambassador: &Ambassador, domain: &str) {
    wait_for(&format!("{domain} routed"), WAIT, || async {
        let (status, _) = ambassador.get(domain, "/").await?;
        Ok((status == 200).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(&[])));
}

/// The status page, loaded by a real browser (headless Chromium) from a running ambassador:
/// the route with its server's live state, this node current, the host, and what was refused.
#[tokio::test]
async fn the_status_page_shows_the_fleet_in_a_browser() {
    let (ambassador, host, case) = ambassador_with_host().await;
    let images = images().unwrap();
    let bad_name = format!("page-bad-{case}");
    let _good = host
        .run(
            &[80],
            &[
                "-e",
                "DOMAIN_NAME=page.test",
                "--label",
                "legate.check=tcp",
                &images.http_app,
            ],
        )
        .await
        .unwrap();
    let _bad = host
        .run(
            &[80],
            &[
                "--name",
                &bad_name,
                "-e",
                "DOMAIN_NAME=<b>bad</b>.test",
                &images.http_app,
            ],
        )
        .await
        .unwrap();
    wait_routed_any(&ambassador, "page.test").await;
    let metrics = ambassador.supervisor.metrics();
    let page = wait_for(
        "the page to show page.test UP and the refusal",
        WAIT,
        || async {
            let (status, body) = legate_tests::http_get(metrics, "localhost", "/").await?;
            let row = body
                .split("<tr data-route=\"page.test\">")
                .nth(1)
                .and_then(|rest| rest.split("</tr>").next())
                .unwrap_or_default()
                .to_owned();
            Ok((status == 200 && row.contains(" UP ") && body.contains(&bad_name)).then_some(body))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(&[&host])));
    assert!(page.contains("<meta http-equiv=\"refresh\""), "{page}");
    let (status, _) = legate_tests::http_get(metrics, "localhost", "/nothing")
        .await
        .unwrap();
    assert_eq!(status, 404);

    // The browser's DOM: what an operator sees.
    let url = format!("http://{metrics}/");
    let browser = |args: Vec<String>| async move {
        tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .args(args)
            .output()
            .await
            .expect("chromium (Debian's `chromium` package) runs the status page test")
    };
    let output = browser(vec!["--dump-dom".to_owned(), url.clone()]).await;
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let section = |id: &str| {
        dom.split(&format!("<section id=\"{id}\">"))
            .nth(1)
            .and_then(|rest| rest.split("</section>").next())
            .unwrap_or_else(|| panic!("no section {id} in the DOM:\n{dom}"))
            .to_owned()
    };
    let routes = section("routes");
    assert!(
        routes.contains("page.test") && routes.contains("UP"),
        "{routes}"
    );
    assert!(
        routes.contains("slot_"),
        "the backend is shown beside the domain: {routes}"
    );
    let nodes = section("nodes");
    assert!(
        nodes.contains("node-a") && nodes.contains("current"),
        "{nodes}"
    );
    let hosts = section("hosts");
    assert!(
        hosts.contains(host.id()) && hosts.contains("127.0.0.1"),
        "{hosts}"
    );
    let refused = section("refused");
    assert!(refused.contains(&bad_name), "{refused}");
    // The hostile domain is text in the browser, never markup.
    assert!(refused.contains("&lt;b&gt;bad&lt;/b&gt;.test"), "{refused}");
    assert!(!dom.contains("<b>bad"), "{dom}");
    assert!(!dom.contains("<script"), "no script on the page: {dom}");

    // A screenshot among the test's artifacts.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let output = browser(vec![
        format!("--screenshot={}", shot.display()),
        "--window-size=1280,800".to_owned(),
        url,
    ])
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
