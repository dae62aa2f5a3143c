//! The settlement stream: a bounded queue in front of ONE writer task that group-commits.
//!
//! A request submits what its answer depends on (a settlement, a channel payment's intent, an
//! attempt's outcome: a [`Write`]) and waits. The writer takes the first write, then
//! everything already queued, then waits up to `batch_max_wait_ms` for more, up to
//! `batch_max_rows`; it commits the batch in one transaction (one fsync for all of them) and
//! wakes every waiter with its own outcome. Under load batches grow by themselves; at low
//! load a write waits at most one short window.
//!
//! Admission is checked *before* any money moves in Redis: a full queue or a store that failed
//! its last commit refuses at once (`503 unavailable`), so nothing is half done.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::recovery::void_and_rebuild;
use super::{
    CommitOutcome, IntentOutcome, SettleError, Settlement, SettlementStore, Write, Written,
};
use crate::preauth::{BalanceStore, SettledMark};
use crate::telemetry;

/// Bounds of the stream, from configuration.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    pub queue_capacity: usize,
    pub batch_max_rows: usize,
    pub batch_max_wait_ms: u64,
    /// While unhealthy, the writer pings the store this often to notice it came back.
    pub health_check_interval_ms: u64,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StreamError {
    #[error("the settlement queue is full")]
    QueueFull,
    #[error("the settlement store is unavailable")]
    StoreUnavailable,
    #[error("the settlement writer has stopped")]
    Stopped,
    #[error("the settlement was refused: {0}")]
    Refused(String),
}

struct Job {
    write: Write,
    /// What to forget in the balance store once committed.
    mark: Option<SettledMark>,
    done: oneshot::Sender<Result<Written, StreamError>>,
}

/// Who waits for a queued write, and what to mark settled once it is committed.
struct Waiter {
    mark: Option<SettledMark>,
    done: oneshot::Sender<Result<Written, StreamError>>,
}

/// The handle requests use. Cheap to clone.
#[derive(Clone)]
pub struct SettlementStream {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

struct Shared {
    healthy: AtomicBool,
    depth: AtomicUsize,
    capacity: usize,
}

impl SettlementStream {
    /// Starts the writer; it runs until `shutdown` turns true and the queue is drained.
    /// After each commit it tells `balances` which movements are settled, in one call.
    pub fn spawn(
        store: Arc<dyn SettlementStore>,
        balances: Arc<dyn BalanceStore>,
        settings: StreamSettings,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        debug_assert!(settings.queue_capacity > 0 && settings.batch_max_rows > 0);
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            depth: AtomicUsize::new(0),
            capacity: settings.queue_capacity,
        });
        let writer = Writer {
            store,
            balances,
            settings,
            rx,
            shared: shared.clone(),
        };
        let handle = tokio::spawn(writer.run(shutdown));
        (Self { tx, shared }, handle)
    }

    /// Whether a new money movement may start: the queue has room and the store is healthy.
    pub fn admit(&self) -> Result<(), StreamError> {
        if !self.shared.healthy.load(Ordering::Relaxed) {
            return Err(StreamError::StoreUnavailable);
        }
        if self.shared.depth.load(Ordering::Relaxed) >= self.shared.capacity {
            return Err(StreamError::QueueFull);
        }
        Ok(())
    }

    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    pub fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }

    /// Queues a settlement and waits for its commit (and, when committed, for `mark` to be
    /// settled in the balance store).
    pub async fn submit(
        &self,
        settlement: Settlement,
        mark: Option<SettledMark>,
    ) -> Result<CommitOutcome, StreamError> {
        match self
            .submit_write(Write::Settlement(settlement), mark)
            .await?
        {
            Written::Settlement(outcome) => Ok(outcome),
            other => Err(StreamError::Refused(format!(
                "a settlement came back as {other:?}"
            ))),
        }
    }

    /// Queues any write and waits for its commit (and, when an intent or a settlement was
    /// committed, for `mark` to be settled in the balance store).
    pub async fn submit_write(
        &self,
        write: Write,
        mark: Option<SettledMark>,
    ) -> Result<Written, StreamError> {
        let (done, wait) = oneshot::channel();
        // Counted before it is queued: the writer may take and uncount it before `try_send`
        // even returns, and the count must never go below zero.
        let depth = self.shared.depth.fetch_add(1, Ordering::Relaxed) + 1;
        if let Err(e) = self.tx.try_send(Job { write, mark, done }) {
            self.shared.depth.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => StreamError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => StreamError::Stopped,
            });
        }
        telemetry::settlement_queue_depth(depth);
        wait.await.map_err(|_| StreamError::Stopped)?
    }
}

struct Writer {
    store: Arc<dyn SettlementStore>,
    balances: Arc<dyn BalanceStore>,
    settings: StreamSettings,
    rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
}

impl Writer {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut batch: Vec<Job> = Vec::with_capacity(self.settings.batch_max_rows);
        let health_interval = Duration::from_millis(self.settings.health_check_interval_ms);
        loop {
            let first = tokio::select! {
                job = self.rx.recv() => job,
                _ = tokio::time::sleep(health_interval), if !self.shared.healthy.load(Ordering::Relaxed) => {
                    self.check_health().await;
                    continue;
                }
                _ = shutdown.changed() => {
                    // Stop taking new work; what is queued is still committed below.
                    self.rx.close();
                    continue;
                }
            };
            let Some(first) = first else {
                break; // closed and drained
            };
            batch.push(first);
            self.fill(&mut batch).await;
            self.commit(&mut batch).await;
        }
    }

    /// Adds what is queued, then waits up to `batch_max_wait_ms` for more.
    async fn fill(&mut self, batch: &mut Vec<Job>) {
        let max = self.settings.batch_max_rows;
        while batch.len() < max {
            match self.rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if batch.len() >= max || self.settings.batch_max_wait_ms == 0 {
            return;
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.batch_max_wait_ms);
        while batch.len() < max {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) | Err(_) => break,
            }
        }
    }

    async fn commit(&mut self, batch: &mut Vec<Job>) {
        // Move the writes out (no copy on the hot path); keep who waits for what.
        let rows = batch.len();
        let (writes, waiters): (Vec<Write>, Vec<Waiter>) = batch
            .drain(..)
            .map(|job| {
                (
                    job.write,
                    Waiter {
                        mark: job.mark,
                        done: job.done,
                    },
                )
            })
            .unzip();
        let started = Instant::now();
        let result = self.store.commit_writes(&writes).await;
        telemetry::settlement_batch(rows, started.elapsed(), result.is_ok());
        let depth = self
            .shared
            .depth
            .fetch_sub(rows, Ordering::Relaxed)
            .saturating_sub(rows);
        telemetry::settlement_queue_depth(depth);
        match result {
            Ok(results) => {
                debug_assert_eq!(results.len(), rows);
                self.shared.healthy.store(true, Ordering::Relaxed);
                self.answer(writes, waiters, results).await;
            }
            Err(SettleError::Invalid(reason)) => {
                // A bug, not an outage: refuse these without marking the store down.
                tracing::error!(%reason, "write batch refused as invalid");
                for waiter in waiters {
                    let _ = waiter.done.send(Err(StreamError::Refused(reason.clone())));
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, rows, "settlement commit failed; refusing new money movements until the store answers");
                self.shared.healthy.store(false, Ordering::Relaxed);
                for waiter in waiters {
                    let _ = waiter.done.send(Err(StreamError::StoreUnavailable));
                }
            }
        }
    }

    /// After a committed batch: one balance-store round trip marks every committed movement
    /// and intent settled (if it fails the money is still safe: it is committed, and the
    /// recovery loop marks them later); then each waiter gets its own outcome.
    async fn answer(
        &self,
        writes: Vec<Write>,
        mut waiters: Vec<Waiter>,
        results: Vec<Result<Written, SettleError>>,
    ) {
        let marks: Vec<SettledMark> = waiters
            .iter_mut()
            .zip(&results)
            .filter(|(_, r)| {
                matches!(
                    r,
                    Ok(Written::Settlement(
                        CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted
                    )) | Ok(Written::Intent(
                        IntentOutcome::Inserted | IntentOutcome::AlreadyRecorded
                    )) | Ok(Written::Attempt(_))
                )
            })
            .filter_map(|(waiter, _)| waiter.mark.take())
            .collect();
        if !marks.is_empty() {
            if let Err(err) = self.balances.mark_settled(&marks).await {
                tracing::warn!(error = %err, rows = marks.len(), "cannot mark committed settlements in the balance store; recovery will");
            }
        }
        for ((write, waiter), result) in writes.into_iter().zip(waiters).zip(results) {
            let result = match result {
                Ok(written) => {
                    if let (Write::Settlement(settlement), Written::Settlement(outcome)) =
                        (&write, &written)
                    {
                        self.on_conflict(settlement, outcome, waiter.mark.as_ref())
                            .await;
                    }
                    Ok(written)
                }
                Err(err) => {
                    tracing::error!(kind = write.kind(), error = %err, "write refused");
                    Err(StreamError::Refused(err.to_string()))
                }
            };
            let _ = waiter.done.send(result);
        }
    }

    /// Logs (and for a sequence conflict, repairs) a settlement the store did not take.
    async fn on_conflict(
        &self,
        settlement: &Settlement,
        outcome: &CommitOutcome,
        mark: Option<&SettledMark>,
    ) {
        match outcome {
            CommitOutcome::SequenceConflict { account_seq } => {
                telemetry::settlement_conflict();
                tracing::error!(
                    payment_id = %settlement.payment_id,
                    account_seq,
                    "account sequence already used: the balance store rolled back; flagged"
                );
                // Rare: handled inline, before the waiter answers, so a retry sees the
                // account exact again.
                if let Some(mark) = mark {
                    void_and_rebuild(
                        self.store.as_ref(),
                        self.balances.as_ref(),
                        settlement,
                        mark,
                    )
                    .await;
                }
            }
            CommitOutcome::Conflict { stored_hash } => {
                telemetry::settlement_conflict();
                tracing::error!(
                    payment_id = %settlement.payment_id,
                    kind = %settlement.kind,
                    stored_hash,
                    offered_hash = %settlement.content_hash(),
                    "settlement conflicts with the stored one: flagged, nothing written"
                );
            }
            CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted => {}
        }
    }

    async fn check_health(&self) {
        if self.store.ping().await.is_ok() {
            tracing::info!("settlement store answers again");
            self.shared.healthy.store(true, Ordering::Relaxed);
        }
    }
}
