//! Liveness, readiness and the Prometheus endpoint.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::AppState;

/// Liveness: the process answers.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Readiness: not draining, both stores answer, and the last commit succeeded.
pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "draining"})),
        );
    }
    let not_ready = |reason: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        )
    };
    if let Err(reason) = crate::payments::readiness(&state.core).await {
        return not_ready(reason.as_str());
    }
    (StatusCode::OK, Json(json!({"status": "ready"})))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
