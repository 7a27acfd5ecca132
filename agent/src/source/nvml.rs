//! Real GPUs through NVML (nvml-wrapper).
//!
//! *Boundary:* NVML answers are outside input. A field a GPU does not
//! support (`NotSupported`) or cannot read is reported absent and logged
//! once per GPU and field, not on every tick; a GPU that falls off the bus
//! (`GpuLost`) is reported as lost, and the other GPUs keep reporting.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use tracing::{error, info, warn};

use super::{GpuInfo, GpuReading, GpuSource, ReadErrors, SourceError};

/// The library name NVML is looked up by when no path is configured.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

pub struct NvmlSource {
    nvml: Nvml,
    inventory: Vec<GpuInfo>,
    /// (GPU index, field) pairs already reported as unreadable.
    reported: HashSet<(u32, &'static str)>,
    lost: Vec<bool>,
    /// NVML's index of each inventory entry (they differ when a GPU could
    /// not be identified at start-up and was left out).
    nvml_index: Vec<u32>,
    errors: Arc<ReadErrors>,
}

impl NvmlSource {
    /// Loads NVML from `library` (a path or a name the dynamic loader
    /// resolves) and takes the inventory of every GPU it lists.
    pub fn open(library: Option<&Path>) -> Result<Self, SourceError> {
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
        let mut inventory = Vec::with_capacity(count as usize);
        let mut nvml_index = Vec::with_capacity(count as usize);
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
            // Only a definite NotSupported means "no counter"; a passing error
            // at start-up must not switch energy accounting to integration.
            let energy_counter_supported = !matches!(
                device.total_energy_consumption(),
                Err(NvmlError::NotSupported)
            );
            inventory.push(GpuInfo {
                index: inventory.len() as u32,
                uuid,
                model,
                power_limit_milliwatts: device.enforced_power_limit().ok().map(u64::from),
                memory_total_bytes: device.memory_info().ok().map(|m| m.total),
                energy_counter_supported,
            });
            nvml_index.push(index);
        }
        if count > 0 && inventory.is_empty() {
            return Err(SourceError::Nvml {
                what: format!("any of the {count} GPUs"),
                error: NvmlError::Unknown,
            });
        }
        info!(gpus = count, library = %lib.to_string_lossy(), "NVML initialised");
        Ok(Self {
            nvml,
            lost: vec![false; inventory.len()],
            inventory,
            reported: HashSet::new(),
            nvml_index,
            errors: Arc::default(),
        })
    }

    /// Turns one NVML answer into an optional reading, logging the first
    /// failure of each (GPU, field). Returns `Err(())` when the GPU is lost.
    fn field<T>(
        reported: &mut HashSet<(u32, &'static str)>,
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
            lost: false,
        })
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

    fn sample(&mut self, _at_unix_nanos: i64) -> Vec<GpuReading> {
        (0..self.inventory.len() as u32)
            .map(|index| match self.read(self.nvml_index[index as usize]) {
                Ok(mut reading) => {
                    reading.index = index;
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
