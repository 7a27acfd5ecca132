//! The accounting laws, on the meter and the arithmetic alone: no state,
//! no locks, no sleeps (the clock is a `Tick`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use super::*;

const T0: i64 = 1_700_000_000_000_000_000;
const SEC: i64 = 1_000_000_000;
const LIMIT_MW: u64 = 700_000;

/// A tick `at` ns after T0, seq `seq`, the collector's clock following the
/// agent's (`base` standing for T0), a 1 s interval and `window`.
fn tick(base: Instant, at: i64, seq: u64, window: Duration) -> Tick {
    Tick {
        timestamp_ns: T0 + at,
        seq,
        now: base + Duration::from_nanos(at as u64),
        latest_ns: T0 + at,
        interval: Duration::from_secs(1),
        window,
    }
}

fn reading(power: u64, energy: Option<u64>) -> GpuReading {
    GpuReading {
        power_milliwatts: Some(power),
        energy_millijoules: energy,
        ..GpuReading::default()
    }
}

/// Minute buckets, summed per minute.
#[derive(Default)]
struct Buckets(BTreeMap<i64, MinuteFigures>);

impl Book<str> for Buckets {
    fn add(&mut self, _tenant: &str, minute: i64, f: &MinuteFigures) {
        let d = self.0.entry(minute).or_default();
        d.energy_mj += f.energy_mj;
        d.estimated_mj += f.estimated_mj;
        d.gpu_ns += f.gpu_ns;
        d.busy_gpu_ns += f.busy_gpu_ns;
        d.busy_unknown_gpu_ns += f.busy_unknown_gpu_ns;
        d.expected_gpu_ns += f.expected_gpu_ns;
        d.samples += f.samples;
        d.node_energy_mj += f.node_energy_mj;
        d.node_estimated_mj += f.node_estimated_mj;
        d.node_ns += f.node_ns;
    }
}

#[test]
fn split_examples() {
    const M: i64 = 60_000_000_000;
    // (amount, from, to, expected (minute, part))
    type Case = (u64, i64, i64, Vec<(i64, u64)>);
    let cases: [Case; 4] = [
        (100, 10 * M, 10 * M + 1_000, vec![(600, 100)]),
        (
            100,
            10 * M - M / 2,
            10 * M + M / 2,
            vec![(540, 50), (600, 50)],
        ),
        (
            10,
            10 * M - M / 3,
            10 * M + 2 * M / 3,
            vec![(540, 3), (600, 7)],
        ),
        (7, 5 * M, 5 * M, vec![(300, 7)]),
    ];
    for (amount, from, to, want) in cases {
        assert_eq!(
            split_by_minute(amount, from, to),
            want,
            "{amount} over ({from}, {to}]"
        );
    }
}

#[test]
fn over_contract_examples() {
    // 1 kW for a minute is 60,000,000 mJ.
    assert_eq!(over_contract(60_000_000, 1_000_000), (0, 0));
    assert_eq!(over_contract(60_000_001, 1_000_000), (60_000_000_000, 1));
    assert_eq!(over_contract(u64::MAX, 0), (0, 0));
    // A rollup keeps what it stored, whatever the contract.
    assert_eq!(span_over_contract(u64::MAX, Some((7, 8)), 1), (7, 8));
    assert_eq!(
        span_over_contract(60_000_001, None, 1_000_000),
        over_contract(60_000_001, 1_000_000)
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A minute split sums to the amount, one part per minute overlapped,
    /// in order, and never books outside (from, to].
    #[test]
    fn a_minute_split_sums_to_the_amount_inside_its_interval(
        amount in 0u64..=u64::MAX / 4,
        from in -10_000_000_000_000i64..10_000_000_000_000,
        len in 0i64..600_000_000_000,
    ) {
        let to = from + len;
        let parts = split_by_minute(amount, from, to);
        prop_assert_eq!(parts.iter().map(|p| p.1).sum::<u64>(), amount);
        for w in parts.windows(2) {
            prop_assert_eq!(w[1].0, w[0].0 + 60);
        }
        let minute_of = |ns: i64| ns.div_euclid(MINUTE_NS) * MINUTE;
        let (first, last) = if len > 0 {
            (minute_of(from), minute_of(to - 1))
        } else {
            (minute_of(to), minute_of(to))
        };
        prop_assert_eq!(parts[0].0, first);
        prop_assert_eq!(parts[parts.len() - 1].0, last);
        for (m, _) in &parts {
            prop_assert!((first..=last).contains(m));
        }
    }

    /// Over-contract figures only grow with the minute's energy.
    #[test]
    fn over_contract_grows_with_energy(a in any::<u64>(), b in any::<u64>(), c in 0u64..10_000_000) {
        let (lo, hi) = (a.min(b), a.max(b));
        let (t0, o0) = over_contract(lo, c);
        let (t1, o1) = over_contract(hi, c);
        prop_assert!(t0 <= t1 && o0 <= o1);
        prop_assert!(t1 == 0 || t1 == 60_000_000_000);
    }

    /// Without a counter, energy and remainder are the exact integral of
    /// power in mW·ns, whatever the steps.
    #[test]
    fn the_power_integral_is_exact_in_milliwatt_nanoseconds(
        steps in prop::collection::vec((0u64..=2_000_000, 1i64..=5_000_000_000), 1..64),
    ) {
        let base = Instant::now();
        let window = Duration::from_secs(10);
        let mut m = Meter::default();
        let mut at = 0;
        m.apply(&reading(0, None), Some(LIMIT_MW), &tick(base, at, 1, window));
        let mut added = 0u64;
        for (i, &(p, dt)) in steps.iter().enumerate() {
            at += dt;
            let a = m.apply(&reading(p, None), Some(LIMIT_MW), &tick(base, at, i as u64 + 2, window));
            prop_assert_eq!(a.estimated_ns, Some(dt as u64));
            added += a.energy_mj;
        }
        let exact: u128 = steps.iter().map(|&(p, dt)| u128::from(p) * dt as u128).sum();
        prop_assert_eq!(added, m.energy_millijoules());
        prop_assert_eq!(
            u128::from(m.energy_millijoules()) * NANOS_PER_SECOND
                + u128::from(m.remainder_milliwatt_nanos()),
            exact
        );
    }

    /// With a counter that moves plausibly, energy is the last counter
    /// less the first, and booking it spreads exactly that over minutes.
    #[test]
    fn counter_energy_is_last_minus_first(
        first in 0u64..1 << 40,
        steps in prop::collection::vec((0u64..=2_100_000, 1i64..=90_000_000_000), 1..40),
    ) {
        let base = Instant::now();
        let window = Duration::from_secs(3);
        let mut m = Meter::default();
        let mut buckets = Buckets::default();
        let mut at = 0;
        let mut counter = first;
        m.apply(&reading(0, Some(counter)), Some(LIMIT_MW), &tick(base, at, 1, window))
            .book(&mut buckets, "t", window);
        for (i, &(per_sec, dt)) in steps.iter().enumerate() {
            at += dt;
            // Within 3× the limit over the interval.
            counter += (u128::from(per_sec) * dt as u128 / NANOS_PER_SECOND) as u64;
            let a = m.apply(&reading(0, Some(counter)), Some(LIMIT_MW), &tick(base, at, i as u64 + 2, window));
            prop_assert_eq!(a.estimated_ns, None);
            a.book(&mut buckets, "t", window);
        }
        prop_assert_eq!(m.energy_millijoules(), counter - first);
        prop_assert_eq!(m.counter_resets(), 0);
        let booked: u64 = buckets.0.values().map(|f| f.energy_mj).sum();
        prop_assert_eq!(booked, counter - first);
        let samples: u64 = buckets.0.values().map(|f| f.samples).sum();
        prop_assert_eq!(samples, steps.len() as u64 + 1);
        let expected: u64 = buckets.0.values().map(|f| f.expected_gpu_ns).sum();
        prop_assert_eq!(expected, at as u64);
    }

    /// A reading stamped before one already applied, its counter behind by
    /// what the GPU can draw in between, adds nothing and moves nothing.
    #[test]
    fn stale_readings_add_nothing(
        counter in 1_000_000u64..1 << 40,
        dt in 1i64..=10_000_000_000,
        back in 0i64..=10_000_000_000,
        behind_per_sec in 0u64..=2_100_000,
    ) {
        let base = Instant::now();
        let window = Duration::from_secs(3);
        let mut m = Meter::default();
        m.apply(&reading(0, Some(counter)), Some(LIMIT_MW), &tick(base, 0, 1, window));
        m.apply(&reading(0, Some(counter + 1)), Some(LIMIT_MW), &tick(base, dt, 2, window));
        let before = (m.cursor(), m.energy_millijoules());
        let back = back.min(dt + 1_000_000_000);
        let behind = (u128::from(behind_per_sec) * back as u128 / NANOS_PER_SECOND) as u64 + 1;
        let mut t = tick(base, dt + 1, 3, window);
        t.timestamp_ns = T0 + dt - back;
        let a = m.apply(&reading(500_000, Some(counter + 1 - behind.min(counter))), Some(LIMIT_MW), &t);
        prop_assert_eq!(a.energy_mj, 0);
        prop_assert!(!a.kept);
        prop_assert_eq!((m.cursor(), m.energy_millijoules()), before);
    }

    /// A counter that goes back or leaps (a reload, or a reading that
    /// cannot be) contributes at most what the GPU can draw: 3× its limit
    /// over the time since the last reading, plus a joule.
    #[test]
    fn a_reset_contributes_at_most_the_bound(
        counter in 0u64..1 << 40,
        next in 0u64..1 << 41,
        dt in 1i64..=100_000_000_000,
        power in 0u64..=3 * LIMIT_MW,
    ) {
        let base = Instant::now();
        let window = Duration::from_secs(3);
        let mut m = Meter::default();
        m.apply(&reading(0, Some(counter)), Some(LIMIT_MW), &tick(base, 0, 1, window));
        let a = m.apply(&reading(power, Some(next)), Some(LIMIT_MW), &tick(base, dt, 2, window));
        let bound = u128::from(LIMIT_MW) * 3 * dt as u128 / NANOS_PER_SECOND + 1_000;
        prop_assert!(u128::from(a.energy_mj) <= bound, "{} > {bound}", a.energy_mj);
        if next < counter || u128::from(next - counter) > bound {
            prop_assert_eq!(m.counter_resets(), 1);
        }
    }

    /// Booking a reading spreads its energy, GPU time and expected time
    /// over minutes exactly, counting it as one sample.
    #[test]
    fn booking_conserves_every_figure(
        energy in 0u64..1 << 40,
        from in 0i64..10_000_000_000_000,
        len in 0i64..3_600_000_000_000,
        estimated in prop::option::of(0u64..5_000_000_000),
        util in prop::option::of(0u32..=100),
        window_s in 1u64..600,
    ) {
        let a = Applied {
            energy_mj: energy,
            estimated_ns: estimated,
            from_ns: Some(from),
            to_ns: from + len,
            utilization_percent: util,
            kept: true,
            drawn_from_ns: None,
            open: false,
        };
        let window = Duration::from_secs(window_s);
        let mut b = Buckets::default();
        a.book(&mut b, "t", window);
        let sum = |f: fn(&MinuteFigures) -> u64| b.0.values().map(f).sum::<u64>();
        prop_assert_eq!(sum(|f| f.energy_mj), energy);
        prop_assert_eq!(sum(|f| f.estimated_mj), if estimated.is_some() { energy } else { 0 });
        prop_assert_eq!(sum(|f| f.expected_gpu_ns), len as u64);
        prop_assert_eq!(sum(|f| f.samples), 1);
        prop_assert!(sum(|f| f.busy_gpu_ns) <= sum(|f| f.gpu_ns));
        prop_assert!(sum(|f| f.gpu_ns) <= len as u64);
        // Time of a reading without a utilization is all of it unknown,
        // none of it busy; with one, none of it unknown.
        match util {
            None => {
                prop_assert_eq!(sum(|f| f.busy_unknown_gpu_ns), sum(|f| f.gpu_ns));
                prop_assert_eq!(sum(|f| f.busy_gpu_ns), 0);
            }
            Some(_) => prop_assert_eq!(sum(|f| f.busy_unknown_gpu_ns), 0),
        }
        for f in b.0.values() {
            prop_assert!(f.busy_gpu_ns + f.busy_unknown_gpu_ns <= f.gpu_ns);
        }
        let first = from.div_euclid(MINUTE_NS) * MINUTE;
        let last = (from + len).div_euclid(MINUTE_NS) * MINUTE;
        for m in b.0.keys() {
            prop_assert!((first..=last).contains(m));
        }
    }
}

#[test]
fn a_lost_reading_adds_nothing_and_the_next_delta_covers_the_gap() {
    let base = Instant::now();
    let window = Duration::from_secs(3);
    let mut m = Meter::default();
    m.apply(
        &reading(0, Some(1_000)),
        Some(LIMIT_MW),
        &tick(base, 0, 1, window),
    );
    let lost = GpuReading {
        lost: true,
        ..GpuReading::default()
    };
    let a = m.apply(&lost, Some(LIMIT_MW), &tick(base, SEC, 2, window));
    assert_eq!((a.energy_mj, a.kept, a.from_ns), (0, true, None));
    let a = m.apply(
        &reading(0, Some(1_201_000)),
        Some(LIMIT_MW),
        &tick(base, 2 * SEC, 3, window),
    );
    assert_eq!(a.energy_mj, 1_200_000);
    assert_eq!(a.from_ns, Some(T0));
    assert_eq!(m.energy_millijoules(), 1_200_000);
}

/// A BMC's whole-kWh counter (`EnergykWh` as mJ) steps rarely: a node
/// drawing 20 kW moves it once every 180 s, read every 10 s. Every step is
/// real energy; judged over one reading interval it would look like 360 kW
/// and be thrown away. The meter counts the counter's difference exactly,
/// nothing estimated.
#[test]
fn a_coarse_counter_that_steps_rarely_counts_its_whole_difference() {
    const KWH: u64 = 3_600_000_000;
    // A node source's bound: three times this, 50 kW (`fleet::power`).
    let limit = Some(50_000_000 / 3);
    let base = Instant::now();
    let mut m = Meter::default();
    let (mut energy, mut estimated) = (0u64, 0u64);
    // Counter phase: the node has drawn 1234 s worth of 20 kW already.
    let joules_at = |s: i64| (1_234 + s) as u64 * 20_000;
    let counter_at = |s: i64| joules_at(s) * 1_000 / KWH * KWH;
    let first = counter_at(0);
    let mut last = first;
    for (seq, s) in (0..=3_600).step_by(10).enumerate() {
        last = counter_at(s);
        let a = m.apply(
            &reading(20_000_000, Some(last)),
            limit,
            &tick(base, s * SEC, seq as u64 + 1, Duration::from_secs(30)),
        );
        energy += a.energy_mj;
        if a.estimated_ns.is_some() {
            estimated += a.energy_mj;
        }
    }
    assert!(
        last - first >= 19 * KWH,
        "the counter stepped: {}",
        last - first
    );
    assert_eq!(energy, last - first, "the counter's difference, exactly");
    assert_eq!(estimated, 0);
    assert_eq!(m.counter_resets(), 0);
}

/// A GPU's counter (fine-grained, millijoules) that stood still for an
/// hour is a fault, not a coarse counter: when it then jumps by more than
/// the GPU can draw in one interval, the jump is not believed on the
/// strength of the hour it stood still. That interval is counted from
/// power, and the jump is a counted reset.
#[test]
fn a_fine_counter_frozen_for_an_hour_does_not_vouch_for_a_jump() {
    let base = Instant::now();
    let mut m = Meter::default();
    let frozen = 123_457;
    for s in 0..=3_600 {
        m.apply(
            &reading(300_000, Some(frozen)),
            Some(LIMIT_MW),
            &tick(base, s * SEC, s as u64 + 1, Duration::from_secs(3)),
        );
    }
    // 5 MJ: 3 × 700 W over the frozen hour would allow 7.56 MJ; one
    // second allows 2.1 kJ.
    let a = m.apply(
        &reading(300_000, Some(frozen + 5_000_000_000)),
        Some(LIMIT_MW),
        &tick(base, 3_601 * SEC, 3_602, Duration::from_secs(3)),
    );
    assert!(a.estimated_ns.is_some(), "counted from power");
    assert_eq!(a.energy_mj, 300_000, "300 W for one second");
    assert_eq!(m.counter_resets(), 1);
}

// ---- MIG ----

/// Minute buckets per tenant.
#[derive(Default)]
struct ByTenant(BTreeMap<(String, i64), MinuteFigures>);

impl Book<str> for ByTenant {
    fn add(&mut self, tenant: &str, minute: i64, f: &MinuteFigures) {
        let d = self.0.entry((tenant.to_string(), minute)).or_default();
        d.energy_mj += f.energy_mj;
        d.estimated_mj += f.estimated_mj;
        d.gpu_ns += f.gpu_ns;
        d.busy_gpu_ns += f.busy_gpu_ns;
        d.busy_unknown_gpu_ns += f.busy_unknown_gpu_ns;
        d.expected_gpu_ns += f.expected_gpu_ns;
        d.samples += f.samples;
    }
}

#[test]
fn a_mig_boards_delta_is_split_by_sm_share_with_the_largest_remainder() {
    // 1000 mJ over 42/28/14 SMs of 98, the board's 14 others as a fourth
    // part: 428.57, 285.71, 142.86, 142.86 -> the two largest remainders
    // (ties to the earlier part) and the next get the 3 mJ left.
    let split = split_by_weight([42, 28, 14, 14]);
    assert_eq!(split(1000), [428, 286, 143, 143]);
    assert_eq!(split(0), [0, 0, 0, 0]);
    assert_eq!(split(1), [1, 0, 0, 0]);
    assert_eq!(split(98), [42, 28, 14, 14]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Invariant: a MIG board's reading split among its parts books, for
    /// each figure (energy, estimated energy, GPU time, busy time, time of
    /// unknown utilization, expected time, minute by minute summed),
    /// exactly what the whole reading would book to one tenant; each
    /// part's energy is within 1 mJ of its slice share and the parts sum
    /// to the board's.
    #[test]
    fn mig_parts_sum_to_the_whole_board_figure_by_figure(
        energy in 0u64..10_000_000,
        from in 0i64..120 * SEC,
        len in 1i64..90 * SEC,
        util in prop::option::of(0u32..=100),
        estimated in any::<bool>(),
        weights in proptest::collection::vec(1u64..60, 1..8),
    ) {
        let applied = Applied {
            energy_mj: energy,
            estimated_ns: estimated.then_some(len as u64),
            from_ns: Some(T0 + from),
            to_ns: T0 + from + len,
            utilization_percent: util,
            kept: true,
            drawn_from_ns: None,
            open: false,
        };
        let window = Duration::from_secs(600);
        let mut whole = Buckets::default();
        applied.book(&mut whole, "", window);
        let names: Vec<String> = (0..weights.len()).map(|k| format!("t{k}")).collect();
        let parts: Vec<(&str, u64)> = names.iter().map(String::as_str).zip(weights.iter().copied()).collect();
        let mut split = ByTenant::default();
        let shares = applied.book_parts(&mut split, &parts, window);
        prop_assert_eq!(shares.iter().sum::<u64>(), energy);
        let total: u64 = weights.iter().sum();
        for (share, w) in shares.iter().zip(&weights) {
            let exact = u128::from(energy) * u128::from(*w);
            prop_assert!(u128::from(*share) * u128::from(total) + u128::from(total) > exact);
            prop_assert!(u128::from(*share) * u128::from(total) < exact + u128::from(total));
        }
        let sum = |f: fn(&MinuteFigures) -> u64| split.0.values().map(f).sum::<u64>();
        let want = |f: fn(&MinuteFigures) -> u64| whole.0.values().map(f).sum::<u64>();
        prop_assert_eq!(sum(|f| f.energy_mj), want(|f| f.energy_mj));
        prop_assert_eq!(sum(|f| f.estimated_mj), want(|f| f.estimated_mj));
        prop_assert_eq!(sum(|f| f.gpu_ns), want(|f| f.gpu_ns));
        prop_assert_eq!(sum(|f| f.busy_gpu_ns), want(|f| f.busy_gpu_ns));
        prop_assert_eq!(sum(|f| f.busy_unknown_gpu_ns), want(|f| f.busy_unknown_gpu_ns));
        prop_assert_eq!(sum(|f| f.expected_gpu_ns), want(|f| f.expected_gpu_ns));
        // Each part is one sample of its own.
        prop_assert_eq!(sum(|f| f.samples), weights.len() as u64);
        // Each tenant's energy is its share.
        for (k, name) in names.iter().enumerate() {
            let got: u64 = split.0.iter().filter(|((t, _), _)| t == name).map(|(_, f)| f.energy_mj).sum();
            prop_assert_eq!(got, shares[k]);
        }
    }
}
