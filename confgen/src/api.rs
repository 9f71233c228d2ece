//! The `legate.v1.Confgen` gRPC service: snapshots streamed to subscribers, their reports, and
//! the status that ties both together.
//!
//! Snapshots come from a `watch` channel: a new subscriber gets the current snapshot first,
//! then the latest one whenever it changes (a slow subscriber skips intermediate ones, never
//! the last). Streams end when confgen shuts down, so a graceful stop does not wait for them.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use legate_proto::registry::HostId;
use legate_proto::v1;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status as GrpcStatus};
use tracing::{info, warn};

/// The latest snapshot; `None` until the first render.
pub type Snapshots = watch::Receiver<Option<Arc<v1::ConfigSnapshot>>>;

/// Longest message kept from a node's report.
const MAX_REPORT_MESSAGE: usize = 4096;

/// What confgen knows beyond the snapshot, for `Confgen.Status`.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    skipped: Vec<v1::SkippedKey>,
    shared_ports: Vec<v1::SharedPort>,
    last_render_error: String,
    nodes: BTreeMap<String, Node>,
}

#[derive(Debug, Default)]
struct Node {
    /// Open Watch streams from this node.
    connections: usize,
    status: v1::NodeStatus,
}

impl Status {
    fn lock(&self) -> MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the outcome of a render: the skipped keys and shared ports of its model, and
    /// its error (empty on success). Returns the previous shared ports.
    pub fn rendered(
        &self,
        skipped: Vec<v1::SkippedKey>,
        shared_ports: Vec<v1::SharedPort>,
        error: String,
    ) -> Vec<v1::SharedPort> {
        let mut inner = self.lock();
        inner.skipped = skipped;
        inner.last_render_error = error;
        std::mem::replace(&mut inner.shared_ports, shared_ports)
    }

    fn connect(&self, node_id: &str, have_checksum: String) {
        let mut inner = self.lock();
        let node = inner.nodes.entry(node_id.to_owned()).or_default();
        node.connections += 1;
        node.status.node_id = node_id.to_owned();
        node.status.connected = true;
        if node.status.reported_at_unix_ms == 0 {
            node.status.running_checksum = have_checksum;
        }
        metrics::gauge!("legate_confgen_subscribers").increment(1.0);
    }

    fn disconnect(&self, node_id: &str) {
        let mut inner = self.lock();
        if let Some(node) = inner.nodes.get_mut(node_id) {
            node.connections = node.connections.saturating_sub(1);
            node.status.connected = node.connections > 0;
        }
        metrics::gauge!("legate_confgen_subscribers").decrement(1.0);
    }

    fn report(&self, node_id: &str, mut result: v1::ApplyResult) {
        if result.message.len() > MAX_REPORT_MESSAGE {
            let mut end = MAX_REPORT_MESSAGE;
            while !result.message.is_char_boundary(end) {
                end -= 1;
            }
            result.message.truncate(end);
            result.message.push_str("...");
        }
        let mut inner = self.lock();
        let node = inner.nodes.entry(node_id.to_owned()).or_default();
        node.status.node_id = node_id.to_owned();
        let outcome = v1::ApplyOutcome::try_from(result.outcome).unwrap_or_default();
        if matches!(
            outcome,
            v1::ApplyOutcome::Unchanged | v1::ApplyOutcome::Runtime | v1::ApplyOutcome::Reloaded
        ) {
            node.status.running_version = result.version;
            node.status.running_checksum = result.checksum.clone();
        }
        node.status.reported_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        node.status.last_result = Some(result);
    }

    fn snapshot(&self, current: Option<&v1::ConfigSnapshot>) -> v1::ConfgenStatus {
        let inner = self.lock();
        v1::ConfgenStatus {
            version: current.map_or(0, |s| s.version),
            checksum: current.map(|s| s.checksum.clone()).unwrap_or_default(),
            skipped: inner.skipped.clone(),
            shared_ports: inner.shared_ports.clone(),
            last_render_error: inner.last_render_error.clone(),
            nodes: inner.nodes.values().map(|n| n.status.clone()).collect(),
        }
    }
}

/// Whether any subscriber wants the model in its snapshots. The model of a large registry is
/// several times the size of its configuration: confgen keeps it only while someone wants it,
/// and renders again at once when a subscriber that wants it finds the current snapshot
/// without one.
#[derive(Debug, Default)]
pub struct ModelDemand {
    subscribers: AtomicUsize,
    /// Notified when a subscriber wants a model the current snapshot lacks.
    pub wanted: Notify,
}

impl ModelDemand {
    /// Whether a subscriber wants models now.
    pub fn wanted_now(&self) -> bool {
        self.subscribers.load(Ordering::Acquire) > 0
    }
}

/// The `legate.v1.Confgen` service.
#[derive(Debug, Clone)]
pub struct Api {
    /// The latest snapshot.
    pub snapshots: Snapshots,
    /// Status beyond the snapshot.
    pub status: Arc<Status>,
    /// Subscribers that want the model.
    pub models: Arc<ModelDemand>,
    /// Ends every stream.
    pub shutdown: CancellationToken,
}

/// One open Watch stream; leaving the node's connection count when dropped.
struct Subscription {
    snapshots: Snapshots,
    status: Arc<Status>,
    node_id: String,
    shutdown: CancellationToken,
    /// Set when the subscriber wants the model: it counts in the demand while it lasts.
    models: Option<Arc<ModelDemand>>,
}

impl Subscription {
    /// The message for `snapshot`: a copy, since the stream owns what it sends, without the
    /// model if the subscriber asked so (the largest part by far, and copied field by field).
    fn copy(&self, snapshot: &v1::ConfigSnapshot) -> v1::ConfigSnapshot {
        if self.models.is_some() {
            return snapshot.clone();
        }
        v1::ConfigSnapshot {
            version: snapshot.version,
            checksum: snapshot.checksum.clone(),
            haproxy_config: snapshot.haproxy_config.clone(),
            maps: snapshot.maps.clone(),
            model: None,
            generator: snapshot.generator.clone(),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(models) = &self.models {
            models.subscribers.fetch_sub(1, Ordering::AcqRel);
        }
        self.status.disconnect(&self.node_id);
        info!(node = self.node_id, "subscriber left");
    }
}

fn node_id(id: &str) -> Result<String, GrpcStatus> {
    HostId::new(id)
        .map(|id| id.to_string())
        .map_err(|e| GrpcStatus::invalid_argument(format!("node_id: {e}")))
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<v1::ConfigSnapshot, GrpcStatus>> + Send>>;

#[tonic::async_trait]
impl v1::confgen_server::Confgen for Api {
    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, GrpcStatus> {
        let request = request.into_inner();
        let node_id = node_id(&request.node_id)?;
        self.status.connect(&node_id, request.have_checksum);
        info!(node = node_id, "subscriber joined");
        let mut snapshots = self.snapshots.clone();
        // The current snapshot goes out first, whether or not it is new to this receiver.
        snapshots.mark_changed();
        let models = (!request.omit_model).then(|| {
            self.models.subscribers.fetch_add(1, Ordering::AcqRel);
            self.models.clone()
        });
        let subscription = Subscription {
            snapshots,
            models,
            status: self.status.clone(),
            node_id,
            shutdown: self.shutdown.clone(),
        };
        let stream = futures_util::stream::unfold(subscription, |mut sub| async move {
            loop {
                tokio::select! {
                    () = sub.shutdown.cancelled() => return None,
                    changed = sub.snapshots.changed() => changed.ok()?,
                }
                let current = sub.snapshots.borrow_and_update().clone();
                let Some(snapshot) = current else { continue };
                match &sub.models {
                    // One that wants the model waits for a snapshot with it, which confgen
                    // renders at once when asked.
                    Some(models) if snapshot.model.is_none() => models.wanted.notify_one(),
                    _ => return Some((Ok(sub.copy(&snapshot)), sub)),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report(
        &self,
        request: Request<v1::ApplyReport>,
    ) -> Result<Response<v1::ReportResponse>, GrpcStatus> {
        let request = request.into_inner();
        let node_id = node_id(&request.node_id)?;
        let result = request
            .result
            .ok_or_else(|| GrpcStatus::invalid_argument("result is missing"))?;
        let outcome = v1::ApplyOutcome::try_from(result.outcome).unwrap_or_default();
        metrics::counter!("legate_confgen_reports_total", "outcome" => outcome.as_str_name())
            .increment(1);
        if outcome == v1::ApplyOutcome::Rejected {
            warn!(
                node = node_id,
                version = result.version,
                checksum = result.checksum,
                message = result.message,
                "a node rejected a configuration"
            );
        } else {
            info!(
                node = node_id,
                version = result.version,
                outcome = outcome.as_str_name(),
                duration_us = result.duration_us,
                "a node applied a configuration"
            );
        }
        self.status.report(&node_id, result);
        Ok(Response::new(v1::ReportResponse {}))
    }

    async fn status(
        &self,
        _: Request<v1::ConfgenStatusRequest>,
    ) -> Result<Response<v1::ConfgenStatus>, GrpcStatus> {
        let current = self.snapshots.borrow().clone();
        Ok(Response::new(self.status.snapshot(current.as_deref())))
    }
}
