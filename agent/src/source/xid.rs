//! XID critical errors from NVML's event API, on a thread of their own.
//!
//! One NVML event set (`nvmlEventSetCreate`) with every GPU that supports
//! XID events registered (`nvmlDeviceRegisterEvents`, XID critical error
//! type) is waited on (`nvmlEventSetWait_v2`, a short timeout) by the
//! thread `capwatch-xid`, never by the sampler or the runtime. Each event
//! adds one to its GPU's count for its XID code and becomes its last XID;
//! the GPU worker copies the counts into each reading ([`XidWatch::of`]),
//! which takes a lock and no NVML call.
//!
//! *Boundary:* a GPU or driver without XID events (`NotSupported`, or a
//! driver lacking the functions) has no XID readings, logged once, not an
//! error loop. A code outside [`XID_CODES`], or a new code beyond
//! [`MAX_XID_CODES`] on one GPU, is logged and counted as a failed read
//! (`xid_code`), never sent: the collector would drop that GPU's health
//! readings from every later sample.
//!
//! *Invariant:* the thread stops when the source is dropped (the agent
//! stops): dropping waits for it no longer than [`STOP_WITHIN`] (one wait
//! timeout and a little more), so a hung wait (or a slow write of the
//! counts file) delays shutdown by that at most and is left behind.
//!
//! *Invariant:* with a counts file (`nvml.xid_counts_file`), a GPU's
//! counts never go back across agent restarts, as the driver's own
//! counters (ECC, PCIe replays) do not: the file is read before any GPU
//! is registered and rewritten whole (a temporary file synced and renamed
//! over it) after every event counted, before the new count reaches any
//! reading, so a kill leaves the counts before or after that event and no
//! sample ever carried one the file lacks. They are kept by GPU UUID, those of GPUs missing
//! from this start's inventory too.
//!
//! *Boundary:* the counts file. It is read once, at most
//! [`MAX_COUNTS_FILE_BYTES`]; a file that does not parse (its version
//! line, a field, a code out of [`XID_CODES`], a count of 0, a code twice,
//! more than [`MAX_XID_CODES`] codes on a GPU, more than
//! [`MAX_COUNTS_FILE_GPUS`] GPUs, a last XID whose code is not counted) is
//! not used: logged with what is wrong, counted (`xid_counts_file`), and
//! the counts start afresh; so is a file that cannot be read or written.
//! XID readings are diagnostics: a bad file never stops the agent.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use capwatch_proto::limits::{MAX_XID_CODES, XID_CODES};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{EventSet, Nvml};
use tracing::{info, warn};

use super::ReadErrors;

/// How long one wait lasts: the longest the thread takes to notice the
/// agent stopping.
pub const WAIT: Duration = Duration::from_millis(250);

/// The longest dropping an [`XidWatch`] waits for its thread: a wait's
/// timeout and a little more.
pub const STOP_WITHIN: Duration = Duration::from_millis(400);

/// NVML's code for an XID it cannot name.
const UNKNOWN_XID: u32 = 999;

/// The largest counts file read: far above 64 codes on each of
/// [`MAX_COUNTS_FILE_GPUS`] GPUs.
pub const MAX_COUNTS_FILE_BYTES: u64 = 4 << 20;

/// The most GPUs a counts file holds.
pub const MAX_COUNTS_FILE_GPUS: usize = 1024;

/// The counts file's first line: its format and version.
const COUNTS_FILE_HEADER: &str = "capwatch-xid-counts 1";

/// One GPU's XID events since the agent started, or since its counts
/// file was first written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XidState {
    /// Events by XID code.
    pub counts: BTreeMap<u32, u64>,
    /// The most recent XID and when it arrived (Unix nanoseconds).
    pub last: Option<(u32, i64)>,
}

/// Per inventory index: `None` while the GPU has no XID events (not
/// supported, or the thread not yet registered it).
type Shared = Arc<Mutex<Vec<Option<XidState>>>>;

/// The XID thread of one NVML source; dropping it stops the thread.
pub struct XidWatch {
    state: Shared,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
}

impl XidWatch {
    /// Starts `capwatch-xid` for the GPUs `gpus` (by inventory index,
    /// each with its NVML index and UUID), keeping the counts in
    /// `counts_file` if one is given. Returns `None` when the thread
    /// cannot start (logged; XID readings are then absent).
    pub fn start(
        nvml: Arc<Nvml>,
        gpus: Vec<(u32, String)>,
        errors: Arc<ReadErrors>,
        counts_file: Option<PathBuf>,
    ) -> Option<Self> {
        let state: Shared = Arc::new(Mutex::new(vec![None; gpus.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = mpsc::channel();
        let (s, st) = (state.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("capwatch-xid".into())
            .spawn(move || {
                let file = counts_file.map(|path| CountsFile::open(path, &errors));
                watch(&nvml, &gpus, &s, &st, &errors, file);
                // NVML shuts down here if this thread is the last to hold it.
                drop(nvml);
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => Some(Self { state, stop, done }),
            Err(e) => {
                warn!(error = %e, "XID event thread cannot start; XID readings absent");
                None
            }
        }
    }

    /// GPU `index`'s XID readings; `None` when it has no XID events.
    pub fn of(&self, index: usize) -> Option<XidState> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.get(index).cloned().flatten()
    }
}

impl Drop for XidWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A closed channel (the thread ended early) returns at once.
        if let Err(mpsc::RecvTimeoutError::Timeout) = self.done.recv_timeout(STOP_WITHIN) {
            warn!("the XID event thread is still in an NVML wait at exit; it is left behind");
        }
    }
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, Vec<Option<XidState>>> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers the GPUs that support XID events and waits on them until
/// `stop`.
fn watch(
    nvml: &Nvml,
    gpus: &[(u32, String)],
    state: &Shared,
    stop: &AtomicBool,
    errors: &ReadErrors,
    mut file: Option<CountsFile>,
) {
    let Some((set, registered)) = register(nvml, gpus) else {
        return;
    };
    {
        let mut s = lock(state);
        for &i in &registered {
            let kept = file.as_ref().and_then(|f| f.counts.get(&gpus[i].1));
            s[i] = Some(kept.cloned().unwrap_or_default());
        }
    }
    info!(gpus = registered.len(), "waiting for XID events");
    let timeout_ms = WAIT.as_millis() as u32;
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let event = match set.wait(timeout_ms) {
            Ok(event) => event,
            Err(NvmlError::Timeout) => continue,
            Err(e) => {
                // A lost GPU or a failing driver: counted, logged once
                // per run of failures, and waited out (no busy loop).
                errors.add("xid_events");
                if !std::mem::replace(&mut failing, true) {
                    warn!(error = %e, "waiting for XID events failed; retrying");
                }
                std::thread::sleep(WAIT);
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            info!("XID events arrive again");
        }
        let Some(xid) = event.event_data else {
            continue;
        };
        let code = match xid {
            XidError::Value(v) => u32::try_from(v).unwrap_or(u32::MAX),
            XidError::Unknown => UNKNOWN_XID,
        };
        let at = crate::unix_nanos(SystemTime::now());
        let index = event
            .device
            .uuid()
            .ok()
            .and_then(|uuid| gpus.iter().position(|(_, u)| *u == uuid));
        let Some(index) = index else {
            errors.add("xid_events");
            warn!(
                xid = code,
                "XID event for a GPU not in the inventory; not counted"
            );
            continue;
        };
        if !XID_CODES.contains(&code) {
            errors.add("xid_code");
            warn!(
                gpu = index,
                xid = code,
                "XID code out of range; not counted"
            );
            continue;
        }
        // This thread alone writes the counts: the next state is made on
        // a copy, kept in the file, and only then published, so no
        // sample carries a count a kill could take back.
        let Some(mut counted) = lock(state)[index].clone() else {
            continue;
        };
        if !counted.counts.contains_key(&code) && counted.counts.len() >= MAX_XID_CODES {
            errors.add("xid_code");
            warn!(
                gpu = index,
                xid = code,
                "more than {MAX_XID_CODES} distinct XID codes on one GPU; not counted"
            );
            continue;
        }
        let n = counted.counts.entry(code).or_default();
        *n = n.saturating_add(1);
        counted.last = Some((code, at));
        warn!(gpu = index, uuid = %gpus[index].1, xid = code, "XID error");
        if let Some(f) = file.as_mut() {
            f.counts.insert(gpus[index].1.clone(), counted.clone());
            f.save(errors);
        }
        lock(state)[index] = Some(counted);
    }
}

/// The XID counts kept across agent restarts, by GPU UUID.
struct CountsFile {
    path: PathBuf,
    counts: BTreeMap<String, XidState>,
    /// A write failed last time (logged once per run of failures).
    failing: bool,
}

impl CountsFile {
    /// Reads the counts kept at `path`; none when there is no file yet, or
    /// when it cannot be read or used (logged and counted).
    fn open(path: PathBuf, errors: &ReadErrors) -> Self {
        let counts = match read_counts(&path) {
            Ok(Some(counts)) => {
                info!(path = %path.display(), gpus = counts.len(), "XID counts read");
                counts
            }
            Ok(None) => {
                info!(path = %path.display(), "no XID counts file yet; counting from 0");
                BTreeMap::new()
            }
            Err(e) => {
                errors.add("xid_counts_file");
                warn!(path = %path.display(), error = %e, "XID counts file not used; counting from 0");
                BTreeMap::new()
            }
        };
        Self {
            path,
            counts,
            failing: false,
        }
    }

    /// Writes every GPU's counts: a temporary file beside it, synced, then
    /// renamed over it, and the directory synced (the rename survives a
    /// power loss).
    fn save(&mut self, errors: &ReadErrors) {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(format_counts(&self.counts).as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .and_then(|()| match self.path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
                _ => Ok(()),
            });
        match written {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    info!(path = %self.path.display(), "XID counts file written again");
                }
            }
            Err(e) => {
                errors.add("xid_counts_file");
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(path = %self.path.display(), error = %e, "XID counts file cannot be written; counts go on in memory");
                }
            }
        }
    }
}

/// The counts in the file at `path`; `None` when there is none.
fn read_counts(path: &Path) -> Result<Option<BTreeMap<String, XidState>>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut text = String::new();
    file.take(MAX_COUNTS_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_COUNTS_FILE_BYTES {
        return Err(format!("larger than {MAX_COUNTS_FILE_BYTES} bytes"));
    }
    parse_counts(&text).map(Some)
}

/// The counts file's text: its version line, then per GPU (by UUID) a
/// line `UUID count CODE N` for each code and `UUID last CODE UNIX_NANOS`.
pub fn format_counts(counts: &BTreeMap<String, XidState>) -> String {
    let mut text = format!("{COUNTS_FILE_HEADER}\n");
    for (uuid, state) in counts {
        for (code, n) in &state.counts {
            text.push_str(&format!("{uuid} count {code} {n}\n"));
        }
        if let Some((code, at)) = state.last {
            text.push_str(&format!("{uuid} last {code} {at}\n"));
        }
    }
    text
}

/// Parses [`format_counts`]' text, checking what the collector checks;
/// the error names the line and what is wrong.
pub fn parse_counts(text: &str) -> Result<BTreeMap<String, XidState>, String> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, COUNTS_FILE_HEADER)) => {}
        Some((_, other)) => {
            return Err(format!(
                "line 1 is {other:?}, not {COUNTS_FILE_HEADER:?} (another format or version)"
            ));
        }
        None => return Err("empty".into()),
    }
    let mut counts: BTreeMap<String, XidState> = BTreeMap::new();
    for (i, line) in lines {
        let bad = |what: &str| Err(format!("line {}: {what}: {line:?}", i + 1));
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let [uuid, kind, code, value] = fields[..] else {
            return bad("not four fields");
        };
        if uuid.len() > 128 || !uuid.chars().all(|c| c.is_ascii_graphic()) {
            return bad("not a GPU UUID");
        }
        let Some(code) = code.parse().ok().filter(|c| XID_CODES.contains(c)) else {
            return bad("an XID code outside 1-999");
        };
        if !counts.contains_key(uuid) && counts.len() >= MAX_COUNTS_FILE_GPUS {
            return bad(&format!("more than {MAX_COUNTS_FILE_GPUS} GPUs"));
        }
        let state = counts.entry(uuid.to_string()).or_default();
        match kind {
            "count" => {
                let Some(n) = value.parse::<u64>().ok().filter(|&n| n > 0) else {
                    return bad("a count that is not a number above 0");
                };
                if state.counts.contains_key(&code) {
                    return bad("a code counted twice");
                }
                if state.counts.len() >= MAX_XID_CODES {
                    return bad(&format!("more than {MAX_XID_CODES} codes on one GPU"));
                }
                state.counts.insert(code, n);
            }
            "last" => {
                let Some(at) = value.parse::<i64>().ok().filter(|&at| at > 0) else {
                    return bad("a time that is not Unix nanoseconds after 1970");
                };
                if state.last.replace((code, at)).is_some() {
                    return bad("a second last XID");
                }
            }
            _ => return bad("neither count nor last"),
        }
    }
    if let Some((uuid, _)) = counts
        .iter()
        .find(|(_, s)| s.last.is_some_and(|(c, _)| !s.counts.contains_key(&c)))
    {
        return Err(format!("{uuid}: the last XID's code is not counted"));
    }
    Ok(counts)
}

/// One event set with every GPU that supports XID events; `None` when
/// none does (logged once).
fn register<'n>(nvml: &'n Nvml, gpus: &[(u32, String)]) -> Option<(EventSet<'n>, Vec<usize>)> {
    let create = || match nvml.create_event_set() {
        Ok(set) => Some(set),
        Err(e) => {
            info!(error = %e, "NVML event sets not available; XID readings absent");
            None
        }
    };
    let mut set = create()?;
    let mut registered = Vec::new();
    for (i, (nvml_index, _)) in gpus.iter().enumerate() {
        let supported = nvml
            .device_by_index(*nvml_index)
            .and_then(|d| Ok((d.supported_event_types()?, d)));
        let device = match supported {
            Ok((types, d)) if types.contains(EventTypes::CRITICAL_XID_ERROR) => d,
            Ok(_) => {
                info!(
                    gpu = i,
                    "XID events not supported by this GPU; reported absent"
                );
                continue;
            }
            Err(e) => {
                info!(gpu = i, error = %e, "XID events not available for this GPU; reported absent");
                continue;
            }
        };
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(set) => {
                registered.push(i);
                set
            }
            Err(e) => {
                info!(gpu = i, error = %e.error, "XID events cannot be registered for this GPU; reported absent");
                // NVML freed the set: a new one, with the GPUs before.
                let mut fresh = create()?;
                for &j in &registered {
                    let again = nvml.device_by_index(gpus[j].0).and_then(|d| {
                        d.register_events(EventTypes::CRITICAL_XID_ERROR, fresh)
                            .map_err(|e| e.error)
                    });
                    fresh = match again {
                        Ok(set) => set,
                        Err(e) => {
                            warn!(gpu = j, error = %e, "XID events cannot be registered again after another GPU's failed; XID readings absent for every GPU");
                            return None;
                        }
                    };
                }
                fresh
            }
        };
    }
    if registered.is_empty() {
        info!("no GPU delivers XID events; XID readings absent");
        return None;
    }
    Some((set, registered))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invariant: the counts file reads back what was written, and a file
    /// the collector would not take (or that is not this format) is
    /// refused naming its line and what is wrong.
    #[test]
    fn the_counts_file_reads_back_and_refuses_what_does_not_hold_together() {
        let state = |counts: &[(u32, u64)], last| XidState {
            counts: counts.iter().copied().collect(),
            last,
        };
        let counts = BTreeMap::from([
            (
                "GPU-a".to_string(),
                state(
                    &[(48, 1), (79, u64::MAX)],
                    Some((79, 1_700_000_000_000_000_000)),
                ),
            ),
            ("MIG-b".to_string(), state(&[(999, 3)], None)),
        ]);
        let text = format_counts(&counts);
        assert_eq!(
            text,
            "capwatch-xid-counts 1\n\
             GPU-a count 48 1\n\
             GPU-a count 79 18446744073709551615\n\
             GPU-a last 79 1700000000000000000\n\
             MIG-b count 999 3\n"
        );
        assert_eq!(parse_counts(&text), Ok(counts));
        assert_eq!(parse_counts("capwatch-xid-counts 1\n"), Ok(BTreeMap::new()));

        let h = "capwatch-xid-counts 1\n";
        let many_codes: String = (1..=65).map(|c| format!("GPU-a count {c} 1\n")).collect();
        let many_gpus: String = (0..=MAX_COUNTS_FILE_GPUS)
            .map(|g| format!("GPU-{g} count 79 1\n"))
            .collect();
        for (text, want) in [
            (String::new(), "empty"),
            (
                "capwatch-xid-counts 2\n".into(),
                "another format or version",
            ),
            (format!("{h}GPU-a count 79\n"), "line 2: not four fields"),
            (
                format!("{h}GPU-a count 0 1\n"),
                "line 2: an XID code outside 1-999",
            ),
            (
                format!("{h}GPU-a count 1000 1\n"),
                "an XID code outside 1-999",
            ),
            (
                format!("{h}GPU-a count 79 0\n"),
                "a count that is not a number above 0",
            ),
            (
                format!("{h}GPU-a count 79 -1\n"),
                "a count that is not a number above 0",
            ),
            (
                format!("{h}GPU-a count 79 1\nGPU-a count 79 2\n"),
                "line 3: a code counted twice",
            ),
            (
                format!("{h}{many_codes}"),
                "line 66: more than 64 codes on one GPU",
            ),
            (format!("{h}{many_gpus}"), "more than 1024 GPUs"),
            (
                format!("{h}GPU-a last 79 0\n"),
                "a time that is not Unix nanoseconds after 1970",
            ),
            (
                format!("{h}GPU-a count 79 1\nGPU-a last 79 5\nGPU-a last 79 6\n"),
                "a second last XID",
            ),
            (
                format!("{h}GPU-a count 48 1\nGPU-a last 79 5\n"),
                "GPU-a: the last XID's code is not counted",
            ),
            (format!("{h}GPU-a total 79 1\n"), "neither count nor last"),
            (format!("{h}GPU-\u{7f}a count 79 1\n"), "not a GPU UUID"),
        ] {
            let err = parse_counts(&text).expect_err(want);
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
    }

    /// Invariant: a counts file is written whole over the old one and read
    /// back; a missing file is no error, an unreadable or oversized one
    /// is.
    #[test]
    fn the_counts_file_is_replaced_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xid-counts");
        assert_eq!(read_counts(&path), Ok(None));
        let errors = ReadErrors::default();
        let mut file = CountsFile::open(path.clone(), &errors);
        file.counts.insert(
            "GPU-a".into(),
            XidState {
                counts: BTreeMap::from([(79, 2)]),
                last: Some((79, 5)),
            },
        );
        file.save(&errors);
        assert_eq!(read_counts(&path), Ok(Some(file.counts.clone())));
        assert!(!dir.path().join("xid-counts.tmp").exists());
        assert_eq!(errors.by_field(), []);
        assert_eq!(CountsFile::open(path.clone(), &errors).counts, file.counts);

        std::fs::write(&path, "x".repeat(MAX_COUNTS_FILE_BYTES as usize + 1)).unwrap();
        assert!(read_counts(&path).unwrap_err().contains("larger than"));
        assert!(CountsFile::open(path.clone(), &errors).counts.is_empty());
        assert_eq!(errors.by_field(), [("xid_counts_file", 1)]);

        // A directory where the file should be: not written, counted once
        // a write, the counts kept in memory.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("xid-counts.tmp")).unwrap();
        let mut file = CountsFile::open(blocked.join("xid-counts"), &errors);
        file.save(&errors);
        file.save(&errors);
        assert_eq!(errors.by_field(), [("xid_counts_file", 3)]);
    }
}
