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
//! *Invariant:* the minutes a meter allocated add up to its energy between
//! the first boundary and the last, exactly; each minute's parts add up to
//! its metered energy; a minute is allocated once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::accounting::facility::{Reading, Step, allocate, energy_at};
use crate::ledger::{
    AnyReader, AnyWriter, LedgerError, LedgerReader, LedgerWriter, MeterMinute, MeterShare,
    MeterState, NodeMinute, PlacingHold,
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
/// later into allocated minutes is late energy (their facility energy
/// stays the allocation; see the README).
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
/// `measured` (every node's rows of the minutes in the window).
pub fn plan(
    spec: &MeterSpec,
    state: Option<&MeterState>,
    raw: &[(i64, u64)],
    through: i64,
    measured: &[NodeMinute],
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
    };
    if state.is_some() && minutes.is_empty() {
        return None;
    }
    Some(Plan { next, minutes })
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
    let mut work = Vec::with_capacity(meters.len());
    let measured = {
        let w = lock(reader);
        let watermark = w
            .finalized_through()
            .map_err(|e| ("every meter".to_string(), e))?;
        let holds = w
            .placing_holds()
            .map_err(|e| ("every meter".to_string(), e))?;
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        for m in meters {
            let raw: Vec<(i64, u64)> = lock(&m.live).raw.iter().copied().collect();
            let state = w
                .meter_state(&m.spec.id)
                .map_err(|e| (m.spec.id.clone(), e))?;
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
                lo = lo.min(from);
                hi = hi.max(to);
            }
            work.push((raw, state, range));
        }
        if hi > lo {
            w.node_minutes(lo, hi)
                .map_err(|e| ("every meter".to_string(), e))?
        } else {
            Vec::new()
        }
    };
    let measured = metered_rows(meters, measured);
    let mut written = Vec::with_capacity(meters.len());
    for (m, (raw, state, range)) in meters.iter().zip(work) {
        let Some((_, to)) = range else {
            written.push(Vec::new());
            continue;
        };
        let Some(plan) = plan(&m.spec, state.as_ref(), &raw, to, &measured) else {
            written.push(Vec::new());
            continue;
        };
        let id = &m.spec.id;
        let moved = lock(ledger)
            .allocate_meter(id, state.as_ref(), &plan.next, &plan.minutes)
            .map_err(|e| (id.clone(), e))?;
        if !moved {
            debug!(meter = %id, "another collector allocated these minutes first");
            written.push(Vec::new());
            continue;
        }
        let mut live = lock(&m.live);
        live.allocated_through = Some(plan.next.allocated_through);
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
