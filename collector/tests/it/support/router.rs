//! The collector's HTTP router built in-process on a fresh ledger and
//! called with `tower::ServiceExt::oneshot`: status codes, headers and
//! bodies of the HTTP surface without a process or a socket.
//!
//! Built only from the crate's public constructors (`http::router`,
//! `http::HttpState`, `state::State::new`, `state::StateConfig`,
//! `tenants::Tenants::from_toml`, `auth::Auth::from_file`,
//! `ledger::Ledger::create`, `ledger::Reader::open`); where those change,
//! [`Api::new`] is the one place to follow them.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, Request};
use capwatch_collector::auth::Auth;
use capwatch_collector::config::Config;
use capwatch_collector::http::{HttpState, router};
use capwatch_collector::ledger::{Ledger, Reader};
use capwatch_collector::state::{State, StateConfig};
use capwatch_collector::tenants::Tenants;
use tower::ServiceExt;

use super::secret;

/// One response: status, headers and body text.
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The body as JSON (every answer of the usage API is JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// The router of a collector with `tenants` (TOML), the auth file `auth`
/// (TOML) when given, and `metrics_auth`, on an empty ledger in a
/// temporary directory; defaults for everything else.
pub struct Api {
    router: axum::Router,
    pub state: Arc<State>,
    /// The ledger the router reads, for a test to write into.
    pub ledger_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Api {
    pub fn new(tenants: &str, auth: Option<&str>, metrics_auth: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::default();
        let state = Arc::new(State::new(
            StateConfig {
                stale_after: cfg.stale_after,
                max_gpus_per_node: cfg.max_gpus_per_node,
                max_clock_skew: cfg.max_clock_skew,
                max_sample_age: cfg.max_sample_age,
            },
            Tenants::from_toml(tenants).unwrap(),
        ));
        if let Some(text) = auth {
            state.set_auth(Auth::from_file(&secret(dir.path(), "auth.toml", text)).unwrap());
        }
        let path = dir.path().join("ledger.db");
        drop(Ledger::create(&path).unwrap());
        let router = router(HttpState {
            per_gpu_metrics: cfg.per_gpu_metrics,
            per_node_metrics: cfg.per_node_metrics,
            state: state.clone(),
            ledger: Arc::new(Mutex::new(Box::new(Reader::open(&path).unwrap()))),
            metrics_auth,
            request_timeout: cfg.http_request_timeout,
            renders: Default::default(),
            ledger_history: Default::default(),
            finalize_grace: cfg.finalize_grace,
            status_kept: Default::default(),
        });
        Self {
            router,
            state,
            ledger_path: path,
            _dir: dir,
        }
    }

    /// `GET path`, with `Authorization: Bearer <token>` when given.
    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let headers: Vec<(&str, String)> = token
            .map(|t| ("authorization", format!("Bearer {t}")))
            .into_iter()
            .collect();
        self.request("GET", path, &headers).await
    }

    /// `method path` with `headers`.
    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, String)]) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            body: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }
}
