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
                stretch: Vec::new(),
                epoch: 1,
                last_seq: 5,
                gpus: Vec::new(),
                power: vec![(
                    Arc::from("redfish/1"),
                    GpuCursor {
                        changed_ns: None,
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

const KWH: u64 = 3_600_000_000;

/// A node's Hello with a BMC whose energy counter is read every 10 s, its
/// GPUs sampled every 10 s too.
fn hello_with_bmc(node: &str, epoch: u64, gpus: usize) -> Hello {
    let mut bmc = source("redfish", "node", "1", true);
    bmc.interval = Duration::from_secs(10);
    let mut h = with_power(hello(node, epoch, gpus), vec![bmc]);
    h.interval = Duration::from_secs(10);
    h
}

/// Sample `i` (seq `i + 1`, `10 i` s after M0) of a node whose GPUs draw
/// `gpu_mw` each (their counters from 0) and whose BMC counts whole kWh,
/// from 5 kWh, stepping every 180 s: the node draws 20 kW.
fn coarse_sample(i: i64, gpu_mw: &[u64]) -> NodeSample {
    let s = 10 * i;
    let gpus: Vec<(u64, Option<u64>)> =
        gpu_mw.iter().map(|mw| (*mw, Some(mw * s as u64))).collect();
    with_readings(
        sample(i as u64 + 1, M0 + s * SEC, &gpus),
        vec![node_reading(
            0,
            M0 + s * SEC,
            Some(20_000_000),
            Some((5 + i / 18) as u64 * KWH),
        )],
    )
}

/// Node energy booked per (tenant, minute) in a commit.
fn node_minutes(c: &crate::ledger::Commit) -> BTreeMap<(String, i64), u64> {
    let mut by: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for ((t, _, m), d) in &c.buckets {
        *by.entry((t.to_string(), *m)).or_default() += d.node_energy_mj;
    }
    by.retain(|_, v| *v > 0);
    by
}

/// The minute (Unix s) `secs` after M0 falls in.
fn minute_of(secs: i64) -> i64 {
    (M0 + secs * SEC).div_euclid(60 * SEC) * 60
}

/// A whole-kWh counter on a node drawing 20 kW steps every 180 s: each
/// step's kWh was drawn since the counter last changed, so it is spread
/// over those 180 s, and no minute holds more than the node drew in it
/// (20 kW over 60 s), not the 60 kW of a kWh booked into the last 10 s
/// reading interval (which gave false over-contract time).
#[test]
fn a_whole_kwh_step_is_spread_over_the_stretch_since_the_counter_last_changed() {
    let state = new_state(TENANTS, None);
    let h = state.hello(hello_with_bmc("a-1", 1, 1)).unwrap().0;
    let samples = (0..=36).map(|i| coarse_sample(i, &[600_000])).collect();
    let out = ingest(&state, &h, samples);
    assert_eq!(out.node_power.accepted, 37);
    let (_, c) = state.take_pending();
    let minutes = node_minutes(&c);
    assert_eq!(minutes.values().sum::<u64>(), 2 * KWH);
    // 20 kW over a whole minute, and a millijoule of rounding.
    let most = 20_000_000 * 60 + 1;
    for ((t, m), e) in &minutes {
        assert!(*e <= most, "{t} minute {m}: {e} mJ is above 20 kW");
    }
    // M0 is 10 s into its minute: 50 s of the first 180 s stretch.
    assert_eq!(
        minutes[&("lab-a".to_string(), minute_of(0))],
        KWH * 50 / 180
    );
}

/// A node shared by lab-a (GPU 0 at 600 W) and lab-b (GPU 1 at 100 W)
/// with a whole-kWh BMC counter: the step is split by the GPU energy of
/// each since the counter last changed (180 s of it, not the last 10 s
/// reading interval, which left the split mostly to the GPU count).
#[test]
fn a_shared_nodes_coarse_step_is_split_by_the_gpu_energy_since_the_last_change() {
    let state = new_state(TENANTS, None);
    let h = state.hello(hello_with_bmc("a-2", 1, 2)).unwrap().0;
    let samples = (0..=18)
        .map(|i| coarse_sample(i, &[600_000, 100_000]))
        .collect();
    ingest(&state, &h, samples);
    let (_, c) = state.take_pending();
    // G = 108 kJ + 18 kJ over the 180 s; the rest, 3474 kJ, 1:1 by GPUs.
    let by = node_booked(&c);
    assert_eq!(
        (by["lab-a"].0, by["lab-b"].0),
        (108_000_000 + 1_737_000_000, 18_000_000 + 1_737_000_000)
    );
}

/// a-1 moves from lab-a to lab-b 120 s into a 180 s stretch of a
/// whole-kWh counter (at the minute boundary 110 s after M0, by the
/// readings' intervals): each gets the part of the step drawn while it
/// held the GPU, in the minutes it held it; not all of it the tenant at
/// the step.
#[test]
fn a_coarse_step_across_a_lease_change_goes_to_each_holder_for_its_time() {
    const V2: &str = r#"
        [[tenant]]
        id = "lab-a"
        contracted_kw = 1
        nodes = ["a-2"]

        [[tenant]]
        id = "lab-b"
        contracted_kw = 1
        nodes = ["a-1"]
    "#;
    let state = new_state(TENANTS, None);
    let h = state.hello(hello_with_bmc("a-1", 1, 1)).unwrap().0;
    state.reload_tenants_from(Tenants::from_toml(V2).unwrap(), M0 + 120 * SEC);
    let samples = (0..=18).map(|i| coarse_sample(i, &[600_000])).collect();
    ingest(&state, &h, samples);
    let (_, c) = state.take_pending();
    // Readings 1-11 (0-110 s) are lab-a's, 12-18 (110-180 s) lab-b's:
    // GPU energy 66 kJ and 42 kJ, the rest 11:7 by GPU time.
    let by = node_booked(&c);
    assert_eq!(
        (by["lab-a"].0, by["lab-b"].0),
        (66_000_000 + 2_134_000_000, 42_000_000 + 1_358_000_000)
    );
    let change = minute_of(110);
    for ((t, m), _) in node_minutes(&c) {
        assert_eq!(
            t == "lab-a",
            m < change,
            "{t} has node energy in minute {m}"
        );
    }
}

/// A collector restarted in the middle of a coarse counter's stretch (or
/// another one adopting the node) resumes from the node's cursor the
/// time the counter last changed and the GPU energy since: the step is
/// split and placed as without the restart.
#[test]
fn a_restart_inside_a_coarse_stretch_keeps_its_start_and_weights() {
    let gpus = [600_000, 100_000];
    let whole = {
        let state = new_state(TENANTS, None);
        let h = state.hello(hello_with_bmc("a-2", 1, 2)).unwrap().0;
        ingest(
            &state,
            &h,
            (0..=18).map(|i| coarse_sample(i, &gpus)).collect(),
        );
        node_minutes(&state.take_pending().1)
    };
    let first = new_state(TENANTS, None);
    let h = first.hello(hello_with_bmc("a-2", 1, 2)).unwrap().0;
    ingest(
        &first,
        &h,
        (0..=9).map(|i| coarse_sample(i, &gpus)).collect(),
    );
    let (_, c) = first.take_pending();
    let mut booked = node_minutes(&c);
    let cursor = c.nodes[&Arc::from("a-2")].clone();
    let second = new_state(TENANTS, None);
    second.restore(crate::ledger::Snapshot {
        nodes: vec![("a-2".into(), cursor)],
        ..Default::default()
    });
    let h = second.hello(hello_with_bmc("a-2", 1, 2)).unwrap().0;
    ingest(
        &second,
        &h,
        (10..=18).map(|i| coarse_sample(i, &gpus)).collect(),
    );
    for (k, e) in node_minutes(&second.take_pending().1) {
        *booked.entry(k).or_default() += e;
    }
    assert_eq!(booked, whole);
}

/// Lab-b holds a-1 by GPU (its `gpus` list), not the node lease.
const A1_TO_LAB_B: &str = r#"
    [[tenant]]
    id = "lab-a"
    contracted_kw = 1
    nodes = ["a-2"]

    [[tenant]]
    id = "lab-b"
    contracted_kw = 1
    nodes = ["a-1"]
"#;

/// Sample `i` (seq `i + 1`) `secs` after M0 of a node whose GPUs draw
/// `gpu_mw` each over `gpu_secs` of their own, and whose BMC counts whole
/// kWh (`kwh`).
fn coarse_at(i: u64, secs: i64, gpu_mw: &[u64], gpu_secs: u64, kwh: u64) -> NodeSample {
    let gpus: Vec<(u64, Option<u64>)> =
        gpu_mw.iter().map(|mw| (*mw, Some(mw * gpu_secs))).collect();
    with_readings(
        sample(i + 1, M0 + secs * SEC, &gpus),
        vec![node_reading(
            0,
            M0 + secs * SEC,
            Some(20_000_000),
            Some(kwh * KWH),
        )],
    )
}

/// A whole-kWh counter standing at 0 (a new BMC, or one whose counter
/// restarted) is as coarse as one standing at 5 kWh: its first step was
/// drawn over all the readings since it read 0, not in the last interval.
#[test]
fn a_coarse_counter_standing_at_zero_spreads_its_first_step_over_the_stretch() {
    let state = new_state(TENANTS, None);
    let h = state.hello(hello_with_bmc("a-1", 1, 1)).unwrap().0;
    let samples = (0..=18u64)
        .map(|i| coarse_at(i, 10 * i as i64, &[600_000], 10 * i, i / 18))
        .collect();
    ingest(&state, &h, samples);
    let minutes = node_minutes(&state.take_pending().1);
    assert_eq!(minutes.values().sum::<u64>(), KWH);
    for ((t, m), e) in &minutes {
        assert!(
            *e <= 20_000_000 * 60 + 1,
            "{t} minute {m}: {e} mJ is above 20 kW"
        );
    }
    assert_eq!(
        minutes[&("lab-a".to_string(), minute_of(0))],
        KWH * 50 / 180
    );
}

/// a-1 is lab-a's for 90 s, then off for two days, in which its lease
/// moves to lab-b, then lab-b's for 90 s when the whole-kWh counter
/// steps: the two days without readings are no GPU time, so the host's
/// part goes 1:1 by the time each held the GPU, each in its own minutes,
/// not nearly all of it to lab-b spread over the two days.
#[test]
fn a_coarse_stretch_across_a_node_down_for_days_weighs_only_covered_time() {
    const DAY: i64 = 86_400;
    let state = new_state(TENANTS, None);
    let h = state.hello(hello_with_bmc("a-1", 1, 1)).unwrap().0;
    state.reload_tenants_from(Tenants::from_toml(A1_TO_LAB_B).unwrap(), M0 + DAY * SEC);
    let mut samples: Vec<NodeSample> = (0..=9u64)
        .map(|i| coarse_at(i, 10 * i as i64, &[600_000], 10 * i, 5))
        .collect();
    // The GPU's counter stood still while the node was off.
    samples.extend((0..=9u64).map(|k| {
        let kwh = if k == 9 { 6 } else { 5 };
        coarse_at(
            10 + k,
            2 * DAY + 10 * k as i64,
            &[600_000],
            90 + 10 * k,
            kwh,
        )
    }));
    ingest(&state, &h, samples);
    let c = state.take_pending().1;
    let by = node_booked(&c);
    // G = 54 kJ each; the rest, 3492 kJ, 90 s : 90 s.
    assert_eq!(
        (by["lab-a"].0, by["lab-b"].0),
        (54_000_000 + 1_746_000_000, 54_000_000 + 1_746_000_000)
    );
    for ((t, m), _) in node_minutes(&c) {
        let late = m >= minute_of(2 * DAY);
        assert_eq!(t == "lab-b", late, "{t} has node energy in minute {m}");
        assert!(
            m <= minute_of(90) || late,
            "{t} has node energy in minute {m}"
        );
    }
}

/// a-1 goes lab-a, lab-b, lab-a inside one 180 s stretch of a whole-kWh
/// counter (lab-b holding it over the minute 50-110 s after M0, by the
/// readings' intervals): lab-a's share lies in its own minutes, none in
/// lab-b's.
#[test]
fn a_lease_away_and_back_inside_a_stretch_places_each_share_in_its_holders_minutes() {
    let state = new_state(TENANTS, None);
    let h = state.hello(hello_with_bmc("a-1", 1, 1)).unwrap().0;
    state.reload_tenants_from(Tenants::from_toml(A1_TO_LAB_B).unwrap(), M0 + 60 * SEC);
    state.reload_tenants_from(Tenants::from_toml(TENANTS).unwrap(), M0 + 120 * SEC);
    let samples = (0..=18).map(|i| coarse_sample(i, &[600_000])).collect();
    ingest(&state, &h, samples);
    let c = state.take_pending().1;
    let minutes = node_minutes(&c);
    assert_eq!(minutes.values().sum::<u64>(), KWH);
    for (t, m) in minutes.keys() {
        assert_eq!(
            t == "lab-b",
            *m == minute_of(50),
            "{t} has node energy in minute {m}"
        );
    }
}

/// A stretch longer than the spread cap (7 days): a whole-kWh counter on
/// a node drawing little steps after 10 days; lab-a held the node only
/// on the first day, lab-b since. The step is placed over the last 7
/// days, and lab-a, whose GPU time lies all before them, gets none of it
/// (not a tenth of it spread over days it was not there).
#[test]
fn a_stretch_beyond_the_spread_cap_weighs_and_places_only_its_last_seven_days() {
    const HOUR: i64 = 3_600;
    let state = new_state(TENANTS, None);
    let mut bmc = source("redfish", "node", "1", true);
    bmc.interval = Duration::from_secs(HOUR as u64);
    let mut hello = with_power(hello("a-1", 1, 1), vec![bmc]);
    hello.interval = Duration::from_secs(HOUR as u64);
    let h = state.hello(hello).unwrap().0;
    state.reload_tenants_from(
        Tenants::from_toml(A1_TO_LAB_B).unwrap(),
        M0 + 24 * HOUR * SEC,
    );
    // The GPU idle (its counter still), the counter at 5 kWh until 240 h.
    let samples = (0..=240u64)
        .map(|i| {
            let kwh = if i == 240 { 6 } else { 5 };
            let ts = M0 + i as i64 * HOUR * SEC;
            with_readings(
                sample(i + 1, ts, &[(1_000, Some(0))]),
                vec![node_reading(0, ts, Some(4_000), Some(kwh * KWH))],
            )
        })
        .collect();
    ingest(&state, &h, samples);
    let c = state.take_pending().1;
    let minutes = node_minutes(&c);
    assert_eq!(minutes.values().sum::<u64>(), KWH);
    let cap = minute_of(240 * HOUR - 7 * 24 * HOUR);
    for (t, m) in minutes.keys() {
        assert_eq!(t.as_str(), "lab-b", "{t} has node energy in minute {m}");
        assert!(
            *m >= cap,
            "{t} has node energy in minute {m}, before the cap"
        );
    }
}

/// A node without a whole-node source (none at all, or RAPL zones
/// only) books no node energy, so it keeps no stretch: its cursor does
/// not grow with every tenant that ever drew GPU energy on it.
#[test]
fn a_node_without_a_whole_node_source_keeps_no_stretch() {
    let state = new_state(TENANTS, None);
    let bare = state.hello(hello("a-1", 1, 1)).unwrap().0;
    let rapl = state
        .hello(with_power(
            hello("a-2", 1, 2),
            vec![source("rapl", "cpu", "package-0", true)],
        ))
        .unwrap()
        .0;
    ingest(
        &state,
        &bare,
        (0..5)
            .map(|i| sample(i + 1, M0 + i as i64 * SEC, &[(0, Some(i * 100_000))]))
            .collect(),
    );
    ingest(
        &state,
        &rapl,
        (0..5)
            .map(|i| {
                let ts = M0 + i as i64 * SEC;
                let e = Some(i * 100_000);
                with_readings(
                    sample(i + 1, ts, &[(0, e), (0, e)]),
                    vec![node_reading(0, ts, Some(1), e)],
                )
            })
            .collect(),
    );
    let c = state.take_pending().1;
    for node in ["a-1", "a-2"] {
        assert_eq!(c.nodes[&Arc::from(node)].stretch, Vec::new(), "{node}");
    }
}

/// The whole-node source changes (redfish, then IPMI) and the first one
/// comes back: its counter ran on all the while, but the time between is
/// IPMI's, booked already. Its first reading back is a new baseline, so
/// no millijoule is booked twice: the node energy is the sum of each
/// source's deltas while it was the node's.
#[test]
fn a_whole_node_source_that_comes_back_books_nothing_another_one_booked() {
    let state = new_state(TENANTS, None);
    let redfish = || {
        with_power(
            hello("a-1", 0, 1),
            vec![source("redfish", "node", "1", true)],
        )
    };
    let ipmi = || {
        with_power(
            hello("a-1", 0, 1),
            vec![source("ipmi", "node", "node", true)],
        )
    };
    // Both counters count 1 kW (1000 J a second) from 0 at M0.
    let at = |seq: u64, s: i64| {
        with_readings(
            sample(seq, M0 + s * SEC, &[(0, Some(s as u64 * 100_000))]),
            vec![node_reading(
                0,
                M0 + s * SEC,
                Some(1_000_000),
                Some(s as u64 * 1_000_000),
            )],
        )
    };
    let h = state
        .hello(Hello {
            epoch: 1,
            ..redfish()
        })
        .unwrap()
        .0;
    ingest(&state, &h, (0..=5).map(|s| at(s as u64 + 1, s)).collect());
    let h = state.hello(Hello { epoch: 2, ..ipmi() }).unwrap().0;
    ingest(&state, &h, (10..=15).map(|s| at(s as u64 - 9, s)).collect());
    let h = state
        .hello(Hello {
            epoch: 3,
            ..redfish()
        })
        .unwrap()
        .0;
    ingest(
        &state,
        &h,
        (20..=25).map(|s| at(s as u64 - 19, s)).collect(),
    );
    let c = state.take_pending().1;
    // 5 s of each run, each from its own baseline.
    assert_eq!(node_booked(&c)["lab-a"].0, 3 * 5_000_000);
}
