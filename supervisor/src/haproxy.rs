//! The HAProxy process and its two CLI sockets.
//!
//! HAProxy runs in master-worker mode (`-W -S <master socket>`) in its own process group, with
//! its working directory in the configuration's directory so that the configuration names its
//! map files by their bare names. Its stderr (start-up messages, alerts) goes to a log file in
//! the run directory rather than a pipe: a supervisor that restarts can still read what
//! HAProxy says, and HAProxy never writes into a pipe nobody reads. [`tail_log`] forwards those
//! lines into the supervisor's own log, at most [`FORWARD_PER_SECOND`] a second besides alerts,
//! and [`rotate_log`] empties the file in place once everything in it was forwarded and it
//! grew past a limit, so it never grows while HAProxy runs for months.
//!
//! The supervisor does not kill HAProxy when it stops: a new supervisor [adopts](Haproxy::adopt)
//! the running master through its pidfile and master socket.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// How long one CLI exchange may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long HAProxy may take to start or reload a configuration (large ones parse for seconds).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of HAProxy's output forwarded per second, alerts aside: a reload of a large
/// configuration prints a line per proxy it stops.
pub const FORWARD_PER_SECOND: usize = 200;

/// Where the supervisor keeps its files.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Configuration and state: `global.cfg`, `live/`, `staged/`, `server-state`, `running`.
    pub state_dir: PathBuf,
    /// Sockets, pidfile and HAProxy's log.
    pub run_dir: PathBuf,
}

impl Paths {
    /// The supervisor's `global` section.
    pub fn global(&self) -> PathBuf {
        self.state_dir.join("global.cfg")
    }
    /// The configuration HAProxy runs, and its maps.
    pub fn live(&self) -> PathBuf {
        self.state_dir.join("live")
    }
    /// Where a new configuration is validated before it goes live.
    pub fn staged(&self) -> PathBuf {
        self.state_dir.join("staged")
    }
    /// Server states saved before each reload (`server-state-file`).
    pub fn server_state(&self) -> PathBuf {
        self.state_dir.join("server-state")
    }
    /// Version and checksum of the live configuration, once applied.
    pub fn running(&self) -> PathBuf {
        self.state_dir.join("running")
    }
    /// The master CLI socket.
    pub fn master_socket(&self) -> PathBuf {
        self.run_dir.join("master.sock")
    }
    /// The admin socket (runtime API) of the current worker.
    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir.join("admin.sock")
    }
    /// The master's pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.run_dir.join("haproxy.pid")
    }
    /// HAProxy's stderr.
    pub fn log(&self) -> PathBuf {
        self.run_dir.join("haproxy.log")
    }
}

/// Errors talking to or starting HAProxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A CLI exchange took too long.
    #[error("'{0}' timed out")]
    Timeout(String),
    /// HAProxy exited or did not come up.
    #[error("haproxy did not start: {0}")]
    Start(String),
    /// The CLI answered something unexpected.
    #[error("{0}")]
    Cli(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A running HAProxy master: started by this supervisor, or adopted.
#[derive(Debug)]
pub struct Haproxy {
    pid: u32,
    /// `None` when adopted: not our child.
    child: Option<tokio::process::Child>,
    /// In another container: its pid is in another namespace.
    external: bool,
    started: Instant,
}

/// HAProxy's command line on the live files: master-worker mode (`-W`), the master socket
/// and the pidfile in the run directory, the supervisor's `global` file then the configuration,
/// run from the live directory (map paths are relative), its output appended to the log file.
fn command(binary: &Path, paths: &Paths) -> Result<std::process::Command, Error> {
    let log_path = paths.log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(format!("opening {}", log_path.display())))?;
    let _ = std::fs::remove_file(paths.master_socket());
    let mut command = std::process::Command::new(binary);
    command
        .arg("-W")
        .arg("-S")
        .arg(format!("{},mode,600", paths.master_socket().display()))
        .arg("-p")
        .arg(paths.pidfile())
        .arg("-f")
        .arg(paths.global())
        .arg("-f")
        .arg(paths.live().join(crate::CONFIG_FILE))
        .current_dir(paths.live())
        .stdin(Stdio::null())
        .stderr(log);
    Ok(command)
}

/// `--run-haproxy`: waits until the supervisor has written the `global` file and a live
/// configuration, then becomes HAProxy on them (`exec`), as the main process of its own
/// container. Returns only on failure.
pub fn exec(binary: &Path, paths: &Paths) -> Error {
    use std::os::unix::process::CommandExt;
    let config = paths.live().join(crate::CONFIG_FILE);
    let mut waiting = false;
    while !(paths.global().exists() && config.exists()) {
        if !waiting {
            info!(config = %config.display(), "waiting for the supervisor's first configuration");
            waiting = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // An HAProxy that still serves (the container being replaced): its listening sockets are
    // taken over through its admin socket (`expose-fd listeners`) instead of bound afresh, so
    // no connection is refused or reset in between; it is then stopped by whoever replaces it.
    let admin = paths.admin_socket();
    let takeover = std::os::unix::net::UnixStream::connect(&admin).is_ok();
    match command(binary, paths) {
        Ok(mut command) => {
            if takeover {
                info!(socket = %admin.display(), "starting haproxy: taking the listening sockets over from the running one");
                command.arg("-x").arg(&admin);
            } else {
                info!(binary = %binary.display(), "starting haproxy");
            }
            Error::Start(format!("exec {}: {}", binary.display(), command.exec()))
        }
        Err(e) => e,
    }
}

impl Haproxy {
    /// Starts HAProxy on the live configuration and waits until the master lists a worker.
    /// On failure, the error carries HAProxy's alerts.
    pub async fn spawn(binary: &Path, paths: &Paths) -> Result<Self, Error> {
        let log_path = paths.log();
        let offset = log_offset(&log_path);
        let mut command = tokio::process::Command::from(command(binary, paths)?);
        command
            // Its own process group: a Ctrl-C meant for the supervisor does not reach it.
            .process_group(0)
            .kill_on_drop(false);
        let child = command
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        let pid = child.id().unwrap_or_default();
        let mut haproxy = Self {
            pid,
            child: Some(child),
            external: false,
            started: Instant::now(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !haproxy.alive() {
                return Err(Error::Start(format!(
                    "it exited: {}",
                    alerts_since(&log_path, offset)
                )));
            }
            if let Ok(text) = cli(&paths.master_socket(), "show proc").await {
                let procs = Procs::parse(&text);
                if procs.workers.iter().any(|w| !w.old) {
                    info!(pid, "haproxy started");
                    return Ok(haproxy);
                }
            }
            if Instant::now() > deadline {
                haproxy.signal(Signal::SIGKILL);
                return Err(Error::Start(format!(
                    "no worker after {START_TIMEOUT:?}: {}",
                    alerts_since(&log_path, offset)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The HAProxy that a previous supervisor left running, if its pidfile names a live
    /// process that answers on the master socket as that master.
    pub async fn adopt(paths: &Paths) -> Option<Self> {
        let pid: u32 = std::fs::read_to_string(paths.pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        kill(Pid::from_raw(i32::try_from(pid).ok()?), None).ok()?;
        let haproxy = Self::answering(paths, pid).await?;
        info!(
            pid,
            uptime_s = haproxy.uptime().as_secs(),
            "adopted a running haproxy"
        );
        Some(haproxy)
    }

    /// The HAProxy of another container (`--run-haproxy`), once its master answers on the
    /// master socket as the master its pidfile names. Its pid is in that container's namespace:
    /// it is only compared, never signalled.
    pub async fn adopt_external(paths: &Paths) -> Option<Self> {
        let pid: u32 = std::fs::read_to_string(paths.pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let mut haproxy = Self::answering(paths, pid).await?;
        haproxy.external = true;
        info!(
            pid,
            uptime_s = haproxy.uptime().as_secs(),
            "adopted the haproxy of its own container"
        );
        Some(haproxy)
    }

    /// Waits up to [`START_TIMEOUT`] for the HAProxy of another container to run the live files.
    pub async fn await_external(paths: &Paths) -> Result<Self, Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(haproxy) = Self::adopt_external(paths).await {
                return Ok(haproxy);
            }
            if Instant::now() > deadline {
                return Err(Error::Start(format!(
                    "no HAProxy answers on {} after {START_TIMEOUT:?}: is its container \
                     (`legate-supervisor --run-haproxy`) running? {}",
                    paths.master_socket().display(),
                    alerts_since(&paths.log(), 0)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the master answers on its socket as `self` (for one in another container).
    pub async fn answers(&self, paths: &Paths) -> bool {
        Self::answering(paths, self.pid).await.is_some()
    }

    async fn answering(paths: &Paths, pid: u32) -> Option<Self> {
        let procs = Procs::parse(&cli(&paths.master_socket(), "show proc").await.ok()?);
        let master = procs.master?;
        if master.pid != pid || !procs.workers.iter().any(|w| !w.old) {
            return None;
        }
        Some(Self {
            pid,
            child: None,
            external: false,
            started: Instant::now() - Duration::from_secs(master.uptime_s),
        })
    }

    /// Whether it runs in another container (`--run-haproxy`): not ours to signal.
    pub fn external(&self) -> bool {
        self.external
    }

    /// Soft-stops every other HAProxy master that runs this supervisor's configuration (its
    /// command line loads our `global.cfg`), and returns their pids.
    ///
    /// Why: when the run directory is lost (the pidfile and the master socket gone, the master
    /// still running), nothing can adopt that master, and a new one binds the same ports beside
    /// it (`SO_REUSEPORT`): two masters would serve, the orphan an old configuration, for ever.
    /// Called once a new master runs, so the orphan's listeners close only when the new ones
    /// already accept. Its workers finish their connections, as after a reload.
    pub fn stop_orphans(&self, paths: &Paths) -> Vec<u32> {
        let orphans = masters_of(&paths.global())
            .into_iter()
            .filter(|pid| *pid != self.pid)
            .collect::<Vec<_>>();
        for &pid in &orphans {
            warn!(
                pid,
                "another haproxy master runs this configuration (its run directory was lost?): stopping it"
            );
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGUSR1);
            }
        }
        orphans
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How long the master has been running.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether the master still runs (and reaps it if it exited). One in another container
    /// is taken as running here; [`Haproxy::answers`] tells.
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None if self.external => true,
            None => i32::try_from(self.pid).is_ok_and(|pid| kill(Pid::from_raw(pid), None).is_ok()),
        }
    }

    fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Stops HAProxy: a soft stop (workers finish their connections, bounded by
    /// `hard-stop-after`), then SIGTERM if it is still there after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        info!(pid = self.pid, "stopping haproxy");
        self.signal(Signal::SIGUSR1);
        let deadline = Instant::now() + grace;
        while self.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.alive() {
            warn!(pid = self.pid, "haproxy did not stop in time: SIGTERM");
            self.signal(Signal::SIGTERM);
        }
    }
}

/// The HAProxy masters whose command line loads `global` (`-f <global>`): the processes with
/// that command line whose parent does not have it too (their workers do, forked from them).
fn masters_of(global: &Path) -> Vec<u32> {
    let global = global.as_os_str().as_encoded_bytes();
    let loads_global = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2).any(|w| w[0] == b"-f" && w[1] == global)
        })
    };
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": the command name may hold spaces and parentheses.
        stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let running: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| loads_global(*pid))
        .collect();
    running
        .iter()
        .copied()
        .filter(|pid| parent(*pid).is_none_or(|ppid| !running.contains(&ppid)))
        .collect()
}

/// What the master's `show proc` lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Procs {
    pub master: Option<Master>,
    pub workers: Vec<Worker>,
}

/// The master's line of `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub pid: u32,
    /// Reloads since it started.
    pub reloads: u64,
    /// Failed reloads since the last successful one.
    pub failed: u64,
    pub uptime_s: u64,
}

/// A worker's line of `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub pid: u32,
    /// Reloads since this worker started: 0 for the newest.
    pub reloads: u64,
    /// Listed under "old workers": it finishes its connections and exits.
    pub old: bool,
}

impl Procs {
    /// The master's pid, then the workers'.
    pub fn pids(&self) -> Vec<u32> {
        let workers = self.workers.iter().map(|w| w.pid);
        self.master.iter().map(|m| m.pid).chain(workers).collect()
    }

    /// Parses HAProxy 2.6's `show proc`.
    pub fn parse(text: &str) -> Self {
        let mut procs = Self::default();
        let mut old = false;
        for line in text.lines() {
            if line.starts_with('#') {
                old = line.contains("old workers");
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [pid, "master", reloads, "[failed:", failed, uptime, ..] => {
                    let (Ok(pid), Ok(reloads)) = (pid.parse(), reloads.parse()) else {
                        continue;
                    };
                    procs.master = Some(Master {
                        pid,
                        reloads,
                        failed: failed.trim_end_matches(']').parse().unwrap_or(0),
                        uptime_s: parse_uptime(uptime).unwrap_or(0),
                    });
                }
                [pid, "worker", reloads, ..] => {
                    let (Ok(pid), Ok(reloads)) = (pid.parse(), reloads.parse()) else {
                        continue;
                    };
                    procs.workers.push(Worker { pid, reloads, old });
                }
                _ => {}
            }
        }
        procs
    }
}

/// `0d00h01m05s` -> 65.
fn parse_uptime(text: &str) -> Option<u64> {
    let mut total = 0;
    let mut number = 0u64;
    for c in text.chars() {
        if let Some(digit) = c.to_digit(10) {
            number = number.checked_mul(10)?.checked_add(u64::from(digit))?;
            continue;
        }
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total += number * unit;
        number = 0;
    }
    Some(total)
}

/// Sends one command to a CLI socket and returns the whole answer.
pub async fn cli(socket: &Path, command: &str) -> Result<String, Error> {
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await?;
        stream.write_all(format!("{command}\n").as_bytes()).await?;
        // The master CLI waits for more commands until it sees the end of input.
        stream.shutdown().await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    };
    tokio::time::timeout(CLI_TIMEOUT, exchange)
        .await
        .map_err(|_| Error::Timeout(command.to_owned()))?
        .map_err(io(format!("'{command}' on {}", socket.display())))
}

/// Sends `commands` in one exchange, in interactive mode, and returns one reply per command.
/// Replies are told apart by the prompt HAProxy prints after each.
pub async fn batch(socket: &Path, commands: &[&str]) -> Result<Vec<String>, Error> {
    let mut input = String::from("prompt\n");
    for command in commands {
        input.push_str(command);
        input.push('\n');
    }
    input.push_str("quit\n");
    let exchange = async {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(io(format!("connecting to {}", socket.display())))?;
        let (mut reader, mut writer) = stream.split();
        // Written while the replies are read: a long batch would otherwise fill both buffers.
        // The connection stays open both ways until HAProxy closes it after `quit`: when this
        // side shut down its writing while HAProxy was busy (another session dumping the
        // statistics), HAProxy 2.6 sometimes closed the session before the end of the batch.
        let write = writer.write_all(input.as_bytes());
        let mut output = Vec::new();
        let (written, read) = tokio::join!(write, reader.read_to_end(&mut output));
        let output = String::from_utf8_lossy(&output).into_owned();
        // Where the exchange broke off: the command after the last one answered.
        let at = |e: std::io::Error| {
            let answered = split_replies(&output).len().saturating_sub(1);
            let next = commands.get(answered).map_or("", |c| {
                let end = (0..=c.len().min(120))
                    .rev()
                    .find(|&i| c.is_char_boundary(i));
                &c[..end.unwrap_or(0)]
            });
            let what = format!(
                "a batch on {} broke off after {answered} of {} replies (next: '{}')",
                socket.display(),
                commands.len(),
                next.escape_debug()
            );
            io(what)(e)
        };
        read.map_err(at)?;
        written.map_err(at)?;
        Ok(output)
    };
    let output = tokio::time::timeout(CLI_TIMEOUT, exchange)
        .await
        .map_err(|_| Error::Timeout(format!("a batch of {} commands", commands.len())))??;
    let replies = split_replies(&output);
    if replies.len() < commands.len() {
        return Err(Error::Cli(format!(
            "{} replies to {} commands: {}",
            replies.len(),
            commands.len(),
            output.escape_debug()
        )));
    }
    Ok(replies
        .into_iter()
        .take(commands.len())
        .map(str::to_owned)
        .collect())
}

/// The replies of an interactive session: the text after each prompt ("> " at the start of a
/// line), the first of which answers the first command after `prompt`.
fn split_replies(output: &str) -> Vec<&str> {
    let mut starts = Vec::new();
    let mut at_line_start = true;
    for (i, c) in output.char_indices() {
        if at_line_start && output[i..].starts_with("> ") {
            starts.push(i + 2);
        }
        at_line_start = c == '\n';
    }
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let end = starts.get(n + 1).map_or(output.len(), |next| next - 2);
            &output[start..end]
        })
        .collect()
}

/// HAProxy's alert lines in its log after `offset`, or its last lines if it wrote no alert.
pub fn alerts_since(log: &Path, offset: u64) -> String {
    let text = String::from_utf8_lossy(&read_from(log, offset, 1 << 20)).into_owned();
    let alerts: Vec<&str> = text.lines().filter(|l| l.contains("[ALERT]")).collect();
    let lines: Vec<&str> = if alerts.is_empty() {
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(10)..].to_vec()
    } else {
        alerts
    };
    let mut message = lines.join("\n");
    if message.is_empty() {
        message = "haproxy gave no reason".to_owned();
    }
    if message.len() > 4000 {
        let cut = (0..=4000)
            .rev()
            .find(|&i| message.is_char_boundary(i))
            .unwrap_or(0);
        message.truncate(cut);
        message.push_str(" ...");
    }
    message
}

/// Up to `limit` bytes of `path` from `offset`; what could be read.
fn read_from(path: &Path, offset: u64, limit: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = file.take(limit).read_to_end(&mut bytes);
    }
    bytes
}

/// The log file's current length: where the lines of the next event start.
pub fn log_offset(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// Empties HAProxy's log file in place when it is larger than `limit` and everything in it was
/// forwarded (`forwarded` is where [`tail_log`] is). HAProxy writes with `O_APPEND`, so its next
/// line lands at the start of the emptied file. Returns whether it emptied it.
pub fn rotate_log(path: &Path, forwarded: &AtomicU64, limit: u64) -> bool {
    let length = log_offset(path);
    if length <= limit || forwarded.load(Ordering::Acquire) < length {
        return false;
    }
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file.set_len(0).is_ok(),
        Err(_) => false,
    }
}

/// Whether `line` only reports what the supervisor itself just did: a runtime API command
/// (`CLI : ... New server registered.`), a server put into or out of maintenance (each runtime
/// change), proxies stopped and started (each reload). One per
/// change at INFO would be megabytes an hour under churn: they go to DEBUG. So does the alert
/// of a slot emptied by the supervisor (`CLI : backend 'slot_3' has no server available!`,
/// each time a domain goes). Servers that health checks mark down, and the alerts they raise,
/// are not among them.
fn echoes_the_supervisor(line: &str) -> bool {
    line.contains(": CLI : ")
        || line.contains("for maintenance")
        || line.contains("leaving forced maintenance")
        || (line.contains("Proxy ") && (line.contains(" stopped (") || line.ends_with(" started.")))
}

/// Forwards the lines HAProxy writes to its log into the supervisor's log until `shutdown`:
/// alerts always, other lines up to [`FORWARD_PER_SECOND`], the rest counted in a warning.
/// `forwarded` follows how far the file was read.
pub async fn tail_log(path: PathBuf, forwarded: Arc<AtomicU64>, shutdown: CancellationToken) {
    let mut offset = log_offset(&path);
    forwarded.store(offset, Ordering::Release);
    let mut pending = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let (mut window, mut sent, mut suppressed) = (Instant::now(), 0, 0);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if window.elapsed() >= Duration::from_secs(1) {
            if suppressed > 0 {
                warn!(
                    target: "haproxy",
                    suppressed, "lines of haproxy's output not forwarded (over {FORWARD_PER_SECOND} a second)"
                );
                metrics::counter!("legate_supervisor_haproxy_lines_suppressed_total")
                    .increment(suppressed);
            }
            (window, sent, suppressed) = (Instant::now(), 0, 0);
        }
        let length = log_offset(&path);
        if length < offset {
            offset = 0;
        }
        if length == offset {
            continue;
        }
        let chunk = read_from(&path, offset, length - offset);
        offset += chunk.len() as u64;
        pending.push_str(&String::from_utf8_lossy(&chunk));
        take_lines(&mut pending, |line| {
            if line.is_empty() {
            } else if echoes_the_supervisor(line) {
                debug!(target: "haproxy", "{line}");
            } else if line.contains("[ALERT]") {
                error!(target: "haproxy", "{line}");
            } else if sent >= FORWARD_PER_SECOND {
                suppressed += 1;
            } else if line.contains("[WARNING]") {
                sent += 1;
                warn!(target: "haproxy", "{line}");
            } else {
                sent += 1;
                info!(target: "haproxy", "{line}");
            }
        });
        forwarded.store(offset, Ordering::Release);
    }
}

/// Calls `each` with every complete line of `pending` (line end trimmed), then keeps only the
/// incomplete rest. The lines are read in place and let go at once: drained one at a time from
/// the front, each would move the rest of the text (a bulk of 5,000 new domains makes HAProxy
/// log 30,000 lines, two per server added, within a few reads: those moves were a fifth of the
/// samples of the supervisor and HAProxy over the bulk's last second, by `perf`).
fn take_lines(pending: &mut String, mut each: impl FnMut(&str)) {
    let mut done = 0;
    while let Some(end) = pending[done..].find('\n') {
        each(pending[done..done + end].trim_end());
        done += end + 1;
    }
    pending.drain(..done);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_lines_are_taken_and_the_rest_waits_for_its_end() {
        let mut pending = String::from("a\nb\r\n\nc");
        let mut lines = Vec::new();
        take_lines(&mut pending, |line| lines.push(line.to_owned()));
        assert_eq!(lines, ["a", "b", ""]);
        assert_eq!(pending, "c");
        pending.push_str("d\n");
        take_lines(&mut pending, |line| lines.push(line.to_owned()));
        assert_eq!(lines.last().map(String::as_str), Some("cd"));
        assert!(pending.is_empty());
        let many: String = (0..30_000).map(|n| format!("line {n}\n")).collect();
        pending.push_str(&many);
        let mut seen = 0;
        take_lines(&mut pending, |line| {
            assert_eq!(line, format!("line {seen}"));
            seen += 1;
        });
        assert_eq!((seen, pending.as_str()), (30_000, ""));
    }

    #[test]
    fn the_supervisors_own_actions_are_told_from_faults() {
        for echo in [
            "[ALERT]    (21411) : CLI : backend 'slot_3' has no server available!",
            "[NOTICE]   (21411) : CLI : 'server app/s1' : New server registered.",
            "[WARNING]  (21411) : Server slot_2/s1 is going DOWN for maintenance. 0 active and 0 backup servers left.",
            "[WARNING]  (21411) : Proxy slot_2 stopped (cumulated conns: FE: 0, BE: 12).",
        ] {
            assert!(echoes_the_supervisor(echo), "{echo}");
        }
        for fault in [
            "[ALERT]    (21411) : backend 'app' has no server available!",
            "[WARNING]  (21411) : Server app/s1 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", check duration: 0ms.",
        ] {
            assert!(!echoes_the_supervisor(fault), "{fault}");
        }
    }

    #[test]
    fn show_proc_of_2_6_is_parsed() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>\n\
                    1000            master          2 [failed: 1]   1d02h03m05s     2.6.12-1+deb12u4\n\
                    # workers\n\
                    1003            worker          0               0d00h00m01s     2.6.12-1+deb12u4\n\
                    # old workers\n\
                    1002            worker          1               0d00h00m03s     2.6.12-1+deb12u4\n\
                    # programs\n\n";
        let procs = Procs::parse(text);
        assert_eq!(
            procs.master,
            Some(Master {
                pid: 1000,
                reloads: 2,
                failed: 1,
                uptime_s: 86_400 + 2 * 3_600 + 3 * 60 + 5
            })
        );
        assert_eq!(
            procs.workers,
            [
                Worker {
                    pid: 1003,
                    reloads: 0,
                    old: false
                },
                Worker {
                    pid: 1002,
                    reloads: 1,
                    old: true
                }
            ]
        );
    }

    #[tokio::test]
    async fn a_batch_that_breaks_off_says_where() {
        // As HAProxy does with a line longer than its buffer: two commands answered, then the
        // connection closed with the rest of the batch unread.
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut start = [0; 64];
            let _ = stream.read(&mut start).await.unwrap();
            stream.write_all(b"\n> one\n\n> two\n\n> ").await.unwrap();
        });
        let long = "x".repeat(1 << 20);
        let commands = ["show version", "show version", &long, "show version"];
        let error = batch(&socket, &commands).await.unwrap_err().to_string();
        server.await.unwrap();
        assert!(error.contains("broke off after 2 of 4 replies"), "{error}");
        assert!(
            error.contains(&format!("(next: '{}')", &long[..120])),
            "{error}"
        );
    }

    #[test]
    fn interactive_replies_are_split_on_prompts() {
        // As HAProxy 2.6 answers "prompt", three commands, then "quit".
        let output = "\n> New server registered.\n\n> \n> Server deleted.\n> ";
        assert_eq!(
            split_replies(output),
            ["New server registered.\n\n", "\n", "Server deleted.\n", ""]
        );
        assert_eq!(split_replies("x\n>  y"), [" y"]);
    }
}
