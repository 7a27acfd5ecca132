//! `/metrics` render time and size at fleet scale.
//!
//! Builds the collector's state for 1,000, 10,000 and 100,000 GPUs (nodes
//! of 8, four node pools, three of them leased by tenants), every GPU with
//! two samples so that every series exists, then renders it the way
//! `/metrics` does (the exposition text written straight from the state)
//! and, for comparison, through the `prometheus` crate's registry and
//! encoder, at each level of detail (GPU, node and tenant series; node and tenant;
//! tenant only). Prints the median time of
//! `--runs` renders (5) and the body size for each.
//!
//! ```text
//! cargo bench -p capwatch-collector --bench metrics_render
//! cargo bench -p capwatch-collector --bench metrics_render -- --gpus 100000 --runs 9
//! cargo bench -p capwatch-collector --bench metrics_render -- --gpus 100000 --level tenant
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capwatch_collector::edge::{GpuReading, NodeSample};
use capwatch_collector::metrics;
use capwatch_collector::state::{GpuInfo, Hello, State, StateConfig};
use capwatch_collector::tenants::Tenants;

#[path = "../src/metrics/reference.rs"]
mod reference;
mod support;
use support::{MODEL, POWER_LIMIT_MW, TENANTS, node_id};

fn fleet(gpus: usize) -> Arc<State> {
    let tenants = Tenants::from_toml(TENANTS).expect("tenant file parses");
    let state = Arc::new(State::new(
        StateConfig {
            stale_after: Some(Duration::from_secs(3600)),
            max_gpus_per_node: 64,
            max_clock_skew: Duration::from_secs(600),
            max_sample_age: Duration::from_secs(7 * 86_400),
        },
        tenants,
    ));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i64;
    for node in 0..gpus.div_ceil(8) {
        let (handle, _) = state
            .hello(Hello {
                node_power_sources: Vec::new(),
                node_id: node_id(node),
                agent_version: "bench".into(),
                epoch: 1,
                interval: Duration::from_secs(1),
                gpus: (0..8)
                    .map(|g| GpuInfo {
                        uuid: format!("GPU-{node:08x}-0000-0000-0000-{g:012x}"),
                        model: MODEL.into(),
                        power_limit_milliwatts: Some(POWER_LIMIT_MW),
                        memory_total_bytes: Some(80 << 30),
                        energy_counter_supported: true,
                        identity: Default::default(),
                        mig: Default::default(),
                        mig_layout: None,
                        earlier_mig: Vec::new(),
                    })
                    .collect(),
            })
            .expect("valid Hello");
        let samples = (1..=2u64)
            .map(|seq| NodeSample {
                node_power: Vec::new(),
                seq,
                timestamp_unix_nanos: now - 2_000_000_000 + seq as i64 * 1_000_000_000,
                gpus: (0..8)
                    .map(|g| GpuReading {
                        index: g,
                        power_milliwatts: Some(650_000),
                        energy_millijoules: Some(1_000_000 + seq * 650_000),
                        utilization_percent: Some(90),
                        memory_utilization_percent: Some(40),
                        memory_used_bytes: Some(60 << 30),
                        temperature_celsius: Some(70),
                        sm_clock_mhz: Some(1_980),
                        power_limit_milliwatts: Some(POWER_LIMIT_MW),
                        health: None,
                        lost: false,
                        mig_layout: None,
                    })
                    .collect(),
                host: None,
            })
            .collect();
        state
            .ingest(&handle, samples, Vec::new())
            .expect("stream owns its node");
    }
    state
}

fn main() {
    let mut sizes = vec![1_000usize, 10_000, 100_000];
    let mut runs = 5usize;
    let mut level: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--gpus" => sizes = vec![args.next().and_then(|v| v.parse().ok()).expect("--gpus N")],
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--level" => level = Some(args.next().expect("--level gpu|node|tenant")),
            other => panic!("unknown argument {other:?}; use --gpus N --runs N --level L"),
        }
    }
    println!("gpus\tlevel\tdirect_median_ms\tdirect_min_ms\tencoder_median_ms\tbytes\tseries");
    for &gpus in &sizes {
        let state = fleet(gpus);
        for (label, detail) in [
            ("gpu", metrics::Detail::ALL),
            (
                "node",
                metrics::Detail {
                    gpus: false,
                    nodes: true,
                },
            ),
            (
                "tenant",
                metrics::Detail {
                    gpus: false,
                    nodes: false,
                },
            ),
        ] {
            if level.as_deref().is_some_and(|l| l != label) {
                continue;
            }
            let median = |f: &mut dyn FnMut() -> String| {
                let mut times = Vec::with_capacity(runs);
                let mut body = String::new();
                for _ in 0..runs {
                    let t = Instant::now();
                    body = f();
                    times.push(t.elapsed());
                }
                times.sort();
                (times[runs / 2], times[0], body)
            };
            // What /metrics serves: written straight from the state.
            let (direct, direct_min, body) = median(&mut || metrics::render_text(&state, detail));
            // The same series through the prometheus crate's encoder.
            let registry = reference::registry(state.clone(), detail);
            let (encoder, _, _) = median(&mut || reference::render(&registry).expect("render"));
            let series = body.lines().filter(|l| !l.starts_with('#')).count();
            println!(
                "{gpus}\t{label}\t{:.2}\t{:.2}\t{:.2}\t{}\t{series}",
                direct.as_secs_f64() * 1e3,
                direct_min.as_secs_f64() * 1e3,
                encoder.as_secs_f64() * 1e3,
                body.len()
            );
        }
    }
}
