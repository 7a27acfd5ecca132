//! The collector's live state: a thin façade over the fleet (nodes,
//! streams, live figures), billing (the pending ledger commit, tenant
//! totals), the tenant file's history and the tokens in force, with the
//! edge checking every Hello on the way in and the events counted in
//! [`Counters`]. Where a piece lives:
//!
//! - `edge`: what an agent sends, checked (`Hello`, samples, the limits);
//! - `accounting`: counter arithmetic, integration, minute buckets, the
//!   contract arithmetic, with the clock as an argument;
//! - `fleet`: per-node state, dedup and epochs, GPU moves and holders,
//!   live summaries, and the node views the surfaces read
//!   ([`State::for_each_node`]);
//! - `billing`: bookings, the pending commit, tenant totals;
//! - `events`: typed events and their counters.
//!
//! Locking: a batch takes its node's lock once, and under it the pending
//! commit's (see `Fleet::ingest`); tenant totals are locked once per batch.

use std::collections::HashMap;
#[cfg(test)]
use std::sync::Mutex;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tracing::info;

use crate::auth::Auth;
use crate::billing::{Billing, Booking};
use crate::edge::Checked;
use crate::edge::{NodeSample, Reject};
use crate::events::{ClaimReason, GpuClaimRefused, SampleRejected};
use crate::fleet::Fleet;
use crate::ledger::{Claim, Commit, Snapshot};
use crate::sync::unix_nanos_now;
use crate::tenants::{TenantHistory, Tenants};

pub use crate::billing::TenantTotals;
pub use crate::edge::{
    GpuInfo, Hello, HelloError, MAX_POWER_LIMIT_MILLIWATTS, MAX_SEQ_JUMP, MAX_SPREAD, node_id_ok,
};
pub use crate::events::Counters;
#[cfg(test)]
pub(crate) use crate::fleet::Node;
pub use crate::fleet::{
    BatchOutcome, FleetConfig as StateConfig, GpuView, NodeView, StreamHandle, Superseded,
    TenantLive,
};

pub struct State {
    /// The tenant file's versions over time and the one in force now.
    tenants: RwLock<InForce>,
    auth: RwLock<Arc<Auth>>,
    fleet: Fleet,
    /// What the next ledger commit will write, and the tenant totals.
    billing: Billing,
    pub counters: Counters,
    /// The ledger's identity, once it is open.
    ledger_identity: std::sync::OnceLock<crate::ledger::Identity>,
    /// Who this collector is, once known.
    collector_info: std::sync::OnceLock<CollectorInfo>,
    /// The PostgreSQL ledger's pool figures (none for SQLite), read by
    /// `/metrics` without the ledger's lock.
    ledger_pool: std::sync::OnceLock<crate::ledger::PgPoolStats>,
    /// The facility meters and their live figures, once polling starts.
    meters: std::sync::OnceLock<Arc<crate::meters::Board>>,
    /// The tenants' totals as the ledger held them at the last read
    /// (after each commit, and every commit interval), with every
    /// collector's commits; until the first read, this collector's own.
    ledger_totals: RwLock<Option<HashMap<Arc<str>, TenantTotals>>>,
    /// Why `/readyz` answers 503, if it does.
    pub readiness: crate::health::Readiness,
}

/// Who this collector is: its configured id, the fencing holder of this
/// process and the ledger backend it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorInfo {
    pub collector_id: String,
    pub holder: String,
    /// `sqlite` or `postgres`.
    pub ledger_backend: &'static str,
}

/// The tenant file's history and the version in force now.
#[derive(Debug)]
struct InForce {
    history: Arc<TenantHistory>,
    index: usize,
    span: (i64, i64),
}

impl InForce {
    fn of(history: TenantHistory, now: i64) -> Self {
        let index = history.at(now);
        let span = history.span(index);
        Self {
            history: Arc::new(history),
            index,
            span,
        }
    }
}

impl State {
    pub fn new(cfg: StateConfig, tenants: Tenants) -> Self {
        Self {
            tenants: RwLock::new(InForce::of(TenantHistory::new(Arc::new(tenants)), 0)),
            auth: RwLock::new(Arc::new(Auth::default())),
            fleet: Fleet::new(cfg),
            billing: Billing::default(),
            counters: Counters::default(),
            ledger_identity: std::sync::OnceLock::new(),
            collector_info: std::sync::OnceLock::new(),
            ledger_pool: std::sync::OnceLock::new(),
            meters: std::sync::OnceLock::new(),
            ledger_totals: RwLock::new(None),
            readiness: Default::default(),
        }
    }

    /// Whether commits keep per-GPU hours (`usage_gpu_rows`); set before
    /// any batch is booked.
    pub fn keep_gpu_rows(&self, keep: bool) {
        self.billing.keep_gpu_rows(keep);
    }

    /// Records which ledger this collector writes (once).
    pub fn set_ledger_identity(&self, id: crate::ledger::Identity) {
        let _ = self.ledger_identity.set(id);
    }

    pub fn ledger_identity(&self) -> Option<&crate::ledger::Identity> {
        self.ledger_identity.get()
    }

    /// Records who this collector is (once): `capwatch_collector_info`.
    pub fn set_collector_info(&self, info: CollectorInfo) {
        let _ = self.collector_info.set(info);
    }

    pub fn collector_info(&self) -> Option<&CollectorInfo> {
        self.collector_info.get()
    }

    /// Records the facility meters (once), for `/metrics`.
    pub fn set_meters(&self, board: Arc<crate::meters::Board>) {
        let _ = self.meters.set(board);
    }

    /// The facility meters, if any are configured.
    pub fn meters(&self) -> Option<&Arc<crate::meters::Board>> {
        self.meters.get()
    }

    /// Records the PostgreSQL ledger's pool (once): its connections and
    /// reconnects on `/metrics`.
    pub fn set_ledger_pool(&self, pool: crate::ledger::PgPoolStats) {
        let _ = self.ledger_pool.set(pool);
    }

    /// The PostgreSQL ledger's pool; `None` on SQLite.
    pub fn ledger_pool(&self) -> Option<&crate::ledger::PgPoolStats> {
        self.ledger_pool.get()
    }

    /// Takes what the next commit must write, with its number and the
    /// tenant file's history (each minute is measured against the contract
    /// of its own time); batches applied from now on go to the commit
    /// after it.
    pub fn take_pending(&self) -> (u64, Commit) {
        self.billing.take_pending(self.tenant_history())
    }

    /// Resumes from what the ledger holds: each node's (epoch, seq) for
    /// dedup, each GPU's counter for the next delta, tenant totals.
    pub fn restore(&self, snap: Snapshot) {
        self.fleet.restore(&snap);
        self.billing.restore(&snap);
    }

    pub fn config(&self) -> &StateConfig {
        self.fleet.config()
    }

    #[cfg(test)]
    pub(crate) fn config_mut(&mut self) -> &mut StateConfig {
        self.fleet.config_mut()
    }

    /// The node called `id`, if the collector knows it.
    #[cfg(test)]
    pub(crate) fn node(&self, id: &str) -> Option<Arc<Mutex<Node>>> {
        self.fleet.node(id)
    }

    /// The tokens in force.
    pub fn auth(&self) -> Arc<Auth> {
        self.auth.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_auth(&self, auth: Auth) {
        *self.auth.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(auth);
    }

    /// The tenants in force now.
    pub fn tenants(&self) -> Arc<Tenants> {
        self.in_force().0
    }

    /// The tenants in force now, and the span of time they are in force.
    fn in_force(&self) -> (Arc<Tenants>, (i64, i64)) {
        let f = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        (f.history.version(f.index).clone(), f.span)
    }

    /// Every version of the tenant file still relevant.
    pub fn tenant_history(&self) -> Arc<TenantHistory> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .history
            .clone()
    }

    /// Calls `f` with a view of every node, one node's lock at a time:
    /// what `/metrics` and the status page read of the fleet.
    pub fn for_each_node(&self, f: impl FnMut(NodeView<'_>)) {
        self.fleet.for_each_node(f)
    }

    /// Every node, for tests that read their internals.
    #[cfg(test)]
    pub(crate) fn nodes(&self) -> Vec<Arc<Mutex<Node>>> {
        self.fleet.all_nodes()
    }

    /// How many nodes the collector knows.
    pub fn node_count(&self) -> usize {
        self.fleet.node_count()
    }

    /// How many nodes have a stream now.
    pub fn connected(&self) -> u64 {
        self.fleet.connected()
    }

    /// Every tenant's energy and over-contract time: as the ledger held
    /// them at the last read (every collector on it shows the same), or,
    /// before the committer first read them, as this collector counted
    /// them (restored plus booked).
    pub fn totals(&self) -> HashMap<Arc<str>, TenantTotals> {
        if let Some(t) = &*self.ledger_totals.read().unwrap_or_else(|p| p.into_inner()) {
            return t.clone();
        }
        self.billing.totals()
    }

    /// Records the tenants' totals read from the ledger.
    pub fn set_ledger_totals(&self, read: &crate::ledger::LedgerTotals) {
        let mut totals: HashMap<Arc<str>, TenantTotals> = HashMap::new();
        for (tenant, energy) in &read.tenant_energy {
            totals
                .entry(Arc::from(tenant.as_str()))
                .or_default()
                .energy_millijoules = *energy;
        }
        for (tenant, nanos) in &read.tenant_over_contract_ns {
            totals
                .entry(Arc::from(tenant.as_str()))
                .or_default()
                .over_contract_nanos = u128::from(*nanos);
        }
        for (tenant, energy) in &read.tenant_node_energy {
            totals
                .entry(Arc::from(tenant.as_str()))
                .or_default()
                .node_energy_millijoules = *energy;
        }
        *self
            .ledger_totals
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(totals);
    }

    /// Replaces the tenant file from its `effective_from`, or from now,
    /// and re-attributes every GPU. Nothing restarts; energy already
    /// counted stays with the tenant it was counted for.
    pub fn reload_tenants(&self, tenants: Tenants) {
        let from = tenants.effective_from_ns().unwrap_or_else(unix_nanos_now);
        self.reload_tenants_from(tenants, from);
    }

    /// Puts `tenants` in force from `from_ns` (Unix nanoseconds): samples
    /// stamped from then on are attributed by it, earlier ones by the
    /// version in force at their time.
    pub fn reload_tenants_from(&self, tenants: Tenants, from_ns: i64) {
        let n = tenants.all().len() - 1;
        let mut history = (*self.tenant_history()).clone();
        history.push(from_ns, Arc::new(tenants));
        self.set_tenant_history(history);
        self.counters
            .reloads_ok
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(
            tenants = n,
            effective_from_ns = from_ns,
            "tenant file reloaded"
        );
    }

    /// Replaces the whole history (at start-up, from the ledger) and
    /// re-attributes every GPU by the version in force now. Versions whose
    /// time ended before the oldest acceptable sample are forgotten.
    pub fn set_tenant_history(&self, mut history: TenantHistory) {
        let now = unix_nanos_now();
        let age = i64::try_from(self.fleet.config().max_sample_age.as_nanos()).unwrap_or(i64::MAX);
        history.forget_before(now.saturating_sub(age));
        let f = InForce::of(history, now);
        let (tenants, span) = (f.history.version(f.index).clone(), f.span);
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = f;
        // GPUs newly leased by UUID on connected nodes are held from now.
        self.fleet.attribute(&tenants, span);
    }

    /// Puts the next version in force once its time has come (a file
    /// loaded with an `effective_from` in the future). Cheap when nothing
    /// is due: called every second.
    pub fn advance_tenants(&self) {
        let until = self
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .span
            .1;
        if unix_nanos_now() < until {
            return;
        }
        self.set_tenant_history((*self.tenant_history()).clone());
        info!(
            effective_from_ns = until,
            "next tenant file version in force"
        );
    }

    /// Admits a stream for `hello.node_id` once the edge has checked the
    /// Hello, taking the node over from any earlier stream. Returns the
    /// handle and the highest sequence already accepted for this (node,
    /// epoch).
    pub fn hello(&self, hello: Hello) -> Result<(StreamHandle, u64), HelloError> {
        let hello = crate::edge::check_hello(hello, self.config().max_gpus_per_node)?;
        self.hello_checked(hello)
    }

    /// `hello`, for a Hello the edge has checked.
    pub fn hello_checked(&self, hello: Checked<Hello>) -> Result<(StreamHandle, u64), HelloError> {
        let (tenants, span) = self.in_force();
        let node = hello.node_id.clone();
        let refused: Vec<(crate::edge::MigRefusal, String)> = hello
            .gpus
            .iter()
            .flat_map(|g| {
                let earlier = g.earlier_mig.iter().map(|(_, m)| m);
                std::iter::once(&g.mig)
                    .chain(earlier)
                    .filter_map(|m| match m {
                        crate::edge::Mig::Refused(r) => Some((*r, g.uuid.clone())),
                        _ => None,
                    })
            })
            .collect();
        let admitted = self.fleet.hello(hello, &tenants, span);
        if admitted.is_ok() {
            for (reason, uuid) in &refused {
                crate::events::MigLayoutRefused {
                    reason: *reason,
                    node: &node,
                    uuid,
                }
                .emit(&self.counters);
            }
        }
        if let Err(e) = &admitted {
            self.count_gpu_claim_refusal(&node, e);
        }
        admitted
    }

    /// The checks of a checked Hello that need no ledger claim (leased
    /// GPUs, an older epoch than a stream here has): made before the
    /// claim, so that a Hello refused anyway costs none. `hello_checked`
    /// decides.
    pub fn precheck_hello(&self, hello: &Checked<Hello>) -> Result<(), HelloError> {
        let (tenants, _) = self.in_force();
        let checked = self.fleet.precheck(hello, &tenants);
        if let Err(e) = &checked {
            self.count_gpu_claim_refusal(&hello.node_id, e);
        }
        checked
    }

    fn count_gpu_claim_refusal(&self, node: &str, e: &HelloError) {
        let claim =
            |reason, uuid: &str| GpuClaimRefused { reason, node, uuid }.emit(&self.counters);
        match e {
            HelloError::GpuLeasedElsewhere { uuid, .. } => claim(ClaimReason::LeaseNode, uuid),
            HelloError::GpuHeldElsewhere { uuid, .. } => claim(ClaimReason::HeldByOtherNode, uuid),
            _ => {}
        }
    }

    /// Takes `claim`, just made for node `node` at its Hello, under the
    /// ledger's lock (no commit runs meanwhile): the generation the fleet
    /// already holds changes nothing; any other replaces the node's
    /// cursor by the claim's and drops what the node had pending (see
    /// `Fleet::adopt`). Returns whether it did.
    pub fn adopt_claim(&self, node: &str, claim: &Claim) -> bool {
        let held = self.fleet.ledger_generation(node);
        if !self.fleet.adopt(node, claim) {
            return false;
        }
        self.billing.drop_node(&Arc::from(node));
        if held.is_none() {
            // The first claim since this collector started (every node at
            // a restart): the cursor is the one it restored, as a rule.
            tracing::debug!(node = %node, generation = claim.generation, "node claimed: resuming from the ledger's cursor");
            return true;
        }
        info!(node = %node, generation = claim.generation, epoch = claim.cursor.as_ref().map(|c| c.epoch), last_seq = claim.cursor.as_ref().map(|c| c.last_seq), "node claimed at a new generation: resuming from the ledger's cursor");
        true
    }

    /// Records the generations of claims for nodes that have none yet
    /// (restored at start-up, or admitted at their first Hello).
    pub fn set_claim_generations(&self, claims: &[(&str, u64)]) {
        self.fleet.set_generations(claims)
    }

    /// Gives up this collector's claim on `node` after a claim of it
    /// failed (whether the claim was made is not known): the node's
    /// streams end, what it has pending is dropped (and out of the totals)
    /// and dropped from a failed commit before it is retried, and its next
    /// Hello's claim resumes from the ledger's cursor. Called under the
    /// ledger's lock.
    pub fn abandon_claim(&self, node: &str) {
        self.fleet.forget_claim(node);
        self.billing.drop_node(&Arc::from(node));
    }

    /// Forgets a node that is gone for good (`Fleet::retire`).
    pub fn retire_node(&self, node: &str) -> Result<(), crate::fleet::RetireError> {
        self.fleet.retire(node)
    }

    /// Nodes whose streams to this collector ended, with their stream
    /// generations (`Fleet::ended_streams`).
    pub fn ended_streams(&self) -> Vec<(Arc<str>, u64)> {
        self.fleet.ended_streams()
    }

    /// Node `node`, whose stream here ended at `generation`, is held by
    /// another collector: it leaves this collector's series unless a
    /// stream took it since (`Fleet::left_for_another`).
    pub fn left_for_another(&self, node: &str, generation: u64) -> bool {
        let left = self.fleet.left_for_another(node, generation);
        if left {
            info!(node = %node, "node claimed by another collector since its stream here ended: it leaves this collector's series");
        }
        left
    }

    /// Drops `node` from `commit` (a commit of it was fenced) and from
    /// the pending one (what its streams booked since `commit` was taken
    /// is counted from the same lost cursor), takes that energy back out
    /// of the tenant totals and ends its streams: a batch they send after
    /// this is refused as superseded, so nothing more of the node is
    /// booked until its next Hello claims it.
    pub fn fence_node(&self, commit: &mut Commit, node: &str) {
        self.fleet.lose_claim(node);
        let removed = crate::billing::pending::remove_node(commit, node);
        self.billing.take_energy(&removed);
        self.billing.drop_node(&Arc::from(node));
    }

    /// Drops from a commit what `Billing::take_stale` says is stale:
    /// `earlier` (taken in an earlier try) loses every node listed, and
    /// `commit` (numbered `id`) those dropped after it was taken. Called
    /// under the ledger's lock, before the commit is written.
    pub fn drop_stale(&self, earlier: Option<&mut Commit>, id: u64, commit: &mut Commit) {
        let stale = self.billing.take_stale();
        if stale.is_empty() {
            return;
        }
        let mut earlier = earlier;
        for (node, before) in stale {
            // Taken before the drop, so `drop_node` did not see them:
            // their energy leaves the totals here.
            if let Some(e) = earlier.as_deref_mut() {
                let removed = crate::billing::pending::remove_node(e, &node);
                self.billing.take_energy(&removed);
            }
            if id < before {
                let removed = crate::billing::pending::remove_node(commit, &node);
                self.billing.take_energy(&removed);
            }
        }
    }

    /// Marks the node disconnected if `h` still owns it.
    pub fn disconnect(&self, h: &StreamHandle) {
        self.fleet.disconnect(h)
    }

    /// Applies a batch of validated samples (rejections already decided by
    /// the edge are passed in `rejected` and only counted).
    pub fn ingest(
        &self,
        h: &StreamHandle,
        samples: Vec<NodeSample>,
        rejected: Vec<(u64, Reject)>,
    ) -> Result<BatchOutcome, Superseded> {
        let clock = (Instant::now(), unix_nanos_now());
        let out = self.fleet.ingest(
            h,
            samples,
            rejected,
            clock,
            self.billing.booking(),
            || self.tenant_history(),
            |booked: Booking, node, cursor, energy| self.billing.book(booked, node, cursor, energy),
        )?;
        let c = &self.counters;
        c.accepted
            .fetch_add(out.accepted, std::sync::atomic::Ordering::Relaxed);
        c.duplicate
            .fetch_add(out.duplicate, std::sync::atomic::Ordering::Relaxed);
        let np = &out.node_power;
        c.count_node_power(&h.node_id, np.accepted, np.duplicate, &np.rejected);
        if out.mig_layout_unknown > 0 {
            c.mig_readings_unsplit
                .fetch_add(out.mig_layout_unknown, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(node = %h.node_id, readings = out.mig_layout_unknown, "MIG board readings taken under a layout this collector never heard the node announce (a layout change before its restart): the board's energy in them goes whole to the board's UUID");
        }
        for &(seq, reason) in &out.rejected {
            SampleRejected {
                node: &h.node_id,
                seq,
                reason,
            }
            .emit(c);
        }
        Ok(out)
    }

    /// Live power of every tenant over its fresh GPUs, in mW, with the
    /// number of reporting and stale GPUs, in `tenants.all()` order.
    ///
    /// A node under a facility meter that is up and has allocated a
    /// minute here takes the ratio of the latest such minute
    /// (`meters::Live::ratio_ppm`); others have none, and their facility
    /// power is node power times the tenant's PUE.
    pub fn tenant_power(&self, tenants: &Tenants, now: Instant) -> Vec<TenantLive> {
        let board = self.meters();
        let ratio = |node: &str| {
            board?.meters.iter().find_map(|m| {
                if !m.spec.covers(node) {
                    return None;
                }
                let live = crate::sync::lock(&m.live);
                live.up.then_some(live.ratio_ppm).flatten()
            })
        };
        self.fleet.tenant_power(tenants, now, &ratio)
    }

    /// Adds what a ledger commit added to the tenants' over-contract
    /// counters (`Ledger::commit_at`) to their totals.
    pub fn add_over_contract(&self, added: &[(Arc<str>, u64)]) {
        self.billing.add_over_contract(added)
    }
}

#[cfg(test)]
mod tests;
