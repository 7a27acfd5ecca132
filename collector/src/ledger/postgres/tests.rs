//! The PostgreSQL ledger against a real server of the tests' own: the
//! conformance suite (one server per test binary, a fresh database per
//! test), and what only PostgreSQL has: schema versions in the database,
//! several handles on one database, restarts, failover.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use capwatch_testkit::pg::PgServer;

use super::{PgLedger, PgReader, PgSettings};
use crate::ledger::LedgerTotals;
use crate::ledger::conformance::{Fresh, conformance_tests};
use crate::ledger::{
    BucketDelta, Claim, Commit, Committed, Compacted, Compaction, CompactionLease, GpuCursor,
    Identity, LedgerError, LedgerReader, LedgerWriter, NodeCursor, Snapshot, TenantVersion,
};
use crate::tenants::TenantHistory;

const MINUTE: i64 = 1_800_000_000;

/// The server this test binary shares.
fn server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}

/// A new, empty database on the shared server; its URL.
fn fresh_database(server: &PgServer) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    server.create_database(&name)
}

fn settings(url: &str) -> PgSettings {
    PgSettings {
        connect_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(5),
        ..PgSettings::new(url)
    }
}

/// The database name at the end of `url`.
fn db_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// The ledger with its lease clock driven by the caller's `now`, as the
/// conformance suite drives it: the database's clock (`ledger_now()`) is
/// replaced by a table that each lease call first sets to `now`. The
/// ledger itself reads only the database's clock.
struct Clocked {
    ledger: PgLedger,
    db: String,
}

impl Clocked {
    fn set_clock(&self, now: i64) {
        server().psql(&self.db, &format!("UPDATE test_clock SET t = {now}"));
    }
}

impl LedgerWriter for Clocked {
    fn identity(&self) -> &Identity {
        self.ledger.identity()
    }
    fn restore(&self) -> Result<Snapshot, LedgerError> {
        self.ledger.restore()
    }
    fn claim_nodes(&mut self, holder: &str, nodes: &[&str]) -> Result<Vec<Claim>, LedgerError> {
        self.ledger.claim_nodes(holder, nodes)
    }
    fn holders(&self, nodes: &[&str]) -> Result<Vec<Option<String>>, LedgerError> {
        self.ledger.holders(nodes)
    }
    fn commit_as(
        &mut self,
        holder: &str,
        batch: &Commit,
        booked_at: i64,
        finalize_through: i64,
    ) -> Result<Committed, LedgerError> {
        self.ledger
            .commit_as(holder, batch, booked_at, finalize_through)
    }
    fn commit_written(&mut self, holder: &str, id: u64) -> Result<bool, LedgerError> {
        self.ledger.commit_written(holder, id)
    }
    fn tenant_totals(&self) -> Result<LedgerTotals, LedgerError> {
        self.ledger.tenant_totals()
    }
    fn finalized_through(&self) -> Result<i64, LedgerError> {
        LedgerWriter::finalized_through(&self.ledger)
    }
    fn tenant_versions(&self) -> Result<Vec<TenantVersion>, LedgerError> {
        LedgerWriter::tenant_versions(&self.ledger)
    }
    fn add_tenant_version(&mut self, v: &TenantVersion) -> Result<(), LedgerError> {
        LedgerWriter::add_tenant_version(&mut self.ledger, v)
    }
    fn acquire_compaction(
        &mut self,
        holder: &str,
        now: i64,
        ttl: Duration,
    ) -> Result<CompactionLease, LedgerError> {
        self.set_clock(now);
        // The caller's time is not passed on: the database's clock decides.
        self.ledger.acquire_compaction(holder, i64::MIN, ttl)
    }
    fn compact_under(
        &mut self,
        lease: &CompactionLease,
        now: i64,
        policy: &Compaction,
        contracts: &TenantHistory,
    ) -> Result<Compacted, LedgerError> {
        self.set_clock(now);
        self.ledger
            .compact_under(lease, i64::MIN, policy, contracts)
    }
    fn release_compaction(&mut self, lease: &CompactionLease) -> Result<(), LedgerError> {
        self.ledger.release_compaction(lease)
    }
    fn meter_state(&self, m: &str) -> Result<Option<crate::ledger::MeterState>, LedgerError> {
        self.ledger.meter_state(m)
    }
    fn node_minutes(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<crate::ledger::NodeMinute>, LedgerError> {
        self.ledger.node_minutes(from, to)
    }
    fn allocate_meter_again(
        &mut self,
        m: &str,
        from: Option<&crate::ledger::MeterState>,
        to: &crate::ledger::MeterState,
        minutes: &[crate::ledger::MeterMinute],
        again: &[crate::ledger::MeterResplit],
    ) -> Result<bool, LedgerError> {
        self.ledger
            .allocate_meter_again(m, from, to, minutes, again)
    }
}

fn fresh() -> Fresh<Clocked, PgReader> {
    let url = fresh_database(server());
    let ledger = PgLedger::create(&settings(&url)).unwrap();
    let db = db_of(&url).to_string();
    server().psql(
        &db,
        "CREATE TABLE test_clock (t BIGINT NOT NULL); INSERT INTO test_clock VALUES (0);
         CREATE OR REPLACE FUNCTION ledger_now() RETURNS BIGINT LANGUAGE sql STABLE
            AS 'SELECT t FROM test_clock'",
    );
    let reader = PgReader::open(&settings(&url)).unwrap();
    Fresh {
        writer: Clocked { ledger, db },
        reader,
        _keep: Box::new(()),
    }
}

mod conformance {
    use super::fresh;

    super::conformance_tests!(fresh);
}

fn cursor(seq: u64) -> NodeCursor {
    NodeCursor {
        stretch: Vec::new(),
        power: Vec::new(),
        epoch: 1,
        last_seq: seq,
        gpus: vec![(
            Arc::from("GPU-1"),
            GpuCursor {
                changed_ns: None,
                last_counter_mj: Some(seq * 1000),
                last_timestamp_ns: Some(1),
                remainder_mw_ns: 0,
                energy_mj: seq * 1000,
                counter_resets: 0,
            },
        )],
    }
}

/// `node`'s cursor at `seq` and `energy` mJ for tenant lab-a in `minute`.
fn booking(node: &str, seq: u64, minute: i64, energy: u64) -> Commit {
    let mut c = Commit::default();
    c.nodes.insert(Arc::from(node), cursor(seq));
    c.buckets.insert(
        (Arc::from("lab-a"), Arc::from(node), minute),
        BucketDelta {
            energy_mj: energy,
            samples: 1,
            ..BucketDelta::default()
        },
    );
    c.tenant_energy.insert(Arc::from("lab-a"), energy);
    c
}

fn energy(r: &PgReader) -> u64 {
    r.minutes(None, 0, i64::MAX)
        .unwrap()
        .iter()
        .map(|(_, _, d)| d.energy_mj)
        .sum()
}

/// A database whose schema is newer than this collector's is refused by
/// the writer and the reader, naming the database; nothing is changed.
#[test]
fn a_newer_schema_is_refused() {
    let url = fresh_database(server());
    drop(PgLedger::create(&settings(&url)).unwrap());
    server().psql(db_of(&url), "UPDATE ledger_schema SET version = 99");
    for e in [
        PgLedger::open(&settings(&url)).err().unwrap(),
        PgReader::open(&settings(&url)).err().unwrap(),
    ] {
        assert!(
            matches!(e, LedgerError::PgTooNew { found: 99, .. }),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains(db_of(&url)) && text.contains(&server().port().to_string()),
            "{text}"
        );
    }
    assert_eq!(
        server().psql(db_of(&url), "SELECT version FROM ledger_schema"),
        "99"
    );
}

/// A blank database is not taken for a new ledger: opening it says to run
/// init-ledger and creates nothing; init-ledger on a ledger is refused.
#[test]
fn a_blank_database_is_refused_and_init_twice_too() {
    let url = fresh_database(server());
    let e = PgLedger::open(&settings(&url)).err().unwrap();
    assert!(matches!(e, LedgerError::PgNoLedger { .. }), "{e:?}");
    assert!(e.to_string().contains("init-ledger"), "{e}");
    assert!(matches!(
        PgReader::open(&settings(&url)),
        Err(LedgerError::PgNoLedger { .. })
    ));
    assert_eq!(
        server().psql(
            db_of(&url),
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );
    let first = PgLedger::create(&settings(&url)).unwrap();
    assert!(matches!(
        PgLedger::create(&settings(&url)),
        Err(LedgerError::PgExists { .. })
    ));
    // The identity is the database's: every handle sees the same.
    let again = PgLedger::open(&settings(&url)).unwrap();
    assert_eq!(first.identity(), again.identity());
}

/// Two collectors (two handles, two holders) on one database: the node
/// passes to the one that claimed it last, the other's commit is refused
/// with the current holder and writes nothing.
#[test]
fn two_handles_on_one_database_are_fenced() {
    let url = fresh_database(server());
    let mut a = PgLedger::create(&settings(&url)).unwrap();
    let mut b = PgLedger::open(&settings(&url)).unwrap();
    let r = b.reader();
    a.claim("a/1", "n1").unwrap();
    a.commit_as("a/1", &booking("n1", 1, MINUTE, 1_000), MINUTE, 0)
        .unwrap();
    let taken = b.claim("b/1", "n1").unwrap();
    assert_eq!(taken.cursor, Some(cursor(1)));
    match a.commit_as("a/1", &booking("n1", 2, MINUTE, 500), MINUTE, 0) {
        Err(LedgerError::Fenced {
            node,
            holder,
            generation,
            ..
        }) => assert_eq!(
            (node.as_str(), holder.as_str(), generation),
            ("n1", "b/1", taken.generation)
        ),
        other => panic!("the loser committed: {other:?}"),
    }
    assert_eq!(energy(&r), 1_000, "the fenced commit wrote");
    assert_eq!(r.usage(None, 0, i64::MAX).unwrap().revision, 1);
    b.commit_as("b/1", &booking("n1", 2, MINUTE, 500), MINUTE, 0)
        .unwrap();
    assert_eq!(energy(&r), 1_500);
    assert_eq!(a.restore().unwrap().nodes, vec![("n1".into(), cursor(2))]);
}

/// A claim by another holder that commits while a commit waits for the
/// node's row lock fences that commit: the conditional write sees the new
/// holder once the lock is granted, and the whole commit is rolled back
/// (its other node's cursor and its minutes are not written either).
#[test]
fn a_claim_that_lands_while_a_commit_waits_for_the_row_fences_it() {
    let url = fresh_database(server());
    let mut a = PgLedger::create(&settings(&url)).unwrap();
    let r = a.reader();
    a.claim_nodes("a/1", &["n1", "n2"]).unwrap();
    let both = |seq: u64| {
        let mut c = booking("n1", seq, MINUTE, 100);
        c.absorb(booking("n2", seq, MINUTE, 100));
        c
    };
    a.commit_as("a/1", &both(1), MINUTE, 0).unwrap();

    // Another collector's claim of n2, its transaction still open.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut claimer, conn) = rt
        .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
        .unwrap();
    rt.spawn(conn);
    let tx = rt.block_on(claimer.transaction()).unwrap();
    rt.block_on(tx.batch_execute(
        "UPDATE node_claim SET holder = 'b/1', generation = generation + 1 WHERE node = 'n2'",
    ))
    .unwrap();

    let committing = std::thread::spawn(move || a.commit_as("a/1", &both(2), MINUTE, 0));
    let db = db_of(&url).to_string();
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND wait_event_type = 'Lock'"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while server().psql(&db, &waiting) != "1" {
        assert!(
            Instant::now() < deadline,
            "the commit never waited for the row"
        );
        assert!(
            !committing.is_finished(),
            "the commit did not wait for the claim"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    rt.block_on(tx.commit()).unwrap();

    match committing.join().unwrap() {
        Err(LedgerError::Fenced { node, holder, .. }) => {
            assert_eq!((node.as_str(), holder.as_str()), ("n2", "b/1"))
        }
        other => panic!("the commit was not fenced: {other:?}"),
    }
    assert_eq!(energy(&r), 200, "the fenced commit wrote minutes");
    assert_eq!(
        server().psql(&db, "SELECT node, last_seq FROM node_claim ORDER BY node"),
        "n1|1\nn2|1",
        "the fenced commit wrote a cursor"
    );
}

/// Two handles committing different nodes at once, from threads: every
/// commit lands, each with its own revision, and the totals add up.
#[test]
fn concurrent_commits_from_two_holders_all_count() {
    let url = fresh_database(server());
    let a = PgLedger::create(&settings(&url)).unwrap();
    let b = PgLedger::open(&settings(&url)).unwrap();
    let r = a.reader();
    let run = |mut l: PgLedger, holder: &'static str, node: &'static str| {
        std::thread::spawn(move || {
            for seq in 1..=20 {
                l.commit_as(holder, &booking(node, seq, MINUTE, 7), MINUTE, 0)
                    .unwrap();
            }
        })
    };
    let (ta, tb) = (run(a, "a/1", "n1"), run(b, "b/1", "n2"));
    ta.join().unwrap();
    tb.join().unwrap();
    assert_eq!(energy(&r), 2 * 20 * 7);
    assert_eq!(r.usage(None, 0, i64::MAX).unwrap().revision, 40);
}

/// The lease runs on the database's clock: its expiry is the database's
/// now plus the ttl whatever the caller says, and a caller whose clock
/// runs far ahead cannot take a lease that has not expired.
#[test]
fn the_lease_runs_on_the_database_clock() {
    let url = fresh_database(server());
    let mut a = PgLedger::create(&settings(&url)).unwrap();
    let mut b = PgLedger::open(&settings(&url)).unwrap();
    let wall = crate::sync::now_unix();
    let lease = a
        .acquire_compaction("a/1", 0, Duration::from_secs(60))
        .unwrap();
    assert!(
        (wall + 55..=wall + 65).contains(&lease.expires_at),
        "{lease:?} at {wall}"
    );
    assert!(matches!(
        b.acquire_compaction("b/1", wall + 86_400, Duration::from_secs(60)),
        Err(LedgerError::LeaseHeld { .. })
    ));
    let policy = Compaction {
        closed_before: 0,
        minutes_from: 0,
        hours_from: 0,
        days_from: None,
        allocating_from: None,
    };
    let contracts = TenantHistory::new(Arc::new(crate::tenants::Tenants::empty()));
    // A caller's clock far ahead does not expire it either.
    a.compact_under(&lease, wall + 86_400, &policy, &contracts)
        .unwrap();
}

/// A commit while the server is down fails within the deadline (no hang);
/// once the server is back the next commit succeeds on a new connection.
#[test]
fn the_pool_survives_a_server_restart() {
    let server = PgServer::start();
    let s = PgSettings {
        connect_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(2),
        ..PgSettings::new(server.url())
    };
    let mut l = PgLedger::create(&s).unwrap();
    l.commit_as("a/1", &booking("n1", 1, MINUTE, 10), MINUTE, 0)
        .unwrap();
    let stats = l.pool_stats();
    // Opening the pool's connections is not reconnecting.
    assert_eq!(stats.reconnects(), 0, "opened {}", stats.opened());
    server.stop();
    let started = Instant::now();
    let e = l
        .commit_as("a/1", &booking("n1", 2, MINUTE, 20), MINUTE, 0)
        .expect_err("a commit with the server down");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the failed commit took {:?}",
        started.elapsed()
    );
    assert!(matches!(e, LedgerError::Postgres { .. }), "{e:?}");
    assert!(e.to_string().contains(&server.port().to_string()), "{e}");
    server.start_again();
    l.commit_as("a/1", &booking("n1", 2, MINUTE, 20), MINUTE, 0)
        .unwrap();
    assert_eq!(energy(&l.reader()), 30);
    assert!(l.connections_opened() >= 2, "no reconnect");
    assert!(stats.reconnects() >= 1, "opened {}", stats.opened());
    let (idle, busy) = stats.connections();
    assert!(idle >= 1 && busy == 0, "idle {idle}, busy {busy}");
}

/// A pooled connection that finds its server read-only (SQLSTATE 25006)
/// is evicted, so the next call connects again instead of failing on it
/// for ever.
#[test]
fn a_connection_to_a_read_only_server_is_evicted() {
    let server = PgServer::start();
    let s = settings(&server.url());
    let mut l = PgLedger::create(&s).unwrap();
    l.commit_as("a/1", &booking("n1", 1, MINUTE, 10), MINUTE, 0)
        .unwrap();
    let opened = l.connections_opened();
    server.psql(
        "postgres",
        "ALTER SYSTEM SET default_transaction_read_only = on",
    );
    server.psql("postgres", "SELECT pg_reload_conf()");
    // The reload reaches the open connection once it is between statements.
    let deadline = Instant::now() + Duration::from_secs(20);
    let e = loop {
        match l.commit_as("a/1", &booking("n1", 2, MINUTE, 20), MINUTE, 0) {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the server never turned read-only"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    match &e {
        LedgerError::Postgres { sqlstate, .. } => assert_eq!(sqlstate.as_deref(), Some("25006")),
        other => panic!("{other:?}"),
    }
    assert!(l.connections_evicted() >= 1);
    server.psql(
        "postgres",
        "ALTER SYSTEM RESET default_transaction_read_only",
    );
    server.psql("postgres", "SELECT pg_reload_conf()");
    let deadline = Instant::now() + Duration::from_secs(20);
    while l
        .commit_as("a/1", &booking("n1", 3, MINUTE, 30), MINUTE, 0)
        .is_err()
    {
        assert!(Instant::now() < deadline, "never writable again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        l.connections_opened() > opened,
        "the read-only connection was kept"
    );
}

/// The primary killed and its standby promoted: the ledger, on a
/// multi-host URL with target_session_attrs=read-write, fails while there
/// is no primary and then commits on the new one, with everything the old
/// primary had committed (and the standby had received).
#[test]
fn failover_to_a_promoted_standby() {
    let primary = PgServer::start();
    let standby = primary.standby();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/capwatch?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let s = PgSettings {
        connect_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(2),
        ..PgSettings::new(&url)
    };
    let mut l = PgLedger::create(&s).unwrap();
    l.commit_as("a/1", &booking("n1", 1, MINUTE, 10), MINUTE, 0)
        .unwrap();
    // Replication is asynchronous: wait until the standby has it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while standby
        .try_psql("capwatch", "SELECT revision FROM watermark")
        .as_deref()
        != Ok("1")
    {
        assert!(Instant::now() < deadline, "the standby never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
    primary.kill();
    assert!(
        l.commit_as("a/1", &booking("n1", 2, MINUTE, 20), MINUTE, 0)
            .is_err(),
        "committed with no primary"
    );
    standby.promote();
    l.commit_as("a/1", &booking("n1", 2, MINUTE, 20), MINUTE, 0)
        .unwrap();
    assert_eq!(energy(&l.reader()), 30);
    assert_eq!(
        standby.psql("capwatch", "SELECT revision FROM watermark"),
        "2"
    );
}

/// The same commits, late deltas, watermark moves and compactions on
/// SQLite and on PostgreSQL read back the same: usage (minutes, rollups,
/// peaks, over-contract), adjustments since a revision, cursors and
/// totals, and what each commit and compaction reported.
#[test]
fn the_same_history_reads_the_same_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let mut lite = crate::ledger::Ledger::create(&dir.path().join("l.db")).unwrap();
    let lite_r = crate::ledger::Reader::open(&dir.path().join("l.db")).unwrap();
    let url = fresh_database(server());
    let mut pg = PgLedger::create(&settings(&url)).unwrap();
    let pg_r = pg.reader();
    let contracts = Arc::new(TenantHistory::new(Arc::new(
        crate::tenants::Tenants::from_toml(
            "[[tenant]]\nid = \"a\"\ncontracted_kw = 1\nnodes = [\"n1\", \"n2\"]\n",
        )
        .unwrap(),
    )));
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let start = MINUTE - 3 * 86_400;
    let mut watermark = start;
    for step in 0..120u64 {
        let mut c = Commit {
            contracts: Some(contracts.clone()),
            ..Commit::default()
        };
        for node in ["n1", "n2", "n3"] {
            if next(3) == 0 {
                continue;
            }
            c.nodes.insert(Arc::from(node), cursor(step + 1));
            let tenant = if node == "n3" { "b" } else { "a" };
            // Mostly near the watermark, sometimes before it (late).
            let minute = watermark - 1_800 + i64::try_from(next(90)).unwrap() * 60;
            let minute = minute.div_euclid(60) * 60;
            let e = 30_000_000 + next(40_000_000);
            let d = BucketDelta {
                energy_mj: e,
                gpu_ns: 60_000_000_000,
                busy_gpu_ns: next(60_000_000_000),
                samples: 60,
                expected_gpu_ns: 60_000_000_000,
                estimated_mj: next(10),
                ..BucketDelta::default()
            };
            c.buckets
                .entry((Arc::from(tenant), Arc::from(node), minute))
                .or_default()
                .add(&d);
            *c.tenant_energy.entry(Arc::from(tenant)).or_default() += e;
        }
        watermark += 1_200;
        let booked = watermark + 60;
        let a = lite.commit_as("h", &c, booked, watermark - 900);
        let b = pg.commit_as("h", &c, booked, watermark - 900);
        assert_eq!(a.unwrap(), b.unwrap(), "commit {step}");
        if step % 15 == 14 {
            let policy = Compaction {
                closed_before: watermark - 3_600,
                minutes_from: watermark - 86_400,
                hours_from: watermark - 2 * 86_400,
                days_from: Some(start - 86_400),
                allocating_from: None,
            };
            let now = crate::sync::now_unix();
            let ttl = Duration::from_secs(60);
            let la = lite.acquire_compaction("h", now, ttl).unwrap();
            let pa = pg.acquire_compaction("h", now, ttl).unwrap();
            assert_eq!(
                lite.compact_under(&la, now, &policy, &contracts).unwrap(),
                pg.compact_under(&pa, now, &policy, &contracts).unwrap(),
                "compaction after commit {step}"
            );
        }
    }
    for since in [0, 40, 119] {
        assert_eq!(
            lite_r.usage_since(None, 0, i64::MAX, since).unwrap(),
            pg_r.usage_since(None, 0, i64::MAX, since).unwrap(),
            "usage since {since}"
        );
    }
    assert_eq!(
        lite_r.minutes(Some("a"), 0, i64::MAX).unwrap(),
        pg_r.minutes(Some("a"), 0, i64::MAX).unwrap()
    );
    assert_eq!(lite_r.tenants().unwrap(), pg_r.tenants().unwrap());
    let sorted = |mut s: Snapshot| {
        s.nodes.sort_by(|a, b| a.0.cmp(&b.0));
        s.tenant_energy.sort();
        s.tenant_over_contract_ns.sort();
        (s.nodes, s.tenant_energy, s.tenant_over_contract_ns)
    };
    let (a, b) = (sorted(lite.load().unwrap()), sorted(pg.load().unwrap()));
    assert!(
        b.2.iter().any(|(_, ns)| *ns > 0),
        "no minute over contract: {b:?}"
    );
    assert_eq!(a, b);
    let usage = pg_r.usage(None, 0, i64::MAX).unwrap();
    assert!(!usage.adjustments.is_empty(), "no late delta");
    assert!(
        usage.spans.iter().any(|(_, s)| s.seconds == 3600),
        "nothing rolled up"
    );
}

/// A commit applied although its answer was lost (the connection dropped
/// after COMMIT was sent): `commit_written` finds it, and a retry that
/// absorbed it (a caller that did not ask) is refused, writing nothing,
/// so the ledger holds each booking once.
#[test]
fn a_commit_whose_answer_was_lost_is_not_written_twice() {
    let url = fresh_database(server());
    let mut l = PgLedger::create(&settings(&url)).unwrap();
    let r = l.reader();
    l.lose_next_reply = true;
    let mut first = booking("n1", 1, MINUTE, 1_000);
    first.id = Some(1);
    assert!(l.commit_as("h", &first, MINUTE, 0).is_err());
    assert_eq!(energy(&r), 1_000, "the commit was applied");
    let mut retry = booking("n1", 1, MINUTE, 1_000);
    retry.absorb(booking("n1", 2, MINUTE, 500));
    retry.absorb(booking("n2", 1, MINUTE + 60, 70));
    retry.id = Some(2);
    match l.commit_as("h", &retry, MINUTE, 0) {
        Err(LedgerError::Superseded {
            expected, found, ..
        }) => assert_eq!((expected, found), (None, Some(1))),
        other => panic!("a retry of a written commit went through: {other:?}"),
    }
    assert_eq!(energy(&r), 1_000, "the refused retry wrote nothing");
    assert!(l.commit_written("h", 1).unwrap());
    let mut rest = booking("n1", 2, MINUTE, 500);
    rest.absorb(booking("n2", 1, MINUTE + 60, 70));
    rest.id = Some(2);
    l.commit_as("h", &rest, MINUTE, 0).unwrap();
    assert_eq!(energy(&r), 1_570);
    let mut snap = l.restore().unwrap();
    snap.nodes.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(snap.tenant_energy, vec![("lab-a".to_string(), 1_570)]);
    assert_eq!(
        snap.nodes,
        vec![("n1".into(), cursor(2)), ("n2".into(), cursor(1))]
    );
    let samples: u64 = r
        .minutes(None, 0, i64::MAX)
        .unwrap()
        .iter()
        .map(|(_, _, d)| d.samples)
        .sum();
    assert_eq!(samples, 3);
}

/// A commit refused at COMMIT itself (here by a deferred trigger, once)
/// was not applied: `commit_written` says so, and its retry writes all of
/// it.
#[test]
fn a_commit_refused_at_commit_time_is_written_whole_on_retry() {
    let url = fresh_database(server());
    let mut l = PgLedger::create(&settings(&url)).unwrap();
    server().psql(
        db_of(&url),
        "CREATE SEQUENCE fail_once;
         CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('fail_once') = 1 THEN RAISE EXCEPTION 'refused at commit'; END IF;
                RETURN NULL;
            END $$;
         CREATE CONSTRAINT TRIGGER fail_once AFTER UPDATE ON watermark
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_once()",
    );
    let mut first = booking("n1", 1, MINUTE, 1_000);
    first.id = Some(1);
    let e = l.commit_as("h", &first, MINUTE, 0).unwrap_err();
    assert!(e.to_string().contains("refused at commit"), "{e}");
    assert!(!l.commit_written("h", 1).unwrap());
    let mut retry = booking("n1", 1, MINUTE, 1_000);
    retry.absorb(booking("n1", 2, MINUTE, 500));
    retry.id = Some(2);
    l.commit_as("h", &retry, MINUTE, 0).unwrap();
    assert_eq!(energy(&l.reader()), 1_500);
}

/// Compaction rolls up only hours the ledger's watermark has passed,
/// whatever the compactor's clock says: another collector may still book
/// a late live row in an hour its own clock calls closed.
#[test]
fn compaction_waits_for_the_watermark() {
    let url = fresh_database(server());
    let mut l = PgLedger::create(&settings(&url)).unwrap();
    let c = booking("n1", 1, MINUTE, 1_000);
    l.commit_as("h", &c, MINUTE, 0).unwrap();
    let policy = Compaction {
        closed_before: MINUTE + 2 * 3600,
        minutes_from: 0,
        hours_from: 0,
        days_from: None,
        allocating_from: None,
    };
    let contracts = TenantHistory::new(Arc::new(crate::tenants::Tenants::empty()));
    let lease = l
        .acquire_compaction("h", 0, Duration::from_secs(60))
        .unwrap();
    let done = l.compact_under(&lease, 0, &policy, &contracts).unwrap();
    assert_eq!(done.hours_rolled_up, 0, "rolled up before the watermark");
    l.commit_as("h", &Commit::default(), MINUTE, MINUTE + 3600)
        .unwrap();
    let done = l.compact_under(&lease, 0, &policy, &contracts).unwrap();
    assert_eq!(done.hours_rolled_up, 1);
}

/// `url` (a database on the shared server) reached through `link`.
fn via(link: &capwatch_testkit::proxy::Proxy, url: &str) -> String {
    format!("postgres://postgres@{}/{}", link.addr, db_of(url))
}

/// One second for connecting and for each statement: a call's deadline
/// is 3 s.
fn quick(url: &str) -> PgSettings {
    PgSettings {
        connect_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(1),
        ..PgSettings::new(url)
    }
}

/// A network partition between the collector and PostgreSQL gives no
/// error: nothing passes, nothing is reset. A call still fails within its
/// deadline (connect timeout plus twice the statement timeout), the time
/// to get a connection from a pool full of stalled ones included, and the
/// ledger commits again once the network heals.
#[test]
fn a_call_on_a_stalled_network_fails_within_its_deadline() {
    let url = fresh_database(server());
    let link = capwatch_testkit::proxy::Proxy::start(([127, 0, 0, 1], server().port()).into());
    let s = PgSettings {
        pool_size: 8,
        ..quick(&via(&link, &url))
    };
    let mut l = PgLedger::create(&s).unwrap();
    // Every pooled connection in use at once, then idle: the pool holds 8.
    let calls: Vec<_> = (0..s.pool_size)
        .map(|_| {
            let shared = l.shared.clone();
            std::thread::spawn(move || {
                shared.call(|client| async move {
                    let r = client.execute("SELECT pg_sleep(0.3)", &[]).await;
                    (client, r.map(drop).map_err(super::Fail::from))
                })
            })
        })
        .collect();
    for c in calls {
        c.join().unwrap().unwrap();
    }
    assert_eq!(l.pool_connections(), (s.pool_size, 0));
    link.stall();
    let started = Instant::now();
    let e = l
        .commit_as("a/1", &booking("n1", 1, MINUTE, 10), MINUTE, 0)
        .expect_err("a commit through a stalled network");
    let took = started.elapsed();
    let deadline = s.connect_timeout + 2 * s.statement_timeout;
    assert!(
        took < deadline + Duration::from_millis(500),
        "the commit failed after {took:?}, its deadline is {deadline:?}: {e}"
    );
    assert!(matches!(e, LedgerError::Postgres { .. }), "{e:?}");
    link.resume();
    l.commit_as("a/1", &booking("n1", 1, MINUTE, 10), MINUTE, 0)
        .unwrap();
    assert_eq!(energy(&l.reader()), 10);
}

/// A collector cut off from the database in the middle of a commit leaves
/// its transaction open on the server, with the watermark's row lock that
/// every commit takes first: the server ends that connection after the
/// statement timeout (`idle_in_transaction_session_timeout`), so that the
/// other collectors' commits go through while the partition lasts.
#[test]
fn a_transaction_left_open_by_a_cut_off_collector_does_not_block_the_others() {
    let url = fresh_database(server());
    let link = capwatch_testkit::proxy::Proxy::start(([127, 0, 0, 1], server().port()).into());
    let cut_off = PgLedger::create(&quick(&via(&link, &url))).unwrap();
    let mut other = PgLedger::open(&quick(&url)).unwrap();
    let (locked, is_locked) = std::sync::mpsc::channel();
    let shared = cut_off.shared.clone();
    let stale = std::thread::spawn(move || {
        shared.call(move |mut client| async move {
            let r = async {
                let tx = client.transaction().await?;
                tx.query_one(
                    "SELECT revision FROM watermark WHERE id = 1 FOR UPDATE",
                    &[],
                )
                .await?;
                let _ = locked.send(());
                // The network fails here: nothing more reaches the server,
                // not even the rollback when the call gives up.
                std::future::pending::<()>().await;
                Ok(())
            }
            .await;
            (client, r)
        })
    });
    is_locked.recv().unwrap();
    link.stall();
    let started = Instant::now();
    let mut failed = Vec::new();
    while let Err(e) = other.commit_as("b/1", &booking("n2", 1, MINUTE, 5), MINUTE, 0) {
        failed.push(e.to_string());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the other collector could not commit for {:?}: {failed:?}",
            started.elapsed()
        );
    }
    assert!(stale.join().unwrap().is_err(), "the cut-off call gave up");
    link.resume();
    assert_eq!(energy(&other.reader()), 5);
}

/// A ledger at schema version 1 (before node energy) with data migrates:
/// its rows read with no node energy, and it takes node energy and power
/// cursors after.
#[test]
fn a_version_1_ledger_migrates_with_no_node_energy_in_its_rows() {
    use super::schema::{BOOTSTRAP, MIGRATIONS};
    let url = fresh_database(server());
    let db = db_of(&url);
    server().psql(db, BOOTSTRAP);
    server().psql(db, MIGRATIONS[0]);
    server().psql(
        db,
        &format!(
            "UPDATE ledger_schema SET version = 1;
             UPDATE watermark SET revision = 1;
             INSERT INTO usage_minute VALUES ('a', 'n1', {MINUTE}, 100, 5, 4, 1, 6, 7, 0, 0);
             INSERT INTO tenant_total VALUES ('a', 100, 0);"
        ),
    );
    let mut l = PgLedger::open(&settings(&url)).unwrap();
    assert_eq!(
        server().psql(db, "SELECT version FROM ledger_schema"),
        MIGRATIONS.len().to_string()
    );
    let snap = l.restore().unwrap();
    assert_eq!(snap.tenant_energy, vec![("a".to_string(), 100)]);
    assert_eq!(snap.tenant_node_energy, vec![("a".to_string(), 0)]);
    let reader = PgReader::open(&settings(&url)).unwrap();
    // A ledger with commits keeps every GPU's hours from the first whole
    // hour after its migration, by the database's clock.
    let now = crate::sync::now_unix();
    let since = reader.gpu_rows_from().unwrap().unwrap();
    assert_eq!(since % 3600, 0);
    assert!(since > now - 60 && since <= now + 3660, "{since} at {now}");
    let minutes = reader.minutes(Some("a"), MINUTE, MINUTE + 60).unwrap();
    assert_eq!(
        minutes,
        vec![(
            "a".to_string(),
            MINUTE,
            BucketDelta {
                energy_mj: 100,
                gpu_ns: 5,
                busy_gpu_ns: 4,
                samples: 1,
                expected_gpu_ns: 6,
                estimated_mj: 7,
                ..BucketDelta::default()
            }
        )]
    );
    let mut c = booking("n1", 1, MINUTE, 1);
    c.buckets
        .get_mut(&(Arc::from("lab-a"), Arc::from("n1"), MINUTE))
        .unwrap()
        .node_energy_mj = 500;
    let mut cursor = cursor(1);
    cursor.power = vec![(
        Arc::from("redfish/1"),
        GpuCursor {
            changed_ns: None,
            last_counter_mj: Some(9),
            last_timestamp_ns: Some(1),
            remainder_mw_ns: 0,
            energy_mj: 9,
            counter_resets: 0,
        },
    )];
    c.nodes.insert(Arc::from("n1"), cursor.clone());
    l.commit_as("h", &c, MINUTE + 10, i64::MIN).unwrap();
    let mut snap = l.restore().unwrap();
    snap.tenant_node_energy.sort();
    assert_eq!(snap.nodes, vec![("n1".to_string(), cursor)]);
    assert_eq!(
        snap.tenant_node_energy,
        vec![("a".to_string(), 0), ("lab-a".to_string(), 500)]
    );
}

/// A version-2 ledger holding meter allocations migrates: each tenant's
/// part keeps, as the node energy it replaced, what its nodes measured;
/// the ledger then takes parts with node energy of their own.
#[test]
fn a_version_2_ledger_keeps_its_meter_allocations() {
    use super::schema::{BOOTSTRAP, MIGRATIONS};
    use crate::ledger::{MeterMinute, MeterShare, MeterState};
    let url = fresh_database(server());
    let db = db_of(&url);
    server().psql(db, BOOTSTRAP);
    server().psql(db, MIGRATIONS[0]);
    server().psql(db, MIGRATIONS[1]);
    let m = MINUTE;
    server().psql(
        db,
        &format!(
            "UPDATE ledger_schema SET version = 2;
             INSERT INTO meter_state VALUES ('row-a', {m} + 60, 1, 2, 0);
             INSERT INTO meter_minute VALUES ('row-a', {m}, 900, 600, 0);
             INSERT INTO meter_allocation VALUES ('row-a', 'a', {m}, 600, 900);
             INSERT INTO demand_rollup VALUES (3600, {m} - 3600, 'a', 50, 0, 0, 70);"
        ),
    );
    let mut l = PgLedger::open(&settings(&url)).unwrap();
    assert_eq!(
        server().psql(db, "SELECT version FROM ledger_schema"),
        MIGRATIONS.len().to_string()
    );
    // The hour of the allocation is to be rolled up again; the rollup
    // from before has no allocation and no facility peak.
    assert_eq!(
        server().psql(db, "SELECT hour_start FROM rollup_pending"),
        (m - m % 3600).to_string()
    );
    assert_eq!(
        server().psql(
            db,
            "SELECT allocated_mj, allocated_node_mj, facility_peak_quarter_mj IS NULL
             FROM demand_rollup"
        ),
        "0|0|t"
    );
    let reader = PgReader::open(&settings(&url)).unwrap();
    assert_eq!(
        reader.meter_minutes(None, m, m + 60).unwrap(),
        vec![(
            "row-a".to_string(),
            MeterMinute {
                minute: m,
                metered_mj: 900,
                measured_mj: 600,
                unallocated_mj: 0,
                tenants: vec![MeterShare::new("a", 600, 900, 600)],
            }
        )]
    );
    let next = MeterMinute {
        minute: m + 60,
        metered_mj: 10,
        measured_mj: 8,
        unallocated_mj: 0,
        tenants: vec![MeterShare::new("a", 8, 10, 5)],
    };
    let from = l.meter_state("row-a").unwrap().unwrap();
    let to = MeterState {
        allocated_through: m + 120,
        ..from
    };
    assert!(
        l.allocate_meter("row-a", Some(&from), &to, std::slice::from_ref(&next))
            .unwrap()
    );
    assert_eq!(
        reader
            .meter_minutes(Some("row-a"), m + 60, m + 120)
            .unwrap(),
        vec![("row-a".to_string(), next)]
    );
}
