//! The settlement stream: a bounded queue in front of ONE writer task that group-commits
//! (with `commits_in_flight` batches committing at once on PostgreSQL, one on SQLite).
//!
//! A request submits what its answer depends on (a settlement, a channel payment's intent, an
//! attempt's outcome: a [`Write`]) and waits. The writer takes the first write, then
//! everything already queued, then — while payments admitted a moment ago are still on their
//! way (their Redis call in flight) — waits for them, at most `batch_max_wait_ms`, up to
//! `batch_max_rows`; it commits the batch in one transaction (one fsync for all of them). A
//! lone write never waits: nothing is on its way.
//!
//! After a commit, one task marks the batch settled in the balance store (one round trip) and
//! wakes every waiter with its own outcome, while the writer already commits the next batch:
//! at most one such answer runs beside the writer (it is awaited before the next one starts),
//! so marks go out in commit order and nothing piles up.
//!
//! Admission is checked *before* any money moves in Redis: a full queue or a store that failed
//! its last commit refuses at once (`503 unavailable`), so nothing is half done. The
//! [`Admission`] it returns counts the payment as on its way until it is dropped, which the
//! caller does right before it submits its write.

use std::future::Future;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use super::rebuild::{unwind_refused, unwind_refused_adjustment, void_and_rebuild, Refusal};
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
    /// A commit starts at least this long after the previous one started (`Duration::ZERO`:
    /// at once): see `store.commit_spacing_us`.
    pub commit_spacing: Duration,
    /// A batch holding this many writes does not wait for the spacing.
    pub commit_spacing_rows: usize,
    /// Batches committing at once (each its own transaction).
    pub commits_in_flight: usize,
    /// While unhealthy, the writer pings the store this often to notice it came back.
    pub health_check_interval_ms: u64,
    /// How long an idempotency key is honoured (`preauth.idempotency_retention_seconds`): a
    /// payment the store refused as a replay is unwound with its key answering the first
    /// payment for what is left of it.
    pub idempotency_retention_seconds: u64,
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

impl SettlementStream {
    /// How long an idempotency key is honoured (see [`StreamSettings`]).
    pub fn idempotency_retention_seconds(&self) -> u64 {
        self.shared.idempotency_retention_seconds
    }
}

struct Shared {
    healthy: AtomicBool,
    depth: AtomicUsize,
    capacity: usize,
    /// Admitted movements whose write is not queued yet ([`Admission`]s alive).
    inbound: AtomicUsize,
    idempotency_retention_seconds: u64,
    /// Writes that make the writer stop waiting for the spacing (`commit_spacing_rows`, at
    /// most `batch_max_rows`): the writer sleeps through the spacing instead of waking for
    /// every write that arrives, and a submitter that makes its batch and the queue this long
    /// wakes it.
    spacing_rows: usize,
    /// Wakes the writer out of the spacing: enough company has arrived.
    company: Notify,
    /// Writes in the batch the writer is filling while it waits for the spacing (0 else).
    filling: AtomicUsize,
    /// Wakes the writer waiting for admitted movements: none is on its way any more.
    all_in: Notify,
}

/// A movement admitted and on its way to the writer (its balance-store call in flight): the
/// writer waits a little for such siblings before it commits. Drop it right before the write
/// is submitted (or when the movement ends without one).
#[must_use = "an admission counts a movement on its way until it is dropped"]
pub struct Admission {
    shared: Arc<Shared>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.inbound.fetch_sub(1, Ordering::Relaxed);
    }
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
        debug_assert!(
            settings.queue_capacity > 0
                && settings.batch_max_rows > 0
                && settings.commits_in_flight > 0
        );
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            depth: AtomicUsize::new(0),
            capacity: settings.queue_capacity,
            inbound: AtomicUsize::new(0),
            idempotency_retention_seconds: settings.idempotency_retention_seconds,
            spacing_rows: settings
                .commit_spacing_rows
                .min(settings.batch_max_rows)
                .max(1),
            company: Notify::new(),
            filling: AtomicUsize::new(0),
            all_in: Notify::new(),
        });
        let writer = Writer {
            answerer: Answerer {
                store,
                balances,
                idempotency_retention_seconds: settings.idempotency_retention_seconds,
            },
            settings,
            rx,
            shared: shared.clone(),
            last_commit: None,
        };
        let handle = tokio::spawn(writer.run(shutdown));
        (Self { tx, shared }, handle)
    }

    /// Whether a new money movement may start: the queue has room and the store is healthy.
    /// The movement counts as on its way to the writer until the [`Admission`] is dropped.
    pub fn admit(&self) -> Result<Admission, StreamError> {
        if !self.shared.healthy.load(Ordering::Relaxed) {
            return Err(StreamError::StoreUnavailable);
        }
        if self.shared.depth.load(Ordering::Relaxed) >= self.shared.capacity {
            return Err(StreamError::QueueFull);
        }
        self.shared.inbound.fetch_add(1, Ordering::Relaxed);
        Ok(Admission {
            shared: self.shared.clone(),
        })
    }

    /// Admitted movements not queued yet.
    pub fn inbound(&self) -> usize {
        self.shared.inbound.load(Ordering::Relaxed)
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

    /// Queues a write that no one waits for: it rides the next group commit, and a refusal is
    /// only logged. For what a later reader can do without (see
    /// [`crate::settlement::Settler::save_attempt_later`]).
    pub fn enqueue(&self, write: Write) -> Result<(), StreamError> {
        let (done, _unheard) = oneshot::channel();
        self.queue(Job {
            write,
            mark: None,
            done,
        })
    }

    /// Queues any write and waits for its commit (and, when an intent or a settlement was
    /// committed, for `mark` to be settled in the balance store).
    pub async fn submit_write(
        &self,
        write: Write,
        mark: Option<SettledMark>,
    ) -> Result<Written, StreamError> {
        let (done, wait) = oneshot::channel();
        self.queue(Job { write, mark, done })?;
        wait.await.map_err(|_| StreamError::Stopped)?
    }

    fn queue(&self, job: Job) -> Result<(), StreamError> {
        // Counted before it is queued: the writer may take and uncount it before `try_send`
        // even returns, and the count must never go below zero.
        let depth = self.shared.depth.fetch_add(1, Ordering::Relaxed) + 1;
        if let Err(e) = self.tx.try_send(job) {
            self.shared.depth.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => StreamError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => StreamError::Stopped,
            });
        }
        telemetry::settlement_queue_depth(depth);
        // Queued and not taken yet, with the batch waiting for the spacing: enough for a
        // batch that need not wait.
        // (The fence pairs with the writer's: it sees this write queued, or this sees its batch.)
        fence(Ordering::SeqCst);
        let queued = self.tx.max_capacity() - self.tx.capacity();
        if queued + self.shared.filling.load(Ordering::Relaxed) >= self.shared.spacing_rows {
            self.shared.company.notify_one();
        }
        // The caller's admission is dropped before its write is queued.
        if self.shared.inbound.load(Ordering::Relaxed) == 0 {
            self.shared.all_in.notify_one();
        }
        Ok(())
    }
}

/// A batch's commit as the writer holds it: its rows, then the batch back from the store (or
/// why its task failed).
type CommitTask =
    std::pin::Pin<Box<dyn Future<Output = (usize, Result<Committed, String>)> + Send>>;

/// A batch back from the store.
struct Committed {
    writes: Vec<Write>,
    waiters: Vec<Waiter>,
    result: Result<Vec<Result<Written, SettleError>>, SettleError>,
}

struct Writer {
    answerer: Answerer,
    settings: StreamSettings,
    rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    /// When the last commit started (the spacing counts from it).
    last_commit: Option<tokio::time::Instant>,
}

/// What a committed batch's answer needs: it runs beside the writer's next commit.
#[derive(Clone)]
struct Answerer {
    store: Arc<dyn SettlementStore>,
    balances: Arc<dyn BalanceStore>,
    idempotency_retention_seconds: u64,
}

impl Writer {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut batch: Vec<Job> = Vec::with_capacity(self.settings.batch_max_rows);
        let health_interval = Duration::from_millis(self.settings.health_check_interval_ms);
        // Batches committing (at most `commits_in_flight`), each its own transaction and its
        // own task, so that it goes on while the writer fills the next batch.
        let mut commits = FuturesUnordered::new();
        // The last committed batch's answer, running beside the commits.
        let mut answering: Option<JoinHandle<()>> = None;
        loop {
            if commits.len() >= self.settings.commits_in_flight {
                if let Some(joined) = commits.next().await {
                    self.joined(joined, &mut answering).await;
                }
                continue;
            }
            let first = tokio::select! {
                job = self.rx.recv() => job,
                Some(joined) = commits.next(), if !commits.is_empty() => {
                    self.joined(joined, &mut answering).await;
                    continue;
                }
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
            let rows = batch.len();
            self.last_commit = Some(tokio::time::Instant::now());
            let commit = self.commit(&mut batch);
            let commit: CommitTask = if self.settings.commits_in_flight == 1 {
                // One at a time (SQLite): the writer waits for it anyway, so it is polled
                // here, not spawned, and the store's answer wakes this task directly (a task
                // and a wake-up less per commit); a panic stays the commit's own.
                let commit = AssertUnwindSafe(commit).catch_unwind();
                Box::pin(async move { (rows, commit.await.map_err(|_| "panicked".to_owned())) })
            } else {
                // Several at once: each on its own task, going on while the writer fills the
                // next batch.
                let commit = tokio::spawn(commit);
                Box::pin(async move { (rows, commit.await.map_err(|e| e.to_string())) })
            };
            commits.push(commit);
        }
        while let Some(joined) = commits.next().await {
            self.joined(joined, &mut answering).await;
        }
        if let Some(previous) = answering {
            let _ = previous.await;
        }
    }

    /// Adds what is queued, then waits for the movements admitted and still on their way, at
    /// most `batch_max_wait_ms` (a lone write does not wait: nothing is on its way).
    async fn fill(&mut self, batch: &mut Vec<Job>) {
        let max = self.settings.batch_max_rows;
        self.take_queued(batch, max);
        // The spacing: what arrives until `commit_spacing` after the last commit started
        // joins this one, unless the batch is big enough already. The writer sleeps through
        // it (one wake-up per commit, not one per write): a submitter wakes it early when the
        // batch and the queue together hold `commit_spacing_rows`.
        if let Some(spaced) = self
            .last_commit
            .map(|last| last + self.settings.commit_spacing)
            .filter(|spaced| *spaced > tokio::time::Instant::now())
        {
            let enough = max.min(self.settings.commit_spacing_rows);
            loop {
                self.take_queued(batch, enough);
                if batch.len() >= enough {
                    break;
                }
                // Published before the queue is looked at again: a write queued after this
                // counts it, one queued before is taken below.
                self.shared.filling.store(batch.len(), Ordering::Relaxed);
                fence(Ordering::SeqCst);
                self.take_queued(batch, enough);
                if batch.len() >= enough {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(spaced) => break,
                    _ = self.shared.company.notified() => {}
                }
            }
            self.shared.filling.store(0, Ordering::Relaxed);
            self.take_queued(batch, max);
        }
        if batch.len() >= max || self.settings.batch_max_wait_ms == 0 {
            return;
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.batch_max_wait_ms);
        // Woken when the last movement on its way has queued its write (or the queue holds
        // a spacing's worth), not by every write.
        loop {
            self.take_queued(batch, max);
            if batch.len() >= max || self.shared.inbound.load(Ordering::Relaxed) == 0 {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.shared.all_in.notified() => {}
                _ = self.shared.company.notified() => {}
            }
        }
        self.take_queued(batch, max);
    }

    /// Moves queued writes into `batch` until it holds `up_to`.
    fn take_queued(&mut self, batch: &mut Vec<Job>, up_to: usize) {
        while batch.len() < up_to {
            match self.rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
    }

    /// The batch's commit, to run beside the writer (and the other commits in flight).
    fn commit(&mut self, batch: &mut Vec<Job>) -> impl Future<Output = Committed> + Send + 'static {
        // Move the writes out (no copy on the hot path); keep who waits for what.
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
        let store = self.answerer.store.clone();
        async move {
            let started = Instant::now();
            let result = store.commit_writes(&writes).await;
            telemetry::settlement_batch(writes.len(), started.elapsed(), result.is_ok());
            Committed {
                writes,
                waiters,
                result,
            }
        }
    }

    /// `rows` left the queue (committed or failed): the admission count follows.
    fn uncount(&self, rows: usize) {
        let depth = self
            .shared
            .depth
            .fetch_sub(rows, Ordering::Relaxed)
            .saturating_sub(rows);
        telemetry::settlement_queue_depth(depth);
    }

    /// A commit task ended: normally with its batch; if it panicked (a bug), its waiters have
    /// been dropped (they see the writer as stopped) and only the queue's count is set right.
    async fn joined(
        &mut self,
        (rows, joined): (usize, Result<Committed, String>),
        answering: &mut Option<JoinHandle<()>>,
    ) {
        match joined {
            Ok(committed) => self.committed(committed, answering).await,
            Err(err) => {
                // Its waiters' senders were dropped with it: they are answered `Stopped`.
                tracing::error!(error = %err, rows, "a group commit task failed");
                self.uncount(rows);
            }
        }
    }

    /// After a commit: its answer (marks, then waiters) is spawned to run beside the next
    /// commits, once the previous answer is done (one at most, in commit order); a failed
    /// commit is answered at once.
    async fn committed(&mut self, committed: Committed, answering: &mut Option<JoinHandle<()>>) {
        let Committed {
            writes,
            waiters,
            result,
        } = committed;
        let rows = writes.len();
        self.uncount(rows);
        match result {
            Ok(results) => {
                debug_assert_eq!(results.len(), rows);
                self.shared.healthy.store(true, Ordering::Relaxed);
                if let Some(previous) = answering.take() {
                    let _ = previous.await;
                }
                let answerer = self.answerer.clone();
                *answering = Some(tokio::spawn(async move {
                    answerer.answer(writes, waiters, results).await;
                }));
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

    async fn check_health(&self) {
        if self.answerer.store.ping().await.is_ok() {
            tracing::info!("settlement store answers again");
            self.shared.healthy.store(true, Ordering::Relaxed);
        }
    }
}

impl Answerer {
    /// After a committed batch: each waiter gets its own outcome, then one balance-store round
    /// trip marks every committed movement and intent settled (if it fails the money is still
    /// safe: it is committed, and the recovery loop marks them later). Until the mark, a
    /// retry finds its key in flight in the balance store, and a balance payment's retry is
    /// answered from the store (`payments::create`); the answers do not wait for that round
    /// trip.
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
        if !marks.is_empty() {
            if let Err(err) = self.balances.mark_settled(&marks).await {
                tracing::warn!(error = %err, rows = marks.len(), "cannot mark committed settlements in the balance store; recovery will");
            }
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
                        self.idempotency_retention_seconds,
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
            CommitOutcome::Replay(_)
            | CommitOutcome::IdempotencyConflict(_)
            | CommitOutcome::DuplicateOrder { .. } => {
                // The store holds the payment's key or order id: the balance store forgot it.
                // Undone before the waiter answers, so the answer and a retry see it undone;
                // without a mark (nobody to answer) the recovery loop meets it again.
                let (Some(mark), Some(refusal)) = (mark, Refusal::of_commit(outcome)) else {
                    return;
                };
                if settlement.adjustment.is_some() {
                    if let Err(err) = unwind_refused_adjustment(
                        self.balances.as_ref(),
                        settlement,
                        refusal,
                        mark,
                        self.idempotency_retention_seconds,
                    )
                    .await
                    {
                        tracing::error!(adjustment_id = %settlement.payment_id, error = %err, "cannot unwind an adjustment the store refused; recovery will retry");
                    }
                    return;
                }
                let Some(payment) = settlement.payment.as_ref() else {
                    return;
                };
                if let Err(err) = unwind_refused(
                    self.balances.as_ref(),
                    payment,
                    settlement.amount_minor,
                    refusal,
                    mark,
                    self.idempotency_retention_seconds,
                )
                .await
                {
                    tracing::error!(payment_id = %settlement.payment_id, error = %err, "cannot unwind a payment the store refused; recovery will retry");
                }
            }
            CommitOutcome::Inserted | CommitOutcome::AlreadyCommitted => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preauth::memory::MemoryStore;
    use crate::settlement::sqlite::SqliteStore;
    use crate::settlement::{SchemaStore, WebhookAttempt, WebhookOutcome};

    /// A window far longer than any commit here, so that who waited for whom shows.
    const LONG_WAIT_MS: u64 = 1_000;

    async fn stream(
        dir: &tempfile::TempDir,
        wait_ms: u64,
    ) -> (SettlementStream, watch::Sender<bool>) {
        stream_with(dir, wait_ms, 1).await
    }

    async fn stream_with(
        dir: &tempfile::TempDir,
        wait_ms: u64,
        commits_in_flight: usize,
    ) -> (SettlementStream, watch::Sender<bool>) {
        stream_spaced(dir, wait_ms, commits_in_flight, Duration::ZERO).await
    }

    async fn stream_spaced(
        dir: &tempfile::TempDir,
        wait_ms: u64,
        commits_in_flight: usize,
        commit_spacing: Duration,
    ) -> (SettlementStream, watch::Sender<bool>) {
        let store = SqliteStore::open(&dir.path().join("s.sqlite3")).unwrap();
        store.migrate().await.unwrap();
        let (stop, shutdown) = watch::channel(false);
        let (stream, _writer) = SettlementStream::spawn(
            Arc::new(store),
            Arc::new(MemoryStore::new()),
            StreamSettings {
                queue_capacity: 64,
                batch_max_rows: 4,
                batch_max_wait_ms: wait_ms,
                commit_spacing,
                commit_spacing_rows: 2,
                commits_in_flight,
                health_check_interval_ms: 500,
                idempotency_retention_seconds: 86_400,
            },
            shutdown,
        );
        (stream, stop)
    }

    /// A write that commits and changes nothing: an outcome for an event nobody enqueued.
    fn noop(n: u32) -> Write {
        Write::Webhook(WebhookAttempt {
            id: format!("evt_none_{n}"),
            outcome: WebhookOutcome::Delivered,
            http_status: Some(200),
            error: None,
            now_ms: 1,
        })
    }

    #[tokio::test]
    async fn admissions_count_movements_on_their_way_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (stream, _stop) = stream(&dir, 0).await;
        assert_eq!(stream.inbound(), 0);
        let first = stream.admit().unwrap();
        let second = stream.admit().unwrap();
        assert_eq!(stream.inbound(), 2);
        drop(first);
        assert_eq!(stream.inbound(), 1);
        drop(second);
        assert_eq!(stream.inbound(), 0);
    }

    #[tokio::test]
    async fn a_lone_write_does_not_wait_for_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let (stream, _stop) = stream(&dir, LONG_WAIT_MS).await;
        // Nothing admitted is on its way: committed at once, not after the window.
        let written = tokio::time::timeout(
            Duration::from_millis(LONG_WAIT_MS * 9 / 10),
            stream.submit_write(noop(1), None),
        )
        .await
        .expect("answered before the window ended")
        .unwrap();
        assert_eq!(written, Written::Webhook(false));
    }

    #[tokio::test]
    async fn writes_soon_after_a_commit_wait_for_the_spacing_or_enough_company() {
        let dir = tempfile::tempdir().unwrap();
        let spacing = Duration::from_millis(LONG_WAIT_MS);
        let (stream, _stop) = stream_spaced(&dir, 0, 1, spacing).await;
        // The first commit has no previous one to keep its distance from: at once.
        let first = tokio::time::timeout(spacing * 9 / 10, stream.submit_write(noop(1), None))
            .await
            .expect("the first commit does not wait")
            .unwrap();
        assert_eq!(first, Written::Webhook(false));
        // The next, right after: held until the spacing ends, with what arrives meanwhile.
        let second = tokio::spawn({
            let stream = stream.clone();
            async move { stream.submit_write(noop(2), None).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "the second commit did not wait");
        assert_eq!(stream.depth(), 1);
        // The third makes the batch `commit_spacing_rows` (2) big: it goes at once, long
        // before the spacing ends.
        let third = tokio::time::timeout(spacing / 2, stream.submit_write(noop(3), None))
            .await
            .expect("a batch of commit_spacing_rows does not wait for the spacing")
            .unwrap();
        assert_eq!(third, Written::Webhook(false));
        assert_eq!(second.await.unwrap().unwrap(), Written::Webhook(false));
        assert_eq!(stream.depth(), 0);
    }

    #[tokio::test]
    async fn a_write_waits_for_an_admitted_sibling_and_commits_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (stream, _stop) = stream(&dir, LONG_WAIT_MS).await;
        let sibling = stream.admit().unwrap();
        let first = tokio::spawn({
            let stream = stream.clone();
            async move { stream.submit_write(noop(1), None).await }
        });
        // Not answered while the sibling is on its way (well inside the window)…
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !first.is_finished(),
            "the writer did not wait for the sibling"
        );
        assert_eq!(stream.depth(), 1);
        // …and answered once the sibling's write arrives: both in one commit.
        drop(sibling);
        let second = stream.submit_write(noop(2), None).await.unwrap();
        assert_eq!(second, Written::Webhook(false));
        assert_eq!(first.await.unwrap().unwrap(), Written::Webhook(false));
        assert_eq!(stream.depth(), 0);
    }

    #[tokio::test]
    async fn a_sibling_that_never_writes_holds_a_batch_at_most_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let (stream, _stop) = stream(&dir, 50).await;
        // Admitted, then refused by the balance store (say): it never writes, and is kept
        // alive here on purpose for longer than the window.
        let _stuck = stream.admit().unwrap();
        let written =
            tokio::time::timeout(Duration::from_secs(10), stream.submit_write(noop(1), None))
                .await
                .expect("the window bounds the wait")
                .unwrap();
        assert_eq!(written, Written::Webhook(false));
    }

    #[tokio::test]
    async fn with_commits_in_flight_every_write_gets_its_own_answer_once() {
        let dir = tempfile::tempdir().unwrap();
        let (stream, _stop) = stream_with(&dir, 0, 3).await;
        let mut tasks = Vec::new();
        for n in 0..60 {
            let stream = stream.clone();
            tasks.push(tokio::spawn(async move {
                stream.submit_write(noop(n), None).await
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), Written::Webhook(false));
        }
        assert_eq!((stream.depth(), stream.inbound()), (0, 0));
    }
}
