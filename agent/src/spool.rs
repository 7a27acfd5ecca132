//! Samples not yet acknowledged by the collector, and the stream epoch and
//! sequence numbers they carry.
//!
//! *Invariant:* a sample leaves the spool only when the collector has acked
//! its sequence number, when the spool is full and it is the oldest, or
//! when its epoch is refused after it was sent (the collector may hold it,
//! so sending it again under another epoch could count it twice). In the
//! last two cases it is counted; the energy it carried is not lost, since
//! the next sample's cumulative counter covers it (a GPU without a counter
//! has the gap estimated from power for at most the collector's staleness
//! window; the rest is uncovered time).
//!
//! *Invariant:* a sample's (epoch, seq) is its identity once the collector
//! may hold it. Samples never sent under a refused epoch, or sent above the
//! sequence the collector said it accepted, are renumbered into the next
//! one: the collector does not hold them.
//!
//! *On disk* (optional, [`disk`]): every sample is appended to a log as it
//! is pushed, and every ack or drop is recorded, so a restarted agent
//! (after a crash too) finds the unacked samples, keeps their epoch and
//! sequence numbers, and numbers its new samples after them in the same
//! epoch: the collector deduplicates whatever it already holds, exactly.
//!
//! *Invariant:* with a disk spool, a sample is sent only once it is on
//! disk (written, and synced under the fsync policy), so a sequence number
//! the collector may hold is never assigned again after a restart. When
//! the disk fails, its files are deleted (a log behind memory would break
//! that) and the spool goes on in memory, counted and logged. Should a log
//! fall behind all the same (files that could not be deleted, a restored
//! backup, a hung disk that never answered again), the collector's Welcome
//! says so: see [`Spool::welcomed`].
//!
//! *Invariant:* nothing here waits on the disk. Its writes, syncs, new
//! segments and deletes run on the spool's writer thread
//! (`spool::writer`), in the order the spool asks for them; the spool
//! keeps every sample and number in memory and takes in what the writer
//! has done ([`Spool::absorb`], at each call that changes the spool and
//! whenever `Shared::spool` locks it): the samples it reports durable
//! become sendable, those the disk's bound dropped are dropped (counted),
//! and a failure gives the disk up as above. A disk operation under way
//! longer than `stall_after` ([`disk::STALL_AFTER`]), or more operations
//! queued than twice the capacity (and [`QUEUE_SLACK`]), gives the disk up
//! too, counted as a stall: the spool goes on in memory and the writer
//! deletes the files once its call returns. Only opening the spool at
//! start (reading what an earlier run left) runs on the caller's thread,
//! before any sample is taken or sent.

pub mod disk;
mod writer;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use capwatch_proto::v1::NodeSample;
use prost::Message;
use tokio::sync::Notify;
use tracing::{error, info, warn};

pub use disk::{DiskConfig, SpoolError};
use writer::{Command, Seen, Writer};

/// Disk operations queued beyond the spool's capacity (twice over) and
/// this many more: the disk keeps up with neither sampling nor acks, and
/// is given up as stalled rather than let the queue's copies of the
/// samples grow without a bound.
const QUEUE_SLACK: u64 = 64;

#[derive(Debug)]
pub struct Spool {
    samples: VecDeque<NodeSample>,
    capacity: usize,
    dropped: u64,
    /// The stream epoch of every sample here.
    epoch: u64,
    /// The sequence number of the last sample pushed.
    last_seq: u64,
    /// The highest sequence number sent under this epoch: the collector
    /// may hold every sample up to it.
    sent: u64,
    /// The highest sequence number that may be sent: on disk (and synced),
    /// or, in memory only, the last.
    durable: u64,
    /// Encoded bytes of the samples held.
    bytes: u64,
    /// The writer thread of the spool on disk.
    disk: Option<Writer>,
    /// How long one disk operation may take before the disk is given up.
    stall_after: Duration,
    /// A writer given up as stalled, left to finish alone.
    left_behind: Option<Writer>,
    /// The disk spool failed (or stalled) since start, and was given up;
    /// stalls alone.
    disk_errors: u64,
    disk_stalls: u64,
    /// Samples the disk's bound dropped that the agent's counter has not
    /// taken yet (`take_unreported_drops`).
    unreported_drops: u64,
    /// Samples found on disk at start, and torn or corrupt records dropped
    /// there.
    restored: u64,
    corrupt: u64,
    /// The highest sequence number acked or dropped.
    forgotten: u64,
    /// The highest sequence number ever sent under this epoch (`sent` as
    /// it was before any settle).
    sent_ever: u64,
    collector_ahead: u64,
    /// Whether the spool was opened to be kept on disk (`spool_dir`).
    disk_configured: bool,
}

/// The spool's size and what became of its disk, for the agent's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Depth {
    /// Unacked samples.
    pub samples: u64,
    /// Their encoded size, in bytes.
    pub bytes: u64,
    /// Bytes of the spool's files on disk; `None`: no disk spool (not
    /// configured, or given up after a write error).
    pub disk_bytes: Option<u64>,
    /// Samples dropped for lack of room since start.
    pub dropped: u64,
    /// Write errors (and stalls) that made the agent give up its disk
    /// spool.
    pub disk_errors: u64,
    /// Of those, disk operations that did not return within
    /// `stall_after` (or a queue the disk could not catch up with).
    pub disk_stalls: u64,
    /// Samples found on disk at start; torn or corrupt records dropped
    /// there.
    pub restored: u64,
    pub corrupt: u64,
    /// Welcomes that said the collector holds sequence numbers of this
    /// epoch the spool never sent (its disk fell behind): the samples never
    /// sent were renumbered after them.
    pub collector_ahead: u64,
    /// Whether the spool is configured to be kept on disk (whether or not
    /// it still is).
    pub disk_configured: bool,
}

/// Logs that the disk spool was given up after `e`, and the files that
/// could not be deleted.
fn report_disk_failure(
    what: &str,
    e: &std::io::Error,
    total: u64,
    left: Vec<(std::path::PathBuf, std::io::Error)>,
) {
    error!(operation = what, error = %e, disk_errors_total = total, "spool on disk failed (a full or failing disk?): its files are deleted and the agent goes on with the spool in memory, which a restart loses");
    for (path, e) in left {
        error!(file = %path.display(), error = %e, "could not delete a spool file: a later run may find samples older than this one's");
    }
}

/// What moving to a new epoch did to the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renumbered {
    /// Samples never sent, now numbered 1.. in the new epoch.
    pub kept: u64,
    /// Samples sent but not acked under the old epoch, given up.
    pub abandoned: u64,
}

/// What the collector's Welcome did to the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcomed {
    /// Samples the collector holds, forgotten.
    pub acked: u64,
    /// Samples never sent, renumbered after what the collector holds (it
    /// holds sequence numbers of this epoch this spool never sent).
    pub renumbered: u64,
}

impl Spool {
    /// An empty spool whose samples will carry `epoch`.
    pub fn new(capacity: usize, epoch: u64) -> Self {
        Self {
            samples: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            dropped: 0,
            epoch,
            last_seq: 0,
            sent: 0,
            durable: 0,
            bytes: 0,
            disk: None,
            stall_after: disk::STALL_AFTER,
            left_behind: None,
            disk_errors: 0,
            disk_stalls: 0,
            unreported_drops: 0,
            restored: 0,
            corrupt: 0,
            forgotten: 0,
            sent_ever: 0,
            collector_ahead: 0,
            disk_configured: false,
        }
    }

    /// A spool kept on disk as configured (in memory only when `disk` is
    /// `None`): what an earlier run left there is restored, under its epoch
    /// and sequence numbers; a new spool takes `epoch`.
    pub fn open(
        capacity: usize,
        epoch: u64,
        disk: Option<&DiskConfig>,
        node: &str,
    ) -> Result<Self, SpoolError> {
        let mut spool = Self::new(capacity, epoch);
        let Some(cfg) = disk else {
            return Ok(spool);
        };
        spool.disk_configured = true;
        let (opened, restored) = disk::Disk::open(cfg, node, epoch, spool.capacity)?;
        spool.epoch = restored.epoch.unwrap_or(epoch);
        spool.last_seq = restored.last_seq;
        // Whatever an earlier run numbered may have been sent: should the
        // collector refuse this epoch, those samples are given up, never
        // renumbered (it may hold them).
        spool.sent = restored.last_seq;
        spool.sent_ever = restored.last_seq;
        spool.durable = restored.last_seq;
        spool.forgotten = restored
            .samples
            .front()
            .map_or(restored.last_seq, |s| s.seq.saturating_sub(1));
        spool.restored = restored.samples.len() as u64;
        spool.corrupt = restored.corrupt;
        spool.dropped = restored.dropped;
        spool.bytes = restored
            .samples
            .iter()
            .map(|s| s.encoded_len() as u64)
            .sum();
        spool.samples = restored.samples;
        let disk = match opened {
            disk::Opened::Disk(d) => d,
            disk::Opened::Failed(e, left) => {
                spool.disk_errors += 1;
                report_disk_failure("open", &e, spool.disk_errors, left);
                return Ok(spool);
            }
        };
        info!(
            dir = %cfg.dir.display(),
            epoch = spool.epoch,
            resumed = restored.segments > 0,
            last_seq = spool.last_seq,
            samples = spool.samples.len(),
            segments_read = restored.segments,
            corrupt_dropped = restored.corrupt,
            corrupt_bytes = restored.corrupt_bytes,
            dropped = restored.dropped,
            disk_bytes = disk.bytes(),
            "spool on disk opened"
        );
        spool.stall_after = cfg.stall_after;
        if restored.corrupt > 0 {
            warn!(
                corrupt_dropped = restored.corrupt,
                corrupt_bytes = restored.corrupt_bytes,
                "the spool on disk held torn or corrupt records (a crash while writing, or damage): dropped; the energy they carried is kept by the next counter delta"
            );
        }
        match Writer::spawn(disk, spool.last_seq) {
            Ok(w) => spool.disk = Some(w),
            Err(f) => {
                spool.disk_errors += 1;
                report_disk_failure(f.what, &f.error, spool.disk_errors, f.left);
            }
        }
        Ok(spool)
    }

    /// Wakes `notify` whenever the disk has done an operation: samples may
    /// have become sendable (or the disk is idle).
    pub fn wake_on_progress(&mut self, notify: Arc<Notify>) {
        if let Some(w) = &self.disk {
            w.wake(notify);
        }
    }

    /// Takes in what the disk has done: samples it has written (and
    /// synced) become sendable, those its bound dropped are dropped; a
    /// disk that failed, or stalled, is given up. Never waits on the disk.
    pub fn absorb(&mut self) {
        let Some(w) = self.disk.as_mut() else {
            return;
        };
        let (generation, durable, dropped_through) = match w.read() {
            Seen::Failed(f) => {
                // The writer deleted the files and closed them: what is
                // left of it returns at once.
                self.disk = None;
                self.disk_errors += 1;
                report_disk_failure(f.what, &f.error, self.disk_errors, f.left);
                self.durable = self.last_seq;
                return;
            }
            Seen::Going {
                busy_for: Some(busy),
                ..
            } if busy >= self.stall_after => {
                let why = format!("a disk operation has not returned for {}s", busy.as_secs());
                self.stalled(&why);
                return;
            }
            Seen::Going { queued, .. } if queued > 2 * self.capacity as u64 + QUEUE_SLACK => {
                let why = format!("{queued} disk operations queued");
                self.stalled(&why);
                return;
            }
            Seen::Going {
                generation,
                durable,
                dropped_through,
                ..
            } => (generation, durable, dropped_through),
        };
        // What the writer says of an earlier numbering (before a rewrite
        // it has not done yet) says nothing of this one.
        if generation != w.generation {
            return;
        }
        let mut dropped = 0;
        while self
            .samples
            .front()
            .is_some_and(|s| s.seq <= dropped_through)
        {
            self.pop_front();
            dropped += 1;
        }
        self.forgotten = self.forgotten.max(dropped_through);
        self.dropped += dropped;
        self.unreported_drops += dropped;
        self.durable = self.durable.max(durable.min(self.last_seq));
    }

    /// Gives a hung disk up: the spool goes on in memory; the writer
    /// deletes the files once its call returns.
    fn stalled(&mut self, why: &str) {
        let Some(mut w) = self.disk.take() else {
            return;
        };
        w.give_up();
        self.left_behind = Some(w);
        self.disk_errors += 1;
        self.disk_stalls += 1;
        error!(
            reason = why,
            stall_after_s = self.stall_after.as_secs_f64(),
            disk_errors_total = self.disk_errors,
            disk_stalls_total = self.disk_stalls,
            "spool on disk does not answer (a hung or congested disk?): given up; the agent goes on with the spool in memory, which a restart loses, and the files are deleted once the disk answers"
        );
        self.durable = self.last_seq;
    }

    /// Whether the disk has done all it was asked (or there is none).
    pub fn disk_idle(&self) -> bool {
        self.disk.as_ref().is_none_or(Writer::idle)
    }

    /// Waits until the disk has done all it was asked, at most `timeout`,
    /// and takes it in; whether it had. Blocks the caller: for tools and
    /// tests, never the agent's runtime thread.
    pub fn wait_idle(&mut self, timeout: Duration) -> bool {
        let idle = self.disk.as_ref().is_none_or(|w| w.wait_idle(timeout));
        self.absorb();
        idle
    }

    /// Lets the writer finish alone: dropping the spool will not wait for
    /// it (at exit, when it did not finish by the drain deadline).
    pub fn leave_writer_behind(&mut self) {
        if let Some(w) = self.disk.as_mut() {
            w.leave_behind();
        }
    }

    /// The spool's size and what became of its disk.
    pub fn depth(&self) -> Depth {
        Depth {
            samples: self.samples.len() as u64,
            bytes: self.bytes,
            disk_bytes: self.disk.as_ref().map(|w| w.bytes),
            dropped: self.dropped,
            disk_errors: self.disk_errors,
            disk_stalls: self.disk_stalls,
            restored: self.restored,
            corrupt: self.corrupt,
            collector_ahead: self.collector_ahead,
            disk_configured: self.disk_configured,
        }
    }

    /// Asks for what is on disk to be synced, so all of it may be sent
    /// (before the drain at shutdown, under an fsync interval): it is, once
    /// the disk has done it.
    pub fn sync(&mut self) {
        self.absorb();
        match self.disk.as_mut() {
            Some(w) => w.send(Command::Sync),
            None => self.durable = self.last_seq,
        }
    }

    fn pop_front(&mut self) -> Option<NodeSample> {
        let s = self.samples.pop_front()?;
        self.bytes = self.bytes.saturating_sub(s.encoded_len() as u64);
        Some(s)
    }

    /// Records on disk that every sample below the oldest held is gone.
    fn forgot(&mut self) {
        let through = self
            .samples
            .front()
            .map_or(self.last_seq, |s| s.seq.saturating_sub(1));
        if through <= self.forgotten {
            return;
        }
        self.forgotten = through;
        if let Some(w) = self.disk.as_mut() {
            w.send(Command::Forget(through));
        }
    }

    /// The epoch the spool's samples belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Appends a sample, numbering it next in the epoch; returns how many
    /// old samples were dropped to make room since the last push (in
    /// memory, or by the disk's bound).
    pub fn push(&mut self, mut sample: NodeSample) -> u64 {
        self.absorb();
        let mut dropped = 0;
        while self.samples.len() >= self.capacity {
            self.pop_front();
            dropped += 1;
        }
        if dropped > 0 {
            self.forgot();
        }
        let before = self.last_seq;
        self.last_seq += 1;
        sample.seq = self.last_seq;
        match self.disk.as_mut() {
            None => self.durable = self.last_seq,
            Some(w) => w.send(Command::Append {
                sample: sample.clone(),
                before,
                forgotten: self.forgotten,
            }),
        }
        self.dropped += dropped;
        self.bytes += sample.encoded_len() as u64;
        self.samples.push_back(sample);
        dropped
    }

    /// Samples the disk's bound dropped that were not yet reported (the
    /// agent's counter takes them).
    pub fn take_unreported_drops(&mut self) -> u64 {
        std::mem::take(&mut self.unreported_drops)
    }

    /// How long until the disk operation under way passes the stall
    /// bound (`None`: none is under way, or there is no disk): whoever
    /// waits on the disk looks at the spool again then, so a hung disk is
    /// given up on time even when nothing else locks the spool.
    pub fn stall_check_in(&self) -> Option<Duration> {
        let busy = self.disk.as_ref()?.busy_for()?;
        Some(self.stall_after.saturating_sub(busy) + Duration::from_millis(10))
    }

    /// Records that every sample up to `seq` went out on a stream of this
    /// epoch.
    pub fn sent(&mut self, seq: u64) {
        self.sent = self.sent.max(seq);
        self.sent_ever = self.sent_ever.max(seq);
    }

    /// Records the collector's word that it accepted nothing of this epoch
    /// above `seq` on the stream that just ended: samples above it that
    /// went out there are no longer in doubt.
    pub fn settle(&mut self, seq: u64) {
        self.sent = self.sent.min(seq);
    }

    /// Moves to `epoch`, which the collector will accept where it refused
    /// the current one: the samples already sent (the collector may hold
    /// them under the old epoch) are given up, the rest are numbered from
    /// 1 in the new epoch, in order.
    pub fn renumber(&mut self, epoch: u64) -> Renumbered {
        self.absorb();
        let before = self.samples.len();
        let sent = self.sent;
        self.samples.retain(|s| s.seq > sent);
        let abandoned = (before - self.samples.len()) as u64;
        for (s, seq) in self.samples.iter_mut().zip(1u64..) {
            s.seq = seq;
        }
        self.epoch = epoch;
        self.last_seq = self.samples.len() as u64;
        self.sent = 0;
        self.sent_ever = 0;
        self.forgotten = 0;
        self.bytes = self.samples.iter().map(|s| s.encoded_len() as u64).sum();
        self.rewrite_disk("renumber");
        Renumbered {
            kept: self.last_seq,
            abandoned,
        }
    }

    /// Takes the collector's Welcome: it holds every sample of this epoch
    /// up to `acked`.
    ///
    /// Should it hold a sequence number this spool never sent under this
    /// epoch, that number was assigned by a run whose log on disk fell
    /// behind (a failing disk whose files could not be deleted, a spool
    /// directory restored from a backup, a damaged newest segment): the
    /// samples never sent are different samples under the same numbers, so
    /// they are renumbered after `acked`, in order, and the numbering goes
    /// on from there (on disk too). The samples that were sent are at or
    /// below `acked`: the collector holds them.
    pub fn welcomed(&mut self, acked: u64) -> Welcomed {
        self.absorb();
        if acked <= self.sent_ever {
            return Welcomed {
                acked: self.ack(acked) as u64,
                renumbered: 0,
            };
        }
        self.collector_ahead += 1;
        let before = self.samples.len();
        let sent = self.sent_ever;
        self.samples.retain(|s| s.seq > sent);
        let gone = (before - self.samples.len()) as u64;
        for (s, seq) in self.samples.iter_mut().zip(acked + 1..) {
            s.seq = seq;
        }
        let renumbered = self.samples.len() as u64;
        warn!(
            epoch = self.epoch,
            acked_seq = acked,
            last_seq = self.last_seq,
            sent = sent,
            renumbered,
            "the collector holds sequence numbers of this epoch this spool never sent (its log on disk fell behind an earlier run): the samples never sent are renumbered after them"
        );
        self.last_seq = acked + renumbered;
        self.sent = acked;
        self.sent_ever = acked;
        self.forgotten = acked;
        self.bytes = self.samples.iter().map(|s| s.encoded_len() as u64).sum();
        self.rewrite_disk("renumber after the collector");
        Welcomed {
            acked: gone,
            renumbered,
        }
    }

    /// Replaces what is on disk with the samples in memory, under their
    /// new numbers: none is sendable until the disk has done it (a sample
    /// sent under its new number while the disk holds it under the old
    /// one would be found, and sent, again after a restart).
    fn rewrite_disk(&mut self, what: &'static str) {
        match self.disk.as_mut() {
            Some(w) => {
                w.generation += 1;
                self.durable = 0;
                w.send(Command::Rewrite {
                    generation: w.generation,
                    epoch: self.epoch,
                    samples: self.samples.clone(),
                    last_seq: self.last_seq,
                    what,
                });
            }
            None => self.durable = self.last_seq,
        }
    }

    /// Forgets every sample at or below `seq`; returns how many.
    pub fn ack(&mut self, seq: u64) -> usize {
        self.absorb();
        let before = self.samples.len();
        while self.samples.front().is_some_and(|s| s.seq <= seq) {
            self.pop_front();
        }
        let n = before - self.samples.len();
        if n > 0 {
            self.forgot();
        }
        n
    }

    /// Up to `max` samples with a sequence number above `after`, oldest
    /// first, and no more than `max_bytes` encoded (but at least one); only
    /// samples that are on disk, with a disk spool.
    pub fn after(&self, after: u64, max: usize, max_bytes: usize) -> Vec<NodeSample> {
        let start = self.samples.partition_point(|s| s.seq <= after);
        let mut bytes = 0;
        self.samples
            .range(start..)
            .take(max)
            .take_while(|s| s.seq <= self.durable)
            .take_while(|s| {
                bytes += s.encoded_len();
                bytes <= max_bytes || bytes == s.encoded_len()
            })
            .cloned()
            .collect()
    }

    /// Whether a sample at or below `seq` is still unacked.
    pub fn holds_through(&self, seq: u64) -> bool {
        self.samples.front().is_some_and(|s| s.seq <= seq)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The samples' encoded size, in bytes (for `/metrics`).
    pub fn bytes(&self) -> usize {
        self.samples.iter().map(Message::encoded_len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Samples dropped for lack of room since start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Segment files on disk, as the writer last said; `None`: no disk.
    #[cfg(test)]
    pub(crate) fn disk_segments(&self) -> Option<usize> {
        self.disk.as_ref().map(|w| w.segments)
    }

    /// Waits until a writer given up as stalled is done with the disk.
    #[cfg(test)]
    pub(crate) fn wait_left_behind(&self) -> bool {
        self.left_behind
            .as_ref()
            .is_some_and(|w| w.wait_exited(Duration::from_secs(60)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(seq: u64) -> NodeSample {
        NodeSample {
            seq,
            ..Default::default()
        }
    }

    /// A spool holding samples 1..=n, as the sampler fills it.
    fn filled(capacity: usize, n: u64) -> Spool {
        let mut sp = Spool::new(capacity, 7);
        for t in 1..=n {
            sp.push(NodeSample {
                timestamp_unix_nanos: t as i64,
                ..Default::default()
            });
        }
        sp
    }

    fn seqs(v: &[NodeSample]) -> Vec<u64> {
        v.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn full_spool_drops_oldest_and_counts() {
        let sp = filled(3, 5);
        assert_eq!(sp.dropped(), 2);
        assert_eq!(seqs(&sp.after(0, 10, usize::MAX)), vec![3, 4, 5]);
    }

    #[test]
    fn ack_forgets_up_to_and_including() {
        let mut sp = filled(10, 5);
        assert_eq!(sp.ack(3), 3);
        assert_eq!(sp.ack(3), 0);
        assert_eq!(seqs(&sp.after(0, 10, usize::MAX)), vec![4, 5]);
        assert_eq!(seqs(&sp.after(4, 10, usize::MAX)), vec![5]);
        assert_eq!(seqs(&sp.after(0, 1, usize::MAX)), vec![4]);
        sp.ack(99);
        assert!(sp.is_empty());
    }

    #[test]
    fn batches_are_capped_by_encoded_size_but_never_empty() {
        let sp = filled(10, 5);
        let one = sp.after(0, 1, usize::MAX)[0].encoded_len();
        assert_eq!(seqs(&sp.after(0, 10, 2 * one)), vec![1, 2]);
        assert_eq!(seqs(&sp.after(0, 10, 1)), vec![1]);
    }

    #[test]
    fn a_new_epoch_keeps_what_was_never_sent_and_gives_up_the_rest() {
        // Invariant: moving to a new epoch renumbers the samples never
        // sent from 1, in order, gives up those sent and not acked, and
        // numbers the next sample after them.
        let mut sp = filled(10, 6);
        sp.ack(2);
        sp.sent(4);
        assert_eq!(seqs(&sp.after(0, 10, usize::MAX)), vec![3, 4, 5, 6]);
        assert_eq!(
            sp.renumber(99),
            Renumbered {
                kept: 2,
                abandoned: 2
            }
        );
        assert_eq!(sp.epoch(), 99);
        sp.push(s(0));
        let after = sp.after(0, 10, usize::MAX);
        assert_eq!(seqs(&after), vec![1, 2, 3]);
        let stamps: Vec<i64> = after.iter().map(|x| x.timestamp_unix_nanos).collect();
        assert_eq!(stamps, vec![5, 6, 0], "the samples never sent, in order");
        // Sent, then settled: the collector accepted none above 1.
        sp.sent(3);
        sp.settle(1);
        assert_eq!(
            sp.renumber(100),
            Renumbered {
                kept: 2,
                abandoned: 1
            }
        );
        // Nothing sent under the new epoch yet: a second refusal keeps all.
        assert_eq!(
            sp.renumber(101),
            Renumbered {
                kept: 2,
                abandoned: 0
            }
        );
    }

    #[test]
    fn a_welcome_within_what_was_ever_sent_only_acks() {
        // Invariant: samples sent and then settled below may still be the
        // collector's: a Welcome up to them acks them, never renumbers.
        let mut sp = filled(10, 5);
        sp.sent(4);
        sp.settle(2);
        assert_eq!(
            sp.welcomed(4),
            Welcomed {
                acked: 4,
                renumbered: 0
            }
        );
        assert_eq!(seqs(&sp.after(0, 10, usize::MAX)), vec![5]);
        assert_eq!(sp.depth().collector_ahead, 0);
        // Above all it ever sent: the one never sent follows the Welcome.
        sp.welcomed(9);
        assert_eq!(seqs(&sp.after(0, 10, usize::MAX)), vec![10]);
    }

    #[test]
    fn samples_are_numbered_in_the_order_they_are_pushed() {
        let mut sp = Spool::new(10, 1);
        for _ in 0..3 {
            sp.push(s(0));
        }
        assert_eq!(seqs(&sp.after(0, 10, usize::MAX)), vec![1, 2, 3]);
    }
}
