//! Rebuild and unwinding: the balance store set back to what the settlement store holds.
//!
//! - **Rebuild** loads balances, sequences, live holds and idempotency keys from the settlement
//!   store into the balance store: at start when the balance store is empty (a fresh in-process
//!   store, a flushed or replaced Redis), and on demand (`gateway rebuild-balances`), and for
//!   one account when the balance store rolled back under a movement ([`void_and_rebuild`]).
//! - **Unwinding** undoes in the balance store a payment or a refund the settlement store
//!   refused to record ([`unwind_refused`], [`unwind_refused_refund`]).
//!
//! A leaf of the settlement pipeline: the stream, the settler and recovery call it; it calls
//! only the two stores.

use std::time::Duration;

use super::{CommitOutcome, IntentOutcome, KeyHolder, SettleError, SettlementStore};
use crate::ids::{AccountId, MerchantId, PaymentId, ScopeTag};
use crate::preauth::{
    AccountKey, AccountRebuild, BalanceStore, KeyRecord, KeyRestore, PaymentDoc, PaymentRecord,
    PaymentStatus, RefundUnwind, SettledMark, StoreError, StoredOutcome, Unwind,
    RELEASED_BY_CHANNEL_MS,
};
use crate::telemetry;

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
            order: None,
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
            let mut restore = record(
                &k.scope_tag,
                &k.idempotency_key,
                &k.request_hash,
                StoredOutcome::Payment(payment),
                k.created_at_ms,
            )?;
            // An ended live payment holds its order id for good (a pending one comes back
            // with its hold, order id included).
            if k.status.is_live() && k.status != PaymentStatus::Pending {
                restore.order = Some((k.merchant_order_id.clone(), k.payment_id.clone()));
            }
            Ok(restore)
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
    // And the admin adjustments' keys: a retried adjustment replays, never moves money again.
    let adjustments = restore_pages(
        balances,
        |after: Option<(u64, String)>| async move {
            let after = after.as_ref().map(|(at, key)| (*at, key.as_str()));
            store
                .adjustment_keys(since_ms, scope, after, KEY_RESTORE_PAGE)
                .await
        },
        |a: &super::AdjustmentKey| {
            record(
                &a.scope_tag,
                &a.idempotency_key,
                &a.request_hash,
                StoredOutcome::Adjustment(a.doc.clone()),
                a.created_at_ms,
            )
        },
        |a| (a.created_at_ms, a.idempotency_key.clone()),
    )
    .await?;
    Ok(payments + refusals + adjustments)
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
            // The first payment, or the refusal the key answered first.
            let first = holder
                .outcome()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Some(KeyRecord::remaining(
                holder.request_hash.clone(),
                first,
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

/// The store refused an admin adjustment: another adjustment holds its key (the balance store
/// had forgotten it). What the adjustment moved in the balance store is moved back, at most
/// once, and the key answers the first adjustment's document (same request) or refuses (another
/// request) for what is left of its retention. `false` when there was nothing left to undo.
pub async fn unwind_refused_adjustment(
    balances: &dyn BalanceStore,
    settlement: &super::Settlement,
    refusal: Refusal<'_>,
    mark: &SettledMark,
    retention_seconds: u64,
) -> Result<bool, StoreError> {
    let (Refusal::Replay(holder) | Refusal::IdempotencyConflict(holder)) = refusal else {
        return Ok(false);
    };
    // The first adjustment's document, or the refusal the key answered first.
    let first = holder
        .outcome()
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    // What the adjustment did to the account's balance (its account posting), undone.
    let account = settlement.account_id.as_deref().unwrap_or_default();
    let ledger = super::ledger::account(&settlement.merchant_id, account);
    let moved = settlement
        .postings
        .iter()
        .find(|p| p.ledger == ledger)
        .map_or(0, |p| p.amount_minor);
    telemetry::store_refused_payment(refusal.label());
    let undone = balances
        .unwind(&Unwind {
            mark: mark.clone(),
            order_id: String::new(),
            captured_minor: -moved,
            key_record: Some(KeyRecord::remaining(
                holder.request_hash.clone(),
                first,
                holder.created_at_ms,
                retention_seconds,
                telemetry::now_ms(),
            )),
        })
        .await?;
    tracing::warn!(
        adjustment_id = %settlement.payment_id,
        holder = %holder.payment_id,
        reason = refusal.label(),
        undone,
        "the settlement store refused an adjustment the balance store had forgotten: unwound"
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

/// How long one attempt fences the account off new movements (each attempt renews it; a
/// rebuild that gives up leaves it to lapse within this).
const REBUILD_FENCE_MS: u64 = 1_000;

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
        let fence_until_ms = telemetry::now_ms() + REBUILD_FENCE_MS;
        let expect = balances.rebuild_guard(&key, fence_until_ms).await?;
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
                accepted: None,
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
