//! Alipay open platform, RSA2 (DESIGN.md §5): the signature layer.
//!
//! - Requests: the signing string is every parameter except `sign` whose value is not empty,
//!   sorted by name, joined as `k=v` with `&`, values **not** URL-encoded — so `sign_type` is
//!   signed ([`sign_content`]); `sign` is base64 of RSA-SHA256 with the app's private key
//!   ([`sign`]).
//! - Callbacks: the same string but without `sign` **and** `sign_type`, built from the
//!   URL-decoded form values ([`verify_notify_content`], [`verify_notify`]), checked with
//!   Alipay's public key.
//! - Replies: the `alipay_trade_<method>_response` object is signed as its exact JSON text as
//!   it appears in the body, with a `sign` sibling ([`verify_response`]).
//! - The adapter ([`AlipayChannel`]): precreate, query, close, refund, and asynchronous notices
//!   ([`AlipayChannel::read_notice`]); its reading of replies and notices is documented beside
//!   it.

use std::fmt;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Request, StatusCode};
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::client::{HttpClient, HttpReply};
use super::keys::{RsaPrivateKey, RsaPublicKey};
use super::{
    callback_text, check_callback_size, check_create, now_unix_ms, server_error, shanghai_datetime,
    Action, BaseUrl, Callback, CallbackAnswer, CallbackRefusal, CallbackReply, Channel,
    ChannelError, ChannelKind, ChannelOrderId, CloseOutcome, CreateOrder, Created, Notice,
    NoticeEvent, OrderState, RefundOutcome, RefundRequest,
};
use crate::money::{format_minor, parse_non_negative_minor, Amount, Currency};

/// The only `sign_type` this gateway sends or accepts: RSA-SHA256 ("RSA2"). The legacy
/// "RSA" (SHA-1) is refused.
pub const SIGN_TYPE: &str = "RSA2";

/// The most top-level keys a reply may have (Alipay sends the response object, `sign`, and
/// sometimes `alipay_cert_sn`): a bound on what a hostile body makes the parser keep.
const MAX_REPLY_KEYS: usize = 8;

/// Why an Alipay callback or reply was refused. No variant carries text from the message
/// itself: callers log these, and the message is the sender's to choose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlipayError {
    #[error("no `sign`")]
    MissingSign,
    #[error("`sign_type` is missing or not RSA2")]
    UnsupportedSignType,
    #[error("a parameter or key appears more than once")]
    Duplicate,
    #[error("the reply is not the expected JSON object: {0}")]
    MalformedReply(&'static str),
    #[error("the reply has no `{0}` object")]
    MissingResponse(String),
    #[error("the signature does not verify")]
    BadSignature,
}

/// The request signing string: every parameter except `sign` whose value is not empty, sorted
/// by name (byte order), `k=v` joined by `&`, values as they are (not URL-encoded).
pub fn sign_content(params: &[(&str, &str)]) -> String {
    content_without(params, &["sign"])
}

/// The callback signing string: as [`sign_content`] but without `sign_type` either. `params`
/// are the URL-decoded form fields.
pub fn verify_notify_content(params: &[(&str, &str)]) -> String {
    content_without(params, &["sign", "sign_type"])
}

fn content_without(params: &[(&str, &str)], excluded: &[&str]) -> String {
    let mut kept: Vec<&(&str, &str)> = params
        .iter()
        .filter(|(name, value)| !value.is_empty() && !excluded.contains(name))
        .collect();
    // Stable and by name only: with unique names (which `verify_notify` enforces) the order
    // is the one Alipay's SDKs produce.
    kept.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = String::with_capacity(kept.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (i, (name, value)) in kept.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// `sign`: base64 of RSA-SHA256 over `content` with the app's private key.
pub fn sign(key: &RsaPrivateKey, content: &str) -> String {
    STANDARD.encode(key.sign_sha256(content.as_bytes()))
}

/// Whether `sign_b64` is a valid RSA-SHA256 signature of `content` (an undecodable signature
/// is simply invalid).
pub fn verify(key: &RsaPublicKey, content: &str, sign_b64: &str) -> bool {
    match STANDARD.decode(sign_b64) {
        Ok(signature) => key.verify_sha256(content.as_bytes(), &signature),
        Err(_) => false,
    }
}

/// Verifies a callback's form fields (URL-decoded) with Alipay's public key. Refuses a
/// missing `sign`, a `sign_type` other than RSA2, and repeated parameter names: the caller
/// reads values by name, so every name must mean one value, the signed one. (An empty
/// duplicate would otherwise slip past the signature, empty values not being signed.)
pub fn verify_notify(key: &RsaPublicKey, params: &[(&str, &str)]) -> Result<(), AlipayError> {
    let mut names: Vec<&str> = params.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    if names.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(AlipayError::Duplicate);
    }
    let value_of = |wanted: &str| {
        params
            .iter()
            .find(|(name, _)| *name == wanted)
            .map(|(_, value)| *value)
    };
    if value_of("sign_type") != Some(SIGN_TYPE) {
        return Err(AlipayError::UnsupportedSignType);
    }
    let signature = match value_of("sign") {
        Some(signature) if !signature.is_empty() => signature,
        _ => return Err(AlipayError::MissingSign),
    };
    if verify(key, &verify_notify_content(params), signature) {
        Ok(())
    } else {
        Err(AlipayError::BadSignature)
    }
}

/// The reply key of an API method: `alipay.trade.precreate` → `alipay_trade_precreate_response`.
pub fn response_key(method: &str) -> String {
    format!("{}_response", method.replace('.', "_"))
}

/// A reply's signed part: the exact text of the response object and the `sign` beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedResponse<'a> {
    /// The object's JSON text exactly as in the body (escapes, spacing and key order kept).
    pub text: &'a str,
    /// The decoded `sign` string, if the reply has one.
    pub sign: Option<String>,
}

/// Finds the top-level object `response_key` of a reply body and its `sign` sibling.
///
/// The signed text must be the bytes Alipay signed, so it is cut out of the body, never
/// re-serialized (which would change escapes like `\/`, spacing, or number forms). serde_json's
/// `RawValue` does the cutting: it is the balanced `{…}` found by a real JSON parser that
/// respects strings and escapes, and the whole body is validated on the way. Only top-level
/// keys count (a nested key of the same name is not the response), and a repeated top-level
/// key is refused, so the text verified is the only one a later parse can read.
pub fn signed_response<'a>(
    body: &'a str,
    response_key: &str,
) -> Result<SignedResponse<'a>, AlipayError> {
    let TopLevel(entries) = serde_json::from_str(body)
        .map_err(|_| AlipayError::MalformedReply("not a JSON object of at most 8 keys"))?;
    let mut names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(AlipayError::Duplicate);
    }
    let value_of = |wanted: &str| {
        entries
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, raw)| raw.get())
    };
    let text = value_of(response_key)
        .ok_or_else(|| AlipayError::MissingResponse(response_key.to_owned()))?;
    if !text.starts_with('{') {
        return Err(AlipayError::MalformedReply("the response is not an object"));
    }
    let sign = match value_of("sign") {
        None => None,
        Some(raw) => Some(
            serde_json::from_str::<String>(raw)
                .map_err(|_| AlipayError::MalformedReply("`sign` is not a string"))?,
        ),
    };
    Ok(SignedResponse { text, sign })
}

/// Verifies the reply of API `method` (e.g. `alipay.trade.precreate`) with Alipay's public key
/// and returns the verified response object's text. Parse that text, not the body: it is what
/// the signature covers.
pub fn verify_response<'a>(
    key: &RsaPublicKey,
    body: &'a str,
    method: &str,
) -> Result<&'a str, AlipayError> {
    let signed = signed_response(body, &response_key(method))?;
    let sign = signed.sign.ok_or(AlipayError::MissingSign)?;
    if verify(key, signed.text, &sign) {
        Ok(signed.text)
    } else {
        Err(AlipayError::BadSignature)
    }
}

/// The top-level entries of a reply, values as their raw JSON text, in body order.
struct TopLevel<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    if entries.len() == MAX_REPLY_KEYS {
                        return Err(A::Error::custom("too many keys"));
                    }
                    entries.push(entry);
                }
                Ok(TopLevel(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// The adapter: `alipay.trade.precreate` / `query` / `close` / `refund` (DESIGN.md §5).
//
// Every call is a form POST to `{base}/gateway.do` with the common parameters and
// `biz_content`, signed with the app's key ([`AlipayChannel::request_params`]). Every reply
// must carry a `sign` that verifies, with Alipay's key, over its `alipay_trade_<method>_response`
// object: an unsigned or forged reply is an unknown outcome, never a success nor a decline
// (Alipay leaves some gateway-level errors unsigned; those too are read as unknown, and
// resolved by close). Replies must name our `out_trade_no` where they carry one.
//
// Codes: `10000` success; `20000` (service unavailable) and `ACQ.SYSTEM_ERROR` are server
// errors (unknown); on a precreate, `ACQ.TRADE_HAS_SUCCESS`/`ACQ.TRADE_HAS_CLOSE`/
// `ACQ.TRADE_HAS_FINISHED`/`ACQ.TRADE_STATUS_ERROR` say the order id already exists (unknown);
// `ACQ.TRADE_NOT_EXIST` on a query or close is "no such order"; any other code is a decline.
// A close answered `ACQ.TRADE_STATUS_ERROR` (paid, or already closed) is followed by a query,
// whose state gives the outcome. Amounts are CNY (the adapter refuses other currencies).
// ---------------------------------------------------------------------------------------------

/// `alipay.trade.precreate`: a QR-code order.
pub const METHOD_PRECREATE: &str = "alipay.trade.precreate";
/// `alipay.trade.query`.
pub const METHOD_QUERY: &str = "alipay.trade.query";
/// `alipay.trade.close`.
pub const METHOD_CLOSE: &str = "alipay.trade.close";
/// `alipay.trade.refund`.
pub const METHOD_REFUND: &str = "alipay.trade.refund";

/// Sub-codes of a precreate meaning "this order id already exists" (perhaps ours).
const ORDER_EXISTS_SUB_CODES: [&str; 4] = [
    "ACQ.TRADE_HAS_SUCCESS",
    "ACQ.TRADE_HAS_CLOSE",
    "ACQ.TRADE_HAS_FINISHED",
    "ACQ.TRADE_STATUS_ERROR",
];

/// The Alipay adapter of one configured channel (app `app_id`).
#[derive(Debug)]
pub struct AlipayChannel {
    id: String,
    app_id: String,
    base: BaseUrl,
    app_key: RsaPrivateKey,
    alipay_key: RsaPublicKey,
    http: HttpClient,
}

#[derive(Serialize)]
struct PrecreateBiz<'a> {
    out_trade_no: &'a str,
    total_amount: String,
    subject: &'a str,
    time_expire: String,
}

#[derive(Serialize)]
struct TradeBiz<'a> {
    out_trade_no: &'a str,
}

#[derive(Serialize)]
struct RefundBiz<'a> {
    out_trade_no: &'a str,
    refund_amount: String,
    out_request_no: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    refund_reason: Option<&'a str>,
}

/// The fields of any `alipay_trade_*_response` this adapter reads.
#[derive(Debug, Deserialize)]
struct TradeReply {
    code: String,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    sub_code: Option<String>,
    #[serde(default)]
    sub_msg: Option<String>,
    #[serde(default)]
    out_trade_no: Option<String>,
    #[serde(default)]
    trade_no: Option<String>,
    #[serde(default)]
    qr_code: Option<String>,
    #[serde(default)]
    trade_status: Option<String>,
    #[serde(default)]
    total_amount: Option<String>,
}

const SUCCESS_CODE: &str = "10000";

impl TradeReply {
    fn sub_code(&self) -> &str {
        self.sub_code.as_deref().unwrap_or("")
    }

    /// The error of a reply whose code is not 10000 (callers handle their special codes
    /// first).
    fn error(&self) -> ChannelError {
        let sub_code = self.sub_code();
        if self.code == "20000" || sub_code == "ACQ.SYSTEM_ERROR" {
            return ChannelError::ServerError {
                status: 200,
                code: if sub_code.is_empty() {
                    self.code.clone()
                } else {
                    sub_code.to_owned()
                },
            };
        }
        let code = if sub_code.is_empty() {
            &self.code
        } else {
            sub_code
        };
        ChannelError::declined(code, self.sub_msg.as_deref().unwrap_or(&self.msg))
    }
}

impl AlipayChannel {
    pub fn new(
        id: impl Into<String>,
        app_id: impl Into<String>,
        base: BaseUrl,
        app_key: RsaPrivateKey,
        alipay_key: RsaPublicKey,
        http: HttpClient,
    ) -> Self {
        Self {
            id: id.into(),
            app_id: app_id.into(),
            base,
            app_key,
            alipay_key,
            http,
        }
    }

    /// Every form parameter of a call, `sign` last: the common parameters, `notify_url` when
    /// given, `biz_content`, and the signature over all of them.
    pub fn request_params(
        &self,
        method: &str,
        biz_content: &str,
        notify_url: Option<&str>,
        now_ms: u64,
    ) -> Vec<(&'static str, String)> {
        let mut params: Vec<(&'static str, String)> = vec![
            ("app_id", self.app_id.clone()),
            ("method", method.to_owned()),
            ("format", "JSON".to_owned()),
            ("charset", "utf-8".to_owned()),
            ("sign_type", SIGN_TYPE.to_owned()),
            ("timestamp", shanghai_datetime(now_ms / 1000)),
            ("version", "1.0".to_owned()),
        ];
        if let Some(url) = notify_url {
            params.push(("notify_url", url.to_owned()));
        }
        params.push(("biz_content", biz_content.to_owned()));
        let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let signature = sign(&self.app_key, &sign_content(&borrowed));
        params.push(("sign", signature));
        params
    }

    fn form_request(
        &self,
        method: &str,
        biz_content: &str,
        notify_url: Option<&str>,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        let params = self.request_params(method, biz_content, notify_url, now_ms);
        let mut form = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &params {
            form.append_pair(name, value);
        }
        Request::post(self.base.join("/gateway.do")?)
            .header(
                CONTENT_TYPE,
                "application/x-www-form-urlencoded;charset=utf-8",
            )
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form.finish())))
            .map_err(|e| ChannelError::invalid(e.to_string()))
    }

    fn biz<T: Serialize>(value: &T) -> Result<String, ChannelError> {
        serde_json::to_string(value).map_err(|e| ChannelError::invalid(e.to_string()))
    }

    /// `alipay.trade.precreate`: `out_trade_no, total_amount, subject, time_expire`.
    pub fn create_request(
        &self,
        req: &CreateOrder,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        check_create(req, now_ms)?;
        if req.currency != Currency::Cny {
            return Err(ChannelError::invalid("Alipay orders are in CNY only"));
        }
        let biz = Self::biz(&PrecreateBiz {
            out_trade_no: req.order_id.as_str(),
            total_amount: format_minor(req.amount.minor(), Currency::Cny),
            subject: &req.description,
            time_expire: shanghai_datetime(req.expires_at_ms / 1000),
        })?;
        self.form_request(METHOD_PRECREATE, &biz, Some(&req.notify_url), now_ms)
    }

    pub fn query_request(
        &self,
        order: &ChannelOrderId,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        self.trade_request(METHOD_QUERY, order, now_ms)
    }

    pub fn close_request(
        &self,
        order: &ChannelOrderId,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        self.trade_request(METHOD_CLOSE, order, now_ms)
    }

    /// A call whose only business content is the order (`query`, `close`).
    fn trade_request(
        &self,
        method: &str,
        order: &ChannelOrderId,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        let biz = Self::biz(&TradeBiz {
            out_trade_no: order.as_str(),
        })?;
        self.form_request(method, &biz, None, now_ms)
    }

    /// `alipay.trade.refund` with the caller's persisted `out_request_no`.
    pub fn refund_request(
        &self,
        req: &RefundRequest,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        if req.currency != Currency::Cny {
            return Err(ChannelError::invalid("Alipay refunds are in CNY only"));
        }
        let biz = Self::biz(&RefundBiz {
            out_trade_no: req.order_id.as_str(),
            refund_amount: format_minor(req.amount.minor(), Currency::Cny),
            out_request_no: req.refund_id.as_str(),
            refund_reason: req.reason.as_deref(),
        })?;
        self.form_request(METHOD_REFUND, &biz, None, now_ms)
    }

    /// The verified response object of `method`, parsed; checks `out_trade_no` when present.
    fn verified(
        &self,
        reply: &HttpReply,
        method: &str,
        order: &ChannelOrderId,
    ) -> Result<TradeReply, ChannelError> {
        if let Some(error) = server_error(reply.status) {
            return Err(error);
        }
        if reply.status != StatusCode::OK {
            return Err(ChannelError::unverifiable(format!(
                "HTTP {} from the Alipay gateway",
                reply.status.as_u16()
            )));
        }
        let text = verify_response(&self.alipay_key, reply.text()?, method)
            .map_err(|e| ChannelError::unverifiable(e.to_string()))?;
        let parsed: TradeReply = serde_json::from_str(text)
            .map_err(|_| ChannelError::unverifiable("the response object does not parse"))?;
        if parsed
            .out_trade_no
            .as_deref()
            .is_some_and(|no| no != order.as_str())
        {
            return Err(ChannelError::unverifiable("the reply is for another order"));
        }
        Ok(parsed)
    }

    pub fn parse_create(
        &self,
        req: &CreateOrder,
        reply: &HttpReply,
    ) -> Result<Created, ChannelError> {
        let parsed = self.verified(reply, METHOD_PRECREATE, &req.order_id)?;
        if parsed.code != SUCCESS_CODE {
            if ORDER_EXISTS_SUB_CODES.contains(&parsed.sub_code()) {
                return Err(ChannelError::UnexpectedReply {
                    reason: format!("{}: the order id already exists", parsed.sub_code()),
                });
            }
            return Err(parsed.error());
        }
        let qr_code = parsed
            .qr_code
            .ok_or_else(|| ChannelError::unverifiable("a precreate success without qr_code"))?;
        Ok(Created {
            action: Action::QrCode(qr_code),
            channel_txn_id: None,
        })
    }

    pub fn parse_query(
        &self,
        order: &ChannelOrderId,
        reply: &HttpReply,
    ) -> Result<OrderState, ChannelError> {
        let parsed = self.verified(reply, METHOD_QUERY, order)?;
        if parsed.code != SUCCESS_CODE {
            if parsed.sub_code() == "ACQ.TRADE_NOT_EXIST" {
                return Ok(OrderState::NotFound);
            }
            return Err(parsed.error());
        }
        match parsed.trade_status.as_deref() {
            Some("WAIT_BUYER_PAY") => Ok(OrderState::Pending),
            Some("TRADE_SUCCESS" | "TRADE_FINISHED") => {
                let amount = parsed
                    .total_amount
                    .as_deref()
                    .ok_or_else(|| ChannelError::unverifiable("a paid trade without amount"))?;
                let amount_minor = parse_non_negative_minor(amount, Currency::Cny)
                    .map_err(|_| ChannelError::unverifiable("malformed total_amount"))?;
                Ok(OrderState::Paid {
                    channel_txn_id: parsed.trade_no.unwrap_or_default(),
                    amount_minor,
                    currency: Currency::Cny,
                })
            }
            Some("TRADE_CLOSED") => Ok(OrderState::Closed),
            _ => Err(ChannelError::UnexpectedReply {
                reason: "unknown trade_status".into(),
            }),
        }
    }

    /// The close reply: `Ok(Some(outcome))` when it says, `Ok(None)` when a query must tell
    /// (`ACQ.TRADE_STATUS_ERROR`: paid, or already closed).
    pub fn parse_close(
        &self,
        order: &ChannelOrderId,
        reply: &HttpReply,
    ) -> Result<Option<CloseOutcome>, ChannelError> {
        let parsed = self.verified(reply, METHOD_CLOSE, order)?;
        if parsed.code == SUCCESS_CODE {
            return Ok(Some(CloseOutcome::Closed));
        }
        match parsed.sub_code() {
            "ACQ.TRADE_NOT_EXIST" => Ok(Some(CloseOutcome::NotFound)),
            "ACQ.TRADE_STATUS_ERROR" => Ok(None),
            _ => Err(parsed.error()),
        }
    }

    pub fn parse_refund(
        &self,
        req: &RefundRequest,
        reply: &HttpReply,
    ) -> Result<RefundOutcome, ChannelError> {
        let parsed = self.verified(reply, METHOD_REFUND, &req.order_id)?;
        if parsed.code != SUCCESS_CODE {
            return Err(parsed.error());
        }
        // Alipay refunds synchronously; a retried `out_request_no` answers 10000 again
        // (with `fund_change: N`): the refund happened once, which is success for the caller.
        Ok(RefundOutcome::Succeeded {
            channel_refund_id: None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Callbacks (asynchronous notices, DESIGN.md §5).
//
// A notice is a form POST (`application/x-www-form-urlencoded`, UTF-8). Read in this order,
// each step refusing with its own [`CallbackRefusal`]:
//
// 1. at most [`MAX_CALLBACK_BODY_BYTES`] and [`MAX_CALLBACK_FIELDS`] fields (`Malformed`);
// 2. [`verify_notify`] with Alipay's key: a repeated field name is `Malformed`; a missing
//    `sign`, a `sign_type` other than RSA2 or a signature that does not verify is
//    `BadSignature`;
// 3. `app_id` must be this channel's (`WrongAccount`);
// 4. `out_trade_no` must be one of our channel order ids, `trade_status` present, the ids and
//    status at most [`MAX_CALLBACK_TEXT_BYTES`] of visible ASCII, amounts exact CNY
//    (`Malformed`).
//
// Empty values are left out of the signed string, so anyone can add `out_biz_no=` to a
// genuine notice without breaking its signature: an empty value is read as absent, always.
//
// Alipay has no timestamp window (`notify_time` is informational) and a notice is delivered
// again for about 25 h until acknowledged, so `now` plays no part. What a status means:
//
// | `trade_status`    | refund fields (`refund_fee`, `out_biz_no`, `gmt_refund`) | event        |
// |-------------------|----------------------------------------------------------|--------------|
// | `TRADE_SUCCESS`   | none                                                     | `Paid`       |
// | `TRADE_SUCCESS`   | any (then `refund_fee` is required)                      | `Refund`     |
// | `TRADE_FINISHED`  | ignored                                                  | `Finished`   |
// | `TRADE_CLOSED`    | `refund_fee` (a full refund)                             | `Refund`     |
// | `TRADE_CLOSED`    | no `refund_fee`                                          | `Closed`     |
// | anything else     | ignored                                                  | `Other`      |
//
// The answer is the plain text `success` (acknowledged) or `fail` (anything but `success`
// makes Alipay deliver again): 400 for a refusal, 500 for "try later".
// ---------------------------------------------------------------------------------------------

/// The most form fields a notice may have (Alipay sends about 25).
pub const MAX_CALLBACK_FIELDS: usize = 64;

/// The acknowledgement Alipay waits for; any other answer is a failure it retries.
pub const CALLBACK_ACK: &str = "success";

/// What the gateway answers to a notice it did not take (any text but `success` would do).
pub const CALLBACK_FAIL: &str = "fail";

impl AlipayChannel {
    /// Verifies and reads an asynchronous notice: see the table above.
    pub fn read_notice(&self, body: &[u8]) -> Result<Notice, CallbackRefusal> {
        check_callback_size(body)?;
        let mut fields: Vec<(String, String)> = Vec::new();
        for (name, value) in form_urlencoded::parse(body) {
            if fields.len() == MAX_CALLBACK_FIELDS {
                return Err(CallbackRefusal::Malformed(format!(
                    "more than {MAX_CALLBACK_FIELDS} form fields"
                )));
            }
            fields.push((name.into_owned(), value.into_owned()));
        }
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        verify_notify(&self.alipay_key, &fields).map_err(|e| match e {
            AlipayError::Duplicate => CallbackRefusal::Malformed(e.to_string()),
            _ => CallbackRefusal::BadSignature(e.to_string()),
        })?;
        // Unique names (checked above); empty values are unsigned, so absent.
        let value = |wanted: &str| {
            fields
                .iter()
                .find(|(name, _)| *name == wanted)
                .map(|(_, value)| *value)
                .filter(|value| !value.is_empty())
        };
        let required = |name: &'static str| {
            value(name).ok_or_else(|| CallbackRefusal::Malformed(format!("no `{name}`")))
        };
        if required("app_id")? != self.app_id {
            return Err(CallbackRefusal::WrongAccount(
                "`app_id` is not this channel's".into(),
            ));
        }
        let order_id = ChannelOrderId::parse(required("out_trade_no")?).ok_or_else(|| {
            CallbackRefusal::Malformed("`out_trade_no` is not a channel order id of ours".into())
        })?;
        let notice_id = value("notify_id")
            .map(|id| callback_text("notify_id", id))
            .transpose()?;
        let status = callback_text("trade_status", required("trade_status")?)?;
        let paid = || -> Result<(String, i64), CallbackRefusal> {
            Ok((
                callback_text("trade_no", required("trade_no")?)?,
                callback_amount("total_amount", required("total_amount")?)?,
            ))
        };
        let refund = || -> Result<NoticeEvent, CallbackRefusal> {
            Ok(NoticeEvent::Refund {
                refund_id: value("out_biz_no")
                    .map(|id| callback_text("out_biz_no", id))
                    .transpose()?,
                amount_minor: callback_amount("refund_fee", required("refund_fee")?)?,
                succeeded: true,
            })
        };
        let has_refund_fields = ["refund_fee", "out_biz_no", "gmt_refund"]
            .iter()
            .any(|name| value(name).is_some());
        let event = match status.as_str() {
            "TRADE_SUCCESS" if has_refund_fields => refund()?,
            "TRADE_SUCCESS" => {
                let (channel_txn_id, amount_minor) = paid()?;
                NoticeEvent::Paid {
                    channel_txn_id,
                    amount_minor,
                    currency: Currency::Cny,
                }
            }
            "TRADE_FINISHED" => {
                let (channel_txn_id, amount_minor) = paid()?;
                NoticeEvent::Finished {
                    channel_txn_id,
                    amount_minor,
                    currency: Currency::Cny,
                }
            }
            // A full refund closes the trade: the refund logic's business, not "never paid".
            "TRADE_CLOSED" if value("refund_fee").is_some() => refund()?,
            "TRADE_CLOSED" => NoticeEvent::Closed,
            // `WAIT_BUYER_PAY` (sent when a trade is created, if the app asked) and any status
            // Alipay may add: genuine, acknowledged, nothing to do.
            _ => NoticeEvent::Other(status),
        };
        Ok(Notice {
            order_id,
            notice_id,
            event,
        })
    }
}

/// A positive CNY amount, exactly (no rounding: too many decimals is malformed).
fn callback_amount(name: &str, value: &str) -> Result<i64, CallbackRefusal> {
    Amount::parse(value, Currency::Cny)
        .map(Amount::minor)
        .map_err(|e| CallbackRefusal::Malformed(format!("`{name}` {e}")))
}

#[async_trait]
impl Channel for AlipayChannel {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> ChannelKind {
        ChannelKind::Alipay
    }

    async fn create_order(&self, req: &CreateOrder) -> Result<Created, ChannelError> {
        let reply = self
            .http
            .send(self.create_request(req, now_unix_ms())?)
            .await?;
        self.parse_create(req, &reply)
    }

    async fn query(&self, order: &ChannelOrderId) -> Result<OrderState, ChannelError> {
        let reply = self
            .http
            .send(self.query_request(order, now_unix_ms())?)
            .await?;
        self.parse_query(order, &reply)
    }

    async fn close(&self, order: &ChannelOrderId) -> Result<CloseOutcome, ChannelError> {
        let reply = self
            .http
            .send(self.close_request(order, now_unix_ms())?)
            .await?;
        if let Some(outcome) = self.parse_close(order, &reply)? {
            return Ok(outcome);
        }
        self.query(order)
            .await?
            .after_close()
            .ok_or_else(|| ChannelError::UnexpectedReply {
                reason: "the trade is still payable after the close".into(),
            })
    }

    async fn refund(&self, req: &RefundRequest) -> Result<RefundOutcome, ChannelError> {
        let reply = self
            .http
            .send(self.refund_request(req, now_unix_ms())?)
            .await?;
        self.parse_refund(req, &reply)
    }

    /// Alipay's notices carry no timestamp window: `now_ms` is not used.
    fn verify_callback(
        &self,
        callback: &Callback<'_>,
        _now_ms: u64,
    ) -> Result<Notice, CallbackRefusal> {
        self.read_notice(callback.body)
    }

    /// `success` acknowledges; `fail` (400 refused, 500 try later) makes Alipay retry. The
    /// message is not sent: Alipay reads nothing but the exact text.
    fn callback_reply(&self, answer: CallbackAnswer, _message: &str) -> CallbackReply {
        let (status, body) = match answer {
            CallbackAnswer::Ack => (200, CALLBACK_ACK),
            CallbackAnswer::Refused => (400, CALLBACK_FAIL),
            CallbackAnswer::RetryLater => (500, CALLBACK_FAIL),
        };
        CallbackReply {
            status,
            content_type: "text/plain",
            body: body.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::test_keys::*;
    use proptest::prelude::*;

    // Independent vectors: printed by scripts/gen-signature-vectors.sh (the strings built
    // with `sort`, the signatures by `openssl dgst -sha256 -sign`), with the fixture keys.
    const BIZ_CONTENT: &str = r#"{"out_trade_no":"att_01HX7Z3K9Q2W","total_amount":"88.88","subject":"Top-up 充值 & more","timeout_express":"15m"}"#;
    const REQUEST_CONTENT: &str = r#"app_id=2021000000000001&biz_content={"out_trade_no":"att_01HX7Z3K9Q2W","total_amount":"88.88","subject":"Top-up 充值 & more","timeout_express":"15m"}&charset=utf-8&format=JSON&method=alipay.trade.precreate&notify_url=https://gateway.example.com/v1/callbacks/alipay/ali-main&sign_type=RSA2&timestamp=2024-05-01 20:00:00&version=1.0"#;
    const REQUEST_SIGN: &str = "G5j4o5lZe1O6gULXgPe3H7dYvgF4a5SI5Qb75TFINzD9SvH9Zk49bBdBxJf5o2w8J97suYWCNSIrDFg6pA7s63/QoP0mtBkuAx5Q++i/JccRBE7Qr0CNa/UuEJ5K5nMGpZh9YTANwDQVxQnCkIOWE3ARbZrZNVx1olAUcfzFAHVwIzMcmY6F3MUHE3E4PGoYA++xDJKFAIZLObfPjvn5JSzGznMar2fo/5R7E4TlRCTRRUIPesaCpNIkazevevua+G9l9ILSCNz+uXgRissyV1/vlO9vQblrjG/lzaT017lvoGPVUGnsZiejfGkv/9ATgBDf1FRE0jX/CbKVicWOew==";
    const NOTIFY_CONTENT: &str = r#"app_id=2021000000000001&buyer_logon_id=abc***@example.com&charset=utf-8&fund_bill_list=[{"amount":"88.88","fundChannel":"ALIPAYACCOUNT"}]&gmt_payment=2024-05-01 20:01:01&notify_id=2024050100222200000012345678&notify_time=2024-05-01 20:01:02&notify_type=trade_status_sync&out_trade_no=att_01HX7Z3K9Q2W&receipt_amount=88.88&subject=Top-up 充值 & more&total_amount=88.88&trade_no=2024050122001400000000000001&trade_status=TRADE_SUCCESS&version=1.0"#;
    const NOTIFY_SIGN: &str = "QuV0nVC4dlkBG/EieUSRw7lgCD45zvJEQRJK2DQRy704ir/vBWT2PlykcGFKnlgaem51D4tS0ZCceJ+B1ZT0r6oU6167H19eb6TeuU1NmFkOnUR8mZCriQSUhESvifPEM5P3t/1z64sD7x2KZNtZ5zL7EAqYektmemZrvgAPjtpA/0bxCrdeJfxUEdfEpvja7H+2TmjPzpZpgoT3YIVzrZnm3DKyiso+71hRQMgKKuSG0c+MDAd3z0XlyIKAluyVU96o6l1ER5HoiPBTrC3Y+DqXub0qCPeXNjnqXzLj19aaYe3T6bSH1oET5FQI2vTfKM/ohqMHmjaYUXXWWOlySA==";
    const RESPONSE_OBJECT: &str = r#"{"code":"10000","msg":"Success","out_trade_no":"att_01HX7Z3K9Q2W","qr_code":"https:\/\/qr.alipay.com\/bax08431pqrs}0e5a"}"#;
    const RESPONSE_SIGN: &str = "BZD0t8sUxXJ8p1zuA3TsftEgplktn6SyEm5f+2fpj1rL8KI3+cQxJeX+opAZPAaIJout14eV8Rah/ZpvU9qBdj15QAo/kIcqn8h8NUPsCoodZV7GDHqRkFUefqsVxoOZusGjQRR+2YDf3VO6gEoxjMjWusGqQgIsOj+HkCWg+0FEs+zYOFrubqPvKl1vSnPWU+TY+5JkKd+mMRIRXQSk2XcKOM9teSDyO1C6ycXSPY184ZVGrR3P5NnHDsSrUebTdWcfLQ4SRecueI2/qvH+4JpZQQwJtnmmA3JjoUUZl5a/EZ5dITwLuZoKHx1TtqJ8F+2tfJ6Y6ddQBev9WpzlTQ==";

    fn request_params() -> Vec<(&'static str, &'static str)> {
        vec![
            ("app_id", "2021000000000001"),
            ("method", "alipay.trade.precreate"),
            ("format", "JSON"),
            ("charset", "utf-8"),
            ("sign_type", "RSA2"),
            ("timestamp", "2024-05-01 20:00:00"),
            ("version", "1.0"),
            (
                "notify_url",
                "https://gateway.example.com/v1/callbacks/alipay/ali-main",
            ),
            ("app_auth_token", ""),
            ("biz_content", BIZ_CONTENT),
            // A stale signature from an earlier attempt is never part of the signed string.
            ("sign", "stale"),
        ]
    }

    fn notify_params() -> Vec<(&'static str, &'static str)> {
        vec![
            ("notify_id", "2024050100222200000012345678"),
            ("notify_type", "trade_status_sync"),
            ("notify_time", "2024-05-01 20:01:02"),
            ("app_id", "2021000000000001"),
            ("charset", "utf-8"),
            ("version", "1.0"),
            ("trade_no", "2024050122001400000000000001"),
            ("out_trade_no", "att_01HX7Z3K9Q2W"),
            ("total_amount", "88.88"),
            ("receipt_amount", "88.88"),
            ("buyer_logon_id", "abc***@example.com"),
            ("subject", "Top-up 充值 & more"),
            ("trade_status", "TRADE_SUCCESS"),
            ("gmt_payment", "2024-05-01 20:01:01"),
            (
                "fund_bill_list",
                r#"[{"amount":"88.88","fundChannel":"ALIPAYACCOUNT"}]"#,
            ),
            ("sign_type", "RSA2"),
            ("sign", NOTIFY_SIGN),
        ]
    }

    fn reply(object: &str, sign: &str) -> String {
        format!(r#"{{"alipay_trade_precreate_response":{object},"sign":"{sign}"}}"#)
    }

    #[test]
    fn request_matches_the_openssl_vector() {
        let content = sign_content(&request_params());
        assert_eq!(content, REQUEST_CONTENT);
        assert_eq!(sign(&merchant(), &content), REQUEST_SIGN);
        assert!(verify(&merchant_public(), &content, REQUEST_SIGN));
    }

    #[test]
    fn callback_matches_the_openssl_vector() {
        let params = notify_params();
        assert_eq!(verify_notify_content(&params), NOTIFY_CONTENT);
        assert_eq!(verify_notify(&platform_public(), &params), Ok(()));
        // The request rule would sign `sign_type` too: not what Alipay signs in callbacks.
        assert!(!verify(
            &platform_public(),
            &sign_content(&params),
            NOTIFY_SIGN
        ));
    }

    #[test]
    fn callback_refusals() {
        let key = platform_public();
        let with = |name: &'static str, value: &'static str| {
            let mut params: Vec<_> = notify_params()
                .into_iter()
                .filter(|(n, _)| *n != name)
                .collect();
            params.push((name, value));
            params
        };
        let tampered = with("total_amount", "8888.00");
        assert_eq!(
            verify_notify(&key, &tampered),
            Err(AlipayError::BadSignature)
        );
        assert_eq!(
            verify_notify(&key, &with("sign", "")),
            Err(AlipayError::MissingSign)
        );
        assert_eq!(
            verify_notify(&key, &with("sign", "not base64!")),
            Err(AlipayError::BadSignature)
        );
        assert_eq!(
            verify_notify(&key, &with("sign_type", "RSA")),
            Err(AlipayError::UnsupportedSignType)
        );
        let no_sign_type: Vec<_> = notify_params()
            .into_iter()
            .filter(|(n, _)| *n != "sign_type")
            .collect();
        assert_eq!(
            verify_notify(&key, &no_sign_type),
            Err(AlipayError::UnsupportedSignType)
        );
        // An empty duplicate is not signed, so only the duplicate check stops it.
        let mut duplicated = notify_params();
        duplicated.push(("trade_status", ""));
        assert_eq!(
            verify_notify(&key, &duplicated),
            Err(AlipayError::Duplicate)
        );
        // The merchant's own key is not Alipay's.
        assert_eq!(
            verify_notify(&merchant_public(), &notify_params()),
            Err(AlipayError::BadSignature)
        );
    }

    #[test]
    fn reply_matches_the_openssl_vector_and_keeps_the_exact_text() {
        let key = platform_public();
        let body = reply(RESPONSE_OBJECT, RESPONSE_SIGN);
        assert_eq!(
            verify_response(&key, &body, "alipay.trade.precreate"),
            Ok(RESPONSE_OBJECT)
        );
        // Sign first, spacing around, `\/` escapes inside the sign string, another key.
        let escaped_sign = RESPONSE_SIGN.replace('/', "\\/");
        let body = format!(
            "{{ \"sign\" : \"{escaped_sign}\",\n  \"alipay_cert_sn\":null,\n  \
             \"alipay_trade_precreate_response\" :  {RESPONSE_OBJECT} }}"
        );
        assert_eq!(
            verify_response(&key, &body, "alipay.trade.precreate"),
            Ok(RESPONSE_OBJECT)
        );
        // Re-serializing would have lost the escapes the signature covers.
        let reserialized = serde_json::to_string(
            &serde_json::from_str::<serde_json::Value>(RESPONSE_OBJECT).unwrap(),
        )
        .unwrap();
        assert_ne!(reserialized, RESPONSE_OBJECT);
        assert!(!verify(&key, &reserialized, RESPONSE_SIGN));
    }

    #[test]
    fn reply_refusals() {
        let key = platform_public();
        let method = "alipay.trade.precreate";
        let tampered = reply(&RESPONSE_OBJECT.replace("10000", "10001"), RESPONSE_SIGN);
        assert_eq!(
            verify_response(&key, &tampered, method),
            Err(AlipayError::BadSignature)
        );
        let no_sign = format!(r#"{{"alipay_trade_precreate_response":{RESPONSE_OBJECT}}}"#);
        assert_eq!(
            verify_response(&key, &no_sign, method),
            Err(AlipayError::MissingSign)
        );
        assert_eq!(
            verify_response(
                &key,
                &reply(RESPONSE_OBJECT, RESPONSE_SIGN),
                "alipay.trade.query"
            ),
            Err(AlipayError::MissingResponse(
                "alipay_trade_query_response".into()
            ))
        );
        // The response key nested deeper is not the response.
        let nested = format!(
            r#"{{"other":{{"alipay_trade_precreate_response":{RESPONSE_OBJECT}}},"sign":"{RESPONSE_SIGN}"}}"#
        );
        assert!(matches!(
            verify_response(&key, &nested, method),
            Err(AlipayError::MissingResponse(_))
        ));
        let twice = format!(
            r#"{{"alipay_trade_precreate_response":{{"code":"40004"}},"alipay_trade_precreate_response":{RESPONSE_OBJECT},"sign":"{RESPONSE_SIGN}"}}"#
        );
        assert_eq!(
            verify_response(&key, &twice, method),
            Err(AlipayError::Duplicate)
        );
        for malformed in [
            "",
            "[]",
            "{\"alipay_trade_precreate_response\":{\"code\":\"10000\"}",
            &reply("\"a string\"", RESPONSE_SIGN),
            &format!(r#"{{"alipay_trade_precreate_response":{RESPONSE_OBJECT},"sign":42}}"#),
        ] {
            assert!(
                matches!(
                    verify_response(&key, malformed, method),
                    Err(AlipayError::MalformedReply(_))
                ),
                "{malformed}"
            );
        }
        let many_keys = format!(
            r#"{{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"alipay_trade_precreate_response":{RESPONSE_OBJECT},"sign":"{RESPONSE_SIGN}"}}"#
        );
        assert!(matches!(
            verify_response(&key, &many_keys, method),
            Err(AlipayError::MalformedReply(_))
        ));
    }

    #[test]
    fn response_keys_follow_the_method_name() {
        assert_eq!(
            response_key("alipay.trade.precreate"),
            "alipay_trade_precreate_response"
        );
        assert_eq!(
            response_key("alipay.trade.refund"),
            "alipay_trade_refund_response"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn request_sign_verify_round_trips(
            params in proptest::collection::btree_map("[a-z_]{1,12}", "[ -~充值]{0,24}", 1..12)
        ) {
            let params: Vec<(&str, &str)> =
                params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let content = sign_content(&params);
            let signature = sign(&merchant(), &content);
            prop_assert!(verify(&merchant_public(), &content, &signature));
        }

        #[test]
        fn tampering_with_content_or_signature_fails(
            index in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            in_signature: bool,
        ) {
            let mut content = REQUEST_CONTENT.as_bytes().to_vec();
            let mut signature = STANDARD.decode(REQUEST_SIGN).unwrap();
            let target = if in_signature { &mut signature } else { &mut content };
            let at = index.index(target.len());
            target[at] ^= flip;
            // A flipped byte may leave UTF-8: then no request could carry it at all.
            if let Ok(content) = std::str::from_utf8(&content) {
                prop_assert!(!verify(&merchant_public(), content, &STANDARD.encode(&signature)));
            }
            prop_assert!(!merchant_public().verify_sha256(&content, &signature));
        }
    }
    mod adapter {
        use super::super::*;
        use crate::channels::test_keys::*;
        use crate::channels::test_support::*;

        const APP_ID: &str = "2021000000000001";

        /// The app signs with the merchant fixture key; "Alipay" with the platform one.
        fn channel() -> AlipayChannel {
            AlipayChannel::new(
                "ali",
                APP_ID,
                BaseUrl::parse("http://127.0.0.1:9").unwrap(),
                merchant(),
                platform_public(),
                http(),
            )
        }

        /// A reply to `method` whose response object is `object`, signed by "Alipay".
        fn signed(method: &str, object: &str) -> HttpReply {
            let sign = sign(&platform(), object);
            let body = format!(r#"{{"{}":{object},"sign":"{sign}"}}"#, response_key(method));
            reply(200, &[], &body)
        }

        fn form(body: &str) -> Vec<(String, String)> {
            form_urlencoded::parse(body.as_bytes())
                .into_owned()
                .collect()
        }

        #[tokio::test]
        async fn precreate_is_a_signed_form_post() {
            let order = create_order();
            let (parts, body) = split(channel().create_request(&order, NOW_MS).unwrap()).await;
            assert_eq!(parts.method, hyper::Method::POST);
            assert_eq!(parts.uri, "http://127.0.0.1:9/gateway.do");
            assert!(parts.headers[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/x-www-form-urlencoded"));
            let params = form(&body);
            let value = |name: &str| {
                params
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(value("app_id"), Some(APP_ID));
            assert_eq!(value("method"), Some("alipay.trade.precreate"));
            assert_eq!(value("format"), Some("JSON"));
            assert_eq!(value("charset"), Some("utf-8"));
            assert_eq!(value("sign_type"), Some("RSA2"));
            assert_eq!(value("timestamp"), Some("2024-05-01 20:00:00"));
            assert_eq!(value("version"), Some("1.0"));
            assert_eq!(value("notify_url"), Some(order.notify_url.as_str()));
            let biz: serde_json::Value =
                serde_json::from_str(value("biz_content").unwrap()).unwrap();
            assert_eq!(biz["out_trade_no"], order.order_id.as_str());
            assert_eq!(biz["total_amount"], "88.88");
            assert_eq!(biz["subject"], "Top-up 充值 & more");
            assert_eq!(biz["time_expire"], "2024-05-01 20:15:00");
            // The signature verifies with the app's public key over the request's own string.
            let borrowed: Vec<(&str, &str)> = params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert!(verify(
                &merchant_public(),
                &sign_content(&borrowed),
                value("sign").unwrap()
            ));
            assert!(!verify(
                &platform_public(),
                &sign_content(&borrowed),
                value("sign").unwrap()
            ));

            let usd = CreateOrder {
                currency: crate::money::Currency::Usd,
                ..order
            };
            assert!(matches!(
                channel().create_request(&usd, NOW_MS),
                Err(ChannelError::InvalidRequest { .. })
            ));
        }

        #[tokio::test]
        async fn refund_carries_the_persisted_request_number() {
            let refund = refund_request(order_id());
            let (_, body) = split(channel().refund_request(&refund, NOW_MS).unwrap()).await;
            let params = form(&body);
            let biz = &params.iter().find(|(k, _)| k == "biz_content").unwrap().1;
            let biz: serde_json::Value = serde_json::from_str(biz).unwrap();
            assert_eq!(biz["out_request_no"], "rf_0001");
            assert_eq!(biz["refund_amount"], "10.00");
            assert_eq!(biz["out_trade_no"], refund.order_id.as_str());
            let ok = format!(
                r#"{{"code":"10000","msg":"Success","out_trade_no":"{}","refund_fee":"10.00","fund_change":"Y"}}"#,
                refund.order_id
            );
            assert_eq!(
                channel().parse_refund(&refund, &signed(METHOD_REFUND, &ok)),
                Ok(RefundOutcome::Succeeded {
                    channel_refund_id: None
                })
            );
        }

        #[test]
        fn reads_verified_replies() {
            let order = create_order();
            let id = order.order_id.as_str();
            let created = format!(
                r#"{{"code":"10000","msg":"Success","out_trade_no":"{id}","qr_code":"https:\/\/qr.alipay.com\/bax01"}}"#
            );
            assert_eq!(
                channel().parse_create(&order, &signed(METHOD_PRECREATE, &created)),
                Ok(Created {
                    action: Action::QrCode("https://qr.alipay.com/bax01".into()),
                    channel_txn_id: None
                })
            );
            let query = |status: &str| {
                format!(
                    r#"{{"code":"10000","msg":"Success","trade_no":"2024050122001","out_trade_no":"{id}","trade_status":"{status}","total_amount":"88.88"}}"#
                )
            };
            let paid = OrderState::Paid {
                channel_txn_id: "2024050122001".into(),
                amount_minor: 8888,
                currency: Currency::Cny,
            };
            for (status, expected) in [
                ("WAIT_BUYER_PAY", OrderState::Pending),
                ("TRADE_SUCCESS", paid.clone()),
                ("TRADE_FINISHED", paid),
                ("TRADE_CLOSED", OrderState::Closed),
            ] {
                assert_eq!(
                    channel().parse_query(&order.order_id, &signed(METHOD_QUERY, &query(status))),
                    Ok(expected)
                );
            }
            let not_exist = r#"{"code":"40004","msg":"Business Failed","sub_code":"ACQ.TRADE_NOT_EXIST","sub_msg":"no"}"#;
            assert_eq!(
                channel().parse_query(&order.order_id, &signed(METHOD_QUERY, not_exist)),
                Ok(OrderState::NotFound)
            );
            assert_eq!(
                channel().parse_close(&order.order_id, &signed(METHOD_CLOSE, not_exist)),
                Ok(Some(CloseOutcome::NotFound))
            );
            let closed = format!(r#"{{"code":"10000","msg":"Success","out_trade_no":"{id}"}}"#);
            assert_eq!(
                channel().parse_close(&order.order_id, &signed(METHOD_CLOSE, &closed)),
                Ok(Some(CloseOutcome::Closed))
            );
            let status_error = r#"{"code":"40004","msg":"Business Failed","sub_code":"ACQ.TRADE_STATUS_ERROR","sub_msg":"paid"}"#;
            assert_eq!(
                channel().parse_close(&order.order_id, &signed(METHOD_CLOSE, status_error)),
                Ok(None)
            );
        }

        #[test]
        fn maps_error_codes_by_what_they_say_about_the_attempt() {
            let order = create_order();
            let forbidden = r#"{"code":"40004","msg":"Business Failed","sub_code":"ACQ.ACCESS_FORBIDDEN","sub_msg":"no"}"#;
            let error = channel()
                .parse_create(&order, &signed(METHOD_PRECREATE, forbidden))
                .unwrap_err();
            assert_eq!(
                error,
                ChannelError::Declined {
                    code: "ACQ.ACCESS_FORBIDDEN".into(),
                    message: "no".into()
                }
            );
            assert!(error.certainly_not_executed() && !error.counts_as_failure());
            let exists = r#"{"code":"40004","msg":"Business Failed","sub_code":"ACQ.TRADE_HAS_SUCCESS","sub_msg":"paid"}"#;
            assert!(matches!(
                assert_unknown(channel().parse_create(&order, &signed(METHOD_PRECREATE, exists))),
                ChannelError::UnexpectedReply { .. }
            ));
            for unavailable in [
                r#"{"code":"20000","msg":"Service Currently Unavailable","sub_code":"isp.unknow-error"}"#,
                r#"{"code":"40004","msg":"Business Failed","sub_code":"ACQ.SYSTEM_ERROR"}"#,
            ] {
                let error = assert_unknown(
                    channel().parse_create(&order, &signed(METHOD_PRECREATE, unavailable)),
                );
                assert!(
                    matches!(error, ChannelError::ServerError { .. }),
                    "{error:?}"
                );
            }
            assert!(matches!(
                assert_unknown(channel().parse_create(&order, &reply(502, &[], "bad gateway"))),
                ChannelError::ServerError { status: 502, .. }
            ));
        }

        #[test]
        fn refuses_unsigned_forged_and_foreign_replies() {
            let order = create_order();
            let id = order.order_id.as_str();
            let object = format!(
                r#"{{"code":"10000","msg":"Success","out_trade_no":"{id}","trade_status":"TRADE_SUCCESS","total_amount":"88.88","trade_no":"1"}}"#
            );
            let unsigned = reply(
                200,
                &[],
                &format!(r#"{{"alipay_trade_query_response":{object}}}"#),
            );
            assert_unverifiable(channel().parse_query(&order.order_id, &unsigned));
            let forged_sign = sign(&merchant(), &object);
            let forged = reply(
                200,
                &[],
                &format!(r#"{{"alipay_trade_query_response":{object},"sign":"{forged_sign}"}}"#),
            );
            assert_unverifiable(channel().parse_query(&order.order_id, &forged));
            // A signed reply of another method is not this method's answer.
            assert_unverifiable(
                channel().parse_query(&order.order_id, &signed(METHOD_CLOSE, &object)),
            );
            let foreign = object.replace(id, "0000000000000000000000000-1");
            assert_unverifiable(
                channel().parse_query(&order.order_id, &signed(METHOD_QUERY, &foreign)),
            );
            // An unsigned decline is no decline.
            let decline =
                r#"{"code":"40004","msg":"Business Failed","sub_code":"ACQ.ACCESS_FORBIDDEN"}"#;
            let unsigned_decline = reply(
                200,
                &[],
                &format!(r#"{{"alipay_trade_precreate_response":{decline}}}"#),
            );
            assert_unverifiable(channel().parse_create(&order, &unsigned_decline));
        }
    }

    mod callbacks {
        use super::super::*;
        use crate::channels::test_keys::*;
        use crate::channels::test_support::*;
        use crate::channels::MAX_CALLBACK_BODY_BYTES;
        use proptest::prelude::*;

        const APP_ID: &str = "2021000000000001";
        const TRADE_NO: &str = "2024050122001400000000000001";
        const NOTIFY_ID: &str = "2024050100222200000012345678";

        fn channel() -> AlipayChannel {
            AlipayChannel::new(
                "ali",
                APP_ID,
                BaseUrl::parse("http://127.0.0.1:9").unwrap(),
                merchant(),
                platform_public(),
                http(),
            )
        }

        /// The fields of a genuine `TRADE_SUCCESS` notice for `order` (without `sign_type`
        /// and `sign`), as the simulator sends them.
        fn paid_fields(order: &ChannelOrderId) -> Vec<(String, String)> {
            [
                ("notify_id", NOTIFY_ID),
                ("notify_type", "trade_status_sync"),
                ("notify_time", "2024-05-01 20:01:02"),
                ("charset", "utf-8"),
                ("version", "1.0"),
                ("app_id", APP_ID),
                ("trade_no", TRADE_NO),
                ("out_trade_no", order.as_str()),
                ("total_amount", "88.88"),
                ("receipt_amount", "88.88"),
                ("subject", "Top-up 充值 & more"),
                ("trade_status", "TRADE_SUCCESS"),
                ("gmt_payment", "2024-05-01 20:01:01"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
        }

        /// `fields` with each `(name, Some(value))` set and each `(name, None)` removed.
        fn changed(
            mut fields: Vec<(String, String)>,
            changes: &[(&str, Option<&str>)],
        ) -> Vec<(String, String)> {
            for (name, value) in changes {
                fields.retain(|(n, _)| n != name);
                if let Some(value) = value {
                    fields.push(((*name).to_owned(), (*value).to_owned()));
                }
            }
            fields
        }

        /// The form body of `fields` signed by `key` ("Alipay"'s: the platform fixture key),
        /// `sign_type=RSA2` and `sign` last.
        fn signed_body_with(key: &RsaPrivateKey, fields: &[(String, String)]) -> Vec<u8> {
            let mut all: Vec<(&str, &str)> = fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            all.push(("sign_type", SIGN_TYPE));
            let signature = sign(key, &verify_notify_content(&all));
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.extend_pairs(all.iter().copied());
            form.append_pair("sign", &signature);
            form.finish().into_bytes()
        }

        fn signed_body(fields: &[(String, String)]) -> Vec<u8> {
            signed_body_with(&platform(), fields)
        }

        fn verify_at(body: &[u8], now_ms: u64) -> Result<Notice, CallbackRefusal> {
            let headers = hyper::HeaderMap::new();
            channel().verify_callback(
                &Callback {
                    headers: &headers,
                    body,
                },
                now_ms,
            )
        }

        fn verify(body: &[u8]) -> Result<Notice, CallbackRefusal> {
            verify_at(body, NOW_MS)
        }

        fn notice(order: &ChannelOrderId, event: NoticeEvent) -> Notice {
            Notice {
                order_id: order.clone(),
                notice_id: Some(NOTIFY_ID.into()),
                event,
            }
        }

        fn paid(order: &ChannelOrderId) -> Notice {
            notice(
                order,
                NoticeEvent::Paid {
                    channel_txn_id: TRADE_NO.into(),
                    amount_minor: 8888,
                    currency: Currency::Cny,
                },
            )
        }

        #[track_caller]
        fn assert_malformed(result: Result<Notice, CallbackRefusal>) {
            assert!(
                matches!(result, Err(CallbackRefusal::Malformed(_))),
                "{result:?}"
            );
        }

        #[test]
        fn a_genuine_paid_notice_is_paid_whenever_it_arrives() {
            let order = order_id();
            let body = signed_body(&paid_fields(&order));
            assert_eq!(verify(&body), Ok(paid(&order)));
            // No timestamp window: Alipay delivers again for about 25 h.
            assert_eq!(verify_at(&body, NOW_MS + 30 * 3_600_000), Ok(paid(&order)));
            assert_eq!(verify_at(&body, 0), Ok(paid(&order)));
            // Field order does not matter (the signed string is sorted).
            let mut reversed = paid_fields(&order);
            reversed.reverse();
            assert_eq!(verify(&signed_body(&reversed)), Ok(paid(&order)));
        }

        #[test]
        fn the_independent_vector_verifies_then_stops_at_its_order_id() {
            // The openssl vector's notice passes the signature and the app id; its
            // `out_trade_no` (`att_…`) is not one of our channel order ids.
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.extend_pairs(super::notify_params());
            let body = form.finish();
            let result = verify(body.as_bytes());
            assert!(
                matches!(&result, Err(CallbackRefusal::Malformed(m)) if m.contains("out_trade_no")),
                "{result:?}"
            );
        }

        #[test]
        fn forged_or_tampered_notices_are_bad_signatures() {
            let order = order_id();
            let fields = paid_fields(&order);
            let genuine = String::from_utf8(signed_body(&fields)).unwrap();
            let tampered = genuine.replace("total_amount=88.88", "total_amount=8888.00");
            assert_ne!(tampered, genuine);
            let other_order = order_id();
            for forged in [
                tampered,
                genuine.replace(order.as_str(), other_order.as_str()),
                genuine.replace("sign_type=RSA2", "sign_type=RSA"),
                genuine.replace("&sign_type=RSA2", ""),
                genuine.split("&sign=").next().unwrap().to_owned(),
                String::from_utf8(signed_body_with(&merchant(), &fields)).unwrap(),
            ] {
                let result = verify(forged.as_bytes());
                assert!(
                    matches!(result, Err(CallbackRefusal::BadSignature(_))),
                    "{forged}: {result:?}"
                );
            }
            // An empty field is not signed: adding one changes nothing, in particular an
            // empty refund field does not turn the payment into a refund.
            for (name, at_end) in [("out_biz_no", true), ("refund_fee", false)] {
                let added = if at_end {
                    format!("{genuine}&{name}=")
                } else {
                    format!("{name}=&{genuine}")
                };
                assert_eq!(verify(added.as_bytes()), Ok(paid(&order)), "{name}");
            }
            // ... but a repeated name is refused, even empty.
            assert_malformed(verify(format!("{genuine}&trade_status=").as_bytes()));
        }

        #[test]
        fn a_notice_for_another_app_is_refused() {
            let order = order_id();
            let fields = changed(paid_fields(&order), &[("app_id", Some("2021000000000002"))]);
            let result = verify(&signed_body(&fields));
            assert!(
                matches!(result, Err(CallbackRefusal::WrongAccount(_))),
                "{result:?}"
            );
            let no_app = changed(paid_fields(&order), &[("app_id", None)]);
            assert_malformed(verify(&signed_body(&no_app)));
        }

        #[test]
        fn malformed_notices_are_refused() {
            let order = order_id();
            let with = |changes: &[(&str, Option<&str>)]| {
                verify(&signed_body(&changed(paid_fields(&order), changes)))
            };
            for amount in [
                "88.888", "-88.88", "+88.88", "abc", "0", "0.00", "8e1", " 88.88", "088.88",
            ] {
                assert_malformed(with(&[("total_amount", Some(amount))]));
            }
            assert_malformed(with(&[("total_amount", None)]));
            assert_malformed(with(&[("trade_no", None)]));
            assert_malformed(with(&[("trade_status", None)]));
            assert_malformed(with(&[("out_trade_no", None)]));
            assert_malformed(with(&[("out_trade_no", Some("att_01HX7Z3K9Q2W"))]));
            assert_malformed(with(&[("trade_no", Some(&"1".repeat(129)))]));
            assert_malformed(with(&[("trade_status", Some("TRADE SUCCESS"))]));
            assert_malformed(with(&[
                ("refund_fee", Some("1.001")),
                ("out_biz_no", Some("rf_0001")),
            ]));
            // Too large before anything is decoded; too many fields.
            let mut huge = signed_body(&paid_fields(&order));
            huge.resize(huge.len() + MAX_CALLBACK_BODY_BYTES, b'x');
            assert_malformed(verify(&huge));
            let many: String = (0..MAX_CALLBACK_FIELDS)
                .map(|i| format!("f{i}=1&"))
                .collect();
            let mut crowded = many.into_bytes();
            crowded.extend(signed_body(&paid_fields(&order)));
            assert_malformed(verify(&crowded));
        }

        #[test]
        fn each_trade_status_maps_as_documented() {
            let order = order_id();
            let with = |changes: &[(&str, Option<&str>)]| {
                verify(&signed_body(&changed(paid_fields(&order), changes)))
            };
            assert_eq!(
                with(&[("trade_status", Some("TRADE_FINISHED"))]),
                Ok(notice(
                    &order,
                    NoticeEvent::Finished {
                        channel_txn_id: TRADE_NO.into(),
                        amount_minor: 8888,
                        currency: Currency::Cny,
                    }
                ))
            );
            assert_eq!(
                with(&[("trade_status", Some("TRADE_CLOSED"))]),
                Ok(notice(&order, NoticeEvent::Closed))
            );
            // A full refund closes the trade.
            assert_eq!(
                with(&[
                    ("trade_status", Some("TRADE_CLOSED")),
                    ("refund_fee", Some("88.88")),
                    ("out_biz_no", Some("rf_0001")),
                    ("gmt_refund", Some("2024-05-02 10:00:00.123")),
                ]),
                Ok(notice(
                    &order,
                    NoticeEvent::Refund {
                        refund_id: Some("rf_0001".into()),
                        amount_minor: 8888,
                        succeeded: true,
                    }
                ))
            );
            // A partial refund: TRADE_SUCCESS with the refund fields.
            let partial = NoticeEvent::Refund {
                refund_id: Some("rf_0001".into()),
                amount_minor: 1000,
                succeeded: true,
            };
            assert_eq!(
                with(&[
                    ("refund_fee", Some("10.00")),
                    ("out_biz_no", Some("rf_0001")),
                    ("gmt_refund", Some("2024-05-02 10:00:00.123")),
                ]),
                Ok(notice(&order, partial))
            );
            assert_eq!(
                with(&[("refund_fee", Some("10"))]),
                Ok(notice(
                    &order,
                    NoticeEvent::Refund {
                        refund_id: None,
                        amount_minor: 1000,
                        succeeded: true,
                    }
                ))
            );
            // Refund fields without the refunded amount say too little.
            assert_malformed(with(&[("out_biz_no", Some("rf_0001"))]));
            for status in ["WAIT_BUYER_PAY", "TRADE_SOMETHING_NEW"] {
                assert_eq!(
                    with(&[("trade_status", Some(status))]),
                    Ok(notice(&order, NoticeEvent::Other(status.into())))
                );
            }
            let anonymous = with(&[("notify_id", None)]).unwrap();
            assert_eq!(anonymous.notice_id, None);
        }

        #[test]
        fn replies_are_the_exact_texts_alipay_reads() {
            let reply = |answer| channel().callback_reply(answer, "ignored \"secret\"");
            assert_eq!(
                reply(CallbackAnswer::Ack),
                CallbackReply {
                    status: 200,
                    content_type: "text/plain",
                    body: "success".into()
                }
            );
            assert_eq!(
                reply(CallbackAnswer::Refused),
                CallbackReply {
                    status: 400,
                    content_type: "text/plain",
                    body: "fail".into()
                }
            );
            assert_eq!(
                reply(CallbackAnswer::RetryLater),
                CallbackReply {
                    status: 500,
                    content_type: "text/plain",
                    body: "fail".into()
                }
            );
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Flipping any byte of a genuine notice never gives another notice: it is refused,
            /// or (a byte outside what is signed and read) reads the same.
            #[test]
            fn a_flipped_byte_never_reads_as_another_notice(
                index in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let order = order_id();
                let mut body = signed_body(&paid_fields(&order));
                let at = index.index(body.len());
                body[at] ^= flip;
                match verify(&body) {
                    Err(_) => {}
                    Ok(notice) => prop_assert_eq!(notice, paid(&order)),
                }
            }
        }
    }
}
