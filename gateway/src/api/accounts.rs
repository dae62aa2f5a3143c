//! Accounts: create/update (`PUT`), read, and the admin's manual adjustments.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::auth::{AuthAdmin, AuthMerchant};
use super::error::ApiError;
use super::extract::{
    idempotency_key, request_hash, required_idempotency_key, rfc3339, JsonObject,
};
use super::{render, AppState};
use crate::ids::{AccountId, AdjustmentId, MerchantId};
use crate::money::{format_minor, parse_non_negative_minor, Amount, Currency, MoneyError};
use crate::preauth::AccountSnapshot;
use crate::preauth::{
    AccountKey, AdjustOutcome, AdjustRequest, Direction, IdempotencyClaim, SettledMark,
    StoredOutcome, UpsertOutcome,
};
use crate::settlement::rebuild::rebuild_balances;
use crate::settlement::{movements, AccountRow, CommitOutcome, PendingRecord};
use crate::telemetry;

/// An account id from the path of a write: malformed is a bad request.
fn path_account(id: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(id).map_err(|e| ApiError::invalid("account_id", e.to_string()))
}

fn money_error(field: &str, e: MoneyError) -> ApiError {
    ApiError::invalid(field, e.to_string())
}

/// `PUT /v1/accounts/{id}`: `{"currency": "CNY", "credit_limit": "0.00"}`. Creates the account
/// with a zero balance (201) or updates its credit limit (200). The currency never changes.
/// PUT is idempotent by nature; an `Idempotency-Key`, if sent, is checked for form only.
pub async fn put_account(
    State(state): State<Arc<AppState>>,
    AuthMerchant(merchant): AuthMerchant,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let limits = &state.config.settings.limits;
    idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let account = path_account(&id)?;
    body.only(&["currency", "credit_limit"])?;
    let currency = supported_currency(&state, body.required_str("currency")?)?;
    let max_credit = state.config.currencies[&currency].max_credit_limit_minor;
    let credit_limit = match body.str("credit_limit")? {
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
    let ctx = state.op();
    let (status, snapshot) = match state
        .balances
        .upsert_account(&key, currency, credit_limit, ctx)
        .await?
    {
        UpsertOutcome::Created(snapshot) => (StatusCode::CREATED, snapshot),
        UpsertOutcome::Updated(snapshot) => (StatusCode::OK, snapshot),
        UpsertOutcome::CurrencyMismatch(existing) => {
            return Err(ApiError::InvalidState {
                message: format!("the account exists in {existing}; its currency cannot change"),
                status: None,
            })
        }
        UpsertOutcome::OutOfRange => {
            return Err(ApiError::invalid(
                "credit_limit",
                "makes balance + credit_limit out of range",
            ))
        }
    };
    // The account must survive a restart even before money moves: the store has it before
    // the client hears of it (a failure here is a 503; the PUT is safe to retry).
    state
        .settler
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
    let snapshot = read_or_reload(&state, &key).await?.ok_or_else(not_found)?;
    Ok(Json(render::account(key.account.as_str(), &snapshot)))
}

/// The account from the balance store; when that store does not know it but the settlement
/// store does (Redis lost it), the account is reloaded from the record first.
pub(super) async fn read_or_reload(
    state: &AppState,
    key: &AccountKey,
) -> Result<Option<AccountSnapshot>, ApiError> {
    if let Some(snapshot) = state.balances.read_account(key, state.op()).await? {
        return Ok(Some(snapshot));
    }
    if !reload_account(state, key).await? {
        return Ok(None);
    }
    Ok(state.balances.read_account(key, state.op()).await?)
}

/// Loads one account from the settlement store into the balance store; `false` when the
/// settlement store does not know it either.
pub(super) async fn reload_account(state: &AppState, key: &AccountKey) -> Result<bool, ApiError> {
    let loaded = rebuild_balances(
        state.settler.store.as_ref(),
        state.balances.as_ref(),
        Some((key.merchant.as_str(), key.account.as_str())),
        state.settler.idempotency_retention_seconds(),
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "cannot reload an account from the settlement store");
        ApiError::Unavailable {
            reason: "settlement_store_unavailable",
            payment_id: None,
        }
    })?;
    if loaded > 0 {
        tracing::warn!(merchant = %key.merchant, account = %key.account, "account missing from the balance store: reloaded from the settlement store");
    }
    Ok(loaded > 0)
}

/// `POST /v1/accounts/{id}/adjustments` (admin key): `{"merchant_id", "direction":
/// "credit"|"debit", "amount", "reason"}`. A debit never takes `available` below zero (402).
pub async fn post_adjustment(
    State(state): State<Arc<AppState>>,
    _admin: AuthAdmin,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let limits = &state.config.settings.limits;
    let idempotency = required_idempotency_key(&headers, limits.max_idempotency_key_chars)?;
    let account = path_account(&id)?;
    body.only(&["merchant_id", "direction", "amount", "reason"])?;
    let merchant_text = body.required_str("merchant_id")?;
    let merchant = MerchantId::parse(merchant_text)
        .ok()
        .and_then(|m| state.auth.merchant(m.as_str()))
        .ok_or_else(|| ApiError::invalid("merchant_id", "is not a configured merchant"))?;
    let direction = match body.required_str("direction")? {
        "credit" => Direction::Credit,
        "debit" => Direction::Debit,
        _ => {
            return Err(ApiError::invalid(
                "direction",
                "must be \"credit\" or \"debit\"",
            ))
        }
    };
    let amount_text = body.required_str("amount")?;
    let reason = body
        .bounded_str("reason", limits.max_reason_chars)?
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("reason", "is required (say why money moves)"))?;

    // The amount's precision depends on the account's currency, so read the account first.
    let key = AccountKey::new(merchant.id.clone(), account);
    let snapshot = read_or_reload(&state, &key)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such account".into()))?;
    let currency = snapshot.currency;
    let amount = Amount::parse(amount_text, currency).map_err(|e| money_error("amount", e))?;
    let max = state
        .config
        .currencies
        .get(&currency)
        .map_or(0, |l| l.max_adjustment_minor);
    if amount.minor() > max {
        return Err(ApiError::invalid(
            "amount",
            format!("must be at most {}", format_minor(max, currency)),
        ));
    }

    let normalized = json!({
        "account_id": key.account.as_str(),
        "merchant_id": key.merchant.as_str(),
        "direction": direction,
        "amount": amount.minor(),
        "reason": reason,
    });
    // Admission before any money moves: the store must be able to take the settlement.
    // (An adjustment is rare: it does not ask the writer to wait for it.)
    drop(state.settler.admit().map_err(ApiError::not_admitted)?);
    let now_ms = telemetry::now_ms();
    let adjustment_id = AdjustmentId::generate(key.tag, now_ms);
    let template = movements::adjustment(
        &key,
        &adjustment_id,
        direction,
        amount.minor(),
        currency,
        None,
        now_ms,
    );
    let doc = json!({
        "id": adjustment_id.as_str(),
        "merchant_id": key.merchant.as_str(),
        "account_id": key.account.as_str(),
        "direction": direction,
        "amount": format_minor(amount.minor(), currency),
        "currency": currency.code(),
        "reason": reason,
        "created_at": rfc3339(now_ms),
    });
    let request = AdjustRequest {
        idempotency: IdempotencyClaim {
            key: idempotency,
            request_hash: request_hash("adjustment", &normalized),
            retention_seconds: state.config.settings.preauth.idempotency_retention_seconds,
        },
        adjustment_id,
        direction,
        amount_minor: amount.minor(),
        currency,
        doc: doc.to_string(),
        pending_record: PendingRecord::Settlement(template.clone()).to_json(),
        account: key,
    };
    let outcome = state.balances.adjust(&request, state.op()).await?;
    let key = &request.account;
    let insufficient = |available: i64, shortfall: i64| ApiError::InsufficientFunds {
        available: format_minor(available, currency),
        shortfall: format_minor(shortfall, currency),
        currency: currency.code().into(),
    };
    let (label, result) = match outcome {
        AdjustOutcome::Applied(snapshot) => {
            // Answered only once the settlement is committed.
            let mut settlement = template;
            settlement.account_seq = Some(snapshot.seq);
            let mark = SettledMark {
                tag: key.tag,
                id: request.adjustment_id.as_str().to_owned(),
                idempotency_key: request.idempotency.key.as_str().to_owned(),
            };
            match state.settler.settle(settlement, mark).await {
                Ok(CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted) => {
                    let mut body = doc;
                    body["account"] = render::account(key.account.as_str(), &snapshot);
                    (
                        "applied",
                        Ok((StatusCode::CREATED, Json(body)).into_response()),
                    )
                }
                Ok(other) => (
                    "unsettled",
                    Err(ApiError::Unavailable {
                        reason: rebuild_reason(&other),
                        payment_id: Some(request.adjustment_id.as_str().to_owned()),
                    }),
                ),
                Err(err) => (
                    "unsettled",
                    Err(ApiError::unsettled(request.adjustment_id.as_str(), &err)),
                ),
            }
        }
        AdjustOutcome::Replay(StoredOutcome::Adjustment(stored)) => {
            let mut body: Value = serde_json::from_str(&stored)
                .map_err(|e| ApiError::from(crate::preauth::StoreError::Corrupt(e.to_string())))?;
            let snapshot = state
                .balances
                .read_account(key, state.op())
                .await?
                .ok_or_else(|| ApiError::NotFound("no such account".into()))?;
            body["account"] = render::account(key.account.as_str(), &snapshot);
            (
                "replayed",
                Ok((StatusCode::CREATED, Json(body)).into_response()),
            )
        }
        AdjustOutcome::Replay(StoredOutcome::InsufficientFunds {
            available,
            shortfall,
        })
        | AdjustOutcome::InsufficientFunds {
            available,
            shortfall,
        } => (
            "insufficient_funds",
            Err(insufficient(available, shortfall)),
        ),
        // A payment's outcome under this key: the request hash differs, so this is a conflict.
        AdjustOutcome::Replay(
            StoredOutcome::Payment(_)
            | StoredOutcome::NoChannelAvailable(_)
            | StoredOutcome::Refund(_),
        )
        | AdjustOutcome::IdempotencyConflict => {
            ("idempotency_conflict", Err(ApiError::IdempotencyConflict))
        }
        AdjustOutcome::IdempotencyInFlight => {
            ("idempotency_in_flight", Err(ApiError::IdempotencyInFlight))
        }
        AdjustOutcome::AccountNotFound => (
            "not_found",
            Err(ApiError::NotFound("no such account".into())),
        ),
        AdjustOutcome::CurrencyMismatch(existing) => (
            "currency_mismatch",
            Err(ApiError::invalid(
                "amount",
                format!("the account is in {existing}"),
            )),
        ),
        AdjustOutcome::OutOfRange => (
            "out_of_range",
            Err(ApiError::invalid(
                "amount",
                "would take the balance out of range",
            )),
        ),
    };
    telemetry::adjustment_outcome(label);
    result
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

/// Why a settlement that was refused is a 503: a sequence conflict means the balance store
/// rolled back and the account must be rebuilt; a content conflict is flagged for a human.
pub(super) fn rebuild_reason(outcome: &CommitOutcome) -> &'static str {
    match outcome {
        CommitOutcome::SequenceConflict { .. } => "account_rebuild_required",
        _ => "settlement_conflict",
    }
}
