//! Payments: the authorize path. `create_payment` reads top to bottom: authenticate, parse and
//! check every field at the edge, then ONE store call (idempotency + order id + lazy release
//! + available check + hold or capture, atomically), then map the outcome.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::accounts::{rebuild_reason, reload_account, supported_currency};
use super::auth::AuthMerchant;
use super::error::ApiError;
use super::extract::{request_hash, required_idempotency_key, JsonObject};
use super::{render, AppState};
use crate::checkout::{self, Reserved, Route, Routed};
use crate::config::Merchant;
use crate::ids::{AccountId, MerchantOrderId, PaymentId};
use crate::money::{format_minor, Amount, Currency};
use crate::preauth::SettledMark;
use crate::preauth::{
    AccountKey, AuthorizeOutcome, AuthorizeRequest, HoldSpec, IdempotencyClaim, Method, PaymentDoc,
    PaymentRecord, PaymentStatus, Purpose, Scope, StoredOutcome, TransitionOutcome,
    RELEASED_BY_CHANNEL_MS,
};
use crate::resolution::{self, Cancel, ResolveError};
use crate::settlement::rebuild::{unwind_refused, Refusal};
use crate::settlement::settler::SettleFailure;
use crate::settlement::{
    movements, AttemptRow, CommitOutcome, IntentOutcome, PaymentRow, PendingRecord, RefusalRow,
};
use crate::telemetry;

const CREATE_FIELDS: &[&str] = &[
    "merchant_order_id",
    "amount",
    "currency",
    "method",
    "account_id",
    "description",
    "notify_url",
    "metadata",
    "expires_in_seconds",
];

/// The optional fields every payment creation takes, checked.
struct Extras<'a> {
    description: Option<&'a str>,
    notify_url: Option<&'a str>,
    metadata: Option<Map<String, Value>>,
    expires_in_seconds: u64,
}

fn parse_extras<'a>(state: &AppState, body: &'a JsonObject) -> Result<Extras<'a>, ApiError> {
    let settings = &state.config.settings;
    let limits = &settings.limits;
    let description = body.bounded_str("description", limits.max_description_chars)?;
    let notify_url = body.bounded_str("notify_url", limits.max_notify_url_chars)?;
    if let Some(url) = notify_url {
        // Where the merchant's webhooks go: refused here rather than failing every delivery.
        crate::webhooks::delivery::check_url(url, state.config.mode)
            .map_err(|e| ApiError::invalid("notify_url", format!("is not accepted: {e}")))?;
    }
    let metadata = parse_metadata(state, body.object("metadata")?)?;
    let expires_in_seconds = match body.u64("expires_in_seconds")? {
        Some(s) => s,
        None => settings.payments.default_expires_in_seconds,
    };
    let (min, max) = (
        settings.payments.min_expires_in_seconds,
        settings.payments.max_expires_in_seconds,
    );
    if !(min..=max).contains(&expires_in_seconds) {
        return Err(ApiError::invalid(
            "expires_in_seconds",
            format!("must be between {min} and {max}"),
        ));
    }

    Ok(Extras {
        description,
        notify_url,
        metadata,
        expires_in_seconds,
    })
}

/// `POST /v1/payments`.
pub async fn create_payment(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    headers: HeaderMap,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let settings = &state.config.settings;
    let limits = &settings.limits;

    // 1. Parse at the edge: nothing below sees an unchecked value.
    let idempotency = required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    body.only(CREATE_FIELDS)?;
    let order_id = MerchantOrderId::parse(
        body.required_str("merchant_order_id")?,
        limits.max_merchant_order_id_chars,
    )
    .map_err(|e| ApiError::invalid("merchant_order_id", e.to_string()))?;
    let method = Method::parse(body.required_str("method")?).ok_or_else(|| {
        ApiError::invalid(
            "method",
            "must be one of balance, supplier, alipay, wechatpay",
        )
    })?;
    let currency = supported_currency(&state, body.required_str("currency")?)?;
    let amount = parse_payment_amount(&state, body.required_str("amount")?, currency)?;
    let account = body
        .str("account_id")?
        .map(|a| AccountId::parse(a).map_err(|e| ApiError::invalid("account_id", e.to_string())))
        .transpose()?;
    let scope = payment_scope(&merchant, method, account)?;
    let Extras {
        description,
        notify_url,
        metadata,
        expires_in_seconds,
    } = parse_extras(&state, &body)?;

    // 2. The payment as it will be stored, and the idempotency claim on it.
    let normalized = json!({
        "merchant_order_id": order_id.as_str(),
        "amount": amount.minor(),
        "currency": currency.code(),
        "method": method,
        "account_id": scope.account_id().map(AccountId::as_str),
        "description": description,
        "notify_url": notify_url,
        "metadata": metadata,
        "expires_in_seconds": expires_in_seconds,
    });
    let ctx = state.op();
    let expires_at_ms = ctx.now_ms + expires_in_seconds * 1000;
    let id = PaymentId::generate(scope.tag(), ctx.now_ms);
    let doc = PaymentDoc {
        id: id.as_str().to_owned(),
        merchant_id: merchant.id.as_str().to_owned(),
        account_id: scope.account_id().map(|a| a.as_str().to_owned()),
        merchant_order_id: order_id.as_str().to_owned(),
        amount_minor: amount.minor(),
        currency,
        method,
        purpose: Purpose::Charge,
        created_at_ms: ctx.now_ms,
        expires_at_ms,
        description: description.map(str::to_owned),
        notify_url: notify_url.map(str::to_owned),
        metadata,
    };
    let hold = match method {
        Method::Balance => Some(HoldSpec {
            expires_at_ms,
            capture_now: true,
        }),
        // No clock releases it: only the channel's word that the order closed or failed
        // (a supplier may execute up to its order's expiry and tell us late).
        Method::Supplier => Some(HoldSpec {
            expires_at_ms: RELEASED_BY_CHANNEL_MS,
            capture_now: false,
        }),
        Method::Alipay | Method::Wechatpay => None,
    };
    // What must reach the settlement store before the client hears back: a balance payment's
    // capture (its sequence number is filled in from the script's answer), or any other
    // payment's intent (so a callback can always be matched and its hold rebuilt).
    // The payment's row carries its key and request hash: the store decides on them in the
    // same commit (see `SettlementStore::commit`).
    let tag = scope.tag();
    let hash = request_hash("payment", &normalized);
    let pending = match method {
        Method::Balance => {
            let mut capture = movements::balance_capture(&doc, tag, None, ctx.now_ms);
            capture.payment = capture
                .payment
                .map(|row| row.with_idempotency(idempotency.as_str(), &hash));
            PendingRecord::Settlement(capture)
        }
        // The row records when the channel's word is due at the latest (the payment's expiry
        // plus the grace); the hold itself has no clock.
        _ => {
            let hold_due_ms =
                hold.map(|_| expires_at_ms + settings.preauth.hold_grace_seconds * 1000);
            PendingRecord::Intent(
                intent_row(&state, &doc, tag, hold_due_ms, ctx.now_ms)
                    .with_idempotency(idempotency.as_str(), &hash),
            )
        }
    };
    let request = AuthorizeRequest {
        scope,
        idempotency: IdempotencyClaim {
            key: idempotency,
            request_hash: hash,
            retention_seconds: settings.preauth.idempotency_retention_seconds,
        },
        order_id,
        doc,
        hold,
        pending_record: Some(pending.to_json()),
    };
    submit(&state, &merchant, request, pending).await
}

const TOPUP_FIELDS: &[&str] = &[
    "amount",
    "method",
    "currency",
    "merchant_order_id",
    "description",
    "notify_url",
    "metadata",
    "expires_in_seconds",
];

/// `POST /v1/accounts/{id}/topups`: a `topup` payment through a channel (`amount`, `method`
/// ∈ alipay, wechatpay, supplier; `currency` defaults to the account's and must equal it;
/// `merchant_order_id` defaults to the payment's id). Answers `201 pending` with the channel's
/// action; the account is credited when the channel confirms (DESIGN.md §3).
pub async fn create_topup(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let settings = &state.config.settings;
    let limits = &settings.limits;
    let idempotency = required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let account =
        AccountId::parse(&account).map_err(|e| ApiError::invalid("account_id", e.to_string()))?;
    body.only(TOPUP_FIELDS)?;
    let method = match Method::parse(body.required_str("method")?) {
        Some(method @ (Method::Alipay | Method::Wechatpay | Method::Supplier)) => method,
        _ => {
            return Err(ApiError::invalid(
                "method",
                "must be one of alipay, wechatpay, supplier for a top-up",
            ))
        }
    };
    let key = AccountKey::new(merchant.id.clone(), account);
    let currency = match body.str("currency")? {
        Some(code) => supported_currency(&state, code)?,
        // The account's own currency (one read; a missing account is a 404).
        None => match state.balances.read_account(&key, state.op()).await? {
            Some(snapshot) => snapshot.currency,
            None if reload_account(&state, &key).await? => {
                state
                    .balances
                    .read_account(&key, state.op())
                    .await?
                    .ok_or_else(|| ApiError::NotFound("no such account".into()))?
                    .currency
            }
            None => return Err(ApiError::NotFound("no such account".into())),
        },
    };
    let amount = parse_payment_amount(&state, body.required_str("amount")?, currency)?;
    let order_text = body.str("merchant_order_id")?;
    let Extras {
        description,
        notify_url,
        metadata,
        expires_in_seconds,
    } = parse_extras(&state, &body)?;

    let ctx = state.op();
    let scope = Scope::Account(key);
    let id = PaymentId::generate(scope.tag(), ctx.now_ms);
    let order_id = MerchantOrderId::parse(
        order_text.unwrap_or(id.as_str()),
        limits.max_merchant_order_id_chars,
    )
    .map_err(|e| ApiError::invalid("merchant_order_id", e.to_string()))?;
    let normalized = json!({
        "merchant_order_id": order_text,
        "amount": amount.minor(),
        "currency": currency.code(),
        "method": method,
        "account_id": scope.account_id().map(AccountId::as_str),
        "description": description,
        "notify_url": notify_url,
        "metadata": metadata,
        "expires_in_seconds": expires_in_seconds,
    });
    let doc = PaymentDoc {
        id: id.as_str().to_owned(),
        merchant_id: merchant.id.as_str().to_owned(),
        account_id: scope.account_id().map(|a| a.as_str().to_owned()),
        merchant_order_id: order_id.as_str().to_owned(),
        amount_minor: amount.minor(),
        currency,
        method,
        purpose: Purpose::Topup,
        created_at_ms: ctx.now_ms,
        expires_at_ms: ctx.now_ms + expires_in_seconds * 1000,
        description: description.map(str::to_owned),
        notify_url: notify_url.map(str::to_owned),
        metadata,
    };
    let hash = request_hash("topup", &normalized);
    let pending = PendingRecord::Intent(
        intent_row(&state, &doc, scope.tag(), None, ctx.now_ms)
            .with_idempotency(idempotency.as_str(), &hash),
    );
    let request = AuthorizeRequest {
        scope,
        idempotency: IdempotencyClaim {
            key: idempotency,
            request_hash: hash,
            retention_seconds: settings.preauth.idempotency_retention_seconds,
        },
        order_id,
        doc,
        hold: None,
        pending_record: Some(pending.to_json()),
    };
    submit(&state, &merchant, request, pending).await
}

/// A channel payment's row as its intent: pending, holding what it holds, first looked at by
/// the resolution loop after `resolution.first_check_delay_ms`.
pub(super) fn intent_row(
    state: &AppState,
    doc: &PaymentDoc,
    tag: crate::ids::ScopeTag,
    hold_expires_at_ms: Option<u64>,
    now_ms: u64,
) -> PaymentRow {
    let held = if hold_expires_at_ms.is_some() {
        doc.amount_minor
    } else {
        0
    };
    let mut row = movements::payment_row(
        doc,
        tag,
        PaymentStatus::Pending,
        held,
        hold_expires_at_ms,
        now_ms,
    );
    row.next_check_at_ms = Some(now_ms + state.config.settings.resolution.first_check_delay_ms);
    row
}

/// Steps 3 to 5 of every payment creation (`POST /v1/payments`, top-ups): routing for a
/// channel payment, admission, the one atomic store call, and the answer (a created payment
/// is made durable first).
pub(super) async fn submit(
    state: &AppState,
    merchant: &Merchant,
    request: AuthorizeRequest,
    pending: PendingRecord,
) -> Result<Response, ApiError> {
    let currency = request.doc.currency;
    // 3. A channel payment's route first: its intent names its first attempt.
    let mut plan = match request.doc.method {
        Method::Balance => None,
        _ => Some(ChannelPlan::new(state, &request)),
    };
    let give_back = |plan: Option<ChannelPlan>| {
        if let Some(plan) = plan {
            plan.release(state);
        }
    };
    // On its way to the writer until the balance store has answered (see `Admission`).
    let admission = match state.settler.admit() {
        Ok(admission) => admission,
        Err(err) => {
            give_back(plan);
            return Err(ApiError::not_admitted(err));
        }
    };
    let mut outcome = match state.balances.authorize(&request, state.op()).await {
        Ok(outcome) => outcome,
        Err(err) => {
            give_back(plan);
            return Err(err.into());
        }
    };
    if let (AuthorizeOutcome::AccountNotFound, Scope::Account(key)) = (&outcome, &request.scope) {
        // Redis may have lost the account: reload it from the record and try once more.
        let retried = match reload_account(state, key).await {
            Ok(true) => state.balances.authorize(&request, state.op()).await,
            Ok(false) => Ok(outcome),
            Err(err) => {
                give_back(plan);
                return Err(err);
            }
        };
        outcome = match retried {
            Ok(outcome) => outcome,
            Err(err) => {
                give_back(plan);
                return Err(err.into());
            }
        };
    }
    if !matches!(outcome, AuthorizeOutcome::Created { .. }) {
        give_back(plan.take());
    }
    // A created payment's write follows at once; any other outcome writes nothing.
    drop(admission);

    // 4. Map the outcome (a created payment is made durable first: step 5).
    let insufficient = |available: i64, shortfall: i64| ApiError::InsufficientFunds {
        available: format_minor(available, currency),
        shortfall: format_minor(shortfall, currency),
        currency: currency.code().into(),
    };
    let (label, result) = match outcome {
        AuthorizeOutcome::Created { payment, account } => match (pending, plan) {
            (PendingRecord::Intent(row), Some(plan)) => {
                route_payment(state, &request, row, &payment, plan).await?
            }
            (pending, _) => {
                let seq = account.map(|a| a.seq);
                make_durable(state, merchant, &request, pending, &payment, seq).await?
            }
        },
        AuthorizeOutcome::Replay(StoredOutcome::Payment(id)) => {
            ("replayed", Ok(replayed(state, id.as_str()).await?))
        }
        AuthorizeOutcome::Replay(StoredOutcome::NoChannelAvailable(id)) => (
            "no_channel_available",
            Err(ApiError::NoChannelAvailable {
                payment_id: Some(id.to_string()),
            }),
        ),
        AuthorizeOutcome::InsufficientFunds {
            available,
            shortfall,
        } => {
            // The refusal is the key's answer: kept in the store too, so its replay survives.
            state.settler.record_refusal_later(RefusalRow {
                scope_tag: request.scope.tag().to_string(),
                idempotency_key: request.idempotency.key.as_str().to_owned(),
                request_hash: request.idempotency.request_hash.clone(),
                outcome: StoredOutcome::InsufficientFunds {
                    available,
                    shortfall,
                }
                .encode(),
                created_at_ms: request.doc.created_at_ms,
            });
            (
                "insufficient_funds",
                Err(insufficient(available, shortfall)),
            )
        }
        AuthorizeOutcome::Replay(StoredOutcome::InsufficientFunds {
            available,
            shortfall,
        }) => (
            "insufficient_funds",
            Err(insufficient(available, shortfall)),
        ),
        // An adjustment's outcome under this key: the request hash differs, so a conflict.
        AuthorizeOutcome::Replay(StoredOutcome::Adjustment(_) | StoredOutcome::Refund(_))
        | AuthorizeOutcome::IdempotencyConflict => {
            ("idempotency_conflict", Err(ApiError::IdempotencyConflict))
        }
        AuthorizeOutcome::IdempotencyInFlight => {
            ("idempotency_in_flight", Err(ApiError::IdempotencyInFlight))
        }
        AuthorizeOutcome::DuplicateOrder(existing) => (
            "duplicate_order",
            Err(ApiError::DuplicateOrder {
                payment_id: existing.as_str().to_owned(),
            }),
        ),
        AuthorizeOutcome::AccountNotFound => (
            "account_not_found",
            Err(ApiError::NotFound("no such account".into())),
        ),
        AuthorizeOutcome::CurrencyMismatch(existing) => (
            "currency_mismatch",
            Err(ApiError::invalid(
                "currency",
                format!("does not match the account's currency ({existing})"),
            )),
        ),
    };
    telemetry::preauth_outcome(label);
    result
}

/// Step 5, durable before answered: a balance payment's capture is committed (group commit),
/// any other payment's intent is recorded; what cannot be made durable is undone or left to
/// recovery, never answered `201`.
async fn make_durable(
    state: &AppState,
    merchant: &Merchant,
    request: &AuthorizeRequest,
    pending: PendingRecord,
    payment: &PaymentRecord,
    seq: Option<u64>,
) -> Result<(&'static str, Result<Response, ApiError>), ApiError> {
    let id = &payment.doc.id;
    let mark = SettledMark {
        tag: request.scope.tag(),
        id: id.clone(),
        idempotency_key: request.idempotency.key.as_str().to_owned(),
    };
    Ok(match pending {
        PendingRecord::Settlement(mut settlement) => {
            settlement.account_seq = seq;
            // The `payment.succeeded` event the commit enqueues, as a `GET` right after shows
            // it (its id is derived, its date the movement's): no read back.
            let skipped = payment.doc.notify_url.is_none() && merchant.webhook_url.is_none();
            let webhooks = json!([crate::webhooks::announced(
                id,
                crate::webhooks::events::PAYMENT_SUCCEEDED,
                0,
                skipped,
                settlement.settled_at_ms,
            )]);
            match state.settler.settle(settlement, mark).await {
                Ok(CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted) => {
                    ("created", Ok(created_with(payment, &[], webhooks)))
                }
                // The store knew the key or the order id Redis forgot: the writer unwound this
                // payment (nothing was charged), and the store's answer is the answer. Any
                // other outcome: the account must be rebuilt first.
                Ok(outcome) => match Refusal::of_commit(&outcome) {
                    Some(refusal) => refusal_answer(state, refusal).await?,
                    None => (
                        "unsettled",
                        Err(ApiError::Unavailable {
                            reason: rebuild_reason(&outcome),
                            payment_id: Some(id.clone()),
                        }),
                    ),
                },
                Err(err) => ("unsettled", Err(ApiError::unsettled(id, &err))),
            }
        }
        PendingRecord::Intent(_) => unreachable!("a channel payment is routed, not settled"),
        PendingRecord::Status(_) | PendingRecord::Refund(_) | PendingRecord::RefundStatus(_) => {
            unreachable!("a new payment has no status change nor refund")
        }
    })
}

/// The answer to a payment the settlement store refused to create (already unwound): the first
/// payment under the key, or the conflict.
async fn refusal_answer(
    state: &AppState,
    refusal: Refusal<'_>,
) -> Result<(&'static str, Result<Response, ApiError>), ApiError> {
    Ok(match refusal {
        Refusal::Replay(holder) => ("replayed", Ok(replayed(state, &holder.payment_id).await?)),
        Refusal::IdempotencyConflict(_) => {
            ("idempotency_conflict", Err(ApiError::IdempotencyConflict))
        }
        Refusal::DuplicateOrder(holder) => (
            "duplicate_order",
            Err(ApiError::DuplicateOrder {
                payment_id: holder.to_owned(),
            }),
        ),
    })
}

/// The first answer under a replayed key: `201` with the payment as it stands (from the
/// balance store, or put back there from the settlement store when Redis lost it).
async fn replayed(state: &AppState, id: &str) -> Result<Response, ApiError> {
    let missing =
        || crate::preauth::StoreError::Corrupt(format!("replayed payment {id} is missing"));
    let pid = PaymentId::parse(id).ok_or_else(missing)?;
    let payment = match resolution::ensure_payment(state, &pid).await {
        Ok(Some(payment)) => payment,
        Ok(None) => stored_payment(state, &pid).await?.ok_or_else(missing)?,
        Err(ResolveError::Balances(err)) => return Err(err.into()),
        Err(ResolveError::Store(err)) => return Err(err.into()),
        Err(err) => {
            tracing::warn!(payment_id = %pid, error = %err, "cannot restore a replayed payment");
            stored_payment(state, &pid).await?.ok_or_else(missing)?
        }
    };
    let view = full_view(state, &payment).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

fn created(payment: &PaymentRecord, attempts: &[AttemptRow]) -> Response {
    created_with(payment, attempts, Value::Array(Vec::new()))
}

/// `201` with the payment, its attempts and its webhook deliveries.
fn created_with(payment: &PaymentRecord, attempts: &[AttemptRow], webhooks: Value) -> Response {
    (
        StatusCode::CREATED,
        Json(render::payment(payment, attempts, &[], webhooks)),
    )
        .into_response()
}

/// A channel payment's route, reserved before it is authorized (see `checkout`).
struct ChannelPlan {
    route: Route,
    first: Option<Reserved>,
    first_row: Option<AttemptRow>,
}

impl ChannelPlan {
    fn new(state: &AppState, request: &AuthorizeRequest) -> Self {
        let (route, first) = Route::plan(state, &request.doc);
        let first_row = first.as_ref().map(|reserved| {
            let id = PaymentId::parse(&request.doc.id).expect("a new payment has a valid id");
            checkout::attempt_row(state, &id, 1, reserved, request.doc.created_at_ms)
        });
        Self {
            route,
            first,
            first_row,
        }
    }

    /// Gives the reserved permit back: nothing will be sent.
    fn release(self, state: &AppState) {
        if let Some(reserved) = self.first {
            state.channels.entries()[reserved.index].release(reserved.permit);
        }
    }
}

/// A created channel payment: its intent and first attempt committed, then the attempts
/// (`checkout`), then the answer: `201 pending` (with the action when a channel accepted),
/// `201 succeeded` when closing an unknown attempt found it paid, or `503
/// no_channel_available` with the hold released when nothing executed anywhere.
async fn route_payment(
    state: &AppState,
    request: &AuthorizeRequest,
    row: PaymentRow,
    payment: &PaymentRecord,
    plan: ChannelPlan,
) -> Result<(&'static str, Result<Response, ApiError>), ApiError> {
    let id = PaymentId::parse(&payment.doc.id).expect("a stored payment has a valid id");
    let key = &request.idempotency.key;
    let mark = SettledMark {
        tag: request.scope.tag(),
        id: id.as_str().to_owned(),
        idempotency_key: key.as_str().to_owned(),
    };
    // Durable before any call, without letting the key replay yet. A write that outlives the
    // settle timeout is left to decide later (`give_up_late`): the key stays in flight.
    let late = give_up_late(state, &row, &id, key);
    let recorded = state
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
                plan.release(state);
                unwind_refused(
                    state.balances.as_ref(),
                    &row,
                    0,
                    refusal,
                    &mark,
                    state.settler.idempotency_retention_seconds(),
                )
                .await?;
                return refusal_answer(state, refusal).await;
            }
        },
        Err(SettleFailure::Timeout) => {
            plan.release(state);
            return Ok((
                "unsettled",
                Err(ApiError::Unavailable {
                    reason: "settlement_store_unavailable",
                    payment_id: Some(id.to_string()),
                }),
            ));
        }
        Err(_) => Some((
            "unsettled",
            ApiError::Unavailable {
                reason: "settlement_store_unavailable",
                payment_id: None,
            },
        )),
    };
    if let Some((label, error)) = failure {
        plan.release(state);
        // Undo, so nothing is half done; if even that fails, recovery records the intent
        // later and the key replays then.
        return match state.balances.abandon(&id, key).await {
            Ok(()) => Ok((label, Err(error))),
            Err(_) => Ok((
                "unsettled",
                Err(ApiError::Unavailable {
                    reason: "settlement_store_unavailable",
                    payment_id: Some(id.to_string()),
                }),
            )),
        };
    }

    let ChannelPlan {
        mut route,
        first,
        first_row,
    } = plan;
    // A callback may come before this call ends: it finds the document and attempt here.
    state
        .pending_docs
        .insert(payment.doc.clone(), first_row.iter().cloned().collect());
    // An accepted attempt's outcome carries the key's release into the group commit.
    let mut mark = Some(mark);
    let (routed, attempts) = checkout::attempt(
        state,
        &payment.doc,
        &mut route,
        first,
        first_row.into_iter().collect(),
        &mut mark,
    )
    .await;
    let answer = match routed {
        Routed::Accepted { .. } => {
            telemetry::routing("accepted");
            ("created", Ok(created(payment, &attempts)))
        }
        Routed::Unknown => {
            telemetry::routing("unknown");
            ("created", Ok(created(payment, &attempts)))
        }
        Routed::Paid {
            attempt,
            channel_txn_id,
            amount_minor,
            currency,
        } => {
            telemetry::routing("paid");
            if let Err(err) =
                resolution::settle_paid(state, &attempt, &channel_txn_id, amount_minor, currency)
                    .await
            {
                tracing::warn!(payment_id = %id, error = %err, "paid at the channel but not settled yet; the resolution loop will");
            }
            let now = state
                .balances
                .payment(&id)
                .await?
                .unwrap_or_else(|| payment.clone());
            let attempts = state
                .settler
                .store
                .attempts(id.as_str())
                .await
                .unwrap_or(attempts);
            ("created", Ok(created(&now, &attempts)))
        }
        Routed::NoChannel => {
            telemetry::routing("no_channel");
            state.pending_docs.remove(id.as_str());
            match state.balances.fail_unrouted(&id, key, state.op()).await? {
                TransitionOutcome::Done(_) => {
                    resolution::apply_final_status(state, &id, PaymentStatus::Failed).await;
                }
                other => {
                    tracing::warn!(payment_id = %id, ?other, "an unrouted payment was no longer pending");
                }
            }
            (
                "no_channel_available",
                Err(ApiError::NoChannelAvailable {
                    payment_id: Some(id.to_string()),
                }),
            )
        }
    };
    // Now the key may replay (the answer above, or the payment as it stands), unless the
    // accepted attempt's commit did it already.
    if let Some(mark) = mark {
        if let Err(err) = state.balances.mark_settled(&[mark]).await {
            tracing::warn!(payment_id = %id, error = %err, "intent committed but not marked; recovery will");
        }
    }
    Ok(answer)
}

/// What becomes of a channel payment whose intent write outlived the request's wait (see
/// `Settler::record_intent_or_later`): nothing was sent to any channel, and nothing will be.
/// Committed after all → it ends `failed` in the store (freeing its order id), then Redis lets
/// go of it (hold, key); refused by the store → unwound; never written → undone in Redis. Until
/// then its key answers `409 idempotency_in_flight`; afterwards the client may retry with it.
fn give_up_late(
    state: &AppState,
    row: &PaymentRow,
    id: &PaymentId,
    key: &crate::ids::IdempotencyKey,
) -> impl FnOnce(Result<IntentOutcome, SettleFailure>) -> futures_util::future::BoxFuture<'static, ()>
{
    let balances = state.balances.clone();
    let store = state.settler.store.clone();
    let retention_seconds = state.settler.idempotency_retention_seconds();
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
                        status: PaymentStatus::Failed.as_str().to_owned(),
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

/// A payment as `GET` shows it: with its attempts, refunds and webhook deliveries (from the
/// settlement store).
pub(super) async fn full_view(
    state: &AppState,
    payment: &PaymentRecord,
) -> Result<Value, ApiError> {
    let attempts = attempts_of(state, payment).await?;
    let store = &state.settler.store;
    let refunds = store.refunds(&payment.doc.id).await?;
    let webhooks = store.webhook_events(&payment.doc.id).await?;
    Ok(render::payment(
        payment,
        &attempts,
        &refunds,
        crate::webhooks::render_deliveries(&webhooks),
    ))
}

/// A payment's attempts (from the settlement store; a balance payment has none).
pub(super) async fn attempts_of(
    state: &AppState,
    payment: &PaymentRecord,
) -> Result<Vec<AttemptRow>, ApiError> {
    if payment.doc.method == Method::Balance {
        return Ok(Vec::new());
    }
    Ok(state.settler.store.attempts(&payment.doc.id).await?)
}

fn parse_payment_amount(
    state: &AppState,
    text: &str,
    currency: Currency,
) -> Result<Amount, ApiError> {
    let amount =
        Amount::parse(text, currency).map_err(|e| ApiError::invalid("amount", e.to_string()))?;
    let max = state.config.currencies[&currency].max_payment_minor;
    if amount.minor() > max {
        return Err(ApiError::invalid(
            "amount",
            format!(
                "must be at most {} per payment",
                format_minor(max, currency)
            ),
        ));
    }
    Ok(amount)
}

/// DESIGN.md §3's table: `balance` and `supplier` charges need an account; `alipay` and
/// `wechatpay` charges must not have one. Anything else is a 400.
fn payment_scope(
    merchant: &Merchant,
    method: Method,
    account: Option<AccountId>,
) -> Result<Scope, ApiError> {
    match (method, account) {
        (Method::Balance | Method::Supplier, Some(account)) => Ok(Scope::Account(
            AccountKey::new(merchant.id.clone(), account),
        )),
        (Method::Balance | Method::Supplier, None) => Err(ApiError::invalid(
            "account_id",
            "is required for methods balance and supplier",
        )),
        (Method::Alipay | Method::Wechatpay, Some(_)) => Err(ApiError::invalid(
            "account_id",
            "is not allowed for alipay and wechatpay charges (they are paid by the customer, not from an account)",
        )),
        (Method::Alipay | Method::Wechatpay, None) => Ok(Scope::merchant(merchant.id.clone())),
    }
}

/// Metadata: at most `max_metadata_keys` string values, keys and values bounded.
fn parse_metadata(
    state: &AppState,
    metadata: Option<&Map<String, Value>>,
) -> Result<Option<Map<String, Value>>, ApiError> {
    let Some(map) = metadata else {
        return Ok(None);
    };
    let limits = &state.config.settings.limits;
    if map.len() > limits.max_metadata_keys {
        return Err(ApiError::invalid(
            "metadata",
            format!("may have at most {} keys", limits.max_metadata_keys),
        ));
    }
    for (key, value) in map {
        if key.is_empty() || key.chars().count() > limits.max_metadata_key_chars {
            return Err(ApiError::invalid(
                format!("metadata.{key}"),
                format!(
                    "keys must be 1 to {} characters",
                    limits.max_metadata_key_chars
                ),
            ));
        }
        match value {
            Value::String(s) if s.chars().count() <= limits.max_metadata_value_chars => {}
            Value::String(_) => {
                return Err(ApiError::invalid(
                    format!("metadata.{key}"),
                    format!(
                        "must be at most {} characters",
                        limits.max_metadata_value_chars
                    ),
                ))
            }
            _ => {
                return Err(ApiError::invalid(
                    format!("metadata.{key}"),
                    "must be a string",
                ))
            }
        }
    }
    Ok(Some(map.clone()))
}

/// A payment by id for this merchant: malformed or unknown → 404, another merchant's → 403.
pub(super) async fn owned_payment(
    state: &AppState,
    merchant: &Merchant,
    id: &str,
) -> Result<(PaymentId, PaymentRecord), ApiError> {
    let not_found = || ApiError::NotFound("no such payment".into());
    let id = PaymentId::parse(id).ok_or_else(not_found)?;
    let payment = match state.balances.payment(&id).await? {
        Some(payment) => payment,
        // Redis may have lost it (failover, flush): the settlement store is the record.
        None => stored_payment(state, &id).await?.ok_or_else(not_found)?,
    };
    if payment.doc.merchant_id != merchant.id.as_str() {
        return Err(ApiError::Forbidden(
            "this payment belongs to another merchant".into(),
        ));
    }
    Ok((id, payment))
}

/// A payment from the settlement store, for when the balance store does not know it.
async fn stored_payment(
    state: &AppState,
    id: &PaymentId,
) -> Result<Option<PaymentRecord>, ApiError> {
    let Some(row) = state.settler.store.payment(id.as_str()).await? else {
        return Ok(None);
    };
    let doc: PaymentDoc = serde_json::from_str(&row.doc).map_err(|e| {
        ApiError::from(crate::preauth::StoreError::Corrupt(format!(
            "stored payment {id}: {e}"
        )))
    })?;
    let status = PaymentStatus::parse(&row.status).ok_or_else(|| {
        ApiError::from(crate::preauth::StoreError::Corrupt(format!(
            "stored status of {id}"
        )))
    })?;
    Ok(Some(PaymentRecord {
        doc,
        status,
        held_minor: row.held_minor,
    }))
}

/// `GET /v1/payments/{id}`.
pub async fn get_payment(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, payment) = owned_payment(&state, &merchant, &id).await?;
    Ok(Json(full_view(&state, &payment).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindQuery {
    merchant_order_id: Option<String>,
    account_id: Option<String>,
}

/// `GET /v1/payments?merchant_order_id=…&account_id=…`: the live payment for that order id.
pub async fn find_payment(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    query: Result<Query<FindQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let order_text = query
        .merchant_order_id
        .ok_or_else(|| ApiError::invalid("merchant_order_id", "is required"))?;
    let not_found = || ApiError::NotFound("no live payment with this merchant_order_id".into());
    let limits = &state.config.settings.limits;
    let order_id = MerchantOrderId::parse(&order_text, limits.max_merchant_order_id_chars)
        .map_err(|_| not_found())?;
    let scope = match query.account_id {
        Some(account) => {
            let account = AccountId::parse(&account).map_err(|_| not_found())?;
            Scope::Account(AccountKey::new(merchant.id.clone(), account))
        }
        None => Scope::merchant(merchant.id.clone()),
    };
    let payment = match state
        .balances
        .live_payment_by_order(&scope, &order_id)
        .await?
    {
        Some(payment) => payment,
        // Redis may have lost it (a restart, a flush): the store keeps every live order id.
        None => {
            let row = state
                .settler
                .store
                .live_payment_by_order(&scope.tag().to_string(), order_id.as_str())
                .await?
                .ok_or_else(not_found)?;
            let pid = PaymentId::parse(&row.id).ok_or_else(not_found)?;
            stored_payment(&state, &pid).await?.ok_or_else(not_found)?
        }
    };
    if payment.doc.merchant_id != merchant.id.as_str() {
        // A scope is a digest of the merchant: never another's, but never shown if it were.
        return Err(not_found());
    }
    Ok(Json(full_view(&state, &payment).await?))
}

/// `POST /v1/payments/{id}/cancel`: a pending payment's open channel orders are closed first;
/// when every channel confirms it was not paid, the payment becomes `canceled` and its hold is
/// released. If a channel says it was paid, the payment succeeds and the cancel answers 422
/// `invalid_state`; a channel that cannot confirm either way answers 503 (nothing changed).
/// Cancelling a canceled payment answers 200 again (a safe retry); any other non-pending
/// status is 422 `invalid_state`.
pub async fn cancel_payment(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let limits = &state.config.settings.limits;
    required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let (id, payment) = owned_payment(&state, &merchant, &id).await?;
    let not_pending = |status: PaymentStatus| ApiError::InvalidState {
        message: format!("only a pending payment can be canceled; this one is {status}"),
        status: Some(status.as_str().to_owned()),
    };
    match payment.status {
        PaymentStatus::Canceled => {
            return Ok(Json(full_view(&state, &payment).await?));
        }
        PaymentStatus::Pending => {}
        status => return Err(not_pending(status)),
    }
    let outcome = match resolution::cancel(&state, &id, payment.doc.expires_at_ms).await {
        Ok(outcome) => outcome,
        Err(ResolveError::Balances(err)) => return Err(err.into()),
        Err(ResolveError::Store(err)) => return Err(err.into()),
        Err(ResolveError::AmountMismatch { .. }) => {
            return Err(ApiError::InvalidState {
                message: "the channel reports this order paid with another amount; it is flagged for review and cannot be canceled".into(),
                status: Some(PaymentStatus::Pending.as_str().to_owned()),
            })
        }
        Err(err) => {
            tracing::warn!(payment_id = %id, error = %err, "cancel could not finish");
            return Err(ApiError::Unavailable {
                reason: "settlement_store_unavailable",
                payment_id: Some(id.to_string()),
            });
        }
    };
    match outcome {
        Cancel::Canceled | Cancel::NotPending(PaymentStatus::Canceled) => {
            let (_, payment) = owned_payment(&state, &merchant, id.as_str()).await?;
            Ok(Json(full_view(&state, &payment).await?))
        }
        Cancel::NotPending(status) => Err(not_pending(status)),
        Cancel::NotFound => Err(ApiError::NotFound("no such payment".into())),
        Cancel::Paid => Err(ApiError::InvalidState {
            message: "the channel reports this payment paid: it succeeded and cannot be canceled"
                .into(),
            status: Some(PaymentStatus::Succeeded.as_str().to_owned()),
        }),
        Cancel::ChannelUnreachable => Err(ApiError::Unavailable {
            reason: "channel_unavailable",
            payment_id: Some(id.to_string()),
        }),
    }
}
