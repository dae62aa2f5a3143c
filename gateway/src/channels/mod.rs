//! The payment channels (DESIGN.md §5), one file per protocol.
//!
//! Two layers live here:
//!
//! 1. The **signature layer** of each protocol: building the exact text each channel signs,
//!    signing it, and verifying what comes back, with the refusals each protocol requires
//!    (timestamp windows, probe signatures, unknown key serials).
//! 2. The **adapters** built on it: the [`Channel`] trait (create, query, close, refund) with
//!    one implementation per protocol ([`alipay::AlipayChannel`],
//!    [`wechatpay::WechatPayChannel`], [`supplier::SupplierChannel`]), each over its own
//!    [`client::HttpClient`] (pooled, bounded, timed out); [`ChannelSettings`] and
//!    [`build_channel`] make one from configuration.
//!
//! - [`keys`]: RSA keys (aws-lc-rs) loaded from PEM text, files or environment variables;
//!   RSA-SHA256 (PKCS#1 v1.5) sign and verify; key generation.
//! - [`alipay`]: Alipay open platform RSA2: request signing strings, callback verification,
//!   the verification of a reply's signed response object, and the adapter.
//! - [`wechatpay`]: WeChat Pay API v3: request signatures and the `Authorization` header,
//!   reply/callback verification against the platform key named by its serial,
//!   AEAD_AES_256_GCM callback resources, and the adapter.
//! - [`supplier`]: the HMAC-JSON supplier protocol's `X-Signature` header, and the adapter.
//! - [`client`]: the HTTP client of one channel.
//!
//! ## What an error says about the attempt
//!
//! The failover rule (DESIGN.md §6) needs to know, for every failed call, whether it
//! **certainly did not take effect** at the channel. [`ChannelError::certainly_not_executed`]
//! answers it: only a request that never left (in-flight limit, open breaker, connection not
//! established, request refused locally) or an explicit, *verified* refusal by the channel
//! before acceptance says yes. Everything else — a timeout, an I/O error once the request may
//! have been written, a 5xx, a reply that does not verify or that we do not understand — is an
//! unknown outcome, to be resolved by `close`/`query`, never by trying another channel. An
//! unsigned or forged reply is never read as success *nor* as a decline: a forged decline would
//! otherwise buy a second execution elsewhere.
//!
//! [`ChannelError::counts_as_failure`] is the breaker's question: timeouts, connection errors,
//! 5xx, throttling and unverifiable replies count; business declines and local refusals do not.
//!
//! ## Channel order ids
//!
//! [`ChannelOrderId::for_attempt`] derives the channel's `out_trade_no` from the payment id and
//! the attempt number: the payment id without `pay_` (26 base62 characters), `-`, the attempt
//! in decimal — 28 to 30 characters of `[0-9A-Za-z-]`, inside WeChat Pay's 32. It is
//! deterministic (a retry of the same attempt sends the same id, so the channel deduplicates)
//! and carries the payment id, so a callback finds its payment without a lookup
//! ([`ChannelOrderId::parse`]).
//!
//! ## Expiry
//!
//! Every order is sent with the instant [`CreateOrder::expires_at_ms`], floored to the second,
//! which the caller sets to the payment's expiry — shorter than the hold's TTL by the
//! configured margin (`config.rs`), so a channel never takes money after the gateway let the
//! hold go. Orders with less than [`MIN_ORDER_LIFETIME_MS`] left are refused locally. Alipay
//! gets `time_expire` (absolute, Beijing time), not `timeout_express`: a relative minute count
//! starts when Alipay receives the request, so it drifts past our instant by the request's
//! latency and is rounded to minutes; the absolute form is exact up to clock skew (NTP is a
//! deploy requirement).
//!
//! Every function that checks a time window or stamps a request takes `now` as an argument,
//! so tests (and replays of recorded traffic) choose the clock; only the [`Channel`]
//! implementations read the system clock.
//!
//! The signatures are tested against fixed vectors produced by another implementation
//! (`scripts/gen-signature-vectors.sh`: the `openssl` CLI and python's `cryptography`), with
//! the test-only keys in `gateway/tests/fixtures/keys/`.

pub mod alipay;
pub mod client;
mod errors;
pub mod keys;
mod settings;
pub mod supplier;
pub mod wechatpay;

pub(crate) use errors::{callback_reply_message, callback_text, check_callback_size, server_error};
pub use errors::{
    CallbackRefusal, ChannelError, CREDENTIAL_REFUSALS, MAX_CALLBACK_BODY_BYTES,
    MAX_CALLBACK_MESSAGE_CHARS, MAX_CALLBACK_TEXT_BYTES, MAX_DECLINE_MESSAGE_CHARS,
};
pub use settings::{
    BaseUrl, ChannelKeySettings, ChannelSettings, ChannelSettingsError, KeySource,
    MAX_CHANNEL_ID_CHARS, MAX_IDLE_CONNECTIONS_PER_HOST, MAX_IN_FLIGHT, MAX_REQUEST_TIMEOUT_MS,
    MAX_RESPONSE_BYTES,
};

use std::fmt;

use async_trait::async_trait;
use serde::Deserialize;

use crate::ids::PaymentId;
use crate::money::{Amount, Currency};

/// The signature window of the protocols that have one (WeChat Pay's "5 minutes", the
/// supplier's 300 s): a signed timestamp further than this from `now`, either way, is refused.
pub const SIGNATURE_WINDOW_SECONDS: u64 = 300;

/// `|now - timestamp|` in seconds, without overflow.
pub(crate) fn skew_seconds(timestamp_unix_seconds: u64, now_unix_seconds: u64) -> u64 {
    timestamp_unix_seconds.abs_diff(now_unix_seconds)
}

/// Orders with less time than this left before their expiry are refused locally (an order
/// that expires while it travels is useless). The real bound on how short a payment may live
/// is `payments.min_expires_in_seconds` (60 s by default).
pub const MIN_ORDER_LIFETIME_MS: u64 = 1_000;

/// The longest description sent (WeChat Pay's `description` limit is 127 characters; Alipay's
/// `subject` allows 256).
pub const MAX_DESCRIPTION_CHARS: usize = 127;

/// Which protocol a channel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Alipay,
    Wechatpay,
    Supplier,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Alipay => "alipay",
            ChannelKind::Wechatpay => "wechatpay",
            ChannelKind::Supplier => "supplier",
        }
    }
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The channel's order id (`out_trade_no`, the supplier's `order_id`) of one attempt of one
/// payment: see the module docs. Holding one proves it has this shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelOrderId {
    text: String,
    attempt: u8,
}

impl ChannelOrderId {
    /// WeChat Pay's limit; ours are 28 to 30 characters.
    pub const MAX_CHARS: usize = 32;
    const PAYMENT_BODY_CHARS: usize = 26;

    /// The id of attempt `attempt` of `payment`: deterministic, distinct for distinct pairs.
    pub fn for_attempt(payment: &PaymentId, attempt: u8) -> Self {
        let body = payment
            .as_str()
            .strip_prefix(PAYMENT_ID_PREFIX)
            .expect("a payment id starts with pay_");
        debug_assert_eq!(body.len(), Self::PAYMENT_BODY_CHARS);
        let text = format!("{body}-{attempt}");
        debug_assert!(text.len() <= Self::MAX_CHARS);
        Self { text, attempt }
    }

    /// Reads an id back from a channel's callback or reply. `None` unless `s` is exactly what
    /// [`ChannelOrderId::for_attempt`] makes for some payment id and attempt (no leading zeros,
    /// attempt ≤ 255), so the mapping is one-to-one.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > Self::MAX_CHARS {
            return None;
        }
        let (body, attempt_text) = s.split_once('-')?;
        if body.len() != Self::PAYMENT_BODY_CHARS
            || attempt_text.is_empty()
            || attempt_text.len() > 3
            || !attempt_text.bytes().all(|b| b.is_ascii_digit())
            || (attempt_text.len() > 1 && attempt_text.starts_with('0'))
        {
            return None;
        }
        let attempt: u8 = attempt_text.parse().ok()?;
        PaymentId::parse(&format!("{PAYMENT_ID_PREFIX}{body}"))?;
        Some(Self {
            text: s.to_owned(),
            attempt,
        })
    }

    /// The payment this attempt belongs to.
    pub fn payment_id(&self) -> PaymentId {
        let body = &self.text[..Self::PAYMENT_BODY_CHARS];
        PaymentId::parse(&format!("{PAYMENT_ID_PREFIX}{body}"))
            .expect("a channel order id holds a valid payment id")
    }

    pub fn attempt(&self) -> u8 {
        self.attempt
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ChannelOrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const PAYMENT_ID_PREFIX: &str = "pay_";

/// The refund number the caller persisted before the first try (Alipay `out_request_no`,
/// WeChat Pay `out_refund_no`, the supplier's `refund_id`) and reuses on every retry: each
/// channel refunds once per number. 1 to 64 characters of `[0-9A-Za-z_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelRefundId(String);

impl ChannelRefundId {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_CHARS
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a channel is asked to create: one attempt of one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOrder {
    pub order_id: ChannelOrderId,
    pub amount: Amount,
    pub currency: Currency,
    /// Shown to the customer (Alipay `subject`, WeChat Pay `description`); 1 to
    /// [`MAX_DESCRIPTION_CHARS`] characters, no control characters.
    pub description: String,
    /// Where the channel sends its callbacks for this order.
    pub notify_url: String,
    /// The instant after which the channel must not accept money (unix milliseconds).
    pub expires_at_ms: u64,
}

/// What the customer does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Show this text as a QR code (Alipay `qr_code`, WeChat Pay `code_url`).
    QrCode(String),
    /// Send the customer to this URL.
    Redirect(String),
    /// Nothing: the channel settles on its own (a supplier order).
    None,
}

/// A created order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub action: Action,
    /// The channel's own id of the order, when the create reply has one.
    pub channel_txn_id: Option<String>,
}

/// An order's state at the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderState {
    /// The channel has no such order. (Alipay: also a precreated order nobody has scanned
    /// yet — see DESIGN.md §5.)
    NotFound,
    /// Waiting for the customer (Alipay `WAIT_BUYER_PAY`, WeChat `NOTPAY`/`USERPAYING`,
    /// supplier `accepted`).
    Pending,
    /// Paid (Alipay `TRADE_SUCCESS`/`TRADE_FINISHED`, WeChat `SUCCESS`, supplier
    /// `succeeded`). The caller compares `amount_minor` *and* `currency` with the payment's
    /// (the currency travels along so that 88 JPY is never read as 0.88 CNY).
    Paid {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// Paid, then (partly or fully) refunded (WeChat `REFUND`).
    Refunded {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// Closed without payment (Alipay `TRADE_CLOSED`, WeChat `CLOSED`/`REVOKED`, supplier
    /// `closed`). Alipay also reports a *fully refunded* trade as `TRADE_CLOSED`: a caller that
    /// already saw the payment succeed must not read this as "never paid".
    Closed,
    /// The payment failed (WeChat `PAYERROR`, supplier `failed`); no money moved.
    Failed,
}

/// The answer to a close: also whether the order was paid (DESIGN.md §6: an unknown outcome
/// is resolved by closing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseOutcome {
    /// Closed now or earlier, unpaid: no money will be taken for this order.
    Closed,
    /// The channel has no such order. With Alipay, a precreated code nobody scanned is in
    /// this state too, and could still be scanned until its `time_expire`.
    NotFound,
    /// Too late: the order was paid (and maybe refunded since).
    AlreadyPaid {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
}

/// A refund of (part of) a paid order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub order_id: ChannelOrderId,
    /// Persisted by the caller before the first try, reused on retries.
    pub refund_id: ChannelRefundId,
    pub amount: Amount,
    /// The order's total (WeChat Pay requires it).
    pub order_total: Amount,
    pub currency: Currency,
    pub reason: Option<String>,
    /// Where refund notices go (WeChat Pay, supplier); Alipay uses the app's setting.
    pub notify_url: Option<String>,
}

/// The answer to a refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// The money went back (or had already, for a retried refund number).
    Succeeded { channel_refund_id: Option<String> },
    /// Accepted, to be settled later (a notice or a query tells).
    Pending { channel_refund_id: Option<String> },
    /// Refused after acceptance (WeChat `CLOSED`/`ABNORMAL`, supplier `failed`).
    Failed {
        channel_refund_id: Option<String>,
        status: String,
    },
}

/// A callback as received on `POST /v1/callbacks/{channel_id}`: the raw body (never
/// re-serialized: signatures cover the exact bytes) and the headers.
#[derive(Debug, Clone, Copy)]
pub struct Callback<'a> {
    pub headers: &'a hyper::HeaderMap,
    pub body: &'a [u8],
}

/// What a verified callback says about one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The gateway's channel order id it is about (`out_trade_no`, supplier `order_id`).
    pub order_id: ChannelOrderId,
    /// The channel's id of this notice when it has one (Alipay `notify_id`, WeChat Pay event
    /// `id`), for logs.
    pub notice_id: Option<String>,
    pub event: NoticeEvent,
}

/// The events the gateway acts on (DESIGN.md §5, §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeEvent {
    /// The order was paid (Alipay `TRADE_SUCCESS` without refund fields, WeChat Pay
    /// `TRANSACTION.SUCCESS` with `trade_state` `SUCCESS`, supplier `succeeded`). The caller
    /// compares amount *and* currency with the payment's.
    Paid {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// Alipay `TRADE_FINISHED`: paid, and no longer refundable. Captures only if the payment
    /// is still pending (its `TRADE_SUCCESS` was lost); never twice.
    Finished {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// Closed unpaid (Alipay `TRADE_CLOSED` — also sent after a *full refund*, so the caller
    /// checks the payment's state; supplier `closed`).
    Closed,
    /// The payment failed at the channel (supplier `failed`).
    Failed,
    /// A refund of (part of) the order (Alipay `TRADE_SUCCESS` with `refund_fee`/`out_biz_no`,
    /// WeChat Pay `REFUND.*`): the refund logic's business.
    Refund {
        /// Our refund number as sent (`out_biz_no` / `out_refund_no`), when the notice has it.
        refund_id: Option<String>,
        /// The refunded amount (Alipay: `refund_fee`, the total refunded so far).
        amount_minor: i64,
        succeeded: bool,
    },
    /// A genuine notice of a kind the gateway does not act on (acknowledged, nothing done).
    Other(String),
}

/// The answer to a callback, in the protocol's form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackReply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// Why a callback was answered as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackAnswer {
    /// Processed (or a genuine duplicate): Alipay `success`, WeChat Pay 204, supplier 200
    /// `{"received": true}`.
    Ack,
    /// Refused for good (forged, stale, mismatched, not ours): 4xx.
    Refused,
    /// Could not be processed now (store down, queue full): 5xx, the channel retries.
    RetryLater,
}

/// One upstream channel. Implementations are cheap to share (`Arc<dyn Channel>`) and safe to
/// call concurrently; each call is bounded by the channel's in-flight limit and timeouts.
#[async_trait]
pub trait Channel: Send + Sync {
    /// The configured channel id (metrics label, breaker key).
    fn id(&self) -> &str;
    fn kind(&self) -> ChannelKind;
    /// Creates the order of one attempt.
    async fn create_order(&self, req: &CreateOrder) -> Result<Created, ChannelError>;
    /// The order's state at the channel.
    async fn query(&self, order: &ChannelOrderId) -> Result<OrderState, ChannelError>;
    /// Closes the order so it cannot be paid any more, and tells whether it was paid.
    async fn close(&self, order: &ChannelOrderId) -> Result<CloseOutcome, ChannelError>;
    /// Refunds (part of) a paid order under the caller's persisted refund number.
    async fn refund(&self, req: &RefundRequest) -> Result<RefundOutcome, ChannelError>;
    /// Verifies a callback at `now_ms` (signature, timestamp window, probe signatures, this
    /// channel's app/merchant id) and reads what it says. Pure: no I/O.
    fn verify_callback(
        &self,
        callback: &Callback<'_>,
        now_ms: u64,
    ) -> Result<Notice, CallbackRefusal>;
    /// The protocol's answer to a callback.
    fn callback_reply(&self, answer: CallbackAnswer, message: &str) -> CallbackReply;
}

impl OrderState {
    /// The close outcome this state means once a close was asked for: `None` while the order
    /// is still payable (the close did not take).
    pub(crate) fn after_close(self) -> Option<CloseOutcome> {
        match self {
            OrderState::NotFound => Some(CloseOutcome::NotFound),
            OrderState::Pending => None,
            OrderState::Paid {
                channel_txn_id,
                amount_minor,
                currency,
            }
            | OrderState::Refunded {
                channel_txn_id,
                amount_minor,
                currency,
            } => Some(CloseOutcome::AlreadyPaid {
                channel_txn_id,
                amount_minor,
                currency,
            }),
            OrderState::Closed | OrderState::Failed => Some(CloseOutcome::Closed),
        }
    }
}

/// Checks what every protocol needs of a create request at `now_ms`.
pub(crate) fn check_create(req: &CreateOrder, now_ms: u64) -> Result<(), ChannelError> {
    if req.expires_at_ms < now_ms.saturating_add(MIN_ORDER_LIFETIME_MS) {
        return Err(ChannelError::invalid(format!(
            "the order expires in less than {MIN_ORDER_LIFETIME_MS} ms"
        )));
    }
    let chars = req.description.chars().count();
    if chars == 0 || chars > MAX_DESCRIPTION_CHARS || req.description.chars().any(char::is_control)
    {
        return Err(ChannelError::invalid(format!(
            "the description must be 1 to {MAX_DESCRIPTION_CHARS} characters, none a control character"
        )));
    }
    Ok(())
}

/// The system clock in unix milliseconds (only the [`Channel`] implementations read it).
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// 32 random hex digits (upper case): request nonces.
pub(crate) fn random_nonce() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
    hex::encode_upper(bytes)
}

pub(crate) use crate::time::{rfc3339_shanghai, rfc3339_utc, shanghai_datetime};

/// Validates `settings`, loads its keys and builds the channel `id` with its own HTTP client.
/// Must be called inside a tokio runtime only when the channel is used, not to build it.
pub fn build_channel(
    id: &str,
    settings: &ChannelSettings,
) -> Result<std::sync::Arc<dyn Channel>, ChannelSettingsError> {
    let fail = |message: String| ChannelSettingsError {
        channel: id.to_owned(),
        message,
    };
    if id.is_empty()
        || id.len() > MAX_CHANNEL_ID_CHARS
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(fail(format!(
            "the id must be 1 to {MAX_CHANNEL_ID_CHARS} characters of [0-9A-Za-z_-]"
        )));
    }
    settings.validate().map_err(fail)?;
    let base = BaseUrl::parse(&settings.base_url).map_err(|e| fail(format!("base_url: {e}")))?;
    let http = client::HttpClient::new(id, &settings.http()).map_err(|e| fail(e.to_string()))?;
    let keys = &settings.keys;
    let key_error =
        |field: &'static str| move |e: keys::KeyError| fail(format!("keys.{field}: {e}"));
    let present = |source: &Option<KeySource>| -> KeySource {
        source
            .clone()
            .expect("validate checked that the key is configured")
    };
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    let channel: std::sync::Arc<dyn Channel> = match settings.kind {
        ChannelKind::Alipay => std::sync::Arc::new(alipay::AlipayChannel::new(
            id,
            text(&settings.app_id),
            base,
            present(&keys.alipay_app_private_key)
                .private_key()
                .map_err(key_error("alipay_app_private_key"))?,
            present(&keys.alipay_public_key)
                .public_key()
                .map_err(key_error("alipay_public_key"))?,
            http,
        )),
        ChannelKind::Wechatpay => {
            let mut platform_keys = wechatpay::PlatformKeys::new();
            for (serial, source) in &keys.wechatpay_platform_public_keys {
                let key = source
                    .public_key()
                    .map_err(key_error("wechatpay_platform_public_keys"))?;
                platform_keys.insert(serial.clone(), key);
            }
            // Loaded here so a wrong APIv3 key stops the start, though callbacks use it.
            let api_v3 = present(&keys.wechatpay_api_v3_key)
                .secret()
                .map_err(|e| fail(format!("keys.wechatpay_api_v3_key: {e}")))?;
            let api_v3_key = wechatpay::ApiV3Key::new(&api_v3)
                .map_err(|e| fail(format!("keys.wechatpay_api_v3_key: {e}")))?;
            std::sync::Arc::new(
                wechatpay::WechatPayChannel::new(
                    id,
                    wechatpay::WechatPayIds {
                        mchid: text(&settings.mchid),
                        appid: text(&settings.appid),
                        merchant_serial: text(&settings.merchant_serial),
                    },
                    base,
                    present(&keys.wechatpay_merchant_private_key)
                        .private_key()
                        .map_err(key_error("wechatpay_merchant_private_key"))?,
                    platform_keys,
                    http,
                )
                .with_api_v3_key(api_v3_key),
            )
        }
        ChannelKind::Supplier => {
            let secret = present(&keys.supplier_secret)
                .secret()
                .map_err(|e| fail(format!("keys.supplier_secret: {e}")))?;
            let key = supplier::SupplierKey::new(&secret)
                .map_err(|e| fail(format!("keys.supplier_secret: {e}")))?;
            std::sync::Arc::new(supplier::SupplierChannel::new(id, base, key, http))
        }
    };
    Ok(channel)
}

#[cfg(test)]
pub(crate) mod test_keys {
    //! The test-only fixture keys (see `gateway/tests/fixtures/keys/README.md`).
    use super::keys::{RsaPrivateKey, RsaPublicKey};

    pub const MERCHANT_PKCS8_PEM: &str =
        include_str!("../../tests/fixtures/keys/test-only-merchant-rsa2048.pkcs8.pem");
    pub const MERCHANT_SPKI_PEM: &str =
        include_str!("../../tests/fixtures/keys/test-only-merchant-rsa2048.spki.pem");
    pub const PLATFORM_PKCS1_PEM: &str =
        include_str!("../../tests/fixtures/keys/test-only-platform-rsa2048.pkcs1.pem");
    pub const PLATFORM_SPKI_PEM: &str =
        include_str!("../../tests/fixtures/keys/test-only-platform-rsa2048.spki.pem");

    pub fn merchant() -> RsaPrivateKey {
        RsaPrivateKey::from_pem(MERCHANT_PKCS8_PEM).expect("fixture key")
    }
    pub fn merchant_public() -> RsaPublicKey {
        RsaPublicKey::from_pem(MERCHANT_SPKI_PEM).expect("fixture key")
    }
    pub fn platform() -> RsaPrivateKey {
        RsaPrivateKey::from_pem(PLATFORM_PKCS1_PEM).expect("fixture key")
    }
    pub fn platform_public() -> RsaPublicKey {
        RsaPublicKey::from_pem(PLATFORM_SPKI_PEM).expect("fixture key")
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Shared fixtures of the adapter tests.
    use super::client::{HttpClient, HttpReply, HttpSettings};
    use super::*;
    use crate::ids::{MerchantId, ScopeTag};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper::{HeaderMap, Request, StatusCode};

    /// 2024-05-01T12:00:00Z, 20:00 in Beijing: the time of the signature vectors.
    pub const NOW_MS: u64 = 1_714_564_800_000;
    pub const EXPIRES_AT_MS: u64 = NOW_MS + 15 * 60 * 1000;

    pub fn http() -> HttpClient {
        HttpClient::new("test", &HttpSettings::default()).unwrap()
    }

    pub fn order_id() -> ChannelOrderId {
        let tag = ScopeTag::merchant(&MerchantId::parse("m1").unwrap());
        ChannelOrderId::for_attempt(&PaymentId::generate(tag, NOW_MS), 1)
    }

    pub fn create_order() -> CreateOrder {
        CreateOrder {
            order_id: order_id(),
            amount: Amount::from_minor(8888).unwrap(),
            currency: Currency::Cny,
            description: "Top-up 充值 & more".to_owned(),
            notify_url: "https://gateway.example.com/v1/callbacks/x/ch1".to_owned(),
            expires_at_ms: EXPIRES_AT_MS,
        }
    }

    pub fn refund_request(order_id: ChannelOrderId) -> RefundRequest {
        RefundRequest {
            order_id,
            refund_id: ChannelRefundId::parse("rf_0001").unwrap(),
            amount: Amount::from_minor(1000).unwrap(),
            order_total: Amount::from_minor(8888).unwrap(),
            currency: Currency::Cny,
            reason: Some("customer asked".to_owned()),
            notify_url: Some("https://gateway.example.com/v1/callbacks/x/ch1".to_owned()),
        }
    }

    pub fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> HttpReply {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        HttpReply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: Bytes::from(body.to_owned()),
        }
    }

    /// The request's parts and its body as text.
    pub async fn split(request: Request<Full<Bytes>>) -> (hyper::http::request::Parts, String) {
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// Asserts `result` is an error of unknown outcome (never a success, never a decline).
    #[track_caller]
    pub fn assert_unknown<T: std::fmt::Debug>(result: Result<T, ChannelError>) -> ChannelError {
        let error = result.expect_err("must not be read as success");
        assert!(!error.certainly_not_executed(), "{error:?}");
        error
    }

    #[track_caller]
    pub fn assert_unverifiable<T: std::fmt::Debug>(result: Result<T, ChannelError>) {
        let error = assert_unknown(result);
        assert!(
            matches!(error, ChannelError::Unverifiable { .. }),
            "{error:?}"
        );
        assert!(error.counts_as_failure());
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::ids::{MerchantId, ScopeTag};
    use proptest::prelude::*;

    #[test]
    fn channel_order_ids_round_trip_and_refuse_other_shapes() {
        let id = order_id();
        assert_eq!(id.as_str().len(), 28);
        assert!(id.as_str().ends_with("-1"));
        let parsed = ChannelOrderId::parse(id.as_str()).unwrap();
        assert_eq!(parsed, id);
        assert_eq!(parsed.attempt(), 1);
        assert_eq!(
            format!("pay_{}", &id.as_str()[..26]),
            parsed.payment_id().as_str()
        );
        let body = &id.as_str()[..26];
        for bad in [
            format!("{body}-01"),
            format!("{body}-256"),
            format!("{body}-"),
            format!("{body}1"),
            format!("{body}-+1"),
            format!("{}-1", &body[..25]),
            format!("{body}x-1"),
            format!("pay_{body}-1"),
            format!("{}{{-1", &body[..25]),
            String::new(),
        ] {
            assert_eq!(ChannelOrderId::parse(&bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn channel_order_ids_are_short_safe_distinct_and_parse_back(
            now_ms in 0u64..(1u64 << 44),
            merchant in "[a-z0-9]{1,12}",
            attempt: u8,
            other_attempt: u8,
        ) {
            let tag = ScopeTag::merchant(&MerchantId::parse(&merchant).unwrap());
            let payment = PaymentId::generate(tag, now_ms);
            let id = ChannelOrderId::for_attempt(&payment, attempt);
            prop_assert!(id.as_str().len() <= ChannelOrderId::MAX_CHARS);
            prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
            prop_assert_eq!(ChannelOrderId::for_attempt(&payment, attempt), id.clone());
            let parsed = ChannelOrderId::parse(id.as_str()).unwrap();
            prop_assert_eq!(parsed.payment_id(), payment.clone());
            prop_assert_eq!(parsed.attempt(), attempt);
            if other_attempt != attempt {
                prop_assert_ne!(ChannelOrderId::for_attempt(&payment, other_attempt), id);
            }
        }
    }

    #[test]
    fn create_requests_need_time_left_and_a_sane_description() {
        let order = create_order();
        assert_eq!(check_create(&order, NOW_MS), Ok(()));
        let late = CreateOrder {
            expires_at_ms: NOW_MS + MIN_ORDER_LIFETIME_MS - 1,
            ..order.clone()
        };
        assert!(matches!(
            check_create(&late, NOW_MS),
            Err(ChannelError::InvalidRequest { .. })
        ));
        for description in [String::new(), "a\nb".into(), "x".repeat(128)] {
            let bad = CreateOrder {
                description,
                ..order.clone()
            };
            assert!(check_create(&bad, NOW_MS).is_err());
        }
    }

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn settings_toml(kind_and_keys: &str) -> String {
        format!(
            r#"
{kind_and_keys}
base_url = "http://127.0.0.1:9"
priority = 1
fee_bps = 60
methods = ["alipay_qr"]
currencies = ["CNY"]
min_amount = "0.01"
max_amount = "5000"
connect_timeout_ms = 500
request_timeout_ms = 3000
max_in_flight = 64
"#
        )
    }

    #[tokio::test]
    async fn builds_each_kind_from_settings_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "whsec_test_only_supplier_0123456789\n").unwrap();
        let api_v3 = dir.path().join("apiv3");
        std::fs::write(&api_v3, "TestOnlyApiV3Key0123456789abcdef").unwrap();
        let merchant = fixture("test-only-merchant-rsa2048.pkcs8.pem");
        let platform = fixture("test-only-platform-rsa2048.spki.pem");
        let kinds = [
            format!(
                "kind = \"alipay\"\napp_id = \"2021000000000001\"\n[keys]\nalipay_app_private_key = {{ file = \"{merchant}\" }}\nalipay_public_key = {{ file = \"{platform}\" }}\n[x]"
            ),
            format!(
                "kind = \"wechatpay\"\nmchid = \"1900000109\"\nappid = \"wxd678efh567hg6787\"\nmerchant_serial = \"3775B6A45ACD588826D15E583A95F5DD0FFB9C4E\"\n[keys]\nwechatpay_merchant_private_key = {{ file = \"{merchant}\" }}\nwechatpay_api_v3_key = {{ file = \"{}\" }}\n[keys.wechatpay_platform_public_keys]\n5157F09EFDC096DE15EBE81A47057A7232F1B8E1 = {{ file = \"{platform}\" }}\n[x]",
                api_v3.display()
            ),
            format!(
                "kind = \"supplier\"\n[keys]\nsupplier_secret = {{ file = \"{}\" }}\n[x]",
                secret.display()
            ),
        ];
        for (kinds_toml, expected) in kinds.iter().zip([
            ChannelKind::Alipay,
            ChannelKind::Wechatpay,
            ChannelKind::Supplier,
        ]) {
            // The common fields come after the kind's tables: put them at the top instead.
            let (head, _) = kinds_toml.split_once("[keys]").unwrap();
            let keys = kinds_toml[head.len()..].trim_end_matches("[x]");
            let text = format!("{}\n{keys}", settings_toml(head));
            let settings: ChannelSettings =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            settings.validate().unwrap();
            let channel = build_channel("ch-1", &settings).unwrap();
            assert_eq!(channel.kind(), expected);
            assert_eq!(channel.id(), "ch-1");
            let route = settings.route("ch-1").unwrap();
            assert_eq!(
                (route.min_amount_minor, route.max_amount_minor),
                (1, 500_000)
            );
        }

        let supplier_text = format!(
            "{}\n[keys]\nsupplier_secret = {{ env = \"GATEWAY_TEST_NEVER_SET_SUPPLIER\" }}",
            settings_toml("kind = \"supplier\"")
        );
        let settings: ChannelSettings = toml::from_str(&supplier_text).unwrap();
        let err = build_channel("ch-1", &settings).err().unwrap();
        assert!(err.to_string().contains("keys.supplier_secret"), "{err}");
        assert!(err.to_string().contains("ch-1"), "{err}");
        assert!(build_channel("bad id", &settings).is_err());

        let mut no_secret = settings.clone();
        no_secret.keys.supplier_secret = None;
        assert!(no_secret
            .validate()
            .unwrap_err()
            .contains("keys.supplier_secret"));
        let mut slow_connect = settings.clone();
        slow_connect.connect_timeout_ms = slow_connect.request_timeout_ms;
        assert!(slow_connect
            .validate()
            .unwrap_err()
            .contains("connect_timeout_ms"));
        let mut clear_text = settings.clone();
        clear_text.base_url = "http://supplier.example.com".into();
        assert!(clear_text.validate().unwrap_err().contains("base_url"));
        let mut mixed = settings.clone();
        mixed.currencies = vec!["CNY".into(), "JPY".into()];
        assert!(mixed.validate().unwrap_err().contains("currencies"));
        let mut breaker = settings.clone();
        breaker.breaker.window_calls = 0;
        assert!(breaker.validate().unwrap_err().starts_with("breaker."));
        let unknown_field = format!("{supplier_text}\nsurprise = 1");
        assert!(toml::from_str::<ChannelSettings>(&unknown_field).is_err());
    }
}
