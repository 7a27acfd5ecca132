//! The HTTP side: `/metrics`, `/healthz`, `/readyz` and the usage API for billing
//! jobs (`/v1/tenants`, `/v1/tenants/{id}/usage`, `/v1/usage`).
//!
//! *Boundary:* query strings are untrusted; errors map to an HTTP status
//! with a JSON body naming the problem, here and nowhere else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State as Extract};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tower_http::timeout::TimeoutLayer;
use tracing::error;

use crate::auth::{self, Scope};
use crate::events::{AuthReason, AuthRefused, Surface};
use crate::ledger::{AnyReader, DAY, LedgerError, LedgerReader};
use crate::state::State;
use crate::status::{StaleNode, StatusView, TenantRow};
use crate::sync::lock;
use crate::tenants::TenantHistory;
use crate::usage::{self, Format, QueryError, UsageError};

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
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        // Always open: it says "ok" and nothing else, for probes.
        .route("/healthz", get(|| async { "ok\n" }))
        // Always open too: readiness, 503 with the reasons (no secrets).
        .route("/readyz", get(readyz))
        .route("/v1/tenants", get(tenants))
        .route("/v1/tenants/{id}/usage", get(tenant_usage))
        .route("/v1/usage", get(all_usage))
        .route("/v1/meters", get(meters_view))
        .with_state(state)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
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
        ApiError(StatusCode::UNAUTHORIZED, format!("API token: {e}"))
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
    ApiError(
        StatusCode::FORBIDDEN,
        format!("{what} needs an admin token"),
    )
}

/// The status page shows every tenant: with API tokens configured, it
/// needs an admin token.
async fn status_page(
    Extract(s): Extract<HttpState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if scope(&s, &headers)? != Scope::Admin {
        return Err(forbidden(&s, "the status page"));
    }
    Ok(crate::status::page(&status_view(&s).await))
}

/// What the status page shows now: each tenant's live power against its
/// contract, its energy of today (UTC) from the ledger, and the stale nodes.
async fn status_view(s: &HttpState) -> StatusView {
    let now = Instant::now();
    let tenants = s.state.tenants();
    let live = s.state.tenant_power(&tenants, now);
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

    let today = crate::sync::now_unix().div_euclid(DAY) * DAY;
    let (energy_today, ledger_error) = energy_between(s, today, today + DAY).await;

    let rows: Vec<TenantRow> = tenants
        .all()
        .iter()
        .zip(&live)
        .map(|(t, l)| {
            let contract = t.contract();
            let node_mw = (l.node_reporting > 0).then_some(l.node_power_milliwatts);
            let basis_mw = contract.basis_power(l.power_milliwatts, node_mw, l.metered());
            (t, l, contract, node_mw, basis_mw)
        })
        .map(|(t, l, contract, node_mw, basis_mw)| TenantRow {
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
            energy_today_mj: energy_today
                .as_ref()
                .map(|e| e.get(&*t.id).copied().unwrap_or(0)),
        })
        .collect();
    StatusView {
        tenants: rows,
        stale_nodes,
        today,
        ledger_error,
    }
}

/// Energy per tenant committed to the ledger in `[from, to)` (Unix
/// seconds), or the reason it could not be read.
async fn energy_between(
    s: &HttpState,
    from: i64,
    to: i64,
) -> (Option<HashMap<String, u64>>, Option<String>) {
    let ledger = s.ledger.clone();
    let read = tokio::task::spawn_blocking(move || lock(&ledger).usage(None, from, to)).await;
    match read {
        Ok(Ok(usage)) => {
            let mut by_tenant: HashMap<String, u64> = HashMap::new();
            for (tenant, span) in usage.spans {
                let e = by_tenant.entry(tenant).or_default();
                *e = e.saturating_add(span.delta.energy_mj);
            }
            (Some(by_tenant), None)
        }
        Ok(Err(e)) => {
            error!(error = %e, "status page: reading the ledger failed");
            (None, Some(e.to_string()))
        }
        Err(e) => {
            error!(error = %e, "status page: reading the ledger panicked");
            (None, Some("reading the ledger failed".into()))
        }
    }
}

/// 200 `ready` while ledger commits succeed and the tenant file loaded;
/// otherwise 503 with one reason a line.
async fn readyz(Extract(s): Extract<HttpState>) -> Response {
    match s.state.readiness.not_ready() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

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
        .get(move || crate::metrics::render_text(&state, detail))
        .await
    {
        Ok(body) => {
            Ok(([(header::CONTENT_TYPE, crate::metrics::TEXT_FORMAT)], body).into_response())
        }
        Err(e) => {
            error!(error = %e, "rendering /metrics failed");
            Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering metrics failed".into(),
            ))
        }
    }
}

/// An API error: the status and a JSON body `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl From<UsageError> for ApiError {
    fn from(e: UsageError) -> Self {
        let status = match e {
            UsageError::UnknownTenant(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, e.to_string())
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        error!(error = %e, "reading the ledger failed");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reading the ledger failed".into(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.1 }).to_string();
        let mut r = (self.0, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

#[derive(Debug, Serialize)]
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
    Ok(json(&serde_json::json!({ "tenants": view })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    tz: Option<String>,
    format: Option<String>,
    since_revision: Option<String>,
}

/// A query string that does not parse (a repeated or unknown parameter)
/// gets the same JSON error body as any other bad request.
fn params(p: Result<Query<UsageParams>, QueryRejection>) -> Result<UsageParams, ApiError> {
    p.map(|Query(p)| p)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))
}

async fn tenant_usage(
    Extract(s): Extract<HttpState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    p: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    if let Scope::Tenant(own) = scope(&s, &headers)?
        && own != id
    {
        return Err(forbidden(&s, &format!("tenant {id:?}")));
    }
    usage_response(s, Some(id), params(p)?).await
}

/// Every tenant's rows; a tenant token gets its own only.
async fn all_usage(
    Extract(s): Extract<HttpState>,
    headers: HeaderMap,
    p: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let tenant = match scope(&s, &headers)? {
        Scope::Admin => None,
        Scope::Tenant(own) => Some(own),
    };
    usage_response(s, tenant, params(p)?).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeterParams {
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    tz: Option<String>,
    format: Option<String>,
}

/// The facility meters' reconciliation: admin tokens only (it names every
/// tenant under each meter).
async fn meters_view(
    Extract(s): Extract<HttpState>,
    headers: HeaderMap,
    p: Result<Query<MeterParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    if scope(&s, &headers)? != Scope::Admin {
        return Err(forbidden(&s, "/v1/meters"));
    }
    let p = p
        .map(|Query(p)| p)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let format = Format::parse(p.format.as_deref().unwrap_or("json"))?;
    if format == Format::Table {
        return Err(UsageError::Format("table".into()).into());
    }
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
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("meters query failed: {e}"),
        )
    })?
    .map_err(|e| match e {
        QueryError::Usage(e) => ApiError::from(e),
        QueryError::Ledger(e) => ApiError::from(e),
    })?;
    Ok(match format {
        Format::Csv => (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            usage::meters::csv(&report),
        )
            .into_response(),
        _ => json(&report),
    })
}

async fn usage_response(
    s: HttpState,
    tenant: Option<String>,
    p: UsageParams,
) -> Result<Response, ApiError> {
    let format = Format::parse(p.format.as_deref().unwrap_or("json"))?;
    if format == Format::Table {
        return Err(UsageError::Format("table".into()).into());
    }
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
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("usage query failed: {e}"),
        )
    })?
    .map_err(|e| match e {
        QueryError::Usage(e) => ApiError::from(e),
        QueryError::Ledger(e) => ApiError::from(e),
    })?;
    Ok(match format {
        Format::Csv => (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            usage::csv(&report),
        )
            .into_response(),
        _ => json(&report),
    })
}

fn json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Ledger, Reader, TenantVersion};
    use crate::tenants::Tenants;

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
