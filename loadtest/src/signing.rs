//! The supplier protocol's request signature (DESIGN.md §5), as the baseline proxy needs it:
//! `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//!
//! Written here rather than borrowed from the gateway: the load generator depends on no
//! library of the system it measures. channel-sim checks every signature with its own
//! implementation, so a mistake here shows as `401 bad signature`, never as a silent pass.

use std::fmt;

use aws_lc_rs::hmac;

use crate::manifest::Secret;

/// The header's name.
pub const HEADER_NAME: &str = "x-signature";

/// The shortest secret channel-sim and the gateway accept.
pub const MIN_SECRET_BYTES: usize = 16;

/// A supplier channel's shared secret, ready for HMAC-SHA256. The key is the secret's UTF-8
/// bytes as written in its file (trailing whitespace removed by the caller), which is what
/// `openssl dgst -sha256 -hmac <secret>` uses.
pub struct SupplierSigner {
    key: hmac::Key,
}

impl SupplierSigner {
    /// `None` when the secret is shorter than [`MIN_SECRET_BYTES`].
    pub fn new(secret: &Secret) -> Option<Self> {
        let bytes = secret.expose().as_bytes();
        (bytes.len() >= MIN_SECRET_BYTES).then(|| Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    /// The `X-Signature` value for `body` sent at `unix_seconds`.
    pub fn header(&self, unix_seconds: u64, body: &[u8]) -> String {
        let timestamp = unix_seconds.to_string();
        let mut context = hmac::Context::with_key(&self.key);
        context.update(timestamp.as_bytes());
        context.update(b".");
        context.update(body);
        let tag = context.sign();
        let mut header = String::with_capacity(timestamp.len() + 8 + 2 * tag.as_ref().len());
        header.push_str("t=");
        header.push_str(&timestamp);
        header.push_str(",v1=");
        push_hex(&mut header, tag.as_ref());
        header
    }
}

impl fmt::Debug for SupplierSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SupplierSigner(***)")
    }
}

/// Lower-case hex, as the protocol's examples write it.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "loadtest-test-secret-0123456789";
    const BODY: &str = r#"{"order_id":"b-1","amount":"1.00"}"#;

    /// The vector was made outside this code:
    /// `printf '%s' '1700000000.{"order_id":"b-1","amount":"1.00"}' |
    ///  openssl dgst -sha256 -hmac 'loadtest-test-secret-0123456789'`.
    #[test]
    fn the_signature_matches_openssl() {
        let signer = SupplierSigner::new(&Secret::new(SECRET)).unwrap();
        assert_eq!(
            signer.header(1_700_000_000, BODY.as_bytes()),
            "t=1700000000,v1=b31ad11b787ba5966e5610c034f4d35c65b3bf89fae9e1108cb947049e92f40a"
        );
    }

    #[test]
    fn the_timestamp_and_the_body_are_both_signed() {
        let signer = SupplierSigner::new(&Secret::new(SECRET)).unwrap();
        let base = signer.header(1_700_000_000, BODY.as_bytes());
        let later = signer.header(1_700_000_001, BODY.as_bytes());
        let other = signer.header(1_700_000_000, br#"{"order_id":"b-2","amount":"1.00"}"#);
        let mac = |h: &str| h.split_once(",v1=").unwrap().1.to_owned();
        assert_ne!(mac(&base), mac(&later));
        assert_ne!(mac(&base), mac(&other));
        assert_eq!(mac(&base).len(), 64);
    }

    #[test]
    fn short_secrets_are_refused_and_never_printed() {
        assert!(SupplierSigner::new(&Secret::new("fifteen-bytes!!")).is_none());
        let signer = SupplierSigner::new(&Secret::new(SECRET)).unwrap();
        assert!(!format!("{signer:?}").contains(SECRET));
    }
}
