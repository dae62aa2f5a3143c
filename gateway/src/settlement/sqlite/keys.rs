//! SQLite: idempotency keys and order ids as the store arbitrates them, refusals, the key purge,
//! and the live payment holding an order id.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::settlement::{
    AdjustmentKey, Kept, KeptKey, KeyHolder, KeyStore, PaymentRow, RefusalRow, SettleError,
    StoredKey, Taken,
};
use crate::telemetry::StoreOp;

use super::lease::take_lease;
use super::rows::{payment_from_row, PAYMENT_COLUMNS};
use super::{db, exec, ms, named, SqliteStore};
use crate::preauth::{PaymentStatus, StoredOutcome};

/// The lease under which one instance at a time purges keys (`purge_keys`).
const KEY_PURGE_LEASE: &str = "key_purge";

/// What the store holds against a new payment row `p` (not yet stored): another payment under
/// its (scope, idempotency key) — the same request or another — or another live payment under
/// its scoped order id; `None` when `p` may be written. The key is checked first: a retried
/// request must be replayed, not refused as a duplicate of its own first payment.
pub(super) fn arbitrate(tx: &Connection, p: &PaymentRow) -> Result<Option<Taken>, SettleError> {
    if let Some(key) = &p.idempotency_key {
        let holder: Option<(String, Option<String>, i64)> = tx
            .prepare_cached(
                "SELECT id, request_hash, created_at_ms FROM payments \
                 WHERE scope_tag = ?1 AND idempotency_key = ?2",
            )
            .and_then(|mut st| {
                st.query_row(params![p.scope_tag, key], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
            })
            .map_err(db)?;
        if let Some((payment_id, request_hash, created_at_ms)) = holder {
            let holder = KeyHolder {
                payment_id,
                request_hash: request_hash.unwrap_or_default(),
                created_at_ms: created_at_ms as u64,
                answer: None,
            };
            return Ok(Some(holder.taken_by(p.request_hash.as_deref())));
        }
        // A key whose first answer was a refusal (a 402 Redis forgot): that is the answer.
        if let Some(holder) = refused(tx, &p.scope_tag, key)? {
            return Ok(Some(holder.taken_by(p.request_hash.as_deref())));
        }
    }
    let holder: Option<String> = tx
        .prepare_cached(
            "SELECT id FROM payments WHERE scope_tag = ?1 AND merchant_order_id = ?2 \
             AND status IN ('pending', 'succeeded', 'partially_refunded', 'refunded')",
        )
        .and_then(|mut st| {
            st.query_row(params![p.scope_tag, p.merchant_order_id], |r| r.get(0))
                .optional()
        })
        .map_err(db)?;
    Ok(holder.map(Taken::Order))
}

/// Who holds an adjustment's (scope, idempotency key) other than adjustment `id` itself: the
/// first adjustment, to replay (same request) or refuse (another request). `None`: `id` may
/// be committed with the key.
pub(super) fn adjustment_taken(
    tx: &Connection,
    id: &str,
    a: &AdjustmentKey,
) -> Result<Option<Taken>, SettleError> {
    let holder: Option<(String, String, i64, String)> = tx
        .prepare_cached(
            "SELECT adjustment_id, request_hash, created_at_ms, doc FROM adjustments \
             WHERE scope_tag = ?1 AND idempotency_key = ?2",
        )
        .and_then(|mut st| {
            st.query_row(params![a.scope_tag, a.idempotency_key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
        })
        .map_err(db)?;
    let holder = match holder {
        Some((holder, ..)) if holder == id => return Ok(None),
        Some((payment_id, request_hash, created_at_ms, doc)) => Some(KeyHolder {
            payment_id,
            request_hash,
            created_at_ms: created_at_ms as u64,
            answer: Some(StoredOutcome::Adjustment(doc)),
        }),
        None => refused(tx, &a.scope_tag, &a.idempotency_key)?,
    };
    Ok(holder.map(|holder| holder.taken_by(Some(&a.request_hash))))
}

/// A key's payment from `scope_tag, idempotency_key, request_hash, id, created_at_ms,
/// merchant_order_id, status`.
fn stored_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredKey> {
    Ok(StoredKey {
        scope_tag: r.get(0)?,
        idempotency_key: r.get(1)?,
        request_hash: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
        payment_id: r.get(3)?,
        created_at_ms: r.get::<_, i64>(4)? as u64,
        merchant_order_id: r.get(5)?,
        status: named(r.get(6)?, PaymentStatus::parse)?,
    })
}

/// The refusal kept under (scope, key), as the key's holder.
fn refused(tx: &Connection, scope_tag: &str, key: &str) -> Result<Option<KeyHolder>, SettleError> {
    let refusal: Option<(String, String, i64)> = tx
        .prepare_cached(
            "SELECT request_hash, outcome, created_at_ms FROM refusals \
             WHERE scope_tag = ?1 AND idempotency_key = ?2",
        )
        .and_then(|mut st| {
            st.query_row(params![scope_tag, key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
        })
        .map_err(db)?;
    refusal
        .map(|(request_hash, outcome, created_at_ms)| {
            Ok(KeyHolder {
                payment_id: String::new(),
                request_hash,
                created_at_ms: created_at_ms as u64,
                answer: Some(
                    StoredOutcome::decode(&outcome)
                        .map_err(|e| SettleError::Invalid(format!("refusal of {key}: {e}")))?,
                ),
            })
        })
        .transpose()
}

/// Keeps an adjustment's key with its movement (inside the movement's transaction).
pub(super) fn insert_adjustment(
    tx: &Connection,
    id: &str,
    a: &AdjustmentKey,
) -> Result<(), SettleError> {
    exec(
        tx,
        "INSERT INTO adjustments (adjustment_id, scope_tag, idempotency_key, request_hash, doc, \
         created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (adjustment_id) DO NOTHING",
        params![
            id,
            a.scope_tag,
            a.idempotency_key,
            a.request_hash,
            a.doc,
            ms(a.created_at_ms)
        ],
    )
    .map_err(db)?;
    Ok(())
}

/// Records a refusal inside the caller's transaction (a key already there keeps its first
/// answer): `false` when the key had an answer already.
pub(super) fn refusal_in(conn: &Connection, r: &RefusalRow) -> rusqlite::Result<bool> {
    let inserted = exec(
        conn,
        "INSERT INTO refusals (scope_tag, idempotency_key, request_hash, \
         outcome, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT DO NOTHING",
        params![
            r.scope_tag,
            r.idempotency_key,
            r.request_hash,
            r.outcome,
            ms(r.created_at_ms)
        ],
    )?;
    Ok(inserted == 1)
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn keyed_payments(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredKey>, SettleError> {
        let scope_tag = scope_tag.map(str::to_owned);
        let (after_ms, after_id) = match after {
            Some((ms_, id)) => (ms(ms_), id.to_owned()),
            None => (-1, String::new()),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(StoreOp::Read("keyed_payments"), move |conn| {
            let mut st = conn
                .prepare_cached(
                    "SELECT scope_tag, idempotency_key, request_hash, id, created_at_ms, \
                     merchant_order_id, status \
                     FROM payments WHERE idempotency_key IS NOT NULL AND created_at_ms >= ?1 \
                     AND (?2 IS NULL OR scope_tag = ?2) AND (created_at_ms, id) > (?3, ?4) \
                     ORDER BY created_at_ms, id LIMIT ?5",
                )
                .map_err(db)?;
            let rows = st
                .query_map(
                    params![ms(since_ms), scope_tag, after_ms, after_id, limit],
                    stored_key,
                )
                .map_err(db)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
        })
        .await
    }

    async fn refusals(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RefusalRow>, SettleError> {
        let page = KeyPage::new(Kept::Refusals, since_ms, scope_tag, after, limit);
        self.key_page(page, RefusalRow::from).await
    }

    async fn adjustment_keys(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<AdjustmentKey>, SettleError> {
        let page = KeyPage::new(Kept::Adjustments, since_ms, scope_tag, after, limit);
        self.key_page(page, AdjustmentKey::from).await
    }

    async fn purge_keys(
        &self,
        holder: &str,
        now_ms: u64,
        lease_ms: u64,
        before_ms: u64,
        limit: usize,
    ) -> Result<Option<u64>, SettleError> {
        let holder = holder.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(StoreOp::Write("purge_keys"), move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            if !take_lease(&tx, KEY_PURGE_LEASE, &holder, now_ms, lease_ms)? {
                return Ok(None);
            }
            let keys = exec(
                &tx,
                "UPDATE payments SET idempotency_key = NULL, request_hash = NULL WHERE id IN \
                 (SELECT id FROM payments WHERE idempotency_key IS NOT NULL \
                  AND created_at_ms < ?1 LIMIT ?2)",
                params![ms(before_ms), limit],
            )
            .map_err(db)?;
            let refusals = exec(
                &tx,
                "DELETE FROM refusals WHERE rowid IN (SELECT rowid FROM refusals \
                 WHERE created_at_ms < ?1 LIMIT ?2)",
                params![ms(before_ms), limit],
            )
            .map_err(db)?;
            // An adjustment's key row goes whole: its movement (the record) stays.
            let adjustments = exec(
                &tx,
                "DELETE FROM adjustments WHERE adjustment_id IN (SELECT adjustment_id \
                 FROM adjustments WHERE created_at_ms < ?1 LIMIT ?2)",
                params![ms(before_ms), limit],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(Some((keys + refusals + adjustments) as u64))
        })
        .await
    }

    async fn payment_by_key(
        &self,
        scope_tag: &str,
        idempotency_key: &str,
    ) -> Result<Option<StoredKey>, SettleError> {
        let (tag, key) = (scope_tag.to_owned(), idempotency_key.to_owned());
        self.run(StoreOp::Read("payment_by_key"), move |conn| {
            conn.prepare_cached(
                "SELECT scope_tag, idempotency_key, request_hash, id, created_at_ms, \
                 merchant_order_id, status \
                 FROM payments WHERE scope_tag = ?1 AND idempotency_key = ?2",
            )
            .and_then(|mut st| st.query_row(params![tag, key], stored_key).optional())
            .map_err(db)
        })
        .await
    }

    async fn release_idempotency_key(&self, payment_id: &str) -> Result<bool, SettleError> {
        let id = payment_id.to_owned();
        self.run(StoreOp::Write("release_idempotency_key"), move |conn| {
            let updated = exec(
                conn,
                "UPDATE payments SET idempotency_key = NULL, request_hash = NULL \
                 WHERE id = ?1 AND status = 'failed'",
                params![id],
            )
            .map_err(db)?;
            Ok(updated == 1)
        })
        .await
    }

    async fn live_payment_by_order(
        &self,
        scope_tag: &str,
        merchant_order_id: &str,
    ) -> Result<Option<PaymentRow>, SettleError> {
        let (tag, order) = (scope_tag.to_owned(), merchant_order_id.to_owned());
        self.run(StoreOp::Read("live_payment_by_order"), move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {PAYMENT_COLUMNS} FROM payments WHERE scope_tag = ?1 \
                 AND merchant_order_id = ?2 \
                 AND status IN ('pending', 'succeeded', 'partially_refunded', 'refunded')"
            ))
            .and_then(|mut st| {
                st.query_row(params![tag, order], payment_from_row)
                    .optional()
            })
            .map_err(db)
        })
        .await
    }
}

/// One page of a [`Kept`] table, in (created_at_ms, key) order after the cursor.
struct KeyPage {
    kept: Kept,
    since_ms: u64,
    scope_tag: Option<String>,
    after_ms: i64,
    after_key: String,
    limit: i64,
}

impl KeyPage {
    fn new(
        kept: Kept,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Self {
        let (after_ms, after_key) = match after {
            Some((at, key)) => (ms(at), key.to_owned()),
            None => (-1, String::new()),
        };
        Self {
            kept,
            since_ms,
            scope_tag: scope_tag.map(str::to_owned),
            after_ms,
            after_key,
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
        }
    }
}

impl SqliteStore {
    /// Reads one [`KeyPage`], each row made a `T` by `row`.
    async fn key_page<T: Send + 'static>(
        &self,
        page: KeyPage,
        row: fn(KeptKey) -> T,
    ) -> Result<Vec<T>, SettleError> {
        let (table, answer, op) = page.kept.names();
        self.run(StoreOp::Read(op), move |conn| {
            let mut st = conn
                .prepare_cached(&format!(
                    "SELECT scope_tag, idempotency_key, request_hash, {answer}, created_at_ms \
                     FROM {table} WHERE created_at_ms >= ?1 \
                     AND (?2 IS NULL OR scope_tag = ?2) \
                     AND (created_at_ms, idempotency_key) > (?3, ?4) \
                     ORDER BY created_at_ms, idempotency_key LIMIT ?5"
                ))
                .map_err(db)?;
            let rows = st
                .query_map(
                    params![
                        ms(page.since_ms),
                        page.scope_tag,
                        page.after_ms,
                        page.after_key,
                        page.limit
                    ],
                    |r| {
                        Ok(row(KeptKey {
                            scope_tag: r.get(0)?,
                            idempotency_key: r.get(1)?,
                            request_hash: r.get(2)?,
                            answer: r.get(3)?,
                            created_at_ms: r.get::<_, i64>(4)? as u64,
                        }))
                    },
                )
                .map_err(db)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
        })
        .await
    }
}
