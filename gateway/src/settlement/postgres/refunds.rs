//! PostgreSQL: refunds, recorded before their channel is called, and their final statuses.

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres::{self, Row};
use deadpool_postgres::Transaction;

use crate::settlement::{
    RefundRecorded, RefundRow, RefundStatus, RefundStatusChange, RefundStore, SettleError,
};
use crate::telemetry::StoreOp;
use crate::webhooks::events;

use super::flags::flag;
use super::webhooks::insert_webhooks;
use super::{get, get_currency, get_named, get_u32, get_u64, ms, PostgresStore};
use crate::settlement::FlagKind;

pub(super) const REFUND_COLUMNS: &str =
    "refund_id, payment_id, number, amount_minor, currency, status, \
    channel_id, channel_order_id, reason, created_at_ms, updated_at_ms, idempotency_key";

pub(super) fn refund_from_row(r: &Row) -> Result<RefundRow, SettleError> {
    Ok(RefundRow {
        refund_id: get(r, 0)?,
        payment_id: get(r, 1)?,
        number: get_u32(r, 2)?,
        amount_minor: get(r, 3)?,
        currency: get_currency(r, 4)?,
        status: get_named(r, 5, RefundStatus::parse)?,
        channel_id: get(r, 6)?,
        channel_order_id: get(r, 7)?,
        reason: get(r, 8)?,
        created_at_ms: get_u64(r, 9)?,
        updated_at_ms: get_u64(r, 10)?,
        idempotency_key: get(r, 11)?,
    })
}

impl PostgresStore {
    /// Flags a refund the store refused (`kind`: `refund_conflict`, `refund_cap`).
    async fn flag_refund(
        &self,
        tx: &Transaction<'_>,
        r: &RefundRow,
        kind: FlagKind,
        why: &str,
    ) -> Result<(), SettleError> {
        let detail = format!(
            "refund {} of {} refused: {why} (the balance store had lost the payment's refunds)",
            r.refund_id, r.amount_minor
        );
        flag(tx, kind, &r.payment_id, &detail)
            .await
            .map_err(|e| self.unavailable(&e))
    }
}

#[async_trait]
impl RefundStore for PostgresStore {
    async fn record_refund(&self, refund: &RefundRow) -> Result<RefundRecorded, SettleError> {
        Self::timed(StoreOp::Write("record_refund"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let number = i32::try_from(refund.number)
                .map_err(|_| SettleError::Invalid(format!("refund number {}", refund.number)))?;
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            // The payment's row, locked: refunds of one payment are decided one at a time,
            // whichever instance records them.
            let Some(payment) = tx
                .query_opt(
                    "SELECT amount_minor FROM payments WHERE id = $1 FOR UPDATE",
                    &[&refund.payment_id],
                )
                .await
                .map_err(db)?
            else {
                return Err(SettleError::Invalid(format!(
                    "{}: a refund of an unknown payment",
                    refund.refund_id
                )));
            };
            let amount: i64 = get(&payment, 0)?;
            if let Some(row) = tx
                .query_opt(
                    &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE refund_id = $1"),
                    &[&refund.refund_id],
                )
                .await
                .map_err(db)?
            {
                if refund_from_row(&row)?.same_as(refund) {
                    return Ok(RefundRecorded::AlreadyRecorded);
                }
                self.flag_refund(
                    &tx,
                    refund,
                    FlagKind::RefundConflict,
                    "another refund has this id",
                )
                .await?;
                tx.commit().await.map_err(db)?;
                return Ok(RefundRecorded::Conflict);
            }
            let refunded: i64 = get(
                &tx.query_one(
                    "SELECT COALESCE(SUM(amount_minor), 0)::BIGINT FROM refunds \
                     WHERE payment_id = $1 AND status <> 'failed'",
                    &[&refund.payment_id],
                )
                .await
                .map_err(db)?,
                0,
            )?;
            let remaining_minor = amount - refunded;
            if refund.amount_minor > remaining_minor {
                let detail = format!("{} left to refund", remaining_minor.max(0));
                self.flag_refund(&tx, refund, FlagKind::RefundCap, &detail)
                    .await?;
                tx.commit().await.map_err(db)?;
                return Ok(RefundRecorded::Exceeds { remaining_minor });
            }
            tx.execute(
                "INSERT INTO refunds (refund_id, payment_id, number, amount_minor, currency, \
                 status, channel_id, channel_order_id, reason, created_at_ms, updated_at_ms, \
                 idempotency_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[
                    &refund.refund_id,
                    &refund.payment_id,
                    &number,
                    &refund.amount_minor,
                    &refund.currency.code(),
                    &refund.status.as_str(),
                    &refund.channel_id,
                    &refund.channel_order_id,
                    &refund.reason,
                    &ms(refund.created_at_ms),
                    &ms(refund.updated_at_ms),
                    &refund.idempotency_key,
                ],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(RefundRecorded::Inserted)
        })
        .await
    }

    async fn set_refund_status(&self, change: &RefundStatusChange) -> Result<bool, SettleError> {
        Self::timed(StoreOp::Write("set_refund_status"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE refunds SET status = $2, updated_at_ms = $3 \
                         WHERE refund_id = $1 AND status = 'pending' RETURNING {REFUND_COLUMNS}"
                    ),
                    &[
                        &change.refund_id,
                        &change.status.as_str(),
                        &ms(change.updated_at_ms),
                    ],
                )
                .await
                .map_err(db)?;
            let changed = row.is_some();
            if let (Some(row), "failed") = (row, change.status.as_str()) {
                // The merchant's webhook, in the same transaction as the status.
                let refund = refund_from_row(&row)?;
                let stored = self.stored_payment(&tx, &refund.payment_id).await?;
                if let Some(payment) = stored.filter(|p| !self.no_webhook.derives_events_of(p)) {
                    let event = events::for_failed_refund(&payment, &refund, change.updated_at_ms);
                    insert_webhooks(&tx, std::slice::from_ref(&event), &self.no_webhook)
                        .await
                        .map_err(db)?;
                }
            }
            tx.commit().await.map_err(db)?;
            Ok(changed)
        })
        .await
    }

    async fn refunds(&self, payment_id: &str) -> Result<Vec<RefundRow>, SettleError> {
        Self::timed(StoreOp::Read("refunds"), async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = $1 ORDER BY number"
                    ),
                    &[&payment_id],
                )
                .await
                .map_err(|e| self.unavailable(&e))?;
            rows.iter().map(refund_from_row).collect()
        })
        .await
    }

    async fn stale_refunds(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<RefundRow>, SettleError> {
        Self::timed(StoreOp::Read("stale_refunds"), async {
            let client = self.client().await?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    &format!(
                        "SELECT {REFUND_COLUMNS} FROM refunds WHERE status = 'pending' \
                         AND updated_at_ms < $1 ORDER BY updated_at_ms LIMIT $2"
                    ),
                    &[&ms(before_ms), &limit],
                )
                .await
                .map_err(|e| self.unavailable(&e))?;
            rows.iter().map(refund_from_row).collect()
        })
        .await
    }
}
