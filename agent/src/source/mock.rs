//! A simulated node for hosts without GPUs.
//!
//! Every reading is a pure function of (seed, node id, GPU index, tick
//! number), so a run can be reproduced exactly. The energy counter is the
//! exact integral of the power the mock reports: over each interval between
//! two samples the board is taken to draw the power reported at the end of
//! it (NVML's power reading is an average over the last second, so this is
//! what a real counter shows too). The integral is kept in milliwatt
//! nanoseconds and the counter is its floor in millijoules, so no rounding
//! error accumulates.
//!
//! Health readings follow the load: a GPU drawing within 5 % of its limit
//! reports the SW power cap clock-event reason and its power violation
//! time grows by the interval, an idle one reports the idle reason; a few
//! GPUs carry corrected ECC errors that grow slowly, and one GPU of each
//! node an application XID 13 (a graphics engine exception: a faulting
//! kernel, not a board fault) at its first sample and every 1800 samples
//! after (the time of the last is the one thing a reading keeps from the
//! samples before it). SXM boards have no fan of their own and H100/H200
//! remap rows rather than retire pages, so fan speed and retired pages are
//! absent, as NVML reports them there.

use serde::{Deserialize, Serialize};

use super::{GpuHealth, GpuInfo, GpuReading, GpuSource, NvLinkErrors};

/// A workload shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Long training jobs near the power limit, with short checkpoint dips.
    Training,
    /// Serving: load that swings between half and most of the limit.
    Inference,
    /// An unused GPU drawing idle power.
    Idle,
    /// Each GPU of the node gets one of the other profiles in turn.
    Mixed,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Training => "training",
            Profile::Inference => "inference",
            Profile::Idle => "idle",
            Profile::Mixed => "mixed",
        }
    }
}

/// A simulated GPU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    H100,
    H200,
}

impl Model {
    fn name(self) -> &'static str {
        match self {
            Model::H100 => "NVIDIA H100 80GB HBM3",
            Model::H200 => "NVIDIA H200",
        }
    }
    fn memory_total_bytes(self) -> u64 {
        match self {
            Model::H100 => 80 * GIB,
            Model::H200 => 141 * GIB,
        }
    }
    fn memory_clock_mhz(self) -> u32 {
        match self {
            Model::H100 => 2619,
            Model::H200 => 3201,
        }
    }
}

/// The driver version the mock reports.
pub const DRIVER_VERSION: &str = "550.54.15";
/// Clock-event reason bits (NVML's `nvmlClocksEventReason*`).
pub const REASON_GPU_IDLE: u64 = 0x1;
pub const REASON_SW_POWER_CAP: u64 = 0x4;
/// Power at or above this is held at the cap (95 % of the limit).
const POWER_CAP_MILLIWATTS: u64 = POWER_LIMIT_MILLIWATTS / 100 * 95;

const GIB: u64 = 1 << 30;
/// Board power limit (TDP) of both SXM models.
pub const POWER_LIMIT_MILLIWATTS: u64 = 700_000;
const IDLE_MILLIWATTS: u64 = 70_000;
const NANOS_PER_SECOND: u128 = 1_000_000_000;

/// Settings of the mock fleet of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockConfig {
    pub node_id: String,
    pub gpus: u32,
    pub profile: Profile,
    pub model: Model,
    pub seed: u64,
    /// Whether the GPUs expose the cumulative energy counter. Without it the
    /// collector integrates power, as for GPUs older than Volta.
    pub energy_counter: bool,
    /// Where the counters are kept between runs (one `UUID counter_mJ`
    /// line per GPU), so a restarted agent sees them carry on as a real
    /// driver's do. Read at start, written (whole, by a rename) after each
    /// sample, before the sample is returned, so they carry on through a
    /// SIGKILL too.
    pub counter_file: Option<std::path::PathBuf>,
    /// Whether the simulated boards are SXM boards with [`MOCK_NVLINKS`]
    /// NVLink links each (traffic while they work, a few retried
    /// replays); without, they read as PCIe boards: no NVLink readings.
    pub nvlink: bool,
}

/// NVLink links of an H100 or H200 SXM board.
pub const MOCK_NVLINKS: u32 = 18;
/// Bytes one link carries each way per second of a training GPU at 100 %
/// utilization: a fifth of NVLink 4's 25 GB/s, as all-reduce traffic
/// comes in bursts.
const NVLINK_BYTES_PER_SECOND: u128 = 5_000_000_000;
/// Samples between two replays on the one link of a GPU that sees them
/// (a retried flit: no data lost, no alert).
const NVLINK_REPLAY_EVERY: u64 = 600;

struct MockGpu {
    profile: Profile,
    /// Per-GPU random stream key.
    key: u64,
    /// Counter value at the first sample, as if the driver had been loaded
    /// for a while.
    counter_base_millijoules: u64,
    /// Exact integral of reported power, in milliwatt-nanoseconds.
    integral_milliwatt_nanos: u128,
    /// Time spent at the power cap, as NVML's violation counter.
    power_violation_nanos: u64,
    /// Whether it sees the mock's application XIDs.
    app_xids: bool,
    /// The XIDs counted so far and when the last one came (Unix ns).
    xids: Option<(u64, i64)>,
    /// Bytes each NVLink link sent since the driver loaded, in
    /// byte-nanoseconds per second (received: three quarters of it).
    nvlink_byte_nanos: u128,
}

/// The application XID the mock simulates (a graphics engine exception).
const MOCK_XID: u32 = 13;
/// Samples between two of a GPU's XIDs.
const MOCK_XID_EVERY: u64 = 1800;

/// The simulated node.
pub struct MockSource {
    cfg: MockConfig,
    inventory: Vec<GpuInfo>,
    gpus: Vec<MockGpu>,
    tick: u64,
    last_at_unix_nanos: Option<i64>,
}

impl MockSource {
    pub fn new(cfg: MockConfig) -> Self {
        let node_key = fnv1a(cfg.node_id.as_bytes()) ^ cfg.seed.rotate_left(17);
        let mut inventory = Vec::with_capacity(cfg.gpus as usize);
        let mut gpus = Vec::with_capacity(cfg.gpus as usize);
        for index in 0..cfg.gpus {
            let key = splitmix64(node_key ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let profile = match cfg.profile {
                Profile::Mixed => match index % 4 {
                    0 | 1 => Profile::Training,
                    2 => Profile::Inference,
                    _ => Profile::Idle,
                },
                p => p,
            };
            inventory.push(GpuInfo {
                index,
                uuid: uuid_from(key),
                model: cfg.model.name().to_string(),
                power_limit_milliwatts: Some(POWER_LIMIT_MILLIWATTS),
                memory_total_bytes: Some(cfg.model.memory_total_bytes()),
                energy_counter_supported: cfg.energy_counter,
                pci_bus_id: Some(format!("00000000:{:02X}:00.0", 0x18 + index * 0x10)),
                serial: Some(format!(
                    "{:013}",
                    splitmix64(key ^ 0x5E71A1) % 10_000_000_000_000
                )),
                driver_version: Some(DRIVER_VERSION.to_string()),
                multiprocessor_count: None,
                gpu_instance_slice_count: None,
                mig: Vec::new(),
                mig_layout: None,
                earlier_mig: Vec::new(),
            });
            gpus.push(MockGpu {
                profile,
                key,
                // Up to ~11 days at full power since the driver loaded.
                counter_base_millijoules: splitmix64(key ^ 0xC0FFEE) % 700_000_000_000,
                integral_milliwatt_nanos: 0,
                power_violation_nanos: 0,
                app_xids: u64::from(index) == node_key % u64::from(cfg.gpus),
                xids: None,
                nvlink_byte_nanos: 0,
            });
        }
        if let Some(saved) = cfg.counter_file.as_deref().and_then(read_counters) {
            for (info, gpu) in inventory.iter().zip(&mut gpus) {
                if let Some(c) = saved.get(&info.uuid) {
                    gpu.counter_base_millijoules = *c;
                }
            }
        }
        Self {
            cfg,
            inventory,
            gpus,
            tick: 0,
            last_at_unix_nanos: None,
        }
    }

    /// The counters now, one `UUID counter_mJ` line per GPU.
    pub fn counters_text(&self) -> String {
        self.inventory
            .iter()
            .zip(&self.gpus)
            .map(|(info, gpu)| format!("{} {}\n", info.uuid, Self::counter(gpu)))
            .collect()
    }

    /// The counter value a GPU reports now, in millijoules.
    fn counter(gpu: &MockGpu) -> u64 {
        let integral = gpu.integral_milliwatt_nanos / NANOS_PER_SECOND;
        gpu.counter_base_millijoules + u64::try_from(integral).unwrap_or(u64::MAX / 2)
    }
}

impl GpuSource for MockSource {
    fn inventory(&self) -> &[GpuInfo] {
        &self.inventory
    }

    fn name(&self) -> &'static str {
        "mock"
    }

    fn sample(&mut self, at_unix_nanos: i64) -> Vec<GpuReading> {
        self.tick += 1;
        let tick = self.tick;
        // A clock that stands still or steps back adds no energy.
        let dt_nanos = match self.last_at_unix_nanos {
            Some(prev) if at_unix_nanos > prev => (at_unix_nanos - prev) as u128,
            _ => 0,
        };
        self.last_at_unix_nanos = Some(
            self.last_at_unix_nanos
                .unwrap_or(at_unix_nanos)
                .max(at_unix_nanos),
        );
        let memory_total = self.cfg.model.memory_total_bytes();
        let energy_counter = self.cfg.energy_counter;
        let model = self.cfg.model;
        let nvlink = self.cfg.nvlink;
        let readings = self
            .gpus
            .iter_mut()
            .enumerate()
            .map(|(index, gpu)| {
                let load = load_at(gpu.profile, gpu.key, tick);
                gpu.integral_milliwatt_nanos += u128::from(load.power_milliwatts) * dt_nanos;
                // As for energy, the interval is taken in the state reported
                // at its end.
                let capped = load.power_milliwatts >= POWER_CAP_MILLIWATTS;
                if capped {
                    gpu.power_violation_nanos = gpu
                        .power_violation_nanos
                        .saturating_add(u64::try_from(dt_nanos).unwrap_or(u64::MAX));
                }
                let temperature = 30 + (load.power_milliwatts * 50 / POWER_LIMIT_MILLIWATTS) as i32;
                if gpu.app_xids {
                    let count = 1 + (tick - 1) / MOCK_XID_EVERY;
                    if gpu.xids.is_none_or(|(n, _)| n != count) {
                        gpu.xids = Some((count, at_unix_nanos));
                    }
                }
                let mut health = health(gpu, &load, capped, tick, model, temperature);
                if nvlink {
                    gpu.nvlink_byte_nanos += nvlink_rate(gpu.profile, &load) * dt_nanos;
                    nvlinks(gpu, tick, &mut health);
                }
                if let Some((count, at)) = gpu.xids {
                    health.xid_errors.insert(MOCK_XID, count);
                    health.last_xid = Some((MOCK_XID, at));
                }
                GpuReading {
                    index: index as u32,
                    power_milliwatts: Some(load.power_milliwatts),
                    energy_millijoules: energy_counter.then(|| Self::counter(gpu)),
                    utilization_percent: Some(load.utilization_percent),
                    memory_utilization_percent: Some(load.utilization_percent * 3 / 5),
                    memory_used_bytes: Some(memory_total / 100 * u64::from(load.memory_percent)),
                    temperature_celsius: Some(temperature),
                    sm_clock_mhz: Some(if load.utilization_percent > 5 {
                        1980
                    } else {
                        345
                    }),
                    power_limit_milliwatts: Some(POWER_LIMIT_MILLIWATTS),
                    health,
                    lost: false,
                    mig_layout: None,
                }
            })
            .collect::<Vec<_>>();
        self.save_counters();
        readings
    }
}

/// The health readings of one GPU on tick `tick`, from its load.
fn health(
    gpu: &MockGpu,
    load: &Load,
    capped: bool,
    tick: u64,
    model: Model,
    temperature: i32,
) -> GpuHealth {
    let mut reasons = 0;
    if capped {
        reasons |= REASON_SW_POWER_CAP;
    }
    if load.utilization_percent == 0 {
        reasons |= REASON_GPU_IDLE;
    }
    // One GPU in eight sees a corrected error every ten minutes or so.
    let corrected = if gpu.key.is_multiple_of(8) {
        tick / 600
    } else {
        0
    };
    let noise = splitmix64(gpu.key ^ tick.wrapping_mul(0xA076_1D64_78BD_642F));
    // Instant power swings ±3 % around the one-second average.
    let swing = load.power_milliwatts / 100 * 3;
    let instant = load.power_milliwatts - swing + noise % (2 * swing + 1);
    let util = u64::from(load.utilization_percent);
    GpuHealth {
        clock_event_reasons: Some(reasons),
        power_violation_nanoseconds: Some(gpu.power_violation_nanos),
        thermal_violation_nanoseconds: Some(0),
        ecc_volatile_corrected: Some(corrected),
        ecc_volatile_uncorrected: Some(0),
        ecc_aggregate_corrected: Some(corrected + gpu.key % 5),
        ecc_aggregate_uncorrected: Some(0),
        remapped_rows_correctable: Some(gpu.key % 3),
        remapped_rows_uncorrectable: Some(0),
        remapped_rows_pending: Some(false),
        remapped_rows_failed: Some(false),
        memory_temperature_celsius: Some(temperature + 8),
        memory_clock_mhz: Some(model.memory_clock_mhz()),
        encoder_utilization_percent: Some(0),
        decoder_utilization_percent: Some(if gpu.profile == Profile::Inference {
            load.utilization_percent / 4
        } else {
            0
        }),
        pcie_replays: Some(0),
        pcie_tx_kilobytes_per_second: u32::try_from(500 + util * 1_500).ok(),
        pcie_rx_kilobytes_per_second: u32::try_from(1_000 + util * 4_000).ok(),
        power_instant_milliwatts: Some(instant),
        power_average_milliwatts: Some(load.power_milliwatts),
        ..GpuHealth::default()
    }
}

/// Bytes per second each NVLink link of a GPU sends under `load`: a
/// training job's all-reduce traffic, a fifth of it for inference
/// (tensor-parallel serving), none when idle.
fn nvlink_rate(profile: Profile, load: &Load) -> u128 {
    let busy = u128::from(load.utilization_percent);
    match profile {
        Profile::Training | Profile::Mixed => NVLINK_BYTES_PER_SECOND * busy / 100,
        Profile::Inference => NVLINK_BYTES_PER_SECOND * busy / 500,
        Profile::Idle => 0,
    }
}

/// The NVLink readings of an SXM board: every link active, each with its
/// cumulative traffic (received is three quarters of sent); one GPU in
/// eight sees a replay on link 0 every [`NVLINK_REPLAY_EVERY`] samples.
/// Recoveries and CRC errors, which the alert watches, stay at 0.
fn nvlinks(gpu: &MockGpu, tick: u64, health: &mut GpuHealth) {
    let sent = u64::try_from(gpu.nvlink_byte_nanos / NANOS_PER_SECOND).unwrap_or(u64::MAX / 2);
    let replays = if gpu.key % 8 == 3 {
        tick / NVLINK_REPLAY_EVERY
    } else {
        0
    };
    health.nvlink_active_links = Some(MOCK_NVLINKS);
    health.nvlinks = (0..MOCK_NVLINKS)
        .map(|link| NvLinkErrors {
            link,
            replay: Some(if link == 0 { replays } else { 0 }),
            recovery: Some(0),
            crc_flit: Some(0),
            crc_data: Some(0),
            transmit_bytes: Some(sent),
            receive_bytes: Some(sent / 4 * 3),
        })
        .collect();
}

struct Load {
    power_milliwatts: u64,
    utilization_percent: u32,
    memory_percent: u32,
}

/// The load of one GPU on tick `tick`; a pure function of its arguments.
fn load_at(profile: Profile, key: u64, tick: u64) -> Load {
    let noise = splitmix64(key ^ tick.wrapping_mul(0xD1B5_4A32_D192_ED03));
    // Uniform in [-1, 1).
    let jitter = (noise >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    let (watts, utilization, memory) = match profile {
        Profile::Idle => (70.0 + 3.0 * jitter, 0.0, 1.0),
        Profile::Training => {
            // A checkpoint every 120 ticks, lasting 6, phase-shifted per GPU.
            let phase = (tick + key % 120) % 120;
            if phase < 6 {
                (190.0 + 20.0 * jitter, 12.0, 85.0)
            } else {
                (655.0 + 40.0 * jitter, 97.0 + 2.0 * jitter.abs(), 85.0)
            }
        }
        Profile::Inference => {
            // Request load swinging over a 300-tick "day".
            let angle = (tick + key % 300) as f64 / 300.0 * std::f64::consts::TAU;
            let base = 400.0 + 150.0 * angle.sin();
            let w = base + 35.0 * jitter;
            (w, ((w - 70.0) / 6.3).clamp(0.0, 100.0), 55.0)
        }
        Profile::Mixed => unreachable!("mixed is resolved per GPU in MockSource::new"),
    };
    let milliwatts = (watts * 1000.0).round() as u64;
    Load {
        power_milliwatts: milliwatts.clamp(IDLE_MILLIWATTS - 5_000, POWER_LIMIT_MILLIWATTS),
        utilization_percent: utilization.round().clamp(0.0, 100.0) as u32,
        memory_percent: memory as u32,
    }
}

/// Reads a counter file; a missing or unreadable one means "start fresh".
fn read_counters(path: &std::path::Path) -> Option<std::collections::HashMap<String, u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let (uuid, c) = l.split_once(' ')?;
                Some((uuid.to_string(), c.trim().parse().ok()?))
            })
            .collect(),
    )
}

impl MockSource {
    /// Writes the counter file, if there is one: a temporary file renamed
    /// over it, so a kill leaves the old counters or the new, whole.
    fn save_counters(&self) {
        let Some(path) = &self.cfg.counter_file else {
            return;
        };
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let written =
            std::fs::write(&tmp, self.counters_text()).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not save the mock counters");
        }
    }
}

impl Drop for MockSource {
    fn drop(&mut self) {
        self.save_counters();
    }
}

/// splitmix64: a small, well-studied mixing function; stable across
/// releases, unlike a general-purpose RNG crate's streams.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn uuid_from(key: u64) -> String {
    let a = splitmix64(key);
    let b = splitmix64(a);
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(profile: Profile) -> MockConfig {
        MockConfig {
            node_id: "node-1".into(),
            gpus: 8,
            profile,
            model: Model::H100,
            seed: 7,
            energy_counter: true,
            counter_file: None,
            nvlink: true,
        }
    }

    #[test]
    fn sxm_boards_report_every_nvlink_with_traffic_that_follows_the_load() {
        let mut m = MockSource::new(cfg(Profile::Mixed));
        let second = 1_000_000_000;
        let mut last = m.sample(second);
        for t in 2..=700 {
            let now = m.sample(t * second);
            for (a, b) in last.iter().zip(&now) {
                let h = &b.health;
                assert_eq!(h.nvlink_active_links, Some(MOCK_NVLINKS));
                assert_eq!(h.nvlinks.len(), MOCK_NVLINKS as usize);
                for (x, y) in a.health.nvlinks.iter().zip(&h.nvlinks) {
                    // Counters never go back.
                    assert!(y.transmit_bytes >= x.transmit_bytes);
                    assert!(y.receive_bytes >= x.receive_bytes);
                    assert!(y.replay >= x.replay);
                    assert_eq!((y.recovery, y.crc_data), (Some(0), Some(0)));
                }
            }
            last = now;
        }
        let sent = |r: &GpuReading| r.health.nvlinks[0].transmit_bytes.unwrap();
        // Mixed: GPUs 0 and 1 train, 2 serves, 3 idles.
        assert!(sent(&last[0]) > 2_000_000_000_000, "{}", sent(&last[0]));
        assert!(sent(&last[2]) > 0 && sent(&last[2]) < sent(&last[0]) / 3);
        assert_eq!(sent(&last[3]), 0, "an idle GPU sends nothing");
        let replays: u64 = last
            .iter()
            .map(|r| r.health.nvlinks[0].replay.unwrap())
            .sum();
        let seeing = m.gpus.iter().filter(|g| g.key % 8 == 3).count() as u64;
        assert!(seeing > 0, "no GPU of this node sees replays");
        assert_eq!(replays, seeing, "one replay per 600 samples where seen");
    }

    #[test]
    fn pcie_boards_have_no_nvlink_readings() {
        let mut m = MockSource::new(MockConfig {
            nvlink: false,
            ..cfg(Profile::Training)
        });
        for r in m.sample(1_000_000_000) {
            assert_eq!(r.health.nvlink_active_links, None);
            assert!(r.health.nvlinks.is_empty());
        }
    }

    #[test]
    fn one_gpu_of_the_node_counts_an_application_xid_every_1800_samples() {
        let mut m = MockSource::new(cfg(Profile::Mixed));
        let xid = |r: &GpuReading| r.health.xid_errors.get(&MOCK_XID).copied();
        let first = m.sample(5);
        let with: Vec<usize> = first
            .iter()
            .enumerate()
            .filter(|(_, r)| xid(r).is_some())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(with.len(), 1);
        let g = with[0];
        assert_eq!(xid(&first[g]), Some(1));
        assert_eq!(first[g].health.last_xid, Some((MOCK_XID, 5)));
        for k in 2..=MOCK_XID_EVERY {
            let r = m.sample(5 + k as i64);
            assert_eq!(xid(&r[g]), Some(1));
            assert_eq!(r[g].health.last_xid, Some((MOCK_XID, 5)), "kept at {k}");
        }
        let r = m.sample(9_999);
        assert_eq!(xid(&r[g]), Some(2));
        assert_eq!(r[g].health.last_xid, Some((MOCK_XID, 9_999)));
    }

    #[test]
    fn same_seed_same_readings() {
        let mut a = MockSource::new(cfg(Profile::Mixed));
        let mut b = MockSource::new(cfg(Profile::Mixed));
        assert_eq!(a.inventory(), b.inventory());
        for k in 0..50 {
            let at = 1_000_000_000 * k;
            assert_eq!(a.sample(at), b.sample(at));
        }
    }

    #[test]
    fn counter_is_the_exact_integral_of_reported_power() {
        let mut m = MockSource::new(cfg(Profile::Mixed));
        let interval = 333_333_337i64; // deliberately not a whole millisecond
        let first = m.sample(0);
        let mut integral = vec![0u128; first.len()];
        let mut last = first.clone();
        for k in 1..2000 {
            let r = m.sample(interval * k);
            for (i, g) in r.iter().enumerate() {
                integral[i] += u128::from(g.power_milliwatts.unwrap()) * interval as u128;
            }
            last = r;
        }
        for (i, g) in last.iter().enumerate() {
            let delta = g.energy_millijoules.unwrap() - first[i].energy_millijoules.unwrap();
            assert_eq!(u128::from(delta), integral[i] / 1_000_000_000, "gpu {i}");
        }
    }

    #[test]
    fn power_stays_within_the_board_range() {
        for profile in [
            Profile::Training,
            Profile::Inference,
            Profile::Idle,
            Profile::Mixed,
        ] {
            let mut m = MockSource::new(cfg(profile));
            for k in 0..600 {
                for g in m.sample(k * 1_000_000_000) {
                    let p = g.power_milliwatts.unwrap();
                    assert!((65_000..=700_000).contains(&p), "{profile:?}: {p} mW");
                    assert!(g.utilization_percent.unwrap() <= 100);
                }
            }
        }
    }

    #[test]
    fn training_has_checkpoint_dips() {
        let mut m = MockSource::new(cfg(Profile::Training));
        let powers: Vec<u64> = (0..240)
            .map(|k| m.sample(k * 1_000_000_000)[0].power_milliwatts.unwrap())
            .collect();
        assert!(powers.iter().any(|p| *p < 250_000));
        assert!(powers.iter().filter(|p| **p > 600_000).count() > 200);
    }

    #[test]
    fn without_counter_energy_is_absent_not_zero() {
        let mut c = cfg(Profile::Idle);
        c.energy_counter = false;
        let mut m = MockSource::new(c);
        assert!(!m.inventory()[0].energy_counter_supported);
        assert_eq!(m.sample(0)[0].energy_millijoules, None);
    }

    #[test]
    fn near_the_limit_the_power_cap_holds_clocks_and_its_time_is_counted() {
        let mut m = MockSource::new(cfg(Profile::Training));
        let second = 1_000_000_000;
        let mut capped = 0u64;
        let mut last = Vec::new();
        for k in 0..600 {
            let r = m.sample(k * second as i64);
            for g in &r {
                let reasons = g.health.clock_event_reasons.unwrap();
                let p = g.power_milliwatts.unwrap();
                assert_eq!(reasons & REASON_SW_POWER_CAP != 0, p >= 665_000, "{p} mW");
                // The first sample has no interval before it.
                if k > 0 && p >= 665_000 {
                    capped += second;
                }
                let instant = g.health.power_instant_milliwatts.unwrap();
                assert!(instant.abs_diff(p) <= p * 3 / 100, "{instant} vs {p}");
                assert_eq!(g.health.power_average_milliwatts, Some(p));
                assert_eq!(g.health.fan_speed_percent, None);
            }
            last = r;
        }
        let counted: u64 = last
            .iter()
            .map(|g| g.health.power_violation_nanoseconds.unwrap())
            .sum();
        assert_eq!(counted, capped);
        assert!(capped > 0, "training reaches the cap");
        // An idle GPU is idle, not capped.
        let mut idle = MockSource::new(cfg(Profile::Idle));
        let r = idle.sample(0);
        assert_eq!(r[0].health.clock_event_reasons, Some(REASON_GPU_IDLE));
    }

    #[test]
    fn uuids_are_distinct_per_node_and_gpu() {
        let a = MockSource::new(cfg(Profile::Idle));
        let mut other = cfg(Profile::Idle);
        other.node_id = "node-2".into();
        let b = MockSource::new(other);
        let mut all: Vec<&str> = a
            .inventory()
            .iter()
            .chain(b.inventory())
            .map(|g| g.uuid.as_str())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 16);
    }
}
