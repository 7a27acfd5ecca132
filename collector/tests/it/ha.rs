//! Several collectors on one PostgreSQL ledger, against the real binaries
//! and a real PostgreSQL server of the test's own: collectors killed while
//! agents fail over between them, one node streaming to two collectors at
//! once (a split brain), and a network partition between one collector and
//! the database. In each, the ledger must equal what the agents measured,
//! to the millijoule and to the reading: nothing lost, nothing counted
//! twice.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use capwatch_proto::v1 as pb;
use capwatch_testkit::pg::PgServer;

use crate::support::raw::Stream;
use crate::support::*;

/// One tenant per node (`t-<node>`), so that a tenant's usage is one
/// node's.
fn tenant_per_node(nodes: &[&str]) -> String {
    nodes
        .iter()
        .map(|n| format!("[[tenant]]\nid = \"t-{n}\"\ncontracted_kw = 50\nnodes = [\"{n}\"]\n\n"))
        .collect()
}

/// (energy mJ, GPU readings) the usage API of the collector at `http`
/// reports for `tenant` over the hours around now: rows and adjustments.
fn usage(http: SocketAddr, tenant: &str) -> (u64, u64) {
    use capwatch_collector::usage::rfc3339;
    let hour = now_secs() / 3600 * 3600;
    let path = format!(
        "/v1/tenants/{tenant}/usage?from={}&to={}&step=1h",
        rfc3339(hour - 3 * 3600),
        rfc3339(hour + 2 * 3600)
    );
    let body = http_get(http, &path);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut energy = 0;
    let mut readings = 0;
    for key in ["rows", "adjustments"] {
        let rows = v[key].as_array().unwrap_or_else(|| panic!("{body}"));
        energy += energy_mj(rows);
        readings += rows
            .iter()
            .map(|r| r["readings"].as_u64().unwrap())
            .sum::<u64>();
    }
    (energy, readings)
}

/// What a mock agent with the test settings measured on `node` over
/// `samples` samples: (the sum of its 8 GPUs' counter deltas, readings).
fn node_truth(node: &str, samples: u64) -> (u64, u64) {
    let t = Truth::of(node, samples);
    (
        (0..8).map(|gpu| t.energy(gpu, 1, samples)).sum(),
        8 * samples,
    )
}

/// A collector on the ledger at `url`, named `id`, listening for agents
/// on `grpc_port` (0: any), with `env` on top.
fn collector(
    dir: &std::path::Path,
    tenants: &str,
    grpc_port: u16,
    url: &str,
    id: &str,
    env: &[(&str, &str)],
) -> Collector {
    let mut cmd: Command = Collector::command_pg_as(dir, tenants, grpc_port, url, id);
    cmd.args(["--stale-after", "5m"]).envs(env.iter().copied());
    Collector::spawn(cmd)
}

fn counter(c: &Collector, name: &str, labels: &[(&str, &str)]) -> f64 {
    c.metrics().one(name, labels)
}

fn commits(c: &Collector, result: &str) -> f64 {
    counter(
        c,
        "capwatch_collector_ledger_commits_total",
        &[("result", result)],
    )
}

fn connected(c: &Collector) -> f64 {
    counter(c, "capwatch_collector_agents_connected", &[])
}

/// Waits for every agent to exit 0 with nothing undelivered; returns the
/// collector switches they made together.
fn finish_all(agents: Vec<Agent>, limit: Duration) -> u64 {
    agents
        .into_iter()
        .map(|a| {
            let log = a.finish(limit);
            let stopped = log.wait_for("agent stopped", Duration::from_secs(5));
            assert_eq!(json_number(&stopped, "undelivered"), 0, "{stopped}");
            json_number(&stopped, "collector_switches")
        })
        .sum()
}

/// Invariant (fault 1): two collectors and a fleet of agents on one
/// PostgreSQL; a collector SIGKILLed at seeded random moments, several
/// times, and started again on its port (each start a new fencing
/// holder), agents moving to the other and back: every node's energy and
/// readings in the ledger equal what it measured, and both collectors'
/// usage APIs answer the same.
#[test]
fn collectors_killed_at_random_while_agents_fail_over_keep_the_ledger_exact() {
    const N: u64 = 150;
    const KILLS: usize = 4;
    let pg = PgServer::start();
    let url = pg.url();
    init_pg_ledger(&url);
    let dir = tempfile::tempdir().unwrap();
    let nodes = ["h-1", "h-2", "h-3", "h-4", "h-5", "h-6"];
    let tenants = tenant_per_node(&nodes);
    let ids = ["collector-a", "collector-b"];
    let mut collectors = ids.map(|id| collector(dir.path(), &tenants, 0, &url, id, &[]));
    let ports = collectors.each_ref().map(|c| c.grpc.port());
    let endpoints: Vec<String> = collectors.iter().map(Collector::endpoint).collect();
    let cfg = format!(
        "collectors = {endpoints:?}\nfailback_after = \"1s\"\nreconnect_initial = \"50ms\"\n\
         reconnect_max = \"300ms\"\ndrain_timeout = \"30s\"\n"
    );
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|n| Agent::start_listed(dir.path(), n, N, &cfg))
        .collect();
    eventually(Duration::from_secs(15), "every agent connected", || {
        collectors.iter().map(connected).sum::<f64>() == nodes.len() as f64
    });
    // Victims and moments from a fixed seed (xorshift64), printed so that
    // a failure can be replayed.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut streams_cut = 0.0;
    for round in 0..KILLS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let after = Duration::from_millis(400 + x % 1200);
        let victim = (x >> 32) as usize % 2;
        // The scenario: the kill lands at a moment of its own, not at one
        // the collector has reached.
        std::thread::sleep(after);
        let c = &mut collectors[victim];
        let had = connected(c);
        streams_cut += had;
        eprintln!("round {round}: SIGKILL {} with {had} agents", ids[victim]);
        c.child.kill().unwrap();
        c.child.wait().unwrap();
        // Down for a while: its agents move to the other.
        std::thread::sleep(Duration::from_millis(300));
        *c = collector(dir.path(), &tenants, ports[victim], &url, ids[victim], &[]);
    }
    let switches = finish_all(agents, Duration::from_secs(60));
    assert!(
        switches as f64 >= streams_cut,
        "{switches} switches for {streams_cut} streams cut"
    );
    for node in nodes {
        let tenant = format!("t-{node}");
        for c in &collectors {
            assert_eq!(
                usage(c.http, &tenant),
                node_truth(node, N),
                "{node} (energy mJ, readings) via {}",
                c.http
            );
        }
    }
    for c in collectors {
        c.stop();
    }
}

/// Sample `seq` of the split-brain node, at `t0` + `seq` s: GPU 0 has a
/// counter rising 500 mJ per tick, GPU 1 none and draws 333.333 W.
fn sample(t0: i64, seq: u64) -> pb::NodeSample {
    pb::NodeSample {
        node_power: Vec::new(),
        seq,
        timestamp_unix_nanos: t0 + seq as i64 * 1_000_000_000,
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

/// Energy of samples 1..=k of [`sample`], booked once each: k - 1 ticks
/// of both GPUs.
fn energy_through(k: u64) -> u64 {
    (k - 1) * (500 + 333_333)
}

fn hello(node: &str) -> pb::AgentMessage {
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
            stream_epoch: 1,
            interval_millis: 1000,
            gpus: vec![gpu(0, true), gpu(1, false)],
            host: None,
        })),
    }
}

fn batch(t0: i64, seqs: std::ops::RangeInclusive<u64>) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Batch(pb::SampleBatch {
            samples: seqs.map(|s| sample(t0, s)).collect(),
        })),
    }
}

/// Invariant (fencing, fault 2): one node streaming to two collectors at
/// once (its old stream still open at A while it reconnects to B) is
/// committed by exactly one of them. B's claim fences A: what A accepted
/// and had not committed yet is never written or acked, and A ends the
/// stream; B resumes from the cursor in the database. When the node comes
/// back to A, A too resumes from the database, not from what it held in
/// memory. The ledger books every sample once.
#[test]
fn a_node_streaming_to_two_collectors_is_committed_by_exactly_one() {
    const NODE: &str = "sb-1";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg = PgServer::start();
    let url = pg.url();
    init_pg_ledger(&url);
    let dir = tempfile::tempdir().unwrap();
    let tenants = tenant_per_node(&[NODE]);
    // A commits seldom (the longest interval there is), so that what it
    // accepted is still uncommitted when B claims the node.
    let a = collector(
        dir.path(),
        &tenants,
        0,
        &url,
        "collector-a",
        &[("CAPWATCH_COMMIT_INTERVAL", "5s")],
    );
    let b = collector(dir.path(), &tenants, 0, &url, "collector-b", &[]);
    // Two minutes ago: the minutes these land in are still open, and
    // every sample is within the clock checks.
    let t0 = (now_secs() - 120) * 1_000_000_000;
    let accepted = |c: &Collector| {
        counter(
            c,
            "capwatch_collector_samples_total",
            &[("outcome", "accepted")],
        )
    };

    let mut at_a = rt
        .block_on(Stream::open(&a.endpoint(), hello(NODE)))
        .unwrap();
    assert_eq!(rt.block_on(at_a.welcome()), 0);
    assert_eq!(rt.block_on(at_a.send(batch(t0, 1..=5))), 5);
    // 6..=10 reach A, which applies them; its next commit is seconds away.
    rt.block_on(at_a.tx.send(batch(t0, 6..=10))).unwrap();
    eventually(Duration::from_secs(3), "A applied 6..=10", || {
        accepted(&a) == 10.0
    });
    let mut at_b = rt
        .block_on(Stream::open(&b.endpoint(), hello(NODE)))
        .unwrap();
    assert_eq!(
        rt.block_on(at_b.welcome()),
        5,
        "B resumes from the database's cursor, not from A's memory"
    );
    assert_eq!(rt.block_on(at_b.send(batch(t0, 6..=15))), 15);

    // A's commit of 6..=10 is fenced: never acked, and the stream ends.
    let ended = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match at_a.next_or_end().await {
                    Ok(Some(pb::collector_message::Body::Ack(ack))) => assert!(
                        ack.acked_seq <= 5,
                        "A acked {} after losing the node",
                        ack.acked_seq
                    ),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        })
        .await
    });
    assert!(ended.is_ok(), "A kept the fenced stream open");
    assert!(counter(&a, "capwatch_collector_nodes_fenced_total", &[]) >= 1.0);

    // Back to A: it resumes from the database (15), not from its memory
    // (10), and books from there.
    drop(at_b);
    let mut again = rt
        .block_on(Stream::open(&a.endpoint(), hello(NODE)))
        .unwrap();
    assert_eq!(rt.block_on(again.welcome()), 15);
    assert_eq!(rt.block_on(again.send(batch(t0, 16..=20))), 20);
    drop(again);

    for c in [&a, &b] {
        assert_eq!(
            usage(c.http, &format!("t-{NODE}")),
            (energy_through(20), 2 * 20),
            "(energy mJ, readings) via {}",
            c.http
        );
    }
    a.stop();
    b.stop();
}

/// Invariant (fault 4): a partition between one collector and the
/// database in the middle of a commit, its agents still connected to it.
/// Its commits fail within the ledger's deadline (a stalled connection
/// gives no error of its own), it acks nothing it could not commit, and
/// after `shed_streams_after` it sheds its streams and refuses Hellos, so
/// that its agents move to the other collector, which commits although
/// the cut-off transaction is still open on the server with the lock
/// every commit takes. When the network heals, the cut-off collector's
/// pending commit of the nodes the other took is fenced. The ledger
/// equals what was measured.
#[test]
fn a_collector_cut_off_from_the_database_sheds_its_streams_and_acks_nothing_uncommitted() {
    const N: u64 = 200;
    let pg = PgServer::start();
    let url = pg.url();
    init_pg_ledger(&url);
    let dir = tempfile::tempdir().unwrap();
    let nodes = ["c-1", "c-2", "c-3"];
    let tenants = tenant_per_node(&nodes);
    let link = Proxy::start(([127, 0, 0, 1], pg.port()).into());
    let env = [
        ("CAPWATCH_SHED_STREAMS_AFTER", "2s"),
        ("CAPWATCH_LEDGER_CONNECT_TIMEOUT", "1s"),
        ("CAPWATCH_LEDGER_STATEMENT_TIMEOUT", "1s"),
    ];
    let a = collector(
        dir.path(),
        &tenants,
        0,
        &pg_url_via(link.addr),
        "collector-a",
        &env,
    );
    let b = collector(dir.path(), &tenants, 0, &url, "collector-b", &env);
    let cfg = format!(
        "collectors = {:?}\ncollector_order = \"listed\"\nfailback_after = \"0s\"\n\
         reconnect_initial = \"50ms\"\nreconnect_max = \"300ms\"\ndrain_timeout = \"30s\"\n",
        [a.endpoint(), b.endpoint()]
    );
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|n| Agent::start_listed(dir.path(), n, N, &cfg))
        .collect();
    eventually(Duration::from_secs(10), "every agent at A", || {
        connected(&a) == nodes.len() as f64
    });
    let ok = commits(&a, "success");
    eventually(Duration::from_secs(10), "A committing", || {
        commits(&a, "success") >= ok + 2.0
    });

    // Cut off in the middle of a commit, the watermark's row lock (which
    // every commit takes first) taken on the server, its answer held: the
    // transaction stays open there.
    link.stall_after_request(b"FROM watermark WHERE id = 1 FOR UPDATE");
    eventually(Duration::from_secs(5), "A cut off mid-commit", || {
        link.is_stalled()
    });
    let stalled = Instant::now();
    eventually(Duration::from_secs(15), "a failed commit at A", || {
        commits(&a, "failure") >= 1.0
    });
    let first_failure = stalled.elapsed();
    let ok = commits(&a, "success");
    eprintln!("first failed commit {first_failure:?} into the stall");
    // The ledger's deadline is connect + 2 × statement timeout (3 s here),
    // and the commit interval is 1 s.
    assert!(
        first_failure < Duration::from_secs(6),
        "a stalled ledger failed the first commit only after {first_failure:?}"
    );
    eventually(Duration::from_secs(20), "every agent moved to B", || {
        connected(&b) == nodes.len() as f64
    });
    assert!(counter(&a, "capwatch_collector_streams_shed_total", &[]) >= 1.0);
    assert_eq!(commits(&a, "success"), ok, "A committed through a stall");
    assert_eq!(connected(&a), 0.0);
    // B commits although A left its transaction open on the server, with
    // the lock every commit takes, and is still cut off.
    let ok_b = commits(&b, "success");
    eventually(Duration::from_secs(10), "B committing", || {
        commits(&b, "success") >= ok_b + 3.0
    });
    assert!(link.is_stalled());

    link.resume();
    // A's pending samples of the nodes B took are never written.
    eventually(Duration::from_secs(15), "A's stale commit fenced", || {
        counter(&a, "capwatch_collector_nodes_fenced_total", &[]) >= 1.0
    });
    finish_all(agents, Duration::from_secs(60));
    for node in nodes {
        let tenant = format!("t-{node}");
        for c in [&a, &b] {
            assert_eq!(
                usage(c.http, &tenant),
                node_truth(node, N),
                "{node} (energy mJ, readings) via {}",
                c.http
            );
        }
    }
    a.stop();
    b.stop();
}
