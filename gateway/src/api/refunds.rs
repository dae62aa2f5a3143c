//! `POST /v1/payments/{id}/refunds`: refund all or part of a succeeded payment (DESIGN.md §4,
//! §7). Parse at the edge, then `payments::refunds::create` (reserve, record, execute).
//! Answers `201` with the refund (`pending`, `succeeded` or `failed`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::auth::AuthMerchant;
use super::error::ApiError;
use super::extract::{body_fields, required_idempotency_key, rfc3339, JsonBody};
use super::AppState;
use crate::money::format_minor;
use crate::payments::refunds::{self, NewRefund};
use crate::settlement::RefundRow;

/// The refund resource.
pub fn render(refund: &RefundRow) -> Value {
    json!({
        "id": refund.refund_id,
        "payment_id": refund.payment_id,
        "amount": format_minor(refund.amount_minor, refund.currency),
        "currency": refund.currency.code(),
        "status": refund.status,
        "reason": refund.reason,
        "created_at": rfc3339(refund.created_at_ms),
    })
}

body_fields! {
    /// The body of `POST /v1/payments/{id}/refunds`.
    pub struct RefundBody {
        amount: String,
        reason: String,
    }
}

pub async fn create_refund(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody<RefundBody>,
) -> Result<Response, ApiError> {
    let limits = &state.config.settings.limits;
    let key = required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let body = body.into_known()?;
    let new = NewRefund {
        key,
        amount: body.amount.str()?,
        reason: body.reason.bounded_str(limits.max_reason_chars)?,
    };
    let refund = refunds::create(&state.core, &merchant.id, &id, new).await?;
    Ok((StatusCode::CREATED, Json(render(&refund))).into_response())
}
