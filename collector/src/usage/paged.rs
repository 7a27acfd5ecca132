//! Usage in pages (the `/v2/usage` API): any number of rows, for one,
//! several or every tenant, walked in key order (tenant, start) a page at
//! a time with an opaque page token; with `group_by=node`, a row per
//! tenant, node and step, walked in key order (tenant, node, start), the
//! nodes of a tenant those with minutes or rollups in the walk's period;
//! with `group_by=gpu`, a row per tenant, node, GPU and step from the
//! ledger's per-GPU hours, walked in key order (tenant, node, GPU, start),
//! the GPUs of a tenant those with hours in the walk's period.
//!
//! Rows per GPU are whole hours (steps 1h, 1d, month and total, cut on
//! whole UTC hours), and only from when the ledger holds every GPU's
//! figures (`LedgerReader::gpu_rows_from`): a period before is refused,
//! never answered with rows that miss energy. A GPU row holds the GPU's
//! figures; energy booked late for a minute already final is added to it
//! (GPU walks list no adjustments), and its revision is that of the last
//! commit that did so.
//!
//! Each row carries its identity (`id`: tenant, start and end instants)
//! and a revision: for a row that is final, the revision of the last
//! adjustment booked to it (0 for none), so a billing job that kept a row
//! sees it was restated when the revision differs; none (null) for a row
//! that may still change (partial, or facility energy still pending), so
//! that a number kept always stands for figures that no longer change.
//!
//! Every page of one walk lists the adjustments booked after
//! `since_revision` and up to the revision of the walk's first page (kept
//! in the token): asking `since_revision` that revision next time gets the
//! adjustments booked since, each exactly once. A page lists at most
//! `MAX_ADJUSTMENTS`: it ends before the row that would pass them.
//!
//! A page costs its own rows: the request is checked before the ledger is
//! taken (`PageQuery::parse`), and only the page's row boundaries are
//! computed and read, however long the walk (at most ten years). Grouped
//! by node, a page also lists the nodes of each tenant it reaches over the
//! walk's period (one indexed query per tenant).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::cursor::{Cursor, fingerprint};
use super::periods::{Grid, parse_time};
use super::{
    AdjustmentRow, Facility, MAX_ROWS, QueryError, Row, Step, Terms, UsageError, Zone, known_terms,
    parse_revision, report,
};
use crate::accounting::{Contract, Metered};
use crate::ledger::{Adjustment, HOUR, LedgerReader, Span, Usage};
use crate::meters::MeterSpec;
use crate::tenants::{TenantHistory, Tenants};

/// Rows per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 1000;
/// Most rows per page.
pub const MAX_LIMIT: usize = 10_000;
/// Most rows of one tenant a walk may cover: ten years of minutes.
pub const MAX_WALK_ROWS: i64 = 5_300_000;
/// The longest period a walk may cover, whatever its step: ten years.
pub const MAX_WALK_SECONDS: i64 = MAX_WALK_ROWS * 60;
/// Most adjustments one page lists (as many as a v1 answer): a page ends
/// early rather than list more.
pub const MAX_ADJUSTMENTS: usize = MAX_ROWS as usize;

/// The parameters of a request for a page, as the client sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Tenants to answer; none: every tenant the caller may read.
    pub tenants: Vec<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub step: Option<String>,
    pub tz: Option<String>,
    pub anchor: Option<String>,
    pub since_revision: Option<String>,
    pub limit: Option<String>,
    pub page_token: Option<String>,
    /// `tenant` (the default), `node` or `gpu`.
    pub group_by: Option<String>,
}

/// What a row is per: a tenant (the default), one of its nodes, or one
/// of its GPUs on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Tenant,
    Node,
    Gpu,
}

impl GroupBy {
    pub fn parse(v: Option<&str>) -> Result<Self, UsageError> {
        match v {
            None | Some("tenant") => Ok(Self::Tenant),
            Some("node") => Ok(Self::Node),
            Some("gpu") => Ok(Self::Gpu),
            Some(_) => Err(UsageError::Parameter {
                param: "group_by".into(),
                why: "must be tenant, node or gpu",
            }),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Node => "node",
            Self::Gpu => "gpu",
        }
    }
}

/// Refuses rows per GPU that do not start and end on whole UTC hours
/// (the ledger keeps each GPU's figures per hour).
fn check_gpu_bounds(bounds: &[i64], step: Step) -> Result<(), UsageError> {
    let why = "rows per GPU are whole hours: ask 1h, 1d, month or total, with a time zone, anchor, from and to that start and end rows on whole UTC hours";
    if matches!(step, Step::Minute | Step::Quarter) || bounds.iter().any(|b| b % HOUR != 0) {
        return Err(UsageError::Parameter {
            param: "step".into(),
            why,
        });
    }
    Ok(())
}

/// One row of a page: a usage row with its identity and revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PagedRow {
    /// The row's identity: `<start>-<end>-<tenant>`, start and end in
    /// Unix seconds, and `/<node>` after it in rows grouped by node,
    /// `/<node>/<gpu>` in rows grouped by GPU (tenant ids hold no `/`). Rows of the same id cover the same
    /// minutes, whatever the step, time zone or anchor that cut them, and
    /// have the same figures at the same revision.
    pub id: String,
    /// The node, in rows grouped by node or GPU (absent in rows per
    /// tenant). Such a row holds the tenant's figures on that node (or
    /// GPU) alone; what a contract or a meter decides for the whole
    /// tenant is absent from it: contracted power, capacity utilization,
    /// peak demand, p95, time over contract, overage and facility energy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The GPU, in rows grouped by GPU: the board's UUID, or for a part of
    /// a MIG board the MIG instance's UUID (its slices in no instance: the
    /// board's UUID). Such a row holds GPU figures only: whole-node energy
    /// is not per GPU, so `node_energy_*` are 0 and `node_coverage` is
    /// absent, besides what node rows leave out; `basis` is `gpu` (its
    /// power is GPU power). Its figures include energy booked late for
    /// minutes already final (no adjustments are listed for it), and its
    /// `revision` is that of the last commit that booked such energy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// The step of the query that cut the row.
    pub step: String,
    /// For a final row (neither `partial` nor `facility_energy_pending`),
    /// the revision of the last adjustment booked to it (0: none), up to
    /// the page's `revision`; null for one that may still change. A final
    /// row whose revision differs from the one kept was restated.
    pub revision: Option<u64>,
    #[serde(flatten)]
    pub usage: Row,
}

/// A page of usage rows.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page {
    pub from: String,
    pub to: String,
    pub step: String,
    pub time_zone: String,
    /// Where daily or monthly rows are anchored, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
    /// The tenants the walk covers, in the order of the rows.
    pub tenants: Vec<String>,
    /// Rows ending at or before this never change (the ledger's
    /// watermark); energy that arrives later for them is an adjustment.
    pub finalized_through: String,
    /// The revision of the walk's first page: adjustments are listed up to
    /// it on every page. Ask `since_revision` this next time.
    pub revision: u64,
    /// What each row is per: `tenant`, `node` or `gpu`.
    pub group_by: String,
    /// Ordered by tenant, then (grouped by node or GPU) node, then
    /// (grouped by GPU) GPU, then start.
    pub rows: Vec<PagedRow>,
    /// Late deltas to the page's rows that were already final, booked
    /// after `since_revision` and up to `revision`.
    pub adjustments: Vec<AdjustmentRow>,
    /// Pass as `page_token`, with the same other parameters, for the next
    /// page; null on the last page.
    pub next_page_token: Option<String>,
}

fn parse_limit(v: Option<&str>) -> Result<usize, UsageError> {
    match v {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| UsageError::Limit(text.to_string())),
    }
}

/// The highest revision of the adjustments to each row of `bounds`.
fn row_revisions(bounds: &[i64], adjustments: &[Adjustment]) -> Vec<u64> {
    let mut out = vec![0; bounds.len().saturating_sub(1)];
    let (first, last) = (bounds[0], bounds[bounds.len() - 1]);
    for a in adjustments {
        if a.minute_start >= first && a.minute_start < last {
            let row = bounds.partition_point(|b| *b <= a.minute_start) - 1;
            out[row] = out[row].max(a.revision);
        }
    }
    out
}

/// A row's identity: its tenant (and node, grouped by node) and the
/// instants it starts and ends at (Unix seconds), whatever the step,
/// time zone or anchor that cut it.
fn row_id(tenant: &str, node: Option<&str>, gpu: Option<&str>, start: i64, end: i64) -> String {
    match (node, gpu) {
        (None, _) => format!("{start}-{end}-{tenant}"),
        (Some(node), None) => format!("{start}-{end}-{tenant}/{node}"),
        (Some(node), Some(gpu)) => format!("{start}-{end}-{tenant}/{node}/{gpu}"),
    }
}

/// A node row: the figures that are the tenant's as a whole taken out.
fn node_row(mut row: Row) -> Row {
    row.contracted_power_watts = None;
    row.capacity_utilization = None;
    row.peak_demand_watts = None;
    row.p95_power_watts = None;
    row.seconds_over_contract = None;
    row.overage_kwh = None;
    row.facility_energy_millijoules = None;
    row.facility_energy_kwh = None;
    row.facility_energy_estimated = false;
    row.facility_energy_pending = false;
    row
}

/// A GPU row: a node row without the whole-node figures either.
fn gpu_row(row: Row) -> Row {
    let mut row = node_row(row);
    row.node_energy_millijoules = 0;
    row.node_energy_kwh = 0.0;
    row.node_energy_estimated = false;
    row.node_coverage = None;
    row
}

/// One GPU's hours as a usage the report reads: each hour a span taken
/// as a rollup (no quarter-hours inside it), with the revision of each
/// row of `bounds` (the highest of its hours').
fn gpu_spans(tenant: &str, g: &crate::ledger::GpuUsage, bounds: &[i64]) -> (Usage, Vec<u64>) {
    let mut revisions = vec![0; bounds.len().saturating_sub(1)];
    let spans = g
        .hours
        .iter()
        .map(|h| {
            if let Some(first) = bounds.first()
                && h.start >= *first
            {
                let row = bounds.partition_point(|b| *b <= h.start) - 1;
                if let Some(r) = revisions.get_mut(row) {
                    *r = (*r).max(h.revision);
                }
            }
            let span = Span {
                start: h.start,
                seconds: HOUR,
                delta: h.delta,
                peak_quarter_mj: Some(0),
                node_peak_quarter_mj: Some(0),
                metered: Metered::NONE,
                facility_peak_quarter_mj: None,
            };
            (tenant.to_string(), span)
        })
        .collect();
    let usage = Usage {
        spans,
        minutes_from: i64::MAX,
        hours_from: i64::MIN,
        days_from: i64::MIN,
        revision: g.revision,
        finalized_through: g.finalized_through,
        adjustments: Vec::new(),
    };
    (usage, revisions)
}

/// A page request checked: everything that needs no ledger, done before
/// the ledger is taken (a bad request costs no one else anything).
#[derive(Debug, Clone)]
pub struct PageQuery {
    since: u64,
    limit: usize,
    step: Step,
    zone: Zone,
    anchor: Option<i64>,
    grid: Grid,
    group_by: GroupBy,
    /// The tenants asked, sorted, without repeats; none: every tenant.
    asked: Vec<String>,
    query: [u8; 32],
    /// Where the walk goes on: the cursor and the index of its row.
    cursor: Option<(Cursor, i64)>,
}

impl PageQuery {
    pub fn parse(req: &PageRequest) -> Result<Self, UsageError> {
        let since = parse_revision(req.since_revision.as_deref())?;
        let limit = parse_limit(req.limit.as_deref())?;
        let group_by = GroupBy::parse(req.group_by.as_deref())?;
        let zone = Zone::parse(req.tz.as_deref())?;
        let step = Step::parse(req.step.as_deref().unwrap_or("1h"))?;
        let from = parse_time("from", req.from.as_deref())?;
        let to = parse_time("to", req.to.as_deref())?;
        let anchor = match req.anchor.as_deref() {
            Some(a) => Some(parse_time("anchor", Some(a))?),
            None => None,
        };
        let grid = Grid::build(from, to, step, &zone, anchor, MAX_WALK_ROWS)?;
        if group_by == GroupBy::Gpu {
            // The period's ends here; each page's rows where it is read.
            check_gpu_bounds(&[from, to], step)?;
            // Refused rather than taken and ignored.
            if req.since_revision.is_some() {
                return Err(UsageError::Parameter {
                    param: "since_revision".into(),
                    why: "rows per GPU list no adjustments (energy booked late is in the rows): compare each row's revision with the one kept instead",
                });
            }
        }
        // Every step: a walk covers at most ten years.
        if to - from > MAX_WALK_SECONDS {
            return Err(UsageError::TooManyRows {
                rows: grid.rows(),
                max: grid.rows() * MAX_WALK_SECONDS / (to - from),
            });
        }
        let mut asked: Vec<String> = req.tenants.clone();
        asked.sort_unstable();
        asked.dedup();
        let anchor_text = anchor.map(|a| a.to_string()).unwrap_or_default();
        let asked_text = asked.join("\n");
        let (from_text, to_text, since_text) =
            (from.to_string(), to.to_string(), since.to_string());
        let parts = [
            asked_text.as_str(),
            &from_text,
            &to_text,
            step.label(),
            &zone.name,
            &anchor_text,
            &since_text,
            group_by.label(),
        ];
        let query = fingerprint(&parts);
        // A walk begun before rows per node (its tokens bound no
        // group_by) goes on, rows per tenant.
        let query_v1 = (group_by == GroupBy::Tenant).then(|| fingerprint(&parts[..7]));
        // An empty token is the first page (as clients send it there).
        let cursor = match req.page_token.as_deref().filter(|t| !t.trim().is_empty()) {
            Some(t) => {
                let c = Cursor::decode(t, &query, query_v1.as_ref())?;
                let row = grid.row_starting_at(c.start).ok_or(UsageError::PageToken(
                    "does not point at a row of this query",
                ))?;
                Some((c, row))
            }
            None => None,
        };
        Ok(Self {
            since,
            limit,
            step,
            zone,
            anchor,
            grid,
            group_by,
            asked,
            query,
            cursor,
        })
    }
}

/// Answers one page from the ledger, as `super::run` answers a whole
/// report (the same rows, the same contracts and facility energy). Reads
/// and computes only the page's rows, however long the walk.
pub fn page(
    reader: &dyn LedgerReader,
    tenants: &Tenants,
    history: &TenantHistory,
    meters: &[MeterSpec],
    pq: &PageQuery,
) -> Result<Page, QueryError> {
    let (grid, since, limit) = (&pq.grid, pq.since, pq.limit);
    let (from, to) = (
        grid.bounds(0, 0)?[0],
        grid.bounds(grid.rows(), grid.rows())?[0],
    );
    let sub_query = |lo: i64, hi: i64| -> Result<super::Query, UsageError> {
        let bounds = grid.bounds(lo, hi)?;
        Ok(super::Query {
            from: bounds[0],
            to: bounds[bounds.len() - 1],
            step: pq.step,
            zone: pq.zone.clone(),
            anchor: pq.anchor,
            bounds,
        })
    };

    // The revision first, then the tenants: every tenant with energy at
    // or before the revision is listed.
    let probe = reader.usage_since(None, from, from, u64::MAX)?;
    grid.check_detail(&probe)?;
    if since > probe.revision {
        return Err(UsageError::RevisionAhead {
            since,
            revision: probe.revision,
        }
        .into());
    }
    if pq.group_by == GroupBy::Gpu {
        match reader.gpu_rows_from()? {
            None => return Err(UsageError::GpuRowsOff.into()),
            Some(since) if from < since => {
                return Err(UsageError::GpuRowsSince {
                    since: super::rfc3339(since),
                }
                .into());
            }
            Some(_) => {}
        }
    }
    let known = known_terms(reader, tenants)?;
    let mut selected: Vec<Terms> = if pq.asked.is_empty() {
        known
    } else {
        let mut out = Vec::with_capacity(pq.asked.len());
        for id in &pq.asked {
            let t = known
                .iter()
                .find(|t| t.tenant == *id)
                .ok_or_else(|| UsageError::UnknownTenant(id.to_string()))?;
            out.push(t.clone());
        }
        out
    };
    selected.sort_by(|a, b| a.tenant.cmp(&b.tenant));

    let pinned = pq.cursor.as_ref().map_or(probe.revision, |c| c.0.revision);
    if pinned > probe.revision {
        return Err(
            UsageError::PageToken("is ahead of this ledger: it comes from another one").into(),
        );
    }

    let per_tenant = grid.rows();
    // What a tenant's rows are per: the tenant itself, each node it has
    // minutes or rollups on in the walk's period, in node order, or each
    // GPU it has hours of then, in (node, GPU) order.
    type Unit = (Option<String>, Option<String>);
    // Sorted here, in the byte order the page token's key is compared
    // in, whatever the database's collation sorted them by.
    let units_of = |tenant: &str| -> Result<Vec<Unit>, QueryError> {
        let mut units: Vec<Unit> = match pq.group_by {
            GroupBy::Tenant => vec![(None, None)],
            GroupBy::Node => reader
                .usage_nodes(tenant, from, to)?
                .into_iter()
                .map(|n| (Some(n), None))
                .collect(),
            GroupBy::Gpu => reader
                .usage_gpus(tenant, from, to)?
                .into_iter()
                .map(|(n, g)| (Some(n), Some(g)))
                .collect(),
        };
        units.sort_unstable();
        units.dedup();
        Ok(units)
    };
    // Where the walk is: tenant, unit of the tenant (its units once
    // read), row of the unit.
    let (mut ti, mut ui, mut bi, mut units) = match &pq.cursor {
        None => (0, 0, 0, None),
        Some((c, row)) => {
            let ti = selected.partition_point(|t| t.tenant.as_str() < c.tenant.as_str());
            if selected.get(ti).is_some_and(|t| t.tenant == c.tenant) {
                let units = units_of(&c.tenant)?;
                let key = match pq.group_by {
                    GroupBy::Tenant => (None, None),
                    GroupBy::Node => (Some(c.node.clone()), None),
                    GroupBy::Gpu => (Some(c.node.clone()), Some(c.gpu.clone())),
                };
                let ui = units.partition_point(|u| *u < key);
                if units.get(ui) == Some(&key) {
                    (ti, ui, row + 1, Some(units))
                } else {
                    // Its node is gone from the list: on from the next one.
                    (ti, ui, 0, Some(units))
                }
            } else {
                // Its tenant is gone from the list: on from the next one.
                (ti, 0, 0, None)
            }
        }
    };

    let contracts = history.contract_terms_by_tenant();
    let mut rows = Vec::new();
    let mut adjustments = Vec::new();
    let mut finalized = probe.finalized_through;
    let mut last: Option<(String, Unit, i64)> = None;
    'page: while rows.len() < limit && ti < selected.len() {
        if units.is_none() {
            units = Some(units_of(&selected[ti].tenant)?);
        }
        let Some(unit) = units.as_ref().and_then(|u| u.get(ui)).cloned() else {
            (ti, ui, bi, units) = (ti + 1, 0, 0, None);
            continue;
        };
        if bi >= per_tenant {
            (ui, bi) = (ui + 1, 0);
            continue;
        }
        let take = ((limit - rows.len()) as i64).min(per_tenant - bi);
        let mut terms = selected[ti].clone();
        terms.contracts = contracts
            .get(terms.tenant.as_str())
            .cloned()
            .unwrap_or_else(|| vec![(i64::MIN, Contract::default())]);
        let sub = sub_query(bi, bi + take)?;
        let (lo, hi) = sub.read_range();
        let (node, gpu) = (unit.0.clone(), unit.1.clone());
        // The meters' allocation is the tenant's: node and GPU rows have
        // none.
        let (usage, revisions, facility) = match (&node, &gpu) {
            (Some(n), Some(g)) => {
                check_gpu_bounds(&sub.bounds, pq.step)?;
                let (first, end) = (sub.bounds[0], sub.bounds[sub.bounds.len() - 1]);
                let hours = reader.gpu_usage(&terms.tenant, n, g, first, end)?;
                // Checked again in the read itself: a compaction or a
                // writer without per-GPU rows since the check above must
                // not make hours it emptied read as final zeros.
                match hours.complete_from {
                    None => return Err(UsageError::GpuRowsOff.into()),
                    Some(since) if first < since => {
                        return Err(UsageError::GpuRowsSince {
                            since: super::rfc3339(since),
                        }
                        .into());
                    }
                    Some(_) => {}
                }
                // On GPU energy: GPU rows' power is GPU power.
                terms.contracts = vec![(i64::MIN, Contract::gpu(0))];
                let (usage, revisions) = gpu_spans(&terms.tenant, &hours, &sub.bounds);
                (usage, revisions, Facility::NONE)
            }
            _ => {
                let (mut usage, facility) = match &node {
                    None => {
                        let (usage, allocation) = reader.usage_allocated_since(
                            Some(&terms.tenant),
                            lo,
                            hi,
                            0,
                            !meters.is_empty(),
                        )?;
                        // As of the walk's revision, like its adjustments:
                        // an allocation booked since is the next walk's.
                        let mut f = Facility::of(meters, &allocation);
                        f.as_of(&usage.adjustments, pinned);
                        (usage, f)
                    }
                    Some(n) => (
                        reader.node_usage_since(&terms.tenant, n, lo, hi, 0)?,
                        Facility::NONE,
                    ),
                };
                sub.check_detail(&usage)?;
                usage.adjustments.retain(|a| a.revision <= pinned);
                let revisions = row_revisions(&sub.bounds, &usage.adjustments);
                usage.adjustments.retain(|a| a.revision > since);
                (usage, revisions, facility)
            }
        };
        finalized = finalized.min(usage.finalized_through);
        let r = report(&sub, std::slice::from_ref(&terms), &usage, &facility);
        // The adjustments of each row (they come in row order within a
        // revision, so count them per row first).
        let mut per_row = vec![0usize; r.rows.len()];
        let mut row_of = std::collections::HashMap::new();
        for (i, row) in r.rows.iter().enumerate() {
            row_of.insert(row.start.as_str(), i);
        }
        for a in &r.adjustments {
            if let Some(i) = row_of.get(a.start.as_str()) {
                per_row[*i] += 1;
            }
        }
        let mut kept = 0;
        for (i, (row, revision)) in r.rows.iter().zip(revisions).enumerate() {
            // A page holds at most MAX_ADJUSTMENTS adjustments: the page
            // ends before a row that would pass it; a row that passes it
            // alone cannot be answered.
            if adjustments.len() + per_row[i] > MAX_ADJUSTMENTS {
                if rows.is_empty() {
                    return Err(UsageError::TooManyAdjustments {
                        count: per_row[i],
                        since,
                        max: MAX_ADJUSTMENTS as i64,
                    }
                    .into());
                }
                break;
            }
            adjustments.extend(
                r.adjustments
                    .iter()
                    .filter(|a| a.start == row.start)
                    .cloned(),
            );
            let (start, end) = (sub.bounds[i], sub.bounds[i + 1]);
            let unsettled = row.partial || row.facility_energy_pending;
            rows.push(PagedRow {
                id: row_id(&terms.tenant, node.as_deref(), gpu.as_deref(), start, end),
                node: node.clone(),
                gpu: gpu.clone(),
                step: pq.step.label().to_string(),
                revision: (!unsettled).then_some(revision),
                usage: match (&node, &gpu) {
                    (None, _) => row.clone(),
                    (Some(_), None) => node_row(row.clone()),
                    (Some(_), Some(_)) => gpu_row(row.clone()),
                },
            });
            kept += 1;
        }
        if kept > 0 {
            last = Some((terms.tenant.clone(), unit.clone(), sub.bounds[kept - 1]));
        }
        bi += kept as i64;
        if kept < r.rows.len() {
            break 'page;
        }
    }
    // Whether a row is left: on past the units this page used up and the
    // tenants with no unit in the period (a tenant with nothing booked
    // on any node), so that no walk ends on an empty page.
    let more = loop {
        if ti >= selected.len() || per_tenant == 0 {
            break false;
        }
        if units.is_none() {
            units = Some(units_of(&selected[ti].tenant)?);
        }
        let n = units.as_ref().map_or(0, Vec::len);
        if ui >= n {
            (ti, ui, bi, units) = (ti + 1, 0, 0, None);
        } else if bi >= per_tenant {
            (ui, bi) = (ui + 1, 0);
        } else {
            break true;
        }
    };
    let next_page_token = last.filter(|_| more).map(|(tenant, (node, gpu), start)| {
        Cursor {
            tenant,
            node: node.unwrap_or_default(),
            gpu: gpu.unwrap_or_default(),
            start,
            revision: pinned,
        }
        .encode(&pq.query)
    });
    Ok(Page {
        from: pq.zone.format(from),
        to: pq.zone.format(to),
        step: pq.step.label().to_string(),
        time_zone: pq.zone.name.clone(),
        anchor: pq.anchor.map(|a| pq.zone.format(a)),
        tenants: selected.into_iter().map(|t| t.tenant).collect(),
        finalized_through: pq.zone.format(finalized),
        revision: pinned,
        group_by: pq.group_by.label().to_string(),
        rows,
        adjustments,
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::*;
    use crate::ledger::{BucketDelta, Commit, Ledger, Reader};

    const T: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z

    fn d(energy_mj: u64) -> BucketDelta {
        BucketDelta {
            energy_mj,
            gpu_ns: 60_000_000_000,
            busy_gpu_ns: 60_000_000_000,
            samples: 60,
            expected_gpu_ns: 60_000_000_000,
            ..BucketDelta::default()
        }
    }

    /// Minute buckets of `tenants` on node n1 from `from` for `minutes`,
    /// each with an energy unique to its tenant and minute.
    fn minutes(tenants: &[&str], from: i64, minutes: i64) -> Commit {
        let mut c = Commit::default();
        for (i, t) in tenants.iter().enumerate() {
            for m in 0..minutes {
                let at = from + m * 60;
                let e = 1_000 * (i as u64 + 1) + (at - T) as u64;
                c.buckets.insert((Arc::from(*t), Arc::from("n1"), at), d(e));
                // As the committer does: the tenant's total with its energy.
                *c.tenant_energy.entry(Arc::from(*t)).or_default() += e;
            }
        }
        c
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        ledger: Ledger,
        reader: Reader,
        tenants: Arc<Tenants>,
    }

    /// A ledger with tenants a and b configured and c only in the ledger,
    /// each with three hours of minutes from T, final through T + 2 h.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut ledger = Ledger::create(&path).unwrap();
        ledger
            .commit_at(&minutes(&["a", "b", "c"], T, 180), T + 7300, T + 7200)
            .unwrap();
        let reader = Reader::open(&path).unwrap();
        let tenants = Arc::new(
            Tenants::from_toml("[[tenant]]\nid = \"a\"\ncontracted_kw = 1\n\n[[tenant]]\nid = \"b\"\ncontracted_kw = 2\n")
                .unwrap(),
        );
        Fixture {
            _dir: dir,
            ledger,
            reader,
            tenants,
        }
    }

    fn request(tenants: &[&str], step: &str, limit: usize) -> PageRequest {
        PageRequest {
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            from: Some(super::super::rfc3339(T)),
            to: Some(super::super::rfc3339(T + 3 * 3600)),
            step: Some(step.into()),
            limit: Some(limit.to_string()),
            ..PageRequest::default()
        }
    }

    fn page_of(f: &Fixture, req: &PageRequest) -> Result<Page, QueryError> {
        let history = TenantHistory::new(f.tenants.clone());
        page(
            &f.reader,
            &f.tenants,
            &history,
            &[],
            &PageQuery::parse(req)?,
        )
    }

    /// Every page of a walk, following `next_page_token`; `between` runs
    /// after each page.
    fn walk(f: &mut Fixture, req: &PageRequest, mut between: impl FnMut(&mut Ledger)) -> Vec<Page> {
        let mut req = req.clone();
        let mut pages = Vec::new();
        loop {
            let p = page_of(f, &req).unwrap();
            let next = p.next_page_token.clone();
            pages.push(p);
            match next {
                Some(t) => req.page_token = Some(t),
                None => return pages,
            }
            between(&mut f.ledger);
            assert!(pages.len() < 1000, "the walk does not end");
        }
    }

    /// A walk begun before rows per node (its token as that version made
    /// it, bound to the query without `group_by`) goes on after an
    /// upgrade with the pages it would have had; grouped by node, such a
    /// token is refused.
    #[test]
    fn a_token_from_before_rows_per_node_goes_on() {
        let f = fixture();
        let req = request(&["a", "b"], "15m", 5);
        let first = page_of(&f, &req).unwrap();
        let q = PageQuery::parse(&req).unwrap();
        let token = first.next_page_token.as_deref().unwrap();
        let c = Cursor::decode(token, &q.query, None).unwrap();
        let v1 = fingerprint(&[
            "a\nb",
            &T.to_string(),
            &(T + 3 * 3600).to_string(),
            "15m",
            "UTC",
            "",
            "0",
        ]);
        let mut next = req.clone();
        next.page_token = first.next_page_token.clone();
        let want = page_of(&f, &next).unwrap();
        next.page_token = Some(c.encode_v1(&v1));
        let json = |p: &Page| serde_json::to_value(p).unwrap();
        assert_eq!(json(&page_of(&f, &next).unwrap()), json(&want));
        next.group_by = Some("node".into());
        let e = page_of(&f, &next).unwrap_err();
        assert!(format!("{e:?}").contains("PageToken"), "{e:?}");
    }

    /// A walk by node ends on its last row: a tenant with no node in the
    /// period (configured, nothing booked) after the last page's rows
    /// makes no empty page after it.
    #[test]
    fn a_walk_by_node_makes_no_empty_last_page() {
        let mut f = fixture();
        f.tenants = Arc::new(
            Tenants::from_toml(
                "[[tenant]]\nid = \"a\"\ncontracted_kw = 1\n\n[[tenant]]\nid = \"b\"\ncontracted_kw = 2\n\n[[tenant]]\nid = \"z\"\ncontracted_kw = 2\n",
            )
            .unwrap(),
        );
        for limit in [1, 3, 4, 9, 10] {
            let mut req = request(&[], "1h", limit);
            req.group_by = Some("node".into());
            let pages = walk(&mut f, &req, |_| {});
            let rows: usize = pages.iter().map(|p| p.rows.len()).sum();
            assert_eq!(rows, 9, "a, b and c on n1, three hours; limit {limit}");
            assert_eq!(pages.len(), 9usize.div_ceil(limit), "limit {limit}");
            assert!(pages.iter().all(|p| !p.rows.is_empty()), "limit {limit}");
        }
    }

    /// Invariant: a walk in pages of any size gives every row of the
    /// whole report once, in key order (tenant, start), with the same
    /// figures.
    #[test]
    fn pages_of_any_size_give_the_whole_reports_rows_once_in_key_order() {
        let mut f = fixture();
        let history = TenantHistory::new(f.tenants.clone());
        let whole = super::super::run(
            &f.reader,
            &f.tenants,
            &history,
            &[],
            None,
            Some(&super::super::rfc3339(T)),
            Some(&super::super::rfc3339(T + 3 * 3600)),
            Some("15m"),
            None,
            None,
        )
        .unwrap();
        let mut want: Vec<Row> = whole.rows.clone();
        want.sort_by(|x, y| (&x.tenant, &x.start).cmp(&(&y.tenant, &y.start)));
        // a, b, c and unassigned, 12 quarter-hours each.
        assert_eq!(want.len(), 48);
        for limit in [1, 5, 12, 13, 47, 48, 10_000] {
            let pages = walk(&mut f, &request(&[], "15m", limit), |_| {});
            assert_eq!(pages.len(), 48usize.div_ceil(limit), "limit {limit}");
            let got: Vec<Row> = pages
                .iter()
                .flat_map(|p| p.rows.iter().map(|r| r.usage.clone()))
                .collect();
            assert_eq!(got, want, "limit {limit}");
            assert!(pages.iter().all(|p| p.rows.len() <= limit));
            assert!(pages.iter().all(|p| p.rows.iter().all(|r| r.step == "15m")));
        }
        // Several tenants: only theirs, whatever order they are asked in.
        let pages = walk(&mut f, &request(&["c", "a", "c"], "1h", 2), |_| {});
        let keys: Vec<(String, String)> = pages
            .iter()
            .flat_map(|p| {
                p.rows
                    .iter()
                    .map(|r| (r.usage.tenant.clone(), r.usage.start.clone()))
            })
            .collect();
        let hours = |t: &'static str| {
            (0..3).map(move |h| (t.to_string(), super::super::rfc3339(T + h * 3600)))
        };
        assert_eq!(keys, hours("a").chain(hours("c")).collect::<Vec<_>>());
        assert_eq!(pages[0].tenants, ["a", "c"]);
    }

    /// Invariant: minutes committed between pages (new energy in partial
    /// rows, late energy for final ones) neither repeat nor skip a row;
    /// every page lists adjustments up to the first page's revision, and
    /// the next walk since that revision gets the later ones, once.
    #[test]
    fn a_walk_is_stable_under_commits_and_keeps_its_first_revision() {
        let mut f = fixture();
        let first = page_of(&f, &request(&[], "15m", 5)).unwrap();
        let pinned = first.revision;
        let mut booked = 0;
        let pages = walk(&mut f, &request(&[], "15m", 5), |l| {
            booked += 1;
            // A late minute of b (final: an adjustment) and new minutes of a.
            let mut c = minutes(&["b"], T + 60 * booked, 1);
            c.buckets
                .extend(minutes(&["a"], T + 7200 + 60 * booked, 1).buckets);
            l.commit_at(&c, T + 7400 + booked, T + 7200).unwrap();
        });
        assert!(booked > 3);
        let keys: Vec<(String, String)> = pages
            .iter()
            .flat_map(|p| {
                p.rows
                    .iter()
                    .map(|r| (r.usage.tenant.clone(), r.usage.start.clone()))
            })
            .collect();
        let unique: BTreeSet<_> = keys.iter().cloned().collect();
        assert_eq!((keys.len(), unique.len()), (48, 48));
        assert!(pages.iter().all(|p| p.revision == pinned));
        assert!(
            pages.iter().all(|p| p.adjustments.is_empty()),
            "none booked by the pinned revision"
        );
        // The next walk since the pinned revision: every late minute once.
        let mut next = request(&["b"], "15m", 3);
        next.since_revision = Some(pinned.to_string());
        let later = walk(&mut f, &next, |_| {});
        let late: u64 = later
            .iter()
            .flat_map(|p| &p.adjustments)
            .map(|a| a.energy_millijoules)
            .sum();
        let want: u64 = (1..=booked).map(|i| 1_000 + 60 * i as u64).sum();
        assert_eq!(late, want);
        // Restated rows show it: the first quarter-hour of b has the last
        // revision booked to it; a final row nothing was booked to has 0;
        // a partial row the ledger's revision.
        let rows: Vec<&PagedRow> = later.iter().flat_map(|p| &p.rows).collect();
        let revision_now = later[0].revision;
        assert!(revision_now > pinned);
        let late_in_first_quarter = (1..=booked).filter(|i| 60 * i < 900).count() as u64;
        assert_eq!(rows[0].revision, Some(pinned + late_in_first_quarter));
        assert_eq!(rows[7].revision, Some(0), "{:?}", rows[7]);
        assert!(rows[8].usage.partial);
        assert_eq!(rows[8].revision, None);
    }

    /// A token from another query, or garbled, is refused by name; so are
    /// a bad limit and an anchor with a fixed step.
    #[test]
    fn bad_page_parameters_name_the_parameter() {
        let f = fixture();
        let first = page_of(&f, &request(&["a"], "15m", 5)).unwrap();
        let token = first.next_page_token.clone().unwrap();
        let mut other = request(&["b"], "15m", 5);
        other.page_token = Some(token.clone());
        let mut garbled = request(&["a"], "15m", 5);
        garbled.page_token = Some(format!("x{token}"));
        let mut anchored = request(&[], "1h", 5);
        anchored.anchor = Some("2027-01-01T00:00:00Z".into());
        let mut unknown = request(&["nobody"], "1h", 5);
        unknown.limit = None;
        for (req, param) in [
            (other, "page_token"),
            (garbled, "page_token"),
            (request(&[], "15m", 0), "limit"),
            (request(&[], "15m", 10_001), "limit"),
            (anchored, "step"),
            (unknown, "tenant"),
        ] {
            match page_of(&f, &req) {
                Err(QueryError::Usage(e)) => assert_eq!(e.param(), Some(param), "{e}"),
                other => panic!("{req:?}: {other:?}"),
            }
        }
    }

    /// One row for the whole period: the sum of the finer rows.
    #[test]
    fn a_total_is_the_sum_of_the_rows() {
        let mut f = fixture();
        let total = page_of(&f, &request(&["a"], "total", 10)).unwrap();
        assert_eq!(total.rows.len(), 1);
        let minutes: u64 = walk(&mut f, &request(&["a"], "1m", 10_000), |_| {})
            .iter()
            .flat_map(|p| &p.rows)
            .map(|r| r.usage.energy_millijoules)
            .sum();
        assert_eq!(total.rows[0].usage.energy_millijoules, minutes);
        assert_eq!(total.rows[0].step, "total");
        assert!(total.rows[0].usage.partial);
    }

    fn json_of(row: &PagedRow) -> serde_json::Value {
        serde_json::to_value(row).unwrap()
    }

    /// A page with a row a late minute restates, read before and after the
    /// row turned final: a row's revision, where it has one, moves whenever
    /// its figures do.
    #[test]
    fn a_rows_revision_moves_whenever_its_figures_do() {
        let f = fixture();
        let mut f = f;
        let total = request(&["a"], "total", 10);
        let mut seen = Vec::new();
        let mut read = |f: &Fixture| {
            let p = page_of(f, &total).unwrap();
            let row = json_of(&p.rows[0]);
            seen.push((row["revision"].clone(), row["energy_millijoules"].clone()));
        };
        // A late minute for a final minute of the row (an adjustment),
        // read while the row is partial.
        f.ledger
            .commit_at(&minutes(&["a"], T + 60, 1), T + 7400, T + 7200)
            .unwrap();
        read(&f);
        // New energy in the row's last hour, and the watermark past its end:
        // the row is final, with more energy than it had.
        let mut c = minutes(&["a"], T + 7260, 1);
        c.buckets = c
            .buckets
            .into_iter()
            .map(|((t, _, at), d)| ((t, Arc::from("n2"), at), d))
            .collect();
        f.ledger.commit_at(&c, T + 11_000, T + 3 * 3600).unwrap();
        read(&f);
        // Another late minute: an adjustment to the final row.
        f.ledger
            .commit_at(&minutes(&["a"], T + 120, 1), T + 11_100, T + 3 * 3600)
            .unwrap();
        read(&f);
        assert_ne!(seen[0].1, seen[1].1, "the row gained energy");
        for (i, a) in seen.iter().enumerate() {
            for b in &seen[i + 1..] {
                if !a.0.is_null() && a.0 == b.0 {
                    assert_eq!(a.1, b.1, "the same revision, other figures: {seen:?}");
                }
            }
        }
        assert!(
            seen[0].0.is_null(),
            "a partial row has no revision yet: {seen:?}"
        );
        assert!(seen[1].0.is_u64() && seen[2].0.is_u64(), "{seen:?}");
    }

    /// Rows of the same identity cover the same minutes and have the same
    /// figures; rows of different periods from the same start do not share
    /// one.
    #[test]
    fn a_rows_identity_names_its_period() {
        let f = fixture();
        let mut short = request(&["a"], "total", 10);
        short.to = Some(super::super::rfc3339(T + 3600));
        let long = page_of(&f, &request(&["a"], "total", 10)).unwrap();
        let short = page_of(&f, &short).unwrap();
        let hours = page_of(&f, &request(&["a"], "1h", 10)).unwrap();
        let id = |r: &PagedRow| json_of(r)["id"].clone();
        assert!(
            id(&short.rows[0]).is_string(),
            "{:?}",
            json_of(&short.rows[0])
        );
        assert_ne!(id(&long.rows[0]), id(&short.rows[0]));
        assert_eq!(id(&hours.rows[0]), id(&short.rows[0]));
        assert_eq!(hours.rows[0].usage, short.rows[0].usage);
        let ids: BTreeSet<String> = hours
            .rows
            .iter()
            .map(|r| id(r).as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 3);
    }

    /// A page lists at most as many adjustments as a v1 answer: the page
    /// ends early, and a row with more alone is refused.
    #[test]
    fn a_page_holds_at_most_ten_thousand_adjustments() {
        let mut f = fixture();
        // Late minutes of a on 6,000 nodes in each of its first two hours,
        // an hour a commit: 6,000 adjustments to each hourly row, 12,000
        // (two revisions) to the whole period's.
        for hour in 0..2 {
            let mut c = Commit::default();
            for node in 0..6_000 {
                let at = T + hour * 3600;
                c.buckets
                    .insert((Arc::from("a"), Arc::from(format!("late{node}")), at), d(1));
                *c.tenant_energy.entry(Arc::from("a")).or_default() += 1;
            }
            f.ledger.commit_at(&c, T + 7400 + hour, T + 7200).unwrap();
        }
        let pages = walk(&mut f, &request(&["a"], "1h", 10), |_| {});
        let max = super::super::MAX_ROWS as usize;
        assert!(pages.iter().all(|p| p.adjustments.len() <= max));
        let starts: Vec<&str> = pages
            .iter()
            .flat_map(|p| p.rows.iter().map(|r| r.usage.start.as_str()))
            .collect();
        let want: Vec<String> = (0..3)
            .map(|h| super::super::rfc3339(T + h * 3600))
            .collect();
        assert_eq!(starts, want);
        let listed: usize = pages.iter().map(|p| p.adjustments.len()).sum();
        assert_eq!(listed, 12_000);
        // Each adjustment on the page of its row.
        for p in &pages {
            for a in &p.adjustments {
                assert!(p.rows.iter().any(|r| r.usage.start == a.start));
            }
        }
        match page_of(&f, &request(&["a"], "total", 1)) {
            Err(QueryError::Usage(e)) => assert_eq!(e.kind(), "too-many-rows", "{e}"),
            other => panic!("{:?}", other.map(|p| p.adjustments.len())),
        }
    }

    /// A walk covers at most ten years, whatever its step; up to that, a
    /// walk of days pages through every day once.
    #[test]
    fn a_walk_covers_at_most_ten_years_whatever_its_step() {
        let mut f = fixture();
        let years = |n: i16| {
            let to = jiff::civil::date(2027 + n, 1, 1).to_zoned_datetime(jiff::tz::TimeZone::UTC);
            super::super::rfc3339(to.unwrap().timestamp().as_second())
        };
        for step in ["1d", "month", "total"] {
            let mut req = request(&["a"], step, 10);
            req.to = Some(years(11));
            match page_of(&f, &req) {
                Err(QueryError::Usage(e)) => {
                    assert_eq!(
                        (e.param(), e.kind()),
                        (Some("step"), "too-many-rows"),
                        "{e}"
                    )
                }
                other => panic!("{step}: {other:?}"),
            }
        }
        let mut req = request(&["a", "b"], "1d", 1000);
        req.to = Some(years(10));
        let pages = walk(&mut f, &req, |_| {});
        let rows: Vec<&PagedRow> = pages.iter().flat_map(|p| &p.rows).collect();
        assert_eq!(rows.len(), 2 * 3653);
        for w in rows.windows(2) {
            if w[0].usage.tenant == w[1].usage.tenant {
                assert_eq!(w[0].usage.end, w[1].usage.start);
            }
        }
        assert_eq!(rows[3652].usage.end, years(10));
        assert_eq!(rows[3653].usage.start, super::super::rfc3339(T));
    }

    /// The time zone is answered, and bound to the token, by its own name,
    /// however the client spelled it.
    #[test]
    fn a_time_zone_has_one_name() {
        let f = fixture();
        let mut req = request(&["a"], "1h", 1);
        req.tz = Some("europe/berlin".into());
        let first = page_of(&f, &req).unwrap();
        assert_eq!(first.time_zone, "Europe/Berlin");
        req.tz = Some("Europe/Berlin".into());
        req.page_token = first.next_page_token.clone();
        let second = page_of(&f, &req).unwrap();
        assert_ne!(second.rows[0].usage.start, first.rows[0].usage.start);
    }

    /// An empty page token is the first page, as clients send it there.
    #[test]
    fn an_empty_page_token_is_the_first_page() {
        let f = fixture();
        let first = page_of(&f, &request(&["a"], "15m", 5)).unwrap();
        for empty in ["", " "] {
            let mut req = request(&["a"], "15m", 5);
            req.page_token = Some(empty.into());
            let p = page_of(&f, &req).unwrap();
            assert_eq!(p.rows, first.rows);
            assert_eq!(p.next_page_token, first.next_page_token);
        }
    }

    /// A CSV cell a spreadsheet would read as a formula (a node id from an
    /// agent, a tenant id) starts with a quote; JSON keeps it as it is.
    #[test]
    fn a_csv_cell_that_looks_like_a_formula_is_quoted() {
        let mut f = fixture();
        let mut c = Commit::default();
        for (i, node) in ["=HYPERLINK(1)", "+1+x", "-1+x", "@SUM(1)", "\tx", "\rx"]
            .iter()
            .enumerate()
        {
            c.buckets
                .insert((Arc::from("b"), Arc::from(*node), T + 60 * i as i64), d(1));
        }
        f.ledger.commit_at(&c, T + 7400, T + 7200).unwrap();
        let p = page_of(&f, &request(&["b"], "1h", 10)).unwrap();
        assert_eq!(p.adjustments.len(), 6);
        assert!(p.adjustments.iter().any(|a| a.node == "=HYPERLINK(1)"));
        let text = super::super::page_csv(&p).unwrap();
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let node = r
            .headers()
            .unwrap()
            .iter()
            .position(|h| h == "node")
            .unwrap();
        let mut nodes: Vec<String> = r
            .records()
            .map(|rec| rec.unwrap()[node].to_string())
            .filter(|n| !n.is_empty())
            .collect();
        nodes.sort();
        assert_eq!(
            nodes,
            [
                "'\tx",
                "'\rx",
                "'+1+x",
                "'-1+x",
                "'=HYPERLINK(1)",
                "'@SUM(1)"
            ]
        );
    }
}
