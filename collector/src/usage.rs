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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

use crate::ledger::{BucketDelta, DAY, HOUR, LedgerError, Reader, Span, Usage};
use crate::tenants::{TenantHistory, Tenants, UNASSIGNED};

/// Most rows one request may return (rows × tenants).
pub const MAX_ROWS: i64 = 10_000;
const QUARTER: i64 = 900;
const FIVE_MINUTES: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Minute,
    Quarter,
    Hour,
    Day,
    Month,
}

impl Step {
    pub fn parse(s: &str) -> Result<Self, UsageError> {
        Ok(match s {
            "1m" => Step::Minute,
            "15m" => Step::Quarter,
            "1h" => Step::Hour,
            "1d" => Step::Day,
            "month" => Step::Month,
            other => return Err(UsageError::Step(other.to_string())),
        })
    }

    /// The length of a row, for steps of fixed length.
    pub fn fixed_seconds(self) -> Option<i64> {
        match self {
            Step::Minute => Some(60),
            Step::Quarter => Some(QUARTER),
            Step::Hour => Some(HOUR),
            Step::Day | Step::Month => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Step::Minute => "1m",
            Step::Quarter => "15m",
            Step::Hour => "1h",
            Step::Day => "1d",
            Step::Month => "month",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Table,
}

impl Format {
    pub fn parse(s: &str) -> Result<Self, UsageError> {
        Ok(match s {
            "json" => Format::Json,
            "csv" => Format::Csv,
            "table" => Format::Table,
            other => return Err(UsageError::Format(other.to_string())),
        })
    }
}

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
    #[error("`step`: {0:?} is not one of 1m, 15m, 1h, 1d, month")]
    Step(String),
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

/// What a tenant's rows are computed against.
#[derive(Debug, Clone, PartialEq)]
pub struct Terms {
    pub tenant: String,
    /// The contract (mW; 0: none) over time: (from, mW), `from` in Unix
    /// nanoseconds, strictly increasing, the first from `i64::MIN`.
    pub contracts: Vec<(i64, u64)>,
    /// Power usage effectiveness of the tenant's site, if configured.
    pub pue: Option<f64>,
}

impl Terms {
    /// Terms with one contract at all times.
    pub fn new(tenant: &str, contracted_milliwatts: Option<u64>, pue: Option<f64>) -> Self {
        Self {
            tenant: tenant.to_string(),
            contracts: vec![(i64::MIN, contracted_milliwatts.unwrap_or(0))],
            pue,
        }
    }

    /// The contract (mW; 0: none) the minute starting at `minute_start`
    /// (Unix seconds) is measured against: the one in force at the
    /// minute's start, as `TenantHistory::contracted_milliwatts_at` says.
    pub fn contract_at(&self, minute_start: i64) -> u64 {
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
/// in the version of `history` in force at the minute's start.
#[allow(clippy::too_many_arguments)]
pub fn run(
    reader: &Reader,
    tenants: &Tenants,
    history: &TenantHistory,
    tenant: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    step: Option<&str>,
    tz: Option<&str>,
    since_revision: Option<&str>,
) -> Result<Report, QueryError> {
    let since = parse_revision(since_revision)?;
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
    let usage = reader.usage_since(tenant, lo, hi, since)?;
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
    let contracts = history.contracts_by_tenant();
    for t in &mut selected {
        t.contracts = contracts
            .get(t.tenant.as_str())
            .cloned()
            .unwrap_or_else(|| vec![(i64::MIN, 0)]);
    }
    let r = report(&q, &selected, &usage);
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

/// The time zone rows are cut in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    tz: TimeZone,
}

impl Zone {
    pub fn utc() -> Self {
        Self {
            name: "UTC".into(),
            tz: TimeZone::UTC,
        }
    }

    pub fn parse(name: Option<&str>) -> Result<Self, UsageError> {
        match name {
            None => Ok(Self::utc()),
            Some(n)
                if ["UTC", "Etc/UTC", "Z", "Etc/Zulu", "Zulu"]
                    .iter()
                    .any(|u| u.eq_ignore_ascii_case(n)) =>
            {
                Ok(Self::utc())
            }
            Some(n) => TimeZone::get(n)
                .map(|tz| Self {
                    name: n.to_string(),
                    tz,
                })
                .map_err(|_| UsageError::TimeZone(n.to_string())),
        }
    }

    fn is_utc(&self) -> bool {
        self.name == "UTC"
    }

    /// The UTC offset at `unix`, in seconds.
    fn offset(&self, unix: i64) -> i64 {
        Timestamp::from_second(unix).map_or(0, |t| i64::from(self.tz.to_offset(t).seconds()))
    }

    /// The local date at `unix`.
    fn date(&self, unix: i64) -> Option<Date> {
        Timestamp::from_second(unix)
            .ok()
            .map(|t| t.to_zoned_datetime(self.tz.clone()).date())
    }

    /// When local `date` starts (midnight, or the first instant after a
    /// skipped midnight).
    fn start_of(&self, date: Date) -> Option<i64> {
        date.to_zoned_datetime(self.tz.clone())
            .ok()
            .map(|z| z.timestamp().as_second())
    }

    /// `unix` as RFC 3339: `Z` in UTC, else the zone's offset at that time.
    pub fn format(&self, unix: i64) -> String {
        match Timestamp::from_second(unix) {
            Ok(t) if self.is_utc() => t.to_string(),
            Ok(t) => t.display_with_offset(self.tz.to_offset(t)).to_string(),
            Err(_) => unix.to_string(),
        }
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub from: i64,
    pub to: i64,
    pub step: Step,
    pub zone: Zone,
    /// Row boundaries: row `i` is `[bounds[i], bounds[i + 1])`.
    pub bounds: Vec<i64>,
}

fn parse_time(param: &'static str, value: Option<&str>) -> Result<i64, UsageError> {
    let value = value.ok_or(UsageError::Missing { param })?;
    let bad = || UsageError::Time {
        param,
        value: value.to_string(),
    };
    let t: Timestamp = value.parse().map_err(|_| bad())?;
    if t.subsec_nanosecond() != 0 || t.as_second() < 0 {
        return Err(bad());
    }
    Ok(t.as_second())
}

impl Query {
    /// Checks the parameters of one request for `tenants` tenants.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        step: Option<&str>,
        tz: Option<&str>,
        tenants: usize,
    ) -> Result<Self, UsageError> {
        let zone = Zone::parse(tz)?;
        let step = Step::parse(step.unwrap_or("1h"))?;
        let from = parse_time("from", from)?;
        let to = parse_time("to", to)?;
        let misaligned = |param| UsageError::Misaligned {
            param,
            step: step.label(),
            tz: zone.name.clone(),
        };
        let max_rows = MAX_ROWS / tenants.max(1) as i64;
        let too_many = |rows: i64| UsageError::TooManyRows {
            rows: rows.saturating_mul(tenants.max(1) as i64),
            max: MAX_ROWS,
        };
        let bounds = match step.fixed_seconds() {
            Some(len) => {
                for (param, t) in [("from", from), ("to", to)] {
                    if (t + zone.offset(t)).rem_euclid(len) != 0 {
                        return Err(misaligned(param));
                    }
                }
                if from >= to {
                    return Err(UsageError::Empty);
                }
                if (to - from) % len != 0 {
                    return Err(UsageError::Indivisible {
                        step: step.label(),
                        tz: zone.name.clone(),
                    });
                }
                let rows = (to - from) / len;
                if rows > max_rows {
                    return Err(too_many(rows));
                }
                (0..=rows).map(|i| from + i * len).collect()
            }
            None => {
                // Calendar rows: local midnights (on the 1st for months).
                let first_day = |param, t: i64| {
                    zone.date(t)
                        .filter(|d| zone.start_of(*d) == Some(t))
                        .filter(|d| step == Step::Day || d.day() == 1)
                        .ok_or_else(|| misaligned(param))
                };
                let start = first_day("from", from)?;
                let end = first_day("to", to)?;
                if from >= to {
                    return Err(UsageError::Empty);
                }
                let rows = match step {
                    Step::Month => {
                        i64::from(end.year() - start.year()) * 12
                            + i64::from(end.month() - start.month())
                    }
                    _ => start
                        .until(end)
                        .map_or(i64::MAX, |s| i64::from(s.get_days())),
                };
                if rows > max_rows {
                    return Err(too_many(rows));
                }
                let mut bounds = Vec::with_capacity(rows as usize + 1);
                for i in 0..=rows {
                    let date = match step {
                        Step::Month => start.checked_add((i as i32).months()),
                        _ => start.checked_add((i as i32).days()),
                    };
                    let t = date
                        .ok()
                        .and_then(|d| zone.start_of(d))
                        .ok_or_else(|| misaligned("to"))?;
                    bounds.push(t);
                }
                if bounds.last() != Some(&to) {
                    return Err(misaligned("to"));
                }
                bounds
            }
        };
        Ok(Self {
            from,
            to,
            step,
            zone,
            bounds,
        })
    }

    /// The usage to read: the period widened to whole quarter-hours, for
    /// peak demand.
    pub fn read_range(&self) -> (i64, i64) {
        (
            self.from.div_euclid(QUARTER) * QUARTER,
            (self.to + QUARTER - 1).div_euclid(QUARTER) * QUARTER,
        )
    }

    /// Rows before the minutes kept must fall on the rollups' boundaries:
    /// whole hours before `minutes_from`, whole UTC days before
    /// `hours_from`; nothing may start before `days_from`, where nothing
    /// is kept (a row there would read as zero usage).
    pub fn check_detail(&self, usage: &Usage) -> Result<(), UsageError> {
        let (minutes_from, hours_from) = (usage.minutes_from, usage.hours_from);
        if self.from < usage.days_from {
            return Err(UsageError::Expired {
                before: rfc3339(usage.days_from),
            });
        }
        for &b in &self.bounds {
            if b < hours_from && b.rem_euclid(DAY) != 0 {
                return Err(UsageError::Compacted {
                    before: rfc3339(hours_from),
                    granularity: "daily",
                    unit: "UTC days",
                });
            }
            if b < minutes_from && b.rem_euclid(HOUR) != 0 {
                return Err(UsageError::Compacted {
                    before: rfc3339(minutes_from),
                    granularity: "hourly",
                    unit: "hours",
                });
            }
        }
        Ok(())
    }
}

/// Exact integer amounts in JSON are decimal strings, as payment APIs send
/// amounts: a JSON number above 2^53 comes out rounded from a parser that
/// reads numbers as doubles (JavaScript, Python's `float`, most spreadsheet
/// importers). Figures that are floats anyway (kWh, hours, watts) stay
/// numbers.
mod decimal {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse()
            .map_err(|_| D::Error::custom(format!("{text:?} is not a decimal amount")))
    }
}

/// One row of usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub tenant: String,
    pub start: String,
    pub end: String,
    /// Exact: a decimal string in JSON.
    #[serde(with = "decimal")]
    pub energy_millijoules: u64,
    pub energy_joules: f64,
    pub energy_kwh: f64,
    pub gpu_hours: f64,
    pub busy_gpu_hours: f64,
    pub average_power_watts: f64,
    pub peak_demand_watts: f64,
    /// The contract in force at the row's last minute (a row the contract
    /// changed in is judged minute by minute, each by its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contracted_power_watts: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_utilization: Option<f64>,
    /// 95th percentile of the 5-minute average power within the row (rows
    /// of 15 minutes or more whose minutes are still kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95_power_watts: Option<f64>,
    /// Time in minutes whose average power was above the contract: 60 s
    /// per such minute, by the samples' own time.
    pub seconds_over_contract: f64,
    /// Energy above the contract in those minutes (minute energy −
    /// contract × 60 s): what committed-plus-overage contracts bill.
    pub overage_kwh: f64,
    /// Share of the GPU time between readings that readings back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coverage: Option<f64>,
    /// Some energy was integrated from power instead of read from the
    /// GPUs' energy counters.
    pub estimated: bool,
    /// Energy times the site's PUE: an estimate of facility energy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub facility_energy_kwh_estimated: Option<f64>,
    pub readings: u64,
    /// The row ends after `finalized_through`: it may still change.
    pub partial: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub from: String,
    pub to: String,
    pub step: String,
    pub time_zone: String,
    /// Rows ending at or before this never change: the ledger's
    /// watermark. Energy that arrives later for them is an adjustment.
    pub finalized_through: String,
    /// The ledger's revision when it answered: ask `since_revision` this
    /// next time to get only the adjustments booked after this answer.
    pub revision: u64,
    pub rows: Vec<Row>,
    /// Late deltas to rows that were already final, one per revision,
    /// tenant, node and row.
    pub adjustments: Vec<AdjustmentRow>,
}

/// What arrived for one row after the row was final: booked by
/// `revision` at `booked_at`, for the minutes of `[start, end)` on one
/// node. Its figures add to the row's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdjustmentRow {
    pub tenant: String,
    pub node: String,
    /// The row it belongs to.
    pub start: String,
    pub end: String,
    pub revision: u64,
    pub booked_at: String,
    /// Exact: a decimal string in JSON.
    #[serde(with = "decimal")]
    pub energy_millijoules: u64,
    pub energy_kwh: f64,
    pub gpu_hours: f64,
    pub busy_gpu_hours: f64,
    /// GPU time between readings, gaps included (what coverage is
    /// measured against).
    pub expected_gpu_hours: f64,
    /// The energy over the row's length.
    pub average_power_watts: f64,
    pub seconds_over_contract: f64,
    pub overage_kwh: f64,
    pub estimated: bool,
    pub readings: u64,
}

/// `unix` (clamped at 1970) as RFC 3339 in UTC, `Z` and whole seconds.
pub fn rfc3339(unix: i64) -> String {
    Zone::utc().format(unix.max(0))
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Builds the report for `tenants` from the usage read over
/// `q.read_range()`. Every tenant gets a row for every step, with zeros
/// where nothing was recorded. Rows ending after the ledger's watermark
/// are partial; adjustments are summed per revision, tenant, node and
/// row. Rows must fit the usage's rollups (`Query::check_detail`).
pub fn report(q: &Query, tenants: &[Terms], usage: &Usage) -> Report {
    let mut by_tenant: BTreeMap<&str, BTreeMap<i64, Span>> = BTreeMap::new();
    for (t, span) in &usage.spans {
        by_tenant
            .entry(t.as_str())
            .or_default()
            .insert(span.start, *span);
    }
    let finalized = usage.finalized_through;
    let empty = BTreeMap::new();
    let mut rows = Vec::new();
    for terms in tenants {
        let tenant = &terms.tenant;
        let spans = by_tenant.get(tenant.as_str()).unwrap_or(&empty);
        let sum = |from: i64, to: i64| {
            spans
                .range(from..to)
                .fold(BucketDelta::default(), |mut acc, (_, s)| {
                    acc.add(&s.delta);
                    acc
                })
        };
        // Energy of the minute buckets in [from, to).
        let minute_energy = |from: i64, to: i64| -> u64 {
            spans
                .range(from..to)
                .filter(|(_, s)| s.peak_quarter_mj.is_none())
                .map(|(_, s)| s.delta.energy_mj)
                .fold(0u64, u64::saturating_add)
        };
        for w in q.bounds.windows(2) {
            let (start, end) = (w[0], w[1]);
            let seconds = end - start;
            let d = sum(start, end);
            // Each minute against its contract, in sample time; rollups
            // carry the evaluation of their minutes.
            let (over_ns, overage_mj) =
                spans.range(start..end).fold((0u64, 0u64), |acc, (t, s)| {
                    let (ns, mj) = s.over_contract(terms.contract_at(*t));
                    (acc.0.saturating_add(ns), acc.1.saturating_add(mj))
                });
            // Highest quarter-hour average: from the minutes' quarter-hours
            // overlapping the row, and from the peaks stored in rollups.
            let rolled_up_peak = spans
                .range(start..end)
                .filter_map(|(_, s)| s.peak_quarter_mj)
                .max();
            let mut peak_mj = rolled_up_peak.unwrap_or(0);
            // The quarter-hours overlapping the row reach beyond it where
            // the row does not start or end on a quarter boundary (a 1m
            // row): each is summed over all its minutes, visited once per
            // quarter that holds any, so a long row with little detail (a
            // month, mostly rolled up) stays cheap and a row without a
            // bucket of its own still sees its quarter.
            let (quarters_from, quarters_to) = (
                start.div_euclid(QUARTER) * QUARTER,
                (end + QUARTER - 1).div_euclid(QUARTER) * QUARTER,
            );
            let mut summed = None;
            for (t, _) in spans
                .range(quarters_from..quarters_to)
                .filter(|(_, s)| s.peak_quarter_mj.is_none())
            {
                let quarter = t.div_euclid(QUARTER) * QUARTER;
                if summed != Some(quarter) {
                    summed = Some(quarter);
                    peak_mj = peak_mj.max(minute_energy(quarter, quarter + QUARTER));
                }
            }
            // 5-minute windows are walked only between the row's first and
            // last minute bucket.
            let minutes_in_row = spans
                .range(start..end)
                .filter(|(_, s)| s.peak_quarter_mj.is_none())
                .map(|(t, _)| *t);
            let (first_minute, last_minute) = minutes_in_row
                .fold(None, |acc: Option<(i64, i64)>, t| {
                    Some(acc.map_or((t, t), |(a, _)| (a, t)))
                })
                .unwrap_or((end, start));
            let average_w = d.energy_mj as f64 / 1000.0 / seconds as f64;
            // The contract in force at the row's last minute.
            let contracted_w = Some(terms.contract_at(end - 60))
                .filter(|c| *c > 0)
                .map(|c| c as f64 / 1000.0);
            let p95 = (seconds >= QUARTER
                && rolled_up_peak.is_none()
                && start >= usage.minutes_from)
                .then(|| {
                    // Windows without minutes are zeros; only those with
                    // some are summed.
                    let windows = (seconds / FIVE_MINUTES) as usize;
                    let mut fives: Vec<u64> = vec![0; windows];
                    if first_minute <= last_minute {
                        let lo = ((first_minute - start) / FIVE_MINUTES) as usize;
                        let hi = (((last_minute - start) / FIVE_MINUTES) as usize).min(windows - 1);
                        for (i, slot) in fives.iter_mut().enumerate().take(hi + 1).skip(lo) {
                            let s = start + i as i64 * FIVE_MINUTES;
                            *slot = minute_energy(s, s + FIVE_MINUTES);
                        }
                    }
                    fives.sort_unstable();
                    // Nearest rank: the smallest value with at least 95 % at
                    // or below it.
                    let rank = (fives.len() * 95).div_ceil(100).max(1);
                    fives.get(rank - 1).copied().unwrap_or(0) as f64 / 1000.0 / FIVE_MINUTES as f64
                });
            let energy_kwh = d.energy_mj as f64 / 3.6e9;
            rows.push(Row {
                tenant: tenant.clone(),
                start: q.zone.format(start),
                end: q.zone.format(end),
                energy_millijoules: d.energy_mj,
                energy_joules: d.energy_mj as f64 / 1000.0,
                energy_kwh,
                gpu_hours: d.gpu_ns as f64 / 3.6e12,
                busy_gpu_hours: d.busy_gpu_ns as f64 / 3.6e12,
                average_power_watts: average_w,
                peak_demand_watts: peak_mj as f64 / 1000.0 / QUARTER as f64,
                contracted_power_watts: contracted_w,
                capacity_utilization: contracted_w.filter(|c| *c > 0.0).map(|c| average_w / c),
                p95_power_watts: p95,
                seconds_over_contract: over_ns as f64 / 1e9,
                overage_kwh: overage_mj as f64 / 3.6e9,
                coverage: (d.expected_gpu_ns > 0)
                    .then(|| d.gpu_ns as f64 / d.expected_gpu_ns as f64),
                estimated: d.estimated_mj > 0,
                facility_energy_kwh_estimated: terms.pue.map(|pue| energy_kwh * pue),
                readings: d.samples,
                partial: end > finalized,
            });
        }
    }
    Report {
        from: q.zone.format(q.from),
        to: q.zone.format(q.to),
        step: q.step.label().to_string(),
        time_zone: q.zone.name.clone(),
        finalized_through: q.zone.format(finalized),
        revision: usage.revision,
        rows,
        adjustments: adjustment_rows(q, tenants, usage),
    }
}

/// The usage's adjustments within the period, summed per revision,
/// tenant, node and row of `q`.
fn adjustment_rows(q: &Query, tenants: &[Terms], usage: &Usage) -> Vec<AdjustmentRow> {
    let (first, last) = (q.bounds[0], q.bounds[q.bounds.len() - 1]);
    let mut sums: BTreeMap<(u64, &str, &str, usize), (i64, BucketDelta)> = BTreeMap::new();
    for a in &usage.adjustments {
        if a.minute_start < first
            || a.minute_start >= last
            || !tenants.iter().any(|t| t.tenant == a.tenant)
        {
            continue;
        }
        let row = q.bounds.partition_point(|b| *b <= a.minute_start) - 1;
        let e = sums
            .entry((a.revision, &a.tenant, &a.node, row))
            .or_insert((a.booked_at, BucketDelta::default()));
        e.1.add(&a.delta);
    }
    sums.into_iter()
        .map(|((revision, tenant, node, row), (booked_at, d))| {
            let (start, end) = (q.bounds[row], q.bounds[row + 1]);
            AdjustmentRow {
                tenant: tenant.to_string(),
                node: node.to_string(),
                start: q.zone.format(start),
                end: q.zone.format(end),
                revision,
                booked_at: q.zone.format(booked_at),
                energy_millijoules: d.energy_mj,
                energy_kwh: d.energy_mj as f64 / 3.6e9,
                gpu_hours: d.gpu_ns as f64 / 3.6e12,
                busy_gpu_hours: d.busy_gpu_ns as f64 / 3.6e12,
                expected_gpu_hours: d.expected_gpu_ns as f64 / 3.6e12,
                average_power_watts: d.energy_mj as f64 / 1000.0 / (end - start) as f64,
                seconds_over_contract: d.over_contract_ns as f64 / 1e9,
                overage_kwh: d.overage_mj as f64 / 3.6e9,
                estimated: d.estimated_mj > 0,
                readings: d.samples,
            }
        })
        .collect()
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
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(body);
        return Err(FetchError::Refused {
            url,
            status,
            message,
        });
    }
    Ok(body)
}

const CSV_HEADER: &str = "tenant,start,end,energy_millijoules,energy_kwh,gpu_hours,busy_gpu_hours,average_power_watts,peak_demand_watts,p95_power_watts,contracted_power_watts,capacity_utilization,seconds_over_contract,overage_kwh,coverage,estimated,facility_energy_kwh_estimated,readings,partial,record,node,revision,booked_at,expected_gpu_hours";

fn opt(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// A text field of a CSV line, quoted (RFC 4180) where it holds a comma,
/// a quote or a line break: node ids are the agent's to choose.
fn field(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\"")).into()
    } else {
        v.into()
    }
}

/// The report as CSV, one row per line after a header: the rows
/// (`record` `usage`), then the adjustments (`record` `adjustment`, with
/// their node, revision and booking time, and blank where a figure of a
/// row does not add up, such as peak demand or coverage).
pub fn csv(r: &Report) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for row in &r.rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},usage,,,,",
            row.tenant,
            row.start,
            row.end,
            row.energy_millijoules,
            row.energy_kwh,
            row.gpu_hours,
            row.busy_gpu_hours,
            row.average_power_watts,
            row.peak_demand_watts,
            opt(row.p95_power_watts),
            opt(row.contracted_power_watts),
            opt(row.capacity_utilization),
            row.seconds_over_contract,
            row.overage_kwh,
            opt(row.coverage),
            row.estimated,
            opt(row.facility_energy_kwh_estimated),
            row.readings,
            row.partial
        );
    }
    for a in &r.adjustments {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},,,,,{},{},,{},,{},false,adjustment,{},{},{},{}",
            a.tenant,
            a.start,
            a.end,
            a.energy_millijoules,
            a.energy_kwh,
            a.gpu_hours,
            a.busy_gpu_hours,
            a.average_power_watts,
            a.seconds_over_contract,
            a.overage_kwh,
            a.estimated,
            a.readings,
            field(&a.node),
            a.revision,
            a.booked_at,
            a.expected_gpu_hours
        );
    }
    out
}

/// The report as an aligned table for people.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "{:<16} {:<20} {:>14} {:>10} {:>12} {:>12} {:>8}\n",
        "tenant", "start", "energy_kwh", "gpu_hours", "avg_watts", "peak_watts", "partial"
    );
    for row in &r.rows {
        let _ = writeln!(
            out,
            "{:<16} {:<20} {:>14.6} {:>10.4} {:>12.1} {:>12.1} {:>8}",
            row.tenant,
            row.start,
            row.energy_kwh,
            row.gpu_hours,
            row.average_power_watts,
            row.peak_demand_watts,
            row.partial
        );
    }
    if !r.adjustments.is_empty() {
        let _ = writeln!(
            out,
            "\nadjustments (booked after the rows were final)\n{:<16} {:<16} {:<20} {:>14} {:>9} {:<20}",
            "tenant", "node", "row start", "energy_kwh", "revision", "booked at"
        );
        for a in &r.adjustments {
            let _ = writeln!(
                out,
                "{:<16} {:<16} {:<20} {:>14.6} {:>9} {:<20}",
                a.tenant, a.node, a.start, a.energy_kwh, a.revision, a.booked_at
            );
        }
    }
    let _ = writeln!(
        out,
        "finalized through {}, revision {}",
        r.finalized_through, r.revision
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z

    fn d(energy_mj: u64, gpu_s: u64, busy_s: u64, samples: u64) -> BucketDelta {
        BucketDelta {
            energy_mj,
            gpu_ns: gpu_s * 1_000_000_000,
            busy_gpu_ns: busy_s * 1_000_000_000,
            samples,
            expected_gpu_ns: gpu_s * 1_000_000_000,
            ..BucketDelta::default()
        }
    }

    #[test]
    fn query_errors_name_the_parameter() {
        let ok = Some("2027-01-01T00:00:00Z");
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            UsageError,
        );
        // (from, to, step, tz, expected error)
        let cases: [Case; 9] = [
            (None, ok, None, None, UsageError::Missing { param: "from" }),
            (
                Some("yesterday"),
                ok,
                None,
                None,
                UsageError::Time {
                    param: "from",
                    value: "yesterday".into(),
                },
            ),
            (
                Some("2027-01-01T00:30:00Z"),
                Some("2027-01-01T02:00:00Z"),
                Some("1h"),
                None,
                UsageError::Misaligned {
                    param: "from",
                    step: "1h",
                    tz: "UTC".into(),
                },
            ),
            (
                ok,
                Some("2027-01-01T01:30:00Z"),
                Some("1h"),
                Some("Australia/Adelaide"),
                UsageError::Misaligned {
                    param: "from",
                    step: "1h",
                    tz: "Australia/Adelaide".into(),
                },
            ),
            (ok, ok, None, None, UsageError::Empty),
            (
                Some("2027-01-02T00:00:00Z"),
                ok,
                None,
                None,
                UsageError::Empty,
            ),
            (
                ok,
                Some("2027-03-01T00:00:00Z"),
                Some("1m"),
                None,
                UsageError::TooManyRows {
                    rows: 84_960,
                    max: MAX_ROWS,
                },
            ),
            (
                ok,
                Some("2027-01-02T00:00:00Z"),
                Some("5m"),
                None,
                UsageError::Step("5m".into()),
            ),
            (
                ok,
                Some("2027-01-02T00:00:00Z"),
                None,
                Some("Mars/Olympus_Mons"),
                UsageError::TimeZone("Mars/Olympus_Mons".into()),
            ),
        ];
        for (from, to, step, tz, want) in cases {
            assert_eq!(
                Query::parse(from, to, step, tz, 1),
                Err(want.clone()),
                "{from:?} {to:?} {step:?}"
            );
        }
        let q = Query::parse(ok, Some("2027-01-01T02:00:00Z"), Some("1h"), Some("UTC"), 1).unwrap();
        assert_eq!((q.from, q.to, q.step), (T, T + 7200, Step::Hour));
        assert_eq!(q.bounds, vec![T, T + 3600, T + 7200]);
    }

    /// Minute buckets as the ledger reads them, all minutes kept.
    fn usage_of(minutes: Vec<(String, i64, BucketDelta)>) -> Usage {
        Usage {
            spans: minutes
                .into_iter()
                .map(|(t, start, delta)| {
                    (
                        t,
                        Span {
                            start,
                            seconds: 60,
                            delta,
                            peak_quarter_mj: None,
                        },
                    )
                })
                .collect(),
            ..Usage::default()
        }
    }

    fn minutes() -> Usage {
        usage_of(crafted())
    }

    /// A crafted load: tenant a draws 36 kJ/min (600 W) for the first
    /// quarter-hour, then 3.6 kJ/min (60 W); tenant b one burst minute.
    fn crafted() -> Vec<(String, i64, BucketDelta)> {
        let mut m = Vec::new();
        for i in 0..30 {
            let e = if i < 15 { 36_000_000 } else { 3_600_000 };
            m.push((
                "a".to_string(),
                T + i * 60,
                d(e, 60, if i < 15 { 60 } else { 6 }, 60),
            ));
        }
        m.push(("b".to_string(), T + 20 * 60, d(90_000_000, 60, 60, 1)));
        // a: never over its 1 kW contract; estimated energy in minute 16,
        // with a gap: 30 s of its 60 s not backed by readings.
        m[16].2.estimated_mj = 1_000;
        m[16].2.gpu_ns = 30_000_000_000;
        m
    }

    #[test]
    fn peak_demand_is_the_highest_quarter_hour_average() {
        let q = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T01:00:00Z"),
            Some("1h"),
            None,
            2,
        )
        .unwrap();
        let tenants = [
            Terms::new("a", Some(1_000_000), None),
            Terms::new("b", None, None),
        ];
        let r = report(&q, &tenants, &minutes());
        assert_eq!(r.rows.len(), 2);
        let a = &r.rows[0];
        assert_eq!(a.energy_millijoules, 15 * 36_000_000 + 15 * 3_600_000);
        assert_eq!(a.peak_demand_watts, 600.0);
        assert!((a.average_power_watts - 165.0).abs() < 1e-9);
        assert_eq!(a.capacity_utilization, Some(0.165));
        // b: 90 kJ in one minute is 1500 W for that minute but only 100 W
        // over its quarter-hour, which is what demand is billed on.
        assert_eq!(r.rows[1].peak_demand_watts, 100.0);
        // p95 of the twelve 5-minute averages: a has three at 600 W.
        assert_eq!(a.p95_power_watts, Some(600.0));
        assert_eq!(r.rows[1].p95_power_watts, Some(300.0));
        assert_eq!(r.rows[1].contracted_power_watts, None);
    }

    #[test]
    fn every_minute_row_of_a_quarter_has_the_quarters_demand() {
        // b draws only in minute 00:20 of the quarter 00:15-00:30 (100 W
        // over the quarter). Every 1m row of that quarter overlaps it, with
        // or without a bucket of its own, at the quarter's start, inside
        // it or ending on its last boundary (00:29-00:30); the rows of
        // the quarters before and after have no demand.
        let q = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T00:45:00Z"),
            Some("1m"),
            None,
            1,
        )
        .unwrap();
        let r = report(&q, &[Terms::new("b", None, None)], &minutes());
        let peaks: Vec<(String, f64)> = r
            .rows
            .iter()
            .map(|r| (r.start.clone(), r.peak_demand_watts))
            .collect();
        let want: Vec<(String, f64)> = (0..45)
            .map(|i| {
                let w = if (15..30).contains(&i) { 100.0 } else { 0.0 };
                (rfc3339(T + i * 60), w)
            })
            .collect();
        assert_eq!(peaks, want);
    }

    #[test]
    fn over_contract_is_each_minutes_average_against_the_contract() {
        // Against a 0.5 kW contract (30 kJ a minute), a's first quarter
        // (36 kJ a minute) is over in every minute, by 6 kJ; its second
        // (3.6 kJ) never. A minute bucket's own over-contract fields count
        // for nothing: minutes are evaluated from their energy when read.
        let mut usage = minutes();
        usage.spans[3].1.delta.over_contract_ns = 7;
        usage.spans[20].1.delta.overage_mj = 7;
        let terms = [Terms::new("a", Some(500_000), None)];
        let rows = |usage: &Usage, step, from, to| {
            let q = Query::parse(Some(from), Some(to), Some(step), None, 1).unwrap();
            report(&q, &terms, usage)
                .rows
                .iter()
                .map(|r| {
                    (
                        r.seconds_over_contract,
                        (r.overage_kwh * 3.6e9).round() as u64,
                    )
                })
                .collect::<Vec<_>>()
        };
        let (h0, h1, h2) = (
            "2027-01-01T00:00:00Z",
            "2027-01-01T01:00:00Z",
            "2027-01-01T02:00:00Z",
        );
        let by_minute = rows(&usage, "1m", h0, h1);
        assert_eq!(by_minute[..15], [(60.0, 6_000_000); 15]);
        assert_eq!(by_minute[15..], [(0.0, 0); 45]);
        assert_eq!(
            rows(&usage, "15m", h0, h1),
            vec![(900.0, 90_000_000), (0.0, 0), (0.0, 0), (0.0, 0)]
        );
        // At the contract exactly is not over it.
        let at = usage_of(vec![("a".to_string(), T, d(30_000_000, 60, 60, 60))]);
        assert_eq!(rows(&at, "1h", h0, h1), vec![(0.0, 0)]);
        // A rollup carries what its minutes were evaluated to when it was
        // rolled up; its sums cannot say it (its average is under).
        usage.minutes_from = T + 3600;
        usage.spans.retain(|(_, s)| s.start >= T + 3600);
        let mut rolled = d(594_000_000, 3600, 1000, 3600);
        rolled.over_contract_ns = 900_000_000_000;
        rolled.overage_mj = 90_000_000;
        usage.spans.insert(
            0,
            (
                "a".to_string(),
                Span {
                    start: T,
                    seconds: 3600,
                    delta: rolled,
                    peak_quarter_mj: Some(540_000_000),
                },
            ),
        );
        assert_eq!(
            rows(&usage, "1h", h0, h2),
            vec![(900.0, 90_000_000), (0.0, 0)]
        );
    }

    #[test]
    fn golden_json_and_csv() {
        let q = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T00:30:00Z"),
            Some("15m"),
            None,
            1,
        )
        .unwrap();
        let tenants = [Terms::new("a", Some(1_000_000), Some(1.2))];
        // The watermark inside the second quarter: it is partial.
        let usage = Usage {
            finalized_through: T + 16 * 60,
            revision: 7,
            ..minutes()
        };
        let r = report(&q, &tenants, &usage);
        let json = serde_json::to_string_pretty(&r).unwrap();
        let want_json = r#"{
  "from": "2027-01-01T00:00:00Z",
  "to": "2027-01-01T00:30:00Z",
  "step": "15m",
  "time_zone": "UTC",
  "finalized_through": "2027-01-01T00:16:00Z",
  "revision": 7,
  "rows": [
    {
      "tenant": "a",
      "start": "2027-01-01T00:00:00Z",
      "end": "2027-01-01T00:15:00Z",
      "energy_millijoules": "540000000",
      "energy_joules": 540000.0,
      "energy_kwh": 0.15,
      "gpu_hours": 0.25,
      "busy_gpu_hours": 0.25,
      "average_power_watts": 600.0,
      "peak_demand_watts": 600.0,
      "contracted_power_watts": 1000.0,
      "capacity_utilization": 0.6,
      "p95_power_watts": 600.0,
      "seconds_over_contract": 0.0,
      "overage_kwh": 0.0,
      "coverage": 1.0,
      "estimated": false,
      "facility_energy_kwh_estimated": 0.18,
      "readings": 900,
      "partial": false
    },
    {
      "tenant": "a",
      "start": "2027-01-01T00:15:00Z",
      "end": "2027-01-01T00:30:00Z",
      "energy_millijoules": "54000000",
      "energy_joules": 54000.0,
      "energy_kwh": 0.015,
      "gpu_hours": 0.24166666666666667,
      "busy_gpu_hours": 0.025,
      "average_power_watts": 60.0,
      "peak_demand_watts": 60.0,
      "contracted_power_watts": 1000.0,
      "capacity_utilization": 0.06,
      "p95_power_watts": 60.0,
      "seconds_over_contract": 0.0,
      "overage_kwh": 0.0,
      "coverage": 0.9666666666666667,
      "estimated": true,
      "facility_energy_kwh_estimated": 0.018,
      "readings": 900,
      "partial": true
    }
  ],
  "adjustments": []
}"#;
        assert_eq!(json, want_json);
        let want_csv = "tenant,start,end,energy_millijoules,energy_kwh,gpu_hours,busy_gpu_hours,average_power_watts,peak_demand_watts,p95_power_watts,contracted_power_watts,capacity_utilization,seconds_over_contract,overage_kwh,coverage,estimated,facility_energy_kwh_estimated,readings,partial,record,node,revision,booked_at,expected_gpu_hours
a,2027-01-01T00:00:00Z,2027-01-01T00:15:00Z,540000000,0.15,0.25,0.25,600,600,600,1000,0.6,0,0,1,false,0.18,900,false,usage,,,,
a,2027-01-01T00:15:00Z,2027-01-01T00:30:00Z,54000000,0.015,0.24166666666666667,0.025,60,60,60,1000,0.06,0,0,0.9666666666666667,true,0.018,900,true,usage,,,,
";
        assert_eq!(csv(&r), want_csv);
    }

    #[test]
    fn exact_amounts_above_2_pow_53_survive_a_double_based_parser() {
        // 2^53 + 1: the first integer a double cannot hold.
        let big = (1u64 << 53) + 1;
        let q = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T00:01:00Z"),
            Some("1m"),
            None,
            1,
        )
        .unwrap();
        let r = report(
            &q,
            &[Terms::new("a", None, None)],
            &usage_of(vec![("a".to_string(), T, d(big, 60, 60, 1))]),
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains("\"energy_millijoules\":\"9007199254740993\""),
            "{json}"
        );
        // What a JavaScript or spreadsheet importer does with a number.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let amount = &v["rows"][0]["energy_millijoules"];
        assert_eq!(amount.as_f64(), None, "a string, not a number");
        assert_eq!(amount.as_str().unwrap().parse::<u64>().unwrap(), big);
        // And back through the API's own types (the `usage --url` table).
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.rows[0].energy_millijoules, big);
        // Floats stay numbers.
        assert!(v["rows"][0]["energy_kwh"].is_f64());
    }

    #[test]
    fn adjustments_are_summed_per_revision_tenant_node_and_row() {
        use crate::ledger::Adjustment;
        let adj = |revision, tenant: &str, node: &str, minute: i64, e: u64| Adjustment {
            revision,
            booked_at: T + 3 * 3600 + revision as i64,
            tenant: tenant.to_string(),
            node: node.to_string(),
            minute_start: T + minute * 60,
            delta: d(e, 30, 15, 30),
        };
        let usage = Usage {
            finalized_through: T + 3600,
            revision: 9,
            adjustments: vec![
                // Revision 4: two minutes of one row on n1, one of the
                // next row, and one on n2.
                adj(4, "a", "n1", 1, 1_000),
                adj(4, "a", "n1", 14, 2_000),
                adj(4, "a", "n1", 15, 4_000),
                adj(4, "a", "n2", 3, 8_000),
                // Revision 9: the first row again; a tenant not asked for;
                // a minute outside the period.
                adj(9, "a", "n1", 2, 16_000),
                adj(9, "b", "n1", 2, 32_000),
                adj(9, "a", "n1", 30, 64_000),
            ],
            ..minutes()
        };
        let q = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T00:30:00Z"),
            Some("15m"),
            None,
            1,
        )
        .unwrap();
        let r = report(&q, &[Terms::new("a", Some(1_000_000), None)], &usage);
        let got: Vec<(u64, &str, &str, &str, u64, u64)> = r
            .adjustments
            .iter()
            .map(|a| {
                (
                    a.revision,
                    a.tenant.as_str(),
                    a.node.as_str(),
                    a.start.as_str(),
                    a.energy_millijoules,
                    a.readings,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (4, "a", "n1", "2027-01-01T00:00:00Z", 3_000, 60),
                (4, "a", "n1", "2027-01-01T00:15:00Z", 4_000, 30),
                (4, "a", "n2", "2027-01-01T00:00:00Z", 8_000, 30),
                (9, "a", "n1", "2027-01-01T00:00:00Z", 16_000, 30),
            ]
        );
        assert_eq!(r.revision, 9);
        let first = &r.adjustments[0];
        assert_eq!(first.booked_at, "2027-01-01T03:00:04Z");
        assert_eq!(first.end, "2027-01-01T00:15:00Z");
        assert_eq!(
            (first.gpu_hours, first.busy_gpu_hours),
            (60.0 / 3600.0, 30.0 / 3600.0)
        );
        assert_eq!(first.expected_gpu_hours, 60.0 / 3600.0);
        // The rows are what the minutes say, adjustments or not.
        assert_eq!(
            r.rows,
            report(
                &q,
                &[Terms::new("a", Some(1_000_000), None)],
                &Usage {
                    adjustments: Vec::new(),
                    ..usage.clone()
                }
            )
            .rows
        );
        let csv = csv(&r);
        let lines: Vec<&str> = csv.lines().filter(|l| l.contains(",adjustment,")).collect();
        assert_eq!(
            lines,
            vec![
                "a,2027-01-01T00:00:00Z,2027-01-01T00:15:00Z,3000,0.0000008333333333333333,0.016666666666666666,0.008333333333333333,0.0033333333333333335,,,,,0,0,,false,,60,false,adjustment,n1,4,2027-01-01T03:00:04Z,0.016666666666666666",
                "a,2027-01-01T00:15:00Z,2027-01-01T00:30:00Z,4000,0.000001111111111111111,0.008333333333333333,0.004166666666666667,0.0044444444444444444,,,,,0,0,,false,,30,false,adjustment,n1,4,2027-01-01T03:00:04Z,0.008333333333333333",
                "a,2027-01-01T00:00:00Z,2027-01-01T00:15:00Z,8000,0.000002222222222222222,0.008333333333333333,0.004166666666666667,0.008888888888888889,,,,,0,0,,false,,30,false,adjustment,n2,4,2027-01-01T03:00:04Z,0.008333333333333333",
                "a,2027-01-01T00:00:00Z,2027-01-01T00:15:00Z,16000,0.000004444444444444444,0.008333333333333333,0.004166666666666667,0.017777777777777778,,,,,0,0,,false,,30,false,adjustment,n1,9,2027-01-01T03:00:09Z,0.008333333333333333",
            ]
        );
        // Every line has the header's columns.
        let columns = CSV_HEADER.split(',').count();
        assert!(
            csv.lines().all(|l| l.split(',').count() == columns),
            "{csv}"
        );
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["adjustments"][0]["energy_millijoules"], "3000");
    }

    #[test]
    fn rows_sum_to_the_period_whatever_the_step() {
        // Conservation across steps: the 1m, 15m and 1h rows of the same
        // hour add up to the same energy.
        let tenants = [Terms::new("a", None, None)];
        let total = |step| {
            let q = Query::parse(
                Some("2027-01-01T00:00:00Z"),
                Some("2027-01-01T01:00:00Z"),
                Some(step),
                None,
                1,
            )
            .unwrap();
            report(&q, &tenants, &minutes())
                .rows
                .iter()
                .map(|r| r.energy_millijoules)
                .sum::<u64>()
        };
        assert_eq!(total("1m"), 594_000_000);
        assert_eq!(total("15m"), 594_000_000);
        assert_eq!(total("1h"), 594_000_000);
    }

    /// Row (start, end) pairs as formatted in the report.
    fn spans_of(r: &Report) -> Vec<(String, String)> {
        r.rows
            .iter()
            .map(|r| (r.start.clone(), r.end.clone()))
            .collect()
    }

    #[test]
    fn days_and_months_follow_the_time_zone() {
        // Europe/Paris moves to summer time on 2027-03-28: that day is 23
        // hours long, and rows carry the local offset.
        let days = Query::parse(
            Some("2027-03-27T00:00:00+01:00"),
            Some("2027-03-29T22:00:00Z"),
            Some("1d"),
            Some("Europe/Paris"),
            1,
        )
        .unwrap();
        let lengths: Vec<i64> = days.bounds.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(lengths, vec![86_400, 82_800, 86_400]);
        let r = report(&days, &[Terms::new("a", None, None)], &Usage::default());
        assert_eq!(
            spans_of(&r)[1],
            (
                "2027-03-28T00:00:00+01:00".to_string(),
                "2027-03-29T00:00:00+02:00".to_string()
            )
        );
        assert_eq!(r.time_zone, "Europe/Paris");

        let months = Query::parse(
            Some("2027-01-01T00:00:00+01:00"),
            Some("2027-04-01T00:00:00+02:00"),
            Some("month"),
            Some("Europe/Paris"),
            1,
        )
        .unwrap();
        let lengths: Vec<i64> = months.bounds.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(lengths, vec![31 * 86_400, 28 * 86_400, 31 * 86_400 - 3600]);

        // Midnight UTC is not midnight in Paris; the 2nd is not a month
        // start; a day does not divide into months.
        let bad: [(&str, &str, &str, &str); 4] = [
            (
                "2027-01-01T00:00:00Z",
                "2027-01-03T00:00:00+01:00",
                "1d",
                "from",
            ),
            (
                "2027-01-01T00:00:00+01:00",
                "2027-02-02T00:00:00+01:00",
                "month",
                "to",
            ),
            (
                "2027-01-02T00:00:00+01:00",
                "2027-02-01T00:00:00+01:00",
                "month",
                "from",
            ),
            (
                "2027-01-01T00:00:00+01:00",
                "2027-01-02T12:00:00+01:00",
                "1d",
                "to",
            ),
        ];
        for (from, to, step, param) in bad {
            let err = Query::parse(Some(from), Some(to), Some(step), Some("Europe/Paris"), 1);
            assert!(
                matches!(&err, Err(UsageError::Misaligned { param: p, .. }) if *p == param),
                "{from} {to} {step}: {err:?}"
            );
        }
        // Kathmandu is UTC+05:45: its hours start at a quarter past in UTC.
        let q = Query::parse(
            Some("2027-01-01T00:15:00Z"),
            Some("2027-01-01T02:15:00Z"),
            Some("1h"),
            Some("Asia/Kathmandu"),
            1,
        )
        .unwrap();
        assert_eq!(q.bounds.len(), 3);
        // Too many months for many tenants.
        assert_eq!(
            Query::parse(
                Some("2000-01-01T00:00:00Z"),
                Some("2100-01-01T00:00:00Z"),
                Some("month"),
                None,
                10
            ),
            Err(UsageError::TooManyRows {
                rows: 12_000,
                max: MAX_ROWS
            })
        );
    }

    #[test]
    fn local_days_conserve_energy() {
        // The crafted load sits in the first hour of 2027 UTC, i.e. in
        // 2026-12-31 in New York: daily rows there hold all of it.
        let q = Query::parse(
            Some("2026-12-31T00:00:00-05:00"),
            Some("2027-01-02T00:00:00-05:00"),
            Some("1d"),
            Some("America/New_York"),
            1,
        )
        .unwrap();
        let r = report(&q, &[Terms::new("a", None, None)], &minutes());
        let energy: Vec<u64> = r.rows.iter().map(|r| r.energy_millijoules).collect();
        assert_eq!(energy, vec![594_000_000, 0]);
        assert_eq!(r.rows[0].peak_demand_watts, 600.0);
        assert_eq!(r.rows[0].start, "2026-12-31T00:00:00-05:00");
    }

    #[test]
    fn rows_before_the_kept_minutes_come_from_rollups() {
        // Minutes are kept from T + 1 h on; before, one hourly rollup of
        // tenant a with a stored peak quarter of 900 kJ (1000 W).
        let mut usage = usage_of(
            crafted()
                .into_iter()
                .map(|(t, m, d)| (t, m + 3600, d))
                .collect(),
        );
        usage.minutes_from = T + 3600;
        usage.spans.insert(
            0,
            (
                "a".to_string(),
                Span {
                    start: T,
                    seconds: 3600,
                    delta: d(1_800_000_000, 3600, 1800, 3600),
                    peak_quarter_mj: Some(900_000_000),
                },
            ),
        );
        let q = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T02:00:00Z"),
            Some("1h"),
            None,
            1,
        )
        .unwrap();
        q.check_detail(&usage).unwrap();
        let r = report(&q, &[Terms::new("a", None, None)], &usage);
        let a: Vec<(u64, f64, Option<f64>)> = r
            .rows
            .iter()
            .map(|r| (r.energy_millijoules, r.peak_demand_watts, r.p95_power_watts))
            .collect();
        assert_eq!(
            a,
            vec![
                (1_800_000_000, 1000.0, None),
                (594_000_000, 600.0, Some(600.0))
            ]
        );
        // A day row over both: sums, and the higher of the two peaks.
        let day = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-02T00:00:00Z"),
            Some("1d"),
            None,
            1,
        )
        .unwrap();
        let r = report(&day, &[Terms::new("a", None, None)], &usage);
        assert_eq!(r.rows[0].energy_millijoules, 2_394_000_000);
        assert_eq!(r.rows[0].peak_demand_watts, 1000.0);
        assert_eq!(r.rows[0].p95_power_watts, None);
        // Quarter-hour rows cannot be cut from an hourly rollup.
        let quarters = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T02:00:00Z"),
            Some("15m"),
            None,
            1,
        )
        .unwrap();
        assert_eq!(
            quarters.check_detail(&usage),
            Err(UsageError::Compacted {
                before: "2027-01-01T01:00:00Z".into(),
                granularity: "hourly",
                unit: "hours"
            })
        );
        assert!(
            quarters
                .check_detail(&Usage {
                    minutes_from: T,
                    ..Usage::default()
                })
                .is_ok()
        );
        // Nor Paris days from UTC daily rollups.
        let paris = Query::parse(
            Some("2027-01-01T00:00:00+01:00"),
            Some("2027-01-02T00:00:00+01:00"),
            Some("1d"),
            Some("Europe/Paris"),
            1,
        )
        .unwrap();
        assert!(matches!(
            paris.check_detail(&Usage {
                minutes_from: T + 86_400 * 2,
                hours_from: T + 86_400 * 2,
                ..Usage::default()
            }),
            Err(UsageError::Compacted {
                granularity: "daily",
                ..
            })
        ));
        assert!(
            paris
                .check_detail(&Usage {
                    minutes_from: T + 86_400 * 2,
                    ..Usage::default()
                })
                .is_ok()
        );
        // Before the daily rollups kept, nothing is: refused, not zero.
        assert_eq!(
            paris.check_detail(&Usage {
                days_from: T + 86_400 * 2,
                ..Usage::default()
            }),
            Err(UsageError::Expired {
                before: "2027-01-03T00:00:00Z".into()
            })
        );
    }

    /// A `since_revision` past any revision a ledger can hold (above
    /// 2^63 - 1) is a cursor from another ledger, refused by name as a
    /// request error, not a failure to read the ledger.
    #[test]
    fn a_revision_beyond_any_ledger_is_ahead_of_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        drop(crate::ledger::Ledger::create(&path).unwrap());
        let reader = Reader::open(&path).unwrap();
        for since in ["9223372036854775808", "18446744073709551615"] {
            let got = run(
                &reader,
                &crate::tenants::Tenants::empty(),
                &TenantHistory::new(std::sync::Arc::new(crate::tenants::Tenants::empty())),
                None,
                Some("2027-01-01T00:00:00Z"),
                Some("2027-01-01T01:00:00Z"),
                Some("1h"),
                None,
                Some(since),
            );
            assert!(
                matches!(
                    got,
                    Err(QueryError::Usage(UsageError::RevisionAhead {
                        revision: 0,
                        ..
                    }))
                ),
                "{since}: {got:?}"
            );
        }
    }

    /// Node ids are the agent's to choose and may hold commas and quotes:
    /// an adjustment's line must still have the header's columns, with
    /// the node read back as sent (RFC 4180 quoting).
    #[test]
    fn an_adjustment_from_a_node_with_a_comma_stays_in_its_columns() {
        use crate::ledger::Adjustment;
        let node = "evil,1,\"99\"";
        let usage = Usage {
            finalized_through: T + 3600,
            revision: 2,
            adjustments: vec![Adjustment {
                revision: 2,
                booked_at: T + 7200,
                tenant: "a".to_string(),
                node: node.to_string(),
                minute_start: T,
                delta: d(1_000, 60, 60, 60),
            }],
            ..minutes()
        };
        let q = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T00:15:00Z"),
            Some("15m"),
            None,
            1,
        )
        .unwrap();
        let r = report(&q, &[Terms::new("a", None, None)], &usage);
        // Fields of one CSV line, quotes undone.
        let fields = |line: &str| -> Vec<String> {
            let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
            let mut chars = line.chars().peekable();
            while let Some(c) = chars.next() {
                match (c, quoted) {
                    ('"', true) if chars.peek() == Some(&'"') => {
                        cur.push('"');
                        chars.next();
                    }
                    ('"', _) => quoted = !quoted,
                    (',', false) => out.push(std::mem::take(&mut cur)),
                    _ => cur.push(c),
                }
            }
            out.push(cur);
            out
        };
        let header = fields(CSV_HEADER);
        let text = csv(&r);
        let line = text
            .lines()
            .find(|l| l.contains(",adjustment,"))
            .expect("an adjustment line");
        let got = fields(line);
        assert_eq!(got.len(), header.len(), "{line}");
        let column = |name: &str| header.iter().position(|h| h == name).unwrap();
        assert_eq!(got[column("node")], node);
        assert_eq!(got[column("revision")], "2");
        assert_eq!(got[column("energy_millijoules")], "1000");
    }

    /// A billing job told to ask "since a later revision" would skip the
    /// adjustments booked before it: the error must point to what is safe
    /// (a shorter period or one tenant), never to moving the cursor.
    #[test]
    fn too_many_adjustments_does_not_advise_skipping_revisions() {
        let text = UsageError::TooManyAdjustments {
            count: 10_001,
            since: 4,
            max: MAX_ROWS,
        }
        .to_string();
        assert!(!text.contains("later revision"), "{text}");
        assert!(text.contains("shorter period"), "{text}");
    }

    /// The tenants are listed before the snapshot is read: a tenant whose
    /// first energy is committed in between (a tenant file reloaded
    /// meanwhile, a late spool for its GPUs) has adjustments in the
    /// snapshot, and the answer's revision covers them. They must be in
    /// the answer, or a job asking since that revision never sees them.
    #[test]
    fn adjustments_of_a_tenant_not_yet_listed_are_not_skipped() {
        use crate::ledger::{Commit, Ledger};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        l.commit_at(&Commit::default(), T + 7200, T + 3600).unwrap();
        // A delta for a final minute of tenant `x`, which the ledger's
        // list of tenants does not hold yet (its total is not written).
        let mut late = Commit::default();
        late.buckets
            .insert((Arc::from("x"), Arc::from("n1"), T), d(5_000, 60, 60, 60));
        assert_eq!(l.commit_at(&late, T + 7300, T + 3600).unwrap().revision, 2);
        drop(l);
        let reader = Reader::open(&path).unwrap();
        let r = run(
            &reader,
            &crate::tenants::Tenants::empty(),
            &TenantHistory::new(std::sync::Arc::new(crate::tenants::Tenants::empty())),
            None,
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T01:00:00Z"),
            Some("1h"),
            None,
            Some("1"),
        )
        .unwrap();
        assert_eq!(r.revision, 2);
        let got: Vec<(&str, u64, u64)> = r
            .adjustments
            .iter()
            .map(|a| (a.tenant.as_str(), a.revision, a.energy_millijoules))
            .collect();
        assert_eq!(got, vec![("x", 2, 5_000)]);
        assert!(r.rows.iter().any(|row| row.tenant == "x"), "{:?}", r.rows);
    }
}
