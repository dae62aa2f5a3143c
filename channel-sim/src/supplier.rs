//! The HMAC-JSON supplier protocol (DESIGN.md §5), as the supplier: `POST /v1/orders`,
//! `GET /v1/orders/{id}`, `POST /v1/orders/{id}/close`, `POST /v1/orders/{id}/refunds`.
//!
//! Both directions carry `X-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! (the body is empty for a GET), refused outside 300 s with `401 {"error":"bad signature"}`.
//! Every reply is signed the same way.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::channel::{Channel, Notice};
use crate::clock::{now_unix_ms, now_unix_seconds, parse_rfc3339};
use crate::crypto::random_token;
use crate::record::{
    format_cents, parse_cents, CloseReason, OrderRecord, OrderStatus, RefundRecord,
};

pub const HEADER: &str = "X-Signature";

const WINDOW_SECONDS: u64 = 300;

pub(crate) fn router(channel: Arc<Channel>) -> Router {
    Router::new()
        .route("/v1/orders", post(create))
        .route("/v1/orders/{order_id}", get(query))
        .route("/v1/orders/{order_id}/close", post(close))
        .route("/v1/orders/{order_id}/refunds", post(refund))
        .with_state(channel)
}

fn reply(channel: &Channel, status: StatusCode, body: Value) -> Response {
    let text = body.to_string();
    let signature = channel
        .keys
        .hmac
        .as_ref()
        .expect("a supplier channel has its secret")
        .signature_header(now_unix_seconds(), text.as_bytes());
    (
        status,
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/json".to_owned(),
            ),
            (
                axum::http::HeaderName::from_static("x-signature"),
                signature,
            ),
        ],
        text,
    )
        .into_response()
}

fn refuse(channel: &Channel, status: StatusCode, error: &str) -> Response {
    reply(channel, status, json!({"error": error}))
}

/// Checks `X-Signature`: `Some` signed 401 reply if refused.
fn authenticate(channel: &Channel, headers: &HeaderMap, body: &[u8]) -> Option<Response> {
    let header = headers.get(HEADER).and_then(|v| v.to_str().ok());
    let key = channel
        .keys
        .hmac
        .as_ref()
        .expect("a supplier channel has its secret");
    match header.map(|h| key.verify_header(h.trim(), body, now_unix_seconds(), WINDOW_SECONDS)) {
        Some(Ok(())) => None,
        _ => Some(refuse(channel, StatusCode::UNAUTHORIZED, "bad signature")),
    }
}

fn valid_order_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn status_text(order: &OrderRecord) -> &'static str {
    match order.status {
        OrderStatus::Unpaid => "accepted",
        OrderStatus::Paid => "succeeded",
        OrderStatus::Closed => "closed",
    }
}

fn order_json(order: &OrderRecord) -> Value {
    json!({
        "order_id": order.channel_order_id,
        "supplier_order_id": order.channel_trade_no,
        "status": status_text(order),
        "amount": format_cents(order.amount_cents),
        "currency": order.currency,
        "refunded_amount": format_cents(order.refunded_cents),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    order_id: String,
    amount: String,
    currency: String,
    notify_url: String,
    expires_at: String,
}

async fn create(State(channel): State<Arc<Channel>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = authenticate(&channel, &headers, &body) {
        return refused;
    }
    let bad = |what: &str| {
        refuse(
            &channel,
            StatusCode::BAD_REQUEST,
            &format!("invalid {what}"),
        )
    };
    let Ok(request) = serde_json::from_slice::<CreateBody>(&body) else {
        return bad("body");
    };
    if !valid_order_id(&request.order_id) {
        return bad("order_id");
    }
    let Some(amount_cents) = parse_cents(&request.amount).filter(|c| *c > 0) else {
        return bad("amount");
    };
    if request.currency.len() != 3 || !request.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return bad("currency");
    }
    if !(request.notify_url.starts_with("http://") || request.notify_url.starts_with("https://")) {
        return bad("notify_url");
    }
    let Some(expires_at) = parse_rfc3339(&request.expires_at) else {
        return bad("expires_at");
    };
    if channel.faults().decline {
        return refuse(&channel, StatusCode::UNPROCESSABLE_ENTITY, "declined");
    }
    let fingerprint = format!(
        "{amount_cents}|{}|{}|{}",
        request.currency, request.notify_url, request.expires_at
    );
    let now_ms = now_unix_ms();
    {
        let mut orders = channel.orders();
        if let Some(existing) = orders.by_id.get_mut(&request.order_id) {
            existing.expire_if_due(now_ms);
            if existing.fingerprint != fingerprint {
                return refuse(&channel, StatusCode::CONFLICT, "order_id_conflict");
            }
            existing.create_requests += 1;
            let body = order_json(existing);
            drop(orders);
            return reply(&channel, StatusCode::OK, body);
        }
    }
    if (now_ms / 1000) as i64 >= expires_at {
        return bad("expires_at (already past)");
    }
    let record = OrderRecord {
        channel_id: channel.id.clone(),
        kind: channel.kind,
        channel_order_id: request.order_id,
        channel_trade_no: format!("S-{}", random_token(20)),
        amount_cents,
        currency: request.currency,
        notify_url: request.notify_url,
        status: OrderStatus::Unpaid,
        close_reason: None,
        scanned: false,
        expires_at_unix_seconds: Some(expires_at),
        created_at_unix_ms: now_ms,
        paid_at_unix_ms: None,
        closed_at_unix_ms: None,
        create_requests: 1,
        pay_count: 0,
        refunded_cents: 0,
        refunds: Vec::new(),
        callbacks: Vec::new(),
        fingerprint,
        code_url: None,
        seq: 0,
    };
    match channel.insert_order(record) {
        Ok(order) => reply(&channel, StatusCode::OK, order_json(&order)),
        Err(()) => refuse(&channel, StatusCode::SERVICE_UNAVAILABLE, "too many orders"),
    }
}

async fn query(
    State(channel): State<Arc<Channel>>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = authenticate(&channel, &headers, &body) {
        return refused;
    }
    match channel.order(&order_id) {
        Some(order) => reply(&channel, StatusCode::OK, order_json(&order)),
        None => refuse(&channel, StatusCode::NOT_FOUND, "order_not_found"),
    }
}

async fn close(
    State(channel): State<Arc<Channel>>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = authenticate(&channel, &headers, &body) {
        return refused;
    }
    let result = {
        let mut orders = channel.orders();
        orders.by_id.get_mut(&order_id).map(|order| {
            order.expire_if_due(now_unix_ms());
            if order.status == OrderStatus::Unpaid {
                order.status = OrderStatus::Closed;
                order.close_reason = Some(CloseReason::Closed);
                order.closed_at_unix_ms = Some(now_unix_ms());
            }
            order.clone()
        })
    };
    match result {
        None => refuse(&channel, StatusCode::NOT_FOUND, "order_not_found"),
        Some(order) if order.status == OrderStatus::Paid => reply(
            &channel,
            StatusCode::CONFLICT,
            json!({"error": "order_paid", "status": "succeeded"}),
        ),
        Some(order) => reply(&channel, StatusCode::OK, order_json(&order)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    refund_id: String,
    amount: String,
}

async fn refund(
    State(channel): State<Arc<Channel>>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = authenticate(&channel, &headers, &body) {
        return refused;
    }
    let Ok(request) = serde_json::from_slice::<RefundBody>(&body) else {
        return refuse(&channel, StatusCode::BAD_REQUEST, "invalid body");
    };
    let Some(amount_cents) = parse_cents(&request.amount).filter(|c| *c > 0) else {
        return refuse(&channel, StatusCode::BAD_REQUEST, "invalid amount");
    };
    if !valid_order_id(&request.refund_id) {
        return refuse(&channel, StatusCode::BAD_REQUEST, "invalid refund_id");
    }
    let result = {
        let mut orders = channel.orders();
        match orders.by_id.get_mut(&order_id) {
            None => Err((StatusCode::NOT_FOUND, json!({"error": "order_not_found"}))),
            Some(order) => {
                order.expire_if_due(now_unix_ms());
                if let Some(previous) = order
                    .refunds
                    .iter_mut()
                    .find(|r| r.refund_no == request.refund_id)
                {
                    previous.requests += 1;
                    Ok(previous.clone())
                } else if order.status != OrderStatus::Paid {
                    Err((
                        StatusCode::CONFLICT,
                        json!({"error": "order_not_paid", "status": status_text(order)}),
                    ))
                } else if amount_cents > order.refundable_cents() {
                    Err((
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"error": "refund_exceeds_paid"}),
                    ))
                } else {
                    order.refunded_cents += amount_cents;
                    let refund = RefundRecord {
                        refund_no: request.refund_id.clone(),
                        channel_refund_id: format!("R-{}", random_token(20)),
                        amount_cents,
                        requests: 1,
                        at_unix_ms: now_unix_ms(),
                    };
                    order.refunds.push(refund.clone());
                    Ok(refund)
                }
            }
        }
    };
    match result {
        Err((status, body)) => reply(&channel, status, body),
        Ok(refund) => reply(
            &channel,
            StatusCode::OK,
            json!({
                "refund_id": refund.refund_no,
                "supplier_refund_id": refund.channel_refund_id,
                "order_id": order_id,
                "amount": format_cents(refund.amount_cents),
                "status": "succeeded",
            }),
        ),
    }
}

/// The `succeeded` callback.
pub(crate) fn notice(_channel: &Channel, order: &OrderRecord) -> Notice {
    let body = json!({
        "order_id": order.channel_order_id,
        "supplier_order_id": order.channel_trade_no,
        "status": "succeeded",
        "amount": format_cents(order.amount_cents),
        "currency": order.currency,
    });
    Notice {
        event: "succeeded".into(),
        content_type: "application/json",
        body: body.to_string().into(),
    }
}

/// The protocol's server error (injected faults).
pub(crate) fn server_error() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        r#"{"error":"unavailable"}"#,
    )
        .into_response()
}
