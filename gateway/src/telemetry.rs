//! Telemetry: tracing set-up, the Prometheus recorder, and every metric name in one place.
//! Names carry the `gateway_` prefix and base units; labels are low-cardinality (route,
//! status, outcome, operation), never a merchant, account or payment id.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::TelemetrySettings;

pub const HTTP_REQUESTS_TOTAL: &str = "gateway_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "gateway_http_request_duration_seconds";
pub const HTTP_REQUESTS_SHED_TOTAL: &str = "gateway_http_requests_shed_total";
pub const HTTP_CONNECTIONS_OPEN: &str = "gateway_http_connections_open";
pub const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "gateway_http_connections_refused_total";
pub const HTTP_CONNECTION_TIMEOUTS_TOTAL: &str = "gateway_http_connection_timeouts_total";
pub const HTTP_BODIES_REFUSED_TOTAL: &str = "gateway_http_bodies_refused_total";
pub const PREAUTH_TOTAL: &str = "gateway_preauth_total";
pub const ADJUSTMENTS_TOTAL: &str = "gateway_adjustments_total";
pub const REDIS_ROUND_TRIPS_TOTAL: &str = "gateway_redis_round_trips_total";
pub const STORE_ERRORS_TOTAL: &str = "gateway_balance_store_errors_total";
pub const HOLDS_SWEPT_TOTAL: &str = "gateway_holds_swept_total";
pub const SETTLEMENT_STORE_CALL_SECONDS: &str = "gateway_settlement_store_call_seconds";
pub const STORE_COMMITS_TOTAL: &str = "gateway_store_commits_total";
pub const SETTLEMENT_QUEUE_DEPTH: &str = "gateway_settlement_queue_depth";
pub const SETTLEMENT_BATCH_ROWS: &str = "gateway_settlement_batch_rows";
pub const SETTLEMENT_COMMIT_SECONDS: &str = "gateway_settlement_commit_seconds";
pub const SETTLEMENT_COMMITS_TOTAL: &str = "gateway_settlement_commits_total";
pub const SQLITE_WAL_BYTES_TOTAL: &str = "gateway_sqlite_wal_bytes_total";
pub const SETTLEMENT_CONFLICTS_TOTAL: &str = "gateway_settlement_conflicts_total";
pub const ACCOUNTS_REBUILT_TOTAL: &str = "gateway_accounts_rebuilt_total";
pub const STORE_REFUSED_PAYMENTS_TOTAL: &str = "gateway_store_refused_payments_total";
pub const BREAKER_TRANSITIONS_TOTAL: &str = "gateway_breaker_transitions_total";
pub const BREAKER_STATE: &str = "gateway_breaker_state";
pub const CHANNEL_CALLS_TOTAL: &str = "gateway_channel_calls_total";
pub const RESOLUTIONS_TOTAL: &str = "gateway_resolutions_total";
pub const ROUTING_TOTAL: &str = "gateway_routing_total";
pub const CALLBACKS_TOTAL: &str = "gateway_callbacks_total";
pub const CHANNEL_HTTP_REQUESTS_TOTAL: &str = "gateway_channel_http_requests_total";
pub const CHANNEL_HTTP_SECONDS: &str = "gateway_channel_http_request_duration_seconds";
pub const REFUNDS_TOTAL: &str = "gateway_refunds_total";
pub const UNSETTLED_RECORDS: &str = "gateway_unsettled_records";
pub const FLAGGED_PAYMENTS: &str = "gateway_flagged_payments";

/// Latency buckets for every `_seconds` histogram: 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle (several
/// gateways in one process, as in tests, share it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed by an embedding program; then ours
            // still renders what was recorded through it (nothing), which is the honest answer.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            // Handles only once a recorder is installed: taken before, they would record
            // nowhere for good.
            let _ = HOT.set(Hot::new());
            handle
        })
        .clone()
}

/// The handles of the metrics recorded on every request or payment, resolved once.
/// `metrics::counter!(name, labels)` builds its key (label strings copied) and looks it up in
/// the registry on every call; a kept handle is one atomic add. Labelled ones are registered on
/// first use (a series appears in `/metrics` when it is first recorded, as before) and kept;
/// their label values are low-cardinality by rule (static strings, route patterns, HTTP
/// statuses), which bounds each map.
struct Hot {
    preauth: Handles<&'static str, Counter>,
    redis_round_trips: Handles<&'static str, Counter>,
    /// By route pattern: the latency histogram, and the counters by method and status.
    http: Handles<Box<str>, std::sync::Arc<HttpRoute>>,
    store_calls: Handles<(&'static str, StoreOp), StoreCall>,
    /// By channel id (configured ids, and `unknown` for a callback to none of them).
    channels: Handles<Box<str>, std::sync::Arc<ChannelHandles>>,
    routing: Handles<&'static str, Counter>,
    queue_depth: Gauge,
    batch_rows: Histogram,
    commit_seconds: Histogram,
    commits_ok: Counter,
    commits_error: Counter,
    sqlite_wal_bytes: Counter,
}

/// One channel's series: its calls by operation and result, its callbacks by result, its HTTP
/// exchanges by outcome and their duration.
struct ChannelHandles {
    calls: Handles<(&'static str, &'static str), Counter>,
    callbacks: Handles<&'static str, Counter>,
    http_requests: Handles<&'static str, Counter>,
    /// Registered on the first exchange (a series appears when first recorded, as before: the
    /// `unknown` channel of a stray callback never gets one).
    http_seconds: OnceLock<Histogram>,
}

struct HttpRoute {
    duration: Histogram,
    requests: Handles<(&'static str, u16), Counter>,
}

#[derive(Clone)]
struct StoreCall {
    seconds: Histogram,
    /// Writes only (`gateway_store_commits_total`).
    commits: Option<Counter>,
}

static HOT: OnceLock<Hot> = OnceLock::new();

impl Hot {
    fn new() -> Self {
        Self {
            preauth: Handles::default(),
            redis_round_trips: Handles::default(),
            http: Handles::default(),
            store_calls: Handles::default(),
            channels: Handles::default(),
            routing: Handles::default(),
            queue_depth: metrics::gauge!(SETTLEMENT_QUEUE_DEPTH),
            batch_rows: metrics::histogram!(SETTLEMENT_BATCH_ROWS),
            commit_seconds: metrics::histogram!(SETTLEMENT_COMMIT_SECONDS),
            commits_ok: metrics::counter!(SETTLEMENT_COMMITS_TOTAL, "result" => "ok"),
            commits_error: metrics::counter!(SETTLEMENT_COMMITS_TOTAL, "result" => "error"),
            sqlite_wal_bytes: metrics::counter!(SQLITE_WAL_BYTES_TOTAL),
        }
    }
}

/// Handles of one metric by label values, each registered once.
struct Handles<K, H> {
    map: RwLock<HashMap<K, H>>,
}

impl<K, H> Default for Handles<K, H> {
    fn default() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, H: Clone> Handles<K, H> {
    /// The handle of `key` (borrowed as `Q`), registered by `register` the first time.
    fn get<Q>(&self, key: &Q, owned: impl FnOnce() -> K, register: impl FnOnce() -> H) -> H
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(handle) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return handle.clone();
        }
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(owned())
            .or_insert_with(register)
            .clone()
    }
}

/// A method's label as a static string (the methods the API serves; `None` for any other).
fn static_method(method: &axum::http::Method) -> Option<&'static str> {
    Some(match *method {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::OPTIONS => "OPTIONS",
        axum::http::Method::PATCH => "PATCH",
        _ => return None,
    })
}

/// Folds the recorder's pending histogram samples every `interval` until shutdown. A recorder
/// built with `build_recorder` (ours: the gateway serves `/metrics` itself) keeps every
/// observation (an `f64` each, several per payment) until a scrape renders it; without a
/// scraper that memory grows with traffic. Rendering folds them too, so a scrape between two
/// upkeeps changes nothing.
pub fn spawn_metrics_upkeep(
    handle: PrometheusHandle,
    interval: std::time::Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    crate::periodic::spawn_periodic(interval, shutdown, move || {
        handle.run_upkeep();
        std::future::ready(())
    })
}

fn describe() {
    metrics::describe_counter!(
        SQLITE_WAL_BYTES_TOTAL,
        metrics::Unit::Bytes,
        "Bytes the SQLite store's commits appended to its write-ahead log (frames with headers)"
    );
    metrics::describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests answered, by route, method and status"
    );
    metrics::describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency, by route"
    );
    metrics::describe_counter!(
        HTTP_REQUESTS_SHED_TOTAL,
        "Requests refused because server.max_in_flight_requests was reached"
    );
    metrics::describe_counter!(
        PREAUTH_TOTAL,
        "Pre-authorization outcomes (authorize script results)"
    );
    metrics::describe_counter!(ADJUSTMENTS_TOTAL, "Manual adjustment outcomes");
    metrics::describe_counter!(
        REDIS_ROUND_TRIPS_TOTAL,
        "Redis round trips made by the gateway, by operation"
    );
    metrics::describe_counter!(
        STORE_ERRORS_TOTAL,
        "Balance store operating errors (answered 503)"
    );
    metrics::describe_counter!(HOLDS_SWEPT_TOTAL, "Expired holds released by the sweeper");
    metrics::describe_counter!(
        STORE_COMMITS_TOTAL,
        "Settlement store calls that commit a write transaction (one fsync each at most), by backend and operation"
    );
    metrics::describe_gauge!(SETTLEMENT_QUEUE_DEPTH, "Writes queued for the group commit");
    metrics::describe_histogram!(
        SETTLEMENT_BATCH_ROWS,
        "Writes (intents, attempt outcomes, settlements) per group commit"
    );
    metrics::describe_histogram!(
        SETTLEMENT_COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "Group commit latency (one transaction, one fsync)"
    );
    metrics::describe_counter!(SETTLEMENT_COMMITS_TOTAL, "Group commits, by result");
    metrics::describe_counter!(
        SETTLEMENT_CONFLICTS_TOTAL,
        "Settlements whose content differs from the stored one (flagged)"
    );
    metrics::describe_counter!(
        STORE_REFUSED_PAYMENTS_TOTAL,
        "Payments the settlement store refused to create because it already held their idempotency key or a live payment under their order id (the balance store had forgotten them), by reason"
    );
    metrics::describe_histogram!(
        SETTLEMENT_STORE_CALL_SECONDS,
        metrics::Unit::Seconds,
        "Settlement store calls, by backend and operation"
    );
}

/// Sets up logging: `RUST_LOG` wins over the configured filter. Safe to call twice. Colours
/// only on a terminal (never in a file, a pipe or a journal) and never with `NO_COLOR` set.
pub fn init_tracing(settings: &TelemetrySettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours(&std::io::stdout()));
    let _ = if settings.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Whether log lines written to `stream` may carry ANSI colours: a terminal, and no
/// `NO_COLOR` (https://no-color.org).
pub fn colours(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

pub fn redis_round_trip(op: &'static str) {
    match HOT.get() {
        Some(hot) => hot.redis_round_trips.get(
            &op,
            || op,
            || metrics::counter!(REDIS_ROUND_TRIPS_TOTAL, "op" => op),
        ),
        None => metrics::counter!(REDIS_ROUND_TRIPS_TOTAL, "op" => op),
    }
    .increment(1);
}

pub fn preauth_outcome(outcome: &'static str) {
    match HOT.get() {
        Some(hot) => hot.preauth.get(
            &outcome,
            || outcome,
            || metrics::counter!(PREAUTH_TOTAL, "outcome" => outcome),
        ),
        None => metrics::counter!(PREAUTH_TOTAL, "outcome" => outcome),
    }
    .increment(1);
}

pub fn adjustment_outcome(outcome: &'static str) {
    metrics::counter!(ADJUSTMENTS_TOTAL, "outcome" => outcome).increment(1);
}

pub fn store_error(kind: &'static str) {
    metrics::counter!(STORE_ERRORS_TOTAL, "kind" => kind).increment(1);
}

pub fn holds_swept(count: u64) {
    metrics::counter!(HOLDS_SWEPT_TOTAL).increment(count);
}

pub fn request_shed() {
    metrics::counter!(HTTP_REQUESTS_SHED_TOTAL).increment(1);
}

/// A client connection was accepted (`api::server`).
pub fn http_connection_opened() {
    metrics::gauge!(HTTP_CONNECTIONS_OPEN).increment(1.0);
}

pub fn http_connection_closed() {
    metrics::gauge!(HTTP_CONNECTIONS_OPEN).decrement(1.0);
}

/// A connection over `server.max_connections`, answered 503 and closed.
pub fn http_connection_refused() {
    metrics::counter!(HTTP_CONNECTIONS_REFUSED_TOTAL).increment(1);
}

/// A connection cut off by a timeout: `phase` is `idle` or `header`.
pub fn http_connection_timeout(phase: &'static str) {
    metrics::counter!(HTTP_CONNECTION_TIMEOUTS_TOTAL, "phase" => phase).increment(1);
}

/// A request body refused before routing: `reason` is `too_large`, `timeout` or `malformed`.
pub fn http_body_refused(reason: &'static str) {
    metrics::counter!(HTTP_BODIES_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// One answered request: `route` is the matched route's pattern (or `unmatched`).
pub fn http_request(route: &str, method: &axum::http::Method, status: u16, elapsed: Duration) {
    let requests = |method: &str| {
        metrics::counter!(
            HTTP_REQUESTS_TOTAL,
            "route" => route.to_owned(),
            "method" => method.to_owned(),
            "status" => status.to_string()
        )
    };
    let duration =
        || metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route.to_owned());
    let Some(hot) = HOT.get() else {
        requests(method.as_str()).increment(1);
        duration().record(elapsed.as_secs_f64());
        return;
    };
    let http = hot.http.get(
        route,
        || route.into(),
        || {
            std::sync::Arc::new(HttpRoute {
                duration: duration(),
                requests: Handles::default(),
            })
        },
    );
    match static_method(method) {
        Some(name) => http
            .requests
            .get(&(name, status), || (name, status), || requests(name)),
        None => requests(method.as_str()),
    }
    .increment(1);
    http.duration.record(elapsed.as_secs_f64());
}

/// A settlement-store call: its `op` label, and whether it writes. Every write commits a
/// transaction, so it is counted in `gateway_store_commits_total` (the gateway's own count of
/// what may cost an fsync); reads are not. Each store names its calls with these, so a new
/// call has to say which it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Read(&'static str),
    Write(&'static str),
}

impl StoreOp {
    pub fn label(self) -> &'static str {
        match self {
            StoreOp::Read(label) | StoreOp::Write(label) => label,
        }
    }
}

pub fn store_call(backend: &'static str, op: StoreOp, elapsed: Duration) {
    let register = || {
        let label = op.label();
        StoreCall {
            seconds: metrics::histogram!(SETTLEMENT_STORE_CALL_SECONDS, "backend" => backend, "op" => label),
            commits: match op {
                StoreOp::Write(_) => Some(
                    metrics::counter!(STORE_COMMITS_TOTAL, "backend" => backend, "op" => label),
                ),
                StoreOp::Read(_) => None,
            },
        }
    };
    let call = match HOT.get() {
        Some(hot) => hot
            .store_calls
            .get(&(backend, op), || (backend, op), register),
        None => register(),
    };
    call.seconds.record(elapsed.as_secs_f64());
    if let Some(commits) = call.commits {
        commits.increment(1);
    }
}

pub fn settlement_queue_depth(depth: usize) {
    match HOT.get() {
        Some(hot) => hot.queue_depth.set(depth as f64),
        None => metrics::gauge!(SETTLEMENT_QUEUE_DEPTH).set(depth as f64),
    }
}

/// A SQLite commit appended `bytes` to the write-ahead log.
pub fn sqlite_wal_bytes(bytes: u64) {
    match HOT.get() {
        Some(hot) => hot.sqlite_wal_bytes.increment(bytes),
        None => metrics::counter!(SQLITE_WAL_BYTES_TOTAL).increment(bytes),
    }
}

pub fn settlement_batch(rows: usize, elapsed: Duration, ok: bool) {
    let Some(hot) = HOT.get() else {
        metrics::histogram!(SETTLEMENT_BATCH_ROWS).record(rows as f64);
        metrics::histogram!(SETTLEMENT_COMMIT_SECONDS).record(elapsed.as_secs_f64());
        metrics::counter!(SETTLEMENT_COMMITS_TOTAL, "result" => if ok { "ok" } else { "error" })
            .increment(1);
        return;
    };
    hot.batch_rows.record(rows as f64);
    hot.commit_seconds.record(elapsed.as_secs_f64());
    if ok {
        &hot.commits_ok
    } else {
        &hot.commits_error
    }
    .increment(1);
}

pub fn settlement_conflict() {
    metrics::counter!(SETTLEMENT_CONFLICTS_TOTAL).increment(1);
}

/// The settlement store refused to create a payment the balance store had accepted (`reason`:
/// `replay`, `idempotency_conflict` or `duplicate_order`): the balance store had forgotten the
/// key or the order id, and was unwound.
pub fn store_refused_payment(reason: &'static str) {
    metrics::counter!(STORE_REFUSED_PAYMENTS_TOTAL, "reason" => reason).increment(1);
}

pub fn account_rebuilt() {
    metrics::counter!(ACCOUNTS_REBUILT_TOTAL).increment(1);
}

// ---- circuit breakers (routing::breaker) ----

/// A breaker was created for `channel` (a configured channel id): its state gauge starts
/// at closed.
pub fn breaker_created(channel: &str) {
    metrics::gauge!(BREAKER_STATE, "channel" => channel.to_owned()).set(0.0);
}

/// A breaker changed state: counts the transition and sets the state gauge to
/// `state_value` (0 closed, 1 half_open, 2 open).
pub fn breaker_transition(channel: &str, to: &'static str, state_value: u8) {
    metrics::counter!(BREAKER_TRANSITIONS_TOTAL, "channel" => channel.to_owned(), "to" => to)
        .increment(1);
    metrics::gauge!(BREAKER_STATE, "channel" => channel.to_owned()).set(f64::from(state_value));
}

/// One call to a channel: `op` is create, query, close or refund; `result` is `ok` or the
/// error's label.
pub fn channel_call(channel: &str, op: &'static str, result: &'static str) {
    let register = || metrics::counter!(CHANNEL_CALLS_TOTAL, "channel" => channel.to_owned(), "op" => op, "result" => result);
    match channel_handles(channel) {
        Some(c) => c.calls.get(&(op, result), || (op, result), register),
        None => register(),
    }
    .increment(1);
}

/// One HTTP exchange with a channel (`outcome`: ok, or the error's label) and how long it took.
pub fn channel_http(channel: &str, outcome: &'static str, elapsed: Duration) {
    let requests = || metrics::counter!(CHANNEL_HTTP_REQUESTS_TOTAL, "channel" => channel.to_owned(), "outcome" => outcome);
    let seconds = elapsed.as_secs_f64();
    match channel_handles(channel) {
        Some(c) => {
            c.http_requests
                .get(&outcome, || outcome, requests)
                .increment(1);
            c.http_seconds
                .get_or_init(seconds_of(channel))
                .record(seconds);
        }
        None => {
            requests().increment(1);
            seconds_of(channel)().record(seconds);
        }
    }
}

/// Registers the duration histogram of `channel`'s HTTP exchanges.
fn seconds_of(channel: &str) -> impl FnOnce() -> Histogram + '_ {
    move || metrics::histogram!(CHANNEL_HTTP_SECONDS, "channel" => channel.to_owned())
}

/// The kept handles of `channel` (`None` before the recorder is installed).
fn channel_handles(channel: &str) -> Option<std::sync::Arc<ChannelHandles>> {
    let hot = HOT.get()?;
    Some(hot.channels.get(
        channel,
        || channel.into(),
        || {
            std::sync::Arc::new(ChannelHandles {
                calls: Handles::default(),
                callbacks: Handles::default(),
                http_requests: Handles::default(),
                http_seconds: OnceLock::new(),
            })
        },
    ))
}

/// How a channel payment's create call ended: accepted, unknown, paid, no_channel.
pub fn routing(result: &'static str) {
    let register = || metrics::counter!(ROUTING_TOTAL, "result" => result);
    match HOT.get() {
        Some(hot) => hot.routing.get(&result, || result, register),
        None => register(),
    }
    .increment(1);
}

/// What the resolution loop (or a cancel) did to a pending channel payment.
pub fn resolution(result: &'static str) {
    metrics::counter!(RESOLUTIONS_TOTAL, "result" => result).increment(1);
}

/// Records the last recovery page left in the balance store's outbox (young or failed).
pub fn unsettled_records(count: usize) {
    metrics::gauge!(UNSETTLED_RECORDS).set(count as f64);
}

/// Rows in `GET /v1/admin/flagged` (payments needing a human).
pub fn flagged_payments(count: u64) {
    metrics::gauge!(FLAGGED_PAYMENTS).set(count as f64);
}

/// A refund's execution: succeeded, failed or pending.
pub fn refund(result: &'static str) {
    metrics::counter!(REFUNDS_TOTAL, "result" => result).increment(1);
}

/// One callback: `result` is processed, duplicate, late_money, refund_notice, ignored, retry,
/// or why it was refused (bad_signature, stale, wrong_account, malformed, unknown_order,
/// unknown_channel, amount_mismatch).
pub fn callback(channel: &str, result: &'static str) {
    let register =
        || metrics::counter!(CALLBACKS_TOTAL, "channel" => channel.to_owned(), "result" => result);
    match channel_handles(channel) {
        Some(c) => c.callbacks.get(&result, || result, register),
        None => register(),
    }
    .increment(1);
}

// ---- merchant webhooks (crate::webhooks) ----

pub const WEBHOOK_DELIVERIES_TOTAL: &str = "gateway_webhook_deliveries_total";
pub const WEBHOOK_BACKLOG: &str = "gateway_webhook_backlog";

/// One turn of the webhook worker with an event: `result` is delivered, retry, failed,
/// skipped, or deferred (its merchant was at `webhooks.per_merchant_concurrency`).
pub fn webhook_delivery(result: &'static str) {
    metrics::counter!(WEBHOOK_DELIVERIES_TOTAL, "result" => result).increment(1);
}

/// Pending webhook events in the outbox, as counted at the worker's last tick.
pub fn webhook_backlog(pending: u64) {
    metrics::gauge!(WEBHOOK_BACKLOG).set(pending as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The series a kept handle records into are the ones the macros name: counted once per
    /// call, rendered under the same labels.
    #[test]
    fn kept_handles_record_into_the_named_series() {
        let handle = prometheus();
        assert!(HOT.get().is_some(), "handles are taken with the recorder");
        let post = axum::http::Method::POST;
        let other = axum::http::Method::from_bytes(b"PROBE").unwrap();
        for _ in 0..3 {
            preauth_outcome("kept_handle_probe");
            redis_round_trip("kept_handle_probe");
            http_request("/kept/{probe}", &post, 201, Duration::from_millis(1));
            store_call(
                "probe",
                StoreOp::Write("kept_handle"),
                Duration::from_millis(1),
            );
        }
        http_request("/kept/{probe}", &post, 400, Duration::from_millis(1));
        http_request("/kept/{probe}", &other, 405, Duration::from_millis(1));
        store_call(
            "probe",
            StoreOp::Read("kept_read"),
            Duration::from_millis(1),
        );
        settlement_batch(4, Duration::from_millis(1), true);
        let text = handle.render();
        for sample in [
            "gateway_preauth_total{outcome=\"kept_handle_probe\"} 3",
            "gateway_redis_round_trips_total{op=\"kept_handle_probe\"} 3",
            "gateway_http_requests_total{route=\"/kept/{probe}\",method=\"POST\",status=\"201\"} 3",
            "gateway_http_requests_total{route=\"/kept/{probe}\",method=\"POST\",status=\"400\"} 1",
            "gateway_http_requests_total{route=\"/kept/{probe}\",method=\"PROBE\",status=\"405\"} 1",
            "gateway_http_request_duration_seconds_count{route=\"/kept/{probe}\"} 5",
            "gateway_store_commits_total{backend=\"probe\",op=\"kept_handle\"} 3",
            "gateway_settlement_store_call_seconds_count{backend=\"probe\",op=\"kept_handle\"} 3",
            "gateway_settlement_store_call_seconds_count{backend=\"probe\",op=\"kept_read\"} 1",
        ] {
            assert!(text.lines().any(|l| l == sample), "{sample} in:\n{text}");
        }
        assert!(
            !text.contains("gateway_store_commits_total{backend=\"probe\",op=\"kept_read\"}"),
            "a read commits nothing"
        );
    }

    /// A channel's series (calls, HTTP exchanges and their duration, callbacks) and the routing
    /// outcomes, through the kept handles; a callback to no channel gets no HTTP histogram.
    #[test]
    fn channel_handles_record_into_the_named_series() {
        let handle = prometheus();
        for _ in 0..2 {
            channel_call("kept-probe-channel", "create", "ok");
            channel_http("kept-probe-channel", "ok", Duration::from_millis(2));
            callback("kept-probe-channel", "processed");
            routing("kept_probe_routing");
        }
        channel_call("kept-probe-channel", "query", "timeout");
        channel_http("kept-probe-channel", "timeout", Duration::from_millis(3));
        callback("kept-probe-nowhere", "unknown_channel");
        let text = handle.render();
        for sample in [
            "gateway_channel_calls_total{channel=\"kept-probe-channel\",op=\"create\",result=\"ok\"} 2",
            "gateway_channel_calls_total{channel=\"kept-probe-channel\",op=\"query\",result=\"timeout\"} 1",
            "gateway_channel_http_requests_total{channel=\"kept-probe-channel\",outcome=\"ok\"} 2",
            "gateway_channel_http_requests_total{channel=\"kept-probe-channel\",outcome=\"timeout\"} 1",
            "gateway_channel_http_request_duration_seconds_count{channel=\"kept-probe-channel\"} 3",
            "gateway_callbacks_total{channel=\"kept-probe-channel\",result=\"processed\"} 2",
            "gateway_callbacks_total{channel=\"kept-probe-nowhere\",result=\"unknown_channel\"} 1",
            "gateway_routing_total{result=\"kept_probe_routing\"} 2",
        ] {
            assert!(text.lines().any(|l| l == sample), "{sample} in:\n{text}");
        }
        assert!(
            !text.contains("gateway_channel_http_request_duration_seconds_count{channel=\"kept-probe-nowhere\"}"),
            "a channel with only a callback has no HTTP histogram"
        );
    }
}
