//! Pre-authorization: accounts, holds, the hot payment state and idempotency records.
//!
//! [`BalanceStore`] is the one interface the API uses; it has a Redis backend (production:
//! every operation is one Lua script, one round trip, single-slot) and an in-process backend
//! (the sandbox default). Both keep the same invariants, checked by one conformance suite
//! (`gateway/tests/api/conformance.rs`):
//! - `held` equals the sum of the account's live holds; `available = balance + credit_limit −
//!   held`; a hold is created only when `available ≥ amount`, in the same atomic step;
//! - a hold is captured or released exactly once; an expired hold is released explicitly
//!   (lazily inside every account operation, and by the sweeper), never by a key vanishing;
//! - one idempotency record per scoped key, holding the request hash and the first outcome;
//! - at most one live payment per scoped merchant order id.
//!
//! All amounts here are minor units. Redis runs Lua with doubles, so every value the store
//! keeps is bounded by [`MAX_SAFE_MINOR`] (2^53 − 1 fen ≈ 90 trillion CNY), checked on the way
//! in, which keeps the scripts' arithmetic exact.

mod lua;
pub mod memory;
pub mod redis;
pub mod slots;
mod sweeper;

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ids::{
    AccountId, AdjustmentId, IdempotencyKey, MerchantId, MerchantOrderId, PaymentId, ScopeTag,
};
use crate::money::Currency;

pub use sweeper::{spawn_sweeper, Eviction};

/// The largest magnitude of any stored value (balance, credit limit, balance + credit limit,
/// amounts): 2^53 − 1, the largest integer a Lua number holds exactly.
pub const MAX_SAFE_MINOR: i64 = 9_007_199_254_740_991;

/// A prepaid account's identity and the scope tag its keys live under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountKey {
    pub merchant: MerchantId,
    pub account: AccountId,
    pub tag: ScopeTag,
}

impl AccountKey {
    pub fn new(merchant: MerchantId, account: AccountId) -> Self {
        let tag = ScopeTag::account(&merchant, &account);
        Self {
            merchant,
            account,
            tag,
        }
    }
}

/// Where a payment's records live: with its account, or with its merchant when it has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Account(AccountKey),
    Merchant { merchant: MerchantId, tag: ScopeTag },
}

impl Scope {
    pub fn merchant(merchant: MerchantId) -> Self {
        let tag = ScopeTag::merchant(&merchant);
        Scope::Merchant { merchant, tag }
    }
    pub fn tag(&self) -> ScopeTag {
        match self {
            Scope::Account(key) => key.tag,
            Scope::Merchant { tag, .. } => *tag,
        }
    }
    pub fn merchant_id(&self) -> &MerchantId {
        match self {
            Scope::Account(key) => &key.merchant,
            Scope::Merchant { merchant, .. } => merchant,
        }
    }
    pub fn account_id(&self) -> Option<&AccountId> {
        match self {
            Scope::Account(key) => Some(&key.account),
            Scope::Merchant { .. } => None,
        }
    }
}

/// An account as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountSnapshot {
    pub currency: Currency,
    pub balance: i64,
    pub held: i64,
    pub credit_limit: i64,
    /// Incremented by every balance movement (capture, adjustment): lets the settlement store
    /// detect a Redis that rolled back.
    pub seq: u64,
}

impl AccountSnapshot {
    /// `balance + credit_limit − held`; exact because every term is bounded by MAX_SAFE_MINOR.
    pub fn available(&self) -> i64 {
        let available = self.balance + self.credit_limit - self.held;
        debug_assert!(self.held >= 0, "held is never negative: {self:?}");
        available
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    Pending,
    Succeeded,
    Failed,
    Canceled,
    Expired,
    PartiallyRefunded,
    Refunded,
}

impl PaymentStatus {
    pub const ALL: [PaymentStatus; 7] = [
        PaymentStatus::Pending,
        PaymentStatus::Succeeded,
        PaymentStatus::Failed,
        PaymentStatus::Canceled,
        PaymentStatus::Expired,
        PaymentStatus::PartiallyRefunded,
        PaymentStatus::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "pending",
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Failed => "failed",
            PaymentStatus::Canceled => "canceled",
            PaymentStatus::Expired => "expired",
            PaymentStatus::PartiallyRefunded => "partially_refunded",
            PaymentStatus::Refunded => "refunded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// A live payment keeps its merchant order id; a failed, canceled or expired one frees it.
    pub fn is_live(self) -> bool {
        !matches!(
            self,
            PaymentStatus::Failed | PaymentStatus::Canceled | PaymentStatus::Expired
        )
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the customer pays (DESIGN.md §3's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Balance,
    Supplier,
    Alipay,
    Wechatpay,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::Balance,
        Method::Supplier,
        Method::Alipay,
        Method::Wechatpay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Balance => "balance",
            Method::Supplier => "supplier",
            Method::Alipay => "alipay",
            Method::Wechatpay => "wechatpay",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|method| method.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Charge,
    Topup,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Charge => "charge",
            Purpose::Topup => "topup",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Purpose::Charge, Purpose::Topup]
            .into_iter()
            .find(|purpose| purpose.as_str() == s)
    }
}

/// The wire and row names of `PaymentStatus`, `Method` and `Purpose` parse back (an unknown
/// name is an error naming it).
macro_rules! from_str_by_name {
    ($($kind:ident),*) => {$(
        impl std::str::FromStr for $kind {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                Self::parse(s).ok_or_else(|| format!("unknown {} {s:?}", stringify!($kind)))
            }
        }
    )*};
}

from_str_by_name!(PaymentStatus, Method, Purpose);

/// The parts of a payment fixed at creation. Stored once, as JSON, never rewritten.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentDoc {
    pub id: String,
    pub merchant_id: String,
    pub account_id: Option<String>,
    pub merchant_order_id: String,
    pub amount_minor: i64,
    pub currency: Currency,
    pub method: Method,
    pub purpose: Purpose,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A payment as stored: its fixed document, its status and its live hold.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentRecord {
    pub doc: PaymentDoc,
    pub status: PaymentStatus,
    /// The amount still held for this payment (0 once captured or released, or without one).
    pub held_minor: i64,
    /// A channel's acceptance of one of its attempts, kept here from the answer until the
    /// payment's state leaves (see [`BalanceStore::accept`]); the settlement store gets it in
    /// a later group commit.
    pub accepted: Option<AcceptedAttempt>,
}

/// What a channel answered when it took an attempt's order: the customer's next step and
/// the channel's transaction id. The balance store keeps it with the payment so that the
/// answer replays, and reads show it, before the attempt's row is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedAttempt {
    /// The attempt's number (1-based).
    #[serde(rename = "n")]
    pub attempt: u32,
    /// The API's `action` object, as JSON text.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub channel_txn_id: Option<String>,
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// When the channel answered (unix ms).
    #[serde(rename = "at")]
    pub at_ms: u64,
}

/// What an idempotency record says was answered the first time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredOutcome {
    /// `201` with this payment.
    Payment(PaymentId),
    /// `201` with this adjustment (its document kept with the record).
    Adjustment(String),
    /// `402 insufficient_funds` with these details.
    InsufficientFunds { available: i64, shortfall: i64 },
    /// `503 no_channel_available`: every candidate channel was open-circuited or certainly
    /// refused the payment (its hold was released); the failed payment's id.
    NoChannelAvailable(PaymentId),
    /// `201` with this refund (its id).
    Refund(String),
}

impl StoredOutcome {
    /// The compact text kept in Redis: `P:<payment id>`, `A:<adjustment json>`,
    /// `E:insufficient_funds:<available>:<shortfall>` (the scripts write the last one).
    pub fn encode(&self) -> String {
        match self {
            StoredOutcome::Payment(id) => format!("P:{id}"),
            StoredOutcome::Adjustment(doc) => format!("A:{doc}"),
            StoredOutcome::InsufficientFunds {
                available,
                shortfall,
            } => format!("E:insufficient_funds:{available}:{shortfall}"),
            StoredOutcome::NoChannelAvailable(id) => format!("{NO_CHANNEL_AVAILABLE_OUTCOME}{id}"),
            StoredOutcome::Refund(id) => format!("R:{id}"),
        }
    }

    pub fn decode(s: &str) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt(format!("idempotency outcome {s:?}"));
        if let Some(id) = s.strip_prefix("P:") {
            return PaymentId::parse(id)
                .map(StoredOutcome::Payment)
                .ok_or_else(corrupt);
        }
        if let Some(id) = s.strip_prefix(NO_CHANNEL_AVAILABLE_OUTCOME) {
            return PaymentId::parse(id)
                .map(StoredOutcome::NoChannelAvailable)
                .ok_or_else(corrupt);
        }
        if let Some(doc) = s.strip_prefix("A:") {
            return Ok(StoredOutcome::Adjustment(doc.to_owned()));
        }
        if let Some(id) = s.strip_prefix("R:") {
            return Ok(StoredOutcome::Refund(id.to_owned()));
        }
        if let Some(rest) = s.strip_prefix("E:insufficient_funds:") {
            let (available, shortfall) = rest.split_once(':').ok_or_else(corrupt)?;
            return Ok(StoredOutcome::InsufficientFunds {
                available: available.parse().map_err(|_| corrupt())?,
                shortfall: shortfall.parse().map_err(|_| corrupt())?,
            });
        }
        Err(corrupt())
    }
}

/// The stored outcome of a payment no channel took, followed by its id (written by
/// `release.lua` too).
pub const NO_CHANNEL_AVAILABLE_OUTCOME: &str = "E:no_channel_available:";

/// The idempotency part of a mutating request.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub key: IdempotencyKey,
    /// A digest of the normalized request: the same key with another request is a conflict.
    pub request_hash: String,
    pub retention_seconds: u64,
}

/// Common tuning of every store operation.
#[derive(Debug, Clone, Copy)]
pub struct OpContext {
    pub now_ms: u64,
    /// At most this many expired holds are released inside one operation (a bound on the
    /// script's run time; the sweeper does the rest).
    pub lazy_release_max: u32,
}

/// The expiry of a hold that no clock releases (a supplier charge's, DESIGN.md §3): past any
/// `now`, so neither the lazy release inside authorize nor the sweeper ever takes it. Only the
/// channel's word releases it: the resolution loop closes the order at the payment's expiry
/// and releases the hold once the channel confirms it closed or failed (or captures it if the
/// supplier executed after all).
pub const RELEASED_BY_CHANNEL_MS: u64 = u64::MAX;

/// A hold to place with a payment.
#[derive(Debug, Clone, Copy)]
pub struct HoldSpec {
    pub expires_at_ms: u64,
    /// Capture at once (method `balance`): no hold remains, the balance moves.
    pub capture_now: bool,
}

#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    pub scope: Scope,
    pub idempotency: IdempotencyClaim,
    pub order_id: MerchantOrderId,
    pub doc: PaymentDoc,
    /// `Some` for account payments (the scope is then an account), `None` otherwise.
    pub hold: Option<HoldSpec>,
    /// What must reach the settlement store before the request is answered (JSON, opaque to
    /// the store): kept with the payment until `mark_settled`, and the idempotency record
    /// stays in flight meanwhile. `None` answers at once.
    pub pending_record: Option<String>,
    /// `doc` as JSON when the caller has encoded it already (the store row's), so that a
    /// payment's document is encoded once; `None`: the store encodes it.
    pub doc_json: Option<String>,
}

// Returned by value once per call and matched at once: boxing the large variant would add an
// allocation per payment for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum AuthorizeOutcome {
    Created {
        payment: PaymentRecord,
        account: Option<AccountSnapshot>,
    },
    Replay(StoredOutcome),
    IdempotencyConflict,
    IdempotencyInFlight,
    DuplicateOrder(PaymentId),
    InsufficientFunds {
        available: i64,
        shortfall: i64,
    },
    AccountNotFound,
    CurrencyMismatch(Currency),
    /// The account is being rebuilt from the settlement store (its fence, see
    /// [`BalanceStore::rebuild_guard`]): nothing was done; retry shortly.
    AccountBusy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Credit,
    Debit,
}

#[derive(Debug, Clone)]
pub struct AdjustRequest {
    pub account: AccountKey,
    pub idempotency: IdempotencyClaim,
    pub adjustment_id: AdjustmentId,
    pub direction: Direction,
    pub amount_minor: i64,
    pub currency: Currency,
    /// The adjustment's document, kept with the idempotency record for replays.
    pub doc: String,
    /// Its settlement (JSON, opaque to the store), pending until `mark_settled`.
    pub pending_record: String,
}

/// A movement committed by the settlement store, to forget in the balance store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledMark {
    pub tag: ScopeTag,
    /// The payment or adjustment id.
    pub id: String,
    pub idempotency_key: String,
}

/// A payment the settlement store refused to create (it already holds the payment's
/// idempotency key or a live payment under its order id: the store decides): everything the
/// balance store did for it is undone — its capture given back, its hold released, the payment
/// and its pending record gone — and its idempotency key answers as the store says.
#[derive(Debug, Clone, PartialEq)]
pub struct Unwind {
    /// The refused payment (`id`), its scope and the key it claimed.
    pub mark: SettledMark,
    pub order_id: String,
    /// The amount its creation took from the account's balance at once (a balance payment's
    /// capture, an adjustment's debit), given back; 0 for a payment that only held or took
    /// nothing; negative for an adjustment's credit (taken back).
    pub captured_minor: i64,
    /// What the key answers from now on; `None`: nothing (the record is removed, so the client
    /// may use the key again once the order id is free).
    pub key_record: Option<KeyRecord>,
}

/// An idempotency record as the settlement store knows it: the first request's hash and what
/// it came to (the payment it made, or its refusal), honoured for what is left of the
/// retention.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub request_hash: String,
    pub outcome: StoredOutcome,
    pub ttl_seconds: u64,
}

impl KeyRecord {
    /// The record of an answer first given at `created_at_ms`, for what is left at `now_ms`
    /// of `retention_seconds` (at least one second: the answer just given must replay).
    pub fn remaining(
        request_hash: String,
        outcome: StoredOutcome,
        created_at_ms: u64,
        retention_seconds: u64,
        now_ms: u64,
    ) -> Self {
        let age_seconds = now_ms.saturating_sub(created_at_ms) / 1000;
        Self {
            request_hash,
            outcome,
            ttl_seconds: retention_seconds.saturating_sub(age_seconds).max(1),
        }
    }
}

/// A refund the settlement store refused to record (its cap, or another refund under its
/// number): undone in the balance store — its reservation and a top-up refund's hold gone, its
/// key forgotten — and the payment's refund state set to the store's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundUnwind {
    pub payment: PaymentId,
    pub refund_id: String,
    pub idempotency_key: String,
    /// The store's highest refund number, pending + succeeded total, succeeded total.
    pub count: u32,
    pub reserved_minor: i64,
    pub succeeded_minor: i64,
}

/// An idempotency record to put back into the balance store (a rebuild): `key` in scope `tag`
/// answers `record`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRestore {
    pub tag: ScopeTag,
    pub key: String,
    pub record: KeyRecord,
    /// A payment that ended live (succeeded, refunded in part or whole) holds its merchant
    /// order id for good: (order id, payment id), put back where the scope's order index does
    /// not name a live payment (a pending payment comes back with its hold instead).
    pub order: Option<(String, String)>,
}

/// A movement the balance store made that the settlement store may not have yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsettled {
    pub tag: ScopeTag,
    pub id: String,
    /// The account's sequence number after the movement.
    pub seq: u64,
    pub idempotency_key: String,
    /// The pending record as given to `authorize` or `adjust`, or a status change.
    pub record: String,
    /// When the balance store wrote it (unix ms): young records may still be in the hands of
    /// the request that made them.
    pub at_ms: u64,
}

/// The pending record of a payment's final status (written by release and expiry), in the
/// JSON shape the Lua scripts write.
pub fn final_status_record(pid: &str, status: PaymentStatus, now_ms: u64) -> String {
    format!(
        "{{\"status\":{{\"payment_id\":\"{pid}\",\"status\":\"{}\",\"updated_at_ms\":{now_ms}}}}}",
        status.as_str()
    )
}

/// The outbox id of a payment's status change.
pub fn status_record_id(pid: &str) -> String {
    format!("{pid}#s")
}

/// One page of the balance store's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsettledPage {
    pub entries: Vec<Unsettled>,
    /// This page ended a full pass over every scope (the next call starts over).
    pub complete: bool,
}

/// An account's sequence and held amount in the balance store, read before the settlement
/// store's snapshot: a rebuild loads the snapshot only if the account has not moved since
/// (see [`BalanceStore::rebuild_account`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildGuard {
    pub seq: u64,
    pub held: i64,
}

/// One account as the settlement store knows it, to load into the balance store.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountRebuild {
    pub key: AccountKey,
    pub currency: Currency,
    pub balance: i64,
    pub credit_limit: i64,
    pub seq: u64,
    pub created_at_ms: u64,
    /// The account's live holds (pending payments holding money).
    pub holds: Vec<PaymentRecord>,
    /// Each hold's expiry, in the order of `holds`.
    pub hold_expiries_ms: Vec<u64>,
    /// The account as the balance store had it before the snapshot was read (`None`: it did
    /// not have it).
    pub expect: Option<RebuildGuard>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AdjustOutcome {
    Applied(AccountSnapshot),
    Replay(StoredOutcome),
    IdempotencyConflict,
    IdempotencyInFlight,
    InsufficientFunds {
        available: i64,
        shortfall: i64,
    },
    AccountNotFound,
    CurrencyMismatch(Currency),
    /// The balance would leave the exactly representable range.
    OutOfRange,
    /// The account is being rebuilt: nothing was done; retry shortly.
    AccountBusy,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpsertOutcome {
    Created(AccountSnapshot),
    Updated(AccountSnapshot),
    CurrencyMismatch(Currency),
    /// balance + credit_limit would leave the exactly representable range.
    OutOfRange,
}

/// What a channel's success does to the money (DESIGN.md §3's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuccessEffect {
    /// A supplier charge: the hold is captured (balance −= hold, held −= hold).
    Capture,
    /// A top-up: the account is credited with the payment's amount.
    Credit,
    /// A customer's Alipay or WeChat Pay charge: no account money moves; the collection is
    /// recorded by the settlement.
    Collect,
}

impl SuccessEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            SuccessEffect::Capture => "capture",
            SuccessEffect::Credit => "credit",
            SuccessEffect::Collect => "collect",
        }
    }

    /// Whether the effect moves an account's balance (and so its sequence number).
    pub fn moves_balance(self) -> bool {
        !matches!(self, SuccessEffect::Collect)
    }
}

/// A pending payment succeeded at its channel.
#[derive(Debug, Clone)]
pub struct SucceedRequest {
    pub payment: PaymentId,
    pub effect: SuccessEffect,
    /// The payment's amount (credited by [`SuccessEffect::Credit`]).
    pub amount_minor: i64,
    /// The settlement as a pending record (JSON, opaque to the store), kept in the outbox
    /// under [`money_record_id`] until `mark_settled`.
    pub pending_record: String,
}

/// The outbox id of a payment's money movement at its channel's success (distinct from the
/// payment's own id, under which its intent may still wait).
pub fn money_record_id(pid: &str) -> String {
    format!("{pid}#m")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SucceedOutcome {
    /// Succeeded now; `seq` is the account's sequence after the movement (0 for a
    /// collection, which moves no account). The caller already holds the payment: nothing is
    /// read back (one round trip per success).
    Done {
        seq: u64,
    },
    /// Already out of `pending` (succeeded by another path, released, expired…).
    NotPending(PaymentStatus),
    NotFound,
    /// A credit would leave the exactly representable range: nothing changed.
    OutOfRange,
}

/// A supplier executed a charge after its payment ended: debit the account if it can still
/// afford it (late money, DESIGN.md §7).
#[derive(Debug, Clone)]
pub struct LateCaptureRequest {
    pub payment: PaymentId,
    /// The attempt the supplier executed (a payment may have an abandoned attempt besides
    /// the one it succeeded with): one late capture per attempt.
    pub attempt: u32,
    pub amount_minor: i64,
    /// The capture's settlement as a pending record (JSON), kept under [`late_record_id`].
    pub pending_record: String,
}

/// The outbox id of an attempt's late capture.
pub fn late_record_id(pid: &str, attempt: u32) -> String {
    format!("{pid}#l{attempt}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateCaptureOutcome {
    /// Debited now or before (at most once per attempt): the account's sequence after it.
    Done {
        seq: u64,
    },
    /// The account cannot afford it: nothing moved.
    Insufficient {
        available: i64,
    },
    /// The payment is still pending: not late money.
    Pending,
    NotFound,
}

/// A refund to reserve (DESIGN.md §7): the refundable amount is checked and reserved in the
/// same step as the idempotency record; a top-up refund also holds the amount on the account.
#[derive(Debug, Clone)]
pub struct RefundReserveRequest {
    pub payment: PaymentId,
    /// `None`: everything not yet refunded or reserved.
    pub amount_minor: Option<i64>,
    pub idempotency: IdempotencyClaim,
    /// When a top-up refund's hold lapses if nothing settles it.
    pub hold_expires_at_ms: u64,
    /// The refund's intent record (JSON) with placeholders — the string `%ID%`
    /// ([`REFUND_ID_PLACEHOLDER`]), the numbers [`REFUND_NUMBER_PLACEHOLDER`] and
    /// [`REFUND_AMOUNT_PLACEHOLDER`] — filled in by the store and kept in the outbox (under the
    /// refund id) until settled.
    pub intent_template: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundReserveOutcome {
    Created {
        refund_id: String,
        /// 1 for the payment's first refund, 2 for the second…
        number: u32,
        amount_minor: i64,
    },
    Replay(StoredOutcome),
    IdempotencyConflict,
    IdempotencyInFlight,
    NotFound,
    /// Not `succeeded` or `partially_refunded`.
    InvalidState(PaymentStatus),
    /// More than is left to refund (what is left).
    Exceeds {
        remaining: i64,
    },
    /// A top-up refund the account cannot cover.
    InsufficientFunds {
        available: i64,
        shortfall: i64,
    },
    /// A top-up refund while its account is being rebuilt: nothing was done; retry shortly.
    AccountBusy,
}

/// A refund's outcome at the channel.
#[derive(Debug, Clone)]
pub struct RefundFinishRequest {
    pub payment: PaymentId,
    pub refund_id: String,
    pub succeeded: bool,
    /// The refund's settlement (succeeded) or its final status (failed), as a pending record
    /// (JSON), kept in the outbox under `<refund id>#f` until settled.
    pub pending_record: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundFinishOutcome {
    /// Ended now; `seq` is the account's sequence when a balance moved (else 0), and the
    /// payment's status after it.
    Done {
        seq: u64,
        payment_status: PaymentStatus,
    },
    /// It had ended before (`succeeded` or `failed`): nothing changed.
    Already(String),
    NotFound,
}

pub const REFUND_ID_PLACEHOLDER: &str = "%ID%";
pub const REFUND_NUMBER_PLACEHOLDER: u32 = 4_294_967_290;
pub const REFUND_AMOUNT_PLACEHOLDER: i64 = 9_007_199_254_740_990;
/// In a succeeded refund's settlement: the payment row's status member (written
/// `partially_refunded`) and the account's sequence, replaced by the balance store with the
/// status the refund reached and the sequence it took (`refund_finish.lua`).
pub const REFUND_STATUS_PLACEHOLDER: &str = "\"status\":\"partially_refunded\"";
pub const REFUND_SEQ_PLACEHOLDER: u64 = 18_446_744_073_709_551_608;

/// The outbox id of a refund's outcome.
pub fn refund_outcome_id(refund_id: &str) -> String {
    format!("{refund_id}#f")
}

/// A payment to put back into the balance store from the settlement store (see
/// `restore_payment.lua`): its record (without a hold) and its refunds' state.
#[derive(Debug, Clone)]
pub struct RestorePayment {
    pub record: PaymentRecord,
    /// The highest refund number handed out.
    pub refund_count: u32,
    /// Pending and succeeded refunds' total.
    pub refunds_reserved: i64,
    pub refunds_succeeded: i64,
    /// Pending refunds: (refund id, number, amount, created ms).
    pub pending_refunds: Vec<(String, u32, i64, u64)>,
}

/// The result of moving a payment out of `pending`.
// Returned by value once per call and matched at once: boxing the large variant would add an
// allocation per payment for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum TransitionOutcome {
    Done(PaymentRecord),
    /// The payment is no longer pending (already captured, released, expired…).
    NotPending(PaymentStatus),
    NotFound,
}

/// Operating errors of a store. Every one of them fails closed: the API answers
/// `503 unavailable` and authorizes nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("balance store unreachable: {0}")]
    Unavailable(String),
    #[error("balance store timed out after {0} ms")]
    Timeout(u64),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Two scopes hashed to the same tag: refuse rather than mix two accounts' money.
    #[error("scope tag collision on {0}")]
    TagCollision(String),
    #[error("redis refused to run: {0}")]
    Misconfigured(String),
}

/// The pre-authorization store. Every method is one atomic step (one Redis round trip).
#[async_trait]
pub trait BalanceStore: Send + Sync + 'static {
    /// Creates an account (balance 0) or updates its credit limit. The currency never changes.
    async fn upsert_account(
        &self,
        key: &AccountKey,
        currency: Currency,
        credit_limit: i64,
        ctx: OpContext,
    ) -> Result<UpsertOutcome, StoreError>;

    /// The account after releasing its expired holds (bounded by `ctx.lazy_release_max`).
    async fn read_account(
        &self,
        key: &AccountKey,
        ctx: OpContext,
    ) -> Result<Option<AccountSnapshot>, StoreError>;

    /// Idempotency and order-id checks, lazy release of expired holds, the available check,
    /// the hold (or the immediate capture) and the payment record, atomically.
    async fn authorize(
        &self,
        req: &AuthorizeRequest,
        ctx: OpContext,
    ) -> Result<AuthorizeOutcome, StoreError>;

    /// A pending payment succeeded: its effect on the money (capture the hold, credit the
    /// account, or nothing), status `succeeded`, and its settlement into the outbox, in one
    /// atomic step. Exactly once: a second call finds it no longer pending.
    async fn succeed(
        &self,
        req: &SucceedRequest,
        ctx: OpContext,
    ) -> Result<SucceedOutcome, StoreError>;

    /// Releases a pending payment's hold (if any) and sets its final status (`failed`,
    /// `canceled` or `expired`), which frees its merchant order id.
    async fn release(
        &self,
        payment: &PaymentId,
        to: PaymentStatus,
        ctx: OpContext,
    ) -> Result<TransitionOutcome, StoreError>;

    /// Late money on a supplier charge (see [`LateCaptureRequest`]). At most once per attempt.
    async fn late_capture(
        &self,
        req: &LateCaptureRequest,
        ctx: OpContext,
    ) -> Result<LateCaptureOutcome, StoreError>;

    /// Reserves a refund (see [`RefundReserveRequest`]): one atomic step.
    async fn reserve_refund(
        &self,
        req: &RefundReserveRequest,
        ctx: OpContext,
    ) -> Result<RefundReserveOutcome, StoreError>;

    /// Ends a pending refund (see [`RefundFinishRequest`]): exactly once.
    async fn finish_refund(
        &self,
        req: &RefundFinishRequest,
        ctx: OpContext,
    ) -> Result<RefundFinishOutcome, StoreError>;

    /// Puts back a payment the balance store lost (see [`RestorePayment`]); `false` when it
    /// was there (nothing changed).
    async fn restore_payment(&self, restore: &RestorePayment) -> Result<bool, StoreError>;

    /// Ends a pending payment that no channel took: as `release` to `failed`, and the
    /// idempotency record's outcome becomes `no_channel_available` (replayed as 503).
    async fn fail_unrouted(
        &self,
        payment: &PaymentId,
        idempotency: &IdempotencyKey,
        ctx: OpContext,
    ) -> Result<TransitionOutcome, StoreError>;

    /// A manual credit or debit; a debit never takes `available` below zero.
    async fn adjust(
        &self,
        req: &AdjustRequest,
        ctx: OpContext,
    ) -> Result<AdjustOutcome, StoreError>;

    async fn payment(&self, id: &PaymentId) -> Result<Option<PaymentRecord>, StoreError>;

    /// The live payment with this merchant order id in this scope, if any.
    async fn live_payment_by_order(
        &self,
        scope: &Scope,
        order_id: &MerchantOrderId,
    ) -> Result<Option<PaymentRecord>, StoreError>;

    /// Releases expired holds across all accounts, at most `budget` accounts per call;
    /// returns how many holds it released. Repeated calls make progress through every account.
    async fn sweep_expired(&self, ctx: OpContext, budget: usize) -> Result<u64, StoreError>;

    /// Lets go of finished payments whose state is older than the backend's retention, a
    /// bounded number per call (see `scripts/evict.lua`); returns how many left. Repeated
    /// calls make progress through every payment. The settlement store answers for a payment
    /// once it is gone ([`crate::payments::view::ensure_payment`] puts it back when needed).
    /// The in-process store keeps everything (it lives as long as its sandbox process).
    async fn evict_finished(&self, now_ms: u64) -> Result<u64, StoreError> {
        let _ = now_ms;
        Ok(0)
    }

    /// Forgets committed movements' pending records and lets their idempotency records
    /// replay. One round trip for the whole batch.
    async fn mark_settled(&self, marks: &[SettledMark]) -> Result<(), StoreError>;

    /// A channel took the order of an attempt of `mark`'s payment, whose intent is committed:
    /// keeps `accepted` with the payment (read back by [`BalanceStore::payment`]), then does
    /// what [`BalanceStore::mark_settled`] does for `mark`, in one call. The answer may go
    /// out after it: its replay and every read show the action, while the attempt's outcome
    /// rides a later group commit (DESIGN.md §7: a checkout waits on two commits, not three).
    /// Nothing is kept for a payment this store does not have.
    async fn accept(
        &self,
        mark: &SettledMark,
        accepted: &AcceptedAttempt,
    ) -> Result<(), StoreError>;

    /// Undoes a pending payment whose intent could not be committed: hold released, status
    /// `failed`, pending and idempotency records removed (the client may retry).
    async fn abandon(
        &self,
        payment: &PaymentId,
        idempotency: &IdempotencyKey,
    ) -> Result<(), StoreError>;

    /// Forgets a movement the settlement store refused because this store rolled back (its
    /// sequence number was already used), and sets back what lets it happen again (see
    /// `void.lua`): a payment made with its movement ends `failed` (the client retries with
    /// its key); a channel success's payment is `pending` again; a refund's success is
    /// `pending` again with the payment's refunded total and status back; a late capture's
    /// marker goes. Its pending and idempotency records are removed. No balance moves here:
    /// the account is rebuilt right after.
    async fn void(&self, mark: &SettledMark) -> Result<(), StoreError>;

    /// Undoes a payment the settlement store refused to create (see [`Unwind`]). `false` when
    /// its pending record is gone (already settled, unwound or abandoned): nothing changes,
    /// so a capture is never given back twice.
    async fn unwind(&self, unwind: &Unwind) -> Result<bool, StoreError>;

    /// Undoes a refund the settlement store refused (see [`RefundUnwind`]). `false` when its
    /// pending record is gone (nothing changes).
    async fn unwind_refund(&self, unwind: &RefundUnwind) -> Result<bool, StoreError>;

    /// Puts back idempotency records (a rebuild), each only where the key has none: one
    /// round trip for the lot. Returns how many were put back.
    async fn restore_keys(&self, records: &[KeyRestore]) -> Result<u64, StoreError>;

    /// Pending records not yet settled, at most about `budget` scopes' worth per call;
    /// repeated calls make progress through every scope.
    async fn unsettled(&self, budget: usize) -> Result<UnsettledPage, StoreError>;

    /// The account's sequence and held amount now (`None`: no such account), to read before
    /// a rebuild's snapshot of the settlement store; and the account fenced off new movements
    /// until `fence_until_ms` (authorize, adjust and a top-up refund's reserve answer
    /// `AccountBusy`), so the movements on their way to the store drain and the rebuild is not
    /// starved by live traffic. [`BalanceStore::rebuild_account`] lifts the fence; a rebuild
    /// that gives up leaves it to lapse. Moves no money (no lazy release).
    async fn rebuild_guard(
        &self,
        key: &AccountKey,
        fence_until_ms: u64,
    ) -> Result<Option<RebuildGuard>, StoreError>;

    /// Replaces one account's balance, sequence and live holds with the given ones — only if
    /// no movement of the account is on its way to the settlement store and the account is
    /// still as `rebuild.expect` says; otherwise nothing changes and `false` comes back (read
    /// again and retry). The fence that keeps a rebuild and live traffic from interleaving.
    async fn rebuild_account(&self, rebuild: &AccountRebuild) -> Result<bool, StoreError>;

    /// Whether the store holds any account at all (an empty Redis is rebuilt at start).
    async fn has_accounts(&self) -> Result<bool, StoreError>;

    /// Readiness: the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}
