//! The webhook signature (docs/webhooks.md), the same scheme the supplier protocol uses
//! (DESIGN.md §5): `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! The HMAC key is the merchant's `webhook_secret` as configured (its UTF-8 bytes).

use aws_lc_rs::hmac;

/// A merchant's webhook secret, ready for HMAC-SHA256. `Debug` never shows it.
pub struct WebhookKey(hmac::Key);

impl WebhookKey {
    pub fn new(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    fn mac(&self, timestamp_text: &str, body: &[u8]) -> hmac::Tag {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(timestamp_text.as_bytes());
        context.update(b".");
        context.update(body);
        context.sign()
    }

    /// The `X-Signature` value for `body` sent at `timestamp_unix_seconds`.
    pub fn signature_header(&self, timestamp_unix_seconds: u64, body: &[u8]) -> String {
        let timestamp_text = timestamp_unix_seconds.to_string();
        let mac = self.mac(&timestamp_text, body);
        format!("t={timestamp_text},v1={}", hex::encode(mac.as_ref()))
    }

    /// What a receiver does (and what the docs show): parse `t` and every `v1`, refuse a `t`
    /// more than `tolerance_seconds` from `now_unix_seconds`, and compare each `v1` in constant
    /// time. `true` when one matches.
    pub fn verify(
        &self,
        header: &str,
        body: &[u8],
        now_unix_seconds: u64,
        tolerance_seconds: u64,
    ) -> bool {
        let mut timestamp = None;
        let mut candidates = Vec::new();
        // Bounded: a header has a handful of parts.
        for part in header.split(',').take(16) {
            match part.trim().split_once('=') {
                Some(("t", v)) => timestamp = Some(v),
                Some(("v1", v)) => candidates.push(v),
                _ => {}
            }
        }
        let Some(timestamp_text) = timestamp else {
            return false;
        };
        let Ok(t) = timestamp_text.parse::<u64>() else {
            return false;
        };
        if t.abs_diff(now_unix_seconds) > tolerance_seconds {
            return false;
        }
        let mut message = Vec::with_capacity(timestamp_text.len() + 1 + body.len());
        message.extend_from_slice(timestamp_text.as_bytes());
        message.push(b'.');
        message.extend_from_slice(body);
        // `hmac::verify` compares in constant time.
        candidates.into_iter().any(|v1| {
            hex::decode(v1).is_ok_and(|tag| hmac::verify(&self.0, &message, &tag).is_ok())
        })
    }
}

impl std::fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookKey(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_documented_example() {
        // docs/webhooks.md: printf '%s.%s' 1714565700 '{"id":"evt_1"}' |
        //   openssl dgst -sha256 -hmac whsec_test_alpha
        let key = WebhookKey::new(b"whsec_test_alpha");
        let header = key.signature_header(1_714_565_700, br#"{"id":"evt_1"}"#);
        assert_eq!(
            header,
            "t=1714565700,v1=385661195eefd7da699706ec87b27594eb8d75c43a8216e72e5950e6abde92b9"
        );
        assert!(key.verify(&header, br#"{"id":"evt_1"}"#, 1_714_565_700, 300));
    }

    #[test]
    fn verification_refuses_other_bodies_keys_times_and_garbage() {
        let key = WebhookKey::new(b"whsec_test_alpha");
        let body = br#"{"id":"evt_1"}"#;
        let header = key.signature_header(1_000, body);
        assert!(key.verify(&header, body, 1_300, 300));
        assert!(!key.verify(&header, body, 1_301, 300), "stale");
        assert!(!key.verify(&header, br#"{"id":"evt_2"}"#, 1_000, 300));
        assert!(!WebhookKey::new(b"whsec_test_beta").verify(&header, body, 1_000, 300));
        for bad in ["", "t=1000", "v1=00", "t=x,v1=00", "t=1000,v1=zz"] {
            assert!(!key.verify(bad, body, 1_000, 300), "{bad}");
        }
        // Several v1 (a secret rotation): one matching is enough.
        let v1 = header.split("v1=").nth(1).unwrap();
        assert!(key.verify(&format!("t=1000,v1=00,v1={v1}"), body, 1_000, 300));
    }
}
