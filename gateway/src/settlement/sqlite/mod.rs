//! The SQLite backend: one file under the data dir, WAL, `synchronous=FULL` (fsync on every
//! commit; group commit keeps the fsyncs per payment low instead of weakening them). SQLite
//! is synchronous, so every call runs on the connection's own thread.
//!
//! This module holds the connection (its thread and the calls it runs), the migrations and the
//! helpers every table group shares; each table group's SQL is in its own file: `payments`,
//! `checks`, `money`, `writes` (the group commit), `refunds`, `keys`, `flags`, `webhooks`;
//! `lease` holds the lease claim that `checks`, `webhooks` and the key purge share.

mod checks;
mod flags;
mod keys;
mod lease;
mod money;
mod payments;
mod refunds;
mod rows;
mod webhooks;
mod writes;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use rusqlite::{params, Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::money::Currency;
use crate::settlement::{NoWebhook, SchemaStore, SettleError, MIGRATIONS, SCHEMA_VERSION};
use crate::telemetry::{self, StoreOp};

/// Waits this long for a lock held by another process (`gateway migrate` beside a server).
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// Prepared statements kept per connection: more than the store has distinct statements.
const STATEMENT_CACHE: usize = 128;

/// The page size of a database this store creates. Each commit writes every page it touched
/// whole to the WAL, and a balance payment touches three B-trees at keys of its own (the live
/// order id, the idempotency key, the account's sequence): 2 KiB pages write 13.5 KiB of WAL
/// per payment at saturation where 4 KiB pages wrote 20.5 KiB, for the same CPU within the
/// noise (docs/PERFORMANCE.md); 1 KiB pages (9.1 KiB) spill the payment rows into overflow
/// pages.
const NEW_DATABASE_PAGE_SIZE: u32 = 2_048;

/// WAL bytes after which a commit checkpoints (PASSIVE), as SQLite's own automatic checkpoint
/// does by default (1000 pages of 4 KiB): the WAL hook that counts the bytes written replaces
/// that one.
const WAL_CHECKPOINT_BYTES: u64 = 4_096_000;

/// Bytes a WAL frame adds to the log beside its page.
const WAL_FRAME_HEADER: u64 = 24;

/// Calls waiting for the connection's thread at most (the writer sends one at a time; the
/// rest are background loops and the admin API).
const CALL_QUEUE: usize = 1_024;

/// A call for the connection's thread.
type Call = Box<dyn FnOnce(&mut Connection) + Send>;

/// One connection, owned by one long-lived thread of its own (`sqlite`) that runs the calls in
/// the order they come. Not tokio's blocking pool: its threads come and go, and glibc's malloc
/// (which SQLite allocates with; the Rust code uses mimalloc) keeps an arena per thread that it
/// rarely gives back — the gateway's RSS was 3–4 times that of the PostgreSQL stack's.
pub struct SqliteStore {
    calls: mpsc::Sender<Call>,
    path: PathBuf,
    no_webhook: NoWebhook,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> SettleError {
    SettleError::Unavailable(e.to_string())
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A text column holding one of an enum's names (a status, a method, a purpose).
pub(super) fn named<T>(text: String, parse: fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown value {text:?}").into(),
        )
    })
}

fn currency(code: String) -> rusqlite::Result<Currency> {
    Currency::parse(&code).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

impl SqliteStore {
    /// Opens (creating the file and its directory) with WAL and full synchronous commits.
    pub fn open(path: &Path) -> Result<Self, SettleError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    SettleError::Misconfigured(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        let conn = Connection::open(path).map_err(unavailable)?;
        conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))
            .map_err(unavailable)?;
        // Only a new, empty database takes it: an existing one keeps the size it was made with.
        conn.execute_batch(&format!("PRAGMA page_size={NEW_DATABASE_PAGE_SIZE}"))
            .map_err(unavailable)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(unavailable)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SettleError::Misconfigured(format!(
                "{} cannot use WAL (journal_mode={mode})",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(unavailable)?;
        // Every hot statement stays prepared (the default cache holds 16).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let mut conn = conn;
        count_wal_bytes(&mut conn)?;
        let (calls, mut queue) = mpsc::channel::<Call>(CALL_QUEUE);
        std::thread::Builder::new()
            .name("sqlite".into())
            .spawn(move || {
                let mut conn = conn;
                // Ends when the store (the only sender) is dropped.
                while let Some(call) = queue.blocking_recv() {
                    // A panicking call drops its reply: its caller gets an error, the thread
                    // (and the connection, its transaction rolled back) goes on.
                    if catch_unwind(AssertUnwindSafe(|| call(&mut conn))).is_err() {
                        tracing::error!("a SQLite store call panicked");
                    }
                }
            })
            .map_err(|e| {
                SettleError::Misconfigured(format!("cannot start the SQLite thread: {e}"))
            })?;
        Ok(Self {
            calls,
            path: path.to_owned(),
            no_webhook: NoWebhook::default(),
        })
    }

    /// Events of these merchants with nowhere to go are stored `skipped` ([`NoWebhook`]).
    pub fn with_no_webhook(mut self, no_webhook: NoWebhook) -> Self {
        self.no_webhook = no_webhook;
        self
    }

    async fn run<T: Send + 'static>(
        &self,
        op: StoreOp,
        f: impl FnOnce(&mut Connection) -> Result<T, SettleError> + Send + 'static,
    ) -> Result<T, SettleError> {
        let started = std::time::Instant::now();
        let (reply, answer) = oneshot::channel();
        let call: Call = Box::new(move |conn| {
            let _ = reply.send(f(conn));
        });
        self.calls
            .send(call)
            .await
            .map_err(|_| unavailable("the SQLite thread has stopped"))?;
        let result = answer
            .await
            .map_err(|_| unavailable("the SQLite call failed (panicked)"))?;
        telemetry::store_call("sqlite", op, started.elapsed());
        result
    }
}

/// Counts the bytes each commit appends to the WAL (`gateway_sqlite_wal_bytes_total`: what the
/// bench divides by the payments committed), and checkpoints as SQLite's automatic checkpoint
/// would (a hook replaces it).
fn count_wal_bytes(conn: &mut Connection) -> Result<(), SettleError> {
    let page_size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(unavailable)?;
    let page_bytes = u64::try_from(page_size).unwrap_or(0).max(512);
    let frame_bytes = page_bytes + WAL_FRAME_HEADER;
    let checkpoint_pages = i32::try_from(WAL_CHECKPOINT_BYTES / page_bytes).unwrap_or(i32::MAX);
    // Pages in the WAL after the previous commit: it restarts from 0 after a checkpoint.
    let mut last_pages = 0i32;
    conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages: i32| {
        let appended = if pages >= last_pages {
            pages - last_pages
        } else {
            pages
        };
        last_pages = pages;
        telemetry::sqlite_wal_bytes(u64::try_from(appended).unwrap_or(0) * frame_bytes);
        if pages >= checkpoint_pages {
            // PASSIVE: copies what no reader needs, never waits. Never an error: the commit
            // that called the hook has happened, and an error here would report it failed; a
            // checkpoint that could not run (another connection's) is tried at the next one.
            if let Err(e) = wal.checkpoint() {
                tracing::debug!(error = %e, "WAL checkpoint deferred");
            }
        }
        Ok(())
    }))
    .map_err(unavailable)
}

fn db(e: rusqlite::Error) -> SettleError {
    unavailable(e)
}

/// `execute` through the connection's statement cache (hot statements are parsed once).
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// `query_row` through the connection's statement cache.
fn query_row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

#[async_trait]
impl SchemaStore for SqliteStore {
    async fn migrate(&self) -> Result<u32, SettleError> {
        self.run(StoreOp::Write("migrate"), |conn| {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations (\
                 version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
            )
            .map_err(db)?;
            let current: Option<u32> = conn
                .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                    r.get(0)
                })
                .map_err(db)?;
            let current = current.unwrap_or(0);
            if current > SCHEMA_VERSION {
                return Err(SettleError::WrongSchema {
                    found: current,
                    expected: SCHEMA_VERSION,
                });
            }
            for m in MIGRATIONS.iter().filter(|m| m.version > current) {
                let version = m.version;
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db)?;
                tx.execute_batch(m.sqlite).map_err(db)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, ?2)",
                    params![version, ms(telemetry::now_ms())],
                )
                .map_err(db)?;
                tx.commit().map_err(db)?;
                tracing::info!(version, "applied migration");
            }
            Ok(SCHEMA_VERSION)
        })
        .await
    }

    async fn schema_version(&self) -> Result<Option<u32>, SettleError> {
        self.run(StoreOp::Read("schema_version"), |conn| {
            let exists: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' \
                     AND name = 'schema_migrations')",
                    [],
                    |r| r.get(0),
                )
                .map_err(db)?;
            if !exists {
                return Ok(None);
            }
            conn.query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })
            .map_err(db)
        })
        .await
    }

    async fn ping(&self) -> Result<(), SettleError> {
        self.run(StoreOp::Read("ping"), |conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map_err(db)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settlement::FlagStore;

    #[tokio::test]
    async fn a_panicking_call_fails_alone_and_the_connection_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite3")).unwrap();
        store.migrate().await.unwrap();
        let failed = store
            .run(StoreOp::Write("test"), |conn| -> Result<(), SettleError> {
                // Mid-transaction: the unwinding rolls it back.
                let tx = conn.transaction().map_err(db)?;
                tx.execute_batch("INSERT INTO flagged (kind, payment_id, detail, created_at_ms) VALUES ('t', 'p', 'd', 1)")
                    .map_err(db)?;
                panic!("a bug in a store call");
            })
            .await;
        assert!(
            matches!(&failed, Err(SettleError::Unavailable(m)) if m.contains("panicked")),
            "{failed:?}"
        );
        // The thread and its connection still answer, and nothing of the failed call stayed.
        assert_eq!(store.schema_version().await.unwrap(), Some(SCHEMA_VERSION));
        assert!(store.flagged(10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_new_database_takes_the_small_page_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let page_size = |path: &Path| -> i64 {
            let conn = Connection::open(path).unwrap();
            conn.query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        let new = dir.path().join("new.sqlite3");
        let store = SqliteStore::open(&new).unwrap();
        store.migrate().await.unwrap();
        drop(store);
        assert_eq!(page_size(&new), i64::from(NEW_DATABASE_PAGE_SIZE));

        // A database made with SQLite's default page keeps it, and the store works on it.
        let old = dir.path().join("old.sqlite3");
        Connection::open(&old)
            .unwrap()
            .execute_batch("PRAGMA page_size=4096; CREATE TABLE before_us (x INTEGER);")
            .unwrap();
        let store = SqliteStore::open(&old).unwrap();
        store.migrate().await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), Some(SCHEMA_VERSION));
        drop(store);
        assert_eq!(page_size(&old), 4096);
    }

    #[tokio::test]
    async fn calls_run_in_the_order_they_were_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.sqlite3")).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let calls: Vec<_> = (0..50)
            .map(|n| {
                let seen = seen.clone();
                store.run(StoreOp::Read("test"), move |_| {
                    seen.lock().unwrap().push(n);
                    Ok(())
                })
            })
            .collect();
        for result in futures_util::future::join_all(calls).await {
            result.unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), (0..50).collect::<Vec<_>>());
    }
}
