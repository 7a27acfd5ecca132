//! The ledger commit being gathered, and the per-tenant totals that
//! outlive nodes and reloads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::billing::Booking;
use crate::ledger::{Commit, GpuRows, NodeCursor, Snapshot};
use crate::sync::lock;
use crate::tenants::TenantHistory;

/// Per-tenant figures that outlive nodes and reloads.
#[derive(Debug, Default, Clone)]
pub struct TenantTotals {
    pub energy_millijoules: u64,
    pub over_contract_nanos: u128,
    /// Node energy as the ledger holds it (`tenant_total.node_energy_mj`):
    /// resumed at start-up and read after each commit.
    pub node_energy_millijoules: u64,
}

/// The ledger commit being gathered, and its number.
#[derive(Debug, Default)]
struct Pending {
    id: u64,
    commit: Commit,
    /// Nodes whose bookings were dropped for a lost claim, each with the
    /// number of the pending commit then: bookings of the node in a
    /// commit numbered before it (already taken by the committer) are
    /// stale too (`take_stale`).
    stale: Vec<(Arc<str>, u64)>,
}

/// What the next ledger commit will write, and the tenant totals.
#[derive(Debug)]
pub struct Billing {
    pending: Mutex<Pending>,
    totals: Mutex<HashMap<Arc<str>, TenantTotals>>,
    /// Whether commits keep per-GPU hours (`usage_gpu_rows`).
    gpu_rows: AtomicBool,
}

impl Default for Billing {
    fn default() -> Self {
        Self {
            pending: Mutex::new(Pending {
                id: 1,
                commit: Commit::default(),
                stale: Vec::new(),
            }),
            totals: Mutex::new(HashMap::new()),
            gpu_rows: AtomicBool::new(true),
        }
    }
}

impl Billing {
    /// Whether commits from now on keep per-GPU hours (each commit says
    /// so to the ledger, which records from when they are complete).
    pub fn keep_gpu_rows(&self, keep: bool) {
        self.gpu_rows.store(keep, Ordering::Relaxed);
    }

    /// An empty booking for one batch, keeping per-GPU hours when commits
    /// do.
    pub fn booking(&self) -> Booking {
        Booking::new(self.gpu_rows.load(Ordering::Relaxed))
    }

    /// Takes what the next commit must write, with its number and
    /// `contracts` (each minute is measured against the contract of its
    /// own time); batches booked from now on go to the commit after it.
    pub fn take_pending(&self, contracts: Arc<TenantHistory>) -> (u64, Commit) {
        let mut p = lock(&self.pending);
        let id = p.id;
        p.id += 1;
        let mut c = std::mem::take(&mut p.commit);
        c.contracts = Some(contracts);
        c.id = Some(id);
        // The setting is the process's, set before any batch is booked.
        c.gpu_rows = if self.gpu_rows.load(Ordering::Relaxed) {
            GpuRows::Kept
        } else {
            GpuRows::NotKept
        };
        (id, c)
    }

    /// Puts one node's batch into the next commit: its buckets, its
    /// cursor (replacing the one an earlier batch put there) and the
    /// tenants' energy, and adds that energy to the tenants' totals under
    /// the same lock, so that no drop of the node's bookings (`drop_node`)
    /// can fall between the two. Returns the number of the commit that
    /// will hold it. Called under the node's lock, so that cursors and
    /// deltas of a node are written in order.
    pub fn book(
        &self,
        booked: Booking,
        node: &Arc<str>,
        cursor: NodeCursor,
        energy: &[(Arc<str>, u64)],
    ) -> u64 {
        let mut pending = lock(&self.pending);
        let c = &mut pending.commit;
        booked.into_commit(c, node, self.gpu_rows.load(Ordering::Relaxed));
        c.nodes.insert(node.clone(), cursor);
        for (tenant, mj) in energy {
            *c.tenant_energy.entry(tenant.clone()).or_default() += mj;
        }
        if !energy.is_empty() {
            let mut totals = lock(&self.totals);
            for (tenant, mj) in energy {
                let t = totals.entry(tenant.clone()).or_default();
                t.energy_millijoules = t.energy_millijoules.saturating_add(*mj);
            }
        }
        pending.id
    }

    /// Drops everything of `node` from the pending commit (its claim was
    /// replaced: what it booked belongs to a stream whose node another
    /// holder took), and remembers it for the commit the committer may
    /// already hold (`take_stale`). Called while no commit can be written
    /// (under the ledger's lock).
    pub fn drop_node(&self, node: &Arc<str>) {
        let mut pending = lock(&self.pending);
        let removed = remove_node(&mut pending.commit, node);
        let id = pending.id;
        pending.stale.push((node.clone(), id));
        drop(pending);
        self.take_energy(&removed);
    }

    /// The nodes dropped since the last call, each with the number of the
    /// pending commit when it was: the committer drops them from a
    /// commit numbered before it. Called under the ledger's lock.
    pub fn take_stale(&self) -> Vec<(Arc<str>, u64)> {
        std::mem::take(&mut lock(&self.pending).stale)
    }

    /// Takes energy that will not be committed after all back out of the
    /// tenants' totals, so that they stay what the ledger holds.
    pub fn take_energy(&self, energy: &[(Arc<str>, u64)]) {
        if energy.is_empty() {
            return;
        }
        let mut totals = lock(&self.totals);
        for (tenant, mj) in energy {
            if let Some(t) = totals.get_mut(tenant) {
                t.energy_millijoules = t.energy_millijoules.saturating_sub(*mj);
            }
        }
    }

    /// Adds what a ledger commit added to the tenants' over-contract
    /// counters (`Ledger::commit_at`) to their totals.
    pub fn add_over_contract(&self, added: &[(Arc<str>, u64)]) {
        let mut totals = lock(&self.totals);
        for (tenant, ns) in added {
            totals
                .entry(tenant.clone())
                .or_default()
                .over_contract_nanos += u128::from(*ns);
        }
    }

    /// Resumes the tenant totals the ledger holds.
    pub fn restore(&self, snap: &Snapshot) {
        let mut totals = lock(&self.totals);
        for (tenant, energy) in &snap.tenant_energy {
            totals
                .entry(Arc::from(tenant.as_str()))
                .or_default()
                .energy_millijoules = *energy;
        }
        for (tenant, nanos) in &snap.tenant_over_contract_ns {
            totals
                .entry(Arc::from(tenant.as_str()))
                .or_default()
                .over_contract_nanos = u128::from(*nanos);
        }
        for (tenant, energy) in &snap.tenant_node_energy {
            totals
                .entry(Arc::from(tenant.as_str()))
                .or_default()
                .node_energy_millijoules = *energy;
        }
    }

    pub fn totals(&self) -> HashMap<Arc<str>, TenantTotals> {
        lock(&self.totals).clone()
    }
}

/// Removes `node`'s cursor and buckets from `c`, and their energy from its
/// tenant totals; returns the energy removed, by tenant. Walks the
/// buckets: only on the rare path of a lost claim.
pub fn remove_node(c: &mut Commit, node: &str) -> Vec<(Arc<str>, u64)> {
    c.nodes.remove(node);
    c.gpu_hours.retain(|(_, n, _, _), _| &**n != node);
    let mut removed: Vec<(Arc<str>, u64)> = Vec::new();
    c.buckets.retain(|(tenant, n, _), d| {
        if &**n != node {
            return true;
        }
        match removed.iter_mut().find(|(t, _)| t == tenant) {
            Some((_, e)) => *e += d.energy_mj,
            None => removed.push((tenant.clone(), d.energy_mj)),
        }
        false
    });
    for (tenant, mj) in &removed {
        if let Some(e) = c.tenant_energy.get_mut(tenant) {
            *e = e.saturating_sub(*mj);
            if *e == 0 {
                c.tenant_energy.remove(tenant);
            }
        }
    }
    removed
}
