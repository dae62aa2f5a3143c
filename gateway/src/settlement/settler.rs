//! The settlement pipeline as the API uses it: admission, settling a movement and waiting for
//! its commit (bounded), recording a payment's intent, and applying final statuses.

use std::sync::Arc;
use std::time::Duration;

use super::stream::{Admission, SettlementStream, StreamError};
use super::{
    AttemptRow, AttemptUpdate, CommitOutcome, IntentOutcome, PaymentRow, RefundRecorded, RefundRow,
    RefundStatusChange, RefusalRow, SettleError, Settlement, SettlementStore, StatusChange, Write,
    Written,
};
use crate::preauth::{BalanceStore, SettledMark};

pub struct Settler {
    pub store: Arc<dyn SettlementStore>,
    pub balances: Arc<dyn BalanceStore>,
    stream: SettlementStream,
    settle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SettleFailure {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Store(#[from] SettleError),
    #[error("the commit did not finish within the settle timeout")]
    Timeout,
}

impl Settler {
    pub fn new(
        store: Arc<dyn SettlementStore>,
        balances: Arc<dyn BalanceStore>,
        stream: SettlementStream,
        settle_timeout: Duration,
    ) -> Self {
        Self {
            store,
            balances,
            stream,
            settle_timeout,
        }
    }

    /// The group commit, for other writers that share it (webhook outcomes).
    pub fn stream(&self) -> &SettlementStream {
        &self.stream
    }

    /// Whether a money movement may start now (checked before the Redis call).
    /// See [`SettlementStream::admit`]: drop the [`Admission`] right before submitting.
    pub fn admit(&self) -> Result<Admission, StreamError> {
        self.stream.admit()
    }

    /// How long an idempotency key is honoured (`preauth.idempotency_retention_seconds`).
    pub fn idempotency_retention_seconds(&self) -> u64 {
        self.stream.idempotency_retention_seconds()
    }

    pub fn is_healthy(&self) -> bool {
        self.stream.is_healthy()
    }

    /// Commits a settlement through the group-commit stream and waits, at most the settle
    /// timeout, for the commit (and for the balance store to learn it).
    pub async fn settle(
        &self,
        settlement: Settlement,
        mark: SettledMark,
    ) -> Result<CommitOutcome, SettleFailure> {
        match tokio::time::timeout(
            self.settle_timeout,
            self.stream.submit(settlement, Some(mark)),
        )
        .await
        {
            Ok(result) => Ok(result?),
            Err(_) => Err(SettleFailure::Timeout),
        }
    }

    /// Queues without waiting for the balance-store mark (recovery re-drives).
    pub async fn settle_unmarked(
        &self,
        settlement: Settlement,
    ) -> Result<CommitOutcome, SettleFailure> {
        Ok(self.stream.submit(settlement, None).await?)
    }

    /// Commits a payment's intent (with its first channel attempt, when it has one) through
    /// the group commit; with a mark, then lets its idempotency record replay (without one
    /// the caller marks it once it has answered: a channel payment's key stays in flight
    /// while its channels are called).
    pub async fn record_intent(
        &self,
        row: &PaymentRow,
        first_attempt: Option<&AttemptRow>,
        mark: Option<SettledMark>,
    ) -> Result<IntentOutcome, SettleFailure> {
        let write = Write::Intent {
            payment: row.clone(),
            first_attempt: first_attempt.cloned(),
        };
        match self.write(write, mark).await? {
            Written::Intent(outcome) => Ok(outcome),
            other => Err(unexpected(&other)),
        }
    }

    /// As [`Settler::record_intent`] without a mark, for a caller that stops waiting after the
    /// settle timeout: the write is already queued and may still commit, so when the timeout
    /// ends the wait (`Err(Timeout)`), its fate is handed to `late`, in a task of its own, once
    /// known. The caller must then undo nothing itself: `late` decides, so no intent committed
    /// after its request gave up is left behind as a ghost holding money and an order id.
    pub async fn record_intent_or_later<F, Fut>(
        &self,
        row: &PaymentRow,
        first_attempt: Option<&AttemptRow>,
        late: F,
    ) -> Result<IntentOutcome, SettleFailure>
    where
        F: FnOnce(Result<IntentOutcome, SettleFailure>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let write = Write::Intent {
            payment: row.clone(),
            first_attempt: first_attempt.cloned(),
        };
        // Waited for here; only a wait that outlives the timeout moves to a task of its own
        // (no spawn, and no hop back from it, on the common path).
        let stream = self.stream.clone();
        let mut written = Box::pin(async move { stream.submit_write(write, None).await });
        let fate = |written: Result<Written, StreamError>| match written {
            Ok(Written::Intent(outcome)) => Ok(outcome),
            Ok(other) => Err(unexpected(&other)),
            Err(err) => Err(SettleFailure::Stream(err)),
        };
        match tokio::time::timeout(self.settle_timeout, &mut written).await {
            Ok(result) => fate(result),
            Err(_) => {
                tokio::spawn(async move { late(fate(written.await)).await });
                Err(SettleFailure::Timeout)
            }
        }
    }

    /// Queues a refusal for the next group commit without waiting for it (the request's answer
    /// does not depend on it: it only lets the replay survive a balance store that forgets
    /// the key). A full queue or a failed commit loses it, said in the log: the balance store
    /// still has the record for its retention.
    pub fn record_refusal_later(&self, refusal: RefusalRow) {
        let stream = self.stream.clone();
        tokio::spawn(async move {
            let key = refusal.idempotency_key.clone();
            if let Err(err) = stream.submit_write(Write::Refusal(refusal), None).await {
                tracing::warn!(idempotency_key = %key, error = %err, "refusal not recorded in the settlement store");
            }
        });
    }

    /// Records an attempt's outcome through the group commit (it shares the transaction of
    /// the payments committing beside it); with a mark, then lets that record replay (in the
    /// batch's one balance-store call). `false` when there is no such attempt, or it has
    /// succeeded already.
    pub async fn save_attempt(
        &self,
        update: AttemptUpdate,
        mark: Option<SettledMark>,
    ) -> Result<bool, SettleFailure> {
        match self.write(Write::Attempt(update), mark).await? {
            Written::Attempt(updated) => Ok(updated),
            other => Err(unexpected(&other)),
        }
    }

    /// Queues an attempt's outcome for the next group commit without waiting for it (an
    /// accepted attempt: the balance store holds the acceptance for reads and replays until
    /// then, and the resolution loop treats an attempt still `unknown` like an accepted one).
    pub fn save_attempt_later(&self, update: AttemptUpdate) -> Result<(), StreamError> {
        self.stream.enqueue(Write::Attempt(update))
    }

    /// One write through the stream, waited for at most the settle timeout.
    async fn write(
        &self,
        write: Write,
        mark: Option<SettledMark>,
    ) -> Result<Written, SettleFailure> {
        match tokio::time::timeout(self.settle_timeout, self.stream.submit_write(write, mark)).await
        {
            Ok(result) => Ok(result?),
            Err(_) => Err(SettleFailure::Timeout),
        }
    }

    /// Records a refund's intent; once recorded, lets its idempotency record replay. A refund
    /// the store refused (`Conflict`, `Exceeds`) is unwound in the balance store, its refund
    /// state set to the store's (see `rebuild::unwind_refused_refund`). So is one `fresh`ly
    /// reserved (a request's, not a re-drive) that the store already holds: the balance store
    /// had forgotten it, and the caller answers with the stored refund.
    pub async fn record_refund(
        &self,
        refund: &RefundRow,
        mark: SettledMark,
        fresh: bool,
    ) -> Result<RefundRecorded, SettleFailure> {
        let recorded = tokio::time::timeout(self.settle_timeout, self.store.record_refund(refund))
            .await
            .map_err(|_| SettleFailure::Timeout)??;
        let forgotten = fresh && recorded == RefundRecorded::AlreadyRecorded;
        match recorded {
            RefundRecorded::Inserted | RefundRecorded::AlreadyRecorded if !forgotten => self
                .balances
                .mark_settled(&[mark])
                .await
                .map_err(|e| SettleFailure::Store(SettleError::Unavailable(e.to_string())))?,
            RefundRecorded::Inserted
            | RefundRecorded::AlreadyRecorded
            | RefundRecorded::Conflict
            | RefundRecorded::Exceeds { .. } => {
                super::rebuild::unwind_refused_refund(
                    self.store.as_ref(),
                    self.balances.as_ref(),
                    refund,
                    &mark.idempotency_key,
                )
                .await
                .map_err(|e| SettleFailure::Store(SettleError::Unavailable(e.to_string())))?;
            }
        }
        Ok(recorded)
    }

    /// Applies a failed refund's status, then forgets it in the balance store.
    pub async fn apply_refund_status(
        &self,
        change: &RefundStatusChange,
        mark: SettledMark,
    ) -> Result<bool, SettleFailure> {
        let applied = self.store.set_refund_status(change).await?;
        self.balances
            .mark_settled(&[mark])
            .await
            .map_err(|e| SettleFailure::Store(SettleError::Unavailable(e.to_string())))?;
        Ok(applied)
    }

    /// Applies a final status to the store, then forgets it in the balance store.
    pub async fn apply_status(
        &self,
        change: &StatusChange,
        mark: SettledMark,
    ) -> Result<bool, SettleFailure> {
        let applied = self.store.set_final_status(change).await?;
        self.balances
            .mark_settled(&[mark])
            .await
            .map_err(|e| SettleFailure::Store(SettleError::Unavailable(e.to_string())))?;
        Ok(applied)
    }
}

/// A write that came back as another kind: a bug of the stream, refused.
fn unexpected(written: &Written) -> SettleFailure {
    SettleFailure::Stream(StreamError::Refused(format!(
        "unexpected write result {written:?}"
    )))
}
