//! The etcd edge: the host's claim on its host id, its lease, the keys it owns, and applying a
//! reconcile plan.
//!
//! Ownership: a key is this host's when its JSON value names this host id (registrations) or
//! when it is `<prefix>/hosts/<host-id>` itself. Keys are never guessed from addresses.
//!
//! Claiming a host id at start ([`Store::claim`]): with no host record, one is created under a
//! new lease (create-if-absent). With a record left by a previous run, the newcomer overwrites it
//! with its own instance id, keeps the old lease alive, and watches the record for a short
//! window: a live registrar with the same host id restores its record at once
//! ([`Store::guard_host_record`]), and the newcomer refuses to run. If nobody answers, the
//! previous run is dead and the newcomer adopts its lease and keys: a restart flaps no route.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use legate_proto::registry::{HostId, HostKey, HostRecord, Schema};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::reconcile::{Owned, Plan};

/// How often a lease of `ttl` seconds is kept alive: three times per TTL, so that one lost
/// answer leaves time for two more before it expires.
pub fn keep_alive_period(ttl: i64) -> Duration {
    Duration::from_millis((ttl.max(1) as u64 * 1000 / 3).max(500))
}

/// Most operations in one etcd transaction (etcd's default limit is 128).
const MAX_TXN_OPS: usize = 100;

/// How long one write may take before it is given up and retried. A write that a follower
/// forwarded to a leader that just died is lost without an answer: etcd would time it out
/// after 5 s (the client's timeout, every call's), while a new leader is elected in about one
/// second (`--election-timeout` 1000 ms); a retry after 2 s lands on the new leader.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// etcd errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd failed or is unreachable.
    #[error("etcd: {}", legate_proto::runtime::error_chain(.0))]
    Etcd(etcd_client::Error),
    /// etcd refuses this registrar: TLS, its credentials or its permissions are wrong.
    /// Retrying cannot help.
    #[error("etcd refuses: {0}")]
    Refused(String),
    /// Another live registrar holds this host id.
    #[error(
        "another registrar (instance {other}) is running with host id '{host_id}': refusing to run a second one"
    )]
    Duplicate {
        /// The host id.
        host_id: String,
        /// The other registrar's instance id, if known.
        other: String,
    },
    /// The lease expired: keys attached to it are gone.
    #[error("lease {0:x} expired")]
    LeaseLost(i64),
    /// A write had no answer in time (lost with a leader that died): retried.
    #[error("etcd did not answer a write within {0:?} (a leader change?)")]
    WriteTimedOut(Duration),
    /// The keep-alive stream stopped answering (or was closed) while the lease still lives:
    /// it must be opened again.
    #[error("lease {lease:x} is alive but its keep-alive stream {why}")]
    KeepAliveStalled {
        /// The lease.
        lease: i64,
        /// What happened to the stream.
        why: &'static str,
    },
}

impl From<etcd_client::Error> for StoreError {
    /// etcd's answers that a lease no longer exists mean it was lost, whatever the call: the
    /// keep-alive of an expired lease, a put attached to it. Retrying them cannot succeed, so
    /// they are [`StoreError::LeaseLost`] (the lease id unknown here: 0), never transient.
    /// Nor are refusals (permissions, credentials, TLS): [`StoreError::Refused`].
    fn from(e: etcd_client::Error) -> Self {
        if lease_not_found(&e) {
            return StoreError::LeaseLost(0);
        }
        let classified = legate_proto::runtime::EtcdError::of(&e);
        if classified.fatal {
            StoreError::Refused(classified.message)
        } else {
            StoreError::Etcd(e)
        }
    }
}

/// Maps an etcd error of a call about `lease`: a lease that does not exist is that one lost.
pub(crate) fn lease_error(lease: i64) -> impl Fn(etcd_client::Error) -> StoreError {
    move |e| match StoreError::from(e) {
        StoreError::LeaseLost(0) => StoreError::LeaseLost(lease),
        other => other,
    }
}

/// Whether etcd said that a lease does not exist: `LeaseKeepAlive` answering TTL 0 (the client
/// turns it into "lease not found"), or `ErrLeaseNotFound` ("etcdserver: requested lease not
/// found", gRPC NOT_FOUND) for a put or a time-to-live of a lease that expired.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::NotFound && status.message().contains("lease not found")
        }
        _ => false,
    }
}

/// The registry as this host sees it.
#[derive(Clone)]
pub struct Store {
    client: Client,
    schema: Schema,
    host_id: HostId,
    record: HostRecord,
}

impl Store {
    /// A store for `host_id`, whose record is `record`.
    pub fn new(client: Client, schema: Schema, host_id: HostId, record: HostRecord) -> Self {
        Self {
            client,
            schema,
            host_id,
            record,
        }
    }

    /// The key schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The key of this host's record.
    pub fn host_key(&self) -> String {
        self.schema.host_key(&HostKey {
            host_id: self.host_id.clone(),
        })
    }

    /// This host's record, as JSON.
    pub fn record_json(&self) -> String {
        self.record.to_json()
    }

    /// Claims the host id (see the module documentation) and returns the lease to use.
    pub async fn claim(&mut self, ttl: i64, window: Duration) -> Result<i64, StoreError> {
        let key = self.host_key();
        let current = self.client.get(key.as_str(), None).await?;
        let Some(existing) = current.kvs().first() else {
            let lease = self.client.lease_grant(ttl, None).await?.id();
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    self.record_json(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            if !self.client.txn(txn).await?.succeeded() {
                let _ = self.client.lease_revoke(lease).await;
                return Err(self.duplicate(None));
            }
            info!(host_id = %self.host_id, lease = format!("{lease:x}"), "host id claimed with a new lease");
            return Ok(lease);
        };
        let previous = HostRecord::parse(existing.value()).ok().map(|r| r.instance);
        let old_lease = existing.lease();
        let alive =
            old_lease != 0 && self.client.lease_time_to_live(old_lease, None).await?.ttl() > 0;
        let lease = if alive {
            old_lease
        } else {
            self.client.lease_grant(ttl, None).await?.id()
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                existing.mod_revision(),
            )])
            .and_then([TxnOp::put(
                key.as_str(),
                self.record_json(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let response = self.client.txn(txn).await?;
        if !response.succeeded() {
            return Err(self.duplicate(previous));
        }
        let revision = response.header().map_or(0, |h| h.revision());
        if alive {
            // Keep the adopted lease alive while waiting for an answer.
            let (mut keeper, mut stream) = self.client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            let _ = stream.message().await?;
        }
        let options = WatchOptions::new().with_start_revision(revision + 1);
        let mut watch = self.client.watch(key.as_str(), Some(options)).await?;
        let deadline = tokio::time::sleep(window);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                message = watch.message() => {
                    let Some(response) = message? else { break };
                    for event in response.events() {
                        let instance = event
                            .kv()
                            .and_then(|kv| HostRecord::parse(kv.value()).ok())
                            .map(|r| r.instance);
                        let answered = event.event_type() == EventType::Put
                            && instance.as_deref() != Some(self.record.instance.as_str());
                        if answered {
                            return Err(self.duplicate(instance));
                        }
                    }
                }
            }
        }
        if alive {
            info!(
                host_id = %self.host_id,
                lease = format!("{lease:x}"),
                previous = previous.as_deref().unwrap_or("unknown"),
                "previous run of this host is gone: adopting its lease and keys"
            );
        } else {
            info!(host_id = %self.host_id, lease = format!("{lease:x}"), "host record taken over with a new lease");
        }
        Ok(lease)
    }

    fn duplicate(&self, other: Option<String>) -> StoreError {
        StoreError::Duplicate {
            host_id: self.host_id.to_string(),
            other: other.unwrap_or_else(|| "unknown".to_owned()),
        }
    }

    /// Watches this host's record until `shutdown`: whenever another writer replaces or deletes
    /// it (a second registrar claiming the host id), logs it loudly and restores it, which makes
    /// the newcomer refuse to run. Returns on a watch failure; the caller restarts it.
    pub async fn guard_host_record(
        &mut self,
        lease: &tokio::sync::watch::Receiver<i64>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let key = self.host_key();
        let mut watch = self.client.watch(key.as_str(), None).await?;
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                message = watch.message() => message?,
            };
            let Some(response) = message else {
                return Ok(());
            };
            for event in response.events() {
                let foreign = match event.event_type() {
                    EventType::Delete => Some("deleted".to_owned()),
                    EventType::Put => event.kv().and_then(|kv| {
                        let instance = HostRecord::parse(kv.value()).ok().map(|r| r.instance);
                        (instance.as_deref() != Some(self.record.instance.as_str())).then(|| {
                            format!(
                                "claimed by instance {}",
                                instance.as_deref().unwrap_or("unknown")
                            )
                        })
                    }),
                };
                let Some(what) = foreign else { continue };
                let lease = *lease.borrow();
                let restored = self
                    .client
                    .put(
                        key.as_str(),
                        self.record_json(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await
                    .map_err(lease_error(lease));
                match restored {
                    // Deleted by the expiry of our own lease: the lease keeper replaces it.
                    Err(StoreError::LeaseLost(_)) if event.event_type() == EventType::Delete => {
                        info!(host_id = %self.host_id, "host record expired with the lease");
                    }
                    restored => {
                        error!(host_id = %self.host_id, "host record {what}: another registrar with this host id? restoring ours");
                        metrics::counter!("legate_registrar_host_id_conflicts_total").increment(1);
                        restored?;
                    }
                }
            }
        }
    }

    /// The keys attached to `lease`, with their values: this host's keys, read through its
    /// lease (`LeaseTimeToLive` with its keys, then their values in transactions of gets), so
    /// the cost is this host's keys, never the fleet's registry.
    pub async fn lease_keys(&mut self, lease: i64) -> Result<BTreeMap<String, Owned>, StoreError> {
        let alive = self
            .client
            .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .map_err(lease_error(lease))?;
        if alive.ttl() <= 0 {
            return Err(StoreError::LeaseLost(lease));
        }
        let mut owned = BTreeMap::new();
        for chunk in alive.keys().chunks(MAX_TXN_OPS) {
            let gets: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::get(k.clone(), None)).collect();
            let response = self.client.txn(Txn::new().and_then(gets)).await?;
            for op in response.op_responses() {
                let TxnOpResponse::Get(get) = op else {
                    continue;
                };
                for kv in get.kvs() {
                    owned.insert(
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        Owned {
                            value: kv.value().to_vec(),
                            lease: kv.lease(),
                        },
                    );
                }
            }
        }
        Ok(owned)
    }

    /// Applies a plan: puts attached to `lease`, deletes, in transactions of at most 100 ops.
    pub async fn apply(&mut self, plan: &Plan, lease: i64) -> Result<(), StoreError> {
        let ops: Vec<TxnOp> = plan
            .puts
            .iter()
            .map(|(key, value)| {
                TxnOp::put(
                    key.as_str(),
                    value.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .chain(
                plan.deletes
                    .iter()
                    .map(|key| TxnOp::delete(key.as_str(), None)),
            )
            .collect();
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn = self.client.txn(Txn::new().and_then(chunk.to_vec()));
            tokio::time::timeout(WRITE_TIMEOUT, txn)
                .await
                .map_err(|_| StoreError::WriteTimedOut(WRITE_TIMEOUT))?
                .map_err(lease_error(lease))?;
        }
        Ok(())
    }

    /// Grants a new lease.
    pub async fn grant(&mut self, ttl: i64) -> Result<i64, StoreError> {
        Ok(self.client.lease_grant(ttl, None).await?.id())
    }

    /// Keeps `lease` alive until `shutdown` (then `Ok`, and only then), or until it expires,
    /// its stream stalls or etcd fails.
    pub async fn keep_alive(
        &mut self,
        lease: i64,
        ttl: i64,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let (mut keeper, mut stream) = self
            .client
            .lease_keep_alive(lease)
            .await
            .map_err(lease_error(lease))?;
        let period = keep_alive_period(ttl);
        let mut ticks = tokio::time::interval(period);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            keeper.keep_alive().await.map_err(lease_error(lease))?;
            let answer = tokio::time::timeout(period, stream.message()).await;
            match answer {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return Err(StoreError::LeaseLost(lease)),
                Ok(Ok(None)) => {
                    self.check_lease(lease).await?;
                    return Err(StoreError::KeepAliveStalled {
                        lease,
                        why: "was closed by etcd",
                    });
                }
                Ok(Err(e)) => return Err(lease_error(lease)(e)),
                Err(_) => {
                    self.check_lease(lease).await?;
                    return Err(StoreError::KeepAliveStalled {
                        lease,
                        why: "did not answer within the keep-alive period",
                    });
                }
            }
        }
    }

    /// Whether `lease` still lives.
    pub async fn check_lease(&mut self, lease: i64) -> Result<(), StoreError> {
        let answer = self
            .client
            .lease_time_to_live(lease, None)
            .await
            .map_err(lease_error(lease))?;
        if answer.ttl() > 0 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost(lease))
        }
    }

    /// Revokes `lease`: every key attached to it is deleted at once.
    pub async fn revoke(&mut self, lease: i64) -> Result<(), StoreError> {
        self.client.lease_revoke(lease).await?;
        Ok(())
    }
}
