//! What a verified channel notice decides: the state machine's entry from the channels' side
//! (DESIGN.md §5, §7). The notice's signature was checked by its channel's protocol; here:
//!
//! 1. the channel order id belongs to a known attempt *of this channel* (the settlement
//!    store's record, so it holds even if Redis lost the payment); for money, amount and
//!    currency equal the payment's (inside `resolution::settle_paid`);
//! 2. paid → `succeeded` exactly once (capture / credit / collection); closed or failed → the
//!    hold released once no other attempt can take money; a duplicate or replay → nothing;
//!    money for a payment that already ended (or for an abandoned attempt, decided on the
//!    committed capture) → late money, recorded as a suspense settlement and flagged, never
//!    dropped;
//! 3. acknowledged only once the resulting settlement is committed; store down or queue full
//!    → not acknowledged: the channel retries.

use super::resolution::{self, ResolveError, Settled};
use crate::channels::{Notice, NoticeEvent};
use crate::ids::PaymentId;
use crate::preauth::PaymentStatus;
use crate::settlement::{AttemptOutcome, AttemptRow, AttemptUpdate};
use crate::state::Core;
use crate::telemetry;

/// What processing a verified notice decided; the label names it in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Acknowledge: processed now, or a genuine duplicate.
    Ack(&'static str),
    /// Refuse for good (an unknown order, a mismatched amount): nothing changed.
    Refuse(&'static str),
    /// Not now (store or Redis unavailable, not yet committed): the channel retries.
    Retry(&'static str),
}

/// Decides on a notice `channel_id` sent and its protocol verified.
pub async fn notice(core: &Core, channel_id: &str, notice: Notice) -> Handled {
    // The attempt this instance committed before calling the channel, else the store's.
    let found = match core.pending_docs.attempt(&notice.order_id) {
        Some(attempt) => Ok(Some(attempt)),
        None => {
            core.settler
                .store
                .attempt_by_channel_order(notice.order_id.as_str())
                .await
        }
    };
    match found {
        Ok(Some(attempt)) if attempt.channel_id == channel_id => {
            handle(core, &attempt, notice.event).await
        }
        Ok(_) => {
            tracing::warn!(channel = %channel_id, order = %notice.order_id, "callback for an order that is not an attempt of this channel");
            Handled::Refuse("unknown_order")
        }
        Err(err) => {
            tracing::warn!(channel = %channel_id, error = %err, "callback: the settlement store is unavailable");
            Handled::Retry("retry")
        }
    }
}

async fn handle(core: &Core, attempt: &AttemptRow, event: NoticeEvent) -> Handled {
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
        } => paid(core, attempt, &channel_txn_id, amount_minor, currency).await,
        NoticeEvent::Closed => unpaid(core, attempt, PaymentStatus::Expired).await,
        NoticeEvent::Failed => unpaid(core, attempt, PaymentStatus::Failed).await,
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
    core: &Core,
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
        match core.settler.store.payment(&attempt.payment_id).await {
            Ok(Some(row))
                if row.amount_minor == amount_minor
                    && row.currency == currency
                    && row.status.is_live()
                    && row.status != PaymentStatus::Pending =>
            {
                return Handled::Ack("duplicate");
            }
            Ok(_) => {}
            Err(_) => return Handled::Retry("retry"),
        }
    }
    match resolution::settle_paid(core, attempt, channel_txn_id, amount_minor, currency).await {
        Ok(Settled::Now) => Handled::Ack("processed"),
        Ok(Settled::Already(status)) if status.is_live() => {
            // Settled before (a duplicate, a replay, the loop won the race) — unless the
            // committed success is another transaction: then this is money taken by an
            // abandoned attempt. Decided on the committed capture, never on the attempts'
            // outcomes (written best effort); a success not committed yet is retried.
            match core
                .settler
                .store
                .committed_success(&attempt.payment_id)
                .await
            {
                Ok(Some((channel, txn)))
                    if channel.as_deref() == Some(attempt.channel_id.as_str())
                        && txn.as_deref() == Some(channel_txn_id) =>
                {
                    committed(core, &attempt.payment_id, "duplicate").await
                }
                Ok(Some(_)) => {
                    late_money(
                        core,
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
            late_money(core, attempt, channel_txn_id, amount_minor, reason).await
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
async fn committed(core: &Core, payment_id: &str, label: &'static str) -> Handled {
    match core.settler.store.payment(payment_id).await {
        Ok(Some(row)) if row.status != PaymentStatus::Pending => Handled::Ack(label),
        // Still in the outbox (a commit in flight or failed): recovery commits it; the
        // channel's next retry is acknowledged then.
        Ok(_) | Err(_) => Handled::Retry("retry"),
    }
}

async fn late_money(
    core: &Core,
    attempt: &AttemptRow,
    channel_txn_id: &str,
    amount_minor: i64,
    reason: &'static str,
) -> Handled {
    match resolution::record_late_money(core, attempt, channel_txn_id, amount_minor, reason).await {
        Ok(()) => Handled::Ack("late_money"),
        Err(err) => {
            tracing::warn!(payment_id = %attempt.payment_id, error = %err, "late money not recorded yet; the channel will retry");
            Handled::Retry("retry")
        }
    }
}

/// The channel closed the order unpaid (or the payment failed there): the attempt is dead;
/// when no other attempt can still take money, the payment ends and its hold is released.
async fn unpaid(core: &Core, attempt: &AttemptRow, to: PaymentStatus) -> Handled {
    let Some(pid) = PaymentId::parse(&attempt.payment_id) else {
        return Handled::Refuse("malformed");
    };
    let record = match super::view::ensure_payment(core, &pid).await {
        Ok(Some(record)) => record,
        Ok(None) | Err(_) => return Handled::Retry("retry"),
    };
    if record.status != PaymentStatus::Pending {
        // Alipay's TRADE_CLOSED after a full refund, or a repeat: nothing to do here.
        return Handled::Ack("duplicate");
    }
    let attempts = match core.settler.store.attempts(pid.as_str()).await {
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
        outcome: label,
        latency_ms: None,
        action: None,
        channel_txn_id: None,
        now_ms: telemetry::now_ms(),
    };
    if let Err(err) = core.settler.save_attempt(update, None).await {
        tracing::warn!(payment_id = %pid, error = %err, "attempt outcome not recorded");
        return Handled::Retry("retry");
    }
    let others_open = attempts
        .iter()
        .any(|a| a.attempt != attempt.attempt && a.outcome.is_open());
    if others_open {
        return Handled::Ack("processed");
    }
    match resolution::settle_unpaid(core, &pid, to).await {
        Ok(_) => Handled::Ack("processed"),
        Err(_) => Handled::Retry("retry"),
    }
}
