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
use crate::apply::{Base, Rebuilt, Stats};

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
        snapshots: watch::Sender<Option<Rebuilt>>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = runtime::Backoff::default();
        loop {
            let began = tokio::time::Instant::now();
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
                                        let delta = message.delta.as_ref().map(|delta| Base {
                                            checksum: delta.base_checksum.clone(),
                                            span: snapshot::Span {
                                                prefix: delta.config.as_ref().map_or(0, |c| {
                                                    usize::try_from(c.keep_prefix).unwrap_or(0)
                                                }),
                                                suffix: delta.config.as_ref().map_or(0, |c| {
                                                    usize::try_from(c.keep_suffix).unwrap_or(0)
                                                }),
                                            },
                                        });
                                        match snapshot::rebuild(base_ref, message) {
                                            Ok((snapshot, digest)) => {
                                                let snapshot = Arc::new(snapshot);
                                                snapshots.send_replace(Some(Rebuilt {
                                                    snapshot: snapshot.clone(),
                                                    base: delta,
                                                }));
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
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
            assert!(request.get_ref().deltas, "the supervisor asks for deltas");
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
            stats: Arc::default(),
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
}
