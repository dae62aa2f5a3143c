//! The report of a run: the JSON document (`--out`) and the human summary (stdout).
//!
//! Counts add up by construction and are checked where the report is made:
//! `scheduled = sent + missed` and `sent = answered + errors + timeouts`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::failover::{FailoverReport, PhaseReport};
use crate::histogram::{ms, Percentiles};
use crate::procstat::ProcessCpu;
use crate::recorder::Counts;
use crate::resources::{GatewayMetrics, RedisCommandStats, RssReport};
use crate::schedule::Missed;
use crate::settle::SettlementReport;
use crate::Error;

/// Requests of the measured window, by fate.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RequestCounts {
    /// Intended in the window: `sent + missed`.
    pub scheduled: u64,
    /// Left the generator: `answered + errors + timeouts`.
    pub sent: u64,
    /// Answered as the operation expects (`201`).
    pub answered: u64,
    /// Answered otherwise, or no HTTP answer (see `errors_by_code`).
    pub errors: u64,
    /// No complete answer within the request timeout.
    pub timeouts: u64,
    /// Never sent: no in-flight permit within `max_send_lag`, or the generator too late.
    pub missed: Missed,
    /// `"<status> <code>"` (or `"transport <kind>"`) → how many.
    pub errors_by_code: BTreeMap<String, u64>,
}

impl RequestCounts {
    pub fn new(counts: &Counts, missed: Missed) -> Self {
        Self {
            scheduled: counts.sent + missed.total(),
            sent: counts.sent,
            answered: counts.answered,
            errors: counts.errors,
            timeouts: counts.timeouts,
            missed,
            errors_by_code: counts.errors_by_key.clone(),
        }
    }

    /// `scheduled = sent + missed`, `sent = answered + errors + timeouts`, and the errors by
    /// code sum to the errors.
    pub fn adds_up(&self) -> bool {
        self.scheduled == self.sent + self.missed.total()
            && self.sent == self.answered + self.errors + self.timeouts
            && self.errors == self.errors_by_code.values().sum::<u64>()
    }
}

/// One operation's share of the window.
#[derive(Debug, Clone, Serialize)]
pub struct OperationReport {
    pub sent: u64,
    pub answered: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub corrected: Percentiles,
}

/// Latency distributions of the expected answers in the window.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// From each request's intended send time (what a client on schedule sees).
    pub corrected: Percentiles,
    /// From its actual send (what a closed-loop tool would report).
    pub uncorrected: Percentiles,
    /// Intended → actual send: the generator's own delay.
    pub send_lag: Percentiles,
}

/// One second of the measured window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SecondPoint {
    pub second: u32,
    /// Expected answers that arrived in this second.
    pub answered: u64,
    /// Errors and timeouts that arrived in this second.
    pub errors: u64,
    /// Settlements acknowledged in this second (settling scenarios).
    pub settled: Option<f64>,
    /// Corrected latency of the requests intended in this second (none answered: `null`).
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// RSS of each `--pid` process at the start of this second, MiB (empty: none measured).
    pub rss_mib: BTreeMap<String, f64>,
    /// The gateway's `gateway_settlement_queue_depth` at the start of this second (`null`:
    /// not the gateway, or not scraped).
    pub settlement_queue_depth: Option<f64>,
    /// The gateway's `gateway_webhook_backlog` at the start of this second.
    pub webhook_backlog: Option<f64>,
}

/// Throughput over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Answered requests (of those intended in the window) per second of the window.
    pub answered_per_second: f64,
    /// Settlements acknowledged in the window per second (settling scenarios).
    pub settled_per_second: Option<f64>,
}

/// What the run was asked to do.
#[derive(Debug, Clone, Serialize)]
pub struct RunEcho {
    pub scenario: String,
    pub target: String,
    /// The channel kind the run's checkouts paid through (`supplier`, `alipay`,
    /// `wechatpay`); `null` when the scenario has no checkout.
    pub checkout_method: Option<String>,
    pub rate_per_second: f64,
    pub warmup_seconds: f64,
    pub duration_seconds: f64,
    pub connections: usize,
    pub max_send_lag_ms: u64,
    pub request_timeout_ms: u64,
    pub accounts: usize,
    pub generator_threads: usize,
    /// The prefix of every order id and idempotency key of the run.
    pub run_id: String,
    /// Wall clock (Unix ms) at the start of the measured window.
    pub window_start_unix_ms: u64,
}

/// The report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run: RunEcho,
    pub requests: RequestCounts,
    /// Warm-up requests (not measured): sent, answered, errors, timeouts, missed.
    pub warmup: RequestCounts,
    pub throughput: Throughput,
    pub latency: Latency,
    pub operations: BTreeMap<String, OperationReport>,
    pub settlement: Option<SettlementReport>,
    pub cpu: Vec<ProcessCpu>,
    /// The gateway's counters over the window, per unit (gateway target only).
    pub gateway_metrics: Option<GatewayMetrics>,
    /// Redis's own command counts over the window (`--redis-addr`, gateway target only).
    pub redis_commandstats: Option<RedisCommandStats>,
    /// Resident memory of each `--pid` process over the window.
    pub rss: Vec<RssReport>,
    pub series: Vec<SecondPoint>,
    /// The outage and what it did (failover runs).
    pub failover: Option<FailoverReport>,
    /// The generator itself may have been the limit: its figures are then not the target's.
    pub generator_bottleneck: bool,
    pub warnings: Vec<String>,
}

impl Report {
    /// Checks the report's arithmetic (a failure is a bug of this tool).
    pub fn assert_consistent(&self) {
        assert!(
            self.requests.adds_up(),
            "measured counts: {:?}",
            self.requests
        );
        assert!(self.warmup.adds_up(), "warm-up counts: {:?}", self.warmup);
        let by_operation: u64 = self.operations.values().map(|o| o.sent).sum();
        assert_eq!(by_operation, self.requests.sent, "operations' sends");
        if let Some(f) = &self.failover {
            let p = &f.phases;
            assert_eq!(
                p.before.sent + p.during.sent + p.after.sent,
                self.requests.sent,
                "the phases' sends"
            );
            assert_eq!(
                p.before.errors + p.during.errors + p.after.errors,
                self.requests.errors,
                "the phases' errors"
            );
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), Error> {
        let mut text = serde_json::to_vec_pretty(self).expect("a report serializes");
        text.push(b'\n');
        std::fs::write(path, text).map_err(|source| Error::Output {
            path: path.to_owned(),
            source,
        })
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let r = &self.run;
        let _ = writeln!(
            out,
            "loadtest {}{} against the {}: {} req/s for {} s after {} s warm-up, {} connections, {} accounts (run {})",
            r.scenario,
            r.checkout_method
                .as_deref()
                .map(|m| format!(" (checkout through {m})"))
                .unwrap_or_default(),
            r.target, r.rate_per_second, r.duration_seconds, r.warmup_seconds,
            r.connections, r.accounts, r.run_id
        );
        let q = &self.requests;
        let _ = writeln!(
            out,
            "requests   scheduled {}  sent {}  answered {}  errors {}  timeouts {}  missed {} (in flight full {}, generator late {})",
            q.scheduled, q.sent, q.answered, q.errors, q.timeouts, q.missed.total(),
            q.missed.in_flight_full, q.missed.generator_late
        );
        for (code, count) in &q.errors_by_code {
            let _ = writeln!(out, "  error    {count:>8}  {code}");
        }
        let _ = write!(
            out,
            "throughput {:.1} answered/s",
            self.throughput.answered_per_second
        );
        if let Some(settled) = self.throughput.settled_per_second {
            let _ = write!(out, "  {settled:.1} settled/s");
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "latency ms       p50      p90      p99    p99.9      max    (of {} answers)",
            self.latency.corrected.count
        );
        for (name, p) in [
            ("corrected", &self.latency.corrected),
            ("uncorrected", &self.latency.uncorrected),
            ("send lag", &self.latency.send_lag),
        ] {
            let _ = writeln!(out, "  {name:<12}{}", row(p));
        }
        if self.operations.len() > 1 {
            for (name, op) in &self.operations {
                let _ = writeln!(
                    out,
                    "  {name:<12}{}   sent {} errors {} timeouts {}",
                    row(&op.corrected),
                    op.sent,
                    op.errors,
                    op.timeouts
                );
            }
        }
        if let Some(s) = &self.settlement {
            let _ = writeln!(
                out,
                "settlement tracked {} (checked {})  settled {}  unsettled {}  closed {}  missing {}  paid twice {}",
                s.tracked, s.checked, s.settled, s.unsettled, s.closed, s.missing, s.paid_twice
            );
            let _ = writeln!(out, "  callback→ack{}", row(&s.callback_to_ack));
            let _ = writeln!(out, "  create→ack  {}", row(&s.create_to_ack));
            let _ = writeln!(
                out,
                "  verified against the gateway: {} ({} disagree)",
                s.verified, s.verify_failures
            );
            for example in &s.verify_examples {
                let _ = writeln!(out, "    {example}");
            }
        }
        if let Some(f) = &self.failover {
            failover_summary(&mut out, f, self.run.window_start_unix_ms);
        }
        for cpu in &self.cpu {
            let who = match cpu.pid {
                Some(pid) => format!("{} ({pid})", cpu.name),
                None => format!("{} (self)", cpu.name),
            };
            match &cpu.error {
                Some(e) => {
                    let _ = writeln!(out, "cpu {who}: not measured: {e}");
                }
                None => {
                    let head = format!("cpu {who:<24} {:.2} cores ", cpu.cores);
                    cpu_line(&mut out, &head, cpu.us_per_request, cpu.us_per_settled);
                    // By thread name, when the process has more than one.
                    if cpu.threads.len() > 1 {
                        for t in &cpu.threads {
                            let head = format!("    thread {:<20}", t.name);
                            cpu_line(&mut out, &head, t.us_per_request, t.us_per_settled);
                        }
                    }
                }
            }
        }
        crate::resources::write_summary(
            &mut out,
            self.gateway_metrics.as_ref(),
            self.redis_commandstats.as_ref(),
            &self.rss,
        );
        for warning in &self.warnings {
            let _ = writeln!(out, "WARNING: {warning}");
        }
        out
    }
}

fn failover_summary(out: &mut String, f: &FailoverReport, window_start_unix_ms: u64) {
    // Offsets in the window, to read against the plan: the injection's own delay shows.
    let offset = |t: u64| {
        format!(
            "at {:+.3} s",
            (t as f64 - window_start_unix_ms as f64) / 1_000.0
        )
    };
    let _ = writeln!(
        out,
        "failover   {} down {} s into the window for {} s (started {}, lifted {})",
        f.channel,
        f.outage_after_seconds,
        f.outage_for_seconds,
        f.injection
            .started_unix_ms
            .map_or("never".to_owned(), offset),
        f.injection
            .lifted_unix_ms
            .map_or("NEVER: lift it by hand".to_owned(), offset),
    );
    for error in &f.injection.errors {
        let _ = writeln!(out, "  injection error: {error}");
    }
    let phases: [(&str, &PhaseReport); 3] = [
        ("before", &f.phases.before),
        ("during", &f.phases.during),
        ("after", &f.phases.after),
    ];
    for (name, p) in phases {
        let accepted: Vec<String> = p
            .accepted_by_channel
            .iter()
            .map(|(channel, n)| format!("{channel} {n}"))
            .collect();
        let errors: Vec<String> = p
            .errors_by_code
            .iter()
            .map(|(code, n)| format!("{code} ×{n}"))
            .collect();
        let _ = writeln!(
            out,
            "  {name:<7} sent {}  answered {}  errors {}  timeouts {}  p99 {} ms  201 by channel: {}{}",
            p.sent,
            p.answered,
            p.errors,
            p.timeouts,
            ms(p.corrected.p99_us),
            if accepted.is_empty() { "-".to_owned() } else { accepted.join(", ") },
            if errors.is_empty() {
                String::new()
            } else {
                format!("  errors: {}", errors.join(", "))
            }
        );
    }
    for (channel, c) in &f.sim_orders {
        let _ = writeln!(
            out,
            "  channel-sim orders on {channel:<16} before {}  during {}  after {}",
            c.before, c.during, c.after
        );
    }
    if let Some(e) = &f.sim_orders_error {
        let _ = writeln!(out, "  channel-sim orders not counted: {e}");
    }
    let _ = writeln!(
        out,
        "  traffic moved off {} during the outage: {}; undocumented errors: {}",
        f.channel,
        if f.traffic_moved { "yes" } else { "NO" },
        f.undocumented_errors
    );
}

fn row(p: &Percentiles) -> String {
    format!(
        "{:>9}{:>9}{:>9}{:>9}{:>9}",
        ms(p.p50_us),
        ms(p.p90_us),
        ms(p.p99_us),
        ms(p.p999_us),
        ms(p.max_us)
    )
}

/// `head`, then the CPU per request (`-` when nothing was answered) and per settled payment
/// when there is one, and a newline.
fn cpu_line(out: &mut String, head: &str, per_request: Option<f64>, per_settled: Option<f64>) {
    use std::fmt::Write as _;
    let per_request = per_request.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let _ = write!(out, "{head} {per_request} µs/request");
    if let Some(v) = per_settled {
        let _ = write!(out, "  {v:.0} µs/settled");
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up() {
        let counts = Counts {
            sent: 10,
            answered: 7,
            errors: 2,
            timeouts: 1,
            errors_by_key: [
                ("402 insufficient_funds".to_owned(), 1),
                ("transport io".to_owned(), 1),
            ]
            .into_iter()
            .collect(),
        };
        let missed = Missed {
            in_flight_full: 3,
            generator_late: 1,
        };
        let requests = RequestCounts::new(&counts, missed);
        assert_eq!(requests.scheduled, 14);
        assert!(requests.adds_up());

        let mut broken = requests.clone();
        broken.answered += 1;
        assert!(!broken.adds_up());
        let mut broken = requests.clone();
        broken.errors_by_code.insert("500 -".into(), 1);
        assert!(!broken.adds_up());
        let mut broken = requests;
        broken.scheduled += 1;
        assert!(!broken.adds_up());
    }
}
