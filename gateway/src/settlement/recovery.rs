//! Recovery re-drives everything the balance store did that the settlement store may not
//! have: captures and adjustments whose commit failed or was cut short by a crash, intents, and
//! final statuses (cancel, expiry). It runs at start (everything) and periodically (records
//! older than `store.recovery_min_age_ms`, so it never races the request that wrote them).
//! Re-driving is safe: a settlement already committed is recognized by its content hash, an
//! intent by its id. The periodic key purge runs from here too.
//!
//! Rebuilding the balance store from the settlement store, and unwinding what the store
//! refused, are in [`super::rebuild`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::outbox::OutboxRecord;
use super::rebuild::{unwind_refused, RecoveryError, Refusal};
use super::settler::{SettleFailure, Settler};
use super::{CommitOutcome, IntentOutcome, PendingRecord, RefundRecorded, SettlementStore};
use crate::ids::PaymentId;
use crate::periodic::spawn_periodic;
use crate::preauth::{SettledMark, StoreError, Unsettled};
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
        let record = match full_record(settler, &entry).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                report.failed += 1;
                continue;
            }
            Err(err) => {
                report.failed += 1;
                tracing::warn!(id = %entry.id, error = %err, "cannot read a compact record's payment; will retry");
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

/// The entry's full record: as written, or rebuilt from a compact one and the payment's
/// document in the balance store (see [`super::outbox`]). `None` (logged) when it cannot be
/// read: left for a human.
async fn full_record(
    settler: &Settler,
    entry: &Unsettled,
) -> Result<Option<PendingRecord>, StoreError> {
    let compact = match OutboxRecord::parse(&entry.record) {
        Ok(OutboxRecord::Full(record)) => return Ok(Some(record)),
        Ok(OutboxRecord::Compact(compact)) => compact,
        Err(err) => {
            tracing::error!(id = %entry.id, error = %err, "unreadable pending record; left for a human");
            return Ok(None);
        }
    };
    let payment = match PaymentId::parse(compact.payment_id(&entry.id)) {
        Some(pid) => settler.balances.payment(&pid).await?,
        None => None,
    };
    match payment {
        Some(payment) => Ok(Some(compact.expand(
            &payment.doc,
            entry.tag,
            &entry.idempotency_key,
        ))),
        None => {
            tracing::error!(id = %entry.id, "a compact pending record's payment is missing from the balance store; left for a human");
            Ok(None)
        }
    }
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
