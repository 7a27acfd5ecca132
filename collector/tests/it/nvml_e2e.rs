//! The real NVML code path end to end: the agent binary loads a stand-in
//! libnvidia-ml.so (built here from agent/tests/fake_nvml/fake_nvml.c)
//! through nvml-wrapper and streams to the collector binary.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

fn build_fake(dir: &Path, defines: &[&str]) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fake_nvml/fake_nvml.c");
    let lib = dir.join("libnvidia-ml.so.1");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .args(defines)
        .arg(&source)
        .output()
        .unwrap_or_else(|e| {
            panic!("building the stand-in NVML library needs a C compiler ({cc}): {e}")
        });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

/// Invariant: NVML's units (mW, mJ, ns, %, MHz, KB/s, bytes) reach
/// /metrics in base units unchanged in value; a GPU without an energy
/// counter is accounted by the exact integral of its power; a health
/// reading the GPU does not support has no series (a GPU without NVLink
/// has no NVLink series); the identity is one info series.
/// A collector whose one tenant, "lab" (0.4 kW), leases every
/// `gpu-node-*` node, with GPUs stale only after 5 minutes.
fn lab_collector(dir: &std::path::Path) -> Collector {
    Collector::start(
        dir,
        "[[tenant]]\nid = \"lab\"\ncontracted_kw = 0.4\nnodes = [\"gpu-node-*\"]\n",
        0,
        &["--stale-after", "5m"],
    )
}

#[test]
fn nvml_readings_reach_metrics_in_base_units() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake(
        dir.path(),
        &[
            "-DFAKE_GPU1_NO_ENERGY",
            "-DFAKE_GPU1_UNSUPPORTED=\"nvmlDeviceGetViolationStatus,NVML_FI_DEV_POWER_INSTANT\"",
            // GPU 0: 18 NVLink links, 4 and 17 up; GPU 1 has none.
            "-DFAKE_GPU0_NVLINKS=18",
            "-DFAKE_GPU0_NVLINK_ACTIVE=0x20010",
        ],
    );
    let collector = lab_collector(dir.path());
    let mut agent = Command::new(bin("capwatch-agent"))
        .args([
            "--source",
            "nvml",
            "--node-id",
            "gpu-node-1",
            "--interval",
            "100ms",
        ])
        .args(["--max-samples", "5", "--collector", &collector.endpoint()])
        .arg("--nvml-library")
        .arg(&lib)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut agent, Duration::from_secs(30));
    assert!(status.success(), "agent: {status}");

    let m = collector.metrics();
    let g0 = [
        ("node", "gpu-node-1"),
        ("gpu", "0"),
        ("tenant", "lab"),
        ("model", "NVIDIA H100 80GB HBM3"),
    ];
    // (metric, expected value) for GPU 0, from the fake's documented figures.
    let cases = [
        ("capwatch_gpu_power_watts", 312.345),
        ("capwatch_gpu_utilization_ratio", 0.87),
        ("capwatch_gpu_memory_utilization_ratio", 0.45),
        ("capwatch_gpu_memory_used_bytes", 12_884_901_888.0),
        ("capwatch_gpu_memory_total_bytes", 85_899_345_920.0),
        ("capwatch_gpu_temperature_celsius", 61.0),
        ("capwatch_gpu_sm_clock_hertz", 1.98e9),
        ("capwatch_gpu_power_limit_watts", 700.0),
        // Five samples, the counter rising 1000 mJ per read.
        ("capwatch_gpu_energy_joules_total", 4.0),
        // The health readings, from the fake's documented figures.
        ("capwatch_gpu_clock_event_reasons", 68.0),
        (
            "capwatch_gpu_power_violation_seconds_total",
            123.456_789_012,
        ),
        (
            "capwatch_gpu_thermal_violation_seconds_total",
            0.987_654_321,
        ),
        ("capwatch_gpu_retired_pages_pending", 1.0),
        ("capwatch_gpu_remapped_rows_pending", 1.0),
        ("capwatch_gpu_remapped_rows_failed", 0.0),
        ("capwatch_gpu_memory_temperature_celsius", 78.0),
        ("capwatch_gpu_memory_clock_hertz", 2.619e9),
        ("capwatch_gpu_encoder_utilization_ratio", 0.11),
        ("capwatch_gpu_decoder_utilization_ratio", 0.23),
        ("capwatch_gpu_pcie_replays_total", 42.0),
        ("capwatch_gpu_power_instant_watts", 345.678),
        ("capwatch_gpu_power_average_watts", 311.111),
    ];
    for (name, want) in cases {
        let got = m.one(name, &g0);
        assert!((got - want).abs() < 1e-9, "{name}: {got} != {want}");
    }
    // (metric, extra label, expected value) for GPU 0.
    let labelled = [
        (
            "capwatch_gpu_clock_event_active",
            ("reason", "sw_power_cap"),
            1.0,
        ),
        (
            "capwatch_gpu_clock_event_active",
            ("reason", "hw_thermal_slowdown"),
            1.0,
        ),
        (
            "capwatch_gpu_clock_event_active",
            ("reason", "gpu_idle"),
            0.0,
        ),
        (
            "capwatch_gpu_clock_event_active",
            ("reason", "hw_power_brake_slowdown"),
            0.0,
        ),
        ("capwatch_gpu_retired_pages", ("cause", "single_bit"), 3.0),
        ("capwatch_gpu_retired_pages", ("cause", "double_bit"), 1.0),
        ("capwatch_gpu_remapped_rows", ("error", "correctable"), 4.0),
        (
            "capwatch_gpu_remapped_rows",
            ("error", "uncorrectable"),
            1.0,
        ),
        (
            "capwatch_gpu_pcie_throughput_bytes_per_second",
            ("direction", "tx"),
            123_456.0 * 1024.0,
        ),
        (
            "capwatch_gpu_pcie_throughput_bytes_per_second",
            ("direction", "rx"),
            654_321.0 * 1024.0,
        ),
    ];
    for (name, label, want) in labelled {
        let mut labels = g0.to_vec();
        labels.push(label);
        let got = m.one(name, &labels);
        assert!(
            (got - want).abs() < 1e-9,
            "{name} {label:?}: {got} != {want}"
        );
    }
    for (error, counter, want) in [
        ("corrected", "volatile", 17.0),
        ("uncorrected", "volatile", 2.0),
        ("corrected", "aggregate", 1234.0),
        ("uncorrected", "aggregate", 5.0),
    ] {
        let mut labels = g0.to_vec();
        labels.extend([("error", error), ("counter", counter)]);
        assert_eq!(
            m.one("capwatch_gpu_ecc_errors_total", &labels),
            want,
            "{error} {counter}"
        );
    }
    // GPU 0 is an SXM board without a fan; GPU 1 has one, and neither
    // violation counter nor instant power (not supported there).
    let g1 = [("node", "gpu-node-1"), ("gpu", "1")];
    assert!(m.select("capwatch_gpu_fan_speed_ratio", &g0).is_empty());
    assert_eq!(m.one("capwatch_gpu_fan_speed_ratio", &g1), 0.67);
    for name in [
        "capwatch_gpu_power_violation_seconds_total",
        "capwatch_gpu_thermal_violation_seconds_total",
        "capwatch_gpu_power_instant_watts",
    ] {
        assert!(m.select(name, &g1).is_empty(), "{name} on GPU 1");
    }
    assert_eq!(m.one("capwatch_gpu_power_average_watts", &g1), 98.0);
    // ---- NVLink ----
    // The active links of 18, each active link's four counters as NVML
    // counts them (a count past 32 bits exact), none for the links that
    // are down and none at all for a GPU without NVLink.
    assert_eq!(m.one("capwatch_gpu_nvlink_active_links", &g0), 2.0);
    let nvlink = m.select("capwatch_gpu_nvlink_errors_total", &g0);
    let mut got: Vec<(String, String, f64)> = nvlink
        .iter()
        .map(|(l, v)| (l["link"].clone(), l["type"].clone(), *v))
        .collect();
    got.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut want = Vec::new();
    for link in [4u64, 17] {
        let base = 1000 * link;
        for (kind, n) in [
            ("crc_data", base + 4),
            ("crc_flit", (1 << 40) + base + 3),
            ("recovery", base + 2),
            ("replay", base + 1),
        ] {
            want.push((link.to_string(), kind.to_string(), n as f64));
        }
    }
    want.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(got, want);
    // And each active link's data sent and received, NVML's KiB as bytes
    // (past 2^43: exact in a float).
    for (family, kib) in [
        (
            "capwatch_gpu_nvlink_transmit_bytes_total",
            (|l: u64| (1u64 << 33) + 7000 * l) as fn(u64) -> u64,
        ),
        ("capwatch_gpu_nvlink_receive_bytes_total", |l| 9000 * l + 5),
    ] {
        let mut got: Vec<(String, f64)> = m
            .select(family, &g0)
            .iter()
            .map(|(l, v)| (l["link"].clone(), *v))
            .collect();
        got.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let want: Vec<(String, f64)> = [17u64, 4]
            .iter()
            .map(|&l| (l.to_string(), (kib(l) * 1024) as f64))
            .collect();
        assert_eq!(got, want, "{family}");
    }
    for name in [
        "capwatch_gpu_nvlink_active_links",
        "capwatch_gpu_nvlink_errors_total",
        "capwatch_gpu_nvlink_transmit_bytes_total",
        "capwatch_gpu_nvlink_receive_bytes_total",
    ] {
        assert!(m.select(name, &g1).is_empty(), "{name} on GPU 1");
    }
    // The identity: one info series per GPU, not labels on the others.
    let info = m.select("capwatch_gpu_info", &g0);
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].1, 1.0);
    assert_eq!(info[0].0["pci_bus_id"], "00000000:18:00.0");
    assert_eq!(info[0].0["serial"], "1654321098765");
    assert_eq!(info[0].0["driver_version"], "550.54.15");
    assert!(
        !m.select("capwatch_gpu_power_watts", &g0)[0]
            .0
            .contains_key("serial")
    );
    let uuid = &m.select("capwatch_gpu_power_watts", &g0)[0].0["uuid"];
    assert_eq!(uuid, "GPU-00000000-1111-2222-3333-444444444444");

    // GPU 1 has no counter: 98.765 W integrated over whole 100 ms ticks,
    // 9876.5 mJ each, floored only once.
    let e1 = milli(m.one(
        "capwatch_gpu_energy_joules_total",
        &[("node", "gpu-node-1"), ("gpu", "1")],
    ));
    let ticks = (e1 as f64 / 9876.5).round() as u64;
    // Five samples make four intervals; the agent may skip a late tick
    // (it reads real hardware on time or not at all), which lengthens one.
    assert!((4..=6).contains(&ticks), "{e1} mJ is {ticks} ticks");
    assert_eq!(e1, 98_765 * ticks / 10, "{ticks} ticks");
    assert_eq!(
        milli(m.one("capwatch_tenant_power_watts", &[("tenant", "lab")])),
        312_345 + 98_765
    );
    collector.stop();
}

/// Accepted samples, as the collector counts them.
fn accepted(collector: &Collector) -> f64 {
    collector
        .metrics()
        .select(
            "capwatch_collector_samples_total",
            &[("outcome", "accepted")],
        )
        .iter()
        .map(|(_, v)| v)
        .sum()
}

/// Invariant: an NVML call that hangs stalls only the GPU readings. While
/// it hangs the agent keeps sampling (the GPUs absent, never zero), the
/// collector keeps acking, the stall is counted and /healthz says so; when
/// it ends the next read is used again; SIGTERM during a hang stops the
/// agent within its drain deadline; and the energy the collector counted
/// is exactly what the fake's counters advanced between the first and the
/// last reading used.
#[test]
fn a_hung_nvml_call_stalls_neither_acks_nor_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let block = dir.path().join("nvml-block");
    let lib = build_fake(
        dir.path(),
        &[&format!("-DFAKE_BLOCK_FILE=\"{}\"", block.display())],
    );
    let collector = lab_collector(dir.path());
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "drain_timeout = \"2s\"\n").unwrap();
    let mut agent = Command::new(bin("capwatch-agent"))
        .arg("--config")
        .arg(&config)
        .args(["--source", "nvml", "--node-id", "gpu-node-stall"])
        .args(["--interval", "100ms", "--log-format", "json"])
        .args(["--collector", &collector.endpoint()])
        .arg("--nvml-library")
        .arg(&lib)
        .env("CAPWATCH_HTTP_LISTEN", "127.0.0.1:0")
        .env("CAPWATCH_HEALTH_MAX_UNDELIVERED", "1m")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::default();
    log.capture(agent.stderr.take().unwrap(), "agent".into());
    eventually(Duration::from_secs(20), "first samples accepted", || {
        accepted(&collector) >= 5.0
    });

    // Every power read hangs from now on (for ten minutes, far past the
    // test): samples keep coming, and the collector keeps acking them.
    std::fs::write(&block, "nvmlDeviceGetPowerUsage 600000").unwrap();
    let before = accepted(&collector);
    eventually(
        Duration::from_secs(15),
        "samples accepted while NVML hangs",
        || accepted(&collector) >= before + 20.0,
    );
    let listen = log.wait_for("agent HTTP port", Duration::from_secs(1));
    let addr: std::net::SocketAddr = json_field(&listen, "listen").unwrap().parse().unwrap();
    let agent_metrics = || Metrics::parse(&http_get(addr, "/metrics"));
    let gpu = [("reader", "gpu")];
    let m = agent_metrics();
    assert_eq!(m.one("capwatch_agent_hardware_stalls_total", &gpu), 1.0);
    assert_eq!(m.one("capwatch_agent_hardware_stalled", &gpu), 1.0);
    let acked = m.one("capwatch_agent_samples_acked_total", &[]);
    eventually(Duration::from_secs(15), "acks while NVML hangs", || {
        agent_metrics().one("capwatch_agent_samples_acked_total", &[]) >= acked + 10.0
    });
    let (status, body) = http_get_status(addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("stalled"), "{body}");
    assert_eq!(http_get_status(addr, "/livez").0, 200);
    log.wait_for("hardware read missed its deadline", Duration::from_secs(1));

    // The hang ends: reads are used again, and the agent is healthy.
    std::fs::remove_file(&block).unwrap();
    let reads = agent_metrics().one("capwatch_agent_hardware_reads_total", &gpu);
    eventually(Duration::from_secs(15), "reads after the hang", || {
        let m = agent_metrics();
        m.one("capwatch_agent_hardware_stalled", &gpu) == 0.0
            && m.one("capwatch_agent_hardware_reads_total", &gpu) >= reads + 5.0
    });
    assert_eq!(http_get_status(addr, "/healthz").0, 200);

    // A second hang, and SIGTERM during it: the agent drains and exits
    // within its drain deadline though a thread of it is stuck in NVML.
    std::fs::write(&block, "nvmlDeviceGetPowerUsage 600000").unwrap();
    eventually(Duration::from_secs(15), "the second stall", || {
        agent_metrics().one("capwatch_agent_hardware_stalls_total", &gpu) == 2.0
    });
    let asked = std::time::Instant::now();
    terminate(&agent);
    let status = wait_timeout(&mut agent, Duration::from_secs(30));
    let took = asked.elapsed();
    assert!(status.success(), "agent: {status}");
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    let summary = log.wait_for("agent stopped", Duration::from_secs(5));
    assert_eq!(json_number(&summary, "gpu_stalls"), 2, "{summary}");
    assert_eq!(json_number(&summary, "undelivered"), 0, "{summary}");
    // One late answer (the first hang's, dropped); the second hang never
    // answered. The fake's counters advance once per read that reached
    // them: the probe at open, the reads used, the late one. The first
    // read used is the collector's baseline.
    let late = json_number(&summary, "gpu_late_answers");
    assert_eq!(late, 1, "{summary}");
    let steps = json_number(&summary, "gpu_reads") + late - 1;
    let m = collector.metrics();
    for (gpu, step) in [("0", 1000), ("1", 250)] {
        let e = milli(m.one(
            "capwatch_gpu_energy_joules_total",
            &[("node", "gpu-node-stall"), ("gpu", gpu)],
        ));
        assert_eq!(e, step * steps, "GPU {gpu}: {steps} counter steps");
    }
    collector.stop();
}

/// Invariant: an XID error the driver reports reaches the collector's
/// /metrics under its GPU and code, counted once per event however many
/// samples carry it, with the last XID and its time; with a counts file,
/// the counter goes on across an agent restart, never below what it was.
#[test]
fn an_xid_error_reaches_metrics_counted_once_and_goes_on_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let xid = dir.path().join("nvml-xid");
    let lib = build_fake(
        dir.path(),
        &[&format!("-DFAKE_XID_FILE=\"{}\"", xid.display())],
    );
    let collector = lab_collector(dir.path());
    let counts_file = dir.path().join("xid-counts");
    let start_agent = || {
        Command::new(bin("capwatch-agent"))
            .args(["--source", "nvml", "--node-id", "gpu-node-xid"])
            .args(["--interval", "100ms", "--collector", &collector.endpoint()])
            .arg("--nvml-library")
            .arg(&lib)
            .env("CAPWATCH_NVML_XID_COUNTS_FILE", &counts_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut agent = start_agent();
    eventually(Duration::from_secs(20), "first samples accepted", || {
        accepted(&collector) >= 3.0
    });
    let g0 = [("node", "gpu-node-xid"), ("gpu", "0")];
    let g1 = [("node", "gpu-node-xid"), ("gpu", "1")];
    assert!(
        collector
            .metrics()
            .select("capwatch_gpu_xid_errors_total", &[])
            .is_empty()
    );
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    std::fs::write(&xid, "0 79\n0 79\n1 48\n").unwrap();
    let xid_count = |gpu: &[(&str, &str)], code: &str| {
        let mut labels = gpu.to_vec();
        labels.push(("xid", code));
        collector
            .metrics()
            .select("capwatch_gpu_xid_errors_total", &labels)
            .first()
            .map(|(_, v)| *v)
    };
    eventually(Duration::from_secs(20), "the XIDs in /metrics", || {
        xid_count(&g0, "79") == Some(2.0) && xid_count(&g1, "48") == Some(1.0)
    });
    // Many samples later, still counted once.
    let seen = accepted(&collector);
    eventually(Duration::from_secs(20), "more samples", || {
        accepted(&collector) >= seen + 10.0
    });
    let m = collector.metrics();
    assert_eq!(xid_count(&g0, "79"), Some(2.0));
    assert_eq!(xid_count(&g1, "48"), Some(1.0));
    assert_eq!(m.select("capwatch_gpu_xid_errors_total", &g0).len(), 1);
    assert_eq!(m.one("capwatch_gpu_last_xid", &g0), 79.0);
    assert_eq!(m.one("capwatch_gpu_last_xid", &g1), 48.0);
    let at = m.one("capwatch_gpu_last_xid_timestamp_seconds", &g0);
    assert!(
        at >= before.floor() && at < before + 60.0,
        "{at} vs {before}"
    );
    assert_eq!(
        m.one(
            "capwatch_gpu_xid_errors_total",
            &[("node", "gpu-node-xid"), ("gpu", "0"), ("tenant", "lab")]
        ),
        2.0
    );
    terminate(&agent);
    let status = wait_timeout(&mut agent, Duration::from_secs(30));
    assert!(status.success(), "agent: {status}");

    // The agent restarts (its stand-in NVML delivering the control file
    // afresh, so it is emptied first): the counts go on from the file.
    std::fs::write(&xid, "").unwrap();
    let seen = accepted(&collector);
    let mut agent = start_agent();
    let at_least = |gpu: &[(&str, &str)], code: &str, floor: f64| {
        let v = xid_count(gpu, code);
        assert!(v.is_none_or(|v| v >= floor), "{code}: {v:?} below {floor}");
        v
    };
    eventually(
        Duration::from_secs(20),
        "the restarted agent's samples",
        || {
            at_least(&g0, "79", 2.0);
            accepted(&collector) >= seen + 10.0
        },
    );
    eventually(Duration::from_secs(20), "the kept counts", || {
        at_least(&g0, "79", 2.0) == Some(2.0) && at_least(&g1, "48", 1.0) == Some(1.0)
    });
    std::fs::write(&xid, "0 79\n").unwrap();
    eventually(Duration::from_secs(20), "the next XID counted on", || {
        at_least(&g0, "79", 2.0) == Some(3.0)
    });
    assert_eq!(xid_count(&g1, "48"), Some(1.0));
    terminate(&agent);
    let status = wait_timeout(&mut agent, Duration::from_secs(30));
    assert!(status.success(), "agent: {status}");
    collector.stop();
}

// ---- MIG ----

/// The fake's layout 1 on GPU 0 (3g 42 SMs, 2g 28, 1g 14 of 98) and its
/// layout 2 (4g 56, 3g 42).
const MIG_1: [&str; 3] = [
    "MIG-11111111-0000-0000-0000-000000000001",
    "MIG-11111111-0000-0000-0000-000000000002",
    "MIG-11111111-0000-0000-0000-000000000003",
];
const MIG_2: [&str; 2] = [
    "MIG-22222222-0000-0000-0000-000000000001",
    "MIG-22222222-0000-0000-0000-000000000002",
];
const BOARD: &str = "GPU-00000000-1111-2222-3333-444444444444";

/// lab-a leases the 3g instance of layout 1 and the 4g of layout 2,
/// lab-b the 2g and the 3g; lab-c leases the node, so the 1g instance
/// (leased by no one), the board's slice in no instance and GPU 1 are its.
fn mig_tenants() -> String {
    format!(
        "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 1\ngpus = [\"{}\", \"{}\"]\n\n\
         [[tenant]]\nid = \"lab-b\"\ncontracted_kw = 1\ngpus = [\"{}\", \"{}\"]\n\n\
         [[tenant]]\nid = \"lab-c\"\ncontracted_kw = 1\nnodes = [\"gpu-node-*\"]\n",
        MIG_1[0], MIG_2[0], MIG_1[1], MIG_2[1]
    )
}

/// `tenant`'s rows in the ledger: the usage API's day rows around now.
fn ledger_day_rows(collector: &Collector, tenant: &str) -> Vec<serde_json::Value> {
    let day = now_secs().div_euclid(86_400) * 86_400;
    let rfc = capwatch_collector::usage::rfc3339;
    let path = format!(
        "/v1/tenants/{tenant}/usage?from={}&to={}&step=1d",
        rfc(day - 86_400),
        rfc(day + 2 * 86_400)
    );
    let mut v: serde_json::Value = serde_json::from_str(&http_get(collector.http, &path)).unwrap();
    v["rows"].as_array_mut().unwrap().drain(..).collect()
}

/// `tenant`'s energy in the ledger, to the millijoule.
fn ledger_energy(collector: &Collector, tenant: &str) -> u64 {
    energy_mj(&ledger_day_rows(collector, tenant))
}

/// `tenant`'s GPU hours, busy GPU hours and GPU hours of unknown
/// utilization in the ledger.
fn ledger_gpu_time(collector: &Collector, tenant: &str) -> (f64, f64, f64) {
    let rows = ledger_day_rows(collector, tenant);
    let sum = |field: &str| rows.iter().map(|r| r[field].as_f64().unwrap()).sum::<f64>();
    (
        sum("gpu_hours"),
        sum("busy_gpu_hours"),
        sum("busy_unknown_gpu_hours"),
    )
}

/// The MIG instances /metrics lists for the node's board 0, by UUID.
fn mig_instances(m: &Metrics) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut out: Vec<_> = m
        .select(
            "capwatch_gpu_mig_instance_info",
            &[("node", "gpu-node-mig"), ("gpu", "0")],
        )
        .into_iter()
        .map(|(labels, _)| labels.clone())
        .collect();
    out.sort_by(|a, b| a["uuid"].cmp(&b["uuid"]));
    out
}

/// Runs the MIG node's agent for `samples` samples, to its end.
fn run_mig_agent(lib: &Path, collector: &Collector, samples: u32) {
    let mut agent = mig_agent(lib, collector, &["--max-samples", &samples.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut agent, Duration::from_secs(30));
    assert!(status.success(), "agent: {status}");
}

/// Waits until the ledger holds all of `want` (tenant, energy mJ), then
/// checks each tenant's energy exactly.
fn ledger_holds(collector: &Collector, want: &[(&str, u64)]) {
    let total: u64 = want.iter().map(|(_, e)| e).sum();
    eventually(Duration::from_secs(10), "the ledger holds the run", || {
        want.iter()
            .map(|(t, _)| ledger_energy(collector, t))
            .sum::<u64>()
            == total
    });
    for (tenant, energy) in want {
        assert_eq!(ledger_energy(collector, tenant), *energy, "{tenant}");
    }
}

fn mig_agent(lib: &Path, collector: &Collector, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("capwatch-agent"));
    cmd.args(["--source", "nvml", "--node-id", "gpu-node-mig"])
        .args(["--interval", "100ms", "--collector", &collector.endpoint()])
        .args(extra)
        .arg("--nvml-library")
        .arg(lib);
    cmd
}

/// Invariant: a board in MIG mode is sampled once, per board; each of its
/// counter's deltas is split among its instances by slice share with an
/// exact integer split, so each tenant's ledger energy is exactly its
/// share and the parts sum to the board counter's delta to the
/// millijoule; the board's energy is never repeated per instance.
#[test]
fn a_mig_boards_energy_is_apportioned_exactly_to_the_tenants_of_its_instances() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake(dir.path(), &["-DFAKE_MIG_LAYOUT=1"]);
    let collector = Collector::start(dir.path(), &mig_tenants(), 0, &["--stale-after", "5m"]);
    run_mig_agent(&lib, &collector, 6);

    // Six samples: five deltas of the board's counter, 1000 mJ each, split
    // 428 / 286 / 143 and 143 for the slice in no instance (3, 2, 1, 1 of 7).
    const DELTAS: u64 = 5;
    let m = collector.metrics();
    let board = [("node", "gpu-node-mig"), ("gpu", "0")];
    assert_eq!(
        milli(m.one("capwatch_gpu_energy_joules_total", &board)),
        1000 * DELTAS
    );
    let instances = mig_instances(&m);
    let listed: Vec<[&str; 6]> = instances
        .iter()
        .map(|l| {
            [
                l["uuid"].as_str(),
                l["parent_uuid"].as_str(),
                l["gpu_instance_id"].as_str(),
                l["compute_instance_id"].as_str(),
                l["profile"].as_str(),
                l["tenant"].as_str(),
            ]
        })
        .collect();
    assert_eq!(
        listed,
        [
            [MIG_1[0], BOARD, "1", "0", "3g.40gb", "lab-a"],
            [MIG_1[1], BOARD, "5", "0", "2g.20gb", "lab-b"],
            [MIG_1[2], BOARD, "13", "0", "1g", "lab-c"],
        ]
    );
    let part = |uuid: &str| {
        let mut labels = board.to_vec();
        labels.push(("uuid", uuid));
        milli(m.one("capwatch_gpu_mig_energy_joules_total", &labels))
    };
    let parts = [part(MIG_1[0]), part(MIG_1[1]), part(MIG_1[2]), part(BOARD)];
    assert_eq!(parts, [428, 286, 143, 143].map(|e| e * DELTAS));
    assert_eq!(parts.iter().sum::<u64>(), 1000 * DELTAS);
    // The board's own series stay one per board.
    assert_eq!(m.select("capwatch_gpu_power_watts", &board).len(), 1);
    // Live power split alike: the board's 312,345 mW by slice share (lab-c
    // also has GPU 1's 98,765 mW), summing to the node's.
    let power = |t: &str| milli(m.one("capwatch_tenant_power_watts", &[("tenant", t)]));
    assert_eq!(
        [power("lab-a"), power("lab-b"), power("lab-c")],
        [133_862, 89_241, 44_621 + 44_621 + 98_765]
    );
    assert_eq!(
        power("lab-a") + power("lab-b") + power("lab-c"),
        312_345 + 98_765
    );
    // Live utilization is a mean over the GPUs that have one: none of
    // lab-a's (its MIG instance), GPU 1 alone of lab-c's.
    let with_util = |t: &str| m.one("capwatch_tenant_gpus_with_utilization", &[("tenant", t)]);
    assert_eq!((with_util("lab-a"), with_util("lab-c")), (0.0, 1.0));
    assert!(
        m.select(
            "capwatch_tenant_gpu_utilization_ratio",
            &[("tenant", "lab-a")]
        )
        .is_empty(),
        "no mean of nothing"
    );

    // The ledger: each tenant its exact share (lab-c also GPU 1's 250 mJ
    // per delta), the board's energy counted once.
    let want = [
        ("lab-a", 428 * DELTAS),
        ("lab-b", 286 * DELTAS),
        ("lab-c", (143 + 143 + 250) * DELTAS),
    ];
    ledger_holds(&collector, &want);
    assert_eq!(ledger_energy(&collector, "unassigned"), 0);

    // NVML gives no utilization for a board in MIG mode (the stand-in
    // neither): its instances' GPU time is of unknown utilization, never
    // 0 % busy; lab-c's GPU 1, out of MIG mode, is measured.
    let (gpu, busy, unknown) = ledger_gpu_time(&collector, "lab-a");
    assert!(gpu > 0.0, "lab-a has GPU time");
    assert_eq!((busy, unknown), (0.0, gpu), "lab-a's 3g instance");
    let (gpu, busy, unknown) = ledger_gpu_time(&collector, "lab-c");
    assert!(busy > 0.0, "GPU 1's utilization is read: {busy}");
    assert!(
        unknown > 0.0 && unknown < gpu,
        "the 1g instance and the board's slice: {unknown} of {gpu}"
    );
    collector.stop();
}

const MIG_3: [&str; 3] = [
    "MIG-33333333-0000-0000-0000-000000000001",
    "MIG-33333333-0000-0000-0000-000000000002",
    "MIG-33333333-0000-0000-0000-000000000003",
];

/// Invariant: compute instances that share a GPU instance share its slice
/// share of the board by their compute slices. Layout 3 of the stand-in:
/// GPU instance 1 (3 of 7 slices) holds a 2-slice and a 1-slice compute
/// instance, GPU instance 2 takes the other 4 slices whole, so the
/// weights are 2 : 1 : 4 of 7 and nothing is left to the board.
#[test]
fn compute_instances_sharing_a_gpu_instance_split_its_share_by_compute_slices() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake(dir.path(), &["-DFAKE_MIG_LAYOUT=3"]);
    // lab-a leases the 2-slice compute instance, lab-b the 1-slice one;
    // lab-c leases the node: the 4g instance and GPU 1.
    let tenants = format!(
        "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 1\ngpus = [\"{}\"]\n\n\
         [[tenant]]\nid = \"lab-b\"\ncontracted_kw = 1\ngpus = [\"{}\"]\n\n\
         [[tenant]]\nid = \"lab-c\"\ncontracted_kw = 1\nnodes = [\"gpu-node-*\"]\n",
        MIG_3[0], MIG_3[1]
    );
    let collector = Collector::start(dir.path(), &tenants, 0, &["--stale-after", "5m"]);
    run_mig_agent(&lib, &collector, 6);

    // Five deltas of 1000 mJ, each split 2 : 1 : 4 of 7 exactly:
    // 285.7, 142.9 and 571.4 round by largest remainder to 286, 143, 571.
    const DELTAS: u64 = 5;
    let m = collector.metrics();
    let board = [("node", "gpu-node-mig"), ("gpu", "0")];
    let listed: Vec<[String; 4]> = mig_instances(&m)
        .iter()
        .map(|l| {
            ["uuid", "gpu_instance_id", "compute_instance_id", "profile"].map(|k| l[k].clone())
        })
        .collect();
    assert_eq!(
        listed,
        [
            [MIG_3[0], "1", "0", "2c.3g.40gb"],
            [MIG_3[1], "1", "1", "1c.3g.40gb"],
            [MIG_3[2], "2", "0", "4g.40gb"],
        ]
        .map(|r| r.map(String::from))
    );
    let part = |uuid: &str| {
        let mut labels = board.to_vec();
        labels.push(("uuid", uuid));
        m.select("capwatch_gpu_mig_energy_joules_total", &labels)
            .first()
            .map(|(_, v)| milli(*v))
    };
    assert_eq!(
        [part(MIG_3[0]), part(MIG_3[1]), part(MIG_3[2]), part(BOARD)],
        [
            Some(286 * DELTAS),
            Some(143 * DELTAS),
            Some(571 * DELTAS),
            None
        ],
        "no slice of the board is in no instance"
    );
    let want = [
        ("lab-a", 286 * DELTAS),
        ("lab-b", 143 * DELTAS),
        ("lab-c", (571 + 250) * DELTAS),
    ];
    ledger_holds(&collector, &want);
    collector.stop();
}

/// The lab collector and an agent on the stand-in whose MIG layout
/// follows a control file (returned, holding layout 1), reading it again
/// every 200 ms, with `env` besides, its log captured; returns once the
/// collector lists layout 1 and holds five samples.
fn layout_1_running(
    dir: &Path,
    env: &[(&str, &str)],
) -> (std::path::PathBuf, Collector, std::process::Child, Log) {
    let control = dir.join("mig-layout");
    std::fs::write(&control, "1").unwrap();
    let lib = build_fake(
        dir,
        &[&format!("-DFAKE_MIG_FILE=\"{}\"", control.display())],
    );
    let collector = Collector::start(dir, &mig_tenants(), 0, &["--stale-after", "5m"]);
    let mut agent = mig_agent(&lib, &collector, &["--log-format", "json"])
        .env("CAPWATCH_NVML_MIG_CHECK_INTERVAL", "200ms")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::default();
    log.capture(agent.stderr.take().unwrap(), "agent".into());
    eventually(Duration::from_secs(20), "layout 1 and samples", || {
        mig_instances(&collector.metrics()).len() == 3 && accepted(&collector) >= 5.0
    });
    (control, collector, agent, log)
}

/// Invariant: a MIG layout changed while the agent runs is read again
/// within the check interval and said in a new Hello; every delta of the
/// board's counter is split, exactly, by the layout it was read under
/// (stamped on the reading; none of the new layout is sent before the
/// Hello that announces it), so the ledger
/// still sums to the board's counter to the millijoule and each tenant's
/// energy is its share of k1 deltas under the first layout and k2 under
/// the second.
#[test]
fn a_mig_layout_changed_mid_run_is_read_again_and_apportioned_from_then_on() {
    let dir = tempfile::tempdir().unwrap();
    let (control, collector, mut agent, log) = layout_1_running(dir.path(), &[]);

    std::fs::write(&control, "2").unwrap();
    eventually(Duration::from_secs(20), "layout 2 listed", || {
        let listed = mig_instances(&collector.metrics());
        listed.len() == 2 && listed[0]["uuid"] == MIG_2[0] && listed[1]["uuid"] == MIG_2[1]
    });
    log.wait_for("MIG layout changed", Duration::from_secs(1));
    let before = accepted(&collector);
    eventually(Duration::from_secs(20), "samples under layout 2", || {
        accepted(&collector) >= before + 5.0
    });
    terminate(&agent);
    let status = wait_timeout(&mut agent, Duration::from_secs(30));
    assert!(status.success(), "agent: {status}");
    let summary = log.wait_for("agent stopped", Duration::from_secs(5));
    assert_eq!(json_number(&summary, "undelivered"), 0, "{summary}");

    let m = collector.metrics();
    let board = milli(m.one(
        "capwatch_gpu_energy_joules_total",
        &[("node", "gpu-node-mig"), ("gpu", "0")],
    ));
    assert_eq!(board % 1000, 0, "{board}");
    let deltas = board / 1000;
    let gpu1 = milli(m.one(
        "capwatch_gpu_energy_joules_total",
        &[("node", "gpu-node-mig"), ("gpu", "1")],
    ));
    assert_eq!(gpu1, 250 * deltas);
    eventually(Duration::from_secs(10), "the ledger holds the run", || {
        ["lab-a", "lab-b", "lab-c"]
            .iter()
            .map(|t| ledger_energy(&collector, t))
            .sum::<u64>()
            == board + gpu1
    });
    let (a, b, c) = (
        ledger_energy(&collector, "lab-a"),
        ledger_energy(&collector, "lab-b"),
        ledger_energy(&collector, "lab-c") - gpu1,
    );
    // Layout 1: 428 / 286 / 143 + 143 (lab-c's two parts); layout 2: 571
    // / 429, nothing in no instance.
    assert_eq!(c % 286, 0, "lab-c's board energy {c}");
    let k1 = c / 286;
    let k2 = deltas - k1;
    assert!(
        k1 >= 4 && k2 >= 4,
        "{k1} deltas under layout 1, {k2} under 2"
    );
    assert_eq!(a, 428 * k1 + 571 * k2, "lab-a");
    assert_eq!(b, 286 * k1 + 429 * k2, "lab-b");
    assert_eq!(a + b + c, board);
    assert_eq!(ledger_energy(&collector, "unassigned"), 0);
    collector.stop();
}

/// Invariant: samples taken under one MIG layout and delivered after the
/// layout changed and the collector restarted (it never heard the old
/// layout) are split by the layout they were taken under: the agent
/// stamps each reading with its layout and lists the earlier layouts in
/// its Hello. Every delta of the board's counter lands on the tenants of
/// its own layout, and the ledger sums to the counter to the millijoule.
#[test]
fn a_spool_kept_through_a_layout_change_and_a_collector_restart_is_split_by_its_own_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (control, collector, mut agent, log) =
        layout_1_running(dir.path(), &[("CAPWATCH_RECONNECT_MAX", "300ms")]);
    let port = collector.grpc.port();
    collector.stop();
    let before = ["lab-a", "lab-b", "lab-c"].map(|t| t.to_string());
    // The collector is down: the agent spools samples of layout 1, then
    // of layout 2.
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&control, "2").unwrap();
    log.wait_for("MIG layout changed", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1500));
    let collector = Collector::start(dir.path(), &mig_tenants(), port, &["--stale-after", "5m"]);
    eventually(Duration::from_secs(20), "layout 2 listed", || {
        let listed = mig_instances(&collector.metrics());
        listed.len() == 2 && listed[0]["uuid"] == MIG_2[0] && listed[1]["uuid"] == MIG_2[1]
    });
    let now = accepted(&collector);
    eventually(
        Duration::from_secs(20),
        "more samples under layout 2",
        || accepted(&collector) >= now + 5.0,
    );
    terminate(&agent);
    let status = wait_timeout(&mut agent, Duration::from_secs(30));
    assert!(status.success(), "agent: {status}");
    let summary = log.wait_for("agent stopped", Duration::from_secs(5));
    assert_eq!(json_number(&summary, "undelivered"), 0, "{summary}");

    // The whole run in the ledger: 1000 mJ of the board and 250 mJ of
    // GPU 1 per delta.
    let total = || {
        before
            .iter()
            .map(|t| ledger_energy(&collector, t))
            .sum::<u64>()
    };
    let mut deltas = 0;
    eventually(Duration::from_secs(10), "the ledger holds the run", || {
        let t = total();
        deltas = t / 1250;
        t % 1250 == 0 && t > 0 && ledger_energy(&collector, "lab-c") >= 250 * deltas
    });
    let (a, b, c) = (
        ledger_energy(&collector, "lab-a"),
        ledger_energy(&collector, "lab-b"),
        ledger_energy(&collector, "lab-c") - 250 * deltas,
    );
    // Layout 1: 428 / 286 / 143 + 143 (lab-c's two parts); layout 2: 571
    // / 429, nothing in no instance. Never the board whole to lab-c.
    assert_eq!(c % 286, 0, "lab-c's board energy {c}");
    let k1 = c / 286;
    let k2 = deltas - k1;
    assert_eq!(
        a,
        428 * k1 + 571 * k2,
        "lab-a ({k1} deltas of layout 1, {k2} of 2)"
    );
    assert_eq!(b, 286 * k1 + 429 * k2, "lab-b");
    assert_eq!(a + b + c, 1000 * deltas);
    // The 1.5 s spooled under layout 1 (about 15 samples at 100 ms) were
    // split by it, beyond the 5 acked before the collector stopped.
    assert!(k1 >= 12, "{k1} deltas under layout 1, {k2} under 2");
    assert!(k2 >= 12, "{k1} deltas under layout 1, {k2} under 2");
    let m = collector.metrics();
    assert_eq!(
        m.one("capwatch_collector_mig_readings_unsplit_total", &[]),
        0.0
    );
    assert_eq!(ledger_energy(&collector, "unassigned"), 0);
    collector.stop();
}
