//! The whole ambassador under load, in bursts, at scale and at rest: churn, burst, scale, idle.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use legate_proto::v1;
use legate_proto::v1::supervisor_client::SupervisorClient;
use legate_tests::ambassador::{Ambassador, Host};
use legate_tests::backend::Backend;
use legate_tests::docker::{self, Container, images};
use legate_tests::etcd::Etcd;
use legate_tests::service::Service;
use legate_tests::supervisor::Supervised;
use legate_tests::{free_port, http_get, load};
use tonic::transport::Channel;

use super::pipeline::{LIMIT, LOCALHOST, answers, banner_server, until};
use super::{container_id, cpu_percent, cpu_ticks, header, registry, report, rss_kib, snapshot_at};

type Client = SupervisorClient<Channel>;

async fn supervisor_client(supervisor: &Service) -> Result<Client> {
    let channel = supervisor.connect().await?;
    Ok(SupervisorClient::new(channel))
}

/// Status calls made so far: the scale scenario states what its polling cost the supervisor.
static POLLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn status(client: &mut Client) -> Result<v1::SupervisorStatus> {
    status_after(client, 0, Duration::ZERO).await
}

/// The supervisor's status once it has dealt with `version`, or after `wait` (a long poll).
async fn status_after(
    client: &mut Client,
    version: u64,
    wait: Duration,
) -> Result<v1::SupervisorStatus> {
    POLLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let request = v1::SupervisorStatusRequest {
        wait_version: version,
        // At least 1: 0 would ask for the default wait.
        wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1),
    };
    Ok(client.status(request).await?.into_inner())
}

/// Waits until HAProxy runs `version` or a later one; the time since `started`.
async fn applied(client: &mut Client, version: i64, started: Instant) -> Result<Duration> {
    Ok(applied_in(client, version, started).await?.0)
}

/// [`applied`], with the time the supervisor says its apply of `version` took, when it was
/// the last apply.
async fn applied_in(
    client: &mut Client,
    version: i64,
    started: Instant,
) -> Result<(Duration, Option<Duration>)> {
    let version = u64::try_from(version)?;
    // A status after each apply that was not yet this version's (a long poll answers when the
    // supervisor has dealt with the version, or at the limit).
    loop {
        let status = status_after(client, version, LIMIT.saturating_sub(started.elapsed())).await?;
        if status.running_version >= version {
            let took = (status.last_result)
                .filter(|result| result.version == version)
                .map(|result| Duration::from_micros(result.duration_us));
            return Ok((started.elapsed(), took));
        }
        let rejected = (status.last_result.as_ref()).is_some_and(|result| {
            result.version >= version && result.outcome() == v1::ApplyOutcome::Rejected
        });
        if started.elapsed() > LIMIT || rejected {
            bail!(
                "version {version} not applied after {:?}: {}\nlast result: {:?}",
                started.elapsed(),
                status.last_error,
                status.last_result
            );
        }
    }
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    Ok(header.context("no response header")?.revision())
}

/// HAProxy's master and workers, by pid.
async fn haproxy_pids(supervised: &Supervised) -> Result<Vec<u32>> {
    Ok(supervised.show_proc().await?.pids())
}

/// RSS (KiB) and CPU ticks of `pids` together; a process that has exited meanwhile (an old
/// HAProxy worker done draining) counts for nothing.
fn usage(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .filter_map(|&pid| Some((rss_kib(pid).ok()?, cpu_ticks(pid).ok()?)))
        .fold((0, 0), |(all_rss, all_ticks), (rss, ticks)| {
            (all_rss + rss, all_ticks + ticks)
        })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Server changes and reloads through the whole ambassador (etcd → confgen → supervisor →
/// HAProxy) while `wrk` sends keep-alive and `Connection: close` requests to the app changed.
pub(crate) async fn churn(
    changes: usize,
    reloads: usize,
    load_for: Duration,
    apps: usize,
) -> Result<()> {
    let ambassador = Ambassador::start(LOCALHOST).await?;
    let http = ambassador.http();
    let mut kv = ambassador.etcd.client().await?;
    if apps > 0 {
        println!("writing {apps} other apps x 3 servers...");
        legate_tests::etcd::put_all(&mut kv, &registry(apps, &[])).await?;
    }
    let mut client = supervisor_client(&ambassador.supervisor).await?;
    let mut stable = Vec::new();
    let mut written = 0;
    for i in 0..2 {
        let backend =
            Backend::start(&format!("stable-{i}"), (Ipv4Addr::LOCALHOST, 0).into()).await?;
        let key = format!("/apps/load.test/{}/{}", container_id(i), backend.addr());
        written = revision(kv.put(key, "", None).await?.header())?;
        stable.push(backend);
    }
    // Counted from here: the supervisor has applied the app.
    applied(&mut client, written, Instant::now()).await?;
    let mut extra = Vec::new();
    for i in 0..4 {
        extra.push(Backend::start(&format!("extra-{i}"), (Ipv4Addr::LOCALHOST, 0).into()).await?);
    }
    until("load.test", Instant::now(), || async {
        matches!(http_get(http, "load.test", "/").await, Ok((200, _)))
    })
    .await?;

    let before = status(&mut client).await?;
    let logs_before = (
        ambassador.confgen.log().len(),
        ambassador.supervisor.log().len(),
    );
    let keep_alive = tokio::spawn(load::wrk(http, "load.test", load_for, 8, false));
    let close = tokio::spawn(load::wrk(http, "load.test", load_for, 4, true));
    let started = Instant::now();
    let every = (changes / reloads.max(1)).max(1);
    let (mut server_changes, mut new_ports) = (Vec::new(), Vec::new());
    let mut listeners = Vec::new();
    for i in 0..changes {
        // Each pair of changes adds one of the extra servers, then removes it.
        let k = i / 2 % extra.len();
        let key = format!(
            "/apps/load.test/{}/{}",
            container_id(100 + k),
            extra[k].addr()
        );
        let at = Instant::now();
        let written = if i % 2 == 0 {
            revision(kv.put(key, "", None).await?.header())?
        } else {
            revision(kv.delete(key, None).await?.header())?
        };
        server_changes.push(applied(&mut client, written, at).await?);
        if (i + 1) % every == 0 && new_ports.len() < reloads {
            // A reload that legate cannot avoid: a new TCP service port.
            let n = new_ports.len();
            let (addr, task) = banner_server(format!("churn-{n}")).await?;
            let key = format!(
                "/services/churn-{n}/{}/{}/{addr}",
                free_port()?,
                container_id(10_000 + n)
            );
            let at = Instant::now();
            let written = revision(kv.put(key, "", None).await?.header())?;
            new_ports.push(applied(&mut client, written, at).await?);
            listeners.push(task);
        }
    }
    let churn_took = started.elapsed();
    let after = status(&mut client).await?;
    let logged = (
        ambassador.confgen.log().len() - logs_before.0,
        ambassador.supervisor.log().len() - logs_before.1,
    );
    if keep_alive.is_finished() || close.is_finished() {
        bail!("the churn ({churn_took:?}) outlasted the load: rerun with a longer --secs");
    }

    println!();
    println!(
        "churn: {} server changes and {} new service ports through etcd, confgen, supervisor and HAProxy, one at a time, under wrk for {load_for:?}, beside {apps} other apps x 3 servers",
        server_changes.len(),
        new_ports.len()
    );
    header();
    report(
        "server change: etcd put -> HAProxy runs it",
        &mut server_changes,
    );
    report(
        "new service port: etcd put -> HAProxy runs it",
        &mut new_ports,
    );
    println!(
        "applies: {} through the runtime API (no reload), {} reloads, {} rejected; churn took {:.1} s",
        after.runtime_applies - before.runtime_applies,
        after.reloads - before.reloads,
        after.rejected - before.rejected,
        churn_took.as_secs_f64()
    );
    let per_hour = |bytes: usize| bytes as f64 / churn_took.as_secs_f64() * 3600.0 / 1e6;
    let rate = (server_changes.len() + new_ports.len()) as f64 / churn_took.as_secs_f64();
    println!(
        "log volume at {rate:.0} changes/s: confgen {} B ({:.2} MB/h), supervisor {} B ({:.2} MB/h)",
        logged.0,
        per_hour(logged.0),
        logged.1,
        per_hour(logged.1)
    );
    for (mode, run) in [("keep-alive", keep_alive), ("close", close)] {
        let report = run.await??;
        println!(
            "wrk {mode:<10} requests {:>8}  socket errors {}  non-2xx {}",
            report.requests, report.socket_errors, report.non_2xx
        );
    }
    let served: Vec<String> = stable
        .iter()
        .chain(&extra)
        .map(|b| b.requests().to_string())
        .collect();
    println!(
        "requests per backend (2 stable, 4 coming and going): {}",
        served.join(" ")
    );
    drop(listeners);
    Ok(())
}

/// Creates `count` containers on `host`, 8 at a time, each an app with the domain
/// `<tag>-<i>.test` that answers `<tag>-<i>`; on an error, removes those it made.
pub(crate) async fn create_apps(host: &Host, tag: &str, count: usize) -> Result<Vec<Container>> {
    let image = &images()?.http_app;
    let created: Vec<Result<Container>> = futures_util::stream::iter(0..count)
        .map(|i| async move {
            let domain = format!("DOMAIN_NAME={tag}-{i}.test");
            let response = format!("RESPONSE={tag}-{i}");
            host.create(&[80], &["-e", &domain, "-e", &response, image])
                .await
        })
        .buffer_unordered(8)
        .collect()
        .await;
    settle(created).await
}

/// The containers if every result is one, otherwise the first error, the others removed.
async fn settle(results: Vec<Result<Container>>) -> Result<Vec<Container>> {
    let mut containers = Vec::new();
    let mut error = None;
    for result in results {
        match result {
            Ok(container) => containers.push(container),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    match error {
        None => Ok(containers),
        Some(e) => {
            docker::remove_all(containers).await;
            Err(e)
        }
    }
}

/// Starts `containers`, `parallel` `docker start`s at a time.
pub(crate) async fn start_all(containers: &[Container], parallel: usize) -> Result<()> {
    let started: Vec<Result<()>> = futures_util::stream::iter(containers)
        .map(|c| c.command("start"))
        .buffer_unordered(parallel)
        .collect()
        .await;
    started.into_iter().collect()
}

/// Waits until each `<tag>-<i>.test`, `i < count`, answers through the ambassador; the time
/// since `started`. Probes go 32 at a time, so that a sweep over hundreds of apps is short
/// beside what it measures.
async fn all_routed(
    http: SocketAddr,
    tag: &str,
    count: usize,
    started: Instant,
) -> Result<Duration> {
    let mut pending: Vec<usize> = (0..count).collect();
    while !pending.is_empty() {
        let answered: Vec<(usize, bool)> = futures_util::stream::iter(pending.iter().copied())
            .map(|i| async move {
                let ok = answers(http, &format!("{tag}-{i}.test"), &format!("{tag}-{i}")).await;
                (i, ok)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        pending = answered
            .into_iter()
            .filter_map(|(i, ok)| (!ok).then_some(i))
            .collect();
        if started.elapsed() > LIMIT * 2 {
            bail!(
                "{} of {count} apps not routed after {:?}",
                pending.len(),
                LIMIT * 2
            );
        }
    }
    Ok(started.elapsed())
}

/// The time from `last` until HAProxy runs a configuration with all `count` burst apps
/// registered in etcd; then checks that each answers through it.
async fn routed_since(
    ambassador: &Ambassador,
    client: &mut Client,
    count: usize,
    last: Instant,
) -> Result<Duration> {
    let mut kv = ambassador.etcd.client().await?;
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    let registered = loop {
        let listing = kv.get("/apps/burst-", Some(options.clone())).await?;
        if usize::try_from(listing.count())? >= count {
            break revision(listing.header())?;
        }
        if last.elapsed() > LIMIT {
            bail!(
                "{} of {count} apps registered after {LIMIT:?}",
                listing.count()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let routed = applied(client, registered, last).await?;
    all_routed(ambassador.http(), "burst", count, Instant::now()).await?;
    Ok(routed)
}

/// `count` containers created, then started at once (`parallel` `docker start`s at a time) on one host: the
/// time from the last start until every one is routed, and the reloads it took.
pub(crate) async fn burst(count: usize, parallel: usize) -> Result<()> {
    let ambassador = Ambassador::start(LOCALHOST).await?;
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await?;
    let mut client = supervisor_client(&ambassador.supervisor).await?;
    let before = status(&mut client).await?;
    let containers = create_apps(&host, "burst", count).await?;
    let first = Instant::now();
    let started = start_all(&containers, parallel).await;
    let last = Instant::now();
    let routed = match started {
        Ok(()) => routed_since(&ambassador, &mut client, count, last).await,
        Err(e) => Err(e),
    };
    let after = status(&mut client).await;
    docker::remove_all(containers).await;
    let (routed, after) = (routed?, after?);

    println!();
    println!(
        "burst: {count} containers, each a new domain, created beforehand, then started {parallel} docker starts at a time on one host"
    );
    println!(
        "starts took {:.1} s (first issued -> last returned): {:.1} starts/s, as fast as the engine goes here",
        (last - first).as_secs_f64(),
        count as f64 / (last - first).as_secs_f64()
    );
    println!(
        "last start returned -> HAProxy runs all {count} routes: {:.0} ms (each then answered through it)",
        routed.as_secs_f64() * 1000.0
    );
    println!(
        "applies: {} reloads, {} through the runtime API, {} rejected",
        after.reloads - before.reloads,
        after.runtime_applies - before.runtime_applies,
        after.rejected - before.rejected
    );
    Ok(())
}

/// A registry of `apps` apps × 3 servers and `services` services × 2 servers, through the whole
/// ambassador: confgen's sync and render, the supervisor's first apply and HAProxy's RSS and
/// open files at that size; then `samples` changes of each kind one at a time (a server gained
/// and lost, a new domain), each from its etcd put until HAProxy runs it, with the CPU confgen
/// and the supervisor spent per change and the reloads; then `bulk` keys written as fast as
/// etcd takes them, until HAProxy runs the last.
pub(crate) async fn scale(
    apps: usize,
    services: usize,
    samples: usize,
    bulk: usize,
    pool_headroom: Option<u32>,
) -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut kv = etcd.client().await?;
    // Service ports below the ephemeral range, on a loopback address of their own: nothing else
    // binds there, not even the local end of a health check's connection.
    let bind = IpAddr::V4(Ipv4Addr::new(127, 77, 0, 1));
    let ports: Vec<u16> = (0..services).map(|p| 10_000 + p as u16).collect();
    println!("writing {apps} apps x 3 servers and {services} services x 2 servers...");
    let ops = registry(apps, &ports);
    legate_tests::etcd::put_all(&mut kv, &ops).await?;
    let written = revision(kv.get("x", None).await?.header())?;

    let started = Instant::now();
    let headroom = pool_headroom.map(|h| h.to_string());
    let env: Vec<(&str, &str)> = headroom
        .iter()
        .map(|h| ("LEGATE_POOL_HEADROOM", h.as_str()))
        .collect();
    let (confgen, mut stream) = super::start_confgen(&etcd, bind, &env).await?;
    let (at, snapshot) = snapshot_at(&mut stream, u64::try_from(written)?).await?;
    let sync = at - started;
    let confgen_rss = usage(&[confgen.pid()]).0;
    drop(stream);

    let supervised = Supervised::new()?;
    let started = Instant::now();
    let supervisor = supervised.start(Some(&confgen.grpc()), &[])?;
    let mut client = legate_tests::wait_for("the supervisor", legate_tests::WAIT, || async {
        Ok(Some(supervisor_client(&supervisor).await?))
    })
    .await?;
    let first_apply = applied(&mut client, written, started).await.map_err(|e| {
        anyhow::anyhow!(
            "{e}\nsupervisor:\n{}\nconfgen:\n{}",
            supervisor.log(),
            confgen.log()
        )
    })?;
    let haproxy = haproxy_pids(&supervised).await?;
    let haproxy_rss = usage(&haproxy).0;
    let haproxy_fds: usize = haproxy.iter().map(|pid| open_fds(*pid)).sum();

    // One at a time: a server gained by an existing app, then lost again.
    let cpu = |client: &Service| cpu_ticks(client.pid());
    let (confgen_before, supervisor_before) = (cpu(&confgen)?, cpu(&supervisor)?);
    let before = status(&mut client).await?;
    let walks_before = walks(&confgen).await?;
    let polls_before = POLLS.load(std::sync::atomic::Ordering::Relaxed);
    let mut servers = Vec::with_capacity(samples * 2);
    let mut server_applies = Vec::with_capacity(samples * 2);
    let mut server_puts = Vec::with_capacity(samples * 2);
    for i in 0..samples {
        let key = format!(
            "/apps/app-{}.example.com/{}/127.0.0.1:9",
            i * 7919 % apps,
            container_id(5_000_000 + i)
        );
        let at = Instant::now();
        let version = revision(kv.put(key.clone(), "", None).await?.header())?;
        server_puts.push(at.elapsed());
        let (took, apply) = applied_in(&mut client, version, at).await?;
        servers.push(took);
        server_applies.extend(apply);
        let at = Instant::now();
        let version = revision(kv.delete(key, None).await?.header())?;
        server_puts.push(at.elapsed());
        let (took, apply) = applied_in(&mut client, version, at).await?;
        servers.push(took);
        server_applies.extend(apply);
    }
    let changes = servers.len() as f64;
    let per_change = |ticks: u64| ticks as f64 * 10.0 / changes;
    let server_cpu = (
        per_change(cpu(&confgen)? - confgen_before),
        per_change(cpu(&supervisor)? - supervisor_before),
    );
    // What the status calls above cost the supervisor: as many, with nothing to apply.
    let polls = POLLS.load(std::sync::atomic::Ordering::Relaxed) - polls_before;
    let idle_before = cpu(&supervisor)?;
    for _ in 0..polls {
        status(&mut client).await?;
    }
    let polling_cpu = per_change(cpu(&supervisor)? - idle_before);
    let middle = status(&mut client).await?;
    let walks_middle = walks(&confgen).await?;

    // One at a time: a new domain.
    let mut domains = Vec::with_capacity(samples);
    let mut domain_applies = Vec::with_capacity(samples);
    let mut domain_puts = Vec::with_capacity(samples);
    let mut added = Vec::with_capacity(samples);
    for i in 0..samples {
        let key = format!(
            "/apps/new-{i}.example.com/{}/127.0.0.1:9",
            container_id(6_000_000 + i)
        );
        let at = Instant::now();
        let version = revision(kv.put(key.clone(), "", None).await?.header())?;
        domain_puts.push(at.elapsed());
        let (took, apply) = applied_in(&mut client, version, at).await?;
        domains.push(took);
        domain_applies.extend(apply);
        added.push(key);
    }
    let after = status(&mut client).await?;
    let walks_after = walks(&confgen).await?;
    // The new domains go again, and HAProxy runs without them before the bulk starts: the
    // bulk's time is its own.
    let mut removed = written;
    for key in added {
        removed = revision(kv.delete(key, None).await?.header())?;
    }
    applied(&mut client, removed, Instant::now()).await?;

    // A bulk load: `bulk` keys of new apps, 3 servers each, as fast as etcd takes them.
    let bulk_ops: Vec<(String, String)> = (0..bulk)
        .map(|n| {
            let key = format!(
                "/apps/bulk-{}.example.com/{}/127.0.0.{}:{}",
                n / 3,
                container_id(7_000_000 + n),
                n % 3 + 2,
                40000 + n / 3 % 20000
            );
            (key, String::new())
        })
        .collect();
    let settled = status(&mut client).await?;
    let work_before = Work::of(&confgen, &supervisor).await?;
    let at = Instant::now();
    legate_tests::etcd::put_all(&mut kv, &bulk_ops).await?;
    let last_put = Instant::now();
    let last = revision(kv.get("x", None).await?.header())?;
    let loaded = applied(&mut client, last, last_put).await?;
    let loaded_status = status(&mut client).await?;
    let bulk_work = Work::of(&confgen, &supervisor).await?.since(&work_before);

    println!();
    println!(
        "scale: {apps} apps x 3 servers + {services} services x 2 servers ({} keys, {:.1} MB of configuration)",
        ops.len(),
        snapshot.haproxy_config.len() as f64 / 1e6
    );
    println!(
        "confgen: process start -> first snapshot received (sync + render): {:.0} ms; RSS {:.1} MiB",
        sync.as_secs_f64() * 1000.0,
        mib(confgen_rss)
    );
    println!(
        "supervisor: process start -> HAProxy runs that snapshot (validate, start): {:.0} ms",
        first_apply.as_secs_f64() * 1000.0
    );
    println!(
        "HAProxy: {} processes, RSS {:.1} MiB, {haproxy_fds} open files",
        haproxy.len(),
        mib(haproxy_rss)
    );
    header();
    report(
        &format!(
            "a server gained or lost, put -> running ({})",
            servers.len()
        ),
        &mut servers,
    );
    report(
        &format!("  the etcd put alone ({})", server_puts.len()),
        &mut server_puts,
    );
    report(
        &format!("  the supervisor's apply alone ({})", server_applies.len()),
        &mut server_applies,
    );
    report(
        &format!("a new domain, put -> running ({})", domains.len()),
        &mut domains,
    );
    report(
        &format!("  the etcd put alone ({})", domain_puts.len()),
        &mut domain_puts,
    );
    report(
        &format!("  the supervisor's apply alone ({})", domain_applies.len()),
        &mut domain_applies,
    );
    println!(
        "CPU per server change: confgen {:.2} ms, supervisor {:.2} ms (10 ms ticks over {} changes), \
         of which the supervisor spends {:.2} ms answering this bench's {:.1} status calls per change",
        server_cpu.0,
        server_cpu.1,
        servers.len(),
        polling_cpu,
        polls as f64 / changes
    );
    println!(
        "reloads: {} for the server changes, {} for the new domains",
        middle.reloads - before.reloads,
        after.reloads - middle.reloads
    );
    println!(
        "confgen renders that walked the template (the others patched): {} for the server changes, {} for the new domains",
        walks_middle - walks_before,
        walks_after - walks_middle
    );
    println!(
        "bulk load: {bulk} keys written in {:.0} ms, all running {:.0} ms after the last put ({} reloads)",
        (last_put - at).as_secs_f64() * 1000.0,
        loaded.as_secs_f64() * 1000.0,
        loaded_status.reloads - settled.reloads
    );
    println!(
        "  meanwhile: {:.0} renders in {:.0} ms; {:.0} applies, their commands or reload {:.0} ms",
        bulk_work.renders, bulk_work.render_ms, bulk_work.applies, bulk_work.apply_ms
    );
    // Why HAProxy reloaded, and what went wrong, as the supervisor logged it.
    for line in supervisor.log().lines().filter(|l| {
        l.contains("by a reload")
            || l.contains(" WARN legate_supervisor")
            || l.contains(" ERROR legate_supervisor")
    }) {
        println!("  {line}");
    }
    println!(
        "RSS: confgen {:.1} MiB, supervisor {:.1} MiB, HAProxy {:.1} MiB, etcd {:.1} MiB",
        mib(usage(&[confgen.pid()]).0),
        mib(usage(&[supervisor.pid()]).0),
        mib(usage(&haproxy_pids(&supervised).await?).0),
        mib(usage(&[etcd.pid()]).0)
    );
    Ok(())
}

/// What confgen and the supervisor did: renders, and applies (runtime commands or reloads),
/// with the time each took.
struct Work {
    renders: f64,
    render_ms: f64,
    applies: f64,
    apply_ms: f64,
}

impl Work {
    async fn of(confgen: &Service, supervisor: &Service) -> Result<Self> {
        let apply = "legate_supervisor_apply_seconds";
        Ok(Self {
            renders: confgen
                .metric("legate_confgen_render_seconds_count")
                .await?,
            render_ms: confgen.metric("legate_confgen_render_seconds_sum").await? * 1000.0,
            applies: supervisor.metric(&format!("{apply}_count")).await?,
            apply_ms: supervisor.metric(&format!("{apply}_sum")).await? * 1000.0,
        })
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            renders: self.renders - before.renders,
            render_ms: self.render_ms - before.render_ms,
            applies: self.applies - before.applies,
            apply_ms: self.apply_ms - before.apply_ms,
        }
    }
}

/// Renders a confgen made by walking its template rather than patching its last one.
async fn walks(confgen: &Service) -> Result<f64> {
    confgen
        .metric("legate_confgen_render_passes_total{how=\"walk\"}")
        .await
}

/// Open file descriptors of `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// RSS and CPU of each process of the ambassador, with `count` registered containers, over
/// `idle`.
pub(crate) async fn idle(count: usize, idle: Duration) -> Result<()> {
    let ambassador = Ambassador::start(LOCALHOST).await?;
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await?;
    let containers = create_apps(&host, "idle", count).await?;
    if let Err(e) = start_all(&containers, 8).await {
        docker::remove_all(containers).await;
        return Err(e);
    }
    let measured = async {
        all_routed(ambassador.http(), "idle", count, Instant::now()).await?;
        let haproxy = haproxy_pids(ambassador.supervised()).await?;
        let groups: [(&str, Vec<u32>); 5] = [
            ("registrar", vec![host.registrar.pid()]),
            ("confgen", vec![ambassador.confgen.pid()]),
            ("supervisor", vec![ambassador.supervisor.pid()]),
            ("HAProxy (master + worker)", haproxy),
            ("etcd", vec![ambassador.etcd.pid()]),
        ];
        let before = groups
            .iter()
            .map(|(_, pids)| usage(pids))
            .collect::<Vec<_>>();
        let restarts = async || -> Result<f64> {
            let text = ambassador.confgen.metrics_text().await?;
            Ok(text
                .lines()
                .filter(|l| l.starts_with("legate_confgen_watch_restarts_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum())
        };
        let restarts_before = restarts().await?;
        let started = Instant::now();
        tokio::time::sleep(idle).await;
        let elapsed = started.elapsed().as_secs_f64();
        let watch_losses = restarts().await? - restarts_before;
        println!();
        println!("idle: the ambassador with {count} registered containers, over {idle:?}");
        println!(
            "{:<28} {:>12} {:>12} {:>8}",
            "", "RSS before", "RSS after", "CPU"
        );
        for ((name, pids), (rss_before, ticks_before)) in groups.iter().zip(before) {
            let (rss_after, ticks_after) = usage(pids);
            let cpu = cpu_percent(ticks_after - ticks_before, elapsed);
            println!(
                "{name:<28} {:>8.1} MiB {:>8.1} MiB {cpu:>7.2}%",
                mib(rss_before),
                mib(rss_after)
            );
        }
        println!("confgen's etcd watch lost or restarted meanwhile: {watch_losses} times");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    docker::remove_all(containers).await;
    measured
}
