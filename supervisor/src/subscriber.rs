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

use std::sync::{Arc, Mutex};

use legate_proto::runtime;
use legate_proto::snapshot::{self, Digest};
use legate_proto::v1::confgen_client::ConfgenClient;
use legate_proto::v1::{ApplyReport, ApplyResult, ConfigSnapshot, WatchRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::MAX_MESSAGE;
use crate::apply::Stats;

/// A connection to confgen on behalf of one node.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub channel: Channel,
    pub node_id: String,
    pub stats: Arc<Mutex<Stats>>,
}

impl Subscriber {
    fn client(&self) -> ConfgenClient<Channel> {
        ConfgenClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Follows `Confgen.Watch` until `shutdown`, publishing every snapshot.
    pub async fn watch(
        self,
        snapshots: watch::Sender<Option<Arc<ConfigSnapshot>>>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = runtime::Backoff::default();
        loop {
            let began = std::time::Instant::now();
            let have_checksum = self
                .stats
                .lock()
                .map(|s| s.running_checksum.clone())
                .unwrap_or_default();
            let request = WatchRequest {
                node_id: self.node_id.clone(),
                have_checksum,
                omit_model: true,
                deltas: true,
            };
            let mut client = self.client();
            let error = tokio::select! {
                () = shutdown.cancelled() => return,
                result = client.watch(request) => match result {
                    Err(status) => status.to_string(),
                    Ok(response) => {
                        info!("subscribed to confgen");
                        let mut stream = response.into_inner();
                        // The previous snapshot of this stream, which the next one may be a
                        // delta of.
                        let mut base: Option<(Arc<ConfigSnapshot>, Digest)> = None;
                        loop {
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                message = stream.message() => match message {
                                    Ok(Some(message)) => {
                                        let base_ref = base.as_ref().map(|(s, d)| (&**s, d));
                                        match snapshot::rebuild(base_ref, message) {
                                            Ok((snapshot, digest)) => {
                                                let snapshot = Arc::new(snapshot);
                                                snapshots.send_replace(Some(snapshot.clone()));
                                                base = Some((snapshot, digest));
                                            }
                                            Err(e) => {
                                                metrics::counter!(
                                                    "legate_supervisor_snapshots_refused_total"
                                                )
                                                .increment(1);
                                                break format!(
                                                    "a snapshot from confgen does not rebuild, \
                                                     subscribing again for a whole one: {e}"
                                                );
                                            }
                                        }
                                    }
                                    Ok(None) => break "confgen ended the stream".to_owned(),
                                    Err(status) => break status.to_string(),
                                },
                            }
                        }
                    }
                },
            };
            let delay = backoff.after(began);
            warn!(error = %error, retry_in = ?delay, "confgen watch");
            if !runtime::pause(delay, &shutdown).await {
                return;
            }
        }
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
