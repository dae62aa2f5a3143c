//! Accounts: create/update (`PUT`), read, and the admin's manual adjustments.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::auth::{AuthAdmin, AuthMerchant};
use super::error::ApiError;
use super::extract::{body_fields, idempotency_key, required_idempotency_key, JsonBody};
use super::{render, AppState};
use crate::ids::{AccountId, MerchantId};
use crate::money::{format_minor, parse_non_negative_minor, Currency, MoneyError};
use crate::payments::accounts::{self, Adjusted, NewAdjustment, Upserted};
use crate::preauth::{AccountKey, Direction};

/// An account id from the path of a write: malformed is a bad request.
fn path_account(id: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(id).map_err(|e| ApiError::invalid("account_id", e.to_string()))
}

fn money_error(field: &str, e: MoneyError) -> ApiError {
    ApiError::invalid(field, e.to_string())
}

body_fields! {
    /// The body of `PUT /v1/accounts/{id}`.
    pub struct AccountBody {
        currency: String,
        credit_limit: String,
    }
}

/// `PUT /v1/accounts/{id}`: `{"currency": "CNY", "credit_limit": "0.00"}`. Creates the account
/// with a zero balance (201) or updates its credit limit (200). The currency never changes.
/// PUT is idempotent by nature; an `Idempotency-Key`, if sent, is checked for form only.
pub async fn put_account(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody<AccountBody>,
) -> Result<Response, ApiError> {
    let limits = &state.config.settings.limits;
    idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let account = path_account(&id)?;
    let body = body.into_known()?;
    let currency = supported_currency(&state, body.currency.required_str()?)?;
    let max_credit = state.config.currencies[&currency].max_credit_limit_minor;
    let credit_limit = match body.credit_limit.str()? {
        Some(text) => {
            parse_non_negative_minor(text, currency).map_err(|e| money_error("credit_limit", e))?
        }
        None => 0,
    };
    if credit_limit > max_credit {
        return Err(ApiError::invalid(
            "credit_limit",
            format!("must be at most {}", format_minor(max_credit, currency)),
        ));
    }

    let key = AccountKey::new(merchant.id.clone(), account);
    let (upserted, snapshot) = accounts::upsert(&state.core, &key, currency, credit_limit).await?;
    let status = match upserted {
        Upserted::Created => StatusCode::CREATED,
        Upserted::Updated => StatusCode::OK,
    };
    Ok((
        status,
        Json(render::account(key.account.as_str(), &snapshot)),
    )
        .into_response())
}

/// `GET /v1/accounts/{id}`. Account ids are per merchant: another merchant's is simply 404.
pub async fn get_account(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::NotFound("no such account".into());
    let account = AccountId::parse(&id).map_err(|_| not_found())?;
    let key = AccountKey::new(merchant.id.clone(), account);
    let snapshot = accounts::read(&state.core, &key)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(render::account(key.account.as_str(), &snapshot)))
}

body_fields! {
    /// The body of `POST /v1/accounts/{id}/adjustments`.
    pub struct AdjustmentBody {
        merchant_id: String,
        direction: String,
        amount: String,
        reason: String,
    }
}

/// `POST /v1/accounts/{id}/adjustments` (admin key): `{"merchant_id", "direction":
/// "credit"|"debit", "amount", "reason"}`. A debit never takes `available` below zero (402).
pub async fn post_adjustment(
    State(state): State<Arc<AppState>>,
    _admin: AuthAdmin,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody<AdjustmentBody>,
) -> Result<Response, ApiError> {
    let limits = &state.config.settings.limits;
    let idempotency = required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let account = path_account(&id)?;
    let body = body.into_known()?;
    let merchant_text = body.merchant_id.required_str()?;
    let merchant = MerchantId::parse(merchant_text)
        .ok()
        .and_then(|m| state.auth.merchant(m.as_str()))
        .ok_or_else(|| ApiError::invalid("merchant_id", "is not a configured merchant"))?;
    let direction = match body.direction.required_str()? {
        "credit" => Direction::Credit,
        "debit" => Direction::Debit,
        _ => {
            return Err(ApiError::invalid(
                "direction",
                "must be \"credit\" or \"debit\"",
            ))
        }
    };
    let amount = body.amount.required_str()?;
    let reason = body
        .reason
        .bounded_str(limits.max_reason_chars)?
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("reason", "is required (say why money moves)"))?;
    let key = AccountKey::new(merchant.id.clone(), account);
    let new = NewAdjustment {
        key: idempotency,
        account: key.clone(),
        direction,
        amount,
        reason,
    };
    let Adjusted { mut doc, account } = accounts::adjust(&state.core, new).await?;
    doc["account"] = render::account(key.account.as_str(), &account);
    Ok((StatusCode::CREATED, Json(doc)).into_response())
}

/// A currency the configuration accepts, else 400 naming `currency`.
pub(super) fn supported_currency(state: &AppState, code: &str) -> Result<Currency, ApiError> {
    Currency::parse(code)
        .ok()
        .filter(|c| state.config.currencies.contains_key(c))
        .ok_or_else(|| {
            let mut accepted: Vec<&str> =
                state.config.currencies.keys().map(|c| c.code()).collect();
            accepted.sort_unstable();
            ApiError::invalid(
                "currency",
                format!("must be one of {}", accepted.join(", ")),
            )
        })
}
