//! Building and running the server. `Application::build` binds the listener before serving,
//! so a test can ask for port 0 and read back the real port; `run_until` serves until a
//! shutdown signal, then drains in-flight requests for at most `server.shutdown_grace_ms`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use tokio::task::JoinHandle;

use crate::api::server::ConnectionLimits;
use crate::api::{self, AppState};
use crate::channels::ChannelSettingsError;
use crate::config::{Config, StoreLocation};
use crate::payments::resolution::spawn_resolution;
use crate::preauth::memory::MemoryStore;
use crate::preauth::redis::RedisStore;
use crate::preauth::{spawn_sweeper, BalanceStore, StoreError};
use crate::routing::ChannelRegistry;
use crate::settlement::postgres::PostgresStore;
use crate::settlement::rebuild::{rebuild_balances, RecoveryError};
use crate::settlement::recovery::{recover_once, spawn_recovery, RecoveryReport};
use crate::settlement::settler::Settler;
use crate::settlement::sqlite::SqliteStore;
use crate::settlement::stream::{SettlementStream, StreamSettings};
use crate::settlement::{check_schema, NoWebhook, SettleError, SettlementStore};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("balance store: {0}")]
    Store(#[from] StoreError),
    #[error("settlement store: {0}")]
    Settlement(#[from] SettleError),
    #[error("rebuilding balances: {0}")]
    Recovery(#[from] RecoveryError),
    #[error("{0}")]
    Channel(#[from] ChannelSettingsError),
    #[error("{0}")]
    Refused(String),
}

/// How the gateway may run (defined with the configuration, whose rules depend on it).
pub use crate::config::Mode;

pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    stop_tx: watch::Sender<bool>,
    writer: JoinHandle<()>,
}

/// Opens the configured settlement store (SQLite file or PostgreSQL pool).
pub async fn open_settlement_store(
    config: &Config,
) -> Result<Arc<dyn SettlementStore>, StartError> {
    let settings = &config.settings.store;
    // Events of a merchant without a webhook URL have nowhere to go unless the payment names
    // one: stored `skipped` at once, never claimed by the worker.
    let no_webhook = NoWebhook::new(
        config
            .merchants
            .iter()
            .filter(|m| m.webhook_url.is_none())
            .map(|m| m.id.as_str().to_owned()),
    );
    Ok(match config.store_location() {
        StoreLocation::Sqlite(path) => {
            Arc::new(SqliteStore::open(&path)?.with_no_webhook(no_webhook))
        }
        StoreLocation::Postgres(url) => Arc::new(
            PostgresStore::connect(
                url.expose(),
                settings.pool_size,
                settings.connect_timeout_ms,
            )
            .await?
            .with_no_webhook(no_webhook),
        ),
    })
}

/// Opens the configured balance store.
pub async fn open_balance_store(
    config: &Config,
    mode: Mode,
) -> Result<Arc<dyn BalanceStore>, StartError> {
    if config.uses_redis() {
        Ok(Arc::new(RedisStore::connect(&config.settings.redis).await?))
    } else if mode == Mode::Sandbox {
        Ok(Arc::new(MemoryStore::new()))
    } else {
        Err(StartError::Refused(
            "redis.url is empty: the in-process balance store is for --sandbox only; \
             set redis.url (or GATEWAY__REDIS__URL)"
                .into(),
        ))
    }
}

impl Application {
    /// Opens both stores (the sandbox migrates its settlement store; production refuses an
    /// unmigrated or unknown schema), rebuilds an empty balance store from the settlement
    /// store, and binds the listener.
    pub async fn build(config: Config, mode: Mode) -> Result<Self, StartError> {
        let balances = open_balance_store(&config, mode).await?;
        let store = open_settlement_store(&config).await?;
        if mode == Mode::Sandbox {
            store.migrate().await?;
        } else {
            check_schema(store.as_ref()).await?;
        }
        Self::build_with(config, balances, store).await
    }

    /// Builds around given stores (tests and benchmarks), which must be migrated.
    pub async fn build_with(
        config: Config,
        balances: Arc<dyn BalanceStore>,
        store: Arc<dyn SettlementStore>,
    ) -> Result<Self, StartError> {
        check_schema(store.as_ref()).await?;
        if !balances.has_accounts().await? {
            let loaded = rebuild_balances(
                store.as_ref(),
                balances.as_ref(),
                None,
                config.settings.preauth.idempotency_retention_seconds,
            )
            .await?;
            if loaded > 0 {
                tracing::info!(
                    accounts = loaded,
                    "the balance store was empty: rebuilt it from the settlement store"
                );
            }
        }
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let s = &config.settings.store;
        // SQLite has one connection: a second commit would only queue behind the first.
        let commits_in_flight = match config.store_location() {
            StoreLocation::Sqlite(_) => 1,
            StoreLocation::Postgres(_) => s.commits_in_flight,
        };
        let (stream, writer) = SettlementStream::spawn(
            store.clone(),
            balances.clone(),
            StreamSettings {
                queue_capacity: s.queue_capacity,
                batch_max_rows: s.batch_max_rows,
                batch_max_wait_ms: s.batch_max_wait_ms,
                commit_spacing: Duration::from_micros(s.commit_spacing_us),
                commit_spacing_rows: s.commit_spacing_rows,
                commits_in_flight,
                health_check_interval_ms: s.health_check_interval_ms,
                idempotency_retention_seconds: config
                    .settings
                    .preauth
                    .idempotency_retention_seconds,
            },
            stop_rx,
        );
        let settler = Arc::new(Settler::new(
            store,
            balances.clone(),
            stream,
            Duration::from_millis(s.settle_timeout_ms),
        ));
        // Finish what a previous run left half done before taking new requests: one full pass
        // over the outbox (bounded; a store that is down leaves the rest to the recovery loop).
        let mut total = RecoveryReport::default();
        for _ in 0..STARTUP_RECOVERY_PASSES {
            let report = recover_once(&settler, 0, s.recovery_batch).await?;
            total.settled += report.settled;
            total.intents += report.intents;
            total.statuses += report.statuses;
            total.failed += report.failed;
            total.unwound += report.unwound;
            if report.complete || report.failed > 0 {
                break;
            }
        }
        if total.settled + total.intents + total.statuses + total.failed + total.unwound > 0 {
            tracing::info!(?total, "startup recovery");
        }
        // The recorder first, so the breakers' initial state is exported from the start.
        let _ = crate::telemetry::prometheus();
        let channels = Arc::new(ChannelRegistry::build(&config.settings.channels)?);
        let public_url = match config.settings.server.public_url.as_str() {
            "" => format!(
                "http://{}",
                listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?
            ),
            url => url.to_owned(),
        };
        let state = Arc::new(AppState::new(crate::state::Core::new(
            Arc::new(config),
            balances,
            settler,
            channels,
            public_url,
        )));
        Ok(Self {
            listener,
            state,
            stop_tx,
            writer,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, marks itself draining, gives
    /// in-flight requests `server.shutdown_grace_ms` to finish, and lets the settlement writer
    /// commit what is queued.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let settings = &self.state.config.settings;
        let grace = Duration::from_millis(settings.server.shutdown_grace_ms);
        let stop_rx = self.stop_tx.subscribe();
        let sweeper = spawn_sweeper(
            self.state.balances.clone(),
            Duration::from_millis(settings.preauth.sweep_interval_ms),
            settings.preauth.sweep_accounts_per_tick,
            settings.preauth.lazy_release_max,
            crate::preauth::Eviction {
                retention: Duration::from_secs(settings.redis.payment_retention_seconds),
                slots_per_call: settings.redis.index_slots_per_call,
            },
            stop_rx.clone(),
        );
        let recovery = spawn_recovery(
            self.state.settler.clone(),
            Duration::from_millis(settings.store.recovery_interval_ms),
            settings.store.recovery_min_age_ms,
            settings.store.recovery_batch,
            stop_rx.clone(),
        );

        let key_purge = crate::settlement::recovery::spawn_key_purge(
            self.state.settler.store.clone(),
            Duration::from_millis(settings.preauth.key_purge_interval_ms),
            settings.preauth.key_purge_batch,
            settings.preauth.idempotency_retention_seconds,
            stop_rx.clone(),
        );
        let upkeep = crate::telemetry::spawn_metrics_upkeep(
            self.state.metrics.clone(),
            Duration::from_millis(settings.telemetry.metrics_upkeep_ms),
            stop_rx.clone(),
        );
        let resolution = spawn_resolution(self.state.core.clone(), stop_rx.clone());
        let webhooks = crate::webhooks::spawn_webhooks(self.state.core.clone(), stop_rx.clone());

        let state = self.state.clone();
        let app = api::router(self.state.clone());
        let limits = ConnectionLimits::from_settings(&settings.server);
        let server = tokio::spawn(crate::api::server::serve(
            self.listener,
            app,
            limits,
            stop_rx,
        ));

        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: draining in-flight requests"
        );
        state.draining.store(true, Ordering::Relaxed);
        let _ = self.stop_tx.send(true);
        let result = match tokio::time::timeout(grace, server).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(join)) => Err(std::io::Error::other(join)),
            Err(_) => {
                tracing::warn!("shutdown grace period over; abandoning remaining requests");
                Ok(())
            }
        };
        let _ = sweeper.await;
        let _ = recovery.await;
        let _ = key_purge.await;
        let _ = resolution.await;
        let _ = webhooks.await;
        let _ = upkeep.await;
        drop(state);
        if tokio::time::timeout(grace, self.writer).await.is_err() {
            tracing::warn!("the settlement writer did not finish in time; recovery will redo its queue at the next start");
        }
        result
    }
}

/// Startup recovery passes at most (each reads `store.recovery_batch` scopes).
const STARTUP_RECOVERY_PASSES: usize = 10_000;

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is *called* (not when
/// the future is first polled), so a signal that arrives right after the gateway said it
/// listens is never handled by the default action (terminating without a drain).
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let (mut terminate, mut interrupt) = (terminate, interrupt);
            let term = async {
                match terminate.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match interrupt.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {}
                _ = int => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
