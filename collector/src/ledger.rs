//! The billing ledger: one SQLite file (WAL) holding, per tenant, node and
//! minute, the energy and GPU time counted, plus the cursors that make
//! counting exactly-once across crashes.
//!
//! *Invariant:* one transaction writes the bucket deltas of a set of
//! samples, every node's highest accepted (epoch, seq) and the last counter
//! reading of each of its GPUs (one row per node). The collector acks a sample only after the transaction
//! holding it has committed, so after a crash at any moment the ledger and
//! the cursors agree: samples not committed were not acked and are re-sent;
//! samples committed are duplicates when re-sent.
//!
//! *Invariant:* one writer per database file (a flock on the file itself),
//! and a lost ledger is refused, never taken for a new one: only
//! `Ledger::create` makes a ledger, and each commit's revision is recorded
//! in `<ledger>.last-commit` after it, so a ledger behind its marker lost
//! commits (see `Ledger::open_as`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use rusqlite::{Connection, Transaction, params};

use crate::tenants::TenantHistory;

/// The minute split and the contract arithmetic live in `accounting`.
pub use crate::accounting::{over_contract, split_by_minute};

/// A schema migration: SQL, or code for what SQL cannot express.
enum Migration {
    Sql(&'static str),
    Code(fn(&Transaction) -> rusqlite::Result<()>),
}

/// SQL for a new random ledger id, spelled as a version-4 UUID.
macro_rules! new_ledger_id {
    () => {
        "(SELECT lower(substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3)
            || '-' || substr('89ab', 1 + abs(random() % 4), 1) || substr(h, 18, 3)
            || '-' || substr(h, 21, 12)) FROM (SELECT hex(randomblob(16)) AS h))"
    };
}

/// Schema migrations, applied in order; the index is the version reached.
const MIGRATIONS: &[Migration] = &[
    // 1: cursors, minute buckets and tenant totals.
    Migration::Sql(
        "CREATE TABLE node_cursor (
        node TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL,
        last_seq INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE gpu_cursor (
        uuid TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        last_counter_mj INTEGER,
        last_timestamp_ns INTEGER,
        remainder_mw_ns INTEGER NOT NULL,
        energy_mj INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE usage_minute (
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        minute_start INTEGER NOT NULL,
        energy_mj INTEGER NOT NULL,
        gpu_ns INTEGER NOT NULL,
        busy_gpu_ns INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        PRIMARY KEY (tenant, node, minute_start)
     ) WITHOUT ROWID;
     CREATE TABLE tenant_total (
        tenant TEXT PRIMARY KEY,
        energy_mj INTEGER NOT NULL
     ) WITHOUT ROWID;",
    ),
    // 2: coverage, estimated energy and contract overage.
    Migration::Sql(
        "ALTER TABLE usage_minute ADD COLUMN expected_gpu_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN estimated_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN over_contract_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN overage_mj INTEGER NOT NULL DEFAULT 0;",
    ),
    // 3: usage queries read by time.
    Migration::Sql("CREATE INDEX usage_minute_by_time ON usage_minute (minute_start, tenant);"),
    // 4: over-contract time per tenant, so the counter survives restarts.
    Migration::Sql(
        "ALTER TABLE tenant_total ADD COLUMN over_contract_ns INTEGER NOT NULL DEFAULT 0;",
    ),
    // 5: hourly and daily rollups (per tenant and node, plus each tenant's
    // peak quarter-hour), the hours whose minutes changed since they were
    // rolled up, and how far back each granularity is kept.
    Migration::Sql(
        "CREATE TABLE usage_rollup (
        period INTEGER NOT NULL,
        start INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        energy_mj INTEGER NOT NULL,
        gpu_ns INTEGER NOT NULL,
        busy_gpu_ns INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        expected_gpu_ns INTEGER NOT NULL,
        estimated_mj INTEGER NOT NULL,
        over_contract_ns INTEGER NOT NULL,
        overage_mj INTEGER NOT NULL,
        PRIMARY KEY (period, start, tenant, node)
     ) WITHOUT ROWID;
     CREATE TABLE demand_rollup (
        period INTEGER NOT NULL,
        start INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        peak_quarter_mj INTEGER NOT NULL,
        PRIMARY KEY (period, start, tenant)
     ) WITHOUT ROWID;
     CREATE TABLE rollup_pending (hour_start INTEGER PRIMARY KEY) WITHOUT ROWID;
     CREATE TABLE retention (
        period INTEGER PRIMARY KEY,
        kept_from INTEGER NOT NULL
     ) WITHOUT ROWID;
     INSERT OR IGNORE INTO rollup_pending
        SELECT DISTINCT minute_start - minute_start % 3600 FROM usage_minute;",
    ),
    // 6: a node's GPU cursors move into its node_cursor row, so that a
    // commit writes one row per node instead of one per GPU.
    Migration::Code(gpu_cursors_into_nodes),
    // 7: the watermark, kept by the ledger itself (minutes ending at or
    // before it never change), the revision of the last commit, and the
    // bucket deltas that arrived for minutes already final, booked as
    // adjustments instead.
    Migration::Sql(
        "CREATE TABLE watermark (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL,
        finalized_through INTEGER NOT NULL
     );
     INSERT INTO watermark (id, revision, finalized_through) VALUES (1, 0, 0);
     CREATE TABLE adjustment (
        revision INTEGER NOT NULL,
        booked_at INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        minute_start INTEGER NOT NULL,
        energy_mj INTEGER NOT NULL,
        gpu_ns INTEGER NOT NULL,
        busy_gpu_ns INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        expected_gpu_ns INTEGER NOT NULL,
        estimated_mj INTEGER NOT NULL,
        over_contract_ns INTEGER NOT NULL,
        overage_mj INTEGER NOT NULL,
        PRIMARY KEY (revision, tenant, node, minute_start)
     ) WITHOUT ROWID;
     CREATE INDEX adjustment_by_time ON adjustment (minute_start, tenant);",
    ),
    // 8: every version of the tenant file the collector loaded, with the
    // moment it took effect, so that samples delivered late (after a
    // restart too) are attributed by the leases of their own time.
    Migration::Sql(
        "CREATE TABLE tenant_version (
        id INTEGER PRIMARY KEY,
        effective_from_ns INTEGER NOT NULL,
        loaded_at_ns INTEGER NOT NULL,
        file TEXT NOT NULL
     );",
    ),
    // 9: the ledger's identity (a random id, when it was created, or for
    // an older ledger when this migration ran); how many commits it holds
    // is `watermark.revision`, checked against the `.last-commit` file at
    // every start.
    Migration::Sql(concat!(
        "CREATE TABLE ledger_identity (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        ledger_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        opened_at INTEGER NOT NULL
     );
     INSERT INTO ledger_identity SELECT 1, ",
        new_ledger_id!(),
        ", unixepoch(), unixepoch();"
    )),
    // 10: over-contract time and overage follow the minutes' energy in
    // sample time (`over_contract`), no longer live power at the wall
    // clock's minute. Rollups keep the evaluation of their minutes with
    // their peak (what the minutes held before is kept there for rollups
    // whose minutes are gone); hours whose minutes are kept are rolled up
    // again under the new rule; the figures booked into the minutes (node
    // "") are dropped.
    Migration::Sql(
        "ALTER TABLE demand_rollup ADD COLUMN over_contract_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE demand_rollup ADD COLUMN overage_mj INTEGER NOT NULL DEFAULT 0;
     UPDATE demand_rollup SET
        over_contract_ns = (SELECT COALESCE(SUM(r.over_contract_ns), 0) FROM usage_rollup r
            WHERE r.period = demand_rollup.period AND r.start = demand_rollup.start
                AND r.tenant = demand_rollup.tenant),
        overage_mj = (SELECT COALESCE(SUM(r.overage_mj), 0) FROM usage_rollup r
            WHERE r.period = demand_rollup.period AND r.start = demand_rollup.start
                AND r.tenant = demand_rollup.tenant);
     UPDATE usage_rollup SET over_contract_ns = 0, overage_mj = 0
        WHERE over_contract_ns != 0 OR overage_mj != 0;
     INSERT OR IGNORE INTO rollup_pending
        SELECT DISTINCT minute_start - minute_start % 3600 FROM usage_minute;
     UPDATE usage_minute SET over_contract_ns = 0, overage_mj = 0
        WHERE over_contract_ns != 0 OR overage_mj != 0;
     DELETE FROM usage_minute WHERE node = '' AND energy_mj = 0 AND gpu_ns = 0
        AND busy_gpu_ns = 0 AND samples = 0 AND expected_gpu_ns = 0 AND estimated_mj = 0;",
    ),
];

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

/// Migration 6: `gpu_cursor` rows become each node's `node_cursor.gpus`.
fn gpu_cursors_into_nodes(tx: &Transaction) -> rusqlite::Result<()> {
    tx.execute_batch("ALTER TABLE node_cursor ADD COLUMN gpus BLOB NOT NULL DEFAULT x'';")?;
    let mut by_node: HashMap<String, Vec<StoredGpu>> = HashMap::new();
    {
        let unsigned = |i: usize, v: i64| {
            u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
        };
        let mut q = tx.prepare(
            "SELECT uuid, node, last_counter_mj, last_timestamp_ns, remainder_mw_ns, energy_mj
             FROM gpu_cursor ORDER BY node, uuid",
        )?;
        let mut rows = q.query([])?;
        while let Some(r) = rows.next()? {
            let gpu = StoredGpu {
                uuid: r.get(0)?,
                last_counter_mj: r
                    .get::<_, Option<i64>>(2)?
                    .map(|v| unsigned(2, v))
                    .transpose()?,
                last_timestamp_ns: r.get(3)?,
                remainder_mw_ns: unsigned(4, r.get(4)?)?,
                energy_mj: unsigned(5, r.get(5)?)?,
                counter_resets: 0,
            };
            by_node.entry(r.get(1)?).or_default().push(gpu);
        }
    }
    let mut put = tx.prepare(
        "INSERT INTO node_cursor (node, epoch, last_seq, gpus) VALUES (?1, 0, 0, ?2)
         ON CONFLICT (node) DO UPDATE SET gpus = ?2",
    )?;
    for (node, gpus) in by_node {
        put.execute(params![node, StoredGpus { gpus }.encode_to_vec()])?;
    }
    tx.execute_batch("DROP TABLE gpu_cursor;")
}

/// How a node's GPU cursors are stored (`node_cursor.gpus`): protobuf, so
/// that a later version can add fields and still read older rows.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredGpus {
    #[prost(message, repeated, tag = "1")]
    gpus: Vec<StoredGpu>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredGpu {
    #[prost(string, tag = "1")]
    uuid: String,
    #[prost(uint64, optional, tag = "2")]
    last_counter_mj: Option<u64>,
    #[prost(sint64, optional, tag = "3")]
    last_timestamp_ns: Option<i64>,
    #[prost(uint64, tag = "4")]
    remainder_mw_ns: u64,
    #[prost(uint64, tag = "5")]
    energy_mj: u64,
    /// Added later: a cursor written before it reads as 0.
    #[prost(uint64, tag = "6")]
    counter_resets: u64,
}

/// Most hours one compaction rolls up, so that a long backlog (the first
/// round on a ledger from before rollups) does not hold the ledger, and
/// with it every commit and ack, for long.
const HOURS_PER_ROUND: i64 = 48;

/// Most KiB the committer's SQLite page cache may hold.
const CACHE_KIB: i64 = 64 * 1024;

/// Rollup periods, in seconds.
pub const HOUR: i64 = 3600;
pub const DAY: i64 = 86_400;
const MINUTE: i64 = 60;

/// The summable columns of `usage_minute`, in `BucketDelta::values` order.
const BUCKET_COLUMNS: [&str; 8] = [
    "energy_mj",
    "gpu_ns",
    "busy_gpu_ns",
    "samples",
    "expected_gpu_ns",
    "estimated_mj",
    "over_contract_ns",
    "overage_mj",
];

/// `SUM(col)` for every bucket column, comma-separated.
fn bucket_sums() -> String {
    BUCKET_COLUMNS
        .iter()
        .map(|c| format!("COALESCE(SUM({c}), 0)"))
        .collect::<Vec<_>>()
        .join(", ")
}

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
}

/// Additions to one (tenant, node, minute) bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketDelta {
    pub energy_mj: u64,
    /// GPU time backed by samples (intervals within the staleness window).
    pub gpu_ns: u64,
    /// GPU time weighted by utilization.
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
}

impl BucketDelta {
    /// The fields in `BUCKET_COLUMNS` order.
    fn values(&self) -> [u64; 8] {
        [
            self.energy_mj,
            self.gpu_ns,
            self.busy_gpu_ns,
            self.samples,
            self.expected_gpu_ns,
            self.estimated_mj,
            self.over_contract_ns,
            self.overage_mj,
        ]
    }

    fn from_values(v: [u64; 8]) -> Self {
        let [
            energy_mj,
            gpu_ns,
            busy_gpu_ns,
            samples,
            expected_gpu_ns,
            estimated_mj,
            over_contract_ns,
            overage_mj,
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

    /// Reads the eight summed columns starting at column `first`.
    fn from_row(
        r: &rusqlite::Row<'_>,
        first: usize,
        path: &Path,
    ) -> rusqlite::Result<Result<Self, LedgerError>> {
        let mut v = [0u64; 8];
        for (i, slot) in v.iter_mut().enumerate() {
            match u64_of(r.get::<_, i64>(first + i)?, path, BUCKET_COLUMNS[i]) {
                Ok(x) => *slot = x,
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(Self::from_values(v)))
    }
}

/// Bucket key: (tenant, node, minute start in Unix seconds).
pub type BucketKey = (Arc<str>, Arc<str>, i64);

/// What the ledger keeps per node: the highest (epoch, seq) accepted and
/// the counting state of each of its GPUs (by UUID), those it announced
/// last and those that left it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeCursor {
    pub epoch: u64,
    pub last_seq: u64,
    pub gpus: Vec<(Arc<str>, GpuCursor)>,
}

/// Everything one transaction writes.
#[derive(Debug, Default)]
pub struct Commit {
    /// Each node's latest cursor, complete: a later one replaces it.
    pub nodes: HashMap<Arc<str>, NodeCursor>,
    pub buckets: HashMap<BucketKey, BucketDelta>,
    pub tenant_energy: HashMap<Arc<str>, u64>,
    /// The tenant file's history, whose version in force at each minute
    /// gives the contract the minute is measured against, for each
    /// tenant's over-contract counter; none: no tenant has one.
    pub contracts: Option<Arc<TenantHistory>>,
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
        for (t, e) in later.tenant_energy {
            *self.tenant_energy.entry(t).or_default() += e;
        }
        if later.contracts.is_some() {
            self.contracts = later.contracts;
        }
    }
}

/// What the ledger holds at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<(String, NodeCursor)>,
    pub tenant_energy: Vec<(String, u64)>,
    pub tenant_over_contract_ns: Vec<(String, u64)>,
}

pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    identity: Identity,
    /// Commits written, also in the ledger (`watermark.revision`).
    revision: u64,
    /// The database file, locked for the life of the ledger: one writer
    /// per file. Declared after `conn`, so it is closed after it.
    _lock: std::fs::File,
    marker: Marker,
}

/// Maps a SQLite error to a `LedgerError` naming the ledger file.
fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> LedgerError + Copy + '_ {
    move |error| LedgerError::Sqlite {
        path: path.to_owned(),
        error,
    }
}

/// From when data of `period` (60, 3600 or 86400 s) is kept: 0 until
/// retention first dropped some.
fn kept_from(conn: &Connection, period: i64, path: &Path) -> Result<i64, LedgerError> {
    conn.query_row(
        "SELECT COALESCE(MAX(kept_from), 0) FROM retention WHERE period = ?1",
        [period],
        |r| r.get(0),
    )
    .map_err(sqlite_err(path))
}

/// The revision of the last commit and the watermark.
fn watermark(conn: &Connection, path: &Path) -> Result<(u64, i64), LedgerError> {
    let (revision, finalized): (i64, i64) = conn
        .query_row(
            "SELECT revision, finalized_through FROM watermark WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sqlite_err(path))?;
    Ok((u64_of(revision, path, "revision")?, finalized))
}

fn i64_of(v: u64, path: &Path, what: &'static str) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| LedgerError::Range {
        path: path.to_owned(),
        what,
    })
}

fn u64_of(v: i64, path: &Path, what: &'static str) -> Result<u64, LedgerError> {
    u64::try_from(v).map_err(|_| LedgerError::Range {
        path: path.to_owned(),
        what,
    })
}

/// Files an earlier ledger at `path` leaves behind: SQLite's, the
/// commit marker, and the lock file collectors before the identity kept.
fn traces(path: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    ["-wal", "-shm", "-journal", MARKER_SUFFIX, ".lock"]
        .into_iter()
        .map(move |suffix| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        })
}

/// Appended to the ledger's path (symlinks resolved) for the file that
/// records the ledger's last commit.
const MARKER_SUFFIX: &str = ".last-commit";

/// What the marker holds: the ledger id and the revision of its last
/// commit, in a fixed length so that it is rewritten in place.
fn marker_record(ledger_id: &str, revision: u64) -> String {
    format!("{ledger_id} {revision:020}\n")
}

/// The marker's (ledger id, revision); `Ok(None)` when there is none.
fn read_marker(path: &Path) -> Result<Option<(String, u64)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("unreadable ({e})")),
    };
    let parsed = text
        .strip_suffix('\n')
        .and_then(|t| t.split_once(' '))
        .and_then(|(id, rev)| Some((id.to_string(), rev.parse::<u64>().ok()?)));
    parsed.map(Some).ok_or_else(|| "malformed".to_string())
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

/// The file recording the last commit's revision, rewritten in place and
/// synced after every commit.
struct Marker {
    path: PathBuf,
    file: std::fs::File,
    /// Whether the last write failed (logged once until one succeeds).
    failing: bool,
}

impl Marker {
    fn write(&mut self, ledger_id: &str, revision: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(marker_record(ledger_id, revision).as_bytes(), 0)?;
        self.file.sync_data()
    }
}

/// How `Ledger::open_as` treats what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// An existing, whole ledger.
    Existing,
    /// A new ledger where there is no trace of one.
    Create,
    /// An existing ledger, accepted as it stands even if commits the
    /// marker records are missing.
    Recover,
}

impl Ledger {
    /// Opens the existing ledger at `path`, locks it for writing and
    /// migrates it. A missing, empty, unwritable or locked ledger, or one
    /// that lost commits its marker records, is refused.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        Self::open_as(path, How::Existing)
    }

    /// Creates a new ledger at `path`; refused where a ledger or a trace
    /// of one (`-wal`, `-shm`, `.last-commit`, ...) exists.
    pub fn create(path: &Path) -> Result<Self, LedgerError> {
        Self::open_as(path, How::Create)
    }

    /// Opens the existing ledger at `path` like `open`, but accepts it as
    /// it stands where commits its marker records are missing (restored
    /// from a backup, a lost `-wal`); it then gets a new ledger id.
    pub fn recover(path: &Path) -> Result<Self, LedgerError> {
        Self::open_as(path, How::Recover)
    }

    fn open_as(path: &Path, how: How) -> Result<Self, LedgerError> {
        let err = sqlite_err(path);
        let io = |error: std::io::Error| match error.kind() {
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                LedgerError::Unwritable {
                    path: path.to_owned(),
                    error,
                }
            }
            _ => LedgerError::Io {
                path: path.to_owned(),
                error,
            },
        };
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true);
        if how == How::Create {
            if path.symlink_metadata().is_ok() {
                return Err(LedgerError::Exists {
                    path: path.to_owned(),
                });
            }
            if let Some(trace) = traces(path).find(|t| t.symlink_metadata().is_ok()) {
                return Err(LedgerError::Traces {
                    path: path.to_owned(),
                    trace,
                });
            }
            options.create_new(true);
        }
        let file = options.open(path).map_err(|error| match error.kind() {
            std::io::ErrorKind::AlreadyExists => LedgerError::Exists {
                path: path.to_owned(),
            },
            std::io::ErrorKind::NotFound => {
                match traces(path).find(|t| t.symlink_metadata().is_ok()) {
                    Some(trace) => LedgerError::Traces {
                        path: path.to_owned(),
                        trace,
                    },
                    None => LedgerError::NotFound {
                        path: path.to_owned(),
                    },
                }
            }
            _ => io(error),
        })?;
        // Two collectors writing one ledger would each resume the same
        // cursors and count the same energy twice. The lock is on the
        // database file itself (flock, its open file description), so it
        // holds whatever path, symlink or hard link reaches the file, and
        // the kernel drops it when the process ends. SQLite's own locks
        // are POSIX record locks, which flock does not touch; this file
        // stays open as long as the connection, so closing it cannot drop
        // them. Readers take no flock and are never refused.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::InUse {
                    path: path.to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(io(error)),
        }
        // SQLite reads an empty file as a new, empty database: a ledger
        // truncated to nothing must not pass for one.
        if how != How::Create && file.metadata().map_err(io)?.len() == 0 {
            return Err(LedgerError::Empty {
                path: path.to_owned(),
            });
        }
        let canonical = std::fs::canonicalize(path).map_err(io)?;
        let mut conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        // WAL: readers never block the committer. FULL: a committed
        // transaction survives power loss, not only a killed process.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        // Every commit rewrites each reporting node's cursor row: at 25,000
        // nodes that is about 15 MiB of pages a second. With SQLite's
        // default 2 MiB page cache a commit spilled pages to the WAL
        // mid-transaction and read them back; the cache grows only as
        // pages are used, so a small fleet does not pay for this bound.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if version == 0 && how != How::Create {
            return Err(LedgerError::NotALedger {
                path: path.to_owned(),
            });
        }
        if version as usize > MIGRATIONS.len() {
            return Err(LedgerError::TooNew {
                path: path.to_owned(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(err)?;
            match m {
                Migration::Sql(sql) => tx.execute_batch(sql),
                Migration::Code(f) => f(&tx),
            }
            .map_err(err)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        // A write before anything listens: a ledger that cannot take a
        // commit (a read-only file or directory) is refused here, not
        // after every commit has failed.
        let (mut ledger_id, created_at): (String, i64) = conn
            .query_row(
                "UPDATE ledger_identity SET opened_at = unixepoch()
                 RETURNING ledger_id, created_at",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(err)?;
        let (revision, _) = watermark(&conn, path)?;
        // A commit is in the ledger before the marker names it, so the
        // marker never runs ahead of a whole ledger. One that does means
        // commits were lost: most often a -wal file deleted after a
        // crash, where every commit since the last checkpoint was.
        let marker_path = {
            let mut p = canonical.into_os_string();
            p.push(MARKER_SUFFIX);
            PathBuf::from(p)
        };
        let marker_problem = |problem: String| LedgerError::Marker {
            path: path.to_owned(),
            marker: marker_path.clone(),
            found: revision,
            problem,
        };
        let problem = match read_marker(&marker_path) {
            Ok(Some((id, expected))) if id == ledger_id && expected > revision => {
                Some(LedgerError::Rewound {
                    path: path.to_owned(),
                    marker: marker_path.clone(),
                    found: revision,
                    expected,
                })
            }
            Ok(Some((id, _))) if id != ledger_id => {
                Some(marker_problem(format!("from another ledger ({id})")))
            }
            Ok(Some(_)) => None,
            Ok(None) if revision > 0 => Some(marker_problem("missing".to_string())),
            Ok(None) => None,
            Err(problem) => Some(marker_problem(problem)),
        };
        if let Some(problem) = problem {
            if how != How::Recover {
                return Err(problem);
            }
            ledger_id = conn
                .query_row(
                    concat!(
                        "UPDATE ledger_identity SET ledger_id = ",
                        new_ledger_id!(),
                        " RETURNING ledger_id"
                    ),
                    [],
                    |r| r.get(0),
                )
                .map_err(err)?;
            tracing::warn!(ledger = %path.display(), %problem, ledger_id = %ledger_id, "ledger recovered as it stands; it has a new ledger_id");
        }
        let marker_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&marker_path)
            .map_err(io)?;
        let mut marker = Marker {
            path: marker_path,
            file: marker_file,
            failing: false,
        };
        marker.write(&ledger_id, revision).map_err(io)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            identity: Identity {
                ledger_id,
                created_at,
            },
            revision,
            _lock: file,
            marker,
        })
    }

    /// Who this ledger is: shown on `/metrics`.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Every tenant file version recorded, in the order they were loaded.
    pub fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        tenant_versions(&self.conn, &self.path)
    }

    /// Records a tenant file version (durably, on its own transaction).
    pub fn add_tenant_version(&mut self, v: &TenantVersion) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT INTO tenant_version (effective_from_ns, loaded_at_ns, file) VALUES (?1, ?2, ?3)",
                params![v.effective_from_ns, v.loaded_at_ns, v.file],
            )
            .map(drop)
            .map_err(sqlite_err(&self.path))
    }

    /// Rows of (text, integer, integer) from `sql`.
    fn name_and_two_counts(&self, sql: &str) -> Result<Vec<(String, i64, i64)>, LedgerError> {
        let err = sqlite_err(&self.path);
        let mut q = self.conn.prepare(sql).map_err(err)?;
        let rows = q
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// Reads the cursors and totals to resume from.
    pub fn load(&self) -> Result<Snapshot, LedgerError> {
        let p = &self.path;
        let err = sqlite_err(p);
        let mut snap = Snapshot::default();
        let mut q = self
            .conn
            .prepare("SELECT node, epoch, last_seq, gpus FROM node_cursor")
            .map_err(err)?;
        let mut rows = q.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let node: String = r.get(0).map_err(err)?;
            let stored = StoredGpus::decode(
                r.get_ref(3)
                    .map_err(err)?
                    .as_blob()
                    .map_err(|e| err(e.into()))?,
            )
            .map_err(|_| LedgerError::Range {
                path: p.to_owned(),
                what: "GPU cursors",
            })?;
            let gpus = stored
                .gpus
                .into_iter()
                .map(|g| {
                    (
                        Arc::from(g.uuid),
                        GpuCursor {
                            last_counter_mj: g.last_counter_mj,
                            last_timestamp_ns: g.last_timestamp_ns,
                            remainder_mw_ns: g.remainder_mw_ns,
                            energy_mj: g.energy_mj,
                            counter_resets: g.counter_resets,
                        },
                    )
                })
                .collect();
            snap.nodes.push((
                node,
                NodeCursor {
                    epoch: u64_of(r.get(1).map_err(err)?, p, "epoch")?,
                    last_seq: u64_of(r.get(2).map_err(err)?, p, "last_seq")?,
                    gpus,
                },
            ));
        }
        let rows = self
            .name_and_two_counts("SELECT tenant, energy_mj, over_contract_ns FROM tenant_total")?;
        for (t, e, over) in rows {
            snap.tenant_energy
                .push((t.clone(), u64_of(e, p, "tenant energy")?));
            snap.tenant_over_contract_ns
                .push((t, u64_of(over, p, "over-contract time")?));
        }
        Ok(snap)
    }

    /// Writes `c` in one transaction, booked now, leaving the watermark
    /// where it is.
    pub fn commit(&mut self, c: &Commit) -> Result<Committed, LedgerError> {
        self.commit_at(c, crate::usage::now_unix(), i64::MIN)
    }

    /// Where the watermark stands: minute buckets ending at or before this
    /// (Unix seconds) never change.
    pub fn finalized_through(&self) -> Result<i64, LedgerError> {
        watermark(&self.conn, &self.path).map(|(_, w)| w)
    }

    /// Writes `c` in one transaction as the next revision, booked at
    /// `booked_at` (Unix seconds), then moves the watermark forward to
    /// `finalize_through` (never back). Returns the revision and what it
    /// added to the over-contract counters.
    ///
    /// *Invariant:* minute buckets ending at or before the watermark never
    /// change. A delta for such a minute (a late spool, a gap's energy
    /// spread back) is booked as an `adjustment` row of this revision, with
    /// its tenant, node and minute, instead of being added to the minute;
    /// nothing is dropped, and minutes plus adjustments hold every
    /// committed delta.
    ///
    /// *Invariant:* the same transaction adds to each tenant's
    /// over-contract counter what the energy it adds to a minute (row and
    /// adjustments together) changes in that minute's `over_contract`
    /// (against `c.contracts`), so the counter is the sum of its minutes'
    /// evaluations whatever order, batching or lateness the samples came
    /// in, and survives restarts. For a final minute, the change is booked
    /// with the adjustments too, tenant-wide (node `""`), so its row plus
    /// its adjustments say what the minute's whole energy does.
    pub fn commit_at(
        &mut self,
        c: &Commit,
        booked_at: i64,
        finalize_through: i64,
    ) -> Result<Committed, LedgerError> {
        let p = self.path.clone();
        let err = sqlite_err(&p);
        let tx = self.conn.transaction().map_err(err)?;
        let (last_revision, finalized) = watermark(&tx, &p)?;
        let revision = last_revision + 1;
        let is_final = |minute: i64| minute.saturating_add(MINUTE) <= finalized;
        let committed = {
            let mut node = tx
                .prepare_cached(
                    "INSERT INTO node_cursor (node, epoch, last_seq, gpus) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (node) DO UPDATE SET epoch = ?2, last_seq = ?3, gpus = ?4",
                )
                .map_err(err)?;
            let mut blob = Vec::new();
            for (id, n) in &c.nodes {
                let stored = StoredGpus {
                    gpus: n
                        .gpus
                        .iter()
                        .map(|(uuid, g)| StoredGpu {
                            uuid: uuid.to_string(),
                            last_counter_mj: g.last_counter_mj,
                            last_timestamp_ns: g.last_timestamp_ns,
                            remainder_mw_ns: g.remainder_mw_ns,
                            energy_mj: g.energy_mj,
                            counter_resets: g.counter_resets,
                        })
                        .collect(),
                };
                blob.clear();
                stored
                    .encode(&mut blob)
                    .expect("a Vec grows to fit any message");
                node.execute(params![
                    &**id,
                    i64_of(n.epoch, &p, "epoch")?,
                    i64_of(n.last_seq, &p, "last_seq")?,
                    &blob
                ])
                .map_err(err)?;
            }
            let cols = BUCKET_COLUMNS.join(", ");
            let params_list = (4..4 + BUCKET_COLUMNS.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let updates = BUCKET_COLUMNS
                .iter()
                .map(|c| format!("{c} = {c} + excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut bucket = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_minute (tenant, node, minute_start, {cols}) VALUES (?1, ?2, ?3, {params_list})
                     ON CONFLICT (tenant, node, minute_start) DO UPDATE SET {updates}"
                ))
                .map_err(err)?;
            let mut pending = tx
                .prepare_cached("INSERT OR IGNORE INTO rollup_pending (hour_start) VALUES (?1)")
                .map_err(err)?;
            let mut adjust = tx
                .prepare_cached(&format!(
                    "INSERT INTO adjustment (revision, booked_at, tenant, node, minute_start, {cols})
                     VALUES (?1, ?2, ?3, ?4, ?5, {})
                     ON CONFLICT (revision, tenant, node, minute_start) DO UPDATE SET {updates}",
                    (6..6 + BUCKET_COLUMNS.len())
                        .map(|i| format!("?{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .map_err(err)?;
            // Only minutes that change need their hour rolled up again.
            let mut hours: Vec<i64> = c
                .buckets
                .keys()
                .filter(|(_, _, m)| !is_final(*m))
                .map(|(_, _, m)| m.div_euclid(HOUR) * HOUR)
                .collect();
            hours.sort_unstable();
            hours.dedup();
            for h in hours {
                pending.execute([h]).map_err(err)?;
            }
            for ((tenant, node, minute), d) in &c.buckets {
                let mut v = [0i64; BUCKET_COLUMNS.len()];
                for ((slot, x), name) in v.iter_mut().zip(d.values()).zip(BUCKET_COLUMNS) {
                    *slot = i64_of(x, &p, name)?;
                }
                if is_final(*minute) {
                    adjust
                        .execute(params![
                            i64_of(revision, &p, "revision")?,
                            booked_at,
                            &**tenant,
                            &**node,
                            minute,
                            v[0],
                            v[1],
                            v[2],
                            v[3],
                            v[4],
                            v[5],
                            v[6],
                            v[7]
                        ])
                        .map_err(err)?;
                    continue;
                }
                bucket
                    .execute(params![
                        &**tenant, &**node, minute, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
                    ])
                    .map_err(err)?;
            }
            let mut total = tx
                .prepare_cached(
                    "INSERT INTO tenant_total (tenant, energy_mj) VALUES (?1, ?2)
                     ON CONFLICT (tenant) DO UPDATE SET energy_mj = energy_mj + ?2",
                )
                .map_err(err)?;
            for (tenant, e) in &c.tenant_energy {
                total
                    .execute(params![&**tenant, i64_of(*e, &p, "energy")?])
                    .map_err(err)?;
            }
            let mut over = tx
                .prepare_cached(
                    "INSERT INTO tenant_total (tenant, energy_mj, over_contract_ns) VALUES (?1, 0, ?2)
                     ON CONFLICT (tenant) DO UPDATE SET over_contract_ns = over_contract_ns + ?2",
                )
                .map_err(err)?;
            // Energy added per (tenant, minute), over all nodes, for the
            // tenants with a contract.
            // (energy added, contract): the contract is looked up once per
            // (tenant, minute), in the version in force at the minute.
            let mut added: HashMap<(&Arc<str>, i64), (u64, u64)> = HashMap::new();
            if let Some(contracts) = &c.contracts {
                for ((tenant, _, minute), d) in &c.buckets {
                    if d.energy_mj > 0 {
                        let e = added.entry((tenant, *minute)).or_insert_with(|| {
                            (0, contracts.contracted_milliwatts_at(tenant, *minute))
                        });
                        e.0 = e.0.saturating_add(d.energy_mj);
                    }
                }
                added.retain(|_, (_, contract)| *contract > 0);
            }
            // A final minute's energy is its row and its adjustments.
            let mut minute_energy = tx
                .prepare_cached(
                    "SELECT (SELECT COALESCE(SUM(energy_mj), 0) FROM usage_minute
                             WHERE minute_start = ?2 AND tenant = ?1)
                          + (SELECT COALESCE(SUM(energy_mj), 0) FROM adjustment
                             WHERE minute_start = ?2 AND tenant = ?1 AND ?3)",
                )
                .map_err(err)?;
            let mut by_tenant: HashMap<&Arc<str>, u64> = HashMap::new();
            for ((tenant, minute), (delta, contract)) in added {
                let now: i64 = minute_energy
                    .query_row(params![&**tenant, minute, is_final(minute)], |r| r.get(0))
                    .map_err(err)?;
                let now = u64_of(now, &p, "minute energy")?;
                let before = now.saturating_sub(delta);
                let (ns_after, mj_after) = over_contract(now, contract);
                let (ns_before, mj_before) = over_contract(before, contract);
                let grew = ns_after.saturating_sub(ns_before);
                if grew > 0 {
                    *by_tenant.entry(tenant).or_default() += grew;
                }
                let overage = mj_after.saturating_sub(mj_before);
                if is_final(minute) && (grew > 0 || overage > 0) {
                    adjust
                        .execute(params![
                            i64_of(revision, &p, "revision")?,
                            booked_at,
                            &**tenant,
                            "",
                            minute,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            i64_of(grew, &p, "over-contract time")?,
                            i64_of(overage, &p, "overage")?
                        ])
                        .map_err(err)?;
                }
            }
            for (tenant, ns) in &by_tenant {
                over.execute(params![&**tenant, i64_of(*ns, &p, "over-contract time")?])
                    .map_err(err)?;
            }
            tx.prepare_cached(
                "UPDATE watermark SET revision = ?1,
                    finalized_through = MAX(finalized_through, ?2) WHERE id = 1",
            )
            .map_err(err)?
            .execute(params![i64_of(revision, &p, "revision")?, finalize_through])
            .map_err(err)?;
            let mut over_contract_ns: Vec<(Arc<str>, u64)> = by_tenant
                .into_iter()
                .map(|(t, ns)| (t.clone(), ns))
                .collect();
            over_contract_ns.sort();
            Committed {
                revision,
                over_contract_ns,
            }
        };
        tx.commit().map_err(err)?;
        self.revision = committed.revision;
        self.mark();
        Ok(committed)
    }

    /// Records the committed revision in the marker. A failure is logged
    /// (once until a write succeeds), not returned: the commit is already
    /// durable, and a marker that lags behind the ledger is only a lost
    /// chance to notice lost commits, never a false alarm.
    fn mark(&mut self) {
        match self.marker.write(&self.identity.ledger_id, self.revision) {
            Ok(()) => self.marker.failing = false,
            Err(error) if !self.marker.failing => {
                self.marker.failing = true;
                tracing::error!(marker = %self.marker.path.display(), %error, "recording the ledger's last commit failed; lost commits would go unnoticed until it works again");
            }
            Err(_) => {}
        }
    }

    /// Rolls closed hours up and drops what `policy` no longer keeps, in
    /// one transaction.
    ///
    /// *Invariant:* an hour's rollup is rebuilt from its minutes whenever
    /// a commit touched them (late samples, gap energy), and a day's from
    /// its hours, so every rollup equals the sum of what it covers; minutes
    /// are dropped only after their hour has been rolled up. A rollup's
    /// over-contract time and overage are the sum of its minutes'
    /// `over_contract` against the contract of the version of `contracts`
    /// in force at each minute, evaluated as it is rolled up (they cannot
    /// be evaluated from the sums later).
    pub fn compact(
        &mut self,
        policy: &Compaction,
        contracts: &TenantHistory,
    ) -> Result<Compacted, LedgerError> {
        let p = self.path.clone();
        let err = sqlite_err(&p);
        let tx = self.conn.transaction().map_err(err)?;
        let mut done = Compacted::default();
        {
            let hours: Vec<i64> = {
                let mut q = tx
                    .prepare_cached(
                        "SELECT hour_start FROM rollup_pending WHERE hour_start + 3600 <= ?1
                         ORDER BY hour_start LIMIT ?2",
                    )
                    .map_err(err)?;
                q.query_map([policy.closed_before, HOURS_PER_ROUND], |r| r.get(0))
                    .map_err(err)?
                    .collect::<Result<_, _>>()
                    .map_err(err)?
            };
            let cols = BUCKET_COLUMNS.join(", ");
            let sums = BUCKET_COLUMNS
                .iter()
                .map(|c| format!("SUM({c})"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut clear = tx
                .prepare_cached("DELETE FROM usage_rollup WHERE period = ?1 AND start = ?2")
                .map_err(err)?;
            let mut clear_peak = tx
                .prepare_cached("DELETE FROM demand_rollup WHERE period = ?1 AND start = ?2")
                .map_err(err)?;
            let mut hour = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_rollup (period, start, tenant, node, {cols})
                     SELECT 3600, ?1, tenant, node, {sums} FROM usage_minute
                     WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                     GROUP BY tenant, node"
                ))
                .map_err(err)?;
            let mut hour_peak = tx
                .prepare_cached(
                    "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj)
                     SELECT 3600, ?1, tenant, MAX(e) FROM (
                        SELECT tenant, minute_start / 900 AS quarter, SUM(energy_mj) AS e
                        FROM usage_minute
                        WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                        GROUP BY tenant, quarter)
                     GROUP BY tenant",
                )
                .map_err(err)?;
            let mut day = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_rollup (period, start, tenant, node, {cols})
                     SELECT 86400, ?1, tenant, node, {sums} FROM usage_rollup
                     WHERE period = 3600 AND start >= ?1 AND start < ?1 + 86400
                     GROUP BY tenant, node"
                ))
                .map_err(err)?;
            let mut day_peak = tx
                .prepare_cached(
                    "INSERT INTO demand_rollup
                        (period, start, tenant, peak_quarter_mj, over_contract_ns, overage_mj)
                     SELECT 86400, ?1, tenant, MAX(peak_quarter_mj), SUM(over_contract_ns),
                        SUM(overage_mj)
                     FROM demand_rollup
                     WHERE period = 3600 AND start >= ?1 AND start < ?1 + 86400
                     GROUP BY tenant",
                )
                .map_err(err)?;
            // Minutes that arrived for an hour whose minutes were already
            // dropped (only possible with a retention shorter than the
            // oldest write the collector accepts) are added to the rollups
            // that still exist, never replacing them.
            let mut add = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_rollup (period, start, tenant, node, {cols})
                     SELECT ?2, ?3, tenant, node, {sums} FROM usage_minute
                     WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                     GROUP BY tenant, node
                     ON CONFLICT (period, start, tenant, node) DO UPDATE SET {}",
                    BUCKET_COLUMNS
                        .iter()
                        .map(|c| format!("{c} = {c} + excluded.{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .map_err(err)?;
            let mut add_peak = tx
                .prepare_cached(
                    "INSERT INTO demand_rollup (period, start, tenant, peak_quarter_mj)
                     SELECT ?2, ?3, tenant, MAX(e) FROM (
                        SELECT tenant, minute_start / 900 AS quarter, SUM(energy_mj) AS e
                        FROM usage_minute
                        WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                        GROUP BY tenant, quarter)
                     GROUP BY tenant
                     ON CONFLICT (period, start, tenant) DO UPDATE
                        SET peak_quarter_mj = MAX(peak_quarter_mj, excluded.peak_quarter_mj)",
                )
                .map_err(err)?;
            // Each tenant-minute of an hour against its contract, summed
            // per tenant: (tenant, over-contract ns, overage mJ).
            let mut minutes_of_hour = tx
                .prepare_cached(
                    "SELECT tenant, minute_start, SUM(energy_mj) FROM usage_minute
                     WHERE minute_start >= ?1 AND minute_start < ?1 + 3600
                     GROUP BY tenant, minute_start",
                )
                .map_err(err)?;
            let mut evaluate = |h: i64| -> Result<Vec<(String, i64, i64)>, LedgerError> {
                let rows = minutes_of_hour
                    .query_map([h], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    })
                    .map_err(err)?;
                let mut per_tenant: Vec<(String, u64, u64)> = Vec::new();
                for row in rows {
                    let (tenant, minute, energy) = row.map_err(err)?;
                    let energy = u64_of(energy, &p, "minute energy")?;
                    let contract = contracts.contracted_milliwatts_at(&tenant, minute);
                    let (ns, mj) = over_contract(energy, contract);
                    match per_tenant.iter_mut().find(|(t, _, _)| *t == tenant) {
                        Some((_, a, b)) => {
                            *a = a.saturating_add(ns);
                            *b = b.saturating_add(mj);
                        }
                        None => per_tenant.push((tenant, ns, mj)),
                    }
                }
                per_tenant
                    .into_iter()
                    .filter(|(_, ns, mj)| *ns > 0 || *mj > 0)
                    .map(|(t, ns, mj)| {
                        Ok((
                            t,
                            i64_of(ns, &p, "over-contract time")?,
                            i64_of(mj, &p, "overage")?,
                        ))
                    })
                    .collect()
            };
            // Into the rollup's row written just before: set for a rollup
            // rebuilt from its minutes, added for late minutes added to it.
            let mut set_over = tx
                .prepare_cached(
                    "UPDATE demand_rollup SET over_contract_ns = ?4, overage_mj = ?5
                     WHERE period = ?1 AND start = ?2 AND tenant = ?3",
                )
                .map_err(err)?;
            let mut add_over = tx
                .prepare_cached(
                    "UPDATE demand_rollup SET over_contract_ns = over_contract_ns + ?4,
                        overage_mj = overage_mj + ?5
                     WHERE period = ?1 AND start = ?2 AND tenant = ?3",
                )
                .map_err(err)?;
            let (old_minutes_from, old_hours_from) =
                (kept_from(&tx, MINUTE, &p)?, kept_from(&tx, HOUR, &p)?);
            let mut days = Vec::new();
            for &h in &hours {
                let d = h.div_euclid(DAY) * DAY;
                let over = evaluate(h)?;
                if h >= old_minutes_from {
                    clear.execute([HOUR, h]).map_err(err)?;
                    clear_peak.execute([HOUR, h]).map_err(err)?;
                    hour.execute([h]).map_err(err)?;
                    hour_peak.execute([h]).map_err(err)?;
                    for (t, ns, mj) in &over {
                        set_over.execute(params![HOUR, h, t, ns, mj]).map_err(err)?;
                    }
                } else if h >= old_hours_from {
                    // Only the late minutes are left to evaluate: the
                    // energy dropped with the others is not in them.
                    add.execute([h, HOUR, h]).map_err(err)?;
                    add_peak.execute([h, HOUR, h]).map_err(err)?;
                    for (t, ns, mj) in &over {
                        add_over.execute(params![HOUR, h, t, ns, mj]).map_err(err)?;
                    }
                }
                if d >= old_hours_from {
                    days.push(d);
                } else {
                    add.execute([h, DAY, d]).map_err(err)?;
                    add_peak.execute([h, DAY, d]).map_err(err)?;
                    for (t, ns, mj) in &over {
                        add_over.execute(params![DAY, d, t, ns, mj]).map_err(err)?;
                    }
                }
                if h < old_minutes_from {
                    // Added once; gone before the next round could add
                    // them again.
                    tx.execute(
                        "DELETE FROM usage_minute WHERE minute_start >= ?1 AND minute_start < ?1 + 3600",
                        [h],
                    )
                    .map_err(err)?;
                }
            }
            days.dedup();
            for &d in &days {
                clear.execute([DAY, d]).map_err(err)?;
                clear_peak.execute([DAY, d]).map_err(err)?;
                day.execute([d]).map_err(err)?;
                day_peak.execute([d]).map_err(err)?;
            }
            let mut unpend = tx
                .prepare_cached("DELETE FROM rollup_pending WHERE hour_start = ?1")
                .map_err(err)?;
            for &h in &hours {
                unpend.execute([h]).map_err(err)?;
            }
            done.hours_rolled_up = hours.len();
            done.days_rolled_up = days.len();
            // Minutes go only where their hours are rolled up: closed, and
            // no longer pending (a long backlog takes several rounds).
            let oldest_pending: Option<i64> = tx
                .query_row("SELECT MIN(hour_start) FROM rollup_pending", [], |r| {
                    r.get(0)
                })
                .map_err(err)?;
            let minutes_from = policy
                .minutes_from
                .min(policy.closed_before)
                .min(oldest_pending.unwrap_or(i64::MAX))
                .div_euclid(HOUR)
                * HOUR;
            done.minute_rows_dropped = tx
                .execute(
                    "DELETE FROM usage_minute WHERE minute_start < ?1",
                    [minutes_from],
                )
                .map_err(err)?;
            let mut keep = tx
                .prepare_cached(
                    "INSERT INTO retention (period, kept_from) VALUES (?1, ?2)
                     ON CONFLICT (period) DO UPDATE SET kept_from = MAX(kept_from, ?2)",
                )
                .map_err(err)?;
            keep.execute([MINUTE, minutes_from]).map_err(err)?;
            let mut drop = |period: i64, from: i64| -> Result<usize, LedgerError> {
                let n = tx
                    .execute(
                        "DELETE FROM usage_rollup WHERE period = ?1 AND start < ?2",
                        [period, from],
                    )
                    .map_err(err)?;
                tx.execute(
                    "DELETE FROM demand_rollup WHERE period = ?1 AND start < ?2",
                    [period, from],
                )
                .map_err(err)?;
                keep.execute([period, from]).map_err(err)?;
                Ok(n)
            };
            // Hours go only where their days are rolled up, which closed
            // hours are.
            let hours_from = policy.hours_from.min(minutes_from).div_euclid(DAY) * DAY;
            done.hour_rows_dropped = drop(HOUR, hours_from)?;
            if let Some(days_from) = policy.days_from {
                let days_from = days_from.min(hours_from).div_euclid(DAY) * DAY;
                done.day_rows_dropped = drop(DAY, days_from)?;
                // Adjustments are kept as long as the days they belong to.
                done.adjustment_rows_dropped = tx
                    .execute(
                        "DELETE FROM adjustment WHERE minute_start < ?1",
                        [days_from],
                    )
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(done)
    }

    /// Sums of the minute buckets and adjustments of `tenant` over all
    /// nodes and all time: a cross-check of `tenant_total` and of
    /// exactly-once sample counts.
    pub fn bucket_totals(&self, tenant: &str) -> Result<BucketDelta, LedgerError> {
        let p = &self.path;
        let mut sum = BucketDelta::default();
        for table in ["usage_minute", "adjustment"] {
            sum.add(
                &self
                    .conn
                    .query_row(
                        &format!("SELECT {} FROM {table} WHERE tenant = ?1", bucket_sums()),
                        [tenant],
                        |r| BucketDelta::from_row(r, 0, p),
                    )
                    .map_err(sqlite_err(p))??,
            );
        }
        Ok(sum)
    }
}

/// What one compaction keeps, in Unix seconds.
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
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    pub hours_rolled_up: usize,
    pub days_rolled_up: usize,
    pub minute_rows_dropped: usize,
    pub hour_rows_dropped: usize,
    pub day_rows_dropped: usize,
    pub adjustment_rows_dropped: usize,
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
}

impl Span {
    /// Over-contract time (ns) and overage (mJ) of the span against the
    /// tenant's contract for its minute (mW, 0: none): `over_contract` of
    /// a minute's energy, or what a rollup stored when it was rolled up
    /// (`contracted_milliwatts` is then not used).
    pub fn over_contract(&self, contracted_milliwatts: u64) -> (u64, u64) {
        let rolled_up = self
            .peak_quarter_mj
            .map(|_| (self.delta.over_contract_ns, self.delta.overage_mj));
        crate::accounting::span_over_contract(
            self.delta.energy_mj,
            rolled_up,
            contracted_milliwatts,
        )
    }
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
}

/// Every tenant file version recorded in the ledger at `path`, in load
/// order.
fn tenant_versions(conn: &Connection, path: &Path) -> Result<Vec<TenantVersion>, LedgerError> {
    let err = sqlite_err(path);
    let mut q = conn
        .prepare_cached(
            "SELECT effective_from_ns, loaded_at_ns, file FROM tenant_version ORDER BY id",
        )
        .map_err(err)?;
    let rows = q
        .query_map([], |r| {
            Ok(TenantVersion {
                effective_from_ns: r.get(0)?,
                loaded_at_ns: r.get(1)?,
                file: r.get(2)?,
            })
        })
        .map_err(err)?;
    rows.collect::<Result<_, _>>().map_err(err)
}

/// A read-only view of the ledger, for the usage API and the `usage`
/// command. WAL lets it read while the collector commits.
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        if !path.exists() {
            return Err(LedgerError::Missing {
                path: path.to_owned(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite_err(path))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sqlite_err(path))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sqlite_err(path))?;
        let known = MIGRATIONS.len();
        if version as usize > known {
            return Err(LedgerError::TooNew {
                path: path.to_owned(),
                found: version,
                known,
            });
        }
        if (version as usize) < known {
            return Err(LedgerError::TooOld {
                path: path.to_owned(),
                found: version,
                known,
            });
        }
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    /// Every tenant file version the collector recorded, in the order it
    /// loaded them (see `Ledger::tenant_versions`).
    pub fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        tenant_versions(&self.conn, &self.path)
    }

    /// How many tenant file versions are recorded (they are only added).
    pub fn tenant_version_count(&self) -> Result<u64, LedgerError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM tenant_version", [], |r| r.get(0))
            .map_err(sqlite_err(&self.path))?;
        u64_of(n, &self.path, "tenant versions")
    }

    /// Minute buckets in `[from, to)` (Unix seconds, minute-aligned),
    /// summed over nodes: (tenant, minute start, sums), ordered by tenant
    /// then time. `tenant` `None` reads every tenant.
    pub fn minutes(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, BucketDelta)>, LedgerError> {
        let p = &self.path;
        let err = sqlite_err(p);
        let mut q = self
            .conn
            .prepare_cached(&format!(
                "SELECT tenant, minute_start, {}
                 FROM usage_minute
                 WHERE (?1 IS NULL OR tenant = ?1) AND minute_start >= ?2 AND minute_start < ?3
                 GROUP BY tenant, minute_start ORDER BY tenant, minute_start",
                bucket_sums()
            ))
            .map_err(err)?;
        let rows = q
            .query_map(params![tenant, from, to], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    BucketDelta::from_row(r, 2, p)?,
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (t, m, d) = row.map_err(err)?;
            out.push((t, m, d?));
        }
        Ok(out)
    }

    /// The usage of `tenant` (`None`: every tenant) in `[from, to)`,
    /// read in one snapshot: minute buckets where they are kept, hourly
    /// and then daily rollups before, and every adjustment.
    pub fn usage(&self, tenant: Option<&str>, from: i64, to: i64) -> Result<Usage, LedgerError> {
        self.usage_since(tenant, from, to, 0)
    }

    /// As `usage`, with the adjustments booked after revision
    /// `since_revision` only. The revision, the watermark, the rows and
    /// the adjustments are read in one snapshot, so a job that asks next
    /// time since the revision returned sees every adjustment once.
    pub fn usage_since(
        &self,
        tenant: Option<&str>,
        from: i64,
        to: i64,
        since_revision: u64,
    ) -> Result<Usage, LedgerError> {
        let p = &self.path;
        let err = sqlite_err(p);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let (revision, finalized_through) = watermark(&tx, p)?;
        let mut adjustments = Vec::new();
        {
            let mut q = tx
                .prepare_cached(&format!(
                    "SELECT revision, booked_at, tenant, node, minute_start, {}
                     FROM adjustment
                     WHERE (?1 IS NULL OR tenant = ?1) AND minute_start >= ?2 AND minute_start < ?3
                        AND revision > ?4
                     ORDER BY revision, tenant, node, minute_start",
                    BUCKET_COLUMNS.join(", ")
                ))
                .map_err(err)?;
            let rows = q
                .query_map(
                    params![
                        tenant,
                        from,
                        to,
                        // Past any revision stored: nothing is after it.
                        i64::try_from(since_revision).unwrap_or(i64::MAX)
                    ],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                            BucketDelta::from_row(r, 5, p)?,
                        ))
                    },
                )
                .map_err(err)?;
            for row in rows {
                let (revision, booked_at, tenant, node, minute_start, delta) = row.map_err(err)?;
                adjustments.push(Adjustment {
                    revision: u64_of(revision, p, "revision")?,
                    booked_at,
                    tenant,
                    node,
                    minute_start,
                    delta: delta?,
                });
            }
        }
        let minutes_from = kept_from(&tx, MINUTE, p)?;
        let hours_from = kept_from(&tx, HOUR, p)?.min(minutes_from);
        let days_from = kept_from(&tx, DAY, p)?.min(hours_from);
        let mut spans: Vec<(String, Span)> = Vec::new();
        for (t, start, delta) in self.minutes(tenant, from.max(minutes_from), to)? {
            spans.push((
                t,
                Span {
                    start,
                    seconds: MINUTE,
                    delta,
                    peak_quarter_mj: None,
                },
            ));
        }
        let mut q = tx
            .prepare_cached(&format!(
                "SELECT r.tenant, r.start, {}, MAX(COALESCE(d.peak_quarter_mj, 0)),
                    MAX(COALESCE(d.over_contract_ns, 0)), MAX(COALESCE(d.overage_mj, 0))
                 FROM usage_rollup r LEFT JOIN demand_rollup d
                    ON d.period = r.period AND d.start = r.start AND d.tenant = r.tenant
                 WHERE r.period = ?1 AND (?2 IS NULL OR r.tenant = ?2)
                    AND r.start >= ?3 AND r.start < ?4
                 GROUP BY r.tenant, r.start",
                BUCKET_COLUMNS
                    .iter()
                    .map(|c| format!("SUM(r.{c})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .map_err(err)?;
        for (period, lo, hi) in [
            (HOUR, from.max(hours_from), to.min(minutes_from)),
            (DAY, from, to.min(hours_from)),
        ] {
            if lo >= hi {
                continue;
            }
            let rows = q
                .query_map(params![period, tenant, lo, hi], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        BucketDelta::from_row(r, 2, p)?,
                        r.get::<_, i64>(2 + BUCKET_COLUMNS.len())?,
                        r.get::<_, i64>(3 + BUCKET_COLUMNS.len())?,
                        r.get::<_, i64>(4 + BUCKET_COLUMNS.len())?,
                    ))
                })
                .map_err(err)?;
            for row in rows {
                let (t, start, delta, peak, over_ns, over_mj) = row.map_err(err)?;
                // The rollup's own evaluation of its minutes.
                let delta = BucketDelta {
                    over_contract_ns: u64_of(over_ns, p, "over_contract_ns")?,
                    overage_mj: u64_of(over_mj, p, "overage_mj")?,
                    ..delta?
                };
                spans.push((
                    t,
                    Span {
                        start,
                        seconds: period,
                        delta,
                        peak_quarter_mj: Some(u64_of(peak, p, "peak_quarter_mj")?),
                    },
                ));
            }
        }
        spans.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.start.cmp(&b.1.start)));
        Ok(Usage {
            spans,
            minutes_from,
            hours_from,
            days_from,
            revision,
            finalized_through,
            adjustments,
        })
    }

    /// Every tenant that has buckets.
    pub fn tenants(&self) -> Result<Vec<String>, LedgerError> {
        let p = &self.path;
        let err = sqlite_err(p);
        let mut q = self
            .conn
            .prepare_cached("SELECT tenant FROM tenant_total ORDER BY tenant")
            .map_err(err)?;
        let rows = q.query_map([], |r| r.get::<_, String>(0)).map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    use crate::tenants::Tenants;

    /// A history of one version of `toml`.
    fn history(toml: &str) -> TenantHistory {
        TenantHistory::new(Arc::new(Tenants::from_toml(toml).unwrap()))
    }

    #[test]
    fn split_examples() {
        const M: i64 = 60_000_000_000;
        // (amount, from, to, expected parts)
        type Case = (u64, i64, i64, Vec<(i64, u64)>);
        // (amount, from, to, expected (minute, part))
        let cases: [Case; 4] = [
            (100, 10 * M, 10 * M + 1_000, vec![(600, 100)]),
            (
                100,
                10 * M - M / 2,
                10 * M + M / 2,
                vec![(540, 50), (600, 50)],
            ),
            (
                10,
                10 * M - M / 3,
                10 * M + 2 * M / 3,
                vec![(540, 3), (600, 7)],
            ),
            (7, 5 * M, 5 * M, vec![(300, 7)]),
        ];
        for (amount, from, to, want) in cases {
            assert_eq!(
                split_by_minute(amount, from, to),
                want,
                "{amount} over ({from}, {to}]"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Conservation: the parts add up to the amount exactly, one per
        /// minute overlapped, each within one of its exact share.
        #[test]
        fn split_conserves_energy(amount in 0u64..=u64::MAX / 4, from in 0i64..10_000_000_000_000, len in 0i64..600_000_000_000) {
            let parts = split_by_minute(amount, from, from + len);
            prop_assert_eq!(parts.iter().map(|p| p.1).sum::<u64>(), amount);
            for w in parts.windows(2) {
                prop_assert_eq!(w[1].0, w[0].0 + 60);
            }
            if len > 0 {
                let first = from.div_euclid(60_000_000_000) * 60;
                let last = (from + len - 1).div_euclid(60_000_000_000) * 60;
                prop_assert_eq!(parts[0].0, first);
                prop_assert_eq!(parts[parts.len() - 1].0, last);
            }
        }
    }

    #[test]
    fn commit_then_load_round_trips_and_buckets_accumulate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        let mut c = Commit::default();
        let n1 = NodeCursor {
            epoch: 7,
            last_seq: 42,
            gpus: vec![
                (
                    Arc::from("GPU-1"),
                    GpuCursor {
                        last_counter_mj: Some(u64::MAX / 4),
                        last_timestamp_ns: Some(-5),
                        remainder_mw_ns: 999_999_999,
                        energy_mj: 123,
                        counter_resets: 3,
                    },
                ),
                (
                    Arc::from("GPU-2"),
                    GpuCursor {
                        last_counter_mj: None,
                        last_timestamp_ns: None,
                        remainder_mw_ns: 0,
                        energy_mj: 0,
                        counter_resets: 0,
                    },
                ),
            ],
        };
        c.nodes.insert(Arc::from("n1"), n1.clone());
        let key: BucketKey = (Arc::from("t"), Arc::from("n1"), 600);
        c.buckets.insert(
            key.clone(),
            BucketDelta {
                energy_mj: 100,
                gpu_ns: 5,
                busy_gpu_ns: 4,
                samples: 1,
                expected_gpu_ns: 6,
                estimated_mj: 7,
                over_contract_ns: 8,
                overage_mj: 9,
            },
        );
        c.tenant_energy.insert(Arc::from("t"), 100);
        // A 1 mW contract allows 60 mJ a minute: the first 100 mJ put the
        // minute over it (60 s), the next 100 mJ add no more time.
        c.contracts = Some(Arc::new(history(
            "[[tenant]]\nid = \"t\"\ncontracted_kw = 0.000001\n",
        )));
        let over = |revision, ns: &[u64]| Committed {
            revision,
            over_contract_ns: ns.iter().map(|ns| (Arc::from("t"), *ns)).collect(),
        };
        assert_eq!(l.commit(&c).unwrap(), over(1, &[60_000_000_000]));
        assert_eq!(l.commit(&c).unwrap(), over(2, &[]));
        drop(l);
        let l = Ledger::open(&path).unwrap();
        let snap = l.load().unwrap();
        assert_eq!(snap.nodes, vec![("n1".to_string(), n1)]);
        assert_eq!(snap.tenant_energy, vec![("t".to_string(), 200)]);
        assert_eq!(
            snap.tenant_over_contract_ns,
            vec![("t".to_string(), 60_000_000_000)]
        );
        let sums = l.bucket_totals("t").unwrap();
        assert_eq!(sums.values(), [200, 10, 8, 2, 12, 14, 16, 18]);
        assert_eq!(
            (sums.energy_mj, sums.gpu_ns, sums.busy_gpu_ns, sums.samples),
            (200, 10, 8, 2)
        );
    }

    #[test]
    fn gpu_cursors_written_before_counter_resets_were_kept_read_as_zero() {
        // How `StoredGpu` was encoded before it had `counter_resets`.
        #[derive(Clone, PartialEq, prost::Message)]
        struct OldStoredGpus {
            #[prost(message, repeated, tag = "1")]
            gpus: Vec<OldStoredGpu>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct OldStoredGpu {
            #[prost(string, tag = "1")]
            uuid: String,
            #[prost(uint64, optional, tag = "2")]
            last_counter_mj: Option<u64>,
            #[prost(sint64, optional, tag = "3")]
            last_timestamp_ns: Option<i64>,
            #[prost(uint64, tag = "4")]
            remainder_mw_ns: u64,
            #[prost(uint64, tag = "5")]
            energy_mj: u64,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        drop(Ledger::create(&path).unwrap());
        let old = OldStoredGpus {
            gpus: vec![OldStoredGpu {
                uuid: "GPU-1".into(),
                last_counter_mj: Some(1_000),
                last_timestamp_ns: Some(5),
                remainder_mw_ns: 7,
                energy_mj: 11,
            }],
        };
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO node_cursor (node, epoch, last_seq, gpus) VALUES ('n1', 1, 2, ?1)",
                params![old.encode_to_vec()],
            )
            .unwrap();
        let snap = Ledger::open(&path).unwrap().load().unwrap();
        let want = GpuCursor {
            last_counter_mj: Some(1_000),
            last_timestamp_ns: Some(5),
            remainder_mw_ns: 7,
            energy_mj: 11,
            counter_resets: 0,
        };
        assert_eq!(snap.nodes[0].1.gpus, vec![(Arc::from("GPU-1"), want)]);
    }

    #[test]
    fn tenant_versions_survive_a_reopen_in_load_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let v = |from: i64, file: &str| TenantVersion {
            effective_from_ns: from,
            loaded_at_ns: from + 5,
            file: file.to_string(),
        };
        {
            let mut l = Ledger::create(&path).unwrap();
            assert!(l.tenant_versions().unwrap().is_empty());
            l.add_tenant_version(&v(20, "b")).unwrap();
            l.add_tenant_version(&v(10, "a")).unwrap();
        }
        let l = Ledger::open(&path).unwrap();
        assert_eq!(l.tenant_versions().unwrap(), [v(20, "b"), v(10, "a")]);
    }

    #[test]
    fn one_writer_per_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let first = Ledger::create(&path).unwrap();
        let err = Ledger::open(&path).err().unwrap().to_string();
        assert!(err.contains("in use by another collector"), "{err}");
        // Readers are not writers.
        Reader::open(&path).unwrap();
        drop(first);
        Ledger::open(&path).unwrap();
    }

    /// The second writer is refused however it reaches the file: the lock
    /// is on the database itself, not on a name beside it.
    #[test]
    fn one_writer_per_ledger_through_a_symlink_a_hard_link_or_without_a_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let first = Ledger::create(&path).unwrap();
        let other = tempfile::tempdir().unwrap();
        let symlink = other.path().join("via-symlink.db");
        std::os::unix::fs::symlink(&path, &symlink).unwrap();
        let hard_link = other.path().join("via-hard-link.db");
        std::fs::hard_link(&path, &hard_link).unwrap();
        for second in [&symlink, &hard_link] {
            let err = Ledger::open(second).err().map(|e| e.to_string());
            let err = err.unwrap_or_else(|| panic!("{} opened twice", second.display()));
            assert!(err.contains("in use by another collector"), "{err}");
            assert!(err.contains(&second.display().to_string()), "{err}");
        }
        // Whatever sits beside the ledger may be deleted; the lock holds.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let p = entry.unwrap().path();
            if p.to_string_lossy().ends_with(".lock") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let err = Ledger::open(&path).err().map(|e| e.to_string());
        let err = err.expect("opened twice after the lock file was deleted");
        assert!(err.contains("in use by another collector"), "{err}");
        drop(first);
        drop(Ledger::open(&symlink).unwrap());
    }

    /// The lock is one writer per file, also across processes: a child
    /// process (this test binary, re-run) holding the ledger keeps this
    /// one out until it exits; a reader is not refused meanwhile.
    #[test]
    fn a_ledger_held_by_another_process_is_refused() {
        if let Some(path) = std::env::var_os("CAPWATCH_TEST_HOLD_LEDGER") {
            let _held = Ledger::open(Path::new(&path)).unwrap();
            println!("holding");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        drop(Ledger::create(&path).unwrap());
        let link = dir.path().join("link.db");
        std::fs::hard_link(&path, &link).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ledger::tests::a_ledger_held_by_another_process_is_refused",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CAPWATCH_TEST_HOLD_LEDGER", &link)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("holding") {
            line.clear();
            let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert!(n > 0, "the child exited before holding the ledger");
        }
        let err = Ledger::open(&path).err().map(|e| e.to_string());
        let err = err.expect("a ledger held by another process opened");
        assert!(err.contains("in use by another collector"), "{err}");
        Reader::open(&path).unwrap().tenants().unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        drop(Ledger::open(&path).unwrap());
    }

    /// A ledger at schema version 5 (GPU cursors one row per GPU) holding
    /// what `rows` inserts.
    fn version_5_ledger(path: &Path, rows: &str) {
        let mut conn = Connection::open(path).unwrap();
        let tx = conn.transaction().unwrap();
        for m in &MIGRATIONS[..5] {
            let Migration::Sql(sql) = m else {
                panic!("migrations 1-5 are SQL")
            };
            tx.execute_batch(sql).unwrap();
        }
        tx.execute_batch(rows).unwrap();
        tx.pragma_update(None, "user_version", 5).unwrap();
        tx.commit().unwrap();
    }

    #[test]
    fn over_contract_booked_by_the_wall_clock_gives_way_to_the_minutes_energy() {
        // An older ledger booked over-contract time from live power into
        // node "" of the minute it was evaluated in. After the upgrade:
        // those bookings are gone from the minutes (their energy decides),
        // the hour whose minutes are kept is rolled up again, and a rollup
        // whose minutes are gone keeps the figures it had.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let (old_hour, kept_hour) = (T0, T0 + DAY);
        version_5_ledger(
            &path,
            &format!(
                "INSERT INTO usage_minute VALUES
                    ('a', 'n1', {kept_hour}, 90000000, 0, 0, 60, 0, 0, 0, 0),
                    ('a', '', {kept_hour}, 0, 0, 0, 0, 0, 0, 3000000000, 5000);
                 INSERT INTO usage_rollup VALUES
                    (3600, {old_hour}, 'a', 'n1', 7, 0, 0, 1, 0, 0, 0, 0),
                    (3600, {old_hour}, 'a', '', 0, 0, 0, 0, 0, 0, 42000000000, 4200);
                 INSERT INTO demand_rollup VALUES (3600, {old_hour}, 'a', 7);
                 INSERT INTO retention VALUES (60, {kept_hour});"
            ),
        );
        let mut l = Ledger::open(&path).unwrap();
        let minutes = l.bucket_totals("a").unwrap();
        assert_eq!(
            (
                minutes.energy_mj,
                minutes.over_contract_ns,
                minutes.overage_mj
            ),
            (90_000_000, 0, 0)
        );
        let rows: i64 = l
            .conn
            .query_row(
                "SELECT COUNT(*) FROM usage_minute WHERE node = ''",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 0);
        let tenants = history("[[tenant]]\nid = \"a\"\ncontracted_kw = 1\n");
        l.compact(&policy(kept_hour + HOUR, 0), &tenants).unwrap();
        let reader = Reader::open(&path).unwrap();
        let u = reader.usage(Some("a"), old_hour, kept_hour + HOUR).unwrap();
        let got: Vec<(i64, i64, u64, u64, u64)> = u
            .spans
            .iter()
            .map(|(_, s)| {
                let (ns, mj) = s.over_contract(1_000_000);
                (s.start, s.seconds, s.delta.energy_mj, ns, mj)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (old_hour, HOUR, 7, 42_000_000_000, 4_200),
                (kept_hour, MINUTE, 90_000_000, 60_000_000_000, 30_000_000),
            ]
        );
        // The kept hour's rollup was rebuilt under the new rule too.
        let rolled: (i64, i64) = l
            .conn
            .query_row(
                "SELECT over_contract_ns, overage_mj FROM demand_rollup
                 WHERE period = 3600 AND start = ?1 AND tenant = 'a'",
                [kept_hour],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(rolled, (60_000_000_000, 30_000_000));
    }

    #[test]
    fn version_5_gpu_cursor_rows_migrate_into_their_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        version_5_ledger(
            &path,
            "INSERT INTO node_cursor VALUES ('n1', 7, 42), ('n2', 8, 9);
             INSERT INTO gpu_cursor VALUES
                ('GPU-b', 'n1', 1000, 5000, 7, 11),
                ('GPU-a', 'n1', NULL, NULL, 0, 0),
                ('GPU-c', 'n2', 9223372036854775807, -3, 999999999, 12),
                ('GPU-d', 'gone', 1, 2, 3, 4);
             INSERT INTO usage_minute VALUES ('t', 'n1', 600, 100, 5, 4, 1, 6, 7, 8, 9);",
        );
        let l = Ledger::open(&path).unwrap();
        let cursor = |counter, ts, rem, energy| GpuCursor {
            last_counter_mj: counter,
            last_timestamp_ns: ts,
            remainder_mw_ns: rem,
            energy_mj: energy,
            counter_resets: 0,
        };
        let mut snap = l.load().unwrap();
        snap.nodes.sort_by(|a, b| a.0.cmp(&b.0));
        let expect = vec![
            (
                "gone".to_string(),
                NodeCursor {
                    epoch: 0,
                    last_seq: 0,
                    gpus: vec![(Arc::from("GPU-d"), cursor(Some(1), Some(2), 3, 4))],
                },
            ),
            (
                "n1".to_string(),
                NodeCursor {
                    epoch: 7,
                    last_seq: 42,
                    gpus: vec![
                        (Arc::from("GPU-a"), cursor(None, None, 0, 0)),
                        (Arc::from("GPU-b"), cursor(Some(1000), Some(5000), 7, 11)),
                    ],
                },
            ),
            (
                "n2".to_string(),
                NodeCursor {
                    epoch: 8,
                    last_seq: 9,
                    gpus: vec![(
                        Arc::from("GPU-c"),
                        cursor(Some(i64::MAX as u64), Some(-3), 999_999_999, 12),
                    )],
                },
            ),
        ];
        assert_eq!(snap.nodes, expect);
        assert_eq!(l.bucket_totals("t").unwrap().energy_mj, 100);
        let tables: i64 = l
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'gpu_cursor'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "gpu_cursor is dropped");
    }

    #[test]
    fn a_negative_counter_in_a_version_5_ledger_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        version_5_ledger(
            &path,
            "INSERT INTO gpu_cursor VALUES ('GPU-a', 'n1', -1, 0, 0, 0);",
        );
        let err = Ledger::open(&path).err().unwrap().to_string();
        assert!(err.contains("ledger.db") && err.contains("-1"), "{err}");
        // Nothing was half-migrated: the version and table are as before.
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 5);
        conn.query_row("SELECT COUNT(*) FROM gpu_cursor", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Ledger::open(&path).err().unwrap().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[test]
    fn a_reader_refuses_an_older_schema_and_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let err = Reader::open(&path).err().unwrap().to_string();
        assert!(err.ends_with("ledger.db does not exist"), "{err}");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 2)
            .unwrap();
        let err = Reader::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("schema version 2 is older") && err.contains("migrate"),
            "{err}"
        );
    }

    const T0: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z, a UTC midnight

    /// One minute of `energy_mj` for (tenant, node) at `minute`.
    fn minute_commit(entries: &[(&str, &str, i64, u64)]) -> Commit {
        let mut c = Commit::default();
        for &(t, n, m, e) in entries {
            c.buckets
                .entry((Arc::from(t), Arc::from(n), m))
                .or_default()
                .add(&BucketDelta {
                    energy_mj: e,
                    gpu_ns: 60_000_000_000,
                    samples: 60,
                    expected_gpu_ns: 60_000_000_000,
                    ..BucketDelta::default()
                });
        }
        c
    }

    fn policy(closed_before: i64, minutes_from: i64) -> Compaction {
        Compaction {
            closed_before,
            minutes_from,
            hours_from: 0,
            days_from: None,
        }
    }

    fn energy_by_tenant(u: &Usage) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (t, s) in &u.spans {
            *out.entry(t.clone()).or_default() += s.delta.energy_mj;
        }
        out
    }

    #[test]
    fn rollups_keep_sums_and_peaks_and_follow_late_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        // Hour 0: tenant a on two nodes, 1 J a minute each, except a burst
        // of 90 J in minute 20 on n1. Hour 1: 2 J a minute on n1.
        let mut entries = Vec::new();
        for m in 0..60 {
            entries.push(("a", "n1", T0 + m * 60, if m == 20 { 90_000 } else { 1_000 }));
            entries.push(("a", "n2", T0 + m * 60, 1_000));
            entries.push(("a", "n1", T0 + HOUR + m * 60, 2_000));
        }
        l.commit(&minute_commit(&entries)).unwrap();
        // Hour 1 is not closed yet: only hour 0 rolls up.
        let done = l
            .compact(
                &policy(T0 + HOUR + 1800, 0),
                &TenantHistory::new(Arc::new(Tenants::empty())),
            )
            .unwrap();
        assert_eq!((done.hours_rolled_up, done.days_rolled_up), (1, 1));
        assert_eq!(done.minute_rows_dropped, 0);
        let done = l
            .compact(
                &policy(T0 + 2 * HOUR, 0),
                &TenantHistory::new(Arc::new(Tenants::empty())),
            )
            .unwrap();
        assert_eq!(done.hours_rolled_up, 1);
        // Nothing pending: a second run does nothing.
        let again = l
            .compact(
                &policy(T0 + 2 * HOUR, 0),
                &TenantHistory::new(Arc::new(Tenants::empty())),
            )
            .unwrap();
        assert_eq!(again, Compacted::default());

        let reader = Reader::open(&path).unwrap();
        let before = reader.usage(None, T0, T0 + DAY).unwrap();
        assert_eq!(before.minutes_from, 0);
        assert!(before.spans.iter().all(|(_, s)| s.seconds == MINUTE));

        // A late minute lands in hour 0 before its minutes are dropped.
        l.commit(&minute_commit(&[("a", "n2", T0 + 59 * 60, 500)]))
            .unwrap();
        let done = l
            .compact(
                &policy(T0 + 3 * HOUR, T0 + 2 * HOUR),
                &TenantHistory::new(Arc::new(Tenants::empty())),
            )
            .unwrap();
        assert_eq!(done.hours_rolled_up, 1, "the late minute re-rolls hour 0");
        assert_eq!(done.minute_rows_dropped, 180);

        let after = reader.usage(None, T0, T0 + DAY).unwrap();
        assert_eq!(after.minutes_from, T0 + 2 * HOUR);
        assert_eq!(
            energy_by_tenant(&after),
            energy_by_tenant(&before)
                .into_iter()
                .map(|(t, e)| (t, e + 500))
                .collect()
        );
        let hours: Vec<(i64, i64, u64, Option<u64>)> = after
            .spans
            .iter()
            .map(|(_, s)| (s.start, s.seconds, s.delta.energy_mj, s.peak_quarter_mj))
            .collect();
        // Hour 0's peak quarter holds the burst: 14 J + 90 J on n1, 15 J
        // on n2.
        assert_eq!(
            hours,
            vec![
                (
                    T0,
                    HOUR,
                    59 * 1_000 + 90_000 + 60 * 1_000 + 500,
                    Some(14_000 + 90_000 + 15_000)
                ),
                (T0 + HOUR, HOUR, 120_000, Some(30_000)),
            ]
        );
        assert_eq!(after.spans[0].1.delta.samples, 121 * 60);

        // Hours dropped: the daily rollup (a UTC day) remains, with the
        // day's peak quarter.
        let policy = Compaction {
            closed_before: T0 + 3 * DAY,
            minutes_from: T0 + 2 * DAY,
            hours_from: T0 + DAY,
            days_from: None,
        };
        let done = l
            .compact(&policy, &TenantHistory::new(Arc::new(Tenants::empty())))
            .unwrap();
        assert_eq!(done.hour_rows_dropped, 3);
        let days = reader.usage(Some("a"), T0, T0 + 2 * DAY).unwrap();
        assert_eq!(days.hours_from, T0 + DAY);
        assert_eq!(days.spans.len(), 1);
        let (_, day) = days.spans[0];
        assert_eq!((day.start, day.seconds), (T0, DAY));
        assert_eq!(
            day.delta.energy_mj,
            59 * 1_000 + 90_000 + 60 * 1_000 + 500 + 120_000
        );
        assert_eq!(day.peak_quarter_mj, Some(14_000 + 90_000 + 15_000));
        // And with a daily retention, days go too.
        l.compact(
            &Compaction {
                days_from: Some(T0 + 2 * DAY),
                ..policy
            },
            &TenantHistory::new(Arc::new(Tenants::empty())),
        )
        .unwrap();
        assert!(
            reader
                .usage(None, 0, T0 + 10 * DAY)
                .unwrap()
                .spans
                .is_empty()
        );
    }

    #[test]
    fn rollups_carry_each_minutes_evaluation_against_the_contract() {
        // Invariant: a rollup's over-contract time and overage are the sum
        // of its minutes' `over_contract` (tenant energy over all nodes),
        // rebuilt exactly when late minutes arrive; the tenant's counter,
        // kept at commit time, agrees whatever order the energy came in.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        // a: 1 kW, 60 kJ a minute; b: no contract.
        let tenants = Arc::new(history(
            "[[tenant]]\nid = \"a\"\ncontracted_kw = 1\nnodes = [\"n*\"]\n",
        ));
        let commit = |l: &mut Ledger, entries: &[(&str, &str, i64, u64)]| {
            let mut c = minute_commit(entries);
            c.contracts = Some(tenants.clone());
            l.commit(&c).unwrap()
        };
        // Minute 0: 90 kJ on one node (over by 30 kJ). Minute 1: 40 kJ on
        // each of two nodes (over by 20 kJ, though neither node is).
        // Minute 2: 50 kJ, under. Minute 59: at the contract exactly.
        // Minute 60 (the next hour, the next day's too): over by 1 J.
        commit(
            &mut l,
            &[
                ("a", "n1", T0, 90_000_000),
                ("a", "n1", T0 + 60, 40_000_000),
                ("a", "n2", T0 + 60, 40_000_000),
                ("a", "n1", T0 + 120, 50_000_000),
                ("a", "n1", T0 + 59 * 60, 60_000_000),
                ("b", "n9", T0, 900_000_000),
            ],
        );
        commit(&mut l, &[("a", "n1", T0 + DAY, 60_001_000)]);
        let tenants_now = tenants.clone();
        let compact = |l: &mut Ledger, closed: i64| {
            l.compact(&policy(closed, closed), &tenants_now).unwrap();
        };
        let reader = Reader::open(&path).unwrap();
        let over = |u: &Usage, tenant: &str| -> Vec<(i64, u64, u64)> {
            u.spans
                .iter()
                .filter(|(t, s)| t == tenant && s.peak_quarter_mj.is_some())
                .map(|(_, s)| (s.start, s.delta.over_contract_ns, s.delta.overage_mj))
                .collect()
        };
        const MIN: u64 = 60_000_000_000;
        // The minutes dropped once rolled up: the hours answer.
        compact(&mut l, T0 + DAY + HOUR);
        let u = reader.usage(None, T0, T0 + DAY + HOUR).unwrap();
        assert_eq!(
            over(&u, "a"),
            vec![(T0, 2 * MIN, 50_000_000), (T0 + DAY, MIN, 1_000)]
        );
        assert_eq!(over(&u, "b"), vec![(T0, 0, 0)]);
        // A late minute for hour 0 while its minutes are still kept would
        // rebuild it; here they are gone (a retention shorter than the
        // oldest sample accepted), so what arrives is evaluated on its own
        // and added: minute 2 had 50 kJ and 20 kJ more would put it over,
        // but alone they are not.
        commit(&mut l, &[("a", "n3", T0 + 120, 20_000_000)]);
        compact(&mut l, T0 + DAY + HOUR);
        let u = reader.usage(None, T0, T0 + DAY + HOUR).unwrap();
        assert_eq!(
            over(&u, "a"),
            vec![(T0, 2 * MIN, 50_000_000), (T0 + DAY, MIN, 1_000)]
        );
        // The counter, too, sees only what is left of the minute.
        let snap = l.load().unwrap();
        assert_eq!(
            snap.tenant_over_contract_ns,
            vec![("a".to_string(), 3 * MIN)]
        );

        // With the minutes kept, a late minute rebuilds its hour exactly:
        // minute 3 of hour h2 goes over only with both parts.
        let h2 = T0 + DAY + 2 * HOUR;
        commit(&mut l, &[("a", "n1", h2 + 180, 59_000_000)]);
        l.compact(&policy(h2 + HOUR, 0), &tenants).unwrap();
        commit(&mut l, &[("a", "n2", h2 + 180, 2_000_000)]);
        l.compact(&policy(h2 + HOUR, 0), &tenants).unwrap();
        compact(&mut l, h2 + HOUR);
        let u = reader.usage(None, h2, h2 + HOUR).unwrap();
        assert_eq!(over(&u, "a"), vec![(h2, MIN, 1_000_000)]);
        // The day rollups sum their hours.
        l.compact(&policy(T0 + 3 * DAY, T0 + 3 * DAY), &tenants)
            .unwrap();
        l.compact(
            &Compaction {
                hours_from: T0 + 3 * DAY,
                ..policy(T0 + 3 * DAY, T0 + 3 * DAY)
            },
            &tenants,
        )
        .unwrap();
        let u = reader.usage(None, T0, T0 + 2 * DAY).unwrap();
        assert_eq!(
            over(&u, "a"),
            vec![(T0, 2 * MIN, 50_000_000), (T0 + DAY, 2 * MIN, 1_001_000)]
        );
        let snap = l.load().unwrap();
        assert_eq!(
            snap.tenant_over_contract_ns,
            vec![("a".to_string(), 4 * MIN)]
        );
    }

    #[test]
    fn rollups_judge_each_minute_by_the_contract_of_its_time() {
        // Invariant: compaction evaluates each minute against the contract
        // of the tenant-file version in force at the minute's start, the
        // same one the commit path used. a's contract is lowered from 2 kW
        // to 1 kW at minute 2, in the middle of the hour; each of minutes
        // 0-3 holds 90 kJ (1.5 kW).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        let mut h = history("[[tenant]]\nid = \"a\"\ncontracted_kw = 2\nnodes = [\"n*\"]\n");
        h.push(
            (T0 + 120) * 1_000_000_000,
            Arc::new(
                Tenants::from_toml("[[tenant]]\nid = \"a\"\ncontracted_kw = 1\nnodes = [\"n*\"]\n")
                    .unwrap(),
            ),
        );
        let h = Arc::new(h);
        let mut c = minute_commit(&[
            ("a", "n1", T0, 90_000_000),
            ("a", "n1", T0 + 60, 90_000_000),
            ("a", "n1", T0 + 120, 90_000_000),
            ("a", "n1", T0 + 180, 90_000_000),
        ]);
        c.contracts = Some(h.clone());
        l.commit(&c).unwrap();
        const MIN: u64 = 60_000_000_000;
        assert_eq!(
            l.load().unwrap().tenant_over_contract_ns,
            vec![("a".to_string(), 2 * MIN)]
        );
        l.compact(&policy(T0 + HOUR, T0 + HOUR), &h).unwrap();
        let u = Reader::open(&path)
            .unwrap()
            .usage(Some("a"), T0, T0 + HOUR)
            .unwrap();
        let got: Vec<(i64, u64, u64)> = u
            .spans
            .iter()
            .map(|(_, s)| (s.start, s.delta.over_contract_ns, s.delta.overage_mj))
            .collect();
        assert_eq!(got, vec![(T0, 2 * MIN, 60_000_000)]);
    }

    #[test]
    fn a_long_backlog_rolls_up_over_several_rounds_without_losing_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        // 100 hours of one minute each, all closed and all past retention.
        let entries: Vec<(&str, &str, i64, u64)> = (0..100)
            .map(|h| ("a", "n1", T0 + h * HOUR, 1_000))
            .collect();
        l.commit(&minute_commit(&entries)).unwrap();
        let end = T0 + 200 * HOUR;
        let mut rounds = 0;
        loop {
            let done = l
                .compact(
                    &policy(end, end),
                    &TenantHistory::new(Arc::new(Tenants::empty())),
                )
                .unwrap();
            rounds += 1;
            // Nothing is dropped ahead of its rollup.
            let u = Reader::open(&path).unwrap().usage(None, 0, end).unwrap();
            assert_eq!(
                u.spans.iter().map(|(_, s)| s.delta.energy_mj).sum::<u64>(),
                100_000,
                "round {rounds}"
            );
            if done.hours_rolled_up == 0 {
                break;
            }
            assert!(done.hours_rolled_up as i64 <= HOURS_PER_ROUND);
        }
        assert_eq!(rounds, 4, "48 + 48 + 4 hours, then nothing");
    }

    #[test]
    fn late_energy_that_puts_a_final_minute_over_contract_is_an_adjustment() {
        // Invariant: a final minute's row never changes; what late energy
        // does to its over-contract evaluation is booked with the
        // adjustments (tenant-wide, node ""), so row plus adjustments say
        // what the minute's whole energy does, and the counter agrees.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        let tenants = Arc::new(history(
            "[[tenant]]\nid = \"a\"\ncontracted_kw = 1\nnodes = [\"n*\"]\n",
        ));
        let with = |entries: &[(&str, &str, i64, u64)]| {
            let mut c = minute_commit(entries);
            c.contracts = Some(tenants.clone());
            c
        };
        // 50 kJ in minute 0 (1 kW allows 60 kJ), then final.
        let first = l
            .commit_at(&with(&[("a", "n1", T0, 50_000_000)]), T0 + 70, T0 + HOUR)
            .unwrap();
        assert_eq!(first.over_contract_ns, vec![]);
        // Late: 20 kJ more from another node puts the minute over by 10 kJ;
        // then 5 kJ more adds overage but no time.
        let late = l
            .commit_at(&with(&[("a", "n2", T0, 20_000_000)]), T0 + 2 * HOUR, T0)
            .unwrap();
        assert_eq!(
            late.over_contract_ns,
            vec![(Arc::from("a"), 60_000_000_000)]
        );
        l.commit_at(&with(&[("a", "n3", T0, 5_000_000)]), T0 + 3 * HOUR, T0)
            .unwrap();
        let u = Reader::open(&path)
            .unwrap()
            .usage(None, T0, T0 + HOUR)
            .unwrap();
        assert_eq!(u.spans.len(), 1);
        assert_eq!(
            u.spans[0].1.over_contract(1_000_000),
            (0, 0),
            "the row stays"
        );
        let booked: Vec<(u64, &str, u64, u64, u64)> = u
            .adjustments
            .iter()
            .map(|a| {
                let d = a.delta;
                (
                    a.revision,
                    a.node.as_str(),
                    d.energy_mj,
                    d.over_contract_ns,
                    d.overage_mj,
                )
            })
            .collect();
        assert_eq!(
            booked,
            vec![
                (2, "", 0, 60_000_000_000, 10_000_000),
                (2, "n2", 20_000_000, 0, 0),
                (3, "", 0, 0, 5_000_000),
                (3, "n3", 5_000_000, 0, 0),
            ]
        );
        let snap = l.load().unwrap();
        assert_eq!(
            snap.tenant_over_contract_ns,
            vec![("a".to_string(), 60_000_000_000)]
        );
    }

    #[test]
    fn deltas_for_final_minutes_are_booked_as_adjustments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        let reader = Reader::open(&path).unwrap();
        let fresh = reader.usage(None, T0, T0 + DAY).unwrap();
        assert_eq!((fresh.revision, fresh.finalized_through), (0, 0));
        // Minute 0 arrives in time; the commit finalizes the first hour.
        let r = l
            .commit_at(
                &minute_commit(&[("a", "n1", T0, 1_000)]),
                T0 + 70,
                T0 + HOUR,
            )
            .unwrap();
        assert_eq!(r.revision, 1);
        let before = reader.usage(None, T0, T0 + DAY).unwrap();
        assert_eq!((before.revision, before.finalized_through), (1, T0 + HOUR));
        // Three hours later: late energy for minutes 0 and 59 (final), and
        // for minute 60 (not: it ends after the watermark). The watermark
        // asked for is behind the stored one: it stays.
        let late = minute_commit(&[
            ("a", "n1", T0, 500),
            ("a", "n2", T0 + HOUR - 60, 200),
            ("a", "n1", T0 + HOUR, 300),
        ]);
        assert_eq!(l.commit_at(&late, T0 + 3 * HOUR, T0).unwrap().revision, 2);
        let after = reader.usage(None, T0, T0 + DAY).unwrap();
        assert_eq!(after.finalized_through, T0 + HOUR, "never back");
        assert_eq!(after.revision, 2);
        let rows: Vec<(i64, u64)> = after
            .spans
            .iter()
            .map(|(_, s)| (s.start, s.delta.energy_mj))
            .collect();
        assert_eq!(rows, vec![(T0, 1_000), (T0 + HOUR, 300)]);
        let booked: Vec<(u64, i64, &str, &str, i64, u64, u64)> = after
            .adjustments
            .iter()
            .map(|a| {
                (
                    a.revision,
                    a.booked_at,
                    a.tenant.as_str(),
                    a.node.as_str(),
                    a.minute_start,
                    a.delta.energy_mj,
                    a.delta.samples,
                )
            })
            .collect();
        assert_eq!(
            booked,
            vec![
                (2, T0 + 3 * HOUR, "a", "n1", T0, 500, 60),
                (2, T0 + 3 * HOUR, "a", "n2", T0 + HOUR - 60, 200, 60),
            ]
        );
        // Every figure of the bucket goes with it, and nothing is lost.
        assert_eq!(
            after.adjustments[0].delta,
            minute_commit(&[("a", "n1", T0, 500)])
                .buckets
                .into_values()
                .next()
                .unwrap()
        );
        assert_eq!(l.bucket_totals("a").unwrap().energy_mj, 2_000);
        // Since revision 1: the same; since 2: nothing; a tenant sees its own.
        assert_eq!(
            reader
                .usage_since(None, T0, T0 + DAY, 1)
                .unwrap()
                .adjustments,
            after.adjustments
        );
        assert!(
            reader
                .usage_since(None, T0, T0 + DAY, 2)
                .unwrap()
                .adjustments
                .is_empty()
        );
        assert!(
            reader
                .usage_since(Some("b"), T0, T0 + DAY, 0)
                .unwrap()
                .adjustments
                .is_empty()
        );
        // Only the minute that changed marks its hour for a new rollup.
        let pending: Vec<i64> = l
            .conn
            .prepare("SELECT hour_start FROM rollup_pending ORDER BY hour_start")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(pending, vec![T0, T0 + HOUR]);

        // Rollups sum the minutes only; adjustments outlive the minutes
        // and the hours, and go with the days they belong to.
        let keep_days = Compaction {
            closed_before: T0 + 3 * DAY,
            minutes_from: T0 + 2 * DAY,
            hours_from: T0 + 2 * DAY,
            days_from: None,
        };
        l.compact(&keep_days, &TenantHistory::new(Arc::new(Tenants::empty())))
            .unwrap();
        let rolled = reader.usage(None, T0, T0 + DAY).unwrap();
        assert_eq!(rolled.spans.len(), 1);
        assert_eq!(rolled.spans[0].1.delta.energy_mj, 1_300);
        assert_eq!(rolled.adjustments, after.adjustments);
        let done = l
            .compact(
                &Compaction {
                    days_from: Some(T0 + 2 * DAY),
                    ..keep_days
                },
                &TenantHistory::new(Arc::new(Tenants::empty())),
            )
            .unwrap();
        assert_eq!(done.adjustment_rows_dropped, 2);
        assert!(
            reader
                .usage(None, 0, T0 + DAY)
                .unwrap()
                .adjustments
                .is_empty()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Conservation: whatever is committed and whenever compaction
        /// runs, each tenant's usage over all time is what was committed,
        /// and each UTC day's is the same read from minutes or rollups.
        #[test]
        fn compaction_conserves_usage(
            entries in proptest::collection::vec((0usize..2, 0usize..2, 0i64..3 * 24 * 60, 0u64..1_000_000), 1..200),
            cuts in proptest::collection::vec(0i64..4 * 24, 1..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ledger.db");
            let mut l = Ledger::create(&path).unwrap();
            let reader = Reader::open(&path).unwrap();
            let tenants = ["a", "b"];
            let nodes = ["n1", "n2"];
            let mut want: BTreeMap<String, u64> = BTreeMap::new();
            let mut per_day: BTreeMap<(String, i64), u64> = BTreeMap::new();
            let mut cuts = cuts;
            cuts.sort_unstable();
            let chunk = entries.len().div_ceil(cuts.len());
            for (batch, cut_hour) in entries.chunks(chunk).zip(cuts) {
                let list: Vec<(&str, &str, i64, u64)> = batch
                    .iter()
                    .map(|&(t, n, m, e)| (tenants[t], nodes[n], T0 + m * 60, e))
                    .collect();
                for &(t, _, m, e) in &list {
                    *want.entry(t.to_string()).or_default() += e;
                    *per_day.entry((t.to_string(), (m - T0).div_euclid(DAY))).or_default() += e;
                }
                l.commit(&minute_commit(&list)).unwrap();
                // Closed up to the cut; minutes kept from a day before it.
                // Later batches write minutes already dropped: they must
                // land in the rollups all the same.
                let closed = T0 + cut_hour * HOUR;
                l.compact(
                    &Compaction {
                        closed_before: closed,
                        minutes_from: T0.max(closed - DAY),
                        hours_from: 0,
                        days_from: None,
                    },
                    &TenantHistory::new(Arc::new(Tenants::empty())),
                )
                .unwrap();
            }
            let u = reader.usage(None, 0, T0 + 10 * DAY).unwrap();
            prop_assert_eq!(energy_by_tenant(&u), want);
            let mut got_day: BTreeMap<(String, i64), u64> = BTreeMap::new();
            for (t, s) in &u.spans {
                prop_assert!(s.start % s.seconds == 0);
                *got_day.entry((t.clone(), (s.start - T0).div_euclid(DAY))).or_default() += s.delta.energy_mj;
            }
            got_day.retain(|_, e| *e > 0);
            per_day.retain(|_, e| *e > 0);
            prop_assert_eq!(got_day, per_day);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The watermark's promise: whatever is committed, however late,
        /// and whenever compaction runs, every hour that was final when it
        /// was read reads the same ever after, and the rows plus the
        /// adjustments hold everything committed.
        #[test]
        fn final_rows_never_change_and_late_energy_is_kept(
            entries in proptest::collection::vec((0usize..2, 0i64..6 * 60, 0u64..1_000_000), 1..120),
            marks in proptest::collection::vec(0i64..8 * 60, 1..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ledger.db");
            let mut l = Ledger::create(&path).unwrap();
            let reader = Reader::open(&path).unwrap();
            let tenants = ["a", "b"];
            let mut want: BTreeMap<String, u64> = BTreeMap::new();
            let mut seen: BTreeMap<(String, i64), u64> = BTreeMap::new();
            let hourly = |u: &Usage| {
                let mut out: BTreeMap<(String, i64), u64> = BTreeMap::new();
                for (t, s) in &u.spans {
                    *out.entry((t.clone(), s.start.div_euclid(HOUR) * HOUR)).or_default() += s.delta.energy_mj;
                }
                out
            };
            let chunk = entries.len().div_ceil(marks.len());
            for (i, (batch, mark)) in entries.chunks(chunk).zip(&marks).enumerate() {
                let list: Vec<(&str, &str, i64, u64)> = batch
                    .iter()
                    .map(|&(t, m, e)| (tenants[t], "n1", T0 + m * 60, e))
                    .collect();
                for &(t, _, _, e) in &list {
                    *want.entry(t.to_string()).or_default() += e;
                }
                l.commit_at(&minute_commit(&list), T0 + i as i64, T0 + mark * 60).unwrap();
                l.compact(&policy(T0 + mark * 60, T0 + mark * 60), &TenantHistory::new(Arc::new(Tenants::empty())))
                    .unwrap();
                let u = reader.usage(None, 0, T0 + DAY).unwrap();
                let now = hourly(&u);
                // Hours read final before read the same now.
                for (k, e) in &seen {
                    prop_assert_eq!(now.get(k).copied().unwrap_or(0), *e, "{:?}", k);
                }
                for t in tenants {
                    for h in (0..8).map(|h| T0 + h * HOUR) {
                        if h + HOUR <= u.finalized_through {
                            let e = now.get(&(t.to_string(), h)).copied().unwrap_or(0);
                            seen.entry((t.to_string(), h)).or_insert(e);
                        }
                    }
                }
                let mut got: BTreeMap<String, u64> = energy_by_tenant(&u);
                for a in &u.adjustments {
                    *got.entry(a.tenant.clone()).or_default() += a.delta.energy_mj;
                }
                got.retain(|_, e| *e > 0);
                let mut expect = want.clone();
                expect.retain(|_, e| *e > 0);
                prop_assert_eq!(got, expect);
            }
        }
    }
}
