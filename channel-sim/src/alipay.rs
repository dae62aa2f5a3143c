//! Alipay open platform, RSA2 (DESIGN.md §5), as the channel: `POST {base}/gateway.do`.
//!
//! Every request is checked as Alipay does: known method, `app_id`, `sign_type=RSA2`, the
//! RSA-SHA256 signature over every non-empty parameter but `sign`, sorted by name, `k=v`
//! joined by `&` (so `sign_type` is signed), then `charset`, `format`, `version`,
//! `timestamp` and `biz_content`. Replies are `{"<method>_response": {...}, "sign": "..."}`
//! with the object's exact JSON text signed by the channel key — refusals too.
//!
//! Query answers `ACQ.TRADE_NOT_EXIST` until the buyer scans (here: pays), and so does close,
//! as the real service does: a precreated code nobody scanned is not a trade yet, so it cannot
//! be closed and stays payable until its `time_expire` (the gateway must expect late money).
//! Close of a scanned, unpaid order closes it for good and answers `10000`, also when it was
//! already closed, so a retried close resolves an unknown outcome; close of a paid order
//! answers `ACQ.TRADE_STATUS_ERROR`. Refunds are once per `out_request_no` (a repeat
//! answers `fund_change: "N"` and moves nothing).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{Map, Value};

use crate::channel::{Channel, Notice};
use crate::clock::{
    format_alipay_time, now_unix_ms, now_unix_seconds, parse_alipay_time, parse_timeout_express,
};
use crate::crypto::{random_digits, random_token};
use crate::record::{
    format_cents, parse_cents, CloseReason, OrderRecord, OrderStatus, RefundRecord,
};

/// The methods served.
const METHODS: [&str; 4] = [
    "alipay.trade.precreate",
    "alipay.trade.query",
    "alipay.trade.close",
    "alipay.trade.refund",
];

/// The most form parameters a request may carry.
const MAX_PARAMS: usize = 32;

/// Alipay's single-order ceiling: 100 000 000.00 yuan.
const MAX_AMOUNT_CENTS: u64 = 10_000_000_000;

pub(crate) fn router(channel: Arc<Channel>) -> Router {
    Router::new()
        .route("/gateway.do", post(gateway))
        .with_state(channel)
}

/// The signing string: non-empty parameters except those `excluded`, sorted by name.
pub fn sign_content(params: &[(String, String)], excluded: &[&str]) -> String {
    let mut kept: Vec<&(String, String)> = params
        .iter()
        .filter(|(k, v)| !v.is_empty() && !excluded.contains(&k.as_str()))
        .collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    kept.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

struct Refusal {
    code: &'static str,
    sub_code: &'static str,
    sub_msg: String,
}

fn refusal(code: &'static str, sub_code: &'static str, sub_msg: impl Into<String>) -> Refusal {
    Refusal {
        code,
        sub_code,
        sub_msg: sub_msg.into(),
    }
}

fn business(sub_code: &'static str, sub_msg: impl Into<String>) -> Refusal {
    refusal("40004", sub_code, sub_msg)
}

fn invalid(sub_code: &'static str, sub_msg: impl Into<String>) -> Refusal {
    refusal("40002", sub_code, sub_msg)
}

fn missing(sub_code: &'static str, sub_msg: impl Into<String>) -> Refusal {
    refusal("40001", sub_code, sub_msg)
}

async fn gateway(
    State(channel): State<Arc<Channel>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    // Common parameters may come in the query string (as Alipay's SDKs send them) or in
    // the form body; both count, once each.
    let mut params: Vec<(String, String)> = Vec::new();
    if let Some(query) = &query {
        params.extend(form_urlencoded::parse(query.as_bytes()).into_owned());
    }
    params.extend(form_urlencoded::parse(&body).into_owned());
    let method = value(&params, "method").unwrap_or_default().to_owned();
    let response_key = if METHODS.contains(&method.as_str()) {
        format!("{}_response", method.replace('.', "_"))
    } else {
        "error_response".to_owned()
    };
    let object = match handle(&channel, &params, &method) {
        Ok(object) => object,
        Err(refusal) => {
            let msg = match refusal.code {
                "40001" => "Missing Required Arguments",
                "40002" => "Invalid Arguments",
                _ => "Business Failed",
            };
            let mut object = Map::new();
            object.insert("code".into(), refusal.code.into());
            object.insert("msg".into(), msg.into());
            object.insert("sub_code".into(), refusal.sub_code.into());
            object.insert("sub_msg".into(), refusal.sub_msg.into());
            object
        }
    };
    signed_reply(&channel, &response_key, &Value::Object(object))
}

/// `{"<key>": <object>, "sign": "<RSA2 of the object's exact text>"}`.
pub(crate) fn signed_reply(channel: &Channel, response_key: &str, object: &Value) -> Response {
    let text = object.to_string();
    let sign = channel
        .keys
        .channel_private
        .as_ref()
        .expect("an Alipay channel has its key")
        .sign_base64(text.as_bytes());
    let body = format!("{{\"{response_key}\":{text},\"sign\":\"{sign}\"}}");
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
        body,
    )
        .into_response()
}

fn value<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn handle(
    channel: &Arc<Channel>,
    params: &[(String, String)],
    method: &str,
) -> Result<Map<String, Value>, Refusal> {
    if params.len() > MAX_PARAMS {
        return Err(invalid("isv.invalid-parameter", "too many parameters"));
    }
    let mut names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(invalid(
            "isv.invalid-parameter",
            "a parameter appears twice",
        ));
    }
    if method.is_empty() {
        return Err(missing("isv.missing-method", "缺少方法名参数"));
    }
    if !METHODS.contains(&method) {
        return Err(invalid("isv.invalid-method", "不存在的方法名"));
    }
    match value(params, "app_id") {
        None | Some("") => return Err(missing("isv.missing-app-id", "缺少AppID参数")),
        Some(app_id) if Some(app_id) != channel.ids.app_id.as_deref() => {
            return Err(invalid("isv.invalid-app-id", "无效的AppID参数"))
        }
        Some(_) => {}
    }
    match value(params, "sign_type") {
        None | Some("") => return Err(missing("isv.missing-signature-type", "缺少签名类型")),
        Some("RSA2") => {}
        Some(_) => return Err(invalid("isv.invalid-signature-type", "无效的签名类型")),
    }
    let sign = match value(params, "sign") {
        None | Some("") => return Err(missing("isv.missing-signature", "缺少签名参数")),
        Some(sign) => sign,
    };
    let content = sign_content(params, &["sign"]);
    let verifier = channel
        .keys
        .gateway_public
        .as_ref()
        .expect("an Alipay channel has the app public key");
    if !verifier.verify_base64(content.as_bytes(), sign) {
        return Err(invalid("isv.invalid-signature", "验签出错"));
    }
    if value(params, "charset").is_some_and(|c| !c.eq_ignore_ascii_case("utf-8")) {
        return Err(invalid("isv.invalid-charset", "字符集错误"));
    }
    if value(params, "format").is_some_and(|f| !f.eq_ignore_ascii_case("json")) {
        return Err(invalid("isv.invalid-format", "参数格式错误"));
    }
    if value(params, "version") != Some("1.0") {
        return Err(invalid("isv.invalid-version", "版本号错误"));
    }
    match value(params, "timestamp") {
        None | Some("") => return Err(missing("isv.missing-timestamp", "缺少时间戳参数")),
        Some(t) if parse_alipay_time(t).is_none() => {
            return Err(invalid("isv.invalid-timestamp", "非法的时间戳参数"))
        }
        Some(_) => {}
    }
    let biz = Biz(match value(params, "biz_content") {
        None | Some("") => return Err(missing("isv.missing-biz-content", "缺少biz_content")),
        Some(text) => serde_json::from_str(text)
            .map_err(|_| invalid("isv.invalid-parameter", "biz_content is not a JSON object"))?,
    });
    match method {
        "alipay.trade.precreate" => precreate(channel, params, &biz),
        "alipay.trade.query" => query(channel, &biz),
        "alipay.trade.close" => close(channel, &biz),
        _ => refund(channel, &biz),
    }
}

/// The parsed `biz_content`.
struct Biz(Map<String, Value>);

impl Biz {
    /// A string field, empty when absent or not a string.
    fn s(&self, name: &str) -> &str {
        self.0.get(name).and_then(Value::as_str).unwrap_or_default()
    }
}

fn valid_out_trade_no(no: &str) -> bool {
    !no.is_empty()
        && no.len() <= 64
        && no
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn success() -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("code".into(), "10000".into());
    object.insert("msg".into(), "Success".into());
    object
}

fn precreate(
    channel: &Arc<Channel>,
    params: &[(String, String)],
    biz: &Biz,
) -> Result<Map<String, Value>, Refusal> {
    let out_trade_no = biz.s("out_trade_no");
    if out_trade_no.is_empty() {
        return Err(missing("isv.missing-parameter", "out_trade_no"));
    }
    if !valid_out_trade_no(out_trade_no) {
        return Err(invalid("isv.invalid-parameter", "out_trade_no"));
    }
    // `total_amount` is a string in Alipay's examples; a JSON number is accepted too.
    let amount_text = match biz.0.get("total_amount") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(missing("isv.missing-parameter", "total_amount")),
    };
    let amount_cents = parse_cents(&amount_text)
        .filter(|c| (1..=MAX_AMOUNT_CENTS).contains(c))
        .ok_or_else(|| invalid("isv.invalid-parameter", "total_amount"))?;
    let subject = biz.s("subject");
    if subject.is_empty() || subject.chars().count() > 256 {
        return Err(missing("isv.missing-parameter", "subject"));
    }
    let now_ms = now_unix_ms();
    let now_s = now_unix_seconds() as i64;
    let expires_at = match (biz.s("time_expire"), biz.s("timeout_express")) {
        ("", "") => None,
        (time_expire, "") => Some(
            parse_alipay_time(time_expire)
                .ok_or_else(|| invalid("isv.invalid-parameter", "time_expire"))?,
        ),
        (_, express) => Some(
            parse_timeout_express(express, now_s)
                .ok_or_else(|| invalid("isv.invalid-parameter", "timeout_express"))?,
        ),
    };
    if channel.faults().decline {
        return Err(business("ACQ.ACCESS_FORBIDDEN", "交易被拒绝（模拟）"));
    }
    let fingerprint = format!("{amount_cents}|{subject}");
    {
        let mut orders = channel.orders();
        if let Some(order) = orders.by_id.get_mut(out_trade_no) {
            order.expire_if_due(now_ms);
            if order.fingerprint != fingerprint {
                return Err(business("ACQ.CONTEXT_INCONSISTENT", "交易信息被篡改"));
            }
            match order.status {
                OrderStatus::Paid => return Err(business("ACQ.TRADE_HAS_SUCCESS", "交易已被支付")),
                OrderStatus::Closed => return Err(business("ACQ.TRADE_HAS_CLOSE", "交易已经关闭")),
                OrderStatus::Unpaid => {
                    order.create_requests += 1;
                    let mut object = success();
                    object.insert("out_trade_no".into(), out_trade_no.into());
                    object.insert("qr_code".into(), order.code_url.clone().into());
                    return Ok(object);
                }
            }
        }
    }
    let qr_code = format!("https://qr.alipay.com/bax0{}", random_token(20));
    let order = OrderRecord {
        channel_id: channel.id.clone(),
        kind: channel.kind,
        channel_order_id: out_trade_no.to_owned(),
        channel_trade_no: random_digits(28),
        amount_cents,
        currency: "CNY".into(),
        notify_url: value(params, "notify_url").unwrap_or_default().to_owned(),
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
        code_url: Some(qr_code.clone()),
        seq: 0,
    };
    channel
        .insert_order(order)
        .map_err(|()| refusal("20000", "isp.unknow-error", "too many orders"))?;
    let mut object = success();
    object.insert("out_trade_no".into(), out_trade_no.into());
    object.insert("qr_code".into(), qr_code.into());
    Ok(object)
}

fn trade_status(order: &OrderRecord) -> &'static str {
    match order.status {
        OrderStatus::Unpaid => "WAIT_BUYER_PAY",
        // A full refund closes an Alipay trade.
        OrderStatus::Paid if order.refunded_cents == order.amount_cents => "TRADE_CLOSED",
        OrderStatus::Paid => "TRADE_SUCCESS",
        OrderStatus::Closed => "TRADE_CLOSED",
    }
}

/// Finds the order by `out_trade_no` or `trade_no`, expiry applied, and runs `f` on it.
fn with_order<T>(
    channel: &Channel,
    biz: &Biz,
    f: impl FnOnce(&mut OrderRecord) -> Result<T, Refusal>,
) -> Result<T, Refusal> {
    let (out_trade_no, trade_no) = (biz.s("out_trade_no"), biz.s("trade_no"));
    if out_trade_no.is_empty() && trade_no.is_empty() {
        return Err(missing("isv.missing-parameter", "out_trade_no or trade_no"));
    }
    let mut orders = channel.orders();
    let order = if out_trade_no.is_empty() {
        orders
            .by_id
            .values_mut()
            .find(|o| o.channel_trade_no == trade_no)
    } else {
        orders
            .by_id
            .get_mut(out_trade_no)
            .filter(|o| trade_no.is_empty() || o.channel_trade_no == trade_no)
    };
    let order = order.ok_or_else(|| business("ACQ.TRADE_NOT_EXIST", "交易不存在"))?;
    order.expire_if_due(now_unix_ms());
    f(order)
}

fn query(channel: &Channel, biz: &Biz) -> Result<Map<String, Value>, Refusal> {
    with_order(channel, biz, |order| {
        if !order.scanned {
            return Err(business("ACQ.TRADE_NOT_EXIST", "交易不存在"));
        }
        let mut object = success();
        object.insert("trade_no".into(), order.channel_trade_no.clone().into());
        object.insert("out_trade_no".into(), order.channel_order_id.clone().into());
        object.insert("trade_status".into(), trade_status(order).into());
        object.insert(
            "total_amount".into(),
            format_cents(order.amount_cents).into(),
        );
        if let Some(paid_at) = order.paid_at_unix_ms {
            object.insert(
                "buyer_pay_amount".into(),
                format_cents(order.amount_cents).into(),
            );
            object.insert(
                "send_pay_date".into(),
                format_alipay_time((paid_at / 1000) as i64).into(),
            );
        }
        Ok(object)
    })
}

fn close(channel: &Channel, biz: &Biz) -> Result<Map<String, Value>, Refusal> {
    with_order(channel, biz, |order| {
        match order.status {
            OrderStatus::Paid => return Err(business("ACQ.TRADE_STATUS_ERROR", "交易状态不合法")),
            OrderStatus::Unpaid if !order.scanned => {
                return Err(business("ACQ.TRADE_NOT_EXIST", "交易不存在"))
            }
            OrderStatus::Unpaid => {
                order.status = OrderStatus::Closed;
                order.close_reason = Some(CloseReason::Closed);
                order.closed_at_unix_ms = Some(now_unix_ms());
            }
            OrderStatus::Closed => {}
        }
        let mut object = success();
        object.insert("trade_no".into(), order.channel_trade_no.clone().into());
        object.insert("out_trade_no".into(), order.channel_order_id.clone().into());
        Ok(object)
    })
}

fn refund(channel: &Channel, biz: &Biz) -> Result<Map<String, Value>, Refusal> {
    let amount_text = biz.s("refund_amount");
    let amount_cents = parse_cents(amount_text)
        .filter(|c| *c > 0)
        .ok_or_else(|| invalid("isv.invalid-parameter", "refund_amount"))?;
    with_order(channel, biz, |order| {
        // Without `out_request_no`, Alipay takes the trade number: one full refund.
        let request_no = match biz.s("out_request_no") {
            "" => order.channel_order_id.clone(),
            no => no.to_owned(),
        };
        let fund_change =
            if let Some(previous) = order.refunds.iter_mut().find(|r| r.refund_no == request_no) {
                previous.requests += 1;
                "N"
            } else {
                if order.status != OrderStatus::Paid {
                    return Err(business("ACQ.TRADE_STATUS_ERROR", "交易状态不合法"));
                }
                if amount_cents > order.refundable_cents() {
                    return Err(business("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限"));
                }
                order.refunded_cents += amount_cents;
                order.refunds.push(RefundRecord {
                    refund_no: request_no,
                    channel_refund_id: random_digits(28),
                    amount_cents,
                    requests: 1,
                    at_unix_ms: now_unix_ms(),
                });
                "Y"
            };
        let mut object = success();
        object.insert("trade_no".into(), order.channel_trade_no.clone().into());
        object.insert("out_trade_no".into(), order.channel_order_id.clone().into());
        object.insert("fund_change".into(), fund_change.into());
        object.insert(
            "refund_fee".into(),
            format_cents(order.refunded_cents).into(),
        );
        Ok(object)
    })
}

/// An asynchronous notice (`TRADE_SUCCESS`, `TRADE_FINISHED`): a form signed over the
/// sorted parameters without `sign` and `sign_type`.
pub(crate) fn notice(channel: &Channel, order: &OrderRecord, trade_status: &str) -> Notice {
    let now = now_unix_seconds() as i64;
    let paid_at = order.paid_at_unix_ms.map_or(now, |ms| (ms / 1000) as i64);
    let amount = format_cents(order.amount_cents);
    let mut params: Vec<(String, String)> = vec![
        ("notify_id".into(), random_token(28)),
        ("notify_type".into(), "trade_status_sync".into()),
        ("notify_time".into(), format_alipay_time(now)),
        ("charset".into(), "utf-8".into()),
        ("version".into(), "1.0".into()),
        (
            "app_id".into(),
            channel.ids.app_id.clone().unwrap_or_default(),
        ),
        ("trade_no".into(), order.channel_trade_no.clone()),
        ("out_trade_no".into(), order.channel_order_id.clone()),
        ("total_amount".into(), amount.clone()),
        ("receipt_amount".into(), amount.clone()),
        ("buyer_pay_amount".into(), amount),
        ("trade_status".into(), trade_status.into()),
        (
            "gmt_create".into(),
            format_alipay_time((order.created_at_unix_ms / 1000) as i64),
        ),
        ("gmt_payment".into(), format_alipay_time(paid_at)),
        ("sign_type".into(), "RSA2".into()),
    ];
    let content = sign_content(&params, &["sign", "sign_type"]);
    let sign = channel
        .keys
        .channel_private
        .as_ref()
        .expect("an Alipay channel has its key")
        .sign_base64(content.as_bytes());
    params.push(("sign".into(), sign));
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    Notice {
        event: trade_status.into(),
        content_type: "application/x-www-form-urlencoded;charset=utf-8",
        body: body.into(),
    }
}

/// The protocol's server error (injected faults, overload).
pub(crate) fn server_error() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response()
}
