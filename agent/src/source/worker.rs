//! Hardware reads off the sampler's thread.
//!
//! A [`Reader`] owns one worker thread that holds the thing it reads (the
//! NVML handle, the host's `/proc` figures) and answers one request at a
//! time. The sampler asks for a read at each tick and waits for the answer
//! until a deadline (one interval); it never blocks on the hardware.
//!
//! *Invariant:* at most one read is in flight. A read that misses its
//! deadline stays in flight: the worker is stalled, the sampler sends its
//! samples without this reader's readings (absent, never zero), counts the
//! stall once and asks nothing more until the worker answers. That late
//! answer is dropped (it was read for a tick long past) and the next tick
//! asks afresh. Cumulative counters read after the stall carry the energy
//! of the stalled ticks, so nothing is lost and nothing counted twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// While a worker stays stalled, how often the stall is logged again; and
/// how often new stalls are logged at most (a driver slower than the
/// interval stalls every other tick).
const STALL_LOG_EVERY: Duration = Duration::from_secs(60);

/// What one reader did, for `/metrics` and `/healthz`.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Reads that missed their deadline (each stall once, however long).
    pub stalls: AtomicU64,
    /// Samples sent without this reader's readings, the worker stalled.
    pub stalled_samples: AtomicU64,
    /// Late answers dropped once the worker came back.
    pub late_answers: AtomicU64,
    /// Whether a read is overdue now (or the worker is gone).
    pub stalled: AtomicBool,
    /// Reads answered in time.
    pub reads: AtomicU64,
}

/// What a read gave the sampler.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<R> {
    /// Read in time for this tick.
    Fresh(R),
    /// The worker is stalled (this read, or an earlier one, is overdue):
    /// nothing for this tick.
    Stalled,
}

struct Request<R> {
    at_unix_nanos: i64,
    reply: oneshot::Sender<R>,
}

struct InFlight<R> {
    reply: oneshot::Receiver<R>,
    since: Instant,
    /// Whether the stall was counted and logged.
    overdue: bool,
    logged_at: Option<Instant>,
    /// Whether this stall's start was logged (so its end is too).
    warned: bool,
}

/// One worker thread and the read it may have in flight.
pub struct Reader<R> {
    name: &'static str,
    requests: SyncSender<Request<R>>,
    in_flight: Option<InFlight<R>>,
    stats: Arc<ReaderStats>,
    gone: bool,
    /// When a new stall was last logged, and the stalls since, unlogged.
    stall_logged: Option<Instant>,
    unlogged_stalls: u64,
    /// Resolves once the worker has dropped what it reads.
    finished: oneshot::Receiver<()>,
}

impl<R: Send + 'static> Reader<R> {
    /// Starts the worker `capwatch-<name>`; `open` runs on it first (a
    /// driver's initialisation can hang too) and its result comes back on
    /// the returned receiver. Once it succeeds, every request is answered
    /// with `read(at)`.
    pub fn spawn_with<T, E, F>(
        name: &'static str,
        open: impl FnOnce() -> Result<(T, F), E> + Send + 'static,
    ) -> std::io::Result<(Self, oneshot::Receiver<Result<T, E>>)>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnMut(i64) -> R + 'static,
    {
        // One slot: the sampler never has more than one request out.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Request<R>>(1);
        let (opened_tx, opened_rx) = oneshot::channel();
        let (finished_tx, finished) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("capwatch-{name}"))
            // The default stack: loading NVML (its table of entry points)
            // takes more than a small one; untouched pages cost no memory.
            .spawn(move || {
                let mut read = match open() {
                    Ok((info, read)) => {
                        // Nobody may be waiting for it (`spawn`); the
                        // requests still come.
                        let _ = opened_tx.send(Ok(info));
                        read
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                // Ends when the sampler drops its Reader.
                while let Ok(req) = rx.recv() {
                    let _ = req.reply.send(read(req.at_unix_nanos));
                }
                // What it read is dropped here (a simulation saves its
                // counters, NVML shuts down) before `stop` hears of it.
                drop(read);
                let _ = finished_tx.send(());
            })?;
        Ok((
            Self {
                name,
                requests: tx,
                in_flight: None,
                stats: Arc::new(ReaderStats::default()),
                gone: false,
                stall_logged: None,
                unlogged_stalls: 0,
                finished,
            },
            opened_rx,
        ))
    }

    /// Starts a worker that needs no opening.
    pub fn spawn(
        name: &'static str,
        read: impl FnMut(i64) -> R + Send + 'static,
    ) -> std::io::Result<Self> {
        let (reader, _opened) =
            Self::spawn_with(name, move || Ok::<_, std::convert::Infallible>(((), read)))?;
        Ok(reader)
    }

    /// Stops the worker: no more requests, and what it reads is dropped
    /// once a read in progress returns. Waits for that until `until` at
    /// most (a worker hung in the driver is left behind); returns whether
    /// it finished.
    pub async fn stop(self, until: Instant) -> bool {
        let Self {
            requests, finished, ..
        } = self;
        drop(requests);
        // A closed channel: the worker ended without opening its source.
        tokio::time::timeout_at(until, finished).await.is_ok()
    }

    pub fn stats(&self) -> Arc<ReaderStats> {
        self.stats.clone()
    }

    /// Asks for a read stamped `at`, unless one is still in flight (then
    /// the answer to this tick is [`Outcome::Stalled`]). Returns at once.
    pub fn start(&mut self, at_unix_nanos: i64) {
        if let Some(flight) = &mut self.in_flight {
            match flight.reply.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return,
                Ok(_late) => {
                    self.stats.late_answers.fetch_add(1, Ordering::Relaxed);
                    if flight.warned {
                        info!(
                            reader = self.name,
                            stalled_ms = flight.since.elapsed().as_millis() as u64,
                            "hardware reads answer again; the next read is used"
                        );
                    }
                }
                Err(oneshot::error::TryRecvError::Closed) => self.lost_worker(),
            }
            self.in_flight = None;
            self.stats.stalled.store(self.gone, Ordering::Relaxed);
        }
        if self.gone {
            return;
        }
        let (reply, rx) = oneshot::channel();
        match self.requests.try_send(Request {
            at_unix_nanos,
            reply,
        }) {
            Ok(()) => {
                self.in_flight = Some(InFlight {
                    reply: rx,
                    since: Instant::now(),
                    overdue: false,
                    logged_at: None,
                    warned: false,
                })
            }
            // Full cannot happen (one request at a time, and the last one
            // was answered); either way the worker is not taking requests.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.lost_worker(),
        }
    }

    /// The answer to the read [`start`](Self::start) asked for, waiting
    /// until `deadline` at most.
    pub async fn finish(&mut self, deadline: Instant) -> Outcome<R> {
        let Some(flight) = &mut self.in_flight else {
            return self.stalled_sample();
        };
        if flight.overdue {
            return self.stalled_sample();
        }
        match tokio::time::timeout_at(deadline, &mut flight.reply).await {
            Ok(Ok(answer)) => {
                self.in_flight = None;
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                Outcome::Fresh(answer)
            }
            Ok(Err(_closed)) => {
                self.in_flight = None;
                self.lost_worker();
                self.stalled_sample()
            }
            Err(_elapsed) => {
                flight.overdue = true;
                flight.logged_at = Some(Instant::now());
                let stalls = self.stats.stalls.fetch_add(1, Ordering::Relaxed) + 1;
                self.stats.stalled.store(true, Ordering::Relaxed);
                self.unlogged_stalls += 1;
                if self
                    .stall_logged
                    .is_none_or(|at| at.elapsed() >= STALL_LOG_EVERY)
                {
                    warn!(
                        reader = self.name,
                        waited_ms = flight.since.elapsed().as_millis() as u64,
                        stalls = std::mem::take(&mut self.unlogged_stalls),
                        stalls_total = stalls,
                        "hardware read missed its deadline; its readings are absent until it answers (no new read is started meanwhile; logged at most once a minute)"
                    );
                    self.stall_logged = Some(Instant::now());
                    flight.warned = true;
                }
                self.stalled_sample()
            }
        }
    }

    /// Counts a sample sent without this reader's readings, and repeats
    /// the stall's log line at most every [`STALL_LOG_EVERY`].
    fn stalled_sample(&mut self) -> Outcome<R> {
        self.stats.stalled_samples.fetch_add(1, Ordering::Relaxed);
        if let Some(flight) = &mut self.in_flight
            && flight
                .logged_at
                .is_some_and(|at| at.elapsed() >= STALL_LOG_EVERY)
        {
            warn!(
                reader = self.name,
                stalled_ms = flight.since.elapsed().as_millis() as u64,
                samples_without_readings = self.stats.stalled_samples.load(Ordering::Relaxed),
                "hardware read still stalled"
            );
            flight.logged_at = Some(Instant::now());
        }
        Outcome::Stalled
    }

    fn lost_worker(&mut self) {
        if !self.gone {
            error!(
                reader = self.name,
                "hardware worker thread ended; its readings are absent until the agent restarts"
            );
        }
        self.gone = true;
        self.stats.stalled.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A reader whose every read waits for the test to let it go.
    fn gated() -> (Reader<i64>, mpsc::Sender<()>) {
        let (go, gate) = mpsc::channel::<()>();
        let reader = Reader::spawn("test", move |at| {
            let _ = gate.recv();
            at
        })
        .unwrap();
        (reader, go)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(20)
    }

    #[tokio::test]
    async fn an_answer_in_time_is_used() {
        let (mut r, go) = gated();
        go.send(()).unwrap();
        r.start(7);
        assert_eq!(
            r.finish(Instant::now() + Duration::from_secs(10)).await,
            Outcome::Fresh(7)
        );
        assert_eq!(r.stats().reads.load(Ordering::Relaxed), 1);
        assert!(!r.stats().stalled.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_hung_read_is_one_stall_and_no_second_read_until_it_answers() {
        // Invariant: one read in flight at most; a stall is counted once
        // however many ticks it lasts; the late answer is dropped and the
        // next tick's read is used.
        let (mut r, go) = gated();
        let stats = r.stats();
        r.start(1);
        assert_eq!(r.finish(soon()).await, Outcome::Stalled);
        for at in 2..5 {
            r.start(at);
            assert_eq!(r.finish(soon()).await, Outcome::Stalled);
        }
        assert_eq!(stats.stalls.load(Ordering::Relaxed), 1);
        assert_eq!(stats.stalled_samples.load(Ordering::Relaxed), 4);
        assert!(stats.stalled.load(Ordering::Relaxed));
        // Let the hung read (tick 1) finish, and the next one at once.
        go.send(()).unwrap();
        go.send(()).unwrap();
        // The late answer arrives on the worker's own time: poll for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            r.start(5);
            match r.finish(Instant::now() + Duration::from_secs(10)).await {
                Outcome::Fresh(at) => {
                    assert_eq!(at, 5, "the late answer for tick 1 is dropped");
                    break;
                }
                Outcome::Stalled => assert!(std::time::Instant::now() < deadline),
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(stats.late_answers.load(Ordering::Relaxed), 1);
        assert_eq!(stats.stalls.load(Ordering::Relaxed), 1);
        assert!(!stats.stalled.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn stopping_drops_what_the_worker_reads_but_leaves_a_hung_one() {
        struct Saves(Arc<AtomicBool>);
        impl Drop for Saves {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let saved = Arc::new(AtomicBool::new(false));
        let held = Saves(saved.clone());
        let mut r = Reader::spawn("test", move |at| {
            let _ = &held;
            at
        })
        .unwrap();
        r.start(1);
        assert_eq!(
            r.finish(Instant::now() + Duration::from_secs(10)).await,
            Outcome::Fresh(1)
        );
        assert!(r.stop(Instant::now() + Duration::from_secs(10)).await);
        assert!(
            saved.load(Ordering::Relaxed),
            "dropped before stop returned"
        );

        let (mut r, _go) = gated();
        r.start(1);
        assert_eq!(r.finish(soon()).await, Outcome::Stalled);
        assert!(!r.stop(soon()).await, "a hung worker holds nothing up");
    }

    #[tokio::test]
    async fn a_worker_that_dies_is_absent_not_a_hang() {
        let mut r = Reader::spawn("test", |_at: i64| -> i64 { panic!("read failed") }).unwrap();
        r.start(1);
        assert_eq!(
            r.finish(Instant::now() + Duration::from_secs(10)).await,
            Outcome::Stalled
        );
        r.start(2);
        assert_eq!(r.finish(soon()).await, Outcome::Stalled);
        assert!(r.stats().stalled.load(Ordering::Relaxed));
    }
}
