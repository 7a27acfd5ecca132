//! What goes into the ledger: bookings, over-contract minutes.

use super::*;

// ---- What goes into the ledger ----------------------------------------

pub(super) fn booked(c: &Commit, tenant: &str, node: &str) -> BucketDelta {
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
        &[],
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
        .map(|r| {
            (
                r.seconds_over_contract.unwrap(),
                (r.overage_kwh.unwrap() * 3.6e9).round(),
            )
        })
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
    state.config_mut().max_sample_age = Duration::from_secs(3600);
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
        state.hello(hello("a-9", crate::edge::MAX_STORED + 1, 1)),
        Err(HelloError::Epoch)
    ));
}
