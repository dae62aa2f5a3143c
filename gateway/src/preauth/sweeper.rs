//! The hold sweeper: releases expired holds of accounts nobody touches (active accounts have
//! theirs released lazily inside every operation), and lets go of finished payments' state
//! past the retention (`BalanceStore::evict_finished`). Runs until shutdown, a bounded amount
//! of work per tick.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{BalanceStore, OpContext};
use crate::periodic::spawn_periodic;
use crate::telemetry;

/// Sweeps every `interval` until `shutdown` turns true. `accounts_per_tick` bounds one tick's
/// work; `holds_per_account` bounds one account's.
pub fn spawn_sweeper(
    store: Arc<dyn BalanceStore>,
    interval: Duration,
    accounts_per_tick: usize,
    holds_per_account: u32,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    spawn_periodic(interval, shutdown, move || {
        let store = store.clone();
        async move {
            let ctx = OpContext {
                now_ms: telemetry::now_ms(),
                lazy_release_max: holds_per_account,
            };
            match store.sweep_expired(ctx, accounts_per_tick).await {
                Ok(released) => telemetry::holds_swept(released),
                Err(err) => tracing::warn!(error = %err, "hold sweep failed; will retry"),
            }
            match store.evict_finished(ctx.now_ms).await {
                Ok(0) => {}
                Ok(evicted) => tracing::debug!(
                    evicted,
                    "finished payments past the retention left the balance store"
                ),
                Err(err) => tracing::warn!(error = %err, "retention sweep failed; will retry"),
            }
        }
    })
}
