//! The reconciler: one task that owns the Docker source and what this host has in etcd, and
//! makes etcd say what Docker says.
//!
//! Two paths, both level-triggered and idempotent:
//!
//! - **Full** (start-up, a reconnect, a new lease, the periodic resync, `Registrar.Resync`, and
//!   any failure): lists the engine's containers, reads the keys attached to this host's lease
//!   (`LeaseTimeToLive` with its keys: only this host's keys, however large the fleet's
//!   registry), and applies the difference.
//! - **One container** (a Docker event): inspects that container only (or nothing, when it is
//!   stopping) and applies the difference with its keys as last written, in one transaction. No
//!   listing of the engine nor of the registry: the cost of an event does not grow with the
//!   containers of the host or the keys of the fleet.
//!
//! What the last full reconcile read plus every write since is kept in [`Known`]; a full
//! reconcile replaces it, so anything another writer changed is repaired within a resync.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use legate_proto::registry::{HostId, HostIp};
use legate_proto::runtime::{MAX_BACKOFF, backoff};
use legate_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::conventions::{self, ContainerInfo, Target, Verdict};
use crate::docker::{self, DockerSource, Sign};
use crate::reconcile::{self, Owned};
use crate::store::Store;
use crate::{Error, Trigger};

/// What one container asks for.
#[derive(Debug, Default)]
struct Wanted {
    /// Keys and values.
    keys: BTreeMap<String, String>,
    registrations: Vec<v1::Registration>,
    refused: Option<v1::RefusedContainer>,
}

/// This host's keys in etcd and what `Registrar.List` shows, as of the last full reconcile and
/// the writes since.
#[derive(Debug, Default)]
pub(crate) struct Known {
    keys: BTreeMap<String, Owned>,
    /// The keys of each container.
    by_container: HashMap<String, BTreeSet<String>>,
    registrations: BTreeMap<String, v1::Registration>,
    /// Refused containers, by id.
    refused: BTreeMap<String, v1::RefusedContainer>,
}

impl Known {
    /// Records what `id` has now: `wanted`, written under `lease`.
    fn set(&mut self, id: &str, wanted: Wanted, lease: i64) {
        self.forget(id);
        if !wanted.keys.is_empty() {
            self.by_container
                .insert(id.to_owned(), wanted.keys.keys().cloned().collect());
        }
        for (key, value) in wanted.keys {
            self.keys.insert(
                key,
                Owned {
                    value: value.into_bytes(),
                    lease,
                },
            );
        }
        for registration in wanted.registrations {
            self.registrations
                .insert(registration.key.clone(), registration);
        }
        if let Some(refused) = wanted.refused {
            self.refused.insert(id.to_owned(), refused);
        }
    }

    fn forget(&mut self, id: &str) {
        for key in self.by_container.remove(id).unwrap_or_default() {
            self.keys.remove(&key);
            self.registrations.remove(&key);
        }
        self.refused.remove(id);
    }

    /// The keys of `id`, as last written.
    fn keys_of(&self, id: &str) -> BTreeMap<String, Owned> {
        self.by_container
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key.clone(), self.keys.get(key)?.clone())))
            .collect()
    }
}

/// Owns the Docker source and the view published to `Registrar.List`.
pub(crate) struct Reconciler {
    source: DockerSource,
    store: Store,
    host_ip: HostIp,
    host_id: HostId,
    lease: watch::Receiver<i64>,
    list: watch::Sender<v1::ListResponse>,
    /// Reasons of the refused containers, to warn once per change.
    refused: HashMap<String, String>,
    /// Containers that showed a sign of stopping (a stop signal, `die`, `stop`) since they last
    /// started: not routed, even while Docker still lists them as running, so that HAProxy
    /// sends them no new request while they finish the ones they have.
    stopping: HashSet<String>,
    /// `None` until a full reconcile succeeded: the event path needs it.
    known: Option<Known>,
}

impl Reconciler {
    pub(crate) fn new(
        source: DockerSource,
        store: Store,
        (host_ip, host_id): (HostIp, HostId),
        lease: watch::Receiver<i64>,
        list: watch::Sender<v1::ListResponse>,
    ) -> Self {
        Self {
            source,
            store,
            host_ip,
            host_id,
            lease,
            list,
            refused: HashMap::new(),
            stopping: HashSet::new(),
            known: None,
        }
    }

    /// Takes in what an event says of its container; the reconcile that follows does the rest.
    fn follow(&mut self, event: &docker::ContainerEvent) {
        let stop_signal = self.source.cached(&event.id).and_then(|c| c.stop_signal);
        let stopping = match event.sign {
            Sign::Stopping => true,
            Sign::Killed(signal) => docker::stops(signal, stop_signal),
            Sign::Started => {
                self.stopping.remove(&event.id);
                false
            }
            Sign::Changed => false,
        };
        if stopping && self.stopping.insert(event.id.clone()) {
            debug!(id = short(&event.id), sign = ?event.sign, "stopping: unrouted");
        }
        self.source.invalidate(&event.id);
    }

    pub(crate) async fn run(
        mut self,
        mut triggers: mpsc::Receiver<Trigger>,
        shutdown: CancellationToken,
    ) {
        let mut delays = backoff();
        let mut retry_in: Option<Duration> = Some(Duration::ZERO);
        loop {
            let mut full = false;
            let mut replies = Vec::new();
            // Containers with events, in the order of their first event, each once.
            let mut containers: Vec<String> = Vec::new();
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                trigger = triggers.recv() => trigger,
                () = sleep_opt(retry_in) => None,
            };
            if first.is_none() && retry_in.is_none() {
                return; // every sender is gone
            }
            if retry_in.is_some() {
                full = true;
            }
            // Coalesce whatever else is already queued into this round.
            let mut next = first;
            loop {
                match next {
                    Some(Trigger::Container(event)) => {
                        self.follow(&event);
                        if !containers.contains(&event.id) {
                            containers.push(event.id);
                        }
                    }
                    Some(Trigger::Full) => full = true,
                    Some(Trigger::Resync(reply)) => {
                        full = true;
                        replies.push(reply);
                    }
                    None => {}
                }
                match triggers.try_recv() {
                    Ok(trigger) => next = Some(trigger),
                    Err(_) => break,
                }
            }
            let outcome = if full || self.known.is_none() {
                self.source.clear_cache();
                self.full().await
            } else {
                self.containers(&containers).await.map(|()| None)
            };
            match outcome {
                Ok(response) => {
                    retry_in = None;
                    delays = backoff();
                    if let Some(response) = response {
                        for reply in replies {
                            let _ = reply.send(response);
                        }
                    }
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or(MAX_BACKOFF);
                    warn!(error = %e, retry_in = ?delay, "reconcile failed");
                    metrics::counter!("legate_registrar_reconcile_errors_total").increment(1);
                    let error = e.to_string();
                    self.list.send_if_modified(|list| {
                        let changed = list.error != error;
                        list.error = error;
                        changed
                    });
                    // What etcd holds is uncertain now: the retry is a full reconcile.
                    retry_in = Some(delay);
                    // Resync callers get no answer (their call fails) rather than a stale one.
                }
            }
        }
    }

    /// The full path: every container against every key of this host's lease.
    async fn full(&mut self) -> Result<Option<v1::ResyncResponse>, Error> {
        let started = Instant::now();
        let containers = self.source.running().await?;
        // Containers no longer listed have stopped for good.
        self.stopping
            .retain(|id| containers.iter().any(|info| info.id == *id));
        let lease = *self.lease.borrow();
        let mut known = Known::default();
        let mut desired = BTreeMap::new();
        for info in &containers {
            let wanted = self.wanted(info);
            desired.extend(wanted.keys.iter().map(|(k, v)| (k.clone(), v.clone())));
            known.set(&info.id, wanted, lease);
        }
        let (host_key, record) = (self.store.host_key(), self.store.record_json());
        desired.insert(host_key.clone(), record.clone());
        let owned = self.store.lease_keys(lease).await?;
        let plan = reconcile::plan(&desired, &owned, lease);
        if !plan.is_empty() {
            self.store.apply(&plan, lease).await?;
            info!(
                written = plan.puts.len(),
                deleted = plan.deletes.len(),
                "registry updated"
            );
        }
        known.keys.insert(
            host_key,
            Owned {
                value: record.into_bytes(),
                lease,
            },
        );
        self.refused = known
            .refused
            .iter()
            .map(|(id, r)| (id.clone(), r.reason.clone()))
            .collect();
        let response = v1::ResyncResponse {
            written: plan.puts.len() as u32,
            deleted: plan.deletes.len() as u32,
            registered: known.registrations.len() as u32,
            refused: known.refused.len() as u32,
        };
        self.known = Some(known);
        self.publish(lease);
        metrics::histogram!("legate_registrar_reconcile_seconds", "path" => "full")
            .record(started.elapsed().as_secs_f64());
        Ok(Some(response))
    }

    /// The event path: each container against its own keys, one transaction each.
    async fn containers(&mut self, ids: &[String]) -> Result<(), Error> {
        let started = Instant::now();
        let lease = *self.lease.borrow();
        for id in ids {
            let info = if self.stopping.contains(id) {
                None
            } else {
                self.source.inspect(id).await?
            };
            let wanted = info
                .as_ref()
                .map(|info| self.wanted(info))
                .unwrap_or_default();
            let Some(known) = self.known.as_mut() else {
                return Ok(());
            };
            let plan = reconcile::plan(&wanted.keys, &known.keys_of(id), lease);
            if !plan.is_empty() {
                self.store.apply(&plan, lease).await?;
                info!(
                    container = info.as_ref().map_or(short(id), |i| i.name.as_str()),
                    written = plan.puts.len(),
                    deleted = plan.deletes.len(),
                    "registry updated"
                );
            }
            if wanted.refused.is_none() {
                self.refused.remove(id);
            }
            known.set(id, wanted, lease);
        }
        self.publish(lease);
        metrics::histogram!("legate_registrar_reconcile_seconds", "path" => "event")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// What `info` asks for, by the conventions; a refusal is logged once per change.
    fn wanted(&mut self, info: &ContainerInfo) -> Wanted {
        let mut wanted = Wanted::default();
        if self.stopping.contains(&info.id) {
            debug!(container = info.name, "not routed: stopping");
            return wanted;
        }
        match conventions::evaluate(info, self.host_ip, &self.host_id) {
            Verdict::Ignore => {}
            Verdict::NotRouted(why) => debug!(container = info.name, why, "not routed"),
            Verdict::Register(targets, value) => {
                let json = value.to_json();
                for target in targets {
                    let registration = self.describe(&target, info);
                    wanted.keys.insert(registration.key.clone(), json.clone());
                    wanted.registrations.push(registration);
                }
            }
            Verdict::Refuse(reason) => {
                if self.refused.get(&info.id) != Some(&reason) {
                    warn!(
                        container = info.name,
                        id = short(&info.id),
                        reason,
                        "container refused"
                    );
                    metrics::counter!("legate_registrar_refused_total").increment(1);
                    self.refused.insert(info.id.clone(), reason.clone());
                }
                wanted.refused = Some(v1::RefusedContainer {
                    container_id: info.id.clone(),
                    container_name: info.name.clone(),
                    reason,
                });
            }
        }
        wanted
    }

    /// Publishes what is known to `Registrar.List` and the gauges.
    fn publish(&self, lease: i64) {
        let Some(known) = &self.known else { return };
        let registrations: Vec<v1::Registration> = known.registrations.values().cloned().collect();
        let mut refused: Vec<v1::RefusedContainer> = known.refused.values().cloned().collect();
        refused.sort_by(|a, b| a.container_name.cmp(&b.container_name));
        metrics::gauge!("legate_registrar_registrations").set(registrations.len() as f64);
        metrics::gauge!("legate_registrar_refused").set(refused.len() as f64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.list.send_modify(|list| {
            list.lease_id = lease;
            list.registrations = registrations;
            list.refused = refused;
            list.reconciled_at_unix_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
            list.error.clear();
        });
    }

    fn describe(&self, target: &Target, info: &ContainerInfo) -> v1::Registration {
        let schema = self.store.schema();
        let mut registration = v1::Registration {
            container_id: info.id.clone(),
            container_name: info.name.clone(),
            ..Default::default()
        };
        registration.key = match target {
            Target::App(app) => {
                registration.kind = v1::RegistrationKind::App as i32;
                registration.domain = app.domain.to_string();
                registration.ip = app.endpoint.ip.to_string();
                registration.port = u32::from(app.endpoint.port.get());
                schema.app_key(app)
            }
            Target::Service(service) => {
                registration.kind = v1::RegistrationKind::Service as i32;
                registration.service_name = service.name.to_string();
                registration.service_port = u32::from(service.service_port.get());
                registration.ip = service.endpoint.ip.to_string();
                registration.port = u32::from(service.endpoint.port.get());
                schema.service_key(service)
            }
        };
        registration
    }
}

/// The short form of a container id, for logs.
fn short(id: &str) -> &str {
    &id[..12.min(id.len())]
}

async fn sleep_opt(delay: Option<Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}
