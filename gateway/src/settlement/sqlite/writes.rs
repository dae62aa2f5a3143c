//! SQLite: the group commit (`WriteStore::commit_writes`): writes of every table group in one
//! transaction.

use async_trait::async_trait;
use rusqlite::TransactionBehavior;

use crate::settlement::{SettleError, Write, WriteStore, Written};
use crate::telemetry::StoreOp;

use super::keys::refusal_in;
use super::money::settle_in;
use super::payments::{intent_in, update_attempt_in};
use super::webhooks::webhook_attempt_in;
use super::{db, SqliteStore};

#[async_trait]
impl WriteStore for SqliteStore {
    async fn commit_writes(
        &self,
        batch: &[Write],
    ) -> Result<Vec<Result<Written, SettleError>>, SettleError> {
        // What is invalid on its face is refused alone, before the transaction.
        let checked: Vec<Option<SettleError>> = batch.iter().map(|w| w.check().err()).collect();
        let batch = batch.to_vec();
        let no_webhook = self.no_webhook.clone();
        self.run(StoreOp::Write("commit_writes"), move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let mut results: Vec<Option<Result<Written, SettleError>>> =
                checked.into_iter().map(|c| c.map(Err)).collect();
            // Intents, then attempt outcomes, then settlements (see the trait).
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                let Write::Intent {
                    payment,
                    first_attempt,
                } = write
                else {
                    continue;
                };
                if result.is_some() {
                    continue;
                }
                // An intent refused `Invalid` (a clashing attempt) has written nothing.
                match intent_in(&tx, payment, first_attempt.as_ref(), &no_webhook) {
                    Ok(outcome) => *result = Some(Ok(Written::Intent(outcome))),
                    Err(e @ SettleError::Invalid(_)) => *result = Some(Err(e)),
                    Err(e) => return Err(e),
                }
            }
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                if let (Write::Attempt(update), None) = (write, &result) {
                    let updated = update_attempt_in(&tx, update).map_err(db)?;
                    *result = Some(Ok(Written::Attempt(updated)));
                }
            }
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                if let (Write::Settlement(settlement), None) = (write, &result) {
                    *result = Some(Ok(Written::Settlement(settle_in(
                        &tx,
                        settlement,
                        &no_webhook,
                    )?)));
                }
            }
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                if let (Write::Webhook(attempt), None) = (write, &result) {
                    let updated = webhook_attempt_in(&tx, attempt).map_err(db)?;
                    *result = Some(Ok(Written::Webhook(updated)));
                }
            }
            for (write, result) in batch.iter().zip(results.iter_mut()) {
                if let (Write::Refusal(refusal), None) = (write, &result) {
                    let inserted = refusal_in(&tx, refusal).map_err(db)?;
                    *result = Some(Ok(Written::Refusal(inserted)));
                }
            }
            tx.commit().map_err(db)?;
            Ok(results
                .into_iter()
                .map(|r| r.expect("every write has its result"))
                .collect())
        })
        .await
    }
}
