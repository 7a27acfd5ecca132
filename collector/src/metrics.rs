//! `/metrics`: the Prometheus exposition, rendered from the collector's own
//! state through a custom `prometheus::core::Collector` on each scrape,
//! instead of keeping a locked child per series.
//!
//! A reading the GPU did not report has no series (absent, not zero); a
//! stale GPU keeps its energy and resets counters, its memory total (from
//! its inventory) and `capwatch_gpu_up` 0, but loses its other gauges.

use std::collections::HashMap;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::edge::GpuHealth;
use crate::events::{ClaimReason, HistogramView, NodePowerReject, Reject, Surface};
use crate::state::State;

/// The exposition's content type.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4";

/// A family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every family this collector exports: (name, help, type).
pub const FAMILIES: &[(&str, &str, Kind)] = &[
    (
        "capwatch_gpu_power_watts",
        "Board power draw of the GPU.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_energy_joules_total",
        "Energy used by the GPU since this collector first saw it.",
        Kind::Counter,
    ),
    (
        "capwatch_gpu_utilization_ratio",
        "Share of time a kernel ran on the GPU (0-1).",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_memory_utilization_ratio",
        "Share of time device memory was read or written (0-1).",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_memory_used_bytes",
        "Device memory in use.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_memory_total_bytes",
        "Device memory installed.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_temperature_celsius",
        "GPU core temperature.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_sm_clock_hertz",
        "Streaming multiprocessor clock.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_power_limit_watts",
        "Enforced board power limit.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_up",
        "1 while the GPU reports fresh readings, 0 when stale or lost.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_info",
        "Always 1, for every GPU whose agent named any of them; labels carry what to join on besides the UUID: PCI bus id, board serial and driver version (empty when not given).",
        Kind::Gauge,
    ),
    // ---- MIG ----
    (
        "capwatch_gpu_mig_instance_info",
        "Always 1, for every MIG instance of a board in MIG mode (the board's own series stay per board); uuid is the instance's (MIG-...), parent_uuid the board's, gpu its board's position; tenant is the instance's lessee, else the board's.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_mig_energy_joules_total",
        "Energy of a MIG board apportioned to each part since this collector first heard it: each board delta split by GPU-instance slice share, exactly (the parts sum to the board's delta); uuid is the instance's, or the board's own for its slices in no instance.",
        Kind::Counter,
    ),
    // ---- end MIG ----
    (
        "capwatch_gpu_clock_event_reasons",
        "The GPU's clock-event (throttle) reasons as NVML's bitmask, as the agent sent it (the capwatch agent reads the bits up to 0x100, display clock setting).",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_clock_event_active",
        "1 while the reason holds the GPU's clocks (power cap, thermal slowdown, power brake, ...), else 0.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_power_violation_seconds_total",
        "Time the power cap held the GPU's clocks back since its driver loaded (NVML's violation counter).",
        Kind::Counter,
    ),
    (
        "capwatch_gpu_thermal_violation_seconds_total",
        "Time thermal limits held the GPU's clocks back since its driver loaded (NVML's violation counter).",
        Kind::Counter,
    ),
    (
        "capwatch_gpu_ecc_errors_total",
        "ECC errors by error (corrected, uncorrected) and counter (volatile: since the driver loaded; aggregate: over the board's life).",
        Kind::Counter,
    ),
    (
        "capwatch_gpu_retired_pages",
        "Memory pages retired, by cause (single_bit, double_bit ECC errors).",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_retired_pages_pending",
        "1 while a page retirement waits for the next driver reload.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_remapped_rows",
        "Memory rows remapped, by error (correctable, uncorrectable).",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_remapped_rows_pending",
        "1 while a row remap waits for a GPU reset.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_remapped_rows_failed",
        "1 when a row remap failed (the GPU needs service).",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_memory_temperature_celsius",
        "Device memory (HBM) temperature.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_memory_clock_hertz",
        "Device memory clock.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_encoder_utilization_ratio",
        "Share of time the video encoder was busy (0-1).",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_decoder_utilization_ratio",
        "Share of time the video decoder was busy (0-1).",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_pcie_replays_total",
        "PCIe replays since the driver loaded.",
        Kind::Counter,
    ),
    (
        "capwatch_gpu_pcie_throughput_bytes_per_second",
        "PCIe throughput over NVML's last 20 ms, by direction (tx, rx).",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_fan_speed_ratio",
        "Fan 0's speed as a share of its maximum (may exceed 1); absent on boards without a fan.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_power_instant_watts",
        "Board power at this instant (NVML field POWER_INSTANT); not what energy is billed from.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_power_average_watts",
        "Board power averaged over the last second (NVML field POWER_AVERAGE); not what energy is billed from.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_xid_errors_total",
        "XID critical errors by XID code, counted by the agent (NVML events), across its restarts when it keeps a counts file; absent where the GPU or driver delivers none.",
        Kind::Counter,
    ),
    (
        "capwatch_gpu_last_xid",
        "The code of the most recent XID error the agent counted.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_last_xid_timestamp_seconds",
        "When the agent received the most recent XID error (Unix time).",
        Kind::Gauge,
    ),
    // ---- NVLink ----
    (
        "capwatch_gpu_nvlink_active_links",
        "NVLink links in the active state; absent on GPUs without NVLink.",
        Kind::Gauge,
    ),
    (
        "capwatch_gpu_nvlink_errors_total",
        "NVLink data-link errors of each active link by type (replay, recovery, crc_flit, crc_data), as NVML counts them since the driver loaded or the counters were reset.",
        Kind::Counter,
    ),
    (
        "capwatch_gpu_nvlink_transmit_bytes_total",
        "Data each active NVLink link sent (NVML's data throughput counter, KiB, times 1024), since the driver loaded or the counters were reset.",
        Kind::Counter,
    ),
    (
        "capwatch_gpu_nvlink_receive_bytes_total",
        "Data each active NVLink link received (NVML's data throughput counter, KiB, times 1024), since the driver loaded or the counters were reset.",
        Kind::Counter,
    ),
    (
        "capwatch_gpu_energy_resets_total",
        "Times the GPU's energy counter went backwards (driver reload: the new value is counted) or jumped implausibly far (that interval is counted from power); kept across collector restarts.",
        Kind::Counter,
    ),
    (
        "capwatch_node_up",
        "1 while samples arrive from the node's agent.",
        Kind::Gauge,
    ),
    (
        "capwatch_node_power_watts",
        "Sum of the power of the node's fresh GPUs.",
        Kind::Gauge,
    ),
    (
        "capwatch_node_source_power_watts",
        "The last fresh reading of one of the node's power sources (domain node: the whole node, the BMC's reading; cpu and dram: RAPL zones, inside it).",
        Kind::Gauge,
    ),
    (
        "capwatch_node_source_energy_joules_total",
        "Energy measured by one of the node's power sources since this collector first saw it (kept across collector restarts).",
        Kind::Counter,
    ),
    (
        "capwatch_node_source_energy_resets_total",
        "Times a node power source's energy counter went backwards (a BMC reset: the new value is counted) or jumped implausibly far (that interval is counted from power); kept across collector restarts.",
        Kind::Counter,
    ),
    (
        "capwatch_node_samples_total",
        "Samples accepted from the node.",
        Kind::Counter,
    ),
    (
        "capwatch_node_last_sample_timestamp_seconds",
        "Timestamp of the newest sample accepted from the node.",
        Kind::Gauge,
    ),
    (
        "capwatch_node_cpu_utilization_ratio",
        "Host CPU utilization (0-1).",
        Kind::Gauge,
    ),
    (
        "capwatch_node_memory_used_bytes",
        "Host memory in use.",
        Kind::Gauge,
    ),
    (
        "capwatch_node_memory_total_bytes",
        "Host memory installed.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_power_watts",
        "Sum of the power of the tenant's fresh GPUs; absent while none is fresh (capwatch_tenant_reporting 0): no data, not 0 W.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_reporting",
        "1 while at least one of the tenant's GPUs is fresh, else 0 (all stale, or none known): its live power is then absent, not 0.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_node_power_watts",
        "The tenant's share of the live whole-node power of its nodes with a fresh whole-node reading (split as node energy is); absent when none has one.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_facility_power_watts",
        "Tenant node power times the tenant's PUE (an estimate of facility power); absent without a PUE or node power.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_basis_power_watts",
        "Tenant power on the basis its contract is measured on (gpu, node or facility).",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_contracted_power_watts",
        "Power the tenant contracted for.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_contract_basis",
        "1, labelled with the basis the tenant's contract is measured on (gpu, node or facility), for every tenant with a contract: what to join on when its basis power is absent.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_capacity_utilization_ratio",
        "Tenant power on its contract's basis divided by contracted power.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_headroom_watts",
        "Contracted power minus tenant power on its contract's basis (negative when over contract).",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_energy_joules_total",
        "Energy used by the tenant's GPUs.",
        Kind::Counter,
    ),
    (
        "capwatch_tenant_node_energy_joules_total",
        "The tenant's share of its nodes' whole-node energy, as the ledger holds it.",
        Kind::Counter,
    ),
    (
        "capwatch_tenant_gpus",
        "The tenant's GPUs by state: reporting or stale.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_gpu_utilization_ratio",
        "Mean utilization of the tenant's fresh GPUs whose readings carry one (0-1).",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_gpus_with_utilization",
        "The tenant's fresh GPUs whose readings carry a utilization (a board in MIG mode has none): what capwatch_tenant_gpu_utilization_ratio averages over.",
        Kind::Gauge,
    ),
    (
        "capwatch_tenant_over_contract_seconds_total",
        "Time in minutes whose average power, by sample time, was above the tenant's contract (60 s per minute).",
        Kind::Counter,
    ),
    (
        "capwatch_collector_agents_connected",
        "Agent streams open now.",
        Kind::Gauge,
    ),
    (
        "capwatch_collector_nodes",
        "Nodes known to the collector.",
        Kind::Gauge,
    ),
    (
        "capwatch_collector_samples_total",
        "Samples received, by outcome (and reason, when rejected).",
        Kind::Counter,
    ),
    (
        "capwatch_collector_gpu_health_dropped_total",
        "GPUs whose health readings (clock events, ECC, fan, memory temperature, instant power, XID counts, NVLink links, ...) were out of range or malformed in a sample: dropped, the sample and the GPU's power and energy kept.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_node_power_readings_total",
        "Node power readings received in accepted samples, by outcome (and reason, when rejected: the reading is dropped, its sample kept).",
        Kind::Counter,
    ),
    (
        "capwatch_collector_streams_refused_total",
        "Agent streams refused at the Hello.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_streams_shed_total",
        "Agent streams ended because ledger commits had failed for shed_streams_after (Hellos are refused meanwhile).",
        Kind::Counter,
    ),
    (
        "capwatch_collector_tenant_reloads_total",
        "Tenant file reloads, by result.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_ledger_commits_total",
        "Ledger commits, by result; acks wait for a successful one.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_nodes_fenced_total",
        "Nodes dropped from a ledger commit because another collector had claimed them since.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_ledger_commit_seconds_total",
        "Time spent writing successful ledger commits.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_ledger_commit_duration_seconds",
        "How long each successful ledger commit took.",
        Kind::Histogram,
    ),
    (
        "capwatch_collector_ledger_finalized_lag_seconds",
        "How far the ledger's watermark (finalized_through: minutes up to it are final) trails the wall clock; finalize_grace plus up to a quarter-hour while it moves. Absent until the watermark is read.",
        Kind::Gauge,
    ),
    (
        "capwatch_collector_ledger_pool_connections",
        "Connections of the PostgreSQL ledger's pool, by state (idle, busy); absent on SQLite.",
        Kind::Gauge,
    ),
    (
        "capwatch_collector_ledger_reconnects_total",
        "Connections to PostgreSQL opened to replace one the pool lost (a connection error, a read-only server, a failed check before reuse, ledger_connection_max_age); absent on SQLite.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_auth_refused_total",
        "Requests refused for who sent them, by surface (grpc, http) and reason.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_gpu_claims_refused_total",
        "Agent Hellos refused for a leased GPU the node may not report, by reason (lease_node, held_by_other_node).",
        Kind::Counter,
    ),
    (
        "capwatch_collector_mig_layouts_refused_total",
        "Boards whose MIG layout a Hello listed and the collector refused (the board metered whole, to its own UUID), by reason (board_sm_count, instance_sm_count, sms_beyond_board, duplicate_uuid, label, too_many, board_slice_count, instance_slice_count, slices_beyond_board, uuid_prefix); counted at each Hello.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_mig_readings_unsplit_total",
        "Readings of a MIG board stamped with a layout this collector never heard the board announce (taken before a layout change and delivered after this collector's restart or the node's move to it): the board's energy in them metered whole to its own UUID.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_ledger_compactions_total",
        "Ledger compactions (rollups and retention), by result.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_http_connections_open",
        "HTTP connections open now.",
        Kind::Gauge,
    ),
    (
        "capwatch_collector_http_connections_refused_total",
        "HTTP connections refused at accept, by reason (limit, accept_error).",
        Kind::Counter,
    ),
    (
        "capwatch_collector_http_connections_closed_total",
        "HTTP connections the collector closed, by reason (idle, header_timeout, write_timeout).",
        Kind::Counter,
    ),
    (
        "capwatch_collector_http_requests_total",
        "HTTP requests answered, by route (the route's template, or unmatched), method and status code.",
        Kind::Counter,
    ),
    (
        "capwatch_collector_http_request_duration_seconds",
        "How long HTTP requests took to answer (to the response's head), by route.",
        Kind::Histogram,
    ),
    (
        "capwatch_collector_build_info",
        "Always 1; labels carry the version and the source revision it was built from (unknown when built outside git).",
        Kind::Gauge,
    ),
    (
        "capwatch_collector_info",
        "Always 1; labels name the collector, its fencing holder (new at each start) and its ledger backend.",
        Kind::Gauge,
    ),
    (
        "capwatch_ledger_info",
        "Always 1; ledger_id names the ledger, new when it was created again, swapped or recovered.",
        Kind::Gauge,
    ),
    (
        "capwatch_ledger_created_timestamp_seconds",
        "When the ledger was created (Unix time).",
        Kind::Gauge,
    ),
    (
        "capwatch_meter_up",
        "1 while the facility meter's last poll gave a reading, else 0.",
        Kind::Gauge,
    ),
    (
        "capwatch_meter_polls_total",
        "Polls of the facility meter by outcome: ok, reset (its counter went down: nothing counted for that interval), timeout, error, exception, invalid.",
        Kind::Counter,
    ),
    (
        "capwatch_meter_power_watts",
        "The facility meter's power: its own reading, else its energy over the last interval.",
        Kind::Gauge,
    ),
    (
        "capwatch_meter_energy_joules_total",
        "Energy the facility meter counted since this collector started polling it.",
        Kind::Counter,
    ),
    (
        "capwatch_meter_allocated_energy_joules_total",
        "Metered energy of the meter-minutes this collector allocated to tenants (final minutes, at or before the watermark).",
        Kind::Counter,
    ),
    (
        "capwatch_meter_measured_energy_joules_total",
        "What the meter's nodes measured (node energy, else GPU energy) in the meter-minutes this collector allocated.",
        Kind::Counter,
    ),
    (
        "capwatch_meter_last_success_timestamp_seconds",
        "When the facility meter last gave a reading (Unix time).",
        Kind::Gauge,
    ),
    (
        "capwatch_meter_ratio_bound",
        "The configured bounds of metered / measured energy (min_ratio, max_ratio) outside which the meter drifts.",
        Kind::Gauge,
    ),
    (
        "capwatch_meter_nodes_connected",
        "Connected nodes the facility meter covers (0: its energy has no one to go to).",
        Kind::Gauge,
    ),
    (
        "capwatch_meter_allocated_through_timestamp_seconds",
        "The end of the last minute the meter's energy is allocated to tenants for, as the ledger keeps it (Unix time): behind the watermark while a node under it may still book energy into later minutes.",
        Kind::Gauge,
    ),
    (
        "capwatch_meter_allocation_holding_nodes",
        "Nodes under the meter whose power readings may still book energy into minutes the watermark has passed (a coarse whole-node counter not yet stepped): the meter's allocation waits for them.",
        Kind::Gauge,
    ),
    (
        "capwatch_meter_resplits_total",
        "Allocated minutes of the meter this collector split among its tenants again, because energy was booked for them after their split (a node's spool delivered late, a node back after a long gap).",
        Kind::Counter,
    ),
    (
        "capwatch_meter_nodes_overlapping",
        "Nodes with measured minutes in the last allocation round that this meter and another one both cover: billed once per meter; make the meters' node lists disjoint.",
        Kind::Gauge,
    ),
];

/// Which series levels `/metrics` carries besides tenants and the
/// collector's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detail {
    /// `capwatch_gpu_*`: about 40 series per GPU, and 109 more for the
    /// NVLinks of an SXM board.
    pub gpus: bool,
    /// `capwatch_node_*`: a few series per node.
    pub nodes: bool,
}

impl Detail {
    pub const ALL: Detail = Detail {
        gpus: true,
        nodes: true,
    };
}

/// Where series go: exposition text written directly for `/metrics`, or
/// (in tests and benches) the `prometheus` crate's types to compare with.
pub trait Sink {
    /// One series of family `fam` (an index into `FAMILIES`).
    fn series(&mut self, fam: usize, labels: &[(&str, &str)], value: f64);

    /// One histogram of family `fam` (a `Kind::Histogram`).
    fn histogram(&mut self, fam: usize, labels: &[(&str, &str)], h: &HistogramView);
}

/// The index of family `name` in `FAMILIES`.
fn family(name: &str) -> usize {
    static INDEX: std::sync::OnceLock<HashMap<&'static str, usize>> = std::sync::OnceLock::new();
    *INDEX
        .get_or_init(|| {
            FAMILIES
                .iter()
                .enumerate()
                .map(|(i, (n, _, _))| (*n, i))
                .collect()
        })
        .get(name)
        .expect("every family pushed is listed in FAMILIES")
}

/// Collects series per family, in `FAMILIES` order.
struct Families<'a>(&'a mut dyn Sink);

impl Families<'_> {
    fn push(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.series(family(name), labels, value);
    }

    /// A counter by `result`: `success` and `failure`.
    fn results(&mut self, name: &str, ok: &AtomicU64, failed: &AtomicU64) {
        for (result, n) in [("success", ok), ("failure", failed)] {
            self.push(
                name,
                &[("result", result)],
                n.load(Ordering::Relaxed) as f64,
            );
        }
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramView) {
        self.0.histogram(family(name), labels, h);
    }

    /// As `push`, with the family's index looked up beforehand (hot loops).
    fn push_at(&mut self, fam: usize, labels: &[(&str, &str)], value: f64) {
        self.0.series(fam, labels, value);
    }
}

/// Series written straight into exposition text, one buffer per family:
/// no per-series allocation, which is what makes a million series cheap.
struct TextSink(Vec<String>);

impl TextSink {
    fn new() -> Self {
        Self(FAMILIES.iter().map(|_| String::new()).collect())
    }

    fn finish(self) -> String {
        let len = self.0.iter().map(String::len).sum::<usize>() + FAMILIES.len() * 128;
        let mut out = String::with_capacity(len);
        for (body, (name, help, kind)) in self.0.iter().zip(FAMILIES) {
            if body.is_empty() {
                continue;
            }
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            push_escaped(&mut out, help, false);
            out.push_str("\n# TYPE ");
            out.push_str(name);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
            out.push_str(body);
        }
        out
    }
}

/// Appends `v` escaped as the exposition format wants: backslash and
/// newline always, double quotes inside label values.
fn push_escaped(out: &mut String, v: &str, quotes: bool) {
    if !v
        .bytes()
        .any(|b| b == b'\\' || b == b'\n' || (quotes && b == b'"'))
    {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Appends a sample value: integers without a fraction, other finite
/// values in Rust's shortest round-trip form, and the format's spellings
/// of infinities and NaN.
fn push_value(out: &mut String, v: f64) {
    use std::fmt::Write as _;
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 && !(v == 0.0 && v.is_sign_negative()) {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Appends one sample line: `name` + `suffix`, the labels (then `le`),
/// the value.
fn push_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || le.is_some() {
        let mut sep = '{';
        for (k, v) in labels.iter().chain(le.map(|le| ("le", le)).iter()) {
            out.push(sep);
            out.push_str(k);
            out.push_str("=\"");
            push_escaped(out, v, true);
            out.push('"');
            sep = ',';
        }
        out.push('}');
    }
    out.push(' ');
    push_value(out, value);
    out.push('\n');
}

impl Sink for TextSink {
    fn series(&mut self, fam: usize, labels: &[(&str, &str)], value: f64) {
        push_sample(&mut self.0[fam], FAMILIES[fam].0, "", labels, None, value);
    }

    fn histogram(&mut self, fam: usize, labels: &[(&str, &str)], h: &HistogramView) {
        let out = &mut self.0[fam];
        let name = FAMILIES[fam].0;
        for (bound, n) in &h.buckets {
            let le = bound.to_string();
            push_sample(out, name, "_bucket", labels, Some(&le), *n as f64);
        }
        push_sample(out, name, "_bucket", labels, Some("+Inf"), h.count as f64);
        push_sample(out, name, "_sum", labels, None, h.sum);
        push_sample(out, name, "_count", labels, None, h.count as f64);
    }
}

fn watts(mw: u64) -> f64 {
    mw as f64 / 1000.0
}

/// NVML's clock-event reason bits and their `reason` label.
pub const CLOCK_EVENT_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// A GPU's labels with one more.
fn and<'a>(
    labels: &[(&'static str, &'a str); 5],
    extra: (&'static str, &'a str),
) -> [(&'static str, &'a str); 6] {
    let [a, b, c, d, e] = *labels;
    [a, b, c, d, e, extra]
}

/// The health series of one fresh GPU reading: each reading present has
/// its series, an absent one none.
fn push_health(f: &mut Families<'_>, labels: &[(&'static str, &str); 5], h: &GpuHealth) {
    let flag = |b: bool| f64::from(u8::from(b));
    if let Some(mask) = h.clock_event_reasons {
        f.push("capwatch_gpu_clock_event_reasons", labels, mask as f64);
        for (bit, reason) in CLOCK_EVENT_REASONS {
            f.push(
                "capwatch_gpu_clock_event_active",
                &and(labels, ("reason", reason)),
                flag(mask & bit != 0),
            );
        }
    }
    let seconds = |ns: u64| ns as f64 / 1e9;
    if let Some(ns) = h.power_violation_nanoseconds {
        f.push(
            "capwatch_gpu_power_violation_seconds_total",
            labels,
            seconds(ns),
        );
    }
    if let Some(ns) = h.thermal_violation_nanoseconds {
        f.push(
            "capwatch_gpu_thermal_violation_seconds_total",
            labels,
            seconds(ns),
        );
    }
    for (n, error, counter) in [
        (h.ecc_volatile_corrected, "corrected", "volatile"),
        (h.ecc_volatile_uncorrected, "uncorrected", "volatile"),
        (h.ecc_aggregate_corrected, "corrected", "aggregate"),
        (h.ecc_aggregate_uncorrected, "uncorrected", "aggregate"),
    ] {
        if let Some(n) = n {
            let [a, b, c, d, e] = *labels;
            f.push(
                "capwatch_gpu_ecc_errors_total",
                &[a, b, c, d, e, ("error", error), ("counter", counter)],
                n as f64,
            );
        }
    }
    for (n, cause) in [
        (h.retired_pages_single_bit, "single_bit"),
        (h.retired_pages_double_bit, "double_bit"),
    ] {
        if let Some(n) = n {
            f.push(
                "capwatch_gpu_retired_pages",
                &and(labels, ("cause", cause)),
                n as f64,
            );
        }
    }
    if let Some(p) = h.retired_pages_pending {
        f.push("capwatch_gpu_retired_pages_pending", labels, flag(p));
    }
    for (n, error) in [
        (h.remapped_rows_correctable, "correctable"),
        (h.remapped_rows_uncorrectable, "uncorrectable"),
    ] {
        if let Some(n) = n {
            f.push(
                "capwatch_gpu_remapped_rows",
                &and(labels, ("error", error)),
                n as f64,
            );
        }
    }
    if let Some(p) = h.remapped_rows_pending {
        f.push("capwatch_gpu_remapped_rows_pending", labels, flag(p));
    }
    if let Some(p) = h.remapped_rows_failed {
        f.push("capwatch_gpu_remapped_rows_failed", labels, flag(p));
    }
    if let Some(t) = h.memory_temperature_celsius {
        f.push(
            "capwatch_gpu_memory_temperature_celsius",
            labels,
            f64::from(t),
        );
    }
    if let Some(c) = h.memory_clock_mhz {
        f.push(
            "capwatch_gpu_memory_clock_hertz",
            labels,
            f64::from(c) * 1e6,
        );
    }
    if let Some(u) = h.encoder_utilization_percent {
        f.push(
            "capwatch_gpu_encoder_utilization_ratio",
            labels,
            f64::from(u) / 100.0,
        );
    }
    if let Some(u) = h.decoder_utilization_percent {
        f.push(
            "capwatch_gpu_decoder_utilization_ratio",
            labels,
            f64::from(u) / 100.0,
        );
    }
    if let Some(n) = h.pcie_replays {
        f.push("capwatch_gpu_pcie_replays_total", labels, n as f64);
    }
    // NVML's KB/s are KiB/s.
    for (kb, direction) in [
        (h.pcie_tx_kilobytes_per_second, "tx"),
        (h.pcie_rx_kilobytes_per_second, "rx"),
    ] {
        if let Some(kb) = kb {
            f.push(
                "capwatch_gpu_pcie_throughput_bytes_per_second",
                &and(labels, ("direction", direction)),
                f64::from(kb) * 1024.0,
            );
        }
    }
    if let Some(p) = h.fan_speed_percent {
        f.push("capwatch_gpu_fan_speed_ratio", labels, f64::from(p) / 100.0);
    }
    if let Some(mw) = h.power_instant_milliwatts {
        f.push("capwatch_gpu_power_instant_watts", labels, watts(mw));
    }
    if let Some(mw) = h.power_average_milliwatts {
        f.push("capwatch_gpu_power_average_watts", labels, watts(mw));
    }
    for (code, n) in &h.xid_errors {
        let code = code.to_string();
        f.push(
            "capwatch_gpu_xid_errors_total",
            &and(labels, ("xid", &code)),
            *n as f64,
        );
    }
    if let Some((code, at)) = h.last_xid {
        f.push("capwatch_gpu_last_xid", labels, f64::from(code));
        f.push(
            "capwatch_gpu_last_xid_timestamp_seconds",
            labels,
            at as f64 / 1e9,
        );
    }
    // ---- NVLink ----
    if let Some(n) = h.nvlink_active_links {
        f.push("capwatch_gpu_nvlink_active_links", labels, f64::from(n));
    }
    for l in &h.nvlinks {
        let link = l.link.to_string();
        for (n, kind) in [
            (l.replay, "replay"),
            (l.recovery, "recovery"),
            (l.crc_flit, "crc_flit"),
            (l.crc_data, "crc_data"),
        ] {
            if let Some(n) = n {
                let [a, b, c, d, e] = *labels;
                f.push(
                    "capwatch_gpu_nvlink_errors_total",
                    &[a, b, c, d, e, ("link", &link), ("type", kind)],
                    n as f64,
                );
            }
        }
        for (bytes, family) in [
            (l.transmit_bytes, "capwatch_gpu_nvlink_transmit_bytes_total"),
            (l.receive_bytes, "capwatch_gpu_nvlink_receive_bytes_total"),
        ] {
            if let Some(n) = bytes {
                let [a, b, c, d, e] = *labels;
                f.push(family, &[a, b, c, d, e, ("link", &link)], n as f64);
            }
        }
    }
}

/// The text exposition of the fleet, written directly (what `/metrics`
/// serves).
pub fn render_text(state: &State, detail: Detail) -> String {
    let mut sink = TextSink::new();
    collect_fleet(state, detail, &mut Families(&mut sink));
    sink.finish()
}

/// What `/metrics` serves: the fleet's exposition, then on Linux the
/// process's standard `process_*` series (CPU seconds, resident and
/// virtual memory, open and most descriptors, threads, start time), from
/// the `prometheus` crate's process collector.
pub fn render_scrape(state: &State, detail: Detail) -> String {
    #[allow(unused_mut)] // appended to on Linux only
    let mut text = render_text(state, detail);
    #[cfg(target_os = "linux")]
    process::append(&mut text);
    text
}

#[cfg(target_os = "linux")]
mod process {
    use std::sync::OnceLock;

    use prometheus::core::Collector;
    use prometheus::process_collector::ProcessCollector;

    /// Appends the process's series to `out`. One collector for the
    /// process's life: it keeps the CPU time it last reported, for its
    /// counter. A figure `/proc` does not give has no series.
    pub(super) fn append(out: &mut String) {
        static PROCESS: OnceLock<ProcessCollector> = OnceLock::new();
        let families = PROCESS.get_or_init(ProcessCollector::for_self).collect();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, out) {
            tracing::warn!(error = %e, "rendering the process metrics failed; /metrics goes without them");
        }
    }
}

/// Counts and times every HTTP request by its route's template (axum's
/// `MatchedPath`, `unmatched` for none: never the request's path, so
/// the label's values are bounded by the router), method and status.
/// The outermost layer of the router, so that timeouts are counted too.
pub async fn track_requests(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<State>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = req.method().clone();
    let started = Instant::now();
    let response = next.run(req).await;
    state.counters.http_requests.observe(
        route.as_deref().unwrap_or(crate::events::UNMATCHED_ROUTE),
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Every series of the fleet, from `state`, into `sink`, family by family
/// in `FAMILIES` order of first use.
pub fn collect_into(state: &State, detail: Detail, sink: &mut dyn Sink) {
    collect_fleet(state, detail, &mut Families(sink));
}

/// Every series of the fleet, from `state`, into `f`.
fn collect_fleet(state: &State, detail: Detail, f: &mut Families<'_>) {
    let per_gpu = detail.gpus;
    let now = Instant::now();
    let tenants = state.tenants();
    let gpu_up = family("capwatch_gpu_up");
    let gpu_energy = family("capwatch_gpu_energy_joules_total");
    let gpu_resets = family("capwatch_gpu_energy_resets_total");
    let gpu_mem_total = family("capwatch_gpu_memory_total_bytes");
    let gpu_power = family("capwatch_gpu_power_watts");
    let gpu_util = family("capwatch_gpu_utilization_ratio");
    let gpu_mem_util = family("capwatch_gpu_memory_utilization_ratio");
    let gpu_mem_used = family("capwatch_gpu_memory_used_bytes");
    let gpu_temp = family("capwatch_gpu_temperature_celsius");
    let gpu_clock = family("capwatch_gpu_sm_clock_hertz");
    let gpu_limit = family("capwatch_gpu_power_limit_watts");
    let gpu_info = family("capwatch_gpu_info");
    let mig_info = family("capwatch_gpu_mig_instance_info");
    let mig_energy = family("capwatch_gpu_mig_energy_joules_total");
    // Tenant level only: nothing to say per node.
    if detail.nodes || per_gpu {
        state.for_each_node(|n| {
            let node_labels = [("tenant", n.tenant()), ("node", n.id())];
            let up = n.up(now);
            if detail.nodes {
                f.push("capwatch_node_up", &node_labels, f64::from(u8::from(up)));
                f.push(
                    "capwatch_node_samples_total",
                    &node_labels,
                    n.samples_accepted() as f64,
                );
                if let Some(t) = n.last_sample_unix_nanos() {
                    f.push(
                        "capwatch_node_last_sample_timestamp_seconds",
                        &node_labels,
                        t as f64 / 1e9,
                    );
                }
                if let Some(h) = n.host() {
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
            }
            if detail.nodes {
                let mut node_power = 0u64;
                n.live(now, |_, part| {
                    node_power = node_power.saturating_add(part.power_milliwatts);
                });
                f.push("capwatch_node_power_watts", &node_labels, watts(node_power));
                for p in n.power_sources() {
                    let Some(info) = p.info() else { continue };
                    let labels = [
                        ("tenant", n.tenant()),
                        ("node", n.id()),
                        ("source", info.kind.as_str()),
                        ("domain", info.domain.as_str()),
                        ("zone", info.name.as_str()),
                    ];
                    if let Some(mw) = p.power_milliwatts(now) {
                        f.push("capwatch_node_source_power_watts", &labels, watts(mw));
                    }
                    if let Some(mj) = p.energy_millijoules() {
                        f.push(
                            "capwatch_node_source_energy_joules_total",
                            &labels,
                            mj as f64 / 1000.0,
                        );
                    }
                    // From the first Hello on, 0 until a reset (as for GPUs).
                    f.push(
                        "capwatch_node_source_energy_resets_total",
                        &labels,
                        p.counter_resets() as f64,
                    );
                }
            }
            if !per_gpu {
                return;
            }
            for (index, g) in n.gpus().enumerate() {
                let fresh = g.fresh(now);
                let reading = g.last().filter(|_| fresh);
                // The GPU's position in its node's inventory.
                let index = index.to_string();
                let labels = [
                    ("tenant", g.tenant()),
                    ("node", n.id()),
                    ("gpu", index.as_str()),
                    ("uuid", g.uuid()),
                    ("model", g.model()),
                ];
                f.push_at(gpu_up, &labels, f64::from(u8::from(fresh)));
                if g.last().is_some() {
                    f.push_at(gpu_energy, &labels, g.energy_millijoules() as f64 / 1000.0);
                }
                // From the first Hello on, 0 until a reset: a counter that
                // appears only with its first increment hides that
                // increment from `increase()`.
                f.push_at(gpu_resets, &labels, g.counter_resets() as f64);
                if let Some(t) = g.memory_total_bytes() {
                    f.push_at(gpu_mem_total, &labels, t as f64);
                }
                if let Some(id) = g.identity() {
                    let [a, b, c, d, e] = labels;
                    f.push_at(
                        gpu_info,
                        &[
                            a,
                            b,
                            c,
                            d,
                            e,
                            ("pci_bus_id", id.pci_bus_id.as_deref().unwrap_or("")),
                            ("serial", id.serial.as_deref().unwrap_or("")),
                            ("driver_version", id.driver_version.as_deref().unwrap_or("")),
                        ],
                        1.0,
                    );
                }
                for part in g.mig_parts() {
                    let parent = [("parent_uuid", g.uuid())];
                    let base = [
                        ("tenant", part.tenant()),
                        ("node", n.id()),
                        ("gpu", index.as_str()),
                        ("uuid", part.uuid()),
                    ];
                    f.push_at(
                        mig_energy,
                        &[base[0], base[1], base[2], base[3], parent[0]],
                        part.energy_millijoules() as f64 / 1000.0,
                    );
                    if let Some(m) = part.instance() {
                        let (gi, ci) = (
                            m.gpu_instance_id.to_string(),
                            m.compute_instance_id.to_string(),
                        );
                        f.push_at(
                            mig_info,
                            &[
                                base[0],
                                base[1],
                                base[2],
                                base[3],
                                parent[0],
                                ("gpu_instance_id", gi.as_str()),
                                ("compute_instance_id", ci.as_str()),
                                ("profile", m.profile.as_str()),
                            ],
                            1.0,
                        );
                    }
                }
                let Some(r) = reading else { continue };
                if let Some(h) = r.health.as_deref() {
                    push_health(f, &labels, h);
                }
                let limit = r.power_limit_milliwatts.or(g.power_limit_milliwatts());
                if let Some(p) = r.power_milliwatts {
                    f.push_at(gpu_power, &labels, watts(p));
                }
                if let Some(u) = r.utilization_percent {
                    f.push_at(gpu_util, &labels, f64::from(u) / 100.0);
                }
                if let Some(u) = r.memory_utilization_percent {
                    f.push_at(gpu_mem_util, &labels, f64::from(u) / 100.0);
                }
                if let Some(m) = r.memory_used_bytes {
                    f.push_at(gpu_mem_used, &labels, m as f64);
                }
                if let Some(t) = r.temperature_celsius {
                    f.push_at(gpu_temp, &labels, f64::from(t));
                }
                if let Some(c) = r.sm_clock_mhz {
                    f.push_at(gpu_clock, &labels, f64::from(c) * 1e6);
                }
                if let Some(l) = limit {
                    f.push_at(gpu_limit, &labels, watts(l));
                }
            }
        });
    }

    let live = state.tenant_power(&tenants, now);
    let totals = state.totals();
    for (t, l) in tenants.all().iter().zip(&live) {
        let labels = [("tenant", &*t.id)];
        let tot = totals.get(&t.id).cloned().unwrap_or_default();
        // No fresh GPU: no data, which 0 W would pass for an idle tenant.
        let reporting = l.reporting > 0;
        f.push(
            "capwatch_tenant_reporting",
            &labels,
            f64::from(u8::from(reporting)),
        );
        if reporting {
            f.push(
                "capwatch_tenant_power_watts",
                &labels,
                watts(l.power_milliwatts),
            );
        }
        f.push(
            "capwatch_tenant_energy_joules_total",
            &labels,
            tot.energy_millijoules as f64 / 1000.0,
        );
        f.push(
            "capwatch_tenant_node_energy_joules_total",
            &labels,
            tot.node_energy_millijoules as f64 / 1000.0,
        );
        let node_mw = (l.node_reporting > 0).then_some(l.node_power_milliwatts);
        if let Some(mw) = node_mw {
            f.push("capwatch_tenant_node_power_watts", &labels, watts(mw));
        }
        let contract = t.contract();
        if let Some(mw) = contract.facility_power(node_mw, l.metered()) {
            f.push("capwatch_tenant_facility_power_watts", &labels, watts(mw));
        }
        // On the contract's basis; absent where that power is unknown.
        let gpu_mw = reporting.then_some(l.power_milliwatts);
        let basis_mw = contract
            .basis_power(l.power_milliwatts, node_mw, l.metered())
            .filter(|_| gpu_mw.is_some() || contract.basis.label() != "gpu");
        if let Some(mw) = basis_mw {
            f.push(
                "capwatch_tenant_basis_power_watts",
                &[("tenant", &*t.id), ("basis", contract.basis.label())],
                watts(mw),
            );
        }
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
        // The weight of the mean over collectors: GPUs without a
        // utilization (MIG) are in `reporting` but not in the mean.
        f.push(
            "capwatch_tenant_gpus_with_utilization",
            &labels,
            l.utilization_n as f64,
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
                "capwatch_tenant_contract_basis",
                &[("tenant", &*t.id), ("basis", contract.basis.label())],
                1.0,
            );
            if let Some(mw) = basis_mw {
                f.push(
                    "capwatch_tenant_capacity_utilization_ratio",
                    &labels,
                    mw as f64 / c as f64,
                );
                f.push(
                    "capwatch_tenant_headroom_watts",
                    &labels,
                    (c as f64 - mw as f64) / 1000.0,
                );
            }
            f.push(
                "capwatch_tenant_over_contract_seconds_total",
                &labels,
                tot.over_contract_nanos as f64 / 1e9,
            );
        }
    }

    let c = &state.counters;
    f.push(
        "capwatch_collector_agents_connected",
        &[],
        state.connected() as f64,
    );
    f.push("capwatch_collector_nodes", &[], state.node_count() as f64);
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
    for reason in Reject::ALL {
        f.push(
            "capwatch_collector_samples_total",
            &[("outcome", "rejected"), ("reason", reason.label())],
            c.rejected(reason) as f64,
        );
    }
    f.push(
        "capwatch_collector_node_power_readings_total",
        &[("outcome", "accepted")],
        c.node_power_accepted.load(Ordering::Relaxed) as f64,
    );
    f.push(
        "capwatch_collector_node_power_readings_total",
        &[("outcome", "duplicate")],
        c.node_power_duplicate.load(Ordering::Relaxed) as f64,
    );
    for reason in NodePowerReject::ALL {
        f.push(
            "capwatch_collector_node_power_readings_total",
            &[("outcome", "rejected"), ("reason", reason.label())],
            c.node_power_rejected(reason) as f64,
        );
    }
    f.push(
        "capwatch_collector_gpu_health_dropped_total",
        &[],
        c.gpu_health_dropped.load(Ordering::Relaxed) as f64,
    );
    f.push(
        "capwatch_collector_streams_refused_total",
        &[],
        c.streams_refused.load(Ordering::Relaxed) as f64,
    );
    f.push(
        "capwatch_collector_streams_shed_total",
        &[],
        c.streams_shed.load(Ordering::Relaxed) as f64,
    );
    f.results(
        "capwatch_collector_tenant_reloads_total",
        &c.reloads_ok,
        &c.reloads_failed,
    );
    f.results(
        "capwatch_collector_ledger_commits_total",
        &c.commits_ok,
        &c.commits_failed,
    );
    f.push(
        "capwatch_collector_nodes_fenced_total",
        &[],
        c.nodes_fenced.load(Ordering::Relaxed) as f64,
    );
    f.push(
        "capwatch_collector_ledger_commit_seconds_total",
        &[],
        c.commit_micros.load(Ordering::Relaxed) as f64 / 1e6,
    );
    f.histogram(
        "capwatch_collector_ledger_commit_duration_seconds",
        &[],
        &c.commit_seconds.view(),
    );
    let watermark = c.finalized_through.load(Ordering::Relaxed);
    if watermark > 0 {
        f.push(
            "capwatch_collector_ledger_finalized_lag_seconds",
            &[],
            (crate::sync::now_unix() - watermark) as f64,
        );
    }
    if let Some(pool) = state.ledger_pool() {
        let (idle, busy) = pool.connections();
        for (label, n) in [("idle", idle), ("busy", busy)] {
            f.push(
                "capwatch_collector_ledger_pool_connections",
                &[("state", label)],
                n as f64,
            );
        }
        f.push(
            "capwatch_collector_ledger_reconnects_total",
            &[],
            pool.reconnects() as f64,
        );
    }
    for surface in Surface::ALL {
        for reason in crate::events::AuthReason::ALL {
            let n = c.auth_refused(surface, reason);
            // A reason the surface never refuses for has no series (it
            // could never move), unless it moved all the same.
            if surface.reasons().contains(&reason) || n > 0 {
                f.push(
                    "capwatch_collector_auth_refused_total",
                    &[("surface", surface.label()), ("reason", reason.label())],
                    n as f64,
                );
            }
        }
    }
    for reason in ClaimReason::ALL {
        f.push(
            "capwatch_collector_gpu_claims_refused_total",
            &[("reason", reason.label())],
            c.gpu_claims_refused(reason) as f64,
        );
    }
    for reason in crate::events::MigRefusal::ALL {
        f.push(
            "capwatch_collector_mig_layouts_refused_total",
            &[("reason", reason.label())],
            c.mig_layouts_refused(reason) as f64,
        );
    }
    f.push(
        "capwatch_collector_mig_readings_unsplit_total",
        &[],
        c.mig_readings_unsplit.load(Ordering::Relaxed) as f64,
    );
    f.results(
        "capwatch_collector_ledger_compactions_total",
        &c.compactions_ok,
        &c.compactions_failed,
    );
    f.push(
        "capwatch_collector_http_connections_open",
        &[],
        c.http_open.load(Ordering::Relaxed) as f64,
    );
    for (reason, n) in crate::serve::HTTP_REFUSALS.iter().zip(&c.http_refused) {
        f.push(
            "capwatch_collector_http_connections_refused_total",
            &[("reason", reason)],
            n.load(Ordering::Relaxed) as f64,
        );
    }
    for (reason, n) in crate::serve::HTTP_CLOSES.iter().zip(&c.http_closed) {
        f.push(
            "capwatch_collector_http_connections_closed_total",
            &[("reason", reason)],
            n.load(Ordering::Relaxed) as f64,
        );
    }
    for route in c.http_requests.view() {
        for (method, status, n) in &route.counts {
            let code = status.to_string();
            f.push(
                "capwatch_collector_http_requests_total",
                &[("route", &route.route), ("method", method), ("code", &code)],
                *n as f64,
            );
        }
        f.histogram(
            "capwatch_collector_http_request_duration_seconds",
            &[("route", &route.route)],
            &route.duration,
        );
    }
    f.push(
        "capwatch_collector_build_info",
        &[("version", crate::VERSION), ("revision", crate::REVISION)],
        1.0,
    );
    if let Some(info) = state.collector_info() {
        f.push(
            "capwatch_collector_info",
            &[
                ("collector_id", &info.collector_id),
                ("holder", &info.holder),
                ("ledger_backend", info.ledger_backend),
            ],
            1.0,
        );
    }
    if let Some(id) = state.ledger_identity() {
        f.push("capwatch_ledger_info", &[("ledger_id", &id.ledger_id)], 1.0);
        f.push(
            "capwatch_ledger_created_timestamp_seconds",
            &[],
            id.created_at as f64,
        );
    }
    if let Some(board) = state.meters() {
        collect_meters(board, f);
    }
}

/// Every facility meter's figures. A figure the meter has not given (no
/// reading yet, no power while it is down) has no series.
fn collect_meters(board: &crate::meters::Board, f: &mut Families<'_>) {
    use crate::meters::Outcome;
    for m in &board.meters {
        let id = m.spec.id.as_str();
        let meter = [("meter", id)];
        let live = crate::sync::lock(&m.live);
        f.push("capwatch_meter_up", &meter, if live.up { 1.0 } else { 0.0 });
        for o in Outcome::ALL {
            f.push(
                "capwatch_meter_polls_total",
                &[("meter", id), ("outcome", o.label())],
                live.polls_of(o) as f64,
            );
        }
        if let Some(mw) = live.power_mw {
            f.push("capwatch_meter_power_watts", &meter, watts(mw));
        }
        f.push(
            "capwatch_meter_energy_joules_total",
            &meter,
            live.energy_mj as f64 / 1000.0,
        );
        f.push(
            "capwatch_meter_allocated_energy_joules_total",
            &meter,
            live.allocated_mj as f64 / 1000.0,
        );
        f.push(
            "capwatch_meter_measured_energy_joules_total",
            &meter,
            live.measured_mj as f64 / 1000.0,
        );
        if let Some(ns) = live.last_success_ns {
            f.push(
                "capwatch_meter_last_success_timestamp_seconds",
                &meter,
                ns as f64 / 1e9,
            );
        }
        f.push(
            "capwatch_meter_nodes_connected",
            &meter,
            live.nodes_connected as f64,
        );
        f.push(
            "capwatch_meter_nodes_overlapping",
            &meter,
            live.nodes_overlapping as f64,
        );
        if let Some(t) = live.allocated_through {
            f.push(
                "capwatch_meter_allocated_through_timestamp_seconds",
                &meter,
                t as f64,
            );
        }
        f.push(
            "capwatch_meter_allocation_holding_nodes",
            &meter,
            live.holding_nodes as f64,
        );
        f.push(
            "capwatch_meter_resplits_total",
            &meter,
            live.minutes_split_again as f64,
        );
        for (bound, v) in [("min", m.spec.min_ratio), ("max", m.spec.max_ratio)] {
            f.push(
                "capwatch_meter_ratio_bound",
                &[("meter", id), ("bound", bound)],
                v,
            );
        }
    }
}

#[cfg(test)]
mod reference;

#[cfg(test)]
mod tests {
    use super::reference::{registry, render};
    use super::*;
    use crate::edge::{
        GpuIdentity, GpuReading, NodePowerReading, NodePowerSource, NodeSample, NvLinkErrors,
    };
    use crate::state::{GpuInfo, Hello, StateConfig};
    use crate::tenants::Tenants;
    use std::sync::Arc;
    use std::time::Duration;

    /// A fleet with tenants, a node whose id needs escaping, GPUs with and
    /// without every reading, and a stale node.
    /// Every health reading, in NVML units, on sample `seq`.
    fn full_health(seq: u64) -> GpuHealth {
        GpuHealth {
            clock_event_reasons: Some(0x44 | 0x1000),
            power_violation_nanoseconds: Some(123_456_789_012 * seq),
            thermal_violation_nanoseconds: Some(987_654_321),
            ecc_volatile_corrected: Some(17),
            ecc_volatile_uncorrected: Some(2),
            ecc_aggregate_corrected: Some(1234),
            ecc_aggregate_uncorrected: Some(5),
            retired_pages_single_bit: Some(3),
            retired_pages_double_bit: Some(1),
            retired_pages_pending: Some(true),
            remapped_rows_correctable: Some(4),
            remapped_rows_uncorrectable: Some(0),
            remapped_rows_pending: Some(false),
            remapped_rows_failed: Some(true),
            memory_temperature_celsius: Some(78),
            memory_clock_mhz: Some(2619),
            encoder_utilization_percent: Some(11),
            decoder_utilization_percent: Some(23),
            pcie_replays: Some(42),
            pcie_tx_kilobytes_per_second: Some(123_456),
            pcie_rx_kilobytes_per_second: Some(654_321),
            fan_speed_percent: Some(67),
            power_instant_milliwatts: Some(345_678),
            power_average_milliwatts: Some(311_111),
            xid_errors: vec![(48, 1), (79, 2)],
            last_xid: Some((79, 1_700_000_000_500_000_000)),
            // 2 of 18 links active; a count beyond 32 bits stays exact.
            nvlink_active_links: Some(2),
            nvlinks: vec![
                NvLinkErrors {
                    link: 3,
                    replay: Some(7),
                    recovery: Some(0),
                    crc_flit: Some((1 << 40) + 3),
                    crc_data: Some(4),
                    transmit_bytes: Some(1 << 53),
                    receive_bytes: Some(5_120),
                },
                NvLinkErrors {
                    link: 17,
                    replay: Some(17_001),
                    crc_data: None,
                    ..NvLinkErrors::default()
                },
            ],
        }
    }

    fn fleet() -> Arc<State> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.toml");
        std::fs::write(
            &path,
            "[[tenant]]\nid = \"lab-a\"\nname = \"Lab \\\"A\\\"\"\ncontracted_kw = 1.5\nnodes = [\"a-*\"]\nbasis = \"facility\"\npue = 1.25\n",
        )
        .unwrap();
        let state = Arc::new(State::new(
            StateConfig {
                stale_after: Some(Duration::from_secs(3600)),
                max_gpus_per_node: 64,
                max_clock_skew: Duration::from_secs(600),
                max_sample_age: Duration::from_secs(7 * 86_400),
            },
            Tenants::from_file(&path).unwrap(),
        ));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        for (node, full) in [("a-1", true), ("b \"quoted\" \\ node", false)] {
            let (h, _) = state
                .hello(Hello {
                    // a-1 has a BMC and a RAPL zone; the other node none.
                    node_power_sources: if full {
                        vec![
                            NodePowerSource {
                                kind: "redfish".into(),
                                domain: "node".into(),
                                name: "1".into(),
                                energy_counter_supported: true,
                                interval: Duration::from_secs(1),
                            },
                            NodePowerSource {
                                kind: "rapl".into(),
                                domain: "cpu".into(),
                                name: "package-0".into(),
                                energy_counter_supported: true,
                                interval: Duration::from_secs(1),
                            },
                        ]
                    } else {
                        Vec::new()
                    },
                    node_id: node.into(),
                    agent_version: "test".into(),
                    epoch: 1,
                    interval: Duration::from_secs(1),
                    gpus: (0..3)
                        .map(|g| GpuInfo {
                            uuid: format!("GPU-{node}-{g}"),
                            model: "H100 \"SXM\" \\ 80GB".into(),
                            power_limit_milliwatts: Some(700_000),
                            memory_total_bytes: full.then_some(80 << 30),
                            energy_counter_supported: true,
                            // a-1's GPU 0 names all three, GPU 1 only its bus.
                            identity: GpuIdentity {
                                pci_bus_id: full.then(|| format!("00000000:{:02X}:00.0", 0x18 + g)),
                                serial: (full && g == 0).then(|| "1654321098765".into()),
                                driver_version: (full && g == 0).then(|| "550.54.15".into()),
                            },
                            mig: Default::default(),
                            mig_layout: None,
                            earlier_mig: Vec::new(),
                        })
                        .collect(),
                })
                .unwrap();
            let samples = (1..=2u64)
                .map(|seq| NodeSample {
                    node_power: if full {
                        let ts = now - 3_000_000_000 + seq as i64 * 1_000_000_000;
                        vec![
                            NodePowerReading {
                                source: 0,
                                timestamp_unix_nanos: ts,
                                power_milliwatts: Some(1_000_000),
                                energy_millijoules: Some(5_000_000 + seq * 1_000_000),
                            },
                            NodePowerReading {
                                source: 1,
                                timestamp_unix_nanos: ts,
                                power_milliwatts: Some(200_000),
                                energy_millijoules: Some(seq * 200_000),
                            },
                        ]
                    } else {
                        Vec::new()
                    },
                    seq,
                    timestamp_unix_nanos: now - 3_000_000_000 + seq as i64 * 1_000_000_000,
                    gpus: (0..3)
                        .map(|g| GpuReading {
                            index: g,
                            power_milliwatts: Some(123_456 + u64::from(g)),
                            energy_millijoules: Some(1_000 + seq * 333_333),
                            utilization_percent: full.then_some(37),
                            memory_utilization_percent: Some(3),
                            memory_used_bytes: full.then_some(1 << 33),
                            temperature_celsius: Some(-5),
                            sm_clock_mhz: Some(1_980),
                            power_limit_milliwatts: None,
                            // a-1's GPU 0 reports every health reading.
                            health: (full && g == 0).then(|| Box::new(full_health(seq))),
                            lost: false,
                            mig_layout: None,
                        })
                        .collect(),
                    host: None,
                })
                .collect();
            state.ingest(&h, samples, Vec::new()).unwrap();
        }
        let c = &state.counters;
        c.commit_seconds.observe(Duration::from_millis(3));
        c.commit_seconds.observe(Duration::from_secs(30));
        c.http_requests.observe(
            "/v1/tenants/{id}/usage",
            "GET",
            200,
            Duration::from_micros(700),
        );
        c.http_requests.observe(
            crate::events::UNMATCHED_ROUTE,
            "BREW",
            404,
            Duration::from_millis(2),
        );
        state
    }

    /// Families sorted by name, samples sorted within each: the registry
    /// sorts both, the direct writer keeps the order it walks the state in.
    fn normalized(text: &str) -> Vec<Vec<String>> {
        let mut families: Vec<Vec<String>> = Vec::new();
        for line in text.lines() {
            if line.starts_with("# HELP ") || families.is_empty() {
                families.push(Vec::new());
            }
            families.last_mut().unwrap().push(line.to_string());
        }
        for f in &mut families {
            f[2..].sort();
        }
        families.sort();
        families
    }

    /// The series of `name` in `text`, without their values.
    fn series_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .map(|l| l.rsplit_once(' ').unwrap().0)
            .collect()
    }

    #[test]
    fn auth_refusals_have_series_only_for_what_a_surface_can_refuse() {
        // HTTP checks no node and no client certificate; gRPC has no
        // scopes: those series could never move.
        let state = fleet();
        let text = render_text(&state, Detail::ALL);
        let family = "capwatch_collector_auth_refused_total";
        assert_eq!(
            series_of(&text, family),
            [
                r#"capwatch_collector_auth_refused_total{surface="grpc",reason="unauthenticated"}"#,
                r#"capwatch_collector_auth_refused_total{surface="grpc",reason="node_not_allowed"}"#,
                r#"capwatch_collector_auth_refused_total{surface="grpc",reason="certificate"}"#,
                r#"capwatch_collector_auth_refused_total{surface="http",reason="unauthenticated"}"#,
                r#"capwatch_collector_auth_refused_total{surface="http",reason="forbidden"}"#,
            ]
        );
        // Were one counted all the same, it is shown, not hidden.
        crate::events::AuthRefused {
            surface: Surface::Http,
            reason: crate::events::AuthReason::Certificate,
            node: None,
        }
        .emit(&state.counters);
        let text = render_text(&state, Detail::ALL);
        assert!(
            text.contains(
                "capwatch_collector_auth_refused_total{surface=\"http\",reason=\"certificate\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn http_requests_are_labelled_by_route_method_and_code() {
        let state = fleet();
        let text = render_text(&state, Detail::ALL);
        assert_eq!(
            series_of(&text, "capwatch_collector_http_requests_total"),
            [
                r#"capwatch_collector_http_requests_total{route="/v1/tenants/{id}/usage",method="GET",code="200"}"#,
                // A method the collector does not know is `other`.
                r#"capwatch_collector_http_requests_total{route="unmatched",method="other",code="404"}"#,
            ]
        );
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("capwatch_collector_http_request_duration_seconds")
                    && l.contains("route=\"unmatched\"")
            })
            .collect();
        expect_test::expect![[r#"
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="0.001"} 0
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="0.0025"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="0.005"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="0.01"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="0.025"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="0.05"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="0.1"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="0.25"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="0.5"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="1"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="2.5"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="5"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="10"} 1
            capwatch_collector_http_request_duration_seconds_bucket{route="unmatched",le="+Inf"} 1
            capwatch_collector_http_request_duration_seconds_sum{route="unmatched"} 0.002
            capwatch_collector_http_request_duration_seconds_count{route="unmatched"} 1
        "#]]
        .assert_eq(&(lines.join("\n") + "\n"));
    }

    #[test]
    fn a_histogram_counts_each_duration_in_the_first_bucket_that_holds_it() {
        let h = crate::events::Histogram::default();
        // On a bound: in that bucket (`le` is "at most"); past the last
        // bound: only in +Inf.
        for ms in [1, 3, 20_000] {
            h.observe(Duration::from_millis(ms));
        }
        let v = h.view();
        let at = |bound: f64| v.buckets.iter().find(|(b, _)| *b == bound).unwrap().1;
        assert_eq!((at(0.001), at(0.0025), at(0.005), at(10.0)), (1, 1, 2, 2));
        assert_eq!(v.count, 3);
        assert!((v.sum - 20.004).abs() < 1e-9, "{}", v.sum);
    }

    #[test]
    fn direct_text_equals_the_prometheus_encoder() {
        // Invariant: the fast path writes line for line what the
        // `prometheus` crate's encoder writes for the same series.
        let state = fleet();
        for (gpus, nodes) in [(true, true), (false, true), (false, false)] {
            let detail = Detail { gpus, nodes };
            let per_gpu = gpus;
            let fast = render_text(&state, detail);
            let reference = render(&registry(state.clone(), detail)).unwrap();
            let (a, b) = (normalized(&fast), normalized(&reference));
            assert_eq!(a.len(), b.len(), "families, per_gpu = {per_gpu}");
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x, y, "per_gpu = {per_gpu}");
            }
            assert_eq!(
                fast.contains("node=\"b \\\"quoted\\\" \\\\ node\""),
                nodes,
                "{fast}"
            );
            assert_eq!(fast.contains("capwatch_gpu_power_watts"), per_gpu);
            assert_eq!(fast.contains("capwatch_node_power_watts"), nodes);
            assert!(fast.contains("capwatch_tenant_power_watts"));
        }
    }

    #[test]
    fn node_power_and_the_basis_are_exported() {
        let state = fleet();
        let text = render_text(&state, Detail::ALL);
        let has = |line: &str| text.lines().any(|l| l == line);
        // a-1's GPUs draw 370.4 W; its BMC reads 1000 W, all lab-a's (its
        // GPUs are), 1250 W at the facility with a PUE of 1.25.
        for line in [
            "capwatch_node_source_power_watts{tenant=\"lab-a\",node=\"a-1\",source=\"redfish\",domain=\"node\",zone=\"1\"} 1000",
            "capwatch_node_source_power_watts{tenant=\"lab-a\",node=\"a-1\",source=\"rapl\",domain=\"cpu\",zone=\"package-0\"} 200",
            "capwatch_node_source_energy_joules_total{tenant=\"lab-a\",node=\"a-1\",source=\"redfish\",domain=\"node\",zone=\"1\"} 1000",
            "capwatch_node_source_energy_resets_total{tenant=\"lab-a\",node=\"a-1\",source=\"redfish\",domain=\"node\",zone=\"1\"} 0",
            "capwatch_node_source_energy_resets_total{tenant=\"lab-a\",node=\"a-1\",source=\"rapl\",domain=\"cpu\",zone=\"package-0\"} 0",
            "capwatch_tenant_node_power_watts{tenant=\"lab-a\"} 1000",
            "capwatch_tenant_facility_power_watts{tenant=\"lab-a\"} 1250",
            "capwatch_tenant_basis_power_watts{tenant=\"lab-a\",basis=\"facility\"} 1250",
            "capwatch_tenant_capacity_utilization_ratio{tenant=\"lab-a\"} 0.8333333333333334",
            "capwatch_tenant_headroom_watts{tenant=\"lab-a\"} 250",
            "capwatch_collector_node_power_readings_total{outcome=\"accepted\"} 4",
            "capwatch_collector_node_power_readings_total{outcome=\"rejected\",reason=\"power\"} 0",
        ] {
            assert!(has(line), "{line} missing from\n{text}");
        }
        // A tenant without node readings has no node power (absent, not 0).
        assert!(!text.contains("capwatch_tenant_node_power_watts{tenant=\"unassigned\"}"));
    }

    /// Under a meter that is up and has a ratio, live facility power is
    /// node power times the meter's ratio, and the basis and capacity
    /// utilization follow; a meter down falls back to the PUE.
    #[test]
    fn facility_power_under_a_meter_takes_its_latest_ratio() {
        #[derive(serde::Deserialize)]
        struct File {
            meter: Vec<crate::meters::MeterConfig>,
        }
        let file: File = toml::from_str(
            "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"a-*\"]\naddress = \"127.0.0.1:502\"\n",
        )
        .unwrap();
        let board = Arc::new(crate::meters::Board::new(
            crate::meters::check(&file.meter).unwrap(),
        ));
        let state = fleet();
        state.set_meters(board.clone());
        let set = |up: bool, ratio: Option<u64>| {
            let mut live = crate::sync::lock(&board.meters[0].live);
            live.up = up;
            live.ratio_ppm = ratio;
        };
        let lines = |state: &State| {
            let text = render_text(state, Detail::ALL);
            [
                "capwatch_tenant_facility_power_watts{tenant=\"lab-a\"}",
                "capwatch_tenant_basis_power_watts{tenant=\"lab-a\",basis=\"facility\"}",
                "capwatch_tenant_capacity_utilization_ratio{tenant=\"lab-a\"}",
            ]
            .map(|name| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
                    .unwrap_or("absent")
                    .to_string()
            })
        };
        // Up, no minute allocated here yet: 1000 W × 1.25.
        set(true, None);
        assert_eq!(lines(&state), ["1250", "1250", "0.8333333333333334"]);
        // The latest minute's ratio, 1.4: 1400 W.
        set(true, Some(1_400_000));
        assert_eq!(lines(&state), ["1400", "1400", "0.9333333333333333"]);
        // Down: the ratio is not live any more.
        set(false, Some(1_400_000));
        assert_eq!(lines(&state), ["1250", "1250", "0.8333333333333334"]);
    }

    /// Invariant: health readings reach `/metrics` in base units (ns to
    /// seconds, MHz to hertz, KiB/s to bytes/s, % to ratios, mW to watts),
    /// each reading its own series, an absent one none; the identity is
    /// one info series, not labels on the others.
    #[test]
    fn health_readings_and_identity_are_exported_in_base_units() {
        let state = fleet();
        let text = render_text(&state, Detail::ALL);
        let gpu0 = r#"tenant="lab-a",node="a-1",gpu="0","#;
        let health: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(gpu0))
            .filter(|l| {
                FAMILIES[family("capwatch_gpu_info")
                    ..=family("capwatch_gpu_nvlink_receive_bytes_total")]
                    .iter()
                    .any(|(name, _, _)| l.starts_with(&format!("{name}{{")))
            })
            .collect();
        expect_test::expect![[r#"
            capwatch_gpu_info{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",pci_bus_id="00000000:18:00.0",serial="1654321098765",driver_version="550.54.15"} 1
            capwatch_gpu_clock_event_reasons{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 4164
            capwatch_gpu_clock_event_active{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",reason="gpu_idle"} 0
            capwatch_gpu_clock_event_active{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",reason="applications_clocks_setting"} 0
            capwatch_gpu_clock_event_active{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",reason="sw_power_cap"} 1
            capwatch_gpu_clock_event_active{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",reason="hw_slowdown"} 0
            capwatch_gpu_clock_event_active{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",reason="sync_boost"} 0
            capwatch_gpu_clock_event_active{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",reason="sw_thermal_slowdown"} 0
            capwatch_gpu_clock_event_active{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",reason="hw_thermal_slowdown"} 1
            capwatch_gpu_clock_event_active{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",reason="hw_power_brake_slowdown"} 0
            capwatch_gpu_clock_event_active{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",reason="display_clock_setting"} 0
            capwatch_gpu_power_violation_seconds_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 246.913578024
            capwatch_gpu_thermal_violation_seconds_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 0.987654321
            capwatch_gpu_ecc_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",error="corrected",counter="volatile"} 17
            capwatch_gpu_ecc_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",error="uncorrected",counter="volatile"} 2
            capwatch_gpu_ecc_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",error="corrected",counter="aggregate"} 1234
            capwatch_gpu_ecc_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",error="uncorrected",counter="aggregate"} 5
            capwatch_gpu_retired_pages{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",cause="single_bit"} 3
            capwatch_gpu_retired_pages{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",cause="double_bit"} 1
            capwatch_gpu_retired_pages_pending{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 1
            capwatch_gpu_remapped_rows{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",error="correctable"} 4
            capwatch_gpu_remapped_rows{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",error="uncorrectable"} 0
            capwatch_gpu_remapped_rows_pending{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 0
            capwatch_gpu_remapped_rows_failed{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 1
            capwatch_gpu_memory_temperature_celsius{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 78
            capwatch_gpu_memory_clock_hertz{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 2619000000
            capwatch_gpu_encoder_utilization_ratio{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 0.11
            capwatch_gpu_decoder_utilization_ratio{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 0.23
            capwatch_gpu_pcie_replays_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 42
            capwatch_gpu_pcie_throughput_bytes_per_second{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",direction="tx"} 126418944
            capwatch_gpu_pcie_throughput_bytes_per_second{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",direction="rx"} 670024704
            capwatch_gpu_fan_speed_ratio{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 0.67
            capwatch_gpu_power_instant_watts{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 345.678
            capwatch_gpu_power_average_watts{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 311.111
            capwatch_gpu_xid_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",xid="48"} 1
            capwatch_gpu_xid_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",xid="79"} 2
            capwatch_gpu_last_xid{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 79
            capwatch_gpu_last_xid_timestamp_seconds{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 1700000000.5
            capwatch_gpu_nvlink_active_links{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB"} 2
            capwatch_gpu_nvlink_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",link="3",type="replay"} 7
            capwatch_gpu_nvlink_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",link="3",type="recovery"} 0
            capwatch_gpu_nvlink_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",link="3",type="crc_flit"} 1099511627779
            capwatch_gpu_nvlink_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",link="3",type="crc_data"} 4
            capwatch_gpu_nvlink_errors_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",link="17",type="replay"} 17001
            capwatch_gpu_nvlink_transmit_bytes_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",link="3"} 9007199254740992
            capwatch_gpu_nvlink_receive_bytes_total{tenant="lab-a",node="a-1",gpu="0",uuid="GPU-a-1-0",model="H100 \"SXM\" \\ 80GB",link="3"} 5120
        "#]]
        .assert_eq(&(health.join("\n") + "\n"));
        // GPU 1 names its bus only and reports no health: no health series.
        assert!(text.contains(r#"capwatch_gpu_info{tenant="lab-a",node="a-1",gpu="1",uuid="GPU-a-1-1",model="H100 \"SXM\" \\ 80GB",pci_bus_id="00000000:19:00.0",serial="",driver_version=""} 1"#), "{text}");
        assert!(
            !text.contains(r#"capwatch_gpu_clock_event_reasons{tenant="lab-a",node="a-1",gpu="1""#)
        );
        // The other node's GPUs name nothing: no info series.
        assert!(!text.contains(r#"capwatch_gpu_info{tenant="unassigned""#));
        // Per-GPU series off: none of them.
        let text = render_text(
            &state,
            Detail {
                gpus: false,
                nodes: true,
            },
        );
        assert!(!text.contains("capwatch_gpu_info"));
        assert!(!text.contains("capwatch_gpu_ecc_errors_total"));
    }

    #[test]
    fn values_are_spelled_as_the_format_wants() {
        let cases: [(f64, &str); 8] = [
            (0.0, "0"),
            (650.0, "650"),
            (0.37, "0.37"),
            (123.457, "123.457"),
            (1e21, "1000000000000000000000"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ];
        for (v, want) in cases {
            let mut s = String::new();
            push_value(&mut s, v);
            assert_eq!(s, want, "{v}");
        }
    }
}
