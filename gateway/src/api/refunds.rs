//! `POST /v1/payments/{id}/refunds`: refund all or part of a succeeded payment (DESIGN.md §4,
//! §7). Reads top to bottom: parse at the edge; find the channel attempt that took the money;
//! ONE balance-store step reserves the refundable amount (with the idempotency record, and a
//! top-up refund's hold on the account); the refund is recorded before the channel is called;
//! then `refunds::execute`. Answers `201` with the refund (`pending`, `succeeded` or `failed`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::auth::AuthMerchant;
use super::error::ApiError;
use super::extract::{request_hash, required_idempotency_key, rfc3339, JsonObject};
use super::payments::{attempts_of, owned_payment};
use super::AppState;
use crate::money::{format_minor, Amount};
use crate::preauth::{
    IdempotencyClaim, Method, RefundReserveOutcome, RefundReserveRequest, SettledMark,
    StoredOutcome, REFUND_AMOUNT_PLACEHOLDER, REFUND_ID_PLACEHOLDER, REFUND_NUMBER_PLACEHOLDER,
};
use crate::settlement::AttemptOutcome;
use crate::settlement::{PendingRecord, RefundRecorded, RefundRow};
use crate::telemetry;

/// How long a top-up refund's hold lasts if nothing settles it (the retry loop settles it
/// long before).
const TOPUP_REFUND_HOLD_MS: u64 = 7 * 24 * 3600 * 1000;

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

pub async fn create_refund(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let settings = &state.config.settings;
    let limits = &settings.limits;

    // 1. Parse at the edge.
    let idempotency = required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    body.only(&["amount", "reason"])?;
    let (pid, payment) = owned_payment(&state, &merchant, &id).await?;
    let doc = &payment.doc;
    let amount = body
        .str("amount")?
        .map(|text| {
            Amount::parse(text, doc.currency)
                .map(Amount::minor)
                .map_err(|e| ApiError::invalid("amount", e.to_string()))
        })
        .transpose()?;
    let reason = body.bounded_str("reason", limits.max_reason_chars)?;

    // 2. The attempt that took the money (a balance payment has none).
    let (channel_id, channel_order_id) = if doc.method == Method::Balance {
        (None, None)
    } else {
        let attempts = attempts_of(&state, &payment).await?;
        let paid = attempts
            .iter()
            .rev()
            .find(|a| a.outcome == AttemptOutcome::Succeeded)
            .or_else(|| {
                attempts
                    .iter()
                    .rev()
                    .find(|a| a.outcome == AttemptOutcome::Accepted)
            });
        match paid {
            Some(a) => (Some(a.channel_id.clone()), Some(a.channel_order_id.clone())),
            None => {
                return Err(ApiError::InvalidState {
                    message: "no channel attempt of this payment took money".into(),
                    status: Some(payment.status.as_str().to_owned()),
                })
            }
        }
    };

    // 3. One atomic step: idempotency, state, refundable amount, top-up hold (on a payment the
    // balance store lost, first put back from the settlement store).
    crate::resolution::ensure_payment(&state, &pid)
        .await
        .map_err(|err| {
            tracing::warn!(payment_id = %pid, error = %err, "cannot restore the payment");
            ApiError::Unavailable {
                reason: "settlement_store_unavailable",
                payment_id: Some(pid.to_string()),
            }
        })?;
    let now = telemetry::now_ms();
    let template = PendingRecord::Refund(RefundRow {
        refund_id: REFUND_ID_PLACEHOLDER.into(),
        payment_id: pid.to_string(),
        number: REFUND_NUMBER_PLACEHOLDER,
        amount_minor: REFUND_AMOUNT_PLACEHOLDER,
        currency: doc.currency,
        status: "pending".into(),
        channel_id: channel_id.clone(),
        channel_order_id: channel_order_id.clone(),
        reason: reason.map(str::to_owned),
        created_at_ms: now,
        updated_at_ms: now,
        idempotency_key: Some(idempotency.as_str().to_owned()),
    });
    let request = RefundReserveRequest {
        payment: pid.clone(),
        amount_minor: amount,
        idempotency: IdempotencyClaim {
            key: idempotency.clone(),
            request_hash: request_hash(
                "refund",
                &json!({"payment": pid.as_str(), "amount": amount, "reason": reason}),
            ),
            retention_seconds: settings.preauth.idempotency_retention_seconds,
        },
        hold_expires_at_ms: now + TOPUP_REFUND_HOLD_MS,
        intent_template: template.to_json(),
    };
    let reserved = state.balances.reserve_refund(&request, state.op()).await?;
    let (refund_id, number, amount_minor) = match reserved {
        RefundReserveOutcome::Created {
            refund_id,
            number,
            amount_minor,
        } => (refund_id, number, amount_minor),
        RefundReserveOutcome::Replay(StoredOutcome::Refund(refund_id)) => {
            let refunds = state.settler.store.refunds(pid.as_str()).await?;
            let refund = refunds
                .iter()
                .find(|r| r.refund_id == refund_id)
                .ok_or(ApiError::IdempotencyInFlight)?;
            return Ok((StatusCode::CREATED, Json(render(refund))).into_response());
        }
        RefundReserveOutcome::Replay(StoredOutcome::InsufficientFunds {
            available,
            shortfall,
        })
        | RefundReserveOutcome::InsufficientFunds {
            available,
            shortfall,
        } => {
            return Err(ApiError::InsufficientFunds {
                available: format_minor(available, doc.currency),
                shortfall: format_minor(shortfall, doc.currency),
                currency: doc.currency.code().into(),
            })
        }
        RefundReserveOutcome::Replay(_) | RefundReserveOutcome::IdempotencyConflict => {
            return Err(ApiError::IdempotencyConflict)
        }
        RefundReserveOutcome::IdempotencyInFlight => return Err(ApiError::IdempotencyInFlight),
        RefundReserveOutcome::NotFound => {
            return Err(ApiError::NotFound("no such payment".into()))
        }
        RefundReserveOutcome::InvalidState(status) => {
            return Err(ApiError::InvalidState {
                message: format!(
                    "only a succeeded or partially refunded payment can be refunded; this one is {status}"
                ),
                status: Some(status.as_str().to_owned()),
            })
        }
        RefundReserveOutcome::Exceeds { remaining } => {
            return Err(ApiError::InvalidState {
                message: format!(
                    "the refund is above what is left to refund ({} {})",
                    format_minor(remaining, doc.currency),
                    doc.currency.code()
                ),
                status: Some(payment.status.as_str().to_owned()),
            })
        }
    };

    // 4. Recorded before the channel is called; then the key may replay.
    let mut row = RefundRow {
        refund_id: refund_id.clone(),
        payment_id: pid.to_string(),
        number,
        amount_minor,
        currency: doc.currency,
        status: "pending".into(),
        channel_id,
        channel_order_id,
        reason: reason.map(str::to_owned),
        created_at_ms: now,
        updated_at_ms: now,
        idempotency_key: Some(idempotency.as_str().to_owned()),
    };
    let mark = SettledMark {
        tag: pid.tag(),
        id: refund_id.clone(),
        idempotency_key: idempotency.as_str().to_owned(),
    };
    match state.settler.record_refund(&row, mark, true).await {
        Ok(RefundRecorded::Inserted) => {}
        // This very request's refund, recorded before Redis forgot it (unwound there): the
        // stored refund as it stands is the answer; nothing is sent again.
        Ok(RefundRecorded::AlreadyRecorded) => {
            let refunds = state.settler.store.refunds(pid.as_str()).await?;
            let stored = refunds
                .iter()
                .find(|r| r.refund_id == refund_id)
                .ok_or(ApiError::IdempotencyInFlight)?;
            return Ok((StatusCode::CREATED, Json(render(stored))).into_response());
        }
        // The store knows refunds Redis forgot (both flagged, both unwound in Redis with its
        // refund state set to the store's): nothing is sent to the channel.
        Ok(RefundRecorded::Exceeds { remaining_minor }) => {
            return Err(ApiError::InvalidState {
                message: format!(
                    "the refund is above what is left to refund ({} {})",
                    format_minor(remaining_minor.max(0), doc.currency),
                    doc.currency.code()
                ),
                status: Some(payment.status.as_str().to_owned()),
            })
        }
        Ok(RefundRecorded::Conflict) => {
            return Err(ApiError::Unavailable {
                reason: "account_rebuild_required",
                payment_id: Some(pid.to_string()),
            })
        }
        Err(err) => {
            tracing::warn!(%refund_id, error = %err, "refund reserved but not recorded; recovery will, then the retry loop sends it");
            return Err(ApiError::Unavailable {
                reason: "settlement_store_unavailable",
                payment_id: Some(pid.to_string()),
            });
        }
    }

    // 5. The channel (or, for a balance payment, nothing to call).
    let executed = crate::refunds::execute(&state, &row, doc)
        .await
        .map_err(|err| {
            tracing::warn!(%refund_id, error = %err, "refund execution failed; it stays pending");
            err
        });
    if let Ok(executed) = executed {
        row.status = executed.as_str().to_owned();
    }
    Ok((StatusCode::CREATED, Json(render(&row))).into_response())
}
