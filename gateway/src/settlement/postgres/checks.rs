//! PostgreSQL: the resolution loop's schedule (claiming due payments, scheduling the next
//! check).

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres::{self, Row};

use crate::settlement::{CheckStore, PaymentRow, SettleError};
use crate::telemetry::StoreOp;

use super::lease::Leased;
use super::payments::{payment_from_row, PAYMENT_COLUMNS};
use super::{ms, PostgresStore};

/// The resolution loop's queue: pending payments, due at `next_check_at_ms`.
impl Leased for PaymentRow {
    const TABLE: &'static str = "payments";
    const COLUMNS: &'static str = PAYMENT_COLUMNS;
    const DUE: &'static str = "next_check_at_ms";

    fn from_row(r: &Row) -> Result<Self, SettleError> {
        payment_from_row(r)
    }

    fn id(&self) -> &str {
        &self.id
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
            self.claim(now_ms, lease_until_ms, limit),
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
