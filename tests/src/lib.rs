//! The test harness of legate: real components for integration and end-to-end tests.
//!
//! - [`etcd::Etcd`]: a real etcd (Debian's `etcd-server`) on free loopback ports, temp data dir;
//! - [`haproxy::Haproxy`]: a real HAProxy in master-worker mode on free ports;
//! - [`docker`]: the test images, built locally once, and containers and networks removed when
//!   their guard drops, pass or fail;
//! - [`backend::Backend`]: a fast HTTP backend for load tests, in-process or as the
//!   `legate-backend` binary;
//! - [`service::Service`]: legate's own binaries run as processes;
//! - [`confgen::Snapshots`]: a `Confgen.Watch` subscriber that rebuilds deltas as the
//!   supervisor does;
//! - [`proxy::Proxy`]: a TCP proxy whose connections a test cuts, to lose a stream on purpose;
//! - [`supervisor::Supervised`]: a supervisor's directories, and the HAProxy it leaves behind
//!   killed at the end;
//! - [`pki::Pki`]: a certificate authority made for one test, and certificates it signs;
//! - [`load`]: bounded HTTP load with `wrk`, to loopback only;
//! - [`ambassador::Ambassador`]: etcd, confgen and a supervisor together, with registrars for
//!   "hosts" sharing this engine.
//!
//! Every process is started in its own process group and killed, with its group, when its guard
//! drops; every wait has a timeout and says what it waited for.

pub mod ambassador;
pub mod backend;
pub mod confgen;
pub mod docker;
pub mod etcd;
pub mod haproxy;
pub mod load;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod service;
pub mod supervisor;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Generous default for waits in tests: behaviour, not speed, is what tests check.
pub const WAIT: Duration = Duration::from_secs(30);

/// The repository's root directory.
pub fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_owned)
        .unwrap_or_default()
}

/// A program's path, found in `PATH`.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// A loopback port that is free now, for a process the test starts to bind.
///
/// Taken below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, 32768-60999 by
/// default), from which every outgoing connection and every `bind(0)` gets its port: a port
/// found free in that range can be taken by one of them before its user binds it. Below it,
/// only another listener can take it: each port is handed out once per test process, from a
/// starting point that differs between processes, and checked free by binding it.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral > FIRST + 1000 {
        let span = ephemeral - FIRST;
        let start = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..1000 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = u16::try_from(FIRST + (start + n) % span)?;
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A loopback address with a free port.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
}

/// Whether `pid` is a live process (a zombie waiting for its reaper does not count).
pub fn process_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
    // The state follows the parenthesised command name.
    stat.is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Polls `check` until it returns `Ok(Some(_))`, failing after `timeout` with the last error
/// and `what` was being waited for.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    let mut pause = Duration::from_millis(10);
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Sends one HTTP/1.1 GET with the given Host header and `Connection: close`; returns the
/// status code and the body.
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .with_context(|| format!("reading the response from {addr}"))??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response from {addr}: {response:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line from {addr}: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Connects to a TCP service and reads its first line.
pub async fn tcp_banner(addr: SocketAddr) -> Result<String> {
    use tokio::io::AsyncBufReadExt;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stream);
    tokio::time::timeout(WAIT, reader.read_line(&mut line))
        .await
        .with_context(|| format!("reading a line from {addr}"))??;
    Ok(line.trim_end().to_owned())
}
