//! The HAProxy edge, as the applier uses it: the master process (adopt, start, reload, stop),
//! `haproxy -c`, and the runtime API.
//!
//! [`Local`] is the real one, over [`crate::haproxy`]; the applier's unit tests drive it over a
//! fake with paused time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::haproxy::{self, Haproxy, Paths, Procs};

/// What can go wrong at the HAProxy edge.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// HAProxy could not be reached, or did not start.
    #[error(transparent)]
    Haproxy(#[from] haproxy::Error),
    /// `haproxy -c` could not be run.
    #[error("running {binary} -c: {source}")]
    Check {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    /// `haproxy -c` refused the configuration: its alerts.
    #[error("haproxy -c refused the configuration:\n{0}")]
    Invalid(String),
    /// The master refused the reload: its alerts.
    #[error("haproxy refused the reload:\n{0}")]
    ReloadRefused(String),
    /// No new worker confirmed the reload in time, or the master died meanwhile: the alerts.
    #[error("the reload was not confirmed:\n{0}")]
    ReloadUnconfirmed(String),
    /// `show proc` named no master.
    #[error("show proc lists no master")]
    NoMaster,
    /// There is no master to reload.
    #[error("haproxy is not running")]
    NotRunning,
}

/// What the applier asks of HAProxy.
pub(crate) trait Proxy {
    /// A running HAProxy master.
    type Process: Process;
    /// The HAProxy a previous supervisor left running (or that of HAProxy's own container),
    /// if one answers.
    async fn adopt(&mut self) -> Option<Self::Process>;
    /// Starts HAProxy on the live files (or waits for that of its own container to run
    /// them), once a worker runs.
    async fn start(&mut self) -> Result<Self::Process, ProxyError>;
    /// Whether `process` still runs and answers.
    async fn check(&mut self, process: &mut Self::Process) -> bool;
    /// Reloads `process` on the live files and waits until it confirms that a new worker runs
    /// them; the error says why not, with HAProxy's alerts.
    async fn reload(&mut self, process: &mut Self::Process) -> Result<(), ProxyError>;
    /// Stops `process`, its connections given `grace` to end.
    async fn stop(&mut self, process: Self::Process, grace: Duration);
    /// `haproxy -c` on the configuration in `dir`, from that directory.
    async fn validate(&mut self, dir: &Path) -> Result<(), ProxyError>;
    /// Runtime API commands, in one connection: one reply each.
    async fn batch(&mut self, commands: &[&str]) -> Result<Vec<String>, ProxyError>;
    /// `show servers state`: what a `server-state-file` holds.
    async fn servers_state(&mut self) -> Result<String, ProxyError>;
}

/// A running HAProxy master.
pub(crate) trait Process {
    fn pid(&self) -> u32;
    fn uptime(&self) -> Duration;
    /// In HAProxy's own container (`--haproxy-external`): not this supervisor's to stop.
    fn external(&self) -> bool;
    /// Whether it runs, as far as can be told without asking it.
    fn alive(&mut self) -> bool;
}

impl Process for Haproxy {
    fn pid(&self) -> u32 {
        Haproxy::pid(self)
    }
    fn uptime(&self) -> Duration {
        Haproxy::uptime(self)
    }
    fn external(&self) -> bool {
        Haproxy::external(self)
    }
    fn alive(&mut self) -> bool {
        Haproxy::alive(self)
    }
}

/// HAProxy on this host: started by this supervisor, or by its own container.
pub(crate) struct Local {
    pub binary: PathBuf,
    pub paths: Paths,
    /// `--haproxy-external`.
    pub external: bool,
}

impl Proxy for Local {
    type Process = Haproxy;

    async fn adopt(&mut self) -> Option<Haproxy> {
        if self.external {
            Haproxy::adopt_external(&self.paths).await
        } else {
            Haproxy::adopt(&self.paths).await
        }
    }

    async fn start(&mut self) -> Result<Haproxy, ProxyError> {
        let started = if self.external {
            Haproxy::await_external(&self.paths).await
        } else {
            Haproxy::spawn(&self.binary, &self.paths).await
        };
        let haproxy = started?;
        if !haproxy.external() {
            haproxy.stop_orphans(&self.paths);
        }
        Ok(haproxy)
    }

    async fn check(&mut self, process: &mut Haproxy) -> bool {
        if process.external() {
            process.answers(&self.paths).await
        } else {
            process.alive()
        }
    }

    /// Through the master CLI, confirmed by `show proc`: the reload counter advanced with no
    /// failure and a new worker runs. In 2.6 `reload` itself answers nothing.
    async fn reload(&mut self, process: &mut Haproxy) -> Result<(), ProxyError> {
        let master = self.paths.master_socket();
        let before = procs(&master).await?.master.ok_or(ProxyError::NoMaster)?;
        let offset = haproxy::log_offset(&self.paths.log());
        haproxy::cli(&master, "reload").await?;
        let deadline = Instant::now() + haproxy::START_TIMEOUT;
        loop {
            // The master re-executes itself: its socket is away for a moment.
            if let Ok(now) = procs(&master).await
                && let Some(m) = now.master.as_ref().filter(|m| m.reloads > before.reloads)
            {
                if m.failed > 0 {
                    let alerts = haproxy::alerts_since(&self.paths.log(), offset);
                    return Err(ProxyError::ReloadRefused(alerts));
                }
                if now.workers.iter().any(|w| !w.old && w.reloads == 0) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline || !process.alive() {
                let alerts = haproxy::alerts_since(&self.paths.log(), offset);
                return Err(ProxyError::ReloadUnconfirmed(alerts));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(&mut self, process: Haproxy, grace: Duration) {
        process.stop(grace).await;
    }

    async fn validate(&mut self, dir: &Path) -> Result<(), ProxyError> {
        let output = tokio::process::Command::new(&self.binary)
            .arg("-c")
            .arg("-f")
            .arg(self.paths.global())
            .arg("-f")
            .arg(dir.join(crate::CONFIG_FILE))
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| ProxyError::Check {
                binary: self.binary.display().to_string(),
                source,
            })?;
        if output.status.success() {
            return Ok(());
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let errors: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("[ALERT]"))
            .map(|line| line.trim())
            .collect();
        let message = if errors.is_empty() {
            text.trim().to_owned()
        } else {
            errors.join("\n")
        };
        Err(ProxyError::Invalid(message))
    }

    async fn batch(&mut self, commands: &[&str]) -> Result<Vec<String>, ProxyError> {
        Ok(haproxy::batch(&self.paths.admin_socket(), commands).await?)
    }

    async fn servers_state(&mut self) -> Result<String, ProxyError> {
        Ok(haproxy::cli(&self.paths.admin_socket(), "show servers state").await?)
    }
}

/// The master's `show proc`.
pub(crate) async fn procs(master: &Path) -> Result<Procs, haproxy::Error> {
    let text = haproxy::cli(master, "show proc").await?;
    Ok(Procs::parse(&text))
}
