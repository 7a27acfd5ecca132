//! Dedup, its idempotence, epochs and stream takeover.

use super::*;

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
        assert_eq!(lock(h.node()).samples_accepted(), accepted, "{name}");
        assert_eq!(lock(h.node()).last_seq(), max_seq, "{name}");
        let c = &state.counters;
        assert_eq!(c.accepted.load(Ordering::Relaxed), accepted, "{name}");
        assert_eq!(c.duplicate.load(Ordering::Relaxed), duplicate, "{name}");
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
    let n = lock(h.node());
    let gpus = n
        .gpus()
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
        n.samples_accepted(),
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
    let n = lock(new.node());
    assert_eq!((n.epoch(), n.last_seq(), n.samples_accepted()), (2, 2, 5));
    assert_eq!(n.gpus()[0].counter_resets(), 0);
}

#[test]
fn older_epoch_is_refused() {
    // Invariant: a Hello with an epoch below the node's current one is
    // refused and does not disturb the current stream.
    // (current epoch, refused epochs)
    const TOP: u64 = crate::edge::MAX_STORED;
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
        assert!(lock(h2.node()).connected());
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
        assert!(!lock(h2.node()).connected());
    }
}
