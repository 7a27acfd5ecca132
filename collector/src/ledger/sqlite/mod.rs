//! The SQLite ledger: one file (WAL), one writer process (a flock on the
//! file), any number of readers. `mod.rs` opens, creates, recovers and
//! locks it; `schema` migrates it, `write` commits, `read` is the
//! [`Reader`], `compact` rolls up and applies retention, `claim` keeps
//! node claims and the compaction lease, `marker` the `.last-commit`
//! file.

mod backup;
mod claim;
mod compact;
mod marker;
mod meter;
mod read;
mod schema;
mod verify;
mod write;

#[cfg(test)]
mod tests;

pub use backup::{Copied, backup, backup_into, restore};
pub use read::Reader;
pub(in crate::ledger) use schema::StoredGpus;
pub use verify::{Difference, Verification, verify};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;
use rusqlite::{Connection, params};

use super::{
    BUCKET_FIELDS, BucketDelta, Claim, Commit, Committed, Compacted, Compaction, CompactionLease,
    Identity, LedgerError, LedgerTotals, LedgerWriter, NodeCursor, Snapshot, TenantVersion,
};
use crate::tenants::TenantHistory;
use marker::{MARKER_SUFFIX, Marker, read_marker};
use schema::{MIGRATIONS, Migration, new_ledger_id};

/// The holder this process writes as: with SQLite one process holds the
/// file (the flock), so every collector that opens it in turn is the same
/// holder, and a restart keeps its nodes' generations.
pub const LOCAL_HOLDER: &str = "local";

/// Most KiB the committer's SQLite page cache may hold.
const CACHE_KIB: i64 = 64 * 1024;

/// The summable columns of `usage_minute`, in `BucketDelta::values` order.
const BUCKET_COLUMNS: [&str; BUCKET_FIELDS] = [
    "energy_mj",
    "gpu_ns",
    "busy_gpu_ns",
    "samples",
    "expected_gpu_ns",
    "estimated_mj",
    "over_contract_ns",
    "overage_mj",
    "node_energy_mj",
    "node_estimated_mj",
    "node_ns",
    "busy_unknown_gpu_ns",
];

/// `SUM(col)` for every bucket column, comma-separated.
fn bucket_sums() -> String {
    BUCKET_COLUMNS
        .iter()
        .map(|c| format!("COALESCE(SUM({c}), 0)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads the summed bucket columns starting at column `first`.
fn bucket_from_row(
    r: &rusqlite::Row<'_>,
    first: usize,
    path: &Path,
) -> rusqlite::Result<Result<BucketDelta, LedgerError>> {
    let mut v = [0u64; BUCKET_FIELDS];
    for (i, slot) in v.iter_mut().enumerate() {
        match u64_of(r.get::<_, i64>(first + i)?, path, BUCKET_COLUMNS[i]) {
            Ok(x) => *slot = x,
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(BucketDelta::from_values(v)))
}

/// The SQLite ledger's writer: the only one of its file while it lives.
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
    /// Every node's claim, (holder, generation), as in `node_claim`: with
    /// the file locked to this process nothing else writes it, so a
    /// commit checks its nodes here rather than reading a row per node.
    /// Changed only after the transaction that wrote the table committed.
    claims: claim::Claims,
    /// Each holder's last commit id this writer saw written
    /// (`holder_commit`), read at the holder's first commit with an id.
    seen: HashMap<String, Option<u64>>,
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
pub(super) fn watermark(conn: &Connection, path: &Path) -> Result<(u64, i64), LedgerError> {
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

/// `values` as the INTEGER columns `names` store them, each checked to
/// fit (`i64_of`, naming its column).
fn i64s_of<const N: usize>(
    values: [u64; N],
    names: [&'static str; N],
    path: &Path,
) -> Result<[i64; N], LedgerError> {
    let mut out = [0i64; N];
    for ((slot, v), name) in out.iter_mut().zip(values).zip(names) {
        *slot = i64_of(v, path, name)?;
    }
    Ok(out)
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
        let claims = claim::load_claims(&conn, path)?;
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
            claims,
            seen: HashMap::new(),
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
            snap.nodes.push((node, cursor_from_row(r, 1, p)?));
        }
        let totals = self.tenant_totals()?;
        snap.tenant_energy = totals.tenant_energy;
        snap.tenant_over_contract_ns = totals.tenant_over_contract_ns;
        snap.tenant_node_energy = totals.tenant_node_energy;
        Ok(snap)
    }

    /// Every tenant's totals (`LedgerWriter::tenant_totals`).
    pub fn tenant_totals(&self) -> Result<LedgerTotals, LedgerError> {
        let p = &self.path;
        let mut totals = LedgerTotals::default();
        let err = sqlite_err(p);
        let mut q = self
            .conn
            .prepare("SELECT tenant, energy_mj, over_contract_ns, node_energy_mj FROM tenant_total")
            .map_err(err)?;
        let rows = q
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(err)?;
        for row in rows {
            let (t, e, over, node) = row.map_err(err)?;
            totals
                .tenant_energy
                .push((t.clone(), u64_of(e, p, "tenant energy")?));
            totals
                .tenant_over_contract_ns
                .push((t.clone(), u64_of(over, p, "over-contract time")?));
            totals
                .tenant_node_energy
                .push((t, u64_of(node, p, "tenant node energy")?));
        }
        Ok(totals)
    }
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

/// A node's cursor from the (epoch, last_seq, gpus) columns of
/// `node_cursor` starting at column `first`.
fn cursor_from_row(
    r: &rusqlite::Row<'_>,
    first: usize,
    p: &Path,
) -> Result<NodeCursor, LedgerError> {
    let err = sqlite_err(p);
    let stored = StoredGpus::decode(
        r.get_ref(first + 2)
            .map_err(err)?
            .as_blob()
            .map_err(|e| err(e.into()))?,
    )
    .map_err(|_| LedgerError::Range {
        path: p.to_owned(),
        what: "GPU cursors",
    })?;
    Ok(stored.into_cursor(
        u64_of(r.get(first).map_err(err)?, p, "epoch")?,
        u64_of(r.get(first + 1).map_err(err)?, p, "last_seq")?,
    ))
}

impl LedgerWriter for Ledger {
    fn identity(&self) -> &Identity {
        Ledger::identity(self)
    }

    fn restore(&self) -> Result<Snapshot, LedgerError> {
        self.load()
    }

    fn tenant_totals(&self) -> Result<LedgerTotals, LedgerError> {
        Ledger::tenant_totals(self)
    }

    fn claim_nodes(&mut self, holder: &str, nodes: &[&str]) -> Result<Vec<Claim>, LedgerError> {
        Ledger::claim_nodes(self, holder, nodes)
    }

    fn holders(&self, nodes: &[&str]) -> Result<Vec<Option<String>>, LedgerError> {
        Ledger::holders(self, nodes)
    }

    fn commit_as(
        &mut self,
        holder: &str,
        batch: &Commit,
        booked_at: i64,
        finalize_through: i64,
    ) -> Result<Committed, LedgerError> {
        Ledger::commit_as(self, holder, batch, booked_at, finalize_through)
    }

    fn commit_written(&mut self, holder: &str, id: u64) -> Result<bool, LedgerError> {
        Ledger::commit_written(self, holder, id)
    }

    fn finalized_through(&self) -> Result<i64, LedgerError> {
        Ledger::finalized_through(self)
    }

    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        Ledger::tenant_versions(self)
    }

    fn add_tenant_version(&mut self, v: &TenantVersion) -> Result<(), LedgerError> {
        Ledger::add_tenant_version(self, v)
    }

    fn acquire_compaction(
        &mut self,
        holder: &str,
        now: i64,
        ttl: std::time::Duration,
    ) -> Result<CompactionLease, LedgerError> {
        Ledger::acquire_compaction(self, holder, now, ttl)
    }

    fn compact_under(
        &mut self,
        lease: &CompactionLease,
        now: i64,
        policy: &Compaction,
        contracts: &TenantHistory,
    ) -> Result<Compacted, LedgerError> {
        self.compact_checked(Some((lease, now)), policy, contracts)
    }

    fn release_compaction(&mut self, lease: &CompactionLease) -> Result<(), LedgerError> {
        Ledger::release_compaction(self, lease)
    }

    fn meter_state(&self, meter: &str) -> Result<Option<crate::ledger::MeterState>, LedgerError> {
        Ledger::meter_state(self, meter)
    }

    fn node_minutes(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        Ledger::node_minutes(self, from, to)
    }

    fn allocate_meter_again(
        &mut self,
        meter: &str,
        from: Option<&crate::ledger::MeterState>,
        to: &crate::ledger::MeterState,
        minutes: &[crate::ledger::MeterMinute],
        again: &[crate::ledger::MeterResplit],
    ) -> Result<bool, LedgerError> {
        Ledger::allocate_meter_again(self, meter, from, to, minutes, again)
    }
}
