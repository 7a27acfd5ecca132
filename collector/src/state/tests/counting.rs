//! Energy through the state: counter deltas, resets, integration without a counter, lost readings.

use super::*;

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
        assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 0);
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
        let n = lock(h.node());
        let g = &n.gpus()[0];
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
        assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 0);
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
    let n = lock(h.node());
    let e = n.gpus()[0].energy_millijoules();
    assert_eq!(tenant_energy(&state, "lab-a"), e);
    (e, n.gpus()[0].meter().remainder_milliwatt_nanos())
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
            let n = lock(h.node());
            let g = &n.gpus()[0];
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
