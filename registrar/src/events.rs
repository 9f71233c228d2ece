//! The event follower: Docker's container events, as triggers of the reconciler.
//!
//! ```text
//!            subscribed: trigger a full reconcile (anything may have happened meanwhile)
//!   Subscribe ─────────────────────────────────────────────► Follow(stream)
//!      ▲   │ Docker unreachable: wait (backoff)                │ each event: trigger it
//!      │   └──┐                                                │
//!      └──────┴──── stream failed or ended: wait (backoff, ◄───┘
//!                   from the least again if it had lasted)
//! ```
//!
//! Docker is reached through [`Events`], implemented by [`DockerEvents`]; the tests below drive
//! the machine over a fake with paused time.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use legate_proto::runtime::{Backoff, pause};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::Trigger;
use crate::docker::{ContainerEvent, DockerArgs, DockerError, DockerSource};

/// Container events as they come.
pub(crate) type EventStream =
    Pin<Box<dyn Stream<Item = Result<ContainerEvent, DockerError>> + Send>>;

/// The Docker edge, as the event follower uses it.
pub(crate) trait Events {
    /// Subscribes to the engine's container events.
    async fn subscribe(&mut self) -> Result<EventStream, DockerError>;
}

/// The engine's events, on a connection of their own.
pub(crate) struct DockerEvents {
    pub docker: DockerArgs,
    pub filters: Vec<String>,
}

impl Events for DockerEvents {
    async fn subscribe(&mut self) -> Result<EventStream, DockerError> {
        let source = DockerSource::connect(&self.docker, self.filters.clone()).await?;
        Ok(Box::pin(source.events()))
    }
}

/// Where the follower is.
enum State {
    Subscribe,
    Follow(EventStream),
}

/// What a transition leads to.
enum Step {
    Next(State),
    /// Subscribe again after a backoff delay; the failure, for the log.
    Retry(String),
    /// The reconciler is gone.
    Stop,
}

/// The event follower over its Docker edge.
pub(crate) struct Follower<E> {
    edge: E,
    trigger: mpsc::Sender<Trigger>,
    backoff: Backoff,
}

impl<E: Events> Follower<E> {
    pub(crate) fn new(edge: E, trigger: mpsc::Sender<Trigger>) -> Self {
        Self {
            edge,
            trigger,
            backoff: Backoff::default(),
        }
    }

    /// Follows the events until `shutdown`.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut state = State::Subscribe;
        let mut began = Instant::now();
        loop {
            let step = tokio::select! {
                () = shutdown.cancelled() => return,
                step = self.step(state) => step,
            };
            state = match step {
                Step::Next(next) => next,
                Step::Stop => return,
                Step::Retry(failure) => {
                    let delay = self.backoff.after(began);
                    warn!(retry_in = ?delay, "{failure}");
                    if !pause(delay, &shutdown).await {
                        return;
                    }
                    began = Instant::now();
                    State::Subscribe
                }
            };
        }
    }

    /// One transition.
    async fn step(&mut self, state: State) -> Step {
        match state {
            State::Subscribe => match self.edge.subscribe().await {
                Ok(stream) => {
                    // Anything may have happened while there was no stream.
                    if self.trigger.send(Trigger::Full).await.is_err() {
                        return Step::Stop;
                    }
                    Step::Next(State::Follow(stream))
                }
                Err(e) => Step::Retry(format!("connecting to Docker for events: {e}")),
            },
            State::Follow(mut stream) => {
                let failure = match stream.next().await {
                    Some(Ok(event)) => {
                        if self.trigger.send(Trigger::Container(event)).await.is_err() {
                            return Step::Stop;
                        }
                        return Step::Next(State::Follow(stream));
                    }
                    Some(Err(e)) => format!("Docker event stream failed: {e}"),
                    None => "Docker event stream ended".to_owned(),
                };
                metrics::counter!("legate_registrar_event_stream_restarts_total").increment(1);
                Step::Retry(failure)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::docker::Sign;

    /// The fake engine: what it was asked, and the stream it serves.
    #[derive(Default)]
    struct World {
        /// When each subscription was asked for (paused time).
        subscriptions: Vec<Instant>,
        /// The next subscriptions that fail.
        refusals: usize,
        /// Sends on the open stream; dropped, the stream ends.
        stream: Option<mpsc::UnboundedSender<Result<ContainerEvent, DockerError>>>,
    }

    #[derive(Clone, Default)]
    struct FakeDocker(Arc<Mutex<World>>);

    impl Events for FakeDocker {
        async fn subscribe(&mut self) -> Result<EventStream, DockerError> {
            let mut world = self.0.lock().unwrap();
            world.subscriptions.push(Instant::now());
            if world.refusals > 0 {
                world.refusals -= 1;
                let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                return Err(DockerError::Api(bollard::errors::Error::IOError {
                    err: refused,
                }));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            world.stream = Some(tx);
            Ok(Box::pin(stream_of(rx)))
        }
    }

    fn stream_of<T: Send + 'static>(
        mut rx: mpsc::UnboundedReceiver<T>,
    ) -> impl Stream<Item = T> + Send {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    impl FakeDocker {
        fn event(&self, n: u8) {
            let event = ContainerEvent {
                id: format!("{n:02x}").repeat(32),
                sign: Sign::Started,
            };
            let world = self.0.lock().unwrap();
            world.stream.as_ref().unwrap().send(Ok(event)).unwrap();
        }
        fn end(&self) {
            self.0.lock().unwrap().stream = None;
        }
        fn gaps(&self) -> Vec<Duration> {
            let world = self.0.lock().unwrap();
            (world.subscriptions.windows(2))
                .map(|pair| pair[1] - pair[0])
                .collect()
        }
    }

    /// `future`, failing the test if it takes a (paused) minute.
    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), future)
            .await
            .expect("still waiting after a minute")
    }

    /// What the next trigger is: `full`, or the first two hex digits of a container's id.
    async fn next(triggers: &mut mpsc::Receiver<Trigger>) -> String {
        match within(triggers.recv()).await {
            Some(Trigger::Full) => "full".to_owned(),
            Some(Trigger::Container(event)) => event.id[..2].to_owned(),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn start(docker: &FakeDocker) -> (mpsc::Receiver<Trigger>, CancellationToken) {
        let (tx, rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        tokio::spawn(Follower::new(docker.clone(), tx).run(shutdown.clone()));
        (rx, shutdown)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_stream_is_followed_again_and_what_it_missed_reconciled_in_full() {
        let docker = FakeDocker::default();
        let (mut triggers, shutdown) = start(&docker);
        assert_eq!(
            next(&mut triggers).await,
            "full",
            "at the first subscription"
        );
        docker.event(1);
        docker.event(2);
        assert_eq!(next(&mut triggers).await, "01");
        assert_eq!(next(&mut triggers).await, "02");

        docker.end();
        assert_eq!(
            next(&mut triggers).await,
            "full",
            "after the stream came back"
        );
        docker.event(3);
        assert_eq!(next(&mut triggers).await, "03");
        let gap = docker.gaps()[0];
        assert!(gap >= Duration::from_millis(50), "backed off: {gap:?}");
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn docker_away_is_asked_again_with_growing_delays_and_nothing_is_triggered_meanwhile() {
        let docker = FakeDocker::default();
        docker.0.lock().unwrap().refusals = 6;
        let (mut triggers, shutdown) = start(&docker);
        assert_eq!(next(&mut triggers).await, "full", "once Docker answers");
        assert!(
            triggers.try_recv().is_err(),
            "one full reconcile, not one per attempt"
        );
        let gaps = docker.gaps();
        assert_eq!(gaps.len(), 6);
        assert!(gaps[5] > gaps[0], "{gaps:?}");
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn the_follower_stops_when_the_reconciler_is_gone() {
        let docker = FakeDocker::default();
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(Follower::new(docker.clone(), tx).run(CancellationToken::new()));
        drop(rx);
        within(task).await.unwrap();
    }
}
