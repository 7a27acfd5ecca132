//! Domain types of samples, and their conversion from the wire: the one
//! place the collector reads protobufs.
//!
//! *Boundary:* everything here comes from an agent and is checked before it
//! reaches [`crate::state`]: a field that fails a check rejects its whole
//! sample (never the batch), with a [`Reject`] reason that labels
//! `capwatch_collector_samples_total{outcome="rejected"}`.

use std::time::Duration;

use capwatch_proto::v1 as pb;

use crate::state::{GpuInfo, Hello, HelloError};

/// Why a sample was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// A GPU index not in the stream's inventory, or twice in one sample.
    GpuIndex = 0,
    /// Utilization outside 0-100 %.
    Utilization = 1,
    /// Power above three times the GPU's limit.
    Power = 2,
    /// A timestamp at or before the Unix epoch.
    Timestamp = 3,
    /// Sequence number 0.
    Sequence = 4,
    /// A field that cannot be read (e.g. a non-finite host figure).
    Malformed = 5,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::GpuIndex => "gpu_index",
            Reject::Utilization => "utilization",
            Reject::Power => "power",
            Reject::Timestamp => "timestamp",
            Reject::Sequence => "sequence",
            Reject::Malformed => "malformed",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuReading {
    pub index: u32,
    pub power_milliwatts: Option<u64>,
    pub energy_millijoules: Option<u64>,
    pub utilization_percent: Option<u32>,
    pub memory_utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_celsius: Option<i32>,
    pub sm_clock_mhz: Option<u32>,
    pub power_limit_milliwatts: Option<u64>,
    pub lost: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostReading {
    pub cpu_utilization_ratio: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeSample {
    pub seq: u64,
    pub timestamp_unix_nanos: i64,
    pub gpus: Vec<GpuReading>,
    pub host: Option<HostReading>,
}

/// Largest integer the ledger stores (SQLite INTEGER is an i64).
pub const MAX_STORED: u64 = i64::MAX as u64;

/// Converts a Hello. Samples name a GPU by its `index`, which must be its
/// position in the inventory (0..n-1 in order); any other numbering is
/// refused rather than reinterpreted.
pub fn hello(h: pb::Hello) -> Result<Hello, HelloError> {
    if let Some((position, g)) = h
        .gpus
        .iter()
        .enumerate()
        .find(|(p, g)| u32::try_from(*p).ok() != Some(g.index))
    {
        return Err(HelloError::GpuIndex {
            position,
            index: g.index,
        });
    }
    Ok(Hello {
        node_id: h.node_id,
        agent_version: h.agent_version,
        epoch: h.stream_epoch,
        interval: Duration::from_millis(u64::from(h.interval_millis.clamp(10, 3_600_000))),
        gpus: h
            .gpus
            .into_iter()
            .map(|g| GpuInfo {
                uuid: g.uuid,
                model: g.model,
                power_limit_milliwatts: g.power_limit_milliwatts,
                memory_total_bytes: g.memory_total_bytes,
                energy_counter_supported: g.energy_counter_supported,
            })
            .collect(),
    })
}

/// Converts and checks one sample on its own; checks that need the node's
/// inventory happen in [`crate::state`].
pub fn sample(s: pb::NodeSample) -> Result<NodeSample, (u64, Reject)> {
    let seq = s.seq;
    // The ledger stores integers as SQLite's i64: larger values are
    // refused here rather than failing a commit for the whole fleet.
    if seq == 0 || seq > MAX_STORED {
        return Err((seq.min(MAX_STORED), Reject::Sequence));
    }
    let mut gpus = Vec::with_capacity(s.gpus.len());
    for g in s.gpus {
        if g.energy_millijoules.is_some_and(|e| e > MAX_STORED) {
            return Err((seq, Reject::Malformed));
        }
        let pct_ok = |v: Option<u32>| v.is_none_or(|v| v <= 100);
        if !pct_ok(g.utilization_percent) || !pct_ok(g.memory_utilization_percent) {
            return Err((seq, Reject::Utilization));
        }
        let reading = if g.lost {
            GpuReading {
                index: g.index,
                lost: true,
                ..GpuReading::default()
            }
        } else {
            GpuReading {
                index: g.index,
                power_milliwatts: g.power_milliwatts,
                energy_millijoules: g.energy_millijoules,
                utilization_percent: g.utilization_percent,
                memory_utilization_percent: g.memory_utilization_percent,
                memory_used_bytes: g.memory_used_bytes,
                temperature_celsius: g.temperature_celsius,
                sm_clock_mhz: g.sm_clock_mhz,
                power_limit_milliwatts: g.power_limit_milliwatts,
                lost: false,
            }
        };
        gpus.push(reading);
    }
    let host = match s.host {
        None => None,
        Some(h) => {
            let cpu = match h.cpu_utilization_percent {
                Some(c) if !c.is_finite() || !(0.0..=100.0).contains(&c) => {
                    return Err((seq, Reject::Malformed));
                }
                c => c.map(|c| f64::from(c) / 100.0),
            };
            Some(HostReading {
                cpu_utilization_ratio: cpu,
                memory_used_bytes: h.memory_used_bytes,
                memory_total_bytes: h.memory_total_bytes,
            })
        }
    };
    Ok(NodeSample {
        seq,
        timestamp_unix_nanos: s.timestamp_unix_nanos,
        gpus,
        host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_beyond_the_ledger_are_refused_at_the_edge() {
        // (sample, expected rejection)
        let gpu = |energy| pb::GpuSample {
            energy_millijoules: Some(energy),
            ..Default::default()
        };
        let cases = [
            (
                pb::NodeSample {
                    seq: 0,
                    ..Default::default()
                },
                (0, Reject::Sequence),
            ),
            (
                pb::NodeSample {
                    seq: u64::MAX,
                    ..Default::default()
                },
                (MAX_STORED, Reject::Sequence),
            ),
            (
                pb::NodeSample {
                    seq: 7,
                    gpus: vec![gpu(MAX_STORED + 1)],
                    ..Default::default()
                },
                (7, Reject::Malformed),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(sample(s).err(), Some(want));
        }
        let ok = pb::NodeSample {
            seq: 7,
            timestamp_unix_nanos: 1,
            gpus: vec![gpu(MAX_STORED)],
            host: None,
        };
        assert!(sample(ok).is_ok());
    }
}
