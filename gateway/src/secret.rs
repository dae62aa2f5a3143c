//! Secrets: a wrapper whose `Debug` and `Display` never show the value, and constant-time
//! comparison of key digests. Configuration holds API keys only as SHA-256 digests.

use std::fmt;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A secret string (webhook secret, API key in transit). Read it with `expose()`, on purpose.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The SHA-256 digest of an API key: what configuration stores and what requests are matched
/// against.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses 64 hex characters (either case).
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Constant-time equality: the time taken does not depend on where the digests differ.
    pub fn ct_eq(&self, other: &KeyDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A digest is not the key, but there is no reason to print it either.
        f.write_str("KeyDigest(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("whsec_test_alpha");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "whsec_test_alpha");
        assert!(!format!("{:?}", KeyDigest::of("sk_test_alpha")).contains("sk_test"));
    }

    #[test]
    fn digests_round_trip_and_compare() {
        let d = KeyDigest::of("sk_test_alpha");
        // Independent vector: `printf sk_test_alpha | sha256sum`.
        assert_eq!(
            d.to_hex(),
            "b1122a016a166ad1216c6e57143d2ce670b2891f209ce6e543994cc870ba0444"
        );
        assert_eq!(KeyDigest::from_hex(&d.to_hex()), Some(d));
        assert!(d.ct_eq(&KeyDigest::of("sk_test_alpha")));
        assert!(!d.ct_eq(&KeyDigest::of("sk_test_alphb")));
        assert_eq!(KeyDigest::from_hex("zz"), None);
        assert_eq!(KeyDigest::from_hex(&"0".repeat(63)), None);
    }
}
