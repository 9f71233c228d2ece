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
//!
//! Docker and etcd are reached through two traits, [`Containers`] and [`Keys`], implemented by
//! [`DockerSource`] and [`Store`]; the tests below drive the loop over fakes with paused time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;

use legate_proto::registry::{
    ContainerId, ContainerName, HostId, HostIp, Refusal, RefusedKey, Schema,
};
use legate_proto::runtime::{Backoff, sleep_until};
use legate_proto::v1;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::conventions::{self, ContainerInfo, Target, Verdict};
use crate::docker::{self, DockerError, DockerSource, Sign};
use crate::reconcile::{self, Owned, Plan};
use crate::store::{Store, StoreError};
use crate::{Error, Trigger};

/// The Docker edge, as the reconciler uses it.
pub(crate) trait Containers {
    /// The inspection of `id` in the cache, if any.
    fn cached(&self, id: &str) -> Option<&ContainerInfo>;
    /// Forgets the inspection of `id`.
    fn invalidate(&mut self, id: &str);
    /// Forgets every inspection.
    fn clear_cache(&mut self);
    /// The running containers, inspected.
    async fn running(&mut self) -> Result<Vec<ContainerInfo>, DockerError>;
    /// One container, inspected; `None` when it is gone.
    async fn inspect(&mut self, id: &str) -> Result<Option<ContainerInfo>, DockerError>;
}

impl Containers for DockerSource {
    fn cached(&self, id: &str) -> Option<&ContainerInfo> {
        DockerSource::cached(self, id)
    }
    fn invalidate(&mut self, id: &str) {
        DockerSource::invalidate(self, id);
    }
    fn clear_cache(&mut self) {
        DockerSource::clear_cache(self);
    }
    async fn running(&mut self) -> Result<Vec<ContainerInfo>, DockerError> {
        DockerSource::running(self).await
    }
    async fn inspect(&mut self, id: &str) -> Result<Option<ContainerInfo>, DockerError> {
        DockerSource::inspect(self, id).await
    }
}

/// The etcd edge, as the reconciler uses it.
pub(crate) trait Keys {
    /// The key schema.
    fn schema(&self) -> &Schema;
    /// The key of this host's record, and the record.
    fn host_record(&self) -> (String, String);
    /// The keys attached to `lease`, with their values.
    async fn lease_keys(&mut self, lease: i64) -> Result<BTreeMap<String, Owned>, StoreError>;
    /// Applies `plan` under `lease`.
    async fn apply(&mut self, plan: &Plan, lease: i64) -> Result<(), StoreError>;
}

impl Keys for Store {
    fn schema(&self) -> &Schema {
        Store::schema(self)
    }
    fn host_record(&self) -> (String, String) {
        (self.host_key(), self.record_json())
    }
    async fn lease_keys(&mut self, lease: i64) -> Result<BTreeMap<String, Owned>, StoreError> {
        Store::lease_keys(self, lease).await
    }
    async fn apply(&mut self, plan: &Plan, lease: i64) -> Result<(), StoreError> {
        Store::apply(self, plan, lease).await
    }
}

/// Where the reconciler is.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// What etcd holds is not known (at start, and after any failure): the next round is a full
    /// reconcile, at `at` at the latest.
    Unsure { at: tokio::time::Instant },
    /// The last round succeeded: events take the one-container path.
    Settled,
}

/// The triggers of one reconcile.
#[derive(Debug, Default)]
struct Round {
    containers: Vec<String>,
    full: bool,
    replies: Vec<oneshot::Sender<v1::ResyncResponse>>,
}

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
pub(crate) struct Reconciler<D = DockerSource, S = Store> {
    source: D,
    store: S,
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
    /// Per-change lines at INFO at most every few seconds.
    log_throttle: legate_proto::runtime::Throttle,
}

impl<D: Containers, S: Keys> Reconciler<D, S> {
    pub(crate) fn new(
        source: D,
        store: S,
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
            log_throttle: legate_proto::runtime::Throttle::new(legate_proto::runtime::INFO_EVERY),
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

    /// Reconciles on every trigger until `shutdown` or until every trigger sender is gone.
    pub(crate) async fn run(
        mut self,
        mut triggers: mpsc::Receiver<Trigger>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::default();
        let mut phase = Phase::Unsure {
            at: tokio::time::Instant::now(),
        };
        loop {
            let retry_at = match phase {
                Phase::Unsure { at } => Some(at),
                Phase::Settled => None,
            };
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                trigger = triggers.recv() => match trigger {
                    Some(trigger) => Some(trigger),
                    None => return, // every sender is gone
                },
                () = sleep_until(retry_at) => None,
            };
            let round = self.gather(first, &mut triggers);
            let outcome = match phase {
                Phase::Settled if !round.full => {
                    self.containers(&round.containers).await.map(|()| None)
                }
                _ => {
                    self.source.clear_cache();
                    self.full().await
                }
            };
            phase = match outcome {
                Ok(response) => {
                    backoff.reset();
                    if let Some(response) = response {
                        for reply in round.replies {
                            let _ = reply.send(response);
                        }
                    }
                    Phase::Settled
                }
                Err(e) => {
                    let delay = backoff.delay();
                    warn!(error = %e, retry_in = ?delay, "reconcile failed");
                    metrics::counter!("legate_registrar_reconcile_errors_total").increment(1);
                    let error = e.to_string();
                    self.list.send_if_modified(|list| {
                        let changed = list.error != error;
                        list.error = error;
                        changed
                    });
                    // Resync callers get no answer (their call fails) rather than a stale one.
                    Phase::Unsure {
                        at: tokio::time::Instant::now() + delay,
                    }
                }
            };
        }
    }

    /// The round that starts with `first` (none: a retry is due), with whatever else is
    /// already queued: the containers with events, in the order of their first event, each
    /// once; whether a full reconcile is asked for; the `Resync` calls to answer.
    fn gather(&mut self, first: Option<Trigger>, triggers: &mut mpsc::Receiver<Trigger>) -> Round {
        let mut round = Round {
            full: first.is_none(),
            ..Round::default()
        };
        let mut next = first;
        loop {
            match next {
                Some(Trigger::Container(event)) => {
                    self.follow(&event);
                    if !round.containers.contains(&event.id) {
                        round.containers.push(event.id);
                    }
                }
                Some(Trigger::Full) => round.full = true,
                Some(Trigger::Resync(reply)) => {
                    round.full = true;
                    round.replies.push(reply);
                }
                None => {}
            }
            match triggers.try_recv() {
                Ok(trigger) => next = Some(trigger),
                Err(_) => return round,
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
        let (host_key, record) = self.store.host_record();
        desired.insert(host_key.clone(), record.clone());
        let owned = self.store.lease_keys(lease).await?;
        let plan = reconcile::plan(&desired, &owned, lease);
        if !plan.is_empty() {
            self.store.apply(&plan, lease).await?;
            legate_proto::throttled!(
                self.log_throttle,
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
            let began = Instant::now();
            let info = if self.stopping.contains(id) {
                None
            } else {
                self.source.inspect(id).await?
            };
            let inspected = began.elapsed();
            let wanted = info
                .as_ref()
                .map(|info| self.wanted(info))
                .unwrap_or_default();
            let Some(known) = self.known.as_mut() else {
                return Ok(());
            };
            let plan = reconcile::plan(&wanted.keys, &known.keys_of(id), lease);
            let writing = Instant::now();
            if !plan.is_empty() {
                self.store.apply(&plan, lease).await?;
                legate_proto::throttled!(
                    self.log_throttle,
                    container = info.as_ref().map_or(short(id), |i| i.name.as_str()),
                    written = plan.puts.len(),
                    deleted = plan.deletes.len(),
                    "registry updated"
                );
            }
            debug!(
                id = short(id),
                inspect_us = inspected.as_micros() as u64,
                write_us = writing.elapsed().as_micros() as u64,
                total_us = began.elapsed().as_micros() as u64,
                "container reconciled"
            );
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
                // Written too, under the lease, so that operators' tools see every host's
                // refusals; it goes with the container like its registrations would.
                if let Ok(container_id) = ContainerId::new(&info.id) {
                    let key = self.store.schema().refused_key(&RefusedKey {
                        host_id: self.host_id.clone(),
                        container_id,
                    });
                    let name = ContainerName::new(&info.name).ok();
                    wanted
                        .keys
                        .insert(key, Refusal::new(name, &reason).to_json());
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use legate_proto::registry::Prefix;

    use super::*;
    use crate::conventions::{Binding, Health};
    use crate::docker::ContainerEvent;

    const LEASE: i64 = 7;

    /// What the fakes saw and hold, shared with the test.
    #[derive(Debug, Default)]
    struct World {
        /// Running containers, by id.
        containers: BTreeMap<String, ContainerInfo>,
        /// etcd: key -> value.
        etcd: BTreeMap<String, String>,
        listings: usize,
        inspections: Vec<String>,
        applies: Vec<Plan>,
        /// The next calls to etcd fail while this is above zero.
        etcd_failures: usize,
    }

    type Shared = Arc<Mutex<World>>;

    struct FakeDocker(Shared, HashMap<String, ContainerInfo>);

    impl Containers for FakeDocker {
        fn cached(&self, id: &str) -> Option<&ContainerInfo> {
            self.1.get(id)
        }
        fn invalidate(&mut self, id: &str) {
            self.1.remove(id);
        }
        fn clear_cache(&mut self) {
            self.1.clear();
        }
        async fn running(&mut self) -> Result<Vec<ContainerInfo>, DockerError> {
            let mut world = self.0.lock().unwrap();
            world.listings += 1;
            Ok(world.containers.values().cloned().collect())
        }
        async fn inspect(&mut self, id: &str) -> Result<Option<ContainerInfo>, DockerError> {
            let mut world = self.0.lock().unwrap();
            world.inspections.push(id.to_owned());
            let info = world.containers.get(id).cloned();
            if let Some(info) = &info {
                self.1.insert(id.to_owned(), info.clone());
            }
            Ok(info)
        }
    }

    struct FakeEtcd(Shared, Schema);

    impl FakeEtcd {
        fn fail(&self) -> Result<(), StoreError> {
            let mut world = self.0.lock().unwrap();
            if world.etcd_failures > 0 {
                world.etcd_failures -= 1;
                return Err(StoreError::LeaseLost(0));
            }
            Ok(())
        }
    }

    impl Keys for FakeEtcd {
        fn schema(&self) -> &Schema {
            &self.1
        }
        fn host_record(&self) -> (String, String) {
            ("/hosts/h".to_owned(), "{}".to_owned())
        }
        async fn lease_keys(&mut self, _: i64) -> Result<BTreeMap<String, Owned>, StoreError> {
            self.fail()?;
            let world = self.0.lock().unwrap();
            Ok(world
                .etcd
                .iter()
                .map(|(k, v)| {
                    let owned = Owned {
                        value: v.clone().into_bytes(),
                        lease: LEASE,
                    };
                    (k.clone(), owned)
                })
                .collect())
        }
        async fn apply(&mut self, plan: &Plan, _: i64) -> Result<(), StoreError> {
            self.fail()?;
            let mut world = self.0.lock().unwrap();
            for (key, value) in &plan.puts {
                world.etcd.insert(key.clone(), value.clone());
            }
            for key in &plan.deletes {
                world.etcd.remove(key);
            }
            world.applies.push(plan.clone());
            Ok(())
        }
    }

    fn id(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn app(n: u8) -> ContainerInfo {
        ContainerInfo {
            id: id(n),
            name: format!("web-{n}"),
            env: vec![format!("DOMAIN_NAME=app{n}.test")],
            labels: BTreeMap::new(),
            running: true,
            stop_signal: None,
            health: Health::None,
            ports: [(
                "80/tcp".to_owned(),
                vec![Binding {
                    host_ip: "127.0.0.1".to_owned(),
                    host_port: format!("{}", 32000 + u16::from(n)),
                }],
            )]
            .into(),
        }
    }

    fn event(n: u8, sign: Sign) -> Trigger {
        Trigger::Container(ContainerEvent { id: id(n), sign })
    }

    /// A reconciler over the fakes, running; its trigger channel and the list it publishes.
    fn start(
        world: &Shared,
    ) -> (
        mpsc::Sender<Trigger>,
        watch::Receiver<v1::ListResponse>,
        CancellationToken,
    ) {
        let (trigger_tx, trigger_rx) = mpsc::channel(64);
        let (list_tx, list_rx) = watch::channel(v1::ListResponse::default());
        let (_lease_tx, lease_rx) = watch::channel(LEASE);
        let schema = Schema::new(Prefix::new("").unwrap());
        let reconciler = Reconciler::new(
            FakeDocker(world.clone(), HashMap::new()),
            FakeEtcd(world.clone(), schema),
            (
                HostIp::parse("127.0.0.1").unwrap(),
                HostId::new("h").unwrap(),
            ),
            lease_rx,
            list_tx,
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(reconciler.run(trigger_rx, shutdown.clone()));
        (trigger_tx, list_rx, shutdown)
    }

    /// Lets the reconciler run until it waits for something.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    fn apps_in_etcd(world: &Shared) -> Vec<String> {
        world
            .lock()
            .unwrap()
            .etcd
            .keys()
            .filter(|k| k.starts_with("/apps/"))
            .map(|k| k.split('/').nth(2).unwrap_or_default().to_owned())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_reconcile_at_start_then_events_cost_one_container_each() {
        let world = Shared::default();
        world.lock().unwrap().containers = [(id(1), app(1)), (id(2), app(2))].into();
        let (triggers, list, _stop) = start(&world);
        settle().await;
        assert_eq!(apps_in_etcd(&world), ["app1.test", "app2.test"]);
        assert_eq!(list.borrow().registrations.len(), 2);
        assert_eq!(world.lock().unwrap().listings, 1);

        // A container starts: it alone is inspected, no listing, one transaction.
        world.lock().unwrap().containers.insert(id(3), app(3));
        world.lock().unwrap().inspections.clear();
        triggers.send(event(3, Sign::Started)).await.unwrap();
        settle().await;
        let seen = world.lock().unwrap();
        assert_eq!(seen.listings, 1, "an event listed the engine");
        assert_eq!(seen.inspections, [id(3)]);
        assert_eq!(seen.applies.len(), 2);
        assert_eq!(seen.applies[1].puts.len(), 1);
        drop(seen);
        assert_eq!(apps_in_etcd(&world).len(), 3);
        assert_eq!(list.borrow().registrations.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_events_of_one_container_are_coalesced() {
        let world = Shared::default();
        world.lock().unwrap().containers = [(id(1), app(1))].into();
        let (triggers, _list, _stop) = start(&world);
        settle().await;
        world.lock().unwrap().inspections.clear();
        for _ in 0..5 {
            triggers.send(event(1, Sign::Changed)).await.unwrap();
        }
        settle().await;
        assert_eq!(world.lock().unwrap().inspections, [id(1)]);
        // Nothing changed: nothing written.
        assert_eq!(world.lock().unwrap().applies.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_sign_deletes_at_once_without_an_inspection_and_a_reload_signal_nothing() {
        let world = Shared::default();
        world.lock().unwrap().containers = [(id(1), app(1)), (id(2), app(2))].into();
        let (triggers, list, _stop) = start(&world);
        settle().await;
        world.lock().unwrap().inspections.clear();
        triggers.send(event(1, Sign::Killed(1))).await.unwrap();
        settle().await;
        assert_eq!(apps_in_etcd(&world), ["app1.test", "app2.test"], "SIGHUP");
        triggers.send(event(1, Sign::Killed(15))).await.unwrap();
        settle().await;
        // Docker still lists it as running: it stays unrouted, also through a full reconcile.
        assert_eq!(apps_in_etcd(&world), ["app2.test"]);
        assert_eq!(
            world.lock().unwrap().inspections,
            [id(1)],
            "only the SIGHUP inspected"
        );
        triggers.send(Trigger::Full).await.unwrap();
        settle().await;
        assert_eq!(apps_in_etcd(&world), ["app2.test"]);
        assert_eq!(list.borrow().registrations.len(), 1);
        // It runs again: routed again.
        triggers.send(event(1, Sign::Started)).await.unwrap();
        settle().await;
        assert_eq!(apps_in_etcd(&world), ["app1.test", "app2.test"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_event_is_retried_as_a_full_reconcile_with_backoff() {
        let world = Shared::default();
        world.lock().unwrap().containers = [(id(1), app(1))].into();
        let (triggers, list, _stop) = start(&world);
        settle().await;
        world.lock().unwrap().containers.insert(id(2), app(2));
        world.lock().unwrap().etcd_failures = 2;
        triggers.send(event(2, Sign::Started)).await.unwrap();
        settle().await;
        assert_eq!(apps_in_etcd(&world), ["app1.test"]);
        assert!(!list.borrow().error.is_empty(), "the failure is published");
        // The first retry (a full reconcile) fails too; the next one, later, succeeds.
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(apps_in_etcd(&world), ["app1.test", "app2.test"]);
        assert!(
            world.lock().unwrap().listings >= 2,
            "the retry was a full reconcile"
        );
        assert_eq!(list.borrow().error, "");
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_answers_once_reconciled_and_repairs_what_others_changed() {
        let world = Shared::default();
        world.lock().unwrap().containers = [(id(1), app(1))].into();
        let (triggers, _list, _stop) = start(&world);
        settle().await;
        // Someone deletes our key and writes a stray one under our lease.
        {
            let mut w = world.lock().unwrap();
            w.etcd.retain(|k, _| !k.starts_with("/apps/"));
            w.etcd.insert(
                format!("/apps/stray.test/{}/127.0.0.1:1", id(9)),
                String::new(),
            );
        }
        let (reply, answer) = oneshot::channel();
        triggers.send(Trigger::Resync(reply)).await.unwrap();
        let response = answer.await.unwrap();
        assert_eq!(
            (response.written, response.deleted, response.registered),
            (1, 1, 1)
        );
        assert_eq!(apps_in_etcd(&world), ["app1.test"]);
    }
}
