//! A real HAProxy (Debian's 2.6) in master-worker mode, with a master CLI socket and an admin
//! socket in a temporary directory.
//!
//! The harness owns the `global` section, as the supervisor will; the test provides the rest
//! (defaults, frontends, backends), on ports it took with [`crate::free_port`].

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use legate_supervisor::haproxy::Procs;
use tempfile::TempDir;

use crate::process::ChildGuard;
use crate::{WAIT, wait_for};

/// The HAProxy binary, `LEGATE_TEST_HAPROXY` or `haproxy` from the PATH.
pub fn binary() -> PathBuf {
    std::env::var_os("LEGATE_TEST_HAPROXY").map_or_else(|| PathBuf::from("haproxy"), PathBuf::from)
}

/// Validates configuration files with `haproxy -c`; returns HAProxy's output (warnings), and
/// the error carries its messages.
pub fn check(files: &[&Path]) -> Result<String> {
    let mut command = Command::new(binary());
    command.arg("-c");
    for file in files {
        command.arg("-f").arg(file);
    }
    let output = command.output().context("running haproxy -c")?;
    if !output.status.success() {
        bail!(
            "haproxy -c refused the configuration:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// Validates a configuration that comes without its `global` section, with the files it refers
/// to by bare name, as a supervisor would load it: after a minimal `global` with a log target
/// and `default-path config`, all in one temporary directory. Warnings count as errors.
pub fn check_with(config: &str, files: &[(&str, &str)]) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("legate-haproxy-check-")
        .tempdir()?;
    let global = dir.path().join("global.cfg");
    let state = dir.path().join("server-state");
    std::fs::write(&state, "1\n")?;
    std::fs::write(
        &global,
        format!(
            "global\n    log stderr format raw local0\n    default-path config\n    \
             server-state-file {}\n",
            state.display()
        ),
    )?;
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config)?;
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content)?;
    }
    let output = check(&[&global, &path])?;
    if output.contains("[WARNING]") {
        bail!("haproxy -c warns about the configuration:\n{output}");
    }
    Ok(())
}

/// A running HAProxy master and its workers; killed with its process group on drop.
#[derive(Debug)]
pub struct Haproxy {
    child: ChildGuard,
    dir: TempDir,
}

impl Haproxy {
    /// Starts HAProxy with `config` after the harness's `global` section and waits until the
    /// master reports a worker and the admin socket answers.
    pub async fn start(config: &str) -> Result<Self> {
        Self::start_with(config, &[]).await
    }

    /// Like [`Haproxy::start`], with `files` (name, content), such as map files, written beside
    /// the configuration, which refers to them by bare name.
    pub async fn start_with(config: &str, files: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("legate-haproxy-")
            .tempdir()?;
        let global = format!(
            "global\n\
             \x20   stats socket {admin} mode 600 level admin\n\
             \x20   hard-stop-after 10s\n\
             \x20   mworker-max-reloads 50\n\
             \x20   default-path config\n\
             \x20   server-state-file {state}\n",
            admin = dir.path().join("admin.sock").display(),
            state = dir.path().join("server-state").display(),
        );
        std::fs::write(dir.path().join("server-state"), "1\n")?;
        std::fs::write(dir.path().join("global.cfg"), global)?;
        std::fs::write(dir.path().join("haproxy.cfg"), config)?;
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content)?;
        }
        check(&[
            &dir.path().join("global.cfg"),
            &dir.path().join("haproxy.cfg"),
        ])?;
        let mut command = Command::new(binary());
        command
            .arg("-W")
            .arg("-S")
            .arg(dir.path().join("master.sock"))
            .arg("-f")
            .arg(dir.path().join("global.cfg"))
            .arg("-f")
            .arg(dir.path().join("haproxy.cfg"));
        let child = ChildGuard::spawn("haproxy", &command, &dir.path().join("haproxy.log"))?;
        let mut haproxy = Self { child, dir };
        haproxy.wait_ready().await?;
        Ok(haproxy)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let master = self.master_socket();
        let admin = self.admin_socket();
        let child = &mut self.child;
        wait_for("haproxy's master to list a worker", WAIT, || {
            let running = child.check_running();
            let (master, admin) = (master.clone(), admin.clone());
            async move {
                running?;
                let procs = Procs::parse(&cli(&master, "show proc").await?);
                if !procs.workers.iter().any(|w| !w.old) {
                    return Ok(None);
                }
                cli(&admin, "show info").await?;
                Ok(Some(()))
            }
        })
        .await
    }

    /// Path of the master CLI socket.
    pub fn master_socket(&self) -> PathBuf {
        self.dir.path().join("master.sock")
    }

    /// Path of the admin (stats) socket of the current worker.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// The master's process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Sends a command to the master CLI and returns its answer.
    pub async fn master(&self, command: &str) -> Result<String> {
        cli(&self.master_socket(), command).await
    }

    /// Sends a command to the admin socket (runtime API) and returns its answer.
    pub async fn admin(&self, command: &str) -> Result<String> {
        cli(&self.admin_socket(), command).await
    }

    /// The processes the master lists, parsed by the supervisor's own parser.
    pub async fn procs(&self) -> Result<Procs> {
        Ok(Procs::parse(&self.master("show proc").await?))
    }

    /// Replaces the configuration after `global`, reloads through the master CLI and waits
    /// until the master's reload counter has advanced and a new worker runs.
    pub async fn reload(&self, config: &str) -> Result<()> {
        let path = self.dir.path().join("haproxy.cfg");
        let staged = self.dir.path().join("haproxy.cfg.new");
        std::fs::write(&staged, config)?;
        check(&[&self.dir.path().join("global.cfg"), &staged])?;
        std::fs::rename(&staged, &path)?;
        let before = self.master_reloads().await?;
        self.master("reload").await?;
        wait_for("the master to confirm the reload", WAIT, || async {
            let procs = self.procs().await?;
            let reloaded = procs.master.is_some_and(|m| m.reloads > before);
            let worker = procs.workers.iter().any(|w| !w.old);
            Ok((reloaded && worker).then_some(()))
        })
        .await
    }

    async fn master_reloads(&self) -> Result<u64> {
        self.procs()
            .await?
            .master
            .map(|m| m.reloads)
            .context("show proc lists no master")
    }

    /// HAProxy's output so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// The directory holding the configuration, the sockets and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// One command on an HAProxy CLI socket (master or admin), through the supervisor's own client.
pub async fn cli(socket: &Path, command: &str) -> Result<String> {
    Ok(legate_supervisor::haproxy::cli(socket, command).await?)
}
