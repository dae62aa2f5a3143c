//! Recording: each finished request's outcome into counts, latency histograms and
//! per-second series, for the warm-up and the measured window apart; and the channel payments
//! to follow until they settle. In a failover run, the measured window is also split in the
//! phases before, during and after the outage ([`crate::failover`]).
//!
//! Latencies are recorded only for requests answered as expected: an error answer is often
//! fast (a refusal) and would flatter the distribution; errors are counted by their key.
//! Timeouts have no latency to record (it is at least the timeout) and are counted apart.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::failover::PhaseBounds;
use crate::histogram::LatencyHistogram;
use crate::scenario::Operation;
use crate::schedule::{Phase, Slot};
use crate::settle::Tracked;
use crate::target::Outcome;

/// The most channel payments followed in one run (about 200 bytes each): past it, payments
/// are counted as `untracked` and the settlement figures cover the first ones only.
pub const MAX_TRACKED: usize = 2_000_000;

/// Counts of one phase, or of one operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub answered: u64,
    /// Answered otherwise than expected, or no HTTP answer at all (timeouts apart).
    pub errors: u64,
    pub timeouts: u64,
    /// `"<status> <code>"` or `"transport <kind>"` → how many.
    pub errors_by_key: BTreeMap<String, u64>,
}

impl Counts {
    fn add(&mut self, outcome: &Outcome) {
        self.sent += 1;
        match outcome {
            Outcome::Answered { .. } => self.answered += 1,
            Outcome::Refused { key } | Outcome::Transport { key } => {
                self.errors += 1;
                *self.errors_by_key.entry(key.clone()).or_default() += 1;
            }
            Outcome::Timeout => self.timeouts += 1,
        }
    }

    /// Every request sent ended one way: answered, an error, or a timeout.
    pub fn adds_up(&self) -> bool {
        self.sent == self.answered + self.errors + self.timeouts
            && self.errors == self.errors_by_key.values().sum::<u64>()
    }
}

/// One operation's share of the measured window.
#[derive(Debug, Clone, Default)]
pub struct OperationRecord {
    pub counts: Counts,
    pub corrected: LatencyHistogram,
}

/// One phase of a failover run's measured window.
#[derive(Debug, Clone, Default)]
pub struct PhaseRecord {
    pub counts: Counts,
    pub corrected: LatencyHistogram,
    /// Expected answers by the channel of the created payment's last attempt.
    pub accepted_by_channel: BTreeMap<String, u64>,
}

/// One second of the measured window.
#[derive(Debug, Clone)]
pub struct SecondRecord {
    /// Corrected latency of the requests *intended* in this second.
    pub corrected: LatencyHistogram,
    /// Expected answers that *arrived* in this second.
    pub answered: u64,
    /// Errors and timeouts that arrived in this second.
    pub errors: u64,
}

/// Everything recorded in a run.
#[derive(Debug)]
pub struct Recorder {
    window_start: Instant,
    pub warmup: Counts,
    pub measured: Counts,
    /// From the intended send time to the whole answer.
    pub corrected: LatencyHistogram,
    /// From the actual send to the whole answer.
    pub uncorrected: LatencyHistogram,
    /// From the intended to the actual send: the generator's own lateness (timer
    /// granularity, scheduling, waiting for an in-flight permit).
    pub send_lag: LatencyHistogram,
    pub operations: BTreeMap<Operation, OperationRecord>,
    pub seconds: Vec<SecondRecord>,
    /// Channel payments created (warm-up included: they settle in the window).
    pub tracked: Vec<Tracked>,
    pub untracked: u64,
    /// The planned outage of a failover run; `None` otherwise.
    pub outage: Option<PhaseBounds>,
    /// Before, during and after the outage (empty without one).
    pub phases: [PhaseRecord; 3],
}

/// When a request left and when its answer was complete.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub sent_at: Instant,
    pub done_at: Instant,
    /// Wall clock at `done_at`, to compare with channel-sim's timestamps.
    pub done_unix_ms: u64,
}

impl Recorder {
    /// `window_start`: the start of the measured window; `seconds`: its length, rounded up.
    pub fn new(window_start: Instant, measured: Duration) -> Self {
        let seconds = measured.as_secs() + u64::from(measured.subsec_nanos() > 0);
        Self {
            window_start,
            warmup: Counts::default(),
            measured: Counts::default(),
            corrected: LatencyHistogram::new(),
            uncorrected: LatencyHistogram::new(),
            send_lag: LatencyHistogram::new(),
            operations: BTreeMap::new(),
            seconds: (0..seconds)
                .map(|_| SecondRecord {
                    corrected: LatencyHistogram::for_series(),
                    answered: 0,
                    errors: 0,
                })
                .collect(),
            tracked: Vec::new(),
            untracked: 0,
            outage: None,
            phases: Default::default(),
        }
    }

    /// Also splits the measured window at the planned outage.
    pub fn with_outage(mut self, outage: PhaseBounds) -> Self {
        self.outage = Some(outage);
        self
    }

    fn second_of(&self, at: Instant) -> Option<usize> {
        let index = at.checked_duration_since(self.window_start)?.as_secs();
        usize::try_from(index)
            .ok()
            .filter(|&i| i < self.seconds.len())
    }

    pub fn record(&mut self, slot: Slot, operation: Operation, timing: Timing, outcome: Outcome) {
        if let Outcome::Answered {
            created: Some(created),
        } = &outcome
        {
            if self.tracked.len() < MAX_TRACKED {
                self.tracked.push(Tracked {
                    payment_id: created.payment_id.clone(),
                    channel_order_id: created.channel_order_id.clone(),
                    operation,
                    created_unix_ms: timing.done_unix_ms,
                    phase: slot.phase,
                });
            } else {
                self.untracked += 1;
            }
        }
        match slot.phase {
            Phase::Warmup => self.warmup.add(&outcome),
            Phase::Measured => self.record_measured(slot, operation, timing, &outcome),
        }
    }

    fn record_measured(
        &mut self,
        slot: Slot,
        operation: Operation,
        timing: Timing,
        outcome: &Outcome,
    ) {
        self.measured.add(outcome);
        let record = self.operations.entry(operation).or_default();
        record.counts.add(outcome);
        let answered = matches!(outcome, Outcome::Answered { .. });
        if let Some(outage) = &self.outage {
            let phase = &mut self.phases[outage.phase_of(slot.intended).index()];
            phase.counts.add(outcome);
            if let Outcome::Answered { created } = outcome {
                phase
                    .corrected
                    .record(timing.done_at.saturating_duration_since(slot.intended));
                if let Some(created) = created {
                    *phase
                        .accepted_by_channel
                        .entry(created.channel_id.clone())
                        .or_default() += 1;
                }
            }
        }
        if answered {
            let corrected = timing.done_at.saturating_duration_since(slot.intended);
            record.corrected.record(corrected);
            self.corrected.record(corrected);
            self.uncorrected
                .record(timing.done_at.saturating_duration_since(timing.sent_at));
            self.send_lag
                .record(timing.sent_at.saturating_duration_since(slot.intended));
            if let Some(second) = self.second_of(slot.intended) {
                self.seconds[second].corrected.record(corrected);
            }
        }
        if let Some(second) = self.second_of(timing.done_at) {
            let bucket = &mut self.seconds[second];
            if answered {
                bucket.answered += 1;
            } else {
                bucket.errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::CreatedPayment;

    fn slot(seq: u64, intended: Instant, phase: Phase) -> Slot {
        Slot {
            seq,
            intended,
            phase,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_are_counted_by_phase_and_add_up() {
        let start = Instant::now();
        let window = start + Duration::from_secs(1);
        let mut recorder = Recorder::new(window, Duration::from_millis(2_500));
        assert_eq!(recorder.seconds.len(), 3);
        let timing = |intended: Instant, sent_ms: u64, done_ms: u64| Timing {
            sent_at: intended + Duration::from_millis(sent_ms),
            done_at: intended + Duration::from_millis(done_ms),
            done_unix_ms: 1_000,
        };
        let created = Outcome::Answered {
            created: Some(CreatedPayment {
                payment_id: "pay_1".into(),
                channel_order_id: "pay_1_1".into(),
                channel_id: "supplier-main".into(),
            }),
        };
        // Warm-up: counted apart, but its channel payment is followed.
        recorder.record(
            slot(0, start, Phase::Warmup),
            Operation::Checkout,
            timing(start, 0, 5),
            created.clone(),
        );
        let at = window + Duration::from_millis(100);
        recorder.record(
            slot(1, at, Phase::Measured),
            Operation::Checkout,
            timing(at, 2, 12),
            created,
        );
        recorder.record(
            slot(2, at, Phase::Measured),
            Operation::Authorize,
            timing(at, 0, 3),
            Outcome::Answered { created: None },
        );
        recorder.record(
            slot(3, at, Phase::Measured),
            Operation::Authorize,
            timing(at, 0, 1),
            Outcome::Refused {
                key: "402 insufficient_funds".into(),
            },
        );
        recorder.record(
            slot(4, at, Phase::Measured),
            Operation::Authorize,
            timing(at, 0, 1_000),
            Outcome::Timeout,
        );
        recorder.record(
            slot(5, at, Phase::Measured),
            Operation::Authorize,
            timing(at, 0, 1),
            Outcome::Transport {
                key: "transport connect".into(),
            },
        );

        assert_eq!(recorder.warmup.sent, 1);
        assert_eq!(recorder.warmup.answered, 1);
        let m = &recorder.measured;
        assert_eq!((m.sent, m.answered, m.errors, m.timeouts), (5, 2, 2, 1));
        assert!(m.adds_up());
        assert!(recorder.warmup.adds_up());
        assert_eq!(m.errors_by_key["402 insufficient_funds"], 1);
        assert_eq!(m.errors_by_key["transport connect"], 1);
        let per_op = &recorder.operations;
        assert_eq!(per_op[&Operation::Authorize].counts.sent, 4);
        assert_eq!(per_op[&Operation::Checkout].counts.answered, 1);
        // Latency only of the expected answers: 12 ms and 3 ms corrected, 10 ms and 3 ms
        // uncorrected, 2 ms and 0 send lag.
        // (Within HdrHistogram's three significant figures.)
        let close = |us: u64, expected: u64| us.abs_diff(expected) <= expected / 1_000 + 1;
        assert_eq!(recorder.corrected.count(), 2);
        assert!(close(recorder.corrected.percentiles().max_us, 12_000));
        assert!(close(recorder.corrected.percentiles().p50_us, 3_000));
        assert!(close(recorder.uncorrected.percentiles().max_us, 10_000));
        assert!(close(recorder.send_lag.percentiles().max_us, 2_000));
        // Series: second 0 of the window had 2 answers, 3 errors (the timeout landed in
        // second 1).
        assert_eq!(recorder.seconds[0].answered, 2);
        assert_eq!(recorder.seconds[0].errors, 2);
        assert_eq!(recorder.seconds[1].errors, 1);
        assert_eq!(recorder.tracked.len(), 2);
        assert_eq!(recorder.tracked[0].phase, Phase::Warmup);
        // No outage planned: no phases.
        assert!(recorder.phases.iter().all(|p| p.counts.sent == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failover_run_is_split_at_the_outage() {
        let window = Instant::now();
        let outage = PhaseBounds {
            outage_from: window + Duration::from_secs(1),
            outage_to: window + Duration::from_secs(2),
        };
        let mut recorder = Recorder::new(window, Duration::from_secs(3)).with_outage(outage);
        let created = |channel: &str| Outcome::Answered {
            created: Some(CreatedPayment {
                payment_id: "pay".into(),
                channel_order_id: "pay-1".into(),
                channel_id: channel.into(),
            }),
        };
        let at = |ms: u64| window + Duration::from_millis(ms);
        let timing = |intended: Instant| Timing {
            sent_at: intended,
            done_at: intended + Duration::from_millis(4),
            done_unix_ms: 0,
        };
        for (seq, (ms, outcome)) in [
            (100, created("supplier-main")),
            (1_000, created("supplier-backup")),
            (
                1_500,
                Outcome::Refused {
                    key: "503 no_channel_available".into(),
                },
            ),
            (2_500, created("supplier-main")),
        ]
        .into_iter()
        .enumerate()
        {
            recorder.record(
                slot(seq as u64, at(ms), Phase::Measured),
                Operation::Checkout,
                timing(at(ms)),
                outcome,
            );
        }
        let [before, during, after] = &recorder.phases;
        assert_eq!(before.accepted_by_channel["supplier-main"], 1);
        assert_eq!(during.counts.sent, 2);
        assert_eq!(during.counts.errors_by_key["503 no_channel_available"], 1);
        assert_eq!(during.accepted_by_channel["supplier-backup"], 1);
        assert_eq!(during.corrected.count(), 1);
        assert_eq!(after.counts.answered, 1);
        assert_eq!(recorder.measured.sent, 4);
    }
}
