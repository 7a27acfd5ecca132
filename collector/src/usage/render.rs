//! The report as CSV or as a table for people (JSON is the report's own
//! serialisation).

use std::fmt::Write as _;

use super::{Page, Report, UsageError};

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

pub(super) const CSV_HEADER: &str = "tenant,start,end,energy_millijoules,energy_kwh,gpu_hours,busy_gpu_hours,average_power_watts,peak_demand_watts,p95_power_watts,contracted_power_watts,capacity_utilization,seconds_over_contract,overage_kwh,coverage,estimated,facility_energy_kwh_estimated,readings,partial,record,node,revision,booked_at,expected_gpu_hours,basis,node_energy_millijoules,node_energy_kwh,node_coverage,node_energy_estimated,facility_energy_kwh,facility_energy_estimated,facility_energy_millijoules,facility_energy_pending,busy_unknown_gpu_hours";

fn opt(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// A field a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, a
/// tab or a carriage return first: node ids are the agent's to choose,
/// tenant ids the tenant file's) gets a `'` in front, as OWASP advises for
/// CSV. A field that is a number is left as it is: a restatement's change
/// to facility energy can be negative, and must stay a figure.
fn defused(field: &str) -> std::borrow::Cow<'_, str> {
    match field.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') if field.parse::<f64>().is_err() => {
            format!("'{field}").into()
        }
        _ => field.into(),
    }
}

/// Records written through the `csv` crate (RFC 4180 quoting where a field
/// holds a comma, a quote or a line break), `\n` line ends, formulas
/// defused.
fn write_csv(
    header: &[&str],
    records: impl Iterator<Item = Vec<String>>,
) -> Result<String, csv::Error> {
    let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
    w.write_record(header)?;
    for r in records {
        w.write_record(r.iter().map(|f| defused(f).into_owned()))?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    String::from_utf8(bytes).map_err(|e| csv::Error::from(std::io::Error::other(e)))
}

/// The report as CSV, one row per line after a header: the rows
/// (`record` `usage`), then the adjustments (`record` `adjustment`, with
/// their node, revision and booking time, their facility columns the
/// change to facility energy a meter's allocation made, and blank where a
/// figure of a row does not add up, such as peak demand or coverage).
pub fn csv(r: &Report) -> Result<String, csv::Error> {
    let header: Vec<&str> = CSV_HEADER.split(',').collect();
    let rows = r.rows.iter().map(|row| {
        vec![
            row.tenant.clone(),
            row.start.clone(),
            row.end.clone(),
            row.energy_millijoules.to_string(),
            row.energy_kwh.to_string(),
            row.gpu_hours.to_string(),
            row.busy_gpu_hours.to_string(),
            row.average_power_watts.to_string(),
            opt(row.peak_demand_watts),
            opt(row.p95_power_watts),
            opt(row.contracted_power_watts),
            opt(row.capacity_utilization),
            opt(row.seconds_over_contract),
            opt(row.overage_kwh),
            opt(row.coverage),
            row.estimated.to_string(),
            opt(row.facility_energy_kwh_estimated),
            row.readings.to_string(),
            row.partial.to_string(),
            "usage".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            row.basis.clone(),
            row.node_energy_millijoules.to_string(),
            row.node_energy_kwh.to_string(),
            opt(row.node_coverage),
            row.node_energy_estimated.to_string(),
            opt(row.facility_energy_kwh),
            row.facility_energy_estimated.to_string(),
            row.facility_energy_millijoules
                .map(|v| v.to_string())
                .unwrap_or_default(),
            row.facility_energy_pending.to_string(),
            row.busy_unknown_gpu_hours.to_string(),
        ]
    });
    let adjustments = r.adjustments.iter().map(|a| {
        let blank = String::new;
        // Blank in an adjustment that restates no facility energy.
        let restated = a.facility_energy_restated_millijoules.filter(|_| {
            a.facility_allocated_millijoules > 0 || a.facility_replaced_node_millijoules > 0
        });
        vec![
            a.tenant.clone(),
            a.start.clone(),
            a.end.clone(),
            a.energy_millijoules.to_string(),
            a.energy_kwh.to_string(),
            a.gpu_hours.to_string(),
            a.busy_gpu_hours.to_string(),
            a.average_power_watts.to_string(),
            blank(),
            blank(),
            blank(),
            blank(),
            a.seconds_over_contract.to_string(),
            a.overage_kwh.to_string(),
            blank(),
            a.estimated.to_string(),
            blank(),
            a.readings.to_string(),
            "false".into(),
            "adjustment".into(),
            a.node.clone(),
            a.revision.to_string(),
            a.booked_at.clone(),
            a.expected_gpu_hours.to_string(),
            blank(),
            a.node_energy_millijoules.to_string(),
            a.node_energy_kwh.to_string(),
            blank(),
            a.node_energy_estimated.to_string(),
            restated
                .map(|v| (v as f64 / 3.6e9).to_string())
                .unwrap_or_default(),
            blank(),
            restated.map(|v| v.to_string()).unwrap_or_default(),
            blank(),
            a.busy_unknown_gpu_hours.to_string(),
        ]
    });
    write_csv(&header, rows.chain(adjustments))
}

/// The columns of a page as CSV: `record` (`usage` or `adjustment`), then
/// every field of a row's and of an adjustment's JSON, by the same names
/// (which carry their units: `_millijoules`, `_kwh`, `_hours`, `_watts`,
/// `_seconds`; ratios and counts are bare). A field a record does not
/// have is blank.
pub const PAGE_COLUMNS: &[&str] = &[
    "record",
    "id",
    "tenant",
    "start",
    "end",
    "step",
    "revision",
    "node",
    "booked_at",
    "energy_millijoules",
    "energy_joules",
    "energy_kwh",
    "gpu_hours",
    "busy_gpu_hours",
    "expected_gpu_hours",
    "average_power_watts",
    "peak_demand_watts",
    "p95_power_watts",
    "contracted_power_watts",
    "capacity_utilization",
    "seconds_over_contract",
    "overage_kwh",
    "coverage",
    "estimated",
    "facility_energy_kwh_estimated",
    "readings",
    "partial",
    "basis",
    "node_energy_millijoules",
    "node_energy_kwh",
    "node_coverage",
    "node_energy_estimated",
    "facility_energy_millijoules",
    "facility_energy_kwh",
    "facility_energy_estimated",
    "facility_energy_pending",
    "facility_allocated_millijoules",
    "facility_replaced_node_millijoules",
    "facility_energy_restated_millijoules",
    // Appended, so every earlier column keeps its position.
    "gpu",
    "busy_unknown_gpu_hours",
];

/// A JSON value as a CSV field: strings as they are, null blank.
fn cell(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// A page as CSV: its rows (`record` `usage`), then its adjustments
/// (`record` `adjustment`), each field from the record's own JSON, so that
/// CSV and JSON say the same.
pub fn page_csv(p: &Page) -> Result<String, csv::Error> {
    let record = |kind: &str, v: serde_json::Value| -> Vec<String> {
        PAGE_COLUMNS
            .iter()
            .map(|c| match *c {
                "record" => kind.to_string(),
                c => cell(v.get(c)),
            })
            .collect()
    };
    let value = |v: serde_json::Result<serde_json::Value>| v.unwrap_or_default();
    let rows = p
        .rows
        .iter()
        .map(|r| record("usage", value(serde_json::to_value(r))));
    let adjustments = p
        .adjustments
        .iter()
        .map(|a| record("adjustment", value(serde_json::to_value(a))));
    write_csv(PAGE_COLUMNS, rows.chain(adjustments))
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
            row.peak_demand_watts.unwrap_or(f64::NAN),
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
    use super::defused;

    /// A restatement can lower facility energy, so a figure may be
    /// negative: it stays a number a spreadsheet sums, while text that
    /// would run as a formula is still quoted.
    #[test]
    fn a_negative_figure_stays_a_number_and_a_formula_is_quoted() {
        assert_eq!(defused("-1200"), "-1200");
        assert_eq!(defused("-0.25"), "-0.25");
        assert_eq!(defused("+3"), "+3");
        assert_eq!(defused("-1+1"), "'-1+1");
        assert_eq!(defused("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(defused("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(defused("\tnode"), "'\tnode");
        assert_eq!(defused("node-1"), "node-1");
    }
}
