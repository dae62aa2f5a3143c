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
    let items: Vec<Value> = state
        .settler
        .store
        .flagged(limit)
        .await?
        .into_iter()
        .map(|f| {
            json!({
                "kind": f.kind,
                "payment_id": f.payment_id,
                "detail": f.detail,
                "created_at": rfc3339(f.created_at_ms),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}
