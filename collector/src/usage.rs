//! Usage for billing jobs: per-tenant rows over any period and step, read
//! from the ledger's minute buckets, as JSON, CSV or a table.
//!
//! *Boundary:* query parameters come from HTTP clients and the command
//! line; every error names the parameter and maps to a 4xx in `http.rs`.
//!
//! Times are UTC (RFC 3339 with `Z`); `from` is inclusive and `to`
//! exclusive, both aligned to the step. Peak demand follows utility
//! practice: the highest average power over an aligned quarter-hour that
//! overlaps the row.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::ledger::{BucketDelta, LedgerError, Reader};
use crate::tenants::{Tenants, UNASSIGNED};

/// Most rows one request may return (rows × tenants).
pub const MAX_ROWS: i64 = 10_000;
const QUARTER: i64 = 900;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Minute,
    Quarter,
    Hour,
    Day,
}

impl Step {
    pub fn parse(s: &str) -> Result<Self, UsageError> {
        Ok(match s {
            "1m" => Step::Minute,
            "15m" => Step::Quarter,
            "1h" => Step::Hour,
            "1d" => Step::Day,
            other => return Err(UsageError::Step(other.to_string())),
        })
    }

    pub fn seconds(self) -> i64 {
        match self {
            Step::Minute => 60,
            Step::Quarter => QUARTER,
            Step::Hour => 3600,
            Step::Day => 86_400,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Step::Minute => "1m",
            Step::Quarter => "15m",
            Step::Hour => "1h",
            Step::Day => "1d",
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
    #[error("`{param}`: {value:?} is not an RFC 3339 UTC time such as 2026-11-01T00:00:00Z")]
    Time { param: &'static str, value: String },
    #[error("`{param}` must be aligned to the step {step}")]
    Misaligned {
        param: &'static str,
        step: &'static str,
    },
    #[error("`from` must be before `to`")]
    Empty,
    #[error("the period holds {rows} rows; at most {max} per request")]
    TooManyRows { rows: i64, max: i64 },
    #[error("`step`: {0:?} is not one of 1m, 15m, 1h, 1d")]
    Step(String),
    #[error("`format`: {0:?} is not one of json, csv")]
    Format(String),
    #[error("`tz`: only UTC is supported so far")]
    TimeZone,
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
}

/// What a tenant's rows are computed against.
#[derive(Debug, Clone, PartialEq)]
pub struct Terms {
    pub tenant: String,
    pub contracted_milliwatts: Option<u64>,
    /// Power usage effectiveness of the tenant's site, if configured.
    pub pue: Option<f64>,
}

impl Terms {
    pub fn new(tenant: &str, contracted_milliwatts: Option<u64>, pue: Option<f64>) -> Self {
        Self {
            tenant: tenant.to_string(),
            contracted_milliwatts,
            pue,
        }
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
/// or only `tenant`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    reader: &Reader,
    tenants: &Tenants,
    tenant: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    step: Option<&str>,
    tz: Option<&str>,
    grace: Duration,
) -> Result<Report, QueryError> {
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
    let selected = match tenant {
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
    let minutes = reader.minutes(tenant, lo, hi)?;
    Ok(report(&q, &selected, &minutes, now_unix(), grace))
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub from: i64,
    pub to: i64,
    pub step: Step,
}

fn parse_time(param: &'static str, value: Option<&str>) -> Result<i64, UsageError> {
    let value = value.ok_or(UsageError::Missing { param })?;
    let bad = || UsageError::Time {
        param,
        value: value.to_string(),
    };
    let t = humantime::parse_rfc3339(value).map_err(|_| bad())?;
    let secs = t.duration_since(UNIX_EPOCH).map_err(|_| bad())?;
    if secs.subsec_nanos() != 0 {
        return Err(bad());
    }
    i64::try_from(secs.as_secs()).map_err(|_| bad())
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
        if tz.is_some_and(|z| !matches!(z, "UTC" | "Etc/UTC" | "Z")) {
            return Err(UsageError::TimeZone);
        }
        let step = Step::parse(step.unwrap_or("1h"))?;
        let from = parse_time("from", from)?;
        let to = parse_time("to", to)?;
        for (param, t) in [("from", from), ("to", to)] {
            if t % step.seconds() != 0 {
                return Err(UsageError::Misaligned {
                    param,
                    step: step.label(),
                });
            }
        }
        if from >= to {
            return Err(UsageError::Empty);
        }
        let rows = (to - from) / step.seconds() * tenants.max(1) as i64;
        if rows > MAX_ROWS {
            return Err(UsageError::TooManyRows {
                rows,
                max: MAX_ROWS,
            });
        }
        Ok(Self { from, to, step })
    }

    /// The minutes to read: the period widened to whole quarter-hours, for
    /// peak demand.
    pub fn read_range(&self) -> (i64, i64) {
        (
            self.from.div_euclid(QUARTER) * QUARTER,
            (self.to + QUARTER - 1).div_euclid(QUARTER) * QUARTER,
        )
    }
}

/// One row of usage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub tenant: String,
    pub start: String,
    pub end: String,
    pub energy_millijoules: u64,
    pub energy_joules: f64,
    pub energy_kwh: f64,
    pub gpu_hours: f64,
    pub busy_gpu_hours: f64,
    pub average_power_watts: f64,
    pub peak_demand_watts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contracted_power_watts: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_utilization: Option<f64>,
    /// 95th percentile of the 5-minute average power within the row (rows
    /// of 15 minutes or more).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95_power_watts: Option<f64>,
    pub seconds_over_contract: f64,
    /// Integral of max(0, power - contract): what committed-plus-overage
    /// contracts bill.
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

#[derive(Debug, Serialize)]
pub struct Report {
    pub from: String,
    pub to: String,
    pub step: &'static str,
    /// Rows ending at or before this will not change any more.
    pub finalized_through: String,
    pub rows: Vec<Row>,
}

pub fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Builds the report for `tenants` (id, contracted mW) from the minute
/// buckets read over `q.read_range()`. Every tenant gets a row for every
/// step, with zeros where nothing was recorded. `now` decides which rows
/// are partial; `grace` is how long late samples may still arrive.
pub fn report(
    q: &Query,
    tenants: &[Terms],
    minutes: &[(String, i64, BucketDelta)],
    now: i64,
    grace: Duration,
) -> Report {
    let mut by_tenant: BTreeMap<&str, BTreeMap<i64, BucketDelta>> = BTreeMap::new();
    for (t, m, d) in minutes {
        by_tenant.entry(t.as_str()).or_default().insert(*m, *d);
    }
    let open_minute = now.div_euclid(60) * 60;
    let finalized = open_minute - i64::try_from(grace.as_secs()).unwrap_or(0);
    let step = q.step.seconds();
    let empty = BTreeMap::new();
    let mut rows = Vec::new();
    for terms in tenants {
        let tenant = &terms.tenant;
        let mins = by_tenant.get(tenant.as_str()).unwrap_or(&empty);
        let sum = |from: i64, to: i64| {
            mins.range(from..to)
                .fold(BucketDelta::default(), |mut acc, (_, d)| {
                    acc.add(d);
                    acc
                })
        };
        let mut start = q.from;
        while start < q.to {
            let end = start + step;
            let d = sum(start, end);
            // Highest quarter-hour average among those overlapping the row.
            let mut peak_mj = 0u64;
            let mut quarter = start.div_euclid(QUARTER) * QUARTER;
            while quarter < end {
                peak_mj = peak_mj.max(sum(quarter, quarter + QUARTER).energy_mj);
                quarter += QUARTER;
            }
            let average_w = d.energy_mj as f64 / 1000.0 / step as f64;
            let contracted_w = terms.contracted_milliwatts.map(|c| c as f64 / 1000.0);
            let p95 = (step >= QUARTER).then(|| {
                let mut fives: Vec<u64> = (0..step / 300)
                    .map(|i| sum(start + i * 300, start + (i + 1) * 300).energy_mj)
                    .collect();
                fives.sort_unstable();
                // Nearest rank: the smallest value with at least 95 % at or
                // below it.
                let rank = (fives.len() * 95).div_ceil(100).max(1);
                fives[rank - 1] as f64 / 1000.0 / 300.0
            });
            let energy_kwh = d.energy_mj as f64 / 3.6e9;
            rows.push(Row {
                tenant: tenant.clone(),
                start: rfc3339(start),
                end: rfc3339(end),
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
                seconds_over_contract: d.over_contract_ns as f64 / 1e9,
                overage_kwh: d.overage_mj as f64 / 3.6e9,
                coverage: (d.expected_gpu_ns > 0)
                    .then(|| d.gpu_ns as f64 / d.expected_gpu_ns as f64),
                estimated: d.estimated_mj > 0,
                facility_energy_kwh_estimated: terms.pue.map(|pue| energy_kwh * pue),
                readings: d.samples,
                partial: end > finalized,
            });
            start = end;
        }
    }
    Report {
        from: rfc3339(q.from),
        to: rfc3339(q.to),
        step: q.step.label(),
        finalized_through: rfc3339(finalized),
        rows,
    }
}

const CSV_HEADER: &str = "tenant,start,end,energy_millijoules,energy_kwh,gpu_hours,busy_gpu_hours,average_power_watts,peak_demand_watts,p95_power_watts,contracted_power_watts,capacity_utilization,seconds_over_contract,overage_kwh,coverage,estimated,facility_energy_kwh_estimated,readings,partial";

fn opt(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// The report as CSV, one row per line after a header.
pub fn csv(r: &Report) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for row in &r.rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
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
    let _ = writeln!(out, "finalized through {}", r.finalized_through);
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
        let cases: [Case; 8] = [
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
                Some("Europe/Paris"),
                UsageError::TimeZone,
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
    }

    /// A crafted load: tenant a draws 36 kJ/min (600 W) for the first
    /// quarter-hour, then 3.6 kJ/min (60 W); tenant b one burst minute.
    fn minutes() -> Vec<(String, i64, BucketDelta)> {
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
        // a: over its 1 kW contract? No; but booked overage in minute 2 (as
        // the evaluator would) and estimated energy in minute 16, with a
        // gap: 30 s of its 60 s not backed by readings.
        m[2].2.over_contract_ns = 30_000_000_000;
        m[2].2.overage_mj = 7_200_000;
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
        let r = report(
            &q,
            &tenants,
            &minutes(),
            T + 86_400,
            Duration::from_secs(600),
        );
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
        // "now" inside the second quarter: it is partial.
        let r = report(
            &q,
            &tenants,
            &minutes(),
            T + 26 * 60 + 5,
            Duration::from_secs(600),
        );
        let json = serde_json::to_string_pretty(&r).unwrap();
        let want_json = r#"{
  "from": "2027-01-01T00:00:00Z",
  "to": "2027-01-01T00:30:00Z",
  "step": "15m",
  "finalized_through": "2027-01-01T00:16:00Z",
  "rows": [
    {
      "tenant": "a",
      "start": "2027-01-01T00:00:00Z",
      "end": "2027-01-01T00:15:00Z",
      "energy_millijoules": 540000000,
      "energy_joules": 540000.0,
      "energy_kwh": 0.15,
      "gpu_hours": 0.25,
      "busy_gpu_hours": 0.25,
      "average_power_watts": 600.0,
      "peak_demand_watts": 600.0,
      "contracted_power_watts": 1000.0,
      "capacity_utilization": 0.6,
      "p95_power_watts": 600.0,
      "seconds_over_contract": 30.0,
      "overage_kwh": 0.002,
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
      "energy_millijoules": 54000000,
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
  ]
}"#;
        assert_eq!(json, want_json);
        let want_csv = "tenant,start,end,energy_millijoules,energy_kwh,gpu_hours,busy_gpu_hours,average_power_watts,peak_demand_watts,p95_power_watts,contracted_power_watts,capacity_utilization,seconds_over_contract,overage_kwh,coverage,estimated,facility_energy_kwh_estimated,readings,partial
a,2027-01-01T00:00:00Z,2027-01-01T00:15:00Z,540000000,0.15,0.25,0.25,600,600,600,1000,0.6,30,0.002,1,false,0.18,900,false
a,2027-01-01T00:15:00Z,2027-01-01T00:30:00Z,54000000,0.015,0.24166666666666667,0.025,60,60,60,1000,0.06,0,0,0.9666666666666667,true,0.018,900,true
";
        assert_eq!(csv(&r), want_csv);
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
            report(&q, &tenants, &minutes(), T + 86_400, Duration::ZERO)
                .rows
                .iter()
                .map(|r| r.energy_millijoules)
                .sum::<u64>()
        };
        assert_eq!(total("1m"), 594_000_000);
        assert_eq!(total("15m"), 594_000_000);
        assert_eq!(total("1h"), 594_000_000);
    }
}
