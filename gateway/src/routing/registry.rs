//! The configured channels at run time: each built adapter with its routing facts and its
//! breaker. Built once at start (a channel whose keys cannot be loaded stops the start); the
//! payment path will take its candidates from here.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::{
    live_stats, rank, Breaker, BreakerSnapshot, CallOutcome, CallPermit, Candidate, ChannelRoute,
    FailureKind, RouteRequest,
};
use crate::channels::{
    build_channel, Channel, ChannelError, ChannelKind, ChannelSettings, ChannelSettingsError,
};

/// One configured channel.
pub struct ChannelEntry {
    pub channel: Arc<dyn Channel>,
    pub route: ChannelRoute,
    pub kind: ChannelKind,
    pub breaker: Mutex<Breaker>,
}

/// Every configured channel, in configuration order.
#[derive(Default)]
pub struct ChannelRegistry {
    entries: Vec<ChannelEntry>,
}

/// What `GET /v1/admin/channels` shows of one channel.
#[derive(Debug, Clone)]
pub struct ChannelStatus {
    pub id: String,
    pub kind: ChannelKind,
    pub priority: u32,
    pub enabled: bool,
    pub breaker: BreakerSnapshot,
}

impl ChannelEntry {
    fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker
            .lock()
            .expect("a breaker lock is never poisoned: no panics while held")
    }

    /// A permit to call this channel now, or `None` when its breaker refuses.
    pub fn try_acquire(&self, now: Instant) -> Option<CallPermit> {
        self.lock_breaker().try_acquire(now).ok()
    }

    /// Gives back a permit whose call was never made.
    pub fn release(&self, permit: CallPermit) {
        self.lock_breaker().release(Instant::now(), permit);
    }

    /// Records how a permitted call ended (DESIGN.md §6: timeouts, connection errors and
    /// 5xx count against the channel; business declines do not; a call that never left is
    /// given back).
    pub fn record<T>(
        &self,
        permit: CallPermit,
        started: Instant,
        result: &Result<T, ChannelError>,
    ) {
        let now = Instant::now();
        let latency = now.saturating_duration_since(started);
        let outcome = match result {
            Ok(_) => CallOutcome::Success { latency },
            Err(err) if err.counts_as_failure() => CallOutcome::Failure(match err {
                ChannelError::Timeout => FailureKind::Timeout,
                ChannelError::ConnectRefused | ChannelError::ConnectFailed { .. } => {
                    FailureKind::Connect
                }
                _ => FailureKind::Status5xx,
            }),
            Err(
                ChannelError::Overloaded
                | ChannelError::CircuitOpen
                | ChannelError::InvalidRequest { .. },
            ) => {
                self.lock_breaker().release(now, permit);
                return;
            }
            Err(_) => CallOutcome::BusinessDecline { latency },
        };
        self.lock_breaker().record(now, permit, outcome);
    }
}

impl ChannelRegistry {
    /// Builds every configured channel (keys loaded, HTTP clients made) and its breaker.
    pub fn build<'a>(
        channels: impl IntoIterator<Item = (&'a String, &'a ChannelSettings)>,
    ) -> Result<Self, ChannelSettingsError> {
        let mut entries = Vec::new();
        for (id, settings) in channels {
            let channel = build_channel(id, settings)?;
            let route = settings.route(id).map_err(|message| ChannelSettingsError {
                channel: id.clone(),
                message,
            })?;
            entries.push(ChannelEntry {
                kind: settings.kind,
                breaker: Mutex::new(Breaker::new(id.clone(), settings.breaker.clone())),
                channel,
                route,
            });
        }
        Ok(Self { entries })
    }

    pub fn entries(&self) -> &[ChannelEntry] {
        &self.entries
    }

    /// The channel with this configured id.
    pub fn get(&self, channel_id: &str) -> Option<&ChannelEntry> {
        self.entries
            .iter()
            .find(|entry| entry.route.channel_id == channel_id)
    }

    /// The failover order for `request` now: indices into [`Self::entries`] of the channels
    /// whose configuration accepts it and whose breaker admits a call, best first
    /// (DESIGN.md §6; see [`rank`]).
    pub fn rank(&self, request: &RouteRequest<'_>, now: Instant, random: u64) -> Vec<usize> {
        let snapshots: Vec<_> = self
            .entries
            .iter()
            .map(|entry| live_stats(&entry.lock_breaker().snapshot(now)))
            .collect();
        let candidates: Vec<Candidate<'_>> = self
            .entries
            .iter()
            .zip(snapshots)
            .map(|(entry, live)| Candidate {
                route: &entry.route,
                live,
            })
            .collect();
        rank(&candidates, request, random)
    }

    /// Each channel's breaker and live numbers, now.
    pub fn statuses(&self, now: Instant) -> Vec<ChannelStatus> {
        self.entries
            .iter()
            .map(|entry| ChannelStatus {
                id: entry.route.channel_id.clone(),
                kind: entry.kind,
                priority: entry.route.priority,
                enabled: entry.route.enabled,
                breaker: entry.lock_breaker().snapshot(now),
            })
            .collect()
    }
}
