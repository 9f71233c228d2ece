//! legate's own binaries, run as processes the way operators run them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::process::ChildGuard;
use crate::{WAIT, free_addr, wait_for};

/// Starts of a service on a free metrics port (see [`Service::start_on`]).
const START_ATTEMPTS: usize = 3;

/// The path of a workspace binary (`legate-registrar`, `legate-backend`, ...), built with the
/// profile of the running tests the first time this process asks for it, so that a test never
/// runs a stale binary.
pub fn binary(name: &str) -> Result<PathBuf> {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(name) {
        return Ok(path.clone());
    }
    // Tests live in target/<profile>/deps/, binaries such as `bench` in target/<profile>/.
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("cannot locate the target directory")?;
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().context("cannot locate the target directory")?
    } else {
        dir
    };
    let release = profile_dir.file_name().is_some_and(|p| p == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--quiet", "--workspace", "--bin", name]);
    if release {
        command.arg("--release");
    }
    let output = command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .with_context(|| format!("building {name}"))?;
    if !output.status.success() {
        bail!(
            "cargo build --bin {name} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!("{} does not exist after the build", path.display());
    }
    built.insert(name.to_owned(), path.clone());
    Ok(path)
}

/// The command line of a service, with its metrics on `metrics` and an environment cleared of
/// legate and seed variables but for `env`.
fn command(
    program: &std::path::Path,
    metrics: SocketAddr,
    args: &[String],
    env: &[(String, String)],
) -> Command {
    let mut command = Command::new(program);
    command
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .args(args);
    for (key, _) in std::env::vars() {
        if ["LEGATE_", "ETCD_", "ETCDCTL_", "HOST_"]
            .iter()
            .any(|prefix| key.starts_with(prefix))
        {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    command
}

/// A legate service process with its gRPC listener on a Unix socket of its own (where the tests,
/// running as the same user, administer it) and its metrics on a free loopback port.
#[derive(Debug)]
pub struct Service {
    child: ChildGuard,
    /// What starts it, but for `--metrics-listen` ([`Service::command`]).
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    name: String,
    log: PathBuf,
    grpc: String,
    /// The client's files for a TCP listener with mutual TLS.
    client_tls: legate_proto::transport::TlsArgs,
    metrics: SocketAddr,
    _dir: TempDir,
}

impl Service {
    /// Starts `binary` with `--listen` on a Unix socket in a directory of its own and
    /// `--metrics-listen` on a free port, plus `args` and `env` (the environment is otherwise
    /// cleared of legate and seed variables). A `--listen` in `args` replaces the socket.
    pub fn start(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_on(free_addr()?, binary, args, env)
    }

    /// [`Service::start`] with its metrics on `metrics`. A port found free can be taken by
    /// another process before the service binds it: the service then exits, and
    /// [`Service::wait_serving`] starts it again on another.
    pub fn start_on(
        metrics: SocketAddr,
        binary: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("legate-service-")
            .tempdir()?;
        let listen = args.iter().position(|a| *a == "--listen");
        let grpc = match listen.and_then(|i| args.get(i + 1)) {
            Some(listen) => (*listen).to_owned(),
            None => format!("unix:{}", dir.path().join("grpc.sock").display()),
        };
        let mut all = Vec::new();
        if listen.is_none() {
            all.extend(["--listen".to_owned(), grpc.clone()]);
        }
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let program = self::binary(binary)?;
        let env: Vec<(String, String)> = (env.iter())
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let log = dir.path().join(format!("{binary}.log"));
        let child = ChildGuard::spawn(binary, &command(&program, metrics, &all, &env), &log)?;
        Ok(Self {
            child,
            program,
            args: all,
            env,
            name: binary.to_owned(),
            log,
            grpc,
            client_tls: legate_proto::transport::TlsArgs::default(),
            metrics,
            _dir: dir,
        })
    }

    fn command(&self) -> Command {
        command(&self.program, self.metrics, &self.args, &self.env)
    }

    /// Kills the process with SIGKILL (a crash) and starts it again with the same command,
    /// on the same ports; its output goes on in the same log.
    pub fn restart(&mut self) -> Result<()> {
        self.child.kill();
        self.child = ChildGuard::spawn(&self.name, &self.command(), &self.log)?;
        Ok(())
    }

    /// Starts `legate-confgen` on the etcd endpoint `etcd`, with the HTTP frontend of its
    /// template on `127.0.0.1:<http_port>`, plus `args` and `env`.
    pub fn confgen(
        etcd: &str,
        http_port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let http_port = http_port.to_string();
        let mut all = vec![
            "--etcd-endpoints",
            etcd,
            "--bind-address",
            "127.0.0.1",
            "--http-port",
            &http_port,
        ];
        all.extend_from_slice(args);
        Self::start("legate-confgen", &all, env)
    }

    /// The gRPC endpoint, as a client names it: `unix:<path>` (or what `--listen` said).
    pub fn grpc(&self) -> String {
        self.grpc.clone()
    }

    /// Makes the harness's own clients of a TCP listener present `tls` (mutual TLS).
    pub fn with_client_tls(mut self, tls: legate_proto::transport::TlsArgs) -> Self {
        self.client_tls = tls;
        self
    }

    /// A channel to the gRPC endpoint, connecting on first use: the Unix socket, or the TCP
    /// listener (`https://` with [`Service::with_client_tls`], else `http://`).
    pub fn channel(&self) -> Result<tonic::transport::Channel> {
        let endpoint = if self.grpc.starts_with("unix:") {
            self.grpc.clone()
        } else if self.client_tls.ca.is_some() {
            format!("https://{}", self.grpc)
        } else {
            format!("http://{}", self.grpc)
        };
        Ok(legate_proto::transport::channel(
            &endpoint,
            &self.client_tls,
        )?)
    }

    /// The metrics address.
    pub fn metrics(&self) -> SocketAddr {
        self.metrics
    }

    /// A channel to the gRPC endpoint once its Unix socket accepts connections (the service
    /// may not be SERVING yet).
    pub async fn connect(&self) -> Result<tonic::transport::Channel> {
        if let Some(path) = self.grpc.strip_prefix("unix:") {
            wait_for("the service's gRPC socket", WAIT, || async move {
                Ok(tokio::net::UnixStream::connect(path).await.ok().map(drop))
            })
            .await?;
        }
        self.channel()
    }

    /// Waits until `grpc.health.v1` reports the server (service "") as SERVING; fails at once
    /// if the process exits, unless it exited because its metrics port was taken meanwhile:
    /// then it is started again on another.
    pub async fn wait_serving(&mut self) -> Result<()> {
        let mut attempt = 1;
        loop {
            match self.serving().await {
                Err(_) if attempt < START_ATTEMPTS && self.lost_metrics_port() => {
                    attempt += 1;
                    self.metrics = free_addr()?;
                    self.child = ChildGuard::spawn(&self.name, &self.command(), &self.log)?;
                }
                serving => return serving,
            }
        }
    }

    async fn serving(&mut self) -> Result<()> {
        let channel = self.channel()?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.child.check_running()?;
            let request = HealthCheckRequest {
                service: String::new(),
            };
            let answer = HealthClient::new(channel.clone()).check(request).await;
            match answer.map(|status| status.into_inner().status()) {
                Ok(ServingStatus::Serving) => return Ok(()),
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(status) => bail!("the service is {status:?} after {WAIT:?}"),
                Err(e) => return Err(e).context(format!("no health answer within {WAIT:?}")),
            }
        }
    }

    /// Whether the process exited because its metrics port was taken.
    fn lost_metrics_port(&mut self) -> bool {
        self.child.check_running().is_err() && self.log().contains("cannot serve metrics")
    }

    /// The Prometheus metrics text.
    pub async fn metrics_text(&self) -> Result<String> {
        let (status, body) = crate::http_get(self.metrics, "localhost", "/metrics").await?;
        if status != 200 {
            bail!("metrics answered {status}");
        }
        Ok(body)
    }

    /// A metric's value summed over its label sets; 0 when the service has not set it.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics_text().await?;
        Ok(text
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.child.signal(Signal::SIGTERM)?;
        self.child.wait_exit(timeout).await
    }

    /// Kills the process with SIGKILL (a crash).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.child.wait_exit(timeout).await
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}
