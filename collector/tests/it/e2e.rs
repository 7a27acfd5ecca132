//! End to end with real processes: the collector binary and mock agent
//! binaries on loopback ports, checked against what the mock GPUs reported.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::Duration;

use crate::support::*;

const SAMPLES: u64 = 20;

/// Tenants for nodes a-1 and b-1: lab-a leases a-* and one GPU of b-1 by
/// UUID, lab-b leases three GPUs of b-1, the rest of b-1 is unassigned.
fn tenants(b: &Truth) -> String {
    format!(
        r#"
[[tenant]]
id = "lab-a"
contracted_kw = 3
nodes = ["a-*"]
gpus = ["{}"]

[[tenant]]
id = "lab-b"
contracted_kw = 50
gpus = ["{}", "{}", "{}"]
"#,
        b.uuids[3], b.uuids[0], b.uuids[1], b.uuids[2]
    )
}

fn expected_tenant(node: &str, gpu: usize) -> &'static str {
    match (node, gpu) {
        ("a-1", _) | ("b-1", 3) => "lab-a",
        ("b-1", 0..=2) => "lab-b",
        _ => "unassigned",
    }
}

/// Invariant: each GPU's energy on /metrics equals its mock counter delta
/// over the samples the collector saw, exactly to the millijoule; each
/// tenant's power is the sum of its GPUs' power and its energy the sum of
/// its GPUs' energy.
#[test]
fn two_agents_tenant_power_and_gpu_energy_match_the_mock() {
    let dir = tempfile::tempdir().unwrap();
    let truth = [
        ("a-1", Truth::of("a-1", SAMPLES)),
        ("b-1", Truth::of("b-1", SAMPLES)),
    ];
    // A long staleness window keeps the GPUs fresh after the agents exit.
    let collector = Collector::start(
        dir.path(),
        &tenants(&truth[1].1),
        0,
        &["--stale-after", "5m"],
    );
    let agents: Vec<Agent> = truth
        .iter()
        .map(|(node, _)| Agent::start(dir.path(), &collector.endpoint(), node, SAMPLES, ""))
        .collect();
    for a in agents {
        let log = a.finish(Duration::from_secs(30));
        log.wait_for("\"undelivered\":0", Duration::from_secs(1));
    }

    let m = collector.metrics();
    assert_eq!(
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "accepted")]
        ),
        (2 * SAMPLES) as f64
    );
    assert_eq!(
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "duplicate")]
        ),
        0.0
    );
    for (labels, n) in m.select(
        "capwatch_collector_samples_total",
        &[("outcome", "rejected")],
    ) {
        assert_eq!(n, 0.0, "rejections: {labels:?}");
    }
    let mut tenant_power = std::collections::BTreeMap::<&str, u64>::new();
    let mut tenant_energy = std::collections::BTreeMap::<&str, u64>::new();
    for (node, t) in &truth {
        assert_eq!(
            m.one("capwatch_node_samples_total", &[("node", node)]),
            SAMPLES as f64
        );
        assert_eq!(m.one("capwatch_node_up", &[("node", node)]), 1.0);
        for (gpu, uuid) in t.uuids.iter().enumerate() {
            let tenant = expected_tenant(node, gpu);
            let labels = [
                ("node", *node),
                ("uuid", uuid.as_str()),
                ("tenant", tenant),
                ("gpu", &gpu.to_string()),
            ];
            let power = milli(m.one("capwatch_gpu_power_watts", &labels));
            let energy = milli(m.one("capwatch_gpu_energy_joules_total", &labels));
            assert_eq!(power, t.power(gpu, SAMPLES), "{node} gpu {gpu} power");
            assert_eq!(energy, t.energy(gpu, 1, SAMPLES), "{node} gpu {gpu} energy");
            assert!(energy > 0);
            *tenant_power.entry(tenant).or_default() += power;
            *tenant_energy.entry(tenant).or_default() += energy;
        }
    }
    assert_eq!(tenant_power.len(), 3);
    for (tenant, power) in &tenant_power {
        assert_eq!(
            milli(m.one("capwatch_tenant_power_watts", &[("tenant", tenant)])),
            *power,
            "{tenant} power"
        );
        assert_eq!(
            milli(m.one("capwatch_tenant_energy_joules_total", &[("tenant", tenant)])),
            tenant_energy[tenant],
            "{tenant} energy"
        );
        assert_eq!(
            m.one(
                "capwatch_tenant_gpus",
                &[("tenant", tenant), ("state", "stale")]
            ),
            0.0
        );
    }
    assert_eq!(
        m.one(
            "capwatch_tenant_gpus",
            &[("tenant", "lab-a"), ("state", "reporting")]
        ),
        9.0
    );
    assert_eq!(
        m.one(
            "capwatch_tenant_contracted_power_watts",
            &[("tenant", "lab-a")]
        ),
        3000.0
    );
    let ratio = m.one(
        "capwatch_tenant_capacity_utilization_ratio",
        &[("tenant", "lab-a")],
    );
    assert!((ratio - tenant_power["lab-a"] as f64 / 3_000_000.0).abs() < 1e-9);
    // The usage API agrees with the live totals, to the millijoule, once
    // everything is acked (and so committed).
    let now = now_secs() as u64;
    let (from, to) = (now / 60 * 60 - 600, now / 60 * 60 + 600);
    let period = format!(
        "from={}&to={}&step=1m",
        capwatch_collector::usage::rfc3339(from as i64),
        capwatch_collector::usage::rfc3339(to as i64)
    );
    for tenant in ["lab-a", "lab-b", "unassigned"] {
        let body = http_get(
            collector.http,
            &format!("/v1/tenants/{tenant}/usage?{period}"),
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 20);
        let sum: u64 = energy_mj(rows);
        assert_eq!(sum, tenant_energy[tenant], "{tenant} usage vs metrics");
        let readings: u64 = rows.iter().map(|r| r["readings"].as_u64().unwrap()).sum();
        assert_eq!(
            readings,
            SAMPLES
                * [9, 3, 4][["lab-a", "lab-b", "unassigned"]
                    .iter()
                    .position(|t| *t == tenant)
                    .unwrap()]
        );
        assert!(
            rows.iter().any(|r| r["partial"] == true),
            "the open minute is partial"
        );
        let csv = http_get(
            collector.http,
            &format!("/v1/tenants/{tenant}/usage?{period}&format=csv"),
        );
        assert_eq!(csv.lines().count(), 21, "{csv}");
    }
    // Local days: yesterday and today in Paris hold the whole run.
    let today = jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::get("Europe/Paris").unwrap())
        .date();
    let paris_midnight = |d: jiff::civil::Date| {
        let z = d
            .to_zoned_datetime(jiff::tz::TimeZone::get("Europe/Paris").unwrap())
            .unwrap();
        z.timestamp().display_with_offset(z.offset()).to_string()
    };
    let days = format!(
        "from={}&to={}&step=1d&tz=Europe/Paris",
        paris_midnight(today.yesterday().unwrap()),
        paris_midnight(today.tomorrow().unwrap())
    )
    .replace('+', "%2B");
    let v: serde_json::Value = serde_json::from_str(&http_get(
        collector.http,
        &format!("/v1/tenants/lab-a/usage?{days}"),
    ))
    .unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    assert_eq!(energy_mj(rows), tenant_energy["lab-a"]);
    assert_eq!(v["time_zone"], "Europe/Paris");
    assert!(rows[1]["start"].as_str().unwrap().ends_with(":00"), "{v}");
    assert!(!rows[1]["start"].as_str().unwrap().ends_with('Z'), "{v}");
    let all: serde_json::Value =
        serde_json::from_str(&http_get(collector.http, &format!("/v1/usage?{period}"))).unwrap();
    assert_eq!(all["rows"].as_array().unwrap().len(), 60);
    let listed: serde_json::Value =
        serde_json::from_str(&http_get(collector.http, "/v1/tenants")).unwrap();
    let lab_a = listed["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "lab-a")
        .unwrap()
        .clone();
    assert_eq!(lab_a["contracted_power_watts"], 3000.0);
    assert_eq!(lab_a["gpus_reporting"], 9);
    // The usage API's error answers are checked in-process: http_api.rs.
    // No contract, no contract series for GPUs nobody leases.
    assert!(
        m.select(
            "capwatch_tenant_contracted_power_watts",
            &[("tenant", "unassigned")]
        )
        .is_empty()
    );
    // The billing command asks the running collector.
    let ask = |tenant: &str, format: &str| {
        std::process::Command::new(bin("capwatch-collector"))
            .args(["usage", "--url", &format!("http://{}", collector.http)])
            .args(["--tenant", tenant, "--step", "1m", "--format", format])
            .args(["--from", &capwatch_collector::usage::rfc3339(from as i64)])
            .args(["--to", &capwatch_collector::usage::rfc3339(to as i64)])
            .output()
            .unwrap()
    };
    let out = ask("lab-b", "json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sum: u64 = energy_mj(v["rows"].as_array().unwrap());
    assert_eq!(sum, tenant_energy["lab-b"]);
    let out = ask("lab-b", "table");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 22);
    let out = ask("nobody", "csv");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("answered 404: unknown tenant \"nobody\""),
        "{err}"
    );
    collector.stop();

    // The billing command reads the same ledger file directly.
    let out = std::process::Command::new(bin("capwatch-collector"))
        .arg("--ledger")
        .arg(dir.path().join("ledger.db"))
        .arg("--tenants")
        .arg(dir.path().join("tenants.toml"))
        .args([
            "usage", "--tenant", "lab-a", "--step", "1m", "--format", "json",
        ])
        .args(["--from", &capwatch_collector::usage::rfc3339(from as i64)])
        .args(["--to", &capwatch_collector::usage::rfc3339(to as i64)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let sum: u64 = energy_mj(rows);
    assert_eq!(sum, tenant_energy["lab-a"]);
    assert_eq!(rows[0]["contracted_power_watts"], 3000.0);
}

/// Invariant: rows per GPU from `/v2/usage?group_by=gpu&step=1h` sum, per
/// tenant and hour, exactly to the tenant's rows, and each GPU's to its
/// mock counter delta over the samples the collector saw.
#[test]
fn usage_rows_per_gpu_sum_to_the_tenants_and_match_the_mock() {
    let dir = tempfile::tempdir().unwrap();
    let truth = [
        ("a-1", Truth::of("a-1", SAMPLES)),
        ("b-1", Truth::of("b-1", SAMPLES)),
    ];
    init_ledger(dir.path());
    let mut cmd = Collector::command(
        dir.path(),
        &tenants(&truth[1].1),
        0,
        &["--stale-after", "5m"],
    );
    cmd.env("CAPWATCH_USAGE_GPU_ROWS", "true");
    let collector = Collector::spawn(cmd);
    let start = now_secs();
    let agents: Vec<Agent> = truth
        .iter()
        .map(|(node, _)| Agent::start(dir.path(), &collector.endpoint(), node, SAMPLES, ""))
        .collect();
    for a in agents {
        let log = a.finish(Duration::from_secs(30));
        log.wait_for("\"undelivered\":0", Duration::from_secs(1));
    }
    // Every hour of the run, a whole hour either side.
    let (from, to) = (start / 3600 * 3600 - 3600, (now_secs() / 3600 + 2) * 3600);
    let rows = |group_by: &str| -> Vec<serde_json::Value> {
        let path = format!(
            "/v2/usage?from={}&to={}&step=1h&group_by={group_by}&limit=10000",
            capwatch_collector::usage::rfc3339(from),
            capwatch_collector::usage::rfc3339(to)
        );
        let v: serde_json::Value = serde_json::from_str(&http_get(collector.http, &path)).unwrap();
        assert!(v["next_page_token"].is_null(), "{v}");
        v["rows"].as_array().unwrap().clone()
    };
    let (by_tenant, by_gpu) = (rows("tenant"), rows("gpu"));
    let mj = |r: &serde_json::Value| -> u64 {
        r["energy_millijoules"].as_str().unwrap().parse().unwrap()
    };
    let mut want = std::collections::BTreeMap::<(String, String), u64>::new();
    for r in &by_tenant {
        let key = (
            r["tenant"].as_str().unwrap().to_string(),
            r["start"].as_str().unwrap().to_string(),
        );
        *want.entry(key).or_default() += mj(r);
    }
    let mut got = std::collections::BTreeMap::<(String, String), u64>::new();
    let mut per_gpu = std::collections::BTreeMap::<(String, String, String), u64>::new();
    for r in &by_gpu {
        let (tenant, node, gpu) = (
            r["tenant"].as_str().unwrap().to_string(),
            r["node"].as_str().unwrap().to_string(),
            r["gpu"].as_str().unwrap().to_string(),
        );
        *got.entry((tenant.clone(), r["start"].as_str().unwrap().to_string()))
            .or_default() += mj(r);
        *per_gpu.entry((tenant, node, gpu)).or_default() += mj(r);
    }
    want.retain(|_, e| *e > 0);
    got.retain(|_, e| *e > 0);
    assert!(!got.is_empty());
    assert_eq!(got, want, "GPU rows vs tenant rows, per tenant and hour");
    let mut truth_per_gpu = std::collections::BTreeMap::new();
    for (node, t) in &truth {
        for (gpu, uuid) in t.uuids.iter().enumerate() {
            truth_per_gpu.insert(
                (
                    expected_tenant(node, gpu).to_string(),
                    node.to_string(),
                    uuid.clone(),
                ),
                t.energy(gpu, 1, SAMPLES),
            );
        }
    }
    assert_eq!(per_gpu, truth_per_gpu, "GPU rows vs the mock's counters");
    collector.stop();
}

/// Invariant: after the collector is stopped and started again while the
/// agents run, the agents reconnect by themselves and the ledger carries
/// every GPU's count across the restart: each GPU's energy equals its mock
/// counter delta over the whole run, to the millijoule, nothing lost and
/// nothing counted twice.
#[test]
fn agents_reconnect_after_collector_restart_and_nothing_is_counted_twice() {
    const N: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let nodes = ["a-1", "b-1"];
    let truth: Vec<Truth> = nodes.iter().map(|n| Truth::of(n, N)).collect();
    let tenants = tenants(&truth[1]);
    let first = Collector::start(dir.path(), &tenants, 0, &["--stale-after", "5m"]);
    let port = first.grpc.port();
    let endpoint = first.endpoint();
    let fast_reconnect =
        "reconnect_initial = \"50ms\"\nreconnect_max = \"300ms\"\ndrain_timeout = \"20s\"\n";
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|n| Agent::start(dir.path(), &endpoint, n, N, fast_reconnect))
        .collect();
    // Let some samples reach the first collector, then restart it.
    eventually(
        Duration::from_secs(10),
        "samples at the first collector",
        || {
            first.metrics().one(
                "capwatch_collector_samples_total",
                &[("outcome", "accepted")],
            ) >= 10.0
        },
    );
    // What the first collector held just before it stopped (a lower bound:
    // a batch may still arrive between this scrape and the stop, and is
    // committed at the stop).
    let held: Vec<u64> = nodes
        .iter()
        .map(|n| {
            first
                .metrics()
                .one("capwatch_node_samples_total", &[("node", n)]) as u64
        })
        .collect();
    first.stop();
    std::thread::sleep(Duration::from_millis(700));
    let second = Collector::start(dir.path(), &tenants, port, &["--stale-after", "5m"]);
    for a in agents {
        let log = a.finish(Duration::from_secs(40));
        log.wait_for("\"undelivered\":0", Duration::from_secs(1));
        // One connection to each collector at least.
        let connects = log
            .lines()
            .iter()
            .filter(|l| l.contains("\"connected\"") || l.contains("connected\","))
            .count();
        assert!(connects >= 2, "agent reconnected {connects} times");
    }

    let m = second.metrics();
    for ((node, t), held) in nodes.iter().zip(&truth).zip(held) {
        let accepted = m.one("capwatch_node_samples_total", &[("node", node)]) as u64;
        assert!(
            accepted > 0 && accepted < N,
            "{node}: second collector accepted {accepted} of {N}"
        );
        // No sample counted by both: the second resumed dedup from the
        // ledger (`held` is a lower bound of what the first committed).
        assert!(held + accepted <= N, "{node}: {held} + {accepted} > {N}");
        for gpu in 0..8 {
            let energy = milli(m.one(
                "capwatch_gpu_energy_joules_total",
                &[("node", node), ("gpu", &gpu.to_string())],
            ));
            assert_eq!(energy, t.energy(gpu, 1, N), "{node} gpu {gpu}");
        }
    }
    second.stop();
}

/// Invariant: SIGHUP reloads the tenant file without a restart: GPUs move
/// to their new tenant, energy already counted stays with the tenant it was
/// counted for, and a bad file is refused while the old tenants stay.
#[test]
fn sighup_reloads_tenants_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = "[[tenant]]\nid = \"old\"\ncontracted_kw = 5\nnodes = [\"h-1\"]\n";
    let collector = Collector::start(dir.path(), first, 0, &["--stale-after", "5m"]);
    Agent::start(dir.path(), &collector.endpoint(), "h-1", 10, "").finish(Duration::from_secs(30));
    let before = collector.metrics();
    let old_energy = before.one("capwatch_tenant_energy_joules_total", &[("tenant", "old")]);
    assert!(old_energy > 0.0);
    assert_eq!(
        before
            .select("capwatch_gpu_power_watts", &[("tenant", "old")])
            .len(),
        8
    );

    let hup = |c: &Collector| {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &c.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    // The reload reads the same path the collector was started with.
    let path = dir.path().join("tenants.toml");
    std::fs::write(
        &path,
        "[[tenant]]\nid = \"new\"\ncontracted_kw = 7\nnodes = [\"h-*\"]\n",
    )
    .unwrap();
    hup(&collector);
    eventually(Duration::from_secs(10), "the reload", || {
        collector.metrics().one(
            "capwatch_collector_tenant_reloads_total",
            &[("result", "success")],
        ) == 1.0
    });
    let after = collector.metrics();
    assert_eq!(
        after
            .select("capwatch_gpu_power_watts", &[("tenant", "new")])
            .len(),
        8
    );
    assert_eq!(
        after.one(
            "capwatch_tenant_contracted_power_watts",
            &[("tenant", "new")]
        ),
        7000.0
    );
    assert_eq!(
        after.one("capwatch_tenant_energy_joules_total", &[("tenant", "new")]),
        0.0
    );
    assert!(
        after
            .select("capwatch_tenant_power_watts", &[("tenant", "old")])
            .is_empty()
    );

    // A broken file is refused; "new" stays in force.
    std::fs::write(&path, "[[tenant]]\nid = \"bad\"\ncontracted_kw = -1\n").unwrap();
    hup(&collector);
    eventually(Duration::from_secs(10), "the refused reload", || {
        collector.metrics().one(
            "capwatch_collector_tenant_reloads_total",
            &[("result", "failure")],
        ) == 1.0
    });
    let m = collector.metrics();
    assert_eq!(
        m.one(
            "capwatch_tenant_contracted_power_watts",
            &[("tenant", "new")]
        ),
        7000.0
    );
    collector
        .log
        .wait_for("contracted_kw must be a positive", Duration::from_secs(1));
    collector.stop();
}

/// The fleet simulator: every node's own stream (several sharing an
/// HTTP/2 connection), batches of several samples, and a summary that says
/// what the collector acked, which the collector's own counters confirm.
#[test]
fn fleet_simulator_reports_what_the_collector_acked() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), "", 0, &[]);
    let out = std::process::Command::new(bin("capwatch-fleet"))
        .args(["--collector", &collector.endpoint()])
        .args(["--nodes", "12", "--gpus", "4", "--interval", "50ms"])
        .args(["--duration", "2s", "--nodes-per-connection", "5"])
        .args(["--samples-per-send", "3", "--node-prefix", "fleet-"])
        .args(["--log-format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet exit: {}", out.status);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let done = stdout
        .lines()
        .find(|l| l.contains("\"event\":\"done\""))
        .unwrap_or_else(|| panic!("no summary in {stdout}"));
    let sampled = json_number(done, "sampled");
    // 2 s at 20 samples/s per node, give or take a tick at either end.
    assert!((12 * 35..=12 * 45).contains(&sampled), "{done}");
    assert_eq!(json_number(done, "acked"), sampled, "{done}");
    assert_eq!(
        json_number(done, "gpu_samples_acked"),
        sampled * 4,
        "{done}"
    );
    assert_eq!(json_number(done, "dropped"), 0, "{done}");
    assert_eq!(json_number(done, "rejected"), 0, "{done}");
    assert_eq!(json_number(done, "abandoned"), 0, "{done}");
    assert_eq!(json_number(done, "undelivered"), 0, "{done}");
    assert_eq!(json_number(done, "connects"), 12, "{done}");
    let m = collector.metrics();
    assert_eq!(
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "accepted")]
        ),
        sampled as f64
    );
    assert_eq!(m.one("capwatch_collector_nodes", &[]), 12.0);
    // Every GPU known; stale by now, 150 ms after the fleet stopped.
    let gpus = |state| {
        m.one(
            "capwatch_tenant_gpus",
            &[("tenant", "unassigned"), ("state", state)],
        )
    };
    assert_eq!(gpus("reporting") + gpus("stale"), 48.0);
    collector.stop();
}

/// Node `m-1` moves from tenant `ta` to tenant `tb` while the collector is
/// down; the agent's spool delivers the outage's samples to the restarted
/// collector. The change takes effect when the new file is loaded, or at
/// the `effective_from` it names (a moment during the outage).
fn lease_change_during_an_outage(explicit: bool) {
    // 20 s of samples: the outage and restart fit inside the run even on
    // a loaded machine.
    const N: u64 = 200;
    const STEP: i64 = INTERVAL_MS as i64 * 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let truth = Truth::of("m-1", N);
    let v1 = "[[tenant]]\nid = \"ta\"\ncontracted_kw = 10\nnodes = [\"m-1\"]\n\n\
              [[tenant]]\nid = \"tb\"\ncontracted_kw = 10\n";
    let first = Collector::start(dir.path(), v1, 0, &["--stale-after", "5m"]);
    let port = first.grpc.port();
    let fast_reconnect =
        "reconnect_initial = \"50ms\"\nreconnect_max = \"200ms\"\ndrain_timeout = \"20s\"\n";
    let agent = Agent::start(dir.path(), &first.endpoint(), "m-1", N, fast_reconnect);
    let epoch = json_number(
        &first
            .log
            .wait_for("agent connected", Duration::from_secs(20)),
        "epoch",
    ) as i64;
    eventually(
        Duration::from_secs(10),
        "samples at the first collector",
        || {
            !first
                .metrics()
                .select("capwatch_node_samples_total", &[("node", "m-1")])
                .is_empty()
        },
    );
    first.stop();
    let failures = || {
        agent
            .log
            .lines()
            .iter()
            .filter(|l| l.contains("stream to collector failed"))
            .count()
    };
    // The stream ended, and a reconnect failed: samples pile up.
    eventually(
        Duration::from_secs(10),
        "the agent finding the collector gone",
        || failures() >= 2,
    );
    // The outage spans several samples: a collector that comes back
    // within one interval would leave nothing for the spool to deliver.
    let gone_at = now_nanos();
    eventually(Duration::from_secs(10), "samples during the outage", || {
        now_nanos() > gone_at + 5 * STEP
    });
    let mut v2 = String::new();
    let mut explicit_change = None;
    if explicit {
        // Halfway between two samples, while the collector is down; more
        // samples are taken before it comes back.
        let k = (now_nanos() - epoch) / STEP + 1;
        let change = epoch + k * STEP + STEP / 2;
        let secs = change.div_euclid(1_000_000_000);
        let nanos = change.rem_euclid(1_000_000_000);
        let stamp = capwatch_collector::usage::rfc3339(secs);
        v2 = format!(
            "effective_from = {}.{nanos:09}Z\n",
            stamp.trim_end_matches('Z')
        );
        explicit_change = Some(change);
        eventually(Duration::from_secs(10), "samples after the change", || {
            now_nanos() > change + 3 * STEP
        });
    }
    v2.push_str(
        "[[tenant]]\nid = \"ta\"\ncontracted_kw = 10\n\n\
         [[tenant]]\nid = \"tb\"\ncontracted_kw = 10\nnodes = [\"m-1\"]\n",
    );
    let restarted_at = now_nanos();
    let second = Collector::start(dir.path(), &v2, port, &["--stale-after", "5m"]);
    agent
        .finish(Duration::from_secs(40))
        .wait_for("\"undelivered\":0", Duration::from_secs(1));
    // Sample k is stamped at the agent's start plus a fixed offset plus
    // k - 1 intervals; the last sample's timestamp gives the offset.
    let m = second.metrics();
    let last = m.one(
        "capwatch_node_last_sample_timestamp_seconds",
        &[("node", "m-1")],
    );
    let offset = (last * 1e9).round() as i64 - epoch - (N as i64 - 1) * STEP;
    assert!((0..STEP / 2).contains(&offset), "offset {offset}");
    let stamp = |k: u64| epoch + offset + (k as i64 - 1) * STEP;
    let energy = |from: u64, to: u64| (0..8).map(|g| truth.energy(g, from, to)).sum::<u64>();
    if !explicit {
        // Whatever the load's exact moment, every sample stamped before
        // the second collector started is ta's.
        let down = (1..=N)
            .take_while(|&k| stamp(k) < restarted_at)
            .last()
            .unwrap();
        assert!(
            milli(m.one("capwatch_tenant_energy_joules_total", &[("tenant", "ta")]))
                >= energy(1, down),
            "samples stamped before the restart billed to tb"
        );
    }
    let change = explicit_change.unwrap_or_else(|| {
        json_number(
            &second
                .log
                .wait_for("tenant file version recorded", Duration::from_secs(1)),
            "effective_from_ns",
        ) as i64
    });
    // Samples 2..=before close intervals that end before the change.
    let before = (1..=N).take_while(|&k| stamp(k) < change).last().unwrap();
    assert!(
        before > 1 && before < N,
        "the change at {change} lies outside the run (sample {before})"
    );

    let minute = |ns: i64| ns.div_euclid(60_000_000_000) * 60;
    let rfc = capwatch_collector::usage::rfc3339;
    let path = format!(
        "/v1/usage?from={}&to={}&step=1m",
        rfc(minute(epoch)),
        rfc(minute(stamp(N)) + 60)
    );
    let v: serde_json::Value = serde_json::from_str(&http_get(second.http, &path)).unwrap();
    let mut total: std::collections::BTreeMap<String, u64> = Default::default();
    for row in v["rows"].as_array().unwrap() {
        let e = amount(&row["energy_millijoules"]);
        if e == 0 {
            continue;
        }
        let tenant = row["tenant"].as_str().unwrap().to_string();
        let start = row["start"].as_str().unwrap();
        // Minute rows before the change are ta's, from it on tb's (tb's
        // first interval began at sample `before`).
        match tenant.as_str() {
            "ta" => assert!(start <= rfc(minute(change)).as_str(), "{row}"),
            "tb" => assert!(start >= rfc(minute(stamp(before))).as_str(), "{row}"),
            _ => panic!("energy for {tenant}: {row}"),
        }
        *total.entry(tenant).or_default() += e;
    }
    assert_eq!(
        total.get("ta").copied(),
        Some(energy(1, before)),
        "{total:?}"
    );
    assert_eq!(
        total.get("tb").copied(),
        Some(energy(before, N)),
        "{total:?}"
    );
    assert_eq!(
        milli(m.one("capwatch_tenant_energy_joules_total", &[("tenant", "tb")])),
        energy(before, N)
    );
    second.stop();
}

/// Invariant: energy is attributed by the lease in force at the sample's
/// own time, not at its arrival: samples stamped before the restarted
/// collector loaded the new tenant file stay with the old tenant.
#[test]
fn a_lease_change_during_an_outage_bills_the_spool_by_sample_time() {
    lease_change_during_an_outage(false);
}

/// Invariant: a tenant file's `effective_from` says when its leases start:
/// spooled samples from before it are the old tenant's, those after it the
/// new one's, to the millijoule.
#[test]
fn a_lease_change_takes_effect_at_its_effective_time() {
    lease_change_during_an_outage(true);
}
