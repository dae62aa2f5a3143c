//! The payment channels (DESIGN.md §5), one file per protocol.
//!
//! So far this holds the **signature layer** of each protocol: building the exact text each
//! channel signs, signing it, and verifying what comes back, with the refusals each protocol
//! requires (timestamp windows, probe signatures, unknown key serials). The HTTP adapters and
//! the channel simulator are built on top of it.
//!
//! - [`keys`]: RSA keys (aws-lc-rs) loaded from PEM text, files or environment variables;
//!   RSA-SHA256 (PKCS#1 v1.5) sign and verify; key generation.
//! - [`alipay`]: Alipay open platform RSA2: request signing strings, callback verification,
//!   and the verification of a reply's signed response object.
//! - [`wechatpay`]: WeChat Pay API v3: request signatures and the `Authorization` header,
//!   reply/callback verification against the platform key named by its serial, and
//!   AEAD_AES_256_GCM callback resources.
//! - [`supplier`]: the HMAC-JSON supplier protocol's `X-Signature` header.
//!
//! Every function that checks a time window takes `now` as an argument, so tests (and
//! replays of recorded traffic) choose the clock.
//!
//! The signatures are tested against fixed vectors produced by another implementation
//! (`scripts/gen-signature-vectors.sh`: the `openssl` CLI and python's `cryptography`), with
//! the test-only keys in `gateway/tests/fixtures/keys/`.

pub mod alipay;
pub mod keys;
pub mod supplier;
pub mod wechatpay;

/// The signature window of the protocols that have one (WeChat Pay's "5 minutes", the
/// supplier's 300 s): a signed timestamp further than this from `now`, either way, is refused.
pub const SIGNATURE_WINDOW_SECONDS: u64 = 300;

/// `|now - timestamp|` in seconds, without overflow.
pub(crate) fn skew_seconds(timestamp_unix_seconds: u64, now_unix_seconds: u64) -> u64 {
    timestamp_unix_seconds.abs_diff(now_unix_seconds)
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
