//! The collector's integration tests, one test binary with a module per
//! area (as rust-analyzer lays out its slow tests): the support code and
//! the dependencies are compiled and linked once, not once per file.
//!
//! Run one area with `cargo test -p capwatch-collector --test it cli::`
//! (any module name, or a test's name); snapshots of long outputs are
//! rewritten with `UPDATE_EXPECT=1` (see `snapshots/`).
//!
//! None of these tests changes the test process's environment, current
//! directory or signal handling, and every listener binds port 0: they
//! can run as threads of one process.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

mod support;

mod backup;
mod cli;
mod demo;
mod deploy;
mod e2e;
mod faults;
mod fuzz;
mod ha;
mod health;
mod http_abuse;
mod http_api;
mod ledger_safety;
mod meters;
mod multi;
mod node_power;
mod nvml_e2e;
mod openapi;
mod postgres;
mod retire;
mod security;
mod self_metrics;
mod status_page;
mod streams;
