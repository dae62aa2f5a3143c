//! Accounts: created and updated in the balance store and the record, read back (reloaded
//! from the record when Redis lost them), and the admin's manual adjustments.

use serde_json::{json, Value};

use super::{request_hash, Missing, PaymentError, Unavailable};
use crate::ids::{AdjustmentId, IdempotencyKey};
use crate::money::{format_minor, Amount, Currency};
use crate::preauth::{
    AccountKey, AccountSnapshot, AdjustOutcome, AdjustRequest, Direction, IdempotencyClaim,
    SettledMark, StoreError, StoredOutcome, UpsertOutcome,
};
use crate::settlement::rebuild::rebuild_balances;
use crate::settlement::{movements, AccountRow, AdjustmentKey, CommitOutcome, PendingRecord};
use crate::state::Core;
use crate::telemetry;
use crate::time::rfc3339;

/// Whether `PUT` created the account or updated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    Created,
    Updated,
}

/// Creates the account with a zero balance, or updates its credit limit (the currency never
/// changes). The record has the account before the caller hears of it.
pub async fn upsert(
    core: &Core,
    key: &AccountKey,
    currency: Currency,
    credit_limit: i64,
) -> Result<(Upserted, AccountSnapshot), PaymentError> {
    let ctx = core.op();
    let (upserted, snapshot) = match core
        .balances
        .upsert_account(key, currency, credit_limit, ctx)
        .await?
    {
        UpsertOutcome::Created(snapshot) => (Upserted::Created, snapshot),
        UpsertOutcome::Updated(snapshot) => (Upserted::Updated, snapshot),
        UpsertOutcome::CurrencyMismatch(existing) => {
            return Err(PaymentError::InvalidState {
                message: format!("the account exists in {existing}; its currency cannot change"),
                status: None,
            })
        }
        UpsertOutcome::OutOfRange => {
            return Err(PaymentError::Invalid {
                field: "credit_limit",
                message: "makes balance + credit_limit out of range".into(),
            })
        }
    };
    // The account must survive a restart even before money moves: the store has it before
    // the client hears of it (a failure here fails the call; the PUT is safe to retry).
    core.settler
        .store
        .upsert_account(&AccountRow {
            merchant_id: key.merchant.as_str().to_owned(),
            account_id: key.account.as_str().to_owned(),
            currency,
            credit_limit_minor: credit_limit,
            created_at_ms: ctx.now_ms,
            updated_at_ms: ctx.now_ms,
        })
        .await?;
    Ok((upserted, snapshot))
}

/// The account from the balance store; when that store does not know it but the settlement
/// store does (Redis lost it), the account is reloaded from the record first.
pub async fn read(core: &Core, key: &AccountKey) -> Result<Option<AccountSnapshot>, PaymentError> {
    if let Some(snapshot) = core.balances.read_account(key, core.op()).await? {
        return Ok(Some(snapshot));
    }
    if !reload(core, key).await? {
        return Ok(None);
    }
    Ok(core.balances.read_account(key, core.op()).await?)
}

/// Loads one account from the settlement store into the balance store; `false` when the
/// settlement store does not know it either.
pub async fn reload(core: &Core, key: &AccountKey) -> Result<bool, PaymentError> {
    let loaded = rebuild_balances(
        core.settler.store.as_ref(),
        core.balances.as_ref(),
        Some((key.merchant.as_str(), key.account.as_str())),
        core.settler.idempotency_retention_seconds(),
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "cannot reload an account from the settlement store");
        PaymentError::unavailable(Unavailable::SettlementStore, None)
    })?;
    if loaded > 0 {
        tracing::warn!(merchant = %key.merchant, account = %key.account, "account missing from the balance store: reloaded from the settlement store");
    }
    Ok(loaded > 0)
}

/// An admin's adjustment as asked for, checked at the edge (the amount is parsed here: its
/// precision is the account's currency's).
#[derive(Debug, Clone)]
pub struct NewAdjustment<'a> {
    pub key: IdempotencyKey,
    pub account: AccountKey,
    pub direction: Direction,
    pub amount: &'a str,
    pub reason: &'a str,
}

/// An applied adjustment (or the first one under a replayed key): its document and the
/// account as it stands.
#[derive(Debug, Clone)]
pub struct Adjusted {
    pub doc: Value,
    pub account: AccountSnapshot,
}

/// Moves money by hand: a credit, or a debit that never takes `available` below zero.
/// Answered only once its settlement is committed; counted by outcome.
pub async fn adjust(core: &Core, new: NewAdjustment<'_>) -> Result<Adjusted, PaymentError> {
    let key = &new.account;
    let snapshot = read(core, key)
        .await?
        .ok_or(PaymentError::NotFound(Missing::Account))?;
    let currency = snapshot.currency;
    let invalid_amount = |message: String| PaymentError::Invalid {
        field: "amount",
        message,
    };
    let amount = Amount::parse(new.amount, currency).map_err(|e| invalid_amount(e.to_string()))?;
    let max = core
        .config
        .currencies
        .get(&currency)
        .map_or(0, |l| l.max_adjustment_minor);
    if amount.minor() > max {
        return Err(invalid_amount(format!(
            "must be at most {}",
            format_minor(max, currency)
        )));
    }
    let normalized = json!({
        "account_id": key.account.as_str(),
        "merchant_id": key.merchant.as_str(),
        "direction": new.direction,
        "amount": amount.minor(),
        "reason": new.reason,
    });
    // Admission before any money moves: the store must be able to take the settlement.
    // (An adjustment is rare: it does not ask the writer to wait for it.)
    drop(core.settler.admit().map_err(PaymentError::not_admitted)?);
    let now_ms = telemetry::now_ms();
    let adjustment_id = AdjustmentId::generate(key.tag, now_ms);
    let mut template = movements::adjustment(
        key,
        &adjustment_id,
        new.direction,
        amount.minor(),
        currency,
        None,
        now_ms,
    );
    let doc = json!({
        "id": adjustment_id.as_str(),
        "merchant_id": key.merchant.as_str(),
        "account_id": key.account.as_str(),
        "direction": new.direction,
        "amount": format_minor(amount.minor(), currency),
        "currency": currency.code(),
        "reason": new.reason,
        "created_at": rfc3339(now_ms),
    });
    let claim = IdempotencyClaim {
        key: new.key.clone(),
        request_hash: request_hash("adjustment", &normalized),
        retention_seconds: core.config.settings.preauth.idempotency_retention_seconds,
    };
    // The key goes to the store with the movement: a retry Redis forgot replays this one.
    template.adjustment = Some(AdjustmentKey {
        scope_tag: key.tag.to_string(),
        idempotency_key: claim.key.as_str().to_owned(),
        request_hash: claim.request_hash.clone(),
        doc: doc.to_string(),
        created_at_ms: now_ms,
    });
    let request = AdjustRequest {
        idempotency: claim,
        adjustment_id,
        direction: new.direction,
        amount_minor: amount.minor(),
        currency,
        doc: doc.to_string(),
        pending_record: PendingRecord::Settlement(template.clone()).to_json(),
        account: key.clone(),
    };
    let outcome = core.balances.adjust(&request, core.op()).await?;
    let id = request.adjustment_id.as_str();
    let (label, result) = match outcome {
        AdjustOutcome::Applied(snapshot) => {
            let mut settlement = template;
            settlement.account_seq = Some(snapshot.seq);
            let mark = SettledMark {
                tag: key.tag,
                id: id.to_owned(),
                idempotency_key: request.idempotency.key.as_str().to_owned(),
            };
            match core.settler.settle(settlement, mark).await {
                Ok(CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted) => (
                    "applied",
                    Ok(Adjusted {
                        doc,
                        account: snapshot,
                    }),
                ),
                // The store holds the key (Redis forgot it): the writer moved the money back,
                // and the key's first answer is the answer: the first adjustment, or its 402.
                Ok(CommitOutcome::Replay(holder)) => {
                    replay(core, key, currency, holder.outcome()?).await?
                }
                Ok(CommitOutcome::IdempotencyConflict(_)) => (
                    "idempotency_conflict",
                    Err(PaymentError::IdempotencyConflict),
                ),
                Ok(other) => (
                    "unsettled",
                    Err(PaymentError::unavailable(
                        Unavailable::of_commit(&other),
                        Some(id),
                    )),
                ),
                Err(err) => ("unsettled", Err(PaymentError::unsettled(id, &err))),
            }
        }
        AdjustOutcome::Replay(first) => replay(core, key, currency, first).await?,
        AdjustOutcome::InsufficientFunds {
            available,
            shortfall,
        } => {
            // The key's answer, kept in the store too, so its replay survives.
            let refused = StoredOutcome::InsufficientFunds {
                available,
                shortfall,
            };
            super::keep_refusal(core, key.tag, &request.idempotency, refused, now_ms);
            (
                "insufficient_funds",
                Err(PaymentError::InsufficientFunds {
                    available,
                    shortfall,
                    currency,
                }),
            )
        }
        AdjustOutcome::IdempotencyConflict => (
            "idempotency_conflict",
            Err(PaymentError::IdempotencyConflict),
        ),
        AdjustOutcome::IdempotencyInFlight => (
            "idempotency_in_flight",
            Err(PaymentError::IdempotencyInFlight),
        ),
        AdjustOutcome::AccountNotFound => {
            ("not_found", Err(PaymentError::NotFound(Missing::Account)))
        }
        AdjustOutcome::CurrencyMismatch(existing) => (
            "currency_mismatch",
            Err(invalid_amount(format!("the account is in {existing}"))),
        ),
        AdjustOutcome::AccountBusy => (
            "busy",
            Err(PaymentError::unavailable(
                Unavailable::AccountRebuildInProgress,
                None,
            )),
        ),
        AdjustOutcome::OutOfRange => (
            "out_of_range",
            Err(invalid_amount("would take the balance out of range".into())),
        ),
    };
    telemetry::adjustment_outcome(label);
    result
}

/// The first answer under an adjustment's key, replayed (from the balance store's record or
/// the settlement store's), with its metric label: the first adjustment with the account as it
/// is now, or its 402; another kind of request's answer under the key is a conflict.
async fn replay(
    core: &Core,
    key: &AccountKey,
    currency: Currency,
    first: StoredOutcome,
) -> Result<(&'static str, Result<Adjusted, PaymentError>), PaymentError> {
    Ok(match first {
        StoredOutcome::Adjustment(doc) => {
            let doc: Value =
                serde_json::from_str(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let account = core
                .balances
                .read_account(key, core.op())
                .await?
                .ok_or(PaymentError::NotFound(Missing::Account))?;
            ("replayed", Ok(Adjusted { doc, account }))
        }
        StoredOutcome::InsufficientFunds {
            available,
            shortfall,
        } => (
            "insufficient_funds",
            Err(PaymentError::InsufficientFunds {
                available,
                shortfall,
                currency,
            }),
        ),
        StoredOutcome::Payment(_)
        | StoredOutcome::NoChannelAvailable(_)
        | StoredOutcome::Refund(_) => (
            "idempotency_conflict",
            Err(PaymentError::IdempotencyConflict),
        ),
    })
}
