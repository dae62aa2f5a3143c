//! Background work that runs every interval until shutdown (the hold sweeper, the recovery
//! loop): one tick's work at a time, never overlapping, missed ticks delayed not bunched.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Runs `tick` every `interval` until `shutdown` turns true.
pub fn spawn_periodic<F, Fut>(
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut tick: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
            tick().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn ticks_every_interval_and_stops_on_shutdown() {
        let (stop, rx) = watch::channel(false);
        let ticks = Arc::new(AtomicUsize::new(0));
        let counter = ticks.clone();
        let handle = spawn_periodic(Duration::from_secs(1), rx, move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        // The first tick is immediate, then one per second.
        assert_eq!(ticks.load(Ordering::SeqCst), 4);
        stop.send(true).unwrap();
        handle.await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 4);
    }
}
