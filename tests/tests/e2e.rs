//! The seed's promises end to end: registrars, confgen and a supervisor with HAProxy as
//! processes, a real etcd, and real containers on this Docker engine. Every registrar only
//! sees the containers of its own "host" (a label filter), so the tests run side by side.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests themselves

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use legate_tests::ambassador::{Ambassador, Host};
use legate_tests::docker::{Container, Network, docker, get_from_container, images};
use legate_tests::{WAIT, free_port, tcp_banner, wait_for};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Runs an HTTP app for `domain` answering `response`, published on the host's address.
async fn run_app(host: &Host, domain: &str, response: &str, extra: &[&str]) -> Container {
    let (domain, response) = (
        format!("DOMAIN_NAME={domain}"),
        format!("RESPONSE={response}"),
    );
    let mut args = vec!["-e", &domain, "-e", &response];
    args.extend_from_slice(extra);
    args.push(&images().unwrap().http_app);
    host.run(&[80], &args).await.unwrap()
}

/// Waits until `domain` answers `body` through the ambassador.
async fn wait_answer(
    ambassador: &Ambassador,
    hosts: &[&Host],
    domain: &str,
    path: &str,
    body: &str,
) {
    let what = format!("{domain}{path} to answer {body:?} through the ambassador");
    wait_for(&what, WAIT, || async {
        let (status, text) = ambassador.get(domain, path).await?;
        Ok((status == 200 && text.trim() == body).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(hosts)));
}

/// The seed's sample: a TCP service with SERVICE_PORT (the MySQL role) and an app with
/// DOMAIN_NAME (the WordPress role) that reaches the service through the ambassador by the
/// service port, as the seed's `--link dynamic-ambassador:mysql` did; the app answers through
/// the ambassador by Host header, from the host and from another container.
#[tokio::test]
async fn the_seed_sample_app_and_service_reach_each_other_through_the_ambassador() {
    // Containers reach the ambassador on the host's address on their network.
    let network = Network::create("seed").await.unwrap();
    let gateway = network.gateway().await.unwrap();
    let ambassador = Ambassador::start(gateway).await.unwrap();
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await.unwrap();
    let images = images().unwrap();

    let service_port = free_port().unwrap();
    let (service_env, port_env) = (
        format!("SERVICE_PORT={service_port}"),
        format!("PORT={service_port}"),
    );
    let _mysql = host
        .run(
            &[service_port],
            &[
                "-e",
                &service_env,
                "-e",
                &port_env,
                "-e",
                "RESPONSE=mysql-role",
                &images.tcp_service,
            ],
        )
        .await
        .unwrap();
    let mysql_host = format!("mysql:{gateway}");
    let upstream = format!("UPSTREAM=mysql:{service_port}");
    let _wordpress = run_app(
        &host,
        "blog.test",
        "wordpress-role",
        &[
            "--network",
            network.name(),
            "--add-host",
            &mysql_host,
            "-e",
            &upstream,
        ],
    )
    .await;

    // From the host: the service by its port, the app by its name.
    let service = ambassador.service(service_port);
    wait_for("the service through the ambassador", WAIT, || async {
        Ok(Some(tcp_banner(service).await?).filter(|b| b == "mysql-role"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(&[&host])));
    wait_answer(&ambassador, &[&host], "blog.test", "/", "wordpress-role").await;
    // The app reaches the service through the ambassador, by the service port.
    let (status, body) = ambassador
        .get("blog.test", "/cgi-bin/upstream")
        .await
        .unwrap();
    assert_eq!((status, body.trim()), (200, "mysql-role"));

    // From another container on the network.
    let url = format!("http://{}/", ambassador.http());
    let answer = get_from_container(&network, &url, "blog.test")
        .await
        .unwrap();
    assert_eq!(answer, "wordpress-role");
}

/// Sends `count` requests for `domain` and counts the answers by body (`status body`).
async fn answers(ambassador: &Ambassador, domain: &str, count: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        let answer = match ambassador.get(domain, "/").await {
            Ok((status, body)) => format!("{status} {}", body.trim()),
            Err(e) => format!("error {e:#}"),
        };
        *seen.entry(answer).or_default() += 1;
    }
    seen
}

/// Scale out: three replicas of one app share the requests; when one is stopped, no request
/// fails once it is gone.
#[tokio::test]
async fn replicas_share_the_requests_and_none_fails_once_one_is_stopped() {
    let ambassador = Ambassador::start(LOCALHOST).await.unwrap();
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await.unwrap();
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(run_app(&host, "scale.test", &format!("replica-{i}"), &[]).await);
    }
    wait_for("the three replicas to answer", WAIT, || async {
        let seen = answers(&ambassador, "scale.test", 30).await;
        Ok((seen.len() == 3 && seen.keys().all(|k| k.starts_with("200 replica-"))).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(&[&host])));
    // Round robin: each replica takes its share, in a sample taken once all three are routed
    // (the one that saw the third arrive may have begun before it).
    let all = answers(&ambassador, "scale.test", 30).await;
    assert!(all.values().all(|&n| n >= 5), "uneven spread: {all:?}");

    docker(&["stop", "--time", "1", replicas[0].id()])
        .await
        .unwrap();
    let after = answers(&ambassador, "scale.test", 300).await;
    assert_eq!(
        after.keys().map(String::as_str).collect::<Vec<_>>(),
        ["200 replica-1", "200 replica-2"],
        "answers after the stop: {after:?}\n{}",
        ambassador.logs(&[&host])
    );
}

/// The tutorial's reboot test across hosts: the provider runs on host A; host A dies (its
/// registrar killed -9, its containers killed); the provider starts on host B. The consumer gets
/// answers again within the lease TTL + 2 s, and from then on only answers from host B.
#[tokio::test]
async fn a_dead_hosts_provider_comes_back_on_another_host_within_the_lease_ttl() {
    const TTL: u32 = 3;
    let limit = Duration::from_secs(u64::from(TTL) + 2);
    let ambassador = Ambassador::start(LOCALHOST).await.unwrap();
    let mut host_a = ambassador
        .host(Ipv4Addr::new(127, 0, 0, 2), TTL)
        .await
        .unwrap();
    let host_b = ambassador
        .host(Ipv4Addr::new(127, 0, 0, 3), TTL)
        .await
        .unwrap();
    let provider_a = run_app(&host_a, "provider.test", "provider-a", &[]).await;
    wait_answer(
        &ambassador,
        &[&host_a, &host_b],
        "provider.test",
        "/",
        "provider-a",
    )
    .await;

    // Host A dies.
    host_a.registrar.kill();
    provider_a.command("kill").await.unwrap();
    let died = Instant::now();
    let _provider_b = run_app(&host_b, "provider.test", "provider-b", &[]).await;
    wait_answer(
        &ambassador,
        &[&host_a, &host_b],
        "provider.test",
        "/",
        "provider-b",
    )
    .await;
    let recovered = died.elapsed();
    eprintln!("host A died -> answers from host B after {recovered:?} (TTL {TTL} s)");
    assert!(
        recovered <= limit,
        "answers came back after {recovered:?}, more than the TTL + 2 s"
    );

    // From then on, through the expiry of host A's lease and beyond, only host B answers.
    let mut count = 0;
    while died.elapsed() < limit + Duration::from_secs(1) {
        let (status, body) = ambassador.get("provider.test", "/").await.unwrap();
        assert_eq!(
            (status, body.trim()),
            (200, "provider-b"),
            "request {count} after the failover\n{}",
            ambassador.logs(&[&host_a, &host_b])
        );
        count += 1;
    }
    assert!(count > 0);
    // Host A's registrations expired with its lease.
    let mut kv = ambassador.etcd.client().await.unwrap();
    let keys = kv
        .get(
            "/apps/provider.test/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let endpoints: Vec<String> = keys
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    assert!(
        endpoints.len() == 1 && endpoints[0].contains("/127.0.0.3:"),
        "registrations left: {endpoints:?}"
    );
}

/// Domains that come and go are applied through HAProxy's runtime API: a new domain takes a
/// free pooled backend (servers added, a map entry), a domain that goes frees it for the next,
/// and none of it reloads HAProxy.
#[tokio::test]
async fn domains_come_and_go_without_a_reload() {
    let ambassador = Ambassador::start(LOCALHOST).await.unwrap();
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await.unwrap();
    let mid = run_app(&host, "mid.test", "mid", &[]).await;
    wait_answer(&ambassador, &[&host], "mid.test", "/", "mid").await;
    let supervised = ambassador.supervised();
    let reloads = supervised.reloads().await.unwrap();

    let _zed = run_app(&host, "zed.test", "zed", &[]).await;
    wait_answer(&ambassador, &[&host], "zed.test", "/", "zed").await;
    docker(&["stop", "--time", "1", mid.id()]).await.unwrap();
    wait_for("mid.test to lose its route", WAIT, || async {
        let (status, text) = ambassador.get("mid.test", "/").await?;
        Ok((status == 503 && text.contains("no route")).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(&[&host])));
    // A domain that goes first in the (exact-match) hosts map takes the slot mid left.
    let _abc = run_app(&host, "abc.test", "abc", &[]).await;
    wait_answer(&ambassador, &[&host], "abc.test", "/", "abc").await;
    wait_answer(&ambassador, &[&host], "zed.test", "/", "zed").await;

    assert_eq!(
        supervised.reloads().await.unwrap(),
        reloads,
        "HAProxy reloaded:\n{}",
        ambassador.logs(&[&host])
    );
    // The live files catch up with the runtime changes behind them (`--write-behind`).
    let hosts_map = supervised.state_dir().join("live/hosts.map");
    wait_for("the live hosts map to catch up", WAIT, || async {
        let map = std::fs::read_to_string(&hosts_map)?;
        Ok((map == "abc.test slot_1\nzed.test slot_2\n").then_some(()))
    })
    .await
    .unwrap();
}

/// #15, item 2: a replica stopped gracefully (`docker stop`: SIGTERM, which its process
/// outlives for 1 s, then SIGKILL) is unrouted at the first sign of the stop, so HAProxy sends it
/// no new request while it still answers the ones it has: a keep-alive client under load sees
/// no error at all. Before, its route went with the `die` event, after the process was dead.
#[tokio::test]
async fn a_replica_stopped_gracefully_costs_no_request() {
    let ambassador = Ambassador::start(LOCALHOST).await.unwrap();
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await.unwrap();
    let mut replicas = Vec::new();
    for i in 0..2 {
        replicas.push(run_app(&host, "drain.test", &format!("replica-{i}"), &[]).await);
    }
    wait_for("both replicas to answer", WAIT, || async {
        let seen = answers(&ambassador, "drain.test", 20).await;
        Ok((seen.len() == 2 && seen.keys().all(|k| k.starts_with("200 "))).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", ambassador.logs(&[&host])));
    let load = tokio::spawn(legate_tests::load::wrk(
        ambassador.http(),
        "drain.test",
        Duration::from_secs(6),
        8,
        false,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    docker(&["stop", "--time", "1", replicas[0].id()])
        .await
        .unwrap();
    let report = load.await.unwrap().unwrap();
    assert!(report.requests > 1000, "{}", report.output);
    assert_eq!(
        (report.socket_errors, report.non_2xx),
        (0, 0),
        "{}\n{}",
        report.output,
        ambassador.logs(&[&host])
    );
}

/// #14: the whole pipeline with every wire secured, as a fleet runs it: the registrar and
/// confgen reach etcd over TLS with client certificates, the supervisor subscribes to confgen's
/// TCP listener with mutual TLS. From `docker run` to an answer through HAProxy, and a second
/// app routed without a reload.
#[tokio::test]
async fn the_whole_pipeline_runs_over_mutual_tls() {
    let ambassador = Ambassador::start_secured(LOCALHOST).await.unwrap();
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await.unwrap();
    let _first = run_app(&host, "first.tls.test", "first", &[]).await;
    wait_answer(&ambassador, &[&host], "first.tls.test", "/", "first").await;
    let reloads = ambassador.supervised().reloads().await.unwrap();
    let _second = run_app(&host, "second.tls.test", "second", &[]).await;
    wait_answer(&ambassador, &[&host], "second.tls.test", "/", "second").await;
    assert_eq!(ambassador.supervised().reloads().await.unwrap(), reloads);
    for log in [ambassador.confgen.log(), host.registrar.log()] {
        assert!(!log.contains("WARN"), "a warning over TLS:\n{log}");
    }
}
