//! The mock's whole-node power: what a BMC would report for the simulated
//! node, so tests and the demo have node energy without hardware.
//!
//! Formula (integers, per sample): with `G` the sum of the GPUs' reported
//! power in mW and `n` the number of GPUs,
//!
//! ```text
//! node_mW = G + G × 15 / 100 + n × 250 000
//! ```
//!
//! `G × 15 %` stands for what scales with the GPUs' load (fans, PSU and
//! VRM losses); `250 W` per GPU for what does not (CPUs, memory, NICs,
//! drives: ~2 kW for an 8-GPU node). An 8-GPU H100 node comes to ~8.4 kW
//! in training and ~2.6 kW idle. A lost GPU adds nothing but its share of
//! the fixed part. The energy counter is the exact integral of that power,
//! kept in mW·ns, each interval at the power reported at its end (as the
//! GPU mock's counters are), sent as its floor in mJ; it starts at zero.

use std::time::Duration;

use capwatch_proto::v1 as pb;

use super::SourceInfo;
use crate::source::GpuReading;

/// Fixed node power per GPU, mW.
pub const FIXED_MILLIWATTS_PER_GPU: u64 = 250_000;
/// Load-dependent overhead on top of the GPUs' power, percent.
pub const LOAD_OVERHEAD_PERCENT: u64 = 15;

/// The node power of `gpus` simulated GPUs whose readings are `readings`.
pub fn node_milliwatts(gpus: u32, readings: &[GpuReading]) -> u64 {
    let g: u64 = readings.iter().filter_map(|r| r.power_milliwatts).sum();
    g + g * LOAD_OVERHEAD_PERCENT / 100 + u64::from(gpus) * FIXED_MILLIWATTS_PER_GPU
}

/// The simulated whole-node source.
#[derive(Debug)]
pub struct MockNodePower {
    gpus: u32,
    last_at: Option<i64>,
    integral_milliwatt_nanos: u128,
}

impl MockNodePower {
    pub fn new(gpus: u32) -> Self {
        Self {
            gpus,
            last_at: None,
            integral_milliwatt_nanos: 0,
        }
    }

    /// How the Hello lists it: read with every sample.
    pub fn info(interval: Duration) -> SourceInfo {
        SourceInfo {
            kind: "mock",
            domain: "node",
            name: "node".into(),
            energy_counter_supported: true,
            interval,
        }
    }

    /// The reading for the sample stamped `at` with these GPU readings.
    pub fn reading(&mut self, index: u32, at: i64, gpus: &[GpuReading]) -> pb::NodePowerReading {
        let mw = node_milliwatts(self.gpus, gpus);
        if let Some(last) = self.last_at {
            let dt = u128::try_from(at.saturating_sub(last)).unwrap_or(0);
            self.integral_milliwatt_nanos += dt * u128::from(mw);
        }
        self.last_at = Some(at);
        pb::NodePowerReading {
            source: index,
            timestamp_unix_nanos: at,
            power_milliwatts: Some(mw),
            energy_millijoules: Some(self.energy_millijoules()),
        }
    }

    /// The counter now, mJ.
    pub fn energy_millijoules(&self) -> u64 {
        u64::try_from(self.integral_milliwatt_nanos / 1_000_000_000).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(mw: Option<u64>) -> GpuReading {
        GpuReading {
            power_milliwatts: mw,
            ..GpuReading::default()
        }
    }

    #[test]
    fn node_power_is_the_gpus_plus_overhead_and_its_counter_exact() {
        let mut node = MockNodePower::new(2);
        let gpus = [gpu(Some(600_000)), gpu(Some(100_001))];
        // 700 001 + 105 000 + 500 000
        assert_eq!(node_milliwatts(2, &gpus), 1_305_001);
        assert_eq!(node_milliwatts(2, &[gpu(None), gpu(None)]), 500_000);
        let first = node.reading(3, 1_000_000_000, &gpus);
        assert_eq!((first.source, first.energy_millijoules), (3, Some(0)));
        // 1.5 s at 1 305 001 mW = 1 957 501.5 mJ: floor, the half kept.
        let second = node.reading(3, 2_500_000_000, &gpus);
        assert_eq!(second.energy_millijoules, Some(1_957_501));
        let third = node.reading(3, 4_000_000_000, &gpus);
        assert_eq!(third.energy_millijoules, Some(3_915_003));
        assert_eq!(third.power_milliwatts, Some(1_305_001));
    }
}
