//! SQLite: the lease claim, written once. Two queues hand their due rows out under a lease
//! (the resolution loop's pending payments, the webhook outbox's pending events): claiming a
//! row sets its due time to the lease's end, so no other claimer takes it meanwhile and it
//! comes due again if the claimer dies. A periodic job that one instance at a time runs (the
//! key purge) holds a named lease in `leases` instead.

use rusqlite::{params, Connection, TransactionBehavior};

use crate::settlement::SettleError;
use crate::telemetry::StoreOp;

use super::{db, exec, ms, SqliteStore};

/// A table whose pending rows come due and are claimed under a lease (see [`SqliteStore::claim`]).
pub(super) trait Leased: Sized + Send + 'static {
    /// The table.
    const TABLE: &'static str;
    /// Its columns as [`Leased::from_row`] reads them.
    const COLUMNS: &'static str;
    /// The column of when a pending row is due (or its lease ends), which a claim sets.
    const DUE: &'static str;

    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;

    /// The row's `id`.
    fn id(&self) -> &str;

    /// The row as a claim leaves it: due again at `until_ms`.
    fn leased_until(&mut self, until_ms: u64);
}

impl SqliteStore {
    /// Claims up to `limit` pending rows of `T` due at `now_ms` (`DUE <= now_ms`), oldest due
    /// first (then by id), leasing them until `lease_until_ms` in the same transaction; returns
    /// them as updated. `limit` 0 claims nothing without a call.
    pub(super) async fn claim<T: Leased>(
        &self,
        op: StoreOp,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<T>, SettleError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.run(op, move |conn| {
            claim_in::<T>(conn, now_ms, lease_until_ms, limit)
        })
        .await
    }
}

/// The claim of [`SqliteStore::claim`], on the connection's thread.
fn claim_in<T: Leased>(
    conn: &mut Connection,
    now_ms: u64,
    lease_until_ms: u64,
    limit: usize,
) -> Result<Vec<T>, SettleError> {
    let (table, columns, due_column) = (T::TABLE, T::COLUMNS, T::DUE);
    // One writer at a time (IMMEDIATE): no other process can claim the same rows between the
    // select and the update.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let mut due = {
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {columns} FROM {table} WHERE status = 'pending' \
                 AND {due_column} <= ?1 ORDER BY {due_column}, id LIMIT ?2"
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map(
                params![ms(now_ms), i64::try_from(limit).unwrap_or(i64::MAX)],
                T::from_row,
            )
            .map_err(db)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db)?
    };
    if due.is_empty() {
        return Ok(due);
    }
    {
        let mut lease = tx
            .prepare_cached(&format!(
                "UPDATE {table} SET {due_column} = ?2 WHERE id = ?1"
            ))
            .map_err(db)?;
        for row in &mut due {
            lease
                .execute(params![row.id(), ms(lease_until_ms)])
                .map_err(db)?;
            row.leased_until(lease_until_ms);
        }
    }
    tx.commit().map_err(db)?;
    Ok(due)
}

/// Takes the named lease `name` for `holder` until `now_ms + lease_ms`, inside the caller's
/// transaction: free, run out (`until_ms <= now_ms`) or already `holder`'s (renewed).
/// `false` when another holder has it (nothing written).
pub(super) fn take_lease(
    tx: &Connection,
    name: &str,
    holder: &str,
    now_ms: u64,
    lease_ms: u64,
) -> Result<bool, SettleError> {
    let leased = exec(
        tx,
        "INSERT INTO leases (name, holder, until_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
         until_ms = excluded.until_ms \
         WHERE leases.holder = excluded.holder OR leases.until_ms <= ?4",
        params![
            name,
            holder,
            ms(now_ms.saturating_add(lease_ms)),
            ms(now_ms)
        ],
    )
    .map_err(db)?;
    Ok(leased != 0)
}
