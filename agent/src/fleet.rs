//! A simulated fleet in one process: N virtual nodes of M mock GPUs, each
//! with its own node id, spool and gRPC stream, so one machine can stand
//! in for a site when measuring the collector.
//!
//! Every node runs the agent's own stream code (`stream::run`): acks,
//! re-sends, reconnects and failover behave as with real agents, each node
//! ranking the collector endpoints by its own node id. One sampler task
//! ticks all nodes, each at its own phase within the interval, so the
//! collector sees a steady load rather than one burst per second. Each node
//! also reports the mock's whole-node power ([`crate::node_power::mock`])
//! unless `node_power` is off.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::info;

use capwatch_proto::v1 as pb;

use crate::config::CollectorOrder;
use crate::convert;
use crate::failover;
use crate::node_power::mock::MockNodePower;
use crate::source::GpuSource;
use crate::source::mock::{MockConfig, MockSource, Model, Profile};
use crate::spool::Spool;
use crate::stream::{self, Shared, StreamConfig, Target};
use crate::unix_nanos;

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Collector endpoints; each node ranks them (see [`crate::failover`]).
    pub collectors: Vec<String>,
    pub collector_order: CollectorOrder,
    /// While on another endpoint, how often a node tries its most
    /// preferred one again (zero: never).
    pub failback_after: Duration,
    pub nodes: usize,
    pub gpus: u32,
    pub interval: Duration,
    pub profile: Profile,
    pub node_prefix: String,
    pub seed: u64,
    pub spool_capacity: usize,
    pub batch_max: usize,
    /// A node's stream is woken every this many samples, so that they go
    /// out together (1: every sample).
    pub samples_per_send: u64,
    pub drain_timeout: Duration,
    /// Nodes sharing one HTTP/2 connection (1: one connection per node,
    /// as real agents have). More lets one process simulate more nodes
    /// than it may open sockets.
    pub nodes_per_connection: usize,
    /// Whether each node reports the mock's whole-node power.
    pub node_power: bool,
}

/// What the fleet sent and what the collector acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetReport {
    pub nodes: usize,
    /// Node samples taken (each holds one reading per GPU).
    pub sampled: u64,
    /// Acked by the collector, accepted or rejected.
    pub acked: u64,
    /// Acked samples the collector rejected.
    pub rejected: u64,
    pub dropped: u64,
    /// Sent but unacked samples of an epoch the collector refused later.
    pub abandoned: u64,
    pub undelivered: u64,
    pub connects: u64,
    /// Moves of a node from one collector endpoint to another.
    pub switches: u64,
}

struct Node {
    source: MockSource,
    node_power: Option<MockNodePower>,
    shared: Arc<Shared>,
    seq: u64,
}

/// Totals over the fleet's shared state.
fn report(nodes: &[Node]) -> FleetReport {
    let mut r = FleetReport {
        nodes: nodes.len(),
        ..FleetReport::default()
    };
    for n in nodes {
        let s = &n.shared.stats;
        r.sampled += s.sampled.load(Ordering::Relaxed);
        r.acked += s.acked.load(Ordering::Relaxed);
        r.rejected += s.rejected.load(Ordering::Relaxed);
        r.dropped += s.dropped.load(Ordering::Relaxed);
        r.abandoned += s.abandoned.load(Ordering::Relaxed);
        r.connects += s.connects.load(Ordering::Relaxed);
        r.switches += s.switches.load(Ordering::Relaxed);
        r.undelivered += n.shared.spool().len() as u64;
    }
    r
}

/// Runs the fleet until `shutdown` flips, then lets every node deliver its
/// spool within the drain timeout. `progress` gets a report every 10 s.
pub async fn run(
    cfg: FleetConfig,
    mut shutdown: watch::Receiver<bool>,
    progress: impl Fn(FleetReport),
) -> FleetReport {
    let epoch = unix_nanos(SystemTime::now()) as u64;
    let (done_tx, done_rx) = watch::channel(false);
    let mut streams = JoinSet::new();
    let mut nodes: Vec<Node> = Vec::with_capacity(cfg.nodes);
    // One shared connection per endpoint for each group of nodes.
    let mut channels: Vec<Option<tonic::transport::Channel>> = vec![None; cfg.collectors.len()];
    for i in 0..cfg.nodes {
        if cfg.nodes_per_connection > 1 && i % cfg.nodes_per_connection == 0 {
            channels = cfg
                .collectors
                .iter()
                .map(|url| {
                    tonic::transport::Endpoint::from_shared(url.clone())
                        .ok()
                        .map(|e| {
                            e.tcp_nodelay(true)
                                .http2_keep_alive_interval(Duration::from_secs(10))
                                .connect_lazy()
                        })
                })
                .collect();
        }
        let node_id = format!("{}{i:05}", cfg.node_prefix);
        let targets = failover::preference(&node_id, &cfg.collectors, cfg.collector_order)
            .into_iter()
            .map(|k| Target {
                url: cfg.collectors[k].clone(),
                channel: channels[k].clone(),
            })
            .collect();
        let source = MockSource::new(MockConfig {
            node_id: node_id.clone(),
            gpus: cfg.gpus,
            profile: cfg.profile,
            model: Model::H100,
            seed: cfg.seed,
            energy_counter: true,
            counter_file: None,
            nvlink: false,
        });
        let shared = Arc::new(Shared {
            spool: std::sync::Mutex::new(Spool::new(cfg.spool_capacity, epoch)),
            new_sample: Arc::new(Notify::new()),
            stats: stream::Stats::default(),
        });
        let hello = pb::Hello {
            node_id,
            agent_version: crate::VERSION.to_string(),
            stream_epoch: epoch,
            interval_millis: u32::try_from(cfg.interval.as_millis()).unwrap_or(u32::MAX),
            gpus: source.inventory().iter().map(convert::gpu_info).collect(),
            host: None,
            node_power_sources: if cfg.node_power {
                let info = MockNodePower::info(cfg.interval);
                vec![pb::NodePowerSource {
                    index: 0,
                    kind: info.kind.into(),
                    domain: info.domain.into(),
                    name: info.name,
                    energy_counter_supported: info.energy_counter_supported,
                    interval_millis: u32::try_from(cfg.interval.as_millis()).unwrap_or(u32::MAX),
                }]
            } else {
                Vec::new()
            },
        };
        streams.spawn(stream::run(
            StreamConfig {
                targets,
                token: None,
                tls: None,
                tls_domain: None,
                failback_after: cfg.failback_after,
                hello,
                layout: None,
                batch_max: cfg.batch_max,
                reconnect_initial: Duration::from_millis(250),
                reconnect_max: Duration::from_secs(5),
                drain_timeout: cfg.drain_timeout,
            },
            shared.clone(),
            done_rx.clone(),
        ));
        nodes.push(Node {
            source,
            node_power: cfg.node_power.then(|| MockNodePower::new(cfg.gpus)),
            shared,
            seq: 0,
        });
    }
    info!(nodes = cfg.nodes, gpus = cfg.gpus, interval_ms = cfg.interval.as_millis() as u64, collectors = %cfg.collectors.join(","), "fleet starting");

    // The interval is cut into slices; each tick of the slice timer samples
    // the nodes of one slice, so node i samples at phase i mod slices.
    let slices = cfg.nodes.clamp(1, 100);
    let mut ticker = tokio::time::interval(cfg.interval / slices as u32);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start_wall = SystemTime::now();
    let start = tokio::time::Instant::now();
    let mut next_progress = start + Duration::from_secs(10);
    let mut slice = 0usize;
    loop {
        let tick = tokio::select! {
            t = ticker.tick() => t,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let at = unix_nanos(start_wall + (tick - start));
        for node in nodes.iter_mut().skip(slice).step_by(slices) {
            node.seq += 1;
            let gpus = node.source.sample(at);
            let node_power = match &mut node.node_power {
                Some(p) => vec![p.reading(0, at, &gpus)],
                None => Vec::new(),
            };
            let sample = pb::NodeSample {
                // Numbered by the spool, in its epoch.
                seq: 0,
                timestamp_unix_nanos: at,
                gpus: gpus.into_iter().map(convert::gpu_sample).collect(),
                host: None,
                node_power,
            };
            let dropped = node.shared.spool().push(sample);
            node.shared.stats.sampled.fetch_add(1, Ordering::Relaxed);
            node.shared
                .stats
                .dropped
                .fetch_add(dropped, Ordering::Relaxed);
            if node.seq % cfg.samples_per_send.max(1) == 0 {
                node.shared.new_sample.notify_one();
            }
        }
        slice = (slice + 1) % slices;
        if tick >= next_progress {
            progress(report(&nodes));
            next_progress += Duration::from_secs(10);
        }
    }
    let _ = done_tx.send(true);
    while streams.join_next().await.is_some() {}
    report(&nodes)
}
