//! Stream epochs after restarts and rejections told back to the agent,
//! against the real collector and agent binaries: an agent restarted with
//! its clock stepped back, a client that says Hello with a newer epoch for
//! someone else's node, and an agent whose clock is ahead of the
//! collector's.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::{Duration, Instant};

use crate::support::*;
use capwatch_proto::v1 as pb;
use capwatch_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The agent's test-only clock offset (`capwatch_agent::TEST_CLOCK_OFFSET_VAR`).
const CLOCK_OFFSET: &str = capwatch_agent::TEST_CLOCK_OFFSET_VAR;

/// Invariant: an agent restarted after its clock was stepped back (its
/// new epoch is older than the one the collector holds for the node) is
/// metered again within seconds, not locked out: the collector's refusal
/// names the node's current epoch, the agent moves above it, and the
/// samples it took meanwhile (never sent under the refused epoch) are
/// delivered under the new one. Every sample counts once and each GPU's
/// energy equals its counter at the end minus its counter at the start.
#[test]
fn an_agent_restarted_with_its_clock_stepped_back_is_metered_again_at_once() {
    const N: u64 = 15;
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), "", 0, &["--stale-after", "5m"]);
    let truth = Truth::of("s-1", 1);
    let counters = Counters::start(dir.path(), &truth);
    let start = counters.read();
    // The default backoff (up to 30 s): coming back must not wait for it.
    let cfg = &counters.agent_config;
    let log = Agent::start(dir.path(), &collector.endpoint(), "s-1", N, cfg)
        .finish(Duration::from_secs(30));
    log.wait_for("\"undelivered\":0", Duration::from_secs(1));

    let began = Instant::now();
    let log = Agent::start_env(
        dir.path(),
        &collector.endpoint(),
        "s-1",
        N,
        cfg,
        &[(CLOCK_OFFSET, "-2m")],
    )
    .finish(Duration::from_secs(30));
    let took = began.elapsed();
    log.wait_for("\"undelivered\":0", Duration::from_secs(1));
    log.wait_for("newer epoch", Duration::from_secs(1));
    // 15 samples take 1.5 s; a refusal that waited out the backoff would
    // take 15-30 s more.
    assert!(took < Duration::from_secs(10), "second run took {took:?}");

    let m = collector.metrics();
    assert_eq!(
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "accepted")]
        ),
        2.0 * N as f64
    );
    assert_eq!(
        m.one("capwatch_node_samples_total", &[("node", "s-1")]),
        2.0 * N as f64
    );
    let end = counters.read();
    let mut sum = 0;
    for uuid in &truth.uuids {
        let e = milli(m.one("capwatch_gpu_energy_joules_total", &[("uuid", uuid)]));
        assert!(end[uuid] > start[uuid]);
        assert_eq!(e, end[uuid] - start[uuid], "{uuid}");
        sum += e;
    }
    // The ledger's total holds the same energy.
    assert_eq!(
        milli(m.one(
            "capwatch_tenant_energy_joules_total",
            &[("tenant", "unassigned")]
        )),
        sum
    );
    assert!(
        m.select("capwatch_gpu_energy_counter_resets_total", &[])
            .is_empty()
    );
    collector.stop();
}

/// Invariant: without an auth file, a client that says Hello for a node
/// with a newer epoch than the node's agent, and then goes away, does not
/// lock the real agent out: the agent is metered again within seconds
/// under an epoch above the intruder's, every sample counts exactly once,
/// and each GPU's energy is its counter delta from the first sample to the
/// last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_hello_with_a_newer_epoch_cannot_lock_the_real_agent_out() {
    const N: u64 = 80;
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), "", 0, &["--stale-after", "5m"]);
    let samples = |c: &Collector| {
        c.metrics()
            .select("capwatch_node_samples_total", &[("node", "v-1")])
            .first()
            .map_or(0.0, |(_, v)| *v)
    };
    let agent = Agent::start(
        dir.path(),
        &collector.endpoint(),
        "v-1",
        N,
        "drain_timeout = \"20s\"\n",
    );
    eventually(Duration::from_secs(10), "the agent metered", || {
        samples(&collector) >= 10.0
    });

    // The intruder: a newer epoch, no GPUs, no samples; it takes the node
    // over, then leaves.
    let mut client = IngestClient::connect(collector.endpoint()).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            node_power_sources: Vec::new(),
            node_id: "v-1".into(),
            agent_version: "rogue".into(),
            stream_epoch: now_nanos() as u64,
            interval_millis: 1000,
            gpus: Vec::new(),
            host: None,
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    match inbound.message().await.unwrap().and_then(|m| m.body) {
        Some(pb::collector_message::Body::Welcome(_)) => {}
        other => panic!("expected a welcome, got {other:?}"),
    }
    drop(tx);
    drop(inbound);
    drop(client);
    let at_takeover = samples(&collector);

    eventually(
        Duration::from_secs(10),
        "the real agent metered again",
        || samples(&collector) > at_takeover,
    );
    let log = agent.finish(Duration::from_secs(40));
    let done = log.wait_for("agent stopped", Duration::from_secs(1));
    assert_eq!(json_number(&done, "undelivered"), 0, "{done}");
    log.wait_for("newer epoch", Duration::from_secs(1));
    let abandoned = json_number(&done, "abandoned");

    let truth = Truth::of("v-1", N);
    let m = collector.metrics();
    let accepted = m.one("capwatch_node_samples_total", &[("node", "v-1")]) as u64;
    // The stream the intruder took over ended with the ack of what it had
    // applied and the highest sequence accepted: nothing was in doubt, so
    // every sample counts exactly once.
    assert_eq!(abandoned, 0, "{done}");
    assert_eq!(accepted, N, "{done}");
    let mut sum = 0;
    for gpu in 0..8 {
        let e = milli(m.one(
            "capwatch_gpu_energy_joules_total",
            &[("node", "v-1"), ("gpu", &gpu.to_string())],
        ));
        assert_eq!(e, truth.energy(gpu, 1, N), "gpu {gpu}");
        sum += e;
    }
    assert_eq!(
        milli(m.one(
            "capwatch_tenant_energy_joules_total",
            &[("tenant", "unassigned")]
        )),
        sum
    );
    collector.stop();
}

/// Invariant: an agent learns from the acks which of its samples the
/// collector rejected and why: with its clock an hour ahead (beyond the
/// collector's 10-minute skew) every sample is acked and rejected for its
/// timestamp, and the agent warns and counts them by reason.
#[test]
fn an_agent_whose_clock_is_ahead_learns_that_its_samples_were_rejected() {
    const N: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), "", 0, &[]);
    let log = Agent::start_env(
        dir.path(),
        &collector.endpoint(),
        "k-1",
        N,
        "",
        &[(CLOCK_OFFSET, "1h")],
    )
    .finish(Duration::from_secs(30));
    let done = log.wait_for("agent stopped", Duration::from_secs(1));
    assert_eq!(json_number(&done, "acked"), N, "{done}");
    assert_eq!(json_number(&done, "undelivered"), 0, "{done}");
    assert_eq!(json_number(&done, "rejected"), N, "{done}");
    assert_eq!(
        json_field(&done, "rejected_by_reason").as_deref(),
        Some(format!("timestamp={N}").as_str()),
        "{done}"
    );
    let warned = log.wait_for("collector rejected samples", Duration::from_secs(1));
    assert!(warned.contains("\"level\":\"WARN\""), "{warned}");
    assert!(warned.contains("timestamp="), "{warned}");

    let m = collector.metrics();
    assert_eq!(
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "rejected"), ("reason", "timestamp")]
        ),
        N as f64
    );
    collector.stop();
}
