//! Ledger commit throughput at fleet scale.
//!
//! Simulates a fleet of GPUs reporting once a second the way the collector
//! runs it: every node's stream applies one batch (one `NodeSample` with
//! all its GPUs) per second through `State::ingest`, and once a second the
//! committer takes `State::take_pending()` and writes it into a real
//! ledger: a SQLite file (WAL, `synchronous = FULL`, `Ledger::commit`), or
//! a PostgreSQL database (`PgLedger::commit_as`, as one collector's holder,
//! each commit with its id as the collector's are).
//! Simulated seconds run back to back, as fast as the machine allows; the
//! sample timestamps advance one second per simulated second.
//!
//! Measured per simulated second: the time `State::ingest` takes for all
//! nodes (on this one thread; the collector spreads it over its streams'
//! tasks) and the time `Ledger::commit` takes for the second's batch. The
//! first second only lays down the rows (every GPU's first reading is a
//! counter baseline, every cursor an insert); it is reported on its own
//! and left out of the figures, which describe the steady state.
//!
//! ```text
//! cargo bench -p capwatch-collector --bench ledger_commit -- --seconds 30
//! cargo bench -p capwatch-collector --bench ledger_commit -- --gpus 100000 --runs 3
//! cargo bench -p capwatch-collector --bench ledger_commit -- --postgres --gpus 200000
//! cargo bench -p capwatch-collector --bench ledger_commit -- --ledger-url postgres://u@db/bench
//! ```
//!
//! Options (flags win over the environment):
//!
//! * `--seconds N` / `LEDGER_BENCH_SECONDS`: simulated seconds (30);
//! * `--gpus N` / `LEDGER_BENCH_GPUS`: GPUs in the fleet (10000);
//! * `--gpus-per-node N` / `LEDGER_BENCH_GPUS_PER_NODE`: (8);
//! * `--runs N` / `LEDGER_BENCH_RUNS`: independent runs, each on a fresh
//!   state and ledger; with more than one, the medians are printed last (1);
//! * `--verbose`: also print every simulated second's ingest and commit
//!   times and rows written;
//! * `--gpu-rows`: keep per-GPU hours, as the collector does with
//!   `usage_gpu_rows = true` (off by default, as there);
//! * `--postgres`: a PostgreSQL cluster of the benchmark's own (`initdb` in
//!   a temporary directory, as `nobody` when run as root, on a free port,
//!   with [`PG_SETTINGS`]);
//! * `--ledger-url URL` / `LEDGER_BENCH_URL`: an existing PostgreSQL
//!   server instead (URL form; the user must be allowed to create a
//!   schema): each run writes a fresh schema `capwatch_bench_<pid>_<run>`
//!   of that database, dropped at the end of the run.
//!
//! A SQLite ledger lives in a temporary directory under `TMPDIR`: point
//! that at the disk to measure (a tmpfs makes every fsync free); so does
//! the `--postgres` cluster. With PostgreSQL the figures include the WAL
//! each commit wrote (`pg_current_wal_lsn` before and after the run).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capwatch_collector::edge::{GpuReading, HostReading, NodeSample};
use capwatch_collector::ledger::{Commit, Ledger, LedgerWriter, PgLedger, PgSettings};
use capwatch_collector::state::{GpuInfo, Hello, State, StateConfig, StreamHandle};
use capwatch_collector::tenants::Tenants;

mod support;
use support::{MODEL, POWER_LIMIT_MW, TENANTS, node_id};

const NANOS_PER_SECOND: i64 = 1_000_000_000;

/// The `--postgres` cluster's settings, after the test clusters' own
/// (which are sized for many small servers on one machine): memory for a
/// site's cursor rows and room for a minute of WAL between checkpoints,
/// durability as shipped (`fsync`, `synchronous_commit` and
/// `full_page_writes` on).
const PG_SETTINGS: &str = "shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 5min
wal_compression = on
max_connections = 60";

/// The holder the benchmark commits as (one collector's, one process
/// start).
const HOLDER: &str = "bench/00000000c0ffee00";

fn main() {
    let opts = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ledger_commit: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    // Started once, for every run (each run has a schema of its own).
    let server = opts.postgres.then(|| {
        let s = capwatch_testkit::pg::PgServer::start_with(PG_SETTINGS);
        println!(
            "postgres: a cluster of the benchmark's own on port {}",
            s.port()
        );
        s
    });
    let url = server.as_ref().map(|s| s.url()).or(opts.ledger_url.clone());
    let mut reports = Vec::with_capacity(opts.runs);
    for run in 1..=opts.runs {
        let report = run_once(&opts, url.as_deref(), run);
        report.print(run, &opts);
        reports.push(report);
    }
    if reports.len() > 1 {
        Report::print_medians(&reports);
    }
}

const USAGE: &str = "usage: ledger_commit [--seconds N] [--gpus N] [--gpus-per-node N] [--runs N] [--verbose] \
     [--gpu-rows] [--postgres | --ledger-url URL]";

#[derive(Debug, Clone)]
struct Options {
    seconds: usize,
    gpus: usize,
    gpus_per_node: usize,
    runs: usize,
    /// Print every second's figures as well.
    verbose: bool,
    /// Keep per-GPU hours, as `usage_gpu_rows = true` does.
    gpu_rows: bool,
    /// A PostgreSQL cluster of the benchmark's own.
    postgres: bool,
    /// An existing PostgreSQL server's database.
    ledger_url: Option<String>,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let env = |name: &str, default: usize| -> Result<usize, String> {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .map_err(|_| format!("{name}={v:?} is not a count")),
                Err(_) => Ok(default),
            }
        };
        let mut o = Options {
            seconds: env("LEDGER_BENCH_SECONDS", 30)?,
            gpus: env("LEDGER_BENCH_GPUS", 10_000)?,
            gpus_per_node: env("LEDGER_BENCH_GPUS_PER_NODE", 8)?,
            runs: env("LEDGER_BENCH_RUNS", 1)?,
            verbose: false,
            gpu_rows: false,
            postgres: false,
            ledger_url: std::env::var("LEDGER_BENCH_URL").ok(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            // `cargo bench` passes `--bench` to every bench binary.
            if arg == "--bench" {
                continue;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (arg, None),
            };
            if flag == "--verbose" || flag == "-v" {
                o.verbose = true;
                continue;
            }
            if flag == "--postgres" {
                o.postgres = true;
                continue;
            }
            if flag == "--gpu-rows" {
                o.gpu_rows = true;
                continue;
            }
            if flag == "--ledger-url" {
                o.ledger_url = Some(
                    inline
                        .or_else(|| args.next())
                        .ok_or("--ledger-url needs a value")?,
                );
                continue;
            }
            let field = match flag.as_str() {
                "--seconds" => &mut o.seconds,
                "--gpus" => &mut o.gpus,
                "--gpus-per-node" => &mut o.gpus_per_node,
                "--runs" => &mut o.runs,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                _ => return Err(format!("unknown argument {flag:?}")),
            };
            let value = inline
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))?;
            *field = value
                .parse()
                .map_err(|_| format!("{flag} {value:?} is not a count"))?;
        }
        if o.seconds == 0 || o.gpus == 0 || o.runs == 0 {
            return Err("--seconds, --gpus and --runs must be positive".into());
        }
        if o.postgres && o.ledger_url.is_some() {
            return Err("--postgres and --ledger-url exclude each other".into());
        }
        if !(1..=64).contains(&o.gpus_per_node) {
            return Err("--gpus-per-node must be 1-64".into());
        }
        Ok(o)
    }

    fn nodes(&self) -> usize {
        self.gpus.div_ceil(self.gpus_per_node)
    }
}

/// splitmix64: a small deterministic generator, so that every run sees the
/// same fleet and the same readings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (the modulo bias is irrelevant here).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// One simulated agent: its stream's handle and its GPUs' counters.
struct Agent {
    handle: StreamHandle,
    /// Offset of this node's sampling instant within each second, so that
    /// nodes cross minute boundaries at different moments, as real ones do.
    phase_ns: i64,
    /// Hardware energy counter of each GPU, mJ.
    counters_mj: Vec<u64>,
    seq: u64,
}

impl Agent {
    /// Announces a node of `gpus` GPUs, as its agent's Hello would.
    fn hello(state: &State, index: usize, gpus: usize, nodes: usize, rng: &mut Rng) -> Self {
        let node_id = node_id(index);
        let infos = (0..gpus)
            .map(|_| GpuInfo {
                uuid: uuid(rng),
                model: MODEL.into(),
                power_limit_milliwatts: Some(POWER_LIMIT_MW),
                memory_total_bytes: Some(80 << 30),
                energy_counter_supported: true,
                identity: Default::default(),
                mig: Default::default(),
                mig_layout: None,
                earlier_mig: Vec::new(),
            })
            .collect();
        let (handle, _acked) = state
            .hello(Hello {
                node_power_sources: Vec::new(),
                node_id,
                agent_version: "bench".into(),
                epoch: 1,
                interval: Duration::from_secs(1),
                gpus: infos,
            })
            .expect("the simulated Hello is valid");
        Agent {
            handle,
            phase_ns: (index as i64 * NANOS_PER_SECOND) / nodes as i64,
            // Counters that have been running for a while (up to ~11 days
            // at 700 W).
            counters_mj: (0..gpus).map(|_| rng.range(0, 1 << 39)).collect(),
            seq: 0,
        }
    }

    /// The node's sample for the second starting at `second_ns`: every
    /// GPU drew 500-700 J since the previous one.
    fn sample(&mut self, second_ns: i64, rng: &mut Rng) -> NodeSample {
        self.seq += 1;
        let gpus = self
            .counters_mj
            .iter_mut()
            .enumerate()
            .map(|(i, counter)| {
                let drawn_mj = rng.range(500_000, 700_000);
                *counter += drawn_mj;
                GpuReading {
                    index: i as u32,
                    // Average power over the second matches the energy.
                    power_milliwatts: Some(drawn_mj),
                    energy_millijoules: Some(*counter),
                    utilization_percent: Some(rng.range(40, 100) as u32),
                    memory_utilization_percent: Some(rng.range(10, 90) as u32),
                    memory_used_bytes: Some(rng.range(20 << 30, 80 << 30)),
                    temperature_celsius: Some(rng.range(45, 80) as i32),
                    sm_clock_mhz: Some(rng.range(1_500, 1_980) as u32),
                    power_limit_milliwatts: Some(POWER_LIMIT_MW),
                    health: None,
                    lost: false,
                    mig_layout: None,
                }
            })
            .collect();
        NodeSample {
            node_power: Vec::new(),
            seq: self.seq,
            timestamp_unix_nanos: second_ns + self.phase_ns,
            gpus,
            host: Some(HostReading {
                cpu_utilization_ratio: Some(rng.range(0, 100) as f64 / 100.0),
                memory_used_bytes: Some(rng.range(64 << 30, 512 << 30)),
                memory_total_bytes: Some(1 << 40),
            }),
        }
    }
}

/// A UUID in NVML's format (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`),
/// so that keys in the ledger have their real length.
fn uuid(rng: &mut Rng) -> String {
    let (a, b) = (rng.next(), rng.next());
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// Size of a commit, in rows upserted.
#[derive(Debug, Default, Clone, Copy)]
struct Rows {
    nodes: usize,
    gpus: usize,
    buckets: usize,
    tenants: usize,
}

impl Rows {
    fn of(c: &Commit) -> Self {
        Rows {
            nodes: c.nodes.len(),
            gpus: c.nodes.values().map(|n| n.gpus.len()).sum(),
            buckets: c.buckets.len(),
            tenants: c.tenant_energy.len(),
        }
    }

    /// Rows written: one per node (its GPUs' cursors inside), bucket and
    /// tenant.
    fn total(&self) -> usize {
        self.nodes + self.buckets + self.tenants
    }
}

/// What one run measured; the first (warm-up) second is kept apart.
struct Report {
    gpus: usize,
    /// Per measured second.
    ingest: Vec<Duration>,
    commit: Vec<Duration>,
    rows: Vec<Rows>,
    warmup_commit: Duration,
    ledger_bytes: u64,
    wal_bytes: u64,
    /// PostgreSQL: `ledger_bytes` are the cursor and minute tables,
    /// `wal_bytes` the WAL the measured seconds wrote.
    postgres: bool,
}

/// A run's ledger: a SQLite file in a temporary directory, or a fresh
/// schema of a PostgreSQL database.
enum Backend {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
        ledger: Ledger,
    },
    Pg {
        admin: PgAdmin,
        ledger: PgLedger,
    },
}

impl Backend {
    fn create(url: Option<&str>, run: usize) -> Self {
        match url {
            None => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let path = dir.path().join("ledger.db");
                let ledger = Ledger::create(&path).expect("the ledger is created");
                Backend::Sqlite {
                    _dir: dir,
                    path,
                    ledger,
                }
            }
            Some(url) => {
                let schema = format!("capwatch_bench_{}_{run}", std::process::id());
                let admin = PgAdmin::connect(url, schema);
                let ledger = PgLedger::create(&PgSettings::new(admin.ledger_url.clone()))
                    .expect("the ledger is created");
                Backend::Pg { admin, ledger }
            }
        }
    }

    /// Claims every node for the benchmark's holder, as each node's Hello
    /// does in a collector (SQLite keeps no claims).
    fn claim(&mut self, nodes: &[String]) {
        if let Backend::Pg { ledger, .. } = self {
            let ids: Vec<&str> = nodes.iter().map(String::as_str).collect();
            ledger
                .claim_nodes(HOLDER, &ids)
                .expect("the nodes are claimed");
        }
    }

    fn commit(&mut self, c: &Commit) {
        match self {
            Backend::Sqlite { ledger, .. } => {
                ledger.commit(c).expect("the ledger commit succeeds");
            }
            Backend::Pg { ledger, .. } => {
                ledger
                    .commit_as(HOLDER, c, now_unix(), i64::MIN)
                    .expect("the ledger commit succeeds");
            }
        }
    }

    /// Bytes written so far: the SQLite file and its WAL, or PostgreSQL's
    /// WAL position.
    fn bytes(&self) -> (u64, u64) {
        match self {
            Backend::Sqlite { path, .. } => {
                let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
                (size(path), size(&path.with_extension("db-wal")))
            }
            Backend::Pg { admin, .. } => (
                admin.number("SELECT pg_total_relation_size('node_claim') + pg_total_relation_size('usage_minute')"),
                admin.number("SELECT pg_current_wal_lsn() - '0/0'"),
            ),
        }
    }

    /// Cross-checks that the ledger holds exactly one sample per GPU per
    /// simulated second, so the figures measure the work they claim to.
    fn check(self, gpus: usize, seconds: usize) {
        let samples = match self {
            Backend::Sqlite { path, ledger, _dir } => {
                drop(ledger);
                let ledger = Ledger::open(&path).expect("the ledger reopens");
                let tenants = Tenants::from_toml(TENANTS).expect("the tenant file is valid");
                tenants
                    .all()
                    .iter()
                    .map(|t| {
                        ledger
                            .bucket_totals(&t.id)
                            .expect("the ledger reads back")
                            .samples
                    })
                    .sum()
            }
            Backend::Pg { admin, ledger } => {
                drop(ledger);
                let n = admin.number(
                    "SELECT (SELECT COALESCE(SUM(samples), 0) FROM usage_minute)
                          + (SELECT COALESCE(SUM(samples), 0) FROM adjustment)",
                );
                admin.drop_schema();
                n
            }
        };
        assert_eq!(
            samples,
            (gpus * seconds) as u64,
            "the ledger holds every GPU sample once"
        );
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// A connection of the benchmark's own to the PostgreSQL database: makes
/// and drops the run's schema, reads WAL positions and checks the totals.
struct PgAdmin {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    schema: String,
    /// The URL with the run's schema as its search path.
    ledger_url: String,
}

impl PgAdmin {
    fn connect(url: &str, schema: String) -> Self {
        let sep = if url.contains('?') { '&' } else { '?' };
        let ledger_url = format!("{url}{sep}options=-c%20search_path%3D{schema}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let client = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&ledger_url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connecting to the benchmark's database: {e}"));
            tokio::spawn(conn);
            client
        });
        let admin = Self {
            rt,
            client,
            schema,
            ledger_url,
        };
        admin.execute(&format!("CREATE SCHEMA {}", admin.schema));
        admin
    }

    fn execute(&self, sql: &str) {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The one number `sql` answers.
    fn number(&self, sql: &str) -> u64 {
        let row = self
            .rt
            .block_on(self.client.query_one(&format!("SELECT ({sql})::int8"), &[]))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let n: i64 = row.get(0);
        n as u64
    }

    fn drop_schema(&self) {
        self.execute(&format!("DROP SCHEMA {} CASCADE", self.schema));
    }
}

fn run_once(opts: &Options, url: Option<&str>, run: usize) -> Report {
    let mut ledger = Backend::create(url, run);
    let tenants = Tenants::from_toml(TENANTS).expect("the tenant file is valid");
    let state = State::new(
        StateConfig {
            stale_after: None,
            max_gpus_per_node: 64,
            max_clock_skew: Duration::from_secs(600),
            // Simulated seconds lie in the past, up to the run's length.
            max_sample_age: Duration::from_secs(366 * 86_400),
        },
        tenants,
    );
    state.keep_gpu_rows(opts.gpu_rows);

    let mut rng = Rng(0x00c0_ffee);
    let nodes = opts.nodes();
    let mut agents: Vec<Agent> = (0..nodes)
        .map(|i| {
            // The last node takes what is left of an uneven fleet.
            let gpus = opts.gpus_per_node.min(opts.gpus - i * opts.gpus_per_node);
            Agent::hello(&state, i, gpus, nodes, &mut rng)
        })
        .collect();
    ledger.claim(&(0..nodes).map(node_id).collect::<Vec<_>>());

    // Timestamps lie in the past, so that the whole run is behind the
    // collector's clock (samples ahead of it are refused), and start 15 s
    // before a minute boundary, so that even a short run has the second in
    // which every node's interval spans two minute buckets.
    let total_seconds = opts.seconds + 1;
    let start_s = (now_unix() - total_seconds as i64 - 120).div_euclid(60) * 60 - 15;

    let mut report = Report {
        gpus: opts.gpus,
        ingest: Vec::with_capacity(opts.seconds),
        commit: Vec::with_capacity(opts.seconds),
        rows: Vec::with_capacity(opts.seconds),
        warmup_commit: Duration::ZERO,
        ledger_bytes: 0,
        wal_bytes: 0,
        postgres: url.is_some(),
    };
    let mut wal_at_start = 0;
    for second in 0..total_seconds {
        let second_ns = (start_s + second as i64) * NANOS_PER_SECOND;
        // What the streams decoded this second (not timed: that is gRPC
        // and protobuf work, outside the state and the ledger).
        let batches: Vec<NodeSample> = agents
            .iter_mut()
            .map(|a| a.sample(second_ns, &mut rng))
            .collect();

        // Every stream applies its batch.
        let started = Instant::now();
        for (agent, sample) in agents.iter().zip(batches) {
            let out = state
                .ingest(&agent.handle, vec![sample], Vec::new())
                .expect("no stream is superseded");
            assert!(
                out.accepted == 1 && out.rejected.is_empty(),
                "sample not accepted: {out:?}"
            );
        }
        let ingest = started.elapsed();

        // The committer's tick.
        let started = Instant::now();
        let (_id, commit) = state.take_pending();
        ledger.commit(&commit);
        let elapsed = started.elapsed();

        if opts.verbose {
            let rows = Rows::of(&commit);
            println!(
                "  second {second:>4}: ingest {:>8.2} ms, commit {:>8.2} ms, {} rows ({} buckets)",
                ms(ingest),
                ms(elapsed),
                rows.total(),
                rows.buckets
            );
        }
        if second == 0 {
            report.warmup_commit = elapsed;
            wal_at_start = ledger.bytes().1;
        } else {
            report.ingest.push(ingest);
            report.commit.push(elapsed);
            report.rows.push(Rows::of(&commit));
        }
        // Freeing the commit is the committer's too, but after the ack.
        drop(commit);
    }

    // Sizes while the ledger is open: closing a SQLite ledger checkpoints
    // and removes the WAL, which a running collector never does.
    let (db, wal) = ledger.bytes();
    report.ledger_bytes = db;
    // PostgreSQL: the WAL the measured seconds wrote.
    report.wal_bytes = if report.postgres {
        wal - wal_at_start
    } else {
        wal
    };
    ledger.check(opts.gpus, total_seconds);
    report
}

/// Nearest-rank percentile of `xs` (sorted here), `q` in (0, 1].
fn percentile(xs: &[Duration], q: f64) -> Duration {
    let mut v = xs.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Report {
    fn seconds(&self) -> usize {
        self.commit.len()
    }

    /// GPU samples committed per second of commit time.
    fn commit_rate(&self) -> f64 {
        let total: Duration = self.commit.iter().sum();
        (self.gpus * self.seconds()) as f64 / total.as_secs_f64()
    }

    /// GPU samples applied per second of ingest time.
    fn ingest_rate(&self) -> f64 {
        let total: Duration = self.ingest.iter().sum();
        (self.gpus * self.seconds()) as f64 / total.as_secs_f64()
    }

    /// Commit time per simulated second, as a share of that second.
    fn headroom(&self) -> f64 {
        let total: Duration = self.commit.iter().sum();
        total.as_secs_f64() / self.seconds() as f64
    }

    fn print(&self, run: usize, opts: &Options) {
        let rows = self.rows.iter().map(Rows::total).sum::<usize>() / self.seconds();
        let largest = self
            .rows
            .iter()
            .copied()
            .max_by_key(Rows::total)
            .unwrap_or_default();
        println!(
            "run {run}: {} GPUs on {} nodes, {} s simulated (+1 s warm-up)",
            self.gpus,
            opts.nodes(),
            self.seconds()
        );
        println!(
            "  commit   {:>12.0} GPU-samples/s committed; per 1-s batch: median {:.2} ms, p99 {:.2} ms, max {:.2} ms; {rows} rows/batch (largest: {} nodes, {} GPUs, {} buckets, {} tenants)",
            self.commit_rate(),
            ms(percentile(&self.commit, 0.5)),
            ms(percentile(&self.commit, 0.99)),
            ms(percentile(&self.commit, 1.0)),
            largest.nodes,
            largest.gpus,
            largest.buckets,
            largest.tenants,
        );
        println!(
            "  ingest   {:>12.0} GPU-samples/s (one thread); per second: median {:.2} ms, p99 {:.2} ms",
            self.ingest_rate(),
            ms(percentile(&self.ingest, 0.5)),
            ms(percentile(&self.ingest, 0.99)),
        );
        println!(
            "  headroom {:>12.4} (commit time per simulated second / 1 s)",
            self.headroom()
        );
        if self.postgres {
            println!(
                "  ledger   {:>12.1} MiB of claim (cursor) and minute tables with their indexes at the end; WAL {:.2} MiB per commit; first commit (inserts) {:.2} ms",
                mib(self.ledger_bytes),
                mib(self.wal_bytes) / self.seconds() as f64,
                ms(self.warmup_commit),
            );
        } else {
            println!(
                "  ledger   {:>12.1} MiB at the end ({:.1} MiB db + {:.1} MiB wal); first commit (inserts) {:.2} ms",
                mib(self.ledger_bytes + self.wal_bytes),
                mib(self.ledger_bytes),
                mib(self.wal_bytes),
                ms(self.warmup_commit),
            );
        }
    }

    fn print_medians(reports: &[Report]) {
        let median = |f: &dyn Fn(&Report) -> f64| {
            let mut v: Vec<f64> = reports.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        };
        println!("median of {} runs:", reports.len());
        println!(
            "  commit   {:>12.0} GPU-samples/s committed; per 1-s batch: median {:.2} ms, p99 {:.2} ms",
            median(&Report::commit_rate),
            median(&|r| ms(percentile(&r.commit, 0.5))),
            median(&|r| ms(percentile(&r.commit, 0.99))),
        );
        println!(
            "  ingest   {:>12.0} GPU-samples/s (one thread)",
            median(&Report::ingest_rate)
        );
        println!("  headroom {:>12.4}", median(&Report::headroom));
        if reports[0].postgres {
            println!(
                "  ledger   {:>12.1} MiB of tables; WAL {:.2} MiB per commit",
                median(&|r| mib(r.ledger_bytes)),
                median(&|r| mib(r.wal_bytes) / r.seconds() as f64)
            );
        } else {
            println!(
                "  ledger   {:>12.1} MiB",
                median(&|r| mib(r.ledger_bytes + r.wal_bytes))
            );
        }
    }
}
