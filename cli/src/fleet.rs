//! The sources: the registry in etcd, and this host's services over gRPC. Each fetch fails
//! with a message that names the source, what it tried, and what to do.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use legate_confgen::model::Registry;
use legate_proto::registry::{Key, KeyKind, Refusal, Schema};
use legate_proto::runtime::EtcdArgs;
use legate_proto::transport::{self, TlsArgs};
use legate_proto::v1;
use tokio_util::sync::CancellationToken;

/// How long one service may take to answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the sources are.
#[derive(Debug)]
pub(crate) struct Sources {
    pub(crate) etcd: EtcdArgs,
    pub(crate) registrar: String,
    pub(crate) confgen: String,
    pub(crate) supervisor: String,
    pub(crate) tls: TlsArgs,
}

/// A refusal read from etcd.
#[derive(Debug, Clone)]
pub(crate) struct RefusalEntry {
    pub(crate) host_id: String,
    pub(crate) container_id: String,
    pub(crate) refusal: Refusal,
}

/// A registrar's record with its lease.
#[derive(Debug, Clone)]
pub(crate) struct HostEntry {
    pub(crate) record: v1::Host,
    /// Seconds left on its lease; `None` when etcd did not say.
    pub(crate) ttl_left: Option<i64>,
}

/// The registry as etcd holds it now.
#[derive(Debug)]
pub(crate) struct Fleet {
    /// Apps, services, hosts and skipped keys, as confgen reads them (backends not assigned).
    pub(crate) model: v1::Model,
    pub(crate) hosts: Vec<HostEntry>,
    pub(crate) refused: Vec<RefusalEntry>,
    /// The etcd revision at which each registration key was last written.
    pub(crate) mod_revisions: BTreeMap<String, i64>,
}

impl Sources {
    /// Reads the whole registry from etcd at one revision.
    pub(crate) async fn registry(&self) -> Result<Fleet> {
        let endpoints = self.etcd.endpoints().join(",");
        let hint = || {
            format!(
                "etcd at {endpoints} does not answer: is it running, and are --etcd-endpoints \
                 (ETCD_ENDPOINTS) and --prefix (LEGATE_PREFIX) those of the services?"
            )
        };
        let shutdown = CancellationToken::new();
        let connect = self.etcd.connect(&shutdown);
        let mut client = tokio::time::timeout(CALL_TIMEOUT, connect)
            .await
            .map_err(|_| anyhow!("timed out"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .with_context(hint)?;
        let schema = Schema::new(self.etcd.prefix.clone());
        let prefix = format!("{}/", self.etcd.prefix);
        let response = tokio::time::timeout(
            CALL_TIMEOUT,
            client.get(
                prefix.as_bytes(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            ),
        )
        .await
        .map_err(|_| anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(hint)?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut registry = Registry::new(schema.clone());
        let mut leases = BTreeMap::new();
        let mut refused = Vec::new();
        let mut mod_revisions = BTreeMap::new();
        for kv in response.kvs() {
            match schema.parse(kv.key()) {
                Ok(Key::Host(host)) => {
                    leases.insert(host.host_id.to_string(), kv.lease());
                }
                Ok(Key::Refused(key)) => {
                    // A value that does not parse is still a refusal, of unknown reason.
                    let refusal = Refusal::parse(kv.value()).unwrap_or_else(|e| {
                        Refusal::new(None, &format!("(unreadable refusal: {e})"))
                    });
                    refused.push(RefusalEntry {
                        host_id: key.host_id.to_string(),
                        container_id: key.container_id.to_string(),
                        refusal,
                    });
                }
                Ok(key) if matches!(key.kind(), KeyKind::App | KeyKind::Service) => {
                    mod_revisions.insert(schema.format(&key), kv.mod_revision());
                }
                _ => {}
            }
        }
        registry.reset(
            response
                .kvs()
                .iter()
                .map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
            revision,
        );
        let model = registry.model(&[]);
        let mut hosts = Vec::new();
        for record in &model.hosts {
            let lease = leases.get(&record.host_id).copied().unwrap_or(0);
            let ttl_left = if lease == 0 {
                None
            } else {
                tokio::time::timeout(CALL_TIMEOUT, client.lease_time_to_live(lease, None))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|r| r.ttl())
            };
            hosts.push(HostEntry {
                record: record.clone(),
                ttl_left,
            });
        }
        shutdown.cancel();
        Ok(Fleet {
            model,
            hosts,
            refused,
            mod_revisions,
        })
    }

    /// `Registrar.List` of this host's registrar.
    pub(crate) async fn registrar(&self) -> Result<v1::ListResponse> {
        let channel = transport::channel(&self.registrar, &self.tls)?;
        let mut client = v1::registrar_client::RegistrarClient::new(channel);
        let call = client.list(v1::ListRequest {});
        answer(
            call,
            "registrar",
            &self.registrar,
            "--registrar (LEGATE_REGISTRAR)",
        )
        .await
    }

    /// `Confgen.Status`.
    pub(crate) async fn confgen(&self) -> Result<v1::ConfgenStatus> {
        let channel = transport::channel(&self.confgen, &self.tls)?;
        let mut client = v1::confgen_client::ConfgenClient::new(channel);
        let call = client.status(v1::ConfgenStatusRequest {});
        answer(call, "confgen", &self.confgen, "--confgen (LEGATE_CONFGEN)").await
    }

    /// `Supervisor.Status` of this host's supervisor.
    pub(crate) async fn supervisor(&self) -> Result<v1::SupervisorStatus> {
        let channel = transport::channel(&self.supervisor, &self.tls)?;
        let mut client = v1::supervisor_client::SupervisorClient::new(channel);
        let call = client.status(v1::SupervisorStatusRequest::default());
        let flag = "--supervisor (LEGATE_SUPERVISOR)";
        answer(call, "supervisor", &self.supervisor, flag).await
    }

    /// `Supervisor.Routes` of this host's supervisor.
    pub(crate) async fn live_routes(&self) -> Result<v1::RoutesResponse> {
        let channel = transport::channel(&self.supervisor, &self.tls)?;
        let mut client = v1::supervisor_client::SupervisorClient::new(channel);
        let call = client.routes(v1::RoutesRequest {});
        let flag = "--supervisor (LEGATE_SUPERVISOR)";
        answer(call, "supervisor", &self.supervisor, flag).await
    }
}

/// The answer of one call, or an error that says which service, where, and what to do.
async fn answer<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    service: &str,
    endpoint: &str,
    flag: &str,
) -> Result<T> {
    let status = match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => return Ok(response.into_inner()),
        Ok(Err(status)) => status,
        Err(_) => tonic::Status::deadline_exceeded("no answer within 5 s"),
    };
    let message = legate_proto::runtime::error_chain(&status);
    let hint = match status.code() {
        _ if message.contains("os error 13") => {
            "run as root or as a member of the socket's group (legate)".to_owned()
        }
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => format!(
            "is legate-{service} running on this host? (systemctl status legate-{service}, or \
             docker ps); another address: {flag}"
        ),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            "run as root or as a member of the socket's group (legate)".to_owned()
        }
        _ => String::new(),
    };
    Err(anyhow!(
        "{service} at {endpoint}: {message}{}{hint}",
        if hint.is_empty() { "" } else { ": " }
    ))
}
