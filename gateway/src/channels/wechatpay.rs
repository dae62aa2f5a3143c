//! WeChat Pay API v3 (DESIGN.md §5): the signature layer.
//!
//! - Requests: base64 RSA-SHA256 with the merchant's key over
//!   `METHOD\nURL\nTIMESTAMP\nNONCE\nBODY\n`, URL being the path plus `?` and the raw query
//!   when there is one, BODY empty for a GET ([`request_message`], [`sign_request`]), sent as
//!   `Authorization: WECHATPAY2-SHA256-RSA2048 mchid="…",nonce_str="…",signature="…",timestamp="…",serial_no="…"`
//!   ([`authorization_header`]).
//! - Replies and callbacks: RSA-SHA256 over `TIMESTAMP\nNONCE\nBODY\n` with the platform key
//!   named by `Wechatpay-Serial`; several are live during a rotation ([`PlatformKeys`]).
//!   [`verify_response`] refuses, each with its own [`WechatPayError`]: another signature
//!   type, WeChat's probe signatures, a timestamp more than 300 s from `now`, an unknown
//!   serial, a bad signature.
//! - Callback resources: AEAD_AES_256_GCM with the 32-byte APIv3 key, the nonce and the
//!   associated data taken as UTF-8 bytes, the tag being the ciphertext's last 16 bytes
//!   ([`decrypt_resource`]; [`encrypt_resource`] for the channel simulator).
//! - The adapter ([`WechatPayChannel`]): native order, query, close, refund, and callbacks
//!   ([`WechatPayChannel::read_callback`]); its reading of replies and callbacks is documented
//!   beside it.

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};

use super::client::{HttpClient, HttpReply};
use super::keys::{RsaPrivateKey, RsaPublicKey};
use super::{
    callback_reply_message, callback_text, check_callback_size, check_create, now_unix_ms,
    random_nonce, rfc3339_shanghai, server_error, skew_seconds, Action, BaseUrl, Callback,
    CallbackAnswer, CallbackRefusal, CallbackReply, Channel, ChannelError, ChannelKind,
    ChannelOrderId, CloseOutcome, CreateOrder, Created, Notice, NoticeEvent, OrderState,
    RefundOutcome, RefundRequest, SIGNATURE_WINDOW_SECONDS,
};
use crate::money::{Amount, Currency};
use crate::secret::Secret;

/// The scheme of the `Authorization` header and the value of `Wechatpay-Signature-Type`.
pub const SIGNATURE_TYPE: &str = "WECHATPAY2-SHA256-RSA2048";

/// WeChat Pay sends probe traffic whose signature starts with this, to check that merchants
/// verify; such a message must be refused.
pub const PROBE_SIGNATURE_PREFIX: &str = "WECHATPAY/SIGNTEST/";

/// The only resource algorithm WeChat Pay v3 uses.
pub const RESOURCE_ALGORITHM: &str = "AEAD_AES_256_GCM";

/// An APIv3 key is 32 bytes (32 ASCII characters set in the merchant platform).
pub const API_V3_KEY_BYTES: usize = 32;

const GCM_TAG_BYTES: usize = 16;

/// Why a reply or callback was refused. No variant carries header text: callers log these,
/// and the headers are the sender's to choose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WechatPayError {
    #[error("Wechatpay-Signature-Type is not {SIGNATURE_TYPE}")]
    UnsupportedSignatureType,
    #[error("a WeChat Pay probe signature (WECHATPAY/SIGNTEST/…)")]
    ProbeSignature,
    #[error("malformed {0} header")]
    MalformedHeader(&'static str),
    #[error(
        "Wechatpay-Timestamp is {skew_seconds} s from now (at most {SIGNATURE_WINDOW_SECONDS})"
    )]
    TimestampOutsideWindow { skew_seconds: u64 },
    #[error("no platform key for this Wechatpay-Serial")]
    UnknownSerial,
    #[error("the signature does not verify")]
    BadSignature,
}

/// Why a callback resource could not be decrypted (or encrypted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("resource algorithm is not {RESOURCE_ALGORITHM}")]
    UnsupportedAlgorithm,
    #[error("resource nonce is not {NONCE_LEN} bytes")]
    BadNonce,
    #[error("resource ciphertext is not base64 of at least {GCM_TAG_BYTES} bytes")]
    MalformedCiphertext,
    /// Wrong key, wrong associated data, or altered ciphertext: GCM cannot tell which.
    #[error("resource authentication failed")]
    AuthenticationFailed,
}

/// The APIv3 key was not 32 bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the WeChat Pay APIv3 key must be {API_V3_KEY_BYTES} bytes")]
pub struct InvalidApiV3Key;

/// The request signing message: `METHOD\nURL\nTIMESTAMP\nNONCE\nBODY\n`.
///
/// `path_and_query` is the request target exactly as sent: the path, plus `?` and the raw
/// (already encoded) query when there is one — `hyper::Uri::path_and_query()` gives it. A
/// query missing here is the classic cause of WeChat's "signature error" on GETs such as
/// `/v3/pay/transactions/out-trade-no/{no}?mchid=…`. `body` is the exact JSON sent, empty
/// for a GET. `method` is upper case.
pub fn request_message(
    method: &str,
    path_and_query: &str,
    timestamp_unix_seconds: u64,
    nonce: &str,
    body: &str,
) -> String {
    debug_assert!(
        path_and_query.starts_with('/'),
        "the URL line is the request target, not a full URL"
    );
    format!("{method}\n{path_and_query}\n{timestamp_unix_seconds}\n{nonce}\n{body}\n")
}

/// The base64 signature of a request (see [`request_message`]) with the merchant's key.
pub fn sign_request(
    key: &RsaPrivateKey,
    method: &str,
    path_and_query: &str,
    timestamp_unix_seconds: u64,
    nonce: &str,
    body: &str,
) -> String {
    let message = request_message(method, path_and_query, timestamp_unix_seconds, nonce, body);
    STANDARD.encode(key.sign_sha256(message.as_bytes()))
}

/// The `Authorization` header value. `serial_no` is the serial of the merchant certificate
/// whose key signed; `signature` is [`sign_request`]'s output for the same nonce and
/// timestamp.
pub fn authorization_header(
    mchid: &str,
    serial_no: &str,
    nonce: &str,
    timestamp_unix_seconds: u64,
    signature: &str,
) -> String {
    format!(
        "{SIGNATURE_TYPE} mchid=\"{mchid}\",nonce_str=\"{nonce}\",signature=\"{signature}\",\
         timestamp=\"{timestamp_unix_seconds}\",serial_no=\"{serial_no}\""
    )
}

/// The reply/callback signing message: `TIMESTAMP\nNONCE\nBODY\n`, from the header texts as
/// received and the exact body.
pub fn response_message(timestamp: &str, nonce: &str, body: &str) -> String {
    format!("{timestamp}\n{nonce}\n{body}\n")
}

/// Signs a reply or callback as WeChat Pay's platform would: for the channel simulator and
/// tests.
pub fn sign_response(
    platform_key: &RsaPrivateKey,
    timestamp_unix_seconds: u64,
    nonce: &str,
    body: &str,
) -> String {
    let message = response_message(&timestamp_unix_seconds.to_string(), nonce, body);
    STANDARD.encode(platform_key.sign_sha256(message.as_bytes()))
}

/// The platform public keys, by certificate serial (`Wechatpay-Serial`). During a rotation
/// WeChat Pay signs with the new key while the old one is still valid, so both are kept and
/// each message names its own. Serials are matched exactly (WeChat sends upper-case hex).
#[derive(Clone, Default)]
pub struct PlatformKeys {
    by_serial: HashMap<String, RsaPublicKey>,
}

impl PlatformKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the key of `serial`; returns the one replaced.
    pub fn insert(&mut self, serial: impl Into<String>, key: RsaPublicKey) -> Option<RsaPublicKey> {
        self.by_serial.insert(serial.into(), key)
    }

    /// Drops the key of a retired serial.
    pub fn remove(&mut self, serial: &str) -> Option<RsaPublicKey> {
        self.by_serial.remove(serial)
    }

    pub fn get(&self, serial: &str) -> Option<&RsaPublicKey> {
        self.by_serial.get(serial)
    }

    pub fn len(&self) -> usize {
        self.by_serial.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_serial.is_empty()
    }
}

impl FromIterator<(String, RsaPublicKey)> for PlatformKeys {
    fn from_iter<I: IntoIterator<Item = (String, RsaPublicKey)>>(iter: I) -> Self {
        Self {
            by_serial: iter.into_iter().collect(),
        }
    }
}

impl fmt::Debug for PlatformKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Serials are public identifiers; the keys print as `***` anyway.
        let mut serials: Vec<&String> = self.by_serial.keys().collect();
        serials.sort();
        f.debug_struct("PlatformKeys")
            .field("serials", &serials)
            .finish()
    }
}

/// The signature headers of a reply or callback, as received.
#[derive(Debug, Clone, Copy)]
pub struct SignatureHeaders<'a> {
    /// `Wechatpay-Timestamp`: unix seconds.
    pub timestamp: &'a str,
    /// `Wechatpay-Nonce`.
    pub nonce: &'a str,
    /// `Wechatpay-Signature`: base64.
    pub signature: &'a str,
    /// `Wechatpay-Serial`: which platform key signed.
    pub serial: &'a str,
    /// `Wechatpay-Signature-Type`, when sent: must be [`SIGNATURE_TYPE`].
    pub signature_type: Option<&'a str>,
}

/// Verifies a reply or callback: signature type, probe signature, the timestamp within 300 s
/// of `now_unix_seconds` (either way), a known serial, then the RSA-SHA256 signature over
/// `TIMESTAMP\nNONCE\nBODY\n` with that serial's key.
pub fn verify_response(
    keys: &PlatformKeys,
    headers: &SignatureHeaders<'_>,
    body: &str,
    now_unix_seconds: u64,
) -> Result<(), WechatPayError> {
    if headers
        .signature_type
        .is_some_and(|kind| kind != SIGNATURE_TYPE)
    {
        return Err(WechatPayError::UnsupportedSignatureType);
    }
    if headers.signature.starts_with(PROBE_SIGNATURE_PREFIX) {
        return Err(WechatPayError::ProbeSignature);
    }
    let timestamp = parse_unix_seconds(headers.timestamp)
        .ok_or(WechatPayError::MalformedHeader("Wechatpay-Timestamp"))?;
    let skew = skew_seconds(timestamp, now_unix_seconds);
    if skew > SIGNATURE_WINDOW_SECONDS {
        return Err(WechatPayError::TimestampOutsideWindow { skew_seconds: skew });
    }
    // A line break in the nonce would let a signed body be re-split between nonce and body.
    if headers.nonce.is_empty() || headers.nonce.contains('\n') {
        return Err(WechatPayError::MalformedHeader("Wechatpay-Nonce"));
    }
    let key = keys
        .get(headers.serial)
        .ok_or(WechatPayError::UnknownSerial)?;
    let signature = STANDARD
        .decode(headers.signature)
        .map_err(|_| WechatPayError::BadSignature)?;
    let message = response_message(headers.timestamp, headers.nonce, body);
    if key.verify_sha256(message.as_bytes(), &signature) {
        Ok(())
    } else {
        Err(WechatPayError::BadSignature)
    }
}

/// Unix seconds as decimal digits only (no sign, no spaces), at most 19 of them.
fn parse_unix_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The merchant's APIv3 key, ready for AES-256-GCM.
pub struct ApiV3Key {
    key: LessSafeKey,
}

impl ApiV3Key {
    /// The key is the secret's UTF-8 bytes, which must be exactly 32.
    pub fn new(secret: &Secret) -> Result<Self, InvalidApiV3Key> {
        let bytes = secret.expose().as_bytes();
        if bytes.len() != API_V3_KEY_BYTES {
            return Err(InvalidApiV3Key);
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| InvalidApiV3Key)?;
        Ok(Self {
            key: LessSafeKey::new(key),
        })
    }
}

impl fmt::Debug for ApiV3Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiV3Key(***)")
    }
}

/// A callback's `resource` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedResource {
    /// Always `AEAD_AES_256_GCM`.
    pub algorithm: String,
    /// base64 of the ciphertext followed by the 16-byte tag.
    pub ciphertext: String,
    /// Authenticated, not encrypted (e.g. `transaction`); may be empty.
    #[serde(default)]
    pub associated_data: String,
    /// 12 characters.
    pub nonce: String,
    /// The plaintext's type (`transaction`, `refund`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_type: Option<String>,
}

/// Decrypts and authenticates a callback resource with the APIv3 key; returns the plaintext
/// (JSON).
pub fn decrypt_resource(
    key: &ApiV3Key,
    resource: &EncryptedResource,
) -> Result<Vec<u8>, ResourceError> {
    if resource.algorithm != RESOURCE_ALGORITHM {
        return Err(ResourceError::UnsupportedAlgorithm);
    }
    let nonce = Nonce::try_assume_unique_for_key(resource.nonce.as_bytes())
        .map_err(|_| ResourceError::BadNonce)?;
    let mut in_out = STANDARD
        .decode(&resource.ciphertext)
        .map_err(|_| ResourceError::MalformedCiphertext)?;
    if in_out.len() < GCM_TAG_BYTES {
        return Err(ResourceError::MalformedCiphertext);
    }
    let aad = Aad::from(resource.associated_data.as_bytes());
    let plaintext_len = key
        .key
        .open_in_place(nonce, aad, &mut in_out)
        .map_err(|_| ResourceError::AuthenticationFailed)?
        .len();
    in_out.truncate(plaintext_len);
    Ok(in_out)
}

/// Encrypts a resource as WeChat Pay does, for the channel simulator and tests. `nonce` must
/// be 12 bytes and never reused with the same key (GCM loses both secrecy and integrity on
/// reuse): draw it at random for every resource.
pub fn encrypt_resource(
    key: &ApiV3Key,
    nonce: &str,
    associated_data: &str,
    plaintext: &[u8],
) -> Result<EncryptedResource, ResourceError> {
    let gcm_nonce =
        Nonce::try_assume_unique_for_key(nonce.as_bytes()).map_err(|_| ResourceError::BadNonce)?;
    let mut in_out = plaintext.to_vec();
    key.key
        .seal_in_place_append_tag(
            gcm_nonce,
            Aad::from(associated_data.as_bytes()),
            &mut in_out,
        )
        // Fails only past GCM's length limit (64 GiB), far beyond any callback.
        .map_err(|_| ResourceError::MalformedCiphertext)?;
    Ok(EncryptedResource {
        algorithm: RESOURCE_ALGORITHM.to_owned(),
        ciphertext: STANDARD.encode(&in_out),
        associated_data: associated_data.to_owned(),
        nonce: nonce.to_owned(),
        original_type: None,
    })
}

// ---------------------------------------------------------------------------------------------
// The adapter: native order, query, close, refund (DESIGN.md §5).
//
// Requests are signed over the request target exactly as sent (the path with the base URL's
// prefix, plus `?` and the raw query), so a GET's `?mchid=…` is signed. Every reply but a 5xx
// must verify with the platform key its `Wechatpay-Serial` names (5-minute window, probe
// signatures refused): an unverifiable reply is an unknown outcome, never a success nor a
// decline. Replies must name our `mchid`, `appid` and order. Errors are 4xx
// `{"code": "…", "message": "…"}`: 404 (`ORDER_NOT_EXIST`, `RESOURCE_NOT_EXISTS`) on a query
// is "no such order"; 429 `FREQUENCY_LIMITED` is throttling; `SYSTEM_ERROR` is a server error;
// on a create, `OUT_TRADE_NO_USED`/`ORDERPAID`/`ORDER_CLOSED` say the order id already exists
// (maybe from our own earlier try): unknown outcome; any other 4xx is a decline.
//
// Close answers 204 without saying what the order was; so a close is always followed by a
// query, whose verified state gives the [`CloseOutcome`] (one extra round trip, on a path that
// runs only for unknown outcomes).
// ---------------------------------------------------------------------------------------------

/// The WeChat Pay adapter of one configured channel (merchant `mchid`, app `appid`).
#[derive(Debug)]
pub struct WechatPayChannel {
    id: String,
    mchid: String,
    appid: String,
    merchant_serial: String,
    base: BaseUrl,
    merchant_key: RsaPrivateKey,
    platform_keys: PlatformKeys,
    /// Decrypts callback resources; `None` until [`WechatPayChannel::with_api_v3_key`], and
    /// then every callback is refused (fail closed).
    api_v3_key: Option<ApiV3Key>,
    http: HttpClient,
}

/// The identifiers of a WeChat Pay merchant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WechatPayIds {
    pub mchid: String,
    pub appid: String,
    /// The serial of the merchant certificate whose key signs our requests.
    pub merchant_serial: String,
}

#[derive(Serialize)]
struct NativeOrderBody<'a> {
    appid: &'a str,
    mchid: &'a str,
    description: &'a str,
    out_trade_no: &'a str,
    time_expire: String,
    notify_url: &'a str,
    amount: OrderAmount,
}

#[derive(Serialize)]
struct OrderAmount {
    total: i64,
    currency: &'static str,
}

#[derive(Serialize)]
struct CloseBody<'a> {
    mchid: &'a str,
}

#[derive(Serialize)]
struct RefundBody<'a> {
    out_trade_no: &'a str,
    out_refund_no: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notify_url: Option<&'a str>,
    amount: RefundAmount,
}

#[derive(Serialize)]
struct RefundAmount {
    refund: i64,
    total: i64,
    currency: &'static str,
}

#[derive(Deserialize)]
struct NativeReply {
    code_url: String,
}

#[derive(Deserialize)]
struct TransactionReply {
    appid: String,
    mchid: String,
    out_trade_no: String,
    #[serde(default)]
    transaction_id: Option<String>,
    trade_state: String,
    #[serde(default)]
    amount: Option<TransactionAmount>,
}

#[derive(Deserialize)]
struct TransactionAmount {
    total: i64,
    #[serde(default)]
    currency: Option<String>,
}

#[derive(Deserialize)]
struct RefundReply {
    #[serde(default)]
    refund_id: Option<String>,
    out_refund_no: String,
    status: String,
}

#[derive(Deserialize, Default)]
struct ErrorReply {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Codes of a 4xx create answer meaning "this order id already exists" (perhaps ours).
const ORDER_EXISTS_CODES: [&str; 3] = ["OUT_TRADE_NO_USED", "ORDERPAID", "ORDER_CLOSED"];

impl WechatPayChannel {
    pub fn new(
        id: impl Into<String>,
        ids: WechatPayIds,
        base: BaseUrl,
        merchant_key: RsaPrivateKey,
        platform_keys: PlatformKeys,
        http: HttpClient,
    ) -> Self {
        Self {
            id: id.into(),
            mchid: ids.mchid,
            appid: ids.appid,
            merchant_serial: ids.merchant_serial,
            base,
            merchant_key,
            platform_keys,
            api_v3_key: None,
            http,
        }
    }

    /// The APIv3 key that decrypts callback resources. Without it the adapter still makes
    /// calls, but refuses every callback (it cannot authenticate their content).
    pub fn with_api_v3_key(mut self, key: ApiV3Key) -> Self {
        self.api_v3_key = Some(key);
        self
    }

    /// A request signed at `now_unix_seconds` with `nonce` over the target as sent.
    fn signed(
        &self,
        method: Method,
        path_and_query: &str,
        body: String,
        now_unix_seconds: u64,
        nonce: &str,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        let uri = self.base.join(path_and_query)?;
        let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let signature = sign_request(
            &self.merchant_key,
            method.as_str(),
            target,
            now_unix_seconds,
            nonce,
            &body,
        );
        let authorization = authorization_header(
            &self.mchid,
            &self.merchant_serial,
            nonce,
            now_unix_seconds,
            &signature,
        );
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, authorization)
            .header(ACCEPT, "application/json");
        if !body.is_empty() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ChannelError::invalid(e.to_string()))
    }

    /// `POST /v3/pay/transactions/native`.
    pub fn create_request(
        &self,
        req: &CreateOrder,
        now_ms: u64,
        nonce: &str,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        check_create(req, now_ms)?;
        let body = serde_json::to_string(&NativeOrderBody {
            appid: &self.appid,
            mchid: &self.mchid,
            description: &req.description,
            out_trade_no: req.order_id.as_str(),
            time_expire: rfc3339_shanghai(req.expires_at_ms / 1000),
            notify_url: &req.notify_url,
            amount: OrderAmount {
                total: req.amount.minor(),
                currency: req.currency.code(),
            },
        })
        .map_err(|e| ChannelError::invalid(e.to_string()))?;
        self.signed(
            Method::POST,
            "/v3/pay/transactions/native",
            body,
            now_ms / 1000,
            nonce,
        )
    }

    /// `GET /v3/pay/transactions/out-trade-no/{no}?mchid=…`.
    pub fn query_request(
        &self,
        order: &ChannelOrderId,
        now_ms: u64,
        nonce: &str,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        // Both parts are `[0-9A-Za-z_-]`/digits (checked at build): nothing to percent-encode.
        let target = format!(
            "/v3/pay/transactions/out-trade-no/{order}?mchid={}",
            self.mchid
        );
        self.signed(Method::GET, &target, String::new(), now_ms / 1000, nonce)
    }

    /// `POST /v3/pay/transactions/out-trade-no/{no}/close` with `{"mchid": …}`.
    pub fn close_request(
        &self,
        order: &ChannelOrderId,
        now_ms: u64,
        nonce: &str,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        let body = serde_json::to_string(&CloseBody { mchid: &self.mchid })
            .map_err(|e| ChannelError::invalid(e.to_string()))?;
        let target = format!("/v3/pay/transactions/out-trade-no/{order}/close");
        self.signed(Method::POST, &target, body, now_ms / 1000, nonce)
    }

    /// `POST /v3/refund/domestic/refunds`.
    pub fn refund_request(
        &self,
        req: &RefundRequest,
        now_ms: u64,
        nonce: &str,
    ) -> Result<Request<Full<Bytes>>, ChannelError> {
        let body = serde_json::to_string(&RefundBody {
            out_trade_no: req.order_id.as_str(),
            out_refund_no: req.refund_id.as_str(),
            reason: req.reason.as_deref(),
            notify_url: req.notify_url.as_deref(),
            amount: RefundAmount {
                refund: req.amount.minor(),
                total: req.order_total.minor(),
                currency: req.currency.code(),
            },
        })
        .map_err(|e| ChannelError::invalid(e.to_string()))?;
        self.signed(
            Method::POST,
            "/v3/refund/domestic/refunds",
            body,
            now_ms / 1000,
            nonce,
        )
    }

    /// The verified body of a reply that is not a 5xx.
    fn verified<'a>(&self, reply: &'a HttpReply, now_ms: u64) -> Result<&'a str, ChannelError> {
        if let Some(error) = server_error(reply.status) {
            return Err(error);
        }
        let header = |name: &'static str| {
            reply
                .header(name)
                .ok_or_else(|| ChannelError::unverifiable(format!("no {name}")))
        };
        let headers = SignatureHeaders {
            timestamp: header("Wechatpay-Timestamp")?,
            nonce: header("Wechatpay-Nonce")?,
            signature: header("Wechatpay-Signature")?,
            serial: header("Wechatpay-Serial")?,
            signature_type: reply.header("Wechatpay-Signature-Type"),
        };
        let body = reply.text()?;
        verify_response(&self.platform_keys, &headers, body, now_ms / 1000)
            .map_err(|e| ChannelError::unverifiable(e.to_string()))?;
        Ok(body)
    }

    fn error_reply(body: &str) -> ErrorReply {
        serde_json::from_str(body).unwrap_or_default()
    }

    /// The error of a verified 4xx reply.
    fn client_error(status: StatusCode, error: &ErrorReply) -> ChannelError {
        if status == StatusCode::TOO_MANY_REQUESTS || error.code == "FREQUENCY_LIMITED" {
            return ChannelError::Throttled {
                code: "FREQUENCY_LIMITED".into(),
            };
        }
        if error.code == "SYSTEM_ERROR" {
            return ChannelError::ServerError {
                status: status.as_u16(),
                code: error.code.clone(),
            };
        }
        let code = if error.code.is_empty() {
            format!("http_{}", status.as_u16())
        } else {
            error.code.clone()
        };
        ChannelError::declined(&code, &error.message)
    }

    pub fn parse_create(&self, reply: &HttpReply, now_ms: u64) -> Result<Created, ChannelError> {
        let body = self.verified(reply, now_ms)?;
        if !reply.status.is_success() {
            let error = Self::error_reply(body);
            if ORDER_EXISTS_CODES.contains(&error.code.as_str()) {
                return Err(ChannelError::UnexpectedReply {
                    reason: format!("{}: the order id already exists", error.code),
                });
            }
            return Err(Self::client_error(reply.status, &error));
        }
        let parsed: NativeReply = serde_json::from_str(body)
            .map_err(|_| ChannelError::unverifiable("the native order reply does not parse"))?;
        Ok(Created {
            action: Action::QrCode(parsed.code_url),
            channel_txn_id: None,
        })
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
            let error = Self::error_reply(body);
            if error.code == "ORDER_NOT_EXIST" || error.code == "RESOURCE_NOT_EXISTS" {
                return Ok(OrderState::NotFound);
            }
            return Err(Self::client_error(reply.status, &error));
        }
        let parsed: TransactionReply = serde_json::from_str(body)
            .map_err(|_| ChannelError::unverifiable("the transaction reply does not parse"))?;
        if parsed.mchid != self.mchid || parsed.appid != self.appid {
            return Err(ChannelError::unverifiable(
                "the reply is for another merchant",
            ));
        }
        if parsed.out_trade_no != order.as_str() {
            return Err(ChannelError::unverifiable("the reply is for another order"));
        }
        let paid = |refunded: bool| -> Result<OrderState, ChannelError> {
            let amount = parsed
                .amount
                .as_ref()
                .ok_or_else(|| ChannelError::unverifiable("a paid order without amount"))?;
            let currency = Currency::parse(amount.currency.as_deref().unwrap_or("CNY"))
                .map_err(|_| ChannelError::unverifiable("unknown currency"))?;
            let channel_txn_id = parsed.transaction_id.clone().unwrap_or_default();
            let amount_minor = amount.total;
            Ok(if refunded {
                OrderState::Refunded {
                    channel_txn_id,
                    amount_minor,
                    currency,
                }
            } else {
                OrderState::Paid {
                    channel_txn_id,
                    amount_minor,
                    currency,
                }
            })
        };
        match parsed.trade_state.as_str() {
            "NOTPAY" | "USERPAYING" => Ok(OrderState::Pending),
            "SUCCESS" => paid(false),
            "REFUND" => paid(true),
            "CLOSED" | "REVOKED" => Ok(OrderState::Closed),
            "PAYERROR" => Ok(OrderState::Failed),
            _ => Err(ChannelError::UnexpectedReply {
                reason: "unknown trade_state".into(),
            }),
        }
    }

    /// The close reply: `Ok(true)` when a query must tell the outcome (a 204, or a verified
    /// refusal that may mean "already paid/closed"), `Ok(false)` when the order does not exist.
    pub fn parse_close(&self, reply: &HttpReply, now_ms: u64) -> Result<bool, ChannelError> {
        let body = self.verified(reply, now_ms)?;
        if reply.status.is_success() {
            return Ok(true);
        }
        let error = Self::error_reply(body);
        if reply.status == StatusCode::NOT_FOUND || error.code == "ORDER_NOT_EXIST" {
            return Ok(false);
        }
        match Self::client_error(reply.status, &error) {
            // A refusal such as "already paid" or "already closed": the query says which.
            ChannelError::Declined { .. } => Ok(true),
            other => Err(other),
        }
    }

    pub fn parse_refund(
        &self,
        req: &RefundRequest,
        reply: &HttpReply,
        now_ms: u64,
    ) -> Result<RefundOutcome, ChannelError> {
        let body = self.verified(reply, now_ms)?;
        if !reply.status.is_success() {
            return Err(Self::client_error(reply.status, &Self::error_reply(body)));
        }
        let parsed: RefundReply = serde_json::from_str(body)
            .map_err(|_| ChannelError::unverifiable("the refund reply does not parse"))?;
        if parsed.out_refund_no != req.refund_id.as_str() {
            return Err(ChannelError::unverifiable(
                "the reply is for another refund",
            ));
        }
        let channel_refund_id = parsed.refund_id;
        match parsed.status.as_str() {
            "SUCCESS" => Ok(RefundOutcome::Succeeded { channel_refund_id }),
            "PROCESSING" => Ok(RefundOutcome::Pending { channel_refund_id }),
            "CLOSED" | "ABNORMAL" => Ok(RefundOutcome::Failed {
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
// A callback is a JSON POST signed like a reply. Read in this order, each step refusing with
// its own [`CallbackRefusal`]:
//
// 1. at most [`MAX_CALLBACK_BODY_BYTES`], UTF-8 (`Malformed`);
// 2. the signature headers: a missing `Wechatpay-Timestamp`, `-Nonce`, `-Signature` or
//    `-Serial` is `BadSignature` (an unsigned message is an unauthenticated one, and is
//    counted with the forgeries); a repeated or non-ASCII one, like a malformed timestamp or
//    nonce, is `Malformed`;
// 3. [`verify_response`] at `now`: a probe signature or a timestamp more than 5 minutes off is
//    `Stale`; another signature type, an unknown serial or a bad signature is `BadSignature`;
// 4. the envelope `{id, event_type, resource_type, resource}` (`Malformed` if it does not
//    parse or `resource_type` is not `encrypt-resource`);
// 5. the resource decrypted with the APIv3 key: any failure is `BadSignature` (GCM
//    authenticates: a resource that does not open was not made with our key);
// 6. by `event_type`: `TRANSACTION.SUCCESS` carries a transaction whose `mchid` and `appid`
//    must be ours (`WrongAccount`): `trade_state` `SUCCESS` is `Paid` (integer `amount.total`
//    in minor units, `amount.currency`, `transaction_id`, all required), another state is
//    `Other(state)`. `REFUND.SUCCESS`/`REFUND.ABNORMAL`/`REFUND.CLOSED` carry a refund whose
//    `mchid` must be ours: `Refund` of `amount.refund` under `out_refund_no`, succeeded only
//    for `REFUND.SUCCESS` (whose `refund_status`, when present, must agree). Any other event
//    is `Other(event_type)`, its resource still decrypted for its `out_trade_no` (and its
//    `mchid`, when it has one, checked).
//    `out_trade_no` must be one of our channel order ids, ids and states at most
//    [`MAX_CALLBACK_TEXT_BYTES`] of visible ASCII, amounts positive (`Malformed`).
//
// The answer: 204 without a body acknowledges; a refusal is 400 and "try later" 500, both
// `{"code": "FAIL", "message": "…"}` (WeChat Pay retries either).
// ---------------------------------------------------------------------------------------------

/// The `event_type` of a payment.
pub const EVENT_TRANSACTION_SUCCESS: &str = "TRANSACTION.SUCCESS";

/// The `event_type` of a refund that went through; `REFUND.ABNORMAL` and `REFUND.CLOSED` are
/// refunds that did not.
pub const EVENT_REFUND_SUCCESS: &str = "REFUND.SUCCESS";

const REFUND_EVENTS: [&str; 3] = [EVENT_REFUND_SUCCESS, "REFUND.ABNORMAL", "REFUND.CLOSED"];

/// The envelope of a callback: only what is read (other fields, such as `summary`, are
/// ignored).
#[derive(Deserialize)]
struct CallbackEnvelope {
    #[serde(default)]
    id: Option<String>,
    event_type: String,
    #[serde(default)]
    resource_type: Option<String>,
    resource: EncryptedResource,
}

/// The decrypted resource of a `REFUND.*` event.
#[derive(Deserialize)]
struct RefundResource {
    mchid: String,
    out_trade_no: String,
    #[serde(default)]
    out_refund_no: Option<String>,
    #[serde(default)]
    refund_status: Option<String>,
    amount: RefundResourceAmount,
}

#[derive(Deserialize)]
struct RefundResourceAmount {
    refund: i64,
}

/// The decrypted resource of an event the gateway does not act on: which order it is about.
#[derive(Deserialize)]
struct OtherResource {
    #[serde(default)]
    mchid: Option<String>,
    out_trade_no: String,
}

fn malformed(reason: impl Into<String>) -> CallbackRefusal {
    CallbackRefusal::Malformed(reason.into())
}

fn callback_order_id(out_trade_no: &str) -> Result<ChannelOrderId, CallbackRefusal> {
    ChannelOrderId::parse(out_trade_no)
        .ok_or_else(|| malformed("`out_trade_no` is not a channel order id of ours"))
}

/// A positive amount in minor units (WeChat Pay's integer fen).
fn callback_amount(name: &str, minor: i64) -> Result<i64, CallbackRefusal> {
    Amount::from_minor(minor)
        .map(Amount::minor)
        .map_err(|e| malformed(format!("`{name}` {e}")))
}

/// The one value of header `name`: `None` when absent; repeated or not visible ASCII is
/// malformed.
fn single_header<'a>(
    headers: &'a hyper::HeaderMap,
    name: &'static str,
) -> Result<Option<&'a str>, CallbackRefusal> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(malformed(format!("{name} appears more than once")));
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| malformed(format!("{name} is not visible ASCII")))
}

impl WechatPayChannel {
    /// Verifies and reads a callback at `now_ms`: see the steps above.
    pub fn read_callback(
        &self,
        callback: &Callback<'_>,
        now_ms: u64,
    ) -> Result<Notice, CallbackRefusal> {
        check_callback_size(callback.body)?;
        let body =
            std::str::from_utf8(callback.body).map_err(|_| malformed("the body is not UTF-8"))?;
        let required = |name: &'static str| {
            single_header(callback.headers, name)?
                .ok_or_else(|| CallbackRefusal::BadSignature(format!("no {name}")))
        };
        let headers = SignatureHeaders {
            timestamp: required("Wechatpay-Timestamp")?,
            nonce: required("Wechatpay-Nonce")?,
            signature: required("Wechatpay-Signature")?,
            serial: required("Wechatpay-Serial")?,
            signature_type: single_header(callback.headers, "Wechatpay-Signature-Type")?,
        };
        verify_response(&self.platform_keys, &headers, body, now_ms / 1000).map_err(
            |e| match e {
                WechatPayError::ProbeSignature | WechatPayError::TimestampOutsideWindow { .. } => {
                    CallbackRefusal::Stale(e.to_string())
                }
                WechatPayError::MalformedHeader(_) => CallbackRefusal::Malformed(e.to_string()),
                WechatPayError::UnsupportedSignatureType
                | WechatPayError::UnknownSerial
                | WechatPayError::BadSignature => CallbackRefusal::BadSignature(e.to_string()),
            },
        )?;
        let envelope: CallbackEnvelope = serde_json::from_str(body)
            .map_err(|_| malformed("the body is not a callback envelope"))?;
        if envelope
            .resource_type
            .as_deref()
            .is_some_and(|kind| kind != "encrypt-resource")
        {
            return Err(malformed("`resource_type` is not encrypt-resource"));
        }
        let notice_id = envelope
            .id
            .as_deref()
            .map(|id| callback_text("id", id))
            .transpose()?;
        let event_type = callback_text("event_type", &envelope.event_type)?;
        let key = self.api_v3_key.as_ref().ok_or_else(|| {
            CallbackRefusal::BadSignature(
                "no APIv3 key configured: the resource cannot be authenticated".into(),
            )
        })?;
        let plaintext = decrypt_resource(key, &envelope.resource)
            .map_err(|e| CallbackRefusal::BadSignature(e.to_string()))?;
        let (order_id, event) = if event_type == EVENT_TRANSACTION_SUCCESS {
            self.transaction_event(&plaintext)?
        } else if REFUND_EVENTS.contains(&event_type.as_str()) {
            self.refund_event(&event_type, &plaintext)?
        } else {
            let other: OtherResource = serde_json::from_slice(&plaintext)
                .map_err(|_| malformed("the resource has no `out_trade_no`"))?;
            if other.mchid.as_deref().is_some_and(|id| id != self.mchid) {
                return Err(CallbackRefusal::WrongAccount(
                    "`mchid` is not this channel's".into(),
                ));
            }
            (
                callback_order_id(&other.out_trade_no)?,
                NoticeEvent::Other(event_type),
            )
        };
        Ok(Notice {
            order_id,
            notice_id,
            event,
        })
    }

    /// A decrypted `TRANSACTION.SUCCESS` resource.
    fn transaction_event(
        &self,
        plaintext: &[u8],
    ) -> Result<(ChannelOrderId, NoticeEvent), CallbackRefusal> {
        let transaction: TransactionReply = serde_json::from_slice(plaintext)
            .map_err(|_| malformed("the resource is not a transaction"))?;
        if transaction.mchid != self.mchid || transaction.appid != self.appid {
            return Err(CallbackRefusal::WrongAccount(
                "`mchid` or `appid` is not this channel's".into(),
            ));
        }
        let order_id = callback_order_id(&transaction.out_trade_no)?;
        let state = callback_text("trade_state", &transaction.trade_state)?;
        if state != "SUCCESS" {
            return Ok((order_id, NoticeEvent::Other(state)));
        }
        let amount = transaction
            .amount
            .as_ref()
            .ok_or_else(|| malformed("a paid transaction without `amount`"))?;
        let currency = amount
            .currency
            .as_deref()
            .ok_or_else(|| malformed("a paid transaction without `amount.currency`"))
            .and_then(|code| {
                Currency::parse(code).map_err(|e| malformed(format!("`amount.currency` {e}")))
            })?;
        let channel_txn_id = transaction
            .transaction_id
            .as_deref()
            .ok_or_else(|| malformed("a paid transaction without `transaction_id`"))
            .and_then(|id| callback_text("transaction_id", id))?;
        Ok((
            order_id,
            NoticeEvent::Paid {
                channel_txn_id,
                amount_minor: callback_amount("amount.total", amount.total)?,
                currency,
            },
        ))
    }

    /// A decrypted `REFUND.*` resource.
    fn refund_event(
        &self,
        event_type: &str,
        plaintext: &[u8],
    ) -> Result<(ChannelOrderId, NoticeEvent), CallbackRefusal> {
        let refund: RefundResource = serde_json::from_slice(plaintext)
            .map_err(|_| malformed("the resource is not a refund"))?;
        if refund.mchid != self.mchid {
            return Err(CallbackRefusal::WrongAccount(
                "`mchid` is not this channel's".into(),
            ));
        }
        let order_id = callback_order_id(&refund.out_trade_no)?;
        let succeeded = event_type == EVENT_REFUND_SUCCESS;
        // The event and the status say the same thing in a genuine notice; if they disagree,
        // neither is believed.
        if let Some(status) = refund.refund_status.as_deref() {
            if (status == "SUCCESS") != succeeded {
                return Err(malformed("`refund_status` contradicts `event_type`"));
            }
        }
        let refund_id = refund
            .out_refund_no
            .as_deref()
            .map(|id| callback_text("out_refund_no", id))
            .transpose()?;
        Ok((
            order_id,
            NoticeEvent::Refund {
                refund_id,
                amount_minor: callback_amount("amount.refund", refund.amount.refund)?,
                succeeded,
            },
        ))
    }
}

#[async_trait]
impl Channel for WechatPayChannel {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> ChannelKind {
        ChannelKind::Wechatpay
    }

    async fn create_order(&self, req: &CreateOrder) -> Result<Created, ChannelError> {
        let request = self.create_request(req, now_unix_ms(), &random_nonce())?;
        let reply = self.http.send(request).await?;
        self.parse_create(&reply, now_unix_ms())
    }

    async fn query(&self, order: &ChannelOrderId) -> Result<OrderState, ChannelError> {
        let request = self.query_request(order, now_unix_ms(), &random_nonce())?;
        let reply = self.http.send(request).await?;
        self.parse_query(order, &reply, now_unix_ms())
    }

    async fn close(&self, order: &ChannelOrderId) -> Result<CloseOutcome, ChannelError> {
        let request = self.close_request(order, now_unix_ms(), &random_nonce())?;
        let reply = self.http.send(request).await?;
        if !self.parse_close(&reply, now_unix_ms())? {
            return Ok(CloseOutcome::NotFound);
        }
        self.query(order)
            .await?
            .after_close()
            .ok_or_else(|| ChannelError::UnexpectedReply {
                reason: "the order is still payable after the close".into(),
            })
    }

    async fn refund(&self, req: &RefundRequest) -> Result<RefundOutcome, ChannelError> {
        let request = self.refund_request(req, now_unix_ms(), &random_nonce())?;
        let reply = self.http.send(request).await?;
        self.parse_refund(req, &reply, now_unix_ms())
    }

    fn verify_callback(
        &self,
        callback: &Callback<'_>,
        now_ms: u64,
    ) -> Result<Notice, CallbackRefusal> {
        self.read_callback(callback, now_ms)
    }

    /// 204 acknowledges; a failure is 400 (refused) or 500 (try later) with
    /// `{"code": "FAIL", "message": …}`, the message reduced to short printable ASCII.
    fn callback_reply(&self, answer: CallbackAnswer, message: &str) -> CallbackReply {
        let (status, default) = match answer {
            CallbackAnswer::Ack => {
                return CallbackReply {
                    status: 204,
                    content_type: "application/json",
                    body: String::new(),
                }
            }
            CallbackAnswer::Refused => (400, "refused"),
            CallbackAnswer::RetryLater => (500, "try again later"),
        };
        let body = serde_json::json!({
            "code": "FAIL",
            "message": callback_reply_message(message, default),
        });
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
    use crate::channels::test_keys::*;
    use proptest::prelude::*;

    // Independent vectors: printed by scripts/gen-signature-vectors.sh (`openssl dgst -sha256
    // -sign` over the lines built by `printf '%s\n'`; AES-GCM by python's `cryptography`).
    const MCHID: &str = "1900000109";
    const MERCHANT_SERIAL: &str = "3775B6A45ACD588826D15E583A95F5DD0FFB9C4E";
    const GET_TARGET: &str = "/v3/pay/transactions/out-trade-no/att_01HX7Z3K9Q2W?mchid=1900000109";
    const GET_NONCE: &str = "593BEC0C930BF1AFEB40B4A08C8FB242";
    const GET_SIGNATURE: &str = "AOlYzSGrrRqphV+BaVFG5nw1FNkyng5kRnYpxpbFgfiwe8zXvuVLebRd/zmdpYux4hvFj9PLjQMkEVq8/uU88F79arVy5m0RwLhpL8h7V7QhFPwTvHPmkjnM5HG0haWDduxn95eeImkTUz01CEU8lkE9tWxlZtcd5WAl8+Df+DYf6iPMrYgD5gbia7GCrxJcar5qZIc1xJ97wSYxGbnTx7ES0vtUQNq87QM7pvhjgqT4rPFoCfePKI//3j4H7NwL+AArxfeu7D3BsUmymmi03Hyo+7XHZLbv9Gha5zKcaAbeZNaTmLZRrEoPIicxwYNLhuEWRNouhzkZ3zV74UjNsw==";
    const ORDER_BODY: &str = r#"{"appid":"wxd678efh567hg6787","mchid":"1900000109","description":"Top-up","out_trade_no":"att_01HX7Z3K9Q2W","time_expire":"2024-05-01T20:15:00+08:00","notify_url":"https://gateway.example.com/v1/callbacks/wechatpay/wx-main","amount":{"total":8888,"currency":"CNY"}}"#;
    const POST_NONCE: &str = "C0FFEE0123456789ABCDEF0123456789";
    const POST_SIGNATURE: &str = "X0pt8khQuFsMFmu3+TG1NqMq7yygK7Fa/QX7dNyj6SvDs28xli+w2vU/XykpTc9iq9lMc/YPKiQShVdK5DAGLamud1yG7obbJkR4ahAdRASPUCsw9qjKRn4PwZ/6S5YbtSfEC6jefPbKaMmx+LduLFarBye9ie1cCpMhtGqassUm5QHNDBled8OXGySZx0VSdzabbNv8raRj980wz2Etm3pdWPPFEIKXvev6dgqeJz8pEXPwgdEit5XWdY4WkH01rnXPX0amEocBzTSbGWDUtM5uEF48RUFUXmQ8mxvfsGvW9fBxQtygG9+k3gv6zC97gyAtrl8aM2dsaop1UmhqCw==";
    const TIMESTAMP: u64 = 1714564800;
    const REPLY_TIMESTAMP: &str = "1714564801";
    const REPLY_NONCE: &str = "fdasfjihihihlkja484w";
    const REPLY_BODY: &str = r#"{"code_url":"weixin://wxpay/bizpayurl?pr=aIQrOYOzz"}"#;
    const REPLY_SIGNATURE: &str = "Jeodu1E/vHOwvWqs1Cfn55ZEGX6kWcRZetPStl6IGmCMXJYkhNFmbTkXq1I0ZWgyQrOvGZCLzUzVWycwyP8JaMbt5+Fzetqziilc3RElmxSIttU5gM4qFHL23u8shHJOzXHtM3j997OIBmuHxwu4nzAA6laQHIn1b3NoFkoHjPcQeXY4XZM0eDcWk72EcOHNQAnOiy7iVn9vlm2TIK8I7qpuoYv+0wvt4YLxRQuumQaGMNIhEIL3UQiHuqqjwN0zMMWKaT7IYsCVG52BLk5N02+YaexVdZmTvCnSUa+DuGC62yyha/KyjlOpIUAZxzY9yi75dcic+ix+WLeOAW0VLg==";
    const PLATFORM_SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";
    const OLD_PLATFORM_SERIAL: &str = "444F4864EA9B34415E5D3E4A2D1B0C3C4E9A6F21";
    const API_V3_KEY: &str = "TestOnlyApiV3Key0123456789abcdef";
    const RESOURCE_NONCE: &str = "fdasflkja484";
    const RESOURCE_PLAINTEXT: &str = r#"{"mchid":"1900000109","appid":"wxd678efh567hg6787","out_trade_no":"att_01HX7Z3K9Q2W","transaction_id":"4200000000202405010000000001","trade_state":"SUCCESS","amount":{"total":8888,"currency":"CNY","payer_total":8888,"payer_currency":"CNY"}}"#;
    const RESOURCE_CIPHERTEXT: &str = "nD4EKhVPEEaI2FOGr3qU0PRiXJ2cIC9aobLiQD2t0jzOl6MJZlol0DsGHrndtER/g6WpIkoavhob4JUU3DIDYWC250ppMgfNd1yHbYa6wirlcKWnWFyGZdMIG9vbrKSE5sNtz0Zl9l14zGh/xTXdm/KapGiGdMDcRIcWTKlCENB2CADlyW0dHWRJeFb3nHtVJzUZIm2yTjamlIsxhZ5mOA4MxQ862wNTUW60BEBb69OrwWQJ3WsH7RpFfMt1L1IkGXbKGyanukyN95kSwVd9Aw5Jx6dlDggt/8aKQLlIz7JE44azsuqPCkfwi7Vq6SsVrfC78wQOU9LhHo/+ybQhZg==";

    /// The current platform key, plus the merchant's key standing in for a previous platform
    /// key still live during a rotation.
    fn platform_keys() -> PlatformKeys {
        [
            (PLATFORM_SERIAL.to_owned(), platform_public()),
            (OLD_PLATFORM_SERIAL.to_owned(), merchant_public()),
        ]
        .into_iter()
        .collect()
    }

    fn reply_headers(signature: &str) -> SignatureHeaders<'_> {
        SignatureHeaders {
            timestamp: REPLY_TIMESTAMP,
            nonce: REPLY_NONCE,
            signature,
            serial: PLATFORM_SERIAL,
            signature_type: Some(SIGNATURE_TYPE),
        }
    }

    fn api_v3_key() -> ApiV3Key {
        ApiV3Key::new(&Secret::new(API_V3_KEY)).unwrap()
    }

    fn vector_resource() -> EncryptedResource {
        serde_json::from_str(&format!(
            r#"{{"original_type":"transaction","algorithm":"AEAD_AES_256_GCM","ciphertext":"{RESOURCE_CIPHERTEXT}","associated_data":"transaction","nonce":"{RESOURCE_NONCE}"}}"#
        ))
        .unwrap()
    }

    #[test]
    fn get_request_signs_the_query_too() {
        assert_eq!(
            request_message("GET", GET_TARGET, TIMESTAMP, GET_NONCE, ""),
            "GET\n/v3/pay/transactions/out-trade-no/att_01HX7Z3K9Q2W?mchid=1900000109\n\
             1714564800\n593BEC0C930BF1AFEB40B4A08C8FB242\n\n"
        );
        let signature = sign_request(&merchant(), "GET", GET_TARGET, TIMESTAMP, GET_NONCE, "");
        assert_eq!(signature, GET_SIGNATURE);
        // Leaving the query out gives another signature: the bug this test exists for.
        let path_only = GET_TARGET.split('?').next().unwrap();
        assert_ne!(
            sign_request(&merchant(), "GET", path_only, TIMESTAMP, GET_NONCE, ""),
            GET_SIGNATURE
        );
    }

    #[test]
    fn post_request_matches_the_openssl_vector() {
        let signature = sign_request(
            &merchant(),
            "POST",
            "/v3/pay/transactions/native",
            TIMESTAMP,
            POST_NONCE,
            ORDER_BODY,
        );
        assert_eq!(signature, POST_SIGNATURE);
        let message = request_message(
            "POST",
            "/v3/pay/transactions/native",
            TIMESTAMP,
            POST_NONCE,
            ORDER_BODY,
        );
        let raw = STANDARD.decode(&signature).unwrap();
        assert!(merchant_public().verify_sha256(message.as_bytes(), &raw));
    }

    #[test]
    fn authorization_header_has_the_documented_shape() {
        assert_eq!(
            authorization_header(MCHID, MERCHANT_SERIAL, GET_NONCE, TIMESTAMP, GET_SIGNATURE),
            format!(
                "WECHATPAY2-SHA256-RSA2048 mchid=\"1900000109\",\
                 nonce_str=\"593BEC0C930BF1AFEB40B4A08C8FB242\",signature=\"{GET_SIGNATURE}\",\
                 timestamp=\"1714564800\",serial_no=\"3775B6A45ACD588826D15E583A95F5DD0FFB9C4E\""
            )
        );
    }

    #[test]
    fn reply_matches_the_openssl_vector() {
        let now = TIMESTAMP + 30;
        assert_eq!(
            verify_response(
                &platform_keys(),
                &reply_headers(REPLY_SIGNATURE),
                REPLY_BODY,
                now
            ),
            Ok(())
        );
        // No Wechatpay-Signature-Type header is fine too.
        let headers = SignatureHeaders {
            signature_type: None,
            ..reply_headers(REPLY_SIGNATURE)
        };
        assert_eq!(
            verify_response(&platform_keys(), &headers, REPLY_BODY, now),
            Ok(())
        );
        assert_eq!(
            sign_response(&platform(), 1714564801, REPLY_NONCE, REPLY_BODY),
            REPLY_SIGNATURE
        );
    }

    #[test]
    fn the_serial_chooses_the_key_during_a_rotation() {
        let keys = platform_keys();
        let now = TIMESTAMP;
        let old_signature = sign_response(&merchant(), 1714564801, REPLY_NONCE, REPLY_BODY);
        let old = SignatureHeaders {
            serial: OLD_PLATFORM_SERIAL,
            ..reply_headers(&old_signature)
        };
        assert_eq!(verify_response(&keys, &old, REPLY_BODY, now), Ok(()));
        // The right signature under the other serial is refused.
        let crossed = SignatureHeaders {
            serial: OLD_PLATFORM_SERIAL,
            ..reply_headers(REPLY_SIGNATURE)
        };
        assert_eq!(
            verify_response(&keys, &crossed, REPLY_BODY, now),
            Err(WechatPayError::BadSignature)
        );
        let mut retired = keys.clone();
        retired.remove(OLD_PLATFORM_SERIAL);
        assert_eq!(
            verify_response(&retired, &old, REPLY_BODY, now),
            Err(WechatPayError::UnknownSerial)
        );
        assert!(format!("{keys:?}").contains(PLATFORM_SERIAL));
    }

    #[test]
    fn refuses_unknown_serials() {
        let headers = SignatureHeaders {
            serial: "5157F09EFDC096DE15EBE81A47057A7232F1B8E2",
            ..reply_headers(REPLY_SIGNATURE)
        };
        assert_eq!(
            verify_response(&platform_keys(), &headers, REPLY_BODY, TIMESTAMP),
            Err(WechatPayError::UnknownSerial)
        );
        // Serials match exactly.
        let lower = PLATFORM_SERIAL.to_lowercase();
        let headers = SignatureHeaders {
            serial: &lower,
            ..reply_headers(REPLY_SIGNATURE)
        };
        assert_eq!(
            verify_response(&platform_keys(), &headers, REPLY_BODY, TIMESTAMP),
            Err(WechatPayError::UnknownSerial)
        );
    }

    #[test]
    fn refuses_timestamps_more_than_300_seconds_off() {
        let keys = platform_keys();
        let headers = reply_headers(REPLY_SIGNATURE);
        let signed_at = 1714564801;
        for now in [signed_at - 300, signed_at, signed_at + 300] {
            assert_eq!(verify_response(&keys, &headers, REPLY_BODY, now), Ok(()));
        }
        assert_eq!(
            verify_response(&keys, &headers, REPLY_BODY, signed_at + 301),
            Err(WechatPayError::TimestampOutsideWindow { skew_seconds: 301 })
        );
        assert_eq!(
            verify_response(&keys, &headers, REPLY_BODY, signed_at - 301),
            Err(WechatPayError::TimestampOutsideWindow { skew_seconds: 301 })
        );
        for bad in [
            "",
            "+1714564801",
            " 1714564801",
            "1714564801.0",
            "17145648010000000000",
        ] {
            let headers = SignatureHeaders {
                timestamp: bad,
                ..reply_headers(REPLY_SIGNATURE)
            };
            assert_eq!(
                verify_response(&keys, &headers, REPLY_BODY, signed_at),
                Err(WechatPayError::MalformedHeader("Wechatpay-Timestamp")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_probe_signatures_and_other_signature_types() {
        let probe = format!("{PROBE_SIGNATURE_PREFIX}{REPLY_SIGNATURE}");
        assert_eq!(
            verify_response(
                &platform_keys(),
                &reply_headers(&probe),
                REPLY_BODY,
                TIMESTAMP
            ),
            Err(WechatPayError::ProbeSignature)
        );
        let headers = SignatureHeaders {
            signature_type: Some("WECHATPAY2-SM2-WITH-SM3"),
            ..reply_headers(REPLY_SIGNATURE)
        };
        assert_eq!(
            verify_response(&platform_keys(), &headers, REPLY_BODY, TIMESTAMP),
            Err(WechatPayError::UnsupportedSignatureType)
        );
    }

    #[test]
    fn refuses_bad_signatures_and_resplit_nonces() {
        let keys = platform_keys();
        let tampered = REPLY_BODY.replace("aIQrOYOzz", "aIQrOYOzy");
        assert_eq!(
            verify_response(&keys, &reply_headers(REPLY_SIGNATURE), &tampered, TIMESTAMP),
            Err(WechatPayError::BadSignature)
        );
        assert_eq!(
            verify_response(&keys, &reply_headers("%%%"), REPLY_BODY, TIMESTAMP),
            Err(WechatPayError::BadSignature)
        );
        // A body with a line break, re-split so that its first line moves into the nonce:
        // the signed bytes stay the same, the body a caller would read does not.
        let body = "{\n\"trade_state\":\"SUCCESS\"}";
        let signature = sign_response(&platform(), 1714564801, REPLY_NONCE, body);
        let resplit_nonce = format!("{REPLY_NONCE}\n{{");
        let resplit_body = &body[2..];
        assert_eq!(
            response_message(REPLY_TIMESTAMP, &resplit_nonce, resplit_body),
            response_message(REPLY_TIMESTAMP, REPLY_NONCE, body)
        );
        let headers = SignatureHeaders {
            nonce: &resplit_nonce,
            ..reply_headers(&signature)
        };
        assert_eq!(
            verify_response(&keys, &headers, resplit_body, TIMESTAMP),
            Err(WechatPayError::MalformedHeader("Wechatpay-Nonce"))
        );
    }

    #[test]
    fn resource_vector_decrypts_and_encrypts_back() {
        let key = api_v3_key();
        let resource = vector_resource();
        let plaintext = decrypt_resource(&key, &resource).unwrap();
        assert_eq!(plaintext, RESOURCE_PLAINTEXT.as_bytes());
        // GCM is deterministic for a given nonce: encrypting gives python's ciphertext back.
        let encrypted = encrypt_resource(
            &key,
            RESOURCE_NONCE,
            "transaction",
            RESOURCE_PLAINTEXT.as_bytes(),
        )
        .unwrap();
        assert_eq!(encrypted.ciphertext, RESOURCE_CIPHERTEXT);
        assert_eq!(encrypted.algorithm, RESOURCE_ALGORITHM);
    }

    #[test]
    fn resource_refusals() {
        let key = api_v3_key();
        let with = |change: fn(&mut EncryptedResource)| {
            let mut resource = vector_resource();
            change(&mut resource);
            decrypt_resource(&key, &resource)
        };
        assert_eq!(
            with(|r| r.associated_data = "refund".into()),
            Err(ResourceError::AuthenticationFailed)
        );
        assert_eq!(
            with(|r| r.nonce = "fdasflkja485".into()),
            Err(ResourceError::AuthenticationFailed)
        );
        assert_eq!(
            with(|r| r.nonce = "short".into()),
            Err(ResourceError::BadNonce)
        );
        assert_eq!(
            with(|r| r.algorithm = "AEAD_SM4_GCM".into()),
            Err(ResourceError::UnsupportedAlgorithm)
        );
        assert_eq!(
            with(|r| r.ciphertext = "not base64!".into()),
            Err(ResourceError::MalformedCiphertext)
        );
        assert_eq!(
            with(|r| r.ciphertext = STANDARD.encode([0u8; 15])),
            Err(ResourceError::MalformedCiphertext)
        );
        let other_key = ApiV3Key::new(&Secret::new("TestOnlyApiV3Key0123456789abcdeg")).unwrap();
        assert_eq!(
            decrypt_resource(&other_key, &vector_resource()),
            Err(ResourceError::AuthenticationFailed)
        );
        assert_eq!(
            ApiV3Key::new(&Secret::new("too short")).unwrap_err(),
            InvalidApiV3Key
        );
        assert_eq!(format!("{key:?}"), "ApiV3Key(***)");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn reply_sign_verify_round_trips(
            body in "[ -~]{0,200}",
            nonce in "[0-9A-Za-z]{1,32}",
            timestamp in 1_600_000_000u64..2_000_000_000,
            skew in 0u64..=300,
            later: bool,
        ) {
            let signature = sign_response(&platform(), timestamp, &nonce, &body);
            let timestamp_text = timestamp.to_string();
            let headers = SignatureHeaders {
                timestamp: &timestamp_text,
                nonce: &nonce,
                signature: &signature,
                serial: PLATFORM_SERIAL,
                signature_type: Some(SIGNATURE_TYPE),
            };
            let now = if later { timestamp + skew } else { timestamp - skew };
            prop_assert_eq!(verify_response(&platform_keys(), &headers, &body, now), Ok(()));
        }

        #[test]
        fn tampering_with_body_or_signature_fails(
            index in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            in_signature: bool,
        ) {
            let message = response_message(REPLY_TIMESTAMP, REPLY_NONCE, REPLY_BODY).into_bytes();
            let mut tampered = message.clone();
            let mut signature = STANDARD.decode(REPLY_SIGNATURE).unwrap();
            let target = if in_signature { &mut signature } else { &mut tampered };
            let at = index.index(target.len());
            target[at] ^= flip;
            prop_assert!(!platform_public().verify_sha256(&tampered, &signature));
            if in_signature {
                let encoded = STANDARD.encode(&signature);
                prop_assert_eq!(
                    verify_response(&platform_keys(), &reply_headers(&encoded), REPLY_BODY, TIMESTAMP),
                    Err(WechatPayError::BadSignature)
                );
            }
        }

        #[test]
        fn resources_round_trip_and_tampering_fails(
            plaintext in proptest::collection::vec(any::<u8>(), 0..256),
            nonce in "[0-9a-zA-Z]{12}",
            associated_data in "[a-z_]{0,16}",
            index in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let key = api_v3_key();
            let resource = encrypt_resource(&key, &nonce, &associated_data, &plaintext).unwrap();
            prop_assert_eq!(decrypt_resource(&key, &resource), Ok(plaintext));
            let mut bytes = STANDARD.decode(&resource.ciphertext).unwrap();
            let at = index.index(bytes.len());
            bytes[at] ^= flip;
            let tampered = EncryptedResource { ciphertext: STANDARD.encode(&bytes), ..resource };
            prop_assert_eq!(
                decrypt_resource(&key, &tampered),
                Err(ResourceError::AuthenticationFailed)
            );
        }
    }
    mod adapter {
        use super::super::*;
        use super::{platform_keys, MCHID, MERCHANT_SERIAL, PLATFORM_SERIAL};
        use crate::channels::test_keys::*;
        use crate::channels::test_support::*;

        const APPID: &str = "wxd678efh567hg6787";
        const NONCE: &str = "593BEC0C930BF1AFEB40B4A08C8FB242";

        fn channel() -> WechatPayChannel {
            WechatPayChannel::new(
                "wx",
                WechatPayIds {
                    mchid: MCHID.into(),
                    appid: APPID.into(),
                    merchant_serial: MERCHANT_SERIAL.into(),
                },
                BaseUrl::parse("http://127.0.0.1:9/wx").unwrap(),
                merchant(),
                platform_keys(),
                http(),
            )
            .with_api_v3_key(super::api_v3_key())
        }

        /// A reply signed by the platform key of PLATFORM_SERIAL at `at_ms`.
        fn signed_at(status: u16, body: &str, at_ms: u64) -> HttpReply {
            let ts = (at_ms / 1000).to_string();
            let signature = sign_response(&platform(), at_ms / 1000, "n0nce", body);
            reply(
                status,
                &[
                    ("Wechatpay-Timestamp", &ts),
                    ("Wechatpay-Nonce", "n0nce"),
                    ("Wechatpay-Signature", &signature),
                    ("Wechatpay-Serial", PLATFORM_SERIAL),
                    ("Wechatpay-Signature-Type", SIGNATURE_TYPE),
                ],
                body,
            )
        }

        fn signed(status: u16, body: &str) -> HttpReply {
            signed_at(status, body, NOW_MS)
        }

        /// The fields of an `Authorization` header.
        fn authorization_fields(header: &str) -> std::collections::HashMap<String, String> {
            let rest = header.strip_prefix("WECHATPAY2-SHA256-RSA2048 ").unwrap();
            rest.split(',')
                .map(|item| {
                    let (k, v) = item.split_once('=').unwrap();
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect()
        }

        #[tokio::test]
        async fn the_get_query_signs_the_path_with_its_query() {
            let order = order_id();
            let (parts, body) =
                split(channel().query_request(&order, NOW_MS, NONCE).unwrap()).await;
            assert_eq!(parts.method, Method::GET);
            let target = format!("/wx/v3/pay/transactions/out-trade-no/{order}?mchid={MCHID}");
            assert_eq!(parts.uri.path_and_query().unwrap().as_str(), target);
            assert_eq!(body, "");
            let fields = authorization_fields(parts.headers[AUTHORIZATION].to_str().unwrap());
            assert_eq!(fields["mchid"], MCHID);
            assert_eq!(fields["nonce_str"], NONCE);
            assert_eq!(fields["timestamp"], "1714564800");
            assert_eq!(fields["serial_no"], MERCHANT_SERIAL);
            let signature = STANDARD.decode(&fields["signature"]).unwrap();
            let message = request_message("GET", &target, 1714564800, NONCE, "");
            assert!(message.contains("?mchid=1900000109\n"));
            assert!(merchant_public().verify_sha256(message.as_bytes(), &signature));
            // Without the query, the signature does not verify: the classic mistake.
            let path_only = request_message(
                "GET",
                target.split('?').next().unwrap(),
                1714564800,
                NONCE,
                "",
            );
            assert!(!merchant_public().verify_sha256(path_only.as_bytes(), &signature));
        }

        #[tokio::test]
        async fn builds_native_order_close_and_refund_requests() {
            let order = create_order();
            let (parts, body) =
                split(channel().create_request(&order, NOW_MS, NONCE).unwrap()).await;
            assert_eq!(parts.method, Method::POST);
            assert_eq!(parts.uri.path(), "/wx/v3/pay/transactions/native");
            assert_eq!(parts.headers[CONTENT_TYPE], "application/json");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["appid"], APPID);
            assert_eq!(json["mchid"], MCHID);
            assert_eq!(json["description"], order.description.as_str());
            assert_eq!(json["out_trade_no"], order.order_id.as_str());
            assert_eq!(json["time_expire"], "2024-05-01T20:15:00+08:00");
            assert_eq!(json["notify_url"], order.notify_url.as_str());
            assert_eq!(json["amount"]["total"], 8888);
            assert_eq!(json["amount"]["currency"], "CNY");
            let fields = authorization_fields(parts.headers[AUTHORIZATION].to_str().unwrap());
            let message = request_message(
                "POST",
                "/wx/v3/pay/transactions/native",
                1714564800,
                NONCE,
                &body,
            );
            let signature = STANDARD.decode(&fields["signature"]).unwrap();
            assert!(merchant_public().verify_sha256(message.as_bytes(), &signature));

            let (parts, body) = split(
                channel()
                    .close_request(&order.order_id, NOW_MS, NONCE)
                    .unwrap(),
            )
            .await;
            assert_eq!(
                parts.uri.path(),
                format!(
                    "/wx/v3/pay/transactions/out-trade-no/{}/close",
                    order.order_id
                )
            );
            assert_eq!(body, r#"{"mchid":"1900000109"}"#);

            let refund = refund_request(order.order_id.clone());
            let (parts, body) =
                split(channel().refund_request(&refund, NOW_MS, NONCE).unwrap()).await;
            assert_eq!(parts.uri.path(), "/wx/v3/refund/domestic/refunds");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["out_trade_no"], order.order_id.as_str());
            assert_eq!(json["out_refund_no"], "rf_0001");
            assert_eq!(json["amount"]["refund"], 1000);
            assert_eq!(json["amount"]["total"], 8888);
        }

        fn transaction(order: &ChannelOrderId, state: &str) -> String {
            format!(
                r#"{{"appid":"{APPID}","mchid":"{MCHID}","out_trade_no":"{order}","transaction_id":"4200000001","trade_type":"NATIVE","trade_state":"{state}","amount":{{"total":8888,"currency":"CNY"}}}}"#
            )
        }

        #[test]
        fn reads_verified_replies() {
            let order = order_id();
            let created = channel().parse_create(
                &signed(200, r#"{"code_url":"weixin://wxpay/bizpayurl?pr=abc"}"#),
                NOW_MS,
            );
            assert_eq!(
                created,
                Ok(Created {
                    action: Action::QrCode("weixin://wxpay/bizpayurl?pr=abc".into()),
                    channel_txn_id: None
                })
            );
            assert_eq!(
                channel().parse_query(
                    &order,
                    &signed(200, &transaction(&order, "SUCCESS")),
                    NOW_MS
                ),
                Ok(OrderState::Paid {
                    channel_txn_id: "4200000001".into(),
                    amount_minor: 8888,
                    currency: Currency::Cny
                })
            );
            for (state, expected) in [
                ("NOTPAY", OrderState::Pending),
                ("USERPAYING", OrderState::Pending),
                ("CLOSED", OrderState::Closed),
                ("REVOKED", OrderState::Closed),
                ("PAYERROR", OrderState::Failed),
            ] {
                assert_eq!(
                    channel().parse_query(
                        &order,
                        &signed(200, &transaction(&order, state)),
                        NOW_MS
                    ),
                    Ok(expected)
                );
            }
            let missing = signed(404, r#"{"code":"ORDER_NOT_EXIST","message":"no"}"#);
            assert_eq!(
                channel().parse_query(&order, &missing, NOW_MS),
                Ok(OrderState::NotFound)
            );
            assert_eq!(channel().parse_close(&signed(204, ""), NOW_MS), Ok(true));
            assert_eq!(channel().parse_close(&missing, NOW_MS), Ok(false));
            let refund = refund_request(order.clone());
            let processing = signed(
                200,
                r#"{"refund_id":"50000000382019052709732678859","out_refund_no":"rf_0001","status":"PROCESSING"}"#,
            );
            assert_eq!(
                channel().parse_refund(&refund, &processing, NOW_MS),
                Ok(RefundOutcome::Pending {
                    channel_refund_id: Some("50000000382019052709732678859".into())
                })
            );
        }

        #[test]
        fn maps_error_replies_by_what_they_say_about_the_attempt() {
            let declined = channel()
                .parse_create(
                    &signed(400, r#"{"code":"PARAM_ERROR","message":"bad"}"#),
                    NOW_MS,
                )
                .unwrap_err();
            assert_eq!(
                declined,
                ChannelError::Declined {
                    code: "PARAM_ERROR".into(),
                    message: "bad".into()
                }
            );
            assert!(declined.certainly_not_executed());
            assert!(matches!(
                assert_unknown(channel().parse_create(
                    &signed(400, r#"{"code":"OUT_TRADE_NO_USED","message":"dup"}"#),
                    NOW_MS
                )),
                ChannelError::UnexpectedReply { .. }
            ));
            assert!(matches!(
                channel().parse_create(
                    &signed(429, r#"{"code":"FREQUENCY_LIMITED","message":"slow"}"#),
                    NOW_MS
                ),
                Err(ChannelError::Throttled { .. })
            ));
            assert!(matches!(
                assert_unknown(
                    channel().parse_create(&reply(500, &[], r#"{"code":"SYSTEM_ERROR"}"#), NOW_MS)
                ),
                ChannelError::ServerError { status: 500, .. }
            ));
        }

        #[test]
        fn refuses_unsigned_forged_probe_stale_and_foreign_replies() {
            let order = order_id();
            let body = transaction(&order, "SUCCESS");
            assert_unverifiable(channel().parse_query(&order, &reply(200, &[], &body), NOW_MS));
            // An unsigned decline is no decline.
            assert_unverifiable(
                channel().parse_create(&reply(400, &[], r#"{"code":"PARAM_ERROR"}"#), NOW_MS),
            );
            let with = |name: &str, value: &str| {
                let mut r = signed(200, &body);
                r.headers.insert(
                    hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
                r
            };
            let forged = STANDARD.encode(
                merchant().sign_sha256(response_message("1714564800", "n0nce", &body).as_bytes()),
            );
            assert_unverifiable(channel().parse_query(
                &order,
                &with("Wechatpay-Signature", &forged),
                NOW_MS,
            ));
            assert_unverifiable(channel().parse_query(
                &order,
                &with("Wechatpay-Signature", "WECHATPAY/SIGNTEST/abc"),
                NOW_MS,
            ));
            assert_unverifiable(channel().parse_query(
                &order,
                &with("Wechatpay-Serial", "UNKNOWN"),
                NOW_MS,
            ));
            assert_unverifiable(channel().parse_query(
                &order,
                &signed_at(200, &body, NOW_MS - 301_000),
                NOW_MS,
            ));
            let tampered = {
                let mut r = signed(200, &body);
                r.body = body.replace("8888", "1").into();
                r
            };
            assert_unverifiable(channel().parse_query(&order, &tampered, NOW_MS));
            let foreign = body.replace(MCHID, "1900000999");
            assert_unverifiable(channel().parse_query(&order, &signed(200, &foreign), NOW_MS));
        }
    }

    mod callbacks {
        use super::super::*;
        use super::{api_v3_key, platform_keys, MCHID, OLD_PLATFORM_SERIAL, PLATFORM_SERIAL};
        use crate::channels::test_keys::*;
        use crate::channels::test_support::*;
        use crate::channels::{MAX_CALLBACK_BODY_BYTES, MAX_CALLBACK_MESSAGE_CHARS};
        use hyper::header::{HeaderName, HeaderValue};
        use hyper::HeaderMap;
        use proptest::prelude::*;

        const APPID: &str = "wxd678efh567hg6787";
        const EVENT_ID: &str = "EV-0123456789ABCDEFGHIJKLMN";
        const TRANSACTION_ID: &str = "4200000000202405010000000001";
        const NONCE: &str = "5K8264ILTKCH16CQ2502SI8ZNMTM67VS";
        const RESOURCE_NONCE: &str = "fdasflkja484";
        const SIGNED_AT: u64 = NOW_MS / 1000;

        fn channel() -> WechatPayChannel {
            channel_without_key().with_api_v3_key(api_v3_key())
        }

        fn channel_without_key() -> WechatPayChannel {
            WechatPayChannel::new(
                "wx",
                WechatPayIds {
                    mchid: MCHID.into(),
                    appid: APPID.into(),
                    merchant_serial: "3775B6A45ACD588826D15E583A95F5DD0FFB9C4E".into(),
                },
                BaseUrl::parse("http://127.0.0.1:9").unwrap(),
                merchant(),
                platform_keys(),
                http(),
            )
        }

        /// A transaction resource as the simulator makes it (`transaction_json`), paid.
        fn transaction(order: &ChannelOrderId) -> serde_json::Value {
            serde_json::json!({
                "appid": APPID,
                "mchid": MCHID,
                "out_trade_no": order.as_str(),
                "trade_type": "NATIVE",
                "trade_state": "SUCCESS",
                "trade_state_desc": "支付成功",
                "amount": {"total": 8888, "currency": "CNY", "payer_total": 8888, "payer_currency": "CNY"},
                "transaction_id": TRANSACTION_ID,
                "success_time": "2024-05-01T20:01:01+08:00",
                "payer": {"openid": "oSimulatedPayer0000000000000"},
            })
        }

        fn refund(order: &ChannelOrderId, status: &str) -> serde_json::Value {
            serde_json::json!({
                "mchid": MCHID,
                "out_trade_no": order.as_str(),
                "transaction_id": TRANSACTION_ID,
                "out_refund_no": "rf_0001",
                "refund_id": "50000000382019052709732678859",
                "refund_status": status,
                "success_time": "2024-05-02T10:00:00+08:00",
                "amount": {"total": 8888, "refund": 1000, "payer_total": 8888, "payer_refund": 1000},
            })
        }

        /// The body of event `event_type` carrying `resource` (any JSON text), encrypted with
        /// the APIv3 key, as the simulator's `notice` makes it.
        fn envelope(event_type: &str, associated_data: &str, plaintext: &str) -> String {
            let encrypted = encrypt_resource(
                &api_v3_key(),
                RESOURCE_NONCE,
                associated_data,
                plaintext.as_bytes(),
            )
            .unwrap();
            envelope_with(event_type, &encrypted)
        }

        fn envelope_with(event_type: &str, resource: &EncryptedResource) -> String {
            serde_json::json!({
                "id": EVENT_ID,
                "create_time": "2024-05-01T20:01:02+08:00",
                "resource_type": "encrypt-resource",
                "event_type": event_type,
                "summary": "支付成功",
                "resource": {
                    "original_type": "transaction",
                    "algorithm": resource.algorithm,
                    "ciphertext": resource.ciphertext,
                    "associated_data": resource.associated_data,
                    "nonce": resource.nonce,
                },
            })
            .to_string()
        }

        fn paid_body(order: &ChannelOrderId) -> String {
            envelope(
                EVENT_TRANSACTION_SUCCESS,
                "transaction",
                &transaction(order).to_string(),
            )
        }

        /// The platform's signature headers over `body` at SIGNED_AT.
        fn signed_headers(body: &[u8]) -> HeaderMap {
            let signature = sign_response(
                &platform(),
                SIGNED_AT,
                NONCE,
                std::str::from_utf8(body).unwrap(),
            );
            headers(&[
                ("Wechatpay-Timestamp", &SIGNED_AT.to_string()),
                ("Wechatpay-Nonce", NONCE),
                ("Wechatpay-Signature", &signature),
                ("Wechatpay-Serial", PLATFORM_SERIAL),
                ("Wechatpay-Signature-Type", SIGNATURE_TYPE),
            ])
        }

        fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            map
        }

        fn verify_with(
            channel: &WechatPayChannel,
            headers: &HeaderMap,
            body: &[u8],
            now_ms: u64,
        ) -> Result<Notice, CallbackRefusal> {
            channel.verify_callback(&Callback { headers, body }, now_ms)
        }

        /// `body` signed now, verified now.
        fn verify_signed(body: &str) -> Result<Notice, CallbackRefusal> {
            verify_with(
                &channel(),
                &signed_headers(body.as_bytes()),
                body.as_bytes(),
                NOW_MS,
            )
        }

        fn notice(order: &ChannelOrderId, event: NoticeEvent) -> Notice {
            Notice {
                order_id: order.clone(),
                notice_id: Some(EVENT_ID.into()),
                event,
            }
        }

        fn paid(order: &ChannelOrderId) -> Notice {
            notice(
                order,
                NoticeEvent::Paid {
                    channel_txn_id: TRANSACTION_ID.into(),
                    amount_minor: 8888,
                    currency: Currency::Cny,
                },
            )
        }

        #[track_caller]
        fn assert_refused(result: Result<Notice, CallbackRefusal>, label: &str) -> CallbackRefusal {
            let refusal = result.expect_err("must be refused");
            assert_eq!(refusal.label(), label, "{refusal:?}");
            refusal
        }

        #[test]
        fn a_genuine_paid_callback_is_paid() {
            let order = order_id();
            let body = paid_body(&order);
            assert_eq!(verify_signed(&body), Ok(paid(&order)));
            // Within the window either way.
            let headers = signed_headers(body.as_bytes());
            for now_ms in [NOW_MS - 300_000, NOW_MS + 300_999] {
                assert_eq!(
                    verify_with(&channel(), &headers, body.as_bytes(), now_ms),
                    Ok(paid(&order))
                );
            }
            // Without a Wechatpay-Signature-Type header too.
            let mut untyped = headers.clone();
            untyped.remove("Wechatpay-Signature-Type");
            assert_eq!(
                verify_with(&channel(), &untyped, body.as_bytes(), NOW_MS),
                Ok(paid(&order))
            );
        }

        #[test]
        fn forged_and_unsigned_callbacks_are_bad_signatures() {
            let order = order_id();
            let body = paid_body(&order);
            let headers = signed_headers(body.as_bytes());
            let tampered = body.replace(EVENT_ID, "EV-0123456789ABCDEFGHIJKLMO");
            assert_ne!(tampered, body);
            assert_refused(
                verify_with(&channel(), &headers, tampered.as_bytes(), NOW_MS),
                "bad_signature",
            );
            let with = |name: &str, value: &str| {
                let mut changed = headers.clone();
                changed.insert(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
                verify_with(&channel(), &changed, body.as_bytes(), NOW_MS)
            };
            let by_merchant = STANDARD
                .encode(merchant().sign_sha256(
                    response_message(&SIGNED_AT.to_string(), NONCE, &body).as_bytes(),
                ));
            assert_refused(with("Wechatpay-Signature", &by_merchant), "bad_signature");
            assert_refused(with("Wechatpay-Signature", "%%%"), "bad_signature");
            // An unknown serial, and a known serial whose key did not sign.
            assert_refused(with("Wechatpay-Serial", "UNKNOWN0000"), "bad_signature");
            assert_refused(
                with("Wechatpay-Serial", OLD_PLATFORM_SERIAL),
                "bad_signature",
            );
            assert_refused(
                with("Wechatpay-Signature-Type", "WECHATPAY2-SM2-WITH-SM3"),
                "bad_signature",
            );
            // The signed nonce is part of the message.
            assert_refused(with("Wechatpay-Nonce", "another"), "bad_signature");
            for missing in [
                "Wechatpay-Timestamp",
                "Wechatpay-Nonce",
                "Wechatpay-Signature",
                "Wechatpay-Serial",
            ] {
                let mut unsigned = headers.clone();
                unsigned.remove(missing);
                let refusal = assert_refused(
                    verify_with(&channel(), &unsigned, body.as_bytes(), NOW_MS),
                    "bad_signature",
                );
                assert!(refusal.to_string().contains(missing), "{refusal}");
            }
            assert_refused(
                verify_with(&channel(), &HeaderMap::new(), body.as_bytes(), NOW_MS),
                "bad_signature",
            );
        }

        #[test]
        fn malformed_signature_headers_are_malformed() {
            let order = order_id();
            let body = paid_body(&order);
            let headers = signed_headers(body.as_bytes());
            let mut repeated = headers.clone();
            repeated.append("Wechatpay-Signature", HeaderValue::from_static("AAAA"));
            assert_refused(
                verify_with(&channel(), &repeated, body.as_bytes(), NOW_MS),
                "malformed",
            );
            for (name, value) in [
                ("Wechatpay-Timestamp", "+1714564800"),
                ("Wechatpay-Timestamp", "soon"),
            ] {
                let mut changed = headers.clone();
                changed.insert(name, HeaderValue::from_static(value));
                assert_refused(
                    verify_with(&channel(), &changed, body.as_bytes(), NOW_MS),
                    "malformed",
                );
            }
            let mut not_ascii = headers.clone();
            not_ascii.insert(
                "Wechatpay-Nonce",
                HeaderValue::from_bytes("n\u{f6}nce".as_bytes()).unwrap(),
            );
            assert_refused(
                verify_with(&channel(), &not_ascii, body.as_bytes(), NOW_MS),
                "malformed",
            );
        }

        #[test]
        fn stale_and_probe_callbacks_are_stale() {
            let order = order_id();
            let body = paid_body(&order);
            let headers = signed_headers(body.as_bytes());
            for now_ms in [NOW_MS + 301_000, NOW_MS - 301_000, NOW_MS + 86_400_000] {
                assert_refused(
                    verify_with(&channel(), &headers, body.as_bytes(), now_ms),
                    "stale",
                );
            }
            let mut probe = headers.clone();
            probe.insert(
                "Wechatpay-Signature",
                HeaderValue::from_static("WECHATPAY/SIGNTEST/c2lnbmF0dXJl"),
            );
            assert_refused(
                verify_with(&channel(), &probe, body.as_bytes(), NOW_MS),
                "stale",
            );
        }

        #[test]
        fn a_resource_that_does_not_open_is_a_bad_signature() {
            let order = order_id();
            let plaintext = transaction(&order).to_string();
            let genuine = encrypt_resource(
                &api_v3_key(),
                RESOURCE_NONCE,
                "transaction",
                plaintext.as_bytes(),
            )
            .unwrap();
            let mut flipped = STANDARD.decode(&genuine.ciphertext).unwrap();
            flipped[10] ^= 1;
            let other_key =
                ApiV3Key::new(&Secret::new("TestOnlyApiV3Key0123456789abcdeg")).unwrap();
            let tampered = [
                EncryptedResource {
                    ciphertext: STANDARD.encode(&flipped),
                    ..genuine.clone()
                },
                EncryptedResource {
                    associated_data: "refund".into(),
                    ..genuine.clone()
                },
                EncryptedResource {
                    nonce: "fdasflkja485".into(),
                    ..genuine.clone()
                },
                EncryptedResource {
                    algorithm: "AEAD_SM4_GCM".into(),
                    ..genuine.clone()
                },
                EncryptedResource {
                    ciphertext: "not base64!".into(),
                    ..genuine.clone()
                },
                encrypt_resource(
                    &other_key,
                    RESOURCE_NONCE,
                    "transaction",
                    plaintext.as_bytes(),
                )
                .unwrap(),
            ];
            for resource in &tampered {
                // Signed by the platform: only the resource is wrong.
                let body = envelope_with(EVENT_TRANSACTION_SUCCESS, resource);
                assert_refused(verify_signed(&body), "bad_signature");
            }
            // An adapter without the APIv3 key refuses genuine callbacks (fail closed).
            let body = paid_body(&order);
            assert_refused(
                verify_with(
                    &channel_without_key(),
                    &signed_headers(body.as_bytes()),
                    body.as_bytes(),
                    NOW_MS,
                ),
                "bad_signature",
            );
        }

        #[test]
        fn callbacks_for_another_merchant_or_app_are_refused() {
            let order = order_id();
            for (field, value) in [("mchid", "1900000999"), ("appid", "wx0000000000000000")] {
                let mut foreign = transaction(&order);
                foreign[field] = value.into();
                let body = envelope(
                    EVENT_TRANSACTION_SUCCESS,
                    "transaction",
                    &foreign.to_string(),
                );
                assert_refused(verify_signed(&body), "wrong_account");
            }
            let mut foreign = refund(&order, "SUCCESS");
            foreign["mchid"] = "1900000999".into();
            let body = envelope(EVENT_REFUND_SUCCESS, "refund", &foreign.to_string());
            assert_refused(verify_signed(&body), "wrong_account");
        }

        #[test]
        fn malformed_callbacks_are_malformed() {
            let order = order_id();
            let with = |change: &dyn Fn(&mut serde_json::Value)| {
                let mut resource = transaction(&order);
                change(&mut resource);
                verify_signed(&envelope(
                    EVENT_TRANSACTION_SUCCESS,
                    "transaction",
                    &resource.to_string(),
                ))
            };
            for total in [
                serde_json::json!(0),
                serde_json::json!(-8888),
                serde_json::json!(88.88),
                serde_json::json!("8888"),
                serde_json::json!(1e30),
            ] {
                assert_refused(with(&|r| r["amount"]["total"] = total.clone()), "malformed");
            }
            assert_refused(
                with(&|r| r["amount"]["currency"] = "XYZ".into()),
                "malformed",
            );
            assert_refused(
                with(&|r| r["amount"]["currency"] = "cny".into()),
                "malformed",
            );
            assert_refused(
                with(&|r| {
                    r["amount"].as_object_mut().unwrap().remove("currency");
                }),
                "malformed",
            );
            assert_refused(
                with(&|r| {
                    r.as_object_mut().unwrap().remove("amount");
                }),
                "malformed",
            );
            assert_refused(
                with(&|r| {
                    r.as_object_mut().unwrap().remove("transaction_id");
                }),
                "malformed",
            );
            assert_refused(
                with(&|r| r["out_trade_no"] = "att_01HX7Z3K9Q2W".into()),
                "malformed",
            );
            assert_refused(
                with(&|r| r["transaction_id"] = "x".repeat(129).into()),
                "malformed",
            );
            assert_refused(
                with(&|r| {
                    r.as_object_mut().unwrap().remove("mchid");
                }),
                "malformed",
            );
            // The decrypted resource, and the envelope, must be JSON of the right shape.
            assert_refused(
                verify_signed(&envelope(
                    EVENT_TRANSACTION_SUCCESS,
                    "transaction",
                    "not json",
                )),
                "malformed",
            );
            assert_refused(verify_signed("not json"), "malformed");
            assert_refused(
                verify_signed(r#"{"id":"EV-1","event_type":"TRANSACTION.SUCCESS"}"#),
                "malformed",
            );
            let plain = paid_body(&order).replace("encrypt-resource", "plain-resource");
            assert_refused(verify_signed(&plain), "malformed");
            // Too large, and not UTF-8, before any signature work.
            let huge = vec![b' '; MAX_CALLBACK_BODY_BYTES + 1];
            assert_refused(
                verify_with(&channel(), &HeaderMap::new(), &huge, NOW_MS),
                "malformed",
            );
            assert_refused(
                verify_with(&channel(), &HeaderMap::new(), b"{\"id\":\"\xff\"}", NOW_MS),
                "malformed",
            );
        }

        #[test]
        fn each_event_maps_as_documented() {
            let order = order_id();
            let mut unpaid = transaction(&order);
            unpaid["trade_state"] = "NOTPAY".into();
            unpaid.as_object_mut().unwrap().remove("transaction_id");
            let body = envelope(
                EVENT_TRANSACTION_SUCCESS,
                "transaction",
                &unpaid.to_string(),
            );
            assert_eq!(
                verify_signed(&body),
                Ok(notice(&order, NoticeEvent::Other("NOTPAY".into())))
            );
            for (event, status, succeeded) in [
                ("REFUND.SUCCESS", "SUCCESS", true),
                ("REFUND.ABNORMAL", "ABNORMAL", false),
                ("REFUND.CLOSED", "CLOSED", false),
            ] {
                let body = envelope(event, "refund", &refund(&order, status).to_string());
                assert_eq!(
                    verify_signed(&body),
                    Ok(notice(
                        &order,
                        NoticeEvent::Refund {
                            refund_id: Some("rf_0001".into()),
                            amount_minor: 1000,
                            succeeded,
                        }
                    )),
                    "{event}"
                );
            }
            // An event and a status that disagree are not believed.
            let body = envelope(
                "REFUND.SUCCESS",
                "refund",
                &refund(&order, "ABNORMAL").to_string(),
            );
            assert_refused(verify_signed(&body), "malformed");
            let body = envelope(
                "REFUND.CLOSED",
                "refund",
                &refund(&order, "SUCCESS").to_string(),
            );
            assert_refused(verify_signed(&body), "malformed");
            // An event the gateway does not act on: genuine, about one of our orders.
            let body = envelope(
                "TRANSACTION.SOMETHING_NEW",
                "transaction",
                &transaction(&order).to_string(),
            );
            assert_eq!(
                verify_signed(&body),
                Ok(notice(
                    &order,
                    NoticeEvent::Other("TRANSACTION.SOMETHING_NEW".into())
                ))
            );
        }

        #[test]
        fn replies_have_the_protocol_shape() {
            let channel = channel();
            assert_eq!(
                channel.callback_reply(CallbackAnswer::Ack, "ignored"),
                CallbackReply {
                    status: 204,
                    content_type: "application/json",
                    body: String::new()
                }
            );
            assert_eq!(
                channel.callback_reply(CallbackAnswer::Refused, "bad signature: the signature does not verify"),
                CallbackReply {
                    status: 400,
                    content_type: "application/json",
                    body: r#"{"code":"FAIL","message":"bad signature: the signature does not verify"}"#.into()
                }
            );
            assert_eq!(
                channel.callback_reply(CallbackAnswer::RetryLater, ""),
                CallbackReply {
                    status: 500,
                    content_type: "application/json",
                    body: r#"{"code":"FAIL","message":"try again later"}"#.into()
                }
            );
            // Short, printable ASCII, valid JSON whatever the message.
            let reply = channel.callback_reply(
                CallbackAnswer::Refused,
                &format!("\"签名\"\n{}", "x".repeat(1_000)),
            );
            let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            let message = json["message"].as_str().unwrap();
            assert_eq!(message.chars().count(), MAX_CALLBACK_MESSAGE_CHARS);
            assert!(message.starts_with("\"??\"?x"), "{message}");
            assert!(message.bytes().all(|b| b == b' ' || b.is_ascii_graphic()));
            assert_eq!(json["code"], "FAIL");
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Every byte of the body is signed: a flipped one is always refused (the property
            /// asked of every protocol is weaker: never *another* notice).
            #[test]
            fn a_flipped_byte_never_reads_as_another_notice(
                index in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let order = order_id();
                let body = paid_body(&order);
                let headers = signed_headers(body.as_bytes());
                let mut tampered = body.into_bytes();
                let at = index.index(tampered.len());
                tampered[at] ^= flip;
                match verify_with(&channel(), &headers, &tampered, NOW_MS) {
                    Err(_) => {}
                    Ok(notice) => prop_assert_eq!(notice, paid(&order)),
                }
            }
        }
    }
}
