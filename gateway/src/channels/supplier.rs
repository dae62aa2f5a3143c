//! The HMAC-JSON supplier protocol (DESIGN.md §5): the `X-Signature` header, in both
//! directions (our requests to the supplier, the supplier's callbacks to us).
//!
//! `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, refused more
//! than 300 s from `now` either way.
//!
//! Parsing is strict: comma-separated `name=value` items, no spaces, only the names `t`
//! (exactly once, decimal digits) and `v1` (64 hex digits, either case). **Several `v1` are
//! allowed**, up to [`MAX_V1_SIGNATURES`], and the header is accepted when any of them
//! matches: that is how a sender rotates the shared secret without a flag day — during the
//! switch it signs with the old and the new secret, and each receiver accepts whichever it
//! has. Accepting several costs nothing in strength (each is a full HMAC that only a holder
//! of the secret can make), and the bound keeps the work per header fixed. Anything else
//! (another version, a repeated `t`, an empty item) is refused as malformed, so a future
//! scheme is introduced deliberately rather than silently ignored.

use std::fmt;

use aws_lc_rs::hmac;
use subtle::ConstantTimeEq;

use super::{skew_seconds, SIGNATURE_WINDOW_SECONDS};
use crate::secret::Secret;

/// The header's name.
pub const HEADER_NAME: &str = "X-Signature";

/// The most `v1` signatures one header may carry (see the module doc).
pub const MAX_V1_SIGNATURES: usize = 4;

/// The shortest shared secret accepted: 16 bytes (128 bits if random).
pub const MIN_SECRET_BYTES: usize = 16;

const MAC_BYTES: usize = 32;

/// Why an `X-Signature` was refused. No variant carries header text: callers log these, and
/// the header is the sender's to choose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupplierSignatureError {
    #[error("malformed X-Signature: {0}")]
    Malformed(&'static str),
    #[error(
        "X-Signature timestamp is {skew_seconds} s from now (at most {SIGNATURE_WINDOW_SECONDS})"
    )]
    OutsideWindow { skew_seconds: u64 },
    #[error("no X-Signature v1 matches")]
    BadSignature,
}

/// The shared secret was shorter than [`MIN_SECRET_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the supplier secret must be at least {MIN_SECRET_BYTES} bytes")]
pub struct WeakSupplierSecret;

/// A supplier's shared secret, ready for HMAC-SHA256. The HMAC key is the secret's UTF-8
/// bytes as configured (what `openssl dgst -sha256 -hmac <secret>` uses), not a hex decoding.
pub struct SupplierKey {
    key: hmac::Key,
}

impl SupplierKey {
    pub fn new(secret: &Secret) -> Result<Self, WeakSupplierSecret> {
        let bytes = secret.expose().as_bytes();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(WeakSupplierSecret);
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    /// HMAC-SHA256 over `"<t>.<body>"`, `t` as its decimal text.
    fn mac(&self, timestamp_text: &str, body: &[u8]) -> hmac::Tag {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(timestamp_text.as_bytes());
        context.update(b".");
        context.update(body);
        context.sign()
    }
}

impl fmt::Debug for SupplierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SupplierKey(***)")
    }
}

/// The `X-Signature` value for `body` sent at `timestamp_unix_seconds`.
pub fn signature_header(key: &SupplierKey, timestamp_unix_seconds: u64, body: &[u8]) -> String {
    let timestamp_text = timestamp_unix_seconds.to_string();
    let mac = key.mac(&timestamp_text, body);
    format!("t={timestamp_text},v1={}", hex::encode(mac.as_ref()))
}

/// Verifies an `X-Signature` value (as the HTTP layer hands it over, surrounding whitespace
/// already trimmed) for `body`: strict parse, then the window around `now_unix_seconds`, then
/// a constant-time comparison with each `v1`.
pub fn verify(
    key: &SupplierKey,
    header: &str,
    body: &[u8],
    now_unix_seconds: u64,
) -> Result<(), SupplierSignatureError> {
    let parsed = parse_header(header)?;
    let skew = skew_seconds(parsed.timestamp, now_unix_seconds);
    if skew > SIGNATURE_WINDOW_SECONDS {
        return Err(SupplierSignatureError::OutsideWindow { skew_seconds: skew });
    }
    // The MAC covers the timestamp's text as sent, so what was signed is what was checked.
    let expected = key.mac(parsed.timestamp_text, body);
    let mut matched = subtle::Choice::from(0u8);
    // Every candidate is compared, so the time taken depends on their number only.
    for candidate in &parsed.v1[..parsed.v1_count] {
        matched |= expected.as_ref().ct_eq(&candidate[..]);
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(SupplierSignatureError::BadSignature)
    }
}

struct ParsedHeader<'a> {
    timestamp_text: &'a str,
    timestamp: u64,
    v1: [[u8; MAC_BYTES]; MAX_V1_SIGNATURES],
    v1_count: usize,
}

fn parse_header(header: &str) -> Result<ParsedHeader<'_>, SupplierSignatureError> {
    use SupplierSignatureError::Malformed;
    let mut timestamp_text = None;
    let mut v1 = [[0u8; MAC_BYTES]; MAX_V1_SIGNATURES];
    let mut v1_count = 0;
    for item in header.split(',') {
        let (name, value) = item
            .split_once('=')
            .ok_or(Malformed("an item is not name=value"))?;
        match name {
            "t" => {
                if timestamp_text.is_some() {
                    return Err(Malformed("t appears more than once"));
                }
                timestamp_text = Some(value);
            }
            "v1" => {
                if v1_count == MAX_V1_SIGNATURES {
                    return Err(Malformed("too many v1"));
                }
                // `decode_to_slice` also requires exactly 64 hex digits.
                hex::decode_to_slice(value, &mut v1[v1_count])
                    .map_err(|_| Malformed("v1 is not 64 hex digits"))?;
                v1_count += 1;
            }
            _ => return Err(Malformed("unknown item (only t and v1)")),
        }
    }
    let timestamp_text = timestamp_text.ok_or(Malformed("no t"))?;
    if v1_count == 0 {
        return Err(Malformed("no v1"));
    }
    if timestamp_text.is_empty()
        || timestamp_text.len() > 19
        || !timestamp_text.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Malformed("t is not unix seconds"));
    }
    let timestamp = timestamp_text
        .parse()
        .map_err(|_| Malformed("t is not unix seconds"))?;
    Ok(ParsedHeader {
        timestamp_text,
        timestamp,
        v1,
        v1_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Independent vector: printed by scripts/gen-signature-vectors.sh with
    // `printf '%s.%s' "$t" "$body" | openssl dgst -sha256 -hmac "$secret"`.
    const SECRET: &str = "whsec_test_only_supplier_0123456789";
    const TIMESTAMP: u64 = 1714564800;
    const BODY: &str = r#"{"order_id":"att_01HX7Z3K9Q2W","supplier_order_id":"S-20240501-0001","status":"succeeded","amount":"88.88","currency":"CNY"}"#;
    const HEADER: &str =
        "t=1714564800,v1=c1088142207d0ca2ace275480ffe0ca46d0fb1264876b7719593537b25cc4cae";

    fn key() -> SupplierKey {
        SupplierKey::new(&Secret::new(SECRET)).unwrap()
    }

    fn other_mac() -> String {
        let other = SupplierKey::new(&Secret::new("whsec_test_only_supplier_OLD_0000")).unwrap();
        let header = signature_header(&other, TIMESTAMP, BODY.as_bytes());
        header.split_once(",v1=").unwrap().1.to_owned()
    }

    #[test]
    fn matches_the_openssl_vector() {
        assert_eq!(signature_header(&key(), TIMESTAMP, BODY.as_bytes()), HEADER);
        assert_eq!(
            verify(&key(), HEADER, BODY.as_bytes(), TIMESTAMP + 5),
            Ok(())
        );
        let mac = HEADER.split_once(",v1=").unwrap().1;
        let upper = format!("t={TIMESTAMP},v1={}", mac.to_uppercase());
        assert_eq!(
            verify(&key(), &upper, BODY.as_bytes(), TIMESTAMP),
            Ok(()),
            "upper-case hex is accepted"
        );
    }

    #[test]
    fn refuses_outside_the_300_second_window() {
        let body = BODY.as_bytes();
        for now in [TIMESTAMP - 300, TIMESTAMP + 300] {
            assert_eq!(verify(&key(), HEADER, body, now), Ok(()));
        }
        assert_eq!(
            verify(&key(), HEADER, body, TIMESTAMP + 301),
            Err(SupplierSignatureError::OutsideWindow { skew_seconds: 301 })
        );
        assert_eq!(
            verify(&key(), HEADER, body, TIMESTAMP - 301),
            Err(SupplierSignatureError::OutsideWindow { skew_seconds: 301 })
        );
    }

    #[test]
    fn refuses_bad_signatures() {
        let body = BODY.as_bytes();
        let tampered = BODY.replace("88.88", "888.8");
        assert_eq!(
            verify(&key(), HEADER, tampered.as_bytes(), TIMESTAMP),
            Err(SupplierSignatureError::BadSignature)
        );
        // The same MAC with another timestamp: the timestamp is signed.
        let moved = HEADER.replace("t=1714564800", "t=1714564801");
        assert_eq!(
            verify(&key(), &moved, body, TIMESTAMP),
            Err(SupplierSignatureError::BadSignature)
        );
        let wrong_key = format!("t={TIMESTAMP},v1={}", other_mac());
        assert_eq!(
            verify(&key(), &wrong_key, body, TIMESTAMP),
            Err(SupplierSignatureError::BadSignature)
        );
    }

    #[test]
    fn any_of_several_v1_may_match() {
        let body = BODY.as_bytes();
        let good = HEADER.split_once(",v1=").unwrap().1;
        let old = other_mac();
        for header in [
            format!("t={TIMESTAMP},v1={old},v1={good}"),
            format!("v1={good},t={TIMESTAMP},v1={old}"),
        ] {
            assert_eq!(verify(&key(), &header, body, TIMESTAMP), Ok(()), "{header}");
        }
        let neither = format!("t={TIMESTAMP},v1={old},v1={old}");
        assert_eq!(
            verify(&key(), &neither, body, TIMESTAMP),
            Err(SupplierSignatureError::BadSignature)
        );
        let four = format!("t={TIMESTAMP},v1={old},v1={old},v1={old},v1={good}");
        assert_eq!(verify(&key(), &four, body, TIMESTAMP), Ok(()));
        let five = format!("t={TIMESTAMP},v1={old},v1={old},v1={old},v1={old},v1={good}");
        assert!(matches!(
            verify(&key(), &five, body, TIMESTAMP),
            Err(SupplierSignatureError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_malformed_headers() {
        let mac = HEADER.split_once(",v1=").unwrap().1;
        for header in [
            String::new(),
            "t=1714564800".to_owned(),
            format!("v1={mac}"),
            format!("t=1714564800,t=1714564800,v1={mac}"),
            format!("t=,v1={mac}"),
            format!("t=+1714564800,v1={mac}"),
            format!("t=1714564800.5,v1={mac}"),
            format!("t=99999999999999999999,v1={mac}"),
            format!("t=1714564800, v1={mac}"),
            format!(" t=1714564800,v1={mac}"),
            format!("t=1714564800,v1={mac},"),
            format!("t=1714564800;v1={mac}"),
            format!("t=1714564800,v0={mac}"),
            format!("t=1714564800,V1={mac}"),
            format!("t=1714564800,v1={}", &mac[..62]),
            format!("t=1714564800,v1={mac}00"),
            format!("t=1714564800,v1={}", "zz".repeat(32)),
            "t=1714564800,v1".to_owned(),
        ] {
            assert!(
                matches!(
                    verify(&key(), &header, BODY.as_bytes(), TIMESTAMP),
                    Err(SupplierSignatureError::Malformed(_))
                ),
                "{header:?}"
            );
        }
    }

    #[test]
    fn refuses_weak_secrets_and_never_prints_them() {
        assert_eq!(
            SupplierKey::new(&Secret::new("short")).unwrap_err(),
            WeakSupplierSecret
        );
        assert_eq!(format!("{:?}", key()), "SupplierKey(***)");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn sign_verify_round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            timestamp in 0u64..4_000_000_000,
            skew in 0u64..=300,
            later: bool,
        ) {
            let header = signature_header(&key(), timestamp, &body);
            let now = if later { timestamp + skew } else { timestamp.saturating_sub(skew) };
            prop_assert_eq!(verify(&key(), &header, &body, now), Ok(()));
        }

        #[test]
        fn tampering_with_body_or_mac_fails(
            index in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            in_mac: bool,
        ) {
            let mut body = BODY.as_bytes().to_vec();
            let mut mac = hex::decode(HEADER.split_once(",v1=").unwrap().1).unwrap();
            let target = if in_mac { &mut mac } else { &mut body };
            let at = index.index(target.len());
            target[at] ^= flip;
            let header = format!("t={TIMESTAMP},v1={}", hex::encode(&mac));
            prop_assert_eq!(
                verify(&key(), &header, &body, TIMESTAMP),
                Err(SupplierSignatureError::BadSignature)
            );
        }
    }
}
