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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Value {
    pub power_milliwatts: Option<u64>,
    /// Cumulative.
    pub energy_millijoules: Option<u64>,
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

/// Log a failure of a kind at its first occurrence and then every this
/// many in a row.
const LOG_EVERY: u64 = 100;

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
    // Failures in a row, by zone, for rate-limited logs.
    let mut streak: Vec<(u64, &'static str)> = vec![(0, ""); zones.len()];
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
                    if streak[z].0 > 0 {
                        info!(source = %label, failed_reads = streak[z].0, "node power source reading again");
                        streak[z] = (0, "");
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
                    let (n, reason) = &mut streak[z];
                    if *reason != failure.reason {
                        *n = 0;
                        *reason = failure.reason;
                    }
                    *n += 1;
                    if *n == 1 || *n % LOG_EVERY == 0 {
                        warn!(source = %label, reason = failure.reason, in_a_row = *n, error = %failure.message, "node power reading failed; the source is absent from samples");
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

/// Every node power source of the agent.
pub struct NodePower {
    sources: Vec<SourceInfo>,
    slots: Arc<Slots>,
    mock: Option<(u32, mock::MockNodePower)>,
}

impl NodePower {
    /// No source: nothing is sent.
    pub fn none() -> Self {
        Self {
            sources: Vec::new(),
            slots: Arc::new(Slots::default()),
            mock: None,
        }
    }

    /// Opens the configured sources and starts their workers. A source
    /// that cannot be opened (a BMC that does not answer at start, a host
    /// without RAPL) is logged and left out: GPU sampling goes on.
    pub fn start(cfg: &Config, clock: Clock) -> Self {
        let mut this = Self::none();
        let mut workers: Vec<(Box<dyn Reader>, Vec<SourceInfo>)> = Vec::new();
        if let Some(url) = &cfg.redfish.url {
            match redfish::RedfishReader::open(url, &cfg.redfish) {
                Ok((reader, info)) => workers.push((Box::new(reader), vec![info])),
                Err(e) => {
                    this.slots.failures.add("redfish", e.reason);
                    warn!(url = %url, reason = e.reason, error = %e.message, "Redfish node power unavailable; not sent this run");
                }
            }
        }
        if let Some(command) = &cfg.ipmi.command {
            let (reader, info) = ipmi::IpmiReader::new(command, &cfg.ipmi);
            workers.push((Box::new(reader), vec![info]));
        }
        if cfg.rapl.enabled {
            match rapl::RaplReader::open(&cfg.rapl) {
                Ok((reader, infos)) => workers.push((Box::new(reader), infos)),
                Err(e) => {
                    this.slots.failures.add("rapl", e.reason);
                    warn!(root = %cfg.rapl.root.display(), reason = e.reason, error = %e.message, "RAPL energy unavailable; not sent this run");
                }
            }
        }
        for (reader, infos) in workers {
            let zones: Vec<(u32, String, bool)> = infos
                .iter()
                .enumerate()
                .map(|(k, info)| {
                    (
                        (this.sources.len() + k) as u32,
                        info.label(),
                        info.energy_counter_supported,
                    )
                })
                .collect();
            let interval = infos[0].interval;
            let names: Vec<String> = infos.iter().map(SourceInfo::label).collect();
            this.sources.extend(infos);
            let slots = this.slots.clone();
            let clock = clock.clone();
            let thread = format!(
                "node-power-{}",
                names[0].split('/').next().unwrap_or("source")
            );
            info!(sources = %names.join(","), interval_ms = interval.as_millis() as u64, "node power source started");
            let spawned = std::thread::Builder::new()
                .name(thread)
                .spawn(move || work(reader, zones, interval, clock, slots));
            if let Err(e) = spawned {
                warn!(error = %e, "could not start a node power worker");
            }
        }
        if cfg.source == SourceKind::Mock && cfg.mock.node_power {
            let index = this.sources.len() as u32;
            this.sources.push(mock::MockNodePower::info(cfg.interval));
            this.mock = Some((index, mock::MockNodePower::new(cfg.mock.gpus)));
        }
        this
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

    #[test]
    fn failures_are_counted_absent_and_the_newest_reading_is_sent_once() {
        let slots = Arc::new(Slots::default());
        let now = Arc::new(AtomicI64::new(1_000));
        let clock: Clock = Arc::new(move || now.fetch_add(10, Ordering::SeqCst));
        let reading = |mw| {
            Ok(Value {
                power_milliwatts: Some(mw),
                energy_millijoules: Some(mw * 2),
            })
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let zones = vec![(0, "redfish/1".to_string(), false)];
        let (s, c) = (slots.clone(), clock.clone());
        let worker = std::thread::spawn(move || {
            work(Box::new(Script(rx)), zones, Duration::from_millis(1), c, s)
        });
        let mut power = NodePower {
            sources: Vec::new(),
            slots: slots.clone(),
            mock: None,
        };
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
