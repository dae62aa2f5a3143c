//! Creating a payment or a top-up: the one atomic balance-store call (idempotency, order id,
//! lazy release, available check, hold or capture), then what must be durable before the
//! client hears back. Two paths, two functions:
//!
//! - `create_balance`: the capture is committed (group commit) with the payment's row, which
//!   carries the key and the request hash: the store decides on them in the same commit;
//! - `create_channel`: the intent and first attempt are recorded, then the attempts
//!   (`checkout`), then the payment as it stands (pending with the channel's action,
//!   succeeded, or no channel available with its hold released).
//!
//! Per balance payment: one balance-store script, one settlement in the next group commit
//! (payment row, settlement, two postings), one mark that lets the key replay.

use serde_json::{Map, Value};

use super::checkout::{self, Reserved, Route, Routed};
use super::resolution;
use super::view::{self, PaymentView};
use super::{request_hash, Missing, PaymentError, Unavailable};
use crate::config::Merchant;
use crate::ids::{AccountId, IdempotencyKey, MerchantOrderId, PaymentId, ScopeTag};
use crate::money::{Amount, Currency};
use crate::preauth::{
    AuthorizeOutcome, AuthorizeRequest, HoldSpec, IdempotencyClaim, Method, PaymentDoc,
    PaymentRecord, PaymentStatus, Purpose, Scope, SettledMark, StoredOutcome, TransitionOutcome,
    RELEASED_BY_CHANNEL_MS,
};
use crate::settlement::outbox::{self, CompactRecord};
use crate::settlement::rebuild::{unwind_refused, Refusal};
use crate::settlement::settler::SettleFailure;
use crate::settlement::{
    movements, AttemptRow, CommitOutcome, IntentOutcome, PaymentRow, PendingRecord, SettleError,
    Settlement, WebhookStatus,
};
use crate::state::Core;
use crate::telemetry;
use crate::webhooks::Delivery;

/// A payment or top-up as the client asked for it, every field checked at the edge.
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub key: IdempotencyKey,
    /// `Charge` (`POST /v1/payments`) or `Topup` (`POST /v1/accounts/{id}/topups`).
    pub purpose: Purpose,
    pub method: Method,
    /// An account's scope for balance and supplier charges and top-ups, the merchant's else.
    pub scope: Scope,
    /// `None` only for a top-up: it is then named by its own id.
    pub merchant_order_id: Option<MerchantOrderId>,
    pub amount: Amount,
    pub currency: Currency,
    pub description: Option<String>,
    pub notify_url: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    pub expires_in_seconds: u64,
}

/// A created payment, or the first one under a replayed key (both answered `201`).
#[derive(Debug, Clone)]
pub enum Creation {
    Created(PaymentView),
    Replayed(PaymentView),
}

impl Creation {
    pub fn view(self) -> PaymentView {
        match self {
            Creation::Created(view) | Creation::Replayed(view) => view,
        }
    }
}

/// Creates the payment `new` describes, counted by outcome.
pub async fn create(
    core: &Core,
    merchant: &Merchant,
    new: NewPayment,
) -> Result<Creation, PaymentError> {
    let result = match new.method {
        Method::Balance => create_balance(core, merchant, new).await,
        // Boxed: a channel payment's future (HTTP calls to the channel: 8.6 KB) is larger than
        // a balance payment's (5.1 KB), and the router's layers move the handler's future,
        // whole, into boxes of their own (9.9 KB per request before, 6.4 KB after).
        Method::Supplier | Method::Alipay | Method::Wechatpay => {
            Box::pin(create_channel(core, merchant, new)).await
        }
    };
    let label = match &result {
        Ok(Creation::Created(_)) => "created",
        Ok(Creation::Replayed(_)) => "replayed",
        Err(PaymentError::NotFound(Missing::Account)) => "account_not_found",
        Err(PaymentError::Invalid { .. }) => "currency_mismatch",
        Err(err) => err.label(),
    };
    telemetry::preauth_outcome(label);
    result
}

/// The request as its idempotency record's hash sees it (`request_hash`): the parsed values,
/// fields in byte order of their names (the hashes already kept were made from a
/// `serde_json::Map`).
#[derive(serde::Serialize)]
struct Normalized<'a> {
    account_id: Option<&'a str>,
    amount: i64,
    currency: &'static str,
    description: &'a Option<String>,
    expires_in_seconds: u64,
    merchant_order_id: Option<&'a str>,
    metadata: &'a Option<Map<String, Value>>,
    method: Method,
    notify_url: &'a Option<String>,
}

/// The route a request hash names.
fn route_of(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::Topup => "topup",
        Purpose::Charge => "payment",
    }
}

/// The payment's document, its hold and its idempotency claim, as the balance store takes
/// them; the pending record is attached by the path.
fn authorize_request(core: &Core, merchant: &Merchant, new: NewPayment) -> AuthorizeRequest {
    let settings = &core.config.settings;
    let now_ms = core.op().now_ms;
    let expires_at_ms = now_ms + new.expires_in_seconds * 1000;
    let id = PaymentId::generate(new.scope.tag(), now_ms);
    let normalized = Normalized {
        account_id: new.scope.account_id().map(AccountId::as_str),
        amount: new.amount.minor(),
        currency: new.currency.code(),
        description: &new.description,
        expires_in_seconds: new.expires_in_seconds,
        merchant_order_id: new.merchant_order_id.as_ref().map(MerchantOrderId::as_str),
        metadata: &new.metadata,
        method: new.method,
        notify_url: &new.notify_url,
    };
    let request_hash = request_hash(route_of(new.purpose), &normalized);
    let order_id = new.merchant_order_id.unwrap_or_else(|| {
        MerchantOrderId::parse(id.as_str(), usize::MAX).expect("a payment id is an order id")
    });
    let hold = match (new.purpose, new.method) {
        (Purpose::Charge, Method::Balance) => Some(HoldSpec {
            expires_at_ms,
            capture_now: true,
        }),
        // No clock releases it: only the channel's word that the order closed or failed
        // (a supplier may execute up to its order's expiry and tell us late).
        (Purpose::Charge, Method::Supplier) => Some(HoldSpec {
            expires_at_ms: RELEASED_BY_CHANNEL_MS,
            capture_now: false,
        }),
        _ => None,
    };
    let doc = PaymentDoc {
        id: id.as_str().to_owned(),
        merchant_id: merchant.id.as_str().to_owned(),
        account_id: new.scope.account_id().map(|a| a.as_str().to_owned()),
        merchant_order_id: order_id.as_str().to_owned(),
        amount_minor: new.amount.minor(),
        currency: new.currency,
        method: new.method,
        purpose: new.purpose,
        created_at_ms: now_ms,
        expires_at_ms,
        description: new.description,
        notify_url: new.notify_url,
        metadata: new.metadata,
    };
    AuthorizeRequest {
        scope: new.scope,
        idempotency: IdempotencyClaim {
            key: new.key,
            request_hash,
            retention_seconds: settings.preauth.idempotency_retention_seconds,
        },
        order_id,
        doc,
        hold,
        pending_record: None,
        doc_json: None,
    }
}

/// A balance payment: captured in the balance store, committed with its row before the answer.
async fn create_balance(
    core: &Core,
    merchant: &Merchant,
    new: NewPayment,
) -> Result<Creation, PaymentError> {
    let mut request = authorize_request(core, merchant, new);
    // The outbox keeps only what the document Redis holds does not say (see `outbox`);
    // recovery rebuilds this very settlement from it.
    let mut capture = outbox::balance_capture(
        &request.doc,
        request.scope.tag(),
        request.idempotency.key.as_str(),
        &request.idempotency.request_hash,
    );
    request.pending_record =
        Some(CompactRecord::balance_capture(&request.idempotency.request_hash).to_json());
    // The document as the store row encoded it: encoded once for both stores.
    request.doc_json = capture.payment.as_ref().map(|row| row.doc.clone());

    // On its way to the writer until the balance store has answered (see `Admission`).
    let admission = core.settler.admit().map_err(PaymentError::not_admitted)?;
    let outcome = authorize(core, &request).await?;
    // A created payment's write follows at once; any other outcome writes nothing.
    drop(admission);
    match outcome {
        AuthorizeOutcome::Created { payment, account } => {
            capture.account_seq = account.map(|a| a.seq);
            commit_capture(core, merchant, &request, capture, payment).await
        }
        // The rare outcomes read the store: boxed, so the common path's future stays small.
        AuthorizeOutcome::IdempotencyInFlight => {
            Box::pin(balance_key_in_flight(core, &request)).await
        }
        other => Box::pin(not_created(core, &request, other)).await,
    }
}

/// A channel payment (or top-up): the route reserved, authorized (a supplier charge holds the
/// amount), the intent recorded, then the attempts.
async fn create_channel(
    core: &Core,
    merchant: &Merchant,
    new: NewPayment,
) -> Result<Creation, PaymentError> {
    let mut request = authorize_request(core, merchant, new);
    // The row records when the channel's word is due at the latest (the payment's expiry plus
    // the grace); the hold itself has no clock.
    let hold_due_ms = request.hold.map(|_| {
        request.doc.expires_at_ms + core.config.settings.preauth.hold_grace_seconds * 1000
    });
    let intent = intent_row(core, &request.doc, request.scope.tag(), hold_due_ms).with_idempotency(
        request.idempotency.key.as_str(),
        &request.idempotency.request_hash,
    );
    // Compact in the outbox (see `outbox`): recovery rebuilds this row from it.
    let compact = CompactRecord::channel_intent(&intent);
    debug_assert_eq!(
        compact.expand(
            &request.doc,
            request.scope.tag(),
            request.idempotency.key.as_str()
        ),
        PendingRecord::Intent(intent.clone()),
        "the outbox's intent rebuilds the row"
    );
    request.pending_record = Some(compact.to_json());
    // The document as the intent row encoded it: encoded once for both stores.
    request.doc_json = Some(intent.doc.clone());

    // The route first: the intent names its first attempt.
    let plan = ChannelPlan::new(core, &request);
    let admission = match core.settler.admit() {
        Ok(admission) => admission,
        Err(err) => {
            plan.release(core);
            return Err(PaymentError::not_admitted(err));
        }
    };
    let outcome = match authorize(core, &request).await {
        Ok(outcome) => outcome,
        Err(err) => {
            plan.release(core);
            return Err(err);
        }
    };
    drop(admission);
    match outcome {
        AuthorizeOutcome::Created { payment, .. } => {
            route_payment(core, &request, intent, payment, plan).await
        }
        other => {
            plan.release(core);
            not_created(core, &request, other).await
        }
    }
}

/// The one atomic balance-store call; an account the balance store lost is reloaded from the
/// record and the call tried once more.
async fn authorize(
    core: &Core,
    request: &AuthorizeRequest,
) -> Result<AuthorizeOutcome, PaymentError> {
    let outcome = core.balances.authorize(request, core.op()).await?;
    match (&outcome, &request.scope) {
        (AuthorizeOutcome::AccountNotFound, Scope::Account(key))
            if super::accounts::reload(core, key).await? =>
        {
            Ok(core.balances.authorize(request, core.op()).await?)
        }
        _ => Ok(outcome),
    }
}

/// A balance payment's key the balance store still has in flight. Once the payment is
/// committed its answer is decided — and may have gone out already: a batch's waiters are
/// answered before its keys are marked settled — so the store's payment under the key is the
/// answer; before the commit the key is in flight. (A channel payment's key stays in flight
/// until its channel has answered, whatever the store holds: not here.)
async fn balance_key_in_flight(
    core: &Core,
    request: &AuthorizeRequest,
) -> Result<Creation, PaymentError> {
    let stored = core
        .settler
        .store
        .payment_by_key(
            request.scope.tag().as_str(),
            request.idempotency.key.as_str(),
        )
        .await;
    match stored {
        Ok(Some(first)) if first.request_hash == request.idempotency.request_hash => {
            let id = PaymentId::parse(&first.payment_id).ok_or_else(|| {
                PaymentError::from(SettleError::Invalid(format!(
                    "stored payment id {:?}",
                    first.payment_id
                )))
            })?;
            replay(core, request, StoredOutcome::Payment(id)).await
        }
        Ok(Some(_)) => Err(PaymentError::IdempotencyConflict),
        Ok(None) => Err(PaymentError::IdempotencyInFlight),
        Err(err) => {
            // The key is in flight either way: the client retries.
            tracing::warn!(error = %err, "cannot read a key in flight from the store");
            Err(PaymentError::IdempotencyInFlight)
        }
    }
}

/// Every outcome but `Created`: nothing was written; a replay answers the first payment.
async fn not_created(
    core: &Core,
    request: &AuthorizeRequest,
    outcome: AuthorizeOutcome,
) -> Result<Creation, PaymentError> {
    let currency = request.doc.currency;
    Err(match outcome {
        AuthorizeOutcome::Created { .. } => unreachable!("a created payment is made durable"),
        AuthorizeOutcome::Replay(first) => return replay(core, request, first).await,
        AuthorizeOutcome::InsufficientFunds {
            available,
            shortfall,
        } => {
            // The refusal is the key's answer: kept in the store too, so its replay survives.
            super::keep_refusal(
                core,
                request.scope.tag(),
                &request.idempotency,
                StoredOutcome::InsufficientFunds {
                    available,
                    shortfall,
                },
                request.doc.created_at_ms,
            );
            PaymentError::InsufficientFunds {
                available,
                shortfall,
                currency,
            }
        }
        AuthorizeOutcome::IdempotencyConflict => PaymentError::IdempotencyConflict,
        AuthorizeOutcome::IdempotencyInFlight => PaymentError::IdempotencyInFlight,
        AuthorizeOutcome::DuplicateOrder(existing) => PaymentError::DuplicateOrder {
            payment_id: existing.as_str().to_owned(),
        },
        AuthorizeOutcome::AccountNotFound => PaymentError::NotFound(Missing::Account),
        AuthorizeOutcome::AccountBusy => {
            PaymentError::unavailable(Unavailable::AccountRebuildInProgress, None)
        }
        AuthorizeOutcome::CurrencyMismatch(existing) => PaymentError::Invalid {
            field: "currency",
            message: format!("does not match the account's currency ({existing})"),
        },
    })
}

/// Durable before answered: the capture is committed with the payment's row (group commit);
/// what cannot be committed is left to recovery, never answered as created.
async fn commit_capture(
    core: &Core,
    merchant: &Merchant,
    request: &AuthorizeRequest,
    capture: Settlement,
    payment: PaymentRecord,
) -> Result<Creation, PaymentError> {
    let id = payment.doc.id.clone();
    let mark = settled_mark(request);
    // The `payment.succeeded` event the commit enqueues, as a `GET` right after shows it (its
    // id is derived, its date the movement's): no read back.
    let status = if payment.doc.notify_url.is_none() && merchant.webhook_url.is_none() {
        WebhookStatus::Skipped
    } else {
        WebhookStatus::Pending
    };
    let webhooks = vec![Delivery::announced(
        &id,
        crate::webhooks::events::PAYMENT_SUCCEEDED,
        0,
        status,
        capture.settled_at_ms,
    )];
    match core.settler.settle(capture, mark).await {
        Ok(CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted) => Ok(Creation::Created(
            PaymentView::new(payment, Vec::new(), webhooks),
        )),
        // The store knew the key or the order id Redis forgot: the writer unwound this payment
        // (nothing was charged), and the store's answer is the answer. Any other outcome: the
        // account must be rebuilt first.
        Ok(outcome) => match Refusal::of_commit(&outcome) {
            Some(refusal) => Box::pin(store_answer(core, request, refusal)).await,
            None => Err(PaymentError::unavailable(
                Unavailable::of_commit(&outcome),
                Some(&id),
            )),
        },
        Err(err) => Err(PaymentError::unsettled(&id, &err)),
    }
}

/// The first answer under a key, replayed (from the balance store's record or the settlement
/// store's): the first payment as it stands, or its refusal; another kind of request's answer
/// under the key is a conflict (the request hash differs).
async fn replay(
    core: &Core,
    request: &AuthorizeRequest,
    first: StoredOutcome,
) -> Result<Creation, PaymentError> {
    match first {
        StoredOutcome::Payment(id) => {
            Ok(Creation::Replayed(view::replayed(core, id.as_str()).await?))
        }
        StoredOutcome::NoChannelAvailable(id) => Err(PaymentError::NoChannelAvailable {
            payment_id: Some(id.to_string()),
        }),
        StoredOutcome::InsufficientFunds {
            available,
            shortfall,
        } => Err(PaymentError::InsufficientFunds {
            available,
            shortfall,
            currency: request.doc.currency,
        }),
        StoredOutcome::Adjustment(_) | StoredOutcome::Refund(_) => {
            Err(PaymentError::IdempotencyConflict)
        }
    }
}

/// The answer to a payment the settlement store refused to create (already unwound): the first
/// payment under the key, or the conflict.
async fn store_answer(
    core: &Core,
    request: &AuthorizeRequest,
    refusal: Refusal<'_>,
) -> Result<Creation, PaymentError> {
    match refusal {
        // The key's first answer (a payment, or a 402 Redis forgot) is the answer.
        Refusal::Replay(holder) => replay(core, request, holder.outcome()?).await,
        Refusal::IdempotencyConflict(_) => Err(PaymentError::IdempotencyConflict),
        Refusal::DuplicateOrder(holder) => Err(PaymentError::DuplicateOrder {
            payment_id: holder.to_owned(),
        }),
    }
}

fn settled_mark(request: &AuthorizeRequest) -> SettledMark {
    SettledMark {
        tag: request.scope.tag(),
        id: request.doc.id.clone(),
        idempotency_key: request.idempotency.key.as_str().to_owned(),
    }
}

/// A channel payment's row as its intent: pending, holding what it holds, first looked at by
/// the resolution loop after `resolution.first_check_delay_ms`.
fn intent_row(
    core: &Core,
    doc: &PaymentDoc,
    tag: ScopeTag,
    hold_expires_at_ms: Option<u64>,
) -> PaymentRow {
    let first_check_ms = doc.created_at_ms + core.config.settings.resolution.first_check_delay_ms;
    movements::intent_row(doc, tag, hold_expires_at_ms, first_check_ms)
}

/// A channel payment's route, reserved before it is authorized (see `checkout`).
struct ChannelPlan {
    route: Route,
    first: Option<Reserved>,
    first_row: Option<AttemptRow>,
}

impl ChannelPlan {
    fn new(core: &Core, request: &AuthorizeRequest) -> Self {
        let (route, first) = Route::plan(core, &request.doc);
        let first_row = first.as_ref().map(|reserved| {
            let id = PaymentId::parse(&request.doc.id).expect("a new payment has a valid id");
            checkout::attempt_row(core, &id, 1, reserved, request.doc.created_at_ms)
        });
        Self {
            route,
            first,
            first_row,
        }
    }

    /// Gives the reserved permit back: nothing will be sent.
    fn release(self, core: &Core) {
        if let Some(reserved) = self.first {
            core.channels.entries()[reserved.index].release(reserved.permit);
        }
    }
}

/// A created channel payment: its intent and first attempt committed, then the attempts
/// (`checkout`), then the answer: pending (with the action when a channel accepted),
/// succeeded when closing an unknown attempt found it paid, or no channel available with the
/// hold released when nothing executed anywhere.
async fn route_payment(
    core: &Core,
    request: &AuthorizeRequest,
    row: PaymentRow,
    payment: PaymentRecord,
    plan: ChannelPlan,
) -> Result<Creation, PaymentError> {
    let id = PaymentId::parse(&payment.doc.id).expect("a stored payment has a valid id");
    let key = &request.idempotency.key;
    let mark = settled_mark(request);
    // Durable before any call, without letting the key replay yet. A write that outlives the
    // settle timeout is left to decide later (`give_up_late`): the key stays in flight.
    let late = give_up_late(core, &row, &id, key);
    let recorded = core
        .settler
        .record_intent_or_later(&row, plan.first_row.as_ref(), late)
        .await;
    let failure = match recorded {
        Ok(IntentOutcome::Inserted | IntentOutcome::AlreadyRecorded) => None,
        Ok(outcome) => match Refusal::of_intent(&outcome) {
            None => None,
            // The store knows the key, or a live payment under the order id, that Redis
            // forgot: the store wins. This payment never was: Redis lets go of it (its hold,
            // its key), and the store's answer is the answer.
            Some(refusal) => {
                plan.release(core);
                unwind_refused(
                    core.balances.as_ref(),
                    &row,
                    0,
                    refusal,
                    &mark,
                    core.settler.idempotency_retention_seconds(),
                )
                .await?;
                return store_answer(core, request, refusal).await;
            }
        },
        Err(SettleFailure::Timeout) => {
            plan.release(core);
            return Err(PaymentError::unavailable(
                Unavailable::SettlementStore,
                Some(id.as_str()),
            ));
        }
        Err(_) => Some(PaymentError::unavailable(
            Unavailable::SettlementStore,
            None,
        )),
    };
    if let Some(error) = failure {
        plan.release(core);
        // Undo, so nothing is half done; if even that fails, recovery records the intent
        // later and the key replays then.
        return Err(match core.balances.abandon(&id, key).await {
            Ok(()) => error,
            Err(_) => PaymentError::unavailable(Unavailable::SettlementStore, Some(id.as_str())),
        });
    }

    let ChannelPlan {
        mut route,
        first,
        first_row,
    } = plan;
    // A callback may come before this call ends: it finds the document and attempt here.
    core.pending_docs
        .insert(payment.doc.clone(), first_row.iter().cloned().collect());
    let (routed, attempts) = checkout::attempt(
        core,
        &payment.doc,
        &mut route,
        first,
        first_row.into_iter().collect(),
    )
    .await;
    let answer = match routed {
        Routed::Accepted(accepted) => {
            telemetry::routing("accepted");
            // The key may replay now, with the action: the balance store keeps the acceptance
            // until the attempt's outcome (queued, not waited for) is committed. If this
            // fails, the key stays in flight until recovery marks the intent.
            if let Err(err) = core.balances.accept(&mark, &accepted).await {
                tracing::warn!(payment_id = %id, error = %err, "accepted but not kept in the balance store; recovery will release the key");
            }
            return Ok(Creation::Created(PaymentView::new(
                payment,
                attempts,
                Vec::new(),
            )));
        }
        Routed::Unknown => {
            telemetry::routing("unknown");
            Ok(Creation::Created(PaymentView::new(
                payment,
                attempts,
                Vec::new(),
            )))
        }
        Routed::Paid {
            attempt,
            channel_txn_id,
            amount_minor,
            currency,
        } => {
            telemetry::routing("paid");
            if let Err(err) =
                resolution::settle_paid(core, &attempt, &channel_txn_id, amount_minor, currency)
                    .await
            {
                tracing::warn!(payment_id = %id, error = %err, "paid at the channel but not settled yet; the resolution loop will");
            }
            let now = core.balances.payment(&id).await?.unwrap_or(payment);
            let attempts = core
                .settler
                .store
                .attempts(id.as_str())
                .await
                .unwrap_or(attempts);
            Ok(Creation::Created(PaymentView::new(
                now,
                attempts,
                Vec::new(),
            )))
        }
        Routed::NoChannel => {
            telemetry::routing("no_channel");
            core.pending_docs.remove(id.as_str());
            match core.balances.fail_unrouted(&id, key, core.op()).await? {
                TransitionOutcome::Done(_) => {
                    resolution::apply_final_status(core, &id, PaymentStatus::Failed).await;
                }
                other => {
                    tracing::warn!(payment_id = %id, ?other, "an unrouted payment was no longer pending");
                }
            }
            Err(PaymentError::NoChannelAvailable {
                payment_id: Some(id.to_string()),
            })
        }
    };
    // Now the key may replay (the answer above, or the payment as it stands).
    if let Err(err) = core.balances.mark_settled(&[mark]).await {
        tracing::warn!(payment_id = %id, error = %err, "intent committed but not marked; recovery will");
    }
    answer
}

/// What becomes of a channel payment whose intent write outlived the request's wait (see
/// `Settler::record_intent_or_later`): nothing was sent to any channel, and nothing will be.
/// Committed after all → it ends `failed` in the store (freeing its order id), then Redis lets
/// go of it (hold, key); refused by the store → unwound; never written → undone in Redis. Until
/// then its key answers `409 idempotency_in_flight`; afterwards the client may retry with it.
fn give_up_late(
    core: &Core,
    row: &PaymentRow,
    id: &PaymentId,
    key: &IdempotencyKey,
) -> impl FnOnce(Result<IntentOutcome, SettleFailure>) -> futures_util::future::BoxFuture<'static, ()>
{
    let balances = core.balances.clone();
    let store = core.settler.store.clone();
    let retention_seconds = core.settler.idempotency_retention_seconds();
    let (row, id, key) = (row.clone(), id.clone(), key.clone());
    move |fate| {
        Box::pin(async move {
            let mark = SettledMark {
                tag: id.tag(),
                id: id.as_str().to_owned(),
                idempotency_key: key.as_str().to_owned(),
            };
            let undone = match &fate {
                Ok(IntentOutcome::Inserted | IntentOutcome::AlreadyRecorded) => {
                    let change = crate::settlement::StatusChange {
                        payment_id: id.as_str().to_owned(),
                        status: PaymentStatus::Failed,
                        updated_at_ms: telemetry::now_ms(),
                    };
                    let ended = match store.set_final_status(&change).await {
                        Ok(_) => store.release_idempotency_key(id.as_str()).await,
                        Err(err) => Err(err),
                    };
                    match ended {
                        Ok(_) => balances.abandon(&id, &key).await.map(|()| true),
                        // The outbox keeps the intent: recovery records it, the key replays
                        // the pending payment, and the resolution loop ends it at expiry.
                        Err(err) => {
                            tracing::warn!(payment_id = %id, error = %err, "a late intent could not be failed; recovery and resolution will end it");
                            Ok(false)
                        }
                    }
                }
                Ok(outcome) => match Refusal::of_intent(outcome) {
                    Some(refusal) => {
                        unwind_refused(
                            balances.as_ref(),
                            &row,
                            0,
                            refusal,
                            &mark,
                            retention_seconds,
                        )
                        .await
                    }
                    None => Ok(false),
                },
                Err(_) => balances.abandon(&id, &key).await.map(|()| true),
            };
            match undone {
                Ok(done) => {
                    tracing::warn!(payment_id = %id, ?fate, done, "a channel payment's intent outlived its request: never routed, given up")
                }
                Err(err) => {
                    tracing::error!(payment_id = %id, error = %err, "cannot give up a late intent in the balance store; recovery will meet it")
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_request_hash_is_the_one_of_the_sorted_value_tree() {
        let mut metadata = Map::new();
        metadata.insert("z".into(), json!("last \"quoted\""));
        metadata.insert("a".into(), json!("é"));
        for extras in [false, true] {
            let description = extras.then(|| "line\nbreak".to_owned());
            let notify_url = extras.then(|| "https://m.example/h".to_owned());
            let metadata = extras.then(|| metadata.clone());
            let (account_id, merchant_order_id) = if extras {
                (Some("acc"), Some("o-1"))
            } else {
                (None, None)
            };
            let typed = Normalized {
                account_id,
                amount: 12_345,
                currency: "CNY",
                description: &description,
                expires_in_seconds: 900,
                merchant_order_id,
                metadata: &metadata,
                method: Method::Balance,
                notify_url: &notify_url,
            };
            // As the hashes already kept were made.
            let tree = json!({
                "merchant_order_id": merchant_order_id,
                "amount": 12_345,
                "currency": "CNY",
                "method": Method::Balance,
                "account_id": account_id,
                "description": description,
                "notify_url": notify_url,
                "metadata": metadata,
                "expires_in_seconds": 900,
            });
            assert_eq!(
                request_hash("payment", &typed),
                request_hash("payment", &tree)
            );
            assert_ne!(
                request_hash("topup", &typed),
                request_hash("payment", &typed)
            );
        }
    }
}
