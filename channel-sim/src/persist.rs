//! Orders kept across a restart, as a real channel keeps them: a pending order made before
//! the restart can still be queried, paid, closed and refunded afterwards, and a paid order
//! whose success notice was never acknowledged is notified again.
//!
//! The file is JSON (`{"version", "channels": {id: [order…]}}`), written whole to a
//! temporary file, synced and renamed over the old one, so a crash leaves the old or the new
//! version, never half of one. It is written when orders changed, at most every
//! `SimConfig::orders_save_interval_ms`, and at shutdown.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::channel::Channel;
use crate::record::OrderRecord;
use crate::SimError;

/// The file's format; another version is refused rather than guessed at.
const FORMAT_VERSION: u32 = 1;

/// The largest orders file read at start.
pub const MAX_ORDERS_FILE_BYTES: u64 = 512 * 1024 * 1024;

/// An order with what the admin API does not show but a repeat create needs.
#[derive(Serialize, Deserialize)]
struct SavedOrder {
    #[serde(flatten)]
    order: OrderRecord,
    fingerprint: String,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    channels: BTreeMap<String, Vec<SavedOrder>>,
}

/// The orders of each channel as last saved, oldest first (none if there is no file yet).
pub(crate) fn load(path: &Path) -> Result<BTreeMap<String, Vec<(OrderRecord, String)>>, SimError> {
    let error = |what: String| SimError::Config(format!("orders file {}: {what}", path.display()));
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(error(e.to_string())),
    };
    if size > MAX_ORDERS_FILE_BYTES {
        return Err(error(format!(
            "{size} bytes, more than the {MAX_ORDERS_FILE_BYTES} read"
        )));
    }
    let text = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let saved: Saved = serde_json::from_slice(&text).map_err(|e| error(e.to_string()))?;
    if saved.version != FORMAT_VERSION {
        return Err(error(format!(
            "format version {} (this simulator reads {FORMAT_VERSION})",
            saved.version
        )));
    }
    Ok(saved
        .channels
        .into_iter()
        .map(|(id, orders)| {
            let orders = orders
                .into_iter()
                .map(|saved| (saved.order, saved.fingerprint))
                .collect();
            (id, orders)
        })
        .collect())
}

/// Writes every channel's orders: a temporary file, synced, renamed over `path`.
pub(crate) fn save(path: &Path, channels: &BTreeMap<String, Arc<Channel>>) -> std::io::Result<()> {
    let saved = Saved {
        version: FORMAT_VERSION,
        channels: channels
            .iter()
            .map(|(id, channel)| {
                let orders = channel
                    .saved_orders()
                    .into_iter()
                    .map(|(order, fingerprint)| SavedOrder { order, fingerprint })
                    .collect();
                (id.clone(), orders)
            })
            .collect(),
    };
    let text = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
    let temporary = temporary_path(path);
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename itself is durable once the directory is.
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Saves the orders whenever they changed, at most every `interval_ms`, and once more at
/// shutdown.
pub(crate) async fn keep(
    path: PathBuf,
    channels: Arc<BTreeMap<String, Arc<Channel>>>,
    interval_ms: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(interval_ms)) => false,
            _ = shutdown.wait_for(|down| *down) => true,
        };
        // Every channel's flag is taken, so one save covers what changed anywhere.
        let mut changed = false;
        for channel in channels.values() {
            changed |= channel.take_changed();
        }
        if changed {
            let (to, all) = (path.clone(), Arc::clone(&channels));
            let saved = tokio::task::spawn_blocking(move || save(&to, &all)).await;
            let failure = match saved {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(error) = failure {
                // Tried again at the next turn.
                tracing::warn!(%error, "cannot save the orders");
                for channel in channels.values() {
                    channel.mark_changed();
                }
            }
        }
        if stopping {
            return;
        }
    }
}
