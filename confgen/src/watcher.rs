//! The etcd side of confgen: a state machine that keeps a consistent view of the registry.
//!
//! ```text
//!   Connect ──► List ──► Watch(from = revision + 1) ──► (events; revision advances)
//!      ▲          ▲            │ stream lost / etcd down: back off, Watch again from revision+1
//!      │          └────────────┘ compacted past `from`: List again
//!      └── no client yet (etcd unreachable at start): back off
//! ```
//!
//! A listing is read in pages at one fixed revision and handed on only when complete
//! ([`Batch::Reset`]); a watch response is handed on whole ([`Batch::Events`]): etcd never splits
//! one revision's events across responses unless asked to fragment, which this watcher does
//! not. So a consumer that applies batches in order never sees a partial snapshot.
//!
//! etcd is reached through [`Edge`], implemented by [`Etcd`]; the tests below drive the
//! machine over a fake with paused time.

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use legate_proto::runtime::{Backoff, EtcdArgs, EtcdError, pause};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Keys read per page of a listing.
const PAGE: i64 = 1000;
/// The longest wait between two attempts to reach etcd: once etcd answers again, the watch is
/// back within this (one attempt every half second costs etcd nothing while it is away).
const RETRY_CAP: Duration = Duration::from_millis(500);
/// A watch that etcd had accepted and that lasted this long is resumed at once when it is
/// lost, with the backoff started anew: the loss is news, not a repeat of a failure. A watch
/// lost sooner than that backs off, so that a stream that etcd keeps closing cannot spin.
const RESUME_AT_ONCE_AFTER: Duration = Duration::from_secs(1);
/// Largest message accepted from etcd: a listing page or a watch response of one big txn.
const MAX_MESSAGE: usize = 64 << 20;

/// A consistent step of the registry.
#[derive(Debug)]
pub enum Batch {
    /// Everything in the range at `revision`: replaces all that was known.
    Reset {
        /// Keys and values.
        kvs: Vec<(Vec<u8>, Vec<u8>)>,
        /// The revision the listing was read at.
        revision: i64,
    },
    /// Events of one watch response, in order.
    Events(Vec<Event>),
}

/// One change of one key.
#[derive(Debug)]
pub enum Event {
    /// The key was written.
    Put {
        /// Key.
        key: Vec<u8>,
        /// New value.
        value: Vec<u8>,
        /// Revision of the write.
        revision: i64,
    },
    /// The key was deleted (or its lease expired).
    Delete {
        /// Key.
        key: Vec<u8>,
        /// Revision of the delete.
        revision: i64,
    },
}

/// One message of a watch stream, as the watcher reads it.
#[derive(Debug, Default)]
pub(crate) struct Message {
    /// etcd accepted the watch.
    created: bool,
    /// Above 0: the revision the watch asked for is compacted; etcd cancelled the watch.
    compacted: i64,
    /// etcd cancelled the watch, for this reason.
    canceled: Option<String>,
    /// The changes, in order (none in a progress notification).
    events: Vec<Event>,
}

/// The etcd edge, as the watcher uses it: a connection, a listing, a watch.
pub(crate) trait Edge {
    /// A connection to etcd.
    type Conn;
    /// An open watch.
    type Watch: WatchStream;
    /// Connects; an error that is `fatal` ends the watcher.
    async fn connect(&mut self) -> Result<Self::Conn, EtcdError>;
    /// The whole range, read at one revision, and that revision.
    async fn list(&mut self, conn: &mut Self::Conn) -> Result<Listing, EtcdError>;
    /// Opens a watch of the range from revision `from` on.
    async fn watch(&mut self, conn: &mut Self::Conn, from: i64) -> Result<Self::Watch, EtcdError>;
}

/// The messages of an open watch.
pub(crate) trait WatchStream {
    /// The next message; `None` when etcd closed the stream.
    async fn next(&mut self) -> Result<Option<Message>, EtcdError>;
}

/// Keys and values, and the revision they were read at.
pub(crate) type Listing = (Vec<(Vec<u8>, Vec<u8>)>, i64);

/// Where the watcher is; each state holds what it needs.
enum State<C> {
    /// No connection yet.
    Connect,
    /// Connected: the range is to be read.
    List(C),
    /// Listed (or watched) up to this revision: watch from the next.
    Watch(C, i64),
}

/// What a transition leads to.
enum Step<C> {
    /// This state, at once.
    Next(State<C>),
    /// This state after a backoff delay; the failure, for the log.
    Retry(State<C>, String),
    /// The end: the consumer is gone (`Ok`), or etcd refuses confgen.
    Stop(Result<(), EtcdError>),
}

/// Why a watch stopped.
#[derive(Debug)]
enum Stop {
    /// The revision to resume from is compacted: list again.
    Compacted(i64),
    /// The stream failed or ended: resume from the last revision. `established`: etcd had
    /// accepted the watch.
    Lost { error: String, established: bool },
    /// The consumer is gone.
    Done,
}

/// Follows the etcd range `[start, end)` and sends its batches to `batches` until `shutdown`;
/// stops with the error when etcd refuses confgen (TLS, credentials, permissions), which no
/// retry can fix.
pub async fn run(
    etcd: EtcdArgs,
    (start, end): (Vec<u8>, Vec<u8>),
    batches: mpsc::Sender<Batch>,
    shutdown: CancellationToken,
) -> Result<(), EtcdError> {
    let edge = Etcd {
        args: etcd,
        range: (start, end),
        shutdown: shutdown.clone(),
    };
    Watcher::new(edge, batches).run(&shutdown).await
}

/// The watcher over its etcd edge.
struct Watcher<E> {
    edge: E,
    batches: mpsc::Sender<Batch>,
    backoff: Backoff,
}

impl<E: Edge> Watcher<E> {
    fn new(edge: E, batches: mpsc::Sender<Batch>) -> Self {
        Self {
            edge,
            batches,
            backoff: Backoff::capped(RETRY_CAP),
        }
    }

    /// Runs the machine until `shutdown`, the consumer's end or a refusal.
    async fn run(mut self, shutdown: &CancellationToken) -> Result<(), EtcdError> {
        let mut state = State::Connect;
        loop {
            let step = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                step = self.step(state) => step,
            };
            state = match step {
                Step::Next(next) => next,
                Step::Stop(result) => return result,
                Step::Retry(next, failure) => {
                    let delay = self.backoff.delay();
                    warn!(retry_in = ?delay, "{failure}");
                    if !pause(delay, shutdown).await {
                        return Ok(());
                    }
                    next
                }
            };
        }
    }

    /// One transition.
    async fn step(&mut self, state: State<E::Conn>) -> Step<E::Conn> {
        match state {
            State::Connect => match self.edge.connect().await {
                Ok(conn) => Step::Next(State::List(conn)),
                Err(e) if e.fatal => Step::Stop(Err(e)),
                Err(e) => Step::Retry(State::Connect, format!("connecting to etcd: {e}")),
            },
            State::List(mut conn) => match self.edge.list(&mut conn).await {
                Ok((kvs, revision)) => {
                    info!(keys = kvs.len(), revision, "registry listed");
                    if self
                        .batches
                        .send(Batch::Reset { kvs, revision })
                        .await
                        .is_err()
                    {
                        return Step::Stop(Ok(()));
                    }
                    Step::Next(State::Watch(conn, revision))
                }
                Err(e) if e.fatal => Step::Stop(Err(e)),
                Err(e) => Step::Retry(State::List(conn), format!("listing the registry: {e}")),
            },
            State::Watch(mut conn, mut last) => {
                let started = Instant::now();
                match self.watch(&mut conn, &mut last).await {
                    Stop::Done => Step::Stop(Ok(())),
                    Stop::Compacted(compacted) => {
                        warn!(
                            from = last + 1,
                            compacted, "registry history compacted past the watch: listing again"
                        );
                        metrics::counter!("legate_confgen_watch_restarts_total", "reason" => "compacted")
                            .increment(1);
                        Step::Next(State::List(conn))
                    }
                    Stop::Lost { error, established } => {
                        metrics::counter!("legate_confgen_watch_restarts_total", "reason" => "lost")
                            .increment(1);
                        if established {
                            self.backoff.reset();
                            if started.elapsed() >= RESUME_AT_ONCE_AFTER {
                                warn!(from = last + 1, "watch lost, resuming at once: {error}");
                                return Step::Next(State::Watch(conn, last));
                            }
                        }
                        let failure =
                            format!("watch lost, resuming from revision {}: {error}", last + 1);
                        Step::Retry(State::Watch(conn, last), failure)
                    }
                }
            }
        }
    }

    /// Watches from `*last + 1`, sending each message's events and advancing `*last`.
    async fn watch(&mut self, conn: &mut E::Conn, last: &mut i64) -> Stop {
        let mut stream = match self.edge.watch(conn, *last + 1).await {
            Ok(stream) => stream,
            Err(e) => {
                return Stop::Lost {
                    error: e.to_string(),
                    established: false,
                };
            }
        };
        let mut established = false;
        loop {
            let error = match stream.next().await {
                // A watch that starts below the compacted revision is canceled with it.
                Ok(Some(message)) if message.compacted > 0 => {
                    return Stop::Compacted(message.compacted);
                }
                Ok(Some(Message {
                    canceled: Some(reason),
                    ..
                })) => format!("watch canceled: {reason}"),
                Ok(Some(message)) => {
                    if message.created {
                        established = true;
                        debug!(from = *last + 1, "watching the registry");
                    }
                    let Some(newest) = message.events.iter().map(Event::revision).max() else {
                        continue; // created or progress notification
                    };
                    if self
                        .batches
                        .send(Batch::Events(message.events))
                        .await
                        .is_err()
                    {
                        return Stop::Done;
                    }
                    *last = newest;
                    continue;
                }
                Ok(None) => "etcd closed the watch stream".to_owned(),
                Err(e) => e.to_string(),
            };
            return Stop::Lost { error, established };
        }
    }
}

/// The edge to a real etcd.
struct Etcd {
    args: EtcdArgs,
    range: (Vec<u8>, Vec<u8>),
    /// Ends the task that follows the members of a cluster.
    shutdown: CancellationToken,
}

impl Edge for Etcd {
    type Conn = Client;
    type Watch = etcd_client::WatchStream;

    async fn connect(&mut self) -> Result<Client, EtcdError> {
        self.args.connect(&self.shutdown).await
    }

    /// Reads the range in pages, all at the revision of the first.
    async fn list(&mut self, client: &mut Client) -> Result<Listing, EtcdError> {
        let (start, end) = &self.range;
        let mut kvs = Vec::new();
        let mut from = start.clone();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut response = (client.kv_client().get(from.clone(), Some(options)).await)
                .map_err(|e| EtcdError::of(&e))?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            let more = response.more();
            let page = response.take_kvs();
            if let Some(last) = page.last() {
                // The next page starts right after the last key: the key with a 0 byte appended.
                from = last.key().to_vec();
                from.push(0);
            }
            kvs.extend(page.into_iter().map(|kv| kv.into_key_value()));
            if !more {
                return Ok((kvs, revision));
            }
        }
    }

    async fn watch(
        &mut self,
        client: &mut Client,
        from: i64,
    ) -> Result<etcd_client::WatchStream, EtcdError> {
        let (start, end) = &self.range;
        let options = WatchOptions::new()
            .with_range(end.clone())
            .with_start_revision(from)
            .with_progress_notify();
        (client.watch_client())
            .max_decoding_message_size(MAX_MESSAGE)
            .watch(start.clone(), Some(options))
            .await
            .map_err(|e| EtcdError::of(&e))
    }
}

impl WatchStream for etcd_client::WatchStream {
    async fn next(&mut self) -> Result<Option<Message>, EtcdError> {
        let Some(response) = self.message().await.map_err(|e| EtcdError::of(&e))? else {
            return Ok(None);
        };
        let events = (response.events().iter())
            .filter_map(|event| {
                let kv = event.kv()?;
                let key = kv.key().to_vec();
                let revision = kv.mod_revision();
                Some(match event.event_type() {
                    EventType::Put => Event::Put {
                        key,
                        value: kv.value().to_vec(),
                        revision,
                    },
                    EventType::Delete => Event::Delete { key, revision },
                })
            })
            .collect();
        Ok(Some(Message {
            created: response.created(),
            compacted: response.compact_revision(),
            canceled: (response.canceled()).then(|| response.cancel_reason().to_owned()),
            events,
        }))
    }
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put { revision, .. } | Event::Delete { revision, .. } => *revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What the fake etcd answers and what it was asked.
    #[derive(Default)]
    struct World {
        /// Answers of the next connects; once empty, connects succeed.
        connects: VecDeque<EtcdError>,
        /// The range as etcd holds it, and its revision.
        kvs: Vec<(Vec<u8>, Vec<u8>)>,
        revision: i64,
        /// Answers of the next listings; once empty, the range as it is.
        listings: VecDeque<EtcdError>,
        listed: usize,
        /// Where each watch started, with the (paused) time it was opened.
        watches: Vec<(i64, Instant)>,
        /// What the open watch sends; dropped, etcd closes it.
        stream: Option<mpsc::UnboundedSender<Result<Message, EtcdError>>>,
    }

    #[derive(Clone, Default)]
    struct FakeEtcd(Arc<Mutex<World>>);

    struct FakeWatch(mpsc::UnboundedReceiver<Result<Message, EtcdError>>);

    impl Edge for FakeEtcd {
        type Conn = ();
        type Watch = FakeWatch;

        async fn connect(&mut self) -> Result<(), EtcdError> {
            self.0
                .lock()
                .unwrap()
                .connects
                .pop_front()
                .map_or(Ok(()), Err)
        }
        async fn list(&mut self, (): &mut ()) -> Result<Listing, EtcdError> {
            let mut world = self.0.lock().unwrap();
            world.listed += 1;
            match world.listings.pop_front() {
                Some(e) => Err(e),
                None => Ok((world.kvs.clone(), world.revision)),
            }
        }
        async fn watch(&mut self, (): &mut (), from: i64) -> Result<FakeWatch, EtcdError> {
            let mut world = self.0.lock().unwrap();
            world.watches.push((from, Instant::now()));
            let (tx, rx) = mpsc::unbounded_channel();
            world.stream = Some(tx);
            Ok(FakeWatch(rx))
        }
    }

    impl WatchStream for FakeWatch {
        async fn next(&mut self) -> Result<Option<Message>, EtcdError> {
            self.0.recv().await.transpose()
        }
    }

    impl FakeEtcd {
        /// Sends `message` on the open watch.
        fn send(&self, message: Message) {
            self.deliver(Ok(message));
        }
        /// The open watch fails with `error`.
        fn fail(&self, error: EtcdError) {
            self.deliver(Err(error));
        }
        fn deliver(&self, item: Result<Message, EtcdError>) {
            let world = self.0.lock().unwrap();
            let stream = world.stream.as_ref().expect("a watch is open");
            stream.send(item).unwrap();
        }
        /// etcd closes the open watch.
        fn close(&self) {
            self.0.lock().unwrap().stream = None;
        }
        fn watched_from(&self) -> Vec<i64> {
            let world = self.0.lock().unwrap();
            world.watches.iter().map(|(from, _)| *from).collect()
        }
        /// The time between one watch and the next.
        fn gaps(&self) -> Vec<Duration> {
            let world = self.0.lock().unwrap();
            (world.watches.windows(2))
                .map(|pair| pair[1].1 - pair[0].1)
                .collect()
        }
    }

    fn transient(message: &str) -> EtcdError {
        EtcdError {
            fatal: false,
            message: message.to_owned(),
        }
    }

    fn created() -> Message {
        Message {
            created: true,
            ..Message::default()
        }
    }

    fn put(key: &str, revision: i64) -> Message {
        Message {
            events: vec![Event::Put {
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                revision,
            }],
            ..Message::default()
        }
    }

    /// A watcher over `etcd`, running: its batches, the token that stops it, and its outcome.
    fn start(
        etcd: &FakeEtcd,
    ) -> (
        mpsc::Receiver<Batch>,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), EtcdError>>,
    ) {
        let (tx, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let watcher = Watcher::new(etcd.clone(), tx);
        let stop = shutdown.clone();
        let task = tokio::spawn(async move { watcher.run(&stop).await });
        (rx, shutdown, task)
    }

    /// `future`, failing the test if it takes a (paused) minute.
    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), future)
            .await
            .expect("still waiting after a minute")
    }

    /// Waits until the watcher opened `n` watches.
    async fn watches(etcd: &FakeEtcd, n: usize) {
        within(async {
            while etcd.0.lock().unwrap().watches.len() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    }

    async fn events(batches: &mut mpsc::Receiver<Batch>) -> Vec<i64> {
        match within(batches.recv()).await {
            Some(Batch::Events(events)) => events.iter().map(Event::revision).collect(),
            other => panic!("expected events, got {other:?}"),
        }
    }

    async fn reset(batches: &mut mpsc::Receiver<Batch>) -> (usize, i64) {
        match within(batches.recv()).await {
            Some(Batch::Reset { kvs, revision }) => (kvs.len(), revision),
            other => panic!("expected a listing, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lists_then_watches_from_the_next_revision_and_forwards_each_response_whole() {
        let etcd = FakeEtcd::default();
        {
            let mut world = etcd.0.lock().unwrap();
            world.kvs = vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec()),
            ];
            world.revision = 10;
        }
        let (mut batches, shutdown, task) = start(&etcd);
        assert_eq!(reset(&mut batches).await, (2, 10));
        watches(&etcd, 1).await;
        assert_eq!(etcd.watched_from(), [11]);

        etcd.send(created());
        etcd.send(Message::default()); // a progress notification: nothing to forward
        let mut both = put("a", 11);
        both.events.extend(put("b", 12).events);
        etcd.send(both);
        assert_eq!(events(&mut batches).await, [11, 12]);

        shutdown.cancel();
        assert!(within(task).await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_closed_by_the_server_resumes_after_the_last_revision_seen_without_a_listing() {
        let etcd = FakeEtcd::default();
        etcd.0.lock().unwrap().revision = 10;
        let (mut batches, shutdown, task) = start(&etcd);
        reset(&mut batches).await;
        watches(&etcd, 1).await;
        etcd.send(created());
        etcd.send(put("a", 14));
        assert_eq!(events(&mut batches).await, [14]);

        // The watch had held for a while: it is resumed at once.
        tokio::time::sleep(Duration::from_secs(5)).await;
        etcd.close();
        watches(&etcd, 2).await;
        assert_eq!(etcd.watched_from(), [11, 15]);
        assert_eq!(etcd.gaps(), [Duration::from_secs(5)]);
        assert_eq!(etcd.0.lock().unwrap().listed, 1, "no listing again");

        // A stream error is the same.
        etcd.send(created());
        tokio::time::sleep(Duration::from_secs(5)).await;
        etcd.fail(transient("connection reset"));
        watches(&etcd, 3).await;
        assert_eq!(etcd.watched_from(), [11, 15, 15]);

        shutdown.cancel();
        assert!(within(task).await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_etcd_keeps_closing_at_once_backs_off_instead_of_spinning() {
        let etcd = FakeEtcd::default();
        let (mut batches, shutdown, task) = start(&etcd);
        reset(&mut batches).await;
        for n in 1..=6 {
            watches(&etcd, n).await;
            etcd.close();
        }
        watches(&etcd, 7).await;
        let gaps = etcd.gaps();
        assert!(
            gaps.iter().all(|gap| *gap >= Duration::from_millis(50)),
            "{gaps:?}"
        );
        // (The test looks at the watches every millisecond.)
        let cap = RETRY_CAP + Duration::from_millis(2);
        assert!(gaps.iter().all(|gap| *gap <= cap), "{gaps:?}");

        shutdown.cancel();
        assert!(within(task).await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_compacted_watch_lists_the_registry_again() {
        let etcd = FakeEtcd::default();
        etcd.0.lock().unwrap().revision = 10;
        let (mut batches, shutdown, task) = start(&etcd);
        assert_eq!(reset(&mut batches).await, (0, 10));
        watches(&etcd, 1).await;

        etcd.0.lock().unwrap().revision = 40;
        etcd.send(Message {
            compacted: 30,
            canceled: Some("compacted".to_owned()),
            ..Message::default()
        });
        assert_eq!(reset(&mut batches).await, (0, 40));
        watches(&etcd, 2).await;
        assert_eq!(etcd.watched_from(), [11, 41]);
        assert_eq!(etcd.0.lock().unwrap().listed, 2);

        shutdown.cancel();
        assert!(within(task).await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn etcd_away_at_start_or_during_a_listing_is_retried() {
        let etcd = FakeEtcd::default();
        {
            let mut world = etcd.0.lock().unwrap();
            world
                .connects
                .extend([transient("refused"), transient("refused")]);
            world.listings.push_back(transient("no leader"));
            world.revision = 3;
        }
        let (mut batches, shutdown, task) = start(&etcd);
        assert_eq!(reset(&mut batches).await, (0, 3));
        assert_eq!(etcd.0.lock().unwrap().listed, 2);

        shutdown.cancel();
        assert!(within(task).await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_ends_the_watcher_with_its_error() {
        let etcd = FakeEtcd::default();
        etcd.0.lock().unwrap().connects.push_back(EtcdError {
            fatal: true,
            message: "permission denied".to_owned(),
        });
        let (_batches, _shutdown, task) = start(&etcd);
        let error = within(task).await.unwrap().unwrap_err();
        assert_eq!(error.message, "permission denied");
    }

    #[tokio::test(start_paused = true)]
    async fn the_consumer_gone_ends_the_watcher() {
        let etcd = FakeEtcd::default();
        let (mut batches, _shutdown, task) = start(&etcd);
        reset(&mut batches).await;
        watches(&etcd, 1).await;
        drop(batches);
        etcd.send(put("a", 2));
        assert!(within(task).await.unwrap().is_ok());
    }
}
