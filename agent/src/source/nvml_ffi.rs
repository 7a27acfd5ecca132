//! The NVML calls of the MIG inventory that nvml-wrapper 0.13 does not
//! wrap: a MIG device's GPU instance id and compute instance id. The only
//! module of the agent that allows `unsafe` code.
#![allow(unsafe_code)]

use std::os::raw::c_uint;

use nvml_wrapper::error::{NvmlError, nvml_sym, nvml_try};
use nvml_wrapper::{Device, Nvml};

/// Which id of a MIG device to read.
#[derive(Debug, Clone, Copy)]
pub enum InstanceId {
    /// `nvmlDeviceGetGpuInstanceId`.
    Gpu,
    /// `nvmlDeviceGetComputeInstanceId`.
    Compute,
}

/// `id` of the MIG device `device`, a handle from
/// `Device::mig_device_by_index` on `nvml`. A driver without the function
/// answers `FailedToLoadSymbol`.
pub fn instance_id(nvml: &Nvml, device: &Device<'_>, id: InstanceId) -> Result<u32, NvmlError> {
    let lib = nvml.lib();
    let sym = match id {
        InstanceId::Gpu => nvml_sym(lib.nvmlDeviceGetGpuInstanceId.as_ref())?,
        InstanceId::Compute => nvml_sym(lib.nvmlDeviceGetComputeInstanceId.as_ref())?,
    };
    let mut out: c_uint = 0;
    // SAFETY: `handle` is a live device handle of this `nvml` (the device
    // borrows it, so the library is initialised and loaded), and `sym` is
    // the function nvml.h declares as
    // `nvmlReturn_t f(nvmlDevice_t device, unsigned int *id)`, given a
    // pointer to a local that outlives the call.
    let code = unsafe { sym(device.handle(), &mut out) };
    nvml_try(code)?;
    Ok(out)
}
