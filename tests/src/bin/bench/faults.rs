//! `bench faults`: the faults a fleet throws at one ambassador, one after another, under load.
//!
//! A 3-member etcd, confgen, a supervisor with HAProxy and a registrar with four real
//! containers, each an app answering its own domain. Clients send requests through HAProxy
//! the whole time (fresh connections, each answer checked against the domain asked for) while
//! the faults come: every etcd member frozen past the lease TTL, the etcd leader killed (with
//! containers registered one at a time before and after), confgen cut off from etcd, a service
//! registered on a port another process holds, confgen killed and restarted ten times, the
//! supervisor killed with SIGKILL and started again. Per fault: requests, errors, misroutes,
//! and how long until things are back.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use legate_proto::v1;
use legate_proto::v1::supervisor_client::SupervisorClient;
use legate_tests::docker::{self, Container, images};
use legate_tests::etcd::Cluster;
use legate_tests::proxy::{Proxy, Upstream};
use legate_tests::service::Service;
use legate_tests::supervisor::Supervised;
use legate_tests::{free_port, http_get};

use super::percentile;
use super::pipeline::{answers, until};

/// The lease TTL of the registrar, in seconds.
const TTL: u64 = 3;
/// Apps running through the whole sequence.
const APPS: usize = 4;
/// Containers registered one at a time with the cluster healthy, then with its leader killed.
const REGISTRATIONS: usize = 20;

/// Answers counted since the last [`Counters::take`].
#[derive(Default)]
struct Counters {
    right: AtomicU64,
    errors: AtomicU64,
    misroutes: AtomicU64,
}

impl Counters {
    fn take(&self) -> (u64, u64, u64) {
        (
            self.right.swap(0, Ordering::Relaxed),
            self.errors.swap(0, Ordering::Relaxed),
            self.misroutes.swap(0, Ordering::Relaxed),
        )
    }
}

/// A row of the table: the fault, then what the clients saw during it and the recovery time.
fn row(fault: &str, counters: &Counters, back: Option<Duration>) {
    let (right, errors, misroutes) = counters.take();
    let back = back.map_or_else(|| "-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!(
        "{fault:<44} {:>9} {errors:>7} {misroutes:>9} {back:>10}",
        right + errors + misroutes
    );
}

/// The app keys of `host_id` in etcd, with their leases; empty when etcd does not answer.
async fn app_keys(client: &etcd_client::Client, host_id: &str) -> Vec<(String, i64)> {
    let Ok(response) = client
        .clone()
        .get("/apps/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
    else {
        return Vec::new();
    };
    response
        .kvs()
        .iter()
        .filter(|kv| kv.value_str().is_ok_and(|v| v.contains(host_id)))
        .map(|kv| (kv.key_str().unwrap_or_default().to_owned(), kv.lease()))
        .collect()
}

/// A client of one etcd member only, with short timeouts.
async fn member_client(endpoint: &str) -> Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_millis(500));
    Ok(etcd_client::Client::connect([endpoint], Some(options)).await?)
}

pub(crate) async fn faults() -> Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let endpoints = cluster.endpoints();
    let http_port = free_port()?;
    // confgen reaches each member through a proxy, to cut it off from etcd.
    let mut proxies = Vec::new();
    for member in &cluster.members {
        proxies.push(Proxy::start(Upstream::Tcp(member.addr())).await?);
    }
    let through: Vec<String> = proxies
        .iter()
        .map(|p| format!("http://{}", p.addr()))
        .collect();
    let mut confgen = Service::confgen(&through.join(","), http_port, &[], &[])?;
    confgen.wait_serving().await?;
    let supervised = Supervised::new()?;
    let confgen_url = confgen.grpc();
    let mut supervisor = supervised.start(Some(&confgen_url), &[])?;
    supervisor.wait_serving().await?;
    let host_id = format!("faults-{}", docker::run_id());
    let label = format!("legate.test.host={host_id}");
    let (filter, ttl) = (format!("label={label}"), TTL.to_string());
    let mut registrar = Service::start(
        "legate-registrar",
        &[
            "--etcd-endpoints",
            &endpoints,
            "--filter",
            &filter,
            "--lease-ttl",
            &ttl,
        ],
        &[("HOST_IP", "127.0.0.1"), ("HOST_ID", &host_id)],
    )?;
    registrar.wait_serving().await?;
    let http = SocketAddr::from((Ipv4Addr::LOCALHOST, http_port));
    let run_app = |domain: String| {
        let label = label.clone();
        async move {
            let (env, response) = (
                format!("DOMAIN_NAME={domain}"),
                format!("RESPONSE={domain}"),
            );
            Container::run(&[
                "--label",
                &label,
                "-e",
                &env,
                "-e",
                &response,
                "-p",
                "127.0.0.1::80",
                &images()?.http_app,
            ])
            .await
        }
    };
    let domains: Vec<String> = (0..APPS).map(|i| format!("f{i}.faults.test")).collect();
    let mut containers = Vec::new();
    for domain in &domains {
        containers.push(run_app(domain.clone()).await?);
    }
    for domain in &domains {
        until(&format!("{domain} routed"), Instant::now(), || {
            answers(http, domain, domain)
        })
        .await?;
    }

    // The clients: fresh connections, round the domains, every answer checked.
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..4 {
        let (counters, stop, domains) = (counters.clone(), stop.clone(), domains.clone());
        clients.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut n = i;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let domain = &domains[n % domains.len()];
                n += 1;
                let answer =
                    tokio::time::timeout(Duration::from_secs(5), http_get(http, domain, "/")).await;
                let counter = match answer {
                    Ok(Ok((200, body))) if body.trim() == domain => &counters.right,
                    Ok(Ok((200, _))) => &counters.misroutes,
                    _ => &counters.errors,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    println!(
        "faults: {APPS} apps in containers through a 3-member etcd, confgen, supervisor and HAProxy, \
         4 clients on fresh connections checking every answer; lease TTL {TTL} s"
    );
    println!(
        "{:<44} {:>9} {:>7} {:>9} {:>10}",
        "fault", "requests", "errors", "misroutes", "back after"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    row("(none: 2 s of load)", &counters, None);

    // 1. Every member frozen past the TTL: the lease expires when etcd runs again.
    let survivor = member_client(&cluster.members[0].endpoint()).await?;
    let before = app_keys(&survivor, &host_id).await;
    let old_lease = before.first().map(|k| k.1).context("no registration")?;
    for member in &cluster.members {
        member.freeze()?;
    }
    tokio::time::sleep(Duration::from_secs(2 * TTL)).await;
    for member in &cluster.members {
        member.thaw()?;
    }
    let thawed = Instant::now();
    let back = until(
        "every registration back under a new lease",
        thawed,
        || async {
            let keys = app_keys(&survivor, &host_id).await;
            keys.len() == APPS && keys.iter().all(|k| k.1 != old_lease)
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    row(
        &format!("etcd frozen {} s (TTL {TTL} s)", 2 * TTL),
        &counters,
        Some(back),
    );

    // 2. The leader killed: containers register through the survivors as fast as before.
    let leader = cluster.leader().await?;
    let survivor = member_client(&cluster.members[(leader + 1) % 3].endpoint()).await?;
    // Containers started one at a time, each timed from `docker run` returned to its key.
    let mut registered = APPS;
    let mut register =
        async |name: &str, containers: &mut Vec<Container>| -> Result<Vec<Duration>> {
            let mut took = Vec::new();
            for i in 0..REGISTRATIONS {
                containers.push(run_app(format!("{name}{i}.faults.test")).await?);
                let returned = Instant::now();
                registered += 1;
                let expected = registered;
                took.push(
                    until("a container registered", returned, || async {
                        app_keys(&survivor, &host_id).await.len() == expected
                    })
                    .await?,
                );
            }
            Ok(took)
        };
    let mut healthy = register("healthy", &mut containers).await?;
    // A follower down (not the survivor the timing reads from), then back.
    let follower = (leader + 2) % 3;
    counters.take();
    cluster.members[follower].kill();
    let mut follower_down = register("follower", &mut containers).await?;
    row(
        &format!("etcd follower killed; {REGISTRATIONS} containers started"),
        &counters,
        None,
    );
    cluster.members[follower].restart().await?;
    counters.take();
    cluster.members[leader].kill();
    let mut down = register("down", &mut containers).await?;
    row(
        &format!("etcd leader killed; {REGISTRATIONS} containers started"),
        &counters,
        None,
    );
    let first_down = down[0];
    // The first registration after the kill waits for the election; the rest run on a
    // cluster with one member down.
    let mut after_election = down[1..].to_vec();
    let p = |v: &mut Vec<Duration>| (percentile(v, 0.5), percentile(v, 0.99));
    let (healthy, follower_down, down, after_election) = (
        p(&mut healthy),
        p(&mut follower_down),
        p(&mut down),
        p(&mut after_election),
    );

    // confgen cut off from etcd (every member) for 3 s, then a change right after the cut
    // heals: the watch resumes at once.
    proxies.iter().for_each(Proxy::cut);
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxies.iter().for_each(Proxy::resume);
    let healed = Instant::now();
    let target = containers[0].published("80/tcp").await?;
    survivor
        .clone()
        .put(
            format!("/apps/direct.faults.test/{}/{target}", "e".repeat(64)),
            "",
            None,
        )
        .await?;
    let put = Instant::now();
    let routed = until("a change routed after the cut", put, || {
        answers(http, "direct.faults.test", &domains[0])
    })
    .await?;
    row(
        "confgen cut off from etcd 3 s; a change after",
        &counters,
        Some(healed.elapsed()),
    );

    // 3. A service on a port another process holds, then a change that must still flow.
    let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let busy = squatter.local_addr()?.port();
    survivor
        .clone()
        .put(
            format!("/services/squat/{busy}/{}/127.0.0.1:9", "f".repeat(64)),
            "",
            None,
        )
        .await?;
    let registered = Instant::now();
    containers.push(run_app("after.faults.test".to_owned()).await?);
    let back = until("a new app routed despite the busy port", registered, || {
        answers(http, "after.faults.test", "after.faults.test")
    })
    .await?;
    row(
        &format!("service on busy port {busy}; an app started"),
        &counters,
        Some(back),
    );
    drop(squatter);

    // 4. confgen killed and restarted ten times.
    for _ in 0..10 {
        confgen.restart()?;
        confgen.wait_serving().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    row("confgen killed and restarted 10 times", &counters, None);

    // 5. The supervisor killed: HAProxy serves on; a new supervisor adopts it.
    supervisor.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted = Instant::now();
    let mut supervisor = supervised.start(Some(&confgen_url), &[])?;
    supervisor.wait_serving().await?;
    let channel = supervisor.connect().await?;
    let status = SupervisorClient::new(channel)
        .status(v1::SupervisorStatusRequest::default())
        .await?
        .into_inner();
    let adopted = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    row(
        "supervisor kill -9, then started again",
        &counters,
        Some(adopted),
    );
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let ratio = |d: Duration| d.as_secs_f64() / healthy.1.as_secs_f64().max(1e-9);
    println!("docker run returned -> key in etcd, {REGISTRATIONS} containers each:");
    println!("                                            p50       p99  p99/healthy");
    for (what, (p50, p99)) in [
        ("healthy cluster", healthy),
        ("a follower down", follower_down),
        ("the leader killed, all", down),
        ("the leader killed, after the first", after_election),
    ] {
        println!(
            "{what:<36} {:>9} {:>9} {:>11.2}",
            ms(p50),
            ms(p99),
            ratio(p99)
        );
    }
    println!(
        "the first after the leader was killed (it waits for the election): {}",
        ms(first_down)
    );
    println!(
        "confgen cut off from etcd: a put right after the cut healed routed in {}",
        ms(routed)
    );
    println!(
        "after the sequence: HAProxy master {} (reloads {}), listeners refused: {:?}",
        status.master_pid, status.reloads, status.refused_listeners
    );

    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    drop(registrar);
    docker::remove_all(containers).await;
    Ok(())
}
