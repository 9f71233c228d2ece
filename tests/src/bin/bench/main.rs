//! `bench`: legate's benchmarks against real etcd, Docker and HAProxy on this host, one
//! scenario per subcommand: `cargo run --release -p legate-tests --bin bench -- <scenario>
//! [options]`; `bench help <scenario>` says what each measures and its options. Every container
//! is created by the benchmark and removed at the end; traffic stays on loopback and the
//! containers and networks it made.

#![allow(clippy::print_stdout)]

mod faults;
mod pipeline;
mod scenarios;
mod soak;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use etcd_client::{EventType, WatchOptions};
use legate_proto::v1;
use legate_proto::v1::ApplyOutcome;
use legate_proto::v1::supervisor_client::SupervisorClient;
use legate_tests::backend::Backend;
use legate_tests::confgen::Snapshots;
use legate_tests::docker::{self, Container};
use legate_tests::etcd::Etcd;
use legate_tests::load;
use legate_tests::service::Service;
use legate_tests::supervisor::{Supervised, config, with_comment};

/// legate's benchmarks against real etcd, Docker and HAProxy on this host.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Bench {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Docker start → key visible in etcd and stop → key deleted, for N containers started and
    /// stopped one by one (p50/p99/max), then the registrar's RSS and CPU while idle with N
    /// registered containers, and beside `--foreign-keys` keys of other hosts.
    Registrar {
        #[arg(long, default_value_t = 100)]
        containers: usize,
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
        #[arg(long, default_value_t = 20_000)]
        foreign_keys: usize,
    },
    /// etcd put → snapshot delivered to a Watch subscriber, for `--puts` puts one at a time at
    /// the default `--wait` (p50/p99/max); then a registry of `--apps` apps × 3 servers plus
    /// `--services` services × 2 servers, read and rendered by a confgen started on it: time
    /// from start to the first complete snapshot, confgen's RSS, and put → snapshot at that
    /// size (`--renders` puts).
    Confgen {
        #[arg(long, default_value_t = 200)]
        puts: usize,
        #[arg(long, default_value_t = 50)]
        renders: usize,
        #[arg(long, default_value_t = 10_000)]
        apps: usize,
        #[arg(long, default_value_t = 500)]
        services: usize,
    },
    /// `Supervisor.Apply` latency per path against a real HAProxy, without load (runtime: a
    /// server added or removed; reload: a change beyond servers), then `--changes` runtime
    /// applies and `--reloads` reloads under `wrk` on loopback, keep-alive and
    /// `Connection: close` at once: requests served, socket errors and non-2xx responses.
    Supervisor {
        #[arg(long, default_value_t = 1000)]
        changes: usize,
        #[arg(long, default_value_t = 50)]
        reloads: usize,
    },
    /// etcd put → first request routed through HAProxy by the whole ambassador, for N new
    /// servers of existing apps, N new domains and N new service ports, one at a time, beside
    /// the limits measured in the same run (etcd put → watch event, one runtime-API command,
    /// one HAProxy reload). `--tls`: every wire between hosts secured (etcd TLS with client
    /// certificates, confgen → supervisor over mutual TLS).
    Convergence {
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long)]
        tls: bool,
    },
    /// `docker run` → routed and `docker stop` → no longer routed through registrar, etcd,
    /// confgen, supervisor and HAProxy, for N containers one at a time.
    Docker {
        #[arg(long, default_value_t = 50)]
        count: usize,
    },
    /// `wrk` through the whole ambassador (keep-alive and `Connection: close` at once) for
    /// `--secs` while `--changes` server changes and `--reloads` new service ports go through
    /// etcd one at a time: requests, socket errors, non-2xx, reloads and runtime applies;
    /// `--apps N` first writes N other apps × 3 servers, so that the churn runs at that scale.
    Churn {
        #[arg(long, default_value_t = 1000)]
        changes: usize,
        #[arg(long, default_value_t = 50)]
        reloads: usize,
        #[arg(long, default_value_t = 30)]
        secs: u64,
        #[arg(long, default_value_t = 0)]
        apps: usize,
    },
    /// N containers, each a new domain, started `--parallel` at a time: time from the last
    /// start until all are routed, and the reloads it took.
    Burst {
        #[arg(long, default_value_t = 500)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        parallel: usize,
    },
    /// `--apps` apps × 3 servers + `--services` services × 2 in etcd: confgen's sync and render,
    /// the supervisor's first apply, HAProxy's RSS and open files; `--count` server changes and
    /// new domains one at a time (p50, p99, CPU per change, reloads); a bulk load of `--bulk`
    /// keys until HAProxy runs the last; the RSS of every process. `--pool-headroom`: confgen's
    /// (free pooled backends, % of the apps).
    Scale {
        #[arg(long, default_value_t = 10_000)]
        apps: usize,
        #[arg(long, default_value_t = 500)]
        services: usize,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 15_000)]
        bulk: usize,
        #[arg(long)]
        pool_headroom: Option<u32>,
    },
    /// RSS and CPU of every process of the ambassador with N registered containers, over
    /// `--idle-secs`.
    Idle {
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 300)]
        idle_secs: u64,
    },
    /// The fault sequence under load (etcd frozen past the lease TTL, the etcd leader killed, a
    /// service on a busy port, confgen restarted 10 times, the supervisor killed): per fault,
    /// requests, errors, misroutes and the seconds until the registrations are back.
    Faults,
    /// `--minutes` of registry churn at `--rate` changes a second and a container restarted
    /// every 20 s, under `wrk`: a row a minute of every process's RSS and open files, HAProxy's
    /// processes, etcd's DB size and the bytes logged, then the slopes per hour; fails on any
    /// failed request or a legate process growing over 1 MiB/h in the last half.
    Soak {
        #[arg(long, default_value_t = 120)]
        minutes: u64,
        #[arg(long, default_value_t = 20)]
        rate: u32,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let bench = Bench::parse();
    // The services are built (when their sources changed) before any scenario starts a clock:
    // a first start that builds would otherwise count the build as the service's start-up.
    for service in ["legate-registrar", "legate-confgen", "legate-supervisor"] {
        legate_tests::service::binary(service)?;
    }
    match bench.scenario {
        Scenario::Registrar {
            containers,
            idle_secs,
            foreign_keys,
        } => registrar(containers, Duration::from_secs(idle_secs), foreign_keys).await,
        Scenario::Confgen {
            puts,
            renders,
            apps,
            services,
        } => confgen(puts, renders, apps, services).await,
        Scenario::Supervisor { changes, reloads } => supervisor(changes, reloads).await,
        Scenario::Convergence { count, tls } => pipeline::convergence(count, tls).await,
        Scenario::Docker { count } => pipeline::docker(count).await,
        Scenario::Churn {
            changes,
            reloads,
            secs,
            apps,
        } => scenarios::churn(changes, reloads, Duration::from_secs(secs), apps).await,
        Scenario::Burst { count, parallel } => scenarios::burst(count, parallel).await,
        Scenario::Scale {
            apps,
            services,
            count,
            bulk,
            pool_headroom,
        } => scenarios::scale(apps, services, count, bulk, pool_headroom).await,
        Scenario::Idle { count, idle_secs } => {
            scenarios::idle(count, Duration::from_secs(idle_secs)).await
        }
        Scenario::Faults => faults::faults().await,
        Scenario::Soak { minutes, rate } => soak::soak(minutes, rate).await,
    }
}

/// POSTs `path` to the Docker engine's API on its Unix socket and waits for the answer: a
/// container command without the seconds the `docker` CLI takes to start.
async fn docker_api(path: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect("/var/run/docker.sock").await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split(' ').nth(1).unwrap_or_default();
    if !status.starts_with('2') {
        bail!("POST {path}: {}", answer.lines().next().unwrap_or_default());
    }
    Ok(())
}

/// RSS before and after `idle`, in KiB, and the CPU use over it, of process `pid`.
async fn idle_usage(pid: u32, idle: Duration) -> Result<(u64, u64, f64)> {
    let rss = rss_kib(pid)?;
    let cpu_before = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(idle).await;
    let cpu = cpu_percent(
        cpu_ticks(pid)? - cpu_before,
        started.elapsed().as_secs_f64(),
    );
    Ok((rss, rss_kib(pid)?, cpu))
}

async fn registrar(count: usize, idle: Duration, foreign_keys: usize) -> Result<()> {
    let images = docker::images()?;
    let etcd = Etcd::start().await?;
    let case = format!("bench-{}", docker::run_id());
    let filter = format!("label=legate.test.case={case}");
    let endpoint = etcd.endpoint();
    let mut registrar = Service::start(
        "legate-registrar",
        &["--etcd-endpoints", &endpoint, "--filter", &filter],
        &[
            ("HOST_IP", "127.0.0.1"),
            ("HOST_ID", "bench"),
            ("LEGATE_LOG", "warn"),
        ],
    )?;
    registrar.wait_serving().await?;

    println!("creating {count} containers...");
    let label = format!("legate.test.case={case}");
    let mut created = Vec::with_capacity(count);
    for i in 0..count {
        let domain = format!("DOMAIN_NAME=bench-{i}.example.com");
        let c = Container::create(&[
            "--label",
            &label,
            "-e",
            &domain,
            "-p",
            "127.0.0.1::80",
            &images.http_app,
        ])
        .await?;
        created.push(c);
    }

    let mut client = etcd.client().await?;
    // The watch is read by a task of its own, so that each event is timed when it arrives,
    // not when the benchmark gets round to it (after the Docker call returned).
    let mut watch = client
        .watch("/apps/", Some(WatchOptions::new().with_prefix()))
        .await?;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let watching = tokio::spawn(async move {
        while let Ok(Some(message)) = watch.message().await {
            let at = Instant::now();
            for event in message.events() {
                let Some(kv) = event.kv() else { continue };
                let key = kv.key_str().unwrap_or_default();
                let container = key.split('/').nth(3).unwrap_or_default().to_owned();
                if seen_tx.send((container, event.event_type(), at)).is_err() {
                    return;
                }
            }
        }
    });
    let mut puts: HashMap<String, Instant> = HashMap::new();
    let mut deletes: HashMap<String, Instant> = HashMap::new();
    let mut wait_key =
        async |id: &str, kind: EventType, seen: &mut HashMap<String, Instant>| -> Result<Instant> {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(at) = seen.remove(id) {
                    return Ok(at);
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                let (container, event, at) = tokio::time::timeout(remaining, seen_rx.recv())
                    .await
                    .with_context(|| format!("no etcd event for container {id}"))?
                    .context("watch ended")?;
                if event == kind {
                    seen.insert(container, at);
                }
            }
        };

    let mut idle_figures = None;
    // One round: every container started, then stopped (even) or killed (odd), one at a time.
    // Started through the API (even ones) or the `docker` CLI (odd ones, as an operator does:
    // `docker start` returned is when the CLI exits).
    let mut round = async |foreign: usize| -> Result<[Vec<Duration>; 5]> {
        let (mut issued_key, mut returned_key, mut cli_key) = (Vec::new(), Vec::new(), Vec::new());
        let (mut stopped, mut killed) = (Vec::new(), Vec::new());
        for (i, c) in created.iter().enumerate() {
            let issued = Instant::now();
            if i % 2 == 0 {
                docker_api(&format!("/containers/{}/start", c.id())).await?;
            } else {
                c.command("start").await?;
            }
            let returned = Instant::now();
            let at = wait_key(c.id(), EventType::Put, &mut puts).await?;
            issued_key.push(at - issued);
            let after = at.saturating_duration_since(returned);
            if i % 2 == 0 {
                returned_key.push(after);
            } else {
                cli_key.push(after);
            }
        }
        if foreign == 0 {
            idle_figures = Some(idle_usage(registrar.pid(), idle).await?);
        }
        for (i, c) in created.iter().enumerate() {
            let issued = Instant::now();
            let verb = if i % 2 == 0 { "stop?t=0" } else { "kill" };
            docker_api(&format!("/containers/{}/{verb}", c.id())).await?;
            let at = wait_key(c.id(), EventType::Delete, &mut deletes).await?;
            if i % 2 == 0 {
                stopped.push(at - issued);
            } else {
                killed.push(at - issued);
            }
        }
        Ok([issued_key, returned_key, cli_key, stopped, killed])
    };
    let mut empty = round(0).await?;
    println!("writing {foreign_keys} keys of another host...");
    let kvs: Vec<(String, String)> = (0..foreign_keys)
        .map(|i| {
            (
                format!(
                    "/apps/other-{i}.example.com/{}/10.9.{}.{}:80",
                    container_id(i),
                    i / 250 % 250,
                    i % 250 + 1
                ),
                r#"{"host_id":"another-host"}"#.to_owned(),
            )
        })
        .collect();
    legate_tests::etcd::put_all(&mut client, &kvs).await?;
    let mut crowded = round(foreign_keys).await?;

    println!();
    println!(
        "registrar benchmark: {count} containers, one at a time, etcd and Docker on this host, \
         through the engine's API (no CLI); stop is POST /stop?t=0 (even ones), kill is \
         POST /kill (odd ones); an API call returns once the engine has done it"
    );
    let labels = [
        "start issued    -> key in etcd",
        "start returned  -> key in etcd (API)",
        "docker start returned -> key (CLI)",
        "stop issued     -> key deleted",
        "kill issued     -> key deleted",
    ];
    for (registry, rows) in [
        ("empty registry", &mut empty),
        (
            &*format!("{foreign_keys} keys of another host"),
            &mut crowded,
        ),
    ] {
        println!("{registry}:");
        header();
        for (label, samples) in labels.iter().zip(rows.iter_mut()) {
            report(label, samples);
        }
    }
    println!(
        "ratio of p50, {foreign_keys} foreign keys / empty: start returned -> key {:.2}x, stop -> deleted {:.2}x, kill -> deleted {:.2}x",
        percentile(&mut crowded[1], 0.5).as_secs_f64()
            / percentile(&mut empty[1], 0.5).as_secs_f64().max(1e-6),
        percentile(&mut crowded[3], 0.5).as_secs_f64()
            / percentile(&mut empty[3], 0.5).as_secs_f64().max(1e-6),
        percentile(&mut crowded[4], 0.5).as_secs_f64()
            / percentile(&mut empty[4], 0.5).as_secs_f64().max(1e-6),
    );
    let (rss, rss_after, cpu_percent) = idle_figures.context("no idle figures")?;
    println!(
        "idle with {count} registered: RSS {:.1} MiB (after {:?}: {:.1} MiB), CPU {cpu_percent:.2}% over {:?}",
        rss as f64 / 1024.0,
        idle,
        rss_after as f64 / 1024.0,
        idle
    );
    watching.abort();
    drop(created);
    Ok(())
}

fn container_id(n: usize) -> String {
    format!("{:08x}{n:056x}", (n as u32).wrapping_mul(2_654_435_761))
}

/// Starts confgen on `etcd` with its listeners on `bind`, `env` besides its log level, and one
/// Watch subscriber.
async fn start_confgen(
    etcd: &Etcd,
    bind: std::net::IpAddr,
    env: &[(&str, &str)],
) -> Result<(Service, Snapshots)> {
    let (bind, http) = (bind.to_string(), legate_tests::free_port()?.to_string());
    let mut confgen = Service::start(
        "legate-confgen",
        &[
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--bind-address",
            &bind,
            "--http-port",
            &http,
        ],
        &[&[("LEGATE_LOG", "warn")], env].concat(),
    )?;
    let channel = confgen.channel()?;
    // Subscribe as soon as the API answers, before the first snapshot exists.
    let stream = legate_tests::wait_for("the Confgen API", legate_tests::WAIT, || {
        let channel = channel.clone();
        // As the supervisor subscribes: no model, deltas.
        async move { Ok(Some(Snapshots::subscribe(channel, "bench", true).await?)) }
    })
    .await?;
    confgen.wait_serving().await?;
    Ok((confgen, stream))
}

/// Reads snapshots until one has at least `version`; returns when it arrived.
async fn snapshot_at(
    stream: &mut Snapshots,
    version: u64,
) -> Result<(Instant, v1::ConfigSnapshot)> {
    loop {
        let snapshot = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .with_context(|| format!("no snapshot with version {version} within 60 s"))??
            .context("the Watch stream ended")?;
        if snapshot.version >= version {
            return Ok((Instant::now(), snapshot));
        }
    }
}

/// Latency of `count` puts, one at a time, each to a new app key.
async fn put_latencies(
    client: &mut etcd_client::Client,
    stream: &mut Snapshots,
    count: usize,
    tag: &str,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut issued = Vec::with_capacity(count);
    let mut returned = Vec::with_capacity(count);
    for n in 0..count {
        let key = format!(
            "/apps/{tag}-{n}.example.com/{}/127.0.0.1:80",
            container_id(n)
        );
        let start = Instant::now();
        let response = client.put(key, "", None).await?;
        let done = Instant::now();
        let revision = response.header().context("no header")?.revision();
        let (at, _) = snapshot_at(stream, revision as u64).await?;
        issued.push(at - start);
        returned.push(at.saturating_duration_since(done));
    }
    Ok((issued, returned))
}

/// A large registry: `apps` apps × 3 servers and one service × 2 servers per port of `ports`,
/// all at addresses in 127.0.0.0/8 where nothing listens.
pub(crate) fn registry(apps: usize, ports: &[u16]) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    for a in 0..apps {
        for s in 0..3 {
            let n = a * 3 + s;
            let key = format!(
                "/apps/app-{a}.example.com/{}/127.{}.{}.{}:{}",
                container_id(n),
                s + 1,
                a / 250 % 250,
                a % 250 + 1,
                30000 + s
            );
            ops.push((
                key,
                r#"{"host_id":"bench","container_name":"c"}"#.to_owned(),
            ));
        }
    }
    for (p, port) in ports.iter().enumerate() {
        for s in 0..2 {
            let n = 1_000_000 + p * 2 + s;
            let key = format!(
                "/services/svc-{p}/{port}/{}/127.100.{s}.{}:{}",
                container_id(n),
                p % 250 + 1,
                40000 + p
            );
            ops.push((key, String::new()));
        }
    }
    ops
}

async fn confgen(puts: usize, renders: usize, apps: usize, services: usize) -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let (confgen, mut stream) = start_confgen(&etcd, pipeline::LOCALHOST, &[]).await?;
    snapshot_at(&mut stream, 0).await?;
    let (mut small_issued, mut small_returned) =
        put_latencies(&mut client, &mut stream, puts, "small").await?;
    drop((confgen, stream));
    client
        .delete(
            "/apps/small-",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;

    println!("writing {apps} apps x 3 servers and {services} services x 2 servers...");
    let ports: Vec<u16> = (0..services).map(|p| 10_000 + p as u16).collect();
    let ops = registry(apps, &ports);
    legate_tests::etcd::put_all(&mut client, &ops).await?;
    let revision = client
        .get("x", None)
        .await?
        .header()
        .context("no header")?
        .revision();

    let started = Instant::now();
    let (confgen, mut stream) = start_confgen(&etcd, pipeline::LOCALHOST, &[]).await?;
    let (at, snapshot) = snapshot_at(&mut stream, revision as u64).await?;
    let sync = at - started;
    // Counted in the configuration, since the subscriber gets no model.
    let servers = snapshot
        .haproxy_config
        .lines()
        .filter(|l| l.starts_with("    server "))
        .count();
    let routed = snapshot
        .maps
        .iter()
        .map(|m| m.content.lines().count())
        .sum::<usize>();
    let listeners = snapshot
        .haproxy_config
        .lines()
        .filter(|l| l.starts_with("listen svc_"))
        .count();
    if routed != apps || listeners != services {
        bail!("snapshot routes {routed} apps and has {listeners} service listeners");
    }
    let rss = rss_kib(confgen.pid())?;
    let (mut big_issued, mut big_returned) =
        put_latencies(&mut client, &mut stream, renders, "big").await?;
    let rss_after = rss_kib(confgen.pid())?;

    println!();
    println!(
        "confgen benchmark: etcd, confgen and one Watch subscriber on this host, default --wait"
    );
    header();
    report(
        &format!("empty registry: put issued -> snapshot ({puts})"),
        &mut small_issued,
    );
    report(
        "               put returned -> snapshot",
        &mut small_returned,
    );
    report(
        &format!("{} keys: put issued -> snapshot ({})", ops.len(), renders),
        &mut big_issued,
    );
    report("               put returned -> snapshot", &mut big_returned);
    println!(
        "full sync + render of {apps} apps x 3 + {services} services x 2 ({servers} servers): \
         {:.0} ms from process start to the snapshot received ({:.1} MB of config)",
        sync.as_secs_f64() * 1000.0,
        snapshot.haproxy_config.len() as f64 / 1e6
    );
    println!(
        "confgen RSS: {:.1} MiB after the sync, {:.1} MiB after {} more renders",
        rss as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        renders
    );
    Ok(())
}

/// Applies `changes` runtime changes (a server added, then removed) and `reloads` reloads,
/// returning the latencies of each path as the Apply caller sees them.
async fn churn(
    client: &mut SupervisorClient<tonic::transport::Channel>,
    snapshots: [&v1::ConfigSnapshot; 2],
    changes: usize,
    reloads: usize,
    version: &mut u64,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut runtime = Vec::with_capacity(changes);
    let mut reload = Vec::with_capacity(reloads);
    for i in 0..changes + reloads {
        *version += 1;
        let (mut next, expected, samples) = if i < changes {
            (
                snapshots[i % 2].clone(),
                ApplyOutcome::Runtime,
                &mut runtime,
            )
        } else {
            let forced = with_comment(snapshots[0], &format!("reload {version}"));
            (forced, ApplyOutcome::Reloaded, &mut reload)
        };
        next.version = *version;
        let started = Instant::now();
        let result = client.apply(next).await?.into_inner();
        samples.push(started.elapsed());
        if result.outcome() != expected {
            bail!("expected {expected:?}: {result:?}");
        }
    }
    Ok((runtime, reload))
}

async fn supervisor(changes: usize, reloads: usize) -> Result<()> {
    let b1 = Backend::start("b1", "127.0.0.1:0".parse()?).await?;
    let b2 = Backend::start("b2", "127.0.0.1:0".parse()?).await?;
    let http = legate_tests::free_port()?;
    let supervised = Supervised::new()?;
    let supervisor = supervised.start(None, &[])?;
    let channel = supervisor.connect().await?;
    let mut client = SupervisorClient::new(channel);
    let one = config(http, &[("a.test", &[("s1", b1.addr())])], "");
    let both = config(
        http,
        &[("a.test", &[("s1", b1.addr()), ("s2", b2.addr())])],
        "",
    );
    let mut version = 1;
    let mut first = one.clone();
    first.version = version;
    client.apply(first).await?;

    println!("{changes} runtime applies and {reloads} reloads, no load:");
    header();
    let (mut runtime, mut reload) =
        churn(&mut client, [&both, &one], changes, reloads, &mut version).await?;
    report("Apply, runtime path", &mut runtime);
    report("Apply, reload path", &mut reload);

    // Back to the plain configuration (the last reload left a comment in it).
    version += 1;
    let mut plain = one.clone();
    plain.version = version;
    client.apply(plain).await?;

    let load_for = Duration::from_secs(60);
    println!("\nthe same under wrk for {load_for:?} (keep-alive x8 and Connection: close x4):");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], http));
    let keep_alive = tokio::spawn(load::wrk(addr, "a.test", load_for, 8, false));
    let close = tokio::spawn(load::wrk(addr, "a.test", load_for, 4, true));
    let started = Instant::now();
    let (mut runtime, mut reload) =
        churn(&mut client, [&both, &one], changes, reloads, &mut version).await?;
    let churn_took = started.elapsed();
    report("Apply, runtime path, under load", &mut runtime);
    report("Apply, reload path, under load", &mut reload);
    if keep_alive.is_finished() || close.is_finished() {
        bail!("the churn ({churn_took:?}) outlasted the load: rerun with fewer changes");
    }
    println!("churn took {:.1} s of the load", churn_took.as_secs_f64());
    for (mode, run) in [("keep-alive", keep_alive), ("close", close)] {
        let report = run.await??;
        println!(
            "wrk {mode:<10} requests {:>8}  socket errors {}  non-2xx {}",
            report.requests, report.socket_errors, report.non_2xx
        );
    }
    Ok(())
}

/// The `q` quantile (nearest rank) of `samples`, which it sorts.
fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
}

/// A table row: `label`, then p50, p99 and max of `samples`.
fn row(label: &str, samples: &mut [Duration]) -> String {
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    format!(
        "{label:<44} {:>9} {:>9} {:>9}",
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 0.99)),
        ms(percentile(samples, 1.0))
    )
}

/// The header of a table of [`row`]s.
fn header() {
    println!("{:<44} {:>9} {:>9} {:>9}", "", "p50", "p99", "max");
}

/// CPU use in percent of one core, from clock ticks over `secs` seconds (USER_HZ is 100).
fn cpu_percent(ticks: u64, secs: f64) -> f64 {
    ticks as f64 / 100.0 / secs * 100.0
}

fn report(label: &str, samples: &mut [Duration]) {
    println!("{}", row(label, samples));
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (_, rest) = stat.rsplit_once(") ").context("bad stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}
