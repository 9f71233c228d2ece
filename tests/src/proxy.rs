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
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if shared.paused.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let upstream = upstream.clone();
                let handle = tokio::spawn(async move {
                    let _ = match upstream {
                        Upstream::Tcp(addr) => match tokio::net::TcpStream::connect(addr).await {
                            Ok(mut server) => {
                                tokio::io::copy_bidirectional(&mut client, &mut server).await
                            }
                            Err(e) => Err(e),
                        },
                        Upstream::Unix(path) => match tokio::net::UnixStream::connect(path).await {
                            Ok(mut server) => {
                                tokio::io::copy_bidirectional(&mut client, &mut server).await
                            }
                            Err(e) => Err(e),
                        },
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
