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

/// A full pass of the retention eviction over the slot indexes takes the retention divided by
/// this while there is nothing to evict: finished payments leave within 1 + 1/4 retentions.
const PASSES_PER_RETENTION: u128 = 4;

/// How the sweeper paces the retention eviction (`BalanceStore::evict_finished`).
#[derive(Debug, Clone, Copy)]
pub struct Eviction {
    /// `redis.payment_retention_seconds`.
    pub retention: Duration,
    /// Index slots one eviction call reads (`redis.index_slots_per_call`).
    pub slots_per_call: usize,
}

impl Eviction {
    /// Ticks between two eviction calls while there is nothing to evict: a full pass over the slot
    /// indexes then takes about a quarter of the retention, so a finished payment leaves
    /// within 1.25 retentions, and an idle gateway does not read 1024 retention indexes every
    /// tick (a pass every 16 s for a 24 h retention was half of the background loops'
    /// instructions). A call that evicted anything is followed by another at the next tick.
    pub fn every_ticks(&self, interval: Duration) -> u64 {
        let calls_per_pass =
            crate::preauth::slots::SLOTS as u128 / self.slots_per_call.max(1) as u128;
        let pass = self.retention.as_millis() / PASSES_PER_RETENTION;
        let tick = interval.as_millis().max(1);
        u64::try_from(pass / calls_per_pass.max(1) / tick)
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// When the next eviction call is due: after `every` ticks, or at the next tick when the last
/// call evicted anything (there may be more behind it: a backlog, or a busy Redis's next
/// slots) or failed. The first tick is due.
#[derive(Debug)]
struct Pace {
    every: u64,
    since: u64,
    more: bool,
}

impl Pace {
    fn new(every: u64) -> Self {
        Self {
            every: every.max(1),
            since: u64::MAX,
            more: false,
        }
    }

    /// One tick: whether it calls.
    fn tick(&mut self) -> bool {
        self.since = self.since.saturating_add(1);
        self.since >= self.every || self.more
    }

    /// A call ended: `more` when it evicted anything or failed.
    fn called(&mut self, more: bool) {
        self.since = 0;
        self.more = more;
    }
}

/// Sweeps every `interval` until `shutdown` turns true. `accounts_per_tick` bounds one tick's
/// work; `holds_per_account` bounds one account's; `eviction` paces the retention.
pub fn spawn_sweeper(
    store: Arc<dyn BalanceStore>,
    interval: Duration,
    accounts_per_tick: usize,
    holds_per_account: u32,
    eviction: Eviction,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let pace = Arc::new(std::sync::Mutex::new(Pace::new(
        eviction.every_ticks(interval),
    )));
    spawn_periodic(interval, shutdown, move || {
        let store = store.clone();
        let pace = pace.clone();
        async move {
            let ctx = OpContext {
                now_ms: telemetry::now_ms(),
                lazy_release_max: holds_per_account,
            };
            match store.sweep_expired(ctx, accounts_per_tick).await {
                Ok(released) => telemetry::holds_swept(released),
                Err(err) => tracing::warn!(error = %err, "hold sweep failed; will retry"),
            }
            if !pace.lock().expect("sweeper pace lock").tick() {
                return;
            }
            let more = match store.evict_finished(ctx.now_ms).await {
                Ok(0) => false,
                Ok(evicted) => {
                    tracing::debug!(
                        evicted,
                        "finished payments past the retention left the balance store"
                    );
                    true
                }
                Err(err) => {
                    tracing::warn!(error = %err, "retention sweep failed; will retry");
                    true
                }
            };
            pace.lock().expect("sweeper pace lock").called(more);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eviction(retention_s: u64) -> Eviction {
        Eviction {
            retention: Duration::from_secs(retention_s),
            slots_per_call: 1024,
        }
    }

    #[test]
    fn a_full_pass_takes_about_a_quarter_of_the_retention() {
        let tick = Duration::from_secs(1);
        // 24 h: 16 calls per pass over 6 h, one every 1350 ticks.
        let every = eviction(86_400).every_ticks(tick);
        assert_eq!(every, 1_350);
        assert_eq!(16 * every, 86_400 / 4);
        // Retentions shorter than 16 ticks per quarter: every tick, as before.
        assert_eq!(eviction(60).every_ticks(tick), 1);
        assert_eq!(eviction(1).every_ticks(Duration::from_millis(50)), 1);
        assert_eq!(eviction(0).every_ticks(tick), 1);
        // Fewer slots per call: more calls per pass, closer together.
        let small = Eviction {
            slots_per_call: 256,
            ..eviction(86_400)
        };
        assert_eq!(small.every_ticks(tick), 337);
    }

    #[test]
    fn a_call_that_evicted_is_followed_at_once_one_that_found_nothing_waits() {
        let mut pace = Pace::new(3);
        assert!(pace.tick(), "the first tick calls");
        pace.called(false);
        // Nothing evicted: the next call three ticks later.
        assert_eq!(
            [pace.tick(), pace.tick(), pace.tick()],
            [false, false, true]
        );
        pace.called(true);
        // Something evicted (or an error): every tick until a call finds nothing.
        assert!(pace.tick());
        pace.called(true);
        assert!(pace.tick());
        pace.called(false);
        assert_eq!(
            [pace.tick(), pace.tick(), pace.tick()],
            [false, false, true]
        );
    }
}
