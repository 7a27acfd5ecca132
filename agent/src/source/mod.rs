//! Where GPU readings come from.
//!
//! *Boundary:* everything a [`GpuSource`] returns is data from outside the
//! agent (a driver, or a simulation); absent readings stay `None` and are
//! sent as absent, never as zero.

pub mod mock;
pub mod nvml;
mod nvml_ffi;
pub mod worker;
pub mod xid;

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
    /// What users join on besides the UUID, each absent where NVML does
    /// not give it: the PCI bus id (`nvmlDeviceGetPciInfo`), the board's
    /// serial number and the driver version (the node's, the same on
    /// every GPU).
    pub pci_bus_id: Option<String>,
    pub serial: Option<String>,
    pub driver_version: Option<String>,
    // ---- MIG ----
    /// The board's SM count in MIG mode (its largest full GPU-instance
    /// profile's), where given.
    pub multiprocessor_count: Option<u32>,
    /// The board's GPU-instance slices in MIG mode (its largest full
    /// GPU-instance profile's), where given: what the collector shares the
    /// board out of.
    pub gpu_instance_slice_count: Option<u32>,
    /// The board's MIG devices while it is in MIG mode, else empty.
    pub mig: Vec<MigInstance>,
    /// The identity of the layout above ([`layout_id`]) on a board that can
    /// be put in MIG mode (in it or not); `None` on one that cannot.
    pub mig_layout: Option<u64>,
    /// The layouts the board had before in this run, newest last, at most
    /// [`MAX_EARLIER_LAYOUTS`]: each Hello lists them, so that a collector
    /// that never heard them still splits the samples stamped with them.
    pub earlier_mig: Vec<EarlierLayout>,
}

/// Layouts kept per board besides its current one.
pub const MAX_EARLIER_LAYOUTS: usize = 4;

/// A MIG layout a board had before its current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlierLayout {
    pub id: u64,
    pub multiprocessor_count: Option<u32>,
    pub gpu_instance_slice_count: Option<u32>,
    pub mig: Vec<MigInstance>,
}

impl GpuInfo {
    /// Takes a newly read layout (`mig_layout` its id), keeping the one it
    /// replaces among the earlier layouts.
    pub fn relayout(
        &mut self,
        multiprocessor_count: Option<u32>,
        gpu_instance_slice_count: Option<u32>,
        mig: Vec<MigInstance>,
        mig_layout: Option<u64>,
    ) {
        let replaced = EarlierLayout {
            id: self.mig_layout.unwrap_or_default(),
            multiprocessor_count: std::mem::replace(
                &mut self.multiprocessor_count,
                multiprocessor_count,
            ),
            gpu_instance_slice_count: std::mem::replace(
                &mut self.gpu_instance_slice_count,
                gpu_instance_slice_count,
            ),
            mig: std::mem::replace(&mut self.mig, mig),
        };
        let old = std::mem::replace(&mut self.mig_layout, mig_layout);
        self.earlier_mig
            .retain(|e| Some(e.id) != mig_layout && Some(e.id) != old);
        if old.is_some() && old != mig_layout {
            self.earlier_mig.push(replaced);
        }
        if self.earlier_mig.len() > MAX_EARLIER_LAYOUTS {
            self.earlier_mig.remove(0);
        }
    }
}

/// The identity of a board's MIG layout (its SM and slice counts and its
/// instances, in order; MIG mode off is the empty layout): FNV-1a (64 bit)
/// over a fixed encoding of them, so that the same layout has the same id
/// in every run of the agent (a disk spool's samples keep theirs across a
/// restart). What each reading of the board is stamped with
/// ([`GpuReading::mig_layout`]).
pub fn layout_id(sm: Option<u32>, slices: Option<u32>, mig: &[MigInstance]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    fn feed(h: u64, bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
    }
    let count = |h: u64, v: Option<u32>| match v {
        None => feed(h, &[0]),
        Some(v) => feed(feed(h, &[1]), &v.to_le_bytes()),
    };
    let mut h = count(count(OFFSET, sm), slices);
    for m in mig {
        // Each string ends with its length, so no two layouts encode alike.
        for s in [&m.uuid, &m.profile] {
            h = feed(feed(h, s.as_bytes()), &(s.len() as u64).to_le_bytes());
        }
        for v in [
            m.gpu_instance_id,
            m.compute_instance_id,
            m.multiprocessor_count,
            m.gpu_instance_slice_count,
            m.compute_instance_slice_count,
        ] {
            h = feed(h, &v.to_le_bytes());
        }
    }
    h
}

/// One MIG device of a board: what a tenant leases by its UUID. NVML has
/// no power or energy reading of its own for it; the collector apportions
/// the board's by GPU-instance slice share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigInstance {
    /// `MIG-...`.
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    pub multiprocessor_count: u32,
    /// The slices of its GPU instance (its attributes'
    /// `gpuInstanceSliceCount`).
    pub gpu_instance_slice_count: u32,
    /// The slices of its compute instance within the GPU instance
    /// (`computeInstanceSliceCount`).
    pub compute_instance_slice_count: u32,
    /// `3g.40gb` from the device name, else `<slices>g`.
    pub profile: String,
}

/// One GPU's health readings on one tick, in NVML's units. `None` means
/// "not supported or not readable", never zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuHealth {
    /// The clock-event (throttle) reasons active now, NVML's bitmask as
    /// nvml-wrapper knows its bits (`nvmlDeviceGetCurrentClocksThrottleReasons`).
    pub clock_event_reasons: Option<u64>,
    /// Cumulative time clocks were held back by the power cap and by
    /// thermal limits since the driver loaded (`nvmlDeviceGetViolationStatus`).
    pub power_violation_nanoseconds: Option<u64>,
    pub thermal_violation_nanoseconds: Option<u64>,
    /// ECC error counts (`nvmlDeviceGetTotalEccErrors`): volatile since
    /// the driver loaded, aggregate over the board's life.
    pub ecc_volatile_corrected: Option<u64>,
    pub ecc_volatile_uncorrected: Option<u64>,
    pub ecc_aggregate_corrected: Option<u64>,
    pub ecc_aggregate_uncorrected: Option<u64>,
    /// Pages retired for single- and double-bit errors, and whether a
    /// retirement waits for the next driver reload (field values
    /// `RETIRED_SBE`, `RETIRED_DBE`, `RETIRED_PENDING`; pre-Ampere boards).
    pub retired_pages_single_bit: Option<u64>,
    pub retired_pages_double_bit: Option<u64>,
    pub retired_pages_pending: Option<bool>,
    /// Rows remapped for correctable and uncorrectable errors, a remap
    /// waiting for a GPU reset, a remap that failed (field values
    /// `REMAPPED_COR`, `REMAPPED_UNC`, `REMAPPED_PENDING`,
    /// `REMAPPED_FAILURE`; Ampere and later).
    pub remapped_rows_correctable: Option<u64>,
    pub remapped_rows_uncorrectable: Option<u64>,
    pub remapped_rows_pending: Option<bool>,
    pub remapped_rows_failed: Option<bool>,
    /// HBM temperature (field value `MEMORY_TEMP`).
    pub memory_temperature_celsius: Option<i32>,
    pub memory_clock_mhz: Option<u32>,
    pub encoder_utilization_percent: Option<u32>,
    pub decoder_utilization_percent: Option<u32>,
    /// PCIe replays since the driver loaded.
    pub pcie_replays: Option<u64>,
    /// PCIe throughput over NVML's last 20 ms window, in NVML's KB/s
    /// (1024 bytes).
    pub pcie_tx_kilobytes_per_second: Option<u32>,
    pub pcie_rx_kilobytes_per_second: Option<u32>,
    /// Fan 0's speed, percent of its maximum (may exceed 100); absent on
    /// boards without a fan of their own (SXM).
    pub fan_speed_percent: Option<u32>,
    /// Field values `POWER_INSTANT` and `POWER_AVERAGE` (the one-second
    /// average `power_milliwatts` also reports on most boards).
    pub power_instant_milliwatts: Option<u64>,
    pub power_average_milliwatts: Option<u64>,
    /// XID critical errors since the agent started (or since its counts
    /// file was first written), by XID code (NVML's
    /// event API, see [`xid`]); empty when the GPU delivers no XID events
    /// or none has arrived.
    pub xid_errors: BTreeMap<u32, u64>,
    /// The most recent XID code and when it arrived (Unix nanoseconds).
    pub last_xid: Option<(u32, i64)>,

    // ---- NVLink ----
    /// Links in the active state among those the GPU has; `None` on a GPU
    /// without NVLink (see [`nvml`]'s `nvlink` module).
    pub nvlink_active_links: Option<u32>,
    /// The error counters of each active link, by link index.
    pub nvlinks: Vec<NvLinkErrors>,
}

/// One active NVLink link's data-link error counters
/// (`nvmlDeviceGetNvLinkErrorCounter`), cumulative since the driver loaded
/// or the counters were reset; each `None` where it cannot be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvLinkErrors {
    pub link: u32,
    pub replay: Option<u64>,
    pub recovery: Option<u64>,
    pub crc_flit: Option<u64>,
    pub crc_data: Option<u64>,
    /// Data sent and received over the link (bytes, cumulative).
    pub transmit_bytes: Option<u64>,
    pub receive_bytes: Option<u64>,
}

impl GpuHealth {
    /// Whether no reading is present (then nothing is sent).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
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
    /// Why clocks are held back, errors, and the other diagnostic readings.
    pub health: GpuHealth,
    /// The GPU stopped answering (NVML `GpuLost`); all readings are `None`.
    pub lost: bool,
    /// The MIG layout the reading was taken under (`GpuInfo::mig_layout`),
    /// on a board that can be put in MIG mode.
    pub mig_layout: Option<u64>,
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

    /// The inventory as it changes (a board's MIG layout): a new value
    /// makes the agent say Hello again; `None` for a source whose
    /// inventory is fixed.
    fn layout(&self) -> Option<tokio::sync::watch::Receiver<Vec<GpuInfo>>> {
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
