//! `POST /v1/callbacks/{channel_id}` end to end: the simulator's genuine callbacks settle a
//! payment exactly once (and are acknowledged only then); forged, stale, mismatched and
//! unknown ones are refused with nothing changed; duplicates, replays and out-of-order notices
//! change nothing; money for a payment that already ended is acknowledged, held in suspense
//! and flagged.
//!
//! Forged and hand-made callbacks are signed here "as the channel" with the test-only fixture
//! keys the simulator uses (the channel's side of each key pair).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use channel_sim::{CallbackPolicy, Faults};
use gateway::channels::keys::RsaPrivateKey;
use gateway::channels::{alipay, supplier, wechatpay};
use gateway::secret::Secret;
use gateway::settlement::AttemptOutcome;
use serde_json::{json, Value};

use crate::helpers::{
    spawn_app_full, supplier_payment, Backend, ChannelOptions, Store, TestApp, ADMIN, ALPHA,
};
use crate::sim_channels::{
    key_path, ALIPAY_MAIN, API_V3_KEY, APPID, MCHID, PLATFORM_PRIVATE, PLATFORM_SERIAL,
    SUPPLIER_MAIN, SUPPLIER_SECRET, WECHATPAY_MAIN,
};

/// The resolution loop out of the way: only callbacks settle here.
const CALLBACKS_ONLY: &[(&str, &str)] = &[("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "3600000")];

fn retrying_callbacks() -> CallbackPolicy {
    CallbackPolicy {
        max_attempts: 6,
        initial_backoff_ms: 100,
        max_backoff_ms: 400,
        attempt_timeout_ms: 2_000,
        trade_finished_delay_ms: None,
    }
}

fn auto_paid() -> ChannelOptions {
    ChannelOptions {
        auto_pay: true,
        auto_pay_delay_ms: 50,
        callbacks: retrying_callbacks(),
        ..ChannelOptions::default()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn customer_payment(method: &str, order: &str, amount: &str) -> Value {
    json!({"merchant_order_id": order, "amount": amount, "currency": "CNY", "method": method})
}

/// Waits until the store has the payment in `want` (bounded).
async fn wait_on_disk(app: &TestApp, id: &str, want: &str) {
    let disk = app.settlement_store().await;
    for _ in 0..200 {
        if disk
            .payment(id)
            .await
            .unwrap()
            .is_some_and(|r| r.status.as_str() == want)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("payment {id} never reached {want} on disk");
}

/// The simulator records a callback once the gateway's answer is back, which can be after the
/// gateway committed: polls the channel's record of `order` until `done` holds (bounded: 10 s)
/// and returns it either way, for the caller to assert on.
async fn sim_order_until(
    app: &TestApp,
    order: &str,
    done: impl Fn(&channel_sim::OrderRecord) -> bool,
) -> channel_sim::OrderRecord {
    let mut record = app
        .channels
        .sim
        .order(order)
        .expect("the channel has the order");
    for _ in 0..200 {
        if done(&record) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        record = app
            .channels
            .sim
            .order(order)
            .expect("the channel has the order");
    }
    record
}

fn any_acknowledged(record: &channel_sim::OrderRecord) -> bool {
    record.callbacks.iter().any(|c| c.acknowledged)
}

/// The movements committed for a payment, as (kind, sequence).
async fn movements(app: &TestApp, id: &str) -> Vec<(String, u32)> {
    let mut found: Vec<(String, u32)> = app
        .settlement_store()
        .await
        .postings_sum_by_movement()
        .await
        .unwrap()
        .into_iter()
        .filter(|(p, _, _, _)| p == id)
        .map(|(_, kind, sequence, _)| (kind, sequence))
        .collect();
    found.sort();
    found.dedup();
    found
}

fn order_of(payment: &Value) -> String {
    payment["attempts"][0]["channel_order_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

// --- Callbacks made by hand, as the channel would sign them --------------------------------

fn platform_key() -> RsaPrivateKey {
    RsaPrivateKey::from_pem_file(&key_path(PLATFORM_PRIVATE)).unwrap()
}

/// An Alipay notice form, signed with `key` (Alipay's side of the pair unless forging).
fn alipay_form(fields: &[(&str, &str)], key: &RsaPrivateKey) -> Vec<u8> {
    let mut params: Vec<(&str, &str)> = fields.to_vec();
    params.push(("sign_type", "RSA2"));
    let sign = alipay::sign(key, &alipay::verify_notify_content(&params));
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &params {
        form.append_pair(k, v);
    }
    form.append_pair("sign", &sign);
    form.finish().into_bytes()
}

fn alipay_paid(order: &str, amount: &str, status: &str, app_id: &str) -> Vec<(String, String)> {
    vec![
        ("notify_id".into(), format!("n-{order}-{status}")),
        ("notify_type".into(), "trade_status_sync".into()),
        ("notify_time".into(), "2026-11-26 12:00:00".into()),
        ("charset".into(), "utf-8".into()),
        ("version".into(), "1.0".into()),
        ("app_id".into(), app_id.into()),
        ("trade_no".into(), format!("2026{order}")),
        ("out_trade_no".into(), order.into()),
        ("total_amount".into(), amount.into()),
        ("trade_status".into(), status.into()),
    ]
}

async fn post_alipay(
    app: &TestApp,
    fields: &[(String, String)],
    key: &RsaPrivateKey,
) -> (u16, String) {
    let borrowed: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let reply = app
        .post_raw(
            &format!("/v1/callbacks/{ALIPAY_MAIN}"),
            &[(
                "content-type",
                "application/x-www-form-urlencoded;charset=utf-8",
            )],
            alipay_form(&borrowed, key),
        )
        .await;
    (
        reply.status,
        reply.body.as_str().unwrap_or_default().to_owned(),
    )
}

async fn post_supplier(app: &TestApp, body: Value, secret: &str, t: u64) -> u16 {
    let bytes = body.to_string().into_bytes();
    let key = supplier::SupplierKey::new(&Secret::new(secret)).unwrap();
    let signature = supplier::signature_header(&key, t, &bytes);
    app.post_raw(
        &format!("/v1/callbacks/{SUPPLIER_MAIN}"),
        &[
            ("content-type", "application/json"),
            ("x-signature", &signature),
        ],
        bytes,
    )
    .await
    .status
}

fn supplier_notice(order: &str, status: &str, amount: &str) -> Value {
    json!({"order_id": order, "supplier_order_id": format!("S-{order}"), "status": status,
           "amount": amount, "currency": "CNY"})
}

/// A WeChat Pay `TRANSACTION.SUCCESS` notice with headers; `signature` overrides the real one.
async fn post_wechat(app: &TestApp, order: &str, total: i64, signature: Option<&str>) -> u16 {
    let transaction = json!({
        "appid": APPID, "mchid": MCHID, "out_trade_no": order,
        "transaction_id": format!("4200{order}"), "trade_type": "NATIVE",
        "trade_state": "SUCCESS", "trade_state_desc": "支付成功",
        "success_time": "2026-11-26T12:00:00+08:00",
        "amount": {"total": total, "payer_total": total, "currency": "CNY", "payer_currency": "CNY"},
    });
    let key = wechatpay::ApiV3Key::new(&Secret::new(API_V3_KEY)).unwrap();
    let resource = wechatpay::encrypt_resource(
        &key,
        "0123456789ab",
        "transaction",
        transaction.to_string().as_bytes(),
    )
    .unwrap();
    let body = json!({
        "id": format!("EV-{order}"), "create_time": "2026-11-26T12:00:00+08:00",
        "resource_type": "encrypt-resource", "event_type": "TRANSACTION.SUCCESS",
        "summary": "支付成功", "resource": resource,
    })
    .to_string();
    let t = now_secs();
    let nonce = "n0nce-callback-test";
    let real = wechatpay::sign_response(&platform_key(), t, nonce, &body);
    let t = t.to_string();
    app.post_raw(
        &format!("/v1/callbacks/{WECHATPAY_MAIN}"),
        &[
            ("content-type", "application/json"),
            ("wechatpay-timestamp", &t),
            ("wechatpay-nonce", nonce),
            ("wechatpay-signature", signature.unwrap_or(&real)),
            ("wechatpay-serial", PLATFORM_SERIAL),
            ("wechatpay-signature-type", "WECHATPAY2-SHA256-RSA2048"),
        ],
        body.into_bytes(),
    )
    .await
    .status
}

// --- The simulator's genuine callbacks -------------------------------------------------------

async fn a_paid_callback_settles_the_payment_once(
    method: &str,
    channel: &str,
    backend: Backend,
    store: Store,
) {
    let app = spawn_app_full(backend, store, CALLBACKS_ONLY, &auto_paid()).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let body = if method == "supplier" {
        supplier_payment("o1", "acc", "42.00")
    } else {
        customer_payment(method, "o1", "42.00")
    };
    let created = app.pay(ALPHA, "k1", body).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["attempts"][0]["channel_id"], channel);
    let id = created.body["id"].as_str().unwrap();
    app.wait_status(id, "succeeded").await;
    wait_on_disk(&app, id, "succeeded").await;
    assert_eq!(movements(&app, id).await, vec![("capture".to_owned(), 0)]);
    if method == "supplier" {
        app.assert_account(ALPHA, "acc", "58.00", "0.00", "58.00")
            .await;
    } else {
        app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
            .await;
    }
    // The channel's record: its (first) callback acknowledged, on the first attempt.
    let record = sim_order_until(&app, &order_of(&created.body), any_acknowledged).await;
    let first = record.callbacks.first().expect("a callback was sent");
    assert!(first.acknowledged, "{:?}", record.callbacks);
    assert_eq!(first.attempt, 1);
}

#[tokio::test]
async fn an_alipay_callback_settles_once_in_process_on_sqlite() {
    a_paid_callback_settles_the_payment_once("alipay", ALIPAY_MAIN, Backend::Memory, Store::Sqlite)
        .await;
}

#[tokio::test]
async fn a_wechat_pay_callback_settles_once_on_redis_and_postgres() {
    a_paid_callback_settles_the_payment_once(
        "wechatpay",
        WECHATPAY_MAIN,
        Backend::Redis,
        Store::Postgres,
    )
    .await;
}

#[tokio::test]
async fn a_supplier_callback_captures_once_on_redis_and_sqlite() {
    a_paid_callback_settles_the_payment_once(
        "supplier",
        SUPPLIER_MAIN,
        Backend::Redis,
        Store::Sqlite,
    )
    .await;
}

#[tokio::test]
async fn a_supplier_callback_captures_once_in_process_on_postgres() {
    a_paid_callback_settles_the_payment_once(
        "supplier",
        SUPPLIER_MAIN,
        Backend::Memory,
        Store::Postgres,
    )
    .await;
}

/// The simulator sends every acknowledged callback once more: the second is acknowledged
/// too and changes nothing.
#[tokio::test]
async fn duplicated_callbacks_settle_once() {
    let app = spawn_app_full(Backend::Redis, Store::Sqlite, CALLBACKS_ONLY, &auto_paid()).await;
    app.channels.set_faults(
        SUPPLIER_MAIN,
        Faults {
            callback_duplicate: true,
            ..Faults::default()
        },
    );
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let created = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "10.00"))
        .await;
    let id = created.body["id"].as_str().unwrap();
    app.wait_status(id, "succeeded").await;
    let order = order_of(&created.body);
    let callbacks = sim_order_until(&app, &order, |r| r.callbacks.iter().any(|c| c.duplicate))
        .await
        .callbacks;
    assert!(callbacks.iter().any(|c| c.duplicate), "{callbacks:?}");
    assert!(callbacks.iter().all(|c| c.acknowledged), "{callbacks:?}");
    app.assert_account(ALPHA, "acc", "90.00", "0.00", "90.00")
        .await;
    assert_eq!(movements(&app, id).await, vec![("capture".to_owned(), 0)]);
    // The duplicate was answered from the store: Redis ran the success script once.
    let metrics = app
        .request(hyper::Method::GET, "/metrics", None, None, None)
        .await;
    let text = metrics.body.as_str().unwrap();
    let sample = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    assert_eq!(
        sample("gateway_redis_round_trips_total{op=\"succeed\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample("gateway_callbacks_total{channel=\"supplier-main\",result=\"duplicate\"}"),
        Some(1.0),
        "{text}"
    );
}

/// The simulator never sends the callback: the resolution loop settles the payment anyway.
#[tokio::test]
async fn a_dropped_callback_is_settled_by_the_resolution_loop() {
    let fast = [
        ("GATEWAY__RESOLUTION__INTERVAL_MS", "50"),
        ("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "200"),
        ("GATEWAY__RESOLUTION__BACKOFF_INITIAL_MS", "100"),
    ];
    let app = spawn_app_full(Backend::Memory, Store::Sqlite, &fast, &auto_paid()).await;
    app.channels.set_faults(
        SUPPLIER_MAIN,
        Faults {
            callback_drop: true,
            ..Faults::default()
        },
    );
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let created = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "10.00"))
        .await;
    let id = created.body["id"].as_str().unwrap();
    app.wait_status(id, "succeeded").await;
    app.assert_account(ALPHA, "acc", "90.00", "0.00", "90.00")
        .await;
    assert_eq!(movements(&app, id).await, vec![("capture".to_owned(), 0)]);
}

// --- Hand-made callbacks ---------------------------------------------------------------------

/// Forged, stale, mismatched and unknown callbacks are refused in the protocol's failure form
/// and change nothing; the genuine one then settles once, and its replay changes nothing.
#[tokio::test]
async fn forged_stale_and_mismatched_supplier_callbacks_change_nothing() {
    let app = spawn_app_full(
        Backend::Redis,
        Store::Sqlite,
        CALLBACKS_ONLY,
        &ChannelOptions::default(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let created = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "25.00"))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap();
    let order = order_of(&created.body);
    let paid = supplier_notice(&order, "succeeded", "25.00");
    let now = now_secs();

    let other = app
        .pay(ALPHA, "k2", supplier_payment("o2", "acc", "1.00"))
        .await;
    let other_order = order_of(&other.body);
    let refusals = [
        (
            "wrong secret",
            paid.clone(),
            "whsec_test_only_not_the_suppliers",
            now,
        ),
        // Well outside the 300 s window: a second boundary crossed between `now` and the
        // gateway's clock (a loaded machine) must not bring one inside it.
        ("stale", paid.clone(), SUPPLIER_SECRET, now - 330),
        ("from the future", paid.clone(), SUPPLIER_SECRET, now + 330),
        (
            "wrong amount",
            supplier_notice(&order, "succeeded", "2.50"),
            SUPPLIER_SECRET,
            now,
        ),
        (
            "not an order id",
            supplier_notice("nope", "succeeded", "25.00"),
            SUPPLIER_SECRET,
            now,
        ),
    ];
    for (what, body, secret, t) in refusals {
        let status = post_supplier(&app, body, secret, t).await;
        assert!((400..500).contains(&status), "{what}: {status}");
    }
    // An unknown (well-formed) order id of another channel's attempt is refused too.
    let status = app
        .post_raw(
            &format!("/v1/callbacks/{ALIPAY_MAIN}"),
            &[("content-type", "application/x-www-form-urlencoded")],
            b"out_trade_no=x&sign=y&sign_type=RSA2".to_vec(),
        )
        .await
        .status;
    assert!((400..500).contains(&status));
    let unknown = app
        .post_raw("/v1/callbacks/nope", &[], b"{}".to_vec())
        .await;
    assert_eq!(unknown.status, 404);
    let _ = other_order;
    // Nothing changed.
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "pending"
    );
    app.assert_account(ALPHA, "acc", "100.00", "26.00", "74.00")
        .await;
    assert!(movements(&app, id).await.is_empty());

    // The genuine one settles; its replay (inside the window) is acknowledged, nothing moves.
    assert_eq!(
        post_supplier(&app, paid.clone(), SUPPLIER_SECRET, now).await,
        200
    );
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "succeeded"
    );
    app.assert_account(ALPHA, "acc", "75.00", "1.00", "74.00")
        .await;
    assert_eq!(post_supplier(&app, paid, SUPPLIER_SECRET, now).await, 200);
    app.assert_account(ALPHA, "acc", "75.00", "1.00", "74.00")
        .await;
    assert_eq!(movements(&app, id).await, vec![("capture".to_owned(), 0)]);
    // A signed repeat that disagrees on the amount is still refused once the payment has
    // succeeded (not acknowledged as a duplicate), and changes nothing.
    let status = post_supplier(
        &app,
        supplier_notice(&order, "succeeded", "2.50"),
        SUPPLIER_SECRET,
        now,
    )
    .await;
    assert!((400..500).contains(&status), "{status}");
    app.assert_account(ALPHA, "acc", "75.00", "1.00", "74.00")
        .await;
    assert_eq!(movements(&app, id).await, vec![("capture".to_owned(), 0)]);
    let metrics = app
        .request(hyper::Method::GET, "/metrics", None, None, None)
        .await;
    let text = metrics.body.as_str().unwrap();
    assert!(text.contains("gateway_callbacks_total"), "{text}");
    assert!(text.contains("result=\"stale\""), "{text}");
    assert!(text.contains("result=\"amount_mismatch\""), "{text}");
}

/// Alipay: a forged signature and another app's notice are refused; `TRADE_FINISHED` arriving
/// before `TRADE_SUCCESS` settles once, and neither a later `TRADE_SUCCESS` nor
/// `TRADE_CLOSED` changes the succeeded payment.
#[tokio::test]
async fn alipay_notices_out_of_order_settle_once_and_forgeries_change_nothing() {
    let app = spawn_app_full(
        Backend::Memory,
        Store::Sqlite,
        CALLBACKS_ONLY,
        &ChannelOptions::default(),
    )
    .await;
    let created = app.pay(ALPHA, "a1", json!({"merchant_order_id": "ali-1", "amount": "9.90", "currency": "CNY", "method": "alipay"})).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap();
    let order = order_of(&created.body);
    let alipay_key = platform_key();
    let app_key =
        RsaPrivateKey::from_pem_file(&key_path(crate::sim_channels::MERCHANT_PRIVATE)).unwrap();

    let forged = post_alipay(
        &app,
        &alipay_paid(&order, "9.90", "TRADE_SUCCESS", "2021000000000001"),
        &app_key,
    )
    .await;
    assert_eq!(forged.1, "fail", "{forged:?}");
    let other_app = post_alipay(
        &app,
        &alipay_paid(&order, "9.90", "TRADE_SUCCESS", "2021000000000999"),
        &alipay_key,
    )
    .await;
    assert_eq!(other_app.1, "fail");
    let wrong_amount = post_alipay(
        &app,
        &alipay_paid(&order, "0.99", "TRADE_SUCCESS", "2021000000000001"),
        &alipay_key,
    )
    .await;
    assert_eq!(wrong_amount.1, "fail");
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "pending"
    );

    let finished = post_alipay(
        &app,
        &alipay_paid(&order, "9.90", "TRADE_FINISHED", "2021000000000001"),
        &alipay_key,
    )
    .await;
    assert_eq!(finished, (200, "success".to_owned()));
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "succeeded"
    );
    for status in ["TRADE_SUCCESS", "TRADE_CLOSED", "TRADE_FINISHED"] {
        let again = post_alipay(
            &app,
            &alipay_paid(&order, "9.90", status, "2021000000000001"),
            &alipay_key,
        )
        .await;
        assert_eq!(again, (200, "success".to_owned()), "{status}");
    }
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "succeeded"
    );
    assert_eq!(movements(&app, id).await, vec![("capture".to_owned(), 0)]);
}

/// WeChat Pay: a probe signature and a bad signature are refused; the genuine notice settles.
#[tokio::test]
async fn wechat_pay_probe_and_bad_signatures_are_refused() {
    let app = spawn_app_full(
        Backend::Redis,
        Store::Sqlite,
        CALLBACKS_ONLY,
        &ChannelOptions::default(),
    )
    .await;
    let created = app
        .pay(ALPHA, "w1", customer_payment("wechatpay", "wx-1", "3.00"))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap();
    let order = order_of(&created.body);
    let probe = post_wechat(&app, &order, 300, Some("WECHATPAY/SIGNTEST/abcdef")).await;
    assert!((400..500).contains(&probe), "{probe}");
    let bad = post_wechat(&app, &order, 300, Some("c2lnbmF0dXJl")).await;
    assert!((400..500).contains(&bad), "{bad}");
    let wrong_amount = post_wechat(&app, &order, 299, None).await;
    assert!((400..500).contains(&wrong_amount), "{wrong_amount}");
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "pending"
    );
    assert_eq!(post_wechat(&app, &order, 300, None).await, 204);
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "succeeded"
    );
    assert_eq!(post_wechat(&app, &order, 300, None).await, 204);
    assert_eq!(movements(&app, id).await, vec![("capture".to_owned(), 0)]);
}

/// Money for a canceled payment (the customer paid a code after the cancel): acknowledged,
/// held in suspense and flagged; the payment stays canceled; a repeat changes nothing.
#[tokio::test]
async fn late_money_after_cancel_is_acknowledged_held_in_suspense_and_flagged() {
    let app = spawn_app_full(
        Backend::Redis,
        Store::Sqlite,
        CALLBACKS_ONLY,
        &ChannelOptions::default(),
    )
    .await;
    let created = app
        .pay(ALPHA, "a1", customer_payment("alipay", "ali-1", "5.00"))
        .await;
    let id = created.body["id"].as_str().unwrap();
    let order = order_of(&created.body);
    let canceled = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c1", json!({}))
        .await;
    assert_eq!(canceled.body["status"], "canceled", "{:?}", canceled.body);

    let key = platform_key();
    let late = alipay_paid(&order, "5.00", "TRADE_SUCCESS", "2021000000000001");
    assert_eq!(
        post_alipay(&app, &late, &key).await,
        (200, "success".to_owned())
    );
    assert_eq!(
        post_alipay(&app, &late, &key).await,
        (200, "success".to_owned())
    );
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "canceled"
    );
    assert_eq!(movements(&app, id).await, vec![("suspense".to_owned(), 1)]);
    let flagged = app.get("/v1/admin/flagged", ADMIN).await;
    assert_eq!(flagged.status, 200, "{:?}", flagged.body);
    let items: Vec<&Value> = flagged.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["payment_id"] == id)
        .collect();
    assert_eq!(items.len(), 1, "{:?}", flagged.body);
    assert_eq!(items[0]["kind"], "late_money");
}

/// PostgreSQL stopped mid-run: callbacks are not acknowledged (the channel retries) and
/// nothing changes; PostgreSQL back: the retries settle every payment exactly once.
#[tokio::test]
async fn callbacks_are_refused_while_the_store_is_down_and_settle_once_it_is_back() {
    let options = ChannelOptions {
        callbacks: CallbackPolicy {
            max_attempts: 30,
            initial_backoff_ms: 200,
            max_backoff_ms: 500,
            attempt_timeout_ms: 3_000,
            trade_finished_delay_ms: None,
        },
        ..ChannelOptions::default()
    };
    // Recovery commits what the outbox holds soon after the store is back.
    let overrides = [
        CALLBACKS_ONLY[0],
        ("GATEWAY__STORE__RECOVERY_MIN_AGE_MS", "500"),
    ];
    let mut app = spawn_app_full(Backend::Redis, Store::Postgres, &overrides, &options).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut payments = Vec::new();
    for i in 0..3 {
        let created = app
            .pay(
                ALPHA,
                &format!("k{i}"),
                supplier_payment(&format!("o{i}"), "acc", "10.00"),
            )
            .await;
        assert_eq!(created.status, 201, "{:?}", created.body);
        payments.push(created.body);
    }

    app.postgres.as_mut().unwrap().stop();
    for payment in &payments {
        assert!(matches!(
            app.channels.sim.pay(&order_of(payment)),
            channel_sim::PayOutcome::Paid(_)
        ));
    }
    // The callbacks arrive and are refused (5xx). A callback that reached the balance store
    // before the writer saw the store fail captured its hold there (its settlement waits in
    // the outbox); after that, callbacks are refused before any money moves. Either way the
    // account's available money is unchanged and nothing is acknowledged.
    let first = order_of(&payments[0]);
    let callbacks = sim_order_until(&app, &first, |r| !r.callbacks.is_empty())
        .await
        .callbacks;
    assert!(!callbacks.is_empty());
    assert!(callbacks.iter().all(|c| !c.acknowledged), "{callbacks:?}");
    assert!(
        callbacks.iter().all(|c| c.status.unwrap_or(500) >= 500),
        "{callbacks:?}"
    );
    let account = app.account(ALPHA, "acc").await;
    assert_eq!(account.body["available"], "70.00", "{:?}", account.body);
    let held = account.body["held"].as_str().unwrap().to_owned();
    assert!(
        ["30.00", "20.00", "10.00", "0.00"].contains(&held.as_str()),
        "{:?}",
        account.body
    );
    // New payments that need the store are refused meanwhile.
    let refused = app
        .pay(ALPHA, "k-down", supplier_payment("o-down", "acc", "1.00"))
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (503, "unavailable"),
        "{:?}",
        refused.body
    );

    app.postgres.as_mut().unwrap().restart().await;
    for payment in &payments {
        let id = payment["id"].as_str().unwrap();
        app.wait_status(id, "succeeded").await;
        wait_on_disk(&app, id, "succeeded").await;
        assert_eq!(movements(&app, id).await, vec![("capture".to_owned(), 0)]);
        // The channel's next retry after the commit is acknowledged.
        let order = order_of(payment);
        let record = sim_order_until(&app, &order, any_acknowledged).await;
        assert!(any_acknowledged(&record), "{record:?}");
    }
    app.assert_account(ALPHA, "acc", "70.00", "0.00", "70.00")
        .await;
}

/// The real binary, SIGKILLed while the channel's callbacks pour in, then restarted on the
/// same address: every callback the gateway acknowledged has its settlement on disk, none is
/// counted twice, and the channel's retries (or the resolution loop) settle the rest. The
/// channels run in a process of their own (`GATEWAY__SANDBOX__EXTERNAL_SIM`, here the test's
/// own simulator built from the gateway's `sandbox.json`), so they outlive the gateway.
#[tokio::test]
async fn sigkill_during_a_callback_burst_loses_nothing_and_settles_nothing_twice() {
    use crate::binary::Gateway;
    const PAYMENTS: usize = 40;
    let redis = crate::helpers::RedisServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let env = [
        ("GATEWAY__SANDBOX__EXTERNAL_SIM", "true"),
        ("GATEWAY__RESOLUTION__INTERVAL_MS", "200"),
        ("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "3000"),
    ];
    let gw = Gateway::start_with(data.path(), Some(&redis), &listen, &env);
    let mut sim_config = channel_sim::manifest::load(&data.path().join("sandbox.json")).unwrap();
    for channel in &mut sim_config.channels {
        channel.auto_pay = true;
        channel.auto_pay_delay_ms = 300;
    }
    sim_config.callbacks = CallbackPolicy {
        max_attempts: 30,
        initial_backoff_ms: 200,
        max_backoff_ms: 500,
        attempt_timeout_ms: 2_000,
        trade_finished_delay_ms: None,
    };
    let sim = channel_sim::Sim::start(sim_config).await.unwrap();
    crate::crash::fund(&gw).await;

    let mut orders = Vec::new();
    for i in 0..PAYMENTS {
        let body = json!({"merchant_order_id": format!("o{i}"), "amount": "1.00", "currency": "CNY",
                          "method": "supplier", "account_id": "acc"});
        let (status, reply) = gw
            .call(
                "POST",
                "/v1/payments",
                "sk_test_alpha",
                Some(&format!("k{i}")),
                body,
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{reply}");
        orders.push((reply["id"].as_str().unwrap().to_owned(), order_of(&reply)));
    }
    // Kill it once some callbacks were acknowledged and others are still coming.
    let acknowledged = |sim: &channel_sim::SimHandle| {
        orders
            .iter()
            .filter(|(_, order)| {
                sim.order(order)
                    .is_some_and(|o| o.callbacks.iter().any(|c| c.acknowledged))
            })
            .count()
    };
    for _ in 0..400 {
        if acknowledged(&sim) >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_kill = acknowledged(&sim);
    assert!(before_kill >= 5, "the burst must be under way");
    gw.kill();

    let gw = Gateway::start_with(data.path(), Some(&redis), &listen, &env);
    let mut settled = 0;
    for _ in 0..600 {
        settled = acknowledged(&sim);
        if settled == PAYMENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every payment ends succeeded through a callback or the loop; either way exactly once.
    let store =
        gateway::settlement::sqlite::SqliteStore::open(&data.path().join("gateway.sqlite3"))
            .unwrap();
    use gateway::settlement::{MoneyStore, PaymentStore};
    for (id, order) in &orders {
        let mut row = None;
        for _ in 0..200 {
            row = store.payment(id).await.unwrap();
            if row
                .as_ref()
                .is_some_and(|r| r.status.as_str() == "succeeded")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(row.unwrap().status.as_str(), "succeeded", "{id}");
        let record = sim.order(order).unwrap();
        assert_eq!(record.status, channel_sim::OrderStatus::Paid);
    }
    let captures: Vec<_> = store
        .postings_sum_by_movement()
        .await
        .unwrap()
        .into_iter()
        .filter(|(id, kind, _, _)| id.starts_with("pay_") && kind == "capture")
        .map(|(id, _, seq, _)| (id, seq))
        .collect();
    let mut unique = captures.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), captures.len(), "no movement twice");
    assert_eq!(captures.len(), PAYMENTS, "one capture per payment");
    // Redis and the store agree on the balance: 1000.00 − 40 × 1.00.
    let balances = store.balances(None).await.unwrap();
    assert_eq!(balances[0].balance_minor, 100_000 - PAYMENTS as i64 * 100);
    let (status, account) = gw
        .call(
            "GET",
            "/v1/accounts/acc",
            "sk_test_alpha",
            None,
            Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(account["balance"], "960.00", "{account}");
    assert_eq!(account["held"], "0.00", "{account}");
    eprintln!("callback burst: {before_kill} acknowledged before SIGKILL, {settled} by callbacks in the end");
    gw.kill();
    sim.shutdown().await;
}

/// The real late-money case of Alipay: a QR code nobody scanned cannot be closed
/// (`ACQ.TRADE_NOT_EXIST`), so after a cancel the customer can still pay it. The late
/// `TRADE_SUCCESS` is acknowledged, held in suspense, refunded automatically through the
/// channel (once), and flagged with what was done; the payment stays canceled.
#[tokio::test]
async fn an_alipay_code_paid_after_cancel_is_refunded_automatically() {
    let options = ChannelOptions {
        callbacks: retrying_callbacks(),
        ..ChannelOptions::default()
    };
    let app = spawn_app_full(Backend::Redis, Store::Sqlite, CALLBACKS_ONLY, &options).await;
    let created = app
        .pay(ALPHA, "a1", customer_payment("alipay", "ali-1", "8.00"))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let order = order_of(&created.body);
    let canceled = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c1", json!({}))
        .await;
    assert_eq!(canceled.body["status"], "canceled", "{:?}", canceled.body);

    // The customer scans and pays anyway; the channel notifies.
    assert!(matches!(
        app.channels.sim.pay(&order),
        channel_sim::PayOutcome::Paid(_)
    ));
    let record = sim_order_until(&app, &order, |r| {
        any_acknowledged(r) && !r.refunds.is_empty()
    })
    .await;
    assert!(
        record.callbacks.iter().any(|c| c.acknowledged),
        "{:?}",
        record.callbacks
    );
    assert_eq!(
        record.refunds.len(),
        1,
        "refunded once: {:?}",
        record.refunds
    );
    assert_eq!(record.refunds[0].amount_cents, 800);
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "canceled"
    );
    assert_eq!(
        movements(&app, &id).await,
        vec![("refund".to_owned(), 1_001), ("suspense".to_owned(), 1)]
    );
    let flagged = app.get("/v1/admin/flagged", ADMIN).await;
    let item = flagged.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["payment_id"] == id.as_str())
        .cloned()
        .expect("flagged");
    assert_eq!(item["kind"], "late_money");
    assert!(
        item["detail"]
            .as_str()
            .unwrap()
            .contains("refunded automatically"),
        "{item}"
    );
}

/// A supplier that executed a charge after it confirmed the order closed (the gateway closed
/// it at expiry and released the hold): captured from the account when it can afford it,
/// flagged as an overdraft (nothing moved) when it cannot.
#[tokio::test]
async fn a_supplier_charge_executed_after_expiry_is_captured_if_affordable() {
    let overrides = [
        crate::helpers::FAST_RESOLUTION,
        crate::helpers::QUICK_EXPIRY,
    ]
    .concat();
    let app = spawn_app_full(
        Backend::Memory,
        Store::Sqlite,
        &overrides,
        &ChannelOptions::default(),
    )
    .await;
    app.channels.set_faults(
        SUPPLIER_MAIN,
        Faults {
            callback_drop: true,
            ..Faults::default()
        },
    );
    app.funded_account(ALPHA, "alpha", "rich", "100.00", "0.00")
        .await;
    app.funded_account(ALPHA, "alpha", "poor", "10.00", "0.00")
        .await;
    let mut late = Vec::new();
    for (account, amount) in [("rich", "30.00"), ("poor", "8.00")] {
        let mut body = supplier_payment(&format!("o-{account}"), account, amount);
        body["expires_in_seconds"] = json!(2);
        let created = app.pay(ALPHA, &format!("k-{account}"), body).await;
        assert_eq!(created.status, 201, "{:?}", created.body);
        let order = order_of(&created.body);
        late.push((
            created.body["id"].as_str().unwrap().to_owned(),
            order,
            amount,
        ));
    }
    // The gateway closes them at expiry; the supplier confirms them closed: holds released.
    for (id, _, _) in &late {
        app.wait_status(id, "expired").await;
    }
    app.assert_account(ALPHA, "rich", "100.00", "0.00", "100.00")
        .await;
    // Meanwhile "poor" spends what it had.
    let spent = app
        .pay(
            ALPHA,
            "spend",
            crate::helpers::balance_payment("spend", "poor", "5.00"),
        )
        .await;
    assert_eq!(spent.status, 201);

    for (_, order, amount) in &late {
        let status = post_supplier(
            &app,
            supplier_notice(order, "succeeded", amount),
            SUPPLIER_SECRET,
            now_secs(),
        )
        .await;
        assert_eq!(status, 200);
        // A repeat changes nothing.
        let again = post_supplier(
            &app,
            supplier_notice(order, "succeeded", amount),
            SUPPLIER_SECRET,
            now_secs(),
        )
        .await;
        assert_eq!(again, 200);
    }
    let (rich, poor) = (&late[0].0, &late[1].0);
    app.assert_account(ALPHA, "rich", "70.00", "0.00", "70.00")
        .await;
    app.assert_account(ALPHA, "poor", "5.00", "0.00", "5.00")
        .await;
    assert_eq!(
        app.get(&format!("/v1/payments/{rich}"), ALPHA).await.body["status"],
        "expired"
    );
    assert_eq!(
        movements(&app, rich).await,
        vec![("capture".to_owned(), 1), ("suspense".to_owned(), 1)]
    );
    assert_eq!(
        movements(&app, poor).await,
        vec![("suspense".to_owned(), 1)]
    );
    let flagged = app.get("/v1/admin/flagged", ADMIN).await;
    let kinds = |id: &str| -> Vec<String> {
        let mut kinds: Vec<String> = flagged.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["payment_id"] == id)
            .map(|f| f["kind"].as_str().unwrap().to_owned())
            .collect();
        kinds.sort();
        kinds
    };
    assert_eq!(kinds(rich), vec!["late_money"]);
    assert_eq!(kinds(poor), vec!["late_money", "overdraft"]);
    // Each item is counted (and logged) once, though each notice came twice.
    let metrics = app
        .request(hyper::Method::GET, "/metrics", None, None, None)
        .await;
    let late_counted: u64 = metrics
        .body
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("gateway_resolutions_total{result=\"late_money\"} "))
        .map_or(0, |v| v.trim().parse().unwrap());
    assert_eq!(late_counted, 2, "once per item");
}

/// Push and pull race: callbacks and a fast resolution loop both try to settle the same auto-
/// paid payments; whichever comes first settles each one, the other changes nothing.
#[tokio::test]
async fn callbacks_racing_the_resolution_loop_settle_each_payment_once() {
    let fast = [
        ("GATEWAY__RESOLUTION__INTERVAL_MS", "20"),
        ("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "0"),
        ("GATEWAY__RESOLUTION__BACKOFF_INITIAL_MS", "20"),
        ("GATEWAY__RESOLUTION__BACKOFF_MAX_MS", "40"),
    ];
    let app = spawn_app_full(Backend::Redis, Store::Sqlite, &fast, &auto_paid()).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let created = app
            .pay(
                ALPHA,
                &format!("k{i}"),
                supplier_payment(&format!("o{i}"), "acc", "1.00"),
            )
            .await;
        assert_eq!(created.status, 201, "{:?}", created.body);
        ids.push(created.body["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        app.wait_status(id, "succeeded").await;
        wait_on_disk(&app, id, "succeeded").await;
        assert_eq!(movements(&app, id).await, vec![("capture".to_owned(), 0)]);
    }
    app.assert_account(ALPHA, "acc", "80.00", "0.00", "80.00")
        .await;
}

/// Redis loses everything (a failover to an empty replica) while channel payments are in
/// flight: their callbacks still settle them, each once — the payment (and, for an account
/// payment, its account with its holds) is put back from the settlement store first — and a
/// payment that succeeded before the loss can still be refunded, never above what is left.
#[tokio::test]
async fn after_redis_lost_everything_callbacks_and_refunds_still_work_from_the_store() {
    let options = ChannelOptions {
        callbacks: retrying_callbacks(),
        ..ChannelOptions::default()
    };
    let app = spawn_app_full(Backend::Redis, Store::Sqlite, CALLBACKS_ONLY, &options).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let alipay = app
        .pay(ALPHA, "a1", customer_payment("alipay", "ali-1", "6.00"))
        .await;
    let supplier = app
        .pay(ALPHA, "s1", supplier_payment("s-1", "acc", "30.00"))
        .await;
    let earlier = app
        .pay(ALPHA, "a2", customer_payment("alipay", "ali-2", "9.00"))
        .await;
    for created in [&alipay, &supplier, &earlier] {
        assert_eq!(created.status, 201, "{:?}", created.body);
    }
    let (alipay_id, supplier_id, earlier_id) = (
        alipay.body["id"].as_str().unwrap(),
        supplier.body["id"].as_str().unwrap(),
        earlier.body["id"].as_str().unwrap(),
    );
    // One succeeded and was partly refunded before the loss.
    assert!(matches!(
        app.channels.sim.pay(&order_of(&earlier.body)),
        channel_sim::PayOutcome::Paid(_)
    ));
    app.wait_status(earlier_id, "succeeded").await;
    wait_on_disk(&app, earlier_id, "succeeded").await;
    let first = app
        .post(
            &format!("/v1/payments/{earlier_id}/refunds"),
            ALPHA,
            "r1",
            json!({"amount": "4.00"}),
        )
        .await;
    assert_eq!(
        (first.status, &first.body["status"]),
        (201, &json!("succeeded")),
        "{:?}",
        first.body
    );
    wait_on_disk(&app, earlier_id, "partially_refunded").await;

    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();

    // The customers pay now; the callbacks find nothing in Redis and restore from the store.
    for created in [&alipay, &supplier] {
        assert!(matches!(
            app.channels.sim.pay(&order_of(&created.body)),
            channel_sim::PayOutcome::Paid(_)
        ));
    }
    app.wait_status(alipay_id, "succeeded").await;
    app.wait_status(supplier_id, "succeeded").await;
    wait_on_disk(&app, supplier_id, "succeeded").await;
    assert_eq!(
        movements(&app, supplier_id).await,
        vec![("capture".to_owned(), 0)]
    );
    app.assert_account(ALPHA, "acc", "70.00", "0.00", "70.00")
        .await;

    // The earlier payment: 5.00 left to refund, not 9.00.
    let above = app
        .post(
            &format!("/v1/payments/{earlier_id}/refunds"),
            ALPHA,
            "r2",
            json!({"amount": "5.01"}),
        )
        .await;
    assert_eq!(
        (above.status, above.code()),
        (422, "invalid_state"),
        "{:?}",
        above.body
    );
    let rest = app
        .post(
            &format!("/v1/payments/{earlier_id}/refunds"),
            ALPHA,
            "r3",
            json!({}),
        )
        .await;
    assert_eq!(
        (rest.status, &rest.body["amount"], &rest.body["status"]),
        (201, &json!("5.00"), &json!("succeeded")),
        "{:?}",
        rest.body
    );
    assert_eq!(rest.body["id"], format!("re_{}_2", &earlier_id[4..]));
    app.wait_status(earlier_id, "refunded").await;
}

/// Money taken by an abandoned attempt is found against the payment's committed capture, not
/// against the attempts' outcomes (written best effort): with the winning attempt's
/// `succeeded` outcome lost, a paid notice for another attempt is still late money — never
/// acknowledged as a duplicate and dropped.
#[tokio::test]
async fn money_for_an_abandoned_attempt_is_found_against_the_committed_capture() {
    let app = spawn_app_full(
        Backend::Memory,
        Store::Sqlite,
        &[("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "3600000")],
        &ChannelOptions::default(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let created = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "20.00"))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let first = order_of(&created.body);
    let paid = supplier_notice(&first, "succeeded", "20.00");
    assert_eq!(
        post_supplier(&app, paid, SUPPLIER_SECRET, now_secs()).await,
        200
    );
    app.wait_status(&id, "succeeded").await;
    app.assert_account(ALPHA, "acc", "80.00", "0.00", "80.00")
        .await;

    // A second attempt of the payment (as a failover would have made), and the first
    // attempt's `succeeded` outcome lost.
    let disk = app.settlement_store().await;
    let second = first.replace("-1", "-2");
    disk.record_attempt(&gateway::settlement::AttemptRow {
        payment_id: id.clone(),
        attempt: 2,
        channel_id: SUPPLIER_MAIN.into(),
        channel_order_id: second.clone(),
        outcome: AttemptOutcome::Accepted,
        latency_ms: None,
        action: None,
        channel_txn_id: None,
        created_at_ms: 1,
        updated_at_ms: 1,
    })
    .await
    .unwrap();
    rusqlite::Connection::open(app.data.path().join("gateway.sqlite3"))
        .unwrap()
        .execute(
            "UPDATE attempts SET outcome = 'accepted' WHERE payment_id = ?1 AND attempt = 1",
            [&id],
        )
        .unwrap();

    // The supplier says the second attempt's order was executed too.
    let late = supplier_notice(&second, "succeeded", "20.00");
    assert_eq!(
        post_supplier(&app, late, SUPPLIER_SECRET, now_secs()).await,
        200
    );
    app.assert_account(ALPHA, "acc", "60.00", "0.00", "60.00")
        .await;
    let flagged = app.get("/v1/admin/flagged", crate::helpers::ADMIN).await;
    assert!(
        flagged.body["items"].as_array().unwrap().iter().any(|i| {
            i["kind"] == "late_money"
                && i["payment_id"] == id.as_str()
                && i["detail"]
                    .as_str()
                    .unwrap()
                    .starts_with("abandoned_attempt")
        }),
        "{:?}",
        flagged.body
    );
    // A repeat of the first attempt's notice is still a duplicate: nothing more moves.
    let again = supplier_notice(&first, "succeeded", "20.00");
    assert_eq!(
        post_supplier(&app, again, SUPPLIER_SECRET, now_secs()).await,
        200
    );
    app.assert_account(ALPHA, "acc", "60.00", "0.00", "60.00")
        .await;
}

/// A channel that answers "no such order" for an order it accepted (it lost it, or something
/// else answers at its address) is said and flagged for a human; the payment stays pending.
#[tokio::test]
async fn an_accepted_order_the_channel_no_longer_knows_is_flagged() {
    let app = spawn_app_full(
        Backend::Memory,
        Store::Sqlite,
        crate::helpers::FAST_RESOLUTION,
        &ChannelOptions::default(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let created = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "20.00"))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    // An accepted attempt whose order the channel never heard of (as after its restart).
    let disk = app.settlement_store().await;
    disk.record_attempt(&gateway::settlement::AttemptRow {
        payment_id: id.clone(),
        attempt: 2,
        channel_id: SUPPLIER_MAIN.into(),
        channel_order_id: order_of(&created.body).replace("-1", "-2"),
        outcome: AttemptOutcome::Accepted,
        latency_ms: None,
        action: None,
        channel_txn_id: None,
        created_at_ms: 1,
        updated_at_ms: 1,
    })
    .await
    .unwrap();
    let mut flagged = false;
    for _ in 0..100 {
        let items = app.get("/v1/admin/flagged", ADMIN).await.body["items"].clone();
        flagged = items
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["kind"] == "channel_order_missing" && i["payment_id"] == id.as_str());
        if flagged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(flagged, "the missing order was flagged");
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "pending"
    );
    app.assert_account(ALPHA, "acc", "100.00", "20.00", "80.00")
        .await;
}
