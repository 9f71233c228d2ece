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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use legate_proto::registry::HostId;
use legate_proto::transport::Peer;
use legate_proto::v1;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status as GrpcStatus};
use tracing::{info, warn};

/// The latest snapshot; `None` until the first render.
pub type Snapshots = watch::Receiver<Option<Arc<v1::ConfigSnapshot>>>;

/// Longest message kept from a node's report.
const MAX_REPORT_MESSAGE: usize = 4096;

/// Longest checksum kept from a node (a `sha256g:` checksum has 72 characters).
const MAX_CHECKSUM: usize = 80;

/// What confgen knows beyond the snapshot, for `Confgen.Status`. Nothing a client sends grows
/// it without bound: node ids are host ids (at most 253 bytes), report messages and checksums
/// are cut, and the nodes themselves are [pruned](StatusInner::prune).
#[derive(Debug)]
pub struct Status {
    inner: Mutex<StatusInner>,
    /// How long a disconnected node that does not report is kept.
    expiry: Duration,
    /// Most nodes kept.
    cap: usize,
}

#[derive(Debug, Default)]
struct StatusInner {
    skipped: Vec<v1::SkippedKey>,
    shared_ports: Vec<v1::SharedPort>,
    hosts: Vec<v1::Host>,
    refused: Vec<v1::HostRefusal>,
    last_render_error: String,
    nodes: BTreeMap<String, Node>,
}

#[derive(Debug)]
struct Node {
    /// Open Watch streams from this node.
    connections: usize,
    /// When it last subscribed, left or reported.
    seen: Instant,
    status: v1::NodeStatus,
}

impl Node {
    fn new(id: &str) -> Self {
        Self {
            connections: 0,
            seen: Instant::now(),
            status: v1::NodeStatus {
                node_id: id.to_owned(),
                ..Default::default()
            },
        }
    }
}

impl StatusInner {
    /// Forgets the nodes that are disconnected and were last seen more than `expiry` before
    /// `now`, then, above `cap`, the disconnected ones seen longest ago.
    fn prune(&mut self, now: Instant, expiry: Duration, cap: usize) {
        self.nodes
            .retain(|_, node| node.connections > 0 || now.duration_since(node.seen) <= expiry);
        if self.nodes.len() > cap {
            let mut idle: Vec<(Instant, String)> = self
                .nodes
                .iter()
                .filter(|(_, node)| node.connections == 0)
                .map(|(id, node)| (node.seen, id.clone()))
                .collect();
            idle.sort();
            let excess = self.nodes.len() - cap;
            for (_, id) in idle.into_iter().take(excess) {
                self.nodes.remove(&id);
            }
        }
        let connected = self.nodes.values().filter(|n| n.connections > 0).count();
        metrics::gauge!("legate_confgen_nodes_known").set(self.nodes.len() as f64);
        metrics::gauge!("legate_confgen_nodes_connected").set(connected as f64);
    }

    /// The node `id`, added (and the others pruned) if it is new.
    fn node(&mut self, id: &str, expiry: Duration, cap: usize) -> &mut Node {
        if !self.nodes.contains_key(id) {
            // Room for it first: the newcomer is never the one pruned.
            self.prune(Instant::now(), expiry, cap.saturating_sub(1));
            self.nodes.insert(id.to_owned(), Node::new(id));
        }
        let node = self
            .nodes
            .get_mut(id)
            .unwrap_or_else(|| unreachable!("just inserted"));
        node.seen = Instant::now();
        node
    }
}

/// `s` cut to at most `max` bytes, on a character boundary, marked with "..." when cut.
fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

impl Status {
    /// Keeps disconnected nodes that do not report for `expiry`, and at most `cap` nodes.
    pub fn new(expiry: Duration, cap: usize) -> Self {
        Self {
            inner: Mutex::new(StatusInner::default()),
            expiry,
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the outcome of a render: what its registry held besides routes, and its
    /// error (empty on success). Returns the previous shared ports.
    pub fn rendered(&self, outcome: Rendered, error: String) -> Vec<v1::SharedPort> {
        let mut inner = self.lock();
        inner.skipped = outcome.skipped;
        inner.hosts = outcome.hosts;
        inner.refused = outcome.refused;
        inner.last_render_error = error;
        std::mem::replace(&mut inner.shared_ports, outcome.shared_ports)
    }

    fn connect(&self, node_id: &str, have_checksum: String) {
        let mut inner = self.lock();
        let node = inner.node(node_id, self.expiry, self.cap);
        node.connections += 1;
        node.status.connected = true;
        if node.status.reported_at_unix_ms == 0 {
            node.status.running_checksum = bounded(have_checksum, MAX_CHECKSUM);
        }
        metrics::gauge!("legate_confgen_subscribers").increment(1.0);
    }

    fn disconnect(&self, node_id: &str) {
        let mut inner = self.lock();
        if let Some(node) = inner.nodes.get_mut(node_id) {
            node.connections = node.connections.saturating_sub(1);
            node.status.connected = node.connections > 0;
            node.seen = Instant::now();
        }
        metrics::gauge!("legate_confgen_subscribers").decrement(1.0);
    }

    fn report(&self, node_id: &str, mut result: v1::ApplyResult) {
        result.message = bounded(std::mem::take(&mut result.message), MAX_REPORT_MESSAGE);
        result.checksum = bounded(std::mem::take(&mut result.checksum), MAX_CHECKSUM);
        let mut inner = self.lock();
        let node = inner.node(node_id, self.expiry, self.cap);
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
        let mut inner = self.lock();
        inner.prune(Instant::now(), self.expiry, self.cap);
        v1::ConfgenStatus {
            version: current.map_or(0, |s| s.version),
            checksum: current.map(|s| s.checksum.clone()).unwrap_or_default(),
            skipped: inner.skipped.clone(),
            shared_ports: inner.shared_ports.clone(),
            last_render_error: inner.last_render_error.clone(),
            nodes: inner.nodes.values().map(|n| n.status.clone()).collect(),
            hosts: inner.hosts.clone(),
            refused: inner.refused.clone(),
        }
    }
}

/// What a render's registry held besides its routes, for `Confgen.Status`.
#[derive(Debug, Default)]
pub struct Rendered {
    /// Keys skipped, with the reasons.
    pub skipped: Vec<v1::SkippedKey>,
    /// Service ports several names share.
    pub shared_ports: Vec<v1::SharedPort>,
    /// Live registrars.
    pub hosts: Vec<v1::Host>,
    /// Containers the registrars refused.
    pub refused: Vec<v1::HostRefusal>,
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
    /// Per-report lines at INFO at most every few seconds.
    pub report_throttle: Arc<Mutex<legate_proto::runtime::Throttle>>,
}

/// One open Watch stream; leaving the node's connection count when dropped.
struct Subscription {
    snapshots: Snapshots,
    status: Arc<Status>,
    node_id: String,
    shutdown: CancellationToken,
    /// Set when the subscriber wants the model: it counts in the demand while it lasts.
    models: Option<Arc<ModelDemand>>,
    /// Whether the subscriber asked for deltas (`WatchRequest.grouped_deltas`).
    deltas: bool,
    /// The last snapshot sent, which the next message of a delta stream is the change from.
    sent: Option<Arc<v1::ConfigSnapshot>>,
}

impl Subscription {
    /// The message for `snapshot`: on a delta stream, the change from the last snapshot sent
    /// (the first whole); else a whole copy with the earlier scheme's checksum, which an earlier
    /// supervisor checks. Without the model if the subscriber asked so (the largest part by far).
    fn message(&mut self, snapshot: &Arc<v1::ConfigSnapshot>) -> v1::ConfigSnapshot {
        // The change from the snapshot before, which the generator made once for all.
        let made = self.sent.as_ref().filter(|_| self.deltas).and_then(|base| {
            let delta = snapshot.delta.as_ref()?;
            (delta.base_checksum == base.checksum).then_some(delta)
        });
        let mut message = match (&self.sent, made) {
            (_, Some(delta)) => legate_proto::snapshot::message(snapshot, delta.clone()),
            (Some(base), None) if self.deltas => legate_proto::snapshot::delta(base, snapshot),
            _ => v1::ConfigSnapshot {
                version: snapshot.version,
                checksum: if self.deltas {
                    snapshot.checksum.clone()
                } else {
                    legate_proto::snapshot::legacy_checksum(
                        &snapshot.haproxy_config,
                        &snapshot.maps,
                    )
                },
                haproxy_config: snapshot.haproxy_config.clone(),
                maps: snapshot.maps.clone(),
                model: None,
                generator: snapshot.generator.clone(),
                delta: None,
            },
        };
        if self.models.is_some() {
            message.model.clone_from(&snapshot.model);
        }
        if self.deltas {
            self.sent = Some(snapshot.clone());
        }
        let kind = if message.delta.is_some() {
            "delta"
        } else {
            "whole"
        };
        metrics::counter!("legate_confgen_snapshots_sent_total", "kind" => kind).increment(1);
        message
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
        let peer = Peer::of(&request)?.clone();
        let request = request.into_inner();
        let node_id = node_id(&request.node_id)?;
        peer.require_node("Confgen.Watch", &node_id)?;
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
            deltas: request.grouped_deltas,
            sent: None,
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
                    _ => return Some((Ok(sub.message(&snapshot)), sub)),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report(
        &self,
        request: Request<v1::ApplyReport>,
    ) -> Result<Response<v1::ReportResponse>, GrpcStatus> {
        let peer = Peer::of(&request)?.clone();
        let request = request.into_inner();
        let node_id = node_id(&request.node_id)?;
        peer.require_node("Confgen.Report", &node_id)?;
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
            legate_proto::throttled!(
                self.report_throttle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(inner: &StatusInner) -> Vec<&str> {
        inner.nodes.keys().map(String::as_str).collect()
    }

    #[test]
    fn disconnected_nodes_expire_and_the_oldest_go_first_above_the_cap() {
        let start = Instant::now();
        let mut inner = StatusInner::default();
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            let mut node = Node::new(id);
            node.seen = start + Duration::from_secs(i as u64);
            node.connections = usize::from(*id == "a");
            inner.nodes.insert((*id).to_owned(), node);
        }
        // Above the cap of 2: the disconnected seen longest ago (b, then c) go; a is connected.
        inner.prune(start + Duration::from_secs(4), Duration::from_secs(60), 2);
        assert_eq!(ids(&inner), ["a", "d"]);
        // d expires 10 s after it was last seen; connected a stays however old.
        inner.prune(start + Duration::from_secs(14), Duration::from_secs(10), 10);
        assert_eq!(ids(&inner), ["a"]);
    }

    #[test]
    fn nothing_a_client_sends_grows_without_bound() {
        let status = Status::new(Duration::from_secs(600), 100);
        for n in 0..1000 {
            status.connect(&format!("node-{n}"), "x".repeat(10_000));
            status.disconnect(&format!("node-{n}"));
        }
        let snapshot = status.snapshot(None);
        assert_eq!(snapshot.nodes.len(), 100);
        assert!(
            snapshot
                .nodes
                .iter()
                .all(|n| n.running_checksum.len() <= MAX_CHECKSUM + 3)
        );
        // The newest stay.
        assert!(snapshot.nodes.iter().any(|n| n.node_id == "node-999"));
        status.report(
            "node-999",
            v1::ApplyResult {
                message: "m".repeat(100_000),
                checksum: "c".repeat(100_000),
                ..Default::default()
            },
        );
        let node = status
            .snapshot(None)
            .nodes
            .into_iter()
            .find(|n| n.node_id == "node-999")
            .unwrap();
        let result = node.last_result.unwrap();
        assert!(result.message.len() <= MAX_REPORT_MESSAGE + 3);
        assert!(result.checksum.len() <= MAX_CHECKSUM + 3);
    }
}
