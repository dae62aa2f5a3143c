//! `POST /v1/callbacks/{channel_id}`: channel notifications in each channel's own protocol
//! (DESIGN.md §5, §7). Reads top to bottom:
//!
//! 1. the channel by id (unknown → 404);
//! 2. the protocol's verification (signature, timestamp window, probe signatures, our
//!    app/merchant id) — refused in the protocol's failure form, nothing changed, counted;
//! 3. content checks: the channel order id belongs to a known attempt *of this channel*
//!    (the settlement store's record, so it holds even if Redis lost the payment), and, for
//!    money, amount and currency equal the payment's (inside `resolution::settle_paid`);
//! 4. the state machine: paid → `succeeded` exactly once (capture / credit / collection);
//!    closed or failed → the hold released; a duplicate or replay → nothing; money for a
//!    payment that already ended (or for an abandoned attempt) → late money, recorded as a
//!    suspense settlement and flagged, never dropped;
//! 5. the acknowledgement, only once the resulting settlement is committed. Store down or
//!    queue full → not acknowledged (5xx): the channel retries.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::channels::{Callback, CallbackAnswer, Channel, NoticeEvent};
use crate::ids::PaymentId;
use crate::preauth::PaymentStatus;
use crate::resolution::{self, ResolveError, Settled};
use crate::settlement::AttemptOutcome;
use crate::settlement::{AttemptRow, AttemptUpdate};
use crate::telemetry;

/// What processing a verified notice decided.
enum Handled {
    /// Acknowledge: processed now, or a genuine duplicate.
    Ack(&'static str),
    /// Refuse for good (mismatched amount): nothing changed.
    Refuse(&'static str),
    /// Not now (store or Redis unavailable, not yet committed): the channel retries.
    Retry(&'static str),
}

pub async fn receive(
    State(state): State<Arc<AppState>>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(entry) = state.channels.get(&channel_id) else {
        telemetry::callback("unknown", "unknown_channel");
        return super::error::ApiError::NotFound("no such channel".into()).into_response();
    };
    let channel = entry.channel.as_ref();
    let callback = Callback {
        headers: &headers,
        body: &body,
    };
    let notice = match channel.verify_callback(&callback, telemetry::now_ms()) {
        Ok(notice) => notice,
        Err(refusal) => {
            tracing::warn!(channel = %channel_id, reason = %refusal, "callback refused");
            telemetry::callback(&channel_id, refusal.label());
            return reply(channel, CallbackAnswer::Refused, "verification failed");
        }
    };
    // The attempt this instance committed before calling the channel, else the store's.
    let cached = state.pending_docs.attempt(&notice.order_id);
    let found = match cached {
        Some(attempt) => Ok(Some(attempt)),
        None => {
            state
                .settler
                .store
                .attempt_by_channel_order(notice.order_id.as_str())
                .await
        }
    };
    let attempt = match found {
        Ok(Some(attempt)) if attempt.channel_id == channel_id => attempt,
        Ok(_) => {
            tracing::warn!(channel = %channel_id, order = %notice.order_id, "callback for an order that is not an attempt of this channel");
            telemetry::callback(&channel_id, "unknown_order");
            return reply(channel, CallbackAnswer::Refused, "unknown order");
        }
        Err(err) => {
            tracing::warn!(channel = %channel_id, error = %err, "callback: the settlement store is unavailable");
            telemetry::callback(&channel_id, "retry");
            return reply(channel, CallbackAnswer::RetryLater, "try again later");
        }
    };
    let handled = handle(&state, &attempt, notice.event).await;
    let (answer, label, message) = match handled {
        Handled::Ack(label) => (CallbackAnswer::Ack, label, ""),
        Handled::Refuse(label) => (CallbackAnswer::Refused, label, "refused"),
        Handled::Retry(label) => (CallbackAnswer::RetryLater, label, "try again later"),
    };
    telemetry::callback(&channel_id, label);
    reply(channel, answer, message)
}

fn reply(channel: &dyn Channel, answer: CallbackAnswer, message: &str) -> Response {
    let reply = channel.callback_reply(answer, message);
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(reply.content_type),
    );
    response
}

async fn handle(state: &AppState, attempt: &AttemptRow, event: NoticeEvent) -> Handled {
    match event {
        NoticeEvent::Paid {
            channel_txn_id,
            amount_minor,
            currency,
        }
        | NoticeEvent::Finished {
            channel_txn_id,
            amount_minor,
            currency,
        } => paid(state, attempt, &channel_txn_id, amount_minor, currency).await,
        NoticeEvent::Closed => unpaid(state, attempt, PaymentStatus::Expired).await,
        NoticeEvent::Failed => unpaid(state, attempt, PaymentStatus::Failed).await,
        NoticeEvent::Refund { .. } => {
            // Refunds are started by the gateway and settled by their own logic; a notice
            // about one changes nothing here.
            tracing::info!(payment_id = %attempt.payment_id, "refund notice acknowledged");
            Handled::Ack("refund_notice")
        }
        NoticeEvent::Other(kind) => {
            tracing::info!(payment_id = %attempt.payment_id, %kind, "notice acknowledged, nothing to do");
            Handled::Ack("ignored")
        }
    }
}

async fn paid(
    state: &AppState,
    attempt: &AttemptRow,
    channel_txn_id: &str,
    amount_minor: i64,
    currency: crate::money::Currency,
) -> Handled {
    // A repeat for an attempt the store already records as the one that succeeded (a
    // channel's duplicate, Alipay's TRADE_FINISHED after TRADE_SUCCESS): acknowledged without
    // a balance-store round trip when the stored payment shows its success committed (the
    // payment row is written with the settlement) and agrees on the money. Anything else
    // takes the full path below, which refuses and flags a mismatch.
    if attempt.outcome == AttemptOutcome::Succeeded {
        match state.settler.store.payment(&attempt.payment_id).await {
            Ok(Some(row))
                if row.amount_minor == amount_minor
                    && row.currency == currency
                    && PaymentStatus::parse(&row.status)
                        .is_some_and(|s| s.is_live() && s != PaymentStatus::Pending) =>
            {
                return Handled::Ack("duplicate");
            }
            Ok(_) => {}
            Err(_) => return Handled::Retry("retry"),
        }
    }
    match resolution::settle_paid(state, attempt, channel_txn_id, amount_minor, currency).await {
        Ok(Settled::Now) => Handled::Ack("processed"),
        Ok(Settled::Already(status)) if status.is_live() => {
            // Settled before (a duplicate, a replay, the loop won the race) — unless the
            // committed success is another transaction: then this is money taken by an
            // abandoned attempt. Decided on the committed capture, never on the attempts'
            // outcomes (written best effort); a success not committed yet is retried.
            match state
                .settler
                .store
                .committed_success(&attempt.payment_id)
                .await
            {
                Ok(Some((channel, txn)))
                    if channel.as_deref() == Some(attempt.channel_id.as_str())
                        && txn.as_deref() == Some(channel_txn_id) =>
                {
                    committed(state, &attempt.payment_id, "duplicate").await
                }
                Ok(Some(_)) => {
                    late_money(
                        state,
                        attempt,
                        channel_txn_id,
                        amount_minor,
                        "abandoned_attempt",
                    )
                    .await
                }
                Ok(None) | Err(_) => Handled::Retry("retry"),
            }
        }
        Ok(Settled::Already(status)) => {
            let reason = match status {
                PaymentStatus::Canceled => "after_cancel",
                PaymentStatus::Expired => "after_expiry",
                _ => "after_failure",
            };
            late_money(state, attempt, channel_txn_id, amount_minor, reason).await
        }
        Err(ResolveError::AmountMismatch { .. }) => Handled::Refuse("amount_mismatch"),
        Err(err) => {
            tracing::warn!(payment_id = %attempt.payment_id, error = %err, "callback not settled; the channel will retry");
            Handled::Retry("retry")
        }
    }
}

/// A duplicate is acknowledged only once what the first one caused is on disk: the payment's
/// final state in the settlement store.
async fn committed(state: &AppState, payment_id: &str, label: &'static str) -> Handled {
    match state.settler.store.payment(payment_id).await {
        Ok(Some(row)) if row.status != PaymentStatus::Pending.as_str() => Handled::Ack(label),
        // Still in the outbox (a commit in flight or failed): recovery commits it; the
        // channel's next retry is acknowledged then.
        Ok(_) | Err(_) => Handled::Retry("retry"),
    }
}

async fn late_money(
    state: &AppState,
    attempt: &AttemptRow,
    channel_txn_id: &str,
    amount_minor: i64,
    reason: &'static str,
) -> Handled {
    match resolution::record_late_money(state, attempt, channel_txn_id, amount_minor, reason).await
    {
        Ok(()) => Handled::Ack("late_money"),
        Err(err) => {
            tracing::warn!(payment_id = %attempt.payment_id, error = %err, "late money not recorded yet; the channel will retry");
            Handled::Retry("retry")
        }
    }
}

/// The channel closed the order unpaid (or the payment failed there): the attempt is dead;
/// when no other attempt can still take money, the payment ends and its hold is released.
async fn unpaid(state: &AppState, attempt: &AttemptRow, to: PaymentStatus) -> Handled {
    let Some(pid) = PaymentId::parse(&attempt.payment_id) else {
        return Handled::Refuse("malformed");
    };
    let record = match resolution::ensure_payment(state, &pid).await {
        Ok(Some(record)) => record,
        Ok(None) | Err(_) => return Handled::Retry("retry"),
    };
    if record.status != PaymentStatus::Pending {
        // Alipay's TRADE_CLOSED after a full refund, or a repeat: nothing to do here.
        return Handled::Ack("duplicate");
    }
    let attempts = match state.settler.store.attempts(pid.as_str()).await {
        Ok(attempts) => attempts,
        Err(_) => return Handled::Retry("retry"),
    };
    let label = if to == PaymentStatus::Failed {
        AttemptOutcome::Failed
    } else {
        AttemptOutcome::Closed
    };
    let update = AttemptUpdate {
        payment_id: pid.as_str().to_owned(),
        attempt: attempt.attempt,
        outcome: label.to_owned(),
        latency_ms: None,
        action: None,
        channel_txn_id: None,
        now_ms: telemetry::now_ms(),
    };
    if let Err(err) = state.settler.save_attempt(update, None).await {
        tracing::warn!(payment_id = %pid, error = %err, "attempt outcome not recorded");
        return Handled::Retry("retry");
    }
    let others_open = attempts
        .iter()
        .any(|a| a.attempt != attempt.attempt && a.outcome.is_open());
    if others_open {
        return Handled::Ack("processed");
    }
    match resolution::settle_unpaid(state, &pid, to).await {
        Ok(_) => Handled::Ack("processed"),
        Err(_) => Handled::Retry("retry"),
    }
}
