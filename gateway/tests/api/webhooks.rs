//! Merchant webhooks end to end: a tiny receiver on loopback records what the gateway POSTs.
//! Each event arrives signed (`X-Signature`, checked here independently with the merchant's
//! secret), names its payment, is retried with backoff until a 2xx (and never sent again
//! after one), and ends `failed` at its horizon.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use gateway::settlement::{WebhookEvent, WebhookStatus};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::helpers::{
    balance_payment, spawn_app, spawn_app_full, supplier_payment, Backend, ChannelOptions, Store,
    TestApp, ALPHA, BETA,
};

/// Quick ticks and retries, so a test takes well under a second per delivery.
const FAST: &[(&str, &str)] = &[
    ("GATEWAY__WEBHOOKS__INTERVAL_MS", "50"),
    ("GATEWAY__WEBHOOKS__BACKOFF_INITIAL_MS", "20"),
    ("GATEWAY__WEBHOOKS__BACKOFF_MAX_MS", "100"),
    ("GATEWAY__WEBHOOKS__REQUEST_TIMEOUT_MS", "2000"),
];

/// One request the receiver got.
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a webhook body is JSON")
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
    }
}

struct Plan {
    /// Statuses answered first, in order…
    first: VecDeque<u16>,
    /// …then this one, always.
    then: u16,
    /// How long each answer takes.
    delay: Duration,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: usize,
    max_in_flight: usize,
}

/// A loopback receiver answering per its plan and reporting every request.
struct Receiver {
    url: String,
    got: mpsc::UnboundedReceiver<Received>,
    plan: Arc<Mutex<Plan>>,
}

impl Receiver {
    async fn start(first: &[u16], then: u16) -> Self {
        Self::slow(first, then, Duration::ZERO).await
    }

    /// A receiver taking `delay` to answer each request.
    async fn slow(first: &[u16], then: u16, delay: Duration) -> Self {
        let (tx, got) = mpsc::unbounded_channel();
        let plan = Arc::new(Mutex::new(Plan {
            first: first.iter().copied().collect(),
            then,
            delay,
            in_flight: 0,
            max_in_flight: 0,
        }));
        let shared = plan.clone();
        let app = Router::new().route(
            "/hook",
            post(
                move |State(plan): State<Arc<Mutex<Plan>>>, headers: HeaderMap, body: Bytes| {
                    let tx = tx.clone();
                    async move {
                        let (status, delay) = {
                            let mut plan = plan.lock().unwrap();
                            let then = plan.then;
                            plan.in_flight += 1;
                            plan.max_in_flight = plan.max_in_flight.max(plan.in_flight);
                            (plan.first.pop_front().unwrap_or(then), plan.delay)
                        };
                        tokio::time::sleep(delay).await;
                        plan.lock().unwrap().in_flight -= 1;
                        let _ = tx.send(Received { headers, body });
                        StatusCode::from_u16(status).unwrap()
                    }
                },
            )
            .with_state(plan),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url: format!("http://{addr}/hook"),
            got,
            plan: shared,
        }
    }

    fn max_in_flight(&self) -> usize {
        self.plan.lock().unwrap().max_in_flight
    }

    /// The next request, within 10 s.
    async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.got.recv())
            .await
            .expect("a webhook within 10 s")
            .expect("the receiver is running")
    }

    /// Asserts nothing more arrives for `window` (an absence can only be waited for).
    async fn nothing_more(&mut self, window: Duration) {
        if let Ok(Some(extra)) = tokio::time::timeout(window, self.got.recv()).await {
            panic!(
                "an unexpected webhook: {}",
                String::from_utf8_lossy(&extra.body)
            );
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Checks `X-Signature` as a merchant would (docs/webhooks.md), independently of the gateway's
/// code: `t` within 5 minutes, `v1` = hex HMAC-SHA256(secret, "<t>.<body>").
fn assert_signed(got: &Received, secret: &str) {
    let header = got.header("x-signature");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("malformed X-Signature {header:?}"));
    let t_secs: u64 = t.parse().unwrap();
    assert!(t_secs.abs_diff(now_secs()) <= 300, "stale t={t}");
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&got.body);
    let expected = hex::encode(hmac::sign(&key, &signed).as_ref());
    assert_eq!(v1, expected, "the signature verifies with {secret}");
    assert_ne!(
        v1,
        hex::encode(
            hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, b"whsec_test_beta"),
                &signed
            )
            .as_ref()
        ),
        "and not with another merchant's secret"
    );
    assert_eq!(got.header("content-type"), "application/json");
    assert_eq!(
        got.header("x-webhook-id"),
        got.json()["id"].as_str().unwrap()
    );
}

/// Polls the store until the payment's only event of `event_type` satisfies `done` (10 s).
async fn wait_event(
    app: &TestApp,
    payment_id: &str,
    event_type: &str,
    done: impl Fn(&WebhookEvent) -> bool,
) -> WebhookEvent {
    let store = app.settlement_store().await;
    let mut last = None;
    for _ in 0..200 {
        let events = store.webhook_events(payment_id).await.unwrap();
        let mut of_type = events.into_iter().filter(|e| e.event_type == event_type);
        if let Some(e) = of_type.next() {
            assert!(of_type.next().is_none(), "one {event_type} per payment");
            if done(&e) {
                return e;
            }
            last = Some(e);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{payment_id}: {event_type} never got there: {last:?}");
}

async fn app_with(store: Store, extra: &[(&str, &str)], options: &ChannelOptions) -> TestApp {
    let mut overrides = FAST.to_vec();
    overrides.extend_from_slice(extra);
    spawn_app_full(Backend::Memory, store, &overrides, options).await
}

async fn a_balance_payment_sends_one_signed_payment_succeeded(store: Store) {
    let mut receiver = Receiver::start(&[], 200).await;
    let app = app_with(store, &[], &ChannelOptions::default()).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut body = balance_payment("o1", "acc", "12.34");
    body["notify_url"] = json!(receiver.url);
    let paid = app.pay(ALPHA, "k1", body).await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    let id = paid.body["id"].as_str().unwrap();

    let got = receiver.next().await;
    assert_signed(&got, "whsec_test_alpha");
    let event = got.json();
    assert_eq!(event["type"], "payment.succeeded");
    assert!(event["id"].as_str().unwrap().starts_with("evt_"));
    assert!(event["created_at"].as_str().unwrap().ends_with('Z'));
    let payment = &event["data"]["payment"];
    assert_eq!(payment["id"], id);
    assert_eq!(payment["merchant_order_id"], "o1");
    assert_eq!(payment["account_id"], "acc");
    assert_eq!(payment["amount"], "12.34");
    assert_eq!(payment["currency"], "CNY");
    assert_eq!(payment["method"], "balance");
    assert_eq!(payment["status"], "succeeded");
    assert_eq!(event["data"]["settlement"]["kind"], "capture");
    assert_eq!(event["data"]["settlement"]["amount"], "12.34");

    let stored = wait_event(&app, id, "payment.succeeded", |e| {
        e.status == WebhookStatus::Delivered
    })
    .await;
    assert_eq!(stored.id, event["id"].as_str().unwrap());
    assert_eq!((stored.attempts, stored.last_status), (1, Some(200)));
    assert_eq!(
        stored.payload.as_bytes(),
        &got.body[..],
        "the stored body is what was sent"
    );
    let rendered = gateway::webhooks::render_deliveries(&[stored]);
    assert_eq!(rendered[0]["status"], "delivered");
    assert_eq!(rendered[0]["attempts"], 1);

    // A payment with no notify_url, for a merchant with no webhook_url: nowhere to send it,
    // so the event is not written at all (nor the payment's status history: nothing reads
    // them), never claimed by the worker; `GET` shows it `skipped`, derived from the payment.
    let quiet = app
        .pay(ALPHA, "k2", balance_payment("o2", "acc", "1.00"))
        .await;
    assert_eq!(quiet.status, 201, "{:?}", quiet.body);
    let quiet_id = quiet.body["id"].as_str().unwrap();
    assert_eq!(
        quiet.body["webhooks"][0]["status"], "skipped",
        "{:?}",
        quiet.body
    );
    let shown = app.get(&format!("/v1/payments/{quiet_id}"), ALPHA).await;
    assert_eq!(shown.status, 200, "{:?}", shown.body);
    assert_eq!(
        shown.body["webhooks"], quiet.body["webhooks"],
        "GET shows the delivery the creation announced"
    );
    let store = app.settlement_store().await;
    assert_eq!(store.webhook_events(quiet_id).await.unwrap(), Vec::new());
    assert_eq!(store.payment_events(quiet_id).await.unwrap(), Vec::new());
    assert_eq!(store.webhook_backlog().await.unwrap(), 0);
    receiver.nothing_more(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_balance_payment_sends_one_signed_payment_succeeded_sqlite() {
    a_balance_payment_sends_one_signed_payment_succeeded(Store::Sqlite).await;
}

#[tokio::test]
async fn a_balance_payment_sends_one_signed_payment_succeeded_postgres() {
    a_balance_payment_sends_one_signed_payment_succeeded(Store::Postgres).await;
}

/// pay → the channel's callback (or the resolution loop's query) → settlement → webhook.
async fn a_paid_supplier_payment_is_announced_after_its_settlement(store: Store) {
    let mut receiver = Receiver::start(&[], 200).await;
    let options = ChannelOptions {
        auto_pay: true,
        auto_pay_delay_ms: 50,
        ..ChannelOptions::default()
    };
    let app = app_with(
        store,
        &[
            ("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "500"),
            ("GATEWAY__RESOLUTION__BACKOFF_INITIAL_MS", "200"),
        ],
        &options,
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut body = supplier_payment("s1", "acc", "30.00");
    body["notify_url"] = json!(receiver.url);
    let created = app.pay(ALPHA, "k1", body).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["status"], "pending");
    let id = created.body["id"].as_str().unwrap();

    let got = receiver.next().await;
    assert_signed(&got, "whsec_test_alpha");
    let event = got.json();
    assert_eq!(event["type"], "payment.succeeded");
    assert_eq!(event["data"]["payment"]["id"], id);
    assert_eq!(event["data"]["payment"]["method"], "supplier");
    assert_eq!(event["data"]["settlement"]["kind"], "capture");
    assert!(event["data"]["settlement"]["channel_id"]
        .as_str()
        .unwrap()
        .starts_with("supplier-"));
    // Announced only once the money is on disk.
    let stored = app.settlement_store().await.payment(id).await.unwrap();
    assert_eq!(stored.unwrap().status.as_str(), "succeeded");
    wait_event(&app, id, "payment.succeeded", |e| {
        e.status == WebhookStatus::Delivered
    })
    .await;
    receiver.nothing_more(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_paid_supplier_payment_is_announced_after_its_settlement_sqlite() {
    a_paid_supplier_payment_is_announced_after_its_settlement(Store::Sqlite).await;
}

#[tokio::test]
async fn a_paid_supplier_payment_is_announced_after_its_settlement_postgres() {
    a_paid_supplier_payment_is_announced_after_its_settlement(Store::Postgres).await;
}

#[tokio::test]
async fn a_failing_receiver_gets_retries_until_a_2xx_and_never_again() {
    let mut receiver = Receiver::start(&[500, 500], 200).await;
    let app = app_with(Store::Sqlite, &[], &ChannelOptions::default()).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut body = balance_payment("o1", "acc", "5.00");
    body["notify_url"] = json!(receiver.url);
    let paid = app.pay(ALPHA, "k1", body).await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    let id = paid.body["id"].as_str().unwrap();

    let tries = [
        receiver.next().await,
        receiver.next().await,
        receiver.next().await,
    ];
    for got in &tries {
        assert_signed(got, "whsec_test_alpha");
        // The same event every time: the receiver deduplicates on its id.
        assert_eq!(got.body, tries[0].body);
        assert_eq!(got.header("x-webhook-id"), tries[0].header("x-webhook-id"));
    }
    let stored = wait_event(&app, id, "payment.succeeded", |e| {
        e.status == WebhookStatus::Delivered
    })
    .await;
    assert_eq!((stored.attempts, stored.last_status), (3, Some(200)));
    assert_eq!(
        stored.last_error.as_deref(),
        Some("HTTP 500"),
        "kept for history"
    );
    receiver.nothing_more(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_canceled_supplier_payment_sends_payment_canceled() {
    let mut receiver = Receiver::start(&[], 204).await;
    let app = app_with(Store::Sqlite, &[], &ChannelOptions::default()).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut body = supplier_payment("s1", "acc", "40.00");
    body["notify_url"] = json!(receiver.url);
    let pending = app.pay(ALPHA, "k1", body).await;
    assert_eq!(pending.status, 201, "{:?}", pending.body);
    assert_eq!(pending.body["status"], "pending");
    let id = pending.body["id"].as_str().unwrap();
    let canceled = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c1", json!({}))
        .await;
    assert_eq!(canceled.status, 200, "{:?}", canceled.body);
    assert_eq!(canceled.body["status"], "canceled");

    let got = receiver.next().await;
    assert_signed(&got, "whsec_test_alpha");
    let event = got.json();
    assert_eq!(event["type"], "payment.canceled");
    assert_eq!(event["data"]["payment"]["id"], id);
    assert_eq!(event["data"]["payment"]["status"], "canceled");
    assert_eq!(event["data"]["payment"]["amount"], "40.00");
    assert!(event["data"].get("settlement").is_none());
    let stored = wait_event(&app, id, "payment.canceled", |e| {
        e.status == WebhookStatus::Delivered
    })
    .await;
    assert_eq!((stored.attempts, stored.last_status), (1, Some(204)));
    // Canceling again changes nothing and announces nothing.
    let again = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c2", json!({}))
        .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    receiver.nothing_more(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_receiver_that_always_fails_ends_failed_at_the_horizon() {
    let mut receiver = Receiver::start(&[], 503).await;
    let app = app_with(
        Store::Sqlite,
        &[("GATEWAY__WEBHOOKS__HORIZON_SECONDS", "1")],
        &ChannelOptions::default(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut body = balance_payment("o1", "acc", "5.00");
    body["notify_url"] = json!(receiver.url);
    let paid = app.pay(ALPHA, "k1", body).await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    let id = paid.body["id"].as_str().unwrap();

    let failed = wait_event(&app, id, "payment.succeeded", |e| {
        e.status == WebhookStatus::Failed
    })
    .await;
    assert!(failed.attempts >= 2, "retried before giving up: {failed:?}");
    assert_eq!(failed.last_status, Some(503));
    assert_eq!(failed.next_attempt_at_ms, None);
    // Every attempt reached the receiver, and none follows the failure.
    let mut seen = 0;
    while let Ok(got) = receiver.got.try_recv() {
        assert_signed(&got, "whsec_test_alpha");
        seen += 1;
    }
    assert_eq!(seen, failed.attempts);
    receiver.nothing_more(Duration::from_millis(500)).await;
    let stored = app
        .settlement_store()
        .await
        .webhook_events(id)
        .await
        .unwrap();
    assert_eq!(stored, vec![failed]);
}

/// Without a notify_url, the merchant's configured webhook_url, signed with its own secret.
#[tokio::test]
async fn the_merchants_webhook_url_is_used_without_a_notify_url() {
    let mut receiver = Receiver::start(&[], 200).await;
    let url = receiver.url.clone();
    let app = app_with(
        Store::Sqlite,
        &[("GATEWAY__MERCHANTS__BETA__WEBHOOK_URL", &url)],
        &ChannelOptions::default(),
    )
    .await;
    app.funded_account(BETA, "beta", "acc", "100.00", "0.00")
        .await;
    let paid = app
        .pay(BETA, "k1", balance_payment("o1", "acc", "2.00"))
        .await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    let got = receiver.next().await;
    let header = got.header("x-signature").to_owned();
    let t = header
        .split(',')
        .next()
        .and_then(|p| p.strip_prefix("t="))
        .unwrap();
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&got.body);
    let beta = hmac::Key::new(hmac::HMAC_SHA256, b"whsec_test_beta");
    assert!(header.ends_with(&hex::encode(hmac::sign(&beta, &signed).as_ref())));
    assert_eq!(got.json()["data"]["payment"]["id"], paid.body["id"]);
    receiver.nothing_more(Duration::from_millis(300)).await;
}

/// One merchant never has more than `webhooks.per_merchant_concurrency` deliveries in flight:
/// the rest wait in the outbox (deferred, no attempt counted) and all arrive, once each.
#[tokio::test]
async fn a_slow_receiver_gets_at_most_the_merchants_concurrency() {
    let mut receiver = Receiver::slow(&[], 200, Duration::from_millis(150)).await;
    let app = app_with(
        Store::Sqlite,
        &[("GATEWAY__WEBHOOKS__PER_MERCHANT_CONCURRENCY", "2")],
        &ChannelOptions::default(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let mut body = balance_payment(&format!("o{i}"), "acc", "1.00");
        body["notify_url"] = json!(receiver.url);
        let paid = app.pay(ALPHA, &format!("k{i}"), body).await;
        assert_eq!(paid.status, 201, "{:?}", paid.body);
        ids.push(paid.body["id"].as_str().unwrap().to_owned());
    }
    let mut named = Vec::new();
    for _ in 0..6 {
        let got = receiver.next().await;
        named.push(
            got.json()["data"]["payment"]["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    named.sort();
    ids.sort();
    assert_eq!(named, ids, "each payment announced once");
    assert!(
        receiver.max_in_flight() <= 2,
        "{}",
        receiver.max_in_flight()
    );
    for id in &ids {
        let e = wait_event(&app, id, "payment.succeeded", |e| {
            e.status == WebhookStatus::Delivered
        })
        .await;
        assert_eq!(e.attempts, 1, "a deferral is not an attempt");
    }
    receiver.nothing_more(Duration::from_millis(300)).await;
}

/// A merchant's `notify_url` never points into the gateway's own network (its delivery status
/// is shown back to the merchant): the sandbox refuses private, link-local and numeric-name
/// hosts and keeps loopback (its receivers run there); production refuses loopback too
/// (`gateway::webhooks::url`'s unit tests). Nothing is created for a refused URL.
#[tokio::test]
async fn a_notify_url_into_the_gateways_network_is_refused() {
    let app = spawn_app(Backend::Memory).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let with_url = |order: &str, url: &str| {
        let mut body = balance_payment(order, "acc", "10.00");
        body["notify_url"] = json!(url);
        body
    };
    for (i, url) in [
        "https://169.254.169.254/latest/meta-data",
        "https://10.0.0.1/hooks",
        "https://[fd00::1]/hooks",
        "https://2130706433/hooks",
        "http://192.168.1.10:8080/hooks",
    ]
    .into_iter()
    .enumerate()
    {
        let reply = app
            .pay(ALPHA, &format!("bad{i}"), with_url("o1", url))
            .await;
        assert_eq!(reply.status, 400, "{url}: {:?}", reply.body);
        assert_eq!(reply.body["error"]["field"], "notify_url", "{url}");
    }
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
    let reply = app
        .pay(ALPHA, "ok", with_url("o1", "http://127.0.0.1:9/hooks"))
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
}

/// The create answer and a `GET` right after agree on the payment's webhook deliveries: the
/// `payment.succeeded` event its commit enqueued (its id derived, so named without a read).
#[tokio::test]
async fn the_create_answer_and_a_get_agree_on_webhooks() {
    let app = crate::helpers::spawn_app(crate::helpers::Backend::Memory).await;
    app.funded_account(crate::helpers::ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let created = app
        .pay(
            crate::helpers::ALPHA,
            "k1",
            crate::helpers::balance_payment("o1", "acc", "10.00"),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap();
    let read = app
        .get(&format!("/v1/payments/{id}"), crate::helpers::ALPHA)
        .await;
    assert_eq!(read.status, 200);
    let webhooks = &created.body["webhooks"];
    assert_eq!(webhooks.as_array().map(Vec::len), Some(1), "{webhooks}");
    assert_eq!(webhooks[0]["type"], "payment.succeeded");
    assert_eq!(webhooks, &read.body["webhooks"]);
}
