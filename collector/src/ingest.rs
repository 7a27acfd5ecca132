//! The gRPC ingest service: one long-lived stream per agent.
//!
//! *Boundary:* every message on these streams is untrusted; errors map to a
//! `tonic::Status` here and nowhere else.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{SinkExt, Stream};
use tokio::sync::watch;
use tonic::transport::CertificateDer;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use capwatch_proto::v1 as pb;
use capwatch_proto::v1::ingest_server::Ingest;

use crate::auth;
use crate::edge::{self, HelloError, Reject};
use crate::events::{AuthReason, AuthRefused, StreamRefusal, StreamRefused, Surface};
use crate::persist::claims::NodeClaims;
use crate::state::{State, StreamHandle, Superseded};
use crate::sync::lock;

pub struct IngestService {
    pub state: Arc<State>,
    /// Claims a node in the ledger at its Hello, for this collector.
    pub claims: Arc<dyn NodeClaims>,
    pub shutdown: watch::Receiver<bool>,
    pub hello_timeout: Duration,
    /// The number of the last ledger commit that succeeded.
    pub committed: watch::Receiver<u64>,
    /// Streams must come with a client certificate naming their node.
    pub client_certs: bool,
    pub limits: Limits,
    /// Streams open now.
    pub open: Arc<AtomicUsize>,
    /// Nodes already logged as refused for who they are (logged once).
    pub refused_logged: Arc<Mutex<HashSet<String>>>,
}

/// What one stream, and all of them, may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_streams: usize,
    pub max_node_sample_rate: u32,
}

/// Longest a stream another one took over waits to ack what it applied:
/// twice the longest commit interval.
const LAST_ACK_WAIT: Duration = Duration::from_secs(10);

/// Most distinct refused nodes remembered for logging once.
const REFUSED_LOGGED_MAX: usize = 10_000;

/// Counts a stream as open until dropped.
struct OpenStream(Arc<AtomicUsize>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::CollectorMessage, Status>> + Send>>;

/// Metadata of a stale-epoch refusal: the node's current epoch, in
/// decimal, for the agent to say Hello again above it.
pub const CURRENT_EPOCH_KEY: &str = "capwatch-current-epoch";

/// Metadata of the status that ends a stream another one took over: the
/// highest sequence of the stream's epoch the collector accepted, in
/// decimal. Nothing above it was or will be accepted from that stream.
pub const ACCEPTED_SEQ_KEY: &str = "capwatch-accepted-seq";

impl From<HelloError> for Status {
    fn from(e: HelloError) -> Self {
        match e {
            HelloError::StaleEpoch { current, .. } => {
                let mut status = Status::failed_precondition(e.to_string());
                status.metadata_mut().insert(
                    CURRENT_EPOCH_KEY,
                    tonic::metadata::MetadataValue::from(current),
                );
                status
            }
            HelloError::GpuHeldElsewhere { .. } => Status::failed_precondition(e.to_string()),
            HelloError::GpuLeasedElsewhere { .. } => Status::permission_denied(e.to_string()),
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
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let open_guard = OpenStream(self.open.clone());
        if open > self.limits.max_streams {
            return Err(self.refuse(
                StreamRefusal::Capacity,
                Status::resource_exhausted(format!(
                    "the collector has its maximum of {} streams open",
                    self.limits.max_streams
                )),
            ));
        }
        // Commits have failed for `shed_streams_after`: this collector
        // cannot ack, so the agent had better go to one that can.
        if let Some(failing) = self.state.readiness.shedding() {
            return Err(self.refuse(StreamRefusal::Shedding, shed_status(failing)));
        }
        let token = auth::bearer(
            request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
        )
        .map(str::to_owned);
        // A stream without a valid token is refused before it may hold a
        // slot waiting for its Hello.
        let auth = self.state.auth();
        if auth.agents_required()
            && let Err(e) = auth.agent(token.as_deref())
        {
            AuthRefused {
                surface: Surface::Grpc,
                reason: AuthReason::Unauthenticated,
                node: None,
            }
            .emit(&self.state.counters);
            debug!(?peer, error = %e, "agent stream refused: no valid token");
            return Err(self.refuse(
                StreamRefusal::Auth,
                Status::unauthenticated(format!("agent token: {e}")),
            ));
        }
        let peer_certs = request.peer_certs();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.hello_timeout, inbound.message()).await;
        let hello = match first {
            Ok(Ok(Some(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                return Err(self.refuse(
                    StreamRefusal::NoHello,
                    Status::invalid_argument("the first message must be a Hello"),
                ));
            }
            Ok(Err(status)) => return Err(self.refuse(StreamRefusal::Transport, status)),
            Err(_) => {
                return Err(self.refuse(
                    StreamRefusal::NoHello,
                    Status::deadline_exceeded("no Hello within the hello timeout"),
                ));
            }
        };
        let node_id = hello.node_id.clone();
        // Checked before anything stores or logs it.
        if !edge::node_id_ok(&node_id) {
            return Err(self.refuse(
                StreamRefusal::Hello,
                Status::invalid_argument("node id must be 1-253 bytes without control characters"),
            ));
        }
        self.authorize(
            &node_id,
            token.as_deref(),
            peer_certs.as_deref().map(Vec::as_slice),
        )?;
        let max_gpus = self.state.config().max_gpus_per_node;
        let hello = edge::hello(hello)
            .and_then(|h| edge::check_hello(h, max_gpus))
            .map_err(|e| {
                warn!(node = %node_id, ?peer, error = %e, "stream refused");
                self.refuse(StreamRefusal::Hello, e.into())
            })?;
        // The cheap local checks first: a Hello the fleet would refuse
        // anyway costs no claim.
        self.state.precheck_hello(&hello).map_err(|e| {
            warn!(node = %node_id, ?peer, error = %e, "stream refused");
            self.refuse(StreamRefusal::Hello, e.into())
        })?;
        // Before the stream is admitted and its Welcome computed: with a
        // claim of a new generation, the node resumes from the ledger's
        // cursor (see `State::adopt_claim`). Claims are made in rounds
        // (`persist::claims::ClaimQueue`); a round that does not come
        // within the hello timeout refuses the Hello.
        let generation = match tokio::time::timeout(self.hello_timeout, self.claims.claim(&node_id))
            .await
        {
            Ok(Ok(Ok(generation))) => generation,
            Ok(Ok(Err(e))) => {
                warn!(node = %node_id, ?peer, error = %e, "stream refused: claiming the node in the ledger failed");
                return Err(self.refuse(
                    StreamRefusal::Ledger,
                    Status::unavailable(format!("claiming node {node_id:?}: {e}")),
                ));
            }
            Ok(Err(_)) => {
                return Err(self.refuse(
                    StreamRefusal::Ledger,
                    Status::unavailable(format!(
                        "claiming node {node_id:?}: the collector's claim thread is gone"
                    )),
                ));
            }
            Err(_) => {
                warn!(node = %node_id, ?peer, timeout_ms = self.hello_timeout.as_millis() as u64, "stream refused: the node's ledger claim did not come within the hello timeout");
                return Err(self.refuse(
                    StreamRefusal::ClaimTimeout,
                    Status::unavailable(format!(
                        "claiming node {node_id:?} in the ledger took longer than the hello timeout ({}); try again or another collector",
                        humantime::format_duration(self.hello_timeout)
                    )),
                ));
            }
        };
        let (handle, acked_seq) = self.state.hello_checked(hello).map_err(|e| {
            warn!(node = %node_id, ?peer, error = %e, "stream refused");
            self.refuse(StreamRefusal::Hello, e.into())
        })?;
        // A node first heard of holds its claim from now on.
        self.state
            .set_claim_generations(&[(&handle.node_id, generation)]);
        info!(node = %handle.node_id, ?peer, epoch = handle.epoch, acked_seq, generation, "agent connected");

        // futures' channel allocates per message in flight; tokio's
        // bounded channel allocates a block of 32 slots per stream up front
        // (1 KiB each for tens of thousands of streams that hold one ack
        // at a time).
        let (mut tx, rx) = mpsc::channel::<Result<pb::CollectorMessage, Status>>(4);
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
        let welcomed_seq = acked_seq;
        let state = self.state.clone();
        let shutdown = self.shutdown.clone();
        let mut committed = self.committed.clone();
        let rate = self.limits.max_node_sample_rate;
        let admitted = Admitted { auth, token, rate };
        tokio::spawn(async move {
            let _open = open_guard;
            let node = handle.node_id.clone();
            let mut stopping = shutdown.clone();
            let mut shed = state.readiness.shed_signal();
            let waited = tokio::select! {
                c = committed.wait_for(|c| *c >= welcome_after) => Some(c.is_ok()),
                _ = stopping.wait_for(|s| *s) => Some(false),
                _ = shed_now(&mut shed) => None,
            };
            let Some(durable) = waited else {
                state.disconnect(&handle);
                state.counters.streams_shed.fetch_add(1, Ordering::Relaxed);
                let failing = state.readiness.shedding().unwrap_or_default();
                info!(node = %node, "stream shed before its Welcome: ledger commits are failing");
                let _ = tx.send(Err(shed_status(failing))).await;
                return;
            };
            if durable && handle.claim_lost() {
                // The commit the Welcome waited for was fenced for this
                // node: what it would ack is not in the ledger.
                state.disconnect(&handle);
                info!(node = %node, "stream ended before its Welcome: the node's ledger claim is lost");
                let _ = tx.send(Err(claim_lost(&node))).await;
                return;
            }
            if !durable || tx.send(Ok(welcome)).await.is_err() {
                state.disconnect(&handle);
                return;
            }
            let end = serve_stream(
                &state,
                &handle,
                welcomed_seq,
                inbound,
                &mut tx,
                shutdown,
                committed,
                shed,
                admitted,
            )
            .await;
            state.disconnect(&handle);
            match end {
                Ok(()) => info!(node = %node, "agent disconnected"),
                Err(status) => {
                    info!(node = %node, code = ?status.code(), message = status.message(), "stream ended");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(rx) as Outbound))
    }
}

impl IngestService {
    /// Checks that whoever opened the stream may report for `node`: its
    /// token (when agents need one) and its client certificate (with
    /// mutual TLS). Refusals are counted, and logged once per node.
    fn authorize(
        &self,
        node: &str,
        token: Option<&str>,
        certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<(), Status> {
        let auth = self.state.auth();
        let refused = |reason: AuthReason, status: Status| {
            AuthRefused {
                surface: Surface::Grpc,
                reason,
                node: Some(node),
            }
            .emit(&self.state.counters);
            let mut logged = lock(&self.refused_logged);
            if logged.len() < REFUSED_LOGGED_MAX && logged.insert(node.to_string()) {
                warn!(
                    node = ?node,
                    reason = reason.label(),
                    message = status.message(),
                    "agent refused (logged once per node)"
                );
            }
            self.refuse(StreamRefusal::Auth, status)
        };
        if auth.agents_required() {
            match auth.agent(token) {
                Err(e) => {
                    return Err(refused(
                        AuthReason::Unauthenticated,
                        Status::unauthenticated(format!("agent token: {e}")),
                    ));
                }
                Ok(grant) if !grant.allows(node) => {
                    return Err(refused(
                        AuthReason::NodeNotAllowed,
                        Status::permission_denied(format!(
                            "token {:?} may not report for node {node:?}",
                            grant.name
                        )),
                    ));
                }
                Ok(_) => {}
            }
        }
        if self.client_certs
            && !certs
                .and_then(|c| c.first())
                .is_some_and(|c| auth::certificate_names(c, node))
        {
            return Err(refused(
                AuthReason::Certificate,
                Status::permission_denied(format!(
                    "the client certificate does not name node {node:?}"
                )),
            ));
        }
        Ok(())
    }

    fn refuse(&self, reason: StreamRefusal, status: Status) -> Status {
        StreamRefused {
            reason,
            message: status.message(),
        }
        .emit(&self.state.counters);
        status
    }
}

/// What a stream was admitted with: the tokens in force and its own, to
/// check again when the auth file is reloaded (a revoked token ends the
/// streams that use it), and the sample rate it may send at.
struct Admitted {
    auth: Arc<auth::Auth>,
    token: Option<String>,
    rate: u32,
}

impl Admitted {
    /// Whether the stream may go on under the tokens in force now.
    fn check(&mut self, state: &State, node: &str) -> Result<(), Status> {
        let now = state.auth();
        if Arc::ptr_eq(&now, &self.auth) {
            return Ok(());
        }
        self.auth = now;
        if !self.auth.agents_required() {
            return Ok(());
        }
        match self.auth.agent(self.token.as_deref()) {
            Ok(g) if g.allows(node) => Ok(()),
            Ok(_) => {
                AuthRefused {
                    surface: Surface::Grpc,
                    reason: AuthReason::NodeNotAllowed,
                    node: Some(node),
                }
                .emit(&state.counters);
                Err(Status::permission_denied(format!(
                    "the token no longer allows node {node:?}"
                )))
            }
            Err(_) => {
                AuthRefused {
                    surface: Surface::Grpc,
                    reason: AuthReason::Unauthenticated,
                    node: Some(node),
                }
                .emit(&state.counters);
                Err(Status::unauthenticated("the agent token was revoked"))
            }
        }
    }
}

/// The status that ends a stream whose node's ledger claim is lost:
/// UNAVAILABLE, so the agent reconnects and re-sends what is unacked.
fn claim_lost(node: &str) -> Status {
    Status::unavailable(format!(
        "node {node:?} was claimed by another collector: nothing more is acked on this stream; say Hello again"
    ))
}

/// Returns once the streams are to be shed.
async fn shed_now(shed: &mut watch::Receiver<bool>) {
    // The value's guard is not kept past the wait.
    let _ = shed.wait_for(|s| *s).await.map(drop);
}

/// The status that sheds a stream, or refuses a Hello, once ledger commits
/// have failed for `shed_streams_after` (`failing` so far).
fn shed_status(failing: Duration) -> Status {
    Status::unavailable(format!(
        "ledger unreachable for {}s; reconnect to another collector",
        failing.as_secs()
    ))
}

/// Rejected samples by reason (`Reject::ALL` order).
type Rejections = [u64; Reject::ALL.len()];

/// The `rejected` field of an Ack: the reasons with a count.
fn rejected_field(r: &Rejections) -> Vec<pb::RejectedSamples> {
    Reject::ALL
        .iter()
        .zip(r)
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| pb::RejectedSamples {
            reason: reason.label().to_string(),
            count: *n,
        })
        .collect()
}

/// Batches applied but not yet durable, in order: (commit id, ack,
/// rejected samples if any). Batches with rejections are rare: their
/// counts are boxed so the common entry stays small.
type Waiting = std::collections::VecDeque<(u64, u64, Option<Box<Rejections>>)>;

/// The Ack for every waiting batch whose commit (`done` and before) is
/// durable, if there is one.
fn take_ack(waiting: &mut Waiting, done: u64, epoch: u64) -> Option<pb::CollectorMessage> {
    let mut ack = None;
    let mut rejected: Option<Rejections> = None;
    while waiting.front().is_some_and(|(id, _, _)| *id <= done) {
        if let Some((_, seq, r)) = waiting.pop_front() {
            ack = Some(seq);
            if let Some(r) = r {
                let sum = rejected.get_or_insert_default();
                for (s, n) in sum.iter_mut().zip(r.iter()) {
                    *s = s.saturating_add(*n);
                }
            }
        }
    }
    ack.map(|acked_seq| pb::CollectorMessage {
        body: Some(pb::collector_message::Body::Ack(pb::Ack {
            stream_epoch: epoch,
            acked_seq,
            rejected: rejected.as_ref().map(rejected_field).unwrap_or_default(),
        })),
    })
}

/// Reads batches until the agent leaves, the stream fails or the collector
/// shuts down; acks each batch once the ledger commit holding it is
/// durable, with what it rejected. `welcomed_seq` is what the Welcome
/// acked.
#[allow(clippy::too_many_arguments)]
async fn serve_stream(
    state: &State,
    handle: &StreamHandle,
    welcomed_seq: u64,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: &mut mpsc::Sender<Result<pb::CollectorMessage, Status>>,
    shutdown: watch::Receiver<bool>,
    mut committed: watch::Receiver<u64>,
    mut shed: watch::Receiver<bool>,
    mut admitted: Admitted,
) -> Result<(), Status> {
    let mut waiting = Waiting::new();
    // The highest sequence of this epoch accepted so far.
    let mut accepted = welcomed_seq;
    let stop = capwatch_common::wait_for_shutdown(shutdown);
    tokio::pin!(stop);
    // Token bucket of node samples, one second deep: a stream that sends
    // faster is not read until it has earned its last batch.
    let rate = f64::from(admitted.rate);
    let mut budget = rate;
    let mut refilled = tokio::time::Instant::now();
    let mut paused_until: Option<tokio::time::Instant> = None;
    loop {
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(paused_until.unwrap_or_else(tokio::time::Instant::now)), if paused_until.is_some() => {
                paused_until = None;
                continue;
            }
            m = inbound.message(), if paused_until.is_none() => m?,
            changed = committed.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("collector shutting down"));
                }
                let done = *committed.borrow_and_update();
                // Read after the commit number: a fence is marked before
                // the commit after it is announced.
                if handle.claim_lost() {
                    return Err(claim_lost(&handle.node_id));
                }
                if let Some(ack) = take_ack(&mut waiting, done, handle.epoch)
                    && tx.send(Ok(ack)).await.is_err()
                {
                    return Ok(());
                }
                continue;
            }
            _ = &mut stop => {
                return Err(Status::unavailable("collector shutting down"));
            }
            _ = shed_now(&mut shed) => {
                // What this stream applied and is not acked stays unacked:
                // the agent re-sends it to another collector (or here,
                // once a commit succeeds), and dedup from the ledger's
                // cursor counts it once.
                state.counters.streams_shed.fetch_add(1, Ordering::Relaxed);
                return Err(shed_status(state.readiness.shedding().unwrap_or_default()));
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
        let mut health_dropped = 0u64;
        for s in batch.samples {
            match edge::sample_counted(s) {
                Ok((s, dropped)) => {
                    health_dropped += u64::from(dropped);
                    samples.push(s);
                }
                Err(r) => rejected.push(r),
            }
        }
        if health_dropped > 0 {
            state
                .counters
                .gpu_health_dropped
                .fetch_add(health_dropped, Ordering::Relaxed);
            warn!(node = %handle.node_id, gpus = health_dropped, "GPU health readings out of range or malformed dropped (their samples are kept)");
        }
        admitted.check(state, &handle.node_id)?;
        if handle.claim_lost() {
            return Err(claim_lost(&handle.node_id));
        }
        let now = tokio::time::Instant::now();
        budget = (budget + now.duration_since(refilled).as_secs_f64() * rate).min(rate);
        refilled = now;
        // An empty batch costs as much as one sample: it still takes a
        // state update and an ack.
        budget -= (samples.len() + rejected.len()).max(1) as f64;
        if budget < 0.0 {
            paused_until = Some(now + Duration::from_secs_f64(-budget / rate));
        }
        let out = match state.ingest(handle, samples, rejected) {
            Ok(out) => out,
            Err(superseded) => {
                // Another stream took the node over. Tell the agent exactly
                // what its epoch holds, so that it gives up nothing it
                // could still deliver: the ack of what this stream applied,
                // once durable, then that nothing above it was accepted.
                // Bounded: commits that keep failing must not hold the
                // stream open.
                if let Some(last) = waiting.back().map(|(id, _, _)| *id) {
                    let durable = tokio::select! {
                        c = tokio::time::timeout(LAST_ACK_WAIT, committed.wait_for(|c| *c >= last)) => {
                            matches!(c, Ok(Ok(_)))
                        }
                        _ = &mut stop => false,
                    };
                    let done = *committed.borrow_and_update();
                    if durable
                        && !handle.claim_lost()
                        && let Some(ack) = take_ack(&mut waiting, done, handle.epoch)
                    {
                        let _ = tx.send(Ok(ack)).await;
                    }
                }
                let mut status = Status::from(superseded);
                status.metadata_mut().insert(
                    ACCEPTED_SEQ_KEY,
                    tonic::metadata::MetadataValue::from(accepted),
                );
                return Err(status);
            }
        };
        accepted = out.acked_seq;
        debug!(node = %handle.node_id, accepted = out.accepted, duplicate = out.duplicate, acked_seq = out.acked_seq, commit = out.commit_id, "batch");
        let rejected = (!out.rejected.is_empty()).then(|| {
            let mut r: Box<Rejections> = Box::default();
            for (_, reason) in &out.rejected {
                r[*reason as usize] += 1;
            }
            r
        });
        waiting.push_back((out.commit_id, out.acked_seq, rejected));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::LedgerError;
    use crate::state::StateConfig;
    use capwatch_proto::v1::ingest_client::IngestClient;
    use capwatch_proto::v1::ingest_server::IngestServer;

    /// An ingest server for `state` on a free loopback port, claiming
    /// through `claims` and acking what `committed` says is durable, and a
    /// client connected to it. The server runs until `server` is aborted;
    /// `_stop` holds its shutdown signal off.
    struct Served {
        client: IngestClient<tonic::transport::Channel>,
        server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
        _stop: watch::Sender<bool>,
    }

    async fn serve(
        state: &Arc<State>,
        claims: Arc<dyn NodeClaims>,
        hello_timeout: Duration,
        committed: watch::Receiver<u64>,
        max_node_sample_rate: u32,
    ) -> Served {
        let (_stop, shutdown) = watch::channel(false);
        let service = IngestService {
            state: state.clone(),
            claims,
            shutdown,
            hello_timeout,
            committed,
            client_certs: false,
            limits: Limits {
                max_streams: 10,
                max_node_sample_rate,
            },
            open: Default::default(),
            refused_logged: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IngestServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let client = IngestClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Served {
            client,
            server,
            _stop,
        }
    }

    /// A ledger that cannot be reached.
    struct Unreachable;

    impl NodeClaims for Unreachable {
        fn claim(&self, _: &str) -> crate::persist::claims::ClaimAnswer {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let e = LedgerError::Io {
                path: "/var/lib/capwatch/ledger.db".into(),
                error: std::io::Error::other("disk I/O error"),
            };
            let _ = tx.send(Err(crate::persist::claims::ClaimFailed(e.to_string())));
            rx
        }
    }

    /// A collector's state with no tenant file, as these tests start it.
    fn test_state() -> Arc<State> {
        Arc::new(State::new(
            StateConfig {
                stale_after: None,
                max_gpus_per_node: 8,
                max_clock_skew: Duration::from_secs(600),
                max_sample_age: Duration::from_secs(86_400),
            },
            crate::tenants::Tenants::empty(),
        ))
    }

    /// Invariant: a Hello whose node cannot be claimed in the ledger is
    /// refused with UNAVAILABLE naming the ledger, counted as a refused
    /// stream, and the node is not admitted.
    #[tokio::test]
    async fn a_hello_whose_claim_fails_is_refused_unavailable_naming_the_ledger() {
        let state = test_state();
        let (_committed_tx, committed) = watch::channel(0);
        let Served {
            mut client,
            server,
            _stop,
        } = serve(
            &state,
            Arc::new(Unreachable),
            Duration::from_secs(5),
            committed,
            100,
        )
        .await;
        let hello = pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(pb::Hello {
                node_power_sources: Vec::new(),
                node_id: "n1".into(),
                agent_version: "test".into(),
                stream_epoch: 1,
                interval_millis: 1000,
                gpus: Vec::new(),
                host: None,
            })),
        };
        let status = client
            .stream(futures::StreamExt::chain(
                futures::stream::iter(vec![hello]),
                futures::stream::pending(),
            ))
            .await
            .expect_err("the Hello must be refused");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status
                .message()
                .contains("ledger /var/lib/capwatch/ledger.db"),
            "{status:?}"
        );
        assert_eq!(state.counters.streams_refused.load(Ordering::Relaxed), 1);
        assert_eq!(state.connected(), 0);
        assert_eq!(state.node_count(), 0, "the node was not admitted");
        server.abort();
    }

    /// A Hello whose claim does not come within the hello timeout (the
    /// ledger's writer is stuck) is refused UNAVAILABLE and counted, and
    /// the node is not admitted; once the writer is free, a Hello is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hello_whose_claim_does_not_come_in_time_is_refused_unavailable() {
        let state = test_state();
        let dir = tempfile::tempdir().unwrap();
        let writer = Arc::new(Mutex::new(
            crate::ledger::Ledger::create(&dir.path().join("ledger.db")).unwrap(),
        ));
        let claims = crate::persist::claims::ClaimQueue::start(
            crate::persist::claims::HolderClaims {
                writer: writer.clone(),
                holder: Arc::from("collector-a/1"),
            },
            state.clone(),
        )
        .unwrap();
        let (committed_tx, committed) = watch::channel(0);
        let Served {
            mut client,
            server,
            _stop,
        } = serve(
            &state,
            Arc::new(claims),
            Duration::from_millis(300),
            committed,
            100,
        )
        .await;
        let hello = || pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(pb::Hello {
                node_power_sources: Vec::new(),
                node_id: "n1".into(),
                agent_version: "test".into(),
                stream_epoch: 1,
                interval_millis: 1000,
                gpus: Vec::new(),
                host: None,
            })),
        };
        // Another thread holds the writer (a commit that hangs, say).
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held, holding) = std::sync::mpsc::channel::<()>();
        let stuck = std::thread::spawn({
            let writer = writer.clone();
            move || {
                let _writer = crate::sync::lock(&writer);
                held.send(()).unwrap();
                let _ = released.recv();
            }
        });
        holding.recv().unwrap();
        let status = client
            .stream(futures::StreamExt::chain(
                futures::stream::iter(vec![hello()]),
                futures::stream::pending(),
            ))
            .await
            .expect_err("the Hello must be refused");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("hello timeout"), "{status:?}");
        assert_eq!(state.counters.streams_refused.load(Ordering::Relaxed), 1);
        assert_eq!(state.connected(), 0);
        drop(release);
        stuck.join().unwrap();
        // The writer is free again: the next Hello is claimed and welcomed.
        committed_tx.send_replace(u64::MAX);
        let mut answers = client
            .stream(futures::StreamExt::chain(
                futures::stream::iter(vec![hello()]),
                futures::stream::pending(),
            ))
            .await
            .unwrap()
            .into_inner();
        let welcome = answers.message().await.unwrap().unwrap();
        assert!(
            matches!(welcome.body, Some(pb::collector_message::Body::Welcome(_))),
            "{welcome:?}"
        );
        assert_eq!(state.connected(), 1);
        server.abort();
    }

    /// A batch of node `n1`'s GPU 0 at seconds `seqs` (counter 500 mJ a
    /// second), stamped `t0` + seq seconds.
    fn n1_batch(t0: i64, seqs: std::ops::RangeInclusive<u64>) -> pb::AgentMessage {
        pb::AgentMessage {
            body: Some(pb::agent_message::Body::Batch(pb::SampleBatch {
                samples: seqs
                    .map(|seq| pb::NodeSample {
                        node_power: Vec::new(),
                        seq,
                        timestamp_unix_nanos: (t0 + seq as i64) * 1_000_000_000,
                        gpus: vec![pb::GpuSample {
                            index: 0,
                            power_milliwatts: Some(500_000),
                            energy_millijoules: Some(1_000_000 + 500 * seq),
                            ..Default::default()
                        }],
                        host: None,
                    })
                    .collect(),
            })),
        }
    }

    fn n1_hello() -> pb::AgentMessage {
        pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(pb::Hello {
                node_power_sources: Vec::new(),
                node_id: "n1".into(),
                agent_version: "test".into(),
                stream_epoch: 1,
                interval_millis: 1000,
                gpus: vec![pb::GpuInfo {
                    index: 0,
                    uuid: "GPU-n1".into(),
                    model: "H200".into(),
                    power_limit_milliwatts: Some(700_000),
                    memory_total_bytes: None,
                    energy_counter_supported: true,
                    ..Default::default()
                }],
                host: None,
            })),
        }
    }

    /// Invariant: nothing uncommitted is acked, and once commits have
    /// failed for `shed_streams_after` the collector ends its streams
    /// UNAVAILABLE and refuses Hellos, until a commit succeeds; then the
    /// agent's re-sent samples count once (fault injection through the
    /// writer interface).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_commits_stop_acks_shed_streams_and_refuse_hellos_until_one_succeeds() {
        let state = test_state();
        let shed_after = Duration::from_millis(400);
        state.readiness.set_shed_after(shed_after);
        let dir = tempfile::tempdir().unwrap();
        let writer = crate::persist::faulty::Faulty::new(
            crate::ledger::Ledger::create(&dir.path().join("ledger.db")).unwrap(),
        );
        let fail = writer.fail_commits.clone();
        let writer = Arc::new(Mutex::new(writer));
        let holder: Arc<str> = Arc::from("collector-a/1");
        let claims = crate::persist::claims::ClaimQueue::start(
            crate::persist::claims::HolderClaims {
                writer: writer.clone(),
                holder: holder.clone(),
            },
            state.clone(),
        )
        .unwrap();
        let (committed_tx, committed) = watch::channel(0);
        let (stop_committer, committer_stop) = std::sync::mpsc::channel::<()>();
        let committer = std::thread::spawn({
            let (state, writer, holder) = (state.clone(), writer.clone(), holder.clone());
            move || {
                crate::persist::committer::commit_loop(
                    &state,
                    &*writer,
                    &holder,
                    Duration::from_millis(20),
                    Duration::from_secs(86_400),
                    &committed_tx,
                    &committer_stop,
                )
            }
        });
        let Served {
            mut client,
            server,
            _stop,
        } = serve(
            &state,
            Arc::new(claims),
            Duration::from_secs(5),
            committed,
            1_000,
        )
        .await;
        let t0 = crate::sync::now_unix() - 300;
        let open = |client: &mut IngestClient<tonic::transport::Channel>| {
            let (tx, rx) = futures::channel::mpsc::unbounded::<pb::AgentMessage>();
            tx.unbounded_send(n1_hello()).unwrap();
            let mut client = client.clone();
            async move { (tx, client.stream(rx).await) }
        };
        let acked = |m: Option<pb::CollectorMessage>| match m.and_then(|m| m.body) {
            Some(pb::collector_message::Body::Ack(a)) => a.acked_seq,
            Some(pb::collector_message::Body::Welcome(w)) => w.acked_seq,
            other => panic!("expected an Ack or a Welcome, got {other:?}"),
        };

        let (tx, answers) = open(&mut client).await;
        let mut answers = answers.unwrap().into_inner();
        assert_eq!(acked(answers.message().await.unwrap()), 0);
        tx.unbounded_send(n1_batch(t0, 1..=5)).unwrap();
        assert_eq!(acked(answers.message().await.unwrap()), 5);

        // The ledger becomes unreachable: 6-10 are applied, never acked,
        // and the stream is shed once commits have failed long enough.
        fail.store(true, Ordering::Relaxed);
        tx.unbounded_send(n1_batch(t0, 6..=10)).unwrap();
        let started = std::time::Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("the stream is shed")
            .expect_err("no ack while commits fail; then the stream is shed");
        assert!(started.elapsed() >= shed_after, "shed too early");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("ledger unreachable for")
                && status.message().contains("reconnect to another collector"),
            "{status:?}"
        );
        assert_eq!(state.counters.streams_shed.load(Ordering::Relaxed), 1);
        assert!(state.readiness.not_ready().is_some());
        // Hellos are refused while commits fail.
        let refused_before = state.counters.streams_refused.load(Ordering::Relaxed);
        let (_tx, refused) = open(&mut client).await;
        let status = refused.expect_err("a Hello while shedding");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("ledger unreachable"),
            "{status:?}"
        );
        assert_eq!(
            state.counters.streams_refused.load(Ordering::Relaxed),
            refused_before + 1
        );

        // The ledger is back: the next commit (the retry holding 6-10)
        // succeeds, and Hellos are taken again.
        fail.store(false, Ordering::Relaxed);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while state.readiness.shedding().is_some() {
            assert!(std::time::Instant::now() < until, "still shedding");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (tx, answers) = open(&mut client).await;
        let mut answers = answers.unwrap().into_inner();
        let welcomed = acked(answers.message().await.unwrap());
        assert_eq!(welcomed, 10, "6-10 were committed by the retry");
        // The agent re-sends everything it has not had acked: 6-15.
        tx.unbounded_send(n1_batch(t0, 6..=15)).unwrap();
        assert_eq!(acked(answers.message().await.unwrap()), 15);
        assert_eq!(state.readiness.not_ready(), None);

        drop(stop_committer);
        assert!(committer.join().unwrap().is_none());
        let w = crate::sync::lock(&writer);
        // Ground truth: the counter moved 14 intervals of 500 mJ.
        assert_eq!(
            w.inner.bucket_totals("unassigned").unwrap().energy_mj,
            14 * 500
        );
        assert_eq!(w.inner.bucket_totals("unassigned").unwrap().samples, 15);
        drop(w);
        server.abort();
    }

    /// Invariant: one GPU's malformed XID counts (a code twice) drop that
    /// GPU's health block alone, counted in `gpu_health_dropped`: the
    /// sample is accepted and acked with no rejection, every GPU's energy
    /// (that GPU's included) is booked, and the other GPUs keep their
    /// health and XID readings.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_xid_counts_drop_one_gpus_health_and_book_every_gpus_energy() {
        let state = test_state();
        let dir = tempfile::tempdir().unwrap();
        let writer = Arc::new(Mutex::new(
            crate::ledger::Ledger::create(&dir.path().join("ledger.db")).unwrap(),
        ));
        let claims = crate::persist::claims::ClaimQueue::start(
            crate::persist::claims::HolderClaims {
                writer,
                holder: Arc::from("collector-a/1"),
            },
            state.clone(),
        )
        .unwrap();
        // Everything counts as committed, told again and again so that
        // each batch's ack follows (an ack waits for a commit to be told).
        let (committed_tx, committed) = watch::channel(u64::MAX);
        let committing = tokio::spawn(async move {
            loop {
                committed_tx.send_replace(u64::MAX);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let Served {
            mut client,
            server,
            _stop,
        } = serve(
            &state,
            Arc::new(claims),
            Duration::from_secs(5),
            committed,
            100,
        )
        .await;
        let gpus = (0..3)
            .map(|index| pb::GpuInfo {
                index,
                uuid: format!("GPU-x{index}"),
                model: "H200".into(),
                power_limit_milliwatts: Some(700_000),
                energy_counter_supported: true,
                ..Default::default()
            })
            .collect();
        let hello = pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(pb::Hello {
                node_id: "x1".into(),
                agent_version: "test".into(),
                stream_epoch: 1,
                interval_millis: 1000,
                gpus,
                ..Default::default()
            })),
        };
        let t0 = crate::sync::now_unix() - 300;
        let xid = |code, count| pb::XidCount { code, count };
        // GPU 0's XID readings are sound; GPU 1's list code 79 twice; GPU 2
        // has a fan reading only. Each GPU draws (index + 1) x 100 mJ a second.
        let health = |index: u32| {
            let mut h = pb::GpuHealth {
                fan_speed_percent: Some(40),
                ..Default::default()
            };
            match index {
                0 => {
                    h.xid_errors = vec![xid(48, 1), xid(79, 2)];
                    h.last_xid = Some(79);
                    h.last_xid_unix_nanos = Some(t0 * 1_000_000_000);
                }
                1 => {
                    h.xid_errors = vec![xid(79, 1), xid(79, 1)];
                    h.last_xid = Some(79);
                    h.last_xid_unix_nanos = Some(t0 * 1_000_000_000);
                }
                _ => {}
            }
            h
        };
        let batch = pb::AgentMessage {
            body: Some(pb::agent_message::Body::Batch(pb::SampleBatch {
                samples: (1..=2u64)
                    .map(|seq| pb::NodeSample {
                        seq,
                        timestamp_unix_nanos: (t0 + seq as i64) * 1_000_000_000,
                        gpus: (0..3u32)
                            .map(|index| pb::GpuSample {
                                index,
                                power_milliwatts: Some(100_000),
                                energy_millijoules: Some(
                                    1_000_000 + u64::from(index + 1) * 100 * seq,
                                ),
                                health: Some(health(index)),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    })
                    .collect(),
            })),
        };
        let (tx, rx) = futures::channel::mpsc::unbounded::<pb::AgentMessage>();
        tx.unbounded_send(hello).unwrap();
        let mut answers = client.stream(rx).await.unwrap().into_inner();
        let welcome = answers.message().await.unwrap().unwrap();
        assert!(
            matches!(welcome.body, Some(pb::collector_message::Body::Welcome(_))),
            "{welcome:?}"
        );
        tx.unbounded_send(batch).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("the batch is acked");
        let ack = match answer.unwrap().and_then(|m| m.body) {
            Some(pb::collector_message::Body::Ack(a)) => a,
            other => panic!("expected an Ack, got {other:?}"),
        };
        assert_eq!(ack.acked_seq, 2);
        assert!(ack.rejected.is_empty(), "{:?}", ack.rejected);
        assert_eq!(state.counters.accepted.load(Ordering::Relaxed), 2);
        for r in Reject::ALL {
            assert_eq!(state.counters.rejected(r), 0, "{r:?}");
        }
        // GPU 1's health block in both samples.
        assert_eq!(state.counters.gpu_health_dropped.load(Ordering::Relaxed), 2);
        let mut seen = Vec::new();
        state.for_each_node(|n| {
            for g in n.gpus() {
                let h = g.last().and_then(|r| r.health.as_deref());
                seen.push((
                    g.energy_millijoules(),
                    h.map(|h| (h.fan_speed_percent, h.xid_errors.clone(), h.last_xid)),
                ));
            }
        });
        let t = t0 * 1_000_000_000;
        assert_eq!(
            seen,
            vec![
                (100, Some((Some(40), vec![(48, 1), (79, 2)], Some((79, t))))),
                (200, None),
                (300, Some((Some(40), vec![], None))),
            ]
        );
        // The tenant's total holds every GPU's energy.
        assert_eq!(
            state.totals()[crate::tenants::UNASSIGNED].energy_millijoules,
            600
        );
        committing.abort();
        server.abort();
    }

    #[test]
    fn a_stale_epoch_refusal_carries_the_current_epoch_as_metadata() {
        // Invariant: the refusal of an older epoch is FAILED_PRECONDITION
        // with the node's current epoch in `capwatch-current-epoch`.
        let status = Status::from(HelloError::StaleEpoch {
            got: 5,
            current: 1_796_000_000_000_000_000,
            connected: false,
        });
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        let current = status
            .metadata()
            .get(CURRENT_EPOCH_KEY)
            .and_then(|v| v.to_str().ok());
        assert_eq!(current, Some("1796000000000000000"));
        assert!(status.message().contains("1796000000000000000"));
    }

    #[test]
    fn an_ack_lists_the_reasons_with_a_count_by_their_metric_labels() {
        let mut r = Rejections::default();
        r[Reject::Timestamp as usize] = 50;
        r[Reject::Power as usize] = 1;
        let field: Vec<(String, u64)> = rejected_field(&r)
            .into_iter()
            .map(|x| (x.reason, x.count))
            .collect();
        assert_eq!(
            field,
            vec![("power".to_string(), 1), ("timestamp".to_string(), 50)]
        );
        assert!(rejected_field(&Rejections::default()).is_empty());
    }
}
