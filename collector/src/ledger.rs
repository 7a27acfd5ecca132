//! The billing ledger: one SQLite file (WAL) holding, per tenant, node and
//! minute, the energy and GPU time counted, plus the cursors that make
//! counting exactly-once across crashes.
//!
//! *Invariant:* one transaction writes the bucket deltas of a set of
//! samples, every node's highest accepted (epoch, seq) and every GPU's last
//! counter reading. The collector acks a sample only after the transaction
//! holding it has committed, so after a crash at any moment the ledger and
//! the cursors agree: samples not committed were not acked and are re-sent;
//! samples committed are duplicates when re-sent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, params};

/// Schema migrations, applied in order; the index is the version reached.
const MIGRATIONS: &[&str] = &[
    // 1: cursors, minute buckets and tenant totals.
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
    // 2: coverage, estimated energy and contract overage.
    "ALTER TABLE usage_minute ADD COLUMN expected_gpu_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN estimated_mj INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN over_contract_ns INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage_minute ADD COLUMN overage_mj INTEGER NOT NULL DEFAULT 0;",
    // 3: usage queries read by time.
    "CREATE INDEX usage_minute_by_time ON usage_minute (minute_start, tenant);",
    // 4: over-contract time per tenant, so the counter survives restarts.
    "ALTER TABLE tenant_total ADD COLUMN over_contract_ns INTEGER NOT NULL DEFAULT 0;",
];

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
    #[error("ledger {path} is in use by another collector (lock file {lock})")]
    InUse { path: PathBuf, lock: PathBuf },
    #[error("ledger {path}: lock file: {error}")]
    Lock {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("ledger {path}: value out of range in {what}")]
    Range { path: PathBuf, what: &'static str },
}

/// A GPU's counting state, as committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCursor {
    pub node: Arc<str>,
    pub last_counter_mj: Option<u64>,
    pub last_timestamp_ns: Option<i64>,
    pub remainder_mw_ns: u64,
    pub energy_mj: u64,
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
    /// Time the tenant's power was above its contract.
    pub over_contract_ns: u64,
    /// Integral of max(0, power - contract).
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

/// Everything one transaction writes.
#[derive(Debug, Default)]
pub struct Commit {
    pub nodes: HashMap<Arc<str>, (u64, u64)>,
    pub gpus: HashMap<Arc<str>, GpuCursor>,
    pub buckets: HashMap<BucketKey, BucketDelta>,
    pub tenant_energy: HashMap<Arc<str>, u64>,
    pub tenant_over_contract_ns: HashMap<Arc<str>, u64>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.gpus.is_empty() && self.buckets.is_empty()
    }

    /// Folds a later commit into this one (used when a commit failed and
    /// is retried together with what arrived since).
    pub fn absorb(&mut self, later: Commit) {
        self.nodes.extend(later.nodes);
        self.gpus.extend(later.gpus);
        for (k, d) in later.buckets {
            self.buckets.entry(k).or_default().add(&d);
        }
        for (t, e) in later.tenant_energy {
            *self.tenant_energy.entry(t).or_default() += e;
        }
        for (t, ns) in later.tenant_over_contract_ns {
            *self.tenant_over_contract_ns.entry(t).or_default() += ns;
        }
    }
}

/// What the ledger holds at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<(String, u64, u64)>,
    pub gpus: Vec<(String, GpuCursor)>,
    pub tenant_energy: Vec<(String, u64)>,
    pub tenant_over_contract_ns: Vec<(String, u64)>,
}

pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    /// Held for the life of the ledger: one writer per file.
    _lock: std::fs::File,
}

/// Maps a SQLite error to a `LedgerError` naming the ledger file.
fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> LedgerError + Copy + '_ {
    move |error| LedgerError::Sqlite {
        path: path.to_owned(),
        error,
    }
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

impl Ledger {
    /// Opens (creating if needed) the ledger at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let err = sqlite_err(path);
        // Two collectors writing one ledger would each resume the same
        // cursors and count the same energy twice.
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|error| LedgerError::Lock {
                path: path.to_owned(),
                error,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::InUse {
                    path: path.to_owned(),
                    lock: lock_path,
                });
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(LedgerError::Lock {
                    path: path.to_owned(),
                    error,
                });
            }
        }
        let mut conn = Connection::open(path).map_err(err)?;
        // WAL: readers never block the committer. FULL: a committed
        // transaction survives power loss, not only a killed process.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if version as usize > MIGRATIONS.len() {
            return Err(LedgerError::TooNew {
                path: path.to_owned(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(sql).map_err(err)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(Self {
            conn,
            path: path.to_owned(),
            _lock: lock,
        })
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
        let rows = self.name_and_two_counts("SELECT node, epoch, last_seq FROM node_cursor")?;
        for (node, epoch, seq) in rows {
            snap.nodes.push((
                node,
                u64_of(epoch, p, "epoch")?,
                u64_of(seq, p, "last_seq")?,
            ));
        }
        let mut q = self
            .conn
            .prepare(
                "SELECT uuid, node, last_counter_mj, last_timestamp_ns, remainder_mw_ns, energy_mj FROM gpu_cursor",
            )
            .map_err(err)?;
        let rows = q
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(err)?;
        for row in rows {
            let (uuid, node, counter, ts, rem, energy) = row.map_err(err)?;
            snap.gpus.push((
                uuid,
                GpuCursor {
                    node: Arc::from(node),
                    last_counter_mj: counter
                        .map(|c| u64_of(c, p, "last_counter_mj"))
                        .transpose()?,
                    last_timestamp_ns: ts,
                    remainder_mw_ns: u64_of(rem, p, "remainder_mw_ns")?,
                    energy_mj: u64_of(energy, p, "energy_mj")?,
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

    /// Writes `c` in one transaction.
    pub fn commit(&mut self, c: &Commit) -> Result<(), LedgerError> {
        let p = self.path.clone();
        let err = sqlite_err(&p);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut node = tx
                .prepare_cached(
                    "INSERT INTO node_cursor (node, epoch, last_seq) VALUES (?1, ?2, ?3)
                     ON CONFLICT (node) DO UPDATE SET epoch = ?2, last_seq = ?3",
                )
                .map_err(err)?;
            for (id, (epoch, seq)) in &c.nodes {
                node.execute(params![
                    &**id,
                    i64_of(*epoch, &p, "epoch")?,
                    i64_of(*seq, &p, "last_seq")?
                ])
                .map_err(err)?;
            }
            let mut gpu = tx
                .prepare_cached(
                    "INSERT INTO gpu_cursor (uuid, node, last_counter_mj, last_timestamp_ns, remainder_mw_ns, energy_mj)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (uuid) DO UPDATE SET node = ?2, last_counter_mj = ?3,
                        last_timestamp_ns = ?4, remainder_mw_ns = ?5, energy_mj = ?6",
                )
                .map_err(err)?;
            for (uuid, g) in &c.gpus {
                let counter = g
                    .last_counter_mj
                    .map(|v| i64_of(v, &p, "counter"))
                    .transpose()?;
                gpu.execute(params![
                    &**uuid,
                    &*g.node,
                    counter,
                    g.last_timestamp_ns,
                    i64_of(g.remainder_mw_ns, &p, "remainder")?,
                    i64_of(g.energy_mj, &p, "energy")?
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
            for ((tenant, node, minute), d) in &c.buckets {
                let mut values: Vec<rusqlite::types::Value> = vec![
                    tenant.to_string().into(),
                    node.to_string().into(),
                    (*minute).into(),
                ];
                for (v, name) in d.values().into_iter().zip(BUCKET_COLUMNS) {
                    values.push(i64_of(v, &p, name)?.into());
                }
                bucket
                    .execute(rusqlite::params_from_iter(values))
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
            for (tenant, ns) in &c.tenant_over_contract_ns {
                over.execute(params![&**tenant, i64_of(*ns, &p, "over-contract time")?])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Sums of the minute buckets of `tenant` over all nodes and all time:
    /// a cross-check of `tenant_total` and of exactly-once sample counts.
    pub fn bucket_totals(&self, tenant: &str) -> Result<BucketDelta, LedgerError> {
        let p = &self.path;
        self.conn
            .query_row(
                &format!(
                    "SELECT {} FROM usage_minute WHERE tenant = ?1",
                    bucket_sums()
                ),
                [tenant],
                |r| BucketDelta::from_row(r, 0, p),
            )
            .map_err(sqlite_err(p))?
    }
}

/// A read-only view of the ledger, for the usage API and the `usage`
/// command. WAL lets it read while the collector commits.
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite_err(path))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sqlite_err(path))?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
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

/// Splits `amount` spread evenly over the interval `(from_ns, to_ns]`
/// across the minutes it overlaps, exactly: the parts are floors of the
/// time-proportional shares, and what the floors leave goes to the
/// minutes with the largest remainders. Returns (minute start in Unix
/// seconds, part) pairs in time order.
pub fn split_by_minute(amount: u64, from_ns: i64, to_ns: i64) -> Vec<(i64, u64)> {
    const MINUTE_NS: i64 = 60_000_000_000;
    if to_ns <= from_ns {
        // No interval: all of it lands in the minute of `to_ns`.
        return vec![(to_ns.div_euclid(MINUTE_NS) * 60, amount)];
    }
    let total = (to_ns - from_ns) as u128;
    let mut parts = Vec::new();
    let mut start = from_ns;
    while start < to_ns {
        let minute = start.div_euclid(MINUTE_NS);
        let end = ((minute + 1) * MINUTE_NS).min(to_ns);
        let share = u128::from(amount) * (end - start) as u128;
        parts.push((minute * 60, (share / total) as u64, share % total));
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        let mut l = Ledger::open(&path).unwrap();
        let mut c = Commit::default();
        c.nodes.insert(Arc::from("n1"), (7, 42));
        c.gpus.insert(
            Arc::from("GPU-1"),
            GpuCursor {
                node: Arc::from("n1"),
                last_counter_mj: Some(u64::MAX / 4),
                last_timestamp_ns: Some(-5),
                remainder_mw_ns: 999_999_999,
                energy_mj: 123,
            },
        );
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
        c.tenant_over_contract_ns.insert(Arc::from("t"), 5);
        l.commit(&c).unwrap();
        l.commit(&c).unwrap();
        drop(l);
        let l = Ledger::open(&path).unwrap();
        let snap = l.load().unwrap();
        assert_eq!(snap.nodes, vec![("n1".to_string(), 7, 42)]);
        assert_eq!(snap.gpus[0].1, c.gpus[&*Arc::<str>::from("GPU-1")]);
        assert_eq!(snap.tenant_energy, vec![("t".to_string(), 200)]);
        assert_eq!(snap.tenant_over_contract_ns, vec![("t".to_string(), 10)]);
        let sums = l.bucket_totals("t").unwrap();
        assert_eq!(sums.values(), [200, 10, 8, 2, 12, 14, 16, 18]);
        assert_eq!(
            (sums.energy_mj, sums.gpu_ns, sums.busy_gpu_ns, sums.samples),
            (200, 10, 8, 2)
        );
    }

    #[test]
    fn one_writer_per_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let first = Ledger::open(&path).unwrap();
        let err = Ledger::open(&path).err().unwrap().to_string();
        assert!(err.contains("in use by another collector"), "{err}");
        // Readers are not writers.
        Reader::open(&path).unwrap();
        drop(first);
        Ledger::open(&path).unwrap();
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
}
