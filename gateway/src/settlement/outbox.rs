//! Compact outbox records: what the balance store keeps (Redis `u:{T}`) for a movement whose
//! full record can be rebuilt from what the balance store holds anyway.
//!
//! A balance payment's settlement and a channel payment's intent are, field for field,
//! functions of the payment's document (kept in `pd:{T}` from the same script call), its scope
//! tag, the account's sequence and the idempotency key (both kept in the outbox entry's
//! envelope), and a few values fixed at creation: the request's hash and, for an intent, when
//! its hold is due and when the resolution loop first looks. Only those few values are written
//! here: about 60 bytes instead of a 1.2 KB settlement holding a second, escaped copy of the
//! document (issue 14). [`CompactRecord::expand`] is the one function that turns them back
//! into the full record; the request path builds its own record through it too, so what
//! recovery re-drives is the very movement the request would have committed (same content
//! hash, same payment row).
//!
//! Full records ([`PendingRecord`]) stay readable: they are what every other movement writes,
//! and what a balance payment wrote before this format (a Redis outbox from the previous
//! release still settles).

use serde::{Deserialize, Serialize};

use super::{movements, PaymentRow, PendingRecord, Settlement};
use crate::ids::ScopeTag;
use crate::preauth::PaymentDoc;

/// A record that names its payment's document instead of carrying it. Serialized as
/// `{"balance_capture": {...}}` or `{"channel_intent": {...}}`: tags no [`PendingRecord`] uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CompactRecord {
    /// A `balance` payment, captured at once: its settlement with its payment row.
    BalanceCapture { request_hash: String },
    /// A channel payment's (or top-up's) intent: its pending payment row.
    ChannelIntent {
        request_hash: String,
        /// When the channel's word on its hold is due at the latest (`None`: no hold).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hold_due_ms: Option<u64>,
        /// When the resolution loop first looks at it.
        next_check_ms: u64,
    },
    /// A channel payment's success (outbox id `<payment id>#m`): its settlement, from the
    /// channel's word and the route's fee.
    ChannelSuccess {
        channel_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel_txn_id: Option<String>,
        fee_bps: u32,
        settled_at_ms: u64,
    },
}

/// What an outbox entry holds: a compact record, or a full one.
// Parsed once per entry by recovery and matched at once: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxRecord {
    Compact(CompactRecord),
    Full(PendingRecord),
}

impl OutboxRecord {
    /// Reads an outbox entry's record, compact or full.
    pub fn parse(json: &str) -> Result<Self, serde_json::Error> {
        match serde_json::from_str::<CompactRecord>(json) {
            Ok(compact) => Ok(OutboxRecord::Compact(compact)),
            Err(_) => serde_json::from_str::<PendingRecord>(json).map(OutboxRecord::Full),
        }
    }
}

impl CompactRecord {
    /// The balance payment's record (its request's hash is all it needs).
    pub fn balance_capture(request_hash: &str) -> Self {
        CompactRecord::BalanceCapture {
            request_hash: request_hash.to_owned(),
        }
    }

    /// The record of a channel payment's intent `row` (as the request path built it).
    pub fn channel_intent(row: &PaymentRow) -> Self {
        CompactRecord::ChannelIntent {
            request_hash: row.request_hash.clone().unwrap_or_default(),
            hold_due_ms: row.hold_expires_at_ms,
            next_check_ms: row.next_check_at_ms.unwrap_or(row.created_at_ms),
        }
    }

    /// The record of a channel payment's success, as `movements::channel_success` takes it.
    pub fn channel_success(
        channel_id: &str,
        channel_txn_id: Option<&str>,
        fee_bps: u32,
        settled_at_ms: u64,
    ) -> Self {
        CompactRecord::ChannelSuccess {
            channel_id: channel_id.to_owned(),
            channel_txn_id: channel_txn_id.map(str::to_owned),
            fee_bps,
            settled_at_ms,
        }
    }

    /// The payment whose document the record names, from its outbox id.
    pub fn payment_id<'a>(&self, outbox_id: &'a str) -> &'a str {
        match self {
            CompactRecord::ChannelSuccess { .. } => {
                outbox_id.strip_suffix("#m").unwrap_or(outbox_id)
            }
            _ => outbox_id,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a compact record always serializes")
    }

    /// The full record: from the payment's document as the balance store keeps it, its scope
    /// tag, and the key it was made under. A balance capture's `account_seq` is left `None`:
    /// the outbox entry (or the script's reply, on the request path) gives it.
    pub fn expand(&self, doc: &PaymentDoc, tag: ScopeTag, idempotency_key: &str) -> PendingRecord {
        match self {
            CompactRecord::BalanceCapture { request_hash } => {
                PendingRecord::Settlement(balance_capture(doc, tag, idempotency_key, request_hash))
            }
            CompactRecord::ChannelIntent {
                request_hash,
                hold_due_ms,
                next_check_ms,
            } => PendingRecord::Intent(
                movements::intent_row(doc, tag, *hold_due_ms, *next_check_ms)
                    .with_idempotency(idempotency_key, request_hash),
            ),
            CompactRecord::ChannelSuccess {
                channel_id,
                channel_txn_id,
                fee_bps,
                settled_at_ms,
            } => PendingRecord::Settlement(movements::channel_success(
                doc,
                tag,
                channel_id,
                channel_txn_id.as_deref(),
                *fee_bps,
                None,
                *settled_at_ms,
            )),
        }
    }
}

/// A balance payment's settlement with its payment row claiming its key (its sequence not yet
/// known): the one definition the request path and recovery share.
pub fn balance_capture(
    doc: &PaymentDoc,
    tag: ScopeTag,
    idempotency_key: &str,
    request_hash: &str,
) -> Settlement {
    let mut capture = movements::balance_capture(doc, tag, None, doc.created_at_ms);
    capture.payment = capture
        .payment
        .map(|row| row.with_idempotency(idempotency_key, request_hash));
    capture
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, MerchantId};
    use crate::money::Currency;
    use crate::preauth::{Method, PaymentStatus, Purpose};

    fn doc(method: Method) -> PaymentDoc {
        PaymentDoc {
            id: "pay_0000000001abcdefghij".into(),
            merchant_id: "alpha".into(),
            account_id: Some("acc".into()),
            merchant_order_id: "o-1".into(),
            amount_minor: 1_250,
            currency: Currency::parse("CNY").unwrap(),
            method,
            purpose: Purpose::Charge,
            created_at_ms: 1_765_000_000_000,
            expires_at_ms: 1_765_000_900_000,
            description: Some("a \"quoted\" card".into()),
            notify_url: None,
            metadata: None,
        }
    }

    fn tag() -> ScopeTag {
        ScopeTag::account(
            &MerchantId::parse("alpha").unwrap(),
            &AccountId::parse("acc").unwrap(),
        )
    }

    #[test]
    fn a_compact_capture_expands_to_the_request_paths_settlement() {
        let doc = doc(Method::Balance);
        let record = CompactRecord::balance_capture("0123456789abcdef0123456789abcdef");
        let json = record.to_json();
        assert!(json.len() <= 80, "{json}");
        let OutboxRecord::Compact(parsed) = OutboxRecord::parse(&json).unwrap() else {
            panic!("compact")
        };
        let PendingRecord::Settlement(expanded) = parsed.expand(&doc, tag(), "key-1") else {
            panic!("a settlement")
        };
        let direct = balance_capture(&doc, tag(), "key-1", "0123456789abcdef0123456789abcdef");
        assert_eq!(expanded, direct);
        assert_eq!(expanded.content_hash(), direct.content_hash());
        let row = expanded.payment.unwrap();
        assert_eq!(row.idempotency_key.as_deref(), Some("key-1"));
        assert_eq!(row.scope_tag, tag().to_string());
    }

    #[test]
    fn a_compact_intent_expands_to_its_row() {
        let doc = doc(Method::Supplier);
        let mut row = movements::payment_row(
            &doc,
            tag(),
            PaymentStatus::Pending,
            doc.amount_minor,
            Some(doc.expires_at_ms + 300_000),
            doc.created_at_ms,
        );
        row.next_check_at_ms = Some(doc.created_at_ms + 5_000);
        let row = row.with_idempotency("key-2", "feedfeedfeedfeedfeedfeedfeedfeed");
        let json = CompactRecord::channel_intent(&row).to_json();
        let OutboxRecord::Compact(parsed) = OutboxRecord::parse(&json).unwrap() else {
            panic!("compact")
        };
        assert_eq!(
            parsed.expand(&doc, tag(), "key-2"),
            PendingRecord::Intent(row)
        );
    }

    #[test]
    fn a_compact_channel_success_expands_to_its_settlement() {
        let doc = doc(Method::Supplier);
        let record = CompactRecord::channel_success("supplier-main", Some("T-1"), 60, 7);
        let json = record.to_json();
        let OutboxRecord::Compact(parsed) = OutboxRecord::parse(&json).unwrap() else {
            panic!("compact")
        };
        assert_eq!(parsed.payment_id("pay_x#m"), "pay_x");
        let direct =
            movements::channel_success(&doc, tag(), "supplier-main", Some("T-1"), 60, None, 7);
        assert_eq!(
            parsed.expand(&doc, tag(), ""),
            PendingRecord::Settlement(direct)
        );
    }

    #[test]
    fn full_records_still_parse() {
        let doc = doc(Method::Balance);
        let full = PendingRecord::Settlement(balance_capture(&doc, tag(), "k", "h"));
        assert_eq!(
            OutboxRecord::parse(&full.to_json()).unwrap(),
            OutboxRecord::Full(full)
        );
        let status = r#"{"status":{"payment_id":"pay_x","status":"expired","updated_at_ms":1}}"#;
        assert!(matches!(
            OutboxRecord::parse(status).unwrap(),
            OutboxRecord::Full(PendingRecord::Status(_))
        ));
    }
}
