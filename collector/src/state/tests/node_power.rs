//! Node power: readings of a node's power sources turned into node energy,
//! split among the tenants with GPUs on the node and booked with the GPU
//! energy of the same batch; bad readings dropped alone.

use super::*;
use crate::edge::{MAX_NODE_POWER_MILLIWATTS, MAX_STORED, NodePowerReading, NodePowerSource};
use crate::events::NodePowerReject;

/// T0 rounded down to its minute, plus 10 s: the tests' readings stay in
/// one minute.
const M0: i64 = T0 - T0.rem_euclid(60 * SEC) + 10 * SEC;

fn source(kind: &str, domain: &str, name: &str, counter: bool) -> NodePowerSource {
    NodePowerSource {
        kind: kind.to_string(),
        domain: domain.to_string(),
        name: name.to_string(),
        energy_counter_supported: counter,
        interval: Duration::from_secs(1),
    }
}

fn with_power(mut h: Hello, sources: Vec<NodePowerSource>) -> Hello {
    h.node_power_sources = sources;
    h
}

fn node_reading(source: u32, ts: i64, power: Option<u64>, energy: Option<u64>) -> NodePowerReading {
    NodePowerReading {
        source,
        timestamp_unix_nanos: ts,
        power_milliwatts: power,
        energy_millijoules: energy,
    }
}

fn with_readings(mut s: NodeSample, readings: Vec<NodePowerReading>) -> NodeSample {
    s.node_power = readings;
    s
}

/// (node energy, node estimated, node ns) booked per tenant in the pending
/// commit, over all minutes.
fn node_booked(c: &crate::ledger::Commit) -> BTreeMap<String, (u64, u64, u64)> {
    let mut by: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for ((t, _, _), d) in &c.buckets {
        let e = by.entry(t.to_string()).or_default();
        e.0 += d.node_energy_mj;
        e.1 += d.node_estimated_mj;
        e.2 += d.node_ns;
    }
    by.retain(|_, v| *v != (0, 0, 0));
    by
}

use std::collections::BTreeMap;

#[test]
fn a_shared_nodes_counter_energy_is_split_by_gpu_energy_and_gpus() {
    // a-2's GPU 0 is lab-a's (the node lease), GPU 1 lab-b's (by UUID).
    let state = new_state(TENANTS, None);
    let h = state
        .hello(with_power(
            hello("a-2", 1, 2),
            vec![
                source("redfish", "node", "1", true),
                source("rapl", "cpu", "package-0", true),
            ],
        ))
        .unwrap()
        .0;
    let base = with_readings(
        sample(1, M0, &[(0, Some(0)), (0, Some(0))]),
        vec![
            node_reading(0, M0, Some(1_000_000), Some(5_000_000)),
            node_reading(1, M0, Some(200_000), Some(0)),
        ],
    );
    // 1 s later: GPUs used 300 J and 100 J, the node 1000 J (the CPU
    // package 150 J of it, which is not added).
    let next = with_readings(
        sample(2, M0 + SEC, &[(0, Some(300_000)), (0, Some(100_000))]),
        vec![
            node_reading(0, M0 + SEC, Some(1_000_000), Some(6_000_000)),
            node_reading(1, M0 + SEC, Some(150_000), Some(150_000)),
        ],
    );
    let out = ingest(&state, &h, vec![base, next]);
    assert_eq!(out.accepted, 2);
    assert_eq!(out.node_power.accepted, 4);
    let (_, c) = state.take_pending();
    // E = 1000 J >= G = 400 J: own GPU energy plus 600 J by GPUs (1:1).
    assert_eq!(
        node_booked(&c),
        BTreeMap::from([
            ("lab-a".to_string(), (300_000 + 300_000, 0, SEC as u64)),
            ("lab-b".to_string(), (100_000 + 300_000, 0, SEC as u64)),
        ])
    );
    let cursor = &c.nodes[&Arc::from("a-2")];
    let keys: Vec<(&str, Option<u64>)> = cursor
        .power
        .iter()
        .map(|(k, g)| (&**k, g.last_counter_mj))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("redfish/1", Some(6_000_000)),
            ("rapl/package-0", Some(150_000))
        ]
    );
}

#[test]
fn below_the_gpus_energy_the_node_is_split_by_it() {
    let state = new_state(TENANTS, None);
    let h = state
        .hello(with_power(
            hello("a-2", 1, 2),
            vec![source("ipmi", "node", "node", true)],
        ))
        .unwrap()
        .0;
    let out = ingest(
        &state,
        &h,
        vec![
            with_readings(
                sample(1, M0, &[(0, Some(0)), (0, Some(0))]),
                vec![node_reading(0, M0, None, Some(0))],
            ),
            with_readings(
                sample(2, M0 + SEC, &[(0, Some(300_000)), (0, Some(100_000))]),
                vec![node_reading(0, M0 + SEC, None, Some(300_001))],
            ),
        ],
    );
    assert_eq!(out.node_power.accepted, 2);
    let (_, c) = state.take_pending();
    // 300 001 mJ by 3:1, the odd millijoule to the larger remainder.
    let booked = node_booked(&c);
    assert_eq!(booked["lab-a"].0, 225_001);
    assert_eq!(booked["lab-b"].0, 75_000);
}

#[test]
fn a_source_without_a_counter_is_integrated_and_flagged_estimated() {
    let state = new_state(TENANTS, None);
    let h = state
        .hello(with_power(
            hello("a-1", 1, 1),
            vec![source("redfish", "node", "1", false)],
        ))
        .unwrap()
        .0;
    let samples = (0..4)
        .map(|i| {
            with_readings(
                sample(i + 1, M0 + i as i64 * SEC, &[(0, Some(i * 100_000))]),
                vec![node_reading(0, M0 + i as i64 * SEC, Some(500_000), None)],
            )
        })
        .collect();
    ingest(&state, &h, samples);
    let (_, c) = state.take_pending();
    // 500 W over 3 s.
    assert_eq!(
        node_booked(&c),
        BTreeMap::from([("lab-a".to_string(), (1_500_000, 1_500_000, 3 * SEC as u64))])
    );
}

#[test]
fn a_bad_node_reading_is_dropped_alone_and_the_samples_gpu_energy_kept() {
    let state = new_state(TENANTS, None);
    let h = state
        .hello(with_power(
            hello("a-1", 1, 1),
            vec![source("redfish", "node", "1", true)],
        ))
        .unwrap()
        .0;
    let out = ingest(
        &state,
        &h,
        vec![
            with_readings(
                sample(1, M0, &[(0, Some(0))]),
                vec![node_reading(0, M0, Some(1), Some(1_000))],
            ),
            with_readings(
                sample(2, M0 + SEC, &[(0, Some(400_000))]),
                vec![
                    node_reading(7, M0 + SEC, Some(1), Some(2_000)),
                    node_reading(0, M0 + SEC, Some(MAX_NODE_POWER_MILLIWATTS + 1), None),
                    node_reading(0, i64::MAX, Some(1), Some(2_000)),
                    node_reading(0, M0 + SEC, Some(1), Some(MAX_STORED + 1)),
                    // Not after the source's last reading: sent before.
                    node_reading(0, M0, Some(1), Some(1_000)),
                    node_reading(0, M0 + SEC, Some(1), Some(501_000)),
                ],
            ),
        ],
    );
    assert_eq!(out.accepted, 2);
    assert!(out.rejected.is_empty());
    assert_eq!(out.node_power.accepted, 2);
    assert_eq!(out.node_power.duplicate, 1);
    for reason in NodePowerReject::ALL {
        assert_eq!(state.counters.node_power_rejected(reason), 1, "{reason:?}");
    }
    assert_eq!(
        state.counters.node_power_accepted.load(Ordering::Relaxed),
        2
    );
    assert_eq!(
        state.counters.node_power_duplicate.load(Ordering::Relaxed),
        1
    );
    assert_eq!(gpu_energy(&h), vec![400_000]);
    let (_, c) = state.take_pending();
    assert_eq!(node_booked(&c)["lab-a"].0, 500_000);
}

#[test]
fn a_restored_power_cursor_counts_the_energy_since_it_once() {
    let state = new_state(TENANTS, None);
    state.restore(crate::ledger::Snapshot {
        nodes: vec![(
            "a-1".into(),
            NodeCursor {
                epoch: 1,
                last_seq: 5,
                gpus: Vec::new(),
                power: vec![(
                    Arc::from("redfish/1"),
                    GpuCursor {
                        last_counter_mj: Some(10_000),
                        last_timestamp_ns: Some(M0),
                        remainder_mw_ns: 0,
                        energy_mj: 10_000,
                        counter_resets: 0,
                    },
                )],
            },
        )],
        ..Default::default()
    });
    let h = state
        .hello(with_power(
            hello("a-1", 1, 1),
            vec![source("redfish", "node", "1", true)],
        ))
        .unwrap()
        .0;
    let out = ingest(
        &state,
        &h,
        vec![
            // Re-sent: at or before the cursor.
            with_readings(sample(5, M0, &[(0, Some(0))]), vec![]),
            with_readings(
                sample(6, M0 + SEC, &[(0, Some(0))]),
                vec![
                    node_reading(0, M0, Some(1), Some(10_000)),
                    node_reading(0, M0 + SEC, Some(1), Some(12_500)),
                ],
            ),
        ],
    );
    assert_eq!(out.duplicate, 1);
    assert_eq!(out.node_power.duplicate, 1);
    assert_eq!(out.node_power.accepted, 1);
    let (_, c) = state.take_pending();
    assert_eq!(node_booked(&c)["lab-a"].0, 2_500);
    assert_eq!(c.nodes[&Arc::from("a-1")].power[0].1.energy_mj, 12_500);
}

/// A source that leaves the node's Hello and comes back later (at another
/// index) counts on from its last reading: its energy over the whole time
/// is its counter's difference, once, and nothing is counted while it is
/// not announced.
#[test]
fn a_source_that_leaves_and_returns_counts_nothing_twice() {
    let state = new_state(TENANTS, None);
    let bmc = || source("redfish", "node", "1", true);
    let rapl = || source("rapl", "cpu", "package-0", true);
    let mut booked = 0u64;
    let mut take = |state: &State| {
        let (_, c) = state.take_pending();
        booked += node_booked(&c).values().map(|v| v.0).sum::<u64>();
    };
    let h = state
        .hello(with_power(hello("a-2", 1, 2), vec![bmc(), rapl()]))
        .unwrap()
        .0;
    let gpus = |e: u64| [(0, Some(e)), (0, Some(e))];
    let out = ingest(
        &state,
        &h,
        vec![
            with_readings(
                sample(1, M0, &gpus(0)),
                vec![node_reading(0, M0, Some(1_000_000), Some(5_000_000))],
            ),
            with_readings(
                sample(2, M0 + SEC, &gpus(100_000)),
                vec![node_reading(0, M0 + SEC, Some(1_000_000), Some(6_000_000))],
            ),
        ],
    );
    assert_eq!(out.node_power.accepted, 2);
    take(&state);
    // The BMC leaves (a new agent run without it): RAPL only.
    let h = state
        .hello(with_power(hello("a-2", 2, 2), vec![rapl()]))
        .unwrap()
        .0;
    let out = ingest(
        &state,
        &h,
        vec![with_readings(
            sample(1, M0 + 2 * SEC, &gpus(200_000)),
            vec![node_reading(0, M0 + 2 * SEC, Some(150_000), Some(10_000))],
        )],
    );
    assert_eq!(out.node_power.accepted, 1);
    take(&state);
    // Back, second in the list now; its counter ran on meanwhile.
    let h = state
        .hello(with_power(hello("a-2", 3, 2), vec![rapl(), bmc()]))
        .unwrap()
        .0;
    let out = ingest(
        &state,
        &h,
        vec![
            with_readings(
                sample(1, M0 + 3 * SEC, &gpus(300_000)),
                vec![node_reading(
                    1,
                    M0 + 3 * SEC,
                    Some(1_000_000),
                    Some(8_000_000),
                )],
            ),
            with_readings(
                sample(2, M0 + 4 * SEC, &gpus(400_000)),
                vec![node_reading(
                    1,
                    M0 + 4 * SEC,
                    Some(1_000_000),
                    Some(9_000_000),
                )],
            ),
        ],
    );
    assert_eq!(out.node_power.accepted, 2);
    take(&state);
    assert_eq!(
        booked,
        9_000_000 - 5_000_000,
        "the BMC counter's difference, once"
    );
}

/// A BMC's whole-kWh counter on a node drawing 20 kW steps once every
/// 180 s, read every 10 s: the node energy booked over half an hour is the
/// counter's difference, all of it measured, none estimated.
#[test]
fn a_whole_kwh_counter_is_booked_to_its_difference() {
    const KWH: u64 = 3_600_000_000;
    let state = new_state(TENANTS, None);
    let mut bmc = source("redfish", "node", "1", true);
    bmc.interval = Duration::from_secs(10);
    let h = state
        .hello(with_power(hello("a-1", 1, 1), vec![bmc]))
        .unwrap()
        .0;
    // 20 kW since some time before: whole kWh only.
    let counter = |s: i64| (777 + s) as u64 * 20_000_000 / KWH * KWH;
    let samples: Vec<NodeSample> = (0..=180)
        .map(|i| {
            let s = 10 * i;
            with_readings(
                sample(i as u64 + 1, M0 + s * SEC, &[(0, Some(s as u64 * 1_000))]),
                vec![node_reading(
                    0,
                    M0 + s * SEC,
                    Some(20_000_000),
                    Some(counter(s)),
                )],
            )
        })
        .collect();
    let out = ingest(&state, &h, samples);
    assert_eq!(out.node_power.accepted, 181);
    let (_, c) = state.take_pending();
    let (energy, estimated, _) = node_booked(&c)
        .into_values()
        .fold((0, 0, 0), |a, v| (a.0 + v.0, a.1 + v.1, a.2 + v.2));
    assert!(counter(1_800) - counter(0) >= 9 * KWH);
    assert_eq!(energy, counter(1_800) - counter(0));
    assert_eq!(estimated, 0);
}
