//! SQLite: refunds, recorded before their channel is called, and their final statuses.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::settlement::{
    RefundRecorded, RefundRow, RefundStatus, RefundStatusChange, RefundStore, SettleError,
};
use crate::telemetry::{self, StoreOp};
use crate::webhooks::events;

use super::rows::{payment_from_row, PAYMENT_COLUMNS};
use super::webhooks::insert_webhook;
use super::{currency, db, exec, ms, named, query_row, SqliteStore};
use crate::settlement::FlagKind;

pub(super) const REFUND_COLUMNS: &str =
    "refund_id, payment_id, number, amount_minor, currency, status, \
    channel_id, channel_order_id, reason, created_at_ms, updated_at_ms, idempotency_key";

pub(super) fn refund_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RefundRow> {
    Ok(RefundRow {
        refund_id: r.get(0)?,
        payment_id: r.get(1)?,
        number: r.get(2)?,
        amount_minor: r.get(3)?,
        currency: currency(r.get(4)?)?,
        status: named(r.get(5)?, RefundStatus::parse)?,
        channel_id: r.get(6)?,
        channel_order_id: r.get(7)?,
        reason: r.get(8)?,
        created_at_ms: r.get::<_, i64>(9)? as u64,
        updated_at_ms: r.get::<_, i64>(10)? as u64,
        idempotency_key: r.get(11)?,
    })
}

/// Flags a refund the store refused (`kind`: `refund_conflict`, `refund_cap`), under its
/// payment.
fn flag_refund(
    tx: &Connection,
    r: &RefundRow,
    kind: FlagKind,
    why: &str,
) -> Result<(), SettleError> {
    exec(
        tx,
        "INSERT INTO flagged (kind, payment_id, detail, created_at_ms) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT DO NOTHING",
        params![
            kind.as_str(),
            r.payment_id,
            format!(
                "refund {} of {} refused: {why} (the balance store had lost the payment's refunds)",
                r.refund_id, r.amount_minor
            ),
            ms(telemetry::now_ms())
        ],
    )
    .map_err(db)?;
    Ok(())
}

#[async_trait]
impl RefundStore for SqliteStore {
    async fn record_refund(&self, refund: &RefundRow) -> Result<RefundRecorded, SettleError> {
        let r = refund.clone();
        self.run(StoreOp::Write("record_refund"), move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let stored: Option<RefundRow> = query_row(
                &tx,
                &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE refund_id = ?1"),
                params![r.refund_id],
                refund_from_row,
            )
            .optional()
            .map_err(db)?;
            if let Some(stored) = stored {
                if !stored.same_as(&r) {
                    flag_refund(
                        &tx,
                        &r,
                        FlagKind::RefundConflict,
                        "another refund has this id",
                    )?;
                    tx.commit().map_err(db)?;
                    return Ok(RefundRecorded::Conflict);
                }
                return Ok(RefundRecorded::AlreadyRecorded);
            }
            let amount: Option<i64> = query_row(
                &tx,
                "SELECT amount_minor FROM payments WHERE id = ?1",
                params![r.payment_id],
                |row| row.get(0),
            )
            .optional()
            .map_err(db)?;
            let Some(amount) = amount else {
                return Err(SettleError::Invalid(format!(
                    "{}: a refund of an unknown payment",
                    r.refund_id
                )));
            };
            let refunded: i64 = query_row(
                &tx,
                "SELECT COALESCE(SUM(amount_minor), 0) FROM refunds \
                 WHERE payment_id = ?1 AND status <> 'failed'",
                params![r.payment_id],
                |row| row.get(0),
            )
            .map_err(db)?;
            let remaining_minor = amount - refunded;
            if r.amount_minor > remaining_minor {
                let detail = format!("{} left to refund", remaining_minor.max(0));
                flag_refund(&tx, &r, FlagKind::RefundCap, &detail)?;
                tx.commit().map_err(db)?;
                return Ok(RefundRecorded::Exceeds { remaining_minor });
            }
            tx.execute(
                "INSERT INTO refunds (refund_id, payment_id, number, amount_minor, currency, \
                 status, channel_id, channel_order_id, reason, created_at_ms, updated_at_ms, \
                 idempotency_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    r.refund_id,
                    r.payment_id,
                    r.number,
                    r.amount_minor,
                    r.currency.code(),
                    r.status.as_str(),
                    r.channel_id,
                    r.channel_order_id,
                    r.reason,
                    ms(r.created_at_ms),
                    ms(r.updated_at_ms),
                    r.idempotency_key
                ],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(RefundRecorded::Inserted)
        })
        .await
    }

    async fn set_refund_status(&self, change: &RefundStatusChange) -> Result<bool, SettleError> {
        let c = change.clone();
        let no_webhook = self.no_webhook.clone();
        self.run(StoreOp::Write("set_refund_status"), move |conn| {
            let tx = conn.transaction().map_err(db)?;
            let changed = tx
                .execute(
                    "UPDATE refunds SET status = ?2, updated_at_ms = ?3 \
                     WHERE refund_id = ?1 AND status = 'pending'",
                    params![c.refund_id, c.status.as_str(), ms(c.updated_at_ms)],
                )
                .map_err(db)?;
            if changed == 1 && c.status == RefundStatus::Failed {
                // The merchant's webhook, in the same transaction as the status.
                let refund = tx
                    .query_row(
                        &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE refund_id = ?1"),
                        [&c.refund_id],
                        refund_from_row,
                    )
                    .map_err(db)?;
                let payment = tx
                    .query_row(
                        &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"),
                        [&refund.payment_id],
                        payment_from_row,
                    )
                    .optional()
                    .map_err(db)?;
                if let Some(payment) = payment.filter(|p| !no_webhook.derives_events_of(p)) {
                    let event = events::for_failed_refund(&payment, &refund, c.updated_at_ms);
                    insert_webhook(&tx, &event, &no_webhook).map_err(db)?;
                }
            }
            tx.commit().map_err(db)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn refunds(&self, payment_id: &str) -> Result<Vec<RefundRow>, SettleError> {
        let payment_id = payment_id.to_owned();
        self.run(StoreOp::Read("refunds"), move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = ?1 ORDER BY number"
                ))
                .map_err(db)?;
            let rows = stmt.query_map([&payment_id], refund_from_row).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn stale_refunds(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<RefundRow>, SettleError> {
        self.run(StoreOp::Read("stale_refunds"), move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {REFUND_COLUMNS} FROM refunds WHERE status = 'pending' \
                     AND updated_at_ms < ?1 ORDER BY updated_at_ms LIMIT ?2"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map(params![ms(before_ms), limit as i64], refund_from_row)
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }
}
