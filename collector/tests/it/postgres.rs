//! The collector binary on a PostgreSQL ledger of the test's own:
//! `init-ledger --ledger-url`, the refusals, the `usage` command, and the
//! ledger exact to the millijoule through a restart of PostgreSQL and a
//! failover to its promoted standby.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use capwatch_collector::ledger::{LedgerReader, PgReader, PgSettings};
use capwatch_testkit::pg::PgServer;
use capwatch_testkit::{eventually, stderr, stdout};

use crate::support::*;

const NO_TENANTS: &str = "";

fn collector_cli(args: &[&str]) -> std::process::Output {
    Command::new(bin("capwatch-collector"))
        .args(args)
        .output()
        .expect("run capwatch-collector")
}

/// Energy per tenant in the ledger at `url`: every span and adjustment.
fn ledger_energy(url: &str) -> std::collections::BTreeMap<String, u64> {
    let r = PgReader::open(&PgSettings::new(url)).unwrap();
    let usage = r.usage(None, 0, i64::MAX).unwrap();
    let mut sums = std::collections::BTreeMap::new();
    for (t, s) in &usage.spans {
        *sums.entry(t.clone()).or_default() += s.delta.energy_mj;
    }
    for a in &usage.adjustments {
        *sums.entry(a.tenant.clone()).or_default() += a.delta.energy_mj;
    }
    sums
}

/// A blank database is refused (run init-ledger), init-ledger creates the
/// schema once, a second is refused, and `usage` reads the ledger; setting
/// both ledgers is a config error and --recover-ledger is SQLite's.
#[test]
fn init_ledger_usage_and_refusals_on_postgres() {
    let server = PgServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let err = expect_refused(Collector::command_pg(dir.path(), NO_TENANTS, 0, &url, &[]));
    assert!(
        err.contains("init-ledger") && err.contains(&format!("127.0.0.1:{}", server.port())),
        "{err}"
    );

    let out = collector_cli(&["init-ledger", "--ledger-url", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.starts_with(&format!(
            "created ledger postgres://postgres@127.0.0.1:{}/capwatch (ledger_id ",
            server.port()
        )),
        "{said}"
    );
    let again = collector_cli(&["init-ledger", "--ledger-url", &url]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let usage = collector_cli(&[
        "usage",
        "--ledger-url",
        &url,
        "--from",
        "2026-11-01T00:00:00Z",
        "--to",
        "2026-11-02T00:00:00Z",
        "--step",
        "1d",
        "--format",
        "json",
    ]);
    assert!(usage.status.success(), "{}", stderr(&usage));
    let report: serde_json::Value = serde_json::from_str(&stdout(&usage)).unwrap();
    assert_eq!(report["revision"], 0, "{report}");

    let both = collector_cli(&[
        "--ledger",
        "/x/ledger.db",
        "--ledger-url",
        &url,
        "--print-config",
    ]);
    assert!(!both.status.success());
    assert!(stderr(&both).contains("ledger_url"), "{}", stderr(&both));
    let bad = collector_cli(&["--ledger-url", "mysql://nope", "--print-config"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("ledger_url"), "{}", stderr(&bad));
    let err = expect_refused({
        let mut cmd = Collector::command_pg(dir.path(), NO_TENANTS, 0, &url, &["--recover-ledger"]);
        cmd.env("RUST_LOG", "info");
        cmd
    });
    assert!(
        err.contains("--recover-ledger is for a SQLite ledger"),
        "{err}"
    );
}

/// Starts the collector on `url` and waits until it listens.
fn start(dir: &Path, tenants: &str, port: u16, url: &str) -> Collector {
    Collector::spawn(Collector::command_pg(
        dir,
        tenants,
        port,
        url,
        &[
            "--stale-after",
            "5m",
            "--config",
            dir.join("collector.toml").to_str().unwrap(),
        ],
    ))
}

/// PostgreSQL restarted while agents stream, then its primary killed and
/// the standby promoted: commits fail meanwhile (nothing is acked, the
/// agents keep their spool), the collector reconnects through the
/// multi-host URL, and afterwards the ledger equals the mock's ground
/// truth to the millijoule, nothing lost and nothing doubled.
#[test]
fn postgres_restart_and_failover_keep_the_ledger_exact() {
    const N: u64 = 250;
    let primary = PgServer::start();
    let standby = primary.standby();
    // Acked means on the standby too: a failover loses no acked commit.
    primary.psql(
        "postgres",
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
    );
    primary.psql("postgres", "SELECT pg_reload_conf()");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/capwatch?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("collector.toml"),
        "ledger_connect_timeout = \"1s\"\nledger_statement_timeout = \"2s\"\n",
    )
    .unwrap();
    let out = collector_cli(&["init-ledger", "--ledger-url", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tenants = "[[tenant]]\nid = \"lab\"\ncontracted_kw = 50\nnodes = [\"p-1\"]\n";
    let collector = start(dir.path(), tenants, 0, &url);
    let cfg = "reconnect_initial = \"50ms\"\nreconnect_max = \"300ms\"\ndrain_timeout = \"60s\"\n";
    let nodes = ["p-1", "p-2"];
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|n| Agent::start(dir.path(), &collector.endpoint(), n, N, cfg))
        .collect();
    let commits = |result: &str| {
        collector.metrics().one(
            "capwatch_collector_ledger_commits_total",
            &[("result", result)],
        )
    };
    eventually(Duration::from_secs(20), "commits", || {
        commits("success") >= 3.0
    });
    // The pool's figures: connections, none of them a reconnect yet.
    let m = collector.metrics();
    let pool = |state: &str| {
        m.one(
            "capwatch_collector_ledger_pool_connections",
            &[("state", state)],
        )
    };
    assert!(
        pool("idle") + pool("busy") >= 1.0 && pool("idle") + pool("busy") <= 4.0,
        "idle {} busy {}",
        pool("idle"),
        pool("busy")
    );
    assert_eq!(
        m.one("capwatch_collector_ledger_reconnects_total", &[]),
        0.0
    );
    primary.stop();
    eventually(Duration::from_secs(20), "a failed commit", || {
        commits("failure") >= 1.0
    });
    primary.start_again();
    let ok = commits("success");
    eventually(Duration::from_secs(30), "commits after the restart", || {
        commits("success") >= ok + 3.0
    });
    primary.kill();
    let failed = commits("failure");
    eventually(Duration::from_secs(20), "a failed commit", || {
        commits("failure") > failed
    });
    standby.promote();
    let ok = commits("success");
    eventually(
        Duration::from_secs(30),
        "commits on the new primary",
        || commits("success") >= ok + 3.0,
    );
    for a in agents {
        let log = a.finish(Duration::from_secs(90));
        log.wait_for("\"undelivered\":0", Duration::from_secs(1));
    }
    assert!(commits("failure") >= 2.0);

    let m = collector.metrics();
    // A restart and a failover: the pool connected again at least twice.
    assert!(
        m.one("capwatch_collector_ledger_reconnects_total", &[]) >= 2.0,
        "{:?}",
        m.select("capwatch_collector_ledger_reconnects_total", &[])
    );
    same_usage_everywhere(dir.path(), tenants, &url, &collector);
    let mut sums = std::collections::BTreeMap::<String, u64>::new();
    for node in nodes {
        let truth = Truth::of(node, N);
        for gpu in 0..8 {
            let labels = [("node", node), ("gpu", &gpu.to_string())];
            let series = m.select("capwatch_gpu_energy_joules_total", &labels);
            assert_eq!(series.len(), 1, "{node} gpu {gpu}");
            let e = milli(series[0].1);
            assert_eq!(e, truth.energy(gpu, 1, N), "{node} gpu {gpu}");
            *sums.entry(series[0].0["tenant"].clone()).or_default() += e;
        }
    }
    collector.stop();
    let standby_url = standby.url();
    assert_eq!(ledger_energy(&standby_url), sums, "ledger vs ground truth");
    assert_eq!(
        standby.psql("capwatch", "SELECT sum(samples) FROM usage_minute"),
        (2 * 8 * N).to_string(),
        "GPU readings"
    );
}

/// The usage rows of today and tomorrow (UTC, by hour) as `collector`'s
/// API answers them, as a second collector on the same database answers
/// them, and as `capwatch-collector usage --ledger-url` reads them from
/// the database: all three the same.
fn same_usage_everywhere(dir: &Path, tenants: &str, url: &str, collector: &Collector) {
    let day = now_secs() / 86_400 * 86_400;
    let (from, to) = (
        capwatch_collector::usage::rfc3339(day - 86_400),
        capwatch_collector::usage::rfc3339(day + 2 * 86_400),
    );
    let query = format!("/v1/usage?from={from}&to={to}&step=1h");
    let other_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.join("collector.toml"),
        other_dir.path().join("collector.toml"),
    )
    .unwrap();
    let other = start(other_dir.path(), tenants, 0, url);
    let api: Vec<serde_json::Value> = [collector, &other]
        .iter()
        .map(|c| serde_json::from_str(&http_get(c.http, &query)).unwrap())
        .collect();
    other.stop();
    let cli = collector_cli(&[
        "usage",
        "--ledger-url",
        url,
        "--tenants",
        dir.join("tenants.toml").to_str().unwrap(),
        "--from",
        &from,
        "--to",
        &to,
        "--format",
        "json",
    ]);
    assert!(cli.status.success(), "{}", stderr(&cli));
    let cli: serde_json::Value = serde_json::from_str(&stdout(&cli)).unwrap();
    let rows = cli["rows"].as_array().unwrap();
    assert!(energy_mj(rows) > 0, "{cli}");
    assert_eq!(
        api[0], cli,
        "the first collector's API and the usage command"
    );
    assert_eq!(
        api[1], cli,
        "the second collector's API and the usage command"
    );
}
