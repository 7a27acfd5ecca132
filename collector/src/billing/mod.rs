//! Billing: what the fleet's readings book into the ledger. The minute
//! buckets of one batch (`booking`), the commit being gathered and the
//! per-tenant totals (`pending`). What writes it to the ledger is
//! [`persist`](crate::persist).

pub mod booking;
pub mod pending;

pub use booking::Booking;
pub use pending::{Billing, TenantTotals};
