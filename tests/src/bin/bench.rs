//! `bench`: legate's benchmarks against real etcd, Docker and HAProxy on this host.
//!
//! `cargo run --release -p legate-tests --bin bench -- registrar [--containers N] [--idle-secs S]`
//!
//! registrar: Docker start → key visible in etcd and stop → key deleted, for N containers
//! started and stopped one by one (p50/p99/max), then the registrar's RSS and CPU while idle
//! with N registered containers. Every container is created by the benchmark and removed at
//! the end; traffic stays on loopback.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{EventType, WatchOptions};
use legate_tests::docker::{self, Container};
use legate_tests::etcd::Etcd;
use legate_tests::service::Service;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_default();
    let mut containers = 100usize;
    let mut idle_secs = 30u64;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--containers" => containers = args.next().context("--containers N")?.parse()?,
            "--idle-secs" => idle_secs = args.next().context("--idle-secs S")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    match scenario.as_str() {
        "registrar" => registrar(containers, Duration::from_secs(idle_secs)).await,
        _ => bail!("usage: bench registrar [--containers N] [--idle-secs S]"),
    }
}

async fn registrar(count: usize, idle: Duration) -> Result<()> {
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
    let mut watch = client
        .watch("/apps/", Some(WatchOptions::new().with_prefix()))
        .await?;
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
                let message = tokio::time::timeout(remaining, watch.message())
                    .await
                    .with_context(|| format!("no etcd event for container {id}"))??
                    .context("watch ended")?;
                let at = Instant::now();
                for event in message.events() {
                    let Some(kv) = event.kv() else { continue };
                    let key = kv.key_str().unwrap_or_default();
                    let container = key.split('/').nth(3).unwrap_or_default().to_owned();
                    if event.event_type() == kind {
                        seen.insert(container, at);
                    }
                }
            }
        };

    let mut start_issued = Vec::new();
    let mut start_returned = Vec::new();
    for c in &created {
        let issued = Instant::now();
        c.command("start").await?;
        let returned = Instant::now();
        let at = wait_key(c.id(), EventType::Put, &mut puts).await?;
        start_issued.push(at - issued);
        start_returned.push(at.saturating_duration_since(returned));
    }

    let rss = rss_kib(registrar.pid())?;
    let cpu_before = cpu_ticks(registrar.pid())?;
    let idle_started = Instant::now();
    tokio::time::sleep(idle).await;
    let cpu_after = cpu_ticks(registrar.pid())?;
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpu_percent =
        (cpu_after - cpu_before) as f64 / ticks_per_sec / idle_started.elapsed().as_secs_f64()
            * 100.0;
    let rss_after = rss_kib(registrar.pid())?;

    let mut stop_issued = Vec::new();
    let mut stop_returned = Vec::new();
    for c in &created {
        let issued = Instant::now();
        docker::docker(&["stop", "-t", "0", c.id()]).await?;
        let returned = Instant::now();
        let at = wait_key(c.id(), EventType::Delete, &mut deletes).await?;
        stop_issued.push(at - issued);
        stop_returned.push(at.saturating_duration_since(returned));
    }

    println!();
    println!(
        "registrar benchmark: {count} containers, one at a time, etcd and Docker on this host"
    );
    println!("{:<44} {:>9} {:>9} {:>9}", "", "p50", "p99", "max");
    report("docker start issued   -> key in etcd", &mut start_issued);
    report("docker start returned -> key in etcd", &mut start_returned);
    report("docker stop issued    -> key deleted", &mut stop_issued);
    report("docker stop returned  -> key deleted", &mut stop_returned);
    println!(
        "idle with {count} registered: RSS {:.1} MiB (after {:?}: {:.1} MiB), CPU {cpu_percent:.2}% over {:?}",
        rss as f64 / 1024.0,
        idle,
        rss_after as f64 / 1024.0,
        idle
    );
    drop(created);
    Ok(())
}

fn report(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!(
        "{label:<44} {:>9} {:>9} {:>9}",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(at(1.0))
    );
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
