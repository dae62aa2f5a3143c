//! PostgreSQL: idempotency keys and order ids as the store arbitrates them, refusals, the key
//! purge, and the live payment holding an order id.

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres;
use deadpool_postgres::Transaction;

use crate::settlement::{
    AdjustmentKey, Kept, KeptKey, KeyHolder, KeyStore, PaymentRow, RefusalRow, SettleError,
    StoredKey, Taken,
};
use crate::telemetry::StoreOp;

use super::lease::take_lease;
use super::payments::{payment_from_row, PAYMENT_COLUMNS};
use super::{get, get_named, get_u64, ms, PostgresStore};
use crate::preauth::{PaymentStatus, StoredOutcome};

/// A key's payment from `scope_tag, idempotency_key, request_hash, id, created_at_ms,
/// merchant_order_id, status`.
fn stored_key(r: &tokio_postgres::Row) -> Result<StoredKey, SettleError> {
    Ok(StoredKey {
        scope_tag: get(r, 0)?,
        idempotency_key: get(r, 1)?,
        request_hash: get::<Option<String>>(r, 2)?.unwrap_or_default(),
        payment_id: get(r, 3)?,
        created_at_ms: get_u64(r, 4)?,
        merchant_order_id: get(r, 5)?,
        status: get_named(r, 6, PaymentStatus::parse)?,
    })
}

const LIVE_STATUSES: &str = "('pending', 'succeeded', 'partially_refunded', 'refunded')";

/// The lease under which one instance at a time purges keys (`purge_keys`).
const KEY_PURGE_LEASE: &str = "key_purge";

impl PostgresStore {
    /// Records a refusal inside `tx` (a key already there keeps its first answer).
    pub(super) async fn refusal_in(
        &self,
        tx: &Transaction<'_>,
        r: &RefusalRow,
    ) -> Result<bool, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let stmt = tx
            .prepare_cached(
                "INSERT INTO refusals (scope_tag, idempotency_key, request_hash, outcome, \
                 created_at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(db)?;
        let inserted = tx
            .execute(
                &stmt,
                &[
                    &r.scope_tag,
                    &r.idempotency_key,
                    &r.request_hash,
                    &r.outcome,
                    &ms(r.created_at_ms),
                ],
            )
            .await
            .map_err(db)?;
        Ok(inserted == 1)
    }

    /// What the store holds against a new payment row `p` whose insert did nothing (its id is
    /// not taken): another payment under its (scope, idempotency key), or another live payment
    /// under its scoped order id (as `arbitrate` in sqlite/keys.rs). `None` when neither is there
    /// any more (the holder changed meanwhile: the caller tries again).
    pub(super) async fn arbitrate(
        &self,
        tx: &Transaction<'_>,
        p: &PaymentRow,
    ) -> Result<Option<Taken>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        if let Some(key) = &p.idempotency_key {
            let by_key = tx
                .prepare_cached(
                    "SELECT id, request_hash, created_at_ms FROM payments \
                     WHERE scope_tag = $1 AND idempotency_key = $2",
                )
                .await
                .map_err(db)?;
            if let Some(row) = tx
                .query_opt(&by_key, &[&p.scope_tag, key])
                .await
                .map_err(db)?
            {
                let holder = KeyHolder {
                    payment_id: get(&row, 0)?,
                    request_hash: get::<Option<String>>(&row, 1)?.unwrap_or_default(),
                    created_at_ms: get_u64(&row, 2)?,
                    answer: None,
                };
                return Ok(Some(holder.taken_by(p.request_hash.as_deref())));
            }
            // A key whose first answer was a refusal (a 402 Redis forgot): that is the answer.
            if let Some(holder) = self.refused(tx, &p.scope_tag, key).await? {
                return Ok(Some(holder.taken_by(p.request_hash.as_deref())));
            }
        }
        let by_order = tx
            .prepare_cached(&format!(
                "SELECT id FROM payments WHERE scope_tag = $1 AND merchant_order_id = $2 \
                 AND status IN {LIVE_STATUSES}"
            ))
            .await
            .map_err(db)?;
        Ok(tx
            .query_opt(&by_order, &[&p.scope_tag, &p.merchant_order_id])
            .await
            .map_err(db)?
            .map(|row| get(&row, 0))
            .transpose()?
            .map(Taken::Order))
    }

    /// Who holds an adjustment's (scope, idempotency key) other than adjustment `id` itself
    /// (see the SQLite twin); `None`: `id` may be committed with the key.
    pub(super) async fn adjustment_taken(
        &self,
        tx: &Transaction<'_>,
        id: &str,
        a: &AdjustmentKey,
    ) -> Result<Option<Taken>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let by_key = tx
            .prepare_cached(
                "SELECT adjustment_id, request_hash, created_at_ms, doc FROM adjustments \
                 WHERE scope_tag = $1 AND idempotency_key = $2",
            )
            .await
            .map_err(db)?;
        let holder = match tx
            .query_opt(&by_key, &[&a.scope_tag, &a.idempotency_key])
            .await
            .map_err(db)?
        {
            Some(row) => {
                let holder = KeyHolder {
                    payment_id: get(&row, 0)?,
                    request_hash: get(&row, 1)?,
                    created_at_ms: get_u64(&row, 2)?,
                    answer: Some(StoredOutcome::Adjustment(get(&row, 3)?)),
                };
                if holder.payment_id == id {
                    return Ok(None);
                }
                holder
            }
            None => match self.refused(tx, &a.scope_tag, &a.idempotency_key).await? {
                Some(holder) => holder,
                None => return Ok(None),
            },
        };
        Ok(Some(holder.taken_by(Some(&a.request_hash))))
    }

    /// The refusal kept under (scope, key), as the key's holder.
    async fn refused(
        &self,
        tx: &Transaction<'_>,
        scope_tag: &str,
        key: &str,
    ) -> Result<Option<KeyHolder>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let by_key = tx
            .prepare_cached(
                "SELECT request_hash, outcome, created_at_ms FROM refusals \
                 WHERE scope_tag = $1 AND idempotency_key = $2",
            )
            .await
            .map_err(db)?;
        let Some(row) = tx
            .query_opt(&by_key, &[&scope_tag, &key])
            .await
            .map_err(db)?
        else {
            return Ok(None);
        };
        let outcome: String = get(&row, 1)?;
        Ok(Some(KeyHolder {
            payment_id: String::new(),
            request_hash: get(&row, 0)?,
            created_at_ms: get_u64(&row, 2)?,
            answer: Some(
                StoredOutcome::decode(&outcome)
                    .map_err(|e| SettleError::Invalid(format!("refusal of {key}: {e}")))?,
            ),
        }))
    }

    /// Keeps an adjustment's key with its movement (inside the movement's transaction).
    pub(super) async fn insert_adjustment(
        &self,
        tx: &Transaction<'_>,
        id: &str,
        a: &AdjustmentKey,
    ) -> Result<(), SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let insert = tx
            .prepare_cached(
                "INSERT INTO adjustments (adjustment_id, scope_tag, idempotency_key, \
                 request_hash, doc, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (adjustment_id) DO NOTHING",
            )
            .await
            .map_err(db)?;
        tx.execute(
            &insert,
            &[
                &id,
                &a.scope_tag,
                &a.idempotency_key,
                &a.request_hash,
                &a.doc,
                &ms(a.created_at_ms),
            ],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn keyed_payments_inner(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredKey>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let (after_ms, after_id) = match after {
            Some((at, id)) => (ms(at), id),
            None => (-1, ""),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Ordered by the id's bytes ("C"), in the comparison as in the order, so the pages
        // follow each other whatever the database's collation.
        let rows = client
            .query(
                "SELECT scope_tag, idempotency_key, request_hash, id, created_at_ms, \
                 merchant_order_id, status \
                 FROM payments WHERE idempotency_key IS NOT NULL AND created_at_ms >= $1 \
                 AND ($2::TEXT IS NULL OR scope_tag = $2) \
                 AND (created_at_ms > $3 OR (created_at_ms = $3 AND id COLLATE \"C\" > $4)) \
                 ORDER BY created_at_ms, id COLLATE \"C\" LIMIT $5",
                &[&ms(since_ms), &scope_tag, &after_ms, &after_id, &limit],
            )
            .await
            .map_err(db)?;
        rows.iter().map(stored_key).collect()
    }

    async fn payment_by_key_inner(
        &self,
        scope_tag: &str,
        idempotency_key: &str,
    ) -> Result<Option<StoredKey>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT scope_tag, idempotency_key, request_hash, id, created_at_ms, \
                 merchant_order_id, status \
                 FROM payments WHERE scope_tag = $1 AND idempotency_key = $2",
            )
            .await
            .map_err(db)?;
        client
            .query_opt(&stmt, &[&scope_tag, &idempotency_key])
            .await
            .map_err(db)?
            .as_ref()
            .map(stored_key)
            .transpose()
    }

    async fn live_payment_by_order_inner(
        &self,
        scope_tag: &str,
        merchant_order_id: &str,
    ) -> Result<Option<PaymentRow>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {PAYMENT_COLUMNS} FROM payments WHERE scope_tag = $1 \
                 AND merchant_order_id = $2 AND status IN {LIVE_STATUSES}"
            ))
            .await
            .map_err(db)?;
        client
            .query_opt(&stmt, &[&scope_tag, &merchant_order_id])
            .await
            .map_err(db)?
            .as_ref()
            .map(payment_from_row)
            .transpose()
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn keyed_payments(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredKey>, SettleError> {
        Self::timed(
            StoreOp::Read("keyed_payments"),
            self.keyed_payments_inner(since_ms, scope_tag, after, limit),
        )
        .await
    }

    async fn refusals(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RefusalRow>, SettleError> {
        self.key_page(
            Kept::Refusals,
            since_ms,
            scope_tag,
            after,
            limit,
            RefusalRow::from,
        )
        .await
    }

    async fn adjustment_keys(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<AdjustmentKey>, SettleError> {
        self.key_page(
            Kept::Adjustments,
            since_ms,
            scope_tag,
            after,
            limit,
            AdjustmentKey::from,
        )
        .await
    }

    async fn purge_keys(
        &self,
        holder: &str,
        now_ms: u64,
        lease_ms: u64,
        before_ms: u64,
        limit: usize,
    ) -> Result<Option<u64>, SettleError> {
        if holder.contains('\0') {
            return Ok(None);
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Self::timed(StoreOp::Write("purge_keys"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            if !take_lease(&tx, KEY_PURGE_LEASE, holder, now_ms, lease_ms)
                .await
                .map_err(db)?
            {
                return Ok(None);
            }
            let keys = tx
                .execute(
                    "UPDATE payments SET idempotency_key = NULL, request_hash = NULL \
                     WHERE id IN (SELECT id FROM payments WHERE idempotency_key IS NOT NULL \
                     AND created_at_ms < $1 LIMIT $2)",
                    &[&ms(before_ms), &limit],
                )
                .await
                .map_err(db)?;
            let refusals = tx
                .execute(
                    "DELETE FROM refusals WHERE (scope_tag, idempotency_key) IN \
                     (SELECT scope_tag, idempotency_key FROM refusals \
                      WHERE created_at_ms < $1 LIMIT $2)",
                    &[&ms(before_ms), &limit],
                )
                .await
                .map_err(db)?;
            // An adjustment's key row goes whole: its movement (the record) stays.
            let adjustments = tx
                .execute(
                    "DELETE FROM adjustments WHERE adjustment_id IN \
                     (SELECT adjustment_id FROM adjustments WHERE created_at_ms < $1 LIMIT $2)",
                    &[&ms(before_ms), &limit],
                )
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(Some(keys + refusals + adjustments))
        })
        .await
    }

    async fn payment_by_key(
        &self,
        scope_tag: &str,
        idempotency_key: &str,
    ) -> Result<Option<StoredKey>, SettleError> {
        // PostgreSQL text holds no NUL: no row has such a key.
        if scope_tag.contains('\0') || idempotency_key.contains('\0') {
            return Ok(None);
        }
        Self::timed(
            StoreOp::Read("payment_by_key"),
            self.payment_by_key_inner(scope_tag, idempotency_key),
        )
        .await
    }

    async fn release_idempotency_key(&self, payment_id: &str) -> Result<bool, SettleError> {
        if payment_id.contains('\0') {
            return Ok(false);
        }
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        Self::timed(StoreOp::Write("release_idempotency_key"), async {
            let client = self.client().await?;
            let updated = client
                .execute(
                    "UPDATE payments SET idempotency_key = NULL, request_hash = NULL \
                     WHERE id = $1 AND status = 'failed'",
                    &[&payment_id],
                )
                .await
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
        if scope_tag.contains('\0') || merchant_order_id.contains('\0') {
            return Ok(None);
        }
        Self::timed(
            StoreOp::Read("live_payment_by_order"),
            self.live_payment_by_order_inner(scope_tag, merchant_order_id),
        )
        .await
    }
}

impl PostgresStore {
    /// One page of a [`Kept`] table at or after `since_ms` (of `scope_tag` when given), in
    /// (created_at_ms, key) order after `after`, at most `limit`, each row made a `T`.
    async fn key_page<T>(
        &self,
        kept: Kept,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
        row: fn(KeptKey) -> T,
    ) -> Result<Vec<T>, SettleError> {
        let (table, answer, op) = kept.names();
        Self::timed(StoreOp::Read(op), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            let (after_ms, after_key) = match after {
                Some((at, key)) => (ms(at), key),
                None => (-1, ""),
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            // Ordered by the key's bytes ("C"), in the comparison as in the order, so the pages
            // follow each other whatever the database's collation.
            let rows = client
                .query(
                    &format!(
                        "SELECT scope_tag, idempotency_key, request_hash, {answer}, created_at_ms \
                         FROM {table} WHERE created_at_ms >= $1 \
                         AND ($2::TEXT IS NULL OR scope_tag = $2) \
                         AND (created_at_ms > $3 OR (created_at_ms = $3 \
                              AND idempotency_key COLLATE \"C\" > $4)) \
                         ORDER BY created_at_ms, idempotency_key COLLATE \"C\" LIMIT $5"
                    ),
                    &[&ms(since_ms), &scope_tag, &after_ms, &after_key, &limit],
                )
                .await
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    Ok(row(KeptKey {
                        scope_tag: get(r, 0)?,
                        idempotency_key: get(r, 1)?,
                        request_hash: get(r, 2)?,
                        answer: get(r, 3)?,
                        created_at_ms: get_u64(r, 4)?,
                    }))
                })
                .collect()
        })
        .await
    }
}
