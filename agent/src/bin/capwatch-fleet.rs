//! `capwatch-fleet`: a simulated fleet (N nodes × M mock GPUs, one gRPC
//! stream per node) in one process, for load tests and benchmarks of the
//! collector. Prints progress every 10 s and a JSON summary at the end.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use capwatch_agent::config::CollectorOrder;
use capwatch_agent::fleet::{self, FleetConfig, FleetReport};
use capwatch_agent::source::mock::Profile;
use capwatch_common::LogFormat;

/// capwatch fleet simulator: many mock agents in one process, each node
/// with its own node id and gRPC stream to the collector.
#[derive(Debug, Parser)]
#[command(name = "capwatch-fleet", version)]
struct Args {
    /// Collector gRPC endpoint.
    #[arg(
        long,
        default_value = "http://127.0.0.1:7070",
        conflicts_with = "collectors"
    )]
    collector: String,
    /// Several collector endpoints, comma-separated (instead of
    /// --collector); each node ranks them by its node id.
    #[arg(long, value_delimiter = ',')]
    collectors: Option<Vec<String>>,
    /// Order the nodes try the collectors in: hashed or listed.
    #[arg(long, value_enum, default_value = "hashed")]
    collector_order: CollectorOrder,
    /// While on another collector, how often a node tries its most
    /// preferred one again (0s: never).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    failback_after: Duration,
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Mock GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus: u32,
    /// Sampling interval of every node.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Stop after this long [default: run until SIGINT/SIGTERM].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Workload of every node.
    #[arg(long, value_enum, default_value = "training")]
    profile: Profile,
    /// Node ids are this prefix and a 5-digit number.
    #[arg(long, default_value = "sim-")]
    node_prefix: String,
    /// Seed of the mock readings.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Unacknowledged samples kept per node.
    #[arg(long, default_value_t = 120)]
    spool_capacity: usize,
    /// Most samples per message.
    #[arg(long, default_value_t = 64)]
    batch_max: usize,
    /// Each node sends once every N samples, all N in one message (1:
    /// every sample as it is taken, as the agent does). More models nodes
    /// that sample faster than they report, and costs the simulator less
    /// per sample.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    samples_per_send: u64,
    /// After stopping, how long nodes get to deliver their spools.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Nodes sharing one HTTP/2 connection (1: one per node, as real
    /// agents; more simulates more nodes than the process may open sockets).
    #[arg(long, default_value_t = 1)]
    nodes_per_connection: usize,
    /// Leave out the simulated whole-node power (GPUs plus CPUs, fans and
    /// PSU losses) each node reports by default.
    #[arg(long)]
    no_node_power: bool,
    /// Log format.
    #[arg(long, default_value = "plain")]
    log_format: LogFormat,
}

fn print(what: &str, r: &FleetReport, seconds: f64, gpus: u32) {
    println!(
        "{{\"event\":\"{what}\",\"seconds\":{seconds:.1},\"nodes\":{},\"sampled\":{},\"acked\":{},\"rejected\":{},\"gpu_samples_acked\":{},\"dropped\":{},\"abandoned\":{},\"undelivered\":{},\"connects\":{},\"collector_switches\":{}}}",
        r.nodes,
        r.sampled,
        r.acked,
        r.rejected,
        r.acked * u64::from(gpus),
        r.dropped,
        r.abandoned,
        r.undelivered,
        r.connects,
        r.switches
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let collectors = args
        .collectors
        .clone()
        .unwrap_or_else(|| vec![args.collector.clone()]);
    // The agent's own checks of its endpoints (no TLS here: plain http://).
    capwatch_agent::config::Config {
        collectors: Some(collectors.clone()),
        ..Default::default()
    }
    .validate()
    .context("--collectors")?;
    capwatch_common::init_logging(args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let shutdown =
            capwatch_common::shutdown_on_signals().context("installing signal handlers")?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let duration = args.duration;
        tokio::spawn(async move {
            let mut signal = shutdown;
            match duration {
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = signal.wait_for(|s| *s) => {}
                    }
                }
                None => {
                    let _ = signal.wait_for(|s| *s).await;
                }
            }
            let _ = stop_tx.send(true);
        });
        let started = std::time::Instant::now();
        let gpus = args.gpus;
        let report = fleet::run(
            FleetConfig {
                collectors,
                collector_order: args.collector_order,
                failback_after: args.failback_after,
                nodes: args.nodes,
                gpus: args.gpus,
                interval: args.interval,
                profile: args.profile,
                node_prefix: args.node_prefix,
                seed: args.seed,
                spool_capacity: args.spool_capacity,
                batch_max: args.batch_max,
                samples_per_send: args.samples_per_send,
                drain_timeout: args.drain_timeout,
                nodes_per_connection: args.nodes_per_connection.max(1),
                node_power: !args.no_node_power,
            },
            stop_rx,
            |r| print("progress", &r, started.elapsed().as_secs_f64(), gpus),
        )
        .await;
        print("done", &report, started.elapsed().as_secs_f64(), gpus);
        if report.undelivered > 0 {
            anyhow::bail!("{} samples could not be delivered", report.undelivered);
        }
        Ok(())
    })
}
