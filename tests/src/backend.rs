//! A fast HTTP/1.1 backend for load tests: answers every request with 200 and its name, keeps
//! connections alive unless asked not to, and counts what it served. Runs in-process
//! ([`Backend::start`]) or as the `legate-backend` binary.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// An in-process backend; stops, with its connections, when dropped.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Listens on `listen` (port 0 for any) and serves until dropped.
    pub async fn start(name: &str, listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(listener, name.to_owned(), requests.clone()));
        Ok(Self {
            addr,
            requests,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections on `listener` forever; every response body is `name` and a newline.
/// Connections are owned by this future: dropping or aborting it closes them.
pub async fn serve(listener: TcpListener, name: String, requests: Arc<AtomicU64>) {
    let body = Bytes::from(format!("{name}\n"));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let (body, name, requests) = (body.clone(), name.clone(), requests.clone());
                connections.spawn(async move {
                    let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
                        requests.fetch_add(1, Ordering::Relaxed);
                        let response = Response::builder()
                            .header("content-type", "text/plain")
                            .header("x-backend", name.as_str())
                            .body(Full::new(body.clone()));
                        async move { Ok::<_, Infallible>(response.unwrap_or_default()) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
