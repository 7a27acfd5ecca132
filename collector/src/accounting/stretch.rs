//! What a node's whole-node energy is split by: the stretch since its
//! counter last booked energy, and each tenant's part in it.
//!
//! A whole-node counter on a coarse grid (a BMC's whole kWh) stands still
//! for many readings and then steps by what the node drew over all of
//! them. The stretch stays open over those readings (`Applied::open`),
//! gathering each tenant's GPU energy on the node (`G_t`) and its GPU
//! time (its GPUs at each whole-node reading times the time that reading
//! covers, as node time counts it: a gap beyond the staleness window
//! covers none), kept as runs of time, and the reading that books energy
//! closes it: the energy is split by the rule of `split_node_energy` with
//! GPU time within the stretch it was drawn over (`Applied::drawn`, at
//! most `MAX_SPREAD` back) in place of the GPU count (the same split
//! while the lease stands, since GPU time is then the count times the
//! stretch), and each tenant's share is spread by minute in proportion
//! to its GPU time in each. A lease change inside the stretch so gives
//! each holder the GPU energy it drew and the rest for the time it held
//! GPUs, in the minutes it held them, to within one whole-node reading
//! interval. A fine counter's delta is drawn over its own reading's
//! interval (`Applied::drawn`).
//!
//! *Invariant:* the shares of a closed stretch add up to the closing
//! reading's energy, exactly; the stretch is kept in the node's cursor,
//! so a restart or another collector adopting the node splits and places
//! it alike.

use std::time::Duration;

use super::{Applied, Book, MAX_SPREAD_NANOS, Party, split_node_energy};

/// The most runs kept per tenant: beyond it the two oldest are merged
/// into the stretch between them (their GPU time kept, placed evenly
/// over it), so a lease that flaps or readings that keep failing do not
/// grow the node's cursor without bound.
pub const MAX_RUNS: usize = 256;

/// Time covered by whole-node readings in which a tenant held the same
/// number of GPUs on the node: `[from_ns, to_ns)` (Unix ns) and its GPU
/// time in it (ns: the GPUs times the covered time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Run {
    pub from_ns: i64,
    pub to_ns: i64,
    pub gpu_ns: u64,
}

impl Run {
    fn len(&self) -> u64 {
        u64::try_from(self.to_ns.saturating_sub(self.from_ns)).unwrap_or(0)
    }

    /// Its part within `[from, to)`, its GPU time in proportion.
    fn within(&self, from: i64, to: i64) -> Option<Run> {
        let (f, t) = (self.from_ns.max(from), self.to_ns.min(to));
        if t <= f {
            return None;
        }
        let part = Run {
            from_ns: f,
            to_ns: t,
            gpu_ns: 0,
        };
        let len = self.len().max(1);
        let gpu_ns = u128::from(self.gpu_ns) * u128::from(part.len()) / u128::from(len);
        Some(Run {
            gpu_ns: u64::try_from(gpu_ns).unwrap_or(u64::MAX),
            ..part
        })
    }
}

/// One tenant's part in an open stretch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StretchWeight {
    /// GPU energy booked to it on the node since the stretch opened (mJ).
    pub gpu_energy_mj: u64,
    /// Its GPUs at each whole-node reading times the time that reading
    /// covers (`Applied::book_node`'s node time: a gap beyond the
    /// staleness window covers none), at least 1 ns per GPU for a reading
    /// that covers none. A node without GPUs counts as one GPU of the
    /// tenant leasing it.
    pub gpu_ns: u64,
    /// Where its covered GPU time lies, in the order its readings came:
    /// what its share is placed by, minute by minute. Empty where it has
    /// only GPU energy (its GPUs left the node before a whole-node
    /// reading covered time).
    pub runs: Vec<Run>,
}

impl StretchWeight {
    /// Drops what lies before `cap` (the spread cap's start): its runs'
    /// GPU time there and the same fraction of its GPU energy.
    fn age_out(&mut self, cap: i64) {
        // Not always in time order (a clock stepped back at a restart).
        if self.runs.iter().all(|r| r.from_ns >= cap) {
            return;
        }
        let before: u64 = self.runs.iter().map(|r| r.gpu_ns).sum();
        let kept: Vec<Run> = self
            .runs
            .iter()
            .filter_map(|r| r.within(cap, i64::MAX))
            .collect();
        let after: u64 = kept.iter().map(|r| r.gpu_ns).sum();
        let gone = before - after.min(before);
        if before > 0 {
            let e = u128::from(self.gpu_energy_mj) * u128::from(gone) / u128::from(before);
            self.gpu_energy_mj -= u64::try_from(e).unwrap_or(self.gpu_energy_mj);
        }
        self.gpu_ns = self.gpu_ns.saturating_sub(gone);
        self.runs = kept;
    }

    fn push_run(&mut self, run: Run) {
        if let Some(last) = self.runs.last_mut() {
            // Contiguous at the same GPU count: one run.
            let same = u128::from(last.gpu_ns) * u128::from(run.len())
                == u128::from(run.gpu_ns) * u128::from(last.len());
            if last.to_ns == run.from_ns && same {
                last.to_ns = run.to_ns;
                last.gpu_ns = last.gpu_ns.saturating_add(run.gpu_ns);
                return;
            }
        }
        self.runs.push(run);
        if self.runs.len() > MAX_RUNS {
            let second = self.runs.remove(1);
            let first = &mut self.runs[0];
            first.from_ns = first.from_ns.min(second.from_ns);
            first.to_ns = first.to_ns.max(second.to_ns);
            first.gpu_ns = first.gpu_ns.saturating_add(second.gpu_ns);
        }
    }
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

    /// Adds `tenant`'s GPU time at whole-node reading `r`, `held` of the
    /// time it covers within `window` (the source's staleness window, as
    /// `Applied::book_node` counts node time; `held(1)` for a reading that
    /// covers none); then ages out what lies further back than the spread
    /// cap from `r`.
    pub fn add_reading(
        &mut self,
        tenant: &T,
        held: impl Fn(u64) -> u64,
        r: &Applied,
        window: Duration,
    ) {
        let iv = r.interval(window);
        let w = self.part(tenant);
        if iv.covered == 0 {
            w.gpu_ns = w.gpu_ns.saturating_add(held(1));
        } else {
            let ns = held(iv.covered);
            w.gpu_ns = w.gpu_ns.saturating_add(ns);
            w.push_run(Run {
                from_ns: iv.backed_from,
                to_ns: r.to_ns,
                gpu_ns: ns,
            });
        }
        let cap = r.to_ns.saturating_sub(MAX_SPREAD_NANOS);
        for (_, w) in &mut self.parts {
            w.age_out(cap);
        }
        self.parts
            .retain(|(_, w)| w.gpu_energy_mj > 0 || w.gpu_ns > 0 || !w.runs.is_empty());
    }

    /// Closes the stretch with whole-node reading `r` (its readings added
    /// already): splits its energy among the parts by their GPU energy
    /// and their GPU time within the stretch it was drawn over
    /// (`Applied::drawn`), and books each share by minute in proportion
    /// to the tenant's GPU time in each (evenly over the stretch for a
    /// tenant with GPU energy alone; `window` as in `add_reading`). The
    /// stretch starts again empty.
    pub fn close(&mut self, r: &Applied, b: &mut impl Book<T>, window: Duration) {
        let parts = std::mem::take(&mut self.parts);
        let (from, to) = r.drawn(window);
        let placed: Vec<(Vec<Run>, u64)> = parts
            .iter()
            .map(|(_, w)| {
                let runs: Vec<Run> = w.runs.iter().filter_map(|x| x.within(from, to)).collect();
                let all: u64 = w.runs.iter().map(|x| x.gpu_ns).sum();
                let inside: u64 = runs.iter().map(|x| x.gpu_ns).sum();
                // GPU time outside the stretch weighs nothing.
                let gpu_ns = w.gpu_ns.saturating_sub(all).saturating_add(inside);
                (runs, gpu_ns)
            })
            .collect();
        let parties: Vec<Party<T>> = parts
            .iter()
            .zip(&placed)
            .map(|((tenant, w), (_, gpu_ns))| Party {
                tenant: tenant.clone(),
                gpu_energy_mj: w.gpu_energy_mj,
                gpus: *gpu_ns,
            })
            .collect();
        let shares = split_node_energy(r.energy_mj, &parties);
        for (((tenant, _), (runs, _)), share) in parts.iter().zip(&placed).zip(shares) {
            let weights: Vec<u128> = runs.iter().map(|x| u128::from(x.gpu_ns)).collect();
            if weights.iter().all(|w| *w == 0) {
                r.book_node_energy(b, tenant, share, (from, to));
                continue;
            }
            for (run, part) in runs.iter().zip(apportion(share, &weights)) {
                r.book_node_energy(b, tenant, part, (run.from_ns, run.to_ns));
            }
        }
    }
}

/// `total` split in proportion to `weights` (not all 0), exactly: the
/// floors, then one each to the largest remainders, ties to the later.
fn apportion(total: u64, weights: &[u128]) -> Vec<u64> {
    let w: u128 = weights.iter().sum();
    let mut parts: Vec<(u64, u128)> = weights
        .iter()
        .map(|x| {
            let p = u128::from(total) * x;
            // At most `total`, since `x <= w`.
            ((p / w) as u64, p % w)
        })
        .collect();
    let mut left = total - parts.iter().map(|p| p.0).sum::<u64>();
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| parts[b].1.cmp(&parts[a].1).then(b.cmp(&a)));
    for i in order {
        if left == 0 {
            break;
        }
        parts[i].0 += 1;
        left -= 1;
    }
    parts.into_iter().map(|p| p.0).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
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
        /// Whatever the tenants at each reading, their GPU energy and the
        /// gaps between readings, a closed stretch books exactly its
        /// closing reading's energy, each tenant's share only in the
        /// minutes that readings covered while it held GPUs (or anywhere
        /// in the stretch, without such time).
        #[test]
        fn a_closed_stretch_books_its_energy_exactly_where_each_tenant_held_gpus(
            steps in proptest::collection::vec((0usize..3, 1u64..9, 0u64..10_000_000, 0usize..4), 1..40),
            leftover in proptest::collection::vec((0usize..3, 0u64..10_000_000), 0..3),
            energy in 0u64..100 * KWH,
        ) {
            let names = ["a", "b", "c"];
            let mut stretch = NodeStretch::default();
            let mut held: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
            let minute = |ns: i64| ns.div_euclid(60 * SEC) * 60;
            let mut to = T0;
            for (who, gpus, gpu_mj, gap) in &steps {
                let tenant = names[*who].to_string();
                // One in four readings follows a gap beyond the 30 s
                // window: it covers no time.
                let from = to;
                to += if *gap == 0 { 70 * SEC } else { 10 * SEC };
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
                stretch.add_reading(
                    &tenant,
                    |ns| ns.saturating_mul(*gpus),
                    &r,
                    Duration::from_secs(30),
                );
                let minutes = held.entry(tenant).or_default();
                if *gap != 0 {
                    minutes.extend([minute(from), minute(to - 1)]);
                }
            }
            for (who, gpu_mj) in &leftover {
                stretch.add_gpu_energy(&names[*who].to_string(), *gpu_mj);
            }
            let end = to;
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
            for ((tenant, m), _) in b.0.iter().filter(|(_, e)| **e > 0) {
                match held.get(tenant).filter(|h| !h.is_empty()) {
                    Some(h) => prop_assert!(h.contains(m), "{} in minute {}", tenant, m),
                    None => prop_assert!(*m >= minute(T0) && *m <= minute(end - 1)),
                }
            }
        }
    }
}
