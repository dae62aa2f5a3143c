//! The open-loop schedule and its dispatcher.
//!
//! Request `seq` is *intended* to leave at `start + seq / rate`, whatever happened to the
//! requests before it: a slow answer never delays the next send (that would be a closed loop,
//! and a slow target would then be asked less while it is slow — coordinated omission). The
//! dispatcher sleeps until each intended time and hands the request to a task of its own. Two
//! things can stop a request from leaving on time, and both are counted, never hidden:
//! - **in flight full**: every permit of the in-flight bound is held (the target is slower
//!   than the arrival rate). The dispatcher waits for a permit at most `max_send_lag` past
//!   the intended time, then gives the request up: a *missed send*. Memory stays bounded by
//!   the permits; the queue of late requests never grows.
//! - **generator late**: the dispatcher itself reached the request more than `max_send_lag`
//!   after its intended time (this process starved of CPU): also a missed send, and the sign
//!   that the generator, not the target, is the bottleneck.
//!
//! Rates are held in milli-requests per second so that intended times are exact integer
//! arithmetic: no drift over a long run.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

const NANOS_PER_SECOND: u128 = 1_000_000_000;
/// Rates are stored in thousandths of a request per second.
const MILLI: u128 = 1_000;

/// Whether a request's intended time falls in the warm-up or in the measured window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Warmup,
    Measured,
}

/// Intended send times: `rate` requests per second from `start`, over a warm-up and then a
/// measured window.
#[derive(Debug, Clone)]
pub struct Schedule {
    start: Instant,
    rate_milli: u128,
    warmup: Duration,
    measured: Duration,
}

impl Schedule {
    /// `rate_per_second` must be at least 0.001 (checked by [`crate::RunSettings::validate`]).
    pub fn new(start: Instant, rate_per_second: f64, warmup: Duration, measured: Duration) -> Self {
        let rate_milli = (rate_per_second * MILLI as f64).round() as u128;
        assert!(rate_milli > 0, "a schedule needs a positive rate");
        Self {
            start,
            rate_milli,
            warmup,
            measured,
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn rate_per_second(&self) -> f64 {
        self.rate_milli as f64 / MILLI as f64
    }

    /// Offset of request `seq` from the start: `seq / rate`, rounded down to the nanosecond.
    pub fn offset(&self, seq: u64) -> Duration {
        let nanos = seq as u128 * NANOS_PER_SECOND * MILLI / self.rate_milli;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    pub fn intended(&self, seq: u64) -> Instant {
        self.start + self.offset(seq)
    }

    /// How many requests have an intended time before `offset`: the smallest `n` with
    /// `n / rate >= offset`.
    fn count_before(&self, offset: Duration) -> u64 {
        let numerator = offset.as_nanos() * self.rate_milli;
        let denominator = NANOS_PER_SECOND * MILLI;
        u64::try_from(numerator.div_ceil(denominator)).unwrap_or(u64::MAX)
    }

    /// Requests in the warm-up (intended before `start + warmup`).
    pub fn warmup_slots(&self) -> u64 {
        self.count_before(self.warmup)
    }

    /// Every request of the run, warm-up and measured window.
    pub fn slots(&self) -> u64 {
        self.count_before(self.warmup + self.measured)
    }

    /// Requests whose intended time is in the measured window.
    pub fn measured_slots(&self) -> u64 {
        self.slots() - self.warmup_slots()
    }

    pub fn phase(&self, seq: u64) -> Phase {
        if seq < self.warmup_slots() {
            Phase::Warmup
        } else {
            Phase::Measured
        }
    }

    /// The measured window: `[start + warmup, start + warmup + measured)`.
    pub fn window(&self) -> (Instant, Instant) {
        let from = self.start + self.warmup;
        (from, from + self.measured)
    }

    pub fn measured(&self) -> Duration {
        self.measured
    }

    pub fn warmup(&self) -> Duration {
        self.warmup
    }
}

/// How the dispatcher waits for an intended time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacer {
    /// Tokio's timer: 1 ms granularity, so sends leave up to about a millisecond late. Obeys
    /// a paused clock (tests).
    Tokio,
    /// The calling OS thread sleeps (`nanosleep`: tens of µs late). Only for a dispatcher on a
    /// thread of its own (a blocking-pool thread), never on a runtime worker.
    Thread,
}

impl Pacer {
    async fn sleep_until(self, at: Instant) {
        match self {
            Pacer::Tokio => tokio::time::sleep_until(at).await,
            Pacer::Thread => {
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
            }
        }
    }
}

/// Bounds of the dispatcher.
#[derive(Debug, Clone, Copy)]
pub struct DispatchLimits {
    /// How late past its intended time a request may still be sent.
    pub max_send_lag: Duration,
}

/// Requests that never left, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Missed {
    /// No in-flight permit came free within `max_send_lag`: the target is behind.
    pub in_flight_full: u64,
    /// The dispatcher reached the request after `max_send_lag`: the generator is behind.
    pub generator_late: u64,
}

impl Missed {
    pub fn total(&self) -> u64 {
        self.in_flight_full + self.generator_late
    }
}

/// What the dispatcher did, per phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dispatched {
    pub warmup_sent: u64,
    pub warmup_missed: Missed,
    pub measured_sent: u64,
    pub measured_missed: Missed,
}

/// One request handed to its task.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub seq: u64,
    pub intended: Instant,
    pub phase: Phase,
}

/// Runs the schedule to its end: for each slot, waits for its intended time (as `pacer`
/// waits), takes an
/// in-flight permit (waiting at most `max_send_lag` past the intended time) and calls
/// `launch` with the slot and the permit, which `launch` must hold until the request is
/// finished (it normally moves both into a spawned task). Returns once every slot was either
/// launched or missed; requests launched may still be in flight.
pub async fn drive<F>(
    schedule: &Schedule,
    limits: DispatchLimits,
    in_flight: &Arc<Semaphore>,
    pacer: Pacer,
    mut launch: F,
) -> Dispatched
where
    F: FnMut(Slot, OwnedSemaphorePermit),
{
    let mut dispatched = Dispatched::default();
    // When the last wait for an in-flight permit ended.
    let mut permit_wait_end: Option<Instant> = None;
    for seq in 0..schedule.slots() {
        let intended = schedule.intended(seq);
        let deadline = intended + limits.max_send_lag;
        if Instant::now() < intended {
            pacer.sleep_until(intended).await;
        }
        let phase = schedule.phase(seq);
        let (sent, missed) = match phase {
            Phase::Warmup => (&mut dispatched.warmup_sent, &mut dispatched.warmup_missed),
            Phase::Measured => (
                &mut dispatched.measured_sent,
                &mut dispatched.measured_missed,
            ),
        };
        if Instant::now() > deadline {
            // Reached too late. The full bound is the cause if the request fell due while
            // the dispatcher was held up waiting for permits (each wait ends at its own
            // slot's deadline, give or take the timer's millisecond, so under saturation the
            // dispatcher runs right at the deadlines and the slightest delay makes the next
            // slot late), or if the bound is still full (it could not leave anyway);
            // otherwise the dispatcher itself was behind.
            let bound_full = permit_wait_end.is_some_and(|end| intended <= end)
                || in_flight.available_permits() == 0;
            if bound_full {
                missed.in_flight_full += 1;
            } else {
                missed.generator_late += 1;
            }
            continue;
        }
        let permit = match Arc::clone(in_flight).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let waited =
                    tokio::time::timeout_at(deadline, Arc::clone(in_flight).acquire_owned()).await;
                permit_wait_end = Some(Instant::now());
                match waited {
                    Ok(Ok(permit)) => permit,
                    // Timed out, or the semaphore was closed (never done): the request is lost.
                    Ok(Err(_)) | Err(_) => {
                        missed.in_flight_full += 1;
                        continue;
                    }
                }
            }
        };
        *sent += 1;
        launch(
            Slot {
                seq,
                intended,
                phase,
            },
            permit,
        );
    }
    dispatched
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(rate: f64, warmup_ms: u64, measured_ms: u64) -> Schedule {
        Schedule::new(
            Instant::now(),
            rate,
            Duration::from_millis(warmup_ms),
            Duration::from_millis(measured_ms),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn intended_times_are_start_plus_seq_over_rate() {
        let s = schedule(200.0, 1_000, 2_000);
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_millis(5));
        assert_eq!(s.offset(200), Duration::from_secs(1));
        assert_eq!(s.intended(7) - s.start(), Duration::from_millis(35));
        assert_eq!(s.warmup_slots(), 200);
        assert_eq!(s.slots(), 600);
        assert_eq!(s.measured_slots(), 400);
        assert_eq!(s.phase(199), Phase::Warmup);
        assert_eq!(s.phase(200), Phase::Measured);
        let (from, to) = s.window();
        assert_eq!(from - s.start(), Duration::from_secs(1));
        assert_eq!(to - from, Duration::from_secs(2));

        // A fractional rate: 3 per second for 1 s is 3 requests (0, 333.3 ms, 666.6 ms).
        let s = schedule(3.0, 0, 1_000);
        assert_eq!(s.slots(), 3);
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.offset(3), Duration::from_secs(1));
        // 2.5 per second over 3 s: 0, 0.4, …, 2.8 s.
        let s = schedule(2.5, 1_000, 2_000);
        assert_eq!(s.warmup_slots(), 3);
        assert_eq!(s.slots(), 8);
        // No drift: the millionth request is exactly where it should be.
        let s = schedule(1_250.0, 0, 1_000_000);
        assert_eq!(s.offset(1_000_000), Duration::from_secs(800));
    }

    /// Launches each slot as a task that holds its permit for `service`, and records when
    /// each request really left.
    async fn run_with_service(
        s: &Schedule,
        permits: usize,
        max_send_lag_ms: u64,
        service: Duration,
    ) -> (Dispatched, Vec<(u64, Duration)>) {
        let in_flight = Arc::new(Semaphore::new(permits));
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let limits = DispatchLimits {
            max_send_lag: Duration::from_millis(max_send_lag_ms),
        };
        let recorded = Arc::clone(&sent);
        let dispatched = drive(s, limits, &in_flight, Pacer::Tokio, move |slot, permit| {
            let lag = Instant::now() - slot.intended;
            recorded.lock().unwrap().push((slot.seq, lag));
            tokio::spawn(async move {
                tokio::time::sleep(service).await;
                drop(permit);
            });
        })
        .await;
        // Every launched task finishes: all permits come back.
        let _all = in_flight.acquire_many(permits as u32).await.unwrap();
        let sent = std::mem::take(&mut *sent.lock().unwrap());
        (dispatched, sent)
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_target_gets_every_request_on_time() {
        let s = schedule(100.0, 500, 1_000);
        let (dispatched, sent) = run_with_service(&s, 4, 10, Duration::from_millis(15)).await;
        assert_eq!(dispatched.warmup_sent, 50);
        assert_eq!(dispatched.measured_sent, 100);
        assert_eq!(dispatched.warmup_missed.total(), 0);
        assert_eq!(dispatched.measured_missed.total(), 0);
        assert!(sent.iter().all(|(_, lag)| lag.is_zero()), "{sent:?}");
        let seqs: Vec<u64> = sent.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (0..150).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_target_makes_missed_sends_never_a_queue() {
        // 100/s offered; 2 permits of 50 ms each serve at most 40/s. Each request waits at
        // most 10 ms for a permit; the others are missed, and counted as the target's fault.
        let s = schedule(100.0, 0, 1_000);
        let (dispatched, sent) = run_with_service(&s, 2, 10, Duration::from_millis(50)).await;
        let missed = dispatched.measured_missed;
        assert_eq!(missed.generator_late, 0);
        assert!(missed.in_flight_full > 0);
        assert_eq!(dispatched.measured_sent + missed.total(), 100);
        assert_eq!(dispatched.measured_sent, sent.len() as u64);
        // Deterministic on the paused clock: requests 0 and 1 at once, then a permit frees
        // every 25 ms on average, and only slots within 10 ms of a freed permit get it.
        assert_eq!(dispatched.measured_sent, 40);
        assert_eq!(missed.in_flight_full, 60);
        // Nobody left later than the bound.
        assert!(
            sent.iter()
                .all(|(_, lag)| *lag <= Duration::from_millis(10)),
            "{sent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_on_a_full_bound_is_the_targets_fault_even_at_high_rates() {
        // 10 000/s: slots 0.1 ms apart, finer than the timer's 1 ms, so a permit wait ends
        // up to a millisecond after its deadline and the next slots are reached late. That
        // lateness comes from the full bound, not from a starved generator.
        let s = schedule(10_000.0, 0, 100);
        let (dispatched, _) = run_with_service(&s, 2, 5, Duration::from_millis(50)).await;
        let missed = dispatched.measured_missed;
        assert_eq!(missed.generator_late, 0, "{dispatched:?}");
        assert!(missed.in_flight_full > 900, "{dispatched:?}");
        assert_eq!(dispatched.measured_sent + missed.total(), 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_starved_dispatcher_counts_its_own_lateness() {
        // The dispatcher gets to the schedule 20 ms after its start, as a generator starved
        // of CPU would: the requests due more than 5 ms before that are its own misses.
        let start = Instant::now();
        tokio::time::advance(Duration::from_millis(20)).await;
        let s = Schedule::new(start, 1_000.0, Duration::ZERO, Duration::from_millis(100));
        let in_flight = Arc::new(Semaphore::new(1_000));
        let limits = DispatchLimits {
            max_send_lag: Duration::from_millis(5),
        };
        let mut lags = Vec::new();
        let dispatched = drive(&s, limits, &in_flight, Pacer::Tokio, |slot, _permit| {
            lags.push(Instant::now() - slot.intended);
        })
        .await;
        let missed = dispatched.measured_missed;
        assert_eq!(missed.in_flight_full, 0);
        // Slots 0..=14 were due at 0..=14 ms, more than 5 ms before 20 ms; 15 is just in time.
        assert_eq!(missed.generator_late, 15, "{dispatched:?}");
        assert_eq!(dispatched.measured_sent, 85);
        assert_eq!(lags[0], Duration::from_millis(5));
        // It catches up at once: from slot 20 on, every request leaves on time.
        assert!(lags[5..].iter().all(|lag| lag.is_zero()), "{lags:?}");
    }
}
