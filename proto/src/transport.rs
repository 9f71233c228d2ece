//! The gRPC control plane's transport: where a service listens, who its callers are, what each
//! may call, and how a client reaches a service.
//!
//! - **Unix socket** (the default, `unix:/run/legate/<service>.sock`): mode 0600, or 0660 with
//!   the group `--grpc-socket-group` (`legate`) when that group exists, as Docker and containerd
//!   do. The kernel names each caller (`SO_PEERCRED`): root and the service's own user
//!   administer; any other user who can open the socket (the group) is a local node: it may
//!   subscribe and report (the host's supervisor under systemd) and read, not administer.
//! - **TCP**: only with mutual TLS (`--grpc-cert`, `--grpc-key`, `--grpc-ca`). A caller is the
//!   DNS names of its client certificate, which must chain to `--grpc-ca`: a node's certificate
//!   names its node id; the names in `--grpc-admin` administer.
//! - `--grpc-insecure` (labs only, logged as a warning) allows plain TCP, where every caller
//!   administers.
//!
//! Authentication happens once per call in a layer in front of every service ([`Peer`] in the
//! request's extensions); each method then authorises its caller: [`Peer::require_admin`] for
//! what changes the host (`Supervisor.Apply`, `Registrar.Resync`), [`Peer::require_node`] for
//! what speaks for a node (`Confgen.Watch`, `Confgen.Report`), nothing more for reads.

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::runtime::RuntimeError;

/// Where a gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address: mutual TLS, or `--grpc-insecure`.
    Tcp(SocketAddr),
}

impl Listen {
    /// Parses `unix:<absolute path>` or `<ip>:<port>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = Path::new(path);
            if !path.is_absolute() || path.file_name().is_none() {
                return Err(format!(
                    "'{}': a Unix socket needs an absolute path",
                    s.escape_default()
                ));
            }
            return Ok(Self::Unix(path.to_path_buf()));
        }
        s.parse().map(Self::Tcp).map_err(|_| {
            format!(
                "'{}' is neither unix:<path> nor <ip>:<port>",
                s.escape_default()
            )
        })
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// The files of this node's TLS identity, for a TCP listener and for `https://` clients.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// CA bundle (PEM) that peers' certificates must chain to: client certificates on a TCP
    /// gRPC listener, servers' certificates behind `https://` endpoints.
    #[arg(long = "grpc-ca", env = "LEGATE_GRPC_CA")]
    pub ca: Option<PathBuf>,
    /// This node's certificate chain (PEM), served on a TCP gRPC listener and presented to
    /// `https://` servers; its DNS names are the node's identity.
    #[arg(long = "grpc-cert", env = "LEGATE_GRPC_CERT")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `--grpc-cert`.
    #[arg(long = "grpc-key", env = "LEGATE_GRPC_KEY")]
    pub key: Option<PathBuf>,
}

/// The three files read, or `None` when none is configured.
#[derive(Debug, Clone)]
struct TlsFiles {
    ca: Certificate,
    identity: Identity,
}

impl TlsArgs {
    /// Whether all three files are given, or none; an error when only some are.
    fn complete(&self) -> Result<bool, String> {
        match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => Ok(false),
            (Some(_), Some(_), Some(_)) => Ok(true),
            _ => Err("--grpc-ca, --grpc-cert and --grpc-key go together".to_owned()),
        }
    }

    fn load(&self) -> Result<Option<TlsFiles>, RuntimeError> {
        let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.cert, &self.key) else {
            return self.complete().map(|_| None).map_err(RuntimeError::Tls);
        };
        let read = |flag: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| RuntimeError::Tls(format!("{flag} {}: {e}", path.display())))
        };
        Ok(Some(TlsFiles {
            ca: Certificate::from_pem(read("--grpc-ca", ca)?),
            identity: Identity::from_pem(read("--grpc-cert", cert)?, read("--grpc-key", key)?),
        }))
    }
}

/// How a service's gRPC listener is secured and who administers it.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Client certificate names (DNS names) allowed to administer over TCP: `Supervisor.Apply`,
    /// `Registrar.Resync`, and watching or reporting for any node.
    #[arg(long = "grpc-admin", env = "LEGATE_GRPC_ADMINS", value_delimiter = ',')]
    pub admins: Vec<String>,
    /// Group given read access to the Unix socket (mode 0660), when it exists; otherwise the
    /// socket is mode 0600. Root and the service's own user administer.
    #[arg(
        long = "grpc-socket-group",
        env = "LEGATE_GRPC_SOCKET_GROUP",
        default_value = "legate"
    )]
    pub socket_group: String,
    /// Labs only: allow plain gRPC on a TCP address, where every caller administers.
    #[arg(long = "grpc-insecure", env = "LEGATE_GRPC_INSECURE")]
    pub insecure: bool,
}

impl ServerArgs {
    /// What the flags cannot say alone: TCP needs mutual TLS or `--grpc-insecure`, and the
    /// TLS files go together.
    pub fn check(&self, listen: &Listen) -> Result<(), String> {
        let tls = self.tls.complete()?;
        match listen {
            Listen::Tcp(addr) if !tls && !self.insecure => Err(format!(
                "gRPC on TCP {addr} needs mutual TLS (--grpc-cert, --grpc-key, --grpc-ca), \
                 or --grpc-insecure in a lab; the default is a Unix socket"
            )),
            _ => Ok(()),
        }
    }
}

/// Who called: set by the server's authentication layer on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process on the Unix socket, named by the kernel.
    Local {
        /// Its user id.
        uid: u32,
        /// Root or the service's own user.
        admin: bool,
    },
    /// A client certificate that chains to `--grpc-ca`.
    Certified {
        /// Its DNS names.
        names: Vec<String>,
        /// One of them is in `--grpc-admin`.
        admin: bool,
    },
    /// A caller on a `--grpc-insecure` listener.
    Anonymous,
}

impl Peer {
    /// The caller of `request`; a request that went around the authentication layer has none.
    pub fn of<T>(request: &Request<T>) -> Result<&Self, Status> {
        request
            .extensions()
            .get::<Self>()
            .ok_or_else(|| Status::unauthenticated("the caller is unknown"))
    }

    fn admin(&self) -> bool {
        match self {
            Self::Local { admin, .. } | Self::Certified { admin, .. } => *admin,
            Self::Anonymous => true,
        }
    }

    /// Allows an administrator only; `what` names the call in the refusal.
    pub fn require_admin(&self, what: &str) -> Result<(), Status> {
        if self.admin() {
            return Ok(());
        }
        metrics::counter!("legate_grpc_denied_total", "call" => what.to_owned()).increment(1);
        warn!(call = what, peer = %self, "call denied: not an administrator");
        Err(Status::permission_denied(format!(
            "{what} needs an administrator; {self} is not one"
        )))
    }

    /// Allows the node `node_id` itself (a certificate naming it), a local caller (the socket's
    /// group is this host's) or an administrator.
    pub fn require_node(&self, what: &str, node_id: &str) -> Result<(), Status> {
        let allowed = match self {
            Self::Local { .. } | Self::Anonymous => true,
            Self::Certified { names, admin } => *admin || names.iter().any(|n| n == node_id),
        };
        if allowed {
            return Ok(());
        }
        metrics::counter!("legate_grpc_denied_total", "call" => what.to_owned()).increment(1);
        warn!(call = what, peer = %self, node_id, "call denied: not this node");
        Err(Status::permission_denied(format!(
            "{what} for node '{}' needs that node's certificate or an administrator; {self} is \
             neither",
            node_id.escape_default()
        )))
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local { uid, .. } => write!(f, "local uid {uid}"),
            Self::Certified { names, .. } => write!(f, "certificate {}", names.join(",")),
            Self::Anonymous => write!(f, "an anonymous caller"),
        }
    }
}

/// Names every caller from its connection, or refuses the call.
#[derive(Debug, Clone)]
struct Authenticate {
    own_uid: u32,
    admins: std::sync::Arc<[String]>,
    insecure: bool,
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let extensions = request.extensions();
        let peer =
            if let Some(local) = extensions.get::<tonic::transport::server::UdsConnectInfo>() {
                let uid = local.peer_cred.map(|c| c.uid()).ok_or_else(|| {
                    Status::unauthenticated("the caller's credentials are unknown")
                })?;
                Peer::Local {
                    uid,
                    admin: uid == 0 || uid == self.own_uid,
                }
            } else if let Some(certs) = request.peer_certs() {
                let names = certs.first().map(certificate_names).unwrap_or_default();
                if names.is_empty() {
                    return Err(Status::unauthenticated(
                        "the client certificate names no DNS name",
                    ));
                }
                let admin = names.iter().any(|n| self.admins.contains(n));
                Peer::Certified { names, admin }
            } else if self.insecure {
                Peer::Anonymous
            } else {
                return Err(Status::unauthenticated("no client certificate"));
            };
        request.extensions_mut().insert(peer);
        Ok(request)
    }
}

/// The DNS names of a certificate (wildcards excluded: a name stands for one node).
fn certificate_names(der: &tonic::transport::CertificateDer<'static>) -> Vec<String> {
    webpki::EndEntityCert::try_from(der)
        .map(|cert| {
            cert.valid_dns_names()
                .filter(|n| !n.contains('*'))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A gRPC listener, checked and ready to serve.
#[derive(Debug)]
pub struct GrpcServer {
    listen: Listen,
    tls: Option<TlsFiles>,
    authenticate: Authenticate,
    socket_group: String,
}

impl GrpcServer {
    /// Checks `listen` against `args`: TCP needs mutual TLS or `--grpc-insecure`; TLS files are
    /// read now, so a missing or unreadable one stops the service at start.
    pub fn new(listen: &Listen, args: &ServerArgs) -> Result<Self, RuntimeError> {
        args.check(listen).map_err(RuntimeError::Tls)?;
        let tls = args.tls.load()?;
        Ok(Self {
            listen: listen.clone(),
            tls,
            authenticate: Authenticate {
                own_uid: nix::unistd::geteuid().as_raw(),
                admins: args.admins.clone().into(),
                insecure: args.insecure,
            },
            socket_group: args.socket_group.clone(),
        })
    }

    /// Serves `routes` (which include `grpc.health.v1`) until `shutdown` is cancelled, then
    /// lets in-flight calls finish; a Unix socket is removed when it ends.
    pub async fn serve(
        self,
        routes: tonic::service::Routes,
        shutdown: CancellationToken,
    ) -> Result<(), RuntimeError> {
        let mut server = tonic::transport::Server::builder();
        let layer = tonic::service::InterceptorLayer::new(self.authenticate.clone());
        match &self.listen {
            Listen::Unix(path) => {
                let listener = bind_unix(path, &self.socket_group).await?;
                let incoming = unix_connections(listener);
                let served = server
                    .layer(layer)
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                    .await;
                let _ = std::fs::remove_file(path);
                served?;
            }
            Listen::Tcp(addr) => {
                let addr = *addr;
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| RuntimeError::Bind { addr, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| RuntimeError::Bind { addr, source })?;
                if let Some(tls) = &self.tls {
                    server = server.tls_config(
                        ServerTlsConfig::new()
                            .identity(tls.identity.clone())
                            .client_ca_root(tls.ca.clone()),
                    )?;
                    info!(addr = %local, "gRPC listening (mutual TLS)");
                } else {
                    warn!(
                        addr = %local,
                        "gRPC listening WITHOUT authentication (--grpc-insecure): anyone who \
                         reaches this address administers this service"
                    );
                }
                server
                    .layer(layer)
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(
                        // Snapshots are streamed as they come: no Nagle delay on small frames.
                        tonic::transport::server::TcpIncoming::from(listener)
                            .with_nodelay(Some(true)),
                        shutdown.cancelled_owned(),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

/// The accepted connections of `listener`, as a stream. A failed accept (out of file
/// descriptors, say) is logged and retried a moment later, never the end of the server.
fn unix_connections(
    listener: tokio::net::UnixListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => return Some((Ok(stream), listener)),
                Err(e) => {
                    warn!(error = %e, "accepting a gRPC connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Binds the Unix socket at `path` with its mode set from the start (umask), then gives it to
/// `group` when that group exists. A socket left by a dead process is replaced; one that
/// answers belongs to a running service and is an error.
async fn bind_unix(path: &Path, group: &str) -> Result<tokio::net::UnixListener, RuntimeError> {
    let error = |reason: String| RuntimeError::Socket {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| error(format!("creating its directory: {e}")))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(error("another process serves it".to_owned()));
            }
            std::fs::remove_file(path).map_err(|e| error(format!("removing a stale one: {e}")))?;
        }
        Ok(_) => return Err(error("exists and is not a socket".to_owned())),
        Err(_) => {}
    }
    let group = nix::unistd::Group::from_name(group).ok().flatten();
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    let previous = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o777 & !mode));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(previous);
    let listener = bound.map_err(|e| error(e.to_string()))?;
    if let Some(group) = &group {
        std::os::unix::fs::chown(path, None, Some(group.gid.as_raw()))
            .map_err(|e| error(format!("giving it to group {}: {e}", group.name)))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| error(format!("mode {mode:o}: {e}")))?;
    info!(
        socket = %path.display(),
        mode = format!("{mode:o}"),
        group = group.as_ref().map(|g| g.name.as_str()).unwrap_or("-"),
        "gRPC listening"
    );
    Ok(listener)
}

/// A client's view of a gRPC endpoint: `unix:<path>`, `https://host:port` (mutual TLS with
/// `tls`) or `http://host:port` (a `--grpc-insecure` server).
pub fn channel(endpoint: &str, tls: &TlsArgs) -> Result<Channel, RuntimeError> {
    let error = |reason: String| RuntimeError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    if let Some(path) = endpoint.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(error("a Unix socket needs an absolute path".to_owned()));
        }
        // The URI is not used: every connection goes to the socket.
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        return Ok(Endpoint::from_static("http://localhost").connect_with_connector_lazy(connector));
    }
    let mut target =
        Endpoint::from_shared(endpoint.to_owned()).map_err(|e| error(e.to_string()))?;
    if endpoint.starts_with("https://") {
        let files = tls.load()?.ok_or_else(|| {
            error("https:// needs --grpc-ca, --grpc-cert and --grpc-key".to_owned())
        })?;
        target = target
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(files.ca)
                    .identity(files.identity),
            )
            .map_err(|e| error(e.to_string()))?;
    } else if !endpoint.starts_with("http://") {
        return Err(error(
            "expected unix:<path>, https://host:port or http://host:port".to_owned(),
        ));
    }
    Ok(target.tcp_nodelay(true).connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_a_unix_path_or_an_ip_and_port() {
        assert_eq!(
            Listen::parse("unix:/run/legate/x.sock").unwrap(),
            Listen::Unix("/run/legate/x.sock".into())
        );
        assert_eq!(
            Listen::parse("127.0.0.1:7401").unwrap(),
            Listen::Tcp("127.0.0.1:7401".parse().unwrap())
        );
        for bad in [
            "unix:x.sock",
            "unix:",
            "unix:/",
            "localhost:1",
            "/run/x.sock",
            "",
        ] {
            assert!(Listen::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            Listen::parse("unix:/a/b.sock").unwrap().to_string(),
            "unix:/a/b.sock"
        );
    }

    #[test]
    fn an_administrator_may_do_anything_a_node_only_what_is_its_own() {
        let node = Peer::Certified {
            names: vec!["host-1".to_owned()],
            admin: false,
        };
        assert!(node.require_node("Report", "host-1").is_ok());
        let denied = node.require_node("Report", "host-2").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("host-2"), "{denied:?}");
        assert!(node.require_admin("Apply").is_err());

        let local = Peer::Local {
            uid: 1000,
            admin: false,
        };
        assert!(local.require_admin("Apply").is_err());
        assert!(local.require_node("Watch", "host-1").is_ok());

        for admin in [
            Peer::Local {
                uid: 0,
                admin: true,
            },
            Peer::Certified {
                names: vec!["ops".to_owned()],
                admin: true,
            },
            Peer::Anonymous,
        ] {
            assert!(admin.require_admin("Apply").is_ok());
            assert!(admin.require_node("Report", "host-2").is_ok());
        }
    }
}
