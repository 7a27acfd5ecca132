//! The reconciliation view of facility meters (`GET /v1/meters`, the
//! `meters` command): per meter and row of the period, the metered
//! energy of its allocated minutes, what its nodes measured, their ratio,
//! the difference (distribution loss and overhead), what no tenant took,
//! and each tenant's allocated energy. Exact integers (mJ) beside kWh.
//!
//! Periods are parsed as for usage (`from`, `to`, `step`, `tz`); rows
//! hold only minutes already allocated (final), and say how many. Past
//! the minute retention the ledger keeps a meter's minutes as hourly
//! sums, which answer the same for rows of whole hours; a row that would
//! cut one is refused, as usage is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Query, QueryError, UsageError, rfc3339};
use crate::ledger::{HOUR, LedgerReader, MeterMinute};

const MJ_PER_KWH: f64 = 3_600_000_000.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterReport {
    pub from: String,
    pub to: String,
    pub step: String,
    pub tz: String,
    pub rows: Vec<MeterRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterRow {
    pub meter: String,
    pub period_start: String,
    pub period_end: String,
    /// Minutes of the row allocated so far (final minutes only).
    pub minutes: u64,
    pub metered_mj: u64,
    pub measured_mj: u64,
    pub unallocated_mj: u64,
    pub metered_kwh: f64,
    pub measured_kwh: f64,
    /// Metered / measured; absent when nothing was measured.
    pub ratio: Option<f64>,
    /// Metered minus measured (negative: the meter read less than its
    /// nodes): distribution loss and overhead.
    pub loss_kwh: f64,
    pub unallocated_kwh: f64,
    pub tenants: Vec<MeterTenant>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterTenant {
    pub tenant: String,
    pub measured_mj: u64,
    pub allocated_mj: u64,
    pub measured_kwh: f64,
    pub allocated_kwh: f64,
}

#[derive(Default)]
struct Sums {
    minutes: u64,
    metered: u64,
    measured: u64,
    unallocated: u64,
    tenants: BTreeMap<String, (u64, u64)>,
}

fn kwh(mj: u64) -> f64 {
    mj as f64 / MJ_PER_KWH
}

/// The report of `meters` (configured ones; meters the ledger holds rows
/// of are added) over the period the parameters give.
pub fn run(
    reader: &dyn LedgerReader,
    meters: &[String],
    from: Option<&str>,
    to: Option<&str>,
    step: Option<&str>,
    tz: Option<&str>,
) -> Result<MeterReport, QueryError> {
    let q = Query::parse(from, to, step, tz, meters.len().max(1))?;
    // Minutes past the minute retention are kept as hourly sums: each
    // must lie within one row of the answer.
    let hours = reader.meter_hours(None, q.from.div_euclid(HOUR) * HOUR, q.to)?;
    let row_of = |t: i64| q.bounds.partition_point(|b| *b <= t).saturating_sub(1);
    if let Some(kept) = hours
        .iter()
        .filter(|(_, _, h)| {
            h.minute < q.from
                || h.minute + HOUR > q.to
                || row_of(h.minute) != row_of(h.minute + HOUR - 1)
        })
        .map(|(_, _, h)| h.minute + HOUR)
        .max()
    {
        return Err(UsageError::Compacted {
            before: rfc3339(kept),
            granularity: "hourly",
            unit: "hours",
        }
        .into());
    }
    let minutes: Vec<(String, u64, MeterMinute)> = hours
        .into_iter()
        .chain(
            reader
                .meter_minutes(None, q.from, q.to)?
                .into_iter()
                .map(|(m, mm)| (m, 1, mm)),
        )
        .collect();
    let mut names: Vec<String> = meters.to_vec();
    for (m, _, _) in &minutes {
        if !names.contains(m) {
            names.push(m.clone());
        }
    }
    names.sort();
    let rows_per_meter = q.bounds.len().saturating_sub(1);
    let mut sums: BTreeMap<&str, Vec<Sums>> = names
        .iter()
        .map(|n| {
            (
                n.as_str(),
                (0..rows_per_meter).map(|_| Sums::default()).collect(),
            )
        })
        .collect();
    for (meter, n, mm) in &minutes {
        let row = row_of(mm.minute);
        let Some(s) = sums.get_mut(meter.as_str()).and_then(|v| v.get_mut(row)) else {
            continue;
        };
        s.minutes += n;
        s.metered += mm.metered_mj;
        s.measured += mm.measured_mj;
        s.unallocated += mm.unallocated_mj;
        for share in &mm.tenants {
            let e = s.tenants.entry(share.tenant.clone()).or_default();
            e.0 += share.measured_mj;
            e.1 += share.allocated_mj;
        }
    }
    let mut rows = Vec::new();
    for (meter, per_row) in sums {
        for (i, s) in per_row.into_iter().enumerate() {
            rows.push(MeterRow {
                meter: meter.to_string(),
                period_start: q.zone.format(q.bounds[i]),
                period_end: q.zone.format(q.bounds[i + 1]),
                minutes: s.minutes,
                metered_mj: s.metered,
                measured_mj: s.measured,
                unallocated_mj: s.unallocated,
                metered_kwh: kwh(s.metered),
                measured_kwh: kwh(s.measured),
                ratio: (s.measured > 0).then(|| s.metered as f64 / s.measured as f64),
                loss_kwh: (s.metered as f64 - s.measured as f64) / MJ_PER_KWH,
                unallocated_kwh: kwh(s.unallocated),
                tenants: s
                    .tenants
                    .into_iter()
                    .map(|(tenant, (m, a))| MeterTenant {
                        tenant,
                        measured_mj: m,
                        allocated_mj: a,
                        measured_kwh: kwh(m),
                        allocated_kwh: kwh(a),
                    })
                    .collect(),
            });
        }
    }
    Ok(MeterReport {
        from: rfc3339(q.from),
        to: rfc3339(q.to),
        step: q.step.label().to_string(),
        tz: q.zone.name.clone(),
        rows,
    })
}

/// CSV: one line per (meter, row, tenant), the meter's figures repeated;
/// a row with no tenant has one line with the tenant columns empty.
pub fn csv(r: &MeterReport) -> String {
    let mut out = String::from(
        "meter,period_start,period_end,minutes,metered_kwh,measured_kwh,ratio,loss_kwh,unallocated_kwh,metered_mj,measured_mj,unallocated_mj,tenant,tenant_measured_mj,tenant_allocated_mj,tenant_allocated_kwh\n",
    );
    for row in &r.rows {
        let head = format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            row.meter,
            row.period_start,
            row.period_end,
            row.minutes,
            row.metered_kwh,
            row.measured_kwh,
            row.ratio.map(|x| x.to_string()).unwrap_or_default(),
            row.loss_kwh,
            row.unallocated_kwh,
            row.metered_mj,
            row.measured_mj,
            row.unallocated_mj
        );
        if row.tenants.is_empty() {
            out.push_str(&format!("{head},,,,\n"));
        }
        for t in &row.tenants {
            out.push_str(&format!(
                "{head},{},{},{},{}\n",
                t.tenant, t.measured_mj, t.allocated_mj, t.allocated_kwh
            ));
        }
    }
    out
}

/// A table for people: one line per meter and row, tenants indented.
pub fn table(r: &MeterReport) -> String {
    let mut out = format!(
        "{:<16} {:<25} {:>7} {:>14} {:>14} {:>7} {:>12}\n",
        "meter", "period_start", "minutes", "metered_kwh", "measured_kwh", "ratio", "loss_kwh"
    );
    for row in &r.rows {
        out.push_str(&format!(
            "{:<16} {:<25} {:>7} {:>14.6} {:>14.6} {:>7} {:>12.6}\n",
            row.meter,
            row.period_start,
            row.minutes,
            row.metered_kwh,
            row.measured_kwh,
            row.ratio.map_or("-".to_string(), |x| format!("{x:.4}")),
            row.loss_kwh
        ));
        for t in &row.tenants {
            out.push_str(&format!(
                "  {:<40} allocated {:>14.6} kWh (measured {:.6})\n",
                t.tenant, t.allocated_kwh, t.measured_kwh
            ));
        }
        if row.unallocated_mj > 0 {
            out.push_str(&format!(
                "  {:<40} {:>24.6} kWh\n",
                "(unallocated: nothing measured)", row.unallocated_kwh
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Ledger, MeterMinute, MeterState, Reader};

    /// 2027-01-15T08:00:00Z.
    const M: i64 = 1_800_000_000;

    #[test]
    fn rows_sum_the_allocated_minutes_of_each_meter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut w = Ledger::create(&path).unwrap();
        let minute = |k: i64, metered, tenants: Vec<(&str, u64, u64)>| MeterMinute {
            minute: M + 60 * k,
            metered_mj: metered,
            measured_mj: tenants.iter().map(|t| t.1).sum(),
            unallocated_mj: if tenants.is_empty() { metered } else { 0 },
            tenants: tenants
                .into_iter()
                .map(|(t, m, a)| crate::ledger::MeterShare::new(t, m, a, m))
                .collect(),
        };
        let minutes = vec![
            minute(
                0,
                3_600_000_000,
                vec![
                    ("lab-a", 2_000_000_000, 2_400_000_000),
                    ("lab-b", 1_000_000_000, 1_200_000_000),
                ],
            ),
            minute(14, 900, vec![("lab-a", 1_000, 900)]),
            // The second quarter: nothing measured.
            minute(15, 7_200_000_000, vec![]),
        ];
        let state = MeterState {
            allocated_through: M + 16 * 60,
            reading_at_ns: 0,
            reading_raw: 0,
            carry_mj: 0,
            revision: 0,
        };
        assert!(w.allocate_meter("row-a", None, &state, &minutes).unwrap());
        let reader = Reader::open(&path).unwrap();
        let r = run(
            &reader,
            &["row-a".to_string(), "idle".to_string()],
            Some("2027-01-15T08:00:00Z"),
            Some("2027-01-15T08:30:00Z"),
            Some("15m"),
            None,
        )
        .unwrap();
        expect_test::expect![[r#"
            meter,period_start,period_end,minutes,metered_kwh,measured_kwh,ratio,loss_kwh,unallocated_kwh,metered_mj,measured_mj,unallocated_mj,tenant,tenant_measured_mj,tenant_allocated_mj,tenant_allocated_kwh
            idle,2027-01-15T08:00:00Z,2027-01-15T08:15:00Z,0,0,0,,0,0,0,0,0,,,,
            idle,2027-01-15T08:15:00Z,2027-01-15T08:30:00Z,0,0,0,,0,0,0,0,0,,,,
            row-a,2027-01-15T08:00:00Z,2027-01-15T08:15:00Z,2,1.00000025,0.8333336111111111,1.1999999000000334,0.16666663888888889,0,3600000900,3000001000,0,lab-a,2000001000,2400000900,0.6666669166666667
            row-a,2027-01-15T08:00:00Z,2027-01-15T08:15:00Z,2,1.00000025,0.8333336111111111,1.1999999000000334,0.16666663888888889,0,3600000900,3000001000,0,lab-b,1000000000,1200000000,0.3333333333333333
            row-a,2027-01-15T08:15:00Z,2027-01-15T08:30:00Z,1,2,0,,2,2,7200000000,0,7200000000,,,,
        "#]]
        .assert_eq(&csv(&r));
        let a = &r.rows[2];
        assert_eq!(
            a.tenants.iter().map(|t| t.allocated_mj).sum::<u64>() + a.unallocated_mj,
            a.metered_mj
        );
    }
}
