//! Payments as clients read them: from the balance store, or from the settlement store when
//! the balance store lost them (failover, flush, restart), with their attempts, refunds and
//! webhook deliveries.

use super::{Missing, PaymentError, ResolveError};
use crate::ids::{MerchantId, MerchantOrderId, PaymentId};
use crate::preauth::{
    AcceptedAttempt, Method, PaymentDoc, PaymentRecord, PaymentStatus, Scope, StoreError,
};
use crate::settlement::{AttemptOutcome, AttemptRow, Flagged, RefundRow, RefundStatus};
use crate::state::Core;

/// A payment with what the record knows of it: what `GET /v1/payments/{id}` shows.
#[derive(Debug, Clone)]
pub struct PaymentView {
    pub payment: PaymentRecord,
    pub attempts: Vec<AttemptRow>,
    pub refunds: Vec<RefundRow>,
    /// The webhook deliveries (`webhooks::deliveries`).
    pub webhooks: Vec<crate::webhooks::Delivery>,
}

impl PaymentView {
    /// A payment just created: what is known without reading it back.
    pub fn new(
        payment: PaymentRecord,
        attempts: Vec<AttemptRow>,
        webhooks: Vec<crate::webhooks::Delivery>,
    ) -> Self {
        Self {
            payment,
            attempts,
            refunds: Vec::new(),
            webhooks,
        }
    }
}

/// A payment by id for this merchant: malformed or unknown → not found, another merchant's →
/// `OtherMerchant`.
pub async fn owned(
    core: &Core,
    merchant: &MerchantId,
    id: &str,
) -> Result<(PaymentId, PaymentRecord), PaymentError> {
    let not_found = || PaymentError::NotFound(Missing::Payment);
    let id = PaymentId::parse(id).ok_or_else(not_found)?;
    let payment = match core.balances.payment(&id).await? {
        Some(payment) => payment,
        // Redis may have lost it (failover, flush): the settlement store is the record.
        None => stored(core, &id).await?.ok_or_else(not_found)?,
    };
    if payment.doc.merchant_id != merchant.as_str() {
        return Err(PaymentError::OtherMerchant);
    }
    Ok((id, payment))
}

/// A payment from the settlement store, for when the balance store does not know it.
pub async fn stored(core: &Core, id: &PaymentId) -> Result<Option<PaymentRecord>, PaymentError> {
    let Some(row) = core.settler.store.payment(id.as_str()).await? else {
        return Ok(None);
    };
    let doc: PaymentDoc = serde_json::from_str(&row.doc)
        .map_err(|e| StoreError::Corrupt(format!("stored payment {id}: {e}")))?;
    Ok(Some(PaymentRecord {
        doc,
        status: row.status,
        held_minor: row.held_minor,
        accepted: None,
    }))
}

/// The payment with its attempts, refunds and webhook deliveries (from the settlement store).
pub async fn full(core: &Core, payment: PaymentRecord) -> Result<PaymentView, PaymentError> {
    let mut attempts = attempts_of(core, &payment).await?;
    if let Some(accepted) = &payment.accepted {
        with_acceptance(&mut attempts, accepted);
    }
    let store = &core.settler.store;
    let refunds = store.refunds(&payment.doc.id).await?;
    let webhooks = store.webhook_events(&payment.doc.id).await?;
    Ok(PaymentView {
        payment,
        attempts,
        refunds,
        webhooks: crate::webhooks::deliveries(&webhooks),
    })
}

/// A payment of this merchant by id, as `GET` shows it.
pub async fn get(
    core: &Core,
    merchant: &MerchantId,
    id: &str,
) -> Result<PaymentView, PaymentError> {
    let (_, payment) = owned(core, merchant, id).await?;
    full(core, payment).await
}

/// A payment's attempts (from the settlement store; a balance payment has none).
pub async fn attempts_of(
    core: &Core,
    payment: &PaymentRecord,
) -> Result<Vec<AttemptRow>, PaymentError> {
    if payment.doc.method == Method::Balance {
        return Ok(Vec::new());
    }
    Ok(core.settler.store.attempts(&payment.doc.id).await?)
}

/// The live payment holding `order_id` in `scope`: the balance store's index, else the
/// store's (which keeps every live order id).
pub async fn live_by_order(
    core: &Core,
    merchant: &MerchantId,
    scope: &Scope,
    order_id: &MerchantOrderId,
) -> Result<PaymentView, PaymentError> {
    let not_found = || PaymentError::NotFound(Missing::LiveOrder);
    let payment = match core.balances.live_payment_by_order(scope, order_id).await? {
        Some(payment) => payment,
        None => {
            let row = core
                .settler
                .store
                .live_payment_by_order(&scope.tag().to_string(), order_id.as_str())
                .await?
                .ok_or_else(not_found)?;
            let pid = PaymentId::parse(&row.id).ok_or_else(not_found)?;
            stored(core, &pid).await?.ok_or_else(not_found)?
        }
    };
    if payment.doc.merchant_id != merchant.as_str() {
        // A scope is a digest of the merchant: never another's, but never shown if it were.
        return Err(not_found());
    }
    full(core, payment).await
}

/// The first answer under a replayed key: the payment as it stands (from the balance store, or
/// put back there from the settlement store when Redis lost it).
pub async fn replayed(core: &Core, id: &str) -> Result<PaymentView, PaymentError> {
    let missing = || StoreError::Corrupt(format!("replayed payment {id} is missing"));
    let pid = PaymentId::parse(id).ok_or_else(missing)?;
    let payment = match ensure_payment(core, &pid).await {
        Ok(Some(payment)) => payment,
        Ok(None) => stored(core, &pid).await?.ok_or_else(missing)?,
        Err(ResolveError::Balances(err)) => return Err(err.into()),
        Err(ResolveError::Store(err)) => return Err(err.into()),
        Err(err) => {
            tracing::warn!(payment_id = %pid, error = %err, "cannot restore a replayed payment");
            stored(core, &pid).await?.ok_or_else(missing)?
        }
    };
    full(core, payment).await
}

/// The store's attempts with a channel's acceptance the balance store holds and the store
/// may not have committed yet (see [`crate::preauth::BalanceStore::accept`]): it applies to
/// its attempt while that is still `unknown` as recorded before the call; any later outcome
/// the store holds (succeeded, failed, closed) stands.
pub fn with_acceptance(attempts: &mut [AttemptRow], accepted: &AcceptedAttempt) {
    if let Some(row) = attempts
        .iter_mut()
        .find(|row| row.attempt == accepted.attempt && row.outcome == AttemptOutcome::Unknown)
    {
        row.outcome = AttemptOutcome::Accepted;
        row.action.clone_from(&accepted.action);
        row.channel_txn_id.clone_from(&accepted.channel_txn_id);
        row.latency_ms = accepted.latency_ms;
        row.updated_at_ms = accepted.at_ms;
    }
}

/// Items flagged for a human, newest first.
pub async fn flagged(core: &Core, limit: usize) -> Result<Vec<Flagged>, PaymentError> {
    Ok(core.settler.store.flagged(limit).await?)
}

/// The payment as the balance store has it — put back from the settlement store (the system
/// of record) when the balance store lost it (a Redis failover, a restarted in-process
/// sandbox): an account payment comes back with its account (balance, sequence and live holds,
/// if the account is gone too); a payment without a hold comes back on its own, with its
/// refunds' core. `None` when neither store knows it, or when only its hold could be missing
/// (a pending payment holding money whose account the balance store still has: never guessed).
pub async fn ensure_payment(
    core: &Core,
    pid: &PaymentId,
) -> Result<Option<crate::preauth::PaymentRecord>, ResolveError> {
    if let Some(record) = core.balances.payment(pid).await? {
        return Ok(Some(record));
    }
    let store = &core.settler.store;
    let Some(row) = store.payment(pid.as_str()).await? else {
        return Ok(None);
    };
    let doc: crate::preauth::PaymentDoc = serde_json::from_str(&row.doc)
        .map_err(|e| StoreError::Corrupt(format!("stored payment {pid}: {e}")))?;
    let status = row.status;
    if let Some(account) = &doc.account_id {
        let (Ok(merchant), Ok(account_id)) = (
            crate::ids::MerchantId::parse(&doc.merchant_id),
            crate::ids::AccountId::parse(account),
        ) else {
            return Ok(None);
        };
        let key = crate::preauth::AccountKey::new(merchant, account_id);
        if core.balances.read_account(&key, core.op()).await?.is_none() {
            crate::settlement::rebuild::rebuild_balances(
                store.as_ref(),
                core.balances.as_ref(),
                Some((doc.merchant_id.as_str(), account.as_str())),
                core.settler.idempotency_retention_seconds(),
            )
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            if let Some(record) = core.balances.payment(pid).await? {
                return Ok(Some(record));
            }
        }
    }
    if status == PaymentStatus::Pending && row.held_minor > 0 {
        tracing::error!(payment_id = %pid, "a pending payment's hold is missing from the balance store while its account is there; not restored (needs `gateway rebuild-balances`)");
        return Ok(None);
    }
    let refunds = store.refunds(pid.as_str()).await?;
    let live = |r: &&crate::settlement::RefundRow| r.status != RefundStatus::Failed;
    let restore = crate::preauth::RestorePayment {
        record: crate::preauth::PaymentRecord {
            doc,
            status,
            held_minor: 0,
            accepted: None,
        },
        refund_count: refunds.iter().map(|r| r.number).max().unwrap_or(0),
        refunds_reserved: refunds.iter().filter(live).map(|r| r.amount_minor).sum(),
        refunds_succeeded: refunds
            .iter()
            .filter(|r| r.status == RefundStatus::Succeeded)
            .map(|r| r.amount_minor)
            .sum(),
        pending_refunds: refunds
            .iter()
            .filter(|r| r.status == RefundStatus::Pending)
            .map(|r| {
                (
                    r.refund_id.clone(),
                    r.number,
                    r.amount_minor,
                    r.created_at_ms,
                )
            })
            .collect(),
    };
    if core.balances.restore_payment(&restore).await? {
        tracing::warn!(payment_id = %pid, status = %status, "payment missing from the balance store: restored from the settlement store");
    }
    Ok(core.balances.payment(pid).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(attempt: u32, outcome: AttemptOutcome) -> AttemptRow {
        AttemptRow {
            payment_id: "pay_1".into(),
            attempt,
            channel_id: format!("ch{attempt}"),
            channel_order_id: format!("pay_1_{attempt}"),
            outcome,
            latency_ms: None,
            action: None,
            channel_txn_id: None,
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    #[test]
    fn an_acceptance_applies_to_its_attempt_while_the_store_has_it_unknown() {
        let accepted = AcceptedAttempt {
            attempt: 2,
            action: Some("{}".into()),
            channel_txn_id: Some("T".into()),
            latency_ms: Some(9),
            at_ms: 5,
        };
        let mut attempts = vec![
            row(1, AttemptOutcome::Refused),
            row(2, AttemptOutcome::Unknown),
        ];
        with_acceptance(&mut attempts, &accepted);
        assert_eq!(attempts[0], row(1, AttemptOutcome::Refused));
        assert_eq!(
            attempts[1],
            AttemptRow {
                action: Some("{}".into()),
                channel_txn_id: Some("T".into()),
                latency_ms: Some(9),
                updated_at_ms: 5,
                ..row(2, AttemptOutcome::Accepted)
            }
        );
        // What the store holds past it stands: a success, a failure, a close.
        for later in [
            AttemptOutcome::Succeeded,
            AttemptOutcome::Failed,
            AttemptOutcome::Closed,
        ] {
            let mut attempts = vec![row(2, later)];
            with_acceptance(&mut attempts, &accepted);
            assert_eq!(attempts, vec![row(2, later)]);
        }
        // An attempt the store does not list yet: nothing invented.
        let mut attempts = vec![row(1, AttemptOutcome::Unknown)];
        with_acceptance(&mut attempts, &accepted);
        assert_eq!(attempts, vec![row(1, AttemptOutcome::Unknown)]);
    }
}
