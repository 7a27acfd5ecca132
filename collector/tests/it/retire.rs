//! Retiring a node against the real binaries: a node gone for good is
//! forgotten through the admin API and the CLI, so that its series (and
//! with them CapwatchAgentDown) stop, while its history stays in the
//! ledger and a Hello brings it back. A tenant whose GPUs are all stale
//! is exported and shown as no data, not 0 W.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

const TENANTS: &str = r#"
[[tenant]]
id = "lab-a"
contracted_kw = 3
nodes = ["n1"]

[[tenant]]
id = "lab-b"
contracted_kw = 50
nodes = ["n2"]
"#;

const ADMIN: &str = "retire-test-admin-token-0123456789";
const LAB: &str = "retire-test-lab-token-0123456789ab";

fn post(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn metrics(c: &Collector) -> Metrics {
    let (status, body) = http_get_token(c.http, "/metrics", Some(ADMIN));
    assert_eq!(status, 200, "{body}");
    Metrics::parse(&body)
}

fn node_up(m: &Metrics, node: &str) -> Option<f64> {
    m.select("capwatch_node_up", &[("node", node)])
        .first()
        .map(|(_, v)| *v)
}

/// Invariant: a retired node leaves every series and the status page
/// until it says Hello again; its energy stays in the ledger; a node that
/// streams cannot be retired, nor one nobody heard of, nor by a tenant
/// token. A tenant with no fresh GPU has `capwatch_tenant_reporting` 0
/// and no live power series, and the status page says NO DATA.
#[test]
fn a_retired_node_leaves_the_series_keeps_its_history_and_comes_back_with_a_hello() {
    let dir = tempfile::tempdir().unwrap();
    let auth = secret(
        dir.path(),
        "auth.toml",
        &format!(
            "[[api]]\nname = \"ops\"\ntoken = \"{ADMIN}\"\n\n[[api]]\nname = \"lab\"\ntoken = \"{LAB}\"\ntenant = \"lab-a\"\n"
        ),
    );
    let auth = auth.to_str().unwrap();
    let collector = Collector::start(
        dir.path(),
        TENANTS,
        0,
        &["--stale-after", "1s", "--auth-file", auth],
    );
    Agent::start(dir.path(), &collector.endpoint(), "n1", 10, "").finish(Duration::from_secs(30));
    let _n2 = Agent::start(dir.path(), &collector.endpoint(), "n2", 100_000, "");
    eventually(Duration::from_secs(30), "n1 down, n2 up", || {
        let m = metrics(&collector);
        node_up(&m, "n1") == Some(0.0) && node_up(&m, "n2") == Some(1.0)
    });
    // lab-a's only node stopped: no data, not 0 W.
    let m = metrics(&collector);
    assert_eq!(
        m.one(
            "capwatch_tenant_gpus",
            &[("tenant", "lab-a"), ("state", "stale")]
        ),
        8.0
    );
    assert_eq!(
        m.one("capwatch_tenant_reporting", &[("tenant", "lab-a")]),
        0.0
    );
    assert!(
        m.select("capwatch_tenant_power_watts", &[("tenant", "lab-a")])
            .is_empty()
    );
    assert!(
        m.select("capwatch_tenant_headroom_watts", &[("tenant", "lab-a")])
            .is_empty()
    );
    assert_eq!(
        m.one("capwatch_tenant_reporting", &[("tenant", "lab-b")]),
        1.0
    );
    assert!(m.one("capwatch_tenant_power_watts", &[("tenant", "lab-b")]) > 0.0);
    let energy = m.one(
        "capwatch_tenant_energy_joules_total",
        &[("tenant", "lab-a")],
    );
    assert!(energy > 0.0);
    let (_, page) = http_get_token(collector.http, "/", Some(ADMIN));
    let row = page.split("<tr id=\"tenant-lab-a\">").nth(1).unwrap();
    let row = row.split("</tr>").next().unwrap();
    assert!(row.contains("NO DATA"), "{row}");
    assert!(page.contains(">n1<"), "n1 among the stale nodes: {page}");

    // Refusals: a tenant token, a node streaming now, an unknown node.
    let (status, body) = post(collector.http, "/v1/nodes/n1/retire", LAB);
    assert_eq!(status, 403, "{body}");
    let (status, body) = post(collector.http, "/v1/nodes/n2/retire", ADMIN);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("streaming"), "{body}");
    let (status, body) = post(collector.http, "/v1/nodes/n9/retire", ADMIN);
    assert_eq!(status, 404, "{body}");
    let (status, _) = http_get_token(collector.http, "/v1/nodes/n1/retire", Some(ADMIN));
    assert_eq!(status, 405);
    assert_eq!(
        node_up(&metrics(&collector), "n1"),
        Some(0.0),
        "nothing retired yet"
    );

    // The CLI, as an operator runs it.
    let url = format!("http://{}", collector.http);
    let token_file = secret(dir.path(), "admin.token", ADMIN);
    let out = Command::new(bin("capwatch-collector"))
        .args(["retire-node", "n1", "--url", &url, "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = Command::new(bin("capwatch-collector"))
        .args(["retire-node", "n2", "--url", &url, "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("409") && said.contains("streaming"), "{said}");

    let m = metrics(&collector);
    assert_eq!(
        node_up(&m, "n1"),
        None,
        "{:?}",
        m.select("capwatch_node_up", &[])
    );
    assert_eq!(node_up(&m, "n2"), Some(1.0));
    assert!(
        m.select("capwatch_node_samples_total", &[("node", "n1")])
            .is_empty()
    );
    // Its GPUs leave the tenant's stale count (CapwatchGpusStale ends too).
    assert_eq!(
        m.one(
            "capwatch_tenant_gpus",
            &[("tenant", "lab-a"), ("state", "stale")]
        ),
        0.0
    );
    // Its history stays: the tenant's energy, from the ledger too.
    assert_eq!(
        m.one(
            "capwatch_tenant_energy_joules_total",
            &[("tenant", "lab-a")]
        ),
        energy
    );
    let (_, page) = http_get_token(collector.http, "/", Some(ADMIN));
    assert!(!page.contains(">n1<"), "{page}");
    let now = now_secs();
    let q = format!(
        "/v1/tenants/lab-a/usage?from={}&to={}&step=1h",
        capwatch_collector::usage::rfc3339(now.div_euclid(3600) * 3600 - 3600),
        capwatch_collector::usage::rfc3339(now.div_euclid(3600) * 3600 + 3600)
    );
    eventually(
        Duration::from_secs(20),
        "lab-a's energy in the ledger",
        || {
            let (status, body) = http_get_token(collector.http, &q, Some(ADMIN));
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            energy_mj(v["rows"].as_array().unwrap()) == milli(energy)
        },
    );

    // A Hello brings it back.
    let _n1 = Agent::start(dir.path(), &collector.endpoint(), "n1", 100_000, "");
    eventually(Duration::from_secs(30), "n1 back", || {
        let m = metrics(&collector);
        node_up(&m, "n1") == Some(1.0)
            && m.one("capwatch_tenant_reporting", &[("tenant", "lab-a")]) == 1.0
    });
}
