//! The HTTP side: `/metrics`, `/healthz`, `/readyz`, the status page and the
//! usage API for billing jobs (`/v2/usage`; `/v1/tenants`,
//! `/v1/tenants/{id}/usage`, `/v1/usage`, `/v1/meters`), described by the
//! OpenAPI document at `/openapi.json`, generated from the types here.
//!
//! *Boundary:* query strings are untrusted; errors map to an HTTP status
//! with an RFC 9457 problem document naming the problem (and the
//! parameter), here and nowhere else.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, RawQuery, State as Extract};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tower_http::timeout::TimeoutLayer;
use tracing::error;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::{self, Scope};
use crate::events::{AuthReason, AuthRefused, Surface};
use crate::ledger::{AnyReader, LedgerError, LedgerReader};
use crate::state::State;
use crate::status::{
    GpuRow, Health, NodeRow, Series, StaleNode, StatusView, TenantPage, TenantRow,
};
use crate::sync::lock;
use crate::tenants::TenantHistory;
use crate::usage::recent::{self, TenantRecent, Window};
use crate::usage::{self, Format, Page, PageRequest, QueryError, Report, UsageError};

#[derive(Clone)]
pub struct HttpState {
    /// Export per-GPU series on `/metrics`.
    pub per_gpu_metrics: bool,
    /// Export per-node series on `/metrics`.
    pub per_node_metrics: bool,
    pub state: Arc<State>,
    pub ledger: Arc<Mutex<AnyReader>>,
    /// `/metrics` needs an admin token (when API tokens are configured).
    pub metrics_auth: bool,
    /// Longest a request may take (408 after).
    pub request_timeout: Duration,
    /// `/metrics` bodies shared by concurrent scrapes.
    pub renders: Arc<crate::scrape::Renders>,
    /// The tenant file's history as the ledger recorded it, for usage.
    pub ledger_history: Arc<LedgerHistory>,
    /// How far the watermark trails by design (`finalize_grace`), for the
    /// status page's health.
    pub finalize_grace: Duration,
    /// The final minutes the status pages read, per page (`None`: the
    /// overview, else the tenant's page), so a reload reads only what may
    /// have changed since (`recent::read_kept`).
    pub status_kept: Arc<StatusKept>,
}

/// The status pages' kept minutes, at most [`STATUS_KEPT_PAGES`] pages',
/// each with when it was last read.
#[derive(Debug, Default)]
pub struct StatusKept(Mutex<HashMap<Option<String>, (recent::Kept, Instant)>>);

/// Pages whose minutes are kept at once: the overview and the tenant pages
/// looked at; beyond it the page read longest ago is dropped.
pub const STATUS_KEPT_PAGES: usize = 64;

/// A page not read for this long is read whole again (and its minutes
/// freed): no one is looking at it.
pub const STATUS_KEPT_FOR: Duration = Duration::from_secs(300);

impl StatusKept {
    /// Takes `page`'s kept minutes out (the read puts them back).
    fn take(&self, page: &Option<String>) -> Option<recent::Kept> {
        let mut pages = lock(&self.0);
        pages.retain(|_, (_, at)| at.elapsed() < STATUS_KEPT_FOR);
        pages.remove(page).map(|(k, _)| k)
    }

    fn put(&self, page: Option<String>, kept: Option<recent::Kept>) {
        let Some(k) = kept else {
            return;
        };
        let mut pages = lock(&self.0);
        if pages.len() >= STATUS_KEPT_PAGES
            && let Some(oldest) = pages
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(p, _)| p.clone())
        {
            pages.remove(&oldest);
        }
        pages.insert(page, (k, Instant::now()));
    }
}

/// The tenant file's whole history as the ledger recorded it, for the
/// contract of every kept minute (the collector keeps in memory only the
/// versions samples can still reach, while minutes are kept longer);
/// parsed again only when a version was recorded since.
#[derive(Debug, Default)]
pub struct LedgerHistory(Mutex<Option<(u64, Arc<TenantHistory>)>>);

impl LedgerHistory {
    /// The history `reader` holds; `fallback` (the collector's) when the
    /// ledger recorded none, or its versions cannot be read back.
    fn get(
        &self,
        reader: &dyn LedgerReader,
        fallback: impl FnOnce() -> Arc<TenantHistory>,
    ) -> Result<Arc<TenantHistory>, LedgerError> {
        let count = reader.tenant_version_count()?;
        let mut cached = lock(&self.0);
        if let Some((n, h)) = &*cached
            && *n == count
        {
            return Ok(h.clone());
        }
        let history = match crate::tenant_history_of(&reader.tenant_versions()?) {
            Ok(Some(h)) => Arc::new(h),
            Ok(None) => return Ok(fallback()),
            Err(e) => {
                error!(error = %e, "reading the tenant file versions from the ledger failed");
                return Ok(fallback());
            }
        };
        *cached = Some((count, history.clone()));
        Ok(history)
    }
}

pub fn router(state: HttpState) -> Router {
    let timeout = state.request_timeout;
    let counted = state.state.clone();
    Router::new()
        .route("/", get(status_page))
        .route("/status/tenant/{id}", get(tenant_status_page))
        .route("/metrics", get(metrics))
        // Always open: it says "ok" and nothing else, for probes.
        .route("/healthz", get(healthz))
        // Always open too: readiness, 503 with the reasons (no secrets).
        .route("/readyz", get(readyz))
        // Always open: the API's description.
        .route("/openapi.json", get(openapi_json))
        .route("/v1/tenants", get(tenants))
        .route("/v1/tenants/{id}/usage", get(tenant_usage))
        .route("/v1/usage", get(all_usage))
        .route("/v1/meters", get(meters_view))
        .route("/v1/nodes/{node}/retire", axum::routing::post(retire_node))
        .route("/v2/usage", get(usage_pages))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        // Outside the timeout, so that its 408 gets a body too.
        .layer(axum::middleware::map_response(problem_for_bare_errors))
        .layer(axum::middleware::from_fn_with_state(
            counted,
            crate::metrics::track_requests,
        ))
        // gzip for clients that ask for it (a scraper of a large /metrics).
        .layer(tower_http::compression::CompressionLayer::new())
}

/// An error answered without a body of its own (the timeout's 408) gets a
/// problem document, like every other error.
async fn problem_for_bare_errors(r: Response) -> Response {
    if r.status().as_u16() < 400 || r.headers().contains_key(header::CONTENT_TYPE) {
        return r;
    }
    let status = r.status();
    let detail = match status {
        StatusCode::REQUEST_TIMEOUT => "the request took longer than http_request_timeout",
        _ => status.canonical_reason().unwrap_or("error"),
    };
    ApiError::new(status, detail).into_response()
}

/// What the request's bearer token may read. With no API tokens
/// configured, everyone is admin.
fn scope(s: &HttpState, headers: &HeaderMap) -> Result<Scope, ApiError> {
    let auth = s.state.auth();
    if !auth.api_required() {
        return Ok(Scope::Admin);
    }
    let token = auth::bearer(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    auth.api(token).map(|g| g.scope.clone()).map_err(|e| {
        AuthRefused {
            surface: Surface::Http,
            reason: AuthReason::Unauthenticated,
            node: None,
        }
        .emit(&s.state.counters);
        ApiError::new(StatusCode::UNAUTHORIZED, format!("API token: {e}"))
    })
}

/// Refuses a tenant token where `what` needs an admin one.
fn forbidden(s: &HttpState, what: &str) -> ApiError {
    AuthRefused {
        surface: Surface::Http,
        reason: AuthReason::Forbidden,
        node: None,
    }
    .emit(&s.state.counters);
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!("{what} needs an admin token"),
    )
}

/// The status page shows every tenant: with API tokens configured, it
/// needs an admin token.
#[utoipa::path(get, path = "/", tag = "operations",
    responses(
        (status = 200, description = "The status page", body = String, content_type = "text/html"),
        (status = 401, description = "No valid API token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs an admin token", body = Problem, content_type = "application/problem+json")))]
async fn status_page(
    Extract(s): Extract<HttpState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if scope(&s, &headers)? != Scope::Admin {
        return Err(forbidden(&s, "the status page"));
    }
    Ok(crate::status::page(&status_view(&s).await))
}

/// Bins of the overview's charts, and of a tenant page's.
const OVERVIEW_BIN_SECONDS: i64 = 900;
const TENANT_BIN_SECONDS: i64 = 300;

/// A tenant's page: its row of the overview, its nodes and GPUs, and its
/// last day in finer bins. The same rule as the overview: with API tokens
/// configured, an admin token (the page is the operator's, and names
/// nodes and the collector's state).
#[utoipa::path(get, path = "/status/tenant/{id}", tag = "operations",
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "The tenant's status page", body = String, content_type = "text/html"),
        (status = 400, description = "The tenant id is not valid UTF-8", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs an admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant in the tenant file", body = Problem, content_type = "application/problem+json")))]
async fn tenant_status_page(
    Extract(s): Extract<HttpState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    if scope(&s, &headers)? != Scope::Admin {
        return Err(forbidden(&s, "the status page"));
    }
    let Path(id) = id.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let tenants = s.state.tenants();
    if !tenants.all().iter().any(|t| *t.id == *id) {
        return Err(UsageError::UnknownTenant(id).into());
    }
    let day = ledger_day(&s, Some(id.clone()), TENANT_BIN_SECONDS).await;
    let now = Instant::now();
    let Some(row) = tenant_rows(&s, &day, now).into_iter().find(|r| r.id == id) else {
        return Err(UsageError::UnknownTenant(id).into());
    };
    let (mut nodes, mut gpus) = (Vec::new(), Vec::new());
    let (mut more_nodes, mut more_gpus) = (0, 0);
    s.state.for_each_node(|n| {
        let mut node = NodeRow {
            id: n.id().to_string(),
            up: n.up(now),
            silent_seconds: n.silent_for(now).map(|d| d.as_secs()),
            node_power_watts: n.node_power_milliwatts(now).map(|mw| mw as f64 / 1000.0),
            gpus: 0,
            stale_gpus: 0,
        };
        for (index, g) in n.gpus().enumerate().filter(|(_, g)| g.tenant() == id) {
            let fresh = g.fresh(now);
            node.gpus += 1;
            node.stale_gpus += u64::from(!fresh);
            if gpus.len() >= crate::status::MAX_GPUS {
                more_gpus += 1;
                continue;
            }
            gpus.push(GpuRow {
                node: n.id().to_string(),
                index,
                uuid: g.uuid().to_string(),
                model: g.model().to_string(),
                power_watts: g
                    .last()
                    .filter(|_| fresh)
                    .and_then(|r| r.power_milliwatts)
                    .map(|mw| mw as f64 / 1000.0),
                age_seconds: g.sampled_for(now).map(|d| d.as_secs()),
                fresh,
            });
        }
        if node.gpus == 0 {
            return;
        }
        if nodes.len() >= crate::status::MAX_NODES {
            more_nodes += 1;
        } else {
            nodes.push(node);
        }
    });
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    gpus.sort_by(|a, b| (&a.node, a.index).cmp(&(&b.node, b.index)));
    Ok(crate::status::tenant_page(&TenantPage {
        row,
        today: day.window.today,
        as_of: day.as_of,
        ledger_error: day.read.as_ref().err().cloned(),
        nodes,
        more_nodes,
        gpus,
        more_gpus,
    }))
}

/// What the status page shows now: each tenant's live power against its
/// contract, its day from the ledger, the stale nodes and the collector's
/// health.
async fn status_view(s: &HttpState) -> StatusView {
    let day = ledger_day(s, None, OVERVIEW_BIN_SECONDS).await;
    let now = Instant::now();
    let mut stale_nodes: Vec<StaleNode> = Vec::new();
    s.state.for_each_node(|n| {
        if !n.up(now) {
            stale_nodes.push(StaleNode {
                id: n.id().to_string(),
                tenant: n.tenant().to_string(),
                silent_seconds: n.silent_for(now).map(|d| d.as_secs()),
            });
        }
    });
    stale_nodes.sort_by(|a, b| a.id.cmp(&b.id));
    let c = &s.state.counters;
    let health = Health {
        commits_ok: c.commits_ok.load(std::sync::atomic::Ordering::Relaxed),
        commits_failed: c.commits_failed.load(std::sync::atomic::Ordering::Relaxed),
        not_ready: s.state.readiness.not_ready(),
        finalized_through: day.read.as_ref().ok().map(|(_, f)| *f),
        finalize_grace_s: s.finalize_grace.as_secs(),
    };
    StatusView {
        tenants: tenant_rows(s, &day, now),
        stale_nodes,
        today: day.window.today,
        as_of: day.as_of,
        ledger_error: day.read.as_ref().err().cloned(),
        health,
    }
}

/// What the status pages read of the ledger: each tenant's last day and
/// the watermark, or why they could not be read.
struct LedgerDay {
    as_of: i64,
    window: Window,
    read: Result<(BTreeMap<String, TenantRecent>, i64), String>,
}

/// Reads the last day of `tenant` (`None`: every tenant of the tenant
/// file) in bins of `bin` seconds. The shared reader is held only for
/// the reads (minute rows, allocated meter-minutes, the watermark and the
/// recorded tenant history); the bins are summed after it is free.
async fn ledger_day(s: &HttpState, tenant: Option<String>, bin: i64) -> LedgerDay {
    let as_of = crate::sync::now_unix();
    let window = Window::last_day(as_of, bin);
    let tenants = s.state.tenants();
    let (state, ledger, recorded) = (s.state.clone(), s.ledger.clone(), s.ledger_history.clone());
    let status_kept = s.status_kept.clone();
    let read = tokio::task::spawn_blocking(move || {
        let (rows, finalized, history) = {
            let guard = lock(&ledger);
            let reader: &dyn LedgerReader = &**guard;
            let history = recorded.get(reader, || state.tenant_history())?;
            // Taken out while it is read: a read that fails drops it.
            let mut kept = status_kept.take(&tenant);
            let rows = recent::read_kept(reader, tenant.as_deref(), &window, &mut kept)?;
            status_kept.put(tenant.clone(), kept);
            (rows, reader.finalized_through()?, history)
        };
        let ids: Vec<&str> = match &tenant {
            Some(t) => vec![t.as_str()],
            None => tenants.all().iter().map(|t| &*t.id).collect(),
        };
        Ok::<_, LedgerError>((recent::recent(&rows, &window, &ids, &history), finalized))
    })
    .await;
    let read = match read {
        Ok(Ok(day)) => Ok(day),
        Ok(Err(e)) => {
            error!(error = %e, "status page: reading the ledger failed");
            Err(e.to_string())
        }
        Err(e) => {
            error!(error = %e, "status page: reading the ledger panicked");
            Err("reading the ledger failed".into())
        }
    };
    LedgerDay {
        as_of,
        window,
        read,
    }
}

/// Each tenant's row: live power from the collector's state, the day
/// from `day`.
fn tenant_rows(s: &HttpState, day: &LedgerDay, now: Instant) -> Vec<TenantRow> {
    let tenants = s.state.tenants();
    let live = s.state.tenant_power(&tenants, now);
    let recent = day.read.as_ref().ok().map(|(r, _)| r);
    tenants
        .all()
        .iter()
        .zip(&live)
        .map(|(t, l)| {
            let contract = t.contract();
            let node_mw = (l.node_reporting > 0).then_some(l.node_power_milliwatts);
            let basis_mw = contract.basis_power(l.power_milliwatts, node_mw, l.metered());
            let mine = recent.and_then(|r| r.get(&*t.id));
            TenantRow {
                id: t.id.to_string(),
                name: t.name.clone(),
                contracted_watts: (t.contracted_milliwatts > 0)
                    .then(|| t.contracted_milliwatts as f64 / 1000.0),
                power_watts: l.power_milliwatts as f64 / 1000.0,
                basis: contract.basis.label(),
                basis_power_watts: basis_mw.map(|mw| mw as f64 / 1000.0),
                node_power_watts: node_mw.map(|mw| mw as f64 / 1000.0),
                reporting: l.reporting,
                stale: l.stale,
                // A tenant the day was not read for (another tenant's
                // page) has none; one read with no rows has zeros.
                energy_today_mj: recent.map(|_| mine.map_or(0, |m| m.energy_today_mj)),
                over_contract_today_s: recent.map(|_| mine.map_or(0, |m| m.over_contract_today_s)),
                chart: mine.map(|m| Series {
                    from: day.window.from,
                    bin_seconds: day.window.bin,
                    watts: m.watts.clone(),
                    contract_watts: m.contract_watts.clone(),
                }),
            }
        })
        .collect()
}

/// Liveness: `ok`.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process answers", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 `ready` while ledger commits succeed and the tenant file loaded;
/// otherwise 503 with one reason a line.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "Not ready, one reason a line", body = String, content_type = "text/plain")))]
async fn readyz(Extract(s): Extract<HttpState>) -> Response {
    match s.state.readiness.not_ready() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"),
        (status = 401, description = "No valid API token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs an admin token", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "Rendering failed", body = Problem, content_type = "application/problem+json")))]
async fn metrics(Extract(s): Extract<HttpState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if s.metrics_auth && scope(&s, &headers)? != Scope::Admin {
        return Err(forbidden(&s, "/metrics"));
    }
    // Rendering walks every node: it runs off the async workers, and
    // scrapes arriving meanwhile share its body.
    let state = s.state.clone();
    let detail = crate::metrics::Detail {
        gpus: s.per_gpu_metrics,
        nodes: s.per_node_metrics,
    };
    match s
        .renders
        .get(move || crate::metrics::render_scrape(&state, detail))
        .await
    {
        Ok(body) => {
            Ok(([(header::CONTENT_TYPE, crate::metrics::TEXT_FORMAT)], body).into_response())
        }
        Err(e) => {
            error!(error = %e, "rendering /metrics failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering metrics failed",
            ))
        }
    }
}

/// Where the problem types of this API are named (identifiers, not pages;
/// README's usage API section lists them).
pub const PROBLEM_TYPES: &str = "https://capwatch.invalid/problems/";

/// An API error, answered as an RFC 9457 problem document
/// (`application/problem+json`).
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    /// The last part of the problem type; `None`: `about:blank`, the
    /// status says it all.
    kind: Option<&'static str>,
    detail: String,
    parameter: Option<String>,
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// The problem type: `about:blank` for a plain HTTP status, else one
    /// of this API's (under `https://capwatch.invalid/problems/`).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What was wrong, for people.
    pub detail: String,
    /// The query parameter at fault, where one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// The same as `detail`: the field of the error bodies before problem
    /// documents, kept for their clients.
    pub error: String,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind: None,
            detail: detail.into(),
            parameter: None,
        }
    }

    fn problem(&self) -> Problem {
        let title = match self.kind {
            None => self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            Some(kind) => {
                let mut t = kind.replace('-', " ");
                t[..1].make_ascii_uppercase();
                t
            }
        };
        Problem {
            kind: self.kind.map_or_else(
                || "about:blank".to_string(),
                |k| format!("{PROBLEM_TYPES}{k}"),
            ),
            title,
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            parameter: self.parameter.clone(),
            error: self.detail.clone(),
        }
    }
}

impl From<UsageError> for ApiError {
    fn from(e: UsageError) -> Self {
        let status = match e {
            UsageError::UnknownTenant(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            status,
            kind: Some(e.kind()),
            parameter: e.param().map(str::to_string),
            detail: e.to_string(),
        }
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        error!(error = %e, "reading the ledger failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reading the ledger failed",
        )
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Usage(e) => e.into(),
            QueryError::Ledger(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_string(&self.problem()).unwrap_or_default();
        let mut r = (self.status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

const PROBLEM_JSON: &str = "application/problem+json";
const CSV: &str = "text/csv; charset=utf-8; header=present";

/// A query string the extractor refused (an unknown or repeated
/// parameter), as a problem naming the parameter where the message does.
fn rejected(e: QueryRejection) -> ApiError {
    let text = e.body_text();
    let parameter = text
        .split('`')
        .nth(1)
        .filter(|p| p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .map(str::to_string);
    ApiError {
        status: StatusCode::BAD_REQUEST,
        kind: Some("invalid-parameter"),
        detail: text,
        parameter,
    }
}

/// No route: a problem, not an empty body.
async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such path: {}", uri.path()),
    )
}

/// A route that does not take the method (axum adds `Allow`).
async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed here"),
    )
}

/// Whether the client's `Accept` prefers CSV to JSON. Each type takes the
/// q-value of the most specific range that matches it (RFC 9110: a type
/// refused with `q=0` stays refused under `*/*`); the higher q wins, then
/// the type named over one matched by a wildcard; a tie, or no header, is
/// JSON.
fn accepts_csv(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    // (specificity, q) of the most specific range matching each type.
    type Match = Option<(u8, f32)>;
    let (mut json, mut csv): (Match, Match) = (None, None);
    let take = |slot: &mut Match, specificity: u8, q: f32| {
        if slot.is_none_or(|(s, _)| specificity > s) {
            *slot = Some((specificity, q));
        }
    };
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| {
                let (name, value) = p.split_once('=')?;
                name.trim().eq_ignore_ascii_case("q").then(|| value.trim())
            })
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0)
            .clamp(0.0, 1.0);
        match media.as_str() {
            "application/json" => take(&mut json, 3, q),
            "text/csv" => take(&mut csv, 3, q),
            "application/*" => take(&mut json, 2, q),
            "text/*" => take(&mut csv, 2, q),
            "*/*" => {
                take(&mut json, 1, q);
                take(&mut csv, 1, q);
            }
            _ => {}
        }
    }
    match (csv, json) {
        (Some((_, c)), _) if c <= 0.0 => false,
        (Some(_), None) => true,
        (Some((cs, c)), Some((js, j))) => c > j || (c == j && cs > js),
        (None, _) => false,
    }
}

/// The format asked: `format` where given, else by `Accept`.
fn format_of(param: Option<&str>, headers: &HeaderMap) -> Result<Format, ApiError> {
    let format = match param {
        Some(f) => Format::parse(f)?,
        None if accepts_csv(headers) => Format::Csv,
        None => Format::Json,
    };
    if format == Format::Table {
        return Err(UsageError::Format("table".into()).into());
    }
    Ok(format)
}

#[derive(Debug, Serialize, ToSchema)]
struct TenantsView {
    tenants: Vec<TenantView>,
}

#[derive(Debug, Serialize, ToSchema)]
struct TenantView {
    id: String,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    contracted_power_watts: Option<f64>,
    power_watts: f64,
    energy_joules_total: f64,
    gpus_reporting: u64,
    gpus_stale: u64,
}

/// The tenants (a tenant token: its own), with live power and energy.
#[utoipa::path(get, path = "/v1/tenants", tag = "usage",
    responses(
        (status = 200, description = "The tenants", body = TenantsView),
        (status = 401, description = "No valid API token", body = Problem, content_type = "application/problem+json")))]
async fn tenants(Extract(s): Extract<HttpState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let scope = scope(&s, &headers)?;
    let tenants = s.state.tenants();
    let live = s.state.tenant_power(&tenants, Instant::now());
    let totals = s.state.totals();
    let view: Vec<TenantView> = tenants
        .all()
        .iter()
        .zip(&live)
        .filter(|(t, _)| match &scope {
            Scope::Admin => true,
            Scope::Tenant(id) => *t.id == **id,
        })
        .map(|(t, l)| TenantView {
            id: t.id.to_string(),
            name: t.name.clone(),
            contracted_power_watts: (t.contracted_milliwatts > 0)
                .then(|| t.contracted_milliwatts as f64 / 1000.0),
            power_watts: l.power_milliwatts as f64 / 1000.0,
            energy_joules_total: totals.get(&t.id).map_or(0, |x| x.energy_millijoules) as f64
                / 1000.0,
            gpus_reporting: l.reporting,
            gpus_stale: l.stale,
        })
        .collect();
    Ok(json(&TenantsView { tenants: view }))
}

/// The parameters of `/v1/usage` and `/v1/tenants/{id}/usage`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UsageParams {
    /// Start of the period, inclusive, on a row boundary (RFC 3339).
    #[param(required, format = DateTime, value_type = String, example = "2027-01-01T00:00:00Z")]
    from: Option<String>,
    /// End of the period, exclusive, on a row boundary (RFC 3339).
    #[param(required, format = DateTime, value_type = String, example = "2027-01-01T03:00:00Z")]
    to: Option<String>,
    /// Row length (default 1h).
    #[param(value_type = Option<StepName>)]
    step: Option<String>,
    /// IANA time zone the rows are cut in (default UTC).
    #[param(example = "Europe/Berlin")]
    tz: Option<String>,
    /// json (default) or csv; without it, `Accept: text/csv` asks CSV.
    #[param(value_type = Option<FormatName>)]
    format: Option<String>,
    /// Only the adjustments booked after this revision.
    #[param(value_type = Option<u64>)]
    since_revision: Option<String>,
}

/// Row lengths.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // named for the OpenAPI document; parsed as text
enum StepName {
    #[serde(rename = "1m")]
    Minute,
    #[serde(rename = "15m")]
    Quarter,
    #[serde(rename = "1h")]
    Hour,
    #[serde(rename = "1d")]
    Day,
    #[serde(rename = "month")]
    Month,
    #[serde(rename = "total")]
    Total,
}

/// Answer formats.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // named for the OpenAPI document; parsed as text
enum FormatName {
    #[serde(rename = "json")]
    Json,
    #[serde(rename = "csv")]
    Csv,
}

/// What `/v2/usage` rows are per.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // named for the OpenAPI document; parsed as text
enum GroupByName {
    #[serde(rename = "tenant")]
    Tenant,
    #[serde(rename = "node")]
    Node,
    #[serde(rename = "gpu")]
    Gpu,
}

/// The parameters of `/v2/usage` (parsed from the query string by
/// `page_request`, where `tenant` may repeat; this is their description).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // named for the OpenAPI document
struct PageParams {
    /// A tenant to answer; repeat for several. None: every tenant the
    /// token may read.
    tenant: Option<Vec<String>>,
    /// Start of the period, inclusive, on a row boundary (RFC 3339).
    #[param(format = DateTime, example = "2027-01-01T00:00:00Z")]
    from: String,
    /// End of the period, exclusive, on a row boundary (RFC 3339).
    #[param(format = DateTime, example = "2027-01-01T03:00:00Z")]
    to: String,
    /// Row length (default 1h); `total`: one row for the whole period.
    step: Option<StepName>,
    /// IANA time zone the rows are cut in (default UTC).
    #[param(example = "Europe/Berlin")]
    tz: Option<String>,
    /// Steps 1d and month only: rows start at this instant's local time
    /// of day (and, for months, day of the month) instead of midnight on
    /// the 1st.
    #[param(format = DateTime, example = "2026-01-15T00:00:00Z")]
    anchor: Option<String>,
    /// Only the adjustments booked after this revision.
    since_revision: Option<u64>,
    /// Rows per page (default 1000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u32>,
    /// `next_page_token` of the previous page, with the same other
    /// parameters.
    page_token: Option<String>,
    /// Rows per tenant (default), per tenant and node, or per tenant,
    /// node and GPU: a node row has the tenant's figures on that node
    /// alone, without what the tenant's contract or meters decide as a
    /// whole (contracted power, capacity utilization, peak demand, p95,
    /// time over contract, overage, facility energy); a GPU row has the
    /// GPU's figures alone (no whole-node energy either), from the
    /// ledger's per-GPU hours: its steps must be whole hours (1h, 1d,
    /// month, total; `step` is refused otherwise), and a period from
    /// before the ledger kept every GPU's hours is refused (`from`).
    group_by: Option<GroupByName>,
    /// json (default) or csv; without it, `Accept: text/csv` asks CSV.
    format: Option<FormatName>,
}

/// A query string that does not parse (a repeated or unknown parameter)
/// gets the same problem body as any other bad request.
fn params(p: Result<Query<UsageParams>, QueryRejection>) -> Result<UsageParams, ApiError> {
    p.map(|Query(p)| p).map_err(rejected)
}

/// One tenant's rows.
#[utoipa::path(get, path = "/v1/tenants/{id}/usage", tag = "usage",
    params(("id" = String, Path, description = "Tenant id"), UsageParams),
    responses(
        (status = 200, description = "The tenant's rows", content(
            (Report = "application/json"), (String = "text/csv"))),
        (status = 400, description = "A parameter is wrong", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Another tenant's token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "The ledger could not be read", body = Problem, content_type = "application/problem+json")))]
async fn tenant_usage(
    Extract(s): Extract<HttpState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    p: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if let Scope::Tenant(own) = scope(&s, &headers)?
        && own != id
    {
        return Err(forbidden(&s, &format!("tenant {id:?}")));
    }
    usage_response(s, Some(id), params(p)?, &headers).await
}

/// Every tenant's rows; a tenant token gets its own only.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageParams),
    responses(
        (status = 200, description = "Every tenant's rows (at most 10000)", content(
            (Report = "application/json"), (String = "text/csv"))),
        (status = 400, description = "A parameter is wrong", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "A tenant token's tenant is not known", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "The ledger could not be read", body = Problem, content_type = "application/problem+json")))]
async fn all_usage(
    Extract(s): Extract<HttpState>,
    headers: HeaderMap,
    p: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let tenant = match scope(&s, &headers)? {
        Scope::Admin => None,
        Scope::Tenant(own) => Some(own),
    };
    usage_response(s, tenant, params(p)?, &headers).await
}

/// The parameters of `/v1/meters`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct MeterParams {
    /// Start of the period, inclusive, on a row boundary (RFC 3339).
    #[param(required, format = DateTime, value_type = String, example = "2027-01-01T00:00:00Z")]
    from: Option<String>,
    /// End of the period, exclusive, on a row boundary (RFC 3339).
    #[param(required, format = DateTime, value_type = String, example = "2027-01-01T03:00:00Z")]
    to: Option<String>,
    /// Row length (default 1h).
    #[param(value_type = Option<StepName>)]
    step: Option<String>,
    /// IANA time zone the rows are cut in (default UTC).
    tz: Option<String>,
    /// json (default) or csv; without it, `Accept: text/csv` asks CSV.
    #[param(value_type = Option<FormatName>)]
    format: Option<String>,
}

/// `POST /v1/nodes/{node}/retire` (admin): forgets a node that is gone
/// for good, so that its series and `CapwatchAgentDown` stop; its history
/// stays in the ledger, and a Hello brings it back. 404 for a node this
/// collector does not know, 409 for one streaming now.
#[utoipa::path(post, path = "/v1/nodes/{node}/retire", tag = "operations",
    params(("node" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node is retired", body = Retired),
        (status = 401, description = "No valid API token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs an admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No node of that id is known to this collector", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The node is streaming now", body = Problem, content_type = "application/problem+json")))]
async fn retire_node(
    Extract(s): Extract<HttpState>,
    headers: HeaderMap,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    if scope(&s, &headers)? != Scope::Admin {
        return Err(forbidden(&s, "retiring a node"));
    }
    match s.state.retire_node(&node) {
        Ok(()) => {
            tracing::info!(%node, "node retired: it leaves the series until it says Hello again");
            let body = serde_json::to_string(&Retired {
                node,
                retired: true,
            })
            .unwrap_or_default();
            Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
        }
        Err(e) => {
            let status = match e {
                crate::fleet::RetireError::Unknown => StatusCode::NOT_FOUND,
                crate::fleet::RetireError::Streaming => StatusCode::CONFLICT,
            };
            Err(ApiError::new(status, format!("node {node:?}: {e}")))
        }
    }
}

/// The answer to a retirement.
#[derive(Debug, Serialize, ToSchema)]
pub struct Retired {
    /// The node retired.
    pub node: String,
    /// Always true.
    pub retired: bool,
}

/// The facility meters' reconciliation: admin tokens only (it names every
/// tenant under each meter).
#[utoipa::path(get, path = "/v1/meters", tag = "usage", params(MeterParams),
    responses(
        (status = 200, description = "Each meter's energy against what it allocated", content(
            (serde_json::Value = "application/json"), (String = "text/csv"))),
        (status = 400, description = "A parameter is wrong", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs an admin token", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "The ledger could not be read", body = Problem, content_type = "application/problem+json")))]
async fn meters_view(
    Extract(s): Extract<HttpState>,
    headers: HeaderMap,
    p: Result<Query<MeterParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    if scope(&s, &headers)? != Scope::Admin {
        return Err(forbidden(&s, "/v1/meters"));
    }
    let p = p.map(|Query(p)| p).map_err(rejected)?;
    let format = format_of(p.format.as_deref(), &headers)?;
    let configured: Vec<String> = s
        .state
        .meters()
        .map(|b| b.meters.iter().map(|m| m.spec.id.clone()).collect())
        .unwrap_or_default();
    let ledger = s.ledger.clone();
    let report = tokio::task::spawn_blocking(move || {
        let guard = lock(&ledger);
        let reader: &dyn LedgerReader = &**guard;
        usage::meters::run(
            reader,
            &configured,
            p.from.as_deref(),
            p.to.as_deref(),
            p.step.as_deref(),
            p.tz.as_deref(),
        )
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("meters query failed: {e}"),
        )
    })?
    .map_err(ApiError::from)?;
    Ok(match format {
        Format::Csv => ([(header::CONTENT_TYPE, CSV)], usage::meters::csv(&report)).into_response(),
        _ => json(&report),
    })
}

async fn usage_response(
    s: HttpState,
    tenant: Option<String>,
    p: UsageParams,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let format = format_of(p.format.as_deref(), headers)?;
    let tenants = s.state.tenants();
    // The meters' node globs: which of a tenant's nodes a meter feeds.
    let meters: Vec<crate::meters::MeterSpec> = s
        .state
        .meters()
        .map(|b| b.meters.iter().map(|m| m.spec.clone()).collect())
        .unwrap_or_default();
    let (state, ledger, recorded) = (s.state.clone(), s.ledger.clone(), s.ledger_history.clone());
    let report = tokio::task::spawn_blocking(move || {
        let guard = lock(&ledger);
        let reader: &dyn LedgerReader = &**guard;
        let history = recorded
            .get(reader, || state.tenant_history())
            .map_err(QueryError::Ledger)?;
        usage::run(
            reader,
            &tenants,
            &history,
            &meters,
            tenant.as_deref(),
            p.from.as_deref(),
            p.to.as_deref(),
            p.step.as_deref(),
            p.tz.as_deref(),
            p.since_revision.as_deref(),
        )
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("usage query failed: {e}"),
        )
    })?
    .map_err(ApiError::from)?;
    Ok(match format {
        Format::Csv => csv_response(usage::csv(&report))?,
        _ => json(&report),
    })
}

/// The parameters of `/v2/usage` from the raw query string: `tenant` may
/// repeat, any other parameter once; an unknown one is refused.
fn page_request(raw: Option<&str>) -> Result<(PageRequest, Option<String>), UsageError> {
    let mut req = PageRequest::default();
    let mut format = None;
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let slot = match &*k {
            "tenant" => {
                req.tenants.push(v.into_owned());
                continue;
            }
            "from" => &mut req.from,
            "to" => &mut req.to,
            "step" => &mut req.step,
            "tz" => &mut req.tz,
            "anchor" => &mut req.anchor,
            "since_revision" => &mut req.since_revision,
            "limit" => &mut req.limit,
            "page_token" => &mut req.page_token,
            "group_by" => &mut req.group_by,
            "format" => &mut format,
            _ => {
                return Err(UsageError::Parameter {
                    param: k.chars().take(64).collect(),
                    why: "is not a parameter of this API",
                });
            }
        };
        if slot.is_some() {
            return Err(UsageError::Parameter {
                param: k.into_owned(),
                why: "is given more than once",
            });
        }
        *slot = Some(v.into_owned());
    }
    Ok((req, format))
}

/// Usage rows a page at a time, for one, several or every tenant.
#[utoipa::path(get, path = "/v2/usage", tag = "usage", params(PageParams),
    responses(
        (status = 200, description = "A page of rows; in CSV, the page's revision, watermark and next page token are in the headers", content(
            (Page = "application/json"), (String = "text/csv")),
            headers(
                ("Capwatch-Revision" = u64, description = "The page's `revision`"),
                ("Capwatch-Finalized-Through" = String, description = "The page's `finalized_through`"),
                ("Capwatch-Next-Page-Token" = String, description = "The page's `next_page_token`, where there is a next page"))),
        (status = 400, description = "A parameter is wrong (named in `parameter`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Another tenant's token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "The ledger could not be read", body = Problem, content_type = "application/problem+json")))]
async fn usage_pages(
    Extract(s): Extract<HttpState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let scope = scope(&s, &headers)?;
    let (mut req, format) = page_request(raw.as_deref())?;
    let format = format_of(format.as_deref(), &headers)?;
    if let Scope::Tenant(own) = scope {
        if let Some(other) = req.tenants.iter().find(|t| **t != own) {
            return Err(forbidden(&s, &format!("tenant {other:?}")));
        }
        if req.tenants.is_empty() {
            req.tenants.push(own);
        }
    }
    // Checked before the ledger is taken: a bad request holds no one up.
    let query = usage::PageQuery::parse(&req)?;
    let tenants = s.state.tenants();
    let meters: Vec<crate::meters::MeterSpec> = s
        .state
        .meters()
        .map(|b| b.meters.iter().map(|m| m.spec.clone()).collect())
        .unwrap_or_default();
    let (state, ledger, recorded) = (s.state.clone(), s.ledger.clone(), s.ledger_history.clone());
    let page: Page = tokio::task::spawn_blocking(move || {
        let guard = lock(&ledger);
        let reader: &dyn LedgerReader = &**guard;
        let history = recorded
            .get(reader, || state.tenant_history())
            .map_err(QueryError::Ledger)?;
        usage::page(reader, &tenants, &history, &meters, &query)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("usage query failed: {e}"),
        )
    })?
    .map_err(ApiError::from)?;
    let mut r = match format {
        Format::Csv => csv_response(usage::page_csv(&page))?,
        _ => json(&page),
    };
    let h = r.headers_mut();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = header::HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set("capwatch-revision", &page.revision.to_string());
    set("capwatch-finalized-through", &page.finalized_through);
    if let Some(t) = &page.next_page_token {
        set("capwatch-next-page-token", t);
    }
    Ok(r)
}

/// The OpenAPI 3 document of this HTTP API (also checked in as
/// `collector/openapi.json`; a test keeps the two equal).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "capwatch collector",
        description = "Usage for billing jobs, and the collector's operations endpoints. Errors are RFC 9457 problem documents."
    ),
    paths(
        usage_pages, all_usage, tenant_usage, tenants, meters_view, retire_node, status_page,
        tenant_status_page,
        metrics, healthz, readyz, openapi_json
    ),
    components(schemas(Problem, Page, Report, Retired, StepName, FormatName, GroupByName)),
    modifiers(&TimedOut),
    tags(
        (name = "usage", description = "Usage for billing jobs"),
        (name = "operations", description = "Probes, metrics and the status page")
    )
)]
pub struct ApiDoc;

/// Every route may answer 408 (`http_request_timeout`), with a problem
/// document: said once for all operations.
struct TimedOut;

impl utoipa::Modify for TimedOut {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let timed_out = ResponseBuilder::new()
            .description("The request took longer than `http_request_timeout`")
            .content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        for item in doc.paths.paths.values_mut() {
            if let Some(op) = item.get.as_mut() {
                op.responses
                    .responses
                    .insert("408".into(), timed_out.clone().into());
            }
        }
    }
}

/// The document as served and checked in.
pub fn openapi_text() -> String {
    // The document is built from static types: it always serialises.
    ApiDoc::openapi().to_pretty_json().unwrap_or_default() + "\n"
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document", body = Object, content_type = "application/json")))]
async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_text()).into_response()
}

/// A CSV body, or a 500 naming why it could not be written.
fn csv_response(body: Result<String, csv::Error>) -> Result<Response, ApiError> {
    match body {
        Ok(body) => Ok(([(header::CONTENT_TYPE, CSV)], body).into_response()),
        Err(e) => {
            error!(error = %e, "writing CSV failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing CSV failed: {e}"),
            ))
        }
    }
}

fn json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Beyond its bound the status pages' kept minutes drop the page read
    /// longest ago, not every page: the pages read most keep theirs.
    #[test]
    fn status_kept_drops_the_page_read_longest_ago() {
        let kept = StatusKept::default();
        let page = |i: usize| (i > 0).then(|| format!("t{i}"));
        for i in 0..STATUS_KEPT_PAGES {
            kept.put(page(i), Some(recent::Kept::default()));
        }
        // The overview read again: now the newest.
        let overview = kept.take(&None);
        assert!(overview.is_some());
        kept.put(None, overview);
        kept.put(page(STATUS_KEPT_PAGES), Some(recent::Kept::default()));
        let pages = lock(&kept.0);
        assert_eq!(pages.len(), STATUS_KEPT_PAGES);
        assert!(pages.contains_key(&None));
        assert!(!pages.contains_key(&page(1)), "t1 was read longest ago");
        assert!(pages.contains_key(&page(STATUS_KEPT_PAGES)));
    }

    /// The OpenAPI document checked in is the one the types make
    /// (`UPDATE_EXPECT=1` rewrites it after a change to the API).
    #[test]
    fn the_checked_in_openapi_document_is_the_generated_one() {
        expect_test::expect_file!["../openapi.json"].assert_eq(&openapi_text());
    }

    /// Every exact amount (`*_millijoules`) is documented as a decimal
    /// string, as it is served: a schema that says integer makes a
    /// generated client reject the answer, or read it as a double.
    #[test]
    fn every_millijoule_amount_is_documented_as_a_decimal_string() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_text()).unwrap();
        let mut amounts = 0;
        for (schema, body) in doc["components"]["schemas"].as_object().unwrap() {
            let Some(props) = body["properties"].as_object() else {
                continue;
            };
            for (name, prop) in props {
                if !name.ends_with("_millijoules") {
                    continue;
                }
                amounts += 1;
                let types = match &prop["type"] {
                    serde_json::Value::Array(t) => t.clone(),
                    t => vec![t.clone()],
                };
                assert!(
                    types.contains(&"string".into())
                        && types.iter().all(|t| t == "string" || t == "null"),
                    "{schema}.{name}: {prop}"
                );
                assert!(prop["pattern"].is_string(), "{schema}.{name}: {prop}");
            }
        }
        assert!(amounts >= 8, "{amounts} amounts found");
    }

    /// The CSV of a page has a column for every field a row or an
    /// adjustment has in JSON (as the OpenAPI document lists them, the
    /// optional ones too), and no other: a field added to the rows must
    /// be added to `PAGE_COLUMNS`.
    #[test]
    fn every_json_field_of_a_page_is_a_csv_column() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_text()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let mut fields = std::collections::BTreeSet::from(["record".to_string()]);
        for name in ["Row", "AdjustmentRow"] {
            let props = schemas[name]["properties"].as_object().unwrap();
            fields.extend(props.keys().cloned());
        }
        for part in schemas["PagedRow"]["allOf"].as_array().unwrap() {
            if let Some(props) = part["properties"].as_object() {
                fields.extend(props.keys().cloned());
            }
        }
        let columns: std::collections::BTreeSet<String> =
            usage::PAGE_COLUMNS.iter().map(|c| c.to_string()).collect();
        assert_eq!(columns.len(), usage::PAGE_COLUMNS.len(), "a column twice");
        assert_eq!(fields, columns);
    }

    /// A request that runs out of time is answered 408 with a problem
    /// document, not an empty body.
    #[tokio::test]
    async fn a_timed_out_request_gets_a_problem_document() {
        use tower::ServiceExt;
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(10),
            ))
            .layer(axum::middleware::map_response(problem_for_bare_errors));
        let r = app
            .oneshot(
                axum::http::Request::get("/slow")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let p: Problem = serde_json::from_slice(&body).unwrap();
        assert_eq!((p.status, p.kind.as_str()), (408, "about:blank"));
        assert!(p.detail.contains("http_request_timeout"), "{}", p.detail);
    }

    /// `Accept` decides the format where `format` is not given: CSV only
    /// where it is preferred to JSON.
    #[test]
    fn accept_prefers_csv_only_where_the_client_does() {
        for (accept, csv) in [
            (None, false),
            (Some("text/csv"), true),
            (Some("text/csv;q=0.5, application/json"), false),
            (Some("application/json;q=0.2, text/csv"), true),
            (Some("*/*"), false),
            (Some("text/csv, */*"), true),
            (Some("application/json, text/csv"), false),
            (Some("text/*"), true),
            (Some("image/png"), false),
            // A type the client refuses stays refused under a wildcard;
            // parameter names are not case-sensitive.
            (Some("application/json;q=0, */*"), true),
            (Some("text/csv;q=0, */*"), false),
            (Some("application/json;Q=0.1, text/csv"), true),
            (Some("text/csv;Q=0.1, application/json;q=0.5"), false),
        ] {
            let mut h = HeaderMap::new();
            if let Some(a) = accept {
                h.insert(header::ACCEPT, a.parse().unwrap());
            }
            assert_eq!(accepts_csv(&h), csv, "{accept:?}");
        }
    }
    use crate::ledger::{Ledger, Reader, TenantVersion};
    use crate::tenants::Tenants;

    /// A collector over an empty ledger, with no API tokens.
    fn state_over(path: &std::path::Path) -> HttpState {
        let reader: AnyReader = Box::new(Reader::open(path).unwrap());
        let state = State::new(
            crate::state::StateConfig {
                stale_after: None,
                max_gpus_per_node: 8,
                max_clock_skew: Duration::from_secs(600),
                max_sample_age: Duration::from_secs(7 * 86_400),
            },
            Tenants::empty(),
        );
        HttpState {
            per_gpu_metrics: false,
            per_node_metrics: false,
            state: Arc::new(state),
            ledger: Arc::new(Mutex::new(reader)),
            metrics_auth: false,
            request_timeout: Duration::from_secs(30),
            finalize_grace: Duration::from_secs(600),
            renders: Default::default(),
            ledger_history: Default::default(),
            status_kept: Default::default(),
        }
    }

    /// A bad page request is refused without waiting for the ledger: its
    /// parameters are checked before the ledger is taken, so a client
    /// sending bad requests holds no one else's up.
    #[tokio::test]
    async fn a_bad_page_request_is_refused_while_the_ledger_is_busy() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let _ledger = Ledger::create(&path).unwrap();
        let s = state_over(&path);
        let app = router(s.clone());
        // Another request holds the ledger until told to let go.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let ledger = s.ledger.clone();
        let holder = std::thread::spawn(move || {
            let _guard = lock(&ledger);
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        held_rx.recv().unwrap();
        let mut answers = Vec::new();
        for query in [
            "from=2027-01-01T00:30:00Z&to=2027-01-01T02:00:00Z",
            "from=2027-01-01T00:00:00Z&to=2047-01-01T00:00:00Z&step=1d",
            "from=2027-01-01T00:00:00Z&to=2027-01-02T00:00:00Z&page_token=garbled",
        ] {
            let request = axum::http::Request::get(format!("/v2/usage?{query}"))
                .body(axum::body::Body::empty())
                .unwrap();
            // A bound on failure, not a synchronisation: the answer needs
            // no ledger, and without the check it never comes.
            let r =
                tokio::time::timeout(Duration::from_secs(20), app.clone().oneshot(request)).await;
            answers.push((query, r.map(|r| r.unwrap().status())));
        }
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        for (query, status) in answers {
            assert_eq!(status, Ok(StatusCode::BAD_REQUEST), "{query}");
        }
    }

    #[test]
    fn usage_contracts_come_from_every_version_the_ledger_recorded() {
        // The collector forgets versions samples can no longer reach, but
        // minutes are kept longer: the usage API reads the ledger's.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::create(&path).unwrap();
        let reader = Reader::open(&path).unwrap();
        let file = |kw: u32| format!("[[tenant]]\nid = \"a\"\ncontracted_kw = {kw}\n");
        let fallback = || {
            Arc::new(TenantHistory::new(Arc::new(
                Tenants::from_toml(&file(9)).unwrap(),
            )))
        };
        let recorded = LedgerHistory::default();
        let contracts = |h: &TenantHistory| h.contracts_by_tenant()["a"].clone();
        // None recorded: the collector's.
        let h = recorded.get(&reader, fallback).unwrap();
        assert_eq!(contracts(&h), [(i64::MIN, 9_000_000)]);
        let mut add = |from: i64, kw: u32| {
            l.add_tenant_version(&TenantVersion {
                effective_from_ns: from,
                loaded_at_ns: from,
                file: file(kw),
            })
            .unwrap()
        };
        add(0, 2);
        add(100, 1);
        let h = recorded.get(&reader, fallback).unwrap();
        assert_eq!(contracts(&h), [(i64::MIN, 2_000_000), (100, 1_000_000)]);
        // Parsed once; again when a version is added.
        assert!(Arc::ptr_eq(&h, &recorded.get(&reader, fallback).unwrap()));
        add(200, 3);
        let h = recorded.get(&reader, fallback).unwrap();
        assert_eq!(
            contracts(&h),
            [(i64::MIN, 2_000_000), (100, 1_000_000), (200, 3_000_000)]
        );
    }
}
