//! SQLite: payments flagged for a human.

use async_trait::async_trait;
use rusqlite::params;

use crate::settlement::{FlagKind, FlagStore, Flagged, SettleError};
use crate::telemetry::StoreOp;

use super::{db, ms, named, SqliteStore};

#[async_trait]
impl FlagStore for SqliteStore {
    async fn flag(&self, item: &Flagged) -> Result<bool, SettleError> {
        let item = item.clone();
        self.run(StoreOp::Write("flag"), move |conn| {
            let inserted = conn
                .execute(
                    "INSERT INTO flagged (kind, payment_id, detail, created_at_ms) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                    params![
                        item.kind.as_str(),
                        item.payment_id,
                        item.detail,
                        ms(item.created_at_ms)
                    ],
                )
                .map_err(db)?;
            Ok(inserted == 1)
        })
        .await
    }

    async fn flagged(&self, limit: usize) -> Result<Vec<Flagged>, SettleError> {
        self.run(StoreOp::Read("flagged"), move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT kind, payment_id, detail, created_at_ms FROM flagged \
                     ORDER BY created_at_ms DESC LIMIT ?1",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([limit as i64], |r| {
                    Ok(Flagged {
                        kind: named(r.get(0)?, FlagKind::parse)?,
                        payment_id: r.get(1)?,
                        detail: r.get(2)?,
                        created_at_ms: r.get::<_, i64>(3)? as u64,
                    })
                })
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn flagged_count(&self) -> Result<u64, SettleError> {
        self.run(StoreOp::Read("flagged_count"), |conn| {
            conn.query_row("SELECT COUNT(*) FROM flagged", [], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
                .map_err(db)
        })
        .await
    }
}
