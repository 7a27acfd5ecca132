//! capwatch collector: accepts agent streams over gRPC, attributes every
//! GPU to a tenant, aggregates per tenant against its contract and exports
//! Prometheus metrics.
//!
//! [`run`] builds the collector ([`app::App`]) and starts long-running
//! tasks that stop on the shutdown signal: the gRPC ingest server
//! ([`ingest`]), the HTTP server ([`http`]), the ledger committer (a
//! thread) and compactor; another reloads the tenant and auth files on
//! SIGHUP, and one puts a tenant file whose `effective_from` lies ahead in
//! force when its time comes.

pub mod accounting;
pub mod app;
pub mod auth;
pub mod billing;
pub mod config;
pub mod edge;
pub mod events;
pub mod fleet;
pub mod health;
pub mod http;
pub mod ingest;
pub mod ledger;
pub mod meters;
pub mod metrics;
pub mod persist;
pub mod scrape;
pub mod serve;
pub mod state;
pub mod status;
mod sync;
pub mod tenants;
pub mod usage;

#[cfg(test)]
mod layers;

// Lets a test file written against the public API (`metrics/reference.rs`,
// shared with the benches) compile inside the crate too.
#[cfg(test)]
extern crate self as capwatch_collector;

pub use app::{CollectorError, load_auth, load_tenants, run};

pub use persist::committer::tenant_history_of;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The source revision the binary was built from (`build.rs`: the build's
/// `CAPWATCH_REVISION`, else `git rev-parse HEAD`, else "unknown").
pub const REVISION: &str = env!("CAPWATCH_REVISION");
