//! The HMAC-JSON supplier protocol (DESIGN.md §5): the `X-Signature` header, in both
//! directions (our requests to the supplier, the supplier's callbacks to us).
//!
//! `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, refused more
//! than 300 s from `now` either way.
//!
//! Parsing is strict: comma-separated `name=value` items, no spaces, only the names `t`
//! (exactly once, decimal digits) and `v1` (64 hex digits, either case). **Several `v1` are
//! allowed**, up to [`MAX_V1_SIGNATURES`], and the header is accepted when any of them
//! matches: that is how a sender rotates the shared secret without a flag day — during the
//! switch it signs with the old and the new secret, and each receiver accepts whichever it
//! has. Accepting several costs nothing in strength (each is a full HMAC that only a holder
//! of the secret can make), and the bound keeps the work per header fixed. Anything else
//! (another version, a repeated `t`, an empty item) is refused as malformed, so a future
//! scheme is introduced deliberately rather than silently ignored.
//!
//! The adapter ([`SupplierChannel`]) speaks the orders API over that header and reads the
//! supplier's callbacks ([`SupplierChannel::read_callback`]); its reading of replies and
//! callbacks is documented beside it.

use std::fmt;

use async_trait::async_trait;
use aws_lc_rs::hmac;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::client::{HttpClient, HttpReply};
use super::{
    callback_reply_message, callback_text, check_callback_size, check_create, now_unix_ms,
    rfc3339_utc, server_error, skew_seconds, Action, BaseUrl, Callback, CallbackAnswer,
    CallbackRefusal, CallbackReply, Channel, ChannelError, ChannelKind, ChannelOrderId,
    CloseOutcome, CreateOrder, Created, Notice, NoticeEvent, OrderState, RefundOutcome,
    RefundRequest, SIGNATURE_WINDOW_SECONDS,
};
use crate::money::{format_minor, parse_non_negative_minor, Amount, Currency};
use crate::secret::Secret;

/// The header's name.
pub const HEADER_NAME: &str = "X-Signature";

/// The most `v1` signatures one header may carry (see the module doc).
pub const MAX_V1_SIGNATURES: usize = 4;

/// The shortest shared secret accepted: 16 bytes (128 bits if random).
pub const MIN_SECRET_BYTES: usize = 16;

const MAC_BYTES: usize = 32;

/// Why an `X-Signature` was refused. No variant carries header text: callers log these, and
/// the header is the sender's to choose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupplierSignatureError {
    #[error("malformed X-Signature: {0}")]
    Malformed(&'static str),
    #[error(
        "X-Signature timestamp is {skew_seconds} s from now (at most {SIGNATURE_WINDOW_SECONDS})"
    )]
    OutsideWindow { skew_seconds: u64 },
    #[error("no X-Signature v1 matches")]
    BadSignature,
}

/// The shared secret was shorter than [`MIN_SECRET_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the supplier secret must be at least {MIN_SECRET_BYTES} bytes")]
pub struct WeakSupplierSecret;

/// A supplier's shared secret, ready for HMAC-SHA256. The HMAC key is the secret's UTF-8
/// bytes as configured (what `openssl dgst -sha256 -hmac <secret>` uses), not a hex decoding.
pub struct SupplierKey {
    key: hmac::Key,
}

impl SupplierKey {
    pub fn new(secret: &Secret) -> Result<Self, WeakSupplierSecret> {
        let bytes = secret.expose().as_bytes();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(WeakSupplierSecret);
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    /// HMAC-SHA256 over `"<t>.<body>"`, `t` as its decimal text.
    fn mac(&self, timestamp_text: &str, body: &[u8]) -> hmac::Tag {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(timestamp_text.as_bytes());
        context.update(b".");
        context.update(body);
        context.sign()
    }
}

impl fmt::Debug for SupplierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SupplierKey(***)")
    }
}

/// The `X-Signature` value for `body` sent at `timestamp_unix_seconds`.
pub fn signature_header(key: &SupplierKey, timestamp_unix_seconds: u64, body: &[u8]) -> String {
    let timestamp_text = timestamp_unix_seconds.to_string();
    let mac = key.mac(&timestamp_text, body);
    format!("t={timestamp_text},v1={}", hex::encode(mac.as_ref()))
}

/// Verifies an `X-Signature` value (as the HTTP layer hands it over, surrounding whitespace
/// already trimmed) for `body`: strict parse, then the window around `now_unix_seconds`, then
/// a constant-time comparison with each `v1`.
pub fn verify(
    key: &SupplierKey,
    header: &str,
    body: &[u8],
    now_unix_seconds: u64,
) -> Result<(), SupplierSignatureError> {
    let parsed = parse_header(header)?;
    let skew = skew_seconds(parsed.timestamp, now_unix_seconds);
    if skew > SIGNATURE_WINDOW_SECONDS {
        return Err(SupplierSignatureError::OutsideWindow { skew_seconds: skew });
    }
    // The MAC covers the timestamp's text as sent, so what was signed is what was checked.
    let expected = key.mac(parsed.timestamp_text, body);
    let mut matched = subtle::Choice::from(0u8);
    // Every candidate is compared, so the time taken depends on their number only.
    for candidate in &parsed.v1[..parsed.v1_count] {
        matched |= expected.as_ref().ct_eq(&candidate[..]);
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(SupplierSignatureError::BadSignature)
    }
}

struct ParsedHeader<'a> {
    timestamp_text: &'a str,
    timestamp: u64,
    v1: [[u8; MAC_BYTES]; MAX_V1_SIGNATURES],
    v1_count: usize,
}

fn parse_header(header: &str) -> Result<ParsedHeader<'_>, SupplierSignatureError> {
    use SupplierSignatureError::Malformed;
    let mut timestamp_text = None;
    let mut v1 = [[0u8; MAC_BYTES]; MAX_V1_SIGNATURES];
    let mut v1_count = 0;
    for item in header.split(',') {
        let (name, value) = item
            .split_once('=')
            .ok_or(Malformed("an item is not name=value"))?;
        match name {
            "t" => {
                if timestamp_text.is_some() {
                    return Err(Malformed("t appears more than once"));
                }
                timestamp_text = Some(value);
            }
            "v1" => {
                if v1_count == MAX_V1_SIGNATURES {
                    return Err(Malformed("too many v1"));
                }
                // `decode_to_slice` also requires exactly 64 hex digits.
                hex::decode_to_slice(value, &mut v1[v1_count])
                    .map_err(|_| Malformed("v1 is not 64 hex digits"))?;
                v1_count += 1;
            }
            _ => return Err(Malformed("unknown item (only t and v1)")),
        }
    }
    let timestamp_text = timestamp_text.ok_or(Malformed("no t"))?;
    if v1_count == 0 {
        return Err(Malformed("no v1"));
    }
    if timestamp_text.is_empty()
        || timestamp_text.len() > 19
        || !timestamp_text.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Malformed("t is not unix seconds"));
    }
    let timestamp = timestamp_text
        .parse()
        .map_err(|_| Malformed("t is not unix seconds"))?;
    Ok(ParsedHeader {
        timestamp_text,
        timestamp,
        v1,
        v1_count,
    })
}

// ---------------------------------------------------------------------------------------------
// The adapter: orders, query, close, refunds over HTTP (DESIGN.md §5).
//
// Every request is signed with `X-Signature` over its exact body (empty for a GET), and every
// reply but a 5xx must carry a valid `X-Signature` over its exact body within the window: an
// unsigned or forged reply is `Unverifiable` (an unknown outcome), never a success or a
// decline. Replies must name the order asked about. Error replies are 4xx `{"error": "…"}`:
// 404 on query/close is "no such order"; 409 on create means the order id is already taken
// (maybe by our own earlier try) and is an unknown outcome; 429 is throttling; any other 4xx
// is a decline; a close refused with `409 {"status": "succeeded"}` means "already paid", and
// a query then gives the amount. Refund statuses are read as `succeeded`, `accepted`/`pending`
// (pending) and `failed`/`closed` (failed) — §5 does not list them; this is our reading.
// A succeeded order must state its `amount` and `currency`, which the caller checks.
// ---------------------------------------------------------------------------------------------

/// The supplier adapter of one configured channel.
#[derive(Debug)]
pub struct SupplierChannel {
    id: String,
    base: BaseUrl,
    key: SupplierKey,
    http: HttpClient,
}

#[derive(Serialize)]
struct OrderBody<'a> {
    order_id: &'a str,
    amount: String,
    currency: &'static str,
    notify_url: &'a str,
    expires_at: String,
}

#[derive(Serialize)]
struct RefundBody<'a> {
    refund_id: &'a str,
    amount: String,
}

#[derive(Debug, Deserialize)]
struct OrderReply {
    order_id: String,
    #[serde(default)]
    supplier_order_id: Option<String>,
    status: String,
    #[serde(default)]
    amount: Option<String>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    pay_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RefundReply {
    refund_id: String,
    status: String,
    #[serde(default)]
    supplier_refund_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorReply {
    #[serde(default)]
    error: String,
}

impl SupplierChannel {
    pub fn new(id: impl Into<String>, base: BaseUrl, key: SupplierKey, http: HttpClient) -> Self {
        Self {
            id: id.into(),
            base,
            key,
            http,
        }
    }

    fn signed(
        &self,
        method: Method,
        path: &str,
        body: String,
        now_unix_seconds: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        let signature = signature_header(&self.key, now_unix_seconds, body.as_bytes());
        let mut builder = Request::builder()
            .method(method)
            .uri(self.base.join(path)?)
            .header(HEADER_NAME, signature)
            .header(ACCEPT, "application/json");
        if !body.is_empty() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ChannelError::invalid(e.to_string()))
    }

    /// `POST /v1/orders`, signed at `now_ms`.
    pub fn create_request(
        &self,
        req: &CreateOrder,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        check_create(req, now_ms)?;
        let body = serde_json::to_string(&OrderBody {
            order_id: req.order_id.as_str(),
            amount: format_minor(req.amount.minor(), req.currency),
            currency: req.currency.code(),
            notify_url: &req.notify_url,
            expires_at: rfc3339_utc(req.expires_at_ms / 1000),
        })
        .map_err(|e| ChannelError::invalid(e.to_string()))?;
        self.signed(Method::POST, "/v1/orders", body, now_ms / 1000)
    }

    /// `GET /v1/orders/{order_id}`.
    pub fn query_request(
        &self,
        order: &ChannelOrderId,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        let path = format!("/v1/orders/{order}");
        self.signed(Method::GET, &path, String::new(), now_ms / 1000)
    }

    /// `POST /v1/orders/{order_id}/close` with the body `{}`.
    pub fn close_request(
        &self,
        order: &ChannelOrderId,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        let path = format!("/v1/orders/{order}/close");
        self.signed(Method::POST, &path, "{}".to_owned(), now_ms / 1000)
    }

    /// `POST /v1/orders/{order_id}/refunds`.
    pub fn refund_request(
        &self,
        req: &RefundRequest,
        now_ms: u64,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        let body = serde_json::to_string(&RefundBody {
            refund_id: req.refund_id.as_str(),
            amount: format_minor(req.amount.minor(), req.currency),
        })
        .map_err(|e| ChannelError::invalid(e.to_string()))?;
        let path = format!("/v1/orders/{}/refunds", req.order_id);
        self.signed(Method::POST, &path, body, now_ms / 1000)
    }

    /// The verified body of a reply that is not a 5xx.
    fn verified<'a>(&self, reply: &'a HttpReply, now_ms: u64) -> Result<&'a str, ChannelError> {
        if let Some(error) = server_error(reply.status) {
            return Err(error);
        }
        let header = reply
            .header(HEADER_NAME)
            .ok_or_else(|| ChannelError::unverifiable("no X-Signature"))?;
        verify(&self.key, header.trim(), &reply.body, now_ms / 1000)
            .map_err(|e| ChannelError::unverifiable(e.to_string()))?;
        reply.text()
    }

    /// The error of a verified 4xx reply (404 handled by the callers that expect it).
    fn client_error(status: StatusCode, body: &str) -> ChannelError {
        let message = serde_json::from_str::<ErrorReply>(body)
            .map(|e| e.error)
            .unwrap_or_default();
        match status.as_u16() {
            409 => ChannelError::UnexpectedReply {
                reason: "the order id is already in use at the supplier".into(),
            },
            429 => ChannelError::Throttled {
                code: "http_429".into(),
            },
            code => ChannelError::declined(&format!("http_{code}"), &message),
        }
    }

    fn order_reply(order: &ChannelOrderId, body: &str) -> Result<OrderReply, ChannelError> {
        let parsed: OrderReply = serde_json::from_str(body)
            .map_err(|_| ChannelError::unverifiable("the order reply does not parse"))?;
        if parsed.order_id != order.as_str() {
            return Err(ChannelError::unverifiable("the reply is for another order"));
        }
        Ok(parsed)
    }

    pub fn parse_create(
        &self,
        req: &CreateOrder,
        reply: &HttpReply,
        now_ms: u64,
    ) -> Result<Created, ChannelError> {
        let body = self.verified(reply, now_ms)?;
        if !reply.status.is_success() {
            return Err(Self::client_error(reply.status, body));
        }
        let parsed = Self::order_reply(&req.order_id, body)?;
        match parsed.status.as_str() {
            "accepted" | "succeeded" => Ok(Created {
                action: parsed.pay_url.map_or(Action::None, Action::Redirect),
                channel_txn_id: parsed.supplier_order_id,
            }),
            // Refused outright, in a signed answer: the order will never take money.
            "failed" | "closed" => Err(ChannelError::declined(&parsed.status, "")),
            _ => Err(ChannelError::UnexpectedReply {
                reason: "unknown order status".into(),
            }),
        }
    }

    pub fn parse_query(
        &self,
        order: &ChannelOrderId,
        reply: &HttpReply,
        now_ms: u64,
    ) -> Result<OrderState, ChannelError> {
        let body = self.verified(reply, now_ms)?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(OrderState::NotFound);
        }
        if !reply.status.is_success() {
            return Err(Self::client_error(reply.status, body));
        }
        let parsed = Self::order_reply(order, body)?;
        match parsed.status.as_str() {
            "accepted" => Ok(OrderState::Pending),
            "succeeded" => {
                let (amount, currency) = match (&parsed.amount, &parsed.currency) {
                    (Some(amount), Some(currency)) => (amount, currency),
                    _ => {
                        return Err(ChannelError::unverifiable(
                            "a succeeded order without amount and currency",
                        ))
                    }
                };
                let currency = Currency::parse(currency)
                    .map_err(|_| ChannelError::unverifiable("unknown currency"))?;
                let amount_minor = parse_non_negative_minor(amount, currency)
                    .map_err(|_| ChannelError::unverifiable("malformed amount"))?;
                Ok(OrderState::Paid {
                    channel_txn_id: parsed.supplier_order_id.unwrap_or_default(),
                    amount_minor,
                    currency,
                })
            }
            "failed" => Ok(OrderState::Failed),
            "closed" => Ok(OrderState::Closed),
            _ => Err(ChannelError::UnexpectedReply {
                reason: "unknown order status".into(),
            }),
        }
    }

    /// The close reply: the order after the close, read as a query (`Ok(Some(…))`), or
    /// `Ok(None)` when the supplier refused because the order is paid (`409` with
    /// `"status": "succeeded"`), so that a query gives the paid amount.
    pub fn parse_close(
        &self,
        order: &ChannelOrderId,
        reply: &HttpReply,
        now_ms: u64,
    ) -> Result<Option<CloseOutcome>, ChannelError> {
        if reply.status == StatusCode::CONFLICT {
            let body = self.verified(reply, now_ms)?;
            #[derive(Deserialize)]
            struct Conflict {
                #[serde(default)]
                status: String,
            }
            return match serde_json::from_str::<Conflict>(body) {
                Ok(conflict) if conflict.status == "succeeded" => Ok(None),
                _ => Err(Self::client_error(reply.status, body)),
            };
        }
        self.parse_query(order, reply, now_ms)?
            .after_close()
            .map(Some)
            .ok_or_else(|| ChannelError::UnexpectedReply {
                reason: "the order is still open after the close".into(),
            })
    }

    pub fn parse_refund(
        &self,
        req: &RefundRequest,
        reply: &HttpReply,
        now_ms: u64,
    ) -> Result<RefundOutcome, ChannelError> {
        let body = self.verified(reply, now_ms)?;
        if !reply.status.is_success() {
            return Err(Self::client_error(reply.status, body));
        }
        let parsed: RefundReply = serde_json::from_str(body)
            .map_err(|_| ChannelError::unverifiable("the refund reply does not parse"))?;
        if parsed.refund_id != req.refund_id.as_str() {
            return Err(ChannelError::unverifiable(
                "the reply is for another refund",
            ));
        }
        let channel_refund_id = parsed.supplier_refund_id;
        match parsed.status.as_str() {
            "succeeded" => Ok(RefundOutcome::Succeeded { channel_refund_id }),
            "accepted" | "pending" => Ok(RefundOutcome::Pending { channel_refund_id }),
            "failed" | "closed" => Ok(RefundOutcome::Failed {
                channel_refund_id,
                status: parsed.status,
            }),
            _ => Err(ChannelError::UnexpectedReply {
                reason: "unknown refund status".into(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Callbacks (DESIGN.md §5).
//
// A callback is a JSON POST `{order_id, supplier_order_id, status, amount, currency}` signed
// with `X-Signature`. Read in this order, each step refusing with its own [`CallbackRefusal`]:
//
// 1. at most [`MAX_CALLBACK_BODY_BYTES`] (`Malformed`);
// 2. `X-Signature` ([`verify`]) at `now`: outside the 300 s window is `Stale`; a missing,
//    repeated, malformed or wrong signature is `BadSignature`;
// 3. the body (`Malformed` if it does not parse, or `order_id` is not one of our channel
//    order ids, or an id or status is not at most [`MAX_CALLBACK_TEXT_BYTES`] of visible
//    ASCII). The protocol has no account id (the shared secret is the account), so nothing is
//    `WrongAccount`;
// 4. `status`: `succeeded` is `Paid` (`supplier_order_id`, `amount` in `currency`'s digits
//    exactly, `currency`, all required); `failed` is `Failed`, `closed` is `Closed`, any
//    other (`accepted`, …) is `Other(status)`. A body with `refund_id` is a refund notice —
//    the simulator sends none, §5 lists none; this is our reading — `Refund` of `amount`,
//    succeeded when `status` is `succeeded`.
//
// The answer: `200 {"received": true}` acknowledges; a refusal is 400 and "try later" 503,
// both `{"error": "…"}`.
// ---------------------------------------------------------------------------------------------

/// A callback's body: only what is read (other fields are ignored).
#[derive(Deserialize)]
struct CallbackBody {
    order_id: String,
    #[serde(default)]
    supplier_order_id: Option<String>,
    status: String,
    #[serde(default)]
    amount: Option<String>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    refund_id: Option<String>,
}

fn malformed(reason: impl Into<String>) -> CallbackRefusal {
    CallbackRefusal::Malformed(reason.into())
}

impl CallbackBody {
    /// `amount` in `currency`, both required, positive and exact.
    fn amount(&self) -> Result<(i64, Currency), CallbackRefusal> {
        let currency = self
            .currency
            .as_deref()
            .ok_or_else(|| malformed("no `currency`"))?;
        let currency =
            Currency::parse(currency).map_err(|e| malformed(format!("`currency` {e}")))?;
        let amount = self
            .amount
            .as_deref()
            .ok_or_else(|| malformed("no `amount`"))?;
        let amount =
            Amount::parse(amount, currency).map_err(|e| malformed(format!("`amount` {e}")))?;
        Ok((amount.minor(), currency))
    }
}

impl SupplierChannel {
    /// Verifies and reads a callback at `now_ms`: see the steps above.
    pub fn read_callback(
        &self,
        callback: &Callback<'_>,
        now_ms: u64,
    ) -> Result<Notice, CallbackRefusal> {
        check_callback_size(callback.body)?;
        let mut headers = callback.headers.get_all(HEADER_NAME).iter();
        let header = match (headers.next(), headers.next()) {
            (Some(value), None) => value.to_str().map_err(|_| {
                CallbackRefusal::BadSignature("X-Signature is not visible ASCII".into())
            })?,
            (None, _) => return Err(CallbackRefusal::BadSignature("no X-Signature".into())),
            (Some(_), Some(_)) => {
                return Err(CallbackRefusal::BadSignature(
                    "X-Signature appears more than once".into(),
                ))
            }
        };
        verify(&self.key, header.trim(), callback.body, now_ms / 1000).map_err(|e| match e {
            SupplierSignatureError::OutsideWindow { .. } => CallbackRefusal::Stale(e.to_string()),
            SupplierSignatureError::Malformed(_) | SupplierSignatureError::BadSignature => {
                CallbackRefusal::BadSignature(e.to_string())
            }
        })?;
        let body: CallbackBody = serde_json::from_slice(callback.body)
            .map_err(|_| malformed("the body is not a supplier callback"))?;
        let order_id = ChannelOrderId::parse(&body.order_id)
            .ok_or_else(|| malformed("`order_id` is not a channel order id of ours"))?;
        let status = callback_text("status", &body.status)?;
        let event = if let Some(refund_id) = body.refund_id.as_deref() {
            let (amount_minor, _) = body.amount()?;
            NoticeEvent::Refund {
                refund_id: Some(callback_text("refund_id", refund_id)?),
                amount_minor,
                succeeded: status == "succeeded",
            }
        } else {
            match status.as_str() {
                "succeeded" => {
                    let channel_txn_id = body
                        .supplier_order_id
                        .as_deref()
                        .ok_or_else(|| malformed("a succeeded order without `supplier_order_id`"))
                        .and_then(|id| callback_text("supplier_order_id", id))?;
                    let (amount_minor, currency) = body.amount()?;
                    NoticeEvent::Paid {
                        channel_txn_id,
                        amount_minor,
                        currency,
                    }
                }
                "failed" => NoticeEvent::Failed,
                "closed" => NoticeEvent::Closed,
                _ => NoticeEvent::Other(status),
            }
        };
        Ok(Notice {
            order_id,
            notice_id: None,
            event,
        })
    }
}

#[async_trait]
impl Channel for SupplierChannel {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> ChannelKind {
        ChannelKind::Supplier
    }

    async fn create_order(&self, req: &CreateOrder) -> Result<Created, ChannelError> {
        let reply = self
            .http
            .send(self.create_request(req, now_unix_ms())?)
            .await?;
        self.parse_create(req, &reply, now_unix_ms())
    }

    async fn query(&self, order: &ChannelOrderId) -> Result<OrderState, ChannelError> {
        let reply = self
            .http
            .send(self.query_request(order, now_unix_ms())?)
            .await?;
        self.parse_query(order, &reply, now_unix_ms())
    }

    async fn close(&self, order: &ChannelOrderId) -> Result<CloseOutcome, ChannelError> {
        let reply = self
            .http
            .send(self.close_request(order, now_unix_ms())?)
            .await?;
        if let Some(outcome) = self.parse_close(order, &reply, now_unix_ms())? {
            return Ok(outcome);
        }
        self.query(order)
            .await?
            .after_close()
            .ok_or_else(|| ChannelError::UnexpectedReply {
                reason: "a paid order reads as unpaid after the close".into(),
            })
    }

    async fn refund(&self, req: &RefundRequest) -> Result<RefundOutcome, ChannelError> {
        let reply = self
            .http
            .send(self.refund_request(req, now_unix_ms())?)
            .await?;
        self.parse_refund(req, &reply, now_unix_ms())
    }

    fn verify_callback(
        &self,
        callback: &Callback<'_>,
        now_ms: u64,
    ) -> Result<Notice, CallbackRefusal> {
        self.read_callback(callback, now_ms)
    }

    /// `200 {"received": true}` acknowledges; a failure is 400 (refused) or 503 (try later)
    /// with `{"error": …}`, the message reduced to short printable ASCII.
    fn callback_reply(&self, answer: CallbackAnswer, message: &str) -> CallbackReply {
        let (status, body) = match answer {
            CallbackAnswer::Ack => (200, serde_json::json!({"received": true})),
            CallbackAnswer::Refused => (
                400,
                serde_json::json!({"error": callback_reply_message(message, "refused")}),
            ),
            CallbackAnswer::RetryLater => (
                503,
                serde_json::json!({"error": callback_reply_message(message, "try again later")}),
            ),
        };
        CallbackReply {
            status,
            content_type: "application/json",
            body: body.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Independent vector: printed by scripts/gen-signature-vectors.sh with
    // `printf '%s.%s' "$t" "$body" | openssl dgst -sha256 -hmac "$secret"`.
    const SECRET: &str = "whsec_test_only_supplier_0123456789";
    const TIMESTAMP: u64 = 1714564800;
    const BODY: &str = r#"{"order_id":"att_01HX7Z3K9Q2W","supplier_order_id":"S-20240501-0001","status":"succeeded","amount":"88.88","currency":"CNY"}"#;
    const HEADER: &str =
        "t=1714564800,v1=c1088142207d0ca2ace275480ffe0ca46d0fb1264876b7719593537b25cc4cae";

    fn key() -> SupplierKey {
        SupplierKey::new(&Secret::new(SECRET)).unwrap()
    }

    fn other_mac() -> String {
        let other = SupplierKey::new(&Secret::new("whsec_test_only_supplier_OLD_0000")).unwrap();
        let header = signature_header(&other, TIMESTAMP, BODY.as_bytes());
        header.split_once(",v1=").unwrap().1.to_owned()
    }

    #[test]
    fn matches_the_openssl_vector() {
        assert_eq!(signature_header(&key(), TIMESTAMP, BODY.as_bytes()), HEADER);
        assert_eq!(
            verify(&key(), HEADER, BODY.as_bytes(), TIMESTAMP + 5),
            Ok(())
        );
        let mac = HEADER.split_once(",v1=").unwrap().1;
        let upper = format!("t={TIMESTAMP},v1={}", mac.to_uppercase());
        assert_eq!(
            verify(&key(), &upper, BODY.as_bytes(), TIMESTAMP),
            Ok(()),
            "upper-case hex is accepted"
        );
    }

    #[test]
    fn refuses_outside_the_300_second_window() {
        let body = BODY.as_bytes();
        for now in [TIMESTAMP - 300, TIMESTAMP + 300] {
            assert_eq!(verify(&key(), HEADER, body, now), Ok(()));
        }
        assert_eq!(
            verify(&key(), HEADER, body, TIMESTAMP + 301),
            Err(SupplierSignatureError::OutsideWindow { skew_seconds: 301 })
        );
        assert_eq!(
            verify(&key(), HEADER, body, TIMESTAMP - 301),
            Err(SupplierSignatureError::OutsideWindow { skew_seconds: 301 })
        );
    }

    #[test]
    fn refuses_bad_signatures() {
        let body = BODY.as_bytes();
        let tampered = BODY.replace("88.88", "888.8");
        assert_eq!(
            verify(&key(), HEADER, tampered.as_bytes(), TIMESTAMP),
            Err(SupplierSignatureError::BadSignature)
        );
        // The same MAC with another timestamp: the timestamp is signed.
        let moved = HEADER.replace("t=1714564800", "t=1714564801");
        assert_eq!(
            verify(&key(), &moved, body, TIMESTAMP),
            Err(SupplierSignatureError::BadSignature)
        );
        let wrong_key = format!("t={TIMESTAMP},v1={}", other_mac());
        assert_eq!(
            verify(&key(), &wrong_key, body, TIMESTAMP),
            Err(SupplierSignatureError::BadSignature)
        );
    }

    #[test]
    fn any_of_several_v1_may_match() {
        let body = BODY.as_bytes();
        let good = HEADER.split_once(",v1=").unwrap().1;
        let old = other_mac();
        for header in [
            format!("t={TIMESTAMP},v1={old},v1={good}"),
            format!("v1={good},t={TIMESTAMP},v1={old}"),
        ] {
            assert_eq!(verify(&key(), &header, body, TIMESTAMP), Ok(()), "{header}");
        }
        let neither = format!("t={TIMESTAMP},v1={old},v1={old}");
        assert_eq!(
            verify(&key(), &neither, body, TIMESTAMP),
            Err(SupplierSignatureError::BadSignature)
        );
        let four = format!("t={TIMESTAMP},v1={old},v1={old},v1={old},v1={good}");
        assert_eq!(verify(&key(), &four, body, TIMESTAMP), Ok(()));
        let five = format!("t={TIMESTAMP},v1={old},v1={old},v1={old},v1={old},v1={good}");
        assert!(matches!(
            verify(&key(), &five, body, TIMESTAMP),
            Err(SupplierSignatureError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_malformed_headers() {
        let mac = HEADER.split_once(",v1=").unwrap().1;
        for header in [
            String::new(),
            "t=1714564800".to_owned(),
            format!("v1={mac}"),
            format!("t=1714564800,t=1714564800,v1={mac}"),
            format!("t=,v1={mac}"),
            format!("t=+1714564800,v1={mac}"),
            format!("t=1714564800.5,v1={mac}"),
            format!("t=99999999999999999999,v1={mac}"),
            format!("t=1714564800, v1={mac}"),
            format!(" t=1714564800,v1={mac}"),
            format!("t=1714564800,v1={mac},"),
            format!("t=1714564800;v1={mac}"),
            format!("t=1714564800,v0={mac}"),
            format!("t=1714564800,V1={mac}"),
            format!("t=1714564800,v1={}", &mac[..62]),
            format!("t=1714564800,v1={mac}00"),
            format!("t=1714564800,v1={}", "zz".repeat(32)),
            "t=1714564800,v1".to_owned(),
        ] {
            assert!(
                matches!(
                    verify(&key(), &header, BODY.as_bytes(), TIMESTAMP),
                    Err(SupplierSignatureError::Malformed(_))
                ),
                "{header:?}"
            );
        }
    }

    #[test]
    fn refuses_weak_secrets_and_never_prints_them() {
        assert_eq!(
            SupplierKey::new(&Secret::new("short")).unwrap_err(),
            WeakSupplierSecret
        );
        assert_eq!(format!("{:?}", key()), "SupplierKey(***)");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn sign_verify_round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            timestamp in 0u64..4_000_000_000,
            skew in 0u64..=300,
            later: bool,
        ) {
            let header = signature_header(&key(), timestamp, &body);
            let now = if later { timestamp + skew } else { timestamp.saturating_sub(skew) };
            prop_assert_eq!(verify(&key(), &header, &body, now), Ok(()));
        }

        #[test]
        fn tampering_with_body_or_mac_fails(
            index in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            in_mac: bool,
        ) {
            let mut body = BODY.as_bytes().to_vec();
            let mut mac = hex::decode(HEADER.split_once(",v1=").unwrap().1).unwrap();
            let target = if in_mac { &mut mac } else { &mut body };
            let at = index.index(target.len());
            target[at] ^= flip;
            let header = format!("t={TIMESTAMP},v1={}", hex::encode(&mac));
            prop_assert_eq!(
                verify(&key(), &header, &body, TIMESTAMP),
                Err(SupplierSignatureError::BadSignature)
            );
        }
    }
    mod adapter {
        use super::super::*;
        use super::key;
        use crate::channels::test_support::*;

        fn channel() -> SupplierChannel {
            SupplierChannel::new(
                "sup",
                BaseUrl::parse("http://127.0.0.1:9/sup").unwrap(),
                key(),
                http(),
            )
        }

        /// A reply signed with `key` at NOW.
        fn signed(status: u16, body: &str, key: &SupplierKey) -> HttpReply {
            let header = signature_header(key, NOW_MS / 1000, body.as_bytes());
            reply(status, &[(HEADER_NAME, &header)], body)
        }

        #[tokio::test]
        async fn builds_signed_requests() {
            let order = create_order();
            let (parts, body) = split(channel().create_request(&order, NOW_MS).unwrap()).await;
            assert_eq!(parts.method, Method::POST);
            assert_eq!(parts.uri, "http://127.0.0.1:9/sup/v1/orders");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["order_id"], order.order_id.as_str());
            assert_eq!(json["amount"], "88.88");
            assert_eq!(json["currency"], "CNY");
            assert_eq!(json["notify_url"], order.notify_url.as_str());
            assert_eq!(json["expires_at"], "2024-05-01T12:15:00Z");
            let header = parts.headers[HEADER_NAME].to_str().unwrap();
            assert!(header.starts_with("t=1714564800,v1="), "{header}");
            assert_eq!(
                verify(&key(), header, body.as_bytes(), NOW_MS / 1000),
                Ok(())
            );

            let (parts, body) =
                split(channel().query_request(&order.order_id, NOW_MS).unwrap()).await;
            assert_eq!(parts.method, Method::GET);
            assert_eq!(
                parts.uri.path(),
                format!("/sup/v1/orders/{}", order.order_id)
            );
            assert_eq!(body, "");
            let header = parts.headers[HEADER_NAME].to_str().unwrap();
            assert_eq!(verify(&key(), header, b"", NOW_MS / 1000), Ok(()));

            let (parts, _) = split(channel().close_request(&order.order_id, NOW_MS).unwrap()).await;
            assert_eq!(
                parts.uri.path(),
                format!("/sup/v1/orders/{}/close", order.order_id)
            );

            let refund = refund_request(order.order_id.clone());
            let (parts, body) = split(channel().refund_request(&refund, NOW_MS).unwrap()).await;
            assert_eq!(
                parts.uri.path(),
                format!("/sup/v1/orders/{}/refunds", order.order_id)
            );
            assert_eq!(body, r#"{"refund_id":"rf_0001","amount":"10.00"}"#);
        }

        #[test]
        fn reads_signed_replies() {
            let order = create_order();
            let id = order.order_id.as_str();
            let ok =
                format!(r#"{{"order_id":"{id}","supplier_order_id":"S-1","status":"accepted"}}"#);
            assert_eq!(
                channel().parse_create(&order, &signed(200, &ok, &key()), NOW_MS),
                Ok(Created {
                    action: Action::None,
                    channel_txn_id: Some("S-1".into())
                })
            );
            let paid = format!(
                r#"{{"order_id":"{id}","supplier_order_id":"S-1","status":"succeeded","amount":"88.88","currency":"CNY"}}"#
            );
            let state = channel().parse_query(&order.order_id, &signed(200, &paid, &key()), NOW_MS);
            assert_eq!(
                state,
                Ok(OrderState::Paid {
                    channel_txn_id: "S-1".into(),
                    amount_minor: 8888,
                    currency: Currency::Cny
                })
            );
            assert!(matches!(
                channel().parse_close(&order.order_id, &signed(200, &paid, &key()), NOW_MS),
                Ok(Some(CloseOutcome::AlreadyPaid {
                    amount_minor: 8888,
                    ..
                }))
            ));
            // What the supplier answers to closing a paid order: a query tells the amount.
            let conflict = signed(
                409,
                r#"{"error":"order_paid","status":"succeeded"}"#,
                &key(),
            );
            assert_eq!(
                channel().parse_close(&order.order_id, &conflict, NOW_MS),
                Ok(None)
            );
            let closed = format!(r#"{{"order_id":"{id}","status":"closed"}}"#);
            assert_eq!(
                channel().parse_close(&order.order_id, &signed(200, &closed, &key()), NOW_MS),
                Ok(Some(CloseOutcome::Closed))
            );
            let not_found = signed(404, r#"{"error":"no such order"}"#, &key());
            assert_eq!(
                channel().parse_query(&order.order_id, &not_found, NOW_MS),
                Ok(OrderState::NotFound)
            );
            let refund = refund_request(order.order_id.clone());
            let refunded = signed(
                200,
                r#"{"refund_id":"rf_0001","status":"succeeded"}"#,
                &key(),
            );
            assert_eq!(
                channel().parse_refund(&refund, &refunded, NOW_MS),
                Ok(RefundOutcome::Succeeded {
                    channel_refund_id: None
                })
            );
        }

        #[test]
        fn declines_only_when_signed() {
            let order = create_order();
            let declined = channel().parse_create(
                &order,
                &signed(422, r#"{"error":"amount too large"}"#, &key()),
                NOW_MS,
            );
            let error = declined.unwrap_err();
            assert_eq!(
                error,
                ChannelError::Declined {
                    code: "http_422".into(),
                    message: "amount too large".into()
                }
            );
            assert!(error.certainly_not_executed() && !error.counts_as_failure());
            // Order id already taken: maybe our own earlier try.
            assert_unknown(channel().parse_create(
                &order,
                &signed(409, r#"{"error":"dup"}"#, &key()),
                NOW_MS,
            ));
            assert!(matches!(
                channel().parse_create(&order, &signed(429, "{}", &key()), NOW_MS),
                Err(ChannelError::Throttled { .. })
            ));
            assert!(matches!(
                assert_unknown(channel().parse_create(&order, &reply(503, &[], "busy"), NOW_MS)),
                ChannelError::ServerError { status: 503, .. }
            ));
        }

        #[test]
        fn refuses_unsigned_forged_stale_and_mismatched_replies() {
            let order = create_order();
            let id = order.order_id.as_str();
            let paid = format!(
                r#"{{"order_id":"{id}","status":"succeeded","amount":"88.88","currency":"CNY"}}"#
            );
            let other =
                SupplierKey::new(&Secret::new("whsec_test_only_supplier_OLD_0000")).unwrap();
            assert_unverifiable(channel().parse_query(
                &order.order_id,
                &reply(200, &[], &paid),
                NOW_MS,
            ));
            assert_unverifiable(channel().parse_query(
                &order.order_id,
                &signed(200, &paid, &other),
                NOW_MS,
            ));
            assert_unverifiable(channel().parse_query(
                &order.order_id,
                &signed(200, &paid, &key()),
                NOW_MS + 301_000,
            ));
            // An unsigned decline is no decline: failover on it could execute twice.
            assert_unverifiable(channel().parse_create(
                &order,
                &reply(400, &[], r#"{"error":"no"}"#),
                NOW_MS,
            ));
            let elsewhere = paid.replace(id, "0000000000000000000000000-1");
            assert_unverifiable(channel().parse_query(
                &order.order_id,
                &signed(200, &elsewhere, &key()),
                NOW_MS,
            ));
            let no_amount = format!(r#"{{"order_id":"{id}","status":"succeeded"}}"#);
            assert_unverifiable(channel().parse_query(
                &order.order_id,
                &signed(200, &no_amount, &key()),
                NOW_MS,
            ));
        }
    }

    mod callbacks {
        use super::super::*;
        use super::{key, SECRET};
        use crate::channels::test_support::*;
        use crate::channels::{MAX_CALLBACK_BODY_BYTES, MAX_CALLBACK_MESSAGE_CHARS};
        use hyper::header::HeaderValue;
        use hyper::HeaderMap;
        use proptest::prelude::*;

        const SUPPLIER_ORDER_ID: &str = "S-20240501-0001";
        const SIGNED_AT: u64 = NOW_MS / 1000;

        fn channel() -> SupplierChannel {
            SupplierChannel::new(
                "sup",
                BaseUrl::parse("http://127.0.0.1:9/sup").unwrap(),
                key(),
                http(),
            )
        }

        /// A paid callback as the simulator's `notice` makes it.
        fn paid_json(order: &ChannelOrderId) -> serde_json::Value {
            serde_json::json!({
                "order_id": order.as_str(),
                "supplier_order_id": SUPPLIER_ORDER_ID,
                "status": "succeeded",
                "amount": "88.88",
                "currency": "CNY",
            })
        }

        fn signed_headers(body: &[u8], at_seconds: u64) -> HeaderMap {
            let mut headers = HeaderMap::new();
            headers.insert(
                HEADER_NAME,
                HeaderValue::from_str(&signature_header(&key(), at_seconds, body)).unwrap(),
            );
            headers
        }

        fn verify_with(
            headers: &HeaderMap,
            body: &[u8],
            now_ms: u64,
        ) -> Result<Notice, CallbackRefusal> {
            channel().verify_callback(&Callback { headers, body }, now_ms)
        }

        /// `body` signed now, verified now.
        fn verify_signed(body: &str) -> Result<Notice, CallbackRefusal> {
            verify_with(
                &signed_headers(body.as_bytes(), SIGNED_AT),
                body.as_bytes(),
                NOW_MS,
            )
        }

        fn with(
            order: &ChannelOrderId,
            change: impl FnOnce(&mut serde_json::Value),
        ) -> Result<Notice, CallbackRefusal> {
            let mut json = paid_json(order);
            change(&mut json);
            verify_signed(&json.to_string())
        }

        fn notice(order: &ChannelOrderId, event: NoticeEvent) -> Notice {
            Notice {
                order_id: order.clone(),
                notice_id: None,
                event,
            }
        }

        fn paid(order: &ChannelOrderId) -> Notice {
            notice(
                order,
                NoticeEvent::Paid {
                    channel_txn_id: SUPPLIER_ORDER_ID.into(),
                    amount_minor: 8888,
                    currency: Currency::Cny,
                },
            )
        }

        #[track_caller]
        fn assert_refused(result: Result<Notice, CallbackRefusal>, label: &str) {
            let refusal = result.expect_err("must be refused");
            assert_eq!(refusal.label(), label, "{refusal:?}");
        }

        #[test]
        fn a_genuine_paid_callback_is_paid() {
            let order = order_id();
            let body = paid_json(&order).to_string();
            assert_eq!(verify_signed(&body), Ok(paid(&order)));
            let headers = signed_headers(body.as_bytes(), SIGNED_AT);
            for now_ms in [NOW_MS - 300_000, NOW_MS + 300_999] {
                assert_eq!(
                    verify_with(&headers, body.as_bytes(), now_ms),
                    Ok(paid(&order))
                );
            }
            // Other currencies are read with their own digits.
            assert_eq!(
                with(&order, |j| {
                    j["currency"] = "JPY".into();
                    j["amount"] = "1200".into();
                }),
                Ok(notice(
                    &order,
                    NoticeEvent::Paid {
                        channel_txn_id: SUPPLIER_ORDER_ID.into(),
                        amount_minor: 1200,
                        currency: Currency::Jpy,
                    }
                ))
            );
        }

        #[test]
        fn forged_unsigned_and_stale_callbacks_are_refused() {
            let order = order_id();
            let body = paid_json(&order).to_string();
            let headers = signed_headers(body.as_bytes(), SIGNED_AT);
            let tampered = body.replace("88.88", "88.89");
            assert_refused(
                verify_with(&headers, tampered.as_bytes(), NOW_MS),
                "bad_signature",
            );
            assert_refused(
                verify_with(&HeaderMap::new(), body.as_bytes(), NOW_MS),
                "bad_signature",
            );
            let other =
                SupplierKey::new(&Secret::new("whsec_test_only_supplier_OLD_0000")).unwrap();
            let mut forged = HeaderMap::new();
            forged.insert(
                HEADER_NAME,
                HeaderValue::from_str(&signature_header(&other, SIGNED_AT, body.as_bytes()))
                    .unwrap(),
            );
            assert_refused(
                verify_with(&forged, body.as_bytes(), NOW_MS),
                "bad_signature",
            );
            for malformed in ["t=1714564800", "v1=00", "garbage", "t=1714564800,v1=zz"] {
                let mut bad = HeaderMap::new();
                bad.insert(HEADER_NAME, HeaderValue::from_static(malformed));
                assert_refused(verify_with(&bad, body.as_bytes(), NOW_MS), "bad_signature");
            }
            let mut twice = headers.clone();
            twice.append(HEADER_NAME, headers[HEADER_NAME].clone());
            assert_refused(
                verify_with(&twice, body.as_bytes(), NOW_MS),
                "bad_signature",
            );
            // Outside 300 s either way.
            for now_ms in [NOW_MS + 301_000, NOW_MS - 301_000] {
                assert_refused(verify_with(&headers, body.as_bytes(), now_ms), "stale");
            }
            assert!(
                !format!("{:?}", verify_with(&forged, body.as_bytes(), NOW_MS)).contains(SECRET)
            );
        }

        #[test]
        fn malformed_callbacks_are_malformed() {
            let order = order_id();
            for amount in ["88.888", "-88.88", "abc", "0", "0.00", "88,88", ""] {
                assert_refused(with(&order, |j| j["amount"] = amount.into()), "malformed");
            }
            assert_refused(with(&order, |j| j["amount"] = 88.88.into()), "malformed");
            // JPY has no minor unit: "1200.00" is not exact JPY.
            assert_refused(
                with(&order, |j| {
                    j["currency"] = "JPY".into();
                    j["amount"] = "1200.00".into();
                }),
                "malformed",
            );
            assert_refused(with(&order, |j| j["currency"] = "XYZ".into()), "malformed");
            for field in [
                "currency",
                "amount",
                "supplier_order_id",
                "order_id",
                "status",
            ] {
                assert_refused(
                    with(&order, |j| {
                        j.as_object_mut().unwrap().remove(field);
                    }),
                    "malformed",
                );
            }
            assert_refused(
                with(&order, |j| j["order_id"] = "att_01HX7Z3K9Q2W".into()),
                "malformed",
            );
            assert_refused(
                with(&order, |j| j["supplier_order_id"] = "S 1".into()),
                "malformed",
            );
            assert_refused(verify_signed("not json"), "malformed");
            assert_refused(verify_signed("[]"), "malformed");
            let huge = vec![b' '; MAX_CALLBACK_BODY_BYTES + 1];
            assert_refused(
                verify_with(&signed_headers(&huge, SIGNED_AT), &huge, NOW_MS),
                "malformed",
            );
        }

        #[test]
        fn each_status_maps_as_documented() {
            let order = order_id();
            for (status, event) in [
                ("failed", NoticeEvent::Failed),
                ("closed", NoticeEvent::Closed),
                ("accepted", NoticeEvent::Other("accepted".into())),
                ("refunded", NoticeEvent::Other("refunded".into())),
            ] {
                // Only a succeeded order needs its amount.
                let result = with(&order, |j| {
                    j["status"] = status.into();
                    j.as_object_mut().unwrap().remove("amount");
                });
                assert_eq!(result, Ok(notice(&order, event)), "{status}");
            }
            for (status, succeeded) in [("succeeded", true), ("failed", false)] {
                let result = with(&order, |j| {
                    j["status"] = status.into();
                    j["refund_id"] = "rf_0001".into();
                    j["amount"] = "10.00".into();
                });
                assert_eq!(
                    result,
                    Ok(notice(
                        &order,
                        NoticeEvent::Refund {
                            refund_id: Some("rf_0001".into()),
                            amount_minor: 1000,
                            succeeded,
                        }
                    ))
                );
            }
        }

        #[test]
        fn replies_have_the_protocol_shape() {
            let channel = channel();
            assert_eq!(
                channel.callback_reply(CallbackAnswer::Ack, "ignored"),
                CallbackReply {
                    status: 200,
                    content_type: "application/json",
                    body: r#"{"received":true}"#.into()
                }
            );
            assert_eq!(
                channel.callback_reply(CallbackAnswer::Refused, "stale or probe: too old"),
                CallbackReply {
                    status: 400,
                    content_type: "application/json",
                    body: r#"{"error":"stale or probe: too old"}"#.into()
                }
            );
            assert_eq!(
                channel.callback_reply(CallbackAnswer::RetryLater, ""),
                CallbackReply {
                    status: 503,
                    content_type: "application/json",
                    body: r#"{"error":"try again later"}"#.into()
                }
            );
            let reply = channel.callback_reply(CallbackAnswer::Refused, &"é\"".repeat(500));
            let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            let message = json["error"].as_str().unwrap();
            assert_eq!(message.len(), MAX_CALLBACK_MESSAGE_CHARS);
            assert!(message.starts_with("?\"?\""), "{message}");
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Every byte of the body is signed: a flipped one is never another notice.
            #[test]
            fn a_flipped_byte_never_reads_as_another_notice(
                index in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let order = order_id();
                let body = paid_json(&order).to_string();
                let headers = signed_headers(body.as_bytes(), SIGNED_AT);
                let mut tampered = body.into_bytes();
                let at = index.index(tampered.len());
                tampered[at] ^= flip;
                match verify_with(&headers, &tampered, NOW_MS) {
                    Err(_) => {}
                    Ok(notice) => prop_assert_eq!(notice, paid(&order)),
                }
            }
        }
    }
}
