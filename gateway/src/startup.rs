//! Building and running the server. `Application::build` binds the listener before serving,
//! so a test can ask for port 0 and read back the real port; `run_until` serves until a
//! shutdown signal, then drains in-flight requests for at most `server.shutdown_grace_ms`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::preauth::memory::MemoryStore;
use crate::preauth::redis::RedisStore;
use crate::preauth::{spawn_sweeper, BalanceStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("balance store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Refused(String),
}

/// How the gateway may run: the in-process store is for the sandbox only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Production,
    Sandbox,
}

pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
}

impl Application {
    pub async fn build(config: Config, mode: Mode) -> Result<Self, StartError> {
        let store: Arc<dyn BalanceStore> = if config.uses_redis() {
            Arc::new(RedisStore::connect(&config.settings.redis).await?)
        } else if mode == Mode::Sandbox {
            Arc::new(MemoryStore::new())
        } else {
            return Err(StartError::Refused(
                "redis.url is empty: the in-process balance store is for --sandbox only; \
                 set redis.url (or GATEWAY__REDIS__URL)"
                    .into(),
            ));
        };
        Self::build_with_store(config, store).await
    }

    /// Builds around a given store (tests and benchmarks share one between apps).
    pub async fn build_with_store(
        config: Config,
        store: Arc<dyn BalanceStore>,
    ) -> Result<Self, StartError> {
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let state = Arc::new(AppState::new(Arc::new(config), store));
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, marks itself draining and
    /// gives in-flight requests `server.shutdown_grace_ms` to finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let settings = &self.state.config.settings;
        let grace = Duration::from_millis(settings.server.shutdown_grace_ms);
        let (stop_tx, stop_rx) = watch::channel(false);
        let sweeper = spawn_sweeper(
            self.state.store.clone(),
            Duration::from_millis(settings.preauth.sweep_interval_ms),
            settings.preauth.sweep_accounts_per_tick,
            settings.preauth.lazy_release_max,
            stop_rx.clone(),
        );

        let state = self.state.clone();
        let mut drain_rx = stop_rx;
        let app = api::router(self.state.clone());
        // Small request/response pairs: never wait on Nagle's algorithm.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::warn!(error = %err, "cannot set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = drain_rx.wait_for(|stop| *stop).await;
        });
        let server = tokio::spawn(async move { server.await });

        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: draining in-flight requests"
        );
        state.draining.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        let result = match tokio::time::timeout(grace, server).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(std::io::Error::other(join)),
            Err(_) => {
                tracing::warn!("shutdown grace period over; abandoning remaining requests");
                Ok(())
            }
        };
        let _ = sweeper.await;
        result
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
