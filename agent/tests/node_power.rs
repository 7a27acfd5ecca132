//! Node power end to end through the agent library: the stand-in Redfish
//! BMC (TLS, basic auth, both schemas, faults, a hang) and a fake powercap
//! tree, read by the agent's workers and delivered in its samples to a
//! capturing collector stand-in (a tonic server on 127.0.0.1:0 that
//! welcomes, records and acks).
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use capwatch_agent::config::{Config, RedfishSettings, SourceKind};
use capwatch_agent::node_power::Reader;
use capwatch_agent::node_power::redfish::RedfishReader;
use capwatch_agent::{Summary, run};
use capwatch_proto::v1 as pb;
use capwatch_proto::v1::ingest_server::{Ingest, IngestServer};
use capwatch_testkit::redfish::{Fault, Options as Standin, Schema, Service, Slow};

/// What the collector stand-in saw: the Hello, and each sample with the
/// wall time it arrived.
#[derive(Default)]
struct Seen {
    hello: Option<pb::Hello>,
    samples: Vec<(pb::NodeSample, i64)>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Seen>>);

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

#[tonic::async_trait]
impl Ingest for Capture {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<pb::CollectorMessage, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let seen = self.0.clone();
        tokio::spawn(async move {
            let mut epoch = 0;
            while let Some(Ok(msg)) = inbound.next().await {
                let reply = match msg.body {
                    Some(pb::agent_message::Body::Hello(h)) => {
                        epoch = h.stream_epoch;
                        seen.lock().unwrap().hello = Some(h);
                        pb::collector_message::Body::Welcome(pb::Welcome {
                            collector_version: "stand-in".into(),
                            acked_seq: 0,
                        })
                    }
                    Some(pb::agent_message::Body::Batch(b)) => {
                        let at = now_nanos();
                        let mut seen = seen.lock().unwrap();
                        let last = b.samples.last().map(|s| s.seq).unwrap_or(0);
                        seen.samples.extend(b.samples.into_iter().map(|s| (s, at)));
                        pb::collector_message::Body::Ack(pb::Ack {
                            stream_epoch: epoch,
                            acked_seq: last,
                            ..Default::default()
                        })
                    }
                    None => continue,
                };
                let msg = pb::CollectorMessage { body: Some(reply) };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Capture {
    /// Starts the stand-in; returns its endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = IngestServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    fn readings(&self) -> Vec<pb::NodePowerReading> {
        let seen = self.0.lock().unwrap();
        seen.samples
            .iter()
            .flat_map(|(s, _)| s.node_power.iter().cloned())
            .collect()
    }

    fn hello(&self) -> Option<pb::Hello> {
        self.0.lock().unwrap().hello.clone()
    }

    /// Polls until `f` holds of what was seen.
    async fn until(&self, what: &str, f: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Files the agent's config points at.
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// A mock-GPU agent streaming to `collector` every `interval_ms`, reading
/// `bmc` (if any) with `credentials`.
fn config(collector: &str, interval_ms: u64, bmc: Option<(&Service, &Files, &str)>) -> Config {
    let mut cfg = Config {
        node_id: "np-node".into(),
        collector: Some(collector.to_string()),
        source: SourceKind::Mock,
        interval: Duration::from_millis(interval_ms),
        ..Config::default()
    };
    cfg.mock.gpus = 2;
    cfg.mock.node_power = false;
    if let Some((bmc, files, credentials)) = bmc {
        cfg.redfish.url = Some(bmc.url());
        cfg.redfish.ca_file = Some(files.write("bmc-ca.pem", bmc.ca_pem().unwrap()));
        cfg.redfish.credentials_file = Some(files.write("bmc.cred", credentials));
        cfg.redfish.interval = Duration::from_secs(1);
        cfg.redfish.timeout = Duration::from_millis(800);
    }
    cfg
}

/// Runs the agent until `shutdown` flips; returns its summary.
fn spawn_agent(cfg: Config) -> (watch::Sender<bool>, tokio::task::JoinHandle<Summary>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move { run(cfg, None, rx).await.unwrap() });
    (tx, task)
}

fn bmc(schema: Schema) -> Service {
    Service::start(Standin::new(schema).tls().auth("capwatch", "s3:cret"))
}

/// Invariant: what the BMC's energy sensor says reaches the collector
/// exactly, in mJ, with the Hello naming the chassis and its counter; a
/// reading with negative or absurd watts, or an energy counter that goes
/// backwards, is absent (never zero) and counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bmc_readings_arrive_exactly_and_bad_ones_are_absent_and_counted() {
    for schema in [Schema::NewJoules, Schema::NewKwh, Schema::OldPower] {
        let bmc = bmc(schema);
        bmc.set_power_mw(7_654_321);
        bmc.advance_mj(123_456_789_012);
        let files = Files::new();
        let capture = Capture::default();
        let endpoint = capture.start().await;
        let (stop, agent) = spawn_agent(config(
            &endpoint,
            100,
            Some((&bmc, &files, "capwatch:s3:cret\n")),
        ));

        capture.until("the Hello", |c| c.hello().is_some()).await;
        let hello = capture.hello().unwrap();
        let energy = schema != Schema::OldPower;
        assert_eq!(
            hello.node_power_sources,
            [pb::NodePowerSource {
                index: 0,
                kind: "redfish".into(),
                domain: "node".into(),
                name: "1".into(),
                energy_counter_supported: energy,
                interval_millis: 1000,
            }],
            "{schema:?}"
        );
        let want = energy.then(|| bmc.energy_mj());
        capture
            .until("a reading", |c| {
                c.readings().iter().any(|r| r.energy_millijoules == want)
            })
            .await;

        // Each fault for one read; then a good reading with new energy.
        for fault in [
            Fault::NegativeWatts,
            Fault::AbsurdWatts,
            Fault::CounterBackwards,
        ] {
            if fault == Fault::CounterBackwards && !energy {
                continue;
            }
            bmc.set_fault_for(fault, 1);
            let deadline = Instant::now() + Duration::from_secs(30);
            while bmc.fault_pending() {
                assert!(Instant::now() < deadline, "the BMC was not read");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            bmc.advance_mj(5_000_037);
            let want = energy.then(|| bmc.energy_mj());
            let power = if fault == Fault::AbsurdWatts {
                1
            } else {
                7_654_321
            };
            bmc.set_power_mw(power);
            capture
                .until("a good reading", |c| {
                    c.readings()
                        .iter()
                        .any(|r| r.energy_millijoules == want && r.power_milliwatts == Some(power))
                })
                .await;
        }
        stop.send(true).unwrap();
        let summary = agent.await.unwrap();

        let readings = capture.readings();
        // Every reading sent is a good one: the set power, never zero,
        // never the faulty values; energies never go backwards.
        for r in &readings {
            assert!(
                matches!(r.power_milliwatts, Some(7_654_321) | Some(1)),
                "{schema:?}: {r:?}"
            );
            assert_eq!(r.energy_millijoules.is_some(), energy, "{schema:?}: {r:?}");
        }
        for pair in readings.windows(2) {
            assert!(pair[0].timestamp_unix_nanos < pair[1].timestamp_unix_nanos);
            assert!(
                pair[0].energy_millijoules <= pair[1].energy_millijoules,
                "{pair:?}"
            );
        }
        let reasons = &summary.node_power_failures_by_reason;
        assert!(
            reasons.contains("redfish/1:negative=1"),
            "{schema:?}: {reasons}"
        );
        assert!(
            reasons.contains("redfish/1:absurd=1"),
            "{schema:?}: {reasons}"
        );
        assert_eq!(
            reasons.contains("redfish/1:counter_backwards=1"),
            energy,
            "{reasons}"
        );
        assert_eq!(summary.node_power_readings, readings.len() as u64);
    }
}

/// Wrong credentials: a clear, counted failure and no source, while GPU
/// sampling goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bmc_credentials_leave_the_source_out_and_are_counted() {
    let bmc = bmc(Schema::NewJoules);
    let files = Files::new();
    let capture = Capture::default();
    let endpoint = capture.start().await;
    let (tx, rx) = watch::channel(false);
    let cfg = config(&endpoint, 100, Some((&bmc, &files, "capwatch:guess\n")));
    let summary = run(cfg, Some(5), rx).await.unwrap();
    drop(tx);
    assert_eq!(summary.sampled, 5);
    assert!(
        summary
            .node_power_failures_by_reason
            .contains("redfish:unauthorized=1"),
        "{}",
        summary.node_power_failures_by_reason
    );
    assert!(capture.hello().unwrap().node_power_sources.is_empty());
    assert!(capture.readings().is_empty());

    // With the chassis configured the source is listed, and each read's
    // refusal counted.
    let capture = Capture::default();
    let endpoint = capture.start().await;
    let mut cfg = config(&endpoint, 100, Some((&bmc, &files, "capwatch:guess\n")));
    cfg.redfish.chassis = Some("1".into());
    let requests = bmc.requests();
    let (stop, agent) = spawn_agent(cfg);
    // Start-up, then two reads by the worker (the first one counted once
    // the second arrives).
    let deadline = Instant::now() + Duration::from_secs(30);
    while bmc.requests() < requests + 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    let summary = agent.await.unwrap();
    let hello = capture.hello().unwrap();
    assert_eq!(hello.node_power_sources.len(), 1);
    assert!(!hello.node_power_sources[0].energy_counter_supported);
    assert!(capture.readings().is_empty());
    assert!(
        summary
            .node_power_failures_by_reason
            .contains("redfish/1:unauthorized="),
        "{}",
        summary.node_power_failures_by_reason
    );
}

/// Invariant: a BMC that hangs never delays a GPU sample: while the BMC
/// holds a request unanswered, samples keep arriving, numbered without a
/// gap and stamped at exactly one interval from each other, and the BMC's
/// readings are absent meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_bmc_does_not_delay_gpu_samples() {
    const INTERVAL_MS: u64 = 100;
    let bmc = bmc(Schema::NewJoules);
    bmc.set_power_mw(5_000_000);
    let files = Files::new();
    let capture = Capture::default();
    let endpoint = capture.start().await;
    let (stop, agent) = spawn_agent(config(
        &endpoint,
        INTERVAL_MS,
        Some((&bmc, &files, "capwatch:s3:cret")),
    ));
    capture
        .until("a BMC reading", |c| !c.readings().is_empty())
        .await;
    bmc.set_slow(Slow::Forever);
    let hung_at = now_nanos();
    let reads = bmc.reading_requests();
    // A read reaches the hang, then its deadline, then the next read
    // hangs again: the BMC is asked again while it hangs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while bmc.reading_requests() < reads + 2 || bmc.hanging() == 0 {
        assert!(Instant::now() < deadline, "the BMC was not asked again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A request hangs now: samples must keep coming.
    let count = |c: &Capture| c.0.lock().unwrap().samples.len();
    let before = count(&capture);
    capture
        .until("samples while the BMC hangs", |c| count(c) >= before + 8)
        .await;
    assert!(bmc.hanging() > 0, "the BMC answered meanwhile");
    stop.send(true).unwrap();
    let summary = agent.await.unwrap();
    bmc.release();

    let seen = capture.0.lock().unwrap();
    let during: Vec<_> = seen
        .samples
        .iter()
        .filter(|(s, _)| s.timestamp_unix_nanos > hung_at)
        .collect();
    assert!(during.len() >= 8, "{} samples while hung", during.len());
    for pair in during.windows(2) {
        assert_eq!(pair[1].0.seq, pair[0].0.seq + 1, "a sample is missing");
        assert_eq!(
            pair[1].0.timestamp_unix_nanos - pair[0].0.timestamp_unix_nanos,
            (INTERVAL_MS * 1_000_000) as i64
        );
    }
    // A read in flight when the hang began ends within its deadline
    // (800ms); none is taken after that while the BMC hangs.
    let late = during
        .iter()
        .flat_map(|(s, _)| &s.node_power)
        .filter(|r| r.timestamp_unix_nanos > hung_at + 1_000_000_000)
        .count();
    assert_eq!(late, 0);
    assert!(
        summary
            .node_power_failures_by_reason
            .contains("redfish/1:timeout="),
        "{}",
        summary.node_power_failures_by_reason
    );
}

/// Regression: discovery ran on the sampler's thread, so a BMC hanging at
/// start held back every GPU sample, the Hello and a stop until its
/// requests ran out. Now: samples are taken from the start (stamped while
/// the BMC still holds discovery's first request), a bounded run ends
/// while discovery is still underway, a stop ends the agent long before
/// the BMC's deadline, and the Hello waits at most one request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bmc_hanging_at_start_holds_back_no_sample_hello_or_stop() {
    let bmc = bmc(Schema::NewJoules);
    bmc.set_slow(Slow::Forever);
    let files = Files::new();
    let hanging = |endpoint: &str, timeout: Duration, chassis: Option<&str>| {
        let mut cfg = config(endpoint, 100, Some((&bmc, &files, "capwatch:s3:cret")));
        cfg.redfish.timeout = timeout;
        cfg.redfish.interval = Duration::from_secs(60);
        cfg.redfish.chassis = chassis.map(str::to_string);
        cfg
    };
    const DEADLINE: Duration = Duration::from_secs(30);

    // A bounded run: five samples, delivered, while discovery still waits.
    let capture = Capture::default();
    let endpoint = capture.start().await;
    let (_tx, rx) = watch::channel(false);
    let summary = run(hanging(&endpoint, DEADLINE, None), Some(5), rx)
        .await
        .unwrap();
    assert_eq!((summary.sampled, summary.acked), (5, 5));
    assert_eq!(
        summary.node_power_failures_by_reason, "redfish:start_timeout=1",
        "the run ended with discovery still underway"
    );
    let hello = capture.hello().unwrap();
    assert!(hello.node_power_sources.is_empty());
    let seen: Vec<_> = capture
        .0
        .lock()
        .unwrap()
        .samples
        .iter()
        .map(|(s, _)| (s.seq, s.timestamp_unix_nanos))
        .collect();
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    // The first sample is stamped before discovery's request could have
    // run out: it did not wait for it.
    let epoch = hello.stream_epoch as i64;
    assert!(
        seen[0].1 < epoch + DEADLINE.as_nanos() as i64,
        "{seen:?} vs {epoch}"
    );
    assert!(
        seen.windows(2).all(|w| w[1].1 - w[0].1 == 100_000_000),
        "{seen:?}"
    );

    // A stop while the BMC holds the configured chassis' first request:
    // the agent ends well before that request's deadline, the chassis
    // listed without a counter.
    let capture = Capture::default();
    let endpoint = capture.start().await;
    let requests = bmc.requests();
    let (stop, agent) = spawn_agent(hanging(&endpoint, DEADLINE, Some("1")));
    let deadline = Instant::now() + Duration::from_secs(20);
    while bmc.requests() == requests {
        assert!(Instant::now() < deadline, "the BMC was not asked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    let summary = tokio::time::timeout(DEADLINE / 3, agent)
        .await
        .expect("the agent stopped while a BMC request hung")
        .unwrap();
    assert_eq!(summary.undelivered, 0);
    let hello = capture.hello().unwrap();
    assert_eq!(hello.node_power_sources.len(), 1);
    assert_eq!(hello.node_power_sources[0].name, "1");
    assert!(!hello.node_power_sources[0].energy_counter_supported);

    // Streaming starts at the cap (one request timeout) while the BMC
    // still hangs, without the undiscovered source.
    let capture = Capture::default();
    let endpoint = capture.start().await;
    let (stop, agent) = spawn_agent(hanging(&endpoint, Duration::from_millis(500), None));
    capture.until("the Hello", |c| c.hello().is_some()).await;
    capture
        .until("samples", |c| c.0.lock().unwrap().samples.len() >= 3)
        .await;
    stop.send(true).unwrap();
    let summary = agent.await.unwrap();
    assert!(capture.hello().unwrap().node_power_sources.is_empty());
    assert!(
        summary
            .node_power_failures_by_reason
            .contains("redfish:start_timeout=1"),
        "{}",
        summary.node_power_failures_by_reason
    );
    bmc.release();
}

/// Discovery bills the node's chassis, never a GPU baseboard with power
/// readings of its own listed before it; with two node chassis it refuses
/// to guess and asks for `redfish.chassis`.
#[test]
fn discovery_takes_the_node_chassis_and_refuses_to_guess() {
    use capwatch_testkit::redfish::ExtraChassis;
    let gpu = ExtraChassis {
        id: "HGX_GPU_0".into(),
        chassis_type: "Module".into(),
        contained_by: Some("1".into()),
        power_watts: 700,
    };
    let tray = ExtraChassis {
        id: "NVSwitch_Tray".into(),
        chassis_type: "Component".into(),
        contained_by: None,
        power_watts: 300,
    };
    let bmc = Service::start(
        Standin::new(Schema::NewJoules)
            .tls()
            .auth("capwatch", "s3:cret")
            .chassis(gpu.clone())
            .chassis(tray),
    );
    bmc.set_power_mw(6_500_000);
    let files = Files::new();
    let (mut r, info) = reader(&bmc, &files);
    assert_eq!(info.name, "1");
    assert_eq!(
        r.read().remove(0).unwrap().power_milliwatts,
        Some(6_500_000)
    );

    let second = ExtraChassis {
        id: "2".into(),
        chassis_type: "RackMount".into(),
        contained_by: None,
        power_watts: 4_000,
    };
    let bmc = Service::start(
        Standin::new(Schema::NewJoules)
            .tls()
            .auth("capwatch", "s3:cret")
            .chassis(gpu)
            .chassis(second),
    );
    let settings = settings(&bmc, &files);
    let err = RedfishReader::open(&bmc.url(), &settings).err().unwrap();
    assert_eq!(err.reason, "ambiguous_chassis", "{}", err.message);
    assert!(
        err.message.contains("2, 1") && err.message.contains("redfish.chassis"),
        "{}",
        err.message
    );
    let mut chosen = settings.clone();
    chosen.chassis = Some("2".into());
    let (_, info) = RedfishReader::open(&bmc.url(), &chosen).unwrap();
    assert_eq!(info.name, "2");
}

/// A broken EnvironmentMetrics link (an HTTP error) falls back to the
/// chassis' `Power` resource instead of losing the chassis.
#[test]
fn a_broken_environment_metrics_link_falls_back_to_power() {
    for status in [404, 500] {
        let bmc = Service::start(
            Standin::new(Schema::NewJoules)
                .tls()
                .auth("capwatch", "s3:cret")
                .broken_environment_metrics(status),
        );
        bmc.set_power_mw(3_250_000);
        let files = Files::new();
        let (mut r, info) = reader(&bmc, &files);
        assert_eq!(
            (info.name.as_str(), info.energy_counter_supported),
            ("1", false),
            "{status}"
        );
        let v = r.read().remove(0).unwrap();
        assert_eq!(
            (v.power_milliwatts, v.energy_millijoules),
            (Some(3_250_000), None),
            "{status}"
        );
    }
}

/// A fake powercap tree: both packages and their dram reach the
/// collector as cumulative mJ, the Hello listing each zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapl_zones_are_listed_and_sent_cumulative() {
    // Intel's range.
    const MAX: u64 = 262_143_328_850;
    let tree = tempfile::tempdir().unwrap();
    let zone = |rel: &str, name: &str, energy: u64| {
        let dir = tree.path().join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(dir.join("max_energy_range_uj"), format!("{MAX}\n")).unwrap();
        // Whole or not at all, as sysfs reads are.
        let tmp = dir.join(".energy_uj");
        std::fs::write(&tmp, format!("{energy}\n")).unwrap();
        std::fs::rename(&tmp, dir.join("energy_uj")).unwrap();
    };
    zone("intel-rapl:0", "package-0", MAX - 1_000);
    zone("intel-rapl:0/intel-rapl:0:0", "dram", 5_000);
    zone("intel-rapl:1", "package-1", 7_000);
    let capture = Capture::default();
    let endpoint = capture.start().await;
    let mut cfg = config(&endpoint, 100, None);
    cfg.rapl.enabled = true;
    cfg.rapl.root = tree.path().to_path_buf();
    cfg.rapl.interval = Duration::from_millis(100);
    let (stop, agent) = spawn_agent(cfg);
    capture.until("readings", |c| c.readings().len() >= 3).await;
    // package-0 wraps: MAX - 1 000 → MAX → 0 → 3 000: 4 001 µJ, counted
    // from 0 (the first value read is the base).
    zone("intel-rapl:0", "package-0", 3_000);
    let names = |c: &Capture| c.hello().map(|h| h.node_power_sources.len());
    assert_eq!(names(&capture), Some(3));
    capture
        .until("the wrap undone", |c| {
            c.readings()
                .iter()
                .any(|r| r.source == 0 && r.energy_millijoules == Some(4))
        })
        .await;
    stop.send(true).unwrap();
    let summary = agent.await.unwrap();
    let hello = capture.hello().unwrap();
    let listed: Vec<_> = hello
        .node_power_sources
        .iter()
        .map(|s| {
            (
                s.kind.as_str(),
                s.domain.as_str(),
                s.name.as_str(),
                s.energy_counter_supported,
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("rapl", "cpu", "package-0", true),
            ("rapl", "dram", "package-0/dram", true),
            ("rapl", "cpu", "package-1", true),
        ]
    );
    assert_eq!(
        summary.node_power_failures, 0,
        "{}",
        summary.node_power_failures_by_reason
    );
    // Never backwards, whatever the wrap.
    for source in 0..3 {
        let e: Vec<_> = capture
            .readings()
            .iter()
            .filter(|r| r.source == source)
            .map(|r| r.energy_millijoules.unwrap())
            .collect();
        assert!(e.windows(2).all(|w| w[0] <= w[1]), "{source}: {e:?}");
    }
}

/// The mock's whole-node power rides in every sample, its counter the
/// exact integral of its power.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_reports_whole_node_power_in_every_sample() {
    let capture = Capture::default();
    let endpoint = capture.start().await;
    let mut cfg = config(&endpoint, 50, None);
    cfg.mock.node_power = true;
    let (_tx, rx) = watch::channel(false);
    let summary = run(cfg, Some(10), rx).await.unwrap();
    assert_eq!(summary.node_power_readings, 10);
    let hello = capture.hello().unwrap();
    assert_eq!(hello.node_power_sources.len(), 1);
    assert_eq!(hello.node_power_sources[0].kind, "mock");
    let seen = capture.0.lock().unwrap();
    let mut integral: u128 = 0;
    for pair in seen.samples.windows(2) {
        let (a, b) = (&pair[0].0, &pair[1].0);
        let (ra, rb) = (&a.node_power[0], &b.node_power[0]);
        let gpus: u64 = b.gpus.iter().filter_map(|g| g.power_milliwatts).sum();
        assert_eq!(
            rb.power_milliwatts,
            Some(gpus + gpus * 15 / 100 + 2 * 250_000)
        );
        assert_eq!(rb.timestamp_unix_nanos, b.timestamp_unix_nanos);
        integral += (rb.timestamp_unix_nanos - ra.timestamp_unix_nanos) as u128
            * u128::from(rb.power_milliwatts.unwrap());
        assert_eq!(
            rb.energy_millijoules,
            Some((integral / 1_000_000_000) as u64)
        );
    }
}

fn settings(bmc: &Service, files: &Files) -> RedfishSettings {
    RedfishSettings {
        url: Some(bmc.url()),
        ca_file: Some(files.write("ca.pem", bmc.ca_pem().unwrap())),
        credentials_file: Some(files.write("cred", "capwatch:s3:cret")),
        ..RedfishSettings::default()
    }
}

fn reader(bmc: &Service, files: &Files) -> (RedfishReader, capwatch_agent::node_power::SourceInfo) {
    RedfishReader::open(&bmc.url(), &settings(bmc, files)).unwrap()
}

fn reason(r: &mut RedfishReader) -> &'static str {
    match r.read().remove(0) {
        Ok(v) => panic!("a reading: {v:?}"),
        Err(e) => e.reason,
    }
}

/// After three failed reads in a row the chassis' links are looked up
/// again; otherwise each read is one request.
#[test]
fn after_three_failed_reads_the_chassis_is_looked_up_again() {
    let bmc = bmc(Schema::NewJoules);
    bmc.set_power_mw(1_000);
    let files = Files::new();
    let (mut r, info) = reader(&bmc, &files);
    assert_eq!(
        (info.name.as_str(), info.energy_counter_supported),
        ("1", true)
    );
    bmc.set_fault_for(Fault::ServerError, 3);
    for _ in 0..3 {
        assert_eq!(reason(&mut r), "http_status");
    }
    let before = bmc.requests();
    r.read().remove(0).unwrap();
    // The chassis and its EnvironmentMetrics while resolving, whose
    // answer is this read's reading: no third request.
    assert_eq!(bmc.requests() - before, 2);
    let before = bmc.requests();
    r.read().remove(0).unwrap();
    assert_eq!(bmc.requests() - before, 1);
}

/// A counter below the previous reading is refused once; a second in a
/// row is a restart and becomes the new base.
#[test]
fn a_counter_going_back_once_is_refused_and_twice_is_a_restart() {
    let bmc = bmc(Schema::NewJoules);
    bmc.set_power_mw(1_000);
    bmc.advance_mj(50_000_000);
    let files = Files::new();
    let (mut r, _) = reader(&bmc, &files);
    let energy = |r: &mut RedfishReader| r.read().remove(0).unwrap().energy_millijoules;
    assert_eq!(energy(&mut r), Some(50_000_000));
    bmc.set_fault_for(Fault::CounterBackwards, 1);
    assert_eq!(reason(&mut r), "counter_backwards");
    assert_eq!(energy(&mut r), Some(50_000_000));
    bmc.set_fault_for(Fault::CounterBackwards, 2);
    assert_eq!(reason(&mut r), "counter_backwards");
    assert_eq!(energy(&mut r), Some(49_000_000));
    assert_eq!(energy(&mut r), Some(50_000_000));
}
