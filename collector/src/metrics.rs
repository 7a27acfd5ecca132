//! `/metrics`: the Prometheus exposition, rendered from the collector's own
//! state through a custom `prometheus::core::Collector` on each scrape,
//! instead of keeping a locked child per series.
//!
//! A reading the GPU did not report has no series (absent, not zero); a
//! stale GPU keeps its energy counter but loses its gauges.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, Registry, TextEncoder};

use crate::state::{AUTH_REASONS, AUTH_SURFACES, REJECT_REASONS, State, lock};

/// Every family this collector exports: (name, help, type).
const FAMILIES: &[(&str, &str, MetricType)] = &[
    (
        "capwatch_gpu_power_watts",
        "Board power draw of the GPU.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_gpu_energy_joules_total",
        "Energy used by the GPU since this collector first saw it.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_gpu_utilization_ratio",
        "Share of time a kernel ran on the GPU (0-1).",
        MetricType::GAUGE,
    ),
    (
        "capwatch_gpu_memory_utilization_ratio",
        "Share of time device memory was read or written (0-1).",
        MetricType::GAUGE,
    ),
    (
        "capwatch_gpu_memory_used_bytes",
        "Device memory in use.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_gpu_memory_total_bytes",
        "Device memory installed.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_gpu_temperature_celsius",
        "GPU core temperature.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_gpu_sm_clock_hertz",
        "Streaming multiprocessor clock.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_gpu_power_limit_watts",
        "Enforced board power limit.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_gpu_up",
        "1 while the GPU reports fresh readings, 0 when stale or lost.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_gpu_energy_counter_resets_total",
        "Times the GPU's energy counter went backwards (driver reload) or jumped implausibly far; those intervals are counted from power.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_node_up",
        "1 while samples arrive from the node's agent.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_node_power_watts",
        "Sum of the power of the node's fresh GPUs.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_node_samples_total",
        "Samples accepted from the node.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_node_last_sample_timestamp_seconds",
        "Timestamp of the newest sample accepted from the node.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_node_cpu_utilization_ratio",
        "Host CPU utilization (0-1).",
        MetricType::GAUGE,
    ),
    (
        "capwatch_node_memory_used_bytes",
        "Host memory in use.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_node_memory_total_bytes",
        "Host memory installed.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_tenant_power_watts",
        "Sum of the power of the tenant's fresh GPUs.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_tenant_contracted_power_watts",
        "Power the tenant contracted for.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_tenant_capacity_utilization_ratio",
        "Tenant power divided by contracted power.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_tenant_headroom_watts",
        "Contracted power minus tenant power (negative when over contract).",
        MetricType::GAUGE,
    ),
    (
        "capwatch_tenant_energy_joules_total",
        "Energy used by the tenant's GPUs.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_tenant_gpus",
        "The tenant's GPUs by state: reporting or stale.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_tenant_gpu_utilization_ratio",
        "Mean utilization of the tenant's fresh GPUs (0-1).",
        MetricType::GAUGE,
    ),
    (
        "capwatch_tenant_over_contract_seconds_total",
        "Time the tenant's power was above its contract.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_collector_agents_connected",
        "Agent streams open now.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_collector_nodes",
        "Nodes known to the collector.",
        MetricType::GAUGE,
    ),
    (
        "capwatch_collector_samples_total",
        "Samples received, by outcome (and reason, when rejected).",
        MetricType::COUNTER,
    ),
    (
        "capwatch_collector_streams_refused_total",
        "Agent streams refused at the Hello.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_collector_tenant_reloads_total",
        "Tenant file reloads, by result.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_collector_ledger_commits_total",
        "Ledger commits, by result; acks wait for a successful one.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_collector_ledger_commit_seconds_total",
        "Time spent writing successful ledger commits.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_collector_auth_refused_total",
        "Requests refused for who sent them, by surface (grpc, http) and reason.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_collector_ledger_compactions_total",
        "Ledger compactions (rollups and retention), by result.",
        MetricType::COUNTER,
    ),
    (
        "capwatch_collector_build_info",
        "Always 1; labels carry the version.",
        MetricType::GAUGE,
    ),
];

/// Renders the fleet from [`State`] on every scrape.
pub struct FleetCollector {
    state: Arc<State>,
    per_gpu: bool,
    descs: Vec<Desc>,
}

impl FleetCollector {
    pub fn new(state: Arc<State>, per_gpu: bool) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _)| {
                Desc::new((*name).into(), (*help).into(), Vec::new(), HashMap::new())
                    .expect("metric names in FAMILIES are valid")
            })
            .collect();
        Self {
            state,
            per_gpu,
            descs,
        }
    }
}

/// Collects series per family, in `FAMILIES` order.
struct Families(Vec<Vec<Metric>>);

impl Families {
    fn new() -> Self {
        Self(FAMILIES.iter().map(|_| Vec::new()).collect())
    }

    fn push(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let i = FAMILIES
            .iter()
            .position(|(n, _, _)| *n == name)
            .expect("every family pushed is listed in FAMILIES");
        let mut m = Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name((*k).to_string());
                    l.set_value((*v).to_string());
                    l
                })
                .collect(),
        );
        if FAMILIES[i].2 == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        self.0[i].push(m);
    }

    fn finish(self) -> Vec<MetricFamily> {
        self.0
            .into_iter()
            .zip(FAMILIES)
            .filter(|(metrics, _)| !metrics.is_empty())
            .map(|(metrics, (name, help, kind))| {
                let mut f = MetricFamily::default();
                f.set_name((*name).to_string());
                f.set_help((*help).to_string());
                f.set_field_type(*kind);
                f.set_metric(metrics);
                f
            })
            .collect()
    }
}

fn watts(mw: u64) -> f64 {
    mw as f64 / 1000.0
}

impl Collector for FleetCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = Instant::now();
        let state = &self.state;
        let tenants = state.tenants();
        let mut f = Families::new();
        let mut connected = 0u64;
        let nodes = state.nodes();
        for node in &nodes {
            let n = lock(node);
            let window = n.stale_window(state.config().stale_after);
            let node_labels = [("tenant", &*n.tenant), ("node", &*n.id)];
            let up = n
                .last_receipt
                .is_some_and(|t| now.saturating_duration_since(t) <= window);
            connected += u64::from(n.connected);
            f.push("capwatch_node_up", &node_labels, f64::from(u8::from(up)));
            f.push(
                "capwatch_node_samples_total",
                &node_labels,
                n.samples_accepted as f64,
            );
            if n.last_timestamp > 0 {
                f.push(
                    "capwatch_node_last_sample_timestamp_seconds",
                    &node_labels,
                    n.last_timestamp as f64 / 1e9,
                );
            }
            if let Some(h) = &n.host {
                if let Some(c) = h.cpu_utilization_ratio {
                    f.push("capwatch_node_cpu_utilization_ratio", &node_labels, c);
                }
                if let Some(m) = h.memory_used_bytes {
                    f.push("capwatch_node_memory_used_bytes", &node_labels, m as f64);
                }
                if let Some(m) = h.memory_total_bytes {
                    f.push("capwatch_node_memory_total_bytes", &node_labels, m as f64);
                }
            }
            let mut node_power = 0u64;
            for g in &n.gpus {
                let fresh = g.fresh(now, window);
                let reading = g.last.as_ref().filter(|_| fresh);
                node_power = node_power
                    .saturating_add(reading.and_then(|r| r.power_milliwatts).unwrap_or(0));
                if !self.per_gpu {
                    continue;
                }
                let labels = [
                    ("tenant", &*g.tenant),
                    ("node", &*n.id),
                    ("gpu", &*g.index_label),
                    ("uuid", &*g.uuid),
                    ("model", &*g.model),
                ];
                f.push("capwatch_gpu_up", &labels, f64::from(u8::from(fresh)));
                if g.last.is_some() {
                    f.push(
                        "capwatch_gpu_energy_joules_total",
                        &labels,
                        g.energy_millijoules as f64 / 1000.0,
                    );
                }
                if g.counter_resets > 0 {
                    f.push(
                        "capwatch_gpu_energy_counter_resets_total",
                        &labels,
                        g.counter_resets as f64,
                    );
                }
                if let Some(t) = g.memory_total_bytes {
                    f.push("capwatch_gpu_memory_total_bytes", &labels, t as f64);
                }
                let Some(r) = reading else { continue };
                let limit = r.power_limit_milliwatts.or(g.power_limit_milliwatts);
                if let Some(p) = r.power_milliwatts {
                    f.push("capwatch_gpu_power_watts", &labels, watts(p));
                }
                if let Some(u) = r.utilization_percent {
                    f.push(
                        "capwatch_gpu_utilization_ratio",
                        &labels,
                        f64::from(u) / 100.0,
                    );
                }
                if let Some(u) = r.memory_utilization_percent {
                    f.push(
                        "capwatch_gpu_memory_utilization_ratio",
                        &labels,
                        f64::from(u) / 100.0,
                    );
                }
                if let Some(m) = r.memory_used_bytes {
                    f.push("capwatch_gpu_memory_used_bytes", &labels, m as f64);
                }
                if let Some(t) = r.temperature_celsius {
                    f.push("capwatch_gpu_temperature_celsius", &labels, f64::from(t));
                }
                if let Some(c) = r.sm_clock_mhz {
                    f.push("capwatch_gpu_sm_clock_hertz", &labels, f64::from(c) * 1e6);
                }
                if let Some(l) = limit {
                    f.push("capwatch_gpu_power_limit_watts", &labels, watts(l));
                }
            }
            f.push("capwatch_node_power_watts", &node_labels, watts(node_power));
        }

        let live = state.tenant_power(&tenants, now);
        let totals = state.totals();
        for (t, l) in tenants.all().iter().zip(&live) {
            let labels = [("tenant", &*t.id)];
            let tot = totals.get(&t.id).cloned().unwrap_or_default();
            f.push(
                "capwatch_tenant_power_watts",
                &labels,
                watts(l.power_milliwatts),
            );
            f.push(
                "capwatch_tenant_energy_joules_total",
                &labels,
                tot.energy_millijoules as f64 / 1000.0,
            );
            f.push(
                "capwatch_tenant_gpus",
                &[("tenant", &*t.id), ("state", "reporting")],
                l.reporting as f64,
            );
            f.push(
                "capwatch_tenant_gpus",
                &[("tenant", &*t.id), ("state", "stale")],
                l.stale as f64,
            );
            if l.utilization_n > 0 {
                f.push(
                    "capwatch_tenant_gpu_utilization_ratio",
                    &labels,
                    l.utilization_sum as f64 / l.utilization_n as f64 / 100.0,
                );
            }
            // `unassigned` has no contract: no contract series for it.
            if t.contracted_milliwatts > 0 {
                let c = t.contracted_milliwatts;
                f.push("capwatch_tenant_contracted_power_watts", &labels, watts(c));
                f.push(
                    "capwatch_tenant_capacity_utilization_ratio",
                    &labels,
                    l.power_milliwatts as f64 / c as f64,
                );
                f.push(
                    "capwatch_tenant_headroom_watts",
                    &labels,
                    (c as f64 - l.power_milliwatts as f64) / 1000.0,
                );
                f.push(
                    "capwatch_tenant_over_contract_seconds_total",
                    &labels,
                    tot.over_contract_nanos as f64 / 1e9,
                );
            }
        }

        let c = &state.counters;
        f.push("capwatch_collector_agents_connected", &[], connected as f64);
        f.push("capwatch_collector_nodes", &[], nodes.len() as f64);
        f.push(
            "capwatch_collector_samples_total",
            &[("outcome", "accepted")],
            c.accepted.load(Ordering::Relaxed) as f64,
        );
        f.push(
            "capwatch_collector_samples_total",
            &[("outcome", "duplicate")],
            c.duplicate.load(Ordering::Relaxed) as f64,
        );
        for (reason, n) in REJECT_REASONS.iter().zip(&c.rejected) {
            f.push(
                "capwatch_collector_samples_total",
                &[("outcome", "rejected"), ("reason", reason.label())],
                n.load(Ordering::Relaxed) as f64,
            );
        }
        f.push(
            "capwatch_collector_streams_refused_total",
            &[],
            c.streams_refused.load(Ordering::Relaxed) as f64,
        );
        f.push(
            "capwatch_collector_tenant_reloads_total",
            &[("result", "success")],
            c.reloads_ok.load(Ordering::Relaxed) as f64,
        );
        f.push(
            "capwatch_collector_tenant_reloads_total",
            &[("result", "failure")],
            c.reloads_failed.load(Ordering::Relaxed) as f64,
        );
        f.push(
            "capwatch_collector_ledger_commits_total",
            &[("result", "success")],
            c.commits_ok.load(Ordering::Relaxed) as f64,
        );
        f.push(
            "capwatch_collector_ledger_commits_total",
            &[("result", "failure")],
            c.commits_failed.load(Ordering::Relaxed) as f64,
        );
        f.push(
            "capwatch_collector_ledger_commit_seconds_total",
            &[],
            c.commit_micros.load(Ordering::Relaxed) as f64 / 1e6,
        );
        for (surface, counts) in AUTH_SURFACES.iter().zip(&c.auth_refused) {
            for (reason, n) in AUTH_REASONS.iter().zip(counts) {
                f.push(
                    "capwatch_collector_auth_refused_total",
                    &[("surface", surface), ("reason", reason)],
                    n.load(Ordering::Relaxed) as f64,
                );
            }
        }
        f.push(
            "capwatch_collector_ledger_compactions_total",
            &[("result", "success")],
            c.compactions_ok.load(Ordering::Relaxed) as f64,
        );
        f.push(
            "capwatch_collector_ledger_compactions_total",
            &[("result", "failure")],
            c.compactions_failed.load(Ordering::Relaxed) as f64,
        );
        f.push(
            "capwatch_collector_build_info",
            &[("version", crate::VERSION)],
            1.0,
        );
        f.finish()
    }
}

/// The registry `/metrics` renders: the fleet plus anything registered later.
pub fn registry(state: Arc<State>, per_gpu: bool) -> Registry {
    let r = Registry::new();
    r.register(Box::new(FleetCollector::new(state, per_gpu)))
        .expect("a fresh registry accepts the fleet collector");
    r
}

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut buf = Vec::with_capacity(64 * 1024);
    TextEncoder::new().encode(&registry.gather(), &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}
