//! Admin routes: what needs a human.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::AuthAdmin;
use super::error::ApiError;
use super::extract::rfc3339;
use super::AppState;

/// Items one call returns at most.
const MAX_FLAGGED_LIMIT: usize = 1_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlaggedQuery {
    limit: Option<usize>,
}

/// `GET /v1/admin/flagged?limit=N`: settlements whose content conflicts with the stored one,
/// account sequence conflicts (a balance store that rolled back), order-id conflicts — newest
/// first. Later: late money, suspense settlements, overdrafts.
pub async fn flagged(
    State(state): State<Arc<AppState>>,
    _admin: AuthAdmin,
    query: Result<Query<FlaggedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_FLAGGED_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {MAX_FLAGGED_LIMIT}"),
        ));
    }
    let items: Vec<Value> = crate::payments::view::flagged(&state.core, limit)
        .await?
        .into_iter()
        .map(|f| {
            json!({
                "kind": f.kind.as_str(),
                "payment_id": f.payment_id,
                "detail": f.detail,
                "created_at": rfc3339(f.created_at_ms),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// `GET /v1/admin/channels`: every configured channel with its breaker `state` (`closed`,
/// `open`, `half_open`), recent success rate and mean latency over the breaker's window, and
/// calls in flight.
pub async fn channels(State(state): State<Arc<AppState>>, _admin: AuthAdmin) -> Json<Value> {
    let channels: Vec<Value> = state
        .channels
        .statuses(tokio::time::Instant::now())
        .into_iter()
        .map(|c| {
            json!({
                "id": c.id,
                "kind": c.kind.as_str(),
                "priority": c.priority,
                "enabled": c.enabled,
                "state": c.breaker.state.as_str(),
                "admits": c.breaker.admits,
                "success_rate_percent": c.breaker.success_rate_percent,
                "latency_ms": c.breaker.latency_mean_ms,
                "calls_in_window": c.breaker.calls_in_window,
                "in_flight": c.breaker.in_flight,
            })
        })
        .collect();
    Json(json!({ "channels": channels }))
}
