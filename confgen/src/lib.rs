//! confgen: watches the registry in etcd, renders HAProxy configurations and streams them to
//! supervisors (`docs/design.md`).
//!
//! Lifecycle: the gRPC API comes up at once (health NOT_SERVING until the first snapshot); the
//! [`watcher`] lists the registry and follows it, handing consistent batches to the generator
//! loop, which applies them to the [`model::Registry`], waits for a burst to settle (`--wait
//! min:max`), builds the model, renders it ([`render`]) and, when the output changed, publishes
//! a new snapshot to every subscriber and `--output`. A render that fails keeps the last good
//! snapshot. Everything stops on shutdown; open Watch streams end with it.

pub mod api;
pub mod model;
pub mod render;
pub mod watcher;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use legate_proto::registry::{KeyKind, Schema};
use legate_proto::runtime::{self, CommonArgs, EtcdArgs, EtcdError, RuntimeError};
use legate_proto::snapshot::Digest;
use legate_proto::transport::{GrpcServer, Listen, ServerArgs};
use legate_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{debug, error, info, warn};

use crate::api::{ModelDemand, Status};
use crate::model::{Registry, Routes};
use crate::render::{Item, ItemFailure, RenderError, Renderer, Settings, View};
use crate::watcher::{Batch, Event};

/// confgen's configuration: every flag has an environment fallback.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "legate-confgen",
    version,
    about = "legate confgen: the registry in etcd rendered into HAProxy configurations"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Handlebars template to render instead of the built-in one.
    #[arg(long, env = "LEGATE_TEMPLATE")]
    pub template: Option<PathBuf>,
    /// How long to let a burst of changes settle before rendering, `min:max`: a change after at
    /// least `min` without a render renders at once; changes that follow it render once no
    /// change came for `min`, and at the latest `max` after the first of them (units ms, s, m;
    /// a lone `min` means `min:4×min`).
    #[arg(long, env = "LEGATE_WAIT", default_value = "2ms:100ms", value_parser = parse_wait)]
    pub wait: Wait,
    /// Free pooled backends a fresh pool has, in percent of its apps (at least 32): new domains
    /// beyond them wait for a reload that grows the pool. Each free backend costs HAProxy
    /// memory; raise it where bursts of new domains are expected (`docs/configuration.md`).
    #[arg(long, env = "LEGATE_POOL_HEADROOM", default_value_t = model::DEFAULT_HEADROOM,
          value_parser = clap::value_parser!(u32).range(0..=400))]
    pub pool_headroom: u32,
    /// Port of the HTTP frontend of the built-in template.
    #[arg(long, env = "LEGATE_HTTP_PORT", default_value_t = 80,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub http_port: u16,
    /// Addresses the HTTP frontend and the TCP service listeners bind, comma-separated.
    /// `auto`: loopback and the Docker bridge's gateway (`docker0`), where this host's
    /// containers reach the ambassador (`host-gateway`); `0.0.0.0` for every interface.
    #[arg(long, env = "LEGATE_BIND_ADDRESS", default_value = "auto",
          value_parser = BindAddresses::parse)]
    pub bind_address: BindAddresses,
    /// A directory whose files the configuration may name (certificates, error pages);
    /// repeatable. Any other file reference in the template's output is refused.
    #[arg(long = "allowed-file-dir", env = "LEGATE_ALLOWED_FILE_DIRS", value_delimiter = ',',
          value_parser = runtime::parse_allowed_dir)]
    pub allowed_file_dirs: Vec<PathBuf>,
    /// How long a node that is disconnected and has not reported stays in `Confgen.Status`.
    #[arg(long, env = "LEGATE_NODE_EXPIRY", default_value = "10m", value_parser = runtime::parse_duration)]
    pub node_expiry: Duration,
    /// Most nodes kept in `Confgen.Status`: beyond it, the disconnected ones seen longest ago
    /// go first (connected nodes always stay).
    #[arg(long, env = "LEGATE_MAX_NODES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_nodes: u32,
    /// Directory to also write each rendered configuration into (`haproxy.cfg` and the map
    /// files), for use without a supervisor.
    #[arg(long, env = "LEGATE_OUTPUT")]
    pub output: Option<PathBuf>,
    /// gRPC listen address (Confgen API and health): `unix:<path>`, or `<ip>:<port>` with
    /// mutual TLS (supervisors of other hosts).
    #[arg(long, env = "LEGATE_LISTEN", default_value = "unix:/run/legate/confgen.sock",
          value_parser = Listen::parse)]
    pub listen: Listen,
    #[command(flatten)]
    pub grpc: ServerArgs,
    /// Prometheus metrics listen address.
    #[arg(long, env = "LEGATE_METRICS_LISTEN", default_value = "127.0.0.1:9402")]
    pub metrics_listen: SocketAddr,
}

impl runtime::Check for Config {
    fn check(&self) -> Result<(), String> {
        self.etcd.check()?;
        self.grpc.check(&self.listen)
    }
}

/// Where HAProxy listens (`--bind-address`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddresses {
    /// Loopback and the Docker bridge's gateway, found at start.
    Auto,
    /// These addresses.
    List(Vec<IpAddr>),
}

/// The interface of Docker's default bridge, whose address `host-gateway` resolves to.
const DOCKER_BRIDGE: &str = "docker0";

impl BindAddresses {
    /// Parses `auto` or a comma list of distinct addresses; an unspecified address (every
    /// interface) stands alone.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        let mut list: Vec<IpAddr> = Vec::new();
        for part in s.split(',') {
            let ip: IpAddr = part.trim().parse().map_err(|_| {
                format!(
                    "'{}' is not an IP address (or `auto`)",
                    part.escape_default()
                )
            })?;
            if list.contains(&ip) {
                return Err(format!("{ip} is given twice"));
            }
            list.push(ip);
        }
        if list.len() > 1 && list.iter().any(IpAddr::is_unspecified) {
            return Err(
                "an unspecified address (every interface) cannot be combined with others"
                    .to_owned(),
            );
        }
        Ok(Self::List(list))
    }

    /// The addresses: for `auto`, 127.0.0.1 and `docker0`'s IPv4 address when it has one
    /// (without it, only loopback, with a warning).
    pub fn resolve(&self) -> Vec<IpAddr> {
        match self {
            Self::List(list) => list.clone(),
            Self::Auto => {
                let mut binds = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
                match docker_bridge() {
                    Some(gateway) => binds.push(IpAddr::V4(gateway)),
                    None => warn!(
                        interface = DOCKER_BRIDGE,
                        "no Docker bridge address: HAProxy listens on loopback only, which \
                         containers cannot reach; set --bind-address"
                    ),
                }
                binds
            }
        }
    }
}

/// The IPv4 address of the Docker bridge interface, if it has one.
fn docker_bridge() -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|interface| interface.interface_name == DOCKER_BRIDGE)
        .find_map(|interface| {
            let address = interface.address?;
            address.as_sockaddr_in().map(|a| a.ip())
        })
}

/// The `--wait` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Quiet time that ends a burst.
    pub min: Duration,
    /// Longest time from a burst's first change to its render.
    pub max: Duration,
}

/// Parses `min[:max]` as in `--wait`.
pub fn parse_wait(s: &str) -> Result<Wait, String> {
    let duration = runtime::parse_duration;
    let wait = match s.split_once(':') {
        Some((min, max)) => Wait {
            min: duration(min)?,
            max: duration(max)?,
        },
        None => {
            let min = duration(s)?;
            Wait { min, max: min * 4 }
        }
    };
    if wait.min > wait.max {
        return Err(format!("min {:?} is above max {:?}", wait.min, wait.max));
    }
    if wait.max > Duration::from_secs(600) {
        return Err("max is above 10m".to_owned());
    }
    Ok(wait)
}

/// How long the registry must stay unchanged before a tight backend pool grows (a reload):
/// not in a burst of changes, where the reload would hold up new domains.
const POOL_QUIET: Duration = Duration::from_secs(1);

/// Errors that stop confgen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process around the service failed (listeners).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The template cannot be read or does not compile.
    #[error("template {path}: {reason}")]
    Template {
        /// Where it was read from.
        path: String,
        /// Why it is unusable.
        reason: String,
    },
    /// etcd refuses confgen: TLS, credentials or permissions.
    #[error("etcd refuses: {0}")]
    Etcd(#[from] EtcdError),
    /// A task of confgen panicked.
    #[error("task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs confgen until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let grpc = GrpcServer::new(&config.listen, &config.grpc)?;
    let (path, text) = match &config.template {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).map_err(|e| Error::Template {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
        ),
        None => ("(built-in)".to_owned(), render::DEFAULT_TEMPLATE.to_owned()),
    };
    let renderer = Renderer::new(&text).map_err(|e| Error::Template {
        path,
        reason: e.to_string(),
    })?;
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let binds = config.bind_address.resolve();
    let settings = Settings {
        binds,
        http_port: config.http_port,
        generator: format!("confgen@{host}"),
        allowed_file_dirs: config.allowed_file_dirs.clone(),
    };
    let schema = Schema::new(config.etcd.prefix.clone());
    info!(
        etcd = ?config.etcd.endpoints(), prefix = %schema.prefix(),
        template = ?config.template, wait = ?config.wait, binds = ?settings.binds,
        http_port = settings.http_port,
        output = ?config.output, "confgen starting"
    );

    let tracker = TaskTracker::new();
    let tasks = shutdown.child_token();
    let (snapshot_tx, snapshot_rx) = watch::channel(None);
    let status = Arc::new(Status::new(config.node_expiry, config.max_nodes as usize));
    let models = Arc::new(ModelDemand::default());
    let api = v1::confgen_server::ConfgenServer::new(api::Api {
        snapshots: snapshot_rx,
        status: status.clone(),
        models: models.clone(),
        shutdown: tasks.clone(),
        report_throttle: Arc::new(std::sync::Mutex::new(runtime::Throttle::new(
            runtime::INFO_EVERY,
        ))),
    });
    let (health, routes) = runtime::health_routes().await;
    let routes = routes.add_service(api);
    let mut grpc = tracker.spawn(grpc.serve(routes, tasks.clone()));

    let registry = Registry::new(schema);
    let (batch_tx, batch_rx) = mpsc::channel(64);
    let watcher = tracker.spawn(watcher::run(
        config.etcd.clone(),
        registry.range(),
        batch_tx,
        tasks.clone(),
    ));
    tracker.close();
    let generator = Generator {
        registry,
        routes: Routes::new(vec![config.http_port], config.pool_headroom),
        renderer,
        settings,
        snapshots: snapshot_tx,
        published: None,
        models,
        status,
        output: config.output.clone(),
        health,
        serving: false,
        log_throttle: runtime::Throttle::new(runtime::INFO_EVERY),
    };
    let outcome = tokio::select! {
        // The generator ends on a shutdown or with the watcher, which ends alone only when
        // etcd refuses confgen.
        () = generator.run(batch_rx, config.wait, tasks.clone()) => {
            watcher.await.map_err(Error::from).and_then(|r| r.map_err(Error::from))
        }
        result = &mut grpc => result.map_err(Error::from).and_then(|r| r.map_err(Error::from)),
    };
    tasks.cancel();
    tracker.wait().await;
    outcome
}

/// What the current snapshot's checksum was computed from, and the render whose text it is:
/// the next snapshot's checksum and delta cost the sections that change since that render.
#[derive(Debug)]
struct Published {
    digest: Digest,
    render: u64,
}

/// Owns the registry and turns its batches into snapshots.
struct Generator {
    registry: Registry,
    /// The model, kept up to date with the registry's changes (and which pooled backend
    /// serves which app).
    routes: Routes,
    renderer: Renderer,
    settings: Settings,
    snapshots: watch::Sender<Option<Arc<v1::ConfigSnapshot>>>,
    /// What the current snapshot was made of.
    published: Option<Published>,
    /// Whether snapshots carry the model.
    models: Arc<ModelDemand>,
    status: Arc<Status>,
    output: Option<PathBuf>,
    health: HealthReporter,
    serving: bool,
    /// Per-snapshot lines at INFO at most every few seconds.
    log_throttle: runtime::Throttle,
}

impl Generator {
    async fn run(
        mut self,
        mut batches: mpsc::Receiver<Batch>,
        wait: Wait,
        shutdown: CancellationToken,
    ) {
        let mut debounce = runtime::Debounce::new(wait.min, wait.max);
        let models = self.models.clone();
        // When to grow a tight pool: after a quiet moment ([`POOL_QUIET`] without a change).
        let mut grow_at: Option<Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = runtime::sleep_until(grow_at) => {
                    grow_at = None;
                    if self.routes.grow() {
                        info!(
                            slots = self.routes.slot_count(),
                            "backend pool grown ahead of need, at a quiet moment (a reload)"
                        );
                        metrics::counter!("legate_confgen_pool_growths_total", "when" => "quiet")
                            .increment(1);
                        self.render().await;
                        debounce.acted();
                    }
                }
                () = models.wanted.notified() => {
                    self.render().await;
                    debounce.acted();
                }
                batch = batches.recv() => {
                    let Some(batch) = batch else { return };
                    if grow_at.is_some() {
                        grow_at = Some(Instant::now() + POOL_QUIET);
                    }
                    self.apply(batch);
                    while let Ok(batch) = batches.try_recv() {
                        self.apply(batch);
                    }
                    // After a quiet spell, a change need not wait: only what follows it
                    // within `min` is coalesced.
                    if debounce.change() {
                        self.render().await;
                        debounce.acted();
                    }
                }
                () = runtime::sleep_until(debounce.due()) => {
                    self.render().await;
                    debounce.acted();
                }
            }
            if !self.routes.pool_tight() {
                grow_at = None;
            } else if grow_at.is_none() {
                grow_at = Some(Instant::now() + POOL_QUIET);
            }
        }
    }

    fn apply(&mut self, batch: Batch) {
        let notices = match batch {
            Batch::Reset { kvs, revision } => self.registry.reset(kvs, revision),
            Batch::Events(events) => events
                .into_iter()
                .filter_map(|event| match event {
                    Event::Put {
                        key,
                        value,
                        revision,
                    } => self.registry.put(key, &value, revision),
                    Event::Delete { key, revision } => {
                        self.registry.delete(&key, revision);
                        None
                    }
                })
                .collect(),
        };
        for notice in notices {
            warn!(
                key = notice.key,
                reason = notice.reason,
                "registry key skipped"
            );
            metrics::counter!("legate_confgen_skipped_total").increment(1);
        }
        metrics::gauge!("legate_confgen_registry_keys").set(self.registry.len() as f64);
    }

    /// Brings the model up to date, renders it, and publishes the snapshot if it changed (or a
    /// subscriber wants its model). This blocks confgen's one thread for the time of a render:
    /// only the blocks of the apps and services that changed are rendered again, the others
    /// come from the renderer's cache.
    async fn render(&mut self) {
        let started = std::time::Instant::now();
        let keep_model = self.models.wanted_now();
        if !keep_model {
            self.release_model();
        }
        self.update_routes();
        let mut view = self.routes.view();
        let (result, failures) = self.render_view(&mut view);
        metrics::histogram!("legate_confgen_render_seconds")
            .record(started.elapsed().as_secs_f64());
        let skipped = self.report(&view, &result, &failures);
        let rendered = match result {
            Ok(rendered) => rendered,
            Err(e) => {
                warn!(
                    revision = self.registry.revision(),
                    error = %e,
                    "render failed: the last good configuration stays"
                );
                metrics::counter!("legate_confgen_renders_total", "result" => "error").increment(1);
                return;
            }
        };
        let Some((mut snapshot, same)) = self.snapshot(rendered, keep_model) else {
            metrics::counter!("legate_confgen_renders_total", "result" => "unchanged").increment(1);
            return;
        };
        let (apps, services) = (view.app_count(), view.service_count());
        snapshot.model = keep_model.then(|| {
            let mut model = self.routes.model();
            model
                .apps
                .retain(|app| !view.excluded.contains(&Item::App(app.domain.clone())));
            model
                .services
                .retain(|s| !view.excluded.contains(&Item::Service(s.port as u16)));
            model.skipped = skipped.clone();
            model
        });
        drop(view);
        if same {
            // The same configuration again, now with the model a subscriber asked for.
            debug!(
                version = snapshot.version,
                "the current configuration sent again with its model"
            );
            self.snapshots.send_replace(Some(Arc::new(snapshot)));
            return;
        }
        metrics::counter!("legate_confgen_renders_total", "result" => "changed").increment(1);
        if let Some(dir) = &self.output
            && let Err(e) = write_output(dir, &snapshot).await
        {
            error!(dir = %dir.display(), error = %e, "cannot write the rendered configuration");
            metrics::counter!("legate_confgen_output_errors_total").increment(1);
        }
        legate_proto::throttled!(
            self.log_throttle,
            version = snapshot.version,
            checksum = snapshot.checksum,
            apps,
            services,
            skipped = skipped.len(),
            render_ms = started.elapsed().as_secs_f64() * 1000.0,
            "new configuration"
        );
        metrics::gauge!("legate_confgen_snapshot_version").set(snapshot.version as f64);
        metrics::counter!("legate_confgen_snapshots_total").increment(1);
        self.snapshots.send_replace(Some(Arc::new(snapshot)));
        if !self.serving {
            self.serving = true;
            self.health
                .set_service_status("", ServingStatus::Serving)
                .await;
            self.health
                .set_serving::<v1::confgen_server::ConfgenServer<api::Api>>()
                .await;
        }
    }

    /// Nobody wants the last snapshot's model any more: it goes before the new one is built,
    /// so that two models of a large registry are never held at once. (A stream sending that
    /// snapshot right now holds it: then it goes when the send is done.)
    fn release_model(&mut self) {
        self.snapshots.send_if_modified(|current| {
            if let Some(snapshot) = current.as_mut().and_then(Arc::get_mut) {
                snapshot.model = None;
            }
            false
        });
    }

    /// Applies the registry's changes to the routes; a tight pool grows now if backends come
    /// or go, since HAProxy reloads for this render anyway.
    fn update_routes(&mut self) {
        if self.routes.update(&mut self.registry) && self.routes.grow() {
            info!(
                slots = self.routes.slot_count(),
                "backend pool grown ahead of need, with a reload that was coming anyway"
            );
            metrics::counter!("legate_confgen_pool_growths_total", "when" => "with_reload")
                .increment(1);
        }
    }

    /// Renders `view`, from the current snapshot's text where the two share; items that the
    /// template cannot render are left out of `view` and the rest rendered again. The outcome,
    /// and the items left out.
    fn render_view(
        &mut self,
        view: &mut View,
    ) -> (Result<render::Rendered, RenderError>, Vec<ItemFailure>) {
        let current = self.snapshots.borrow().clone();
        let previous = current
            .as_ref()
            .filter(|_| self.published.as_ref().map(|p| p.render) == self.renderer.last_render())
            .map(|snapshot| snapshot.haproxy_config.as_str());
        let mut result = self.renderer.render_from(view, &self.settings, previous);
        drop(current);
        let mut failures = Vec::new();
        if let Err(RenderError::Items(failed)) = &mut result {
            for failure in failed.iter() {
                warn!(
                    item = describe(&failure.item),
                    error = failure.error,
                    "left out of the configuration: it does not render with the template"
                );
            }
            metrics::counter!("legate_confgen_render_failures_total")
                .increment(failed.len() as u64);
            failures = std::mem::take(failed);
            view.excluded = failures.iter().map(|f| f.item.clone()).collect();
            result = self.renderer.render(view, &self.settings);
        }
        if let Ok(rendered) = &result {
            let how = if rendered.patched { "patch" } else { "walk" };
            metrics::counter!("legate_confgen_render_passes_total", "how" => how).increment(1);
        }
        (result, failures)
    }

    /// Records the outcome of a render for `Confgen.Status` and the metrics; the keys skipped
    /// (bad keys and those of items left out).
    fn report(
        &self,
        view: &View,
        result: &Result<render::Rendered, RenderError>,
        failures: &[ItemFailure],
    ) -> Vec<v1::SkippedKey> {
        let mut skipped = self.routes.skipped();
        if !failures.is_empty() {
            skipped.extend(failed_keys(view, failures, &self.registry));
            skipped.sort_by(|a, b| a.key.cmp(&b.key));
        }
        metrics::gauge!("legate_confgen_skipped_keys").set(skipped.len() as f64);
        let shared = model::shared_ports(view.services().map(|s| &**s));
        let error = result.as_ref().err().map(ToString::to_string);
        let outcome = api::Rendered {
            skipped: skipped.clone(),
            shared_ports: shared.clone(),
            hosts: view.hosts.to_vec(),
            refused: self.registry.refusals(),
        };
        let previous_shared = self.status.rendered(outcome, error.unwrap_or_default());
        for port in shared.iter().filter(|p| !previous_shared.contains(p)) {
            warn!(
                port = port.port,
                names = ?port.names,
                "several service names share one port: they share one listener"
            );
        }
        skipped
    }

    /// The snapshot of `rendered`, with its delta from the current one, and whether it is the
    /// current configuration again; `None` when it is, and there is no model to add to it.
    /// The checksum costs the sections that changed since the current snapshot's render,
    /// which the renderer knows from the chunks it kept.
    fn snapshot(
        &mut self,
        rendered: render::Rendered,
        keep_model: bool,
    ) -> Option<(v1::ConfigSnapshot, bool)> {
        let current = self.snapshots.borrow().clone();
        let (digest, span) = match (&current, &self.published, rendered.shared) {
            (Some(current), Some(published), Some((since, span))) if since == published.render => {
                let files = (rendered.config.as_str(), rendered.maps.as_slice());
                let digest = published.digest.next_within(&current.maps, files, span);
                (digest, Some(span))
            }
            _ => (Digest::of(&rendered.config, &rendered.maps), None),
        };
        let (same, with_model) = current.as_ref().map_or((false, false), |s| {
            (s.checksum == digest.checksum(), s.model.is_some())
        });
        if same && let Some(published) = &mut self.published {
            // The same text: the next render's span holds against this one's too.
            published.render = rendered.render;
        }
        if same && (with_model || !keep_model) {
            return None;
        }
        let mut snapshot = v1::ConfigSnapshot {
            version: u64::try_from(self.registry.revision()).unwrap_or_default(),
            checksum: digest.checksum().to_owned(),
            haproxy_config: rendered.config,
            maps: rendered.maps,
            model: None,
            generator: self.settings.generator.clone(),
            delta: None,
        };
        // The change from the current snapshot, for every stream that was sent it.
        if let (Some(current), Some(span)) = (&current, span) {
            snapshot.delta = Some(legate_proto::snapshot::delta_within(
                current, &snapshot, span,
            ));
        }
        self.published = Some(Published {
            digest,
            render: rendered.render,
        });
        Some((snapshot, same))
    }
}

/// Writes the map files, then `haproxy.cfg`, each atomically (temporary file, then rename), so
/// a reader never sees a configuration that refers to a map not yet written.
async fn write_output(dir: &Path, snapshot: &v1::ConfigSnapshot) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let files = snapshot
        .maps
        .iter()
        .map(|m| (m.name.as_str(), m.content.as_str()))
        .chain([("haproxy.cfg", snapshot.haproxy_config.as_str())]);
    for (name, content) in files {
        let staged = dir.join(format!(".{name}.tmp"));
        tokio::fs::write(&staged, content).await?;
        tokio::fs::rename(&staged, dir.join(name)).await?;
    }
    Ok(())
}

/// An app or service, as the log names it.
fn describe(item: &Item) -> String {
    match item {
        Item::App(domain) => format!("app {domain}"),
        Item::Service(port) => format!("service on port {port}"),
    }
}

/// The apps and services that failed to render, as skipped keys: each is listed as its
/// directory in the registry with the template's error, so that `Confgen.Status` and the
/// `legate_confgen_skipped_keys` gauge show it like any bad key.
fn failed_keys(view: &View, failures: &[ItemFailure], registry: &Registry) -> Vec<v1::SkippedKey> {
    let mut skipped = Vec::new();
    for failure in failures {
        let reason = format!(
            "{} does not render with the template: {}",
            describe(&failure.item),
            failure.error
        );
        let keys = match &failure.item {
            Item::App(domain) => vec![format!("{}{domain}/", registry.dir(KeyKind::App))],
            Item::Service(port) => view.services.get(port).map_or_else(Vec::new, |service| {
                service
                    .names
                    .iter()
                    .map(|name| format!("{}{name}/{port}/", registry.dir(KeyKind::Service)))
                    .collect()
            }),
        };
        skipped.extend(keys.into_iter().map(|key| v1::SkippedKey {
            key: key.into_bytes(),
            reason: reason.clone(),
        }));
    }
    skipped
}

#[cfg(test)]
mod tests;
