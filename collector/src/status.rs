//! The status page at `/` and one page per tenant at
//! `/status/tenant/{id}`: HTML, no JavaScript, for an operator's browser.
//! The overview shows each tenant's live power against its contract as a
//! bar, its last day against the contract as a small inline SVG chart
//! (`chart.rs`), the headroom, the energy and time over contract of today
//! (UTC) from the ledger, GPUs and nodes gone stale, the collector's own
//! health (commits, the watermark's lag) and the time it was rendered. A
//! tenant's page adds its nodes and GPUs (live power, age of the last
//! sample, stale marks) and a larger chart. Both reload every few seconds.
//!
//! *Boundary:* tenant names and ids, node ids, GPU UUIDs and models and
//! ledger errors are written into HTML; every such string goes through
//! [`escape`] (and a tenant id in a link through [`path_segment`] first).

pub mod chart;

use std::fmt::Write as _;

use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::ledger::DAY;
use crate::usage::rfc3339;

pub use chart::Series;

/// How often the pages reload themselves, seconds.
const REFRESH_SECONDS: u32 = 5;

/// What the overview shows, as plain data: built by `http.rs` from the
/// collector's state and the ledger, so that this module knows neither.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusView {
    /// One row per tenant, `unassigned` included, in the tenant file's order.
    pub tenants: Vec<TenantRow>,
    /// Nodes with no fresh sample, by id.
    pub stale_nodes: Vec<StaleNode>,
    /// The start of today (UTC), Unix seconds: energy is counted from it.
    pub today: i64,
    /// When the page was made (Unix seconds).
    pub as_of: i64,
    /// Why the ledger could not be read (energy, charts, over contract).
    pub ledger_error: Option<String>,
    pub health: Health,
}

/// The collector's own health, as the page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub commits_ok: u64,
    pub commits_failed: u64,
    /// `/readyz`'s reasons, while the collector is not ready.
    pub not_ready: Option<String>,
    /// The ledger's watermark (Unix seconds); none where it could not be read.
    pub finalized_through: Option<i64>,
    /// `finalize_grace`: how far the watermark trails by design, seconds.
    pub finalize_grace_s: u64,
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
    /// Time over contract today (UTC, seconds); none as `energy_today_mj`.
    pub over_contract_today_s: Option<u64>,
    /// The last day against the contract; none as `energy_today_mj`.
    pub chart: Option<Series>,
}

/// A node with no fresh sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleNode {
    pub id: String,
    pub tenant: String,
    /// Since its latest sample; none if it never sent one.
    pub silent_seconds: Option<u64>,
}

/// What a tenant's page shows.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantPage {
    pub row: TenantRow,
    pub today: i64,
    pub as_of: i64,
    pub ledger_error: Option<String>,
    /// The nodes holding the tenant's GPUs, by id (at most `MAX_NODES`).
    pub nodes: Vec<NodeRow>,
    /// Nodes left out past the bound.
    pub more_nodes: usize,
    /// The tenant's GPUs, by node then index (at most `MAX_GPUS`).
    pub gpus: Vec<GpuRow>,
    /// GPUs left out past the bound.
    pub more_gpus: usize,
}

/// Most nodes and GPUs a tenant's page lists (the rest are counted).
pub const MAX_NODES: usize = 500;
pub const MAX_GPUS: usize = 2000;

/// One node of a tenant's page.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub id: String,
    /// Samples arrive.
    pub up: bool,
    /// Since its latest sample; none if it never sent one.
    pub silent_seconds: Option<u64>,
    /// Its live whole-node power, where fresh.
    pub node_power_watts: Option<f64>,
    /// Its GPUs of this tenant, and how many of them are stale.
    pub gpus: u64,
    pub stale_gpus: u64,
}

/// One GPU of a tenant's page.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuRow {
    pub node: String,
    pub index: usize,
    pub uuid: String,
    pub model: String,
    /// Its last reading's power, while fresh.
    pub power_watts: Option<f64>,
    /// Age of its last reading; none before the first.
    pub age_seconds: Option<u64>,
    pub fresh: bool,
}

fn html(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// The overview for `view`, as an HTML response that no cache keeps.
pub fn page(view: &StatusView) -> Response {
    html(render(view))
}

/// A tenant's page, as an HTML response that no cache keeps.
pub fn tenant_page(view: &TenantPage) -> Response {
    html(render_tenant(view))
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

/// Percent-encodes `s` as one path segment (RFC 3986 unreserved kept).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn kw(watts: f64) -> String {
    format!("{:.2} kW", watts / 1000.0)
}

/// A length of time for people: "45 s", "12 min", "3 h 05 min".
fn span(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222;background:#fafafa}\
table{border-collapse:collapse;margin-bottom:1.5em}\
th,td{padding:.4em .8em;text-align:left;border-bottom:1px solid #ddd}\
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}\
.bar{width:16em;height:1em;background:#e4e4e4;border:1px solid #bbb}\
.fill{height:100%}.ok{background:#3a8f3a}.near{background:#d99a00}.over{background:#c62828}\
p.over,span.over{background:none;color:#c62828}\
.muted{color:#777}.nodata{color:#8a5a00}\
svg.chart{display:block;background:#fff}svg.chart .plot{fill:#fff;stroke:#ddd}\
svg.chart .gap{fill:#e4e4e4}svg.chart .power{fill:none;stroke:#1f5fa8;stroke-width:1.5}\
svg.chart .contract{fill:none;stroke:#c62828;stroke-width:1;stroke-dasharray:4 3}\
svg.chart .axis{font-size:9px;fill:#777}";

fn head(h: &mut String, title: &str) {
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>{title}</title><style>{STYLE}</style></head><body>"
    );
}

/// The bar, ratio, contract and headroom cells of a tenant.
fn contract_cells(r: &TenantRow) -> (String, String, String, String) {
    // No fresh GPU: no data, never 0 W with the whole contract free.
    let no_data = r.reporting == 0;
    match (r.contracted_watts, r.basis_power_watts) {
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
    }
}

fn energy_cell(r: &TenantRow) -> String {
    r.energy_today_mj.map_or_else(
        || "—".to_string(),
        |mj| format!("{:.3} kWh", mj as f64 / 3.6e9),
    )
}

fn over_cell(r: &TenantRow) -> String {
    match r.over_contract_today_s {
        None => "—".to_string(),
        Some(0) => "0 min".to_string(),
        Some(s) => format!("<span class=\"over\">{}</span>", span(s)),
    }
}

fn chart_cell(r: &TenantRow, size: chart::Size) -> String {
    r.chart.as_ref().map_or_else(
        || "<span class=\"muted\">—</span>".to_string(),
        |c| {
            chart::svg(
                c,
                size,
                &format!(
                    "{}: {} power of the last 24 h against its contract",
                    r.id, r.basis
                ),
            )
        },
    )
}

fn power_cell(r: &TenantRow) -> String {
    if r.reporting == 0 {
        "NO DATA".to_string()
    } else {
        kw(r.power_watts)
    }
}

fn as_of_line(h: &mut String, as_of: i64) {
    let _ = write!(
        h,
        "<p class=\"muted\">As of <time datetime=\"{t}\">{t}</time> (UTC). Reloads every \
         {REFRESH_SECONDS} s.</p>",
        t = escape(&rfc3339(as_of))
    );
}

fn health(h: &mut String, health: &Health, as_of: i64) {
    h.push_str("<h2>Collector</h2><table id=\"health\"><tbody>");
    let _ = write!(
        h,
        "<tr><th>ready</th><td>{}</td></tr>",
        health.not_ready.as_deref().map_or_else(
            || "yes".to_string(),
            |why| format!("<span class=\"over\">no: {}</span>", escape(why.trim()))
        )
    );
    let _ = write!(
        h,
        "<tr><th>ledger commits</th><td class=\"num\">{} ok, {}</td></tr>",
        health.commits_ok,
        if health.commits_failed > 0 {
            format!(
                "<span class=\"over\">{} failed</span>",
                health.commits_failed
            )
        } else {
            "0 failed".to_string()
        }
    );
    // The watermark trails by the grace, rounded down to a quarter-hour,
    // moved by each commit: beyond that and a commit interval it is behind.
    let watermark = match health.finalized_through {
        None => "<span class=\"muted\">unknown (the ledger could not be read)</span>".to_string(),
        Some(t) => {
            let lag = u64::try_from(as_of.saturating_sub(t)).unwrap_or(0);
            let expected = health.finalize_grace_s + 900 + 60;
            let lag_text = if lag > expected {
                format!(
                    "<span class=\"over\">{} behind (expected at most {})</span>",
                    span(lag),
                    span(expected)
                )
            } else {
                format!("{} behind", span(lag))
            };
            format!("{} ({lag_text})", escape(&rfc3339(t)))
        }
    };
    let _ = write!(
        h,
        "<tr><th>finalized through</th><td>{watermark}</td></tr></tbody></table>"
    );
}

/// The overview. Only `escape`d strings and numbers are interpolated.
fn render(view: &StatusView) -> String {
    let today = view.today;
    let mut h = String::new();
    let day = escape(&rfc3339(today));
    let usage_link = format!(
        "/v1/usage?from={}&amp;to={}&amp;step=1h",
        escape(&rfc3339(today)),
        escape(&rfc3339(today + DAY))
    );
    head(&mut h, "capwatch status");
    // Writing to a String cannot fail.
    let _ = write!(
        h,
        "<h1>capwatch status</h1>\
         <p class=\"muted\">Live power of fresh GPUs and nodes; the contract is measured on \
         its basis; energy and time over contract since {day} (UTC, committed to the ledger); \
         the chart: average power on the contract's basis per 15 minutes over the last 24 h \
         (grey: no data), the contract dashed.</p>"
    );
    as_of_line(&mut h, view.as_of);
    h.push_str(
        "<table><thead><tr><th>tenant</th><th>power / contract</th><th></th>\
         <th>last 24 h</th>\
         <th>power</th><th>node power</th><th>contract</th><th>headroom</th><th>energy today</th>\
         <th>over contract today</th><th>GPUs reporting</th><th>GPUs stale</th></tr></thead><tbody>",
    );
    for r in &view.tenants {
        let (bar, ratio, contract, headroom) = contract_cells(r);
        let _ = write!(
            h,
            "<tr id=\"tenant-{id}\"><td><a href=\"/status/tenant/{link}\"><strong>{name}</strong></a><br>\
             <span class=\"muted\">{id}</span></td>\
             <td>{bar}</td><td class=\"num\">{ratio}</td><td>{chart}</td>\
             <td class=\"num\">{power}</td><td class=\"num\">{node_power}</td>\
             <td class=\"num\">{contract}</td>\
             <td class=\"num\">{headroom}</td><td class=\"num\">{energy}</td>\
             <td class=\"num\">{over}</td>\
             <td class=\"num\">{reporting}</td><td class=\"num\">{stale}</td></tr>",
            id = escape(&r.id),
            link = escape(&path_segment(&r.id)),
            name = escape(&r.name),
            chart = chart_cell(r, chart::SMALL),
            power = power_cell(r),
            node_power = r.node_power_watts.map_or_else(|| "—".to_string(), kw),
            energy = energy_cell(r),
            over = over_cell(r),
            reporting = r.reporting,
            stale = r.stale,
        );
    }
    h.push_str("</tbody></table>");
    if let Some(e) = &view.ledger_error {
        let _ = write!(
            h,
            "<p class=\"over\">Energy today unavailable: {}</p>",
            escape(e)
        );
    }
    h.push_str("<h2>Stale nodes</h2>");
    if view.stale_nodes.is_empty() {
        h.push_str("<p>None: every known node is reporting.</p>");
    } else {
        h.push_str(
            "<table><thead><tr><th>node</th><th>tenant</th><th>last sample</th></tr></thead><tbody>",
        );
        for n in &view.stale_nodes {
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
    health(&mut h, &view.health, view.as_of);
    let _ = writeln!(
        h,
        "<p><a href=\"/metrics\">/metrics</a> · <a href=\"/v1/tenants\">/v1/tenants</a> · \
         <a href=\"{usage_link}\">usage today, hourly (JSON)</a> · \
         <a href=\"{usage_link}&amp;format=csv\">(CSV)</a></p></body></html>"
    );
    h
}

/// A tenant's page. Only `escape`d strings and numbers are interpolated.
fn render_tenant(view: &TenantPage) -> String {
    let r = &view.row;
    let mut h = String::new();
    let (id, name) = (escape(&r.id), escape(&r.name));
    head(&mut h, &format!("capwatch status: {id}"));
    let (bar, ratio, contract, headroom) = contract_cells(r);
    let _ = write!(
        h,
        "<p><a href=\"/\">← all tenants</a></p>\
         <h1 id=\"tenant-{id}\">{name} <span class=\"muted\">{id}</span></h1>"
    );
    as_of_line(&mut h, view.as_of);
    let _ = write!(
        h,
        "<table><tbody>\
         <tr><th>power / contract</th><td>{bar} {ratio}</td></tr>\
         <tr><th>power</th><td class=\"num\">{power}</td></tr>\
         <tr><th>node power</th><td class=\"num\">{node_power}</td></tr>\
         <tr><th>contract</th><td class=\"num\">{contract}</td></tr>\
         <tr><th>headroom</th><td class=\"num\">{headroom}</td></tr>\
         <tr><th>energy today</th><td class=\"num\">{energy}</td></tr>\
         <tr><th>over contract today</th><td class=\"num\">{over}</td></tr>\
         <tr><th>GPUs</th><td class=\"num\">{reporting} reporting, {stale} stale</td></tr>\
         </tbody></table>\
         <h2>Last 24 h</h2><p class=\"muted\">Average {basis} power per 5 minutes (grey: no \
         data), the contract dashed; from the ledger.</p>{chart}",
        power = power_cell(r),
        node_power = r.node_power_watts.map_or_else(|| "—".to_string(), kw),
        energy = energy_cell(r),
        over = over_cell(r),
        reporting = r.reporting,
        stale = r.stale,
        basis = r.basis,
        chart = chart_cell(r, chart::LARGE),
    );
    if let Some(e) = &view.ledger_error {
        let _ = write!(
            h,
            "<p class=\"over\">The ledger could not be read: {}</p>",
            escape(e)
        );
    }
    h.push_str("<h2>Nodes</h2>");
    if view.nodes.is_empty() {
        h.push_str("<p>None: no node has reported a GPU of this tenant.</p>");
    } else {
        h.push_str(
            "<table id=\"nodes\"><thead><tr><th>node</th><th>state</th><th>last sample</th>\
             <th>node power</th><th>GPUs</th><th>GPUs stale</th></tr></thead><tbody>",
        );
        for n in &view.nodes {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                escape(&n.id),
                if n.up {
                    "up"
                } else {
                    "<strong class=\"nodata\">STALE</strong>"
                },
                n.silent_seconds
                    .map_or_else(|| "never".to_string(), |s| format!("{s} s ago")),
                n.node_power_watts.map_or_else(|| "—".to_string(), kw),
                n.gpus,
                n.stale_gpus
            );
        }
        h.push_str("</tbody></table>");
        if view.more_nodes > 0 {
            let _ = write!(
                h,
                "<p class=\"muted\">… and {} more nodes (see /metrics).</p>",
                view.more_nodes
            );
        }
    }
    h.push_str("<h2>GPUs</h2>");
    if view.gpus.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str(
            "<table id=\"gpus\"><thead><tr><th>node</th><th>GPU</th><th>UUID</th><th>model</th>\
             <th>power</th><th>last sample</th><th>state</th></tr></thead><tbody>",
        );
        for g in &view.gpus {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                escape(&g.node),
                g.index,
                escape(&g.uuid),
                escape(&g.model),
                g.power_watts
                    .map_or_else(|| "—".to_string(), |w| format!("{w:.0} W")),
                g.age_seconds
                    .map_or_else(|| "never".to_string(), |s| format!("{s} s ago")),
                if g.fresh {
                    "fresh"
                } else {
                    "<strong class=\"nodata\">STALE</strong>"
                },
            );
        }
        h.push_str("</tbody></table>");
        if view.more_gpus > 0 {
            let _ = write!(
                h,
                "<p class=\"muted\">… and {} more GPUs (see /metrics).</p>",
                view.more_gpus
            );
        }
    }
    let _ = writeln!(
        h,
        "<p><a href=\"/v1/tenants/{link}/usage?from={from}&amp;to={to}&amp;step=1h\">usage today, \
         hourly (JSON)</a></p></body></html>",
        link = escape(&path_segment(&r.id)),
        from = escape(&rfc3339(view.today)),
        to = escape(&rfc3339(view.today + DAY)),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The overview of `rows` and `stale` at the start of 1970.
    fn render(rows: &[TenantRow], stale: &[StaleNode], _today: i64, error: Option<&str>) -> String {
        super::render(&StatusView {
            tenants: rows.to_vec(),
            stale_nodes: stale.to_vec(),
            ledger_error: error.map(str::to_string),
            ..StatusView::default()
        })
    }

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
                over_contract_today_s: Some(3720),
                chart: None,
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
                over_contract_today_s: None,
                chart: None,
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
            over_contract_today_s: None,
            chart: None,
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
            over_contract_today_s: None,
            chart: None,
        };
        let html = render(&[row(Some(1200.0))], &[], 0, None);
        assert!(html.contains("120.0 %"), "{html}");
        assert!(html.contains("fill over"), "{html}");
        assert!(html.contains("(node)"), "{html}");
        let html = render(&[row(None)], &[], 0, None);
        assert!(html.contains("no node power reading"), "{html}");
        assert!(!html.contains("fill "), "{html}");
    }

    fn row(id: &str) -> TenantRow {
        TenantRow {
            id: id.into(),
            name: id.into(),
            contracted_watts: Some(1000.0),
            power_watts: 1200.0,
            basis: "gpu",
            basis_power_watts: Some(1200.0),
            node_power_watts: None,
            reporting: 2,
            stale: 1,
            energy_today_mj: Some(0),
            over_contract_today_s: Some(3720),
            chart: Some(Series {
                from: 0,
                bin_seconds: 900,
                watts: vec![Some(1200.0), None, Some(800.0)],
                contract_watts: vec![Some(1000.0); 3],
            }),
        }
    }

    #[test]
    fn the_overview_has_charts_time_over_contract_as_of_and_health() {
        let view = StatusView {
            tenants: vec![
                row("lab-a"),
                TenantRow {
                    chart: None,
                    ..row("lab-b")
                },
            ],
            as_of: 86_400 + 3_600,
            today: 86_400,
            health: Health {
                commits_ok: 41,
                commits_failed: 2,
                not_ready: Some("ledger commits are failing: <disk full>\n".into()),
                finalized_through: Some(86_400 + 3_600 - 7_200),
                finalize_grace_s: 600,
            },
            ..StatusView::default()
        };
        let html = super::render(&view);
        // One small chart per tenant with a day read; a gap band in it.
        assert_eq!(html.matches("<svg class=\"chart\"").count(), 1, "{html}");
        assert!(html.contains("<rect class=\"gap\""), "{html}");
        assert!(html.contains("<path class=\"contract\""), "{html}");
        assert!(
            html.contains("<span class=\"over\">1 h 02 min</span>"),
            "{html}"
        );
        assert!(html.contains("href=\"/status/tenant/lab-a\""), "{html}");
        assert!(
            html.contains("As of <time datetime=\"1970-01-02T01:00:00Z\">"),
            "{html}"
        );
        assert!(
            html.contains("41 ok, <span class=\"over\">2 failed</span>"),
            "{html}"
        );
        assert!(
            html.contains("no: ledger commits are failing: &lt;disk full&gt;"),
            "{html}"
        );
        // 2 h behind, more than the grace and a quarter-hour.
        assert!(
            html.contains("2 h 00 min behind (expected at most 26 min)"),
            "{html}"
        );
        assert!(!html.contains("<script"), "no JavaScript");
        // Healthy: no warning.
        let view = StatusView {
            health: Health {
                commits_ok: 1,
                finalized_through: Some(3_600 - 900),
                finalize_grace_s: 600,
                ..Health::default()
            },
            as_of: 3_600,
            ..StatusView::default()
        };
        let html = super::render(&view);
        assert!(html.contains("<td>yes</td>"), "{html}");
        assert!(html.contains("1 ok, 0 failed"), "{html}");
        assert!(html.contains("(15 min behind)"), "{html}");
    }

    #[test]
    fn a_tenant_id_in_a_link_is_encoded_then_escaped() {
        assert_eq!(path_segment("lab-a_1.x~"), "lab-a_1.x~");
        assert_eq!(path_segment("a b/\"<é"), "a%20b%2F%22%3C%C3%A9");
    }

    fn tenant_view() -> TenantPage {
        TenantPage {
            row: TenantRow {
                name: "Lab <A> & \"co\"".into(),
                ..row("lab-a")
            },
            today: 0,
            as_of: 120,
            ledger_error: None,
            nodes: vec![
                NodeRow {
                    id: "n<1>".into(),
                    up: true,
                    silent_seconds: Some(0),
                    node_power_watts: Some(2500.0),
                    gpus: 1,
                    stale_gpus: 0,
                },
                NodeRow {
                    id: "gone\"".into(),
                    up: false,
                    silent_seconds: Some(95),
                    node_power_watts: None,
                    gpus: 1,
                    stale_gpus: 1,
                },
            ],
            more_nodes: 0,
            gpus: vec![
                GpuRow {
                    node: "n<1>".into(),
                    index: 0,
                    uuid: "GPU-<u>".into(),
                    model: "H100 & co".into(),
                    power_watts: Some(612.4),
                    age_seconds: Some(1),
                    fresh: true,
                },
                GpuRow {
                    node: "gone\"".into(),
                    index: 3,
                    uuid: "GPU-2".into(),
                    model: "H200".into(),
                    power_watts: None,
                    age_seconds: Some(95),
                    fresh: false,
                },
            ],
            more_gpus: 7,
        }
    }

    #[test]
    fn a_tenant_page_lists_its_nodes_and_gpus_escaped_with_stale_marks() {
        let html = render_tenant(&tenant_view());
        assert!(
            !html.contains("<1>") && !html.contains("<u>") && !html.contains("<A>"),
            "{html}"
        );
        assert!(
            html.contains("Lab &lt;A&gt; &amp; &quot;co&quot;"),
            "{html}"
        );
        assert!(html.contains("<td>n&lt;1&gt;</td><td>up</td><td class=\"num\">0 s ago</td><td class=\"num\">2.50 kW</td>"), "{html}");
        assert!(html.contains("<td>gone&quot;</td><td><strong class=\"nodata\">STALE</strong></td><td class=\"num\">95 s ago</td>"), "{html}");
        assert!(html.contains("<td>GPU-&lt;u&gt;</td><td>H100 &amp; co</td><td class=\"num\">612 W</td><td class=\"num\">1 s ago</td><td>fresh</td>"), "{html}");
        assert!(html.contains("<td class=\"num\">—</td><td class=\"num\">95 s ago</td><td><strong class=\"nodata\">STALE</strong></td>"), "{html}");
        assert!(html.contains("… and 7 more GPUs"), "{html}");
        assert_eq!(html.matches("<svg class=\"chart\"").count(), 1);
        assert!(html.contains("width=\"720\""), "the large chart: {html}");
        assert!(
            html.contains("As of <time datetime=\"1970-01-01T00:02:00Z\">"),
            "{html}"
        );
        assert!(
            html.contains(
                "/v1/tenants/lab-a/usage?from=1970-01-01T00:00:00Z&amp;to=1970-01-02T00:00:00Z"
            ),
            "{html}"
        );
        assert!(
            html.contains("<span class=\"over\">1 h 02 min</span>"),
            "{html}"
        );
        assert!(!html.contains("<script"), "no JavaScript");
        // No GPU reporting: NO DATA, as on the overview.
        let mut v = tenant_view();
        v.row.reporting = 0;
        let html = render_tenant(&v);
        assert!(html.contains("NO DATA"), "{html}");
    }
}
