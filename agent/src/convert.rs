//! Domain types to wire types: the one place the agent builds protobufs.

use capwatch_proto::v1 as pb;

use crate::source::{GpuHealth, GpuInfo, GpuReading, MigInstance, NvLinkErrors};

pub fn gpu_info(g: &GpuInfo) -> pb::GpuInfo {
    pb::GpuInfo {
        index: g.index,
        uuid: g.uuid.clone(),
        model: g.model.clone(),
        power_limit_milliwatts: g.power_limit_milliwatts,
        memory_total_bytes: g.memory_total_bytes,
        energy_counter_supported: g.energy_counter_supported,
        pci_bus_id: g.pci_bus_id.clone(),
        serial: g.serial.clone(),
        driver_version: g.driver_version.clone(),
        multiprocessor_count: g.multiprocessor_count,
        gpu_instance_slice_count: g.gpu_instance_slice_count,
        mig_layout_id: g.mig_layout,
        mig_instances: mig_instances(&g.mig),
        earlier_mig_layouts: g
            .earlier_mig
            .iter()
            .map(|e| pb::MigLayout {
                id: e.id,
                multiprocessor_count: e.multiprocessor_count,
                gpu_instance_slice_count: e.gpu_instance_slice_count,
                mig_instances: mig_instances(&e.mig),
            })
            .collect(),
    }
}

fn mig_instances(mig: &[MigInstance]) -> Vec<pb::MigInstance> {
    mig.iter()
        .map(|m| pb::MigInstance {
            uuid: m.uuid.clone(),
            gpu_instance_id: m.gpu_instance_id,
            compute_instance_id: m.compute_instance_id,
            multiprocessor_count: m.multiprocessor_count,
            gpu_instance_slice_count: m.gpu_instance_slice_count,
            compute_instance_slice_count: m.compute_instance_slice_count,
            profile: m.profile.clone(),
        })
        .collect()
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
        health: (!r.health.is_empty()).then(|| gpu_health(r.health)),
        mig_layout_id: r.mig_layout,
    }
}

fn gpu_health(h: GpuHealth) -> pb::GpuHealth {
    pb::GpuHealth {
        clock_event_reasons: h.clock_event_reasons,
        power_violation_nanoseconds: h.power_violation_nanoseconds,
        thermal_violation_nanoseconds: h.thermal_violation_nanoseconds,
        ecc_volatile_corrected: h.ecc_volatile_corrected,
        ecc_volatile_uncorrected: h.ecc_volatile_uncorrected,
        ecc_aggregate_corrected: h.ecc_aggregate_corrected,
        ecc_aggregate_uncorrected: h.ecc_aggregate_uncorrected,
        retired_pages_single_bit: h.retired_pages_single_bit,
        retired_pages_double_bit: h.retired_pages_double_bit,
        retired_pages_pending: h.retired_pages_pending,
        remapped_rows_correctable: h.remapped_rows_correctable,
        remapped_rows_uncorrectable: h.remapped_rows_uncorrectable,
        remapped_rows_pending: h.remapped_rows_pending,
        remapped_rows_failed: h.remapped_rows_failed,
        memory_temperature_celsius: h.memory_temperature_celsius,
        memory_clock_mhz: h.memory_clock_mhz,
        encoder_utilization_percent: h.encoder_utilization_percent,
        decoder_utilization_percent: h.decoder_utilization_percent,
        pcie_replays: h.pcie_replays,
        pcie_tx_kilobytes_per_second: h.pcie_tx_kilobytes_per_second,
        pcie_rx_kilobytes_per_second: h.pcie_rx_kilobytes_per_second,
        fan_speed_percent: h.fan_speed_percent,
        power_instant_milliwatts: h.power_instant_milliwatts,
        power_average_milliwatts: h.power_average_milliwatts,
        xid_errors: h
            .xid_errors
            .into_iter()
            .map(|(code, count)| pb::XidCount { code, count })
            .collect(),
        last_xid: h.last_xid.map(|(code, _)| code),
        last_xid_unix_nanos: h.last_xid.map(|(_, at)| at),
        // ---- NVLink ----
        nvlink_active_links: h.nvlink_active_links,
        nvlinks: h.nvlinks.into_iter().map(nvlink_errors).collect(),
    }
}

fn nvlink_errors(l: NvLinkErrors) -> pb::NvLinkErrors {
    pb::NvLinkErrors {
        link: l.link,
        replay: l.replay,
        recovery: l.recovery,
        crc_flit: l.crc_flit,
        crc_data: l.crc_data,
        transmit_bytes: l.transmit_bytes,
        receive_bytes: l.receive_bytes,
    }
}
