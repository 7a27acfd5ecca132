//! The agent's own HTTP port (`http_listen`, off by default): `/healthz`,
//! `/livez` and `/metrics` for probes, watchdogs and Prometheus.
//!
//! *Boundary:* requests are outside input; only these three GET routes
//! answer (anything else is 404 or 405), none reads a body or a query, and
//! none waits on the hardware or the collector: each renders what the
//! sampler and the stream last recorded in [`Observed`]. At most
//! [`MAX_CONNECTIONS`] are open at once (more are closed at accept and
//! counted), and a request head must arrive within
//! [`HEADER_READ_TIMEOUT`] of the connection opening or its previous
//! response, so idle or slow clients cannot pile up in the agent's memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, Registry, TextEncoder};
use tracing::warn;

use crate::node_power::Slots;
use crate::source::ReadErrors;
use crate::source::worker::ReaderStats;
use crate::stream::Shared;

/// What the sampler and the stream record for the HTTP port (kept whether
/// or not the port is on: a few atomics).
pub struct Observed {
    pub shared: Arc<Shared>,
    pub gpu: Arc<ReaderStats>,
    pub host: Arc<ReaderStats>,
    /// Set once the GPU source is open.
    gpu_errors: OnceLock<Option<Arc<ReadErrors>>>,
    node_power: OnceLock<Arc<Slots>>,
    /// GPUs in the inventory, and lost in the newest sample read.
    pub gpus: AtomicU64,
    pub gpus_lost: AtomicU64,
    /// The source failed to open (the agent is about to exit).
    pub open_failed: AtomicBool,
    started: Instant,
    /// The sampler's last tick, in milliseconds since `started`.
    last_tick_ms: AtomicU64,
    interval: Duration,
    max_undelivered: Duration,
    /// Serializes scrapes (each renders every family once).
    render: Mutex<()>,
    /// Connections closed at accept, [`MAX_CONNECTIONS`] being open.
    pub http_refused: AtomicU64,
}

/// `/healthz`'s verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub ok: bool,
    pub reason: String,
}

impl Observed {
    pub fn new(
        shared: Arc<Shared>,
        gpu: Arc<ReaderStats>,
        host: Arc<ReaderStats>,
        interval: Duration,
        max_undelivered: Duration,
    ) -> Self {
        Self {
            shared,
            gpu,
            host,
            gpu_errors: OnceLock::new(),
            node_power: OnceLock::new(),
            gpus: AtomicU64::new(0),
            gpus_lost: AtomicU64::new(0),
            open_failed: AtomicBool::new(false),
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            interval,
            max_undelivered,
            render: Mutex::new(()),
            http_refused: AtomicU64::new(0),
        }
    }

    /// The GPU source is open, with `gpus` GPUs.
    pub fn opened(&self, gpus: usize, errors: Option<Arc<ReadErrors>>) {
        self.gpus.store(gpus as u64, Ordering::Relaxed);
        let _ = self.gpu_errors.set(errors);
    }

    pub fn node_power(&self, slots: Arc<Slots>) {
        let _ = self.node_power.set(slots);
    }

    /// The sampler took a sample.
    pub fn ticked(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// How long samples have waited for an ack: since the last ack (or the
    /// start), while the spool holds any; zero when it is empty.
    pub fn undelivered_for(&self) -> Duration {
        if self.shared.spool().is_empty() {
            return Duration::ZERO;
        }
        let since = self
            .shared
            .stats
            .last_delivery()
            .map_or(self.started, |(at, _)| at.into_std());
        since.elapsed()
    }

    /// Unhealthy when the GPUs cannot be read (source not open, reads
    /// stalled, every GPU lost) or samples have waited longer than
    /// `health_max_undelivered` for an ack.
    pub fn health(&self) -> Health {
        let bad = |reason: String| Health { ok: false, reason };
        if self.open_failed.load(Ordering::Relaxed) {
            return bad("the GPU source failed to open".into());
        }
        if self.gpu_errors.get().is_none() {
            return bad("the GPU source is not open yet".into());
        }
        if self.gpu.stalled.load(Ordering::Relaxed) {
            return bad("GPU reads are stalled: the driver does not answer".into());
        }
        let (gpus, lost) = (
            self.gpus.load(Ordering::Relaxed),
            self.gpus_lost.load(Ordering::Relaxed),
        );
        if gpus > 0 && lost == gpus {
            return bad(format!("all {gpus} GPUs are lost"));
        }
        let waiting = self.undelivered_for();
        if waiting > self.max_undelivered {
            return bad(format!(
                "no sample delivered for {}s (health_max_undelivered = {}s); {} waiting",
                waiting.as_secs(),
                self.max_undelivered.as_secs(),
                self.shared.spool().len()
            ));
        }
        Health {
            ok: true,
            reason: format!(
                "ok: {} of {gpus} GPUs readable, samples waiting {}s for an ack",
                gpus - lost,
                waiting.as_secs()
            ),
        }
    }

    /// Whether the sampler's loop still turns: it ticked within three
    /// intervals and ten seconds. It never waits on hardware, so a stop
    /// here is the agent's own fault, which a restart mends.
    pub fn live(&self) -> bool {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_tick_ms.load(Ordering::Relaxed);
        let allowed = (self.interval * 3 + Duration::from_secs(10)).as_millis() as u64;
        now.saturating_sub(last) <= allowed
    }

    /// Every `capwatch_agent_*` family, from the current state.
    fn families(&self) -> Vec<MetricFamily> {
        let _one = self.render.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = Families::default();
        let stats = &self.shared.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        f.one(
            "capwatch_agent_build_info",
            "The agent's version (always 1).",
            MetricType::GAUGE,
            &[("version", crate::VERSION)],
            1.0,
        );
        let health = self.health();
        f.one(
            "capwatch_agent_healthy",
            "1 while /healthz answers 200: the GPUs read and samples delivered within health_max_undelivered.",
            MetricType::GAUGE,
            &[],
            if health.ok { 1.0 } else { 0.0 },
        );
        let counters = [
            (
                "capwatch_agent_samples_total",
                "Samples taken.",
                &stats.sampled,
            ),
            (
                "capwatch_agent_samples_acked_total",
                "Samples the collector acked (accepted or rejected).",
                &stats.acked,
            ),
            (
                "capwatch_agent_samples_rejected_total",
                "Acked samples the collector rejected.",
                &stats.rejected,
            ),
            (
                "capwatch_agent_samples_dropped_total",
                "Unacked samples dropped from a full spool (the next counter delta carries their energy).",
                &stats.dropped,
            ),
            (
                "capwatch_agent_samples_abandoned_total",
                "Sent but unacked samples of an epoch the collector refused later.",
                &stats.abandoned,
            ),
            (
                "capwatch_agent_collector_connects_total",
                "Streams the collector welcomed; each after the first is a reconnect.",
                &stats.connects,
            ),
            (
                "capwatch_agent_collector_switches_total",
                "Moves from one collector endpoint to another.",
                &stats.switches,
            ),
        ];
        let http_refused = (
            "capwatch_agent_http_connections_refused_total",
            "Connections to this port closed at accept: the most allowed were open.",
            &self.http_refused,
        );
        for (name, help, value) in counters.into_iter().chain([http_refused]) {
            f.one(name, help, MetricType::COUNTER, &[], load(value));
        }
        let (depth, bytes, spool) = {
            let spool = self.shared.spool();
            (spool.len(), spool.bytes(), spool.depth())
        };
        f.one(
            "capwatch_agent_spool_samples",
            "Samples waiting for an ack.",
            MetricType::GAUGE,
            &[],
            depth as f64,
        );
        f.one(
            "capwatch_agent_spool_bytes",
            "Encoded size of the samples waiting for an ack.",
            MetricType::GAUGE,
            &[],
            bytes as f64,
        );
        // The disk spool's, with `spool_dir` only (series that can never
        // move are not served).
        if spool.disk_configured {
            f.one(
                "capwatch_agent_spool_on_disk",
                "1 while the spool is kept on disk (spool_dir); 0 once the agent gave its disk up after a write error or a hung disk: unacked samples no longer survive a restart.",
                MetricType::GAUGE,
                &[],
                f64::from(u8::from(spool.disk_bytes.is_some())),
            );
            if let Some(b) = spool.disk_bytes {
                f.one(
                    "capwatch_agent_spool_disk_bytes",
                    "Bytes of the spool's files on disk.",
                    MetricType::GAUGE,
                    &[],
                    b as f64,
                );
            }
            let errors = spool.disk_errors.saturating_sub(spool.disk_stalls);
            f.many(
                "capwatch_agent_spool_disk_failures_total",
                "Times the agent gave its disk spool up, by reason: error (a write, sync or new segment failed; a directory that could not be opened at start) or stall (a disk operation that did not return in time, or a disk ever further behind).",
                MetricType::COUNTER,
                vec![
                    (vec![("reason", "error".to_string())], errors as f64),
                    (vec![("reason", "stall".to_string())], spool.disk_stalls as f64),
                ],
            );
            f.one(
                "capwatch_agent_spool_restored_samples",
                "Unacked samples an earlier run left on disk, found at start.",
                MetricType::GAUGE,
                &[],
                spool.restored as f64,
            );
            f.one(
                "capwatch_agent_spool_corrupt_records",
                "Torn or corrupt records dropped from the spool's files at start (a crash while writing, or damage).",
                MetricType::GAUGE,
                &[],
                spool.corrupt as f64,
            );
            f.one(
                "capwatch_agent_spool_collector_ahead_total",
                "Welcomes that said the collector holds sequence numbers of this epoch the spool never sent (its files fell behind an earlier run): the samples never sent were renumbered after them.",
                MetricType::COUNTER,
                &[],
                spool.collector_ahead as f64,
            );
        }
        f.one(
            "capwatch_agent_undelivered_seconds",
            "How long samples have waited for an ack (since the last ack, or the start); 0 with none waiting.",
            MetricType::GAUGE,
            &[],
            self.undelivered_for().as_secs_f64(),
        );
        f.one(
            "capwatch_agent_health_max_undelivered_seconds",
            "The configured health_max_undelivered: /healthz fails once capwatch_agent_undelivered_seconds passes it.",
            MetricType::GAUGE,
            &[],
            self.max_undelivered.as_secs_f64(),
        );
        if let Some((_, wall)) = stats.last_delivery() {
            let secs = wall
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            f.one(
                "capwatch_agent_last_delivery_timestamp_seconds",
                "When the collector last acked a sample (Unix time); absent before the first ack.",
                MetricType::GAUGE,
                &[],
                secs,
            );
        }
        f.one(
            "capwatch_agent_gpus",
            "GPUs in the inventory.",
            MetricType::GAUGE,
            &[],
            load(&self.gpus),
        );
        f.one(
            "capwatch_agent_gpus_lost",
            "GPUs that no longer answered in the newest sample read.",
            MetricType::GAUGE,
            &[],
            load(&self.gpus_lost),
        );
        let readers = [("gpu", &self.gpu), ("host", &self.host)];
        let per_reader = |pick: fn(&ReaderStats) -> f64| -> Vec<(Vec<(&str, String)>, f64)> {
            readers
                .iter()
                .map(|(name, s)| (vec![("reader", (*name).to_string())], pick(s)))
                .collect()
        };
        f.many(
            "capwatch_agent_hardware_reads_total",
            "Hardware reads answered within their deadline (one interval).",
            MetricType::COUNTER,
            per_reader(|s| s.reads.load(Ordering::Relaxed) as f64),
        );
        f.many(
            "capwatch_agent_hardware_stalls_total",
            "Hardware reads that missed their deadline (each stall once, however long it lasts).",
            MetricType::COUNTER,
            per_reader(|s| s.stalls.load(Ordering::Relaxed) as f64),
        );
        f.many(
            "capwatch_agent_hardware_stalled_samples_total",
            "Samples sent without the reader's readings (absent, not zero) while it was stalled.",
            MetricType::COUNTER,
            per_reader(|s| s.stalled_samples.load(Ordering::Relaxed) as f64),
        );
        f.many(
            "capwatch_agent_hardware_stalled",
            "1 while a read of the reader is overdue.",
            MetricType::GAUGE,
            per_reader(|s| {
                if s.stalled.load(Ordering::Relaxed) {
                    1.0
                } else {
                    0.0
                }
            }),
        );
        if let Some(Some(errors)) = self.gpu_errors.get() {
            f.many(
                "capwatch_agent_nvml_errors_total",
                "Failed NVML reads by field (a field the GPU does not support is absent, not an error).",
                MetricType::COUNTER,
                errors
                    .by_field()
                    .into_iter()
                    .map(|(field, n)| (vec![("field", field.to_string())], n as f64))
                    .collect(),
            );
        }
        if let Some(slots) = self.node_power.get() {
            f.many(
                "capwatch_agent_node_power_failures_total",
                "Failed node power reads (BMC, RAPL) by source and reason.",
                MetricType::COUNTER,
                slots
                    .failures
                    .counts()
                    .into_iter()
                    .map(|(source, reason, n)| {
                        (
                            vec![("source", source), ("reason", reason.to_string())],
                            n as f64,
                        )
                    })
                    .collect(),
            );
        }
        f.0
    }
}

/// Metric families under construction.
#[derive(Default)]
struct Families(Vec<MetricFamily>);

impl Families {
    fn one(&mut self, name: &str, help: &str, kind: MetricType, labels: &[(&str, &str)], v: f64) {
        let labels = labels.iter().map(|(k, v)| (*k, (*v).to_string())).collect();
        self.many(name, help, kind, vec![(labels, v)]);
    }

    fn many(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        series: Vec<(Vec<(&str, String)>, f64)>,
    ) {
        if series.is_empty() {
            return;
        }
        let metrics = series
            .into_iter()
            .map(|(labels, value)| {
                let mut m = Metric::default();
                m.set_label(
                    labels
                        .into_iter()
                        .map(|(k, v)| {
                            let mut l = LabelPair::default();
                            l.set_name(k.to_string());
                            l.set_value(v);
                            l
                        })
                        .collect(),
                );
                if kind == MetricType::COUNTER {
                    let mut c = Counter::default();
                    c.set_value(value);
                    m.set_counter(c);
                } else {
                    let mut g = Gauge::default();
                    g.set_value(value);
                    m.set_gauge(g);
                }
                m
            })
            .collect();
        let mut family = MetricFamily::default();
        family.set_name(name.to_string());
        family.set_help(help.to_string());
        family.set_field_type(kind);
        family.set_metric(metrics);
        self.0.push(family);
    }
}

/// Renders [`Observed`] on every scrape.
struct AgentCollector {
    observed: Arc<Observed>,
    desc: Vec<Desc>,
}

impl Collector for AgentCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.observed.families()
    }
}

/// The registry `/metrics` renders (application state, not the global one).
pub fn registry(observed: Arc<Observed>) -> Registry {
    let registry = Registry::new();
    let desc = Desc::new(
        "capwatch_agent_build_info".into(),
        "The agent's version (always 1).".into(),
        Vec::new(),
        HashMap::new(),
    )
    .into_iter()
    .collect();
    if let Err(e) = registry.register(Box::new(AgentCollector { observed, desc })) {
        // A fresh registry accepts one collector; say so should that change.
        warn!(error = %e, "the agent's metrics could not be registered");
    }
    registry
}

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut buf = Vec::with_capacity(8 * 1024);
    TextEncoder::new().encode(&registry.gather(), &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

#[derive(Clone)]
struct App {
    observed: Arc<Observed>,
    registry: Registry,
}

/// The router: `/healthz`, `/livez`, `/metrics`.
pub fn router(observed: Arc<Observed>) -> Router {
    let registry = registry(observed.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics))
        .with_state(App { observed, registry })
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn healthz(State(app): State<App>) -> Response {
    let health = app.observed.health();
    let status = if health.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, PLAIN)],
        format!("{}\n", health.reason),
    )
        .into_response()
}

async fn livez(State(app): State<App>) -> Response {
    if app.observed.live() {
        (StatusCode::OK, [(header::CONTENT_TYPE, PLAIN)], "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, PLAIN)],
            "the sampler has not ticked for three intervals\n",
        )
            .into_response()
    }
}

async fn metrics(State(app): State<App>) -> Response {
    match render(&app.registry) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            warn!(error = %e, "rendering /metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, PLAIN)],
                "rendering the metrics failed\n",
            )
                .into_response()
        }
    }
}

/// Most connections open at once: probes and a scraper or two.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a request head may take, from the connection opening or its
/// previous response (so also the idle keep-alive limit).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection refusals and accept failures are logged at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Serves `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, observed: Arc<Observed>) {
    serve_with(listener, observed, MAX_CONNECTIONS, HEADER_READ_TIMEOUT).await;
}

async fn serve_with(
    listener: tokio::net::TcpListener,
    observed: Arc<Observed>,
    max_connections: usize,
    header_read_timeout: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let app = router(observed.clone());
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    let mut logged: Option<Instant> = None;
    let mut quiet = |what: &str, error: Option<std::io::Error>| {
        if logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
            logged = Some(Instant::now());
            match error {
                Some(e) => {
                    warn!(error = %e, "the agent's HTTP port: {what} (logged at most once a minute)")
                }
                None => warn!(
                    limit = max_connections,
                    "the agent's HTTP port: {what} (logged at most once a minute)"
                ),
            }
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                quiet("accepting failed", Some(e));
                // Out of descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            observed.http_refused.fetch_add(1, Ordering::Relaxed);
            quiet("connection refused, the most allowed are open", None);
            continue;
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            // A client that went away or timed out: nothing to report.
            let _ = conn.await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Spool;
    use crate::stream::Stats;
    use capwatch_proto::v1::NodeSample;

    fn observed(max_undelivered: Duration) -> Observed {
        let shared = Arc::new(Shared {
            spool: Mutex::new(Spool::new(10, 1)),
            new_sample: Default::default(),
            stats: Stats::default(),
        });
        Observed::new(
            shared,
            Arc::default(),
            Arc::default(),
            Duration::from_secs(1),
            max_undelivered,
        )
    }

    /// Invariant: with `spool_dir`, `/metrics` says whether the spool is
    /// still kept on disk and why it was given up; without, it serves
    /// none of those series.
    #[test]
    fn the_disk_spool_is_on_metrics_until_its_disk_is_given_up() {
        let text = |o: &Arc<Observed>| render(&registry(o.clone())).unwrap();
        let memory = Arc::new(observed(Duration::from_secs(60)));
        assert!(!text(&memory).contains("capwatch_agent_spool_on_disk"));

        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::spool::DiskConfig {
            dir: dir.path().join("spool"),
            max_bytes: 1 << 20,
            fsync_interval: Duration::ZERO,
            lock_wait: Duration::ZERO,
            stall_after: crate::spool::disk::STALL_AFTER,
        };
        let spool = Spool::open(10, 1, Some(&cfg), "n1").unwrap();
        let o = Arc::new(Observed::new(
            Arc::new(Shared {
                spool: Mutex::new(spool),
                new_sample: Default::default(),
                stats: Stats::default(),
            }),
            Arc::default(),
            Arc::default(),
            Duration::from_secs(1),
            Duration::from_secs(60),
        ));
        let has = |t: &str, line: &str| t.lines().any(|l| l == line);
        let on = text(&o);
        for line in [
            "capwatch_agent_spool_on_disk 1",
            "capwatch_agent_spool_disk_failures_total{reason=\"error\"} 0",
            "capwatch_agent_spool_disk_failures_total{reason=\"stall\"} 0",
            "capwatch_agent_spool_restored_samples 0",
            "capwatch_agent_spool_corrupt_records 0",
            "capwatch_agent_spool_collector_ahead_total 0",
        ] {
            assert!(has(&on, line), "{line} not in\n{on}");
        }
        assert!(on.contains("capwatch_agent_spool_disk_bytes "), "{on}");
        // Every disk operation from now on fails (EIO): the disk is given up.
        crate::spool::disk::inject(Some(crate::spool::disk::Fault::From(0)));
        o.shared.spool().push(NodeSample::default());
        assert!(o.shared.spool().wait_idle(Duration::from_secs(60)));
        crate::spool::disk::inject(None);
        let off = text(&o);
        for line in [
            "capwatch_agent_spool_on_disk 0",
            "capwatch_agent_spool_disk_failures_total{reason=\"error\"} 1",
            "capwatch_agent_spool_disk_failures_total{reason=\"stall\"} 0",
        ] {
            assert!(has(&off, line), "{line} not in\n{off}");
        }
        assert!(!off.contains("capwatch_agent_spool_disk_bytes "), "{off}");
    }

    #[test]
    fn health_fails_for_each_reason_and_names_it() {
        let o = observed(Duration::from_secs(3600));
        // (state, healthy, words the reason must hold)
        let check = |o: &Observed, ok: bool, words: &str| {
            let h = o.health();
            assert_eq!(h.ok, ok, "{h:?}");
            assert!(h.reason.contains(words), "{h:?} lacks {words:?}");
        };
        check(&o, false, "not open yet");
        let errors = Arc::new(ReadErrors::default());
        o.opened(2, Some(errors));
        check(&o, true, "2 of 2 GPUs readable");
        o.gpus_lost.store(1, Ordering::Relaxed);
        check(&o, true, "1 of 2 GPUs readable");
        o.gpus_lost.store(2, Ordering::Relaxed);
        check(&o, false, "all 2 GPUs are lost");
        o.gpus_lost.store(0, Ordering::Relaxed);
        o.gpu.stalled.store(true, Ordering::Relaxed);
        check(&o, false, "stalled");
        o.gpu.stalled.store(false, Ordering::Relaxed);
        o.open_failed.store(true, Ordering::Relaxed);
        check(&o, false, "failed to open");

        // Undelivered: only while samples wait, and only past the limit.
        let o = observed(Duration::ZERO);
        o.opened(1, None);
        check(&o, true, "ok");
        o.shared.spool().push(NodeSample::default());
        while o.undelivered_for().is_zero() {
            std::thread::yield_now();
        }
        check(&o, false, "no sample delivered");
        o.shared.stats.delivered();
        o.shared.spool().ack(1);
        check(&o, true, "ok");
    }

    #[test]
    fn metrics_list_every_family_in_the_text_format() {
        let o = Arc::new(observed(Duration::from_secs(60)));
        let errors = Arc::new(ReadErrors::default());
        errors.add("power");
        errors.add("power");
        o.opened(2, Some(errors));
        o.gpu.stalls.fetch_add(1, Ordering::Relaxed);
        o.shared.spool().push(NodeSample::default());
        o.shared.stats.delivered();
        let text = render(&registry(o.clone())).unwrap();
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        expect_test::expect![[r##"
            [
                "# TYPE capwatch_agent_build_info gauge",
                "# TYPE capwatch_agent_collector_connects_total counter",
                "# TYPE capwatch_agent_collector_switches_total counter",
                "# TYPE capwatch_agent_gpus gauge",
                "# TYPE capwatch_agent_gpus_lost gauge",
                "# TYPE capwatch_agent_hardware_reads_total counter",
                "# TYPE capwatch_agent_hardware_stalled gauge",
                "# TYPE capwatch_agent_hardware_stalled_samples_total counter",
                "# TYPE capwatch_agent_hardware_stalls_total counter",
                "# TYPE capwatch_agent_health_max_undelivered_seconds gauge",
                "# TYPE capwatch_agent_healthy gauge",
                "# TYPE capwatch_agent_http_connections_refused_total counter",
                "# TYPE capwatch_agent_last_delivery_timestamp_seconds gauge",
                "# TYPE capwatch_agent_nvml_errors_total counter",
                "# TYPE capwatch_agent_samples_abandoned_total counter",
                "# TYPE capwatch_agent_samples_acked_total counter",
                "# TYPE capwatch_agent_samples_dropped_total counter",
                "# TYPE capwatch_agent_samples_rejected_total counter",
                "# TYPE capwatch_agent_samples_total counter",
                "# TYPE capwatch_agent_spool_bytes gauge",
                "# TYPE capwatch_agent_spool_samples gauge",
                "# TYPE capwatch_agent_undelivered_seconds gauge",
            ]
        "##]]
        .assert_debug_eq(&types);
        for line in [
            "capwatch_agent_nvml_errors_total{field=\"power\"} 2",
            "capwatch_agent_hardware_stalls_total{reader=\"gpu\"} 1",
            "capwatch_agent_hardware_stalls_total{reader=\"host\"} 0",
            "capwatch_agent_spool_samples 1",
            "capwatch_agent_gpus 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        let version = format!(
            "capwatch_agent_build_info{{version=\"{}\"}} 1",
            crate::VERSION
        );
        assert!(text.contains(&version), "{text}");
    }

    /// Invariant: idle clients cannot hold the port: a connection that
    /// sends no request is closed at the header timeout, those past the
    /// cap are closed at accept (and counted), and the port answers again
    /// once they are gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_excess_connections_are_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpStream;
        let o = Arc::new(observed(Duration::from_secs(60)));
        o.opened(1, None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_with(
            listener,
            o.clone(),
            2,
            Duration::from_millis(300),
        ));
        // Reads until the server closes; what it sent.
        async fn drain(s: &mut TcpStream) -> String {
            let mut out = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out));
            match read.await.expect("the server closes the connection") {
                Ok(_) => {}
                // Closed with the request unread: a reset.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("reading: {e}"),
            }
            String::from_utf8_lossy(&out).into_owned()
        }
        let mut idle = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        // Both permits taken (polled: the accept loop runs on its own).
        let mut tries = 0;
        let mut extra = loop {
            tries += 1;
            assert!(tries <= 50, "no connection refused past the cap");
            let mut s = TcpStream::connect(addr).await.unwrap();
            // Refused at once, the request may find the socket closed.
            let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await;
            let got = drain(&mut s).await;
            if got.is_empty() {
                break s;
            }
            assert!(got.starts_with("HTTP/1.0 200"), "{got}");
        };
        assert_eq!(drain(&mut extra).await, "");
        assert!(o.http_refused.load(Ordering::Relaxed) >= 1);
        // The idle ones are cut off at the header timeout, freeing the port.
        for s in &mut idle {
            assert!(!drain(s).await.starts_with("HTTP/1.0 200"));
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.unwrap();
        let got = drain(&mut s).await;
        assert!(
            got.starts_with("HTTP/1.0 200") && got.contains("ok:"),
            "{got}"
        );
        server.abort();
    }
}
