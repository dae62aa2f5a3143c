//! The payment core: every decision about money, behind typed inputs and typed outcomes.
//!
//! - `create`: a new payment or top-up, with the balance path (capture, committed before the
//!   answer) and the channel path (intent, then `checkout`'s attempts) as separate functions;
//! - `checkout`: the attempts of a channel payment against its route;
//! - `callbacks`: what a verified channel notice decides (the state machine's entry from the
//!   channels' side), `resolution`: the same decisions reached by asking the channel, plus
//!   cancel and late money;
//! - `refunds`: reserving, recording and executing refunds;
//! - `accounts`: accounts and the admin's adjustments;
//! - `view`: payments as clients read them, from the balance store or the record.
//!
//! It never sees HTTP: `api/` parses and authenticates, calls one function here and maps its
//! outcome (`PaymentError` among them) to an answer. The stores are reached only from here.

pub mod accounts;
pub mod callbacks;
pub mod checkout;
pub mod create;
mod error;
pub mod refunds;
pub mod resolution;
pub mod view;

pub use error::{Missing, PaymentError, Unavailable};

use serde_json::Value;

/// The digest an idempotency record keeps: the route and the *normalized* request (parsed
/// values, keys sorted), so whitespace or key order never makes a retry look different, while
/// any change of meaning does.
pub(crate) fn request_hash(route: &str, normalized: &Value) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(route.as_bytes());
    hasher.update(b"\n");
    // serde_json's Map is ordered by key: the serialization is canonical.
    hasher.update(normalized.to_string().as_bytes());
    hex::encode(&hasher.finalize()[..16])
}
