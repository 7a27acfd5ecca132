//! capwatch collector: accepts agent streams over gRPC, attributes every
//! GPU to a tenant, aggregates per tenant against its contract and exports
//! Prometheus metrics.
//!
//! [`run`] starts long-running tasks that stop on the shutdown signal: the
//! gRPC ingest server ([`ingest`]), the HTTP server ([`http`]), the ledger
//! committer (a thread) and compactor; another reloads the tenant and auth
//! files on SIGHUP, and one puts a tenant file whose `effective_from` lies
//! ahead in force when its time comes.

pub mod accounting;
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
pub mod metrics;
pub mod model;
pub mod scrape;
pub mod serve;
pub mod state;
pub mod status;
mod sync;
pub mod tenants;
pub mod usage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{error, info, warn};

use capwatch_proto::v1::ingest_server::IngestServer;

use config::Config;
use state::{State, StateConfig};
use tenants::Tenants;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("binding {what} on {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("listening for SIGHUP: {error}")]
    Signal { error: std::io::Error },
    #[error("{what} server: {error}")]
    Serve {
        what: &'static str,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Loads the tenant file named by `cfg`, or no tenants.
pub fn load_tenants(cfg: &Config) -> Result<Tenants, config::ConfigError> {
    match &cfg.tenants_file {
        Some(path) => Tenants::from_file(path),
        None => Ok(Tenants::empty()),
    }
}

/// Reads the auth file, if any.
pub fn load_auth(cfg: &Config) -> Result<auth::Auth, config::ConfigError> {
    match &cfg.auth_file {
        Some(path) => auth::Auth::from_file(path),
        None => Ok(auth::Auth::default()),
    }
}

/// The gRPC server's TLS settings, if TLS is on.
fn server_tls(cfg: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>, CollectorError> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path)
            .map_err(|e| CollectorError::Tls(format!("reading {}: {e}", path.display())))
    };
    capwatch_common::warn_if_exposed(key, "tls_key");
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
    );
    if let Some(ca) = &cfg.tls_client_ca {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// Runs the collector until `shutdown` flips, then gives open streams
/// `shutdown_grace` to finish.
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<(), CollectorError> {
    cfg.validate()?;
    let tenants = load_tenants(&cfg)?;
    let state = Arc::new(State::new(
        StateConfig {
            stale_after: cfg.stale_after,
            max_gpus_per_node: cfg.max_gpus_per_node,
            max_clock_skew: cfg.max_clock_skew,
            max_sample_age: cfg.max_sample_age,
        },
        tenants,
    ));
    state.set_auth(load_auth(&cfg)?);
    if cfg.metrics_auth && !state.auth().api_required() {
        return Err(config::ConfigError::Invalid {
            setting: "metrics_auth",
            reason: "needs [[api]] tokens in auth_file; without them /metrics would stay open"
                .into(),
        }
        .into());
    }
    if cfg.evaluate_interval.is_some() {
        warn!(
            "evaluate_interval is no longer used and can be removed: over-contract time is evaluated per minute from the ledger's energy"
        );
    }
    if cfg.tls_cert.is_none() && !cfg.grpc_listen.ip().is_loopback() {
        warn!(grpc = %cfg.grpc_listen, "gRPC ingest is plaintext on a non-loopback address (insecure_plaintext = true): samples and agent tokens travel unencrypted");
    }
    if !cfg.http_listen.ip().is_loopback() && state.auth().api_required() {
        warn!(http = %cfg.http_listen, "the usage API takes bearer tokens over plain HTTP; terminate TLS in front of it");
    }
    let ledger = ledger::Ledger::open(&cfg.ledger_path)?;
    state.set_ledger_identity(ledger.identity().clone());
    let snapshot = ledger.load()?;
    info!(ledger = %cfg.ledger_path.display(), ledger_id = %ledger.identity().ledger_id, nodes = snapshot.nodes.len(), gpus = snapshot.nodes.iter().map(|(_, n)| n.gpus.len()).sum::<usize>(), "ledger opened");
    state.restore(snapshot);
    let mut ledger = ledger;
    resume_tenant_history(&state, &mut ledger)?;

    let grpc = TcpListener::bind(cfg.grpc_listen)
        .await
        .map_err(|error| CollectorError::Bind {
            what: "gRPC",
            addr: cfg.grpc_listen,
            error,
        })?;
    let http = TcpListener::bind(cfg.http_listen)
        .await
        .map_err(|error| CollectorError::Bind {
            what: "HTTP",
            addr: cfg.http_listen,
            error,
        })?;
    let grpc_addr = grpc.local_addr().map_err(|error| CollectorError::Bind {
        what: "gRPC",
        addr: cfg.grpc_listen,
        error,
    })?;
    let http_addr = http.local_addr().map_err(|error| CollectorError::Bind {
        what: "HTTP",
        addr: cfg.http_listen,
        error,
    })?;
    // Take over SIGHUP before saying we are up: its default action would
    // end the process.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|error| CollectorError::Signal { error })?;
    let http_limits = descriptor_budget(&cfg);
    info!(grpc = %grpc_addr, http = %http_addr, tenants = state.tenants().all().len() - 1, version = VERSION, "collector listening");

    let (committed_tx, committed) = watch::channel(0u64);
    let service = ingest::IngestService {
        state: state.clone(),
        shutdown: shutdown.clone(),
        hello_timeout: cfg.hello_timeout,
        committed,
        client_certs: cfg.tls_client_ca.is_some(),
        limits: ingest::Limits {
            max_streams: cfg.max_streams,
            max_node_sample_rate: cfg.max_node_sample_rate,
        },
        open: Default::default(),
        refused_logged: Default::default(),
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls(&cfg)? {
        builder = builder
            .tls_config(tls)
            .map_err(|e| CollectorError::Tls(e.to_string()))?;
    }
    let grpc_server = builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(
            IngestServer::new(service)
                .max_decoding_message_size(cfg.max_message_bytes)
                .max_encoding_message_size(cfg.max_message_bytes),
        )
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(grpc),
            capwatch_common::wait_for_shutdown(shutdown.clone()),
        );
    let reader = Arc::new(std::sync::Mutex::new(ledger::Reader::open(
        &cfg.ledger_path,
    )?));
    let http_server = serve::serve(
        http,
        http::router(http::HttpState {
            per_gpu_metrics: cfg.per_gpu_metrics,
            per_node_metrics: cfg.per_node_metrics,
            state: state.clone(),
            ledger: reader,
            metrics_auth: cfg.metrics_auth,
            request_timeout: cfg.http_request_timeout,
            renders: Default::default(),
            ledger_history: Default::default(),
        }),
        http_limits,
        state.clone(),
        shutdown.clone(),
    );

    let ledger = std::sync::Arc::new(std::sync::Mutex::new(ledger));
    let (stop_committer, committer_stop) = std::sync::mpsc::channel::<()>();
    let committer = {
        let (state, ledger, every, grace, committed) = (
            state.clone(),
            ledger.clone(),
            cfg.commit_interval,
            cfg.finalize_grace,
            committed_tx.clone(),
        );
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                let run =
                    || commit_loop(&state, &ledger, every, grace, &committed, &committer_stop);
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    Ok(failed) => failed,
                    Err(_) => committer_died(),
                }
            })
            .map_err(|error| CollectorError::Serve {
                what: "committer thread",
                error: error.into(),
            })?
    };
    let compactor = tokio::spawn(compact_loop(
        state.clone(),
        ledger.clone(),
        cfg.clone(),
        shutdown.clone(),
    ));
    let reloader = tokio::spawn(reload_on_sighup(
        state.clone(),
        ledger.clone(),
        cfg.clone(),
        hup,
        shutdown.clone(),
    ));
    let leases = tokio::spawn(advance_leases(state.clone(), shutdown.clone()));

    let grpc_task = tokio::spawn(grpc_server);
    let http_task = tokio::spawn(http_server);
    capwatch_common::wait_for_shutdown(shutdown).await;
    info!(grace_ms = cfg.shutdown_grace.as_millis() as u64, "draining");
    let drained = tokio::time::timeout(cfg.shutdown_grace, async {
        let g = grpc_task.await;
        let h = http_task.await;
        (g, h)
    })
    .await;
    reloader.abort();
    leases.abort();
    compactor.abort();
    // Streams are closed: one last commit makes everything applied durable.
    drop(stop_committer);
    let grace = cfg.finalize_grace;
    let last = tokio::task::spawn_blocking(move || {
        let failed = committer.join().unwrap_or_else(|_| committer_died());
        commit_once(&state, &ledger, failed, &committed_tx, grace)
    })
    .await;
    if !matches!(last, Ok(None)) {
        error!("final ledger commit failed; unacked samples will be re-sent by the agents");
    }
    match drained {
        Ok((Ok(Ok(())), Ok(Ok(())))) => {
            info!("collector stopped");
            Ok(())
        }
        Ok((Ok(Err(e)), _)) => Err(CollectorError::Serve {
            what: "gRPC",
            error: e.into(),
        }),
        Ok((_, Ok(Err(e)))) => Err(CollectorError::Serve {
            what: "HTTP",
            error: e.into(),
        }),
        Ok((Err(e), _)) | Ok((_, Err(e))) => Err(CollectorError::Serve {
            what: "server task",
            error: e.into(),
        }),
        Err(_) => {
            warn!("shutdown grace passed with streams still open; stopping anyway");
            Ok(())
        }
    }
}

/// Raises the descriptor limit to its hard limit and fits the HTTP
/// connection cap well inside it, so HTTP clients can never take the
/// descriptors agent streams need; logs the budget.
fn descriptor_budget(cfg: &Config) -> serve::Limits {
    let nofile = serve::raise_descriptor_limit();
    let cap = serve::connection_cap(cfg.http_max_connections, nofile);
    if cap < cfg.http_max_connections {
        warn!(
            http_max_connections = cfg.http_max_connections,
            using = cap,
            nofile,
            "http_max_connections is more than a quarter of the descriptor limit; HTTP gets a quarter"
        );
    }
    info!(
        nofile,
        http_max_connections = cap,
        max_streams = cfg.max_streams,
        "file descriptors: HTTP connections are capped, agent streams and the ledger have the rest"
    );
    if let Some(n) = nofile
        && (cfg.max_streams as u64).saturating_add(cap as u64) > n
    {
        warn!(
            nofile = n,
            max_streams = cfg.max_streams,
            "max_streams agent streams would not all get a descriptor: raise the descriptor limit (LimitNOFILE, ulimit -n) or lower max_streams"
        );
    }
    serve::Limits {
        max_connections: cap,
        header_read_timeout: cfg.http_header_read_timeout,
        write_timeout: cfg.http_write_timeout,
    }
}

/// Rebuilds the tenant file's history from the ledger and puts the file
/// loaded now in it: a file that differs from the last one recorded takes
/// effect at its `effective_from`, or now, and is recorded first.
fn resume_tenant_history(state: &State, ledger: &mut ledger::Ledger) -> Result<(), CollectorError> {
    let current = state.tenants();
    let stored = ledger.tenant_versions()?;
    let history = tenant_history_of(&stored)?;
    // The text includes `effective_from`: the same text is the same version.
    let unchanged = stored.last().is_some_and(|v| v.file == current.source());
    let history = match history {
        Some(h) if unchanged => h,
        history => {
            let now = state::unix_nanos_now();
            let from = current.effective_from_ns().unwrap_or(now);
            ledger.add_tenant_version(&ledger::TenantVersion {
                effective_from_ns: from,
                loaded_at_ns: now,
                file: current.source().to_string(),
            })?;
            info!(
                effective_from_ns = from,
                versions = stored.len() + 1,
                "tenant file version recorded"
            );
            match history {
                Some(mut h) => {
                    h.push(from, current);
                    h
                }
                None => tenants::TenantHistory::new(current),
            }
        }
    };
    state.set_tenant_history(history);
    Ok(())
}

/// The history of the tenant file versions recorded in a ledger (in load
/// order, each in force from its `effective_from_ns`); none when it has
/// none.
pub fn tenant_history_of(
    stored: &[ledger::TenantVersion],
) -> Result<Option<tenants::TenantHistory>, CollectorError> {
    let mut history: Option<tenants::TenantHistory> = None;
    for (i, v) in stored.iter().enumerate() {
        let t = Tenants::from_toml(&v.file).map_err(|e| config::ConfigError::Invalid {
            setting: "tenant",
            reason: format!(
                "version {} of the tenant file kept in the ledger: {e}",
                i + 1
            ),
        })?;
        match &mut history {
            None => history = Some(tenants::TenantHistory::new(Arc::new(t))),
            Some(h) => h.push(v.effective_from_ns, Arc::new(t)),
        }
    }
    Ok(history)
}

/// Commits what streams applied, every `every`, and tells the streams
/// which commit is durable so they can ack. A failed commit is retried
/// with what arrives next; nothing is acked meanwhile. Runs on a thread of
/// its own until `stop` is dropped: on the runtime, a commit that was done
/// in 50 ms waited up to 800 ms more for a worker to poll it while every
/// worker was busy with streams, and acks waited with it. Returns a commit
/// that could not be written. Each commit moves the ledger's watermark to
/// `finalize_grace` before the open minute (`finalize_through`).
fn commit_loop(
    state: &State,
    ledger: &std::sync::Mutex<ledger::Ledger>,
    every: std::time::Duration,
    finalize_grace: std::time::Duration,
    committed: &watch::Sender<u64>,
    stop: &std::sync::mpsc::Receiver<()>,
) -> Option<(u64, ledger::Commit)> {
    let mut failed = None;
    let mut next = std::time::Instant::now() + every;
    loop {
        match stop.recv_timeout(next.saturating_duration_since(std::time::Instant::now())) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return failed,
        }
        failed = commit_once(state, ledger, failed, committed, finalize_grace);
        // A commit that took longer than the interval delays the next one
        // by a whole interval rather than starting commits back to back
        // (which would also keep compaction from the ledger).
        let now = std::time::Instant::now();
        next += every;
        if next <= now {
            next = now + every;
        }
    }
}

/// Writes the pending commit (with a previously failed one, if any), and
/// moves the ledger's watermark (`finalize_through`) in the same
/// transaction. Returns the commit back if the write failed.
fn commit_once(
    state: &State,
    ledger: &std::sync::Mutex<ledger::Ledger>,
    failed: Option<(u64, ledger::Commit)>,
    committed: &watch::Sender<u64>,
    finalize_grace: std::time::Duration,
) -> Option<(u64, ledger::Commit)> {
    let (id, mut commit) = state.take_pending();
    if let Some((_, mut earlier)) = failed {
        earlier.absorb(commit);
        commit = earlier;
    }
    let now = usage::now_unix();
    let finalize_through = finalize_through(now, finalize_grace);
    if commit.is_empty() {
        committed.send_replace(id);
        // Nothing to write, but the watermark still moves (each quarter-hour),
        // so that an idle fleet's rows become final. Skipped while the
        // compactor holds the ledger: the next tick tries again.
        let l = match ledger.try_lock() {
            Ok(l) => l,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        match l.finalized_through() {
            Ok(w) if w >= finalize_through => return None,
            Ok(_) => {}
            Err(e) => {
                error!(task = "committer", error = %e, "reading the ledger's watermark failed");
                return None;
            }
        }
        drop(l);
    }
    let started = std::time::Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        state::lock(ledger).commit_at(&commit, now, finalize_through)
    }));
    match result {
        Ok(Ok(done)) => {
            // Before the acks: a scrape after an ack sees the counter.
            state.add_over_contract(&done.over_contract_ns);
            state.counters.commits_ok.fetch_add(1, Ordering::Relaxed);
            state.readiness.commit_succeeded();
            state
                .counters
                .commit_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            committed.send_replace(id);
            None
        }
        Ok(Err(e)) => {
            events::CommitFailed { error: &e }.emit(&state.counters);
            state.readiness.commit_failed(&e);
            Some((id, commit))
        }
        Err(_) => committer_died(),
    }
}

/// Where a commit at `now` moves the watermark: `grace` before the open
/// minute, rounded down to a whole quarter-hour (and not before 1970). A row's peak demand is
/// read from the quarter-hours overlapping it, so a watermark inside a
/// quarter-hour would let a final 1-minute row's peak change with the
/// minutes after it.
fn finalize_through(now: i64, grace: std::time::Duration) -> i64 {
    (now.div_euclid(60) * 60)
        .saturating_sub(i64::try_from(grace.as_secs()).unwrap_or(i64::MAX))
        .max(0)
        .div_euclid(900)
        * 900
}

/// Ends the process after the committer panicked. Whether its commit was
/// written is unknown, and without a committer nothing is acked again:
/// stop, and let the restart resume from the ledger while agents re-send.
fn committer_died() -> ! {
    error!(
        task = "committer",
        "ledger committer panicked; exiting so the ledger stays exact"
    );
    std::process::exit(70);
}

/// What a compaction at `now` (Unix seconds) keeps under `cfg`.
pub fn compaction_policy(cfg: &config::Config, now: i64) -> ledger::Compaction {
    let ago =
        |d: std::time::Duration| now.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    ledger::Compaction {
        closed_before: ago(cfg.finalize_grace),
        minutes_from: ago(cfg.minute_retention),
        hours_from: ago(cfg.hour_retention),
        days_from: cfg.day_retention.map(ago),
    }
}

/// Once a minute, rolls closed hours up and applies retention. Named
/// task: `compactor`. A failure is logged and counted; the next round
/// retries (rollups are rebuilt from what they cover, so nothing is lost).
async fn compact_loop(
    state: Arc<State>,
    ledger: Arc<std::sync::Mutex<ledger::Ledger>>,
    cfg: config::Config,
    shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = capwatch_common::wait_for_shutdown(shutdown);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        let policy = compaction_policy(&cfg, usage::now_unix());
        let ledger = ledger.clone();
        let contracts = state.tenant_history();
        let result =
            tokio::task::spawn_blocking(move || state::lock(&ledger).compact(&policy, &contracts))
                .await;
        match result {
            Ok(Ok(done)) => {
                state
                    .counters
                    .compactions_ok
                    .fetch_add(1, Ordering::Relaxed);
                if done != ledger::Compacted::default() {
                    info!(
                        task = "compactor",
                        hours = done.hours_rolled_up,
                        days = done.days_rolled_up,
                        minute_rows_dropped = done.minute_rows_dropped,
                        hour_rows_dropped = done.hour_rows_dropped,
                        day_rows_dropped = done.day_rows_dropped,
                        adjustment_rows_dropped = done.adjustment_rows_dropped,
                        "ledger compacted"
                    );
                }
            }
            Ok(Err(e)) => events::CompactionFailed {
                error: &e,
                task_died: false,
            }
            .emit(&state.counters),
            Err(e) => events::CompactionFailed {
                error: &e,
                task_died: true,
            }
            .emit(&state.counters),
        }
    }
}

/// Puts a tenant file loaded with a future `effective_from` in force once
/// its time has come; checked every second. Named task: `leases`.
async fn advance_leases(state: Arc<State>, shutdown: watch::Receiver<bool>) {
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
    ledger: &Arc<std::sync::Mutex<ledger::Ledger>>,
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
    let now = state::unix_nanos_now();
    let version = ledger::TenantVersion {
        effective_from_ns: t.effective_from_ns().unwrap_or(now),
        loaded_at_ns: now,
        file: t.source().to_string(),
    };
    let from = version.effective_from_ns;
    let ledger = ledger.clone();
    let recorded =
        tokio::task::spawn_blocking(move || state::lock(&ledger).add_tenant_version(&version))
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
async fn reload_on_sighup(
    state: Arc<State>,
    ledger: Arc<std::sync::Mutex<ledger::Ledger>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GpuReading, NodeSample};
    use crate::state::{GpuInfo, Hello};
    use std::sync::Mutex;
    use std::time::Duration;

    /// A state with node `n1` connected (one GPU with a counter and a
    /// 700 W limit), and a fresh ledger at `path`.
    fn node_and_ledger(
        path: &std::path::Path,
    ) -> (State, state::StreamHandle, Mutex<ledger::Ledger>) {
        let ledger = Mutex::new(ledger::Ledger::create(path).unwrap());
        let state = State::new(
            StateConfig {
                stale_after: None,
                max_gpus_per_node: 8,
                max_clock_skew: Duration::from_secs(600),
                max_sample_age: Duration::from_secs(7 * 86_400),
            },
            Tenants::empty(),
        );
        let (h, _) = state
            .hello(Hello {
                node_id: "n1".into(),
                agent_version: "test".into(),
                epoch: 1,
                interval: Duration::from_secs(1),
                gpus: vec![GpuInfo {
                    uuid: "GPU-1".into(),
                    model: "H200".into(),
                    power_limit_milliwatts: Some(700_000),
                    memory_total_bytes: None,
                    energy_counter_supported: true,
                }],
            })
            .unwrap();
        (state, h, ledger)
    }

    /// Invariant: minutes reported final stay as they were. A spool that
    /// arrives three hours late, through the same state and committer as
    /// live samples, does not change them; it is booked as adjustments,
    /// and rows plus adjustments hold every millijoule.
    #[test]
    fn a_spool_three_hours_late_leaves_final_minutes_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let (state, h, ledger) = node_and_ledger(&path);
        let (committed, _acks) = watch::channel(0);
        // One GPU counting 500 mJ a second, from the top of the hour three
        // hours ago.
        let t0 = (usage::now_unix() - 3 * 3600).div_euclid(3600) * 3600;
        let sample = |seq: u64| NodeSample {
            seq,
            timestamp_unix_nanos: (t0 + seq as i64) * 1_000_000_000,
            gpus: vec![GpuReading {
                index: 0,
                power_milliwatts: Some(500_000),
                energy_millijoules: Some(1_000_000 + 500 * seq),
                ..GpuReading::default()
            }],
            host: None,
        };
        state
            .ingest(&h, (1..=20).map(sample).collect(), Vec::new())
            .unwrap();
        let grace = Duration::from_secs(600);
        assert!(commit_once(&state, &ledger, None, &committed, grace).is_none());
        let reader = ledger::Reader::open(&path).unwrap();
        let before = reader.usage(None, t0, t0 + 3600).unwrap();
        // The commit moved the watermark past the hour: it is final.
        assert!(before.finalized_through >= t0 + 3600, "{before:?}");
        assert_eq!(before.finalized_through % 900, 0, "whole quarter-hours");
        assert_eq!(before.revision, 1);
        assert!(before.adjustments.is_empty());
        let in_time: u64 = before.spans.iter().map(|(_, s)| s.delta.energy_mj).sum();
        assert_eq!(in_time, 19 * 500);

        // Seconds 21-80 arrive three hours late.
        let booked_from = usage::now_unix();
        state
            .ingest(&h, (21..=80).map(sample).collect(), Vec::new())
            .unwrap();
        assert!(commit_once(&state, &ledger, None, &committed, grace).is_none());
        let after = reader.usage(None, t0, t0 + 3600).unwrap();
        assert_eq!(after.spans, before.spans, "final minutes changed");
        assert_eq!(after.revision, 2);
        let minutes: Vec<(u64, &str, &str, i64, u64)> = after
            .adjustments
            .iter()
            .map(|a| {
                assert!((booked_from..=usage::now_unix()).contains(&a.booked_at));
                (
                    a.revision,
                    a.tenant.as_str(),
                    a.node.as_str(),
                    a.minute_start,
                    a.delta.energy_mj,
                )
            })
            .collect();
        // Seconds 20-60 and 60-80 of the hour, split at the minute.
        assert_eq!(
            minutes,
            vec![
                (2, "unassigned", "n1", t0, 40 * 500),
                (2, "unassigned", "n1", t0 + 60, 20 * 500)
            ]
        );
        // Rows plus adjustments are the energy counted, to the millijoule.
        let l = state::lock(&ledger);
        assert_eq!(l.bucket_totals("unassigned").unwrap().energy_mj, 79 * 500);
        assert_eq!(
            l.load().unwrap().tenant_energy,
            vec![("unassigned".to_string(), 79 * 500)]
        );
        drop(l);
        // Nothing to commit: the watermark does not move back, and the
        // revision moves only when the watermark does.
        assert!(
            commit_once(
                &state,
                &ledger,
                None,
                &committed,
                Duration::from_secs(86_400)
            )
            .is_none()
        );
        let idle = reader.usage_since(None, t0, t0 + 3600, 2).unwrap();
        assert_eq!(
            (idle.revision, idle.finalized_through),
            (2, after.finalized_through)
        );
        assert!(idle.adjustments.is_empty(), "nothing since revision 2");
    }

    #[test]
    fn the_watermark_trails_by_the_grace_in_whole_quarter_hours() {
        const T: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
        let grace = Duration::from_secs(600);
        // Open minute 00:26, less 10 minutes: 00:16, down to 00:15.
        assert_eq!(finalize_through(T + 26 * 60 + 5, grace), T + 15 * 60);
        assert_eq!(finalize_through(T + 25 * 60, grace), T + 15 * 60);
        assert_eq!(finalize_through(T + 24 * 60 + 59, grace), T);
        assert_eq!(finalize_through(T, Duration::ZERO), T);
        assert_eq!(finalize_through(T, Duration::from_secs(u64::MAX)), 0);
    }

    /// Invariant: a GPU back after two hours carries the gap's energy in
    /// its counter; the part of the gap already final becomes adjustments,
    /// the part within the grace lands in its minutes, and together they
    /// are the counter's delta exactly.
    #[test]
    fn a_gpu_back_after_two_hours_splits_its_gap_at_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let (state, h, ledger) = node_and_ledger(&path);
        let (committed, _acks) = watch::channel(0);
        let grace = Duration::from_secs(600);
        let now = usage::now_unix();
        let t0 = now - 2 * 3600;
        let sample = |seq: u64, t: i64, counter: u64| NodeSample {
            seq,
            timestamp_unix_nanos: t * 1_000_000_000,
            gpus: vec![GpuReading {
                index: 0,
                power_milliwatts: Some(500_000),
                energy_millijoules: Some(counter),
                ..GpuReading::default()
            }],
            host: None,
        };
        // Heard at t0 and t0 + 1 s, committed then (the ledger is fresh, so
        // its watermark moves past them with this commit).
        state
            .ingest(
                &h,
                vec![sample(1, t0, 1_000_000), sample(2, t0 + 1, 1_000_500)],
                Vec::new(),
            )
            .unwrap();
        assert!(commit_once(&state, &ledger, None, &committed, grace).is_none());
        let reader = ledger::Reader::open(&path).unwrap();
        let before = reader.usage(None, t0 - 3600, now + 3600).unwrap();
        let watermark = before.finalized_through;
        assert!(watermark > t0 + 60 && watermark < now, "{before:?}");
        // Then silent until now, 500 W all along.
        let gap = 500 * (now - t0 - 1) as u64;
        state
            .ingest(&h, vec![sample(3, now, 1_000_500 + gap)], Vec::new())
            .unwrap();
        assert!(commit_once(&state, &ledger, None, &committed, grace).is_none());
        let after = reader.usage(None, t0 - 3600, now + 3600).unwrap();
        let final_rows = |u: &ledger::Usage| -> Vec<(i64, u64)> {
            u.spans
                .iter()
                .filter(|(_, s)| s.start + 60 <= watermark)
                .map(|(_, s)| (s.start, s.delta.energy_mj))
                .collect()
        };
        assert_eq!(
            final_rows(&after),
            final_rows(&before),
            "final minutes changed"
        );
        assert!(
            after
                .adjustments
                .iter()
                .all(|a| a.minute_start + 60 <= watermark)
        );
        assert!(!after.adjustments.is_empty());
        let booked: u64 = after.adjustments.iter().map(|a| a.delta.energy_mj).sum();
        let open: u64 = after
            .spans
            .iter()
            .filter(|(_, s)| s.start + 60 > watermark)
            .map(|(_, s)| s.delta.energy_mj)
            .sum();
        assert!(open > 0, "the minutes within the grace get their share");
        let rows: u64 = final_rows(&after).iter().map(|r| r.1).sum();
        assert_eq!(rows + booked + open, 500 + gap);
    }
}
