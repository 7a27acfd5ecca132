//! capwatch collector: accepts agent streams over gRPC, attributes every
//! GPU to a tenant, aggregates per tenant against its contract and exports
//! Prometheus metrics.
//!
//! [`run`] starts long-running tasks that stop on the shutdown signal: the
//! gRPC ingest server ([`ingest`]), the HTTP server ([`http`]), the ledger
//! committer (a thread) and compactor; another reloads the tenant and auth
//! files on SIGHUP, and one puts a tenant file whose `effective_from` lies
//! ahead in force when its time comes.

pub mod auth;
pub mod billing;
pub mod config;
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

use billing::committer::{
    claim_restored, commit_loop, commit_once, committer_died, resume_tenant_history,
};
use billing::compactor::compact_loop;
use config::Config;
use state::{State, StateConfig};
use tenants::Tenants;

pub use billing::committer::tenant_history_of;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Resume(#[from] billing::committer::ResumeError),
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
    let mut ledger = ledger::Ledger::open(&cfg.ledger_path)?;
    state.set_ledger_identity(ledger.identity().clone());
    let snapshot = ledger.load()?;
    info!(ledger = %cfg.ledger_path.display(), ledger_id = %ledger.identity().ledger_id, nodes = snapshot.nodes.len(), gpus = snapshot.nodes.iter().map(|(_, n)| n.gpus.len()).sum::<usize>(), "ledger opened");
    claim_restored(&mut ledger, ledger::sqlite::LOCAL_HOLDER, &snapshot)?;
    state.restore(snapshot);
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
                let run = || {
                    commit_loop(
                        &state,
                        &*ledger,
                        ledger::sqlite::LOCAL_HOLDER,
                        every,
                        grace,
                        &committed,
                        &committer_stop,
                    )
                };
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
        Arc::from(ledger::sqlite::LOCAL_HOLDER),
        billing::compactor::Retention {
            finalize_grace: cfg.finalize_grace,
            minute_retention: cfg.minute_retention,
            hour_retention: cfg.hour_retention,
            day_retention: cfg.day_retention,
        },
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
        commit_once(
            &state,
            &*ledger,
            ledger::sqlite::LOCAL_HOLDER,
            failed,
            &committed_tx,
            grace,
        )
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
            state
                .counters
                .reloads_failed
                .fetch_add(1, Ordering::Relaxed);
            state.readiness.reload_failed(&e);
            error!(task = "reloader", error = %e, "recording the tenant file version failed; keeping the previous tenants");
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
                        state.counters.reloads_failed.fetch_add(1, Ordering::Relaxed);
                        state.readiness.reload_failed(&e);
                        error!(task = "reloader", error = %e, "tenant file reload failed; keeping the previous tenants");
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
                        state.counters.reloads_failed.fetch_add(1, Ordering::Relaxed);
                        error!(task = "reloader", error = %e, "auth file reload failed; keeping the previous tokens");
                    }
                }
            }
            _ = &mut stop => return,
        }
    }
}
