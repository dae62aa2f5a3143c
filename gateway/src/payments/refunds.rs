//! Executing refunds (DESIGN.md §7). A refund was reserved in the balance store (the
//! refundable amount checked and reserved atomically; a top-up refund's amount held on the
//! account) and recorded, pending, in the settlement store before anything here runs. Then:
//!
//! - a balance payment's refund needs no channel: it succeeds at once (the account is
//!   credited back);
//! - a channel payment's refund is sent to the channel that took the money, under the
//!   refund's own number (`re_<payment>_<n>`), reused on every retry so the channel refunds
//!   once. Succeeded → the payment's refunded total grows and the settlement is committed
//!   (the refund row ends `succeeded` in the same transaction); a verified refusal → `failed`,
//!   the reservation released; accepted-not-final, a timeout or a channel that cannot be
//!   reached → still `pending`, retried later by the resolution loop (`retry_stale`).
//!
//! Creating one (`create`): the payment and the channel attempt that took the money found;
//! ONE balance-store step reserves the refundable amount (with the idempotency record, and a
//! top-up refund's hold on the account); the refund is recorded (the store caps it too)
//! before the channel is called; then `execute`.
//!
//! Never more than was paid: the reservation is the only way to a refund, and a refund ends
//! once (`refund_finish.lua`).

use super::view;
use super::ResolveError;
use super::{request_hash, Missing, PaymentError, Unavailable};
use crate::channels::{
    ChannelError, ChannelOrderId, ChannelRefundId, RefundOutcome, RefundRequest,
};
use crate::ids::PaymentId;
use crate::ids::{IdempotencyKey, MerchantId};
use crate::money::format_minor;
use crate::money::Amount;
use crate::preauth::{
    refund_outcome_id, PaymentDoc, PaymentStatus, RefundFinishOutcome, RefundFinishRequest,
    SettledMark, StoreError, REFUND_SEQ_PLACEHOLDER, REFUND_STATUS_PLACEHOLDER,
};
use crate::preauth::{
    IdempotencyClaim, Method, RefundReserveOutcome, RefundReserveRequest, StoredOutcome,
    REFUND_AMOUNT_PLACEHOLDER, REFUND_ID_PLACEHOLDER, REFUND_NUMBER_PLACEHOLDER,
};
use crate::settlement::{
    movements, AttemptOutcome, PendingRecord, RefundRecorded, RefundRow, RefundStatus,
    RefundStatusChange,
};
use crate::state::Core;
use crate::telemetry;

/// Sends `refund` of `doc` to its channel (or, for a balance payment, settles it at once) and
/// records the outcome.
pub async fn execute(
    state: &Core,
    refund: &RefundRow,
    doc: &PaymentDoc,
) -> Result<RefundStatus, ResolveError> {
    let outcome = match (&refund.channel_id, &refund.channel_order_id) {
        (Some(channel_id), Some(order_id)) => {
            call_channel(state, refund, doc, channel_id, order_id).await
        }
        _ => RefundStatus::Succeeded,
    };
    match outcome {
        RefundStatus::Succeeded => finish(state, refund, doc, true).await?,
        RefundStatus::Failed => finish(state, refund, doc, false).await?,
        RefundStatus::Pending => {}
    }
    telemetry::refund(outcome.as_str());
    Ok(outcome)
}

async fn call_channel(
    state: &Core,
    refund: &RefundRow,
    doc: &PaymentDoc,
    channel_id: &str,
    order_id: &str,
) -> RefundStatus {
    let (Some(entry), Some(order_id), Some(refund_id)) = (
        state.channels.get(channel_id),
        ChannelOrderId::parse(order_id),
        ChannelRefundId::parse(&refund.refund_id),
    ) else {
        tracing::error!(refund_id = %refund.refund_id, channel = %channel_id, "the refund's channel is not configured; left pending");
        return RefundStatus::Pending;
    };
    let (Ok(amount), Ok(total)) = (
        Amount::from_minor(refund.amount_minor),
        Amount::from_minor(doc.amount_minor),
    ) else {
        return RefundStatus::Failed;
    };
    let request = RefundRequest {
        order_id,
        refund_id,
        amount,
        order_total: total,
        currency: doc.currency,
        reason: refund.reason.clone(),
        notify_url: Some(format!("{}/v1/callbacks/{channel_id}", state.public_url)),
    };
    let result = entry.channel.refund(&request).await;
    telemetry::channel_call(
        channel_id,
        "refund",
        result.as_ref().map_or_else(|e| e.label(), |_| "ok"),
    );
    match result {
        Ok(RefundOutcome::Succeeded { .. }) => RefundStatus::Succeeded,
        Ok(RefundOutcome::Failed { status, .. }) => {
            tracing::warn!(refund_id = %refund.refund_id, %status, "the channel refused the refund");
            RefundStatus::Failed
        }
        Ok(RefundOutcome::Pending { .. }) => RefundStatus::Pending,
        // A verified refusal (or a request the channel can never take): final.
        Err(
            err @ (ChannelError::Declined { .. }
            | ChannelError::Rejected { .. }
            | ChannelError::InvalidRequest { .. }),
        ) => {
            tracing::warn!(refund_id = %refund.refund_id, error = %err, "refund refused");
            RefundStatus::Failed
        }
        // Not sent, or an unknown outcome: the same number is sent again later.
        Err(err) => {
            tracing::warn!(refund_id = %refund.refund_id, error = %err, "refund not confirmed; will retry");
            RefundStatus::Pending
        }
    }
}

/// Ends the refund in the balance store (once), then in the settlement store.
async fn finish(
    state: &Core,
    refund: &RefundRow,
    doc: &PaymentDoc,
    succeeded: bool,
) -> Result<(), ResolveError> {
    let pid = PaymentId::parse(&refund.payment_id)
        .ok_or_else(|| ResolveError::Unknown(refund.payment_id.clone()))?;
    let now = telemetry::now_ms();
    let mut settlement = movements::refund(
        doc,
        pid.tag(),
        refund.number,
        &refund.refund_id,
        refund.channel_id.as_deref(),
        refund.amount_minor,
        PaymentStatus::PartiallyRefunded,
        Some(REFUND_SEQ_PLACEHOLDER),
        now,
    );
    let change = RefundStatusChange {
        refund_id: refund.refund_id.clone(),
        status: RefundStatus::Failed,
        updated_at_ms: now,
    };
    let record = if succeeded {
        // The payment's row says `partially_refunded`: the balance store puts the status it
        // reached in its place (`REFUND_STATUS_PLACEHOLDER`, the one such member).
        let record = PendingRecord::Settlement(settlement.clone()).to_json();
        debug_assert_eq!(record.matches(REFUND_STATUS_PLACEHOLDER).count(), 1);
        record
    } else {
        PendingRecord::RefundStatus(change.clone()).to_json()
    };
    let request = RefundFinishRequest {
        payment: pid.clone(),
        refund_id: refund.refund_id.clone(),
        succeeded,
        pending_record: record,
    };
    let (seq, status) = match state.balances.finish_refund(&request, state.op()).await? {
        RefundFinishOutcome::Done {
            seq,
            payment_status,
        } => (seq, payment_status),
        RefundFinishOutcome::Already(_) => return Ok(()),
        RefundFinishOutcome::NotFound => {
            return Err(StoreError::Corrupt(format!(
                "refund {} is not in the balance store",
                refund.refund_id
            ))
            .into())
        }
    };
    let mark = SettledMark {
        tag: pid.tag(),
        id: refund_outcome_id(&refund.refund_id),
        idempotency_key: String::new(),
    };
    // The outcome is in the outbox already: a failed commit is re-driven by recovery.
    if succeeded {
        if settlement.account_seq.is_some() {
            settlement.account_seq = Some(seq);
        }
        if let Some(row) = settlement.payment.as_mut() {
            row.status = status;
        }
        if let Err(err) = state.settler.settle(settlement, mark).await {
            tracing::warn!(refund_id = %refund.refund_id, error = %err, "refund settled in Redis, not yet committed; recovery will");
        }
    } else if let Err(err) = state.settler.apply_refund_status(&change, mark).await {
        tracing::warn!(refund_id = %refund.refund_id, error = %err, "failed refund not yet in the store; recovery will");
    }
    Ok(())
}

/// How long a pending refund waits before it is sent again.
pub const RETRY_AFTER_MS: u64 = 10_000;

/// Sends pending refunds that have waited [`RETRY_AFTER_MS`] again (the resolution loop's
/// tick). Returns how many were looked at.
pub async fn retry_stale(state: &Core, limit: usize) -> Result<usize, ResolveError> {
    let now = telemetry::now_ms();
    let stale = state
        .settler
        .store
        .stale_refunds(now.saturating_sub(RETRY_AFTER_MS), limit)
        .await?;
    for refund in &stale {
        let Some(pid) = PaymentId::parse(&refund.payment_id) else {
            continue;
        };
        let Some(record) = view::ensure_payment(state, &pid).await? else {
            tracing::warn!(refund_id = %refund.refund_id, "a pending refund's payment is in neither store; skipped");
            continue;
        };
        // Touch it first, so a refund that stays pending waits again.
        let _ = state
            .settler
            .store
            .set_refund_status(&RefundStatusChange {
                refund_id: refund.refund_id.clone(),
                status: RefundStatus::Pending,
                updated_at_ms: now,
            })
            .await;
        if let Err(err) = execute(state, refund, &record.doc).await {
            tracing::warn!(refund_id = %refund.refund_id, error = %err, "refund retry failed");
        }
    }
    Ok(stale.len())
}

/// How long a top-up refund's hold lasts if nothing settles it (the retry loop settles it
/// long before).
const TOPUP_REFUND_HOLD_MS: u64 = 7 * 24 * 3600 * 1000;

/// A refund as the client asked for it: all that is left (`amount: None`) or a part.
#[derive(Debug, Clone)]
pub struct NewRefund<'a> {
    pub key: IdempotencyKey,
    /// The amount's text, parsed in the payment's currency.
    pub amount: Option<&'a str>,
    pub reason: Option<&'a str>,
}

/// Refunds all or part of a succeeded payment of `merchant`'s: the refund as it stands after
/// the channel's answer (`pending`, `succeeded` or `failed`), or the first one under a
/// replayed key.
pub async fn create(
    core: &Core,
    merchant: &MerchantId,
    payment_id: &str,
    new: NewRefund<'_>,
) -> Result<RefundRow, PaymentError> {
    let (pid, payment) = view::owned(core, merchant, payment_id).await?;
    let doc = &payment.doc;
    let amount = new
        .amount
        .map(|text| {
            Amount::parse(text, doc.currency)
                .map(Amount::minor)
                .map_err(|e| PaymentError::Invalid {
                    field: "amount",
                    message: e.to_string(),
                })
        })
        .transpose()?;
    let exceeds = |remaining: i64| PaymentError::InvalidState {
        message: format!(
            "the refund is above what is left to refund ({} {})",
            format_minor(remaining.max(0), doc.currency),
            doc.currency.code()
        ),
        status: Some(payment.status),
    };

    // The attempt that took the money (a balance payment has none).
    let (channel_id, channel_order_id) = if doc.method == Method::Balance {
        (None, None)
    } else {
        let attempts = view::attempts_of(core, &payment).await?;
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
                return Err(PaymentError::InvalidState {
                    message: "no channel attempt of this payment took money".into(),
                    status: Some(payment.status),
                })
            }
        }
    };

    // One atomic step: idempotency, state, refundable amount, top-up hold (on a payment the
    // balance store lost, first put back from the settlement store).
    let unavailable =
        || PaymentError::unavailable(Unavailable::SettlementStore, Some(pid.as_str()));
    view::ensure_payment(core, &pid).await.map_err(|err| {
        tracing::warn!(payment_id = %pid, error = %err, "cannot restore the payment");
        unavailable()
    })?;
    let now = telemetry::now_ms();
    let row_of = |refund_id: String, number: u32, amount_minor: i64| RefundRow {
        refund_id,
        payment_id: pid.to_string(),
        number,
        amount_minor,
        currency: doc.currency,
        status: RefundStatus::Pending,
        channel_id: channel_id.clone(),
        channel_order_id: channel_order_id.clone(),
        reason: new.reason.map(str::to_owned),
        created_at_ms: now,
        updated_at_ms: now,
        idempotency_key: Some(new.key.as_str().to_owned()),
    };
    let template = PendingRecord::Refund(row_of(
        REFUND_ID_PLACEHOLDER.into(),
        REFUND_NUMBER_PLACEHOLDER,
        REFUND_AMOUNT_PLACEHOLDER,
    ));
    let request = RefundReserveRequest {
        payment: pid.clone(),
        amount_minor: amount,
        idempotency: IdempotencyClaim {
            key: new.key.clone(),
            request_hash: request_hash(
                "refund",
                &serde_json::json!({"payment": pid.as_str(), "amount": amount, "reason": new.reason}),
            ),
            retention_seconds: core.config.settings.preauth.idempotency_retention_seconds,
        },
        hold_expires_at_ms: now + TOPUP_REFUND_HOLD_MS,
        intent_template: template.to_json(),
    };
    let (refund_id, number, amount_minor) =
        match core.balances.reserve_refund(&request, core.op()).await? {
            RefundReserveOutcome::Created {
                refund_id,
                number,
                amount_minor,
            } => (refund_id, number, amount_minor),
            RefundReserveOutcome::Replay(StoredOutcome::Refund(refund_id)) => {
                return stored_refund(core, &pid, &refund_id).await
            }
            RefundReserveOutcome::InsufficientFunds {
                available,
                shortfall,
            } => {
                // A top-up refund the account cannot cover: the key's answer, kept in the
                // store too.
                let refused = StoredOutcome::InsufficientFunds {
                    available,
                    shortfall,
                };
                super::keep_refusal(core, pid.tag(), &request.idempotency, refused, now);
                return Err(PaymentError::InsufficientFunds {
                    available,
                    shortfall,
                    currency: doc.currency,
                });
            }
            RefundReserveOutcome::Replay(StoredOutcome::InsufficientFunds {
                available,
                shortfall,
            }) => {
                return Err(PaymentError::InsufficientFunds {
                    available,
                    shortfall,
                    currency: doc.currency,
                })
            }
            RefundReserveOutcome::Replay(_) | RefundReserveOutcome::IdempotencyConflict => {
                return Err(PaymentError::IdempotencyConflict)
            }
            RefundReserveOutcome::IdempotencyInFlight => {
                return Err(PaymentError::IdempotencyInFlight)
            }
            RefundReserveOutcome::NotFound => return Err(PaymentError::NotFound(Missing::Payment)),
            RefundReserveOutcome::InvalidState(status) => {
                return Err(PaymentError::InvalidState {
                    message: format!(
                        "only a succeeded or partially refunded payment can be refunded; this one is {status}"
                    ),
                    status: Some(status),
                })
            }
            RefundReserveOutcome::Exceeds { remaining } => return Err(exceeds(remaining)),
            RefundReserveOutcome::AccountBusy => {
                return Err(PaymentError::unavailable(
                    Unavailable::AccountRebuildInProgress,
                    Some(pid.as_str()),
                ))
            }
        };

    // Recorded before the channel is called; then the key may replay.
    let mut row = row_of(refund_id.clone(), number, amount_minor);
    let mark = SettledMark {
        tag: pid.tag(),
        id: refund_id.clone(),
        idempotency_key: new.key.as_str().to_owned(),
    };
    match core.settler.record_refund(&row, mark, true).await {
        Ok(RefundRecorded::Inserted) => {}
        // This very request's refund, recorded before Redis forgot it (unwound there): the
        // stored refund as it stands is the answer; nothing is sent again.
        Ok(RefundRecorded::AlreadyRecorded) => return stored_refund(core, &pid, &refund_id).await,
        // The store knows refunds Redis forgot (both flagged, both unwound in Redis with its
        // refund state set to the store's): nothing is sent to the channel.
        Ok(RefundRecorded::Exceeds { remaining_minor }) => return Err(exceeds(remaining_minor)),
        Ok(RefundRecorded::Conflict) => {
            return Err(PaymentError::unavailable(
                Unavailable::AccountRebuildRequired,
                Some(pid.as_str()),
            ))
        }
        Err(err) => {
            tracing::warn!(%refund_id, error = %err, "refund reserved but not recorded; recovery will, then the retry loop sends it");
            return Err(unavailable());
        }
    }

    // The channel (or, for a balance payment, nothing to call).
    match execute(core, &row, doc).await {
        Ok(executed) => row.status = executed,
        Err(err) => {
            tracing::warn!(%refund_id, error = %err, "refund execution failed; it stays pending")
        }
    }
    Ok(row)
}

/// A refund as the settlement store has it; not there yet → its first request is in flight.
async fn stored_refund(
    core: &Core,
    pid: &PaymentId,
    refund_id: &str,
) -> Result<RefundRow, PaymentError> {
    core.settler
        .store
        .refunds(pid.as_str())
        .await?
        .into_iter()
        .find(|r| r.refund_id == refund_id)
        .ok_or(PaymentError::IdempotencyInFlight)
}
