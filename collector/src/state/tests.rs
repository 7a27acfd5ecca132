//! Tests of the collector's state, through the façade: edge checks,
//! accounting, fleet and billing together.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::accounting::NANOS_PER_SECOND;
use crate::events::ClaimReason;
use crate::ledger::{BucketDelta, GpuCursor, NodeCursor};
use crate::model::{GpuReading, NodeSample, Reject};
use crate::tenants::UNASSIGNED;
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
        .map(|g| g.energy_millijoules())
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
    state.counters.rejected(reason)
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
            *by_tenant.entry(g.tenant.clone()).or_default() += g.energy_millijoules();
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
fn parts(visit: impl FnOnce(&mut dyn FnMut(&Arc<str>, &TenantLive))) -> Vec<(String, TenantLive)> {
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
            let times = n.gpus.iter().flat_map(|g| [g.last_receipt(), g.sampled_at]);
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
            .map(|g| g.energy_millijoules())
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
            .map(|g| (g.uuid.to_string(), g.meter().cursor().last_counter_mj))
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
        n.gpus[1].last_receipt().unwrap() + n.stale_window(None) + Duration::from_nanos(1);
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
        assert_eq!(lock(&h.node).gpus[0].counter_resets(), 0);
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
        assert_eq!(g.energy_millijoules(), energy, "{samples:?}");
        assert_eq!(g.counter_resets(), resets, "{samples:?}");
        assert_eq!(
            g.meter().cursor().last_counter_mj,
            Some(last_counter),
            "{samples:?}"
        );
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
        assert_eq!(lock(&h.node).gpus[0].counter_resets(), 0);
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
    let e = n.gpus[0].energy_millijoules();
    assert_eq!(tenant_energy(&state, "lab-a"), e);
    (e, n.gpus[0].meter().remainder_milliwatt_nanos())
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
                g.energy_millijoules(),
                g.meter().remainder_milliwatt_nanos(),
                g.counter_resets(),
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
    assert_eq!(n.gpus[0].counter_resets(), 0);
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
                for r in Reject::ALL {
                    let n = u64::from(r == reason);
                    assert_eq!(rejected(&state, r), n, "{name}: {r:?}");
                }
                assert_eq!(gpu_energy(&h), vec![2_000, 2_000], "{name}");
                assert_eq!(lock(&h.node).gpus[0].counter_resets(), 0, "{name}");
                assert_eq!(lock(&h.node).samples_accepted, 2, "{name}");
            }
            None => {
                assert_eq!(out.accepted, 3, "{name}");
                assert!(out.rejected.is_empty(), "{name}");
                assert_eq!(lock(&h.node).gpus[0].counter_resets(), 1, "{name}");
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
    let held = |s: &State| s.counters.gpu_claims_refused(ClaimReason::HeldByOtherNode);
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
    assert!(state.node("evil-1").is_none());
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
    assert_eq!(state.counters.gpu_claims_refused(ClaimReason::LeaseNode), 1);
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
            assert_eq!(g.energy_millijoules(), e, "{counters:?} step {i}");
            if c.is_some() {
                last_counter = c;
            }
            assert_eq!(
                g.meter().cursor().last_counter_mj,
                last_counter,
                "{counters:?} step {i}"
            );
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
    assert_eq!(h.node.lock().unwrap().gpus[0].counter_resets(), 2);
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
    assert_eq!(lock(&a.node).gpus[0].counter_resets(), 0);
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
    assert_eq!(lock(&a.node).gpus[0].counter_resets(), 1);
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
    assert_eq!(lock(&h.node).gpus[0].counter_resets(), 0);
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
        assert_eq!(lock(&h.node).gpus[0].counter_resets(), 0, "{name}");
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
        assert_eq!(lock(&h.node).gpus[0].counter_resets(), 0, "{forward}");
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
    assert_eq!(lock(&h.node).gpus[0].counter_resets(), 0);
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
    state.config_mut().max_sample_age = Duration::from_secs(3600);
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
    assert_eq!(lock(&h.node).gpus[0].counter_resets(), 2);

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
    assert_eq!(lock(&h.node).gpus[0].counter_resets(), 2);
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
        assert_eq!(lock(&h.node).gpus[0].counter_resets(), resets, "{case}");
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
        state.hello(hello("a-9", crate::model::MAX_STORED + 1, 1)),
        Err(HelloError::Epoch)
    ));
}
