//! One channel's circuit breaker (DESIGN.md §6): the state machine, its sliding window and
//! its trip rules. Pure logic: the caller passes the time in (`tokio::time::Instant`) and
//! holds the breaker behind whatever lock it likes; nothing here reads a clock, spawns a
//! task or does I/O, so tests drive it on tokio's paused clock.
//!
//! ## States
//!
//! - **closed**: every call gets a [`CallPermit`]. Results go into a sliding *count* window
//!   of the last `window_calls` answered calls. The breaker trips (opens) when any of:
//!   1. `calls ≥ minimum_calls` and `failures × 100 ≥ failure_rate_threshold_percent × calls`;
//!   2. `calls ≥ minimum_calls` and `slow × 100 ≥ slow_call_rate_threshold_percent × calls`;
//!   3. `consecutive_failures_to_open` failures in a row;
//!   4. `failures_in_period_to_open` failures within the last `failure_period_ms`.
//!
//!   Rates are integer percent compared by cross-multiplication: no floats decide anything.
//! - **open**: every call is refused at once with [`BreakerOpen`] until the cool-down has
//!   passed; the first [`Breaker::try_acquire`] after it moves to half-open. The cool-down is
//!   `cool_down_initial_ms` when tripping from closed and is multiplied by
//!   `cool_down_multiplier` (capped at `cool_down_max_ms`) each time a half-open trial fails.
//! - **half-open**: at most `half_open_max_in_flight` probes are out at once. Any probe
//!   failure — or a probe that succeeds but slowly, since slowness may be why it opened —
//!   re-opens with the grown cool-down. `half_open_probes` healthy answers close it and reset
//!   the cool-down, the window and the failure counters.
//!
//! ## What counts
//!
//! | outcome | in window | failure | slow | resets consecutive failures |
//! |---|---|---|---|---|
//! | `Success` | yes | no | if `latency ≥ slow_call_duration_ms` | yes |
//! | `BusinessDecline` | yes | no | never | yes |
//! | `Failure(Timeout / Connect / Status5xx)` | yes | yes | no (already a failure) | — |
//!
//! A business decline (insufficient funds at the supplier, a risk refusal, …) is a healthy
//! answer from a working channel: it never trips the breaker, not even when slow, and it
//! counts as a success in [`BreakerSnapshot::success_rate_percent`]. Its latency does count
//! in the mean latency, because it is a real measure of how fast the channel answers.
//!
//! ## Permits and epochs
//!
//! Each state change starts a new *epoch*; a permit carries the epoch it was issued in. A
//! result whose permit is from an older epoch (a slow call that started while closed and
//! ends after the breaker opened, or after it already went half-open) is **ignored for every
//! decision and every window**: it is only counted in [`BreakerSnapshot::stale_results`]
//! and frees its place in [`BreakerSnapshot::in_flight`]. Counting it would let a call that
//! predates the trip decide a probe round it was never part of.
//!
//! A permit must be given back with [`Breaker::record`] (the call was made) or
//! [`Breaker::release`] (it was not). A lost half-open permit would otherwise block the
//! probe slot for ever, so a probe not answered within `half_open_probe_timeout_ms` counts
//! as a timed-out probe and re-opens the breaker (its late result is then stale).
//!
//! Transitions happen when the breaker is used (`try_acquire`, `record`, `release`):
//! [`Breaker::state`] reports `open` after the cool-down until the next call asks, and
//! [`BreakerSnapshot::admits`] tells whether that call would get a permit.
//!
//! Cost: every operation is O(1) amortized except the removal of a probe from the half-open
//! list, O(`half_open_max_in_flight`) ≤ [`MAX_HALF_OPEN_PROBES`]. Memory is bounded by
//! `window_calls` samples plus `failures_in_period_to_open` timestamps.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::telemetry;

/// Upper bound of [`BreakerSettings::window_calls`] (memory: one small sample each).
pub const MAX_WINDOW_CALLS: u32 = 1_000;
/// Upper bound of the consecutive-failure and failures-in-period counts.
pub const MAX_FAILURE_COUNT: u32 = 1_000;
/// Upper bound of [`BreakerSettings::half_open_probes`].
pub const MAX_HALF_OPEN_PROBES: u32 = 100;
/// Upper bound of every duration setting: one hour.
pub const MAX_DURATION_MS: u64 = 3_600_000;
/// Upper bound of [`BreakerSettings::cool_down_multiplier`].
pub const MAX_COOL_DOWN_MULTIPLIER: u32 = 16;

/// Tuning of one channel's breaker. Every bound carries its unit; [`BreakerSettings::validate`]
/// checks them at start so the state machine never sees a nonsensical value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Size of the sliding count window: the last this many answered calls.
    pub window_calls: u32,
    /// Rates are judged only once the window holds this many calls, so two early failures
    /// do not read as "100 % failing".
    pub minimum_calls: u32,
    /// Trip when failures reach this share of the window (integer percent, 1..=100).
    pub failure_rate_threshold_percent: u32,
    /// A successful call at least this slow is a slow call.
    pub slow_call_duration_ms: u64,
    /// Trip when slow calls reach this share of the window (integer percent, 1..=100).
    pub slow_call_rate_threshold_percent: u32,
    /// Trip after this many failures in a row, whatever the window says (catches a channel
    /// that dies outright before `minimum_calls` are seen).
    pub consecutive_failures_to_open: u32,
    /// Trip after this many failures within `failure_period_ms` (catches bursts that the
    /// count window dilutes on a busy channel).
    pub failures_in_period_to_open: u32,
    /// The period of `failures_in_period_to_open`.
    pub failure_period_ms: u64,
    /// Cool-down of the first open period after closed.
    pub cool_down_initial_ms: u64,
    /// Cap of the growing cool-down.
    pub cool_down_max_ms: u64,
    /// Factor applied to the cool-down each time a half-open trial fails (1 = constant).
    pub cool_down_multiplier: u32,
    /// Healthy probe answers needed in half-open to close.
    pub half_open_probes: u32,
    /// Probes allowed out at once in half-open.
    pub half_open_max_in_flight: u32,
    /// A half-open probe neither recorded nor released within this long counts as timed
    /// out (re-opens). Set it above the channel's own call timeout.
    pub half_open_probe_timeout_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window_calls: 50,
            minimum_calls: 20,
            failure_rate_threshold_percent: 50,
            slow_call_duration_ms: 2_000,
            slow_call_rate_threshold_percent: 80,
            consecutive_failures_to_open: 5,
            failures_in_period_to_open: 10,
            failure_period_ms: 10_000,
            cool_down_initial_ms: 5_000,
            cool_down_max_ms: 60_000,
            cool_down_multiplier: 2,
            half_open_probes: 3,
            half_open_max_in_flight: 1,
            half_open_probe_timeout_ms: 30_000,
        }
    }
}

impl BreakerSettings {
    /// Checks every bound; the error names the first bad field and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        fn range<T: PartialOrd + std::fmt::Display>(
            field: &str,
            value: T,
            min: T,
            max: T,
        ) -> Result<(), String> {
            if value < min || value > max {
                Err(format!(
                    "{field} must be between {min} and {max}, got {value}"
                ))
            } else {
                Ok(())
            }
        }
        range("window_calls", self.window_calls, 1, MAX_WINDOW_CALLS)?;
        range("minimum_calls", self.minimum_calls, 1, self.window_calls)?;
        range(
            "failure_rate_threshold_percent",
            self.failure_rate_threshold_percent,
            1,
            100,
        )?;
        range(
            "slow_call_duration_ms",
            self.slow_call_duration_ms,
            1,
            MAX_DURATION_MS,
        )?;
        range(
            "slow_call_rate_threshold_percent",
            self.slow_call_rate_threshold_percent,
            1,
            100,
        )?;
        range(
            "consecutive_failures_to_open",
            self.consecutive_failures_to_open,
            1,
            MAX_FAILURE_COUNT,
        )?;
        range(
            "failures_in_period_to_open",
            self.failures_in_period_to_open,
            1,
            MAX_FAILURE_COUNT,
        )?;
        range(
            "failure_period_ms",
            self.failure_period_ms,
            1,
            MAX_DURATION_MS,
        )?;
        range(
            "cool_down_max_ms",
            self.cool_down_max_ms,
            1,
            MAX_DURATION_MS,
        )?;
        range(
            "cool_down_initial_ms",
            self.cool_down_initial_ms,
            1,
            self.cool_down_max_ms,
        )?;
        range(
            "cool_down_multiplier",
            self.cool_down_multiplier,
            1,
            MAX_COOL_DOWN_MULTIPLIER,
        )?;
        range(
            "half_open_probes",
            self.half_open_probes,
            1,
            MAX_HALF_OPEN_PROBES,
        )?;
        range(
            "half_open_max_in_flight",
            self.half_open_max_in_flight,
            1,
            self.half_open_probes,
        )?;
        range(
            "half_open_probe_timeout_ms",
            self.half_open_probe_timeout_ms,
            1,
            MAX_DURATION_MS,
        )?;
        Ok(())
    }
}

/// The breaker's state, as logged and exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// The label used in logs, metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// The value of the `gateway_breaker_state` gauge: 0 closed, 1 half-open, 2 open, so a
    /// dashboard's max over channels reads "worst state".
    pub fn gauge_value(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// Why a breaker opened (logged, and shown in the snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TripReason {
    FailureRate,
    SlowCallRate,
    ConsecutiveFailures,
    FailuresInPeriod,
    ProbeFailed,
    ProbeSlow,
    ProbeTimedOut,
}

impl TripReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TripReason::FailureRate => "failure_rate",
            TripReason::SlowCallRate => "slow_call_rate",
            TripReason::ConsecutiveFailures => "consecutive_failures",
            TripReason::FailuresInPeriod => "failures_in_period",
            TripReason::ProbeFailed => "probe_failed",
            TripReason::ProbeSlow => "probe_slow",
            TripReason::ProbeTimedOut => "probe_timed_out",
        }
    }
}

/// A failure that says the channel is unhealthy (DESIGN.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// No answer in time. For the payment this is an *unknown* outcome; for the breaker it
    /// is a failure either way.
    Timeout,
    /// Connection refused, reset, TLS or DNS failure.
    Connect,
    /// The channel answered with an HTTP 5xx.
    Status5xx,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::Connect => "connect",
            FailureKind::Status5xx => "status_5xx",
        }
    }
}

/// How a permitted call ended, as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The channel accepted the request.
    Success { latency: Duration },
    /// The channel answered and refused on business grounds: a healthy answer.
    BusinessDecline { latency: Duration },
    /// The channel is unhealthy.
    Failure(FailureKind),
}

/// The right to make one call through the breaker. Give it back with [`Breaker::record`] or
/// [`Breaker::release`]; it is neither `Clone` nor `Copy`, so one call records once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "give the permit back with Breaker::record or Breaker::release"]
pub struct CallPermit {
    epoch: u64,
    acquired_at: Instant,
}

impl CallPermit {
    /// When the permit was issued (the `now` given to `try_acquire`).
    pub fn acquired_at(&self) -> Instant {
        self.acquired_at
    }
}

/// The breaker refused a call; the channel must be skipped for this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker {} (retry after {} ms)", .state.as_str(), .retry_after.as_millis())]
pub struct BreakerOpen {
    /// `Open`, or `HalfOpen` when every probe slot is taken.
    pub state: BreakerState,
    /// When open: the rest of the cool-down. When half-open and full: the time until the
    /// oldest probe times out, a bound on when the breaker decides again.
    pub retry_after: Duration,
}

/// A point-in-time view for the admin API and for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerSnapshot {
    /// The stored state (see the module docs: `open` until a call asks after the cool-down).
    pub state: BreakerState,
    /// Whether a `try_acquire` at the snapshot's `now` would get a permit.
    pub admits: bool,
    /// Share of non-failures in the window, integer percent (floor). 100 when the window is
    /// empty: no evidence of failure (the window is reset when probes have just succeeded).
    pub success_rate_percent: u32,
    /// **Mean** latency of the answered calls (successes and declines) in the window, in
    /// whole milliseconds; `None` when the window holds none. A mean, not a percentile:
    /// it keeps O(1) updates with a running sum, and for ranking channels it is enough.
    pub latency_mean_ms: Option<u32>,
    pub calls_in_window: u32,
    pub failures_in_window: u32,
    pub slow_calls_in_window: u32,
    /// Permits of any epoch issued and not yet recorded or released.
    pub in_flight: u32,
    /// Half-open probes out now (0 unless half-open).
    pub half_open_probes_in_flight: u32,
    /// Healthy probe answers so far in this half-open round.
    pub half_open_successes: u32,
    pub consecutive_failures: u32,
    /// End of the cool-down when open.
    pub open_until: Option<Instant>,
    /// When open, this open period's cool-down; otherwise the last one used (the initial
    /// value once closed). A failed half-open round multiplies it (capped); a trip from
    /// closed starts again at the initial value.
    pub cool_down: Duration,
    pub last_trip: Option<TripReason>,
    /// Results ignored because their permit predates the current state (see module docs).
    pub stale_results: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    failure: bool,
    slow: bool,
    latency_ms: Option<u32>,
}

/// The sliding count window with running totals, so every update is O(1).
#[derive(Debug)]
struct Window {
    samples: VecDeque<Sample>,
    capacity: usize,
    failures: u32,
    slow: u32,
    latency_samples: u32,
    latency_sum_ms: u64,
}

impl Window {
    fn new(capacity: u32) -> Self {
        let capacity = capacity as usize;
        Self {
            samples: VecDeque::with_capacity(capacity),
            capacity,
            failures: 0,
            slow: 0,
            latency_samples: 0,
            latency_sum_ms: 0,
        }
    }

    fn push(&mut self, sample: Sample) {
        if self.samples.len() == self.capacity {
            if let Some(old) = self.samples.pop_front() {
                self.failures -= u32::from(old.failure);
                self.slow -= u32::from(old.slow);
                if let Some(ms) = old.latency_ms {
                    self.latency_samples -= 1;
                    self.latency_sum_ms -= u64::from(ms);
                }
            }
        }
        self.failures += u32::from(sample.failure);
        self.slow += u32::from(sample.slow);
        if let Some(ms) = sample.latency_ms {
            self.latency_samples += 1;
            self.latency_sum_ms += u64::from(ms);
        }
        self.samples.push_back(sample);
        debug_assert!(self.samples.len() <= self.capacity);
        debug_assert!(self.failures as usize <= self.samples.len());
    }

    fn calls(&self) -> u32 {
        // Bounded by MAX_WINDOW_CALLS, so the cast is exact.
        self.samples.len() as u32
    }

    fn clear(&mut self) {
        self.samples.clear();
        self.failures = 0;
        self.slow = 0;
        self.latency_samples = 0;
        self.latency_sum_ms = 0;
    }
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        /// Issue times of the probes out now, oldest first.
        probes: VecDeque<Instant>,
        successes: u32,
    },
}

/// The circuit breaker of one channel. See the module docs for the rules.
#[derive(Debug)]
pub struct Breaker {
    channel_id: String,
    settings: BreakerSettings,
    phase: Phase,
    /// Incremented on every state change; permits carry it.
    epoch: u64,
    window: Window,
    consecutive_failures: u32,
    /// Times of the recent failures, oldest first, at most `failures_in_period_to_open`.
    recent_failures: VecDeque<Instant>,
    cool_down: Duration,
    in_flight: u32,
    stale_results: u64,
    last_trip: Option<TripReason>,
}

impl Breaker {
    /// A closed breaker for `channel_id` (a configured channel id: it labels logs and
    /// metrics).
    ///
    /// # Panics
    /// When `settings` do not pass [`BreakerSettings::validate`]: configuration is validated
    /// at start, so reaching here with bad settings is a bug.
    pub fn new(channel_id: impl Into<String>, settings: BreakerSettings) -> Self {
        let channel_id = channel_id.into();
        if let Err(problem) = settings.validate() {
            panic!("breaker settings for channel {channel_id} were not validated: {problem}");
        }
        telemetry::breaker_created(&channel_id);
        Self {
            window: Window::new(settings.window_calls),
            recent_failures: VecDeque::with_capacity(settings.failures_in_period_to_open as usize),
            cool_down: Duration::from_millis(settings.cool_down_initial_ms),
            channel_id,
            settings,
            phase: Phase::Closed,
            epoch: 0,
            consecutive_failures: 0,
            in_flight: 0,
            stale_results: 0,
            last_trip: None,
        }
    }

    pub fn channel_id(&self) -> &str {
        &self.channel_id
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// The stored state; time-driven changes happen on the next `try_acquire`.
    pub fn state(&self) -> BreakerState {
        match self.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to make one call now. Closed: always a permit. Open: refused until the cool-down
    /// has passed, then half-open. Half-open: a permit while fewer than
    /// `half_open_max_in_flight` probes are out.
    pub fn try_acquire(&mut self, now: Instant) -> Result<CallPermit, BreakerOpen> {
        self.expire_probes(now);
        if let Phase::Open { until } = self.phase {
            if now < until {
                return Err(BreakerOpen {
                    state: BreakerState::Open,
                    retry_after: until - now,
                });
            }
            self.enter_half_open();
        }
        let probe_timeout = Duration::from_millis(self.settings.half_open_probe_timeout_ms);
        let max_in_flight = self.settings.half_open_max_in_flight as usize;
        match &mut self.phase {
            Phase::Closed => {}
            Phase::HalfOpen { probes, .. } => {
                if probes.len() >= max_in_flight {
                    let oldest = probes.front().copied().unwrap_or(now);
                    return Err(BreakerOpen {
                        state: BreakerState::HalfOpen,
                        retry_after: (oldest + probe_timeout).saturating_duration_since(now),
                    });
                }
                probes.push_back(now);
                debug_assert!(probes.len() <= max_in_flight);
            }
            Phase::Open { .. } => unreachable!("left open above"),
        }
        self.in_flight = self.in_flight.saturating_add(1);
        Ok(CallPermit {
            epoch: self.epoch,
            acquired_at: now,
        })
    }

    /// Records how a permitted call ended, and trips or closes the breaker accordingly.
    /// A permit from an older epoch changes nothing but the stale count.
    pub fn record(&mut self, now: Instant, permit: CallPermit, outcome: CallOutcome) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if permit.epoch != self.epoch {
            self.stale_results += 1;
            // A stale answer still tells nothing new; but the clock moved, so a probe that
            // has run out of time is handled now rather than on the next acquire.
            self.expire_probes(now);
            return;
        }
        let slow_after = Duration::from_millis(self.settings.slow_call_duration_ms);
        match &mut self.phase {
            Phase::Closed => {
                self.record_closed(now, outcome, slow_after);
            }
            Phase::HalfOpen { probes, successes } => {
                remove_probe(probes, permit.acquired_at);
                let verdict = match outcome {
                    CallOutcome::Failure(_) => Err(TripReason::ProbeFailed),
                    CallOutcome::Success { latency } if latency >= slow_after => {
                        Err(TripReason::ProbeSlow)
                    }
                    CallOutcome::Success { .. } | CallOutcome::BusinessDecline { .. } => Ok(()),
                };
                match verdict {
                    Err(reason) => self.trip(now, reason),
                    Ok(()) => {
                        *successes += 1;
                        if *successes >= self.settings.half_open_probes {
                            self.close();
                        } else {
                            self.expire_probes(now);
                        }
                    }
                }
            }
            Phase::Open { .. } => {
                // Open issues no permits, so a permit of the current epoch cannot exist.
                debug_assert!(false, "a permit of an open epoch was recorded");
                self.stale_results += 1;
            }
        }
    }

    /// Gives a permit back without a result: the call was not made (the attempt was
    /// abandoned before anything was sent). Frees a half-open probe slot; counts nothing.
    pub fn release(&mut self, now: Instant, permit: CallPermit) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if permit.epoch == self.epoch {
            if let Phase::HalfOpen { probes, .. } = &mut self.phase {
                remove_probe(probes, permit.acquired_at);
            }
        }
        self.expire_probes(now);
    }

    /// Whether `try_acquire(now)` would give a permit, without changing anything (routing
    /// filters candidates with it).
    pub fn admits(&self, now: Instant) -> bool {
        match &self.phase {
            Phase::Closed => true,
            // After the cool-down the call moves to half-open, which has at least one slot.
            Phase::Open { until } => now >= *until,
            Phase::HalfOpen { probes, .. } => {
                !self.probe_timed_out(probes, now)
                    && probes.len() < self.settings.half_open_max_in_flight as usize
            }
        }
    }

    /// A view for the admin API and routing (see [`BreakerSnapshot`]).
    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let calls = self.window.calls();
        // An empty window reads 100 %: no evidence of failure.
        let success_rate_percent = ((calls - self.window.failures) * 100)
            .checked_div(calls)
            .unwrap_or(100);
        let latency_mean_ms = (self.window.latency_samples > 0).then(|| {
            let mean = self.window.latency_sum_ms / u64::from(self.window.latency_samples);
            u32::try_from(mean).unwrap_or(u32::MAX)
        });
        let (open_until, probes_in_flight, half_open_successes) = match &self.phase {
            Phase::Closed => (None, 0, 0),
            Phase::Open { until } => (Some(*until), 0, 0),
            Phase::HalfOpen { probes, successes } => (None, probes.len() as u32, *successes),
        };
        BreakerSnapshot {
            state: self.state(),
            admits: self.admits(now),
            success_rate_percent,
            latency_mean_ms,
            calls_in_window: calls,
            failures_in_window: self.window.failures,
            slow_calls_in_window: self.window.slow,
            in_flight: self.in_flight,
            half_open_probes_in_flight: probes_in_flight,
            half_open_successes,
            consecutive_failures: self.consecutive_failures,
            open_until,
            cool_down: self.cool_down,
            last_trip: self.last_trip,
            stale_results: self.stale_results,
        }
    }

    fn record_closed(&mut self, now: Instant, outcome: CallOutcome, slow_after: Duration) {
        let sample = match outcome {
            CallOutcome::Success { latency } => Sample {
                failure: false,
                slow: latency >= slow_after,
                latency_ms: Some(millis(latency)),
            },
            CallOutcome::BusinessDecline { latency } => Sample {
                failure: false,
                slow: false,
                latency_ms: Some(millis(latency)),
            },
            CallOutcome::Failure(_) => Sample {
                failure: true,
                slow: false,
                latency_ms: None,
            },
        };
        self.window.push(sample);
        let period = Duration::from_millis(self.settings.failure_period_ms);
        while let Some(&oldest) = self.recent_failures.front() {
            if now.saturating_duration_since(oldest) >= period {
                self.recent_failures.pop_front();
            } else {
                break;
            }
        }
        if sample.failure {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            if self.recent_failures.len() >= self.settings.failures_in_period_to_open as usize {
                self.recent_failures.pop_front();
            }
            self.recent_failures.push_back(now);
        } else {
            self.consecutive_failures = 0;
        }
        if let Some(reason) = self.closed_trip_reason() {
            self.trip(now, reason);
        }
    }

    fn closed_trip_reason(&self) -> Option<TripReason> {
        let s = &self.settings;
        if self.consecutive_failures >= s.consecutive_failures_to_open {
            return Some(TripReason::ConsecutiveFailures);
        }
        if self.recent_failures.len() >= s.failures_in_period_to_open as usize {
            return Some(TripReason::FailuresInPeriod);
        }
        // u64: calls ≤ 1 000 and thresholds ≤ 100, so the products cannot overflow anyway.
        let calls = u64::from(self.window.calls());
        if calls >= u64::from(s.minimum_calls) {
            if u64::from(self.window.failures) * 100
                >= u64::from(s.failure_rate_threshold_percent) * calls
            {
                return Some(TripReason::FailureRate);
            }
            if u64::from(self.window.slow) * 100
                >= u64::from(s.slow_call_rate_threshold_percent) * calls
            {
                return Some(TripReason::SlowCallRate);
            }
        }
        None
    }

    fn probe_timed_out(&self, probes: &VecDeque<Instant>, now: Instant) -> bool {
        let timeout = Duration::from_millis(self.settings.half_open_probe_timeout_ms);
        probes
            .front()
            .is_some_and(|&oldest| now.saturating_duration_since(oldest) >= timeout)
    }

    fn expire_probes(&mut self, now: Instant) {
        if let Phase::HalfOpen { probes, .. } = &self.phase {
            if self.probe_timed_out(probes, now) {
                self.trip(now, TripReason::ProbeTimedOut);
            }
        }
    }

    fn trip(&mut self, now: Instant, reason: TripReason) {
        let from = self.state();
        debug_assert_ne!(from, BreakerState::Open);
        let cap = Duration::from_millis(self.settings.cool_down_max_ms);
        self.cool_down = if from == BreakerState::HalfOpen {
            self.cool_down
                .saturating_mul(self.settings.cool_down_multiplier)
                .min(cap)
        } else {
            Duration::from_millis(self.settings.cool_down_initial_ms)
        };
        debug_assert!(self.cool_down <= cap);
        self.last_trip = Some(reason);
        self.phase = Phase::Open {
            until: now + self.cool_down,
        };
        tracing::warn!(
            channel = %self.channel_id,
            from = from.as_str(),
            reason = reason.as_str(),
            cool_down_ms = self.cool_down.as_millis() as u64,
            calls_in_window = self.window.calls(),
            failures_in_window = self.window.failures,
            consecutive_failures = self.consecutive_failures,
            "circuit breaker opened"
        );
        self.changed(BreakerState::Open);
    }

    fn enter_half_open(&mut self) {
        let max = self.settings.half_open_max_in_flight as usize;
        self.phase = Phase::HalfOpen {
            probes: VecDeque::with_capacity(max),
            successes: 0,
        };
        tracing::info!(
            channel = %self.channel_id,
            probes = self.settings.half_open_probes,
            "circuit breaker half-open"
        );
        self.changed(BreakerState::HalfOpen);
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.window.clear();
        self.recent_failures.clear();
        self.consecutive_failures = 0;
        self.cool_down = Duration::from_millis(self.settings.cool_down_initial_ms);
        tracing::info!(channel = %self.channel_id, "circuit breaker closed");
        self.changed(BreakerState::Closed);
    }

    /// Every state change goes through here: a new epoch, and the metrics.
    fn changed(&mut self, to: BreakerState) {
        self.epoch += 1;
        telemetry::breaker_transition(&self.channel_id, to.as_str(), to.gauge_value());
    }
}

fn remove_probe(probes: &mut VecDeque<Instant>, acquired_at: Instant) {
    // Any entry with the same time will do: probes are only told apart by their age.
    if let Some(at) = probes.iter().position(|&t| t == acquired_at) {
        probes.remove(at);
    } else {
        debug_assert!(false, "a current-epoch probe was not in the probe list");
    }
}

fn millis(latency: Duration) -> u32 {
    u32::try_from(latency.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ok(latency_ms: u64) -> CallOutcome {
        CallOutcome::Success {
            latency: ms(latency_ms),
        }
    }

    fn decline(latency_ms: u64) -> CallOutcome {
        CallOutcome::BusinessDecline {
            latency: ms(latency_ms),
        }
    }

    const FAIL: CallOutcome = CallOutcome::Failure(FailureKind::Timeout);

    /// Every trip rule out of reach, so a test can turn on the one it checks.
    fn quiet() -> BreakerSettings {
        BreakerSettings {
            window_calls: 10,
            minimum_calls: 10,
            failure_rate_threshold_percent: 100,
            slow_call_duration_ms: 1_000,
            slow_call_rate_threshold_percent: 100,
            consecutive_failures_to_open: 1_000,
            failures_in_period_to_open: 1_000,
            failure_period_ms: 1_000,
            cool_down_initial_ms: 100,
            cool_down_max_ms: 500,
            cool_down_multiplier: 2,
            half_open_probes: 2,
            half_open_max_in_flight: 1,
            half_open_probe_timeout_ms: 10_000,
        }
    }

    /// Acquires and records at once; panics if refused.
    fn call(b: &mut Breaker, now: Instant, outcome: CallOutcome) {
        let permit = b.try_acquire(now).expect("a permit");
        b.record(now, permit, outcome);
    }

    /// A breaker tripped at `t0` by consecutive failures, cool-down `initial`.
    fn tripped(settings: BreakerSettings, t0: Instant) -> Breaker {
        let settings = BreakerSettings {
            consecutive_failures_to_open: 1,
            ..settings
        };
        let mut b = Breaker::new("test", settings);
        call(&mut b, t0, FAIL);
        assert_eq!(b.state(), BreakerState::Open);
        b
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let s = BreakerSettings::default();
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(
            (
                s.window_calls,
                s.minimum_calls,
                s.failure_rate_threshold_percent
            ),
            (50, 20, 50)
        );
        assert_eq!(
            (s.slow_call_duration_ms, s.slow_call_rate_threshold_percent),
            (2_000, 80)
        );
        assert_eq!(
            (
                s.consecutive_failures_to_open,
                s.failures_in_period_to_open,
                s.failure_period_ms
            ),
            (5, 10, 10_000)
        );
        assert_eq!(
            (
                s.cool_down_initial_ms,
                s.cool_down_max_ms,
                s.cool_down_multiplier
            ),
            (5_000, 60_000, 2)
        );
        assert_eq!((s.half_open_probes, s.half_open_max_in_flight), (3, 1));
    }

    #[test]
    fn validate_names_the_bad_field() {
        let cases: Vec<(BreakerSettings, &str)> = vec![
            (
                BreakerSettings {
                    window_calls: 0,
                    ..Default::default()
                },
                "window_calls",
            ),
            (
                BreakerSettings {
                    window_calls: MAX_WINDOW_CALLS + 1,
                    ..Default::default()
                },
                "window_calls",
            ),
            (
                BreakerSettings {
                    minimum_calls: 51,
                    ..Default::default()
                },
                "minimum_calls",
            ),
            (
                BreakerSettings {
                    failure_rate_threshold_percent: 101,
                    ..Default::default()
                },
                "failure_rate_threshold_percent",
            ),
            (
                BreakerSettings {
                    slow_call_rate_threshold_percent: 0,
                    ..Default::default()
                },
                "slow_call_rate_threshold_percent",
            ),
            (
                BreakerSettings {
                    slow_call_duration_ms: 0,
                    ..Default::default()
                },
                "slow_call_duration_ms",
            ),
            (
                BreakerSettings {
                    consecutive_failures_to_open: 0,
                    ..Default::default()
                },
                "consecutive_failures_to_open",
            ),
            (
                BreakerSettings {
                    failures_in_period_to_open: 0,
                    ..Default::default()
                },
                "failures_in_period_to_open",
            ),
            (
                BreakerSettings {
                    failure_period_ms: 0,
                    ..Default::default()
                },
                "failure_period_ms",
            ),
            (
                BreakerSettings {
                    cool_down_initial_ms: 60_001,
                    ..Default::default()
                },
                "cool_down_initial_ms",
            ),
            (
                BreakerSettings {
                    cool_down_max_ms: MAX_DURATION_MS + 1,
                    ..Default::default()
                },
                "cool_down_max_ms",
            ),
            (
                BreakerSettings {
                    cool_down_multiplier: 0,
                    ..Default::default()
                },
                "cool_down_multiplier",
            ),
            (
                BreakerSettings {
                    half_open_probes: 0,
                    ..Default::default()
                },
                "half_open_probes",
            ),
            (
                BreakerSettings {
                    half_open_max_in_flight: 4,
                    ..Default::default()
                },
                "half_open_max_in_flight",
            ),
            (
                BreakerSettings {
                    half_open_probe_timeout_ms: 0,
                    ..Default::default()
                },
                "half_open_probe_timeout_ms",
            ),
        ];
        for (settings, field) in cases {
            let err = settings.validate().expect_err(field);
            assert!(
                err.starts_with(&format!("{field} ")),
                "{err} should name {field}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "were not validated")]
    fn new_refuses_unvalidated_settings() {
        let _ = Breaker::new(
            "test",
            BreakerSettings {
                window_calls: 0,
                ..Default::default()
            },
        );
    }

    #[test]
    fn settings_deserialize_with_defaults_and_refuse_unknown_fields() {
        let s: BreakerSettings =
            serde_json::from_str(r#"{"window_calls": 100, "minimum_calls": 30}"#).unwrap();
        assert_eq!(s.window_calls, 100);
        assert_eq!(s.cool_down_max_ms, 60_000);
        assert!(serde_json::from_str::<BreakerSettings>(r#"{"window": 1}"#).is_err());
    }

    #[test]
    fn trips_on_failure_rate_only_after_minimum_calls() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            "test",
            BreakerSettings {
                minimum_calls: 4,
                failure_rate_threshold_percent: 50,
                ..quiet()
            },
        );
        // 2 failures of 3 calls is 66 %, but below the minimum of 4 calls.
        call(&mut b, t0, FAIL);
        call(&mut b, t0, ok(10));
        call(&mut b, t0, FAIL);
        assert_eq!(b.state(), BreakerState::Closed);
        // 2 of 4 is exactly 50 %: the threshold is inclusive.
        call(&mut b, t0, ok(10));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot(t0).last_trip, Some(TripReason::FailureRate));
    }

    #[test]
    fn failure_rate_below_threshold_stays_closed_and_old_failures_slide_out() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            "test",
            BreakerSettings {
                window_calls: 4,
                minimum_calls: 4,
                failure_rate_threshold_percent: 50,
                ..quiet()
            },
        );
        call(&mut b, t0, FAIL);
        for _ in 0..3 {
            call(&mut b, t0, ok(10));
        }
        // 1 of 4 = 25 %.
        assert_eq!(b.state(), BreakerState::Closed);
        // The failure slides out; one new failure makes it 1 of 4 again, not 2 of 5.
        call(&mut b, t0, FAIL);
        let snap = b.snapshot(t0);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!((snap.calls_in_window, snap.failures_in_window), (4, 1));
        assert_eq!(snap.success_rate_percent, 75);
    }

    #[test]
    fn trips_on_slow_call_rate() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            "test",
            BreakerSettings {
                minimum_calls: 4,
                slow_call_duration_ms: 1_000,
                slow_call_rate_threshold_percent: 75,
                ..quiet()
            },
        );
        call(&mut b, t0, ok(1_000)); // slow: the bound is inclusive
        call(&mut b, t0, ok(999)); // not slow
        call(&mut b, t0, ok(5_000));
        call(&mut b, t0, ok(1_500)); // 3 of 4 slow = 75 %
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot(t0).last_trip, Some(TripReason::SlowCallRate));
    }

    #[test]
    fn trips_on_consecutive_failures_and_a_success_resets_the_run() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            "test",
            BreakerSettings {
                consecutive_failures_to_open: 3,
                ..quiet()
            },
        );
        call(&mut b, t0, FAIL);
        call(&mut b, t0, CallOutcome::Failure(FailureKind::Connect));
        call(&mut b, t0, ok(10));
        call(&mut b, t0, FAIL);
        call(&mut b, t0, decline(10)); // a decline is an answer: resets the run too
        call(&mut b, t0, FAIL);
        call(&mut b, t0, CallOutcome::Failure(FailureKind::Status5xx));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot(t0).consecutive_failures, 2);
        call(&mut b, t0, FAIL);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.snapshot(t0).last_trip,
            Some(TripReason::ConsecutiveFailures)
        );
    }

    #[test]
    fn trips_on_failures_within_the_period_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            "test",
            BreakerSettings {
                window_calls: 100,
                minimum_calls: 100,
                failures_in_period_to_open: 3,
                failure_period_ms: 1_000,
                ..quiet()
            },
        );
        // Three failures spread over more than the period: never three inside it.
        call(&mut b, t0, FAIL);
        call(&mut b, t0 + ms(600), ok(10));
        call(&mut b, t0 + ms(600), FAIL);
        call(&mut b, t0 + ms(1_000), ok(10));
        call(&mut b, t0 + ms(1_000), FAIL); // t0 is now exactly one period old: out
        assert_eq!(b.state(), BreakerState::Closed);
        call(&mut b, t0 + ms(1_100), ok(10));
        call(&mut b, t0 + ms(1_500), FAIL); // 600, 1000, 1500: three within 1 000 ms
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot(t0).last_trip, Some(TripReason::FailuresInPeriod));
    }

    #[test]
    fn open_refuses_until_the_cool_down_then_lets_a_probe_through() {
        let t0 = Instant::now();
        let mut b = tripped(quiet(), t0);
        let refused = b.try_acquire(t0 + ms(40)).unwrap_err();
        assert_eq!(refused.state, BreakerState::Open);
        assert_eq!(refused.retry_after, ms(60));
        assert!(!b.snapshot(t0 + ms(99)).admits);
        assert!(b.try_acquire(t0 + ms(99)).is_err());
        assert!(b.snapshot(t0 + ms(100)).admits);
        let probe = b.try_acquire(t0 + ms(100)).expect("probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.release(t0 + ms(100), probe);
    }

    #[test]
    fn half_open_limits_the_probes_in_flight() {
        let t0 = Instant::now();
        let mut b = tripped(
            BreakerSettings {
                half_open_probes: 3,
                half_open_max_in_flight: 2,
                ..quiet()
            },
            t0,
        );
        let t = t0 + ms(100);
        let first = b.try_acquire(t).expect("first probe");
        let second = b.try_acquire(t + ms(1)).expect("second probe");
        let refused = b.try_acquire(t + ms(2)).unwrap_err();
        assert_eq!(refused.state, BreakerState::HalfOpen);
        // Bounded by the oldest probe's timeout.
        assert_eq!(refused.retry_after, ms(10_000 - 2));
        assert_eq!(b.snapshot(t + ms(2)).half_open_probes_in_flight, 2);
        assert!(!b.snapshot(t + ms(2)).admits);
        // An answer frees a slot and counts toward closing.
        b.record(t + ms(3), first, ok(10));
        let third = b.try_acquire(t + ms(3)).expect("a freed slot");
        b.record(t + ms(4), second, ok(10));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(t + ms(5), third, decline(10));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn probe_failure_reopens_and_the_cool_down_grows_to_its_cap() {
        let t0 = Instant::now();
        let mut b = tripped(quiet(), t0); // initial 100, ×2, cap 500
        let mut t = t0;
        let mut cool_downs = vec![b.snapshot(t).cool_down];
        for _ in 0..5 {
            t += b.snapshot(t).cool_down;
            let probe = b.try_acquire(t).expect("probe after the cool-down");
            b.record(t, probe, CallOutcome::Failure(FailureKind::Status5xx));
            let snap = b.snapshot(t);
            assert_eq!(snap.state, BreakerState::Open);
            assert_eq!(snap.last_trip, Some(TripReason::ProbeFailed));
            assert_eq!(snap.open_until, Some(t + snap.cool_down));
            cool_downs.push(snap.cool_down);
        }
        assert_eq!(cool_downs, [100, 200, 400, 500, 500, 500].map(ms));
    }

    #[test]
    fn a_slow_probe_reopens() {
        let t0 = Instant::now();
        let mut b = tripped(quiet(), t0);
        let t = t0 + ms(100);
        let probe = b.try_acquire(t).unwrap();
        b.record(t + ms(1_000), probe, ok(1_000));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot(t).last_trip, Some(TripReason::ProbeSlow));
        assert_eq!(b.snapshot(t).cool_down, ms(200));
    }

    #[test]
    fn probes_close_it_and_reset_cool_down_and_window() {
        let t0 = Instant::now();
        let mut b = tripped(quiet(), t0);
        // Grow the cool-down once, so the reset is visible.
        let mut t = t0 + ms(100);
        let probe = b.try_acquire(t).unwrap();
        b.record(t, probe, FAIL);
        t += ms(200);
        for i in 0..2 {
            let probe = b.try_acquire(t).expect("probe");
            assert_eq!(b.snapshot(t).half_open_successes, i);
            b.record(t, probe, ok(10));
        }
        let snap = b.snapshot(t);
        assert_eq!(snap.state, BreakerState::Closed);
        assert_eq!(snap.cool_down, ms(100));
        assert_eq!(
            (
                snap.calls_in_window,
                snap.failures_in_window,
                snap.consecutive_failures
            ),
            (0, 0, 0)
        );
        assert_eq!(snap.success_rate_percent, 100);
        assert_eq!(snap.latency_mean_ms, None);
        // Tripping again from closed starts over at the initial cool-down.
        assert_eq!(b.settings().consecutive_failures_to_open, 1);
        call(&mut b, t, FAIL);
        assert_eq!(b.snapshot(t).open_until, Some(t + ms(100)));
    }

    #[test]
    fn business_declines_never_trip() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            "test",
            BreakerSettings {
                window_calls: 5,
                minimum_calls: 1,
                failure_rate_threshold_percent: 1,
                slow_call_rate_threshold_percent: 1,
                consecutive_failures_to_open: 1,
                failures_in_period_to_open: 1,
                ..quiet()
            },
        );
        for i in 0..100 {
            call(&mut b, t0 + ms(i), decline(60_000));
        }
        let snap = b.snapshot(t0);
        assert_eq!(snap.state, BreakerState::Closed);
        assert_eq!(snap.success_rate_percent, 100);
        assert_eq!(snap.slow_calls_in_window, 0);
        assert_eq!(snap.latency_mean_ms, Some(60_000));
    }

    #[test]
    fn a_stale_permit_does_not_decide_the_probe_round() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            "test",
            BreakerSettings {
                consecutive_failures_to_open: 1,
                ..quiet()
            },
        );
        let slow_call = b.try_acquire(t0).unwrap(); // starts while closed
        call(&mut b, t0, FAIL); // trips
        let t = t0 + ms(100);
        let probe = b.try_acquire(t).unwrap();
        // The old call fails now: it must neither re-open nor free the probe slot.
        b.record(t, slow_call, FAIL);
        let snap = b.snapshot(t);
        assert_eq!(snap.state, BreakerState::HalfOpen);
        assert_eq!(snap.stale_results, 1);
        assert_eq!(snap.half_open_probes_in_flight, 1);
        assert_eq!(snap.in_flight, 1);
        assert!(b.try_acquire(t).is_err());
        b.record(t, probe, ok(10));
        assert_eq!(b.snapshot(t).half_open_successes, 1);
    }

    #[test]
    fn a_lost_probe_times_out_and_reopens() {
        let t0 = Instant::now();
        let mut b = tripped(quiet(), t0);
        let t = t0 + ms(100);
        let lost = b.try_acquire(t).unwrap();
        assert!(!b.snapshot(t + ms(9_999)).admits);
        assert!(b.try_acquire(t + ms(9_999)).is_err());
        let refused = b.try_acquire(t + ms(10_000)).unwrap_err();
        assert_eq!(refused.state, BreakerState::Open);
        assert_eq!(refused.retry_after, ms(200));
        assert_eq!(
            b.snapshot(t + ms(10_000)).last_trip,
            Some(TripReason::ProbeTimedOut)
        );
        // Its late answer is stale.
        b.record(t + ms(10_001), lost, ok(10));
        assert_eq!(b.snapshot(t).stale_results, 1);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_released_probe_frees_its_slot_without_counting() {
        let t0 = Instant::now();
        let mut b = tripped(quiet(), t0);
        let t = t0 + ms(100);
        let probe = b.try_acquire(t).unwrap();
        b.release(t, probe);
        let snap = b.snapshot(t);
        assert_eq!(
            (
                snap.state,
                snap.half_open_probes_in_flight,
                snap.half_open_successes
            ),
            (BreakerState::HalfOpen, 0, 0)
        );
        assert!(b.try_acquire(t).is_ok());
    }

    #[test]
    fn snapshot_reports_mean_latency_and_success_rate() {
        let t0 = Instant::now();
        let mut b = Breaker::new("test", quiet());
        call(&mut b, t0, ok(100));
        call(&mut b, t0, decline(300));
        call(&mut b, t0, FAIL);
        let snap = b.snapshot(t0);
        assert_eq!(snap.latency_mean_ms, Some(200));
        assert_eq!(snap.success_rate_percent, 66);
        assert_eq!(snap.calls_in_window, 3);
        assert_eq!(snap.in_flight, 0);
        assert_eq!(b.channel_id(), "test");
    }

    #[test]
    fn states_have_stable_labels() {
        assert_eq!(BreakerState::Closed.as_str(), "closed");
        assert_eq!(BreakerState::HalfOpen.as_str(), "half_open");
        assert_eq!(BreakerState::Open.as_str(), "open");
        assert_eq!(
            [
                BreakerState::Closed,
                BreakerState::HalfOpen,
                BreakerState::Open
            ]
            .map(BreakerState::gauge_value),
            [0, 1, 2]
        );
        let err = BreakerOpen {
            state: BreakerState::Open,
            retry_after: ms(1_500),
        };
        assert_eq!(
            err.to_string(),
            "circuit breaker open (retry after 1500 ms)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn whole_cycle_on_the_paused_clock() {
        let mut b = Breaker::new("alipay", BreakerSettings::default());
        for _ in 0..5 {
            let permit = b.try_acquire(Instant::now()).unwrap();
            tokio::time::advance(ms(30_000)).await; // a timeout
            b.record(Instant::now(), permit, FAIL);
        }
        assert_eq!(b.state(), BreakerState::Open);
        let opened_at = Instant::now();
        assert_eq!(
            b.snapshot(opened_at).open_until,
            Some(opened_at + ms(5_000))
        );

        tokio::time::advance(ms(4_999)).await;
        assert_eq!(
            b.try_acquire(Instant::now()).unwrap_err().retry_after,
            ms(1)
        );
        tokio::time::advance(ms(1)).await;
        for _ in 0..3 {
            let probe = b.try_acquire(Instant::now()).expect("probe");
            assert!(
                b.try_acquire(Instant::now()).is_err(),
                "one probe at a time"
            );
            tokio::time::advance(ms(80)).await;
            b.record(Instant::now(), probe, ok(80));
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_acquire(Instant::now()).is_ok());
    }

    // ---- properties ----

    #[derive(Debug, Clone)]
    enum Op {
        Advance(u64),
        Acquire,
        Record(usize, CallOutcome),
        Release(usize),
    }

    fn any_outcome() -> impl Strategy<Value = CallOutcome> {
        prop_oneof![
            (0u64..3_000).prop_map(ok),
            (0u64..3_000).prop_map(decline),
            prop::sample::select(vec![
                FailureKind::Timeout,
                FailureKind::Connect,
                FailureKind::Status5xx
            ])
            .prop_map(CallOutcome::Failure),
        ]
    }

    /// Successes faster than `slow_ms`, and declines of any latency.
    fn healthy_outcome(slow_ms: u64) -> impl Strategy<Value = CallOutcome> {
        prop_oneof![(0..slow_ms).prop_map(ok), (0u64..100_000).prop_map(decline),]
    }

    fn ops(outcome: impl Strategy<Value = CallOutcome>) -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            2 => (0u64..400).prop_map(Op::Advance),
            3 => Just(Op::Acquire),
            3 => (any::<usize>(), outcome).prop_map(|(i, o)| Op::Record(i, o)),
            1 => any::<usize>().prop_map(Op::Release),
        ];
        prop::collection::vec(op, 1..300)
    }

    fn settings() -> impl Strategy<Value = BreakerSettings> {
        (
            (1u32..20, 1u32..=100, 1u32..=100, 1u32..8, 1u32..8),
            (1u64..500, 1u64..2_000, 1u32..4, 1u32..5, 1u64..3_000),
        )
            .prop_flat_map(|(counts, times)| {
                let (window, fail_pct, slow_pct, consecutive, in_period) = counts;
                let (initial, max_extra, multiplier, probes, probe_timeout) = times;
                (1..=window, 1..=probes).prop_map(move |(minimum, in_flight)| BreakerSettings {
                    window_calls: window,
                    minimum_calls: minimum,
                    failure_rate_threshold_percent: fail_pct,
                    slow_call_duration_ms: 1_000,
                    slow_call_rate_threshold_percent: slow_pct,
                    consecutive_failures_to_open: consecutive,
                    failures_in_period_to_open: in_period,
                    failure_period_ms: 1_000,
                    cool_down_initial_ms: initial,
                    cool_down_max_ms: initial + max_extra,
                    cool_down_multiplier: multiplier,
                    half_open_probes: probes,
                    half_open_max_in_flight: in_flight,
                    half_open_probe_timeout_ms: probe_timeout,
                })
            })
    }

    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime")
    }

    /// Runs `ops` on tokio's paused clock, checking the invariants after every step.
    /// Returns whether the breaker ever left closed.
    async fn run(settings: BreakerSettings, ops: Vec<Op>) -> Result<bool, TestCaseError> {
        let cap = ms(settings.cool_down_max_ms);
        let initial = ms(settings.cool_down_initial_ms);
        let max_in_flight = settings.half_open_max_in_flight;
        let mut b = Breaker::new("prop", settings);
        let mut held: Vec<CallPermit> = Vec::new();
        let mut ever_left_closed = false;
        for op in ops {
            let now = Instant::now();
            match op {
                Op::Advance(d) => tokio::time::advance(ms(d)).await,
                Op::Acquire => {
                    let before = b.snapshot(now);
                    let result = b.try_acquire(now);
                    prop_assert_eq!(result.is_ok(), before.admits, "admits() predicts acquire");
                    if let Some(until) = before.open_until {
                        if now < until {
                            prop_assert!(result.is_err(), "a permit while open");
                        }
                    }
                    match result {
                        Ok(permit) => held.push(permit),
                        Err(refused) => {
                            prop_assert!(refused.state != BreakerState::Closed);
                            if refused.state == BreakerState::Open {
                                prop_assert!(refused.retry_after > Duration::ZERO);
                                prop_assert!(refused.retry_after <= cap);
                            }
                        }
                    }
                }
                Op::Record(i, outcome) if !held.is_empty() => {
                    let permit = held.swap_remove(i % held.len());
                    b.record(now, permit, outcome);
                }
                Op::Release(i) if !held.is_empty() => {
                    let permit = held.swap_remove(i % held.len());
                    b.release(now, permit);
                }
                Op::Record(..) | Op::Release(_) => {}
            }
            let snap = b.snapshot(Instant::now());
            ever_left_closed |= snap.state != BreakerState::Closed;
            prop_assert!(snap.half_open_probes_in_flight <= max_in_flight);
            prop_assert!(snap.cool_down >= initial && snap.cool_down <= cap);
            prop_assert_eq!(snap.in_flight as usize, held.len());
            prop_assert!(snap.success_rate_percent <= 100);
            match snap.state {
                BreakerState::Open => {
                    let until = snap.open_until.expect("open has an end");
                    prop_assert!(until.saturating_duration_since(Instant::now()) <= cap);
                }
                BreakerState::HalfOpen => prop_assert!(snap.open_until.is_none()),
                BreakerState::Closed => {
                    prop_assert_eq!(snap.half_open_probes_in_flight, 0);
                    prop_assert!(snap.admits);
                }
            }
        }
        for permit in held {
            b.release(Instant::now(), permit);
        }
        prop_assert_eq!(b.snapshot(Instant::now()).in_flight, 0);
        Ok(ever_left_closed)
    }

    proptest! {
        #[test]
        fn prop_state_machine_keeps_its_invariants(settings in settings(), ops in ops(any_outcome())) {
            paused_runtime().block_on(run(settings, ops))?;
        }

        #[test]
        fn prop_only_successes_and_declines_never_open(settings in settings(), ops in ops(healthy_outcome(1_000))) {
            let left_closed = paused_runtime().block_on(run(settings, ops))?;
            prop_assert!(!left_closed);
        }
    }
}
