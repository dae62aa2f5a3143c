//! Channel payments end to end over real HTTP: the gateway routes to `channel-sim`'s sandbox
//! channels, fails over only when an attempt certainly did not execute, keeps a payment
//! pending when it cannot know, and learns outcomes through the resolution loop. Every
//! "never twice" claim is checked against the simulator's own record of what it executed.

use std::time::Duration;

use channel_sim::{Faults, OrderRecord, OrderStatus};
use gateway::routing::BreakerSettings;
use serde_json::{json, Value};

use crate::helpers::{
    spawn_app_full, supplier_payment, Backend, ChannelOptions, Store, TestApp, ADMIN, ALPHA,
};
use crate::sim_channels::{
    ALIPAY_BACKUP, ALIPAY_MAIN, SUPPLIER_BACKUP, SUPPLIER_MAIN, WECHATPAY_MAIN,
};

use crate::helpers::FAST_RESOLUTION;

/// The resolution loop out of the way (its first look after an hour).
const NO_RESOLUTION: &[(&str, &str)] = &[("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "3600000")];

async fn app(
    backend: Backend,
    store: Store,
    overrides: &[(&str, &str)],
    options: ChannelOptions,
) -> TestApp {
    spawn_app_full(backend, store, overrides, &options).await
}

fn customer_payment(method: &str, order: &str, amount: &str) -> Value {
    json!({"merchant_order_id": order, "amount": amount, "currency": "CNY", "method": method})
}

/// Every order the simulator executed for this payment, on any of the given channels.
fn executed(app: &TestApp, payment: &Value, channels: &[&str]) -> Vec<OrderRecord> {
    let body = payment["id"]
        .as_str()
        .unwrap()
        .strip_prefix("pay_")
        .unwrap()
        .to_owned();
    channels
        .iter()
        .flat_map(|c| app.channels.orders(c))
        .filter(|o| o.channel_order_id.starts_with(&body))
        .collect()
}

fn attempts(payment: &Value) -> Vec<(String, String)> {
    payment["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["channel_id"].as_str().unwrap().to_owned(),
                a["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn channel_state(app: &TestApp, id: &str) -> String {
    let listed = app.get("/v1/admin/channels", ADMIN).await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    listed.body["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("channel {id} is listed"))["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn supplier_charge_is_captured_once_through_the_resolution_loop(
    backend: Backend,
    store: Store,
) {
    // Paid a while after its create, so the hold is still there when the test looks (the
    // create's answer waits on two commits; a slow machine must not capture it first).
    let options = ChannelOptions {
        auto_pay: true,
        auto_pay_delay_ms: 1_000,
        ..ChannelOptions::default()
    };
    let app = app(backend, store, FAST_RESOLUTION, options).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let created = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "25.00"))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["status"], "pending");
    assert_eq!(
        attempts(&created.body),
        vec![(SUPPLIER_MAIN.to_owned(), "accepted".to_owned())]
    );
    let attempt = &created.body["attempts"][0];
    assert!(attempt["latency_ms"].as_u64().is_some());
    let order_id = attempt["channel_order_id"].as_str().unwrap();
    assert!(order_id.len() <= 32);
    // Held while pending.
    app.assert_account(ALPHA, "acc", "100.00", "25.00", "75.00")
        .await;

    let id = created.body["id"].as_str().unwrap();
    let done = app
        .wait_payment(id, "succeeded with its attempt", |p| {
            p["status"] == "succeeded" && p["attempts"][0]["outcome"] == "succeeded"
        })
        .await;
    assert_eq!(attempts(&done)[0].1, "succeeded");
    // Captured exactly once.
    app.assert_account(ALPHA, "acc", "75.00", "0.00", "75.00")
        .await;
    let orders = executed(&app, &created.body, &[SUPPLIER_MAIN, SUPPLIER_BACKUP]);
    assert_eq!(orders.len(), 1);
    assert_eq!(
        (orders[0].status, orders[0].amount_cents),
        (OrderStatus::Paid, 2_500)
    );
    // On disk: the payment succeeded, one capture settlement, and the attempt.
    let disk = app.settlement_store().await;
    let mut row = None;
    for _ in 0..100 {
        row = disk.payment(id).await.unwrap();
        if row
            .as_ref()
            .is_some_and(|r| r.status.as_str() == "succeeded")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(row.unwrap().status.as_str(), "succeeded");
    let movements: Vec<_> = disk
        .postings_sum_by_movement()
        .await
        .unwrap()
        .into_iter()
        .filter(|(p, _, _, _)| p == id)
        .collect();
    assert_eq!(movements.len(), 1, "{movements:?}");
    assert_eq!(movements[0].1, "capture");
    let stored = disk.attempts(id).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].channel_order_id, order_id);
    // A replay of the create answers the payment as it stands.
    let replay = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "25.00"))
        .await;
    assert_eq!((replay.status, replay.body["id"].as_str()), (201, Some(id)));
}

#[tokio::test]
async fn supplier_charge_is_captured_once_on_redis_and_sqlite() {
    supplier_charge_is_captured_once_through_the_resolution_loop(Backend::Redis, Store::Sqlite)
        .await;
}

#[tokio::test]
async fn supplier_charge_is_captured_once_in_process_and_on_postgres() {
    supplier_charge_is_captured_once_through_the_resolution_loop(Backend::Memory, Store::Postgres)
        .await;
}

/// Alipay: its query says "no such trade" until the code is scanned; once auto-paid, the
/// loop's query finds it paid and the collection is recorded (no account moves).
#[tokio::test]
async fn an_auto_paid_alipay_charge_succeeds_through_the_resolution_loop() {
    let options = ChannelOptions {
        auto_pay: true,
        auto_pay_delay_ms: 300,
        ..ChannelOptions::default()
    };
    let app = app(Backend::Redis, Store::Sqlite, FAST_RESOLUTION, options).await;
    let created = app
        .pay(ALPHA, "a1", customer_payment("alipay", "ali-1", "88.88"))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["action"]["type"], "qr_code");
    assert!(created.body["action"]["qr_code"]
        .as_str()
        .unwrap()
        .starts_with("http"));
    assert_eq!(
        attempts(&created.body),
        vec![(ALIPAY_MAIN.to_owned(), "accepted".to_owned())]
    );
    let id = created.body["id"].as_str().unwrap();
    let done = app.wait_status(id, "succeeded").await;
    assert_eq!(done["action"], Value::Null, "nothing left to do once paid");
    let orders = executed(&app, &created.body, &[ALIPAY_MAIN, ALIPAY_BACKUP]);
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].status, OrderStatus::Paid);
    let disk = app.settlement_store().await;
    for _ in 0..100 {
        if disk.payment(id).await.unwrap().unwrap().status.as_str() == "succeeded" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the collection never reached the store");
}

/// A checkout waits on two commits (intent, then its success), not three: the accepted
/// attempt's outcome rides a later group commit, and until it lands the balance store's
/// acceptance answers. A replay right after the `201` is that `201`, action and all; `GET`
/// shows the accepted attempt; the store gets it (and the resolution loop, an hour away, is
/// not what writes it).
async fn an_accepted_checkout_replays_its_action_before_the_attempt_is_committed(backend: Backend) {
    // Wide commit spacing: the accepted attempt's write waits well after the answer.
    let overrides = &[
        ("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "3600000"),
        ("GATEWAY__STORE__COMMIT_SPACING_US", "100000"),
    ];
    let app = app(backend, Store::Sqlite, overrides, ChannelOptions::default()).await;
    let body = customer_payment("alipay", "ali-acc-1", "66.60");
    let created = app.pay(ALPHA, "acc-1", body.clone()).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["action"]["type"], "qr_code");
    let id = created.body["id"].as_str().unwrap();
    let replay = app.pay(ALPHA, "acc-1", body.clone()).await;
    assert_eq!(replay.status, 201, "{:?}", replay.body);
    assert_eq!(replay.body, created.body, "the replay is the first answer");
    let read = app.get(&format!("/v1/payments/{id}"), ALPHA).await;
    assert_eq!(read.status, 200, "{:?}", read.body);
    assert_eq!(read.body["action"], created.body["action"]);
    assert_eq!(read.body["attempts"], created.body["attempts"]);
    assert_eq!(
        attempts(&read.body),
        vec![(ALIPAY_MAIN.to_owned(), "accepted".to_owned())]
    );
    // A changed request under the key is still refused, and the order id stays taken.
    let changed = app
        .pay(
            ALPHA,
            "acc-1",
            customer_payment("alipay", "ali-acc-1", "66.61"),
        )
        .await;
    assert_eq!(changed.status, 409, "{:?}", changed.body);
    assert_eq!(changed.body["error"]["code"], "idempotency_conflict");
    let disk = app.settlement_store().await;
    let mut stored = Vec::new();
    for _ in 0..200 {
        stored = disk.attempts(id).await.unwrap();
        if stored.first().map(|a| a.outcome.as_str()) == Some("accepted") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].outcome.as_str(), "accepted", "{stored:?}");
    let action: Value = serde_json::from_str(stored[0].action.as_deref().unwrap()).unwrap();
    assert_eq!(action, created.body["action"]);
    // Once it is: the same answer, now from the store's row.
    let again = app.pay(ALPHA, "acc-1", body).await;
    assert_eq!(again.body, created.body);
    assert_eq!(
        executed(&app, &created.body, &[ALIPAY_MAIN, ALIPAY_BACKUP]).len(),
        1
    );
}

#[tokio::test]
async fn an_accepted_checkout_replays_at_once_on_redis() {
    an_accepted_checkout_replays_its_action_before_the_attempt_is_committed(Backend::Redis).await;
}

#[tokio::test]
async fn an_accepted_checkout_replays_at_once_in_process() {
    an_accepted_checkout_replays_its_action_before_the_attempt_is_committed(Backend::Memory).await;
}

/// WeChat Pay: the loop's query (`GET …/out-trade-no/{no}?mchid=…`, signed over the path and
/// query) is accepted by the simulator and finds the order paid.
#[tokio::test]
async fn an_auto_paid_wechat_pay_charge_is_found_by_its_signed_query() {
    let options = ChannelOptions {
        auto_pay: true,
        auto_pay_delay_ms: 100,
        ..ChannelOptions::default()
    };
    let app = app(Backend::Memory, Store::Sqlite, FAST_RESOLUTION, options).await;
    let created = app
        .pay(ALPHA, "w1", customer_payment("wechatpay", "wx-1", "12.34"))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["action"]["type"], "qr_code");
    assert_eq!(
        attempts(&created.body),
        vec![(WECHATPAY_MAIN.to_owned(), "accepted".to_owned())]
    );
    let id = created.body["id"].as_str().unwrap();
    app.wait_status(id, "succeeded").await;
    assert_eq!(executed(&app, &created.body, &[WECHATPAY_MAIN]).len(), 1);
}

/// A top-up credits the account once the channel confirms it, and only then.
#[tokio::test]
async fn a_topup_credits_the_account_once_when_paid() {
    let options = ChannelOptions {
        auto_pay: true,
        auto_pay_delay_ms: 200,
        ..ChannelOptions::default()
    };
    let app = app(Backend::Redis, Store::Sqlite, FAST_RESOLUTION, options).await;
    app.funded_account(ALPHA, "alpha", "acc", "10.00", "0.00")
        .await;
    let created = app
        .post(
            "/v1/accounts/acc/topups",
            ALPHA,
            "t1",
            json!({"amount": "50.00", "method": "supplier"}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(
        (
            &created.body["purpose"],
            &created.body["status"],
            &created.body["account_id"]
        ),
        (&json!("topup"), &json!("pending"), &json!("acc"))
    );
    // Nothing credited (or held) before the channel confirms.
    app.assert_account(ALPHA, "acc", "10.00", "0.00", "10.00")
        .await;
    let id = created.body["id"].as_str().unwrap();
    app.wait_status(id, "succeeded").await;
    app.assert_account(ALPHA, "acc", "60.00", "0.00", "60.00")
        .await;
    // Bad top-ups change nothing.
    for (body, field) in [
        (json!({"amount": "5.00", "method": "balance"}), "method"),
        (json!({"amount": "-5.00", "method": "alipay"}), "amount"),
        (
            json!({"amount": "5.00", "method": "alipay", "currency": "USD"}),
            "currency",
        ),
        (
            json!({"amount": "5.00", "method": "alipay", "extra": 1}),
            "extra",
        ),
    ] {
        let refused = app
            .post("/v1/accounts/acc/topups", ALPHA, "t-bad", body)
            .await;
        assert_eq!(
            (refused.status, refused.code()),
            (400, "invalid_request"),
            "{:?}",
            refused.body
        );
        assert_eq!(refused.body["error"]["field"], field);
    }
    let missing = app
        .post(
            "/v1/accounts/nobody/topups",
            ALPHA,
            "t-none",
            json!({"amount": "5.00", "method": "alipay"}),
        )
        .await;
    assert_eq!(missing.status, 404);
    app.assert_account(ALPHA, "acc", "60.00", "0.00", "60.00")
        .await;
}

/// A dead primary (connection refused) costs nothing: every payment fails over to the
/// backup at once, the breaker opens after its consecutive-failure rule and traffic goes
/// straight to the backup; once the primary is back, a half-open probe closes the breaker.
#[tokio::test]
async fn a_primary_outage_opens_its_breaker_moves_traffic_to_the_backup_and_recovers() {
    let options = ChannelOptions {
        breaker: BreakerSettings {
            consecutive_failures_to_open: 3,
            cool_down_initial_ms: 300,
            half_open_probes: 1,
            ..BreakerSettings::default()
        },
        ..ChannelOptions::default()
    };
    let app = app(Backend::Redis, Store::Sqlite, NO_RESOLUTION, options).await;
    app.funded_account(ALPHA, "alpha", "acc", "1000.00", "0.00")
        .await;
    app.channels.set_faults(
        SUPPLIER_MAIN,
        Faults {
            outage: true,
            ..Faults::default()
        },
    );

    let mut paid = Vec::new();
    for i in 0..6 {
        let created = app
            .pay(
                ALPHA,
                &format!("k{i}"),
                supplier_payment(&format!("o{i}"), "acc", "10.00"),
            )
            .await;
        assert_eq!(created.status, 201, "{:?}", created.body);
        let expected = if i < 3 {
            // Tried, refused (nothing sent), then the backup.
            vec![
                (SUPPLIER_MAIN.to_owned(), "refused".to_owned()),
                (SUPPLIER_BACKUP.to_owned(), "accepted".to_owned()),
            ]
        } else {
            // The breaker is open: the primary is not even tried.
            vec![(SUPPLIER_BACKUP.to_owned(), "accepted".to_owned())]
        };
        assert_eq!(attempts(&created.body), expected, "payment {i}");
        paid.push(created.body);
    }
    assert_eq!(channel_state(&app, SUPPLIER_MAIN).await, "open");
    assert_eq!(channel_state(&app, SUPPLIER_BACKUP).await, "closed");

    // Back up; after the cool-down a probe goes to the primary and closes the breaker.
    app.channels.set_faults(SUPPLIER_MAIN, Faults::default());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let probe = app
        .pay(
            ALPHA,
            "k-probe",
            supplier_payment("o-probe", "acc", "10.00"),
        )
        .await;
    assert_eq!(probe.status, 201, "{:?}", probe.body);
    assert_eq!(
        attempts(&probe.body),
        vec![(SUPPLIER_MAIN.to_owned(), "accepted".to_owned())]
    );
    assert_eq!(channel_state(&app, SUPPLIER_MAIN).await, "closed");
    paid.push(probe.body);

    // Each payment executed exactly once, and seven holds are live.
    for payment in &paid {
        assert_eq!(
            executed(&app, payment, &[SUPPLIER_MAIN, SUPPLIER_BACKUP]).len(),
            1
        );
    }
    app.assert_account(ALPHA, "acc", "1000.00", "70.00", "930.00")
        .await;
}

/// A primary that accepts requests and never answers: the attempt is unknown, its close
/// hangs too, so the payment stays pending with its hold and NO other channel is tried —
/// also when attempts would remain.
#[tokio::test]
async fn a_hung_primary_never_yields_a_second_execution() {
    let options = ChannelOptions {
        request_timeout_ms: 300,
        ..ChannelOptions::default()
    };
    let app = app(Backend::Redis, Store::Sqlite, NO_RESOLUTION, options).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    app.channels.set_faults(
        SUPPLIER_MAIN,
        Faults {
            hang: true,
            ..Faults::default()
        },
    );
    app.channels.set_faults(
        ALIPAY_MAIN,
        Faults {
            hang: true,
            ..Faults::default()
        },
    );

    let supplier = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "30.00"))
        .await;
    assert_eq!(supplier.status, 201, "{:?}", supplier.body);
    assert_eq!(supplier.body["status"], "pending");
    assert_eq!(
        attempts(&supplier.body),
        vec![(SUPPLIER_MAIN.to_owned(), "unknown".to_owned())]
    );
    app.assert_account(ALPHA, "acc", "100.00", "30.00", "70.00")
        .await;
    assert!(
        app.channels.orders(SUPPLIER_BACKUP).is_empty(),
        "never sent to the backup"
    );

    let alipay = app
        .pay(ALPHA, "a1", customer_payment("alipay", "ali-1", "5.00"))
        .await;
    assert_eq!(alipay.status, 201, "{:?}", alipay.body);
    assert_eq!(
        (&alipay.body["status"], &alipay.body["action"]),
        (&json!("pending"), &Value::Null)
    );
    assert_eq!(
        attempts(&alipay.body),
        vec![(ALIPAY_MAIN.to_owned(), "unknown".to_owned())]
    );
    assert!(
        app.channels.orders(ALIPAY_BACKUP).is_empty(),
        "never sent to the backup"
    );
    // The hung channel's own record: at most one order per payment.
    assert!(executed(&app, &supplier.body, &[SUPPLIER_MAIN]).len() <= 1);
    assert!(executed(&app, &alipay.body, &[ALIPAY_MAIN]).len() <= 1);
}

/// A channel that refuses our signature is refused (not executed) and counted; the payment
/// moves to the backup, which executes it once.
#[tokio::test]
async fn a_channel_refusing_our_signature_is_skipped_for_the_backup() {
    let options = ChannelOptions {
        wrong_key_for: Some(ALIPAY_MAIN),
        ..ChannelOptions::default()
    };
    let app = app(Backend::Memory, Store::Sqlite, NO_RESOLUTION, options).await;
    let created = app
        .pay(ALPHA, "a1", customer_payment("alipay", "ali-1", "9.99"))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(
        attempts(&created.body),
        vec![
            (ALIPAY_MAIN.to_owned(), "refused".to_owned()),
            (ALIPAY_BACKUP.to_owned(), "accepted".to_owned()),
        ]
    );
    assert!(app.channels.orders(ALIPAY_MAIN).is_empty());
    assert_eq!(executed(&app, &created.body, &[ALIPAY_BACKUP]).len(), 1);
}

/// The per-channel in-flight limit holds under a burst: beyond it a call is refused before
/// it is sent (so it fails over), and the simulator never sees more than the limit.
#[tokio::test]
async fn the_in_flight_limit_holds_under_a_burst() {
    let options = ChannelOptions {
        max_in_flight: 2,
        request_timeout_ms: 5_000,
        ..ChannelOptions::default()
    };
    let app = std::sync::Arc::new(app(Backend::Redis, Store::Sqlite, NO_RESOLUTION, options).await);
    app.funded_account(ALPHA, "alpha", "acc", "1000.00", "0.00")
        .await;
    for channel in [SUPPLIER_MAIN, SUPPLIER_BACKUP] {
        app.channels.set_faults(
            channel,
            Faults {
                latency_ms: 2_500,
                ..Faults::default()
            },
        );
    }
    let mut tasks = Vec::new();
    for i in 0..10 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.pay(
                ALPHA,
                &format!("b{i}"),
                supplier_payment(&format!("b{i}"), "acc", "10.00"),
            )
            .await
        }));
    }
    let mut created = 0;
    let mut unavailable = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            201 => created += 1,
            503 => {
                assert_eq!(reply.code(), "no_channel_available", "{:?}", reply.body);
                assert!(reply.body["error"]["payment_id"].as_str().is_some());
                unavailable += 1;
            }
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    let main = app.channels.orders(SUPPLIER_MAIN).len();
    let backup = app.channels.orders(SUPPLIER_BACKUP).len();
    assert!(main <= 2 && backup <= 2, "main {main}, backup {backup}");
    assert_eq!(created, main + backup);
    assert_eq!(created + unavailable, 10);
    assert!(unavailable >= 6);
    // Only the created payments hold money; the refused ones released theirs.
    let held = format!("{}.00", created * 10);
    let available = format!("{}.00", 1000 - created * 10);
    app.assert_account(ALPHA, "acc", "1000.00", &held, &available)
        .await;
}

/// Every candidate down: `503 no_channel_available` with the payment's id, the hold released,
/// the answer replayed for the same key, and the order id free again.
#[tokio::test]
async fn no_channel_available_releases_the_hold_and_replays() {
    let app = app(
        Backend::Redis,
        Store::Sqlite,
        NO_RESOLUTION,
        ChannelOptions::default(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    for channel in [SUPPLIER_MAIN, SUPPLIER_BACKUP] {
        app.channels.set_faults(
            channel,
            Faults {
                outage: true,
                ..Faults::default()
            },
        );
    }
    let refused = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "40.00"))
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (503, "no_channel_available"),
        "{:?}",
        refused.body
    );
    let id = refused.body["error"]["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
    let payment = app.get(&format!("/v1/payments/{id}"), ALPHA).await;
    assert_eq!(payment.body["status"], "failed");
    assert_eq!(
        attempts(&payment.body),
        vec![
            (SUPPLIER_MAIN.to_owned(), "refused".to_owned()),
            (SUPPLIER_BACKUP.to_owned(), "refused".to_owned()),
        ]
    );
    let replay = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "40.00"))
        .await;
    assert_eq!(
        (replay.status, replay.code()),
        (503, "no_channel_available")
    );
    assert_eq!(replay.body["error"]["payment_id"], id.as_str());
    // Customer payments too (nothing held for them).
    for channel in [ALIPAY_MAIN, ALIPAY_BACKUP] {
        app.channels.set_faults(
            channel,
            Faults {
                outage: true,
                ..Faults::default()
            },
        );
    }
    let alipay = app
        .pay(ALPHA, "a1", customer_payment("alipay", "ali-1", "1.00"))
        .await;
    assert_eq!(
        (alipay.status, alipay.code()),
        (503, "no_channel_available")
    );

    // The channels are back: the same order id makes a new payment.
    app.channels.set_faults(SUPPLIER_BACKUP, Faults::default());
    let again = app
        .pay(ALPHA, "k2", supplier_payment("o1", "acc", "40.00"))
        .await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_ne!(again.body["id"], id.as_str());
    app.assert_account(ALPHA, "acc", "100.00", "40.00", "60.00")
        .await;
}

/// Cancel closes the channel order first: paid → the payment succeeds (captured once) and
/// the cancel answers 422; unpaid → canceled, the hold released, the order closed.
#[tokio::test]
async fn cancel_closes_the_channel_order_first() {
    let app = app(
        Backend::Redis,
        Store::Sqlite,
        NO_RESOLUTION,
        ChannelOptions::default(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;

    let paid = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "20.00"))
        .await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    let order = paid.body["attempts"][0]["channel_order_id"]
        .as_str()
        .unwrap();
    assert!(matches!(
        app.channels.sim.pay(order),
        channel_sim::PayOutcome::Paid(_)
    ));
    let id = paid.body["id"].as_str().unwrap();
    let cancel = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c1", json!({}))
        .await;
    assert_eq!(
        (cancel.status, cancel.code()),
        (422, "invalid_state"),
        "{:?}",
        cancel.body
    );
    assert_eq!(cancel.body["error"]["status"], "succeeded");
    let now = app.get(&format!("/v1/payments/{id}"), ALPHA).await;
    assert_eq!(now.body["status"], "succeeded");
    app.assert_account(ALPHA, "acc", "80.00", "0.00", "80.00")
        .await;
    // Canceling again changes nothing.
    let again = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c2", json!({}))
        .await;
    assert_eq!(again.status, 422);
    app.assert_account(ALPHA, "acc", "80.00", "0.00", "80.00")
        .await;

    let unpaid = app
        .pay(ALPHA, "k2", supplier_payment("o2", "acc", "30.00"))
        .await;
    assert_eq!(unpaid.status, 201, "{:?}", unpaid.body);
    app.assert_account(ALPHA, "acc", "80.00", "30.00", "50.00")
        .await;
    let id = unpaid.body["id"].as_str().unwrap();
    let order = unpaid.body["attempts"][0]["channel_order_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let canceled = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c3", json!({}))
        .await;
    assert_eq!(canceled.status, 200, "{:?}", canceled.body);
    assert_eq!(canceled.body["status"], "canceled");
    assert_eq!(attempts(&canceled.body)[0].1, "closed");
    app.assert_account(ALPHA, "acc", "80.00", "0.00", "80.00")
        .await;
    let record = app.channels.sim.order(&order).unwrap();
    assert_eq!(record.status, OrderStatus::Closed);
    // The customer can no longer pay a canceled order.
    assert!(matches!(
        app.channels.sim.pay(&order),
        channel_sim::PayOutcome::Closed(_)
    ));

    // A channel that cannot confirm: 503, nothing changed.
    let stuck = app
        .pay(ALPHA, "k3", supplier_payment("o3", "acc", "5.00"))
        .await;
    let id = stuck.body["id"].as_str().unwrap();
    app.channels.set_faults(
        SUPPLIER_MAIN,
        Faults {
            outage: true,
            ..Faults::default()
        },
    );
    let refused = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c4", json!({}))
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (503, "unavailable"),
        "{:?}",
        refused.body
    );
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "pending"
    );
    app.assert_account(ALPHA, "acc", "80.00", "5.00", "75.00")
        .await;
}

/// At its expiry, a payment nobody paid is closed at the channel and ends `expired`, its hold
/// released; the channel refuses a later payment.
#[tokio::test]
async fn an_unpaid_payment_is_closed_and_expired_at_its_expiry() {
    let mut overrides = FAST_RESOLUTION.to_vec();
    overrides.push(("GATEWAY__PAYMENTS__MIN_EXPIRES_IN_SECONDS", "1"));
    let app = app(
        Backend::Memory,
        Store::Sqlite,
        &overrides,
        ChannelOptions::default(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut body = supplier_payment("o1", "acc", "15.00");
    body["expires_in_seconds"] = json!(2);
    let created = app.pay(ALPHA, "k1", body).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap();
    let order = created.body["attempts"][0]["channel_order_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = app
        .wait_payment(id, "expired with its attempt closed", |p| {
            p["status"] == "expired" && p["attempts"][0]["outcome"] == "closed"
        })
        .await;
    assert_eq!(attempts(&done)[0].1, "closed");
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
    assert!(!matches!(
        app.channels.sim.pay(&order),
        channel_sim::PayOutcome::Paid(_)
    ));
}
