//! Payments: `POST /v1/payments`, top-ups, `GET`, find by order id, cancel. Each handler reads
//! top to bottom: authenticate, parse and check every field at the edge, ONE call into the
//! payment core (`payments::create`, `view`, `resolution::cancel`), render the outcome.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::accounts::supported_currency;
use super::auth::AuthMerchant;
use super::error::ApiError;
use super::extract::{body_fields, required_idempotency_key, Field, JsonBody};
use super::{render, AppState};
use crate::config::Merchant;
use crate::ids::{AccountId, MerchantOrderId};
use crate::money::{format_minor, Amount, Currency};
use crate::payments::create::{self, NewPayment};
use crate::payments::resolution;
use crate::payments::view::{self, PaymentView};
use crate::payments::{accounts, Missing, PaymentError};
use crate::preauth::{AccountKey, Method, Purpose, Scope};

body_fields! {
    /// The body of `POST /v1/payments`.
    pub struct CreateBody {
        merchant_order_id: String,
        amount: String,
        currency: String,
        method: String,
        account_id: String,
        description: String,
        notify_url: String,
        metadata: Map<String, Value>,
        expires_in_seconds: u64,
    }
}

/// The optional fields every payment creation takes, as given.
struct ExtraFields<'a> {
    description: &'a Field<String>,
    notify_url: &'a Field<String>,
    metadata: &'a mut Field<Map<String, Value>>,
    expires_in_seconds: &'a Field<u64>,
}

/// The optional fields every payment creation takes, checked.
struct Extras {
    description: Option<String>,
    notify_url: Option<String>,
    metadata: Option<Map<String, Value>>,
    expires_in_seconds: u64,
}

fn parse_extras(state: &AppState, body: ExtraFields<'_>) -> Result<Extras, ApiError> {
    let settings = &state.config.settings;
    let limits = &settings.limits;
    let description = body.description.bounded_str(limits.max_description_chars)?;
    let notify_url = body.notify_url.bounded_str(limits.max_notify_url_chars)?;
    if let Some(url) = notify_url {
        // Where the merchant's webhooks go: refused here rather than failing every delivery.
        crate::webhooks::delivery::check_url(url, state.config.mode)
            .map_err(|e| ApiError::invalid("notify_url", format!("is not accepted: {e}")))?;
    }
    let metadata = parse_metadata(state, body.metadata.take()?)?;
    let expires_in_seconds = match body.expires_in_seconds.get()? {
        Some(s) => *s,
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
        description: description.map(str::to_owned),
        notify_url: notify_url.map(str::to_owned),
        metadata,
        expires_in_seconds,
    })
}

/// `201` with the payment, its attempts, refunds and webhook deliveries.
fn created(view: PaymentView) -> Response {
    (StatusCode::CREATED, rendered(&view)).into_response()
}

/// The payment resource, written straight into the response.
fn rendered(view: &PaymentView) -> Response {
    Json(render::payment(
        &view.payment,
        &view.attempts,
        &view.refunds,
        &view.webhooks,
    ))
    .into_response()
}

/// `POST /v1/payments`.
pub async fn create_payment(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    headers: HeaderMap,
    body: JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let limits = &state.config.settings.limits;
    let key = required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let mut body = body.into_known()?;
    let order_id = MerchantOrderId::parse(
        body.merchant_order_id.required_str()?,
        limits.max_merchant_order_id_chars,
    )
    .map_err(|e| ApiError::invalid("merchant_order_id", e.to_string()))?;
    let method = Method::parse(body.method.required_str()?).ok_or_else(|| {
        ApiError::invalid(
            "method",
            "must be one of balance, supplier, alipay, wechatpay",
        )
    })?;
    let currency = supported_currency(&state, body.currency.required_str()?)?;
    let amount = parse_payment_amount(&state, body.amount.required_str()?, currency)?;
    let account = body
        .account_id
        .str()?
        .map(|a| AccountId::parse(a).map_err(|e| ApiError::invalid("account_id", e.to_string())))
        .transpose()?;
    let scope = payment_scope(&merchant, method, account)?;
    let extras = parse_extras(
        &state,
        ExtraFields {
            description: &body.description,
            notify_url: &body.notify_url,
            metadata: &mut body.metadata,
            expires_in_seconds: &body.expires_in_seconds,
        },
    )?;
    let new = NewPayment {
        key,
        purpose: Purpose::Charge,
        method,
        scope,
        merchant_order_id: Some(order_id),
        amount,
        currency,
        description: extras.description,
        notify_url: extras.notify_url,
        metadata: extras.metadata,
        expires_in_seconds: extras.expires_in_seconds,
    };
    let creation = create::create(&state.core, &merchant, new).await?;
    Ok(created(creation.view()))
}

body_fields! {
    /// The body of `POST /v1/accounts/{id}/topups`.
    pub struct TopupBody {
        amount: String,
        method: String,
        currency: String,
        merchant_order_id: String,
        description: String,
        notify_url: String,
        metadata: Map<String, Value>,
        expires_in_seconds: u64,
    }
}

/// `POST /v1/accounts/{id}/topups`: a `topup` payment through a channel (`amount`, `method`
/// ∈ alipay, wechatpay, supplier; `currency` defaults to the account's and must equal it;
/// `merchant_order_id` defaults to the payment's id). Answers `201 pending` with the channel's
/// action; the account is credited when the channel confirms (DESIGN.md §3).
pub async fn create_topup(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: JsonBody<TopupBody>,
) -> Result<Response, ApiError> {
    let limits = &state.config.settings.limits;
    let key = required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let account =
        AccountId::parse(&account).map_err(|e| ApiError::invalid("account_id", e.to_string()))?;
    let mut body = body.into_known()?;
    let method = match Method::parse(body.method.required_str()?) {
        Some(method @ (Method::Alipay | Method::Wechatpay | Method::Supplier)) => method,
        _ => {
            return Err(ApiError::invalid(
                "method",
                "must be one of alipay, wechatpay, supplier for a top-up",
            ))
        }
    };
    let account = AccountKey::new(merchant.id.clone(), account);
    let currency = match body.currency.str()? {
        Some(code) => supported_currency(&state, code)?,
        // The account's own currency (one read; a missing account is a 404).
        None => {
            accounts::read(&state.core, &account)
                .await?
                .ok_or(PaymentError::NotFound(Missing::Account))?
                .currency
        }
    };
    let amount = parse_payment_amount(&state, body.amount.required_str()?, currency)?;
    let order_id = body
        .merchant_order_id
        .str()?
        .map(|text| {
            MerchantOrderId::parse(text, limits.max_merchant_order_id_chars)
                .map_err(|e| ApiError::invalid("merchant_order_id", e.to_string()))
        })
        .transpose()?;
    let extras = parse_extras(
        &state,
        ExtraFields {
            description: &body.description,
            notify_url: &body.notify_url,
            metadata: &mut body.metadata,
            expires_in_seconds: &body.expires_in_seconds,
        },
    )?;
    let new = NewPayment {
        key,
        purpose: Purpose::Topup,
        method,
        scope: Scope::Account(account),
        merchant_order_id: order_id,
        amount,
        currency,
        description: extras.description,
        notify_url: extras.notify_url,
        metadata: extras.metadata,
        expires_in_seconds: extras.expires_in_seconds,
    };
    let creation = create::create(&state.core, &merchant, new).await?;
    Ok(created(creation.view()))
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
    metadata: Option<Map<String, Value>>,
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
    for (key, value) in &map {
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
    Ok(Some(map))
}

/// `GET /v1/payments/{id}`.
pub async fn get_payment(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = view::get(&state.core, &merchant.id, &id).await?;
    Ok(rendered(&view))
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
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let order_text = query
        .merchant_order_id
        .ok_or_else(|| ApiError::invalid("merchant_order_id", "is required"))?;
    let not_found = || ApiError::from(PaymentError::NotFound(Missing::LiveOrder));
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
    let view = view::live_by_order(&state.core, &merchant.id, &scope, &order_id).await?;
    Ok(rendered(&view))
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
) -> Result<Response, ApiError> {
    let limits = &state.config.settings.limits;
    required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let view = resolution::cancel_owned(&state.core, &merchant.id, &id).await?;
    Ok(rendered(&view))
}
