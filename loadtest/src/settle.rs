//! Settlement: which of the run's channel payments settled, when, and whether the gateway's
//! view agrees with the channel's.
//!
//! A channel payment (checkout, top-up) is created `pending`; channel-sim pays it after its
//! auto-pay delay and calls the gateway back, and the gateway acknowledges the callback only
//! once the settlement is committed (DESIGN.md §7). So channel-sim's record of each order
//! holds the two instants that matter: `paid_at` (the callback leaves) and the acknowledged
//! callback's time (the settlement is committed). They are read *after* the run, from
//! channel-sim's admin API (`GET {sim_admin_url}/orders/{channel_order_id}`), which costs the
//! gateway nothing while it is measured — polling `GET /v1/payments/{id}` during the run
//! would add load to the very thing being measured, and could only see `succeeded` to the
//! polling interval's resolution.
//!
//! - **settled/s** is the number of acknowledged settlements whose acknowledgement falls in
//!   the measured window, divided by its length (warm-up payments settling in the window
//!   count: it is the gateway's settlement throughput in that window);
//! - **callback → ack** (channel-sim's paid → acknowledged) is the settlement lag of
//!   DESIGN.md §7: callback verification, capture, commit, acknowledgement;
//! - **create → ack** is from the `201` the generator saw to the acknowledgement (it includes
//!   the sandbox's auto-pay delay);
//! - when more than `sample_max` payments were created, an evenly spaced sample is looked up
//!   and the counts of the report are the sample's (`checked` says how many), with settled/s
//!   scaled to the whole;
//! - **verification**: for up to `verify_max` settled payments, `GET /v1/payments/{id}` must
//!   answer `succeeded` with the run's amount and the attempt channel-sim paid, and
//!   channel-sim must have paid the order exactly once for that amount.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::client::HttpClient;
use crate::histogram::{LatencyHistogram, Percentiles};
use crate::scenario::Operation;
use crate::schedule::Phase;
use crate::target::{format_minor, Target, AMOUNT_MINOR};

/// A channel payment the run created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    pub payment_id: String,
    pub channel_order_id: String,
    pub operation: Operation,
    /// Wall clock when its `201` was complete.
    pub created_unix_ms: u64,
    pub phase: Phase,
}

/// How settlement is followed after a run.
#[derive(Debug, Clone)]
pub struct SettleSettings {
    /// How long to wait, after the last answer, for every payment to settle.
    pub wait: Duration,
    /// Pause between two rounds of look-ups of the payments not settled yet.
    pub poll_interval: Duration,
    /// The most payments looked up at channel-sim (an even sample beyond).
    pub sample_max: usize,
    /// The most settled payments checked against the gateway's `GET /v1/payments/{id}`.
    pub verify_max: usize,
    /// Look-ups in flight at once.
    pub concurrency: usize,
}

impl Default for SettleSettings {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
            sample_max: 20_000,
            verify_max: 200,
            concurrency: 16,
        }
    }
}

/// What became of the run's channel payments.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SettlementReport {
    /// Channel payments created (warm-up included).
    pub tracked: u64,
    /// Created past the tracking bound, not followed.
    pub untracked: u64,
    /// Looked up at channel-sim: all tracked, or an even sample of them.
    pub checked: u64,
    /// Of `checked`: paid once and the callback acknowledged (the settlement committed).
    pub settled: u64,
    /// Of `checked`: not settled when the wait ended.
    pub unsettled: u64,
    /// Of `checked`: closed by the channel unpaid.
    pub closed: u64,
    /// Of `checked`: unknown to channel-sim.
    pub missing: u64,
    /// Of `checked`: paid more than once (must never happen).
    pub paid_twice: u64,
    /// Of `settled`: acknowledged inside the measured window.
    pub settled_in_window: u64,
    /// Settlements acknowledged per second of the measured window, scaled from the sample
    /// to every tracked payment.
    pub settled_per_second: f64,
    /// channel-sim paid → callback acknowledged: the settlement lag (ms resolution).
    pub callback_to_ack: Percentiles,
    /// `201` seen by the generator → callback acknowledged (includes the auto-pay delay).
    pub create_to_ack: Percentiles,
    /// Settled payments checked against the gateway.
    pub verified: u64,
    /// Of `verified`: the gateway or channel-sim disagreed with the run.
    pub verify_failures: u64,
    /// The first few disagreements, described.
    pub verify_examples: Vec<String>,
    /// Settlements acknowledged in each second of the measured window (scaled).
    pub per_second: Vec<f64>,
    /// Look-ups that failed (channel-sim unreachable or answering oddly) on the last round.
    pub lookup_errors: u64,
}

/// How many disagreements are described in the report.
const MAX_EXAMPLES: usize = 10;

/// The slice of a channel-sim order record this module reads.
#[derive(Debug, Clone, Deserialize)]
struct SimOrder {
    status: String,
    amount_cents: u64,
    paid_at_unix_ms: Option<u64>,
    pay_count: u32,
    #[serde(default)]
    callbacks: Vec<SimCallback>,
}

#[derive(Debug, Clone, Deserialize)]
struct SimCallback {
    acknowledged: bool,
    at_unix_ms: u64,
}

#[derive(Debug, Clone)]
enum State {
    Settled {
        paid_at_unix_ms: u64,
        acknowledged_at_unix_ms: u64,
        order: SimOrder,
    },
    /// Unpaid, or paid and not acknowledged yet.
    Pending,
    Closed,
    Missing,
    LookupFailed,
}

fn classify(order: SimOrder) -> State {
    if order.status == "closed" {
        return State::Closed;
    }
    let acknowledged = order
        .callbacks
        .iter()
        .filter(|c| c.acknowledged)
        .map(|c| c.at_unix_ms)
        .min();
    match (order.status.as_str(), order.paid_at_unix_ms, acknowledged) {
        ("paid", Some(paid), Some(acked)) => State::Settled {
            paid_at_unix_ms: paid,
            acknowledged_at_unix_ms: acked,
            order,
        },
        _ => State::Pending,
    }
}

/// An even sample of at most `max` of `len` indexes (all when `len <= max`).
pub fn sample_indexes(len: usize, max: usize) -> Vec<usize> {
    if len <= max {
        return (0..len).collect();
    }
    if max == 0 {
        return Vec::new();
    }
    (0..max).map(|i| i * len / max).collect()
}

/// Runs `f` on every item, at most `limit` at once; results in the items' order.
async fn map_bounded<T, R, F, Fut>(items: Vec<T>, limit: usize, f: F) -> Vec<R>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let count = items.len();
    let mut results: Vec<Option<R>> = (0..count).map(|_| None).collect();
    let mut tasks = JoinSet::new();
    for (index, item) in items.into_iter().enumerate() {
        if tasks.len() >= limit.max(1) {
            let (i, r) = tasks.join_next().await.expect("running").expect("no panic");
            results[i] = Some(r);
        }
        let future = f(item);
        tasks.spawn(async move { (index, future.await) });
    }
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined.expect("a look-up does not panic");
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.expect("every item ran"))
        .collect()
}

async fn look_up(client: HttpClient, sim_admin_url: Arc<str>, channel_order_id: String) -> State {
    let request = Request::builder()
        .method(Method::GET)
        .uri(format!("{sim_admin_url}/orders/{channel_order_id}"))
        .body(Full::new(Bytes::new()))
        .expect("a request of valid parts");
    match client.send(request).await {
        Ok(answer) if answer.status == StatusCode::OK => {
            match serde_json::from_slice::<SimOrder>(&answer.body) {
                Ok(order) => classify(order),
                Err(_) => State::LookupFailed,
            }
        }
        Ok(answer) if answer.status == StatusCode::NOT_FOUND => State::Missing,
        _ => State::LookupFailed,
    }
}

/// Follows `tracked` until each settled or `settings.wait` passed, then reports.
/// `window_unix_ms`: the measured window on the wall clock.
pub async fn follow(
    client: &HttpClient,
    target: &Target,
    tracked: &[Tracked],
    untracked: u64,
    window_unix_ms: (u64, u64),
    settings: &SettleSettings,
) -> SettlementReport {
    let mut report = SettlementReport {
        tracked: tracked.len() as u64,
        untracked,
        ..SettlementReport::default()
    };
    let Some(sim_admin_url) = target.sim_admin_url() else {
        return report;
    };
    let sim_admin_url: Arc<str> = Arc::from(sim_admin_url);
    let sample = sample_indexes(tracked.len(), settings.sample_max);
    report.checked = sample.len() as u64;

    let deadline = tokio::time::Instant::now() + settings.wait;
    let mut states: Vec<State> = vec![State::Pending; sample.len()];
    let mut pending: Vec<usize> = (0..sample.len()).collect();
    loop {
        let ids: Vec<(usize, String)> = pending
            .iter()
            .map(|&i| (i, tracked[sample[i]].channel_order_id.clone()))
            .collect();
        let found = map_bounded(ids, settings.concurrency, |(i, id)| {
            let (client, url) = (client.clone(), Arc::clone(&sim_admin_url));
            async move { (i, look_up(client, url, id).await) }
        })
        .await;
        pending.clear();
        for (i, state) in found {
            if matches!(state, State::Pending | State::LookupFailed) {
                pending.push(i);
            }
            states[i] = state;
        }
        if pending.is_empty() || tokio::time::Instant::now() + settings.poll_interval > deadline {
            break;
        }
        tokio::time::sleep(settings.poll_interval).await;
    }

    let (window_from, window_to) = window_unix_ms;
    let window_seconds = (window_to.saturating_sub(window_from)) as f64 / 1_000.0;
    let scale = if sample.is_empty() {
        0.0
    } else {
        tracked.len() as f64 / sample.len() as f64
    };
    let buckets = window_to.saturating_sub(window_from).div_ceil(1_000) as usize;
    report.per_second = vec![0.0; buckets];
    let mut callback_lag = LatencyHistogram::new();
    let mut create_lag = LatencyHistogram::new();
    let mut settled: Vec<(usize, SimOrder)> = Vec::new();
    for (i, state) in states.into_iter().enumerate() {
        match state {
            State::Settled {
                paid_at_unix_ms,
                acknowledged_at_unix_ms,
                order,
            } => {
                report.settled += 1;
                if order.pay_count > 1 {
                    report.paid_twice += 1;
                }
                let created = tracked[sample[i]].created_unix_ms;
                callback_lag
                    .record_us(acknowledged_at_unix_ms.saturating_sub(paid_at_unix_ms) * 1_000);
                create_lag.record_us(acknowledged_at_unix_ms.saturating_sub(created) * 1_000);
                if (window_from..window_to).contains(&acknowledged_at_unix_ms) {
                    report.settled_in_window += 1;
                    let bucket = ((acknowledged_at_unix_ms - window_from) / 1_000) as usize;
                    if let Some(b) = report.per_second.get_mut(bucket) {
                        *b += scale;
                    }
                }
                settled.push((sample[i], order));
            }
            State::Pending => report.unsettled += 1,
            State::LookupFailed => {
                report.unsettled += 1;
                report.lookup_errors += 1;
            }
            State::Closed => report.closed += 1,
            State::Missing => report.missing += 1,
        }
    }
    report.callback_to_ack = callback_lag.percentiles();
    report.create_to_ack = create_lag.percentiles();
    if window_seconds > 0.0 {
        report.settled_per_second = report.settled_in_window as f64 * scale / window_seconds;
    }

    // The gateway's view of an even sample of the settled payments.
    let to_verify: Vec<(Tracked, SimOrder)> = sample_indexes(settled.len(), settings.verify_max)
        .into_iter()
        .map(|i| (tracked[settled[i].0].clone(), settled[i].1.clone()))
        .collect();
    report.verified = to_verify.len() as u64;
    let problems = map_bounded(to_verify, settings.concurrency, |(payment, order)| {
        let client = client.clone();
        let request = target.payment_request(&payment.payment_id);
        async move { verify(client, request, &payment, &order).await }
    })
    .await;
    for problem in problems.into_iter().flatten() {
        report.verify_failures += 1;
        if report.verify_examples.len() < MAX_EXAMPLES {
            report.verify_examples.push(problem);
        }
    }
    report
}

/// The slice of the gateway's payment this module reads.
#[derive(Debug, Deserialize)]
struct GatewayPayment {
    status: String,
    amount: String,
    #[serde(default)]
    attempts: Vec<GatewayAttempt>,
}

#[derive(Debug, Deserialize)]
struct GatewayAttempt {
    channel_order_id: String,
}

/// `None` when the gateway and channel-sim agree with the run about `payment`.
async fn verify(
    client: HttpClient,
    request: Option<Request<Full<Bytes>>>,
    payment: &Tracked,
    order: &SimOrder,
) -> Option<String> {
    let id = &payment.payment_id;
    let expected_amount = format_minor(AMOUNT_MINOR);
    if order.pay_count != 1 || i64::try_from(order.amount_cents).ok() != Some(AMOUNT_MINOR) {
        return Some(format!(
            "{id}: channel-sim paid order {} {} time(s) for {} cents, expected once for {AMOUNT_MINOR}",
            payment.channel_order_id, order.pay_count, order.amount_cents
        ));
    }
    let request = request?;
    let answer = match client.send(request).await {
        Ok(answer) => answer,
        Err(e) => return Some(format!("{id}: GET failed: {e:?}")),
    };
    if answer.status != StatusCode::OK {
        return Some(format!("{id}: GET answered {}", answer.status));
    }
    let seen: GatewayPayment = match serde_json::from_slice(&answer.body) {
        Ok(seen) => seen,
        Err(e) => return Some(format!("{id}: unreadable payment: {e}")),
    };
    if seen.status != "succeeded" {
        return Some(format!(
            "{id}: the gateway says {}, channel-sim paid and was acknowledged",
            seen.status
        ));
    }
    if seen.amount != expected_amount {
        return Some(format!(
            "{id}: amount {} instead of {expected_amount}",
            seen.amount
        ));
    }
    if !seen
        .attempts
        .iter()
        .any(|a| a.channel_order_id == payment.channel_order_id)
    {
        return Some(format!(
            "{id}: no attempt with channel order {}",
            payment.channel_order_id
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_even_and_bounded() {
        assert_eq!(sample_indexes(3, 10), vec![0, 1, 2]);
        assert_eq!(sample_indexes(10, 5), vec![0, 2, 4, 6, 8]);
        assert_eq!(sample_indexes(10, 0), Vec::<usize>::new());
        let s = sample_indexes(1_000_003, 1_000);
        assert_eq!(s.len(), 1_000);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(*s.last().unwrap() < 1_000_003);
    }

    fn order(status: &str, paid: Option<u64>, callbacks: &[(bool, u64)]) -> SimOrder {
        SimOrder {
            status: status.into(),
            amount_cents: 100,
            paid_at_unix_ms: paid,
            pay_count: u32::from(paid.is_some()),
            callbacks: callbacks
                .iter()
                .map(|&(acknowledged, at_unix_ms)| SimCallback {
                    acknowledged,
                    at_unix_ms,
                })
                .collect(),
        }
    }

    #[test]
    fn an_order_is_settled_once_its_callback_is_acknowledged() {
        assert!(matches!(
            classify(order("unpaid", None, &[])),
            State::Pending
        ));
        assert!(matches!(
            classify(order("paid", Some(10), &[])),
            State::Pending
        ));
        assert!(matches!(
            classify(order("paid", Some(10), &[(false, 20)])),
            State::Pending
        ));
        match classify(order(
            "paid",
            Some(10),
            &[(false, 20), (true, 45), (true, 60)],
        )) {
            State::Settled {
                paid_at_unix_ms,
                acknowledged_at_unix_ms,
                ..
            } => assert_eq!((paid_at_unix_ms, acknowledged_at_unix_ms), (10, 45)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(order("closed", None, &[])),
            State::Closed
        ));
    }

    #[test]
    fn channel_sim_records_parse() {
        let text = r#"{"channel_id":"supplier-main","kind":"supplier","channel_order_id":"x",
            "channel_trade_no":"t","amount_cents":100,"currency":"CNY","notify_url":"u",
            "status":"paid","close_reason":null,"scanned":true,"expires_at_unix_seconds":1,
            "created_at_unix_ms":1,"paid_at_unix_ms":2,"closed_at_unix_ms":null,
            "create_requests":1,"pay_count":1,"refunded_cents":0,"refunds":[],
            "callbacks":[{"event":"succeeded","attempt":1,"status":200,"acknowledged":true,
            "error":null,"duplicate":false,"at_unix_ms":3}],"code_url":null}"#;
        let order: SimOrder = serde_json::from_str(text).unwrap();
        assert!(matches!(classify(order), State::Settled { .. }));
    }
}
