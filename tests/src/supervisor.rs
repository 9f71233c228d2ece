//! `legate-supervisor` with its state and run directories, and the HAProxy it runs.
//!
//! The supervisor leaves HAProxy running when it stops (a new supervisor adopts it), so the
//! fixture kills HAProxy's process group, found through its pidfile, when it drops.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tempfile::TempDir;

use legate_proto::v1;
use legate_supervisor::haproxy::Procs;

use crate::haproxy;
use crate::service::Service;

/// The directories one supervisor (and its successors) use.
#[derive(Debug)]
pub struct Supervised {
    dir: TempDir,
}

impl Supervised {
    /// Fresh, empty directories.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("legate-supervisor-")
            .tempdir()?;
        Ok(Self { dir })
    }

    /// Starts a supervisor on these directories, subscribed to `confgen` if given (otherwise
    /// it takes snapshots from `Supervisor.Apply` only), with HAProxy's traffic log off unless
    /// `args` set `--haproxy-log`.
    pub fn start(&self, confgen: Option<&str>, args: &[&str]) -> Result<Service> {
        let state = self.dir.path().join("state");
        let run = self.dir.path().join("run");
        let haproxy = haproxy::binary();
        let mut all = vec![
            "--state-dir",
            state.to_str().context("state dir")?,
            "--run-dir",
            run.to_str().context("run dir")?,
            "--haproxy",
            haproxy.to_str().context("haproxy path")?,
            "--node-id",
            "node-a",
            "--confgen",
            confgen.unwrap_or("none"),
        ];
        if !args.contains(&"--haproxy-log") {
            all.extend_from_slice(&["--haproxy-log", "none"]);
        }
        all.extend_from_slice(args);
        Service::start("legate-supervisor", &all, &[])
    }

    /// The HAProxy master's pid from its pidfile.
    pub fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.run_dir().join("haproxy.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The run directory (sockets, pidfile, HAProxy's log).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The state directory (global file, live and staged files).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A command on HAProxy's master CLI.
    pub async fn master(&self, command: &str) -> Result<String> {
        haproxy::cli(&self.run_dir().join("master.sock"), command).await
    }

    /// A command on HAProxy's admin socket (runtime API).
    pub async fn admin(&self, command: &str) -> Result<String> {
        haproxy::cli(&self.run_dir().join("admin.sock"), command).await
    }

    /// The master's `show proc`. The master CLI refuses connections for a moment while the
    /// master re-executes itself during a reload: asked again until it answers (within `WAIT`).
    pub async fn show_proc(&self) -> Result<Procs> {
        let started = std::time::Instant::now();
        loop {
            match self.master("show proc").await {
                Ok(text) => return Ok(Procs::parse(&text)),
                Err(e) if started.elapsed() > crate::WAIT => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
            }
        }
    }

    /// The master's reload counter.
    pub async fn reloads(&self) -> Result<u64> {
        self.show_proc()
            .await?
            .master
            .map(|m| m.reloads)
            .context("show proc lists no master")
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(pid) = self.master_pid().and_then(|pid| i32::try_from(pid).ok()) {
            // HAProxy runs in its own process group, led by the master.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A hand-made snapshot (version 0): an HTTP frontend on `http` that routes by Host through
/// `hosts.map` to one backend per app, plus `extra` sections.
pub fn config(
    http: u16,
    apps: &[(&str, &[(&str, SocketAddr)])],
    extra: &str,
) -> v1::ConfigSnapshot {
    let mut text = format!(
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n\
         \x20   timeout server 30s\n    timeout http-keep-alive 10s\n    retries 2\n\
         \x20   option redispatch\n    default-server inter 1s fall 3 rise 2\n\
         \x20   load-server-state-from-file global\n\n\
         frontend http\n    bind 127.0.0.1:{http}\n    option idle-close-on-response\n\
         \x20   use_backend %[req.hdr(host),field(1,:),lower,map(hosts.map)]\n\
         \x20   default_backend no_route\n\n\
         backend no_route\n    http-request return status 503\n"
    );
    let mut hosts = String::new();
    for (domain, servers) in apps {
        text.push_str(&format!("\nbackend app_{domain}\n    balance roundrobin\n"));
        for (name, addr) in *servers {
            text.push_str(&format!("    server {name} {addr} weight 100 check\n"));
        }
        hosts.push_str(&format!("{domain} app_{domain}\n"));
    }
    text.push_str(extra);
    snapshot(text, &[("hosts.map", &hosts)])
}

/// A snapshot of `config` and `maps` (name, content), its checksum computed.
pub fn snapshot(config: String, maps: &[(&str, &str)]) -> v1::ConfigSnapshot {
    let maps: Vec<v1::ConfigFile> = maps
        .iter()
        .map(|(name, content)| v1::ConfigFile {
            name: (*name).to_owned(),
            content: (*content).to_owned(),
        })
        .collect();
    v1::ConfigSnapshot {
        version: 0,
        checksum: legate_proto::checksum(&config, &maps),
        haproxy_config: config,
        maps,
        model: None,
        generator: "test".to_owned(),
        delta: None,
    }
}

/// `snapshot` with a comment appended: a change beyond servers, so applying it reloads.
pub fn with_comment(snapshot: &v1::ConfigSnapshot, comment: &str) -> v1::ConfigSnapshot {
    let mut changed = snapshot.clone();
    changed.haproxy_config.push_str(&format!("# {comment}\n"));
    changed.checksum = legate_proto::checksum(&changed.haproxy_config, &changed.maps);
    changed
}
