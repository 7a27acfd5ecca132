//! Regressions; clocks, limits and inventories that change.

use super::ledger::booked;
use super::*;

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
    assert_eq!(h.node().lock().unwrap().gpus()[0].counter_resets(), 2);
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
    assert_eq!(lock(a.node()).gpus()[0].counter_resets(), 0);
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
    assert_eq!(lock(a.node()).gpus()[0].counter_resets(), 1);
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
    assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 0);
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
        assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 0, "{name}");
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
        assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 0, "{forward}");
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
    assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 0);
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
    assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 2);

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
    assert_eq!(lock(h.node()).gpus()[0].counter_resets(), 2);
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
        assert_eq!(lock(h.node()).gpus()[0].counter_resets(), resets, "{case}");
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
