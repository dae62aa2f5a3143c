//! `find-max`: the highest arrival rate that meets a service-level objective.
//!
//! Runs short runs at a rising rate (`start`, then × `step_factor`) and stops at the first
//! that misses the objective, or at `max_rate`. A run meets it when, in its measured window:
//! corrected p99 ≤ the bound, no error, no timeout, no missed send, and — for settling
//! scenarios — every payment settled, none closed, missing or paid twice, and the gateway
//! agreeing with channel-sim on every one verified. The answer is the last rate that met it.
//! A short step is noisy: repeat the search (or confirm the rate with a longer `run`) before
//! quoting it.

use std::time::Duration;

use serde::Serialize;

use crate::report::Report;
use crate::runner::{run, RunSettings};
use crate::target::Target;
use crate::Error;

/// The search.
#[derive(Debug, Clone)]
pub struct FindMaxSettings {
    /// Every step's settings; the rate is the step's.
    pub run: RunSettings,
    /// The objective's corrected p99 bound.
    pub slo_p99: Duration,
    pub start_rate: f64,
    /// Each step's rate over the previous one (> 1).
    pub step_factor: f64,
    pub max_rate: f64,
    /// The most steps (a bound on the search's length whatever the other settings).
    pub max_steps: u32,
    /// Quiet time between steps, for the target to finish the previous step's settlements.
    pub pause: Duration,
}

impl Default for FindMaxSettings {
    fn default() -> Self {
        Self {
            run: RunSettings {
                warmup: Duration::from_secs(2),
                duration: Duration::from_secs(5),
                ..RunSettings::default()
            },
            slo_p99: Duration::from_millis(10),
            start_rate: 100.0,
            step_factor: 1.25,
            max_rate: 1_000_000.0,
            max_steps: 40,
            pause: Duration::from_secs(1),
        }
    }
}

/// One step of the search.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate_per_second: f64,
    pub met: bool,
    /// Why it did not meet the objective (empty when it did).
    pub failures: Vec<String>,
    pub corrected_p99_us: u64,
    pub answered_per_second: f64,
    pub settled_per_second: Option<f64>,
    pub generator_bottleneck: bool,
}

/// The search's answer.
#[derive(Debug, Clone, Serialize)]
pub struct FindMaxReport {
    pub scenario: String,
    pub slo_p99_ms: f64,
    /// The highest rate that met the objective; `null` if even the first did not.
    pub max_rate_per_second: Option<f64>,
    /// No step missed: the search stopped at `--max-rate` or `--max-steps`, so the target's
    /// real maximum is *at least* `max_rate_per_second` (raise the bounds to find it).
    pub capped: bool,
    pub steps: Vec<Step>,
    /// The full report of the step at the highest rate that met the objective.
    pub best: Option<Report>,
}

impl FindMaxReport {
    pub fn summary(&self) -> String {
        let mut out = format!(
            "find-max {}: SLO corrected p99 <= {} ms, no error, no missed send\n",
            self.scenario, self.slo_p99_ms
        );
        for step in &self.steps {
            out.push_str(&format!(
                "  {:>10.1} req/s  p99 {:>9} ms  answered {:>9.1}/s{}  {}{}\n",
                step.rate_per_second,
                crate::histogram::ms(step.corrected_p99_us),
                step.answered_per_second,
                step.settled_per_second
                    .map_or(String::new(), |s| format!("  settled {s:>9.1}/s")),
                if step.met { "met" } else { "missed: " },
                step.failures.join("; ")
            ));
        }
        match self.max_rate_per_second {
            Some(rate) if self.capped => out.push_str(&format!(
                "max rate meeting the SLO: at least {rate:.1} req/s (no step missed: raise --max-rate or --max-steps)\n"
            )),
            Some(rate) => out.push_str(&format!("max rate meeting the SLO: {rate:.1} req/s\n")),
            None => out.push_str("no rate met the SLO\n"),
        }
        if self.best.as_ref().is_some_and(|b| b.generator_bottleneck) {
            out.push_str("WARNING: the generator may have been the bottleneck at that rate\n");
        }
        out
    }
}

/// Why `report` misses the objective (empty: it meets it).
pub fn slo_failures(report: &Report, slo_p99: Duration) -> Vec<String> {
    let mut failures = Vec::new();
    let p99 = report.latency.corrected.p99_us;
    if p99 > slo_p99.as_micros() as u64 {
        failures.push(format!("p99 {} ms", crate::histogram::ms(p99)));
    }
    let q = &report.requests;
    if q.answered == 0 {
        failures.push("nothing answered".into());
    }
    if q.errors > 0 {
        failures.push(format!("{} errors", q.errors));
    }
    if q.timeouts > 0 {
        failures.push(format!("{} timeouts", q.timeouts));
    }
    if q.missed.total() > 0 {
        failures.push(format!("{} missed sends", q.missed.total()));
    }
    if let Some(s) = &report.settlement {
        let bad = s.unsettled + s.closed + s.missing + s.paid_twice;
        if bad > 0 {
            failures.push(format!("{bad} payments not settled"));
        }
        if s.verify_failures > 0 {
            failures.push(format!("{} verification failures", s.verify_failures));
        }
    }
    failures
}

/// Searches for the highest rate meeting the objective.
pub async fn find_max(target: &Target, settings: &FindMaxSettings) -> Result<FindMaxReport, Error> {
    if !(settings.step_factor > 1.0 && settings.step_factor <= 10.0) {
        return Err(Error::Settings("--step must be in (1, 10]".into()));
    }
    if !(settings.start_rate >= 0.001 && settings.start_rate <= settings.max_rate) {
        return Err(Error::Settings(
            "--start must be at least 0.001 and at most --max-rate".into(),
        ));
    }
    if !(1..=1_000).contains(&settings.max_steps) {
        return Err(Error::Settings("--max-steps must be 1..=1000".into()));
    }
    if settings.run.scenario == crate::Scenario::Failover {
        return Err(Error::Settings(
            "find-max does not search under an injected outage: use `run --scenario failover`"
                .into(),
        ));
    }
    target.check_scenario(settings.run.scenario)?;
    let mut steps = Vec::new();
    let mut best: Option<Report> = None;
    let mut rate = settings.start_rate;
    for index in 0..settings.max_steps {
        if index > 0 {
            tokio::time::sleep(settings.pause).await;
        }
        let run_settings = RunSettings {
            rate_per_second: rate,
            ..settings.run.clone()
        };
        let report = run(target, &run_settings).await?;
        let failures = slo_failures(&report, settings.slo_p99);
        let met = failures.is_empty();
        steps.push(Step {
            rate_per_second: report.run.rate_per_second,
            met,
            failures,
            corrected_p99_us: report.latency.corrected.p99_us,
            answered_per_second: report.throughput.answered_per_second,
            settled_per_second: report.throughput.settled_per_second,
            generator_bottleneck: report.generator_bottleneck,
        });
        if !met {
            break;
        }
        best = Some(report);
        if rate >= settings.max_rate {
            break;
        }
        rate = (rate * settings.step_factor).min(settings.max_rate);
    }
    Ok(FindMaxReport {
        scenario: settings.run.scenario.as_str().to_owned(),
        slo_p99_ms: settings.slo_p99.as_secs_f64() * 1_000.0,
        max_rate_per_second: best.as_ref().map(|b| b.run.rate_per_second),
        capped: steps.last().is_some_and(|s| s.met),
        steps,
        best,
    })
}
