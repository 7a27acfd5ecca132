//! Node power against the real collector binary, through raw streams: the
//! ledger's node energy per tenant equals what the sources measured, split
//! by the documented rule on a shared node, across a collector SIGKILLed
//! and started again mid-stream; bad node readings are dropped and counted
//! without costing their samples' GPU energy.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use capwatch_proto::v1 as pb;

use crate::support::raw::Stream;
use crate::support::*;

/// lab-a and lab-b share n-1 (one GPU each, by UUID); lab-a has n-2 whole.
const TENANTS: &str = r#"
[[tenant]]
id = "lab-a"
contracted_kw = 50
gpus = ["GPU-n-1-0"]
nodes = ["n-2"]

[[tenant]]
id = "lab-b"
contracted_kw = 50
basis = "node"
gpus = ["GPU-n-1-1"]
"#;

const N: u64 = 40;
const EPOCH: u64 = 7;

/// An hour ago, in whole seconds: recent enough for the collector's
/// sample-age check, fixed for the whole test.
fn t0() -> i64 {
    static T0: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *T0.get_or_init(|| (now_secs() - 3600) * 1_000_000_000)
}

fn source(index: u32, kind: &str, domain: &str, name: &str, counter: bool) -> pb::NodePowerSource {
    pb::NodePowerSource {
        index,
        kind: kind.into(),
        domain: domain.into(),
        name: name.into(),
        energy_counter_supported: counter,
        interval_millis: 1000,
    }
}

/// n-1: two GPUs with counters, a BMC with a lifetime energy counter and
/// a RAPL package (inside the BMC's reading: never added). n-2: one GPU
/// and an IPMI reading without a counter (integrated).
fn hello(node: &str) -> pb::AgentMessage {
    let gpus = if node == "n-1" { 2 } else { 1 };
    let sources = if node == "n-1" {
        vec![
            source(0, "redfish", "node", "1", true),
            source(1, "rapl", "cpu", "package-0", true),
        ]
    } else {
        vec![source(0, "ipmi", "node", "node", false)]
    };
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            node_id: node.into(),
            agent_version: "test".into(),
            stream_epoch: EPOCH,
            interval_millis: 1000,
            gpus: (0..gpus)
                .map(|index| pb::GpuInfo {
                    index,
                    uuid: format!("GPU-{node}-{index}"),
                    model: "test".into(),
                    power_limit_milliwatts: Some(700_000),
                    memory_total_bytes: None,
                    energy_counter_supported: true,
                    ..Default::default()
                })
                .collect(),
            host: None,
            node_power_sources: sources,
        })),
    }
}

/// Node power readings that must be dropped (index out of range, power
/// beyond any server, a counter beyond what the ledger keeps) and one sent
/// before (not after its source's last reading).
fn bad_readings(ts: i64) -> Vec<pb::NodePowerReading> {
    vec![
        pb::NodePowerReading {
            source: 9,
            timestamp_unix_nanos: ts,
            power_milliwatts: Some(1),
            energy_millijoules: None,
        },
        pb::NodePowerReading {
            source: 0,
            timestamp_unix_nanos: ts,
            power_milliwatts: Some(u64::MAX / 2),
            energy_millijoules: None,
        },
        pb::NodePowerReading {
            source: 0,
            timestamp_unix_nanos: ts,
            power_milliwatts: None,
            energy_millijoules: Some(u64::MAX),
        },
        pb::NodePowerReading {
            source: 0,
            timestamp_unix_nanos: ts - 5_000_000_000,
            power_milliwatts: Some(1_000_000),
            energy_millijoules: Some(1),
        },
    ]
}

/// Sample `seq` of `node`, 1 s apart. n-1: GPU counters rise 300 J and
/// 100 J a second, the BMC's 1000.003 J, the RAPL package's 150 J. n-2:
/// its GPU 200 J a second, the IPMI reading 400 W. With `bad`, the
/// readings of `bad_readings` come after the good ones.
fn sample(node: &str, seq: u64, bad: bool) -> pb::NodeSample {
    let ts = t0() + seq as i64 * 1_000_000_000;
    let gpu = |index: u32, per_s: u64| pb::GpuSample {
        index,
        power_milliwatts: Some(per_s),
        energy_millijoules: Some(1_000_000 + per_s * seq),
        ..Default::default()
    };
    let reading = |source: u32, power: u64, energy: Option<u64>| pb::NodePowerReading {
        source,
        timestamp_unix_nanos: ts,
        power_milliwatts: Some(power),
        energy_millijoules: energy,
    };
    let (gpus, mut node_power) = if node == "n-1" {
        (
            vec![gpu(0, 300_000), gpu(1, 100_000)],
            vec![
                reading(0, 1_000_003, Some(10_000_000 + 1_000_003 * seq)),
                reading(1, 150_000, Some(150_000 * seq)),
            ],
        )
    } else {
        (vec![gpu(0, 200_000)], vec![reading(0, 400_000, None)])
    };
    if bad {
        node_power.extend(bad_readings(ts));
    }
    pb::NodeSample {
        seq,
        timestamp_unix_nanos: ts,
        gpus,
        host: None,
        node_power,
    }
}

fn batch(node: &str, seqs: impl IntoIterator<Item = u64>, bad: bool) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Batch(pb::SampleBatch {
            samples: seqs.into_iter().map(|s| sample(node, s, bad)).collect(),
        })),
    }
}

/// (GPU energy, node energy, estimated node energy) in mJ that the usage
/// API of the collector at `http` reports per tenant over the hours around
/// the samples: rows and adjustments.
fn usage(http: SocketAddr) -> BTreeMap<String, (u64, u64, u64)> {
    use capwatch_collector::usage::rfc3339;
    let hour = t0() / 1_000_000_000 / 3600 * 3600;
    let path = format!(
        "/v1/usage?from={}&to={}&step=1h",
        rfc3339(hour - 3600),
        rfc3339(hour + 3 * 3600)
    );
    let body = http_get(http, &path);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut by: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for row in v["rows"].as_array().unwrap_or_else(|| panic!("{body}")) {
        let e = by
            .entry(row["tenant"].as_str().unwrap().to_string())
            .or_default();
        e.0 += exact(&row["energy_millijoules"]);
        e.1 += exact(&row["node_energy_millijoules"]);
        if row["node_energy_estimated"].as_bool().unwrap() {
            e.2 += 1;
        }
    }
    for adj in v["adjustments"].as_array().unwrap() {
        let e = by
            .entry(adj["tenant"].as_str().unwrap().to_string())
            .or_default();
        e.0 += exact(&adj["energy_millijoules"]);
        e.1 += exact(&adj["node_energy_millijoules"]);
        if adj["node_energy_estimated"].as_bool().unwrap() {
            e.2 += 1;
        }
    }
    by.retain(|_, v| *v != (0, 0, 0));
    by
}

/// Invariant: the ledger's node energy per tenant equals the sources'
/// ground truth to the millijoule, split by the rule on the shared node,
/// with a collector SIGKILLed while a batch was in flight and started
/// again; bad node readings are dropped and counted, and GPU energy is
/// what the GPUs' counters say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_energy_is_exact_across_a_collector_killed_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--stale-after", "5m"];
    let collector = Collector::start(dir.path(), TENANTS, 0, &extra);
    let port = collector.grpc.port();
    let ep = collector.endpoint();
    let mut streams = Vec::new();
    for node in ["n-1", "n-2"] {
        let mut s = Stream::open(&ep, hello(node)).await.unwrap();
        assert_eq!(s.welcome().await, 0);
        assert_eq!(s.send(batch(node, 1..=15, false)).await, 15);
        // In flight when the collector dies: committed or not, the agent
        // learns which from the next Welcome.
        s.tx.send(batch(node, 16..=20, false)).await.unwrap();
        streams.push(s);
    }
    let mut collector = collector;
    collector.child.kill().unwrap();
    collector.child.wait().unwrap();
    drop(streams);

    let collector = Collector::start_on(dir.path(), TENANTS, port, &extra);
    for node in ["n-1", "n-2"] {
        let mut s = Stream::open(&ep, hello(node)).await.unwrap();
        let acked = s.welcome().await;
        assert!((15..=20).contains(&acked), "{node}: acked {acked}");
        // Sent again from before the ack (an agent that lost acks): the
        // samples up to it are duplicates, their readings too.
        let from = acked - 3;
        assert_eq!(s.send(batch(node, from..=30, false)).await, 30);
        // One sample with bad node readings: it is kept, they are not.
        assert_eq!(s.send(batch(node, 31..=31, true)).await, 31);
        assert_eq!(s.send(batch(node, 32..=N, false)).await, N);
    }

    // Ground truth over the N - 1 intervals after the baselines. n-1 per
    // interval: E = 1000.003 J >= G = 400 J, so each tenant gets its GPU
    // energy and half of the 600.003 J left (the odd millijoule to the
    // first id): lab-a 600 002, lab-b 400 001. n-2: 400 W integrated, all
    // lab-a's.
    let intervals = N - 1;
    let want = BTreeMap::from([
        (
            "lab-a".to_string(),
            (
                intervals * (300_000 + 200_000),
                intervals * (600_002 + 400_000),
            ),
        ),
        (
            "lab-b".to_string(),
            (intervals * 100_000, intervals * 400_001),
        ),
    ]);
    // Committed before the ack: the ledger holds it now.
    let got: BTreeMap<String, (u64, u64)> = usage(collector.http)
        .into_iter()
        .map(|(t, (gpu, node, _))| (t, (gpu, node)))
        .collect();
    assert_eq!(got, want);
    // n-2's node energy was integrated: its rows say so.
    assert!(usage(collector.http)["lab-a"].2 > 0);

    let m = collector.metrics();
    for reason in ["source", "power", "energy"] {
        assert_eq!(
            m.one(
                "capwatch_collector_node_power_readings_total",
                &[("outcome", "rejected"), ("reason", reason)],
            ),
            2.0,
            "{reason}: one per node"
        );
    }
    assert!(
        m.one(
            "capwatch_collector_node_power_readings_total",
            &[("outcome", "duplicate")],
        ) >= 2.0
    );
    // The ledger's totals, as /metrics shows them after a commit.
    eventually(std::time::Duration::from_secs(10), "ledger totals", || {
        let m = collector.metrics();
        milli(m.one(
            "capwatch_tenant_node_energy_joules_total",
            &[("tenant", "lab-b")],
        )) == intervals * 400_001
    });
    collector.stop();
}

/// The node energy per tenant that the usage API of the collector at
/// `http` reports for the hours around now, rows and adjustments.
fn node_energy_now(http: SocketAddr) -> BTreeMap<String, u64> {
    use capwatch_collector::usage::rfc3339;
    let hour = now_secs() / 3600 * 3600;
    let path = format!(
        "/v1/usage?from={}&to={}&step=1h",
        rfc3339(hour - 3600),
        rfc3339(hour + 2 * 3600)
    );
    let body = http_get(http, &path);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut by = BTreeMap::new();
    let rows = v["rows"].as_array().unwrap_or_else(|| panic!("{body}"));
    for row in rows.iter().chain(v["adjustments"].as_array().unwrap()) {
        *by.entry(row["tenant"].as_str().unwrap().to_string())
            .or_default() += exact(&row["node_energy_millijoules"]);
    }
    by.retain(|_, v| *v != 0);
    by
}

/// Invariant, with the real binaries: a real agent reads a stand-in BMC
/// (Redfish over TLS with basic auth, a lifetime energy sensor) and the
/// ledger's node energy is the sensor's difference from the collector's
/// first reading to its last, to the millijoule; the live node power and
/// the node-basis utilization are the BMC's reading.
#[test]
fn a_real_agent_bills_its_bmc_energy_sensor_to_the_millijoule() {
    use capwatch_testkit::redfish::{Options, Schema, Service};
    let dir = tempfile::tempdir().unwrap();
    let bmc = Service::start(
        Options::new(Schema::NewJoules)
            .tls()
            .auth("capwatch", "pa:ss"),
    );
    bmc.set_power_mw(4_200_000);
    // A lifetime counter far from zero: none of it is this run's.
    bmc.advance_mj(987_654_321);
    let ca = dir.path().join("bmc-ca.pem");
    std::fs::write(&ca, bmc.ca_pem().unwrap()).unwrap();
    let credentials = secret(dir.path(), "bmc.credentials", "capwatch:pa:ss\n");
    let tenants = "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 8.4\nbasis = \"node\"\nnodes = [\"bmc-node\"]\n";
    let collector = Collector::start(dir.path(), tenants, 0, &[]);
    // The start-up listing waits for discovery as long as the timeout: a
    // TLS handshake and three requests on a loaded test machine can take
    // more than half a second, and a source not listed in time is not
    // sent this run.
    let config = format!(
        "[redfish]\nurl = \"{}\"\ncredentials_file = \"{}\"\nca_file = \"{}\"\ninterval = \"2s\"\ntimeout = \"2s\"\n\n[mock]\nnode_power = false\n",
        bmc.url(),
        credentials.display(),
        ca.display()
    );
    let agent = Agent::start(
        dir.path(),
        &collector.endpoint(),
        "bmc-node",
        1_000_000,
        &config,
    );
    let source = [
        ("node", "bmc-node"),
        ("source", "redfish"),
        ("domain", "node"),
    ];
    // The counter stands still until the collector holds a reading: that
    // one is the baseline.
    eventually(
        std::time::Duration::from_secs(30),
        "the collector's first BMC reading",
        || {
            !collector
                .metrics()
                .select("capwatch_node_source_power_watts", &source)
                .is_empty()
        },
    );
    let mut want = 0;
    for i in 0..8 {
        let step = 1_234_567 + i;
        bmc.advance_mj(step);
        want += step;
        std::thread::sleep(std::time::Duration::from_millis(400));
    }
    // Every step is in the ledger once the agent's next read is.
    eventually(
        std::time::Duration::from_secs(30),
        "the BMC's energy in the ledger",
        || node_energy_now(collector.http).get("lab-a") == Some(&want),
    );
    let m = collector.metrics();
    assert_eq!(
        milli(m.one("capwatch_node_source_power_watts", &source)),
        4_200_000
    );
    assert_eq!(
        milli(m.one("capwatch_tenant_node_power_watts", &[("tenant", "lab-a")])),
        4_200_000
    );
    let utilization = m.one(
        "capwatch_tenant_capacity_utilization_ratio",
        &[("tenant", "lab-a")],
    );
    assert!((utilization - 0.5).abs() < 1e-9, "{utilization}");
    // Nothing more arrives while the counter stands still (a read later).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(node_energy_now(collector.http)["lab-a"], want);
    drop(agent);
    collector.stop();
}

/// lab-a and lab-b share k-1, one GPU each.
const SHARED: &str = r#"
[[tenant]]
id = "lab-a"
contracted_kw = 50
gpus = ["GPU-k-1-0"]

[[tenant]]
id = "lab-b"
contracted_kw = 50
basis = "node"
gpus = ["GPU-k-1-1"]
"#;

const KWH: u64 = 3_600_000_000;

/// An hour ago, 10 s into its minute.
fn coarse_t0() -> i64 {
    (now_secs() - 3600) / 60 * 60 * 1_000_000_000 + 10_000_000_000
}

/// k-1 with two GPUs and a BMC whose lifetime counter counts whole kWh,
/// read every 10 s.
fn coarse_hello() -> pb::AgentMessage {
    let mut bmc = source(0, "redfish", "node", "1", true);
    bmc.interval_millis = 10_000;
    let Some(pb::agent_message::Body::Hello(mut h)) = hello("n-1").body else {
        unreachable!("hello() says Hello")
    };
    h.node_id = "k-1".into();
    h.interval_millis = 10_000;
    for g in &mut h.gpus {
        g.uuid = g.uuid.replace("n-1", "k-1");
    }
    h.node_power_sources = vec![bmc];
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(h)),
    }
}

/// Samples `seqs` of k-1, sample `s` taken `10 (s - 1)` s after `t0`:
/// GPU 0 at 600 W, GPU 1 at 100 W, the BMC counting whole kWh from
/// 5 kWh, a step every 180 s (20 kW).
fn coarse_batch(t0: i64, seqs: impl IntoIterator<Item = u64>) -> pb::AgentMessage {
    let sample = |seq: u64| {
        let s = 10 * (seq - 1);
        let ts = t0 + s as i64 * 1_000_000_000;
        let gpu = |index: u32, mw: u64| pb::GpuSample {
            index,
            power_milliwatts: Some(mw),
            energy_millijoules: Some(mw * s),
            ..Default::default()
        };
        pb::NodeSample {
            seq,
            timestamp_unix_nanos: ts,
            gpus: vec![gpu(0, 600_000), gpu(1, 100_000)],
            host: None,
            node_power: vec![pb::NodePowerReading {
                source: 0,
                timestamp_unix_nanos: ts,
                power_milliwatts: Some(20_000_000),
                energy_millijoules: Some((5 + (seq - 1) / 18) * KWH),
            }],
        }
    };
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Batch(pb::SampleBatch {
            samples: seqs.into_iter().map(sample).collect(),
        })),
    }
}

/// Node energy per (tenant, minute start) over the hours around `t0`, as
/// the usage API reports it by minute: rows and adjustments.
fn node_minutes(http: SocketAddr, t0: i64) -> BTreeMap<(String, String), u64> {
    use capwatch_collector::usage::rfc3339;
    let hour = t0 / 1_000_000_000 / 3600 * 3600;
    let path = format!(
        "/v1/usage?from={}&to={}&step=1m",
        rfc3339(hour - 3600),
        rfc3339(hour + 3 * 3600)
    );
    let body = http_get(http, &path);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut by = BTreeMap::new();
    let rows = v["rows"].as_array().unwrap_or_else(|| panic!("{body}"));
    for row in rows.iter().chain(v["adjustments"].as_array().unwrap()) {
        let key = (
            row["tenant"].as_str().unwrap().to_string(),
            row["start"].as_str().unwrap().to_string(),
        );
        *by.entry(key).or_default() += exact(&row["node_energy_millijoules"]);
    }
    by.retain(|_, v| *v != 0);
    by
}

/// Invariant, with the real collector: a whole-kWh BMC counter's steps
/// are each spread over the 180 s since the counter last changed, by
/// minute, and split by the GPU energy of each tenant since then, to the
/// millijoule; with the collector SIGKILLed in the middle of a stretch
/// and started again, which resumes the stretch from the node's cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coarse_bmc_counter_is_spread_and_split_alike_across_a_collector_killed_mid_stretch() {
    use capwatch_collector::usage::rfc3339;
    let t0 = coarse_t0();
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path(), SHARED, 0, &["--stale-after", "5m"]);
    let port = collector.grpc.port();
    let ep = collector.endpoint();
    let mut s = Stream::open(&ep, coarse_hello()).await.unwrap();
    assert_eq!(s.welcome().await, 0);
    // Through the first step (sample 19, 180 s) and half the next stretch.
    assert_eq!(s.send(coarse_batch(t0, 1..=28)).await, 28);
    let mut collector = collector;
    collector.child.kill().unwrap();
    collector.child.wait().unwrap();
    drop(s);

    let collector = Collector::start_on(dir.path(), SHARED, port, &["--stale-after", "5m"]);
    let mut s = Stream::open(&ep, coarse_hello()).await.unwrap();
    assert_eq!(s.welcome().await, 28);
    assert_eq!(s.send(coarse_batch(t0, 26..=37)).await, 37);

    // Each 180 s stretch: G = 108 kJ (lab-a) and 18 kJ (lab-b), the rest
    // of the kWh 1:1 by GPUs; spread evenly over it: t0 is 10 s into its
    // minute, so the minutes hold 50, 60, 60, 10 + 50, 60, 60 and 10 s of
    // the two stretches.
    let minute = |i: i64| rfc3339((t0 / 1_000_000_000) / 60 * 60 + 60 * i);
    let mut want = BTreeMap::new();
    for (tenant, share) in [("lab-a", 1_845_000_000u64), ("lab-b", 1_755_000_000)] {
        for (i, secs) in [50, 60, 60, 60, 60, 60, 10].into_iter().enumerate() {
            want.insert((tenant.to_string(), minute(i as i64)), share * secs / 180);
        }
    }
    let got = node_minutes(collector.http, t0);
    assert_eq!(got, want);
    assert_eq!(
        got.values().sum::<u64>(),
        2 * KWH,
        "the counter's difference"
    );
    collector.stop();
}
