//! PostgreSQL: the resolution loop's schedule (claiming due payments, scheduling the next
//! check).

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres::{self};

use crate::settlement::{CheckStore, PaymentRow, SettleError};
use crate::telemetry::StoreOp;

use super::payments::{payment_from_row, PAYMENT_COLUMNS};
use super::{get_u64, ms, PostgresStore};

impl PostgresStore {
    async fn claim_due_inner(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<PaymentRow>, SettleError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        // Due pending payments, oldest check first, locked (skipping rows another instance
        // is claiming right now) and leased in one statement, so one implicit transaction.
        // `RETURNING` keeps no order: the old `next_check_at_ms` (`was`) orders them below.
        let stmt = client
            .prepare_cached(&format!(
                "WITH due AS (SELECT id AS due_id, next_check_at_ms AS was FROM payments \
                 WHERE status = 'pending' AND next_check_at_ms <= $1 \
                 ORDER BY next_check_at_ms, id COLLATE \"C\" LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 UPDATE payments SET next_check_at_ms = $2 FROM due WHERE id = due.due_id \
                 RETURNING {PAYMENT_COLUMNS}, due.was"
            ))
            .await
            .map_err(db)?;
        let rows = client
            .query(&stmt, &[&ms(now_ms), &ms(lease_until_ms), &limit])
            .await
            .map_err(db)?;
        let mut claimed = rows
            .iter()
            .map(|r| Ok((get_u64(r, 20)?, payment_from_row(r)?)))
            .collect::<Result<Vec<_>, SettleError>>()?;
        claimed.sort_by(|(a_was, a), (b_was, b)| (a_was, &a.id).cmp(&(b_was, &b.id)));
        Ok(claimed.into_iter().map(|(_, p)| p).collect())
    }
}

#[async_trait]
impl CheckStore for PostgresStore {
    async fn claim_due(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<PaymentRow>, SettleError> {
        Self::timed(
            StoreOp::Write("claim_due"),
            self.claim_due_inner(now_ms, lease_until_ms, limit),
        )
        .await
    }

    async fn schedule_check(
        &self,
        payment_id: &str,
        next_check_at_ms: Option<u64>,
    ) -> Result<(), SettleError> {
        Self::timed(StoreOp::Write("schedule_check"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "UPDATE payments SET next_check_at_ms = $2, checks = checks + 1 \
                     WHERE id = $1",
                )
                .await
                .map_err(db)?;
            let updated = client
                .execute(&stmt, &[&payment_id, &next_check_at_ms.map(ms)])
                .await
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
