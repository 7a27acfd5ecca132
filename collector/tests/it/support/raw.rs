//! One raw ingest stream, as an agent's, for tests that send hand-made
//! messages: a Hello first, then batches, reading the collector's answers.

use capwatch_proto::v1 as pb;
use capwatch_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub struct Stream {
    pub tx: mpsc::Sender<pb::AgentMessage>,
    pub rx: tonic::Streaming<pb::CollectorMessage>,
}

impl Stream {
    /// Opens a stream to `endpoint` whose first message is `first`; the
    /// collector's refusal of it, if it refuses.
    pub async fn open(endpoint: &str, first: pb::AgentMessage) -> Result<Self, tonic::Status> {
        let mut client = IngestClient::connect(endpoint.to_string()).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let rx = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { tx, rx })
    }

    /// The next message's body; panics where the stream ended.
    pub async fn next(&mut self) -> Result<pb::collector_message::Body, tonic::Status> {
        Ok(self
            .next_or_end()
            .await?
            .expect("collector closed the stream"))
    }

    /// The next message's body; `None` where the stream ended.
    pub async fn next_or_end(
        &mut self,
    ) -> Result<Option<pb::collector_message::Body>, tonic::Status> {
        Ok(self
            .rx
            .message()
            .await?
            .map(|m| m.body.expect("message body")))
    }

    pub async fn welcome(&mut self) -> u64 {
        match self.next().await.unwrap() {
            pb::collector_message::Body::Welcome(w) => w.acked_seq,
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// Sends `msg` and waits for its ack (after the commit).
    pub async fn send(&mut self, msg: pb::AgentMessage) -> u64 {
        self.tx.send(msg).await.unwrap();
        match self.next().await.unwrap() {
            pb::collector_message::Body::Ack(a) => a.acked_seq,
            other => panic!("expected an ack, got {other:?}"),
        }
    }
}
