//! PostgreSQL: the money commit (a movement's transfer, payment rows, refund statuses
//! and webhooks, pipelined in the caller's transaction), accounts and the balances recomputed
//! from transfers.

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres::{self, types::ToSql};
use deadpool_postgres::{GenericClient, Transaction};
use futures_util::future::join_all;

use crate::settlement::{
    AccountBalance, AccountRow, CommitOutcome, MoneyStore, NoWebhook, PaymentRow, SettleError,
    Settlement, SettlementKind,
};
use crate::telemetry::{self, StoreOp};
use crate::webhooks::events;

use super::flags::flag;
use super::payments::{
    check_payment_text, checks_i32, payment_from_row, write_payment, PaymentColumns,
    PAYMENT_COLUMNS,
};
use super::webhooks::insert_webhooks;
use super::{get, get_currency, get_u32, get_u64, invalid, ms, no_nul, PostgresStore};
use crate::settlement::FlagKind;

/// A movement's transfer (15 parameters; as `transfer_params` orders them).
const INSERT_TRANSFER: &str = "INSERT INTO transfers (payment_id, kind, sequence, \
    debit_ledger, credit_ledger, amount_minor, currency, merchant_id, account_id, account_seq, \
    channel_id, channel_txn_id, fee_minor, settled_at_ms, content_hash) VALUES \
    ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) ON CONFLICT DO NOTHING";

/// `INSERT_TRANSFER` for a batch's other settlements in one statement (at most one per
/// movement key: which of two twins went in is then clear): per settlement, in the order given,
/// whether its transfer was inserted (not when its key or its account sequence is taken, also
/// by one earlier in the statement). Rows go in in the order given (the batch's payment id
/// order, the lock order every batch keeps).
const INSERT_TRANSFERS: &str = "WITH i AS (SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], \
    $3::TEXT[], $4::INTEGER[], $5::TEXT[], $6::TEXT[], $7::BIGINT[], $8::TEXT[], $9::TEXT[], \
    $10::BIGINT[], $11::TEXT[], $12::TEXT[], $13::BIGINT[], $14::BIGINT[], $15::TEXT[]) \
    WITH ORDINALITY AS i(payment_id, currency, kind, sequence, debit_ledger, credit_ledger, \
    amount_minor, merchant_id, account_id, account_seq, channel_id, channel_txn_id, \
    fee_minor, settled_at_ms, content_hash, n)), \
    ins AS (INSERT INTO transfers (payment_id, kind, sequence, debit_ledger, credit_ledger, \
    amount_minor, currency, merchant_id, account_id, account_seq, channel_id, channel_txn_id, \
    fee_minor, settled_at_ms, content_hash) SELECT payment_id, kind, sequence, debit_ledger, \
    credit_ledger, amount_minor, currency, merchant_id, account_id, account_seq, channel_id, \
    channel_txn_id, fee_minor, settled_at_ms, content_hash FROM i ORDER BY n \
    ON CONFLICT DO NOTHING RETURNING payment_id, kind, sequence) \
    SELECT EXISTS (SELECT 1 FROM ins WHERE ins.payment_id = i.payment_id \
    AND ins.kind = i.kind AND ins.sequence = i.sequence) FROM i ORDER BY n";

/// Every settlement of a batch that creates its payment (`Settlement::creates_payment`: the
/// balance payments), in one statement however many there are (arrays, `UNNEST`): each payment
/// row (with its first event when the merchant's history is kept) is inserted unless its id,
/// idempotency key (by a payment or a kept refusal) or live order id is taken, and its
/// transfer only if the row was: the store never holds such a movement without its payment.
/// One row back per input, in input order: (payment inserted, transfer inserted). Rows are
/// inserted in payment id order (the lock order every batch keeps).
const INSERT_CREATING_SETTLEMENTS: &str = concat!(
    "WITH i AS (SELECT * FROM UNNEST(",
    unnest_payment_types!(),
    ", $22::TEXT[], $23::INTEGER[], $24::TEXT[], $25::TEXT[], $26::BIGINT[], $27::TEXT[], \
    $28::TEXT[], $29::BIGINT[], $30::TEXT[], $31::TEXT[], $32::BIGINT[], $33::BIGINT[], \
    $34::TEXT[]) WITH ORDINALITY AS i(",
    unnest_payment_names!(),
    ", kind, sequence, debit_ledger, credit_ledger, t_amount, t_merchant, t_account, \
    account_seq, channel_id, channel_txn_id, fee_minor, settled_at_ms, content_hash, n)), ",
    insert_unnested_payments!(),
    ", tr AS (INSERT INTO transfers (payment_id, kind, sequence, debit_ledger, credit_ledger, \
    amount_minor, currency, merchant_id, account_id, account_seq, channel_id, channel_txn_id, \
    fee_minor, settled_at_ms, content_hash) SELECT id, kind, sequence, debit_ledger, \
    credit_ledger, t_amount, currency, t_merchant, t_account, account_seq, channel_id, \
    channel_txn_id, fee_minor, settled_at_ms, content_hash FROM i \
    WHERE i.id IN (SELECT id FROM pay) ORDER BY id COLLATE \"C\" \
    ON CONFLICT DO NOTHING RETURNING payment_id) \
    SELECT i.id IN (SELECT id FROM pay), i.id IN (SELECT payment_id FROM tr) FROM i ORDER BY n"
);

const STORED_HASH: &str = "SELECT content_hash FROM transfers \
    WHERE payment_id = $1 AND kind = $2 AND sequence = $3";

/// What PostgreSQL's column types need beyond [`Settlement::check`].
pub(super) fn check_for_postgres(s: &Settlement) -> Result<i32, SettleError> {
    let sequence = i32::try_from(s.sequence)
        .map_err(|_| invalid(&s.payment_id, "sequence exceeds the store's INTEGER range"))?;
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

/// Runs `INSERT_TRANSFER` (prepared as `insert`) for `s`, numbered `sequence`, hashed
/// `hash`: the rows inserted (0 when its key or its account sequence is taken).
async fn insert_settlement(
    tx: &Transaction<'_>,
    insert: &tokio_postgres::Statement,
    s: &Settlement,
    sequence: i32,
    hash: &str,
) -> Result<u64, tokio_postgres::Error> {
    let (kind, debit, credit, currency) = (
        s.kind.as_str(),
        s.debit_ledger(),
        s.credit_ledger(),
        s.currency.code(),
    );
    tx.execute(
        insert,
        &[
            &s.payment_id,
            &kind,
            &sequence,
            &debit,
            &credit,
            &s.amount_minor,
            &currency,
            &s.merchant_id,
            &s.account_id,
            &s.account_seq.map(ms),
            &s.channel_id,
            &s.channel_txn_id,
            &s.channel_fee_minor,
            &ms(s.settled_at_ms),
            &hash,
        ],
    )
    .await
}

/// Runs `INSERT_TRANSFERS` for `items` (settlement, its sequence, its hash): per item, in order,
/// whether its transfer was inserted. Keys must be distinct (the caller sends twins alone).
async fn insert_transfers(
    tx: &Transaction<'_>,
    items: &[(&Settlement, i32, &str)],
) -> Result<Vec<bool>, tokio_postgres::Error> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let payment_id: Vec<&str> = items.iter().map(|(s, ..)| s.payment_id.as_str()).collect();
    let currency: Vec<&str> = items.iter().map(|(s, ..)| s.currency.code()).collect();
    let transfers = TransferColumns::of(items.iter().copied());
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&payment_id, &currency];
    params.extend(transfers.params());
    let stmt = tx.prepare_cached(INSERT_TRANSFERS).await?;
    let rows = tx.query(&stmt, &params).await?;
    rows.iter().map(|r| r.try_get::<_, bool>(0)).collect()
}

/// A batch's transfers as the batch statements take them, one array per column (a transfer's
/// payment id and currency aside: the creating statement takes them from the payment's row):
/// kind, sequence, debit and credit ledgers, amount, merchant, account, account sequence,
/// channel, channel transaction, fee, settled at, content hash.
struct TransferColumns<'a> {
    kind: Vec<&'a str>,
    sequence: Vec<i32>,
    debit: Vec<&'a str>,
    credit: Vec<&'a str>,
    amount: Vec<i64>,
    merchant: Vec<&'a str>,
    account: Vec<Option<&'a str>>,
    account_seq: Vec<Option<i64>>,
    channel: Vec<Option<&'a str>>,
    txn: Vec<Option<&'a str>>,
    fee: Vec<i64>,
    settled: Vec<i64>,
    hash: Vec<&'a str>,
}

impl<'a> TransferColumns<'a> {
    /// From (settlement, its sequence, its content hash) per transfer.
    fn of(items: impl Iterator<Item = (&'a Settlement, i32, &'a str)>) -> Self {
        let items: Vec<_> = items.collect();
        Self {
            kind: items.iter().map(|(s, ..)| s.kind.as_str()).collect(),
            sequence: items.iter().map(|(_, q, _)| *q).collect(),
            debit: items.iter().map(|(s, ..)| s.debit_ledger()).collect(),
            credit: items.iter().map(|(s, ..)| s.credit_ledger()).collect(),
            amount: items.iter().map(|(s, ..)| s.amount_minor).collect(),
            merchant: items.iter().map(|(s, ..)| s.merchant_id.as_str()).collect(),
            account: items
                .iter()
                .map(|(s, ..)| s.account_id.as_deref())
                .collect(),
            account_seq: items.iter().map(|(s, ..)| s.account_seq.map(ms)).collect(),
            channel: items
                .iter()
                .map(|(s, ..)| s.channel_id.as_deref())
                .collect(),
            txn: items
                .iter()
                .map(|(s, ..)| s.channel_txn_id.as_deref())
                .collect(),
            fee: items.iter().map(|(s, ..)| s.channel_fee_minor).collect(),
            settled: items.iter().map(|(s, ..)| ms(s.settled_at_ms)).collect(),
            hash: items.iter().map(|(.., h)| *h).collect(),
        }
    }

    /// The arrays, in the order above.
    fn params(&self) -> [&(dyn ToSql + Sync); 13] {
        [
            &self.kind,
            &self.sequence,
            &self.debit,
            &self.credit,
            &self.amount,
            &self.merchant,
            &self.account,
            &self.account_seq,
            &self.channel,
            &self.txn,
            &self.fee,
            &self.settled,
            &self.hash,
        ]
    }
}

/// A settlement that creates its payment `p`, as `INSERT_CREATING_SETTLEMENTS` takes it.
struct Creating<'a> {
    p: &'a PaymentRow,
    s: &'a Settlement,
    sequence: i32,
    hash: &'a str,
}

/// Runs `INSERT_CREATING_SETTLEMENTS` for `items` (in one statement): per item, in order,
/// (whether its payment was inserted, whether its transfer was).
async fn insert_creating_settlements(
    tx: &Transaction<'_>,
    items: &[Creating<'_>],
    history: &NoWebhook,
) -> Result<Vec<(bool, bool)>, tokio_postgres::Error> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let payments = PaymentColumns::of(items.iter().map(|c| c.p), history);
    let transfers = TransferColumns::of(items.iter().map(|c| (c.s, c.sequence, c.hash)));
    let mut params = payments.params();
    params.extend(transfers.params());
    let stmt = tx.prepare_cached(INSERT_CREATING_SETTLEMENTS).await?;
    let rows = tx.query(&stmt, &params).await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

impl PostgresStore {
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
    /// another, then all webhooks with one statement. The rare conflicts
    /// are explained one by one.
    pub(super) async fn settle_in(
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
        // An adjustment whose key another adjustment holds is refused before its movement
        // (one look-up per adjustment: they are rare). Two racing for one key: the unique
        // index fails the later transaction, and its retry meets the first here.
        let mut taken = Vec::with_capacity(batch.len());
        for s in batch {
            taken.push(match &s.adjustment {
                Some(a) => self.adjustment_taken(tx, &s.payment_id, a).await?,
                None => None,
            });
        }
        let insert = tx.prepare_cached(INSERT_TRANSFER).await.map_err(db)?;
        // Settlements that create their payment (balance payments) go in together, each with
        // its row or not at all (`INSERT_CREATING_SETTLEMENTS`): one statement per batch. A
        // second one for a payment already in that statement (a re-drive beside the first)
        // goes alone below, and finds the first one's movement.
        let mut creating = Vec::new();
        let mut creating_at = vec![None; batch.len()];
        let mut ids = std::collections::HashSet::new();
        for (index, (((s, &sequence), hash), taken)) in batch
            .iter()
            .zip(&sequences)
            .zip(&hashes)
            .zip(&taken)
            .enumerate()
        {
            if let (true, None, Some(p)) = (s.creates_payment(), taken, s.payment.as_ref()) {
                if ids.insert(p.id.as_str()) {
                    creating_at[index] = Some(creating.len());
                    creating.push(Creating {
                        p,
                        s,
                        sequence,
                        hash,
                    });
                }
            }
        }
        // The other settlements (a checkout's success, refunds, late money…) go in together
        // too (`INSERT_TRANSFERS`), pipelined with the batch's creating statement; a twin of
        // one already in it (a re-drive beside the first) goes alone after it and finds the
        // first one's movement.
        let mut keys = std::collections::HashSet::new();
        let mut placed = vec![None; batch.len()];
        let mut transfers = Vec::new();
        for (index, ((s, &sequence), hash)) in batch.iter().zip(&sequences).zip(&hashes).enumerate()
        {
            if taken[index].is_some() || s.creates_payment() {
                continue;
            }
            if keys.insert((s.payment_id.as_str(), s.kind.as_str(), sequence)) {
                placed[index] = Some(transfers.len());
                transfers.push((*s, sequence, hash.as_str()));
            }
        }
        let (created, transferred) = tokio::join!(
            insert_creating_settlements(tx, &creating, &self.no_webhook),
            insert_transfers(tx, &transfers)
        );
        let created = created.map_err(db)?;
        debug_assert_eq!(created.len(), creating.len());
        let transferred = transferred.map_err(db)?;
        debug_assert_eq!(transferred.len(), transfers.len());
        // (payment row inserted, settlement inserted) per settlement.
        let mut inserted = Vec::with_capacity(batch.len());
        for (index, ((s, &sequence), hash)) in batch.iter().zip(&sequences).zip(&hashes).enumerate()
        {
            inserted.push(match (creating_at[index], placed[index]) {
                (Some(at), _) => Ok(created[at]),
                (None, Some(at)) => Ok((false, transferred[at])),
                // Taken, or a twin of one in the creating statement: explained below.
                _ if taken[index].is_some() || s.creates_payment() => Ok((false, false)),
                _ => insert_settlement(tx, &insert, s, sequence, hash)
                    .await
                    .map(|rows| (false, rows == 1)),
            });
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut rows_written = Vec::with_capacity(batch.len());
        for ((((s, &sequence), hash), inserted), taken) in batch
            .iter()
            .zip(&sequences)
            .zip(&hashes)
            .zip(inserted)
            .zip(taken)
        {
            let (paid, settled) = inserted.map_err(db)?;
            if let Some(taken) = taken {
                outcomes.push(taken.into());
                rows_written.push(false);
                continue;
            }
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

        // What follows an inserted settlement: its payment, its refund, its webhook, in one
        // more round trip. The webhook of a refund or of late money without a
        // payment row of its own is made from the payment as stored: those rare ones read it
        // in this round trip and are inserted in a third.
        let mut followers = Vec::new();
        let mut readers = Vec::new();
        let mut webhooks = Vec::new();
        let now_ms = telemetry::now_ms();
        for ((s, outcome), written) in batch.iter().zip(&outcomes).zip(&rows_written) {
            if *outcome == CommitOutcome::Inserted {
                followers.push(self.after_settlement(tx, s, *written));
                if events::needs_stored_payment(s) {
                    readers.push(self.settlement_webhook(tx, s));
                } else {
                    // Nowhere to go: no payload built, nothing written (derived when read).
                    if !s
                        .payment
                        .as_ref()
                        .is_some_and(|p| self.no_webhook.derives_events_of(p))
                    {
                        webhooks.extend(events::for_settlement(s, s.payment.as_ref(), now_ms));
                    }
                }
            }
        }
        // The first poll sends the followers' statements before the readers' (prepared
        // statements are cached after a connection's first batch), as the writes and reads of
        // one follower went before; the order among a batch's own rows is not relied upon.
        let (followed, read, hooked) = tokio::join!(
            join_all(followers),
            join_all(readers),
            insert_webhooks(tx, &webhooks, &self.no_webhook)
        );
        for follower in followed {
            follower?;
        }
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
            flag(tx, FlagKind::SettlementConflict, &s.payment_id, &detail)
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
            let insert = tx.prepare_cached(INSERT_TRANSFER).await.map_err(db)?;
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
        flag(tx, FlagKind::SequenceConflict, &s.payment_id, &detail)
            .await
            .map_err(db)?;
        Ok((CommitOutcome::SequenceConflict { account_seq }, false))
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
            if !write_payment(tx, payment, &self.no_webhook)
                .await
                .map_err(db)?
            {
                let detail = format!(
                    "order id {} is held by another live payment",
                    payment.merchant_order_id
                );
                flag(tx, FlagKind::OrderIdConflict, &payment.id, &detail)
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
        if let Some(a) = &s.adjustment {
            self.insert_adjustment(tx, &s.payment_id, a).await?;
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
                 COALESCE((SELECT SUM(CASE 'account:' || a.merchant_id || ':' || a.account_id \
                   WHEN t.credit_ledger THEN t.amount_minor \
                   WHEN t.debit_ledger THEN -t.amount_minor ELSE 0 END) FROM transfers t \
                   WHERE t.merchant_id = a.merchant_id AND t.account_id = a.account_id), \
                   0)::BIGINT, \
                 COALESCE((SELECT MAX(t.account_seq) FROM transfers t WHERE \
                   t.merchant_id = a.merchant_id AND t.account_id = a.account_id), 0)::BIGINT \
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

    async fn postings_sum_inner(&self) -> Result<Vec<(String, String, u32, i64)>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let rows = client
            .query(
                // As on SQLite: 0 for every well-formed transfer, the amount for a malformed one.
                "SELECT payment_id, kind, sequence, CASE WHEN amount_minor > 0 \
                 AND credit_ledger <> debit_ledger THEN 0 ELSE amount_minor END FROM transfers \
                 ORDER BY payment_id COLLATE \"C\", kind COLLATE \"C\", sequence",
                &[],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| Ok((get(r, 0)?, get(r, 1)?, get_u32(r, 2)?, get(r, 3)?)))
            .collect()
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
                    "SELECT channel_id, channel_txn_id FROM transfers WHERE payment_id = $1 \
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
