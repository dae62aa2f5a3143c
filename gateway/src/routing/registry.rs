//! The configured channels at run time: each built adapter with its routing facts and its
//! breaker. Built once at start (a channel whose keys cannot be loaded stops the start); the
//! payment path will take its candidates from here.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::{Breaker, BreakerSnapshot, ChannelRoute};
use crate::channels::{build_channel, Channel, ChannelKind, ChannelSettings, ChannelSettingsError};

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

    /// Each channel's breaker and live numbers, now.
    pub fn statuses(&self, now: Instant) -> Vec<ChannelStatus> {
        self.entries
            .iter()
            .map(|entry| ChannelStatus {
                id: entry.route.channel_id.clone(),
                kind: entry.kind,
                priority: entry.route.priority,
                enabled: entry.route.enabled,
                breaker: entry
                    .breaker
                    .lock()
                    .expect("a breaker lock is never poisoned: no panics while held")
                    .snapshot(now),
            })
            .collect()
    }
}
