//! The minute buckets and per-GPU hours of one batch of one node.

use std::collections::HashMap;
use std::sync::Arc;

use crate::accounting::{Book, MinuteFigures, OnGpu};
use crate::ledger::{BucketDelta, Commit, GpuDelta, HOUR};

/// The minute buckets one batch of one node adds to, per (tenant,
/// minute), before they go into the pending commit.
///
/// A batch touches few buckets (one tenant and one minute, mostly), so the
/// first ones are found by comparing pointers instead of hashing two
/// strings per GPU reading; a batch that spreads a long gap over many
/// minutes goes on in a map.
///
/// A GPU reading booked through [`OnGpu`] adds the same figures to the
/// (tenant, GPU, hour) it belongs to as well, so that the per-GPU hours
/// sum to the tenant's GPU figures exactly: found by comparing pointers
/// too (the GPU's key is the node's own `Arc`), a batch holding a few
/// rows per GPU of the node. Only in a booking made to keep them
/// ([`Booking::new`]): without per-GPU rows, a reading costs what it did
/// before they existed.
#[derive(Debug, Default)]
pub struct Booking {
    keep_gpus: bool,
    few: Vec<(Arc<str>, i64, BucketDelta)>,
    many: HashMap<(Arc<str>, i64), BucketDelta>,
    gpus: Vec<(Arc<str>, Arc<str>, i64, GpuDelta)>,
    more_gpus: HashMap<(Arc<str>, Arc<str>, i64), GpuDelta>,
}

impl Booking {
    const FEW: usize = 8;

    /// An empty booking; with `keep_gpus`, one that keeps per-GPU hours.
    pub fn new(keep_gpus: bool) -> Self {
        Self {
            keep_gpus,
            ..Self::default()
        }
    }

    fn bucket(&mut self, tenant: &Arc<str>, minute: i64) -> &mut BucketDelta {
        let found = self
            .few
            .iter()
            .position(|(t, m, _)| *m == minute && Arc::ptr_eq(t, tenant));
        match found {
            Some(i) => &mut self.few[i].2,
            None if self.few.len() < Self::FEW => {
                self.few
                    .push((tenant.clone(), minute, BucketDelta::default()));
                &mut self.few.last_mut().expect("just pushed").2
            }
            None => self.many.entry((tenant.clone(), minute)).or_default(),
        }
    }

    /// Most per-GPU rows found by pointers: every part of eight boards
    /// of seven MIG instances each, over a change of hour.
    const FEW_GPUS: usize = 128;

    fn gpu_hour(&mut self, tenant: &Arc<str>, gpu: &Arc<str>, hour: i64) -> &mut GpuDelta {
        let found = self
            .gpus
            .iter()
            .position(|(t, g, h, _)| *h == hour && Arc::ptr_eq(g, gpu) && Arc::ptr_eq(t, tenant));
        match found {
            Some(i) => &mut self.gpus[i].3,
            None if self.gpus.len() < Self::FEW_GPUS => {
                self.gpus
                    .push((tenant.clone(), gpu.clone(), hour, GpuDelta::default()));
                &mut self.gpus.last_mut().expect("just pushed").3
            }
            None => self
                .more_gpus
                .entry((tenant.clone(), gpu.clone(), hour))
                .or_default(),
        }
    }

    /// Adds everything booked to `c`'s buckets of `node`, and with
    /// `gpu_rows` to its per-GPU hours.
    pub fn into_commit(self, c: &mut Commit, node: &Arc<str>, gpu_rows: bool) {
        if gpu_rows && self.keep_gpus {
            let all = self.gpus.into_iter().chain(
                self.more_gpus
                    .into_iter()
                    .map(|((t, g, h), d)| (t, g, h, d)),
            );
            for (tenant, gpu, hour, d) in all {
                c.gpu_hours
                    .entry((tenant, node.clone(), gpu, hour))
                    .or_default()
                    .add(&d);
            }
        }
        let all = self
            .few
            .into_iter()
            .chain(self.many.into_iter().map(|((t, m), d)| (t, m, d)));
        for (tenant, minute, d) in all {
            c.buckets
                .entry((tenant, node.clone(), minute))
                .or_default()
                .add(&d);
        }
    }
}

/// Adds a reading's GPU figures to `d`: the same to a minute bucket and
/// to a per-GPU hour, so that the hours sum to the buckets exactly.
#[inline]
fn add_gpu_figures(d: &mut BucketDelta, f: &MinuteFigures) {
    d.energy_mj += f.energy_mj;
    d.estimated_mj += f.estimated_mj;
    d.gpu_ns += f.gpu_ns;
    d.busy_gpu_ns += f.busy_gpu_ns;
    d.busy_unknown_gpu_ns += f.busy_unknown_gpu_ns;
    d.expected_gpu_ns += f.expected_gpu_ns;
    d.samples += f.samples;
}

impl Book<Arc<str>> for Booking {
    #[inline]
    fn add(&mut self, tenant: &Arc<str>, minute: i64, f: &MinuteFigures) {
        let d = self.bucket(tenant, minute);
        add_gpu_figures(d, f);
        d.node_energy_mj += f.node_energy_mj;
        d.node_estimated_mj += f.node_estimated_mj;
        d.node_ns += f.node_ns;
    }
}

impl Book<OnGpu<'_, Arc<str>>> for Booking {
    #[inline]
    fn add(&mut self, on: &OnGpu<'_, Arc<str>>, minute: i64, f: &MinuteFigures) {
        Book::<Arc<str>>::add(self, on.tenant, minute, f);
        if !self.keep_gpus {
            return;
        }
        let g = self.gpu_hour(on.tenant, on.gpu, minute.div_euclid(HOUR) * HOUR);
        add_gpu_figures(&mut g.delta, f);
        g.first_minute = g.first_minute.min(minute);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(b: &mut Booking, tenant: &Arc<str>, gpu: &Arc<str>, minute: i64) {
        let f = MinuteFigures {
            energy_mj: 1_000,
            gpu_ns: 1_000_000_000,
            samples: 1,
            ..MinuteFigures::default()
        };
        b.add(&OnGpu { tenant, gpu }, minute, &f);
    }

    /// Invariant: a booking made without per-GPU rows books each reading's
    /// minute bucket and keeps nothing per GPU; one made with them keeps
    /// the same figures per (tenant, GPU, hour).
    #[test]
    fn per_gpu_hours_are_booked_only_when_kept() {
        let (tenant, gpu, node): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("lab-a"), Arc::from("GPU-1"), Arc::from("n1"));
        for keep in [false, true] {
            let mut b = Booking::new(keep);
            reading(&mut b, &tenant, &gpu, 3_600);
            reading(&mut b, &tenant, &gpu, 3_660);
            assert_eq!(b.gpus.len(), usize::from(keep));
            let mut c = Commit::default();
            b.into_commit(&mut c, &node, true);
            let minutes: u64 = c.buckets.values().map(|d| d.energy_mj).sum();
            assert_eq!(minutes, 2_000, "keep {keep}");
            let hours: Vec<u64> = c.gpu_hours.values().map(|g| g.delta.energy_mj).collect();
            assert_eq!(hours, if keep { vec![2_000] } else { vec![] });
        }
    }

    /// Invariant: a node taken out of a commit (its claim lost) takes its
    /// per-GPU hours with its buckets; the other nodes' stay.
    #[test]
    fn a_node_taken_out_of_a_commit_takes_its_gpu_hours() {
        let tenant: Arc<str> = Arc::from("lab-a");
        let mut c = Commit::default();
        for (node, gpu) in [("n1", "GPU-1"), ("n2", "GPU-2")] {
            let mut b = Booking::new(true);
            reading(&mut b, &tenant, &Arc::from(gpu), 3_600);
            b.into_commit(&mut c, &Arc::from(node), true);
        }
        assert_eq!(c.gpu_hours.len(), 2);
        super::super::pending::remove_node(&mut c, "n1");
        let left: Vec<&str> = c.gpu_hours.keys().map(|(_, n, _, _)| &**n).collect();
        assert_eq!(left, ["n2"]);
        assert!(c.buckets.keys().all(|(_, n, _)| &**n == "n2"));
    }
}
