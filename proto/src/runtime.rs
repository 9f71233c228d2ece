//! What every legate service binary shares, for its thin `main.rs`: command-line parsing with
//! the conventional exit code, tracing, the Prometheus exporter, shutdown on SIGTERM/SIGINT,
//! and the health service (the gRPC listener itself is in [`crate::transport`]).
//!
//! Lifecycle: `main` parses its arguments with [`parse_args`], then hands the service's `run`
//! function to [`run_service`], which sets up tracing, metrics and signals, runs the service
//! until it returns or a signal cancels its [`CancellationToken`], and waits for it to stop
//! within a grace period. Library code of the services never reads signals or exits.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::registry::{HostId, HostIp, Prefix};

/// Exit code for a bad configuration (`EX_USAGE` of sysexits.h).
pub const EXIT_CONFIG: u8 = 64;
/// How long a service may take to stop after SIGTERM/SIGINT.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags every service has.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Log format.
    #[arg(long, env = "LEGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, in tracing's `EnvFilter` syntax (e.g. `info,legate_registrar=debug`).
    #[arg(long, env = "LEGATE_LOG", default_value = "info")]
    pub log: String,
}

/// How a service reaches etcd, and where the registry lives in it.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated, as host:port, http:// or https:// URLs.
    #[arg(long = "etcd-endpoints", env = "ETCD_ENDPOINTS", value_delimiter = ',', value_parser = parse_etcd_endpoint)]
    endpoints: Vec<String>,
    /// The seed's name for a single etcd endpoint; used when --etcd-endpoints is not set.
    #[arg(long = "etcd-host", env = "ETCD_HOST", value_parser = parse_etcd_endpoint)]
    host: Option<String>,
    /// Prefix of the registry keys in etcd: empty (the seed's layout) or like `/legate`.
    #[arg(long, env = "LEGATE_PREFIX", default_value = "", value_parser = parse_prefix)]
    pub prefix: Prefix,
    /// CA bundle (PEM) that etcd's server certificate must chain to: needed by https://
    /// endpoints.
    #[arg(long = "etcd-cacert", env = "ETCDCTL_CACERT")]
    etcd_cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for an etcd started with `--client-cert-auth`.
    #[arg(long = "etcd-cert", env = "ETCDCTL_CERT", requires = "etcd_key")]
    etcd_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of `--etcd-cert`.
    #[arg(long = "etcd-key", env = "ETCDCTL_KEY", requires = "etcd_cert")]
    etcd_key: Option<std::path::PathBuf>,
    /// etcd user (etcd's authentication); the password is read from `--etcd-password-file`.
    #[arg(long = "etcd-user", env = "ETCDCTL_USER", value_parser = parse_etcd_user,
          requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password (a compose secret, a systemd credential): never
    /// a flag or an environment value, which `ps` and `docker inspect` show.
    #[arg(
        long = "etcd-password-file",
        env = "LEGATE_ETCD_PASSWORD_FILE",
        requires = "etcd_user"
    )]
    etcd_password_file: Option<std::path::PathBuf>,
}

/// Why etcd could not be used. `fatal`: retrying cannot help (a file, TLS, credentials or
/// permissions are wrong), so the service stops and says why.
#[cfg(feature = "etcd")]
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EtcdError {
    /// Retrying cannot help.
    pub fatal: bool,
    /// What went wrong, with every cause.
    pub message: String,
}

#[cfg(feature = "etcd")]
impl EtcdError {
    fn fatal(message: String) -> Self {
        Self {
            fatal: true,
            message,
        }
    }

    /// Classifies an etcd client error: TLS refusals, failed authentication and missing
    /// permissions are fatal, the rest (etcd silent, unreachable, electing) is transient.
    pub fn of(e: &etcd_client::Error) -> Self {
        let permission = matches!(e, etcd_client::Error::GRpcStatus(s)
            if s.code() == tonic::Code::PermissionDenied);
        Self::classify(error_chain(e), permission)
    }

    fn classify(mut message: String, permission: bool) -> Self {
        let lower = message.to_ascii_lowercase();
        let hint = if lower.contains("received fatal alert") {
            Some(
                "etcd refused this client's certificate: none given (--etcd-cert), expired, \
                 or not signed by a CA in etcd's --trusted-ca-file",
            )
        } else if lower.contains("invalid peer certificate") {
            Some("etcd's certificate does not verify against --etcd-cacert")
        } else if lower.contains("authentication failed") {
            Some("wrong --etcd-user, or wrong password in --etcd-password-file")
        } else if lower.contains("user name is empty") {
            Some("etcd has authentication on: set --etcd-user and --etcd-password-file")
        } else if lower.contains("permission denied") {
            Some("the etcd user's roles do not allow this on legate's keys (--prefix)")
        } else {
            None
        };
        if let Some(hint) = hint {
            message = format!("{hint} ({message})");
        }
        let fatal = permission
            || [
                "authentication failed",
                "user name is empty",
                "user name not found",
                "authentication is not enabled",
                "permission denied",
                "certificate",
                "handshake",
                "alert",
                "invalidcontenttype",
                "corrupt message",
            ]
            .iter()
            .any(|cause| lower.contains(cause));
        Self { fatal, message }
    }
}

/// The TLS alert with which etcd refuses this client, if it does. With TLS 1.3 the server
/// judges the client's certificate after the client's side of the handshake is done, and its
/// alert may reach a gRPC client that is already writing only as a broken connection: a
/// connection that failed that way is tried once more, with a handshake of our own and a read,
/// which gets the alert itself. `None`: no alert (etcd is down, or it accepts the client).
#[cfg(feature = "etcd")]
async fn tls_refusal(args: &EtcdArgs, endpoints: &[String]) -> Option<String> {
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};

    let pem = std::fs::read(args.etcd_cacert.as_ref()?).ok()?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.ok()?).ok()?;
    }
    let builder =
        ClientConfig::builder_with_provider(std::sync::Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots);
    let mut config = match (&args.etcd_cert, &args.etcd_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_slice_iter(&std::fs::read(cert).ok()?)
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_slice(&std::fs::read(key).ok()?).ok()?;
            builder.with_client_auth_cert(certs, key).ok()?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let authority = endpoints
        .iter()
        .find_map(|e| e.strip_prefix("https://"))?
        .split('/')
        .next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let wait = Duration::from_secs(3);
    let tcp = tokio::time::timeout(wait, tokio::net::TcpStream::connect((host, port)))
        .await
        .ok()?
        .ok()?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let alert = |e: std::io::Error| {
        let text = e.to_string();
        text.contains("alert").then_some(text)
    };
    let mut tls = match tokio::time::timeout(wait, connector.connect(name, tcp))
        .await
        .ok()?
    {
        Ok(tls) => tls,
        Err(e) => return alert(e),
    };
    // An accepted client gets the server's HTTP/2 settings; a refused one, the alert.
    let mut byte = [0u8; 1];
    match tokio::time::timeout(wait, tls.read(&mut byte)).await.ok()? {
        Ok(_) => None,
        Err(e) => alert(e),
    }
}

/// An error and each of its sources, joined by ": ", without a source repeated by the error
/// that wraps it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

impl EtcdArgs {
    /// The endpoint used when none is configured.
    pub const DEFAULT_ENDPOINT: &'static str = "http://127.0.0.1:2379";

    /// The endpoints to connect to, as URLs: `--etcd-endpoints`, else `--etcd-host`, else
    /// [`Self::DEFAULT_ENDPOINT`].
    pub fn endpoints(&self) -> Vec<String> {
        if !self.endpoints.is_empty() {
            self.endpoints.clone()
        } else if let Some(host) = &self.host {
            vec![host.clone()]
        } else {
            vec![Self::DEFAULT_ENDPOINT.to_owned()]
        }
    }

    /// Connects to etcd once, and reads one key of the registry to prove that TLS, the
    /// credentials and the read permission all work: an [`EtcdError`] says which failed and
    /// whether retrying can help ([`Self::connect_retrying`] retries what can). Requests time
    /// out after 5 s; a connection that carries a watch or a lease keep-alive and goes dead is
    /// noticed within 9 s by HTTP/2 keep-alives.
    ///
    /// The ping interval respects etcd's policy: the server closes a connection that pings
    /// more often than `--grpc-keepalive-min-time` (5 s by default) while it has streams, and
    /// one that pings at all while it has none (gRPC's `PermitWithoutStream` is off in etcd),
    /// so pings are sent every 6 s and only while a call is open.
    ///
    /// With several endpoints, a task follows the members until `shutdown` (see
    /// [`follow_members`]): the client's own balancing would keep sending calls to a dead member.
    #[cfg(feature = "etcd")]
    pub async fn connect(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<etcd_client::Client, EtcdError> {
        let options = self
            .secured(etcd_client::ConnectOptions::new())?
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(ETCD_PING_INTERVAL, Duration::from_secs(3))
            .with_keep_alive_while_idle(false);
        let endpoints = self.endpoints();
        let probe =
            crate::registry::Schema::new(self.prefix.clone()).dir(crate::registry::KeyKind::App);
        let connected = async {
            let mut client = etcd_client::Client::connect(&endpoints, Some(options)).await?;
            let first = etcd_client::GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_limit(1);
            client.get(probe, Some(first)).await?;
            Ok::<_, etcd_client::Error>(client)
        };
        let client = match connected.await {
            Ok(client) => client,
            Err(e) => {
                let error = EtcdError::of(&e);
                if error.fatal || self.etcd_cacert.is_none() {
                    return Err(error);
                }
                return Err(match tls_refusal(self, &endpoints).await {
                    Some(alert) => {
                        EtcdError::classify(format!("{alert}: {}", error.message), false)
                    }
                    None => error,
                });
            }
        };
        if endpoints.len() > 1 {
            let probe = self.secured(etcd_client::ConnectOptions::new())?;
            tokio::spawn(follow_members(
                client.clone(),
                probe,
                endpoints,
                shutdown.child_token(),
            ));
        }
        Ok(client)
    }

    /// [`Self::connect`], retried with backoff while etcd's errors are transient; `Ok(None)`
    /// when `shutdown` comes first.
    #[cfg(feature = "etcd")]
    pub async fn connect_retrying(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<etcd_client::Client>, EtcdError> {
        let mut backoff = Backoff::default();
        loop {
            match self.connect(shutdown).await {
                Ok(client) => return Ok(Some(client)),
                Err(e) if e.fatal => return Err(e),
                Err(e) => {
                    let delay = backoff.delay();
                    warn!(error = %e, retry_in = ?delay, "connecting to etcd");
                    if !pause(delay, shutdown).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// `options` with the TLS files and credentials: https:// endpoints need `--etcd-cacert`,
    /// a client certificate needs https://, and the files must be readable.
    #[cfg(feature = "etcd")]
    fn secured(
        &self,
        mut options: etcd_client::ConnectOptions,
    ) -> Result<etcd_client::ConnectOptions, EtcdError> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| EtcdError::fatal(format!("{flag} {}: {e}", path.display())))
        };
        self.check().map_err(EtcdError::fatal)?;
        if let Some(ca) = self.etcd_cacert.as_deref() {
            let mut tls = etcd_client::TlsOptions::new().ca_certificate(
                etcd_client::Certificate::from_pem(read("--etcd-cacert", ca)?),
            );
            if let (Some(cert), Some(key)) = (&self.etcd_cert, &self.etcd_key) {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read("--etcd-cert", cert)?,
                    read("--etcd-key", key)?,
                ));
            }
            options = options.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&self.etcd_user, &self.etcd_password_file) {
            let password = String::from_utf8(read("--etcd-password-file", file)?)
                .map_err(|_| EtcdError::fatal(format!("{}: not UTF-8", file.display())))?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(EtcdError::fatal(format!(
                    "--etcd-password-file {}: empty",
                    file.display()
                )));
            }
            options = options.with_user(user.clone(), password);
        }
        Ok(options)
    }
}

impl EtcdArgs {
    /// What the flags cannot say alone: https:// endpoints need `--etcd-cacert`, TLS files
    /// need https://, and all endpoints use one scheme.
    pub fn check(&self) -> Result<(), String> {
        let endpoints = self.endpoints();
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https > 0 && https < endpoints.len() {
            return Err("etcd endpoints mix http:// and https://".to_owned());
        }
        if https > 0 && self.etcd_cacert.is_none() {
            return Err("https:// etcd endpoints need --etcd-cacert".to_owned());
        }
        if https == 0 && (self.etcd_cacert.is_some() || self.etcd_cert.is_some()) {
            return Err(
                "etcd TLS files are set but the endpoints are http://: use https://".to_owned(),
            );
        }
        Ok(())
    }
}

/// Checks of a service's configuration that involve several flags, run after clap's own: a
/// failure is a bad configuration like any other (exit status 64).
pub trait Check {
    /// What is wrong, if anything.
    fn check(&self) -> Result<(), String>;
}

/// clap value parser for `--etcd-user`: a name alone (etcdctl's `user:password` would put the
/// password in the environment).
pub fn parse_etcd_user(s: &str) -> Result<String, String> {
    if s.contains(':') {
        return Err(
            "a password in the user name is visible to `ps` and `docker inspect`: give the \
             name alone and the password in --etcd-password-file"
                .to_owned(),
        );
    }
    if s.is_empty() || s.chars().any(char::is_control) {
        return Err("must be a non-empty name".to_owned());
    }
    Ok(s.to_owned())
}

/// How often every etcd member is asked whether it answers, and how long it has to answer.
#[cfg(feature = "etcd")]
const MEMBER_PROBE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_millis(1500));

/// Keeps `client`'s set of endpoints to the members that answer, until `shutdown`.
///
/// Why: etcd-client balances calls over its endpoints with tonic's power-of-two-choices
/// balancer, and a member that is down still counts as ready there: each call sent to it fails
/// at once ("tcp connect error"), which makes it look lightly loaded, so it keeps being chosen.
/// With one member of three down, registrations stalled for seconds. So every member is asked
/// for its status (on a connection of its own) every second; one that does not answer within
/// 1.5 s leaves the balance set, and comes back as soon as it answers again. When no member
/// answers, nothing tells the good from the bad: every endpoint is used.
#[cfg(feature = "etcd")]
async fn follow_members(
    client: etcd_client::Client,
    options: etcd_client::ConnectOptions,
    endpoints: Vec<String>,
    shutdown: CancellationToken,
) {
    let (interval, timeout) = MEMBER_PROBE;
    let options = options.with_connect_timeout(timeout).with_timeout(timeout);
    let mut probes = Vec::new();
    for endpoint in &endpoints {
        match etcd_client::Client::connect([endpoint], Some(options.clone())).await {
            Ok(probe) => probes.push(probe),
            Err(e) => {
                warn!(endpoint, error = %e, "cannot follow the etcd members: all are used");
                return;
            }
        }
    }
    let mut used = vec![true; endpoints.len()];
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let mut asks = tokio::task::JoinSet::new();
        for (i, probe) in probes.iter().enumerate() {
            let mut probe = probe.clone();
            asks.spawn(async move {
                let answer = tokio::time::timeout(timeout, probe.status()).await;
                (i, matches!(answer, Ok(Ok(_))))
            });
        }
        let mut answering = vec![false; endpoints.len()];
        while let Some(Ok((i, up))) = asks.join_next().await {
            answering[i] = up;
        }
        let count = answering.iter().filter(|up| **up).count();
        metrics::gauge!("legate_etcd_members_answering").set(count as f64);
        if count == 0 {
            answering = vec![true; endpoints.len()];
        }
        for (i, endpoint) in endpoints.iter().enumerate() {
            if answering[i] == used[i] {
                continue;
            }
            let changed = if answering[i] {
                client.add_endpoint(endpoint).await
            } else {
                client.remove_endpoint(endpoint).await
            };
            match changed {
                Ok(()) if answering[i] => info!(endpoint, "etcd member answers again: in use"),
                Ok(()) => warn!(
                    endpoint,
                    "etcd member does not answer: not used until it does"
                ),
                Err(e) => {
                    warn!(endpoint, error = %e, "cannot change the etcd endpoints");
                    continue;
                }
            }
            used[i] = answering[i];
        }
    }
}

/// How often an etcd connection with open calls is pinged: above etcd's default
/// `--grpc-keepalive-min-time` of 5 s, which closes the connection of a client that pings more
/// often.
pub const ETCD_PING_INTERVAL: Duration = Duration::from_secs(6);

/// Parses one etcd endpoint into a URL: `host:port` gains `http://`.
pub fn parse_etcd_endpoint(s: &str) -> Result<String, String> {
    let (scheme, rest) = if let Some(rest) = s.strip_prefix("http://") {
        ("http", rest)
    } else if let Some(rest) = s.strip_prefix("https://") {
        ("https", rest)
    } else if s.contains("://") {
        return Err(format!(
            "'{}' is not an http:// or https:// URL",
            s.escape_default()
        ));
    } else {
        ("http", s)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let valid = rest.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c))
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    });
    if !valid {
        return Err(format!(
            "'{}' is not host:port or http://host:port",
            s.escape_default()
        ));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// clap value parser for a directory whose files a configuration may name
/// (`--allowed-file-dir`): an absolute path without `.` or `..`, not the root.
pub fn parse_allowed_dir(s: &str) -> Result<std::path::PathBuf, String> {
    use std::path::{Component, Path};
    let path = Path::new(s);
    let plain = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain || path.parent().is_none() {
        return Err(format!(
            "'{}' is not an absolute directory below / (without '.' or '..')",
            s.escape_default()
        ));
    }
    Ok(path.to_path_buf())
}

/// clap value parser for [`Prefix`].
pub fn parse_prefix(s: &str) -> Result<Prefix, String> {
    Prefix::new(s).map_err(|e| e.to_string())
}

/// clap value parser for [`HostIp`].
pub fn parse_host_ip(s: &str) -> Result<HostIp, String> {
    HostIp::parse(s).map_err(|e| e.to_string())
}

/// Parses the command line and [`Check`]s it; on `--help`/`--version` prints and returns
/// success, on a bad configuration prints the error and returns [`EXIT_CONFIG`].
pub fn parse_args<T: Parser + Check>() -> Result<T, ExitCode> {
    let args = T::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(EXIT_CONFIG)
        } else {
            ExitCode::SUCCESS
        }
    })?;
    if let Err(why) = args.check() {
        let error = T::command().error(clap::error::ErrorKind::ArgumentConflict, why);
        let _ = error.print();
        return Err(ExitCode::from(EXIT_CONFIG));
    }
    Ok(args)
}

/// Why this host has no id.
#[derive(Debug, thiserror::Error)]
pub enum HostIdError {
    /// The host name cannot be read.
    #[error("cannot read the host name ({0}): set HOST_ID")]
    HostName(#[source] nix::errno::Errno),
    /// The host name is not a valid host id.
    #[error("{source}: set HOST_ID")]
    Invalid {
        #[source]
        source: crate::registry::ValidationError,
    },
}

/// This host's id: `configured` (`--host-id`/`HOST_ID`), else the host name if it is a valid
/// host id; the error says why not and what to set.
pub fn host_id(configured: Option<&HostId>) -> Result<HostId, HostIdError> {
    if let Some(id) = configured {
        return Ok(id.clone());
    }
    let name = nix::unistd::gethostname().map_err(HostIdError::HostName)?;
    HostId::new(&name.to_string_lossy()).map_err(|source| HostIdError::Invalid { source })
}

/// How long an attempt (a stream, a process) must have lasted to count as healthy: its failure
/// then starts the backoff again from the smallest delay.
pub const HEALTHY: Duration = Duration::from_secs(10);

/// The longest delay of a [`Backoff`] unless capped lower.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The delays between the attempts of anything transient: jittered exponential from 100 ms up
/// to a cap ([`MAX_BACKOFF`] unless set), for ever. A success [`Backoff::reset`]s it; so does
/// the failure of an attempt that had stayed up [`HEALTHY`] ([`Backoff::after`]), so that an
/// occasional failure is retried fast while one that repeats at once is not retried in a tight
/// loop.
pub struct Backoff {
    cap: Duration,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

impl std::fmt::Debug for Backoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff").field("cap", &self.cap).finish()
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::capped(MAX_BACKOFF)
    }
}

impl Backoff {
    /// Delays of at most `cap`: for what must be noticed within `cap` once it works again.
    pub fn capped(cap: Duration) -> Self {
        Self {
            cap,
            delays: Self::fresh(),
        }
    }

    fn fresh() -> Box<dyn Iterator<Item = Duration> + Send> {
        use backon::BackoffBuilder;
        Box::new(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(MAX_BACKOFF)
                .with_jitter()
                .without_max_times()
                .build(),
        )
    }

    /// Starts again from the smallest delay.
    pub fn reset(&mut self) {
        self.delays = Self::fresh();
    }

    /// The next delay.
    pub fn delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(MAX_BACKOFF).min(self.cap)
    }

    /// The next delay after the failure of an attempt that began at `began`: from the smallest
    /// again when the attempt had stayed up [`HEALTHY`].
    pub fn after(&mut self, began: tokio::time::Instant) -> Duration {
        if began.elapsed() >= HEALTHY {
            self.reset();
        }
        self.delay()
    }
}

/// Coalesces a burst of changes into one action. The first change after a quiet spell (no
/// action for `min`) is acted on at once; one that comes within `min` of an action is held
/// until `min` after that action (actions are at least `min` apart); changes that follow a held
/// one within `min` are held with it and acted on together, `min` after the last of them, yet
/// never later than `max` after the first held one: a steady stream of changes is still acted
/// on every `max`.
///
/// The owner asks [`Debounce::change`] at each change, sleeps until [`Debounce::due`], and
/// says [`Debounce::acted`] after each action (also one taken for another reason: it covers
/// what was held).
#[derive(Debug, Clone)]
pub struct Debounce {
    min: Duration,
    max: Duration,
    /// The first held change, and when to act on what is held.
    held: Option<(tokio::time::Instant, tokio::time::Instant)>,
    acted: Option<tokio::time::Instant>,
}

impl Debounce {
    /// Quiet spells of `min`, at most `max` from a held change to its action.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            held: None,
            acted: None,
        }
    }

    /// A change now: `true` to act on it at once, else it is held until [`Debounce::due`].
    pub fn change(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if self.held.is_none() && self.acted.is_none_or(|at| now - at >= self.min) {
            return true;
        }
        let (first, at) = match (self.held, self.acted) {
            // Another change of a burst: held until it is quiet.
            (Some((first, _)), _) => (first, now + self.min),
            // The first since an action: held only until `min` after it.
            (None, Some(acted)) => (now, acted + self.min),
            (None, None) => (now, now + self.min),
        };
        self.held = Some((first, at.min(first + self.max)));
        false
    }

    /// When to act on the held changes; `None` when none are held.
    pub fn due(&self) -> Option<tokio::time::Instant> {
        self.held.map(|(_, at)| at)
    }

    /// An action was taken now: nothing is held any more.
    pub fn acted(&mut self) {
        self.held = None;
        self.acted = Some(tokio::time::Instant::now());
    }
}

/// Sleeps `delay`; `false` when `shutdown` comes first.
pub async fn pause(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Sleeps until `deadline`; for ever when there is none (a `select!` branch that never fires).
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Retries `attempt` with a [`Backoff`], logging each failure with `what`, until it succeeds
/// (`Some`) or `shutdown` is cancelled (`None`).
pub async fn retry<T, E: std::fmt::Display, Fut: Future<Output = Result<T, E>>>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: impl FnMut() -> Fut,
) -> Option<T> {
    retry_within(what, MAX_BACKOFF, shutdown, attempt).await
}

/// [`retry`] with no delay between attempts longer than `cap`: for what must be noticed
/// within `cap` once it works again.
pub async fn retry_within<T, E: std::fmt::Display, Fut: Future<Output = Result<T, E>>>(
    what: &str,
    cap: Duration,
    shutdown: &CancellationToken,
    mut attempt: impl FnMut() -> Fut,
) -> Option<T> {
    let mut backoff = Backoff::capped(cap);
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(e) => {
                let delay = backoff.delay();
                warn!(error = %e, retry_in = ?delay, "{what}");
                if !pause(delay, shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// Keeps a per-change log line at INFO at most once per period: the first change after a quiet
/// period is logged at INFO with how many went by at DEBUG since the last INFO line, the
/// others at DEBUG. Under churn (20 changes a second) a service then writes a line every few
/// seconds instead of one per change; warnings and errors are never throttled.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<std::time::Instant>,
    quiet: u64,
}

impl Throttle {
    /// At most one INFO line per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            quiet: 0,
        }
    }

    /// `Some(n)` when this change may be logged at INFO, `n` being the changes logged at DEBUG
    /// since the last INFO line; `None` when it goes to DEBUG.
    pub fn info(&mut self) -> Option<u64> {
        self.info_at(std::time::Instant::now())
    }

    fn info_at(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            self.quiet += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.quiet))
    }
}

/// Logs a per-change line at INFO through a [`Throttle`] (with a `quiet` field: the changes
/// logged at DEBUG since the last INFO line), or at DEBUG.
#[macro_export]
macro_rules! throttled {
    ($throttle:expr, $($arg:tt)+) => {
        match $throttle.info() {
            Some(quiet) => ::tracing::info!(quiet, $($arg)+),
            None => ::tracing::debug!($($arg)+),
        }
    };
}

/// How often a per-change line may be at INFO ([`Throttle`]).
pub const INFO_EVERY: Duration = Duration::from_secs(10);

/// Which tokio runtime a service runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One thread: for a service whose heavy work is sequential anyway (confgen renders one
    /// configuration at a time); its memory stays in one malloc arena.
    One,
    /// A worker per core.
    PerCore,
}

/// Runs a service to completion: tracing, the Prometheus exporter on `metrics_listen`, and
/// SIGTERM/SIGINT cancelling the token given to `service`. Returns the process exit code.
pub fn run_service<F, Fut, E>(
    name: &'static str,
    common: &CommonArgs,
    metrics_listen: SocketAddr,
    threads: Threads,
    service: F,
) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    if let Err(e) = init_tracing(common) {
        eprintln!("{name}: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        if let Err(e) = cancel_on_signals(shutdown.clone()) {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        if let Err(e) = install_metrics(name, metrics_listen) {
            // A port that another process holds is this host's configuration to fix: the
            // units do not restart on EXIT_CONFIG, so this is said once, not in a loop.
            let holder = holder_of(metrics_listen)
                .map(|h| format!("; {h} holds it"))
                .unwrap_or_default();
            error!(
                error = %e, %metrics_listen,
                "cannot serve metrics{holder}: free the port, or move this listener with \
                 --metrics-listen (LEGATE_METRICS_LISTEN)"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        info!(version = env!("CARGO_PKG_VERSION"), %metrics_listen, "{name} starting");
        let service = service(shutdown.clone());
        tokio::pin!(service);
        let result = tokio::select! {
            result = &mut service => result,
            () = shutdown.cancelled() => {
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut service).await {
                    Ok(result) => result,
                    Err(_) => {
                        error!(grace = ?SHUTDOWN_GRACE, "did not stop within the grace period");
                        return ExitCode::FAILURE;
                    }
                }
            }
        };
        match result {
            Ok(()) => {
                info!("{name} stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!(error = %e, "{name} failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Parses a duration with a unit: `ms`, `s` or `m` (`0` alone is zero).
pub fn parse_duration(part: &str) -> Result<Duration, String> {
    let split = part
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(part.len());
    let (number, unit) = part.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{}' is not a duration like 5ms", part.escape_default()))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "" if n == 0 => Ok(Duration::ZERO),
        _ => Err(format!(
            "'{}' needs a unit: ms, s or m",
            part.escape_default()
        )),
    }
}

/// The process that listens on `addr`'s port (on `addr`'s address or on every address), as
/// `name (pid N)`, read from `/proc`; `None` when there is none or it cannot be seen (another
/// user's process, without root).
pub fn holder_of(addr: SocketAddr) -> Option<String> {
    let inode = listening_inode(addr)?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
        });
        if holds {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some(format!("{} (pid {pid})", name.trim()));
        }
    }
    None
}

/// The inode of the listening TCP socket on `addr`'s port, at its address or a wildcard (any
/// address when `addr`'s is the wildcard).
fn listening_inode(addr: SocketAddr) -> Option<u64> {
    const LISTEN: &str = "0A";
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let Some((ip, port)) = local.split_once(':') else {
                continue;
            };
            if *state != LISTEN || u16::from_str_radix(port, 16).ok() != Some(addr.port()) {
                continue;
            }
            // The address as the kernel prints it: hex of the bytes as stored, so 127.0.0.1
            // is `0100007F`; a wildcard is all zeros.
            let wildcard = ip.bytes().all(|b| b == b'0');
            let same = match addr.ip() {
                std::net::IpAddr::V4(v4) => {
                    ip.len() == 8
                        && u32::from_str_radix(ip, 16).ok() == Some(u32::from_le_bytes(v4.octets()))
                }
                std::net::IpAddr::V6(_) => false,
            };
            if wildcard || same || addr.ip().is_unspecified() {
                return inode.parse().ok();
            }
        }
    }
    None
}

/// Errors of the process around a service: setup, listeners.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The log filter does not parse.
    #[error("bad log filter: {0}")]
    LogFilter(#[from] tracing_subscriber::filter::ParseError),
    /// A global subscriber is already installed.
    #[error("tracing is already initialised")]
    TracingInstalled,
    /// The metrics exporter could not start.
    #[error("metrics exporter: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// The metrics listener could not bind.
    #[error("cannot listen: {0}")]
    MetricsListen(std::io::Error),
    /// A gRPC listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The gRPC listener's TLS settings are incomplete or unreadable, or missing on TCP.
    #[error("{0}")]
    Tls(String),
    /// The gRPC Unix socket could not be set up.
    #[error("gRPC socket {}: {reason}", path.display())]
    Socket {
        /// The socket's path.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// A gRPC endpoint to connect to is not usable.
    #[error("gRPC endpoint '{endpoint}': {reason}")]
    Endpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// Why.
        reason: String,
    },
}

/// Installs the global tracing subscriber, logging to stderr, in colour only on a terminal
/// (journald and `docker logs` get plain text).
pub fn init_tracing(common: &CommonArgs) -> Result<(), RuntimeError> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::builder().parse(&common.log)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match common.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|_| RuntimeError::TracingInstalled)
}

/// Serves Prometheus metrics (and the pages a service adds, [`crate::web`]) on `listen` and
/// records `legate_build_info{service,version} 1`. Must run inside the tokio runtime.
pub fn install_metrics(service: &'static str, listen: SocketAddr) -> Result<(), RuntimeError> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    crate::web::listen(listen, handle).map_err(RuntimeError::MetricsListen)?;
    metrics::describe_gauge!("legate_build_info", "legate build information; always 1");
    metrics::gauge!("legate_build_info", "service" => service, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    Ok(())
}

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> Result<(), RuntimeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RuntimeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RuntimeError::Signal)?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        warn!(signal = name, "shutting down");
        token.cancel();
    });
    Ok(())
}

/// The `grpc.health.v1` service, reporting NOT_SERVING until the service sets it SERVING, as
/// the routes to add the service's API to.
pub async fn health_routes() -> (tonic_health::server::HealthReporter, tonic::service::Routes) {
    let (health, service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    (health, tonic::service::Routes::new(service))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_port_is_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let holder = holder_of(addr).unwrap();
        assert!(
            holder.ends_with(&format!("(pid {})", std::process::id())),
            "{holder}"
        );
        // The same port asked for on every address is held as well.
        let any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
        assert_eq!(holder_of(any), Some(holder));
        drop(listener);
        assert_eq!(holder_of(addr), None);
    }

    #[test]
    fn etcd_endpoints_are_urls() {
        assert_eq!(
            parse_etcd_endpoint("10.0.0.1:4001").unwrap(),
            "http://10.0.0.1:4001"
        );
        assert_eq!(
            parse_etcd_endpoint("http://etcd:2379/").unwrap(),
            "http://etcd:2379"
        );
        assert_eq!(
            parse_etcd_endpoint("[::1]:2379").unwrap(),
            "http://[::1]:2379"
        );
        assert_eq!(
            parse_etcd_endpoint("https://etcd:2379").unwrap(),
            "https://etcd:2379"
        );
        for bad in [
            "",
            "etcd",
            "etcd:",
            "etcd:0",
            "etcd:99999",
            "ftp://x:1",
            "a b:1",
        ] {
            assert!(parse_etcd_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Drives a debounce of 100 ms/400 ms with changes at the given times (ms from the
    /// start), acting when asked to and when due; the times of the actions.
    async fn debounced(changes: &[u64]) -> Vec<u64> {
        let start = tokio::time::Instant::now();
        let ms = |at: tokio::time::Instant| (at - start).as_millis() as u64;
        let mut debounce = Debounce::new(Duration::from_millis(100), Duration::from_millis(400));
        let mut actions = Vec::new();
        let mut changes = changes.iter().copied().peekable();
        loop {
            let next = changes.peek().map(|at| start + Duration::from_millis(*at));
            tokio::select! {
                biased;
                () = sleep_until(debounce.due()) => {
                    debounce.acted();
                    actions.push(ms(tokio::time::Instant::now()));
                }
                () = sleep_until(next) => {
                    changes.next();
                    if debounce.change() {
                        debounce.acted();
                        actions.push(ms(tokio::time::Instant::now()));
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(5)) => return actions,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_debounce_acts_at_once_after_a_quiet_spell_and_holds_a_burst_until_it_ends() {
        // One change: at once.
        assert_eq!(debounced(&[0]).await, [0]);
        // Two changes apart: each at once.
        assert_eq!(debounced(&[0, 300]).await, [0, 300]);
        // A burst: its first at once, the rest 100 ms after the last of them.
        assert_eq!(debounced(&[0, 10, 50, 120]).await, [0, 220]);
        // A change within 100 ms of an action is held until 100 ms after that action.
        assert_eq!(debounced(&[0, 60]).await, [0, 100]);
        assert_eq!(debounced(&[0, 99, 300]).await, [0, 100, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_of_changes_is_acted_on_every_max() {
        let changes: Vec<u64> = (0..=1000).step_by(50).collect();
        // At once; the change at 50 100 ms after that action (none came in between); then 400
        // ms after the first held change (100, then 500); the last ones 100 ms after the
        // stream ends.
        assert_eq!(debounced(&changes).await, [0, 100, 500, 900, 1100]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_action_taken_for_another_reason_covers_what_was_held() {
        let mut debounce = Debounce::new(Duration::from_millis(100), Duration::from_millis(400));
        assert!(debounce.change());
        debounce.acted();
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(!debounce.change(), "held: within the quiet time");
        assert!(debounce.due().is_some());
        debounce.acted();
        assert_eq!(debounce.due(), None);
    }

    #[test]
    fn a_backoff_grows_to_its_cap_and_starts_again_after_a_reset_or_a_healthy_attempt() {
        let mut backoff = Backoff::default();
        let first = backoff.delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let later: Vec<Duration> = (0..20).map(|_| backoff.delay()).collect();
        assert!(later.iter().all(|d| *d <= MAX_BACKOFF), "{later:?}");
        assert!(
            later[15..].iter().all(|d| *d >= Duration::from_secs(2)),
            "{later:?}"
        );
        backoff.reset();
        assert!(backoff.delay() <= Duration::from_millis(200));

        // An attempt that failed at once does not reset; one that stayed up HEALTHY does.
        for _ in 0..10 {
            backoff.delay();
        }
        let now = tokio::time::Instant::now();
        assert!(backoff.after(now) >= Duration::from_secs(1));
        let long_ago = now - HEALTHY;
        assert!(backoff.after(long_ago) <= Duration::from_millis(200));

        let mut capped = Backoff::capped(Duration::from_millis(300));
        assert!((0..20).all(|_| capped.delay() <= Duration::from_millis(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_with_its_delay_or_at_shutdown() {
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(pause(Duration::from_secs(3), &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        let cancel = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            cancel.cancel();
        });
        assert!(!pause(Duration::from_secs(60), &shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(4));
        let never = tokio::time::timeout(Duration::from_secs(3600), sleep_until(None)).await;
        assert!(never.is_err(), "no deadline sleeps for ever");
    }

    #[test]
    fn a_throttle_lets_one_line_a_period_through_and_counts_the_others() {
        let start = std::time::Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.info_at(start), Some(0));
        assert_eq!(throttle.info_at(start + Duration::from_secs(1)), None);
        assert_eq!(throttle.info_at(start + Duration::from_secs(9)), None);
        assert_eq!(throttle.info_at(start + Duration::from_secs(10)), Some(2));
        assert_eq!(throttle.info_at(start + Duration::from_secs(11)), None);
        assert_eq!(throttle.info_at(start + Duration::from_secs(60)), Some(1));
    }

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    #[test]
    fn etcd_endpoints_fall_back_to_the_seed_name_then_the_default() {
        let args = Args::try_parse_from(["x", "--etcd-host", "10.0.0.1:4001"]).unwrap();
        assert_eq!(args.etcd.endpoints(), ["http://10.0.0.1:4001"]);
        let args = Args::try_parse_from([
            "x",
            "--etcd-host",
            "10.0.0.1:4001",
            "--etcd-endpoints",
            "a:1,http://b:2",
        ])
        .unwrap();
        assert_eq!(args.etcd.endpoints(), ["http://a:1", "http://b:2"]);
        let args = Args::try_parse_from(["x"]).unwrap();
        assert_eq!(args.etcd.endpoints(), [EtcdArgs::DEFAULT_ENDPOINT]);
        assert!(Args::try_parse_from(["x", "--prefix", "legate"]).is_err());
    }

    #[test]
    fn an_etcd_password_comes_from_a_file_and_never_with_the_user_name() {
        assert!(Args::try_parse_from(["x", "--etcd-user", "legate:secret"]).is_err());
        assert!(
            Args::try_parse_from(["x", "--etcd-user", "legate"]).is_err(),
            "a user without a password file"
        );
        let args = Args::try_parse_from([
            "x",
            "--etcd-user",
            "legate",
            "--etcd-password-file",
            "/run/secrets/etcd",
        ])
        .unwrap();
        assert_eq!(args.etcd.etcd_user.as_deref(), Some("legate"));
        assert!(
            Args::try_parse_from(["x", "--etcd-cert", "/c.pem"]).is_err(),
            "no key"
        );
    }
}
