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

pub use error::{Missing, PaymentError, ResolveError, Unavailable};

use crate::ids::ScopeTag;
use crate::preauth::{IdempotencyClaim, StoredOutcome};
use crate::settlement::RefusalRow;
use crate::state::Core;

/// A refusal that is a key's first answer (`402`): kept in the store with the next group
/// commit, not waited for, so its replay survives a lost Redis (`recovery::restore_keys`).
pub(crate) fn keep_refusal(
    core: &Core,
    tag: ScopeTag,
    claim: &IdempotencyClaim,
    outcome: StoredOutcome,
    created_at_ms: u64,
) {
    core.settler.record_refusal_later(RefusalRow {
        scope_tag: tag.to_string(),
        idempotency_key: claim.key.as_str().to_owned(),
        request_hash: claim.request_hash.clone(),
        outcome: outcome.encode(),
        created_at_ms,
    });
}

/// The digest an idempotency record keeps: the route and the *normalized* request (parsed
/// values, keys sorted), so whitespace or key order never makes a retry look different, while
/// any change of meaning does.
///
/// `normalized` is written as compact JSON straight into the digest. Keys must come out
/// sorted, as a `serde_json::Map` orders them (the hashes already kept were made that way):
/// a struct declares its fields in byte order of their names.
pub(crate) fn request_hash(route: &str, normalized: &impl serde::Serialize) -> String {
    use sha2::{Digest, Sha256};

    /// The digest as an `io::Write`, so the JSON is never held as a string.
    struct Hashing(Sha256);

    impl std::io::Write for Hashing {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.update(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let mut hasher = Hashing(Sha256::new());
    hasher.0.update(route.as_bytes());
    hasher.0.update(b"\n");
    serde_json::to_writer(&mut hasher, normalized).expect("a normalized request serializes");
    hex::encode(&hasher.0.finalize()[..16])
}

/// Whether both stores answer and the settlement stream is healthy; else why not (`/readyz`).
pub async fn readiness(core: &Core) -> Result<(), Unavailable> {
    if let Err(err) = core.balances.ping().await {
        tracing::warn!(error = %err, "readiness: balance store unreachable");
        return Err(Unavailable::BalanceStore);
    }
    if let Err(err) = core.settler.store.ping().await {
        tracing::warn!(error = %err, "readiness: settlement store unreachable");
        return Err(Unavailable::SettlementStore);
    }
    if !core.settler.is_healthy() {
        return Err(Unavailable::SettlementStore);
    }
    Ok(())
}
