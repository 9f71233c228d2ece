//! A real etcd (Debian's `etcd-server`) on free loopback ports with a temporary data directory.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::process::ChildGuard;
use crate::{WAIT, free_port, wait_for};

/// A single-node etcd; killed and its data removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Option<ChildGuard>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("legate-etcd-").tempdir()?;
        let mut etcd = Self {
            child: None,
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
        };
        etcd.spawn().await?;
        Ok(etcd)
    }

    async fn spawn(&mut self) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        command
            .arg("--name=legate-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=legate-test={peer}"))
            .arg("--logger=zap")
            .arg("--log-level=warn");
        let log = self.dir.path().join("etcd.log");
        self.child = Some(ChildGuard::spawn("etcd", command, &log)?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let endpoint = self.endpoint();
        let child = self.child.as_mut().context("etcd is not running")?;
        wait_for("etcd to answer", WAIT, || {
            let running = child.check_running();
            let endpoint = endpoint.clone();
            async move {
                running?;
                let options = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(1))
                    .with_timeout(Duration::from_secs(1));
                let mut client = etcd_client::Client::connect([endpoint], Some(options)).await?;
                client.status().await?;
                Ok(Some(()))
            }
        })
        .await
    }

    /// The client URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A connected client.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .context("connecting to etcd")
    }

    /// The process id, 0 when stopped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    /// Freezes etcd with SIGSTOP: its sockets stay open and the kernel still accepts
    /// connections, but nothing answers, as across a network partition. Its own clock runs on:
    /// leases whose TTL passes meanwhile expire the moment it is thawed.
    pub fn freeze(&self) -> Result<()> {
        self.child
            .as_ref()
            .context("etcd is not running")?
            .signal(nix::sys::signal::Signal::SIGSTOP)
    }

    /// Thaws etcd frozen by [`Etcd::freeze`] (SIGCONT).
    pub fn thaw(&self) -> Result<()> {
        self.child
            .as_ref()
            .context("etcd is not running")?
            .signal(nix::sys::signal::Signal::SIGCONT)
    }

    /// Kills etcd with SIGKILL, keeping its data (an outage).
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Starts etcd again on the same ports with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// The temporary directory holding the data and the log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Puts `kvs` in transactions of at most 100 operations (etcd's default limit is 128).
pub async fn put_all(client: &mut etcd_client::Client, kvs: &[(String, String)]) -> Result<()> {
    for chunk in kvs.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|(k, v)| etcd_client::TxnOp::put(k.as_str(), v.as_str(), None))
            .collect();
        client.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    Ok(())
}
