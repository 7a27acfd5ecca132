//! Real GPUs through NVML (nvml-wrapper).
//!
//! *Boundary:* NVML answers are outside input. A field a GPU does not
//! support (`NotSupported`) or cannot read is reported absent and logged
//! once per GPU and field, not on every tick; a GPU that falls off the bus
//! (`GpuLost`) is reported as lost, and the other GPUs keep reporting.
//! A function an older driver lacks (nvml-wrapper's `FailedToLoadSymbol`)
//! is taken as not supported: absent, logged once, not an error.
//!
//! The health readings ([`GpuHealth`]) all go through nvml-wrapper's own
//! API, no unsafe code here: the functions it wraps directly, and one
//! `nvmlDeviceGetFieldValues` call per GPU and tick (`field_values_for`,
//! with the field ids it re-exports from its `-sys` crate) for those NVML
//! only gives as field values (memory temperature, instant and average
//! power, retired pages, remapped rows).
//!
//! NVLink state and error counters are read per link ([`nvlink`]).
//!
//! XID errors come from NVML's event API, waited on by a thread of its own
//! ([`super::xid`]); each reading takes the counts it has gathered so far.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, PerformancePolicy, TemperatureSensor,
};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id as fi;
use nvml_wrapper::{Device, Nvml};
use tracing::{error, info, warn};

use super::nvml_ffi::{InstanceId, instance_id};
mod nvlink;

use super::xid::XidWatch;
use super::{
    GpuHealth, GpuInfo, GpuReading, GpuSource, MigInstance, ReadErrors, SourceError, layout_id,
};

/// The field values read in one `nvmlDeviceGetFieldValues` call, with the
/// name each is logged and counted under.
const FIELD_VALUES: [(u32, &str); 10] = [
    (fi::NVML_FI_DEV_MEMORY_TEMP, "memory_temperature"),
    (fi::NVML_FI_DEV_POWER_INSTANT, "power_instant"),
    (fi::NVML_FI_DEV_POWER_AVERAGE, "power_average"),
    (fi::NVML_FI_DEV_RETIRED_SBE, "retired_pages_single_bit"),
    (fi::NVML_FI_DEV_RETIRED_DBE, "retired_pages_double_bit"),
    (fi::NVML_FI_DEV_RETIRED_PENDING, "retired_pages_pending"),
    (fi::NVML_FI_DEV_REMAPPED_COR, "remapped_rows_correctable"),
    (fi::NVML_FI_DEV_REMAPPED_UNC, "remapped_rows_uncorrectable"),
    (fi::NVML_FI_DEV_REMAPPED_PENDING, "remapped_rows_pending"),
    (fi::NVML_FI_DEV_REMAPPED_FAILURE, "remapped_rows_failed"),
];

/// A field value as an unsigned integer; a negative or fractional one is
/// not a count (`Unknown`: counted as a failed read).
fn unsigned(v: SampleValue) -> Result<u64, NvmlError> {
    match v {
        SampleValue::U32(v) => Ok(u64::from(v)),
        SampleValue::U64(v) => Ok(v),
        SampleValue::I64(v) => u64::try_from(v).map_err(|_| NvmlError::Unknown),
        SampleValue::F64(_) => Err(NvmlError::Unknown),
    }
}

/// The library name NVML is looked up by when no path is configured.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

pub struct NvmlSource {
    /// Shared with the XID thread; the source is dropped first (its field
    /// order), so the thread is told to stop before NVML shuts down.
    xid: Option<XidWatch>,
    nvml: Arc<Nvml>,
    inventory: Vec<GpuInfo>,
    /// (GPU index, field) pairs already reported as unreadable.
    reported: Reported,
    lost: Vec<bool>,
    /// NVML's index of each inventory entry (they differ when a GPU could
    /// not be identified at start-up and was left out).
    nvml_index: Vec<u32>,
    errors: Arc<ReadErrors>,
    // ---- MIG ----
    /// The inventory as the MIG layout re-reads leave it.
    layout: tokio::sync::watch::Sender<Vec<GpuInfo>>,
    /// How often the layout is read again, and when it last was.
    mig_every: Duration,
    mig_checked: Instant,
    // ---- NVLink ----
    /// The NVLink links of each GPU, by NVML index (`nvlink::probe`).
    nvlinks: Vec<Vec<u32>>,
}

/// How often a board's MIG layout is read again by default.
pub const MIG_CHECK_EVERY: Duration = Duration::from_secs(10);

/// NVML's `NVML_DEVICE_MIG_ENABLE`.
const MIG_ENABLED: u32 = 1;

/// NVML's full-board GPU-instance profiles (`NVML_GPU_INSTANCE_PROFILE_8_SLICE`,
/// `_7_SLICE`, `_6_SLICE`): the board's slices and SMs are those of the
/// largest one it answers.
const FULL_PROFILES: [u32; 3] = [5, 4, 6];

/// The board's SM count and GPU-instance slice count as its largest full
/// GPU-instance profile gives them (`nvmlDeviceGetGpuInstanceProfileInfo`,
/// answered in MIG mode): `nvmlDeviceGetAttributes_v2` answers MIG device
/// handles only, not the board's.
fn board_profile(device: &Device<'_>) -> (Option<u32>, Option<u32>) {
    FULL_PROFILES
        .iter()
        .filter_map(|&p| device.profile_info(p).ok())
        .max_by_key(|i| i.slice_count)
        .map_or((None, None), |i| {
            (Some(i.multiprocessor_count), Some(i.slice_count))
        })
}

/// A board's MIG layout as the inventory lists it.
#[derive(Debug, Default)]
struct Layout {
    /// The board can be put in MIG mode (in it or not).
    capable: bool,
    /// The board's SM count, in MIG mode only.
    sm: Option<u32>,
    /// The board's GPU-instance slices, in MIG mode only.
    slices: Option<u32>,
    mig: Vec<MigInstance>,
}

/// A board's SM and slice counts (in MIG mode only) and its MIG devices
/// (empty unless it is in MIG mode). A board without MIG support, or a
/// driver without the MIG functions, has no MIG devices; any other
/// failure is an error, and the caller keeps the layout it knew.
fn mig_layout(nvml: &Nvml, device: &Device<'_>) -> Result<Layout, NvmlError> {
    let mode = match device.mig_mode() {
        Ok(m) => m.current,
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => {
            return Ok(Layout::default());
        }
        Err(e) => return Err(e),
    };
    if mode != MIG_ENABLED {
        return Ok(Layout {
            capable: true,
            ..Layout::default()
        });
    }
    let (sm, slices) = board_profile(device);
    let mut instances = Vec::new();
    for slot in 0..device.mig_device_count()? {
        let mig = match device.mig_device_by_index(slot) {
            Ok(m) => m,
            // An empty slot.
            Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
            Err(e) => return Err(e),
        };
        let attributes = mig.attributes()?;
        // The driver names a MIG device "<board> MIG 3g.40gb".
        let profile = match mig.name() {
            Ok(name) => name.rsplit_once("MIG ").map(|(_, p)| p.trim().to_string()),
            Err(_) => None,
        }
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| format!("{}g", attributes.gpu_instance_slice_count));
        instances.push(MigInstance {
            uuid: mig.uuid()?,
            gpu_instance_id: instance_id(nvml, &mig, InstanceId::Gpu)?,
            compute_instance_id: instance_id(nvml, &mig, InstanceId::Compute)?,
            multiprocessor_count: attributes.multiprocessor_count,
            gpu_instance_slice_count: attributes.gpu_instance_slice_count,
            compute_instance_slice_count: attributes.compute_instance_slice_count,
            profile,
        });
    }
    Ok(Layout {
        capable: true,
        sm,
        slices,
        mig: instances,
    })
}

/// (GPU index, field) pairs already reported as unreadable.
type Reported = HashSet<(u32, &'static str)>;

impl NvmlSource {
    /// Loads NVML from `library` (a path or a name the dynamic loader
    /// resolves) and takes the inventory of every GPU it lists; XID counts
    /// start from 0.
    pub fn open(library: Option<&Path>) -> Result<Self, SourceError> {
        Self::open_with(library, None)
    }

    /// [`NvmlSource::open`], keeping the XID counts in `xid_counts_file`
    /// across agent restarts when one is given (see [`super::xid`]).
    pub fn open_with(
        library: Option<&Path>,
        xid_counts_file: Option<&Path>,
    ) -> Result<Self, SourceError> {
        let lib = library.map_or_else(|| OsStr::new(DEFAULT_LIBRARY), Path::as_os_str);
        let nvml = Nvml::builder()
            .lib_path(lib)
            .init()
            .map_err(|error| SourceError::NvmlInit {
                library: lib.to_string_lossy().into_owned(),
                error,
            })?;
        let count = nvml.device_count().map_err(|error| SourceError::Nvml {
            what: "the device count".into(),
            error,
        })?;
        let driver_version = match nvml.sys_driver_version() {
            Ok(v) => Some(v),
            Err(e) => {
                info!(error = %e, "driver version not available; left out of capwatch_gpu_info");
                None
            }
        };
        let mut inventory = Vec::with_capacity(count as usize);
        let mut nvml_index = Vec::with_capacity(count as usize);
        let mut nvlinks = vec![Vec::new(); count as usize];
        for index in 0..count {
            // A GPU that cannot be identified is left out (and logged), so
            // one broken board does not stop the node's other GPUs from
            // being metered.
            let identified = nvml
                .device_by_index(index)
                .and_then(|device| Ok((device.uuid()?, device)));
            let (uuid, device) = match identified {
                Ok(found) => found,
                Err(e) => {
                    error!(gpu = index, error = %e, "GPU cannot be identified; left out of the inventory until the agent restarts");
                    continue;
                }
            };
            let model = device.name().unwrap_or_else(|_| "unknown".into());
            // Identity is optional: absent (and logged) when NVML cannot
            // give it, never a reason to leave the GPU out.
            let identity = |what: &str, answer: Result<String, NvmlError>| match answer {
                Ok(v) => Some(v),
                Err(e) => {
                    info!(gpu = index, field = what, error = %e, "not available; left out of capwatch_gpu_info");
                    None
                }
            };
            let pci_bus_id = identity("pci_bus_id", device.pci_info().map(|p| p.bus_id));
            let serial = identity("serial", device.serial());
            // Only a definite NotSupported means "no counter"; a passing error
            // at start-up must not switch energy accounting to integration.
            let energy_counter_supported = !matches!(
                device.total_energy_consumption(),
                Err(NvmlError::NotSupported)
            );
            let Layout {
                capable,
                sm,
                slices,
                mig,
            } = match mig_layout(&nvml, &device) {
                Ok(layout) => layout,
                Err(e) => {
                    warn!(gpu = index, error = %e, "MIG layout cannot be read; the board is metered whole until it can");
                    Layout::default()
                }
            };
            if !mig.is_empty() {
                info!(gpu = index, instances = mig.len(), "board in MIG mode");
            }
            inventory.push(GpuInfo {
                index: inventory.len() as u32,
                uuid,
                model,
                power_limit_milliwatts: device.enforced_power_limit().ok().map(u64::from),
                memory_total_bytes: device.memory_info().ok().map(|m| m.total),
                energy_counter_supported,
                pci_bus_id,
                serial,
                driver_version: driver_version.clone(),
                multiprocessor_count: sm,
                gpu_instance_slice_count: slices,
                mig_layout: capable.then(|| layout_id(sm, slices, &mig)),
                mig,
                earlier_mig: Vec::new(),
            });
            nvml_index.push(index);
            nvlinks[index as usize] = nvlink::probe(&device, index);
        }
        if count > 0 && inventory.is_empty() {
            return Err(SourceError::Nvml {
                what: format!("any of the {count} GPUs"),
                error: NvmlError::Unknown,
            });
        }
        info!(gpus = count, library = %lib.to_string_lossy(), "NVML initialised");
        let nvml = Arc::new(nvml);
        let errors = Arc::<ReadErrors>::default();
        let xid = XidWatch::start(
            nvml.clone(),
            nvml_index
                .iter()
                .zip(&inventory)
                .map(|(&i, g)| (i, g.uuid.clone()))
                .collect(),
            errors.clone(),
            xid_counts_file.map(Path::to_path_buf),
        );
        Ok(Self {
            xid,
            nvml,
            lost: vec![false; inventory.len()],
            layout: tokio::sync::watch::Sender::new(inventory.clone()),
            inventory,
            reported: HashSet::new(),
            nvml_index,
            errors,
            mig_every: MIG_CHECK_EVERY,
            mig_checked: Instant::now(),
            nvlinks,
        })
    }

    /// Reads the MIG layouts again every `every` instead of
    /// [`MIG_CHECK_EVERY`].
    pub fn with_mig_check_every(mut self, every: Duration) -> Self {
        self.mig_every = every;
        self
    }

    /// Reads every board's MIG layout again once `mig_every` has passed
    /// since the last time, and publishes the inventory when one changed.
    /// A board whose layout cannot be read keeps the one it had.
    fn check_mig(&mut self) {
        if self.mig_checked.elapsed() < self.mig_every {
            return;
        }
        self.mig_checked = Instant::now();
        let mut changed = false;
        for (i, info) in self.inventory.iter_mut().enumerate() {
            let Ok(device) = self.nvml.device_by_index(self.nvml_index[i]) else {
                continue;
            };
            match mig_layout(&self.nvml, &device) {
                Ok(Layout {
                    capable,
                    sm,
                    slices,
                    mig,
                }) => {
                    self.reported.remove(&(i as u32, "mig_layout"));
                    let id = capable.then(|| layout_id(sm, slices, &mig));
                    if sm != info.multiprocessor_count
                        || slices != info.gpu_instance_slice_count
                        || mig != info.mig
                        || id != info.mig_layout
                    {
                        info!(gpu = i, uuid = %info.uuid, instances = mig.len(), "MIG layout changed; saying Hello again");
                        info.relayout(sm, slices, mig, id);
                        changed = true;
                    }
                }
                Err(e) => {
                    self.errors.add("mig_layout");
                    if self.reported.insert((i as u32, "mig_layout")) {
                        warn!(gpu = i, error = %e, "MIG layout cannot be read again; keeping the one known");
                    }
                }
            }
        }
        if changed {
            self.layout.send_replace(self.inventory.clone());
        }
    }

    /// Turns one NVML answer into an optional reading, logging the first
    /// failure of each (GPU, field). Returns `Err(())` when the GPU is lost.
    fn field<T>(
        reported: &mut Reported,
        errors: &ReadErrors,
        index: u32,
        field: &'static str,
        answer: Result<T, NvmlError>,
    ) -> Result<Option<T>, Lost> {
        match answer {
            Ok(v) => Ok(Some(v)),
            Err(NvmlError::GpuLost) => {
                errors.add(field);
                Err(Lost)
            }
            Err(NvmlError::NotSupported) => {
                if reported.insert((index, field)) {
                    info!(
                        gpu = index,
                        field, "not supported by this GPU; reported absent"
                    );
                }
                Ok(None)
            }
            // An older driver without the function: as not supported.
            Err(NvmlError::FailedToLoadSymbol(symbol)) => {
                if reported.insert((index, field)) {
                    info!(gpu = index, field, symbol = %symbol, "this driver lacks the NVML function; reported absent");
                }
                Ok(None)
            }
            Err(e) => {
                errors.add(field);
                if reported.insert((index, field)) {
                    warn!(gpu = index, field, error = %e, "NVML read failed; reported absent");
                }
                Ok(None)
            }
        }
    }

    fn read(&mut self, index: u32) -> Result<GpuReading, Lost> {
        let device = match self.nvml.device_by_index(index) {
            Ok(d) => d,
            Err(NvmlError::GpuLost) => {
                self.errors.add("handle");
                return Err(Lost);
            }
            Err(e) => {
                self.errors.add("handle");
                if self.reported.insert((index, "handle")) {
                    warn!(gpu = index, error = %e, "NVML has no handle for this GPU");
                }
                return Err(Lost);
            }
        };
        let r = &mut self.reported;
        let e = &*self.errors;
        let mut health = Self::health(r, e, index, &device)?;
        // ---- NVLink ----
        let links = self
            .nvlinks
            .get(index as usize)
            .map_or(&[][..], Vec::as_slice);
        (health.nvlink_active_links, health.nvlinks) =
            nvlink::read(r, e, index, &self.nvml, &device, links)?;
        let utilization = Self::field(r, e, index, "utilization", device.utilization_rates())?;
        let memory = Self::field(r, e, index, "memory", device.memory_info())?;
        Ok(GpuReading {
            index,
            power_milliwatts: Self::field(r, e, index, "power", device.power_usage())?
                .map(u64::from),
            energy_millijoules: Self::field(
                r,
                e,
                index,
                "energy",
                device.total_energy_consumption(),
            )?,
            utilization_percent: utilization.as_ref().map(|u| u.gpu),
            memory_utilization_percent: utilization.as_ref().map(|u| u.memory),
            memory_used_bytes: memory.map(|m| m.used),
            temperature_celsius: Self::field(
                r,
                e,
                index,
                "temperature",
                device.temperature(TemperatureSensor::Gpu),
            )?
            .and_then(|t| i32::try_from(t).ok()),
            sm_clock_mhz: Self::field(r, e, index, "sm_clock", device.clock_info(Clock::SM))?,
            power_limit_milliwatts: Self::field(
                r,
                e,
                index,
                "power_limit",
                device.enforced_power_limit(),
            )?
            .map(u64::from),
            health,
            lost: false,
            // Stamped by `sample`, which knows the layout.
            mig_layout: None,
        })
    }

    /// The health readings of one GPU, each absent when it cannot be read.
    fn health(
        r: &mut Reported,
        e: &ReadErrors,
        index: u32,
        device: &Device<'_>,
    ) -> Result<GpuHealth, Lost> {
        // `?` on each: a lost GPU ends the whole reading.
        macro_rules! read {
            ($field:expr, $answer:expr $(,)?) => {
                Self::field(r, e, index, $field, $answer)
            };
        }
        let violation = |policy| device.violation_status(policy).map(|v| v.violation_time);
        let ecc = |error, counter| device.total_ecc_errors(error, counter);
        let mut h = GpuHealth {
            clock_event_reasons: read!(
                "clock_event_reasons",
                device.current_throttle_reasons().map(|r| r.bits()),
            )?,
            power_violation_nanoseconds: read!(
                "power_violation",
                violation(PerformancePolicy::Power),
            )?,
            thermal_violation_nanoseconds: read!(
                "thermal_violation",
                violation(PerformancePolicy::Thermal),
            )?,
            ecc_volatile_corrected: read!(
                "ecc_volatile_corrected",
                ecc(MemoryError::Corrected, EccCounter::Volatile),
            )?,
            ecc_volatile_uncorrected: read!(
                "ecc_volatile_uncorrected",
                ecc(MemoryError::Uncorrected, EccCounter::Volatile),
            )?,
            ecc_aggregate_corrected: read!(
                "ecc_aggregate_corrected",
                ecc(MemoryError::Corrected, EccCounter::Aggregate),
            )?,
            ecc_aggregate_uncorrected: read!(
                "ecc_aggregate_uncorrected",
                ecc(MemoryError::Uncorrected, EccCounter::Aggregate),
            )?,
            memory_clock_mhz: read!("memory_clock", device.clock_info(Clock::Memory))?,
            encoder_utilization_percent: read!(
                "encoder_utilization",
                device.encoder_utilization().map(|u| u.utilization),
            )?,
            decoder_utilization_percent: read!(
                "decoder_utilization",
                device.decoder_utilization().map(|u| u.utilization),
            )?,
            pcie_replays: read!("pcie_replays", device.pcie_replay_counter().map(u64::from),)?,
            fan_speed_percent: read!("fan_speed", device.fan_speed(0))?,
            ..GpuHealth::default()
        };
        let pcie = |counter| device.pcie_throughput(counter);
        h.pcie_tx_kilobytes_per_second = read!("pcie_tx", pcie(PcieUtilCounter::Send))?;
        h.pcie_rx_kilobytes_per_second = read!("pcie_rx", pcie(PcieUtilCounter::Receive))?;

        let ids = FIELD_VALUES.map(|(id, _)| FieldId(id));
        let mut values = [None; FIELD_VALUES.len()];
        if let Some(answers) = read!("field_values", device.field_values_for(&ids))? {
            for ((slot, (_, field)), answer) in values.iter_mut().zip(FIELD_VALUES).zip(answers) {
                let value = answer.and_then(|s| s.value).and_then(unsigned);
                *slot = read!(field, value)?;
            }
        }
        let [
            memory_temperature,
            power_instant,
            power_average,
            retired_single,
            retired_double,
            retired_pending,
            remapped_correctable,
            remapped_uncorrectable,
            remapped_pending,
            remapped_failed,
        ] = values;
        h.memory_temperature_celsius = memory_temperature.and_then(|t| i32::try_from(t).ok());
        h.power_instant_milliwatts = power_instant;
        h.power_average_milliwatts = power_average;
        h.retired_pages_single_bit = retired_single;
        h.retired_pages_double_bit = retired_double;
        h.retired_pages_pending = retired_pending.map(|v| v != 0);
        h.remapped_rows_correctable = remapped_correctable;
        h.remapped_rows_uncorrectable = remapped_uncorrectable;
        h.remapped_rows_pending = remapped_pending.map(|v| v != 0);
        h.remapped_rows_failed = remapped_failed.map(|v| v != 0);
        Ok(h)
    }
}

struct Lost;

impl GpuSource for NvmlSource {
    fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn name(&self) -> &'static str {
        "nvml"
    }

    fn errors(&self) -> Option<Arc<ReadErrors>> {
        Some(self.errors.clone())
    }

    fn layout(&self) -> Option<tokio::sync::watch::Receiver<Vec<GpuInfo>>> {
        Some(self.layout.subscribe())
    }

    fn sample(&mut self, _at_unix_nanos: i64) -> Vec<GpuReading> {
        self.check_mig();
        (0..self.inventory.len() as u32)
            .map(|index| match self.read(self.nvml_index[index as usize]) {
                Ok(mut reading) => {
                    reading.index = index;
                    // Stamped with the layout just read (`check_mig`).
                    reading.mig_layout = self.inventory[index as usize].mig_layout;
                    if let Some(x) = self.xid.as_ref().and_then(|x| x.of(index as usize)) {
                        reading.health.xid_errors = x.counts;
                        reading.health.last_xid = x.last;
                    }
                    if std::mem::take(&mut self.lost[index as usize]) {
                        info!(gpu = index, "GPU answers again");
                    }
                    reading
                }
                Err(Lost) => {
                    if !std::mem::replace(&mut self.lost[index as usize], true) {
                        warn!(gpu = index, uuid = %self.inventory[index as usize].uuid, "GPU lost: it no longer answers NVML");
                    }
                    GpuReading::lost(index)
                }
            })
            .collect()
    }
}
