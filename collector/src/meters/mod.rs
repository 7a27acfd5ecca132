//! Facility meters: one polling task per `[[meter]]` entry, each reading
//! under its own deadline, so a meter that hangs or fails changes nothing
//! but its own figures (`capwatch_meter_*`); ingest, commits and the other
//! meters never wait for it.
//!
//! A reading becomes energy here ([`Live::apply`]): the register's step
//! since the previous reading (forward, wrapped, or reset: counted, never
//! negative) times the meter's whole millijoules per count
//! (`accounting::facility`). The meter's cumulative energy is kept as
//! timed [`Reading`]s, continuous across wraps, from which the
//! allocation takes each minute's metered energy.

pub mod allocate;
pub mod modbus;
pub mod pdu;
pub mod spec;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tracing::{Instrument, info, warn};

use crate::accounting::facility::{Reading, Step, step};
use crate::sync::{lock, unix_nanos_now};

pub use spec::{MeterConfig, MeterError, MeterSpec, Source, check};

/// How a poll ended: the `outcome` label of `capwatch_meter_polls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A reading, counted.
    Ok,
    /// A reading whose register went down by less than half its range: a
    /// reset or replaced meter. Nothing counted for the interval; the new
    /// count is the baseline.
    Reset,
    /// The meter did not answer within its timeout.
    Timeout,
    /// Connecting or talking to the meter failed.
    Error,
    /// The meter answered with a Modbus exception (or an HTTP error).
    Exception,
    /// The answer was malformed or impossible (wrong length, a count past
    /// the rollover, a negative or absurd figure).
    Invalid,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::Reset,
        Outcome::Timeout,
        Outcome::Error,
        Outcome::Exception,
        Outcome::Invalid,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::Exception => "exception",
            Outcome::Invalid => "invalid",
        }
    }

    /// Whether the meter answered with a usable reading.
    pub fn answered(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Reset)
    }
}

/// What one read of a meter gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raw {
    /// A Modbus energy register's count.
    Count(u64),
    /// A PDU's reading: its power and its cumulative energy (mJ).
    Pdu(capwatch_common::redfish::Reading),
}

/// Why a read gave nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("no answer within the timeout")]
    Timeout,
    #[error("{0}")]
    Transport(String),
    #[error("exception: {0}")]
    Exception(String),
    #[error("invalid answer: {0}")]
    Invalid(String),
}

impl ReadError {
    fn outcome(&self) -> Outcome {
        match self {
            ReadError::Timeout => Outcome::Timeout,
            ReadError::Transport(_) => Outcome::Error,
            ReadError::Exception(_) => Outcome::Exception,
            ReadError::Invalid(_) => Outcome::Invalid,
        }
    }
}

/// Most readings kept per meter for the allocation (a day at 15 s).
pub const MAX_READINGS: usize = 6_000;

/// A meter's live figures.
#[derive(Debug, Default)]
pub struct Live {
    /// Whether the last poll gave a reading.
    pub up: bool,
    /// Polls by outcome, in `Outcome::ALL` order.
    pub polls: [u64; 6],
    /// Power over the last interval between two readings, in milliwatts.
    pub power_mw: Option<u64>,
    /// Energy counted since this collector started polling the meter.
    pub energy_mj: u64,
    /// When the last reading arrived (Unix nanoseconds).
    pub last_success_ns: Option<i64>,
    /// The register's last count: the baseline of the next step.
    last_count: Option<u64>,
    /// Timed cumulative energy (`energy_mj`), oldest first.
    pub readings: VecDeque<Reading>,
    /// The readings as the meter gave them, (Unix ns, raw value: the
    /// register's count or a PDU's energy in mJ), oldest first: what the
    /// allocation counts from, back to the reading it last used.
    pub raw: VecDeque<(i64, u64)>,
    /// Metered and measured energy of the minutes this collector
    /// allocated.
    pub allocated_mj: u64,
    pub measured_mj: u64,
    /// Metered / measured energy (parts per million) of the latest minute
    /// this collector allocated in which something was measured: what
    /// live facility power of the meter's nodes is node power times.
    pub ratio_ppm: Option<u64>,
    /// Connected nodes the meter covers, at the last poll.
    pub nodes_connected: u64,
    /// The last outcome, to log changes once.
    last_outcome: Option<Outcome>,
}

impl Live {
    /// Applies one poll's result at `at_ns` and returns its outcome.
    pub fn apply(&mut self, spec: &MeterSpec, at_ns: i64, read: Result<Raw, ReadError>) -> Outcome {
        let outcome = match read {
            Err(e) => e.outcome(),
            Ok(Raw::Count(count)) => {
                let Source::Modbus(m) = &spec.source else {
                    return self.count(Outcome::Invalid);
                };
                match self.last_count {
                    None => {
                        self.last_count = Some(count);
                        if u128::from(count) >= m.rollover {
                            self.last_count = None;
                            Outcome::Invalid
                        } else {
                            self.record(at_ns, count, 0);
                            Outcome::Ok
                        }
                    }
                    Some(prev) => match step(prev, count, m.rollover) {
                        Step::Forward(n) | Step::Wrapped(n) => {
                            match n.checked_mul(m.mj_per_count) {
                                Some(mj) => {
                                    self.last_count = Some(count);
                                    self.record(at_ns, count, mj);
                                    Outcome::Ok
                                }
                                // Beyond 2^64 mJ (5 TWh) in one interval: absurd.
                                None => Outcome::Invalid,
                            }
                        }
                        Step::Reset => {
                            self.last_count = Some(count);
                            self.power_mw = None;
                            self.record(at_ns, count, 0);
                            Outcome::Reset
                        }
                        Step::OutOfRange => Outcome::Invalid,
                    },
                }
            }
            Ok(Raw::Pdu(reading)) => match reading.energy_millijoules {
                // No energy sensor: nothing to allocate.
                None => Outcome::Invalid,
                Some(now) => {
                    let outcome = match self.last_count {
                        None => {
                            self.record(at_ns, now, 0);
                            Outcome::Ok
                        }
                        Some(prev) if now >= prev => {
                            self.record(at_ns, now, now - prev);
                            Outcome::Ok
                        }
                        // A counter that went back: reset by someone, or
                        // a replaced PDU. Nothing counted for the interval.
                        Some(_) => {
                            self.record(at_ns, now, 0);
                            Outcome::Reset
                        }
                    };
                    self.last_count = Some(now);
                    // The PDU's own power reading, where it has one.
                    if reading.power_milliwatts.is_some() {
                        self.power_mw = reading.power_milliwatts;
                    }
                    outcome
                }
            },
        };
        self.count(outcome)
    }

    /// Polls that ended with `outcome`.
    pub fn polls_of(&self, outcome: Outcome) -> u64 {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.polls[i]
    }

    fn count(&mut self, outcome: Outcome) -> Outcome {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.polls[i] += 1;
        self.up = outcome.answered();
        if !self.up {
            self.power_mw = None;
        }
        outcome
    }

    /// Adds `mj` to the meter's energy as of `at_ns`.
    fn record(&mut self, at_ns: i64, raw: u64, mj: u64) {
        let prev = self.readings.back().copied();
        self.energy_mj = self.energy_mj.saturating_add(mj);
        self.power_mw = match prev {
            Some(p) if at_ns > p.at_ns => {
                let mw = u128::from(mj) * 1_000_000_000 / (at_ns - p.at_ns) as u128;
                Some(u64::try_from(mw).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        // A clock that stepped back: the reading stands at the newest time.
        let at_ns = prev.map_or(at_ns, |p| at_ns.max(p.at_ns));
        self.last_success_ns = Some(at_ns);
        self.readings.push_back(Reading {
            at_ns,
            energy_mj: self.energy_mj,
        });
        while self.readings.len() > MAX_READINGS {
            self.readings.pop_front();
        }
        self.raw.push_back((at_ns, raw));
        while self.raw.len() > MAX_READINGS {
            self.raw.pop_front();
        }
    }
}

/// One meter: its checked spec and live figures.
#[derive(Debug)]
pub struct Meter {
    pub spec: MeterSpec,
    pub live: Mutex<Live>,
}

impl Meter {
    pub fn new(spec: MeterSpec) -> Self {
        Self {
            spec,
            live: Mutex::default(),
        }
    }
}

/// Every configured meter, read by `/metrics` and the allocation.
#[derive(Debug, Default)]
pub struct Board {
    pub meters: Vec<Meter>,
}

impl Board {
    pub fn new(specs: Vec<MeterSpec>) -> Self {
        Self {
            meters: specs.into_iter().map(Meter::new).collect(),
        }
    }
}

/// How many connected nodes a meter covers: given by the wiring (the
/// fleet), so this module does not depend on it.
pub type CoveredNodes = Arc<dyn Fn(&MeterSpec) -> u64 + Send + Sync>;

/// A poller for every meter of `board`, in its order: every client set
/// up, or the first meter that cannot be.
pub fn pollers(board: &Board) -> Result<Vec<Poller>, MeterError> {
    board.meters.iter().map(|m| Poller::new(&m.spec)).collect()
}

/// Starts one polling task per meter (`pollers` from [`pollers`]); each
/// stops when `shutdown` flips.
pub fn spawn(
    board: &Arc<Board>,
    pollers: Vec<Poller>,
    covered: CoveredNodes,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    pollers
        .into_iter()
        .enumerate()
        .map(|(i, poller)| {
            let span =
                tracing::info_span!("task", task = "meter", meter = %board.meters[i].spec.id);
            tokio::spawn(
                poll_loop(board.clone(), i, poller, covered.clone(), shutdown.clone())
                    .instrument(span),
            )
        })
        .collect()
}

async fn poll_loop(
    board: Arc<Board>,
    i: usize,
    mut poller: Poller,
    covered: CoveredNodes,
    mut shutdown: watch::Receiver<bool>,
) {
    let meter = &board.meters[i];
    let spec = &meter.spec;
    let mut ticker = tokio::time::interval(spec.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(kind = poller.source.kind(), nodes = ?spec.nodes, interval_ms = spec.interval.as_millis() as u64, "polling meter");
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        poller.poll(meter, &covered).await;
    }
}

/// Polls one meter: its client and what it logged last.
pub struct Poller {
    source: Reader,
    warned_uncovered: bool,
}

impl Poller {
    /// A poller for the meter; its client set up now (a PDU's
    /// credentials and CA files read), so a bad one refuses the start.
    pub fn new(spec: &MeterSpec) -> Result<Self, MeterError> {
        Ok(Self {
            source: Reader::new(spec)?,
            warned_uncovered: false,
        })
    }

    /// Reads the meter once, within its timeout, and applies the result
    /// to its live figures; logs what changed.
    pub async fn poll(&mut self, meter: &Meter, covered: &CoveredNodes) -> Outcome {
        let spec = &meter.spec;
        let read = match tokio::time::timeout(spec.timeout, self.source.read()).await {
            Ok(r) => r,
            Err(_) => Err(ReadError::Timeout),
        };
        if matches!(read, Err(ReadError::Timeout | ReadError::Transport(_))) {
            // The connection may hold a half-read answer: start afresh.
            self.source.reset();
        }
        let error = read.as_ref().err().cloned();
        let nodes = covered(spec);
        let mut live = lock(&meter.live);
        let outcome = live.apply(spec, unix_nanos_now(), read);
        live.nodes_connected = nodes;
        let changed = live.last_outcome != Some(outcome);
        live.last_outcome = Some(outcome);
        drop(live);
        if nodes == 0 && !self.warned_uncovered {
            warn!(nodes = ?spec.nodes, "the meter covers no connected node: its energy has no one to go to (capwatch_meter_nodes_connected 0)");
        }
        self.warned_uncovered = nodes == 0;
        match outcome {
            Outcome::Reset => {
                warn!(
                    "meter register went down: counted as a reset (or a replaced meter), nothing counted for the interval, counting again from the new value"
                );
            }
            Outcome::Ok if changed => info!("meter answering"),
            Outcome::Ok => {}
            _ if changed => {
                warn!(outcome = outcome.label(), error = %error.map(|e| e.to_string()).unwrap_or_default(), "meter read failed")
            }
            _ => {}
        }
        outcome
    }
}

/// The client of one meter.
enum Reader {
    Modbus(modbus::Client),
    RedfishPdu(pdu::Client),
}

impl Reader {
    fn new(spec: &MeterSpec) -> Result<Self, MeterError> {
        Ok(match &spec.source {
            Source::Modbus(m) => Reader::Modbus(modbus::Client::new(m.clone())),
            Source::RedfishPdu(p) => {
                let c = pdu::Client::new(p, spec.timeout).map_err(|reason| MeterError {
                    meter: spec.id.clone(),
                    setting: "url",
                    reason,
                })?;
                if p.insecure {
                    warn!(meter = %spec.id, url = %p.url, "insecure = true: the PDU's certificate is not verified");
                } else if c.is_plaintext() {
                    warn!(meter = %spec.id, url = %p.url, "the PDU is read over plain HTTP: its credentials travel unencrypted");
                }
                Reader::RedfishPdu(c)
            }
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Reader::Modbus(_) => "modbus",
            Reader::RedfishPdu(_) => "redfish_pdu",
        }
    }

    async fn read(&mut self) -> Result<Raw, ReadError> {
        match self {
            Reader::Modbus(c) => c.read().await.map(Raw::Count),
            Reader::RedfishPdu(c) => c.read().await.map(Raw::Pdu),
        }
    }

    fn reset(&mut self) {
        if let Reader::Modbus(c) = self {
            c.disconnect();
        }
    }
}

#[cfg(test)]
mod tests;
