//! The minute buckets of one batch of one node.

use std::collections::HashMap;
use std::sync::Arc;

use crate::accounting::{Book, MinuteFigures};
use crate::ledger::{BucketDelta, Commit};

/// The minute buckets one batch of one node adds to, per (tenant,
/// minute), before they go into the pending commit.
///
/// A batch touches few buckets (one tenant and one minute, mostly), so the
/// first ones are found by comparing pointers instead of hashing two
/// strings per GPU reading; a batch that spreads a long gap over many
/// minutes goes on in a map.
#[derive(Debug, Default)]
pub struct Booking {
    few: Vec<(Arc<str>, i64, BucketDelta)>,
    many: HashMap<(Arc<str>, i64), BucketDelta>,
}

impl Booking {
    const FEW: usize = 8;

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

    /// Adds everything booked to `c`'s buckets of `node`.
    pub fn into_commit(self, c: &mut Commit, node: &Arc<str>) {
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

impl Book<Arc<str>> for Booking {
    #[inline]
    fn add(&mut self, tenant: &Arc<str>, minute: i64, f: &MinuteFigures) {
        let d = self.bucket(tenant, minute);
        d.energy_mj += f.energy_mj;
        d.estimated_mj += f.estimated_mj;
        d.gpu_ns += f.gpu_ns;
        d.busy_gpu_ns += f.busy_gpu_ns;
        d.expected_gpu_ns += f.expected_gpu_ns;
        d.samples += f.samples;
        d.node_energy_mj += f.node_energy_mj;
        d.node_estimated_mj += f.node_estimated_mj;
        d.node_ns += f.node_ns;
    }
}
