//! What the surfaces (`/metrics`, the status page) read of the fleet:
//! borrowed views of one node and its GPUs, valid while the node's lock is
//! held by [`Fleet::for_each_node`]. They copy nothing and allocate
//! nothing; the node's internals (cursors, meters, summaries, departed
//! GPUs) stay the fleet's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::edge::{GpuReading, HostReading, NodePowerSource};
use crate::sync::lock;

use super::Fleet;
use super::node::{Gpu, Node, TenantLive};
use super::power::PowerSource;

/// One node, read under its lock, with the staleness window in force.
#[derive(Clone, Copy)]
pub struct NodeView<'a> {
    node: &'a Node,
    window: Duration,
}

impl<'a> NodeView<'a> {
    #[inline]
    pub(super) fn new(node: &'a Node, stale_after: Option<Duration>) -> Self {
        Self {
            node,
            window: node.stale_window(stale_after),
        }
    }

    #[inline]
    pub fn id(&self) -> &'a str {
        &self.node.id
    }

    /// Tenant label of the node as a whole.
    #[inline]
    pub fn tenant(&self) -> &'a str {
        &self.node.tenant
    }

    /// How long without a sample before this node's GPUs are stale: the
    /// configured window, else three of its intervals.
    #[inline]
    pub fn stale_window(&self) -> Duration {
        self.window
    }

    /// Whether samples arrive from the node (`capwatch_node_up`).
    #[inline]
    pub fn up(&self, now: Instant) -> bool {
        self.node.up(now, self.window)
    }

    /// How long since the node's last sample arrived; `None` before the
    /// first.
    #[inline]
    pub fn silent_for(&self, now: Instant) -> Option<Duration> {
        self.node.silent_for(now)
    }

    /// Samples accepted from the node.
    #[inline]
    pub fn samples_accepted(&self) -> u64 {
        self.node.samples_accepted
    }

    /// The timestamp (Unix nanoseconds) of the newest sample accepted from
    /// the node; `None` before the first.
    #[inline]
    pub fn last_sample_unix_nanos(&self) -> Option<i64> {
        (self.node.last_timestamp > 0).then_some(self.node.last_timestamp)
    }

    /// The host's latest reading, if the agent sends one.
    #[inline]
    pub fn host(&self) -> Option<&'a HostReading> {
        self.node.host.as_ref()
    }

    /// Calls `add` with what the node's GPUs add to each tenant's live
    /// figures at `now`.
    #[inline]
    pub fn live(&self, now: Instant, add: impl FnMut(&Arc<str>, &TenantLive)) {
        self.node.live(now, self.window, add)
    }

    /// The node's power sources of its latest Hello, in its order.
    #[inline]
    pub fn power_sources(self) -> impl ExactSizeIterator<Item = PowerSourceView<'a>> {
        let window = self.window;
        self.node
            .power
            .iter()
            .map(move |source| PowerSourceView { source, window })
    }

    /// Power (mW) of the node's whole-node source, where its last reading
    /// is fresh at `now`.
    #[inline]
    pub fn node_power_milliwatts(&self, now: Instant) -> Option<u64> {
        self.node.node_power(now, self.window).map(|(_, mw)| mw)
    }

    /// The node's GPUs in inventory order (their position is the `gpu`
    /// label).
    #[inline]
    pub fn gpus(self) -> impl ExactSizeIterator<Item = GpuView<'a>> {
        let window = self.window;
        self.node
            .gpus
            .iter()
            .map(move |gpu| GpuView { gpu, window })
    }
}

/// One GPU of a [`NodeView`].
#[derive(Clone, Copy)]
pub struct GpuView<'a> {
    gpu: &'a Gpu,
    window: Duration,
}

impl<'a> GpuView<'a> {
    /// The tenant its energy is attributed to now.
    #[inline]
    pub fn tenant(&self) -> &'a str {
        &self.gpu.tenant
    }

    // ---- MIG ----

    /// The parts a MIG board's energy is split among (its instances, then
    /// its slices in no instance); none for a whole board.
    pub fn mig_parts(&self) -> impl Iterator<Item = MigPartView<'a>> + use<'a> {
        self.gpu
            .mig
            .as_deref()
            .into_iter()
            .flat_map(|m| m.parts.iter().map(|part| MigPartView { part }))
    }
    // ---- end MIG ----

    #[inline]
    pub fn uuid(&self) -> &'a str {
        &self.gpu.uuid
    }

    #[inline]
    pub fn model(&self) -> &'a str {
        &self.gpu.model
    }

    /// Device memory installed, from the inventory.
    #[inline]
    pub fn memory_total_bytes(&self) -> Option<u64> {
        self.gpu.memory_total_bytes
    }

    /// The power limit last known: the inventory's, or a later reading's.
    #[inline]
    pub fn power_limit_milliwatts(&self) -> Option<u64> {
        self.gpu.power_limit_milliwatts
    }

    /// PCI bus id, serial and driver version, from the Hello.
    #[inline]
    pub fn identity(&self) -> Option<&'a crate::edge::GpuIdentity> {
        self.gpu.identity.as_deref()
    }

    /// Its last kept reading, fresh or not.
    #[inline]
    pub fn last(&self) -> Option<&'a GpuReading> {
        self.gpu.last.as_ref()
    }

    /// How long before `now` its last reading was sampled; `None` before
    /// the first (or when it was too old for the clock to hold).
    #[inline]
    pub fn sampled_for(&self, now: Instant) -> Option<Duration> {
        self.gpu
            .sampled_at
            .map(|t| now.saturating_duration_since(t))
    }

    /// Whether its last reading is live at `now` (`capwatch_gpu_up`).
    #[inline]
    pub fn fresh(&self, now: Instant) -> bool {
        self.gpu.fresh(now, self.window)
    }

    /// Energy since this collector first saw the GPU (mJ).
    #[inline]
    pub fn energy_millijoules(&self) -> u64 {
        self.gpu.energy_millijoules()
    }

    /// Times its energy counter went backwards or jumped.
    #[inline]
    pub fn counter_resets(&self) -> u64 {
        self.gpu.counter_resets()
    }
}

/// One power source of a [`NodeView`].
#[derive(Clone, Copy)]
pub struct PowerSourceView<'a> {
    source: &'a PowerSource,
    window: Duration,
}

impl<'a> PowerSourceView<'a> {
    /// What reads it, what it measures and which one: from the Hello.
    #[inline]
    pub fn info(&self) -> Option<&'a NodePowerSource> {
        self.source.info.as_ref()
    }

    /// Its last reading's power, where the reading is fresh at `now`.
    #[inline]
    pub fn power_milliwatts(&self, now: Instant) -> Option<u64> {
        let fresh = self
            .source
            .sampled_at
            .is_some_and(|t| now.saturating_duration_since(t) <= self.source.window(self.window));
        self.source
            .last
            .as_ref()
            .filter(|_| fresh)
            .and_then(|r| r.power_milliwatts)
    }

    /// Energy since this collector first saw the source (mJ); `None`
    /// before its first reading.
    #[inline]
    pub fn energy_millijoules(&self) -> Option<u64> {
        self.source
            .last
            .is_some()
            .then(|| self.source.energy_millijoules())
    }

    /// Times its energy counter went backwards or jumped implausibly
    /// (kept across collector restarts in its cursor).
    #[inline]
    pub fn counter_resets(&self) -> u64 {
        self.source.counter_resets()
    }
}

impl Fleet {
    /// Calls `f` with a view of every node, one node's lock at a time (a
    /// stream's batch waits only for its own node's visit). A node that
    /// moved to another collector (its commit was fenced) is left out
    /// until it says Hello here again: that collector shows it.
    pub fn for_each_node(&self, mut f: impl FnMut(NodeView<'_>)) {
        let stale_after = self.cfg.stale_after;
        for node in self.nodes() {
            let n = lock(&node);
            if n.moved_away {
                continue;
            }
            f(NodeView::new(&n, stale_after));
        }
    }
}

// ---- MIG ----

/// One part of a MIG board, as a [`GpuView`] lists it.
#[derive(Clone, Copy)]
pub struct MigPartView<'a> {
    part: &'a super::node::MigPart,
}

impl<'a> MigPartView<'a> {
    /// The instance's UUID, or the board's for its slices in no instance.
    pub fn uuid(&self) -> &'a str {
        &self.part.uuid
    }

    /// The lessee of the instance, else the board's tenant.
    pub fn tenant(&self) -> &'a str {
        &self.part.tenant
    }

    /// The instance's ids and profile; `None` for the board's rest.
    pub fn instance(&self) -> Option<&'a crate::edge::MigInstance> {
        self.part.instance.as_ref()
    }

    /// The part's weight in the split (its scaled slice share).
    pub fn weight(&self) -> u64 {
        self.part.weight
    }

    /// Energy booked to the part since this collector first heard it.
    pub fn energy_millijoules(&self) -> u64 {
        self.part.energy_mj
    }
}
// ---- end MIG ----
