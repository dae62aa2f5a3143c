//! SQLite: the resolution loop's schedule (claiming due payments, scheduling the next check).

use async_trait::async_trait;
use rusqlite::params;

use crate::settlement::{CheckStore, PaymentRow, SettleError};
use crate::telemetry::StoreOp;

use super::lease::Leased;
use super::rows::{payment_from_row, PAYMENT_COLUMNS};
use super::{db, ms, SqliteStore};

/// The resolution loop's queue: pending payments, due at `next_check_at_ms`.
impl Leased for PaymentRow {
    const TABLE: &'static str = "payments";
    const COLUMNS: &'static str = PAYMENT_COLUMNS;
    const DUE: &'static str = "next_check_at_ms";

    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        payment_from_row(r)
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn leased_until(&mut self, until_ms: u64) {
        self.next_check_at_ms = Some(until_ms);
    }
}

#[async_trait]
impl CheckStore for SqliteStore {
    async fn claim_due(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<PaymentRow>, SettleError> {
        self.claim(StoreOp::Write("claim_due"), now_ms, lease_until_ms, limit)
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
