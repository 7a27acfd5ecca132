//! The spool on disk: the samples not yet acked, in an append-only log of
//! segment files, so that they survive an agent restart (a crash
//! included) and are sent again under their original (epoch, seq).
//!
//! *Format (version 1).* A directory of segment files named
//! `<index, 16 hex digits>.spool`, oldest first. Each begins with a header:
//!
//! ```text
//! magic "CWSPOOL\n" | version u32 | flags u8 | epoch u64 | last_seq u64 |
//! forgotten u64 | node id length u16 | node id | CRC-32C u32
//! ```
//!
//! (integers little-endian; flag 1: the segment was written whole from the
//! samples in memory and supersedes every earlier one; flag 2: a later
//! segment of such a rewrite, read only right after the segment before it
//! of the same rewrite, or as the oldest segment of all, since the first
//! segment of a rewrite is created after the others; `last_seq` is the
//! sequence number assigned last before the segment's first record,
//! `forgotten` the highest one acked or dropped by then), and goes on with
//! records:
//!
//! ```text
//! length u32 | CRC-32C u32 | payload: kind u8, body
//! ```
//!
//! (the CRC of a seed and the payload, the seed the CRC-32C of the header's
//! CRC and the segment's index, so that a record is valid only in its own
//! segment)
//!
//! where kind 1 is a sample (its protobuf encoding, seq included) and
//! kind 2 says every sample up to a sequence number (u64) is gone, acked or
//! dropped. A segment is created whole (written to a `.tmp` file, synced,
//! renamed, the directory synced), so a header is never torn; only the
//! last records of a segment can be, and reading stops at the first record
//! whose length or checksum does not hold.
//!
//! *Invariant:* reading a spool never panics and never allocates more
//! than [`MAX_RECORD_BYTES`] for a record, whatever the files hold. A torn
//! or corrupt record ends its segment: it and what follows are dropped and
//! counted. A file of another format version or another node is an error
//! naming the file, never read as this node's samples.
//!
//! [`Disk::open`] runs on the thread that opens the spool, at start;
//! everything after it, on the spool's writer thread (`spool::writer`).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capwatch_proto::v1::NodeSample;
use prost::Message;
use tracing::warn;

const MAGIC: &[u8; 8] = b"CWSPOOL\n";
/// The format version written and read.
pub const VERSION: u32 = 1;
const SUFFIX: &str = ".spool";
/// Held locked (flock) by the agent using the directory.
const LOCK_FILE: &str = "lock";
const TMP_SUFFIX: &str = ".tmp";
/// Largest record read back: far above any sample (a sample of 1024 GPUs
/// is about 100 KiB), so that a corrupt length cannot make reading
/// allocate much.
pub const MAX_RECORD_BYTES: u32 = 4 << 20;
/// Longest node id a header may carry (the agent's own are at most 253
/// bytes).
const MAX_NODE_LEN: u16 = 1024;
/// Header flag: the segment replaces every earlier one.
const FLAG_REWRITE: u8 = 1;
/// Header flag: a later segment of a rewrite.
const FLAG_PART: u8 = 2;
/// Header bytes before the node id.
const HEADER_FIXED: usize = 39;
const KIND_SAMPLE: u8 = 1;
const KIND_FORGET: u8 = 2;
/// Record length and checksum.
const RECORD_HEAD: usize = 8;
/// Segments a full spool is split into: the oldest is dropped whole when
/// the spool is full, about an eighth of it.
const SEGMENTS: u64 = 8;

/// Which I/O operations on the spool's files a test makes fail.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The one after the next `k` (a transient error).
    Once(u64),
    /// Every one after the next `k`: a disk gone bad, or, as the files are
    /// then left as they were, a process killed at that point.
    From(u64),
}

/// What a test does to the I/O operations on the spool's files: the
/// faults it injects, the operations counted, and one it holds up.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Plan {
    fault: Option<Fault>,
    /// I/O operations done under this plan.
    ops: u64,
    /// The next operation waits at this gate until the test opens it.
    hold: Option<std::sync::Arc<Gate>>,
}

/// Where a held I/O operation waits: a disk that does not answer until
/// the test says so.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// (an operation waits here, the gate was opened)
    state: std::sync::Mutex<(bool, bool)>,
    changed: std::sync::Condvar,
}

#[cfg(test)]
impl Gate {
    fn wait(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        self.changed.notify_all();
        while !s.1 {
            s = self.changed.wait(s).unwrap();
        }
    }

    /// Waits (a minute at most) until an I/O operation waits at the gate.
    pub(crate) fn wait_entered(&self) {
        let s = self.state.lock().unwrap();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, Duration::from_secs(60), |s| !s.0)
            .unwrap();
        assert!(s.0, "no I/O operation reached the gate");
    }

    /// Lets the held operation (and any later one) through.
    pub(crate) fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
thread_local! {
    /// The plan of the I/O operations done on this thread.
    static PLAN: std::cell::RefCell<std::sync::Arc<std::sync::Mutex<Plan>>> =
        std::cell::RefCell::new(Default::default());
}

#[cfg(test)]
fn with_plan<T>(f: impl FnOnce(&mut Plan) -> T) -> T {
    PLAN.with(|p| f(&mut p.borrow().lock().unwrap_or_else(|e| e.into_inner())))
}

/// Sets the I/O operations that fail on this thread (`None`: none), and
/// returns how many were done so far.
#[cfg(test)]
pub(crate) fn inject(fault: Option<Fault>) -> u64 {
    with_plan(|p| {
        p.fault = fault;
        p.ops
    })
}

/// Makes the next I/O operation on this thread's spool wait until the
/// gate returned is released (or dropped: a failed test never leaves the
/// writer waiting, and its spool's drop waiting for the writer).
#[cfg(test)]
pub(crate) fn hold() -> Held {
    let gate = std::sync::Arc::new(Gate::default());
    with_plan(|p| p.hold = Some(gate.clone()));
    Held(gate)
}

/// A gate that opens when dropped.
#[cfg(test)]
pub(crate) struct Held(pub(crate) std::sync::Arc<Gate>);

#[cfg(test)]
impl std::ops::Deref for Held {
    type Target = Gate;
    fn deref(&self) -> &Gate {
        &self.0
    }
}

#[cfg(test)]
impl Drop for Held {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// What a thread the spool starts (its writer) takes from the thread that
/// opened it: in tests, the plan of its I/O operations; nothing otherwise.
pub(super) fn inherit() -> impl FnOnce() + Send + 'static {
    #[cfg(test)]
    let plan = PLAN.with(|p| p.borrow().clone());
    move || {
        #[cfg(test)]
        PLAN.with(|p| *p.borrow_mut() = plan);
    }
}

/// Called before each I/O operation on the spool's files: waits where a
/// test holds it, fails it (EIO) where a test says so; does nothing
/// outside tests.
fn fault() -> io::Result<()> {
    #[cfg(test)]
    {
        let (hold, fail) = with_plan(|p| {
            p.ops += 1;
            let fail = match p.fault {
                None => false,
                Some(Fault::Once(0)) => {
                    p.fault = None;
                    true
                }
                Some(Fault::From(0)) => true,
                Some(Fault::Once(k)) => {
                    p.fault = Some(Fault::Once(k - 1));
                    false
                }
                Some(Fault::From(k)) => {
                    p.fault = Some(Fault::From(k - 1));
                    false
                }
            };
            (p.hold.take(), fail)
        });
        if let Some(gate) = hold {
            gate.wait();
        }
        if fail {
            return Err(io::Error::from_raw_os_error(5));
        }
    }
    Ok(())
}

/// CRC-32C (Castagnoli): the checksum of storage formats (iSCSI, ext4,
/// Btrfs), better at catching the burst errors of a torn write than the
/// zlib polynomial.
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool_dir {}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
    #[error(
        "spool_dir {}: in use by another agent process (its lock file is held); give each agent a spool_dir of its own",
        dir.display()
    )]
    Locked { dir: PathBuf },
    #[error(
        "spool file {}: format version {found}, this agent reads version {VERSION}; run the agent that wrote it to deliver its samples, or move the file away",
        path.display()
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "spool file {}: written by node {found:?}, this agent is node {ours:?}; give each node a spool_dir of its own",
        path.display()
    )]
    OtherNode {
        path: PathBuf,
        found: String,
        ours: String,
    },
}

/// Where and how the spool is kept on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub dir: PathBuf,
    /// Most bytes of segment files (plus one record, and the ack records
    /// and segment headers written since the last sample).
    pub max_bytes: u64,
    /// How often appended samples are synced; zero: each one as it is
    /// appended.
    pub fsync_interval: Duration,
    /// How long to wait for another process to let the directory's lock
    /// go (an agent being replaced) before giving up.
    pub lock_wait: Duration,
    /// How long one disk operation may take before the spool gives the
    /// disk up as hung and goes on in memory ([`STALL_AFTER`]).
    pub stall_after: Duration,
}

/// How long one disk operation (a write, an fsync, a new segment, a
/// rewrite) may take before the spool gives the disk up as hung: far
/// longer than a healthy disk takes, even a congested one or a network
/// filesystem riding out a short server failover; short enough that an
/// agent on a dead disk is delivering again within half a minute.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// How long the agent waits for the spool directory's lock by default.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Locks `dir` for this process, waiting up to `wait` for another to let
/// it go; `None`: it is still held. A lock file that cannot be written (a
/// read-only disk) is locked read-only: flock needs no write access.
fn lock_dir(dir: &Path, wait: Duration) -> io::Result<Option<File>> {
    let path = dir.join(LOCK_FILE);
    fault()?;
    let file = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => File::open(&path).map_err(|_| e)?,
    };
    let until = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(fs::TryLockError::WouldBlock) => return Ok(None),
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// A record of the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Sample(NodeSample),
    /// Every sample up to this sequence number is acked or dropped.
    Forget(u64),
}

/// What a segment's record checksums start from: its header's checksum
/// and its index, so that a record is valid in its own segment only (not
/// when a stale block of another segment, or of a file since replaced,
/// turns up in it).
pub fn record_seed(header_crc: u32, index: u64) -> u32 {
    let mut digest = CRC.digest();
    digest.update(&header_crc.to_le_bytes());
    digest.update(&index.to_le_bytes());
    digest.finalize()
}

/// A record's checksum in a segment whose records start from `seed`.
fn record_crc(seed: u32, payload: &[u8]) -> u32 {
    let mut digest = CRC.digest();
    digest.update(&seed.to_le_bytes());
    digest.update(payload);
    digest.finalize()
}

impl Record {
    /// Bytes of the record as written.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEAD
            + match self {
                Record::Sample(s) => 1 + s.encoded_len(),
                Record::Forget(_) => 9,
            }
    }

    /// The record as written in a segment whose checksums start from
    /// `seed` ([`record_seed`]): length, checksum, payload.
    pub fn encode(&self, seed: u32) -> Vec<u8> {
        let mut payload = Vec::new();
        match self {
            Record::Sample(s) => {
                payload.reserve(1 + s.encoded_len());
                payload.push(KIND_SAMPLE);
                // Writing to a Vec cannot fail.
                s.encode(&mut payload).expect("a Vec grows as needed");
            }
            Record::Forget(seq) => {
                payload.push(KIND_FORGET);
                payload.extend_from_slice(&seq.to_le_bytes());
            }
        }
        let mut out = Vec::with_capacity(RECORD_HEAD + payload.len());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&record_crc(seed, &payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }
}

/// A segment's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Written whole from memory: replaces every earlier segment.
    pub rewrite: bool,
    /// A later segment of such a rewrite: read only after the segment
    /// before it of the same rewrite (or as the oldest of all).
    pub part: bool,
    pub epoch: u64,
    pub last_seq: u64,
    pub forgotten: u64,
    pub node: String,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let node = &self.node.as_bytes()[..self.node.len().min(MAX_NODE_LEN as usize)];
        let mut out = Vec::with_capacity(HEADER_FIXED + node.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(
            if self.rewrite { FLAG_REWRITE } else { 0 } | if self.part { FLAG_PART } else { 0 },
        );
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.last_seq.to_le_bytes());
        out.extend_from_slice(&self.forgotten.to_le_bytes());
        out.extend_from_slice(&(node.len() as u16).to_le_bytes());
        out.extend_from_slice(node);
        let crc = CRC.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }
}

/// Why a segment could not be read at all.
#[derive(Debug)]
enum BadSegment {
    /// Not a spool segment, or its header is damaged: dropped, counted.
    Corrupt(String),
    Version(u32),
    Io(io::Error),
}

/// What reading one segment found.
#[derive(Debug, Default)]
pub struct SegmentRead {
    /// Bytes of whole records (and the header) before anything bad.
    pub good_bytes: u64,
    /// Why reading stopped early, and the bytes left unread.
    pub bad: Option<(String, u64)>,
}

fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        fault()?;
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Reads a header from the start of `r`.
fn read_header(r: &mut impl Read) -> Result<(Header, u64, u32), BadSegment> {
    let mut fixed = [0u8; HEADER_FIXED];
    let n = read_exact_or_eof(r, &mut fixed).map_err(BadSegment::Io)?;
    if n < MAGIC.len() || &fixed[..8] != MAGIC {
        return Err(BadSegment::Corrupt("not a spool segment (no magic)".into()));
    }
    if n >= 12 {
        let version = le_u32(&fixed[8..12]);
        if version != VERSION {
            return Err(BadSegment::Version(version));
        }
    }
    if n < fixed.len() {
        return Err(BadSegment::Corrupt("header cut short".into()));
    }
    let node_len = u16::from_le_bytes([fixed[37], fixed[38]]);
    if node_len > MAX_NODE_LEN {
        return Err(BadSegment::Corrupt(format!(
            "header names a node id of {node_len} bytes"
        )));
    }
    let mut rest = vec![0u8; node_len as usize + 4];
    if read_exact_or_eof(r, &mut rest).map_err(BadSegment::Io)? < rest.len() {
        return Err(BadSegment::Corrupt("header cut short".into()));
    }
    let (node, crc) = rest.split_at(node_len as usize);
    let mut digest = CRC.digest();
    digest.update(&fixed);
    digest.update(node);
    if digest.finalize() != le_u32(crc) {
        return Err(BadSegment::Corrupt("header checksum mismatch".into()));
    }
    let node = String::from_utf8(node.to_vec())
        .map_err(|_| BadSegment::Corrupt("node id is not UTF-8".into()))?;
    let flags = fixed[12];
    if flags & !(FLAG_REWRITE | FLAG_PART) != 0 || flags == FLAG_REWRITE | FLAG_PART {
        return Err(BadSegment::Corrupt(format!(
            "unknown header flags {flags:#x}"
        )));
    }
    let header = Header {
        rewrite: flags & FLAG_REWRITE != 0,
        part: flags & FLAG_PART != 0,
        epoch: le_u64(&fixed[13..21]),
        last_seq: le_u64(&fixed[21..29]),
        forgotten: le_u64(&fixed[29..37]),
        node,
    };
    Ok((header, (fixed.len() + rest.len()) as u64, le_u32(crc)))
}

/// Reads the records after a header from `r`, `len` bytes in all, handing
/// each whole one to `f`; stops at the end or at the first bad one (or
/// read error).
fn read_records(
    r: &mut impl Read,
    seed: u32,
    mut offset: u64,
    len: u64,
    mut f: impl FnMut(Record),
) -> SegmentRead {
    let stop = |offset: u64, why: String| SegmentRead {
        good_bytes: offset,
        bad: Some((why, len.saturating_sub(offset))),
    };
    loop {
        let mut head = [0u8; RECORD_HEAD];
        let n = match read_exact_or_eof(r, &mut head) {
            Ok(n) => n,
            Err(e) => return stop(offset, format!("read error: {e}")),
        };
        if n == 0 {
            return SegmentRead {
                good_bytes: offset,
                bad: None,
            };
        }
        if n < RECORD_HEAD {
            return stop(offset, "record header cut short (torn write)".into());
        }
        let size = le_u32(&head[..4]);
        let left = len.saturating_sub(offset + RECORD_HEAD as u64);
        if size == 0 || size > MAX_RECORD_BYTES {
            return stop(offset, format!("record length {size} out of range"));
        }
        if u64::from(size) > left {
            return stop(
                offset,
                format!("record of {size} bytes, {left} left in the file (torn write)"),
            );
        }
        let mut payload = vec![0u8; size as usize];
        match read_exact_or_eof(r, &mut payload) {
            Ok(n) if n < payload.len() => {
                return stop(offset, "record cut short (torn write)".into());
            }
            Ok(_) => {}
            Err(e) => return stop(offset, format!("read error: {e}")),
        }
        if record_crc(seed, &payload) != le_u32(&head[4..]) {
            return stop(offset, "record checksum mismatch".into());
        }
        let record = match payload[0] {
            KIND_SAMPLE => match NodeSample::decode(&payload[1..]) {
                Ok(s) => Record::Sample(s),
                Err(e) => return stop(offset, format!("sample does not decode: {e}")),
            },
            KIND_FORGET if payload.len() == 9 => Record::Forget(le_u64(&payload[1..])),
            kind => {
                return stop(
                    offset,
                    format!("record of unknown kind {kind} ({size} bytes)"),
                );
            }
        };
        f(record);
        offset += RECORD_HEAD as u64 + u64::from(size);
    }
}

/// A segment file of the log.
#[derive(Debug, Clone)]
struct Segment {
    index: u64,
    /// What its record checksums start from.
    seed: u32,
    bytes: u64,
    /// The sequence number of its last sample; 0: none.
    last_sample: u64,
}

/// What was found on disk at start.
#[derive(Debug, Default)]
pub struct Restored {
    /// The epoch and the last sequence number of the spool; `None`: there
    /// was no spool (or nothing readable in it).
    pub epoch: Option<u64>,
    pub last_seq: u64,
    /// Unacked samples, oldest first.
    pub samples: VecDeque<NodeSample>,
    /// Segments read.
    pub segments: usize,
    /// Records (or whole segments) dropped as torn or corrupt, and their
    /// bytes.
    pub corrupt: u64,
    pub corrupt_bytes: u64,
    /// Samples dropped because more were found than the spool may hold.
    pub dropped: u64,
}

/// A spool on disk opened: ready, or read but not writable (the error,
/// and the old files that could not be deleted).
#[derive(Debug)]
pub enum Opened {
    Disk(Disk),
    Failed(io::Error, Vec<(PathBuf, io::Error)>),
}

/// The log's files, kept in step with the samples in memory.
#[derive(Debug)]
pub struct Disk {
    dir: PathBuf,
    node: String,
    max_bytes: u64,
    segment_bytes: u64,
    fsync_interval: Duration,
    segments: VecDeque<Segment>,
    /// The last segment, appended to.
    active: Option<File>,
    /// The directory's lock, held while the spool is open.
    _lock: File,
    epoch: u64,
    /// Whether anything was written since the last sync, and when that was.
    unsynced: bool,
    synced_at: Instant,
}

/// What an append did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Appended {
    /// The oldest segments were dropped for room: every sample up to this
    /// sequence number is gone.
    pub dropped_through: Option<u64>,
    /// Everything appended so far is synced.
    pub synced: bool,
    /// Everything appended before this sample is synced (a new segment
    /// was started).
    pub synced_before: bool,
}

fn segment_name(index: u64) -> String {
    format!("{index:016x}{SUFFIX}")
}

/// Segment indexes go up to [`MAX_INDEX`]: a name above it is none of this
/// agent's (it would take 2^63 segments), so adding to an index never
/// overflows.
fn segment_index(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(SUFFIX)?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16)
        .ok()
        .filter(|i| *i <= MAX_INDEX)
}

/// The highest segment index read.
const MAX_INDEX: u64 = u64::MAX >> 1;

impl Disk {
    /// Opens the spool in `cfg.dir` (created if missing) for node `node`:
    /// reads what is there, keeps at most `capacity` samples, and rewrites
    /// them into one fresh segment (under the spool's epoch, or `fresh_epoch`
    /// when there was none), removing the old ones.
    pub fn open(
        cfg: &DiskConfig,
        node: &str,
        fresh_epoch: u64,
        capacity: usize,
    ) -> Result<(Opened, Restored), SpoolError> {
        // A directory that cannot be made, locked or listed (a read-only
        // or failing disk) leaves the spool in memory: the agent meters on.
        let unusable = |e: io::Error| Ok((Opened::Failed(e, Vec::new()), Restored::default()));
        if let Err(e) = fault().and_then(|()| fs::create_dir_all(&cfg.dir)) {
            return unusable(e);
        }
        // One agent per directory: two appending to one log would
        // interleave their records and reuse each other's numbers.
        let lock = match lock_dir(&cfg.dir, cfg.lock_wait) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                return Err(SpoolError::Locked {
                    dir: cfg.dir.clone(),
                });
            }
            Err(e) => return unusable(e),
        };
        let entries = match fault().and_then(|()| fs::read_dir(&cfg.dir)) {
            Ok(entries) => entries,
            Err(e) => return unusable(e),
        };
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    warn!(dir = %cfg.dir.display(), error = %e, "spool directory entry unreadable: skipped");
                    continue;
                }
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name
                .strip_suffix(TMP_SUFFIX)
                .is_some_and(|n| segment_index(n).is_some())
            {
                // A segment being created when the agent stopped: never
                // renamed, so never part of the log.
                let _ = fs::remove_file(&path);
            } else if let Some(index) = segment_index(name) {
                // Only a plain file is read (a FIFO would block, a link
                // could point anywhere).
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    found.push((index, path));
                } else {
                    warn!(file = %path.display(), "spool directory entry named as a segment is not a plain file: left alone");
                }
            }
        }
        found.sort();
        let mut restored = Restored::default();
        let mut forgotten = 0u64;
        let mut next_index = 0u64;
        // The segment listed before, and whether it was of a rewrite.
        let mut before: Option<(u64, bool)> = None;
        for (index, path) in &found {
            next_index = next_index.max(index + 1);
            let previous = before.replace((*index, false));
            let opened = fault()
                .and_then(|()| File::open(path))
                .and_then(|f| Ok((f.metadata()?.len(), f)));
            let (len, file) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "spool segment unreadable (an I/O error): dropped");
                    restored.corrupt += 1;
                    continue;
                }
            };
            let mut r = BufReader::new(file);
            let (header, header_len, header_crc) = match read_header(&mut r) {
                Ok(h) => h,
                Err(BadSegment::Version(found)) => {
                    return Err(SpoolError::Version {
                        path: path.clone(),
                        found,
                    });
                }
                Err(BadSegment::Io(e)) => {
                    warn!(file = %path.display(), error = %e, "spool segment unreadable (an I/O error): dropped");
                    restored.corrupt += 1;
                    restored.corrupt_bytes += len;
                    continue;
                }
                Err(BadSegment::Corrupt(why)) => {
                    warn!(file = %path.display(), reason = %why, bytes = len, "spool segment unreadable: dropped");
                    restored.corrupt += 1;
                    restored.corrupt_bytes += len;
                    continue;
                }
            };
            if header.node != node {
                return Err(SpoolError::OtherNode {
                    path: path.clone(),
                    found: header.node,
                    ours: node.to_string(),
                });
            }
            if header.part && previous.is_some_and(|p| p != (index - 1, true)) {
                // A rewrite interrupted before its first segment was
                // there: what it held is still in the older segments.
                warn!(file = %path.display(), "spool segment of a rewrite that did not finish: ignored");
                continue;
            }
            before = Some((*index, header.rewrite || header.part));
            restored.segments += 1;
            if header.rewrite || restored.epoch != Some(header.epoch) {
                // A segment written whole from memory starts the log
                // afresh: what came before is in it, renumbered into its
                // epoch, or was given up (the agent stopped before it could
                // delete the older segments).
                restored.samples.clear();
                restored.last_seq = 0;
                forgotten = 0;
                restored.epoch = Some(header.epoch);
            }
            restored.last_seq = restored.last_seq.max(header.last_seq);
            forgotten = forgotten.max(header.forgotten);
            let mut out_of_order = 0u64;
            let seed = record_seed(header_crc, *index);
            let read = read_records(&mut r, seed, header_len, len, |rec| match rec {
                Record::Sample(s) => {
                    if s.seq <= restored.last_seq {
                        out_of_order += 1;
                        return;
                    }
                    restored.last_seq = s.seq;
                    restored.samples.push_back(s);
                    if restored.samples.len() > capacity {
                        restored.samples.pop_front();
                        restored.dropped += 1;
                    }
                }
                Record::Forget(seq) => {
                    forgotten = forgotten.max(seq);
                    while restored.samples.front().is_some_and(|s| s.seq <= seq) {
                        restored.samples.pop_front();
                    }
                }
            });
            if out_of_order > 0 {
                warn!(file = %path.display(), records = out_of_order, "spool samples not above the sequence before them: dropped");
                restored.corrupt += out_of_order;
            }
            if let Some((why, bytes)) = read.bad {
                warn!(file = %path.display(), reason = %why, offset = read.good_bytes, dropped_bytes = bytes, "spool segment ends in a torn or corrupt record: the rest of it is dropped");
                restored.corrupt += 1;
                restored.corrupt_bytes += bytes;
            }
        }
        while restored.samples.front().is_some_and(|s| s.seq <= forgotten) {
            restored.samples.pop_front();
        }
        let epoch = restored.epoch.unwrap_or(fresh_epoch);
        let segment_bytes = (cfg.max_bytes / SEGMENTS).max(1);
        let mut disk = Disk {
            dir: cfg.dir.clone(),
            node: node.to_string(),
            max_bytes: cfg.max_bytes,
            segment_bytes,
            fsync_interval: cfg.fsync_interval,
            segments: VecDeque::new(),
            active: None,
            _lock: lock,
            epoch,
            unsynced: false,
            synced_at: Instant::now(),
        };
        // What was read is bounded too: the oldest beyond the limit go.
        let mut bytes: u64 = restored
            .samples
            .iter()
            .map(|s| (RECORD_HEAD + 1 + s.encoded_len()) as u64)
            .sum();
        while bytes > cfg.max_bytes.saturating_sub(segment_bytes / 2)
            && let Some(s) = restored.samples.pop_front()
        {
            bytes -= (RECORD_HEAD + 1 + s.encoded_len()) as u64;
            restored.dropped += 1;
        }
        let old: Vec<PathBuf> = found.into_iter().map(|(_, p)| p).collect();
        let written = disk.rewrite_from(
            next_index,
            epoch,
            &restored.samples,
            restored.last_seq,
            forgotten.min(restored.last_seq),
            &old,
        );
        restored.epoch.get_or_insert(epoch);
        match written {
            Ok(()) => Ok((Opened::Disk(disk), restored)),
            Err(e) => {
                // Read, but not writable (a full disk): the samples go on
                // in memory, and the old files go, as on any failure.
                // (Deleting scans the directory: the old files go too.)
                let left = disk.remove_all();
                Ok((Opened::Failed(e, left), restored))
            }
        }
    }

    /// The epoch of the samples on disk.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether everything written is synced.
    pub fn is_synced(&self) -> bool {
        !self.unsynced
    }

    /// Bytes of segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Segment files.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    fn path(&self, index: u64) -> PathBuf {
        self.dir.join(segment_name(index))
    }

    /// Creates segment `index` whole: header and `samples`, written to a
    /// temporary file, synced, renamed, the directory synced.
    fn create<'a>(
        &self,
        index: u64,
        header: &Header,
        samples: impl IntoIterator<Item = &'a NodeSample>,
    ) -> io::Result<(File, Segment)> {
        let tmp = self
            .dir
            .join(format!("{}{TMP_SUFFIX}", segment_name(index)));
        let mut buf = header.encode();
        let seed = record_seed(le_u32(&buf[buf.len() - 4..]), index);
        let mut last_sample = 0;
        for s in samples {
            buf.extend_from_slice(&Record::Sample(s.clone()).encode(seed));
            last_sample = s.seq;
        }
        fault()?;
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        fault()?;
        f.write_all(&buf)?;
        fault()?;
        f.sync_all()?;
        let path = self.path(index);
        fault()?;
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        fault()?;
        let active = OpenOptions::new().append(true).open(&path)?;
        Ok((
            active,
            Segment {
                index,
                seed,
                bytes: buf.len() as u64,
                last_sample,
            },
        ))
    }

    /// Replaces the whole log with one segment holding `samples` under
    /// `epoch`, and deletes `old` (and every earlier segment) once it is
    /// durable.
    fn rewrite_from(
        &mut self,
        index: u64,
        epoch: u64,
        samples: &VecDeque<NodeSample>,
        last_seq: u64,
        forgotten: u64,
        old: &[PathBuf],
    ) -> io::Result<()> {
        // Segments of the usual size, so that a full spool still drops an
        // eighth at a time: the later ones (parts) are created first; the
        // first, which supersedes every earlier segment, last: until it is
        // there, the parts are read as the leftovers of a rewrite that did
        // not finish.
        let mut ranges = Vec::new();
        let (mut start, mut bytes) = (0, 0u64);
        for (i, s) in samples.iter().enumerate() {
            let len = (RECORD_HEAD + 1 + s.encoded_len()) as u64;
            if i > start && bytes + len > self.segment_bytes {
                ranges.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes += len;
        }
        ranges.push(start..samples.len());
        let mut made = Vec::with_capacity(ranges.len());
        for (i, range) in ranges
            .iter()
            .enumerate()
            .skip(1)
            .chain(ranges.iter().enumerate().take(1))
        {
            let header = Header {
                rewrite: i == 0,
                part: i > 0,
                epoch,
                last_seq: match range.start {
                    0 => samples
                        .front()
                        .map_or(last_seq, |s| s.seq.saturating_sub(1)),
                    k => samples[k - 1].seq,
                },
                forgotten,
                node: self.node.clone(),
            };
            made.push(self.create(index + i as u64, &header, samples.range(range.clone()))?);
        }
        made.rotate_right(1);
        // Tracked before anything else can fail, so that giving the disk
        // up deletes them too; the older segments stay tracked until deleted.
        for (file, segment) in made {
            self.active = Some(file);
            self.segments.push_back(segment);
        }
        self.epoch = epoch;
        for p in old {
            remove(p)?;
        }
        while self.segments.front().is_some_and(|s| s.index < index) {
            if let Some(s) = self.segments.front() {
                remove(&self.path(s.index))?;
            }
            self.segments.pop_front();
        }
        sync_dir(&self.dir)?;
        self.unsynced = false;
        self.synced_at = Instant::now();
        Ok(())
    }

    /// Replaces the log with `samples` under `epoch` (after a renumbering).
    pub fn rewrite(
        &mut self,
        epoch: u64,
        samples: &VecDeque<NodeSample>,
        last_seq: u64,
    ) -> io::Result<()> {
        let next = self.segments.back().map_or(0, |s| s.index + 1);
        let forgotten = samples
            .front()
            .map_or(last_seq, |s| s.seq.saturating_sub(1));
        self.rewrite_from(next, epoch, samples, last_seq, forgotten, &[])
    }

    /// Appends `sample`, the one after `last_seq`, with `forgotten` the
    /// highest sequence acked or dropped: starts a new segment when the
    /// last is full, and drops the oldest segments when the spool is.
    pub fn append(
        &mut self,
        sample: &NodeSample,
        last_seq: u64,
        forgotten: u64,
    ) -> io::Result<Appended> {
        let record = Record::Sample(sample.clone());
        let mut out = Appended::default();
        let active_full = self
            .segments
            .back()
            .is_some_and(|s| s.bytes >= self.segment_bytes);
        if active_full {
            self.roll(last_seq, forgotten)?;
            out.synced_before = true;
        }
        while self.bytes() + record.encoded_len() as u64 > self.max_bytes {
            if self.segments.len() < 2 {
                if self.segments.back().is_none_or(|s| s.last_sample == 0) {
                    // No sample left to drop: the record goes in even
                    // above the limit (the bound is the limit plus one
                    // record).
                    break;
                }
                // Only the one being written: start another to drop it.
                self.roll(last_seq, forgotten)?;
                out.synced_before = true;
            }
            let Some(oldest) = self.segments.front().cloned() else {
                break;
            };
            remove(&self.path(oldest.index))?;
            self.segments.pop_front();
            if oldest.last_sample > 0 {
                let through = out.dropped_through.unwrap_or(0).max(oldest.last_sample);
                out.dropped_through = Some(through);
            }
        }
        self.write(&record)?;
        if let Some(active) = self.segments.back_mut() {
            active.last_sample = sample.seq;
        }
        out.synced = self.sync_if_due()?;
        Ok(out)
    }

    /// Records that every sample up to `seq` is acked or dropped, and
    /// deletes the segments holding nothing else.
    pub fn forget(&mut self, seq: u64) -> io::Result<()> {
        self.write(&Record::Forget(seq))?;
        // Everything in the last segment acked too (every sample ever
        // appended is at or below `seq`): once it has grown, a fresh one
        // takes over and it goes with the rest.
        if self
            .segments
            .back()
            .is_some_and(|s| s.last_sample <= seq && s.bytes >= self.segment_bytes / 8)
        {
            self.roll(seq, seq)?;
        }
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.last_sample <= seq)
        {
            if let Some(s) = self.segments.front() {
                remove(&self.path(s.index))?;
            }
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Syncs what was appended.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced
            && let Some(f) = &self.active
        {
            fault()?;
            f.sync_data()?;
            self.unsynced = false;
        }
        self.synced_at = Instant::now();
        Ok(())
    }

    fn sync_if_due(&mut self) -> io::Result<bool> {
        if self.fsync_interval.is_zero() || self.synced_at.elapsed() >= self.fsync_interval {
            self.sync()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn write(&mut self, record: &Record) -> io::Result<()> {
        let (Some(f), Some(seed)) = (self.active.as_mut(), self.segments.back().map(|s| s.seed))
        else {
            return Err(io::Error::other("the spool on disk was given up"));
        };
        let bytes = &record.encode(seed);
        self.unsynced = true;
        if let Err(e) = fault() {
            // A torn write: half of it reaches the file.
            let _ = f.write_all(&bytes[..bytes.len() / 2]);
            return Err(e);
        }
        f.write_all(bytes)?;
        if let Some(active) = self.segments.back_mut() {
            active.bytes += bytes.len() as u64;
        }
        Ok(())
    }

    /// Starts a new segment; what was appended to the last one is synced
    /// first, so a sync of the new one covers everything before it.
    fn roll(&mut self, last_seq: u64, forgotten: u64) -> io::Result<()> {
        self.sync()?;
        let index = self.segments.back().map_or(0, |s| s.index + 1);
        let header = Header {
            rewrite: false,
            part: false,
            epoch: self.epoch,
            last_seq,
            forgotten,
            node: self.node.clone(),
        };
        let (file, segment) = self.create(index, &header, std::iter::empty())?;
        self.active = Some(file);
        self.segments.push_back(segment);
        Ok(())
    }

    /// Deletes every segment, when the spool on disk can no longer be kept
    /// in step with the one in memory: a log behind it could make a later
    /// run number new samples with sequence numbers the collector holds.
    /// Returns the files that could not be deleted.
    pub fn remove_all(&mut self) -> Vec<(PathBuf, io::Error)> {
        self.active = None;
        let tracked = std::mem::take(&mut self.segments)
            .into_iter()
            .map(|s| self.path(s.index));
        remove_segments(&self.dir, tracked.collect())
    }
}

/// Deletes every segment file in `dir` (those in `tracked`, and every
/// other the directory lists: one renamed into place whose creation then
/// failed, say) and every segment being created, then syncs the
/// directory; returns what could not be deleted (and why).
pub(super) fn remove_segments(dir: &Path, mut paths: Vec<PathBuf>) -> Vec<(PathBuf, io::Error)> {
    let mut failed = Vec::new();
    match fault().and_then(|()| fs::read_dir(dir)) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let ours = segment_index(name).is_some()
                    || name
                        .strip_suffix(TMP_SUFFIX)
                        .is_some_and(|n| segment_index(n).is_some());
                if ours && entry.file_type().is_ok_and(|t| t.is_file()) {
                    paths.push(entry.path());
                }
            }
        }
        Err(e) => failed.push((dir.to_path_buf(), e)),
    }
    paths.sort();
    paths.dedup();
    for p in paths {
        match remove(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => failed.push((p, e)),
        }
    }
    if let Err(e) = sync_dir(dir) {
        failed.push((dir.to_path_buf(), e));
    }
    failed
}

/// Syncs directory `dir`, so that the files created, renamed or deleted
/// there stay so.
fn sync_dir(dir: &Path) -> io::Result<()> {
    fault()?;
    File::open(dir)?.sync_all()
}

/// Deletes file `path`.
fn remove(path: &Path) -> io::Result<()> {
    fault()?;
    fs::remove_file(path)
}

/// Reads one segment file: its header and records, for tests and tools.
pub fn read_segment(
    path: &Path,
    mut f: impl FnMut(Record),
) -> io::Result<(Option<Header>, SegmentRead)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = BufReader::new(file);
    match read_header(&mut r) {
        Ok((h, header_len, crc)) => {
            let index = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(segment_index)
                .unwrap_or(0);
            let read = read_records(&mut r, record_seed(crc, index), header_len, len, &mut f);
            Ok((Some(h), read))
        }
        Err(BadSegment::Io(e)) => Err(e),
        Err(BadSegment::Version(v)) => Ok((
            None,
            SegmentRead {
                good_bytes: 0,
                bad: Some((format!("version {v}"), len)),
            },
        )),
        Err(BadSegment::Corrupt(why)) => Ok((
            None,
            SegmentRead {
                good_bytes: 0,
                bad: Some((why, len)),
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Spool;
    use capwatch_proto::v1::GpuSample;
    use proptest::prelude::*;

    const NODE: &str = "node-1";

    fn cfg(dir: &Path, max_bytes: u64) -> DiskConfig {
        DiskConfig {
            dir: dir.to_path_buf(),
            max_bytes,
            fsync_interval: Duration::ZERO,
            lock_wait: Duration::ZERO,
            stall_after: STALL_AFTER,
        }
    }

    /// A sample of `gpus` GPUs stamped `t`.
    fn sample(t: i64, gpus: u32) -> NodeSample {
        NodeSample {
            seq: 0,
            timestamp_unix_nanos: t,
            gpus: (0..gpus)
                .map(|index| GpuSample {
                    index,
                    power_milliwatts: Some(300_000 + u64::from(index)),
                    energy_millijoules: Some(t as u64 * 1000 + u64::from(index)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn open(dir: &Path, max_bytes: u64, epoch: u64) -> Spool {
        Spool::open(1_000_000, epoch, Some(&cfg(dir, max_bytes)), NODE).unwrap()
    }

    /// A spool that syncs only when told to: many appends, quickly.
    fn open_unsynced(dir: &Path, max_bytes: u64, epoch: u64) -> Spool {
        let mut c = cfg(dir, max_bytes);
        c.fsync_interval = Duration::from_secs(3600);
        Spool::open(1_000_000, epoch, Some(&c), NODE).unwrap()
    }

    /// Waits until the disk has done what the spool asked of it.
    fn settle(sp: &mut Spool) {
        assert!(sp.wait_idle(Duration::from_secs(60)), "the spool's writer");
    }

    /// (seq, timestamp) of every unacked sample that may be sent now.
    fn sendable(sp: &Spool) -> Vec<(u64, i64)> {
        sp.after(0, usize::MAX, usize::MAX)
            .iter()
            .map(|s| (s.seq, s.timestamp_unix_nanos))
            .collect()
    }

    /// (seq, timestamp) of every unacked sample, once the disk has done
    /// what it was asked.
    fn held(sp: &mut Spool) -> Vec<(u64, i64)> {
        settle(sp);
        sendable(sp)
    }

    /// The spool's depth, once the disk has done what it was asked.
    fn depth(sp: &mut Spool) -> crate::spool::Depth {
        settle(sp);
        sp.depth()
    }

    /// The one segment file in `dir`.
    fn only_segment(dir: &Path) -> PathBuf {
        let files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "spool"))
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files[0].clone()
    }

    #[test]
    fn unacked_samples_survive_a_restart_under_their_epoch_and_sequence() {
        // Invariant: a reopened spool holds exactly the samples not acked,
        // under the epoch and sequence numbers they had, and numbers the
        // next sample after the last one in that epoch, whatever epoch the
        // new run would have chosen.
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        for t in 1..=5 {
            sp.push(sample(t, 2));
        }
        sp.ack(2);
        drop(sp);
        let mut sp = open(dir.path(), 1 << 20, 99);
        assert_eq!(sp.epoch(), 7);
        assert_eq!(held(&mut sp), vec![(3, 3), (4, 4), (5, 5)]);
        assert_eq!(depth(&mut sp).restored, 3);
        sp.push(sample(6, 2));
        assert_eq!(held(&mut sp).last(), Some(&(6, 6)));
        // Everything acked: a restart still continues the numbering.
        sp.ack(6);
        drop(sp);
        let mut sp = open(dir.path(), 1 << 20, 100);
        assert!(sp.is_empty());
        assert_eq!(sp.epoch(), 7);
        sp.push(sample(7, 2));
        assert_eq!(held(&mut sp), vec![(7, 7)]);
        // A new directory is a new spool, under the epoch given.
        let other = tempfile::tempdir().unwrap();
        assert_eq!(open(other.path(), 1 << 20, 42).epoch(), 42);
    }

    #[test]
    fn a_blocked_disk_holds_up_neither_the_spool_nor_its_callers() {
        // Invariant: a disk operation that does not return (a hung or
        // congested disk) holds up no call on the spool: samples are still
        // taken, acked and counted; but nothing is sendable until it is on
        // disk, and once the disk answers all of it is, in order, and
        // survives a restart.
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        sp.push(sample(1, 1));
        sp.push(sample(2, 1));
        assert_eq!(held(&mut sp), vec![(1, 1), (2, 2)]);
        let gate = hold();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        // Opens the gate once the calls below are done, or after long
        // enough that they can only have waited on it.
        let watchdog = {
            let gate = gate.0.clone();
            std::thread::spawn(move || {
                let returned = finished.recv_timeout(Duration::from_secs(10)).is_ok();
                gate.release();
                returned
            })
        };
        sp.push(sample(3, 1));
        gate.wait_entered();
        sp.absorb();
        let before_ack = sendable(&sp);
        sp.ack(1);
        sp.push(sample(4, 1));
        sp.absorb();
        let after_ack = sendable(&sp);
        let d = sp.depth();
        let _ = done.send(());
        assert!(
            watchdog.join().unwrap(),
            "a call on the spool waited for the blocked disk"
        );
        assert_eq!(before_ack, vec![(1, 1), (2, 2)], "3 is not on disk yet");
        assert_eq!(after_ack, vec![(2, 2)], "nor 4");
        assert_eq!((d.samples, d.disk_errors), (3, 0));
        assert_eq!(held(&mut sp), vec![(2, 2), (3, 3), (4, 4)]);
        drop(sp);
        let mut sp = open(dir.path(), 1 << 20, 7);
        assert_eq!(held(&mut sp), vec![(2, 2), (3, 3), (4, 4)]);
    }

    #[test]
    fn a_disk_hung_past_the_bound_is_given_up_and_its_files_go_once_it_answers() {
        // Invariant: a disk operation that does not return within
        // stall_after gives the disk up: counted as an error and a stall,
        // the spool goes on in memory (everything in it may be sent), and
        // once the operation returns the writer deletes the spool's files.
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), 1 << 20);
        // Long enough that a loaded machine does not pass it between two
        // statements below.
        c.stall_after = Duration::from_secs(5);
        let mut sp = Spool::open(100, 7, Some(&c), NODE).unwrap();
        sp.push(sample(1, 1));
        assert_eq!(held(&mut sp), vec![(1, 1)]);
        assert_eq!(sp.stall_check_in(), None, "no operation under way");
        let gate = hold();
        sp.push(sample(2, 1));
        gate.wait_entered();
        sp.absorb();
        assert_eq!(sendable(&sp), vec![(1, 1)], "within the bound 2 waits");
        assert_eq!(sp.depth().disk_stalls, 0);
        // Whoever waits on the disk is told when to look again: when the
        // operation under way passes the bound.
        let check = sp.stall_check_in().expect("an operation under way");
        assert!(
            check <= c.stall_after + Duration::from_millis(10),
            "{check:?}"
        );
        // The gate holds the operation past the bound.
        std::thread::sleep(c.stall_after);
        sp.push(sample(3, 1));
        let d = sp.depth();
        assert_eq!((d.disk_errors, d.disk_stalls, d.disk_bytes), (1, 1, None));
        assert_eq!(sendable(&sp), vec![(1, 1), (2, 2), (3, 3)]);
        assert!(
            !spool_files(dir.path()).is_empty(),
            "the call has not returned"
        );
        gate.release();
        assert!(
            sp.wait_left_behind(),
            "the writer exits once its call returns"
        );
        assert_eq!(spool_files(dir.path()), Vec::<String>::new());
        sp.push(sample(4, 1));
        assert_eq!(sendable(&sp).last(), Some(&(4, 4)));
    }

    #[test]
    fn a_renumbered_sample_is_sent_only_once_on_disk_under_its_new_number() {
        // Invariant: what the disk reported of the numbering before a
        // renumbering never makes a sample sendable under its new number:
        // only the rewrite under the new one does (sent before it, a
        // restart would find it, and send it again, under the old one).
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        for t in 1..=4 {
            sp.push(sample(t, 1));
        }
        assert_eq!(held(&mut sp).len(), 4);
        sp.sent(2);
        let gate = hold();
        sp.renumber(50);
        gate.wait_entered();
        sp.absorb();
        assert_eq!(sendable(&sp), Vec::<(u64, i64)>::new(), "not rewritten yet");
        gate.release();
        assert_eq!(held(&mut sp), vec![(1, 3), (2, 4)]);
    }

    #[test]
    fn a_disk_that_falls_ever_further_behind_is_given_up() {
        // Invariant: the operations queued for a disk that does not keep
        // up are bounded (twice the spool's capacity and a little more):
        // beyond it the disk is given up as stalled, so the copies of the
        // samples queued for it cannot grow without a bound.
        let dir = tempfile::tempdir().unwrap();
        let mut sp = Spool::open(4, 7, Some(&cfg(dir.path(), 1 << 20)), NODE).unwrap();
        let gate = hold();
        let mut t = 0;
        while sp.depth().disk_stalls == 0 {
            t += 1;
            assert!(t <= 100, "{:?}", sp.depth());
            sp.push(sample(t, 1));
        }
        assert!(t > 2 * 4, "given up after {t} samples");
        assert_eq!(sp.depth().disk_bytes, None);
        assert_eq!(sendable(&sp).len(), 4, "the spool goes on in memory");
        gate.release();
        assert!(sp.wait_left_behind());
        assert_eq!(spool_files(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_collector_ahead_of_the_disk_gets_new_samples_numbered_after_what_it_holds() {
        // Invariant: when the collector holds sequence numbers of this
        // epoch that this spool never sent (a run whose disk fell behind, a
        // spool restored from a backup), the samples never sent are
        // renumbered after them, on disk too, never forgotten unsent.
        use crate::spool::Welcomed;
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        for t in 1..=3 {
            sp.push(sample(t, 1));
        }
        drop(sp);
        // A run the disk lost numbered 4..=6, and the collector holds them.
        let mut sp = open(dir.path(), 1 << 20, 99);
        sp.push(sample(10, 1));
        sp.push(sample(11, 1));
        assert_eq!(
            sp.welcomed(6),
            Welcomed {
                acked: 3,
                renumbered: 2
            }
        );
        assert_eq!(sp.epoch(), 7);
        assert_eq!(held(&mut sp), vec![(7, 10), (8, 11)]);
        assert_eq!(depth(&mut sp).collector_ahead, 1);
        sp.push(sample(12, 1));
        drop(sp);
        let mut sp = open(dir.path(), 1 << 20, 99);
        assert_eq!(held(&mut sp), vec![(7, 10), (8, 11), (9, 12)]);
        // A Welcome the spool is not behind changes nothing but acks.
        assert_eq!(
            sp.welcomed(7),
            Welcomed {
                acked: 1,
                renumbered: 0
            }
        );
        // Nothing held at all: the numbering still moves past the
        // collector's, and stays there after a restart.
        sp.ack(9);
        sp.welcomed(20);
        sp.push(sample(13, 1));
        assert_eq!(held(&mut sp), vec![(21, 13)]);
        sp.ack(21);
        drop(sp);
        let mut sp = open(dir.path(), 1 << 20, 99);
        sp.push(sample(14, 1));
        assert_eq!(held(&mut sp), vec![(22, 14)]);
    }

    #[test]
    fn a_renumbered_spool_reopens_under_its_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        for t in 1..=4 {
            sp.push(sample(t, 1));
        }
        sp.sent(2);
        sp.renumber(50);
        drop(sp);
        let mut sp = open(dir.path(), 1 << 20, 1);
        assert_eq!(sp.epoch(), 50);
        assert_eq!(held(&mut sp), vec![(1, 3), (2, 4)]);
    }

    #[test]
    fn acked_segments_are_reclaimed() {
        // Invariant: once acked, samples leave the disk too: the files
        // shrink to one segment whatever was written before.
        let dir = tempfile::tempdir().unwrap();
        let max = 1 << 20;
        let mut sp = open_unsynced(dir.path(), max, 7);
        let n = (max * 3 / 4) / Record::Sample(sample(1, 8)).encoded_len() as u64;
        for t in 1..=n as i64 {
            sp.push(sample(t, 8));
        }
        sp.sync();
        let d = depth(&mut sp);
        assert!(d.disk_bytes.unwrap() > max / 2, "{d:?}");
        assert_eq!(d.dropped, 0);
        sp.ack(n - 10);
        let d = depth(&mut sp);
        assert_eq!(d.samples, 10);
        assert!(d.disk_bytes.unwrap() < max / SEGMENTS * 2, "{d:?}");
        assert!(sp.disk_segments() <= Some(2));
        drop(sp);
        let mut sp = open(dir.path(), max, 1);
        assert_eq!(held(&mut sp).len(), 10);
        // Reopening rewrites them into one.
        only_segment(dir.path());
    }

    #[test]
    fn a_spool_acked_to_its_end_shrinks_to_a_fresh_segment() {
        // Invariant: a spool emptied by acks does not keep the acked
        // records around: its last segment is replaced once it has grown.
        let dir = tempfile::tempdir().unwrap();
        let max = 1 << 20;
        let mut sp = open_unsynced(dir.path(), max, 7);
        let header = (HEADER_FIXED + NODE.len() + 4) as u64;
        for t in 1..=400 {
            sp.push(sample(t, 8));
            sp.sync();
            sp.ack(t as u64);
            let d = depth(&mut sp);
            assert!(d.disk_bytes.unwrap() < max / SEGMENTS / 8 + 1024, "{d:?}");
        }
        assert!(sp.is_empty());
        drop(sp);
        let mut sp = open(dir.path(), max, 1);
        assert_eq!(depth(&mut sp).disk_bytes, Some(header));
        sp.push(sample(401, 1));
        assert_eq!(
            held(&mut sp),
            vec![(401, 401)],
            "numbered on after the acked"
        );
    }

    #[test]
    fn a_full_spool_drops_its_oldest_samples_counted_and_stays_within_bounds() {
        // Invariant: the files never take more than the limit plus one
        // record; what is dropped is the oldest, counted, and the rest is
        // a contiguous run ending with the newest.
        let dir = tempfile::tempdir().unwrap();
        let max = 1 << 20;
        let mut sp = open_unsynced(dir.path(), max, 7);
        let one = Record::Sample(sample(1, 8)).encoded_len() as u64;
        let n = 2 * max / one;
        let mut dropped = 0;
        for t in 1..=n as i64 {
            dropped += sp.push(sample(t, 8));
            let d = depth(&mut sp);
            // What the disk's bound dropped, reported once taken in.
            dropped += sp.take_unreported_drops();
            assert!(d.disk_bytes.unwrap() <= max + one, "{d:?}");
        }
        sp.sync();
        let d = depth(&mut sp);
        dropped += sp.take_unreported_drops();
        assert_eq!(d.dropped, dropped);
        assert!(dropped >= n / 2, "{d:?}");
        let seqs: Vec<u64> = held(&mut sp).iter().map(|x| x.0).collect();
        assert_eq!(seqs.len() as u64 + dropped, n);
        assert_eq!(seqs, (dropped + 1..=n).collect::<Vec<_>>());
        drop(sp);
        let mut sp = open(dir.path(), max, 1);
        assert_eq!(
            held(&mut sp).iter().map(|x| x.0).collect::<Vec<_>>(),
            seqs,
            "what is on disk is what was held"
        );
    }

    #[test]
    fn a_reopened_backlog_is_dropped_an_eighth_at_a_time() {
        // Invariant: a restart rewrites the backlog into segments of the
        // usual size, so a full spool still drops about an eighth of its
        // bytes at a time, not the whole backlog.
        let dir = tempfile::tempdir().unwrap();
        let max = 1 << 20;
        let mut sp = open_unsynced(dir.path(), max, 7);
        let one = Record::Sample(sample(1, 8)).encoded_len() as u64;
        let n = (max * 3 / 4) / one;
        for t in 1..=n as i64 {
            sp.push(sample(t, 8));
        }
        sp.sync();
        drop(sp);
        let mut sp = open_unsynced(dir.path(), max, 7);
        assert!(sp.disk_segments() >= Some(5));
        let mut t = n as i64;
        let first = loop {
            t += 1;
            let d = sp.push(sample(t, 8));
            // What the disk's bound dropped, reported once taken in.
            settle(&mut sp);
            let d = d + sp.take_unreported_drops();
            if d > 0 {
                break d;
            }
        };
        let eighth = max / SEGMENTS / one;
        assert!(
            first <= eighth + 1,
            "dropped {first} at once, an eighth is {eighth}"
        );
        drop(sp);
        let mut sp = open(dir.path(), max, 1);
        let seqs: Vec<u64> = held(&mut sp).iter().map(|x| x.0).collect();
        assert_eq!(seqs, (first + 1..=t as u64).collect::<Vec<_>>());
    }

    #[test]
    fn under_an_fsync_interval_a_sample_is_sent_only_once_synced() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), 1 << 20);
        c.fsync_interval = Duration::from_secs(3600);
        let mut sp = Spool::open(100, 7, Some(&c), NODE).unwrap();
        sp.push(sample(1, 1));
        sp.push(sample(2, 1));
        assert!(held(&mut sp).is_empty(), "not synced yet");
        sp.sync();
        assert_eq!(held(&mut sp), vec![(1, 1), (2, 2)]);
    }

    #[test]
    fn a_new_segment_makes_the_samples_before_it_sendable() {
        // Invariant: starting a segment syncs the last one, so what it
        // holds may be sent at once, not an fsync interval later.
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), 4096);
        c.fsync_interval = Duration::from_secs(3600);
        let mut sp = Spool::open(1000, 7, Some(&c), NODE).unwrap();
        let mut t = 0;
        while {
            settle(&mut sp);
            sp.disk_segments() == Some(1)
        } {
            t += 1;
            sp.push(sample(t, 1));
        }
        let seqs: Vec<u64> = held(&mut sp).iter().map(|x| x.0).collect();
        assert_eq!(seqs, (1..t as u64).collect::<Vec<_>>());
    }

    #[test]
    fn a_write_error_gives_the_disk_up_and_the_spool_goes_on_in_memory() {
        // Invariant: a disk that fails is counted and logged, its files
        // deleted, and sampling and sending go on from memory.
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let max = 1 << 20;
        let mut sp = open_unsynced(&spool_dir, max, 7);
        sp.push(sample(1, 8));
        // The directory becomes a file: the next new segment cannot be made.
        fs::remove_dir_all(&spool_dir).unwrap();
        fs::write(&spool_dir, b"not a directory").unwrap();
        let n = 2 * max / Record::Sample(sample(1, 8)).encoded_len() as u64;
        for t in 2..=n as i64 {
            sp.push(sample(t, 8));
        }
        let d = depth(&mut sp);
        assert_eq!(d.disk_errors, 1, "{d:?}");
        assert_eq!(d.disk_bytes, None);
        assert_eq!(d.samples, n, "nothing dropped: memory holds them all");
        sp.sync();
        assert_eq!(held(&mut sp).len() as u64, n, "and all may be sent");
    }

    #[test]
    fn a_spool_that_reads_but_cannot_be_written_goes_on_in_memory() {
        // Invariant: a disk that fails at start (here: the new segment
        // cannot be created) does not stop the agent: what was read is
        // kept in memory under its epoch, the failure counted, the old
        // files deleted.
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        for t in 1..=3 {
            sp.push(sample(t, 2));
        }
        drop(sp);
        let name = only_segment(dir.path());
        let index = segment_index(name.file_name().unwrap().to_str().unwrap()).unwrap();
        let blocker = dir
            .path()
            .join(format!("{}{TMP_SUFFIX}", segment_name(index + 1)));
        fs::create_dir(&blocker).unwrap();
        let mut sp = open(dir.path(), 1 << 20, 99);
        let d = depth(&mut sp);
        assert_eq!((d.disk_errors, d.disk_bytes), (1, None), "{d:?}");
        assert_eq!(sp.epoch(), 7);
        sp.push(sample(4, 2));
        assert_eq!(held(&mut sp), vec![(1, 1), (2, 2), (3, 3), (4, 4)]);
        assert!(!name.exists(), "the old segment is deleted");
    }

    /// Every file in `dir` named as a segment or one being created.
    fn spool_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(SUFFIX) || n.ends_with(TMP_SUFFIX))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn giving_the_disk_up_deletes_every_segment_file_tracked_or_not() {
        // Invariant: when the disk spool is given up, no segment file is
        // left for a later run to read as its log, not even one this run
        // does not track (renamed into place before a later step of its
        // creation failed) or one half created.
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        sp.push(sample(1, 1));
        let seg = only_segment(dir.path());
        fs::copy(&seg, dir.path().join(segment_name(0x40))).unwrap();
        fs::write(
            dir.path()
                .join(format!("{}{TMP_SUFFIX}", segment_name(0x41))),
            b"half",
        )
        .unwrap();
        inject(Some(Fault::Once(0)));
        sp.push(sample(2, 1));
        settle(&mut sp);
        inject(None);
        assert_eq!(depth(&mut sp).disk_errors, 1);
        assert_eq!(spool_files(dir.path()), Vec::<String>::new());
        assert_eq!(held(&mut sp), vec![(1, 1), (2, 2)], "memory goes on");
    }

    #[test]
    fn a_disk_that_fails_at_start_leaves_the_spool_in_memory() {
        // Invariant: a spool directory that cannot be made, locked, listed
        // or read (a read-only or failing disk) never stops the agent: the
        // spool goes on in memory, the failure counted (a segment that
        // cannot be read is a corrupt drop); only a lock held by another
        // process, another node's or another version's files are errors.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let mut sp = Spool::open(10, 3, Some(&cfg(&file.join("spool"), 1 << 20)), NODE).unwrap();
        assert_eq!(
            (
                sp.epoch(),
                depth(&mut sp).disk_errors,
                depth(&mut sp).disk_bytes
            ),
            (3, 1, None)
        );
        sp.push(sample(1, 1));
        assert_eq!(held(&mut sp), vec![(1, 1)]);
        // An I/O error at any one step of opening a spool with samples.
        let mut k = 0;
        loop {
            let dir = tempfile::tempdir().unwrap();
            let mut sp = open(dir.path(), 1 << 20, 7);
            for t in 1..=3 {
                sp.push(sample(t, 1));
            }
            drop(sp);
            let start = inject(Some(Fault::Once(k)));
            let r = Spool::open(10, 9, Some(&cfg(dir.path(), 1 << 20)), NODE);
            let done = inject(None) - start;
            let mut sp = r.unwrap_or_else(|e| panic!("an I/O error at step {k}: {e}"));
            if done <= k {
                // Opening is done before step k: no error met.
                break;
            }
            let d = depth(&mut sp);
            assert!(d.disk_errors + d.corrupt == 1, "step {k}: {d:?}");
            sp.push(sample(4, 1));
            let got = held(&mut sp);
            assert_eq!(got.last().map(|x| x.1), Some(4), "step {k}: {got:?}");
            k += 1;
        }
        assert!(k > 5, "opening took {k} I/O operations");
    }

    #[test]
    fn a_held_lock_is_waited_for() {
        // Invariant: an agent started while the one it replaces still
        // runs waits for its lock (up to lock_wait) rather than failing.
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path(), 1 << 20, 7);
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let mut c = cfg(dir.path(), 1 << 20);
        c.lock_wait = Duration::from_secs(30);
        let sp = Spool::open(10, 1, Some(&c), NODE).unwrap();
        assert_eq!(sp.epoch(), 7);
        release.join().unwrap();
    }

    #[test]
    fn one_directory_serves_one_agent_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path(), 1 << 20, 7);
        let e = Spool::open(10, 1, Some(&cfg(dir.path(), 1 << 20)), NODE).unwrap_err();
        assert!(matches!(e, SpoolError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("in use by another agent"), "{e}");
        drop(first);
        open(dir.path(), 1 << 20, 7);
    }

    #[test]
    fn a_segment_name_at_the_top_of_the_index_range_is_none_of_ours() {
        // Invariant: a file named with an index this agent never reaches
        // cannot make the next segment's index overflow or be renamed onto
        // it: it is left alone and the log goes on.
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        for t in 1..=3 {
            sp.push(sample(t, 1));
        }
        drop(sp);
        let top = dir.path().join(segment_name(u64::MAX));
        fs::write(&top, b"stray").unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        assert_eq!(depth(&mut sp).corrupt, 0);
        sp.push(sample(4, 1));
        drop(sp);
        let mut sp = open(dir.path(), 1 << 20, 7);
        assert_eq!(held(&mut sp), vec![(1, 1), (2, 2), (3, 3), (4, 4)]);
        assert_eq!(fs::read(&top).unwrap(), b"stray");
    }

    #[test]
    fn a_record_is_valid_only_in_its_own_segment() {
        // Invariant: a whole, valid record of another segment found in a
        // segment (a stale block of a file since deleted, a file restored
        // over another) is caught as corrupt: an old "forget" of the epoch
        // before a renumbering cannot drop the renumbered unacked samples.
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        for t in 1..=6 {
            sp.push(sample(t, 1));
        }
        sp.ack(3);
        let seg = only_segment(dir.path());
        let bytes = fs::read(&seg).unwrap();
        let forget = bytes[bytes.len() - Record::Forget(3).encoded_len()..].to_vec();
        sp.renumber(8);
        assert_eq!(held(&mut sp), vec![(1, 4), (2, 5), (3, 6)]);
        drop(sp);
        let seg = only_segment(dir.path());
        let mut bytes = fs::read(&seg).unwrap();
        bytes.extend_from_slice(&forget);
        fs::write(&seg, &bytes).unwrap();
        let mut sp = open(dir.path(), 1 << 20, 7);
        assert_eq!(held(&mut sp), vec![(1, 4), (2, 5), (3, 6)]);
        assert_eq!(depth(&mut sp).corrupt, 1);
    }

    #[test]
    fn hostile_files_give_a_clear_error_or_a_counted_drop() {
        let write = |name: &str, bytes: &[u8]| {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(name), bytes).unwrap();
            dir
        };
        let header = |node: &str| {
            Header {
                rewrite: false,
                part: false,
                epoch: 5,
                last_seq: 0,
                forgotten: 0,
                node: node.into(),
            }
            .encode()
        };
        // Garbage, and a header cut short: dropped, counted.
        for bytes in [&b"\x00garbage"[..], &header(NODE)[..20]] {
            let dir = write("0000000000000000.spool", bytes);
            let mut sp = open(dir.path(), 1 << 20, 9);
            assert_eq!((sp.epoch(), depth(&mut sp).corrupt), (9, 1));
            assert!(sp.is_empty());
        }
        // A huge length field: the segment ends there; no allocation of it.
        let mut huge = header(NODE);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 4]);
        let dir = write("0000000000000000.spool", &huge);
        let mut sp = open(dir.path(), 1 << 20, 9);
        assert_eq!((sp.epoch(), depth(&mut sp).corrupt), (5, 1));
        // Another node's, and another version's: refused, naming the file.
        let dir = write("0000000000000001.spool", &header("node-2"));
        let e = Spool::open(10, 1, Some(&cfg(dir.path(), 1 << 20)), NODE).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("0000000000000001.spool") && text.contains("node-2"),
            "{text}"
        );
        let mut v2 = header(NODE);
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let dir = write("0000000000000002.spool", &v2);
        let e = Spool::open(10, 1, Some(&cfg(dir.path(), 1 << 20)), NODE).unwrap_err();
        assert!(matches!(e, SpoolError::Version { found: 2, .. }), "{e}");
        // Other files in the directory are left alone, and so is anything
        // named as a segment that is not a plain file.
        let dir = write("notes.txt", b"hello");
        let not_a_file = dir.path().join("0000000000000003.spool");
        fs::create_dir(&not_a_file).unwrap();
        let mut sp = open(dir.path(), 1 << 20, 3);
        assert_eq!((sp.epoch(), depth(&mut sp).corrupt), (3, 0));
        assert!(dir.path().join("notes.txt").exists() && not_a_file.is_dir());
    }

    /// A spool of `n` samples written and dropped (a crash): its one
    /// segment file, the header's length and each record's end.
    fn written(n: i64) -> (tempfile::TempDir, PathBuf, u64, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open_unsynced(dir.path(), 1 << 20, 7);
        for t in 1..=n {
            sp.push(sample(t, 3));
        }
        drop(sp);
        let path = only_segment(dir.path());
        let header = (HEADER_FIXED + NODE.len() + 4) as u64;
        let mut end = header;
        let ends: Vec<u64> = (1..=n)
            .map(|t| {
                let mut s = sample(t, 3);
                s.seq = t as u64;
                end += Record::Sample(s).encoded_len() as u64;
                end
            })
            .collect();
        assert_eq!(fs::metadata(&path).unwrap().len(), end);
        (dir, path, header, ends)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u32),
        /// Ack up to this fraction of the last sequence number.
        Ack(f64),
        Sent(f64),
        Settle(f64),
        Renumber,
        /// The agent killed and started again.
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u32..4).prop_map(Op::Push),
            2 => (0.0f64..=1.0).prop_map(Op::Ack),
            2 => (0.0f64..=1.0).prop_map(Op::Sent),
            1 => (0.0f64..=1.0).prop_map(Op::Settle),
            1 => Just(Op::Renumber),
            2 => Just(Op::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Invariant: a spool on disk, killed and restarted at any point,
        /// holds what the same spool in memory would have held had it run
        /// on: the same samples under the same epoch and sequence numbers,
        /// and it numbers the next sample as that one would (a restart
        /// counts every sample numbered so far as possibly sent).
        #[test]
        fn a_restarted_disk_spool_is_the_memory_spool_that_ran_on(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let c = cfg(dir.path(), 1 << 20);
            let open = || Spool::open(20, 7, Some(&c), NODE).unwrap();
            let mut disk = open();
            let mut memory = Spool::new(20, 7);
            let mut t = 0i64;
            let mut epoch = 7u64;
            for op in ops {
                let at = |f: f64, sp: &Spool| (sp.last_seq as f64 * f) as u64;
                match op {
                    Op::Push(gpus) => {
                        t += 1;
                        disk.push(sample(t, gpus));
                        memory.push(sample(t, gpus));
                    }
                    Op::Ack(f) => {
                        let seq = at(f, &memory);
                        prop_assert_eq!(disk.ack(seq), memory.ack(seq));
                    }
                    Op::Sent(f) => {
                        let seq = at(f, &memory);
                        disk.sent(seq);
                        memory.sent(seq);
                    }
                    Op::Settle(f) => {
                        let seq = at(f, &memory);
                        disk.settle(seq);
                        memory.settle(seq);
                    }
                    Op::Renumber => {
                        epoch += 1;
                        prop_assert_eq!(disk.renumber(epoch), memory.renumber(epoch));
                    }
                    Op::Restart => {
                        drop(disk);
                        disk = open();
                        memory.sent(memory.last_seq);
                    }
                }
                prop_assert_eq!(disk.epoch(), memory.epoch());
                prop_assert_eq!(held(&mut disk), held(&mut memory));
                prop_assert_eq!(depth(&mut disk).disk_errors, 0);
            }
            drop(disk);
            let mut disk = open();
            disk.push(sample(0, 1));
            memory.push(sample(0, 1));
            prop_assert_eq!(held(&mut disk), held(&mut memory));
        }

        /// Invariant: a small spool (segments roll and the oldest are
        /// dropped all the time) whose disk fails for good at any I/O
        /// operation, or whose process is killed there (the files are left
        /// as they were), reopens without reusing an (epoch, seq) it may
        /// have sent for another sample, with every sample it may have sent
        /// under that epoch and not acked or dropped but those the
        /// interrupted operation was taking away (the oldest), and, when
        /// nothing failed, exactly as it was.
        #[test]
        fn a_spool_interrupted_at_any_io_operation_reopens_consistent(
            ops in proptest::collection::vec(op(), 1..80),
            fail_at in proptest::option::of(0u64..600),
        ) {
            let max = 4096;
            let dir = tempfile::tempdir().unwrap();
            let c = cfg(dir.path(), max);
            let open = || Spool::open(1000, 7, Some(&c), NODE).unwrap();
            inject(None);
            let mut sp = open();
            inject(fail_at.map(Fault::From));
            let mut released: std::collections::BTreeMap<(u64, u64), i64> = Default::default();
            let mut last = (sp.epoch(), held(&mut sp));
            let mut crashed = false;
            // What the operation under way may take away: samples up to it
            // (the oldest, with a push that drops for room).
            let mut may_forget = 0;
            let mut t = 0i64;
            let mut epoch = 7u64;
            for op in ops {
                let at = |f: f64, sp: &Spool| (sp.last_seq as f64 * f) as u64;
                may_forget = 0;
                match op {
                    Op::Push(gpus) => {
                        t += 1;
                        may_forget = u64::MAX;
                        sp.push(sample(t, gpus));
                    }
                    Op::Ack(f) => {
                        let seq = at(f, &sp);
                        may_forget = seq;
                        sp.ack(seq);
                    }
                    Op::Sent(f) => {
                        let seq = at(f, &sp);
                        sp.sent(seq);
                    }
                    Op::Settle(f) => {
                        let seq = at(f, &sp);
                        sp.settle(seq);
                    }
                    Op::Renumber => {
                        epoch += 1;
                        sp.renumber(epoch);
                    }
                    Op::Restart => {
                        drop(sp);
                        sp = open();
                    }
                }
                if depth(&mut sp).disk_errors > 0 {
                    // The process dies in this operation: nothing it made
                    // sendable went out.
                    crashed = true;
                    break;
                }
                for (seq, t) in held(&mut sp) {
                    released.insert((sp.epoch(), seq), t);
                }
                let d = depth(&mut sp);
                prop_assert!(d.disk_bytes.unwrap() <= max + max / 4, "{:?}", d);
                last = (sp.epoch(), held(&mut sp));
            }
            inject(None);
            drop(sp);
            let mut sp = open();
            let got = held(&mut sp);
            for (seq, t) in &got {
                if let Some(was) = released.get(&(sp.epoch(), *seq)) {
                    prop_assert_eq!(was, t, "seq {} reused", seq);
                }
            }
            if sp.epoch() == last.0 {
                let kept: Vec<&(u64, i64)> = last.1.iter().filter(|x| got.contains(x)).collect();
                let lost = last.1.len() - kept.len();
                prop_assert!(
                    last.1[lost..].iter().collect::<Vec<_>>() == kept
                        && last.1[..lost].iter().all(|x| x.0 <= may_forget),
                    "only the oldest, up to {}, may go: had {:?}, got {:?}", may_forget, last.1, got
                );
                if !crashed {
                    prop_assert_eq!(&got, &last.1);
                }
            } else {
                prop_assert!(crashed, "epoch {} became {}", last.0, sp.epoch());
            }
            let epoch = sp.epoch();
            sp.push(sample(0, 1));
            let next = held(&mut sp).last().unwrap().0;
            let top = released.range((epoch, 0)..=(epoch, u64::MAX)).next_back();
            prop_assert!(top.is_none_or(|((_, s), _)| *s < next), "next {} after {:?}", next, top);
        }

        /// Invariant: a file cut anywhere after its header (a torn write)
        /// reopens with the samples whose records are whole, in order, and
        /// counts a cut record as one corrupt drop; never a panic.
        #[test]
        fn a_torn_tail_is_dropped_and_counted(n in 1i64..20, cut in 0.0f64..=1.0) {
            let (dir, path, header, ends) = written(n);
            let len = *ends.last().unwrap();
            let at = header + ((len - header) as f64 * cut) as u64;
            fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(at).unwrap();
            let whole = ends.iter().filter(|e| **e <= at).count() as u64;
            let mut sp = open(dir.path(), 1 << 20, 1);
            let seqs: Vec<u64> = held(&mut sp).iter().map(|x| x.0).collect();
            prop_assert_eq!(seqs, (1..=whole).collect::<Vec<_>>());
            let torn = at > header && !ends.contains(&at);
            prop_assert_eq!(depth(&mut sp).corrupt, u64::from(torn));
            prop_assert_eq!(sp.epoch(), 7);
        }

        /// Invariant: a damaged bit anywhere in the records is caught: the
        /// samples restored are those before the damaged record,
        /// unchanged, and the damage is counted once; never a panic.
        #[test]
        fn a_corrupt_record_is_caught_by_its_checksum(n in 1i64..20, at in 0.0f64..1.0, bit in 0u8..8) {
            let (dir, path, header, ends) = written(n);
            let mut bytes = fs::read(&path).unwrap();
            let len = *ends.last().unwrap();
            let i = header + ((len - header) as f64 * at) as u64;
            bytes[i as usize] ^= 1 << bit;
            fs::write(&path, &bytes).unwrap();
            let mut sp = open(dir.path(), 1 << 20, 1);
            let before = ends.iter().filter(|e| **e <= i).count() as u64;
            let got = held(&mut sp);
            let want: Vec<(u64, i64)> = (1..=before).map(|k| (k, k as i64)).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(depth(&mut sp).corrupt, 1);
        }

        /// Invariant: whatever bytes a segment file holds, opening the
        /// spool neither panics nor fails: it is read as far as it holds.
        #[test]
        fn any_bytes_open_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), keep_header in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            let mut content = if keep_header {
                Header { rewrite: false, part: false, epoch: 3, last_seq: 0, forgotten: 0, node: NODE.into() }.encode()
            } else {
                Vec::new()
            };
            content.extend_from_slice(&bytes);
            fs::write(dir.path().join("0000000000000000.spool"), &content).unwrap();
            let r = Spool::open(10, 1, Some(&cfg(dir.path(), 1 << 20)), NODE);
            let clear = matches!(r, Ok(_) | Err(SpoolError::Version { .. } | SpoolError::OtherNode { .. }));
            prop_assert!(clear, "{:?}", r.err());
        }
    }
}
