//! SQLite: the merchant webhook outbox (crate::webhooks): enqueueing in the money's or the
//! status's own transaction, claiming due events, recording delivery attempts.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use crate::settlement::{
    webhook_error_text, NoWebhook, SettleError, Settlement, WebhookAttempt, WebhookEvent,
    WebhookOutcome, WebhookStatus, WebhookStore,
};
use crate::telemetry::{self, StoreOp};
use crate::webhooks::events;

use super::lease::Leased;
use super::refunds::{refund_from_row, REFUND_COLUMNS};
use super::rows::{payment_from_row, PAYMENT_COLUMNS};
use super::{db, ms, named, query_row, SqliteStore};
use crate::settlement::skipped::{self, MovementStamp};
use crate::settlement::SettlementKind;

const WEBHOOK_COLUMNS: &str = "id, merchant_id, payment_id, type, sequence, payload, url, \
    status, attempts, next_attempt_at_ms, last_status, last_error, created_at_ms, updated_at_ms";

fn webhook_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WebhookEvent> {
    let status: String = r.get(7)?;
    Ok(WebhookEvent {
        id: r.get(0)?,
        merchant_id: r.get(1)?,
        payment_id: r.get(2)?,
        event_type: r.get(3)?,
        sequence: r.get(4)?,
        payload: r.get(5)?,
        url: r.get(6)?,
        status: WebhookStatus::parse(&status).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                7,
                rusqlite::types::Type::Text,
                format!("unknown webhook status {status:?}").into(),
            )
        })?,
        attempts: r.get(8)?,
        next_attempt_at_ms: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
        last_status: r.get(10)?,
        last_error: r.get(11)?,
        created_at_ms: r.get::<_, i64>(12)? as u64,
        updated_at_ms: r.get::<_, i64>(13)? as u64,
    })
}

/// The delivery worker's queue: pending events, due at `next_attempt_at_ms`.
impl Leased for WebhookEvent {
    const TABLE: &'static str = "webhook_events";
    const COLUMNS: &'static str = WEBHOOK_COLUMNS;
    const DUE: &'static str = "next_attempt_at_ms";

    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        webhook_from_row(r)
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn leased_until(&mut self, until_ms: u64) {
        self.next_attempt_at_ms = Some(until_ms);
    }
}

/// Inserts an event unless its `(payment_id, type, sequence)` is already enqueued.
pub(super) fn insert_webhook(
    conn: &Connection,
    e: &WebhookEvent,
    no_webhook: &NoWebhook,
) -> rusqlite::Result<()> {
    let (status, next_attempt_at_ms) = no_webhook.stored_state(e);
    if status == WebhookStatus::Skipped && e.status != WebhookStatus::Skipped {
        // Nowhere to go: not written, derived when read (`settlement::skipped`).
        return Ok(());
    }
    conn.prepare_cached(&format!(
        "INSERT INTO webhook_events ({WEBHOOK_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) ON CONFLICT DO NOTHING"
    ))?
    .execute(params![
        e.id,
        e.merchant_id,
        e.payment_id,
        e.event_type,
        e.sequence,
        e.payload,
        e.url,
        status.as_str(),
        e.attempts,
        next_attempt_at_ms.map(ms),
        e.last_status,
        e.last_error,
        ms(e.created_at_ms),
        ms(e.updated_at_ms)
    ])?;
    Ok(())
}

/// Enqueues the event a just-inserted settlement announces (`events::for_settlement`).
pub(super) fn enqueue_settlement_webhook(
    conn: &Connection,
    s: &Settlement,
    no_webhook: &NoWebhook,
) -> rusqlite::Result<()> {
    let stored = if events::needs_stored_payment(s) {
        query_row(
            conn,
            &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"),
            [&s.payment_id],
            payment_from_row,
        )
        .optional()?
    } else {
        None
    };
    let payment = s.payment.as_ref().or(stored.as_ref());
    if payment.is_some_and(|p| no_webhook.derives_events_of(p)) {
        // Nowhere to go: no payload built, nothing written (derived when read).
        return Ok(());
    }
    if let Some(event) = events::for_settlement(s, payment, telemetry::now_ms()) {
        insert_webhook(conn, &event, no_webhook)?;
    }
    Ok(())
}

/// Enqueues the event a payment's new final status announces (`events::for_final_status`).
pub(super) fn enqueue_status_webhook(
    conn: &Connection,
    payment_id: &str,
    no_webhook: &NoWebhook,
) -> rusqlite::Result<()> {
    let payment = query_row(
        conn,
        &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"),
        [payment_id],
        payment_from_row,
    )?;
    if no_webhook.derives_events_of(&payment) {
        return Ok(());
    }
    if let Some(event) = events::for_final_status(&payment, telemetry::now_ms()) {
        insert_webhook(conn, &event, no_webhook)?;
    }
    Ok(())
}

/// Records a webhook delivery attempt of a pending event inside the caller's transaction.
pub(super) fn webhook_attempt_in(conn: &Connection, a: &WebhookAttempt) -> rusqlite::Result<bool> {
    let error = webhook_error_text(a.error.as_deref());
    let (status, attempted, next) = a.outcome.transition();
    let updated = conn
        .prepare_cached(
            "UPDATE webhook_events SET status = ?2, attempts = attempts + ?3, \
             next_attempt_at_ms = ?4, last_status = COALESCE(?5, last_status), \
             last_error = COALESCE(?6, last_error), updated_at_ms = ?7 \
             WHERE id = ?1 AND status = 'pending'",
        )?
        .execute(params![
            a.id,
            status.as_str(),
            i64::from(attempted),
            next.map(ms),
            a.http_status,
            error,
            ms(a.now_ms)
        ])?;
    Ok(updated == 1)
}

#[async_trait]
impl WebhookStore for SqliteStore {
    async fn claim_webhooks(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<WebhookEvent>, SettleError> {
        self.claim(
            StoreOp::Write("claim_webhooks"),
            now_ms,
            lease_until_ms,
            limit,
        )
        .await
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        outcome: WebhookOutcome,
        http_status: Option<u16>,
        error: Option<&str>,
        now_ms: u64,
    ) -> Result<bool, SettleError> {
        let attempt = WebhookAttempt {
            id: id.to_owned(),
            outcome,
            http_status,
            error: error.map(str::to_owned),
            now_ms,
        };
        self.run(StoreOp::Write("record_webhook_attempt"), move |conn| {
            webhook_attempt_in(conn, &attempt).map_err(db)
        })
        .await
    }

    async fn webhook_events(&self, payment_id: &str) -> Result<Vec<WebhookEvent>, SettleError> {
        let payment_id = payment_id.to_owned();
        let no_webhook = self.no_webhook.clone();
        self.run(StoreOp::Read("webhook_events"), move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhook_events WHERE payment_id = ?1 \
                     ORDER BY created_at_ms, id"
                ))
                .map_err(db)?;
            let stored = stmt
                .query_map([&payment_id], webhook_from_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            let payment = query_row(
                conn,
                &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"),
                [&payment_id],
                payment_from_row,
            )
            .optional()
            .map_err(db)?;
            let Some(payment) = payment.filter(|p| no_webhook.derives_events_of(p)) else {
                return Ok(stored);
            };
            let movements = conn
                .prepare_cached(
                    "SELECT kind, sequence, settled_at_ms FROM transfers WHERE payment_id = ?1",
                )
                .map_err(db)?
                .query_map([&payment_id], |r| {
                    Ok(MovementStamp {
                        kind: named(r.get(0)?, SettlementKind::parse)?,
                        sequence: r.get(1)?,
                        settled_at_ms: r.get::<_, i64>(2)? as u64,
                    })
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            let refunds = conn
                .prepare_cached(&format!(
                    "SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = ?1"
                ))
                .map_err(db)?
                .query_map([&payment_id], refund_from_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(skipped::merge(
                stored,
                skipped::derive(&payment, &movements, &refunds),
            ))
        })
        .await
    }

    async fn webhook_backlog(&self) -> Result<u64, SettleError> {
        self.run(StoreOp::Read("webhook_backlog"), |conn| {
            let pending: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM webhook_events WHERE status = 'pending'",
                    [],
                    |r| r.get(0),
                )
                .map_err(db)?;
            Ok(u64::try_from(pending).unwrap_or(0))
        })
        .await
    }
}
