//! `/healthz` (liveness) and `/readyz` (readiness) of a real collector
//! process while real faults come and go: the ledger's write lock held by
//! another process, so commits fail, and a broken tenant file on SIGHUP.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::process::Command;
use std::time::Duration;

use crate::support::{Agent, Collector, eventually, http_get_status};

const TENANTS: &str = "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 10\nnodes = [\"node-1\"]\n";

fn sighup(c: &Collector) {
    let ok = Command::new("kill")
        .args(["-HUP", &c.child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -HUP");
}

/// Invariant: `/readyz` answers 503 with the reason while ledger commits
/// fail or the last tenant-file reload failed, and 200 as soon as both are
/// fine again; `/healthz` answers 200 throughout.
#[test]
fn readyz_follows_ledger_commits_and_tenant_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(dir.path(), TENANTS, 0, &[]);
    let _agent = Agent::start(dir.path(), &c.endpoint(), "node-1", 1_000_000, "");
    c.log.wait_for("agent connected", Duration::from_secs(20));
    let ready = || http_get_status(c.http, "/readyz");
    eventually(Duration::from_secs(10), "ready at start", || {
        ready().0 == 200
    });
    assert_eq!(ready().1, "ready\n");

    // Another process takes the ledger's write lock: commits fail (after
    // the busy timeout), and readiness says so.
    let db = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    eventually(
        Duration::from_secs(30),
        "not ready while commits fail",
        || ready().0 == 503,
    );
    let (_, reason) = ready();
    assert!(reason.contains("ledger commits are failing"), "{reason}");
    assert_eq!(http_get_status(c.http, "/healthz"), (200, "ok\n".into()));

    // The lock goes: the next commit succeeds and readiness comes back.
    db.execute_batch("ROLLBACK").unwrap();
    drop(db);
    eventually(
        Duration::from_secs(30),
        "ready after commits resume",
        || ready().0 == 200,
    );

    // A broken tenant file on SIGHUP: not ready, the old tenants kept.
    let tenants_file = dir.path().join("tenants.toml");
    std::fs::write(&tenants_file, "[[tenant]]\nid = \"lab-a\"\n").unwrap();
    sighup(&c);
    eventually(
        Duration::from_secs(10),
        "not ready after a failed reload",
        || ready().0 == 503,
    );
    let (_, reason) = ready();
    assert!(reason.contains("tenant file reload failed"), "{reason}");
    assert!(reason.contains("contracted_kw"), "{reason}");
    assert_eq!(http_get_status(c.http, "/healthz"), (200, "ok\n".into()));

    // Fixed and reloaded: ready again.
    std::fs::write(&tenants_file, TENANTS).unwrap();
    sighup(&c);
    eventually(Duration::from_secs(10), "ready after a good reload", || {
        ready().0 == 200
    });
    c.stop();
}
