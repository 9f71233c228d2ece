//! soak: hours of registry churn under `wrk`, sampling every minute what could grow.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use legate_proto::v1;
use legate_proto::v1::supervisor_client::SupervisorClient;
use legate_tests::ambassador::{Ambassador, Host};
use legate_tests::backend::Backend;
use legate_tests::docker::{self, Container};
use legate_tests::{free_port, http_get, load};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::pipeline::{LOCALHOST, until};
use super::scenarios::{create_apps, start_all};
use super::{container_id, rss_kib};

/// How many domains the churn keeps alive at once: beyond it, each new one replaces the oldest.
const DOMAINS: usize = 200;
/// Revisions etcd keeps, as the compose stack's `--auto-compaction-retention`.
const RETAINED: i64 = 10_000;
/// The largest growth of a legate process's RSS over the last half of the run, per hour.
const MAX_GROWTH_MIB_PER_HOUR: f64 = 1.0;

/// Counts of what the churn did, read by the sampler.
#[derive(Debug, Default)]
struct Done {
    domains_created: AtomicU64,
    domains_deleted: AtomicU64,
    server_changes: AtomicU64,
    service_ports: AtomicU64,
    invalid_keys: AtomicU64,
    container_restarts: AtomicU64,
    /// The etcd revision of the last change made.
    revision: AtomicU64,
}

impl Done {
    fn changes(&self) -> u64 {
        [
            &self.domains_created,
            &self.domains_deleted,
            &self.server_changes,
            &self.service_ports,
            &self.invalid_keys,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// One process watched by the sampler.
struct Watched {
    name: &'static str,
    /// Whether its growth decides the run (legate's own processes).
    ours: bool,
    pids: Vec<u32>,
}

/// One minute's sample.
#[derive(Debug, Clone)]
struct Sample {
    minute: u64,
    requests: u64,
    errors: u64,
    changes: u64,
    /// RSS in KiB and open files, per watched process, in [`Watched`] order.
    rss: Vec<u64>,
    fds: Vec<usize>,
    haproxy_processes: usize,
    etcd_db: i64,
    /// Bytes in each service's log (registrar, confgen, supervisor) and in HAProxy's file.
    log_bytes: [u64; 4],
}

/// The churn mix of a production host for `minutes` under `wrk`: `rate` registry changes a
/// second (a third domains created or deleted, the rest servers of the loaded app coming and
/// going, a service port every 30 s, an invalid key every 10 s), a container of this host
/// restarted every 20 s; every minute a row of RSS, open files, HAProxy processes, etcd's DB
/// and log bytes; at the end each one's slope per hour. Fails if any request failed or a
/// legate process grew by more than [`MAX_GROWTH_MIB_PER_HOUR`] over the last half.
pub(crate) async fn soak(minutes: u64, rate: u32) -> Result<()> {
    let ambassador = Ambassador::start(LOCALHOST).await?;
    let host = ambassador.host(Ipv4Addr::LOCALHOST, 10).await?;
    let containers = create_apps(&host, "soak", 4).await?;
    let result = match start_all(&containers, 4).await {
        Ok(()) => run(&ambassador, &host, &containers, minutes, rate).await,
        Err(e) => Err(e),
    };
    docker::remove_all(containers).await;
    result
}

async fn run(
    ambassador: &Ambassador,
    host: &Host,
    containers: &[Container],
    minutes: u64,
    rate: u32,
) -> Result<()> {
    let mut kv = ambassador.etcd.client().await?;
    let mut backends = Vec::new();
    for i in 0..6 {
        backends.push(Backend::start(&format!("soak-{i}"), (Ipv4Addr::LOCALHOST, 0).into()).await?);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
    for (i, addr) in addrs.iter().take(2).enumerate() {
        let key = format!("/apps/load.test/{}/{addr}", container_id(i));
        kv.put(key, "", None).await?;
    }
    let http = ambassador.http();
    until("load.test", Instant::now(), || async {
        matches!(http_get(http, "load.test", "/").await, Ok((200, _)))
    })
    .await?;
    let channel = ambassador.supervisor.connect().await?;
    let mut supervisor = SupervisorClient::new(channel);
    let before = status(&mut supervisor).await?;

    let done = Arc::new(Done::default());
    let stop = CancellationToken::new();
    let churn = tokio::spawn(churn(
        ambassador.etcd.client().await?,
        addrs,
        rate,
        done.clone(),
        stop.clone(),
    ));
    let restarts = tokio::spawn(restart_containers(
        containers.iter().map(|c| c.id().to_owned()).collect(),
        done.clone(),
        stop.clone(),
    ));
    let watched = [
        Watched {
            name: "registrar",
            ours: true,
            pids: vec![host.registrar.pid()],
        },
        Watched {
            name: "confgen",
            ours: true,
            pids: vec![ambassador.confgen.pid()],
        },
        Watched {
            name: "supervisor",
            ours: true,
            pids: vec![ambassador.supervisor.pid()],
        },
        Watched {
            name: "etcd",
            ours: false,
            pids: vec![ambassador.etcd.pid()],
        },
    ];
    println!();
    println!(
        "soak: {minutes} min of {rate} registry changes/s and a container restart every 20 s under wrk (4 keep-alive connections), one row a minute"
    );
    let names: Vec<&str> = watched.iter().map(|w| w.name).collect();
    println!(
        "{:>4} {:>9} {:>6} {:>7}  RSS MiB {}, HAProxy (all)  fds {}, HAProxy  procs  etcd DB MiB  log KB registrar/confgen/supervisor/haproxy",
        "min",
        "requests",
        "errors",
        "changes",
        names.join("/"),
        names.join("/")
    );
    let started = Instant::now();
    let mut samples = vec![sample(ambassador, host, &watched, &mut kv, 0, 0, 0, &done).await?];
    print_row(&samples[0]);
    let mut failure = None;
    for minute in 1..=minutes {
        let wrk = load::wrk(http, "load.test", Duration::from_secs(60), 4, false).await;
        let (requests, errors) = match wrk {
            Ok(report) => (report.requests, report.socket_errors + report.non_2xx),
            Err(e) => {
                failure = Some(e.context(format!("wrk in minute {minute}")));
                break;
            }
        };
        if churn.is_finished() || restarts.is_finished() {
            break;
        }
        let row = sample(
            ambassador, host, &watched, &mut kv, minute, requests, errors, &done,
        )
        .await?;
        print_row(&row);
        samples.push(row);
    }
    stop.cancel();
    let churned = churn.await?;
    let restarted = restarts.await?;
    let elapsed = started.elapsed();
    if let Some(e) = failure {
        return Err(e);
    }
    churned.context("the registry churn failed")?;
    restarted.context("a container restart failed")?;

    // Every change made is applied before the figures count.
    let last = done.revision.load(Ordering::Relaxed);
    legate_tests::wait_for("the last change to run", legate_tests::WAIT, || {
        let mut supervisor = supervisor.clone();
        async move { Ok((status(&mut supervisor).await?.running_version >= last).then_some(())) }
    })
    .await?;
    let after = status(&mut supervisor).await?;
    summary(&samples, &watched, &done, elapsed, &before, &after)
}

#[allow(clippy::too_many_arguments)]
async fn sample(
    ambassador: &Ambassador,
    host: &Host,
    watched: &[Watched],
    kv: &mut etcd_client::Client,
    minute: u64,
    requests: u64,
    errors: u64,
    done: &Done,
) -> Result<Sample> {
    let haproxy: Vec<u32> = ambassador.supervised().show_proc().await?.pids();
    let mut rss = Vec::new();
    let mut fds = Vec::new();
    for pids in watched.iter().map(|w| &w.pids).chain([&haproxy]) {
        let mut kib = 0;
        let mut files = 0;
        for &pid in pids {
            kib += rss_kib(pid)?;
            files += open_files(pid)?;
        }
        rss.push(kib);
        fds.push(files);
    }
    let status = kv.status().await?;
    // The compose stack's etcd compacts itself (`--auto-compaction-retention`); the harness's
    // does not, so the soak does the same here.
    let revision = status.header().context("no header")?.revision();
    if revision > RETAINED {
        kv.compact(revision - RETAINED, None).await?;
    }
    let haproxy_log = std::fs::metadata(ambassador.supervised().run_dir().join("haproxy.log"))
        .map_or(0, |m| m.len());
    let log_bytes = [
        host.registrar.log().len() as u64,
        ambassador.confgen.log().len() as u64,
        ambassador.supervisor.log().len() as u64,
        haproxy_log,
    ];
    Ok(Sample {
        minute,
        requests,
        errors,
        changes: done.changes(),
        rss,
        fds,
        haproxy_processes: haproxy.len(),
        etcd_db: status.db_size(),
        log_bytes,
    })
}

fn open_files(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("open files of {pid}"))?
        .count())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_row(s: &Sample) {
    let rss: Vec<String> = s.rss.iter().map(|&k| format!("{:.1}", mib(k))).collect();
    let fds: Vec<String> = s.fds.iter().map(ToString::to_string).collect();
    let logs: Vec<String> = s
        .log_bytes
        .iter()
        .map(|&b| format!("{:.0}", b as f64 / 1e3))
        .collect();
    println!(
        "{:>4} {:>9} {:>6} {:>7}  {}  {}  {:>2}  {:>6.1}  {}",
        s.minute,
        s.requests,
        s.errors,
        s.changes,
        rss.join("/"),
        fds.join("/"),
        s.haproxy_processes,
        s.etcd_db as f64 / 1048576.0,
        logs.join("/")
    );
}

/// The least-squares slope of `points` (hours, value) per hour; `None` under two points.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let (mean_x, mean_y) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), p| (x + p.0 / n, y + p.1 / n));
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in points {
        num += (x - mean_x) * (y - mean_y);
        den += (x - mean_x) * (x - mean_x);
    }
    (den > 0.0).then(|| num / den)
}

fn summary(
    samples: &[Sample],
    watched: &[Watched],
    done: &Done,
    elapsed: Duration,
    before: &v1::SupervisorStatus,
    after: &v1::SupervisorStatus,
) -> Result<()> {
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let hours = |s: &Sample| s.minute as f64 / 60.0;
    let requests: u64 = samples.iter().map(|s| s.requests).sum();
    let errors: u64 = samples.iter().map(|s| s.errors).sum();
    let rejected = after.rejected - before.rejected;
    println!();
    println!(
        "{:.0} min: {requests} requests, {errors} errors; {} changes ({} domains created, {} deleted, {} server changes, {} service ports, {} invalid keys), {} container restarts",
        elapsed.as_secs_f64() / 60.0,
        done.changes(),
        count(&done.domains_created),
        count(&done.domains_deleted),
        count(&done.server_changes),
        count(&done.service_ports),
        count(&done.invalid_keys),
        count(&done.container_restarts),
    );
    println!(
        "supervisor: {} runtime applies, {} reloads, {rejected} rejected",
        after.runtime_applies - before.runtime_applies,
        after.reloads - before.reloads,
    );
    let last_half: Vec<&Sample> = samples
        .iter()
        .filter(|s| 2 * s.minute >= samples.last().map_or(0, |l| l.minute))
        .collect();
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>14} {:>16}",
        "RSS (MiB)", "start", "end", "max", "slope/h (all)", "slope/h (2nd half)"
    );
    let mut grew = Vec::new();
    let names = watched
        .iter()
        .map(|w| (w.name, w.ours))
        .chain([("HAProxy (all)", false)]);
    for (i, (name, ours)) in names.enumerate() {
        let all: Vec<(f64, f64)> = samples.iter().map(|s| (hours(s), mib(s.rss[i]))).collect();
        let half: Vec<(f64, f64)> = last_half
            .iter()
            .map(|s| (hours(s), mib(s.rss[i])))
            .collect();
        let max = all.iter().map(|p| p.1).fold(0.0, f64::max);
        let fmt = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:+.2}"));
        let late = slope(&half);
        println!(
            "{name:<22} {:>9.1} {:>9.1} {max:>9.1} {:>14} {:>16}",
            all[0].1,
            all[all.len() - 1].1,
            fmt(slope(&all)),
            fmt(late)
        );
        if ours && late.is_some_and(|s| s > MAX_GROWTH_MIB_PER_HOUR) {
            grew.push(name);
        }
    }
    let first = &samples[0];
    let end = &samples[samples.len() - 1];
    let fds = |s: &Sample| {
        s.fds
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("/")
    };
    let most = samples
        .iter()
        .map(|s| s.haproxy_processes)
        .max()
        .unwrap_or(0);
    println!(
        "open files start {} end {}; HAProxy processes at most {most}, at the end {}",
        fds(first),
        fds(end),
        end.haproxy_processes
    );
    println!(
        "etcd DB: {:.1} MiB -> {:.1} MiB (compacted to the last {RETAINED} revisions each minute)",
        first.etcd_db as f64 / 1048576.0,
        end.etcd_db as f64 / 1048576.0
    );
    let run_hours = elapsed.as_secs_f64() / 3600.0;
    let per_hour: Vec<String> = ["registrar", "confgen", "supervisor"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let written = end.log_bytes[i].saturating_sub(first.log_bytes[i]);
            format!("{name} {:.2} MB/h", written as f64 / 1e6 / run_hours)
        })
        .collect();
    println!(
        "log volume: {}; HAProxy's file {:.0} KB at the end",
        per_hour.join(", "),
        end.log_bytes[3] as f64 / 1e3
    );
    if errors > 0 || rejected > 0 {
        bail!("{errors} failed requests and {rejected} rejected configurations during the soak");
    }
    if !grew.is_empty() {
        bail!(
            "RSS grew by more than {MAX_GROWTH_MIB_PER_HOUR} MiB/h over the last half: {}",
            grew.join(", ")
        );
    }
    Ok(())
}

async fn status(client: &mut SupervisorClient<Channel>) -> Result<v1::SupervisorStatus> {
    Ok(client
        .status(v1::SupervisorStatusRequest::default())
        .await?
        .into_inner())
}

/// The registry churn at `rate` changes a second until `stop`.
async fn churn(
    mut kv: etcd_client::Client,
    backends: Vec<SocketAddr>,
    rate: u32,
    done: Arc<Done>,
    stop: CancellationToken,
) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut domains = VecDeque::new();
    let mut ports = VecDeque::new();
    let mut invalid: Option<String> = None;
    // Servers of load.test beyond its two stable ones: backends 2.. present or not.
    let mut present = [false; 4];
    let mut next = 0usize;
    let mut n = 0u64;
    loop {
        n += 1;
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let revision = if n % 600 == 599 {
            done.service_ports.fetch_add(1, Ordering::Relaxed);
            if ports.len() < 3 {
                let key = format!(
                    "/services/soak-{n}/{}/{}/{}",
                    free_port()?,
                    container_id(n as usize),
                    backends[0]
                );
                let revision = kv
                    .put(key.clone(), "", None)
                    .await?
                    .header()
                    .map(|h| h.revision());
                ports.push_back(key);
                revision
            } else {
                let key = ports.pop_front().context("no port")?;
                kv.delete(key, None).await?.header().map(|h| h.revision())
            }
        } else if n % 200 == 199 {
            done.invalid_keys.fetch_add(1, Ordering::Relaxed);
            if let Some(key) = invalid.take() {
                kv.delete(key, None).await?;
            }
            let key = match n / 200 % 3 {
                0 => format!("/apps/bad-{n}.test/{}/127.0.0.1:http", container_id(0)),
                1 => format!("/services/bad-{n}/port/{}/127.0.0.1:1", container_id(0)),
                _ => format!("/apps/bad {n}!/{}/127.0.0.1:1", container_id(0)),
            };
            let revision = kv
                .put(key.clone(), "", None)
                .await?
                .header()
                .map(|h| h.revision());
            invalid = Some(key);
            revision
        } else if n.is_multiple_of(3) {
            if domains.len() >= DOMAINS {
                done.domains_deleted.fetch_add(1, Ordering::Relaxed);
                let prefix: String = domains.pop_front().context("no domain")?;
                let options = etcd_client::DeleteOptions::new().with_prefix();
                kv.delete(prefix, Some(options))
                    .await?
                    .header()
                    .map(|h| h.revision())
            } else {
                done.domains_created.fetch_add(1, Ordering::Relaxed);
                let backend = backends[2 + next % 4];
                let key = format!("/apps/soak-{next}.test/{}/{backend}", container_id(next));
                domains.push_back(format!("/apps/soak-{next}.test/"));
                next += 1;
                kv.put(key, "", None).await?.header().map(|h| h.revision())
            }
        } else {
            done.server_changes.fetch_add(1, Ordering::Relaxed);
            let k = (n / 3 % 4) as usize;
            let key = format!(
                "/apps/load.test/{}/{}",
                container_id(100 + k),
                backends[2 + k]
            );
            present[k] = !present[k];
            if present[k] {
                kv.put(key, "", None).await?.header().map(|h| h.revision())
            } else {
                kv.delete(key, None).await?.header().map(|h| h.revision())
            }
        };
        let revision = u64::try_from(revision.context("no response header")?)?;
        done.revision.fetch_max(revision, Ordering::Relaxed);
    }
}

/// Restarts the host's containers in turn, one every 20 s, until `stop`.
async fn restart_containers(
    ids: Vec<String>,
    done: Arc<Done>,
    stop: CancellationToken,
) -> Result<()> {
    for id in ids.iter().cycle() {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(20)) => {}
        }
        docker::docker(&["restart", "--time", "2", id]).await?;
        done.container_restarts.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
