//! The lease keeper: keeps this host's etcd lease alive; when it is lost, grants a new one and
//! has everything registered again under it.
//!
//! ```text
//!              keep-alive failed (etcd away, stream stalled):
//!              wait (backoff, at most a keep-alive period), same lease
//!              ┌────────┐
//!              ▼        │
//!   ──► Keep(lease) ────┘
//!         │     ▲
//!   lease │     │ granted: publish the new lease, trigger a full reconcile
//!    lost ▼     │
//!    Grant { lost } ◄──┐ grant failed: wait
//!         └────────────┘
//!   shutdown, in any state ──► Stopped
//! ```
//!
//! A lease that etcd says does not exist ([`StoreError::LeaseLost`]) is never retried: its keys
//! are gone, only a new lease and a full registration bring them back. Anything else is
//! transient and retried on the same lease at least once per keep-alive period, so that the
//! moment etcd answers again its answer decides.
//!
//! etcd is reached through [`Leases`], implemented by [`Store`]; the tests below drive the
//! machine over a fake with paused time.

use std::time::Duration;

use legate_proto::runtime::{Backoff, pause};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Trigger;
use crate::store::{self, Store, StoreError};

/// The etcd edge, as the lease keeper uses it.
pub(crate) trait Leases {
    /// Keeps `lease` alive until `shutdown` (then `Ok`, and only then) or a failure.
    async fn keep_alive(
        &mut self,
        lease: i64,
        ttl: i64,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError>;
    /// Grants a new lease of `ttl` seconds.
    async fn grant(&mut self, ttl: i64) -> Result<i64, StoreError>;
}

impl Leases for Store {
    async fn keep_alive(
        &mut self,
        lease: i64,
        ttl: i64,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        Store::keep_alive(self, lease, ttl, shutdown).await
    }
    async fn grant(&mut self, ttl: i64) -> Result<i64, StoreError> {
        Store::grant(self, ttl).await
    }
}

/// Where the keeper is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Keeping this lease alive.
    Keep(i64),
    /// This lease is gone: a new one is needed.
    Grant { lost: i64 },
    /// Shut down.
    Stopped,
}

/// The next state, and how long to wait before entering it.
type Step = (State, Option<Duration>);

/// The lease keeper over its etcd edge.
pub(crate) struct Keeper<L> {
    edge: L,
    ttl: i64,
    /// Caps every wait: a keep-alive period, a second at most.
    backoff: Backoff,
    /// The lease in force, for the reconciler and the host record guard.
    lease: watch::Sender<i64>,
    trigger: mpsc::Sender<Trigger>,
}

impl<L: Leases> Keeper<L> {
    pub(crate) fn new(
        edge: L,
        ttl: i64,
        lease: watch::Sender<i64>,
        trigger: mpsc::Sender<Trigger>,
    ) -> Self {
        let cap = store::keep_alive_period(ttl).min(Duration::from_secs(1));
        Self {
            edge,
            ttl,
            backoff: Backoff::capped(cap),
            lease,
            trigger,
        }
    }

    /// Runs the machine from the lease in force until `shutdown`.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut state = State::Keep(*self.lease.borrow());
        while state != State::Stopped {
            let (next, wait) = self.step(state, &shutdown).await;
            state = next;
            if let Some(delay) = wait
                && !pause(delay, &shutdown).await
            {
                return;
            }
        }
    }

    /// One transition.
    async fn step(&mut self, state: State, shutdown: &CancellationToken) -> Step {
        if shutdown.is_cancelled() {
            return (State::Stopped, None);
        }
        match state {
            State::Keep(lease) => {
                let began = Instant::now();
                match self.edge.keep_alive(lease, self.ttl, shutdown).await {
                    Ok(()) => (State::Stopped, None),
                    Err(StoreError::LeaseLost(_)) => {
                        warn!(
                            lease = format!("{lease:x}"),
                            "lease lost: granting a new one and registering everything again"
                        );
                        metrics::counter!("legate_registrar_leases_lost_total").increment(1);
                        (State::Grant { lost: lease }, None)
                    }
                    Err(e) => {
                        // A keep-alive that held for a while failed: retried at once again.
                        let delay = self.backoff.after(began);
                        warn!(error = %e, retry_in = ?delay, "lease keep-alive failed");
                        (State::Keep(lease), Some(delay))
                    }
                }
            }
            State::Grant { lost } => {
                let granted = tokio::select! {
                    () = shutdown.cancelled() => return (State::Stopped, None),
                    granted = self.edge.grant(self.ttl) => granted,
                };
                match granted {
                    Ok(new) => {
                        info!(
                            lease = format!("{new:x}"),
                            lost = format!("{lost:x}"),
                            "new lease"
                        );
                        self.lease.send_replace(new);
                        let _ = self.trigger.send(Trigger::Full).await;
                        self.backoff.reset();
                        (State::Keep(new), None)
                    }
                    Err(e) => {
                        let delay = self.backoff.delay();
                        warn!(error = %e, retry_in = ?delay, "granting a lease");
                        (State::Grant { lost }, Some(delay))
                    }
                }
            }
            State::Stopped => (State::Stopped, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    const TTL: i64 = 3;

    /// What the fake etcd answers and what it was asked.
    #[derive(Debug, Default)]
    struct World {
        /// Answers of the next keep-alives; once empty, a keep-alive holds until shutdown.
        keep_alives: VecDeque<Result<(), StoreError>>,
        /// Answers of the next grants; once empty, grants count up from 100.
        grants: VecDeque<Result<i64, StoreError>>,
        /// The leases kept alive, in order, with the (paused) time of each call.
        kept: Vec<(i64, Instant)>,
        granted: usize,
    }

    #[derive(Clone, Default)]
    struct FakeEtcd(Arc<Mutex<World>>);

    impl Leases for FakeEtcd {
        async fn keep_alive(
            &mut self,
            lease: i64,
            _: i64,
            shutdown: &CancellationToken,
        ) -> Result<(), StoreError> {
            let answer = {
                let mut world = self.0.lock().unwrap();
                world.kept.push((lease, Instant::now()));
                world.keep_alives.pop_front()
            };
            match answer {
                Some(answer) => answer,
                None => {
                    shutdown.cancelled().await;
                    Ok(())
                }
            }
        }
        async fn grant(&mut self, _: i64) -> Result<i64, StoreError> {
            let mut world = self.0.lock().unwrap();
            world.granted += 1;
            let n = world.granted as i64;
            world.grants.pop_front().unwrap_or(Ok(99 + n))
        }
    }

    fn stalled() -> StoreError {
        StoreError::KeepAliveStalled {
            lease: 7,
            why: "was closed by etcd",
        }
    }

    /// A keeper of lease 7 over `etcd`, running: the lease it publishes, its triggers, and the
    /// token that stops it.
    fn start(
        etcd: &FakeEtcd,
    ) -> (
        watch::Receiver<i64>,
        mpsc::Receiver<Trigger>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (lease_tx, lease_rx) = watch::channel(7);
        let (trigger_tx, trigger_rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let keeper = Keeper::new(etcd.clone(), TTL, lease_tx, trigger_tx);
        let task = tokio::spawn(keeper.run(shutdown.clone()));
        (lease_rx, trigger_rx, shutdown, task)
    }

    /// `future`, failing the test if it takes a (paused) minute.
    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), future)
            .await
            .expect("still waiting after a minute")
    }

    fn kept(etcd: &FakeEtcd) -> Vec<i64> {
        etcd.0
            .lock()
            .unwrap()
            .kept
            .iter()
            .map(|(l, _)| *l)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_lost_on_keep_alive_is_replaced_and_everything_registered_again() {
        let etcd = FakeEtcd::default();
        etcd.0
            .lock()
            .unwrap()
            .keep_alives
            .push_back(Err(StoreError::LeaseLost(7)));
        let (mut lease, mut triggers, shutdown, task) = start(&etcd);

        within(lease.changed()).await.unwrap();
        assert_eq!(*lease.borrow(), 100, "the new lease is published");
        assert!(matches!(within(triggers.recv()).await, Some(Trigger::Full)));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            kept(&etcd),
            [7, 100],
            "the new lease is kept alive, the old one never again"
        );
        assert_eq!(etcd.0.lock().unwrap().granted, 1);

        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_keeps_the_same_lease_retried_within_a_keep_alive_period() {
        let etcd = FakeEtcd::default();
        for _ in 0..6 {
            etcd.0.lock().unwrap().keep_alives.push_back(Err(stalled()));
        }
        let (lease, mut triggers, shutdown, task) = start(&etcd);
        tokio::time::sleep(Duration::from_secs(30)).await;

        assert_eq!(kept(&etcd), [7; 7], "retried on lease 7, nothing granted");
        assert_eq!(etcd.0.lock().unwrap().granted, 0);
        assert_eq!(*lease.borrow(), 7);
        assert!(triggers.try_recv().is_err(), "no re-registration");
        let times: Vec<Instant> = etcd
            .0
            .lock()
            .unwrap()
            .kept
            .iter()
            .map(|(_, t)| *t)
            .collect();
        let cap = store::keep_alive_period(TTL).min(Duration::from_secs(1));
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap <= cap, "waited {gap:?}, more than the cap {cap:?}");
        }

        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_grant_is_retried_until_a_lease_is_granted() {
        let etcd = FakeEtcd::default();
        {
            let mut world = etcd.0.lock().unwrap();
            world.keep_alives.push_back(Err(StoreError::LeaseLost(7)));
            world
                .grants
                .push_back(Err(StoreError::WriteTimedOut(Duration::from_secs(2))));
            world.grants.push_back(Err(stalled()));
        }
        let (mut lease, mut triggers, shutdown, task) = start(&etcd);

        within(lease.changed()).await.unwrap();
        assert_eq!(*lease.borrow(), 102, "the third grant's lease");
        assert!(matches!(within(triggers.recv()).await, Some(Trigger::Full)));
        assert!(
            triggers.try_recv().is_err(),
            "one re-registration, not one per attempt"
        );

        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_while_waiting_to_grant_stops_without_a_lease() {
        let etcd = FakeEtcd::default();
        {
            let mut world = etcd.0.lock().unwrap();
            world.keep_alives.push_back(Err(StoreError::LeaseLost(7)));
            for _ in 0..100 {
                world.grants.push_back(Err(stalled()));
            }
        }
        let (lease, _triggers, shutdown, task) = start(&etcd);
        tokio::time::sleep(Duration::from_secs(2)).await;
        shutdown.cancel();
        within(task).await.unwrap();
        assert_eq!(*lease.borrow(), 7, "no lease was granted");
        assert!(etcd.0.lock().unwrap().granted < 100);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_a_healthy_keep_alive() {
        let etcd = FakeEtcd::default();
        let (_lease, _triggers, shutdown, task) = start(&etcd);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            kept(&etcd),
            [7],
            "one keep-alive stream for the whole minute"
        );
        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[test]
    fn etcd_saying_a_lease_does_not_exist_is_a_lost_lease_never_a_transient_error() {
        use crate::store::lease_error;
        let not_found = tonic::Status::not_found("etcdserver: requested lease not found");
        let cases = [
            etcd_client::Error::GRpcStatus(not_found),
            etcd_client::Error::LeaseKeepAliveError("lease not found".to_owned()),
        ];
        for case in cases {
            let described = case.to_string();
            assert!(
                matches!(lease_error(7)(case), StoreError::LeaseLost(7)),
                "{described}"
            );
        }
        let unavailable = tonic::Status::unavailable("etcdserver: leader changed");
        assert!(matches!(
            lease_error(7)(etcd_client::Error::GRpcStatus(unavailable)),
            StoreError::Etcd(_)
        ));
    }
}
