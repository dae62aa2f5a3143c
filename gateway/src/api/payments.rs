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
use crate::config::Merchant;
use crate::ids::{AccountId, MerchantOrderId, PaymentId};
use crate::money::{format_minor, Amount, Currency};
use crate::preauth::{status_record_id, SettledMark};
use crate::preauth::{
    AccountKey, AuthorizeOutcome, AuthorizeRequest, HoldSpec, IdempotencyClaim, Method, PaymentDoc,
    PaymentRecord, PaymentStatus, Purpose, Scope, StoredOutcome, TransitionOutcome,
};
use crate::settlement::{movements, CommitOutcome, IntentOutcome, PendingRecord, StatusChange};
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
    let description = body.bounded_str("description", limits.max_description_chars)?;
    let notify_url = body.bounded_str("notify_url", limits.max_notify_url_chars)?;
    if let Some(url) = notify_url {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(ApiError::invalid(
                "notify_url",
                "must be an http:// or https:// URL",
            ));
        }
    }
    let metadata = parse_metadata(&state, body.object("metadata")?)?;
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
        // The hold outlives the payment's expiry, so the channel order (which carries the
        // payment's expiry) can never be paid after the hold is gone.
        Method::Supplier => Some(HoldSpec {
            expires_at_ms: expires_at_ms + settings.preauth.hold_grace_seconds * 1000,
            capture_now: false,
        }),
        Method::Alipay | Method::Wechatpay => None,
    };
    // What must reach the settlement store before the client hears back: a balance payment's
    // capture (its sequence number is filled in from the script's answer), or any other
    // payment's intent (so a callback can always be matched and its hold rebuilt).
    let tag = scope.tag();
    let pending = match method {
        Method::Balance => {
            PendingRecord::Settlement(movements::balance_capture(&doc, tag, None, ctx.now_ms))
        }
        _ => PendingRecord::Intent(movements::payment_row(
            &doc,
            tag,
            PaymentStatus::Pending,
            if hold.is_some() { doc.amount_minor } else { 0 },
            hold.map(|h| h.expires_at_ms),
            ctx.now_ms,
        )),
    };
    let request = AuthorizeRequest {
        scope,
        idempotency: IdempotencyClaim {
            key: idempotency,
            request_hash: request_hash("payment", &normalized),
            retention_seconds: settings.preauth.idempotency_retention_seconds,
        },
        order_id,
        doc,
        hold,
        pending_record: Some(pending.to_json()),
    };

    // 3. Admission (the settlement store can take it), then one atomic store call.
    state.settler.admit().map_err(ApiError::not_admitted)?;
    let mut outcome = state.balances.authorize(&request, ctx).await?;
    if let (AuthorizeOutcome::AccountNotFound, Scope::Account(key)) = (&outcome, &request.scope) {
        // Redis may have lost the account: reload it from the record and try once more.
        if reload_account(&state, key).await? {
            outcome = state.balances.authorize(&request, state.op()).await?;
        }
    }

    // 4. Map the outcome (a created payment is made durable first: step 5).
    let insufficient = |available: i64, shortfall: i64| ApiError::InsufficientFunds {
        available: format_minor(available, currency),
        shortfall: format_minor(shortfall, currency),
        currency: currency.code().into(),
    };
    let (label, result) = match outcome {
        AuthorizeOutcome::Created { payment, account } => {
            let seq = account.map(|a| a.seq);
            make_durable(&state, &request, pending, &payment, seq).await?
        }
        AuthorizeOutcome::Replay(StoredOutcome::Payment(id)) => {
            let payment = state.balances.payment(&id).await?.ok_or_else(|| {
                crate::preauth::StoreError::Corrupt(format!("replayed payment {id} is missing"))
            })?;
            ("replayed", Ok(created(&payment)))
        }
        AuthorizeOutcome::Replay(StoredOutcome::InsufficientFunds {
            available,
            shortfall,
        })
        | AuthorizeOutcome::InsufficientFunds {
            available,
            shortfall,
        } => (
            "insufficient_funds",
            Err(insufficient(available, shortfall)),
        ),
        // An adjustment's outcome under this key: the request hash differs, so a conflict.
        AuthorizeOutcome::Replay(StoredOutcome::Adjustment(_))
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
            match state.settler.settle(settlement, mark).await {
                Ok(CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted) => {
                    ("created", Ok(created(payment)))
                }
                Ok(other) => (
                    "unsettled",
                    Err(ApiError::Unavailable {
                        reason: rebuild_reason(&other),
                        payment_id: Some(id.clone()),
                    }),
                ),
                Err(err) => ("unsettled", Err(ApiError::unsettled(id, &err))),
            }
        }
        PendingRecord::Intent(row) => {
            let payment_id = PaymentId::parse(id).expect("a stored payment has a valid id");
            let key = &request.idempotency.key;
            match state.settler.record_intent(&row, mark).await {
                Ok(IntentOutcome::Inserted | IntentOutcome::AlreadyRecorded) => {
                    ("created", Ok(created(payment)))
                }
                Ok(IntentOutcome::DuplicateOrder(holder)) => {
                    // The store knows a live payment Redis forgot: the store wins.
                    state.balances.abandon(&payment_id, key).await?;
                    (
                        "duplicate_order",
                        Err(ApiError::DuplicateOrder { payment_id: holder }),
                    )
                }
                // Undo, so nothing is half done; if even that fails, recovery records the
                // intent later and the key replays then.
                Err(err) => match state.balances.abandon(&payment_id, key).await {
                    Ok(()) => (
                        "unsettled",
                        Err(ApiError::Unavailable {
                            reason: "settlement_store_unavailable",
                            payment_id: None,
                        }),
                    ),
                    Err(_) => ("unsettled", Err(ApiError::unsettled(id, &err))),
                },
            }
        }
        PendingRecord::Status(_) => unreachable!("a new payment has no status change"),
    })
}

fn created(payment: &PaymentRecord) -> Response {
    (StatusCode::CREATED, Json(render::payment(payment))).into_response()
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
async fn owned_payment(
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
    Ok(Json(render::payment(&payment)))
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
    let payment = state
        .balances
        .live_payment_by_order(&scope, &order_id)
        .await?
        .ok_or_else(not_found)?;
    debug_assert_eq!(payment.doc.merchant_id, merchant.id.as_str());
    Ok(Json(render::payment(&payment)))
}

/// `POST /v1/payments/{id}/cancel`: a pending payment becomes `canceled` and its hold is
/// released. Cancelling a canceled payment answers 200 again (a safe retry); any other
/// non-pending status is 422 `invalid_state`.
pub async fn cancel_payment(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let limits = &state.config.settings.limits;
    required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let (id, payment) = owned_payment(&state, &merchant, &id).await?;
    if payment.status == PaymentStatus::Canceled {
        return Ok(Json(render::payment(&payment)));
    }
    match state
        .balances
        .release(&id, PaymentStatus::Canceled, state.op())
        .await?
    {
        TransitionOutcome::Done(payment) => {
            // Tell the store now; if it cannot hear it, recovery will (the status waits in
            // the balance store's outbox).
            let change = StatusChange {
                payment_id: id.as_str().to_owned(),
                status: PaymentStatus::Canceled.as_str().to_owned(),
                updated_at_ms: telemetry::now_ms(),
            };
            let mark = SettledMark {
                tag: id.tag(),
                id: status_record_id(id.as_str()),
                idempotency_key: String::new(),
            };
            if let Err(err) = state.settler.apply_status(&change, mark).await {
                tracing::warn!(payment_id = %id, error = %err, "cancel not yet in the settlement store; recovery will");
            }
            Ok(Json(render::payment(&payment)))
        }
        TransitionOutcome::NotPending(PaymentStatus::Canceled) => {
            let (_, payment) = owned_payment(&state, &merchant, id.as_str()).await?;
            Ok(Json(render::payment(&payment)))
        }
        TransitionOutcome::NotPending(status) => Err(ApiError::InvalidState {
            message: format!("only a pending payment can be canceled; this one is {status}"),
            status: Some(status.as_str().to_owned()),
        }),
        TransitionOutcome::NotFound => Err(ApiError::NotFound("no such payment".into())),
    }
}
