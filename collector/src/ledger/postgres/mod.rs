//! The PostgreSQL ledger: one database that several collectors write at
//! once, each under its own holder id, and any number read. `mod.rs`
//! connects (a pool on a small runtime of the ledger's own), creates and
//! migrates; `write` commits, `claim` keeps node claims and the compaction
//! lease, `compact` rolls up and applies retention, `read` is the
//! [`PgReader`].
//!
//! The ledger traits are synchronous and are called from the committer's
//! thread, from `spawn_blocking` threads and from async start-up code: each
//! call is spawned on the ledger's own runtime and waited for with
//! `futures::executor::block_on` of its join handle, which parks the
//! calling thread whichever it is (never `Runtime::block_on` inside a
//! runtime).
//!
//! Connections come from a deadpool pool: each is verified (a round trip)
//! before it is handed out again, retired past `connection_max_age`, and
//! evicted at once on a connection error or SQLSTATE 25006 (a read-only
//! transaction: the server it reached is a standby, after a failover), so
//! that the next call connects again through the URL's hosts with
//! `target_session_attrs=read-write`. Every call has a deadline
//! (`connect_timeout` plus twice `statement_timeout`), getting its
//! connection included, which holds on a network that stalls without an
//! error; the server applies `statement_timeout` to each statement as
//! well, and ends a connection left idle in a transaction that long (a
//! collector cut off mid-commit), so that its row locks do not hold up
//! the other collectors.

mod claim;
mod compact;
mod meter;
mod read;
mod schema;
mod write;

#[cfg(test)]
mod tests;

pub use read::PgReader;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::{
    BUCKET_FIELDS, BucketDelta, Claim, Commit, Committed, Compacted, Compaction, CompactionLease,
    Identity, LedgerError, LedgerTotals, LedgerWriter, NodeCursor, Snapshot, TenantVersion,
};
use crate::tenants::TenantHistory;
use schema::{BOOTSTRAP, MIGRATIONS};

/// The summable bucket columns, in `BucketDelta::values` order (as the
/// SQLite ledger's).
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

/// `COALESCE(SUM(col), 0)::int8` for every bucket column, comma-separated.
fn bucket_sums(prefix: &str) -> String {
    BUCKET_COLUMNS
        .iter()
        .map(|c| format!("COALESCE(SUM({prefix}{c}), 0)::int8"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The ledger's revision: that of the last commit or allocation.
fn revision_of(shared: &Arc<Shared>) -> Result<u64, LedgerError> {
    let s = shared.clone();
    shared.call(move |client| async move {
        let r = async {
            let v: i64 = client
                .query_one("SELECT revision FROM watermark WHERE id = 1", &[])
                .await?
                .try_get(0)?;
            Ok(u64_of(&s, v, "revision")?)
        }
        .await;
        (client, r)
    })
}

/// How to reach the database and how the pool behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// `postgres://user@host1:5432,host2:5432/db?target_session_attrs=read-write`
    /// (or the key=value form).
    pub url: String,
    /// A file holding the password (trailing newline ignored), so that it
    /// is not in the URL.
    pub password_file: Option<PathBuf>,
    /// Most connections open at once.
    pub pool_size: usize,
    /// A connection older than this is closed instead of being reused.
    pub connection_max_age: Duration,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
}

impl PgSettings {
    /// `url` with the default pool settings.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password_file: None,
            pool_size: 4,
            connection_max_age: Duration::from_secs(30 * 60),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

/// What went wrong inside a call: PostgreSQL's error, or the ledger's own
/// (a value out of range, a fenced commit).
pub(super) enum Fail {
    Pg(tokio_postgres::Error),
    Ledger(LedgerError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl From<LedgerError> for Fail {
    fn from(e: LedgerError) -> Self {
        Fail::Ledger(e)
    }
}

/// The pool, the runtime it lives on, and the database's name for errors.
pub(super) struct Shared {
    pool: Pool,
    /// `user@host:port,host:port/db`: no password.
    database: String,
    /// The most one call may take, start to end.
    deadline: Duration,
    /// Connections opened (the first, and every reconnect since).
    opened: Arc<AtomicU64>,
    /// The most connections the pool has held at once: opening one while
    /// it holds fewer replaces one it lost (a reconnect).
    peak: Arc<AtomicUsize>,
    /// The most reconnects read so far: what `/metrics` shows never goes
    /// back.
    reconnects: AtomicU64,
    /// Connections evicted after a connection error or SQLSTATE 25006.
    evicted: AtomicU64,
    /// Dropped last, in the background: dropping a runtime from async
    /// code would panic.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `user@host:port,host:port/db` of `cfg`.
fn describe(cfg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            let ports = cfg.get_ports();
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        cfg.get_user().unwrap_or(""),
        hosts.join(","),
        cfg.get_dbname().unwrap_or("")
    )
}

impl Shared {
    pub(super) fn connect(settings: &PgSettings) -> Result<Arc<Self>, LedgerError> {
        let bad = |message: String| LedgerError::Postgres {
            database: "(ledger_url)".into(),
            sqlstate: None,
            message,
        };
        let mut cfg: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e| bad(format!("ledger_url is not a PostgreSQL URL: {e}")))?;
        if cfg.get_hosts().is_empty() {
            return Err(bad("ledger_url names no host".into()));
        }
        let database = describe(&cfg);
        if let Some(path) = &settings.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| LedgerError::Postgres {
                database: database.clone(),
                sqlstate: None,
                message: format!("reading ledger_password_file {}: {e}", path.display()),
            })?;
            cfg.password(text.trim_end_matches(['\n', '\r']));
        }
        // A transaction left open by a collector the network cut off
        // mid-commit holds its row locks (the watermark's, which every
        // commit takes first) for as long as the server keeps the
        // connection: a partition gives the server no error either. The
        // server ends a connection idle in a transaction that long, so the
        // other collectors' commits go through.
        let statement_ms = settings.statement_timeout.as_millis().max(1);
        // The server ends what a vanished or frozen collector left open:
        // a transaction idle past the statement timeout (it would
        // hold the watermark lock every commit takes first, and stop every
        // other collector's commits and claims), and a connection whose
        // peer stopped answering (keepalives, and unacknowledged data
        // after tcp_user_timeout).
        let ours = format!(
            "-c statement_timeout={statement_ms} -c idle_in_transaction_session_timeout={} \
             -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 \
             -c tcp_user_timeout={}",
            statement_ms,
            statement_ms * 2
        );
        let options = match cfg.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {ours}"),
            _ => ours,
        };
        cfg.options(&options)
            .connect_timeout(settings.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .application_name("capwatch-collector");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("capwatch-ledger")
            .build()
            .map_err(|e| bad(format!("starting the ledger's runtime: {e}")))?;
        let manager = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                // A round trip before a connection is handed out again: a
                // server restarted since closed it.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let max_age = settings.connection_max_age;
        let opened = Arc::new(AtomicU64::new(0));
        let count = opened.clone();
        let peak = Arc::new(AtomicUsize::new(0));
        let high = peak.clone();
        // The pool, for the hook that counts its size: set once built.
        let weak: Arc<std::sync::OnceLock<deadpool_postgres::WeakPool>> = Arc::default();
        let sized = weak.clone();
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(settings.connect_timeout))
            .wait_timeout(Some(settings.connect_timeout + settings.statement_timeout))
            .recycle_timeout(Some(settings.statement_timeout))
            .post_create(deadpool_postgres::Hook::sync_fn(move |_, _| {
                // The peak first, then the count (`PgPoolStats::reconnects`
                // reads them the other way round). The pool's size counts
                // this connection already.
                if let Some(pool) = sized.get().and_then(|w| w.upgrade()) {
                    high.fetch_max(pool.status().size, Ordering::SeqCst);
                }
                count.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }))
            .pre_recycle(deadpool_postgres::Hook::sync_fn(move |_, metrics| {
                if metrics.age() > max_age {
                    Err(deadpool_postgres::HookError::message(
                        "older than ledger_connection_max_age",
                    ))
                } else {
                    Ok(())
                }
            }))
            .build()
            .map_err(|e| bad(format!("building the connection pool: {e}")))?;
        let _ = weak.set(pool.weak());
        Ok(Arc::new(Self {
            pool,
            database,
            deadline: settings.connect_timeout + settings.statement_timeout * 2,
            opened,
            peak,
            reconnects: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            rt: Some(rt),
        }))
    }

    /// Runs `work` on the ledger's runtime with a pooled connection and
    /// waits for it, from any thread. A connection that failed (closed, or
    /// reached a read-only server) is evicted from the pool; a call past
    /// the deadline is abandoned (its transaction rolled back).
    pub(super) fn call<T, F, Fut>(self: &Arc<Self>, work: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = (deadpool_postgres::Object, Result<T, Fail>)> + Send,
    {
        let shared = self.clone();
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the ledger");
        let task = rt.spawn(async move {
            // The deadline covers getting the connection too: the pool
            // verifies each idle one in turn (a round trip, each within
            // the recycle timeout) before it connects anew, which on a
            // stalled network adds up to many times the deadline.
            let run = async {
                let client = shared.pool.get().await.map_err(|e| shared.pool_error(e))?;
                Ok(work(client).await)
            };
            match tokio::time::timeout(shared.deadline, run).await {
                Ok(Err(e)) => Err(e),
                Ok(Ok((_client, Ok(v)))) => Ok(v),
                Ok(Ok((client, Err(Fail::Ledger(e))))) => {
                    drop(client);
                    Err(e)
                }
                Ok(Ok((client, Err(Fail::Pg(e))))) => {
                    let evict = e.is_closed()
                        || e.code().is_none()
                        || e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
                        || e.code() == Some(&SqlState::ADMIN_SHUTDOWN);
                    if evict {
                        shared.evicted.fetch_add(1, Ordering::Relaxed);
                        drop(deadpool_postgres::Object::take(client));
                    }
                    Err(shared.pg_error(&e))
                }
                // Still waiting for a connection, or for the server: a
                // connection goes back to the pool with the dropped
                // future (its transaction rolled back); the pool verifies
                // it before handing it out again, within the recycle
                // timeout, and closes it where that fails.
                Err(_) => Err(LedgerError::Postgres {
                    database: shared.database.clone(),
                    sqlstate: None,
                    message: format!(
                        "no answer within {}",
                        humantime::format_duration(shared.deadline)
                    ),
                }),
            }
        });
        match futures::executor::block_on(task) {
            Ok(r) => r,
            Err(e) => Err(LedgerError::Postgres {
                database: self.database.clone(),
                sqlstate: None,
                message: format!("the ledger call did not finish: {e}"),
            }),
        }
    }

    fn pool_error(&self, e: deadpool_postgres::PoolError) -> LedgerError {
        match e {
            deadpool_postgres::PoolError::Backend(e) => self.pg_error(&e),
            other => LedgerError::Postgres {
                database: self.database.clone(),
                sqlstate: None,
                message: format!("no connection: {other}"),
            },
        }
    }

    pub(super) fn pg_error(&self, e: &tokio_postgres::Error) -> LedgerError {
        let message = match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => {
                // The source says what failed (refused, reset, timed out).
                let mut m = e.to_string();
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    m.push_str(&format!(": {s}"));
                    source = s.source();
                }
                m
            }
        };
        LedgerError::Postgres {
            database: self.database.clone(),
            sqlstate: e.code().map(|c| c.code().to_string()),
            message,
        }
    }

    fn range(&self, what: &'static str) -> LedgerError {
        LedgerError::PgRange {
            database: self.database.clone(),
            what,
        }
    }

    /// (idle, busy) connections of the pool.
    pub(super) fn pool_state(&self) -> (usize, usize) {
        let s = self.pool.status();
        (s.available, s.size.saturating_sub(s.available))
    }
}

/// `v` as a `BIGINT`, or the range error naming `what`.
fn i64_of(shared: &Shared, v: u64, what: &'static str) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| shared.range(what))
}

/// `values` as the BIGINT columns `names` store them, each checked to
/// fit (`i64_of`, naming its column).
fn i64s_of<const N: usize>(
    shared: &Shared,
    values: [u64; N],
    names: [&'static str; N],
) -> Result<[i64; N], LedgerError> {
    let mut out = [0i64; N];
    for ((slot, v), name) in out.iter_mut().zip(values).zip(names) {
        *slot = i64_of(shared, v, name)?;
    }
    Ok(out)
}

fn u64_of(shared: &Shared, v: i64, what: &'static str) -> Result<u64, LedgerError> {
    u64::try_from(v).map_err(|_| shared.range(what))
}

/// The bucket columns' `BIGINT`s starting at column `first` of `row`.
fn bucket_from_row(
    shared: &Shared,
    row: &tokio_postgres::Row,
    first: usize,
) -> Result<BucketDelta, Fail> {
    let mut v = [0u64; BUCKET_FIELDS];
    for (i, slot) in v.iter_mut().enumerate() {
        *slot = u64_of(shared, row.try_get::<_, i64>(first + i)?, BUCKET_COLUMNS[i])?;
    }
    Ok(BucketDelta::from_values(v))
}

/// A node's GPU and power source cursors as stored (`node_claim.gpus`: the
/// SQLite ledger's protobuf encoding).
fn encode_gpus(n: &NodeCursor) -> Vec<u8> {
    use prost::Message;
    super::sqlite::StoredGpus::of(n).encode_to_vec()
}

/// A node's cursor from its (epoch, last_seq, gpus) columns at `first`.
fn cursor_from_row(
    shared: &Shared,
    row: &tokio_postgres::Row,
    first: usize,
) -> Result<NodeCursor, Fail> {
    use prost::Message;
    let blob: &[u8] = row.try_get(first + 2)?;
    let stored =
        super::sqlite::StoredGpus::decode(blob).map_err(|_| shared.range("GPU cursors"))?;
    Ok(stored.into_cursor(
        u64_of(shared, row.try_get(first)?, "epoch")?,
        u64_of(shared, row.try_get(first + 1)?, "last_seq")?,
    ))
}

/// The version of the schema in the database; `None` where it has none
/// (a blank database, or one that is not a ledger).
async fn schema_version(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('ledger_schema') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let v: i32 = client
        .query_one("SELECT version FROM ledger_schema WHERE only_row = 1", &[])
        .await?
        .get(0);
    Ok(Some(i64::from(v)))
}

/// The pool figures of a [`PgLedger`] (`capwatch_collector_ledger_pool_*`).
#[derive(Clone)]
pub struct PgPoolStats(Arc<Shared>);

impl PgPoolStats {
    /// (idle, busy) connections.
    pub fn connections(&self) -> (usize, usize) {
        self.0.pool_state()
    }

    /// Connections opened since the start: the pool's first ones (up to
    /// its size, as calls overlap) and every reconnect after an eviction
    /// or a retirement by age.
    pub fn opened(&self) -> u64 {
        self.0.opened.load(Ordering::Relaxed)
    }

    /// Connections evicted (a connection error, SQLSTATE 25006).
    pub fn evicted(&self) -> u64 {
        self.0.evicted.load(Ordering::Relaxed)
    }

    /// Reconnects: connections opened to replace one the pool lost
    /// (evicted, failed its check before reuse, retired by age), i.e.
    /// every connection opened beyond the most the pool has held at once.
    /// Growing towards `ledger_pool_size` is not a reconnect.
    pub fn reconnects(&self) -> u64 {
        // The count before the peak: a connection opened in between is
        // seen in the peak and not the count, so this can only undercount
        // for a moment, never overcount.
        let opened = self.0.opened.load(Ordering::SeqCst);
        let peak = self.0.peak.load(Ordering::SeqCst) as u64;
        let now = opened.saturating_sub(peak);
        self.0.reconnects.fetch_max(now, Ordering::Relaxed).max(now)
    }
}

/// The PostgreSQL ledger's writer. Any number of them (in any number of
/// collectors) may write one database; fencing and the lease keep their
/// commits apart.
pub struct PgLedger {
    shared: Arc<Shared>,
    identity: Identity,
    /// Each holder's last commit id this writer saw written
    /// (`holder_commit`), read at the holder's first commit with an id.
    seen: std::collections::HashMap<String, Option<u64>>,
    /// Tests only: the next commit fails as if its answer were lost.
    #[cfg(test)]
    lose_next_reply: bool,
}

impl PgLedger {
    /// Connects to the ledger at `settings.url` and migrates its schema
    /// forward. A database without the schema is refused (run
    /// `init-ledger`), and so is one with a newer schema.
    pub fn open(settings: &PgSettings) -> Result<Self, LedgerError> {
        Self::open_shared(Shared::connect(settings)?)
    }

    /// Creates the ledger's schema in the (empty) database at
    /// `settings.url`; refused where a ledger is there already.
    pub fn create(settings: &PgSettings) -> Result<Self, LedgerError> {
        let shared = Shared::connect(settings)?;
        let database = shared.database.clone();
        shared.call(move |mut client| async move {
            let r = async {
                let tx = client.transaction().await?;
                if schema_version(&tx).await?.is_some() {
                    return Err(Fail::Ledger(LedgerError::PgExists { database }));
                }
                tx.batch_execute(BOOTSTRAP).await?;
                for m in MIGRATIONS {
                    tx.batch_execute(m).await?;
                }
                tx.execute(
                    "UPDATE ledger_schema SET version = $1",
                    &[&(MIGRATIONS.len() as i32)],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }
            .await;
            (client, r)
        })?;
        Self::open_shared(shared)
    }

    fn open_shared(shared: Arc<Shared>) -> Result<Self, LedgerError> {
        let database = shared.database.clone();
        let identity = shared.call(move |mut client| async move {
            let r = async {
                let known = MIGRATIONS.len();
                if schema_version(&client).await?.is_none() {
                    return Err(Fail::Ledger(LedgerError::PgNoLedger { database }));
                }
                let tx = client.transaction().await?;
                // Two collectors starting at once: the second waits here
                // and finds the schema migrated.
                tx.batch_execute("LOCK TABLE ledger_schema IN SHARE ROW EXCLUSIVE MODE")
                    .await?;
                let found: i32 = tx
                    .query_one("SELECT version FROM ledger_schema WHERE only_row = 1", &[])
                    .await?
                    .get(0);
                if found as usize > known || found < 0 {
                    return Err(Fail::Ledger(LedgerError::PgTooNew {
                        database,
                        found: i64::from(found),
                        known,
                    }));
                }
                for m in &MIGRATIONS[found as usize..] {
                    tx.batch_execute(m).await?;
                }
                tx.execute("UPDATE ledger_schema SET version = $1", &[&(known as i32)])
                    .await?;
                // A write before anything listens: a database that takes
                // no commit (a standby, a read-only role) is refused here.
                let row = tx
                    .query_one(
                        "UPDATE ledger_identity SET opened_at = ledger_now()
                         RETURNING ledger_id, created_at",
                        &[],
                    )
                    .await?;
                tx.commit().await?;
                Ok(Identity {
                    ledger_id: row.try_get(0)?,
                    created_at: row.try_get(1)?,
                })
            }
            .await;
            (client, r)
        })?;
        Ok(Self {
            shared,
            identity,
            seen: Default::default(),
            #[cfg(test)]
            lose_next_reply: false,
        })
    }

    /// A reader on this ledger's pool.
    pub fn reader(&self) -> PgReader {
        PgReader::on(self.shared.clone())
    }

    /// `user@host:port,.../db` (no password): how errors name the ledger.
    pub fn database(&self) -> &str {
        &self.shared.database
    }

    /// (idle, busy) connections of the pool.
    pub fn pool_connections(&self) -> (usize, usize) {
        self.shared.pool_state()
    }

    /// Connections opened so far (1 for a pool that never reconnected).
    pub fn connections_opened(&self) -> u64 {
        self.shared.opened.load(Ordering::Relaxed)
    }

    /// Connections evicted after a connection error or a read-only server
    /// (SQLSTATE 25006).
    pub fn connections_evicted(&self) -> u64 {
        self.shared.evicted.load(Ordering::Relaxed)
    }

    /// The pool's figures, readable while the ledger itself is locked by
    /// a commit (for `/metrics`).
    pub fn pool_stats(&self) -> PgPoolStats {
        PgPoolStats(self.shared.clone())
    }

    /// Reads the cursors and totals to resume from.
    pub fn load(&self) -> Result<Snapshot, LedgerError> {
        let shared = self.shared.clone();
        self.shared.call(move |client| async move {
            let r = async {
                let mut snap = Snapshot::default();
                for row in client
                    .query(
                        "SELECT node, epoch, last_seq, gpus FROM node_claim
                         WHERE gpus IS NOT NULL",
                        &[],
                    )
                    .await?
                {
                    snap.nodes
                        .push((row.try_get(0)?, cursor_from_row(&shared, &row, 1)?));
                }
                let totals = tenant_totals(&shared, &client).await?;
                snap.tenant_energy = totals.tenant_energy;
                snap.tenant_over_contract_ns = totals.tenant_over_contract_ns;
                snap.tenant_node_energy = totals.tenant_node_energy;
                Ok(snap)
            }
            .await;
            (client, r)
        })
    }

    /// Where the watermark stands.
    pub fn finalized_through(&self) -> Result<i64, LedgerError> {
        self.shared.call(move |client| async move {
            let r = async {
                Ok(client
                    .query_one("SELECT finalized_through FROM watermark WHERE id = 1", &[])
                    .await?
                    .try_get(0)?)
            }
            .await;
            (client, r)
        })
    }

    pub fn add_tenant_version(&mut self, v: &TenantVersion) -> Result<(), LedgerError> {
        let v = v.clone();
        self.shared.call(move |client| async move {
            let r = async {
                client
                    .execute(
                        "INSERT INTO tenant_version (effective_from_ns, loaded_at_ns, file)
                         VALUES ($1, $2, $3)",
                        &[&v.effective_from_ns, &v.loaded_at_ns, &v.file],
                    )
                    .await?;
                Ok(())
            }
            .await;
            (client, r)
        })
    }
}

/// From when data of `period` (60, 3600 or 86400 s) is kept: 0 until
/// retention first dropped some.
pub(super) async fn kept_from(
    tx: &tokio_postgres::Transaction<'_>,
    period: i64,
) -> Result<i64, tokio_postgres::Error> {
    Ok(tx
        .query_one(
            "SELECT COALESCE(MAX(kept_from), 0)::int8 FROM retention WHERE period = $1",
            &[&period],
        )
        .await?
        .get(0))
}

/// Every tenant's energy and over-contract totals.
async fn tenant_totals(
    shared: &Shared,
    client: &deadpool_postgres::Object,
) -> Result<LedgerTotals, Fail> {
    let mut totals = LedgerTotals::default();
    for row in client
        .query(
            "SELECT tenant, energy_mj, over_contract_ns, node_energy_mj FROM tenant_total",
            &[],
        )
        .await?
    {
        let t: String = row.try_get(0)?;
        totals
            .tenant_energy
            .push((t.clone(), u64_of(shared, row.try_get(1)?, "tenant energy")?));
        totals.tenant_over_contract_ns.push((
            t.clone(),
            u64_of(shared, row.try_get(2)?, "over-contract time")?,
        ));
        totals
            .tenant_node_energy
            .push((t, u64_of(shared, row.try_get(3)?, "tenant node energy")?));
    }
    Ok(totals)
}

/// Every tenant file version, in load order.
pub(super) fn tenant_versions(shared: &Arc<Shared>) -> Result<Vec<TenantVersion>, LedgerError> {
    shared.call(move |client| async move {
        let r = async {
            client
                .query(
                    "SELECT effective_from_ns, loaded_at_ns, file FROM tenant_version ORDER BY id",
                    &[],
                )
                .await?
                .iter()
                .map(|row| {
                    Ok(TenantVersion {
                        effective_from_ns: row.try_get(0)?,
                        loaded_at_ns: row.try_get(1)?,
                        file: row.try_get(2)?,
                    })
                })
                .collect()
        }
        .await;
        (client, r)
    })
}

impl LedgerWriter for PgLedger {
    fn identity(&self) -> &Identity {
        &self.identity
    }

    fn restore(&self) -> Result<Snapshot, LedgerError> {
        self.load()
    }

    fn claim_nodes(&mut self, holder: &str, nodes: &[&str]) -> Result<Vec<Claim>, LedgerError> {
        claim::claim_nodes(&self.shared, holder, nodes)
    }

    fn holders(&self, nodes: &[&str]) -> Result<Vec<Option<String>>, LedgerError> {
        claim::holders(&self.shared, nodes)
    }

    fn commit_as(
        &mut self,
        holder: &str,
        batch: &Commit,
        booked_at: i64,
        finalize_through: i64,
    ) -> Result<Committed, LedgerError> {
        let expected = match (batch.id, self.seen.get(holder)) {
            (None, _) => None,
            (Some(_), Some(seen)) => *seen,
            (Some(_), None) => write::settled_commit_id(&self.shared, holder)?,
        };
        let attempt = Arc::new(write::Attempt::default());
        #[cfg(test)]
        attempt
            .lose_reply
            .store(std::mem::take(&mut self.lose_next_reply), Ordering::SeqCst);
        let r = write::commit(
            &self.shared,
            holder,
            batch,
            booked_at,
            finalize_through,
            expected,
            attempt,
        );
        if let Some(id) = batch.id {
            match &r {
                Ok(_) => {
                    self.seen.insert(holder.to_string(), Some(id));
                }
                Err(_) => {
                    self.seen.insert(holder.to_string(), expected);
                }
            }
        }
        r
    }

    fn commit_written(&mut self, holder: &str, id: u64) -> Result<bool, LedgerError> {
        let last = write::settled_commit_id(&self.shared, holder)?;
        if last == Some(id) {
            self.seen.insert(holder.to_string(), last);
            return Ok(true);
        }
        Ok(false)
    }

    fn tenant_totals(&self) -> Result<LedgerTotals, LedgerError> {
        let shared = self.shared.clone();
        self.shared.call(move |client| async move {
            let r = tenant_totals(&shared, &client).await;
            (client, r)
        })
    }

    fn finalized_through(&self) -> Result<i64, LedgerError> {
        PgLedger::finalized_through(self)
    }

    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        tenant_versions(&self.shared)
    }

    fn add_tenant_version(&mut self, v: &TenantVersion) -> Result<(), LedgerError> {
        PgLedger::add_tenant_version(self, v)
    }

    /// The lease's expiry is the database's clock plus `ttl`; `now` is not
    /// used (collectors' clocks may disagree).
    fn acquire_compaction(
        &mut self,
        holder: &str,
        _now: i64,
        ttl: Duration,
    ) -> Result<CompactionLease, LedgerError> {
        claim::acquire_compaction(&self.shared, holder, ttl)
    }

    /// The lease is checked against the database's clock; `now` is used
    /// for nothing else here (the policy carries its own times).
    fn compact_under(
        &mut self,
        lease: &CompactionLease,
        _now: i64,
        policy: &Compaction,
        contracts: &TenantHistory,
    ) -> Result<Compacted, LedgerError> {
        compact::compact(&self.shared, Some(lease), policy, contracts)
    }

    fn release_compaction(&mut self, lease: &CompactionLease) -> Result<(), LedgerError> {
        claim::release_compaction(&self.shared, lease)
    }

    fn meter_state(&self, m: &str) -> Result<Option<crate::ledger::MeterState>, LedgerError> {
        meter::meter_state(&self.shared, m)
    }

    fn node_minutes(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        meter::node_minutes(&self.shared, from, to)
    }

    fn allocate_meter_again(
        &mut self,
        m: &str,
        from: Option<&crate::ledger::MeterState>,
        to: &crate::ledger::MeterState,
        minutes: &[crate::ledger::MeterMinute],
        again: &[crate::ledger::MeterResplit],
    ) -> Result<bool, LedgerError> {
        meter::allocate_meter(&self.shared, m, from, to, minutes, again)
    }
}
