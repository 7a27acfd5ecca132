//! Faults and replays against the real collector binary: a cut network
//! between agent and collector, batches sent twice, reconnects that resume
//! an epoch, and streams that break the protocol.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::Duration;

use crate::support::raw::Stream;
use crate::support::*;
use capwatch_proto::v1 as pb;
use prost::Message as _;

const NO_TENANTS: &str = "";

/// Invariant: a network cut loses nothing and counts nothing twice: after
/// the agent reconnects through the proxy and delivers everything, each
/// GPU's energy equals its mock counter delta from the first sample to the
/// last, and the node's accepted samples equal the samples taken.
#[test]
fn network_cut_loses_nothing_and_counts_nothing_twice() {
    const N: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &["--stale-after", "5m"]);
    let proxy = Proxy::start(collector.grpc);
    let cfg = "reconnect_initial = \"50ms\"\nreconnect_max = \"300ms\"\ndrain_timeout = \"20s\"\n";
    let agent = Agent::start(dir.path(), &format!("http://{}", proxy.addr), "c-1", N, cfg);
    for _ in 0..2 {
        eventually(Duration::from_secs(10), "a live connection", || {
            collector
                .metrics()
                .one("capwatch_collector_agents_connected", &[])
                == 1.0
        });
        std::thread::sleep(Duration::from_millis(800));
        assert!(proxy.cut() >= 1, "a connection to cut");
    }
    let log = agent.finish(Duration::from_secs(40));
    log.wait_for("\"undelivered\":0", Duration::from_secs(1));

    let truth = Truth::of("c-1", N);
    let m = collector.metrics();
    assert_eq!(
        m.one("capwatch_node_samples_total", &[("node", "c-1")]),
        N as f64
    );
    for gpu in 0..8 {
        let e = milli(m.one(
            "capwatch_gpu_energy_joules_total",
            &[("node", "c-1"), ("gpu", &gpu.to_string())],
        ));
        assert_eq!(e, truth.energy(gpu, 1, N), "gpu {gpu}");
    }
    collector.stop();
}

fn hello(node: &str, epoch: u64) -> pb::AgentMessage {
    let gpu = |index: u32, counter: bool| pb::GpuInfo {
        index,
        uuid: format!("GPU-{node}-{index}"),
        model: "test".into(),
        power_limit_milliwatts: Some(700_000),
        memory_total_bytes: None,
        energy_counter_supported: counter,
        ..Default::default()
    };
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            node_power_sources: Vec::new(),
            node_id: node.into(),
            agent_version: "test".into(),
            stream_epoch: epoch,
            interval_millis: 1000,
            gpus: vec![gpu(0, true), gpu(1, false)],
            host: None,
        })),
    }
}

/// An hour ago, in whole seconds: recent enough for the collector's
/// sample-age check, fixed for the whole test.
fn t0() -> i64 {
    static T0: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *T0.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (now - 3600) * 1_000_000_000
    })
}

/// Sample `seq`: GPU 0 has a counter rising 500 mJ per tick; GPU 1 has
/// none and draws 333 W, integrated by the collector over 1 s ticks.
fn sample(seq: u64) -> pb::NodeSample {
    pb::NodeSample {
        node_power: Vec::new(),
        seq,
        timestamp_unix_nanos: t0() + seq as i64 * 1_000_000_000,
        gpus: vec![
            pb::GpuSample {
                index: 0,
                power_milliwatts: Some(500_000),
                energy_millijoules: Some(1_000_000 + 500 * seq),
                ..Default::default()
            },
            pb::GpuSample {
                index: 1,
                power_milliwatts: Some(333_333),
                ..Default::default()
            },
        ],
        host: None,
    }
}

fn batch(seqs: impl IntoIterator<Item = u64>) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Batch(pb::SampleBatch {
            samples: seqs.into_iter().map(sample).collect(),
        })),
    }
}

/// Invariant: a replayed batch, and samples re-sent after a reconnect in
/// the same epoch, change nothing but the duplicate counter; a bad sample
/// is rejected alone; protocol violations get a clear gRPC status and the
/// collector keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_counted_once_and_bad_input_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &["--stale-after", "5m"]);
    let ep = collector.endpoint();

    let mut s = Stream::open(&ep, hello("r-1", 7)).await.unwrap();
    assert_eq!(s.welcome().await, 0);
    assert_eq!(s.send(batch(1..=5)).await, 5);
    assert_eq!(
        s.send(batch(1..=5)).await,
        5,
        "a replayed batch is acked, not applied"
    );
    drop(s);

    // Same epoch again: the collector says what it holds; overlap is dropped.
    let mut s = Stream::open(&ep, hello("r-1", 7)).await.unwrap();
    assert_eq!(s.welcome().await, 5);
    assert_eq!(s.send(batch(3..=8)).await, 8);

    // One bad sample (a GPU the inventory lacks) among good ones.
    let mut bad = batch(9..=11);
    if let Some(pb::agent_message::Body::Batch(b)) = &mut bad.body {
        b.samples[1].gpus[1].index = 9;
    }
    assert_eq!(s.send(bad).await, 11);

    // Protocol violations.
    let older = Stream::open(&ep, hello("r-1", 6))
        .await
        .err()
        .expect("older epoch refused");
    assert_eq!(older.code(), tonic::Code::FailedPrecondition, "{older}");
    let no_hello = Stream::open(&ep, batch(1..=1))
        .await
        .err()
        .expect("batch before hello refused");
    assert_eq!(no_hello.code(), tonic::Code::InvalidArgument, "{no_hello}");
    assert!(no_hello.message().contains("Hello"), "{no_hello}");

    // Garbage on the gRPC port does not take the collector down.
    {
        use tokio::io::AsyncWriteExt;
        let mut raw = tokio::net::TcpStream::connect(collector.grpc)
            .await
            .unwrap();
        raw.write_all(b"\x00\x01garbage that is not HTTP/2\r\n\r\n")
            .await
            .unwrap();
    }

    let m = tokio::task::spawn_blocking({
        let http = collector.http;
        move || Metrics::parse(&http_get(http, "/metrics"))
    })
    .await
    .unwrap();
    // Accepted: 1-5, 6-8, 9 and 11; duplicate: 1-5 replayed, 3-5 re-sent.
    assert_eq!(
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "accepted")]
        ),
        10.0
    );
    assert_eq!(
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "duplicate")]
        ),
        8.0
    );
    assert_eq!(
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "rejected"), ("reason", "gpu_index")]
        ),
        1.0
    );
    assert_eq!(m.one("capwatch_collector_streams_refused_total", &[]), 2.0);
    // GPU 0: counter from seq 1 to 11 = 10 ticks of 500 mJ, the rejected
    // sample's reading included in the next delta.
    assert_eq!(
        milli(m.one(
            "capwatch_gpu_energy_joules_total",
            &[("node", "r-1"), ("gpu", "0")]
        )),
        5_000
    );
    // GPU 1: 333.333 W over 10 s, exactly (sample 10 rejected; its
    // interval is covered by sample 11's two-second step).
    assert_eq!(
        milli(m.one(
            "capwatch_gpu_energy_joules_total",
            &[("node", "r-1"), ("gpu", "1")]
        )),
        3_333_330
    );
    assert_eq!(
        milli(m.one(
            "capwatch_tenant_energy_joules_total",
            &[("tenant", "unassigned")]
        )),
        3_338_330
    );
    drop(s);
    collector.stop();
}

/// Invariant: through the real collector, an agent clock that stands
/// still and then steps back 5 s inside one batch loses no counter energy
/// and counts no reset, and a GPU without a counter that is silent for an
/// hour is billed only the staleness window before its next reading, the
/// rest of the hour being expected GPU time without coverage: on
/// `/metrics` and in the ledger alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_that_stand_still_or_step_back_and_long_gaps_neither_lose_nor_invent_energy() {
    const SEC: i64 = 1_000_000_000;
    // GPU 0: 300 W with a counter at `joules`; GPU 1: 333.333 W, no counter.
    let at = |seq: u64, secs: i64, joules: u64| pb::NodeSample {
        node_power: Vec::new(),
        seq,
        timestamp_unix_nanos: t0() + secs * SEC,
        gpus: vec![
            pb::GpuSample {
                index: 0,
                power_milliwatts: Some(300_000),
                energy_millijoules: Some(1_000_000 + joules * 1_000),
                ..Default::default()
            },
            pb::GpuSample {
                index: 1,
                power_milliwatts: Some(333_333),
                ..Default::default()
            },
        ],
        host: None,
    };
    let send = |samples: Vec<pb::NodeSample>| pb::AgentMessage {
        body: Some(pb::agent_message::Body::Batch(pb::SampleBatch { samples })),
    };
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &["--stale-after", "5m"]);
    let mut s = Stream::open(&collector.endpoint(), hello("w-1", 1))
        .await
        .unwrap();
    assert_eq!(s.welcome().await, 0);
    assert_eq!(s.send(send(vec![at(1, 0, 0)])).await, 1);
    // One batch: 1 s later, then standing still, then 5 s back.
    let still_then_back = vec![at(2, 1, 300), at(3, 1, 600), at(4, -4, 900)];
    assert_eq!(s.send(send(still_then_back)).await, 4);
    // An hour later (the counter GPU used 300 J meanwhile).
    assert_eq!(s.send(send(vec![at(5, 3600, 1_200)])).await, 5);
    drop(s);
    let m = tokio::task::spawn_blocking({
        let http = collector.http;
        move || Metrics::parse(&http_get(http, "/metrics"))
    })
    .await
    .unwrap();
    let gpu = |name: &str, gpu: &str| m.one(name, &[("node", "w-1"), ("gpu", gpu)]);
    assert_eq!(
        milli(gpu("capwatch_gpu_energy_joules_total", "0")),
        1_200_000
    );
    // 333.333 W over 1 s, then over 300 s (the window) of the 3,599 s gap.
    let no_counter = 333_333 + 333_333 * 300;
    assert_eq!(
        milli(gpu("capwatch_gpu_energy_joules_total", "1")),
        no_counter
    );
    assert_eq!(gpu("capwatch_gpu_energy_resets_total", "0"), 0.0);
    assert_eq!(gpu("capwatch_gpu_energy_resets_total", "1"), 0.0);
    collector.stop();
    let ledger = capwatch_collector::ledger::Ledger::open(&dir.path().join("ledger.db")).unwrap();
    let b = ledger.bucket_totals("unassigned").unwrap();
    assert_eq!(b.energy_mj, 1_200_000 + no_counter);
    assert_eq!(b.estimated_mj, no_counter);
    assert_eq!(b.samples, 10);
    // Both GPUs: 1 s, then 3,599 s expected; covered: 1 s each, and the
    // window the GPU without counter's power stands for.
    assert_eq!(b.expected_gpu_ns, 2 * 3_600 * SEC as u64);
    assert_eq!(b.gpu_ns, (1 + 1 + 300) * SEC as u64);
}

/// Invariant: `capwatch_gpu_energy_resets_total` has a series for
/// every GPU from its node's Hello on (0 until a reset), and a collector
/// killed and restarted resumes it from the ledger instead of starting
/// again at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_resets_have_a_series_from_the_start_and_survive_a_restart() {
    async fn resets(http: std::net::SocketAddr) -> Vec<(String, f64)> {
        let m = tokio::task::spawn_blocking(move || Metrics::parse(&http_get(http, "/metrics")))
            .await
            .unwrap();
        m.select("capwatch_gpu_energy_resets_total", &[("node", "z-1")])
            .into_iter()
            .map(|(labels, v)| (labels["gpu"].clone(), v))
            .collect()
    }
    /// Samples `seqs`, GPU 0's counter in the last one set back to `mj`
    /// (a driver reload).
    fn reloaded(seqs: std::ops::RangeInclusive<u64>, mj: u64) -> pb::AgentMessage {
        let mut msg = batch(seqs);
        if let Some(pb::agent_message::Body::Batch(b)) = &mut msg.body {
            let last = b.samples.last_mut().unwrap();
            last.gpus[0].energy_millijoules = Some(mj);
        }
        msg
    }
    let at = |gpu0: f64| vec![("0".to_string(), gpu0), ("1".to_string(), 0.0)];
    let dir = tempfile::tempdir().unwrap();
    let args = ["--stale-after", "5m"];
    let mut collector = Collector::start(dir.path(), NO_TENANTS, 0, &args);
    let mut s = Stream::open(&collector.endpoint(), hello("z-1", 3))
        .await
        .unwrap();
    assert_eq!(s.welcome().await, 0);
    assert_eq!(resets(collector.http).await, at(0.0), "before any sample");
    assert_eq!(s.send(reloaded(1..=3, 100)).await, 3);
    assert_eq!(resets(collector.http).await, at(1.0));
    drop(s);
    // Acked means committed: a SIGKILL loses nothing of it.
    collector.child.kill().unwrap();
    collector.child.wait().unwrap();
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &args);
    let mut s = Stream::open(&collector.endpoint(), hello("z-1", 3))
        .await
        .unwrap();
    assert_eq!(s.welcome().await, 3);
    assert_eq!(resets(collector.http).await, at(1.0), "after the restart");
    // It counts on from there.
    assert_eq!(s.send(reloaded(4..=4, 50)).await, 4);
    assert_eq!(resets(collector.http).await, at(2.0));
    drop(s);
    collector.stop();
}

/// Invariant: samples name a GPU by its index, so a Hello whose GPU
/// indexes are not exactly 0..n-1 in inventory order is refused with
/// INVALID_ARGUMENT naming the field, counted, and creates no node; energy
/// cannot land on the wrong GPU (and so the wrong tenant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_whose_gpu_indexes_are_not_their_positions_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &["--stale-after", "5m"]);
    let ep = collector.endpoint();
    // (indexes announced, the position the error must name)
    let cases: [(&[u32], usize); 4] = [(&[1, 0], 0), (&[0, 2], 1), (&[0, 0], 1), (&[5], 0)];
    for (indexes, at) in cases {
        let mut h = hello("i-1", 1);
        if let Some(pb::agent_message::Body::Hello(h)) = &mut h.body {
            h.gpus.truncate(indexes.len());
            for (g, &i) in h.gpus.iter_mut().zip(indexes) {
                g.index = i;
            }
        }
        let refused = Stream::open(&ep, h)
            .await
            .err()
            .unwrap_or_else(|| panic!("indexes {indexes:?} accepted"));
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
        assert!(
            refused.message().contains(&format!("gpus[{at}].index")),
            "{indexes:?}: {refused}"
        );
    }
    let m = tokio::task::spawn_blocking({
        let http = collector.http;
        move || Metrics::parse(&http_get(http, "/metrics"))
    })
    .await
    .unwrap();
    assert_eq!(m.one("capwatch_collector_streams_refused_total", &[]), 4.0);
    assert_eq!(m.one("capwatch_collector_nodes", &[]), 0.0);
    // Indexes in order are accepted.
    let mut s = Stream::open(&ep, hello("i-1", 1)).await.unwrap();
    assert_eq!(s.welcome().await, 0);
    assert_eq!(s.send(batch(1..=2)).await, 2);
    drop(s);
    collector.stop();
}

/// Invariant: a collector that accepts TCP and never answers cannot hold
/// an agent past its drain deadline; the agent reports what it could not
/// deliver and exits non-zero (a bounded run promised delivery).
#[test]
fn a_silent_collector_cannot_hold_the_agent_past_its_drain_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let mut agent = Agent::start(dir.path(), &endpoint, "s-1", 3, "drain_timeout = \"1s\"\n");
    let started = std::time::Instant::now();
    let status = wait_timeout(&mut agent.child, Duration::from_secs(20));
    assert!(
        !status.success(),
        "undelivered samples must fail a bounded run"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    agent
        .log
        .wait_for("drain deadline passed", Duration::from_secs(2));
    drop(silent);
}

/// Invariant: a collector killed with SIGKILL at arbitrary moments and
/// restarted loses nothing and counts nothing twice. After the agents have
/// delivered everything, each GPU's energy (carried by the ledger across
/// the kills) equals its mock counter delta over the whole run to the
/// millijoule, each tenant's total equals the sum over its GPUs, and the
/// ledger's minute buckets add up to the same totals and hold every GPU
/// reading exactly once, with exactly the GPU time the run covered.
#[test]
fn sigkill_at_random_moments_keeps_the_ledger_exact() {
    const N: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let tenants = "[[tenant]]\nid = \"lab\"\ncontracted_kw = 50\nnodes = [\"k-1\"]\n";
    let args = ["--stale-after", "5m"];
    let mut collector = Collector::start(dir.path(), tenants, 0, &args);
    let port = collector.grpc.port();
    let cfg = "reconnect_initial = \"50ms\"\nreconnect_max = \"300ms\"\ndrain_timeout = \"30s\"\n";
    let nodes = ["k-1", "k-2"];
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|n| Agent::start(dir.path(), &collector.endpoint(), n, N, cfg))
        .collect();
    // Kill times from a fixed seed, printed so a failure can be replayed.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for round in 0..3 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let after = Duration::from_millis(400 + x % 900);
        eprintln!("kill round {round}: SIGKILL after {after:?}");
        std::thread::sleep(after);
        collector.child.kill().unwrap();
        collector.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(150));
        collector = Collector::start(dir.path(), tenants, port, &args);
    }
    for a in agents {
        let log = a.finish(Duration::from_secs(60));
        log.wait_for("\"undelivered\":0", Duration::from_secs(1));
    }

    let m = collector.metrics();
    let mut sums = std::collections::BTreeMap::<String, u64>::new();
    for node in nodes {
        let truth = Truth::of(node, N);
        for gpu in 0..8 {
            let labels = [("node", node), ("gpu", &gpu.to_string())];
            let series = m.select("capwatch_gpu_energy_joules_total", &labels);
            assert_eq!(series.len(), 1, "{node} gpu {gpu}");
            let e = milli(series[0].1);
            assert_eq!(e, truth.energy(gpu, 1, N), "{node} gpu {gpu}");
            *sums.entry(series[0].0["tenant"].clone()).or_default() += e;
        }
    }
    for (tenant, sum) in &sums {
        let total = milli(m.one("capwatch_tenant_energy_joules_total", &[("tenant", tenant)]));
        assert_eq!(total, *sum, "{tenant}");
    }
    collector.stop();
    let ledger = capwatch_collector::ledger::Ledger::open(&dir.path().join("ledger.db")).unwrap();
    for (tenant, sum) in &sums {
        let b = ledger.bucket_totals(tenant).unwrap();
        assert_eq!(b.energy_mj, *sum, "{tenant} bucket energy");
        // One node of 8 GPUs per tenant: N readings each, and N - 1
        // intervals of 100 ms each.
        assert_eq!(b.samples, 8 * N, "{tenant} readings");
        assert_eq!(b.gpu_ns, 8 * (N - 1) * 100_000_000, "{tenant} GPU time");
    }
}

/// Invariant: an agent restart (new epoch, driver still loaded: the
/// counters carry on) loses nothing and counts nothing twice: each GPU's
/// energy equals its counter at the end minus its counter at the start.
#[test]
fn agent_restart_carries_energy_through_the_counter() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &["--stale-after", "5m"]);
    let truth = Truth::of("r-2", 1);
    // The "driver" has been up a while: known starting counters.
    let counters = Counters::start(dir.path(), &truth);
    let start = counters.read();
    let cfg = &counters.agent_config;
    for run in 0..2 {
        let log = Agent::start(dir.path(), &collector.endpoint(), "r-2", 15, cfg)
            .finish(Duration::from_secs(30));
        log.wait_for("\"undelivered\":0", Duration::from_secs(1));
        eprintln!("run {run} done");
    }
    let end = counters.read();
    let m = collector.metrics();
    // Two epochs, each counted once.
    assert_eq!(
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "accepted")]
        ),
        30.0
    );
    for uuid in &truth.uuids {
        let e = milli(m.one("capwatch_gpu_energy_joules_total", &[("uuid", uuid)]));
        assert!(end[uuid] > start[uuid]);
        assert_eq!(e, end[uuid] - start[uuid], "{uuid}");
    }
    // No counter went backwards: the restart was not taken for a reload
    // (every GPU has its series, at 0).
    let resets = m.select("capwatch_gpu_energy_resets_total", &[]);
    assert_eq!(resets.len(), truth.uuids.len(), "{resets:?}");
    assert!(resets.iter().all(|(_, v)| *v == 0.0), "{resets:?}");
    collector.stop();
}

/// Invariant: hostile input on other connections (garbage bytes, a
/// truncated HTTP/2 frame, an oversized message, a 10,000-GPU inventory,
/// non-finite and out-of-range readings, a clock a day ahead) is refused
/// with a clear status or a counted rejection, while a real agent streams
/// alongside: its data keeps flowing and its ledger energy is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_leaves_other_agents_and_the_ledger_untouched() {
    use tokio::io::AsyncWriteExt;
    const N: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &["--stale-after", "5m"]);
    let ep = collector.endpoint();
    let agent = Agent::start(dir.path(), &ep, "h-1", N, "");

    // Bytes that are not gRPC, and an HTTP/2 frame cut short.
    for bytes in [
        &b"\x00\x01garbage that is not HTTP/2\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x40\x00\x00\x00\x00\x00\x00\x01short"[..],
    ] {
        let mut raw = tokio::net::TcpStream::connect(collector.grpc)
            .await
            .unwrap();
        raw.write_all(bytes).await.unwrap();
    }

    // A message over the size limit (4 MiB) ends its own stream only.
    let mut s = Stream::open(&ep, hello("x-1", 1)).await.unwrap();
    s.welcome().await;
    let mut huge = batch(1..=1);
    if let Some(pb::agent_message::Body::Batch(b)) = &mut huge.body {
        b.samples = (1..=200_000).map(sample).collect();
    }
    assert!(huge.encoded_len() > 4 << 20);
    s.tx.send(huge).await.unwrap();
    let err = s.next().await.expect_err("oversized message refused");
    assert!(err.message().contains("too large"), "{err}");

    // An inventory of 10,000 GPUs.
    let mut big = hello("x-2", 1);
    if let Some(pb::agent_message::Body::Hello(h)) = &mut big.body {
        h.gpus = (0..10_000)
            .map(|i| pb::GpuInfo {
                index: i,
                uuid: format!("GPU-x-2-{i}"),
                ..Default::default()
            })
            .collect();
    }
    let err = Stream::open(&ep, big)
        .await
        .err()
        .expect("inventory refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("10000"), "{err}");

    // Readings no GPU gives, among good ones: each rejected alone.
    let mut s = Stream::open(&ep, hello("x-3", 1)).await.unwrap();
    s.welcome().await;
    let mut bad = batch(1..=7);
    if let Some(pb::agent_message::Body::Batch(b)) = &mut bad.body {
        for (i, cpu) in [(1, f32::NAN), (2, f32::INFINITY), (3, -1.0)] {
            b.samples[i].host = Some(pb::HostSample {
                cpu_utilization_percent: Some(cpu),
                ..Default::default()
            });
        }
        b.samples[4].gpus[0].utilization_percent = Some(150);
        b.samples[5].gpus[0].power_milliwatts = Some(10_000_000);
        b.samples[6].timestamp_unix_nanos = now_nanos() + 86_400 * 1_000_000_000;
    }
    assert_eq!(s.send(bad).await, 7);
    drop(s);

    let log = tokio::task::spawn_blocking(move || agent.finish(Duration::from_secs(30)))
        .await
        .unwrap();
    log.wait_for("\"undelivered\":0", Duration::from_secs(1));
    let m = tokio::task::spawn_blocking({
        let http = collector.http;
        move || Metrics::parse(&http_get(http, "/metrics"))
    })
    .await
    .unwrap();
    let truth = Truth::of("h-1", N);
    for gpu in 0..8 {
        let e = milli(m.one(
            "capwatch_gpu_energy_joules_total",
            &[("node", "h-1"), ("gpu", &gpu.to_string())],
        ));
        assert_eq!(e, truth.energy(gpu, 1, N), "gpu {gpu}");
    }
    let rejected = |reason: &str| {
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "rejected"), ("reason", reason)],
        )
    };
    assert_eq!(rejected("malformed"), 3.0);
    assert_eq!(rejected("utilization"), 1.0);
    assert_eq!(rejected("power"), 1.0);
    assert_eq!(rejected("timestamp"), 1.0);
    // x-3 kept its good sample; x-1's oversized batch counted nothing.
    assert_eq!(
        m.one("capwatch_node_samples_total", &[("node", "x-3")]),
        1.0
    );
    assert_eq!(
        m.one("capwatch_node_samples_total", &[("node", "x-1")]),
        0.0
    );
    collector.stop();
}

/// `(seqs)` as one batch of `sample`s restamped one second apart from
/// `t0` (Unix seconds).
fn batch_at(t0: i64, seqs: std::ops::RangeInclusive<u64>) -> pb::AgentMessage {
    let mut samples = Vec::new();
    for seq in seqs {
        let mut s = sample(seq);
        s.timestamp_unix_nanos = (t0 + seq as i64) * 1_000_000_000;
        samples.push(s);
    }
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Batch(pb::SampleBatch { samples })),
    }
}

/// Invariant: rows at or before `finalized_through` never change. A spool
/// delivered three hours late adds to minutes already reported final: the
/// rows stay byte for byte what they were, the late energy is an
/// adjustment (booked when, for which minute, tenant and node, in which
/// revision), and rows plus adjustments are the energy counted, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_spool_becomes_an_adjustment_and_final_rows_stay_final() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &["--stale-after", "5m"]);
    let ep = collector.endpoint();
    let now = now_nanos() / 1_000_000_000;
    let t0 = (now - 3 * 3600).div_euclid(3600) * 3600;
    let hour = |t: i64| jiff::Timestamp::from_second(t).unwrap().to_string();
    let query = format!("/v1/usage?from={}&to={}&step=1m", hour(t0), hour(t0 + 3600));
    let read = |format: &str| http_get(collector.http, &format!("{query}&format={format}"));

    // The first 20 samples arrive (and are committed) while their minute
    // is open to them.
    let mut s = Stream::open(&ep, hello("late-1", 1)).await.unwrap();
    assert_eq!(s.welcome().await, 0);
    assert_eq!(s.send(batch_at(t0, 1..=20)).await, 20);
    let before: serde_json::Value = serde_json::from_str(&read("json")).unwrap();
    let before_csv = read("csv");
    let watermark: jiff::Timestamp = before["finalized_through"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        watermark.as_second() >= t0 + 3600,
        "the hour is final: {before}"
    );
    assert!(
        before["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["partial"] == false)
    );

    // The rest of the spool, three hours late: seconds 21-80, across the
    // first two minutes, both final.
    let booked_from = now_nanos() / 1_000_000_000;
    assert_eq!(s.send(batch_at(t0, 21..=80)).await, 80);
    drop(s);
    let after: serde_json::Value = serde_json::from_str(&read("json")).unwrap();
    let after_csv = read("csv");
    assert_eq!(after["rows"], before["rows"], "final rows changed");
    let usage_lines = |csv: &str| -> Vec<String> {
        csv.lines()
            .filter(|l| !l.contains(",adjustment,"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(usage_lines(&after_csv), usage_lines(&before_csv));
    let revision = before["revision"].as_u64().expect("a revision");

    // GPU 0 counts 500 mJ a second; GPU 1 draws 333.333 W.
    let per_second = 500 + 333_333;
    let rows: u64 = after["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| exact(&r["energy_millijoules"]))
        .sum();
    assert_eq!(rows, 19 * per_second, "the rows hold what came in time");
    let adjustments = after["adjustments"].as_array().expect("adjustments");
    let late: u64 = adjustments
        .iter()
        .map(|a| exact(&a["energy_millijoules"]))
        .sum();
    assert_eq!(late, 60 * per_second, "the late energy, exactly");
    let mut minutes = Vec::new();
    for a in adjustments {
        assert_eq!(a["tenant"], "unassigned");
        assert_eq!(a["node"], "late-1");
        assert!(a["revision"].as_u64().unwrap() > revision, "{a}");
        let booked: jiff::Timestamp = a["booked_at"].as_str().unwrap().parse().unwrap();
        assert!(
            booked.as_second() >= booked_from && booked.as_second() <= now_nanos() / 1_000_000_000,
            "{a}"
        );
        minutes.push(a["start"].as_str().unwrap().to_string());
    }
    minutes.sort();
    minutes.dedup();
    assert_eq!(minutes, vec![hour(t0), hour(t0 + 60)]);
    let adjustment_lines = after_csv
        .lines()
        .filter(|l| l.contains(",adjustment,late-1,"))
        .count();
    assert_eq!(adjustment_lines, adjustments.len());
    let total = milli(collector.metrics().one(
        "capwatch_tenant_energy_joules_total",
        &[("tenant", "unassigned")],
    ));
    assert_eq!(
        rows + late,
        total,
        "rows plus adjustments are all the energy"
    );
    assert_eq!(total, 79 * per_second);

    // A billing job asks what changed since the revision it last saw.
    let since = |r: u64| -> serde_json::Value {
        serde_json::from_str(&http_get(
            collector.http,
            &format!("{query}&since_revision={r}"),
        ))
        .unwrap()
    };
    assert_eq!(since(revision)["adjustments"], after["adjustments"]);
    let latest = after["revision"].as_u64().unwrap();
    assert!(latest > revision);
    assert_eq!(since(latest)["adjustments"], serde_json::json!([]));
    // A bad cursor's 400 is checked in-process: http_api.rs.
    // The usage command asks the same, of the collector or of the file.
    let ask = |before: &[&str], after: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(bin("capwatch-collector"))
            .args(before)
            .args(["usage", "--step", "1m", "--format", "json"])
            .args(after)
            .args(["--from", &hour(t0), "--to", &hour(t0 + 3600)])
            .args(["--since-revision", &revision.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let url = format!("http://{}", collector.http);
    assert_eq!(
        ask(&[], &["--url", &url])["adjustments"],
        after["adjustments"]
    );
    collector.stop();
    let ledger = dir.path().join("ledger.db");
    let local = ask(&["--ledger", ledger.to_str().unwrap()], &[]);
    assert_eq!(local["adjustments"], after["adjustments"]);
    assert_eq!(local["rows"], before["rows"]);
}

/// Two tenants with the same 10 W contract (600 J a minute); `live` holds
/// node live-1, `late` node late-1.
const TWO_CONTRACTS: &str = r#"
[[tenant]]
id = "live"
contracted_kw = 0.01
nodes = ["live-*"]

[[tenant]]
id = "late"
contracted_kw = 0.01
nodes = ["late-*"]
"#;

/// A Hello for `node` with one 700 W GPU that has an energy counter,
/// sampling every 200 ms.
fn one_gpu_hello(node: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            node_power_sources: Vec::new(),
            node_id: node.into(),
            agent_version: "test".into(),
            stream_epoch: 1,
            interval_millis: 200,
            gpus: vec![pb::GpuInfo {
                index: 0,
                uuid: format!("GPU-{node}"),
                model: "test".into(),
                power_limit_milliwatts: Some(700_000),
                memory_total_bytes: None,
                energy_counter_supported: true,
                ..Default::default()
            }],
            host: None,
        })),
    }
}

/// Sample `seq` stamped `ts`: 600 W, the counter 120 J further per sample.
fn at_600_watts(seq: u64, ts: i64) -> pb::NodeSample {
    pb::NodeSample {
        node_power: Vec::new(),
        seq,
        timestamp_unix_nanos: ts,
        gpus: vec![pb::GpuSample {
            index: 0,
            power_milliwatts: Some(600_000),
            energy_millijoules: Some(5_000_000 + 120_000 * seq),
            ..Default::default()
        }],
        host: None,
    }
}

fn one_batch(samples: Vec<pb::NodeSample>) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Batch(pb::SampleBatch { samples })),
    }
}

/// Invariant: over-contract time and overage are computed in sample time
/// from the ledger's energy, so the same samples give the same figures
/// whether they arrive as they are taken or as a spool replayed 45
/// minutes late; and the replayed samples are not live power. (The real
/// agent stamps its own clock, so the late spool is a crafted stream.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_contract_is_the_same_live_or_replayed_late_and_late_power_is_not_live() {
    use capwatch_collector::usage::rfc3339;
    const N: u64 = 20;
    const LATE_NS: i64 = 45 * 60 * 1_000_000_000;
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), TWO_CONTRACTS, 0, &["--stale-after", "30s"]);
    let ep = collector.endpoint();

    // Live: each sample sent as it is taken, every 200 ms.
    let mut live = Stream::open(&ep, one_gpu_hello("live-1")).await.unwrap();
    assert_eq!(live.welcome().await, 0);
    let mut stamps = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for seq in 1..=N {
        tick.tick().await;
        let ts = now_nanos();
        stamps.push(ts);
        live.tx
            .send(one_batch(vec![at_600_watts(seq, ts)]))
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < N {
        match live.next().await.unwrap() {
            pb::collector_message::Body::Ack(a) => acked = a.acked_seq,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    // Late: the same samples, stamped 45 minutes earlier, in one batch.
    let mut late = Stream::open(&ep, one_gpu_hello("late-1")).await.unwrap();
    assert_eq!(late.welcome().await, 0);
    let replay = (1..=N)
        .map(|seq| at_600_watts(seq, stamps[seq as usize - 1] - LATE_NS))
        .collect();
    assert_eq!(late.send(one_batch(replay)).await, N);

    // Just acked, but 45 minutes old by their own time: not live power.
    let listed: serde_json::Value =
        serde_json::from_str(&http_get(collector.http, "/v1/tenants")).unwrap();
    let tenant = |id: &str| {
        let t = listed["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()
            .clone();
        (
            t["power_watts"].as_f64().unwrap(),
            t["gpus_reporting"].as_u64().unwrap(),
            t["gpus_stale"].as_u64().unwrap(),
        )
    };
    assert_eq!(tenant("late"), (0.0, 0, 1));
    assert_eq!(tenant("live"), (600.0, 1, 0));
    let m = collector.metrics();
    // No fresh GPU: no data, not 0 W.
    assert!(
        m.select("capwatch_tenant_power_watts", &[("tenant", "late")])
            .is_empty()
    );
    assert_eq!(
        m.one("capwatch_tenant_reporting", &[("tenant", "late")]),
        0.0
    );
    assert_eq!(m.one("capwatch_gpu_up", &[("node", "late-1")]), 0.0);

    // Per minute, from the minute of the first sample to the one after the
    // last: identical figures, shifted by 45 minutes.
    let minute = 60_000_000_000;
    let from = stamps[0].div_euclid(minute) * 60;
    let to = (stamps[N as usize - 1].div_euclid(minute) + 1) * 60;
    let rows = |tenant: &str, shift: i64| -> Vec<(u64, f64, f64)> {
        let q = format!(
            "/v1/tenants/{tenant}/usage?from={}&to={}&step=1m",
            rfc3339(from - shift),
            rfc3339(to - shift)
        );
        let r: serde_json::Value = serde_json::from_str(&http_get(collector.http, &q)).unwrap();
        // A minute already final when its samples arrive keeps its row;
        // what they bring is in the adjustments to that row: billing sees
        // the two together.
        let adjustments = r["adjustments"].as_array().unwrap();
        r["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                let of_row = adjustments.iter().filter(|a| a["start"] == row["start"]);
                let mut sum = (
                    amount(&row["energy_millijoules"]),
                    row["seconds_over_contract"].as_f64().unwrap(),
                    row["overage_kwh"].as_f64().unwrap(),
                );
                for a in of_row {
                    sum.0 += amount(&a["energy_millijoules"]);
                    sum.1 += a["seconds_over_contract"].as_f64().unwrap();
                    sum.2 += a["overage_kwh"].as_f64().unwrap();
                }
                sum
            })
            .collect()
    };
    let live_rows = rows("live", 0);
    let late_rows = rows("late", LATE_NS / 1_000_000_000);
    assert_eq!(live_rows, late_rows);
    // Each minute's energy against 10 W × 60 s, and all of it counted.
    let mut over_seconds = 0.0;
    for &(e, seconds, kwh) in &live_rows {
        let over = e > 600_000;
        assert_eq!(seconds, if over { 60.0 } else { 0.0 }, "{live_rows:?}");
        let want = if over {
            (e - 600_000) as f64 / 3.6e9
        } else {
            0.0
        };
        assert_eq!(kwh, want, "{live_rows:?}");
        over_seconds += seconds;
    }
    assert_eq!(
        live_rows.iter().map(|r| r.0).sum::<u64>(),
        120_000 * (N - 1)
    );
    assert!(over_seconds >= 60.0, "{live_rows:?}");
    // The Prometheus counter, from the same minutes.
    let m = collector.metrics();
    let counter = |t: &str| {
        m.one(
            "capwatch_tenant_over_contract_seconds_total",
            &[("tenant", t)],
        )
    };
    assert_eq!(counter("live"), over_seconds);
    assert_eq!(counter("late"), over_seconds);
    drop((live, late));
    collector.stop();
}
