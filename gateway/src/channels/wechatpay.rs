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
//! - The adapter ([`WechatPayChannel`]): native order, query, close, refund; its reading of
//!   replies is documented beside it.

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
    check_create, now_unix_ms, random_nonce, rfc3339_shanghai, server_error, skew_seconds, Action,
    BaseUrl, Channel, ChannelError, ChannelKind, ChannelOrderId, CloseOutcome, CreateOrder,
    Created, OrderState, RefundOutcome, RefundRequest, SIGNATURE_WINDOW_SECONDS,
};
use crate::money::Currency;
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
            http,
        }
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
}
