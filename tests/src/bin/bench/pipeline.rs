//! The whole pipeline measured as a consumer sees it: etcd or Docker → registrar → confgen →
//! supervisor → a request routed by HAProxy, beside the physical limits measured in the same run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::WatchOptions;
use legate_tests::ambassador::Ambassador;
use legate_tests::backend::Backend;
use legate_tests::docker::images;
use legate_tests::{http_get, tcp_banner};
use tokio::io::AsyncWriteExt;

use super::{container_id, header, percentile, report, row};

pub(crate) const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// How long one change may take before the benchmark gives up.
pub(crate) const LIMIT: Duration = Duration::from_secs(30);

/// Polls `check` as fast as it answers until it is true; the time it took.
pub(crate) async fn until<F, Fut>(what: &str, started: Instant, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if check().await {
            return Ok(started.elapsed());
        }
        if started.elapsed() > LIMIT {
            bail!("{what}: not seen after {LIMIT:?}");
        }
        tokio::task::yield_now().await;
    }
}

/// Whether `host` answers `body` through the ambassador at `http`.
pub(crate) async fn answers(http: SocketAddr, host: &str, body: &str) -> bool {
    matches!(http_get(http, host, "/").await, Ok((200, b)) if b.trim() == body)
}

/// A TCP server that sends `name` and a newline to each connection, then closes it.
pub(crate) async fn banner_server(
    name: String,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let line = format!("{name}\n");
            tokio::spawn(async move {
                let _ = stream.write_all(line.as_bytes()).await;
            });
        }
    });
    Ok((addr, task))
}

/// etcd put → routed, for a new server of an existing app, a new domain and a new service
/// port, `changes` of each one at a time; and the limits: etcd put → watch event, one
/// runtime-API command, one HAProxy reload.
pub(crate) async fn convergence(changes: usize, tls: bool) -> Result<()> {
    let ambassador = if tls {
        Ambassador::start_secured(LOCALHOST).await?
    } else {
        Ambassador::start(LOCALHOST).await?
    };
    let http = ambassador.http();
    let mut kv = ambassador.etcd.client().await?;
    let supervised = ambassador.supervised();

    // Existing apps, each with one server answering "old", set up in one go.
    let old = Backend::start("old", (Ipv4Addr::LOCALHOST, 0).into()).await?;
    for i in 0..changes {
        let key = format!("/apps/gain-{i}.test/{}/{}", container_id(i), old.addr());
        kv.put(key, "", None).await?;
    }
    let last = format!("gain-{}.test", changes - 1);
    until("the existing apps", Instant::now(), || {
        answers(http, &last, "old")
    })
    .await?;

    let mut backends = Vec::new();
    let mut rows = Vec::new();
    for kind in ["gain", "new"] {
        let reloads = supervised.reloads().await?;
        let mut samples = Vec::with_capacity(changes);
        for i in 0..changes {
            let name = format!("{kind}-{i}");
            let backend = Backend::start(&name, (Ipv4Addr::LOCALHOST, 0).into()).await?;
            let n = if kind == "gain" {
                changes + i
            } else {
                2 * changes + i
            };
            let key = format!(
                "/apps/{kind}-{i}.test/{}/{}",
                container_id(n),
                backend.addr()
            );
            let started = Instant::now();
            kv.put(key, "", None).await?;
            let host = format!("{kind}-{i}.test");
            samples.push(until(&name, started, || answers(http, &host, &name)).await?);
            backends.push(backend);
        }
        rows.push((kind, samples, supervised.reloads().await? - reloads));
    }
    let reloads = supervised.reloads().await?;
    let mut samples = Vec::with_capacity(changes);
    let mut servers = Vec::new();
    for i in 0..changes {
        let name = format!("svc-{i}");
        let (addr, task) = banner_server(name.clone()).await?;
        let port = legate_tests::free_port()?;
        let key = format!(
            "/services/{name}/{port}/{}/{addr}",
            container_id(3 * changes + i)
        );
        let started = Instant::now();
        kv.put(key, "", None).await?;
        let listener = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        samples.push(
            until(&name, started, || async {
                tcp_banner(listener).await.is_ok_and(|b| b == name)
            })
            .await?,
        );
        servers.push(task);
    }
    rows.push(("service", samples, supervised.reloads().await? - reloads));

    // The limits, on the same etcd and HAProxy.
    let mut watch_samples = Vec::with_capacity(changes);
    let mut events = kv
        .watch("/bench-limit/", Some(WatchOptions::new().with_prefix()))
        .await?;
    for i in 0..changes {
        let started = Instant::now();
        kv.put(format!("/bench-limit/{i}"), "x", None).await?;
        loop {
            let message = tokio::time::timeout(LIMIT, events.message())
                .await
                .context("no watch event")??
                .context("the watch ended")?;
            if message.events().iter().any(|e| {
                e.kv()
                    .is_some_and(|kv| kv.key() == format!("/bench-limit/{i}").as_bytes())
            }) {
                break;
            }
        }
        watch_samples.push(started.elapsed());
    }
    let state = supervised.admin("show servers state").await?;
    let (backend, server) = state
        .lines()
        .skip(2)
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.len() > 3).then(|| (fields[1].to_owned(), fields[3].to_owned()))
        })
        .context("no server in show servers state")?;
    let mut command_samples = Vec::with_capacity(changes);
    for i in 0..changes {
        let command = format!("set server {backend}/{server} weight {}", 100 + i % 2);
        let started = Instant::now();
        let reply = supervised.admin(&command).await?;
        command_samples.push(started.elapsed());
        if !reply.trim().is_empty() {
            bail!("{command}: {reply}");
        }
    }
    let mut reload_samples = Vec::new();
    for _ in 0..changes.min(20) {
        let before = supervised.reloads().await?;
        let started = Instant::now();
        supervised.master("reload").await?;
        until("a raw reload", started, || async {
            supervised.reloads().await.is_ok_and(|r| r > before)
        })
        .await?;
        reload_samples.push(started.elapsed());
    }

    println!();
    println!(
        "convergence: etcd put issued -> first request routed to it through HAProxy, {changes} changes of each kind, one at a time{}",
        if tls {
            " (etcd over TLS with client certificates, supervisor -> confgen over mutual TLS)"
        } else {
            ""
        }
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>8} {:>10}",
        "", "p50", "p99", "max", "reloads", "p50/limit"
    );
    let watch = percentile(&mut watch_samples, 0.5);
    let command = percentile(&mut command_samples, 0.5);
    let reload = percentile(&mut reload_samples, 0.5);
    for (kind, mut samples, reloads) in rows {
        let label = match kind {
            "gain" => "(a) an existing app gains a server",
            "new" => "(b) a new domain",
            _ => "(c) a new service port",
        };
        // The limit of the path most changes took: a runtime command, or a reload.
        let runtime = (reloads as usize) * 2 < samples.len();
        let limit = watch + if runtime { command } else { reload };
        let ratio = percentile(&mut samples, 0.5).as_secs_f64() / limit.as_secs_f64();
        println!("{} {reloads:>8} {ratio:>9.1}x", row(label, &mut samples));
    }
    println!("limits, measured in the same run:");
    report("etcd put -> watch event", &mut watch_samples);
    report(
        "one runtime-API command (set server weight)",
        &mut command_samples,
    );
    report(
        "one HAProxy reload (master CLI, show proc)",
        &mut reload_samples,
    );
    Ok(())
}

/// Time from `issued` until a request for `host` gets the "no route" answer. A request that
/// reaches the stopped server while its route is still there waits in HAProxy's retries (about
/// 2 s) before failing, so each probe gets a short deadline and the time counted is when the
/// first probe that found no route started.
async fn unrouted(http: SocketAddr, host: &str, issued: Instant) -> Result<Duration> {
    const PROBE: Duration = Duration::from_millis(20);
    loop {
        let at = issued.elapsed();
        let probe = tokio::time::timeout(PROBE, http_get(http, host, "/")).await;
        if matches!(probe, Ok(Ok((503, b))) if b.contains("no route for this host")) {
            return Ok(at);
        }
        if at > LIMIT {
            bail!("{host}: still routed after {LIMIT:?}");
        }
    }
}

/// `docker run` → routed and `docker stop` → no longer routed, through the whole stack, for
/// `count` containers one at a time.
pub(crate) async fn docker(count: usize) -> Result<()> {
    let ambassador = Ambassador::start(LOCALHOST).await?;
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await?;
    let http = ambassador.http();
    let image = &images()?.http_app;
    let (mut run_issued, mut run_returned) = (Vec::new(), Vec::new());
    let (mut stop_issued, mut stop_returned) = (Vec::new(), Vec::new());
    let reloads = ambassador.supervised().reloads().await?;
    for i in 0..count {
        let (domain, response) = (
            format!("DOMAIN_NAME=run-{i}.test"),
            format!("RESPONSE=run-{i}"),
        );
        let name = format!("run-{i}");
        let host_name = format!("run-{i}.test");
        let issued = Instant::now();
        let container = host
            .run(&[80], &["-e", &domain, "-e", &response, image])
            .await?;
        let returned = issued.elapsed();
        let routed = until(&name, issued, || answers(http, &host_name, &name)).await?;
        run_issued.push(routed);
        run_returned.push(routed.saturating_sub(returned));

        let issued = Instant::now();
        legate_tests::docker::docker(&["stop", "--time", "0", container.id()]).await?;
        let returned = issued.elapsed();
        let gone = unrouted(http, &host_name, issued).await?;
        stop_issued.push(gone);
        stop_returned.push(gone.saturating_sub(returned));
        drop(container);
    }
    let reloads = ambassador.supervised().reloads().await? - reloads;
    println!();
    println!(
        "docker: {count} containers run and stopped one at a time, through registrar, etcd, confgen, supervisor and HAProxy"
    );
    header();
    report("docker run issued    -> routed", &mut run_issued);
    report("docker run returned  -> routed", &mut run_returned);
    report("docker stop issued   -> no longer routed", &mut stop_issued);
    report(
        "docker stop returned -> no longer routed",
        &mut stop_returned,
    );
    println!("HAProxy reloads: {reloads} for {} route changes", 2 * count);
    Ok(())
}
