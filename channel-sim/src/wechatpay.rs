//! WeChat Pay API v3 (DESIGN.md §5), as the platform: Native orders, query, close, refund.
//!
//! Every request must carry `Authorization: WECHATPAY2-SHA256-RSA2048 mchid="…",
//! nonce_str="…",signature="…",timestamp="…",serial_no="…"` with this channel's mchid and
//! merchant serial, a timestamp within 5 minutes, and a valid RSA-SHA256 signature over
//! `METHOD\nURL\nTIMESTAMP\nNONCE\nBODY\n` (URL = path plus `?query` when there is one);
//! otherwise `401 {"code":"SIGN_ERROR",…}`. Every reply, refusals and `204`s included, is
//! signed with the platform key: `Wechatpay-Timestamp/-Nonce/-Signature/-Serial/
//! -Signature-Type` over `TIMESTAMP\nNONCE\nBODY\n`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::channel::{Channel, Notice};
use crate::clock::{format_rfc3339_beijing, now_unix_ms, now_unix_seconds, parse_rfc3339};
use crate::crypto::{random_digits, random_token};
use crate::record::{CloseReason, OrderRecord, OrderStatus, RefundRecord};

pub const SIGNATURE_TYPE: &str = "WECHATPAY2-SHA256-RSA2048";

/// WeChat Pay's "5 minutes".
const WINDOW_SECONDS: u64 = 300;

pub(crate) fn router(channel: Arc<Channel>) -> Router {
    Router::new()
        .route("/v3/pay/transactions/native", post(native))
        .route("/v3/pay/transactions/out-trade-no/{no}", get(query))
        .route("/v3/pay/transactions/out-trade-no/{no}/close", post(close))
        .route("/v3/refund/domestic/refunds", post(refund))
        .with_state(channel)
}

/// The signature headers of a reply or callback body, fresh timestamp and nonce.
pub(crate) fn signature_headers(channel: &Channel, body: &[u8]) -> Vec<(&'static str, String)> {
    let timestamp = now_unix_seconds().to_string();
    let nonce = random_token(32);
    let mut message = format!("{timestamp}\n{nonce}\n").into_bytes();
    message.extend_from_slice(body);
    message.push(b'\n');
    let signature = channel
        .keys
        .channel_private
        .as_ref()
        .expect("a WeChat Pay channel has its platform key")
        .sign_base64(&message);
    vec![
        ("Wechatpay-Timestamp", timestamp),
        ("Wechatpay-Nonce", nonce),
        ("Wechatpay-Signature", signature),
        (
            "Wechatpay-Serial",
            channel.ids.platform_serial.clone().unwrap_or_default(),
        ),
        ("Wechatpay-Signature-Type", SIGNATURE_TYPE.to_owned()),
    ]
}

/// A signed reply; `body` None = no content.
fn reply(channel: &Channel, status: StatusCode, body: Option<Value>) -> Response {
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    let mut response = (status, text.clone()).into_response();
    let headers = response.headers_mut();
    for (name, value) in signature_headers(channel, text.as_bytes()) {
        headers.insert(name, value.parse().expect("header values are ASCII"));
    }
    headers.insert(
        "Request-ID",
        random_token(24).parse().expect("ASCII request id"),
    );
    if !text.is_empty() {
        headers.insert(
            axum::http::header::CONTENT_TYPE,
            "application/json".parse().expect("static"),
        );
    }
    response
}

fn error(channel: &Channel, status: StatusCode, code: &str, message: &str) -> Response {
    reply(
        channel,
        status,
        Some(json!({"code": code, "message": message})),
    )
}

/// Parses `k="v",k="v"` after the scheme; `None` if malformed or a name repeats.
fn parse_authorization(value: &str) -> Option<Vec<(&str, &str)>> {
    let rest = value.strip_prefix(SIGNATURE_TYPE)?.strip_prefix(' ')?;
    let mut items = Vec::new();
    for item in rest.split(',') {
        let (name, quoted) = item.trim().split_once('=')?;
        let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
        if items.iter().any(|(n, _)| *n == name) || items.len() == 8 {
            return None;
        }
        items.push((name, inner));
    }
    Some(items)
}

/// Checks the `Authorization` header: `Some` signed 401 reply if refused.
fn authenticate(
    channel: &Channel,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Response> {
    check_authorization(channel, method, uri, headers, body)
        .err()
        .map(|message| error(channel, StatusCode::UNAUTHORIZED, "SIGN_ERROR", message))
}

/// Why the `Authorization` header is refused, if it is.
fn check_authorization(
    channel: &Channel,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), &'static str> {
    let refuse = |message: &'static str| Err(message);
    let Some(value) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return refuse("缺少Authorization");
    };
    let Some(items) = parse_authorization(value) else {
        return refuse("Authorization格式错误");
    };
    let get = |name: &str| items.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let (Some(mchid), Some(nonce), Some(signature), Some(timestamp), Some(serial)) = (
        get("mchid"),
        get("nonce_str"),
        get("signature"),
        get("timestamp"),
        get("serial_no"),
    ) else {
        return refuse("Authorization缺少字段");
    };
    if Some(mchid) != channel.ids.mchid.as_deref() {
        return refuse("商户号不匹配");
    }
    if Some(serial) != channel.ids.merchant_serial.as_deref() {
        return refuse("证书序列号不匹配");
    }
    let Some(timestamp_seconds) = (!timestamp.is_empty()
        && timestamp.len() <= 19
        && timestamp.bytes().all(|b| b.is_ascii_digit()))
    .then(|| timestamp.parse::<u64>().ok())
    .flatten() else {
        return refuse("timestamp格式错误");
    };
    if timestamp_seconds.abs_diff(now_unix_seconds()) > WINDOW_SECONDS {
        return refuse("请求已过期");
    }
    if nonce.is_empty() || nonce.contains('\n') {
        return refuse("nonce_str错误");
    }
    let target = uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or_else(|| uri.path());
    let mut message = format!("{method}\n{target}\n{timestamp}\n{nonce}\n").into_bytes();
    message.extend_from_slice(body);
    message.push(b'\n');
    let verifier = channel
        .keys
        .gateway_public
        .as_ref()
        .expect("a WeChat Pay channel has the merchant public key");
    if !verifier.verify_base64(&message, signature) {
        return refuse("签名错误");
    }
    Ok(())
}

#[derive(Deserialize)]
struct Amount {
    total: i64,
    #[serde(default)]
    currency: Option<String>,
}

#[derive(Deserialize)]
struct NativeOrder {
    appid: String,
    mchid: String,
    description: String,
    out_trade_no: String,
    #[serde(default)]
    time_expire: Option<String>,
    notify_url: String,
    amount: Amount,
}

fn valid_out_trade_no(no: &str) -> bool {
    (6..=32).contains(&no.len())
        && no
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'|' || b == b'*')
}

async fn native(
    State(channel): State<Arc<Channel>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = authenticate(&channel, &method, &uri, &headers, &body) {
        return refused;
    }
    let param_error =
        |message: &str| error(&channel, StatusCode::BAD_REQUEST, "PARAM_ERROR", message);
    let Ok(order) = serde_json::from_slice::<NativeOrder>(&body) else {
        return param_error("请求体格式错误");
    };
    if Some(order.mchid.as_str()) != channel.ids.mchid.as_deref() {
        return param_error("mchid与请求方不一致");
    }
    if Some(order.appid.as_str()) != channel.ids.appid.as_deref() {
        return error(
            &channel,
            StatusCode::BAD_REQUEST,
            "APPID_MCHID_NOT_MATCH",
            "appid和mchid不匹配",
        );
    }
    if !valid_out_trade_no(&order.out_trade_no) {
        return param_error("out_trade_no格式错误");
    }
    if order.description.is_empty() || order.description.chars().count() > 127 {
        return param_error("description长度错误");
    }
    if order.amount.total < 1 {
        return param_error("amount.total必须大于0");
    }
    if order.amount.currency.as_deref().is_some_and(|c| c != "CNY") {
        return param_error("amount.currency只支持CNY");
    }
    if !(order.notify_url.starts_with("https://") || order.notify_url.starts_with("http://")) {
        return param_error("notify_url格式错误");
    }
    let expires_at = match &order.time_expire {
        None => None,
        Some(text) => match parse_rfc3339(text) {
            Some(at) => Some(at),
            None => return param_error("time_expire格式错误"),
        },
    };
    if channel.faults().decline {
        return error(
            &channel,
            StatusCode::FORBIDDEN,
            "NO_AUTH",
            "商户无权限（模拟）",
        );
    }
    let total = order.amount.total as u64;
    let fingerprint = format!("{total}|{}|{}", order.description, order.notify_url);
    let now_ms = now_unix_ms();
    {
        let mut orders = channel.orders();
        if let Some(existing) = orders.by_id.get_mut(&order.out_trade_no) {
            existing.expire_if_due(now_ms);
            if existing.fingerprint != fingerprint {
                return error(
                    &channel,
                    StatusCode::BAD_REQUEST,
                    "INVALID_REQUEST",
                    "201 商户订单号重复",
                );
            }
            return match existing.status {
                OrderStatus::Paid => error(
                    &channel,
                    StatusCode::BAD_REQUEST,
                    "ORDERPAID",
                    "该订单已支付",
                ),
                OrderStatus::Closed => error(
                    &channel,
                    StatusCode::BAD_REQUEST,
                    "ORDER_CLOSED",
                    "订单已关闭",
                ),
                OrderStatus::Unpaid => {
                    existing.create_requests += 1;
                    let code_url = existing.code_url.clone();
                    drop(orders);
                    reply(
                        &channel,
                        StatusCode::OK,
                        Some(json!({"code_url": code_url})),
                    )
                }
            };
        }
    }
    let code_url = format!("weixin://wxpay/bizpayurl?pr={}", random_token(9));
    let record = OrderRecord {
        channel_id: channel.id.clone(),
        kind: channel.kind,
        channel_order_id: order.out_trade_no.clone(),
        channel_trade_no: format!("42000{}", random_digits(23)),
        amount_cents: total,
        currency: "CNY".into(),
        notify_url: order.notify_url,
        status: OrderStatus::Unpaid,
        close_reason: None,
        scanned: false,
        expires_at_unix_seconds: expires_at,
        created_at_unix_ms: now_ms,
        paid_at_unix_ms: None,
        closed_at_unix_ms: None,
        create_requests: 1,
        pay_count: 0,
        refunded_cents: 0,
        refunds: Vec::new(),
        callbacks: Vec::new(),
        fingerprint,
        code_url: Some(code_url.clone()),
        seq: 0,
    };
    if channel.insert_order(record).is_err() {
        return error(
            &channel,
            StatusCode::INTERNAL_SERVER_ERROR,
            "SYSTEM_ERROR",
            "too many orders",
        );
    }
    reply(
        &channel,
        StatusCode::OK,
        Some(json!({"code_url": code_url})),
    )
}

fn trade_state(order: &OrderRecord) -> &'static str {
    match order.status {
        OrderStatus::Unpaid => "NOTPAY",
        OrderStatus::Paid if order.refunded_cents > 0 => "REFUND",
        OrderStatus::Paid => "SUCCESS",
        OrderStatus::Closed => "CLOSED",
    }
}

fn transaction_json(channel: &Channel, order: &OrderRecord) -> Value {
    let mut transaction = json!({
        "appid": channel.ids.appid,
        "mchid": channel.ids.mchid,
        "out_trade_no": order.channel_order_id,
        "trade_type": "NATIVE",
        "trade_state": trade_state(order),
        "trade_state_desc": match order.status {
            OrderStatus::Unpaid => "订单未支付",
            OrderStatus::Paid => "支付成功",
            OrderStatus::Closed => "订单已关闭",
        },
        "amount": {
            "total": order.amount_cents,
            "currency": order.currency,
        },
    });
    if let Some(paid_at) = order.paid_at_unix_ms {
        transaction["transaction_id"] = order.channel_trade_no.clone().into();
        transaction["success_time"] = format_rfc3339_beijing((paid_at / 1000) as i64).into();
        transaction["amount"]["payer_total"] = order.amount_cents.into();
        transaction["amount"]["payer_currency"] = order.currency.clone().into();
        transaction["payer"] = json!({"openid": "oSimulatedPayer0000000000000"});
    }
    transaction
}

async fn query(
    State(channel): State<Arc<Channel>>,
    Path(no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = authenticate(&channel, &method, &uri, &headers, &body) {
        return refused;
    }
    let mchid = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "mchid")
        .map(|(_, v)| v.into_owned());
    if mchid.as_deref() != channel.ids.mchid.as_deref() {
        return error(
            &channel,
            StatusCode::BAD_REQUEST,
            "PARAM_ERROR",
            "mchid错误",
        );
    }
    let Some(order) = channel.order(&no) else {
        return error(
            &channel,
            StatusCode::NOT_FOUND,
            "ORDER_NOT_EXIST",
            "订单不存在",
        );
    };
    reply(
        &channel,
        StatusCode::OK,
        Some(transaction_json(&channel, &order)),
    )
}

#[derive(Deserialize)]
struct CloseBody {
    mchid: String,
}

async fn close(
    State(channel): State<Arc<Channel>>,
    Path(no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = authenticate(&channel, &method, &uri, &headers, &body) {
        return refused;
    }
    match serde_json::from_slice::<CloseBody>(&body) {
        Ok(close) if Some(close.mchid.as_str()) == channel.ids.mchid.as_deref() => {}
        _ => {
            return error(
                &channel,
                StatusCode::BAD_REQUEST,
                "PARAM_ERROR",
                "mchid错误",
            )
        }
    }
    let outcome = {
        let mut orders = channel.orders();
        match orders.by_id.get_mut(&no) {
            None => Err((StatusCode::NOT_FOUND, "ORDER_NOT_EXIST", "订单不存在")),
            Some(order) => {
                order.expire_if_due(now_unix_ms());
                match order.status {
                    OrderStatus::Paid => Err((StatusCode::BAD_REQUEST, "ORDERPAID", "订单已支付")),
                    OrderStatus::Closed => Ok(()),
                    OrderStatus::Unpaid => {
                        order.status = OrderStatus::Closed;
                        order.close_reason = Some(CloseReason::Closed);
                        order.closed_at_unix_ms = Some(now_unix_ms());
                        Ok(())
                    }
                }
            }
        }
    };
    match outcome {
        Ok(()) => reply(&channel, StatusCode::NO_CONTENT, None),
        Err((status, code, message)) => error(&channel, status, code, message),
    }
}

#[derive(Deserialize)]
struct RefundAmount {
    refund: i64,
    total: i64,
    currency: String,
}

#[derive(Deserialize)]
struct RefundBody {
    #[serde(default)]
    transaction_id: Option<String>,
    #[serde(default)]
    out_trade_no: Option<String>,
    out_refund_no: String,
    amount: RefundAmount,
}

async fn refund(
    State(channel): State<Arc<Channel>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = authenticate(&channel, &method, &uri, &headers, &body) {
        return refused;
    }
    let Ok(request) = serde_json::from_slice::<RefundBody>(&body) else {
        return error(
            &channel,
            StatusCode::BAD_REQUEST,
            "PARAM_ERROR",
            "请求体格式错误",
        );
    };
    if request.out_refund_no.is_empty()
        || request.out_refund_no.len() > 64
        || request.amount.refund < 1
        || request.amount.currency != "CNY"
    {
        return error(&channel, StatusCode::BAD_REQUEST, "PARAM_ERROR", "参数错误");
    }
    let result = {
        let mut orders = channel.orders();
        let order = match (&request.out_trade_no, &request.transaction_id) {
            (Some(no), _) => orders.by_id.get_mut(no),
            (None, Some(id)) => orders
                .by_id
                .values_mut()
                .find(|o| o.channel_trade_no == *id && o.paid_at_unix_ms.is_some()),
            (None, None) => None,
        };
        match order {
            None => Err((StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "订单不存在")),
            Some(order) => refund_order(order, &request).map(|refund| (order.clone(), refund)),
        }
    };
    match result {
        Err((status, code, message)) => error(&channel, status, code, message),
        Ok((order, refund)) => {
            let at = (refund.at_unix_ms / 1000) as i64;
            reply(
                &channel,
                StatusCode::OK,
                Some(json!({
                    "refund_id": refund.channel_refund_id,
                    "out_refund_no": refund.refund_no,
                    "transaction_id": order.channel_trade_no,
                    "out_trade_no": order.channel_order_id,
                    "channel": "ORIGINAL",
                    "user_received_account": "支付用户零钱",
                    "status": "SUCCESS",
                    "create_time": format_rfc3339_beijing(at),
                    "success_time": format_rfc3339_beijing(at),
                    "amount": {
                        "total": order.amount_cents,
                        "refund": refund.amount_cents,
                        "payer_total": order.amount_cents,
                        "payer_refund": refund.amount_cents,
                        "currency": order.currency,
                    },
                })),
            )
        }
    }
}

type Refused = (StatusCode, &'static str, &'static str);

/// Executes a refund once per `out_refund_no`; a repeat returns the first one unchanged.
fn refund_order(order: &mut OrderRecord, request: &RefundBody) -> Result<RefundRecord, Refused> {
    if let Some(previous) = order
        .refunds
        .iter_mut()
        .find(|r| r.refund_no == request.out_refund_no)
    {
        previous.requests += 1;
        return Ok(previous.clone());
    }
    if order.status != OrderStatus::Paid {
        return Err((StatusCode::BAD_REQUEST, "INVALID_REQUEST", "订单未支付"));
    }
    if request.amount.total as u64 != order.amount_cents {
        return Err((StatusCode::BAD_REQUEST, "PARAM_ERROR", "订单金额不一致"));
    }
    let amount = request.amount.refund as u64;
    if amount > order.refundable_cents() {
        return Err((
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "退款金额超过可退金额",
        ));
    }
    order.refunded_cents += amount;
    let refund = RefundRecord {
        refund_no: request.out_refund_no.clone(),
        channel_refund_id: format!("50300{}", random_digits(24)),
        amount_cents: amount,
        requests: 1,
        at_unix_ms: now_unix_ms(),
    };
    order.refunds.push(refund.clone());
    Ok(refund)
}

/// The `TRANSACTION.SUCCESS` notice: the transaction encrypted with the APIv3 key.
pub(crate) fn notice(channel: &Channel, order: &OrderRecord) -> Notice {
    let plaintext = transaction_json(channel, order).to_string();
    let nonce = random_token(12);
    let associated_data = "transaction";
    let ciphertext = channel
        .keys
        .apiv3
        .as_ref()
        .expect("a WeChat Pay channel has its APIv3 key")
        .seal_base64(&nonce, associated_data, plaintext.as_bytes());
    let body = json!({
        "id": format!("EV-{}", random_token(24)),
        "create_time": format_rfc3339_beijing(now_unix_seconds() as i64),
        "resource_type": "encrypt-resource",
        "event_type": "TRANSACTION.SUCCESS",
        "summary": "支付成功",
        "resource": {
            "original_type": "transaction",
            "algorithm": "AEAD_AES_256_GCM",
            "ciphertext": ciphertext,
            "associated_data": associated_data,
            "nonce": nonce,
        },
    });
    Notice {
        event: "TRANSACTION.SUCCESS".into(),
        content_type: "application/json",
        body: body.to_string().into(),
    }
}

/// The protocol's server error (injected faults).
pub(crate) fn server_error() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        r#"{"code":"SYSTEM_ERROR","message":"系统错误（模拟）"}"#,
    )
        .into_response()
}
