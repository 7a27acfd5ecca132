//! `capwatch-sim-meter`: a simulated site meter for the local demo. It
//! serves a cumulative energy register over real Modbus TCP (a u32 in
//! holding registers 0-1, big-endian words, one count per Wh), and the
//! energy it counts is what the mock nodes it feeds draw at the wall
//! (the mock's whole-node power: their GPUs plus CPUs, fans and PSU
//! losses) plus `--overhead-percent` for cooling and distribution, so the
//! collector's reconciliation sees a meter a little above its nodes, as a
//! real site's is.
//!
//! The nodes are simulated here, not read from anywhere: each is a mock
//! with the seed and profile its demo agent uses, sampled on the same
//! interval, so the meter follows their load without talking to them
//! (its ticks are not the agents' ticks, so minute by minute the ratio
//! wanders a little around 1 + overhead, as a real meter's does).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;

use capwatch_agent::meter_sim::{Layout, ModbusMeter};
use capwatch_agent::node_power::mock::node_milliwatts;
use capwatch_agent::source::GpuSource;
use capwatch_agent::source::mock::{MockConfig, MockSource, Model, Profile};
use capwatch_common::LogFormat;

/// capwatch simulated site meter: a Modbus TCP energy register counting
/// what simulated mock nodes draw, plus cooling and distribution.
#[derive(Debug, Parser)]
#[command(name = "capwatch-sim-meter", version)]
struct Args {
    /// Where to serve Modbus TCP.
    #[arg(long, default_value = "127.0.0.1:7502")]
    listen: SocketAddr,
    /// A node the meter feeds, as `NODE_ID:PROFILE:SEED` (the demo agent's
    /// --node-id, --mock-profile and --mock-seed); repeat for each.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// Mock GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus: u32,
    /// How often the simulated nodes are sampled.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Cooling and distribution on top of the nodes' power, percent.
    #[arg(long, default_value_t = 30)]
    overhead_percent: u64,
    /// Log format.
    #[arg(long, default_value = "plain")]
    log_format: LogFormat,
}

/// One node the meter feeds.
fn node(spec: &str, gpus: u32) -> anyhow::Result<MockSource> {
    let mut parts = spec.split(':');
    let (Some(id), Some(profile), Some(seed), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("--node {spec:?}: expected NODE_ID:PROFILE:SEED");
    };
    let profile = <Profile as clap::ValueEnum>::from_str(profile, true)
        .map_err(|e| anyhow::anyhow!("--node {spec:?}: profile: {e}"))?;
    let seed = seed
        .parse()
        .with_context(|| format!("--node {spec:?}: seed"))?;
    Ok(MockSource::new(MockConfig {
        node_id: id.to_string(),
        gpus,
        profile,
        model: Model::H100,
        seed,
        energy_counter: true,
        counter_file: None,
        nvlink: false,
    }))
}

/// mW·ns in one Wh (one count of the register).
const MILLIWATT_NANOS_PER_WH: u128 = 3_600 * 1_000 * 1_000_000_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    capwatch_common::init_logging(args.log_format);
    if args.interval.is_zero() {
        bail!("--interval must be above zero");
    }
    let mut nodes = args
        .nodes
        .iter()
        .map(|s| node(s, args.gpus))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let meter = ModbusMeter::start_on(args.listen, Layout::default())
        .with_context(|| format!("serving Modbus TCP on {}", args.listen))?;
    tracing::info!(listen = %meter.addr(), nodes = nodes.len(), "simulated site meter running");
    let mut stop = capwatch_common::shutdown_on_signals()?;
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = tokio::time::Instant::now();
    let wall = SystemTime::now();
    let mut integral: u128 = 0;
    loop {
        let tick = tokio::select! {
            t = ticker.tick() => t,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stamp = (wall + (tick - start))
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let mw: u64 = nodes
            .iter_mut()
            .map(|n| node_milliwatts(args.gpus, &n.sample(stamp)))
            .sum();
        // The first tick starts the count; each later one adds an interval
        // at the power read at its end, as the mock's own counters do.
        if tick > start {
            let with_overhead = u128::from(mw) * u128::from(100 + args.overhead_percent) / 100;
            integral += with_overhead * args.interval.as_nanos();
        }
        meter.set_count(u64::try_from(integral / MILLIWATT_NANOS_PER_WH).unwrap_or(u64::MAX));
    }
    tracing::info!(wh = meter.count(), "simulated site meter stopped");
    Ok(())
}
