//! The PostgreSQL backend: the production settlement store, shared by several gateway
//! instances. It owns the connection pool (deadpool-postgres, no TLS, bounded size, connect and
//! wait timeouts), the embedded migrations applied under an advisory lock (so concurrent
//! `gateway migrate` runs serialize), and the SQL of every
//! [`SettlementStore`](super::SettlementStore) call with the same semantics as the SQLite
//! backend (`sqlite.rs`, the reference).
//!
//! Durability comes from the server: `synchronous_commit=on` (the default) fsyncs every commit,
//! and a batch of settlements is one transaction, so group commit keeps the fsyncs per payment
//! low instead of weakening them.
//!
//! Differences the column types force (everything else behaves as on SQLite):
//! - `sequence` and `line` are `INTEGER` (i32 here): a settlement whose sequence or number of
//!   postings does not fit is refused as [`SettleError::Invalid`] before anything is written;
//!   so is an attempt whose number, or a payment whose `checks`, does not fit;
//! - PostgreSQL text cannot hold a NUL character: a settlement, payment or account with one in
//!   any text field is refused as [`SettleError::Invalid`] (rather than failing the whole batch
//!   as "unavailable" over and over);
//! - ordered results sort by bytes (`COLLATE "C"`), like SQLite, whatever the database's
//!   collation.
//!
//! Errors never carry the connection URL or its password.

use std::str::FromStr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres::{self, NoTls, Row};
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Transaction,
};
use futures_util::future::join_all;
use tokio_postgres::types::FromSql;

use super::{
    AccountBalance, AccountRow, AttemptOutcome, AttemptRow, AttemptUpdate, CheckStore,
    CommitOutcome, FlagStore, Flagged, IntentOutcome, KeyHolder, KeyStore, MoneyStore, PaymentRow,
    PaymentStore, RefundRecorded, RefundRow, RefundStatusChange, RefundStore, RefusalRow,
    SchemaStore, SettleError, Settlement, SettlementKind, StatusChange, StoredKey, Taken,
    WebhookAttempt, WebhookStore, Write, WriteStore, Written, MIGRATIONS, SCHEMA_VERSION,
};
use crate::money::Currency;
use crate::telemetry::{self, StoreOp};

/// The advisory lock every migrator takes inside its transaction ("gateway1" in ASCII).
const MIGRATION_LOCK: i64 = 0x6761_7465_7761_7931;

/// How often `record_intent` retries when a conflicting payment vanished between its insert
/// and the look-up that explains the conflict (another instance changed it meanwhile).
const INTENT_ATTEMPTS: usize = 3;

const LIVE_STATUSES: &str = "('pending', 'succeeded', 'partially_refunded', 'refunded')";

const PAYMENT_COLUMNS: &str = "id, merchant_id, account_id, scope_tag, merchant_order_id, \
    amount_minor, currency, method, purpose, status, held_minor, hold_expires_at_ms, \
    created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, checks, \
    idempotency_key, request_hash";

/// Inserts a payment unless its id, its idempotency key or its live scoped order id is taken,
/// with its first event,
/// in one statement (one round trip); the row count says whether it was inserted.
const INSERT_PAYMENT: &str = "WITH ins AS (INSERT INTO payments (id, merchant_id, account_id, \
    scope_tag, merchant_order_id, amount_minor, currency, method, purpose, status, held_minor, \
    hold_expires_at_ms, created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, \
    checks, idempotency_key, request_hash) VALUES \
    ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
    ON CONFLICT DO NOTHING RETURNING id, status, updated_at_ms), \
    ev AS (INSERT INTO payment_events (payment_id, status, at_ms) \
    SELECT id, status, updated_at_ms FROM ins ON CONFLICT DO NOTHING) \
    SELECT id FROM ins";

/// A settlement's payment in one statement (one round trip): inserted whole, or, when it
/// exists, its status (never moving a refunded payment back: two refunds' commits may arrive
/// in either order, the later status wins only if it is further along), hold and
/// `updated_at_ms`; with the event of its status either way. Its one row says what was done.
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
    SELECT id, $10, $15 FROM ins UNION ALL SELECT id, $10, $15 FROM upd \
    ON CONFLICT DO NOTHING) \
    SELECT (SELECT COUNT(*) FROM ins) + (SELECT COUNT(*) FROM upd)";

const ATTEMPT_COLUMNS: &str = "payment_id, attempt, channel_id, channel_order_id, outcome, \
    latency_ms, action, channel_txn_id, created_at_ms, updated_at_ms";

const INSERT_ATTEMPT: &str = "INSERT INTO attempts (payment_id, attempt, channel_id, \
    channel_order_id, outcome, latency_ms, action, channel_txn_id, created_at_ms, \
    updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING";

/// An attempt's outcome; given values replace stored ones, and a succeeded attempt keeps its
/// outcome (see `PaymentStore::update_attempt`).
const UPDATE_ATTEMPT: &str = "UPDATE attempts SET outcome = $3, \
    latency_ms = COALESCE($4, latency_ms), action = COALESCE($5, action), \
    channel_txn_id = COALESCE($6, channel_txn_id), updated_at_ms = $7 \
    WHERE payment_id = $1 AND attempt = $2 AND outcome <> 'succeeded'";

const STORED_ATTEMPT_ORDER: &str =
    "SELECT channel_order_id FROM attempts WHERE payment_id = $1 AND attempt = $2";

const INSERT_EVENT: &str = "INSERT INTO payment_events (payment_id, status, at_ms) \
    VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

const INSERT_SETTLEMENT: &str = "INSERT INTO settlements (payment_id, kind, sequence, \
    merchant_id, account_id, channel_id, channel_txn_id, amount_minor, currency, \
    channel_fee_minor, commission_minor, merchant_net_minor, account_seq, settled_at_ms, \
    content_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
    ON CONFLICT DO NOTHING";

/// A settlement that creates its payment (`Settlement::creates_payment`), in one statement:
/// the payment row (with its first event) is inserted unless its id, idempotency key or live
/// order id is taken, and the settlement only if the row was: the store never holds such a
/// movement without its payment. Its one row counts what was inserted: (payments, settlements).
/// Parameters: the payment's 20 (as `INSERT_PAYMENT`), then the settlement's 15 (as
/// `INSERT_SETTLEMENT`).
const INSERT_CREATING_SETTLEMENT: &str = "WITH pay AS (INSERT INTO payments (id, merchant_id, \
    account_id, scope_tag, merchant_order_id, amount_minor, currency, method, purpose, status, \
    held_minor, hold_expires_at_ms, created_at_ms, expires_at_ms, updated_at_ms, doc, \
    next_check_at_ms, checks, idempotency_key, request_hash) VALUES \
    ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
    ON CONFLICT DO NOTHING RETURNING id, status, updated_at_ms), \
    ev AS (INSERT INTO payment_events (payment_id, status, at_ms) \
    SELECT id, status, updated_at_ms FROM pay ON CONFLICT DO NOTHING), \
    st AS (INSERT INTO settlements (payment_id, kind, sequence, merchant_id, account_id, \
    channel_id, channel_txn_id, amount_minor, currency, channel_fee_minor, commission_minor, \
    merchant_net_minor, account_seq, settled_at_ms, content_hash) \
    SELECT $21::TEXT, $22::TEXT, $23::INTEGER, $24::TEXT, $25::TEXT, $26::TEXT, $27::TEXT, \
    $28::BIGINT, $29::TEXT, $30::BIGINT, $31::BIGINT, $32::BIGINT, $33::BIGINT, $34::BIGINT, \
    $35::TEXT WHERE EXISTS (SELECT 1 FROM pay) ON CONFLICT DO NOTHING RETURNING 1) \
    SELECT (SELECT COUNT(*) FROM pay), (SELECT COUNT(*) FROM st)";

const STORED_HASH: &str = "SELECT content_hash FROM settlements \
    WHERE payment_id = $1 AND kind = $2 AND sequence = $3";

/// All postings of one batch in one statement (one round trip instead of one per line).
const INSERT_POSTINGS: &str = "INSERT INTO postings (payment_id, kind, sequence, line, ledger, \
    amount_minor, currency) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::INTEGER[], \
    $4::INTEGER[], $5::TEXT[], $6::BIGINT[], $7::TEXT[])";

const INSERT_FLAG: &str = "INSERT INTO flagged (kind, payment_id, detail, created_at_ms) \
    VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

/// The server-side bound on one statement and on waiting for a lock (ms).
pub const STATEMENT_TIMEOUT_MS: u64 = 30_000;

pub struct PostgresStore {
    pool: Pool,
    /// `host:port/db`, without user or password: for `Debug` and logs.
    target: String,
    /// Strings that must never appear in an error (the URL, the password).
    secrets: Vec<String>,
    no_webhook: NoWebhook,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish()
    }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An error and its causes on one line (tokio-postgres puts the server's message in the cause).
fn describe(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    msg.replace('\n', "; ")
}

fn scrub(mut msg: String, secrets: &[String]) -> String {
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if msg.contains(secret.as_str()) {
            msg = msg.replace(secret.as_str(), "[redacted]");
        }
    }
    msg
}

fn bad_row(what: impl std::fmt::Display) -> SettleError {
    SettleError::Unavailable(format!("unreadable row in the settlement store: {what}"))
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, SettleError> {
    row.try_get(idx).map_err(|e| bad_row(describe(&e)))
}

fn get_u64(row: &Row, idx: usize) -> Result<u64, SettleError> {
    let v: i64 = get(row, idx)?;
    u64::try_from(v).map_err(|_| bad_row(format!("negative value {v} in column {idx}")))
}

fn get_u32(row: &Row, idx: usize) -> Result<u32, SettleError> {
    let v: i32 = get(row, idx)?;
    u32::try_from(v).map_err(|_| bad_row(format!("negative value {v} in column {idx}")))
}

const REFUND_COLUMNS: &str = "refund_id, payment_id, number, amount_minor, currency, status, \
    channel_id, channel_order_id, reason, created_at_ms, updated_at_ms, idempotency_key";

fn refund_from_row(r: &Row) -> Result<RefundRow, SettleError> {
    Ok(RefundRow {
        refund_id: get(r, 0)?,
        payment_id: get(r, 1)?,
        number: get_u32(r, 2)?,
        amount_minor: get(r, 3)?,
        currency: get_currency(r, 4)?,
        status: get(r, 5)?,
        channel_id: get(r, 6)?,
        channel_order_id: get(r, 7)?,
        reason: get(r, 8)?,
        created_at_ms: get_u64(r, 9)?,
        updated_at_ms: get_u64(r, 10)?,
        idempotency_key: get(r, 11)?,
    })
}

fn get_currency(row: &Row, idx: usize) -> Result<Currency, SettleError> {
    let code: String = get(row, idx)?;
    Currency::parse(&code).map_err(|e| bad_row(format!("currency {code:?}: {e}")))
}

fn payment_from_row(r: &Row) -> Result<PaymentRow, SettleError> {
    Ok(PaymentRow {
        id: get(r, 0)?,
        merchant_id: get(r, 1)?,
        account_id: get(r, 2)?,
        scope_tag: get(r, 3)?,
        merchant_order_id: get(r, 4)?,
        amount_minor: get(r, 5)?,
        currency: get_currency(r, 6)?,
        method: get(r, 7)?,
        purpose: get(r, 8)?,
        status: get(r, 9)?,
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

fn invalid(id: &str, what: &str) -> SettleError {
    SettleError::Invalid(format!("{id}: {what}"))
}

/// PostgreSQL text cannot contain NUL: refuse it up front, as bad input.
fn no_nul<'a>(id: &str, fields: impl IntoIterator<Item = &'a str>) -> Result<(), SettleError> {
    if fields.into_iter().any(|f| f.contains('\0')) {
        return Err(invalid(id, "text fields cannot contain NUL characters"));
    }
    Ok(())
}

fn check_payment_text(p: &PaymentRow) -> Result<(), SettleError> {
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
fn checks_i32(p: &PaymentRow) -> Result<i32, SettleError> {
    i32::try_from(p.checks).map_err(|_| invalid(&p.id, "checks exceed the store's INTEGER range"))
}

/// What PostgreSQL's column types need of an attempt: its number is an `INTEGER`, its text
/// holds no NUL.
fn check_attempt_for_postgres(a: &AttemptRow) -> Result<i32, SettleError> {
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

/// What PostgreSQL's column types need beyond [`Settlement::check`].
fn check_for_postgres(s: &Settlement) -> Result<i32, SettleError> {
    let sequence = i32::try_from(s.sequence)
        .map_err(|_| invalid(&s.payment_id, "sequence exceeds the store's INTEGER range"))?;
    if i32::try_from(s.postings.len()).is_err() {
        return Err(invalid(&s.payment_id, "too many postings"));
    }
    no_nul(
        &s.payment_id,
        [
            s.payment_id.as_str(),
            s.merchant_id.as_str(),
            s.account_id.as_deref().unwrap_or(""),
            s.channel_id.as_deref().unwrap_or(""),
            s.channel_txn_id.as_deref().unwrap_or(""),
        ]
        .into_iter()
        .chain(s.postings.iter().map(|p| p.ledger.as_str())),
    )?;
    if let Some(p) = &s.payment {
        check_payment_text(p)?;
        checks_i32(p)?;
    }
    Ok(sequence)
}

/// The checks of one write that only PostgreSQL needs (NUL bytes, column ranges).
fn check_write_for_postgres(w: &Write) -> Result<(), SettleError> {
    match w {
        Write::Intent {
            payment,
            first_attempt,
        } => {
            check_payment_text(payment)?;
            checks_i32(payment)?;
            if let Some(a) = first_attempt {
                check_attempt_for_postgres(a)?;
            }
            Ok(())
        }
        Write::Attempt(u) => no_nul(
            &u.payment_id,
            [
                u.payment_id.as_str(),
                u.outcome.as_str(),
                u.action.as_deref().unwrap_or(""),
                u.channel_txn_id.as_deref().unwrap_or(""),
            ],
        ),
        Write::Settlement(s) => check_for_postgres(s).map(|_| ()),
        // No such event can have a NUL in its id (it is then simply not found);
        // `webhook_error_text` drops them from the error.
        Write::Webhook(_) => Ok(()),
        Write::Refusal(r) => no_nul(
            &r.idempotency_key,
            [
                r.scope_tag.as_str(),
                r.idempotency_key.as_str(),
                r.request_hash.as_str(),
                r.outcome.as_str(),
            ],
        ),
    }
}

/// The postings of a batch's inserted settlements, as the columns `INSERT_POSTINGS` unnests.
#[derive(Default)]
struct PostingColumns<'a> {
    payment_id: Vec<&'a str>,
    kind: Vec<&'static str>,
    sequence: Vec<i32>,
    line: Vec<i32>,
    ledger: Vec<&'a str>,
    amount_minor: Vec<i64>,
    currency: Vec<&'static str>,
}

impl<'a> PostingColumns<'a> {
    fn push(&mut self, s: &'a Settlement, sequence: i32) {
        for (line, p) in (0i32..).zip(&s.postings) {
            self.payment_id.push(&s.payment_id);
            self.kind.push(s.kind.as_str());
            self.sequence.push(sequence);
            self.line.push(line);
            self.ledger.push(&p.ledger);
            self.amount_minor.push(p.amount_minor);
            self.currency.push(s.currency.code());
        }
    }
}

/// Runs `sql` (`INSERT_PAYMENT` or `WRITE_PAYMENT`) for `p`: its row, if any. `checks` must
/// fit (see [`checks_i32`]); it saturates otherwise.
async fn payment_statement(
    tx: &Transaction<'_>,
    sql: &str,
    p: &PaymentRow,
) -> Result<Option<Row>, tokio_postgres::Error> {
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
            &p.method,
            &p.purpose,
            &p.status,
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
        ],
    )
    .await
}

/// Runs `INSERT_SETTLEMENT` (prepared as `insert`) for `s`, numbered `sequence`, hashed
/// `hash`: the rows inserted (0 when its key or its account sequence is taken).
async fn insert_settlement(
    tx: &Transaction<'_>,
    insert: &tokio_postgres::Statement,
    s: &Settlement,
    sequence: i32,
    hash: &str,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        insert,
        &[
            &s.payment_id,
            &s.kind.as_str(),
            &sequence,
            &s.merchant_id,
            &s.account_id,
            &s.channel_id,
            &s.channel_txn_id,
            &s.amount_minor,
            &s.currency.code(),
            &s.channel_fee_minor,
            &s.commission_minor,
            &s.merchant_net_minor,
            &s.account_seq.map(ms),
            &ms(s.settled_at_ms),
            &hash,
        ],
    )
    .await
}

/// Runs `INSERT_CREATING_SETTLEMENT` for `s` (whose payment is `p`, numbered `sequence`,
/// hashed `hash`): (whether the payment was inserted, whether the settlement was).
async fn insert_creating_settlement(
    tx: &Transaction<'_>,
    p: &PaymentRow,
    s: &Settlement,
    sequence: i32,
    hash: &str,
) -> Result<(bool, bool), tokio_postgres::Error> {
    let checks = i32::try_from(p.checks).unwrap_or(i32::MAX);
    let stmt = tx.prepare_cached(INSERT_CREATING_SETTLEMENT).await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &p.id,
                &p.merchant_id,
                &p.account_id,
                &p.scope_tag,
                &p.merchant_order_id,
                &p.amount_minor,
                &p.currency.code(),
                &p.method,
                &p.purpose,
                &p.status,
                &p.held_minor,
                &p.hold_expires_at_ms.map(ms),
                &ms(p.created_at_ms),
                &ms(p.expires_at_ms),
                &ms(p.updated_at_ms),
                &p.doc,
                &p.next_check_at_ms.map(ms),
                &checks,
                &p.idempotency_key,
                &p.request_hash,
                &s.payment_id,
                &s.kind.as_str(),
                &sequence,
                &s.merchant_id,
                &s.account_id,
                &s.channel_id,
                &s.channel_txn_id,
                &s.amount_minor,
                &s.currency.code(),
                &s.channel_fee_minor,
                &s.commission_minor,
                &s.merchant_net_minor,
                &s.account_seq.map(ms),
                &ms(s.settled_at_ms),
                &hash,
            ],
        )
        .await?;
    let (payments, settlements): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    Ok((payments == 1, settlements == 1))
}

/// Inserts a payment (with its first event) unless its id, its idempotency key or its live
/// scoped order id is taken; `true` if inserted.
async fn insert_payment(
    tx: &Transaction<'_>,
    p: &PaymentRow,
) -> Result<bool, tokio_postgres::Error> {
    Ok(payment_statement(tx, INSERT_PAYMENT, p).await?.is_some())
}

/// Records that a payment reached `status` (once per status).
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
/// order id (as `write_payment` in sqlite.rs).
async fn write_payment(
    tx: &Transaction<'_>,
    p: &PaymentRow,
) -> Result<bool, tokio_postgres::Error> {
    let row = payment_statement(tx, WRITE_PAYMENT, p).await?;
    let written: i64 = row.map_or(Ok(0), |r| r.try_get(0))?;
    Ok(written == 1)
}

async fn flag(
    tx: &Transaction<'_>,
    kind: &str,
    payment_id: &str,
    detail: &str,
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx.prepare_cached(INSERT_FLAG).await?;
    tx.execute(
        &stmt,
        &[&kind, &payment_id, &detail, &ms(telemetry::now_ms())],
    )
    .await?;
    Ok(())
}

impl PostgresStore {
    /// Builds the pool (`pool_size` connections at most; connecting, waiting for a free
    /// connection and recycling one each bounded by `connect_timeout_ms`) and checks that the
    /// server answers. A URL that does not parse is `Misconfigured`; a server that cannot be
    /// reached is `Unavailable`. Neither error contains the URL or its password. Statements
    /// are bounded by [`STATEMENT_TIMEOUT_MS`] unless the URL sets its own `options`.
    pub async fn connect(
        url: &str,
        pool_size: usize,
        connect_timeout_ms: u64,
    ) -> Result<Self, SettleError> {
        let mut secrets = vec![url.to_owned()];
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
            SettleError::Misconfigured(format!(
                "invalid PostgreSQL URL: {}",
                scrub(describe(&e), &secrets)
            ))
        })?;
        if let Some(password) = config.get_password() {
            secrets.push(String::from_utf8_lossy(password).into_owned());
        }
        if config.get_hosts().is_empty() {
            return Err(SettleError::Misconfigured(
                "the PostgreSQL URL names no host".into(),
            ));
        }
        if pool_size == 0 {
            return Err(SettleError::Misconfigured(
                "the PostgreSQL pool size must be at least 1".into(),
            ));
        }
        if connect_timeout_ms == 0 {
            return Err(SettleError::Misconfigured(
                "the PostgreSQL connect timeout must be at least 1 ms".into(),
            ));
        }
        let timeout = Duration::from_millis(connect_timeout_ms);
        config.connect_timeout(timeout);
        if config.get_application_name().is_none() {
            config.application_name("gateway");
        }
        // Bound every statement: a query stuck behind a lock must fail (and the writer mark
        // the store unhealthy) rather than wait forever. A URL with its own `options` wins.
        if config.get_options().is_none() {
            config.options(format!(
                "-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={STATEMENT_TIMEOUT_MS}"
            ));
        }
        let target = target_of(&config);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(timeout))
            .wait_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| SettleError::Misconfigured(scrub(describe(&e), &secrets)))?;
        let store = Self {
            pool,
            target,
            secrets,
            no_webhook: NoWebhook::default(),
        };
        store.ping().await?;
        tracing::info!(server = %store.target, pool_size, "connected to PostgreSQL");
        Ok(store)
    }

    /// Events of these merchants with nowhere to go are stored `skipped` ([`NoWebhook`]).
    pub fn with_no_webhook(mut self, no_webhook: NoWebhook) -> Self {
        self.no_webhook = no_webhook;
        self
    }

    fn unavailable(&self, e: &dyn std::error::Error) -> SettleError {
        SettleError::Unavailable(scrub(describe(e), &self.secrets))
    }

    async fn client(&self) -> Result<Object, SettleError> {
        self.pool.get().await.map_err(|e| self.unavailable(&e))
    }

    /// Inserts an attempt unless the very same one is stored; `Invalid` when it clashes with
    /// a stored attempt (as `insert_attempt` in sqlite.rs). `number` is `a.attempt` as
    /// checked by [`check_attempt_for_postgres`].
    async fn insert_attempt(
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

    async fn timed<T>(
        op: StoreOp,
        call: impl std::future::Future<Output = Result<T, SettleError>>,
    ) -> Result<T, SettleError> {
        let started = Instant::now();
        let result = call.await;
        telemetry::store_call("postgres", op, started.elapsed());
        result
    }

    /// The highest applied migration (0 when none), read inside a migrator's transaction.
    async fn applied_version(&self, tx: &Transaction<'_>) -> Result<u32, SettleError> {
        let row = tx
            .query_one("SELECT MAX(version) FROM schema_migrations", &[])
            .await
            .map_err(|e| self.unavailable(&e))?;
        match get::<Option<i32>>(&row, 0)? {
            None => Ok(0),
            Some(v) => u32::try_from(v).map_err(|_| bad_row(format!("schema version {v}"))),
        }
    }

    async fn migrate_inner(&self) -> Result<u32, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let mut client = self.client().await?;
        // Under the lock: two concurrent `CREATE TABLE IF NOT EXISTS` can collide in the catalog.
        let tx = client.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (\
             version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        // One transaction per migration; each re-reads the version under the lock, so a
        // migration another instance applied meanwhile is not applied twice.
        loop {
            let tx = client.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(db)?;
            let current = self.applied_version(&tx).await?;
            if current > SCHEMA_VERSION {
                return Err(SettleError::WrongSchema {
                    found: current,
                    expected: SCHEMA_VERSION,
                });
            }
            let Some((version, sql)) = MIGRATIONS.iter().find(|(v, _)| *v > current) else {
                tx.commit().await.map_err(db)?;
                return Ok(SCHEMA_VERSION);
            };
            let version_i32 = i32::try_from(*version).map_err(|_| {
                SettleError::Misconfigured(format!("migration {version} out of range"))
            })?;
            tx.batch_execute(sql).await.map_err(db)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
                &[&version_i32, &ms(telemetry::now_ms())],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            tracing::info!(version, "applied migration");
        }
    }

    async fn schema_version_inner(&self) -> Result<Option<u32>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let row = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(db)?;
        let exists: bool = get(&row, 0)?;
        if !exists {
            return Ok(None);
        }
        let row = client
            .query_one("SELECT MAX(version) FROM schema_migrations", &[])
            .await
            .map_err(db)?;
        match get::<Option<i32>>(&row, 0)? {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| bad_row(format!("schema version {v}"))),
        }
    }

    async fn upsert_account_inner(&self, row: &AccountRow) -> Result<(), SettleError> {
        no_nul(
            &row.account_id,
            [row.merchant_id.as_str(), row.account_id.as_str()],
        )?;
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO accounts (merchant_id, account_id, currency, credit_limit_minor, \
                 created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (merchant_id, account_id) DO UPDATE SET \
                 credit_limit_minor = excluded.credit_limit_minor, \
                 updated_at_ms = excluded.updated_at_ms",
            )
            .await
            .map_err(db)?;
        client
            .execute(
                &stmt,
                &[
                    &row.merchant_id,
                    &row.account_id,
                    &row.currency.code(),
                    &row.credit_limit_minor,
                    &ms(row.created_at_ms),
                    &ms(row.updated_at_ms),
                ],
            )
            .await
            .map_err(db)?;
        Ok(())
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
    async fn intent_in(
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
            if insert_payment(tx, p).await.map_err(db)? {
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

    /// Records a refusal inside `tx` (a key already there keeps its first answer).
    async fn refusal_in(&self, tx: &Transaction<'_>, r: &RefusalRow) -> Result<bool, SettleError> {
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
    /// under its scoped order id (as `arbitrate` in sqlite.rs). `None` when neither is there
    /// any more (the holder changed meanwhile: the caller tries again).
    async fn arbitrate(
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
                };
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

    /// Applies an attempt's outcome inside `tx`; a `succeeded` attempt keeps its outcome.
    async fn update_attempt_in(
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

    /// Records a webhook delivery attempt of a pending event (on a client or inside a
    /// transaction).
    async fn webhook_attempt_in(
        &self,
        client: &impl GenericClient,
        a: &WebhookAttempt,
    ) -> Result<bool, SettleError> {
        if a.id.contains('\0') {
            return Ok(false);
        }
        let error = webhook_error_text(a.error.as_deref());
        let (status, attempted, next) = a.outcome.transition();
        let attempted = i32::try_from(attempted).unwrap_or(i32::MAX);
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let stmt = client
            .prepare_cached(
                "UPDATE webhook_events SET status = $2, attempts = attempts + $3, \
                 next_attempt_at_ms = $4, last_status = COALESCE($5, last_status), \
                 last_error = COALESCE($6, last_error), updated_at_ms = $7 \
                 WHERE id = $1 AND status = 'pending'",
            )
            .await
            .map_err(db)?;
        let updated = client
            .execute(
                &stmt,
                &[
                    &a.id,
                    &status.as_str(),
                    &attempted,
                    &next.map(ms),
                    &a.http_status.map(i32::from),
                    &error,
                    &ms(a.now_ms),
                ],
            )
            .await
            .map_err(db)?;
        Ok(updated == 1)
    }

    /// One transaction for a group of writes. Statements of independent writes are sent
    /// without waiting for each other's answers (tokio-postgres pipelines the futures polled
    /// together), so a batch costs a handful of round trips, not a few per row. An intent
    /// whose attempt clashes is refused alone: the transaction is rolled back and run again
    /// without it.
    async fn commit_writes_inner(
        &self,
        batch: &[Write],
    ) -> Result<Vec<Result<Written, SettleError>>, SettleError> {
        let mut refused: Vec<Option<SettleError>> = batch
            .iter()
            .map(|w| w.check().and_then(|()| check_write_for_postgres(w)).err())
            .collect();
        // Each round refuses at least one more intent, or ends.
        for _ in 0..=batch.len() {
            match self.try_commit_writes(batch, &refused).await? {
                Ok(results) => return Ok(results),
                Err((index, err)) => {
                    debug_assert!(refused[index].is_none());
                    refused[index] = Some(err);
                }
            }
        }
        Err(SettleError::Invalid(
            "a batch kept refusing its writes".to_owned(),
        ))
    }

    /// One try of [`Self::commit_writes_inner`]: `Ok(Err((index, error)))` when the intent at
    /// `index` was refused after writing (nothing committed).
    #[allow(clippy::type_complexity)]
    async fn try_commit_writes(
        &self,
        batch: &[Write],
        refused: &[Option<SettleError>],
    ) -> Result<Result<Vec<Result<Written, SettleError>>, (usize, SettleError)>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let mut results: Vec<Option<Result<Written, SettleError>>> =
            refused.iter().map(|r| r.clone().map(Err)).collect();

        // Writes of different kinds never concern the same row in one batch (a payment's next
        // write is submitted after its previous one committed; an attempt's success and its
        // settlement touch different tables), so all four kinds go out together: one round
        // trip for the lot instead of one per kind. Within a kind, the order given holds.
        let mut intents: Vec<(usize, &PaymentRow, Option<&AttemptRow>)> = Vec::new();
        let mut updates: Vec<(usize, &AttemptUpdate)> = Vec::new();
        let mut settlements: Vec<(usize, &Settlement)> = Vec::new();
        let mut hooks: Vec<(usize, &WebhookAttempt)> = Vec::new();
        let mut refusals: Vec<(usize, &RefusalRow)> = Vec::new();
        for (i, write) in batch.iter().enumerate() {
            if results[i].is_some() {
                continue; // refused before the transaction
            }
            match write {
                Write::Intent {
                    payment,
                    first_attempt,
                } => intents.push((i, payment, first_attempt.as_ref())),
                Write::Attempt(u) => updates.push((i, u)),
                Write::Settlement(s) => settlements.push((i, s)),
                Write::Webhook(a) => hooks.push((i, a)),
                Write::Refusal(r) => refusals.push((i, r)),
            }
        }
        // Rows locked in one order by every transaction (by key, stable: one key's writes keep
        // the order given), so that batches committing at once (`store.commits_in_flight`)
        // wait for each other instead of deadlocking.
        intents.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        updates.sort_by(|a, b| (&a.1.payment_id, a.1.attempt).cmp(&(&b.1.payment_id, b.1.attempt)));
        settlements.sort_by(|a, b| a.1.payment_id.cmp(&b.1.payment_id));
        hooks.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        refusals.sort_by(|a, b| {
            (&a.1.scope_tag, &a.1.idempotency_key).cmp(&(&b.1.scope_tag, &b.1.idempotency_key))
        });
        let rows: Vec<&Settlement> = settlements.iter().map(|(_, s)| *s).collect();
        let (intended, updated, settled, recorded, refused) = tokio::join!(
            join_all(intents.iter().map(|(_, p, a)| self.intent_in(&tx, p, *a))),
            join_all(updates.iter().map(|(_, u)| self.update_attempt_in(&tx, u))),
            self.settle_in(&tx, &rows),
            join_all(hooks.iter().map(|(_, a)| self.webhook_attempt_in(&tx, a))),
            join_all(refusals.iter().map(|(_, r)| self.refusal_in(&tx, r))),
        );
        for ((index, _, _), outcome) in intents.iter().zip(intended) {
            match outcome {
                Ok(outcome) => results[*index] = Some(Ok(Written::Intent(outcome))),
                Err(e @ SettleError::Invalid(_)) => return Ok(Err((*index, e))),
                Err(e) => return Err(e),
            }
        }
        for ((index, _), updated) in updates.iter().zip(updated) {
            results[*index] = Some(Ok(Written::Attempt(updated?)));
        }
        for ((index, _), outcome) in settlements.iter().zip(settled?) {
            results[*index] = Some(Ok(Written::Settlement(outcome)));
        }
        for ((index, _), recorded) in hooks.iter().zip(recorded) {
            results[*index] = Some(Ok(Written::Webhook(recorded?)));
        }
        for ((index, _), inserted) in refusals.iter().zip(refused) {
            results[*index] = Some(Ok(Written::Refusal(inserted?)));
        }

        tx.commit().await.map_err(db)?;
        Ok(Ok(results
            .into_iter()
            .map(|r| r.expect("every write has its result"))
            .collect()))
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

    async fn commit_inner(&self, batch: &[Settlement]) -> Result<Vec<CommitOutcome>, SettleError> {
        for s in batch {
            s.check()?;
            check_for_postgres(s)?;
        }
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let rows: Vec<&Settlement> = batch.iter().collect();
        let outcomes = self.settle_in(&tx, &rows).await?;
        tx.commit().await.map_err(db)?;
        Ok(outcomes)
    }

    /// Inserts settlements inside `tx` (checked by the caller): every settlement row in one
    /// pipelined burst, then the inserted ones' payments, refund statuses and webhooks in
    /// another, then all postings and webhooks with one statement each. The rare conflicts
    /// are explained one by one.
    async fn settle_in(
        &self,
        tx: &Transaction<'_>,
        batch: &[&Settlement],
    ) -> Result<Vec<CommitOutcome>, SettleError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let sequences = batch
            .iter()
            .map(|s| check_for_postgres(s))
            .collect::<Result<Vec<i32>, _>>()?;
        let hashes: Vec<String> = batch.iter().map(|s| s.content_hash()).collect();
        let insert = tx.prepare_cached(INSERT_SETTLEMENT).await.map_err(db)?;
        // (payment row inserted, settlement inserted) per settlement: a settlement that creates
        // its payment goes in with its row or not at all (`INSERT_CREATING_SETTLEMENT`).
        let inserted = join_all(batch.iter().zip(&sequences).zip(&hashes).map(
            |((s, sequence), hash)| {
                let insert = &insert;
                async move {
                    if let (true, Some(p)) = (s.creates_payment(), s.payment.as_ref()) {
                        return insert_creating_settlement(tx, p, s, *sequence, hash).await;
                    }
                    let rows = insert_settlement(tx, insert, s, *sequence, hash).await?;
                    Ok((false, rows == 1))
                }
            },
        ))
        .await;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut rows_written = Vec::with_capacity(batch.len());
        for (((s, &sequence), hash), inserted) in
            batch.iter().zip(&sequences).zip(&hashes).zip(inserted)
        {
            let (paid, settled) = inserted.map_err(db)?;
            if settled {
                outcomes.push(CommitOutcome::Inserted);
                rows_written.push(paid);
                continue;
            }
            if paid {
                // The new payment's row went in but its settlement did not (its key or its
                // account sequence is taken): the row goes too, nothing of it stays.
                self.forget_payment(tx, &s.payment_id).await?;
            }
            let (outcome, written) = self.explain_refused(tx, s, sequence, hash, !paid).await?;
            outcomes.push(outcome);
            rows_written.push(written);
        }

        // What follows an inserted settlement: its postings, its payment, its refund, its
        // webhook, in one more round trip. The webhook of a refund or of late money without a
        // payment row of its own is made from the payment as stored: those rare ones read it
        // in this round trip and are inserted in a third.
        let mut postings = PostingColumns::default();
        let mut followers = Vec::new();
        let mut readers = Vec::new();
        let mut webhooks = Vec::new();
        let now_ms = telemetry::now_ms();
        for (((s, &sequence), outcome), written) in batch
            .iter()
            .zip(&sequences)
            .zip(&outcomes)
            .zip(&rows_written)
        {
            if *outcome == CommitOutcome::Inserted {
                postings.push(s, sequence);
                followers.push(self.after_settlement(tx, s, *written));
                if events::needs_stored_payment(s) {
                    readers.push(self.settlement_webhook(tx, s));
                } else {
                    webhooks.extend(events::for_settlement(s, s.payment.as_ref(), now_ms));
                }
            }
        }
        let postings_insert = async {
            if postings.line.is_empty() {
                return Ok(());
            }
            let stmt = tx.prepare_cached(INSERT_POSTINGS).await?;
            tx.execute(
                &stmt,
                &[
                    &postings.payment_id,
                    &postings.kind,
                    &postings.sequence,
                    &postings.line,
                    &postings.ledger,
                    &postings.amount_minor,
                    &postings.currency,
                ],
            )
            .await
            .map(|_| ())
        };
        // The first poll sends the followers' statements before the readers' (prepared
        // statements are cached after a connection's first batch), as the writes and reads of
        // one follower went before; the order among a batch's own rows is not relied upon.
        let (followed, read, posted, hooked) = tokio::join!(
            join_all(followers),
            join_all(readers),
            postings_insert,
            insert_webhooks(tx, &webhooks, &self.no_webhook)
        );
        for follower in followed {
            follower?;
        }
        posted.map_err(db)?;
        hooked.map_err(db)?;
        let mut late = Vec::new();
        for webhook in read {
            late.extend(webhook?);
        }
        insert_webhooks(tx, &late, &self.no_webhook)
            .await
            .map_err(db)?;
        Ok(outcomes)
    }

    /// Why a settlement was not inserted: the same movement already committed, another one
    /// under its key (flagged), its account sequence taken (flagged), or — for one that creates
    /// its payment (`may_create`: its row was not taken in by `INSERT_CREATING_SETTLEMENT`) —
    /// the payment's key or order id taken. Such a payment whose row exists without its
    /// settlement gets the settlement alone, as any other. The `bool` says whether the
    /// payment's row was written here.
    async fn explain_refused(
        &self,
        tx: &Transaction<'_>,
        s: &Settlement,
        sequence: i32,
        hash: &str,
        may_create: bool,
    ) -> Result<(CommitOutcome, bool), SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let stmt = tx.prepare_cached(STORED_HASH).await.map_err(db)?;
        let row = tx
            .query_opt(&stmt, &[&s.payment_id, &s.kind.as_str(), &sequence])
            .await
            .map_err(db)?;
        if let Some(row) = row {
            let stored: String = get(&row, 0)?;
            if stored == hash {
                return Ok((CommitOutcome::AlreadyCommitted, false));
            }
            let detail = format!(
                "{} #{}: stored {stored}, offered {hash}",
                s.kind, s.sequence
            );
            flag(tx, "settlement_conflict", &s.payment_id, &detail)
                .await
                .map_err(db)?;
            return Ok((
                CommitOutcome::Conflict {
                    stored_hash: stored,
                },
                false,
            ));
        }
        if let (true, true, Some(p)) = (may_create, s.creates_payment(), s.payment.as_ref()) {
            let by_id = tx
                .prepare_cached("SELECT 1 FROM payments WHERE id = $1")
                .await
                .map_err(db)?;
            if tx.query_opt(&by_id, &[&p.id]).await.map_err(db)?.is_none() {
                return match self.arbitrate(tx, p).await? {
                    Some(taken) => Ok((taken.into(), false)),
                    None => Err(SettleError::Unavailable(format!(
                        "{}: the payment's key or order id changed hands meanwhile, try again",
                        p.id
                    ))),
                };
            }
            // Its row is there without its movement: the movement alone, as for any other.
            let insert = tx.prepare_cached(INSERT_SETTLEMENT).await.map_err(db)?;
            let rows = insert_settlement(tx, &insert, s, sequence, hash)
                .await
                .map_err(db)?;
            if rows == 1 {
                return Ok((CommitOutcome::Inserted, false));
            }
        }
        // Not our key: the account's sequence number is taken.
        let account_seq = s.account_seq.unwrap_or(0);
        let detail = format!(
            "account sequence {account_seq} is already used: the balance store rolled back"
        );
        flag(tx, "sequence_conflict", &s.payment_id, &detail)
            .await
            .map_err(db)?;
        Ok((CommitOutcome::SequenceConflict { account_seq }, false))
    }

    /// Flags a refund the store refused (`kind`: `refund_conflict`, `refund_cap`).
    async fn flag_refund(
        &self,
        tx: &Transaction<'_>,
        r: &RefundRow,
        kind: &str,
        why: &str,
    ) -> Result<(), SettleError> {
        let detail = format!(
            "refund {} of {} refused: {why} (the balance store had lost the payment's refunds)",
            r.refund_id, r.amount_minor
        );
        flag(tx, kind, &r.payment_id, &detail)
            .await
            .map_err(|e| self.unavailable(&e))
    }

    /// Deletes a payment row (and its events) this transaction inserted and must not keep.
    async fn forget_payment(&self, tx: &Transaction<'_>, id: &str) -> Result<(), SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let events = tx
            .prepare_cached("DELETE FROM payment_events WHERE payment_id = $1")
            .await
            .map_err(db)?;
        let payments = tx
            .prepare_cached("DELETE FROM payments WHERE id = $1")
            .await
            .map_err(db)?;
        tx.execute(&events, &[&id]).await.map_err(db)?;
        tx.execute(&payments, &[&id]).await.map_err(db)?;
        Ok(())
    }

    /// An inserted settlement's payment row unless `payment_written` (flagged when another
    /// live payment holds its order id) and its refund's status.
    async fn after_settlement(
        &self,
        tx: &Transaction<'_>,
        s: &Settlement,
        payment_written: bool,
    ) -> Result<(), SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        if let (Some(payment), false) = (&s.payment, payment_written) {
            if !write_payment(tx, payment).await.map_err(db)? {
                let detail = format!(
                    "order id {} is held by another live payment",
                    payment.merchant_order_id
                );
                flag(tx, "order_id_conflict", &payment.id, &detail)
                    .await
                    .map_err(db)?;
            }
        }
        // A refund ends with its settlement.
        if s.kind == SettlementKind::Refund {
            tx.execute(
                "UPDATE refunds SET status = 'succeeded', updated_at_ms = $2 \
                 WHERE refund_id = $1 AND status = 'pending'",
                &[&s.channel_txn_id, &ms(s.settled_at_ms)],
            )
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    async fn balances_inner(
        &self,
        only: Option<(&str, &str)>,
    ) -> Result<Vec<AccountBalance>, SettleError> {
        let client = self.client().await?;
        self.balances_in(&client, only).await
    }

    /// As [`MoneyStore::balances`], on `client` (a connection or a transaction).
    async fn balances_in(
        &self,
        client: &impl GenericClient,
        only: Option<(&str, &str)>,
    ) -> Result<Vec<AccountBalance>, SettleError> {
        let (merchant, account) = only.unzip();
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let rows = client
            .query(
                "SELECT a.merchant_id, a.account_id, a.currency, a.credit_limit_minor, \
                 a.created_at_ms, a.updated_at_ms, \
                 COALESCE((SELECT SUM(p.amount_minor) FROM postings p WHERE p.ledger = \
                   'account:' || a.merchant_id || ':' || a.account_id), 0)::BIGINT, \
                 COALESCE((SELECT MAX(s.account_seq) FROM settlements s WHERE \
                   s.merchant_id = a.merchant_id AND s.account_id = a.account_id), 0)::BIGINT \
                 FROM accounts a \
                 WHERE ($1::TEXT IS NULL OR (a.merchant_id = $1 AND a.account_id = $2)) \
                 ORDER BY a.merchant_id COLLATE \"C\", a.account_id COLLATE \"C\"",
                &[&merchant, &account],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(AccountBalance {
                    account: AccountRow {
                        merchant_id: get(r, 0)?,
                        account_id: get(r, 1)?,
                        currency: get_currency(r, 2)?,
                        credit_limit_minor: get(r, 3)?,
                        created_at_ms: get_u64(r, 4)?,
                        updated_at_ms: get_u64(r, 5)?,
                    },
                    balance_minor: get(r, 6)?,
                    seq: get_u64(r, 7)?,
                })
            })
            .collect()
    }

    async fn live_holds_inner(
        &self,
        only: Option<(&str, &str)>,
    ) -> Result<Vec<PaymentRow>, SettleError> {
        let client = self.client().await?;
        self.live_holds_in(&client, only).await
    }

    /// As [`MoneyStore::live_holds`], on `client` (a connection or a transaction).
    async fn live_holds_in(
        &self,
        client: &impl GenericClient,
        only: Option<(&str, &str)>,
    ) -> Result<Vec<PaymentRow>, SettleError> {
        let (merchant, account) = only.unzip();
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let rows = client
            .query(
                &format!(
                    "SELECT {PAYMENT_COLUMNS} FROM payments WHERE status = 'pending' \
                     AND held_minor > 0 \
                     AND ($1::TEXT IS NULL OR (merchant_id = $1 AND account_id = $2)) \
                     ORDER BY id COLLATE \"C\""
                ),
                &[&merchant, &account],
            )
            .await
            .map_err(db)?;
        rows.iter().map(payment_from_row).collect()
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
                "SELECT scope_tag, idempotency_key, request_hash, id, created_at_ms \
                 FROM payments WHERE idempotency_key IS NOT NULL AND created_at_ms >= $1 \
                 AND ($2::TEXT IS NULL OR scope_tag = $2) \
                 AND (created_at_ms > $3 OR (created_at_ms = $3 AND id COLLATE \"C\" > $4)) \
                 ORDER BY created_at_ms, id COLLATE \"C\" LIMIT $5",
                &[&ms(since_ms), &scope_tag, &after_ms, &after_id, &limit],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(StoredKey {
                    scope_tag: get(r, 0)?,
                    idempotency_key: get(r, 1)?,
                    request_hash: get::<Option<String>>(r, 2)?.unwrap_or_default(),
                    payment_id: get(r, 3)?,
                    created_at_ms: get_u64(r, 4)?,
                })
            })
            .collect()
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
                    &change.status,
                    &ms(change.updated_at_ms),
                ],
            )
            .await
            .map_err(db)?;
        if updated == 1 {
            record_event(
                &tx,
                &change.payment_id,
                &change.status,
                change.updated_at_ms,
            )
            .await
            .map_err(db)?;
            // The merchant's webhook, in the same transaction as the status (webhooks).
            let stored = self.stored_payment(&tx, &change.payment_id).await?;
            let event = stored.and_then(|p| events::for_final_status(&p, telemetry::now_ms()));
            insert_webhooks(&tx, event.as_slice(), &self.no_webhook)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(updated == 1)
    }

    async fn postings_sum_inner(&self) -> Result<Vec<(String, String, u32, i64)>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT payment_id, kind, sequence, SUM(amount_minor)::BIGINT FROM postings \
                 GROUP BY payment_id, kind, sequence \
                 ORDER BY payment_id COLLATE \"C\", kind COLLATE \"C\", sequence",
                &[],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| Ok((get(r, 0)?, get(r, 1)?, get_u32(r, 2)?, get(r, 3)?)))
            .collect()
    }

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
                    kind: get(r, 0)?,
                    payment_id: get(r, 1)?,
                    detail: get(r, 2)?,
                    created_at_ms: get_u64(r, 3)?,
                })
            })
            .collect()
    }

    async fn ping_inner(&self) -> Result<(), SettleError> {
        let client = self.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| self.unavailable(&e))?;
        Ok(())
    }
}

/// `host:port[,host:port…]/db` of a connection config, for logs (no user, no password).
fn target_of(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    format!(
        "{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or_default()
    )
}

#[async_trait]
impl SchemaStore for PostgresStore {
    async fn migrate(&self) -> Result<u32, SettleError> {
        Self::timed(StoreOp::Write("migrate"), self.migrate_inner()).await
    }

    async fn schema_version(&self) -> Result<Option<u32>, SettleError> {
        Self::timed(StoreOp::Read("schema_version"), self.schema_version_inner()).await
    }

    async fn ping(&self) -> Result<(), SettleError> {
        Self::timed(StoreOp::Read("ping"), self.ping_inner()).await
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

#[async_trait]
impl MoneyStore for PostgresStore {
    async fn upsert_account(&self, row: &AccountRow) -> Result<(), SettleError> {
        Self::timed(
            StoreOp::Write("upsert_account"),
            self.upsert_account_inner(row),
        )
        .await
    }

    async fn commit(&self, batch: &[Settlement]) -> Result<Vec<CommitOutcome>, SettleError> {
        Self::timed(StoreOp::Write("commit"), self.commit_inner(batch)).await
    }

    async fn balances(
        &self,
        only: Option<(&str, &str)>,
    ) -> Result<Vec<AccountBalance>, SettleError> {
        Self::timed(StoreOp::Read("balances"), self.balances_inner(only)).await
    }

    async fn account_state(
        &self,
        merchant: &str,
        account: &str,
    ) -> Result<Option<(AccountBalance, Vec<PaymentRow>)>, SettleError> {
        if merchant.contains('\0') || account.contains('\0') {
            return Ok(None);
        }
        Self::timed(StoreOp::Read("account_state"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let mut client = self.client().await?;
            // One snapshot for both reads (REPEATABLE READ): the balance and the holds of
            // the same committed state.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(db)?;
            let only = Some((merchant, account));
            let Some(balance) = self.balances_in(&tx, only).await?.pop() else {
                return Ok(None);
            };
            let holds = self.live_holds_in(&tx, only).await?;
            tx.commit().await.map_err(db)?;
            Ok(Some((balance, holds)))
        })
        .await
    }

    async fn live_holds(&self, only: Option<(&str, &str)>) -> Result<Vec<PaymentRow>, SettleError> {
        Self::timed(StoreOp::Read("live_holds"), self.live_holds_inner(only)).await
    }

    async fn committed_success(
        &self,
        payment_id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>, SettleError> {
        if payment_id.contains('\0') {
            return Ok(None);
        }
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        Self::timed(StoreOp::Read("committed_success"), async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT channel_id, channel_txn_id FROM settlements WHERE payment_id = $1 \
                     AND kind IN ('capture', 'credit') AND sequence = 0",
                )
                .await
                .map_err(db)?;
            match client.query_opt(&stmt, &[&payment_id]).await.map_err(db)? {
                Some(row) => Ok(Some((get(&row, 0)?, get(&row, 1)?))),
                None => Ok(None),
            }
        })
        .await
    }

    async fn postings_sum_by_movement(
        &self,
    ) -> Result<Vec<(String, String, u32, i64)>, SettleError> {
        Self::timed(StoreOp::Read("postings_sum"), self.postings_sum_inner()).await
    }
}

#[async_trait]
impl WriteStore for PostgresStore {
    async fn commit_writes(
        &self,
        batch: &[Write],
    ) -> Result<Vec<Result<Written, SettleError>>, SettleError> {
        Self::timed(
            StoreOp::Write("commit_writes"),
            self.commit_writes_inner(batch),
        )
        .await
    }
}

#[async_trait]
impl RefundStore for PostgresStore {
    async fn record_refund(&self, refund: &RefundRow) -> Result<RefundRecorded, SettleError> {
        Self::timed(StoreOp::Write("record_refund"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let number = i32::try_from(refund.number)
                .map_err(|_| SettleError::Invalid(format!("refund number {}", refund.number)))?;
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            // The payment's row, locked: refunds of one payment are decided one at a time,
            // whichever instance records them.
            let Some(payment) = tx
                .query_opt(
                    "SELECT amount_minor FROM payments WHERE id = $1 FOR UPDATE",
                    &[&refund.payment_id],
                )
                .await
                .map_err(db)?
            else {
                return Err(SettleError::Invalid(format!(
                    "{}: a refund of an unknown payment",
                    refund.refund_id
                )));
            };
            let amount: i64 = get(&payment, 0)?;
            if let Some(row) = tx
                .query_opt(
                    &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE refund_id = $1"),
                    &[&refund.refund_id],
                )
                .await
                .map_err(db)?
            {
                if refund_from_row(&row)?.same_as(refund) {
                    return Ok(RefundRecorded::AlreadyRecorded);
                }
                self.flag_refund(&tx, refund, "refund_conflict", "another refund has this id")
                    .await?;
                tx.commit().await.map_err(db)?;
                return Ok(RefundRecorded::Conflict);
            }
            let refunded: i64 = get(
                &tx.query_one(
                    "SELECT COALESCE(SUM(amount_minor), 0)::BIGINT FROM refunds \
                     WHERE payment_id = $1 AND status <> 'failed'",
                    &[&refund.payment_id],
                )
                .await
                .map_err(db)?,
                0,
            )?;
            let remaining_minor = amount - refunded;
            if refund.amount_minor > remaining_minor {
                let detail = format!("{} left to refund", remaining_minor.max(0));
                self.flag_refund(&tx, refund, "refund_cap", &detail).await?;
                tx.commit().await.map_err(db)?;
                return Ok(RefundRecorded::Exceeds { remaining_minor });
            }
            tx.execute(
                "INSERT INTO refunds (refund_id, payment_id, number, amount_minor, currency, \
                 status, channel_id, channel_order_id, reason, created_at_ms, updated_at_ms, \
                 idempotency_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[
                    &refund.refund_id,
                    &refund.payment_id,
                    &number,
                    &refund.amount_minor,
                    &refund.currency.code(),
                    &refund.status,
                    &refund.channel_id,
                    &refund.channel_order_id,
                    &refund.reason,
                    &ms(refund.created_at_ms),
                    &ms(refund.updated_at_ms),
                    &refund.idempotency_key,
                ],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(RefundRecorded::Inserted)
        })
        .await
    }

    async fn set_refund_status(&self, change: &RefundStatusChange) -> Result<bool, SettleError> {
        Self::timed(StoreOp::Write("set_refund_status"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE refunds SET status = $2, updated_at_ms = $3 \
                         WHERE refund_id = $1 AND status = 'pending' RETURNING {REFUND_COLUMNS}"
                    ),
                    &[&change.refund_id, &change.status, &ms(change.updated_at_ms)],
                )
                .await
                .map_err(db)?;
            let changed = row.is_some();
            if let (Some(row), "failed") = (row, change.status.as_str()) {
                // The merchant's webhook, in the same transaction as the status.
                let refund = refund_from_row(&row)?;
                if let Some(payment) = self.stored_payment(&tx, &refund.payment_id).await? {
                    let event = events::for_failed_refund(&payment, &refund, change.updated_at_ms);
                    insert_webhooks(&tx, std::slice::from_ref(&event), &self.no_webhook)
                        .await
                        .map_err(db)?;
                }
            }
            tx.commit().await.map_err(db)?;
            Ok(changed)
        })
        .await
    }

    async fn refunds(&self, payment_id: &str) -> Result<Vec<RefundRow>, SettleError> {
        Self::timed(StoreOp::Read("refunds"), async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = $1 ORDER BY number"
                    ),
                    &[&payment_id],
                )
                .await
                .map_err(|e| self.unavailable(&e))?;
            rows.iter().map(refund_from_row).collect()
        })
        .await
    }

    async fn stale_refunds(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<RefundRow>, SettleError> {
        Self::timed(StoreOp::Read("stale_refunds"), async {
            let client = self.client().await?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    &format!(
                        "SELECT {REFUND_COLUMNS} FROM refunds WHERE status = 'pending' \
                         AND updated_at_ms < $1 ORDER BY updated_at_ms LIMIT $2"
                    ),
                    &[&ms(before_ms), &limit],
                )
                .await
                .map_err(|e| self.unavailable(&e))?;
            rows.iter().map(refund_from_row).collect()
        })
        .await
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
        Self::timed(StoreOp::Read("refusals"), async {
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            let (after_ms, after_key) = match after {
                Some((at, key)) => (ms(at), key),
                None => (-1, ""),
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    "SELECT scope_tag, idempotency_key, request_hash, outcome, created_at_ms \
                     FROM refusals WHERE created_at_ms >= $1 \
                     AND ($2::TEXT IS NULL OR scope_tag = $2) \
                     AND (created_at_ms > $3 OR (created_at_ms = $3 \
                          AND idempotency_key COLLATE \"C\" > $4)) \
                     ORDER BY created_at_ms, idempotency_key COLLATE \"C\" LIMIT $5",
                    &[&ms(since_ms), &scope_tag, &after_ms, &after_key, &limit],
                )
                .await
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    Ok(RefusalRow {
                        scope_tag: get(r, 0)?,
                        idempotency_key: get(r, 1)?,
                        request_hash: get(r, 2)?,
                        outcome: get(r, 3)?,
                        created_at_ms: get_u64(r, 4)?,
                    })
                })
                .collect()
        })
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
            let leased = tx
                .execute(
                    "INSERT INTO leases (name, holder, until_ms) VALUES ('key_purge', $1, $2) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                     until_ms = excluded.until_ms \
                     WHERE leases.holder = excluded.holder OR leases.until_ms <= $3",
                    &[&holder, &ms(now_ms.saturating_add(lease_ms)), &ms(now_ms)],
                )
                .await
                .map_err(db)?;
            if leased == 0 {
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
            tx.commit().await.map_err(db)?;
            Ok(Some(keys + refusals))
        })
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

#[async_trait]
impl FlagStore for PostgresStore {
    async fn flag(&self, item: &Flagged) -> Result<bool, SettleError> {
        Self::timed(StoreOp::Write("flag"), async {
            let client = self.client().await?;
            let at = i64::try_from(item.created_at_ms).unwrap_or(i64::MAX);
            let inserted = client
                .execute(
                    INSERT_FLAG,
                    &[&item.kind, &item.payment_id, &item.detail, &at],
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

#[async_trait]
impl WebhookStore for PostgresStore {
    async fn claim_webhooks(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<WebhookEvent>, SettleError> {
        Self::timed(StoreOp::Write("claim_webhooks"), async {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            // As `claim_due`: due pending events, oldest first, locked (skipping those another
            // instance is claiming right now) and leased in one statement. `RETURNING` keeps
            // no order: the old `next_attempt_at_ms` (`was`) orders them below.
            let stmt = client
                .prepare_cached(&format!(
                    "WITH due AS (SELECT id AS due_id, next_attempt_at_ms AS was \
                     FROM webhook_events WHERE status = 'pending' AND next_attempt_at_ms <= $1 \
                     ORDER BY next_attempt_at_ms, id COLLATE \"C\" LIMIT $3 \
                     FOR UPDATE SKIP LOCKED) \
                     UPDATE webhook_events SET next_attempt_at_ms = $2 FROM due \
                     WHERE id = due.due_id RETURNING {WEBHOOK_COLUMNS}, due.was"
                ))
                .await
                .map_err(db)?;
            let rows = client
                .query(&stmt, &[&ms(now_ms), &ms(lease_until_ms), &limit])
                .await
                .map_err(db)?;
            let mut claimed = rows
                .iter()
                .map(|r| Ok((get_u64(r, 14)?, webhook_from_row(r)?)))
                .collect::<Result<Vec<_>, SettleError>>()?;
            claimed.sort_by(|(a_was, a), (b_was, b)| (a_was, &a.id).cmp(&(b_was, &b.id)));
            Ok(claimed.into_iter().map(|(_, e)| e).collect())
        })
        .await
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        outcome: WebhookOutcome,
        http_status: Option<u16>,
        error: Option<&str>,
        now_ms: u64,
    ) -> Result<bool, SettleError> {
        Self::timed(StoreOp::Write("record_webhook_attempt"), async {
            let attempt = WebhookAttempt {
                id: id.to_owned(),
                outcome,
                http_status,
                error: error.map(str::to_owned),
                now_ms,
            };
            let client = self.client().await?;
            self.webhook_attempt_in(&client, &attempt).await
        })
        .await
    }

    async fn webhook_events(&self, payment_id: &str) -> Result<Vec<WebhookEvent>, SettleError> {
        Self::timed(StoreOp::Read("webhook_events"), async {
            if payment_id.contains('\0') {
                return Ok(Vec::new());
            }
            let db = |e: tokio_postgres::Error| self.unavailable(&e);
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhook_events WHERE payment_id = $1 \
                     ORDER BY created_at_ms, id COLLATE \"C\""
                ))
                .await
                .map_err(db)?;
            let rows = client.query(&stmt, &[&payment_id]).await.map_err(db)?;
            rows.iter().map(webhook_from_row).collect()
        })
        .await
    }

    async fn webhook_backlog(&self) -> Result<u64, SettleError> {
        Self::timed(StoreOp::Read("webhook_backlog"), async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT COUNT(*) FROM webhook_events WHERE status = 'pending'",
                    &[],
                )
                .await
                .map_err(|e| self.unavailable(&e))?;
            get_u64(&row, 0)
        })
        .await
    }
}

// ---- merchant webhooks: the outbox's rows (crate::webhooks) ----

use super::{webhook_error_text, NoWebhook, WebhookEvent, WebhookOutcome, WebhookStatus};
use crate::webhooks::events;

const WEBHOOK_COLUMNS: &str = "id, merchant_id, payment_id, type, sequence, payload, url, \
    status, attempts, next_attempt_at_ms, last_status, last_error, created_at_ms, updated_at_ms";

/// A batch's events in one statement; an event whose `(payment_id, type, sequence)` is already
/// enqueued is skipped. Text fields come from rows checked for NUL (see `events`).
const INSERT_WEBHOOKS: &str = "INSERT INTO webhook_events (id, merchant_id, payment_id, type, \
    sequence, payload, url, status, attempts, next_attempt_at_ms, created_at_ms, \
    updated_at_ms) SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], \
    $5::INTEGER[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::INTEGER[], $10::BIGINT[], \
    $11::BIGINT[], $12::BIGINT[]) ON CONFLICT DO NOTHING";

fn webhook_from_row(r: &Row) -> Result<WebhookEvent, SettleError> {
    let status: String = get(r, 7)?;
    Ok(WebhookEvent {
        id: get(r, 0)?,
        merchant_id: get(r, 1)?,
        payment_id: get(r, 2)?,
        event_type: get(r, 3)?,
        sequence: get_u32(r, 4)?,
        payload: get(r, 5)?,
        url: get(r, 6)?,
        status: WebhookStatus::parse(&status)
            .ok_or_else(|| bad_row(format!("unknown webhook status {status:?}")))?,
        attempts: get_u32(r, 8)?,
        next_attempt_at_ms: get::<Option<i64>>(r, 9)?
            .map(|v| u64::try_from(v).map_err(|_| bad_row(format!("negative due time {v}"))))
            .transpose()?,
        last_status: get::<Option<i32>>(r, 10)?
            .map(|v| u16::try_from(v).map_err(|_| bad_row(format!("HTTP status {v}"))))
            .transpose()?,
        last_error: get(r, 11)?,
        created_at_ms: get_u64(r, 12)?,
        updated_at_ms: get_u64(r, 13)?,
    })
}

async fn insert_webhooks(
    tx: &Transaction<'_>,
    events: &[WebhookEvent],
    no_webhook: &NoWebhook,
) -> Result<(), tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&WebhookEvent) -> &str| events.iter().map(f).collect::<Vec<_>>();
    let sequence: Vec<i32> = events
        .iter()
        .map(|e| i32::try_from(e.sequence).unwrap_or(i32::MAX))
        .collect();
    let attempts: Vec<i32> = events
        .iter()
        .map(|e| i32::try_from(e.attempts).unwrap_or(i32::MAX))
        .collect();
    let url: Vec<Option<&str>> = events.iter().map(|e| e.url.as_deref()).collect();
    let stored: Vec<(WebhookStatus, Option<u64>)> =
        events.iter().map(|e| no_webhook.stored_state(e)).collect();
    let status: Vec<&str> = stored.iter().map(|(s, _)| s.as_str()).collect();
    let next: Vec<Option<i64>> = stored.iter().map(|(_, n)| n.map(ms)).collect();
    let created: Vec<i64> = events.iter().map(|e| ms(e.created_at_ms)).collect();
    let updated: Vec<i64> = events.iter().map(|e| ms(e.updated_at_ms)).collect();
    let stmt = tx.prepare_cached(INSERT_WEBHOOKS).await?;
    tx.execute(
        &stmt,
        &[
            &column(|e| &e.id),
            &column(|e| &e.merchant_id),
            &column(|e| &e.payment_id),
            &column(|e| &e.event_type),
            &sequence,
            &column(|e| &e.payload),
            &url,
            &status,
            &attempts,
            &next,
            &created,
            &updated,
        ],
    )
    .await?;
    Ok(())
}

impl PostgresStore {
    /// The payment row as stored now, inside `tx`.
    async fn stored_payment(
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

    /// The event a just-inserted settlement announces (`events::for_settlement`).
    async fn settlement_webhook(
        &self,
        tx: &Transaction<'_>,
        s: &Settlement,
    ) -> Result<Option<WebhookEvent>, SettleError> {
        let stored = if events::needs_stored_payment(s) {
            self.stored_payment(tx, &s.payment_id).await?
        } else {
            None
        };
        let payment = s.payment.as_ref().or(stored.as_ref());
        Ok(events::for_settlement(s, payment, telemetry::now_ms()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_hides_the_url_and_the_password() {
        let secrets = vec![
            "postgres://app:s3cret@db:5432/gw".to_owned(),
            "s3cret".to_owned(),
        ];
        let msg = scrub(
            "cannot reach postgres://app:s3cret@db:5432/gw (password s3cret)".to_owned(),
            &secrets,
        );
        assert!(!msg.contains("s3cret"), "{msg}");
        assert!(!msg.contains("postgres://"), "{msg}");
    }

    #[tokio::test]
    async fn a_bad_url_is_misconfigured_without_echoing_it() {
        let url = "postgres://app:s3cret@db:notaport/gw";
        let err = PostgresStore::connect(url, 2, 100).await.unwrap_err();
        assert!(matches!(err, SettleError::Misconfigured(_)), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_without_echoing_the_password() {
        // Port 1 on loopback: nothing listens there.
        let url = "postgres://app:s3cret@127.0.0.1:1/gw";
        let err = PostgresStore::connect(url, 2, 500).await.unwrap_err();
        assert!(matches!(err, SettleError::Unavailable(_)), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
