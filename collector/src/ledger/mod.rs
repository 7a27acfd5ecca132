//! The billing ledger behind two interfaces: [`LedgerWriter`] (what the
//! committer and the compactor write through) and [`LedgerReader`] (what
//! the usage API, the status page and the `usage` command read), with
//! SQLite ([`sqlite`]) as the embedded implementation and PostgreSQL
//! ([`postgres`]) for several collectors on one database. The ledger holds,
//! per tenant, node and minute, the energy and GPU time counted, plus the
//! cursors that make counting exactly-once across crashes.
//!
//! *Invariant:* one transaction writes the bucket deltas of a set of
//! samples, every node's highest accepted (epoch, seq) and the last counter
//! reading of each of its GPUs (one row per node). The collector acks a sample only after the transaction
//! holding it has committed, so after a crash at any moment the ledger and
//! the cursors agree: samples not committed were not acked and are re-sent;
//! samples committed are duplicates when re-sent.
//!
//! *Invariant (fencing):* a node's cursor is written only by the holder
//! that claimed it last ([`LedgerWriter::claim`]; a holder is unique per
//! collector process start); a commit naming a node
//! another holder claimed since is refused as a whole
//! ([`LedgerError::Fenced`]) and writes nothing. Compaction runs only
//! under a lease ([`LedgerWriter::acquire_compaction`]) that one holder has
//! at a time.
//!
//! *Invariant:* with SQLite, one writer per database file (a flock on the
//! file itself), and a lost ledger is refused, never taken for a new one:
//! only `Ledger::create` makes a ledger, and each commit's revision is
//! recorded in `<ledger>.last-commit` after it, so a ledger behind its
//! marker lost commits (see `Ledger::open_as`).

pub mod postgres;
pub mod sqlite;

#[cfg(test)]
pub(crate) mod conformance;

pub use postgres::{PgLedger, PgPoolStats, PgReader, PgSettings};
pub use sqlite::{Copied, Difference, Verification, backup, backup_into, restore, verify};
pub use sqlite::{Ledger, Reader};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::accounting::{Contract, Metered, MeteredChange};
use crate::tenants::TenantHistory;

/// A version of the tenant file as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantVersion {
    /// When it took effect (Unix nanoseconds).
    pub effective_from_ns: i64,
    /// When the collector loaded it (Unix nanoseconds).
    pub loaded_at_ns: i64,
    /// The file's text.
    pub file: String,
}

/// Rollup periods, in seconds.
pub const HOUR: i64 = 3600;
pub const DAY: i64 = 86_400;
const MINUTE: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {error}")]
    Sqlite {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("ledger {path}: schema version {found} is newer than this collector knows ({known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error(
        "ledger {path}: schema version {found} is older than this collector's ({known}); start the collector once to migrate it"
    )]
    TooOld {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("ledger {path} does not exist")]
    Missing { path: PathBuf },
    #[error(
        "ledger {path} is in use by another collector (another process holds it locked for writing)"
    )]
    InUse { path: PathBuf },
    #[error("ledger {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "no ledger at {path}; to start a new one, run `capwatch-collector init-ledger` with the same --ledger or config once"
    )]
    NotFound { path: PathBuf },
    #[error(
        "no ledger at {path}, but {trace} is left from an earlier one: the ledger was lost. Restore it (with its -wal) rather than start a new one; remove what is left only to give the history up"
    )]
    Traces { path: PathBuf, trace: PathBuf },
    #[error("ledger {path} already exists; nothing was changed")]
    Exists { path: PathBuf },
    #[error(
        "ledger {path} is empty (0 bytes): its data is lost, it is not a new ledger. Restore it from a backup, or remove it and run `capwatch-collector init-ledger` to start a new one"
    )]
    Empty { path: PathBuf },
    #[error("ledger {path} is damaged: SQLite's integrity check says {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error("ledger {path} is not a capwatch ledger (schema version 0)")]
    NotALedger { path: PathBuf },
    #[error("ledger {path} cannot be written: {error}")]
    Unwritable {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "ledger {path} holds {found} commits, but {marker} records commit {expected}: its latest commits are lost (a deleted or replaced -wal file, or an older copy). Restore them, or accept the ledger as it stands with --recover-ledger (it then gets a new ledger_id)"
    )]
    Rewound {
        path: PathBuf,
        marker: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error(
        "ledger {path} holds {found} commits, but {marker}, which records its last commit, is {problem}: its latest commits may be lost (a -wal file left behind where the ledger came from). Restore it, or accept the ledger as it stands with --recover-ledger (it then gets a new ledger_id)"
    )]
    Marker {
        path: PathBuf,
        marker: PathBuf,
        found: u64,
        problem: String,
    },
    #[error("ledger {path}: value out of range in {what}")]
    Range { path: PathBuf, what: &'static str },
    #[error(
        "node {node} was claimed by {holder} (generation {generation}) after this collector's claim, and {} more of the commit's nodes by others: the commit was refused and nothing of it written", .others.len()
    )]
    Fenced {
        node: String,
        holder: String,
        generation: u64,
        /// The commit's other nodes held by other holders: (node, holder,
        /// generation), so that one refusal drops them all.
        others: Vec<(String, String, u64)>,
    },
    #[error(
        "commit {id} of {holder} was refused: the ledger holds commit {found:?} of {holder}, not {expected:?}, the last one this writer saw written (a commit whose answer was lost was written after all, or another process writes as {holder}); nothing of it was written"
    )]
    Superseded {
        holder: String,
        id: u64,
        expected: Option<u64>,
        found: Option<u64>,
    },
    #[error("the compaction lease is held by {holder} until {until} (Unix seconds)")]
    LeaseHeld { holder: String, until: i64 },
    #[error("the compaction lease of {holder} has expired or passed to another holder")]
    LeaseLost { holder: String },
    #[error("ledger {database}: {message}{}", sqlstate_suffix(.sqlstate))]
    Postgres {
        /// `postgres://user@host:port,.../db`, without a password.
        database: String,
        sqlstate: Option<String>,
        message: String,
    },
    #[error(
        "ledger {database}: schema version {found} is newer than this collector knows ({known})"
    )]
    PgTooNew {
        database: String,
        found: i64,
        known: usize,
    },
    #[error(
        "ledger {database}: schema version {found} is older than this collector's ({known}); start the collector once to migrate it"
    )]
    PgTooOld {
        database: String,
        found: i64,
        known: usize,
    },
    #[error(
        "no ledger in {database} (the database has no capwatch schema); to start a new one, run `capwatch-collector init-ledger --ledger-url URL` once"
    )]
    PgNoLedger { database: String },
    #[error("ledger {database} already exists; nothing was changed")]
    PgExists { database: String },
    #[error("ledger {database}: value out of range in {what}")]
    PgRange {
        database: String,
        what: &'static str,
    },
}

/// ` (SQLSTATE xxxxx)` where there is one.
fn sqlstate_suffix(code: &Option<String>) -> String {
    code.as_ref()
        .map(|c| format!(" (SQLSTATE {c})"))
        .unwrap_or_default()
}

/// A GPU's counting state, as committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCursor {
    pub last_counter_mj: Option<u64>,
    pub last_timestamp_ns: Option<i64>,
    pub remainder_mw_ns: u64,
    pub energy_mj: u64,
    /// Counter resets and implausible jumps seen since the GPU was first
    /// seen (`capwatch_gpu_energy_resets_total`).
    pub counter_resets: u64,
    /// When the reading that gave `last_counter_mj` its value was taken:
    /// kept for a node power source (a coarse counter's next step is
    /// bounded and spread from there), `None` for a GPU (a fine counter)
    /// and in a cursor written before it was kept.
    pub changed_ns: Option<i64>,
}

/// A meter's counting state as the ledger keeps it.
impl From<crate::accounting::MeterCursor> for GpuCursor {
    fn from(c: crate::accounting::MeterCursor) -> Self {
        Self {
            last_counter_mj: c.last_counter_mj,
            last_timestamp_ns: c.last_timestamp_ns,
            remainder_mw_ns: c.remainder_mw_ns,
            energy_mj: c.energy_mj,
            counter_resets: c.counter_resets,
            changed_ns: c.changed_ns,
        }
    }
}

/// What a meter resumes from.
impl From<&GpuCursor> for crate::accounting::MeterCursor {
    fn from(c: &GpuCursor) -> Self {
        Self {
            last_counter_mj: c.last_counter_mj,
            last_timestamp_ns: c.last_timestamp_ns,
            remainder_mw_ns: c.remainder_mw_ns,
            energy_mj: c.energy_mj,
            counter_resets: c.counter_resets,
            changed_ns: c.changed_ns,
        }
    }
}

/// Additions to one (tenant, node, minute) bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketDelta {
    pub energy_mj: u64,
    /// GPU time backed by samples (intervals within the staleness window).
    pub gpu_ns: u64,
    /// GPU time weighted by utilization, of the GPU time whose
    /// utilization was read (`gpu_ns` less `busy_unknown_gpu_ns`).
    pub busy_gpu_ns: u64,
    /// GPU readings.
    pub samples: u64,
    /// GPU time between readings, gaps included: what coverage is measured
    /// against.
    pub expected_gpu_ns: u64,
    /// Energy integrated from power instead of read from a counter.
    pub estimated_mj: u64,
    /// Time the tenant was above its contract: in a rollup, the sum of
    /// its minutes' `over_contract`; in a tenant-wide adjustment (node
    /// `""`), what late energy changed in its final minute's; always 0 in
    /// a minute bucket (see `Span::over_contract`).
    pub over_contract_ns: u64,
    /// Energy above the contract, as `over_contract_ns`.
    pub overage_mj: u64,
    /// The tenant's share of the node's whole-node energy (a power source
    /// of domain "node": BMC or IPMI), split among the tenants with GPUs on
    /// the node (`accounting::split_node_energy`). 0 where the node has no
    /// whole-node source: never GPU energy passed off as node energy.
    pub node_energy_mj: u64,
    /// The part of `node_energy_mj` integrated from power instead of read
    /// from a counter.
    pub node_estimated_mj: u64,
    /// Time covered by whole-node readings within their source's staleness
    /// bound, as the tenant's share of it was booked (node coverage).
    pub node_ns: u64,
    /// The part of `gpu_ns` whose readings carried no utilization (a MIG
    /// board on a real driver, a GPU whose utilization call fails): not
    /// busy, not idle, unknown, so `busy_gpu_ns` is a share of the rest.
    /// Stored as the unknown part so that rows from before it was kept
    /// read as they were (0: every reading's utilization counted).
    pub busy_unknown_gpu_ns: u64,
}

/// How many summable fields a `BucketDelta` has (`BUCKET_COLUMNS` of
/// both backends).
pub(crate) const BUCKET_FIELDS: usize = 12;

impl BucketDelta {
    /// The fields in `BUCKET_COLUMNS` order.
    fn values(&self) -> [u64; BUCKET_FIELDS] {
        [
            self.energy_mj,
            self.gpu_ns,
            self.busy_gpu_ns,
            self.samples,
            self.expected_gpu_ns,
            self.estimated_mj,
            self.over_contract_ns,
            self.overage_mj,
            self.node_energy_mj,
            self.node_estimated_mj,
            self.node_ns,
            self.busy_unknown_gpu_ns,
        ]
    }

    fn from_values(v: [u64; BUCKET_FIELDS]) -> Self {
        let [
            energy_mj,
            gpu_ns,
            busy_gpu_ns,
            samples,
            expected_gpu_ns,
            estimated_mj,
            over_contract_ns,
            overage_mj,
            node_energy_mj,
            node_estimated_mj,
            node_ns,
            busy_unknown_gpu_ns,
        ] = v;
        Self {
            energy_mj,
            gpu_ns,
            busy_gpu_ns,
            samples,
            expected_gpu_ns,
            estimated_mj,
            over_contract_ns,
            overage_mj,
            node_energy_mj,
            node_estimated_mj,
            node_ns,
            busy_unknown_gpu_ns,
        }
    }

    /// Adds `other` field by field.
    pub fn add(&mut self, other: &BucketDelta) {
        let mut v = self.values();
        for (a, b) in v.iter_mut().zip(other.values()) {
            *a = a.saturating_add(b);
        }
        *self = Self::from_values(v);
    }
}

/// Bucket key: (tenant, node, minute start in Unix seconds).
pub type BucketKey = (Arc<str>, Arc<str>, i64);

/// Per-GPU row key: (tenant, node, GPU, hour start in Unix seconds). The
/// GPU is the unit a tenant leases and energy is attributed to: a board's
/// UUID, or for a MIG board's part the MIG instance's UUID (or the key of
/// its slices in no instance).
pub type GpuHourKey = (Arc<str>, Arc<str>, Arc<str>, i64);

/// Additions to one per-GPU hour (`GpuHourKey`): the GPU figures of
/// `BucketDelta` (energy, its estimated part, GPU time, busy GPU time,
/// GPU time of unknown utilization, expected GPU time, readings; the
/// tenant-wide and whole-node figures stay 0), and the earliest minute
/// they were booked to, which tells a commit whether any of it is late
/// (for a minute already final).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuDelta {
    pub delta: BucketDelta,
    /// The earliest minute start (Unix seconds) booked into it.
    pub first_minute: i64,
}

impl Default for GpuDelta {
    fn default() -> Self {
        Self {
            delta: BucketDelta::default(),
            first_minute: i64::MAX,
        }
    }
}

impl GpuDelta {
    /// Adds `other`: its figures, and its earliest minute if earlier.
    pub fn add(&mut self, other: &GpuDelta) {
        self.delta.add(&other.delta);
        self.first_minute = self.first_minute.min(other.first_minute);
    }

    /// The figures a per-GPU row keeps, in `GPU_COLUMNS` order.
    pub(crate) fn values(&self) -> [u64; GPU_FIELDS] {
        let d = &self.delta;
        [
            d.energy_mj,
            d.gpu_ns,
            d.busy_gpu_ns,
            d.samples,
            d.expected_gpu_ns,
            d.estimated_mj,
            d.busy_unknown_gpu_ns,
        ]
    }

    /// A bucket delta of the figures a per-GPU row keeps.
    pub(crate) fn bucket(v: [u64; GPU_FIELDS]) -> BucketDelta {
        let [
            energy_mj,
            gpu_ns,
            busy_gpu_ns,
            samples,
            expected_gpu_ns,
            estimated_mj,
            busy_unknown_gpu_ns,
        ] = v;
        BucketDelta {
            energy_mj,
            gpu_ns,
            busy_gpu_ns,
            samples,
            expected_gpu_ns,
            estimated_mj,
            busy_unknown_gpu_ns,
            ..BucketDelta::default()
        }
    }
}

/// How many figures a per-GPU row keeps.
pub(crate) const GPU_FIELDS: usize = 7;

/// The columns of the per-GPU hours (`gpu_hour`), in `GpuDelta::values`
/// order, on both backends.
pub(crate) const GPU_COLUMNS: [&str; GPU_FIELDS] = [
    "energy_mj",
    "gpu_ns",
    "busy_gpu_ns",
    "samples",
    "expected_gpu_ns",
    "estimated_mj",
    "busy_unknown_gpu_ns",
];

/// Whether the writer of a commit keeps per-GPU rows
/// (`usage_gpu_rows`), which the commit records for the ledger: a
/// ledger's per-GPU rows are complete only from the hour after the last
/// commit of a writer that does not keep them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GpuRows {
    /// Not said (tools and tests): the ledger's record is left as it is.
    #[default]
    Unsaid,
    /// The commit holds every GPU's figures per hour.
    Kept,
    /// It holds none: per-GPU rows stop being complete.
    NotKept,
}

/// One hour of one GPU as the ledger keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuHour {
    pub start: i64,
    /// The GPU figures (see `GpuDelta`); the others are 0.
    pub delta: BucketDelta,
    /// The revision of the last commit that added to it late (energy for
    /// a minute already final), 0 for none.
    pub revision: u64,
}

/// One GPU's hours in a period, read in one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuUsage {
    /// By start.
    pub hours: Vec<GpuHour>,
    /// The revision of the last commit.
    pub revision: u64,
    /// Minutes ending at or before this (Unix seconds) never change.
    pub finalized_through: i64,
    /// `LedgerReader::gpu_rows_from` as of the same read: the hours read
    /// hold every GPU's figures only from this hour on (`None`: not now).
    /// A compaction or a writer without per-GPU rows between the check
    /// before a walk and this read shows here.
    pub complete_from: Option<i64>,
}

/// The first hour (Unix seconds) per-GPU rows hold every GPU's figures
/// from, given when the ledger records them complete from (`since`,
/// `None`: not now) and from when its hourly figures are kept (the hour
/// retention): the later of the two.
pub fn gpu_rows_from(since: Option<i64>, hours_kept_from: i64) -> Option<i64> {
    since.map(|s| s.max(hours_kept_from))
}

/// What the ledger keeps per node: the highest (epoch, seq) accepted, the
/// counting state of each of its GPUs (by UUID), those it announced last
/// and those that left it, and of each of its power sources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeCursor {
    pub epoch: u64,
    pub last_seq: u64,
    pub gpus: Vec<(Arc<str>, GpuCursor)>,
    /// Each node power source's counting state, by `"{kind}/{name}"`
    /// (stored in the same blob as the GPUs'; a cursor written before
    /// node power reads with none).
    pub power: Vec<(Arc<str>, GpuCursor)>,
    /// Each tenant's part in the node's open whole-node stretch (GPU
    /// energy and GPU time since its counter last booked energy,
    /// `accounting::NodeStretch`), by tenant id; a cursor written before
    /// it was kept reads with none (the next split weighs by GPU count).
    pub stretch: Vec<(Arc<str>, crate::accounting::StretchWeight)>,
}

impl NodeCursor {
    /// The earliest minute (Unix seconds) this node's power readings may
    /// still book whole-node energy into, and when the newest of them was
    /// taken (Unix seconds): a coarse counter's next step is spread back
    /// to its last change (`accounting::NodeStretch`), any other reading
    /// (a fine counter, one standing still too, or power alone) books from
    /// the one before it; never further back than a step is spread
    /// (`edge::MAX_SPREAD`). `None` for a node without power source
    /// readings. What the meters' allocation waits for
    /// (`LedgerReader::placing_holds`).
    pub fn placing(&self) -> Option<(i64, i64)> {
        let mut out: Option<(i64, i64)> = None;
        for (_, c) in &self.power {
            let Some(at) = c.last_timestamp_ns else {
                continue;
            };
            // No further back than a step is ever spread.
            let cap = at.saturating_sub(crate::edge::MAX_SPREAD.as_nanos() as i64);
            let changed = c.changed_ns.filter(|_| {
                c.last_counter_mj
                    .is_some_and(crate::accounting::may_be_coarse)
            });
            let from = changed.unwrap_or(at).min(at).max(cap);
            let minute = from.div_euclid(MINUTE * NANOS) * MINUTE;
            let seen = at.div_euclid(NANOS);
            out = Some(match out {
                Some((m, s)) => (m.min(minute), s.max(seen)),
                None => (minute, seen),
            });
        }
        out
    }
}

/// Nanoseconds in a second.
const NANOS: i64 = 1_000_000_000;

/// Where a node's power readings may still book energy
/// (`NodeCursor::placing`), as the ledger keeps it beside the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacingHold {
    pub node: String,
    /// The earliest minute (Unix seconds) it may still book into.
    pub from_minute: i64,
    /// When its newest power reading was taken (Unix seconds).
    pub seen: i64,
}

/// Everything one transaction writes.
#[derive(Debug, Default)]
pub struct Commit {
    /// Each node's latest cursor, complete: a later one replaces it.
    pub nodes: HashMap<Arc<str>, NodeCursor>,
    pub buckets: HashMap<BucketKey, BucketDelta>,
    /// The same deltas per GPU and hour (the GPU figures alone), added to
    /// the per-GPU rows in the same transaction.
    pub gpu_hours: HashMap<GpuHourKey, GpuDelta>,
    /// Whether the writer keeps per-GPU rows.
    pub gpu_rows: GpuRows,
    pub tenant_energy: HashMap<Arc<str>, u64>,
    /// The tenant file's history, whose version in force at each minute
    /// gives the contract the minute is measured against, for each
    /// tenant's over-contract counter; none: no tenant has one.
    pub contracts: Option<Arc<TenantHistory>>,
    /// The commit's id, increasing with each commit of its holder: what
    /// tells, after a commit returned an error, whether it was written all
    /// the same (`LedgerWriter::commit_written`). `None`: not tracked (tools
    /// and tests).
    pub id: Option<u64>,
}

/// What a commit added to the tenants' over-contract counters
/// (`tenant_total.over_contract_ns`), by tenant.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// The commit's revision.
    pub revision: u64,
    pub over_contract_ns: Vec<(Arc<str>, u64)>,
}

impl Commit {
    /// Each tenant's node energy in the commit's buckets, by tenant, those
    /// with none left out: what the commit adds to
    /// `tenant_total.node_energy_mj`.
    pub fn node_energy_by_tenant(&self) -> Vec<(Arc<str>, u64)> {
        let mut by: HashMap<&Arc<str>, u64> = HashMap::new();
        for ((tenant, _, _), d) in &self.buckets {
            if d.node_energy_mj > 0 {
                let e = by.entry(tenant).or_default();
                *e = e.saturating_add(d.node_energy_mj);
            }
        }
        let mut v: Vec<(Arc<str>, u64)> = by.into_iter().map(|(t, e)| (t.clone(), e)).collect();
        v.sort();
        v
    }

    /// The latest minute the commit books into (its buckets'), or
    /// `at`'s minute when it books none: what a writer that keeps no
    /// per-GPU rows leaves them incomplete through. An agent whose clock
    /// is ahead (within `max_clock_skew`) may book minutes after `at`.
    pub fn last_minute_booked(&self, at: i64) -> i64 {
        self.buckets
            .keys()
            .map(|(_, _, minute)| *minute)
            .fold(at.div_euclid(MINUTE) * MINUTE, i64::max)
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.buckets.is_empty()
    }

    /// Folds a later commit into this one (used when a commit failed and
    /// is retried together with what arrived since).
    pub fn absorb(&mut self, later: Commit) {
        self.nodes.extend(later.nodes);
        for (k, d) in later.buckets {
            self.buckets.entry(k).or_default().add(&d);
        }
        for (k, d) in later.gpu_hours {
            self.gpu_hours.entry(k).or_default().add(&d);
        }
        if later.gpu_rows != GpuRows::Unsaid {
            self.gpu_rows = later.gpu_rows;
        }
        for (t, e) in later.tenant_energy {
            *self.tenant_energy.entry(t).or_default() += e;
        }
        if later.contracts.is_some() {
            self.contracts = later.contracts;
        }
        if later.id.is_some() {
            self.id = later.id;
        }
    }
}

/// What the ledger holds at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<(String, NodeCursor)>,
    pub tenant_energy: Vec<(String, u64)>,
    pub tenant_over_contract_ns: Vec<(String, u64)>,
    /// Each tenant's node energy (`tenant_total.node_energy_mj`).
    pub tenant_node_energy: Vec<(String, u64)>,
}

/// Every tenant's totals as the ledger holds them (`tenant_total`): the
/// sum of every writer's commits. What `restore` returns as
/// `Snapshot::tenant_energy` and `tenant_over_contract_ns`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LedgerTotals {
    pub tenant_energy: Vec<(String, u64)>,
    pub tenant_over_contract_ns: Vec<(String, u64)>,
    /// The sum of each tenant's `BucketDelta::node_energy_mj` committed.
    pub tenant_node_energy: Vec<(String, u64)>,
}

/// The ledger's identity, shown on `/metrics` so that a swapped or
/// recreated ledger is seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Random, given when the ledger was created (or recovered).
    pub ledger_id: String,
    /// Unix seconds.
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// Hours ending at or before this are closed and get rolled up.
    pub closed_before: i64,
    /// Minute buckets before this are dropped (rounded down to the hour).
    pub minutes_from: i64,
    /// Hourly rollups before this are dropped (rounded down to the day).
    pub hours_from: i64,
    /// Daily rollups before this are dropped; `None` keeps them forever.
    pub days_from: Option<i64>,
    /// The first minute some configured facility meter has yet to
    /// allocate (`MeterState::allocated_through`, the lowest of them);
    /// minute buckets from there on are kept whatever `minutes_from`
    /// says, since the allocation splits each meter-minute by them.
    /// `None`: no meter waits for any.
    pub allocating_from: Option<i64>,
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    pub hours_rolled_up: usize,
    pub days_rolled_up: usize,
    pub minute_rows_dropped: usize,
    pub hour_rows_dropped: usize,
    /// Per-GPU hours dropped with the hourly rollups.
    pub gpu_hour_rows_dropped: usize,
    pub day_rows_dropped: usize,
    pub adjustment_rows_dropped: usize,
    /// Meter-minutes folded into the meters' hourly sums.
    pub meter_rows_rolled_up: usize,
}

/// A stretch of one tenant's usage, summed over its nodes: a minute bucket
/// or an hourly or daily rollup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: i64,
    pub seconds: i64,
    pub delta: BucketDelta,
    /// Highest quarter-hour energy inside a rollup; `None` for a minute,
    /// whose quarter-hours are summed from the minutes themselves.
    pub peak_quarter_mj: Option<u64>,
    /// As `peak_quarter_mj`, of node energy.
    pub node_peak_quarter_mj: Option<u64>,
    /// What the meters allocated of a rollup's minutes, and the node
    /// energy that replaces (`Metered::NONE` for a minute: the usage rows
    /// look its allocation up themselves).
    pub metered: Metered,
    /// A rollup's highest quarter-hour of facility energy (the allocation,
    /// plus the PUE estimate of what none allocated), each minute on the
    /// PUE of its contract; `None` for a minute, and for a rollup made
    /// before rollups kept it (its facility peak is then node peak × PUE).
    pub facility_peak_quarter_mj: Option<u64>,
}

impl Span {
    /// Over-contract time (ns) and overage (mJ) of the span against the
    /// tenant's contract for its minute: `over_contract` of a minute's
    /// energy on the contract's basis (with what the meters allocated of
    /// it, `metered`), or what a rollup stored when it was rolled up (the
    /// contract is then not used).
    pub fn over_contract(&self, contract: &Contract, metered: Metered) -> (u64, u64) {
        let rolled_up = self
            .peak_quarter_mj
            .map(|_| (self.delta.over_contract_ns, self.delta.overage_mj));
        crate::accounting::span_over_contract(
            self.basis_energy(contract, metered),
            rolled_up,
            contract.milliwatts,
        )
    }

    /// The span's energy on `contract`'s basis (mJ), with what the meters
    /// allocated of it.
    pub fn basis_energy(&self, contract: &Contract, metered: Metered) -> u64 {
        contract.basis_energy(self.delta.energy_mj, self.delta.node_energy_mj, metered)
    }

    /// A rollup's highest quarter-hour on `contract`'s basis; `None` for a
    /// minute.
    pub fn basis_peak_quarter_mj(&self, contract: &Contract) -> Option<u64> {
        self.peak_quarter_mj.map(|gpu| match contract.basis {
            crate::accounting::Basis::Facility if self.facility_peak_quarter_mj.is_some() => {
                self.facility_peak_quarter_mj.unwrap_or(0)
            }
            _ => contract.basis_energy(gpu, self.node_peak_quarter_mj.unwrap_or(0), Metered::NONE),
        })
    }
}

/// What a rollup keeps of one tenant's minutes beyond their sums,
/// evaluated as it is rolled up (none of it can be had from the sums
/// later): time over contract and overage, each minute against the
/// contract of its time on its basis with what the meters allocated of
/// it; the allocation and the node energy it replaced; and the highest
/// quarter-hour of facility energy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RolledMinutes {
    pub over_contract_ns: u64,
    pub overage_mj: u64,
    pub metered: Metered,
    pub facility_peak_quarter_mj: u64,
}

/// [`RolledMinutes`] of each tenant, from its minutes: (tenant, minute
/// start, GPU energy, node energy) summed over nodes, and what the
/// meters allocated of them: (tenant, minute start, allocated, node
/// energy replaced) summed over meters.
pub(crate) fn roll_minutes(
    minutes: impl IntoIterator<Item = (String, i64, u64, u64)>,
    allocated: impl IntoIterator<Item = (String, i64, u64, u64)>,
    contracts: &TenantHistory,
) -> std::collections::BTreeMap<String, RolledMinutes> {
    use std::collections::BTreeMap;
    let mut by: BTreeMap<(String, i64), (u64, u64, Metered)> = BTreeMap::new();
    for (t, m, gpu, node) in minutes {
        let e = by.entry((t, m)).or_default();
        e.0 = e.0.saturating_add(gpu);
        e.1 = e.1.saturating_add(node);
    }
    for (t, m, allocated_mj, node_mj) in allocated {
        by.entry((t, m)).or_default().2.add(Metered {
            allocated_mj,
            node_mj,
        });
    }
    let mut out: BTreeMap<String, RolledMinutes> = BTreeMap::new();
    let mut quarters: BTreeMap<(&str, i64), u64> = BTreeMap::new();
    for ((tenant, minute), (gpu, node, metered)) in &by {
        let contract = contracts.contract_at(tenant, *minute);
        let (ns, mj) = crate::accounting::over_contract(
            contract.basis_energy(*gpu, *node, *metered),
            contract.milliwatts,
        );
        let r = out.entry(tenant.clone()).or_default();
        r.over_contract_ns = r.over_contract_ns.saturating_add(ns);
        r.overage_mj = r.overage_mj.saturating_add(mj);
        r.metered.add(*metered);
        let facility = contract
            .facility_energy(*node, *metered)
            .unwrap_or(metered.allocated_mj);
        let q = quarters
            .entry((tenant.as_str(), minute.div_euclid(900)))
            .or_default();
        *q = q.saturating_add(facility);
    }
    for ((tenant, _), e) in quarters {
        if let Some(r) = out.get_mut(tenant) {
            r.facility_peak_quarter_mj = r.facility_peak_quarter_mj.max(e);
        }
    }
    out
}

/// Usage read for a period: the spans, finest first available, and from
/// when each granularity is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// (tenant, span), ordered by tenant, then time.
    pub spans: Vec<(String, Span)>,
    /// Minute buckets exist from here on; before, hourly rollups.
    pub minutes_from: i64,
    /// Hourly rollups exist from here on; before, daily rollups.
    pub hours_from: i64,
    /// Daily rollups exist from here on; before, nothing is kept.
    pub days_from: i64,
    /// The revision of the last commit.
    pub revision: u64,
    /// Minutes ending at or before this (Unix seconds) never change.
    pub finalized_through: i64,
    /// Deltas booked for minutes of the period that were already final,
    /// in revisions after the one asked about, ordered by revision,
    /// tenant, node and minute.
    pub adjustments: Vec<Adjustment>,
}

/// What the meters allocated of the minutes a usage read keeps minute by
/// minute, read in its snapshot (`LedgerReader::usage_allocated_since`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageAllocation {
    /// (meter, minute), as `LedgerReader::meter_minutes` of every meter.
    pub minutes: Vec<(String, MeterMinute)>,
    /// As `LedgerReader::tenant_node_minutes`, where asked for.
    pub nodes: Vec<NodeMinute>,
    /// Each meter the ledger has a state of and the first minute it
    /// allocated (its state's next minute where it allocated none yet),
    /// by meter: no minute before is ever split by it.
    pub started: Vec<(String, i64)>,
}

/// A late delta to a final minute of one tenant on one node, booked by
/// revision `revision` at `booked_at` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    pub revision: u64,
    pub booked_at: i64,
    pub tenant: String,
    pub node: String,
    pub minute_start: i64,
    pub delta: BucketDelta,
    /// What a facility meter's allocation of the minute gave the tenant
    /// and the node energy that replaces (node `""`, a revision of the
    /// allocation's own, nothing in `delta`): the minute's facility energy
    /// is restated from the PUE estimate of that node energy to the
    /// allocation. Where the meter split an allocated minute again, for
    /// energy booked for it after its split, the change of both (signed).
    /// `MeteredChange::NONE` in every other adjustment.
    pub metered: MeteredChange,
}

/// What a claim found: the node's fencing generation and its cursor as
/// committed, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Bumped each time another holder takes the node; kept when its
    /// holder claims it again.
    pub generation: u64,
    /// The node's cursor as last committed, by any holder; `None` for a
    /// node never committed.
    pub cursor: Option<NodeCursor>,
}

/// The compaction lease, as one holder has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionLease {
    pub holder: String,
    /// Unix seconds; from then on another holder may take it.
    pub expires_at: i64,
}

/// Where a facility meter's allocation stands: every minute before
/// `allocated_through` (Unix seconds, a minute start) is allocated. The
/// meter's reading used last, as the meter gave it (`reading_raw`: the
/// Modbus register's count, or a PDU's energy in mJ), stamped
/// `reading_at_ns`, is what the next minutes' energy is counted from,
/// whichever collector counts it; `carry_mj` is the part of the energy
/// since that reading already allocated (it lies before the boundary).
///
/// `revision`: every minute allocated before `allocated_through` is split
/// by what its nodes measured in the ledger as of this revision (its
/// buckets and the adjustments booked for it by then); energy booked for
/// those minutes after it is split into them by the next allocation
/// (`MeterResplit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterState {
    pub allocated_through: i64,
    pub reading_at_ns: i64,
    pub reading_raw: u64,
    pub carry_mj: u64,
    pub revision: u64,
}

/// An allocated meter-minute split again because energy was booked for
/// it after its split: what its nodes measured now, its parts (the same
/// metered energy, split by that), and each tenant's change, booked as
/// an adjustment (`MeteredChange`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterResplit {
    pub minute: MeterMinute,
    /// (tenant, change of its part, change of the node energy that part
    /// replaces), only where one is not 0.
    pub changes: Vec<(String, i64, i64)>,
}

/// One meter-minute, allocated: the meter's energy, what its nodes
/// measured, and each tenant's part, which add up to `metered_mj` with
/// `unallocated_mj` (all of it when nothing was measured, else 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterMinute {
    pub minute: i64,
    pub metered_mj: u64,
    pub measured_mj: u64,
    pub unallocated_mj: u64,
    /// Each tenant's part, by tenant.
    pub tenants: Vec<MeterShare>,
}

/// One tenant's part of a meter-minute: what its nodes under the meter
/// measured (`NodeMinute::measured_mj`), what the meter allocated to it,
/// and the node energy of those nodes (`NodeMinute::node_energy_mj`) when
/// the minute was allocated: what the allocation replaces on the facility
/// basis, kept so that a meter's node list changing later changes no
/// minute allocated before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterShare {
    pub tenant: String,
    pub measured_mj: u64,
    pub allocated_mj: u64,
    pub node_mj: u64,
}

impl MeterShare {
    pub fn new(tenant: &str, measured_mj: u64, allocated_mj: u64, node_mj: u64) -> Self {
        Self {
            tenant: tenant.to_string(),
            measured_mj,
            allocated_mj,
            node_mj,
        }
    }
}

/// What one node measured for one tenant in one minute, its bucket and
/// every adjustment booked for it so far together (energy booked once the
/// minute was final is measured energy all the same, and the split of the
/// minute's meter energy must weigh it): its node energy where it has a
/// whole-node source (node time or node energy above 0), else its GPU
/// energy; and the node energy of the bucket alone
/// (`BucketDelta::node_energy_mj` of the usage row, which excludes its
/// adjustments), whose PUE estimate in the row a meter's allocation
/// replaces on the facility basis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMinute {
    pub tenant: String,
    pub node: String,
    pub minute: i64,
    pub measured_mj: u64,
    pub node_energy_mj: u64,
}

/// Writes the ledger: what the committer, the compactor and the start-up
/// restore use. Designed for several collectors writing one database,
/// each under its own holder id; an implementation where one process holds
/// the database (SQLite) keeps the same rules, trivially held.
///
/// Tenant totals (`Snapshot::tenant_energy`, `tenant_over_contract_ns`)
/// are kept by each commit as additions inside its own transaction (never
/// written as a total from a writer's memory), so the ledger's totals are
/// the sum of every writer's commits, however many there are. `restore`
/// and `tenant_totals` read them from the ledger; `/metrics` shows what
/// `tenant_totals` read last, so every collector shows the same.
pub trait LedgerWriter: Send {
    /// Who this ledger is: shown on `/metrics`.
    fn identity(&self) -> &Identity;

    /// The cursors and tenant totals to resume from at start-up.
    fn restore(&self) -> Result<Snapshot, LedgerError>;

    /// Every tenant's totals as the ledger holds them now, with every
    /// writer's commits: what `/metrics` shows of tenant energy and
    /// over-contract time, so that every collector shows the same. Read
    /// after each commit and, idle, every commit interval.
    fn tenant_totals(&self) -> Result<LedgerTotals, LedgerError>;

    /// Claims each of `nodes` for `holder`, in one transaction: a node
    /// held by another holder (or by none) passes to `holder` with its
    /// generation bumped; one `holder` already holds keeps its generation
    /// (a collector re-accepting its own node after a reconnect must not
    /// fence its own pending commit). Returns, in the order asked, each
    /// node's generation and stored cursor.
    fn claim_nodes(&mut self, holder: &str, nodes: &[&str]) -> Result<Vec<Claim>, LedgerError>;

    /// `claim_nodes` for one node.
    fn claim(&mut self, holder: &str, node: &str) -> Result<Claim, LedgerError> {
        let mut claims = self.claim_nodes(holder, &[node])?;
        Ok(claims.pop().expect("one claim per node asked"))
    }

    /// Who holds each of `nodes` now, in the order asked (`None`: nobody
    /// has claimed it), claiming nothing: what a collector asks about the
    /// nodes whose streams to it ended, to learn which of them another
    /// collector has claimed since.
    fn holders(&self, nodes: &[&str]) -> Result<Vec<Option<String>>, LedgerError>;

    /// Writes `batch` for `holder` in one transaction as the next revision,
    /// booked at `booked_at` (Unix seconds), and moves the watermark
    /// forward to `finalize_through` (never back). Refused as a whole, with
    /// `LedgerError::Fenced` and nothing written (no bucket, no cursor, no
    /// total), when any node of `batch.nodes` is held by another holder;
    /// a node nobody has claimed is claimed for `holder` by the commit
    /// itself, in the same transaction. A commit with an id is refused
    /// with `LedgerError::Superseded` (nothing written) unless its holder's
    /// last written commit is the one this writer saw last and `id` is
    /// after it; the transaction records `id` as the holder's last.
    fn commit_as(
        &mut self,
        holder: &str,
        batch: &Commit,
        booked_at: i64,
        finalize_through: i64,
    ) -> Result<Committed, LedgerError>;

    /// Whether commit `id` of `holder` was written: asked after that commit
    /// returned an error, before anything is retried, since an error does
    /// not say that nothing was written (the answer to COMMIT can be lost
    /// with the connection after the server wrote it). True: it was, and
    /// the writer counts it as the holder's last. False: it was not, and
    /// never will be, because each commit with an id is written only if
    /// its holder's last written commit is still the one this writer saw
    /// last (checked and moved in the commit's own transaction, so a stale
    /// copy still in flight cannot land after its retry).
    fn commit_written(&mut self, holder: &str, id: u64) -> Result<bool, LedgerError>;

    /// Where the watermark stands: minute buckets ending at or before this
    /// (Unix seconds) never change.
    fn finalized_through(&self) -> Result<i64, LedgerError>;

    /// Every tenant file version recorded, in the order they were loaded.
    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError>;

    /// Records a tenant file version (durably, on its own transaction).
    fn add_tenant_version(&mut self, v: &TenantVersion) -> Result<(), LedgerError>;

    /// Takes (or renews) the compaction lease for `holder` at `now` (Unix
    /// seconds) until `now + ttl`; refused with `LedgerError::LeaseHeld`
    /// while another holder's lease has not expired.
    fn acquire_compaction(
        &mut self,
        holder: &str,
        now: i64,
        ttl: Duration,
    ) -> Result<CompactionLease, LedgerError>;

    /// Rolls closed hours up and applies `policy` in one transaction, under
    /// `lease`: refused with `LedgerError::LeaseLost` (and nothing done)
    /// where the lease expired by `now` or passed to another holder.
    fn compact_under(
        &mut self,
        lease: &CompactionLease,
        now: i64,
        policy: &Compaction,
        contracts: &TenantHistory,
    ) -> Result<Compacted, LedgerError>;

    /// Gives the lease up, so that another holder may take it at once; a
    /// lease no longer held is left alone.
    fn release_compaction(&mut self, lease: &CompactionLease) -> Result<(), LedgerError>;

    /// Where `meter`'s allocation stands; `None` before its first.
    fn meter_state(&self, meter: &str) -> Result<Option<MeterState>, LedgerError>;

    /// What every node measured in each minute of `[from, to)` (Unix
    /// seconds, minute-aligned), from the minute buckets and the
    /// adjustments booked for them (`NodeMinute`), read in one statement.
    fn node_minutes(&self, from: i64, to: i64) -> Result<Vec<NodeMinute>, LedgerError>;

    /// Writes `minutes` of `meter` and moves its state from `from` to
    /// `to`, in one transaction, only while the stored state is still
    /// `from` (none: the meter has none yet). Returns false, having
    /// written nothing, where it is not (another collector allocated
    /// first): *Invariant:* a meter-minute is allocated once, whatever
    /// the number of collectors.
    fn allocate_meter(
        &mut self,
        meter: &str,
        from: Option<&MeterState>,
        to: &MeterState,
        minutes: &[MeterMinute],
    ) -> Result<bool, LedgerError> {
        self.allocate_meter_again(meter, from, to, minutes, &[])
    }

    /// As `allocate_meter`, and in the same transaction replaces the
    /// split of minutes allocated before with `again` (each minute still
    /// kept: one folded into hourly sums meanwhile refuses the whole write,
    /// and the next round leaves it out), booking each tenant's change as
    /// an adjustment of the allocation's revision.
    fn allocate_meter_again(
        &mut self,
        meter: &str,
        from: Option<&MeterState>,
        to: &MeterState,
        minutes: &[MeterMinute],
        again: &[MeterResplit],
    ) -> Result<bool, LedgerError>;
}

/// Reads the ledger: usage rows, minutes, adjustments and tenants. Never
/// refused by writers, and never writes.
pub trait LedgerReader {
    /// Every tenant file version recorded, in the order they were loaded.
    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError>;

    /// How many tenant file versions are recorded (they are only added).
    fn tenant_version_count(&self) -> Result<u64, LedgerError>;

    /// Minute buckets in `[from, to)` (Unix seconds, minute-aligned),
    /// summed over nodes: (tenant, minute start, sums), ordered by tenant
    /// then time. `tenant` `None` reads every tenant.
    fn minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, BucketDelta)>, LedgerError>;

    /// The usage of `tenant` (`None`: every tenant) in `[from, to)`, read
    /// in one snapshot: minute buckets where they are kept, hourly and then
    /// daily rollups before, and every adjustment.
    fn usage(&self, tenant: Option<&str>, from: i64, to: i64) -> Result<Usage, LedgerError> {
        self.usage_since(tenant, from, to, 0)
    }

    /// As `usage`, with the adjustments booked after revision
    /// `since_revision` only, all read in one snapshot.
    fn usage_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError>;

    /// As `usage_since`, with what the meters allocated of the minutes it
    /// keeps minute by minute (`[max(from, minutes_from), to)`: every
    /// meter's `meter_minutes`, and `tenant_node_minutes` of `tenant`
    /// where `with_nodes`) and where each meter's allocation started, all
    /// in the one snapshot: an allocation, or a
    /// minute split again, is in the answer exactly when the adjustments
    /// that book it are within the answer's revision.
    fn usage_allocated_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
        with_nodes: bool,
    ) -> Result<(Usage, UsageAllocation), LedgerError>;

    /// As `usage_since`, without the spans: the adjustments booked after
    /// `since_revision` to minutes of `[from, to)`, with the revision and
    /// the watermark of the same snapshot. What a reader that keeps the
    /// final minutes it read (the status page) asks to bring them up to
    /// date.
    fn adjustments_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError>;

    /// Every tenant that has buckets.
    fn tenants(&self) -> Result<Vec<String>, LedgerError>;

    /// The nodes `tenant` has minute buckets or hourly or daily rollups on
    /// in `[from, to)`, sorted: the nodes a usage walk grouped by node
    /// lists for it.
    fn usage_nodes(&self, tenant: &str, from: i64, to: i64) -> Result<Vec<String>, LedgerError>;

    /// As `usage_since` of `tenant`, for its minute buckets, rollups and
    /// adjustments on `node` alone (spans keyed by the tenant, as there).
    /// What a rollup keeps only per tenant (its peak quarter-hours, its
    /// minutes' evaluation against the contract, the meters' allocation)
    /// is zero in these spans: it cannot be split by node.
    fn node_usage_since(
        &self,
        tenant: &str,
        node: &str,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError>;

    /// The first hour (Unix seconds) from which the per-GPU rows hold
    /// every GPU's figures: the later of when the ledger records them
    /// complete from and of the hour retention (`gpu_rows_from`); `None`
    /// where they are not complete now (a writer that does not keep them
    /// committed last).
    fn gpu_rows_from(&self) -> Result<Option<i64>, LedgerError>;

    /// The GPUs `tenant` has per-GPU hours of in `[from, to)`, as (node,
    /// GPU), sorted: the GPUs a usage walk grouped by GPU lists for it.
    fn usage_gpus(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, String)>, LedgerError>;

    /// The hours of `tenant` on `gpu` of `node` starting in `[from, to)`,
    /// with the revision and watermark of the same snapshot.
    fn gpu_usage(
        &self,
        tenant: &str,
        node: &str,
        gpu: &str,
        from: i64,
        to: i64,
    ) -> Result<GpuUsage, LedgerError>;

    /// The allocated minutes of `meter` (`None`: every meter) in
    /// `[from, to)`: (meter, minute), by meter then time.
    fn meter_minutes(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, MeterMinute)>, LedgerError>;

    /// The hourly sums kept of `meter`'s (`None`: every meter's) minutes
    /// once they passed the minute retention, of hours starting in
    /// `[from, to)`: (meter, how many allocated minutes the hour holds,
    /// the sums with `minute` the hour's start), by meter then time.
    fn meter_hours(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, u64, MeterMinute)>, LedgerError>;

    /// What the meters' allocation reads, on a read connection so that
    /// commits do not wait for it: the watermark (as
    /// `LedgerWriter::finalized_through`) and a meter's allocation state
    /// (as `LedgerWriter::meter_state`).
    fn finalized_through(&self) -> Result<i64, LedgerError>;
    fn meter_state(&self, meter: &str) -> Result<Option<MeterState>, LedgerError>;
    /// What every node measured in each minute of `[from, to)`, per
    /// tenant, from the minute buckets and their adjustments (as
    /// `LedgerWriter::node_minutes`):
    /// what the allocation splits a meter-minute by, and what the usage
    /// rows of a facility-basis tenant set beside its meters' allocation.
    fn node_minutes(&self, from: i64, to: i64) -> Result<Vec<NodeMinute>, LedgerError>;
    /// `node_minutes` of `tenant` alone (`None`: every tenant), chosen
    /// where the rows are read: what a usage query for one tenant reads.
    fn tenant_node_minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<NodeMinute>, LedgerError>;
    /// Every node whose power readings may still book energy into a
    /// minute (`NodeCursor::placing`, as last committed): a meter's minute
    /// is not allocated while a node under it may still add to it.
    fn placing_holds(&self) -> Result<Vec<PlacingHold>, LedgerError>;
    /// The revision of the last commit or allocation.
    fn revision(&self) -> Result<u64, LedgerError>;
    /// `node_minutes` as the ledger held them at `revision`: the buckets
    /// (final: allocated minutes' buckets no longer change) and the
    /// adjustments booked by that revision.
    fn node_minutes_as_of(
        &self,
        from: i64,
        to: i64,
        revision: u64,
    ) -> Result<Vec<NodeMinute>, LedgerError>;
    /// Where energy was booked late into minutes `meter` allocated and
    /// still keeps minute by minute, by adjustments of revisions in
    /// `(after, through]`: (revision, minute, node), each once, by
    /// revision, minute, node.
    fn late_in_meter_minutes(
        &self,
        meter: &str,
        after: u64,
        through: u64,
    ) -> Result<Vec<(u64, i64, String)>, LedgerError>;
}

/// A writer of either backend, chosen by configuration.
pub type AnyWriter = Box<dyn LedgerWriter>;

/// A reader of either backend, chosen by configuration.
pub type AnyReader = Box<dyn LedgerReader + Send>;

impl<W: LedgerWriter + ?Sized> LedgerWriter for Box<W> {
    fn identity(&self) -> &Identity {
        (**self).identity()
    }
    fn restore(&self) -> Result<Snapshot, LedgerError> {
        (**self).restore()
    }
    fn claim_nodes(&mut self, holder: &str, nodes: &[&str]) -> Result<Vec<Claim>, LedgerError> {
        (**self).claim_nodes(holder, nodes)
    }
    fn claim(&mut self, holder: &str, node: &str) -> Result<Claim, LedgerError> {
        (**self).claim(holder, node)
    }
    fn holders(&self, nodes: &[&str]) -> Result<Vec<Option<String>>, LedgerError> {
        (**self).holders(nodes)
    }
    fn commit_as(
        &mut self,
        holder: &str,
        batch: &Commit,
        booked_at: i64,
        finalize_through: i64,
    ) -> Result<Committed, LedgerError> {
        (**self).commit_as(holder, batch, booked_at, finalize_through)
    }
    fn commit_written(&mut self, holder: &str, id: u64) -> Result<bool, LedgerError> {
        (**self).commit_written(holder, id)
    }
    fn meter_state(&self, meter: &str) -> Result<Option<MeterState>, LedgerError> {
        (**self).meter_state(meter)
    }
    fn node_minutes(&self, from: i64, to: i64) -> Result<Vec<NodeMinute>, LedgerError> {
        (**self).node_minutes(from, to)
    }
    fn allocate_meter_again(
        &mut self,
        meter: &str,
        from: Option<&MeterState>,
        to: &MeterState,
        minutes: &[MeterMinute],
        again: &[MeterResplit],
    ) -> Result<bool, LedgerError> {
        (**self).allocate_meter_again(meter, from, to, minutes, again)
    }
    fn tenant_totals(&self) -> Result<LedgerTotals, LedgerError> {
        (**self).tenant_totals()
    }
    fn finalized_through(&self) -> Result<i64, LedgerError> {
        (**self).finalized_through()
    }
    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        (**self).tenant_versions()
    }
    fn add_tenant_version(&mut self, v: &TenantVersion) -> Result<(), LedgerError> {
        (**self).add_tenant_version(v)
    }
    fn acquire_compaction(
        &mut self,
        holder: &str,
        now: i64,
        ttl: Duration,
    ) -> Result<CompactionLease, LedgerError> {
        (**self).acquire_compaction(holder, now, ttl)
    }
    fn compact_under(
        &mut self,
        lease: &CompactionLease,
        now: i64,
        policy: &Compaction,
        contracts: &TenantHistory,
    ) -> Result<Compacted, LedgerError> {
        (**self).compact_under(lease, now, policy, contracts)
    }
    fn release_compaction(&mut self, lease: &CompactionLease) -> Result<(), LedgerError> {
        (**self).release_compaction(lease)
    }
}

impl<R: LedgerReader + ?Sized> LedgerReader for Box<R> {
    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        (**self).tenant_versions()
    }
    fn tenant_version_count(&self) -> Result<u64, LedgerError> {
        (**self).tenant_version_count()
    }
    fn minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, BucketDelta)>, LedgerError> {
        (**self).minutes(tenant, from, to)
    }
    fn usage(&self, tenant: Option<&str>, from: i64, to: i64) -> Result<Usage, LedgerError> {
        (**self).usage(tenant, from, to)
    }
    fn usage_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        (**self).usage_since(tenant, from, to, since_revision)
    }
    fn usage_allocated_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
        with_nodes: bool,
    ) -> Result<(Usage, UsageAllocation), LedgerError> {
        (**self).usage_allocated_since(tenant, from, to, since_revision, with_nodes)
    }
    fn adjustments_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        (**self).adjustments_since(tenant, from, to, since_revision)
    }
    fn tenants(&self) -> Result<Vec<String>, LedgerError> {
        (**self).tenants()
    }
    fn usage_nodes(&self, tenant: &str, from: i64, to: i64) -> Result<Vec<String>, LedgerError> {
        (**self).usage_nodes(tenant, from, to)
    }
    fn node_usage_since(
        &self,
        tenant: &str,
        node: &str,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        (**self).node_usage_since(tenant, node, from, to, since_revision)
    }
    fn gpu_rows_from(&self) -> Result<Option<i64>, LedgerError> {
        (**self).gpu_rows_from()
    }
    fn usage_gpus(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, String)>, LedgerError> {
        (**self).usage_gpus(tenant, from, to)
    }
    fn gpu_usage(
        &self,
        tenant: &str,
        node: &str,
        gpu: &str,
        from: i64,
        to: i64,
    ) -> Result<GpuUsage, LedgerError> {
        (**self).gpu_usage(tenant, node, gpu, from, to)
    }
    fn meter_minutes(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, MeterMinute)>, LedgerError> {
        (**self).meter_minutes(meter, from, to)
    }
    fn meter_hours(
        &self,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, u64, MeterMinute)>, LedgerError> {
        (**self).meter_hours(meter, from, to)
    }
    fn finalized_through(&self) -> Result<i64, LedgerError> {
        (**self).finalized_through()
    }
    fn meter_state(&self, meter: &str) -> Result<Option<MeterState>, LedgerError> {
        (**self).meter_state(meter)
    }
    fn node_minutes(&self, from: i64, to: i64) -> Result<Vec<NodeMinute>, LedgerError> {
        (**self).node_minutes(from, to)
    }
    fn tenant_node_minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<NodeMinute>, LedgerError> {
        (**self).tenant_node_minutes(tenant, from, to)
    }
    fn placing_holds(&self) -> Result<Vec<PlacingHold>, LedgerError> {
        (**self).placing_holds()
    }
    fn revision(&self) -> Result<u64, LedgerError> {
        (**self).revision()
    }
    fn node_minutes_as_of(
        &self,
        from: i64,
        to: i64,
        revision: u64,
    ) -> Result<Vec<NodeMinute>, LedgerError> {
        (**self).node_minutes_as_of(from, to, revision)
    }
    fn late_in_meter_minutes(
        &self,
        meter: &str,
        after: u64,
        through: u64,
    ) -> Result<Vec<(u64, i64, String)>, LedgerError> {
        (**self).late_in_meter_minutes(meter, after, through)
    }
}
