//! Billing: what moves bookings from the streams into the ledger and keeps
//! the ledger compact.

pub mod committer;
pub mod compactor;
