//! NVLink readings: which links are active, and each active link's
//! data-link error counters.
//!
//! The links a GPU has are found once, when the source opens
//! ([`probe`]): every link index below `NVML_NVLINK_MAX_LINKS` whose state
//! NVML answers. A GPU that answers for none (a PCIe board, a driver
//! without `nvmlDeviceGetNvLinkState`) has no NVLink and costs nothing on
//! later ticks. On each tick ([`read`]) the agent asks each of the GPU's
//! links for its state and each active one for its four error counters:
//! at most 18 × 5 calls per GPU, each a driver query like the other
//! health readings (NVML keeps these counters; nothing is computed here).
//!
//! Throughput: each active link's data sent and received
//! (`NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX` / `_RX`, cumulative KiB, sent
//! as bytes), one `nvmlDeviceGetFieldValues` call per link. NVML selects
//! the link by each value's `scopeId`, which nvml-wrapper 0.13's
//! `field_values_for` leaves at 0 (link 0 alone), so the call is the
//! agent's own (`nvml_ffi::link_field_values`).

use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
};
use nvml_wrapper::{Device, Nvml};
use tracing::info;

use super::{Lost, NvmlSource, Reported};
use crate::source::nvml_ffi::link_field_values;
use crate::source::{NvLinkErrors, ReadErrors};

/// NVML's `NVML_NVLINK_MAX_LINKS`; the collector's bound too.
pub const MAX_LINKS: u32 = capwatch_proto::limits::MAX_NVLINKS;

/// `NVML_NVLINK_STATE_SLEEP`: a link in a low-power state.
const STATE_SLEEP: u32 = 2;

/// The links of `device` (NVML index `index`), in ascending order: every
/// link index below [`MAX_LINKS`] whose state NVML answers, or fails to
/// answer for another reason than that the link does not exist (an
/// unknown error at start must not hide a link for the agent's life).
/// Empty on a GPU without NVLink. Logged once.
pub(super) fn probe(device: &Device<'_>, index: u32) -> Vec<u32> {
    let mut links = Vec::new();
    let mut no_link = None;
    for link in 0..MAX_LINKS {
        match device.link_wrapper_for(link).is_active() {
            Err(e @ (NvmlError::NotSupported | NvmlError::InvalidArg)) => {
                no_link.get_or_insert(e);
            }
            // An older driver without the function: as not supported.
            Err(e @ NvmlError::FailedToLoadSymbol(_)) => {
                no_link.get_or_insert(e);
                break;
            }
            _ => links.push(link),
        }
    }
    match (links.len(), no_link) {
        (0, Some(e)) => {
            info!(gpu = index, reason = %e, "no NVLink: no NVLink series for this GPU");
        }
        (n, _) => info!(gpu = index, links = n, "NVLink links found"),
    }
    links
}

/// The active-link count and the active links' error counters, each
/// counter absent where it cannot be read; nothing without NVLink, and
/// nothing on a tick where a link's state cannot be read (a count that
/// left a link out would read as a link down). `Err(Lost)` when the GPU
/// is lost.
pub(super) fn read(
    r: &mut Reported,
    e: &ReadErrors,
    index: u32,
    nvml: &Nvml,
    device: &Device<'_>,
    links: &[u32],
) -> Result<(Option<u32>, Vec<NvLinkErrors>), Lost> {
    if links.is_empty() {
        return Ok((None, Vec::new()));
    }
    let mut active = 0u32;
    let mut counters = Vec::new();
    for &link in links {
        let nvlink = device.link_wrapper_for(link);
        let state = match nvlink.is_active() {
            // NVML_NVLINK_STATE_SLEEP (newer drivers), which nvml-wrapper
            // does not know: up but idle in low power, not active.
            Err(NvmlError::UnexpectedVariant(STATE_SLEEP)) => Ok(false),
            state => state,
        };
        match NvmlSource::field(r, e, index, "nvlink_state", state)? {
            Some(true) => active += 1,
            Some(false) => continue,
            None => return Ok((None, Vec::new())),
        }
        let mut count =
            |field, counter| NvmlSource::field(r, e, index, field, nvlink.error_counter(counter));
        let mut errors = NvLinkErrors {
            link,
            replay: count("nvlink_replay_errors", ErrorCounter::DlReplay)?,
            recovery: count("nvlink_recovery_errors", ErrorCounter::DlRecovery)?,
            crc_flit: count("nvlink_crc_flit_errors", ErrorCounter::DlCrcFlit)?,
            crc_data: count("nvlink_crc_data_errors", ErrorCounter::DlCrcData)?,
            ..NvLinkErrors::default()
        };
        let ids = [
            NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
            NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
        ];
        let values = NvmlSource::field(
            r,
            e,
            index,
            "nvlink_throughput",
            link_field_values(nvml, device, link, &ids),
        )?
        .unwrap_or_default();
        let mut bytes = values.into_iter().map(|v| {
            let kib = NvmlSource::field(r, e, index, "nvlink_throughput", v)?;
            Ok(kib.map(|k: u64| k.saturating_mul(1024)))
        });
        errors.transmit_bytes = bytes.next().transpose()?.flatten();
        errors.receive_bytes = bytes.next().transpose()?.flatten();
        // A link none of whose counters could be read sends no entry.
        let unread = NvLinkErrors {
            link,
            ..NvLinkErrors::default()
        };
        if errors != unread {
            counters.push(errors);
        }
    }
    Ok((Some(active), counters))
}
