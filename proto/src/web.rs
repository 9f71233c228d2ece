//! The HTTP listener of every service (`--metrics-listen`): Prometheus metrics at `/metrics`,
//! and whatever the service adds through [`serve`] (the supervisor: its per-route traffic
//! series and the status page). Read-only: `GET` and `HEAD` only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tracing::debug;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request head within this time.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the recorder's histograms are maintained.
const UPKEEP: Duration = Duration::from_secs(5);

/// A response body and its type.
#[derive(Debug, Clone)]
pub struct Page {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// What a service serves beside its own metrics.
pub trait Pages: Send + Sync + 'static {
    /// Appends Prometheus text-format series to `/metrics`.
    fn metrics(&self, _out: &mut String) {}
    /// The page at `path` (without the query), or `None` for a 404.
    fn page(&self, _path: &str) -> Option<Page> {
        None
    }
}

static PAGES: OnceLock<Arc<dyn Pages>> = OnceLock::new();

/// Adds `pages` to this process's listener; once per process (a second call changes nothing
/// and returns false).
pub fn serve(pages: Arc<dyn Pages>) -> bool {
    PAGES.set(pages).is_ok()
}

/// Binds `addr` at once (so a port that is taken fails the start, with the address in the
/// error) and serves it in the background.
pub(crate) fn listen(addr: SocketAddr, metrics: PrometheusHandle) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let response = respond(&metrics, &request);
                    async move { Ok::<_, Infallible>(response) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    debug!(error = %e, "metrics listener: connection failed");
                }
                drop(permit);
            });
        }
    });
    Ok(())
}

fn respond<B>(metrics: &PrometheusHandle, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    let pages = PAGES.get();
    let page = match request.uri().path() {
        "/metrics" => {
            let mut text = metrics.render();
            if let Some(pages) = pages {
                pages.metrics(&mut text);
            }
            Some(Page {
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: text.into_bytes(),
            })
        }
        path => pages.and_then(|pages| pages.page(path)),
    };
    let Some(page) = page else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    let mut response = Response::new(Full::new(Bytes::from(page.body)));
    if let Ok(value) = page.content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}
