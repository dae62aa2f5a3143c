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
//! - [`deliveries`]: a payment's delivery status, for the API.

pub mod delivery;
pub mod events;
pub mod signature;
pub mod url;

use serde::Serialize;

use crate::settlement::{WebhookEvent, WebhookStatus};
use crate::time::rfc3339;

pub use delivery::{spawn_webhooks, Deliverer};

/// A webhook delivery as the API shows it: `{"attempts", "created_at", "id", "last_status",
/// "status", "type"}` (fields in byte order of their names, as the JSON has always had them).
/// The URL and the last error stay internal (a URL may carry a merchant's token; an error text
/// may name internal hosts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    attempts: u32,
    created_at: String,
    id: String,
    last_status: Option<u16>,
    status: WebhookStatus,
    #[serde(rename = "type")]
    event_type: String,
}

impl Delivery {
    /// The delivery of an event a commit has just enqueued, as `GET /v1/payments/{id}` shows
    /// it (see [`render_deliveries`]) before the worker touched it: a creation answers with it
    /// without reading it back. `status`: `pending`, or `skipped` when it has nowhere to go
    /// (no `notify_url`, no merchant `webhook_url`).
    pub fn announced(
        payment_id: &str,
        event_type: &str,
        sequence: u32,
        status: WebhookStatus,
        created_at_ms: u64,
    ) -> Self {
        Self {
            attempts: 0,
            created_at: rfc3339(created_at_ms),
            id: events::event_id(payment_id, event_type, sequence),
            last_status: None,
            status,
            event_type: event_type.to_owned(),
        }
    }
}

/// A payment's webhook deliveries as the API shows them, as JSON (see [`deliveries`]).
pub fn render_deliveries(events: &[WebhookEvent]) -> serde_json::Value {
    serde_json::to_value(deliveries(events)).expect("deliveries serialize")
}

/// A payment's webhook deliveries as the API shows them (oldest first, as
/// `SettlementStore::webhook_events` returns them).
pub fn deliveries(events: &[WebhookEvent]) -> Vec<Delivery> {
    events
        .iter()
        .map(|e| Delivery {
            attempts: e.attempts,
            created_at: rfc3339(e.created_at_ms),
            id: e.id.clone(),
            last_status: e.last_status,
            status: e.status,
            event_type: e.event_type.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(status: WebhookStatus, last_status: Option<u16>) -> WebhookEvent {
        WebhookEvent {
            id: "evt_1".into(),
            merchant_id: "alpha".into(),
            payment_id: "pay_1".into(),
            event_type: "payment.succeeded".into(),
            sequence: 0,
            payload: "{}".into(),
            url: Some("https://m.example/h?token=secret".into()),
            status,
            attempts: 2,
            next_attempt_at_ms: Some(5),
            last_status,
            last_error: Some("HTTP 500".into()),
            created_at_ms: 1_714_565_700_000,
            updated_at_ms: 1_714_565_701_000,
        }
    }

    #[test]
    fn deliveries_render_without_url_or_error() {
        let rendered = render_deliveries(&[event(WebhookStatus::Pending, Some(500))]);
        assert_eq!(
            rendered.to_string(),
            json!([{
                "id": "evt_1",
                "type": "payment.succeeded",
                "status": "pending",
                "attempts": 2,
                "last_status": 500,
                "created_at": "2024-05-01T12:15:00Z",
            }])
            .to_string()
        );
        assert_eq!(
            serde_json::to_string(&render_deliveries(&[])).unwrap(),
            "[]"
        );
    }

    #[test]
    fn an_announced_delivery_is_what_the_store_will_show() {
        for status in [WebhookStatus::Pending, WebhookStatus::Skipped] {
            let mut stored = event(status, None);
            stored.id = events::event_id("pay_1", "payment.succeeded", 0);
            stored.attempts = 0;
            let announced = Delivery::announced(
                "pay_1",
                "payment.succeeded",
                0,
                status,
                stored.created_at_ms,
            );
            assert_eq!(deliveries(&[stored]), vec![announced.clone()]);
            assert_eq!(
                serde_json::to_string(&announced).unwrap(),
                json!({
                    "id": announced.id,
                    "type": "payment.succeeded",
                    "status": status.as_str(),
                    "attempts": 0,
                    "last_status": null,
                    "created_at": "2024-05-01T12:15:00Z",
                })
                .to_string()
            );
        }
    }
}
