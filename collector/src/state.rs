//! The collector's live state: one entry per node, owned by that node's
//! stream, plus per-tenant totals.
//!
//! *Invariant:* a sample is counted once. Each node remembers the highest
//! (epoch, seq) it accepted; a sample at or below it is a duplicate and
//! changes nothing. Energy is only ever added from an accepted sample.
//!
//! *Invariant:* a GPU's energy is the sum of the deltas of its hardware
//! counter between consecutive accepted samples. A counter that goes
//! backwards (driver reload) contributes its new value, the energy since
//! the reload, never a negative delta; a delta (or a new value after a
//! reload) beyond 3× the power limit over the time that can have passed is
//! counted as a reset and contributes the power integral instead; but a
//! reading stamped at or before one already applied, with its counter
//! behind that one's by no more than 3× the power limit over the time
//! between their timestamps (an earlier reading of the same counter, not
//! a reload), is stale and contributes nothing, the baseline staying where
//! it was. That
//! time is the longest of the agent's timestamps, the collector's receipt
//! times and the samples since at the nominal interval (see `Gpu::vouch`),
//! so an agent clock that stands still or steps back never voids a real
//! delta. A GPU without a counter contributes the exact integral of its
//! reported power over time, kept in milliwatt-nanoseconds so that no
//! rounding error accumulates; power stands for at most the staleness
//! window before its reading, and the rest of a longer gap is missing
//! time, not energy.
//!
//! Locking: the node map is locked only to find or add a node; each node's
//! own mutex is taken once per batch by its stream task, and briefly by
//! `/metrics` rendering. Tenant totals are locked once per batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::auth::Auth;
use crate::ledger::{BucketDelta, Commit, GpuCursor, NodeCursor, Snapshot, split_by_minute};
use crate::model::{GpuReading, HostReading, NodeSample, Reject};
use crate::tenants::{TenantHistory, Tenants, UNASSIGNED};

const NANOS_PER_SECOND: u128 = 1_000_000_000;

/// Largest step between sequence numbers: more than any spool holds.
pub const MAX_SEQ_JUMP: u64 = 10_000_000;

/// Longest interval whose energy is spread over minute buckets; a longer
/// one (a GPU back after weeks) is spread over its last seven days, so one
/// reading cannot create an unbounded number of buckets.
pub(crate) const MAX_SPREAD: Duration = Duration::from_secs(7 * 86_400);
const MAX_SPREAD_NANOS: i64 = MAX_SPREAD.as_nanos() as i64;

/// Largest power limit accepted from an agent: 10 kW, above any GPU board.
pub const MAX_POWER_LIMIT_MILLIWATTS: u64 = 10_000_000;

/// A string that ends up in a label: at most 128 bytes, no control
/// characters, at least `min` bytes.
fn label_ok(s: &str, min: usize) -> bool {
    (min..=128).contains(&s.len()) && !s.chars().any(char::is_control)
}

/// Locks a mutex, recovering from poisoning: every critical section here
/// leaves the data consistent before anything that could panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub stale_after: Option<Duration>,
    pub max_gpus_per_node: u32,
    /// How far ahead of the collector's clock a sample may be stamped.
    pub max_clock_skew: Duration,
    /// How far behind the collector's clock a sample may be stamped.
    pub max_sample_age: Duration,
}

/// Static facts about a GPU, from the Hello.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub uuid: String,
    pub model: String,
    pub power_limit_milliwatts: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub energy_counter_supported: bool,
}

#[derive(Debug, Clone)]
pub struct Hello {
    pub node_id: String,
    pub agent_version: String,
    pub epoch: u64,
    pub interval: Duration,
    pub gpus: Vec<GpuInfo>,
}

#[derive(Debug)]
pub struct Gpu {
    pub uuid: Arc<str>,
    pub model: Arc<str>,
    pub power_limit_milliwatts: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub energy_counter_supported: bool,
    pub tenant: Arc<str>,
    pub last: Option<GpuReading>,
    pub last_timestamp: Option<i64>,
    last_counter: Option<u64>,
    /// Sequence number of the sample that last moved `last_counter` and
    /// `last_timestamp`: the next reading follows it by this many samples.
    last_seq: Option<u64>,
    /// The moment up to which this GPU's readings have used time, which
    /// the plausibility bound measures from: the newest timestamp, or
    /// beyond it as far as counter deltas needed the time `vouch` offered
    /// (never beyond what a timestamp may claim).
    vouched_ns: Option<i64>,
    /// The timestamp of the reading that last moved the baseline, as
    /// stamped (`last_timestamp` is the newest one).
    stamped_ns: Option<i64>,
    /// Energy since this collector first saw the GPU.
    pub energy_millijoules: u64,
    /// Below one second's worth of nanoseconds (fits 32 bits).
    remainder_milliwatt_nanos: u64,
    pub last_receipt: Option<Instant>,
    /// When `last` was sampled, by its own timestamp, on the collector's
    /// monotonic clock: its receipt less its age then (never after the
    /// receipt). `None` when it was too old for the clock to hold.
    pub sampled_at: Option<Instant>,
    pub counter_resets: u64,
    /// Take the next timestamp as the reference even if it is older (set
    /// when a new agent epoch starts).
    reanchor: bool,
}

impl Gpu {
    fn new(info: GpuInfo, model: Arc<str>, tenant: Arc<str>) -> Self {
        Self {
            uuid: Arc::from(info.uuid),
            model,
            power_limit_milliwatts: info.power_limit_milliwatts,
            memory_total_bytes: info.memory_total_bytes,
            energy_counter_supported: info.energy_counter_supported,
            tenant,
            last: None,
            last_timestamp: None,
            last_counter: None,
            last_seq: None,
            vouched_ns: None,
            stamped_ns: None,
            energy_millijoules: 0,
            remainder_milliwatt_nanos: 0,
            last_receipt: None,
            sampled_at: None,
            counter_resets: 0,
            reanchor: false,
        }
    }

    /// Folds one accepted reading in; returns the energy it adds (mJ) and
    /// the interval it covers.
    fn apply(&mut self, r: GpuReading, t: &Tick) -> Applied {
        let timestamp = t.timestamp_ns;
        let prev_receipt = self.last_receipt.replace(t.now);
        // The interval ends at the sample's timestamp, or at the GPU's
        // newest one when the sample's is not after it (a clock that stood
        // still or stepped back): what it adds is booked after everything
        // booked before, once.
        let to_ns = match self.last_timestamp {
            Some(prev) if !self.reanchor => prev.max(timestamp),
            _ => timestamp,
        };
        let nothing = Applied {
            energy_mj: 0,
            estimated_ns: None,
            from_ns: None,
            to_ns,
            utilization_percent: None,
        };
        if r.lost {
            // Keep the last counter and timestamp: when the GPU answers
            // again, its next delta carries the energy of the gap.
            self.last = Some(r);
            return nothing;
        }
        if let Some(limit) = r.power_limit_milliwatts {
            self.power_limit_milliwatts = Some(limit);
        }
        let dt_nanos = match self.last_timestamp {
            Some(prev) if timestamp > prev => (timestamp - prev) as u128,
            _ => 0,
        };
        // Power stands for at most the staleness window before the
        // reading: the rest of a longer gap is missing time, not energy.
        let estimate_nanos = dt_nanos.min(t.window.as_nanos());
        // The most a GPU can plausibly use since the previous reading: three
        // times its power limit (3 kW when unknown) over the time that can
        // have passed, plus a joule of slack for counter and clock
        // granularity. That time is the longer of what the readings vouch
        // for (`vouch`) and the collector's time between their receipts, so
        // an agent clock that stands still or steps back, even within one
        // batch, does not void real energy.
        let vouched = self.vouch(t);
        let vouched_from = self.vouched_ns.or(self.last_timestamp);
        let vouched_nanos = match vouched_from {
            Some(prev) => u128::try_from(vouched.saturating_sub(prev)).unwrap_or(0),
            None => 0,
        };
        let since_receipt =
            prev_receipt.map_or(0, |p| t.now.saturating_duration_since(p).as_nanos());
        let limit = self.power_limit_milliwatts.unwrap_or(1_000_000);
        let plausible =
            u128::from(limit) * 3 * vouched_nanos.max(since_receipt) / NANOS_PER_SECOND + 1_000;
        let first = self.last.is_none();
        // (energy, whether it was integrated from power)
        let (delta, estimated) = match (r.energy_millijoules, self.last_counter) {
            (Some(now_mj), Some(prev))
                if now_mj >= prev && u128::from(now_mj - prev) <= plausible =>
            {
                (now_mj - prev, false)
            }
            (Some(now_mj), Some(prev))
                if now_mj < prev
                    && self.last_timestamp.is_some_and(|p| {
                        timestamp <= p
                            && u128::from(prev - now_mj)
                                <= u128::from(limit)
                                    * 3
                                    * u128::try_from(p - timestamp).unwrap_or(0)
                                    / NANOS_PER_SECOND
                                    + 1_000
                    }) =>
            {
                // A reading stamped before one already applied, its
                // counter behind that one's by what the GPU can draw in
                // between (not a reload, which restarts near 0): an earlier
                // reading of the same counter, from another agent instance
                // for the node that moved above the epoch that refused it.
                // Checked before a reload: soon after a driver load the
                // counter is small enough to pass for one.
                // It adds nothing and moves nothing back, so the energy
                // since is counted once.
                return nothing;
            }
            (Some(now_mj), Some(prev)) if now_mj < prev && u128::from(now_mj) <= plausible => {
                // The counter went backwards: the driver was reloaded (a
                // reboot) within the interval, and the counter holds what
                // the GPU used since. Count that and go on from there.
                self.counter_resets += 1;
                (now_mj, false)
            }
            (Some(_), Some(_)) => {
                // The counter jumped further than the GPU could draw, or
                // reset to more than the interval allows: count this
                // interval from power and start again from the new value.
                self.counter_resets += 1;
                (self.integrate(r.power_milliwatts, estimate_nanos), true)
            }
            // First counter reading: a baseline, unless earlier readings
            // (without counter) leave an interval to cover.
            (Some(_), None) if first => (0, false),
            (None, Some(_)) => {
                // The counter could not be read this time. Keep the last
                // reading and its timestamp: the next counter delta covers
                // this interval exactly, once.
                self.last = Some(r);
                return nothing;
            }
            _ => (self.integrate(r.power_milliwatts, estimate_nanos), true),
        };
        let reanchored = std::mem::take(&mut self.reanchor);
        // The interval this reading closes; after an agent restart too, as
        // long as the new run's clock is not behind the old one's.
        let from_ns = self.last_timestamp.filter(|prev| *prev < timestamp);
        if reanchored || self.last_timestamp.is_none_or(|prev| timestamp > prev) {
            self.last_timestamp = Some(timestamp);
        }
        // Time vouched for beyond the sample's own timestamp is used up only
        // as far as a believed delta needed it at 3× the limit: a clock
        // behind that steps forward vouches for its jump too, and the rest
        // stays for the readings after it instead of filling the cap (a
        // spool of them would find none left).
        self.vouched_ns = Some(match vouched_from {
            None => timestamp,
            Some(prev) if estimated => timestamp.max(prev),
            Some(prev) => {
                let need = u128::from(delta.saturating_sub(1_000)) * NANOS_PER_SECOND;
                let per_ns = u128::from(limit) * 3;
                let own = u128::try_from(timestamp.saturating_sub(prev)).unwrap_or(0);
                if need <= per_ns * own {
                    timestamp.max(prev)
                } else {
                    let needed = i64::try_from(need.div_ceil(per_ns)).unwrap_or(i64::MAX);
                    prev.saturating_add(needed).min(vouched).max(timestamp)
                }
            }
        });
        self.stamped_ns = Some(timestamp);
        self.last_seq = Some(t.seq);
        if r.energy_millijoules.is_some() {
            self.last_counter = r.energy_millijoules;
        }
        self.energy_millijoules = self.energy_millijoules.saturating_add(delta);
        let utilization_percent = r.utilization_percent;
        self.last = Some(r);
        Applied {
            energy_mj: delta,
            // Below the staleness window, so it fits.
            estimated_ns: estimated.then(|| u64::try_from(estimate_nanos).unwrap_or(u64::MAX)),
            from_ns,
            to_ns,
            utilization_percent,
        }
    }

    /// The latest moment the readings can vouch for once `t` is in: the
    /// vouched moment plus the samples since the GPU's last reading at the
    /// nominal interval, or plus how far the clock ran since that reading
    /// if that is more (a clock that stands still or stepped back), and at
    /// least the sample's timestamp; but never beyond the latest timestamp
    /// a sample may carry now, so that leaping sequence numbers or
    /// timestamps vouch for no more time than a timestamp could claim.
    /// `apply` keeps of it only what the delta used.
    fn vouch(&self, t: &Tick) -> i64 {
        let Some(prev) = self.vouched_ns.or(self.last_timestamp) else {
            return t.timestamp_ns;
        };
        let samples = match self.last_seq {
            // A new epoch numbers its samples from 1.
            _ if self.reanchor => t.seq.max(1),
            Some(last) if t.seq > last => t.seq - last,
            _ => 1,
        };
        let nominal =
            i64::try_from(u128::from(samples) * t.interval.as_nanos()).unwrap_or(i64::MAX);
        // A clock behind the vouched moment may still run (it stepped
        // back): a sample it stamps late, after a stall, stands for that.
        let ran = self
            .stamped_ns
            .map_or(0, |s| t.timestamp_ns.saturating_sub(s).max(0));
        prev.saturating_add(nominal.max(ran))
            .min(t.latest_ns)
            .max(prev)
            .max(t.timestamp_ns)
    }

    /// The counting state the ledger keeps for this GPU.
    fn cursor(&self) -> GpuCursor {
        GpuCursor {
            last_counter_mj: self.last_counter,
            last_timestamp_ns: self.last_timestamp,
            // Below one second's worth of nanoseconds by construction.
            remainder_mw_ns: self.remainder_milliwatt_nanos,
            energy_mj: self.energy_millijoules,
            counter_resets: self.counter_resets,
        }
    }

    /// A GPU known only from the ledger, until its node says Hello.
    fn resumed(uuid: &str, c: &GpuCursor) -> Self {
        let mut g = Gpu::new(
            GpuInfo {
                uuid: uuid.to_string(),
                model: String::new(),
                power_limit_milliwatts: None,
                memory_total_bytes: None,
                energy_counter_supported: c.last_counter_mj.is_some(),
            },
            Arc::from(""),
            Arc::from(UNASSIGNED),
        );
        g.last_counter = c.last_counter_mj;
        g.last_timestamp = c.last_timestamp_ns;
        g.remainder_milliwatt_nanos = c.remainder_mw_ns;
        g.energy_millijoules = c.energy_mj;
        g.counter_resets = c.counter_resets;
        g
    }
}

/// One sample, as a GPU reading in it sees it: when it was taken, where
/// in its stream, and what the collector knows of that moment.
#[derive(Debug, Clone, Copy)]
struct Tick {
    /// The sample's timestamp (the agent's clock).
    timestamp_ns: i64,
    seq: u64,
    /// When its batch arrived (the collector's clock).
    now: Instant,
    /// The latest timestamp a sample may carry now: the collector's clock
    /// plus the allowed skew.
    latest_ns: i64,
    /// The node's nominal sampling interval, from its Hello.
    interval: Duration,
    /// The staleness window: the most time one reading's power stands for.
    window: Duration,
}

/// What one reading added.
#[derive(Debug, Clone, Copy)]
struct Applied {
    energy_mj: u64,
    /// Where the energy was integrated from power instead of read from a
    /// counter: the stretch before `to_ns` it stands for (at most the
    /// staleness window).
    estimated_ns: Option<u64>,
    /// Start of the interval the reading covers; `None` when it covers no
    /// interval.
    from_ns: Option<i64>,
    /// End of the interval: the sample's timestamp, or the GPU's newest
    /// timestamp when the sample's is not after it.
    to_ns: i64,
    utilization_percent: Option<u32>,
}

/// The minute buckets one batch of one node adds to, per (tenant,
/// minute), before they go into the pending commit.
///
/// A batch touches few buckets (one tenant and one minute, mostly), so the
/// first ones are found by comparing pointers instead of hashing two
/// strings per GPU reading; a batch that spreads a long gap over many
/// minutes goes on in a map.
#[derive(Debug, Default)]
struct Booking {
    few: Vec<(Arc<str>, i64, BucketDelta)>,
    many: HashMap<(Arc<str>, i64), BucketDelta>,
}

impl Booking {
    const FEW: usize = 8;

    fn bucket(&mut self, tenant: &Arc<str>, minute: i64) -> &mut BucketDelta {
        let found = self
            .few
            .iter()
            .position(|(t, m, _)| *m == minute && Arc::ptr_eq(t, tenant));
        match found {
            Some(i) => &mut self.few[i].2,
            None if self.few.len() < Self::FEW => {
                self.few
                    .push((tenant.clone(), minute, BucketDelta::default()));
                &mut self.few.last_mut().expect("just pushed").2
            }
            None => self.many.entry((tenant.clone(), minute)).or_default(),
        }
    }

    /// Adds everything booked to `c`'s buckets of `node`.
    fn into_commit(self, c: &mut Commit, node: &Arc<str>) {
        let all = self
            .few
            .into_iter()
            .chain(self.many.into_iter().map(|((t, m), d)| (t, m, d)));
        for (tenant, minute, d) in all {
            c.buckets
                .entry((tenant, node.clone(), minute))
                .or_default()
                .add(&d);
        }
    }
}

impl Applied {
    /// Adds this reading's energy and GPU time to the minute buckets of
    /// `tenant`. GPU time counts only what a reading backs: a counter
    /// delta's interval when it lies within the staleness window (a longer
    /// gap carries energy but is not coverage), an estimate from power the
    /// stretch it stands for, which also holds its energy.
    fn book(&self, b: &mut Booking, tenant: &Arc<str>, window: Duration) {
        let to_ns = self.to_ns;
        let from = self.from_ns.unwrap_or(to_ns).max(to_ns - MAX_SPREAD_NANOS);
        let span = u64::try_from(to_ns - from).unwrap_or(0);
        let (backed_from, covered) = match self.estimated_ns {
            Some(stretch) => {
                let stretch = stretch.min(span);
                (to_ns - stretch as i64, stretch)
            }
            None if u128::from(span) <= window.as_nanos() => (from, span),
            None => (from, 0),
        };
        let util = u64::from(self.utilization_percent.unwrap_or(0).min(100));
        let busy = covered / 100 * util + covered % 100 * util / 100;
        let minute = to_ns.div_euclid(60_000_000_000) * 60;
        // The common case, an interval inside one minute: one bucket
        // update instead of one per figure.
        if from.div_euclid(60_000_000_000) * 60 == minute {
            let d = b.bucket(tenant, minute);
            d.energy_mj += self.energy_mj;
            if self.estimated_ns.is_some() {
                d.estimated_mj += self.energy_mj;
            }
            d.gpu_ns += covered;
            d.busy_gpu_ns += busy;
            d.expected_gpu_ns += span;
            d.samples += 1;
            return;
        }
        let mut add = |amount: u64, from: i64, field: fn(&mut BucketDelta) -> &mut u64| {
            if amount == 0 {
                return;
            }
            for (minute, part) in split_by_minute(amount, from, to_ns) {
                *field(b.bucket(tenant, minute)) += part;
            }
        };
        add(self.energy_mj, backed_from, |d| &mut d.energy_mj);
        if self.estimated_ns.is_some() {
            add(self.energy_mj, backed_from, |d| &mut d.estimated_mj);
        }
        add(covered, backed_from, |d| &mut d.gpu_ns);
        add(busy, backed_from, |d| &mut d.busy_gpu_ns);
        add(span, from, |d| &mut d.expected_gpu_ns);
        b.bucket(tenant, minute).samples += 1;
    }
}

impl Gpu {
    /// Exact integral of `power` over `dt`, carrying the sub-millijoule
    /// remainder to the next call.
    fn integrate(&mut self, power_milliwatts: Option<u64>, dt_nanos: u128) -> u64 {
        let Some(p) = power_milliwatts else { return 0 };
        let total = u128::from(self.remainder_milliwatt_nanos) + u128::from(p) * dt_nanos;
        // Below NANOS_PER_SECOND, so it fits.
        self.remainder_milliwatt_nanos = (total % NANOS_PER_SECOND) as u64;
        u64::try_from(total / NANOS_PER_SECOND).unwrap_or(u64::MAX)
    }

    /// Whether the GPU's last reading is live at `now`: sampled, by its
    /// own timestamp, within `window` (so received within it too) and not
    /// lost. A reading that arrives late (a replayed spool) is not live.
    pub fn fresh(&self, now: Instant, window: Duration) -> bool {
        sampled_within(self.sampled_at, now, window) && self.last.as_ref().is_some_and(|r| !r.lost)
    }
}

/// Whether `sampled_at` is at most `window` before `now`.
fn sampled_within(sampled_at: Option<Instant>, now: Instant, window: Duration) -> bool {
    sampled_at.is_some_and(|t| now.saturating_duration_since(t) <= window)
}

/// When a sample stamped `timestamp_ns` was taken, on the monotonic clock,
/// given that it arrived at `now` (`now_ns` on the wall clock): `now` less
/// its age, `now` for one stamped ahead; `None` when older than the clock
/// reaches back.
fn sampled_at(timestamp_ns: i64, now: Instant, now_ns: i64) -> Option<Instant> {
    let age = u64::try_from(now_ns.saturating_sub(timestamp_ns)).unwrap_or(0);
    now.checked_sub(Duration::from_nanos(age))
}

/// Fields in declaration order (`repr(C)`): what a tenant-level scrape
/// reads of every node comes first, so that with the lock word it lies in
/// the first two cache lines of the allocation.
#[derive(Debug)]
#[repr(C)]
pub struct Node {
    /// Whether `live` may be read; false when some GPU's freshness differs
    /// from the node's (see `Node::summarize`).
    live_valid: bool,
    pub last_receipt: Option<Instant>,
    /// When the node's latest accepted sample was taken, by its own
    /// timestamp (`Gpu::sampled_at`): its GPUs are live only while this
    /// is within the staleness window.
    sampled_at: Option<Instant>,
    pub interval: Duration,
    /// What the node's GPUs add to each tenant's live figures while the
    /// node is up, computed once per batch: the first tenant inline, any
    /// others in `live_rest`.
    live_first: Option<(Arc<str>, TenantLive)>,
    live_rest: Vec<(Arc<str>, TenantLive)>,
    pub id: Arc<str>,
    /// Tenant label of the node as a whole: the tenant of all its GPUs when
    /// they agree, else the tenant leasing the node by name.
    pub tenant: Arc<str>,
    pub agent_version: String,
    pub epoch: u64,
    pub last_seq: u64,
    generation: u64,
    pub connected: bool,
    pub samples_accepted: u64,
    pub last_timestamp: i64,
    pub host: Option<HostReading>,
    pub gpus: Vec<Gpu>,
    /// GPUs the node announced before but not in its latest inventory;
    /// kept so their counters resume if they come back.
    departed: Vec<Gpu>,
    /// The ledger commit holding the node's latest batch: what a Welcome
    /// must wait for.
    last_commit_id: u64,
    /// [from, until) (Unix nanoseconds) of the tenant file version the
    /// GPUs' `tenant` comes from: a sample stamped inside it is booked to
    /// `tenant` with no lookup.
    tenants_span: (i64, i64),
}

impl Node {
    /// A node with no stream yet, resuming at (epoch, last_seq).
    fn new(id: Arc<str>, epoch: u64, last_seq: u64, interval: Duration) -> Self {
        Self {
            id,
            tenant: Arc::from(UNASSIGNED),
            agent_version: String::new(),
            interval,
            epoch,
            last_seq,
            generation: 0,
            connected: false,
            samples_accepted: 0,
            last_receipt: None,
            sampled_at: None,
            last_timestamp: 0,
            host: None,
            gpus: Vec::new(),
            departed: Vec::new(),
            last_commit_id: 0,
            tenants_span: (i64::MIN, i64::MAX),
            live_valid: true,
            live_first: None,
            live_rest: Vec::new(),
        }
    }

    /// How long without a sample before this node's GPUs are stale.
    pub fn stale_window(&self, configured: Option<Duration>) -> Duration {
        configured.unwrap_or(self.interval * 3)
    }

    /// How long since the node's last sample arrived; `None` before the
    /// first.
    pub fn silent_for(&self, now: Instant) -> Option<Duration> {
        self.last_receipt.map(|t| now.saturating_duration_since(t))
    }

    /// Whether samples arrive from the node: its last one is at most
    /// `window` old (`capwatch_node_up`, the status page's stale nodes).
    pub fn up(&self, now: Instant, window: Duration) -> bool {
        self.silent_for(now).is_some_and(|d| d <= window)
    }

    /// Attributes the GPUs by `tenants`, the version in force over `span`.
    fn attribute(&mut self, tenants: &Tenants, span: (i64, i64)) {
        self.tenants_span = span;
        let all = tenants.all();
        for g in &mut self.gpus {
            g.tenant = all[tenants.attribute(&self.id, &g.uuid)].id.clone();
        }
        self.tenant = match self.gpus.first() {
            Some(first) if self.gpus.iter().all(|g| g.tenant == first.tenant) => {
                first.tenant.clone()
            }
            _ => all[tenants.attribute_node(&self.id)].id.clone(),
        };
        self.summarize();
    }

    /// Sums the GPUs into `live`, per tenant, for a tenant-level scrape
    /// that then reads one entry per node instead of walking every GPU.
    ///
    /// *Invariant:* equal to `walk_live` at any later moment until the
    /// node's GPUs change (after which this runs again). It holds because
    /// every GPU that counts as reporting here was last heard at the
    /// node's last receipt, in its latest sample, so it is fresh exactly
    /// when that sample is; a GPU last heard earlier (left out of later
    /// samples) would go stale at its own moment, and then there is no
    /// summary.
    fn summarize(&mut self) {
        let at = self.last_receipt;
        self.live_first = None;
        self.live_rest.clear();
        self.live_valid = false;
        for g in &self.gpus {
            let reading = g.last.as_ref().filter(|r| !r.lost);
            let one = match (g.last_receipt, reading) {
                (Some(t), Some(r)) if Some(t) == at && g.sampled_at == self.sampled_at => {
                    TenantLive::of(r)
                }
                (Some(_), Some(_)) => return,
                _ => TenantLive {
                    stale: 1,
                    ..TenantLive::default()
                },
            };
            match &mut self.live_first {
                Some((t, p)) if Arc::ptr_eq(t, &g.tenant) => p.add(&one),
                None => self.live_first = Some((g.tenant.clone(), one)),
                Some(_) => match self
                    .live_rest
                    .iter_mut()
                    .find(|(t, _)| Arc::ptr_eq(t, &g.tenant))
                {
                    Some((_, p)) => p.add(&one),
                    None => self.live_rest.push((g.tenant.clone(), one)),
                },
            }
        }
        self.live_valid = true;
    }

    /// Calls `add` with what the node's GPUs add to each tenant's live
    /// figures at `now`: from the summary when there is one, else GPU by
    /// GPU.
    pub fn live(
        &self,
        now: Instant,
        window: Duration,
        mut add: impl FnMut(&Arc<str>, &TenantLive),
    ) {
        if !self.live_valid {
            return self.walk_live(now, window, add);
        }
        let up = sampled_within(self.sampled_at, now, window);
        for (tenant, part) in self.live_first.iter().chain(&self.live_rest) {
            if up {
                add(tenant, part);
            } else {
                add(
                    tenant,
                    &TenantLive {
                        stale: part.reporting + part.stale,
                        ..TenantLive::default()
                    },
                );
            }
        }
    }

    /// `live`, GPU by GPU.
    fn walk_live(
        &self,
        now: Instant,
        window: Duration,
        mut add: impl FnMut(&Arc<str>, &TenantLive),
    ) {
        for g in &self.gpus {
            let one = match &g.last {
                Some(r) if g.fresh(now, window) => TenantLive::of(r),
                _ => TenantLive {
                    stale: 1,
                    ..TenantLive::default()
                },
            };
            add(&g.tenant, &one);
        }
    }
}

/// Per-tenant figures that outlive nodes and reloads.
#[derive(Debug, Default, Clone)]
pub struct TenantTotals {
    pub energy_millijoules: u64,
    pub over_contract_nanos: u128,
}

/// Why a sample or stream was refused; the label on the counters.
pub const REJECT_REASONS: [Reject; 6] = [
    Reject::GpuIndex,
    Reject::Utilization,
    Reject::Power,
    Reject::Timestamp,
    Reject::Sequence,
    Reject::Malformed,
];

#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub duplicate: AtomicU64,
    pub rejected: [AtomicU64; REJECT_REASONS.len()],
    pub streams_refused: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub commits_ok: AtomicU64,
    pub commits_failed: AtomicU64,
    pub commit_micros: AtomicU64,
    pub compactions_ok: AtomicU64,
    pub compactions_failed: AtomicU64,
    /// Requests refused for who sent them, by `AUTH_SURFACES` then
    /// `AUTH_REASONS`.
    pub auth_refused: [[AtomicU64; AUTH_REASONS.len()]; AUTH_SURFACES.len()],
    /// HTTP connections refused at accept, by `serve::HTTP_REFUSALS`.
    pub http_refused: [AtomicU64; crate::serve::HTTP_REFUSALS.len()],
    /// HTTP connections the collector closed, by `serve::HTTP_CLOSES`.
    pub http_closed: [AtomicU64; crate::serve::HTTP_CLOSES.len()],
    /// HTTP connections open now.
    pub http_open: AtomicU64,
    /// Hellos refused for a leased GPU the node may not report, by
    /// `CLAIM_REASONS`.
    pub gpu_claims_refused: [AtomicU64; CLAIM_REASONS.len()],
}

/// Why a Hello's GPU was refused: its UUID lease names other nodes, or a
/// UUID leased without a node is held by another connected node.
pub const CLAIM_REASONS: [&str; 2] = ["lease_node", "held_by_other_node"];
const CLAIM_LEASE_NODE: usize = 0;
const CLAIM_HELD: usize = 1;

/// Whether `id` may name a node: 1-253 bytes, no control characters.
pub fn node_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 253 && !id.chars().any(char::is_control)
}

/// Where a request was refused for who sent it.
pub const AUTH_SURFACES: [&str; 2] = ["grpc", "http"];
pub const SURFACE_GRPC: usize = 0;
pub const SURFACE_HTTP: usize = 1;

/// Why a request was refused for who sent it.
pub const AUTH_REASONS: [&str; 4] = [
    // No token, or one the collector does not know.
    "unauthenticated",
    // An agent token reporting for a node its globs do not match.
    "node_not_allowed",
    // A client certificate that does not name the node.
    "certificate",
    // A tenant token asking for another tenant, or for admin pages.
    "forbidden",
];
pub const AUTH_UNAUTHENTICATED: usize = 0;
pub const AUTH_NODE_NOT_ALLOWED: usize = 1;
pub const AUTH_CERTIFICATE: usize = 2;
pub const AUTH_FORBIDDEN: usize = 3;

impl Counters {
    pub fn auth_refused(&self, surface: usize, reason: usize) {
        self.auth_refused[surface][reason].fetch_add(1, Ordering::Relaxed);
    }
}

/// A stream's claim on its node.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    pub node: Arc<Mutex<Node>>,
    pub node_id: Arc<str>,
    pub epoch: u64,
    generation: u64,
    /// The commit that must be durable before the Welcome goes out (it
    /// holds the node's latest batch, whose seq the Welcome reports).
    pub welcome_after: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("node id must be 1-253 printable characters")]
    NodeId,
    #[error("inventory of {got} GPUs exceeds the limit of {max}")]
    TooManyGpus { got: usize, max: u32 },
    #[error("GPU {index}: {reason}")]
    Gpu { index: usize, reason: &'static str },
    #[error(
        "gpus[{position}].index is {index}: GPU indexes must be 0..n-1 in inventory order (samples refer to GPUs by index)"
    )]
    GpuIndex { position: usize, index: u32 },
    #[error("agent version must be at most 128 printable characters")]
    AgentVersion,
    #[error("stream epoch must be below 2^63")]
    Epoch,
    /// The node already streams (or streamed) under a newer epoch: the
    /// agent must say Hello again with an epoch above `current`.
    #[error(
        "stream epoch {got} is older than the node's current epoch {current}{}; say Hello again with an epoch above it",
        .connected.then_some(", whose stream is still connected").unwrap_or_default()
    )]
    StaleEpoch {
        got: u64,
        current: u64,
        /// Whether a stream of the current epoch is connected now.
        connected: bool,
    },
    #[error(
        "GPU {uuid} is leased to tenant {tenant:?} on node {allowed:?} only; node {node:?} may not report it"
    )]
    GpuLeasedElsewhere {
        uuid: String,
        tenant: Arc<str>,
        allowed: String,
        node: String,
    },
    #[error(
        "GPU {uuid}, leased to tenant {tenant:?}, is held by node {holder:?}, which is connected; node {node:?} may report it once that node's stream has ended or its inventory no longer lists it"
    )]
    GpuHeldElsewhere {
        uuid: String,
        tenant: Arc<str>,
        holder: Arc<str>,
        node: String,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("a newer stream took over node {0}")]
pub struct Superseded(pub Arc<str>);

/// What one batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub acked_seq: u64,
    /// The ledger commit that will hold this batch; ack after it.
    pub commit_id: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: Vec<(u64, Reject)>,
}

pub struct State {
    cfg: StateConfig,
    /// The tenant file's versions over time and the one in force now.
    tenants: RwLock<InForce>,
    auth: RwLock<Arc<Auth>>,
    nodes: Mutex<HashMap<Arc<str>, Arc<Mutex<Node>>>>,
    totals: Mutex<HashMap<Arc<str>, TenantTotals>>,
    /// Nodes with a stream now (`Node::connected`).
    connected: AtomicU64,
    /// UUID of every departed GPU -> the node that keeps it. A GPU keeps
    /// one counter state: when another node announces it, the copy among
    /// the first node's departed is dropped, so that the GPU's energy on
    /// the new node is not counted again on the old one should it come
    /// back there.
    departed_at: Mutex<HashMap<Arc<str>, Arc<str>>>,
    /// UUID of every GPU leased by UUID in a connected node's inventory ->
    /// (that node, its stream's generation): a leased GPU is reported by
    /// one connected node at a time. An entry whose stream has ended is
    /// void (checked against the node). Only leased GPUs, so that it stays
    /// as small as the tenant file's UUID leases.
    held: Mutex<HeldGpus>,
    next_generation: AtomicU64,
    /// What the next ledger commit will write.
    pending: Mutex<Pending>,
    pub counters: Counters,
    /// The ledger's identity, once it is open.
    ledger_identity: std::sync::OnceLock<crate::ledger::Identity>,
    /// Why `/readyz` answers 503, if it does.
    pub readiness: crate::health::Readiness,
}

/// GPU UUID -> (the connected node whose inventory lists it, that
/// stream's generation).
type HeldGpus = HashMap<Arc<str>, (Arc<str>, u64)>;

/// The tenant file's history and the version in force now.
#[derive(Debug)]
struct InForce {
    history: Arc<TenantHistory>,
    index: usize,
    span: (i64, i64),
}

impl InForce {
    fn of(history: TenantHistory, now: i64) -> Self {
        let index = history.at(now);
        let span = history.span(index);
        Self {
            history: Arc::new(history),
            index,
            span,
        }
    }
}

/// The ledger commit being gathered, and its number.
#[derive(Debug, Default)]
struct Pending {
    id: u64,
    commit: Commit,
}

impl State {
    pub fn new(cfg: StateConfig, tenants: Tenants) -> Self {
        Self {
            cfg,
            tenants: RwLock::new(InForce::of(TenantHistory::new(Arc::new(tenants)), 0)),
            auth: RwLock::new(Arc::new(Auth::default())),
            nodes: Mutex::new(HashMap::new()),
            totals: Mutex::new(HashMap::new()),
            connected: AtomicU64::new(0),
            departed_at: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            pending: Mutex::new(Pending {
                id: 1,
                commit: Commit::default(),
            }),
            counters: Counters::default(),
            ledger_identity: std::sync::OnceLock::new(),
            readiness: Default::default(),
        }
    }

    /// Records which ledger this collector writes (once).
    pub fn set_ledger_identity(&self, id: crate::ledger::Identity) {
        let _ = self.ledger_identity.set(id);
    }

    pub fn ledger_identity(&self) -> Option<&crate::ledger::Identity> {
        self.ledger_identity.get()
    }

    /// Takes what the next commit must write, with its number and the
    /// tenant file's history (each minute is measured against the contract
    /// of its own time); batches applied from now on go to the commit
    /// after it.
    pub fn take_pending(&self) -> (u64, Commit) {
        let contracts = self.tenant_history();
        let mut p = lock(&self.pending);
        let id = p.id;
        p.id += 1;
        let mut c = std::mem::take(&mut p.commit);
        c.contracts = Some(contracts);
        (id, c)
    }

    /// Resumes from what the ledger holds: each node's (epoch, seq) for
    /// dedup, each GPU's counter for the next delta, tenant totals.
    pub fn restore(&self, snap: Snapshot) {
        // A GPU in two nodes' cursors (it moved) resumes only where it was
        // heard last.
        let mut latest: HashMap<&str, (usize, Option<i64>)> = HashMap::new();
        for (i, (_, cursor)) in snap.nodes.iter().enumerate() {
            for (uuid, c) in &cursor.gpus {
                let e = latest.entry(&**uuid).or_insert((i, c.last_timestamp_ns));
                if c.last_timestamp_ns > e.1 {
                    *e = (i, c.last_timestamp_ns);
                }
            }
        }
        let mut nodes = lock(&self.nodes);
        let mut departed_at = lock(&self.departed_at);
        for (i, (id, cursor)) in snap.nodes.iter().enumerate() {
            let id: Arc<str> = Arc::from(id.as_str());
            let mut node = Node::new(
                id.clone(),
                cursor.epoch,
                cursor.last_seq,
                Duration::from_secs(1),
            );
            // Resumed GPUs wait among the departed until the Hello.
            for (uuid, c) in &cursor.gpus {
                if latest.get(&**uuid).is_some_and(|(at, _)| *at == i) {
                    let mut g = Gpu::resumed(uuid, c);
                    // At most the samples since its last reading, which
                    // came with this cursor's or an earlier one.
                    g.last_seq = Some(cursor.last_seq);
                    departed_at.insert(g.uuid.clone(), id.clone());
                    node.departed.push(g);
                }
            }
            nodes.insert(id, Arc::new(Mutex::new(node)));
        }
        drop(departed_at);
        drop(nodes);
        let mut totals = lock(&self.totals);
        for (tenant, energy) in snap.tenant_energy {
            totals
                .entry(Arc::from(tenant))
                .or_default()
                .energy_millijoules = energy;
        }
        for (tenant, nanos) in snap.tenant_over_contract_ns {
            totals
                .entry(Arc::from(tenant))
                .or_default()
                .over_contract_nanos = u128::from(nanos);
        }
    }

    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    /// The tokens in force.
    pub fn auth(&self) -> Arc<Auth> {
        self.auth.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_auth(&self, auth: Auth) {
        *self.auth.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(auth);
    }

    /// The tenants in force now.
    pub fn tenants(&self) -> Arc<Tenants> {
        self.in_force().0
    }

    /// The tenants in force now, and the span of time they are in force.
    fn in_force(&self) -> (Arc<Tenants>, (i64, i64)) {
        let f = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        (f.history.version(f.index).clone(), f.span)
    }

    /// Every version of the tenant file still relevant.
    pub fn tenant_history(&self) -> Arc<TenantHistory> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .history
            .clone()
    }

    /// Every node, for rendering.
    pub fn nodes(&self) -> Vec<Arc<Mutex<Node>>> {
        lock(&self.nodes).values().cloned().collect()
    }

    /// How many nodes the collector knows.
    pub fn node_count(&self) -> usize {
        lock(&self.nodes).len()
    }

    /// How many nodes have a stream now.
    pub fn connected(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn totals(&self) -> HashMap<Arc<str>, TenantTotals> {
        lock(&self.totals).clone()
    }

    /// Replaces the tenant file from its `effective_from`, or from now,
    /// and re-attributes every GPU. Nothing restarts; energy already
    /// counted stays with the tenant it was counted for.
    pub fn reload_tenants(&self, tenants: Tenants) {
        let from = tenants.effective_from_ns().unwrap_or_else(unix_nanos_now);
        self.reload_tenants_from(tenants, from);
    }

    /// Puts `tenants` in force from `from_ns` (Unix nanoseconds): samples
    /// stamped from then on are attributed by it, earlier ones by the
    /// version in force at their time.
    pub fn reload_tenants_from(&self, tenants: Tenants, from_ns: i64) {
        let n = tenants.all().len() - 1;
        let mut history = (*self.tenant_history()).clone();
        history.push(from_ns, Arc::new(tenants));
        self.set_tenant_history(history);
        self.counters.reloads_ok.fetch_add(1, Ordering::Relaxed);
        info!(
            tenants = n,
            effective_from_ns = from_ns,
            "tenant file reloaded"
        );
    }

    /// Replaces the whole history (at start-up, from the ledger) and
    /// re-attributes every GPU by the version in force now. Versions whose
    /// time ended before the oldest acceptable sample are forgotten.
    pub fn set_tenant_history(&self, mut history: TenantHistory) {
        let now = unix_nanos_now();
        let age = i64::try_from(self.cfg.max_sample_age.as_nanos()).unwrap_or(i64::MAX);
        history.forget_before(now.saturating_sub(age));
        let f = InForce::of(history, now);
        let (tenants, span) = (f.history.version(f.index).clone(), f.span);
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = f;
        // GPUs newly leased by UUID on connected nodes are held from now.
        let mut leased: Vec<(Arc<str>, Arc<str>, u64)> = Vec::new();
        for node in self.nodes() {
            let mut n = lock(&node);
            n.attribute(&tenants, span);
            if n.connected {
                for g in n
                    .gpus
                    .iter()
                    .filter(|g| tenants.uuid_lessee(&g.uuid).is_some())
                {
                    leased.push((g.uuid.clone(), n.id.clone(), n.generation));
                }
            }
        }
        // One lock at a time: `hello` takes `held` before a node.
        let mut held = lock(&self.held);
        for (uuid, node, generation) in leased {
            held.entry(uuid).or_insert((node, generation));
        }
    }

    /// Puts the next version in force once its time has come (a file
    /// loaded with an `effective_from` in the future). Cheap when nothing
    /// is due: called every second.
    pub fn advance_tenants(&self) {
        let until = self
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .span
            .1;
        if unix_nanos_now() < until {
            return;
        }
        self.set_tenant_history((*self.tenant_history()).clone());
        info!(
            effective_from_ns = until,
            "next tenant file version in force"
        );
    }

    /// Admits a stream for `hello.node_id`, taking the node over from any
    /// earlier stream. Returns the handle and the highest sequence already
    /// accepted for this (node, epoch).
    pub fn hello(&self, hello: Hello) -> Result<(StreamHandle, u64), HelloError> {
        let id = hello.node_id.as_str();
        if !node_id_ok(id) {
            return Err(HelloError::NodeId);
        }
        if hello.gpus.len() > self.cfg.max_gpus_per_node as usize {
            return Err(HelloError::TooManyGpus {
                got: hello.gpus.len(),
                max: self.cfg.max_gpus_per_node,
            });
        }
        if !label_ok(&hello.agent_version, 0) {
            return Err(HelloError::AgentVersion);
        }
        if hello.epoch > crate::model::MAX_STORED {
            return Err(HelloError::Epoch);
        }
        for (index, g) in hello.gpus.iter().enumerate() {
            if !label_ok(&g.uuid, 1) {
                return Err(HelloError::Gpu {
                    index,
                    reason: "UUID must be 1-128 printable characters",
                });
            }
            if !label_ok(&g.model, 0) {
                return Err(HelloError::Gpu {
                    index,
                    reason: "model must be at most 128 printable characters",
                });
            }
            if g.power_limit_milliwatts
                .is_some_and(|l| l == 0 || l > MAX_POWER_LIMIT_MILLIWATTS)
            {
                return Err(HelloError::Gpu {
                    index,
                    reason: "power limit must be between 1 mW and 10 kW",
                });
            }
            if hello.gpus[..index].iter().any(|o| o.uuid == g.uuid) {
                return Err(HelloError::Gpu {
                    index,
                    reason: "UUID appears twice in the inventory",
                });
            }
        }
        let (tenants, span) = self.in_force();
        // Held until this node's inventory is registered, so that two nodes
        // cannot both be admitted with one leased GPU.
        let mut held = lock(&self.held);
        self.check_gpu_claims(&hello, &tenants, &held)?;
        let node = {
            let mut nodes = lock(&self.nodes);
            nodes
                .entry(Arc::from(id))
                .or_insert_with(|| {
                    Arc::new(Mutex::new(Node::new(
                        Arc::from(id),
                        hello.epoch,
                        0,
                        hello.interval,
                    )))
                })
                .clone()
        };
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // (node, UUID) of departed GPUs this inventory takes over.
        let mut moved: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        let acked = {
            let mut n = lock(&node);
            // A node's epoch only moves forward: an older epoch may be a
            // stale agent instance whose samples were committed under it
            // before the current one took over, and the dedup cursor of
            // that epoch is gone, so it is refused, naming the current
            // epoch. An agent refused so (restarted after its clock was
            // stepped back, or after someone else said Hello for its node
            // with a newer epoch) says Hello again above it, with the
            // samples it never sent under the refused epoch. Only when the
            // current epoch lies in the future (beyond the allowed skew)
            // was it stamped by a wrong clock, and there may be no room
            // above it; once that stream is gone, the older epoch takes
            // over.
            let skew = i64::try_from(self.cfg.max_clock_skew.as_nanos()).unwrap_or(i64::MAX);
            let current_from_wrong_clock =
                i64::try_from(n.epoch).is_ok_and(|e| e > unix_nanos_now().saturating_add(skew));
            if hello.epoch < n.epoch && (n.connected || !current_from_wrong_clock) {
                return Err(HelloError::StaleEpoch {
                    got: hello.epoch,
                    current: n.epoch,
                    connected: n.connected,
                });
            }
            if hello.epoch < n.epoch {
                tracing::warn!(node = ?id, got = hello.epoch, current = n.epoch, "an older agent epoch takes the node over: the current one lies in the future of this collector's clock (an agent clock that was wrong, or this clock is behind)");
            }
            let new_epoch = hello.epoch != n.epoch;
            if new_epoch {
                // A restarted agent: its sequence numbers start again.
                n.epoch = hello.epoch;
                n.last_seq = 0;
            }
            // Keep what we know of GPUs that are still there, and of GPUs
            // that left (for a while), so the next counter delta covers the
            // time the agent or the GPU was away.
            let departed = std::mem::take(&mut n.departed);
            let mut old: HashMap<Arc<str>, Gpu> = n
                .gpus
                .drain(..)
                .chain(departed)
                .map(|g| (g.uuid.clone(), g))
                .collect();
            // GPUs of a node are mostly one model: one copy of its name.
            let mut models: Vec<Arc<str>> = Vec::new();
            let mut model = |name: &str| match models.iter().find(|m| ***m == *name) {
                Some(m) => m.clone(),
                None => {
                    let m: Arc<str> = Arc::from(name);
                    models.push(m.clone());
                    m
                }
            };
            let mut fresh: Vec<Arc<str>> = Vec::new();
            n.gpus = hello
                .gpus
                .into_iter()
                .map(|info| match old.remove(info.uuid.as_str()) {
                    Some(mut g) => {
                        g.model = model(&info.model);
                        g.power_limit_milliwatts = info.power_limit_milliwatts;
                        g.memory_total_bytes = info.memory_total_bytes;
                        g.energy_counter_supported = info.energy_counter_supported;
                        // The new run's clock may have been stepped: its
                        // first timestamp becomes the reference even if it
                        // is behind the old run's.
                        g.reanchor |= new_epoch;
                        g
                    }
                    None => {
                        let m = model(&info.model);
                        let g = Gpu::new(info, m, Arc::from(UNASSIGNED));
                        fresh.push(g.uuid.clone());
                        g
                    }
                })
                .collect();
            // Bounded: at most one inventory's worth of departed GPUs.
            let cap = self.cfg.max_gpus_per_node as usize;
            // The most recently heard are kept; the ledger forgets the rest
            // with the node's next cursor.
            let mut departed: Vec<Gpu> = old.into_values().collect();
            departed.sort_by_key(|g| std::cmp::Reverse(g.last_timestamp));
            let forgotten = departed.split_off(departed.len().min(cap));
            n.departed = departed;
            let mut at = lock(&self.departed_at);
            let here = |owner: Option<&Arc<str>>| owner.is_some_and(|o| **o == *id);
            for g in n.gpus.iter().chain(&forgotten) {
                if here(at.get(&g.uuid)) {
                    at.remove(&g.uuid);
                }
            }
            for uuid in fresh {
                if let Some(owner) = at.remove(&uuid) {
                    moved.push((owner, uuid));
                }
            }
            for g in &n.departed {
                at.insert(g.uuid.clone(), n.id.clone());
            }
            drop(at);
            for g in n.departed.iter().chain(&forgotten) {
                if held.get(&g.uuid).is_some_and(|(o, _)| **o == *id) {
                    held.remove(&g.uuid);
                }
            }
            for g in n
                .gpus
                .iter()
                .filter(|g| tenants.uuid_lessee(&g.uuid).is_some())
            {
                held.insert(g.uuid.clone(), (n.id.clone(), generation));
            }
            n.attribute(&tenants, span);
            n.agent_version = hello.agent_version;
            n.interval = hello.interval;
            n.generation = generation;
            if !n.connected {
                self.connected.fetch_add(1, Ordering::Relaxed);
            }
            n.connected = true;
            n.last_seq
        };
        drop(held);
        // Outside this node's lock: one node lock at a time.
        for (owner, uuid) in moved {
            let Some(other) = lock(&self.nodes).get(&owner).cloned() else {
                continue;
            };
            let mut o = lock(&other);
            o.departed.retain(|g| g.uuid != uuid);
            info!(gpu = ?uuid, from = ?owner, to = ?id, "GPU moved to another node; its counter state on the old node is dropped");
        }
        let welcome_after = lock(&node).last_commit_id;
        Ok((
            StreamHandle {
                node,
                node_id: Arc::from(id),
                epoch: hello.epoch,
                generation,
                welcome_after,
            },
            acked,
        ))
    }

    /// Marks the node disconnected if `h` still owns it.
    pub fn disconnect(&self, h: &StreamHandle) {
        let mut n = lock(&h.node);
        if n.generation == h.generation && n.connected {
            n.connected = false;
            self.connected.fetch_sub(1, Ordering::Relaxed);
            let uuids: Vec<Arc<str>> = n.gpus.iter().map(|g| g.uuid.clone()).collect();
            // One lock at a time: `hello` takes `held` before a node.
            drop(n);
            let mut held = lock(&self.held);
            for uuid in uuids {
                if held.get(&uuid).is_some_and(|(_, g)| *g == h.generation) {
                    held.remove(&uuid);
                }
            }
        }
    }

    /// Refuses a Hello listing a GPU that `tenants` leases by UUID on other
    /// nodes only, or one leased without a node that another connected
    /// node holds. Counted by reason.
    fn check_gpu_claims(
        &self,
        hello: &Hello,
        tenants: &Tenants,
        held: &HeldGpus,
    ) -> Result<(), HelloError> {
        let refused = |reason: usize, e: HelloError| {
            self.counters.gpu_claims_refused[reason].fetch_add(1, Ordering::Relaxed);
            Err(e)
        };
        let node = hello.node_id.as_str();
        for g in &hello.gpus {
            let Some(tenant) = tenants.uuid_lessee(&g.uuid) else {
                continue;
            };
            if let Err(e) = tenants.check_gpu(node, &g.uuid) {
                return refused(
                    CLAIM_LEASE_NODE,
                    HelloError::GpuLeasedElsewhere {
                        uuid: g.uuid.clone(),
                        tenant: e.tenant,
                        allowed: e.node,
                        node: node.to_string(),
                    },
                );
            }
            let Some((holder, generation)) = held.get(g.uuid.as_str()) else {
                continue;
            };
            if **holder == *node {
                continue;
            }
            let holder_node = lock(&self.nodes).get(holder).cloned();
            let still_held = holder_node.is_some_and(|h| {
                let h = lock(&h);
                h.connected && h.generation == *generation
            });
            if still_held {
                return refused(
                    CLAIM_HELD,
                    HelloError::GpuHeldElsewhere {
                        uuid: g.uuid.clone(),
                        tenant: tenant.clone(),
                        holder: holder.clone(),
                        node: node.to_string(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Applies a batch of validated samples (rejections already decided by
    /// the edge are passed in `rejected` and only counted).
    pub fn ingest(
        &self,
        h: &StreamHandle,
        samples: Vec<NodeSample>,
        mut rejected: Vec<(u64, Reject)>,
    ) -> Result<BatchOutcome, Superseded> {
        let now = Instant::now();
        let mut out = BatchOutcome::default();
        let mut energy: Vec<(Arc<str>, u64)> = Vec::new();
        let mut booked = Booking::default();
        // The tenant of each GPU under the last older version a sample of
        // this batch needed: (version, tenant per GPU).
        let mut past: Option<(usize, Vec<Arc<str>>)> = None;
        {
            let mut n = lock(&h.node);
            // Read under the node's lock: a reload re-attributes the node
            // after replacing the history, so this is as new as its span.
            let history = self.tenant_history();
            let window = n.stale_window(self.cfg.stale_after);
            let node_id = n.id.clone();
            if n.generation != h.generation || n.epoch != h.epoch {
                return Err(Superseded(h.node_id.clone()));
            }
            // A refused sample sent again (its ack was lost) is a
            // duplicate, not a second rejection.
            let before = n.last_seq;
            let is_resent = |seq: u64| seq != 0 && seq <= before;
            let resent = rejected.iter().filter(|(seq, _)| is_resent(*seq)).count();
            rejected.retain(|(seq, _)| !is_resent(*seq));
            out.duplicate += resent as u64;
            let skew = i64::try_from(self.cfg.max_clock_skew.as_nanos()).unwrap_or(i64::MAX);
            let now_ns = unix_nanos_now();
            let latest = now_ns.saturating_add(skew);
            let age = i64::try_from(self.cfg.max_sample_age.as_nanos()).unwrap_or(i64::MAX);
            let oldest = now_ns.saturating_sub(age);
            for s in samples {
                if s.seq <= n.last_seq {
                    out.duplicate += 1;
                    continue;
                }
                // A sequence far ahead of the last one would make every
                // later sample of this epoch a duplicate.
                if s.seq > n.last_seq.saturating_add(MAX_SEQ_JUMP) {
                    rejected.push((s.seq, Reject::Sequence));
                    continue;
                }
                if let Err(reason) = check_against_node(&n, &s, latest, oldest) {
                    rejected.push((s.seq, reason));
                    continue;
                }
                n.last_seq = s.seq;
                n.samples_accepted += 1;
                n.last_receipt = Some(now);
                let sampled = sampled_at(s.timestamp_unix_nanos, now, now_ns);
                n.sampled_at = sampled;
                n.last_timestamp = n.last_timestamp.max(s.timestamp_unix_nanos);
                if s.host.is_some() {
                    n.host = s.host;
                }
                let tick = Tick {
                    timestamp_ns: s.timestamp_unix_nanos,
                    seq: s.seq,
                    now,
                    latest_ns: latest,
                    interval: n.interval,
                    window,
                };
                // The common case, a sample of the version the GPUs were
                // attributed by: their own tenant. Else (a sample from
                // before a lease change, delivered late) the tenant of the
                // version in force at the sample's time.
                let ts = s.timestamp_unix_nanos;
                let version = (ts < n.tenants_span.0 || ts >= n.tenants_span.1).then(|| {
                    let v = history.at(ts);
                    if past.as_ref().is_none_or(|(p, _)| *p != v) {
                        let t = history.version(v);
                        let tenants = n
                            .gpus
                            .iter()
                            .map(|g| t.all()[t.attribute(&node_id, &g.uuid)].id.clone())
                            .collect();
                        past = Some((v, tenants));
                    }
                });
                for r in s.gpus {
                    let i = r.index as usize;
                    let gpu = &mut n.gpus[i];
                    let applied = gpu.apply(r, &tick);
                    gpu.sampled_at = sampled;
                    let tenant = match (&version, &past) {
                        (Some(()), Some((_, tenants))) => &tenants[i],
                        _ => &gpu.tenant,
                    };
                    applied.book(&mut booked, tenant, window);
                    let added = applied.energy_mj;
                    if added > 0 {
                        match energy.iter_mut().find(|(t, _)| t == tenant) {
                            Some((_, e)) => *e = e.saturating_add(added),
                            None => energy.push((tenant.clone(), added)),
                        }
                    }
                }
                out.accepted += 1;
            }
            // A refused sample is final: refusing it again on a re-send
            // would change nothing, so the ack moves past it too.
            if let Some(max) = rejected
                .iter()
                .map(|(seq, _)| *seq)
                .filter(|seq| *seq <= n.last_seq.saturating_add(MAX_SEQ_JUMP))
                .max()
            {
                n.last_seq = n.last_seq.max(max);
            }
            out.acked_seq = n.last_seq;
            if out.accepted > 0 {
                n.summarize();
            }
            // Into the next ledger commit, under the node's lock so that
            // cursors and deltas of this node are written in order. The
            // node's cursor is complete (GPUs that left it too): it
            // replaces the one an earlier batch put there.
            let cursor = NodeCursor {
                epoch: n.epoch,
                last_seq: n.last_seq,
                gpus: n
                    .gpus
                    .iter()
                    .chain(&n.departed)
                    .map(|g| (g.uuid.clone(), g.cursor()))
                    .collect(),
            };
            let mut pending = lock(&self.pending);
            let c = &mut pending.commit;
            booked.into_commit(c, &node_id);
            c.nodes.insert(node_id.clone(), cursor);
            for (tenant, mj) in &energy {
                *c.tenant_energy.entry(tenant.clone()).or_default() += mj;
            }
            out.commit_id = pending.id;
            n.last_commit_id = pending.id;
        }
        if !energy.is_empty() {
            let mut totals = lock(&self.totals);
            for (tenant, mj) in energy {
                let t = totals.entry(tenant).or_default();
                t.energy_millijoules = t.energy_millijoules.saturating_add(mj);
            }
        }
        let c = &self.counters;
        c.accepted.fetch_add(out.accepted, Ordering::Relaxed);
        c.duplicate.fetch_add(out.duplicate, Ordering::Relaxed);
        for (seq, reason) in &rejected {
            c.rejected[*reason as usize].fetch_add(1, Ordering::Relaxed);
            warn!(node = %h.node_id, seq, reason = reason.label(), "sample rejected");
        }
        out.rejected = rejected;
        Ok(out)
    }

    /// Live power of every tenant over its fresh GPUs, in mW, with the
    /// number of reporting and stale GPUs, in `tenants.all()` order.
    pub fn tenant_power(&self, tenants: &Tenants, now: Instant) -> Vec<TenantLive> {
        let mut live: Vec<TenantLive> = tenants
            .all()
            .iter()
            .map(|_| TenantLive::default())
            .collect();
        let index: HashMap<&str, usize> = tenants
            .all()
            .iter()
            .enumerate()
            .map(|(i, t)| (&*t.id, i))
            .collect();
        // GPUs of a node mostly share their tenant: the last lookup is
        // reused while the tenant is the same `Arc`, so a scrape hashes
        // about one tenant id per node.
        let mut last: Option<(Arc<str>, usize)> = None;
        for node in self.nodes() {
            let n = lock(&node);
            let window = n.stale_window(self.cfg.stale_after);
            n.live(now, window, |tenant, part| {
                // A GPU attributed under an older tenant file counts as
                // unassigned until its node reports again.
                let t = match &last {
                    Some((known, i)) if Arc::ptr_eq(known, tenant) => *i,
                    _ => {
                        let i = index
                            .get(&**tenant)
                            .copied()
                            .unwrap_or(tenants.unassigned());
                        last = Some((tenant.clone(), i));
                        i
                    }
                };
                live[t].add(part);
            });
        }
        live
    }

    /// Adds what a ledger commit added to the tenants' over-contract
    /// counters (`Ledger::commit_at`) to their totals.
    pub fn add_over_contract(&self, added: &[(Arc<str>, u64)]) {
        let mut totals = lock(&self.totals);
        for (tenant, ns) in added {
            totals
                .entry(tenant.clone())
                .or_default()
                .over_contract_nanos += u128::from(*ns);
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TenantLive {
    pub power_milliwatts: u64,
    pub reporting: u64,
    pub stale: u64,
    pub utilization_sum: u64,
    pub utilization_n: u64,
}

impl TenantLive {
    /// One reporting GPU's part.
    fn of(r: &GpuReading) -> Self {
        Self {
            power_milliwatts: r.power_milliwatts.unwrap_or(0),
            reporting: 1,
            stale: 0,
            utilization_sum: r.utilization_percent.map_or(0, u64::from),
            utilization_n: u64::from(r.utilization_percent.is_some()),
        }
    }

    fn add(&mut self, o: &TenantLive) {
        self.power_milliwatts = self.power_milliwatts.saturating_add(o.power_milliwatts);
        self.reporting += o.reporting;
        self.stale += o.stale;
        self.utilization_sum += o.utilization_sum;
        self.utilization_n += o.utilization_n;
    }
}

/// Checks a sample against the node's inventory and history.
fn check_against_node(
    n: &Node,
    s: &NodeSample,
    latest_timestamp: i64,
    oldest_timestamp: i64,
) -> Result<(), Reject> {
    if s.timestamp_unix_nanos <= oldest_timestamp.max(0)
        || s.timestamp_unix_nanos > latest_timestamp
    {
        return Err(Reject::Timestamp);
    }
    let mut seen = vec![false; n.gpus.len()];
    for r in &s.gpus {
        let i = r.index as usize;
        if i >= n.gpus.len() || std::mem::replace(&mut seen[i], true) {
            return Err(Reject::GpuIndex);
        }
        let limit = match (r.power_limit_milliwatts, n.gpus[i].power_limit_milliwatts) {
            (Some(l), _) if l == 0 || l > MAX_POWER_LIMIT_MILLIWATTS => return Err(Reject::Power),
            (a, b) => a.max(b),
        };
        if let Some(p) = r.power_milliwatts {
            // Three times the board limit (the larger of the announced and
            // the current one: limits change at run time), or 3 kW when
            // the limit is unknown.
            if p > limit.map_or(3_000_000, |l| l * 3) {
                return Err(Reject::Power);
            }
        }
    }
    Ok(())
}

pub(crate) fn unix_nanos_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GpuReading, NodeSample, Reject};
    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::Config as ProptestConfig;

    const T0: i64 = 1_700_000_000_000_000_000;
    const SEC: i64 = 1_000_000_000;
    const LIMIT_MW: u64 = 700_000;

    /// lab-a leases `a-*` whole (contract 1 kW); lab-b leases two GPUs by
    /// UUID (contract 0.5 kW).
    const TENANTS: &str = r#"
        [[tenant]]
        id = "lab-a"
        contracted_kw = 1
        nodes = ["a-*"]

        [[tenant]]
        id = "lab-b"
        contracted_kw = 0.5
        gpus = ["a-2-gpu1", "z-1-gpu0"]
    "#;

    fn new_state(tenants: &str, stale_after: Option<Duration>) -> State {
        State::new(
            StateConfig {
                stale_after,
                max_gpus_per_node: 8,
                max_clock_skew: Duration::from_secs(600),
                // The tests' clock starts in 2023.
                max_sample_age: Duration::from_secs(100 * 365 * 86_400),
            },
            Tenants::from_toml(tenants).unwrap(),
        )
    }

    /// A Hello for `node` at `epoch` with `n` GPUs named `{node}-gpu{i}`,
    /// each with a 700 W limit and an energy counter, reporting every 1 s.
    fn hello(node: &str, epoch: u64, n: usize) -> Hello {
        Hello {
            node_id: node.to_string(),
            agent_version: "test".to_string(),
            epoch,
            interval: Duration::from_secs(1),
            gpus: (0..n)
                .map(|i| GpuInfo {
                    uuid: format!("{node}-gpu{i}"),
                    model: "H200".to_string(),
                    power_limit_milliwatts: Some(LIMIT_MW),
                    memory_total_bytes: Some(1 << 30),
                    energy_counter_supported: true,
                })
                .collect(),
        }
    }

    fn connect(state: &State, node: &str, epoch: u64, n: usize) -> StreamHandle {
        state.hello(hello(node, epoch, n)).unwrap().0
    }

    fn reading(index: u32, power: u64, energy: Option<u64>) -> GpuReading {
        GpuReading {
            index,
            power_milliwatts: Some(power),
            energy_millijoules: energy,
            ..GpuReading::default()
        }
    }

    fn lost(index: u32) -> GpuReading {
        GpuReading {
            index,
            lost: true,
            ..GpuReading::default()
        }
    }

    /// A sample whose i-th reading is GPU i with (power mW, counter mJ).
    fn sample(seq: u64, ts: i64, gpus: &[(u64, Option<u64>)]) -> NodeSample {
        NodeSample {
            seq,
            timestamp_unix_nanos: ts,
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, &(p, e))| reading(i as u32, p, e))
                .collect(),
            host: None,
        }
    }

    fn ingest(state: &State, h: &StreamHandle, samples: Vec<NodeSample>) -> BatchOutcome {
        state.ingest(h, samples, Vec::new()).unwrap()
    }

    fn gpu_energy(h: &StreamHandle) -> Vec<u64> {
        lock(&h.node)
            .gpus
            .iter()
            .map(|g| g.energy_millijoules)
            .collect()
    }

    fn tenant_energy(state: &State, tenant: &str) -> u64 {
        state
            .totals()
            .get(tenant)
            .map_or(0, |t| t.energy_millijoules)
    }

    fn over_contract(state: &State, tenant: &str) -> u128 {
        state
            .totals()
            .get(tenant)
            .map_or(0, |t| t.over_contract_nanos)
    }

    fn rejected(state: &State, reason: Reject) -> u64 {
        state.counters.rejected[reason as usize].load(Ordering::Relaxed)
    }

    fn live(state: &State, now: Instant) -> HashMap<String, TenantLive> {
        let tenants = state.tenants();
        let live = state.tenant_power(&tenants, now);
        tenants
            .all()
            .iter()
            .zip(live)
            .map(|(t, l)| (t.id.to_string(), l))
            .collect()
    }

    /// Every tenant's total equals the sum of the energy of the GPUs
    /// currently attributed to it (true while no reload moved a GPU).
    fn assert_totals_match_gpus(state: &State) {
        let mut by_tenant: HashMap<Arc<str>, u64> = HashMap::new();
        for node in state.nodes() {
            for g in &lock(&node).gpus {
                *by_tenant.entry(g.tenant.clone()).or_default() += g.energy_millijoules;
            }
        }
        let totals = state.totals();
        for (t, e) in &by_tenant {
            let got = totals.get(t).map_or(0, |x| x.energy_millijoules);
            assert_eq!(got, *e, "tenant {t}: total vs sum over its GPUs");
        }
        for (t, tot) in &totals {
            let sum = by_tenant.get(t).copied().unwrap_or(0);
            assert_eq!(
                tot.energy_millijoules, sum,
                "tenant {t} has energy but no GPUs"
            );
        }
    }

    /// Per tenant, what `add` was called with.
    fn parts(
        visit: impl FnOnce(&mut dyn FnMut(&Arc<str>, &TenantLive)),
    ) -> Vec<(String, TenantLive)> {
        let mut out: Vec<(String, TenantLive)> = Vec::new();
        visit(&mut |t, p| match out.iter_mut().find(|(k, _)| **k == **t) {
            Some((_, sum)) => sum.add(p),
            None => out.push((t.to_string(), *p)),
        });
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// The per-node summary a tenant-level scrape reads equals walking
        /// the GPUs, at every moment a GPU or the node turns stale, after
        /// samples that leave GPUs out or report them lost, new
        /// inventories and tenant reloads.
        #[test]
        fn node_summary_equals_walking_its_gpus(
            ops in proptest::collection::vec((0u8..16, 0u8..16, 0u8..4, 0u8..3), 1..12),
        ) {
            let state = new_state(TENANTS, None);
            let mut h = connect(&state, "a-2", 1, 4);
            let mut seq = 0;
            for (i, &(present, lost_mask, action, age)) in ops.iter().enumerate() {
                match action {
                    // A new inventory of 2-4 GPUs (a restarted agent).
                    0 => {
                        h = connect(&state, "a-2", 2 + i as u64, 2 + usize::from(present % 3));
                        seq = 0;
                    }
                    // The tenant file reloaded, moving a-2's GPU 1 back to
                    // lab-a and back again.
                    1 => state.reload_tenants(Tenants::from_toml(if present % 2 == 0 {
                        TENANTS
                    } else {
                        "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 1\nnodes = [\"a-*\"]\n"
                    }).unwrap()),
                    _ => {
                        let gpus = lock(&h.node).gpus.len() as u32;
                        let readings: Vec<GpuReading> = (0..gpus)
                            .filter(|g| present & (1 << g) != 0)
                            .map(|g| if lost_mask & (1 << g) != 0 { lost(g) } else { reading(g, 100_000 + u64::from(g), None) })
                            .collect();
                        seq += 1;
                        // Stamped now, 2 s or 4 s ago (the window is 3 s):
                        // live, live for a second more, or arrived stale.
                        let ts = unix_nanos_now() - i64::from(age) * 2 * SEC;
                        let s = NodeSample { seq, timestamp_unix_nanos: ts, gpus: readings, host: None };
                        ingest(&state, &h, vec![s]);
                    }
                }
                let n = lock(&h.node);
                let window = n.stale_window(None);
                let mut probes = vec![Instant::now()];
                let times = n.gpus.iter().flat_map(|g| [g.last_receipt, g.sampled_at]);
                for t in times.chain([n.last_receipt, n.sampled_at]).flatten() {
                    probes.extend([t, t + window, t + window + Duration::from_nanos(1)]);
                }
                for now in probes {
                    prop_assert_eq!(
                        parts(|add| n.live(now, window, add)),
                        parts(|add| n.walk_live(now, window, add))
                    );
                }
            }
        }
    }

    /// A Hello for `node` announcing exactly `uuids`.
    fn hello_with(node: &str, epoch: u64, uuids: &[&str]) -> Hello {
        let mut h = hello(node, epoch, uuids.len());
        for (g, u) in h.gpus.iter_mut().zip(uuids) {
            g.uuid = u.to_string();
        }
        h
    }

    #[test]
    fn a_gpu_moved_to_another_node_is_not_counted_again_where_it_was() {
        let state = new_state(TENANTS, None);
        let a = state.hello(hello_with("a-1", 1, &["X", "Y"])).unwrap().0;
        ingest(
            &state,
            &a,
            vec![sample(1, T0, &[(100, Some(1_000)), (100, Some(5))])],
        );
        // X leaves a-1 (its agent restarts without it) and turns up on b-1,
        // where it draws 500 J.
        let a = state.hello(hello_with("a-1", 2, &["Y"])).unwrap().0;
        assert_eq!(lock(&a.node).departed.len(), 1);
        let b = state.hello(hello_with("b-1", 1, &["X"])).unwrap().0;
        assert!(lock(&a.node).departed.is_empty(), "X now lives on b-1");
        ingest(&state, &b, vec![sample(1, T0 + SEC, &[(100, Some(2_000))])]);
        ingest(
            &state,
            &b,
            vec![sample(2, T0 + 2 * SEC, &[(100, Some(502_000))])],
        );
        assert_eq!(gpu_energy(&b), vec![500_000]);
        // Back on a-1, its counter starts again from a baseline instead of
        // resuming from 1,000 mJ and counting b-1's 500 J a second time.
        let a = state.hello(hello_with("a-1", 3, &["Y", "X"])).unwrap().0;
        let x_mj = 502_100;
        ingest(
            &state,
            &a,
            vec![sample(
                1,
                T0 + 3 * SEC,
                &[(100, Some(6)), (100, Some(x_mj))],
            )],
        );
        assert_eq!(gpu_energy(&a), vec![1, 0]);
        assert_totals_match_gpus_and_departed(&state);
    }

    /// Every tenant's total equals its GPUs' energy, counting GPUs that
    /// left their node too.
    fn assert_totals_match_gpus_and_departed(state: &State) {
        let mut sum = 0;
        for node in state.nodes() {
            let n = lock(&node);
            sum += n
                .gpus
                .iter()
                .chain(&n.departed)
                .map(|g| g.energy_millijoules)
                .sum::<u64>();
        }
        let totals: u64 = state.totals().values().map(|t| t.energy_millijoules).sum();
        assert_eq!(totals, sum);
    }

    #[test]
    fn a_gpu_in_two_nodes_cursors_resumes_where_it_was_heard_last() {
        let cursor = |ts: i64, counter: u64| GpuCursor {
            last_counter_mj: Some(counter),
            last_timestamp_ns: Some(ts),
            remainder_mw_ns: 0,
            energy_mj: 0,
            counter_resets: 0,
        };
        let node = |gpus: Vec<(Arc<str>, GpuCursor)>| NodeCursor {
            epoch: 1,
            last_seq: 5,
            gpus,
        };
        let state = new_state(TENANTS, None);
        state.restore(crate::ledger::Snapshot {
            nodes: vec![
                (
                    "a-1".into(),
                    node(vec![
                        (Arc::from("X"), cursor(T0, 1_000)),
                        (Arc::from("Y"), cursor(T0, 7)),
                    ]),
                ),
                (
                    "b-1".into(),
                    node(vec![(Arc::from("X"), cursor(T0 + SEC, 2_000))]),
                ),
            ],
            ..crate::ledger::Snapshot::default()
        });
        let departed = |id: &str| -> Vec<(String, Option<u64>)> {
            let node = state
                .nodes()
                .into_iter()
                .find(|n| &*lock(n).id == id)
                .unwrap();
            let n = lock(&node);
            let mut v: Vec<_> = n
                .departed
                .iter()
                .map(|g| (g.uuid.to_string(), g.last_counter))
                .collect();
            v.sort();
            v
        };
        assert_eq!(departed("a-1"), vec![("Y".to_string(), Some(7))]);
        assert_eq!(departed("b-1"), vec![("X".to_string(), Some(2_000))]);
    }

    #[test]
    fn a_node_with_a_gpu_left_out_of_later_samples_is_walked() {
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 1, 2);
        // Stamped now: live by their own time as well as by arrival.
        let t0 = unix_nanos_now();
        ingest(&state, &h, vec![sample(1, t0, &[(100, None), (200, None)])]);
        assert!(lock(&h.node).live_valid);
        std::thread::sleep(Duration::from_millis(2));
        let only_first = NodeSample {
            seq: 2,
            timestamp_unix_nanos: t0 + SEC,
            gpus: vec![reading(0, 100, None)],
            host: None,
        };
        ingest(&state, &h, vec![only_first]);
        let n = lock(&h.node);
        assert!(!n.live_valid, "GPU 1's freshness differs from the node's");
        let gpu1_stale =
            n.gpus[1].last_receipt.unwrap() + n.stale_window(None) + Duration::from_nanos(1);
        let l = parts(|add| n.live(gpu1_stale, n.stale_window(None), add));
        assert_eq!(l.len(), 1);
        assert_eq!(
            (l[0].1.reporting, l[0].1.stale, l[0].1.power_milliwatts),
            (1, 1, 100)
        );
    }

    // ---- 1. Energy from counter deltas --------------------------------

    #[test]
    fn energy_is_last_counter_minus_first() {
        // Invariant: with a counter, a GPU's energy is exactly last − first
        // counter (mJ) whatever the batching, and each tenant's total is the
        // sum over its GPUs.
        // (node, counters per sample for GPU 0 and GPU 1, batch size)
        type Case = (&'static str, &'static [(u64, u64)], usize);
        let cases: [Case; 6] = [
            ("a-1", &[(1_000, 5_000)], 1),
            ("a-1", &[(1_000, 5_000), (1_000, 5_000)], 1),
            ("a-1", &[(1_000, 5_000), (2_500, 5_001), (9_999, 7_000)], 1),
            ("a-1", &[(1_000, 5_000), (2_500, 5_001), (9_999, 7_000)], 3),
            (
                "a-2", // GPU 0 to lab-a by glob, GPU 1 to lab-b by UUID
                &[(7, 0), (700_007, 350_000), (1_400_007, 700_123)],
                2,
            ),
            (
                "z-9", // unassigned, huge counters, near the 3x-limit bound
                &[
                    (u64::MAX / 2, 1 << 40),
                    (u64::MAX / 2 + 1_999_999, (1 << 40) + 1),
                ],
                1,
            ),
        ];
        for (node, counters, batch) in cases {
            let state = new_state(TENANTS, None);
            let h = connect(&state, node, 1, 2);
            let samples: Vec<NodeSample> = counters
                .iter()
                .enumerate()
                .map(|(i, &(c0, c1))| {
                    let i = i as u64;
                    sample(
                        i + 1,
                        T0 + i as i64 * SEC,
                        &[(300_000, Some(c0)), (300_000, Some(c1))],
                    )
                })
                .collect();
            for chunk in samples.chunks(batch) {
                ingest(&state, &h, chunk.to_vec());
            }
            let (first, last) = (counters[0], counters[counters.len() - 1]);
            let want = vec![last.0 - first.0, last.1 - first.1];
            assert_eq!(gpu_energy(&h), want, "{node} {counters:?}");
            let tenant_sum: u64 = ["lab-a", "lab-b", UNASSIGNED]
                .iter()
                .map(|t| tenant_energy(&state, t))
                .sum();
            assert_eq!(tenant_sum, want.iter().sum::<u64>(), "{node}");
            assert_totals_match_gpus(&state);
            assert_eq!(lock(&h.node).gpus[0].counter_resets, 0);
        }
    }

    // ---- 2. Dedup -----------------------------------------------------

    /// Sample `seq` of a 2-GPU node whose counters read `1000 * seq`.
    fn counted(seq: u64) -> NodeSample {
        let c = 1_000 * seq;
        sample(
            seq,
            T0 + seq as i64 * SEC,
            &[(100_000, Some(c)), (100_000, Some(c))],
        )
    }

    #[test]
    fn duplicates_add_nothing_and_are_counted() {
        // Invariant: a sample at or below the node's last seq is a
        // duplicate: it adds no energy and no accepted sample, and only the
        // new samples of an overlapping batch count.
        // (name, batches as seq ranges, (accepted, duplicate) per batch)
        type Case = (&'static str, &'static [(u64, u64)], &'static [(u64, u64)]);
        let cases: [Case; 6] = [
            ("resend", &[(1, 3), (1, 3)], &[(3, 0), (0, 3)]),
            ("overlap", &[(1, 3), (2, 5)], &[(3, 0), (2, 2)]),
            ("subset", &[(1, 5), (2, 3)], &[(5, 0), (0, 2)]),
            (
                "resend all later",
                &[(1, 2), (3, 4), (1, 4)],
                &[(2, 0), (2, 0), (0, 4)],
            ),
            (
                "late fill after gap", // energy is kept by the next delta
                &[(1, 2), (5, 6), (3, 4)],
                &[(2, 0), (2, 0), (0, 2)],
            ),
            (
                "triple resend",
                &[(1, 1), (1, 1), (1, 1), (2, 2)],
                &[(1, 0), (0, 1), (0, 1), (1, 0)],
            ),
        ];
        for (name, batches, want) in cases {
            let state = new_state(TENANTS, None);
            let h = connect(&state, "a-1", 1, 2);
            let mut max_seq = 0;
            for (&(lo, hi), &(acc, dup)) in batches.iter().zip(want) {
                let out = ingest(&state, &h, (lo..=hi).map(counted).collect());
                max_seq = max_seq.max(hi);
                assert_eq!((out.accepted, out.duplicate), (acc, dup), "{name}");
                assert_eq!(out.acked_seq, max_seq, "{name}");
                assert!(out.rejected.is_empty(), "{name}");
            }
            let accepted: u64 = want.iter().map(|w| w.0).sum();
            let duplicate: u64 = want.iter().map(|w| w.1).sum();
            let first = batches[0].0;
            let per_gpu = 1_000 * (max_seq - first);
            assert_eq!(gpu_energy(&h), vec![per_gpu; 2], "{name}");
            assert_eq!(tenant_energy(&state, "lab-a"), 2 * per_gpu, "{name}");
            assert_eq!(lock(&h.node).samples_accepted, accepted, "{name}");
            assert_eq!(lock(&h.node).last_seq, max_seq, "{name}");
            let c = &state.counters;
            assert_eq!(c.accepted.load(Ordering::Relaxed), accepted, "{name}");
            assert_eq!(c.duplicate.load(Ordering::Relaxed), duplicate, "{name}");
        }
    }

    // ---- 3. Counter reset -----------------------------------------------

    #[test]
    fn counter_reset_counts_the_energy_since_the_reload() {
        // Invariant: a counter that goes backwards (driver reload) adds the
        // new counter value, the energy since the reload, when the interval
        // allows it, and power × dt when it does not; never a negative or
        // wrapped delta. It counts a reset, and later deltas run from the
        // new value.
        // (samples as (dt since previous ns, power mW, counter mJ),
        //  energy, resets, last counter)
        type Case = (&'static [(i64, u64, u64)], u64, u64, u64);
        let cases: [Case; 6] = [
            (
                &[
                    (0, 100_000, 1_000),
                    (SEC, 100_000, 5_000),
                    (SEC, 100_000, 200), // reload: 200 mJ since
                    (SEC, 100_000, 700),
                ],
                4_000 + 200 + 500,
                1,
                700,
            ),
            (
                &[
                    (0, 250_000, 9_000_000_000),
                    (2 * SEC, 250_000, 9_000_500_000),
                    (2 * SEC, 250_000, 3), // reload: 3 mJ since
                    (2 * SEC, 250_000, 500_003),
                ],
                500_000 + 3 + 500_000,
                1,
                500_003,
            ),
            (
                &[
                    (0, 10_000, 5_000),
                    (SEC, 10_000, 100), // reload
                    (SEC, 20_000, 50),  // reload again
                    (SEC, 20_000, 90),
                ],
                100 + 50 + 40,
                2,
                90,
            ),
            (
                &[
                    (0, 1, 5_000),
                    (SEC / 2, 1, 10),
                    (SEC / 2, 1, 5),
                    (SEC, 1, 6),
                ],
                10 + 5 + 1,
                2,
                6,
            ),
            (
                &[
                    (0, 100_000, u64::MAX - 10),
                    (SEC, 100_000, 0), // wrap-around is a reload, not a huge delta
                    (SEC, 100_000, 42),
                ],
                42,
                1,
                42,
            ),
            (
                &[
                    (0, 100_000, 9_000_000_000),
                    // Back to more than 3 x 700 W could use in 1 s: not a
                    // believable reload, so the interval comes from power.
                    (SEC, 100_000, 5_000_000_000),
                    (SEC, 100_000, 5_000_000_100),
                ],
                100_000 + 100,
                1,
                5_000_000_100,
            ),
        ];
        for (samples, energy, resets, last_counter) in cases {
            let state = new_state(TENANTS, None);
            let h = connect(&state, "a-1", 1, 1);
            let mut ts = T0;
            for (i, &(dt, p, c)) in samples.iter().enumerate() {
                ts += dt;
                ingest(&state, &h, vec![sample(i as u64 + 1, ts, &[(p, Some(c))])]);
            }
            let n = lock(&h.node);
            let g = &n.gpus[0];
            assert_eq!(g.energy_millijoules, energy, "{samples:?}");
            assert_eq!(g.counter_resets, resets, "{samples:?}");
            assert_eq!(g.last_counter, Some(last_counter), "{samples:?}");
            drop(n);
            assert_eq!(tenant_energy(&state, "lab-a"), energy);
            assert_totals_match_gpus(&state);
        }
    }

    #[test]
    fn counter_appearing_late_covers_earlier_interval_from_power() {
        // Invariant: readings before the first counter value are integrated
        // from power; the first counter value is then only a baseline.
        // (counter per sample at 100 W, 1 s apart; expected energy)
        let cases: [(&[Option<u64>], u64); 4] = [
            (&[Some(1_000), Some(1_500)], 500),
            (&[None, Some(1_000), Some(1_500)], 100_000 + 500),
            (&[None, None, Some(50)], 200_000),
            (&[None, None, Some(50), Some(60)], 200_000 + 10),
        ];
        for (counters, want) in cases {
            let state = new_state(TENANTS, None);
            let h = connect(&state, "a-1", 1, 1);
            let samples = counters
                .iter()
                .enumerate()
                .map(|(i, &c)| sample(i as u64 + 1, T0 + i as i64 * SEC, &[(100_000, c)]))
                .collect();
            ingest(&state, &h, samples);
            assert_eq!(gpu_energy(&h), vec![want], "{counters:?}");
            assert_eq!(lock(&h.node).gpus[0].counter_resets, 0);
            assert_totals_match_gpus(&state);
        }
    }

    // ---- 4. No counter: exact integration --------------------------------

    /// Feeds a baseline at T0 then one sample per (power, dt) to a fresh
    /// single-GPU node without counter, in batches of the given sizes
    /// (cycled); returns (energy mJ, remainder mW·ns). The staleness window
    /// (10 s) is longer than any step, so power covers each step whole.
    fn integrate_in_batches(steps: &[(u64, i64)], sizes: &[usize]) -> (u64, u64) {
        let state = new_state(TENANTS, Some(Duration::from_secs(10)));
        let mut hl = hello("a-1", 1, 1);
        hl.gpus[0].energy_counter_supported = false;
        let h = state.hello(hl).unwrap().0;
        let mut ts = T0;
        let mut samples = vec![sample(1, ts, &[(0, None)])];
        for (i, &(p, dt)) in steps.iter().enumerate() {
            ts += dt;
            samples.push(sample(i as u64 + 2, ts, &[(p, None)]));
        }
        let mut rest = samples.as_slice();
        let mut size = sizes.iter().copied().cycle();
        while !rest.is_empty() {
            let k = size.next().unwrap_or(1).clamp(1, rest.len());
            let out = ingest(&state, &h, rest[..k].to_vec());
            assert_eq!(out.accepted, k as u64);
            rest = &rest[k..];
        }
        let n = lock(&h.node);
        let e = n.gpus[0].energy_millijoules;
        assert_eq!(tenant_energy(&state, "lab-a"), e);
        (e, n.gpus[0].remainder_milliwatt_nanos)
    }

    fn exact_millijoules(steps: &[(u64, i64)]) -> (u64, u64) {
        let total: u128 = steps
            .iter()
            .map(|&(p, dt)| u128::from(p) * dt as u128)
            .sum();
        (
            u64::try_from(total / NANOS_PER_SECOND).unwrap(),
            (total % NANOS_PER_SECOND) as u64,
        )
    }

    #[test]
    fn without_counter_energy_is_the_exact_power_integral() {
        // Invariant: without a counter, energy is floor(Σ p·dt / 1 s) mJ
        // exactly, the sub-mJ remainder carried between samples.
        // (power mW, dt ns, repeats, expected mJ)
        let cases: [(u64, i64, usize, u64); 8] = [
            (1, 400_000_000, 10, 4),
            (1, 400_000_000, 7, 2), // 2.8 mJ
            (1, 400_000_000, 3, 1), // 1.2 mJ
            (333, 1_000_000, 3, 0), // 0.999 mJ
            (333, 1_000_000, 4, 1), // 1.332 mJ
            (700_000, SEC, 3, 2_100_000),
            (0, 5 * SEC, 5, 0),
            (1, 1, 1_000, 0), // 1e-9 mJ steps never round up
        ];
        for (p, dt, repeats, want) in cases {
            let steps = vec![(p, dt); repeats];
            let (e, rem) = integrate_in_batches(&steps, &[1]);
            assert_eq!(e, want, "{p} mW × {dt} ns × {repeats}");
            assert_eq!((e, rem), exact_millijoules(&steps));
        }
    }

    fn steps_strategy() -> impl Strategy<Value = Vec<(u64, i64)>> {
        prop::collection::vec((0u64..=2_000_000, 1i64..=5_000_000_000), 1..64)
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn integration_is_exact_and_batching_independent(
            steps in steps_strategy(),
            sizes in prop::collection::vec(1usize..10, 1..16),
        ) {
            // Invariant: energy is floor(Σ p·dt / 1e9) mJ exactly, however
            // the samples are split into batches.
            let want = exact_millijoules(&steps);
            prop_assert_eq!(integrate_in_batches(&steps, &[1]), want);
            prop_assert_eq!(integrate_in_batches(&steps, &sizes), want);
            prop_assert_eq!(integrate_in_batches(&steps, &[usize::MAX]), want);
        }
    }

    // ---- 5. Dedup idempotence (property) ---------------------------------

    /// Per-sample draw: (power mW, dt ns, counter increment, reset roll,
    /// lost roll).
    type Draw = (u64, i64, u64, u8, u8);

    /// Samples of node `a-2` (GPU 0 with counter, to lab-a; GPU 1 without,
    /// to lab-b), with occasional counter resets and lost readings.
    fn scenario_samples(draws: &[Draw]) -> Vec<NodeSample> {
        let mut ts = T0;
        let mut counter = 1_000_000u64;
        draws
            .iter()
            .enumerate()
            .map(|(i, &(p, dt, inc, reset, lost_roll))| {
                ts += dt;
                counter = if reset == 0 {
                    inc % 1_000
                } else {
                    counter + inc
                };
                let mut s = sample(i as u64 + 1, ts, &[(p, Some(counter)), (p / 2, None)]);
                if lost_roll == 0 {
                    s.gpus[0] = lost(0);
                }
                s
            })
            .collect()
    }

    /// Per GPU (energy, remainder, resets); node samples accepted; accepted
    /// counter; lab-a and lab-b totals.
    type Snapshot = (Vec<(u64, u64, u64)>, u64, u64, u64, u64);

    /// What a state looks like for accounting purposes.
    fn snapshot(state: &State, h: &StreamHandle) -> Snapshot {
        let n = lock(&h.node);
        let gpus = n
            .gpus
            .iter()
            .map(|g| {
                (
                    g.energy_millijoules,
                    g.remainder_milliwatt_nanos,
                    g.counter_resets,
                )
            })
            .collect();
        (
            gpus,
            n.samples_accepted,
            state.counters.accepted.load(Ordering::Relaxed),
            tenant_energy(state, "lab-a"),
            tenant_energy(state, "lab-b"),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn resending_batches_is_idempotent(
            draws in prop::collection::vec(
                (0u64..=1_400_000, 1i64..=5_000_000_000, 0u64..2_000_000, 0u8..10, 0u8..8),
                1..40,
            ),
            sizes in prop::collection::vec(1usize..6, 40),
            between in prop::collection::vec(prop::collection::vec(any::<Index>(), 0..3), 40),
            after in prop::collection::vec(any::<Index>(), 0..12),
        ) {
            // Invariant: re-sending any already-sent batches, at any point
            // and in any order, changes no energy, remainder, reset count
            // or accepted count; every re-sent sample counts as duplicate.
            let samples = scenario_samples(&draws);
            let mut batches: Vec<Vec<NodeSample>> = Vec::new();
            let mut rest = samples.as_slice();
            for &k in &sizes {
                if rest.is_empty() {
                    break;
                }
                let k = k.min(rest.len());
                batches.push(rest[..k].to_vec());
                rest = &rest[k..];
            }
            if !rest.is_empty() {
                batches.push(rest.to_vec());
            }

            let once = new_state(TENANTS, None);
            let h1 = connect(&once, "a-2", 1, 2);
            for b in &batches {
                ingest(&once, &h1, b.clone());
            }

            let again = new_state(TENANTS, None);
            let h2 = connect(&again, "a-2", 1, 2);
            let mut resent = 0u64;
            for (i, b) in batches.iter().enumerate() {
                let out = ingest(&again, &h2, b.clone());
                prop_assert_eq!(out.duplicate, 0);
                for ix in between.get(i).into_iter().flatten() {
                    let old = &batches[ix.index(i + 1)];
                    let out = ingest(&again, &h2, old.clone());
                    prop_assert_eq!((out.accepted, out.duplicate), (0, old.len() as u64));
                    resent += old.len() as u64;
                }
            }
            for ix in &after {
                let old = &batches[ix.index(batches.len())];
                ingest(&again, &h2, old.clone());
                resent += old.len() as u64;
            }

            prop_assert_eq!(snapshot(&once, &h1), snapshot(&again, &h2));
            prop_assert_eq!(again.counters.duplicate.load(Ordering::Relaxed), resent);
            prop_assert_eq!(once.counters.duplicate.load(Ordering::Relaxed), 0);
            assert_totals_match_gpus(&again);
        }
    }

    // ---- 6. Epochs and stream takeover ------------------------------------

    #[test]
    fn new_epoch_restarts_sequence_and_continues_counter() {
        // Invariant: after an agent restart (higher epoch) seq 1 is accepted
        // again and the counter delta across the gap is counted once.
        let state = new_state(TENANTS, None);
        let (old, acked) = state.hello(hello("a-1", 1, 1)).unwrap();
        assert_eq!(acked, 0);
        for seq in 1..=3 {
            ingest(
                &state,
                &old,
                vec![sample(
                    seq,
                    T0 + seq as i64 * SEC,
                    &[(100_000, Some(seq * 1_000))],
                )],
            );
        }
        let (new, acked) = state.hello(hello("a-1", 2, 1)).unwrap();
        assert_eq!(acked, 0, "a new epoch starts its sequence again");
        // The agent was away for 60 s; the counter ran on.
        let out = ingest(
            &state,
            &new,
            vec![
                sample(1, T0 + 63 * SEC, &[(100_000, Some(10_000))]),
                sample(2, T0 + 64 * SEC, &[(100_000, Some(10_500))]),
            ],
        );
        assert_eq!((out.accepted, out.duplicate, out.acked_seq), (2, 0, 2));
        assert_eq!(gpu_energy(&new), vec![10_500 - 1_000]);
        assert_eq!(tenant_energy(&state, "lab-a"), 9_500);
        // The old stream cannot add anything any more.
        let err = state
            .ingest(
                &old,
                vec![sample(4, T0 + 4 * SEC, &[(1, Some(99_999))])],
                Vec::new(),
            )
            .unwrap_err();
        assert_eq!(&*err.0, "a-1");
        // Re-sending the new epoch's samples is still deduplicated.
        let out = ingest(
            &state,
            &new,
            vec![sample(1, T0 + 63 * SEC, &[(100_000, Some(10_000))])],
        );
        assert_eq!((out.accepted, out.duplicate), (0, 1));
        let n = lock(&new.node);
        assert_eq!((n.epoch, n.last_seq, n.samples_accepted), (2, 2, 5));
        assert_eq!(n.gpus[0].counter_resets, 0);
    }

    #[test]
    fn older_epoch_is_refused() {
        // Invariant: a Hello with an epoch below the node's current one is
        // refused and does not disturb the current stream.
        // (current epoch, refused epochs)
        const TOP: u64 = crate::model::MAX_STORED;
        let cases: [(u64, &[u64]); 3] = [(5, &[4, 0]), (1, &[0]), (TOP, &[TOP - 1, 1])];
        for (current, older) in cases {
            let state = new_state(TENANTS, None);
            let h = connect(&state, "a-1", current, 1);
            ingest(&state, &h, vec![sample(1, T0, &[(1, Some(1))])]);
            for &got in older {
                match state.hello(hello("a-1", got, 1)) {
                    Err(HelloError::StaleEpoch {
                        got: g,
                        current: c,
                        connected,
                    }) => {
                        assert_eq!((g, c, connected), (got, current, true));
                    }
                    other => panic!("epoch {got} after {current}: {other:?}"),
                }
            }
            let out = ingest(&state, &h, vec![sample(2, T0 + SEC, &[(1, Some(5))])]);
            assert_eq!(out.accepted, 1, "the current stream still owns the node");
            assert_eq!(gpu_energy(&h), vec![4]);
        }
    }

    #[test]
    fn same_epoch_hello_supersedes_and_acks_last_seq() {
        // Invariant: a second Hello at the same epoch takes the node over,
        // its Welcome acks the last accepted (or refused) seq, and the old
        // handle gets Superseded.
        // (accepted seqs before the takeover, a refused seq, expected ack)
        let cases: [(u64, Option<u64>, u64); 4] =
            [(0, None, 0), (4, None, 4), (4, Some(5), 5), (1, Some(7), 7)];
        for (upto, refused, want_ack) in cases {
            let state = new_state(TENANTS, None);
            let h1 = connect(&state, "a-1", 3, 1);
            let mut batch: Vec<NodeSample> = (1..=upto)
                .map(|s| sample(s, T0 + s as i64 * SEC, &[(1_000, Some(s * 10))]))
                .collect();
            if let Some(seq) = refused {
                batch.push(sample(
                    seq,
                    T0 + seq as i64 * SEC,
                    &[(LIMIT_MW * 3 + 1, None)],
                ));
            }
            if !batch.is_empty() {
                ingest(&state, &h1, batch.clone());
            }
            let (h2, ack) = state.hello(hello("a-1", 3, 1)).unwrap();
            assert_eq!(ack, want_ack, "{upto} {refused:?}");
            assert!(matches!(
                state.ingest(&h1, batch.clone(), Vec::new()),
                Err(Superseded(_))
            ));
            // The old stream's disconnect does not mark the node offline.
            state.disconnect(&h1);
            assert!(lock(&h2.node).connected);
            if !batch.is_empty() {
                let out = ingest(&state, &h2, batch.clone());
                assert_eq!(out.accepted, 0, "replay after takeover is a duplicate");
                assert_eq!(out.duplicate, batch.len() as u64);
            }
            let next = want_ack + 1;
            let out = ingest(
                &state,
                &h2,
                vec![sample(
                    next,
                    T0 + next as i64 * SEC,
                    &[(1_000, Some(next * 10))],
                )],
            );
            assert_eq!((out.accepted, out.acked_seq), (1, next));
            state.disconnect(&h2);
            assert!(!lock(&h2.node).connected);
        }
    }

    // ---- 7. Validation -----------------------------------------------------

    #[test]
    fn invalid_samples_are_rejected_alone() {
        // Invariant: a sample failing a node check is rejected with its
        // reason, adds no energy, and its neighbours in the batch are
        // accepted.
        // (name, GPU power limit, sample 2's readings, sample 2's ts,
        //  expected reason or None when accepted)
        type Case = (
            &'static str,
            Option<u64>,
            Vec<GpuReading>,
            i64,
            Option<Reject>,
        );
        let good = |p| vec![reading(0, p, Some(50_000)), reading(1, p, Some(50_000))];
        let cases: Vec<Case> = vec![
            (
                "index outside inventory",
                Some(LIMIT_MW),
                vec![reading(0, 1, Some(50_000)), reading(2, 1, Some(50_000))],
                T0 + SEC,
                Some(Reject::GpuIndex),
            ),
            (
                "index far outside inventory",
                Some(LIMIT_MW),
                vec![reading(u32::MAX, 1, Some(50_000))],
                T0 + SEC,
                Some(Reject::GpuIndex),
            ),
            (
                "duplicate index",
                Some(LIMIT_MW),
                vec![reading(0, 1, Some(50_000)), reading(0, 1, Some(50_000))],
                T0 + SEC,
                Some(Reject::GpuIndex),
            ),
            (
                "duplicate lost index",
                Some(LIMIT_MW),
                vec![lost(1), reading(1, 1, Some(50_000))],
                T0 + SEC,
                Some(Reject::GpuIndex),
            ),
            (
                "power above 3x limit",
                Some(LIMIT_MW),
                good(3 * LIMIT_MW + 1),
                T0 + SEC,
                Some(Reject::Power),
            ),
            (
                "power at 3x limit",
                Some(LIMIT_MW),
                good(3 * LIMIT_MW),
                T0 + SEC,
                None,
            ),
            (
                "unknown limit: above 3 kW",
                None,
                good(3_000_001),
                T0 + SEC,
                Some(Reject::Power),
            ),
            ("unknown limit: 3 kW", None, good(3_000_000), T0 + SEC, None),
            (
                "timestamp at the epoch",
                Some(LIMIT_MW),
                good(1),
                0,
                Some(Reject::Timestamp),
            ),
            (
                "timestamp before the epoch",
                Some(LIMIT_MW),
                good(1),
                -5,
                Some(Reject::Timestamp),
            ),
        ];
        for (name, limit, readings, ts, want) in cases {
            let state = new_state(TENANTS, None);
            let mut hl = hello("a-1", 1, 2);
            for g in &mut hl.gpus {
                g.power_limit_milliwatts = limit;
            }
            let h = state.hello(hl).unwrap().0;
            // Samples 1 and 3 bracket the bad one; had sample 2's counter
            // (50 000) been applied, 3's (3 000) would count as a reset.
            let bad = NodeSample {
                seq: 2,
                timestamp_unix_nanos: ts,
                gpus: readings,
                host: None,
            };
            let batch = vec![
                sample(1, T0, &[(1_000, Some(1_000)), (1_000, Some(1_000))]),
                bad,
                sample(
                    3,
                    T0 + 2 * SEC,
                    &[(1_000, Some(3_000)), (1_000, Some(3_000))],
                ),
            ];
            let out = ingest(&state, &h, batch.clone());
            assert_eq!(out.acked_seq, 3, "{name}");
            match want {
                Some(reason) => {
                    assert_eq!(out.accepted, 2, "{name}");
                    assert_eq!(out.rejected, vec![(2, reason)], "{name}");
                    for r in REJECT_REASONS {
                        let n = u64::from(r == reason);
                        assert_eq!(rejected(&state, r), n, "{name}: {r:?}");
                    }
                    assert_eq!(gpu_energy(&h), vec![2_000, 2_000], "{name}");
                    assert_eq!(lock(&h.node).gpus[0].counter_resets, 0, "{name}");
                    assert_eq!(lock(&h.node).samples_accepted, 2, "{name}");
                }
                None => {
                    assert_eq!(out.accepted, 3, "{name}");
                    assert!(out.rejected.is_empty(), "{name}");
                    assert_eq!(lock(&h.node).gpus[0].counter_resets, 1, "{name}");
                }
            }
            assert_totals_match_gpus(&state);
            // A refused sample is final: its re-send is a duplicate.
            let out = ingest(&state, &h, batch);
            assert_eq!((out.accepted, out.duplicate), (0, 3), "{name}");
            assert!(out.rejected.is_empty(), "{name}");
        }
    }

    #[test]
    fn edge_rejections_are_counted_and_acked() {
        // Invariant: rejections decided at the edge are counted under their
        // reason and move the ack past them, adding nothing.
        // (edge rejections, expected ack)
        let cases: [(&[(u64, Reject)], u64); 3] = [
            (&[(3, Reject::Utilization)], 3),
            (&[(2, Reject::Malformed), (9, Reject::Sequence)], 9),
            (&[(0, Reject::Sequence)], 1),
        ];
        for (edge, ack) in cases {
            let state = new_state(TENANTS, None);
            let h = connect(&state, "a-1", 1, 1);
            let out = state
                .ingest(&h, vec![sample(1, T0, &[(1, Some(1))])], edge.to_vec())
                .unwrap();
            assert_eq!(out.acked_seq, ack);
            assert_eq!(out.accepted, 1);
            assert_eq!(out.rejected, edge.to_vec());
            for &(_, r) in edge {
                let n = edge.iter().filter(|(_, x)| *x == r).count() as u64;
                assert_eq!(rejected(&state, r), n, "{r:?}");
            }
            assert_eq!(gpu_energy(&h), vec![0]);
        }
    }

    #[test]
    fn hello_validation() {
        // Invariant: a malformed Hello is refused with the matching error
        // and creates no node.
        type Case = (&'static str, Hello, fn(&HelloError) -> bool);
        let with = |f: fn(&mut Hello)| {
            let mut h = hello("a-1", 1, 2);
            f(&mut h);
            h
        };
        let cases: Vec<Case> = vec![
            ("empty node id", hello("", 1, 1), |e| {
                matches!(e, HelloError::NodeId)
            }),
            ("node id too long", hello(&"n".repeat(254), 1, 1), |e| {
                matches!(e, HelloError::NodeId)
            }),
            ("control char in node id", hello("a-\n1", 1, 1), |e| {
                matches!(e, HelloError::NodeId)
            }),
            ("too many GPUs", hello("a-1", 1, 9), |e| {
                matches!(e, HelloError::TooManyGpus { got: 9, max: 8 })
            }),
            (
                "duplicate UUID",
                with(|h| h.gpus[1].uuid = h.gpus[0].uuid.clone()),
                |e| matches!(e, HelloError::Gpu { index: 1, .. }),
            ),
            ("empty UUID", with(|h| h.gpus[0].uuid.clear()), |e| {
                matches!(e, HelloError::Gpu { index: 0, .. })
            }),
            (
                "UUID too long",
                with(|h| h.gpus[1].uuid = "u".repeat(129)),
                |e| matches!(e, HelloError::Gpu { index: 1, .. }),
            ),
        ];
        for (name, h, ok) in cases {
            let state = new_state(TENANTS, None);
            match state.hello(h) {
                Err(e) => assert!(ok(&e), "{name}: wrong error {e:?}"),
                Ok(_) => panic!("{name}: accepted"),
            }
            assert!(state.nodes().is_empty(), "{name}");
        }
        // The limits themselves are allowed.
        let state = new_state(TENANTS, None);
        let mut longest = hello(&"n".repeat(253), 1, 8);
        for (i, g) in longest.gpus.iter_mut().enumerate() {
            g.uuid = format!("{i}{}", "u".repeat(127));
        }
        for h in [longest, hello("a-1", 1, 0)] {
            state.hello(h).unwrap();
        }
        assert_eq!(state.nodes().len(), 2);
    }

    // ---- 8. Attribution and live figures -----------------------------------

    #[test]
    fn attribution_by_glob_and_uuid() {
        // Invariant: a GPU goes to the tenant claiming its UUID, else to
        // the one leasing its node, and its energy lands there.
        // (node, GPUs, tenant per GPU, node tenant)
        type Case = (&'static str, usize, &'static [&'static str], &'static str);
        let cases: [Case; 4] = [
            ("a-1", 2, &["lab-a", "lab-a"], "lab-a"),
            ("a-2", 2, &["lab-a", "lab-b"], "lab-a"),
            ("z-1", 2, &["lab-b", UNASSIGNED], UNASSIGNED),
            ("b-1", 1, &[UNASSIGNED], UNASSIGNED),
        ];
        let state = new_state(TENANTS, None);
        let mut want: HashMap<&str, u64> = HashMap::new();
        for (k, (node, n, tenants, node_tenant)) in cases.into_iter().enumerate() {
            let h = connect(&state, node, 1, n);
            let step = 1_000 * (k as u64 + 1);
            let counters0: Vec<(u64, Option<u64>)> = (0..n).map(|_| (1, Some(0))).collect();
            let counters1: Vec<(u64, Option<u64>)> =
                (0..n).map(|i| (1, Some(step * (i as u64 + 1)))).collect();
            ingest(
                &state,
                &h,
                vec![sample(1, T0, &counters0), sample(2, T0 + SEC, &counters1)],
            );
            let g = lock(&h.node);
            let got: Vec<&str> = g.gpus.iter().map(|g| &*g.tenant).collect();
            assert_eq!(got, tenants, "{node}");
            assert_eq!(&*g.tenant, node_tenant, "{node}");
            for (i, t) in tenants.iter().enumerate() {
                *want.entry(t).or_default() += step * (i as u64 + 1);
            }
        }
        for (t, e) in want {
            assert_eq!(tenant_energy(&state, t), e, "{t}");
        }
        assert_totals_match_gpus(&state);
    }

    #[test]
    fn a_leased_gpu_is_reported_by_one_connected_node_at_a_time() {
        // Invariant: a GPU leased by UUID without a node is admitted on one
        // connected node at a time; another node announcing it is refused
        // (counted, no node created) until the holder's stream ends or its
        // inventory drops the GPU. A lease naming its node admits it there
        // only. Unleased UUIDs are not policed.
        let tenants = format!(
            "{TENANTS}\n[[tenant]]\nid = \"lab-p\"\ncontracted_kw = 1\n\
             gpus = [{{ uuid = \"pinned-0\", node = \"p-*\" }}]\n"
        );
        let state = new_state(&tenants, None);
        let held = |s: &State| s.counters.gpu_claims_refused[CLAIM_HELD].load(Ordering::Relaxed);
        let z = state
            .hello(hello_with("z-1", 1, &["z-1-gpu0", "z-1-gpu1"]))
            .unwrap()
            .0;
        match state.hello(hello_with("evil-1", 1, &["free-0", "z-1-gpu0"])) {
            Err(HelloError::GpuHeldElsewhere {
                uuid,
                tenant,
                holder,
                node,
            }) => {
                assert_eq!(
                    (&*uuid, &*tenant, &*holder, &*node),
                    ("z-1-gpu0", "lab-b", "z-1", "evil-1")
                );
            }
            other => panic!("evil-1 admitted with z-1's leased GPU: {other:?}"),
        }
        assert_eq!(held(&state), 1);
        assert!(lock(&state.nodes).get("evil-1").is_none());
        // An unleased UUID held elsewhere is not policed; z-1 itself may
        // reconnect with its GPU.
        state.hello(hello_with("evil-2", 1, &["z-1-gpu1"])).unwrap();
        state.hello(hello_with("z-1", 1, &["z-1-gpu0"])).unwrap();
        state.disconnect(&z); // the superseded stream ends: changes nothing
        assert!(state.hello(hello_with("evil-1", 1, &["z-1-gpu0"])).is_err());
        // The GPU leaves z-1's inventory: it may turn up elsewhere.
        let z = state.hello(hello_with("z-1", 2, &["z-1-gpu1"])).unwrap().0;
        let m = state.hello(hello_with("m-1", 1, &["z-1-gpu0"])).unwrap().0;
        assert_eq!(&*lock(&m.node).gpus[0].tenant, "lab-b");
        // Its new node's stream ends: z-1 may take it back.
        state.disconnect(&m);
        state.disconnect(&z);
        state.hello(hello_with("z-1", 3, &["z-1-gpu0"])).unwrap();
        assert_eq!(held(&state), 2);
        // A lease naming its node: refused elsewhere, even unheld.
        match state.hello(hello_with("evil-1", 1, &["pinned-0"])) {
            Err(HelloError::GpuLeasedElsewhere {
                uuid,
                tenant,
                allowed,
                node,
            }) => {
                assert_eq!(
                    (&*uuid, &*tenant, &*allowed, &*node),
                    ("pinned-0", "lab-p", "p-*", "evil-1")
                );
            }
            other => panic!("evil-1 admitted with a GPU leased on p-*: {other:?}"),
        }
        assert_eq!(
            state.counters.gpu_claims_refused[CLAIM_LEASE_NODE].load(Ordering::Relaxed),
            1
        );
        let p = state.hello(hello_with("p-7", 1, &["pinned-0"])).unwrap().0;
        assert_eq!(&*lock(&p.node).gpus[0].tenant, "lab-p");
        // A GPU leased by a reload is held by the connected node that has
        // it from then on.
        assert!(state.hello(hello_with("evil-3", 1, &["late-0"])).is_ok());
        state.hello(hello_with("q-1", 1, &["late-0"])).unwrap();
        state.reload_tenants(
            Tenants::from_toml(&format!(
                "{tenants}\n[[tenant]]\nid = \"lab-q\"\ncontracted_kw = 1\ngpus = [\"late-0\"]\n"
            ))
            .unwrap(),
        );
        assert!(matches!(
            state.hello(hello_with("evil-4", 1, &["late-0"])),
            Err(HelloError::GpuHeldElsewhere { .. })
        ));
    }

    #[test]
    fn tenant_power_sums_only_fresh_gpus() {
        // Invariant: live power counts a GPU only while its last reading is
        // within the stale window and not lost; the others count as stale.
        // (configured stale_after, offset of `now`, expected lab-a
        //  (power, reporting, stale), lab-b (power, reporting, stale))
        type Live = (u64, u64, u64);
        let s = Duration::from_secs;
        let cases: [(Option<Duration>, Duration, Live, Live); 6] = [
            (Some(s(5)), s(0), (350_000, 3, 1), (70_000, 1, 0)),
            (Some(s(5)), s(4), (350_000, 3, 1), (70_000, 1, 0)),
            (Some(s(5)), s(6), (0, 0, 4), (0, 0, 1)),
            // Unset: three report intervals (1 s each).
            (None, s(2), (350_000, 3, 1), (70_000, 1, 0)),
            (None, s(4), (0, 0, 4), (0, 0, 1)),
            (Some(s(3600)), s(60), (350_000, 3, 1), (70_000, 1, 0)),
        ];
        for (stale_after, offset, want_a, want_b) in cases {
            let state = new_state(TENANTS, stale_after);
            let a1 = connect(&state, "a-1", 1, 2);
            let a2 = connect(&state, "a-2", 1, 3);
            // Stamped as they arrive (see
            // old_samples_that_just_arrived_are_not_live_power for late).
            let t0 = unix_nanos_now();
            ingest(
                &state,
                &a1,
                vec![sample(1, t0, &[(100_000, None), (200_000, None)])],
            );
            // a-2's GPU 2 (lab-a) never reports: always stale.
            ingest(
                &state,
                &a2,
                vec![sample(1, t0, &[(50_000, None), (70_000, None)])],
            );
            let now = Instant::now() + offset;
            let live = live(&state, now);
            let got = |t: &str| {
                let l = &live[t];
                (l.power_milliwatts, l.reporting, l.stale)
            };
            assert_eq!(got("lab-a"), want_a, "{stale_after:?} +{offset:?}");
            assert_eq!(got("lab-b"), want_b, "{stale_after:?} +{offset:?}");
            assert_eq!(got(UNASSIGNED), (0, 0, 0));
            let n = lock(&a2.node);
            let window = n.stale_window(stale_after);
            let fresh: Vec<bool> = n.gpus.iter().map(|g| g.fresh(now, window)).collect();
            let reporting = want_b.1 == 1;
            assert_eq!(fresh, vec![reporting, reporting, false]);
        }
    }

    #[test]
    fn old_samples_that_just_arrived_are_not_live_power() {
        // A spool replayed 45 minutes late: its samples arrive now, but by
        // their own timestamps they are long past the staleness window, so
        // none of them is live power; the energy still counts. The first
        // sample stamped now is live again.
        let state = new_state(TENANTS, Some(Duration::from_secs(30)));
        let h = connect(&state, "a-1", 1, 2);
        let late = unix_nanos_now() - 45 * 60 * SEC;
        let replay: Vec<NodeSample> = (0..10)
            .map(|k| {
                let e = Some(k * 700_000);
                sample(k + 1, late + k as i64 * SEC, &[(700_000, e), (700_000, e)])
            })
            .collect();
        ingest(&state, &h, replay);
        assert_eq!(tenant_energy(&state, "lab-a"), 2 * 9 * 700_000);
        let now = Instant::now();
        let l = live(&state, now)["lab-a"];
        assert_eq!((l.power_milliwatts, l.reporting, l.stale), (0, 0, 2));
        let n = lock(&h.node);
        let window = n.stale_window(Some(Duration::from_secs(30)));
        assert!(n.gpus.iter().all(|g| !g.fresh(now, window)));
        assert_eq!(
            parts(|add| n.live(now, window, add)),
            parts(|add| n.walk_live(now, window, add))
        );
        drop(n);
        let e = Some(20 * 700_000);
        ingest(
            &state,
            &h,
            vec![sample(11, unix_nanos_now(), &[(500_000, e), (600_000, e)])],
        );
        let l = live(&state, Instant::now())["lab-a"];
        assert_eq!(
            (l.power_milliwatts, l.reporting, l.stale),
            (1_100_000, 2, 0)
        );
    }

    #[test]
    fn reload_reattributes_without_losing_energy() {
        // Invariant: a reload moves GPUs to their new tenant for future
        // energy and live power; energy already counted stays where it was.
        const MOVED: &str = r#"
            [[tenant]]
            id = "lab-b"
            contracted_kw = 0.5
            nodes = ["a-1"]

            [[tenant]]
            id = "lab-c"
            contracted_kw = 2
            gpus = ["a-2-gpu0"]
        "#;
        let state = new_state(TENANTS, None);
        let a1 = connect(&state, "a-1", 1, 2);
        let a2 = connect(&state, "a-2", 1, 2);
        // Stamped now, so that live power can follow the reload.
        let t0 = unix_nanos_now();
        let batch =
            |seq: u64, c: u64| vec![sample(seq, t0 + seq as i64 * SEC, &[(100_000, Some(c)); 2])];
        ingest(&state, &a1, batch(1, 0));
        ingest(&state, &a2, batch(1, 0));
        ingest(&state, &a1, batch(2, 1_000));
        ingest(&state, &a2, batch(2, 1_000));
        // Before: lab-a has a-1 ×2 and a-2 GPU 0; lab-b has a-2 GPU 1.
        assert_eq!(tenant_energy(&state, "lab-a"), 3_000);
        assert_eq!(tenant_energy(&state, "lab-b"), 1_000);

        // In force from just after the samples so far (this test's clock
        // runs in 2023: a reload now would not cover its later samples).
        state.reload_tenants_from(Tenants::from_toml(MOVED).unwrap(), T0 + 2 * SEC + 1);
        assert_eq!(state.counters.reloads_ok.load(Ordering::Relaxed), 1);
        // (handle, tenant per GPU, node tenant) after the reload
        let after: [(&StreamHandle, [&str; 2], &str); 2] = [
            (&a1, ["lab-b", "lab-b"], "lab-b"),
            (&a2, ["lab-c", UNASSIGNED], UNASSIGNED),
        ];
        for (h, gpus, node) in after {
            let n = lock(&h.node);
            let got: Vec<&str> = n.gpus.iter().map(|g| &*g.tenant).collect();
            assert_eq!(got, gpus);
            assert_eq!(&*n.tenant, node);
        }
        // Nothing counted so far moved.
        assert_eq!(tenant_energy(&state, "lab-a"), 3_000);
        assert_eq!(tenant_energy(&state, "lab-b"), 1_000);

        ingest(&state, &a1, batch(3, 1_500));
        ingest(&state, &a2, batch(3, 1_700));
        assert_eq!(tenant_energy(&state, "lab-a"), 3_000);
        assert_eq!(tenant_energy(&state, "lab-b"), 1_000 + 2 * 500);
        assert_eq!(tenant_energy(&state, "lab-c"), 700);
        assert_eq!(tenant_energy(&state, UNASSIGNED), 700);
        // No energy lost or doubled across the reload.
        let all: u64 = state.totals().values().map(|t| t.energy_millijoules).sum();
        let gpus: u64 = gpu_energy(&a1).iter().chain(&gpu_energy(&a2)).sum();
        assert_eq!(all, gpus);
        assert_eq!(gpus, 2 * 1_500 + 2 * 1_700);
        // Live power follows the new file.
        let live = live(&state, Instant::now());
        assert_eq!(live["lab-b"].power_milliwatts, 200_000);
        assert_eq!(live["lab-c"].power_milliwatts, 100_000);
        assert_eq!(live[UNASSIGNED].power_milliwatts, 100_000);
        assert!(!live.contains_key("lab-a"));
    }

    #[test]
    fn energy_is_attributed_by_the_lease_in_force_at_the_sample_time() {
        // Invariant: an interval belongs to the tenant of the version in
        // force at its end (its sample's timestamp), whenever it arrives:
        // a sample delivered after a lease change but stamped before it
        // stays with the old tenant, in its own minute; a version that
        // takes effect in the future applies once its time has come.
        const V2: &str = "[[tenant]]\nid = \"lab-b\"\ncontracted_kw = 1\nnodes = [\"a-1\"]\n";
        const V3: &str = "[[tenant]]\nid = \"lab-c\"\ncontracted_kw = 1\nnodes = [\"a-*\"]\n";
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 1, 1);
        let at =
            |seq: u64, secs: i64, c: u64| vec![sample(seq, T0 + secs * SEC, &[(100_000, Some(c))])];
        ingest(&state, &h, at(1, 0, 0));
        ingest(&state, &h, at(2, 10, 1_000));
        // a-1 moves to lab-b 100 s after T0 (T0 is 20 s into its minute).
        let change = T0 + 100 * SEC;
        state.reload_tenants_from(Tenants::from_toml(V2).unwrap(), change);
        assert_eq!(&*lock(&h.node).gpus[0].tenant, "lab-b");
        // Delivered now, stamped before the change: lab-a's, in its minute.
        ingest(&state, &h, at(3, 70, 3_000));
        ingest(&state, &h, at(4, 99, 4_000));
        // Stamped from the change on: lab-b's.
        ingest(&state, &h, at(5, 100, 4_500));
        ingest(&state, &h, at(6, 130, 6_000));
        assert_eq!(tenant_energy(&state, "lab-a"), 4_000);
        assert_eq!(tenant_energy(&state, "lab-b"), 2_000);
        let (_, c) = state.take_pending();
        let minute = |secs: i64| (T0 + secs * SEC).div_euclid(60 * SEC) * 60;
        // (tenant, minute, energy): the interval 10-70 s (30-90 s of
        // T0's minute) is split by minute, all of it lab-a's; 99-100 s is
        // lab-b's (by its end).
        let mut got: Vec<(String, i64, u64)> = c
            .buckets
            .iter()
            .filter(|(_, d)| d.energy_mj > 0)
            .map(|((t, _, m), d)| (t.to_string(), *m, d.energy_mj))
            .collect();
        got.sort();
        let m0 = minute(0);
        assert_eq!(
            got,
            [
                ("lab-a".to_string(), m0, 1_000 + 1_000),
                ("lab-a".to_string(), m0 + 60, 1_000 + 1_000),
                ("lab-b".to_string(), m0 + 60, 500),
                ("lab-b".to_string(), m0 + 120, 1_500),
            ]
        );
        // A version taking effect in the future: lab-b stays in force (and
        // the fast path books to it) until then.
        let soon = unix_nanos_now() + 200_000_000;
        state.reload_tenants_from(Tenants::from_toml(V3).unwrap(), soon);
        assert_eq!(&*lock(&h.node).gpus[0].tenant, "lab-b");
        assert_eq!(state.tenants().all()[0].id.as_ref(), "lab-b");
        let until = Instant::now() + Duration::from_secs(10);
        while &*lock(&h.node).gpus[0].tenant != "lab-c" {
            assert!(
                Instant::now() < until,
                "the future version never came into force"
            );
            std::thread::sleep(Duration::from_millis(10));
            state.advance_tenants();
        }
        assert_eq!(state.tenants().all()[0].id.as_ref(), "lab-c");
        // Still stamped in lab-b's time: lab-b's.
        ingest(&state, &h, at(7, 140, 7_000));
        assert_eq!(tenant_energy(&state, "lab-b"), 3_000);
        assert_eq!(tenant_energy(&state, "lab-c"), 0);
    }

    // ---- 9. Lost readings --------------------------------------------------

    #[test]
    fn lost_reading_adds_nothing_and_next_delta_covers_the_gap() {
        // Invariant: a lost reading adds no energy and keeps the last
        // counter; the first delta after the GPU answers covers the gap.
        // (counter per sample, None = lost; expected energy after each)
        type Case = (&'static [Option<u64>], &'static [u64]);
        let cases: [Case; 4] = [
            (&[Some(1_000), None, None, Some(9_000)], &[0, 0, 0, 8_000]),
            (
                &[
                    Some(1_000),
                    Some(2_000),
                    None,
                    Some(2_500),
                    None,
                    Some(4_000),
                ],
                &[0, 1_000, 1_000, 1_500, 1_500, 3_000],
            ),
            // Lost from the start: the first counter is a baseline.
            (&[None, Some(500), Some(800)], &[0, 0, 300]),
            // Came back after a driver reload: the counter since the reload
            // (100 mJ), not power over the whole gap.
            (&[Some(5_000), None, None, Some(100)], &[0, 0, 0, 100]),
        ];
        for (counters, want) in cases {
            let state = new_state(TENANTS, Some(Duration::from_secs(60)));
            let h = connect(&state, "a-1", 1, 1);
            let mut last_counter = None;
            let t0 = unix_nanos_now();
            for (i, (&c, &e)) in counters.iter().zip(want).enumerate() {
                let seq = i as u64 + 1;
                let mut s = sample(seq, t0 + i as i64 * SEC, &[(10_000, c)]);
                if c.is_none() {
                    s.gpus[0] = lost(0);
                }
                let out = ingest(&state, &h, vec![s]);
                assert_eq!(out.accepted, 1);
                let n = lock(&h.node);
                let g = &n.gpus[0];
                assert_eq!(g.energy_millijoules, e, "{counters:?} step {i}");
                if c.is_some() {
                    last_counter = c;
                }
                assert_eq!(g.last_counter, last_counter, "{counters:?} step {i}");
                assert_eq!(
                    g.fresh(Instant::now(), Duration::from_secs(60)),
                    c.is_some()
                );
            }
            let live = live(&state, Instant::now());
            let lost_last = counters.last().unwrap().is_none();
            assert_eq!(live["lab-a"].stale, u64::from(lost_last));
            assert_totals_match_gpus(&state);
        }
    }

    #[test]
    fn lost_reading_without_counter_integrates_the_gap_on_return() {
        // Invariant: without a counter, a lost reading adds nothing and the
        // next reading's power covers the time since the last good one.
        let state = new_state(TENANTS, None);
        let mut hl = hello("a-1", 1, 1);
        hl.gpus[0].energy_counter_supported = false;
        let h = state.hello(hl).unwrap().0;
        let mut gone = sample(2, T0 + SEC, &[(0, None)]);
        gone.gpus[0] = lost(0);
        // (sample, energy after it)
        let steps = [
            (sample(1, T0, &[(100_000, None)]), 0),
            (gone, 0),
            (sample(3, T0 + 3 * SEC, &[(100_000, None)]), 300_000),
            (sample(4, T0 + 4 * SEC, &[(100_000, None)]), 400_000),
        ];
        for (s, want) in steps {
            ingest(&state, &h, vec![s]);
            assert_eq!(gpu_energy(&h), vec![want]);
        }
        assert_eq!(tenant_energy(&state, "lab-a"), 400_000);
    }

    // ---- Regressions -----------------------------------------------------

    #[test]
    fn missing_counter_reading_is_not_counted_twice() {
        // Invariant: a GPU whose counter read fails once (energy absent,
        // power present, not lost: NVML's "reported absent") is still
        // billed last − first counter, never the gap twice.
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 1, 1);
        let steps = [
            sample(1, T0, &[(100_000, Some(1_000))]),
            // Power alone would bill this interval differently.
            sample(2, T0 + SEC, &[(650_000, None)]),
            sample(3, T0 + 2 * SEC, &[(100_000, Some(201_000))]),
        ];
        ingest(&state, &h, steps.to_vec());
        // 200 000 mJ, as the counter says: the failed read adds nothing and
        // the next delta covers both intervals.
        assert_eq!(gpu_energy(&h), vec![200_000]);
        assert_eq!(tenant_energy(&state, "lab-a"), 200_000);
    }

    #[test]
    fn implausible_counter_jump_cannot_overflow_energy() {
        // Invariant: an untrusted agent cannot make ingest panic or wrap a
        // GPU's energy past what 3× its power limit allows over the time
        // elapsed.
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 1, 1);
        let steps = vec![
            sample(1, T0, &[(1_000, Some(0))]),
            sample(2, T0 + SEC, &[(1_000, Some(u64::MAX))]),
            sample(3, T0 + 2 * SEC, &[(1_000, Some(0))]), // reset: +1 J
        ];
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            state.ingest(&h, steps, Vec::new()).map(|o| o.accepted)
        }));
        assert!(result.is_ok(), "ingest panicked");
        // The jump is counted from power (1 W for 1 s); the fall back to 0
        // is a reload with nothing used since.
        assert_eq!(gpu_energy(&h), vec![1_000]);
        assert_eq!(h.node.lock().unwrap().gpus[0].counter_resets, 2);
    }
    // ---- Clocks, limits and inventories that change ----------------------

    #[test]
    fn older_epoch_is_refused_even_after_the_current_stream_is_gone() {
        // Invariant: a stale agent instance cannot take a node over once
        // the newer one has disconnected (or after a collector restart):
        // the dedup cursor of its epoch is gone, so its re-sent samples
        // would count twice.
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 100, 1);
        ingest(&state, &h, vec![sample(1, T0, &[(1, Some(1_000))])]);
        state.disconnect(&h);
        assert!(matches!(
            state.hello(hello("a-1", 50, 1)),
            Err(HelloError::StaleEpoch {
                got: 50,
                current: 100,
                connected: false,
            })
        ));
    }

    #[test]
    fn a_stale_epoch_refusal_names_the_current_epoch_and_says_whether_it_is_connected() {
        // Invariant: the refusal of an older epoch is true about the
        // current stream (still connected, or gone) and names the epoch
        // to move above.
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 100, 1);
        let text = |state: &State| state.hello(hello("a-1", 50, 1)).unwrap_err().to_string();
        let connected = text(&state);
        assert!(connected.contains("current epoch 100"), "{connected}");
        assert!(connected.contains("still connected"), "{connected}");
        state.disconnect(&h);
        let gone = text(&state);
        assert!(gone.contains("current epoch 100"), "{gone}");
        assert!(!gone.contains("connected"), "{gone}");
        assert!(gone.contains("epoch above it"), "{gone}");
    }

    #[test]
    fn older_epoch_takes_over_from_an_epoch_stamped_in_the_future() {
        // Invariant: an agent whose clock was far ahead (epoch beyond the
        // allowed skew) and was then corrected is admitted with its lower
        // epoch once the old stream has disconnected, and its counter delta
        // across the gap is counted once.
        let state = new_state(TENANTS, None);
        let future = u64::try_from(unix_nanos_now()).unwrap() + 86_400 * SEC as u64;
        let h = connect(&state, "a-1", future, 1);
        assert!(matches!(
            state.hello(hello("a-1", 50, 1)),
            Err(HelloError::StaleEpoch { got: 50, .. })
        ));
        state.disconnect(&h);
        std::thread::sleep(Duration::from_millis(20));
        let (back, acked) = state.hello(hello("a-1", 50, 1)).unwrap();
        assert_eq!(acked, 0);
        // Its first reading is the new reference; the delta after it counts.
        let out = ingest(
            &state,
            &back,
            vec![
                sample(1, T0 - 3600 * SEC, &[(1, Some(1_010))]),
                sample(2, T0 - 3599 * SEC, &[(1, Some(1_020))]),
            ],
        );
        assert_eq!(out.accepted, 2);
        assert_eq!(gpu_energy(&back), vec![10]);
    }

    #[test]
    fn readings_of_another_agent_instance_behind_the_applied_ones_count_nothing_twice() {
        // Invariant: when a second agent instance for the node takes it
        // over (moving above the epoch that refused it) with readings it
        // took meanwhile, a reading older than one already applied whose
        // counter is behind that one's (and not a reload) adds nothing and
        // moves the counter back by nothing: the energy is counted once.
        behind_readings_count_once(50_000_000_000);
    }

    /// One agent instance applies readings 1-3 of a counter starting at
    /// `c`; another takes the node over with readings 2-5: C+1 to C+5 are
    /// counted once, with no reset.
    fn behind_readings_count_once(c: u64) {
        let state = new_state(TENANTS, None);
        let at = |i: u64| sample(i, T0 + i as i64 * SEC, &[(300_000, Some(c + i * 300_000))]);
        let b = connect(&state, "a-1", 100, 1);
        ingest(&state, &b, (1..=3).map(at).collect());
        assert_eq!(gpu_energy(&b), vec![600_000]);
        let a = connect(&state, "a-1", 101, 1);
        let mut behind: Vec<NodeSample> = (2..=5).map(at).collect();
        for (s, seq) in behind.iter_mut().zip(1..) {
            s.seq = seq;
        }
        ingest(&state, &a, behind);
        assert_eq!(gpu_energy(&a), vec![1_200_000], "C+1 to C+5 once");
        assert_eq!(lock(&a.node).gpus[0].counter_resets, 0);
    }

    #[test]
    fn a_reading_behind_the_applied_ones_soon_after_a_driver_load_is_no_reload() {
        // Invariant: the rule above holds however small the counter is. A
        // driver loaded a few seconds ago has a counter small enough to
        // pass for a reload's; a reading that is behind the applied one by
        // no more than the GPU can draw between their timestamps is still
        // an earlier reading of the same counter, not a reset.
        behind_readings_count_once(1_000_000);
    }

    #[test]
    fn a_reload_stamped_behind_the_last_reading_is_not_taken_for_a_stale_one() {
        // Invariant: a counter that restarted (a reboot) under a clock
        // stepped back is still a reset, counted on from its new value:
        // only a counter behind by what the GPU can draw between the two
        // timestamps is an earlier reading.
        let state = new_state(TENANTS, None);
        let b = connect(&state, "a-1", 100, 1);
        let c = 50_000_000_000;
        ingest(
            &state,
            &b,
            vec![sample(1, T0 + 10 * SEC, &[(300_000, Some(c))])],
        );
        let a = connect(&state, "a-1", 101, 1);
        ingest(
            &state,
            &a,
            vec![
                sample(1, T0 + 5 * SEC, &[(300_000, Some(90_000_000))]),
                sample(2, T0 + 6 * SEC, &[(300_000, Some(90_300_000))]),
            ],
        );
        assert_eq!(gpu_energy(&a), vec![300_000]);
        assert_eq!(lock(&a.node).gpus[0].counter_resets, 1);
    }

    #[test]
    fn a_clock_that_stands_still_does_not_void_counter_energy() {
        // Invariant: when the agent's timestamps stop advancing, counter
        // deltas are bounded by the collector's own clock instead of being
        // discarded.
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 1, 1);
        ingest(&state, &h, vec![sample(1, T0, &[(700_000, Some(0))])]);
        std::thread::sleep(Duration::from_millis(50));
        // 30 J in 50 ms is under 3 x 700 W; same timestamp as before.
        ingest(&state, &h, vec![sample(2, T0, &[(700_000, Some(30_000))])]);
        assert_eq!(gpu_energy(&h), vec![30_000]);
        assert_eq!(lock(&h.node).gpus[0].counter_resets, 0);
    }

    #[test]
    fn counter_deltas_are_kept_whatever_the_agent_clock_does() {
        // Invariant: a counter delta within what the GPU can draw over the
        // samples since its last reading (at the Hello's nominal interval)
        // is counted exactly however the agent's timestamps move, inside
        // one batch too: standing still, stepping back, jumping forward and
        // back. No reset is counted, and each delta is booked once, never
        // in a minute before the GPU's newest timestamp so far.
        // (name, batches of (seq, timestamp − T0 in s, counter J), energy J)
        type Case = (&'static str, &'static [&'static [(u64, i64, u64)]], u64);
        let cases: [Case; 7] = [
            (
                "stands still, then steps back 5 s, in one batch",
                &[&[(1, 0, 0)], &[(2, 1, 300), (3, 1, 600), (4, -4, 900)]],
                900,
            ),
            (
                "stands still from the first sample",
                &[&[(1, 0, 0), (2, 0, 300), (3, 0, 600)]],
                600,
            ),
            (
                "jumps an hour ahead and back",
                &[&[(1, 0, 0), (2, 3600, 300), (3, 2, 600), (4, 3, 900)]],
                900,
            ),
            (
                "steps back a day and runs on",
                &[&[(1, 0, 0), (2, -86_400, 300), (3, -86_399, 600)]],
                600,
            ),
            (
                "stands still while samples were lost (seq gap of 10)",
                &[&[(1, 0, 0), (11, 0, 3_000)]],
                3_000,
            ),
            (
                "stands still across batches",
                &[&[(1, 0, 0)], &[(2, 0, 300)], &[(3, 0, 600), (4, 0, 900)]],
                900,
            ),
            (
                // 3.5 kJ is more than 3 × 700 W over one interval; the
                // clock, behind since the step, ran 5 s.
                "steps back 10 s, then stamps a sample 5 s late",
                &[&[(1, 0, 0), (2, -10, 300), (3, -5, 3_800)]],
                3_800,
            ),
        ];
        for (name, batches, joules) in cases {
            let state = new_state(TENANTS, None);
            let h = connect(&state, "a-1", 1, 1);
            let mut newest = T0;
            for batch in batches {
                let samples = batch
                    .iter()
                    .map(|&(seq, at, j)| {
                        newest = newest.max(T0 + at * SEC);
                        sample(seq, T0 + at * SEC, &[(300_000, Some(j * 1_000))])
                    })
                    .collect();
                let out = ingest(&state, &h, samples);
                assert_eq!(out.accepted, batch.len() as u64, "{name}");
            }
            let want = joules * 1_000;
            assert_eq!(gpu_energy(&h), vec![want], "{name}");
            assert_eq!(lock(&h.node).gpus[0].counter_resets, 0, "{name}");
            assert_eq!(tenant_energy(&state, "lab-a"), want, "{name}");
            let (_, c) = state.take_pending();
            let b = booked(&c, "lab-a", "a-1");
            assert_eq!(
                (b.energy_mj, b.estimated_mj),
                (want, 0),
                "{name}: booked once"
            );
            let first_minute = T0.div_euclid(60 * SEC) * 60;
            let last_minute = newest.div_euclid(60 * SEC) * 60;
            for ((_, _, minute), d) in &c.buckets {
                if d.energy_mj > 0 {
                    assert!(
                        (first_minute..=last_minute).contains(minute),
                        "{name}: energy booked at {minute}, outside {first_minute}..={last_minute}"
                    );
                }
            }
        }
    }

    #[test]
    fn counter_deltas_are_kept_when_a_clock_behind_steps_forward() {
        // Invariant: a clock that steps forward while it is behind (a
        // correction, or half of one) vouches for the time it jumped only as
        // far as the counter needs it: the readings after it, delivered
        // together (a spool), keep their exact deltas and count no reset.
        // A spool of 1,200 samples 1 s apart, 300 J each, sent now: on time
        // for 600 s, then an hour behind for 300 s, then stepped forward by
        // (case) seconds.
        for forward in [1_800, 3_590] {
            let state = new_state(TENANTS, None);
            let h = connect(&state, "a-1", 1, 1);
            let start = unix_nanos_now() - 1_200 * SEC;
            let samples: Vec<NodeSample> = (1..=1_200u64)
                .map(|seq| {
                    let real = start + (seq as i64 - 1) * SEC;
                    let ts = match seq {
                        1..=600 => real,
                        601..=900 => real - 3_600 * SEC,
                        _ => real - (3_600 - forward) * SEC,
                    };
                    sample(seq, ts, &[(300_000, Some((seq - 1) * 300_000))])
                })
                .collect();
            for batch in samples.chunks(64) {
                let out = ingest(&state, &h, batch.to_vec());
                assert_eq!(out.accepted, batch.len() as u64, "{forward}");
            }
            let want = 1_199 * 300_000;
            assert_eq!(gpu_energy(&h), vec![want], "{forward}");
            assert_eq!(lock(&h.node).gpus[0].counter_resets, 0, "{forward}");
            let (_, c) = state.take_pending();
            let b = booked(&c, "lab-a", "a-1");
            assert_eq!((b.energy_mj, b.estimated_mj), (want, 0), "{forward}");
        }
        // What earlier deltas did not use still counts for the next one: a
        // clock that stood still twice, then runs on from where it stood,
        // at 720 W (a GPU draws a little over its limit at times).
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 1, 1);
        let steps = [(1, 0), (2, 0), (3, 0), (4, 1)];
        let samples = steps
            .iter()
            .map(|&(seq, at)| sample(seq, T0 + at * SEC, &[(720_000, Some((seq - 1) * 720_000))]))
            .collect();
        assert_eq!(ingest(&state, &h, samples).accepted, 4);
        assert_eq!(gpu_energy(&h), vec![3 * 720_000]);
        assert_eq!(lock(&h.node).gpus[0].counter_resets, 0);
    }

    #[test]
    fn a_clock_that_stands_still_vouches_for_no_more_time_than_a_timestamp() {
        // Invariant: the samples since the last reading stand for time only
        // up to the collector's clock plus the allowed skew, the furthest
        // any timestamp may claim: an agent whose clock stands still and
        // whose sequence numbers leap (with a nominal interval of an hour)
        // cannot make an absurd counter jump plausible; it is counted as a
        // reset and adds no energy.
        let mut state = new_state(TENANTS, None);
        state.cfg.max_sample_age = Duration::from_secs(3600);
        let mut hl = hello("a-1", 1, 1);
        hl.interval = Duration::from_secs(3600);
        let h = state.hello(hl).unwrap().0;
        // 30 minutes ago, standing still: with the 10-minute skew, at most
        // 40 minutes (and the test's own run time) to vouch for, 5.04 MJ at
        // 3 × 700 W.
        let ts = unix_nanos_now() - 1800 * SEC;
        let mj = 5_000_000_000;
        let steps = [
            (1, 0),
            (1 + MAX_SEQ_JUMP, mj),
            (1 + 2 * MAX_SEQ_JUMP, 2 * mj),
            (1 + 3 * MAX_SEQ_JUMP, u64::MAX / 2),
        ];
        let out = ingest(
            &state,
            &h,
            steps
                .iter()
                .map(|&(seq, c)| sample(seq, ts, &[(1_000, Some(c))]))
                .collect(),
        );
        assert_eq!(out.accepted, 4);
        assert_eq!(gpu_energy(&h), vec![mj]);
        assert_eq!(lock(&h.node).gpus[0].counter_resets, 2);

        // Timestamps that swing between 30 minutes ago and now: each swing
        // forward is time only once. 3 MJ fits 30 minutes at 3 × 700 W
        // (3.78 MJ); the next 3 MJ would need them again.
        let mut hl = hello("a-3", 1, 1);
        hl.interval = Duration::from_secs(3600);
        let h = state.hello(hl).unwrap().0;
        let now = unix_nanos_now();
        let swings = [
            (1, now - 1800 * SEC, 0),
            (2, now, 3_000_000_000),
            (3, now - 1800 * SEC, 6_000_000_000),
            (4, now, 9_000_000_000),
        ];
        let out = ingest(
            &state,
            &h,
            swings
                .iter()
                .map(|&(seq, ts, c)| sample(seq, ts, &[(1_000, Some(c))]))
                .collect(),
        );
        assert_eq!(out.accepted, 4);
        assert_eq!(gpu_energy(&h), vec![3_000_000_000]);
        assert_eq!(lock(&h.node).gpus[0].counter_resets, 2);
    }

    #[test]
    fn power_fills_at_most_the_staleness_window_of_a_gap() {
        // Invariant: energy estimated from power covers at most the
        // staleness window before the reading it comes from; the rest of a
        // longer gap is expected GPU time that is not covered and carries
        // no energy. The same holds where a counter judged implausible
        // falls back to power.
        // (stale_after, counter before and after the gap, energy mJ, resets)
        type Case = (Option<Duration>, Option<(u64, u64)>, u64, u64);
        let cases: [Case; 5] = [
            // No counter, default window (3 × 1 s): 600 W × 3 s.
            (None, None, 1_800_000, 0),
            (Some(Duration::from_secs(60)), None, 36_000_000, 0),
            // A counter jump beyond 3 × 700 W over the hour.
            (None, Some((0, u64::MAX / 2)), 1_800_000, 1),
            // Back to more than the hour allows: not a believable reload.
            (
                None,
                Some((9_000_000_000_000, 8_000_000_000_000)),
                1_800_000,
                1,
            ),
            // A believable counter delta over the gap is kept whole.
            (None, Some((0, 2_000_000_000)), 2_000_000_000, 0),
        ];
        for (stale_after, counter, want, resets) in cases {
            let state = new_state(TENANTS, stale_after);
            let mut hl = hello("a-1", 1, 1);
            hl.gpus[0].energy_counter_supported = counter.is_some();
            let (h, _) = state.hello(hl).unwrap();
            let (c0, c1) = counter.unzip();
            ingest(
                &state,
                &h,
                vec![
                    sample(1, T0, &[(600_000, c0)]),
                    sample(2, T0 + 3600 * SEC, &[(600_000, c1)]),
                ],
            );
            let case = format!("{stale_after:?} {counter:?}");
            assert_eq!(gpu_energy(&h), vec![want], "{case}");
            assert_eq!(lock(&h.node).gpus[0].counter_resets, resets, "{case}");
            let (_, c) = state.take_pending();
            let b = booked(&c, "lab-a", "a-1");
            assert_eq!(b.energy_mj, want, "{case}");
            assert_eq!(b.expected_gpu_ns, 3600 * SEC as u64, "{case}");
            if counter.is_some() && resets == 0 {
                // Counter energy over a long gap is real but not coverage.
                assert_eq!((b.estimated_mj, b.gpu_ns), (0, 0), "{case}");
                continue;
            }
            // Only the stretch the estimate stands for is covered, and its
            // energy lies in that stretch: the last minute, here.
            let window = stale_after.unwrap_or(Duration::from_secs(3));
            assert_eq!(b.estimated_mj, want, "{case}");
            assert_eq!(u128::from(b.gpu_ns), window.as_nanos(), "{case}");
            let end = T0 + 3600 * SEC;
            let from_minute = (end - window.as_nanos() as i64).div_euclid(60 * SEC) * 60;
            let in_stretch: u64 = c
                .buckets
                .iter()
                .filter(|((_, _, m), _)| *m >= from_minute)
                .map(|(_, d)| d.energy_mj)
                .sum();
            assert_eq!(in_stretch, want, "{case}");
        }
    }

    #[test]
    fn future_timestamps_are_rejected_alone() {
        // Invariant: a sample stamped beyond the allowed clock skew is
        // rejected and cannot pin the GPU's clock; later samples count.
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 1, 1);
        let now = unix_nanos_now();
        let out = ingest(
            &state,
            &h,
            vec![
                sample(1, now - 2 * SEC, &[(1, Some(100))]),
                sample(2, now + 3600 * SEC, &[(1, Some(200))]),
                sample(3, now - SEC, &[(1, Some(300))]),
            ],
        );
        assert_eq!((out.accepted, out.acked_seq), (2, 3));
        assert_eq!(out.rejected, vec![(2, Reject::Timestamp)]);
        assert_eq!(gpu_energy(&h), vec![200]);
    }

    #[test]
    fn a_raised_power_limit_is_honoured() {
        // Invariant: the power bound follows the GPU's current limit, not
        // only the one announced at the Hello.
        let state = new_state(TENANTS, None);
        let mut hl = hello("a-1", 1, 1);
        hl.gpus[0].power_limit_milliwatts = Some(200_000);
        let (h, _) = state.hello(hl).unwrap();
        let mut s = sample(1, T0, &[(650_000, Some(0))]);
        s.gpus[0].power_limit_milliwatts = Some(700_000);
        let out = ingest(
            &state,
            &h,
            vec![s, sample(2, T0 + SEC, &[(650_000, Some(650_000))])],
        );
        assert_eq!(out.accepted, 2);
        assert_eq!(gpu_energy(&h), vec![650_000]);
    }

    #[test]
    fn hostile_limits_and_labels_are_refused() {
        // Invariant: limits and label strings from an agent are bounded.
        let state = new_state(TENANTS, None);
        for limit in [0, MAX_POWER_LIMIT_MILLIWATTS + 1, u64::MAX] {
            let mut hl = hello("a-1", 1, 1);
            hl.gpus[0].power_limit_milliwatts = Some(limit);
            assert!(
                matches!(state.hello(hl), Err(HelloError::Gpu { .. })),
                "{limit}"
            );
        }
        let mut hl = hello("a-1", 1, 1);
        hl.gpus[0].model = "x".repeat(129);
        assert!(matches!(state.hello(hl), Err(HelloError::Gpu { .. })));
        let mut hl = hello("a-1", 1, 1);
        hl.agent_version = "v\n1".into();
        assert!(matches!(state.hello(hl), Err(HelloError::AgentVersion)));
        let h = connect(&state, "a-1", 1, 1);
        let mut s = sample(1, T0, &[(1, Some(0))]);
        s.gpus[0].power_limit_milliwatts = Some(u64::MAX);
        let out = ingest(&state, &h, vec![s]);
        assert_eq!(out.rejected, vec![(1, Reject::Power)]);
    }

    #[test]
    fn a_gpu_that_leaves_the_inventory_and_returns_resumes_its_counter() {
        // Invariant: a GPU missing from one Hello keeps its counter, so its
        // next delta after it returns covers the absence.
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 1, 2);
        ingest(
            &state,
            &h,
            vec![sample(1, T0, &[(1, Some(100)), (1, Some(1_000))])],
        );
        // Restart without GPU 1 (say it could not be identified).
        let mut one = hello("a-1", 2, 2);
        one.gpus.remove(1);
        let (h1, _) = state.hello(one).unwrap();
        ingest(&state, &h1, vec![sample(1, T0 + SEC, &[(1, Some(200))])]);
        // It is back.
        let (h2, _) = state.hello(hello("a-1", 3, 2)).unwrap();
        ingest(
            &state,
            &h2,
            vec![sample(1, T0 + 2 * SEC, &[(1, Some(300)), (1, Some(1_500))])],
        );
        assert_eq!(gpu_energy(&h2), vec![200, 500]);
    }

    #[test]
    fn a_counter_and_power_read_failing_together_lose_nothing() {
        // Invariant: a tick where both the counter and power are absent
        // adds nothing; the next counter delta covers it exactly.
        let state = new_state(TENANTS, None);
        let h = connect(&state, "a-1", 1, 1);
        let mut blank = sample(2, T0 + SEC, &[(0, None)]);
        blank.gpus[0].power_milliwatts = None;
        ingest(
            &state,
            &h,
            vec![
                sample(1, T0, &[(100_000, Some(0))]),
                blank,
                sample(3, T0 + 2 * SEC, &[(100_000, Some(200_000))]),
            ],
        );
        assert_eq!(gpu_energy(&h), vec![200_000]);
    }
    // ---- What goes into the ledger ----------------------------------------

    fn booked(c: &Commit, tenant: &str, node: &str) -> BucketDelta {
        c.buckets
            .iter()
            .filter(|((t, n, _), _)| &**t == tenant && &**n == node)
            .fold(BucketDelta::default(), |mut acc, (_, d)| {
                acc.add(d);
                acc
            })
    }

    /// lab-a's power (kW, two GPUs sharing it) in each of ten minutes,
    /// against its 1 kW contract: seven minutes above it (one exactly at
    /// it, which is not above).
    const TEN_MINUTES_KW: [u64; 10] = [2, 2, 1, 0, 2, 2, 2, 1, 2, 2];

    /// A sample every second from `m0` (a minute start) through the ten
    /// minutes of `TEN_MINUTES_KW`, on node a-1's two GPUs with counters.
    fn ten_minutes(m0: i64) -> Vec<NodeSample> {
        let mut counter = 0u64;
        (0..=600i64)
            .map(|k| {
                // The interval ending at second k lies in minute (k-1)/60.
                let kw = if k == 0 {
                    0
                } else {
                    TEN_MINUTES_KW[((k - 1) / 60) as usize]
                };
                counter += kw * 500_000;
                let gpu = (kw * 500_000, Some(counter));
                sample(k as u64 + 1, m0 + k * SEC, &[gpu, gpu])
            })
            .collect()
    }

    /// Commits what `state` gathered into a new ledger in `dir` and reads
    /// lab-a's over-contract seconds and overage (mJ) per minute of the ten
    /// minutes from `m0`, and its over-contract counter (the state's, which
    /// must be the ledger's).
    fn over_contract_in_ledger(
        state: &State,
        dir: &std::path::Path,
        m0: i64,
    ) -> (Vec<(f64, f64)>, crate::ledger::Snapshot) {
        let path = dir.join("ledger.db");
        let mut ledger = if path.exists() {
            crate::ledger::Ledger::open(&path).unwrap()
        } else {
            crate::ledger::Ledger::create(&path).unwrap()
        };
        let (_, c) = state.take_pending();
        let committed = ledger.commit(&c).unwrap();
        state.add_over_contract(&committed.over_contract_ns);
        drop(ledger);
        let from = crate::usage::rfc3339(m0 / SEC);
        let to = crate::usage::rfc3339(m0 / SEC + 600);
        let reader = crate::ledger::Reader::open(&path).unwrap();
        let tenants = state.tenants();
        let report = crate::usage::run(
            &reader,
            &tenants,
            &state.tenant_history(),
            Some("lab-a"),
            Some(&from),
            Some(&to),
            Some("1m"),
            None,
            None,
        )
        .unwrap();
        let rows = report
            .rows
            .iter()
            .map(|r| (r.seconds_over_contract, (r.overage_kwh * 3.6e9).round()))
            .collect();
        // After a restart: what the counter resumes from.
        let snap = crate::ledger::Ledger::open(&path).unwrap().load().unwrap();
        let in_ledger = snap
            .tenant_over_contract_ns
            .iter()
            .filter(|(t, _)| t == "lab-a")
            .map(|(_, ns)| u128::from(*ns))
            .sum::<u128>();
        assert_eq!(over_contract(state, "lab-a"), in_ledger);
        (rows, snap)
    }

    #[test]
    fn over_contract_is_the_same_live_or_replayed_45_minutes_late() {
        // Invariant: over-contract time and overage are a function of the
        // ledger's energy in sample time (each minute's average power
        // against the contract), whenever the samples arrive. The same ten
        // minutes arrive once sample by sample as they happen (the last
        // ten minutes) and once as a spool replayed 45 minutes late, in
        // one batch.
        let minute_now = unix_nanos_now().div_euclid(60 * SEC) * 60 * SEC;
        let live_m0 = minute_now - 10 * 60 * SEC;
        let late_m0 = live_m0 - 45 * 60 * SEC;
        let want_rows: Vec<(f64, f64)> = TEN_MINUTES_KW
            .iter()
            .map(|&kw| match kw {
                2 => (60.0, 60_000_000.0),
                _ => (0.0, 0.0),
            })
            .collect();
        let want_counter = vec![("lab-a".to_string(), 7 * 60 * 1_000_000_000)];

        let dir = tempfile::tempdir().unwrap();
        let live = new_state(TENANTS, None);
        let h = connect(&live, "a-1", 1, 2);
        for s in ten_minutes(live_m0) {
            ingest(&live, &h, vec![s]);
        }
        let (rows, snap) = over_contract_in_ledger(&live, dir.path(), live_m0);
        assert_eq!(rows, want_rows, "live");
        assert_eq!(snap.tenant_over_contract_ns, want_counter, "live");

        let dir = tempfile::tempdir().unwrap();
        let late = new_state(TENANTS, None);
        let h = connect(&late, "a-1", 1, 2);
        ingest(&late, &h, ten_minutes(late_m0));
        let (rows, snap) = over_contract_in_ledger(&late, dir.path(), late_m0);
        assert_eq!(rows, want_rows, "replayed 45 minutes late");
        assert_eq!(
            snap.tenant_over_contract_ns, want_counter,
            "replayed 45 minutes late"
        );
    }

    #[test]
    fn each_minute_is_judged_by_the_contract_in_force_at_its_start() {
        // Invariant: a minute's over-contract time and overage are measured
        // against the contract of the tenant-file version in force at the
        // minute's start, whenever its samples arrive. lab-a's contract is
        // lowered from 2 kW to 1 kW by a file taking effect five minutes
        // into the ten: the 2 kW minutes before it are not over (at the
        // contract is not above it), those after it are. The same ten
        // minutes arrive once live (the file loaded between the halves)
        // and once late, in one batch, after the file was loaded.
        const V1: &str = "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 2\nnodes = [\"a-*\"]\n";
        let lowered = |m0: i64| {
            let at = crate::usage::rfc3339(m0 / SEC + 300);
            Tenants::from_toml(&format!(
                "effective_from = {at}\n[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 1\nnodes = [\"a-*\"]\n"
            ))
            .unwrap()
        };
        let minute_now = unix_nanos_now().div_euclid(60 * SEC) * 60 * SEC;
        let live_m0 = minute_now - 10 * 60 * SEC;
        let late_m0 = live_m0 - 45 * 60 * SEC;
        let want_rows: Vec<(f64, f64)> = TEN_MINUTES_KW
            .iter()
            .enumerate()
            .map(|(i, &kw)| match kw {
                2 if i >= 5 => (60.0, 60_000_000.0),
                _ => (0.0, 0.0),
            })
            .collect();
        // Four minutes at 2 kW after the change.
        let want_counter = vec![("lab-a".to_string(), 4 * 60 * 1_000_000_000)];

        let dir = tempfile::tempdir().unwrap();
        let live = new_state(V1, None);
        let h = connect(&live, "a-1", 1, 2);
        let samples = ten_minutes(live_m0);
        // The samples stamped before the change, committed before it is
        // loaded; then the rest.
        let (before, after): (Vec<_>, Vec<_>) = samples
            .into_iter()
            .partition(|s| s.timestamp_unix_nanos < live_m0 + 300 * SEC);
        for s in before {
            ingest(&live, &h, vec![s]);
        }
        over_contract_in_ledger(&live, dir.path(), live_m0);
        live.reload_tenants(lowered(live_m0));
        for s in after {
            ingest(&live, &h, vec![s]);
        }
        let (rows, snap) = over_contract_in_ledger(&live, dir.path(), live_m0);
        assert_eq!(rows, want_rows, "live");
        assert_eq!(snap.tenant_over_contract_ns, want_counter, "live");

        let dir = tempfile::tempdir().unwrap();
        let late = new_state(V1, None);
        late.reload_tenants(lowered(late_m0));
        let h = connect(&late, "a-1", 1, 2);
        ingest(&late, &h, ten_minutes(late_m0));
        let (rows, snap) = over_contract_in_ledger(&late, dir.path(), late_m0);
        assert_eq!(rows, want_rows, "late");
        assert_eq!(snap.tenant_over_contract_ns, want_counter, "late");
    }

    #[test]
    fn gaps_count_as_expected_time_and_integrated_energy_as_estimated() {
        // Invariant: GPU time between readings is expected time; only
        // intervals within the staleness window are covered, and of a
        // longer gap without counter only the window before the reading,
        // which its power stands for; energy from power integration is
        // marked estimated, counter energy is not.
        let state = new_state(TENANTS, None);
        let mut hl = hello("a-1", 1, 1);
        hl.gpus[0].energy_counter_supported = false;
        let (h, _) = state.hello(hl).unwrap();
        ingest(
            &state,
            &h,
            vec![
                sample(1, T0, &[(100_000, None)]),
                sample(2, T0 + SEC, &[(100_000, None)]),
                sample(3, T0 + 61 * SEC, &[(100_000, None)]),
            ],
        );
        let (_, c) = state.take_pending();
        let b = booked(&c, "lab-a", "a-1");
        assert_eq!(b.expected_gpu_ns, 61 * SEC as u64);
        // 1 s, and the last 3 s (the default window) of the 60-second gap.
        assert_eq!(b.gpu_ns, 4 * SEC as u64);
        assert_eq!(b.energy_mj, 400_000);
        assert_eq!(b.estimated_mj, 400_000);
        assert_eq!(b.samples, 3);
        // A counter GPU books nothing as estimated.
        let h2 = connect(&state, "a-3", 1, 1);
        ingest(
            &state,
            &h2,
            vec![
                sample(1, T0, &[(1, Some(0))]),
                sample(2, T0 + SEC, &[(1, Some(500))]),
            ],
        );
        let (_, c) = state.take_pending();
        let b = booked(&c, "lab-a", "a-3");
        assert_eq!((b.energy_mj, b.estimated_mj), (500, 0));
    }
    #[test]
    fn values_the_ledger_cannot_hold_or_trust_are_refused() {
        // Invariant: a sequence far ahead, a timestamp older than the
        // allowed age, or an epoch of 2^63 and above is refused alone and
        // cannot move the node's cursor out of reach.
        let mut state = new_state(TENANTS, None);
        state.cfg.max_sample_age = Duration::from_secs(3600);
        let h = connect(&state, "a-1", 1, 1);
        let now = unix_nanos_now();
        let out = ingest(
            &state,
            &h,
            vec![
                sample(1, now - SEC, &[(1, Some(0))]),
                sample(MAX_SEQ_JUMP + 5, now, &[(1, Some(1))]),
            ],
        );
        assert_eq!(out.rejected, vec![(MAX_SEQ_JUMP + 5, Reject::Sequence)]);
        assert_eq!(out.acked_seq, 1, "the cursor stays reachable");
        let out = ingest(
            &state,
            &h,
            vec![sample(2, now - 2 * 3600 * SEC, &[(1, Some(2))])],
        );
        assert_eq!(out.rejected, vec![(2, Reject::Timestamp)]);
        let out = ingest(&state, &h, vec![sample(3, now, &[(1, Some(9))])]);
        assert_eq!(out.accepted, 1);
        assert_eq!(gpu_energy(&h), vec![9]);
        assert!(matches!(
            state.hello(hello("a-9", crate::model::MAX_STORED + 1, 1)),
            Err(HelloError::Epoch)
        ));
    }
}
