//! PostgreSQL: the merchant webhook outbox (crate::webhooks): enqueueing in the money's or the
//! status's own transaction, claiming due events, recording delivery attempts.

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres::{self, Row};
use deadpool_postgres::{GenericClient, Transaction};

use crate::settlement::{
    webhook_error_text, NoWebhook, SettleError, Settlement, WebhookAttempt, WebhookEvent,
    WebhookOutcome, WebhookStatus, WebhookStore,
};
use crate::telemetry::{self, StoreOp};
use crate::webhooks::events;

use super::lease::Leased;
use super::payments::{payment_from_row, PAYMENT_COLUMNS};
use super::refunds::{refund_from_row, REFUND_COLUMNS};
use super::{bad_row, get, get_named, get_u32, get_u64, ms, PostgresStore};
use crate::settlement::skipped::{self, MovementStamp};
use crate::settlement::SettlementKind;

const WEBHOOK_COLUMNS: &str = "id, merchant_id, payment_id, type, sequence, payload, url, \
    status, attempts, next_attempt_at_ms, last_status, last_error, created_at_ms, updated_at_ms";

/// A batch's events in one statement; an event whose `(payment_id, type, sequence)` is already
/// enqueued is skipped. Text fields come from rows checked for NUL (see `events`).
const INSERT_WEBHOOKS: &str = "INSERT INTO webhook_events (id, merchant_id, payment_id, type, \
    sequence, payload, url, status, attempts, next_attempt_at_ms, created_at_ms, \
    updated_at_ms) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], \
    $5::INTEGER[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::INTEGER[], $10::BIGINT[], \
    $11::BIGINT[], $12::BIGINT[]) ON CONFLICT DO NOTHING";

fn webhook_from_row(r: &Row) -> Result<WebhookEvent, SettleError> {
    let status: String = get(r, 7)?;
    Ok(WebhookEvent {
        id: get(r, 0)?,
        merchant_id: get(r, 1)?,
        payment_id: get(r, 2)?,
        event_type: get(r, 3)?,
        sequence: get_u32(r, 4)?,
        payload: get(r, 5)?,
        url: get(r, 6)?,
        status: WebhookStatus::parse(&status)
            .ok_or_else(|| bad_row(format!("unknown webhook status {status:?}")))?,
        attempts: get_u32(r, 8)?,
        next_attempt_at_ms: get::<Option<i64>>(r, 9)?
            .map(|v| u64::try_from(v).map_err(|_| bad_row(format!("negative due time {v}"))))
            .transpose()?,
        last_status: get::<Option<i32>>(r, 10)?
            .map(|v| u16::try_from(v).map_err(|_| bad_row(format!("HTTP status {v}"))))
            .transpose()?,
        last_error: get(r, 11)?,
        created_at_ms: get_u64(r, 12)?,
        updated_at_ms: get_u64(r, 13)?,
    })
}

pub(super) async fn insert_webhooks(
    tx: &Transaction<'_>,
    events: &[WebhookEvent],
    no_webhook: &NoWebhook,
) -> Result<(), tokio_postgres::Error> {
    // Events with nowhere to go are not written: derived when read (`settlement::skipped`).
    let events: Vec<&WebhookEvent> = events
        .iter()
        .filter(|e| {
            e.status == WebhookStatus::Skipped
                || no_webhook.stored_state(e).0 != WebhookStatus::Skipped
        })
        .collect();
    if events.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&WebhookEvent) -> &str| events.iter().map(|e| f(e)).collect::<Vec<_>>();
    let sequence: Vec<i32> = events
        .iter()
        .map(|e| i32::try_from(e.sequence).unwrap_or(i32::MAX))
        .collect();
    let attempts: Vec<i32> = events
        .iter()
        .map(|e| i32::try_from(e.attempts).unwrap_or(i32::MAX))
        .collect();
    let url: Vec<Option<&str>> = events.iter().map(|e| e.url.as_deref()).collect();
    let stored: Vec<(WebhookStatus, Option<u64>)> =
        events.iter().map(|e| no_webhook.stored_state(e)).collect();
    let status: Vec<&str> = stored.iter().map(|(s, _)| s.as_str()).collect();
    let next: Vec<Option<i64>> = stored.iter().map(|(_, n)| n.map(ms)).collect();
    let created: Vec<i64> = events.iter().map(|e| ms(e.created_at_ms)).collect();
    let updated: Vec<i64> = events.iter().map(|e| ms(e.updated_at_ms)).collect();
    let stmt = tx.prepare_cached(INSERT_WEBHOOKS).await?;
    tx.execute(
        &stmt,
        &[
            &column(|e| &e.id),
            &column(|e| &e.merchant_id),
            &column(|e| &e.payment_id),
            &column(|e| &e.event_type),
            &sequence,
            &column(|e| &e.payload),
            &url,
            &status,
            &attempts,
            &next,
            &created,
            &updated,
        ],
    )
    .await?;
    Ok(())
}

/// The delivery worker's queue: pending events, due at `next_attempt_at_ms`.
impl Leased for WebhookEvent {
    const TABLE: &'static str = "webhook_events";
    const COLUMNS: &'static str = WEBHOOK_COLUMNS;
    const DUE: &'static str = "next_attempt_at_ms";

    fn from_row(r: &Row) -> Result<Self, SettleError> {
        webhook_from_row(r)
    }

    fn id(&self) -> &str {
        &self.id
    }
}

impl PostgresStore {
    /// Records a webhook delivery attempt of a pending event (on a client or inside a
    /// transaction).
    pub(super) async fn webhook_attempt_in(
        &self,
        client: &impl GenericClient,
        a: &WebhookAttempt,
    ) -> Result<bool, SettleError> {
        if a.id.contains('\0') {
            return Ok(false);
        }
        let error = webhook_error_text(a.error.as_deref());
        let (status, attempted, next) = a.outcome.transition();
        let attempted = i32::try_from(attempted).unwrap_or(i32::MAX);
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let stmt = client
            .prepare_cached(
                "UPDATE webhook_events SET status = $2, attempts = attempts + $3, \
                 next_attempt_at_ms = $4, last_status = COALESCE($5, last_status), \
                 last_error = COALESCE($6, last_error), updated_at_ms = $7 \
                 WHERE id = $1 AND status = 'pending'",
            )
            .await
            .map_err(db)?;
        let updated = client
            .execute(
                &stmt,
                &[
                    &a.id,
                    &status.as_str(),
                    &attempted,
                    &next.map(ms),
                    &a.http_status.map(i32::from),
                    &error,
                    &ms(a.now_ms),
                ],
            )
            .await
            .map_err(db)?;
        Ok(updated == 1)
    }

    /// The event a just-inserted settlement announces (`events::for_settlement`).
    pub(super) async fn settlement_webhook(
        &self,
        tx: &Transaction<'_>,
        s: &Settlement,
    ) -> Result<Option<WebhookEvent>, SettleError> {
        let stored = if events::needs_stored_payment(s) {
            self.stored_payment(tx, &s.payment_id).await?
        } else {
            None
        };
        let payment = s.payment.as_ref().or(stored.as_ref());
        if payment.is_some_and(|p| self.no_webhook.derives_events_of(p)) {
            return Ok(None);
        }
        Ok(events::for_settlement(s, payment, telemetry::now_ms()))
    }
}

#[async_trait]
impl WebhookStore for PostgresStore {
    async fn claim_webhooks(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<WebhookEvent>, SettleError> {
        Self::timed(
            StoreOp::Write("claim_webhooks"),
            self.claim(now_ms, lease_until_ms, limit),
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
        Self::timed(StoreOp::Write("record_webhook_attempt"), async {
            let attempt = WebhookAttempt {
                id: id.to_owned(),
                outcome,
                http_status,
                error: error.map(str::to_owned),
                now_ms,
            };
            let client = self.client().await?;
            self.webhook_attempt_in(&client, &attempt).await
        })
        .await
    }

    async fn webhook_events(&self, payment_id: &str) -> Result<Vec<WebhookEvent>, SettleError> {
        Self::timed(StoreOp::Read("webhook_events"), async {
            if payment_id.contains('\0') {
                return Ok(Vec::new());
            }
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhook_events WHERE payment_id = $1 \
                     ORDER BY created_at_ms, id COLLATE \"C\""
                ))
                .await
                .map_err(db)?;
            let rows = client.query(&stmt, &[&payment_id]).await.map_err(db)?;
            let stored = rows
                .iter()
                .map(webhook_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let payment = client
                .query_opt(
                    &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1"),
                    &[&payment_id],
                )
                .await
                .map_err(db)?
                .map(|r| payment_from_row(&r))
                .transpose()?;
            let Some(payment) = payment.filter(|p| self.no_webhook.derives_events_of(p)) else {
                return Ok(stored);
            };
            let movements = client
                .query(
                    "SELECT kind, sequence, settled_at_ms FROM transfers WHERE payment_id = $1",
                    &[&payment_id],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| {
                    Ok(MovementStamp {
                        kind: get_named(r, 0, SettlementKind::parse)?,
                        sequence: get_u32(r, 1)?,
                        settled_at_ms: get_u64(r, 2)?,
                    })
                })
                .collect::<Result<Vec<_>, SettleError>>()?;
            let refunds = client
                .query(
                    &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = $1"),
                    &[&payment_id],
                )
                .await
                .map_err(db)?
                .iter()
                .map(refund_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(skipped::merge(
                stored,
                skipped::derive(&payment, &movements, &refunds),
            ))
        })
        .await
    }

    async fn webhook_backlog(&self) -> Result<u64, SettleError> {
        Self::timed(StoreOp::Read("webhook_backlog"), async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT COUNT(*) FROM webhook_events WHERE status = 'pending'",
                    &[],
                )
                .await
                .map_err(|e| self.unavailable(&e))?;
            get_u64(&row, 0)
        })
        .await
    }
}
