//! The agent's side of the ingest stream: connect, say hello, send what the
//! spool holds, forget what the collector acks, and on any failure move to
//! the next collector endpoint, backing off exponentially (with full
//! jitter) once every endpoint has failed in a row, and re-send everything
//! not yet acked. When the collector refuses the epoch because it holds a
//! newer one for the node, the agent moves above it (see
//! [`Spool::renumber`]) and says Hello again.
//!
//! *Failover.* The endpoints come most preferred first (see
//! [`crate::failover`]). While streaming to another one, every
//! `failback_after` (±20 %) the agent says Hello to the most preferred on a
//! second stream; only once that one has welcomed it does the agent stop
//! sending to the current one, wait (at most [`HANDOVER_TIMEOUT`]) for it
//! to ack what it was sent, and go on on the new stream. Samples leave the
//! spool only when acked, so whatever the old collector did not ack is
//! re-sent to the new one: nothing is lost, and nothing acked is sent twice.

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

use crate::failover::Jitter;
use crate::spool::Spool;

/// Longest time from starting a connection to the collector's Welcome.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest batch sent, in encoded bytes: well under the collector's
/// default 4 MiB message limit, whatever the GPU count.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Longest wait, when moving back to the most preferred collector, for the
/// one being left to ack what it was sent (what it has not acked by then is
/// re-sent to the new one).
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Woken whenever the sampler adds a sample, and whenever the spool's
    /// disk has done an operation (samples may have become sendable).
    pub new_sample: Arc<Notify>,
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
    /// Moves from one collector endpoint to another.
    pub switches: AtomicU64,
    /// When the collector last acked a sample (monotonic, and the wall
    /// clock for `/metrics`).
    last_ack: Mutex<Option<(Instant, std::time::SystemTime)>>,
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

    /// Records that the collector acked at least one sample now.
    pub fn delivered(&self) {
        *self.last_ack.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), std::time::SystemTime::now()));
    }

    /// When the collector last acked a sample; `None` before the first.
    pub fn last_delivery(&self) -> Option<(Instant, std::time::SystemTime)> {
        *self.last_ack.lock().unwrap_or_else(|p| p.into_inner())
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
    /// The spool, locked, with what its disk has done taken in (never
    /// waiting on the disk).
    pub fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        // A poisoned lock means a panic elsewhere already; the spool's
        // contents are still consistent (every method leaves them so).
        let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        spool.absorb();
        // Samples the disk's bound dropped count at once, not at the next
        // push (there may be none: the drain at stop).
        let dropped = spool.take_unreported_drops();
        if dropped > 0 {
            let total = self.stats.dropped.fetch_add(dropped, Ordering::Relaxed) + dropped;
            // Its oldest segment at a time: seldom.
            warn!(
                dropped,
                dropped_total = total,
                "spool on disk full (spool_max_bytes): its oldest samples dropped (energy is kept by the next counter delta)"
            );
        }
        spool
    }
}

/// One collector endpoint.
#[derive(Clone)]
pub struct Target {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// A connection shared with other streams (the fleet simulator puts
    /// several nodes on one HTTP/2 connection); `None` connects anew,
    /// trying each address the host resolves to.
    pub channel: Option<Channel>,
}

pub struct StreamConfig {
    /// The collectors, most preferred first; at least one.
    pub targets: Vec<Target>,
    /// `Bearer <token>` for the collector, if it asks for one.
    pub token: Option<MetadataValue<Ascii>>,
    /// TLS for `https://` collectors.
    pub tls: Option<ClientTlsConfig>,
    /// The name a collector's certificate must carry; `None`: the host of
    /// its URL (also when that host resolves to several addresses).
    pub tls_domain: Option<String>,
    /// While on another endpoint, how often to try the most preferred one;
    /// zero: never.
    pub failback_after: Duration,
    /// The Hello; its epoch is the spool's at each connect.
    pub hello: pb::Hello,
    /// The GPU inventory as a board's MIG layout changes: each Hello lists
    /// its latest value, and a change ends the stream for a new Hello.
    /// `None`: `hello.gpus` as it is.
    pub layout: Option<watch::Receiver<Vec<crate::source::GpuInfo>>>,
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
    /// The GPU inventory changed (a MIG layout): say Hello again to the
    /// same collector at once.
    Relayout,
    /// The most preferred collector welcomed the node while it streamed to
    /// another, which has acked what it was sent (or ended, or ran out of
    /// time): go on there.
    FailBack(Box<Open>),
}

/// A stream the collector has welcomed.
pub struct Open {
    /// Index into [`StreamConfig::targets`].
    target: usize,
    epoch: u64,
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::CollectorMessage>,
    /// The inventory this stream's Hello listed, marked seen: it changes
    /// when the layout does.
    layout: Option<watch::Receiver<Vec<crate::source::GpuInfo>>>,
    /// The MIG layout ids the Hello announced for each GPU, by index: its
    /// current layout's and its earlier ones'.
    announced: Vec<Vec<u64>>,
}

/// The layout ids `g` lists: its current layout's and its earlier ones'.
fn layout_ids(g: &pb::GpuInfo) -> Vec<u64> {
    let earlier = g.earlier_mig_layouts.iter().map(|l| l.id);
    g.mig_layout_id.into_iter().chain(earlier).collect()
}

/// Whether `s` holds a reading taken under a MIG layout newer than the
/// stream's Hello: stamped with a layout the inventory lists now
/// (`current`: its current or an earlier layout of the board) that the
/// Hello did not announce, so one that came after it (the layout may have
/// changed more than once before the stream noticed). Such a sample waits
/// for the Hello that announces it (the inventory changed, so the stream
/// ends for one); a reading stamped with a layout the Hello announced, or
/// one older than any the inventory keeps (a disk spool from an earlier
/// run), goes out, for the collector to split by the layout it knows or
/// meter whole.
fn taken_after_hello(
    s: &pb::NodeSample,
    announced: &[Vec<u64>],
    current: &[crate::source::GpuInfo],
) -> bool {
    s.gpus.iter().any(|g| {
        let i = g.index as usize;
        g.mig_layout_id.is_some_and(|id| {
            let listed_now = current.get(i).is_some_and(|c| {
                c.mig_layout == Some(id) || c.earlier_mig.iter().any(|e| e.id == id)
            });
            listed_now && !announced.get(i).is_some_and(|a| a.contains(&id))
        })
    })
}

/// Failures since the last stream that got an ack, for the round over
/// the endpoints.
#[derive(Debug, Default)]
struct Round {
    failed: usize,
    /// Whether an endpoint refused the agent itself (auth, a bad Hello).
    refused: bool,
}

/// Which endpoint the node streams to, and why it last moved.
struct Serving {
    target: Option<usize>,
    why: String,
}

/// Runs until the sampler has stopped (`sampling_done` reads true) and the
/// spool is delivered, or the drain deadline passes.
pub async fn run(cfg: StreamConfig, shared: Arc<Shared>, mut sampling_done: watch::Receiver<bool>) {
    if cfg.targets.is_empty() {
        warn!("no collector endpoint configured; nothing can be delivered");
        return;
    }
    let mut jitter = Jitter::new(&cfg.hello.node_id);
    let mut backoff =
        Backoff::with_jitter(cfg.reconnect_initial, cfg.reconnect_max, jitter.clone());
    let mut deadline: Option<Instant> = None;
    let n = cfg.targets.len().max(1);
    // The endpoint to try next, and a welcomed stream to go on on.
    let mut at = 0usize;
    let mut handover: Option<Open> = None;
    let mut round = Round::default();
    let mut serving = Serving {
        target: None,
        why: String::new(),
    };
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
        let next = handover.take();
        let target = next.as_ref().map_or(at, |o| o.target);
        let attempt = async {
            let open = match next {
                Some(open) => open,
                None => match preamble(&cfg, target, &shared).await {
                    Ok(open) => open,
                    Err(ended) => return ended,
                },
            };
            stream_on(
                &cfg,
                &shared,
                open,
                &mut sampling_done,
                &mut deadline,
                &mut backoff,
                &mut round,
                &mut serving,
                &mut jitter,
            )
            .await
        };
        let ended = tokio::select! {
            ended = attempt => ended,
            () = drain_over => Ended::DeadlinePassed,
        };
        let url = &cfg.targets[target].url;
        let (error, moved) = match ended {
            Ended::Drained => return,
            Ended::DeadlinePassed => {
                warn!(
                    undelivered = shared.spool().len(),
                    "drain deadline passed; samples not delivered"
                );
                return;
            }
            Ended::Relayout => {
                serving.why = format!("{url}: GPU inventory changed");
                at = target;
                continue;
            }
            Ended::FailBack(open) => {
                serving.why = format!(
                    "failback: {} welcomed the node",
                    cfg.targets[open.target].url
                );
                at = open.target;
                handover = Some(*open);
                round = Round::default();
                continue;
            }
            Ended::Refused(e) => {
                round.refused = true;
                (e, true)
            }
            // Not the endpoint's fault: the same one, with the new epoch.
            Ended::StaleEpoch { current, message } => {
                (new_epoch(&shared, current, &mut backoff, message), false)
            }
            Ended::Failed(e) => (e, true),
        };
        serving.why = format!("{url}: {error}");
        let delay = if moved {
            round.failed += 1;
            if round.failed < n {
                // Another endpoint is untried this round: at once.
                at = (target + 1) % n;
                warn!(collector = %url, %error, next = %cfg.targets[at].url, "stream to collector failed; trying the next one");
                continue;
            }
            // Every endpoint failed in a row: back off, then start again
            // from the most preferred.
            if round.refused {
                backoff.saturate();
            }
            round = Round::default();
            at = 0;
            backoff.next_delay()
        } else {
            backoff.next_delay()
        };
        warn!(collector = %url, %error, retry_in_ms = delay.as_millis() as u64, next = %cfg.targets[at].url, "stream to collector failed");
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

/// The endpoint a target's URL names: one per address its host resolves
/// to, each still presenting (and, over TLS, verifying) the host's name.
async fn endpoints(cfg: &StreamConfig, url: &str) -> Result<Vec<Endpoint>, Ended> {
    use tonic::codegen::http::Uri;
    let uri: Uri = url
        .parse()
        .map_err(|e| Ended::Failed(format!("bad collector URL {url:?}: {e}")))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default().to_string();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tune = |e: Endpoint| {
        e.connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
    };
    let with_tls = |e: Endpoint| match &cfg.tls {
        Some(tls) => {
            let domain = cfg.tls_domain.clone().unwrap_or_else(|| bare.to_string());
            e.tls_config(tls.clone().domain_name(domain))
                .map_err(|e| Ended::Refused(format!("TLS settings: {e}")))
        }
        None => Ok(e),
    };
    if bare.parse::<std::net::IpAddr>().is_ok() {
        let e = Endpoint::from_shared(url.to_string())
            .map_err(|e| Ended::Failed(format!("bad collector URL {url:?}: {e}")))?;
        return Ok(vec![with_tls(tune(e))?]);
    }
    let addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host((bare, port)).await {
        Ok(a) => a.collect(),
        Err(e) => return Err(Ended::Failed(format!("resolving {bare}: {e}"))),
    };
    if addrs.is_empty() {
        return Err(Ended::Failed(format!("resolving {bare}: no addresses")));
    }
    let scheme = if https { "https" } else { "http" };
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let e = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Ended::Failed(format!("collector address {addr}: {e}")))?
            // Requests still name the host, as with one address.
            .origin(uri.clone());
        out.push(with_tls(tune(e))?);
    }
    Ok(out)
}

/// A connection to `url`: each of its addresses in turn, the first that
/// connects.
async fn connect(cfg: &StreamConfig, url: &str) -> Result<Channel, Ended> {
    let mut errors = Vec::new();
    for endpoint in endpoints(cfg, url).await? {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => errors.push(format!("{}: {}", endpoint.uri(), chain(&e))),
        }
    }
    Err(Ended::Failed(format!("connect: {}", errors.join("; "))))
}

/// Connects to target `target`, says Hello and waits for the Welcome.
async fn preamble(cfg: &StreamConfig, target: usize, shared: &Shared) -> Result<Open, Ended> {
    let url = &cfg.targets[target].url;
    // Only the stream task changes the spool's epoch.
    let epoch = shared.spool().epoch();
    // Connecting, opening the stream and the Welcome must all happen within
    // this; a collector that stalls there is treated as down.
    let preamble = tokio::time::timeout(PREAMBLE_TIMEOUT, async {
        let channel = match &cfg.targets[target].channel {
            Some(shared) => shared.clone(),
            None => connect(cfg, url).await?,
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
        let mut layout = cfg.layout.clone();
        if let Some(l) = layout.as_mut() {
            hello.gpus = l
                .borrow_and_update()
                .iter()
                .map(crate::convert::gpu_info)
                .collect();
        }
        let announced = hello.gpus.iter().map(layout_ids).collect();
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
                // A Welcome above what this spool ever sent renumbers the
                // samples never sent after it (a log on disk that fell
                // behind): they are not the collector's.
                let forgotten = shared.spool().welcomed(w.acked_seq).acked;
                shared.stats.acked.fetch_add(forgotten, Ordering::Relaxed);
                shared.stats.connects.fetch_add(1, Ordering::Relaxed);
                info!(node = %cfg.hello.node_id, collector = %url, collector_version = %w.collector_version, epoch, acked_seq = w.acked_seq, "connected");
            }
            Ok(_) => {
                return Err(Ended::Failed(
                    "collector did not answer the hello with a welcome".into(),
                ));
            }
            Err(status) => return Err(refused(status)),
        }
        Ok(Open {
            target,
            epoch,
            tx,
            inbound,
            layout,
            announced,
        })
    });
    match preamble.await {
        Ok(result) => result,
        Err(_) => Err(Ended::Failed(format!(
            "no welcome from the collector within {}s",
            PREAMBLE_TIMEOUT.as_secs()
        ))),
    }
}

/// A boxed attempt to open a stream to the most preferred collector.
type Probe<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Open, Ended>> + Send + 'a>>;

/// Streams the spool on `open` until it ends.
#[allow(clippy::too_many_arguments)]
async fn stream_on(
    cfg: &StreamConfig,
    shared: &Shared,
    open: Open,
    sampling_done: &mut watch::Receiver<bool>,
    deadline: &mut Option<Instant>,
    backoff: &mut Backoff,
    round: &mut Round,
    serving: &mut Serving,
    jitter: &mut Jitter,
) -> Ended {
    let Open {
        target,
        epoch,
        tx,
        mut inbound,
        mut layout,
        announced,
    } = open;
    let url = &cfg.targets[target].url;
    if let Some(from) = serving.target.filter(|t| *t != target) {
        let switches = shared.stats.switches.fetch_add(1, Ordering::Relaxed) + 1;
        info!(node = %cfg.hello.node_id, from = %cfg.targets[from].url, to = %url, reason = %serving.why, switches, "switched collector");
    }
    serving.target = Some(target);
    let mut progressed = false;
    // While not on the most preferred endpoint: when to try it again, the
    // attempt under way, and a welcomed stream to it waiting for this one
    // to ack what it was sent.
    let failback_every =
        (target != 0 && !cfg.failback_after.is_zero()).then_some(cfg.failback_after);
    let mut failback_at = failback_every.map(|d| Instant::now() + jitter.around(d));
    let mut probe: Option<Probe<'_>> = None;
    let mut handing_over: Option<(Open, Instant)> = None;

    // Everything above `sent` is re-sent on each new connection.
    let mut sent = 0u64;
    loop {
        if let Some((open, until)) = handing_over.take() {
            let settled = !shared.spool().holds_through(sent);
            if settled || Instant::now() >= until {
                if !settled {
                    warn!(collector = %url, "the collector being left did not ack all it was sent in time; the rest goes to the preferred one");
                }
                return Ended::FailBack(Box::new(open));
            }
            handing_over = Some((open, until));
        }
        let mut batch = if handing_over.is_none() {
            shared.spool().after(sent, cfg.batch_max, MAX_BATCH_BYTES)
        } else {
            Vec::new()
        };
        if let Some(l) = layout.as_ref() {
            // Not marked seen: the change still ends the stream below.
            let current = l.borrow();
            if let Some(cut) = batch
                .iter()
                .position(|s| taken_after_hello(s, &announced, &current))
            {
                batch.truncate(cut);
            }
        }
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
        let stall_check = shared.spool().stall_check_in().map(|d| Instant::now() + d);
        let handover_until = handing_over.as_ref().map(|(_, until)| *until);
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
                        if n > 0 {
                            shared.stats.delivered();
                        }
                        if !ack.rejected.is_empty() {
                            shared.stats.rejected(&cfg.hello.node_id, &ack.rejected);
                        }
                        if !progressed {
                            // This endpoint works: the next failure starts
                            // a new round, from the shortest delay.
                            progressed = true;
                            *round = Round::default();
                            backoff.reset();
                        }
                        debug!(collector = %url, acked_seq = ack.acked_seq, forgotten = n, rejected = ack.rejected.len(), "ack");
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    if let Some((open, _)) = handing_over.take() {
                        return Ended::FailBack(Box::new(open));
                    }
                    return Ended::Failed("collector closed the stream".into());
                }
                Err(status) => {
                    if let Some(seq) = metadata_u64(&status, ACCEPTED_SEQ_KEY) {
                        shared.spool().settle(seq);
                    }
                    if let Some((open, _)) = handing_over.take() {
                        return Ended::FailBack(Box::new(open));
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
            result = poll_probe(probe.as_mut()) => {
                probe = None;
                match result {
                    Ok(open) => {
                        info!(node = %cfg.hello.node_id, from = %url, to = %cfg.targets[open.target].url, "the preferred collector welcomed the node; moving back once this one has acked what it was sent");
                        handing_over = Some((open, Instant::now() + HANDOVER_TIMEOUT));
                    }
                    Err(ended) => {
                        let why = match ended {
                            Ended::Failed(e) | Ended::Refused(e) => e,
                            Ended::StaleEpoch { message, .. } => message,
                            _ => "no stream".to_string(),
                        };
                        info!(node = %cfg.hello.node_id, collector = %cfg.targets[0].url, error = %why, "the preferred collector is still unavailable; staying");
                        failback_at = failback_every.map(|d| Instant::now() + jitter.around(d));
                    }
                }
            }
            _ = sleep_until_opt(failback_at), if probe.is_none() && handing_over.is_none() => {
                failback_at = None;
                probe = Some(Box::pin(preamble(cfg, 0, shared)));
            }
            _ = sleep_until_opt(handover_until) => {}
            _ = layout_changed(layout.as_mut()), if handing_over.is_none() => {
                info!(node = %cfg.hello.node_id, collector = %url, "GPU inventory changed (MIG layout); saying Hello again");
                return Ended::Relayout;
            }
            _ = shared.new_sample.notified(), if last.is_none() => {}
            // A disk operation under way that passes the spool's stall
            // bound is noticed then, whatever else happens (the spool is
            // looked at again at the top of the loop).
            _ = sleep_until_opt(stall_check), if last.is_none() => {}
            _ = sampling_done.changed(), if drain_at.is_none() && last.is_none() => {}
            _ = sleep_until_opt(drain_at) => return Ended::DeadlinePassed,
        }
    }
}

/// Resolves once the inventory changes after the stream's Hello; never
/// without a layout to watch (or once its source is gone).
async fn layout_changed(layout: Option<&mut watch::Receiver<Vec<crate::source::GpuInfo>>>) {
    if let Some(l) = layout
        && l.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// The probe's result once it has one; never without a probe.
async fn poll_probe(probe: Option<&mut Probe<'_>>) -> Result<Open, Ended> {
    match probe {
        Some(p) => p.await,
        None => std::future::pending().await,
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

/// Exponential backoff with "full jitter": each delay is uniform in
/// [0, d], where d doubles from `initial` up to `max`. Jitter spreads a
/// fleet's reconnects after a collector restart.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    jitter: Jitter,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self::with_jitter(initial, max, Jitter::new(""))
    }

    pub fn with_jitter(initial: Duration, max: Duration, jitter: Jitter) -> Self {
        Self {
            initial,
            max,
            current: initial,
            jitter,
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
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        self.jitter.full(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_of_a_layout_newer_than_the_hello_waits_for_its_hello() {
        let info = |layout: Option<u64>, earlier: &[u64]| crate::source::GpuInfo {
            index: 0,
            uuid: "GPU-0".into(),
            model: "m".into(),
            power_limit_milliwatts: None,
            memory_total_bytes: None,
            energy_counter_supported: true,
            pci_bus_id: None,
            serial: None,
            driver_version: None,
            multiprocessor_count: None,
            gpu_instance_slice_count: None,
            mig: Vec::new(),
            mig_layout: layout,
            earlier_mig: earlier
                .iter()
                .map(|&id| crate::source::EarlierLayout {
                    id,
                    multiprocessor_count: None,
                    gpu_instance_slice_count: None,
                    mig: Vec::new(),
                })
                .collect(),
        };
        let sample = |stamps: &[Option<u64>]| pb::NodeSample {
            gpus: stamps
                .iter()
                .enumerate()
                .map(|(i, s)| pb::GpuSample {
                    index: i as u32,
                    mig_layout_id: *s,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        // The Hello announced layout 1 on board 0 (and 5 before it);
        // board 1 cannot do MIG.
        let announced = [vec![1, 5], vec![]];
        let held = |stamps: &[Option<u64>], current: &[crate::source::GpuInfo]| {
            taken_after_hello(&sample(stamps), &announced, current)
        };
        // Unchanged since the Hello: everything goes.
        let current = [info(Some(1), &[5]), info(None, &[])];
        assert!(!held(&[Some(1), None], &current));
        assert!(!held(&[Some(5), None], &current));
        // Changed to 2: a sample of layout 2 waits; one of layout 1 or 5,
        // or of an older layout 7 (from a spool), goes out.
        let current = [info(Some(2), &[5, 1]), info(None, &[])];
        assert!(held(&[Some(2), None], &current));
        assert!(!held(&[Some(1), None], &current));
        assert!(!held(&[Some(5), None], &current));
        assert!(!held(&[Some(7), None], &current));
        // Changed twice, 1 -> 2 -> 3, before the stream noticed: a sample
        // of layout 2 waits too (no Hello announced it yet).
        let current = [info(Some(3), &[5, 1, 2]), info(None, &[])];
        assert!(held(&[Some(2), None], &current));
        assert!(held(&[Some(3), None], &current));
        // Unstamped readings (an older source) never wait.
        assert!(!held(&[None, None], &current));
    }

    fn config(targets: &[&str]) -> StreamConfig {
        StreamConfig {
            targets: targets
                .iter()
                .map(|u| Target {
                    url: u.to_string(),
                    channel: None,
                })
                .collect(),
            token: None,
            tls: None,
            tls_domain: None,
            failback_after: Duration::ZERO,
            hello: pb::Hello::default(),
            layout: None,
            batch_max: 1,
            reconnect_initial: Duration::from_millis(1),
            reconnect_max: Duration::from_millis(1),
            drain_timeout: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn a_host_name_is_dialled_at_each_of_its_addresses() {
        // An IP literal is dialled as given; a name becomes one endpoint
        // per address it resolves to.
        let cfg = config(&[]);
        let ip = endpoints(&cfg, "http://127.0.0.1:7070").await.ok().unwrap();
        assert_eq!(ip.len(), 1);
        let named = endpoints(&cfg, "http://localhost:7070").await.ok().unwrap();
        assert!(!named.is_empty());
        for e in &named {
            let host = e.uri().host().unwrap().trim_matches(['[', ']']);
            assert!(host.parse::<std::net::IpAddr>().is_ok(), "{}", e.uri());
            assert_eq!(e.uri().port_u16(), Some(7070));
        }
        let unknown = endpoints(&cfg, "http://no-such-host.invalid:7070").await;
        assert!(matches!(unknown, Err(Ended::Failed(e)) if e.contains("no-such-host.invalid")));
    }

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
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let bounds = [100, 200, 400, 800, 1000, 1000];
        for upper in bounds {
            let d = b.next_delay().as_millis() as u64;
            assert!(d <= upper, "{d} not in [0, {upper}]");
        }
        // The cap holds, and full jitter reaches below half of it.
        let low = (0..200).any(|_| b.next_delay() < Duration::from_millis(500));
        assert!(low, "full jitter, not [d/2, d]");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
