//! The disk spool against real processes: the agent binary with a spool
//! directory, a real collector binary over gRPC on TCP, real files. The
//! collector is killed, the agent is killed (SIGKILL) and started again
//! twice while the collector is away, then the collector comes back: every
//! sample of the whole period reaches the ledger once, with the energy of
//! the mock's ground truth to the millijoule.
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
const SEED: u64 = 11;
const GPUS: u64 = 8;
const TENANTS: &str = "[[tenant]]\nid = \"lab-s\"\ncontracted_kw = 10\nnodes = [\"s-*\"]\n";

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
}

impl Collector {
    /// A collector on `dir/ledger.db` listening for agents on `grpc_port`
    /// (0: any free one).
    fn start(dir: &Path, grpc_port: u16) -> Self {
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
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start collector");
        let log = Log::default();
        log.capture(child.stderr.take().unwrap(), "collector".into());
        let line = log.wait_for("collector listening", Duration::from_secs(30));
        Self {
            child,
            grpc: json_field(&line, "grpc").unwrap().parse().unwrap(),
            http: json_field(&line, "http").unwrap().parse().unwrap(),
        }
    }

    /// The tenant's (energy mJ, GPU readings) in the ledger over the hours
    /// around now, from the usage API.
    fn usage(&self) -> (u64, u64) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let hour = now.as_secs() / 3600 * 3600;
        let at = |s: u64| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s));
        let path = format!(
            "/v1/tenants/lab-s/usage?from={}&to={}&step=1h",
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

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
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
    /// The mock agent `node` with its spool in `dir/spool` and its GPUs'
    /// counters in `dir/counters`, streaming to `collector`, stopping
    /// after `samples` samples.
    fn start(dir: &Path, node: &str, collector: &str, samples: u64, run: u32) -> Self {
        let cfg = dir.join("agent.toml");
        let text = format!(
            "reconnect_initial = \"50ms\"\nreconnect_max = \"200ms\"\ndrain_timeout = \"60s\"\n\
             spool_dir = {:?}\n[mock]\ncounter_file = {:?}\n",
            dir.join("spool"),
            dir.join("counters"),
        );
        std::fs::write(&cfg, text).unwrap();
        let mut child = clean_command(AGENT)
            .arg("--config")
            .arg(&cfg)
            .args(["--source", "mock", "--log-format", "json"])
            .args(["--node-id", node, "--collector", collector])
            .args(["--interval", "100ms"])
            .args(["--mock-seed", &SEED.to_string(), "--mock-profile", "mixed"])
            .args(["--max-samples", &samples.to_string()])
            .env("RUST_LOG", "info,capwatch_agent::stream=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent");
        let log = Log::default();
        log.capture(child.stderr.take().unwrap(), format!("agent run {run}"));
        Self { child, log }
    }

    /// The spool's opening line: epoch, last_seq, samples restored.
    fn opened(&self) -> String {
        self.log
            .wait_for("spool on disk opened", Duration::from_secs(20))
    }

    fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes of the spool's segment files.
fn spool_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("spool"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "spool"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Waits until the spool has grown by `by` bytes past `from`: the agent
/// is sampling and spooling.
fn spool_grows(dir: &Path, from: u64, by: u64) {
    eventually(Duration::from_secs(30), "the spool growing", || {
        spool_bytes(dir) >= from + by
    });
}

/// The mock's counters (mJ) by UUID: as a run of this node starts without
/// a counter file, and as `file` holds them.
fn first_counters(node: &str) -> Vec<(String, u64)> {
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
    let uuids: Vec<String> = m.inventory().iter().map(|g| g.uuid.clone()).collect();
    let first = m.sample(1_700_000_000_000_000_000);
    uuids
        .into_iter()
        .zip(first)
        .map(|(u, r)| (u, r.energy_millijoules.unwrap()))
        .collect()
}

fn saved_counters(file: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            let (u, c) = l.split_once(' ').unwrap();
            (u.to_string(), c.parse().unwrap())
        })
        .collect()
}

/// Invariant: with a disk spool, no sample is lost or counted twice
/// through a collector outage during which the agent is SIGKILLed and
/// restarted twice: every run keeps the first run's epoch and numbers on
/// from the samples it found, the ledger holds every sequence number of
/// the whole period once (GPUS readings each), and its energy equals the
/// mock counters' rise from the first sample to the last, to the
/// millijoule.
#[test]
fn unacked_samples_survive_agent_kills_during_a_collector_outage() {
    const NODE: &str = "s-1";
    const LAST_RUN: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), 0);
    let port = collector.grpc.port();
    let endpoint = format!("http://{}", collector.grpc);

    // Run 1: streams, gets acks, then loses the collector and spools on.
    let run1 = Agent::start(dir.path(), NODE, &endpoint, 1_000_000, 1);
    let opened1 = run1.opened();
    assert!(opened1.contains("\"resumed\":false"), "{opened1}");
    let epoch = json_number(&opened1, "epoch");
    eventually(Duration::from_secs(30), "acks", || {
        run1.log
            .lines()
            .iter()
            .any(|l| l.contains("\"message\":\"ack\"") && json_number(l, "acked_seq") >= 10)
    });
    collector.kill();
    run1.log
        .wait_for("stream to collector failed", Duration::from_secs(20));
    // About 25 samples of the mock's GPUs with their health readings and
    // NVLinks (some 4 KiB each).
    spool_grows(dir.path(), spool_bytes(dir.path()), 110 << 10);
    run1.sigkill();

    // Run 2: finds the spool, keeps its epoch, samples on, is killed too.
    let run2 = Agent::start(dir.path(), NODE, &endpoint, 1_000_000, 2);
    let opened2 = run2.opened();
    assert!(opened2.contains("\"resumed\":true"), "{opened2}");
    assert_eq!(json_number(&opened2, "epoch"), epoch, "{opened2}");
    let restored2 = json_number(&opened2, "samples");
    assert!(restored2 > 20, "{opened2}");
    spool_grows(dir.path(), json_number(&opened2, "disk_bytes"), 110 << 10);
    run2.sigkill();

    // Run 3: finds more, and delivers everything once the collector is
    // back on its address.
    let run3 = Agent::start(dir.path(), NODE, &endpoint, LAST_RUN, 3);
    let opened3 = run3.opened();
    assert_eq!(json_number(&opened3, "epoch"), epoch, "{opened3}");
    let last_seq3 = json_number(&opened3, "last_seq");
    assert!(
        json_number(&opened3, "samples") > restored2,
        "{opened3} after {opened2}"
    );
    let collector = Collector::start(dir.path(), port);
    let mut run3 = run3;
    let status = wait_timeout(&mut run3.child, Duration::from_secs(90));
    assert!(status.success(), "agent exit: {status}");
    let stopped = run3.log.wait_for("agent stopped", Duration::from_secs(5));
    assert_eq!(json_number(&stopped, "undelivered"), 0, "{stopped}");
    assert_eq!(json_number(&stopped, "rejected"), 0, "{stopped}");
    assert_eq!(json_number(&stopped, "dropped"), 0, "{stopped}");
    assert_eq!(json_number(&stopped, "abandoned"), 0, "{stopped}");

    // Every sequence number 1..=last once: the runs numbered on from one
    // another without a gap or a reuse, and the ledger took each once.
    let last = last_seq3 + LAST_RUN;
    let (energy, readings) = collector.usage();
    assert_eq!(readings, GPUS * last, "readings of seqs 1..={last}");
    let first = first_counters(NODE);
    let end = saved_counters(&dir.path().join("counters"));
    let truth: u64 = first
        .iter()
        .map(|(uuid, a)| {
            let b = end.iter().find(|(u, _)| u == uuid).unwrap().1;
            b - a
        })
        .sum();
    assert!(truth > 0);
    assert_eq!(energy, truth, "ledger energy vs the mock's counters");
    // Nothing acked is found again: the spool on disk is empty, and the
    // next sample would be numbered on in the same epoch.
    let disk = capwatch_agent::spool::DiskConfig {
        dir: dir.path().join("spool"),
        max_bytes: 64 << 20,
        fsync_interval: Duration::ZERO,
        lock_wait: Duration::ZERO,
        stall_after: capwatch_agent::spool::disk::STALL_AFTER,
    };
    let mut spool = capwatch_agent::spool::Spool::open(10, 1, Some(&disk), NODE).unwrap();
    assert!(spool.is_empty());
    assert_eq!(spool.epoch(), epoch);
    spool.push(Default::default());
    assert!(
        spool.wait_idle(Duration::from_secs(60)),
        "the spool's writer"
    );
    let next: Vec<u64> = spool
        .after(0, 10, usize::MAX)
        .iter()
        .map(|s| s.seq)
        .collect();
    assert_eq!(next, vec![last + 1]);
}

/// Invariant: under an fsync interval nothing is sendable until the sync
/// asked for at stop; once the disk has done it, the stream is woken and
/// delivers every sample before the drain deadline, without a new sample
/// or an ack to wake it.
#[test]
fn samples_made_sendable_by_the_last_sync_are_delivered_at_stop() {
    const NODE: &str = "s-2";
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), 0);
    let endpoint = format!("http://{}", collector.grpc);
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "drain_timeout = \"30s\"\nspool_fsync_interval = \"60s\"\nspool_dir = {:?}\n",
            dir.path().join("spool")
        ),
    )
    .unwrap();
    let mut child = clean_command(AGENT)
        .arg("--config")
        .arg(&cfg)
        .args(["--source", "mock", "--log-format", "json"])
        .args(["--node-id", NODE, "--collector", &endpoint])
        .args(["--interval", "100ms", "--max-samples", "5"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::default();
    log.capture(child.stderr.take().unwrap(), "agent".into());
    let started = std::time::Instant::now();
    let status = wait_timeout(&mut child, Duration::from_secs(90));
    assert!(status.success(), "{status}");
    let stopped = log.wait_for("agent stopped", Duration::from_secs(5));
    assert_eq!(json_number(&stopped, "undelivered"), 0, "{stopped}");
    // Well before the 30 s drain deadline it would otherwise wait out.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
}
