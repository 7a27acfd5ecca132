//! Tenant and auth files changing while the collector runs: reloaded on
//! SIGHUP (task `reloader`), and a tenant file whose `effective_from` lies
//! ahead put in force when its time comes (task `leases`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tracing::info;

use crate::config::Config;
use crate::state::State;
use crate::sync;
use crate::tenants::Tenants;
use crate::{events, ledger};

use super::{load_auth, load_tenants};

/// Puts a tenant file loaded with a future `effective_from` in force once
/// its time has come; checked every second. Named task: `leases`.
pub(super) async fn advance_leases(state: Arc<State>, shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = capwatch_common::wait_for_shutdown(shutdown);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => state.advance_tenants(),
            _ = &mut stop => return,
        }
    }
}

/// Puts a reloaded tenant file in force, after recording it in the ledger
/// (a file that could not be recorded is not used: after a restart the
/// ledger would not know when it took effect). A file identical to the
/// latest version changes nothing.
async fn record_and_reload(
    state: &Arc<State>,
    ledger: &Arc<std::sync::Mutex<ledger::AnyWriter>>,
    t: Tenants,
) {
    let history = state.tenant_history();
    let latest = history.latest();
    if latest.source() == t.source() {
        state.counters.reloads_ok.fetch_add(1, Ordering::Relaxed);
        state.readiness.reload_succeeded();
        info!(task = "reloader", "tenant file unchanged");
        return;
    }
    let now = sync::unix_nanos_now();
    let version = ledger::TenantVersion {
        effective_from_ns: t.effective_from_ns().unwrap_or(now),
        loaded_at_ns: now,
        file: t.source().to_string(),
    };
    let from = version.effective_from_ns;
    let ledger = ledger.clone();
    let recorded =
        tokio::task::spawn_blocking(move || sync::lock(&ledger).add_tenant_version(&version))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
    match recorded {
        Ok(()) => {
            state.reload_tenants_from(t, from);
            state.readiness.reload_succeeded();
        }
        Err(e) => {
            events::ReloadFailed {
                what: events::ReloadFailure::TenantVersion,
                error: &e,
            }
            .emit(&state.counters);
            state.readiness.reload_failed(&e);
        }
    }
}

/// Reloads the tenant file on SIGHUP; a bad file keeps the old one. Named
/// task: `reloader`.
pub(super) async fn reload_on_sighup(
    state: Arc<State>,
    ledger: Arc<std::sync::Mutex<ledger::AnyWriter>>,
    cfg: Config,
    mut hup: tokio::signal::unix::Signal,
    shutdown: watch::Receiver<bool>,
) {
    let stop = capwatch_common::wait_for_shutdown(shutdown);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match load_tenants(&cfg) {
                    Ok(t) => record_and_reload(&state, &ledger, t).await,
                    Err(e) => {
                        events::ReloadFailed {
                            what: events::ReloadFailure::TenantFile,
                            error: &e,
                        }
                        .emit(&state.counters);
                        state.readiness.reload_failed(&e);
                    }
                }
                // Token rotation: the auth file is re-read with the tenants.
                match load_auth(&cfg) {
                    Ok(_) if cfg.auth_file.is_none() => {}
                    Ok(a) => {
                        state.set_auth(a);
                        info!(task = "reloader", "auth file reloaded");
                    }
                    Err(e) => {
                        events::ReloadFailed {
                            what: events::ReloadFailure::AuthFile,
                            error: &e,
                        }
                        .emit(&state.counters);
                    }
                }
            }
            _ = &mut stop => return,
        }
    }
}
