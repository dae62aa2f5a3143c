//! How a pending channel payment learns its outcome without a callback (DESIGN.md §7), and
//! the two transitions every path shares (the callbacks of the next issue included):
//!
//! - [`settle_paid`]: the channel says the order was paid → one atomic step in the balance
//!   store (capture the hold, credit the account, or record a collection; status
//!   `succeeded`; the settlement into the outbox), then the settlement is committed through
//!   the group-commit stream. Exactly once: a second report finds the payment no longer
//!   pending and changes nothing.
//! - [`settle_unpaid`]: the channel confirmed the order can no longer be paid → the hold is
//!   released and the payment ends `failed`, `expired` or `canceled`.
//!
//! The **resolution loop** takes due payments from the settlement store (leased, so several
//! gateway instances never work on the same one at once): before the payment's expiry it
//! *queries* each open attempt (an Alipay query says "no such trade" until the code is
//! scanned — harmless, the payment stays pending); at expiry it *closes* them (the only way
//! for an Alipay order never scanned), which also tells whether they were paid. Looks are
//! spaced on a doubling, capped backoff, and the payment's expiry is always looked at.
//!
//! **Cancel** closes the channel order first and releases the hold only when the channel
//! confirmed it was not paid; if it was, the payment succeeds instead.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::channels::{
    ChannelKind, ChannelOrderId, ChannelRefundId, CloseOutcome, OrderState, RefundOutcome,
    RefundRequest,
};
use crate::ids::PaymentId;
use crate::money::Currency;
use crate::periodic::spawn_periodic;
use crate::preauth::{
    late_record_id, money_record_id, status_record_id, LateCaptureOutcome, LateCaptureRequest,
    Method, PaymentStatus, Purpose, SettledMark, StoreError, SucceedOutcome, SucceedRequest,
    SuccessEffect, TransitionOutcome,
};
use crate::settlement::outbox::CompactRecord;
use crate::settlement::settler::SettleFailure;
use crate::settlement::AttemptOutcome;
use crate::settlement::{
    movements, AttemptRow, AttemptUpdate, CommitOutcome, Flagged, PaymentRow, PendingRecord,
    StatusChange,
};
use crate::state::Core;
use crate::telemetry;

pub use super::error::ResolveError;
use super::view::ensure_payment;
use crate::settlement::FlagKind;

/// What settling did.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// This call moved the payment out of `pending`.
    Now,
    /// It had already left `pending` (another path settled it): nothing changed.
    Already(PaymentStatus),
}

/// What a channel's success does to the money (DESIGN.md §3's table).
pub fn success_effect(method: Method, purpose: Purpose) -> SuccessEffect {
    match (purpose, method) {
        (Purpose::Topup, _) => SuccessEffect::Credit,
        (Purpose::Charge, Method::Supplier | Method::Balance) => SuccessEffect::Capture,
        (Purpose::Charge, Method::Alipay | Method::Wechatpay) => SuccessEffect::Collect,
    }
}

/// The channel reports `attempt`'s order paid with this amount: settle the payment (see the
/// module docs). A mismatched amount or currency changes nothing.
pub async fn settle_paid(
    state: &Core,
    attempt: &AttemptRow,
    channel_txn_id: &str,
    amount_minor: i64,
    currency: Currency,
) -> Result<Settled, ResolveError> {
    let pid = PaymentId::parse(&attempt.payment_id)
        .ok_or_else(|| ResolveError::Unknown(attempt.payment_id.clone()))?;
    // The document this instance kept when it created the payment, else Redis's (restoring
    // a payment Redis lost). The status is the success script's to check either way.
    let (doc, mut from_cache) = match state.pending_docs.get(pid.as_str()) {
        Some(doc) => (doc, true),
        None => {
            let record = ensure_payment(state, &pid)
                .await?
                .ok_or_else(|| ResolveError::Unknown(pid.to_string()))?;
            (std::sync::Arc::new(record.doc), false)
        }
    };
    let doc = doc.as_ref();
    if doc.amount_minor != amount_minor || doc.currency != currency {
        telemetry::resolution("amount_mismatch");
        tracing::error!(payment_id = %pid, channel = %attempt.channel_id, amount_minor, %currency, "the channel reports another amount than the payment's: not settled");
        let flag = Flagged {
            kind: FlagKind::AmountMismatch,
            payment_id: pid.to_string(),
            detail: format!(
                "{} reports {} {} for attempt {}; the payment is {} {}: not settled",
                attempt.channel_id,
                crate::money::format_minor(amount_minor, currency),
                currency.code(),
                attempt.attempt,
                crate::money::format_minor(doc.amount_minor, doc.currency),
                doc.currency.code(),
            ),
            created_at_ms: telemetry::now_ms(),
        };
        if let Err(err) = state.settler.store.flag(&flag).await {
            tracing::warn!(payment_id = %pid, error = %err, "amount mismatch not flagged");
        }
        return Err(ResolveError::AmountMismatch {
            payment_id: pid.to_string(),
            amount_minor,
            currency,
        });
    }
    let effect = success_effect(doc.method, doc.purpose);
    let fee_bps = state
        .channels
        .get(&attempt.channel_id)
        .map_or(0, |entry| entry.route.fee_bps);
    let now = telemetry::now_ms();
    let mut settlement = movements::channel_success(
        doc,
        pid.tag(),
        &attempt.channel_id,
        Some(channel_txn_id),
        fee_bps,
        None,
        now,
    );
    // Compact in the outbox (see `settlement::outbox`): recovery rebuilds this settlement.
    let compact =
        CompactRecord::channel_success(&attempt.channel_id, Some(channel_txn_id), fee_bps, now);
    debug_assert_eq!(
        compact.expand(doc, pid.tag(), ""),
        PendingRecord::Settlement(settlement.clone()),
        "the outbox's record rebuilds the settlement"
    );
    let request = SucceedRequest {
        payment: pid.clone(),
        effect,
        amount_minor: doc.amount_minor,
        pending_record: compact.to_json(),
    };
    // Admission before any money moves (as for a new payment): a store the writer has seen
    // fail refuses here, and the channel retries. A store that goes down while this runs
    // leaves the movement in the balance store's outbox, committed by recovery later.
    let admission = state
        .settler
        .admit()
        .map_err(|e| ResolveError::Settle(SettleFailure::Stream(e)))?;
    let seq = loop {
        match state.balances.succeed(&request, state.op()).await? {
            SucceedOutcome::Done { seq } => break seq,
            SucceedOutcome::NotPending(status) => {
                // A payment that already ended: late money, which the caller records
                // (`record_late_money`).
                state.pending_docs.remove(pid.as_str());
                return Ok(Settled::Already(status));
            }
            SucceedOutcome::NotFound if from_cache => {
                // Redis lost it: restore it from the settlement store, then once more.
                from_cache = false;
                ensure_payment(state, &pid)
                    .await?
                    .ok_or_else(|| ResolveError::Unknown(pid.to_string()))?;
            }
            SucceedOutcome::NotFound => return Err(ResolveError::Unknown(pid.to_string())),
            SucceedOutcome::OutOfRange => {
                tracing::error!(payment_id = %pid, "crediting this top-up would overflow the account");
                return Err(ResolveError::Refused {
                    payment_id: pid.to_string(),
                    outcome: CommitOutcome::Conflict {
                        stored_hash: String::new(),
                    },
                });
            }
        }
    };
    // On its way no more: the writes follow at once.
    drop(admission);
    state.pending_docs.remove(pid.as_str());
    if effect.moves_balance() {
        settlement.account_seq = Some(seq);
    }
    let mark = SettledMark {
        tag: pid.tag(),
        id: money_record_id(pid.as_str()),
        idempotency_key: String::new(),
    };
    let update = AttemptUpdate {
        payment_id: attempt.payment_id.clone(),
        attempt: attempt.attempt,
        outcome: AttemptOutcome::Succeeded,
        latency_ms: None,
        action: None,
        channel_txn_id: Some(channel_txn_id.to_owned()),
        now_ms: now,
    };
    // Both go to the group commit together (the attempt first: the queue is in order), so
    // they usually share one transaction. The movement is in the outbox already: a failed
    // commit is re-driven by recovery.
    let (saved, settled) = tokio::join!(
        state.settler.save_attempt(update, None),
        state.settler.settle(settlement, mark)
    );
    if let Err(err) = saved {
        tracing::warn!(payment_id = %pid, error = %err, "attempt outcome not recorded");
    }
    match settled {
        Ok(CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted) => {
            telemetry::resolution("succeeded");
            Ok(Settled::Now)
        }
        Ok(other) => Err(ResolveError::Refused {
            payment_id: pid.to_string(),
            outcome: other,
        }),
        Err(err) => Err(err.into()),
    }
}

/// Late money (DESIGN.md §7): the channel took money for `attempt` after its payment ended,
/// or for an abandoned attempt. Never dropped: first committed as a suspense settlement
/// against the merchant; then a customer payment (Alipay, WeChat Pay) is refunded
/// automatically through the channel, and a supplier charge is captured from its account if
/// the account can still afford it; whatever could not be done automatically is flagged for
/// `GET /v1/admin/flagged` (every case is flagged, with what was done). The payment's status
/// is not changed. Idempotent: a repeated notice finds every step done.
pub async fn record_late_money(
    state: &Core,
    attempt: &AttemptRow,
    channel_txn_id: &str,
    amount_minor: i64,
    reason: &'static str,
) -> Result<(), ResolveError> {
    let pid = PaymentId::parse(&attempt.payment_id)
        .ok_or_else(|| ResolveError::Unknown(attempt.payment_id.clone()))?;
    let doc = ensure_payment(state, &pid)
        .await?
        .ok_or_else(|| ResolveError::Unknown(pid.to_string()))?
        .doc;
    let now = telemetry::now_ms();
    let suspense = movements::suspense(
        &doc,
        attempt.attempt,
        &attempt.channel_id,
        channel_txn_id,
        amount_minor,
        now,
    );
    commit_unmarked(state, &pid, suspense).await?;
    let done = if doc.method == Method::Supplier && doc.purpose == Purpose::Charge {
        late_capture(state, &pid, &doc, attempt, channel_txn_id).await?
    } else {
        late_refund(state, &doc, attempt, amount_minor).await?
    };
    let flag = Flagged {
        kind: FlagKind::LateMoney,
        payment_id: pid.to_string(),
        detail: format!(
            "{reason}: {} {} paid on {} (attempt {}, channel transaction {channel_txn_id}) \
             after the payment ended; {done}",
            crate::money::format_minor(amount_minor, doc.currency),
            doc.currency.code(),
            attempt.channel_id,
            attempt.attempt,
        ),
        created_at_ms: now,
    };
    // Said once per item: a repeated notice finds every step done and the item flagged.
    if state.settler.store.flag(&flag).await? {
        telemetry::resolution("late_money");
        tracing::error!(payment_id = %pid, channel = %attempt.channel_id, reason, %done, "late money");
    }
    Ok(())
}

async fn commit_unmarked(
    state: &Core,
    pid: &PaymentId,
    settlement: crate::settlement::Settlement,
) -> Result<(), ResolveError> {
    match state.settler.settle_unmarked(settlement).await? {
        CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted => Ok(()),
        other => Err(ResolveError::Refused {
            payment_id: pid.to_string(),
            outcome: other,
        }),
    }
}

/// A supplier charge's late money, from its account when it can afford it.
async fn late_capture(
    state: &Core,
    pid: &PaymentId,
    doc: &crate::preauth::PaymentDoc,
    attempt: &AttemptRow,
    channel_txn_id: &str,
) -> Result<String, ResolveError> {
    let now = telemetry::now_ms();
    let mut settlement = movements::late_capture(
        doc,
        attempt.attempt,
        &attempt.channel_id,
        channel_txn_id,
        None,
        now,
    );
    let request = LateCaptureRequest {
        payment: pid.clone(),
        attempt: attempt.attempt,
        amount_minor: doc.amount_minor,
        pending_record: PendingRecord::Settlement(settlement.clone()).to_json(),
    };
    match state.balances.late_capture(&request, state.op()).await? {
        LateCaptureOutcome::Done { seq } => {
            settlement.account_seq = Some(seq);
            let mark = SettledMark {
                tag: pid.tag(),
                id: late_record_id(pid.as_str(), attempt.attempt),
                idempotency_key: String::new(),
            };
            match state.settler.settle(settlement, mark).await {
                Ok(CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted) => {}
                // In the outbox already: recovery commits it.
                Ok(_) | Err(_) => {
                    tracing::warn!(payment_id = %pid, "late capture not committed yet; recovery will")
                }
            }
            Ok("captured from the account (no action needed)".into())
        }
        LateCaptureOutcome::Insufficient { available } => {
            let flag = Flagged {
                kind: FlagKind::Overdraft,
                payment_id: pid.to_string(),
                detail: format!(
                    "the supplier executed this charge after it ended, but the account has only {} {} available: recover {} {} by hand",
                    crate::money::format_minor(available, doc.currency),
                    doc.currency.code(),
                    crate::money::format_minor(doc.amount_minor, doc.currency),
                    doc.currency.code(),
                ),
                created_at_ms: now,
            };
            state.settler.store.flag(&flag).await?;
            Ok("NOT captured: the account cannot afford it (flagged as an overdraft)".into())
        }
        LateCaptureOutcome::Pending => Ok("the payment is still pending".into()),
        LateCaptureOutcome::NotFound => {
            Ok("NOT captured: the balance store does not know the payment or its account".into())
        }
    }
}

/// A customer payment's late money, refunded through the channel under a refund number of its
/// own (`late-<channel order id>`, reused on every retry so the channel refunds once).
async fn late_refund(
    state: &Core,
    doc: &crate::preauth::PaymentDoc,
    attempt: &AttemptRow,
    amount_minor: i64,
) -> Result<String, ResolveError> {
    let (Some(entry), Some(order_id)) = (
        state.channels.get(&attempt.channel_id),
        ChannelOrderId::parse(&attempt.channel_order_id),
    ) else {
        return Ok("NOT refunded: the channel is no longer configured; refund by hand".into());
    };
    let refund_id = ChannelRefundId::parse(&format!("late-{}", attempt.channel_order_id))
        .expect("an order id makes a valid refund number");
    let amount = crate::money::Amount::from_minor(amount_minor)
        .map_err(|e| StoreError::Corrupt(format!("late amount {amount_minor}: {e}")))?;
    let request = RefundRequest {
        order_id,
        refund_id: refund_id.clone(),
        amount,
        order_total: amount,
        currency: doc.currency,
        reason: Some("paid after the payment ended".into()),
        notify_url: Some(format!(
            "{}/v1/callbacks/{}",
            state.public_url, attempt.channel_id
        )),
    };
    let result = entry.channel.refund(&request).await;
    telemetry::channel_call(
        &attempt.channel_id,
        "refund",
        result.as_ref().map_or_else(|e| e.label(), |_| "ok"),
    );
    Ok(match result {
        Ok(RefundOutcome::Succeeded { .. }) => {
            let settlement = movements::late_refund(
                doc,
                attempt.attempt,
                &attempt.channel_id,
                refund_id.as_str(),
                amount_minor,
                telemetry::now_ms(),
            );
            let pid = PaymentId::parse(&doc.id).expect("a stored payment has a valid id");
            commit_unmarked(state, &pid, settlement).await?;
            format!(
                "refunded automatically (refund number {})",
                refund_id.as_str()
            )
        }
        Ok(RefundOutcome::Pending { .. }) => format!(
            "automatic refund accepted, not yet confirmed (refund number {}): check it",
            refund_id.as_str()
        ),
        Ok(RefundOutcome::Failed { status, .. }) => format!(
            "automatic refund FAILED at the channel ({status}, refund number {}): refund by hand",
            refund_id.as_str()
        ),
        Err(err) => format!(
            "automatic refund FAILED ({err}, refund number {}): retry or refund by hand",
            refund_id.as_str()
        ),
    })
}

/// The channel confirmed the payment can no longer be paid: release its hold and end it
/// with `to` (`failed`, `expired` or `canceled`), in the balance store and then the record.
pub async fn settle_unpaid(
    state: &Core,
    pid: &PaymentId,
    to: PaymentStatus,
) -> Result<TransitionOutcome, ResolveError> {
    debug_assert!(!to.is_live());
    ensure_payment(state, pid).await?;
    state.pending_docs.remove(pid.as_str());
    let outcome = state.balances.release(pid, to, state.op()).await?;
    if let TransitionOutcome::Done(_) = &outcome {
        telemetry::resolution(to.as_str());
        apply_final_status(state, pid, to).await;
    }
    Ok(outcome)
}

/// Tells the settlement store a payment's final status now; if it cannot hear it, recovery
/// will (the status waits in the balance store's outbox).
pub async fn apply_final_status(state: &Core, pid: &PaymentId, status: PaymentStatus) {
    let change = StatusChange {
        payment_id: pid.as_str().to_owned(),
        status,
        updated_at_ms: telemetry::now_ms(),
    };
    let mark = SettledMark {
        tag: pid.tag(),
        id: status_record_id(pid.as_str()),
        idempotency_key: String::new(),
    };
    if let Err(err) = state.settler.apply_status(&change, mark).await {
        tracing::warn!(payment_id = %pid, error = %err, "final status not yet in the settlement store; recovery will");
    }
}

/// How a cancel ended.
#[derive(Debug)]
pub enum Cancel {
    /// Every attempt confirmed unpaid (or none was open): the payment is canceled now.
    Canceled,
    /// It had left `pending` meanwhile (by another path).
    NotPending(PaymentStatus),
    NotFound,
    /// An attempt was paid: the payment succeeded instead.
    Paid,
    /// A channel could not confirm its order is dead: nothing changed.
    ChannelUnreachable,
}

/// Cancels a pending channel payment: closes every open attempt first (module docs).
pub async fn cancel(
    state: &Core,
    pid: &PaymentId,
    expires_at_ms: u64,
) -> Result<Cancel, ResolveError> {
    let attempts = state.settler.store.attempts(pid.as_str()).await?;
    let open: Vec<&AttemptRow> = attempts.iter().filter(|a| a.outcome.is_open()).collect();
    match close_open(state, &open, expires_at_ms, telemetry::now_ms()).await? {
        AllClosed::Dead => {}
        AllClosed::Paid => return Ok(Cancel::Paid),
        AllClosed::Unreachable => return Ok(Cancel::ChannelUnreachable),
    }
    Ok(
        match settle_unpaid(state, pid, PaymentStatus::Canceled).await? {
            TransitionOutcome::Done(_) => Cancel::Canceled,
            TransitionOutcome::NotPending(status) => Cancel::NotPending(status),
            TransitionOutcome::NotFound => Cancel::NotFound,
        },
    )
}

/// `cancel` for a merchant's payment by id, as the client sees it: the payment as it stands
/// once canceled (again: a safe retry); any other status, or a channel that says it was paid,
/// is an invalid state; a channel that cannot confirm either way leaves it unchanged.
pub async fn cancel_owned(
    core: &Core,
    merchant: &crate::ids::MerchantId,
    id: &str,
) -> Result<super::view::PaymentView, super::PaymentError> {
    use super::{view, Missing, PaymentError, Unavailable};
    let (pid, payment) = view::owned(core, merchant, id).await?;
    let not_pending = |status: PaymentStatus| PaymentError::InvalidState {
        message: format!("only a pending payment can be canceled; this one is {status}"),
        status: Some(status),
    };
    match payment.status {
        PaymentStatus::Canceled => return view::full(core, payment).await,
        PaymentStatus::Pending => {}
        status => return Err(not_pending(status)),
    }
    let outcome = match cancel(core, &pid, payment.doc.expires_at_ms).await {
        Ok(outcome) => outcome,
        Err(ResolveError::Balances(err)) => return Err(err.into()),
        Err(ResolveError::Store(err)) => return Err(err.into()),
        Err(ResolveError::AmountMismatch { .. }) => {
            return Err(PaymentError::InvalidState {
                message: "the channel reports this order paid with another amount; it is flagged for review and cannot be canceled".into(),
                status: Some(PaymentStatus::Pending),
            })
        }
        Err(err) => {
            tracing::warn!(payment_id = %pid, error = %err, "cancel could not finish");
            return Err(PaymentError::unavailable(
                Unavailable::SettlementStore,
                Some(pid.as_str()),
            ));
        }
    };
    match outcome {
        Cancel::Canceled | Cancel::NotPending(PaymentStatus::Canceled) => {
            let (_, payment) = view::owned(core, merchant, pid.as_str()).await?;
            view::full(core, payment).await
        }
        Cancel::NotPending(status) => Err(not_pending(status)),
        Cancel::NotFound => Err(PaymentError::NotFound(Missing::Payment)),
        Cancel::Paid => Err(PaymentError::InvalidState {
            message: "the channel reports this payment paid: it succeeded and cannot be canceled"
                .into(),
            status: Some(PaymentStatus::Succeeded),
        }),
        Cancel::ChannelUnreachable => Err(PaymentError::unavailable(
            Unavailable::Channel,
            Some(pid.as_str()),
        )),
    }
}

/// What closing every open attempt of a payment came to.
enum AllClosed {
    /// None will take money.
    Dead,
    /// One was paid: the payment was settled as paid (the others are left to the channel).
    Paid,
    /// A channel could not confirm its order is dead: nothing decided.
    Unreachable,
}

/// Closes `open` attempts one by one, the channel's word first: the first one paid is settled
/// (and ends the round), a channel that cannot answer ends it undecided.
async fn close_open(
    state: &Core,
    open: &[&AttemptRow],
    expires_at_ms: u64,
    now_ms: u64,
) -> Result<AllClosed, ResolveError> {
    for &attempt in open {
        match close(state, attempt, expires_at_ms, now_ms).await {
            Closed::Dead => {}
            Closed::Paid {
                channel_txn_id,
                amount_minor,
                currency,
            } => {
                settle_paid(state, attempt, &channel_txn_id, amount_minor, currency).await?;
                return Ok(AllClosed::Paid);
            }
            Closed::Unreachable => return Ok(AllClosed::Unreachable),
        }
    }
    Ok(AllClosed::Dead)
}

enum Closed {
    /// Closed or unknown to the channel: it will not take money for this order.
    Dead,
    Paid {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// No clear answer: try again later.
    Unreachable,
}

/// Closes one attempt's order and records what the channel said. "No such order" counts as
/// dead here: an attempt is closed this way only at its payment's expiry or its cancel, after
/// the order's own expiry was sent to the channel (a create arriving later is refused).
async fn close(state: &Core, attempt: &AttemptRow, expires_at_ms: u64, now_ms: u64) -> Closed {
    let (Some(entry), Some(order)) = (
        state.channels.get(&attempt.channel_id),
        ChannelOrderId::parse(&attempt.channel_order_id),
    ) else {
        tracing::error!(payment_id = %attempt.payment_id, channel = %attempt.channel_id, "an attempt's channel is no longer configured");
        return Closed::Unreachable;
    };
    let result = entry.channel.close(&order).await;
    telemetry::channel_call(
        &attempt.channel_id,
        "close",
        result.as_ref().map_or_else(|e| e.label(), |_| "ok"),
    );
    match result {
        // A supplier executes orders on its own: "no such order" for an attempt whose create
        // may still be travelling (unknown outcome) is no proof before the order's expiry.
        Ok(CloseOutcome::NotFound)
            if entry.kind == ChannelKind::Supplier
                && attempt.outcome == AttemptOutcome::Unknown
                && now_ms < expires_at_ms =>
        {
            tracing::warn!(payment_id = %attempt.payment_id, channel = %attempt.channel_id, "the supplier does not know an order whose create may still arrive; not confirmed");
            Closed::Unreachable
        }
        Ok(CloseOutcome::Closed | CloseOutcome::NotFound) => {
            record_outcome(state, attempt, AttemptOutcome::Closed).await;
            Closed::Dead
        }
        Ok(CloseOutcome::AlreadyPaid {
            channel_txn_id,
            amount_minor,
            currency,
        }) => Closed::Paid {
            channel_txn_id,
            amount_minor,
            currency,
        },
        Err(err) => {
            tracing::warn!(payment_id = %attempt.payment_id, channel = %attempt.channel_id, error = %err, "close failed; will retry");
            Closed::Unreachable
        }
    }
}

async fn record_outcome(state: &Core, attempt: &AttemptRow, to: AttemptOutcome) {
    let update = AttemptUpdate {
        payment_id: attempt.payment_id.clone(),
        attempt: attempt.attempt,
        outcome: to,
        latency_ms: None,
        action: None,
        channel_txn_id: None,
        now_ms: telemetry::now_ms(),
    };
    if let Err(err) = state.settler.save_attempt(update, None).await {
        tracing::warn!(payment_id = %attempt.payment_id, error = %err, "attempt outcome not recorded");
    }
}

/// What one look at a due payment decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// It left `pending` (now or earlier): no more looks.
    Done,
    /// Still pending: look again later.
    Again,
}

/// Looks at one due payment once (module docs).
pub async fn look(state: &Core, row: &PaymentRow, now_ms: u64) -> Result<Look, ResolveError> {
    let pid = PaymentId::parse(&row.id).ok_or_else(|| ResolveError::Unknown(row.id.clone()))?;
    match ensure_payment(state, &pid).await? {
        // The store still has it pending (that is how it was claimed): its end is on its way
        // to the store — or was refused there (a voided movement sets the payment back to
        // pending). Look again: once the store has the end, it is no longer claimed.
        Some(record) if record.status != PaymentStatus::Pending => return Ok(Look::Again),
        Some(_) => {}
        None => return Err(ResolveError::Unknown(pid.to_string())),
    }
    let attempts = state.settler.store.attempts(pid.as_str()).await?;
    let open: Vec<&AttemptRow> = attempts.iter().filter(|a| a.outcome.is_open()).collect();
    if now_ms >= row.expires_at_ms {
        match close_open(state, &open, row.expires_at_ms, now_ms).await? {
            AllClosed::Dead => {}
            AllClosed::Paid => return Ok(Look::Done),
            AllClosed::Unreachable => return Ok(Look::Again),
        }
        settle_unpaid(state, &pid, PaymentStatus::Expired).await?;
        return Ok(Look::Done);
    }
    let mut still_open = 0;
    let mut declined = false;
    for attempt in &open {
        let Some(entry) = state.channels.get(&attempt.channel_id) else {
            still_open += 1;
            continue;
        };
        let Some(order) = ChannelOrderId::parse(&attempt.channel_order_id) else {
            still_open += 1;
            continue;
        };
        let result = entry.channel.query(&order).await;
        telemetry::channel_call(
            &attempt.channel_id,
            "query",
            result.as_ref().map_or_else(
                |e| e.label(),
                |state| match state {
                    OrderState::NotFound => "not_found",
                    _ => "ok",
                },
            ),
        );
        match result {
            Ok(
                OrderState::Paid {
                    channel_txn_id,
                    amount_minor,
                    currency,
                }
                | OrderState::Refunded {
                    channel_txn_id,
                    amount_minor,
                    currency,
                },
            ) => {
                settle_paid(state, attempt, &channel_txn_id, amount_minor, currency).await?;
                return Ok(Look::Done);
            }
            Ok(OrderState::Failed) => {
                declined = true;
                record_outcome(state, attempt, AttemptOutcome::Failed).await
            }
            // Closed before payment (by the channel at its expiry, or by us).
            Ok(OrderState::Closed) => record_outcome(state, attempt, AttemptOutcome::Closed).await,
            // An order the channel took (it answered its create) that it no longer knows: the
            // channel lost it, or another system answers at its address. Never taken as dead
            // before the payment's expiry; said and flagged once for a human.
            Ok(OrderState::NotFound)
                if attempt.outcome == AttemptOutcome::Accepted
                    || attempt.outcome == AttemptOutcome::Succeeded =>
            {
                still_open += 1;
                tracing::warn!(payment_id = %pid, channel = %attempt.channel_id, order = %attempt.channel_order_id, "the channel does not know an order it accepted");
                let flag = Flagged {
                    kind: FlagKind::ChannelOrderMissing,
                    payment_id: pid.to_string(),
                    detail: format!(
                        "{} answers \"no such order\" for {} (attempt {}), which it accepted",
                        attempt.channel_id, attempt.channel_order_id, attempt.attempt
                    ),
                    created_at_ms: now_ms,
                };
                if let Err(err) = state.settler.store.flag(&flag).await {
                    tracing::warn!(payment_id = %pid, error = %err, "missing channel order not flagged");
                }
            }
            Ok(OrderState::Pending | OrderState::NotFound) | Err(_) => still_open += 1,
        }
    }
    if still_open == 0 {
        // A channel's decline fails the payment; an order the channel closed unpaid (at its
        // own expiry, which it holds to the second, so just before ours) expires it.
        let to = if declined {
            PaymentStatus::Failed
        } else {
            PaymentStatus::Expired
        };
        settle_unpaid(state, &pid, to).await?;
        return Ok(Look::Done);
    }
    Ok(Look::Again)
}

/// When to look again after `checks` looks: the backoff, but never later than the expiry
/// (the moment to close), which is looked at as soon as it has passed.
pub fn next_look_ms(
    settings: &crate::config::ResolutionSettings,
    checks: u32,
    expires_at_ms: u64,
    now_ms: u64,
) -> u64 {
    let backoff = settings
        .backoff_initial_ms
        .saturating_mul(1u64 << checks.min(20))
        .min(settings.backoff_max_ms);
    let next = now_ms.saturating_add(backoff);
    if now_ms < expires_at_ms {
        next.min(expires_at_ms)
    } else {
        next
    }
}

/// One tick of the loop: take the due payments and look at each, `resolution.concurrency`
/// at a time. Returns how many were taken.
pub async fn resolve_due(state: &Arc<Core>) -> Result<usize, ResolveError> {
    let settings = &state.config.settings.resolution;
    let now = telemetry::now_ms();
    let due = state
        .settler
        .store
        .claim_due(now, now + settings.lease_ms, settings.batch)
        .await?;
    let taken = due.len();
    let mut running = JoinSet::new();
    for row in due {
        while running.len() >= settings.concurrency {
            running.join_next().await;
        }
        let state = state.clone();
        running.spawn(async move {
            let now = telemetry::now_ms();
            let next = match look(&state, &row, now).await {
                Ok(Look::Done) => None,
                Ok(Look::Again) => Some(next_look_ms(
                    &state.config.settings.resolution,
                    row.checks,
                    row.expires_at_ms,
                    now,
                )),
                Err(err) => {
                    tracing::warn!(payment_id = %row.id, error = %err, "resolution failed; will retry");
                    telemetry::resolution("error");
                    Some(next_look_ms(
                        &state.config.settings.resolution,
                        row.checks,
                        row.expires_at_ms,
                        now,
                    ))
                }
            };
            if let Err(err) = state.settler.store.schedule_check(&row.id, next).await {
                tracing::warn!(payment_id = %row.id, error = %err, "cannot schedule the next look; the lease will bring it back");
            }
        });
    }
    while running.join_next().await.is_some() {}
    Ok(taken)
}

/// Runs [`resolve_due`] every `resolution.interval_ms` until shutdown.
pub fn spawn_resolution(state: Arc<Core>, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    let interval = Duration::from_millis(state.config.settings.resolution.interval_ms);
    spawn_periodic(interval, shutdown, move || {
        let state = state.clone();
        async move {
            if let Err(err) = resolve_due(&state).await {
                tracing::warn!(error = %err, "resolution tick failed");
            }
            let batch = state.config.settings.resolution.batch;
            if let Err(err) = crate::payments::refunds::retry_stale(&state, batch).await {
                tracing::warn!(error = %err, "refund retry tick failed");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ResolutionSettings;

    #[test]
    fn looks_back_off_doubling_up_to_the_cap_and_never_skip_the_expiry() {
        let s = ResolutionSettings {
            backoff_initial_ms: 1_000,
            backoff_max_ms: 8_000,
            ..ResolutionSettings::default()
        };
        let far = u64::MAX;
        assert_eq!(next_look_ms(&s, 0, far, 100), 1_100);
        assert_eq!(next_look_ms(&s, 1, far, 100), 2_100);
        assert_eq!(next_look_ms(&s, 3, far, 100), 8_100);
        assert_eq!(next_look_ms(&s, 60, far, 100), 8_100);
        // The expiry comes first: looked at exactly then.
        assert_eq!(next_look_ms(&s, 3, 500, 100), 500);
        // Past the expiry (a close failed): the backoff again.
        assert_eq!(next_look_ms(&s, 0, 50, 100), 1_100);
    }

    #[test]
    fn each_method_and_purpose_has_its_effect() {
        assert_eq!(
            success_effect(Method::Supplier, Purpose::Charge),
            SuccessEffect::Capture
        );
        assert_eq!(
            success_effect(Method::Alipay, Purpose::Charge),
            SuccessEffect::Collect
        );
        assert_eq!(
            success_effect(Method::Wechatpay, Purpose::Charge),
            SuccessEffect::Collect
        );
        for method in [Method::Alipay, Method::Wechatpay, Method::Supplier] {
            assert_eq!(
                success_effect(method, Purpose::Topup),
                SuccessEffect::Credit
            );
        }
    }
}
