//! `POST /v1/payments/{id}/refunds` end to end against channel-sim: full and partial refunds,
//! never more than was paid (also under concurrent requests), each refund number executed once
//! at the channel, the money settled like any movement (balances and the store agree).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    balance_payment, spawn_app_full, supplier_payment, Backend, ChannelOptions, Store, TestApp,
    ALPHA, BETA,
};

const FAST: &[(&str, &str)] = &[
    ("GATEWAY__RESOLUTION__INTERVAL_MS", "50"),
    ("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "100"),
    ("GATEWAY__RESOLUTION__BACKOFF_INITIAL_MS", "100"),
];

fn auto_paid() -> ChannelOptions {
    ChannelOptions {
        auto_pay: true,
        auto_pay_delay_ms: 50,
        ..ChannelOptions::default()
    }
}

async fn refund(app: &TestApp, id: &str, key: &str, body: Value) -> crate::helpers::Reply {
    app.post(&format!("/v1/payments/{id}/refunds"), ALPHA, key, body)
        .await
}

/// The refund movements on disk for a payment: (sequence, sum of the account/sales side).
async fn refund_sequences(app: &TestApp, id: &str) -> Vec<u32> {
    let mut found: Vec<u32> = app
        .settlement_store()
        .await
        .postings_sum_by_movement()
        .await
        .unwrap()
        .into_iter()
        .filter(|(p, kind, _, _)| p == id && kind == "refund")
        .map(|(_, _, seq, _)| seq)
        .collect();
    found.sort();
    found.dedup();
    found
}

async fn paid_alipay(app: &TestApp, order: &str, amount: &str) -> (String, String) {
    let created = app
        .pay(
            ALPHA,
            &format!("k-{order}"),
            json!({"merchant_order_id": order, "amount": amount, "currency": "CNY", "method": "alipay"}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let channel_order = created.body["attempts"][0]["channel_order_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_status(&id, "succeeded").await;
    (id, channel_order)
}

#[tokio::test]
async fn a_customer_charge_is_refunded_in_parts_and_never_above_what_was_paid() {
    let app = spawn_app_full(Backend::Redis, Store::Sqlite, FAST, &auto_paid()).await;
    let (id, order) = paid_alipay(&app, "ali-1", "10.00").await;

    let first = refund(
        &app,
        &id,
        "r1",
        json!({"amount": "3.00", "reason": "one card missing"}),
    )
    .await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(
        (
            &first.body["status"],
            &first.body["amount"],
            &first.body["payment_id"]
        ),
        (&json!("succeeded"), &json!("3.00"), &json!(id))
    );
    let refund_id = first.body["id"].as_str().unwrap().to_owned();
    // The same key replays the same refund.
    let replay = refund(
        &app,
        &id,
        "r1",
        json!({"amount": "3.00", "reason": "one card missing"}),
    )
    .await;
    assert_eq!(
        (replay.status, replay.body["id"].as_str()),
        (201, Some(refund_id.as_str()))
    );
    assert_eq!(
        app.wait_status(&id, "partially_refunded").await["refunds"][0]["id"],
        refund_id
    );

    // Above what is left: refused, nothing changed.
    let above = refund(&app, &id, "r2", json!({"amount": "7.01"})).await;
    assert_eq!(
        (above.status, above.code()),
        (422, "invalid_state"),
        "{:?}",
        above.body
    );
    for (body, field) in [
        (json!({"amount": "0.00"}), "amount"),
        (json!({"amount": "1.001"}), "amount"),
        (json!({"amount": "-1.00"}), "amount"),
        (json!({"amount": "1.00", "extra": true}), "extra"),
        (
            json!({"amount": "1.00", "reason": "x".repeat(257)}),
            "reason",
        ),
        (json!({"amount": 1}), "amount"),
    ] {
        let bad = refund(&app, &id, "r-bad", body).await;
        assert_eq!(
            (bad.status, bad.code()),
            (400, "invalid_request"),
            "{:?}",
            bad.body
        );
        assert_eq!(bad.body["error"]["field"], field);
    }
    // The rest, without an amount.
    let rest = refund(&app, &id, "r3", json!({})).await;
    assert_eq!(rest.status, 201, "{:?}", rest.body);
    assert_eq!(
        (&rest.body["status"], &rest.body["amount"]),
        (&json!("succeeded"), &json!("7.00"))
    );
    let done = app.wait_status(&id, "refunded").await;
    assert_eq!(done["refunds"].as_array().unwrap().len(), 2);
    let nothing_left = refund(&app, &id, "r4", json!({"amount": "0.01"})).await;
    assert_eq!(
        (nothing_left.status, nothing_left.code()),
        (422, "invalid_state")
    );

    // The channel refunded each number once, 10.00 in all; the store has both refunds.
    let record = app.channels.sim.order(&order).unwrap();
    assert_eq!(record.refunds.len(), 2, "{:?}", record.refunds);
    assert_eq!(
        record.refunds.iter().map(|r| r.amount_cents).sum::<u64>(),
        1_000
    );
    assert!(record.refunds.iter().all(|r| r.requests == 1));
    assert_eq!(refund_sequences(&app, &id).await, vec![1, 2]);

    // Refunds of what cannot be refunded: a failed payment.
    app.channels.set_faults(
        "wechatpay-main",
        channel_sim::Faults {
            outage: true,
            ..channel_sim::Faults::default()
        },
    );
    let failed = app
        .pay(ALPHA, "k-f", json!({"merchant_order_id": "f", "amount": "1.00", "currency": "CNY", "method": "wechatpay"}))
        .await;
    assert_eq!(failed.code(), "no_channel_available", "{:?}", failed.body);
    let failed_id = failed.body["error"]["payment_id"].as_str().unwrap();
    let not_paid = refund(&app, failed_id, "r5", json!({})).await;
    assert_eq!(
        (not_paid.status, not_paid.code()),
        (422, "invalid_state"),
        "{:?}",
        not_paid.body
    );
    assert_eq!(not_paid.body["error"]["status"], "failed");
    assert_eq!(refund(&app, "pay_nope", "r6", json!({})).await.status, 404);
    let other = app
        .post(&format!("/v1/payments/{id}/refunds"), BETA, "r7", json!({}))
        .await;
    assert_eq!(other.status, 403);
}

/// Ten concurrent refunds of 3.00 on a 10.00 payment: exactly three succeed, the channel
/// refunds exactly 9.00, the rest are refused.
#[tokio::test]
async fn concurrent_refunds_never_exceed_what_was_paid() {
    let app = Arc::new(spawn_app_full(Backend::Redis, Store::Postgres, FAST, &auto_paid()).await);
    let (id, order) = paid_alipay(&app, "ali-c", "10.00").await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let app = app.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            refund(&app, &id, &format!("c{i}"), json!({"amount": "3.00"})).await
        }));
    }
    let mut created = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            201 => {
                assert_eq!(reply.body["status"], "succeeded", "{:?}", reply.body);
                created += 1;
            }
            422 => assert_eq!(reply.code(), "invalid_state"),
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    assert_eq!(created, 3);
    let record = app.channels.sim.order(&order).unwrap();
    assert_eq!(
        record.refunds.iter().map(|r| r.amount_cents).sum::<u64>(),
        900
    );
    assert_eq!(refund_sequences(&app, &id).await, vec![1, 2, 3]);
    assert_eq!(
        app.wait_status(&id, "partially_refunded").await["refunds"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

/// A balance payment's refund needs no channel; a supplier charge's refund goes through the
/// supplier; both give the money back to the account, once.
#[tokio::test]
async fn balance_and_supplier_refunds_credit_the_account_back() {
    let app = spawn_app_full(Backend::Memory, Store::Sqlite, FAST, &auto_paid()).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let paid = app
        .pay(ALPHA, "b1", balance_payment("b1", "acc", "20.00"))
        .await;
    assert_eq!(paid.status, 201);
    let id = paid.body["id"].as_str().unwrap();
    let back = refund(&app, id, "rb", json!({"amount": "5.00"})).await;
    assert_eq!(
        (back.status, &back.body["status"]),
        (201, &json!("succeeded")),
        "{:?}",
        back.body
    );
    app.assert_account(ALPHA, "acc", "85.00", "0.00", "85.00")
        .await;

    let charge = app
        .pay(ALPHA, "s1", supplier_payment("s1", "acc", "30.00"))
        .await;
    let sid = charge.body["id"].as_str().unwrap();
    app.wait_status(sid, "succeeded").await;
    app.assert_account(ALPHA, "acc", "55.00", "0.00", "55.00")
        .await;
    let back = refund(&app, sid, "rs", json!({})).await;
    assert_eq!(
        (back.status, &back.body["status"]),
        (201, &json!("succeeded")),
        "{:?}",
        back.body
    );
    app.assert_account(ALPHA, "acc", "85.00", "0.00", "85.00")
        .await;
    assert_eq!(refund_sequences(&app, sid).await, vec![1]);
    // Money is conserved: every movement balances, and the store's balance (rebuilt from
    // postings, once the last commit is in) is the balance the API shows.
    let store = app.settlement_store().await;
    let mut on_disk = 0;
    for _ in 0..100 {
        on_disk = store.balances(Some(("alpha", "acc"))).await.unwrap()[0].balance_minor;
        if on_disk == 8_500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(on_disk, 8_500);
    for (payment, kind, seq, sum) in store.postings_sum_by_movement().await.unwrap() {
        assert_eq!(sum, 0, "{payment} {kind} #{seq} does not balance");
    }
}

/// A top-up refund first holds the amount on the account (refused with 402 when the account
/// no longer has it), then takes it out when the channel refunds.
#[tokio::test]
async fn a_topup_refund_holds_then_takes_the_money_out_of_the_account() {
    let app = spawn_app_full(Backend::Redis, Store::Sqlite, FAST, &auto_paid()).await;
    app.funded_account(ALPHA, "alpha", "acc", "0.00", "0.00")
        .await;
    let topup = app
        .post(
            "/v1/accounts/acc/topups",
            ALPHA,
            "t1",
            json!({"amount": "50.00", "method": "alipay"}),
        )
        .await;
    assert_eq!(topup.status, 201, "{:?}", topup.body);
    let id = topup.body["id"].as_str().unwrap();
    app.wait_status(id, "succeeded").await;
    app.assert_account(ALPHA, "acc", "50.00", "0.00", "50.00")
        .await;
    // Spend 40.00 of it: only 10.00 can go back.
    let spent = app
        .pay(ALPHA, "b1", balance_payment("b1", "acc", "40.00"))
        .await;
    assert_eq!(spent.status, 201);
    let too_much = refund(&app, id, "rt1", json!({"amount": "20.00"})).await;
    assert_eq!(
        (too_much.status, too_much.code()),
        (402, "insufficient_funds"),
        "{:?}",
        too_much.body
    );
    app.assert_account(ALPHA, "acc", "10.00", "0.00", "10.00")
        .await;
    let back = refund(&app, id, "rt2", json!({"amount": "10.00"})).await;
    assert_eq!(
        (back.status, &back.body["status"]),
        (201, &json!("succeeded")),
        "{:?}",
        back.body
    );
    app.assert_account(ALPHA, "acc", "0.00", "0.00", "0.00")
        .await;
}
