//! What the target spent besides CPU over the measured window (issue 6): the gateway's own
//! counters of Redis round trips and store commits, Redis's count of the commands it ran,
//! the memory of every measured process and the gateway's queues, second by second.
//!
//! - **Gateway counters** (`GET {gateway_url}/metrics`, gateway target only): read at the
//!   start and the end of the window, as the CPU is, and reported as deltas per unit of work
//!   (per answered request; for settling scenarios also per settled payment, the units of
//!   the CPU figures): `gateway_redis_round_trips_total{op}`, `gateway_store_commits_total
//!   {backend,op}` (one per store transaction: the fsync estimate; `null` when the gateway
//!   does not export it) and `gateway_settlement_batch_rows_sum / _count` (rows per group
//!   commit).
//! - **Redis `INFO commandstats`** (`--redis-addr`, gateway target only): the same edges;
//!   script calls (`evalsha` + `eval` + …) and every command per unit ([`crate::redis_info`]).
//! - **Once a second** during the window: `VmRSS` of every `--pid` process, and the gauges
//!   `gateway_settlement_queue_depth` and `gateway_webhook_backlog`. Their trend over the
//!   window says whether memory or a queue grows at a steady rate: means of the first and the
//!   last tenth of the samples, compared.
//!
//! A failed scrape or `INFO` is a warning in the report, never a failed run. Scraping costs
//! the gateway one render of its metrics per second (well under a millisecond of CPU),
//! counted in its CPU figure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::Uri;
use serde::Serialize;
use tokio::time::Instant;

use crate::client::HttpClient;
use crate::procstat::ProcessSpec;
use crate::prom::{self, counter_delta, Scrape};
use crate::redis_info::{self, CommandStats};

/// Between two samples of RSS and the gauges.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// A scrape at an edge of the window: its counters are the deltas' ends.
pub const EDGE_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// A scrape between the edges: shorter than the interval, so sampling never falls behind.
pub const TICK_SCRAPE_TIMEOUT: Duration = Duration::from_millis(900);
/// The share of the samples at each end whose means are compared.
pub const TREND_SHARE: f64 = 0.10;
/// RSS is flat when the last tenth's mean is within this share of the first tenth's.
pub const RSS_FLAT_BAND: f64 = 0.10;
/// A queue grew when its last tenth's mean is more than this above the first tenth's…
pub const QUEUE_GREW_BY: f64 = 50.0;
/// …and more than this many times it.
pub const QUEUE_GREW_FACTOR: f64 = 2.0;
const KIB_PER_MIB: f64 = 1024.0;

pub const REDIS_ROUND_TRIPS: &str = "gateway_redis_round_trips_total";
pub const STORE_COMMITS: &str = "gateway_store_commits_total";
pub const BATCH_ROWS_SUM: &str = "gateway_settlement_batch_rows_sum";
pub const BATCH_ROWS_COUNT: &str = "gateway_settlement_batch_rows_count";
pub const QUEUE_DEPTH: &str = "gateway_settlement_queue_depth";
pub const WEBHOOK_BACKLOG: &str = "gateway_webhook_backlog";

/// What is sampled once a second.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The gateway's `/metrics` (`None`: not the gateway).
    pub metrics: Option<Uri>,
    /// The `--pid` processes.
    pub processes: Vec<ProcessSpec>,
}

impl Probe {
    pub fn is_empty(&self) -> bool {
        self.metrics.is_none() && self.processes.is_empty()
    }
}

/// One sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    /// The second of the window it was taken at the start of (`None`: the sample at the
    /// window's end).
    pub second: Option<u32>,
    /// RSS of each probed process, in kB, in the probe's order.
    pub rss_kb: Vec<Result<u64, String>>,
    pub queue_depth: Option<f64>,
    pub webhook_backlog: Option<f64>,
    pub scrape_error: Option<String>,
}

/// Everything sampled over a window.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub ticks: Vec<Tick>,
    /// The scrapes at the window's start and end (`None`: no metrics probed).
    pub first_scrape: Option<Result<Scrape, String>>,
    pub last_scrape: Option<Result<Scrape, String>>,
}

/// Samples `probe` at the start of every second of the window `[start, end)` and at its
/// end. Each sample reads `/proc/PID/status` of every process and scrapes the gateway once.
pub async fn sample_window(probe: Probe, start: Instant, end: Instant) -> Samples {
    let client = HttpClient::new(1, EDGE_SCRAPE_TIMEOUT);
    let mut samples = Samples::default();
    let mut second: u32 = 0;
    loop {
        let at = start + SAMPLE_INTERVAL * second;
        let edge = at >= end;
        let at = at.min(end);
        tokio::time::sleep_until(at).await;
        let rss_kb = probe
            .processes
            .iter()
            .map(|p| p.rss_kb().map_err(|e| e.to_string()))
            .collect();
        let scrape = match &probe.metrics {
            None => None,
            Some(uri) if second == 0 || edge => Some(prom::scrape(&client, uri).await),
            Some(uri) => Some(
                tokio::time::timeout(TICK_SCRAPE_TIMEOUT, prom::scrape(&client, uri))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "GET {uri}: no answer within {} ms",
                            TICK_SCRAPE_TIMEOUT.as_millis()
                        ))
                    }),
            ),
        };
        let gauge = |name: &str| {
            scrape
                .as_ref()
                .and_then(|s| s.as_ref().ok())
                .and_then(|s| s.total(name))
        };
        samples.ticks.push(Tick {
            second: (!edge).then_some(second),
            rss_kb,
            queue_depth: gauge(QUEUE_DEPTH),
            webhook_backlog: gauge(WEBHOOK_BACKLOG),
            scrape_error: scrape.as_ref().and_then(|s| s.as_ref().err().cloned()),
        });
        if second == 0 {
            samples.first_scrape = scrape.clone();
        }
        if edge {
            samples.last_scrape = scrape;
            return samples;
        }
        second += 1;
    }
}

/// The units the figures are divided by: the CPU figures' units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Units {
    /// Requests answered in the window.
    pub answered: u64,
    /// Payments settled in the window (settling scenarios).
    pub settled: Option<u64>,
}

impl Units {
    fn per_request(self, count: u64) -> Option<f64> {
        (self.answered > 0).then(|| count as f64 / self.answered as f64)
    }

    fn per_settled(self, count: u64) -> Option<f64> {
        self.settled
            .filter(|&s| s > 0)
            .map(|s| count as f64 / s as f64)
    }
}

/// A counter's delta over the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CounterFigures {
    pub total: u64,
    /// By the `op` label.
    pub by_op: BTreeMap<String, u64>,
    pub per_request: Option<f64>,
    pub per_settled: Option<f64>,
}

impl CounterFigures {
    fn new(delta: &prom::Delta, units: Units) -> Self {
        let total = counter(delta.total);
        Self {
            total,
            by_op: delta
                .by_label
                .iter()
                .map(|(op, &n)| (op.clone(), counter(n)))
                .collect(),
            per_request: units.per_request(total),
            per_settled: units.per_settled(total),
        }
    }
}

/// A counter's delta as a count (the exporter writes integers; a fraction would be ours).
fn counter(value: f64) -> u64 {
    value.max(0.0).round() as u64
}

/// Settlement group commits in the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchFigures {
    /// Group commits (`gateway_settlement_batch_rows_count`).
    pub commits: u64,
    /// Settlements in them (`gateway_settlement_batch_rows_sum`).
    pub rows: u64,
    pub rows_per_commit: Option<f64>,
}

/// A gauge over the window's samples.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GaugeTrend {
    pub samples: usize,
    pub first: f64,
    pub last: f64,
    pub min: f64,
    pub max: f64,
    /// Means of the first and the last tenth of the samples.
    pub first_tenth_mean: f64,
    pub last_tenth_mean: f64,
    /// The last tenth's mean is more than [`QUEUE_GREW_BY`] above the first's and more than
    /// [`QUEUE_GREW_FACTOR`] times it: the queue grew over the window.
    pub grew: bool,
}

impl GaugeTrend {
    pub fn of(values: &[f64]) -> Option<Self> {
        let (first_tenth_mean, last_tenth_mean) = tenth_means(values)?;
        Some(Self {
            samples: values.len(),
            first: *values.first()?,
            last: *values.last()?,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            first_tenth_mean,
            last_tenth_mean,
            grew: queue_grew(first_tenth_mean, last_tenth_mean),
        })
    }
}

/// The gateway's counters and gauges over the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GatewayMetrics {
    pub url: String,
    /// Why (some) deltas are missing: a scrape at an edge of the window failed, or the
    /// gateway restarted in it.
    pub error: Option<String>,
    /// `gateway_redis_round_trips_total` (`null`: not exported, e.g. an in-process balance
    /// store, which makes none).
    pub redis_round_trips: Option<CounterFigures>,
    /// `gateway_store_commits_total`: store transactions committed (the fsync estimate;
    /// `null`: not exported by this gateway).
    pub store_commits: Option<CounterFigures>,
    pub settlement_batches: Option<BatchFigures>,
    /// `gateway_settlement_queue_depth`, sampled once a second.
    pub settlement_queue_depth: Option<GaugeTrend>,
    /// `gateway_webhook_backlog`, sampled once a second (`null`: not exported).
    pub webhook_backlog: Option<GaugeTrend>,
    /// Scrapes taken / failed over the window (edges included).
    pub scrapes: usize,
    pub failed_scrapes: usize,
    /// Lines of the edge scrapes that were not samples (skipped).
    pub malformed_lines: usize,
}

/// Redis's own counts over the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RedisCommandStats {
    pub addr: String,
    /// Why the figures are missing (the `INFO` at an edge failed, or the stats were reset).
    pub error: Option<String>,
    /// Calls of `evalsha`, `eval` (and `_ro` variants, `fcall`) in the window: the scripts
    /// the gateway ran (a pipeline of N is N here, one round trip for the gateway).
    pub script_calls: Option<u64>,
    pub script_calls_by_command: BTreeMap<String, u64>,
    pub script_calls_per_request: Option<f64>,
    pub script_calls_per_settled: Option<f64>,
    /// Calls of every command, those run inside scripts included, our own `INFO` excluded.
    pub total_calls: Option<u64>,
    pub total_calls_per_request: Option<f64>,
    pub total_calls_per_settled: Option<f64>,
}

/// One process's resident memory over the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RssReport {
    pub name: String,
    pub pid: Option<u32>,
    /// Samples read (a sample fails when the process has gone).
    pub samples: usize,
    pub first_mib: Option<f64>,
    pub last_mib: Option<f64>,
    pub min_mib: Option<f64>,
    pub max_mib: Option<f64>,
    /// (mean of the last tenth of the samples) / (mean of the first tenth) − 1.
    pub growth: Option<f64>,
    /// `growth` within ±[`RSS_FLAT_BAND`].
    pub flat: Option<bool>,
    /// The first failed read.
    pub error: Option<String>,
}

/// Means of the first and the last tenth of `values` (at least one value each); `None`
/// when empty.
pub fn tenth_means(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let k = ((values.len() as f64 * TREND_SHARE).ceil() as usize).clamp(1, values.len());
    let mean = |part: &[f64]| part.iter().sum::<f64>() / part.len() as f64;
    Some((mean(&values[..k]), mean(&values[values.len() - k..])))
}

/// last-tenth mean ÷ first-tenth mean − 1 (`None`: no sample, or a first mean of 0).
pub fn growth(values: &[f64]) -> Option<f64> {
    let (first, last) = tenth_means(values)?;
    (first > 0.0).then(|| last / first - 1.0)
}

pub fn is_flat(growth: f64) -> bool {
    growth.abs() <= RSS_FLAT_BAND
}

pub fn queue_grew(first_tenth_mean: f64, last_tenth_mean: f64) -> bool {
    last_tenth_mean > first_tenth_mean + QUEUE_GREW_BY
        && last_tenth_mean > QUEUE_GREW_FACTOR * first_tenth_mean
}

/// The gateway's figures from the samples of a window; warnings for the report.
pub fn gateway_metrics(
    url: &Uri,
    samples: &Samples,
    units: Units,
    warnings: &mut Vec<String>,
) -> GatewayMetrics {
    let mut errors = Vec::new();
    let mut figures = GatewayMetrics {
        url: url.to_string(),
        error: None,
        redis_round_trips: None,
        store_commits: None,
        settlement_batches: None,
        settlement_queue_depth: GaugeTrend::of(
            &samples
                .ticks
                .iter()
                .filter_map(|t| t.queue_depth)
                .collect::<Vec<_>>(),
        ),
        webhook_backlog: GaugeTrend::of(
            &samples
                .ticks
                .iter()
                .filter_map(|t| t.webhook_backlog)
                .collect::<Vec<_>>(),
        ),
        scrapes: samples.ticks.len(),
        failed_scrapes: samples
            .ticks
            .iter()
            .filter(|t| t.scrape_error.is_some())
            .count(),
        malformed_lines: 0,
    };
    match (&samples.first_scrape, &samples.last_scrape) {
        (Some(Ok(before)), Some(Ok(after))) => {
            figures.malformed_lines = before.malformed + after.malformed;
            let mut delta =
                |name: &str, label: &str| match counter_delta(before, after, name, label) {
                    Ok(delta) => delta,
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                };
            figures.redis_round_trips = delta(REDIS_ROUND_TRIPS, "op")
                .as_ref()
                .map(|d| CounterFigures::new(d, units));
            figures.store_commits = delta(STORE_COMMITS, "op")
                .as_ref()
                .map(|d| CounterFigures::new(d, units));
            let rows = delta(BATCH_ROWS_SUM, "");
            let commits = delta(BATCH_ROWS_COUNT, "");
            figures.settlement_batches = match (rows, commits) {
                (Some(rows), Some(commits)) => {
                    let (rows, commits) = (counter(rows.total), counter(commits.total));
                    Some(BatchFigures {
                        commits,
                        rows,
                        rows_per_commit: (commits > 0).then(|| rows as f64 / commits as f64),
                    })
                }
                _ => None,
            };
        }
        (first, last) => {
            for scrape in [first, last] {
                if let Some(Err(e)) = scrape {
                    errors.push(e.clone());
                }
            }
        }
    }
    if let Some(e) = samples.ticks.iter().find_map(|t| t.scrape_error.as_ref()) {
        warnings.push(format!(
            "{} of {} scrapes of the gateway's metrics failed (first: {e})",
            figures.failed_scrapes, figures.scrapes
        ));
    }
    if !errors.is_empty() {
        let error = errors.join("; ");
        warnings.push(format!("gateway metrics deltas: {error}"));
        figures.error = Some(error);
    }
    if figures.malformed_lines > 0 {
        warnings.push(format!(
            "{} lines of the gateway's metrics were not Prometheus samples (skipped)",
            figures.malformed_lines
        ));
    }
    figures
}

/// Redis's figures from the `INFO` at the edges of the window; warnings for the report.
pub fn redis_commandstats(
    addr: SocketAddr,
    before: Result<CommandStats, String>,
    after: Result<CommandStats, String>,
    units: Units,
    warnings: &mut Vec<String>,
) -> RedisCommandStats {
    let mut stats = RedisCommandStats {
        addr: addr.to_string(),
        error: None,
        script_calls: None,
        script_calls_by_command: BTreeMap::new(),
        script_calls_per_request: None,
        script_calls_per_settled: None,
        total_calls: None,
        total_calls_per_request: None,
        total_calls_per_settled: None,
    };
    match before.and_then(|before| after.and_then(|after| after.since(&before))) {
        Ok(delta) => {
            let (scripts, total) = redis_info::script_and_total(&delta);
            let script_calls = scripts.values().sum();
            stats.script_calls = Some(script_calls);
            stats.script_calls_by_command = scripts;
            stats.script_calls_per_request = units.per_request(script_calls);
            stats.script_calls_per_settled = units.per_settled(script_calls);
            stats.total_calls = Some(total);
            stats.total_calls_per_request = units.per_request(total);
            stats.total_calls_per_settled = units.per_settled(total);
        }
        Err(e) => {
            warnings.push(format!("Redis INFO commandstats: {e}"));
            stats.error = Some(e);
        }
    }
    stats
}

/// Each process's RSS over the window.
pub fn rss_reports(processes: &[ProcessSpec], ticks: &[Tick]) -> Vec<RssReport> {
    processes
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let readings = ticks.iter().filter_map(|t| t.rss_kb.get(i));
            let mib: Vec<f64> = readings
                .clone()
                .filter_map(|r| r.as_ref().ok())
                .map(|&kb| kb as f64 / KIB_PER_MIB)
                .collect();
            let growth = growth(&mib);
            RssReport {
                name: spec.name.clone(),
                pid: spec.pid,
                samples: mib.len(),
                first_mib: mib.first().copied(),
                last_mib: mib.last().copied(),
                min_mib: mib.iter().copied().reduce(f64::min),
                max_mib: mib.iter().copied().reduce(f64::max),
                growth,
                flat: growth.map(is_flat),
                error: readings.filter_map(|r| r.as_ref().err()).next().cloned(),
            }
        })
        .collect()
}

/// What one second of the series gets from the samples: RSS by process (MiB) and the gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecondResources {
    pub rss_mib: BTreeMap<String, f64>,
    pub settlement_queue_depth: Option<f64>,
    pub webhook_backlog: Option<f64>,
}

/// The sample taken at the start of each of `seconds` seconds (a second without one:
/// empty).
pub fn per_second(
    processes: &[ProcessSpec],
    ticks: &[Tick],
    seconds: usize,
) -> Vec<SecondResources> {
    let mut out = vec![SecondResources::default(); seconds];
    for tick in ticks {
        let Some(slot) = tick.second.and_then(|s| out.get_mut(s as usize)) else {
            continue;
        };
        slot.rss_mib = processes
            .iter()
            .zip(&tick.rss_kb)
            .filter_map(|(p, r)| Some((p.name.clone(), *r.as_ref().ok()? as f64 / KIB_PER_MIB)))
            .collect();
        slot.settlement_queue_depth = tick.queue_depth;
        slot.webhook_backlog = tick.webhook_backlog;
    }
    out
}

fn fixed2(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |v| format!("{v:.2}"))
}

/// The unit figures are quoted in: per settled payment when there is one, else per request.
fn unit(per_request: Option<f64>, per_settled: Option<f64>) -> (Option<f64>, &'static str) {
    match per_settled {
        Some(v) => (Some(v), "per settled payment"),
        None => (per_request, "per request"),
    }
}

/// `1.02 per request (authorize 1.00, mark_settled 0.02)`, or for a settling scenario
/// `4.64 per settled payment (authorize 1.00, …; 4.65 per request)`: the breakdown by
/// operation in the first unit.
fn counter_line(figures: &CounterFigures) -> String {
    let ops = by_op(figures);
    match figures.per_settled {
        Some(v) => format!(
            "{v:.2} per settled payment ({}{} per request)",
            if ops.is_empty() {
                String::new()
            } else {
                format!("{ops}; ")
            },
            fixed2(figures.per_request)
        ),
        None if ops.is_empty() => format!("{} per request", fixed2(figures.per_request)),
        None => format!("{} per request ({ops})", fixed2(figures.per_request)),
    }
}

/// An operation below this many per unit is left out of the summary's breakdown (the JSON
/// has every one): background work (sweeps, scans) would otherwise crowd the line.
const SUMMARY_MIN_PER_UNIT: f64 = 0.005;

/// `(authorize 1.00, mark_settled 0.02)`, in the figure's unit.
fn by_op(figures: &CounterFigures) -> String {
    let (Some(per), _) = unit(figures.per_request, figures.per_settled) else {
        return String::new();
    };
    if figures.total == 0 || figures.by_op.is_empty() {
        return String::new();
    }
    let share = |n: u64| per * n as f64 / figures.total as f64;
    let mut parts: Vec<String> = figures
        .by_op
        .iter()
        .filter(|(_, &n)| share(n) >= SUMMARY_MIN_PER_UNIT)
        .map(|(op, &n)| {
            let op = if op.is_empty() { "-" } else { op };
            format!("{op} {:.2}", share(n))
        })
        .collect();
    let rest = figures
        .by_op
        .values()
        .filter(|&&n| share(n) < SUMMARY_MIN_PER_UNIT)
        .count();
    if rest > 0 {
        parts.push(format!("{rest} more below {SUMMARY_MIN_PER_UNIT}"));
    }
    parts.join(", ")
}

/// The summary's resource lines (after the CPU lines).
pub fn write_summary(
    out: &mut String,
    gateway: Option<&GatewayMetrics>,
    redis: Option<&RedisCommandStats>,
    rss: &[RssReport],
) {
    if gateway.is_some() || redis.is_some() {
        let mut line = String::from("redis round trips  ");
        match gateway {
            Some(GatewayMetrics {
                redis_round_trips: Some(rt),
                ..
            }) => {
                line.push_str(&counter_line(rt));
            }
            Some(GatewayMetrics { error: None, .. }) => {
                line.push_str("none counted (the gateway exports no gateway_redis_round_trips_total: no Redis balance store?)");
            }
            _ => line.push('-'),
        }
        if let Some(r) = redis {
            match r.error {
                None => {
                    let (script, unit_name) =
                        unit(r.script_calls_per_request, r.script_calls_per_settled);
                    let (total, _) = unit(r.total_calls_per_request, r.total_calls_per_settled);
                    let _ = write!(
                        line,
                        "  INFO evalsha+eval {} {unit_name}, all commands {}",
                        fixed2(script),
                        fixed2(total)
                    );
                }
                Some(_) => line.push_str("  INFO commandstats: failed (see warnings)"),
            }
        }
        let _ = writeln!(out, "{line}");
    }
    if let Some(g) = gateway {
        let mut line = String::from("store commits      ");
        match &g.store_commits {
            Some(c) => {
                line.push_str(&counter_line(c));
            }
            None if g.error.is_none() => {
                line.push_str("- (the gateway exports no gateway_store_commits_total)")
            }
            None => line.push('-'),
        }
        if let Some(b) = &g.settlement_batches {
            let _ = write!(
                line,
                "  (settlement rows per commit {}, {} commits)",
                b.rows_per_commit
                    .map_or("-".to_owned(), |v| format!("{v:.1}")),
                b.commits
            );
        }
        let _ = writeln!(out, "{line}");
    }
    for r in rss {
        let label = format!("rss {}", r.name);
        match (r.first_mib, r.last_mib, r.max_mib) {
            (Some(first), Some(last), Some(max)) => {
                let trend = match (r.growth, r.flat) {
                    (Some(g), Some(flat)) => format!(
                        ", {:+.1} %, {}",
                        g * 100.0,
                        if flat { "flat" } else { "NOT flat" }
                    ),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "{label:<18} {first:.1} → {last:.1} MiB (max {max:.1}{trend}; {} samples)",
                    r.samples
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "{label:<18} not measured: {}",
                    r.error.as_deref().unwrap_or("no sample")
                );
            }
        }
    }
    if let Some(g) = gateway {
        for (label, trend) in [
            ("settlement queue   depth", &g.settlement_queue_depth),
            ("webhook backlog    events", &g.webhook_backlog),
        ] {
            if let Some(t) = trend {
                let _ = writeln!(
                    out,
                    "{label} first {} last {} max {}{}",
                    t.first,
                    t.last,
                    t.max,
                    if t.grew {
                        "  (GREW over the window)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn growth_compares_the_first_and_last_tenths() {
        assert_eq!(tenth_means(&[]), None);
        assert_eq!(tenth_means(&[5.0]), Some((5.0, 5.0)));
        // 11 samples: two at each end (a tenth, rounded up).
        let values: Vec<f64> = (0..11).map(|i| 100.0 + i as f64).collect();
        assert_eq!(tenth_means(&values), Some((100.5, 109.5)));
        assert!(close(growth(&values).unwrap(), 9.0 / 100.5));
        assert!(is_flat(growth(&values).unwrap()));
        // 300 samples growing 40 %: not flat.
        let leak: Vec<f64> = (0..300).map(|i| 40.0 + 16.0 * i as f64 / 299.0).collect();
        let g = growth(&leak).unwrap();
        assert!(g > 0.3 && !is_flat(g), "{g}");
        // A spike in the middle does not make it grow; shrinking beyond the band is not flat.
        let mut spike = vec![40.0; 100];
        spike[50] = 400.0;
        assert_eq!(growth(&spike), Some(0.0));
        assert!(!is_flat(growth(&[50.0, 50.0, 30.0]).unwrap()));
        assert!(is_flat(0.1) && is_flat(-0.1) && !is_flat(0.1001));
        // Nothing to divide by.
        assert_eq!(growth(&[0.0, 3.0]), None);
    }

    #[test]
    fn a_queue_grew_only_by_both_bounds() {
        assert!(!queue_grew(0.0, 50.0));
        assert!(queue_grew(0.0, 51.0));
        assert!(!queue_grew(100.0, 190.0), "under twice");
        assert!(queue_grew(100.0, 201.0));
        assert!(!queue_grew(10.0, 20.5), "twice but not +50");
        let t = GaugeTrend::of(&[0.0, 3.0, 12.0, 0.0, 200.0]).unwrap();
        assert_eq!((t.first, t.last, t.min, t.max), (0.0, 200.0, 0.0, 200.0));
        assert!(t.grew);
        assert_eq!(GaugeTrend::of(&[]), None);
    }

    fn spec(name: &str, pid: u32) -> ProcessSpec {
        ProcessSpec {
            name: name.into(),
            pid: Some(pid),
        }
    }

    fn tick(second: Option<u32>, rss_kb: Vec<Result<u64, String>>, depth: Option<f64>) -> Tick {
        Tick {
            second,
            rss_kb,
            queue_depth: depth,
            webhook_backlog: None,
            scrape_error: None,
        }
    }

    #[test]
    fn rss_reports_and_series_come_from_the_ticks() {
        let processes = [spec("gateway", 10), spec("redis", 11)];
        let ticks = [
            tick(Some(0), vec![Ok(40 * 1024), Ok(8 * 1024)], Some(0.0)),
            tick(Some(1), vec![Ok(42 * 1024), Err("gone".into())], None),
            tick(None, vec![Ok(41 * 1024), Err("gone".into())], Some(3.0)),
        ];
        let rss = rss_reports(&processes, &ticks);
        assert_eq!(rss[0].samples, 3);
        assert_eq!(rss[0].first_mib, Some(40.0));
        assert_eq!(rss[0].last_mib, Some(41.0));
        assert_eq!(rss[0].max_mib, Some(42.0));
        assert_eq!(rss[0].min_mib, Some(40.0));
        assert!(close(rss[0].growth.unwrap(), 0.025));
        assert_eq!(rss[0].flat, Some(true));
        assert!(rss[0].error.is_none());
        assert_eq!(rss[1].samples, 1);
        assert_eq!(rss[1].error.as_deref(), Some("gone"));

        // The end sample belongs to no second; a second beyond the series is dropped.
        let series = per_second(&processes, &ticks, 2);
        assert_eq!(series[0].rss_mib["gateway"], 40.0);
        assert_eq!(series[0].rss_mib["redis"], 8.0);
        assert_eq!(series[0].settlement_queue_depth, Some(0.0));
        assert!(!series[1].rss_mib.contains_key("redis"));
        assert_eq!(series[1].settlement_queue_depth, None);
        assert_eq!(per_second(&processes, &ticks, 1).len(), 1);
    }

    #[test]
    fn gateway_figures_are_deltas_per_unit() {
        let before = Scrape::parse(
            "gateway_redis_round_trips_total{op=\"authorize\"} 1000\ngateway_settlement_batch_rows_sum 500\ngateway_settlement_batch_rows_count 50\n",
        );
        let after = Scrape::parse(
            "gateway_redis_round_trips_total{op=\"authorize\"} 1200\ngateway_redis_round_trips_total{op=\"mark_settled\"} 4\ngateway_settlement_batch_rows_sum 700\ngateway_settlement_batch_rows_count 58\n",
        );
        let samples = Samples {
            ticks: vec![
                tick(Some(0), vec![], Some(0.0)),
                tick(None, vec![], Some(12.0)),
            ],
            first_scrape: Some(Ok(before.clone())),
            last_scrape: Some(Ok(after)),
        };
        let units = Units {
            answered: 200,
            settled: None,
        };
        let uri: Uri = "http://127.0.0.1:1/metrics".parse().unwrap();
        let mut warnings = Vec::new();
        let g = gateway_metrics(&uri, &samples, units, &mut warnings);
        assert!(warnings.is_empty(), "{warnings:?}");
        let rt = g.redis_round_trips.as_ref().unwrap();
        assert_eq!(rt.total, 204);
        assert_eq!(rt.by_op["mark_settled"], 4);
        assert_eq!(rt.per_request, Some(1.02));
        assert_eq!(rt.per_settled, None);
        // Not exported: null, and no warning (the gateway may not have it yet).
        assert_eq!(g.store_commits, None);
        let b = g.settlement_batches.as_ref().unwrap();
        assert_eq!((b.commits, b.rows, b.rows_per_commit), (8, 200, Some(25.0)));
        assert_eq!(g.settlement_queue_depth.as_ref().unwrap().max, 12.0);
        assert_eq!(g.webhook_backlog, None);

        let mut summary = String::new();
        write_summary(&mut summary, Some(&g), None, &[]);
        assert!(
            summary.contains("1.02 per request (authorize 1.00, mark_settled 0.02)"),
            "{summary}"
        );
        assert!(summary.contains("rows per commit 25.0"), "{summary}");
        assert!(
            summary.contains("depth first 0 last 12 max 12"),
            "{summary}"
        );

        // A failed edge scrape: a warning and null deltas, never a failed run.
        let failed = Samples {
            first_scrape: Some(Err("GET …: connect: refused".into())),
            ..samples
        };
        let g = gateway_metrics(&uri, &failed, units, &mut warnings);
        assert!(g.error.is_some() && g.redis_round_trips.is_none());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn counter_lines_break_down_by_op_in_the_first_unit() {
        let figures = CounterFigures {
            total: 1_000,
            by_op: [
                ("authorize".to_owned(), 500),
                ("mark_settled".to_owned(), 498),
                ("sweep".to_owned(), 2),
            ]
            .into_iter()
            .collect(),
            per_request: Some(2.0),
            per_settled: Some(4.0),
        };
        assert_eq!(
            counter_line(&figures),
            "4.00 per settled payment (authorize 2.00, mark_settled 1.99, sweep 0.01; 2.00 per request)"
        );
        let figures = CounterFigures {
            per_settled: None,
            by_op: [("authorize".to_owned(), 999), ("sweep".to_owned(), 1)]
                .into_iter()
                .collect(),
            ..figures
        };
        assert_eq!(
            counter_line(&figures),
            "2.00 per request (authorize 2.00, 1 more below 0.005)"
        );
    }

    #[test]
    fn redis_figures_are_per_settled_payment_when_there_is_one() {
        let before = CommandStats::parse("cmdstat_evalsha:calls=100,usec=1\r\n");
        let after = CommandStats::parse(
            "cmdstat_evalsha:calls=300,usec=1\r\ncmdstat_hset:calls=400,usec=1\r\ncmdstat_info:calls=1,usec=1\r\n",
        );
        let units = Units {
            answered: 100,
            settled: Some(50),
        };
        let mut warnings = Vec::new();
        let addr: SocketAddr = "127.0.0.1:6379".parse().unwrap();
        let r = redis_commandstats(addr, Ok(before.clone()), Ok(after), units, &mut warnings);
        assert_eq!(r.script_calls, Some(200));
        assert_eq!(r.script_calls_per_request, Some(2.0));
        assert_eq!(r.script_calls_per_settled, Some(4.0));
        assert_eq!(r.total_calls, Some(600));
        assert_eq!(r.total_calls_per_settled, Some(12.0));
        let mut summary = String::new();
        write_summary(&mut summary, None, Some(&r), &[]);
        assert!(
            summary.contains("INFO evalsha+eval 4.00 per settled payment, all commands 12.00"),
            "{summary}"
        );
        let r = redis_commandstats(
            addr,
            Err("refused".into()),
            Ok(before),
            units,
            &mut warnings,
        );
        assert_eq!(r.script_calls, None);
        assert_eq!(warnings.len(), 1);
    }
}
