//! Identifiers: parsed once at the edge into newtypes, so the inside never sees an
//! unchecked id. Also the scope tag (DESIGN.md §3): a fixed-length digest of (merchant,
//! account) — or of the merchant alone for payments without an account — that every Redis key
//! of one scope carries as its hash tag, and that every payment id ends with, so any route can
//! find a payment's keys without a lookup and every script stays single-slot.

use std::fmt;

use sha2::{Digest, Sha256};

/// Base62 in ASCII order (`0-9`, `A-Z`, `a-z`), so fixed-width encodings sort like numbers.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Longest merchant or account id (DESIGN.md §3: `[A-Za-z0-9_-]{1,64}`).
pub const MAX_ID_CHARS: usize = 64;
/// Characters of a scope tag.
pub const TAG_CHARS: usize = 10;
/// Characters of the time part of a payment id: base62 milliseconds since the epoch
/// (62^8 ms ≈ 6,900 years, so the width never changes and ids sort by creation time).
const TIME_CHARS: usize = 8;
/// Characters of the random part of a payment id (≈ 47 bits per millisecond and scope).
const RANDOM_CHARS: usize = 8;
const PAYMENT_PREFIX: &str = "pay_";
const ADJUSTMENT_PREFIX: &str = "adj_";

/// Why an id was refused; the API names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {0} characters")]
    TooLong(usize),
    #[error("may contain only {0}")]
    BadCharacter(&'static str),
}

fn check_chars(
    s: &str,
    max_chars: usize,
    allowed: fn(u8) -> bool,
    described: &'static str,
) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > max_chars {
        return Err(IdError::TooLong(max_chars));
    }
    if !s.bytes().all(allowed) {
        return Err(IdError::BadCharacter(described));
    }
    Ok(())
}

fn id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

macro_rules! simple_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Accepts `[A-Za-z0-9_-]{1,64}`.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check_chars(s, MAX_ID_CHARS, id_byte, "letters, digits, '_' and '-'")?;
                Ok(Self(s.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

simple_id!(
    /// A merchant (a storefront or distributor system) as configured.
    MerchantId
);
simple_id!(
    /// A prepaid account, unique within its merchant (another merchant's id is another account).
    AccountId
);

/// The merchant's own order number. Scoped like idempotency keys (DESIGN.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MerchantOrderId(String);

impl MerchantOrderId {
    /// Accepts `[A-Za-z0-9_.:-]`, 1 to `max_chars` characters.
    pub fn parse(s: &str, max_chars: usize) -> Result<Self, IdError> {
        check_chars(
            s,
            max_chars,
            |b| id_byte(b) || b == b'.' || b == b':',
            "letters, digits, '_', '-', '.' and ':'",
        )?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client's `Idempotency-Key`: visible ASCII (no spaces, no control characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str, max_chars: usize) -> Result<Self, IdError> {
        check_chars(
            s,
            max_chars,
            |b| b.is_ascii_graphic(),
            "visible ASCII characters",
        )?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The hash tag shared by every Redis key of one scope: 10 base62 characters of SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScopeTag([u8; TAG_CHARS]);

impl ScopeTag {
    /// The scope of an account: its holds, balance, payments, idempotency and order-id records.
    pub fn account(merchant: &MerchantId, account: &AccountId) -> Self {
        Self::digest(&[b"account", merchant.0.as_bytes(), account.0.as_bytes()])
    }

    /// The scope of a merchant's payments that have no account (alipay/wechatpay charges).
    pub fn merchant(merchant: &MerchantId) -> Self {
        Self::digest(&[b"merchant", merchant.0.as_bytes()])
    }

    fn digest(parts: &[&[u8]]) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") never collide by construction.
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let mut out = [0u8; TAG_CHARS];
        encode_base62(u64::from_be_bytes(first), &mut out);
        Self(out)
    }

    /// Exactly 10 ASCII alphanumerics (as found in a Redis key).
    pub fn parse(s: &str) -> Option<Self> {
        let bytes: [u8; TAG_CHARS] = s.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(u8::is_ascii_alphanumeric)
            .then_some(Self(bytes))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a scope tag is ASCII by construction")
    }
}

impl fmt::Display for ScopeTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Writes `value` as fixed-width base62 (most significant first), reducing modulo 62^width.
fn encode_base62(mut value: u64, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
}

/// Random bytes drawn from the operating system at once for the ids of one thread: one
/// `getrandom` call per 32 ids instead of one per id (a system call per payment, measured with
/// `perf stat` at 1000 payments/s). The bytes are the OS generator's, used once each.
const RANDOM_POOL_BYTES: usize = 256;

/// A random number from this thread's pool of the OS generator's bytes (see
/// [`RANDOM_POOL_BYTES`]): for ids, and for whatever else draws one per payment (a channel
/// ranking's tie-break, a request nonce) without a system call each.
pub(crate) fn random_u64() -> u64 {
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<([u8; RANDOM_POOL_BYTES], usize)> =
            const { RefCell::new(([0; RANDOM_POOL_BYTES], RANDOM_POOL_BYTES)) };
    }
    POOL.with(|pool| {
        let (bytes, used) = &mut *pool.borrow_mut();
        if *used + 8 > RANDOM_POOL_BYTES {
            // The OS generator failing is not an operating error we can handle: ids would
            // collide.
            getrandom::fill(bytes).expect("the operating system's random generator failed");
            *used = 0;
        }
        // Each byte serves once: `used` only moves forward until the next refill.
        let mut next = [0u8; 8];
        next.copy_from_slice(&bytes[*used..*used + 8]);
        *used += 8;
        u64::from_le_bytes(next)
    })
}

macro_rules! tagged_id {
    ($(#[$doc:meta])* $name:ident, $prefix:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            const LEN: usize = $prefix.len() + TIME_CHARS + RANDOM_CHARS + TAG_CHARS;

            /// A new id in `tag`'s scope, sortable by `now_ms`.
            pub fn generate(tag: ScopeTag, now_ms: u64) -> Self {
                let mut s = String::with_capacity(Self::LEN);
                s.push_str($prefix);
                let mut time = [0u8; TIME_CHARS];
                encode_base62(now_ms, &mut time);
                let mut random = [0u8; RANDOM_CHARS];
                encode_base62(random_u64(), &mut random);
                for part in [&time[..], &random[..], &tag.0[..]] {
                    s.push_str(std::str::from_utf8(part).expect("base62 is ASCII"));
                }
                debug_assert_eq!(s.len(), Self::LEN);
                Self(s)
            }

            /// `None` for anything that is not exactly an id of this kind (the API answers 404).
            pub fn parse(s: &str) -> Option<Self> {
                let rest = s.strip_prefix($prefix)?;
                if s.len() != Self::LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return None;
                }
                Some(Self(s.to_owned()))
            }

            /// The scope this id lives in: where its Redis keys are.
            pub fn tag(&self) -> ScopeTag {
                ScopeTag::parse(&self.0[Self::LEN - TAG_CHARS..])
                    .expect("a parsed or generated id ends with a valid tag")
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

tagged_id!(
    /// `pay_` + 8 base62 time characters + 8 random + the 10-character scope tag.
    PaymentId,
    PAYMENT_PREFIX
);
tagged_id!(
    /// `adj_` + the same shape as a payment id: a manual credit or debit.
    AdjustmentId,
    ADJUSTMENT_PREFIX
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn random_draws_cross_refills_and_never_repeat() {
        // Several pools' worth: every draw distinct (a repeat of 64 random bits would mean a
        // byte served twice).
        let draws: Vec<u64> = (0..10 * RANDOM_POOL_BYTES / 8)
            .map(|_| random_u64())
            .collect();
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert_eq!(distinct.len(), draws.len());
        assert!(draws.iter().all(|&d| d != 0));
    }

    fn m(s: &str) -> MerchantId {
        MerchantId::parse(s).unwrap()
    }
    fn a(s: &str) -> AccountId {
        AccountId::parse(s).unwrap()
    }

    #[test]
    fn ids_refuse_bad_input_with_the_reason() {
        assert_eq!(MerchantId::parse(""), Err(IdError::Empty));
        assert_eq!(AccountId::parse(&"a".repeat(65)), Err(IdError::TooLong(64)));
        assert!(AccountId::parse(&"a".repeat(64)).is_ok());
        for bad in ["a b", "a/b", "a{b}", "é", "a.b", "a\n"] {
            assert!(
                matches!(AccountId::parse(bad), Err(IdError::BadCharacter(_))),
                "{bad:?}"
            );
        }
        assert!(MerchantOrderId::parse("ord-1.2:3_x", 64).is_ok());
        assert!(MerchantOrderId::parse("ord 1", 64).is_err());
        assert_eq!(MerchantOrderId::parse("abcd", 3), Err(IdError::TooLong(3)));
        assert!(IdempotencyKey::parse("k!#$%&'()*+,-./:;<=>?@[]^_`{|}~", 255).is_ok());
        assert!(IdempotencyKey::parse("has space", 255).is_err());
        assert!(IdempotencyKey::parse("tab\t", 255).is_err());
    }

    #[test]
    fn tags_are_fixed_length_distinct_and_stable() {
        let t1 = ScopeTag::account(&m("alpha"), &a("acc1"));
        let t2 = ScopeTag::account(&m("alpha"), &a("acc2"));
        let t3 = ScopeTag::account(&m("beta"), &a("acc1"));
        let t4 = ScopeTag::merchant(&m("alpha"));
        assert_eq!(t1.as_str().len(), TAG_CHARS);
        assert_ne!(t1, t2);
        assert_ne!(t1, t3);
        assert_ne!(t1, t4);
        assert_eq!(t1, ScopeTag::account(&m("alpha"), &a("acc1")));
        // Length prefixes keep ("ab","c") apart from ("a","bc").
        assert_ne!(
            ScopeTag::account(&m("ab"), &a("c")),
            ScopeTag::account(&m("a"), &a("bc"))
        );
    }

    #[test]
    fn payment_ids_carry_their_tag_and_refuse_malformed_input() {
        let tag = ScopeTag::account(&m("alpha"), &a("acc1"));
        let id = PaymentId::generate(tag, 1_790_000_000_000);
        assert!(id.as_str().starts_with("pay_"));
        assert_eq!(id.as_str().len(), 30);
        assert_eq!(id.tag(), tag);
        assert_eq!(PaymentId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(PaymentId::parse(&id.as_str()[..29]), None);
        assert_eq!(PaymentId::parse(&format!("{}x", id.as_str())), None);
        assert_eq!(PaymentId::parse(&id.as_str().replace("pay_", "adj_")), None);
        assert_eq!(PaymentId::parse("pay_{{{{{{{{{{{{{{{{{{{{{{{{{{"), None);
        assert_eq!(PaymentId::parse(""), None);
        let adj = AdjustmentId::generate(tag, 1);
        assert!(adj.as_str().starts_with("adj_"));
        assert_eq!(adj.tag(), tag);
    }

    proptest! {
        #[test]
        fn payment_ids_sort_by_creation_time(t1 in 0u64..(1u64 << 44), t2 in 0u64..(1u64 << 44)) {
            prop_assume!(t1 < t2);
            let tag = ScopeTag::merchant(&m("alpha"));
            prop_assert!(PaymentId::generate(tag, t1) < PaymentId::generate(tag, t2));
        }

        #[test]
        fn any_valid_id_parses_and_any_other_char_is_refused(s in "[A-Za-z0-9_-]{1,64}", bad in "[^A-Za-z0-9_-]") {
            prop_assert!(AccountId::parse(&s).is_ok());
            let with_bad = format!("{}{}", &s[..s.len().min(63)], bad);
            prop_assert!(AccountId::parse(&with_bad).is_err());
        }
    }
}
