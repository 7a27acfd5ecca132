//! The edge: everything an agent sends is converted and checked here, and
//! nowhere else. Domain types of Hellos and samples, their conversion from
//! the wire (the one place the collector reads protobufs), and the limits
//! that bound them.
//!
//! *Boundary:* the domain code (`fleet`, `billing`, `accounting`) only
//! sees values that passed these checks. A Hello is admitted only as a
//! [`Checked`] one, which only [`check_hello`] makes. A field of a sample
//! that fails a check rejects its whole sample (never the batch), with a
//! [`Reject`] reason that labels
//! `capwatch_collector_samples_total{outcome="rejected"}`; the checks that
//! need the node's inventory are [`check_sample`], called by the fleet
//! with what it knows of the node.

use std::sync::Arc;
use std::time::Duration;

use capwatch_proto::v1 as pb;

/// Largest step between sequence numbers: more than any spool holds.
pub const MAX_SEQ_JUMP: u64 = 10_000_000;

/// Longest interval whose energy is spread over minute buckets; a longer
/// one (a GPU back after weeks) is spread over its last seven days, so one
/// reading cannot create an unbounded number of buckets.
pub const MAX_SPREAD: Duration = Duration::from_secs(7 * 86_400);

/// Largest power limit accepted from an agent: 10 kW, above any GPU board.
pub const MAX_POWER_LIMIT_MILLIWATTS: u64 = 10_000_000;

/// A string that ends up in a label: at most 128 bytes, no control
/// characters, at least `min` bytes.
fn label_ok(s: &str, min: usize) -> bool {
    (min..=128).contains(&s.len()) && !s.chars().any(char::is_control)
}

/// Whether `id` may name a node: 1-253 bytes, no control characters.
pub fn node_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 253 && !id.chars().any(char::is_control)
}

/// A value that passed the edge's checks; only this module makes one.
#[derive(Debug, Clone)]
pub struct Checked<T>(T);

impl<T> Checked<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Checked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Static facts about a GPU, from the Hello.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub uuid: String,
    pub model: String,
    pub power_limit_milliwatts: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub energy_counter_supported: bool,
}

#[derive(Debug, Clone)]
pub struct Hello {
    pub node_id: String,
    pub agent_version: String,
    pub epoch: u64,
    pub interval: Duration,
    pub gpus: Vec<GpuInfo>,
}

/// Why a Hello was refused: the first six variants by the edge's checks,
/// the rest by the fleet (the node's epoch, GPU leases and holders). One
/// type, so that the agent hears one kind of answer.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("node id must be 1-253 printable characters")]
    NodeId,
    #[error("inventory of {got} GPUs exceeds the limit of {max}")]
    TooManyGpus { got: usize, max: u32 },
    #[error("GPU {index}: {reason}")]
    Gpu { index: usize, reason: &'static str },
    #[error(
        "gpus[{position}].index is {index}: GPU indexes must be 0..n-1 in inventory order (samples refer to GPUs by index)"
    )]
    GpuIndex { position: usize, index: u32 },
    #[error("agent version must be at most 128 printable characters")]
    AgentVersion,
    #[error("stream epoch must be below 2^63")]
    Epoch,
    /// The node already streams (or streamed) under a newer epoch: the
    /// agent must say Hello again with an epoch above `current`.
    #[error(
        "stream epoch {got} is older than the node's current epoch {current}{}; say Hello again with an epoch above it",
        .connected.then_some(", whose stream is still connected").unwrap_or_default()
    )]
    StaleEpoch {
        got: u64,
        current: u64,
        /// Whether a stream of the current epoch is connected now.
        connected: bool,
    },
    #[error(
        "GPU {uuid} is leased to tenant {tenant:?} on node {allowed:?} only; node {node:?} may not report it"
    )]
    GpuLeasedElsewhere {
        uuid: String,
        tenant: Arc<str>,
        allowed: String,
        node: String,
    },
    #[error(
        "GPU {uuid}, leased to tenant {tenant:?}, is held by node {holder:?}, which is connected; node {node:?} may report it once that node's stream has ended or its inventory no longer lists it"
    )]
    GpuHeldElsewhere {
        uuid: String,
        tenant: Arc<str>,
        holder: Arc<str>,
        node: String,
    },
}

/// Checks a Hello against the limits: node id, inventory size
/// (`max_gpus`), labels, epoch, power limits and unique UUIDs.
pub fn check_hello(hello: Hello, max_gpus: u32) -> Result<Checked<Hello>, HelloError> {
    if !node_id_ok(&hello.node_id) {
        return Err(HelloError::NodeId);
    }
    if hello.gpus.len() > max_gpus as usize {
        return Err(HelloError::TooManyGpus {
            got: hello.gpus.len(),
            max: max_gpus,
        });
    }
    if !label_ok(&hello.agent_version, 0) {
        return Err(HelloError::AgentVersion);
    }
    if hello.epoch > MAX_STORED {
        return Err(HelloError::Epoch);
    }
    for (index, g) in hello.gpus.iter().enumerate() {
        if !label_ok(&g.uuid, 1) {
            return Err(HelloError::Gpu {
                index,
                reason: "UUID must be 1-128 printable characters",
            });
        }
        if !label_ok(&g.model, 0) {
            return Err(HelloError::Gpu {
                index,
                reason: "model must be at most 128 printable characters",
            });
        }
        if g.power_limit_milliwatts
            .is_some_and(|l| l == 0 || l > MAX_POWER_LIMIT_MILLIWATTS)
        {
            return Err(HelloError::Gpu {
                index,
                reason: "power limit must be between 1 mW and 10 kW",
            });
        }
        if hello.gpus[..index].iter().any(|o| o.uuid == g.uuid) {
            return Err(HelloError::Gpu {
                index,
                reason: "UUID appears twice in the inventory",
            });
        }
    }
    Ok(Checked(hello))
}

/// Checks a sample against the node's inventory (`gpus` GPUs, the power
/// limit of GPU `i` as the node knows it by `limit_of(i)`) and the
/// timestamps a sample may carry now: after `oldest_timestamp` (and the
/// Unix epoch), at most `latest_timestamp`.
#[inline]
pub fn check_sample(
    s: &NodeSample,
    gpus: usize,
    limit_of: impl Fn(usize) -> Option<u64>,
    latest_timestamp: i64,
    oldest_timestamp: i64,
) -> Result<(), Reject> {
    if s.timestamp_unix_nanos <= oldest_timestamp.max(0)
        || s.timestamp_unix_nanos > latest_timestamp
    {
        return Err(Reject::Timestamp);
    }
    let mut seen = vec![false; gpus];
    for r in &s.gpus {
        let i = r.index as usize;
        if i >= gpus || std::mem::replace(&mut seen[i], true) {
            return Err(Reject::GpuIndex);
        }
        let limit = match (r.power_limit_milliwatts, limit_of(i)) {
            (Some(l), _) if l == 0 || l > MAX_POWER_LIMIT_MILLIWATTS => return Err(Reject::Power),
            (a, b) => a.max(b),
        };
        if let Some(p) = r.power_milliwatts {
            // Three times the board limit (the larger of the announced and
            // the current one: limits change at run time), or 3 kW when
            // the limit is unknown.
            if p > limit.map_or(3_000_000, |l| l * 3) {
                return Err(Reject::Power);
            }
        }
    }
    Ok(())
}

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

/// Converts a Hello (checked by [`check_hello`] when the fleet admits
/// it). Samples name a GPU by its `index`, which must be its
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

/// Converts and checks one sample on its own; the checks that need the
/// node's inventory are [`check_sample`].
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
            node_power: Vec::new(),
            seq: 7,
            timestamp_unix_nanos: 1,
            gpus: vec![gpu(MAX_STORED)],
            host: None,
        };
        assert!(sample(ok).is_ok());
    }
}
