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
mod types;
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
pub(crate) use types::check_create;
pub use types::{
    Action, Callback, CallbackAnswer, CallbackReply, ChannelKind, ChannelOrderId, ChannelRefundId,
    CloseOutcome, CreateOrder, Created, Notice, NoticeEvent, OrderState, RefundOutcome,
    RefundRequest, MAX_DESCRIPTION_CHARS, MIN_ORDER_LIFETIME_MS,
};

use async_trait::async_trait;

/// The signature window of the protocols that have one (WeChat Pay's "5 minutes", the
/// supplier's 300 s): a signed timestamp further than this from `now`, either way, is refused.
pub const SIGNATURE_WINDOW_SECONDS: u64 = 300;

/// `|now - timestamp|` in seconds, without overflow.
pub(crate) fn skew_seconds(timestamp_unix_seconds: u64, now_unix_seconds: u64) -> u64 {
    timestamp_unix_seconds.abs_diff(now_unix_seconds)
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
    bytes[..8].copy_from_slice(&crate::ids::random_u64().to_le_bytes());
    bytes[8..].copy_from_slice(&crate::ids::random_u64().to_le_bytes());
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
    use crate::ids::{MerchantId, PaymentId, ScopeTag};
    use crate::money::{Amount, Currency};
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
    use super::*;

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
