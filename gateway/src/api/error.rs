//! The one public error type of the HTTP API: stable codes (DESIGN.md §4), one JSON shape
//! `{"error": {"code", "message", ...details}}`, and the one place where internal errors are
//! turned into answers.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::money::format_minor;
use crate::payments::PaymentError;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 400: names the offending field.
    InvalidRequest { field: String, message: String },
    /// 401: missing or wrong API key.
    Unauthorized,
    /// 402: pre-authorization failed.
    InsufficientFunds {
        available: String,
        shortfall: String,
        currency: String,
    },
    /// 403: another merchant's payment, or an admin route without the admin key.
    Forbidden(String),
    /// 404.
    NotFound(String),
    /// 405: a known route called with another method.
    MethodNotAllowed,
    /// 408: the request body did not arrive within `server.body_read_timeout_ms` (code
    /// `invalid_request`, naming `body`, like any other unusable body).
    BodyTimeout { timeout_ms: u64 },
    /// 409: the key was used with another request; never retry with this key.
    IdempotencyConflict,
    /// 409: the first request with this key is still running; retry later.
    IdempotencyInFlight,
    /// 409: the merchant order id belongs to a live payment.
    DuplicateOrder { payment_id: String },
    /// 422: the resource is not in a state that allows this.
    InvalidState {
        message: String,
        status: Option<String>,
    },
    /// 503: every candidate channel was open-circuited or certainly refused the payment; its
    /// hold was released. Carries the (failed) payment's id.
    NoChannelAvailable { payment_id: Option<String> },
    /// 503: a dependency is unreachable or the gateway is overloaded or draining; fail closed.
    Unavailable {
        reason: &'static str,
        payment_id: Option<String>,
    },
}

/// Seconds a client should wait before retrying an in-flight or unavailable request.
const RETRY_AFTER_SECONDS: &str = "1";

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::InsufficientFunds { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::IdempotencyConflict
            | ApiError::IdempotencyInFlight
            | ApiError::DuplicateOrder { .. } => StatusCode::CONFLICT,
            ApiError::InvalidState { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable { .. } | ApiError::NoChannelAvailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::InsufficientFunds { .. } => "insufficient_funds",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed | ApiError::BodyTimeout { .. } => "invalid_request",
            ApiError::IdempotencyConflict => "idempotency_conflict",
            ApiError::IdempotencyInFlight => "idempotency_in_flight",
            ApiError::DuplicateOrder { .. } => "duplicate_order",
            ApiError::InvalidState { .. } => "invalid_state",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::NoChannelAvailable { .. } => "no_channel_available",
        }
    }

    /// The JSON answer `{"error": {...}}` (also written by hand where no router runs:
    /// `api::server` refusing a connection over the cap).
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), self.code().into());
        let message = match self {
            ApiError::InvalidRequest { field, message } => {
                error.insert("field".into(), field.clone().into());
                format!("{field} {message}")
            }
            ApiError::Unauthorized => "missing or invalid API key".into(),
            ApiError::InsufficientFunds {
                available,
                shortfall,
                currency,
            } => {
                error.insert("available".into(), available.clone().into());
                error.insert("shortfall".into(), shortfall.clone().into());
                error.insert("currency".into(), currency.clone().into());
                "the account cannot cover this amount".into()
            }
            ApiError::Forbidden(message) | ApiError::NotFound(message) => message.clone(),
            ApiError::MethodNotAllowed => "this route does not take this HTTP method".into(),
            ApiError::BodyTimeout { timeout_ms } => {
                error.insert("field".into(), "body".into());
                format!("body was not received within {timeout_ms} ms")
            }
            ApiError::IdempotencyConflict => {
                "this Idempotency-Key was already used with a different request; use a new key"
                    .into()
            }
            ApiError::IdempotencyInFlight => {
                "the first request with this Idempotency-Key is still being processed; retry later"
                    .into()
            }
            ApiError::DuplicateOrder { payment_id } => {
                error.insert("payment_id".into(), payment_id.clone().into());
                "merchant_order_id already belongs to a live payment".into()
            }
            ApiError::InvalidState { message, status } => {
                if let Some(status) = status {
                    error.insert("status".into(), status.clone().into());
                }
                message.clone()
            }
            ApiError::Unavailable { reason, payment_id } => {
                error.insert("reason".into(), (*reason).into());
                if let Some(id) = payment_id {
                    error.insert("payment_id".into(), id.clone().into());
                }
                "the gateway cannot process this request right now; retry later".into()
            }
            ApiError::NoChannelAvailable { payment_id } => {
                if let Some(id) = payment_id {
                    error.insert("payment_id".into(), id.clone().into());
                }
                "no channel can take this payment now (every candidate is open-circuited or refused it); nothing was charged".into()
            }
        };
        error.insert("message".into(), message.into());
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if matches!(
            self,
            ApiError::IdempotencyInFlight | ApiError::Unavailable { .. }
        ) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

/// The core's answers, mapped to HTTP in this one place.
impl From<PaymentError> for ApiError {
    fn from(err: PaymentError) -> Self {
        match err {
            PaymentError::Invalid { field, message } => ApiError::invalid(field, message),
            PaymentError::NotFound(missing) => ApiError::NotFound(missing.message().into()),
            PaymentError::OtherMerchant => {
                ApiError::Forbidden("this payment belongs to another merchant".into())
            }
            PaymentError::InsufficientFunds {
                available,
                shortfall,
                currency,
            } => ApiError::InsufficientFunds {
                available: format_minor(available, currency),
                shortfall: format_minor(shortfall, currency),
                currency: currency.code().into(),
            },
            PaymentError::IdempotencyConflict => ApiError::IdempotencyConflict,
            PaymentError::IdempotencyInFlight => ApiError::IdempotencyInFlight,
            PaymentError::DuplicateOrder { payment_id } => ApiError::DuplicateOrder { payment_id },
            PaymentError::InvalidState { message, status } => ApiError::InvalidState {
                message,
                status: status.map(|s| s.as_str().to_owned()),
            },
            PaymentError::NoChannelAvailable { payment_id } => {
                ApiError::NoChannelAvailable { payment_id }
            }
            PaymentError::Unavailable { reason, payment_id } => ApiError::Unavailable {
                reason: reason.as_str(),
                payment_id,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses_are_stable() {
        let cases = [
            (ApiError::invalid("amount", "bad"), 400, "invalid_request"),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (
                ApiError::BodyTimeout { timeout_ms: 10 },
                408,
                "invalid_request",
            ),
            (ApiError::Forbidden("x".into()), 403, "forbidden"),
            (ApiError::NotFound("x".into()), 404, "not_found"),
            (ApiError::IdempotencyConflict, 409, "idempotency_conflict"),
            (ApiError::IdempotencyInFlight, 409, "idempotency_in_flight"),
            (
                ApiError::DuplicateOrder {
                    payment_id: "p".into(),
                },
                409,
                "duplicate_order",
            ),
            (
                ApiError::InvalidState {
                    message: "x".into(),
                    status: None,
                },
                422,
                "invalid_state",
            ),
            (
                ApiError::Unavailable {
                    reason: "r",
                    payment_id: None,
                },
                503,
                "unavailable",
            ),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.status().as_u16(), status);
            assert_eq!(error.code(), code);
            assert_eq!(error.body()["error"]["code"], code);
        }
    }

    #[test]
    fn invalid_request_names_the_field() {
        let body = ApiError::invalid("amount", "must be greater than zero").body();
        assert_eq!(body["error"]["field"], "amount");
        assert_eq!(body["error"]["message"], "amount must be greater than zero");
    }
}
