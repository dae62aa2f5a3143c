//! Payments as clients read them: from the balance store, or from the settlement store when
//! the balance store lost them (failover, flush, restart), with their attempts, refunds and
//! webhook deliveries.

use serde_json::Value;

use super::resolution::{self, ResolveError};
use super::{Missing, PaymentError};
use crate::ids::{MerchantId, MerchantOrderId, PaymentId};
use crate::preauth::{Method, PaymentDoc, PaymentRecord, Scope, StoreError};
use crate::settlement::{AttemptRow, Flagged, RefundRow};
use crate::state::Core;

/// A payment with what the record knows of it: what `GET /v1/payments/{id}` shows.
#[derive(Debug, Clone)]
pub struct PaymentView {
    pub payment: PaymentRecord,
    pub attempts: Vec<AttemptRow>,
    pub refunds: Vec<RefundRow>,
    /// The webhook deliveries, rendered (`webhooks::render_deliveries`).
    pub webhooks: Value,
}

impl PaymentView {
    /// A payment just created: what is known without reading it back.
    pub fn new(payment: PaymentRecord, attempts: Vec<AttemptRow>, webhooks: Value) -> Self {
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
    }))
}

/// The payment with its attempts, refunds and webhook deliveries (from the settlement store).
pub async fn full(core: &Core, payment: PaymentRecord) -> Result<PaymentView, PaymentError> {
    let attempts = attempts_of(core, &payment).await?;
    let store = &core.settler.store;
    let refunds = store.refunds(&payment.doc.id).await?;
    let webhooks = store.webhook_events(&payment.doc.id).await?;
    Ok(PaymentView {
        payment,
        attempts,
        refunds,
        webhooks: crate::webhooks::render_deliveries(&webhooks),
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
    let payment = match resolution::ensure_payment(core, &pid).await {
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

/// Items flagged for a human, newest first.
pub async fn flagged(core: &Core, limit: usize) -> Result<Vec<Flagged>, PaymentError> {
    Ok(core.settler.store.flagged(limit).await?)
}
