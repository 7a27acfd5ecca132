//! Node power: readings of the whole node (a BMC over [`redfish`] or
//! [`ipmi`], or the [`mock`]'s simulation) and of its CPU packages and
//! their memory ([`rapl`]), sent beside the GPU readings.
//!
//! Each configured source is read on a worker thread of its own, on its own
//! interval, every read bounded by a deadline. The worker leaves its newest
//! reading in a slot; the sampler takes what is there when it builds a
//! sample ([`NodePower::take`]) and never waits on a source: a BMC that
//! hangs costs the GPU samples nothing. A reading goes out once, in the
//! first sample after it was taken, with its own timestamp.
//!
//! *Boundary:* every reading is outside input. A source that fails (no
//! answer, an error, a value out of range, a counter going backwards) is
//! absent from the samples, never zero; the failure is logged (the first of
//! a kind, then every 100th, and the recovery) and counted by source and
//! reason for the agent's exit summary.

pub mod ipmi;
pub mod mock;
pub mod rapl;
pub mod redfish;

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use capwatch_proto::v1 as pb;

use crate::config::{Config, SourceKind};
use crate::source::GpuReading;

/// The agent's clock (nanoseconds since the epoch), shared with the
/// sampler so readings and samples are stamped alike.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// One source as the Hello lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// "redfish", "ipmi", "rapl" or "mock".
    pub kind: &'static str,
    /// "node", "cpu" or "dram".
    pub domain: &'static str,
    /// The chassis id, the RAPL zone ("package-0", "package-0/dram").
    pub name: String,
    pub energy_counter_supported: bool,
    pub interval: Duration,
}

impl SourceInfo {
    /// `kind/name`, how logs and counters name it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// What one read of a source gave.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Value {
    pub power_milliwatts: Option<u64>,
    /// Cumulative.
    pub energy_millijoules: Option<u64>,
    /// Why the energy is absent though the source has a counter (its field
    /// was unusable): the power is sent, the energy failure counted under
    /// `kind/name/energy`.
    pub energy_failure: Option<Failure>,
}

/// Why a read gave nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// A short label for counters (`timeout`, `negative`, ...).
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// A source read on a worker thread: each call reads every zone it has
/// (one for a BMC, each package and dram zone for RAPL), within its
/// deadline.
pub trait Reader: Send + 'static {
    /// One result per zone, by the zone's position in the reader's list.
    fn read(&mut self) -> Vec<Result<Value, Failure>>;
}

/// Log a failure at its first occurrence and then every this many, counted
/// per source and reason since the source last read well.
const LOG_EVERY: u64 = 100;

/// Which failures of one source are logged: the first of each reason and
/// then every [`LOG_EVERY`]th of that reason, counted since the source
/// last read well, so reasons alternating with each other keep their own
/// counts instead of each resetting the other's.
#[derive(Debug, Default, Clone)]
struct LogLimit(BTreeMap<&'static str, u64>);

impl LogLimit {
    /// Counts a failure of `reason`; its count when it is to be logged.
    fn failed(&mut self, reason: &'static str) -> Option<u64> {
        let n = self.0.entry(reason).or_default();
        *n += 1;
        (*n == 1 || n.is_multiple_of(LOG_EVERY)).then_some(*n)
    }

    /// The source read well: how many failures there were since, and the
    /// counts restart.
    fn recovered(&mut self) -> u64 {
        let n = self.0.values().sum();
        self.0.clear();
        n
    }
}

/// Failures counted by `kind/name` and reason.
#[derive(Debug, Default)]
pub struct Failures(Mutex<BTreeMap<(String, &'static str), u64>>);

impl Failures {
    pub fn add(&self, label: &str, reason: &'static str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((label.to_string(), reason)).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    /// `kind/name:reason=count,...`, in order.
    pub fn by_reason(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((label, reason), n)| format!("{label}:{reason}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every (source, reason) and its count, in order.
    pub fn counts(&self) -> Vec<(String, &'static str, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((label, reason), n)| (label.clone(), *reason, *n))
            .collect()
    }

    /// The count of one (source, reason).
    pub fn get(&self, label: &str, reason: &str) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((l, r), _)| l == label && *r == reason)
            .map(|(_, n)| *n)
            .sum()
    }
}

/// How long the listing waits for the RAPL tree when no BMC is
/// configured: sysfs answers at once; a hung filesystem must not hold the
/// Hello.
const RAPL_OPEN_CAP: Duration = Duration::from_secs(1);

/// What the workers and the sampler share.
#[derive(Default)]
pub struct Slots {
    /// The newest reading of each source not yet sent, by Hello index.
    pending: Mutex<Vec<Option<pb::NodePowerReading>>>,
    pub failures: Failures,
    /// Readings taken by the workers (sent or replaced by a newer one).
    taken: std::sync::atomic::AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Slots {
    fn put(&self, reading: pb::NodePowerReading) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let i = reading.source as usize;
        if pending.len() <= i {
            pending.resize(i + 1, None);
        }
        pending[i] = Some(reading);
        self.taken
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sleeps until `deadline` or a stop; true when stopped.
    fn sleep_until(&self, deadline: Instant) -> bool {
        let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *stop {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            if left.is_zero() {
                return false;
            }
            stop = self
                .wake
                .wait_timeout(stop, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The worker loop: reads `reader` every `interval` (a read that overruns
/// skips the ticks it missed) until stopped. `zones` are the Hello entries
/// of the reader's zones, in its order: (Hello index, label, whether the
/// Hello declared an energy counter).
fn work(
    mut reader: Box<dyn Reader>,
    zones: Vec<(u32, String, bool)>,
    interval: Duration,
    clock: Clock,
    slots: Arc<Slots>,
) {
    let mut last_at = vec![i64::MIN; zones.len()];
    // Rate-limited logs, by zone (and its energy field).
    let mut logs = vec![LogLimit::default(); zones.len()];
    let mut energy_logs = logs.clone();
    let start = Instant::now();
    let mut tick = 0u64;
    loop {
        if slots.stopped() {
            return;
        }
        let results = reader.read();
        let at = clock();
        for (z, result) in results.into_iter().enumerate() {
            let Some((index, label, counter)) = zones.get(z) else {
                continue;
            };
            match result {
                Ok(value) => {
                    let failed = logs[z].recovered();
                    if failed > 0 {
                        info!(source = %label, failed_reads = failed, "node power source reading again");
                    }
                    if let Some(failure) = &value.energy_failure {
                        let energy = format!("{label}/energy");
                        slots.failures.add(&energy, failure.reason);
                        if let Some(n) = energy_logs[z].failed(failure.reason) {
                            warn!(source = %energy, reason = failure.reason, count = n, error = %failure.message, "node energy reading refused; the power is sent without it");
                        }
                    } else {
                        energy_logs[z].recovered();
                    }
                    // Strictly increasing per source, whatever the clock.
                    let at = at.max(last_at[z].saturating_add(1));
                    last_at[z] = at;
                    slots.put(pb::NodePowerReading {
                        source: *index,
                        timestamp_unix_nanos: at,
                        power_milliwatts: value.power_milliwatts,
                        // Only a counter the Hello declared.
                        energy_millijoules: value.energy_millijoules.filter(|_| *counter),
                    });
                }
                Err(failure) => {
                    slots.failures.add(label, failure.reason);
                    if let Some(n) = logs[z].failed(failure.reason) {
                        warn!(source = %label, reason = failure.reason, count = n, error = %failure.message, "node power reading failed; the source is absent from samples");
                    }
                }
            }
        }
        // The next tick after now (a slow read skips what it missed).
        let elapsed = start.elapsed();
        let next = (elapsed.as_nanos() / interval.as_nanos().max(1)) as u64 + 1;
        tick = next.max(tick + 1);
        let deadline = start + interval.saturating_mul(u32::try_from(tick).unwrap_or(u32::MAX));
        if slots.sleep_until(deadline) {
            return;
        }
    }
}

/// A source being opened on its worker thread (discovery, a first read),
/// not yet in the listing.
struct Opening {
    /// How logs and counters name it before it has a listing.
    kind: &'static str,
    /// What the listing holds if the opening is still running at the cap:
    /// a configured chassis (without an energy counter, since none was
    /// seen); `None`: the source is left out of the run.
    late: Option<SourceInfo>,
    result: Arc<Mutex<Option<Opened>>>,
    /// The Hello entries of its zones, sent once listed; dropped unsent
    /// when it is left out.
    assign: std::sync::mpsc::Sender<Vec<(u32, String, bool)>>,
}

/// Every node power source of the agent.
pub struct NodePower {
    sources: Vec<SourceInfo>,
    slots: Arc<Slots>,
    mock: Option<(u32, mock::MockNodePower)>,
    /// Sources still opening; empty once listed.
    opening: Vec<Opening>,
    /// The mock's entry, listed after every other source.
    mock_pending: Option<(SourceInfo, mock::MockNodePower)>,
    listed: bool,
    /// Notified each time an opening finishes.
    opened: Arc<tokio::sync::Notify>,
    cap: Duration,
}

/// What an opening gave: the source's zones as the Hello would list them.
type Opened = Result<Vec<SourceInfo>, Failure>;

/// (kind, listing if late, interval, the listing known before opening,
/// how to open).
type Start = (
    &'static str,
    Option<SourceInfo>,
    Duration,
    Option<Vec<SourceInfo>>,
    Open,
);

/// One source's opening, run on its worker thread.
type Open = Box<dyn FnOnce() -> Result<(Box<dyn Reader>, Vec<SourceInfo>), Failure> + Send>;

impl NodePower {
    /// No source: nothing is sent.
    pub fn none() -> Self {
        Self {
            sources: Vec::new(),
            slots: Arc::new(Slots::default()),
            mock: None,
            opening: Vec::new(),
            mock_pending: None,
            listed: true,
            opened: Arc::new(tokio::sync::Notify::new()),
            cap: Duration::ZERO,
        }
    }

    /// Starts opening the configured sources, each on its worker thread,
    /// and returns at once: discovery never runs on the caller's thread.
    /// The listing (the Hello's sources) is final once every source has
    /// opened or [`NodePower::start_cap`] has passed ([`NodePower::list`]);
    /// a source that fails to open (a BMC that refuses, a host without
    /// RAPL) is logged, counted and left out: GPU sampling goes on.
    pub fn start(cfg: &Config, clock: Clock) -> Self {
        let mut this = Self::none();
        let mut opens: Vec<Start> = Vec::new();
        if let Some(url) = &cfg.redfish.url {
            let (url, settings) = (url.clone(), cfg.redfish.clone());
            let late = cfg
                .redfish
                .chassis
                .as_ref()
                .map(|id| redfish::listing(id, &cfg.redfish, false));
            opens.push((
                "redfish",
                late,
                cfg.redfish.interval,
                None,
                Box::new(move || {
                    let (reader, info) = redfish::RedfishReader::open(&url, &settings)?;
                    Ok((Box::new(reader) as Box<dyn Reader>, vec![info]))
                }),
            ));
            this.cap = this.cap.max(cfg.redfish.timeout);
        }
        if let Some(command) = &cfg.ipmi.command {
            // Nothing to discover: listed at once.
            let (reader, info) = ipmi::IpmiReader::new(command, &cfg.ipmi);
            opens.push((
                "ipmi",
                None,
                cfg.ipmi.interval,
                Some(vec![info.clone()]),
                Box::new(move || Ok((Box::new(reader) as Box<dyn Reader>, vec![info]))),
            ));
        }
        if cfg.rapl.enabled {
            let settings = cfg.rapl.clone();
            opens.push((
                "rapl",
                None,
                cfg.rapl.interval,
                None,
                Box::new(move || {
                    let (reader, infos) = rapl::RaplReader::open(&settings)?;
                    Ok((Box::new(reader) as Box<dyn Reader>, infos))
                }),
            ));
            this.cap = this.cap.max(RAPL_OPEN_CAP);
        }
        for (kind, late, interval, ready, open) in opens {
            let known = ready.is_some();
            let result = Arc::new(Mutex::new(ready.map(Ok)));
            let (assign, assigned) = std::sync::mpsc::channel();
            let (slot, opened, slots, clock) = (
                result.clone(),
                this.opened.clone(),
                this.slots.clone(),
                clock.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("node-power-{kind}"))
                .spawn(move || {
                    let (reader, infos) = match open() {
                        Ok(opened) => opened,
                        Err(e) => {
                            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(e));
                            opened.notify_one();
                            return;
                        }
                    };
                    if !known {
                        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ok(infos));
                        opened.notify_one();
                    }
                    // Read only once listed; left out: done.
                    let Ok(zones) = assigned.recv() else { return };
                    work(reader, zones, interval, clock, slots);
                });
            match spawned {
                Ok(_) => this.opening.push(Opening {
                    kind,
                    late,
                    result,
                    assign,
                }),
                Err(e) => warn!(source = kind, error = %e, "could not start a node power worker"),
            }
        }
        if cfg.source == SourceKind::Mock && cfg.mock.node_power {
            this.mock_pending = Some((
                mock::MockNodePower::info(cfg.interval),
                mock::MockNodePower::new(cfg.mock.gpus),
            ));
        }
        this.listed = false;
        // Without a source to discover (none, the mock, IPMI) the listing
        // is known now.
        if this.all_opened() {
            this.list();
        }
        this
    }

    /// How long the listing waits for sources still opening: one request
    /// timeout of the BMC (the RAPL tree's cap without one).
    pub fn start_cap(&self) -> Duration {
        self.cap
    }

    /// Whether the listing is final (the Hello can go out).
    pub fn is_listed(&self) -> bool {
        self.listed
    }

    /// Whether every source has finished opening.
    pub fn all_opened(&self) -> bool {
        self.opening
            .iter()
            .all(|o| o.result.lock().unwrap_or_else(|e| e.into_inner()).is_some())
    }

    /// Notified each time a source finishes opening.
    pub fn opened_signal(&self) -> Arc<tokio::sync::Notify> {
        self.opened.clone()
    }

    /// Makes the listing final: the sources opened so far, in the order
    /// configured; a configured chassis still being discovered, without an
    /// energy counter; any other source still opening is left out of the
    /// run (logged, counted as `start_timeout`); then the mock.
    pub fn list(&mut self) {
        if self.listed {
            return;
        }
        for opening in std::mem::take(&mut self.opening) {
            let result = opening
                .result
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let infos = match result {
                Some(Ok(infos)) => infos,
                Some(Err(e)) => {
                    self.slots.failures.add(opening.kind, e.reason);
                    warn!(source = opening.kind, reason = e.reason, error = %e.message, "node power source unavailable; not sent this run");
                    continue;
                }
                None => match opening.late {
                    Some(info) => {
                        warn!(source = %info.label(), cap_ms = self.cap.as_millis() as u64, "node power source still opening at start-up; listed without an energy counter, read once it answers");
                        vec![info]
                    }
                    None => {
                        self.slots.failures.add(opening.kind, "start_timeout");
                        warn!(
                            source = opening.kind,
                            cap_ms = self.cap.as_millis() as u64,
                            "node power source still opening at start-up; not sent this run (configure redfish.chassis to list it without waiting)"
                        );
                        continue;
                    }
                },
            };
            let zones: Vec<(u32, String, bool)> = infos
                .iter()
                .enumerate()
                .map(|(k, info)| {
                    (
                        (self.sources.len() + k) as u32,
                        info.label(),
                        info.energy_counter_supported,
                    )
                })
                .collect();
            let names: Vec<String> = infos.iter().map(SourceInfo::label).collect();
            info!(sources = %names.join(","), interval_ms = infos.first().map(|i| i.interval.as_millis() as u64).unwrap_or(0), "node power source started");
            self.sources.extend(infos);
            let _ = opening.assign.send(zones);
        }
        if let Some((info, mock)) = self.mock_pending.take() {
            let index = self.sources.len() as u32;
            self.sources.push(info);
            self.mock = Some((index, mock));
        }
        self.listed = true;
    }

    /// The sources as the Hello lists them.
    pub fn sources(&self) -> &[SourceInfo] {
        &self.sources
    }

    pub fn hello(&self) -> Vec<pb::NodePowerSource> {
        self.sources
            .iter()
            .enumerate()
            .map(|(i, s)| pb::NodePowerSource {
                index: i as u32,
                kind: s.kind.to_string(),
                domain: s.domain.to_string(),
                name: s.name.clone(),
                energy_counter_supported: s.energy_counter_supported,
                interval_millis: u32::try_from(s.interval.as_millis()).unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// The readings for the sample stamped `at`: each source's newest
    /// reading not sent yet (at most one per source), and the mock's,
    /// computed from this sample's GPU readings.
    pub fn take(&mut self, at: i64, gpus: &[GpuReading]) -> Vec<pb::NodePowerReading> {
        let mut out: Vec<pb::NodePowerReading> = {
            let mut pending = self.slots.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.iter_mut().filter_map(Option::take).collect()
        };
        if let Some((index, mock)) = &mut self.mock {
            out.push(mock.reading(*index, at, gpus));
        }
        out.sort_by_key(|r| r.source);
        out
    }

    pub fn failures(&self) -> &Failures {
        &self.slots.failures
    }

    /// What the workers share, for `/metrics`.
    pub fn slots(&self) -> Arc<Slots> {
        self.slots.clone()
    }

    /// Readings the workers took (the mock's not counted).
    pub fn taken(&self) -> u64 {
        self.slots.taken.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tells the workers to stop; one blocked in a read ends at its
    /// deadline.
    pub fn stop(&self) {
        *self.slots.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.slots.wake.notify_all();
    }
}

impl Drop for NodePower {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    /// A reader that answers what the test sends it, one result per read
    /// (nothing once the test hangs up).
    struct Script(std::sync::mpsc::Receiver<Result<Value, Failure>>);

    impl Reader for Script {
        fn read(&mut self) -> Vec<Result<Value, Failure>> {
            self.0.recv().into_iter().collect()
        }
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    /// Regression: the log limit restarted whenever the reason changed, so
    /// two alternating failures were each logged every time.
    #[test]
    fn alternating_failure_reasons_are_rate_limited_each() {
        let mut limit = LogLimit::default();
        let logged = (0..2 * LOG_EVERY)
            .filter(|i| {
                let reason = if i % 2 == 0 { "timeout" } else { "http_status" };
                limit.failed(reason).is_some()
            })
            .count();
        // Each reason: its first and its 100th.
        assert_eq!(logged, 4);
        assert_eq!(limit.recovered(), 2 * LOG_EVERY);
        assert_eq!(limit.failed("timeout"), Some(1));
    }

    /// An unusable energy field: the power goes out, the energy failure
    /// is counted apart from the source's read failures.
    #[test]
    fn an_energy_failure_keeps_the_power_and_is_counted_apart() {
        let slots = Arc::new(Slots::default());
        let clock: Clock = Arc::new(|| 1_000);
        let (tx, rx) = std::sync::mpsc::channel();
        let zones = vec![(0, "redfish/1".to_string(), true)];
        let s = slots.clone();
        let worker = std::thread::spawn(move || {
            work(
                Box::new(Script(rx)),
                zones,
                Duration::from_millis(1),
                clock,
                s,
            )
        });
        let mut power = NodePower::none();
        power.slots = slots.clone();
        tx.send(Ok(Value {
            power_milliwatts: Some(812_500),
            energy_millijoules: None,
            energy_failure: Some(Failure::new("imprecise", "EnergykWh.Reading 1e300")),
        }))
        .unwrap();
        let mut got = Vec::new();
        until("the reading", || {
            got.extend(power.take(0, &[]));
            !got.is_empty()
        });
        power.stop();
        drop(tx);
        worker.join().unwrap();
        assert_eq!(got[0].power_milliwatts, Some(812_500));
        assert_eq!(got[0].energy_millijoules, None);
        assert_eq!(slots.failures.by_reason(), "redfish/1/energy:imprecise=1");
    }

    #[test]
    fn failures_are_counted_absent_and_the_newest_reading_is_sent_once() {
        let slots = Arc::new(Slots::default());
        let now = Arc::new(AtomicI64::new(1_000));
        let clock: Clock = Arc::new(move || now.fetch_add(10, Ordering::SeqCst));
        let reading = |mw| {
            Ok(Value {
                power_milliwatts: Some(mw),
                energy_millijoules: Some(mw * 2),
                energy_failure: None,
            })
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let zones = vec![(0, "redfish/1".to_string(), false)];
        let (s, c) = (slots.clone(), clock.clone());
        let worker = std::thread::spawn(move || {
            work(Box::new(Script(rx)), zones, Duration::from_millis(1), c, s)
        });
        let mut power = NodePower::none();
        power.slots = slots.clone();
        let mut got = Vec::new();
        tx.send(reading(5)).unwrap();
        until("the first reading", || {
            got.extend(power.take(0, &[]));
            !got.is_empty()
        });
        tx.send(Err(Failure::new("timeout", "no answer"))).unwrap();
        tx.send(Err(Failure::new("timeout", "no answer"))).unwrap();
        until("two failures", || slots.failures.total() == 2);
        assert!(power.take(0, &[]).is_empty(), "a failed source is absent");
        // Two readings before the next sample: only the newer goes out.
        tx.send(reading(7)).unwrap();
        tx.send(reading(9)).unwrap();
        until("two more readings", || power.taken() == 3);
        got.extend(power.take(0, &[]));
        assert!(power.take(0, &[]).is_empty(), "a reading is sent once");
        power.stop();
        drop(tx);
        worker.join().unwrap();

        let mw: Vec<_> = got.iter().map(|r| r.power_milliwatts).collect();
        assert_eq!(mw, [Some(5), Some(9)]);
        // The counter was not declared in the Hello: not sent.
        assert_eq!(got[0].energy_millijoules, None);
        assert!(got[0].timestamp_unix_nanos < got[1].timestamp_unix_nanos);
        assert_eq!(slots.failures.get("redfish/1", "timeout"), 2);
        assert_eq!(slots.failures.by_reason(), "redfish/1:timeout=2");
    }
}
