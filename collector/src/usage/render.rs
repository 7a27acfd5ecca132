//! The report as CSV or as a table for people (JSON is the report's own
//! serialisation).

use std::fmt::Write as _;

use super::{Report, UsageError};

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

pub(super) const CSV_HEADER: &str = "tenant,start,end,energy_millijoules,energy_kwh,gpu_hours,busy_gpu_hours,average_power_watts,peak_demand_watts,p95_power_watts,contracted_power_watts,capacity_utilization,seconds_over_contract,overage_kwh,coverage,estimated,facility_energy_kwh_estimated,readings,partial,record,node,revision,booked_at,expected_gpu_hours,basis,node_energy_millijoules,node_energy_kwh,node_coverage,node_energy_estimated,facility_energy_kwh,facility_energy_estimated,facility_energy_millijoules,facility_energy_pending";

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
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},usage,,,,,{},{},{},{},{},{},{},{},{}",
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
            row.partial,
            row.basis,
            row.node_energy_millijoules,
            row.node_energy_kwh,
            opt(row.node_coverage),
            row.node_energy_estimated,
            opt(row.facility_energy_kwh),
            row.facility_energy_estimated,
            row.facility_energy_millijoules
                .map(|v| v.to_string())
                .unwrap_or_default(),
            row.facility_energy_pending
        );
    }
    for a in &r.adjustments {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},,,,,{},{},,{},,{},false,adjustment,{},{},{},{},,{},{},,{},,,,",
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
            a.expected_gpu_hours,
            a.node_energy_millijoules,
            a.node_energy_kwh,
            a.node_energy_estimated
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
