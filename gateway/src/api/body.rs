//! Every request body is read completely, before routing decisions, authentication and
//! admission, so that:
//!
//! - an early answer (`401`, `403`, `404`, `405`, `409`, a load-shed `503`) never leaves
//!   unread bytes on a keep-alive connection: hyper would then close the connection after an
//!   answer that promised to keep it, and the client's next request on it would meet a reset;
//! - the admission permit (`server.max_in_flight_requests`) is taken only once the body is in
//!   memory, so slow senders never hold permits;
//! - a slow body is bounded by `server.body_read_timeout_ms` and a large one by its route's
//!   limit: `server.max_body_bytes`, or [`MAX_CALLBACK_BODY_BYTES`] for channel callbacks,
//!   checked against `Content-Length` before a byte is read.
//!
//! A body that cannot be read whole is refused with `Connection: close`, since the rest of it
//! would otherwise be read as the next request: too large → `400 invalid_request` naming
//! `body` (DESIGN.md §4); too slow → `408` (`invalid_request`, `body`); broken framing or a
//! client error → `400`. Counted in `gateway_http_bodies_refused_total{reason}`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::ApiError;
use super::AppState;
use crate::channels::MAX_CALLBACK_BODY_BYTES;
use crate::telemetry;

/// The channel callback route: channels' notifications are small, whatever the API's limit.
pub const CALLBACK_ROUTE: &str = "/v1/callbacks/{channel_id}";

/// The body limit of a route (`None`: no route matched, the general limit).
pub fn limit_for(route: Option<&str>, max_body_bytes: usize) -> usize {
    match route {
        Some(CALLBACK_ROUTE) => MAX_CALLBACK_BODY_BYTES,
        _ => max_body_bytes,
    }
}

/// Middleware: replaces the request's body with its bytes, read whole within the limits.
pub async fn read_whole(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let server = &state.config.settings.server;
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str());
    let limit = limit_for(route, server.max_body_bytes);
    let timeout = Duration::from_millis(server.body_read_timeout_ms);
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return refuse("too_large", too_large(limit));
    }
    let bytes = match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.is::<LengthLimitError>() => {
            return refuse("too_large", too_large(limit))
        }
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "request body not read");
            return refuse(
                "malformed",
                ApiError::invalid("body", "could not be read (broken framing or connection)"),
            );
        }
        Err(_) => {
            return refuse(
                "timeout",
                ApiError::BodyTimeout {
                    timeout_ms: server.body_read_timeout_ms,
                },
            )
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn too_large(limit: usize) -> ApiError {
    ApiError::invalid("body", format!("must be at most {limit} bytes"))
}

/// The answer to a body that was not read whole: the connection cannot be reused.
fn refuse(reason: &'static str, error: ApiError) -> Response {
    telemetry::http_body_refused(reason);
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_have_their_own_smaller_limit() {
        assert_eq!(limit_for(Some(CALLBACK_ROUTE), 1 << 20), 64 * 1024);
        assert_eq!(limit_for(Some("/v1/payments"), 16_384), 16_384);
        assert_eq!(limit_for(None, 16_384), 16_384);
    }
}
