//! Merchant webhooks (DESIGN.md §1 step 6, docs/webhooks.md): after a payment reaches a state
//! its merchant must hear about, a signed JSON event is POSTed to the merchant.
//!
//! - [`events`]: the catalogue, and how an event is derived from what the settlement store
//!   writes. The store enqueues it in the *same transaction* as the money or the final status
//!   (a durable outbox, table `webhook_events`), so an event exists exactly when that state is
//!   on disk — never for a commit that rolled back, never twice for a re-driven one.
//! - [`delivery`]: the worker that takes due events and sends them, with retries, backoff,
//!   a horizon and bounded concurrency per merchant.
//! - [`signature`]: `X-Signature: t=…,v1=hex(HMAC-SHA256(secret, "t.body"))`.
//! - [`url`]: which URLs are called (`https://` to public hosts; loopback too in the sandbox).
//! - [`render_deliveries`]: a payment's delivery status, for the API.

pub mod delivery;
pub mod events;
pub mod signature;
pub mod url;

use serde_json::{json, Value};

use crate::settlement::{WebhookEvent, WebhookStatus};
use crate::time::rfc3339;

pub use delivery::{spawn_webhooks, Deliverer};

/// A payment's webhook deliveries as the API shows them (oldest first, as
/// `SettlementStore::webhook_events` returns them): `[{"id", "type", "status", "attempts",
/// "last_status", "created_at"}]`. The URL and the last error stay internal (a URL may carry
/// a merchant's token; an error text may name internal hosts).
pub fn render_deliveries(events: &[WebhookEvent]) -> Value {
    Value::Array(
        events
            .iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "type": e.event_type,
                    "status": e.status.as_str(),
                    "attempts": e.attempts,
                    "last_status": e.last_status,
                    "created_at": rfc3339(e.created_at_ms),
                })
            })
            .collect(),
    )
}

/// The delivery of an event a commit has just enqueued, as `GET /v1/payments/{id}` shows it
/// (see [`render_deliveries`]) before the worker touched it: a creation answers with it
/// without reading it back. `skipped`: it has nowhere to go (no `notify_url`, no merchant
/// `webhook_url`).
pub fn announced(
    payment_id: &str,
    event_type: &str,
    sequence: u32,
    skipped: bool,
    created_at_ms: u64,
) -> Value {
    let status = if skipped {
        WebhookStatus::Skipped
    } else {
        WebhookStatus::Pending
    };
    json!({
        "id": events::event_id(payment_id, event_type, sequence),
        "type": event_type,
        "status": status.as_str(),
        "attempts": 0,
        "last_status": null,
        "created_at": rfc3339(created_at_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settlement::WebhookStatus;

    #[test]
    fn deliveries_render_without_url_or_error() {
        let event = WebhookEvent {
            id: "evt_1".into(),
            merchant_id: "alpha".into(),
            payment_id: "pay_1".into(),
            event_type: "payment.succeeded".into(),
            sequence: 0,
            payload: "{}".into(),
            url: Some("https://m.example/h?token=secret".into()),
            status: WebhookStatus::Pending,
            attempts: 2,
            next_attempt_at_ms: Some(5),
            last_status: Some(500),
            last_error: Some("HTTP 500".into()),
            created_at_ms: 1_714_565_700_000,
            updated_at_ms: 1_714_565_701_000,
        };
        assert_eq!(
            render_deliveries(&[event]),
            json!([{
                "id": "evt_1",
                "type": "payment.succeeded",
                "status": "pending",
                "attempts": 2,
                "last_status": 500,
                "created_at": "2024-05-01T12:15:00Z",
            }])
        );
        assert_eq!(render_deliveries(&[]), json!([]));
    }
}
