//! One node as the fleet knows it: its GPUs with their meters, its dedup
//! cursor (epoch, seq) and its live summary.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::accounting::{
    Applied, Meter, MeterCursor, NodeStretch, Party, Tick, split_by_weight, split_node_energy,
};
use crate::edge::{GpuIdentity, GpuInfo, GpuReading, HostReading, Mig, MigInstance};
use crate::ledger::{GpuCursor, NodeCursor};
use crate::tenants::{Tenants, UNASSIGNED};

use super::power::PowerSource;

#[derive(Debug)]
pub struct Gpu {
    pub(super) uuid: Arc<str>,
    pub(super) model: Arc<str>,
    pub(super) power_limit_milliwatts: Option<u64>,
    pub(super) memory_total_bytes: Option<u64>,
    pub(super) energy_counter_supported: bool,
    /// From the Hello; `None` when it named none of them.
    pub(super) identity: Option<Box<GpuIdentity>>,
    pub(super) tenant: Arc<str>,
    pub(super) last: Option<GpuReading>,
    /// The counter arithmetic and power integration of its readings.
    meter: Meter,
    /// When `last` was sampled, by its own timestamp, on the collector's
    /// monotonic clock: its receipt less its age then (never after the
    /// receipt). `None` when it was too old for the clock to hold.
    pub(super) sampled_at: Option<Instant>,
    /// A board in MIG mode: the parts its energy is split among.
    pub(crate) mig: Option<Box<MigParts>>,
    /// The id of that layout (`edge::GpuInfo::mig_layout`).
    pub(crate) mig_layout: Option<u64>,
    /// The layouts this board had before, as this collector heard them
    /// (id, parts; no parts: metered whole), newest last, at most
    /// [`MAX_EARLIER_LAYOUTS`]: a reading stamped with one of them (taken
    /// before the layout changed, delivered after) is split by it.
    pub(crate) earlier_layouts: Vec<(u64, Option<Box<MigParts>>)>,
}

/// Layouts kept per board besides its current one: a board's layout
/// changes rarely (its GPU must be idle), so a spool delivered late spans
/// a few at most.
pub const MAX_EARLIER_LAYOUTS: usize = 4;

/// Which of a board's layouts a reading was taken under
/// ([`Gpu::layout_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayoutPick {
    /// The current one (or the reading has no stamp: an older agent).
    Current,
    /// `earlier_layouts[k]`.
    Earlier(usize),
    /// One this collector never heard of for the board (its restart, or
    /// the node's move to it, came between): the board is metered whole,
    /// to its own UUID.
    Unknown,
}

// ---- MIG ----

/// What a MIG board's energy is split among: its instances, in the
/// Hello's order, then the board's slices in no instance (if any), as a
/// part of the board's own UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigParts {
    pub(crate) board_sm: u32,
    pub(crate) parts: Vec<MigPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigPart {
    /// The instance's UUID; the board's for the rest.
    pub(crate) uuid: Arc<str>,
    /// The instance's ids and profile; `None` for the board's rest.
    pub(crate) instance: Option<MigInstance>,
    /// The part's weight in the split: its share of the board's slices,
    /// scaled to an integer (see [`MigParts::of`]).
    pub(crate) weight: u64,
    /// The lessee of the instance's UUID, else the board's tenant.
    pub(crate) tenant: Arc<str>,
    /// Energy booked to this part since this collector first heard it
    /// (kept across a Hello that lists the part again).
    pub(crate) energy_mj: u64,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl MigParts {
    /// The parts of a checked layout; `None` unless it is `Mig::Split`
    /// (a refused layout meters the board whole). Parts listed again keep
    /// the energy `old` counted for them.
    ///
    /// Each GPU instance of `g` slices takes `g` of the board's slices,
    /// shared among its compute instances by their compute slices `c`
    /// (out of `s`, the compute slices used in it): an instance weighs
    /// `g * c * (l / s)`, `l` the least common multiple of the GPU
    /// instances' `s`, and the board's slices in no GPU instance weigh
    /// `rest * l`. The edge bounds the board to 64 slices, so `l` (at most
    /// Landau's function of 64, 2,042,040) and the weights fit.
    pub(super) fn of(
        board: &Arc<str>,
        mig: Mig,
        tenant: &Arc<str>,
        old: Option<&MigParts>,
    ) -> Option<Box<Self>> {
        let Mig::Split {
            board_sm,
            board_slices,
            instances,
        } = mig
        else {
            return None;
        };
        // Each GPU instance: (id, slices, compute slices used in it).
        let mut gis: Vec<(u32, u64, u64)> = Vec::new();
        for m in &instances {
            let c = u64::from(m.compute_instance_slice_count);
            match gis.iter_mut().find(|(id, _, _)| *id == m.gpu_instance_id) {
                Some((_, _, used)) => *used += c,
                None => gis.push((m.gpu_instance_id, u64::from(m.gpu_instance_slice_count), c)),
            }
        }
        let l = gis.iter().fold(
            1u64,
            |l, (_, _, s)| if *s == 0 { l } else { l / gcd(l, *s) * s },
        );
        let used: u64 = gis.iter().map(|(_, g, _)| g).sum();
        let kept = |uuid: &str| {
            old.and_then(|o| o.parts.iter().find(|p| &*p.uuid == uuid))
                .map_or(0, |p| p.energy_mj)
        };
        let mut parts: Vec<MigPart> = instances
            .into_iter()
            .map(|m| {
                let (g, s) = gis
                    .iter()
                    .find(|(id, _, _)| *id == m.gpu_instance_id)
                    .map_or((0, 1), |(_, g, s)| (*g, (*s).max(1)));
                let c = u64::from(m.compute_instance_slice_count);
                MigPart {
                    uuid: Arc::from(m.uuid.as_str()),
                    energy_mj: kept(&m.uuid),
                    weight: g.saturating_mul(c).saturating_mul(l / s),
                    instance: Some(m),
                    tenant: tenant.clone(),
                }
            })
            .collect();
        // Checked by the edge: the GPU instances use at most the board's
        // slices.
        let rest = u64::from(board_slices).saturating_sub(used);
        if rest > 0 {
            parts.push(MigPart {
                uuid: board.clone(),
                instance: None,
                weight: rest.saturating_mul(l),
                tenant: tenant.clone(),
                energy_mj: kept(board),
            });
        }
        Some(Box::new(Self { board_sm, parts }))
    }
}
/// One GPU in the live whole-node split's GPU counts, of which a MIG
/// board's tenants hold their exact split: divisible by every number up
/// to 16, so the shares of common layouts (7 or 8 slices) are exact
/// fractions too.
pub(super) const LIVE_GPU: u64 = 720_720;
// ---- end MIG ----

impl Gpu {
    pub(super) fn new(info: GpuInfo, model: Arc<str>, tenant: Arc<str>) -> Self {
        let uuid: Arc<str> = Arc::from(info.uuid);
        let earlier_layouts = info
            .earlier_mig
            .into_iter()
            .filter(|(id, _)| Some(*id) != info.mig_layout)
            .map(|(id, mig)| (id, MigParts::of(&uuid, mig, &tenant, None)))
            .collect();
        Self {
            mig: MigParts::of(&uuid, info.mig, &tenant, None),
            mig_layout: info.mig_layout,
            earlier_layouts,
            uuid,
            model,
            power_limit_milliwatts: info.power_limit_milliwatts,
            memory_total_bytes: info.memory_total_bytes,
            energy_counter_supported: info.energy_counter_supported,
            identity: Self::identity_of(info.identity),
            tenant,
            last: None,
            meter: Meter::default(),
            sampled_at: None,
        }
    }

    /// Takes the layouts a Hello announces: the current one (`mig`,
    /// checked, under id `layout`) and those the board had before
    /// (`earlier`). The one it replaces is kept among the earlier layouts,
    /// for readings still stamped with it; a layout heard before comes
    /// back with the energy its parts counted. Parts listed again keep
    /// their energy.
    pub(super) fn relayout(&mut self, mig: Mig, layout: Option<u64>, earlier: Vec<(u64, Mig)>) {
        self.take_layout(mig, layout);
        // The earlier layouts the agent lists (a collector that started
        // after they changed never heard them): those heard here keep
        // what they counted; the oldest go first beyond the bound.
        for (id, mig) in earlier {
            if Some(id) == self.mig_layout {
                continue;
            }
            let kept = match self.earlier_layouts.iter().position(|(e, _)| *e == id) {
                Some(k) => self.earlier_layouts.remove(k).1,
                None => MigParts::of(&self.uuid, mig, &self.tenant, None),
            };
            self.earlier_layouts.push((id, kept));
        }
        while self.earlier_layouts.len() > MAX_EARLIER_LAYOUTS {
            self.earlier_layouts.remove(0);
        }
        self.carry_part_counts();
    }

    /// The board's layouts with parts: the current one, then the earlier
    /// ones.
    fn layouts(&self) -> impl Iterator<Item = &MigParts> {
        let earlier = self
            .earlier_layouts
            .iter()
            .filter_map(|(_, m)| m.as_deref());
        self.mig.as_deref().into_iter().chain(earlier)
    }

    fn layouts_mut(&mut self) -> impl Iterator<Item = &mut MigParts> {
        let earlier = self
            .earlier_layouts
            .iter_mut()
            .filter_map(|(_, m)| m.as_deref_mut());
        self.mig.as_deref_mut().into_iter().chain(earlier)
    }

    /// Gives every copy of a part (by UUID) in the board's layouts the
    /// highest count any copy holds: a layout new to this collector (or
    /// one whose parts the replaced layout did not list) counts on from
    /// the part's kept copies, so its counter never goes back. Copies
    /// counted here stay equal after (`count_part_energy`).
    fn carry_part_counts(&mut self) {
        let mut counts: Vec<(Arc<str>, u64)> = Vec::new();
        for p in self.layouts().flat_map(|m| &m.parts) {
            match counts.iter_mut().find(|(u, _)| *u == p.uuid) {
                Some((_, e)) => *e = (*e).max(p.energy_mj),
                None => counts.push((p.uuid.clone(), p.energy_mj)),
            }
        }
        for p in self.layouts_mut().flat_map(|m| &mut m.parts) {
            if let Some((_, e)) = counts.iter().find(|(u, _)| *u == p.uuid) {
                p.energy_mj = *e;
            }
        }
    }

    /// `relayout`'s current layout.
    fn take_layout(&mut self, mig: Mig, layout: Option<u64>) {
        if layout == self.mig_layout {
            self.mig = MigParts::of(&self.uuid, mig, &self.tenant, self.mig.as_deref());
            self.mig_layout = layout;
            return;
        }
        let back = self
            .earlier_layouts
            .iter()
            .position(|(e, _)| Some(*e) == layout)
            .map(|k| self.earlier_layouts.remove(k).1);
        let replaced = self.mig.take();
        let counted = match &back {
            Some(parts) => parts.as_deref(),
            None => replaced.as_deref(),
        };
        self.mig = MigParts::of(&self.uuid, mig, &self.tenant, counted);
        if let Some(id) = self.mig_layout {
            self.earlier_layouts.push((id, replaced));
        }
        self.mig_layout = layout;
    }

    /// Adds each part's share of a reading (by UUID) to its energy counter
    /// in every layout that lists the part, so that the counter goes on
    /// whichever layout a reading was split by, and when an earlier layout
    /// comes back (`capwatch_gpu_mig_energy_joules_total` never goes back).
    pub(super) fn count_part_energy(&mut self, shares: &[(Arc<str>, u64)]) {
        if shares.is_empty() {
            return;
        }
        for p in self.layouts_mut().flat_map(|m| &mut m.parts) {
            if let Some((_, e)) = shares.iter().find(|(u, _)| *u == p.uuid) {
                p.energy_mj = p.energy_mj.saturating_add(*e);
            }
        }
    }

    /// Which of its layouts a reading stamped `stamp` was taken under.
    pub(crate) fn layout_of(&self, stamp: Option<u64>) -> LayoutPick {
        match stamp {
            None => LayoutPick::Current,
            Some(id) if Some(id) == self.mig_layout => LayoutPick::Current,
            Some(id) => self
                .earlier_layouts
                .iter()
                .position(|(e, _)| *e == id)
                .map_or(LayoutPick::Unknown, LayoutPick::Earlier),
        }
    }

    /// The parts of the layout `pick` (none: metered whole).
    pub(crate) fn parts_of(&self, pick: LayoutPick) -> Option<&MigParts> {
        match pick {
            LayoutPick::Current => self.mig.as_deref(),
            LayoutPick::Earlier(k) => self.earlier_layouts[k].1.as_deref(),
            LayoutPick::Unknown => None,
        }
    }

    /// The UUIDs a tenant may lease of this GPU: the board's, and each of
    /// its MIG instances', of its current and earlier layouts (the node
    /// may still deliver energy split to them).
    pub(super) fn leasable_uuids(&self) -> impl Iterator<Item = &Arc<str>> {
        let instances = self.layouts().flat_map(|m| {
            m.parts
                .iter()
                .filter(|p| p.instance.is_some())
                .map(|p| &p.uuid)
        });
        std::iter::once(&self.uuid).chain(instances)
    }

    /// Calls `add` with each tenant's part of this GPU's live figures
    /// `one`: all of them its tenant's, or for a MIG board each tenant of
    /// its parts once, with the slice share of the power of the parts it
    /// holds (the exact split of the energy, so the shares sum to the
    /// board's power) and the board's other figures (the board counts as
    /// one reporting or stale GPU of each of them).
    pub(super) fn live_parts(&self, one: &TenantLive, mut add: impl FnMut(&Arc<str>, &TenantLive)) {
        let Some(m) = self.mig.as_deref() else {
            return add(&self.tenant, one);
        };
        let power = split_by_weight(m.parts.iter().map(|p| p.weight))(one.power_milliwatts);
        let mut per: Vec<(&Arc<str>, TenantLive)> = Vec::with_capacity(m.parts.len());
        for (p, mw) in m.parts.iter().zip(power) {
            match per.iter_mut().find(|(t, _)| Arc::ptr_eq(t, &p.tenant)) {
                Some((_, l)) => l.power_milliwatts = l.power_milliwatts.saturating_add(mw),
                None => per.push((
                    &p.tenant,
                    TenantLive {
                        power_milliwatts: mw,
                        ..*one
                    },
                )),
            }
        }
        for (t, l) in &per {
            add(t, l);
        }
    }

    pub(super) fn identity_of(id: GpuIdentity) -> Option<Box<GpuIdentity>> {
        (id != GpuIdentity::default()).then(|| Box::new(id))
    }

    /// Folds one accepted reading in; returns the energy it adds (mJ) and
    /// the interval it covers.
    pub(super) fn apply(&mut self, r: GpuReading, t: &Tick) -> Applied {
        if !r.lost
            && let Some(limit) = r.power_limit_milliwatts
        {
            self.power_limit_milliwatts = Some(limit);
        }
        let applied = self.meter.apply(&r, self.power_limit_milliwatts, t);
        if applied.kept {
            self.last = Some(r);
        }
        applied
    }

    /// Energy since this collector first saw the GPU (mJ).
    pub(crate) fn energy_millijoules(&self) -> u64 {
        self.meter.energy_millijoules()
    }

    pub(crate) fn counter_resets(&self) -> u64 {
        self.meter.counter_resets()
    }

    /// The newest timestamp of its readings.
    pub(crate) fn last_timestamp(&self) -> Option<i64> {
        self.meter.last_timestamp()
    }

    /// When its last reading arrived.
    pub(crate) fn last_receipt(&self) -> Option<Instant> {
        self.meter.last_receipt()
    }

    #[cfg(test)]
    pub(crate) fn meter(&self) -> &Meter {
        &self.meter
    }

    #[cfg(test)]
    pub(crate) fn uuid(&self) -> &Arc<str> {
        &self.uuid
    }

    #[cfg(test)]
    pub(crate) fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }

    #[cfg(test)]
    pub(crate) fn sampled_at(&self) -> Option<Instant> {
        self.sampled_at
    }

    pub(super) fn meter_mut(&mut self) -> &mut Meter {
        &mut self.meter
    }

    /// The counting state the ledger keeps for this GPU: not when its
    /// counter last changed, which vouches for nothing for a fine counter
    /// (`accounting::Meter`), so its cursor stays as small as before.
    pub(super) fn cursor(&self) -> GpuCursor {
        GpuCursor {
            changed_ns: None,
            ..self.meter.cursor().into()
        }
    }

    /// A GPU known only from the ledger, until its node says Hello; at
    /// most `last_seq` samples behind.
    pub(super) fn resumed(uuid: &str, c: &GpuCursor, last_seq: u64) -> Self {
        let mut g = Gpu::new(
            GpuInfo {
                uuid: uuid.to_string(),
                model: String::new(),
                power_limit_milliwatts: None,
                memory_total_bytes: None,
                energy_counter_supported: c.last_counter_mj.is_some(),
                identity: GpuIdentity::default(),
                mig: Mig::Whole,
                mig_layout: None,
                earlier_mig: Vec::new(),
            },
            Arc::from(""),
            Arc::from(UNASSIGNED),
        );
        let cursor = MeterCursor::from(c);
        g.meter = Meter::resumed(&cursor, Some(last_seq));
        g
    }

    /// Whether the GPU's last reading is live at `now`: sampled, by its
    /// own timestamp, within `window` (so received within it too) and not
    /// lost. A reading that arrives late (a replayed spool) is not live.
    pub(crate) fn fresh(&self, now: Instant, window: Duration) -> bool {
        sampled_within(self.sampled_at, now, window) && self.last.as_ref().is_some_and(|r| !r.lost)
    }
}

/// Whether `sampled_at` is at most `window` before `now`.
fn sampled_within(sampled_at: Option<Instant>, now: Instant, window: Duration) -> bool {
    sampled_at.is_some_and(|t| now.saturating_duration_since(t) <= window)
}

/// When a sample stamped `timestamp_ns` was taken, on the monotonic clock,
/// given that it arrived at `now` (`now_ns` on the wall clock): `now` less
/// its age, `now` for one stamped ahead; `None` when older than the clock
/// reaches back.
pub(super) fn sampled_at(timestamp_ns: i64, now: Instant, now_ns: i64) -> Option<Instant> {
    let age = u64::try_from(now_ns.saturating_sub(timestamp_ns)).unwrap_or(0);
    now.checked_sub(Duration::from_nanos(age))
}

/// Fields in declaration order (`repr(C)`): what a tenant-level scrape
/// reads of every node comes first, so that with the lock word it lies in
/// the first two cache lines of the allocation.
#[derive(Debug)]
#[repr(C)]
pub struct Node {
    /// Whether `live` may be read; false when some GPU's freshness differs
    /// from the node's (see `Node::summarize`).
    pub(super) live_valid: bool,
    /// Another collector claimed the node (a commit of it was fenced):
    /// its agent streams there now, so this collector exports nothing of
    /// it (no node or GPU series, nothing in the tenants' live figures)
    /// until the node says Hello here again.
    pub(super) moved_away: bool,
    pub(super) last_receipt: Option<Instant>,
    /// When the node's latest accepted sample was taken, by its own
    /// timestamp (`Gpu::sampled_at`): its GPUs are live only while this
    /// is within the staleness window.
    pub(super) sampled_at: Option<Instant>,
    pub(super) interval: Duration,
    /// What the node's GPUs add to each tenant's live figures while the
    /// node is up, computed once per batch: the first tenant inline, any
    /// others in `live_rest`.
    live_first: Option<(Arc<str>, TenantLive)>,
    live_rest: Vec<(Arc<str>, TenantLive)>,
    pub(super) id: Arc<str>,
    /// Tenant label of the node as a whole: the tenant of all its GPUs when
    /// they agree, else the tenant leasing the node by name.
    pub(super) tenant: Arc<str>,
    pub(super) agent_version: String,
    pub(super) epoch: u64,
    pub(super) last_seq: u64,
    pub(super) generation: u64,
    /// The fencing generation of the ledger claim this collector holds on
    /// the node; `None` until a claim (at start-up or a Hello) says.
    pub(super) ledger_generation: Option<u64>,
    /// Set once the claim of `ledger_generation` is lost (a fenced commit,
    /// or a newer claim that replaced the node's cursor): the streams
    /// admitted under it ack nothing more and end. Replaced by a fresh
    /// flag when the node's cursor is adopted from a new claim.
    pub(super) claim_lost: Arc<AtomicBool>,
    pub(super) connected: bool,
    pub(super) samples_accepted: u64,
    pub(super) last_timestamp: i64,
    pub(super) host: Option<HostReading>,
    pub(super) gpus: Vec<Gpu>,
    /// GPUs the node announced before but not in its latest inventory;
    /// kept so their counters resume if they come back.
    pub(super) departed: Vec<Gpu>,
    /// The power sources of the node's latest Hello, in its order.
    pub(crate) power: Vec<PowerSource>,
    /// Power sources known from before (the ledger, an earlier Hello) but
    /// not announced now; kept so their counters resume if they come back.
    pub(super) power_departed: Vec<PowerSource>,
    /// Each tenant's GPU energy and GPU time on the node since its
    /// whole-node counter last booked energy: what the next energy it
    /// books is split by and spread over (`NodeStretch`).
    pub(super) stretch: NodeStretch<Arc<str>>,
    /// The ledger commit holding the node's latest batch: what a Welcome
    /// must wait for.
    pub(super) last_commit_id: u64,
    /// [from, until) (Unix nanoseconds) of the tenant file version the
    /// GPUs' `tenant` comes from: a sample stamped inside it is booked to
    /// `tenant` with no lookup.
    pub(super) tenants_span: (i64, i64),
}

impl Node {
    /// A node with no stream yet, resuming at (epoch, last_seq).
    pub(super) fn new(id: Arc<str>, epoch: u64, last_seq: u64, interval: Duration) -> Self {
        Self {
            id,
            tenant: Arc::from(UNASSIGNED),
            agent_version: String::new(),
            interval,
            epoch,
            last_seq,
            generation: 0,
            ledger_generation: None,
            claim_lost: Arc::default(),
            moved_away: false,
            connected: false,
            samples_accepted: 0,
            last_receipt: None,
            sampled_at: None,
            last_timestamp: 0,
            host: None,
            gpus: Vec::new(),
            departed: Vec::new(),
            power: Vec::new(),
            power_departed: Vec::new(),
            stretch: NodeStretch::default(),
            last_commit_id: 0,
            tenants_span: (i64::MIN, i64::MAX),
            live_valid: true,
            live_first: None,
            live_rest: Vec::new(),
        }
    }

    #[cfg(test)]
    pub(crate) fn gpus(&self) -> &[Gpu] {
        &self.gpus
    }

    #[cfg(test)]
    pub(crate) fn departed(&self) -> &[Gpu] {
        &self.departed
    }

    #[cfg(test)]
    pub(crate) fn id(&self) -> &Arc<str> {
        &self.id
    }

    #[cfg(test)]
    pub(crate) fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }

    #[cfg(test)]
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    #[cfg(test)]
    pub(crate) fn last_seq(&self) -> u64 {
        self.last_seq
    }

    #[cfg(test)]
    pub(crate) fn samples_accepted(&self) -> u64 {
        self.samples_accepted
    }

    #[cfg(test)]
    pub(crate) fn connected(&self) -> bool {
        self.connected
    }

    #[cfg(test)]
    pub(crate) fn live_valid(&self) -> bool {
        self.live_valid
    }

    #[cfg(test)]
    pub(crate) fn last_receipt(&self) -> Option<Instant> {
        self.last_receipt
    }

    #[cfg(test)]
    pub(crate) fn sampled_at(&self) -> Option<Instant> {
        self.sampled_at
    }

    /// How long without a sample before this node's GPUs are stale.
    pub(crate) fn stale_window(&self, configured: Option<Duration>) -> Duration {
        configured.unwrap_or(self.interval * 3)
    }

    /// How long since the node's last sample arrived; `None` before the
    /// first.
    pub(crate) fn silent_for(&self, now: Instant) -> Option<Duration> {
        self.last_receipt.map(|t| now.saturating_duration_since(t))
    }

    /// Whether samples arrive from the node: its last one is at most
    /// `window` old (`capwatch_node_up`, the status page's stale nodes).
    pub(crate) fn up(&self, now: Instant, window: Duration) -> bool {
        self.silent_for(now).is_some_and(|d| d <= window)
    }

    /// The node's cursor for the ledger, complete (GPUs that left it too).
    pub(super) fn cursor(&self) -> NodeCursor {
        NodeCursor {
            epoch: self.epoch,
            last_seq: self.last_seq,
            gpus: self
                .gpus
                .iter()
                .chain(&self.departed)
                .map(|g| (g.uuid.clone(), g.cursor()))
                .collect(),
            power: self
                .power
                .iter()
                .chain(&self.power_departed)
                .map(|p| (p.key.clone(), p.cursor()))
                .collect(),
            stretch: self.stretch.parts().to_vec(),
        }
    }

    /// Attributes the GPUs by `tenants`, the version in force over `span`.
    pub(super) fn attribute(&mut self, tenants: &Tenants, span: (i64, i64)) {
        self.tenants_span = span;
        let all = tenants.all();
        for g in &mut self.gpus {
            g.tenant = all[tenants.attribute(&self.id, &g.uuid)].id.clone();
            let board = g.uuid.clone();
            for p in g.layouts_mut().flat_map(|m| &mut m.parts) {
                p.tenant = all[tenants.attribute_instance(&self.id, &p.uuid, &board)]
                    .id
                    .clone();
            }
        }
        self.tenant = match self.gpus.first() {
            Some(first) if self.gpus.iter().all(|g| g.tenant == first.tenant) => {
                first.tenant.clone()
            }
            _ => all[tenants.attribute_node(&self.id)].id.clone(),
        };
        self.summarize();
    }

    /// Sums the GPUs into `live`, per tenant, for a tenant-level scrape
    /// that then reads one entry per node instead of walking every GPU.
    ///
    /// *Invariant:* equal to `walk_live` at any later moment until the
    /// node's GPUs change (after which this runs again). It holds because
    /// every GPU that counts as reporting here was last heard at the
    /// node's last receipt, in its latest sample, so it is fresh exactly
    /// when that sample is; a GPU last heard earlier (left out of later
    /// samples) would go stale at its own moment, and then there is no
    /// summary.
    pub(super) fn summarize(&mut self) {
        let at = self.last_receipt;
        self.live_first = None;
        self.live_rest.clear();
        self.live_valid = false;
        for g in &self.gpus {
            let reading = g.last.as_ref().filter(|r| !r.lost);
            let one = match (g.last_receipt(), reading) {
                (Some(t), Some(r)) if Some(t) == at && g.sampled_at == self.sampled_at => {
                    TenantLive::of(r)
                }
                (Some(_), Some(_)) => return,
                _ => TenantLive {
                    stale: 1,
                    ..TenantLive::default()
                },
            };
            let (first, rest) = (&mut self.live_first, &mut self.live_rest);
            g.live_parts(&one, |tenant, one| match first {
                Some((t, p)) if Arc::ptr_eq(t, tenant) => p.add(one),
                None => *first = Some((tenant.clone(), *one)),
                Some(_) => match rest.iter_mut().find(|(t, _)| Arc::ptr_eq(t, tenant)) {
                    Some((_, p)) => p.add(one),
                    None => rest.push((tenant.clone(), *one)),
                },
            });
        }
        self.live_valid = true;
    }

    /// The node's whole-node source, if its last reading is fresh at
    /// `now` and has a power figure: (source, mW).
    pub(crate) fn node_power(&self, now: Instant, window: Duration) -> Option<(&PowerSource, u64)> {
        let p = self.power.iter().find(|p| p.is_node())?;
        let mw = p.last.as_ref()?.power_milliwatts?;
        sampled_within(p.sampled_at, now, p.window(window)).then_some((p, mw))
    }

    /// Calls `add` with each tenant's share of the node's live whole-node
    /// power at `now`, split by the rule of node energy with the live
    /// power of its fresh GPUs (`split_node_energy`), each tenant holding
    /// its share of a MIG board as GPUs ([`LIVE_GPU`]); nothing where the
    /// node has no fresh whole-node reading.
    pub(crate) fn node_power_split(
        &self,
        now: Instant,
        window: Duration,
        mut add: impl FnMut(&Arc<str>, u64),
    ) {
        let Some((_, mw)) = self.node_power(now, window) else {
            return;
        };
        let mut parties: Vec<Party<Arc<str>>> = Vec::new();
        for g in &self.gpus {
            let power = match &g.last {
                Some(r) if g.fresh(now, window) => r.power_milliwatts.unwrap_or(0),
                _ => 0,
            };
            let mut add_party = |tenant: &Arc<str>, power: u64, held: u64| match parties
                .iter_mut()
                .find(|p| Arc::ptr_eq(&p.tenant, tenant))
            {
                Some(p) => {
                    p.gpus = p.gpus.saturating_add(held);
                    p.gpu_energy_mj = p.gpu_energy_mj.saturating_add(power);
                }
                None => parties.push(Party {
                    tenant: tenant.clone(),
                    gpu_energy_mj: power,
                    gpus: held,
                }),
            };
            match g.mig.as_deref() {
                None => add_party(&g.tenant, power, LIVE_GPU),
                // A MIG board: each part's share of its power and of one
                // GPU, by the weights of the energy split.
                Some(m) => {
                    let weights = || m.parts.iter().map(|p| p.weight);
                    let power = split_by_weight(weights())(power);
                    let held = split_by_weight(weights())(LIVE_GPU);
                    for ((p, mw), h) in m.parts.iter().zip(power).zip(held) {
                        add_party(&p.tenant, mw, h);
                    }
                }
            }
        }
        if parties.is_empty() {
            add(&self.tenant, mw);
            return;
        }
        for (p, share) in parties.iter().zip(split_node_energy(mw, &parties)) {
            add(&p.tenant, share);
        }
    }

    /// Calls `add` with what the node's GPUs add to each tenant's live
    /// figures at `now`: from the summary when there is one, else GPU by
    /// GPU.
    pub(crate) fn live(
        &self,
        now: Instant,
        window: Duration,
        mut add: impl FnMut(&Arc<str>, &TenantLive),
    ) {
        if !self.live_valid {
            return self.walk_live(now, window, add);
        }
        let up = sampled_within(self.sampled_at, now, window);
        for (tenant, part) in self.live_first.iter().chain(&self.live_rest) {
            if up {
                add(tenant, part);
            } else {
                add(
                    tenant,
                    &TenantLive {
                        stale: part.reporting + part.stale,
                        ..TenantLive::default()
                    },
                );
            }
        }
    }

    /// `live`, GPU by GPU.
    pub(crate) fn walk_live(
        &self,
        now: Instant,
        window: Duration,
        mut add: impl FnMut(&Arc<str>, &TenantLive),
    ) {
        for g in &self.gpus {
            let one = match &g.last {
                Some(r) if g.fresh(now, window) => TenantLive::of(r),
                _ => TenantLive {
                    stale: 1,
                    ..TenantLive::default()
                },
            };
            g.live_parts(&one, &mut add);
        }
    }
}

/// One tenant's live figures over some GPUs, and its share of the live
/// whole-node power of its nodes that have a fresh whole-node reading.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TenantLive {
    pub power_milliwatts: u64,
    pub reporting: u64,
    pub stale: u64,
    pub utilization_sum: u64,
    pub utilization_n: u64,
    /// Its share of live whole-node power (`Node::node_power_split`).
    pub node_power_milliwatts: u64,
    /// How many of its nodes have a fresh whole-node reading: none, and
    /// it has no node power (absent, not 0).
    pub node_reporting: u64,
    /// Its node power on nodes under a facility meter with a live ratio,
    /// and that power times the ratio: the part of its facility power
    /// taken from a meter rather than its PUE.
    pub metered_node_milliwatts: u64,
    pub metered_facility_milliwatts: u64,
}

impl TenantLive {
    /// What its metered node power gives over one second (mW × 1 s =
    /// mJ), in the terms of the facility rule (`Contract::facility_power`).
    pub fn metered(&self) -> crate::accounting::Metered {
        crate::accounting::Metered {
            allocated_mj: self.metered_facility_milliwatts,
            node_mj: self.metered_node_milliwatts,
        }
    }

    /// One reporting GPU's part.
    fn of(r: &GpuReading) -> Self {
        Self {
            power_milliwatts: r.power_milliwatts.unwrap_or(0),
            reporting: 1,
            stale: 0,
            utilization_sum: r.utilization_percent.map_or(0, u64::from),
            utilization_n: u64::from(r.utilization_percent.is_some()),
            ..Self::default()
        }
    }

    pub(crate) fn add(&mut self, o: &TenantLive) {
        self.power_milliwatts = self.power_milliwatts.saturating_add(o.power_milliwatts);
        self.reporting += o.reporting;
        self.stale += o.stale;
        self.utilization_sum += o.utilization_sum;
        self.utilization_n += o.utilization_n;
        self.node_power_milliwatts = self
            .node_power_milliwatts
            .saturating_add(o.node_power_milliwatts);
        self.node_reporting += o.node_reporting;
        self.metered_node_milliwatts = self
            .metered_node_milliwatts
            .saturating_add(o.metered_node_milliwatts);
        self.metered_facility_milliwatts = self
            .metered_facility_milliwatts
            .saturating_add(o.metered_facility_milliwatts);
    }
}
