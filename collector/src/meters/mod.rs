//! Facility meters: one polling task per `[[meter]]` entry, each reading
//! under its own deadline, so a meter that hangs or fails changes nothing
//! but its own figures (`capwatch_meter_*`); ingest, commits and the other
//! meters never wait for it.
//!
//! A reading becomes energy here ([`Live::apply`]): the register's step
//! since the previous reading (forward or wrapped, within the meter's
//! `max_kw` over the time between them; anything else is refused, and a
//! reset only once the next reading goes on from it: never negative)
//! times the meter's whole millijoules per count (`accounting::facility`). The meter's cumulative energy is kept as
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

use crate::accounting::facility::{Reading, Step};
use crate::sync::{lock, unix_nanos_now};

pub use spec::{MeterConfig, MeterError, MeterSpec, Source, check};

/// How a poll ended: the `outcome` label of `capwatch_meter_polls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A reading, counted.
    Ok,
    /// A reset or replaced meter: a reading the previous one could not
    /// step to (`Invalid` when it came), which this one went on from.
    /// Nothing counted up to it; it is the baseline.
    Reset,
    /// The meter did not answer within its timeout.
    Timeout,
    /// Connecting or talking to the meter failed.
    Error,
    /// The meter answered with a Modbus exception (or an HTTP error).
    Exception,
    /// The answer was malformed or impossible (wrong length, a count past
    /// the rollover, a negative or absurd figure, no energy reading, a
    /// step beyond `max_kw` over the time since the last reading).
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
    /// The last reading taken, (Unix ns, raw value): the baseline of the
    /// next step.
    baseline: Option<(i64, u64)>,
    /// A reading the baseline cannot have stepped to (a drop, or a rise
    /// beyond `max_kw`): a reset if the next reading goes on from it.
    candidate: Option<(i64, u64)>,
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
    /// Nodes with measured minutes in the last allocation round that this
    /// meter and another one both cover (billed twice: a config to fix).
    pub nodes_overlapping: u64,
    /// Where the meter's allocation stood after the last round: the end of
    /// its last allocated minute (Unix seconds), as the ledger keeps it.
    pub allocated_through: Option<i64>,
    /// Nodes under the meter, still reading, whose power readings may yet
    /// book energy into minutes the watermark has passed, in the last
    /// round (`allocate::held_to`): what holds its allocation back.
    pub holding_nodes: u64,
    /// Allocated minutes this collector split again, since it started,
    /// because energy was booked for them after their split.
    pub minutes_split_again: u64,
    /// The last outcome, to log changes once.
    last_outcome: Option<Outcome>,
}

impl Live {
    /// Applies one poll's result at `at_ns` and returns its outcome.
    pub fn apply(&mut self, spec: &MeterSpec, at_ns: i64, read: Result<Raw, ReadError>) -> Outcome {
        let outcome = match read {
            Err(e) => e.outcome(),
            Ok(Raw::Count(count)) => {
                if matches!(spec.source, Source::Modbus(_)) {
                    self.take(spec, at_ns, count)
                } else {
                    Outcome::Invalid
                }
            }
            Ok(Raw::Pdu(reading)) => match reading.energy_millijoules {
                // No energy sensor: nothing to allocate.
                None => Outcome::Invalid,
                Some(now) => {
                    let outcome = self.take(spec, at_ns, now);
                    // The PDU's own power reading, where it has one.
                    if outcome.answered() && reading.power_milliwatts.is_some() {
                        self.power_mw = reading.power_milliwatts;
                    }
                    outcome
                }
            },
        };
        self.count(outcome)
    }

    /// Takes raw reading `now` (a register count or a PDU's mJ) at
    /// `at_ns`. A step the meter cannot have made in the time since the
    /// baseline (`MeterSpec::step`: beyond `max_kw`, or a drop whose wrap
    /// would be) is `Invalid` and the baseline kept; it stays a candidate
    /// reset, taken (`Reset`, nothing counted up to it) only when the next
    /// reading goes on from it plausibly and not from the baseline. A
    /// return to the baseline's count or above is the count carrying on.
    ///
    /// Every step is judged over the times the readings stand at
    /// ([`Live::stands_at`]), which are the times `raw` keeps: the
    /// allocation recounts `raw` with the same `MeterSpec::step`
    /// (`allocate::raw_delta`), so after a clock step back the live count
    /// and the ledger's agree on every millijoule.
    fn take(&mut self, spec: &MeterSpec, at_ns: i64, now: u64) -> Outcome {
        if !spec.in_range(now) {
            return Outcome::Invalid;
        }
        let at_ns = self.stands_at(at_ns);
        let Some((base_at, base)) = self.baseline else {
            let at = self.record(at_ns, now, 0);
            self.baseline = Some((at, now));
            return Outcome::Ok;
        };
        match spec.step(base, now, at_ns - base_at) {
            Step::Forward(n) | Step::Wrapped(n) => {
                let Some(mj) = spec.energy_of(n) else {
                    return Outcome::Invalid;
                };
                self.candidate = None;
                let at = self.record(at_ns, now, mj);
                self.baseline = Some((at, now));
                Outcome::Ok
            }
            Step::OutOfRange => Outcome::Invalid,
            Step::Reset | Step::Implausible => {
                let confirmed =
                    self.candidate
                        .and_then(|(c_at, c)| match spec.step(c, now, at_ns - c_at) {
                            Step::Forward(n) | Step::Wrapped(n) if n > 0 => {
                                spec.energy_of(n).map(|mj| (c_at, c, mj))
                            }
                            _ => None,
                        });
                match confirmed {
                    Some((c_at, c, mj)) => {
                        // The candidate was real: a reset or replaced
                        // meter. Nothing counted up to it.
                        self.candidate = None;
                        self.record(c_at, c, 0);
                        let at = self.record(at_ns, now, mj);
                        self.baseline = Some((at, now));
                        Outcome::Reset
                    }
                    None => {
                        // The earliest reading of a value the meter stays
                        // at is the candidate.
                        if self.candidate.is_none_or(|(_, c)| c != now) {
                            self.candidate = Some((at_ns, now));
                        }
                        Outcome::Invalid
                    }
                }
            }
        }
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

    /// The time a reading taken at `at_ns` stands at: not before the
    /// newest one recorded (a clock that stepped back).
    fn stands_at(&self, at_ns: i64) -> i64 {
        self.readings.back().map_or(at_ns, |p| at_ns.max(p.at_ns))
    }

    /// Adds `mj` to the meter's energy as of `at_ns`; returns the time it
    /// stands at (not before the previous reading).
    fn record(&mut self, at_ns: i64, raw: u64, mj: u64) -> i64 {
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
        let at_ns = self.stands_at(at_ns);
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
        at_ns
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
    /// Unix nanoseconds now: the system clock, or a test's own.
    clock: fn() -> i64,
}

impl Poller {
    /// A poller for the meter; its client set up now (a PDU's
    /// credentials and CA files read), so a bad one refuses the start.
    pub fn new(spec: &MeterSpec) -> Result<Self, MeterError> {
        Ok(Self {
            source: Reader::new(spec)?,
            warned_uncovered: false,
            clock: unix_nanos_now,
        })
    }

    /// Readings stamped by `clock` instead of the system clock.
    #[cfg(test)]
    pub fn with_clock(mut self, clock: fn() -> i64) -> Self {
        self.clock = clock;
        self
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
        let outcome = live.apply(spec, (self.clock)(), read);
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
                    "meter reading went on from a value the previous one could not step to: counted as a reset (or a replaced meter), nothing counted up to it, counting again from there"
                );
            }
            Outcome::Invalid if error.is_none() => {
                warn!(
                    max_kw = spec.max_mw as f64 / 1e6,
                    "meter reading refused: a step the meter cannot have made since the last reading (beyond max_kw, a drop that is no wrap) or no energy figure; the last good reading stays the baseline"
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
