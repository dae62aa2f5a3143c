//! The channel side's cryptography, written independently of the gateway's
//! `channels::keys` so that each cross-checks the other: PEM decoding, RSA-SHA256
//! (PKCS#1 v1.5) signing and verification, HMAC-SHA256 for the supplier's `X-Signature`,
//! AES-256-GCM for WeChat Pay callback resources, and random identifiers. All through
//! aws-lc-rs.

use std::fmt;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    KeyPair, RsaKeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// The largest PEM text accepted (an 8192-bit key is about 6.5 kB).
pub const MAX_PEM_BYTES: usize = 16 * 1024;

/// Why a key could not be used. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("not a PEM block: {0}")]
    NotPem(&'static str),
    #[error("PEM label `{0}` is not supported here")]
    UnsupportedLabel(String),
    #[error("the key was rejected by aws-lc (2048- to 8192-bit RSA only)")]
    Rejected,
    #[error("the WeChat Pay APIv3 key must be exactly 32 bytes")]
    ApiV3KeyLength,
    #[error("the supplier secret must be at least 16 bytes")]
    WeakSupplierSecret,
}

/// Decodes the first PEM block of `text` into its label and DER bytes.
pub fn decode_pem(text: &str) -> Result<(String, Vec<u8>), CryptoError> {
    if text.len() > MAX_PEM_BYTES {
        return Err(CryptoError::NotPem("longer than 16 KiB"));
    }
    let start = text
        .find("-----BEGIN ")
        .ok_or(CryptoError::NotPem("no BEGIN line"))?;
    let rest = &text[start + "-----BEGIN ".len()..];
    let label_end = rest
        .find("-----")
        .ok_or(CryptoError::NotPem("unterminated BEGIN line"))?;
    let label = &rest[..label_end];
    let body_and_end = &rest[label_end + 5..];
    let end = format!("-----END {label}-----");
    let body_end = body_and_end
        .find(&end)
        .ok_or(CryptoError::NotPem("no matching END line"))?;
    let body: String = body_and_end[..body_end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = STANDARD
        .decode(body)
        .map_err(|_| CryptoError::NotPem("body is not base64"))?;
    Ok((label.to_owned(), der))
}

/// An RSA private key that signs RSA-SHA256 (what Alipay "RSA2" and WeChat Pay v3 use).
pub struct RsaSigner {
    pair: RsaKeyPair,
}

impl RsaSigner {
    /// PKCS#8 (`PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`) PEM.
    pub fn from_pem(pem: &str) -> Result<Self, CryptoError> {
        let (label, der) = decode_pem(pem)?;
        let pair = match label.as_str() {
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der),
            _ => return Err(CryptoError::UnsupportedLabel(label)),
        }
        .map_err(|_| CryptoError::Rejected)?;
        Ok(Self { pair })
    }

    /// base64 of RSA-SHA256 over `message`.
    pub fn sign_base64(&self, message: &[u8]) -> String {
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message,
                &mut signature,
            )
            // A validated key and a modulus-sized buffer: aws-lc fails only on allocation.
            .expect("RSA-SHA256 signing with a validated key");
        STANDARD.encode(signature)
    }

    /// The public half, for verification (PKCS#1 DER inside).
    pub fn verifier(&self) -> RsaVerifier {
        RsaVerifier {
            der: self.pair.public_key().as_ref().to_vec(),
        }
    }
}

impl fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RsaSigner(***)")
    }
}

/// An RSA public key that verifies RSA-SHA256 signatures.
#[derive(Clone)]
pub struct RsaVerifier {
    der: Vec<u8>,
}

impl RsaVerifier {
    /// SubjectPublicKeyInfo (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`) PEM; a private key
    /// PEM is accepted too (its public half is used), which lets a manifest name either.
    pub fn from_pem(pem: &str) -> Result<Self, CryptoError> {
        let (label, der) = decode_pem(pem)?;
        match label.as_str() {
            "PUBLIC KEY" | "RSA PUBLIC KEY" => {
                // Check it parses now rather than at every verify.
                UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &der)
                    .parse()
                    .map_err(|_| CryptoError::Rejected)?;
                Ok(Self { der })
            }
            "PRIVATE KEY" | "RSA PRIVATE KEY" => Ok(RsaSigner::from_pem(pem)?.verifier()),
            _ => Err(CryptoError::UnsupportedLabel(label)),
        }
    }

    /// Whether `signature_b64` is base64 of a valid RSA-SHA256 signature of `message`.
    pub fn verify_base64(&self, message: &[u8], signature_b64: &str) -> bool {
        let Ok(signature) = STANDARD.decode(signature_b64) else {
            return false;
        };
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &self.der)
            .verify(message, &signature)
            .is_ok()
    }
}

impl fmt::Debug for RsaVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RsaVerifier")
    }
}

/// The supplier's shared HMAC-SHA256 secret.
pub struct HmacKey {
    key: hmac::Key,
}

impl HmacKey {
    pub fn new(secret: &[u8]) -> Result<Self, CryptoError> {
        if secret.len() < 16 {
            return Err(CryptoError::WeakSupplierSecret);
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// `t=<t>,v1=<hex HMAC-SHA256("<t>.<body>")>`.
    pub fn signature_header(&self, timestamp_unix_seconds: u64, body: &[u8]) -> String {
        let t = timestamp_unix_seconds.to_string();
        let mut context = hmac::Context::with_key(&self.key);
        context.update(t.as_bytes());
        context.update(b".");
        context.update(body);
        format!("t={t},v1={}", hex::encode(context.sign().as_ref()))
    }

    /// Checks an `X-Signature` header: `t` once (digits), one to four `v1` (64 hex digits),
    /// nothing else; `t` within `window_seconds` of `now`; any `v1` matching (constant time).
    pub fn verify_header(
        &self,
        header: &str,
        body: &[u8],
        now_unix_seconds: u64,
        window_seconds: u64,
    ) -> Result<(), &'static str> {
        let mut t = None;
        let mut macs: Vec<Vec<u8>> = Vec::new();
        for item in header.split(',') {
            let (name, value) = item.split_once('=').ok_or("malformed item")?;
            match name {
                "t" if t.is_none() => t = Some(value),
                "v1" if macs.len() < 4 => {
                    if value.len() != 64 {
                        return Err("v1 is not 64 hex digits");
                    }
                    macs.push(hex::decode(value).map_err(|_| "v1 is not hex")?);
                }
                _ => return Err("unexpected item"),
            }
        }
        let t = t.ok_or("no t")?;
        if t.is_empty() || t.len() > 19 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err("t is not unix seconds");
        }
        let timestamp: u64 = t.parse().map_err(|_| "t is not unix seconds")?;
        if macs.is_empty() {
            return Err("no v1");
        }
        if timestamp.abs_diff(now_unix_seconds) > window_seconds {
            return Err("outside the signature window");
        }
        let mut message = Vec::with_capacity(t.len() + 1 + body.len());
        message.extend_from_slice(t.as_bytes());
        message.push(b'.');
        message.extend_from_slice(body);
        // Every candidate is checked, so the time depends only on their number.
        let matched = macs.iter().fold(false, |ok, mac| {
            hmac::verify(&self.key, &message, mac).is_ok() | ok
        });
        if matched {
            Ok(())
        } else {
            Err("no v1 matches")
        }
    }
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HmacKey(***)")
    }
}

/// The WeChat Pay APIv3 key (AES-256-GCM).
pub struct ApiV3Key {
    key: LessSafeKey,
}

impl ApiV3Key {
    pub fn new(key: &[u8]) -> Result<Self, CryptoError> {
        if key.len() != 32 {
            return Err(CryptoError::ApiV3KeyLength);
        }
        let key = UnboundKey::new(&AES_256_GCM, key).map_err(|_| CryptoError::ApiV3KeyLength)?;
        Ok(Self {
            key: LessSafeKey::new(key),
        })
    }

    /// base64 of ciphertext ‖ tag; `nonce` must be 12 bytes and fresh for every message.
    pub fn seal_base64(&self, nonce: &str, associated_data: &str, plaintext: &[u8]) -> String {
        let nonce = Nonce::try_assume_unique_for_key(nonce.as_bytes())
            .expect("a 12-byte nonce (the caller draws it with `random_token(12)`)");
        let mut in_out = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(nonce, Aad::from(associated_data.as_bytes()), &mut in_out)
            .expect("AES-GCM sealing of a callback-sized message");
        STANDARD.encode(in_out)
    }

    /// The plaintext of base64 ciphertext ‖ tag, if it authenticates.
    pub fn open_base64(
        &self,
        nonce: &str,
        associated_data: &str,
        ciphertext_b64: &str,
    ) -> Option<Vec<u8>> {
        let nonce = Nonce::try_assume_unique_for_key(nonce.as_bytes()).ok()?;
        let mut in_out = STANDARD.decode(ciphertext_b64).ok()?;
        let len = self
            .key
            .open_in_place(nonce, Aad::from(associated_data.as_bytes()), &mut in_out)
            .ok()?
            .len();
        in_out.truncate(len);
        Some(in_out)
    }
}

impl fmt::Debug for ApiV3Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiV3Key(***)")
    }
}

/// `len` random characters of `[0-9A-Za-z]` (nonces, notification ids, QR tokens).
pub fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut bytes = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source");
    // 256 = 4 * 62 + 8: the bias toward the first 8 characters is harmless for test ids.
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

/// `len` random decimal digits (trade numbers look like Alipay's and WeChat's).
pub fn random_digits(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source");
    bytes.iter().map(|b| char::from(b'0' + b % 10)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MERCHANT_PKCS8: &str =
        include_str!("../../gateway/tests/fixtures/keys/test-only-merchant-rsa2048.pkcs8.pem");
    const MERCHANT_SPKI: &str =
        include_str!("../../gateway/tests/fixtures/keys/test-only-merchant-rsa2048.spki.pem");
    const PLATFORM_PKCS1: &str =
        include_str!("../../gateway/tests/fixtures/keys/test-only-platform-rsa2048.pkcs1.pem");

    #[test]
    fn matches_the_gateway_openssl_vectors() {
        // The Alipay request vector of gateway/src/channels/alipay.rs (openssl-made).
        const CONTENT: &str = r#"app_id=2021000000000001&biz_content={"out_trade_no":"att_01HX7Z3K9Q2W","total_amount":"88.88","subject":"Top-up 充值 & more","timeout_express":"15m"}&charset=utf-8&format=JSON&method=alipay.trade.precreate&notify_url=https://gateway.example.com/v1/callbacks/alipay/ali-main&sign_type=RSA2&timestamp=2024-05-01 20:00:00&version=1.0"#;
        const SIGN: &str = "G5j4o5lZe1O6gULXgPe3H7dYvgF4a5SI5Qb75TFINzD9SvH9Zk49bBdBxJf5o2w8J97suYWCNSIrDFg6pA7s63/QoP0mtBkuAx5Q++i/JccRBE7Qr0CNa/UuEJ5K5nMGpZh9YTANwDQVxQnCkIOWE3ARbZrZNVx1olAUcfzFAHVwIzMcmY6F3MUHE3E4PGoYA++xDJKFAIZLObfPjvn5JSzGznMar2fo/5R7E4TlRCTRRUIPesaCpNIkazevevua+G9l9ILSCNz+uXgRissyV1/vlO9vQblrjG/lzaT017lvoGPVUGnsZiejfGkv/9ATgBDf1FRE0jX/CbKVicWOew==";
        let signer = RsaSigner::from_pem(MERCHANT_PKCS8).unwrap();
        assert_eq!(signer.sign_base64(CONTENT.as_bytes()), SIGN);
        let verifier = RsaVerifier::from_pem(MERCHANT_SPKI).unwrap();
        assert!(verifier.verify_base64(CONTENT.as_bytes(), SIGN));
        assert!(!verifier.verify_base64(b"other", SIGN));
        let platform = RsaSigner::from_pem(PLATFORM_PKCS1).unwrap();
        assert!(!verifier.verify_base64(
            CONTENT.as_bytes(),
            &platform.sign_base64(CONTENT.as_bytes())
        ));

        // The supplier vector of gateway/src/channels/supplier.rs.
        let key = HmacKey::new(b"whsec_test_only_supplier_0123456789").unwrap();
        let body = br#"{"order_id":"att_01HX7Z3K9Q2W","supplier_order_id":"S-20240501-0001","status":"succeeded","amount":"88.88","currency":"CNY"}"#;
        let header =
            "t=1714564800,v1=c1088142207d0ca2ace275480ffe0ca46d0fb1264876b7719593537b25cc4cae";
        assert_eq!(key.signature_header(1714564800, body), header);
        assert_eq!(key.verify_header(header, body, 1714564900, 300), Ok(()));
        assert!(key.verify_header(header, body, 1714565101, 300).is_err());
        assert!(key.verify_header(header, b"{}", 1714564800, 300).is_err());
        assert!(key
            .verify_header("t=1714564800", body, 1714564800, 300)
            .is_err());

        // The AES-GCM vector of gateway/src/channels/wechatpay.rs (python `cryptography`).
        let apiv3 = ApiV3Key::new(b"TestOnlyApiV3Key0123456789abcdef").unwrap();
        const PLAINTEXT: &str = r#"{"mchid":"1900000109","appid":"wxd678efh567hg6787","out_trade_no":"att_01HX7Z3K9Q2W","transaction_id":"4200000000202405010000000001","trade_state":"SUCCESS","amount":{"total":8888,"currency":"CNY","payer_total":8888,"payer_currency":"CNY"}}"#;
        const CIPHERTEXT: &str = "nD4EKhVPEEaI2FOGr3qU0PRiXJ2cIC9aobLiQD2t0jzOl6MJZlol0DsGHrndtER/g6WpIkoavhob4JUU3DIDYWC250ppMgfNd1yHbYa6wirlcKWnWFyGZdMIG9vbrKSE5sNtz0Zl9l14zGh/xTXdm/KapGiGdMDcRIcWTKlCENB2CADlyW0dHWRJeFb3nHtVJzUZIm2yTjamlIsxhZ5mOA4MxQ862wNTUW60BEBb69OrwWQJ3WsH7RpFfMt1L1IkGXbKGyanukyN95kSwVd9Aw5Jx6dlDggt/8aKQLlIz7JE44azsuqPCkfwi7Vq6SsVrfC78wQOU9LhHo/+ybQhZg==";
        assert_eq!(
            apiv3.seal_base64("fdasflkja484", "transaction", PLAINTEXT.as_bytes()),
            CIPHERTEXT
        );
        assert_eq!(
            apiv3
                .open_base64("fdasflkja484", "transaction", CIPHERTEXT)
                .unwrap(),
            PLAINTEXT.as_bytes()
        );
        assert!(apiv3
            .open_base64("fdasflkja484", "other", CIPHERTEXT)
            .is_none());
    }

    #[test]
    fn refuses_bad_keys_without_showing_them() {
        assert!(matches!(
            RsaSigner::from_pem(MERCHANT_SPKI),
            Err(CryptoError::UnsupportedLabel(_))
        ));
        assert!(RsaVerifier::from_pem("garbage").is_err());
        assert!(ApiV3Key::new(b"short").is_err());
        assert!(HmacKey::new(b"short").is_err());
        let signer = RsaSigner::from_pem(PLATFORM_PKCS1).unwrap();
        assert_eq!(format!("{signer:?}"), "RsaSigner(***)");
        assert_eq!(random_token(12).len(), 12);
        assert!(random_digits(28).bytes().all(|b| b.is_ascii_digit()));
    }
}
