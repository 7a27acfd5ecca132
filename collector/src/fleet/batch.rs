//! One batch of one node's samples, in one critical section under the
//! node's lock: dedup, the edge's checks that need the inventory, the
//! readings applied to the GPUs' meters, the minute buckets booked and the
//! node's cursor handed to billing.

use std::sync::Arc;
use std::time::Instant;

use crate::accounting::{Book, OnGpu, Tick, split_by_weight};
use crate::edge::{
    MAX_SEQ_JUMP, NodePowerReject, NodeSample, Reject, check_node_power, check_sample,
};
use crate::ledger::NodeCursor;
use crate::sync::lock;
use crate::tenants::TenantHistory;

use super::node::{LayoutPick, sampled_at};
use super::{Fleet, StreamHandle};

#[derive(Debug, thiserror::Error)]
#[error("a newer stream took over node {0}")]
pub struct Superseded(pub Arc<str>);

/// What one batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub acked_seq: u64,
    /// The ledger commit that will hold this batch; ack after it.
    pub commit_id: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: Vec<(u64, Reject)>,
    /// What became of the node power readings of the accepted samples.
    pub node_power: NodePowerOutcome,
    /// Board readings stamped with a MIG layout this collector does not
    /// know for the board, metered whole to its UUID
    /// (`capwatch_collector_mig_readings_unsplit_total`).
    pub mig_layout_unknown: u64,
}

/// Node power readings of one batch
/// (`capwatch_collector_node_power_readings_total`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodePowerOutcome {
    pub accepted: u64,
    /// Not after the source's previous reading: sent before.
    pub duplicate: u64,
    /// By `NodePowerReject::ALL`.
    pub rejected: [u64; NodePowerReject::ALL.len()],
}

impl Fleet {
    /// Applies a batch of samples checked on their own by the edge
    /// (rejections it already decided are passed in `rejected` and only
    /// acked), at `now` (`now_ns` on the wall clock). `history` is read
    /// under the node's lock; `book` puts the node's buckets, its cursor
    /// and the tenants' energy into the next commit, still under it, and
    /// returns that commit's number (and adds the energy to the tenants'
    /// totals); `booked` is where the batch books, empty. Returns the
    /// outcome.
    #[allow(clippy::too_many_arguments)]
    pub fn ingest<B>(
        &self,
        h: &StreamHandle,
        samples: Vec<NodeSample>,
        mut rejected: Vec<(u64, Reject)>,
        (now, now_ns): (Instant, i64),
        mut booked: B,
        history: impl FnOnce() -> Arc<TenantHistory>,
        book: impl FnOnce(B, &Arc<str>, NodeCursor, &[(Arc<str>, u64)]) -> u64,
    ) -> Result<BatchOutcome, Superseded>
    where
        B: Book<Arc<str>> + for<'a> Book<OnGpu<'a, Arc<str>>>,
    {
        let mut out = BatchOutcome::default();
        let mut energy: Vec<(Arc<str>, u64)> = Vec::new();
        // The tenant of each GPU under the last older version a sample of
        // this batch needed: (version, tenant per GPU).
        let mut past: Option<(usize, Vec<Arc<str>>)> = None;
        // And of each MIG board's parts under that version (empty for a
        // whole board).
        let mut past_parts: Vec<Vec<Arc<str>>> = Vec::new();
        {
            let mut guard = lock(&h.node);
            // One borrow per field: the GPUs, the power sources and the
            // energy since the last whole-node reading at once.
            let n = &mut *guard;
            // Read under the node's lock: a reload re-attributes the node
            // after replacing the history, so this is as new as its span.
            let history = history();
            let window = n.stale_window(self.cfg.stale_after);
            let node_id = n.id.clone();
            if n.generation != h.generation || n.epoch != h.epoch {
                return Err(Superseded(h.node_id.clone()));
            }
            // A refused sample sent again (its ack was lost) is a
            // duplicate, not a second rejection.
            let before = n.last_seq;
            let is_resent = |seq: u64| seq != 0 && seq <= before;
            let resent = rejected.iter().filter(|(seq, _)| is_resent(*seq)).count();
            rejected.retain(|(seq, _)| !is_resent(*seq));
            out.duplicate += resent as u64;
            let skew = i64::try_from(self.cfg.max_clock_skew.as_nanos()).unwrap_or(i64::MAX);
            let latest = now_ns.saturating_add(skew);
            let age = i64::try_from(self.cfg.max_sample_age.as_nanos()).unwrap_or(i64::MAX);
            let oldest = now_ns.saturating_sub(age);
            // Only a node with a whole-node source books node energy, so
            // only there is GPU energy weighed for its split (elsewhere
            // the stretch would only grow).
            let whole_node = n.power.iter().any(|p| p.is_node());
            for s in samples {
                if s.seq <= n.last_seq {
                    out.duplicate += 1;
                    continue;
                }
                // A sequence far ahead of the last one would make every
                // later sample of this epoch a duplicate.
                if s.seq > n.last_seq.saturating_add(MAX_SEQ_JUMP) {
                    rejected.push((s.seq, Reject::Sequence));
                    continue;
                }
                let limit_of = |i: usize| n.gpus[i].power_limit_milliwatts;
                if let Err(reason) = check_sample(&s, n.gpus.len(), limit_of, latest, oldest) {
                    rejected.push((s.seq, reason));
                    continue;
                }
                n.last_seq = s.seq;
                n.samples_accepted += 1;
                n.last_receipt = Some(now);
                let sampled = sampled_at(s.timestamp_unix_nanos, now, now_ns);
                n.sampled_at = sampled;
                n.last_timestamp = n.last_timestamp.max(s.timestamp_unix_nanos);
                if s.host.is_some() {
                    n.host = s.host;
                }
                let tick = Tick {
                    timestamp_ns: s.timestamp_unix_nanos,
                    seq: s.seq,
                    now,
                    latest_ns: latest,
                    interval: n.interval,
                    window,
                };
                // The common case, a sample of the version the GPUs were
                // attributed by: their own tenant. Else (a sample from
                // before a lease change, delivered late) the tenant of the
                // version in force at the sample's time.
                let ts = s.timestamp_unix_nanos;
                let version = (ts < n.tenants_span.0 || ts >= n.tenants_span.1).then(|| {
                    let v = history.at(ts);
                    if past.as_ref().is_none_or(|(p, _)| *p != v) {
                        let t = history.version(v);
                        let tenants = n
                            .gpus
                            .iter()
                            .map(|g| t.all()[t.attribute(&node_id, &g.uuid)].id.clone())
                            .collect();
                        past = Some((v, tenants));
                        past_parts = n
                            .gpus
                            .iter()
                            .map(|g| {
                                g.mig.as_deref().map_or_else(Vec::new, |m| {
                                    m.parts
                                        .iter()
                                        .map(|p| {
                                            let at =
                                                t.attribute_instance(&node_id, &p.uuid, &g.uuid);
                                            t.all()[at].id.clone()
                                        })
                                        .collect()
                                })
                            })
                            .collect();
                    }
                });
                // The layout each board's reading was taken under, where
                // one is not its current layout (empty, the common case:
                // every board's current one, a GPU the sample leaves out's
                // too).
                let mut picks: Vec<LayoutPick> = Vec::new();
                let n_gpus = n.gpus.len();
                for r in s.gpus {
                    let i = r.index as usize;
                    let gpu = &mut n.gpus[i];
                    let pick = gpu.layout_of(r.mig_layout);
                    if pick != LayoutPick::Current {
                        if picks.is_empty() {
                            picks = vec![LayoutPick::Current; n_gpus];
                        }
                        picks[i] = pick;
                    }
                    if pick == LayoutPick::Unknown && !r.lost {
                        out.mig_layout_unknown += 1;
                    }
                    let applied = gpu.apply(r, &tick);
                    gpu.sampled_at = sampled;
                    let tenant = match (&version, &past) {
                        (Some(()), Some((_, tenants))) => &tenants[i],
                        _ => &gpu.tenant,
                    };
                    let mut add = |tenant: &Arc<str>, added: u64| {
                        if added > 0 {
                            match energy.iter_mut().find(|(t, _)| t == tenant) {
                                Some((_, e)) => *e = e.saturating_add(added),
                                None => energy.push((tenant.clone(), added)),
                            }
                            if whole_node {
                                n.stretch.add_gpu_energy(tenant, added);
                            }
                        }
                    };
                    // Each part's share, for its energy counter.
                    let mut counted: Vec<(Arc<str>, u64)> = Vec::new();
                    let mig = match pick {
                        LayoutPick::Current => gpu.mig.as_deref_mut(),
                        LayoutPick::Earlier(k) => gpu.earlier_layouts[k].1.as_deref_mut(),
                        LayoutPick::Unknown => None,
                    };
                    match mig {
                        None => {
                            let on = OnGpu {
                                tenant,
                                gpu: &gpu.uuid,
                            };
                            applied.book(&mut booked, &on, window);
                            add(tenant, applied.energy_mj);
                        }
                        // A MIG board: its reading (the board's counter,
                        // once) split among its parts by slice share, of
                        // the layout it was taken under.
                        Some(mig) => {
                            // A reading from before a lease change: its
                            // parts' tenants of the version in force then
                            // (kept per batch for the current layout).
                            let then: Vec<Arc<str>> = match (&version, &past) {
                                (Some(()), Some((v, _))) if pick != LayoutPick::Current => {
                                    parts_then(history.version(*v), &node_id, &gpu.uuid, mig)
                                }
                                (Some(()), _) => past_parts.get(i).cloned().unwrap_or_default(),
                                _ => Vec::new(),
                            };
                            // Each part booked per GPU under its own key.
                            let on: Vec<OnGpu<'_, Arc<str>>> = mig
                                .parts
                                .iter()
                                .enumerate()
                                .map(|(k, p)| {
                                    let tenant = match then.get(k) {
                                        Some(t) if then.len() == mig.parts.len() => t,
                                        _ => &p.tenant,
                                    };
                                    OnGpu {
                                        tenant,
                                        gpu: &p.uuid,
                                    }
                                })
                                .collect();
                            let parts: Vec<(&OnGpu<'_, Arc<str>>, u64)> = on
                                .iter()
                                .zip(&mig.parts)
                                .map(|(o, p)| (o, p.weight))
                                .collect();
                            let shares = applied.book_parts(&mut booked, &parts, window);
                            for ((o, _), share) in parts.iter().zip(&shares) {
                                add(o.tenant, *share);
                            }
                            counted = mig
                                .parts
                                .iter()
                                .map(|p| p.uuid.clone())
                                .zip(shares)
                                .collect();
                        }
                    }
                    gpu.count_part_energy(&counted);
                }
                // Node power: a bad reading is dropped alone, the sample
                // (its GPU data) stays accepted.
                for r in s.node_power {
                    if let Err(reason) = check_node_power(&r, n.power.len(), latest, oldest) {
                        out.node_power.rejected[reason as usize] += 1;
                        continue;
                    }
                    let source = &mut n.power[r.source as usize];
                    if !source.follows(r.timestamp_unix_nanos) {
                        out.node_power.duplicate += 1;
                        continue;
                    }
                    let Some(applied) = source.apply(r, now, latest, window) else {
                        out.node_power.duplicate += 1;
                        continue;
                    };
                    source.sampled_at = sampled_at(r.timestamp_unix_nanos, now, now_ns);
                    out.node_power.accepted += 1;
                    if !source.is_node() {
                        // CPU and DRAM zones are inside the whole-node
                        // reading: live figures only, never added to it.
                        continue;
                    }
                    let source_window = source.window(window);
                    // The tenants of the node's GPUs at the reading, with
                    // what each holds: its whole GPUs, and of a MIG board
                    // the parts it holds (the board's part weights, its
                    // parts' indexes), so that its GPU time over `ns` of
                    // node time is its exact share (`held`).
                    let mut holders: Vec<(Arc<str>, Holding)> = Vec::new();
                    for (i, g) in n.gpus.iter().enumerate() {
                        let tenant = match (&version, &past) {
                            (Some(()), Some((_, tenants))) => &tenants[i],
                            _ => &g.tenant,
                        };
                        // The layout of the sample's reading of the board.
                        let pick = picks.get(i).copied().unwrap_or(LayoutPick::Current);
                        match g.parts_of(pick) {
                            None => Holding::of(&mut holders, tenant).whole += 1,
                            Some(mig) => {
                                let weights: Arc<[u64]> =
                                    mig.parts.iter().map(|p| p.weight).collect();
                                let earlier_then = match (&version, &past) {
                                    (Some(()), Some((v, _))) if pick != LayoutPick::Current => {
                                        parts_then(history.version(*v), &node_id, &g.uuid, mig)
                                    }
                                    _ => Vec::new(),
                                };
                                let then = match (&version, past_parts.get(i)) {
                                    _ if !earlier_then.is_empty() => Some(&earlier_then),
                                    (Some(()), Some(t)) if pick == LayoutPick::Current => Some(t),
                                    _ => None,
                                };
                                for (k, p) in mig.parts.iter().enumerate() {
                                    let t = match then {
                                        Some(t) if t.len() == mig.parts.len() => &t[k],
                                        _ => &p.tenant,
                                    };
                                    let h = Holding::of(&mut holders, t);
                                    match h.boards.last_mut() {
                                        Some((w, ks)) if Arc::ptr_eq(w, &weights) => ks.push(k),
                                        _ => h.boards.push((weights.clone(), vec![k])),
                                    }
                                }
                            }
                        }
                    }
                    if holders.is_empty() {
                        // A node without GPUs: its energy is the tenant's
                        // that leases the node, as if it held one GPU.
                        let tenant = match (&version, &past) {
                            (Some(()), Some((v, _))) => {
                                let t = history.version(*v);
                                t.all()[t.attribute_node(&node_id)].id.clone()
                            }
                            _ => n.tenant.clone(),
                        };
                        holders.push((
                            tenant,
                            Holding {
                                whole: 1,
                                ..Holding::default()
                            },
                        ));
                    }
                    // Node time for every reading; the energy once the
                    // counter books it, split over the stretch since it
                    // last did (`NodeStretch`: a coarse counter's step
                    // over the readings it stood still at, by each
                    // tenant's GPU energy and GPU time in them).
                    for (tenant, holding) in &holders {
                        let held = |ns| holding.held(ns);
                        applied.book_node(&mut booked, tenant, 0, held, source_window);
                        n.stretch.add_reading(tenant, held, &applied, source_window);
                    }
                    if !applied.open {
                        n.stretch.close(&applied, &mut booked, source_window);
                    }
                }
                out.accepted += 1;
            }
            // A refused sample is final: refusing it again on a re-send
            // would change nothing, so the ack moves past it too.
            if let Some(max) = rejected
                .iter()
                .map(|(seq, _)| *seq)
                .filter(|seq| *seq <= n.last_seq.saturating_add(MAX_SEQ_JUMP))
                .max()
            {
                n.last_seq = n.last_seq.max(max);
            }
            out.acked_seq = n.last_seq;
            if out.accepted > 0 {
                n.summarize();
            }
            // Into the next ledger commit, under the node's lock so that
            // cursors and deltas of this node are written in order. The
            // node's cursor is complete (GPUs that left it too): it
            // replaces the one an earlier batch put there.
            let cursor = n.cursor();
            let id = book(booked, &node_id, cursor, &energy);
            out.commit_id = id;
            n.last_commit_id = id;
        }
        out.rejected = rejected;
        Ok(out)
    }
}

/// What one tenant holds of a node's GPUs at a whole-node reading: its
/// whole GPUs, and for each MIG board it holds parts of, the board's part
/// weights and the indexes of its parts.
#[derive(Debug, Default)]
struct Holding {
    whole: u64,
    boards: Vec<(Arc<[u64]>, Vec<usize>)>,
}

impl Holding {
    /// `tenant`'s holding in `holders`, added empty if it has none yet.
    fn of<'a>(holders: &'a mut Vec<(Arc<str>, Holding)>, tenant: &Arc<str>) -> &'a mut Holding {
        let at = match holders.iter().position(|(h, _)| h == tenant) {
            Some(at) => at,
            None => {
                holders.push((tenant.clone(), Holding::default()));
                holders.len() - 1
            }
        };
        &mut holders[at].1
    }

    /// The tenant's GPU time over `ns` of node time: `ns` for each whole
    /// GPU, and of a MIG board its parts of the exact split of `ns` by the
    /// board's weights (the split of GPU time in `Applied::book_parts`),
    /// so the tenants of a board hold `ns` between them.
    fn held(&self, ns: u64) -> u64 {
        let mut held = ns.saturating_mul(self.whole);
        for (weights, ks) in &self.boards {
            let split = split_by_weight(weights.iter().copied())(ns);
            for &k in ks {
                held = held.saturating_add(split[k]);
            }
        }
        held
    }
}

/// The tenants of a MIG layout's parts under the tenant file version `t`
/// (a reading from before a lease change, split by a layout the board had
/// before its current one).
fn parts_then(
    t: &crate::tenants::Tenants,
    node: &str,
    board: &str,
    mig: &super::node::MigParts,
) -> Vec<Arc<str>> {
    mig.parts
        .iter()
        .map(|p| {
            t.all()[t.attribute_instance(node, &p.uuid, board)]
                .id
                .clone()
        })
        .collect()
}
