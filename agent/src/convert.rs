//! Domain types to wire types: the one place the agent builds protobufs.

use capwatch_proto::v1 as pb;

use crate::source::{GpuInfo, GpuReading};

pub fn gpu_info(g: &GpuInfo) -> pb::GpuInfo {
    pb::GpuInfo {
        index: g.index,
        uuid: g.uuid.clone(),
        model: g.model.clone(),
        power_limit_milliwatts: g.power_limit_milliwatts,
        memory_total_bytes: g.memory_total_bytes,
        energy_counter_supported: g.energy_counter_supported,
    }
}

pub fn gpu_sample(r: GpuReading) -> pb::GpuSample {
    pb::GpuSample {
        index: r.index,
        power_milliwatts: r.power_milliwatts,
        energy_millijoules: r.energy_millijoules,
        utilization_percent: r.utilization_percent,
        memory_utilization_percent: r.memory_utilization_percent,
        memory_used_bytes: r.memory_used_bytes,
        temperature_celsius: r.temperature_celsius,
        sm_clock_mhz: r.sm_clock_mhz,
        power_limit_milliwatts: r.power_limit_milliwatts,
        lost: r.lost,
    }
}
