//! What a node's whole-node energy is split by: the stretch since its
//! counter last booked energy, and each tenant's part in it.
//!
//! A whole-node counter on a coarse grid (a BMC's whole kWh) stands still
//! for many readings and then steps by what the node drew over all of
//! them. The stretch stays open over those readings (`Applied::open`),
//! gathering each tenant's GPU energy on the node (`G_t`) and its GPU
//! time (its GPUs at each whole-node reading times that reading's
//! interval), and the reading that books energy closes it: the energy is
//! split by the rule of `split_node_energy` with GPU time in place of the
//! GPU count (the same split while the lease stands, since GPU time is
//! then the count times the stretch), and each tenant's share is spread
//! by minute over the part of the stretch (`Applied::drawn`) its GPUs
//! were on the node. A lease change inside the stretch so gives each
//! holder the GPU energy it drew and the rest for the time it held GPUs,
//! in the minutes it held them, to within one whole-node reading
//! interval. For a fine counter each reading closes the stretch it opened.
//!
//! *Invariant:* the shares of a closed stretch add up to the closing
//! reading's energy, exactly; the stretch is kept in the node's cursor,
//! so a restart or another collector adopting the node splits and places
//! it alike.

use std::time::Duration;

use super::{Applied, Book, Party, split_node_energy};

/// One tenant's part in an open stretch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StretchWeight {
    /// GPU energy booked to it on the node since the stretch opened (mJ).
    pub gpu_energy_mj: u64,
    /// Its GPUs at each whole-node reading times that reading's interval
    /// (ns; at least 1 per GPU for a reading that closes none). A node
    /// without GPUs counts as one GPU of the tenant leasing it.
    pub gpu_ns: u64,
    /// From the start of the first reading interval it had GPUs in to the
    /// end of the last (Unix ns); `None` where it has only GPU energy (its
    /// GPUs left the node before a whole-node reading).
    pub span: Option<(i64, i64)>,
}

/// A node's open stretch: each tenant's part, in the order first met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStretch<T> {
    parts: Vec<(T, StretchWeight)>,
}

impl<T> Default for NodeStretch<T> {
    fn default() -> Self {
        Self { parts: Vec::new() }
    }
}

impl<T: Clone + Ord> NodeStretch<T> {
    /// A stretch resumed from a cursor.
    pub fn from_parts(parts: Vec<(T, StretchWeight)>) -> Self {
        Self { parts }
    }

    /// Each tenant's part, as a cursor keeps it.
    pub fn parts(&self) -> &[(T, StretchWeight)] {
        &self.parts
    }

    fn part(&mut self, tenant: &T) -> &mut StretchWeight {
        let i = match self.parts.iter().position(|(t, _)| t == tenant) {
            Some(i) => i,
            None => {
                self.parts.push((tenant.clone(), StretchWeight::default()));
                self.parts.len() - 1
            }
        };
        &mut self.parts[i].1
    }

    /// Adds GPU energy booked to `tenant` on the node.
    pub fn add_gpu_energy(&mut self, tenant: &T, mj: u64) {
        let w = self.part(tenant);
        w.gpu_energy_mj = w.gpu_energy_mj.saturating_add(mj);
    }

    /// Adds `gpus` GPUs of `tenant` at whole-node reading `r`, over the
    /// interval it covers.
    pub fn add_reading(&mut self, tenant: &T, gpus: u64, r: &Applied) {
        let from = r.from_ns.unwrap_or(r.to_ns);
        let ns = u64::try_from(r.to_ns.saturating_sub(from))
            .unwrap_or(0)
            .max(1);
        let w = self.part(tenant);
        w.gpu_ns = w.gpu_ns.saturating_add(gpus.saturating_mul(ns));
        w.span = Some(match w.span {
            Some((s, e)) => (s.min(from), e.max(r.to_ns)),
            None => (from, r.to_ns),
        });
    }

    /// Closes the stretch with whole-node reading `r` (its readings added
    /// already): splits its energy among the parts and books each share
    /// over the part of the stretch the tenant had GPUs in, by minute
    /// (within `window`, the source's staleness window, as `book_node`).
    /// The stretch starts again empty.
    pub fn close(&mut self, r: &Applied, b: &mut impl Book<T>, window: Duration) {
        let parts = std::mem::take(&mut self.parts);
        let parties: Vec<Party<T>> = parts
            .iter()
            .map(|(tenant, w)| Party {
                tenant: tenant.clone(),
                gpu_energy_mj: w.gpu_energy_mj,
                gpus: w.gpu_ns,
            })
            .collect();
        let (from, to) = r.drawn(window);
        for ((tenant, w), share) in parts.iter().zip(split_node_energy(r.energy_mj, &parties)) {
            let place = match w.span {
                Some((s, e)) if e.min(to) > s.max(from) => (s.max(from), e.min(to)),
                _ => (from, to),
            };
            r.book_node_energy(b, tenant, share, place);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use super::*;
    use crate::accounting::{Meter, MinuteFigures, Tick};
    use crate::edge::GpuReading;

    const T0: i64 = 1_700_000_000_000_000_000;
    const SEC: i64 = 1_000_000_000;
    const KWH: u64 = 3_600_000_000;

    /// Node energy booked per (tenant, minute).
    #[derive(Default)]
    struct Booked(BTreeMap<(String, i64), u64>);

    impl Book<String> for Booked {
        fn add(&mut self, tenant: &String, minute: i64, f: &MinuteFigures) {
            *self.0.entry((tenant.clone(), minute)).or_default() += f.node_energy_mj;
        }
    }

    /// The meter's view of whole-node readings `(seconds after T0,
    /// counter mJ)`, 10 s apart, at 20 kW.
    fn readings(counters: &[(i64, u64)]) -> Vec<Applied> {
        let base = Instant::now();
        let mut m = Meter::default();
        counters
            .iter()
            .enumerate()
            .map(|(i, &(s, counter))| {
                let t = Tick {
                    timestamp_ns: T0 + s * SEC,
                    seq: i as u64 + 1,
                    now: base + Duration::from_secs(s as u64),
                    latest_ns: T0 + s * SEC,
                    interval: Duration::from_secs(10),
                    window: Duration::from_secs(30),
                };
                let r = GpuReading {
                    power_milliwatts: Some(20_000_000),
                    energy_millijoules: Some(counter),
                    ..GpuReading::default()
                };
                m.apply(&r, Some(50_000_000 / 3), &t)
            })
            .collect()
    }

    /// A coarse counter that stands still leaves its stretch open, and its
    /// step says since when it was drawn; a fine counter's delta is drawn
    /// over its own reading's interval alone (one standing still leaves
    /// the stretch open too: only a step tells the grid).
    #[test]
    fn a_coarse_step_is_drawn_since_the_counters_last_change_a_fine_one_since_its_reading() {
        let coarse = readings(&[(0, 5 * KWH), (10, 5 * KWH), (20, 5 * KWH), (30, 6 * KWH)]);
        let open: Vec<bool> = coarse.iter().map(|a| a.open).collect();
        assert_eq!(open, [false, true, true, false]);
        let step = coarse[3];
        assert_eq!((step.energy_mj, step.drawn_from_ns), (KWH, Some(T0)));
        assert_eq!(step.drawn(Duration::from_secs(30)), (T0, T0 + 30 * SEC));
        let fine = readings(&[(0, 1_000_001), (10, 1_000_001), (20, 1_200_003)]);
        let open: Vec<bool> = fine.iter().map(|a| a.open).collect();
        assert_eq!(open, [false, true, false]);
        assert!(fine.iter().all(|a| a.drawn_from_ns.is_none()));
        assert_eq!(
            fine[2].drawn(Duration::from_secs(30)),
            (T0 + 10 * SEC, T0 + 20 * SEC)
        );
    }

    /// After an agent restart whose clock is behind the old run's, the
    /// counter's last change (on the old clock, ahead of every new
    /// reading) moves back to the first reading of the new run: the next
    /// step is drawn from there, not squeezed into its own interval
    /// until the new clock passes the old one.
    #[test]
    fn a_coarse_step_after_a_clock_stepped_back_is_drawn_since_the_new_runs_first_reading() {
        let base = Instant::now();
        let mut m = Meter::default();
        let apply = |m: &mut Meter, i: u64, s: i64, counter: u64| {
            let t = Tick {
                timestamp_ns: T0 + s * SEC,
                seq: i,
                now: base + Duration::from_secs(i * 10),
                latest_ns: T0 + 1_000 * SEC,
                interval: Duration::from_secs(10),
                window: Duration::from_secs(30),
            };
            let r = GpuReading {
                power_milliwatts: Some(20_000_000),
                energy_millijoules: Some(counter),
                ..GpuReading::default()
            };
            m.apply(&r, Some(50_000_000 / 3), &t)
        };
        apply(&mut m, 1, 0, 5 * KWH);
        apply(&mut m, 2, 10, 6 * KWH);
        // The new run's clock is 100 s behind.
        m.reanchor();
        let back: Vec<Applied> = (0..=18)
            .map(|k| {
                let counter = if k == 18 { 7 * KWH } else { 6 * KWH };
                apply(&mut m, k as u64 + 1, 20 + 10 * k - 100, counter)
            })
            .collect();
        assert!(back[1..18].iter().all(|a| a.open));
        let step = back[18];
        assert_eq!(step.energy_mj, KWH);
        assert_eq!(
            step.drawn(Duration::from_secs(30)),
            (T0 - 80 * SEC, T0 + 100 * SEC)
        );
    }

    /// A coarse counter that stands at 0 (a new BMC, or one whose counter
    /// restarted) is coarse too: its stretch stays open until it steps,
    /// and the step is drawn since it read 0. Whether a counter is coarse
    /// is decided at its step.
    #[test]
    fn a_counter_standing_at_zero_stays_open_until_it_steps() {
        let zero = readings(&[(0, 0), (10, 0), (20, 0), (30, KWH)]);
        let open: Vec<bool> = zero.iter().map(|a| a.open).collect();
        assert_eq!(open, [false, true, true, false]);
        assert_eq!(zero[3].drawn(Duration::from_secs(30)), (T0, T0 + 30 * SEC));
        // A restart of the counter books what it holds (none here) and
        // starts the stretch again, which stays open at 0.
        let reset = readings(&[(0, 5 * KWH), (10, 0), (20, 0), (30, KWH)]);
        let open: Vec<bool> = reset.iter().map(|a| a.open).collect();
        assert_eq!(open, [false, false, true, false]);
        assert_eq!(
            reset[3].drawn(Duration::from_secs(30)),
            (T0 + 10 * SEC, T0 + 30 * SEC)
        );
    }

    proptest! {
        /// Whatever the tenants at each reading and their GPU energy, a
        /// closed stretch books exactly its closing reading's energy, each
        /// tenant's share only in the minutes of the stretch it held GPUs
        /// in (or the whole stretch, with GPU energy alone).
        #[test]
        fn a_closed_stretch_books_its_energy_exactly_where_each_tenant_held_gpus(
            steps in proptest::collection::vec((0usize..3, 1u64..9, 0u64..10_000_000), 1..40),
            leftover in proptest::collection::vec((0usize..3, 0u64..10_000_000), 0..3),
            energy in 0u64..100 * KWH,
        ) {
            let names = ["a", "b", "c"];
            let mut stretch = NodeStretch::default();
            let mut spans: BTreeMap<String, (i64, i64)> = BTreeMap::new();
            for (i, (who, gpus, gpu_mj)) in steps.iter().enumerate() {
                let tenant = names[*who].to_string();
                let (from, to) = (T0 + 10 * SEC * i as i64, T0 + 10 * SEC * (i as i64 + 1));
                let r = Applied {
                    energy_mj: 0,
                    estimated_ns: None,
                    from_ns: Some(from),
                    to_ns: to,
                    utilization_percent: None,
                    kept: true,
                    drawn_from_ns: Some(T0),
                    open: true,
                };
                stretch.add_gpu_energy(&tenant, *gpu_mj);
                stretch.add_reading(&tenant, *gpus, &r);
                let s = spans.entry(tenant).or_insert((from, to));
                *s = (s.0.min(from), s.1.max(to));
            }
            for (who, gpu_mj) in &leftover {
                stretch.add_gpu_energy(&names[*who].to_string(), *gpu_mj);
            }
            let end = T0 + 10 * SEC * steps.len() as i64;
            let close = Applied {
                energy_mj: energy,
                estimated_ns: None,
                from_ns: Some(end - 10 * SEC),
                to_ns: end,
                utilization_percent: None,
                kept: true,
                drawn_from_ns: Some(T0),
                open: false,
            };
            let mut b = Booked::default();
            stretch.close(&close, &mut b, Duration::from_secs(30));
            prop_assert!(stretch.parts().is_empty());
            prop_assert_eq!(b.0.values().sum::<u64>(), energy);
            let minute = |ns: i64| ns.div_euclid(60 * SEC) * 60;
            for ((tenant, m), _) in b.0.iter().filter(|(_, e)| **e > 0) {
                let (from, to) = spans.get(tenant).copied().unwrap_or((T0, end));
                prop_assert!(
                    *m >= minute(from) && *m <= minute(to - 1),
                    "{} in minute {} outside {}..{}", tenant, m, from, to
                );
            }
        }
    }
}
