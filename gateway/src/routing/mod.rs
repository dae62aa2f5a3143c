//! Routing (DESIGN.md §6): which upstream channel takes a payment, and the per-channel
//! circuit breakers that keep failing channels out of the way. Pure logic only — no HTTP,
//! no configuration loading, no clock reads: the API's create call will own the breakers
//! (one per channel and gateway instance, each behind its own lock), pass the time in, and
//! ask [`policy::rank`] for the failover order.
//!
//! - [`breaker`]: one channel's breaker — closed / open / half-open, its sliding window,
//!   trip rules, growing capped cool-down, probe accounting and state-epoch permits.
//! - [`policy`]: the pure ranking function — filters, priority tiers, the weighted order
//!   scaled by success rate and latency, fee as tie-breaker.
//!
//! This file joins the two: [`live_stats`] turns a breaker's snapshot into the live numbers
//! the policy scales weights by.
//!
//! A create call is expected to go: build the [`Candidate`]s from the configured
//! [`ChannelRoute`]s and each breaker's [`live_stats`]; [`rank`]; then for each channel in
//! that order, [`Breaker::try_acquire`] (it may have changed since the snapshot — then take
//! the next), call the channel, and [`Breaker::record`] the outcome (or
//! [`Breaker::release`] the permit if nothing was sent). Which outcomes allow a failover
//! to the next channel is the failover rule of DESIGN.md §6, not the breaker's business.

pub mod breaker;
pub mod policy;

pub use breaker::{
    Breaker, BreakerOpen, BreakerSettings, BreakerSnapshot, BreakerState, CallOutcome, CallPermit,
    FailureKind, TripReason,
};
pub mod registry;

pub use policy::{rank, Candidate, ChannelRoute, LiveStats, RouteRequest, MAX_CANDIDATES};
pub use registry::{ChannelEntry, ChannelRegistry, ChannelStatus};

/// The latency assumed for a channel whose window holds no answered call (just started,
/// or just closed after its probes): a typical upstream create call. Assuming 0 would
/// favour an unmeasured channel ~5× over a measured 200 ms one; assuming a large value
/// would starve it of the traffic that measures it.
pub const UNMEASURED_LATENCY_MS: u32 = 200;

/// The live numbers routing needs, from a breaker's snapshot: whether it admits a call,
/// its window's success rate, and its window's mean latency (or
/// [`UNMEASURED_LATENCY_MS`]).
pub fn live_stats(snapshot: &BreakerSnapshot) -> LiveStats {
    LiveStats {
        admits: snapshot.admits,
        success_rate_percent: snapshot.success_rate_percent,
        latency_ms: snapshot.latency_mean_ms.unwrap_or(UNMEASURED_LATENCY_MS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn live_stats_follow_the_breaker() {
        let now = Instant::now();
        let mut breaker = Breaker::new("alipay", BreakerSettings::default());
        assert_eq!(
            live_stats(&breaker.snapshot(now)),
            LiveStats {
                admits: true,
                success_rate_percent: 100,
                latency_ms: UNMEASURED_LATENCY_MS
            }
        );
        for outcome in [
            CallOutcome::Success {
                latency: Duration::from_millis(120),
            },
            CallOutcome::Failure(FailureKind::Connect),
        ] {
            let permit = breaker.try_acquire(now).unwrap();
            breaker.record(now, permit, outcome);
        }
        assert_eq!(
            live_stats(&breaker.snapshot(now)),
            LiveStats {
                admits: true,
                success_rate_percent: 50,
                latency_ms: 120
            }
        );
    }
}
