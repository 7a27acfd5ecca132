//! Facility meters, the pure part: a meter's register read as a number,
//! the step between two readings (forward, wrapped or reset), the meter's
//! energy per minute from its readings, and the exact integer split of a
//! minute's metered energy among the tenants under the meter.
//!
//! Energy is integer millijoules throughout; a register count becomes
//! energy through an integer number of millijoules per count, so no
//! rounding happens before the per-minute interpolation, and that rounds
//! at each minute boundary only, so minutes add up to the meter exactly.

use super::MINUTE;

const MINUTE_NS: i64 = MINUTE * 1_000_000_000;

/// The order of the 16-bit words of a multi-word register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordOrder {
    /// Most significant word first (Modbus's usual order).
    Big,
    /// Least significant word first.
    Little,
}

/// The value of a register of `words.len()` 16-bit words (at most 4).
pub fn register_value(words: &[u16], order: WordOrder) -> u64 {
    let fold = |acc: u64, w: &u16| (acc << 16) | u64::from(*w);
    match order {
        WordOrder::Big => words.iter().fold(0, fold),
        WordOrder::Little => words.iter().rev().fold(0, fold),
    }
}

/// What a new register count means against the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The register went up by this many counts (0: unchanged).
    Forward(u64),
    /// The register passed its rollover and went on counting: this many
    /// counts since the previous reading.
    Wrapped(u64),
    /// The register went down by less than half its range: not a wrap but
    /// a reset or a replaced meter. Nothing is counted for the interval;
    /// the new count is the baseline from now on.
    Reset,
    /// The count is at or past the rollover: the register cannot hold it.
    OutOfRange,
    /// The register went up by more than the meter can draw in the time
    /// since the previous reading (`bounded_step`): not believed.
    Implausible,
}

/// The step from `prev` to `now` of a register that wraps to 0 at
/// `rollover` counts. A register that went down is taken as wrapped only
/// when the counts it would have run on for (`rollover - prev + now`) are
/// under half its range: a meter does not run through half its register
/// between two polls, while a replaced or reset meter starts low from
/// wherever it was.
pub fn step(prev: u64, now: u64, rollover: u128) -> Step {
    if u128::from(now) >= rollover || u128::from(prev) >= rollover {
        return Step::OutOfRange;
    }
    if now >= prev {
        return Step::Forward(now - prev);
    }
    let wrapped = rollover - u128::from(prev) + u128::from(now);
    if wrapped < rollover / 2 {
        // Under half of a range that fits u128 and whose counts fit u64.
        Step::Wrapped(u64::try_from(wrapped).unwrap_or(u64::MAX))
    } else {
        Step::Reset
    }
}

/// The step from `prev` to `now` of a meter that can add at most
/// `max_counts` counts since `prev` (its most power over the elapsed time,
/// plus slack): a rise beyond that is `Implausible`, and a drop is a wrap
/// only when the wrapped step is within it, else a `Reset` (a gateway
/// answering 0 while its meter is down, then the real count, must not
/// book most of a register lap).
pub fn bounded_step(prev: u64, now: u64, rollover: u128, max_counts: u128) -> Step {
    match step(prev, now, rollover) {
        Step::Forward(n) if u128::from(n) > max_counts => Step::Implausible,
        Step::Wrapped(n) if u128::from(n) > max_counts => Step::Reset,
        s => s,
    }
}

/// One reading of a meter: its cumulative energy (mJ, continuous across
/// wraps, not counting what a reset lost) at `at_ns` (Unix nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub at_ns: i64,
    pub energy_mj: u64,
}

/// The meter's cumulative energy at `at_ns`, interpolated linearly between
/// the readings around it and rounded to the nearest millijoule (half up);
/// `None` unless a reading at or before and one at or after `at_ns` are
/// known. `readings` are in time order with non-decreasing energy (later
/// ones win for one timestamp).
///
/// Monotone in `at_ns`: each piece is non-decreasing and rounding keeps
/// that, so the energy of a minute is never negative.
pub fn energy_at(readings: &[Reading], at_ns: i64) -> Option<u64> {
    let after = readings.partition_point(|r| r.at_ns < at_ns);
    let next = readings.get(after)?;
    if next.at_ns == at_ns {
        // The last reading stamped exactly then.
        let last = readings[after..].partition_point(|r| r.at_ns == at_ns);
        return Some(readings[after + last - 1].energy_mj);
    }
    let prev = readings.get(after.checked_sub(1)?)?;
    let span = (next.at_ns - prev.at_ns) as u128;
    let rise = u128::from(next.energy_mj.saturating_sub(prev.energy_mj));
    let part = (rise * (at_ns - prev.at_ns) as u128 * 2 + span) / (span * 2);
    // part <= rise, so this stays within prev..=next.
    Some(prev.energy_mj + part as u64)
}

/// The metered energy (mJ) of each whole minute from `from_s` (a minute
/// start, Unix seconds) on whose end the readings reach: (minute start,
/// energy) pairs in order. Each minute is the difference of the
/// interpolated cumulative energy at its two boundaries, so any run of
/// minutes adds up to the difference at its ends exactly (telescoping).
pub fn metered_minutes(readings: &[Reading], from_s: i64, through_s: i64) -> Vec<(i64, u64)> {
    let mut out = Vec::new();
    let Some(mut at_start) = energy_at(readings, from_s.saturating_mul(1_000_000_000)) else {
        return out;
    };
    let mut minute = from_s;
    while minute <= through_s {
        let end_ns = (minute + MINUTE).saturating_mul(1_000_000_000);
        let Some(at_end) = energy_at(readings, end_ns) else {
            break;
        };
        out.push((minute, at_end.saturating_sub(at_start)));
        at_start = at_end;
        minute += MINUTE;
    }
    out
}

/// The minute (start, Unix seconds) holding `at_ns`.
pub fn minute_of(at_ns: i64) -> i64 {
    at_ns.div_euclid(MINUTE_NS) * MINUTE
}

/// A minute's metered energy split among tenants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation<T> {
    /// Each tenant's part, in the order of `measured`, tenants with no
    /// measured energy left out.
    pub shares: Vec<(T, u64)>,
    /// What no tenant took: all of the meter's energy when nothing under
    /// it was measured (idle nodes, nodes not reporting), else 0.
    pub unallocated: u64,
}

/// Splits `metered` mJ among the tenants in proportion to their
/// `measured` mJ, as integers summing to `metered` exactly (largest
/// remainder; ties to the smaller tenant id). A tenant with no measured
/// energy gets nothing. When nothing was measured, no tenant gets any of
/// it: all of it is `unallocated`, kept as its own row and reported, not
/// lost and not guessed onto someone's bill.
pub fn allocate<T: Ord + Clone>(metered: u64, measured: &[(T, u64)]) -> Allocation<T> {
    let total: u128 = measured.iter().map(|(_, m)| u128::from(*m)).sum();
    if total == 0 {
        return Allocation {
            shares: Vec::new(),
            unallocated: metered,
        };
    }
    let mut parts: Vec<(T, u64, u128)> = measured
        .iter()
        .filter(|(_, m)| *m > 0)
        .map(|(t, m)| {
            let share = u128::from(metered) * u128::from(*m);
            // share / total <= metered, so it fits.
            (t.clone(), (share / total) as u64, share % total)
        })
        .collect();
    let assigned: u64 = parts.iter().map(|p| p.1).sum();
    let mut left = metered - assigned;
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| {
        parts[b]
            .2
            .cmp(&parts[a].2)
            .then(parts[a].0.cmp(&parts[b].0))
    });
    for i in order {
        if left == 0 {
            break;
        }
        parts[i].1 += 1;
        left -= 1;
    }
    Allocation {
        shares: parts.into_iter().map(|(t, v, _)| (t, v)).collect(),
        unallocated: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn words_are_read_in_either_order() {
        assert_eq!(
            register_value(&[0x0001, 0x0002], WordOrder::Big),
            0x0001_0002
        );
        assert_eq!(
            register_value(&[0x0001, 0x0002], WordOrder::Little),
            0x0002_0001
        );
        assert_eq!(
            register_value(&[0xffff, 0, 0, 1], WordOrder::Big),
            0xffff_0000_0000_0001
        );
        assert_eq!(
            register_value(&[0xffff, 0, 0, 1], WordOrder::Little),
            0x0001_0000_0000_ffff
        );
    }

    #[test]
    fn steps_forward_wrap_reset_and_out_of_range() {
        let r32 = 1u128 << 32;
        // (prev, now, rollover, step)
        let cases = [
            (10, 10, r32, Step::Forward(0)),
            (10, 25, r32, Step::Forward(15)),
            // Wrapped at 2^32: 6 counts to the top, 4 past it.
            (u64::from(u32::MAX) - 5, 4, r32, Step::Wrapped(10)),
            // A rollover of its own (a decimal register of 6 digits).
            (999_990, 5, 1_000_000, Step::Wrapped(15)),
            // Down by a little: a reset, not most of a lap.
            (1_000, 999, r32, Step::Reset),
            // Down to 0 from the middle: a replaced meter.
            (1 << 31, 0, r32, Step::Reset),
            (1_000_000, 5, 1_000_000, Step::OutOfRange),
            (5, 1_000_000, 1_000_000, Step::OutOfRange),
            (u64::MAX - 1, 3, 1u128 << 64, Step::Wrapped(5)),
        ];
        for (prev, now, rollover, want) in cases {
            assert_eq!(
                step(prev, now, rollover),
                want,
                "{prev} -> {now} of {rollover}"
            );
        }
    }

    #[test]
    fn a_step_beyond_the_meters_power_is_no_wrap_and_no_rise() {
        let r32 = 1u128 << 32;
        // (prev, now, most counts, step)
        let cases = [
            (10, 25, 15, Step::Forward(15)),
            (10, 26, 15, Step::Implausible),
            (u64::from(u32::MAX) - 5, 4, 10, Step::Wrapped(10)),
            // A gateway's 0 from a register three quarters up: the wrap
            // (a quarter of the register) is beyond what the meter draws.
            (3_000_000_000, 0, 1_000_000, Step::Reset),
            (1_000, 999, 1_000_000, Step::Reset),
            (5, 1 << 32, 1 << 40, Step::OutOfRange),
        ];
        for (prev, now, max, want) in cases {
            assert_eq!(
                bounded_step(prev, now, r32, max),
                want,
                "{prev} -> {now} within {max}"
            );
        }
    }

    #[test]
    fn interpolation_rounds_at_boundaries_only() {
        let r = |s: i64, e| Reading {
            at_ns: s * 1_000_000_000,
            energy_mj: e,
        };
        // 1000 mJ over 90 s from t=30: 11.11.. mJ/s.
        let readings = [r(30, 0), r(120, 1000)];
        assert_eq!(energy_at(&readings, 29_000_000_000), None);
        assert_eq!(energy_at(&readings, 121_000_000_000), None);
        assert_eq!(energy_at(&readings, 60_000_000_000), Some(333));
        // 666.67 rounds up.
        assert_eq!(energy_at(&readings, 90_000_000_000), Some(667));
        assert_eq!(energy_at(&readings, 120_000_000_000), Some(1000));
        assert_eq!(
            metered_minutes(&readings, 60, 60),
            vec![(60, 1000 - 333)],
            "the minute 60..120"
        );
        // Nothing for a minute whose start is before the first reading.
        assert_eq!(metered_minutes(&readings, 0, 60), vec![]);
    }

    #[test]
    fn nothing_measured_leaves_the_meter_unallocated() {
        let a = allocate::<&str>(5_000, &[("a", 0), ("b", 0)]);
        assert_eq!(a.shares, vec![]);
        assert_eq!(a.unallocated, 5_000);
        let a = allocate::<&str>(5_000, &[]);
        assert_eq!(a.unallocated, 5_000);
    }

    #[test]
    fn ties_go_to_the_smaller_tenant_id() {
        // 10 in three equal parts: 3 each, the one left to "a".
        let a = allocate(10, &[("c", 7), ("a", 7), ("b", 7)]);
        assert_eq!(a.shares, vec![("c", 3), ("a", 4), ("b", 3)]);
        assert_eq!(a.unallocated, 0);
    }

    /// Readings of a meter: increasing times, non-decreasing energy.
    fn readings() -> impl Strategy<Value = Vec<Reading>> {
        proptest::collection::vec((1i64..200_000_000_000, 0u64..10_000_000), 2..40).prop_map(
            |steps| {
                let (mut t, mut e) = (1_700_000_000_000_000_000i64, 0u64);
                steps
                    .into_iter()
                    .map(|(dt, de)| {
                        t += dt;
                        e += de;
                        Reading {
                            at_ns: t,
                            energy_mj: e,
                        }
                    })
                    .collect()
            },
        )
    }

    proptest! {
        /// Any run of minutes adds up to the interpolated energy at its
        /// ends, exactly; every minute is non-negative; and the
        /// interpolated energy never falls.
        #[test]
        fn minutes_telescope_to_the_meter(readings in readings()) {
            let first = readings[0].at_ns;
            let last = readings[readings.len() - 1].at_ns;
            let from = minute_of(first) + MINUTE;
            let minutes = metered_minutes(&readings, from, minute_of(last));
            if let Some(&(end, _)) = minutes.last() {
                let sum: u64 = minutes.iter().map(|m| m.1).sum();
                let ends = energy_at(&readings, (end + MINUTE) * 1_000_000_000).unwrap()
                    - energy_at(&readings, from * 1_000_000_000).unwrap();
                prop_assert_eq!(sum, ends);
                // Consecutive, from `from` on.
                for (i, (m, _)) in minutes.iter().enumerate() {
                    prop_assert_eq!(*m, from + i as i64 * MINUTE);
                }
            }
            // The last whole minute inside the readings is there.
            let want = ((minute_of(last) - from) / MINUTE).max(0) as usize;
            prop_assert!(minutes.len() == want || minutes.len() == want + 1);
            let mut prev = 0;
            let mut t = first;
            while t <= last {
                let e = energy_at(&readings, t).unwrap();
                prop_assert!(e >= prev);
                prev = e;
                t += (last - first) / 97 + 1;
            }
            // The ends are the readings themselves.
            prop_assert_eq!(energy_at(&readings, first), Some(readings[0].energy_mj));
            prop_assert_eq!(energy_at(&readings, last), Some(readings[readings.len() - 1].energy_mj));
        }

        /// The split sums to the meter exactly; a tenant with no measured
        /// energy gets nothing; more measured never gets less than an
        /// equal-or-smaller share (monotone); each share is within one mJ
        /// of the exact proportion.
        #[test]
        fn allocation_is_exact_proportional_and_monotone(
            metered in 0u64..u64::MAX / 4,
            measured in proptest::collection::vec(0u64..1_000_000_000_000, 0..12),
        ) {
            let measured: Vec<(usize, u64)> = measured.into_iter().enumerate().collect();
            let a = allocate(metered, &measured);
            let total: u128 = measured.iter().map(|m| u128::from(m.1)).sum();
            let sum: u64 = a.shares.iter().map(|s| s.1).sum::<u64>() + a.unallocated;
            prop_assert_eq!(sum, metered);
            if total == 0 {
                prop_assert_eq!(a.unallocated, metered);
            } else {
                prop_assert_eq!(a.unallocated, 0);
            }
            for (t, share) in &a.shares {
                let m = measured[*t].1;
                prop_assert!(m > 0, "tenant {} got {} with nothing measured", t, share);
                let exact = u128::from(metered) * u128::from(m);
                let floor = (exact / total) as u64;
                prop_assert!(*share == floor || *share == floor + 1);
            }
            for (t1, s1) in &a.shares {
                for (t2, s2) in &a.shares {
                    if measured[*t1].1 > measured[*t2].1 {
                        prop_assert!(s1 >= s2);
                    }
                }
            }
        }
    }
}
