//! The SQLite backend: one file under the data dir, WAL, `synchronous=FULL` (fsync on every
//! commit; group commit keeps the fsyncs per payment low instead of weakening them). SQLite
//! is synchronous, so every call runs on tokio's blocking pool with the one connection.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::{
    AccountBalance, AccountRow, AttemptOutcome, AttemptRow, AttemptUpdate, CheckStore,
    CommitOutcome, FlagStore, Flagged, IntentOutcome, KeyHolder, KeyStore, MoneyStore, PaymentRow,
    PaymentStore, RefundRecorded, RefundRow, RefundStatusChange, RefundStore, RefusalRow,
    SchemaStore, SettleError, Settlement, SettlementKind, StatusChange, StoredKey, Taken,
    WebhookAttempt, WebhookStore, Write, WriteStore, Written, MIGRATIONS, SCHEMA_VERSION,
};
use crate::money::Currency;
use crate::telemetry::{self, StoreOp};

/// Waits this long for a lock held by another process (`gateway migrate` beside a server).
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// Prepared statements kept per connection: more than the store has distinct statements.
const STATEMENT_CACHE: usize = 128;

/// Calls waiting for the connection's thread at most (the writer sends one at a time; the
/// rest are background loops and the admin API).
const CALL_QUEUE: usize = 1_024;

/// A call for the connection's thread.
type Call = Box<dyn FnOnce(&mut Connection) + Send>;

/// One connection, owned by one long-lived thread of its own (`sqlite`) that runs the calls in
/// the order they come. Not tokio's blocking pool: its threads come and go, and glibc's malloc
/// (which SQLite allocates with; the Rust code uses mimalloc) keeps an arena per thread that it
/// rarely gives back — the gateway's RSS was 3–4 times that of the PostgreSQL stack's.
pub struct SqliteStore {
    calls: mpsc::Sender<Call>,
    path: PathBuf,
    no_webhook: NoWebhook,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> SettleError {
    SettleError::Unavailable(e.to_string())
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const REFUND_COLUMNS: &str = "refund_id, payment_id, number, amount_minor, currency, status, \
    channel_id, channel_order_id, reason, created_at_ms, updated_at_ms, idempotency_key";

fn refund_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RefundRow> {
    Ok(RefundRow {
        refund_id: r.get(0)?,
        payment_id: r.get(1)?,
        number: r.get(2)?,
        amount_minor: r.get(3)?,
        currency: currency(r.get(4)?)?,
        status: r.get(5)?,
        channel_id: r.get(6)?,
        channel_order_id: r.get(7)?,
        reason: r.get(8)?,
        created_at_ms: r.get::<_, i64>(9)? as u64,
        updated_at_ms: r.get::<_, i64>(10)? as u64,
        idempotency_key: r.get(11)?,
    })
}

fn currency(code: String) -> rusqlite::Result<Currency> {
    Currency::parse(&code).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

impl SqliteStore {
    /// Opens (creating the file and its directory) with WAL and full synchronous commits.
    pub fn open(path: &Path) -> Result<Self, SettleError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    SettleError::Misconfigured(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        let conn = Connection::open(path).map_err(unavailable)?;
        conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))
            .map_err(unavailable)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(unavailable)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SettleError::Misconfigured(format!(
                "{} cannot use WAL (journal_mode={mode})",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(unavailable)?;
        // Every hot statement stays prepared (the default cache holds 16).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let (calls, mut queue) = mpsc::channel::<Call>(CALL_QUEUE);
        std::thread::Builder::new()
            .name("sqlite".into())
            .spawn(move || {
                let mut conn = conn;
                // Ends when the store (the only sender) is dropped.
                while let Some(call) = queue.blocking_recv() {
                    // A panicking call drops its reply: its caller gets an error, the thread
                    // (and the connection, its transaction rolled back) goes on.
                    if catch_unwind(AssertUnwindSafe(|| call(&mut conn))).is_err() {
                        tracing::error!("a SQLite store call panicked");
                    }
                }
            })
            .map_err(|e| {
                SettleError::Misconfigured(format!("cannot start the SQLite thread: {e}"))
            })?;
        Ok(Self {
            calls,
            path: path.to_owned(),
            no_webhook: NoWebhook::default(),
        })
    }

    /// Events of these merchants with nowhere to go are stored `skipped` ([`NoWebhook`]).
    pub fn with_no_webhook(mut self, no_webhook: NoWebhook) -> Self {
        self.no_webhook = no_webhook;
        self
    }

    async fn run<T: Send + 'static>(
        &self,
        op: StoreOp,
        f: impl FnOnce(&mut Connection) -> Result<T, SettleError> + Send + 'static,
    ) -> Result<T, SettleError> {
        let started = std::time::Instant::now();
        let (reply, answer) = oneshot::channel();
        let call: Call = Box::new(move |conn| {
            let _ = reply.send(f(conn));
        });
        self.calls
            .send(call)
            .await
            .map_err(|_| unavailable("the SQLite thread has stopped"))?;
        let result = answer
            .await
            .map_err(|_| unavailable("the SQLite call failed (panicked)"))?;
        telemetry::store_call("sqlite", op, started.elapsed());
        result
    }
}

fn db(e: rusqlite::Error) -> SettleError {
    unavailable(e)
}

fn payment_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PaymentRow> {
    Ok(PaymentRow {
        id: r.get(0)?,
        merchant_id: r.get(1)?,
        account_id: r.get(2)?,
        scope_tag: r.get(3)?,
        merchant_order_id: r.get(4)?,
        amount_minor: r.get(5)?,
        currency: currency(r.get(6)?)?,
        method: r.get(7)?,
        purpose: r.get(8)?,
        status: r.get(9)?,
        held_minor: r.get(10)?,
        hold_expires_at_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        created_at_ms: r.get::<_, i64>(12)? as u64,
        expires_at_ms: r.get::<_, i64>(13)? as u64,
        updated_at_ms: r.get::<_, i64>(14)? as u64,
        doc: r.get(15)?,
        next_check_at_ms: r.get::<_, Option<i64>>(16)?.map(|v| v as u64),
        checks: r.get(17)?,
        idempotency_key: r.get(18)?,
        request_hash: r.get(19)?,
    })
}

const PAYMENT_COLUMNS: &str = "id, merchant_id, account_id, scope_tag, merchant_order_id, \
    amount_minor, currency, method, purpose, status, held_minor, hold_expires_at_ms, \
    created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, checks, \
    idempotency_key, request_hash";

const ATTEMPT_COLUMNS: &str = "payment_id, attempt, channel_id, channel_order_id, outcome, \
    latency_ms, action, channel_txn_id, created_at_ms, updated_at_ms";

fn attempt_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AttemptRow> {
    Ok(AttemptRow {
        payment_id: r.get(0)?,
        attempt: r.get(1)?,
        channel_id: r.get(2)?,
        channel_order_id: r.get(3)?,
        outcome: {
            let text: String = r.get(4)?;
            AttemptOutcome::parse(&text).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    4,
                    rusqlite::types::Type::Text,
                    format!("attempt outcome {text:?}").into(),
                )
            })?
        },
        latency_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        action: r.get(6)?,
        channel_txn_id: r.get(7)?,
        created_at_ms: r.get::<_, i64>(8)? as u64,
        updated_at_ms: r.get::<_, i64>(9)? as u64,
    })
}

/// Inserts an attempt unless the very same one is stored; `Invalid` when it clashes with a
/// stored attempt (another channel order id for the same attempt, or its channel order id
/// taken by another attempt). Writes nothing unless it inserts.
/// `execute` through the connection's statement cache (hot statements are parsed once).
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// `query_row` through the connection's statement cache.
fn query_row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

fn insert_attempt(conn: &Connection, a: &AttemptRow) -> Result<(), SettleError> {
    let inserted = exec(
        conn,
        &format!(
            "INSERT INTO attempts ({ATTEMPT_COLUMNS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT DO NOTHING"
        ),
        params![
            a.payment_id,
            a.attempt,
            a.channel_id,
            a.channel_order_id,
            a.outcome.as_str(),
            a.latency_ms.map(ms),
            a.action,
            a.channel_txn_id,
            ms(a.created_at_ms),
            ms(a.updated_at_ms)
        ],
    )
    .map_err(db)?;
    if inserted == 1 {
        return Ok(());
    }
    let stored: Option<String> = query_row(
        conn,
        "SELECT channel_order_id FROM attempts WHERE payment_id = ?1 AND attempt = ?2",
        params![a.payment_id, a.attempt],
        |r| r.get(0),
    )
    .optional()
    .map_err(db)?;
    a.explain_conflict(stored.as_deref())
}

/// Records that a payment reached `status` (once per status).
fn record_event(conn: &Connection, id: &str, status: &str, at_ms: u64) -> rusqlite::Result<()> {
    exec(
        conn,
        "INSERT INTO payment_events (payment_id, status, at_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT DO NOTHING",
        params![id, status, ms(at_ms)],
    )?;
    Ok(())
}

/// Inserts a payment, or updates its status if it exists (leaving its resolution schedule);
/// `false` when another live payment holds its scoped order id.
fn write_payment(conn: &Connection, p: &PaymentRow) -> rusqlite::Result<bool> {
    let inserted = exec(
        conn,
        &format!(
            "INSERT INTO payments ({PAYMENT_COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
             ?19, ?20) ON CONFLICT DO NOTHING"
        ),
        params![
            p.id,
            p.merchant_id,
            p.account_id,
            p.scope_tag,
            p.merchant_order_id,
            p.amount_minor,
            p.currency.code(),
            p.method,
            p.purpose,
            p.status,
            p.held_minor,
            p.hold_expires_at_ms.map(ms),
            ms(p.created_at_ms),
            ms(p.expires_at_ms),
            ms(p.updated_at_ms),
            p.doc,
            p.next_check_at_ms.map(ms),
            p.checks,
            p.idempotency_key,
            p.request_hash
        ],
    )?;
    if inserted == 1 {
        record_event(conn, &p.id, &p.status, p.updated_at_ms)?;
        return Ok(true);
    }
    // Never moves a refunded payment back (two refunds' commits may arrive in either order;
    // the later status wins only if it is further along).
    let updated = exec(
        conn,
        "UPDATE payments SET status = CASE \
         WHEN status = 'refunded' AND ?2 IN ('succeeded', 'partially_refunded') THEN status \
         WHEN status = 'partially_refunded' AND ?2 = 'succeeded' THEN status ELSE ?2 END, \
         held_minor = ?3, updated_at_ms = ?4 WHERE id = ?1",
        params![p.id, p.status, p.held_minor, ms(p.updated_at_ms)],
    )?;
    if updated == 1 {
        record_event(conn, &p.id, &p.status, p.updated_at_ms)?;
    }
    Ok(updated == 1)
}

/// What the store holds against a new payment row `p` (not yet stored): another payment under
/// its (scope, idempotency key) — the same request or another — or another live payment under
/// its scoped order id; `None` when `p` may be written. The key is checked first: a retried
/// request must be replayed, not refused as a duplicate of its own first payment.
fn arbitrate(tx: &Connection, p: &PaymentRow) -> Result<Option<Taken>, SettleError> {
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
            };
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

/// Every account (or only `(merchant, account)`) with its balance and sequence recomputed from
/// the postings ([`MoneyStore::balances`]).
fn balances_in(
    conn: &Connection,
    only: Option<(&str, &str)>,
) -> Result<Vec<AccountBalance>, SettleError> {
    let (merchant, account) = only.unzip();
    let mut stmt = conn
        .prepare_cached(
            "SELECT a.merchant_id, a.account_id, a.currency, a.credit_limit_minor, \
             a.created_at_ms, a.updated_at_ms, \
             COALESCE((SELECT SUM(p.amount_minor) FROM postings p WHERE p.ledger = \
               'account:' || a.merchant_id || ':' || a.account_id), 0), \
             COALESCE((SELECT MAX(s.account_seq) FROM settlements s WHERE \
               s.merchant_id = a.merchant_id AND s.account_id = a.account_id), 0) \
             FROM accounts a WHERE (?1 IS NULL OR (a.merchant_id = ?1 AND a.account_id = ?2)) \
             ORDER BY a.merchant_id, a.account_id",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map(params![merchant, account], |r| {
            Ok(AccountBalance {
                account: AccountRow {
                    merchant_id: r.get(0)?,
                    account_id: r.get(1)?,
                    currency: currency(r.get(2)?)?,
                    credit_limit_minor: r.get(3)?,
                    created_at_ms: r.get::<_, i64>(4)? as u64,
                    updated_at_ms: r.get::<_, i64>(5)? as u64,
                },
                balance_minor: r.get(6)?,
                seq: r.get::<_, i64>(7)? as u64,
            })
        })
        .map_err(db)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db)
}

/// Every pending payment holding money (or only those of `(merchant, account)`).
fn live_holds_in(
    conn: &Connection,
    only: Option<(&str, &str)>,
) -> Result<Vec<PaymentRow>, SettleError> {
    let (merchant, account) = only.unzip();
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM payments WHERE status = 'pending' \
             AND held_minor > 0 \
             AND (?1 IS NULL OR (merchant_id = ?1 AND account_id = ?2)) ORDER BY id"
        ))
        .map_err(db)?;
    let rows = stmt
        .query_map(params![merchant, account], payment_from_row)
        .map_err(db)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(db)
}

/// Flags a refund the store refused (`kind`: `refund_conflict`, `refund_cap`), under its
/// payment.
fn flag_refund(tx: &Connection, r: &RefundRow, kind: &str, why: &str) -> Result<(), SettleError> {
    exec(
        tx,
        "INSERT INTO flagged (kind, payment_id, detail, created_at_ms) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT DO NOTHING",
        params![
            kind,
            r.payment_id,
            format!(
                "refund {} of {} refused: {why} (the balance store had lost the payment's refunds)",
                r.refund_id, r.amount_minor
            ),
            ms(telemetry::now_ms())
        ],
    )
    .map_err(db)?;
    Ok(())
}

/// Records an intent inside the caller's transaction ([`PaymentStore::record_intent`]).
fn intent_in(
    tx: &Connection,
    p: &PaymentRow,
    first_attempt: Option<&AttemptRow>,
) -> Result<IntentOutcome, SettleError> {
    let existing: Option<String> = tx
        .prepare_cached("SELECT id FROM payments WHERE id = ?1")
        .and_then(|mut st| st.query_row([&p.id], |r| r.get(0)).optional())
        .map_err(db)?;
    if existing.is_some() {
        // A retry: the attempt may not have made it (an older caller, or none given).
        if let Some(a) = first_attempt {
            insert_attempt(tx, a)?;
        }
        return Ok(IntentOutcome::AlreadyRecorded);
    }
    if let Some(taken) = arbitrate(tx, p)? {
        return Ok(taken.into());
    }
    write_payment(tx, p).map_err(db)?;
    if let Some(a) = first_attempt {
        insert_attempt(tx, a)?;
    }
    Ok(IntentOutcome::Inserted)
}

/// Applies an attempt's outcome; a `succeeded` attempt keeps its outcome (a late `accepted`
/// must not move it back). `false` when no such attempt can take it.
fn update_attempt_in(conn: &Connection, u: &AttemptUpdate) -> rusqlite::Result<bool> {
    let updated = conn
        .prepare_cached(
            "UPDATE attempts SET outcome = ?3, \
             latency_ms = COALESCE(?4, latency_ms), action = COALESCE(?5, action), \
             channel_txn_id = COALESCE(?6, channel_txn_id), updated_at_ms = ?7 \
             WHERE payment_id = ?1 AND attempt = ?2 AND outcome <> 'succeeded'",
        )?
        .execute(params![
            u.payment_id,
            u.attempt,
            u.outcome.as_str(),
            u.latency_ms.map(ms),
            u.action,
            u.channel_txn_id,
            ms(u.now_ms)
        ])?;
    Ok(updated == 1)
}

/// Records a webhook delivery attempt of a pending event inside the caller's transaction.
fn webhook_attempt_in(conn: &Connection, a: &WebhookAttempt) -> rusqlite::Result<bool> {
    let error = webhook_error_text(a.error.as_deref());
    let (status, attempted, next) = a.outcome.transition();
    let updated = conn
        .prepare_cached(
            "UPDATE webhook_events SET status = ?2, attempts = attempts + ?3, \
             next_attempt_at_ms = ?4, last_status = COALESCE(?5, last_status), \
             last_error = COALESCE(?6, last_error), updated_at_ms = ?7 \
             WHERE id = ?1 AND status = 'pending'",
        )?
        .execute(params![
            a.id,
            status.as_str(),
            i64::from(attempted),
            next.map(ms),
            a.http_status,
            error,
            ms(a.now_ms)
        ])?;
    Ok(updated == 1)
}

/// Inserts one settlement (with its postings, payment, refund status and webhook) inside the
/// caller's transaction.
fn settle_in(
    tx: &Connection,
    s: &Settlement,
    no_webhook: &NoWebhook,
) -> Result<CommitOutcome, SettleError> {
    let hash = s.content_hash();
    // A movement that creates its payment is written only with its row: the store decides
    // whether the payment may exist (its key and order id), whatever the balance store said.
    let creates = match &s.payment {
        // Two index look-ups: a row already holding the key or order id is either this very
        // payment (a re-drive: its settlement is recognized below) or another one (refused).
        Some(payment) if s.creates_payment() => match arbitrate(tx, payment)? {
            None => true,
            Some(taken) if taken.holder() == payment.id => false,
            Some(taken) => return Ok(taken.into()),
        },
        _ => false,
    };
    let inserted = exec(
        tx,
        "INSERT INTO settlements (payment_id, kind, sequence, merchant_id, \
             account_id, channel_id, channel_txn_id, amount_minor, currency, \
             channel_fee_minor, commission_minor, merchant_net_minor, account_seq, \
             settled_at_ms, content_hash) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
             ON CONFLICT DO NOTHING",
        params![
            s.payment_id,
            s.kind.as_str(),
            s.sequence,
            s.merchant_id,
            s.account_id,
            s.channel_id,
            s.channel_txn_id,
            s.amount_minor,
            s.currency.code(),
            s.channel_fee_minor,
            s.commission_minor,
            s.merchant_net_minor,
            s.account_seq.map(ms),
            ms(s.settled_at_ms),
            hash
        ],
    )
    .map_err(db)?;
    if inserted == 0 {
        let stored: Option<String> = query_row(
            tx,
            "SELECT content_hash FROM settlements WHERE payment_id = ?1 \
                 AND kind = ?2 AND sequence = ?3",
            params![s.payment_id, s.kind.as_str(), s.sequence],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)?;
        let Some(stored) = stored else {
            // Not our key: the account's sequence number is taken.
            let account_seq = s.account_seq.unwrap_or(0);
            exec(tx,
                "INSERT INTO flagged (kind, payment_id, detail, created_at_ms) \
                 VALUES ('sequence_conflict', ?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![
                    s.payment_id,
                    format!("account sequence {account_seq} is already used: the balance store rolled back"),
                    ms(telemetry::now_ms())
                ],
            )
            .map_err(db)?;
            return Ok(CommitOutcome::SequenceConflict { account_seq });
        };
        if stored == hash {
            return Ok(CommitOutcome::AlreadyCommitted);
        } else {
            exec(
                tx,
                "INSERT INTO flagged (kind, payment_id, detail, created_at_ms) \
                 VALUES ('settlement_conflict', ?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![
                    s.payment_id,
                    format!(
                        "{} #{}: stored {stored}, offered {hash}",
                        s.kind, s.sequence
                    ),
                    ms(telemetry::now_ms())
                ],
            )
            .map_err(db)?;
            return Ok(CommitOutcome::Conflict {
                stored_hash: stored,
            });
        }
    }
    for (line, p) in s.postings.iter().enumerate() {
        exec(
            tx,
            "INSERT INTO postings (payment_id, kind, sequence, line, ledger, \
             amount_minor, currency) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                s.payment_id,
                s.kind.as_str(),
                s.sequence,
                line as i64,
                p.ledger,
                p.amount_minor,
                s.currency.code()
            ],
        )
        .map_err(db)?;
    }
    if let Some(payment) = &s.payment {
        let written = write_payment(tx, payment).map_err(db)?;
        // Checked above, in this transaction, on the one connection: it cannot be taken.
        debug_assert!(
            written || !creates,
            "{}: a checked new payment was not written",
            payment.id
        );
        if !written {
            exec(
                tx,
                "INSERT INTO flagged (kind, payment_id, detail, created_at_ms) \
                 VALUES ('order_id_conflict', ?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![
                    payment.id,
                    format!(
                        "order id {} is held by another live payment",
                        payment.merchant_order_id
                    ),
                    ms(telemetry::now_ms())
                ],
            )
            .map_err(db)?;
        }
    }
    // A refund ends with its settlement.
    if s.kind == SettlementKind::Refund {
        exec(
            tx,
            "UPDATE refunds SET status = 'succeeded', updated_at_ms = ?2 \
             WHERE refund_id = ?1 AND status = 'pending'",
            params![s.channel_txn_id, ms(s.settled_at_ms)],
        )
        .map_err(db)?;
    }
    // The merchant's webhook, in the same transaction as the money (webhooks).
    enqueue_settlement_webhook(tx, s, no_webhook).map_err(db)?;
    Ok(CommitOutcome::Inserted)
}

#[async_trait]
impl SchemaStore for SqliteStore {
    async fn migrate(&self) -> Result<u32, SettleError> {
        self.run(StoreOp::Write("migrate"), |conn| {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations (\
                 version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
            )
            .map_err(db)?;
            let current: Option<u32> = conn
                .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                    r.get(0)
                })
                .map_err(db)?;
            let current = current.unwrap_or(0);
            if current > SCHEMA_VERSION {
                return Err(SettleError::WrongSchema {
                    found: current,
                    expected: SCHEMA_VERSION,
                });
            }
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db)?;
                tx.execute_batch(sql).map_err(db)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, ?2)",
                    params![version, ms(telemetry::now_ms())],
                )
                .map_err(db)?;
                tx.commit().map_err(db)?;
                tracing::info!(version, "applied migration");
            }
            Ok(SCHEMA_VERSION)
        })
        .await
    }

    async fn schema_version(&self) -> Result<Option<u32>, SettleError> {
        self.run(StoreOp::Read("schema_version"), |conn| {
            let exists: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' \
                     AND name = 'schema_migrations')",
                    [],
                    |r| r.get(0),
                )
                .map_err(db)?;
            if !exists {
                return Ok(None);
            }
            conn.query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })
            .map_err(db)
        })
        .await
    }

    async fn ping(&self) -> Result<(), SettleError> {
        self.run(StoreOp::Read("ping"), |conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map_err(db)?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl PaymentStore for SqliteStore {
    async fn record_intent(
        &self,
        payment: &PaymentRow,
        first_attempt: Option<&AttemptRow>,
    ) -> Result<IntentOutcome, SettleError> {
        if let Some(a) = first_attempt {
            a.check_for(&payment.id)?;
        }
        let p = payment.clone();
        let first_attempt = first_attempt.cloned();
        self.run(StoreOp::Write("record_intent"), move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let outcome = intent_in(&tx, &p, first_attempt.as_ref())?;
            tx.commit().map_err(db)?;
            Ok(outcome)
        })
        .await
    }

    async fn record_attempt(&self, attempt: &AttemptRow) -> Result<(), SettleError> {
        attempt.check_for(&attempt.payment_id)?;
        let a = attempt.clone();
        self.run(StoreOp::Write("record_attempt"), move |conn| {
            insert_attempt(conn, &a)
        })
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
        let update = AttemptUpdate {
            payment_id: payment_id.to_owned(),
            attempt,
            outcome,
            latency_ms,
            action: action.map(str::to_owned),
            channel_txn_id: channel_txn_id.map(str::to_owned),
            now_ms,
        };
        self.run(StoreOp::Write("update_attempt"), move |conn| {
            update_attempt_in(conn, &update).map_err(db)
        })
        .await
    }

    async fn attempts(&self, payment_id: &str) -> Result<Vec<AttemptRow>, SettleError> {
        let payment_id = payment_id.to_owned();
        self.run(StoreOp::Read("attempts"), move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE payment_id = ?1 \
                     ORDER BY attempt"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map([&payment_id], attempt_from_row)
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn attempt_by_channel_order(
        &self,
        channel_order_id: &str,
    ) -> Result<Option<AttemptRow>, SettleError> {
        let channel_order_id = channel_order_id.to_owned();
        self.run(StoreOp::Read("attempt_by_channel_order"), move |conn| {
            conn.query_row(
                &format!("SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE channel_order_id = ?1"),
                [&channel_order_id],
                attempt_from_row,
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn payment(&self, id: &str) -> Result<Option<PaymentRow>, SettleError> {
        let id = id.to_owned();
        self.run(StoreOp::Read("payment"), move |conn| {
            conn.query_row(
                &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"),
                [&id],
                payment_from_row,
            )
            .optional()
            .map_err(db)
        })
        .await
    }

    async fn set_final_status(&self, change: &StatusChange) -> Result<bool, SettleError> {
        let change = change.clone();
        let no_webhook = self.no_webhook.clone();
        self.run(StoreOp::Write("set_final_status"), move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let updated = tx
                .execute(
                    "UPDATE payments SET status = ?2, held_minor = 0, updated_at_ms = ?3 \
                     WHERE id = ?1 AND status = 'pending'",
                    params![change.payment_id, change.status, ms(change.updated_at_ms)],
                )
                .map_err(db)?;
            if updated == 1 {
                record_event(
                    &tx,
                    &change.payment_id,
                    &change.status,
                    change.updated_at_ms,
                )
                .map_err(db)?;
                // The merchant's webhook, in the same transaction as the status (webhooks).
                enqueue_status_webhook(&tx, &change.payment_id, &no_webhook).map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(updated == 1)
        })
        .await
    }

    async fn payment_events(&self, id: &str) -> Result<Vec<(String, u64)>, SettleError> {
        let id = id.to_owned();
        self.run(StoreOp::Read("payment_events"), move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT status, at_ms FROM payment_events WHERE payment_id = ?1 \
                     ORDER BY at_ms, status",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([&id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
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

#[async_trait]
impl MoneyStore for SqliteStore {
    async fn upsert_account(&self, row: &AccountRow) -> Result<(), SettleError> {
        let row = row.clone();
        self.run(StoreOp::Write("upsert_account"), move |conn| {
            conn.execute(
                "INSERT INTO accounts (merchant_id, account_id, currency, credit_limit_minor, \
                 created_at_ms, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (merchant_id, account_id) DO UPDATE SET \
                 credit_limit_minor = excluded.credit_limit_minor, \
                 updated_at_ms = excluded.updated_at_ms",
                params![
                    row.merchant_id,
                    row.account_id,
                    row.currency.code(),
                    row.credit_limit_minor,
                    ms(row.created_at_ms),
                    ms(row.updated_at_ms)
                ],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn commit(&self, batch: &[Settlement]) -> Result<Vec<CommitOutcome>, SettleError> {
        for s in batch {
            s.check()?;
        }
        let batch = batch.to_vec();
        let no_webhook = self.no_webhook.clone();
        self.run(StoreOp::Write("commit"), move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let outcomes = batch
                .iter()
                .map(|s| settle_in(&tx, s, &no_webhook))
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit().map_err(db)?;
            Ok(outcomes)
        })
        .await
    }

    async fn balances(
        &self,
        only: Option<(&str, &str)>,
    ) -> Result<Vec<AccountBalance>, SettleError> {
        let only = only.map(|(m, a)| (m.to_owned(), a.to_owned()));
        self.run(StoreOp::Read("balances"), move |conn| {
            balances_in(conn, only.as_ref().map(|(m, a)| (m.as_str(), a.as_str())))
        })
        .await
    }

    async fn account_state(
        &self,
        merchant: &str,
        account: &str,
    ) -> Result<Option<(AccountBalance, Vec<PaymentRow>)>, SettleError> {
        let (merchant, account) = (merchant.to_owned(), account.to_owned());
        self.run(StoreOp::Read("account_state"), move |conn| {
            // One read transaction: both reads see the same committed state.
            let tx = conn.transaction().map_err(db)?;
            let only = Some((merchant.as_str(), account.as_str()));
            let Some(balance) = balances_in(&tx, only)?.pop() else {
                return Ok(None);
            };
            let holds = live_holds_in(&tx, only)?;
            tx.commit().map_err(db)?;
            Ok(Some((balance, holds)))
        })
        .await
    }

    async fn live_holds(&self, only: Option<(&str, &str)>) -> Result<Vec<PaymentRow>, SettleError> {
        let only = only.map(|(m, a)| (m.to_owned(), a.to_owned()));
        self.run(StoreOp::Read("live_holds"), move |conn| {
            live_holds_in(conn, only.as_ref().map(|(m, a)| (m.as_str(), a.as_str())))
        })
        .await
    }

    async fn committed_success(
        &self,
        payment_id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>, SettleError> {
        let id = payment_id.to_owned();
        self.run(StoreOp::Read("committed_success"), move |conn| {
            conn.prepare_cached(
                "SELECT channel_id, channel_txn_id FROM settlements WHERE payment_id = ?1 \
                 AND kind IN ('capture', 'credit') AND sequence = 0",
            )
            .and_then(|mut st| {
                st.query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(db)
        })
        .await
    }

    async fn postings_sum_by_movement(
        &self,
    ) -> Result<Vec<(String, String, u32, i64)>, SettleError> {
        self.run(StoreOp::Read("postings_sum"), |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT payment_id, kind, sequence, SUM(amount_minor) FROM postings \
                     GROUP BY payment_id, kind, sequence ORDER BY payment_id, kind, sequence",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }
}

#[async_trait]
impl WriteStore for SqliteStore {
    async fn commit_writes(
        &self,
        batch: &[Write],
    ) -> Result<Vec<Result<Written, SettleError>>, SettleError> {
        // What is invalid on its face is refused alone, before the transaction.
        let checked: Vec<Option<SettleError>> = batch.iter().map(|w| w.check().err()).collect();
        let batch = batch.to_vec();
        let no_webhook = self.no_webhook.clone();
        self.run(StoreOp::Write("commit_writes"), move |conn| {
            let mut tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let mut results: Vec<Option<Result<Written, SettleError>>> =
                checked.into_iter().map(|c| c.map(Err)).collect();
            // Intents, then attempt outcomes, then settlements (see the trait).
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                let Write::Intent {
                    payment,
                    first_attempt,
                } = write
                else {
                    continue;
                };
                if result.is_some() {
                    continue;
                }
                // A savepoint per intent: an attempt that clashes leaves nothing behind.
                let sp = tx.savepoint().map_err(db)?;
                match intent_in(&sp, payment, first_attempt.as_ref()) {
                    Ok(outcome) => {
                        sp.commit().map_err(db)?;
                        *result = Some(Ok(Written::Intent(outcome)));
                    }
                    Err(e @ SettleError::Invalid(_)) => *result = Some(Err(e)),
                    Err(e) => return Err(e),
                }
            }
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                if let (Write::Attempt(update), None) = (write, &result) {
                    let updated = update_attempt_in(&tx, update).map_err(db)?;
                    *result = Some(Ok(Written::Attempt(updated)));
                }
            }
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                if let (Write::Settlement(settlement), None) = (write, &result) {
                    *result = Some(Ok(Written::Settlement(settle_in(
                        &tx,
                        settlement,
                        &no_webhook,
                    )?)));
                }
            }
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                if let (Write::Webhook(attempt), None) = (write, &result) {
                    let updated = webhook_attempt_in(&tx, attempt).map_err(db)?;
                    *result = Some(Ok(Written::Webhook(updated)));
                }
            }
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                if let (Write::Refusal(refusal), None) = (write, &result) {
                    let inserted = exec(
                        &tx,
                        "INSERT INTO refusals (scope_tag, idempotency_key, request_hash, \
                         outcome, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5) \
                         ON CONFLICT DO NOTHING",
                        params![
                            refusal.scope_tag,
                            refusal.idempotency_key,
                            refusal.request_hash,
                            refusal.outcome,
                            ms(refusal.created_at_ms)
                        ],
                    )
                    .map_err(db)?;
                    *result = Some(Ok(Written::Refusal(inserted == 1)));
                }
            }
            tx.commit().map_err(db)?;
            Ok(results
                .into_iter()
                .map(|r| r.expect("every write has its result"))
                .collect())
        })
        .await
    }
}

#[async_trait]
impl RefundStore for SqliteStore {
    async fn record_refund(&self, refund: &RefundRow) -> Result<RefundRecorded, SettleError> {
        let r = refund.clone();
        self.run(StoreOp::Write("record_refund"), move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let stored: Option<RefundRow> = query_row(
                &tx,
                &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE refund_id = ?1"),
                params![r.refund_id],
                refund_from_row,
            )
            .optional()
            .map_err(db)?;
            if let Some(stored) = stored {
                if !stored.same_as(&r) {
                    flag_refund(&tx, &r, "refund_conflict", "another refund has this id")?;
                    tx.commit().map_err(db)?;
                    return Ok(RefundRecorded::Conflict);
                }
                return Ok(RefundRecorded::AlreadyRecorded);
            }
            let amount: Option<i64> = query_row(
                &tx,
                "SELECT amount_minor FROM payments WHERE id = ?1",
                params![r.payment_id],
                |row| row.get(0),
            )
            .optional()
            .map_err(db)?;
            let Some(amount) = amount else {
                return Err(SettleError::Invalid(format!(
                    "{}: a refund of an unknown payment",
                    r.refund_id
                )));
            };
            let refunded: i64 = query_row(
                &tx,
                "SELECT COALESCE(SUM(amount_minor), 0) FROM refunds \
                 WHERE payment_id = ?1 AND status <> 'failed'",
                params![r.payment_id],
                |row| row.get(0),
            )
            .map_err(db)?;
            let remaining_minor = amount - refunded;
            if r.amount_minor > remaining_minor {
                let detail = format!("{} left to refund", remaining_minor.max(0));
                flag_refund(&tx, &r, "refund_cap", &detail)?;
                tx.commit().map_err(db)?;
                return Ok(RefundRecorded::Exceeds { remaining_minor });
            }
            tx.execute(
                "INSERT INTO refunds (refund_id, payment_id, number, amount_minor, currency, \
                 status, channel_id, channel_order_id, reason, created_at_ms, updated_at_ms, \
                 idempotency_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    r.refund_id,
                    r.payment_id,
                    r.number,
                    r.amount_minor,
                    r.currency.code(),
                    r.status,
                    r.channel_id,
                    r.channel_order_id,
                    r.reason,
                    ms(r.created_at_ms),
                    ms(r.updated_at_ms),
                    r.idempotency_key
                ],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(RefundRecorded::Inserted)
        })
        .await
    }

    async fn set_refund_status(&self, change: &RefundStatusChange) -> Result<bool, SettleError> {
        let c = change.clone();
        let no_webhook = self.no_webhook.clone();
        self.run(StoreOp::Write("set_refund_status"), move |conn| {
            let tx = conn.transaction().map_err(db)?;
            let changed = tx
                .execute(
                    "UPDATE refunds SET status = ?2, updated_at_ms = ?3 \
                     WHERE refund_id = ?1 AND status = 'pending'",
                    params![c.refund_id, c.status, ms(c.updated_at_ms)],
                )
                .map_err(db)?;
            if changed == 1 && c.status == "failed" {
                // The merchant's webhook, in the same transaction as the status.
                let refund = tx
                    .query_row(
                        &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE refund_id = ?1"),
                        [&c.refund_id],
                        refund_from_row,
                    )
                    .map_err(db)?;
                let payment = tx
                    .query_row(
                        &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"),
                        [&refund.payment_id],
                        payment_from_row,
                    )
                    .optional()
                    .map_err(db)?;
                if let Some(payment) = payment {
                    let event = events::for_failed_refund(&payment, &refund, c.updated_at_ms);
                    insert_webhook(&tx, &event, &no_webhook).map_err(db)?;
                }
            }
            tx.commit().map_err(db)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn refunds(&self, payment_id: &str) -> Result<Vec<RefundRow>, SettleError> {
        let payment_id = payment_id.to_owned();
        self.run(StoreOp::Read("refunds"), move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = ?1 ORDER BY number"
                ))
                .map_err(db)?;
            let rows = stmt.query_map([&payment_id], refund_from_row).map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn stale_refunds(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<RefundRow>, SettleError> {
        self.run(StoreOp::Read("stale_refunds"), move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {REFUND_COLUMNS} FROM refunds WHERE status = 'pending' \
                     AND updated_at_ms < ?1 ORDER BY updated_at_ms LIMIT ?2"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map(params![ms(before_ms), limit as i64], refund_from_row)
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }
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
                    "SELECT scope_tag, idempotency_key, request_hash, id, created_at_ms \
                     FROM payments WHERE idempotency_key IS NOT NULL AND created_at_ms >= ?1 \
                     AND (?2 IS NULL OR scope_tag = ?2) AND (created_at_ms, id) > (?3, ?4) \
                     ORDER BY created_at_ms, id LIMIT ?5",
                )
                .map_err(db)?;
            let rows = st
                .query_map(
                    params![ms(since_ms), scope_tag, after_ms, after_id, limit],
                    |r| {
                        Ok(StoredKey {
                            scope_tag: r.get(0)?,
                            idempotency_key: r.get(1)?,
                            request_hash: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                            payment_id: r.get(3)?,
                            created_at_ms: r.get::<_, i64>(4)? as u64,
                        })
                    },
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
        let scope_tag = scope_tag.map(str::to_owned);
        let (after_ms, after_key) = match after {
            Some((at, key)) => (ms(at), key.to_owned()),
            None => (-1, String::new()),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(StoreOp::Read("refusals"), move |conn| {
            let mut st = conn
                .prepare_cached(
                    "SELECT scope_tag, idempotency_key, request_hash, outcome, created_at_ms \
                     FROM refusals WHERE created_at_ms >= ?1 \
                     AND (?2 IS NULL OR scope_tag = ?2) \
                     AND (created_at_ms, idempotency_key) > (?3, ?4) \
                     ORDER BY created_at_ms, idempotency_key LIMIT ?5",
                )
                .map_err(db)?;
            let rows = st
                .query_map(
                    params![ms(since_ms), scope_tag, after_ms, after_key, limit],
                    |r| {
                        Ok(RefusalRow {
                            scope_tag: r.get(0)?,
                            idempotency_key: r.get(1)?,
                            request_hash: r.get(2)?,
                            outcome: r.get(3)?,
                            created_at_ms: r.get::<_, i64>(4)? as u64,
                        })
                    },
                )
                .map_err(db)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
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
        let holder = holder.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(StoreOp::Write("purge_keys"), move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let leased = exec(
                &tx,
                "INSERT INTO leases (name, holder, until_ms) VALUES ('key_purge', ?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                 until_ms = excluded.until_ms \
                 WHERE leases.holder = excluded.holder OR leases.until_ms <= ?3",
                params![holder, ms(now_ms.saturating_add(lease_ms)), ms(now_ms)],
            )
            .map_err(db)?;
            if leased == 0 {
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
            tx.commit().map_err(db)?;
            Ok(Some((keys + refusals) as u64))
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
                        item.kind,
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
                        kind: r.get(0)?,
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

#[async_trait]
impl WebhookStore for SqliteStore {
    async fn claim_webhooks(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<WebhookEvent>, SettleError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.run(StoreOp::Write("claim_webhooks"), move |conn| {
            // One writer at a time (IMMEDIATE): no other process can claim the same events
            // between the select and the update.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let mut due = {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "SELECT {WEBHOOK_COLUMNS} FROM webhook_events WHERE status = 'pending' \
                         AND next_attempt_at_ms <= ?1 ORDER BY next_attempt_at_ms, id LIMIT ?2"
                    ))
                    .map_err(db)?;
                let rows = stmt
                    .query_map(
                        params![ms(now_ms), i64::try_from(limit).unwrap_or(i64::MAX)],
                        webhook_from_row,
                    )
                    .map_err(db)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(db)?
            };
            if due.is_empty() {
                return Ok(due);
            }
            {
                let mut lease = tx
                    .prepare_cached(
                        "UPDATE webhook_events SET next_attempt_at_ms = ?2 WHERE id = ?1",
                    )
                    .map_err(db)?;
                for e in &mut due {
                    lease
                        .execute(params![e.id, ms(lease_until_ms)])
                        .map_err(db)?;
                    e.next_attempt_at_ms = Some(lease_until_ms);
                }
            }
            tx.commit().map_err(db)?;
            Ok(due)
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
        let attempt = WebhookAttempt {
            id: id.to_owned(),
            outcome,
            http_status,
            error: error.map(str::to_owned),
            now_ms,
        };
        self.run(StoreOp::Write("record_webhook_attempt"), move |conn| {
            webhook_attempt_in(conn, &attempt).map_err(db)
        })
        .await
    }

    async fn webhook_events(&self, payment_id: &str) -> Result<Vec<WebhookEvent>, SettleError> {
        let payment_id = payment_id.to_owned();
        self.run(StoreOp::Read("webhook_events"), move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhook_events WHERE payment_id = ?1 \
                     ORDER BY created_at_ms, id"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map([&payment_id], webhook_from_row)
                .map_err(db)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db)
        })
        .await
    }

    async fn webhook_backlog(&self) -> Result<u64, SettleError> {
        self.run(StoreOp::Read("webhook_backlog"), |conn| {
            let pending: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM webhook_events WHERE status = 'pending'",
                    [],
                    |r| r.get(0),
                )
                .map_err(db)?;
            Ok(u64::try_from(pending).unwrap_or(0))
        })
        .await
    }
}

// ---- merchant webhooks: the outbox's rows (crate::webhooks) ----

use super::{webhook_error_text, NoWebhook, WebhookEvent, WebhookOutcome, WebhookStatus};
use crate::webhooks::events;

const WEBHOOK_COLUMNS: &str = "id, merchant_id, payment_id, type, sequence, payload, url, \
    status, attempts, next_attempt_at_ms, last_status, last_error, created_at_ms, updated_at_ms";

fn webhook_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WebhookEvent> {
    let status: String = r.get(7)?;
    Ok(WebhookEvent {
        id: r.get(0)?,
        merchant_id: r.get(1)?,
        payment_id: r.get(2)?,
        event_type: r.get(3)?,
        sequence: r.get(4)?,
        payload: r.get(5)?,
        url: r.get(6)?,
        status: WebhookStatus::parse(&status).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                7,
                rusqlite::types::Type::Text,
                format!("unknown webhook status {status:?}").into(),
            )
        })?,
        attempts: r.get(8)?,
        next_attempt_at_ms: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
        last_status: r.get(10)?,
        last_error: r.get(11)?,
        created_at_ms: r.get::<_, i64>(12)? as u64,
        updated_at_ms: r.get::<_, i64>(13)? as u64,
    })
}

/// Inserts an event unless its `(payment_id, type, sequence)` is already enqueued.
fn insert_webhook(
    conn: &Connection,
    e: &WebhookEvent,
    no_webhook: &NoWebhook,
) -> rusqlite::Result<()> {
    let (status, next_attempt_at_ms) = no_webhook.stored_state(e);
    conn.prepare_cached(&format!(
        "INSERT INTO webhook_events ({WEBHOOK_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) ON CONFLICT DO NOTHING"
    ))?
    .execute(params![
        e.id,
        e.merchant_id,
        e.payment_id,
        e.event_type,
        e.sequence,
        e.payload,
        e.url,
        status.as_str(),
        e.attempts,
        next_attempt_at_ms.map(ms),
        e.last_status,
        e.last_error,
        ms(e.created_at_ms),
        ms(e.updated_at_ms)
    ])?;
    Ok(())
}

/// Enqueues the event a just-inserted settlement announces (`events::for_settlement`).
fn enqueue_settlement_webhook(
    conn: &Connection,
    s: &Settlement,
    no_webhook: &NoWebhook,
) -> rusqlite::Result<()> {
    let stored = if events::needs_stored_payment(s) {
        query_row(
            conn,
            &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"),
            [&s.payment_id],
            payment_from_row,
        )
        .optional()?
    } else {
        None
    };
    let payment = s.payment.as_ref().or(stored.as_ref());
    if let Some(event) = events::for_settlement(s, payment, telemetry::now_ms()) {
        insert_webhook(conn, &event, no_webhook)?;
    }
    Ok(())
}

/// Enqueues the event a payment's new final status announces (`events::for_final_status`).
fn enqueue_status_webhook(
    conn: &Connection,
    payment_id: &str,
    no_webhook: &NoWebhook,
) -> rusqlite::Result<()> {
    let payment = query_row(
        conn,
        &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"),
        [payment_id],
        payment_from_row,
    )?;
    if let Some(event) = events::for_final_status(&payment, telemetry::now_ms()) {
        insert_webhook(conn, &event, no_webhook)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_call_fails_alone_and_the_connection_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite3")).unwrap();
        store.migrate().await.unwrap();
        let failed = store
            .run(StoreOp::Write("test"), |conn| -> Result<(), SettleError> {
                // Mid-transaction: the unwinding rolls it back.
                let tx = conn.transaction().map_err(db)?;
                tx.execute_batch("INSERT INTO flagged (kind, payment_id, detail, created_at_ms) VALUES ('t', 'p', 'd', 1)")
                    .map_err(db)?;
                panic!("a bug in a store call");
            })
            .await;
        assert!(
            matches!(&failed, Err(SettleError::Unavailable(m)) if m.contains("panicked")),
            "{failed:?}"
        );
        // The thread and its connection still answer, and nothing of the failed call stayed.
        assert_eq!(store.schema_version().await.unwrap(), Some(SCHEMA_VERSION));
        assert!(store.flagged(10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn calls_run_in_the_order_they_were_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite3")).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let calls: Vec<_> = (0..50)
            .map(|n| {
                let seen = seen.clone();
                store.run(StoreOp::Read("test"), move |_| {
                    seen.lock().unwrap().push(n);
                    Ok(())
                })
            })
            .collect();
        for result in futures_util::future::join_all(calls).await {
            result.unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), (0..50).collect::<Vec<_>>());
    }
}
