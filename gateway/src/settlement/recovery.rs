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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::settler::{SettleFailure, Settler};
use super::{CommitOutcome, IntentOutcome, PendingRecord, SettleError, SettlementStore};
use crate::ids::{AccountId, MerchantId, PaymentId};
use crate::periodic::spawn_periodic;
use crate::preauth::{
    AccountKey, AccountRebuild, BalanceStore, PaymentDoc, PaymentRecord, PaymentStatus,
    SettledMark, StoreError,
};
use crate::telemetry;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    pub settled: usize,
    pub intents: usize,
    pub statuses: usize,
    pub skipped_young: usize,
    pub failed: usize,
    /// The page read ended a full pass over the balance store's outbox.
    pub complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Balances(#[from] StoreError),
    #[error(transparent)]
    Store(#[from] SettleError),
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
                    Err(err) => Err(err),
                }
            }
            PendingRecord::Intent(row) => settler.record_intent(&row, None, Some(mark.clone())).await.map(|outcome| {
                match outcome {
                    IntentOutcome::Inserted | IntentOutcome::AlreadyRecorded => report.intents += 1,
                    IntentOutcome::DuplicateOrder(holder) => {
                        tracing::error!(payment_id = %row.id, %holder, "recovered intent collides with a live payment's order id; left for a human");
                        report.failed += 1;
                    }
                }
            }),
            PendingRecord::Status(change) => settler.apply_status(&change, mark).await.map(|_| {
                report.statuses += 1;
            }),
            PendingRecord::Refund(refund) => settler.record_refund(&refund, mark).await.map(|_| {
                report.intents += 1;
            }),
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
                    if report.settled + report.intents + report.statuses + report.failed > 0 {
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

/// Loads every account (balance, sequence, credit limit, live holds) from the settlement store
/// into the balance store, or only `only` when given. Returns the number of accounts loaded.
pub async fn rebuild_balances(
    store: &dyn SettlementStore,
    balances: &dyn BalanceStore,
    only: Option<(&str, &str)>,
) -> Result<usize, RecoveryError> {
    let accounts = store.balances(only).await?;
    let holds = store.live_holds(only).await?;
    let mut holds_by_account: HashMap<(String, String), Vec<super::PaymentRow>> = HashMap::new();
    for hold in holds {
        if let Some(account) = hold.account_id.clone() {
            holds_by_account
                .entry((hold.merchant_id.clone(), account))
                .or_default()
                .push(hold);
        }
    }
    let mut loaded = 0;
    for balance in accounts {
        let a = &balance.account;
        if only.is_some_and(|(m, acc)| m != a.merchant_id || acc != a.account_id) {
            continue;
        }
        let key = AccountKey::new(
            MerchantId::parse(&a.merchant_id)
                .map_err(|e| corrupt(format!("merchant id {}: {e}", a.merchant_id)))?,
            AccountId::parse(&a.account_id)
                .map_err(|e| corrupt(format!("account id {}: {e}", a.account_id)))?,
        );
        let rows = holds_by_account
            .remove(&(a.merchant_id.clone(), a.account_id.clone()))
            .unwrap_or_default();
        let mut holds = Vec::with_capacity(rows.len());
        let mut expiries = Vec::with_capacity(rows.len());
        for row in rows {
            let doc: PaymentDoc = serde_json::from_str(&row.doc)
                .map_err(|e| corrupt(format!("payment {} document: {e}", row.id)))?;
            if PaymentId::parse(&doc.id).is_none() {
                return Err(corrupt(format!("payment id {}", doc.id)));
            }
            expiries.push(row.hold_expires_at_ms.unwrap_or(row.expires_at_ms));
            holds.push(PaymentRecord {
                doc,
                status: PaymentStatus::Pending,
                held_minor: row.held_minor,
            });
        }
        balances
            .rebuild_account(&AccountRebuild {
                key,
                currency: a.currency,
                balance: balance.balance_minor,
                credit_limit: a.credit_limit_minor,
                seq: balance.seq,
                created_at_ms: a.created_at_ms,
                holds,
                hold_expiries_ms: expiries,
            })
            .await?;
        loaded += 1;
    }
    Ok(loaded)
}

/// The balance store rolled back under this movement (its account sequence number is taken in
/// the settlement store): forget the movement there and reload the account from the settlement
/// store, so the account is exact again and the client may retry with the same key.
pub async fn void_and_rebuild(
    store: &dyn SettlementStore,
    balances: &dyn BalanceStore,
    settlement: &super::Settlement,
    mark: &SettledMark,
) {
    telemetry::account_rebuilt();
    if let Err(err) = balances.void(mark).await {
        tracing::error!(id = %mark.id, error = %err, "cannot void a movement of a rolled-back account; recovery will retry");
        return;
    }
    let Some(account) = settlement.account_id.as_deref() else {
        return;
    };
    match rebuild_balances(store, balances, Some((&settlement.merchant_id, account))).await {
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
