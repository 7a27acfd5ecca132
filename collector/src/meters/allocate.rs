//! Allocating each final meter-minute to the tenants under the meter.
//!
//! A minute is final once it ends at or before the ledger's watermark and
//! no node under the meter that is still reading may book energy into it
//! (a coarse whole-node counter spreads its next step back to its last
//! change: `held_to`): its buckets (what the meter's nodes measured) no
//! longer change. The
//! meter's energy in it is the difference of its cumulative energy,
//! interpolated at the minute's two boundaries (`accounting::facility`),
//! counted from the reading the ledger's state row names, so whichever
//! collector allocates the next minutes counts on from the same point;
//! each minute is split among the tenants by their measured energy
//! (`accounting::facility::allocate`), and written with the state row
//! moved in one transaction (`LedgerWriter::allocate_meter`).
//!
//! Energy booked for an allocated minute after its split (a spool delivered
//! late) is split into it again by a later round: each meter's state keeps
//! the ledger revision its minutes are split as of, and a round replaces
//! the parts of the minutes that adjustments booked since then change
//! (`late_minutes`, `split_again`), booking each tenant's change.
//!
//! *Invariant:* the minutes a meter allocated add up to its energy between
//! the first boundary and the last, exactly; each minute's parts add up to
//! its metered energy; a minute is allocated once, and split again once for
//! each revision's late energy.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::accounting::facility::{Reading, Step, allocate, energy_at};
use crate::ledger::{
    AnyReader, AnyWriter, LedgerError, LedgerReader, LedgerWriter, MeterMinute, MeterResplit,
    MeterShare, MeterState, NodeMinute, PlacingHold,
};
use crate::sync::lock;

use super::spec::MeterSpec;
use super::{Board, Meter};

const MINUTE: i64 = 60;
const NS: i64 = 1_000_000_000;

/// How recent a node's newest power reading must be, before the
/// watermark, for the node to hold its meter's allocation: a node whose
/// readings stopped longer ago holds nothing (its meter is not left
/// waiting on a node that may never read again), and energy it books
/// later into allocated minutes is split into them again by a later round
/// (`split_again`).
pub const HOLD_WHILE_SEEN_WITHIN: i64 = 15 * MINUTE;

/// The first minute of `[from, to)` a node under `spec` may still add
/// energy to (`LedgerReader::placing_holds`), `to` where none may: the
/// minutes a round allocates end there. A coarse whole-node counter's
/// step is spread back over the minutes since it last changed; until it
/// steps, those minutes' node energy is not all in the ledger, and a
/// split made then would give the meter's energy to the other tenants.
/// Also returns how many such nodes hold minutes before `to`.
pub fn held_to(spec: &MeterSpec, holds: &[PlacingHold], watermark: i64, to: i64) -> (i64, u64) {
    holds
        .iter()
        .filter(|h| {
            h.seen >= watermark - HOLD_WHILE_SEEN_WITHIN
                && h.from_minute < to
                && spec.covers(&h.node)
        })
        .fold((to, 0), |(to, n), h| (to.min(h.from_minute), n + 1))
}

/// Most minutes one round allocates per meter (an hour): a meter catching
/// up after a long outage does so an hour per round, so no round holds
/// the ledger for long; commits go on between rounds.
pub const MAX_MINUTES_PER_ROUND: i64 = 60;

/// The energy (mJ) from raw reading `prev` to `now`, `elapsed_ns` later:
/// the counts of a plausible step (`MeterSpec::step`, as when polled)
/// times the energy per count; 0 across a reset or an implausible step.
pub fn raw_delta(spec: &MeterSpec, prev: u64, now: u64, elapsed_ns: i64) -> u64 {
    match spec.step(prev, now, elapsed_ns) {
        Step::Forward(n) | Step::Wrapped(n) => spec.energy_of(n).unwrap_or(0),
        Step::Reset | Step::OutOfRange | Step::Implausible => 0,
    }
}

/// What one round writes for a meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub next: MeterState,
    pub minutes: Vec<MeterMinute>,
}

/// The range of minutes a round may allocate: `[from, to)`, or `None`
/// when there is nothing to do yet.
pub fn window(
    state: Option<&MeterState>,
    raw: &[(i64, u64)],
    watermark: i64,
) -> Option<(i64, i64)> {
    let from = match state {
        Some(s) => s.allocated_through,
        None => first_boundary(raw.first()?.0),
    };
    let newest = raw.last()?.0;
    let to = watermark
        .min(newest.div_euclid(NS * MINUTE) * MINUTE)
        .min(from + MAX_MINUTES_PER_ROUND * MINUTE);
    Some((from, to))
}

/// The first minute boundary at or after `at_ns`.
fn first_boundary(at_ns: i64) -> i64 {
    let m = at_ns.div_euclid(NS * MINUTE) * MINUTE;
    if m * NS == at_ns { m } else { m + MINUTE }
}

/// The next step of a meter's allocation from `state` (none: its first),
/// with its raw readings `raw` (time order, (Unix ns, raw value)), every
/// minute ending at or before `through` (a minute boundary), and
/// `measured` (every node's rows of the minutes in the window, as the
/// ledger held them at `revision`, which the next state keeps).
pub fn plan(
    spec: &MeterSpec,
    state: Option<&MeterState>,
    raw: &[(i64, u64)],
    through: i64,
    measured: &[NodeMinute],
    revision: u64,
) -> Option<Plan> {
    // The cumulative energy from the base reading (0 there) on.
    let (base_at, base_raw) = match state {
        Some(s) => (s.reading_at_ns, s.reading_raw),
        None => *raw.first()?,
    };
    let mut series = vec![Reading {
        at_ns: base_at,
        energy_mj: 0,
    }];
    let mut raws = vec![base_raw];
    let (mut prev_at, mut prev) = (base_at, base_raw);
    for &(at, r) in raw.iter().filter(|(at, _)| *at > base_at) {
        let e = series.last().map_or(0, |p| p.energy_mj) + raw_delta(spec, prev, r, at - prev_at);
        series.push(Reading {
            at_ns: at,
            energy_mj: e,
        });
        raws.push(r);
        (prev_at, prev) = (at, r);
    }
    let (start, mut at_start) = match state {
        Some(s) => (s.allocated_through, s.carry_mj),
        None => {
            let b = first_boundary(base_at);
            (b, energy_at(&series, b * NS)?)
        }
    };
    // Measured and node energy per minute and tenant, over the meter's
    // nodes (measured: the buckets and the adjustments booked for them so
    // far; node: the buckets', which the rows estimate from).
    let mut by_minute: BTreeMap<i64, BTreeMap<&str, (u64, u64)>> = BTreeMap::new();
    for row in measured.iter().filter(|r| spec.covers(&r.node)) {
        let e = by_minute
            .entry(row.minute)
            .or_default()
            .entry(row.tenant.as_str())
            .or_default();
        e.0 = e.0.saturating_add(row.measured_mj);
        e.1 = e.1.saturating_add(row.node_energy_mj);
    }
    let mut minutes = Vec::new();
    let mut minute = start;
    while minute + MINUTE <= through && minute < start + MAX_MINUTES_PER_ROUND * MINUTE {
        let Some(at_end) = energy_at(&series, (minute + MINUTE) * NS) else {
            break;
        };
        // Never below what was allocated already (a boundary another
        // collector interpolated between other readings).
        let at_end = at_end.max(at_start);
        let metered = at_end - at_start;
        let here = by_minute.get(&minute);
        let tenants: Vec<(String, u64)> = here
            .map(|t| t.iter().map(|(k, v)| (k.to_string(), v.0)).collect())
            .unwrap_or_default();
        let measured_mj: u64 = tenants.iter().map(|t| t.1).sum();
        let split = allocate(metered, &tenants);
        let parts: BTreeMap<&str, u64> =
            split.shares.iter().map(|(t, v)| (t.as_str(), *v)).collect();
        minutes.push(MeterMinute {
            minute,
            metered_mj: metered,
            measured_mj,
            unallocated_mj: split.unallocated,
            tenants: tenants
                .iter()
                .map(|(t, m)| {
                    let node = here.and_then(|h| h.get(t.as_str())).map_or(0, |v| v.1);
                    MeterShare::new(t, *m, parts.get(t.as_str()).copied().unwrap_or(0), node)
                })
                .collect(),
        });
        at_start = at_end;
        minute += MINUTE;
    }
    // The new base: the newest reading at or before the last boundary.
    let end_ns = minute * NS;
    let i = series
        .partition_point(|r| r.at_ns <= end_ns)
        .saturating_sub(1);
    let next = MeterState {
        allocated_through: minute,
        reading_at_ns: series[i].at_ns,
        reading_raw: raws[i],
        carry_mj: at_start.saturating_sub(series[i].energy_mj),
        revision,
    };
    if state.is_some() && minutes.is_empty() {
        return None;
    }
    Some(Plan { next, minutes })
}

/// Most allocated minutes one round splits again per meter: a node's
/// spool of days delivered at once is split in over several rounds.
pub const MAX_MINUTES_SPLIT_AGAIN_PER_ROUND: usize = 240;

/// Which of the minutes energy was booked for late to split again this
/// round, and as of which revision: `late` is (revision, minute, node) of
/// each adjustment after the meter's revision, by revision; only nodes
/// `spec` covers count. Whole revisions are taken in order until
/// [`MAX_MINUTES_SPLIT_AGAIN_PER_ROUND`] minutes are reached (one alone
/// may go past it), and the round's revision is the last one taken:
/// everything the round writes is as of it, so a revision is never split
/// into some minutes and not yet into others. Returns the minutes, by
/// time, and that revision (`through` where all are taken).
pub fn late_minutes(
    spec: &MeterSpec,
    late: &[(u64, i64, String)],
    through: u64,
) -> (Vec<i64>, u64) {
    let mut minutes = std::collections::BTreeSet::new();
    let mut i = 0;
    while i < late.len() {
        let revision = late[i].0;
        let end = i + late[i..].partition_point(|l| l.0 == revision);
        let mut taken = minutes.clone();
        taken.extend(
            late[i..end]
                .iter()
                .filter(|l| spec.covers(&l.2))
                .map(|l| l.1),
        );
        if taken.len() > MAX_MINUTES_SPLIT_AGAIN_PER_ROUND && !minutes.is_empty() {
            return (minutes.into_iter().collect(), late[i - 1].0);
        }
        minutes = taken;
        i = end;
    }
    (minutes.into_iter().collect(), through)
}

/// `stored`, an allocated minute of the meter `spec`, split again by what
/// its nodes measured `now` (as of the round's revision) rather than
/// `then` (as of the meter's revision, when its split was last made):
/// each tenant's measured energy changes by the energy booked for it
/// between the two on the nodes `spec` covers, and the same metered
/// energy is split by that (`accounting::facility::allocate`). A part
/// keeps the node energy it replaced; a tenant new to the minute joins
/// only where energy was booked for it, and replaces none (all its
/// energy in the split came late: a bucket of it there is on a node the
/// meter did not cover when the minute was split, and keeps its estimate).
/// `None` where no tenant's measured energy changed.
pub fn split_again(
    spec: &MeterSpec,
    stored: &MeterMinute,
    now: &[NodeMinute],
    then: &[NodeMinute],
) -> Option<MeterResplit> {
    // The change per (tenant, node).
    let mut by_node: BTreeMap<(&str, &str), i128> = BTreeMap::new();
    for (rows, sign) in [(now, 1i128), (then, -1i128)] {
        for r in rows
            .iter()
            .filter(|r| r.minute == stored.minute && spec.covers(&r.node))
        {
            *by_node
                .entry((r.tenant.as_str(), r.node.as_str()))
                .or_default() += sign * i128::from(r.measured_mj);
        }
    }
    // Per tenant, over the nodes whose energy changed only: a node the
    // meter covers now but did not when the minute was split (its node
    // list grew) brings no tenant into the split unless energy was
    // booked for it there since.
    let mut change: BTreeMap<&str, i128> = BTreeMap::new();
    for ((tenant, _), delta) in by_node.into_iter().filter(|(_, d)| *d != 0) {
        *change.entry(tenant).or_default() += delta;
    }
    if change.values().all(|d| *d == 0) {
        return None;
    }
    let old: BTreeMap<&str, &MeterShare> = stored
        .tenants
        .iter()
        .map(|t| (t.tenant.as_str(), t))
        .collect();
    let mut measured: BTreeMap<&str, u64> = old.iter().map(|(t, s)| (*t, s.measured_mj)).collect();
    for (tenant, delta) in &change {
        let e = measured.entry(tenant).or_insert(0);
        let m = (i128::from(*e) + delta).clamp(0, i128::from(u64::MAX));
        *e = u64::try_from(m).unwrap_or(u64::MAX);
    }
    let weights: Vec<(String, u64)> = measured.iter().map(|(t, m)| (t.to_string(), *m)).collect();
    let split = allocate(stored.metered_mj, &weights);
    let parts: BTreeMap<&str, u64> = split.shares.iter().map(|(t, v)| (t.as_str(), *v)).collect();
    let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut changes = Vec::new();
    let mut tenants = Vec::new();
    for (t, m) in &measured {
        let part = parts.get(t).copied().unwrap_or(0);
        // The node energy a part replaces does not change (a tenant new
        // to the minute replaces none): only the part does.
        let (was_part, node) = old.get(t).map_or((0, 0), |s| (s.allocated_mj, s.node_mj));
        let d_part = signed(part) - signed(was_part);
        if d_part != 0 {
            changes.push((t.to_string(), d_part, 0));
        }
        tenants.push(MeterShare::new(t, *m, part, node));
    }
    Some(MeterResplit {
        minute: MeterMinute {
            minute: stored.minute,
            metered_mj: stored.metered_mj,
            measured_mj: tenants.iter().map(|t| t.measured_mj).sum(),
            unallocated_mj: split.unallocated,
            tenants,
        },
        changes,
    })
}

/// The allocated minutes of `spec` whose split the energy booked for them
/// after the meter's revision `state.revision`, through `through`,
/// changes (`late`: where it was booked, as
/// `LedgerReader::late_in_meter_minutes` reads it), read on `r` and
/// split again (`split_again`).
fn splits_again<R: LedgerReader + ?Sized>(
    r: &R,
    spec: &MeterSpec,
    state: &MeterState,
    late: &[(u64, i64, String)],
    through: u64,
) -> Result<Vec<MeterResplit>, LedgerError> {
    let upto = late.partition_point(|l| l.0 <= through);
    let (minutes, _) = late_minutes(spec, &late[..upto], through);
    let mut again = Vec::new();
    // Runs of consecutive minutes, read a run at a time.
    let mut i = 0;
    while i < minutes.len() {
        let mut j = i + 1;
        while j < minutes.len() && minutes[j] == minutes[j - 1] + MINUTE {
            j += 1;
        }
        let (lo, hi) = (minutes[i], minutes[j - 1] + MINUTE);
        let stored = r.meter_minutes(Some(&spec.id), lo, hi)?;
        let now = r.node_minutes_as_of(lo, hi, through)?;
        let then = r.node_minutes_as_of(lo, hi, state.revision)?;
        for (_, mm) in &stored {
            if let Some(a) = split_again(spec, mm, &now, &then) {
                again.push(a);
            }
        }
        i = j;
    }
    Ok(again)
}

/// One round for `meter` alone (see [`round_all`]).
pub fn round<R: LedgerReader>(
    meter: &Meter,
    reader: &Mutex<R>,
    ledger: &Mutex<AnyWriter>,
) -> Result<Vec<MeterMinute>, LedgerError> {
    round_all(&[meter], reader, ledger)
        .map(|mut v| v.pop().unwrap_or_default())
        .map_err(|(_, e)| e)
}

/// One round for `meters`: reads where each one's allocation stands and
/// the measured minutes of all of them in one query, on `reader` (a read
/// connection: commits do not wait for these reads), plans each and
/// writes it through `ledger`, whose mutex is held for each write only.
/// Each write is a conditional update of the meter's state row, so a plan
/// made on a state that moved meanwhile writes nothing (allocated once). Only rows of metered nodes are kept,
/// each node matched against the meters once. Returns each meter's minutes
/// written (none where there was nothing to do or another collector
/// allocated first), or the first meter whose round failed and why.
pub fn round_all<R: LedgerReader>(
    meters: &[&Meter],
    reader: &Mutex<R>,
    ledger: &Mutex<AnyWriter>,
) -> Result<Vec<Vec<MeterMinute>>, (String, LedgerError)> {
    let every = |e| ("every meter".to_string(), e);
    let mut work = Vec::with_capacity(meters.len());
    // What the meters' nodes measured as of each revision some meter's
    // round is as of (all of them, nearly always), from one query each.
    let mut measured: BTreeMap<u64, Vec<NodeMinute>> = BTreeMap::new();
    let mut agains: Vec<Vec<MeterResplit>> = Vec::with_capacity(meters.len());
    {
        let w = lock(reader);
        // Read first: every adjustment up to it is committed, and each
        // meter's round is as of it or of an earlier one.
        let revision = w.revision().map_err(every)?;
        let watermark = w.finalized_through().map_err(every)?;
        let holds = w.placing_holds().map_err(every)?;
        let mut ranges: BTreeMap<u64, (i64, i64)> = BTreeMap::new();
        for m in meters {
            let id = || m.spec.id.clone();
            let raw: Vec<(i64, u64)> = lock(&m.live).raw.iter().copied().collect();
            let state = w.meter_state(&m.spec.id).map_err(|e| (id(), e))?;
            // A state newer than the revision read: another collector
            // allocated meanwhile; this round's reads are behind it.
            if state.is_some_and(|s| s.revision > revision) {
                work.push((raw, state, None, Vec::new(), revision));
                continue;
            }
            let late = match &state {
                Some(s) if s.revision < revision => w
                    .late_in_meter_minutes(&m.spec.id, s.revision, revision)
                    .map_err(|e| (id(), e))?,
                _ => Vec::new(),
            };
            let (_, as_of) = late_minutes(&m.spec, &late, revision);
            let mut holding = 0;
            let range = window(state.as_ref(), &raw, watermark).map(|(from, to)| {
                let (to, n) = held_to(&m.spec, &holds, watermark, to);
                holding = n;
                (from, to)
            });
            {
                let mut live = lock(&m.live);
                live.holding_nodes = holding;
                live.allocated_through = state.as_ref().map(|s| s.allocated_through);
            }
            if let Some((from, to)) = range
                && to >= from + MINUTE
            {
                let r = ranges.entry(as_of).or_insert((from, to));
                *r = (r.0.min(from), r.1.max(to));
            }
            work.push((raw, state, range, late, as_of));
        }
        for (as_of, (lo, hi)) in ranges {
            let rows = w.node_minutes_as_of(lo, hi, as_of).map_err(every)?;
            measured.insert(as_of, metered_rows(meters, rows));
        }
        // The minutes split again, on the same read connection.
        for (m, (_, state, _, late, as_of)) in meters.iter().zip(work.iter_mut()) {
            let again = match state {
                Some(s) if s.revision < *as_of => splits_again(&*w, &m.spec, s, late, *as_of)
                    .map_err(|e| (m.spec.id.clone(), e))?,
                _ => Vec::new(),
            };
            agains.push(again);
        }
    }
    let mut written = Vec::with_capacity(meters.len());
    for ((m, (raw, state, range, late, as_of)), again) in meters.iter().zip(work).zip(agains) {
        let rows = measured.get(&as_of).map_or(&[][..], Vec::as_slice);
        let planned =
            range.and_then(|(_, to)| plan(&m.spec, state.as_ref(), &raw, to, rows, as_of));
        let plan = match (planned, state) {
            (Some(p), _) => p,
            // Nothing new to allocate, but minutes to split again, or late
            // energy in its minutes that changed no split (none of its
            // nodes', or no measured energy): the state moves to the
            // revision alone, so no round reads that energy again.
            (None, Some(s)) if !again.is_empty() || late.iter().any(|l| l.0 <= as_of) => Plan {
                next: MeterState {
                    revision: as_of,
                    ..s
                },
                minutes: Vec::new(),
            },
            (None, _) => {
                written.push(Vec::new());
                continue;
            }
        };
        let id = &m.spec.id;
        let moved = lock(ledger)
            .allocate_meter_again(id, state.as_ref(), &plan.next, &plan.minutes, &again)
            .map_err(|e| (id.clone(), e))?;
        if !moved {
            debug!(meter = %id, "another collector allocated these minutes first");
            written.push(Vec::new());
            continue;
        }
        let mut live = lock(&m.live);
        live.allocated_through = Some(plan.next.allocated_through);
        live.minutes_split_again = live.minutes_split_again.saturating_add(again.len() as u64);
        for mm in &plan.minutes {
            live.allocated_mj = live.allocated_mj.saturating_add(mm.metered_mj);
            live.measured_mj = live.measured_mj.saturating_add(mm.measured_mj);
            if mm.measured_mj > 0 {
                let ppm = u128::from(mm.metered_mj) * 1_000_000 / u128::from(mm.measured_mj);
                live.ratio_ppm = Some(u64::try_from(ppm).unwrap_or(u64::MAX));
            }
        }
        // Readings before the new base are not needed again.
        let keep_from = plan.next.reading_at_ns;
        while live.raw.front().is_some_and(|(at, _)| *at < keep_from) {
            live.raw.pop_front();
        }
        written.push(plan.minutes);
    }
    Ok(written)
}

/// The rows of nodes some meter of `meters` covers, each distinct node
/// matched once (globs are not cheap, and most rows are of other nodes).
/// A node under two meters or more (globs that overlap, which the config
/// check cannot rule out) would be billed once per meter: each meter's
/// `nodes_overlapping` says how many it shares, logged when it changes.
fn metered_rows(meters: &[&Meter], rows: Vec<NodeMinute>) -> Vec<NodeMinute> {
    let mut covered: HashMap<String, Vec<usize>> = HashMap::new();
    let rows: Vec<NodeMinute> = rows
        .into_iter()
        .filter(|r| {
            !covered
                .entry(r.node.clone())
                .or_insert_with(|| {
                    (0..meters.len())
                        .filter(|&i| meters[i].spec.covers(&r.node))
                        .collect()
                })
                .is_empty()
        })
        .collect();
    let mut shared = vec![Vec::new(); meters.len()];
    for (node, under) in &covered {
        if under.len() > 1 {
            for &i in under {
                shared[i].push(node.as_str());
            }
        }
    }
    for (m, nodes) in meters.iter().zip(shared) {
        let n = nodes.len() as u64;
        let mut live = lock(&m.live);
        if n > 0 && live.nodes_overlapping != n {
            warn!(meter = %m.spec.id, nodes = ?nodes, "nodes under this meter and another one: each meter allocates all of its energy, so these nodes' tenants are billed for them twice; make the meters' node lists disjoint (capwatch_meter_nodes_overlapping)");
        }
        live.nodes_overlapping = n;
    }
    rows
}

/// Allocates every meter's final minutes every `every`, until `shutdown`.
pub async fn allocate_loop(
    board: Arc<Board>,
    reader: Arc<Mutex<AnyReader>>,
    ledger: Arc<Mutex<AnyWriter>>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (b, r, l) = (board.clone(), reader.clone(), ledger.clone());
        let result = tokio::task::spawn_blocking(move || {
            let meters: Vec<&Meter> = b.meters.iter().collect();
            round_all(&meters, &r, &l).err()
        })
        .await;
        match result {
            Ok(None) => failing = false,
            Ok(Some((meter, e))) => {
                if !failing {
                    warn!(meter = %meter, error = %e, "allocating meter minutes failed; retried next round");
                }
                failing = true;
            }
            Err(e) => warn!(error = %e, "the allocation round ended abnormally"),
        }
    }
}
