//! `capwatch-agent`: parse flags, set up logging, run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use capwatch_agent::config::{CollectorOrder, Config, SourceKind};
use capwatch_agent::source::mock::{Model, Profile};
use capwatch_common::LogFormat;

/// capwatch node agent: reads GPU power, energy and utilization through
/// NVML (or a simulated node) and streams them to a capwatch collector.
///
/// Settings come from the config file, then CAPWATCH_* environment
/// variables, then flags; the last wins.
#[derive(Debug, Parser)]
#[command(name = "capwatch-agent", version)]
struct Args {
    /// TOML config file (every setting is optional).
    #[arg(short, long, env = "CAPWATCH_CONFIG")]
    config: Option<PathBuf>,
    /// Collector gRPC endpoint, e.g. http://collector:7070.
    #[arg(long, env = "CAPWATCH_COLLECTOR")]
    collector: Option<String>,
    /// Several collector endpoints to fail over between, comma-separated
    /// (instead of --collector).
    #[arg(long, env = "CAPWATCH_COLLECTORS", value_delimiter = ',')]
    collectors: Option<Vec<String>>,
    /// Order the collectors are tried in: hashed (by node id, spreading a
    /// fleet) or listed.
    #[arg(long, env = "CAPWATCH_COLLECTOR_ORDER")]
    collector_order: Option<CollectorOrder>,
    /// While on another collector, how often to try the most preferred one
    /// again, e.g. 5m (0s: never).
    #[arg(long, env = "CAPWATCH_FAILBACK_AFTER", value_parser = humantime::parse_duration)]
    failback_after: Option<Duration>,
    /// Node id reported to the collector [default: hostname].
    #[arg(long, env = "CAPWATCH_NODE_ID")]
    node_id: Option<String>,
    /// GPU backend.
    #[arg(long, env = "CAPWATCH_SOURCE")]
    source: Option<SourceKind>,
    /// Sampling interval, e.g. 1s or 250ms.
    #[arg(long, env = "CAPWATCH_INTERVAL", value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// Path of libnvidia-ml [default: libnvidia-ml.so.1 from the library path].
    #[arg(long, env = "CAPWATCH_NVML_LIBRARY")]
    nvml_library: Option<PathBuf>,
    /// Number of simulated GPUs (mock source).
    #[arg(long, env = "CAPWATCH_MOCK_GPUS")]
    mock_gpus: Option<u32>,
    /// Simulated workload (mock source).
    #[arg(long, env = "CAPWATCH_MOCK_PROFILE")]
    mock_profile: Option<Profile>,
    /// Simulated GPU model (mock source).
    #[arg(long, env = "CAPWATCH_MOCK_MODEL")]
    mock_model: Option<Model>,
    /// Seed of the simulation (mock source).
    #[arg(long, env = "CAPWATCH_MOCK_SEED")]
    mock_seed: Option<u64>,
    /// Unacknowledged samples kept for re-sending.
    #[arg(long, env = "CAPWATCH_SPOOL_CAPACITY")]
    spool_capacity: Option<usize>,
    /// Stop after this many samples, deliver them, and exit (non-zero if
    /// some could not be delivered).
    #[arg(long)]
    max_samples: Option<u64>,
    /// Log format.
    #[arg(long, env = "CAPWATCH_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// File holding the collector's agent token.
    #[arg(long, env = "CAPWATCH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print the effective configuration as TOML (a config file) and exit.
    #[arg(long)]
    print_config: bool,
}

impl Args {
    fn config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::load(self.config.as_deref(), |var| std::env::var_os(var))?;
        macro_rules! set {
            ($field:expr, $arg:expr) => {
                if let Some(v) = $arg.clone() {
                    $field = v;
                }
            };
        }
        if self.collector.is_some() {
            cfg.collector = self.collector.clone();
        }
        if let Some(list) = &self.collectors {
            cfg.collectors = Some(list.iter().map(|e| e.trim().to_string()).collect());
        }
        set!(cfg.collector_order, self.collector_order);
        set!(cfg.failback_after, self.failback_after);
        set!(cfg.node_id, self.node_id);
        set!(cfg.source, self.source);
        set!(cfg.interval, self.interval);
        set!(cfg.spool_capacity, self.spool_capacity);
        set!(cfg.log_format, self.log_format);
        set!(cfg.mock.gpus, self.mock_gpus);
        set!(cfg.mock.profile, self.mock_profile);
        set!(cfg.mock.model, self.mock_model);
        set!(cfg.mock.seed, self.mock_seed);
        if self.token_file.is_some() {
            cfg.token_file = self.token_file.clone();
        }
        if self.nvml_library.is_some() {
            cfg.nvml.library = self.nvml_library.clone();
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = args.config().context("configuration")?;
    if args.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    capwatch_common::init_logging(cfg.log_format);
    // One thread: the agent is a small periodic loop and one stream, and
    // must cost its node next to nothing.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let shutdown =
            capwatch_common::shutdown_on_signals().context("installing signal handlers")?;
        let summary = capwatch_agent::run(cfg, args.max_samples, shutdown).await?;
        // A bounded run promises delivery, so falling short is a failure;
        // a signal-driven stop has already logged what it could not send.
        if args.max_samples.is_some() && summary.undelivered > 0 {
            anyhow::bail!("{} samples could not be delivered", summary.undelivered);
        }
        Ok(())
    })
}
