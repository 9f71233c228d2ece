//! A `Confgen.Watch` subscriber as the supervisor subscribes: deltas asked for, each message
//! rebuilt into its whole snapshot and checked with the product's own
//! `legate_proto::snapshot::rebuild`.

use anyhow::{Context, Result};
use legate_proto::snapshot::{Digest, rebuild};
use legate_proto::v1;
use legate_proto::v1::confgen_client::ConfgenClient;
use tonic::Streaming;
use tonic::transport::Channel;

/// One open Watch stream of whole snapshots.
#[derive(Debug)]
pub struct Snapshots {
    stream: Streaming<v1::ConfigSnapshot>,
    base: Option<(v1::ConfigSnapshot, Digest)>,
    /// How many messages came as deltas.
    pub deltas: usize,
}

impl Snapshots {
    /// Subscribes as `node`, with the model unless `omit_model`.
    pub async fn subscribe(channel: Channel, node: &str, omit_model: bool) -> Result<Self> {
        let stream = ConfgenClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .watch(v1::WatchRequest {
                node_id: node.to_owned(),
                have_checksum: String::new(),
                omit_model,
                deltas: false,
                grouped_deltas: true,
            })
            .await?
            .into_inner();
        Ok(Self {
            stream,
            base: None,
            deltas: 0,
        })
    }

    /// The next snapshot, whole; `None` when the stream ended. A message that does not rebuild
    /// is an error.
    pub async fn message(&mut self) -> Result<Option<v1::ConfigSnapshot>> {
        let Some(message) = self.stream.message().await? else {
            return Ok(None);
        };
        self.deltas += usize::from(message.delta.is_some());
        let base = self.base.as_ref().map(|(s, d)| (s, d));
        let (snapshot, digest) = rebuild(base, message).context("rebuilding a snapshot")?;
        self.base = Some((snapshot.clone(), digest));
        Ok(Some(snapshot))
    }

    /// The last snapshot received.
    pub fn last(&self) -> Option<&v1::ConfigSnapshot> {
        self.base.as_ref().map(|(s, _)| s)
    }
}
