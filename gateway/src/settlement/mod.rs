//! The settlement store: the system of record. Redis is fast but may lose acknowledged
//! writes; every money movement is committed here, as a settlement row with balanced
//! double-entry postings, and every balance and live hold can be rebuilt from it.
//!
//! [`SettlementStore`] has two backends passing one conformance suite
//! (`gateway/tests/api/settlement_conformance.rs`): SQLite (WAL, `synchronous=FULL`, one file
//! under the data dir; the embedded default) and PostgreSQL (production; several gateway
//! instances share it). Migrations are embedded and applied by `gateway migrate`; a server
//! refuses to run on an unmigrated or unknown schema.

pub mod movements;
pub mod outbox;
pub mod postgres;
pub mod rebuild;
pub mod recovery;
pub mod settler;
pub mod skipped;
pub mod sqlite;
pub mod stream;

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::PaymentId;
use crate::money::Currency;
use crate::preauth::{Method, PaymentStatus, Purpose, StoredOutcome};

/// One schema version: its SQL for SQLite and for PostgreSQL (the same portable text, except
/// where a backend's own form matters: 0007 clusters SQLite's tables on their keys).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// A migration both backends run as written.
const fn portable(version: u32, sql: &'static str) -> Migration {
    Migration {
        version,
        sqlite: sql,
        postgres: sql,
    }
}

/// The migrations, in order.
pub const MIGRATIONS: &[Migration] = &[
    portable(1, include_str!("migrations/0001_init.sql")),
    portable(2, include_str!("migrations/0002_channels.sql")),
    portable(3, include_str!("migrations/0003_webhooks.sql")),
    portable(4, include_str!("migrations/0004_refunds.sql")),
    portable(5, include_str!("migrations/0005_idempotency.sql")),
    portable(6, include_str!("migrations/0006_adjustment_keys.sql")),
    // The transfers table, clustered on its key on SQLite; the copy; SQLite's payments rebuild.
    Migration {
        version: 7,
        sqlite: concat!(
            include_str!("migrations/0007_transfers.table.sql"),
            " WITHOUT ROWID;\n",
            include_str!("migrations/0007_transfers.copy.sql"),
            include_str!("migrations/0007_transfers.sqlite.sql"),
        ),
        postgres: concat!(
            include_str!("migrations/0007_transfers.table.sql"),
            ";\n",
            include_str!("migrations/0007_transfers.copy.sql"),
        ),
    },
];

/// The schema version this binary runs on.
pub const SCHEMA_VERSION: u32 = 7;

/// What kind of money movement a settlement records (DESIGN.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettlementKind {
    Capture,
    Credit,
    Adjustment,
    Refund,
    Suspense,
}

impl SettlementKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SettlementKind::Capture => "capture",
            SettlementKind::Credit => "credit",
            SettlementKind::Adjustment => "adjustment",
            SettlementKind::Refund => "refund",
            SettlementKind::Suspense => "suspense",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            SettlementKind::Capture,
            SettlementKind::Credit,
            SettlementKind::Adjustment,
            SettlementKind::Refund,
            SettlementKind::Suspense,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One line of a double-entry posting: `amount_minor` is added to `ledger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub ledger: String,
    pub amount_minor: i64,
}

/// Ledger names. An account's balance is the sum of its ledger's postings.
pub mod ledger {
    pub fn account(merchant: &str, account: &str) -> String {
        format!("account:{merchant}:{account}")
    }
    /// What a merchant earned from balance and supplier charges.
    pub fn merchant_sales(merchant: &str) -> String {
        format!("merchant:{merchant}:sales")
    }
    /// A channel's clearing account: positive = the platform owes the channel (a supplier
    /// charge), negative = the channel owes the platform (collections, top-ups).
    pub fn channel_clearing(channel: &str) -> String {
        format!("channel:{channel}:clearing")
    }
    /// Money that arrived for a payment already ended (late money), until a human or the
    /// automatic refund decides.
    pub fn suspense(merchant: &str) -> String {
        format!("merchant:{merchant}:suspense")
    }
    /// The other side of manual credits and debits.
    pub fn adjustments(merchant: &str) -> String {
        format!("platform:{merchant}:adjustments")
    }
}

/// A payment row: written as an intent before anything else happens to a non-balance payment,
/// and with its settlement for a balance payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRow {
    pub id: String,
    pub merchant_id: String,
    pub account_id: Option<String>,
    pub scope_tag: String,
    pub merchant_order_id: String,
    pub amount_minor: i64,
    pub currency: Currency,
    pub method: Method,
    pub purpose: Purpose,
    pub status: PaymentStatus,
    pub held_minor: i64,
    pub hold_expires_at_ms: Option<u64>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub updated_at_ms: u64,
    pub doc: String,
    /// When the resolution loop should next query or close this pending channel payment
    /// (DESIGN.md §7); `None`: never (balance payments, finished payments). Defaulted so
    /// records written before it existed (Redis outboxes) still read.
    #[serde(default)]
    pub next_check_at_ms: Option<u64>,
    /// How many times the resolution loop looked at this payment (bounds its backoff).
    #[serde(default)]
    pub checks: u32,
    /// The `Idempotency-Key` the payment was created under, and the hash of its normalized
    /// request: the store refuses a second payment under the same (scope, key) in the money's
    /// own commit (see [`KeyHolder`]). `None` on rows written before the store kept keys.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub request_hash: Option<String>,
}

impl PaymentRow {
    /// The row, claiming `key` for its scope with the request's hash.
    pub fn with_idempotency(mut self, key: &str, request_hash: &str) -> Self {
        self.idempotency_key = Some(key.to_owned());
        self.request_hash = Some(request_hash.to_owned());
        self
    }
}

/// The payment that already holds an idempotency key in the store, as a refused commit names
/// it: what the first request under the key came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHolder {
    /// The payment (or adjustment) the key made; empty when its first answer was a refusal.
    pub payment_id: String,
    /// The first request's hash (a retry with another request under the key is a conflict).
    pub request_hash: String,
    pub created_at_ms: u64,
    /// The key's first answer when it is not the payment `payment_id` (read by id): an
    /// adjustment's document, or a refusal (`402`) kept in the store's `refusals`.
    pub answer: Option<StoredOutcome>,
}

impl KeyHolder {
    /// The key's first answer, as the balance store keeps it.
    pub fn outcome(&self) -> Result<StoredOutcome, SettleError> {
        match &self.answer {
            Some(answer) => Ok(answer.clone()),
            None => PaymentId::parse(&self.payment_id)
                .map(StoredOutcome::Payment)
                .ok_or_else(|| {
                    SettleError::Invalid(format!("stored payment id {:?}", self.payment_id))
                }),
        }
    }
}

/// What a channel answered for an attempt (DESIGN.md §4 `attempts[].outcome`); strings only
/// on the wire and in rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The channel took the order (it may still be paid).
    Accepted,
    /// The channel certainly did not take it (failover may go on).
    Refused,
    /// No one knows (a timeout, an unverifiable reply): closed at the channel before anything
    /// else happens.
    Unknown,
    Succeeded,
    /// The channel declined or failed the order.
    Failed,
    /// Closed before payment.
    Closed,
}

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 6] = [
        AttemptOutcome::Accepted,
        AttemptOutcome::Refused,
        AttemptOutcome::Unknown,
        AttemptOutcome::Succeeded,
        AttemptOutcome::Failed,
        AttemptOutcome::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Accepted => "accepted",
            AttemptOutcome::Refused => "refused",
            AttemptOutcome::Unknown => "unknown",
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whether the attempt of a *pending* payment may still take (or have taken) money: the
    /// resolution loop, a cancel and an expiring callback query or close these before ending
    /// the payment. A `succeeded` attempt of a payment still pending is one of them: the
    /// channel said paid but the money did not commit (the store refused the movement of a
    /// rolled-back account and it was voided): asked again, the channel says paid again and
    /// the payment succeeds — it must never be expired past it.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            AttemptOutcome::Accepted | AttemptOutcome::Unknown | AttemptOutcome::Succeeded
        )
    }
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attempt of a channel payment (DESIGN.md §4 `attempts`).
///
/// Written before the channel is called (DESIGN.md §3), so a callback can always be matched
/// to its payment by `channel_order_id`, even when Redis lost the payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRow {
    pub payment_id: String,
    pub attempt: u32,
    pub channel_id: String,
    pub channel_order_id: String,
    pub outcome: AttemptOutcome,
    pub latency_ms: Option<u64>,
    /// The action object's JSON text (`{"type":"qr_code",...}`), once the channel gave one.
    pub action: Option<String>,
    pub channel_txn_id: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl AttemptRow {
    /// What both backends require before writing an attempt of `payment_id`.
    pub(crate) fn check_for(&self, payment_id: &str) -> Result<(), SettleError> {
        if self.payment_id != payment_id {
            return Err(SettleError::Invalid(format!(
                "{payment_id}: attempt {} belongs to payment {}",
                self.attempt, self.payment_id
            )));
        }
        if self.channel_order_id.is_empty() {
            return Err(SettleError::Invalid(format!(
                "{payment_id}: attempt {} has no channel order id",
                self.attempt
            )));
        }
        Ok(())
    }

    /// Why inserting this attempt did nothing, given the channel order id stored for the same
    /// `(payment_id, attempt)` (`None`: no such attempt, so the channel order id is taken by
    /// another one): `Ok` when it is the very same attempt, `Invalid` otherwise.
    pub(crate) fn explain_conflict(&self, stored: Option<&str>) -> Result<(), SettleError> {
        match stored {
            Some(stored) if stored == self.channel_order_id => Ok(()),
            Some(stored) => Err(SettleError::Invalid(format!(
                "{}: attempt {} is recorded with channel order id {stored}, not {}",
                self.payment_id, self.attempt, self.channel_order_id
            ))),
            None => Err(SettleError::Invalid(format!(
                "{}: attempt {}: channel order id {} belongs to another attempt",
                self.payment_id, self.attempt, self.channel_order_id
            ))),
        }
    }
}

/// One money movement, ready to commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub payment_id: String,
    pub kind: SettlementKind,
    pub sequence: u32,
    pub merchant_id: String,
    pub account_id: Option<String>,
    pub channel_id: Option<String>,
    pub channel_txn_id: Option<String>,
    pub amount_minor: i64,
    pub currency: Currency,
    pub channel_fee_minor: i64,
    pub commission_minor: i64,
    pub merchant_net_minor: i64,
    /// The account's sequence number after this movement (detects a Redis that rolled back).
    pub account_seq: Option<u64>,
    pub settled_at_ms: u64,
    pub postings: Vec<Posting>,
    /// The payment this movement finalizes, written (inserted or updated) in the same
    /// transaction.
    pub payment: Option<PaymentRow>,
    /// An admin adjustment's idempotency key: the store checks it in this movement's commit
    /// and keeps it with the movement (none for every other movement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjustment: Option<AdjustmentKey>,
}

/// The idempotency key an admin adjustment was made under, kept with its movement (table
/// `adjustments`), so that a retry the balance store forgot replays the first adjustment
/// instead of moving the money again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustmentKey {
    pub scope_tag: String,
    pub idempotency_key: String,
    pub request_hash: String,
    /// The adjustment as first answered (JSON): what a replay answers.
    pub doc: String,
    pub created_at_ms: u64,
}

impl Settlement {
    /// Whether this movement brings its payment into being (a balance payment: captured at
    /// once, its row written with its settlement). Such a settlement is committed only with
    /// its row: the store first checks the row's idempotency key and live order id, and
    /// refuses the movement ([`CommitOutcome::Replay`] and its siblings) when either is taken.
    pub fn creates_payment(&self) -> bool {
        self.kind == SettlementKind::Capture
            && self
                .payment
                .as_ref()
                .is_some_and(|p| p.method == Method::Balance && p.id == self.payment_id)
    }

    /// A digest of everything that defines the movement (not when it was written), so a
    /// re-driven settlement is recognized as the same and a different one as a conflict.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        field(self.payment_id.as_bytes());
        field(self.kind.as_str().as_bytes());
        field(&self.sequence.to_be_bytes());
        field(self.merchant_id.as_bytes());
        field(self.account_id.as_deref().unwrap_or("").as_bytes());
        field(self.channel_id.as_deref().unwrap_or("").as_bytes());
        field(self.channel_txn_id.as_deref().unwrap_or("").as_bytes());
        field(&self.amount_minor.to_be_bytes());
        field(self.currency.code().as_bytes());
        field(&self.channel_fee_minor.to_be_bytes());
        field(&self.commission_minor.to_be_bytes());
        field(&self.merchant_net_minor.to_be_bytes());
        field(&self.account_seq.unwrap_or(0).to_be_bytes());
        for p in &self.postings {
            field(p.ledger.as_bytes());
            field(&p.amount_minor.to_be_bytes());
        }
        hex::encode(&h.finalize()[..16])
    }

    /// The invariants every settlement keeps: it is one transfer — two postings, the debit
    /// (negative) and the credit (positive) of the amount on two ledgers — and fees, commission
    /// and net sum to the amount, nothing overflowing. Commission is 0: splits, when they come,
    /// are transfers of their own. Checked before any write.
    pub fn check(&self) -> Result<(), SettleError> {
        let bad = |what: &str| Err(SettleError::Invalid(format!("{}: {what}", self.payment_id)));
        if self.amount_minor <= 0 {
            return bad("amount must be positive");
        }
        let [a, b] = self.postings.as_slice() else {
            return bad("a movement is one transfer: exactly two postings");
        };
        if a.amount_minor.checked_add(b.amount_minor) != Some(0) {
            return bad("postings do not sum to zero");
        }
        if a.amount_minor.unsigned_abs() != self.amount_minor.unsigned_abs() {
            return bad("postings must move the amount");
        }
        if a.ledger == b.ledger {
            return bad("a transfer needs two ledgers");
        }
        if self.commission_minor != 0 {
            return bad("commission is not a part of a transfer");
        }
        if !(0..=self.amount_minor).contains(&self.channel_fee_minor) {
            return bad("the fee must be within the amount");
        }
        let parts = self
            .channel_fee_minor
            .checked_add(self.commission_minor)
            .and_then(|s| s.checked_add(self.merchant_net_minor));
        if parts != Some(self.amount_minor) {
            return bad("fee + commission + net must equal the amount");
        }
        Ok(())
    }

    /// The ledger the transfer takes the amount from (its negative posting).
    pub fn debit_ledger(&self) -> &str {
        self.leg(|amount| amount < 0)
    }

    /// The ledger the transfer gives the amount to (its positive posting).
    pub fn credit_ledger(&self) -> &str {
        self.leg(|amount| amount > 0)
    }

    fn leg(&self, side: impl Fn(i64) -> bool) -> &str {
        debug_assert!(self.check().is_ok(), "{}: not a transfer", self.payment_id);
        self.postings
            .iter()
            .find(|p| side(p.amount_minor))
            .map_or("", |p| p.ledger.as_str())
    }
}

/// A payment's final status, reached without money moving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    pub payment_id: String,
    pub status: PaymentStatus,
    pub updated_at_ms: u64,
}

/// Where a refund is: `pending` until its channel's answer is final, then `succeeded` or
/// `failed`, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    Pending,
    Succeeded,
    Failed,
}

impl RefundStatus {
    pub const ALL: [RefundStatus; 3] = [
        RefundStatus::Pending,
        RefundStatus::Succeeded,
        RefundStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefundStatus::Pending => "pending",
            RefundStatus::Succeeded => "succeeded",
            RefundStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

impl std::str::FromStr for RefundStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("unknown refund status {s:?}"))
    }
}

impl fmt::Display for RefundStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refund as recorded before its channel is called (DESIGN.md §7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRow {
    /// `re_<payment id body>_<number>`: also the channel's refund number.
    pub refund_id: String,
    pub payment_id: String,
    /// 1 for the payment's first refund…
    pub number: u32,
    pub amount_minor: i64,
    pub currency: Currency,
    pub status: RefundStatus,
    /// The channel and order refunded (none for a balance payment).
    pub channel_id: Option<String>,
    pub channel_order_id: Option<String>,
    pub reason: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The `Idempotency-Key` of the request that made it (`None` on rows written before the
    /// store kept it).
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

impl RefundRow {
    /// Whether `other` is this very refund: same payment, number, amount and currency, and the
    /// same request's key when both have one.
    pub fn same_as(&self, other: &RefundRow) -> bool {
        self.payment_id == other.payment_id
            && self.number == other.number
            && self.amount_minor == other.amount_minor
            && self.currency == other.currency
            && match (&self.idempotency_key, &other.idempotency_key) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// What recording a refund came to (see [`RefundStore::record_refund`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundRecorded {
    Inserted,
    /// This very refund ([`RefundRow::same_as`]) was already recorded: a re-drive, or a retry
    /// the balance store had forgotten.
    AlreadyRecorded,
    /// Another refund is stored under its id (the balance store lost the payment's refund
    /// numbering): nothing written, flagged `refund_conflict`.
    Conflict,
    /// The payment's refunds (pending and succeeded) would exceed its amount (the balance
    /// store lost what was refunded): nothing written, flagged `refund_cap`.
    Exceeds {
        remaining_minor: i64,
    },
}

/// A payment's refunds as the store counts them: what a balance store that lost its refund
/// state is reset to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefundTotals {
    /// The highest refund number used.
    pub count: u32,
    /// Pending and succeeded refunds.
    pub reserved_minor: i64,
    pub succeeded_minor: i64,
}

impl RefundTotals {
    pub fn of(refunds: &[RefundRow]) -> Self {
        Self {
            count: refunds.iter().map(|r| r.number).max().unwrap_or(0),
            reserved_minor: refunds
                .iter()
                .filter(|r| r.status != RefundStatus::Failed)
                .map(|r| r.amount_minor)
                .sum(),
            succeeded_minor: refunds
                .iter()
                .filter(|r| r.status == RefundStatus::Succeeded)
                .map(|r| r.amount_minor)
                .sum(),
        }
    }
}

/// A refund's final status without money moving (a failed refund).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundStatusChange {
    pub refund_id: String,
    pub status: RefundStatus,
    pub updated_at_ms: u64,
}

/// What the balance store keeps in its outbox until this store has it (see
/// `preauth::Unsettled`): serialized as `{"settlement": …}`, `{"intent": …}` or
/// `{"status": …}` — the last one is also written by the Lua scripts.
// Built once per movement and moved, never copied in bulk: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingRecord {
    Settlement(Settlement),
    Intent(PaymentRow),
    Status(StatusChange),
    /// A refund's intent, recorded before the channel is called.
    Refund(RefundRow),
    /// A refund that failed (a succeeded one is a `Settlement` of kind `refund`).
    RefundStatus(RefundStatusChange),
}

impl PendingRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a pending record always serializes")
    }
}

/// The result of committing one settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Inserted,
    /// The same movement was already committed (a re-drive after a crash): nothing written.
    AlreadyCommitted,
    /// A different movement is stored under the same key: nothing written, flagged.
    Conflict {
        stored_hash: String,
    },
    /// Another movement of the account already has this `account_seq`: the balance store
    /// rolled back and must be rebuilt from this store. Nothing written, flagged.
    SequenceConflict {
        account_seq: u64,
    },
    /// The settlement creates its payment (a balance payment), and the store already has a
    /// payment under the same (scope, idempotency key) with the same request: the balance
    /// store forgot the key. Nothing written; the first payment is the answer.
    Replay(KeyHolder),
    /// As `Replay`, but the stored payment was made by another request: nothing written.
    IdempotencyConflict(KeyHolder),
    /// The settlement creates its payment and another live payment holds its scoped order id
    /// (named here): nothing written.
    DuplicateOrder {
        payment_id: String,
    },
}

/// A refusal the payment logic answered under an idempotency key (`402 insufficient_funds`),
/// kept so that its replay survives a balance store that forgot it (a rebuild puts it back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalRow {
    pub scope_tag: String,
    pub idempotency_key: String,
    pub request_hash: String,
    /// The answer as the balance store encodes it (`preauth::StoredOutcome::encode`).
    pub outcome: String,
    pub created_at_ms: u64,
}

/// The tables that keep a key with its first answer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kept {
    /// `refusals`: the refusal, encoded.
    Refusals,
    /// `adjustments`: the adjustment's document.
    Adjustments,
}

impl Kept {
    /// (table, answer column, operation label).
    pub(crate) fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kept::Refusals => ("refusals", "outcome", "refusals"),
            Kept::Adjustments => ("adjustments", "doc", "adjustment_keys"),
        }
    }
}

/// A kept key as both tables hold it.
pub(crate) struct KeptKey {
    pub scope_tag: String,
    pub idempotency_key: String,
    pub request_hash: String,
    pub answer: String,
    pub created_at_ms: u64,
}

impl From<KeptKey> for RefusalRow {
    fn from(k: KeptKey) -> Self {
        RefusalRow {
            scope_tag: k.scope_tag,
            idempotency_key: k.idempotency_key,
            request_hash: k.request_hash,
            outcome: k.answer,
            created_at_ms: k.created_at_ms,
        }
    }
}

impl From<KeptKey> for AdjustmentKey {
    fn from(k: KeptKey) -> Self {
        AdjustmentKey {
            scope_tag: k.scope_tag,
            idempotency_key: k.idempotency_key,
            request_hash: k.request_hash,
            doc: k.answer,
            created_at_ms: k.created_at_ms,
        }
    }
}

/// A payment's idempotency key as the store keeps it (what a rebuild puts back into the
/// balance store, see [`KeyStore::keyed_payments`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub scope_tag: String,
    pub idempotency_key: String,
    pub request_hash: String,
    pub payment_id: String,
    pub created_at_ms: u64,
    /// The payment's order id and status: a live one holds its order id (a rebuild puts it
    /// back too).
    pub merchant_order_id: String,
    pub status: PaymentStatus,
}

/// Why the store refuses to create a payment (checked in the money's own commit, in this
/// order): its (scope, idempotency key) or its live scoped order id is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Taken {
    /// The key, by the same request.
    Replay(KeyHolder),
    /// The key, by another request.
    KeyConflict(KeyHolder),
    /// The order id, by this live payment.
    Order(String),
}

impl Taken {
    /// The payment that holds the key or the order id.
    pub(crate) fn holder(&self) -> &str {
        match self {
            Taken::Replay(holder) | Taken::KeyConflict(holder) => &holder.payment_id,
            Taken::Order(payment_id) => payment_id,
        }
    }
}

impl From<Taken> for IntentOutcome {
    fn from(taken: Taken) -> Self {
        match taken {
            Taken::Replay(holder) => IntentOutcome::Replay(holder),
            Taken::KeyConflict(holder) => IntentOutcome::IdempotencyConflict(holder),
            Taken::Order(payment_id) => IntentOutcome::DuplicateOrder(payment_id),
        }
    }
}

impl From<Taken> for CommitOutcome {
    fn from(taken: Taken) -> Self {
        match taken {
            Taken::Replay(holder) => CommitOutcome::Replay(holder),
            Taken::KeyConflict(holder) => CommitOutcome::IdempotencyConflict(holder),
            Taken::Order(payment_id) => CommitOutcome::DuplicateOrder { payment_id },
        }
    }
}

impl KeyHolder {
    /// What a new payment claiming the same key (with `request_hash`) meets.
    pub(crate) fn taken_by(self, request_hash: Option<&str>) -> Taken {
        if request_hash == Some(self.request_hash.as_str()) {
            Taken::Replay(self)
        } else {
            Taken::KeyConflict(self)
        }
    }
}

impl CommitOutcome {
    /// The store refused to create the settlement's payment: what the balance store did for
    /// it must be undone.
    pub fn refused_payment(&self) -> bool {
        matches!(
            self,
            CommitOutcome::Replay(_)
                | CommitOutcome::IdempotencyConflict(_)
                | CommitOutcome::DuplicateOrder { .. }
        )
    }
}

/// An account as the store keeps it, with what rebuilding Redis needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRow {
    pub merchant_id: String,
    pub account_id: String,
    pub currency: Currency,
    pub credit_limit_minor: i64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// An account's state recomputed from settlements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountBalance {
    pub account: AccountRow,
    /// Sum of the account ledger's postings.
    pub balance_minor: i64,
    /// Highest `account_seq` of the account's settlements (0 without any).
    pub seq: u64,
}

/// What a channel answered for an attempt (see [`PaymentStore::update_attempt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptUpdate {
    pub payment_id: String,
    pub attempt: u32,
    pub outcome: AttemptOutcome,
    pub latency_ms: Option<u64>,
    pub action: Option<String>,
    pub channel_txn_id: Option<String>,
    pub now_ms: u64,
}

/// One write of a group commit ([`WriteStore::commit_writes`]): what a payment's hot
/// path must have on disk before it is answered. Many payments' writes share one transaction
/// (one fsync).
#[derive(Debug, Clone)]
pub enum Write {
    /// A payment's intent with its first attempt ([`PaymentStore::record_intent`]).
    Intent {
        payment: PaymentRow,
        first_attempt: Option<AttemptRow>,
    },
    /// An attempt's outcome ([`PaymentStore::update_attempt`]).
    Attempt(AttemptUpdate),
    /// A money movement ([`MoneyStore::commit`]).
    Settlement(Settlement),
    /// What a webhook delivery attempt came to ([`WebhookStore::record_webhook_attempt`]).
    Webhook(WebhookAttempt),
    /// A refusal under a key, kept for its replay (a key already there keeps its first answer).
    Refusal(RefusalRow),
}

/// What a webhook delivery attempt came to (see [`WebhookStore::record_webhook_attempt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttempt {
    pub id: String,
    pub outcome: WebhookOutcome,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub now_ms: u64,
}

impl Write {
    /// The label of its kind, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Write::Intent { .. } => "intent",
            Write::Attempt(_) => "attempt",
            Write::Settlement(_) => "settlement",
            Write::Webhook(_) => "webhook",
            Write::Refusal(_) => "refusal",
        }
    }

    /// The checks every backend makes before any transaction (each adds its own).
    pub fn check(&self) -> Result<(), SettleError> {
        match self {
            Write::Intent {
                payment,
                first_attempt: Some(a),
            } => a.check_for(&payment.id),
            Write::Intent { .. } | Write::Attempt(_) | Write::Webhook(_) | Write::Refusal(_) => {
                Ok(())
            }
            Write::Settlement(s) => s.check(),
        }
    }
}

/// What one [`Write`] came to, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Intent(IntentOutcome),
    /// Whether the attempt exists (and was updated).
    Attempt(bool),
    Settlement(CommitOutcome),
    /// Whether the event was pending (and took the outcome).
    Webhook(bool),
    /// Whether the refusal was recorded (`false`: the key had an answer already).
    Refusal(bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentOutcome {
    Inserted,
    /// This very payment was already recorded (a retry).
    AlreadyRecorded,
    /// Another live payment holds the scoped order id.
    DuplicateOrder(String),
    /// Another payment holds the idempotency key, made by the same request (see
    /// [`CommitOutcome::Replay`]): nothing written.
    Replay(KeyHolder),
    /// Another payment holds the idempotency key, made by another request: nothing written.
    IdempotencyConflict(KeyHolder),
}

/// Why an item waits for a human (`GET /v1/admin/flagged` `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlagKind {
    /// A settlement whose content differs from the one stored under its key.
    SettlementConflict,
    /// An account sequence number used twice: the balance store rolled back.
    SequenceConflict,
    /// A payment row whose live order id another live payment holds.
    OrderIdConflict,
    /// Another refund under a refund's id or number.
    RefundConflict,
    /// Refunds above what was paid (the balance store had lost the payment's refunds).
    RefundCap,
    /// Money for a payment that had ended, or for an abandoned attempt.
    LateMoney,
    /// A late capture the account could not cover.
    Overdraft,
    /// A channel reported another amount or currency than the payment's.
    AmountMismatch,
    /// A channel said it has no such order for an attempt it had accepted.
    ChannelOrderMissing,
}

impl FlagKind {
    pub const ALL: [FlagKind; 9] = [
        FlagKind::SettlementConflict,
        FlagKind::SequenceConflict,
        FlagKind::OrderIdConflict,
        FlagKind::RefundConflict,
        FlagKind::RefundCap,
        FlagKind::LateMoney,
        FlagKind::Overdraft,
        FlagKind::AmountMismatch,
        FlagKind::ChannelOrderMissing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FlagKind::SettlementConflict => "settlement_conflict",
            FlagKind::SequenceConflict => "sequence_conflict",
            FlagKind::OrderIdConflict => "order_id_conflict",
            FlagKind::RefundConflict => "refund_conflict",
            FlagKind::RefundCap => "refund_cap",
            FlagKind::LateMoney => "late_money",
            FlagKind::Overdraft => "overdraft",
            FlagKind::AmountMismatch => "amount_mismatch",
            FlagKind::ChannelOrderMissing => "channel_order_missing",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == s)
    }
}

impl fmt::Display for FlagKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flagged {
    pub kind: FlagKind,
    pub payment_id: String,
    pub detail: String,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SettleError {
    #[error("settlement store unreachable: {0}")]
    Unavailable(String),
    #[error("the settlement store has no schema: run `gateway migrate`")]
    Unmigrated,
    #[error("the settlement store is at schema version {found}, this binary runs {expected}: run `gateway migrate` (or deploy the newer binary)")]
    WrongSchema { found: u32, expected: u32 },
    #[error("invalid settlement: {0}")]
    Invalid(String),
    #[error("settlement store misconfigured: {0}")]
    Misconfigured(String),
}

/// The store itself: its schema (migrations) and whether it answers.
#[async_trait]
pub trait SchemaStore: Send + Sync {
    /// Applies every migration not yet applied; returns the schema version.
    async fn migrate(&self) -> Result<u32, SettleError>;

    /// The applied schema version, `None` when the store was never migrated.
    async fn schema_version(&self) -> Result<Option<u32>, SettleError>;

    async fn ping(&self) -> Result<(), SettleError>;
}

/// Payments, their attempts and their status history (`payments`, `attempts`,
/// `payment_events`).
#[async_trait]
pub trait PaymentStore: Send + Sync {
    /// Records a payment before anything else happens to it, with its first channel attempt
    /// (if any) in the same transaction, so the attempt's channel order id is durable before
    /// the channel is called.
    ///
    /// `AlreadyRecorded` (a retry) still inserts the attempt if it is absent. `DuplicateOrder`
    /// writes nothing. The attempt must belong to `payment`, and an attempt that clashes with
    /// a stored one (see [`PaymentStore::record_attempt`]) is `Invalid`, with nothing
    /// written: the channel must not be called with an order id the store does not hold.
    async fn record_intent(
        &self,
        payment: &PaymentRow,
        first_attempt: Option<&AttemptRow>,
    ) -> Result<IntentOutcome, SettleError>;

    /// Records a further attempt (failover) before its channel is called. Recording the same
    /// `(payment_id, attempt)` with the same channel order id again changes nothing; another
    /// channel order id for a stored attempt, or a channel order id another attempt already
    /// uses, is `Invalid` (nothing changes).
    async fn record_attempt(&self, attempt: &AttemptRow) -> Result<(), SettleError>;

    /// Records what a channel answered for an attempt: `outcome` and `updated_at_ms` are set,
    /// `latency_ms`, `action` and `channel_txn_id` only when given (`None` keeps the stored
    /// value). `false` when there is no such attempt, or when it has `succeeded`: a succeeded
    /// attempt keeps its outcome (an `accepted` arriving after the callback's `succeeded`
    /// must not move it back); and `false` for `accepted` unless the attempt is still the
    /// `unknown` recorded before its call or `accepted`: an outcome that overtook it stands.
    #[allow(clippy::too_many_arguments)]
    async fn update_attempt(
        &self,
        payment_id: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        latency_ms: Option<u64>,
        action: Option<&str>,
        channel_txn_id: Option<&str>,
        now_ms: u64,
    ) -> Result<bool, SettleError>;

    /// A payment's attempts, by attempt number.
    async fn attempts(&self, payment_id: &str) -> Result<Vec<AttemptRow>, SettleError>;

    /// The attempt a channel order id belongs to (how a callback finds its payment).
    async fn attempt_by_channel_order(
        &self,
        channel_order_id: &str,
    ) -> Result<Option<AttemptRow>, SettleError>;

    async fn payment(&self, id: &str) -> Result<Option<PaymentRow>, SettleError>;

    /// Records a pending payment's final status without money moving (cancel, expiry,
    /// failure): `false` when the payment is unknown or no longer pending.
    async fn set_final_status(&self, change: &StatusChange) -> Result<bool, SettleError>;

    /// The statuses a payment reached, oldest first, with when.
    async fn payment_events(&self, id: &str) -> Result<Vec<(String, u64)>, SettleError>;
}

/// The resolution loop's schedule of pending payments (`payments.next_check_at_ms`).
#[async_trait]
pub trait CheckStore: Send + Sync {
    /// Claims up to `limit` pending payments whose `next_check_at_ms <= now_ms`, oldest
    /// check first, for the resolution loop: in the same atomic step their
    /// `next_check_at_ms` becomes `lease_until_ms`, so neither another gateway instance nor
    /// the next tick takes them while this one works on them (and if this one dies, they come
    /// due again when the lease ends). Returns the rows as updated.
    async fn claim_due(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<PaymentRow>, SettleError>;

    /// After a look at a payment: when to look next (`None`: never) and one more check.
    /// An unknown payment is `Invalid`.
    async fn schedule_check(
        &self,
        payment_id: &str,
        next_check_at_ms: Option<u64>,
    ) -> Result<(), SettleError>;
}

/// Money: accounts, settlements and their postings, and the balances recomputed from them.
#[async_trait]
pub trait MoneyStore: Send + Sync {
    /// Creates or updates an account (currency, credit limit).
    async fn upsert_account(&self, row: &AccountRow) -> Result<(), SettleError>;

    /// Commits a batch in ONE transaction (one fsync): each settlement is inserted, recognized
    /// as already committed, or refused as a conflict (and flagged). A settlement's payment
    /// is inserted whole, or, when it exists, gets its status, hold and `updated_at_ms`; its
    /// resolution schedule (`next_check_at_ms`, `checks`) is left as stored.
    async fn commit(&self, batch: &[Settlement]) -> Result<Vec<CommitOutcome>, SettleError>;

    /// Every account (or only `(merchant, account)`) with its balance and sequence
    /// recomputed from the postings.
    async fn balances(
        &self,
        only: Option<(&str, &str)>,
    ) -> Result<Vec<AccountBalance>, SettleError>;

    /// One account's balance and sequence with its live holds, read in ONE snapshot (what a
    /// rebuild loads: a balance and holds of two different moments would double or lose a
    /// movement). `None` when the store has no such account.
    async fn account_state(
        &self,
        merchant: &str,
        account: &str,
    ) -> Result<Option<(AccountBalance, Vec<PaymentRow>)>, SettleError>;

    /// Every pending payment that holds money (or only those of `(merchant, account)`), to
    /// rebuild holds.
    async fn live_holds(&self, only: Option<(&str, &str)>) -> Result<Vec<PaymentRow>, SettleError>;

    /// The channel and channel transaction of a payment's committed success (its capture or
    /// credit, sequence 0), if it has one: what tells a channel's repeated notice (the same
    /// transaction) from money taken by an abandoned attempt (another one), whatever the
    /// attempts' best-effort outcomes say.
    async fn committed_success(
        &self,
        payment_id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>, SettleError>;

    /// Every movement as (payment id, kind, sequence, the sum of its two postings): 0 for each
    /// well-formed transfer (one positive amount taken from one ledger and given to another,
    /// as the schema's checks require), the amount itself for a malformed row; for the
    /// invariant checks of the tests and the chaos run.
    async fn postings_sum_by_movement(
        &self,
    ) -> Result<Vec<(String, String, u32, i64)>, SettleError>;
}

/// The group commit: writes of several table groups in one transaction.
#[async_trait]
pub trait WriteStore: Send + Sync {
    /// Commits a group of writes in ONE transaction (one fsync), each with exactly the meaning
    /// of its own method above. Writes of one kind apply in the order given; writes of
    /// different kinds may apply in any order, so a batch must not hold writes of two kinds
    /// for one row (the stream never does: a payment's next write waits for its previous
    /// commit — except an accepted attempt's outcome, queued unwaited, which the stores take
    /// only over the attempt's `unknown`, so a success or failure beside it wins in either
    /// order). The outer error is the transaction's (nothing written); an inner `Invalid` is
    /// that write's alone (nothing of it written, the others committed). An attempt outcome
    /// never overwrites `succeeded`.
    async fn commit_writes(
        &self,
        batch: &[Write],
    ) -> Result<Vec<Result<Written, SettleError>>, SettleError>;
}

/// Refunds, recorded before their channel is called (`refunds`).
#[async_trait]
pub trait RefundStore: Send + Sync {
    /// Records a refund before its channel is called, the store deciding on the cap as Redis
    /// did: a repeat of the same refund changes nothing; another refund under its number is a
    /// `Conflict`, and refunds above the payment's amount `Exceeds` — both flagged, nothing
    /// written. An unknown payment is `Invalid`.
    async fn record_refund(&self, refund: &RefundRow) -> Result<RefundRecorded, SettleError>;

    /// Ends a pending refund without money moving (`failed`): `false` when it is unknown or
    /// no longer pending. (A succeeded refund ends with its settlement, in `commit`.)
    async fn set_refund_status(&self, change: &RefundStatusChange) -> Result<bool, SettleError>;

    /// A payment's refunds, oldest first.
    async fn refunds(&self, payment_id: &str) -> Result<Vec<RefundRow>, SettleError>;

    /// Pending refunds last touched before `before_ms`, oldest first (to retry at their
    /// channel under the same number).
    async fn stale_refunds(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<RefundRow>, SettleError>;
}

/// Idempotency keys and order ids as the store arbitrates them: payments', adjustments' and
/// refusals' keys, their purge, and the live payment holding an order id.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// The idempotency keys of payments created at or after `since_ms` (only those of
    /// `scope_tag` when given), in (created_at_ms, payment id) order after `after`, at most
    /// `limit`: a rebuild puts them back into the balance store page by page, so a retried
    /// request replays instead of being charged again.
    async fn keyed_payments(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredKey>, SettleError>;

    /// The refusals recorded at or after `since_ms` (only those of `scope_tag` when given), in
    /// (created_at_ms, key) order after `after`, at most `limit`: a rebuild puts them back
    /// with the payments' keys.
    async fn refusals(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RefusalRow>, SettleError>;

    /// The admin adjustments' keys made at or after `since_ms`, paged as [`Self::refusals`]: a
    /// rebuild puts them back too, so a retry replays its adjustment (even a debit the
    /// rebuilt balance could no longer cover).
    async fn adjustment_keys(
        &self,
        since_ms: u64,
        scope_tag: Option<&str>,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<AdjustmentKey>, SettleError>;

    /// Clears the idempotency keys of payments created before `before_ms` and deletes the
    /// refusals and adjustments' key rows (not their movements) recorded before it, at most
    /// `limit` of each, under the lease `key_purge`
    /// (held by `holder` until `now_ms + lease_ms`; one instance at a time). `None` when
    /// another holder has the lease (nothing done), else how many keys went.
    async fn purge_keys(
        &self,
        holder: &str,
        now_ms: u64,
        lease_ms: u64,
        before_ms: u64,
        limit: usize,
    ) -> Result<Option<u64>, SettleError>;

    /// The payment created under (scope, idempotency key), if the store has one: what a retry
    /// is answered from while the balance store still has the key in flight after the
    /// payment's commit (a waiter is answered before the batch's keys are marked settled).
    async fn payment_by_key(
        &self,
        scope_tag: &str,
        idempotency_key: &str,
    ) -> Result<Option<StoredKey>, SettleError>;

    /// Lets go of an ended payment's idempotency key (a payment given up before any channel
    /// was called: its request was never answered with it, so the client may use the key
    /// again). `false` when the payment is unknown or not `failed` (nothing changes).
    async fn release_idempotency_key(&self, payment_id: &str) -> Result<bool, SettleError>;

    /// The live payment (pending, succeeded, partially refunded, refunded) holding
    /// `merchant_order_id` in `scope_tag`, if any (the store's unique index keeps at most one).
    async fn live_payment_by_order(
        &self,
        scope_tag: &str,
        merchant_order_id: &str,
    ) -> Result<Option<PaymentRow>, SettleError>;
}

/// Payments flagged for a human (`flagged`).
#[async_trait]
pub trait FlagStore: Send + Sync {
    /// Flags a payment for a human (late money, overdrafts, …): `false` when the same
    /// (kind, payment) is already flagged (nothing written).
    async fn flag(&self, item: &Flagged) -> Result<bool, SettleError>;

    async fn flagged(&self, limit: usize) -> Result<Vec<Flagged>, SettleError>;

    /// How many rows `flagged` holds.
    async fn flagged_count(&self) -> Result<u64, SettleError>;
}

/// Merchant webhooks: the outbox (crate::webhooks, docs/webhooks.md).
///
/// Events are enqueued by `commit` and `set_final_status` themselves, in their own
/// transaction (see `crate::webhooks::events`); these calls serve the delivery worker and
/// the API.
#[async_trait]
pub trait WebhookStore: Send + Sync {
    /// Claims up to `limit` pending events whose `next_attempt_at_ms <= now_ms`, oldest first,
    /// leasing them as `claim_due` does payments: in the same atomic step their
    /// `next_attempt_at_ms` becomes `lease_until_ms`, so no other worker (or instance) takes
    /// them meanwhile, and they come due again if this one dies. Returns them as updated.
    async fn claim_webhooks(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<WebhookEvent>, SettleError>;

    /// Records what a delivery attempt of a *pending* event came to (see [`WebhookOutcome`]),
    /// with the receiver's HTTP status and an error text (truncated to
    /// [`MAX_WEBHOOK_ERROR_CHARS`]). `false` when the event is unknown or no longer pending
    /// (nothing written): a delivered event is never reopened.
    async fn record_webhook_attempt(
        &self,
        id: &str,
        outcome: WebhookOutcome,
        http_status: Option<u16>,
        error: Option<&str>,
        now_ms: u64,
    ) -> Result<bool, SettleError>;

    /// A payment's events, oldest first (its delivery status on the API).
    async fn webhook_events(&self, payment_id: &str) -> Result<Vec<WebhookEvent>, SettleError>;

    /// How many events are pending (delivered, failed and skipped ones are not).
    async fn webhook_backlog(&self) -> Result<u64, SettleError>;
}

/// The system of record: every table group's calls, as one trait object
/// (`Arc<dyn SettlementStore>`). Implemented by every type that implements them all.
pub trait SettlementStore:
    SchemaStore
    + PaymentStore
    + CheckStore
    + MoneyStore
    + WriteStore
    + RefundStore
    + KeyStore
    + FlagStore
    + WebhookStore
    + Send
    + Sync
    + 'static
{
}

impl<T> SettlementStore for T where
    T: SchemaStore
        + PaymentStore
        + CheckStore
        + MoneyStore
        + WriteStore
        + RefundStore
        + KeyStore
        + FlagStore
        + WebhookStore
        + Send
        + Sync
        + 'static
{
}

/// Refuses to run on a store whose schema this binary does not know.
pub async fn check_schema(store: &dyn SettlementStore) -> Result<(), SettleError> {
    match store.schema_version().await? {
        None => Err(SettleError::Unmigrated),
        Some(v) if v == SCHEMA_VERSION => Ok(()),
        Some(found) => Err(SettleError::WrongSchema {
            found,
            expected: SCHEMA_VERSION,
        }),
    }
}

impl fmt::Display for SettlementKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---- merchant webhooks: the outbox's types (crate::webhooks, docs/webhooks.md) ----

/// An event of the webhook outbox, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// `evt_` + 26 base62 characters (the `X-Webhook-Id` header and the body's `id`).
    pub id: String,
    pub merchant_id: String,
    pub payment_id: String,
    /// `payment.succeeded`, `refund.succeeded`, … (`crate::webhooks::events`).
    pub event_type: String,
    /// Tells apart several events of one type for one payment (the refund number); 0 for a
    /// final status.
    pub sequence: u32,
    /// The exact JSON body to POST.
    pub payload: String,
    /// The payment's `notify_url`; `None`: the merchant's configured `webhook_url`.
    pub url: Option<String>,
    pub status: WebhookStatus,
    /// Delivery attempts made (a deferral is not one).
    pub attempts: u32,
    /// When a pending event is due, or its lease ends; `None` once it is finished.
    pub next_attempt_at_ms: Option<u64>,
    /// The receiver's HTTP status at the last attempt, if it answered.
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// The merchants with no `webhook_url` configured. An event of theirs without the payment's
/// `notify_url` has nowhere to go: a store records it `skipped` at once (in the transaction
/// that enqueues it), and the delivery worker never claims it. Taken from the configuration at
/// start; an instance decides by its own configuration. Empty (the default): every event waits
/// for the worker, which decides when it claims it.
#[derive(Debug, Clone, Default)]
pub struct NoWebhook(std::sync::Arc<std::collections::HashSet<String>>);

impl NoWebhook {
    pub fn new(merchants: impl IntoIterator<Item = String>) -> Self {
        Self(std::sync::Arc::new(merchants.into_iter().collect()))
    }

    /// The status and due time to store a new event with.
    pub fn stored_state(&self, e: &WebhookEvent) -> (WebhookStatus, Option<u64>) {
        if e.status == WebhookStatus::Pending && e.url.is_none() && self.0.contains(&e.merchant_id)
        {
            (WebhookStatus::Skipped, None)
        } else {
            (e.status, e.next_attempt_at_ms)
        }
    }
}

/// Where an event is in its life: `pending` until delivered (a 2xx), `failed` (its horizon
/// passed, or it can never be sent), or `skipped` (nowhere to send it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookStatus {
    Pending,
    Delivered,
    Failed,
    Skipped,
}

impl WebhookStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookStatus::Pending => "pending",
            WebhookStatus::Delivered => "delivered",
            WebhookStatus::Failed => "failed",
            WebhookStatus::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            WebhookStatus::Pending,
            WebhookStatus::Delivered,
            WebhookStatus::Failed,
            WebhookStatus::Skipped,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }
}

impl fmt::Display for WebhookStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one turn of the delivery worker did with a pending event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// The receiver answered 2xx: `delivered`, one more attempt, never sent again.
    Delivered,
    /// The attempt failed; try again at this time (one more attempt, still `pending`).
    RetryAt(u64),
    /// The attempt failed and the horizon is reached, or the event can never be sent (a URL
    /// the gateway refuses): `failed`, one more attempt.
    Failed,
    /// Nowhere to send it (no `notify_url`, no merchant `webhook_url`): `skipped`, no attempt.
    Skipped,
    /// Not attempted (the merchant was at its concurrency limit): due again at this time,
    /// no attempt counted.
    Deferred(u64),
}

impl WebhookOutcome {
    /// What recording it sets: the status, the attempts it adds, the next due time.
    pub(crate) fn transition(self) -> (WebhookStatus, u32, Option<u64>) {
        match self {
            WebhookOutcome::Delivered => (WebhookStatus::Delivered, 1, None),
            WebhookOutcome::RetryAt(at_ms) => (WebhookStatus::Pending, 1, Some(at_ms)),
            WebhookOutcome::Failed => (WebhookStatus::Failed, 1, None),
            WebhookOutcome::Skipped => (WebhookStatus::Skipped, 0, None),
            WebhookOutcome::Deferred(at_ms) => (WebhookStatus::Pending, 0, Some(at_ms)),
        }
    }
}

/// The longest `last_error` kept, in characters.
pub const MAX_WEBHOOK_ERROR_CHARS: usize = 500;

/// `error` cut to [`MAX_WEBHOOK_ERROR_CHARS`] characters, NUL characters dropped (PostgreSQL
/// text cannot hold them): what both backends store as `last_error`.
pub(crate) fn webhook_error_text(error: Option<&str>) -> Option<String> {
    error.map(|e| {
        e.chars()
            .filter(|c| *c != '\0')
            .take(MAX_WEBHOOK_ERROR_CHARS)
            .collect()
    })
}
