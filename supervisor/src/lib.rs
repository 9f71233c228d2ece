//! The supervisor: it will run HAProxy and apply each configuration snapshot to it (DESIGN.md).
//! This is the skeleton of the foundation issue: it parses its configuration, serves
//! `grpc.health.v1` and metrics, and stops on SIGTERM/SIGINT. Running HAProxy and applying
//! configurations are the supervisor issue's work and are not implemented here.

use std::net::SocketAddr;
use std::path::PathBuf;

use legate_proto::runtime::{self, CommonArgs, RuntimeError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The supervisor's configuration: every flag has an environment fallback.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "legate-supervisor",
    version,
    about = "legate supervisor (skeleton)"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    /// confgen's gRPC endpoint to subscribe to.
    #[arg(long, env = "LEGATE_CONFGEN", default_value = "http://127.0.0.1:7402")]
    pub confgen: String,
    /// The HAProxy binary.
    #[arg(long, env = "LEGATE_HAPROXY", default_value = "haproxy")]
    pub haproxy: PathBuf,
    /// gRPC listen address (Supervisor API and health). Apply runs configuration on this host:
    /// keep it on loopback.
    #[arg(long, env = "LEGATE_LISTEN", default_value = "127.0.0.1:7403")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address.
    #[arg(long, env = "LEGATE_METRICS_LISTEN", default_value = "127.0.0.1:9403")]
    pub metrics_listen: SocketAddr,
}

/// Errors that stop the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process around the service failed (listeners).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Runs the supervisor until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    info!(confgen = %config.confgen, haproxy = %config.haproxy.display(), "configuration");
    warn!("skeleton: serves health and metrics only; HAProxy is not run yet");
    let (_health, health_service) = tonic_health::server::health_reporter();
    let routes = tonic::service::Routes::new(health_service);
    runtime::serve_grpc(config.listen, routes, shutdown).await?;
    Ok(())
}
