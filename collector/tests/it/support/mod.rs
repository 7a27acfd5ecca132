//! Helpers for tests that run the real binaries: start a collector and
//! agents as processes on loopback, scrape `/metrics`, recompute what the
//! mock agents reported.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use capwatch_testkit::proxy::Proxy;
pub use capwatch_testkit::{Log, eventually, json_field, json_number, terminate, wait_timeout};

use capwatch_agent::source::GpuSource;
use capwatch_agent::source::mock::{MockConfig, MockSource, Model, Profile};

pub mod raw;
pub mod router;

/// Path of a workspace binary. The agent is another package, so it is
/// found next to this test's own target directory; `cargo test --workspace`
/// builds it.
pub fn bin(name: &str) -> PathBuf {
    if name == "capwatch-collector" {
        return PathBuf::from(env!("CARGO_BIN_EXE_capwatch-collector"));
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built; run the suite with `cargo test --workspace`",
        p.display()
    );
    p
}

/// A mock counter file, `dir/counters`, that starts `truth`'s GPUs at
/// known counters (a driver that has been up a while), and the agent
/// config that reads and updates it: agents run on it carry the counters
/// on from run to run.
pub struct Counters {
    pub path: PathBuf,
    pub agent_config: String,
}

impl Counters {
    pub fn start(dir: &Path, truth: &Truth) -> Self {
        let path = dir.join("counters");
        let start: String = truth
            .uuids
            .iter()
            .enumerate()
            .map(|(i, u)| format!("{u} {}\n", 1_000_000 * (i as u64 + 1)))
            .collect();
        std::fs::write(&path, start).unwrap();
        let agent_config = format!("[mock]\ncounter_file = {:?}\n", path.display().to_string());
        Self { path, agent_config }
    }

    /// Each GPU's counter (mJ) in the file now, by UUID.
    pub fn read(&self) -> std::collections::HashMap<String, u64> {
        std::fs::read_to_string(&self.path)
            .unwrap()
            .lines()
            .map(|l| {
                let (u, c) = l.split_once(' ').unwrap();
                (u.to_string(), c.parse().unwrap())
            })
            .collect()
    }
}

pub struct Collector {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub log: Log,
}

impl Collector {
    /// Starts the collector binary with `tenants` (TOML text) on loopback;
    /// `grpc_port` 0 picks a free port. The ledger is `dir/ledger.db`,
    /// created first (`init-ledger`) where the directory has none.
    pub fn start(dir: &Path, tenants: &str, grpc_port: u16, extra: &[&str]) -> Self {
        if !dir.join("ledger.db").exists() {
            init_ledger(dir);
        }
        Self::start_on(dir, tenants, grpc_port, extra)
    }

    /// Starts the collector on whatever `dir/ledger.db` is now.
    pub fn start_on(dir: &Path, tenants: &str, grpc_port: u16, extra: &[&str]) -> Self {
        Self::spawn(Self::command(dir, tenants, grpc_port, extra))
    }

    /// Runs `cmd` (a collector logging JSON at info) and waits until it
    /// listens.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stderr(Stdio::piped()).spawn().expect("start collector");
        let log = Log::default();
        log.capture(child.stderr.take().unwrap(), "collector".into());
        let line = log.wait_for("collector listening", Duration::from_secs(20));
        let grpc = json_field(&line, "grpc").unwrap().parse().unwrap();
        let http = json_field(&line, "http").unwrap().parse().unwrap();
        Self {
            child,
            grpc,
            http,
            log,
        }
    }

    /// Starts the collector on whatever `dir/ledger.db` is now and expects
    /// it to refuse: it must exit with a failure before it listens.
    /// Returns what it wrote to stderr.
    pub fn refused(dir: &Path, tenants: &str, extra: &[&str]) -> String {
        expect_refused(Self::command(dir, tenants, 0, extra))
    }

    pub fn command(dir: &Path, tenants: &str, grpc_port: u16, extra: &[&str]) -> Command {
        let mut cmd = Self::base_command(dir, tenants, grpc_port);
        // The same directory keeps the same ledger across restarts.
        cmd.arg("--ledger").arg(dir.join("ledger.db")).args(extra);
        cmd
    }

    /// [`Collector::command`] on the PostgreSQL ledger at `url`.
    pub fn command_pg(
        dir: &Path,
        tenants: &str,
        grpc_port: u16,
        url: &str,
        extra: &[&str],
    ) -> Command {
        let mut cmd = Self::base_command(dir, tenants, grpc_port);
        cmd.args(["--ledger-url", url]).args(extra);
        cmd
    }

    /// [`Collector::command_pg`] named `collector_id` (its fencing
    /// holder is `<collector_id>/<random hex>`, new at each start).
    pub fn command_pg_as(
        dir: &Path,
        tenants: &str,
        grpc_port: u16,
        url: &str,
        collector_id: &str,
    ) -> Command {
        let mut cmd = Self::command_pg(dir, tenants, grpc_port, url, &[]);
        cmd.env("CAPWATCH_COLLECTOR_ID", collector_id);
        cmd
    }

    fn base_command(dir: &Path, tenants: &str, grpc_port: u16) -> Command {
        let tenants_file = dir.join("tenants.toml");
        std::fs::write(&tenants_file, tenants).unwrap();
        let mut cmd = Command::new(bin("capwatch-collector"));
        cmd.args(["--log-format", "json", "--http-listen", "127.0.0.1:0"])
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--tenants")
            .arg(&tenants_file)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null());
        cmd
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&http_get(self.http, "/metrics"))
    }

    /// SIGTERM, and a clean exit within the shutdown grace.
    pub fn stop(mut self) {
        terminate(&self.child);
        let status = wait_timeout(&mut self.child, Duration::from_secs(15));
        assert!(status.success(), "collector exit: {status}");
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` (a collector) and expects it to exit with a failure before
/// it listens (a collector that listens is killed and fails the test).
/// Returns what it wrote to stderr.
pub fn expect_refused(mut cmd: Command) -> String {
    let mut child = cmd.stderr(Stdio::piped()).spawn().expect("run collector");
    let log = Log::default();
    log.capture(child.stderr.take().unwrap(), "refused collector".into());
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for collector") {
            break status;
        }
        let started = log
            .lines()
            .iter()
            .any(|l| l.contains("collector listening"));
        if started || Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the collector was not refused: {:?}", log.lines());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The stderr reader may lag the exit: wait for the error itself.
    log.wait_for("Error: ", Duration::from_secs(5));
    let err = log.lines().join("\n");
    assert!(!status.success(), "exit {status}: {err}");
    err
}

/// Creates the ledger's schema in the PostgreSQL database at `url`
/// (`capwatch-collector init-ledger --ledger-url`).
pub fn init_pg_ledger(url: &str) {
    let out = Command::new(bin("capwatch-collector"))
        .args(["init-ledger", "--ledger-url", url])
        .output()
        .expect("run init-ledger");
    assert!(
        out.status.success(),
        "init-ledger: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The URL of a test PostgreSQL server's database (see
/// `capwatch_testkit::pg`), reached at `addr` instead: a [`Proxy`] in
/// front of it.
pub fn pg_url_via(addr: SocketAddr) -> String {
    use capwatch_testkit::pg::{DATABASE, USER};
    format!("postgres://{USER}@{addr}/{DATABASE}")
}

/// Creates a new ledger at `dir/ledger.db` (`capwatch-collector
/// init-ledger`) and returns its ledger id.
pub fn init_ledger(dir: &Path) -> String {
    let out = Command::new(bin("capwatch-collector"))
        .arg("--ledger")
        .arg(dir.join("ledger.db"))
        .arg("init-ledger")
        .output()
        .expect("run init-ledger");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "init-ledger: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim_end()
        .strip_suffix(')')
        .and_then(|t| t.rsplit_once("ledger_id "))
        .map(|(_, id)| id.to_string())
        .unwrap_or_else(|| panic!("init-ledger said {text:?}"))
}

/// The mock settings every test agent uses unless told otherwise.
pub const SEED: u64 = 42;
pub const INTERVAL_MS: u64 = 100;

pub struct Agent {
    pub child: Child,
    pub node: String,
    pub log: Log,
}

impl Agent {
    /// Starts a mock agent for `node` that stops after `samples` samples.
    /// `config` is extra TOML for its config file.
    pub fn start(dir: &Path, endpoint: &str, node: &str, samples: u64, config: &str) -> Self {
        Self::start_env(dir, endpoint, node, samples, config, &[])
    }

    /// [`Agent::start`] with extra environment variables (e.g. the agent's
    /// test clock offset).
    pub fn start_env(
        dir: &Path,
        endpoint: &str,
        node: &str,
        samples: u64,
        config: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn(dir, Some(endpoint), node, samples, config, env)
    }

    /// A mock agent for `node` whose collectors are those its `config`
    /// lists (`collectors = [...]`): no `--collector` flag.
    pub fn start_listed(dir: &Path, node: &str, samples: u64, config: &str) -> Self {
        Self::spawn(dir, None, node, samples, config, &[])
    }

    fn spawn(
        dir: &Path,
        endpoint: Option<&str>,
        node: &str,
        samples: u64,
        config: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let cfg = dir.join(format!("agent-{node}.toml"));
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = Command::new(bin("capwatch-agent"));
        cmd.arg("--config")
            .arg(&cfg)
            .args(["--source", "mock", "--log-format", "json"]);
        if let Some(endpoint) = endpoint {
            cmd.args(["--collector", endpoint]);
        }
        let mut child = cmd
            .args(["--node-id", node])
            .args(["--interval", &format!("{INTERVAL_MS}ms")])
            .args(["--mock-seed", &SEED.to_string(), "--mock-profile", "mixed"])
            .args(["--max-samples", &samples.to_string()])
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent");
        let log = Log::default();
        log.capture(child.stderr.take().unwrap(), format!("agent {node}"));
        Self {
            child,
            node: node.to_string(),
            log,
        }
    }

    /// Waits for the agent to deliver everything and exit 0.
    pub fn finish(mut self, limit: Duration) -> Log {
        let status = wait_timeout(&mut self.child, limit);
        assert!(status.success(), "agent {} exit: {status}", self.node);
        self.log.clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a mock agent with the test settings reported for `node`: per tick
/// (1-based), per GPU, (power mW, energy counter mJ). Ticks are evenly
/// spaced, as the agent stamps them.
pub struct Truth {
    pub uuids: Vec<String>,
    pub ticks: Vec<Vec<(u64, u64)>>,
}

impl Truth {
    pub fn of(node: &str, samples: u64) -> Self {
        let mut m = MockSource::new(MockConfig {
            node_id: node.to_string(),
            gpus: 8,
            profile: Profile::Mixed,
            model: Model::H100,
            seed: SEED,
            energy_counter: true,
            counter_file: None,
            nvlink: true,
        });
        let uuids = m.inventory().iter().map(|g| g.uuid.clone()).collect();
        let step = (INTERVAL_MS * 1_000_000) as i64;
        let ticks = (1..=samples as i64)
            .map(|k| {
                m.sample(1_700_000_000_000_000_000 + k * step)
                    .into_iter()
                    .map(|r| (r.power_milliwatts.unwrap(), r.energy_millijoules.unwrap()))
                    .collect()
            })
            .collect();
        Self { uuids, ticks }
    }

    /// Counter delta of GPU `gpu` from tick `from` to tick `to` (1-based).
    pub fn energy(&self, gpu: usize, from: u64, to: u64) -> u64 {
        self.ticks[to as usize - 1][gpu].1 - self.ticks[from as usize - 1][gpu].1
    }

    pub fn power(&self, gpu: usize, tick: u64) -> u64 {
        self.ticks[tick as usize - 1][gpu].0
    }
}

/// One scrape, as (name, labels) → value.
pub struct Metrics(pub BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut out = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once("=\"").expect("label=\"value\"");
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            out.insert(
                (name.to_string(), labels),
                value.parse().expect("sample value"),
            );
        }
        Self(out)
    }

    /// Every series of `name` whose labels include all of `want`.
    pub fn select(
        &self,
        name: &str,
        want: &[(&str, &str)],
    ) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.0
            .iter()
            .filter(|((n, l), _)| {
                n == name && want.iter().all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|((_, l), v)| (l, *v))
            .collect()
    }

    /// The single series of `name` matching `want`.
    pub fn one(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let found = self.select(name, want);
        assert_eq!(found.len(), 1, "{name}{want:?}: {found:?}");
        found[0].1
    }
}

/// Milli-units of a value exported in base units (W → mW, J → mJ).
pub fn milli(v: f64) -> u64 {
    (v * 1000.0).round() as u64
}

/// A plain HTTP/1.0 GET on loopback with extra header lines: (status,
/// head, body).
pub fn http_request(addr: SocketAddr, path: &str, headers: &[String]) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n").unwrap();
    for h in headers {
        write!(s, "{h}\r\n").unwrap();
    }
    write!(s, "\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read response");
    let (head, body) = buf.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, head.to_string(), body.to_string())
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub fn http_get_status(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, path, &[]);
    (status, body)
}

/// A GET with `Authorization: Bearer <token>` (none without a token):
/// (status, body).
pub fn http_get_token(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let headers: Vec<String> = token
        .map(|t| format!("Authorization: Bearer {t}"))
        .into_iter()
        .collect();
    let (status, _, body) = http_request(addr, path, &headers);
    (status, body)
}

/// A plain HTTP/1.0 GET on loopback that must answer 200.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read response");
    let (head, body) = buf.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// Wall-clock time now, in nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Wall-clock time now, in whole seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    now_nanos() / 1_000_000_000
}

/// An exact amount in a usage row: a JSON number or a decimal string.
pub fn amount(v: &serde_json::Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("an exact amount: {v}"))
}

/// An exact amount the usage API spells as a decimal string (as it does
/// every amount that may pass 2^53).
pub fn exact(v: &serde_json::Value) -> u64 {
    v.as_str()
        .unwrap_or_else(|| panic!("{v} is not a decimal string"))
        .parse()
        .unwrap()
}

/// The energy of usage rows, summed to the millijoule.
pub fn energy_mj(rows: &[serde_json::Value]) -> u64 {
    rows.iter().map(|r| exact(&r["energy_millijoules"])).sum()
}

/// Two tenants by node name: lab-a leases `a-*`, lab-b `b-*`, 10 kW each.
pub const TWO_LABS: &str = r#"
[[tenant]]
id = "lab-a"
contracted_kw = 10
nodes = ["a-*"]

[[tenant]]
id = "lab-b"
contracted_kw = 10
nodes = ["b-*"]
"#;

/// Writes `text` to `dir/name`, readable by its owner only (as the
/// collector wants secrets kept), and returns its path.
pub fn secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}
