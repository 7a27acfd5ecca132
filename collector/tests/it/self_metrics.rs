//! The collector's own figures on `/metrics`, scraped over HTTP from a
//! real collector process: HTTP requests by route template (never the
//! request's path), the process's standard series, the commit latency
//! histogram, the watermark's lag, the build's revision, and the same
//! exposition gzipped for a scraper that asks for it.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::{Collector, Metrics, TWO_LABS, eventually, http_get, http_request, now_secs};

/// A GET asking for gzip: (head, body as sent).
fn get_gzip(addr: SocketAddr, path: &str) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept-Encoding: gzip\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response");
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    (head, buf[end + 4..].to_vec())
}

/// The families an exposition declares: its `# TYPE` lines.
fn families(text: &str) -> BTreeSet<&str> {
    text.lines().filter(|l| l.starts_with("# TYPE ")).collect()
}

/// Whether `head` has header `name` (any case) with `value`.
fn has_header(head: &str, name: &str, value: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case(name) && v.trim().eq_ignore_ascii_case(value)
        })
    })
}

#[test]
fn metrics_carry_requests_by_route_and_are_gzipped_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let started = now_secs();
    let collector = Collector::start(dir.path(), TWO_LABS, 0, &[]);
    let addr = collector.http;

    // A templated route, a plain one and a path no route matches.
    let (tenants, _, _) = http_request(addr, "/v1/tenants", &[]);
    assert_eq!(tenants, 200);
    let (usage, _, _) = http_request(addr, "/v1/tenants/nobody-here/usage", &[]);
    let (unknown, _, _) = http_request(addr, "/no/such/path", &[]);
    assert_eq!(unknown, 404);

    let plain = http_get(addr, "/metrics");
    let m = Metrics::parse(&plain);
    let requests = |route: &str, code: u16| {
        m.one(
            "capwatch_collector_http_requests_total",
            &[
                ("route", route),
                ("method", "GET"),
                ("code", &code.to_string()),
            ],
        )
    };
    assert_eq!(requests("/v1/tenants", tenants), 1.0);
    assert_eq!(requests("/v1/tenants/{id}/usage", usage), 1.0);
    assert_eq!(requests("unmatched", unknown), 1.0);
    // Route labels are templates: no request's path shows.
    let routes: BTreeSet<&str> =
        m.0.keys()
            .filter(|(name, _)| name.starts_with("capwatch_collector_http_request"))
            .filter_map(|(_, labels)| labels.get("route").map(String::as_str))
            .collect();
    assert_eq!(
        routes,
        BTreeSet::from(["/v1/tenants", "/v1/tenants/{id}/usage", "unmatched"]),
        "{plain}"
    );
    assert_eq!(
        m.one(
            "capwatch_collector_http_request_duration_seconds_count",
            &[("route", "/v1/tenants")]
        ),
        1.0
    );

    // The process's standard series.
    let start = m.one("process_start_time_seconds", &[]);
    assert!(
        (started - 5..=now_secs() + 1).contains(&(start as i64)),
        "started {started}, process_start_time_seconds {start}"
    );
    assert!(m.one("process_resident_memory_bytes", &[]) > 0.0);
    assert!(m.one("process_open_fds", &[]) > 0.0);
    assert!(m.one("process_cpu_seconds_total", &[]) >= 0.0);

    // The revision the binary was built from.
    let built = m.select("capwatch_collector_build_info", &[]);
    assert_eq!(built.len(), 1, "{plain}");
    let revision = &built[0].0["revision"];
    assert_eq!(revision, env!("CAPWATCH_REVISION"));
    // Unless the build named one, the checkout's HEAD (or "unknown").
    if env!("CAPWATCH_REVISION_FROM") != "build environment" {
        let head = std::process::Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8(out.stdout).unwrap().trim().to_owned());
        assert_eq!(*revision, head.unwrap_or_else(|| "unknown".into()));
    }

    // The same families gzipped, and plain without the asking. Families
    // only appear while the collector runs (the watermark lag once a
    // commit finalized a minute), so the gzipped scrape is bracketed by
    // two plain ones rather than compared with the first.
    let before = http_get(addr, "/metrics");
    let (head, body) = get_gzip(addr, "/metrics");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(has_header(&head, "content-encoding", "gzip"), "{head}");
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut unzipped)
        .expect("a gzip body");
    let (_, plain_head, after) = http_request(addr, "/metrics", &[]);
    let (before, gzipped, after) = (families(&before), families(&unzipped), families(&after));
    assert!(
        before.is_subset(&gzipped) && gzipped.is_subset(&after),
        "{before:?} ⊆ {gzipped:?} ⊆ {after:?}"
    );
    assert!(families(&plain).is_subset(&gzipped));
    assert!(
        !has_header(&plain_head, "content-encoding", "gzip"),
        "{plain_head}"
    );
    collector.stop();
}

/// A commit's latency lands in the histogram, and the watermark's lag is
/// what `finalize_grace` (600 s by default) and quarter-hour steps make it.
#[test]
fn commit_latency_and_watermark_lag_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), TWO_LABS, 0, &[]);
    let mut m = collector.metrics();
    eventually(
        Duration::from_secs(20),
        "a commit and the watermark",
        || {
            m = collector.metrics();
            m.select("capwatch_collector_ledger_finalized_lag_seconds", &[])
                .len()
                == 1
                && m.one(
                    "capwatch_collector_ledger_commit_duration_seconds_count",
                    &[],
                ) >= 1.0
        },
    );
    let count = m.one(
        "capwatch_collector_ledger_commit_duration_seconds_count",
        &[],
    );
    assert_eq!(
        m.one(
            "capwatch_collector_ledger_commit_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        count
    );
    assert!(m.one("capwatch_collector_ledger_commit_duration_seconds_sum", &[]) > 0.0);
    let lag = m.one("capwatch_collector_ledger_finalized_lag_seconds", &[]);
    assert!((600.0..=1500.0 + 5.0).contains(&lag), "lag {lag}");
    collector.stop();
}
