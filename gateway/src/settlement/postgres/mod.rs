//! The PostgreSQL backend: the production settlement store, shared by several gateway
//! instances. It owns the connection pool (deadpool-postgres, no TLS, bounded size, connect and
//! wait timeouts), the embedded migrations applied under an advisory lock (so concurrent
//! `gateway migrate` runs serialize), and the SQL of every
//! [`SettlementStore`](super::SettlementStore) call with the same semantics as the SQLite
//! backend (`sqlite/`, the reference).
//!
//! Durability comes from the server: `synchronous_commit=on` (the default) fsyncs every commit,
//! and a batch of settlements is one transaction, so group commit keeps the fsyncs per payment
//! low instead of weakening them.
//!
//! Differences the column types force (everything else behaves as on SQLite):
//! - `sequence` is `INTEGER` (i32 here): a settlement whose sequence does not fit is refused as
//!   [`SettleError::Invalid`] before anything is written;
//!   so is an attempt whose number, or a payment whose `checks`, does not fit;
//! - PostgreSQL text cannot hold a NUL character: a settlement, payment or account with one in
//!   any text field is refused as [`SettleError::Invalid`] (rather than failing the whole batch
//!   as "unavailable" over and over);
//! - ordered results sort by bytes (`COLLATE "C"`), like SQLite, whatever the database's
//!   collation.
//!
//! Errors never carry the connection URL or its password.
//!
//! This module holds the pool, the migrations and the helpers every table group shares; each
//! table group's SQL is in its own file: `payments`, `checks`, `money`, `writes` (the group
//! commit), `refunds`, `keys`, `flags`, `webhooks`; `lease` holds the lease claim that
//! `checks`, `webhooks` and the key purge share.

/// The batch statements' shared parts (`INSERT_INTENTS`, `INSERT_CREATING_SETTLEMENTS`): the
/// first 21 `UNNEST` parameters and their names in `i` (what `payments::PaymentColumns` sends),
/// then `pay` (the payments inserted, where neither their id, their idempotency key, a refusal
/// under it nor their live scoped order id is taken; in id order, the lock order every batch
/// keeps) and `ev` (their first events, kept histories only).
macro_rules! unnest_payment_types {
    () => {
        "$1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[], $7::TEXT[], \
        $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::BIGINT[], $12::BIGINT[], $13::BIGINT[], \
        $14::BIGINT[], $15::BIGINT[], $16::TEXT[], $17::BIGINT[], $18::INTEGER[], $19::TEXT[], \
        $20::TEXT[], $21::BOOLEAN[]"
    };
}
macro_rules! unnest_payment_names {
    () => {
        "id, merchant_id, account_id, scope_tag, merchant_order_id, amount_minor, currency, \
        method, purpose, status, held_minor, hold_expires_at_ms, created_at_ms, expires_at_ms, \
        updated_at_ms, doc, next_check_at_ms, checks, idempotency_key, request_hash, \
        keeps_history"
    };
}
macro_rules! insert_unnested_payments {
    () => {
        "pay AS (INSERT INTO payments (id, merchant_id, account_id, scope_tag, \
        merchant_order_id, amount_minor, currency, method, purpose, status, held_minor, \
        hold_expires_at_ms, created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, \
        checks, idempotency_key, request_hash) SELECT id, merchant_id, account_id, scope_tag, \
        merchant_order_id, amount_minor, currency, method, purpose, status, held_minor, \
        hold_expires_at_ms, created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, \
        checks, idempotency_key, request_hash FROM i WHERE NOT EXISTS (SELECT 1 FROM refusals r \
        WHERE r.scope_tag = i.scope_tag AND r.idempotency_key = i.idempotency_key) \
        ORDER BY id COLLATE \"C\" ON CONFLICT DO NOTHING RETURNING id, status, updated_at_ms), \
        ev AS (INSERT INTO payment_events (payment_id, status, at_ms) SELECT pay.id, pay.status, \
        pay.updated_at_ms FROM pay WHERE EXISTS (SELECT 1 FROM i WHERE i.id = pay.id \
        AND i.keeps_history) ON CONFLICT DO NOTHING)"
    };
}

mod checks;
mod flags;
mod keys;
mod lease;
mod money;
mod payments;
mod refunds;
mod webhooks;
mod writes;

use std::str::FromStr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres::{self, NoTls, Row};
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, QueueMode, RecyclingMethod, Runtime, Transaction,
};
use tokio_postgres::types::FromSql;

use crate::money::Currency;
use crate::settlement::{
    Migration, NoWebhook, SchemaStore, SettleError, MIGRATIONS, SCHEMA_VERSION,
};
use crate::telemetry::{self, StoreOp};

/// The advisory lock every migrator takes inside its transaction ("gateway1" in ASCII).
const MIGRATION_LOCK: i64 = 0x6761_7465_7761_7931;

/// The server-side bound on one statement and on waiting for a lock (ms).
pub const STATEMENT_TIMEOUT_MS: u64 = 30_000;

pub struct PostgresStore {
    pool: Pool,
    /// `host:port/db`, without user or password: for `Debug` and logs.
    target: String,
    /// Strings that must never appear in an error (the URL, the password).
    secrets: Vec<String>,
    no_webhook: NoWebhook,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish()
    }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An error and its causes on one line (tokio-postgres puts the server's message in the cause).
fn describe(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    msg.replace('\n', "; ")
}

fn scrub(mut msg: String, secrets: &[String]) -> String {
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if msg.contains(secret.as_str()) {
            msg = msg.replace(secret.as_str(), "[redacted]");
        }
    }
    msg
}

fn bad_row(what: impl std::fmt::Display) -> SettleError {
    SettleError::Unavailable(format!("unreadable row in the settlement store: {what}"))
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, SettleError> {
    row.try_get(idx).map_err(|e| bad_row(describe(&e)))
}

/// A text column holding one of an enum's names (a status, a method, a purpose).
pub(super) fn get_named<T>(
    row: &Row,
    idx: usize,
    parse: fn(&str) -> Option<T>,
) -> Result<T, SettleError> {
    let text: String = get(row, idx)?;
    parse(&text).ok_or_else(|| bad_row(format!("unknown value {text:?} in column {idx}")))
}

fn get_u64(row: &Row, idx: usize) -> Result<u64, SettleError> {
    let v: i64 = get(row, idx)?;
    u64::try_from(v).map_err(|_| bad_row(format!("negative value {v} in column {idx}")))
}

fn get_u32(row: &Row, idx: usize) -> Result<u32, SettleError> {
    let v: i32 = get(row, idx)?;
    u32::try_from(v).map_err(|_| bad_row(format!("negative value {v} in column {idx}")))
}

fn get_currency(row: &Row, idx: usize) -> Result<Currency, SettleError> {
    let code: String = get(row, idx)?;
    Currency::parse(&code).map_err(|e| bad_row(format!("currency {code:?}: {e}")))
}

fn invalid(id: &str, what: &str) -> SettleError {
    SettleError::Invalid(format!("{id}: {what}"))
}

/// PostgreSQL text cannot contain NUL: refuse it up front, as bad input.
fn no_nul<'a>(id: &str, fields: impl IntoIterator<Item = &'a str>) -> Result<(), SettleError> {
    if fields.into_iter().any(|f| f.contains('\0')) {
        return Err(invalid(id, "text fields cannot contain NUL characters"));
    }
    Ok(())
}

impl PostgresStore {
    /// Builds the pool (`pool_size` connections at most; connecting, waiting for a free
    /// connection and recycling one each bounded by `connect_timeout_ms`) and checks that the
    /// server answers. A URL that does not parse is `Misconfigured`; a server that cannot be
    /// reached is `Unavailable`. Neither error contains the URL or its password. Statements
    /// are bounded by [`STATEMENT_TIMEOUT_MS`] unless the URL sets its own `options`.
    pub async fn connect(
        url: &str,
        pool_size: usize,
        connect_timeout_ms: u64,
    ) -> Result<Self, SettleError> {
        let mut secrets = vec![url.to_owned()];
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
            SettleError::Misconfigured(format!(
                "invalid PostgreSQL URL: {}",
                scrub(describe(&e), &secrets)
            ))
        })?;
        if let Some(password) = config.get_password() {
            secrets.push(String::from_utf8_lossy(password).into_owned());
        }
        if config.get_hosts().is_empty() {
            return Err(SettleError::Misconfigured(
                "the PostgreSQL URL names no host".into(),
            ));
        }
        if pool_size == 0 {
            return Err(SettleError::Misconfigured(
                "the PostgreSQL pool size must be at least 1".into(),
            ));
        }
        if connect_timeout_ms == 0 {
            return Err(SettleError::Misconfigured(
                "the PostgreSQL connect timeout must be at least 1 ms".into(),
            ));
        }
        let timeout = Duration::from_millis(connect_timeout_ms);
        config.connect_timeout(timeout);
        if config.get_application_name().is_none() {
            config.application_name("gateway");
        }
        // Bound every statement: a query stuck behind a lock must fail (and the writer mark
        // the store unhealthy) rather than wait forever. A URL with its own `options` wins.
        if config.get_options().is_none() {
            config.options(format!(
                "-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={STATEMENT_TIMEOUT_MS}"
            ));
        }
        let target = target_of(&config);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            // The connection returned last is handed out first: the writer's commits, one
            // after another, keep to one backend (its caches warm) instead of going round
            // every connection of the pool.
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(timeout))
            .wait_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| SettleError::Misconfigured(scrub(describe(&e), &secrets)))?;
        let store = Self {
            pool,
            target,
            secrets,
            no_webhook: NoWebhook::default(),
        };
        store.ping().await?;
        tracing::info!(server = %store.target, pool_size, "connected to PostgreSQL");
        Ok(store)
    }

    /// Events of these merchants with nowhere to go are stored `skipped` ([`NoWebhook`]).
    pub fn with_no_webhook(mut self, no_webhook: NoWebhook) -> Self {
        self.no_webhook = no_webhook;
        self
    }

    fn unavailable(&self, e: &dyn std::error::Error) -> SettleError {
        SettleError::Unavailable(scrub(describe(e), &self.secrets))
    }

    async fn client(&self) -> Result<Object, SettleError> {
        self.pool.get().await.map_err(|e| self.unavailable(&e))
    }

    async fn timed<T>(
        op: StoreOp,
        call: impl std::future::Future<Output = Result<T, SettleError>>,
    ) -> Result<T, SettleError> {
        let started = Instant::now();
        let result = call.await;
        telemetry::store_call("postgres", op, started.elapsed());
        result
    }

    /// The highest applied migration (0 when none), read inside a migrator's transaction.
    async fn applied_version(&self, tx: &Transaction<'_>) -> Result<u32, SettleError> {
        let row = tx
            .query_one("SELECT MAX(version) FROM schema_migrations", &[])
            .await
            .map_err(|e| self.unavailable(&e))?;
        match get::<Option<i32>>(&row, 0)? {
            None => Ok(0),
            Some(v) => u32::try_from(v).map_err(|_| bad_row(format!("schema version {v}"))),
        }
    }

    async fn migrate_inner(&self) -> Result<u32, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let mut client = self.client().await?;
        // Under the lock: two concurrent `CREATE TABLE IF NOT EXISTS` can collide in the catalog.
        let tx = client.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (\
             version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        // One transaction per migration; each re-reads the version under the lock, so a
        // migration another instance applied meanwhile is not applied twice.
        loop {
            let tx = client.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(db)?;
            let current = self.applied_version(&tx).await?;
            if current > SCHEMA_VERSION {
                return Err(SettleError::WrongSchema {
                    found: current,
                    expected: SCHEMA_VERSION,
                });
            }
            let Some(Migration {
                version,
                postgres: sql,
                ..
            }) = MIGRATIONS.iter().find(|m| m.version > current)
            else {
                tx.commit().await.map_err(db)?;
                return Ok(SCHEMA_VERSION);
            };
            let version_i32 = i32::try_from(*version).map_err(|_| {
                SettleError::Misconfigured(format!("migration {version} out of range"))
            })?;
            tx.batch_execute(sql).await.map_err(db)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
                &[&version_i32, &ms(telemetry::now_ms())],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            tracing::info!(version, "applied migration");
        }
    }

    async fn schema_version_inner(&self) -> Result<Option<u32>, SettleError> {
        let db = |e: tokio_postgres::Error| self.unavailable(&e);
        let client = self.client().await?;
        let row = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(db)?;
        let exists: bool = get(&row, 0)?;
        if !exists {
            return Ok(None);
        }
        let row = client
            .query_one("SELECT MAX(version) FROM schema_migrations", &[])
            .await
            .map_err(db)?;
        match get::<Option<i32>>(&row, 0)? {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| bad_row(format!("schema version {v}"))),
        }
    }

    async fn ping_inner(&self) -> Result<(), SettleError> {
        let client = self.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| self.unavailable(&e))?;
        Ok(())
    }
}

/// `host:port[,host:port…]/db` of a connection config, for logs (no user, no password).
fn target_of(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    format!(
        "{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or_default()
    )
}

#[async_trait]
impl SchemaStore for PostgresStore {
    async fn migrate(&self) -> Result<u32, SettleError> {
        Self::timed(StoreOp::Write("migrate"), self.migrate_inner()).await
    }

    async fn schema_version(&self) -> Result<Option<u32>, SettleError> {
        Self::timed(StoreOp::Read("schema_version"), self.schema_version_inner()).await
    }

    async fn ping(&self) -> Result<(), SettleError> {
        Self::timed(StoreOp::Read("ping"), self.ping_inner()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_hides_the_url_and_the_password() {
        let secrets = vec![
            "postgres://app:s3cret@db:5432/gw".to_owned(),
            "s3cret".to_owned(),
        ];
        let msg = scrub(
            "cannot reach postgres://app:s3cret@db:5432/gw (password s3cret)".to_owned(),
            &secrets,
        );
        assert!(!msg.contains("s3cret"), "{msg}");
        assert!(!msg.contains("postgres://"), "{msg}");
    }

    #[tokio::test]
    async fn a_bad_url_is_misconfigured_without_echoing_it() {
        let url = "postgres://app:s3cret@db:notaport/gw";
        let err = PostgresStore::connect(url, 2, 100).await.unwrap_err();
        assert!(matches!(err, SettleError::Misconfigured(_)), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_without_echoing_the_password() {
        // Port 1 on loopback: nothing listens there.
        let url = "postgres://app:s3cret@127.0.0.1:1/gw";
        let err = PostgresStore::connect(url, 2, 500).await.unwrap_err();
        assert!(matches!(err, SettleError::Unavailable(_)), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
