//! The registrar: one per Docker host, it will write the host's containers into etcd under a
//! lease (DESIGN.md). This is the skeleton of the foundation issue: it parses its configuration,
//! serves `grpc.health.v1` and metrics, and stops on SIGTERM/SIGINT. Registration itself is the
//! registrar issue's work and is not implemented here.

use std::net::SocketAddr;

use legate_proto::registry::{HostId, HostIp};
use legate_proto::runtime::{self, CommonArgs, EtcdArgs, RuntimeError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The registrar's configuration: every flag has an environment fallback.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "legate-registrar",
    version,
    about = "legate registrar (skeleton)"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// IP under which this host's containers are reached; detected when not set.
    #[arg(long, env = "HOST_IP", value_parser = runtime::parse_host_ip)]
    pub host_ip: Option<HostIp>,
    /// This host's id in the registry; the host name when not set.
    #[arg(long, env = "HOST_ID")]
    pub host_id: Option<HostId>,
    /// TTL of the registrar's etcd lease, in seconds.
    #[arg(long, env = "LEGATE_LEASE_TTL", default_value_t = 10,
          value_parser = clap::value_parser!(i64).range(2..=3600))]
    pub lease_ttl: i64,
    /// gRPC listen address (Registrar API and health).
    #[arg(long, env = "LEGATE_LISTEN", default_value = "127.0.0.1:7401")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address.
    #[arg(long, env = "LEGATE_METRICS_LISTEN", default_value = "127.0.0.1:9401")]
    pub metrics_listen: SocketAddr,
}

/// Errors that stop the registrar.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process around the service failed (listeners).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Runs the registrar until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    info!(
        etcd = ?config.etcd.endpoints(),
        prefix = %config.etcd.prefix,
        host_ip = ?config.host_ip.map(|ip| ip.to_string()),
        host_id = ?config.host_id.as_ref().map(HostId::as_str),
        lease_ttl = config.lease_ttl,
        "configuration"
    );
    warn!("skeleton: serves health and metrics only; containers are not registered yet");
    let (_health, health_service) = tonic_health::server::health_reporter();
    let routes = tonic::service::Routes::new(health_service);
    runtime::serve_grpc(config.listen, routes, shutdown).await?;
    Ok(())
}
