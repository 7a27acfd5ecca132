//! The fleet: one entry per node, owned by that node's stream. Hellos and
//! disconnects, dedup and epochs, GPUs held by one node at a time and
//! GPUs that move between nodes, and the live summaries.
//!
//! *Invariant:* a sample is counted once. Each node remembers the highest
//! (epoch, seq) it accepted; a sample at or below it is a duplicate and
//! changes nothing. Energy is only ever added from an accepted sample (the
//! arithmetic is `accounting`'s).
//!
//! What the surfaces read of a node goes through its view (`view`:
//! [`NodeView`], [`GpuView`]); the fields of `Node` and `Gpu` are the
//! fleet's own.
//!
//! Locking: the node map is locked only to find or add a node; each node's
//! own mutex is taken once per batch by its stream task, and briefly by
//! `/metrics` rendering and the status page (`for_each_node`, one node at
//! a time).

mod batch;
mod claim;
mod node;
mod power;
mod view;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::info;

use crate::accounting::NodeStretch;
use crate::edge::{Checked, Hello, HelloError};
use crate::ledger::Snapshot;
use crate::sync::{lock, unix_nanos_now};
use crate::tenants::{Tenants, UNASSIGNED};
use power::PowerSource;

pub use batch::{BatchOutcome, Superseded};
pub use claim::RetireError;
pub use node::TenantLive;
pub(crate) use node::{Gpu, Node};
pub use view::{GpuView, NodeView, PowerSourceView};

/// What bounds the fleet: staleness, inventory size and the clock skew
/// and age a sample may have.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub stale_after: Option<Duration>,
    pub max_gpus_per_node: u32,
    /// How far ahead of the collector's clock a sample may be stamped.
    pub max_clock_skew: Duration,
    /// How far behind the collector's clock a sample may be stamped.
    pub max_sample_age: Duration,
}

/// A stream's claim on its node.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    node: Arc<Mutex<Node>>,
    pub node_id: Arc<str>,
    pub epoch: u64,
    generation: u64,
    /// The commit that must be durable before the Welcome goes out (it
    /// holds the node's latest batch, whose seq the Welcome reports).
    pub welcome_after: u64,
    /// The node's `claim_lost` when the stream was admitted.
    claim_lost: Arc<std::sync::atomic::AtomicBool>,
}

impl StreamHandle {
    /// Whether the ledger claim this stream was admitted under is lost
    /// (fenced, or replaced by a newer claim): it must ack nothing more.
    pub fn claim_lost(&self) -> bool {
        self.claim_lost.load(Ordering::Acquire)
    }
}

#[cfg(test)]
impl StreamHandle {
    /// The node this stream owns, for tests that read its internals.
    pub(crate) fn node(&self) -> &Arc<Mutex<Node>> {
        &self.node
    }
}

/// GPU UUID -> (the connected node whose inventory lists it, that
/// stream's generation).
type HeldGpus = HashMap<Arc<str>, (Arc<str>, u64)>;

pub struct Fleet {
    cfg: FleetConfig,
    nodes: Mutex<HashMap<Arc<str>, Arc<Mutex<Node>>>>,
    /// Nodes with a stream now (`Node::connected`).
    connected: AtomicU64,
    /// UUID of every departed GPU -> the node that keeps it. A GPU keeps
    /// one counter state: when another node announces it, the copy among
    /// the first node's departed is dropped, so that the GPU's energy on
    /// the new node is not counted again on the old one should it come
    /// back there.
    departed_at: Mutex<HashMap<Arc<str>, Arc<str>>>,
    /// UUID of every GPU leased by UUID in a connected node's inventory ->
    /// (that node, its stream's generation): a leased GPU is reported by
    /// one connected node at a time. An entry whose stream has ended is
    /// void (checked against the node). Only leased GPUs, so that it stays
    /// as small as the tenant file's UUID leases.
    held: Mutex<HeldGpus>,
    next_generation: AtomicU64,
}

impl Fleet {
    pub fn new(cfg: FleetConfig) -> Self {
        Self {
            cfg,
            nodes: Mutex::new(HashMap::new()),
            connected: AtomicU64::new(0),
            departed_at: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
        }
    }

    pub fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    #[cfg(test)]
    pub(crate) fn config_mut(&mut self) -> &mut FleetConfig {
        &mut self.cfg
    }

    /// The node called `id`, if the collector knows it.
    #[cfg(test)]
    pub(crate) fn node(&self, id: &str) -> Option<Arc<Mutex<Node>>> {
        lock(&self.nodes).get(id).cloned()
    }

    /// Every node (the map's lock is let go before any node's is taken).
    fn nodes(&self) -> Vec<Arc<Mutex<Node>>> {
        lock(&self.nodes).values().cloned().collect()
    }

    /// Every node, for tests that read their internals.
    #[cfg(test)]
    pub(crate) fn all_nodes(&self) -> Vec<Arc<Mutex<Node>>> {
        self.nodes()
    }

    /// How many nodes the collector knows.
    pub fn node_count(&self) -> usize {
        lock(&self.nodes).len()
    }

    /// How many nodes have a stream now.
    pub fn connected(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    /// Resumes from what the ledger holds: each node's (epoch, seq) for
    /// dedup, each GPU's counter for the next delta.
    pub fn restore(&self, snap: &Snapshot) {
        // A GPU in two nodes' cursors (it moved) resumes only where it was
        // heard last.
        let mut latest: HashMap<&str, (usize, Option<i64>)> = HashMap::new();
        for (i, (_, cursor)) in snap.nodes.iter().enumerate() {
            for (uuid, c) in &cursor.gpus {
                let e = latest.entry(&**uuid).or_insert((i, c.last_timestamp_ns));
                if c.last_timestamp_ns > e.1 {
                    *e = (i, c.last_timestamp_ns);
                }
            }
        }
        let mut nodes = lock(&self.nodes);
        let mut departed_at = lock(&self.departed_at);
        for (i, (id, cursor)) in snap.nodes.iter().enumerate() {
            let id: Arc<str> = Arc::from(id.as_str());
            let mut node = Node::new(
                id.clone(),
                cursor.epoch,
                cursor.last_seq,
                Duration::from_secs(1),
            );
            // Resumed GPUs wait among the departed until the Hello.
            for (uuid, c) in &cursor.gpus {
                if latest.get(&**uuid).is_some_and(|(at, _)| *at == i) {
                    // At most the samples since its last reading, which
                    // came with this cursor's or an earlier one.
                    let g = Gpu::resumed(uuid, c, cursor.last_seq);
                    departed_at.insert(g.uuid.clone(), id.clone());
                    node.departed.push(g);
                }
            }
            // Power sources too, until the Hello announces them.
            node.power_departed = cursor
                .power
                .iter()
                .map(|(key, c)| PowerSource::resumed(key, c))
                .collect();
            // And the open whole-node stretch, with its weights.
            node.stretch = NodeStretch::from_parts(cursor.stretch.clone());
            nodes.insert(id, Arc::new(Mutex::new(node)));
        }
    }

    /// Attributes every node's GPUs by `tenants`, the version in force over
    /// `span`; GPUs and MIG instances newly leased by UUID on connected
    /// nodes are held from now.
    pub fn attribute(&self, tenants: &Tenants, span: (i64, i64)) {
        let mut leased: Vec<(Arc<str>, Arc<str>, u64)> = Vec::new();
        for node in self.nodes() {
            let mut n = lock(&node);
            n.attribute(tenants, span);
            if n.connected {
                // Boards and their MIG instances alike.
                for uuid in n
                    .gpus
                    .iter()
                    .flat_map(|g| g.leasable_uuids())
                    .filter(|u| tenants.uuid_lessee(u).is_some())
                {
                    leased.push((uuid.clone(), n.id.clone(), n.generation));
                }
            }
        }
        // One lock at a time: `hello` takes `held` before a node.
        let mut held = lock(&self.held);
        for (uuid, node, generation) in leased {
            held.entry(uuid).or_insert((node, generation));
        }
    }

    /// Admits a stream for a checked Hello, taking the node over from any
    /// earlier stream, with `tenants` the version in force over `span`.
    /// Returns the handle and the highest sequence already accepted for
    /// this (node, epoch).
    pub fn hello(
        &self,
        hello: Checked<Hello>,
        tenants: &Tenants,
        span: (i64, i64),
    ) -> Result<(StreamHandle, u64), HelloError> {
        let hello = hello.into_inner();
        let id = hello.node_id.as_str();
        // Held until this node's inventory is registered, so that two nodes
        // cannot both be admitted with one leased GPU.
        let mut held = lock(&self.held);
        self.check_gpu_claims(&hello, tenants, &held)?;
        let node = {
            let mut nodes = lock(&self.nodes);
            nodes
                .entry(Arc::from(id))
                .or_insert_with(|| {
                    Arc::new(Mutex::new(Node::new(
                        Arc::from(id),
                        hello.epoch,
                        0,
                        hello.interval,
                    )))
                })
                .clone()
        };
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // (node, UUID) of departed GPUs this inventory takes over.
        let mut moved: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        let (acked, claim_lost) = {
            let mut n = lock(&node);
            // A node's epoch only moves forward: an older epoch may be a
            // stale agent instance whose samples were committed under it
            // before the current one took over, and the dedup cursor of
            // that epoch is gone, so it is refused, naming the current
            // epoch. An agent refused so (restarted after its clock was
            // stepped back, or after someone else said Hello for its node
            // with a newer epoch) says Hello again above it, with the
            // samples it never sent under the refused epoch. Only when the
            // current epoch lies in the future (beyond the allowed skew)
            // was it stamped by a wrong clock, and there may be no room
            // above it; once that stream is gone, the older epoch takes
            // over.
            let skew = i64::try_from(self.cfg.max_clock_skew.as_nanos()).unwrap_or(i64::MAX);
            let current_from_wrong_clock =
                i64::try_from(n.epoch).is_ok_and(|e| e > unix_nanos_now().saturating_add(skew));
            if hello.epoch < n.epoch && (n.connected || !current_from_wrong_clock) {
                return Err(HelloError::StaleEpoch {
                    got: hello.epoch,
                    current: n.epoch,
                    connected: n.connected,
                });
            }
            if hello.epoch < n.epoch {
                tracing::warn!(node = ?id, got = hello.epoch, current = n.epoch, "an older agent epoch takes the node over: the current one lies in the future of this collector's clock (an agent clock that was wrong, or this clock is behind)");
            }
            let new_epoch = hello.epoch != n.epoch;
            if new_epoch {
                // A restarted agent: its sequence numbers start again.
                n.epoch = hello.epoch;
                n.last_seq = 0;
            }
            // Keep what we know of GPUs that are still there, and of GPUs
            // that left (for a while), so the next counter delta covers the
            // time the agent or the GPU was away.
            let departed = std::mem::take(&mut n.departed);
            let mut old: HashMap<Arc<str>, Gpu> = n
                .gpus
                .drain(..)
                .chain(departed)
                .map(|g| (g.uuid.clone(), g))
                .collect();
            // GPUs of a node are mostly one model: one copy of its name.
            let mut models: Vec<Arc<str>> = Vec::new();
            let mut model = |name: &str| match models.iter().find(|m| ***m == *name) {
                Some(m) => m.clone(),
                None => {
                    let m: Arc<str> = Arc::from(name);
                    models.push(m.clone());
                    m
                }
            };
            let mut fresh: Vec<Arc<str>> = Vec::new();
            n.gpus = hello
                .gpus
                .into_iter()
                .map(|info| match old.remove(info.uuid.as_str()) {
                    Some(mut g) => {
                        g.model = model(&info.model);
                        g.power_limit_milliwatts = info.power_limit_milliwatts;
                        g.memory_total_bytes = info.memory_total_bytes;
                        g.energy_counter_supported = info.energy_counter_supported;
                        g.identity = Gpu::identity_of(info.identity);
                        // A new MIG layout from now on (attributed below).
                        g.relayout(info.mig, info.mig_layout, info.earlier_mig);
                        // The new run's clock may have been stepped: its
                        // first timestamp becomes the reference even if it
                        // is behind the old run's.
                        if new_epoch {
                            g.meter_mut().reanchor();
                        }
                        g
                    }
                    None => {
                        let m = model(&info.model);
                        let g = Gpu::new(info, m, Arc::from(UNASSIGNED));
                        fresh.push(g.uuid.clone());
                        g
                    }
                })
                .collect();
            // Bounded: at most one inventory's worth of departed GPUs.
            let cap = self.cfg.max_gpus_per_node as usize;
            // The most recently heard are kept; the ledger forgets the rest
            // with the node's next cursor.
            let mut departed: Vec<Gpu> = old.into_values().collect();
            departed.sort_by_key(|g| std::cmp::Reverse(g.last_timestamp()));
            let forgotten = departed.split_off(departed.len().min(cap));
            n.departed = departed;
            let mut at = lock(&self.departed_at);
            let here = |owner: Option<&Arc<str>>| owner.is_some_and(|o| **o == *id);
            for g in n.gpus.iter().chain(&forgotten) {
                if here(at.get(&g.uuid)) {
                    at.remove(&g.uuid);
                }
            }
            for uuid in fresh {
                if let Some(owner) = at.remove(&uuid) {
                    moved.push((owner, uuid));
                }
            }
            for g in &n.departed {
                at.insert(g.uuid.clone(), n.id.clone());
            }
            drop(at);
            for uuid in n
                .departed
                .iter()
                .chain(&forgotten)
                .flat_map(Gpu::leasable_uuids)
            {
                if held.get(uuid).is_some_and(|(o, _)| **o == *id) {
                    held.remove(uuid);
                }
            }
            for uuid in n
                .gpus
                .iter()
                .flat_map(Gpu::leasable_uuids)
                .filter(|u| tenants.uuid_lessee(u).is_some())
            {
                held.insert(uuid.clone(), (n.id.clone(), generation));
            }
            // Power sources as GPUs: the same source (by kind and name)
            // keeps its meter.
            let mut known: Vec<PowerSource> = std::mem::take(&mut n.power);
            known.append(&mut n.power_departed);
            let (announced, departed) = power::announce(hello.node_power_sources, known, new_epoch);
            n.power = announced;
            n.power_departed = departed;
            n.attribute(tenants, span);
            n.agent_version = hello.agent_version;
            n.interval = hello.interval;
            n.generation = generation;
            if !n.connected {
                self.connected.fetch_add(1, Ordering::Relaxed);
            }
            n.connected = true;
            n.moved_away = false;
            (n.last_seq, n.claim_lost.clone())
        };
        drop(held);
        // Outside this node's lock: one node lock at a time.
        for (owner, uuid) in moved {
            let Some(other) = lock(&self.nodes).get(&owner).cloned() else {
                continue;
            };
            let mut o = lock(&other);
            o.departed.retain(|g| g.uuid != uuid);
            info!(gpu = ?uuid, from = ?owner, to = ?id, "GPU moved to another node; its counter state on the old node is dropped");
        }
        let welcome_after = lock(&node).last_commit_id;
        Ok((
            StreamHandle {
                node,
                node_id: Arc::from(id),
                epoch: hello.epoch,
                generation,
                welcome_after,
                claim_lost,
            },
            acked,
        ))
    }

    /// The checks of a Hello that need no ledger claim, made before it:
    /// the GPUs it lists that a tenant leases by UUID, and an epoch older
    /// than the one a stream here has now. [`Fleet::hello`] checks again
    /// once the node is claimed (its cursor may have moved).
    pub fn precheck(&self, hello: &Hello, tenants: &Tenants) -> Result<(), HelloError> {
        {
            let held = lock(&self.held);
            self.check_gpu_claims(hello, tenants, &held)?;
        }
        let node = lock(&self.nodes).get(hello.node_id.as_str()).cloned();
        if let Some(node) = node {
            let n = lock(&node);
            if n.connected && hello.epoch < n.epoch {
                return Err(HelloError::StaleEpoch {
                    got: hello.epoch,
                    current: n.epoch,
                    connected: true,
                });
            }
        }
        Ok(())
    }

    /// Marks the node disconnected if `h` still owns it.
    pub fn disconnect(&self, h: &StreamHandle) {
        let mut n = lock(&h.node);
        if n.generation == h.generation && n.connected {
            n.connected = false;
            self.connected.fetch_sub(1, Ordering::Relaxed);
            let uuids: Vec<Arc<str>> = n
                .gpus
                .iter()
                .flat_map(Gpu::leasable_uuids)
                .cloned()
                .collect();
            // One lock at a time: `hello` takes `held` before a node.
            drop(n);
            let mut held = lock(&self.held);
            for uuid in uuids {
                if held.get(&uuid).is_some_and(|(_, g)| *g == h.generation) {
                    held.remove(&uuid);
                }
            }
        }
    }

    /// Refuses a Hello listing a GPU that `tenants` leases by UUID on other
    /// nodes only, or one leased without a node that another connected
    /// node holds. Counted by reason.
    fn check_gpu_claims(
        &self,
        hello: &Hello,
        tenants: &Tenants,
        held: &HeldGpus,
    ) -> Result<(), HelloError> {
        let node = hello.node_id.as_str();
        // A board, and each MIG instance of it (leased by its own UUID).
        for uuid in hello.gpus.iter().flat_map(|g| g.leasable_uuids()) {
            let Some(tenant) = tenants.uuid_lessee(uuid) else {
                continue;
            };
            if let Err(e) = tenants.check_gpu(node, uuid) {
                return Err(HelloError::GpuLeasedElsewhere {
                    uuid: uuid.to_string(),
                    tenant: e.tenant,
                    allowed: e.node,
                    node: node.to_string(),
                });
            }
            let Some((holder, generation)) = held.get(uuid) else {
                continue;
            };
            if **holder == *node {
                continue;
            }
            let holder_node = lock(&self.nodes).get(holder).cloned();
            let still_held = holder_node.is_some_and(|h| {
                let h = lock(&h);
                h.connected && h.generation == *generation
            });
            if still_held {
                return Err(HelloError::GpuHeldElsewhere {
                    uuid: uuid.to_string(),
                    tenant: tenant.clone(),
                    holder: holder.clone(),
                    node: node.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Live power of every tenant over its fresh GPUs, in mW, with the
    /// number of reporting and stale GPUs, in `tenants.all()` order.
    /// `meter_ratio` gives, for a node under a facility meter with a live
    /// ratio, the meter's metered / measured energy (parts per million):
    /// the tenant's share of that node's power times it is metered
    /// facility power.
    pub fn tenant_power(
        &self,
        tenants: &Tenants,
        now: Instant,
        meter_ratio: &dyn Fn(&str) -> Option<u64>,
    ) -> Vec<TenantLive> {
        let mut live: Vec<TenantLive> = tenants
            .all()
            .iter()
            .map(|_| TenantLive::default())
            .collect();
        let index: HashMap<&str, usize> = tenants
            .all()
            .iter()
            .enumerate()
            .map(|(i, t)| (&*t.id, i))
            .collect();
        // GPUs of a node mostly share their tenant: the last lookup is
        // reused while the tenant is the same `Arc`, so a scrape hashes
        // about one tenant id per node.
        let mut last: Option<(Arc<str>, usize)> = None;
        for node in self.nodes() {
            let n = lock(&node);
            if n.moved_away {
                continue;
            }
            let window = n.stale_window(self.cfg.stale_after);
            n.live(now, window, |tenant, part| {
                // A GPU attributed under an older tenant file counts as
                // unassigned until its node reports again.
                let t = match &last {
                    Some((known, i)) if Arc::ptr_eq(known, tenant) => *i,
                    _ => {
                        let i = index
                            .get(&**tenant)
                            .copied()
                            .unwrap_or(tenants.unassigned());
                        last = Some((tenant.clone(), i));
                        i
                    }
                };
                live[t].add(part);
            });
            let mut ratio = None;
            n.node_power_split(now, window, |tenant, mw| {
                let t = index
                    .get(&**tenant)
                    .copied()
                    .unwrap_or(tenants.unassigned());
                let l = &mut live[t];
                l.node_power_milliwatts = l.node_power_milliwatts.saturating_add(mw);
                l.node_reporting += 1;
                if let Some(ppm) = *ratio.get_or_insert_with(|| meter_ratio(&n.id)) {
                    l.metered_node_milliwatts = l.metered_node_milliwatts.saturating_add(mw);
                    l.metered_facility_milliwatts = l
                        .metered_facility_milliwatts
                        .saturating_add(crate::accounting::facility_estimate(mw, ppm));
                }
            });
        }
        live
    }
}
