use super::compact::HOURS_PER_ROUND;
use super::schema::*;
use super::*;
use crate::ledger::conformance::{Fresh, conformance_tests};
use crate::ledger::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

use crate::tenants::Tenants;

/// A history of one version of `toml`.
fn history(toml: &str) -> TenantHistory {
    TenantHistory::new(Arc::new(Tenants::from_toml(toml).unwrap()))
}

#[test]
fn commit_then_load_round_trips_and_buckets_accumulate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut l = Ledger::create(&path).unwrap();
    let mut c = Commit::default();
    let n1 = NodeCursor {
        stretch: Vec::new(),
        power: Vec::new(),
        epoch: 7,
        last_seq: 42,
        gpus: vec![
            (
                Arc::from("GPU-1"),
                GpuCursor {
                    changed_ns: None,
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
                    changed_ns: None,
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
            node_energy_mj: 10,
            node_estimated_mj: 11,
            node_ns: 12,
            busy_unknown_gpu_ns: 1,
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
    assert_eq!(
        sums.values(),
        [200, 10, 8, 2, 12, 14, 16, 18, 20, 22, 24, 2]
    );
    assert_eq!(
        (sums.energy_mj, sums.gpu_ns, sums.busy_gpu_ns, sums.samples),
        (200, 10, 8, 2)
    );
}

/// A stretch written before its runs were kept (a tenant's span alone)
/// reads as one run over that span with all its GPU time; one with runs
/// round-trips them.
#[test]
fn a_stretch_written_with_a_span_alone_reads_as_one_run() {
    let old = StoredGpus {
        gpus: Vec::new(),
        power: Vec::new(),
        stretch: vec![StoredStretch {
            tenant: "t".into(),
            gpu_energy_mj: 5,
            gpu_ns: 70,
            span_from_ns: Some(-10),
            span_to_ns: Some(60),
            runs: Vec::new(),
        }],
    };
    let decoded = StoredGpus::decode(old.encode_to_vec().as_slice()).unwrap();
    let c = decoded.into_cursor(1, 2);
    let run = crate::accounting::Run {
        from_ns: -10,
        to_ns: 60,
        gpu_ns: 70,
    };
    assert_eq!(c.stretch[0].1.runs, vec![run]);
    let again = StoredGpus::decode(StoredGpus::of(&c).encode_to_vec().as_slice()).unwrap();
    assert_eq!(again.into_cursor(1, 2), c);
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
        changed_ns: None,
        last_counter_mj: Some(1_000),
        last_timestamp_ns: Some(5),
        remainder_mw_ns: 7,
        energy_mj: 11,
        counter_resets: 0,
    };
    assert_eq!(snap.nodes[0].1.gpus, vec![(Arc::from("GPU-1"), want)]);
    // Nor power sources, nor when their counters last changed, nor an
    // open whole-node stretch: none.
    assert!(snap.nodes[0].1.power.is_empty() && snap.nodes[0].1.stretch.is_empty());
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
            "ledger::sqlite::tests::a_ledger_held_by_another_process_is_refused",
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
            let (ns, mj) = s.over_contract(
                &crate::accounting::Contract::gpu(1_000_000),
                crate::accounting::Metered::NONE,
            );
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

/// A ledger at schema version 12 (before node energy) holding what `rows`
/// inserts, and the node cursor `n1` with `gpus`, stored as it was then.
fn version_12_ledger(path: &Path, gpus: &[(Arc<str>, GpuCursor)], rows: &str) {
    ledger_at_version(path, 12, gpus, rows)
}

/// A ledger at schema `version` (12 or later) holding what `rows`
/// inserts, and the node cursor `n1` with `gpus`.
fn ledger_at_version(path: &Path, version: usize, gpus: &[(Arc<str>, GpuCursor)], rows: &str) {
    let mut conn = Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    for m in &MIGRATIONS[..version] {
        match m {
            Migration::Sql(sql) => tx.execute_batch(sql).unwrap(),
            Migration::Code(f) => f(&tx).unwrap(),
        }
    }
    let old = NodeCursor {
        stretch: Vec::new(),
        epoch: 3,
        last_seq: 99,
        gpus: gpus.to_vec(),
        power: Vec::new(),
    };
    tx.execute(
        "INSERT INTO node_cursor (node, epoch, last_seq, gpus) VALUES ('n1', 3, 99, ?1)",
        params![StoredGpus::of(&old).encode_to_vec()],
    )
    .unwrap();
    tx.execute_batch(rows).unwrap();
    tx.pragma_update(None, "user_version", version as i64)
        .unwrap();
    let (id, revision): (String, i64) = tx
        .query_row(
            "SELECT ledger_id, revision FROM ledger_identity, watermark",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    tx.commit().unwrap();
    let mut marker = path.as_os_str().to_owned();
    marker.push(MARKER_SUFFIX);
    std::fs::write(marker, super::marker::marker_record(&id, revision as u64)).unwrap();
}

#[test]
fn a_version_12_ledger_migrates_with_no_node_energy_in_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let gpu = GpuCursor {
        changed_ns: None,
        last_counter_mj: Some(77),
        last_timestamp_ns: Some(5),
        remainder_mw_ns: 6,
        energy_mj: 70,
        counter_resets: 1,
    };
    let gpus = vec![(Arc::from("GPU-1"), gpu)];
    version_12_ledger(
        &path,
        &gpus,
        &format!(
            "INSERT INTO usage_minute VALUES ('a', 'n1', {m}, 100, 5, 4, 1, 6, 7, 0, 0);
             INSERT INTO usage_rollup VALUES (3600, {h}, 'a', 'n1', 50, 1, 1, 1, 1, 1, 0, 0);
             INSERT INTO demand_rollup VALUES (3600, {h}, 'a', 50, 0, 0);
             INSERT INTO adjustment VALUES (1, {m}, 'a', 'n1', {m}, 3, 0, 0, 0, 0, 0, 0, 0);
             UPDATE watermark SET revision = 1;
             INSERT INTO tenant_total VALUES ('a', 153, 0);
             INSERT INTO retention VALUES (60, {m}), (3600, {h});",
            m = T0 + DAY,
            h = T0,
        ),
    );
    let mut l = Ledger::open(&path).unwrap();
    let version: i64 = l
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len() as i64);
    let snap = l.load().unwrap();
    assert_eq!(
        snap.nodes,
        vec![(
            "n1".to_string(),
            NodeCursor {
                stretch: Vec::new(),
                epoch: 3,
                last_seq: 99,
                gpus: gpus.clone(),
                power: Vec::new(),
            }
        )]
    );
    assert_eq!(snap.tenant_energy, vec![("a".to_string(), 153)]);
    assert_eq!(snap.tenant_node_energy, vec![("a".to_string(), 0)]);
    let reader = Reader::open(&path).unwrap();
    let u = reader.usage(Some("a"), T0, T0 + DAY + HOUR).unwrap();
    let got: Vec<(i64, u64, u64, u64, u64, Option<u64>)> = u
        .spans
        .iter()
        .map(|(_, s)| {
            (
                s.start,
                s.delta.energy_mj,
                s.delta.node_energy_mj,
                s.delta.node_estimated_mj,
                s.delta.node_ns,
                s.node_peak_quarter_mj,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![(T0, 50, 0, 0, 0, Some(0)), (T0 + DAY, 100, 0, 0, 0, None)]
    );
    assert_eq!(u.adjustments.len(), 1);
    // A ledger with commits keeps every GPU's hours from the first whole
    // hour after its migration.
    let now = crate::sync::now_unix();
    let since: i64 = l
        .conn
        .query_row("SELECT since FROM gpu_rows", [], |r| r.get(0))
        .unwrap();
    assert_eq!(since % HOUR, 0);
    assert!(since > now && since <= now + HOUR, "{since} at {now}");
    // Read from the later of that and the hour retention.
    assert_eq!(reader.gpu_rows_from().unwrap(), Some(since.max(T0)));
    assert_eq!(
        u.adjustments[0].delta,
        BucketDelta {
            energy_mj: 3,
            ..BucketDelta::default()
        }
    );
    assert_eq!(
        u.adjustments[0].metered,
        crate::accounting::MeteredChange::NONE
    );
    // The migrated ledger takes node energy and power cursors.
    let mut c = Commit::default();
    let cursor = NodeCursor {
        stretch: Vec::new(),
        epoch: 3,
        last_seq: 100,
        gpus,
        power: vec![(
            Arc::from("ipmi/node"),
            GpuCursor {
                changed_ns: None,
                last_counter_mj: None,
                last_timestamp_ns: Some(9),
                remainder_mw_ns: 4,
                energy_mj: 400,
                counter_resets: 0,
            },
        )],
    };
    c.nodes.insert(Arc::from("n1"), cursor.clone());
    c.buckets.insert(
        (Arc::from("a"), Arc::from("n1"), T0 + DAY),
        BucketDelta {
            energy_mj: 1,
            node_energy_mj: 400,
            node_estimated_mj: 400,
            node_ns: 10,
            ..BucketDelta::default()
        },
    );
    c.tenant_energy.insert(Arc::from("a"), 1);
    l.commit(&c).unwrap();
    let snap = l.load().unwrap();
    assert_eq!(snap.nodes, vec![("n1".to_string(), cursor)]);
    assert_eq!(snap.tenant_node_energy, vec![("a".to_string(), 400)]);
    let sums = l.bucket_totals("a").unwrap();
    assert_eq!(
        (
            sums.energy_mj,
            sums.node_energy_mj,
            sums.node_estimated_mj,
            sums.node_ns
        ),
        (104, 400, 400, 10)
    );
}

/// A version-13 ledger holding meter allocations migrates: each
/// tenant's part keeps, as the node energy it replaced, what its nodes
/// measured; the ledger then takes parts with node energy of their own.
#[test]
fn a_version_13_ledger_keeps_its_meter_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let m = T0 + DAY;
    ledger_at_version(
        &path,
        13,
        &[],
        &format!(
            "INSERT INTO usage_minute VALUES ('a', 'n1', {m}, 100, 5, 4, 1, 6, 7, 0, 0, 600, 0, 60);
             INSERT INTO meter_state VALUES ('row-a', {m} + 60, 1, 2, 0);
             INSERT INTO meter_minute VALUES ('row-a', {m}, 900, 600, 0);
             INSERT INTO meter_allocation VALUES ('row-a', 'a', {m}, 600, 900);
             INSERT INTO usage_rollup VALUES (3600, {h}, 'a', 'n1', 50, 1, 1, 1, 1, 1, 0, 0, 70, 0, 60);
             INSERT INTO demand_rollup VALUES (3600, {h}, 'a', 50, 0, 0, 70);
             INSERT INTO retention VALUES (60, {m}), (3600, {h});",
            h = T0,
        ),
    );
    let mut l = Ledger::open(&path).unwrap();
    // The hour with minutes and an allocation is to be rolled up again;
    // the rollup from before has no allocation and no facility peak (the
    // PUE estimate).
    let pending: Vec<i64> = l
        .conn
        .prepare("SELECT hour_start FROM rollup_pending")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(pending, vec![m - m % 3600]);
    let u = Reader::open(&path)
        .unwrap()
        .usage(Some("a"), T0, T0 + HOUR)
        .unwrap();
    let s = &u.spans[0].1;
    assert_eq!(
        (
            s.node_peak_quarter_mj,
            s.metered,
            s.facility_peak_quarter_mj
        ),
        (Some(70), crate::accounting::Metered::NONE, None)
    );
    let read = Reader::open(&path)
        .unwrap()
        .meter_minutes(None, m, m + 60)
        .unwrap();
    assert_eq!(
        read,
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
    let read = Reader::open(&path)
        .unwrap()
        .meter_minutes(Some("row-a"), m + 60, m + 120)
        .unwrap();
    assert_eq!(read, vec![("row-a".to_string(), next)]);
    // Its meter-minutes, the old one with them, fold into an hour's sums.
    let done = l
        .compact(
            &Compaction {
                closed_before: m + 2 * HOUR,
                minutes_from: m + 2 * HOUR,
                hours_from: 0,
                days_from: None,
                allocating_from: None,
            },
            &history(""),
        )
        .unwrap();
    assert_eq!(done.meter_rows_rolled_up, 2);
    let hours = Reader::open(&path)
        .unwrap()
        .meter_hours(None, m - HOUR, m + HOUR)
        .unwrap();
    assert_eq!(
        hours,
        vec![(
            "row-a".to_string(),
            2,
            MeterMinute {
                minute: m - m % HOUR,
                metered_mj: 910,
                measured_mj: 608,
                unallocated_mj: 0,
                tenants: vec![MeterShare::new("a", 608, 910, 605)],
            }
        )]
    );
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
        changed_ns: None,
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
                stretch: Vec::new(),
                power: Vec::new(),
                epoch: 0,
                last_seq: 0,
                gpus: vec![(Arc::from("GPU-d"), cursor(Some(1), Some(2), 3, 4))],
            },
        ),
        (
            "n1".to_string(),
            NodeCursor {
                stretch: Vec::new(),
                power: Vec::new(),
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
                stretch: Vec::new(),
                power: Vec::new(),
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
        allocating_from: None,
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
        allocating_from: None,
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
        u.spans[0].1.over_contract(
            &crate::accounting::Contract::gpu(1_000_000),
            crate::accounting::Metered::NONE,
        ),
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
        allocating_from: None,
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
                    allocating_from: None,
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

/// A new SQLite ledger in a temporary directory, with its reader.
fn fresh() -> Fresh<Ledger, Reader> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let writer = Ledger::create(&path).unwrap();
    let reader = Reader::open(&path).unwrap();
    Fresh {
        writer,
        reader,
        _keep: Box::new(dir),
    }
}

mod conformance {
    use super::fresh;

    super::conformance_tests!(fresh);
}

/// Claims are kept in the ledger, not in the process: a node claimed by
/// another holder is still fenced from this one after a reopen, and a
/// claim back by the local holder bumps the generation once, then keeps
/// it across reopens.
#[test]
fn claims_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut c = Commit::default();
    c.nodes.insert(Arc::from("n1"), NodeCursor::default());
    {
        let mut l = Ledger::create(&path).unwrap();
        l.commit(&c).unwrap();
        assert_eq!(l.claim(LOCAL_HOLDER, "n1").unwrap().generation, 1);
        assert_eq!(l.claim("elsewhere", "n1").unwrap().generation, 2);
    }
    let mut l = Ledger::open(&path).unwrap();
    match l.commit(&c) {
        Err(LedgerError::Fenced {
            node,
            holder,
            generation,
            ..
        }) => assert_eq!(
            (node.as_str(), holder.as_str(), generation),
            ("n1", "elsewhere", 2)
        ),
        other => panic!("a node held elsewhere was committed: {other:?}"),
    }
    assert_eq!(l.claim(LOCAL_HOLDER, "n1").unwrap().generation, 3);
    l.commit(&c).unwrap();
    drop(l);
    let mut l = Ledger::open(&path).unwrap();
    let claim = l.claim(LOCAL_HOLDER, "n1").unwrap();
    assert_eq!(claim.generation, 3);
    assert_eq!(claim.cursor, Some(NodeCursor::default()));
    l.commit(&c).unwrap();
}
