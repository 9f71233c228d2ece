//! The registrar: one per Docker host. It writes the host's containers into etcd, as host IP and
//! published port, under a lease kept alive while it runs (`docs/design.md`).
//!
//! Lifecycle: connect to Docker and etcd (retrying with backoff), claim the host id (adopting
//! the lease of a previous run, refusing if another registrar holds it), then run until
//! shutdown: a reconciler (level-triggered: Docker's running containers against the keys this
//! host owns), triggered by Docker events, a periodic resync, lease changes and
//! `Registrar.Resync`; a lease keeper (a lost lease is replaced and everything re-registered);
//! a guard of the host record; the gRPC API. On shutdown keys are left to expire with the lease,
//! or removed at once with `--deregister-on-exit`.

pub mod conventions;
pub mod docker;
mod events;
mod hostip;
mod lease;
pub mod reconcile;
mod reconciler;
pub mod store;

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use legate_proto::registry::{HostId, HostIp, HostRecord, Schema};
use legate_proto::runtime::{self, Backoff, CommonArgs, EtcdArgs, RuntimeError, pause, retry};
use legate_proto::transport::{GrpcServer, Listen, Peer, ServerArgs};
use legate_proto::v1;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;
use tracing::{debug, info, warn};

use crate::docker::{DockerArgs, DockerSource};
pub use crate::hostip::HostIpError;
use crate::reconciler::Reconciler;
use crate::store::{Store, StoreError};

/// The registrar's configuration: every flag has an environment fallback.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "legate-registrar",
    version,
    about = "legate registrar: this host's containers into etcd"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// IP under which this host's containers are reached; detected (default route) when not set.
    #[arg(long, env = "HOST_IP", value_parser = runtime::parse_host_ip)]
    pub host_ip: Option<HostIp>,
    /// This host's id in the registry; the host name when not set.
    #[arg(long, env = "HOST_ID")]
    pub host_id: Option<HostId>,
    /// TTL of the registrar's etcd lease, in seconds: a dead host's keys vanish after it.
    #[arg(long, env = "LEGATE_LEASE_TTL", default_value_t = 10,
          value_parser = clap::value_parser!(i64).range(2..=3600))]
    pub lease_ttl: i64,
    /// Seconds between full resyncs, whatever the events say.
    #[arg(long, env = "LEGATE_RESYNC_INTERVAL", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub resync_interval: u64,
    #[command(flatten)]
    pub docker: DockerArgs,
    /// Only consider containers matching this filter, `label=<key>` or `label=<key>=<value>`;
    /// repeatable. Lets several registrars share one Docker engine.
    #[arg(long = "filter", env = "LEGATE_CONTAINER_FILTER", value_parser = parse_filter)]
    pub filters: Vec<String>,
    /// Revoke the lease on exit, deleting this host's keys at once, instead of letting them
    /// expire with the TTL.
    #[arg(long, env = "LEGATE_DEREGISTER_ON_EXIT")]
    pub deregister_on_exit: bool,
    /// Milliseconds a starting registrar waits for another live registrar with the same host id
    /// to answer before adopting the previous run's lease.
    #[arg(long, env = "LEGATE_CLAIM_WINDOW_MS", default_value_t = 1500)]
    pub claim_window_ms: u64,
    /// gRPC listen address (Registrar API and health): `unix:<path>`, or `<ip>:<port>` with
    /// mutual TLS.
    #[arg(long, env = "LEGATE_LISTEN", default_value = "unix:/run/legate/registrar.sock",
          value_parser = Listen::parse)]
    pub listen: Listen,
    #[command(flatten)]
    pub grpc: ServerArgs,
    /// Prometheus metrics listen address.
    #[arg(long, env = "LEGATE_METRICS_LISTEN", default_value = "127.0.0.1:9401")]
    pub metrics_listen: SocketAddr,
}

impl runtime::Check for Config {
    fn check(&self) -> Result<(), String> {
        self.etcd.check()?;
        self.docker.check()?;
        self.grpc.check(&self.listen)
    }
}

fn parse_filter(s: &str) -> Result<String, String> {
    match s.strip_prefix("label=") {
        Some(label) if !label.is_empty() && !label.contains(char::is_whitespace) => {
            Ok(label.to_owned())
        }
        _ => Err(format!(
            "'{}' is not label=<key>[=<value>]",
            s.escape_default()
        )),
    }
}

/// Errors that stop the registrar.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process around the service failed (listeners).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// etcd refused the start (a duplicate host id).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Docker failed.
    #[error(transparent)]
    Docker(#[from] docker::DockerError),
    /// The host's id could not be determined.
    #[error(transparent)]
    HostId(#[from] runtime::HostIdError),
    /// The host's IP could not be detected.
    #[error(transparent)]
    HostIp(#[from] hostip::HostIpError),
    /// The host record is refused.
    #[error("the host record: {0}")]
    Record(#[source] legate_proto::registry::ValidationError),
    /// A task of the registrar panicked.
    #[error("task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What triggers a reconcile.
#[derive(Debug)]
enum Trigger {
    /// Docker reported an event about this container.
    Container(docker::ContainerEvent),
    /// Re-inspect everything (periodic resync, lost event stream, new lease).
    Full,
    /// `Registrar.Resync`: re-inspect everything and answer.
    Resync(oneshot::Sender<v1::ResyncResponse>),
}

/// Runs the registrar until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let (host_id, host_ip, record) = identity(&config)?;
    let grpc = GrpcServer::new(&config.listen, &config.grpc)?;
    if config.docker.plain_tcp() {
        warn!(
            docker = config.docker.docker_host,
            "the Docker API over TCP without TLS: anyone who reaches it is root on that host; \
             set DOCKER_TLS_VERIFY and DOCKER_CERT_PATH"
        );
    }
    let schema = Schema::new(config.etcd.prefix.clone());
    info!(
        %host_id, %host_ip, instance = record.instance, prefix = %schema.prefix(), etcd = ?config.etcd.endpoints(),
        docker = config.docker.docker_host, docker_tls = config.docker.docker_tls_verify, filters = ?config.filters, lease_ttl = config.lease_ttl,
        "registrar starting"
    );

    // The API and health come up first: NOT_SERVING until the host id is claimed.
    let (trigger_tx, trigger_rx) = mpsc::channel(1024);
    let (list_tx, list_rx) = watch::channel(v1::ListResponse {
        host_id: host_id.to_string(),
        host_ip: host_ip.to_string(),
        ..Default::default()
    });
    let tracker = TaskTracker::new();
    let tasks = shutdown.child_token();
    let api = v1::registrar_server::RegistrarServer::new(Api {
        list: list_rx,
        trigger: trigger_tx.clone(),
    });
    let (health, routes) = runtime::health_routes().await;
    let routes = routes.add_service(api);
    let mut grpc = tracker.spawn(grpc.serve(routes, tasks.clone()));

    let started = connect_and_claim(&config, schema, &host_id, record, &tasks);
    let (source, mut store, lease) = tokio::select! {
        started = started => match started {
            Some(Ok(started)) => started,
            Some(Err(e)) => {
                tasks.cancel();
                tracker.close();
                tracker.wait().await;
                return Err(e.into());
            }
            None => {
                tracker.close();
                tracker.wait().await;
                return Ok(());
            }
        },
        result = &mut grpc => return grpc_outcome(result),
    };
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_serving::<v1::registrar_server::RegistrarServer<Api>>()
        .await;

    let (lease_tx, lease_rx) = watch::channel(lease);
    let keeper = lease::Keeper::new(
        store.clone(),
        config.lease_ttl,
        lease_tx,
        trigger_tx.clone(),
    );
    tracker.spawn(keeper.run(tasks.clone()));
    tracker.spawn(guard(store.clone(), lease_rx.clone(), tasks.clone()));
    let events = events::DockerEvents {
        docker: config.docker.clone(),
        filters: config.filters.clone(),
    };
    tracker.spawn(events::Follower::new(events, trigger_tx.clone()).run(tasks.clone()));
    tracker.spawn(periodic(
        Duration::from_secs(config.resync_interval),
        trigger_tx.clone(),
        tasks.clone(),
    ));
    tracker.close();

    let reconciler = Reconciler::new(
        source,
        store.clone(),
        (host_ip, host_id),
        lease_rx.clone(),
        list_tx,
    );
    let outcome = tokio::select! {
        () = reconciler.run(trigger_rx, tasks.clone()) => Ok(()),
        result = &mut grpc => grpc_outcome(result),
    };
    tasks.cancel();
    tracker.wait().await;
    if config.deregister_on_exit {
        let lease = *lease_rx.borrow();
        match store.revoke(lease).await {
            Ok(()) => info!(
                lease = format!("{lease:x}"),
                "lease revoked: this host's keys are deleted"
            ),
            Err(e) => warn!(error = %e, "cannot revoke the lease: keys expire with the TTL"),
        }
    } else {
        info!("stopping: this host's keys expire with the lease unless a restart adopts them");
    }
    outcome
}

/// This host's id, IP (detected when not set) and record.
fn identity(config: &Config) -> Result<(HostId, HostIp, HostRecord), Error> {
    let host_id = runtime::host_id(config.host_id.as_ref())?;
    let host_ip = match config.host_ip {
        Some(ip) => ip,
        None => {
            let ip = hostip::detect()?;
            info!(%ip, "host IP detected (set HOST_IP to choose another)");
            ip
        }
    };
    let instance = format!("{:016x}", RandomState::new().hash_one(std::process::id()));
    let record =
        HostRecord::new(host_ip, &instance, env!("CARGO_PKG_VERSION")).map_err(Error::Record)?;
    Ok((host_id, host_ip, record))
}

/// Connects to Docker and etcd and claims the host id, retrying what can be retried: the
/// Docker source, the store and the claimed lease; a duplicate host id or a refusal by etcd is
/// final. `None` at shutdown.
async fn connect_and_claim(
    config: &Config,
    schema: Schema,
    host_id: &HostId,
    record: HostRecord,
    tasks: &CancellationToken,
) -> Option<Result<(DockerSource, Store, i64), StoreError>> {
    let source = retry("connecting to Docker", tasks, || {
        DockerSource::connect(&config.docker, config.filters.clone())
    })
    .await?;
    let client = match config.etcd.connect_retrying(tasks).await {
        Ok(client) => client?,
        Err(e) => return Some(Err(StoreError::Refused(e.message))),
    };
    let store = Store::new(client, schema, host_id.clone(), record);
    let window = Duration::from_millis(config.claim_window_ms);
    let claimed = retry("claiming the host id", tasks, || {
        let mut store = store.clone();
        async move {
            match store.claim(config.lease_ttl, window).await {
                // A lease that expired during the claim is claimed again with a new one.
                Err(e @ (StoreError::Etcd(_) | StoreError::LeaseLost(_))) => Err(e),
                final_outcome => Ok(final_outcome),
            }
        }
    })
    .await?;
    Some(claimed.map(|lease| (source, store, lease)))
}

fn grpc_outcome(
    result: Result<Result<(), RuntimeError>, tokio::task::JoinError>,
) -> Result<(), Error> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

/// Restarts the host record guard whenever its watch fails.
async fn guard(mut store: Store, lease: watch::Receiver<i64>, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        let began = Instant::now();
        if let Err(e) = store.guard_host_record(&lease, &shutdown).await {
            debug!(error = %e, "host record guard restarts");
        }
        if !pause(backoff.after(began), &shutdown).await {
            return;
        }
    }
}

/// Triggers a full resync every `interval`.
async fn periodic(interval: Duration, trigger: mpsc::Sender<Trigger>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {
                if trigger.send(Trigger::Full).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The `legate.v1.Registrar` gRPC service.
struct Api {
    list: watch::Receiver<v1::ListResponse>,
    trigger: mpsc::Sender<Trigger>,
}

#[tonic::async_trait]
impl v1::registrar_server::Registrar for Api {
    async fn list(
        &self,
        _: tonic::Request<v1::ListRequest>,
    ) -> Result<tonic::Response<v1::ListResponse>, tonic::Status> {
        let list = self.list.borrow().clone();
        if list.reconciled_at_unix_ms == 0 {
            let why = if list.error.is_empty() {
                "starting".to_owned()
            } else {
                list.error
            };
            return Err(tonic::Status::unavailable(format!(
                "no reconcile has completed yet, so what is registered is unknown: {why}"
            )));
        }
        Ok(tonic::Response::new(list))
    }

    async fn resync(
        &self,
        request: tonic::Request<v1::ResyncRequest>,
    ) -> Result<tonic::Response<v1::ResyncResponse>, tonic::Status> {
        Peer::of(&request)?.require_admin("Registrar.Resync")?;
        let (reply, answer) = oneshot::channel();
        self.trigger
            .send(Trigger::Resync(reply))
            .await
            .map_err(|_| tonic::Status::unavailable("the registrar is stopping"))?;
        let response = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("reconcile did not finish within 30 s"))?
            .map_err(|_| tonic::Status::unavailable("reconcile failed: see the registrar's log"))?;
        Ok(tonic::Response::new(response))
    }
}
