//! `compare`: the gateway against the same-run baseline, with the same objective, taking turns
//! (A B A B A B), so that every performance claim is a ratio measured on the same machine in
//! the same minutes.
//!
//! Each round runs [`find_max`] against the gateway, then against the baseline proxy. A
//! side's figure is the throughput of its best step (the highest rate meeting the SLO):
//! - gateway, `checkout`: **settled payments/s** (settlements committed and acknowledged in
//!   the window); `authorize`: payments/s answered;
//! - baseline: proxied supplier creates/s answered (it always runs `checkout`: one create per
//!   request).
//!
//! The round's ratio is gateway ÷ baseline. The report gives each round, the median of each
//! side and the median of the ratios (with three or more rounds, robust to one disturbed
//! round), and the CPU µs per unit of work of every measured process in each best step —
//! and, for the gateway, its Redis round trips, Redis script calls and store commits per unit
//! ([`crate::resources`]; the best step's full report, under `search.best`, has the rest).
//! Alternating spreads slow drifts of the machine (another process, thermal state) over both
//! sides instead of charging them to one.
//!
//! A search that starts far below a side's maximum spends most of its steps getting there, so
//! from the second round on each side starts at `resume_share` × its best rate so far (never
//! below its first start); `resume_share = 0` starts every round from scratch.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::find_max::{find_max, FindMaxReport, FindMaxSettings};
use crate::report::Report;
use crate::scenario::Scenario;
use crate::target::Target;
use crate::Error;

/// The most rounds (each is two searches).
pub const MAX_ROUNDS: u32 = 50;

/// What `compare` does.
#[derive(Debug, Clone)]
pub struct CompareSettings {
    /// The gateway's search (scenario `authorize` or `checkout`); the baseline's is the same
    /// but for the scenario (`checkout`) and the start rate.
    pub search: FindMaxSettings,
    /// The baseline's first rate.
    pub baseline_start_rate: f64,
    pub rounds: u32,
    /// From round 2, each side starts at this share of its best rate so far (0: from its
    /// start every round).
    pub resume_share: f64,
}

/// One side of one round.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub target: String,
    pub start_rate_per_second: f64,
    /// The highest arrival rate that met the SLO (`null`: none did).
    pub max_rate_per_second: Option<f64>,
    /// The search never missed (it stopped at `--max-rate` or `--max-steps`): the side's
    /// real maximum is higher, and a ratio with it is not its true value.
    pub capped: bool,
    /// The side's figure at that rate (see the module doc); `null` with no rate.
    pub per_second: Option<f64>,
    /// What `per_second` counts: `settled_per_second` or `answered_per_second`.
    pub measure: String,
    pub corrected_p99_us: Option<u64>,
    /// CPU µs per unit of `measure`, per measured process (`loadtest` itself included), in
    /// the best step.
    pub cpu_us_per_unit: BTreeMap<String, f64>,
    /// The gateway's `gateway_redis_round_trips_total` per unit in the best step (`null`: not
    /// the gateway, or not counted).
    pub redis_round_trips_per_unit: Option<f64>,
    /// Redis's `evalsha` + `eval` calls per unit (`--redis-addr`).
    pub redis_script_calls_per_unit: Option<f64>,
    /// The gateway's `gateway_store_commits_total` per unit (the fsync estimate).
    pub store_commits_per_unit: Option<f64>,
    /// Settlements per group commit in the best step.
    pub settlement_rows_per_commit: Option<f64>,
    pub generator_bottleneck: bool,
    pub search: FindMaxReport,
}

/// One round: the gateway, then the baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub round: u32,
    pub gateway: Side,
    pub baseline: Side,
    /// gateway.per_second ÷ baseline.per_second (`null` when either found no rate).
    pub ratio: Option<f64>,
    /// A side's search was capped: the ratio is a bound, not a measurement (gateway capped:
    /// at least; baseline capped: at most).
    pub ratio_is_bound: bool,
}

/// The comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub scenario: String,
    pub slo_p99_ms: f64,
    /// What the gateway's figure counts (the baseline's is `answered_per_second`).
    pub gateway_measure: String,
    pub rounds: Vec<Round>,
    pub median_gateway_per_second: Option<f64>,
    pub median_baseline_per_second: Option<f64>,
    /// The median of the rounds' ratios: the figure to quote.
    pub median_ratio: Option<f64>,
    /// Ratios of the rounds that had one, in order.
    pub ratios: Vec<f64>,
    /// Some round's ratio is only a bound (a capped search): widen the search.
    pub ratios_are_bounds: bool,
}

/// Which figure of a report a side is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    Settled,
    Answered,
}

impl Measure {
    fn name(self) -> &'static str {
        match self {
            Measure::Settled => "settled_per_second",
            Measure::Answered => "answered_per_second",
        }
    }

    fn of(self, report: &Report) -> Option<f64> {
        match self {
            Measure::Settled => report.throughput.settled_per_second,
            Measure::Answered => Some(report.throughput.answered_per_second),
        }
    }

    /// A figure per unit: its per-settled or per-request form.
    fn per_unit(self, per_request: Option<f64>, per_settled: Option<f64>) -> Option<f64> {
        match self {
            Measure::Settled => per_settled,
            Measure::Answered => per_request,
        }
    }

    /// CPU µs per unit, per process.
    fn cpu(self, report: &Report) -> BTreeMap<String, f64> {
        report
            .cpu
            .iter()
            .filter_map(|c| {
                let per_unit = match self {
                    Measure::Settled => c.us_per_settled,
                    Measure::Answered => c.us_per_request,
                }?;
                Some((c.name.clone(), per_unit))
            })
            .collect()
    }
}

/// The median (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

impl CompareSettings {
    fn validate(&self) -> Result<Measure, Error> {
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return Err(Error::Settings(format!(
                "--rounds must be 1..={MAX_ROUNDS}"
            )));
        }
        if !(0.0..1.0).contains(&self.resume_share) {
            return Err(Error::Settings("--resume-share must be in [0, 1)".into()));
        }
        if !(self.baseline_start_rate >= 0.001 && self.baseline_start_rate <= self.search.max_rate)
        {
            return Err(Error::Settings(
                "--baseline-start must be at least 0.001 and at most --max-rate".into(),
            ));
        }
        match self.search.run.scenario {
            Scenario::Checkout => Ok(Measure::Settled),
            Scenario::Authorize => Ok(Measure::Answered),
            other => Err(Error::Settings(format!(
                "compare measures authorize or checkout against the baseline, not {other}"
            ))),
        }
    }
}

/// The next start of a side: `resume_share` × its best rate so far, not below `first`.
fn next_start(first: f64, best_so_far: Option<f64>, resume_share: f64) -> f64 {
    match best_so_far {
        Some(best) if resume_share > 0.0 => (best * resume_share).max(first),
        _ => first,
    }
}

async fn side(
    target: &Target,
    search: &FindMaxSettings,
    start: f64,
    measure: Measure,
) -> Result<Side, Error> {
    let settings = FindMaxSettings {
        start_rate: start,
        ..search.clone()
    };
    let report = find_max(target, &settings).await?;
    let best = report.best.as_ref();
    let gateway = best.and_then(|b| b.gateway_metrics.as_ref());
    Ok(Side {
        target: target.name().to_owned(),
        start_rate_per_second: start,
        max_rate_per_second: report.max_rate_per_second,
        capped: report.capped,
        per_second: best.and_then(|b| measure.of(b)),
        measure: measure.name().to_owned(),
        corrected_p99_us: best.map(|b| b.latency.corrected.p99_us),
        cpu_us_per_unit: best.map(|b| measure.cpu(b)).unwrap_or_default(),
        redis_round_trips_per_unit: gateway
            .and_then(|g| g.redis_round_trips.as_ref())
            .and_then(|c| measure.per_unit(c.per_request, c.per_settled)),
        redis_script_calls_per_unit: best
            .and_then(|b| b.redis_commandstats.as_ref())
            .and_then(|r| measure.per_unit(r.script_calls_per_request, r.script_calls_per_settled)),
        store_commits_per_unit: gateway
            .and_then(|g| g.store_commits.as_ref())
            .and_then(|c| measure.per_unit(c.per_request, c.per_settled)),
        settlement_rows_per_commit: gateway
            .and_then(|g| g.settlement_batches.as_ref())
            .and_then(|b| b.rows_per_commit),
        generator_bottleneck: best.is_some_and(|b| b.generator_bottleneck),
        search: report,
    })
}

/// Runs the rounds. `gateway` and `baseline` must be a [`Target::Gateway`] and a
/// [`Target::Baseline`] in front of the same channel-sim.
pub async fn compare(
    gateway: &Target,
    baseline: &Target,
    settings: &CompareSettings,
) -> Result<CompareReport, Error> {
    let gateway_measure = settings.validate()?;
    let baseline_search = FindMaxSettings {
        run: crate::RunSettings {
            scenario: Scenario::Checkout,
            ..settings.search.run.clone()
        },
        ..settings.search.clone()
    };
    // Refuse a wrong pair before the first (long) search.
    gateway.check_scenario(settings.search.run.scenario)?;
    baseline.check_scenario(Scenario::Checkout)?;
    let mut rounds = Vec::new();
    let (mut gateway_best, mut baseline_best): (Option<f64>, Option<f64>) = (None, None);
    for round in 1..=settings.rounds {
        if round > 1 {
            tokio::time::sleep(settings.search.pause).await;
        }
        let start = next_start(
            settings.search.start_rate,
            gateway_best,
            settings.resume_share,
        );
        let a = side(gateway, &settings.search, start, gateway_measure).await?;
        tokio::time::sleep(settings.search.pause).await;
        let start = next_start(
            settings.baseline_start_rate,
            baseline_best,
            settings.resume_share,
        );
        let b = side(baseline, &baseline_search, start, Measure::Answered).await?;
        gateway_best = max_option(gateway_best, a.max_rate_per_second);
        baseline_best = max_option(baseline_best, b.max_rate_per_second);
        let ratio = match (a.per_second, b.per_second) {
            (Some(g), Some(b)) if b > 0.0 => Some(g / b),
            _ => None,
        };
        let ratio_is_bound = a.capped || b.capped;
        rounds.push(Round {
            round,
            gateway: a,
            baseline: b,
            ratio,
            ratio_is_bound,
        });
    }
    let collect =
        |f: fn(&Round) -> Option<f64>| -> Vec<f64> { rounds.iter().filter_map(f).collect() };
    let ratios = collect(|r| r.ratio);
    Ok(CompareReport {
        scenario: settings.search.run.scenario.as_str().to_owned(),
        slo_p99_ms: settings.search.slo_p99.as_secs_f64() * 1_000.0,
        gateway_measure: gateway_measure.name().to_owned(),
        median_gateway_per_second: median(&collect(|r| r.gateway.per_second)),
        median_baseline_per_second: median(&collect(|r| r.baseline.per_second)),
        median_ratio: median(&ratios),
        ratios,
        ratios_are_bounds: rounds.iter().any(|r| r.ratio_is_bound),
        rounds,
    })
}

fn max_option(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl Side {
    /// What one unit of `measure` is.
    fn unit(&self) -> &'static str {
        if self.measure == "settled_per_second" {
            "settled payment"
        } else {
            "request"
        }
    }

    /// `gateway per settled payment: redis round trips 2.04 (INFO evalsha+eval 3.01), store
    /// commits 0.31 (settlement rows per commit 3.2)`, when anything of it was measured.
    fn resources_line(&self) -> Option<String> {
        let two = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        if self.redis_round_trips_per_unit.is_none()
            && self.redis_script_calls_per_unit.is_none()
            && self.store_commits_per_unit.is_none()
            && self.settlement_rows_per_commit.is_none()
        {
            return None;
        }
        Some(format!(
            "{} per {}: redis round trips {} (INFO evalsha+eval {}), store commits {} (settlement rows per commit {})",
            self.target,
            self.unit(),
            two(self.redis_round_trips_per_unit),
            two(self.redis_script_calls_per_unit),
            two(self.store_commits_per_unit),
            self.settlement_rows_per_commit
                .map_or("-".to_owned(), |v| format!("{v:.1}"))
        ))
    }
}

fn figure(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |v| format!("{v:.1}"))
}

impl CompareReport {
    /// The human summary: one line per round, then the medians.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "compare {}: gateway {} vs baseline answered_per_second (proxied supplier creates), SLO corrected p99 <= {} ms, no error, no missed send\n",
            self.scenario, self.gateway_measure, self.slo_p99_ms
        );
        out.push_str(
            "round   gateway max rate   gateway /s  p99 ms    baseline max rate  baseline /s  p99 ms    ratio\n",
        );
        for r in &self.rounds {
            let p99 = |s: &Side| {
                s.corrected_p99_us
                    .map_or("-".to_owned(), crate::histogram::ms)
            };
            out.push_str(&format!(
                "{:>5}   {:>16}   {:>10}  {:>8}  {:>17}  {:>11}  {:>8}  {:>7}{}\n",
                r.round,
                figure(r.gateway.max_rate_per_second),
                figure(r.gateway.per_second),
                p99(&r.gateway),
                figure(r.baseline.max_rate_per_second),
                figure(r.baseline.per_second),
                p99(&r.baseline),
                r.ratio.map_or("-".to_owned(), |v| format!("{v:.3}")),
                [
                    (
                        r.gateway.capped,
                        "  (gateway search capped: its max is higher)"
                    ),
                    (
                        r.baseline.capped,
                        "  (baseline search capped: its max is higher)"
                    ),
                    (
                        r.gateway.generator_bottleneck || r.baseline.generator_bottleneck,
                        "  (generator-limited)",
                    ),
                ]
                .iter()
                .filter(|(flag, _)| *flag)
                .map(|(_, note)| *note)
                .collect::<String>()
            ));
        }
        out.push_str(&format!(
            "median  gateway {}/s  baseline {}/s  ratio {}\n",
            figure(self.median_gateway_per_second),
            figure(self.median_baseline_per_second),
            self.median_ratio
                .map_or("- (a side found no rate meeting the SLO)".to_owned(), |v| {
                    format!("{v:.3}")
                })
        ));
        if self.ratios_are_bounds {
            out.push_str("WARNING: a search stopped at --max-rate or --max-steps without missing the SLO: its ratio is a bound, not a measurement\n");
        }
        for r in &self.rounds {
            for side in [&r.gateway, &r.baseline] {
                if side.cpu_us_per_unit.is_empty() {
                    continue;
                }
                let cpu: Vec<String> = side
                    .cpu_us_per_unit
                    .iter()
                    .map(|(name, us)| format!("{name} {us:.0}"))
                    .collect();
                out.push_str(&format!(
                    "  round {} {} CPU µs per {}: {}\n",
                    r.round,
                    side.target,
                    side.unit(),
                    cpu.join(", ")
                ));
            }
        }
        for r in &self.rounds {
            for side in [&r.gateway, &r.baseline] {
                if let Some(line) = side.resources_line() {
                    out.push_str(&format!("  round {} {line}\n", r.round));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0));
    }

    #[test]
    fn later_rounds_resume_below_the_best_so_far() {
        assert_eq!(next_start(100.0, None, 0.5), 100.0);
        assert_eq!(next_start(100.0, Some(1_000.0), 0.5), 500.0);
        assert_eq!(next_start(100.0, Some(150.0), 0.5), 100.0);
        assert_eq!(next_start(100.0, Some(1_000.0), 0.0), 100.0);
        assert_eq!(max_option(None, Some(2.0)), Some(2.0));
        assert_eq!(max_option(Some(3.0), Some(2.0)), Some(3.0));
        assert_eq!(max_option(None, None), None);
    }

    #[test]
    fn settings_are_checked() {
        let mut settings = CompareSettings {
            search: FindMaxSettings::default(),
            baseline_start_rate: 100.0,
            rounds: 3,
            resume_share: 0.5,
        };
        settings.search.run.scenario = Scenario::Checkout;
        assert_eq!(settings.validate().unwrap(), Measure::Settled);
        settings.search.run.scenario = Scenario::Authorize;
        assert_eq!(settings.validate().unwrap(), Measure::Answered);
        settings.search.run.scenario = Scenario::Mixed;
        assert!(settings.validate().is_err());
        settings.search.run.scenario = Scenario::Checkout;
        settings.rounds = 0;
        assert!(settings.validate().is_err());
        settings.rounds = 3;
        settings.resume_share = 1.0;
        assert!(settings.validate().is_err());
        settings.resume_share = 0.5;
        settings.baseline_start_rate = 0.0;
        assert_eq!(settings.validate().unwrap_err().exit_code(), 2);
    }
}
