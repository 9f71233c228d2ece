//! A real etcd (Debian's `etcd-server`) on free loopback ports with a temporary data directory.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::pki::{Issued, Pki};
use crate::process::ChildGuard;
use crate::{WAIT, free_port};

/// The root user's password once [`Etcd::enable_auth`] ran.
const ROOT_PASSWORD: &str = "root-secret";

/// Starts of etcd on free ports: a port found free can be taken by another process before
/// etcd binds it; etcd then exits at once and is started again on other ports.
const START_ATTEMPTS: usize = 3;

/// One etcd member (a single-node etcd, or a member of a [`Cluster`]); killed and its data
/// removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Option<ChildGuard>,
    dir: TempDir,
    name: String,
    client_port: u16,
    peer_port: u16,
    /// `--initial-cluster`: every member's `name=peer-url`.
    initial_cluster: String,
    /// With TLS: its certificate, which the harness's own clients present too.
    tls: Option<Issued>,
    /// Whether authentication is on: the harness's clients are root.
    auth: bool,
}

impl Etcd {
    /// Starts a single-node etcd and waits until it answers.
    pub async fn start() -> Result<Self> {
        Self::start_single(None, &mut free_port).await
    }

    /// [`Etcd::start`] on the ports `ports` gives, one call per port, until etcd can bind them.
    pub async fn start_on(ports: &mut impl FnMut() -> Result<u16>) -> Result<Self> {
        Self::start_single(None, ports).await
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// Starts a single-node etcd that speaks only TLS and wants a client certificate signed by
    /// `pki` (`--client-cert-auth --trusted-ca-file`).
    pub async fn start_tls(pki: &Pki) -> Result<Self> {
        Self::start_single(Some(pki), &mut free_port).await
    }

    async fn start_single(
        pki: Option<&Pki>,
        ports: &mut impl FnMut() -> Result<u16>,
    ) -> Result<Self> {
        let mut attempt = 1;
        loop {
            let mut etcd = Self::new("legate-test", ports)?;
            etcd.initial_cluster = format!("{}={}", etcd.name, etcd.peer_url());
            if let Some(pki) = pki {
                etcd.tls = Some(pki.issue(&["127.0.0.1", "localhost"])?);
            }
            etcd.spawn()?;
            match etcd.wait_ready().await {
                Err(_) if attempt < START_ATTEMPTS && etcd.lost_a_port() => attempt += 1,
                ready => return ready.map(|()| etcd),
            }
        }
    }

    /// Whether etcd exited because one of its ports was taken meanwhile.
    fn lost_a_port(&self) -> bool {
        self.child
            .as_ref()
            .is_some_and(|child| child.log().contains("address already in use"))
    }

    /// Turns etcd's authentication on, with a root user for the harness and, for each of
    /// `users` (name, password, role), a user with that role; `roles` are (name, permission).
    pub async fn enable_auth(
        &mut self,
        roles: &[(&str, etcd_client::Permission)],
        users: &[(&str, &str, &str)],
    ) -> Result<()> {
        let mut client = self.client().await?;
        for (role, permission) in roles {
            client.role_add(*role).await?;
            client
                .role_grant_permission(*role, permission.clone())
                .await?;
        }
        for (user, password, role) in users {
            client.user_add(*user, *password, None).await?;
            client.user_grant_role(*user, *role).await?;
        }
        client.user_add("root", ROOT_PASSWORD, None).await?;
        client.role_add("root").await?;
        client.user_grant_role("root", "root").await?;
        client.auth_enable().await?;
        self.auth = true;
        Ok(())
    }

    /// The options of the harness's own clients: its TLS identity, root once auth is on.
    fn options(&self) -> etcd_client::ConnectOptions {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            let read = |path: &std::path::Path| std::fs::read(path).unwrap_or_default();
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
                    .identity(etcd_client::Identity::from_pem(
                        read(&tls.cert),
                        read(&tls.key),
                    )),
            );
        }
        if self.auth {
            options = options.with_user("root", ROOT_PASSWORD);
        }
        options
    }

    fn new(name: &str, ports: &mut impl FnMut() -> Result<u16>) -> Result<Self> {
        Ok(Self {
            child: None,
            dir: tempfile::Builder::new().prefix("legate-etcd-").tempdir()?,
            name: name.to_owned(),
            client_port: ports()?,
            peer_port: ports()?,
            initial_cluster: String::new(),
            tls: None,
            auth: false,
        })
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn spawn(&mut self) -> Result<()> {
        let client = self.endpoint();
        let peer = self.peer_url();
        let mut command = Command::new("etcd");
        command
            .arg(format!("--name={}", self.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-token=legate-test")
            .arg("--logger=zap")
            .arg("--log-level=warn");
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg("--client-cert-auth");
        }
        let log = self.dir.path().join("etcd.log");
        self.child = Some(ChildGuard::spawn("etcd", &command, &log)?);
        Ok(())
    }

    /// Waits until etcd answers; fails at once if it exits.
    async fn wait_ready(&mut self) -> Result<()> {
        let endpoint = self.endpoint();
        let options = self.options().with_timeout(Duration::from_secs(1));
        let child = self.child.as_mut().context("etcd is not running")?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            child.check_running()?;
            let answer = async {
                let mut client =
                    etcd_client::Client::connect([endpoint.as_str()], Some(options.clone()))
                        .await?;
                client.status().await
            };
            match answer.await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e).context(format!("etcd did not answer within {WAIT:?}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:41234` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client address, e.g. `127.0.0.1:41234`.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// A connected client.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        etcd_client::Client::connect([self.endpoint()], Some(self.options()))
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
        self.spawn()?;
        self.wait_ready().await
    }

    /// Whether this member is its cluster's leader.
    pub async fn is_leader(&self) -> Result<bool> {
        let status = self.client().await?.status().await?;
        Ok(status.leader() == status.header().map_or(0, |h| h.member_id()))
    }

    /// The temporary directory holding the data and the log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// An etcd cluster of several members on loopback, for faults a single node cannot show: a
/// member lost, the leader killed.
#[derive(Debug)]
pub struct Cluster {
    /// The members, in the order of [`Cluster::endpoints`].
    pub members: Vec<Etcd>,
}

impl Cluster {
    /// Starts `size` members and waits until each answers (which takes a quorum).
    /// A member whose port was taken meanwhile starts the whole cluster again on other ports.
    pub async fn start(size: usize) -> Result<Self> {
        let mut attempt = 1;
        loop {
            let mut members = (0..size)
                .map(|i| Etcd::new(&format!("legate-test-{i}"), &mut free_port))
                .collect::<Result<Vec<_>>>()?;
            let initial: Vec<String> = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url()))
                .collect();
            for member in &mut members {
                member.initial_cluster = initial.join(",");
                member.spawn()?;
            }
            let mut ready = Ok(());
            for member in &mut members {
                ready = member.wait_ready().await;
                if ready.is_err() {
                    break;
                }
            }
            match ready {
                Err(_) if attempt < START_ATTEMPTS && members.iter().any(Etcd::lost_a_port) => {
                    attempt += 1;
                }
                ready => return ready.map(|()| Self { members }),
            }
        }
    }

    /// Every member's client URL, comma-separated, as `--etcd-endpoints` takes them.
    pub fn endpoints(&self) -> String {
        let urls: Vec<String> = self.members.iter().map(Etcd::endpoint).collect();
        urls.join(",")
    }

    /// The index of the current leader.
    pub async fn leader(&self) -> Result<usize> {
        for (i, member) in self.members.iter().enumerate() {
            if member.child.is_some() && member.is_leader().await.unwrap_or(false) {
                return Ok(i);
            }
        }
        anyhow::bail!("no member is the leader")
    }

    /// A client of the whole cluster (every member's endpoint).
    pub async fn client(&self) -> Result<etcd_client::Client> {
        let urls: Vec<String> = self.members.iter().map(Etcd::endpoint).collect();
        etcd_client::Client::connect(urls, None)
            .await
            .context("connecting to the etcd cluster")
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
