//! deploy/ proven against the real tools: promtool, Prometheus,
//! systemd-analyze, the Kubernetes schemas (kubernetes-validate) and the
//! Grafana dashboard's queries, against a running collector and agents.
//!
//! `scripts/install-test-tools.sh` installs the tools and `scripts/test.sh`
//! sets `CAPWATCH_REQUIRE_TOOLS=1`, so in the suite a missing tool fails
//! the test. Run alone without the tools, a test says loudly that it
//! skipped and passes.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::support::*;
use capwatch_proto::v1 as pb;
use capwatch_proto::v1::ingest_client::IngestClient;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn required() -> bool {
    std::env::var("CAPWATCH_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

fn skip(what: &str) {
    assert!(
        !required(),
        "{what} is missing and CAPWATCH_REQUIRE_TOOLS=1: run scripts/install-test-tools.sh"
    );
    eprintln!("\n!!!!! SKIPPED: {what} is missing; run scripts/install-test-tools.sh !!!!!\n");
}

/// A tool on PATH, or `None` after a loud skip.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip(name);
    }
    found
}

/// The Python of the virtual environment with kubernetes-validate.
fn deploy_python() -> Option<PathBuf> {
    let p = std::env::var_os("CAPWATCH_DEPLOY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/deploy-venv/bin/python"));
    if p.is_file() {
        Some(p)
    } else {
        skip(&format!("{} (kubernetes-validate)", p.display()));
        None
    }
}

/// Runs a command and asserts it succeeded; returns its output.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ {cmd:?}\n{text}");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{text}",
        out.status
    );
    out
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn promtool_checks_the_config_and_rules_and_runs_the_rule_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let d = repo().join("deploy/prometheus");
    run_ok(
        Command::new(&promtool)
            .arg("check")
            .arg("config")
            .arg(d.join("prometheus.yml")),
    );
    let rules = std::fs::read_to_string(d.join("rules/capwatch.rules.yml")).unwrap();
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(d.join("rules/capwatch.rules.yml")),
    );
    let found = format!("{} rules found", rule_count(&rules));
    assert!(output_text(&out).contains(&found), "not {found}");
    run_ok(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(d.join("tests/capwatch.rules.test.yml")),
    );

    // Every alert has a unit test that expects it to fire.
    let tests = std::fs::read_to_string(d.join("tests/capwatch.rules.test.yml")).unwrap();
    for (alert, _) in rule_exprs(&rules, "- alert: ") {
        let fired = tests.split("- alertname: ").skip(1).any(|t| {
            t.starts_with(&format!("{alert}\n")) && t.contains("exp_alerts:\n          - ")
        });
        assert!(fired, "no promtool test expects {alert} to fire");
    }

    // The compose demo's Prometheus config, with its rule path pointed at
    // the rules it mounts.
    let dir = tempfile::tempdir().unwrap();
    let compose = std::fs::read_to_string(repo().join("deploy/docker/prometheus.yml")).unwrap();
    let compose = replace_once(
        &compose,
        "/etc/prometheus/rules/",
        &format!("{}/", d.join("rules").display()),
    );
    std::fs::write(dir.path().join("prometheus.yml"), compose).unwrap();
    run_ok(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml")),
    );
}

/// The Prometheus Operator's PrometheusRule is generated from the rule
/// file; its embedded groups are the same rules and pass promtool.
#[test]
fn the_prometheusrule_carries_the_same_rules() {
    run_ok(
        Command::new("bash")
            .arg(repo().join("scripts/gen-prometheusrule.sh"))
            .arg("--check"),
    );
    let (Some(python), Some(promtool)) = (deploy_python(), tool("promtool")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let groups = dir.path().join("groups.yml");
    run_ok(
        Command::new(python)
            .arg(repo().join("scripts/check-deploy.py"))
            .arg("prometheusrule")
            .arg(&groups),
    );
    let out = run_ok(Command::new(promtool).args(["check", "rules"]).arg(&groups));
    let rules =
        std::fs::read_to_string(repo().join("deploy/prometheus/rules/capwatch.rules.yml")).unwrap();
    let found = format!("{} rules found", rule_count(&rules));
    assert!(output_text(&out).contains(&found), "not {found}");
}

#[test]
fn kubernetes_manifests_are_valid_against_the_schemas() {
    let Some(python) = deploy_python() else {
        return;
    };
    run_ok(
        Command::new(python)
            .arg(repo().join("scripts/check-deploy.py"))
            .arg("kubernetes"),
    );
}

/// Docker is not available in the suite: the images are not built. This
/// checks that the compose file and Dockerfiles refer to what exists.
#[test]
fn compose_file_and_dockerfiles_refer_to_real_files() {
    let Some(python) = deploy_python() else {
        return;
    };
    run_ok(
        Command::new(python)
            .arg(repo().join("scripts/check-deploy.py"))
            .arg("docker"),
    );
}

/// `systemd-analyze verify` wants the ExecStart binaries to exist, so the
/// units are verified as copies whose ExecStart names the binaries this
/// build made; everything else is the shipped unit. Any warning fails, and
/// `systemd-analyze security` must rate the exposure at most 3.0 ("OK";
/// `--threshold` counts tenths).
#[test]
fn systemd_units_verify_and_are_hardened() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let units = repo().join("deploy/systemd");
    let mut copies = Vec::new();
    for (unit, bin_name) in [
        ("capwatch-agent.service", "capwatch-agent"),
        ("capwatch-collector.service", "capwatch-collector"),
    ] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        let text = replace_once(
            &text,
            &format!("ExecStart=/usr/local/bin/{bin_name}\n"),
            &format!("ExecStart={}\n", bin(bin_name).display()),
        );
        for want in [
            "User=capwatch",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "Restart=on-failure",
            "EnvironmentFile=-/etc/capwatch/",
        ] {
            assert!(text.contains(want), "{unit} lacks {want}");
        }
        let copy = dir.path().join(unit);
        std::fs::write(&copy, text).unwrap();
        copies.push(copy);
    }
    let verify = |units: &[PathBuf]| {
        Command::new(&analyze)
            .arg("verify")
            .args(units)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap()
    };
    let out = verify(&copies);
    let text = output_text(&out);
    eprintln!("systemd-analyze verify: {}\n{text}", out.status);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");

    // The check can fail: a misspelt setting is reported.
    let bad = dir.path().join("capwatch-bad.service");
    let unit = std::fs::read_to_string(&copies[0]).unwrap();
    std::fs::write(
        &bad,
        unit.replace("ProtectSystem=strict", "ProtectSytem=strict"),
    )
    .unwrap();
    assert!(output_text(&verify(&[bad])).contains("ProtectSytem"));

    for copy in &copies {
        run_ok(
            Command::new(&analyze)
                .args(["security", "--offline=true", "--threshold=30", "--no-pager"])
                .arg(copy),
        );
    }

    // The collector with its drop-in for a PostgreSQL ledger (several
    // collectors): verify reads `<unit>.d/` next to the unit, and the
    // result is as hardened.
    let drop_in = "capwatch-collector.service.d/postgres-ledger.conf";
    let conf = std::fs::read_to_string(units.join(drop_in)).unwrap();
    let ha = dir.path().join("ha");
    std::fs::create_dir_all(ha.join("capwatch-collector.service.d")).unwrap();
    let collector = ha.join("capwatch-collector.service");
    std::fs::copy(&copies[1], &collector).unwrap();
    std::fs::write(ha.join(drop_in), &conf).unwrap();
    let out = verify(std::slice::from_ref(&collector));
    let text = output_text(&out);
    eprintln!(
        "systemd-analyze verify (with {drop_in}): {}\n{text}",
        out.status
    );
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    run_ok(
        Command::new(&analyze)
            .args(["security", "--offline=true", "--threshold=30", "--no-pager"])
            .arg(&collector),
    );
    // The drop-in is read: a misspelt setting in it is reported.
    std::fs::write(
        ha.join(drop_in),
        replace_once(&conf, "UnsetEnvironment=", "UnsetEnviroment="),
    )
    .unwrap();
    assert!(output_text(&verify(&[collector])).contains("UnsetEnviroment"));
    // It takes away the unit's SQLite path (ledger_url and ledger_path
    // together are refused), and hands the password over as the
    // credential the example config reads.
    let unit = std::fs::read_to_string(units.join("capwatch-collector.service")).unwrap();
    assert!(unit.contains("\nEnvironment=CAPWATCH_LEDGER="));
    assert!(conf.contains("\nUnsetEnvironment=CAPWATCH_LEDGER\n"));
    let credential = conf
        .lines()
        .find_map(|l| l.strip_prefix("LoadCredential="))
        .and_then(|c| c.split_once(':'))
        .map(|(id, _)| id)
        .expect("LoadCredential=ID:PATH in the drop-in");
    let example =
        std::fs::read_to_string(repo().join("deploy/examples/ha/collector.toml")).unwrap();
    let password_file = format!(
        "ledger_password_file = \"/run/credentials/capwatch-collector.service/{credential}\"\n"
    );
    assert!(example.contains(&password_file), "no {password_file}");

    let sysusers = std::fs::read_to_string(units.join("capwatch.sysusers.conf")).unwrap();
    assert!(sysusers.lines().any(|l| l.starts_with("u capwatch ")));
}

/// Replaces `from`, which must occur exactly once.
/// A heading's anchor as GitHub makes it: lower case, spaces as `-`,
/// other punctuation dropped.
fn heading_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every alert's `runbook_url` points at a section of deploy/README.md
/// that exists, under the workspace's repository URL: an alert that pages
/// someone says where to start.
#[test]
fn every_alert_links_a_runbook_section_that_exists() {
    let rules =
        std::fs::read_to_string(repo().join("deploy/prometheus/rules/capwatch.rules.yml")).unwrap();
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    let anchors: std::collections::BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| heading_anchor(l.trim_start_matches('#')))
        .collect();
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    let repository = manifest["workspace"]["package"]["repository"]
        .as_str()
        .expect("the workspace names its repository");
    let base = format!("{repository}/blob/main/deploy/README.md#");
    let alerts = rule_exprs(&rules, "- alert: ");
    let blocks: Vec<&str> = rules.split("- alert: ").skip(1).collect();
    assert_eq!(blocks.len(), alerts.len());
    for ((alert, _), block) in alerts.iter().zip(blocks) {
        let url = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("runbook_url: "))
            .unwrap_or_else(|| panic!("{alert} has no runbook_url"))
            .trim_matches('"');
        let anchor = url
            .strip_prefix(&base)
            .unwrap_or_else(|| panic!("{alert}: {url} is not under {base}"));
        assert!(
            anchors.contains(anchor),
            "{alert}: deploy/README.md has no section #{anchor}"
        );
        assert_eq!(anchor, alert.to_lowercase(), "{alert}: its own section");
    }
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?} in {text}");
    text.replace(from, to)
}

/// How many recording and alerting rules the rule file holds.
fn rule_count(rules: &str) -> usize {
    rule_exprs(rules, "- record: ").len() + rule_exprs(rules, "- alert: ").len()
}

/// (name, expr) of every rule whose line starts with `marker` (`- record: `
/// or `- alert: `); the rules file keeps each expr on one line.
fn rule_exprs(rules: &str, marker: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = l.trim_start().strip_prefix(marker) else {
            continue;
        };
        let expr = lines[i + 1..]
            .iter()
            .find_map(|l| l.trim_start().strip_prefix("expr: "))
            .expect("an expr after the rule name");
        assert!(!expr.starts_with(['|', '>']), "{name}: multi-line expr");
        out.push((name.to_string(), expr.to_string()));
    }
    assert!(!out.is_empty(), "no {marker:?} in the rules");
    out
}

/// Every panel query of the Grafana dashboard, with its template variables
/// set as "All tenants" and a 1-minute rate window.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/capwatch-dashboard.json"))
        .expect("the dashboard");
    let dash: Value = serde_json::from_str(&text).unwrap();
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "tenant"]);
    let mut ids = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        let g = &p["gridPos"];
        assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24);
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(!expr.is_empty(), "{title}: empty query");
            let expr = expr
                .replace("$tenant", ".*")
                .replace("$__rate_interval", "1m");
            assert!(!expr.contains('$'), "{title}: unknown variable in {expr}");
            out.push((title.to_string(), expr));
        }
    }
    out
}

#[test]
fn grafana_dashboard_covers_what_an_sre_needs() {
    let titles: Vec<String> = dashboard_queries().into_iter().map(|(t, _)| t).collect();
    for want in [
        "Tenant power vs contract",
        "Capacity utilization",
        "Energy per tenant per day",
        "Stale GPUs",
        "Nodes not reporting",
        "Power per node",
        "Collector up",
        "GPU, node and facility power per tenant",
        "Nodes without whole-node power",
        "Meters up",
        "Meter drift",
        "Ledger commit latency",
        "HTTP requests by route",
        "Collector process",
        "Time held back by the power cap",
        "XID errors in the last hour",
        "ECC errors in the last hour",
        "GPUs waiting for a reset or service",
        "Hottest GPU and memory temperatures",
        "NVLink traffic",
        "NVLink errors in the last hour",
    ] {
        assert!(titles.iter().any(|t| t == want), "no panel {want:?}");
    }
}

/// A Prometheus server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: Log,
}

impl Prometheus {
    fn start(prometheus: &Path, dir: &Path) -> Self {
        for _ in 0..3 {
            // A free port: bound, released, then given to Prometheus; if
            // another process takes it meanwhile, try again.
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let mut child = Command::new(prometheus)
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start prometheus");
            let log = Log::default();
            log.capture(child.stderr.take().unwrap(), "prometheus".into());
            let mut p = Self { child, addr, log };
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < until {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(addr).is_ok()
                    && http_get_status(addr, "/-/ready").0 == 200
                {
                    return p;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = p.child.kill();
            eprintln!("prometheus did not come up on {addr}: {:?}", p.log.lines());
        }
        panic!("prometheus did not start");
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        let (status, body) = http_get_status(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        );
        assert_eq!(status, 200, "{promql}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{promql}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls until `promql` returns at least one series.
    fn has_data(&self, what: &str, promql: &str) -> Vec<Value> {
        let mut last = Vec::new();
        eventually(
            Duration::from_secs(60),
            &format!("{what}: {promql}"),
            || {
                last = self.query(promql);
                !last.is_empty()
            },
        );
        eprintln!("ok  {what}: {promql} -> {} series", last.len());
        last
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends one sample with a GPU index outside the inventory: rejected, as
/// a misbehaving agent's would be.
fn send_rejected_sample(endpoint: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = IngestClient::connect(endpoint.to_string()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(pb::Hello {
                node_power_sources: Vec::new(),
                node_id: "e2e-bad-1".into(),
                agent_version: "test".into(),
                stream_epoch: 1,
                interval_millis: 1000,
                gpus: vec![pb::GpuInfo {
                    index: 0,
                    uuid: "GPU-e2e-bad-0".into(),
                    model: "test".into(),
                    power_limit_milliwatts: Some(700_000),
                    memory_total_bytes: None,
                    energy_counter_supported: true,
                    ..Default::default()
                }],
                host: None,
            })),
        })
        .await
        .unwrap();
        let mut rx = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        rx.message().await.unwrap().expect("welcome");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        tx.send(pb::AgentMessage {
            body: Some(pb::agent_message::Body::Batch(pb::SampleBatch {
                samples: vec![pb::NodeSample {
                    node_power: Vec::new(),
                    seq: 1,
                    timestamp_unix_nanos: now,
                    gpus: vec![pb::GpuSample {
                        index: 7,
                        power_milliwatts: Some(100_000),
                        ..Default::default()
                    }],
                    host: None,
                }],
            })),
        })
        .await
        .unwrap();
        rx.message().await.unwrap().expect("ack");
    });
}

/// lab-a leases 1 W, so its 8 GPUs are far over contract; lab-b has room.
const TENANTS: &str = r#"
[[tenant]]
id = "lab-a"
name = "Lab A"
contracted_kw = 0.001
nodes = ["e2e-a-*"]

[[tenant]]
id = "lab-b"
name = "Lab B"
contracted_kw = 1000
basis = "facility"
pue = 1.3
nodes = ["e2e-b-*", "e2e-gone-*", "e2e-spare-*"]
"#;

/// End to end: a collector and mock agents, a real Prometheus scraping
/// them every second with the deploy/ config and rules. Every recording
/// rule, every alert expression that can be driven here, and every Grafana
/// panel query returns data; the /metrics body passes `promtool check
/// metrics`.
#[test]
fn prometheus_scrapes_the_collector_and_every_rule_and_panel_has_data() {
    let (Some(prometheus), Some(promtool)) = (tool("prometheus"), tool("promtool")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A facility meter nothing answers for (capwatch_meter_up 0), and one
    // whose register counts on (its power).
    let row_b = capwatch_agent::meter_sim::ModbusMeter::start(Default::default()).unwrap();
    let meters = dir.path().join("meters.toml");
    std::fs::write(
        &meters,
        format!(
            "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"e2e-a-*\"]\naddress = \"127.0.0.1:1\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n\n[[meter]]\nid = \"row-b\"\nkind = \"modbus\"\nnodes = [\"e2e-b-*\"]\naddress = \"{}\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nwh_per_count = 1\n",
            row_b.addr()
        ),
    )
    .unwrap();
    let counting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let ticker = {
        let counting = counting.clone();
        std::thread::spawn(move || {
            while counting.load(std::sync::atomic::Ordering::Relaxed) {
                row_b.advance(3);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let collector = Collector::start(
        dir.path(),
        TENANTS,
        0,
        &["--config", meters.to_str().unwrap()],
    );
    let ep = collector.endpoint();
    // Long-running agents (killed on drop), and one that stops after two
    // seconds: its node goes down and its GPUs stale.
    let _a = Agent::start(dir.path(), &ep, "e2e-a-1", 100_000, "");
    let _b = Agent::start(dir.path(), &ep, "e2e-b-1", 100_000, "");
    // Without the mock's whole-node power: a node of a facility-basis
    // tenant that sends none.
    let _spare = Agent::start(
        dir.path(),
        &ep,
        "e2e-spare-1",
        100_000,
        "[mock]\nnode_power = false\n",
    );
    let gone = Agent::start(dir.path(), &ep, "e2e-gone-1", 20, "");
    // An agent that runs but reaches no collector, scraped on its own
    // port: past its health_max_undelivered it is up but not delivering.
    let stranded = Agent::start(
        dir.path(),
        "http://127.0.0.1:1",
        "e2e-stranded-1",
        100_000,
        "http_listen = \"127.0.0.1:0\"\nhealth_max_undelivered = \"1s\"\n",
    );
    let listen = stranded
        .log
        .wait_for("agent HTTP port", Duration::from_secs(30));
    let stranded_http = json_field(&listen, "listen").unwrap();

    // The deploy config, pointed at this collector, scraping and
    // evaluating every second.
    let pdir = dir.path().join("prometheus");
    std::fs::create_dir_all(pdir.join("rules")).unwrap();
    let deploy = repo().join("deploy/prometheus");
    let mut config = std::fs::read_to_string(deploy.join("prometheus.yml")).unwrap();
    config = replace_once(&config, "scrape_interval: 15s", "scrape_interval: 1s");
    config = replace_once(
        &config,
        "evaluation_interval: 15s",
        "evaluation_interval: 1s",
    );
    config = replace_once(
        &config,
        "\"127.0.0.1:9470\"",
        &format!("\"{}\"", collector.http),
    );
    config = replace_once(
        &config,
        "\"127.0.0.1:9401\"",
        &format!("\"{stranded_http}\""),
    );
    std::fs::write(pdir.join("prometheus.yml"), config).unwrap();
    let rules = std::fs::read_to_string(deploy.join("rules/capwatch.rules.yml")).unwrap();
    std::fs::write(pdir.join("rules/capwatch.rules.yml"), &rules).unwrap();
    let prom = Prometheus::start(&prometheus, &pdir);

    // A real /metrics body passes promtool's lint.
    eventually(Duration::from_secs(30), "tenant power", || {
        collector
            .metrics()
            .select("capwatch_tenant_power_watts", &[("tenant", "lab-a")])
            .first()
            .is_some_and(|(_, w)| *w > 0.0)
    });
    // The agent's too.
    let agent_http: SocketAddr = stranded_http.parse().unwrap();
    for (what, addr) in [("collector", collector.http), ("agent", agent_http)] {
        let body = http_get(addr, "/metrics");
        let mut check = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut check.stdin.take().unwrap(), body.as_bytes()).unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics ({what}): {}",
            output_text(&out)
        );
    }

    // Prometheus scrapes the collector and loaded every rule, healthy.
    prom.has_data("target up", "up{job=\"capwatch-collector\"} == 1");
    prom.has_data("agent target up", "up{job=\"capwatch-agent\"} == 1");
    let (_, body) = http_get_status(prom.addr, "/api/v1/rules");
    let loaded: Value = serde_json::from_str(&body).unwrap();
    let loaded: Vec<&Value> = loaded["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), rule_count(&rules), "rules loaded");

    // Drive the failure alerts: a rejected sample once Prometheus holds
    // the counter at 0, and a broken tenant file on SIGHUP.
    prom.has_data(
        "rejected counter scraped",
        "capwatch_collector_samples_total{outcome=\"rejected\"}",
    );
    send_rejected_sample(&ep);
    std::fs::write(dir.path().join("tenants.toml"), "[[tenant]]\nid = 'x'\n").unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &collector.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    gone.finish(Duration::from_secs(30));

    // Meter-minutes are allocated only once final (past the watermark, a
    // quarter-hour and more): the promtool unit tests drive these.
    let not_driven_records = ["meter:capwatch_energy_ratio:1h"];
    for (name, _) in rule_exprs(&rules, "- record: ") {
        if not_driven_records.contains(&name.as_str()) {
            continue;
        }
        prom.has_data("recording rule", &name);
    }
    // The alert expressions (their `for:` is minutes; the expressions are
    // what the alerts hold to).
    let alerts = rule_exprs(&rules, "- alert: ");
    let not_driven = [
        "CapwatchLedgerCommitsFailing",
        "CapwatchLedgerUnreachable",
        "CapwatchStreamsShed",
        "CapwatchNodesFenced",
        "CapwatchLedgerChanged",
        "CapwatchCollectorDown",
        "CapwatchNoCollectorReady",
        "CapwatchMeterDrift",
        // A mock source never hangs: the agent tests hang the stand-in
        // NVML, and the promtool tests make it fire.
        "CapwatchAgentGpuReadsStalled",
        // The mock's XID 13 is an application XID the alert leaves out:
        // the NVML end-to-end test injects one through the stand-in, and
        // the promtool tests make it fire.
        "CapwatchGpuXidErrors",
        // Compactions that fail, and refusals (this collector has no
        // tokens to refuse with): the promtool unit tests drive these.
        "CapwatchLedgerCompactionsFailing",
        "CapwatchStreamsRefused",
        "CapwatchAuthRefused",
        // A watermark an hour behind.
        "CapwatchLedgerNotFinalizing",
        // A meter allocated hours behind (this collector has no meter).
        "CapwatchMeterAllocationBehind",
        // A mock agent has no MIG layout to refuse: the promtool tests
        // make it fire.
        "CapwatchMigLayoutRefused",
        // Mock GPUs never fail a row remap nor sit at their power cap:
        // the promtool tests make these fire.
        "CapwatchGpuRowRemapFailed",
        "CapwatchGpuRowRemapPending",
        "CapwatchGpuPowerCapped",
        // Mock NVLinks only replay, which the alert leaves out: the
        // promtool tests make it fire.
        "CapwatchGpuNvLinkErrors",
        // No agent here keeps its spool on disk (the agent's tests fail
        // one): the promtool tests make it fire.
        "CapwatchAgentSpoolDiskLost",
    ];
    for (name, expr) in &alerts {
        if not_driven.contains(&name.as_str()) {
            continue;
        }
        let got = prom.has_data(name, expr);
        if name == "CapwatchTenantOverContract" {
            assert!(
                got.iter().all(|s| s["metric"]["tenant"] == "lab-a"),
                "{got:?}"
            );
        }
    }
    // An alert whose expression holds is pending while its `for:` runs.
    prom.has_data(
        "alert pending",
        "ALERTS{alertname=\"CapwatchTenantOverContract\", alertstate=\"pending\", tenant=\"lab-a\"}",
    );
    // One ledger here: its identity is scraped, and the rule that watches
    // it for a change evaluates (to nothing).
    prom.has_data(
        "ledger identity scraped",
        "count by (job) (capwatch_ledger_info) == 1",
    );
    // Ledger commits cannot be made to fail here: its series is scraped
    // (at 0) and the rule evaluates healthily.
    prom.has_data(
        "ledger commit failures scraped",
        "capwatch_collector_ledger_commits_total{result=\"failure\"} == 0",
    );
    // Nor fenced: one collector holds every node it is sent.
    prom.has_data(
        "fenced nodes scraped",
        "capwatch_collector_nodes_fenced_total == 0",
    );

    for (title, expr) in dashboard_queries() {
        // Driven by meter-minutes, like its recording rule.
        if title == "Meter drift" && expr.contains("meter:capwatch_energy_ratio:1h") {
            continue;
        }
        prom.has_data(&format!("panel {title:?}"), &expr);
    }
    counting.store(false, std::sync::atomic::Ordering::Relaxed);
    ticker.join().unwrap();

    let (_, body) = http_get_status(prom.addr, "/api/v1/rules");
    let v: Value = serde_json::from_str(&body).unwrap();
    for g in v["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(r["health"], "ok", "{r}");
        }
    }

    // The collector stops: it is down, and no collector is ready.
    collector.stop();
    for name in ["CapwatchCollectorDown", "CapwatchNoCollectorReady"] {
        let (_, expr) = alerts.iter().find(|(n, _)| n == name).unwrap();
        prom.has_data(name, expr);
    }
}

/// The ledger backup's service and timer verify (the service with both
/// its ExecStart lines naming this build's binary), and the service,
/// which needs no network, is as hardened as the collector.
#[test]
fn systemd_backup_units_verify_and_are_hardened() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let units = repo().join("deploy/systemd");
    let service = std::fs::read_to_string(units.join("capwatch-ledger-backup.service")).unwrap();
    let ours = format!("ExecStart={} ", bin("capwatch-collector").display());
    assert_eq!(
        service
            .matches("ExecStart=/usr/local/bin/capwatch-collector ")
            .count(),
        2
    );
    let service = service.replace("ExecStart=/usr/local/bin/capwatch-collector ", &ours);
    for want in [
        "User=capwatch",
        "Type=oneshot",
        "backup --to /var/backups/capwatch --keep",
        "capwatch-collector verify\n",
        "PrivateNetwork=yes",
        "ProtectSystem=strict",
    ] {
        assert!(service.contains(want), "the backup service lacks {want}");
    }
    let copy = dir.path().join("capwatch-ledger-backup.service");
    std::fs::write(&copy, service).unwrap();
    let timer = dir.path().join("capwatch-ledger-backup.timer");
    std::fs::copy(units.join("capwatch-ledger-backup.timer"), &timer).unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .args([&copy, &timer])
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    run_ok(
        Command::new(&analyze)
            .args(["security", "--offline=true", "--threshold=30", "--no-pager"])
            .arg(&copy),
    );
}
