//! The `legate.v1.Supervisor` gRPC service: `Apply` hands a snapshot to the applier and waits
//! for its outcome; `Status` reports what runs, the counters and HAProxy's processes, at once or
//! once a version is dealt with; `Routes` each route's traffic and servers as the last poll of
//! HAProxy saw them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use legate_proto::transport::Peer;
use legate_proto::v1;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status};

use crate::apply::{self, Stats};
use crate::proxy;
use crate::traffic::Traffic;

/// The service; the applier task does the work.
#[derive(Debug)]
pub struct Api {
    pub requests: mpsc::Sender<apply::Request>,
    pub stats: watch::Receiver<Stats>,
    pub traffic: Arc<Mutex<Traffic>>,
    pub master_socket: PathBuf,
    /// The count of HAProxy's workers as last read from its master: `(master pid, when,
    /// count)`. Read again at most every [`WORKERS_FRESH`], so that a client polling the
    /// status does not make every call a round trip to HAProxy's master.
    pub workers: Mutex<Option<(u32, Instant, usize)>>,
}

/// How long a count of HAProxy's workers is reported before it is read again.
const WORKERS_FRESH: Duration = Duration::from_secs(1);
/// How long a `Status` call waits for its `wait_version` when it does not say, and at most.
const WAIT_DEFAULT: Duration = Duration::from_secs(10);
const WAIT_MAX: Duration = Duration::from_secs(60);

/// Whether `stats` show `version` dealt with: it runs, or the last apply was about it or a
/// later one (a rejection leaves an older version running).
fn dealt_with(stats: &Stats, version: u64) -> bool {
    stats.running_version >= version
        || stats
            .last_result
            .as_ref()
            .is_some_and(|result| result.version >= version)
}

impl Api {
    async fn workers(&self, master_pid: u32) -> usize {
        if master_pid == 0 {
            return 0;
        }
        let cached = *self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((pid, at, count)) = cached
            && pid == master_pid
            && at.elapsed() < WORKERS_FRESH
        {
            return count;
        }
        let count = proxy::procs(&self.master_socket)
            .await
            .map_or(0, |procs| procs.workers.len());
        *self.workers.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((master_pid, Instant::now(), count));
        count
    }
}

#[tonic::async_trait]
impl v1::supervisor_server::Supervisor for Api {
    async fn apply(
        &self,
        request: Request<v1::ConfigSnapshot>,
    ) -> Result<Response<v1::ApplyResult>, Status> {
        Peer::of(&request)?.require_admin("Supervisor.Apply")?;
        let (reply, result) = oneshot::channel();
        self.requests
            .send((Arc::new(request.into_inner()), reply))
            .await
            .map_err(|_| Status::unavailable("the supervisor is stopping"))?;
        let result = result
            .await
            .map_err(|_| Status::unavailable("the supervisor is stopping"))?;
        Ok(Response::new(result))
    }

    async fn status(
        &self,
        request: Request<v1::SupervisorStatusRequest>,
    ) -> Result<Response<v1::SupervisorStatus>, Status> {
        let request = request.into_inner();
        if request.wait_version > 0 {
            let wait = match request.wait_ms {
                0 => WAIT_DEFAULT,
                ms => Duration::from_millis(ms.into()).min(WAIT_MAX),
            };
            let mut stats = self.stats.clone();
            // Timed out or the applier gone: the status as it is.
            let _ = tokio::time::timeout(
                wait,
                stats.wait_for(|stats| dealt_with(stats, request.wait_version)),
            )
            .await;
        }
        let stats = self.stats.borrow().clone();
        let workers = self.workers(stats.master_pid).await;
        Ok(Response::new(v1::SupervisorStatus {
            running_version: stats.running_version,
            running_checksum: stats.running_checksum,
            last_result: stats.last_result,
            last_error: stats.last_error,
            reloads: stats.reloads,
            runtime_applies: stats.runtime_applies,
            rejected: stats.rejected,
            workers: u32::try_from(workers).unwrap_or(u32::MAX),
            master_pid: stats.master_pid,
            haproxy_uptime_s: stats.started.map_or(0, |s| s.elapsed().as_secs()),
            refused_listeners: stats.refused_listeners,
        }))
    }

    async fn routes(
        &self,
        _: Request<v1::RoutesRequest>,
    ) -> Result<Response<v1::RoutesResponse>, Status> {
        let traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Response::new(traffic.routes()))
    }
}
