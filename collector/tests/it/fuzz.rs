//! Property tests at scale over the decode-and-validate path: arbitrary
//! bytes through the protobuf decoder and the edge checks, and arbitrary
//! (often absurd) Hellos and batches through the collector's state into a
//! real ledger. Nothing may panic, and no input may make a ledger commit
//! fail: one agent must never be able to stop the fleet's billing.
//!
//! The number of cases is bounded for the suite; `CAPWATCH_FUZZ_CASES`
//! raises it for a longer run, e.g. `CAPWATCH_FUZZ_CASES=200000 cargo test
//! -p capwatch-collector --release --test fuzz`.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

use capwatch_collector::edge;
use capwatch_collector::ledger::Ledger;
use capwatch_collector::state::{State, StateConfig};
use capwatch_collector::tenants::Tenants;
use capwatch_proto::v1 as pb;

use crate::support::now_nanos;

fn cases(default: u32) -> u32 {
    std::env::var("CAPWATCH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Integers biased towards the edges that break arithmetic.
fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(i64::MAX as u64 + 1),
        0u64..2_000_000,
        any::<u64>(),
    ]
}

fn edgy_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(100),
        Just(101),
        Just(u32::MAX),
        any::<u32>()
    ]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(-1.0f32),
        Just(1e30),
        0.0f32..100.0,
    ]
}

fn gpu_info() -> impl Strategy<Value = pb::GpuInfo> {
    (
        0u32..70,
        prop_oneof![
            Just("GPU-0".to_string()),
            Just(String::new()),
            "[ -~]{0,40}",
            "\\PC{0,200}"
        ],
        proptest::option::of(edgy_u64()),
        any::<bool>(),
    )
        .prop_map(|(index, uuid, limit, counter)| pb::GpuInfo {
            index,
            uuid,
            model: "fuzz".into(),
            power_limit_milliwatts: limit,
            memory_total_bytes: None,
            energy_counter_supported: counter,
            ..Default::default()
        })
}

fn hello() -> impl Strategy<Value = pb::Hello> {
    (
        prop_oneof![
            Just("n-1".to_string()),
            Just("n-2".to_string()),
            "\\PC{0,300}"
        ],
        edgy_u64(),
        edgy_u32(),
        vec(gpu_info(), 0..12),
        // Mostly indexes by position (anything else is refused at once),
        // so that most inventories reach the state.
        proptest::bool::weighted(0.8),
    )
        .prop_map(
            |(node_id, stream_epoch, interval_millis, mut gpus, by_position)| {
                if by_position {
                    for (i, g) in gpus.iter_mut().enumerate() {
                        g.index = i as u32;
                    }
                }
                pb::Hello {
                    node_power_sources: Vec::new(),
                    node_id,
                    agent_version: "fuzz".into(),
                    stream_epoch,
                    interval_millis,
                    gpus,
                    host: None,
                }
            },
        )
}

fn gpu_sample() -> impl Strategy<Value = pb::GpuSample> {
    (
        0u32..14,
        proptest::option::of(edgy_u64()),
        proptest::option::of(edgy_u64()),
        proptest::option::of(edgy_u32()),
        any::<bool>(),
    )
        .prop_map(|(index, power, energy, util, lost)| pb::GpuSample {
            index,
            power_milliwatts: power,
            energy_millijoules: energy,
            utilization_percent: util,
            lost,
            ..Default::default()
        })
}

fn sample() -> impl Strategy<Value = pb::NodeSample> {
    (
        edgy_u64(),
        prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(0i64),
            (-10_000i64..10_000).prop_map(|s| now_nanos() + s * 1_000_000_000),
            any::<i64>(),
        ],
        vec(gpu_sample(), 0..10),
        proptest::option::of(float()),
    )
        .prop_map(|(seq, timestamp_unix_nanos, gpus, cpu)| pb::NodeSample {
            node_power: Vec::new(),
            seq,
            timestamp_unix_nanos,
            gpus,
            host: cpu.map(|c| pb::HostSample {
                cpu_utilization_percent: Some(c),
                memory_used_bytes: Some(u64::MAX),
                memory_total_bytes: Some(1),
            }),
        })
}

#[derive(Debug, Clone)]
enum Step {
    Hello(pb::Hello),
    Batch(Vec<pb::NodeSample>),
    Disconnect,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => hello().prop_map(Step::Hello),
        4 => vec(sample(), 0..8).prop_map(Step::Batch),
        1 => Just(Step::Disconnect),
    ]
}

fn state() -> State {
    State::new(
        StateConfig {
            stale_after: None,
            max_gpus_per_node: 64,
            max_clock_skew: Duration::from_secs(600),
            max_sample_age: Duration::from_secs(7 * 86_400),
        },
        Tenants::empty(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(4_000)))]

    /// Arbitrary bytes: the decoder and the edge checks answer with an
    /// error or a value, never a panic.
    #[test]
    fn arbitrary_bytes_decode_and_validate_without_panicking(bytes in vec(any::<u8>(), 0..4096)) {
        if let Ok(m) = pb::AgentMessage::decode(&bytes[..]) {
            match m.body {
                Some(pb::agent_message::Body::Hello(h)) => {
                    let _ = edge::hello(h);
                }
                Some(pb::agent_message::Body::Batch(b)) => {
                    for s in b.samples {
                        let _ = edge::sample(s);
                    }
                }
                None => {}
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(300)))]

    /// Arbitrary streams of Hellos and batches through the state and into
    /// a real ledger: nothing panics, every commit succeeds, and booked
    /// energy stays within what the ledger can hold.
    #[test]
    fn arbitrary_streams_never_break_a_commit(steps in vec(step(), 1..16)) {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::create(&dir.path().join("ledger.db")).unwrap();
        let state = state();
        let mut handle = None;
        for step in steps {
            match step {
                Step::Hello(h) => {
                    if let Ok((h, _)) = edge::hello(h).and_then(|h| state.hello(h)) {
                        handle = Some(h);
                    }
                }
                Step::Batch(samples) => {
                    let Some(h) = &handle else { continue };
                    let mut good = Vec::new();
                    let mut rejected = Vec::new();
                    for s in samples {
                        match edge::sample(s) {
                            Ok(s) => good.push(s),
                            Err(r) => rejected.push(r),
                        }
                    }
                    let _ = state.ingest(h, good, rejected);
                }
                Step::Disconnect => {
                    if let Some(h) = handle.take() {
                        state.disconnect(&h);
                    }
                }
            }
            let (_, commit) = state.take_pending();
            prop_assert!(ledger.commit(&commit).is_ok(), "{:?}", ledger.commit(&commit));
        }
    }
}
