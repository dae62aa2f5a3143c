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
//! Never more than was paid: the reservation is the only way to a refund, and a refund ends
//! once (`refund_finish.lua`).

use crate::channels::{
    ChannelError, ChannelOrderId, ChannelRefundId, RefundOutcome, RefundRequest,
};
use crate::ids::PaymentId;
use crate::money::Amount;
use crate::preauth::{
    refund_outcome_id, PaymentDoc, PaymentStatus, RefundFinishOutcome, RefundFinishRequest,
    SettledMark, StoreError, REFUND_SEQ_PLACEHOLDER, REFUND_STATUS_PLACEHOLDER,
};
use crate::resolution::ResolveError;
use crate::settlement::{movements, PendingRecord, RefundRow, RefundStatusChange};
use crate::state::Core;
use crate::telemetry;

/// How far a refund got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executed {
    Succeeded,
    Failed,
    /// Not final yet: retried later.
    Pending,
}

impl Executed {
    pub fn as_str(self) -> &'static str {
        match self {
            Executed::Succeeded => "succeeded",
            Executed::Failed => "failed",
            Executed::Pending => "pending",
        }
    }
}

/// Sends `refund` of `doc` to its channel (or, for a balance payment, settles it at once) and
/// records the outcome.
pub async fn execute(
    state: &Core,
    refund: &RefundRow,
    doc: &PaymentDoc,
) -> Result<Executed, ResolveError> {
    let outcome = match (&refund.channel_id, &refund.channel_order_id) {
        (Some(channel_id), Some(order_id)) => {
            call_channel(state, refund, doc, channel_id, order_id).await
        }
        _ => Executed::Succeeded,
    };
    match outcome {
        Executed::Succeeded => finish(state, refund, doc, true).await?,
        Executed::Failed => finish(state, refund, doc, false).await?,
        Executed::Pending => {}
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
) -> Executed {
    let (Some(entry), Some(order_id), Some(refund_id)) = (
        state.channels.get(channel_id),
        ChannelOrderId::parse(order_id),
        ChannelRefundId::parse(&refund.refund_id),
    ) else {
        tracing::error!(refund_id = %refund.refund_id, channel = %channel_id, "the refund's channel is not configured; left pending");
        return Executed::Pending;
    };
    let (Ok(amount), Ok(total)) = (
        Amount::from_minor(refund.amount_minor),
        Amount::from_minor(doc.amount_minor),
    ) else {
        return Executed::Failed;
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
        Ok(RefundOutcome::Succeeded { .. }) => Executed::Succeeded,
        Ok(RefundOutcome::Failed { status, .. }) => {
            tracing::warn!(refund_id = %refund.refund_id, %status, "the channel refused the refund");
            Executed::Failed
        }
        Ok(RefundOutcome::Pending { .. }) => Executed::Pending,
        // A verified refusal (or a request the channel can never take): final.
        Err(
            err @ (ChannelError::Declined { .. }
            | ChannelError::Rejected { .. }
            | ChannelError::InvalidRequest { .. }),
        ) => {
            tracing::warn!(refund_id = %refund.refund_id, error = %err, "refund refused");
            Executed::Failed
        }
        // Not sent, or an unknown outcome: the same number is sent again later.
        Err(err) => {
            tracing::warn!(refund_id = %refund.refund_id, error = %err, "refund not confirmed; will retry");
            Executed::Pending
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
        status: "failed".into(),
        updated_at_ms: now,
    };
    let record = if succeeded {
        let mut template = settlement.clone();
        if let Some(row) = template.payment.as_mut() {
            row.status = REFUND_STATUS_PLACEHOLDER.to_owned();
        }
        PendingRecord::Settlement(template).to_json()
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
            row.status = status.as_str().to_owned();
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
        let Some(record) = crate::resolution::ensure_payment(state, &pid).await? else {
            tracing::warn!(refund_id = %refund.refund_id, "a pending refund's payment is in neither store; skipped");
            continue;
        };
        // Touch it first, so a refund that stays pending waits again.
        let _ = state
            .settler
            .store
            .set_refund_status(&RefundStatusChange {
                refund_id: refund.refund_id.clone(),
                status: "pending".into(),
                updated_at_ms: now,
            })
            .await;
        if let Err(err) = execute(state, refund, &record.doc).await {
            tracing::warn!(refund_id = %refund.refund_id, error = %err, "refund retry failed");
        }
    }
    Ok(stale.len())
}
