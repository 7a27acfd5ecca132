//! The NVML calls that nvml-wrapper 0.13 does not wrap: a MIG device's
//! GPU instance id and compute instance id, and field values of one
//! NVLink link (nvml-wrapper's `field_values_for` leaves every value's
//! `scopeId`, which names the link, at 0). The only module of the agent
//! that allows `unsafe` code.
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

/// NVML's `NVML_VALUE_TYPE_UNSIGNED_INT` and `_UNSIGNED_LONG_LONG`.
const VALUE_UNSIGNED_INT: u32 = 1;
const VALUE_UNSIGNED_LONG_LONG: u32 = 3;

/// The field values `ids` of `device`'s NVLink `link` (each value's
/// `scopeId`), in the order asked: each an unsigned value, or why NVML
/// gave none (a value of another type is `UnexpectedVariant`). A driver
/// without the function answers `FailedToLoadSymbol`.
pub fn link_field_values(
    nvml: &Nvml,
    device: &Device<'_>,
    link: u32,
    ids: &[u32],
) -> Result<Vec<Result<u64, NvmlError>>, NvmlError> {
    let sym = nvml_sym(nvml.lib().nvmlDeviceGetFieldValues.as_ref())?;
    let mut values: Vec<nvml_wrapper_sys::bindings::nvmlFieldValue_t> = ids
        .iter()
        .map(|&id| {
            // SAFETY: nvmlFieldValue_t is a C struct of integers and a
            // union of numbers: all-zero bytes are a valid value of it.
            let mut v: nvml_wrapper_sys::bindings::nvmlFieldValue_t = unsafe { std::mem::zeroed() };
            v.fieldId = id;
            v.scopeId = link;
            v
        })
        .collect();
    let count = std::os::raw::c_int::try_from(values.len()).map_err(|_| NvmlError::InvalidArg)?;
    // SAFETY: `handle` is a live device handle of this `nvml` (the device
    // borrows it), `sym` is `nvmlReturn_t f(nvmlDevice_t, int,
    // nvmlFieldValue_t *)` as nvml.h declares it, and `values` holds
    // `count` initialised entries that outlive the call.
    let code = unsafe { sym(device.handle(), count, values.as_mut_ptr()) };
    nvml_try(code)?;
    Ok(values
        .iter()
        .map(|v| {
            nvml_try(v.nvmlReturn)?;
            // SAFETY: the union member read is the one `valueType` names.
            match v.valueType {
                VALUE_UNSIGNED_INT => Ok(u64::from(unsafe { v.value.uiVal })),
                VALUE_UNSIGNED_LONG_LONG => Ok(unsafe { v.value.ullVal }),
                other => Err(NvmlError::UnexpectedVariant(other)),
            }
        })
        .collect())
}
