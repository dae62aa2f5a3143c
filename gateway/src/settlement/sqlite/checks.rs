//! SQLite: the resolution loop's schedule (claiming due payments, scheduling the next check).

use async_trait::async_trait;
use rusqlite::{params, TransactionBehavior};

use crate::settlement::{CheckStore, PaymentRow, SettleError};
use crate::telemetry::StoreOp;

use super::payments::{payment_from_row, PAYMENT_COLUMNS};
use super::{db, ms, SqliteStore};

#[async_trait]
impl CheckStore for SqliteStore {
    async fn claim_due(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<PaymentRow>, SettleError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.run(StoreOp::Write("claim_due"), move |conn| {
            // One writer at a time (IMMEDIATE): no other process can claim the same rows
            // between the select and the update.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let mut due = {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE status = 'pending' \
                         AND next_check_at_ms <= ?1 ORDER BY next_check_at_ms, id LIMIT ?2"
                    ))
                    .map_err(db)?;
                let rows = stmt
                    .query_map(
                        params![ms(now_ms), i64::try_from(limit).unwrap_or(i64::MAX)],
                        payment_from_row,
                    )
                    .map_err(db)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(db)?
            };
            if due.is_empty() {
                return Ok(due);
            }
            {
                let mut lease = tx
                    .prepare_cached("UPDATE payments SET next_check_at_ms = ?2 WHERE id = ?1")
                    .map_err(db)?;
                for p in &mut due {
                    lease
                        .execute(params![p.id, ms(lease_until_ms)])
                        .map_err(db)?;
                    p.next_check_at_ms = Some(lease_until_ms);
                }
            }
            tx.commit().map_err(db)?;
            Ok(due)
        })
        .await
    }

    async fn schedule_check(
        &self,
        payment_id: &str,
        next_check_at_ms: Option<u64>,
    ) -> Result<(), SettleError> {
        let payment_id = payment_id.to_owned();
        self.run(StoreOp::Write("schedule_check"), move |conn| {
            let updated = conn
                .execute(
                    "UPDATE payments SET next_check_at_ms = ?2, checks = checks + 1 \
                     WHERE id = ?1",
                    params![payment_id, next_check_at_ms.map(ms)],
                )
                .map_err(db)?;
            if updated == 0 {
                return Err(SettleError::Invalid(format!(
                    "{payment_id}: no such payment"
                )));
            }
            Ok(())
        })
        .await
    }
}
