//! Failover against real processes: the agent binary streaming to two real
//! collector binaries, each with its own SQLite ledger. One collector is
//! killed (SIGKILL) mid-stream and started again on the same ledger; the
//! agent moves to the other and back, and the two ledgers together hold
//! every sample once, with the energy of the mock's ground truth to the
//! millijoule.
//!
//! The collector is another package: `cargo test --workspace` builds its
//! binary.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capwatch_agent::source::GpuSource;
use capwatch_agent::source::mock::{MockConfig, MockSource, Model, Profile};
use capwatch_testkit::*;

const AGENT: &str = env!("CARGO_BIN_EXE_capwatch-agent");
const SEED: u64 = 42;
const INTERVAL_MS: u64 = 100;
const GPUS: u64 = 8;
const TENANTS: &str = "[[tenant]]\nid = \"lab-f\"\ncontracted_kw = 10\nnodes = [\"f-*\"]\n";

/// The collector binary. It is another package, so it is found next to
/// this test's own target directory; `cargo test --workspace` builds it.
fn collector_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let p = dir.join("capwatch-collector");
    assert!(
        p.exists(),
        "{} not built; run the suite with `cargo test --workspace`",
        p.display()
    );
    p
}

struct Collector {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    dir: PathBuf,
}

impl Collector {
    /// A collector on `dir/ledger.db` (created on first use) listening for
    /// agents on `grpc_port` (0: any free one).
    fn start(dir: &Path, grpc_port: u16, name: &str) -> Self {
        Self::start_with(dir, grpc_port, name, &[])
    }

    fn start_with(dir: &Path, grpc_port: u16, name: &str, extra: &[&str]) -> Self {
        let ledger = dir.join("ledger.db");
        if !ledger.exists() {
            let out = Command::new(collector_bin())
                .arg("--ledger")
                .arg(&ledger)
                .arg("init-ledger")
                .output()
                .unwrap();
            assert!(out.status.success(), "init-ledger: {out:?}");
        }
        let tenants = dir.join("tenants.toml");
        std::fs::write(&tenants, TENANTS).unwrap();
        let mut child = clean_command(collector_bin())
            .args(["--log-format", "json", "--http-listen", "127.0.0.1:0"])
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--tenants")
            .arg(&tenants)
            .arg("--ledger")
            .arg(&ledger)
            .args(["--stale-after", "5m"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start collector");
        let log = Log::default();
        log.capture(child.stderr.take().unwrap(), format!("collector {name}"));
        let line = log.wait_for("collector listening", Duration::from_secs(30));
        Self {
            child,
            grpc: json_field(&line, "grpc").unwrap().parse().unwrap(),
            http: json_field(&line, "http").unwrap().parse().unwrap(),
            dir: dir.to_path_buf(),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and a clean exit: everything acked is in the ledger.
    fn stop(mut self) -> PathBuf {
        terminate(&self.child);
        let status = wait_timeout(&mut self.child, Duration::from_secs(20));
        assert!(status.success(), "collector exit: {status}");
        self.dir.clone()
    }

    /// The tenant's (energy mJ, GPU readings) in the ledger, over the hours
    /// around now, from the usage API.
    fn usage(&self) -> (u64, u64) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let hour = now.as_secs() / 3600 * 3600;
        let at = |s: u64| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s));
        let path = format!(
            "/v1/tenants/lab-f/usage?from={}&to={}&step=1h",
            at(hour - 3600),
            at(hour + 7200)
        );
        let body = http_get(self.http, &path);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rows = v["rows"].as_array().unwrap_or_else(|| panic!("{body}"));
        let energy = rows
            .iter()
            .map(|r| {
                r["energy_millijoules"]
                    .as_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum();
        let readings = rows.iter().map(|r| r["readings"].as_u64().unwrap()).sum();
        (energy, readings)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(" 200 "), "{path}: {head}\n{body}");
    body.to_string()
}

struct Agent {
    child: Child,
    log: Log,
}

impl Agent {
    /// A mock agent for `node` sending `samples` samples to `collectors`,
    /// most preferred first.
    fn start(dir: &Path, node: &str, collectors: &[String], samples: u64, extra: &str) -> Self {
        Self::start_env(dir, node, collectors, samples, extra, &[])
    }

    fn start_env(
        dir: &Path,
        node: &str,
        collectors: &[String],
        samples: u64,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let cfg = dir.join(format!("agent-{node}.toml"));
        let text = format!(
            "reconnect_initial = \"50ms\"\nreconnect_max = \"300ms\"\ndrain_timeout = \"30s\"\n{extra}"
        );
        std::fs::write(&cfg, text).unwrap();
        let mut child = clean_command(AGENT)
            .arg("--config")
            .arg(&cfg)
            .args([
                "--source",
                "mock",
                "--log-format",
                "json",
                "--node-id",
                node,
            ])
            .args(["--collectors", &collectors.join(",")])
            .args(["--collector-order", "listed"])
            .args(["--interval", &format!("{INTERVAL_MS}ms")])
            .args(["--mock-seed", &SEED.to_string(), "--mock-profile", "mixed"])
            .args(["--max-samples", &samples.to_string()])
            .env("RUST_LOG", "info,capwatch_agent::stream=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent");
        let log = Log::default();
        log.capture(child.stderr.take().unwrap(), format!("agent {node}"));
        Self { child, log }
    }

    fn finish(mut self, limit: Duration) -> Log {
        let status = wait_timeout(&mut self.child, limit);
        assert!(status.success(), "agent exit: {status}");
        self.log.clone()
    }

    /// The highest seq `collector` acked so far (0: none).
    fn acked_by(&self, collector: &str) -> u64 {
        acked_by(&self.log.lines(), collector)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn acked_by(lines: &[String], collector: &str) -> u64 {
    lines
        .iter()
        .filter(|l| {
            l.contains("\"message\":\"ack\"")
                && json_field(l, "collector").as_deref() == Some(collector)
        })
        .map(|l| json_number(l, "acked_seq"))
        .max()
        .unwrap_or(0)
}

/// Each mock GPU's energy counter (mJ) at every tick (1-based), as the
/// agent with these settings reports them.
fn counters(node: &str, samples: u64) -> Vec<Vec<u64>> {
    let mut m = MockSource::new(MockConfig {
        node_id: node.to_string(),
        gpus: GPUS as u32,
        profile: Profile::Mixed,
        model: Model::H100,
        seed: SEED,
        energy_counter: true,
        counter_file: None,
        nvlink: true,
    });
    let step = (INTERVAL_MS * 1_000_000) as i64;
    (1..=samples as i64)
        .map(|k| {
            m.sample(1_700_000_000_000_000_000 + k * step)
                .into_iter()
                .map(|r| r.energy_millijoules.unwrap())
                .collect()
        })
        .collect()
}

/// The node's energy from tick `from` to tick `to`, over every GPU.
fn energy(ticks: &[Vec<u64>], from: u64, to: u64) -> u64 {
    let (a, b) = (&ticks[from as usize - 1], &ticks[to as usize - 1]);
    a.iter().zip(b).map(|(x, y)| y - x).sum()
}

fn switched_to(lines: &[String], to: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("switched collector") && json_field(l, "to").as_deref() == Some(to))
        .count()
}

/// Invariant: with collectors [A, B], killing A moves the agent to B, and
/// A started again on its ledger gets it back after `failback_after`;
/// nothing is lost and nothing acked is sent twice. With a ledger each,
/// A books the counter from its first sample to its last (its own cursor
/// carries over B's stretch), B the counter over the samples it accepted,
/// and the readings of both add up to every sample once, plus those A
/// committed but could not ack before it died (the agent rightly re-sent
/// them; collectors on one shared ledger would count them once).
#[test]
fn the_agent_fails_over_to_the_other_collector_and_back_without_losing_a_sample() {
    const N: u64 = 160;
    const NODE: &str = "f-1";
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = Collector::start(dir_a.path(), 0, "A");
    let b = Collector::start(dir_b.path(), 0, "B");
    let (ep_a, ep_b) = (a.endpoint(), b.endpoint());
    let port_a = a.grpc.port();
    let agent = Agent::start(
        dir_a.path(),
        NODE,
        &[ep_a.clone(), ep_b.clone()],
        N,
        "failback_after = \"1s\"\n",
    );

    eventually(Duration::from_secs(20), "acks from A", || {
        agent.acked_by(&ep_a) >= 20
    });
    // Not a wait for anything: the kill lands half a commit interval after
    // an ack, with samples sent and not yet acked, which must reach B.
    std::thread::sleep(Duration::from_millis(500));
    a.kill();
    eventually(Duration::from_secs(20), "a move to B", || {
        switched_to(&agent.log.lines(), &ep_b) == 1
    });
    eventually(Duration::from_secs(20), "acks from B", || {
        agent.acked_by(&ep_b) >= agent.acked_by(&ep_a) + 10
    });
    let a = Collector::start(dir_a.path(), port_a, "A again");
    let log = agent.finish(Duration::from_secs(90));
    let lines = log.lines();
    log.wait_for("\"undelivered\":0", Duration::from_secs(5));
    assert_eq!(switched_to(&lines, &ep_a), 1, "back to A once");
    let stopped = lines.iter().find(|l| l.contains("agent stopped")).unwrap();
    assert_eq!(json_number(stopped, "collector_switches"), 2, "{stopped}");

    // What the agent saw: A acked up to `k` before it died, B from k+1 to
    // `m`; A, back on its ledger, welcomed the node at `k2` (what it had
    // committed, at least k) and took the rest.
    let (seen_a, seen_b) = (&ep_a, &ep_b);
    let switch_b = lines
        .iter()
        .position(|l| {
            l.contains("switched collector")
                && json_field(l, "to").as_deref() == Some(seen_b.as_str())
        })
        .unwrap();
    let k = acked_by(&lines[..switch_b], seen_a);
    let m = acked_by(&lines, seen_b);
    let welcomes_a: Vec<u64> = lines
        .iter()
        .filter(|l| {
            l.contains("\"message\":\"connected\"")
                && json_field(l, "collector").as_deref() == Some(seen_a.as_str())
        })
        .map(|l| json_number(l, "acked_seq"))
        .collect();
    assert_eq!(
        welcomes_a.len(),
        2,
        "A welcomed the node twice: {welcomes_a:?}"
    );
    let k2 = welcomes_a[1];
    assert!(k >= 20 && k2 >= k && m > k2 && m < N, "k={k} k2={k2} m={m}");

    let ticks = counters(NODE, N);
    let (energy_a, readings_a) = a.usage();
    let (energy_b, readings_b) = b.usage();
    // B never got a sample A had acked, nor lost one in between.
    assert_eq!(readings_b, GPUS * (m - k), "B: seqs {}..={m}", k + 1);
    assert_eq!(energy_b, energy(&ticks, k + 1, m), "B's energy");
    // A: everything up to what it committed, and everything after B.
    assert_eq!(readings_a, GPUS * (k2 + N - m), "A");
    assert_eq!(energy_a, energy(&ticks, 1, N), "A's energy");
    // Together: every sample once, and again only the few A committed
    // without acking before it was killed.
    assert_eq!(readings_a + readings_b, GPUS * (N + k2 - k));
    a.stop();
    b.stop();
}

/// Invariant: with the first endpoint down from the start, the agent
/// streams to the second (given by host name) and delivers every sample
/// there.
#[test]
fn the_agent_streams_to_the_second_collector_when_the_first_is_down() {
    const N: u64 = 30;
    const NODE: &str = "f-2";
    // A port nothing listens on: bound, then let go.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let dir = tempfile::tempdir().unwrap();
    let b = Collector::start(dir.path(), 0, "B");
    // The second by name: resolved, and dialled at its address.
    let by_name = format!("http://localhost:{}", b.grpc.port());
    let agent = Agent::start(dir.path(), NODE, &[dead.clone(), by_name.clone()], N, "");
    let log = agent.finish(Duration::from_secs(60));
    log.wait_for("\"undelivered\":0", Duration::from_secs(5));
    let lines = log.lines();
    assert!(
        lines.iter().any(|l| l.contains("trying the next one")
            && json_field(l, "collector").as_deref() == Some(dead.as_str())),
        "the first endpoint was tried first"
    );
    assert!(
        lines.iter().any(|l| l.contains("\"message\":\"connected\"")
            && json_field(l, "collector").as_deref() == Some(by_name.as_str())),
        "streamed to {by_name}"
    );
    let (energy_b, readings_b) = b.usage();
    assert_eq!(readings_b, GPUS * N);
    assert_eq!(energy_b, energy(&counters(NODE, N), 1, N));
    b.stop();
}

/// Invariant: a collector that refuses the agent itself (here: its token
/// may not report this node, PERMISSION_DENIED) is logged and passed over
/// for the next endpoint, which gets every sample.
#[test]
fn a_collector_that_refuses_the_agent_is_passed_over() {
    use std::os::unix::fs::PermissionsExt;
    const N: u64 = 20;
    const NODE: &str = "f-3";
    const TOKEN: &str = "failover-test-agent-token-0001";
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let auth = dir_a.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!("[[agent]]\nname = \"others\"\ntoken = \"{TOKEN}\"\nnodes = [\"other-*\"]\n"),
    )
    .unwrap();
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
    let a = Collector::start_with(
        dir_a.path(),
        0,
        "A",
        &["--auth-file", auth.to_str().unwrap()],
    );
    let b = Collector::start(dir_b.path(), 0, "B");
    let (ep_a, ep_b) = (a.endpoint(), b.endpoint());
    let agent = Agent::start_env(
        dir_b.path(),
        NODE,
        &[ep_a.clone(), ep_b.clone()],
        N,
        "",
        &[("CAPWATCH_TOKEN", TOKEN)],
    );
    let log = agent.finish(Duration::from_secs(60));
    log.wait_for("\"undelivered\":0", Duration::from_secs(5));
    let refusal = log.wait_for("trying the next one", Duration::from_secs(1));
    assert_eq!(
        json_field(&refusal, "collector").as_deref(),
        Some(ep_a.as_str())
    );
    assert!(
        refusal.contains("PermissionDenied") || refusal.contains("permission"),
        "{refusal}"
    );
    let (energy_b, readings_b) = b.usage();
    assert_eq!(readings_b, GPUS * N);
    assert_eq!(energy_b, energy(&counters(NODE, N), 1, N));
    assert_eq!(a.usage(), (0, 0), "A booked nothing");
    a.stop();
    b.stop();
}

/// The value of the unlabelled series `name` in a `/metrics` scrape.
fn gauge(addr: SocketAddr, name: &str) -> f64 {
    let text = http_get(addr, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Invariant: the fleet simulator takes the list too, and each simulated
/// node streams to the collector its own node id ranks first.
#[test]
fn fleet_nodes_spread_over_the_collectors_by_their_own_node_ids() {
    use capwatch_agent::config::CollectorOrder;
    const NODES: usize = 24;
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = Collector::start(dir_a.path(), 0, "A");
    let b = Collector::start(dir_b.path(), 0, "B");
    let eps = [a.endpoint(), b.endpoint()];
    let out = clean_command(env!("CARGO_BIN_EXE_capwatch-fleet"))
        .args(["--collectors", &eps.join(",")])
        .args(["--nodes", &NODES.to_string(), "--gpus", "2"])
        .args(["--interval", "100ms", "--duration", "2s"])
        .args(["--node-prefix", "f-fleet-", "--log-format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet exit: {}", out.status);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let done = stdout
        .lines()
        .find(|l| l.contains("\"event\":\"done\""))
        .unwrap_or_else(|| panic!("no summary in {stdout}"));
    assert_eq!(json_number(done, "undelivered"), 0, "{done}");
    assert_eq!(json_number(done, "collector_switches"), 0, "{done}");
    let to_a = (0..NODES)
        .filter(|i| {
            let order = capwatch_agent::failover::preference(
                &format!("f-fleet-{i:05}"),
                &eps,
                CollectorOrder::Hashed,
            );
            order[0] == 0
        })
        .count();
    assert!(to_a > 0 && to_a < NODES, "both get nodes: {to_a}");
    assert_eq!(gauge(a.http, "capwatch_collector_nodes"), to_a as f64);
    assert_eq!(
        gauge(b.http, "capwatch_collector_nodes"),
        (NODES - to_a) as f64
    );
    a.stop();
    b.stop();
}
