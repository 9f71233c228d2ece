//! confgen: it will watch the registry in etcd, render HAProxy configurations and stream them to
//! supervisors (DESIGN.md). This is the skeleton of the foundation issue: it parses its
//! configuration, serves `grpc.health.v1` and metrics, and stops on SIGTERM/SIGINT. Watching and
//! rendering are the confgen issue's work and are not implemented here.

use std::net::SocketAddr;

use legate_proto::runtime::{self, CommonArgs, EtcdArgs, RuntimeError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// confgen's configuration: every flag has an environment fallback.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "legate-confgen", version, about = "legate confgen (skeleton)")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// gRPC listen address (Confgen API and health).
    #[arg(long, env = "LEGATE_LISTEN", default_value = "127.0.0.1:7402")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address.
    #[arg(long, env = "LEGATE_METRICS_LISTEN", default_value = "127.0.0.1:9402")]
    pub metrics_listen: SocketAddr,
}

/// Errors that stop confgen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process around the service failed (listeners).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Runs confgen until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    info!(etcd = ?config.etcd.endpoints(), prefix = %config.etcd.prefix, "configuration");
    warn!("skeleton: serves health and metrics only; no configuration is rendered yet");
    let (_health, health_service) = tonic_health::server::health_reporter();
    let routes = tonic::service::Routes::new(health_service);
    runtime::serve_grpc(config.listen, routes, shutdown).await?;
    Ok(())
}
