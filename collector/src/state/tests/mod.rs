//! Tests of the collector's state, through the façade: edge checks,
//! accounting, fleet and billing together.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::accounting::NANOS_PER_SECOND;
use crate::edge::{GpuReading, NodeSample, Reject};
use crate::events::ClaimReason;
use crate::ledger::{BucketDelta, GpuCursor, NodeCursor};
use crate::sync::lock;
use crate::tenants::UNASSIGNED;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config as ProptestConfig;

mod clocks;
mod counting;
mod edge;
mod ledger;
mod live;
mod mig;
mod node_power;
mod streams;

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
        node_power_sources: Vec::new(),
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
                identity: Default::default(),
                mig: Default::default(),
                mig_layout: None,
                earlier_mig: Vec::new(),
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
        node_power: Vec::new(),
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
    lock(h.node())
        .gpus()
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
        for g in lock(&node).gpus() {
            *by_tenant.entry(g.tenant().clone()).or_default() += g.energy_millijoules();
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
                    let gpus = lock(h.node()).gpus().len() as u32;
                    let readings: Vec<GpuReading> = (0..gpus)
                        .filter(|g| present & (1 << g) != 0)
                        .map(|g| if lost_mask & (1 << g) != 0 { lost(g) } else { reading(g, 100_000 + u64::from(g), None) })
                        .collect();
                    seq += 1;
                    // Stamped now, 2 s or 4 s ago (the window is 3 s):
                    // live, live for a second more, or arrived stale.
                    let ts = unix_nanos_now() - i64::from(age) * 2 * SEC;
                    let s = NodeSample { node_power: Vec::new(),  seq, timestamp_unix_nanos: ts, gpus: readings, host: None };
                    ingest(&state, &h, vec![s]);
                }
            }
            let n = lock(h.node());
            let window = n.stale_window(None);
            let mut probes = vec![Instant::now()];
            let times = n.gpus().iter().flat_map(|g| [g.last_receipt(), g.sampled_at()]);
            for t in times.chain([n.last_receipt(), n.sampled_at()]).flatten() {
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
    assert_eq!(lock(a.node()).departed().len(), 1);
    let b = state.hello(hello_with("b-1", 1, &["X"])).unwrap().0;
    assert!(lock(a.node()).departed().is_empty(), "X now lives on b-1");
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
            .gpus()
            .iter()
            .chain(n.departed())
            .map(|g| g.energy_millijoules())
            .sum::<u64>();
    }
    let totals: u64 = state.totals().values().map(|t| t.energy_millijoules).sum();
    assert_eq!(totals, sum);
}

#[test]
fn a_gpu_in_two_nodes_cursors_resumes_where_it_was_heard_last() {
    let cursor = |ts: i64, counter: u64| GpuCursor {
        changed_ns: None,
        last_counter_mj: Some(counter),
        last_timestamp_ns: Some(ts),
        remainder_mw_ns: 0,
        energy_mj: 0,
        counter_resets: 0,
    };
    let node = |gpus: Vec<(Arc<str>, GpuCursor)>| NodeCursor {
        stretch: Vec::new(),
        power: Vec::new(),
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
            .find(|n| &**lock(n).id() == id)
            .unwrap();
        let n = lock(&node);
        let mut v: Vec<_> = n
            .departed()
            .iter()
            .map(|g| (g.uuid().to_string(), g.meter().cursor().last_counter_mj))
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
    assert!(lock(h.node()).live_valid());
    std::thread::sleep(Duration::from_millis(2));
    let only_first = NodeSample {
        node_power: Vec::new(),
        seq: 2,
        timestamp_unix_nanos: t0 + SEC,
        gpus: vec![reading(0, 100, None)],
        host: None,
    };
    ingest(&state, &h, vec![only_first]);
    let n = lock(h.node());
    assert!(!n.live_valid(), "GPU 1's freshness differs from the node's");
    let gpu1_stale =
        n.gpus()[1].last_receipt().unwrap() + n.stale_window(None) + Duration::from_nanos(1);
    let l = parts(|add| n.live(gpu1_stale, n.stale_window(None), add));
    assert_eq!(l.len(), 1);
    assert_eq!(
        (l[0].1.reporting, l[0].1.stale, l[0].1.power_milliwatts),
        (1, 1, 100)
    );
}
