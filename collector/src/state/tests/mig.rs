//! MIG boards: the board's energy, counted once, split among its
//! instances by GPU-instance slice share; layouts the collector cannot
//! use.

use super::ledger::booked;
use super::*;
use crate::edge::{Mig, MigInstance, MigRefusal};

/// lab-a leases the 3g instance, lab-b the 2g one; lab-c leases node m-1
/// (so the 1g instance, leased by no one, and the board's SMs in no
/// instance are lab-c's).
const MIG_TENANTS: &str = r#"
    [[tenant]]
    id = "lab-a"
    contracted_kw = 1
    gpus = ["MIG-3g"]

    [[tenant]]
    id = "lab-b"
    contracted_kw = 1
    gpus = ["MIG-2g"]

    [[tenant]]
    id = "lab-c"
    contracted_kw = 1
    nodes = ["m-1"]
"#;

/// A compute instance taking its whole GPU instance, on a board of 14
/// SMs a slice.
fn instance(uuid: &str, gi: u32, sms: u32) -> MigInstance {
    MigInstance {
        uuid: uuid.into(),
        gpu_instance_id: gi,
        compute_instance_id: 0,
        multiprocessor_count: sms,
        gpu_instance_slice_count: sms / 14,
        compute_instance_slice_count: sms / 14,
        profile: format!("{}g", sms / 14),
    }
}

/// 3g + 2g + 1g of a 98-SM, 7-slice board (one slice in no instance).
fn three_instances() -> Mig {
    Mig::Split {
        board_sm: 98,
        board_slices: 7,
        instances: vec![
            instance("MIG-3g", 1, 42),
            instance("MIG-2g", 5, 28),
            instance("MIG-1g", 13, 14),
        ],
    }
}

/// A layout of `m` alone on the 98-SM, 7-slice board.
fn only(m: MigInstance) -> Mig {
    Mig::Split {
        board_sm: 98,
        board_slices: 7,
        instances: vec![m],
    }
}

/// Board 0's parts on m-1 and what each counted, as /metrics shows them.
fn part_energies(h: &StreamHandle) -> Vec<(String, u64)> {
    let n = lock(h.node());
    n.gpus()[0]
        .mig
        .as_deref()
        .unwrap()
        .parts
        .iter()
        .map(|p| (p.uuid.to_string(), p.energy_mj))
        .collect()
}

fn mig_hello(epoch: u64, mig: Mig) -> Hello {
    let mut h = hello("m-1", epoch, 2);
    h.gpus[0].mig = mig;
    h
}

/// Each tenant's energy in the pending commit's buckets on m-1.
fn booked_energy(c: &crate::ledger::Commit, tenant: &str) -> u64 {
    booked(c, tenant, "m-1").energy_mj
}

#[test]
fn a_mig_boards_energy_is_split_by_sm_share_and_sums_to_the_board_exactly() {
    // Invariant: the board's counter delta is counted once and split
    // among its instances (and its SMs in no instance) by SM share,
    // exactly: the parts sum to the delta to the millijoule.
    let state = new_state(MIG_TENANTS, None);
    let (h, _) = state.hello(mig_hello(1, three_instances())).unwrap();
    // Board 0: 1000 mJ then 1 mJ; GPU 1 (whole): 500 mJ.
    ingest(
        &state,
        &h,
        vec![
            sample(1, T0, &[(1, Some(10_000)), (1, Some(0))]),
            sample(2, T0 + SEC, &[(1, Some(11_000)), (1, Some(500))]),
            sample(3, T0 + 2 * SEC, &[(1, Some(11_001)), (1, Some(500))]),
        ],
    );
    let (_, c) = state.take_pending();
    // 1000 mJ: 428.57 / 285.71 / 142.86 (+ 142.86 for the rest) -> 428,
    // 286, 143 + 143; then 1 mJ to the largest share (lab-a).
    assert_eq!(booked_energy(&c, "lab-a"), 429);
    assert_eq!(booked_energy(&c, "lab-b"), 286);
    assert_eq!(booked_energy(&c, "lab-c"), 286 + 500);
    assert_eq!(booked_energy(&c, UNASSIGNED), 0);
    assert_eq!(tenant_energy(&state, "lab-a"), 429);
    assert_eq!(tenant_energy(&state, "lab-b"), 286);
    assert_eq!(tenant_energy(&state, "lab-c"), 786);
    // The board's own meter counts its energy once.
    assert_eq!(gpu_energy(&h), [1001, 500]);
    // GPU time of the board (2 s) apportioned alike; each part is a
    // sample of its own.
    let gpu_ns = |t| booked(&c, t, "m-1").gpu_ns;
    assert_eq!(
        gpu_ns("lab-a") + gpu_ns("lab-b") + gpu_ns("lab-c"),
        4 * SEC as u64
    );
    // Split second by second: within one nanosecond a second of 42/98.
    assert!(gpu_ns("lab-a").abs_diff(2 * SEC as u64 * 42 / 98) <= 2);
    // The parts as /metrics shows them.
    let n = lock(h.node());
    let parts: Vec<(String, String, u64, u64)> = n.gpus()[0]
        .mig
        .as_deref()
        .unwrap()
        .parts
        .iter()
        .map(|p| {
            (
                p.uuid.to_string(),
                p.tenant.to_string(),
                p.weight,
                p.energy_mj,
            )
        })
        .collect();
    // Slices 3, 2, 1 and 1 of 7, scaled by the compute slices' lcm (6).
    assert_eq!(
        parts,
        [
            ("MIG-3g".into(), "lab-a".into(), 18, 429),
            ("MIG-2g".into(), "lab-b".into(), 12, 286),
            ("MIG-1g".into(), "lab-c".into(), 6, 143),
            ("m-1-gpu0".into(), "lab-c".into(), 6, 143),
        ]
    );
}

#[test]
fn a_mig_layout_the_collector_cannot_use_meters_the_board_whole_and_is_counted() {
    // Invariant: a bad layout never loses or doubles energy: the Hello is
    // admitted, the board's energy goes whole to the board's UUID (its
    // lessee, lab-c), and the refusal is counted by reason.
    let bad = |board_sm: u32, instances: Vec<MigInstance>| Mig::Split {
        board_sm,
        board_slices: 7,
        instances,
    };
    let sliced = |board_slices: u32, instances: Vec<MigInstance>| Mig::Split {
        board_sm: 98,
        board_slices,
        instances,
    };
    let ci = |uuid: &str, gi: u32, g: u32, c: u32| MigInstance {
        gpu_instance_slice_count: g,
        compute_instance_slice_count: c,
        ..instance(uuid, gi, 14)
    };
    let cases: Vec<(&str, Mig, MigRefusal)> = vec![
        (
            "SMs beyond the board's",
            bad(
                98,
                vec![instance("MIG-3g", 1, 56), instance("MIG-2g", 5, 56)],
            ),
            MigRefusal::SmsBeyondBoard,
        ),
        (
            "an instance UUID twice",
            bad(
                98,
                vec![instance("MIG-3g", 1, 42), instance("MIG-3g", 2, 42)],
            ),
            MigRefusal::DuplicateUuid,
        ),
        (
            "an instance UUID that is this Hello's board's",
            bad(98, vec![instance("m-1-gpu1", 1, 42)]),
            MigRefusal::UuidPrefix,
        ),
        (
            "another node's board UUID as an instance",
            bad(
                98,
                vec![instance("GPU-00000000-0000-0000-0000-000000000009", 1, 42)],
            ),
            MigRefusal::UuidPrefix,
        ),
        (
            "no board SM count",
            bad(0, vec![instance("MIG-3g", 1, 42)]),
            MigRefusal::BoardSmCount,
        ),
        (
            "an instance without SMs",
            bad(98, vec![instance("MIG-3g", 1, 0)]),
            MigRefusal::InstanceSmCount,
        ),
        (
            "an empty instance UUID",
            bad(98, vec![instance("", 1, 42)]),
            MigRefusal::Label,
        ),
        (
            "too many instances",
            bad(
                98 * 100,
                (0..65)
                    .map(|i| instance(&format!("MIG-{i}"), i, 1))
                    .collect(),
            ),
            MigRefusal::TooMany,
        ),
        (
            "an absurd board SM count",
            bad(1025, vec![instance("MIG-3g", 1, 42)]),
            MigRefusal::BoardSmCount,
        ),
        (
            "no board slice count (an agent sending SM counts only)",
            sliced(0, vec![instance("MIG-3g", 1, 42)]),
            MigRefusal::BoardSliceCount,
        ),
        (
            "an absurd board slice count",
            sliced(65, vec![instance("MIG-3g", 1, 42)]),
            MigRefusal::BoardSliceCount,
        ),
        (
            "an instance without slices",
            sliced(7, vec![ci("MIG-3g", 1, 0, 0)]),
            MigRefusal::InstanceSliceCount,
        ),
        (
            "more compute slices than the GPU instance's",
            sliced(7, vec![ci("MIG-3g", 1, 2, 3)]),
            MigRefusal::InstanceSliceCount,
        ),
        (
            "compute instances of one GPU instance disagreeing on its slices",
            sliced(7, vec![ci("MIG-a", 1, 3, 1), ci("MIG-b", 1, 2, 1)]),
            MigRefusal::InstanceSliceCount,
        ),
        (
            "compute slices beyond their GPU instance's",
            sliced(7, vec![ci("MIG-a", 1, 3, 2), ci("MIG-b", 1, 3, 2)]),
            MigRefusal::InstanceSliceCount,
        ),
        (
            "GPU instances' slices beyond the board's",
            sliced(7, vec![ci("MIG-a", 1, 4, 4), ci("MIG-b", 2, 4, 4)]),
            MigRefusal::SlicesBeyondBoard,
        ),
    ];
    for (what, mig, reason) in cases {
        let state = new_state(MIG_TENANTS, None);
        let (h, _) = state
            .hello(mig_hello(1, mig))
            .unwrap_or_else(|e| panic!("{what}: the Hello must be admitted: {e}"));
        assert_eq!(state.counters.mig_layouts_refused(reason), 1, "{what}");
        for other in MigRefusal::ALL.into_iter().filter(|r| *r != reason) {
            assert_eq!(state.counters.mig_layouts_refused(other), 0, "{what}");
        }
        assert!(lock(h.node()).gpus()[0].mig.is_none(), "{what}");
        ingest(
            &state,
            &h,
            vec![
                sample(1, T0, &[(1, Some(10_000)), (1, Some(0))]),
                sample(2, T0 + SEC, &[(1, Some(11_000)), (1, Some(0))]),
            ],
        );
        let (_, c) = state.take_pending();
        assert_eq!(booked_energy(&c, "lab-c"), 1000, "{what}");
        assert_eq!(booked_energy(&c, "lab-a"), 0, "{what}");
        assert_eq!(booked_energy(&c, "lab-b"), 0, "{what}");
    }
}

#[test]
fn a_new_layout_said_at_a_hello_splits_the_energy_from_then_on() {
    // Invariant: across a Hello with a new layout (the agent's re-read),
    // the board's meter goes on (nothing lost at the change) and each
    // delta is split by the layout in force when it is applied.
    let state = new_state(MIG_TENANTS, None);
    let (h, _) = state.hello(mig_hello(1, three_instances())).unwrap();
    ingest(
        &state,
        &h,
        vec![
            sample(1, T0, &[(1, Some(0)), (1, Some(0))]),
            sample(2, T0 + SEC, &[(1, Some(980)), (1, Some(0))]),
        ],
    );
    // The same epoch, a new layout: lab-b's 2g gone, the 3g instance
    // grown to all 98 SMs.
    let grown = only(instance("MIG-3g", 1, 98));
    let (h, acked) = state.hello(mig_hello(1, grown)).unwrap();
    assert_eq!(acked, 2);
    ingest(
        &state,
        &h,
        vec![sample(3, T0 + 2 * SEC, &[(1, Some(1_980)), (1, Some(0))])],
    );
    // 980 mJ by 42/28/14/14, then 1000 mJ to the 3g instance alone.
    assert_eq!(tenant_energy(&state, "lab-a"), 420 + 1000);
    assert_eq!(tenant_energy(&state, "lab-b"), 280);
    assert_eq!(tenant_energy(&state, "lab-c"), 140 + 140);
    assert_eq!(gpu_energy(&h), [1980, 0]);
    // And MIG mode off: the board whole, to its lessee.
    let (h, _) = state.hello(mig_hello(1, Mig::Whole)).unwrap();
    ingest(
        &state,
        &h,
        vec![sample(4, T0 + 3 * SEC, &[(1, Some(2_000)), (1, Some(0))])],
    );
    assert_eq!(tenant_energy(&state, "lab-c"), 280 + 20);
    assert!(lock(h.node()).gpus()[0].mig.is_none());
}

/// `mig_hello` announcing the layout under id `layout`.
fn stamped_hello(epoch: u64, mig: Mig, layout: u64) -> Hello {
    let mut h = mig_hello(epoch, mig);
    h.gpus[0].mig_layout = Some(layout);
    h
}

/// `sample`, board 0's reading stamped with `layout`.
fn stamped(seq: u64, ts: i64, gpus: &[(u64, Option<u64>)], layout: u64) -> NodeSample {
    let mut s = sample(seq, ts, gpus);
    s.gpus[0].mig_layout = Some(layout);
    s
}

#[test]
fn readings_are_split_by_the_layout_they_were_taken_under() {
    // Invariant: a reading stamped with an earlier layout of its board
    // (taken before the layout changed, delivered after the Hello that
    // announced the new one: a spool kept through an outage) is split by
    // that layout, not by the one in force when it arrives; a layout the
    // collector never heard of meters the board whole to its UUID, and is
    // counted. The parts always sum to the board's delta.
    let state = new_state(MIG_TENANTS, None);
    let (h, _) = state
        .hello(stamped_hello(1, three_instances(), 11))
        .unwrap();
    ingest(
        &state,
        &h,
        vec![stamped(1, T0, &[(1, Some(0)), (1, Some(0))], 11)],
    );
    // The layout changes while the collector hears nothing: the agent's
    // spool holds 980 mJ taken under layout 11 when it says Hello with
    // layout 22 (the 3g instance grown to the whole board).
    let grown = only(instance("MIG-3g", 1, 98));
    let (h, _) = state.hello(stamped_hello(1, grown, 22)).unwrap();
    let out = ingest(
        &state,
        &h,
        vec![
            stamped(2, T0 + SEC, &[(1, Some(980)), (1, Some(0))], 11),
            stamped(3, T0 + 2 * SEC, &[(1, Some(1_980)), (1, Some(0))], 22),
        ],
    );
    assert_eq!(out.mig_layout_unknown, 0);
    // 980 mJ by 3/2/1/1 of layout 11, then 1000 mJ to the 3g alone.
    assert_eq!(tenant_energy(&state, "lab-a"), 420 + 1000);
    assert_eq!(tenant_energy(&state, "lab-b"), 280);
    assert_eq!(tenant_energy(&state, "lab-c"), 140 + 140);
    // A reading stamped with a layout never announced here (its Hello
    // went to a collector before this one's restart): whole, to the
    // board's lessee, and counted.
    let out = ingest(
        &state,
        &h,
        vec![stamped(
            4,
            T0 + 3 * SEC,
            &[(1, Some(2_000)), (1, Some(0))],
            33,
        )],
    );
    assert_eq!(out.mig_layout_unknown, 1);
    assert_eq!(
        state.counters.mig_readings_unsplit.load(Ordering::Relaxed),
        1
    );
    assert_eq!(tenant_energy(&state, "lab-c"), 280 + 20);
    assert_eq!(tenant_energy(&state, "lab-a"), 1420);
    // Back to layout 11: its parts come back with the energy each UUID
    // counted under any layout (what /metrics shows for them goes on:
    // the 3g instance's 1000 mJ of layout 22 included).
    let (h, _) = state
        .hello(stamped_hello(1, three_instances(), 11))
        .unwrap();
    ingest(
        &state,
        &h,
        vec![stamped(
            5,
            T0 + 4 * SEC,
            &[(1, Some(2_700)), (1, Some(0))],
            11,
        )],
    );
    assert_eq!(tenant_energy(&state, "lab-a"), 1420 + 300);
    assert_eq!(gpu_energy(&h), [2700, 0]);
    assert_eq!(
        part_energies(&h),
        [
            ("MIG-3g".into(), 420 + 1000 + 300),
            ("MIG-2g".into(), 280 + 200),
            ("MIG-1g".into(), 140 + 100),
            ("m-1-gpu0".into(), 140 + 100)
        ]
    );
    let n = lock(h.node());
    let g = &n.gpus()[0];
    // Layout 22 is kept as an earlier one now.
    assert_eq!(
        g.earlier_layouts
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        [22]
    );
}

#[test]
fn a_collector_that_never_heard_a_layout_splits_by_the_one_the_hello_lists_as_earlier() {
    // Invariant: after the layout changed while this collector was down
    // (it never heard layout 11), the agent's Hello lists layout 11 as an
    // earlier one of the board, and the spool's readings stamped with it
    // are split by it; an earlier layout the edge refuses is counted, and
    // its readings go whole to the board's UUID.
    let state = new_state(MIG_TENANTS, None);
    let grown = only(instance("MIG-3g", 1, 98));
    let bad = Mig::Split {
        board_sm: 98,
        board_slices: 7,
        // A board's UUID passed off as an instance.
        instances: vec![instance("m-1-gpu1", 1, 42)],
    };
    let mut hl = stamped_hello(1, grown, 22);
    hl.gpus[0].earlier_mig = vec![(11, three_instances()), (44, bad)];
    let (h, _) = state.hello(hl).unwrap();
    assert_eq!(
        state.counters.mig_layouts_refused(MigRefusal::UuidPrefix),
        1
    );
    let out = ingest(
        &state,
        &h,
        vec![
            stamped(1, T0, &[(1, Some(0)), (1, Some(0))], 11),
            stamped(2, T0 + SEC, &[(1, Some(980)), (1, Some(0))], 11),
            stamped(3, T0 + 2 * SEC, &[(1, Some(1_980)), (1, Some(0))], 22),
            stamped(4, T0 + 3 * SEC, &[(1, Some(2_050)), (1, Some(0))], 44),
        ],
    );
    assert_eq!(out.mig_layout_unknown, 0);
    assert_eq!(tenant_energy(&state, "lab-a"), 420 + 1000);
    assert_eq!(tenant_energy(&state, "lab-b"), 280);
    assert_eq!(tenant_energy(&state, "lab-c"), 140 + 140 + 70);
}

#[test]
fn a_part_back_in_a_new_layout_counts_on_from_its_earlier_one() {
    // Invariant: a part's energy counter (capwatch_gpu_mig_energy_joules_total)
    // never goes back while the board keeps a layout that lists it: the
    // 2g instance of layout 11, gone in 22, back in the new layout 33,
    // counts on from what it counted in 11.
    let state = new_state(MIG_TENANTS, None);
    let (h, _) = state
        .hello(stamped_hello(1, three_instances(), 11))
        .unwrap();
    ingest(
        &state,
        &h,
        vec![
            stamped(1, T0, &[(1, Some(0)), (1, Some(0))], 11),
            stamped(2, T0 + SEC, &[(1, Some(980)), (1, Some(0))], 11),
        ],
    );
    let grown = only(instance("MIG-3g", 1, 98));
    state.hello(stamped_hello(1, grown, 22)).unwrap();
    let two_g = only(instance("MIG-2g", 5, 28));
    let (h, _) = state.hello(stamped_hello(1, two_g, 33)).unwrap();
    // 280 mJ of layout 11's 980; the board's rest counted 140 there.
    assert_eq!(
        part_energies(&h),
        [("MIG-2g".into(), 280), ("m-1-gpu0".into(), 140)]
    );
}

#[test]
fn a_hello_without_a_layout_id_keeps_the_last_one_for_late_readings() {
    // Invariant: a board whose Hello comes without a layout id after one
    // with (an agent that could not read the layout at start, or an older
    // agent) keeps the layout it had among the earlier ones: readings of
    // it delivered later are still split by it.
    let state = new_state(MIG_TENANTS, None);
    let (h, _) = state
        .hello(stamped_hello(1, three_instances(), 11))
        .unwrap();
    ingest(
        &state,
        &h,
        vec![stamped(1, T0, &[(1, Some(0)), (1, Some(0))], 11)],
    );
    let (h, _) = state.hello(mig_hello(1, Mig::Whole)).unwrap();
    let out = ingest(
        &state,
        &h,
        vec![stamped(2, T0 + SEC, &[(1, Some(980)), (1, Some(0))], 11)],
    );
    assert_eq!(out.mig_layout_unknown, 0);
    assert_eq!(tenant_energy(&state, "lab-a"), 420);
    assert_eq!(tenant_energy(&state, "lab-b"), 280);
    assert_eq!(tenant_energy(&state, "lab-c"), 280);
}

#[test]
fn an_earlier_layout_may_not_list_another_boards_instance() {
    // Invariant: an earlier layout is checked as a current one is: an
    // instance of another board (current or earlier) in it refuses that
    // layout alone, counted, and its readings go whole to the board.
    let state = new_state(MIG_TENANTS, None);
    let mut hl = stamped_hello(1, three_instances(), 22);
    hl.gpus[1].mig = only(instance("MIG-other", 1, 42));
    let theirs = only(instance("MIG-other", 1, 42));
    hl.gpus[0].earlier_mig = vec![(11, theirs)];
    let (h, _) = state.hello(hl).unwrap();
    assert_eq!(
        state
            .counters
            .mig_layouts_refused(MigRefusal::DuplicateUuid),
        1
    );
    ingest(
        &state,
        &h,
        vec![
            stamped(1, T0, &[(1, Some(0)), (1, Some(0))], 11),
            stamped(2, T0 + SEC, &[(1, Some(980)), (1, Some(0))], 11),
        ],
    );
    // Whole to the board's lessee (lab-c leases the node).
    assert_eq!(tenant_energy(&state, "lab-c"), 980);
    assert_eq!(tenant_energy(&state, "lab-a"), 0);
}

#[test]
fn a_node_power_reading_is_split_by_the_layout_of_its_sample() {
    // Invariant: the whole-node energy of a late sample is shared by the
    // holdings of the layout its GPU readings were taken under.
    use crate::edge::{NodePowerReading, NodePowerSource};
    let m0 = T0 - T0.rem_euclid(60 * SEC) + 10 * SEC;
    let state = new_state(MIG_TENANTS, None);
    let mut hl = stamped_hello(1, three_instances(), 11);
    hl.node_power_sources = vec![NodePowerSource {
        kind: "redfish".into(),
        domain: "node".into(),
        name: "1".into(),
        energy_counter_supported: true,
        interval: Duration::from_secs(1),
    }];
    let (h, _) = state.hello(hl.clone()).unwrap();
    let bmc = |ts: i64, mj: u64| NodePowerReading {
        source: 0,
        timestamp_unix_nanos: ts,
        power_milliwatts: Some(1_000_000),
        energy_millijoules: Some(mj),
    };
    let mut first = stamped(1, m0, &[(0, Some(0)), (0, Some(0))], 11);
    first.node_power = vec![bmc(m0, 5_000_000)];
    ingest(&state, &h, vec![first]);
    // Layout 22: the 3g instance takes the whole board.
    hl.gpus[0].mig = only(instance("MIG-3g", 1, 98));
    hl.gpus[0].mig_layout = Some(22);
    let (h, _) = state.hello(hl).unwrap();
    // A late sample of layout 11: the board drew 980 J, GPU 1 nothing,
    // the node 1000 J.
    let mut next = stamped(2, m0 + SEC, &[(0, Some(980_000)), (0, Some(0))], 11);
    next.node_power = vec![bmc(m0 + SEC, 6_000_000)];
    ingest(&state, &h, vec![next]);
    let (_, c) = state.take_pending();
    let node = |t| {
        let b = booked(&c, t, "m-1");
        assert_eq!(b.node_ns, b.expected_gpu_ns, "{t}: node coverage 1");
        (b.node_energy_mj, b.node_ns)
    };
    // As in a board that never changed layout: lab-b holds 2 of layout
    // 11's 7 slices (none of layout 22's).
    assert_eq!(node("lab-a"), (420_000 + 4_286, 428_571_428));
    assert_eq!(node("lab-b"), (280_000 + 2_857, 285_714_286));
    assert_eq!(node("lab-c"), (280_000 + 12_857, 285_714_286 + SEC as u64));
}

#[test]
fn an_instance_leased_by_uuid_follows_a_tenant_reload() {
    let state = new_state(MIG_TENANTS, None);
    let (h, _) = state.hello(mig_hello(1, three_instances())).unwrap();
    ingest(
        &state,
        &h,
        vec![sample(1, T0, &[(1, Some(0)), (1, Some(0))])],
    );
    // The 1g instance leased to lab-b from now on.
    // In force from before the next sample (booked through the version in
    // force at its time).
    state.reload_tenants_from(
        Tenants::from_toml(&MIG_TENANTS.replace(r#"["MIG-2g"]"#, r#"["MIG-2g", "MIG-1g"]"#))
            .unwrap(),
        T0 + SEC / 2,
    );
    ingest(
        &state,
        &h,
        vec![sample(2, T0 + SEC, &[(1, Some(98)), (1, Some(0))])],
    );
    assert_eq!(tenant_energy(&state, "lab-a"), 42);
    assert_eq!(tenant_energy(&state, "lab-b"), 28 + 14);
    assert_eq!(tenant_energy(&state, "lab-c"), 14);
}

#[test]
fn a_mig_instance_leased_by_uuid_is_reported_by_one_node_allowed_to_hold_it() {
    // Invariant: an instance UUID is leased as a board UUID is: a lease
    // naming its node counts only there, and a plain lease is held by one
    // connected node at a time.
    let tenants = r#"
        [[tenant]]
        id = "lab-a"
        contracted_kw = 1
        gpus = [{ uuid = "MIG-3g", node = "m-1" }, "MIG-2g"]
    "#;
    let state = new_state(tenants, None);
    let on = |node: &str, epoch: u64| {
        let mut h = mig_hello(epoch, three_instances());
        h.node_id = node.into();
        for (i, g) in h.gpus.iter_mut().enumerate() {
            g.uuid = format!("{node}-gpu{i}");
        }
        h
    };
    let (h1, _) = state.hello(on("m-1", 1)).unwrap();
    // m-2 lists MIG-3g, leased on m-1 only.
    let e = state.hello(on("m-2", 1)).unwrap_err();
    assert!(
        matches!(&e, HelloError::GpuLeasedElsewhere { uuid, .. } if uuid == "MIG-3g"),
        "{e}"
    );
    // Without MIG-3g, m-2 still lists MIG-2g, which m-1 holds.
    let mut without = on("m-2", 1);
    if let Mig::Split { instances, .. } = &mut without.gpus[0].mig {
        instances.remove(0);
    }
    let e = state.hello(without.clone()).unwrap_err();
    assert!(
        matches!(&e, HelloError::GpuHeldElsewhere { uuid, .. } if uuid == "MIG-2g"),
        "{e}"
    );
    // Once m-1's stream ends, m-2 may hold it.
    state.disconnect(&h1);
    state.hello(without).unwrap();
}

#[test]
fn live_power_of_a_mig_board_is_split_by_sm_share_among_its_tenants() {
    // Invariant: the tenants' live power sums to the board's, each its SM
    // share (the split of energy); the board counts as one GPU of each
    // tenant holding a part of it; the node's summary equals walking it.
    let state = new_state(MIG_TENANTS, None);
    let (h, _) = state.hello(mig_hello(1, three_instances())).unwrap();
    let now_ns = unix_nanos_now();
    ingest(
        &state,
        &h,
        vec![sample(1, now_ns, &[(98_001, Some(0)), (500, Some(0))])],
    );
    let l = live(&state, Instant::now());
    let power = |t: &str| l.get(t).map_or(0, |x| x.power_milliwatts);
    // 98,001 mW by 42/28/14/14: 42,000.43, 28,000.29, 14,000.14 twice.
    assert_eq!(power("lab-a"), 42_001);
    assert_eq!(power("lab-b"), 28_000);
    assert_eq!(power("lab-c"), 28_000 + 500);
    assert_eq!(
        power("lab-a") + power("lab-b") + power("lab-c"),
        98_001 + 500
    );
    assert_eq!(l["lab-a"].reporting, 1);
    assert_eq!(l["lab-c"].reporting, 2);
    let n = lock(h.node());
    let window = n.stale_window(None);
    let now = Instant::now();
    assert_eq!(
        parts(|add| n.live(now, window, add)),
        parts(|add| n.walk_live(now, window, add))
    );
}

#[test]
fn whole_node_energy_is_split_with_each_instance_tenants_share_of_the_board() {
    // Invariant: a MIG board's tenants take part in the split of the
    // node's whole-node energy with their share of its GPU energy and
    // their share of the board as GPUs (the weights of the energy
    // split), never the board as one GPU of each; the parts sum to the
    // node's energy, and each tenant's node time is its expected GPU
    // time (node coverage 1).
    use crate::edge::{NodePowerReading, NodePowerSource};
    let m0 = T0 - T0.rem_euclid(60 * SEC) + 10 * SEC;
    let state = new_state(MIG_TENANTS, None);
    let mut hl = mig_hello(1, three_instances());
    hl.node_power_sources = vec![NodePowerSource {
        kind: "redfish".into(),
        domain: "node".into(),
        name: "1".into(),
        energy_counter_supported: true,
        interval: Duration::from_secs(1),
    }];
    let (h, _) = state.hello(hl).unwrap();
    let bmc = |ts: i64, mj: u64| NodePowerReading {
        source: 0,
        timestamp_unix_nanos: ts,
        power_milliwatts: Some(1_000_000),
        energy_millijoules: Some(mj),
    };
    let mut first = sample(1, m0, &[(0, Some(0)), (0, Some(0))]);
    first.node_power = vec![bmc(m0, 5_000_000)];
    // The board drew 980 J (420 / 280 / 140 + 140 by slice share), GPU 1
    // nothing, the node 1000 J.
    let mut next = sample(2, m0 + SEC, &[(0, Some(980_000)), (0, Some(0))]);
    next.node_power = vec![bmc(m0 + SEC, 6_000_000)];
    ingest(&state, &h, vec![first, next]);
    let (_, c) = state.take_pending();
    let node = |t| {
        let b = booked(&c, t, "m-1");
        assert_eq!(b.node_ns, b.expected_gpu_ns, "{t}: node coverage 1");
        (b.node_energy_mj, b.node_ns)
    };
    // Own GPU energy, then the 20 J left by GPUs by the GPU time each
    // holds: lab-a 3/7 of the board, lab-b 2/7, lab-c 2/7 and GPU 1 (the
    // second of the board split exactly: 428,571,428 / 285,714,286 /
    // 142,857,143 twice).
    assert_eq!(node("lab-a"), (420_000 + 4_286, 428_571_428));
    assert_eq!(node("lab-b"), (280_000 + 2_857, 285_714_286));
    assert_eq!(node("lab-c"), (280_000 + 12_857, 285_714_286 + SEC as u64));
}

/// An H100's 1g instance: 16 SMs, one slice.
fn one_g(uuid: &str, gi: u32) -> MigInstance {
    MigInstance {
        gpu_instance_slice_count: 1,
        compute_instance_slice_count: 1,
        ..instance(uuid, gi, 16)
    }
}

/// An H100: 132 SMs, 7 slices.
fn h100(instances: Vec<MigInstance>) -> Mig {
    Mig::Split {
        board_sm: 132,
        board_slices: 7,
        instances,
    }
}

/// lab-a leases six of an H100's seven 1g instances (16 of its 132 SMs
/// each), lab-b the seventh: the board is fully partitioned and leased.
const H100_TENANTS: &str = r#"
    [[tenant]]
    id = "lab-a"
    contracted_kw = 1
    gpus = ["MIG-a1", "MIG-a2", "MIG-a3", "MIG-a4", "MIG-a5", "MIG-a6"]

    [[tenant]]
    id = "lab-b"
    contracted_kw = 1
    gpus = ["MIG-b1"]

    [[tenant]]
    id = "lab-c"
    contracted_kw = 1
    nodes = ["m-1"]
"#;

#[test]
fn a_fully_partitioned_board_bills_none_of_its_energy_to_the_board() {
    // Invariant: MIG profiles never use all a board's SMs (7 x 1g uses
    // 112 of an H100's 132), so the split goes by GPU-instance slices:
    // a board whose slices are all in instances bills nothing to its own
    // UUID.
    let state = new_state(H100_TENANTS, None);
    let instances = [
        "MIG-a1", "MIG-a2", "MIG-a3", "MIG-a4", "MIG-a5", "MIG-a6", "MIG-b1",
    ]
    .iter()
    .enumerate()
    .map(|(i, u)| one_g(u, i as u32 + 7))
    .collect();
    let (h, _) = state.hello(mig_hello(1, h100(instances))).unwrap();
    ingest(
        &state,
        &h,
        vec![
            sample(1, T0, &[(1, Some(0)), (1, Some(0))]),
            sample(2, T0 + SEC, &[(1, Some(7_000)), (1, Some(0))]),
        ],
    );
    assert_eq!(tenant_energy(&state, "lab-a"), 6_000);
    assert_eq!(tenant_energy(&state, "lab-b"), 1_000);
    assert_eq!(tenant_energy(&state, "lab-c"), 0);
}

#[test]
fn a_gpu_instance_shared_by_compute_instances_is_split_by_compute_slices() {
    // Invariant: a 4g GPU instance holding a 1c and a 3c compute instance
    // takes 4 of the board's 7 slices, shared 1:3 between them; the 3g
    // GPU instance, its 3.
    let tenants = r#"
        [[tenant]]
        id = "lab-a"
        contracted_kw = 1
        gpus = ["MIG-1c"]

        [[tenant]]
        id = "lab-b"
        contracted_kw = 1
        gpus = ["MIG-3c"]

        [[tenant]]
        id = "lab-c"
        contracted_kw = 1
        gpus = ["MIG-3g"]
    "#;
    let state = new_state(tenants, None);
    let ci = |uuid: &str, gi: u32, g: u32, c: u32| MigInstance {
        gpu_instance_slice_count: g,
        compute_instance_slice_count: c,
        ..one_g(uuid, gi)
    };
    let layout = h100(vec![
        ci("MIG-1c", 1, 4, 1),
        ci("MIG-3c", 1, 4, 3),
        ci("MIG-3g", 2, 3, 3),
    ]);
    let (h, _) = state.hello(mig_hello(1, layout)).unwrap();
    ingest(
        &state,
        &h,
        vec![
            sample(1, T0, &[(1, Some(0)), (1, Some(0))]),
            sample(2, T0 + SEC, &[(1, Some(28_000)), (1, Some(0))]),
        ],
    );
    // 28 J: 4/7 (16 J) shared 1:3, 3/7 (12 J).
    assert_eq!(tenant_energy(&state, "lab-a"), 4_000);
    assert_eq!(tenant_energy(&state, "lab-b"), 12_000);
    assert_eq!(tenant_energy(&state, "lab-c"), 12_000);
    assert_eq!(tenant_energy(&state, UNASSIGNED), 0);
}

#[test]
fn live_node_power_is_split_with_each_tenants_share_of_a_mig_board() {
    // Invariant: in the live whole-node split a MIG board's tenants hold
    // their share of the board as GPUs, not the board as one GPU each.
    use crate::edge::{NodePowerReading, NodePowerSource};
    let state = new_state(MIG_TENANTS, None);
    let mut hl = mig_hello(1, three_instances());
    hl.node_power_sources = vec![NodePowerSource {
        kind: "redfish".into(),
        domain: "node".into(),
        name: "1".into(),
        energy_counter_supported: false,
        interval: Duration::from_secs(1),
    }];
    let (h, _) = state.hello(hl).unwrap();
    let now_ns = unix_nanos_now();
    let mut s = sample(1, now_ns, &[(98_000, Some(0)), (0, Some(0))]);
    s.node_power = vec![NodePowerReading {
        source: 0,
        timestamp_unix_nanos: now_ns,
        power_milliwatts: Some(1_098_000),
        energy_millijoules: None,
    }];
    ingest(&state, &h, vec![s]);
    let l = live(&state, Instant::now());
    let node = |t: &str| l.get(t).map_or(0, |x| x.node_power_milliwatts);
    // The board's 98 W by slice share (42 / 28 / 14 + 14 W), GPU 1 idle;
    // the 1000 W left by GPUs by GPUs held: lab-a 3/14 of the node's
    // two, lab-b 2/14, lab-c 9/14 (2/7 of the board and GPU 1).
    assert_eq!(node("lab-a"), 42_000 + 214_286);
    assert_eq!(node("lab-b"), 28_000 + 142_857);
    assert_eq!(node("lab-c"), 28_000 + 642_857);
}

#[test]
fn an_instance_leased_by_a_reload_is_held_by_the_node_that_lists_it() {
    // Invariant: a lease added by a tenant reload on an instance UUID a
    // connected node lists holds it to that node, as for a board's UUID.
    let state = new_state(MIG_TENANTS, None);
    let on = |node: &str| {
        let mut h = mig_hello(1, three_instances());
        h.node_id = node.into();
        for (i, g) in h.gpus.iter_mut().enumerate() {
            g.uuid = format!("{node}-gpu{i}");
        }
        h
    };
    state.hello(on("m-1")).unwrap();
    // MIG-1g, leased by no one so far, leased to lab-b without a node.
    state.reload_tenants_from(
        Tenants::from_toml(&MIG_TENANTS.replace(r#"["MIG-2g"]"#, r#"["MIG-2g", "MIG-1g"]"#))
            .unwrap(),
        T0,
    );
    let mut other = on("m-2");
    if let Mig::Split { instances, .. } = &mut other.gpus[0].mig {
        instances.retain(|m| m.uuid == "MIG-1g");
    }
    let e = state.hello(other).unwrap_err();
    assert!(
        matches!(&e, HelloError::GpuHeldElsewhere { uuid, .. } if uuid == "MIG-1g"),
        "{e}"
    );
}
