//! Typed internal events: one type per outcome worth counting, whose
//! `emit` both counts it (in [`Counters`], which `/metrics` renders) and
//! logs it. Counters are indexed by the reason enums, not by bare numbers.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tracing::{debug, error, warn};

pub use crate::edge::{MigRefusal, NodePowerReject, Reject};

impl Reject {
    /// Every reason, in the order of `capwatch_collector_samples_total`'s
    /// `reason` label (and of the counters).
    pub const ALL: [Reject; 6] = [
        Reject::GpuIndex,
        Reject::Utilization,
        Reject::Power,
        Reject::Timestamp,
        Reject::Sequence,
        Reject::Malformed,
    ];
}

/// Where a request was refused for who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Grpc = 0,
    Http = 1,
}

impl Surface {
    pub const ALL: [Surface; 2] = [Surface::Grpc, Surface::Http];

    pub fn label(self) -> &'static str {
        match self {
            Surface::Grpc => "grpc",
            Surface::Http => "http",
        }
    }

    /// The reasons a request on this surface can be refused for: HTTP has
    /// no node and no client certificate to check, gRPC no scopes. The
    /// others' series could never move, so `/metrics` leaves them out.
    pub fn reasons(self) -> &'static [AuthReason] {
        match self {
            Surface::Grpc => &[
                AuthReason::Unauthenticated,
                AuthReason::NodeNotAllowed,
                AuthReason::Certificate,
            ],
            Surface::Http => &[AuthReason::Unauthenticated, AuthReason::Forbidden],
        }
    }
}

/// Why a request was refused for who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthReason {
    /// No token, or one the collector does not know.
    Unauthenticated = 0,
    /// An agent token reporting for a node its globs do not match.
    NodeNotAllowed = 1,
    /// A client certificate that does not name the node.
    Certificate = 2,
    /// A tenant token asking for another tenant, or for admin pages.
    Forbidden = 3,
}

impl AuthReason {
    pub const ALL: [AuthReason; 4] = [
        AuthReason::Unauthenticated,
        AuthReason::NodeNotAllowed,
        AuthReason::Certificate,
        AuthReason::Forbidden,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthReason::Unauthenticated => "unauthenticated",
            AuthReason::NodeNotAllowed => "node_not_allowed",
            AuthReason::Certificate => "certificate",
            AuthReason::Forbidden => "forbidden",
        }
    }
}

/// Why a Hello's GPU was refused: its UUID lease names other nodes, or a
/// UUID leased without a node is held by another connected node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimReason {
    LeaseNode = 0,
    HeldByOtherNode = 1,
}

impl ClaimReason {
    pub const ALL: [ClaimReason; 2] = [ClaimReason::LeaseNode, ClaimReason::HeldByOtherNode];

    pub fn label(self) -> &'static str {
        match self {
            ClaimReason::LeaseNode => "lease_node",
            ClaimReason::HeldByOtherNode => "held_by_other_node",
        }
    }
}

/// Why a stream was refused before or at its Hello. Logged with the
/// refusal; `capwatch_collector_streams_refused_total` has no label (the
/// reasons stay out of the metric listing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRefusal {
    /// The collector has its maximum of streams open.
    Capacity,
    /// The first message was not a Hello, or did not come in time.
    NoHello,
    /// The transport failed before the Hello.
    Transport,
    /// Refused for who opened it (see [`AuthRefused`]).
    Auth,
    /// The Hello was refused (`HelloError`).
    Hello,
    /// The node could not be claimed in the ledger.
    Ledger,
    /// The node's claim did not come within the hello timeout.
    ClaimTimeout,
    /// Ledger commits have failed for `shed_streams_after`.
    Shedding,
}

impl StreamRefusal {
    pub fn label(self) -> &'static str {
        match self {
            StreamRefusal::Capacity => "capacity",
            StreamRefusal::NoHello => "no_hello",
            StreamRefusal::Transport => "transport",
            StreamRefusal::Auth => "auth",
            StreamRefusal::Hello => "hello",
            StreamRefusal::Ledger => "ledger",
            StreamRefusal::ClaimTimeout => "claim_timeout",
            StreamRefusal::Shedding => "shedding",
        }
    }
}

/// Number of `serve::HTTP_REFUSALS` (checked there).
pub const HTTP_REFUSAL_KINDS: usize = 2;
/// Number of `serve::HTTP_CLOSES` (checked there).
pub const HTTP_CLOSE_KINDS: usize = 3;

/// The collector's own counters, rendered by `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub duplicate: AtomicU64,
    /// By [`Reject::ALL`].
    rejected: [AtomicU64; Reject::ALL.len()],
    pub streams_refused: AtomicU64,
    /// Streams ended because ledger commits failed for `shed_streams_after`.
    pub streams_shed: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub commits_ok: AtomicU64,
    pub commits_failed: AtomicU64,
    /// Nodes dropped from a commit because another holder claimed them.
    pub nodes_fenced: AtomicU64,
    pub commit_micros: AtomicU64,
    pub compactions_ok: AtomicU64,
    pub compactions_failed: AtomicU64,
    /// Requests refused for who sent them, by surface then reason.
    auth_refused: [[AtomicU64; AuthReason::ALL.len()]; Surface::ALL.len()],
    /// HTTP connections refused at accept, by `serve::HTTP_REFUSALS`.
    pub http_refused: [AtomicU64; HTTP_REFUSAL_KINDS],
    /// HTTP connections the collector closed, by `serve::HTTP_CLOSES`.
    pub http_closed: [AtomicU64; HTTP_CLOSE_KINDS],
    /// HTTP connections open now.
    pub http_open: AtomicU64,
    /// Hellos refused for a leased GPU the node may not report.
    gpu_claims_refused: [AtomicU64; ClaimReason::ALL.len()],
    /// Node power readings applied.
    pub node_power_accepted: AtomicU64,
    /// Node power readings not after their source's previous one.
    pub node_power_duplicate: AtomicU64,
    /// GPUs whose health readings were out of range or malformed and
    /// dropped (their samples kept: `edge::sample_counted`).
    pub gpu_health_dropped: AtomicU64,
    /// Node power readings dropped, by [`NodePowerReject::ALL`].
    node_power_rejected: [AtomicU64; NodePowerReject::ALL.len()],
    /// Boards whose MIG layout a Hello listed and the edge refused (the
    /// board metered whole), by [`MigRefusal::ALL`].
    mig_layouts_refused: [AtomicU64; MigRefusal::ALL.len()],
    /// Board readings stamped with a MIG layout this collector does not
    /// know for the board (metered whole to its UUID).
    pub mig_readings_unsplit: AtomicU64,
    /// How long successful ledger commits took.
    pub commit_seconds: Histogram,
    /// The ledger's watermark (`finalized_through`, Unix seconds) as last
    /// read; 0 until it is.
    pub finalized_through: AtomicI64,
    /// HTTP requests by route.
    pub http_requests: HttpRequests,
}

impl Counters {
    /// Samples rejected for `reason`.
    pub fn rejected(&self, reason: Reject) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    /// Requests refused on `surface` for `reason`.
    pub fn auth_refused(&self, surface: Surface, reason: AuthReason) -> u64 {
        self.auth_refused[surface as usize][reason as usize].load(Ordering::Relaxed)
    }

    /// Node power readings dropped for `reason`.
    pub fn node_power_rejected(&self, reason: NodePowerReject) -> u64 {
        self.node_power_rejected[reason as usize].load(Ordering::Relaxed)
    }

    /// Counts what became of one batch's node power readings; a dropped
    /// reading is logged with its node (its sample is kept).
    pub fn count_node_power(&self, node: &str, accepted: u64, duplicate: u64, rejected: &[u64]) {
        self.node_power_accepted
            .fetch_add(accepted, Ordering::Relaxed);
        self.node_power_duplicate
            .fetch_add(duplicate, Ordering::Relaxed);
        for (reason, n) in NodePowerReject::ALL.iter().zip(rejected) {
            if *n > 0 {
                self.node_power_rejected[*reason as usize].fetch_add(*n, Ordering::Relaxed);
                warn!(node = %node, reason = reason.label(), readings = n, "node power readings dropped (their samples are kept)");
            }
        }
    }

    /// Boards' MIG layouts refused for `reason`.
    pub fn mig_layouts_refused(&self, reason: MigRefusal) -> u64 {
        self.mig_layouts_refused[reason as usize].load(Ordering::Relaxed)
    }

    /// Hellos refused for a GPU claim, for `reason`.
    pub fn gpu_claims_refused(&self, reason: ClaimReason) -> u64 {
        self.gpu_claims_refused[reason as usize].load(Ordering::Relaxed)
    }
}

/// A sample refused, alone (its batch goes on).
#[derive(Debug, Clone, Copy)]
pub struct SampleRejected<'a> {
    pub node: &'a str,
    pub seq: u64,
    pub reason: Reject,
}

impl SampleRejected<'_> {
    pub fn emit(&self, c: &Counters) {
        c.rejected[self.reason as usize].fetch_add(1, Ordering::Relaxed);
        warn!(node = %self.node, seq = self.seq, reason = self.reason.label(), "sample rejected");
    }
}

/// A stream refused before it was admitted. The site logs what the agent
/// is told (some refusals once per node); this logs the reason at debug.
#[derive(Debug, Clone, Copy)]
pub struct StreamRefused<'a> {
    pub reason: StreamRefusal,
    pub message: &'a str,
}

impl StreamRefused<'_> {
    pub fn emit(&self, c: &Counters) {
        c.streams_refused.fetch_add(1, Ordering::Relaxed);
        debug!(
            reason = self.reason.label(),
            message = self.message,
            "stream refused"
        );
    }
}

/// A request refused for who sent it.
#[derive(Debug, Clone, Copy)]
pub struct AuthRefused<'a> {
    pub surface: Surface,
    pub reason: AuthReason,
    /// The node a gRPC stream reports for, once known.
    pub node: Option<&'a str>,
}

impl AuthRefused<'_> {
    pub fn emit(&self, c: &Counters) {
        c.auth_refused[self.surface as usize][self.reason as usize].fetch_add(1, Ordering::Relaxed);
        debug!(
            surface = self.surface.label(),
            reason = self.reason.label(),
            node = self.node,
            "request refused for who sent it"
        );
    }
}

/// A Hello refused for a leased GPU the node may not report.
#[derive(Debug, Clone, Copy)]
pub struct GpuClaimRefused<'a> {
    pub reason: ClaimReason,
    pub node: &'a str,
    pub uuid: &'a str,
}

impl GpuClaimRefused<'_> {
    pub fn emit(&self, c: &Counters) {
        c.gpu_claims_refused[self.reason as usize].fetch_add(1, Ordering::Relaxed);
        debug!(reason = self.reason.label(), node = ?self.node, gpu = ?self.uuid, "GPU claim refused");
    }
}

/// A board's MIG layout refused at a Hello (the Hello admitted, the
/// board metered whole to its own UUID). `check_hello` logged it with the
/// node and GPU index; this counts it and logs the board once more at
/// debug.
#[derive(Debug, Clone, Copy)]
pub struct MigLayoutRefused<'a> {
    pub reason: MigRefusal,
    pub node: &'a str,
    pub uuid: &'a str,
}

impl MigLayoutRefused<'_> {
    pub fn emit(&self, c: &Counters) {
        c.mig_layouts_refused[self.reason as usize].fetch_add(1, Ordering::Relaxed);
        debug!(reason = self.reason.label(), node = ?self.node, gpu = ?self.uuid, "MIG layout refused");
    }
}

/// A ledger commit that failed; its batches go into the next one.
#[derive(Clone, Copy)]
pub struct CommitFailed<'a> {
    pub error: &'a dyn Display,
}

impl CommitFailed<'_> {
    pub fn emit(&self, c: &Counters) {
        c.commits_failed.fetch_add(1, Ordering::Relaxed);
        error!(task = "committer", error = %self.error, "ledger commit failed; retrying with the next one, acks held");
    }
}

/// A node dropped from a ledger commit that was refused because another
/// holder has since claimed it: nothing of the node from this collector
/// is written, its streams end (the agent says Hello again, and is
/// claimed back from the ledger's cursor), the rest is committed.
#[derive(Debug, Clone, Copy)]
pub struct NodeFenced<'a> {
    pub node: &'a str,
    /// Who holds the node now, and its generation.
    pub holder: &'a str,
    pub generation: u64,
}

impl NodeFenced<'_> {
    pub fn emit(&self, c: &Counters) {
        c.nodes_fenced.fetch_add(1, Ordering::Relaxed);
        warn!(task = "committer", node = %self.node, holder = %self.holder, generation = self.generation, "commit fenced: another collector claimed the node; its bookings are dropped and its stream ends");
    }
}

/// A ledger compaction that failed; the next minute's tries again.
#[derive(Clone, Copy)]
pub struct CompactionFailed<'a> {
    pub error: &'a dyn Display,
    /// The compaction task itself failed (panicked), not the ledger.
    pub task_died: bool,
}

impl CompactionFailed<'_> {
    pub fn emit(&self, c: &Counters) {
        c.compactions_failed.fetch_add(1, Ordering::Relaxed);
        let e = self.error;
        if self.task_died {
            error!(task = "compactor", error = %e, "ledger compaction task failed");
        } else {
            error!(task = "compactor", error = %e, "ledger compaction failed; retrying next minute");
        }
    }
}

/// What failed to reload; the previous version stays in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadFailure {
    /// The tenant file could not be read or parsed.
    TenantFile,
    /// The new tenant file version could not be recorded in the ledger.
    TenantVersion,
    /// The auth file could not be read or parsed.
    AuthFile,
}

/// A reload (SIGHUP) that failed.
#[derive(Clone, Copy)]
pub struct ReloadFailed<'a> {
    pub what: ReloadFailure,
    pub error: &'a dyn Display,
}

impl ReloadFailed<'_> {
    pub fn emit(&self, c: &Counters) {
        c.reloads_failed.fetch_add(1, Ordering::Relaxed);
        let e = self.error;
        match self.what {
            ReloadFailure::TenantFile => {
                error!(task = "reloader", error = %e, "tenant file reload failed; keeping the previous tenants")
            }
            ReloadFailure::TenantVersion => {
                error!(task = "reloader", error = %e, "recording the tenant file version failed; keeping the previous tenants")
            }
            ReloadFailure::AuthFile => {
                error!(task = "reloader", error = %e, "auth file reload failed; keeping the previous tokens")
            }
        }
    }
}

/// Upper bounds (seconds) of the duration histograms' buckets: a
/// millisecond to ten seconds, the range of a ledger commit and of an HTTP
/// request under a request timeout.
pub const DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of durations over [`DURATION_BUCKETS`], lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), the last one above every
    /// bound.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// A histogram as read at one moment: cumulative counts per bound.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramView {
    /// (upper bound, observations at or below it), without `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The cumulative view `/metrics` renders. Read without a lock, so a
    /// scrape racing an observation may see it in the count and not yet
    /// in a bucket; the total is the buckets' sum, so the `+Inf` bucket
    /// and `_count` always agree.
    pub fn view(&self) -> HistogramView {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(DURATION_BUCKETS.len());
        for (bound, n) in DURATION_BUCKETS.iter().zip(&self.buckets) {
            total += n.load(Ordering::Relaxed);
            buckets.push((*bound, total));
        }
        total += self.buckets[DURATION_BUCKETS.len()].load(Ordering::Relaxed);
        HistogramView {
            buckets,
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: total,
        }
    }
}

/// The HTTP methods counted by name; any other is `other` (a method is
/// whatever token a client sends, and would otherwise be a label value
/// without bound).
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];

/// A route label for requests that matched no route (one value for every
/// unknown path, never the path itself).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// HTTP requests counted by (route template, method, status code), and
/// their durations by route. Routes are the router's templates
/// (`/v1/tenants/{id}/usage`), so the label values are bounded by the code.
#[derive(Debug, Default)]
pub struct HttpRequests(Mutex<BTreeMap<String, RouteRequests>>);

#[derive(Debug, Default)]
struct RouteRequests {
    /// By (method, status code).
    counts: BTreeMap<(&'static str, u16), u64>,
    duration: Histogram,
}

/// One route's figures as read at one moment.
#[derive(Debug)]
pub struct RouteView {
    pub route: String,
    /// (method, status code, requests).
    pub counts: Vec<(&'static str, u16, u64)>,
    pub duration: HistogramView,
}

impl HttpRequests {
    /// Counts one request, answered with `status` after `took`. `route`
    /// is a template the router declared or [`UNMATCHED_ROUTE`], never a
    /// request's path.
    pub fn observe(&self, route: &str, method: &str, status: u16, took: Duration) {
        let method = METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("other");
        let mut routes = crate::sync::lock(&self.0);
        if !routes.contains_key(route) {
            routes.insert(route.to_owned(), RouteRequests::default());
        }
        let r = routes
            .get_mut(route)
            .expect("inserted just before, under the same lock");
        *r.counts.entry((method, status)).or_default() += 1;
        r.duration.observe(took);
    }

    /// Every route seen so far, in route order.
    pub fn view(&self) -> Vec<RouteView> {
        crate::sync::lock(&self.0)
            .iter()
            .map(|(route, r)| RouteView {
                route: route.clone(),
                counts: r.counts.iter().map(|((m, s), n)| (*m, *s, *n)).collect(),
                duration: r.duration.view(),
            })
            .collect()
    }
}
