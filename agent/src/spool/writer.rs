//! The disk spool's writer: a thread of its own (`capwatch-spool`) that
//! owns the log's files ([`Disk`]) and does every write, sync, new segment
//! and delete the spool asks for, in the order asked. The spool hands it
//! [`Command`]s over a channel and reads what it has done from a small
//! state of its own ([`Progress`], never the spool's lock), so nothing on
//! the agent's runtime thread, and nothing holding the spool's lock, waits
//! on the disk.
//!
//! *Invariant:* the writer reports a sample durable only once it is
//! written and synced under the fsync policy, and only under the
//! numbering it was written in: a rewrite (the spool renumbered) starts a
//! new generation, and what the writer reports of an older one is never
//! applied to the new numbering.
//!
//! *A failing disk:* on an error the writer deletes the spool's files
//! itself, closes them, reports the failure and exits. *A hung disk:*
//! when the spool gives the disk up (one operation under way too long, or
//! too many queued), the writer, once its call returns, deletes the files
//! and exits; until then it is left behind.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capwatch_proto::v1::NodeSample;
use tokio::sync::Notify;
use tracing::{error, warn};

use super::disk::Disk;

/// A disk operation, done in the order sent.
#[derive(Debug)]
pub(super) enum Command {
    /// Appends `sample`, the one after `before`; `forgotten`: the highest
    /// sequence acked or dropped.
    Append {
        sample: NodeSample,
        before: u64,
        forgotten: u64,
    },
    /// Every sample up to this one is acked or dropped.
    Forget(u64),
    /// Replaces the log with `samples` under `epoch` (after a
    /// renumbering), starting `generation`.
    Rewrite {
        generation: u64,
        epoch: u64,
        samples: VecDeque<NodeSample>,
        last_seq: u64,
        what: &'static str,
    },
    /// Syncs what was appended.
    Sync,
}

/// The disk failed: the operation, the error, and the files that could
/// not be deleted.
#[derive(Debug)]
pub(super) struct Failure {
    pub what: &'static str,
    pub error: io::Error,
    pub left: Vec<(PathBuf, io::Error)>,
}

/// What the writer has done, shared with the spool.
#[derive(Debug, Default)]
struct Progress {
    /// The numbering the figures below are of.
    generation: u64,
    /// Every sample up to this one is written and synced.
    durable: u64,
    /// The disk's bound dropped every sample up to this one.
    dropped_through: u64,
    /// Bytes of segment files, and how many there are.
    bytes: u64,
    segments: usize,
    /// Commands done.
    done: u64,
    /// When the operation under way began; `None`: none is.
    busy_since: Option<Instant>,
    failed: Option<Failure>,
    /// The spool gave the disk up: once its operation returns, the writer
    /// deletes the files and exits.
    given_up: bool,
    /// The writer is done with the disk: its files closed, its lock let go.
    exited: bool,
    /// Woken whenever the writer has done an operation (the stream task
    /// waits for samples to become sendable).
    wake: Option<Arc<Notify>>,
}

#[derive(Debug, Default)]
struct State {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // Every update leaves the figures consistent: a panic elsewhere
        // does not make them wrong.
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds of the progress, at most `timeout`.
    fn wait(&self, timeout: Duration, done: impl Fn(&Progress) -> bool) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |p| !done(p))
            .unwrap_or_else(|p| p.into_inner());
        done(&guard)
    }
}

/// What the spool reads of the writer.
#[derive(Debug)]
pub(super) enum Seen {
    /// Going on: its figures under `generation`.
    Going {
        generation: u64,
        durable: u64,
        dropped_through: u64,
        /// How long the operation under way has taken; and the commands
        /// sent and not done yet.
        busy_for: Option<Duration>,
        queued: u64,
    },
    Failed(Failure),
}

/// The spool's handle on its writer thread.
#[derive(Debug)]
pub(super) struct Writer {
    tx: Option<mpsc::Sender<Command>>,
    state: Arc<State>,
    /// `None` once the thread is left behind (given up, or at exit).
    thread: Option<JoinHandle<()>>,
    /// Commands sent.
    sent: u64,
    /// The spool's numbering: bumped by each rewrite sent.
    pub generation: u64,
    /// The figures last read.
    pub bytes: u64,
    pub segments: usize,
}

impl Writer {
    /// Starts the writer on `disk`, whose samples up to `last_seq` are
    /// durable. On failure (no thread), the disk's files are deleted and
    /// returned with the error: those that could not be.
    pub fn spawn(disk: Disk, last_seq: u64) -> Result<Self, Failure> {
        let state = Arc::new(State::default());
        {
            let mut p = state.lock();
            p.durable = last_seq;
            p.bytes = disk.bytes();
            p.segments = disk.segments();
        }
        let (tx, rx) = mpsc::channel();
        let inherit = super::disk::inherit();
        let (bytes, segments) = (disk.bytes(), disk.segments());
        let dir = disk.dir().to_path_buf();
        let spawned = {
            let state = state.clone();
            std::thread::Builder::new()
                .name("capwatch-spool".into())
                .spawn(move || {
                    inherit();
                    run(disk, last_seq, &rx, &state);
                })
        };
        match spawned {
            Ok(thread) => Ok(Self {
                tx: Some(tx),
                state,
                thread: Some(thread),
                sent: 0,
                generation: 0,
                bytes,
                segments,
            }),
            // The disk went with the closure (its files closed): every
            // segment file is in the directory, found by listing it.
            Err(error) => Err(Failure {
                what: "start the spool's writer thread",
                error,
                left: super::disk::remove_segments(&dir, Vec::new()),
            }),
        }
    }

    /// Queues `command` for the writer.
    pub fn send(&mut self, command: Command) {
        // A writer gone has reported why; the spool reads it next.
        if let Some(tx) = &self.tx
            && tx.send(command).is_ok()
        {
            self.sent += 1;
        }
    }

    /// Reads what the writer has done.
    pub fn read(&mut self) -> Seen {
        let mut p = self.state.lock();
        if let Some(failure) = p.failed.take() {
            return Seen::Failed(failure);
        }
        self.bytes = p.bytes;
        self.segments = p.segments;
        Seen::Going {
            generation: p.generation,
            durable: p.durable,
            dropped_through: p.dropped_through,
            busy_for: p.busy_since.map(|at| at.elapsed()),
            queued: self.sent.saturating_sub(p.done),
        }
    }

    /// How long the operation under way has taken (`None`: none is).
    pub fn busy_for(&self) -> Option<Duration> {
        self.state.lock().busy_since.map(|at| at.elapsed())
    }

    /// Whether the writer has done everything sent (or is gone).
    pub fn idle(&self) -> bool {
        let p = self.state.lock();
        p.exited || p.failed.is_some() || p.done >= self.sent
    }

    /// Waits until the writer has done everything sent (or is gone), at
    /// most `timeout`; blocks the caller.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let sent = self.sent;
        self.state.wait(timeout, |p| {
            p.exited || p.failed.is_some() || p.done >= sent
        })
    }

    /// Waits until the writer thread is done with the disk, at most
    /// `timeout`.
    #[cfg(test)]
    pub fn wait_exited(&self, timeout: Duration) -> bool {
        self.state.wait(timeout, |p| p.exited)
    }

    /// Wakes `notify` whenever the writer has done an operation.
    pub fn wake(&self, notify: Arc<Notify>) {
        self.state.lock().wake = Some(notify);
    }

    /// Gives the disk up: the writer deletes the files and exits once its
    /// operation returns; nothing waits for it.
    pub fn give_up(&mut self) {
        self.state.lock().given_up = true;
        // No more commands: a writer that has just finished its operation
        // finds the channel closed, and deletes the files too.
        self.tx = None;
        self.leave_behind();
    }

    /// Lets the thread go on alone: dropping the handle will not wait for
    /// it.
    pub fn leave_behind(&mut self) {
        self.thread = None;
    }
}

/// The longest dropping a writer waits for it to finish: closing a file
/// on a network filesystem that hangs must not hold the agent's exit.
const DROP_WAIT: Duration = Duration::from_secs(5);

impl Drop for Writer {
    /// The writer finishes what it was sent, closes the files and exits;
    /// this waits for it, [`DROP_WAIT`] at most, unless it was left
    /// behind.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            if self.state.wait(DROP_WAIT, |p| p.exited) {
                let _ = thread.join();
            } else {
                warn!(
                    "the spool's disk writer did not finish closing its files; it is left behind"
                );
            }
        }
    }
}

/// The writer's loop: each command in turn, until the spool is gone or
/// gives the disk up, or the disk fails.
fn run(mut disk: Disk, last_seq: u64, rx: &mpsc::Receiver<Command>, state: &State) {
    let mut generation = 0u64;
    // The last sample appended, the last durable, the last the disk's
    // bound dropped: of `generation`.
    let mut last = last_seq;
    let mut durable = last_seq;
    let mut dropped_through = 0u64;
    while let Ok(command) = rx.recv() {
        {
            let mut p = state.lock();
            if p.given_up {
                break;
            }
            p.busy_since = Some(Instant::now());
        }
        let result = match command {
            Command::Append {
                sample,
                before,
                forgotten,
            } => match disk.append(&sample, before, forgotten.max(dropped_through)) {
                Ok(appended) => {
                    if let Some(through) = appended.dropped_through {
                        dropped_through = dropped_through.max(through);
                    }
                    last = sample.seq;
                    if appended.synced {
                        durable = last;
                    } else if appended.synced_before {
                        durable = durable.max(before);
                    }
                    Ok(())
                }
                Err(e) => Err(("append", e)),
            },
            Command::Forget(seq) => disk.forget(seq).map_err(|e| ("ack", e)),
            Command::Rewrite {
                generation: next,
                epoch,
                samples,
                last_seq,
                what,
            } => match disk.rewrite(epoch, &samples, last_seq) {
                Ok(()) => {
                    generation = next;
                    (last, durable, dropped_through) = (last_seq, last_seq, 0);
                    Ok(())
                }
                Err(e) => Err((what, e)),
            },
            Command::Sync => disk.sync().map_err(|e| ("sync", e)),
        };
        if let Err((what, error)) = result {
            // Deleted here, before the spool hears of it: nothing goes out
            // from memory while a log behind it is still there.
            let left = disk.remove_all();
            drop(disk);
            if state.lock().given_up {
                // The spool gave this disk up already and reads no more
                // failures: said here, or never.
                warn!(operation = what, error = %error, files_left = left.len(), "the disk under the spool failed after the spool gave it up: its files are deleted");
                for (path, e) in &left {
                    error!(file = %path.display(), error = %e, "could not delete a spool file: a later run may find samples older than this one's");
                }
            }
            let wake = {
                let mut p = state.lock();
                p.busy_since = None;
                p.done += 1;
                p.failed = Some(Failure { what, error, left });
                p.bytes = 0;
                p.segments = 0;
                p.exited = true;
                p.wake.clone()
            };
            state.changed.notify_all();
            if let Some(w) = wake {
                w.notify_one();
            }
            return;
        }
        if disk.is_synced() {
            // A new segment, a rewrite or a sync covers all appended.
            durable = last;
        }
        let (wake, given_up) = {
            let mut p = state.lock();
            p.busy_since = None;
            p.done += 1;
            p.generation = generation;
            p.durable = durable;
            p.dropped_through = dropped_through;
            p.bytes = disk.bytes();
            p.segments = disk.segments();
            (p.wake.clone(), p.given_up)
        };
        state.changed.notify_all();
        if let Some(w) = wake {
            w.notify_one();
        }
        if given_up {
            break;
        }
    }
    if state.lock().given_up {
        let left = disk.remove_all();
        warn!(
            files_left = left.len(),
            "the disk under the spool answered after the spool gave it up: its files are deleted"
        );
        for (path, e) in left {
            error!(file = %path.display(), error = %e, "could not delete a spool file: a later run may find samples older than this one's");
        }
    }
    drop(disk);
    state.lock().exited = true;
    state.changed.notify_all();
}
