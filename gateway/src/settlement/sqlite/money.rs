//! SQLite: the money commit (a movement's transfer, payment rows, refund statuses and webhooks,
//! in the caller's transaction), accounts and the balances recomputed from transfers.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::settlement::{
    AccountBalance, AccountRow, CommitOutcome, MoneyStore, NoWebhook, PaymentRow, SettleError,
    Settlement, SettlementKind,
};
use crate::telemetry::{self, StoreOp};

use super::keys::{adjustment_taken, arbitrate, insert_adjustment};
use super::payments::write_payment;
use super::rows::{payment_from_row, PAYMENT_COLUMNS};
use super::webhooks::enqueue_settlement_webhook;
use super::{currency, db, exec, ms, query_row, SqliteStore};
use crate::settlement::FlagKind;

/// Every account (or only `(merchant, account)`) with its balance and sequence recomputed from
/// the transfers ([`MoneyStore::balances`]).
fn balances_in(
    conn: &Connection,
    only: Option<(&str, &str)>,
) -> Result<Vec<AccountBalance>, SettleError> {
    let (merchant, account) = only.unzip();
    let mut stmt = conn
        .prepare_cached(
            "SELECT a.merchant_id, a.account_id, a.currency, a.credit_limit_minor, \
             a.created_at_ms, a.updated_at_ms, \
             COALESCE((SELECT SUM(CASE 'account:' || a.merchant_id || ':' || a.account_id \
               WHEN t.credit_ledger THEN t.amount_minor WHEN t.debit_ledger THEN -t.amount_minor \
               ELSE 0 END) FROM transfers t WHERE t.merchant_id = a.merchant_id \
               AND t.account_id = a.account_id), 0), \
             COALESCE((SELECT MAX(t.account_seq) FROM transfers t WHERE \
               t.merchant_id = a.merchant_id AND t.account_id = a.account_id), 0) \
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

/// Inserts one settlement (its transfer, payment, refund status and webhook) inside the
/// caller's transaction.
pub(super) fn settle_in(
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
    // An adjustment's key, held by another adjustment: the first one is the answer.
    if let Some(a) = &s.adjustment {
        if let Some(taken) = adjustment_taken(tx, &s.payment_id, a)? {
            return Ok(taken.into());
        }
    }
    let inserted = exec(
        tx,
        "INSERT INTO transfers (payment_id, kind, sequence, debit_ledger, credit_ledger, \
             amount_minor, currency, merchant_id, account_id, account_seq, channel_id, \
             channel_txn_id, fee_minor, settled_at_ms, content_hash) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
             ON CONFLICT DO NOTHING",
        params![
            s.payment_id,
            s.kind.as_str(),
            s.sequence,
            s.debit_ledger(),
            s.credit_ledger(),
            s.amount_minor,
            s.currency.code(),
            s.merchant_id,
            s.account_id,
            s.account_seq.map(ms),
            s.channel_id,
            s.channel_txn_id,
            s.channel_fee_minor,
            ms(s.settled_at_ms),
            hash
        ],
    )
    .map_err(db)?;
    if inserted == 0 {
        let stored: Option<String> = query_row(
            tx,
            "SELECT content_hash FROM transfers WHERE payment_id = ?1 \
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
                 VALUES (?4, ?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![
                    s.payment_id,
                    format!("account sequence {account_seq} is already used: the balance store rolled back"),
                    ms(telemetry::now_ms()),
                    FlagKind::SequenceConflict.as_str()
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
                 VALUES (?4, ?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![
                    s.payment_id,
                    format!(
                        "{} #{}: stored {stored}, offered {hash}",
                        s.kind, s.sequence
                    ),
                    ms(telemetry::now_ms()),
                    FlagKind::SettlementConflict.as_str()
                ],
            )
            .map_err(db)?;
            return Ok(CommitOutcome::Conflict {
                stored_hash: stored,
            });
        }
    }
    if let Some(a) = &s.adjustment {
        insert_adjustment(tx, &s.payment_id, a)?;
    }
    if let Some(payment) = &s.payment {
        let written = write_payment(tx, payment, no_webhook).map_err(db)?;
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
                 VALUES (?4, ?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![
                    payment.id,
                    format!(
                        "order id {} is held by another live payment",
                        payment.merchant_order_id
                    ),
                    ms(telemetry::now_ms()),
                    FlagKind::OrderIdConflict.as_str()
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
                "SELECT channel_id, channel_txn_id FROM transfers WHERE payment_id = ?1 \
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
                    // A transfer's legs (−amount on the debit ledger, +amount on the credit
                    // ledger) cancel unless the row is malformed (a non-positive amount, one
                    // ledger on both sides: what the schema's checks forbid), shown as the
                    // amount itself.
                    "SELECT payment_id, kind, sequence, CASE WHEN amount_minor > 0 \
                     AND credit_ledger <> debit_ledger THEN 0 ELSE amount_minor END \
                     FROM transfers ORDER BY payment_id, kind, sequence",
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
