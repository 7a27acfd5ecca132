//! The capwatch wire protocol. Generated from `capwatch/v1/*.proto`; the
//! agent and collector convert to their own domain types at the edge.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("capwatch.v1");
}

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Bytes each stream's encode and decode buffers start with. tonic's
/// default is 8 KiB each way, which for a collector holding 25,000 agent
/// streams is 400 MiB of buffers for messages of a few hundred bytes (an
/// agent's batch at 1 Hz with 8 GPUs encodes to about 400 bytes). A larger
/// message grows its buffer as it arrives.
const BUFFER_BYTES: usize = 512;

/// When an encoding stream yields to the runtime (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The protobuf codec of every capwatch RPC: tonic-prost's encoder and
/// decoder with small starting buffers.
#[derive(Debug, Clone, Copy)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}

/// Bounds both ends agree on: the agent keeps within them, the collector
/// rejects a sample outside them.
pub mod limits {
    /// Distinct XID codes one GPU may report (`GpuHealth.xid_errors`).
    pub const MAX_XID_CODES: usize = 64;
    /// The XID codes accepted: NVIDIA's XIDs are small positive numbers,
    /// and 999 is NVML's "unknown XID".
    pub const XID_CODES: std::ops::RangeInclusive<u32> = 1..=999;

    // ---- NVLink ----
    /// NVLink links one GPU may have (`GpuHealth.nvlinks` indexes are
    /// below it): NVML's `NVML_NVLINK_MAX_LINKS`, 18 on Hopper.
    pub const MAX_NVLINKS: u32 = 18;
}
