//! PostgreSQL: the group commit (`WriteStore::commit_writes`): writes of every table group in
//! one transaction, their statements pipelined.

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres;
use futures_util::future::join_all;

use crate::settlement::{
    AttemptRow, AttemptUpdate, IntentOutcome, PaymentRow, RefusalRow, SettleError, Settlement,
    WebhookAttempt, Write, WriteStore, Written,
};
use crate::telemetry::StoreOp;

use super::money::check_for_postgres;
use super::payments::{
    check_attempt_for_postgres, check_payment_text, checks_i32, insert_intents, NewIntent,
};
use super::{no_nul, PostgresStore};

/// The checks of one write that only PostgreSQL needs (NUL bytes, column ranges).
fn check_write_for_postgres(w: &Write) -> Result<(), SettleError> {
    match w {
        Write::Intent {
            payment,
            first_attempt,
        } => {
            check_payment_text(payment)?;
            checks_i32(payment)?;
            if let Some(a) = first_attempt {
                check_attempt_for_postgres(a)?;
            }
            Ok(())
        }
        Write::Attempt(u) => no_nul(
            &u.payment_id,
            [
                u.payment_id.as_str(),
                u.outcome.as_str(),
                u.action.as_deref().unwrap_or(""),
                u.channel_txn_id.as_deref().unwrap_or(""),
            ],
        ),
        Write::Settlement(s) => check_for_postgres(s).map(|_| ()),
        // No such event can have a NUL in its id (it is then simply not found);
        // `webhook_error_text` drops them from the error.
        Write::Webhook(_) => Ok(()),
        Write::Refusal(r) => no_nul(
            &r.idempotency_key,
            [
                r.scope_tag.as_str(),
                r.idempotency_key.as_str(),
                r.request_hash.as_str(),
                r.outcome.as_str(),
            ],
        ),
    }
}

impl PostgresStore {
    /// One transaction for a group of writes. Statements of independent writes are sent
    /// without waiting for each other's answers (tokio-postgres pipelines the futures polled
    /// together), so a batch costs a handful of round trips, not a few per row. An intent
    /// whose attempt clashes is refused alone: the transaction is rolled back and run again
    /// without it.
    pub(super) async fn commit_writes_inner(
        &self,
        batch: &[Write],
    ) -> Result<Vec<Result<Written, SettleError>>, SettleError> {
        let mut refused: Vec<Option<SettleError>> = batch
            .iter()
            .map(|w| w.check().and_then(|()| check_write_for_postgres(w)).err())
            .collect();
        // Each round refuses at least one more intent, or ends.
        for _ in 0..=batch.len() {
            match self.try_commit_writes(batch, &refused).await? {
                Ok(results) => return Ok(results),
                Err((index, err)) => {
                    debug_assert!(refused[index].is_none());
                    refused[index] = Some(err);
                }
            }
        }
        Err(SettleError::Invalid(
            "a batch kept refusing its writes".to_owned(),
        ))
    }

    /// One try of [`Self::commit_writes_inner`]: `Ok(Err((index, error)))` when the intent at
    /// `index` was refused after writing (nothing committed).
    #[allow(clippy::type_complexity)]
    async fn try_commit_writes(
        &self,
        batch: &[Write],
        refused: &[Option<SettleError>],
    ) -> Result<Result<Vec<Result<Written, SettleError>>, (usize, SettleError)>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let mut results: Vec<Option<Result<Written, SettleError>>> =
            refused.iter().map(|r| r.clone().map(Err)).collect();

        // Writes of different kinds never concern the same row in one batch (a payment's next
        // write is submitted after its previous one committed; an attempt's success and its
        // settlement touch different tables), so all four kinds go out together: one round
        // trip for the lot instead of one per kind. Within a kind, the order given holds (an
        // accepted attempt's unwaited outcome and its success, both attempt updates, keep
        // theirs; the store takes `accepted` only over `unknown` anyway).
        let mut intents: Vec<(usize, &PaymentRow, Option<&AttemptRow>)> = Vec::new();
        let mut updates: Vec<(usize, &AttemptUpdate)> = Vec::new();
        let mut settlements: Vec<(usize, &Settlement)> = Vec::new();
        let mut hooks: Vec<(usize, &WebhookAttempt)> = Vec::new();
        let mut refusals: Vec<(usize, &RefusalRow)> = Vec::new();
        for (i, write) in batch.iter().enumerate() {
            if results[i].is_some() {
                continue; // refused before the transaction
            }
            match write {
                Write::Intent {
                    payment,
                    first_attempt,
                } => intents.push((i, payment, first_attempt.as_ref())),
                Write::Attempt(u) => updates.push((i, u)),
                Write::Settlement(s) => settlements.push((i, s)),
                Write::Webhook(a) => hooks.push((i, a)),
                Write::Refusal(r) => refusals.push((i, r)),
            }
        }
        // Rows locked in one order by every transaction (by key, stable: one key's writes keep
        // the order given), so that batches committing at once (`store.commits_in_flight`)
        // wait for each other instead of deadlocking.
        intents.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        updates.sort_by(|a, b| (&a.1.payment_id, a.1.attempt).cmp(&(&b.1.payment_id, b.1.attempt)));
        settlements.sort_by(|a, b| a.1.payment_id.cmp(&b.1.payment_id));
        hooks.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        refusals.sort_by(|a, b| {
            (&a.1.scope_tag, &a.1.idempotency_key).cmp(&(&b.1.scope_tag, &b.1.idempotency_key))
        });
        let rows: Vec<&Settlement> = settlements.iter().map(|(_, s)| *s).collect();
        let (intended, updated, settled, recorded, refused) = tokio::join!(
            self.intents_in(&tx, &intents),
            join_all(updates.iter().map(|(_, u)| self.update_attempt_in(&tx, u))),
            self.settle_in(&tx, &rows),
            join_all(hooks.iter().map(|(_, a)| self.webhook_attempt_in(&tx, a))),
            join_all(refusals.iter().map(|(_, r)| self.refusal_in(&tx, r))),
        );
        for ((index, _, _), outcome) in intents.iter().zip(intended?) {
            match outcome {
                Ok(outcome) => results[*index] = Some(Ok(Written::Intent(outcome))),
                Err(e @ SettleError::Invalid(_)) => return Ok(Err((*index, e))),
                Err(e) => return Err(e),
            }
        }
        for ((index, _), updated) in updates.iter().zip(updated) {
            results[*index] = Some(Ok(Written::Attempt(updated?)));
        }
        for ((index, _), outcome) in settlements.iter().zip(settled?) {
            results[*index] = Some(Ok(Written::Settlement(outcome)));
        }
        for ((index, _), recorded) in hooks.iter().zip(recorded) {
            results[*index] = Some(Ok(Written::Webhook(recorded?)));
        }
        for ((index, _), inserted) in refusals.iter().zip(refused) {
            results[*index] = Some(Ok(Written::Refusal(inserted?)));
        }

        tx.commit().await.map_err(db)?;
        Ok(Ok(results
            .into_iter()
            .map(|r| r.expect("every write has its result"))
            .collect()))
    }
}

impl PostgresStore {
    /// A batch's intents: the new ones in one statement (`insert_intents`), each decided on
    /// its own; what that statement did not insert (a retry, a taken key or order id, a twin
    /// of an id earlier in the batch) and a first attempt that did not go in (a clash: its
    /// explanation) go through `intent_in` one by one, as before. Per intent, in order, its
    /// outcome; an `Invalid` may leave its payment row written (the caller rolls back).
    async fn intents_in(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        intents: &[(usize, &PaymentRow, Option<&AttemptRow>)],
    ) -> Result<Vec<Result<IntentOutcome, SettleError>>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let mut seen = std::collections::HashSet::with_capacity(intents.len());
        let mut items = Vec::with_capacity(intents.len());
        // Per intent: its place among `items`, if it went into the statement.
        let mut placed = Vec::with_capacity(intents.len());
        for (_, p, a) in intents {
            let first = match a {
                Some(a) => match check_attempt_for_postgres(a) {
                    Ok(number) => Some((*a, number)),
                    Err(_) => {
                        placed.push(None);
                        continue;
                    }
                },
                None => None,
            };
            if seen.insert(p.id.as_str()) {
                placed.push(Some(items.len()));
                items.push(NewIntent { p, first });
            } else {
                placed.push(None);
            }
        }
        let inserted = insert_intents(tx, &items, &self.no_webhook)
            .await
            .map_err(db)?;
        let mut outcomes = Vec::with_capacity(intents.len());
        for ((_, p, a), place) in intents.iter().zip(placed) {
            let outcome = match place.map(|i| (&items[i], inserted[i])) {
                Some((_, (true, true))) => Ok(IntentOutcome::Inserted),
                Some((item, (true, false))) => match item.first {
                    None => Ok(IntentOutcome::Inserted),
                    // It clashed: the one-row insert explains how (`Invalid`).
                    Some((a, number)) => self
                        .insert_attempt(tx, a, number)
                        .await
                        .map(|()| IntentOutcome::Inserted),
                },
                _ => self.intent_in(tx, p, *a).await,
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

#[async_trait]
impl WriteStore for PostgresStore {
    async fn commit_writes(
        &self,
        batch: &[Write],
    ) -> Result<Vec<Result<Written, SettleError>>, SettleError> {
        Self::timed(
            StoreOp::Write("commit_writes"),
            self.commit_writes_inner(batch),
        )
        .await
    }
}
