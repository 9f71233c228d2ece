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

use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use legate_proto::runtime::{Backoff, EtcdArgs, EtcdError, pause};
use tokio::sync::mpsc;
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

/// Why a watch stopped.
#[derive(Debug)]
enum Stop {
    /// The revision to resume from is compacted: list again.
    Compacted(i64),
    /// The stream failed or ended: resume from the last revision. `established`: etcd had
    /// accepted the watch.
    Lost { error: String, established: bool },
    /// The consumer is gone or shutdown.
    Done,
}

enum State {
    Connect,
    List(Client),
    Watch(Client, i64),
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
    let mut backoff = Backoff::capped(RETRY_CAP);
    let mut state = State::Connect;
    loop {
        let failure = match state {
            State::Connect => match etcd.connect(&shutdown).await {
                Ok(client) => {
                    state = State::List(client);
                    continue;
                }
                Err(e) if e.fatal => return Err(e),
                Err(e) => {
                    state = State::Connect;
                    format!("connecting to etcd: {e}")
                }
            },
            State::List(mut client) => match list(&mut client, &start, &end).await {
                Ok((kvs, revision)) => {
                    info!(keys = kvs.len(), revision, "registry listed");
                    if batches.send(Batch::Reset { kvs, revision }).await.is_err() {
                        return Ok(());
                    }
                    state = State::Watch(client, revision);
                    continue;
                }
                Err(e) => {
                    let e = EtcdError::of(&e);
                    if e.fatal {
                        return Err(e);
                    }
                    state = State::List(client);
                    format!("listing the registry: {e}")
                }
            },
            State::Watch(mut client, revision) => {
                let mut last = revision;
                let started = Instant::now();
                let stop = tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    stop = watch(&mut client, &start, &end, &mut last, &batches) => stop,
                };
                match stop {
                    Stop::Done => return Ok(()),
                    Stop::Compacted(compacted) => {
                        warn!(
                            from = last + 1,
                            compacted, "registry history compacted past the watch: listing again"
                        );
                        metrics::counter!("legate_confgen_watch_restarts_total", "reason" => "compacted")
                            .increment(1);
                        state = State::List(client);
                        continue;
                    }
                    Stop::Lost { error, established } => {
                        metrics::counter!("legate_confgen_watch_restarts_total", "reason" => "lost")
                            .increment(1);
                        state = State::Watch(client, last);
                        if established {
                            backoff.reset();
                            if started.elapsed() >= RESUME_AT_ONCE_AFTER {
                                warn!(from = last + 1, "watch lost, resuming at once: {error}");
                                continue;
                            }
                        }
                        format!("watch lost, resuming from revision {}: {error}", last + 1)
                    }
                }
            }
        };
        let delay = backoff.delay();
        warn!(retry_in = ?delay, "{failure}");
        if !pause(delay, &shutdown).await {
            return Ok(());
        }
    }
}

/// Reads the whole range at one revision, in pages.
async fn list(
    client: &mut Client,
    start: &[u8],
    end: &[u8],
) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, i64), etcd_client::Error> {
    let mut kvs = Vec::new();
    let mut from = start.to_vec();
    let mut revision = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.to_vec()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut response = client.kv_client().get(from.clone(), Some(options)).await?;
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

/// Watches from `*last + 1`, sending each response's events and advancing `*last`.
async fn watch(
    client: &mut Client,
    start: &[u8],
    end: &[u8],
    last: &mut i64,
    batches: &mpsc::Sender<Batch>,
) -> Stop {
    let options = WatchOptions::new()
        .with_range(end.to_vec())
        .with_start_revision(*last + 1)
        .with_progress_notify();
    let mut stream = match client
        .watch_client()
        .max_decoding_message_size(MAX_MESSAGE)
        .watch(start.to_vec(), Some(options))
        .await
    {
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
        let error = match stream.message().await {
            // A watch that starts below the compacted revision is canceled with it.
            Ok(Some(response)) if response.compact_revision() > 0 => {
                return Stop::Compacted(response.compact_revision());
            }
            Ok(Some(response)) if response.canceled() => {
                format!("watch canceled: {}", response.cancel_reason())
            }
            Ok(Some(response)) => {
                if response.created() {
                    established = true;
                    debug!(from = *last + 1, "watching the registry");
                }
                if !forward(response, last, batches).await {
                    return Stop::Done;
                }
                continue;
            }
            Ok(None) => "etcd closed the watch stream".to_owned(),
            Err(e) => e.to_string(),
        };
        return Stop::Lost { error, established };
    }
}

/// Sends the events of one watch response and advances `*last`; false when the consumer is
/// gone.
async fn forward(
    response: etcd_client::WatchResponse,
    last: &mut i64,
    batches: &mpsc::Sender<Batch>,
) -> bool {
    let events: Vec<Event> = response
        .events()
        .iter()
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
    let Some(newest) = events.iter().map(Event::revision).max() else {
        return true; // created or progress notification
    };
    if batches.send(Batch::Events(events)).await.is_err() {
        return false;
    }
    *last = newest;
    true
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put { revision, .. } | Event::Delete { revision, .. } => *revision,
        }
    }
}
