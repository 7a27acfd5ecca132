//! Which collector a node streams to, and in what order it tries the
//! others.
//!
//! With `collector_order = "hashed"` (the default) a node ranks the
//! endpoints by a rendezvous (highest random weight) hash of its node id
//! and each endpoint: a fleet given the same list spreads evenly over it,
//! and removing one endpoint moves only the nodes that preferred it (every
//! other node's ranking of the remaining ones is unchanged). The hash is
//! fixed (FNV-1a with a 64-bit finaliser), not a per-process random one,
//! so a node prefers the same collector across restarts and versions. With
//! `"listed"` every node tries the endpoints in the order given.
//!
//! Jitter for backoff and failback comes from a small seeded generator
//! ([`Jitter`]): it needs spread across a fleet, not cryptographic quality.

use std::time::Duration;

use crate::config::CollectorOrder;

/// The endpoints' indices, most preferred first, for `node_id`.
pub fn preference(node_id: &str, endpoints: &[String], order: CollectorOrder) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..endpoints.len()).collect();
    if order == CollectorOrder::Hashed {
        // Highest weight first; ties (all but impossible) by list order.
        idx.sort_by_key(|&i| (std::cmp::Reverse(weight(node_id, &endpoints[i])), i));
    }
    idx
}

/// The rendezvous weight of (`node_id`, `endpoint`).
pub fn weight(node_id: &str, endpoint: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // A separator no endpoint URL or node id contains, so ("ab", "c") and
    // ("a", "bc") differ.
    for b in node_id.bytes().chain([0xff]).chain(endpoint.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    mix(h)
}

/// SplitMix64's finaliser: FNV's low-entropy high bits get avalanched, so
/// comparing whole weights spreads like comparing random numbers.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A xorshift64 generator for jitter, seeded from the node id, the clock
/// and the process id, so the nodes of one fleet process (and agents
/// started at the same moment) draw different delays.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(node_id: &str) -> Self {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = mix(weight(node_id, "") ^ clock ^ u64::from(std::process::id()).rotate_left(32));
        Self(seed | 1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, `d`] ("full jitter").
    pub fn full(&mut self, d: Duration) -> Duration {
        d.mul_f64(self.unit())
    }

    /// Uniform in [0.8 `d`, 1.2 `d`].
    pub fn around(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.8 + 0.4 * self.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("https://collector-{i}:7070"))
            .collect()
    }

    fn node(i: usize) -> String {
        format!("gpu-node-{i:05}")
    }

    #[test]
    fn hashed_order_spreads_a_fleet_evenly() {
        // Invariant: 3,000 nodes given the same 3 endpoints prefer each
        // within ±10 % of a third.
        let eps = endpoints(3);
        let mut first = [0usize; 3];
        for i in 0..3000 {
            let order = preference(&node(i), &eps, CollectorOrder::Hashed);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2], "a permutation");
            first[order[0]] += 1;
        }
        for (i, n) in first.iter().enumerate() {
            assert!(
                (900..=1100).contains(n),
                "endpoint {i}: {n} of 3000 nodes: {first:?}"
            );
        }
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_nodes() {
        // Invariant: without endpoint 1, a node that preferred 0 or 2
        // still does, and keeps its ranking of the others; only endpoint
        // 1's nodes move, to their own second choice.
        let eps = endpoints(3);
        let fewer = vec![eps[0].clone(), eps[2].clone()];
        let mut moved = 0;
        for i in 0..3000 {
            let before: Vec<&str> = preference(&node(i), &eps, CollectorOrder::Hashed)
                .into_iter()
                .map(|k| eps[k].as_str())
                .collect();
            let after: Vec<&str> = preference(&node(i), &fewer, CollectorOrder::Hashed)
                .into_iter()
                .map(|k| fewer[k].as_str())
                .collect();
            let kept: Vec<&str> = before.iter().copied().filter(|e| *e != eps[1]).collect();
            assert_eq!(after, kept, "{}", node(i));
            if before[0] == eps[1] {
                moved += 1;
            } else {
                assert_eq!(after[0], before[0]);
            }
        }
        assert!((900..=1100).contains(&moved), "{moved}");
    }

    #[test]
    fn the_hash_is_fixed() {
        // The same node prefers the same collector in every process and
        // version: the weight is a pure function of its inputs.
        assert_eq!(weight("n", "e"), weight("n", "e"));
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
        let eps = endpoints(5);
        let a = preference("node-17", &eps, CollectorOrder::Hashed);
        assert_eq!(a, preference("node-17", &eps, CollectorOrder::Hashed));
        // FNV-1a then SplitMix64's finaliser, worked out apart from this
        // code: a change of hash would move every node of a fleet.
        assert_eq!(weight("node-1", "http://a:7070"), 0x48b6_172a_d465_ec09_u64);
    }

    #[test]
    fn listed_order_is_kept() {
        let eps = endpoints(4);
        for i in 0..50 {
            assert_eq!(
                preference(&node(i), &eps, CollectorOrder::Listed),
                vec![0, 1, 2, 3]
            );
        }
    }

    #[test]
    fn jitter_stays_in_its_bounds() {
        let mut j = Jitter::new("n");
        let d = Duration::from_millis(1000);
        let (mut low, mut high) = (false, false);
        for _ in 0..1000 {
            let f = j.full(d);
            assert!(f <= d);
            low |= f < d / 4;
            high |= f > d * 3 / 4;
            let a = j.around(d);
            assert!(a >= d * 8 / 10 && a <= d * 12 / 10, "{a:?}");
        }
        assert!(low && high, "full jitter covers [0, d]");
    }
}
