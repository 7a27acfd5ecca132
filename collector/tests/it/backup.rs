//! Backup, restore and verify of the SQLite ledger against the real
//! binaries: a backup taken while agents stream into a running collector
//! restores into a fresh ledger that a fresh collector serves as the
//! original held it; verify passes on it and names what was damaged.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::*;

const TENANTS: &str = r#"
[[tenant]]
id = "lab-a"
contracted_kw = 1
nodes = ["n1"]

[[tenant]]
id = "lab-b"
contracted_kw = 50
nodes = ["n2"]
"#;

fn cli(ledger: &Path, args: &[&str]) -> Output {
    Command::new(bin("capwatch-collector"))
        .arg("--ledger")
        .arg(ledger)
        .args(args)
        .output()
        .expect("run capwatch-collector")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a subcommand that must succeed; returns its stdout.
fn ok(ledger: &Path, args: &[&str]) -> String {
    let out = cli(ledger, args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number after `word ` in `line`.
fn after(line: &str, word: &str) -> String {
    line.split(&format!("{word} "))
        .nth(1)
        .and_then(|s| s.split([' ', ',', ')', ';', '\n']).next())
        .unwrap_or_else(|| panic!("no {word} in {line:?}"))
        .to_string()
}

fn commits(c: &Collector) -> f64 {
    c.metrics().one(
        "capwatch_collector_ledger_commits_total",
        &[("result", "success")],
    )
}

/// Every minute row of the usage API, and each tenant's energy total on
/// /metrics.
fn ledger_view(c: &Collector) -> (serde_json::Value, Vec<(String, u64)>) {
    let now = now_secs();
    let from = (now - 3 * 3600).div_euclid(3600) * 3600;
    let to = (now + 3600).div_euclid(3600) * 3600 + 3600;
    let q = format!(
        "/v1/usage?from={}&to={}&step=1m",
        capwatch_collector::usage::rfc3339(from),
        capwatch_collector::usage::rfc3339(to)
    );
    let v: serde_json::Value = serde_json::from_str(&http_get(c.http, &q)).unwrap();
    let m = c.metrics();
    let totals = ["lab-a", "lab-b"]
        .iter()
        .map(|t| {
            (
                t.to_string(),
                milli(m.one("capwatch_tenant_energy_joules_total", &[("tenant", t)])),
            )
        })
        .collect();
    (v["rows"].clone(), totals)
}

/// Invariant: a backup is of one moment of the ledger even while a
/// collector commits, and a restore of it is that ledger: a collector
/// started on it serves the same rows and totals, and verify finds every
/// rollup and total made of what it holds. The restore has its own
/// ledger_id, refuses a ledger a collector holds, and verify exits
/// non-zero naming the table, tenant and column of a damaged figure.
#[test]
fn a_backup_under_load_restores_into_a_fresh_collector_that_serves_the_same_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("ledger.db");
    let collector = Collector::start(dir.path(), TENANTS, 0, &["--stale-after", "5m"]);
    let original_id = init_id(&collector);
    let agents: Vec<Agent> = ["n1", "n2"]
        .iter()
        .map(|n| Agent::start(dir.path(), &collector.endpoint(), n, 200, ""))
        .collect();
    eventually(Duration::from_secs(30), "commits under load", || {
        commits(&collector) >= 3.0
    });

    // Under load: both agents are still streaming.
    let mid = dir.path().join("mid.backup");
    let said = ok(&live, &["backup", "--to", mid.to_str().unwrap()]);
    let mut agents = agents;
    for a in &mut agents {
        assert!(
            a.child.try_wait().unwrap().is_none(),
            "the load ended before the backup"
        );
    }
    assert_eq!(after(&said, "ledger_id"), original_id, "{said}");
    let mid_revision: u64 = after(&said, "revision").parse().unwrap();
    assert!(mid_revision >= 3, "{said}");
    // A backup file is never overwritten.
    let again = cli(&live, &["backup", "--to", mid.to_str().unwrap()]);
    assert!(
        !again.status.success() && text(&again).contains("already exists"),
        "{}",
        text(&again)
    );
    for a in agents {
        a.finish(Duration::from_secs(60));
    }
    // The collector still runs: the second backup is of everything.
    let end = dir.path().join("end.backup");
    let said = ok(&live, &["backup", "--to", end.to_str().unwrap()]);
    let end_revision: u64 = after(&said, "revision").parse().unwrap();
    assert!(end_revision > mid_revision, "{said}");
    let original = ledger_view(&collector);
    assert!(original.1.iter().all(|(_, e)| *e > 0), "{original:?}");
    assert!(!original.0.as_array().unwrap().is_empty());
    let verified = ok(&live, &["verify"]);
    assert!(verified.contains("0 differences"), "{verified}");

    // Never over a ledger a collector holds, even when told to replace.
    let refused = cli(
        &live,
        &["restore", "--from", end.to_str().unwrap(), "--replace"],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("in use by another collector"),
        "{}",
        text(&refused)
    );

    // Restored into a fresh ledger path, served by a fresh collector.
    let fresh = tempfile::tempdir().unwrap();
    let restored = fresh.path().join("ledger.db");
    let said = ok(&restored, &["restore", "--from", end.to_str().unwrap()]);
    let new_id = after(&said, "new ledger_id");
    assert_ne!(new_id, original_id, "{said}");
    assert_eq!(after(&said, "revision"), end_revision.to_string(), "{said}");
    // The original collector's compaction lease did not come along.
    let leases: i64 = rusqlite::Connection::open(&restored)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM compaction_lease", [], |r| r.get(0))
        .unwrap();
    assert_eq!(leases, 0);
    // An existing ledger is replaced only when asked.
    let kept = cli(&restored, &["restore", "--from", mid.to_str().unwrap()]);
    assert!(text(&kept).contains("--replace"), "{}", text(&kept));
    let second = Collector::start_on(fresh.path(), TENANTS, 0, &["--stale-after", "5m"]);
    assert_eq!(init_id(&second), new_id);
    let copy = ledger_view(&second);
    assert_eq!(copy.1, original.1);
    assert_eq!(copy.0, original.0);
    second.stop();
    collector.stop();
    let verified = ok(&restored, &["verify", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&verified).unwrap();
    assert_eq!(v["differences"], serde_json::json!([]), "{v}");
    assert_eq!(v["tenants_checked"], 2, "{v}");

    // The backup from under load is a whole ledger too: every total is
    // its minutes, and it holds less than the end.
    let earlier = tempfile::tempdir().unwrap();
    let earlier_ledger = earlier.path().join("ledger.db");
    ok(
        &earlier_ledger,
        &["restore", "--from", mid.to_str().unwrap()],
    );
    let verified = ok(&earlier_ledger, &["verify"]);
    assert!(verified.contains("0 differences"), "{verified}");

    // A damaged total: non-zero, naming the table, tenant and column.
    let conn = rusqlite::Connection::open(&earlier_ledger).unwrap();
    let changed = conn
        .execute(
            "UPDATE tenant_total SET energy_mj = energy_mj + 1 WHERE tenant = 'lab-b'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(conn);
    let out = cli(&earlier_ledger, &["verify"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let table = text(&out);
    let line = table
        .lines()
        .find(|l| l.starts_with("tenant_total"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("lab-b") && line.contains("energy_mj"),
        "{table}"
    );
    assert!(table.contains("1 differences"), "{table}");
}

/// The ledger id a collector shows on /metrics.
fn init_id(c: &Collector) -> String {
    let m = c.metrics();
    let found = m.select("capwatch_ledger_info", &[]);
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].0["ledger_id"].clone()
}
