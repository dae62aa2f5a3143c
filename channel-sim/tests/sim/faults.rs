use std::time::Duration;

use channel_sim::ChannelKind;
use serde_json::json;

use crate::helpers::*;
use crate::supplier;

#[tokio::test]
async fn outage_refuses_connections_then_comes_back() {
    let sim = start_sim().await;
    let base = sim.channel_url("supplier").unwrap().to_owned();
    let path = "/v1/orders/att_unknown";
    assert_eq!(supplier::call(&base, "GET", path, "").await.status, 404);

    admin_set_faults(&sim, "supplier", json!({"outage": true})).await;
    // The listener closes asynchronously: a bounded wait for the refusal.
    let mut refused = false;
    for _ in 0..100 {
        match send("GET", &format!("{base}{path}"), &[], "").await {
            Err(e) if e.is_connect() => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(refused, "connections are refused during an outage");

    admin_set_faults(&sim, "supplier", json!({})).await;
    let mut back = false;
    for _ in 0..100 {
        if send("GET", &format!("{base}{path}"), &[], "").await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "the channel listens again on the same port");
    assert_eq!(supplier::call(&base, "GET", path, "").await.status, 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn errors_hangs_declines_and_latency() {
    let sim = start_sim().await;
    let base = sim.channel_url("supplier").unwrap().to_owned();
    let create = |id: &str| supplier::order(id, "1.00", 900, "http://127.0.0.1:1/cb");

    admin_set_faults(&sim, "supplier", json!({"error_rate": 1.0})).await;
    let failed = send("POST", &format!("{base}/v1/orders"), &[], create("att_err"))
        .await
        .unwrap();
    assert_eq!(failed.status, 503);

    admin_set_faults(&sim, "supplier", json!({"decline": true})).await;
    let declined = supplier::call(&base, "POST", "/v1/orders", &create("att_declined")).await;
    assert_eq!(
        (declined.status, declined.json()["error"].as_str()),
        (422, Some("declined"))
    );

    admin_set_faults(&sim, "supplier", json!({"hang": true})).await;
    let hung = tokio::time::timeout(
        Duration::from_millis(300),
        supplier::call(&base, "POST", "/v1/orders", &create("att_hung")),
    )
    .await;
    assert!(hung.is_err(), "a hung channel never answers");

    admin_set_faults(&sim, "supplier", json!({"latency_ms": 150})).await;
    let started = tokio::time::Instant::now();
    assert_eq!(
        supplier::call(&base, "POST", "/v1/orders", &create("att_slow"))
            .await
            .status,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(150));

    // Only the last order was executed: errors, declines and hangs changed nothing.
    let ids: Vec<String> = sim
        .orders("supplier")
        .unwrap()
        .into_iter()
        .map(|o| o.channel_order_id)
        .collect();
    assert_eq!(ids, ["att_slow"]);
    // Refused fault settings are reported, and change nothing.
    let bad = send(
        "PUT",
        &format!("{}/channels/supplier/faults", sim.admin_url()),
        &[],
        r#"{"error_rate": 2}"#,
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400);
    assert_eq!(sim.faults("supplier").unwrap().latency_ms, 150);
    sim.shutdown().await;
}

#[tokio::test]
async fn error_rate_is_deterministic_for_a_seed() {
    let sim = start_sim().await;
    let base = sim.channel_url("supplier").unwrap().to_owned();
    let mut runs = Vec::new();
    for _ in 0..2 {
        admin_set_faults(&sim, "supplier", json!({"error_rate": 0.5, "seed": 42})).await;
        let mut statuses = Vec::new();
        for _ in 0..16 {
            statuses.push(supplier::call_unchecked(&base, "/v1/orders/none").await);
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(
        runs[0].contains(&503) && runs[0].contains(&404),
        "{:?}",
        runs[0]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn auto_pay_and_dropped_callbacks() {
    let mut auto = spec("supplier-auto", ChannelKind::Supplier);
    auto.auto_pay = true;
    auto.auto_pay_delay_ms = 20;
    let mut dropping = spec("supplier-drop", ChannelKind::Supplier);
    dropping.auto_pay = true;
    dropping.faults.callback_drop = true;
    let sim = start_with(vec![auto, dropping]).await;
    let receiver = Receiver::start(vec![], (200, r#"{"received": true}"#)).await;
    for (channel, id) in [("supplier-auto", "att_auto"), ("supplier-drop", "att_drop")] {
        let base = sim.channel_url(channel).unwrap();
        let created = supplier::call(
            base,
            "POST",
            "/v1/orders",
            &supplier::order(id, "3.00", 900, &receiver.url),
        )
        .await;
        assert_eq!(created.status, 200);
    }
    let callbacks = receiver.wait_for(1).await;
    assert!(callbacks[0].body.contains("att_auto"));
    let dropped = eventually(|| sim.order("att_drop").filter(|o| !o.callbacks.is_empty())).await;
    assert_eq!(dropped.pay_count, 1);
    assert_eq!(dropped.callbacks[0].error.as_deref(), Some("dropped"));
    // The admin API serves the same record.
    let via_admin = send(
        "GET",
        &format!("{}/orders/att_drop", sim.admin_url()),
        &[],
        "",
    )
    .await
    .unwrap()
    .json();
    assert_eq!(via_admin["callbacks"][0]["attempt"], 0);
    assert_eq!(receiver.received().len(), 1);
    sim.shutdown().await;
}
