//! What the core answers when it does not do what was asked: each variant is one kind of
//! answer, mapped to HTTP in one place (`api::error`).

use crate::money::Currency;
use crate::preauth::{PaymentStatus, StoreError};
use crate::settlement::settler::SettleFailure;
use crate::settlement::stream::StreamError;
use crate::settlement::{CommitOutcome, SettleError};
use crate::telemetry;

/// What a lookup did not find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Payment,
    Account,
    /// No live payment holds this merchant order id.
    LiveOrder,
}

impl Missing {
    pub fn message(self) -> &'static str {
        match self {
            Missing::Payment => "no such payment",
            Missing::Account => "no such account",
            Missing::LiveOrder => "no live payment with this merchant_order_id",
        }
    }
}

/// Why the core cannot serve a request now (nothing was done, or what was done is finished by
/// recovery): a retry later is safe. `as_str` is the stable `reason` clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    BalanceStore,
    SettlementStore,
    SettlementQueueFull,
    /// The balance store rolled back: the account must be rebuilt from the record first.
    AccountRebuildRequired,
    /// A settlement's content conflicts with the stored one: flagged for a human.
    SettlementConflict,
    /// A channel could not confirm either way.
    Channel,
    /// The account is being rebuilt from the store (a rebuild fences it for a moment).
    AccountRebuildInProgress,
}

impl Unavailable {
    pub fn as_str(self) -> &'static str {
        match self {
            Unavailable::BalanceStore => "balance_store_unavailable",
            Unavailable::SettlementStore => "settlement_store_unavailable",
            Unavailable::SettlementQueueFull => "settlement_queue_full",
            Unavailable::AccountRebuildRequired => "account_rebuild_required",
            Unavailable::SettlementConflict => "settlement_conflict",
            Unavailable::Channel => "channel_unavailable",
            Unavailable::AccountRebuildInProgress => "account_rebuild_in_progress",
        }
    }

    /// Why a settlement the store refused is not done: a sequence conflict means the balance
    /// store rolled back and the account must be rebuilt; a content conflict is flagged.
    pub fn of_commit(outcome: &CommitOutcome) -> Self {
        match outcome {
            CommitOutcome::SequenceConflict { .. } => Unavailable::AccountRebuildRequired,
            _ => Unavailable::SettlementConflict,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PaymentError {
    /// A field the core checks against state (an account's currency, a balance's range).
    Invalid {
        field: &'static str,
        message: String,
    },
    NotFound(Missing),
    /// Another merchant's payment.
    OtherMerchant,
    InsufficientFunds {
        available: i64,
        shortfall: i64,
        currency: Currency,
    },
    /// The key was used with another request.
    IdempotencyConflict,
    /// The first request with this key is still running.
    IdempotencyInFlight,
    /// The merchant order id belongs to a live payment.
    DuplicateOrder {
        payment_id: String,
    },
    /// The resource's state does not allow this (`status`: the payment's, when there is one).
    InvalidState {
        message: String,
        status: Option<PaymentStatus>,
    },
    /// No channel could take the payment; nothing was charged.
    NoChannelAvailable {
        payment_id: Option<String>,
    },
    Unavailable {
        reason: Unavailable,
        payment_id: Option<String>,
    },
}

impl PaymentError {
    pub fn unavailable(reason: Unavailable, payment_id: Option<&str>) -> Self {
        PaymentError::Unavailable {
            reason,
            payment_id: payment_id.map(str::to_owned),
        }
    }

    /// Admission refused before any money moved: nothing to finish later.
    pub fn not_admitted(err: StreamError) -> Self {
        let reason = match err {
            StreamError::QueueFull => Unavailable::SettlementQueueFull,
            _ => Unavailable::SettlementStore,
        };
        Self::unavailable(reason, None)
    }

    /// Money moved in the balance store but its commit did not complete: the answer names the
    /// payment (or adjustment); its key stays in flight until recovery has committed it.
    pub fn unsettled(id: &str, err: &SettleFailure) -> Self {
        tracing::warn!(id, error = %err, "movement not committed; recovery will finish it");
        let reason = match err {
            SettleFailure::Stream(StreamError::QueueFull) => Unavailable::SettlementQueueFull,
            _ => Unavailable::SettlementStore,
        };
        Self::unavailable(reason, Some(id))
    }

    /// The outcome's name in the metrics.
    pub fn label(&self) -> &'static str {
        match self {
            PaymentError::Invalid { .. } => "invalid",
            PaymentError::NotFound(_) => "not_found",
            PaymentError::OtherMerchant => "forbidden",
            PaymentError::InsufficientFunds { .. } => "insufficient_funds",
            PaymentError::IdempotencyConflict => "idempotency_conflict",
            PaymentError::IdempotencyInFlight => "idempotency_in_flight",
            PaymentError::DuplicateOrder { .. } => "duplicate_order",
            PaymentError::InvalidState { .. } => "invalid_state",
            PaymentError::NoChannelAvailable { .. } => "no_channel_available",
            PaymentError::Unavailable { .. } => "unsettled",
        }
    }
}

/// Every balance-store failure fails closed: nothing authorized. Logged here, once.
impl From<StoreError> for PaymentError {
    fn from(err: StoreError) -> Self {
        let kind = match &err {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Timeout(_) => "timeout",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::TagCollision(_) => "tag_collision",
            StoreError::Misconfigured(_) => "misconfigured",
        };
        telemetry::store_error(kind);
        match &err {
            StoreError::Unavailable(_) | StoreError::Timeout(_) => {
                tracing::warn!(error = %err, "balance store unavailable")
            }
            _ => tracing::error!(error = %err, "balance store failure"),
        }
        Self::unavailable(Unavailable::BalanceStore, None)
    }
}

/// Settlement store failures outside the money path (accounts, reads): fail closed.
impl From<SettleError> for PaymentError {
    fn from(err: SettleError) -> Self {
        tracing::warn!(error = %err, "settlement store unavailable");
        Self::unavailable(Unavailable::SettlementStore, None)
    }
}

/// Why settling or resolving a payment did not finish (the paths that follow a payment after
/// its creation: callbacks, the resolution loop, cancel, refunds).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Balances(#[from] StoreError),
    #[error(transparent)]
    Store(#[from] SettleError),
    #[error(transparent)]
    Settle(#[from] SettleFailure),
    /// The channel reports another amount or currency than the payment's: never settled.
    #[error("payment {payment_id}: the channel reports {amount_minor} {currency}, not the payment's amount")]
    AmountMismatch {
        payment_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// The balance store does not know the payment (it lost it): left for recovery/rebuild.
    #[error("payment {0} is not in the balance store")]
    Unknown(String),
    /// The settlement store refused the settlement (a conflict, flagged).
    #[error("payment {payment_id}: settlement refused ({outcome:?})")]
    Refused {
        payment_id: String,
        outcome: CommitOutcome,
    },
}
