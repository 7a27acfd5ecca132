//! The HTTP side: `/metrics` and `/healthz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::Registry;
use tracing::error;

#[derive(Clone)]
pub struct HttpState {
    pub registry: Arc<Registry>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

async fn metrics(Extract(s): Extract<HttpState>) -> Response {
    // Rendering walks every node; keep it off the async workers.
    let registry = s.registry.clone();
    match tokio::task::spawn_blocking(move || crate::metrics::render(&registry)).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Ok(Err(e)) => {
            error!(error = %e, "rendering /metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("rendering metrics failed: {e}\n"),
            )
                .into_response()
        }
        Err(e) => {
            error!(error = %e, "rendering /metrics panicked");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering metrics failed\n",
            )
                .into_response()
        }
    }
}
