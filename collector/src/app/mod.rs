//! Wiring: config → [`App`] → spawned, named tasks ([`Running`]) →
//! shutdown.
//!
//! [`App::build`] does everything that can refuse a start: it checks the
//! config, loads the tenant and auth files, opens and restores the ledger
//! and binds both listeners, then logs `collector listening`.
//! [`App::spawn`] starts the tasks, each in a tracing span `task` naming
//! it (`grpc`, `http`, `committer`, `compactor`, `reloader`, `leases`), so
//! every line a task logs says which task it is. [`Running::wait`] waits
//! for the shutdown signal and stops them in order: the servers drain
//! (for `shutdown_grace`), the background tasks end, and the committer
//! makes a last commit.

mod backend;
mod reload;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{Instrument as _, error, info, warn};

use capwatch_proto::v1::ingest_server::IngestServer;

use crate::config::{self, Config};
use crate::persist::committer::{commit_loop, commit_once, committer_died, resume_tenant_history};
use crate::persist::{self, compactor::compact_loop};
use crate::state::{State, StateConfig};
use crate::tenants::{self, Tenants};
use crate::{VERSION, auth, http, ingest, ledger, serve};

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The tenant or auth file.
    #[error(transparent)]
    File(#[from] capwatch_common::files::FileError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Resume(#[from] persist::committer::ResumeError),
    #[error("binding {what} on {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("reading the system's random source for this collector's holder id: {error}")]
    Holder { error: std::io::Error },
    #[error("listening for SIGHUP: {error}")]
    Signal { error: std::io::Error },
    #[error("{what} server: {error}")]
    Serve {
        what: &'static str,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Runs the collector until `shutdown` flips, then gives open streams
/// `shutdown_grace` to finish.
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<(), CollectorError> {
    App::build(cfg).await?.spawn(shutdown)?.wait().await
}

/// Loads the tenant file named by `cfg`, or no tenants.
pub fn load_tenants(cfg: &Config) -> Result<Tenants, tenants::TenantsError> {
    match &cfg.tenants_file {
        Some(path) => Tenants::from_file(path),
        None => Ok(Tenants::empty()),
    }
}

/// Reads the auth file, if any.
pub fn load_auth(cfg: &Config) -> Result<auth::Auth, auth::AuthFileError> {
    match &cfg.auth_file {
        Some(path) => auth::Auth::from_file(path),
        None => Ok(auth::Auth::default()),
    }
}

/// How often final meter-minutes are allocated.
const ALLOCATE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Most nodes whose match one meter's covered-nodes count keeps.
const MAX_COVER_CACHE: usize = 1_000_000;

/// The span every line of task `name` is logged in.
fn task_span(name: &'static str) -> tracing::Span {
    tracing::info_span!("task", task = name)
}

/// A collector ready to start: the ledger restored, both listeners bound,
/// nothing running yet.
pub struct App {
    cfg: Config,
    state: Arc<State>,
    /// This process's fencing holder (`<collector_id>/<random hex>`).
    holder: Arc<str>,
    ledger: ledger::AnyWriter,
    reader: ledger::AnyReader,
    grpc: TcpListener,
    http: TcpListener,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    /// The gRPC server's settings, TLS included.
    server: tonic::transport::Server,
    http_limits: serve::Limits,
    hup: tokio::signal::unix::Signal,
    /// The facility meters' pollers, their clients set up.
    meter_pollers: Vec<crate::meters::Poller>,
}

impl App {
    /// Checks `cfg`, loads the tenant and auth files, opens and restores
    /// the ledger and binds the gRPC and HTTP listeners. Any error here
    /// refuses the start.
    pub async fn build(cfg: Config) -> Result<Self, CollectorError> {
        cfg.validate()?;
        let board = Arc::new(crate::meters::Board::new(cfg.meters()?));
        let meter_pollers = crate::meters::pollers(&board)
            .map_err(|e| config::ConfigError::invalid("meter", e.to_string()))?;
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
        state.keep_gpu_rows(cfg.usage_gpu_rows);
        state.set_auth(load_auth(&cfg)?);
        state.set_meters(board);
        state.readiness.set_shed_after(cfg.shed_streams_after);
        if cfg.metrics_auth && !state.auth().api_required() {
            return Err(config::ConfigError::invalid(
                "metrics_auth",
                "needs [[api]] tokens in auth_file; without them /metrics would stay open",
            )
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
        let collector_id = collector_id(&cfg)?;
        let holder: Arc<str> = Arc::from(
            persist::claims::new_holder(&collector_id)
                .map_err(|error| CollectorError::Holder { error })?,
        );
        state.set_collector_info(crate::state::CollectorInfo {
            collector_id,
            holder: holder.to_string(),
            ledger_backend: match cfg.ledger() {
                config::LedgerChoice::Sqlite(_) => "sqlite",
                config::LedgerChoice::Postgres(_) => "postgres",
            },
        });
        let backend::Opened {
            writer: mut ledger,
            reader,
            name,
            pool,
        } = backend::open(&cfg).await?;
        state.set_ledger_identity(ledger.identity().clone());
        if let Some(pool) = pool {
            state.set_ledger_pool(pool);
        }
        let snapshot = ledger.restore()?;
        info!(ledger = %name, ledger_id = %ledger.identity().ledger_id, nodes = snapshot.nodes.len(), gpus = snapshot.nodes.iter().map(|(_, n)| n.gpus.len()).sum::<usize>(), "ledger opened");
        // Nothing is claimed here: another collector may be streaming any
        // of these nodes now. The cursors are a cache; each node's claim at
        // its Hello (which returns the cursor the ledger holds then) decides
        // where it resumes from.
        state.restore(snapshot);
        resume_tenant_history(&state, &mut ledger)?;

        let grpc =
            TcpListener::bind(cfg.grpc_listen)
                .await
                .map_err(|error| CollectorError::Bind {
                    what: "gRPC",
                    addr: cfg.grpc_listen,
                    error,
                })?;
        let http =
            TcpListener::bind(cfg.http_listen)
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
        // Everything else that can refuse the start, before saying we are up.
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls::server_tls(&cfg)? {
            server = server
                .tls_config(tls)
                .map_err(|e| CollectorError::Tls(e.to_string()))?;
        }
        info!(grpc = %grpc_addr, http = %http_addr, tenants = state.tenants().all().len() - 1, version = VERSION, "collector listening");
        Ok(Self {
            cfg,
            state,
            holder,
            ledger,
            reader,
            grpc,
            http,
            grpc_addr,
            http_addr,
            server,
            http_limits,
            hup,
            meter_pollers,
        })
    }

    /// Where agents stream to (the bound address, with its real port).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where the HTTP server listens (the bound address, with its real port).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Starts every task; they run until `shutdown` flips.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> Result<Running, CollectorError> {
        let Self {
            cfg,
            state,
            holder,
            ledger,
            reader,
            grpc,
            http,
            server,
            http_limits,
            hup,
            meter_pollers,
            ..
        } = self;
        let (committed_tx, committed) = watch::channel(0u64);
        let ledger = Arc::new(Mutex::new(ledger));
        let service = ingest::IngestService {
            claims: Arc::new(
                persist::claims::ClaimQueue::start(
                    persist::claims::HolderClaims {
                        writer: ledger.clone(),
                        holder: holder.clone(),
                    },
                    state.clone(),
                )
                .map_err(|error| CollectorError::Serve {
                    what: "claim thread",
                    error: error.into(),
                })?,
            ),
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
        let grpc_server = server
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
        // One read connection, shared by the HTTP API and the meters'
        // allocation (which so never holds the writer for its reads).
        let reader: Arc<Mutex<ledger::AnyReader>> = Arc::new(Mutex::new(reader));
        let http_server = serve::serve(
            http,
            http::router(http::HttpState {
                per_gpu_metrics: cfg.per_gpu_metrics,
                per_node_metrics: cfg.per_node_metrics,
                state: state.clone(),
                ledger: reader.clone(),
                metrics_auth: cfg.metrics_auth,
                request_timeout: cfg.http_request_timeout,
                renders: Default::default(),
                ledger_history: Default::default(),
                finalize_grace: cfg.finalize_grace,
                status_kept: Default::default(),
            }),
            http_limits,
            state.clone(),
            shutdown.clone(),
        );

        let (stop_committer, committer_stop) = std::sync::mpsc::channel::<()>();
        let committer = {
            let (state, ledger, holder, every, grace, committed) = (
                state.clone(),
                ledger.clone(),
                holder.clone(),
                cfg.commit_interval,
                cfg.finalize_grace,
                committed_tx.clone(),
            );
            let span = task_span("committer");
            std::thread::Builder::new()
                .name("committer".into())
                .spawn(move || {
                    let _task = span.entered();
                    let run = || {
                        commit_loop(
                            &state,
                            &*ledger,
                            &holder,
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
        let compactor = tokio::spawn(
            compact_loop(
                state.clone(),
                ledger.clone(),
                holder.clone(),
                persist::compactor::Retention {
                    finalize_grace: cfg.finalize_grace,
                    minute_retention: cfg.minute_retention,
                    hour_retention: cfg.hour_retention,
                    day_retention: cfg.day_retention,
                },
                shutdown.clone(),
            )
            .instrument(task_span("compactor")),
        );
        let reloader = tokio::spawn(
            reload::reload_on_sighup(
                state.clone(),
                ledger.clone(),
                cfg.clone(),
                hup,
                shutdown.clone(),
            )
            .instrument(task_span("reloader")),
        );
        let leases = tokio::spawn(
            reload::advance_leases(state.clone(), shutdown.clone()).instrument(task_span("leases")),
        );

        let meters = match state.meters() {
            Some(board) => {
                let fleet = state.clone();
                // Whether a meter covers a node, matched once per (meter,
                // node): globs are not cheap and this runs on every poll
                // of every meter, on the async runtime. A meter's is
                // emptied if it ever holds more than MAX_COVER_CACHE nodes
                // (nodes that left).
                let cache: Mutex<HashMap<String, HashMap<String, bool>>> = Mutex::default();
                let covered: crate::meters::CoveredNodes = Arc::new(move |spec| {
                    let now = std::time::Instant::now();
                    let mut n = 0;
                    let mut cache = crate::sync::lock(&cache);
                    let known = cache.entry(spec.id.clone()).or_default();
                    if known.len() > MAX_COVER_CACHE {
                        known.clear();
                    }
                    fleet.for_each_node(|v| {
                        if !v.up(now) {
                            return;
                        }
                        let under = match known.get(v.id()) {
                            Some(under) => *under,
                            None => {
                                let under = spec.covers(v.id());
                                known.insert(v.id().to_string(), under);
                                under
                            }
                        };
                        if under {
                            n += 1;
                        }
                    });
                    n
                });
                let mut tasks =
                    crate::meters::spawn(board, meter_pollers, covered, shutdown.clone());
                if !board.meters.is_empty() {
                    tasks.push(tokio::spawn(
                        crate::meters::allocate::allocate_loop(
                            board.clone(),
                            reader.clone(),
                            ledger.clone(),
                            ALLOCATE_EVERY,
                            shutdown.clone(),
                        )
                        .instrument(task_span("allocator")),
                    ));
                }
                tasks
            }
            None => Vec::new(),
        };

        let grpc = tokio::spawn(grpc_server.instrument(task_span("grpc")));
        let http = tokio::spawn(http_server.instrument(task_span("http")));
        Ok(Running {
            meters,
            cfg,
            state,
            holder,
            ledger,
            shutdown,
            grpc,
            http,
            compactor,
            reloader,
            leases,
            stop_committer,
            committer,
            committed: committed_tx,
        })
    }
}

/// The collector's tasks, running.
pub struct Running {
    cfg: Config,
    state: Arc<State>,
    holder: Arc<str>,
    ledger: Arc<Mutex<ledger::AnyWriter>>,
    shutdown: watch::Receiver<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
    compactor: JoinHandle<()>,
    reloader: JoinHandle<()>,
    leases: JoinHandle<()>,
    /// One polling task per facility meter.
    meters: Vec<JoinHandle<()>>,
    /// Dropped to stop the committer.
    stop_committer: std::sync::mpsc::Sender<()>,
    committer: std::thread::JoinHandle<Option<(u64, ledger::Commit)>>,
    /// Which commit is durable, for the streams' acks.
    committed: watch::Sender<u64>,
}

impl Running {
    /// Waits for the shutdown signal, then stops the tasks in order: the
    /// gRPC and HTTP servers drain (for at most `shutdown_grace`), the
    /// compactor, reloader and leases end, and the committer makes one
    /// last commit of everything the streams applied.
    pub async fn wait(self) -> Result<(), CollectorError> {
        let Self {
            cfg,
            state,
            holder,
            ledger,
            shutdown,
            grpc,
            http,
            compactor,
            reloader,
            leases,
            meters,
            stop_committer,
            committer,
            committed,
        } = self;
        capwatch_common::wait_for_shutdown(shutdown).await;
        info!(grace_ms = cfg.shutdown_grace.as_millis() as u64, "draining");
        let drained = tokio::time::timeout(cfg.shutdown_grace, async {
            let g = grpc.await;
            let h = http.await;
            (g, h)
        })
        .await;
        reloader.abort();
        leases.abort();
        for m in &meters {
            m.abort();
        }
        compactor.abort();
        // Streams are closed: one last commit makes everything applied durable.
        drop(stop_committer);
        let grace = cfg.finalize_grace;
        let span = task_span("committer");
        let last = tokio::task::spawn_blocking(move || {
            let _task = span.entered();
            let failed = committer.join().unwrap_or_else(|_| committer_died());
            commit_once(&state, &*ledger, &holder, failed, &committed, grace)
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
}

/// The collector's id: `collector_id`, or the hostname.
fn collector_id(cfg: &Config) -> Result<String, config::ConfigError> {
    if let Some(id) = &cfg.collector_id {
        return Ok(id.clone());
    }
    let uname = rustix::system::uname();
    let host = uname.nodename().to_string_lossy().into_owned();
    config::collector_id_ok(&host).map_err(|reason| {
        config::ConfigError::invalid(
            "collector_id",
            format!(
                "unset, and the hostname {host:?} cannot stand for it ({reason}); set collector_id"
            ),
        )
    })?;
    Ok(host)
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
