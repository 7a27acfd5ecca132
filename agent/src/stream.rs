//! The agent's side of the ingest stream: connect, say hello, send what the
//! spool holds, forget what the collector acks, and on any failure
//! reconnect with exponential backoff and jitter and re-send everything
//! not yet acked. When the collector refuses the epoch because it holds a
//! newer one for the node, the agent moves above it (see
//! [`Spool::renumber`]) and says Hello again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use capwatch_proto::v1 as pb;
use capwatch_proto::v1::ingest_client::IngestClient;

use crate::spool::Spool;

/// Longest time from starting a connection to the collector's Welcome.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest batch sent, in encoded bytes: well under the collector's
/// default 4 MiB message limit, whatever the GPU count.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Metadata of a stale-epoch refusal naming the node's current epoch.
const CURRENT_EPOCH_KEY: &str = "capwatch-current-epoch";

/// Metadata of the status ending a stream another one took over: the
/// highest sequence of its epoch the collector accepted.
const ACCEPTED_SEQ_KEY: &str = "capwatch-accepted-seq";

/// Highest epoch the collector accepts (it stores them as SQLite integers).
const MAX_EPOCH: u64 = i64::MAX as u64;

/// What the stream task shares with the sampler.
pub struct Shared {
    pub spool: Mutex<Spool>,
    /// Woken whenever the sampler adds a sample.
    pub new_sample: Notify,
    pub stats: Stats,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub sampled: AtomicU64,
    /// Samples the collector acked, accepted or rejected.
    pub acked: AtomicU64,
    /// Acked samples the collector said it rejected.
    pub rejected: AtomicU64,
    rejections: Mutex<Rejections>,
    pub dropped: AtomicU64,
    /// Sent but unacked samples of an epoch the collector refused later;
    /// given up, since it may hold them.
    pub abandoned: AtomicU64,
    pub connects: AtomicU64,
}

/// Most distinct rejection reasons told apart; later ones are `other`.
const MAX_REASONS: usize = 16;

/// Longest reason kept, in bytes.
const MAX_REASON_LEN: usize = 64;

/// Rejections are warned about at once, then at most this often, each
/// warning with what came since the last one.
const REJECTION_WARN_EVERY: Duration = Duration::from_secs(60);

/// Rejected samples by the collector's reason.
#[derive(Debug, Default)]
struct Rejections {
    /// Since the agent started.
    total: Vec<(String, u64)>,
    /// Since the last warning.
    unwarned: Vec<(String, u64)>,
    warned_at: Option<Instant>,
}

/// Adds `n` to `reason`, or to `other` once `MAX_REASONS` are known.
fn tally(counts: &mut Vec<(String, u64)>, reason: &str, n: u64) {
    let known = counts.iter().any(|(r, _)| r == reason);
    let reason = if known || counts.len() < MAX_REASONS {
        reason
    } else {
        "other"
    };
    match counts.iter_mut().find(|(r, _)| r == reason) {
        Some((_, c)) => *c = c.saturating_add(n),
        None => counts.push((reason.to_string(), n)),
    }
}

/// `reason=count` pairs, by reason, comma-separated.
fn by_reason(counts: &[(String, u64)]) -> String {
    let mut sorted: Vec<&(String, u64)> = counts.iter().collect();
    sorted.sort();
    sorted
        .iter()
        .map(|(r, n)| format!("{r}={n}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Stats {
    /// Counts the rejections an ack reports, and warns about them: at
    /// once the first time, then at most every `REJECTION_WARN_EVERY`.
    pub fn rejected(&self, node: &str, rejected: &[pb::RejectedSamples]) {
        let mut r = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        let mut sum = 0u64;
        for x in rejected {
            // The reason is the collector's word: kept short and plain.
            let mut reason: String = x
                .reason
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(MAX_REASON_LEN)
                .collect();
            if reason.is_empty() {
                reason = "unknown".into();
            }
            tally(&mut r.total, &reason, x.count);
            tally(&mut r.unwarned, &reason, x.count);
            sum = sum.saturating_add(x.count);
        }
        let total = self
            .rejected
            .fetch_add(sum, Ordering::Relaxed)
            .saturating_add(sum);
        let now = Instant::now();
        if r.unwarned.is_empty()
            || r.warned_at
                .is_some_and(|at| now.duration_since(at) < REJECTION_WARN_EVERY)
        {
            return;
        }
        let since: u64 = r.unwarned.iter().map(|(_, n)| *n).sum();
        warn!(
            node,
            rejected = since,
            by_reason = %by_reason(&r.unwarned),
            rejected_total = total,
            "collector rejected samples: acked but not counted (warned at most once a minute; the exit summary has the totals)"
        );
        r.unwarned.clear();
        r.warned_at = Some(now);
    }

    /// Rejected samples since start, as `reason=count,...`.
    pub fn rejected_by_reason(&self) -> String {
        by_reason(
            &self
                .rejections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .total,
        )
    }
}

impl Shared {
    pub fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        // A poisoned lock means a panic elsewhere already; the spool's
        // contents are still consistent (every method leaves them so).
        self.spool.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct StreamConfig {
    pub collector: String,
    /// `Bearer <token>` for the collector, if it asks for one.
    pub token: Option<MetadataValue<Ascii>>,
    /// TLS for an `https://` collector.
    pub tls: Option<ClientTlsConfig>,
    /// A connection shared with other streams (the fleet simulator puts
    /// several nodes on one HTTP/2 connection); `None` connects anew.
    pub channel: Option<Channel>,
    /// The Hello; its epoch is the spool's at each connect.
    pub hello: pb::Hello,
    pub batch_max: usize,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    pub drain_timeout: Duration,
}

enum Ended {
    /// Everything was delivered after the sampler stopped.
    Drained,
    /// The connection failed; reconnect.
    Failed(String),
    /// The collector refused this agent (bad Hello, or a stale epoch
    /// without the current one named): retrying soon would change nothing,
    /// so the longest backoff applies.
    Refused(String),
    /// The collector holds a newer epoch for this node, `current`.
    StaleEpoch { current: u64, message: String },
    /// Gave up delivering at the drain deadline.
    DeadlinePassed,
}

/// Runs until the sampler has stopped (`sampling_done` reads true) and the
/// spool is delivered, or the drain deadline passes.
pub async fn run(cfg: StreamConfig, shared: Arc<Shared>, mut sampling_done: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(cfg.reconnect_initial, cfg.reconnect_max);
    let mut deadline: Option<Instant> = None;
    loop {
        if deadline.is_none() && *sampling_done.borrow() {
            deadline = Some(Instant::now() + cfg.drain_timeout);
        }
        if deadline.is_some() && shared.spool().is_empty() {
            return;
        }
        // Past the drain deadline nothing may hold the agent up, not even a
        // collector that accepts TCP and never answers.
        let known_deadline = deadline;
        let mut done = sampling_done.clone();
        let drain_timeout = cfg.drain_timeout;
        let drain_over = async move {
            let at = match known_deadline {
                Some(at) => at,
                None => {
                    let _ = done.wait_for(|d| *d).await;
                    Instant::now() + drain_timeout
                }
            };
            tokio::time::sleep_until(at).await;
        };
        let attempt = connect_and_stream(
            &cfg,
            &shared,
            &mut sampling_done,
            &mut deadline,
            &mut backoff,
        );
        let ended = tokio::select! {
            ended = attempt => ended,
            () = drain_over => Ended::DeadlinePassed,
        };
        let error = match ended {
            Ended::Drained => return,
            Ended::DeadlinePassed => {
                warn!(
                    undelivered = shared.spool().len(),
                    "drain deadline passed; samples not delivered"
                );
                return;
            }
            Ended::Refused(e) => {
                backoff.saturate();
                e
            }
            Ended::StaleEpoch { current, message } => {
                new_epoch(&shared, current, &mut backoff, message)
            }
            Ended::Failed(e) => e,
        };
        let delay = backoff.next_delay();
        warn!(collector = %cfg.collector, %error, retry_in_ms = delay.as_millis() as u64, "stream to collector failed");
        let wake = Instant::now() + delay;
        let wake = deadline.map_or(wake, |d| wake.min(d));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = sampling_done.changed(), if deadline.is_none() => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            warn!(
                undelivered = shared.spool().len(),
                "drain deadline passed; samples not delivered"
            );
            return;
        }
    }
}

async fn connect_and_stream(
    cfg: &StreamConfig,
    shared: &Shared,
    sampling_done: &mut watch::Receiver<bool>,
    deadline: &mut Option<Instant>,
    backoff: &mut Backoff,
) -> Ended {
    let endpoint = match Endpoint::from_shared(cfg.collector.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true),
        Err(e) => return Ended::Failed(format!("bad collector URL: {e}")),
    };
    let endpoint = match &cfg.tls {
        Some(tls) => match endpoint.tls_config(tls.clone()) {
            Ok(e) => e,
            Err(e) => return Ended::Refused(format!("TLS settings: {e}")),
        },
        None => endpoint,
    };
    // Only this task changes the spool's epoch.
    let epoch = shared.spool().epoch();
    // Connecting, opening the stream and the Welcome must all happen within
    // this; a collector that stalls there is treated as down.
    let preamble = tokio::time::timeout(PREAMBLE_TIMEOUT, async {
        let channel = match &cfg.channel {
            Some(shared) => shared.clone(),
            None => match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => return Err(Ended::Failed(format!("connect: {}", chain(&e)))),
            },
        };
        let token = cfg.token.clone();
        let mut client =
            IngestClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                if let Some(t) = &token {
                    req.metadata_mut().insert("authorization", t.clone());
                }
                Ok(req)
            });
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(4);
        let mut hello = cfg.hello.clone();
        hello.stream_epoch = epoch;
        let hello = pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(hello)),
        };
        if tx.send(hello).await.is_err() {
            return Err(Ended::Failed("stream closed before hello".into()));
        }
        let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(refused(status)),
        };
        // The collector's first answer is a Welcome with what it already holds.
        match inbound.message().await {
            Ok(Some(pb::CollectorMessage {
                body: Some(pb::collector_message::Body::Welcome(w)),
            })) => {
                let forgotten = shared.spool().ack(w.acked_seq);
                shared
                    .stats
                    .acked
                    .fetch_add(forgotten as u64, Ordering::Relaxed);
                shared.stats.connects.fetch_add(1, Ordering::Relaxed);
                info!(node = %cfg.hello.node_id, collector = %cfg.collector, collector_version = %w.collector_version, epoch, acked_seq = w.acked_seq, "connected");
            }
            Ok(_) => {
                return Err(Ended::Failed(
                    "collector did not answer the hello with a welcome".into(),
                ));
            }
            Err(status) => return Err(refused(status)),
        }
        Ok((tx, inbound))
    });
    let (tx, mut inbound) = match preamble.await {
        Ok(Ok(open)) => open,
        Ok(Err(ended)) => return ended,
        Err(_) => return Ended::Failed("no welcome from the collector within 10s".into()),
    };
    backoff.reset();

    // Everything above `sent` is re-sent on each new connection.
    let mut sent = 0u64;
    loop {
        let batch = shared.spool().after(sent, cfg.batch_max, MAX_BATCH_BYTES);
        let last = batch.last().map(|s| s.seq);
        if last.is_none() {
            if deadline.is_none() && *sampling_done.borrow() {
                *deadline = Some(Instant::now() + cfg.drain_timeout);
            }
            if deadline.is_some() && shared.spool().is_empty() {
                return Ended::Drained;
            }
        }
        let msg = pb::AgentMessage {
            body: Some(pb::agent_message::Body::Batch(pb::SampleBatch {
                samples: batch,
            })),
        };
        let drain_at = *deadline;
        // Acks first: a node that samples faster than its link carries
        // its samples would otherwise always find another batch to send
        // and never read an ack, and its spool would fill with samples the
        // collector already holds. Sending and reading are cancel-safe.
        tokio::select! {
            biased;
            msg = inbound.message() => match msg {
                Ok(Some(pb::CollectorMessage { body: Some(pb::collector_message::Body::Ack(ack)) })) => {
                    if ack.stream_epoch == epoch {
                        let n = shared.spool().ack(ack.acked_seq);
                        shared.stats.acked.fetch_add(n as u64, Ordering::Relaxed);
                        if !ack.rejected.is_empty() {
                            shared.stats.rejected(&cfg.hello.node_id, &ack.rejected);
                        }
                        debug!(acked_seq = ack.acked_seq, forgotten = n, rejected = ack.rejected.len(), "ack");
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return Ended::Failed("collector closed the stream".into()),
                Err(status) => {
                    if let Some(seq) = metadata_u64(&status, ACCEPTED_SEQ_KEY) {
                        shared.spool().settle(seq);
                    }
                    return Ended::Failed(format!("stream error: {status}"));
                }
            },
            sent_ok = tx.send(msg), if last.is_some() => {
                if sent_ok.is_err() {
                    return Ended::Failed("stream closed while sending".into());
                }
                sent = last.unwrap_or(sent);
                // Sent under this epoch: from now on the collector may hold
                // it, whatever becomes of this stream.
                shared.spool().sent(sent);
            }
            _ = shared.new_sample.notified(), if last.is_none() => {}
            _ = sampling_done.changed(), if drain_at.is_none() && last.is_none() => {}
            _ = sleep_until_opt(drain_at) => return Ended::DeadlinePassed,
        }
    }
}

/// An error with its causes, so a TLS failure names its reason (an
/// unknown issuer, an expired certificate) instead of "transport error".
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// A decimal number the collector put in a status's metadata.
fn metadata_u64(status: &tonic::Status, key: &str) -> Option<u64> {
    status
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A refusal at the Hello: a stale epoch when the collector names the
/// node's current one, permanent for the codes that say the request itself
/// is wrong, passing otherwise.
fn refused(status: tonic::Status) -> Ended {
    use tonic::Code;
    let msg = format!("collector refused the stream: {status}");
    let current = metadata_u64(&status, CURRENT_EPOCH_KEY);
    if let (Code::FailedPrecondition, Some(current)) = (status.code(), current) {
        return Ended::StaleEpoch {
            current,
            message: msg,
        };
    }
    match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::Unauthenticated => Ended::Refused(msg),
        _ => Ended::Failed(msg),
    }
}

/// After the collector refused the epoch for one of the node's, `current`:
/// moves the spool to the epoch above it, so the next Hello is accepted
/// (after the usual backoff, not the longest). Returns what to log.
fn new_epoch(shared: &Shared, current: u64, backoff: &mut Backoff, refusal: String) -> String {
    let mut spool = shared.spool();
    let old = spool.epoch();
    let Some(epoch) = epoch_above(old, current) else {
        // No room above: the collector lets an older epoch take over from
        // one stamped in the future once that stream is gone.
        backoff.saturate();
        return format!("{refusal} (no epoch above it; waiting for it to go)");
    };
    let moved = spool.renumber(epoch);
    drop(spool);
    shared
        .stats
        .abandoned
        .fetch_add(moved.abandoned, Ordering::Relaxed);
    warn!(
        old_epoch = old,
        epoch,
        current,
        kept = moved.kept,
        abandoned = moved.abandoned,
        "the collector holds a newer epoch for this node (an agent restarted with its clock stepped back, or another client said Hello for it): moving above it; samples sent but not acked under the old epoch are given up (the collector may hold them; the next counter delta carries their energy)"
    );
    refusal
}

/// The epoch to say Hello with after `old` was refused for `current`:
/// above both (an agent's epochs only grow), if there is room.
fn epoch_above(old: u64, current: u64) -> Option<u64> {
    old.max(current).checked_add(1).filter(|e| *e <= MAX_EPOCH)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff with "equal jitter": each delay is uniform in
/// [d/2, d], where d doubles from `initial` up to `max`. Jitter spreads a
/// fleet's reconnects after a collector restart.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            initial,
            max,
            current: initial,
            rng: seed | 1,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// Jumps to the longest delay.
    pub fn saturate(&mut self) {
        self.current = self.max;
    }

    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter needs spread, not cryptographic quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64((self.rng >> 11) as f64 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_epoch_moves_above_the_current_one_while_there_is_room() {
        assert_eq!(epoch_above(5, 10), Some(11));
        // A collector naming a lower epoch does not move the agent back.
        assert_eq!(epoch_above(100, 5), Some(101));
        assert_eq!(epoch_above(1, MAX_EPOCH - 1), Some(MAX_EPOCH));
        assert_eq!(epoch_above(1, MAX_EPOCH), None);
        assert_eq!(epoch_above(1, u64::MAX), None);
    }

    #[test]
    fn rejections_are_counted_by_reason_and_bounded() {
        let stats = Stats::default();
        let r = |reason: &str, count| pb::RejectedSamples {
            reason: reason.into(),
            count,
        };
        stats.rejected("n", &[r("timestamp", 3), r("power", 1)]);
        stats.rejected("n", &[r("timestamp", 2), r("", 1), r("a\nb", 1)]);
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 8);
        assert_eq!(
            stats.rejected_by_reason(),
            "ab=1,power=1,timestamp=5,unknown=1"
        );
        // Past MAX_REASONS distinct reasons, the rest are `other`.
        for i in 0..MAX_REASONS + 3 {
            stats.rejected("n", &[r(&format!("r{i}"), 1)]);
        }
        let text = stats.rejected_by_reason();
        assert_eq!(text.split(',').count(), MAX_REASONS + 1, "{text}");
        assert!(text.contains("other=7"), "{text}");
        assert_eq!(
            stats.rejected.load(Ordering::Relaxed),
            8 + MAX_REASONS as u64 + 3
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let bounds = [100, 200, 400, 800, 1000, 1000];
        for upper in bounds {
            let d = b.next_delay().as_millis() as u64;
            assert!(
                d >= upper / 2 && d <= upper,
                "{d} not in [{}, {upper}]",
                upper / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
