//! The applier: one task that owns HAProxy and applies snapshots to it, one at a time.
//!
//! For each snapshot: identical to what runs -> nothing; otherwise [`diff::plan_changed`] decides. The
//! runtime path sends the commands in one batch on the admin socket and checks every reply; the
//! live files catch up behind it (`--write-behind`), so that a later reload or restart
//! reproduces the same state: a burst of runtime changes costs one write of the files, not one
//! each. Until they are written, no record says what they hold, so a supervisor that dies
//! meanwhile reloads at its first apply rather than trust them. The reload path stages
//! the files, validates them with `haproxy -c`, saves the server states, moves the files into
//! place, reloads through the master CLI and confirms from `show proc`. When a runtime batch
//! fails half-way, the reload path takes over, so HAProxy always ends up running either the new
//! configuration or the last good one; when a reload fails, the last good files are put back
//! and reloaded (a master that died during the reload is first started on the new files, which
//! passed `haproxy -c`). The last good configuration is what runs: it is replaced only by a
//! confirmed apply. HAProxy is reached through [`Proxy`] (`proxy.rs`), and its master is one
//! [`Master`] state; `apply/faults.rs` drives all of this over a fake HAProxy.
//!
//! The same task watches the HAProxy master: a crashed one is started again on the live files,
//! with backoff.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use legate_proto::runtime;
use legate_proto::snapshot::Span;
use legate_proto::v1::{ApplyOutcome, ApplyResult, ConfigFile, ConfigSnapshot};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tracing::{debug, error, info, warn};

use crate::diff::{self, Defaults, Files, Order, Plan};
use crate::haproxy::{self, Paths};
use crate::listeners;
use crate::proxy::{Process, Proxy, ProxyError};
use crate::{CONFIG_FILE, Settings};

/// A snapshot to apply and where to send the result (`Supervisor.Apply`).
pub type Request = (Arc<ConfigSnapshot>, oneshot::Sender<ApplyResult>);

/// Where a snapshot comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `Supervisor.Apply`: its checksum is checked here.
    Request,
    /// Confgen's stream: the subscriber checked the checksum when it rebuilt the snapshot
    /// (`legate_proto::snapshot::rebuild`), from a delta against `Base` if it came as one.
    Confgen(Option<Base>),
}

/// A snapshot of confgen's stream, as the subscriber rebuilt it.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub snapshot: Arc<ConfigSnapshot>,
    /// What it was a delta of, when it came as one.
    pub base: Option<Base>,
}

/// The snapshot a delta was made against, and the span of text the two share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub checksum: String,
    pub span: Span,
}

/// Counters and the last outcome, shared with `Supervisor.Status`.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub running_version: u64,
    pub running_checksum: String,
    pub last_result: Option<ApplyResult>,
    pub last_error: String,
    pub reloads: u64,
    pub runtime_applies: u64,
    pub rejected: u64,
    pub master_pid: u32,
    pub started: Option<Instant>,
    /// Listeners of the last snapshot left out because their address cannot be bound.
    pub refused_listeners: Vec<String>,
}

/// Why an apply was refused: the message for `ApplyResult`.
#[derive(Debug)]
struct Rejected(String);

/// A step of an apply that failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// HAProxy failed or refused.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The runtime API refused a command.
    #[error("'{command}': {reply}")]
    Refused { command: String, reply: String },
    /// A file of the state directory could not be written or removed.
    #[error("{what}: {source}")]
    Files {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl StepError {
    fn files(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Files { what, source }
    }
}

/// The HAProxy master, as the applier sees it.
#[derive(Debug)]
enum Master<P> {
    /// None runs and none is due: there is no configuration yet.
    Idle,
    /// It runs (started or adopted).
    Up(P),
    /// It exited or could not be started: started again from `at` on, on the last good
    /// configuration.
    Down { at: tokio::time::Instant },
}

pub(crate) struct Applier<P: Proxy> {
    settings: Settings,
    paths: Paths,
    proxy: P,
    master: Master<P::Process>,
    /// What HAProxy runs (the last good configuration); `None` when unknown or none yet.
    running: Option<Arc<ConfigSnapshot>>,
    /// `running`, for the traffic poller.
    running_tx: watch::Sender<Option<Arc<ConfigSnapshot>>>,
    /// The addresses `running` listens on, with its checksum.
    running_binds: Option<(String, BTreeSet<std::net::SocketAddr>)>,
    /// Servers removed at runtime that still hold connections, to delete once drained.
    draining: diff::Draining,
    /// The last snapshot that passed [`check_shape`]: the next is checked where it differs.
    checked: Option<Arc<ConfigSnapshot>>,
    stats: watch::Sender<Stats>,
    health: HealthReporter,
    serving: bool,
    /// Between two starts of HAProxy.
    backoff: runtime::Backoff,
    /// A runtime batch failed part-way: what HAProxy runs may differ from `running` until it
    /// loads files again.
    diverged: bool,
    /// How far `haproxy::tail_log` forwarded HAProxy's output file.
    log_forwarded: Arc<std::sync::atomic::AtomicU64>,
    /// Per-apply lines at INFO at most every few seconds.
    log_throttle: runtime::Throttle,
    /// Whether the live files lag behind `running` (runtime applies since they were written).
    unwritten: bool,
    /// When to write them (`--write-behind` after the first apply they lag behind).
    write_at: Option<tokio::time::Instant>,
    /// The `defaults` sections of the configuration of this checksum (what runs, or is about
    /// to).
    defaults: Option<(String, Defaults)>,
}

impl<P: Proxy> Applier<P> {
    /// Prepares the directories and the `global` file, then adopts the HAProxy a previous
    /// supervisor left running, or starts one on the last good files if there are some.
    pub(crate) async fn start(
        proxy: P,
        settings: Settings,
        stats: watch::Sender<Stats>,
        health: HealthReporter,
        log_forwarded: Arc<std::sync::atomic::AtomicU64>,
        running_tx: watch::Sender<Option<Arc<ConfigSnapshot>>>,
    ) -> Result<Self, crate::Error> {
        let paths = settings.paths.clone();
        for dir in [
            &paths.state_dir,
            &paths.live(),
            &paths.staged(),
            &paths.run_dir,
        ] {
            std::fs::create_dir_all(dir).map_err(|e| crate::Error::Setup {
                what: format!("creating {}", dir.display()),
                reason: e.to_string(),
            })?;
        }
        let setup = |what: &str, path: &Path, content: &str| {
            write_atomic(path, content).map_err(|e| crate::Error::Setup {
                what: format!("{what} {}", path.display()),
                reason: e.to_string(),
            })
        };
        setup("writing", &paths.global(), &settings.global())?;
        if !paths.server_state().exists() {
            // The format's version line and no servers: HAProxy warns about an empty file.
            setup("writing", &paths.server_state(), "1\n")?;
        }
        let mut applier = Self {
            paths,
            proxy,
            master: Master::Idle,
            running: None,
            running_tx,
            running_binds: None,
            draining: diff::Draining::new(),
            checked: None,
            stats,
            health,
            serving: false,
            diverged: false,
            backoff: runtime::Backoff::default(),
            log_forwarded,
            log_throttle: runtime::Throttle::new(runtime::INFO_EVERY),
            unwritten: false,
            write_at: None,
            defaults: None,
            settings,
        };
        let live = applier.read_live();
        if let Some(process) = applier.proxy.adopt().await {
            // What runs is known only if the files are the ones a confirmed apply recorded.
            applier.set_running(live.filter(|(_, recorded)| *recorded).map(|(s, _)| s));
            if applier.running.is_none() {
                warn!("the live files are not the ones last applied: the next apply reloads");
            }
            applier.master = Master::Up(process);
        } else if let Some((snapshot, _)) = live {
            info!(
                version = snapshot.version,
                "starting haproxy on the last good configuration"
            );
            applier.set_running(Some(snapshot));
            applier.master = Master::Down {
                at: tokio::time::Instant::now(),
            };
            applier.check_process().await;
        } else {
            info!("no configuration yet: haproxy starts with the first snapshot");
        }
        applier.update_status().await;
        Ok(applier)
    }

    /// Applies snapshots from `Supervisor.Apply` and from confgen (`snapshots`, latest wins;
    /// each result goes to `reports`) until `shutdown`.
    pub(crate) async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut snapshots: watch::Receiver<Option<Rebuilt>>,
        reports: watch::Sender<Option<ApplyResult>>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some((snapshot, reply)) = requests.recv() => {
                    let result = self.apply(snapshot, Source::Request).await;
                    let _ = reply.send(result);
                }
                Ok(()) = snapshots.changed() => {
                    let latest = snapshots.borrow_and_update().clone();
                    if let Some(Rebuilt { snapshot, base }) = latest {
                        let result = self.apply(snapshot, Source::Confgen(base)).await;
                        reports.send_replace(Some(result));
                    }
                }
                () = runtime::sleep_until(self.write_at) => self.catch_up_files(),
                _ = tick.tick() => {
                    self.check_process().await;
                    self.delete_drained().await;
                    // Between applies: no reload is reading the file's alerts now.
                    haproxy::rotate_log(
                        &self.paths.log(),
                        &self.log_forwarded,
                        self.settings.haproxy_log_max,
                    );
                }
            }
        }
        self.catch_up_files();
        if let Master::Up(process) = std::mem::replace(&mut self.master, Master::Idle) {
            if process.external() {
                info!(
                    pid = process.pid(),
                    "leaving haproxy running in its container"
                );
            } else if self.settings.stop_haproxy {
                self.proxy.stop(process, Duration::from_secs(8)).await;
            } else {
                info!(pid = process.pid(), "leaving haproxy running");
            }
        }
    }

    /// Applies one snapshot and records the outcome.
    pub(crate) async fn apply(
        &mut self,
        snapshot: Arc<ConfigSnapshot>,
        source: Source,
    ) -> ApplyResult {
        let started = Instant::now();
        let (outcome, mut message) = match self.apply_inner(&snapshot, source).await {
            Ok((outcome, message)) => (outcome, message),
            Err(Rejected(message)) => (ApplyOutcome::Rejected, message),
        };
        let refused = self.stats.borrow().refused_listeners.clone();
        if outcome != ApplyOutcome::Rejected && !refused.is_empty() {
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&format!(
                "applied without {} listener(s): {}",
                refused.len(),
                refused.join("; ")
            ));
        }
        let result = ApplyResult {
            outcome: outcome.into(),
            message,
            duration_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            version: snapshot.version,
            checksum: snapshot.checksum.clone(),
        };
        let name = outcome.as_str_name().trim_start_matches("APPLY_OUTCOME_");
        metrics::counter!("legate_supervisor_applies_total", "outcome" => name.to_lowercase())
            .increment(1);
        match outcome {
            ApplyOutcome::Rejected => warn!(
                version = result.version, checksum = %result.checksum,
                generator = %snapshot.generator, "snapshot rejected: {}", result.message
            ),
            ApplyOutcome::Unchanged => debug!(version = result.version, "snapshot unchanged"),
            _ => legate_proto::throttled!(
                self.log_throttle,
                version = result.version,
                outcome = name,
                duration_us = result.duration_us,
                "snapshot applied{}{}",
                if result.message.is_empty() { "" } else { ": " },
                result.message
            ),
        }
        self.stats.send_modify(|stats| {
            match outcome {
                ApplyOutcome::Rejected => {
                    stats.rejected += 1;
                    stats.last_error.clone_from(&result.message);
                }
                ApplyOutcome::Runtime => stats.runtime_applies += 1,
                _ => {}
            }
            stats.last_result = Some(result.clone());
        });
        self.update_status().await;
        result
    }

    async fn apply_inner(
        &mut self,
        snapshot: &Arc<ConfigSnapshot>,
        source: Source,
    ) -> Result<(ApplyOutcome, String), Rejected> {
        let previous = self.checked.clone();
        // Where this snapshot differs from the last one that passed: found once, for each step
        // that reads only there; from the delta it came as, when it was one of that snapshot.
        let since = previous.as_deref().map(|previous| match &source {
            Source::Confgen(Some(base)) if base.checksum == previous.checksum => {
                Since::within(previous, snapshot, base.span)
            }
            _ => Since::of(previous, snapshot),
        });
        check_shape(snapshot, &self.settings.allowed_file_dirs, since.as_ref())?;
        if source == Source::Request
            && !legate_proto::snapshot::verify(
                &snapshot.checksum,
                &snapshot.haproxy_config,
                &snapshot.maps,
            )
        {
            return Err(Rejected(format!(
                "checksum {} does not match the content ({})",
                snapshot.checksum.escape_default(),
                legate_proto::checksum(&snapshot.haproxy_config, &snapshot.maps)
            )));
        }
        self.checked = Some(snapshot.clone());
        let applied = &self.without_unbindable(snapshot, since.as_ref());
        // The region found above holds when HAProxy runs the last snapshot that passed, and
        // this one applies as it came.
        let region = since
            .filter(|since| {
                Arc::ptr_eq(applied, snapshot)
                    && self
                        .running
                        .as_deref()
                        .is_some_and(|running| std::ptr::eq(running, since.previous))
            })
            .map(|since| since.region);
        let snapshot = applied;
        if !self.haproxy_alive() {
            return self.reload(snapshot, "haproxy is not running").await;
        }
        let Some(running) = self.running.clone() else {
            return self.reload(snapshot, "what haproxy runs is unknown").await;
        };
        if running.checksum == snapshot.checksum {
            // HAProxy runs this version's configuration already: it is what runs now.
            if snapshot.version > running.version {
                self.confirmed(snapshot.clone());
            }
            return Ok((ApplyOutcome::Unchanged, String::new()));
        }
        let region = region.unwrap_or_else(|| {
            diff::changed_region(&running.haproxy_config, &snapshot.haproxy_config)
        });
        // The running configuration's `defaults` sections: carried over from one runtime apply
        // to the next, so that no apply searches the whole text for them.
        let defaults = match &self.defaults {
            Some((checksum, defaults)) if *checksum == running.checksum => *defaults,
            _ => Defaults::of(&running.haproxy_config),
        };
        let plan = diff::plan_within(
            files(&running),
            files(snapshot),
            &self.draining,
            region,
            Some(defaults),
        );
        let reason = match plan {
            Plan::Reload(reason) => reason,
            Plan::Runtime(work) => {
                let started = Instant::now();
                self.defaults = region
                    .and_then(|region| {
                        let (old, new) = (&running.haproxy_config, &snapshot.haproxy_config);
                        defaults.after(old, new, region)
                    })
                    .map(|defaults| (snapshot.checksum.clone(), defaults));
                match self.runtime(work, snapshot).await {
                    Ok(message) => {
                        metrics::histogram!("legate_supervisor_apply_seconds", "path" => "runtime")
                            .record(started.elapsed().as_secs_f64());
                        return Ok((ApplyOutcome::Runtime, message));
                    }
                    Err(e) => {
                        warn!(error = %e, "runtime apply failed: reloading instead");
                        format!("the runtime API refused a change ({e})")
                    }
                }
            }
        };
        self.reload(snapshot, &reason).await
    }

    /// `snapshot` without the sections that would listen on an address that cannot be bound
    /// (see [`listeners`]): the same snapshot when there is none, else a copy with the rest of
    /// the configuration and its own checksum. Records the refusals for the status.
    /// `since`: how it differs from the snapshot before, which passed [`check_shape`].
    fn without_unbindable(
        &mut self,
        snapshot: &Arc<ConfigSnapshot>,
        since: Option<&Since<'_>>,
    ) -> Arc<ConfigSnapshot> {
        // Nothing was refused, HAProxy runs the previous snapshot as it came, and no `bind`
        // line changed since: HAProxy holds every address already, nothing to probe or scan.
        let settled = self.haproxy_alive()
            && self.stats.borrow().refused_listeners.is_empty()
            && since.is_some_and(|since| {
                self.running
                    .as_ref()
                    .is_some_and(|running| running.checksum == since.previous.checksum)
                    && !since.binds_changed(&snapshot.haproxy_config)
            });
        if settled {
            return snapshot.clone();
        }
        let held = if !self.haproxy_alive() {
            BTreeSet::new()
        } else if let Some(running) = &self.running {
            // Parsed once per configuration that runs, not once per snapshot.
            match &self.running_binds {
                Some((checksum, binds)) if *checksum == running.checksum => binds.clone(),
                _ => {
                    let binds = listeners::addresses(&running.haproxy_config);
                    self.running_binds = Some((running.checksum.clone(), binds.clone()));
                    binds
                }
            }
        } else {
            // Adopted with files that no apply recorded: they are still what HAProxy loaded.
            std::fs::read_to_string(self.paths.live().join(CONFIG_FILE))
                .map(|config| listeners::addresses(&config))
                .unwrap_or_default()
        };
        let refused = listeners::refuse(&snapshot.haproxy_config, &held, listeners::probe);
        let described: Vec<String> = refused.iter().map(ToString::to_string).collect();
        self.stats.send_if_modified(|stats| {
            if stats.refused_listeners == described {
                return false;
            }
            for refusal in described
                .iter()
                .filter(|r| !stats.refused_listeners.contains(r))
            {
                warn!(
                    version = snapshot.version,
                    "listener refused, the rest of the configuration applies: {refusal}"
                );
                metrics::counter!("legate_supervisor_listeners_refused_total").increment(1);
            }
            if described.is_empty() {
                info!("every listener can be bound again");
            }
            stats.refused_listeners = described;
            true
        });
        metrics::gauge!("legate_supervisor_refused_listeners").set(refused.len() as f64);
        if refused.is_empty() {
            return snapshot.clone();
        }
        let headers: Vec<&str> = refused.iter().map(|r| r.section.as_str()).collect();
        let config = listeners::without(&snapshot.haproxy_config, &headers);
        Arc::new(ConfigSnapshot {
            checksum: legate_proto::checksum(&config, &snapshot.maps),
            haproxy_config: config,
            ..(**snapshot).clone()
        })
    }

    /// The runtime path: one batch of commands, every reply checked; the live files follow
    /// behind ([`Applier::catch_up_files`]), at once with `--write-behind 0` or an external
    /// HAProxy.
    async fn runtime(
        &mut self,
        work: diff::Runtime,
        snapshot: &Arc<ConfigSnapshot>,
    ) -> Result<String, StepError> {
        if !self.unwritten {
            // From the first command on, the live files are behind what HAProxy runs.
            match std::fs::remove_file(self.paths.running()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StepError::files("removing the record of the live files")(e)),
            }
            self.unwritten = true;
            self.write_at = Some(tokio::time::Instant::now() + self.settings.write_behind);
        }
        let lines: Vec<String> = work.commands.iter().map(Order::line).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        // From here on a failure may leave some of the commands applied.
        self.diverged = true;
        let replies = self.proxy.batch(&lines).await?;
        for ((order, line), reply) in work.commands.iter().zip(&lines).zip(&replies) {
            if !order.succeeded(reply) {
                return Err(StepError::Refused {
                    command: (*line).to_owned(),
                    reply: reply.trim().to_owned(),
                });
            }
        }
        self.diverged = false;
        for server in &work.revived {
            self.draining.remove(server);
        }
        self.draining.extend(work.removed);
        self.delete_drained().await;
        self.confirmed(snapshot.clone());
        if self.settings.external || self.settings.write_behind.is_zero() {
            // (HAProxy's container may start again on its own, from the files as they are.)
            self.write_live()
                .map_err(StepError::files("writing the live files"))?;
        }
        Ok(format!("{} runtime commands", work.commands.len()))
    }

    /// The reload path (or the first start). On failure the last good files are restored.
    async fn reload(
        &mut self,
        snapshot: &Arc<ConfigSnapshot>,
        reason: &str,
    ) -> Result<(ApplyOutcome, String), Rejected> {
        let started = Instant::now();
        // Rare, and what an operator looks for when HAProxy restarted its workers: never
        // throttled.
        info!(version = snapshot.version, reason, "applying by a reload");
        let staged = self.paths.staged();
        write_files(&staged, snapshot)
            .map_err(|e| Rejected(format!("staging {}: {e}", staged.display())))?;
        if let Err(e) = self.proxy.validate(&staged).await {
            // HAProxy still runs the last good files, unless a runtime batch that failed
            // half-way left it between the two: then it is put back.
            if self.diverged {
                self.restore().await;
            }
            return Err(Rejected(e.to_string()));
        }
        let alive = self.haproxy_alive();
        if alive {
            self.save_server_state().await;
        }
        if let Err(e) = write_files(&self.paths.live(), snapshot) {
            self.restore().await;
            return Err(Rejected(format!("writing the live files: {e}")));
        }
        // The live files are the new ones now: no runtime apply is left to write.
        (self.unwritten, self.write_at) = (false, None);
        let outcome = if alive {
            match self.reload_haproxy().await {
                // The master died during the reload. The new files passed `haproxy -c`: they
                // are started, and the last good ones only if they cannot be.
                Err(e) if !self.haproxy_alive() => {
                    warn!(error = %e, "haproxy exited during the reload: starting it on the new configuration");
                    metrics::counter!("legate_supervisor_haproxy_restarts_total").increment(1);
                    self.spawn().await
                }
                outcome => outcome,
            }
        } else {
            self.spawn().await
        };
        if let Err(e) = outcome {
            self.restore().await;
            return Err(Rejected(e.to_string()));
        }
        self.draining.clear();
        self.confirmed(snapshot.clone());
        metrics::histogram!("legate_supervisor_apply_seconds", "path" => "reload")
            .record(started.elapsed().as_secs_f64());
        Ok((ApplyOutcome::Reloaded, reason.to_owned()))
    }

    /// Puts the last good files back into place and makes HAProxy run them again. With no good
    /// configuration yet, removes the refused one so that nothing starts it later.
    async fn restore(&mut self) {
        let Some(good) = self.running.clone() else {
            let _ = std::fs::remove_file(self.paths.live().join(CONFIG_FILE));
            return;
        };
        let result = async {
            self.write_live()
                .map_err(StepError::files("writing the live files"))?;
            if self.haproxy_alive() {
                self.reload_haproxy().await
            } else {
                self.spawn().await
            }
        }
        .await;
        match result {
            Ok(()) => info!(version = good.version, "last good configuration restored"),
            Err(e) => error!(error = %e, "cannot restore the last good configuration"),
        }
        self.draining.clear();
    }

    /// `show servers state` into the `server-state-file`, so that a reload keeps the servers'
    /// health, weights and maintenance states.
    async fn save_server_state(&mut self) {
        match self.proxy.servers_state().await {
            Ok(state) if state.starts_with('1') => {
                if let Err(e) = write_atomic(&self.paths.server_state(), &state) {
                    warn!(error = %e, "cannot save the server states");
                }
            }
            Ok(other) => warn!(reply = %other.trim(), "unexpected 'show servers state'"),
            Err(e) => warn!(error = %e, "cannot save the server states"),
        }
    }

    /// Reloads HAProxy on the live files, confirmed.
    async fn reload_haproxy(&mut self) -> Result<(), StepError> {
        let Master::Up(process) = &mut self.master else {
            return Err(ProxyError::NotRunning.into());
        };
        self.proxy.reload(process).await?;
        self.diverged = false;
        metrics::counter!("legate_supervisor_reloads_total").increment(1);
        self.stats.send_modify(|stats| stats.reloads += 1);
        Ok(())
    }

    /// Starts HAProxy on the live files; with `--haproxy-external`, waits for the one of the
    /// HAProxy container to run them.
    async fn spawn(&mut self) -> Result<(), StepError> {
        if self.unwritten {
            self.write_live()
                .map_err(StepError::files("writing the live files"))?;
        }
        let process = self.proxy.start().await?;
        self.master = Master::Up(process);
        self.diverged = false;
        self.update_status().await;
        Ok(())
    }

    /// Notices a dead master and starts it again, with backoff.
    async fn check_process(&mut self) {
        if let Master::Up(process) = &mut self.master {
            if self.proxy.check(process).await {
                return;
            }
            if process.external() {
                error!(
                    pid = process.pid(),
                    "haproxy's container does not answer: waiting for it"
                );
            } else {
                error!(pid = process.pid(), "haproxy exited: starting it again");
            }
            metrics::counter!("legate_supervisor_haproxy_restarts_total").increment(1);
            if process.uptime() >= runtime::HEALTHY {
                self.backoff.reset();
            }
            self.master = Master::Down {
                at: tokio::time::Instant::now(),
            };
            self.draining.clear();
            self.update_status().await;
        }
        let due = matches!(self.master, Master::Down { at } if tokio::time::Instant::now() >= at);
        if !due || self.running.is_none() {
            return;
        }
        if let Err(e) = self.spawn().await {
            let delay = self.backoff.delay();
            error!(error = %e, retry_in = ?delay, "cannot start haproxy");
            self.master = Master::Down {
                at: tokio::time::Instant::now() + delay,
            };
        }
        self.update_status().await;
    }

    /// Deletes the servers removed at runtime whose connections have ended.
    async fn delete_drained(&mut self) {
        if self.draining.is_empty() || !matches!(self.master, Master::Up(_)) {
            return;
        }
        let orders: Vec<Order> = (self.draining.keys())
            .map(|(backend, name)| Order::DelServer {
                backend: backend.clone(),
                name: name.clone(),
            })
            .collect();
        let lines: Vec<String> = orders.iter().map(Order::line).collect();
        let commands: Vec<&str> = lines.iter().map(String::as_str).collect();
        let replies = match self.proxy.batch(&commands).await {
            Ok(replies) => replies,
            Err(e) => {
                warn!(error = %e, "cannot delete drained servers");
                return;
            }
        };
        let servers: Vec<diff::ServerId> = self.draining.keys().cloned().collect();
        for ((server, order), reply) in servers.into_iter().zip(&orders).zip(replies) {
            if order.succeeded(&reply) {
                debug!(backend = server.0, server = server.1, "server deleted");
                self.draining.remove(&server);
            }
        }
        metrics::gauge!("legate_supervisor_draining_servers").set(self.draining.len() as f64);
    }

    /// Writes the files of what runs into the live directory, then the record that says they
    /// are those of this version and checksum.
    fn write_live(&mut self) -> std::io::Result<()> {
        let Some(running) = self.running.clone() else {
            return Ok(());
        };
        write_files(&self.paths.live(), &running)?;
        write_atomic(&self.paths.running(), &record(&running))?;
        self.unwritten = false;
        self.write_at = None;
        Ok(())
    }

    /// Writes the live files when runtime applies left them behind; on failure, tries again a
    /// second later.
    fn catch_up_files(&mut self) {
        if self.unwritten
            && let Err(e) = self.write_live()
        {
            warn!(error = %e, "cannot write the live files: trying again in a moment");
            metrics::counter!("legate_supervisor_file_write_errors_total").increment(1);
            self.write_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        }
    }

    /// Records `snapshot` as what runs: in memory and in the status, and on disk unless a
    /// runtime apply left the live files behind (then they catch up with it).
    fn confirmed(&mut self, snapshot: Arc<ConfigSnapshot>) {
        if !self.unwritten
            && let Err(e) = write_atomic(&self.paths.running(), &record(&snapshot))
        {
            warn!(error = %e, "cannot record the running version");
        }
        metrics::gauge!("legate_supervisor_running_version").set(snapshot.version as f64);
        // Within an apply: a `Status` waiting for this version is answered at the apply's end,
        // with its result.
        self.stats.send_if_modified(|stats| {
            stats.running_version = snapshot.version;
            stats.running_checksum.clone_from(&snapshot.checksum);
            false
        });
        self.set_running(Some(snapshot));
    }

    fn set_running(&mut self, snapshot: Option<Arc<ConfigSnapshot>>) {
        self.running_tx.send_replace(snapshot.clone());
        self.running = snapshot;
    }

    /// The live files as a snapshot, and whether they are the ones the last confirmed apply
    /// recorded (then the version is known too).
    fn read_live(&self) -> Option<(Arc<ConfigSnapshot>, bool)> {
        let live = self.paths.live();
        let config = std::fs::read_to_string(live.join(CONFIG_FILE)).ok()?;
        let mut maps = Vec::new();
        for entry in std::fs::read_dir(&live).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == CONFIG_FILE || !legate_proto::valid_file_name(&name) {
                continue;
            }
            let content = std::fs::read_to_string(entry.path()).ok()?;
            maps.push(ConfigFile { name, content });
        }
        maps.sort_by(|a, b| a.name.cmp(&b.name));
        let checksum = legate_proto::checksum(&config, &maps);
        let record = std::fs::read_to_string(self.paths.running()).unwrap_or_default();
        // Written by this version or an earlier one (other checksum scheme).
        let recorded = record
            .split_once(' ')
            .filter(|(_, sum)| {
                sum.trim() == checksum || legate_proto::snapshot::verify(sum.trim(), &config, &maps)
            })
            .and_then(|(version, _)| version.parse::<u64>().ok());
        let snapshot = ConfigSnapshot {
            version: recorded.unwrap_or(0),
            checksum,
            haproxy_config: config,
            maps,
            model: None,
            generator: "live files".to_owned(),
            delta: None,
        };
        if let Some(version) = recorded {
            self.stats.send_modify(|stats| {
                stats.running_version = version;
                stats.running_checksum.clone_from(&snapshot.checksum);
            });
        }
        Some((Arc::new(snapshot), recorded.is_some()))
    }

    fn haproxy_alive(&mut self) -> bool {
        match &mut self.master {
            Master::Up(process) => process.alive(),
            _ => false,
        }
    }

    /// Health and the process part of the status follow HAProxy.
    async fn update_status(&mut self) {
        let alive = self.haproxy_alive();
        let process = match &self.master {
            Master::Up(process) if alive => Some(process),
            _ => None,
        };
        let (pid, started) = (
            process.map_or(0, Process::pid),
            process.map(|p| Instant::now() - p.uptime()),
        );
        self.stats.send_modify(|stats| {
            stats.master_pid = pid;
            stats.started = started;
        });
        metrics::gauge!("legate_supervisor_haproxy_up").set(if alive { 1.0 } else { 0.0 });
        let serving = alive && self.running.is_some();
        if serving != self.serving {
            self.serving = serving;
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            self.health.set_service_status("", status).await;
        }
    }
}

fn files(snapshot: &ConfigSnapshot) -> Files<'_> {
    Files {
        config: &snapshot.haproxy_config,
        maps: &snapshot.maps,
    }
}

/// How a snapshot differs from the one before it that passed [`check_shape`].
#[derive(Debug, Clone, Copy)]
struct Since<'a> {
    previous: &'a ConfigSnapshot,
    /// [`diff::changed_region`] of the two configurations.
    region: Option<diff::Region>,
}

impl<'a> Since<'a> {
    fn of(previous: &'a ConfigSnapshot, snapshot: &ConfigSnapshot) -> Self {
        Self {
            previous,
            region: diff::changed_region(&previous.haproxy_config, &snapshot.haproxy_config),
        }
    }

    /// [`Since::of`] when the two configurations are known to share `span`.
    fn within(previous: &'a ConfigSnapshot, snapshot: &ConfigSnapshot, span: Span) -> Self {
        let (old, new) = (&previous.haproxy_config, &snapshot.haproxy_config);
        Self {
            previous,
            region: diff::region_within(old, new, span),
        }
    }

    /// Whether the `bind` lines differ between the previous configuration and `new` (looked for
    /// only in the sections that differ; a section added, removed or renamed counts with its
    /// lines).
    fn binds_changed(&self, new: &str) -> bool {
        let Some(region) = self.region else {
            return true;
        };
        fn binds(text: &str) -> impl Iterator<Item = &str> {
            text.lines()
                .filter(|line| diff::words(line).next() == Some("bind"))
                .map(str::trim)
        }
        let old = &self.previous.haproxy_config;
        !binds(&old[region.start..region.end_old]).eq(binds(&new[region.start..region.end_new]))
    }
}

/// What any snapshot must be before HAProxy sees it (`config.proto`): well-formed, and
/// asking nothing of HAProxy that `legate_proto::policy` refuses (code, files, control sockets).
/// `since`: how it differs from a snapshot that passed, to check only what differs from it.
fn check_shape(
    snapshot: &ConfigSnapshot,
    allowed_dirs: &[PathBuf],
    since: Option<&Since<'_>>,
) -> Result<(), Rejected> {
    let mut names = BTreeSet::new();
    for map in &snapshot.maps {
        if !legate_proto::valid_file_name(&map.name) || map.name == CONFIG_FILE {
            return Err(Rejected(format!(
                "map file name '{}' is not allowed",
                map.name.escape_default()
            )));
        }
        if !names.insert(map.name.as_str()) {
            return Err(Rejected(format!("map file '{}' appears twice", map.name)));
        }
    }
    let policy = legate_proto::policy::Policy {
        maps: snapshot.maps.iter().map(|m| m.name.as_str()).collect(),
        allowed_dirs,
    };
    // Only what differs from a configuration that passed with the same map files: the rest is
    // the same text in the same sections.
    let region = since
        .filter(|since| {
            since
                .previous
                .maps
                .iter()
                .map(|m| &m.name)
                .eq(snapshot.maps.iter().map(|m| &m.name))
        })
        .and_then(|since| since.region);
    let config = &snapshot.haproxy_config;
    let verdict = match region {
        Some(region) => {
            let part = &config[region.start..region.end_new];
            legate_proto::policy::check_part(part, "", 0, &policy)
                .map(|_| ())
                .map_err(|mut violation| {
                    violation.line += config[..region.start].matches('\n').count();
                    violation
                })
        }
        None => legate_proto::policy::check(config, &policy),
    };
    verdict.map_err(|violation| Rejected(format!("the configuration is refused: {violation}")))
}

/// Writes the snapshot's maps, then its configuration, into `dir`, each atomically, and
/// removes map files it no longer has.
fn write_files(dir: &Path, snapshot: &ConfigSnapshot) -> std::io::Result<()> {
    for map in &snapshot.maps {
        write_atomic(&dir.join(&map.name), &map.content)?;
    }
    write_atomic(&dir.join(CONFIG_FILE), &snapshot.haproxy_config)?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kept = name == CONFIG_FILE || snapshot.maps.iter().any(|m| m.name == name);
        if !kept && !name.starts_with('.') {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The record of what the live files hold (`<state-dir>/running`): version and checksum.
fn record(snapshot: &ConfigSnapshot) -> String {
    format!("{} {}\n", snapshot.version, snapshot.checksum)
}

/// Writes `content` to a temporary file beside `path`, then renames it into place.
pub fn write_atomic(path: &Path, content: &str) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp: PathBuf = path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod faults;

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(config: String) -> ConfigSnapshot {
        let maps = vec![legate_proto::v1::ConfigFile {
            name: "hosts.map".to_owned(),
            content: String::new(),
        }];
        ConfigSnapshot {
            checksum: legate_proto::checksum(&config, &maps),
            haproxy_config: config,
            maps,
            ..ConfigSnapshot::default()
        }
    }

    /// Checked against a snapshot that passed, only the sections that differ are read, and a
    /// refusal there names its line in the whole configuration.
    #[test]
    fn a_snapshot_is_checked_where_it_differs_from_one_that_passed() {
        let mut config = String::from("defaults\n    mode http\n");
        for b in 0..200 {
            config.push_str(&format!(
                "\nbackend b{b}\n    server s 10.0.0.1:{}\n",
                1000 + b
            ));
        }
        let good = snapshot(config.clone());
        check_shape(&good, &[], None).unwrap();
        let changed = snapshot(config.replace("10.0.0.1:1150", "10.0.0.2:1150"));
        check_shape(&changed, &[], Some(&Since::of(&good, &changed))).unwrap();
        let bad = snapshot(config.replace(
            "    server s 10.0.0.1:1150\n",
            "    server s 10.0.0.1:1150\n    errorfile 503 /etc/shadow\n",
        ));
        let line = config.lines().position(|l| l.contains(":1150")).unwrap() + 2;
        let Err(Rejected(reason)) = check_shape(&bad, &[], Some(&Since::of(&good, &bad))) else {
            panic!("accepted");
        };
        assert!(reason.contains(&format!("line {line}:")), "{reason}");
        // Against a snapshot with other map files, the whole text is read.
        let mut other = good.clone();
        other.maps.clear();
        let Err(Rejected(whole)) = check_shape(&bad, &[], Some(&Since::of(&other, &bad))) else {
            panic!("accepted");
        };
        assert_eq!(whole, reason);
        // A bad line in a part that did not change cannot hide behind a passed snapshot that
        // did not have it: the region is computed from the texts, not trusted.
        let frontend = snapshot(format!("frontend f\n    bind unix@/x\n{config}"));
        assert!(check_shape(&frontend, &[], Some(&Since::of(&good, &frontend))).is_err());
    }

    fn binds_changed(old: &str, new: &str) -> bool {
        let previous = snapshot(old.to_owned());
        Since::of(&previous, &snapshot(new.to_owned())).binds_changed(new)
    }

    #[test]
    fn bind_lines_are_looked_for_where_configurations_differ() {
        let base =
            "frontend f\n    bind :80\n\nlisten l\n    bind :3306\n    server s 10.0.0.1:1\n";
        let server = base.replace("10.0.0.1:1", "10.0.0.2:1");
        assert!(!binds_changed(base, &server));
        assert!(binds_changed(base, &base.replace(":3306", ":3307")));
        let added = format!("{base}\nlisten m\n    bind :5432\n");
        assert!(binds_changed(base, &added));
        assert!(binds_changed(&added, base));
    }
}
