//! `POST /v1/callbacks/{channel_id}`: channel notifications in each channel's own protocol
//! (DESIGN.md §5, §7). Reads top to bottom:
//!
//! 1. the channel by id (unknown → 404);
//! 2. the protocol's verification (signature, timestamp window, probe signatures, our
//!    app/merchant id) — refused in the protocol's failure form, nothing changed, counted;
//! 3. the core decides (`payments::callbacks::notice`: the attempt, the state machine, late
//!    money);
//! 4. the answer in the protocol's form: acknowledged only once what it caused is committed,
//!    else refused or not acknowledged (the channel retries).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::channels::{Callback, CallbackAnswer, Channel};
use crate::payments::callbacks::{self, Handled};
use crate::telemetry;

pub async fn receive(
    State(state): State<Arc<AppState>>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(entry) = state.channels.get(&channel_id) else {
        telemetry::callback("unknown", "unknown_channel");
        return super::error::ApiError::NotFound("no such channel".into()).into_response();
    };
    let channel = entry.channel.as_ref();
    let callback = Callback {
        headers: &headers,
        body: &body,
    };
    let notice = match channel.verify_callback(&callback, telemetry::now_ms()) {
        Ok(notice) => notice,
        Err(refusal) => {
            tracing::warn!(channel = %channel_id, reason = %refusal, "callback refused");
            telemetry::callback(&channel_id, refusal.label());
            return reply(channel, CallbackAnswer::Refused, "verification failed");
        }
    };
    let handled = callbacks::notice(&state.core, &channel_id, notice).await;
    let (answer, label, message) = match handled {
        Handled::Ack(label) => (CallbackAnswer::Ack, label, ""),
        Handled::Refuse(label @ "unknown_order") => {
            (CallbackAnswer::Refused, label, "unknown order")
        }
        Handled::Refuse(label) => (CallbackAnswer::Refused, label, "refused"),
        Handled::Retry(label) => (CallbackAnswer::RetryLater, label, "try again later"),
    };
    telemetry::callback(&channel_id, label);
    reply(channel, answer, message)
}

fn reply(channel: &dyn Channel, answer: CallbackAnswer, message: &str) -> Response {
    let reply = channel.callback_reply(answer, message);
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(reply.content_type),
    );
    response
}
