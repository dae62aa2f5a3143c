//! Webhook events with nowhere to go, derived instead of stored.
//!
//! A merchant without a `webhook_url`, on a payment without a `notify_url`, has no one to hear
//! its events ([`NoWebhook`]). Writing each such event as a `skipped` row cost every balance
//! payment a third row and two more B-tree entries for a list that only `GET` reads; the
//! stores now write nothing for them (nor the payment's status history), and `GET` shows the
//! same `skipped` deliveries, derived here from what the store keeps anyway: the payment row,
//! its transfers and its refunds. Events stored before this (old rows) are shown as stored.

use crate::preauth::PaymentStatus;
use crate::settlement::{
    NoWebhook, PaymentRow, RefundRow, RefundStatus, SettlementKind, WebhookEvent, WebhookStatus,
};
use crate::webhooks::events;

/// What [`derive`] needs of one of a payment's transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovementStamp {
    pub kind: SettlementKind,
    pub sequence: u32,
    pub settled_at_ms: u64,
}

impl NoWebhook {
    /// Whether the store writes this merchant's webhook rows and payment status history: only
    /// when something will read them (a merchant with a `webhook_url`, or a payment with a
    /// `notify_url`, whose events are stored as any other).
    pub fn keeps_history(&self, merchant_id: &str) -> bool {
        !self.0.contains(merchant_id)
    }

    /// Whether `payment`'s events are derived ([`derive`]) rather than stored.
    pub fn derives_events_of(&self, payment: &PaymentRow) -> bool {
        !self.keeps_history(&payment.merchant_id) && events::notify_url(payment).is_none()
    }
}

/// The `skipped` events the store would have enqueued for `payment` (`events` catalogue):
/// `payment.succeeded` for its own capture or credit (sequence 0), `refund.succeeded` per
/// refund movement, `payment.late_money` per suspense movement, the final status without money,
/// `refund.failed` per failed refund. Dated as the enqueueing commit dated them (the movement,
/// the status change, the refund's end). Oldest first.
pub fn derive(
    payment: &PaymentRow,
    movements: &[MovementStamp],
    refunds: &[RefundRow],
) -> Vec<WebhookEvent> {
    let event = |event_type: &str, sequence: u32, at_ms: u64| WebhookEvent {
        id: events::event_id(&payment.id, event_type, sequence),
        merchant_id: payment.merchant_id.clone(),
        payment_id: payment.id.clone(),
        event_type: event_type.to_owned(),
        sequence,
        payload: String::new(),
        url: None,
        status: WebhookStatus::Skipped,
        attempts: 0,
        next_attempt_at_ms: None,
        last_status: None,
        last_error: None,
        created_at_ms: at_ms,
        updated_at_ms: at_ms,
    };
    let mut out: Vec<WebhookEvent> = movements
        .iter()
        .filter_map(|m| {
            let event_type = match m.kind {
                SettlementKind::Capture | SettlementKind::Credit if m.sequence == 0 => {
                    events::PAYMENT_SUCCEEDED
                }
                SettlementKind::Refund => events::REFUND_SUCCEEDED,
                SettlementKind::Suspense => events::PAYMENT_LATE_MONEY,
                _ => return None,
            };
            Some(event(event_type, m.sequence, m.settled_at_ms))
        })
        .collect();
    let final_status = match payment.status {
        PaymentStatus::Failed => Some(events::PAYMENT_FAILED),
        PaymentStatus::Canceled => Some(events::PAYMENT_CANCELED),
        PaymentStatus::Expired => Some(events::PAYMENT_EXPIRED),
        _ => None,
    };
    if let Some(event_type) = final_status {
        out.push(event(event_type, 0, payment.updated_at_ms));
    }
    out.extend(
        refunds
            .iter()
            .filter(|r| r.status == RefundStatus::Failed)
            .map(|r| event(events::REFUND_FAILED, r.number, r.updated_at_ms)),
    );
    out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    out
}

/// `stored` with the derived events it lacks, oldest first (what `webhook_events` answers).
pub fn merge(mut stored: Vec<WebhookEvent>, derived: Vec<WebhookEvent>) -> Vec<WebhookEvent> {
    for e in derived {
        if !stored.iter().any(|s| s.id == e.id) {
            stored.push(e);
        }
    }
    stored.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    stored
}
