//! Recovery and rebuild.
//!
//! - **Recovery** re-drives everything the balance store did that the settlement store may
//!   not have: captures and adjustments whose commit failed or was cut short by a crash,
//!   intents, and final statuses (cancel, expiry). It runs at start (everything) and
//!   periodically (records older than `store.recovery_min_age_ms`, so it never races the
//!   request that wrote them). Re-driving is safe: a settlement already committed is
//!   recognized by its content hash, an intent by its id.
//! - **Rebuild** loads balances, sequences and live holds from the settlement store into the
//!   balance store: at start when the balance store is empty (a fresh in-process store, a
//!   flushed or replaced Redis), and on demand (`gateway rebuild-balances`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::settler::{SettleFailure, Settler};
use super::{
    CommitOutcome, IntentOutcome, KeyHolder, PendingRecord, RefundRecorded, SettleError,
    SettlementStore,
};
use crate::ids::{AccountId, MerchantId, PaymentId, ScopeTag};
use crate::periodic::spawn_periodic;
use crate::preauth::{
    AccountKey, AccountRebuild, BalanceStore, KeyRecord, KeyRestore, PaymentDoc, PaymentRecord,
    PaymentStatus, RefundUnwind, SettledMark, StoreError, StoredOutcome, Unwind,
    RELEASED_BY_CHANNEL_MS,
};
use crate::telemetry;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    pub settled: usize,
    pub intents: usize,
    pub statuses: usize,
    pub skipped_young: usize,
    pub failed: usize,
    /// Payments the store refused to create (it held their key or order id), unwound in the
    /// balance store.
    pub unwound: usize,
    /// The page read ended a full pass over the balance store's outbox.
    pub complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Balances(#[from] StoreError),
    #[error(transparent)]
    Store(#[from] SettleError),
    /// The account kept moving (or had movements on their way to the store) through every
    /// attempt of its rebuild: nothing was loaded; try again.
    #[error("account {0} is busy: not rebuilt (movements on their way to the store); try again")]
    Busy(String),
}

/// One pass over (a page of) the balance store's outbox.
pub async fn recover_once(
    settler: &Settler,
    min_age_ms: u64,
    budget: usize,
) -> Result<RecoveryReport, RecoveryError> {
    let page = settler.balances.unsettled(budget).await?;
    let mut entries = page.entries;
    // Creations before status changes, so a payment's intent reaches the store before its
    // final status does.
    entries.sort_by_key(|e| (e.id.ends_with("#s"), e.at_ms));
    let now = telemetry::now_ms();
    let mut report = RecoveryReport {
        complete: page.complete,
        ..RecoveryReport::default()
    };
    for entry in entries {
        if now.saturating_sub(entry.at_ms) < min_age_ms {
            report.skipped_young += 1;
            continue;
        }
        let mark = SettledMark {
            tag: entry.tag,
            id: entry.id.clone(),
            idempotency_key: entry.idempotency_key.clone(),
        };
        let record: PendingRecord = match serde_json::from_str(&entry.record) {
            Ok(record) => record,
            Err(err) => {
                tracing::error!(id = %entry.id, error = %err, "unreadable pending record; left for a human");
                report.failed += 1;
                continue;
            }
        };
        let result = match record {
            PendingRecord::Settlement(mut settlement) => {
                if settlement.account_id.is_some() && settlement.account_seq.is_none() {
                    settlement.account_seq = Some(entry.seq);
                }
                match settler.settle(settlement, mark).await {
                    Ok(CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted) => {
                        report.settled += 1;
                        Ok(())
                    }
                    // The writer voided it and rebuilt the account (see `void_and_rebuild`).
                    Ok(CommitOutcome::SequenceConflict { .. }) => {
                        report.failed += 1;
                        Ok(())
                    }
                    // Flagged by the store; a human decides. The record stays.
                    Ok(CommitOutcome::Conflict { .. }) => {
                        report.failed += 1;
                        Ok(())
                    }
                    // The store holds the key or the order id: the writer unwound the
                    // payment in the balance store (see `unwind_refused`).
                    Ok(
                        CommitOutcome::Replay(_)
                        | CommitOutcome::IdempotencyConflict(_)
                        | CommitOutcome::DuplicateOrder { .. },
                    ) => {
                        report.unwound += 1;
                        Ok(())
                    }
                    Err(err) => Err(err),
                }
            }
            PendingRecord::Intent(row) => {
                match settler.record_intent(&row, None, Some(mark.clone())).await {
                    Ok(IntentOutcome::Inserted | IntentOutcome::AlreadyRecorded) => {
                        report.intents += 1;
                        Ok(())
                    }
                    // The store holds the key or the order id: the payment never was, for
                    // the store; the balance store lets go of it (its hold, its key).
                    Ok(outcome) => {
                        if let Some(refusal) = Refusal::of_intent(&outcome) {
                            unwind_refused(
                                settler.balances.as_ref(),
                                &row,
                                0,
                                refusal,
                                &mark,
                                settler.idempotency_retention_seconds(),
                            )
                            .await?;
                        }
                        report.unwound += 1;
                        Ok(())
                    }
                    Err(err) => Err(err),
                }
            }
            PendingRecord::Status(change) => settler.apply_status(&change, mark).await.map(|_| {
                report.statuses += 1;
            }),
            PendingRecord::Refund(refund) => {
                settler
                    .record_refund(&refund, mark, false)
                    .await
                    .map(|recorded| match recorded {
                        RefundRecorded::Inserted | RefundRecorded::AlreadyRecorded => {
                            report.intents += 1
                        }
                        RefundRecorded::Conflict | RefundRecorded::Exceeds { .. } => {
                            report.unwound += 1
                        }
                    })
            }
            PendingRecord::RefundStatus(change) => {
                settler.apply_refund_status(&change, mark).await.map(|_| {
                    report.statuses += 1;
                })
            }
        };
        if let Err(err) = result {
            report.failed += 1;
            tracing::warn!(id = %entry.id, error = %err, "recovery could not settle; will retry");
            if matches!(err, SettleFailure::Stream(_) | SettleFailure::Timeout) {
                break; // the store is down or saturated: try again next round
            }
        }
    }
    Ok(report)
}

/// How long past the retention the store keeps a key before the purge clears it.
pub const KEY_PURGE_MARGIN_MS: u64 = 3_600_000;

/// Clears, every `interval`, up to `batch` idempotency keys (payments' and refusals')
/// created before now − retention − [`KEY_PURGE_MARGIN_MS`], under the store's `key_purge`
/// lease (one instance at a time; a lease outlives three intervals, so a dead holder's
/// passes to another).
pub fn spawn_key_purge(
    store: Arc<dyn SettlementStore>,
    interval: Duration,
    batch: usize,
    retention_seconds: u64,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let mut id = [0u8; 8];
    let holder = match getrandom::fill(&mut id) {
        Ok(()) => format!("gateway-{}", hex::encode(id)),
        Err(_) => format!("gateway-{}", std::process::id()),
    };
    let lease_ms = (interval.as_millis() as u64).saturating_mul(3);
    spawn_periodic(interval, shutdown, move || {
        let (store, holder) = (store.clone(), holder.clone());
        async move {
            let now = telemetry::now_ms();
            let before = now
                .saturating_sub(retention_seconds.saturating_mul(1000))
                .saturating_sub(KEY_PURGE_MARGIN_MS);
            match store
                .purge_keys(&holder, now, lease_ms, before, batch)
                .await
            {
                Ok(Some(purged)) if purged > 0 => {
                    tracing::info!(purged, "idempotency keys past the retention purged")
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "key purge failed; will retry"),
            }
        }
    })
}

/// Runs recovery every `interval` until `shutdown`.
pub fn spawn_recovery(
    settler: Arc<Settler>,
    interval: Duration,
    min_age_ms: u64,
    budget: usize,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    spawn_periodic(interval, shutdown, move || {
        let settler = settler.clone();
        async move {
            match recover_once(&settler, min_age_ms, budget).await {
                Ok(report) => {
                    // What this page left in the outbox (young or failed records): the
                    // pipeline's backlog as SREs see it.
                    telemetry::unsettled_records(report.skipped_young + report.failed);
                    if report.settled
                        + report.intents
                        + report.statuses
                        + report.failed
                        + report.unwound
                        > 0
                    {
                        tracing::info!(?report, "recovery pass")
                    }
                }
                Err(err) => tracing::warn!(error = %err, "recovery pass failed; will retry"),
            }
            match settler.store.flagged_count().await {
                Ok(count) => telemetry::flagged_payments(count),
                Err(err) => tracing::debug!(error = %err, "cannot count flagged payments"),
            }
        }
    })
}

fn corrupt(what: String) -> RecoveryError {
    RecoveryError::Store(SettleError::Invalid(what))
}

/// Idempotency records put back per balance-store call (and per store read) in a rebuild.
pub const KEY_RESTORE_PAGE: usize = 500;

/// At most this many pages in one rebuild (50 million keys): a bound, never met in practice.
const KEY_RESTORE_PAGES_MAX: usize = 100_000;

/// Puts back into the balance store the idempotency keys of every payment created within the
/// retention (only those of `scope` when given), each where the key has no record, so a
/// retried request replays its first payment instead of being charged again. Returns how many
/// were put back.
pub async fn restore_keys(
    store: &dyn SettlementStore,
    balances: &dyn BalanceStore,
    scope: Option<ScopeTag>,
    retention_seconds: u64,
) -> Result<u64, RecoveryError> {
    let now_ms = telemetry::now_ms();
    let since_ms = now_ms.saturating_sub(retention_seconds.saturating_mul(1000));
    let scope = scope.map(|tag| tag.to_string());
    let scope = scope.as_deref();
    let record = |tag: &str, key: &str, hash: &str, outcome, created_at_ms| {
        Ok(KeyRestore {
            tag: ScopeTag::parse(tag).ok_or_else(|| corrupt(format!("scope tag {tag}")))?,
            key: key.to_owned(),
            record: KeyRecord::remaining(
                hash.to_owned(),
                outcome,
                created_at_ms,
                retention_seconds,
                now_ms,
            ),
        })
    };
    let payments = restore_pages(
        balances,
        |after: Option<(u64, String)>| async move {
            let after = after.as_ref().map(|(at, id)| (*at, id.as_str()));
            store
                .keyed_payments(since_ms, scope, after, KEY_RESTORE_PAGE)
                .await
        },
        |k: &super::StoredKey| {
            let payment = PaymentId::parse(&k.payment_id)
                .ok_or_else(|| corrupt(format!("payment id {}", k.payment_id)))?;
            record(
                &k.scope_tag,
                &k.idempotency_key,
                &k.request_hash,
                StoredOutcome::Payment(payment),
                k.created_at_ms,
            )
        },
        |k| (k.created_at_ms, k.payment_id.clone()),
    )
    .await?;
    // The refusals' keys too: a retry replays its refusal, not a payment made since.
    let refusals = restore_pages(
        balances,
        |after: Option<(u64, String)>| async move {
            let after = after.as_ref().map(|(at, key)| (*at, key.as_str()));
            store
                .refusals(since_ms, scope, after, KEY_RESTORE_PAGE)
                .await
        },
        |r: &super::RefusalRow| {
            record(
                &r.scope_tag,
                &r.idempotency_key,
                &r.request_hash,
                StoredOutcome::decode(&r.outcome)?,
                r.created_at_ms,
            )
        },
        |r| (r.created_at_ms, r.idempotency_key.clone()),
    )
    .await?;
    Ok(payments + refusals)
}

/// Reads one kind of stored key page by page (`read` from after the cursor it is given: a
/// page's last row's `cursor`), putting each page back into the balance store; bounded by
/// [`KEY_RESTORE_PAGES_MAX`] pages. Returns how many were put back.
async fn restore_pages<T, Read, Page>(
    balances: &dyn BalanceStore,
    read: Read,
    to_restore: impl Fn(&T) -> Result<KeyRestore, RecoveryError>,
    cursor: impl Fn(&T) -> (u64, String),
) -> Result<u64, RecoveryError>
where
    Read: Fn(Option<(u64, String)>) -> Page,
    Page: std::future::Future<Output = Result<Vec<T>, SettleError>>,
{
    let mut after = None;
    let mut restored = 0;
    for _ in 0..KEY_RESTORE_PAGES_MAX {
        let page = read(after.take()).await?;
        let records = page
            .iter()
            .map(&to_restore)
            .collect::<Result<Vec<_>, RecoveryError>>()?;
        restored += balances.restore_keys(&records).await?;
        match page.last() {
            Some(last) if page.len() == KEY_RESTORE_PAGE => after = Some(cursor(last)),
            _ => break,
        }
    }
    Ok(restored)
}

/// Loads every account (balance, sequence, credit limit, live holds) from the settlement store
/// into the balance store, or only `only` when given, with the idempotency keys of the
/// payments made within `retention_seconds` (see [`restore_keys`]). Returns the number of
/// accounts loaded.
pub async fn rebuild_balances(
    store: &dyn SettlementStore,
    balances: &dyn BalanceStore,
    only: Option<(&str, &str)>,
    retention_seconds: u64,
) -> Result<usize, RecoveryError> {
    let accounts: Vec<(String, String)> = match only {
        Some((merchant, account)) => vec![(merchant.to_owned(), account.to_owned())],
        None => store
            .balances(None)
            .await?
            .into_iter()
            .map(|b| (b.account.merchant_id, b.account.account_id))
            .collect(),
    };
    let mut loaded = 0;
    for (merchant, account) in &accounts {
        if rebuild_account(store, balances, merchant, account).await? {
            loaded += 1;
        }
    }
    // The keys after the accounts: a key replays only once its payment's account is there.
    let scope = match only {
        Some((merchant, account)) => Some(ScopeTag::account(
            &MerchantId::parse(merchant)
                .map_err(|e| corrupt(format!("merchant id {merchant}: {e}")))?,
            &AccountId::parse(account)
                .map_err(|e| corrupt(format!("account id {account}: {e}")))?,
        )),
        None => None,
    };
    let restored = restore_keys(store, balances, scope, retention_seconds).await?;
    if restored > 0 {
        tracing::info!(
            restored,
            "idempotency keys put back from the settlement store"
        );
    }
    Ok(loaded)
}

/// Why the store refused to create a payment, as the unwinding needs it.
#[derive(Debug, Clone, Copy)]
pub enum Refusal<'a> {
    /// Its key is held by this payment, made by the same request.
    Replay(&'a KeyHolder),
    /// Its key is held by this payment, made by another request.
    IdempotencyConflict(&'a KeyHolder),
    /// Its order id is held by this live payment.
    DuplicateOrder(&'a str),
}

impl<'a> Refusal<'a> {
    pub fn of_commit(outcome: &'a CommitOutcome) -> Option<Self> {
        match outcome {
            CommitOutcome::Replay(holder) => Some(Refusal::Replay(holder)),
            CommitOutcome::IdempotencyConflict(holder) => {
                Some(Refusal::IdempotencyConflict(holder))
            }
            CommitOutcome::DuplicateOrder { payment_id } => {
                Some(Refusal::DuplicateOrder(payment_id))
            }
            CommitOutcome::Inserted
            | CommitOutcome::AlreadyCommitted
            | CommitOutcome::Conflict { .. }
            | CommitOutcome::SequenceConflict { .. } => None,
        }
    }

    pub fn of_intent(outcome: &'a IntentOutcome) -> Option<Self> {
        match outcome {
            IntentOutcome::Replay(holder) => Some(Refusal::Replay(holder)),
            IntentOutcome::IdempotencyConflict(holder) => {
                Some(Refusal::IdempotencyConflict(holder))
            }
            IntentOutcome::DuplicateOrder(payment_id) => Some(Refusal::DuplicateOrder(payment_id)),
            IntentOutcome::Inserted | IntentOutcome::AlreadyRecorded => None,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Replay(_) => "replay",
            Refusal::IdempotencyConflict(_) => "idempotency_conflict",
            Refusal::DuplicateOrder(_) => "duplicate_order",
        }
    }

    /// The payment the store holds instead.
    pub fn holder(self) -> &'a str {
        match self {
            Refusal::Replay(h) | Refusal::IdempotencyConflict(h) => &h.payment_id,
            Refusal::DuplicateOrder(id) => id,
        }
    }
}

/// The store refused to create `payment` (the balance store had forgotten its key or its
/// order id): undoes what the balance store did for it (`captured_minor` is what its creation
/// took from the balance at once) and makes the key answer as the store says — the holder's
/// payment, for what is left of its retention — or, for a taken order id, forgets the key.
/// `false` when there was nothing left to undo (already unwound, or never pending).
pub async fn unwind_refused(
    balances: &dyn BalanceStore,
    payment: &super::PaymentRow,
    captured_minor: i64,
    refusal: Refusal<'_>,
    mark: &SettledMark,
    retention_seconds: u64,
) -> Result<bool, StoreError> {
    telemetry::store_refused_payment(refusal.label());
    let key_record = match refusal {
        Refusal::Replay(holder) | Refusal::IdempotencyConflict(holder) => {
            let first = PaymentId::parse(&holder.payment_id).ok_or_else(|| {
                StoreError::Corrupt(format!("stored payment id {}", holder.payment_id))
            })?;
            Some(KeyRecord::remaining(
                holder.request_hash.clone(),
                StoredOutcome::Payment(first),
                holder.created_at_ms,
                retention_seconds,
                telemetry::now_ms(),
            ))
        }
        Refusal::DuplicateOrder(_) => None,
    };
    let undone = balances
        .unwind(&Unwind {
            mark: mark.clone(),
            order_id: payment.merchant_order_id.clone(),
            captured_minor,
            key_record,
        })
        .await?;
    tracing::warn!(
        payment_id = %payment.id,
        holder = refusal.holder(),
        reason = refusal.label(),
        undone,
        "the settlement store refused a payment the balance store had forgotten: unwound"
    );
    Ok(undone)
}

/// A refund the store refused to record (another refund under its number, or above what is
/// left: the balance store had lost the payment's refunds, flagged by the store): undone in
/// the balance store — its reservation, a top-up refund's hold and its key gone — and the
/// payment's refund numbering and totals set to the store's. `false` when there was nothing
/// left to undo.
pub async fn unwind_refused_refund(
    store: &dyn SettlementStore,
    balances: &dyn BalanceStore,
    refund: &super::RefundRow,
    idempotency_key: &str,
) -> Result<bool, RecoveryError> {
    let payment = PaymentId::parse(&refund.payment_id).ok_or_else(|| {
        corrupt(format!(
            "refund {} of payment {}",
            refund.refund_id, refund.payment_id
        ))
    })?;
    let totals = super::RefundTotals::of(&store.refunds(&refund.payment_id).await?);
    let undone = balances
        .unwind_refund(&RefundUnwind {
            payment,
            refund_id: refund.refund_id.clone(),
            idempotency_key: idempotency_key.to_owned(),
            count: totals.count,
            reserved_minor: totals.reserved_minor,
            succeeded_minor: totals.succeeded_minor,
        })
        .await?;
    tracing::warn!(
        refund_id = %refund.refund_id,
        payment_id = %refund.payment_id,
        undone,
        ?totals,
        "the settlement store refused a refund the balance store had reserved: unwound, refund state reset to the store's"
    );
    Ok(undone)
}

/// How many times one account's rebuild reads again when the account moved meanwhile, and how
/// long it waits between two reads: about half a second in all, for the movements on their
/// way to the store to commit.
const REBUILD_ATTEMPTS: usize = 25;
const REBUILD_RETRY_MS: u64 = 20;

/// Loads one account from the settlement store into the balance store, fenced against live
/// traffic: the account as the balance store has it is read first, then the store's balance,
/// sequence and live holds in one snapshot, and the balance store takes them only if nothing
/// of the account is on its way to the store and the account has not moved since (else read
/// again, bounded). `false` when the store has no such account.
async fn rebuild_account(
    store: &dyn SettlementStore,
    balances: &dyn BalanceStore,
    merchant: &str,
    account: &str,
) -> Result<bool, RecoveryError> {
    let key = AccountKey::new(
        MerchantId::parse(merchant).map_err(|e| corrupt(format!("merchant id {merchant}: {e}")))?,
        AccountId::parse(account).map_err(|e| corrupt(format!("account id {account}: {e}")))?,
    );
    for attempt in 0..REBUILD_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(REBUILD_RETRY_MS)).await;
        }
        let expect = balances.rebuild_guard(&key).await?;
        let Some((balance, rows)) = store.account_state(merchant, account).await? else {
            return Ok(false);
        };
        let mut holds = Vec::with_capacity(rows.len());
        let mut expiries = Vec::with_capacity(rows.len());
        for row in rows {
            let doc: PaymentDoc = serde_json::from_str(&row.doc)
                .map_err(|e| corrupt(format!("payment {} document: {e}", row.id)))?;
            if PaymentId::parse(&doc.id).is_none() {
                return Err(corrupt(format!("payment id {}", doc.id)));
            }
            // A payment's hold (a supplier charge's) is released by the channel's word only.
            expiries.push(RELEASED_BY_CHANNEL_MS);
            holds.push(PaymentRecord {
                doc,
                status: PaymentStatus::Pending,
                held_minor: row.held_minor,
            });
        }
        let a = &balance.account;
        let loaded = balances
            .rebuild_account(&AccountRebuild {
                key: key.clone(),
                currency: a.currency,
                balance: balance.balance_minor,
                credit_limit: a.credit_limit_minor,
                seq: balance.seq,
                created_at_ms: a.created_at_ms,
                holds,
                hold_expiries_ms: expiries,
                expect,
            })
            .await?;
        if loaded {
            return Ok(true);
        }
    }
    Err(RecoveryError::Busy(format!("{merchant}/{account}")))
}

/// The balance store rolled back under this movement (its account sequence number is taken in
/// the settlement store): forget the movement there and reload the account from the settlement
/// store, so the account is exact again and the client may retry with the same key.
pub async fn void_and_rebuild(
    store: &dyn SettlementStore,
    balances: &dyn BalanceStore,
    settlement: &super::Settlement,
    mark: &SettledMark,
    retention_seconds: u64,
) {
    telemetry::account_rebuilt();
    if let Err(err) = balances.void(mark).await {
        tracing::error!(id = %mark.id, error = %err, "cannot void a movement of a rolled-back account; recovery will retry");
        return;
    }
    let Some(account) = settlement.account_id.as_deref() else {
        return;
    };
    match rebuild_balances(
        store,
        balances,
        Some((&settlement.merchant_id, account)),
        retention_seconds,
    )
    .await
    {
        Ok(_) => tracing::warn!(
            merchant = %settlement.merchant_id,
            account,
            "the balance store had rolled back: account rebuilt from the settlement store"
        ),
        Err(err) => {
            tracing::error!(error = %err, account, "account rebuild failed; run `gateway rebuild-balances`")
        }
    }
}
