//! The supervisor as confgen's subscriber: `Confgen.Watch` feeds the latest snapshot into a
//! `watch` channel (latest wins, so snapshots that arrive during an apply are coalesced), and
//! each outcome goes back through `Confgen.Report`.
//!
//! The stream asks for deltas: each snapshot after the first comes as the change from the one
//! before, and is rebuilt here and checked against its checksum (`legate_proto::snapshot`); one
//! that does not rebuild ends the stream, and the next begins with a whole snapshot.
//!
//! Both reconnect with backoff. A reconnect replays confgen's current snapshot; if it is what
//! runs, applying it is a no-op (UNCHANGED).

use std::sync::Arc;

use legate_proto::runtime;
use legate_proto::snapshot::{self, Digest};
use legate_proto::v1::confgen_client::ConfgenClient;
use legate_proto::v1::{ApplyReport, ApplyResult, ConfigSnapshot, WatchRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::MAX_MESSAGE;
use crate::apply::{Base, Rebuilt, Stats};

/// A connection to confgen on behalf of one node.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub channel: Channel,
    pub node_id: String,
    pub stats: watch::Receiver<Stats>,
}

/// The confgen edge, as the subscriber's watch uses it.
pub(crate) trait Confgen {
    /// An open `Confgen.Watch` stream.
    type Stream: Snapshots;
    /// Subscribes.
    async fn watch(&mut self, request: WatchRequest) -> Result<Self::Stream, tonic::Status>;
}

/// The messages of a `Confgen.Watch` stream.
pub(crate) trait Snapshots {
    /// The next one; `None` when confgen ended the stream.
    async fn next(&mut self) -> Result<Option<ConfigSnapshot>, tonic::Status>;
}

impl Confgen for ConfgenClient<Channel> {
    type Stream = tonic::Streaming<ConfigSnapshot>;

    async fn watch(&mut self, request: WatchRequest) -> Result<Self::Stream, tonic::Status> {
        Ok(ConfgenClient::watch(self, request).await?.into_inner())
    }
}

impl Snapshots for tonic::Streaming<ConfigSnapshot> {
    async fn next(&mut self) -> Result<Option<ConfigSnapshot>, tonic::Status> {
        self.message().await
    }
}

/// Where the watch is.
enum State<S> {
    /// Not subscribed: subscribe, for a whole snapshot first.
    Subscribe,
    /// Subscribed; the last snapshot of this stream, which the next may be a delta of.
    Streaming {
        stream: S,
        base: Option<(Arc<ConfigSnapshot>, Digest)>,
    },
}

/// What a transition leads to.
enum Step<S> {
    Next(State<S>),
    /// Subscribe again after a backoff delay: why, for the log.
    Retry(String),
}

/// The watch over its confgen edge.
struct Watch<C> {
    edge: C,
    node_id: String,
    stats: watch::Receiver<Stats>,
    snapshots: watch::Sender<Option<Rebuilt>>,
    backoff: runtime::Backoff,
    /// The base a new snapshot replaced: once applied and let go by every task, the next
    /// configuration is written into its text's allocation.
    spare: Option<Arc<ConfigSnapshot>>,
}

impl<C: Confgen> Watch<C> {
    async fn run(mut self, shutdown: &CancellationToken) {
        let mut state = State::Subscribe;
        // When the current subscription began: one that lasted is retried at once.
        let mut began = tokio::time::Instant::now();
        loop {
            let step = tokio::select! {
                () = shutdown.cancelled() => return,
                step = self.step(state) => step,
            };
            state = match step {
                Step::Next(next) => next,
                Step::Retry(error) => {
                    let delay = self.backoff.after(began);
                    warn!(error = %error, retry_in = ?delay, "confgen watch");
                    if !runtime::pause(delay, shutdown).await {
                        return;
                    }
                    began = tokio::time::Instant::now();
                    State::Subscribe
                }
            };
        }
    }

    /// One transition.
    async fn step(&mut self, state: State<C::Stream>) -> Step<C::Stream> {
        match state {
            State::Subscribe => {
                // What runs: confgen sends nothing until it has something else.
                let have_checksum = self.stats.borrow().running_checksum.clone();
                let request = WatchRequest {
                    node_id: self.node_id.clone(),
                    have_checksum,
                    omit_model: true,
                    // Not the first delta streams' field: a confgen of that version sends
                    // whole snapshots with checksums this one checks.
                    deltas: false,
                    grouped_deltas: true,
                };
                match self.edge.watch(request).await {
                    Ok(stream) => {
                        info!("subscribed to confgen");
                        Step::Next(State::Streaming { stream, base: None })
                    }
                    Err(status) => Step::Retry(status.to_string()),
                }
            }
            State::Streaming { mut stream, base } => match stream.next().await {
                Ok(Some(message)) => match self.publish(base.as_ref(), message) {
                    Ok(base) => Step::Next(State::Streaming {
                        stream,
                        base: Some(base),
                    }),
                    Err(e) => {
                        metrics::counter!("legate_supervisor_snapshots_refused_total").increment(1);
                        Step::Retry(format!(
                            "a snapshot from confgen does not rebuild, subscribing again for a \
                             whole one: {e}"
                        ))
                    }
                },
                Ok(None) => Step::Retry("confgen ended the stream".to_owned()),
                Err(status) => Step::Retry(status.to_string()),
            },
        }
    }

    /// Rebuilds `message` (against `base` if it is a delta) and publishes it; the new base.
    fn publish(
        &mut self,
        base: Option<&(Arc<ConfigSnapshot>, Digest)>,
        message: ConfigSnapshot,
    ) -> Result<(Arc<ConfigSnapshot>, Digest), snapshot::DeltaError> {
        let delta = message.delta.as_ref().map(|delta| {
            let kept = |keep: u64| usize::try_from(keep).unwrap_or(0);
            Base {
                checksum: delta.base_checksum.clone(),
                span: snapshot::Span {
                    prefix: delta.config.as_ref().map_or(0, |c| kept(c.keep_prefix)),
                    suffix: delta.config.as_ref().map_or(0, |c| kept(c.keep_suffix)),
                },
            }
        });
        // The base before `base`: once nothing else holds it (applied and replaced), the new
        // configuration is written into its text's buffer.
        let buffer = (self.spare.take())
            .and_then(|spare| Arc::try_unwrap(spare).ok())
            .map(|spare| spare.haproxy_config)
            .unwrap_or_default();
        let (snapshot, digest) =
            snapshot::rebuild_in(base.map(|(s, d)| (&**s, d)), message, buffer)?;
        self.spare = base.map(|(base, _)| base.clone());
        let snapshot = Arc::new(snapshot);
        self.snapshots.send_replace(Some(Rebuilt {
            snapshot: snapshot.clone(),
            base: delta,
        }));
        Ok((snapshot, digest))
    }
}

impl Subscriber {
    fn client(&self) -> ConfgenClient<Channel> {
        ConfgenClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Follows `Confgen.Watch` until `shutdown`, publishing every snapshot.
    pub async fn watch(
        self,
        snapshots: watch::Sender<Option<Rebuilt>>,
        shutdown: CancellationToken,
    ) {
        let watch = Watch {
            edge: self.client(),
            node_id: self.node_id.clone(),
            stats: self.stats.clone(),
            snapshots,
            backoff: runtime::Backoff::default(),
            spare: None,
        };
        watch.run(&shutdown).await;
    }

    /// Sends each outcome to `Confgen.Report` until `shutdown`; a newer outcome replaces one
    /// that could not be sent yet.
    pub async fn report(
        self,
        mut results: watch::Receiver<Option<ApplyResult>>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = results.changed() => if changed.is_err() { return },
            }
            let Some(result) = results.borrow_and_update().clone() else {
                continue;
            };
            let report = ApplyReport {
                node_id: self.node_id.clone(),
                result: Some(result),
            };
            let sent = runtime::retry("reporting to confgen", &shutdown, || {
                let mut client = self.client();
                let report = report.clone();
                async move { client.report(report).await }
            });
            tokio::select! {
                _ = sent => {}
                // A newer outcome supersedes this one.
                _ = results.changed() => {
                    results.mark_changed();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use futures_util::{Stream, StreamExt, stream};
    use legate_proto::v1::confgen_server::{Confgen, ConfgenServer};
    use legate_proto::v1::{self, ConfigFile};
    use tonic::{Request, Response, Status};

    use super::*;

    /// A confgen that answers each Watch with the next list of messages, then keeps the stream
    /// open.
    struct Fake {
        watches: Arc<AtomicUsize>,
        script: Mutex<VecDeque<Vec<ConfigSnapshot>>>,
    }

    #[tonic::async_trait]
    impl Confgen for Fake {
        type WatchStream = Pin<Box<dyn Stream<Item = Result<ConfigSnapshot, Status>> + Send>>;

        async fn watch(
            &self,
            request: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            assert!(
                request.get_ref().grouped_deltas,
                "the supervisor asks for deltas"
            );
            self.watches.fetch_add(1, Ordering::SeqCst);
            let messages = self.script.lock().unwrap().pop_front().unwrap_or_default();
            let messages = stream::iter(messages.into_iter().map(Ok)).chain(stream::pending());
            Ok(Response::new(Box::pin(messages)))
        }

        async fn report(
            &self,
            _: Request<ApplyReport>,
        ) -> Result<Response<v1::ReportResponse>, Status> {
            Ok(Response::new(v1::ReportResponse {}))
        }

        async fn status(
            &self,
            _: Request<v1::ConfgenStatusRequest>,
        ) -> Result<Response<v1::ConfgenStatus>, Status> {
            Err(Status::unimplemented("not in this fake"))
        }
    }

    fn whole(version: u64, config: &str) -> ConfigSnapshot {
        let maps = vec![ConfigFile {
            name: "hosts.map".to_owned(),
            content: format!("a.example slot_{version}\n"),
        }];
        ConfigSnapshot {
            version,
            checksum: legate_proto::checksum(config, &maps),
            haproxy_config: config.to_owned(),
            maps,
            ..ConfigSnapshot::default()
        }
    }

    /// A delta that does not fit the subscriber's base ends the stream; the next one starts
    /// whole, and the deltas that follow it are rebuilt.
    #[tokio::test]
    async fn a_delta_that_does_not_rebuild_is_dropped_and_the_stream_starts_again_whole() {
        let one = whole(1, "defaults\nbackend a\n    server s 10.0.0.1:80\n");
        let two = whole(2, "defaults\nbackend a\n    server s 10.0.0.2:80\n");
        let three = whole(3, "defaults\nbackend a\n    server s 10.0.0.3:80\n");
        let other = whole(9, "defaults\n");
        let script = VecDeque::from([
            // A delta against a snapshot this subscriber never got.
            vec![one.clone(), snapshot::delta(&other, &two)],
            vec![two.clone(), snapshot::delta(&two, &three)],
        ]);
        let watches = Arc::new(AtomicUsize::new(0));
        let fake = Fake {
            watches: watches.clone(),
            script: Mutex::new(script),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(ConfgenServer::new(fake))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                shutdown.clone().cancelled_owned(),
            );
        let server = tokio::spawn(server);
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        let subscriber = Subscriber {
            channel,
            node_id: "node-a".to_owned(),
            stats: watch::channel(Stats::default()).1,
        };
        let (tx, mut rx) = watch::channel(None);
        let watching = tokio::spawn(subscriber.watch(tx, shutdown.clone()));
        let mut seen = Vec::new();
        while seen.last() != Some(&3) {
            tokio::time::timeout(Duration::from_secs(30), rx.changed())
                .await
                .expect("no snapshot within 30 s")
                .unwrap();
            let snapshot = rx.borrow_and_update().clone().unwrap().snapshot;
            let expected = [&one, &two, &three][snapshot.version as usize - 1];
            assert_eq!(
                (&snapshot.haproxy_config, &snapshot.maps, &snapshot.checksum),
                (&expected.haproxy_config, &expected.maps, &expected.checksum)
            );
            seen.push(snapshot.version);
        }
        assert!(!seen.contains(&9));
        assert_eq!(watches.load(Ordering::SeqCst), 2, "subscribed again once");
        shutdown.cancel();
        watching.await.unwrap();
        server.await.unwrap().unwrap();
    }

    /// The confgen edge, faked: what it was asked, and the stream it serves.
    #[derive(Default)]
    struct World {
        /// Each `Confgen.Watch`, with its (paused) time.
        requests: Vec<(WatchRequest, tokio::time::Instant)>,
        /// The next subscriptions that fail.
        refusals: usize,
        /// Sends on the open stream; dropped, confgen ends it.
        stream: Option<tokio::sync::mpsc::UnboundedSender<ConfigSnapshot>>,
    }

    #[derive(Clone, Default)]
    struct FakeConfgen(Arc<Mutex<World>>);

    struct FakeStream(tokio::sync::mpsc::UnboundedReceiver<ConfigSnapshot>);

    impl super::Confgen for FakeConfgen {
        type Stream = FakeStream;
        async fn watch(&mut self, request: WatchRequest) -> Result<FakeStream, Status> {
            let mut world = self.0.lock().unwrap();
            world.requests.push((request, tokio::time::Instant::now()));
            if world.refusals > 0 {
                world.refusals -= 1;
                return Err(Status::unavailable("confgen is away"));
            }
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            world.stream = Some(tx);
            Ok(FakeStream(rx))
        }
    }

    impl super::Snapshots for FakeStream {
        async fn next(&mut self) -> Result<Option<ConfigSnapshot>, Status> {
            Ok(self.0.recv().await)
        }
    }

    impl FakeConfgen {
        fn requests(&self) -> usize {
            self.0.lock().unwrap().requests.len()
        }
        /// Waits until confgen was asked `n` times.
        async fn asked(&self, n: usize) {
            within(async {
                while self.requests() < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
        }
        fn gaps(&self) -> Vec<Duration> {
            let world = self.0.lock().unwrap();
            (world.requests.windows(2))
                .map(|pair| pair[1].1 - pair[0].1)
                .collect()
        }
    }

    /// `future`, failing the test if it takes a (paused) minute.
    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), future)
            .await
            .expect("still waiting after a minute")
    }

    /// A watch over `confgen` that reads what runs from `stats`, running: the snapshots it
    /// publishes, and the token that stops it.
    fn start(
        confgen: &FakeConfgen,
        stats: &watch::Receiver<Stats>,
    ) -> (
        watch::Receiver<Option<Rebuilt>>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = watch::channel(None);
        let machine = Watch {
            edge: confgen.clone(),
            node_id: "node-a".to_owned(),
            stats: stats.clone(),
            snapshots: tx,
            backoff: runtime::Backoff::default(),
            spare: None,
        };
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move { machine.run(&stop).await });
        (rx, shutdown, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_confgen_ends_is_subscribed_again_saying_what_runs() {
        let confgen = FakeConfgen::default();
        let (stats, stats_rx) = watch::channel(Stats::default());
        let (mut snapshots, shutdown, task) = start(&confgen, &stats_rx);
        confgen.asked(1).await;
        let one = whole(1, "defaults\n");
        confgen
            .0
            .lock()
            .unwrap()
            .stream
            .as_ref()
            .unwrap()
            .send(one.clone())
            .unwrap();
        within(snapshots.changed()).await.unwrap();
        let published = snapshots.borrow_and_update().clone().unwrap();
        assert_eq!(published.snapshot.checksum, one.checksum);
        stats.send_modify(|stats| stats.running_checksum.clone_from(&one.checksum));

        // Ended at once: subscribed again after a delay, for what runs.
        confgen.0.lock().unwrap().stream = None;
        confgen.asked(2).await;
        let first = confgen.gaps()[0];
        assert!(first >= Duration::from_millis(50), "{first:?}");
        let request = confgen.0.lock().unwrap().requests[1].0.clone();
        assert_eq!(request.have_checksum, one.checksum);
        assert!(request.grouped_deltas && request.omit_model);

        // Ended after it had served a while: the backoff starts again from its least.
        confgen.0.lock().unwrap().stream = None;
        confgen.asked(3).await;
        tokio::time::sleep(runtime::HEALTHY).await;
        confgen.0.lock().unwrap().stream = None;
        confgen.asked(4).await;
        let last = confgen.gaps()[2];
        assert!(
            last <= runtime::HEALTHY + Duration::from_millis(250),
            "{last:?}"
        );

        shutdown.cancel();
        within(task).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn confgen_away_is_asked_again_with_growing_delays_up_to_the_cap() {
        let confgen = FakeConfgen::default();
        confgen.0.lock().unwrap().refusals = 8;
        let (_snapshots, shutdown, task) = start(&confgen, &watch::channel(Stats::default()).1);
        confgen.asked(9).await;
        let gaps = confgen.gaps();
        assert!(gaps[0] <= Duration::from_millis(200), "{gaps:?}");
        assert!(gaps[7] >= Duration::from_secs(1), "{gaps:?}");
        assert!(
            gaps.iter().all(|gap| *gap <= runtime::MAX_BACKOFF),
            "{gaps:?}"
        );

        shutdown.cancel();
        within(task).await.unwrap();
    }
}
