//! Hellos and samples the edge refuses, through the state.

use super::*;

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
            node_power: Vec::new(),
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
                assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 0, "{name}");
                assert_eq!(lock(h.node()).samples_accepted(), 2, "{name}");
            }
            None => {
                assert_eq!(out.accepted, 3, "{name}");
                assert!(out.rejected.is_empty(), "{name}");
                assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 1, "{name}");
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
