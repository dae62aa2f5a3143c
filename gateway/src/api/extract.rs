//! Parsing requests at the edge: the JSON body (bounded, an object, no unknown fields), typed
//! field access that names the field in every refusal, and the `Idempotency-Key` header.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::AppState;
use crate::ids::IdempotencyKey;

/// A request body that is a JSON object of at most `server.max_body_bytes`.
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<Arc<AppState>> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = state.config.settings.server.max_body_bytes;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| {
                ApiError::invalid("body", format!("must be at most {limit} bytes of JSON"))
            })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(ApiError::invalid("body", "must be a JSON object")),
            Err(e) => Err(ApiError::invalid(
                "body",
                format!("is not valid JSON ({e})"),
            )),
        }
    }
}

impl JsonObject {
    /// Refuses any field not in `allowed`: a misspelt optional field must not be ignored.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(unknown) => Err(ApiError::invalid(unknown.clone(), "is not a known field")),
            None => Ok(()),
        }
    }

    pub fn str(&self, field: &str) -> Result<Option<&str>, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(field, "must be a string")),
        }
    }

    pub fn required_str(&self, field: &str) -> Result<&str, ApiError> {
        self.str(field)?
            .ok_or_else(|| ApiError::invalid(field, "is required"))
    }

    /// A string of at most `max_chars` characters.
    pub fn bounded_str(&self, field: &str, max_chars: usize) -> Result<Option<&str>, ApiError> {
        let value = self.str(field)?;
        if let Some(s) = value {
            if s.chars().count() > max_chars {
                return Err(ApiError::invalid(
                    field,
                    format!("must be at most {max_chars} characters"),
                ));
            }
        }
        Ok(value)
    }

    pub fn u64(&self, field: &str) -> Result<Option<u64>, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(field, "must be a non-negative integer")),
            Some(_) => Err(ApiError::invalid(field, "must be an integer")),
        }
    }

    pub fn object(&self, field: &str) -> Result<Option<&Map<String, Value>>, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map)),
            Some(_) => Err(ApiError::invalid(field, "must be an object")),
        }
    }
}

pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The `Idempotency-Key` header, parsed; `None` when absent.
pub fn idempotency_key(
    headers: &HeaderMap,
    max_chars: usize,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key", "must be visible ASCII"))?;
    IdempotencyKey::parse(text, max_chars)
        .map(Some)
        .map_err(|e| ApiError::invalid("Idempotency-Key", e.to_string()))
}

/// The `Idempotency-Key` header of a POST, which must carry one.
pub fn required_idempotency_key(
    headers: &HeaderMap,
    max_chars: usize,
) -> Result<IdempotencyKey, ApiError> {
    idempotency_key(headers, max_chars)?
        .ok_or_else(|| ApiError::invalid("Idempotency-Key", "header is required on this request"))
}

pub use crate::time::rfc3339;
