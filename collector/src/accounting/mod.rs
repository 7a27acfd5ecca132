//! Pure accounting: the arithmetic that turns readings into energy and
//! minute buckets, and minutes into over-contract time. It owns no locks
//! and reads no clock: the moment a reading arrives comes in as a
//! [`Tick`]. The laws it keeps are property tests beside it (`tests.rs`).
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
//! it was. That time is the longest of the agent's timestamps, the
//! collector's receipt times and the samples since at the nominal interval
//! (see `Meter::vouch`), so an agent clock that stands still or steps back
//! never voids a real delta. A GPU without a counter contributes the exact
//! integral of its reported power over time, kept in
//! milliwatt-nanoseconds so that no rounding error accumulates; power
//! stands for at most the staleness window before its reading, and the
//! rest of a longer gap is missing time, not energy.

use std::time::{Duration, Instant};

use crate::edge::{GpuReading, MAX_SPREAD};

mod split;
mod stretch;
pub use split::{Party, split_node_energy};
pub use stretch::{NodeStretch, Run, StretchWeight};
pub mod facility;

pub const NANOS_PER_SECOND: u128 = 1_000_000_000;
const MAX_SPREAD_NANOS: i64 = MAX_SPREAD.as_nanos() as i64;
const MINUTE_NS: i64 = 60_000_000_000;
/// A minute, in seconds.
const MINUTE: i64 = 60;

/// One sample, as a GPU reading in it sees it: when it was taken, where
/// in its stream, and what the collector knows of that moment.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// The sample's timestamp (the agent's clock).
    pub timestamp_ns: i64,
    pub seq: u64,
    /// When its batch arrived (the collector's clock).
    pub now: Instant,
    /// The latest timestamp a sample may carry now: the collector's clock
    /// plus the allowed skew.
    pub latest_ns: i64,
    /// The node's nominal sampling interval, from its Hello.
    pub interval: Duration,
    /// The staleness window: the most time one reading's power stands for.
    pub window: Duration,
}

/// What one reading added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub energy_mj: u64,
    /// Where the energy was integrated from power instead of read from a
    /// counter: the stretch before `to_ns` it stands for (at most the
    /// staleness window).
    pub estimated_ns: Option<u64>,
    /// Start of the interval the reading covers; `None` when it covers no
    /// interval.
    pub from_ns: Option<i64>,
    /// End of the interval: the sample's timestamp, or the GPU's newest
    /// timestamp when the sample's is not after it.
    pub to_ns: i64,
    pub utilization_percent: Option<u32>,
    /// Whether the reading becomes the GPU's last one (false for a stale
    /// reading, which moves nothing).
    pub kept: bool,
    /// For a counter delta on a coarse grid (a BMC's whole kWh): when the
    /// reading that gave the counter its previous value was taken. The
    /// counter stood still from there, so its step was drawn over all of
    /// that stretch, not only since `from_ns` (`Applied::drawn`). `None`
    /// for a fine counter, an estimate or a reset.
    pub drawn_from_ns: Option<i64>,
    /// Whether the counter's energy up to this reading is still to come:
    /// a counter that stood still since its baseline (a coarse one, at 0
    /// too, until it steps: only the step tells its grid), or one that
    /// could not be read; its next delta carries it (a whole-node reading
    /// keeps the stretch open, `NodeStretch`). Not a baseline, a reset or
    /// an estimate, which start the stretch again.
    pub open: bool,
}

/// The counting state of one GPU, as the ledger keeps it (`GpuCursor`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterCursor {
    pub last_counter_mj: Option<u64>,
    pub last_timestamp_ns: Option<i64>,
    /// Below one second's worth of nanoseconds.
    pub remainder_mw_ns: u64,
    pub energy_mj: u64,
    pub counter_resets: u64,
    /// When the reading that gave `last_counter_mj` its value was taken:
    /// what a coarse counter's next step is bounded and spread from.
    pub changed_ns: Option<i64>,
}

/// One GPU's energy meter: the counter arithmetic and power integration
/// of the readings applied to it, in order.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    /// Whether any reading (lost ones too) has been applied.
    heard: bool,
    last_timestamp: Option<i64>,
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
    /// The timestamp of the reading that gave `last_counter` its value: a
    /// coarse counter (a BMC's whole or tenth kWh) stands still for many
    /// readings, and the energy of its next step was drawn since then.
    changed_ns: Option<i64>,
    /// Energy since this collector first saw the GPU.
    energy_millijoules: u64,
    /// Below one second's worth of nanoseconds (fits 32 bits).
    remainder_milliwatt_nanos: u64,
    last_receipt: Option<Instant>,
    counter_resets: u64,
    /// Take the next timestamp as the reference even if it is older (set
    /// when a new agent epoch starts).
    reanchor: bool,
}

impl Meter {
    /// A meter resuming from what the ledger kept, at most `last_seq`
    /// samples behind (its last reading came with that cursor or earlier).
    /// Where the cursor does not say when its counter last changed (one
    /// written before it was kept), the bound measures from the last
    /// reading, with one count of a coarse counter's slack.
    pub fn resumed(c: &MeterCursor, last_seq: Option<u64>) -> Self {
        Self {
            last_counter: c.last_counter_mj,
            last_timestamp: c.last_timestamp_ns,
            changed_ns: c.changed_ns,
            remainder_milliwatt_nanos: c.remainder_mw_ns,
            energy_millijoules: c.energy_mj,
            counter_resets: c.counter_resets,
            last_seq,
            ..Self::default()
        }
    }

    /// The counting state the ledger keeps.
    pub fn cursor(&self) -> MeterCursor {
        MeterCursor {
            last_counter_mj: self.last_counter,
            last_timestamp_ns: self.last_timestamp,
            // Below one second's worth of nanoseconds by construction.
            remainder_mw_ns: self.remainder_milliwatt_nanos,
            energy_mj: self.energy_millijoules,
            counter_resets: self.counter_resets,
            changed_ns: self.changed_ns,
        }
    }

    /// Energy since this collector first saw the GPU (mJ).
    pub fn energy_millijoules(&self) -> u64 {
        self.energy_millijoules
    }

    /// The sub-millijoule remainder of the power integral (mW·ns).
    pub fn remainder_milliwatt_nanos(&self) -> u64 {
        self.remainder_milliwatt_nanos
    }

    pub fn counter_resets(&self) -> u64 {
        self.counter_resets
    }

    /// The newest timestamp applied.
    pub fn last_timestamp(&self) -> Option<i64> {
        self.last_timestamp
    }

    /// When the last reading arrived (the collector's clock).
    pub fn last_receipt(&self) -> Option<Instant> {
        self.last_receipt
    }

    /// The next timestamp becomes the reference even if it is behind the
    /// newest one (a new agent run, whose clock may have been stepped).
    pub fn reanchor(&mut self) {
        self.reanchor = true;
    }

    /// Drops the baseline: the next reading starts counting afresh, as
    /// the first one does (the energy so far and the resets stay). For a
    /// source whose counter ran on while another one counted the same
    /// energy.
    pub fn forget_baseline(&mut self) {
        *self = Self {
            energy_millijoules: self.energy_millijoules,
            counter_resets: self.counter_resets,
            ..Self::default()
        };
    }

    /// Folds one accepted reading in, `limit` being the GPU's power limit
    /// now (mW; 3 kW is assumed when unknown); returns the energy it adds
    /// (mJ) and the interval it covers.
    #[inline]
    pub fn apply(&mut self, r: &GpuReading, limit: Option<u64>, t: &Tick) -> Applied {
        let timestamp = t.timestamp_ns;
        let prev_receipt = self.last_receipt.replace(t.now);
        if self.reanchor {
            // A new run whose clock is behind the old one's: the counter's
            // last change, on the old clock, moves back to this reading,
            // so that its next step is drawn and bounded from a time the
            // new clock has passed.
            self.changed_ns = self.changed_ns.map(|c| c.min(timestamp));
        }
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
            kept: true,
            drawn_from_ns: None,
            open: false,
        };
        if r.lost {
            // Keep the last counter and timestamp: when the GPU answers
            // again, its next delta carries the energy of the gap.
            self.heard = true;
            return nothing;
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
        // A counter that stood still since `changed_ns` steps by what was
        // drawn over all that time, so the bound is measured from there
        // too; and one count of a coarse counter can be passed at any
        // moment, so a count of slack is allowed.
        // Only a counter on a coarse grid gets that: a fine counter (a
        // GPU's millijoules, RAPL's) standing still is a fault, and the
        // time it stood still vouches for nothing.
        let slack = match (r.energy_millijoules, self.last_counter) {
            (Some(now_mj), Some(prev)) => u128::from(resolution(prev, now_mj)),
            _ => 1_000,
        };
        let since_change = match self.changed_ns.or(self.last_timestamp) {
            Some(c) if slack > 1_000 => {
                u128::try_from(timestamp.min(t.latest_ns).saturating_sub(c)).unwrap_or(0)
            }
            _ => 0,
        };
        let limit = limit.unwrap_or(1_000_000);
        let plausible = u128::from(limit) * 3 * vouched_nanos.max(since_receipt).max(since_change)
            / NANOS_PER_SECOND
            + slack;
        let first = !self.heard;
        // Whether the counter moved on from its baseline as counted (not
        // a reset, a jump or an estimate): standing still, it leaves the
        // energy so far to its next step (`Applied::open`), whatever its
        // grid, which only that step tells.
        let mut counted = false;
        // (energy, whether it was integrated from power)
        let (delta, estimated) = match (r.energy_millijoules, self.last_counter) {
            (Some(now_mj), Some(prev))
                if now_mj >= prev && u128::from(now_mj - prev) <= plausible =>
            {
                counted = true;
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
                return Applied {
                    kept: false,
                    ..nothing
                };
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
                self.heard = true;
                return Applied {
                    open: true,
                    ..nothing
                };
            }
            _ => (self.integrate(r.power_milliwatts, estimate_nanos), true),
        };
        // A coarse counter's delta was drawn since it last changed: the
        // stretch it stood still over, which its next step ends.
        let coarse_delta = slack > 1_000
            && !estimated
            && matches!((r.energy_millijoules, self.last_counter), (Some(now), Some(prev)) if now >= prev);
        let drawn_from_ns = coarse_delta
            .then(|| self.changed_ns.or(self.last_timestamp))
            .flatten();
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
            // Never back: a clock that swings back and forth does not
            // offer the same stretch to two changes.
            if r.energy_millijoules != self.last_counter || self.changed_ns.is_none() {
                self.changed_ns = Some(self.changed_ns.map_or(timestamp, |c| c.max(timestamp)));
            }
            self.last_counter = r.energy_millijoules;
        }
        self.energy_millijoules = self.energy_millijoules.saturating_add(delta);
        self.heard = true;
        Applied {
            energy_mj: delta,
            // Below the staleness window, so it fits.
            estimated_ns: estimated.then(|| u64::try_from(estimate_nanos).unwrap_or(u64::MAX)),
            from_ns,
            to_ns,
            utilization_percent: r.utilization_percent,
            kept: true,
            drawn_from_ns,
            open: counted && delta == 0,
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

    /// Exact integral of `power` over `dt`, carrying the sub-millijoule
    /// remainder to the next call.
    fn integrate(&mut self, power_milliwatts: Option<u64>, dt_nanos: u128) -> u64 {
        let Some(p) = power_milliwatts else { return 0 };
        let total = u128::from(self.remainder_milliwatt_nanos) + u128::from(p) * dt_nanos;
        // Below NANOS_PER_SECOND, so it fits.
        self.remainder_milliwatt_nanos = (total % NANOS_PER_SECOND) as u64;
        u64::try_from(total / NANOS_PER_SECOND).unwrap_or(u64::MAX)
    }
}

/// The grids of coarse counters read as mJ, coarsest first: whole, tenth
/// and hundredth kWh, whole Wh.
const GRIDS: [u64; 4] = [3_600_000_000, 360_000_000, 36_000_000, 3_600_000];

/// Whether a counter standing at `counter_mj` may be a coarse one, whose
/// next step [`resolution`] would spread back over the time it stood
/// still: it is on the finest coarse grid (0 is on every one). A fine
/// counter off every grid books its next step from its last reading only.
pub fn may_be_coarse(counter_mj: u64) -> bool {
    counter_mj.is_multiple_of(GRIDS[GRIDS.len() - 1])
}

/// The coarsest step a counter going from `prev` to `now` (mJ) can have:
/// a whole-kWh, tenth-kWh, ... down to whole-Wh counter read as mJ has
/// both values on its grid; a fine counter (a GPU's mJ, RAPL's µJ) lands
/// on those by chance only, and then gets that much slack once. At least
/// a joule, for counter and clock granularity.
fn resolution(prev: u64, now: u64) -> u64 {
    GRIDS
        .into_iter()
        .find(|g| prev.is_multiple_of(*g) && now.is_multiple_of(*g) && (prev != 0 || now != 0))
        .unwrap_or(1_000)
}

/// What one reading adds to one minute bucket (the figures of the
/// ledger's `BucketDelta` that readings move).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MinuteFigures {
    pub energy_mj: u64,
    pub estimated_mj: u64,
    pub gpu_ns: u64,
    pub busy_gpu_ns: u64,
    /// GPU time of a reading without a utilization (see
    /// `BucketDelta::busy_unknown_gpu_ns`).
    pub busy_unknown_gpu_ns: u64,
    pub expected_gpu_ns: u64,
    pub samples: u64,
    /// A share of whole-node energy (`Applied::book_node`).
    pub node_energy_mj: u64,
    pub node_estimated_mj: u64,
    /// GPU time of the tenant on the node covered by whole-node readings.
    pub node_ns: u64,
}

/// Where a reading's minute figures go: the bucket of (tenant, minute).
pub trait Book<T: ?Sized> {
    fn add(&mut self, tenant: &T, minute: i64, f: &MinuteFigures);
}

/// A tenant's bookings of one GPU (a board, or a MIG board's part, by the
/// key it is metered under): what a [`Book`] that keeps per-GPU figures as
/// well as the tenant's books a GPU reading under, the same figures to
/// both.
#[derive(Debug, Clone, Copy)]
pub struct OnGpu<'a, T: ?Sized> {
    pub tenant: &'a T,
    pub gpu: &'a T,
}

/// The figures one reading books over its interval.
#[derive(Debug, Clone, Copy)]
struct Amounts {
    energy_mj: u64,
    estimated_mj: u64,
    covered: u64,
    busy: u64,
    /// The covered time of a reading without a utilization.
    unknown: u64,
    span: u64,
}

// ---- MIG ----

/// A function that splits an amount among parts of the given weights,
/// exactly (the parts sum to the amount) and in proportion, by the
/// largest-remainder split of facility meters (`facility::allocate`);
/// every part gets 0 when all weights are 0.
pub fn split_by_weight(weights: impl IntoIterator<Item = u64>) -> impl Fn(u64) -> Vec<u64> {
    let weights: Vec<(usize, u64)> = weights.into_iter().enumerate().collect();
    move |amount| {
        let mut out = vec![0; weights.len()];
        for (k, share) in facility::allocate(amount, &weights).shares {
            out[k] = share;
        }
        out
    }
}
// ---- end MIG ----

/// What [`Applied::interval`] gives: the interval `[from, to_ns)` of
/// `span` ns the reading's energy is booked over, and `covered` ns of it,
/// from `backed_from`, that the reading backs.
struct Interval {
    from: i64,
    span: u64,
    backed_from: i64,
    covered: u64,
}

impl Applied {
    /// The interval this reading's energy is booked over and the part of
    /// it the reading backs: a counter delta's interval (at most
    /// `MAX_SPREAD_NANOS` back), backed whole when it lies within the
    /// staleness `window`; an estimate from power, the stretch it stands
    /// for.
    fn interval(&self, window: Duration) -> Interval {
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
        Interval {
            from,
            span,
            backed_from,
            covered,
        }
    }

    /// Adds this reading's energy and GPU time to the minute buckets of
    /// `tenant`. GPU time counts only what a reading backs: a counter
    /// delta's interval when it lies within the staleness window (a longer
    /// gap carries energy but is not coverage), an estimate from power the
    /// stretch it stands for, which also holds its energy.
    pub fn book<T: ?Sized>(&self, b: &mut impl Book<T>, tenant: &T, window: Duration) {
        let (iv, amounts) = self.amounts(window);
        self.book_amounts(b, tenant, &iv, amounts);
    }

    /// What [`Applied::book`] adds up: the interval and the figures
    /// booked over it.
    fn amounts(&self, window: Duration) -> (Interval, Amounts) {
        let iv = self.interval(window);
        let covered = iv.covered;
        // A reading without a utilization is neither busy nor idle: its
        // time is kept apart, never counted as 0 % busy.
        let (busy, unknown) = match self.utilization_percent {
            Some(u) => {
                let util = u64::from(u.min(100));
                (covered / 100 * util + covered % 100 * util / 100, 0)
            }
            None => (0, covered),
        };
        let estimated_mj = if self.estimated_ns.is_some() {
            self.energy_mj
        } else {
            0
        };
        let amounts = Amounts {
            energy_mj: self.energy_mj,
            estimated_mj,
            covered,
            busy,
            unknown,
            span: iv.span,
        };
        (iv, amounts)
    }

    // ---- MIG ----

    /// Books this reading of a MIG board split among its `parts`
    /// (tenant, weight): the energy, the estimated part of it, the GPU
    /// time, busy time, time of unknown utilization and expected time are
    /// each split in proportion to the weights by the exact
    /// largest-remainder split
    /// (`facility::allocate`), so each figure's parts sum to the board's
    /// exactly; each part counts as one sample. Returns each part's
    /// energy, in the order of `parts`. A part of weight 0 gets nothing.
    pub fn book_parts<T: ?Sized>(
        &self,
        b: &mut impl Book<T>,
        parts: &[(&T, u64)],
        window: Duration,
    ) -> Vec<u64> {
        let (iv, whole) = self.amounts(window);
        let split = split_by_weight(parts.iter().map(|(_, w)| *w));
        let energy = split(whole.energy_mj);
        let estimated = split(whole.estimated_mj);
        let covered = split(whole.covered);
        let busy = split(whole.busy);
        let unknown = split(whole.unknown);
        let span = split(whole.span);
        for (k, (tenant, weight)) in parts.iter().enumerate() {
            if *weight == 0 {
                continue;
            }
            let amounts = Amounts {
                energy_mj: energy[k],
                estimated_mj: estimated[k],
                covered: covered[k],
                busy: busy[k],
                unknown: unknown[k],
                span: span[k],
            };
            self.book_amounts(b, *tenant, &iv, amounts);
        }
        energy
    }
    // ---- end MIG ----

    /// Books `a` to `tenant`'s minute buckets over the interval `iv`.
    fn book_amounts<T: ?Sized>(&self, b: &mut impl Book<T>, tenant: &T, iv: &Interval, a: Amounts) {
        let to_ns = self.to_ns;
        let (from, backed_from) = (iv.from, iv.backed_from);
        let Amounts {
            energy_mj,
            estimated_mj,
            covered,
            busy,
            unknown,
            span,
        } = a;
        let minute = to_ns.div_euclid(MINUTE_NS) * MINUTE;
        // The common case, an interval inside one minute: one bucket
        // update instead of one per figure.
        if from.div_euclid(MINUTE_NS) * MINUTE == minute {
            let f = MinuteFigures {
                energy_mj,
                estimated_mj,
                gpu_ns: covered,
                busy_gpu_ns: busy,
                busy_unknown_gpu_ns: unknown,
                expected_gpu_ns: span,
                samples: 1,
                ..MinuteFigures::default()
            };
            b.add(tenant, minute, &f);
            return;
        }
        let mut add = |amount: u64, from: i64, field: fn(&mut MinuteFigures) -> &mut u64| {
            if amount == 0 {
                return;
            }
            for (minute, part) in split_by_minute(amount, from, to_ns) {
                let mut f = MinuteFigures::default();
                *field(&mut f) = part;
                b.add(tenant, minute, &f);
            }
        };
        add(energy_mj, backed_from, |d| &mut d.energy_mj);
        add(estimated_mj, backed_from, |d| &mut d.estimated_mj);
        add(covered, backed_from, |d| &mut d.gpu_ns);
        add(busy, backed_from, |d| &mut d.busy_gpu_ns);
        add(unknown, backed_from, |d| &mut d.busy_unknown_gpu_ns);
        add(span, from, |d| &mut d.expected_gpu_ns);
        let one = MinuteFigures {
            samples: 1,
            ..MinuteFigures::default()
        };
        b.add(tenant, minute, &one);
    }
}

impl Applied {
    /// Books `share_mj` of this whole-node reading's energy (the tenant's
    /// share, `split_node_energy`) to `tenant`'s minute buckets over the
    /// interval the reading covers, as `book` does GPU energy (an estimate
    /// over the stretch it stands for), and as node time `held` of the
    /// covered part of the interval: the tenant's GPU time over that much
    /// node time (times its GPUs on the node, 1 for a node without GPUs,
    /// and its exact share of a MIG board it holds parts of), comparable
    /// with its expected GPU time, so that node coverage is the share of
    /// GPU time with node energy.
    pub fn book_node<T: ?Sized>(
        &self,
        b: &mut impl Book<T>,
        tenant: &T,
        share_mj: u64,
        held: impl Fn(u64) -> u64,
        window: Duration,
    ) {
        let to_ns = self.to_ns;
        let Interval {
            backed_from,
            covered,
            ..
        } = self.interval(window);
        let node_ns = held(covered);
        self.book_node_energy(b, tenant, share_mj, (backed_from, to_ns));
        if node_ns > 0 {
            for (minute, part) in split_by_minute(node_ns, backed_from, to_ns) {
                let f = MinuteFigures {
                    node_ns: part,
                    ..MinuteFigures::default()
                };
                b.add(tenant, minute, &f);
            }
        }
    }
}

impl Applied {
    /// The stretch `[from, to_ns)` this whole-node reading's energy was
    /// drawn over: for a coarse counter's step, from the counter's last
    /// change (`drawn_from_ns`), at most `MAX_SPREAD_NANOS` back; else
    /// the interval `book` puts it in (an estimate, the stretch it stands
    /// for).
    pub fn drawn(&self, window: Duration) -> (i64, i64) {
        let own = self.interval(window);
        let from = match (self.estimated_ns, self.drawn_from_ns) {
            (None, Some(changed)) => changed
                .max(self.to_ns - MAX_SPREAD_NANOS)
                .min(own.backed_from),
            _ => own.backed_from,
        };
        (from, self.to_ns)
    }

    /// Books `share_mj` of this reading's whole-node energy to `tenant`
    /// over `[from, to)`, split by minute, flagged estimated where the
    /// reading's energy was integrated from power.
    pub fn book_node_energy<T: ?Sized>(
        &self,
        b: &mut impl Book<T>,
        tenant: &T,
        share_mj: u64,
        (from, to): (i64, i64),
    ) {
        let estimated = self.estimated_ns.is_some();
        for (minute, part) in split_by_minute(share_mj, from, to) {
            if part == 0 {
                continue;
            }
            let f = MinuteFigures {
                node_energy_mj: part,
                node_estimated_mj: if estimated { part } else { 0 },
                ..MinuteFigures::default()
            };
            b.add(tenant, minute, &f);
        }
    }
}

/// Splits `amount` spread evenly over the interval `(from_ns, to_ns]`
/// across the minutes it overlaps, exactly: the parts are floors of the
/// time-proportional shares, and what the floors leave goes to the
/// minutes with the largest remainders. Returns (minute start in Unix
/// seconds, part) pairs in time order.
pub fn split_by_minute(amount: u64, from_ns: i64, to_ns: i64) -> Vec<(i64, u64)> {
    if to_ns <= from_ns {
        // No interval: all of it lands in the minute of `to_ns`.
        return vec![(to_ns.div_euclid(MINUTE_NS) * MINUTE, amount)];
    }
    let total = (to_ns - from_ns) as u128;
    let mut parts = Vec::new();
    let mut start = from_ns;
    while start < to_ns {
        let minute = start.div_euclid(MINUTE_NS);
        let end = ((minute + 1) * MINUTE_NS).min(to_ns);
        let share = u128::from(amount) * (end - start) as u128;
        parts.push((minute * MINUTE, (share / total) as u64, share % total));
        start = end;
    }
    let assigned: u64 = parts.iter().map(|p| p.1).sum();
    let mut left = amount - assigned;
    // Largest remainder first; ties to the later minute, deterministic.
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| parts[b].2.cmp(&parts[a].2).then(b.cmp(&a)));
    for i in order {
        if left == 0 {
            break;
        }
        parts[i].1 += 1;
        left -= 1;
    }
    parts.into_iter().map(|(m, v, _)| (m, v)).collect()
}

/// What a tenant's contract is measured on (`basis` in the tenant file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Basis {
    /// Its GPUs' energy.
    #[default]
    Gpu,
    /// Its share of its nodes' whole-node energy.
    Node,
    /// Facility energy: a meter's allocation where its nodes are under one,
    /// else node energy times the tenant's PUE (estimated).
    Facility,
}

impl Basis {
    pub const ALL: [Basis; 3] = [Basis::Gpu, Basis::Node, Basis::Facility];

    pub fn label(self) -> &'static str {
        match self {
            Basis::Gpu => "gpu",
            Basis::Node => "node",
            Basis::Facility => "facility",
        }
    }
}

/// What one tenant-minute is measured against: the contracted power (mW,
/// 0: none), on which energy, and the PUE (parts per million, 0: none)
/// that turns node energy into facility energy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contract {
    pub milliwatts: u64,
    pub basis: Basis,
    pub pue_ppm: u64,
}

impl Contract {
    /// A GPU-energy contract of `milliwatts`.
    pub fn gpu(milliwatts: u64) -> Self {
        Self {
            milliwatts,
            ..Self::default()
        }
    }

    /// The energy of a stretch on this contract's basis, from its GPU
    /// energy, its node energy and what facility meters allocated of it
    /// (mJ): the one place the basis is applied. Facility energy is
    /// [`Contract::facility_energy`]; a facility contract always has a PUE
    /// (the tenant file requires one), and one without counts the
    /// allocation alone.
    pub fn basis_energy(&self, gpu_mj: u64, node_mj: u64, metered: Metered) -> u64 {
        match self.basis {
            Basis::Gpu => gpu_mj,
            Basis::Node => node_mj,
            Basis::Facility => self
                .facility_energy(node_mj, metered)
                .unwrap_or(metered.allocated_mj),
        }
    }

    /// Facility energy of a stretch with `node_mj` of node energy, of
    /// which `metered.node_mj` lies on nodes whose meters allocated the
    /// stretch: their allocation, plus the rest of the node energy (nodes
    /// under no meter, and minutes a meter has not allocated yet) times
    /// the PUE, rounded to the nearest millijoule. Without a PUE only an
    /// allocation is known: `None` unless one covers all the node energy
    /// (unknown, never a guess).
    pub fn facility_energy(&self, node_mj: u64, metered: Metered) -> Option<u64> {
        let rest = node_mj.saturating_sub(metered.node_mj);
        if self.pue_ppm == 0 {
            return (rest == 0 && metered != Metered::NONE).then_some(metered.allocated_mj);
        }
        Some(
            metered
                .allocated_mj
                .saturating_add(facility_estimate(rest, self.pue_ppm)),
        )
    }
}

/// What facility meters allocated of one tenant's stretch: the meters'
/// allocation to it, and its node energy on the nodes whose meters
/// allocated the stretch, which the allocation replaces. At commit time
/// nothing is allocated yet ([`Metered::NONE`]): facility energy there is
/// the PUE estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metered {
    pub allocated_mj: u64,
    pub node_mj: u64,
}

impl Metered {
    /// Nothing allocated.
    pub const NONE: Metered = Metered {
        allocated_mj: 0,
        node_mj: 0,
    };

    pub fn add(&mut self, other: Metered) {
        self.allocated_mj = self.allocated_mj.saturating_add(other.allocated_mj);
        self.node_mj = self.node_mj.saturating_add(other.node_mj);
    }
}

/// A change to what facility meters allocated of one tenant-minute, as an
/// adjustment books it: an allocation (both amounts its own, never
/// negative), or a split made again for energy booked after it (each
/// amount the new less the old, negative where the tenant's part shrank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeteredChange {
    pub allocated_mj: i64,
    pub node_mj: i64,
}

impl MeteredChange {
    /// No change: every adjustment but a meter's.
    pub const NONE: MeteredChange = MeteredChange {
        allocated_mj: 0,
        node_mj: 0,
    };

    pub fn add(&mut self, other: MeteredChange) {
        self.allocated_mj = self.allocated_mj.saturating_add(other.allocated_mj);
        self.node_mj = self.node_mj.saturating_add(other.node_mj);
    }
}

impl Contract {
    /// Live power (mW) on this contract's basis, from the GPUs' power,
    /// the node power (`None`: no fresh whole-node reading) and its
    /// metered part (`facility_power`); `None` where the basis needs what
    /// is unknown (node power, or a PUE).
    pub fn basis_power(&self, gpu_mw: u64, node_mw: Option<u64>, metered: Metered) -> Option<u64> {
        match self.basis {
            Basis::Gpu => Some(gpu_mw),
            Basis::Node => node_mw,
            Basis::Facility => self.facility_power(node_mw, metered),
        }
    }

    /// Live facility power: the rule of [`Contract::facility_energy`]
    /// over one second (mW × 1 s = mJ), `metered` holding the node power
    /// under meters with a live ratio and that power times the ratio; the
    /// rest of the node power times the PUE. `None` without node power,
    /// or where some of it needs a PUE the contract does not have.
    pub fn facility_power(&self, node_mw: Option<u64>, metered: Metered) -> Option<u64> {
        node_mw.and_then(|mw| self.facility_energy(mw, metered))
    }
}

/// Node energy times a PUE given in parts per million, rounded half up to
/// the millijoule (exact integer arithmetic).
pub fn facility_estimate(node_mj: u64, pue_ppm: u64) -> u64 {
    let x = (u128::from(node_mj) * u128::from(pue_ppm) + 500_000) / 1_000_000;
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// Over-contract time (ns) and overage (mJ) of one tenant-minute that
/// holds `energy_mj` against a contract of `contracted_milliwatts` (0: no
/// contract): a minute whose average power is above the contract counts
/// 60 s over it, and its energy above contract × 60 s as overage. Energy
/// only grows, so the figures only grow with it.
pub fn over_contract(energy_mj: u64, contracted_milliwatts: u64) -> (u64, u64) {
    // mW × s = mJ.
    let allowed = u128::from(contracted_milliwatts) * MINUTE as u128;
    if contracted_milliwatts == 0 || u128::from(energy_mj) <= allowed {
        return (0, 0);
    }
    (
        MINUTE as u64 * 1_000_000_000,
        u64::try_from(u128::from(energy_mj) - allowed).unwrap_or(u64::MAX),
    )
}

/// Over-contract time (ns) and overage (mJ) of a stretch of usage against
/// the tenant's contract for its minute (mW, 0: none): [`over_contract`]
/// of a minute's energy, or what a rollup stored when it was rolled up
/// (`rolled_up`; `contracted_milliwatts` is then not used). The
/// arithmetic of the ledger's `Span::over_contract`.
pub fn span_over_contract(
    energy_mj: u64,
    rolled_up: Option<(u64, u64)>,
    contracted_milliwatts: u64,
) -> (u64, u64) {
    match rolled_up {
        None => over_contract(energy_mj, contracted_milliwatts),
        Some(stored) => stored,
    }
}

#[cfg(test)]
mod tests;
