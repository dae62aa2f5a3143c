//! The delivery worker: takes due events from the outbox (leased, so several gateway instances
//! never send the same event at once) and POSTs each, signed, to its URL.
//!
//! - **Where**: the payment's `notify_url`, else the merchant's configured `webhook_url`;
//!   neither → `skipped` (usually already when the store enqueued it: `NoWebhook`). Only URLs
//!   [`check_url`] accepts are called: `https://` to public hosts, and in the sandbox also
//!   loopback hosts (plain `http://` too); any other URL → `failed` at once.
//! - **Bounds**: at most `webhooks.batch` events taken per tick and in flight overall, and
//!   `webhooks.per_merchant_concurrency` in flight per merchant: an event whose merchant is
//!   at its limit is *deferred* (due again next tick, no attempt counted), so one slow
//!   receiver never holds up the others. A tick only starts deliveries; it never waits for
//!   them, and a lease (`webhooks.lease_ms`) always outlasts a delivery
//!   (`webhooks.request_timeout_ms`, connecting and reading included). A reply's body is read
//!   up to [`MAX_RESPONSE_BYTES`] and ignored.
//! - **Outcome**: a 2xx → `delivered`, never sent again. Anything else (another status, a
//!   connection error, a timeout) → retried after an exponential backoff with full jitter
//!   (a random wait up to `backoff_initial_ms · 2^(attempts−1)`, capped at `backoff_max_ms`),
//!   until the next try would fall past `horizon_seconds` after the event was enqueued →
//!   `failed`.
//! - **At least once**: if the gateway dies after a receiver answered 2xx but before the
//!   outcome is recorded, the event is sent again when its lease ends. Receivers deduplicate
//!   on `X-Webhook-Id` (docs/webhooks.md).
//!
//! Metrics: `gateway_webhook_deliveries_total{result}` and the `gateway_webhook_backlog` gauge,
//! refreshed every tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::signature::WebhookKey;
pub use super::url::check_url;
use crate::config::{Merchant, Mode, WebhookSettings};
use crate::periodic::spawn_periodic;
use crate::state::Core;
use futures_util::future::join_all;

use crate::settlement::stream::SettlementStream;
use crate::settlement::{
    SettleError, SettlementStore, WebhookAttempt, WebhookEvent, WebhookOutcome, Write,
};
use crate::telemetry;

/// A receiver's reply body is read up to this many bytes (so the connection can be reused),
/// then ignored: only the status matters.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024;

/// Idle keep-alive connections kept per receiver host, and for how long.
const MAX_IDLE_PER_HOST: usize = 4;
const IDLE_TIMEOUT_MS: u64 = 30_000;

/// How long shutdown waits for deliveries in flight beyond their own timeout; what is still
/// running then is dropped, and its events come back when their lease ends.
const DRAIN_MARGIN_MS: u64 = 1_000;

/// Claims one tick makes at most while they come back full (see [`Deliverer::tick`]).
pub const MAX_CLAIMS_PER_TICK: usize = 8;

const USER_AGENT: &str = concat!("gateway-webhooks/", env!("CARGO_PKG_VERSION"));

/// One merchant as the worker sees it.
struct Target {
    webhook_url: Option<String>,
    key: Arc<WebhookKey>,
    /// `webhooks.per_merchant_concurrency` permits.
    permits: Arc<Semaphore>,
}

/// What one tick did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    pub claimed: usize,
    /// Deliveries started (they finish on their own).
    pub started: usize,
    pub deferred: usize,
    pub skipped: usize,
    /// Not sent: the merchant is not in this instance's configuration (no secret to sign).
    pub unknown_merchant: usize,
}

/// The worker's state, shared by its ticks and the deliveries they start.
pub struct Deliverer {
    store: Arc<dyn SettlementStore>,
    /// The group commit, when running in a server: outcomes share the payments' transactions
    /// instead of costing a commit each.
    writer: Option<SettlementStream>,
    settings: WebhookSettings,
    targets: HashMap<String, Target>,
    /// Which URLs may be called ([`check_url`]).
    mode: Mode,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `webhooks.batch` permits: deliveries in flight overall.
    in_flight: Arc<Semaphore>,
    deliveries: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("settings", &self.settings)
            .field("merchants", &self.targets.len())
            .finish_non_exhaustive()
    }
}

/// The HTTP client could not be built (the TLS configuration).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the webhook HTTP client: {0}")]
pub struct ClientBuildError(String);

impl Deliverer {
    /// The worker for `merchants` (their webhook URLs and secrets), over `store`'s outbox.
    pub fn new(
        store: Arc<dyn SettlementStore>,
        settings: WebhookSettings,
        merchants: &[Merchant],
        mode: Mode,
    ) -> Result<Self, ClientBuildError> {
        let timeout = Duration::from_millis(settings.request_timeout_ms);
        let mut http = HttpConnector::new();
        // The https connector wraps this one; it must let `https://` through to it.
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())
            .map_err(|e| ClientBuildError(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(IDLE_TIMEOUT_MS))
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        let targets = merchants
            .iter()
            .map(|m| {
                (
                    m.id.as_str().to_owned(),
                    Target {
                        webhook_url: m.webhook_url.clone(),
                        key: Arc::new(WebhookKey::new(m.webhook_secret.expose().as_bytes())),
                        permits: Arc::new(Semaphore::new(settings.per_merchant_concurrency)),
                    },
                )
            })
            .collect();
        Ok(Self {
            store,
            writer: None,
            in_flight: Arc::new(Semaphore::new(settings.batch)),
            settings,
            targets,
            mode,
            client,
            deliveries: Mutex::new(JoinSet::new()),
        })
    }

    /// Records outcomes through `writer` (the group commit) instead of a transaction each.
    pub fn with_writer(mut self, writer: SettlementStream) -> Self {
        self.writer = Some(writer);
        self
    }

    fn deliveries(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        // A delivery that panicked poisons nothing we rely on: the set is still usable.
        self.deliveries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deliveries still running.
    pub fn in_flight(&self) -> usize {
        self.settings.batch - self.in_flight.available_permits()
    }

    /// One tick: refreshes the backlog gauge, takes the due events there is room for, and
    /// starts their deliveries (module docs). Does not wait for them. While a claim comes back
    /// full, deferred nothing and there is room again (events recorded without a delivery:
    /// skipped), it claims again, at most [`MAX_CLAIMS_PER_TICK`] times.
    pub async fn tick(self: &Arc<Self>) -> Result<TickReport, SettleError> {
        while self.deliveries().try_join_next().is_some() {}
        let backlog = self.store.webhook_backlog().await?;
        telemetry::webhook_backlog(backlog);
        let mut report = TickReport::default();
        // Nothing pending: no claim (on SQLite, no write lock taken every tick).
        if backlog == 0 {
            return Ok(report);
        }
        for _ in 0..MAX_CLAIMS_PER_TICK {
            let room = self.in_flight.available_permits().min(self.settings.batch);
            if room == 0 {
                break;
            }
            let deferred = report.deferred;
            let claimed = self.claim_and_start(room, &mut report).await?;
            // A short claim drained the backlog; a deferral means a merchant is at its limit.
            if claimed < room || report.deferred > deferred {
                break;
            }
        }
        Ok(report)
    }

    /// One claim of at most `room` due events: starts their deliveries, and records the
    /// outcome of those that need none together (they share one group commit).
    async fn claim_and_start(
        self: &Arc<Self>,
        room: usize,
        report: &mut TickReport,
    ) -> Result<usize, SettleError> {
        let now = telemetry::now_ms();
        let claimed = self
            .store
            .claim_webhooks(now, now.saturating_add(self.settings.lease_ms), room)
            .await?;
        let count = claimed.len();
        report.claimed += count;
        let mut records = Vec::new();
        for event in claimed {
            let Some(target) = self.targets.get(&event.merchant_id) else {
                // Perhaps configured on another instance first (a rolling change): retried
                // like any failure, so it ends `failed` only at its horizon.
                report.unknown_merchant += 1;
                let outcome = after_failure(
                    &self.settings,
                    event.attempts.saturating_add(1),
                    event.created_at_ms,
                    now,
                    random_u64(),
                );
                records.push((event, outcome, Some("merchant not configured")));
                continue;
            };
            let Some(url) = event.url.clone().or_else(|| target.webhook_url.clone()) else {
                report.skipped += 1;
                records.push((event, WebhookOutcome::Skipped, None));
                continue;
            };
            // Both limits are taken without waiting: a merchant at its limit waits in the
            // outbox, not in this tick. (The overall one always has room: only ticks take it,
            // one at a time, and this one claimed no more than was free.)
            let permits = target
                .permits
                .clone()
                .try_acquire_owned()
                .ok()
                .zip(self.in_flight.clone().try_acquire_owned().ok());
            let Some(permits) = permits else {
                report.deferred += 1;
                let again = now.saturating_add(self.settings.interval_ms);
                records.push((event, WebhookOutcome::Deferred(again), None));
                continue;
            };
            report.started += 1;
            let worker = self.clone();
            let key = target.key.clone();
            self.deliveries().spawn(async move {
                worker.deliver(event, &url, &key).await;
                drop(permits);
            });
        }
        join_all(
            records
                .iter()
                .map(|(event, outcome, error)| self.record(event, *outcome, None, *error)),
        )
        .await;
        Ok(count)
    }

    /// Waits (bounded) for the deliveries in flight, at shutdown.
    pub async fn drain(&self) {
        let mut running = std::mem::take(&mut *self.deliveries());
        let grace = Duration::from_millis(self.settings.request_timeout_ms + DRAIN_MARGIN_MS);
        let _ = tokio::time::timeout(grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        // Dropping `running` aborts what is left; those events come back after their lease.
    }

    /// Sends one event and records what came of it.
    async fn deliver(&self, event: WebhookEvent, url: &str, key: &WebhookKey) {
        let sent = self.send(&event, url, key).await;
        let now = telemetry::now_ms();
        let outcome = match &sent {
            Sent::Delivered { .. } => WebhookOutcome::Delivered,
            Sent::Refused { .. } => WebhookOutcome::Failed,
            Sent::Failed { .. } => after_failure(
                &self.settings,
                event.attempts.saturating_add(1),
                event.created_at_ms,
                now,
                random_u64(),
            ),
        };
        let (http_status, error) = sent.details();
        match outcome {
            WebhookOutcome::Delivered => {
                tracing::debug!(event_id = %event.id, merchant = %event.merchant_id, "webhook delivered");
            }
            _ => {
                tracing::info!(event_id = %event.id, merchant = %event.merchant_id, event_type = %event.event_type, ?outcome, http_status, error, "webhook not delivered");
            }
        }
        self.record(&event, outcome, http_status, error).await;
    }

    async fn record(
        &self,
        event: &WebhookEvent,
        outcome: WebhookOutcome,
        http_status: Option<u16>,
        error: Option<&str>,
    ) {
        telemetry::webhook_delivery(match outcome {
            WebhookOutcome::Delivered => "delivered",
            WebhookOutcome::RetryAt(_) => "retry",
            WebhookOutcome::Failed => "failed",
            WebhookOutcome::Skipped => "skipped",
            WebhookOutcome::Deferred(_) => "deferred",
        });
        let now = telemetry::now_ms();
        let recorded = match &self.writer {
            Some(writer) => {
                let attempt = WebhookAttempt {
                    id: event.id.clone(),
                    outcome,
                    http_status,
                    error: error.map(str::to_owned),
                    now_ms: now,
                };
                writer
                    .submit_write(Write::Webhook(attempt), None)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            None => self
                .store
                .record_webhook_attempt(&event.id, outcome, http_status, error, now)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(err) = recorded {
            // The lease brings the event back: at worst it is sent once more.
            tracing::warn!(event_id = %event.id, error = %err, "webhook outcome not recorded; the event comes back when its lease ends");
        }
    }

    /// POSTs the event's body, signed, within the request timeout.
    async fn send(&self, event: &WebhookEvent, url: &str, key: &WebhookKey) -> Sent {
        // Checked again here: an event may carry a URL accepted before the rules tightened.
        let uri = match check_url(url, self.mode) {
            Ok(uri) => uri,
            Err(reason) => {
                return Sent::Refused {
                    error: format!("refused URL: {reason}"),
                }
            }
        };
        let signature = key.signature_header(telemetry::now_ms() / 1000, event.payload.as_bytes());
        let request = Request::post(uri)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, USER_AGENT)
            .header("x-signature", signature)
            .header("x-webhook-id", event.id.as_str())
            .body(Full::new(Bytes::from(event.payload.clone())));
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                return Sent::Refused {
                    error: format!("cannot build the request: {e}"),
                }
            }
        };
        let timeout = Duration::from_millis(self.settings.request_timeout_ms);
        match tokio::time::timeout(timeout, self.exchange(request)).await {
            Err(_elapsed) => Sent::Failed {
                status: None,
                error: format!("no answer within {} ms", self.settings.request_timeout_ms),
            },
            Ok(Err(error)) => Sent::Failed {
                status: None,
                error,
            },
            Ok(Ok(status)) if status.is_success() => Sent::Delivered {
                status: status.as_u16(),
            },
            Ok(Ok(status)) => Sent::Failed {
                status: Some(status.as_u16()),
                error: format!("HTTP {}", status.as_u16()),
            },
        }
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<StatusCode, String> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| error_chain(&e))?;
        let (parts, body) = response.into_parts();
        // Read so the connection can be reused; bounded, and its content does not matter.
        let _ = Limited::new(body, MAX_RESPONSE_BYTES).collect().await;
        Ok(parts.status)
    }
}

/// What sending came to.
#[derive(Debug)]
enum Sent {
    Delivered {
        status: u16,
    },
    /// The receiver did not take it; worth another try.
    Failed {
        status: Option<u16>,
        error: String,
    },
    /// It can never be sent (a URL the gateway refuses).
    Refused {
        error: String,
    },
}

impl Sent {
    fn details(&self) -> (Option<u16>, Option<&str>) {
        match self {
            Sent::Delivered { status } => (Some(*status), None),
            Sent::Failed { status, error } => (*status, Some(error)),
            Sent::Refused { error } => (None, Some(error)),
        }
    }
}

/// What follows a failed attempt (`attempts` made, this one included): a retry after a random
/// wait up to the exponential bound (full jitter; `random` draws it), or `Failed` when that
/// retry would fall past the horizon.
pub fn after_failure(
    settings: &WebhookSettings,
    attempts: u32,
    created_at_ms: u64,
    now_ms: u64,
    random: u64,
) -> WebhookOutcome {
    let doublings = attempts.saturating_sub(1).min(30);
    let bound = settings
        .backoff_initial_ms
        .saturating_mul(1u64 << doublings)
        .min(settings.backoff_max_ms);
    let wait = random % bound.saturating_add(1);
    let at = now_ms.saturating_add(wait);
    let horizon = created_at_ms.saturating_add(settings.horizon_seconds.saturating_mul(1_000));
    if at >= horizon {
        WebhookOutcome::Failed
    } else {
        WebhookOutcome::RetryAt(at)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    // Bounded: error chains are short.
    for _ in 0..8 {
        let Some(e) = source else { break };
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn random_u64() -> u64 {
    // Jitter only: a failing generator costs spreading, not safety.
    getrandom::u64().unwrap_or_else(|_| telemetry::now_ms())
}

/// Runs the worker for `state`'s merchants and store every `webhooks.interval_ms` until
/// shutdown, then waits (bounded) for the deliveries in flight.
pub fn spawn_webhooks(state: Arc<Core>, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    let settings = state.config.settings.webhooks.clone();
    match Deliverer::new(
        state.settler.store.clone(),
        settings,
        &state.config.merchants,
        state.config.mode,
    ) {
        Ok(deliverer) => spawn_worker(
            Arc::new(deliverer.with_writer(state.settler.stream().clone())),
            shutdown,
        ),
        Err(err) => {
            // Nothing is lost: the events wait in the outbox for a gateway that can send them.
            tracing::error!(error = %err, "webhook delivery disabled");
            tokio::spawn(async {})
        }
    }
}

/// Runs `deliverer` every `webhooks.interval_ms` until shutdown (see [`spawn_webhooks`]).
pub fn spawn_worker(deliverer: Arc<Deliverer>, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    let interval = Duration::from_millis(deliverer.settings.interval_ms);
    let ticking = deliverer.clone();
    let periodic = spawn_periodic(interval, shutdown, move || {
        let deliverer = ticking.clone();
        async move {
            if let Err(err) = deliverer.tick().await {
                tracing::warn!(error = %err, "webhook tick failed");
            }
        }
    });
    tokio::spawn(async move {
        let _ = periodic.await;
        deliverer.drain().await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WebhookSettings {
        WebhookSettings {
            backoff_initial_ms: 1_000,
            backoff_max_ms: 8_000,
            horizon_seconds: 60,
            ..WebhookSettings::default()
        }
    }

    #[test]
    fn retries_back_off_exponentially_with_full_jitter_up_to_the_horizon() {
        let s = settings();
        let max = u64::MAX;
        // The bound doubles per attempt, capped; `random` picks within [0, bound].
        for (attempts, bound) in [(1, 1_000), (2, 2_000), (3, 4_000), (4, 8_000), (40, 8_000)] {
            assert_eq!(
                after_failure(&s, attempts, 0, 100, bound),
                WebhookOutcome::RetryAt(100 + bound),
                "attempt {attempts}"
            );
            assert_eq!(
                after_failure(&s, attempts, 0, 100, bound + 1),
                WebhookOutcome::RetryAt(100),
                "attempt {attempts}"
            );
            let WebhookOutcome::RetryAt(at) = after_failure(&s, attempts, 0, 100, max) else {
                panic!("a retry");
            };
            assert!((100..=100 + bound).contains(&at));
        }
        // A retry that would fall past the horizon (60 s after creation) is a failure.
        assert_eq!(
            after_failure(&s, 5, 0, 59_000, 999),
            WebhookOutcome::RetryAt(59_999)
        );
        assert_eq!(
            after_failure(&s, 5, 0, 59_000, 1_000),
            WebhookOutcome::Failed
        );
        assert_eq!(after_failure(&s, 1, 0, 70_000, 0), WebhookOutcome::Failed);
    }
}
