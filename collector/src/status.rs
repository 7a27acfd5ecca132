//! The status page at `/`: one HTML page, no JavaScript, that an operator
//! opens in a browser. Each tenant's live power against its contract as a
//! bar, the headroom, the energy of today (UTC) from the ledger, GPUs and
//! nodes gone stale, and links to `/metrics` and the usage API. It reloads
//! itself every few seconds.
//!
//! *Boundary:* tenant names and ids, node ids and ledger errors are
//! written into HTML; every such string goes through [`escape`].

use std::fmt::Write as _;

use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::ledger::DAY;
use crate::usage::rfc3339;

/// How often the page reloads itself, seconds.
const REFRESH_SECONDS: u32 = 5;

/// What the page shows, as plain data: built by `http.rs` from the
/// collector's state and the ledger, so that this module knows neither.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusView {
    /// One row per tenant, `unassigned` included, in the tenant file's order.
    pub tenants: Vec<TenantRow>,
    /// Nodes with no fresh sample, by id.
    pub stale_nodes: Vec<StaleNode>,
    /// The start of today (UTC), Unix seconds: energy is counted from it.
    pub today: i64,
    /// Why the energy of today could not be read from the ledger.
    pub ledger_error: Option<String>,
}

/// One tenant's row.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub contracted_watts: Option<f64>,
    pub power_watts: f64,
    /// What the contract is measured on ("gpu", "node", "facility").
    pub basis: &'static str,
    /// Power on that basis; none where it is unknown (no fresh whole-node
    /// reading for a node or facility basis).
    pub basis_power_watts: Option<f64>,
    /// The tenant's share of its nodes' live whole-node power; none where
    /// none of its nodes has a fresh whole-node reading.
    pub node_power_watts: Option<f64>,
    pub reporting: u64,
    pub stale: u64,
    /// Committed to the ledger today; none when the ledger could not be read.
    pub energy_today_mj: Option<u64>,
}

/// A node with no fresh sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleNode {
    pub id: String,
    pub tenant: String,
    /// Since its latest sample; none if it never sent one.
    pub silent_seconds: Option<u64>,
}

/// The page for `view`, as an HTML response that no cache keeps.
pub fn page(view: &StatusView) -> Response {
    let body = render(
        &view.tenants,
        &view.stale_nodes,
        view.today,
        view.ledger_error.as_deref(),
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn kw(watts: f64) -> String {
    format!("{:.2} kW", watts / 1000.0)
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222;background:#fafafa}\
table{border-collapse:collapse;margin-bottom:1.5em}\
th,td{padding:.4em .8em;text-align:left;border-bottom:1px solid #ddd}\
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}\
.bar{width:16em;height:1em;background:#e4e4e4;border:1px solid #bbb}\
.fill{height:100%}.ok{background:#3a8f3a}.near{background:#d99a00}.over{background:#c62828}\
.muted{color:#777}.nodata{color:#8a5a00}";

/// The page. Only `escape`d strings and numbers are interpolated.
fn render(
    rows: &[TenantRow],
    stale_nodes: &[StaleNode],
    today: i64,
    ledger_error: Option<&str>,
) -> String {
    let mut h = String::new();
    let day = escape(&rfc3339(today));
    let usage_link = format!(
        "/v1/usage?from={}&amp;to={}&amp;step=1h",
        escape(&rfc3339(today)),
        escape(&rfc3339(today + DAY))
    );
    // Writing to a String cannot fail.
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>capwatch status</title><style>{STYLE}</style></head><body>\
         <h1>capwatch status</h1>\
         <p class=\"muted\">Live power of fresh GPUs and nodes; the contract is measured on \
         its basis; energy since {day} (UTC, committed to the ledger). Reloads every \
         {REFRESH_SECONDS} s.</p>\
         <table><thead><tr><th>tenant</th><th>power / contract</th><th></th>\
         <th>power</th><th>node power</th><th>contract</th><th>headroom</th><th>energy today</th>\
         <th>GPUs reporting</th><th>GPUs stale</th></tr></thead><tbody>"
    );
    for r in rows {
        // No fresh GPU: no data, never 0 W with the whole contract free.
        let no_data = r.reporting == 0;
        let (bar, ratio, contract, headroom) = match (r.contracted_watts, r.basis_power_watts) {
            _ if no_data => (
                "<strong class=\"nodata\">NO DATA</strong>".to_string(),
                String::new(),
                r.contracted_watts
                    .map_or_else(|| "—".to_string(), |c| format!("{} ({})", kw(c), r.basis)),
                "—".to_string(),
            ),
            (Some(c), None) => (
                format!("<span class=\"muted\">no {} power reading</span>", r.basis),
                String::new(),
                format!("{} ({})", kw(c), r.basis),
                "—".to_string(),
            ),
            (Some(c), Some(basis_watts)) => {
                let ratio = basis_watts / c;
                let class = if ratio > 1.0 {
                    "over"
                } else if ratio > 0.95 {
                    "near"
                } else {
                    "ok"
                };
                let width = (ratio.clamp(0.0, 1.0) * 100.0).round();
                (
                    format!(
                        "<div class=\"bar\" title=\"{:.1} % of contract\">\
                         <div class=\"fill {class}\" style=\"width:{width}%\"></div></div>",
                        ratio * 100.0
                    ),
                    format!("{:.1} %", ratio * 100.0),
                    format!("{} ({})", kw(c), r.basis),
                    kw(c - basis_watts),
                )
            }
            (None, _) => (
                "<span class=\"muted\">no contract</span>".to_string(),
                String::new(),
                "—".to_string(),
                "—".to_string(),
            ),
        };
        let energy = r.energy_today_mj.map_or_else(
            || "—".to_string(),
            |mj| format!("{:.3} kWh", mj as f64 / 3.6e9),
        );
        let _ = write!(
            h,
            "<tr id=\"tenant-{id}\"><td><strong>{name}</strong><br>\
             <span class=\"muted\">{id}</span></td>\
             <td>{bar}</td><td class=\"num\">{ratio}</td>\
             <td class=\"num\">{power}</td><td class=\"num\">{node_power}</td>\
             <td class=\"num\">{contract}</td>\
             <td class=\"num\">{headroom}</td><td class=\"num\">{energy}</td>\
             <td class=\"num\">{reporting}</td><td class=\"num\">{stale}</td></tr>",
            id = escape(&r.id),
            name = escape(&r.name),
            power = if no_data {
                "NO DATA".to_string()
            } else {
                kw(r.power_watts)
            },
            node_power = r.node_power_watts.map_or_else(|| "—".to_string(), kw),
            reporting = r.reporting,
            stale = r.stale,
        );
    }
    h.push_str("</tbody></table>");
    if let Some(e) = ledger_error {
        let _ = write!(
            h,
            "<p class=\"over\">Energy today unavailable: {}</p>",
            escape(e)
        );
    }
    h.push_str("<h2>Stale nodes</h2>");
    if stale_nodes.is_empty() {
        h.push_str("<p>None: every known node is reporting.</p>");
    } else {
        h.push_str(
            "<table><thead><tr><th>node</th><th>tenant</th><th>last sample</th></tr></thead><tbody>",
        );
        for n in stale_nodes {
            let silent = n
                .silent_seconds
                .map_or_else(|| "never".to_string(), |s| format!("{s} s ago"));
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"num\">{silent}</td></tr>",
                escape(&n.id),
                escape(&n.tenant)
            );
        }
        h.push_str("</tbody></table>");
    }
    let _ = writeln!(
        h,
        "<p><a href=\"/metrics\">/metrics</a> · <a href=\"/v1/tenants\">/v1/tenants</a> · \
         <a href=\"{usage_link}\">usage today, hourly (JSON)</a> · \
         <a href=\"{usage_link}&amp;format=csv\">(CSV)</a></p></body></html>"
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<b a="x">Tom & Jerry's</b>"#),
            "&lt;b a=&quot;x&quot;&gt;Tom &amp; Jerry&#39;s&lt;/b&gt;"
        );
    }

    #[test]
    fn page_escapes_names_and_draws_bars() {
        let rows = [
            TenantRow {
                id: "lab-a".into(),
                name: "<script>alert(1)</script>".into(),
                contracted_watts: Some(1000.0),
                power_watts: 1500.0,
                basis: "gpu",
                basis_power_watts: Some(1500.0),
                node_power_watts: Some(1800.0),
                reporting: 8,
                stale: 0,
                energy_today_mj: Some(3_600_000_000),
            },
            TenantRow {
                id: "unassigned".into(),
                name: "unassigned".into(),
                contracted_watts: None,
                power_watts: 10.0,
                basis: "gpu",
                basis_power_watts: Some(10.0),
                node_power_watts: None,
                reporting: 1,
                stale: 2,
                energy_today_mj: None,
            },
        ];
        let stale = [StaleNode {
            id: "n<1>".into(),
            tenant: "unassigned".into(),
            silent_seconds: Some(12),
        }];
        let html = render(&rows, &stale, 0, None);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("n&lt;1&gt;"));
        assert!(html.contains("fill over\" style=\"width:100%"));
        assert!(html.contains("150.0 %"));
        assert!(html.contains("-0.50 kW"));
        assert!(html.contains("1.000 kWh"));
        assert!(html.contains("<meta http-equiv=\"refresh\""));
        assert!(html.contains("/v1/usage?from=1970-01-01T00:00:00Z&amp;to=1970-01-02T00:00:00Z"));
        assert!(!html.contains("<script"), "no JavaScript");
    }

    #[test]
    fn a_tenant_with_no_fresh_gpu_shows_no_data_not_zero_watts() {
        let row = |reporting: u64| TenantRow {
            id: "lab-s".into(),
            name: "lab-s".into(),
            contracted_watts: Some(3000.0),
            power_watts: 0.0,
            basis: "gpu",
            basis_power_watts: Some(0.0),
            node_power_watts: None,
            reporting,
            stale: 8,
            energy_today_mj: Some(0),
        };
        let html = render(&[row(0)], &[], 0, None);
        assert_eq!(html.matches("NO DATA").count(), 2, "{html}");
        assert!(!html.contains("0.00 kW"), "{html}");
        assert!(!html.contains("3.00 kW</td>"), "no headroom: {html}");
        assert!(!html.contains("fill "), "{html}");
        assert!(html.contains("3.00 kW (gpu)"), "{html}");
        // One fresh GPU: a reading, however small.
        let html = render(&[row(1)], &[], 0, None);
        assert!(!html.contains("NO DATA"), "{html}");
        assert!(html.contains("fill ok"), "{html}");
    }

    #[test]
    fn a_contract_on_node_power_is_judged_by_it_and_unknown_without_it() {
        let row = |node: Option<f64>| TenantRow {
            id: "lab-n".into(),
            name: "lab-n".into(),
            contracted_watts: Some(1000.0),
            power_watts: 500.0,
            basis: "node",
            basis_power_watts: node,
            node_power_watts: node,
            reporting: 1,
            stale: 0,
            energy_today_mj: None,
        };
        let html = render(&[row(Some(1200.0))], &[], 0, None);
        assert!(html.contains("120.0 %"), "{html}");
        assert!(html.contains("fill over"), "{html}");
        assert!(html.contains("(node)"), "{html}");
        let html = render(&[row(None)], &[], 0, None);
        assert!(html.contains("no node power reading"), "{html}");
        assert!(!html.contains("fill "), "{html}");
    }
}
