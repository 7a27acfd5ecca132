//! The gRPC ingest service: one long-lived stream per agent.
//!
//! *Boundary:* every message on these streams is untrusted; errors map to a
//! `tonic::Status` here and nowhere else.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use capwatch_proto::v1 as pb;
use capwatch_proto::v1::ingest_server::Ingest;

use crate::model;
use crate::state::{HelloError, State, StreamHandle, Superseded};

pub struct IngestService {
    pub state: Arc<State>,
    pub shutdown: watch::Receiver<bool>,
    pub hello_timeout: Duration,
    /// The number of the last ledger commit that succeeded.
    pub committed: watch::Receiver<u64>,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::CollectorMessage, Status>> + Send>>;

impl From<HelloError> for Status {
    fn from(e: HelloError) -> Self {
        match e {
            HelloError::StaleEpoch { .. } => Status::failed_precondition(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

impl From<Superseded> for Status {
    fn from(e: Superseded) -> Self {
        Status::aborted(e.to_string())
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = Outbound;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.hello_timeout, inbound.message()).await;
        let hello = match first {
            Ok(Ok(Some(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                return Err(self.refuse(Status::invalid_argument(
                    "the first message must be a Hello",
                )));
            }
            Ok(Err(status)) => return Err(self.refuse(status)),
            Err(_) => {
                return Err(self.refuse(Status::deadline_exceeded(
                    "no Hello within the hello timeout",
                )));
            }
        };
        let node_id = hello.node_id.clone();
        let (handle, acked_seq) = self.state.hello(model::hello(hello)).map_err(|e| {
            warn!(node = %node_id, ?peer, error = %e, "stream refused");
            self.refuse(e.into())
        })?;
        info!(node = %handle.node_id, ?peer, epoch = handle.epoch, acked_seq, "agent connected");

        let (tx, rx) = mpsc::channel::<Result<pb::CollectorMessage, Status>>(16);
        let welcome = pb::CollectorMessage {
            body: Some(pb::collector_message::Body::Welcome(pb::Welcome {
                collector_version: crate::VERSION.to_string(),
                acked_seq,
            })),
        };
        // `acked_seq` may include samples applied but not yet committed:
        // the Welcome waits for the commit that holds them (at once when
        // there are none), or gives up with the collector.
        let welcome_after = handle.welcome_after;
        let state = self.state.clone();
        let shutdown = self.shutdown.clone();
        let mut committed = self.committed.clone();
        tokio::spawn(async move {
            let node = handle.node_id.clone();
            let mut stopping = shutdown.clone();
            let durable = tokio::select! {
                c = committed.wait_for(|c| *c >= welcome_after) => c.is_ok(),
                _ = stopping.wait_for(|s| *s) => false,
            };
            if !durable || tx.send(Ok(welcome)).await.is_err() {
                state.disconnect(&handle);
                return;
            }
            let end = serve_stream(&state, &handle, inbound, &tx, shutdown, committed).await;
            state.disconnect(&handle);
            match end {
                Ok(()) => info!(node = %node, "agent disconnected"),
                Err(status) => {
                    info!(node = %node, code = ?status.code(), message = status.message(), "stream ended");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as Outbound))
    }
}

impl IngestService {
    fn refuse(&self, status: Status) -> Status {
        self.state
            .counters
            .streams_refused
            .fetch_add(1, Ordering::Relaxed);
        status
    }
}

/// Reads batches until the agent leaves, the stream fails or the collector
/// shuts down; acks each batch once the ledger commit holding it is
/// durable.
async fn serve_stream(
    state: &State,
    handle: &StreamHandle,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: &mpsc::Sender<Result<pb::CollectorMessage, Status>>,
    shutdown: watch::Receiver<bool>,
    mut committed: watch::Receiver<u64>,
) -> Result<(), Status> {
    // (commit id, ack) of batches applied but not yet durable, in order.
    let mut waiting: std::collections::VecDeque<(u64, u64)> = std::collections::VecDeque::new();
    let stop = capwatch_common::wait_for_shutdown(shutdown);
    tokio::pin!(stop);
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m?,
            changed = committed.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("collector shutting down"));
                }
                let done = *committed.borrow_and_update();
                let mut ack = None;
                while waiting.front().is_some_and(|(id, _)| *id <= done) {
                    ack = waiting.pop_front().map(|(_, seq)| seq);
                }
                if let Some(acked_seq) = ack {
                    let ack = pb::CollectorMessage {
                        body: Some(pb::collector_message::Body::Ack(pb::Ack {
                            stream_epoch: handle.epoch,
                            acked_seq,
                        })),
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return Ok(());
                    }
                }
                continue;
            }
            _ = &mut stop => {
                return Err(Status::unavailable("collector shutting down"));
            }
        };
        let batch = match msg {
            None => return Ok(()),
            Some(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Batch(b)),
            }) => b,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "expected a SampleBatch after the Hello",
                ));
            }
        };
        let mut samples = Vec::with_capacity(batch.samples.len());
        let mut rejected = Vec::new();
        for s in batch.samples {
            match model::sample(s) {
                Ok(s) => samples.push(s),
                Err(r) => rejected.push(r),
            }
        }
        let out = state.ingest(handle, samples, rejected)?;
        debug!(node = %handle.node_id, accepted = out.accepted, duplicate = out.duplicate, acked_seq = out.acked_seq, commit = out.commit_id, "batch");
        waiting.push_back((out.commit_id, out.acked_seq));
    }
}
