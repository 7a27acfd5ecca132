//! The collector's live state: one entry per node, owned by that node's
//! stream, plus per-tenant totals.
//!
//! *Invariant:* a sample is counted once. Each node remembers the highest
//! (epoch, seq) it accepted; a sample at or below it is a duplicate and
//! changes nothing. Energy is only ever added from an accepted sample.
//!
//! *Invariant:* a GPU's energy is the sum of the deltas of its hardware
//! counter between consecutive accepted samples. A counter that goes
//! backwards (driver reload) contributes the power integral for that
//! interval instead of a negative delta; a GPU without a counter
//! contributes the exact integral of its reported power over time, kept in
//! milliwatt-nanoseconds so that no rounding error accumulates.
//!
//! Locking: the node map is locked only to find or add a node; each node's
//! own mutex is taken once per batch by its stream task, and briefly by
//! `/metrics` rendering. Tenant totals are locked once per batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::model::{GpuReading, HostReading, NodeSample, Reject};
use crate::tenants::{Tenants, UNASSIGNED};

const NANOS_PER_SECOND: u128 = 1_000_000_000;

/// Locks a mutex, recovering from poisoning: every critical section here
/// leaves the data consistent before anything that could panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub stale_after: Option<Duration>,
    pub max_gpus_per_node: u32,
}

/// Static facts about a GPU, from the Hello.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub uuid: String,
    pub model: String,
    pub power_limit_milliwatts: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub energy_counter_supported: bool,
}

#[derive(Debug, Clone)]
pub struct Hello {
    pub node_id: String,
    pub agent_version: String,
    pub epoch: u64,
    pub interval: Duration,
    pub gpus: Vec<GpuInfo>,
}

#[derive(Debug)]
pub struct Gpu {
    pub index_label: Arc<str>,
    pub uuid: Arc<str>,
    pub model: Arc<str>,
    pub power_limit_milliwatts: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub energy_counter_supported: bool,
    pub tenant: Arc<str>,
    pub last: Option<GpuReading>,
    pub last_timestamp: Option<i64>,
    last_counter: Option<u64>,
    /// Energy since this collector first saw the GPU.
    pub energy_millijoules: u64,
    remainder_milliwatt_nanos: u128,
    pub last_receipt: Option<Instant>,
    pub counter_resets: u64,
}

impl Gpu {
    fn new(index: usize, info: GpuInfo, tenant: Arc<str>) -> Self {
        Self {
            index_label: Arc::from(index.to_string()),
            uuid: Arc::from(info.uuid),
            model: Arc::from(info.model),
            power_limit_milliwatts: info.power_limit_milliwatts,
            memory_total_bytes: info.memory_total_bytes,
            energy_counter_supported: info.energy_counter_supported,
            tenant,
            last: None,
            last_timestamp: None,
            last_counter: None,
            energy_millijoules: 0,
            remainder_milliwatt_nanos: 0,
            last_receipt: None,
            counter_resets: 0,
        }
    }

    /// Folds one accepted reading in; returns the energy it adds (mJ).
    fn apply(&mut self, r: GpuReading, timestamp: i64, now: Instant) -> u64 {
        self.last_receipt = Some(now);
        if r.lost {
            // Keep the last counter: when the GPU answers again, its next
            // delta carries the energy of the gap.
            self.last = Some(r);
            return 0;
        }
        let dt_nanos = match self.last_timestamp {
            Some(prev) if timestamp > prev => (timestamp - prev) as u128,
            _ => 0,
        };
        if self.last_timestamp.is_none_or(|prev| timestamp > prev) {
            self.last_timestamp = Some(timestamp);
        }
        let first = self.last.is_none();
        let delta = match (r.energy_millijoules, self.last_counter) {
            (Some(now_mj), Some(prev)) if now_mj >= prev => now_mj - prev,
            (Some(_), Some(_)) => {
                // Counter went backwards: the driver was reloaded. Count
                // this interval from power and start again from the new
                // value.
                self.counter_resets += 1;
                self.integrate(r.power_milliwatts, dt_nanos)
            }
            // First counter reading: a baseline, unless earlier readings
            // (without counter) leave an interval to cover.
            (Some(_), None) if first => 0,
            _ => self.integrate(r.power_milliwatts, dt_nanos),
        };
        if r.energy_millijoules.is_some() {
            self.last_counter = r.energy_millijoules;
        }
        self.energy_millijoules += delta;
        self.last = Some(r);
        delta
    }

    /// Exact integral of `power` over `dt`, carrying the sub-millijoule
    /// remainder to the next call.
    fn integrate(&mut self, power_milliwatts: Option<u64>, dt_nanos: u128) -> u64 {
        let Some(p) = power_milliwatts else { return 0 };
        let total = self.remainder_milliwatt_nanos + u128::from(p) * dt_nanos;
        self.remainder_milliwatt_nanos = total % NANOS_PER_SECOND;
        u64::try_from(total / NANOS_PER_SECOND).unwrap_or(u64::MAX)
    }

    /// Whether the GPU reported within `window` of `now`.
    pub fn fresh(&self, now: Instant, window: Duration) -> bool {
        self.last_receipt
            .is_some_and(|t| now.saturating_duration_since(t) <= window)
            && self.last.as_ref().is_some_and(|r| !r.lost)
    }
}

#[derive(Debug)]
pub struct Node {
    pub id: Arc<str>,
    /// Tenant label of the node as a whole: the tenant of all its GPUs when
    /// they agree, else the tenant leasing the node by name.
    pub tenant: Arc<str>,
    pub agent_version: String,
    pub interval: Duration,
    pub epoch: u64,
    pub last_seq: u64,
    generation: u64,
    pub connected: bool,
    pub samples_accepted: u64,
    pub last_receipt: Option<Instant>,
    pub last_timestamp: i64,
    pub host: Option<HostReading>,
    pub gpus: Vec<Gpu>,
}

impl Node {
    /// How long without a sample before this node's GPUs are stale.
    pub fn stale_window(&self, configured: Option<Duration>) -> Duration {
        configured.unwrap_or(self.interval * 3)
    }

    fn attribute(&mut self, tenants: &Tenants) {
        let all = tenants.all();
        for g in &mut self.gpus {
            g.tenant = all[tenants.attribute(&self.id, &g.uuid)].id.clone();
        }
        self.tenant = match self.gpus.first() {
            Some(first) if self.gpus.iter().all(|g| g.tenant == first.tenant) => {
                first.tenant.clone()
            }
            _ => all[tenants.attribute_node(&self.id)].id.clone(),
        };
    }
}

/// Per-tenant figures that outlive nodes and reloads.
#[derive(Debug, Default, Clone)]
pub struct TenantTotals {
    pub energy_millijoules: u64,
    pub over_contract_nanos: u128,
}

/// Why a sample or stream was refused; the label on the counters.
pub const REJECT_REASONS: [Reject; 6] = [
    Reject::GpuIndex,
    Reject::Utilization,
    Reject::Power,
    Reject::Timestamp,
    Reject::Sequence,
    Reject::Malformed,
];

#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub duplicate: AtomicU64,
    pub rejected: [AtomicU64; REJECT_REASONS.len()],
    pub streams_refused: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

/// A stream's claim on its node.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    pub node: Arc<Mutex<Node>>,
    pub node_id: Arc<str>,
    pub epoch: u64,
    generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("node id must be 1-253 printable characters")]
    NodeId,
    #[error("inventory of {got} GPUs exceeds the limit of {max}")]
    TooManyGpus { got: usize, max: u32 },
    #[error("GPU {index}: {reason}")]
    Gpu { index: usize, reason: &'static str },
    #[error("stream epoch {got} is older than epoch {current} already reporting for this node")]
    StaleEpoch { got: u64, current: u64 },
}

#[derive(Debug, thiserror::Error)]
#[error("a newer stream took over node {0}")]
pub struct Superseded(pub Arc<str>);

/// What one batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub acked_seq: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: Vec<(u64, Reject)>,
}

pub struct State {
    cfg: StateConfig,
    tenants: RwLock<Arc<Tenants>>,
    nodes: Mutex<HashMap<Arc<str>, Arc<Mutex<Node>>>>,
    totals: Mutex<HashMap<Arc<str>, TenantTotals>>,
    next_generation: AtomicU64,
    pub counters: Counters,
}

impl State {
    pub fn new(cfg: StateConfig, tenants: Tenants) -> Self {
        Self {
            cfg,
            tenants: RwLock::new(Arc::new(tenants)),
            nodes: Mutex::new(HashMap::new()),
            totals: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            counters: Counters::default(),
        }
    }

    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    pub fn tenants(&self) -> Arc<Tenants> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every node, for rendering.
    pub fn nodes(&self) -> Vec<Arc<Mutex<Node>>> {
        lock(&self.nodes).values().cloned().collect()
    }

    pub fn totals(&self) -> HashMap<Arc<str>, TenantTotals> {
        lock(&self.totals).clone()
    }

    /// Replaces the tenant file and re-attributes every GPU. Nothing
    /// restarts; energy already counted stays with the tenant it was
    /// counted for.
    pub fn reload_tenants(&self, tenants: Tenants) {
        let tenants = Arc::new(tenants);
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = tenants.clone();
        for node in self.nodes() {
            lock(&node).attribute(&tenants);
        }
        self.counters.reloads_ok.fetch_add(1, Ordering::Relaxed);
        info!(tenants = tenants.all().len() - 1, "tenant file reloaded");
    }

    /// Admits a stream for `hello.node_id`, taking the node over from any
    /// earlier stream. Returns the handle and the highest sequence already
    /// accepted for this (node, epoch).
    pub fn hello(&self, hello: Hello) -> Result<(StreamHandle, u64), HelloError> {
        let id = hello.node_id.as_str();
        if id.is_empty() || id.len() > 253 || id.chars().any(char::is_control) {
            return Err(HelloError::NodeId);
        }
        if hello.gpus.len() > self.cfg.max_gpus_per_node as usize {
            return Err(HelloError::TooManyGpus {
                got: hello.gpus.len(),
                max: self.cfg.max_gpus_per_node,
            });
        }
        for (index, g) in hello.gpus.iter().enumerate() {
            if g.uuid.is_empty() || g.uuid.len() > 128 {
                return Err(HelloError::Gpu {
                    index,
                    reason: "UUID must be 1-128 characters",
                });
            }
            if hello.gpus[..index].iter().any(|o| o.uuid == g.uuid) {
                return Err(HelloError::Gpu {
                    index,
                    reason: "UUID appears twice in the inventory",
                });
            }
        }
        let tenants = self.tenants();
        let node = {
            let mut nodes = lock(&self.nodes);
            nodes
                .entry(Arc::from(id))
                .or_insert_with(|| {
                    Arc::new(Mutex::new(Node {
                        id: Arc::from(id),
                        tenant: Arc::from(UNASSIGNED),
                        agent_version: String::new(),
                        interval: hello.interval,
                        epoch: hello.epoch,
                        last_seq: 0,
                        generation: 0,
                        connected: false,
                        samples_accepted: 0,
                        last_receipt: None,
                        last_timestamp: 0,
                        host: None,
                        gpus: Vec::new(),
                    }))
                })
                .clone()
        };
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let acked = {
            let mut n = lock(&node);
            if hello.epoch < n.epoch {
                return Err(HelloError::StaleEpoch {
                    got: hello.epoch,
                    current: n.epoch,
                });
            }
            if hello.epoch > n.epoch {
                // A restarted agent: its sequence numbers start again.
                n.epoch = hello.epoch;
                n.last_seq = 0;
            }
            // Keep what we know of GPUs that are still there, so the next
            // counter delta covers the time the agent was away.
            let mut old: HashMap<Arc<str>, Gpu> =
                n.gpus.drain(..).map(|g| (g.uuid.clone(), g)).collect();
            n.gpus = hello
                .gpus
                .into_iter()
                .enumerate()
                .map(|(i, info)| match old.remove(info.uuid.as_str()) {
                    Some(mut g) => {
                        g.index_label = Arc::from(i.to_string());
                        g.model = Arc::from(info.model);
                        g.power_limit_milliwatts = info.power_limit_milliwatts;
                        g.memory_total_bytes = info.memory_total_bytes;
                        g.energy_counter_supported = info.energy_counter_supported;
                        g
                    }
                    None => Gpu::new(i, info, Arc::from(UNASSIGNED)),
                })
                .collect();
            n.attribute(&tenants);
            n.agent_version = hello.agent_version;
            n.interval = hello.interval;
            n.generation = generation;
            n.connected = true;
            n.last_seq
        };
        Ok((
            StreamHandle {
                node,
                node_id: Arc::from(id),
                epoch: hello.epoch,
                generation,
            },
            acked,
        ))
    }

    /// Marks the node disconnected if `h` still owns it.
    pub fn disconnect(&self, h: &StreamHandle) {
        let mut n = lock(&h.node);
        if n.generation == h.generation {
            n.connected = false;
        }
    }

    /// Applies a batch of validated samples (rejections already decided by
    /// the edge are passed in `rejected` and only counted).
    pub fn ingest(
        &self,
        h: &StreamHandle,
        samples: Vec<NodeSample>,
        mut rejected: Vec<(u64, Reject)>,
    ) -> Result<BatchOutcome, Superseded> {
        let now = Instant::now();
        let mut out = BatchOutcome::default();
        let mut energy: Vec<(Arc<str>, u64)> = Vec::new();
        {
            let mut n = lock(&h.node);
            if n.generation != h.generation || n.epoch != h.epoch {
                return Err(Superseded(h.node_id.clone()));
            }
            for s in samples {
                if s.seq <= n.last_seq {
                    out.duplicate += 1;
                    continue;
                }
                if let Err(reason) = check_against_node(&n, &s) {
                    rejected.push((s.seq, reason));
                    continue;
                }
                n.last_seq = s.seq;
                n.samples_accepted += 1;
                n.last_receipt = Some(now);
                n.last_timestamp = n.last_timestamp.max(s.timestamp_unix_nanos);
                if s.host.is_some() {
                    n.host = s.host;
                }
                for r in s.gpus {
                    let gpu = &mut n.gpus[r.index as usize];
                    let added = gpu.apply(r, s.timestamp_unix_nanos, now);
                    if added > 0 {
                        match energy.iter_mut().find(|(t, _)| *t == gpu.tenant) {
                            Some((_, e)) => *e += added,
                            None => energy.push((gpu.tenant.clone(), added)),
                        }
                    }
                }
                out.accepted += 1;
            }
            // A refused sample is final: refusing it again on a re-send
            // would change nothing, so the ack moves past it too.
            if let Some(max) = rejected.iter().map(|(seq, _)| *seq).max() {
                n.last_seq = n.last_seq.max(max);
            }
            out.acked_seq = n.last_seq;
        }
        if !energy.is_empty() {
            let mut totals = lock(&self.totals);
            for (tenant, mj) in energy {
                totals.entry(tenant).or_default().energy_millijoules += mj;
            }
        }
        let c = &self.counters;
        c.accepted.fetch_add(out.accepted, Ordering::Relaxed);
        c.duplicate.fetch_add(out.duplicate, Ordering::Relaxed);
        for (seq, reason) in &rejected {
            c.rejected[*reason as usize].fetch_add(1, Ordering::Relaxed);
            warn!(node = %h.node_id, seq, reason = reason.label(), "sample rejected");
        }
        out.rejected = rejected;
        Ok(out)
    }

    /// Live power of every tenant over its fresh GPUs, in mW, with the
    /// number of reporting and stale GPUs, in `tenants.all()` order.
    pub fn tenant_power(&self, tenants: &Tenants, now: Instant) -> Vec<TenantLive> {
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
        for node in self.nodes() {
            let n = lock(&node);
            let window = n.stale_window(self.cfg.stale_after);
            for g in &n.gpus {
                // A GPU attributed under an older tenant file counts as
                // unassigned until its node reports again.
                let t = index
                    .get(&*g.tenant)
                    .copied()
                    .unwrap_or(tenants.unassigned());
                if g.fresh(now, window) {
                    let r = g.last.as_ref().expect("fresh implies a reading");
                    live[t].reporting += 1;
                    live[t].power_milliwatts += r.power_milliwatts.unwrap_or(0);
                    if let Some(u) = r.utilization_percent {
                        live[t].utilization_sum += u64::from(u);
                        live[t].utilization_n += 1;
                    }
                } else {
                    live[t].stale += 1;
                }
            }
        }
        live
    }

    /// Adds `elapsed` to the over-contract time of every tenant whose live
    /// power is above its contract now.
    pub fn evaluate(&self, elapsed: Duration, now: Instant) {
        let tenants = self.tenants();
        let live = self.tenant_power(&tenants, now);
        let mut totals = lock(&self.totals);
        for (t, l) in tenants.all().iter().zip(&live) {
            if t.contracted_milliwatts > 0 && l.power_milliwatts > t.contracted_milliwatts {
                totals.entry(t.id.clone()).or_default().over_contract_nanos += elapsed.as_nanos();
            }
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct TenantLive {
    pub power_milliwatts: u64,
    pub reporting: u64,
    pub stale: u64,
    pub utilization_sum: u64,
    pub utilization_n: u64,
}

/// Checks a sample against the node's inventory and history.
fn check_against_node(n: &Node, s: &NodeSample) -> Result<(), Reject> {
    let mut seen = vec![false; n.gpus.len()];
    for r in &s.gpus {
        let i = r.index as usize;
        if i >= n.gpus.len() || std::mem::replace(&mut seen[i], true) {
            return Err(Reject::GpuIndex);
        }
        if let Some(p) = r.power_milliwatts {
            // Three times the board limit, or 3 kW when the limit is unknown.
            let bound = n.gpus[i]
                .power_limit_milliwatts
                .map_or(3_000_000, |l| l.saturating_mul(3).max(1));
            if p > bound {
                return Err(Reject::Power);
            }
        }
    }
    if s.timestamp_unix_nanos <= 0 {
        return Err(Reject::Timestamp);
    }
    Ok(())
}
