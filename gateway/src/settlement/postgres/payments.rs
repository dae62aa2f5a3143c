//! PostgreSQL: payments, their attempts and status events, final statuses.

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres::{self, types::ToSql, Row};
use deadpool_postgres::Transaction;

use crate::settlement::{
    AttemptOutcome, AttemptRow, AttemptUpdate, IntentOutcome, NoWebhook, PaymentRow, PaymentStore,
    SettleError, StatusChange, Write, Written,
};
use crate::telemetry::{self, StoreOp};
use crate::webhooks::events;

use super::webhooks::insert_webhooks;
use super::{
    bad_row, get, get_currency, get_named, get_u32, get_u64, invalid, ms, no_nul, PostgresStore,
};
use crate::preauth::{Method, PaymentStatus, Purpose};

/// How often `record_intent` retries when a conflicting payment vanished between its insert
/// and the look-up that explains the conflict (another instance changed it meanwhile).
const INTENT_ATTEMPTS: usize = 3;

pub(super) const PAYMENT_COLUMNS: &str =
    "id, merchant_id, account_id, scope_tag, merchant_order_id, \
    amount_minor, currency, method, purpose, status, held_minor, hold_expires_at_ms, \
    created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, checks, \
    idempotency_key, request_hash";

/// Inserts a payment unless its id, its idempotency key (by a payment or a kept refusal) or its
/// live scoped order id is taken, with its first event when the merchant's history is kept
/// (`$21`, [`NoWebhook::keeps_history`]), in one statement (one round trip); the row count
/// says whether it was inserted.
const INSERT_PAYMENT: &str = "WITH ins AS (INSERT INTO payments (id, merchant_id, account_id, \
    scope_tag, merchant_order_id, amount_minor, currency, method, purpose, status, held_minor, \
    hold_expires_at_ms, created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, \
    checks, idempotency_key, request_hash) SELECT \
    $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20 \
    WHERE NOT EXISTS (SELECT 1 FROM refusals WHERE scope_tag = $4 AND idempotency_key = $19) \
    ON CONFLICT DO NOTHING RETURNING id, status, updated_at_ms), \
    ev AS (INSERT INTO payment_events (payment_id, status, at_ms) \
    SELECT id, status, updated_at_ms FROM ins WHERE $21::BOOLEAN ON CONFLICT DO NOTHING) \
    SELECT id FROM ins";

/// A settlement's payment in one statement (one round trip): inserted whole, or, when it
/// exists, its status (never moving a refunded payment back: two refunds' commits may arrive
/// in either order, the later status wins only if it is further along), hold and
/// `updated_at_ms`; with the event of its status either way when the merchant's history is
/// kept (`$21`). Its one row says what was done.
const WRITE_PAYMENT: &str = "WITH ins AS (INSERT INTO payments (id, merchant_id, account_id, \
    scope_tag, merchant_order_id, amount_minor, currency, method, purpose, status, held_minor, \
    hold_expires_at_ms, created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, \
    checks, idempotency_key, request_hash) VALUES \
    ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
    ON CONFLICT DO NOTHING RETURNING id), \
    upd AS (UPDATE payments SET status = CASE \
    WHEN status = 'refunded' AND $10 IN ('succeeded', 'partially_refunded') THEN status \
    WHEN status = 'partially_refunded' AND $10 = 'succeeded' THEN status ELSE $10 END, \
    held_minor = $11, updated_at_ms = $15 \
    WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM ins) RETURNING id), \
    ev AS (INSERT INTO payment_events (payment_id, status, at_ms) \
    SELECT id, $10, $15 FROM (SELECT id FROM ins UNION ALL SELECT id FROM upd) w \
    WHERE $21::BOOLEAN ON CONFLICT DO NOTHING) \
    SELECT (SELECT COUNT(*) FROM ins) + (SELECT COUNT(*) FROM upd)";

const ATTEMPT_COLUMNS: &str = "payment_id, attempt, channel_id, channel_order_id, outcome, \
    latency_ms, action, channel_txn_id, created_at_ms, updated_at_ms";

/// A batch's new intents in one statement: the payments (where neither their id, their
/// idempotency key, a refusal under it, nor their live scoped order id is taken), their first
/// events (kept histories only) and their first attempts (of the payments inserted). Per
/// intent, in order: (payment inserted, attempt inserted). Rows go in by id, as every
/// transaction locks them. The caller sends each id at most once per statement.
const INSERT_INTENTS: &str = concat!(
    "WITH i AS (SELECT * FROM UNNEST(",
    unnest_payment_types!(),
    ", $22::INTEGER[], $23::TEXT[], $24::TEXT[], $25::TEXT[], $26::BIGINT[], $27::TEXT[], \
    $28::TEXT[], $29::BIGINT[], $30::BIGINT[]) WITH ORDINALITY AS i(",
    unnest_payment_names!(),
    ", attempt, channel_id, channel_order_id, outcome, latency_ms, action, channel_txn_id, \
    a_created_at_ms, a_updated_at_ms, n)), ",
    insert_unnested_payments!(),
    ", att AS (INSERT INTO attempts (payment_id, attempt, channel_id, channel_order_id, \
    outcome, latency_ms, action, channel_txn_id, created_at_ms, updated_at_ms) SELECT id, \
    attempt, channel_id, channel_order_id, outcome, latency_ms, action, channel_txn_id, \
    a_created_at_ms, a_updated_at_ms FROM i WHERE i.attempt IS NOT NULL \
    AND i.id IN (SELECT id FROM pay) ORDER BY id COLLATE \"C\" ON CONFLICT DO NOTHING \
    RETURNING payment_id) \
    SELECT i.id IN (SELECT id FROM pay), i.id IN (SELECT payment_id FROM att) FROM i ORDER BY n"
);

/// The 21 payment columns (20 and `keeps_history`) of a batch, as the `UNNEST` statements
/// (`INSERT_INTENTS`, `INSERT_CREATING_SETTLEMENTS`) take them first, in this order.
pub(super) struct PaymentColumns<'a> {
    id: Vec<&'a str>,
    merchant_id: Vec<&'a str>,
    account_id: Vec<Option<&'a str>>,
    scope_tag: Vec<&'a str>,
    merchant_order_id: Vec<&'a str>,
    amount_minor: Vec<i64>,
    currency: Vec<&'static str>,
    method: Vec<&'static str>,
    purpose: Vec<&'static str>,
    status: Vec<&'static str>,
    held_minor: Vec<i64>,
    hold_expires_at_ms: Vec<Option<i64>>,
    created_at_ms: Vec<i64>,
    expires_at_ms: Vec<i64>,
    updated_at_ms: Vec<i64>,
    doc: Vec<&'a str>,
    next_check_at_ms: Vec<Option<i64>>,
    checks: Vec<i32>,
    idempotency_key: Vec<Option<&'a str>>,
    request_hash: Vec<Option<&'a str>>,
    keeps_history: Vec<bool>,
}

impl<'a> PaymentColumns<'a> {
    pub(super) fn of(
        rows: impl Iterator<Item = &'a PaymentRow> + Clone,
        history: &NoWebhook,
    ) -> Self {
        fn col<'a, T>(
            rows: &(impl Iterator<Item = &'a PaymentRow> + Clone),
            f: impl Fn(&'a PaymentRow) -> T,
        ) -> Vec<T> {
            rows.clone().map(f).collect()
        }
        Self {
            id: col(&rows, |p| p.id.as_str()),
            merchant_id: col(&rows, |p| p.merchant_id.as_str()),
            account_id: col(&rows, |p| p.account_id.as_deref()),
            scope_tag: col(&rows, |p| p.scope_tag.as_str()),
            merchant_order_id: col(&rows, |p| p.merchant_order_id.as_str()),
            amount_minor: col(&rows, |p| p.amount_minor),
            currency: col(&rows, |p| p.currency.code()),
            method: col(&rows, |p| p.method.as_str()),
            purpose: col(&rows, |p| p.purpose.as_str()),
            status: col(&rows, |p| p.status.as_str()),
            held_minor: col(&rows, |p| p.held_minor),
            hold_expires_at_ms: col(&rows, |p| p.hold_expires_at_ms.map(ms)),
            created_at_ms: col(&rows, |p| ms(p.created_at_ms)),
            expires_at_ms: col(&rows, |p| ms(p.expires_at_ms)),
            updated_at_ms: col(&rows, |p| ms(p.updated_at_ms)),
            doc: col(&rows, |p| p.doc.as_str()),
            next_check_at_ms: col(&rows, |p| p.next_check_at_ms.map(ms)),
            checks: col(&rows, |p| i32::try_from(p.checks).unwrap_or(i32::MAX)),
            idempotency_key: col(&rows, |p| p.idempotency_key.as_deref()),
            request_hash: col(&rows, |p| p.request_hash.as_deref()),
            keeps_history: col(&rows, |p| history.keeps_history(&p.merchant_id)),
        }
    }

    /// The statement's first 21 parameters.
    pub(super) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.id,
            &self.merchant_id,
            &self.account_id,
            &self.scope_tag,
            &self.merchant_order_id,
            &self.amount_minor,
            &self.currency,
            &self.method,
            &self.purpose,
            &self.status,
            &self.held_minor,
            &self.hold_expires_at_ms,
            &self.created_at_ms,
            &self.expires_at_ms,
            &self.updated_at_ms,
            &self.doc,
            &self.next_check_at_ms,
            &self.checks,
            &self.idempotency_key,
            &self.request_hash,
            &self.keeps_history,
        ]
    }
}

/// One intent as `INSERT_INTENTS` takes it: its payment and its first attempt (checked by
/// [`check_attempt_for_postgres`]: `number` is its attempt as an INTEGER).
pub(super) struct NewIntent<'a> {
    pub p: &'a PaymentRow,
    pub first: Option<(&'a AttemptRow, i32)>,
}

/// Runs `INSERT_INTENTS` for `items` (ids distinct): per item, in order, (whether its payment
/// was inserted, whether its attempt was).
pub(super) async fn insert_intents(
    tx: &Transaction<'_>,
    items: &[NewIntent<'_>],
    history: &NoWebhook,
) -> Result<Vec<(bool, bool)>, tokio_postgres::Error> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    fn col<'a, T>(items: &'a [NewIntent<'a>], f: impl Fn(&'a NewIntent<'a>) -> T) -> Vec<T> {
        items.iter().map(f).collect()
    }
    let payments = PaymentColumns::of(items.iter().map(|c| c.p), history);
    let attempt = col(items, |c| c.first.map(|(_, n)| n));
    let channel_id = col(items, |c| c.first.map(|(a, _)| a.channel_id.as_str()));
    let channel_order_id = col(items, |c| c.first.map(|(a, _)| a.channel_order_id.as_str()));
    let outcome = col(items, |c| c.first.map(|(a, _)| a.outcome.as_str()));
    let latency_ms = col(items, |c| c.first.and_then(|(a, _)| a.latency_ms.map(ms)));
    let action = col(items, |c| c.first.and_then(|(a, _)| a.action.as_deref()));
    let txn = col(items, |c| {
        c.first.and_then(|(a, _)| a.channel_txn_id.as_deref())
    });
    let created = col(items, |c| c.first.map(|(a, _)| ms(a.created_at_ms)));
    let updated = col(items, |c| c.first.map(|(a, _)| ms(a.updated_at_ms)));
    let mut params = payments.params();
    params.extend([
        &attempt as &(dyn ToSql + Sync),
        &channel_id,
        &channel_order_id,
        &outcome,
        &latency_ms,
        &action,
        &txn,
        &created,
        &updated,
    ]);
    let stmt = tx.prepare_cached(INSERT_INTENTS).await?;
    let rows = tx.query(&stmt, &params).await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

const INSERT_ATTEMPT: &str = "INSERT INTO attempts (payment_id, attempt, channel_id, \
    channel_order_id, outcome, latency_ms, action, channel_txn_id, created_at_ms, \
    updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING";

/// An attempt's outcome; given values replace stored ones, a succeeded attempt keeps its
/// outcome, and `accepted` only follows `unknown` or itself (see `PaymentStore::update_attempt`).
const UPDATE_ATTEMPT: &str = "UPDATE attempts SET outcome = $3, \
    latency_ms = COALESCE($4, latency_ms), action = COALESCE($5, action), \
    channel_txn_id = COALESCE($6, channel_txn_id), updated_at_ms = $7 \
    WHERE payment_id = $1 AND attempt = $2 AND outcome <> 'succeeded' \
    AND ($3 <> 'accepted' OR outcome IN ('unknown', 'accepted'))";

const STORED_ATTEMPT_ORDER: &str =
    "SELECT channel_order_id FROM attempts WHERE payment_id = $1 AND attempt = $2";

const INSERT_EVENT: &str = "INSERT INTO payment_events (payment_id, status, at_ms) \
    VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

pub(super) fn payment_from_row(r: &Row) -> Result<PaymentRow, SettleError> {
    Ok(PaymentRow {
        id: get(r, 0)?,
        merchant_id: get(r, 1)?,
        account_id: get(r, 2)?,
        scope_tag: get(r, 3)?,
        merchant_order_id: get(r, 4)?,
        amount_minor: get(r, 5)?,
        currency: get_currency(r, 6)?,
        method: get_named(r, 7, Method::parse)?,
        purpose: get_named(r, 8, Purpose::parse)?,
        status: get_named(r, 9, PaymentStatus::parse)?,
        held_minor: get(r, 10)?,
        hold_expires_at_ms: get::<Option<i64>>(r, 11)?
            .map(|v| u64::try_from(v).map_err(|_| bad_row(format!("negative hold expiry {v}"))))
            .transpose()?,
        created_at_ms: get_u64(r, 12)?,
        expires_at_ms: get_u64(r, 13)?,
        updated_at_ms: get_u64(r, 14)?,
        doc: get(r, 15)?,
        next_check_at_ms: get::<Option<i64>>(r, 16)?
            .map(|v| u64::try_from(v).map_err(|_| bad_row(format!("negative next check {v}"))))
            .transpose()?,
        checks: get_u32(r, 17)?,
        idempotency_key: get(r, 18)?,
        request_hash: get(r, 19)?,
    })
}

fn attempt_from_row(r: &Row) -> Result<AttemptRow, SettleError> {
    Ok(AttemptRow {
        payment_id: get(r, 0)?,
        attempt: get_u32(r, 1)?,
        channel_id: get(r, 2)?,
        channel_order_id: get(r, 3)?,
        outcome: {
            let text: String = get(r, 4)?;
            AttemptOutcome::parse(&text)
                .ok_or_else(|| bad_row(format!("attempt outcome {text:?}")))?
        },
        latency_ms: get::<Option<i64>>(r, 5)?
            .map(|v| u64::try_from(v).map_err(|_| bad_row(format!("negative latency {v}"))))
            .transpose()?,
        action: get(r, 6)?,
        channel_txn_id: get(r, 7)?,
        created_at_ms: get_u64(r, 8)?,
        updated_at_ms: get_u64(r, 9)?,
    })
}

pub(super) fn check_payment_text(p: &PaymentRow) -> Result<(), SettleError> {
    no_nul(
        &p.id,
        [
            p.id.as_str(),
            p.merchant_id.as_str(),
            p.account_id.as_deref().unwrap_or(""),
            p.scope_tag.as_str(),
            p.merchant_order_id.as_str(),
            p.method.as_str(),
            p.purpose.as_str(),
            p.status.as_str(),
            p.doc.as_str(),
            p.idempotency_key.as_deref().unwrap_or(""),
            p.request_hash.as_deref().unwrap_or(""),
        ],
    )
}

/// What PostgreSQL's column types need of a payment's schedule: `checks` is an `INTEGER`.
pub(super) fn checks_i32(p: &PaymentRow) -> Result<i32, SettleError> {
    i32::try_from(p.checks).map_err(|_| invalid(&p.id, "checks exceed the store's INTEGER range"))
}

/// What PostgreSQL's column types need of an attempt: its number is an `INTEGER`, its text
/// holds no NUL.
pub(super) fn check_attempt_for_postgres(a: &AttemptRow) -> Result<i32, SettleError> {
    let number = i32::try_from(a.attempt)
        .map_err(|_| invalid(&a.payment_id, "attempt exceeds the store's INTEGER range"))?;
    no_nul(
        &a.payment_id,
        [
            a.payment_id.as_str(),
            a.channel_id.as_str(),
            a.channel_order_id.as_str(),
            a.outcome.as_str(),
            a.action.as_deref().unwrap_or(""),
            a.channel_txn_id.as_deref().unwrap_or(""),
        ],
    )?;
    Ok(number)
}

/// Runs `sql` (`INSERT_PAYMENT` or `WRITE_PAYMENT`) for `p`: its row, if any. `checks` must
/// fit (see [`checks_i32`]); it saturates otherwise.
async fn payment_statement(
    tx: &Transaction<'_>,
    sql: &str,
    p: &PaymentRow,
    history: &NoWebhook,
) -> Result<Option<Row>, tokio_postgres::Error> {
    let keeps_history = history.keeps_history(&p.merchant_id);
    let checks = i32::try_from(p.checks).unwrap_or(i32::MAX);
    let (currency, hold, created, expires, updated, next) = (
        p.currency.code(),
        p.hold_expires_at_ms.map(ms),
        ms(p.created_at_ms),
        ms(p.expires_at_ms),
        ms(p.updated_at_ms),
        p.next_check_at_ms.map(ms),
    );
    let stmt = tx.prepare_cached(sql).await?;
    tx.query_opt(
        &stmt,
        &[
            &p.id,
            &p.merchant_id,
            &p.account_id,
            &p.scope_tag,
            &p.merchant_order_id,
            &p.amount_minor,
            &currency,
            &p.method.as_str(),
            &p.purpose.as_str(),
            &p.status.as_str(),
            &p.held_minor,
            &hold,
            &created,
            &expires,
            &updated,
            &p.doc,
            &next,
            &checks,
            &p.idempotency_key,
            &p.request_hash,
            &keeps_history,
        ],
    )
    .await
}

/// Inserts a payment (with its first event) unless its id, its idempotency key or its live
/// scoped order id is taken; `true` if inserted.
async fn insert_payment(
    tx: &Transaction<'_>,
    p: &PaymentRow,
    history: &NoWebhook,
) -> Result<bool, tokio_postgres::Error> {
    Ok(payment_statement(tx, INSERT_PAYMENT, p, history)
        .await?
        .is_some())
}

/// Records that a payment reached `status` (once per status; the caller checked that the
/// merchant's history is kept).
async fn record_event(
    tx: &Transaction<'_>,
    id: &str,
    status: &str,
    at_ms: u64,
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx.prepare_cached(INSERT_EVENT).await?;
    tx.execute(&stmt, &[&id, &status, &ms(at_ms)]).await?;
    Ok(())
}

/// Inserts a payment, or updates its status if it exists (leaving its resolution schedule),
/// with its event, in one round trip; `false` when another live payment holds its scoped
/// order id (as `write_payment` in sqlite/payments.rs).
pub(super) async fn write_payment(
    tx: &Transaction<'_>,
    p: &PaymentRow,
    history: &NoWebhook,
) -> Result<bool, tokio_postgres::Error> {
    let row = payment_statement(tx, WRITE_PAYMENT, p, history).await?;
    let written: i64 = row.map_or(Ok(0), |r| r.try_get(0))?;
    Ok(written == 1)
}

impl PostgresStore {
    /// Inserts an attempt unless the very same one is stored; `Invalid` when it clashes with
    /// a stored attempt (as `insert_attempt` in sqlite/payments.rs). `number` is `a.attempt` as
    /// checked by [`check_attempt_for_postgres`].
    pub(super) async fn insert_attempt(
        &self,
        tx: &Transaction<'_>,
        a: &AttemptRow,
        number: i32,
    ) -> Result<(), SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        // Waits for a concurrent insert of the same key, then does nothing; the look-up (a
        // fresh snapshot) sees what that insert committed.
        let insert = tx.prepare_cached(INSERT_ATTEMPT).await.map_err(db)?;
        let inserted = tx
            .execute(
                &insert,
                &[
                    &a.payment_id,
                    &number,
                    &a.channel_id,
                    &a.channel_order_id,
                    &a.outcome.as_str(),
                    &a.latency_ms.map(ms),
                    &a.action,
                    &a.channel_txn_id,
                    &ms(a.created_at_ms),
                    &ms(a.updated_at_ms),
                ],
            )
            .await
            .map_err(db)?;
        if inserted == 1 {
            return Ok(());
        }
        let stored = tx.prepare_cached(STORED_ATTEMPT_ORDER).await.map_err(db)?;
        let stored: Option<String> = match tx
            .query_opt(&stored, &[&a.payment_id, &number])
            .await
            .map_err(db)?
        {
            Some(row) => Some(get(&row, 0)?),
            None => None,
        };
        a.explain_conflict(stored.as_deref())
    }

    async fn record_intent_inner(
        &self,
        p: &PaymentRow,
        first_attempt: Option<&AttemptRow>,
    ) -> Result<IntentOutcome, SettleError> {
        let write = Write::Intent {
            payment: p.clone(),
            first_attempt: first_attempt.cloned(),
        };
        match self
            .commit_writes_inner(std::slice::from_ref(&write))
            .await?
            .pop()
        {
            Some(Ok(Written::Intent(outcome))) => Ok(outcome),
            Some(Err(e)) => Err(e),
            other => Err(SettleError::Invalid(format!(
                "{}: unexpected intent result {other:?}",
                p.id
            ))),
        }
    }

    /// Records an intent inside `tx` (see [`PaymentStore::record_intent`]). An `Invalid`
    /// may leave the payment row written: the caller rolls the transaction back.
    pub(super) async fn intent_in(
        &self,
        tx: &Transaction<'_>,
        p: &PaymentRow,
        first_attempt: Option<&AttemptRow>,
    ) -> Result<IntentOutcome, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let first_attempt = match first_attempt {
            Some(a) => Some((a, check_attempt_for_postgres(a)?)),
            None => None,
        };
        // Insert first: it waits for a concurrent insert of the same id or order id and then
        // does nothing, and the look-ups below (each with a fresh snapshot) explain why.
        for _ in 0..INTENT_ATTEMPTS {
            if insert_payment(tx, p, &self.no_webhook).await.map_err(db)? {
                if let Some((a, number)) = first_attempt {
                    self.insert_attempt(tx, a, number).await?;
                }
                return Ok(IntentOutcome::Inserted);
            }
            let by_id = tx
                .prepare_cached("SELECT id FROM payments WHERE id = $1")
                .await
                .map_err(db)?;
            if tx.query_opt(&by_id, &[&p.id]).await.map_err(db)?.is_some() {
                // A retry: the attempt may not have made it (an older caller, or none given).
                if let Some((a, number)) = first_attempt {
                    self.insert_attempt(tx, a, number).await?;
                }
                return Ok(IntentOutcome::AlreadyRecorded);
            }
            if let Some(taken) = self.arbitrate(tx, p).await? {
                return Ok(taken.into());
            }
        }
        Err(SettleError::Unavailable(format!(
            "{}: the payment's order id kept changing hands, try again",
            p.id
        )))
    }

    /// Applies an attempt's outcome inside `tx`; a `succeeded` attempt keeps its outcome.
    pub(super) async fn update_attempt_in(
        &self,
        tx: &Transaction<'_>,
        u: &AttemptUpdate,
    ) -> Result<bool, SettleError> {
        // No such attempt can exist past the column's range.
        let Ok(number) = i32::try_from(u.attempt) else {
            return Ok(false);
        };
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let stmt = tx.prepare_cached(UPDATE_ATTEMPT).await.map_err(db)?;
        let updated = tx
            .execute(
                &stmt,
                &[
                    &u.payment_id,
                    &number,
                    &u.outcome.as_str(),
                    &u.latency_ms.map(ms),
                    &u.action,
                    &u.channel_txn_id,
                    &ms(u.now_ms),
                ],
            )
            .await
            .map_err(db)?;
        Ok(updated == 1)
    }

    async fn record_attempt_inner(&self, a: &AttemptRow) -> Result<(), SettleError> {
        a.check_for(&a.payment_id)?;
        let number = check_attempt_for_postgres(a)?;
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        self.insert_attempt(&tx, a, number).await?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn payment_inner(&self, id: &str) -> Result<Option<PaymentRow>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1"
            ))
            .await
            .map_err(db)?;
        let row = client.query_opt(&stmt, &[&id]).await.map_err(db)?;
        row.as_ref().map(payment_from_row).transpose()
    }

    async fn set_final_status_inner(&self, change: &StatusChange) -> Result<bool, SettleError> {
        no_nul(
            &change.payment_id,
            [change.payment_id.as_str(), change.status.as_str()],
        )?;
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let stmt = tx
            .prepare_cached(
                "UPDATE payments SET status = $2, held_minor = 0, updated_at_ms = $3 \
                 WHERE id = $1 AND status = 'pending'",
            )
            .await
            .map_err(db)?;
        let updated = tx
            .execute(
                &stmt,
                &[
                    &change.payment_id,
                    &change.status.as_str(),
                    &ms(change.updated_at_ms),
                ],
            )
            .await
            .map_err(db)?;
        if updated == 1 {
            // The merchant's webhook, in the same transaction as the status (webhooks).
            let stored = self.stored_payment(&tx, &change.payment_id).await?;
            if let Some(p) = stored.as_ref() {
                if self.no_webhook.keeps_history(&p.merchant_id) {
                    record_event(&tx, &p.id, change.status.as_str(), change.updated_at_ms)
                        .await
                        .map_err(db)?;
                }
            }
            let event = stored
                .filter(|p| !self.no_webhook.derives_events_of(p))
                .and_then(|p| events::for_final_status(&p, telemetry::now_ms()));
            insert_webhooks(&tx, event.as_slice(), &self.no_webhook)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(updated == 1)
    }

    /// The payment row as stored now, inside `tx`.
    pub(super) async fn stored_payment(
        &self,
        tx: &Transaction<'_>,
        id: &str,
    ) -> Result<Option<PaymentRow>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1"
            ))
            .await
            .map_err(db)?;
        let row = tx.query_opt(&stmt, &[&id]).await.map_err(db)?;
        row.as_ref().map(payment_from_row).transpose()
    }
}

#[async_trait]
impl PaymentStore for PostgresStore {
    async fn record_intent(
        &self,
        payment: &PaymentRow,
        first_attempt: Option<&AttemptRow>,
    ) -> Result<IntentOutcome, SettleError> {
        Self::timed(
            StoreOp::Write("record_intent"),
            self.record_intent_inner(payment, first_attempt),
        )
        .await
    }

    async fn record_attempt(&self, attempt: &AttemptRow) -> Result<(), SettleError> {
        Self::timed(
            StoreOp::Write("record_attempt"),
            self.record_attempt_inner(attempt),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn update_attempt(
        &self,
        payment_id: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        latency_ms: Option<u64>,
        action: Option<&str>,
        channel_txn_id: Option<&str>,
        now_ms: u64,
    ) -> Result<bool, SettleError> {
        Self::timed(StoreOp::Write("update_attempt"), async {
            // No such attempt can exist past the column's range.
            let Ok(number) = i32::try_from(attempt) else {
                return Ok(false);
            };
            no_nul(
                payment_id,
                [
                    payment_id,
                    action.unwrap_or(""),
                    channel_txn_id.unwrap_or(""),
                ],
            )?;
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            let stmt = client.prepare_cached(UPDATE_ATTEMPT).await.map_err(db)?;
            let updated = client
                .execute(
                    &stmt,
                    &[
                        &payment_id,
                        &number,
                        &outcome.as_str(),
                        &latency_ms.map(ms),
                        &action,
                        &channel_txn_id,
                        &ms(now_ms),
                    ],
                )
                .await
                .map_err(db)?;
            Ok(updated == 1)
        })
        .await
    }

    async fn attempts(&self, payment_id: &str) -> Result<Vec<AttemptRow>, SettleError> {
        Self::timed(StoreOp::Read("attempts"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE payment_id = $1 \
                     ORDER BY attempt"
                ))
                .await
                .map_err(db)?;
            let rows = client.query(&stmt, &[&payment_id]).await.map_err(db)?;
            rows.iter().map(attempt_from_row).collect()
        })
        .await
    }

    async fn attempt_by_channel_order(
        &self,
        channel_order_id: &str,
    ) -> Result<Option<AttemptRow>, SettleError> {
        Self::timed(StoreOp::Read("attempt_by_channel_order"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE channel_order_id = $1"
                ))
                .await
                .map_err(db)?;
            let row = client
                .query_opt(&stmt, &[&channel_order_id])
                .await
                .map_err(db)?;
            row.as_ref().map(attempt_from_row).transpose()
        })
        .await
    }

    async fn payment(&self, id: &str) -> Result<Option<PaymentRow>, SettleError> {
        Self::timed(StoreOp::Read("payment"), self.payment_inner(id)).await
    }

    async fn set_final_status(&self, change: &StatusChange) -> Result<bool, SettleError> {
        Self::timed(
            StoreOp::Write("set_final_status"),
            self.set_final_status_inner(change),
        )
        .await
    }

    async fn payment_events(&self, id: &str) -> Result<Vec<(String, u64)>, SettleError> {
        Self::timed(StoreOp::Read("payment_events"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT status, at_ms FROM payment_events WHERE payment_id = $1 \
                     ORDER BY at_ms, status COLLATE \"C\"",
                )
                .await
                .map_err(db)?;
            let rows = client.query(&stmt, &[&id]).await.map_err(db)?;
            rows.iter()
                .map(|r| Ok((get(r, 0)?, get_u64(r, 1)?)))
                .collect()
        })
        .await
    }
}
