//! The split of a node's whole-node energy among the tenants with GPUs on
//! it.
//!
//! *Rule:* over one interval between two whole-node readings the node used
//! `E`; tenant `t` had `G_t` of GPU energy booked on the node in it (`G`
//! all of them) and `N_t` of its `N` GPUs. Where `E >= G` each tenant
//! gets its own GPU energy and a share of the rest (the host, fans, power
//! supply losses) by its GPUs: `G_t + (E - G) * N_t / N`. Where `E < G`
//! (the node's meter reads lower than its GPUs' counters, which happens
//! with a BMC that averages over a window) each tenant gets `E * G_t / G`.
//! The shares are an exact integer split: the floors of the real shares,
//! and what the floors leave one millijoule each to the largest
//! remainders, ties to the tenant that sorts first. They sum to `E`.

/// One tenant's part in a split: its GPU energy on the node over the
/// interval (mJ) and how many of the node's GPUs it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party<T> {
    pub tenant: T,
    pub gpu_energy_mj: u64,
    pub gpus: u64,
}

/// Splits `energy_mj` of whole-node energy among `parties` by the rule
/// above; returns each party's share, in the order given. Where the rule
/// has nothing to weigh by (no GPUs, no GPU energy) the rest is split
/// evenly. Parties named twice are summed by the caller first; with none,
/// nothing is returned and the caller decides whose the energy is.
pub fn split_node_energy<T: Ord>(energy_mj: u64, parties: &[Party<T>]) -> Vec<u64> {
    if parties.is_empty() {
        return Vec::new();
    }
    let g: u128 = parties.iter().map(|p| u128::from(p.gpu_energy_mj)).sum();
    let n: u128 = parties.iter().map(|p| u128::from(p.gpus)).sum();
    let e = u128::from(energy_mj);
    if e >= g {
        let rest = (e - g) as u64;
        let weights: Vec<u128> = if n > 0 {
            parties.iter().map(|p| u128::from(p.gpus)).collect()
        } else if g > 0 {
            parties
                .iter()
                .map(|p| u128::from(p.gpu_energy_mj))
                .collect()
        } else {
            vec![1; parties.len()]
        };
        let extra = apportion(rest, &weights, parties);
        parties
            .iter()
            .zip(extra)
            .map(|(p, x)| p.gpu_energy_mj + x)
            .collect()
    } else {
        let weights: Vec<u128> = parties
            .iter()
            .map(|p| u128::from(p.gpu_energy_mj))
            .collect();
        apportion(energy_mj, &weights, parties)
    }
}

/// `total` split in proportion to `weights` (not all 0), exactly: floors,
/// then one each to the largest remainders, ties to the party whose
/// tenant sorts first.
fn apportion<T: Ord>(total: u64, weights: &[u128], parties: &[Party<T>]) -> Vec<u64> {
    let mut weights = weights.to_vec();
    let mut w: u128 = weights.iter().sum();
    // Weights summing beyond 64 bits (energies near the type's limit) are
    // scaled down alike, so that `total * weight` fits in 128 bits; the
    // split stays exact for the scaled weights.
    if w > u128::from(u64::MAX) {
        let shift = 64 - w.leading_zeros();
        for x in &mut weights {
            *x >>= shift;
        }
        w = weights.iter().sum();
    }
    if w == 0 {
        weights = vec![1; weights.len()];
        w = weights.len() as u128;
    }
    let mut shares: Vec<u64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (i, wi) in weights.iter().enumerate() {
        let p = u128::from(total) * wi;
        // At most `total`, since `wi <= w`.
        shares.push((p / w) as u64);
        remainders.push((p % w, i));
    }
    let mut left = total - shares.iter().sum::<u64>();
    remainders.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| parties[a.1].tenant.cmp(&parties[b.1].tenant))
    });
    for (_, i) in remainders {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn party(tenant: &str, gpu_energy_mj: u64, gpus: u64) -> Party<String> {
        Party {
            tenant: tenant.to_string(),
            gpu_energy_mj,
            gpus,
        }
    }

    #[test]
    fn examples_of_the_rule() {
        // (E, parties, shares)
        let cases: Vec<(u64, Vec<Party<String>>, Vec<u64>)> = vec![
            // E >= G: own GPU energy, the rest by GPUs (3:1).
            (
                1_000,
                vec![party("a", 500, 3), party("b", 100, 1)],
                vec![500 + 300, 100 + 100],
            ),
            // E < G: in proportion to GPU energy.
            (
                300,
                vec![party("a", 300, 1), party("b", 100, 1)],
                vec![225, 75],
            ),
            // G = 0: by GPUs.
            (10, vec![party("a", 0, 1), party("b", 0, 4)], vec![2, 8]),
            // A remainder of 1 between equal parties goes to the first id.
            (3, vec![party("b", 0, 1), party("a", 0, 1)], vec![1, 2]),
            // A tenant whose GPUs left (no GPUs now) keeps its GPU energy.
            (
                1_000,
                vec![party("a", 400, 0), party("b", 100, 2)],
                vec![400, 600],
            ),
            // Nothing to weigh by: evenly.
            (5, vec![party("a", 0, 0), party("b", 0, 0)], vec![3, 2]),
        ];
        for (e, parties, want) in cases {
            assert_eq!(split_node_energy(e, &parties), want, "{e} {parties:?}");
        }
        assert!(split_node_energy::<String>(7, &[]).is_empty());
    }

    fn parties() -> impl Strategy<Value = Vec<Party<String>>> {
        proptest::collection::vec((0u64..1_000_000_000, 0u64..16), 1..8).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (g, n))| party(&format!("t{i}"), g, n))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn shares_sum_to_the_node_energy(e in 0u64..u64::MAX / 2, ps in parties()) {
            let shares = split_node_energy(e, &ps);
            prop_assert_eq!(shares.len(), ps.len());
            prop_assert_eq!(shares.iter().map(|s| u128::from(*s)).sum::<u128>(), u128::from(e));
        }

        #[test]
        fn a_tenant_alone_gets_all_of_it(e in any::<u64>(), g in any::<u64>(), n in 0u64..64) {
            prop_assert_eq!(split_node_energy(e, &[party("a", g, n)]), vec![e]);
        }

        #[test]
        fn above_the_gpus_each_keeps_its_gpu_energy_and_below_never_more(
            e in 0u64..20_000_000_000, ps in parties(),
        ) {
            let g: u64 = ps.iter().map(|p| p.gpu_energy_mj).sum();
            for (s, p) in split_node_energy(e, &ps).iter().zip(&ps) {
                if e >= g {
                    prop_assert!(*s >= p.gpu_energy_mj);
                } else {
                    prop_assert!(*s <= p.gpu_energy_mj);
                }
            }
        }

        #[test]
        fn each_share_is_within_one_millijoule_of_the_exact_rule(
            e in 0u64..20_000_000_000, ps in parties(),
        ) {
            let g: u128 = ps.iter().map(|p| u128::from(p.gpu_energy_mj)).sum();
            let n: u128 = ps.iter().map(|p| u128::from(p.gpus)).sum();
            let e128 = u128::from(e);
            for (s, p) in split_node_energy(e, &ps).iter().zip(&ps) {
                // The exact share times a common denominator `d`.
                let (num, d) = if e128 >= g && n > 0 {
                    (u128::from(p.gpu_energy_mj) * n + (e128 - g) * u128::from(p.gpus), n)
                } else if e128 < g {
                    (e128 * u128::from(p.gpu_energy_mj), g)
                } else {
                    continue;
                };
                let s = u128::from(*s) * d;
                prop_assert!(s + d > num && s < num + d, "share {s}/{d} vs {num}/{d}");
            }
        }

        #[test]
        fn the_order_parties_come_in_changes_nothing(e in any::<u64>(), ps in parties()) {
            let shares = split_node_energy(e, &ps);
            let mut rev: Vec<Party<String>> = ps.clone();
            rev.reverse();
            let mut back = split_node_energy(e, &rev);
            back.reverse();
            prop_assert_eq!(shares, back);
        }
    }
}
