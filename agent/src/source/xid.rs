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
//! stops): dropping waits for it no longer than one wait timeout and a
//! little more, so a hung wait delays shutdown by that at most and is
//! left behind.

use std::collections::BTreeMap;
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

/// One GPU's XID events since the agent started.
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
    /// Starts `capwatch-xid` for the GPUs `uuids` (by inventory index,
    /// each with its NVML index). Returns `None` when the thread cannot
    /// start (logged; XID readings are then absent).
    pub fn start(
        nvml: Arc<Nvml>,
        gpus: Vec<(u32, String)>,
        errors: Arc<ReadErrors>,
    ) -> Option<Self> {
        let state: Shared = Arc::new(Mutex::new(vec![None; gpus.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = mpsc::channel();
        let (s, st) = (state.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("capwatch-xid".into())
            .spawn(move || {
                watch(&nvml, &gpus, &s, &st, &errors);
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
) {
    let Some((set, registered)) = register(nvml, gpus) else {
        return;
    };
    {
        let mut s = lock(state);
        for &i in &registered {
            s[i] = Some(XidState::default());
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
        let mut s = lock(state);
        let Some(gpu) = s[index].as_mut() else {
            continue;
        };
        if !gpu.counts.contains_key(&code) && gpu.counts.len() >= MAX_XID_CODES {
            errors.add("xid_code");
            warn!(
                gpu = index,
                xid = code,
                "more than {MAX_XID_CODES} distinct XID codes on one GPU; not counted"
            );
            continue;
        }
        *gpu.counts.entry(code).or_default() += 1;
        gpu.last = Some((code, at));
        warn!(gpu = index, uuid = %gpus[index].1, xid = code, "XID error");
    }
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
                    let device = nvml.device_by_index(gpus[j].0).ok()?;
                    fresh = device
                        .register_events(EventTypes::CRITICAL_XID_ERROR, fresh)
                        .ok()?;
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
