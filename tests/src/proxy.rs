//! A TCP proxy whose connections a test can cut, to provoke what a restarting or unreachable
//! server does to its clients (a lost Docker event stream, a watch cut off from etcd) while
//! the server itself keeps running.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::task::{AbortHandle, JoinHandle};

/// Where a [`Proxy`] forwards to.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket, such as `/var/run/docker.sock`.
    Unix(PathBuf),
}

/// Copies bytes both ways between `client` and a new connection to `upstream`.
async fn forward<C>(mut client: C, upstream: Upstream) -> std::io::Result<(u64, u64)>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match upstream {
        Upstream::Tcp(addr) => {
            let mut server = tokio::net::TcpStream::connect(addr).await?;
            tokio::io::copy_bidirectional(&mut client, &mut server).await
        }
        Upstream::Unix(path) => {
            let mut server = tokio::net::UnixStream::connect(path).await?;
            tokio::io::copy_bidirectional(&mut client, &mut server).await
        }
    }
}

/// A proxy listening on a free loopback port; stops, with its connections, when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    paused: AtomicBool,
    connections: Mutex<Vec<AbortHandle>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: Upstream) -> Result<Self> {
        Self::start_with(upstream, None).await
    }

    /// Like [`Proxy::start`], with TLS on the listening side (`tls`): the upstream sees plain
    /// bytes, as behind an engine's own TLS.
    pub async fn start_tls(
        upstream: Upstream,
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
    ) -> Result<Self> {
        Self::start_with(upstream, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(
        upstream: Upstream,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if shared.paused.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let upstream = upstream.clone();
                let tls = tls.clone();
                let handle = tokio::spawn(async move {
                    let _ = match tls {
                        // A handshake that fails (no or a bad client certificate) ends here.
                        Some(tls) => match tls.accept(client).await {
                            Ok(client) => forward(client, upstream).await,
                            Err(e) => Err(e),
                        },
                        None => forward(client, upstream).await,
                    };
                });
                let mut connections = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
                connections.retain(|c| !c.is_finished());
                connections.push(handle.abort_handle());
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every connection and refuses new ones until [`Proxy::resume`].
    pub fn cut(&self) {
        self.state.paused.store(true, Ordering::SeqCst);
        let mut connections = self
            .state
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for connection in connections.drain(..) {
            connection.abort();
        }
    }

    /// Accepts connections again.
    pub fn resume(&self) {
        self.state.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
