//! Moved to [`crate::edge`], the one boundary for what an agent sends;
//! re-exported here so that `capwatch_collector::model::…` still resolves.

pub use crate::edge::{GpuReading, HostReading, MAX_STORED, NodeSample, Reject, hello, sample};
