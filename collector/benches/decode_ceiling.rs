//! The decode-only ceiling of ingest: the same messages the fleet
//! simulator sends (one `SampleBatch` per node of `--samples-per-message`
//! node samples (1) of 8 mock GPUs), decoded from bytes in a tight loop on
//! one thread,
//! and, separately, decoded plus the collector's per-sample edge checks.
//! `scripts/bench-ingest.sh` divides the collector's sustained rate by
//! this to say how close ingest comes to merely reading the bytes.
//!
//! ```text
//! cargo bench -p capwatch-collector --bench decode_ceiling
//! cargo bench -p capwatch-collector --bench decode_ceiling -- --samples-per-message 10
//! ```

use std::time::{Duration, Instant};

use prost::Message;

use capwatch_agent::convert;
use capwatch_agent::source::GpuSource;
use capwatch_agent::source::mock::{MockConfig, MockSource, Model, Profile};
use capwatch_collector::edge;
use capwatch_proto::v1 as pb;

fn messages(nodes: usize, ticks: i64, per_message: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(nodes * ticks as usize);
    for n in 0..nodes {
        let mut m = MockSource::new(MockConfig {
            node_id: format!("sim-{n:05}"),
            gpus: 8,
            profile: Profile::Training,
            model: Model::H100,
            seed: 0,
            energy_counter: true,
            counter_file: None,
            nvlink: false,
        });
        let samples: Vec<pb::NodeSample> = (1..=ticks)
            .map(|t| {
                let at = 1_800_000_000_000_000_000 + t * 1_000_000_000;
                pb::NodeSample {
                    seq: t as u64,
                    timestamp_unix_nanos: at,
                    gpus: m.sample(at).into_iter().map(convert::gpu_sample).collect(),
                    host: None,
                    node_power: Vec::new(),
                }
            })
            .collect();
        for batch in samples.chunks(per_message) {
            let msg = pb::AgentMessage {
                body: Some(pb::agent_message::Body::Batch(pb::SampleBatch {
                    samples: batch.to_vec(),
                })),
            };
            out.push(msg.encode_to_vec());
        }
    }
    out
}

/// GPU-samples per second over `for_at_least`, running `f` over every
/// message repeatedly.
fn rate(msgs: &[Vec<u8>], for_at_least: Duration, mut f: impl FnMut(&[u8]) -> usize) -> f64 {
    let start = Instant::now();
    let mut gpus = 0usize;
    while start.elapsed() < for_at_least {
        for m in msgs {
            gpus += f(m);
        }
    }
    gpus as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mut per_message = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--samples-per-message" => {
                per_message = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| (1..=64).contains(n))
                    .expect("--samples-per-message 1-64")
            }
            other => panic!("unknown argument {other:?}; use --samples-per-message N"),
        }
    }
    // 10,000 node samples whatever the batching, so that the bytes decoded
    // (about 3 MB) stay in cache alike.
    let msgs = messages(1000 / per_message, 10 * per_message as i64, per_message);
    let bytes: usize = msgs.iter().map(Vec::len).sum();
    let mut runs_decode = Vec::new();
    let mut runs_validate = Vec::new();
    for _ in 0..5 {
        runs_decode.push(rate(
            &msgs,
            Duration::from_secs(1),
            |b| match pb::AgentMessage::decode(b).expect("valid message").body {
                Some(pb::agent_message::Body::Batch(batch)) => {
                    batch.samples.iter().map(|s| s.gpus.len()).sum()
                }
                _ => 0,
            },
        ));
        runs_validate.push(rate(
            &msgs,
            Duration::from_secs(1),
            |b| match pb::AgentMessage::decode(b).expect("valid message").body {
                Some(pb::agent_message::Body::Batch(batch)) => batch
                    .samples
                    .into_iter()
                    .filter_map(|s| edge::sample(s).ok())
                    .map(|s| s.gpus.len())
                    .sum(),
                _ => 0,
            },
        ));
    }
    runs_decode.sort_by(f64::total_cmp);
    runs_validate.sort_by(f64::total_cmp);
    println!(
        "messages {} of {} node samples, {} bytes on average",
        msgs.len(),
        per_message,
        bytes / msgs.len()
    );
    println!("decode_gpu_samples_per_s {:.0}", runs_decode[2]);
    println!("decode_validate_gpu_samples_per_s {:.0}", runs_validate[2]);
}
