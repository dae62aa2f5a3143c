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

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::keys::{RsaPrivateKey, RsaPublicKey};

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
}
