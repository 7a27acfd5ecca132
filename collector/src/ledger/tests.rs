//! The minute split.

use super::*;
use proptest::prelude::*;

#[test]
fn split_examples() {
    const M: i64 = 60_000_000_000;
    // (amount, from, to, expected parts)
    type Case = (u64, i64, i64, Vec<(i64, u64)>);
    // (amount, from, to, expected (minute, part))
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Conservation: the parts add up to the amount exactly, one per
    /// minute overlapped, each within one of its exact share.
    #[test]
    fn split_conserves_energy(amount in 0u64..=u64::MAX / 4, from in 0i64..10_000_000_000_000, len in 0i64..600_000_000_000) {
        let parts = split_by_minute(amount, from, from + len);
        prop_assert_eq!(parts.iter().map(|p| p.1).sum::<u64>(), amount);
        for w in parts.windows(2) {
            prop_assert_eq!(w[1].0, w[0].0 + 60);
        }
        if len > 0 {
            let first = from.div_euclid(60_000_000_000) * 60;
            let last = (from + len - 1).div_euclid(60_000_000_000) * 60;
            prop_assert_eq!(parts[0].0, first);
            prop_assert_eq!(parts[parts.len() - 1].0, last);
        }
    }
}
