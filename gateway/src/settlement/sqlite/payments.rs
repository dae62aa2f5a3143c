//! SQLite: payments, their attempts and status events, final statuses.

use std::sync::LazyLock;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::settlement::{
    AttemptOutcome, AttemptRow, AttemptUpdate, IntentOutcome, NoWebhook, PaymentRow, PaymentStore,
    SettleError, StatusChange,
};
use crate::telemetry::StoreOp;

use super::keys::arbitrate;
use super::rows::{payment_from_row, PAYMENT_COLUMNS};
use super::webhooks::enqueue_status_webhook;
use super::{db, exec, ms, query_row, SqliteStore};

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

/// Records that a payment reached `status` (once per status), for a merchant whose history
/// something reads ([`NoWebhook::keeps_history`]).
fn record_event(
    conn: &Connection,
    p: (&str, &str),
    status: &str,
    at_ms: u64,
    history: &NoWebhook,
) -> rusqlite::Result<()> {
    let (id, merchant) = p;
    if !history.keeps_history(merchant) {
        return Ok(());
    }
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
pub(super) fn write_payment(
    conn: &Connection,
    p: &PaymentRow,
    history: &NoWebhook,
) -> rusqlite::Result<bool> {
    // Built once: every payment runs it (the statement cache finds it by its text).
    static INSERT_PAYMENT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO payments ({PAYMENT_COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
             ?19, ?20) ON CONFLICT DO NOTHING"
        )
    });
    let inserted = exec(
        conn,
        &INSERT_PAYMENT,
        params![
            p.id,
            p.merchant_id,
            p.account_id,
            p.scope_tag,
            p.merchant_order_id,
            p.amount_minor,
            p.currency.code(),
            p.method.as_str(),
            p.purpose.as_str(),
            p.status.as_str(),
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
        let key = (p.id.as_str(), p.merchant_id.as_str());
        record_event(conn, key, p.status.as_str(), p.updated_at_ms, history)?;
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
        params![p.id, p.status.as_str(), p.held_minor, ms(p.updated_at_ms)],
    )?;
    if updated == 1 {
        let key = (p.id.as_str(), p.merchant_id.as_str());
        record_event(conn, key, p.status.as_str(), p.updated_at_ms, history)?;
    }
    Ok(updated == 1)
}

/// Records an intent inside the caller's transaction ([`PaymentStore::record_intent`]).
pub(super) fn intent_in(
    tx: &Connection,
    p: &PaymentRow,
    first_attempt: Option<&AttemptRow>,
    history: &NoWebhook,
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
    // The attempt first: when it clashes (refused `Invalid`), nothing has been written, so a
    // group commit needs no savepoint per intent (each would copy every page it touches).
    if let Some(a) = first_attempt {
        insert_attempt(tx, a)?;
    }
    write_payment(tx, p, history).map_err(db)?;
    Ok(IntentOutcome::Inserted)
}

/// Applies an attempt's outcome; a `succeeded` attempt keeps its outcome, and `accepted` only
/// follows the `unknown` recorded before the call or itself (the accepted outcome rides a later commit
/// than the answer: an outcome that overtook it stands). `false` when no such attempt can
/// take it.
pub(super) fn update_attempt_in(conn: &Connection, u: &AttemptUpdate) -> rusqlite::Result<bool> {
    let updated = conn
        .prepare_cached(
            "UPDATE attempts SET outcome = ?3, \
             latency_ms = COALESCE(?4, latency_ms), action = COALESCE(?5, action), \
             channel_txn_id = COALESCE(?6, channel_txn_id), updated_at_ms = ?7 \
             WHERE payment_id = ?1 AND attempt = ?2 AND outcome <> 'succeeded' \
             AND (?3 <> 'accepted' OR outcome IN ('unknown', 'accepted'))",
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
        let history = self.no_webhook.clone();
        self.run(StoreOp::Write("record_intent"), move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let outcome = intent_in(&tx, &p, first_attempt.as_ref(), &history)?;
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
                    params![
                        change.payment_id,
                        change.status.as_str(),
                        ms(change.updated_at_ms)
                    ],
                )
                .map_err(db)?;
            if updated == 1 {
                let merchant: String = query_row(
                    &tx,
                    "SELECT merchant_id FROM payments WHERE id = ?1",
                    [&change.payment_id],
                    |r| r.get(0),
                )
                .map_err(db)?;
                record_event(
                    &tx,
                    (&change.payment_id, &merchant),
                    change.status.as_str(),
                    change.updated_at_ms,
                    &no_webhook,
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
