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
