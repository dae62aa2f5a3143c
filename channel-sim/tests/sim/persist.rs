//! The orders survive a restart when the simulator keeps them in a file, as a real channel
//! keeps its orders: queried, paid and refunded afterwards, repeats recognised, and a paid
//! order whose notice was never acknowledged is notified again.

use channel_sim::{CallbackPolicy, ChannelKind, OrderStatus, Sim, SimConfig, SimHandle};

use crate::helpers::*;
use crate::supplier::{call, order};

async fn start_keeping(file: &std::path::Path) -> SimHandle {
    let mut config = SimConfig::new(vec![spec("supplier", ChannelKind::Supplier)]);
    config.callbacks = CallbackPolicy {
        max_attempts: 2,
        initial_backoff_ms: 20,
        max_backoff_ms: 50,
        attempt_timeout_ms: 2_000,
        trade_finished_delay_ms: None,
    };
    config.orders_file = Some(file.to_owned());
    config.orders_save_interval_ms = 20;
    Sim::start(config).await.expect("the simulator starts")
}

#[tokio::test]
async fn orders_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.json");
    let receiver = Receiver::start(vec![], (200, r#"{"received": true}"#)).await;
    let id = "att_sup_kept";
    let body = order(id, "12.34", 900, &receiver.url);

    let sim = start_keeping(&file).await;
    let base = sim.channel_url("supplier").unwrap().to_owned();
    let created = call(&base, "POST", "/v1/orders", &body).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let supplier_order_id = created.json()["supplier_order_id"].clone();
    sim.shutdown().await;

    let sim = start_keeping(&file).await;
    let base = sim.channel_url("supplier").unwrap().to_owned();
    let path = format!("/v1/orders/{id}");
    let queried = call(&base, "GET", &path, "").await;
    assert_eq!(
        (queried.status, &queried.json()["status"]),
        (200, &serde_json::json!("accepted")),
        "{}",
        queried.body
    );
    // The same create again is the same order (its fingerprint was kept); another amount
    // under the same id is still a conflict.
    let repeat = call(&base, "POST", "/v1/orders", &body).await;
    assert_eq!(
        (repeat.status, &repeat.json()["supplier_order_id"]),
        (200, &supplier_order_id)
    );
    let conflicting = call(
        &base,
        "POST",
        "/v1/orders",
        &order(id, "99.99", 900, &receiver.url),
    )
    .await;
    assert_ne!(conflicting.status, 200, "{}", conflicting.body);

    assert_eq!(admin_pay(&sim, id).await.status, 200);
    receiver.wait_for(1).await;
    let record = sim.order(id).unwrap();
    assert_eq!(
        (record.status, record.pay_count, record.create_requests),
        (OrderStatus::Paid, 1, 2)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_paid_order_never_acknowledged_is_notified_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.json");
    // Both attempts before the restart fail; the next one is acknowledged.
    let receiver = Receiver::start(
        vec![(500, "down"), (500, "down")],
        (200, r#"{"received": true}"#),
    )
    .await;
    let id = "att_sup_unacknowledged";
    let sim = start_keeping(&file).await;
    let base = sim.channel_url("supplier").unwrap().to_owned();
    let created = call(
        &base,
        "POST",
        "/v1/orders",
        &order(id, "5.00", 900, &receiver.url),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    assert_eq!(admin_pay(&sim, id).await.status, 200);
    eventually(|| {
        let order = sim.order(id)?;
        (order.callbacks.len() == 2).then_some(())
    })
    .await;
    sim.shutdown().await;
    assert_eq!(receiver.received().len(), 2);

    let sim = start_keeping(&file).await;
    receiver.wait_for(3).await;
    let record = eventually(|| sim.order(id).filter(|o| o.callbacks.len() == 3)).await;
    let acks: Vec<bool> = record.callbacks.iter().map(|c| c.acknowledged).collect();
    assert_eq!(acks, [false, false, true]);
    assert_eq!(record.pay_count, 1, "notified again, never paid again");
    sim.shutdown().await;
}

/// An orders file the simulator cannot read (not JSON, another format version) stops the
/// start with a message naming it, and is left as it was: never silently replaced by an
/// empty record.
#[tokio::test]
async fn an_unreadable_orders_file_stops_the_start_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.json");
    for text in ["{not json", r#"{"version": 99, "channels": {}}"#] {
        std::fs::write(&file, text).unwrap();
        let mut config = SimConfig::new(vec![spec("supplier", ChannelKind::Supplier)]);
        config.orders_file = Some(file.clone());
        let refused = Sim::start(config)
            .await
            .err()
            .expect("the start is refused");
        assert!(
            refused.to_string().contains("orders file"),
            "{text}: {refused}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    }
}
