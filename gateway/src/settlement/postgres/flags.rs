//! PostgreSQL: payments flagged for a human.

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres;
use deadpool_postgres::Transaction;

use crate::settlement::{FlagStore, Flagged, SettleError};
use crate::telemetry::{self, StoreOp};

use super::{get, get_named, get_u64, ms, PostgresStore};
use crate::settlement::FlagKind;

const INSERT_FLAG: &str = "INSERT INTO flagged (kind, payment_id, detail, created_at_ms) \
    VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

pub(super) async fn flag(
    tx: &Transaction<'_>,
    kind: FlagKind,
    payment_id: &str,
    detail: &str,
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx.prepare_cached(INSERT_FLAG).await?;
    tx.execute(
        &stmt,
        &[
            &kind.as_str(),
            &payment_id,
            &detail,
            &ms(telemetry::now_ms()),
        ],
    )
    .await?;
    Ok(())
}

impl PostgresStore {
    async fn flagged_inner(&self, limit: usize) -> Result<Vec<Flagged>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT kind, payment_id, detail, created_at_ms FROM flagged \
                 ORDER BY created_at_ms DESC LIMIT $1",
            )
            .await
            .map_err(db)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client.query(&stmt, &[&limit]).await.map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(Flagged {
                    kind: get_named(r, 0, FlagKind::parse)?,
                    payment_id: get(r, 1)?,
                    detail: get(r, 2)?,
                    created_at_ms: get_u64(r, 3)?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl FlagStore for PostgresStore {
    async fn flag(&self, item: &Flagged) -> Result<bool, SettleError> {
        Self::timed(StoreOp::Write("flag"), async {
            let client = self.client().await?;
            let at = i64::try_from(item.created_at_ms).unwrap_or(i64::MAX);
            let inserted = client
                .execute(
                    INSERT_FLAG,
                    &[&item.kind.as_str(), &item.payment_id, &item.detail, &at],
                )
                .await
                .map_err(|e| self.unavailable(&e))?;
            Ok(inserted == 1)
        })
        .await
    }

    async fn flagged(&self, limit: usize) -> Result<Vec<Flagged>, SettleError> {
        Self::timed(StoreOp::Read("flagged"), self.flagged_inner(limit)).await
    }

    async fn flagged_count(&self) -> Result<u64, SettleError> {
        Self::timed(StoreOp::Read("flagged_count"), async {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT COUNT(*) FROM flagged", &[])
                .await
                .map_err(|e| self.unavailable(&e))?;
            Ok(get::<i64>(&row, 0)?.max(0) as u64)
        })
        .await
    }
}
