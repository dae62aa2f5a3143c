//! PostgreSQL: the lease claim, written once. Two queues hand their due rows out under a lease
//! (the resolution loop's pending payments, the webhook outbox's pending events): claiming a
//! row sets its due time to the lease's end, so no other claimer (or instance) takes it
//! meanwhile and it comes due again if the claimer dies. A periodic job that one instance at a
//! time runs (the key purge) holds a named lease in `leases` instead.

use deadpool_postgres::tokio_postgres::{self, Row};
use deadpool_postgres::Transaction;

use crate::settlement::SettleError;

use super::{get_u64, ms, PostgresStore};

/// A table whose pending rows come due and are claimed under a lease (see
/// [`PostgresStore::claim`]).
pub(super) trait Leased: Sized {
    /// The table.
    const TABLE: &'static str;
    /// Its columns as [`Leased::from_row`] reads them.
    const COLUMNS: &'static str;
    /// The column of when a pending row is due (or its lease ends), which a claim sets.
    const DUE: &'static str;

    fn from_row(r: &Row) -> Result<Self, SettleError>;

    /// The row's `id`.
    fn id(&self) -> &str;
}

impl PostgresStore {
    /// Claims up to `limit` pending rows of `T` due at `now_ms` (`DUE <= now_ms`), oldest due
    /// first (then by id's bytes), leasing them until `lease_until_ms`; returns them as updated,
    /// in that order. Rows another instance is claiming right now are skipped, not waited for.
    pub(super) async fn claim<T: Leased>(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<T>, SettleError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (table, columns, due_column) = (T::TABLE, T::COLUMNS, T::DUE);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        // Due pending rows, oldest first, locked (skipping rows another instance is claiming
        // right now) and leased in one statement, so one implicit transaction. `RETURNING`
        // keeps no order: the old due time (`was`, after the row's columns) orders them below.
        let stmt = client
            .prepare_cached(&format!(
                "WITH due AS (SELECT id AS due_id, {due_column} AS was FROM {table} \
                 WHERE status = 'pending' AND {due_column} <= $1 \
                 ORDER BY {due_column}, id COLLATE \"C\" LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 UPDATE {table} SET {due_column} = $2 FROM due WHERE id = due.due_id \
                 RETURNING {columns}, due.was"
            ))
            .await
            .map_err(db)?;
        let rows = client
            .query(&stmt, &[&ms(now_ms), &ms(lease_until_ms), &limit])
            .await
            .map_err(db)?;
        let was = columns.split(',').count();
        let mut claimed = rows
            .iter()
            .map(|r| Ok((get_u64(r, was)?, T::from_row(r)?)))
            .collect::<Result<Vec<_>, SettleError>>()?;
        claimed.sort_by(|(a_was, a), (b_was, b)| (a_was, a.id()).cmp(&(b_was, b.id())));
        Ok(claimed.into_iter().map(|(_, row)| row).collect())
    }
}

/// Takes the named lease `name` for `holder` until `now_ms + lease_ms`, inside `tx`: free, run
/// out (`until_ms <= now_ms`) or already `holder`'s (renewed). `false` when another holder has
/// it (nothing written).
pub(super) async fn take_lease(
    tx: &Transaction<'_>,
    name: &str,
    holder: &str,
    now_ms: u64,
    lease_ms: u64,
) -> Result<bool, tokio_postgres::Error> {
    let leased = tx
        .execute(
            "INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             until_ms = excluded.until_ms \
             WHERE leases.holder = excluded.holder OR leases.until_ms <= $4",
            &[
                &name,
                &holder,
                &ms(now_ms.saturating_add(lease_ms)),
                &ms(now_ms),
            ],
        )
        .await?;
    Ok(leased != 0)
}
