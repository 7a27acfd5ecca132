//! capwatch agent: reads every GPU of a node on a fixed interval and
//! streams the samples to the collector.
//!
//! The sampler ([`run`]) asks the [`GpuSource`] and the host figures for a
//! read on each tick, each on a worker thread of its own
//! ([`source::worker`]), waits at most one interval for them, and pushes
//! one [`NodeSample`](capwatch_proto::v1::NodeSample) per tick into the
//! spool; the stream task ([`stream::run`]) delivers the spool and forgets
//! what the collector acks. Node power sources ([`node_power`]) are read on
//! threads of their own; the sampler adds their newest readings to each
//! sample. Nothing on the runtime's thread waits on hardware, so a hung
//! driver cannot stop acks, sends, signals or the drain deadline.

pub mod config;
pub mod convert;
pub mod failover;
pub mod fleet;
pub mod host;
pub mod http;
pub mod meter_sim;
pub mod node_power;
pub mod notify;
pub mod source;
pub mod spool;
pub mod stream;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::{info, warn};

use capwatch_proto::v1 as pb;

use config::{Config, SourceKind};
use source::mock::{MockConfig, MockSource};
use source::nvml::NvmlSource;
use source::worker::Outcome;
use source::{GpuInfo, GpuSource, ReadErrors, SourceError};
use spool::Spool;
use stream::{Shared, StreamConfig};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Longest wait for a read of the mock source (see `run`).
const MOCK_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("no node id configured and the hostname is unknown; set node_id")]
    NoNodeId,
    #[error("agent token: {0}")]
    Token(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("http_listen {addr}: {error}")]
    HttpListen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("starting the {what} worker thread: {error}")]
    Thread {
        what: &'static str,
        error: std::io::Error,
    },
    #[error("the GPU source's worker thread ended while opening it")]
    SourceThread,
}

/// The token to present: from `token_file`, else `CAPWATCH_TOKEN`.
fn load_token(cfg: &Config) -> Result<Option<MetadataValue<Ascii>>, AgentError> {
    let token = match &cfg.token_file {
        Some(path) => Some(
            capwatch_common::read_token(path, "token_file")
                .map_err(|e| AgentError::Token(format!("reading {}: {e}", path.display())))?,
        ),
        None => std::env::var("CAPWATCH_TOKEN").ok(),
    };
    let Some(token) = token else { return Ok(None) };
    if token.is_empty() {
        return Err(AgentError::Token("the token is empty".into()));
    }
    let mut value = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| AgentError::Token("the token must be printable ASCII".into()))?;
    value.set_sensitive(true);
    if let Some(plain) = cfg
        .endpoints()
        .into_iter()
        .find(|e| e.starts_with("http://"))
    {
        warn!(collector = %plain, "the agent token travels in plaintext; use an https:// collector");
    }
    Ok(Some(value))
}

/// The client's TLS settings for an `https://` collector.
fn client_tls(cfg: &Config) -> Result<Option<ClientTlsConfig>, AgentError> {
    let Some(ca) = &cfg.tls_ca else {
        return Ok(None);
    };
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|e| AgentError::Tls(format!("reading {}: {e}", path.display())))
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        capwatch_common::warn_if_exposed(key, "tls_key");
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    // The name to verify (tls_domain, or each endpoint's host) is set per
    // endpoint by the stream.
    Ok(Some(tls))
}

/// What a run did, for the exit log and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub sampled: u64,
    /// Acked by the collector, accepted or rejected.
    pub acked: u64,
    /// Acked samples the collector rejected, and by reason
    /// (`reason=count,...`).
    pub rejected: u64,
    pub rejected_by_reason: String,
    pub dropped: u64,
    /// Sent but unacked samples of an epoch the collector refused later.
    pub abandoned: u64,
    pub undelivered: u64,
    pub connects: u64,
    /// Moves from one collector endpoint to another.
    pub collector_switches: u64,
    /// Node power readings sent.
    pub node_power_readings: u64,
    /// Failed node power reads (the source absent from samples), and by
    /// source and reason (`kind/name:reason=count,...`).
    pub node_power_failures: u64,
    pub node_power_failures_by_reason: String,
    /// GPU reads that missed their deadline, and samples sent without GPU
    /// readings meanwhile.
    pub gpu_stalls: u64,
    pub gpu_stalled_samples: u64,
    /// GPU reads answered in time, and late answers dropped.
    pub gpu_reads: u64,
    pub gpu_late_answers: u64,
}

/// What the GPU worker reports once its source is open.
struct Opened {
    inventory: Vec<GpuInfo>,
    /// The inventory as the MIG layout changes, for the Hello.
    layout: Option<watch::Receiver<Vec<GpuInfo>>>,
    name: &'static str,
    errors: Option<Arc<ReadErrors>>,
}

/// Opens the configured GPU source.
pub fn open_source(cfg: &Config, node_id: &str) -> Result<Box<dyn GpuSource>, SourceError> {
    Ok(match cfg.source {
        SourceKind::Nvml => Box::new(
            NvmlSource::open_with(
                cfg.nvml.library.as_deref(),
                cfg.nvml.xid_counts_file.as_deref(),
            )?
            .with_mig_check_every(cfg.nvml.mig_check_interval),
        ),
        SourceKind::Mock => Box::new(MockSource::new(MockConfig {
            node_id: node_id.to_string(),
            gpus: cfg.mock.gpus,
            profile: cfg.mock.profile,
            model: cfg.mock.model,
            seed: cfg.mock.seed,
            energy_counter: cfg.mock.energy_counter,
            counter_file: cfg.mock.counter_file.clone(),
            nvlink: cfg.mock.nvlink,
        })),
    })
}

/// The node id: configured, or the hostname.
pub fn node_id(cfg: &Config) -> Result<String, AgentError> {
    if !cfg.node_id.is_empty() {
        return Ok(cfg.node_id.clone());
    }
    host::Host::hostname().ok_or(AgentError::NoNodeId)
}

/// Variable that shifts the agent's clock, for tests of stepped and skewed
/// clocks (`-2m`, `1h`): test-only, not a setting, and honoured only with
/// the mock source.
pub const TEST_CLOCK_OFFSET_VAR: &str = "CAPWATCH_TEST_CLOCK_OFFSET";

/// The wall clock the agent stamps samples and chooses epochs with: the
/// system clock, shifted by [`TEST_CLOCK_OFFSET_VAR`] when a test sets it
/// for the mock source.
fn agent_clock(source: &str) -> SystemTime {
    shifted(
        SystemTime::now(),
        std::env::var(TEST_CLOCK_OFFSET_VAR).ok().as_deref(),
        source,
    )
}

/// `now` shifted by a test clock offset (`-2m`, `1h`), if one is given
/// and the source is the mock: real GPUs are billed by their timestamps,
/// which a test setting must never move.
fn shifted(now: SystemTime, offset: Option<&str>, source: &str) -> SystemTime {
    let Some(text) = offset else {
        return now;
    };
    if source != "mock" {
        warn!(offset = %text, source, "{TEST_CLOCK_OFFSET_VAR} ignored: it shifts the mock source only");
        return now;
    }
    let (behind, amount) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.trim_start_matches('+')),
    };
    match humantime::parse_duration(amount) {
        Ok(d) => {
            warn!(offset = %text, "the agent's clock is shifted for a test ({TEST_CLOCK_OFFSET_VAR})");
            let shifted = if behind {
                now.checked_sub(d)
            } else {
                now.checked_add(d)
            };
            shifted.unwrap_or(now)
        }
        Err(e) => {
            warn!(offset = %text, error = %e, "{TEST_CLOCK_OFFSET_VAR} ignored");
            now
        }
    }
}

pub(crate) fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Samples until `shutdown` flips (or `max_samples` are taken), then
/// delivers what is left within the drain timeout.
pub async fn run(
    cfg: Config,
    max_samples: Option<u64>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Summary, AgentError> {
    cfg.validate()?;
    cfg.check_files()?;
    let node_id = node_id(&cfg)?;
    // Bound before anything else, so a taken port fails the start, and
    // answering (503) while the GPU source opens.
    let listener = match cfg.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|error| AgentError::HttpListen { addr, error })?,
        ),
        None => None,
    };
    // NVML is opened on the worker that reads it: its initialisation can
    // hang like any call, and a signal must still stop the agent.
    let (mut gpu_reader, opened) = {
        let (cfg, node_id) = (cfg.clone(), node_id.clone());
        source::worker::Reader::spawn_with("gpu", move || {
            let mut source = open_source(&cfg, &node_id)?;
            let opened = Opened {
                inventory: source.inventory().to_vec(),
                layout: source.layout(),
                name: source.name(),
                errors: source.errors(),
            };
            Ok::<_, SourceError>((opened, move |at| source.sample(at)))
        })
        .map_err(|error| AgentError::Thread { what: "GPU", error })?
    };
    let mut host = host::Host::new();
    let host_info = host.info();
    let mut host_reader =
        source::worker::Reader::spawn("host", move |_at| host.sample()).map_err(|error| {
            AgentError::Thread {
                what: "host",
                error,
            }
        })?;
    // The start, and with it the epoch, are fixed before the source opens
    // (the samples' clock runs from here either way).
    let start_wall = agent_clock(match cfg.source {
        SourceKind::Mock => "mock",
        SourceKind::Nvml => "nvml",
    });
    let start = tokio::time::Instant::now();
    // The epoch tells this run's sequence numbers apart from an earlier
    // run's: a restarted agent starts again at seq 1 under a new epoch
    // (above the collector's, should it hold a newer one for this node),
    // unless a disk spool carries an earlier run's on.
    let epoch = unix_nanos(start_wall) as u64;
    let new_sample = Arc::new(Notify::new());
    let mut spool = Spool::open(
        cfg.spool_capacity,
        epoch,
        cfg.spool_disk().as_ref(),
        &node_id,
    )?;
    // The stream task waits for samples to become sendable: once their
    // disk has them.
    spool.wake_on_progress(new_sample.clone());
    let shared = Arc::new(Shared {
        spool: std::sync::Mutex::new(spool),
        new_sample,
        stats: stream::Stats::default(),
    });
    let observed = Arc::new(http::Observed::new(
        shared.clone(),
        gpu_reader.stats(),
        host_reader.stats(),
        cfg.interval,
        cfg.health_max_undelivered,
    ));
    let http_task = listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            info!(listen = %addr, "agent HTTP port: /healthz /livez /metrics");
        }
        tokio::spawn(http::serve(l, observed.clone()))
    });
    let opened = tokio::select! {
        opened = opened => opened.map_err(|_| AgentError::SourceThread)?,
        _ = shutdown.wait_for(|s| *s) => {
            info!("stopped while the GPU source was opening");
            if let Some(task) = http_task {
                task.abort();
            }
            return Ok(Summary::default());
        }
    };
    let opened = match opened {
        Ok(opened) => opened,
        Err(e) => {
            observed.open_failed.store(true, Ordering::Relaxed);
            return Err(e.into());
        }
    };
    observed.opened(opened.inventory.len(), opened.errors.clone());
    let notifier = notify::Notifier::from_env().map(Arc::new);

    // Node power readings are stamped on the samples' clock: the start's
    // wall time plus the monotonic time since (shifted alike under a test
    // clock offset), so a step of the system clock cannot reorder them
    // against the samples or clamp them.
    let clock: node_power::Clock = {
        let (wall, start) = (unix_nanos(start_wall), std::time::Instant::now());
        Arc::new(move || {
            let since = i64::try_from(start.elapsed().as_nanos()).unwrap_or(i64::MAX);
            wall.saturating_add(since)
        })
    };
    // Returns at once: the sources are opened (BMC discovery included) on
    // threads of their own while the sampler runs.
    let mut node_power = node_power::NodePower::start(&cfg, clock);
    observed.node_power(node_power.slots());
    let gpus: Vec<pb::GpuInfo> = opened.inventory.iter().map(convert::gpu_info).collect();
    let endpoints = cfg.endpoints();
    let targets: Vec<stream::Target> =
        failover::preference(&node_id, &endpoints, cfg.collector_order)
            .into_iter()
            .map(|i| stream::Target {
                url: endpoints[i].clone(),
                channel: None,
            })
            .collect();
    let order: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
    info!(node = %node_id, source = opened.name, gpus = gpus.len(), interval_ms = cfg.interval.as_millis() as u64, collectors = %order.join(","), "agent starting");
    let token = load_token(&cfg)?;
    let tls = client_tls(&cfg)?;

    let (done_tx, done_rx) = watch::channel(false);
    // The stream starts once the node power listing is final (the Hello
    // names the sources): every source opened, or one BMC request timeout
    // after start. Samples are taken and spooled meanwhile.
    let mut stream = Some(StreamConfig {
        targets,
        token,
        tls,
        tls_domain: cfg.tls_domain.clone(),
        failback_after: cfg.failback_after,
        hello: pb::Hello {
            node_id: node_id.clone(),
            agent_version: VERSION.to_string(),
            stream_epoch: epoch,
            interval_millis: u32::try_from(cfg.interval.as_millis()).unwrap_or(u32::MAX),
            gpus,
            host: Some(host_info),
            node_power_sources: Vec::new(),
        },
        layout: opened.layout.clone(),
        batch_max: cfg.batch_max,
        reconnect_initial: cfg.reconnect_initial,
        reconnect_max: cfg.reconnect_max,
        drain_timeout: cfg.drain_timeout,
    });
    let mut stream_task = None;
    let listing_deadline = start + node_power.start_cap();
    let opened = node_power.opened_signal();
    let mut start_stream = |node_power: &mut node_power::NodePower| {
        node_power.list();
        let mut config = stream.take()?;
        config.hello.node_power_sources = node_power.hello();
        info!(
            node_power_sources = node_power.sources().len(),
            "node power sources listed; streaming"
        );
        Some(tokio::spawn(stream::run(
            config,
            shared.clone(),
            done_rx.clone(),
        )))
    };
    let mut ticker = tokio::time::interval(cfg.interval);
    // A simulated node never skips a tick, so its readings are a pure
    // function of the tick number; real hardware is read now or not at all.
    ticker.set_missed_tick_behavior(match cfg.source {
        SourceKind::Mock => MissedTickBehavior::Burst,
        SourceKind::Nvml => MissedTickBehavior::Skip,
    });
    // A simulation cannot hang: its read is late only on a starved machine,
    // and its readings are a pure function of the tick, which its tests
    // compare sample by sample; so it is given longer.
    let read_wait = match cfg.source {
        SourceKind::Nvml => cfg.interval,
        SourceKind::Mock => cfg.interval.max(MOCK_READ_WAIT),
    };
    let mut seq = 0u64;
    let mut node_power_readings = 0u64;
    let watchdog = notifier.as_ref().and_then(|n| {
        n.ready();
        let every = n.ping_every()?;
        let n = n.clone();
        Some(tokio::spawn(async move {
            loop {
                n.ping();
                tokio::time::sleep(every).await;
            }
        }))
    });
    loop {
        if stream_task.is_none()
            && (node_power.all_opened() || tokio::time::Instant::now() >= listing_deadline)
        {
            stream_task = start_stream(&mut node_power);
        }
        let tick = tokio::select! {
            t = ticker.tick() => t,
            _ = shutdown.wait_for(|s| *s) => break,
            _ = opened.notified(), if stream_task.is_none() => continue,
            _ = tokio::time::sleep_until(listing_deadline), if stream_task.is_none() => continue,
        };
        seq += 1;
        // Stamp with the scheduled tick, so timestamps are evenly spaced.
        let at = unix_nanos(start_wall + (tick - start));
        // Both reads at once, each waited for until one interval from now
        // at most; a stalled one is absent from this sample.
        let read_deadline = tokio::time::Instant::now() + read_wait;
        gpu_reader.start(at);
        host_reader.start(at);
        let reads = async {
            (
                gpu_reader.finish(read_deadline).await,
                host_reader.finish(read_deadline).await,
            )
        };
        let (gpus, host_sample) = tokio::select! {
            reads = reads => reads,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let gpus = match gpus {
            Outcome::Fresh(gpus) => {
                let lost = gpus.iter().filter(|g| g.lost).count();
                observed.gpus_lost.store(lost as u64, Ordering::Relaxed);
                gpus
            }
            // Absent, never zero: the collector keeps each GPU's last
            // counter, and the first reading after the stall carries the
            // energy of the whole gap.
            Outcome::Stalled => Vec::new(),
        };
        let host_sample = match host_sample {
            Outcome::Fresh(h) => Some(h),
            Outcome::Stalled => None,
        };
        let power = node_power.take(at, &gpus);
        node_power_readings += power.len() as u64;
        let sample = pb::NodeSample {
            // Numbered by the spool, in its epoch.
            seq: 0,
            timestamp_unix_nanos: at,
            gpus: gpus.into_iter().map(convert::gpu_sample).collect(),
            host: host_sample,
            node_power: power,
        };
        let dropped = shared.spool().push(sample);
        shared.stats.sampled.fetch_add(1, Ordering::Relaxed);
        if dropped > 0 {
            let total = shared.stats.dropped.fetch_add(dropped, Ordering::Relaxed) + dropped;
            // Log the first drop and then every 100th, not every tick.
            if total == dropped || total % 100 < dropped {
                warn!(
                    dropped_total = total,
                    capacity = cfg.spool_capacity,
                    "spool full: oldest unacknowledged samples dropped (energy is kept by the next counter delta)"
                );
            }
        }
        shared.new_sample.notify_one();
        observed.ticked();
        if max_samples.is_some_and(|m| seq >= m) {
            break;
        }
    }
    info!(samples = seq, "sampling stopped; delivering the spool");
    if let Some(n) = &notifier {
        n.stopping();
    }
    // Stopped before the listing was final: list what has opened, so the
    // spool can still be delivered.
    if stream_task.is_none() {
        stream_task = start_stream(&mut node_power);
    }
    node_power.stop();
    // Under an fsync interval, the last samples become sendable.
    shared.spool().sync();
    let _ = done_tx.send(true);
    let drain_end = tokio::time::Instant::now() + cfg.drain_timeout;
    if let Some(task) = stream_task
        && let Err(e) = task.await
    {
        warn!(error = %e, "stream task ended abnormally");
    }
    // What was spooled before the stop reaches the disk (its last acks
    // too), so a restart finds it; waited for until the drain deadline at
    // most, off the spool's lock (the disk's writer wakes `new_sample`
    // after each operation).
    let flushed = async {
        loop {
            let woken = shared.new_sample.notified();
            let stall_check = {
                let spool = shared.spool();
                if spool.disk_idle() {
                    return;
                }
                spool.stall_check_in()
            };
            // Looked at again when the operation under way would pass the
            // stall bound: a disk hung here is given up then.
            match stall_check {
                Some(d) => {
                    let _ = tokio::time::timeout(d, woken).await;
                }
                None => woken.await,
            }
        }
    };
    if tokio::time::timeout_at(drain_end, flushed).await.is_err() {
        warn!(
            "the spool's disk writer is still in a disk operation at exit; it is left behind (a restart finds what reached the disk)"
        );
        shared.spool().leave_writer_behind();
    }
    // Let the workers drop what they read (the mock saves its counters,
    // NVML's XID thread finishes its wait), but wait for one hung in the
    // driver no longer than the drain deadline (at least what stopping the
    // XID thread may take, so a healthy worker is not reported hung), and
    // a second at most.
    let gpu_stats = gpu_reader.stats();
    let now = tokio::time::Instant::now();
    let until = drain_end
        .min(now + std::time::Duration::from_secs(1))
        .max(now + source::xid::STOP_WITHIN + std::time::Duration::from_millis(100));
    let (gpu_stopped, _) = tokio::join!(gpu_reader.stop(until), host_reader.stop(until));
    if !gpu_stopped {
        warn!("the GPU worker is still in a read at exit; it is left behind");
    }
    for task in [http_task, watchdog].into_iter().flatten() {
        task.abort();
    }
    let summary = Summary {
        sampled: shared.stats.sampled.load(Ordering::Relaxed),
        acked: shared.stats.acked.load(Ordering::Relaxed),
        rejected: shared.stats.rejected.load(Ordering::Relaxed),
        rejected_by_reason: shared.stats.rejected_by_reason(),
        dropped: shared.stats.dropped.load(Ordering::Relaxed),
        abandoned: shared.stats.abandoned.load(Ordering::Relaxed),
        undelivered: shared.spool().len() as u64,
        connects: shared.stats.connects.load(Ordering::Relaxed),
        collector_switches: shared.stats.switches.load(Ordering::Relaxed),
        node_power_readings,
        node_power_failures: node_power.failures().total(),
        node_power_failures_by_reason: node_power.failures().by_reason(),
        gpu_stalls: gpu_stats.stalls.load(Ordering::Relaxed),
        gpu_stalled_samples: gpu_stats.stalled_samples.load(Ordering::Relaxed),
        gpu_reads: gpu_stats.reads.load(Ordering::Relaxed),
        gpu_late_answers: gpu_stats.late_answers.load(Ordering::Relaxed),
    };
    info!(
        sampled = summary.sampled,
        acked = summary.acked,
        rejected = summary.rejected,
        rejected_by_reason = %summary.rejected_by_reason,
        dropped = summary.dropped,
        abandoned = summary.abandoned,
        undelivered = summary.undelivered,
        connects = summary.connects,
        collector_switches = summary.collector_switches,
        node_power_readings = summary.node_power_readings,
        node_power_failures = summary.node_power_failures,
        node_power_failures_by_reason = %summary.node_power_failures_by_reason,
        gpu_stalls = summary.gpu_stalls,
        gpu_stalled_samples = summary.gpu_stalled_samples,
        gpu_reads = summary.gpu_reads,
        gpu_late_answers = summary.gpu_late_answers,
        "agent stopped"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_test_clock_offset_shifts_only_the_mock_source() {
        // Invariant: the test-only clock offset can never move the
        // timestamps or the epoch of real GPUs: only the mock's.
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour = Duration::from_secs(3600);
        assert_eq!(shifted(now, Some("1h"), "mock"), now + hour);
        assert_eq!(
            shifted(now, Some("-2m"), "mock"),
            now - Duration::from_secs(120)
        );
        assert_eq!(shifted(now, Some("1h"), "nvml"), now);
        assert_eq!(shifted(now, None, "mock"), now);
        assert_eq!(shifted(now, Some("soon"), "mock"), now);
    }
}
