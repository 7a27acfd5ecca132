//! Usage for billing jobs: per-tenant rows over any period and step, read
//! from the ledger's minute buckets (and, before the minutes kept, its
//! hourly and daily rollups), as JSON, CSV or a table, with the ledger's
//! watermark and revision and the adjustments booked for rows already
//! final (late data), optionally only those since a revision.
//!
//! *Boundary:* query parameters come from HTTP clients and the command
//! line; every error names the parameter and maps to a 4xx in `http.rs`.
//!
//! Times are RFC 3339; `from` is inclusive and `to` exclusive, both on a
//! row boundary. Rows of 1m, 15m and 1h are fixed lengths aligned in the
//! requested time zone's local time; rows of 1d and month run from local
//! midnight to local midnight, so they are 23 or 25 hours long across a
//! daylight-saving change. Peak demand follows utility practice: the
//! highest average power over an aligned quarter-hour that overlaps the
//! row.

mod cursor;
mod facility;
pub mod meters;
pub mod paged;
mod periods;
pub mod recent;
mod render;
mod report;
#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::accounting::{Basis, Contract};
use crate::ledger::{LedgerError, LedgerReader};
use crate::meters::MeterSpec;
use crate::tenants::{TenantHistory, Tenants, UNASSIGNED};

pub use facility::{Facility, FacilityMinute};
pub use paged::{Page, PageQuery, PageRequest, PagedRow, page};
pub use periods::{Query, Step, Zone, rfc3339};
pub use render::{Format, PAGE_COLUMNS, csv, page_csv, table};
pub use report::{AdjustmentRow, Report, Row, report};

/// Most rows one request may return (rows × tenants).
pub const MAX_ROWS: i64 = 10_000;
const QUARTER: i64 = 900;
const FIVE_MINUTES: i64 = 300;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("`{param}` is required")]
    Missing { param: &'static str },
    #[error(
        "`{param}`: {value:?} is not an RFC 3339 time in whole seconds between 1970 and 9999, such as 2026-11-01T00:00:00Z"
    )]
    Time { param: &'static str, value: String },
    #[error("`{param}` must be at the start of a {step} row in time zone {tz}")]
    Misaligned {
        param: &'static str,
        step: &'static str,
        tz: String,
    },
    #[error("step {step} does not divide the period from `from` to `to` in time zone {tz}")]
    Indivisible { step: &'static str, tz: String },
    #[error("`from` must be before `to`")]
    Empty,
    #[error("the period holds {rows} rows; at most {max} per request")]
    TooManyRows { rows: i64, max: i64 },
    #[error("`step`: {0:?} is not one of 1m, 15m, 1h, 1d, month, total")]
    Step(String),
    #[error("`anchor` applies to steps 1d and month, not {0}")]
    AnchorStep(&'static str),
    #[error("`limit`: {0:?} is not a whole number from 1 to {max}", max = paged::MAX_LIMIT)]
    Limit(String),
    #[error("`page_token`: {0}")]
    PageToken(&'static str),
    #[error("`{param}`: {why}")]
    Parameter { param: String, why: &'static str },
    #[error("`format`: {0:?} is not one of json, csv")]
    Format(String),
    #[error("`tz`: {0:?} is not an IANA time zone such as UTC or Europe/Paris")]
    TimeZone(String),
    #[error(
        "usage before {before} is kept only in {granularity} rollups: rows there must start and end on whole {unit}"
    )]
    Compacted {
        before: String,
        granularity: &'static str,
        unit: &'static str,
    },
    #[error("usage before {before} is no longer kept (day_retention)")]
    Expired { before: String },
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error(
        "`from`: rows per GPU hold every GPU's figures from {since} on (when the ledger began keeping them, or its hour_retention); ask a period from then"
    )]
    GpuRowsSince { since: String },
    #[error(
        "`from`: rows per GPU are not complete now: a collector that does not keep them (usage_gpu_rows = false) committed last; they are complete again from the first whole hour after every collector keeps them"
    )]
    GpuRowsOff,
    #[error(
        "`since_revision`: {0:?} is not a revision (a whole number from an earlier answer's `revision`)"
    )]
    Revision(String),
    #[error(
        "`since_revision` {since} is ahead of the ledger, whose revision is {revision}: it comes from another ledger"
    )]
    RevisionAhead { since: u64, revision: u64 },
    #[error(
        "the period has {count} adjustments since revision {since}; at most {max} per request: ask for a shorter period, one tenant or a longer step (a later `since_revision` would skip the adjustments before it)"
    )]
    TooManyAdjustments { count: usize, since: u64, max: i64 },
}

impl UsageError {
    /// The query parameter the error is about, if it is about one.
    pub fn param(&self) -> Option<&str> {
        use UsageError::*;
        Some(match self {
            Missing { param } | Time { param, .. } | Misaligned { param, .. } => *param,
            Indivisible { .. } | TooManyRows { .. } | Step(_) | AnchorStep(_) => "step",
            Empty => "to",
            Format(_) => "format",
            TimeZone(_) => "tz",
            Compacted { .. } | Expired { .. } | GpuRowsSince { .. } | GpuRowsOff => "from",
            UnknownTenant(_) => "tenant",
            Revision(_) | RevisionAhead { .. } => "since_revision",
            Limit(_) => "limit",
            PageToken(_) => "page_token",
            Parameter { param, .. } => param.as_str(),
            TooManyAdjustments { .. } => return None,
        })
    }

    /// A short stable name for the kind of problem: the last part of its
    /// problem type.
    pub fn kind(&self) -> &'static str {
        use UsageError::*;
        match self {
            Missing { .. } => "missing-parameter",
            UnknownTenant(_) => "unknown-tenant",
            TooManyRows { .. } | TooManyAdjustments { .. } => "too-many-rows",
            Compacted { .. } => "compacted",
            Expired { .. } => "expired",
            RevisionAhead { .. } => "revision-ahead",
            PageToken(_) => "invalid-page-token",
            _ => "invalid-parameter",
        }
    }
}

/// What a tenant's rows are computed against.
#[derive(Debug, Clone, PartialEq)]
pub struct Terms {
    pub tenant: String,
    /// The contract over time, with its basis: (from, contract), `from` in
    /// Unix nanoseconds, strictly increasing, the first from `i64::MIN`.
    pub contracts: Vec<(i64, Contract)>,
    /// Power usage effectiveness of the tenant's site, if configured.
    pub pue: Option<f64>,
}

impl Terms {
    /// Terms with one contract (on GPU energy) at all times.
    pub fn new(tenant: &str, contracted_milliwatts: Option<u64>, pue: Option<f64>) -> Self {
        Self {
            tenant: tenant.to_string(),
            contracts: vec![(
                i64::MIN,
                Contract {
                    milliwatts: contracted_milliwatts.unwrap_or(0),
                    basis: Basis::Gpu,
                    pue_ppm: pue.map_or(0, |p| (p * 1e6).round() as u64),
                },
            )],
            pue,
        }
    }

    /// These terms with every contract on `basis`.
    pub fn on(mut self, basis: Basis) -> Self {
        for (_, c) in &mut self.contracts {
            c.basis = basis;
        }
        self
    }

    /// The contract the minute starting at `minute_start` (Unix seconds)
    /// is measured against: the one in force at the minute's start, as
    /// `TenantHistory::contract_at` says.
    pub fn contract_at(&self, minute_start: i64) -> Contract {
        if let [(_, only)] = self.contracts[..] {
            return only;
        }
        let at = minute_start.saturating_mul(1_000_000_000);
        let i = self.contracts.partition_point(|(from, _)| *from <= at);
        self.contracts[i.saturating_sub(1)].1
    }
}

/// Errors of a usage request: the request's own, or the ledger's.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Answers one usage request from the ledger: the tenants of `tenants`
/// (plus `unassigned` and any the ledger knows from earlier tenant files),
/// or only `tenant`. Each minute is measured against the tenant's contract
/// in the version of `history` in force at the minute's start; facility
/// energy sets the allocation of the configured `meters` beside the node
/// energy of the nodes they feed.
#[allow(clippy::too_many_arguments)]
pub fn run(
    reader: &dyn LedgerReader,
    tenants: &Tenants,
    history: &TenantHistory,
    meters: &[MeterSpec],
    tenant: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    step: Option<&str>,
    tz: Option<&str>,
    since_revision: Option<&str>,
) -> Result<Report, QueryError> {
    let since = parse_revision(since_revision)?;
    let known = known_terms(reader, tenants)?;
    let mut selected = match tenant {
        Some(id) => vec![
            known
                .into_iter()
                .find(|t| t.tenant == id)
                .ok_or_else(|| UsageError::UnknownTenant(id.to_string()))?,
        ],
        None => known,
    };
    let q = Query::parse(from, to, step, tz, selected.len())?;
    let (lo, hi) = q.read_range();
    // The meters' allocation in the usage's snapshot: as of its revision.
    let (usage, allocation) =
        reader.usage_allocated_since(tenant, lo, hi, since, !meters.is_empty())?;
    if since > usage.revision {
        return Err(UsageError::RevisionAhead {
            since,
            revision: usage.revision,
        }
        .into());
    }
    q.check_detail(&usage)?;
    // The tenants were listed before the snapshot: one whose first energy
    // was committed since is answered too, or its adjustments, covered by
    // the answer's revision, would never be seen by a job asking since it.
    if tenant.is_none() {
        let in_snapshot: std::collections::BTreeSet<&str> = (usage.spans.iter().map(|(t, _)| t))
            .chain(usage.adjustments.iter().map(|a| &a.tenant))
            .map(String::as_str)
            .collect();
        for t in in_snapshot {
            if !selected.iter().any(|k| k.tenant == t) {
                selected.push(Terms::new(t, None, None));
            }
        }
    }
    // Each minute against the contract of its own time.
    let contracts = history.contract_terms_by_tenant();
    for t in &mut selected {
        t.contracts = contracts
            .get(t.tenant.as_str())
            .cloned()
            .unwrap_or_else(|| vec![(i64::MIN, Contract::default())]);
    }
    let facility = Facility::of(meters, &allocation);
    let r = report(&q, &selected, &usage, &facility);
    if r.adjustments.len() > MAX_ROWS as usize {
        return Err(UsageError::TooManyAdjustments {
            count: r.adjustments.len(),
            since,
            max: MAX_ROWS,
        }
        .into());
    }
    Ok(r)
}

/// Every tenant a request may name: those of `tenants` (the tenant file),
/// `unassigned`, and any the ledger knows from earlier tenant files.
fn known_terms(reader: &dyn LedgerReader, tenants: &Tenants) -> Result<Vec<Terms>, LedgerError> {
    let mut known: Vec<Terms> = tenants
        .all()
        .iter()
        .map(|t| {
            Terms::new(
                &t.id,
                (t.contracted_milliwatts > 0).then_some(t.contracted_milliwatts),
                t.pue,
            )
        })
        .collect();
    if !known.iter().any(|t| t.tenant == UNASSIGNED) {
        known.push(Terms::new(UNASSIGNED, None, None));
    }
    for t in reader.tenants()? {
        if !known.iter().any(|k| k.tenant == t) {
            known.push(Terms::new(&t, None, None));
        }
    }
    Ok(known)
}

/// `since_revision`: a revision from an earlier answer; none is 0, every
/// adjustment.
fn parse_revision(v: Option<&str>) -> Result<u64, UsageError> {
    match v {
        None => Ok(0),
        Some(text) => text
            .parse()
            .map_err(|_| UsageError::Revision(text.to_string())),
    }
}

/// Errors of asking a running collector for usage.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("asking {url}: {error}")]
    Transport {
        url: String,
        error: Box<ureq::Error>,
    },
    #[error("{url} answered {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
}

/// GETs `path` with `query` from the collector at `base` and returns the
/// body; an error status becomes an error carrying the API's message.
pub fn fetch(
    base: &str,
    path: &str,
    token: Option<&str>,
    query: &[(&str, &str)],
) -> Result<String, FetchError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let transport = |error| FetchError::Transport {
        url: url.clone(),
        error: Box::new(error),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut request = agent.get(&url);
    if let Some(t) = token {
        request = request.header("Authorization", format!("Bearer {t}"));
    }
    for (k, v) in query {
        request = request.query(*k, *v);
    }
    let mut response = request.call().map_err(transport)?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().map_err(transport)?;
    if status >= 400 {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                // A problem's detail (RFC 9457); `error` from older collectors.
                (v["detail"].as_str().or_else(|| v["error"].as_str())).map(str::to_string)
            })
            .unwrap_or(body);
        return Err(FetchError::Refused {
            url,
            status,
            message,
        });
    }
    Ok(body)
}
