//! The supervisor: runs HAProxy and applies each configuration snapshot to it (docs/design.md).
//!
//! - [`apply`]: the one task that owns HAProxy: validates, applies through the runtime API or
//!   a reload, restores the last good configuration, restarts a crashed HAProxy.
//! - [`diff`]: what the runtime API can do for a new configuration (pure).
//! - [`haproxy`]: the process (started or adopted) and its CLI sockets.
//! - [`listeners`]: the addresses a configuration binds; those that cannot be bound are refused
//!   before a reload (pure, but for the bind probe).
//! - [`subscriber`]: snapshots from confgen's `Watch`, outcomes back through `Report`.
//! - [`traffic`]: HAProxy's counters per route (domain or service port), for the metrics,
//!   `Supervisor.Routes` and the status page.
//! - [`page`]: the status page on the metrics listener.
//! - [`api`]: the `legate.v1.Supervisor` gRPC service.

pub mod api;
pub mod apply;
pub mod diff;
pub mod haproxy;
pub mod listeners;
pub mod page;
mod proxy;
pub mod subscriber;
pub mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use legate_proto::registry::HostId;
use legate_proto::runtime::{self, CommonArgs, RuntimeError};
use legate_proto::transport::{self, GrpcServer, Listen, ServerArgs};
use legate_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// The name of the configuration file (after `global`) in the live and staged directories.
pub const CONFIG_FILE: &str = "haproxy.cfg";

/// Largest gRPC message accepted: a snapshot of 10,000 apps is about 8 MiB.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The supervisor's configuration: every flag has an environment fallback.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "legate-supervisor",
    version,
    about = "Runs HAProxy and applies legate configuration snapshots to it"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    /// confgen's gRPC endpoint to subscribe to: `unix:<path>`, `https://host:port` (mutual
    /// TLS with --grpc-ca, --grpc-cert, --grpc-key) or `http://host:port` (a confgen with
    /// --grpc-insecure); "none" to take snapshots only from `Supervisor.Apply`.
    #[arg(
        long,
        env = "LEGATE_CONFGEN",
        default_value = "unix:/run/legate/confgen.sock"
    )]
    pub confgen: String,
    /// This node's id in confgen's status; the host name when not set.
    #[arg(long, env = "HOST_ID")]
    pub node_id: Option<HostId>,
    /// The HAProxy binary.
    #[arg(long, env = "LEGATE_HAPROXY", default_value = "haproxy")]
    pub haproxy: PathBuf,
    /// Directory of the configuration: the `global` file, the live and staged files, the
    /// server states.
    #[arg(long, env = "LEGATE_STATE_DIR", default_value = "/var/lib/legate/supervisor",
          value_parser = parse_dir)]
    pub state_dir: PathBuf,
    /// Directory of HAProxy's sockets, pidfile and log.
    #[arg(long, env = "LEGATE_RUN_DIR", default_value = "/run/legate", value_parser = parse_dir)]
    pub run_dir: PathBuf,
    /// How long old workers may finish their connections after a reload (HAProxy time).
    #[arg(long, env = "LEGATE_HARD_STOP_AFTER", default_value = "10m",
          value_parser = parse_haproxy_time)]
    pub hard_stop_after: String,
    /// Reloads after which the oldest old workers are stopped (`mworker-max-reloads`).
    #[arg(long, env = "LEGATE_MAX_RELOADS", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_reloads: u32,
    /// Target of HAProxy's traffic log, as HAProxy's `log` line takes it; "none" for no log.
    #[arg(long, env = "LEGATE_HAPROXY_LOG", default_value = "stdout format raw local0 info",
          value_parser = parse_log_target)]
    pub haproxy_log: String,
    /// A directory whose files a configuration may name (certificates, error pages);
    /// repeatable. Any other file reference in a snapshot is refused.
    #[arg(long = "allowed-file-dir", env = "LEGATE_ALLOWED_FILE_DIRS", value_delimiter = ',',
          value_parser = runtime::parse_allowed_dir)]
    pub allowed_file_dirs: Vec<PathBuf>,
    /// Bytes HAProxy's output file (`<run-dir>/haproxy.log`) may reach before it is emptied in
    /// place, once forwarded into the supervisor's log.
    #[arg(long, env = "LEGATE_HAPROXY_LOG_MAX", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub haproxy_log_max: u64,
    /// Stop HAProxy when the supervisor stops (by default it keeps serving, and the next
    /// supervisor adopts it).
    #[arg(long, env = "LEGATE_STOP_HAPROXY")]
    pub stop_haproxy: bool,
    /// Longest the live files may lag behind changes applied through the runtime API: the
    /// changes of that time are written at once, and the files are always written before
    /// HAProxy starts or reloads and when the supervisor stops. `0` writes them at every apply.
    #[arg(long, env = "LEGATE_WRITE_BEHIND", default_value = "500ms",
          value_parser = runtime::parse_duration)]
    pub write_behind: Duration,
    /// HAProxy runs in a container of its own (`--run-haproxy`), sharing --state-dir and
    /// --run-dir: the supervisor never starts or stops it; it drives it through the master
    /// socket, so HAProxy serves on while the supervisor restarts or is replaced.
    #[arg(long, env = "LEGATE_HAPROXY_EXTERNAL", conflicts_with = "stop_haproxy")]
    pub haproxy_external: bool,
    /// Run HAProxy instead of the supervisor: wait for the supervisor's first configuration in
    /// --state-dir, then become HAProxy on it (for the HAProxy container of a compose stack).
    #[arg(long)]
    pub run_haproxy: bool,
    /// gRPC listen address (Supervisor API and health): `unix:<path>`, or `<ip>:<port>` with
    /// mutual TLS. Apply changes what this host routes: only administrators may call it.
    #[arg(long, env = "LEGATE_LISTEN", default_value = "unix:/run/legate/supervisor.sock",
          value_parser = Listen::parse)]
    pub listen: Listen,
    #[command(flatten)]
    pub grpc: ServerArgs,
    /// Prometheus metrics listen address; it also serves the per-route traffic series and the
    /// status page (`/`).
    #[arg(long, env = "LEGATE_METRICS_LISTEN", default_value = "127.0.0.1:9403")]
    pub metrics_listen: SocketAddr,
    /// How often HAProxy's counters and server states (and confgen's status, for the status
    /// page) are read for the per-route metrics, `Supervisor.Routes` and the page (ms, s or m).
    #[arg(long, env = "LEGATE_STATS_INTERVAL", default_value = "5s",
          value_parser = parse_interval)]
    pub stats_interval: std::time::Duration,
}

/// A poll interval: a duration of at least 100 ms.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let interval = runtime::parse_duration(s)?;
    if interval < std::time::Duration::from_millis(100) {
        return Err("must be at least 100ms".to_owned());
    }
    Ok(interval)
}

impl runtime::Check for Config {
    fn check(&self) -> Result<(), String> {
        self.grpc.check(&self.listen)
    }
}

/// A directory that can appear in HAProxy's configuration and command line as is.
fn parse_dir(s: &str) -> Result<PathBuf, String> {
    if s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'#,\\".contains(c))
    {
        return Err("must be non-empty, without spaces, quotes, '#', ',' or '\\'".to_owned());
    }
    Ok(PathBuf::from(s))
}

/// An HAProxy time: digits and an optional unit (us, ms, s, m, h, d).
fn parse_haproxy_time(s: &str) -> Result<String, String> {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || !["", "us", "ms", "s", "m", "h", "d"].contains(&unit)
    {
        return Err("expected a number with an optional unit: us, ms, s, m, h or d".to_owned());
    }
    Ok(s.to_owned())
}

/// The arguments of HAProxy's `log` line: one line of printable text.
fn parse_log_target(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || s.chars().any(|c| c.is_control() || c == '#') {
        return Err("must be one line, without '#'".to_owned());
    }
    Ok(s.to_owned())
}

/// What the applier needs of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub haproxy: PathBuf,
    pub paths: haproxy::Paths,
    pub hard_stop_after: String,
    pub max_reloads: u32,
    pub haproxy_log: String,
    pub stop_haproxy: bool,
    /// `--write-behind`.
    pub write_behind: Duration,
    /// HAProxy runs in a container of its own (`--haproxy-external`).
    pub external: bool,
    pub allowed_file_dirs: Vec<PathBuf>,
    pub haproxy_log_max: u64,
}

impl Settings {
    /// Takes what the applier needs from the flags.
    pub fn new(config: &Config) -> Self {
        Self {
            haproxy: config.haproxy.clone(),
            paths: haproxy::Paths {
                state_dir: config.state_dir.clone(),
                run_dir: config.run_dir.clone(),
            },
            hard_stop_after: config.hard_stop_after.clone(),
            max_reloads: config.max_reloads,
            haproxy_log: config.haproxy_log.clone(),
            stop_haproxy: config.stop_haproxy,
            write_behind: config.write_behind,
            external: config.haproxy_external,
            allowed_file_dirs: config.allowed_file_dirs.clone(),
            haproxy_log_max: config.haproxy_log_max,
        }
    }

    /// The `global` section the supervisor owns, loaded before every configuration.
    pub fn global(&self) -> String {
        let paths = &self.paths;
        let mut global = format!(
            "# Written by legate-supervisor when it starts: change its flags, not this file.\n\
             global\n\
             \x20   stats socket {admin} mode 600 level admin expose-fd listeners\n\
             \x20   stats timeout 30s\n\
             \x20   hard-stop-after {hard_stop_after}\n\
             \x20   mworker-max-reloads {max_reloads}\n\
             \x20   server-state-file {state}\n\
             \x20   default-path config\n",
            admin = paths.admin_socket().display(),
            hard_stop_after = self.hard_stop_after,
            max_reloads = self.max_reloads,
            state = paths.server_state().display(),
        );
        if self.haproxy_log != "none" {
            global.push_str(&format!("    log {}\n", self.haproxy_log));
        }
        global
    }
}

/// Errors that stop the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process around the service failed (listeners).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The node id could not be determined.
    #[error("node id: {0}")]
    NodeId(#[from] runtime::HostIdError),
    /// The directories or the `global` file could not be prepared.
    #[error("{what}: {reason}")]
    Setup { what: String, reason: String },
    /// A task panicked.
    #[error("a task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// `--run-haproxy`: becomes HAProxy once the supervisor has written a configuration; returns
/// only if that fails.
pub fn run_haproxy(config: &Config) -> std::process::ExitCode {
    if let Err(e) = runtime::init_tracing(&config.common) {
        eprintln!("legate-supervisor: {e}");
        return std::process::ExitCode::from(runtime::EXIT_CONFIG);
    }
    let settings = Settings::new(config);
    let error = haproxy::exec(&settings.haproxy, &settings.paths);
    tracing::error!(error = %error, "cannot run haproxy");
    std::process::ExitCode::FAILURE
}

/// Runs the supervisor until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let node_id = runtime::host_id(config.node_id.as_ref())?;
    let settings = Settings::new(&config);
    info!(
        confgen = %config.confgen, node_id = %node_id, haproxy = %config.haproxy.display(),
        state_dir = %config.state_dir.display(), run_dir = %config.run_dir.display(),
        "supervisor starting"
    );
    let grpc = GrpcServer::new(&config.listen, &config.grpc)?;
    let confgen = match config.confgen.as_str() {
        "" | "none" => None,
        endpoint => Some(transport::channel(endpoint, &config.grpc.tls)?),
    };

    let tracker = TaskTracker::new();
    let tasks = shutdown.child_token();
    let (stats, stats_rx) = watch::channel(apply::Stats::default());
    let (health, routes) = runtime::health_routes().await;
    let forwarded = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tracker.spawn(haproxy::tail_log(
        settings.paths.log(),
        forwarded.clone(),
        tasks.clone(),
    ));
    let (running_tx, running) = watch::channel(None);
    let proxy = proxy::Local {
        binary: settings.haproxy.clone(),
        paths: settings.paths.clone(),
        external: settings.external,
    };
    let applier = apply::Applier::start(
        proxy,
        settings.clone(),
        stats,
        health,
        forwarded,
        running_tx,
    )
    .await?;
    let traffic = Arc::new(Mutex::new(traffic::Traffic::default()));
    let fleet = Arc::new(Mutex::new(page::Fleet::default()));
    legate_proto::web::serve(Arc::new(page::Pages {
        node_id: node_id.to_string(),
        traffic: traffic.clone(),
        stats: stats_rx.clone(),
        fleet: fleet.clone(),
        refresh: config.stats_interval,
    }));
    if let Some(channel) = &confgen {
        tracker.spawn(page::follow_confgen(
            channel.clone(),
            fleet,
            config.stats_interval,
            tasks.clone(),
        ));
    }
    tracker.spawn(traffic::poll(
        settings.paths.admin_socket(),
        running,
        traffic.clone(),
        config.stats_interval,
        tasks.clone(),
    ));

    let (request_tx, request_rx) = mpsc::channel(16);
    let api = v1::supervisor_server::SupervisorServer::new(api::Api {
        requests: request_tx,
        stats: stats_rx.clone(),
        traffic,
        master_socket: settings.paths.master_socket(),
        workers: Mutex::default(),
    })
    .max_decoding_message_size(MAX_MESSAGE);
    let routes = routes.add_service(api);
    let mut grpc = tracker.spawn(grpc.serve(routes, tasks.clone()));

    // The sender lives as long as the applier: without confgen, nothing is ever sent.
    let (snapshot_tx, snapshots) = watch::channel(None);
    let (report_tx, report_rx) = watch::channel(None);
    if let Some(channel) = confgen {
        let subscriber = subscriber::Subscriber {
            channel,
            node_id: node_id.to_string(),
            stats: stats_rx,
        };
        tracker.spawn(subscriber.clone().watch(snapshot_tx.clone(), tasks.clone()));
        tracker.spawn(subscriber.report(report_rx, tasks.clone()));
    }
    tracker.close();
    let mut applier = std::pin::pin!(applier.run(request_rx, snapshots, report_tx, tasks.clone()));
    let outcome = tokio::select! {
        () = &mut applier => Ok(()),
        result = &mut grpc => {
            // The gRPC server ends first on a shutdown, or alone when it fails: either way the
            // applier still runs its own end (`--stop-haproxy`), never dropped half-way.
            tasks.cancel();
            applier.await;
            result.map_err(Error::from).and_then(|r| r.map_err(Error::from))
        }
    };
    tasks.cancel();
    tracker.wait().await;
    outcome
}
