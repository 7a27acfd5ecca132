//! Where GPU readings come from.
//!
//! *Boundary:* everything a [`GpuSource`] returns is data from outside the
//! agent (a driver, or a simulation); absent readings stay `None` and are
//! sent as absent, never as zero.

pub mod mock;
pub mod nvml;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Static facts about one GPU, sent once per stream in the Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub power_limit_milliwatts: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub energy_counter_supported: bool,
}

/// One GPU's readings on one tick. `None` means "not supported or not
/// readable", never zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuReading {
    pub index: u32,
    pub power_milliwatts: Option<u64>,
    /// Cumulative energy since the driver loaded.
    pub energy_millijoules: Option<u64>,
    pub utilization_percent: Option<u32>,
    pub memory_utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_celsius: Option<i32>,
    pub sm_clock_mhz: Option<u32>,
    pub power_limit_milliwatts: Option<u64>,
    /// The GPU stopped answering (NVML `GpuLost`); all readings are `None`.
    pub lost: bool,
}

impl GpuReading {
    /// A reading for a GPU that is gone.
    pub fn lost(index: u32) -> Self {
        Self {
            index,
            lost: true,
            ..Self::default()
        }
    }
}

/// A backend that reads every GPU of this node.
pub trait GpuSource: Send {
    /// The GPUs this source reports, in index order. Fixed for the life of
    /// the source.
    fn inventory(&self) -> &[GpuInfo];

    /// Reads every GPU. `at_unix_nanos` is the tick the sample is stamped
    /// with; simulated sources integrate their power over it.
    fn sample(&mut self, at_unix_nanos: i64) -> Vec<GpuReading>;

    /// A short name for logs and the Hello.
    fn name(&self) -> &'static str;

    /// The source's failed reads, shared with `/metrics`; `None` for a
    /// source that cannot fail.
    fn errors(&self) -> Option<Arc<ReadErrors>> {
        None
    }
}

/// Failed reads by field (`power`, `energy`, `handle`, ...): every failed
/// call counts, not only the first one logged. A field the GPU does not
/// support is absent, not an error.
#[derive(Debug, Default)]
pub struct ReadErrors(Mutex<BTreeMap<&'static str, u64>>);

impl ReadErrors {
    pub fn add(&self, field: &'static str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(field).or_default() += 1;
    }

    /// (field, count), by field.
    pub fn by_field(&self) -> Vec<(&'static str, u64)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(f, n)| (*f, *n)).collect()
    }
}

/// Errors opening a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "NVML could not be initialised from {library}: {error} (on a host without NVIDIA GPUs, use `--source mock`)"
    )]
    NvmlInit {
        library: String,
        error: ::nvml_wrapper::error::NvmlError,
    },
    #[error("NVML: reading {what}: {error}")]
    Nvml {
        what: String,
        error: ::nvml_wrapper::error::NvmlError,
    },
    #[error("mock source: {0}")]
    Mock(String),
}
