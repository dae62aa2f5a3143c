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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::preauth::{Method, Purpose};

    fn row(status: PaymentStatus, notify_url: Option<&str>) -> PaymentRow {
        let doc = match notify_url {
            Some(url) => format!(r#"{{"id":"pay_1","notify_url":"{url}"}}"#),
            None => r#"{"id":"pay_1","notify_url":null}"#.to_owned(),
        };
        PaymentRow {
            id: "pay_1".into(),
            merchant_id: "alpha".into(),
            account_id: Some("acc".into()),
            scope_tag: "TAG0000000".into(),
            merchant_order_id: "o1".into(),
            amount_minor: 1_000,
            currency: Currency::Cny,
            method: Method::Balance,
            purpose: Purpose::Charge,
            status,
            held_minor: 0,
            hold_expires_at_ms: None,
            created_at_ms: 1,
            expires_at_ms: 100,
            updated_at_ms: 50,
            doc,
            next_check_at_ms: None,
            checks: 0,
            idempotency_key: None,
            request_hash: None,
        }
    }

    fn refund(number: u32, status: RefundStatus, at: u64) -> RefundRow {
        RefundRow {
            refund_id: format!("re_1_{number}"),
            payment_id: "pay_1".into(),
            number,
            amount_minor: 100,
            currency: Currency::Cny,
            status,
            channel_id: None,
            channel_order_id: None,
            reason: None,
            created_at_ms: at,
            updated_at_ms: at,
            idempotency_key: None,
        }
    }

    fn stamp(kind: SettlementKind, sequence: u32, at: u64) -> MovementStamp {
        MovementStamp {
            kind,
            sequence,
            settled_at_ms: at,
        }
    }

    fn kinds(events: &[WebhookEvent]) -> Vec<(&str, u32, u64)> {
        events
            .iter()
            .map(|e| (e.event_type.as_str(), e.sequence, e.created_at_ms))
            .collect()
    }

    #[test]
    fn a_refunded_payment_shows_what_each_commit_announced_in_order() {
        let events = derive(
            &row(PaymentStatus::PartiallyRefunded, None),
            &[
                stamp(SettlementKind::Refund, 2, 30),
                stamp(SettlementKind::Capture, 0, 10),
                stamp(SettlementKind::Refund, 1, 20),
                // Late capture of another attempt and an adjustment announce nothing.
                stamp(SettlementKind::Capture, 3, 25),
                stamp(SettlementKind::Adjustment, 0, 26),
            ],
            &[
                refund(1, RefundStatus::Succeeded, 20),
                refund(2, RefundStatus::Succeeded, 30),
                refund(3, RefundStatus::Failed, 40),
                refund(4, RefundStatus::Pending, 45),
            ],
        );
        assert_eq!(
            kinds(&events),
            vec![
                (events::PAYMENT_SUCCEEDED, 0, 10),
                (events::REFUND_SUCCEEDED, 1, 20),
                (events::REFUND_SUCCEEDED, 2, 30),
                (events::REFUND_FAILED, 3, 40),
            ]
        );
        assert!(events.iter().all(|e| e.status == WebhookStatus::Skipped
            && e.attempts == 0
            && e.next_attempt_at_ms.is_none()
            && e.id == events::event_id("pay_1", &e.event_type, e.sequence)));
    }

    #[test]
    fn a_final_status_without_money_and_late_money_are_shown() {
        let events = derive(
            &row(PaymentStatus::Expired, None),
            &[stamp(SettlementKind::Suspense, 2, 70)],
            &[],
        );
        assert_eq!(
            kinds(&events),
            vec![
                (events::PAYMENT_EXPIRED, 0, 50),
                (events::PAYMENT_LATE_MONEY, 2, 70)
            ]
        );
        assert!(derive(&row(PaymentStatus::Pending, None), &[], &[]).is_empty());
    }

    #[test]
    fn only_merchants_without_a_url_on_payments_without_one_are_derived() {
        let quiet = NoWebhook::new(["alpha".to_owned()]);
        assert!(!quiet.keeps_history("alpha"));
        assert!(quiet.keeps_history("beta"));
        assert!(quiet.derives_events_of(&row(PaymentStatus::Succeeded, None)));
        assert!(!quiet.derives_events_of(&row(
            PaymentStatus::Succeeded,
            Some("https://m.example/hook")
        )));
        assert!(!NoWebhook::default().derives_events_of(&row(PaymentStatus::Succeeded, None)));
    }

    #[test]
    fn stored_events_win_over_derived_ones() {
        let derived = derive(
            &row(PaymentStatus::Succeeded, None),
            &[stamp(SettlementKind::Capture, 0, 10)],
            &[],
        );
        let mut stored = derived[0].clone();
        stored.status = WebhookStatus::Delivered;
        stored.attempts = 1;
        let merged = merge(vec![stored.clone()], derived);
        assert_eq!(merged, vec![stored]);
    }
}
