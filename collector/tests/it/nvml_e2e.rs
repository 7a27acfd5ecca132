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

/// Invariant: NVML's units (mW, mJ, %, MHz, bytes) reach /metrics in base
/// units unchanged in value; a GPU without an energy counter is accounted
/// by the exact integral of its power.
#[test]
fn nvml_readings_reach_metrics_in_base_units() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake(dir.path(), &["-DFAKE_GPU1_NO_ENERGY"]);
    let collector = Collector::start(
        dir.path(),
        "[[tenant]]\nid = \"lab\"\ncontracted_kw = 0.4\nnodes = [\"gpu-node-*\"]\n",
        0,
        &["--stale-after", "5m"],
    );
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
    ];
    for (name, want) in cases {
        let got = m.one(name, &g0);
        assert!((got - want).abs() < 1e-9, "{name}: {got} != {want}");
    }
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
