//! The real binary killed with SIGKILL: nothing a client was told is lost, nothing is counted
//! twice, and balances equal the rebuild from the settlement store.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use gateway::settlement::sqlite::SqliteStore;
use gateway::settlement::{MoneyStore, PaymentStore};
use serde_json::{json, Value};

use crate::binary::Gateway;
use crate::helpers::RedisServer;

pub(crate) async fn fund(gw: &Gateway) {
    let put = gw
        .call(
            "PUT",
            "/v1/accounts/acc",
            "sk_test_alpha",
            None,
            json!({"currency": "CNY"}),
        )
        .await
        .unwrap();
    assert_eq!(put.0, 201, "{:?}", put.1);
    let credit = gw
        .call("POST", "/v1/accounts/acc/adjustments", "sk_test_admin", Some("fund"),
            json!({"merchant_id": "alpha", "direction": "credit", "amount": "1000.00", "reason": "crash test"}))
        .await
        .unwrap();
    assert_eq!(credit.0, 201, "{:?}", credit.1);
}

#[tokio::test]
async fn sigkill_during_a_burst_loses_nothing_the_client_saw() {
    let redis = RedisServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let gw = Arc::new(Gateway::start(data.path(), Some(&redis)));
    fund(&gw).await;

    // A burst of 1.00 payments; the gateway is killed once 30 have been answered, while the
    // rest are in flight.
    let answered_ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let gw = gw.clone();
        let answered_ok = answered_ok.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"merchant_order_id": format!("o{i}"), "amount": "1.00", "currency": "CNY", "method": "balance", "account_id": "acc"});
            let reply = gw.call("POST", "/v1/payments", "sk_test_alpha", Some(&format!("k{i}")), body).await;
            if matches!(reply, Some((201, _))) {
                answered_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            reply
        }));
    }
    for _ in 0..1_000 {
        if answered_ok.load(std::sync::atomic::Ordering::Relaxed) >= 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pid = gw.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
    let mut answered = Vec::new();
    for task in tasks {
        answered.push(task.await.unwrap());
    }
    drop(gw);
    verify(data.path(), &redis, answered).await;
}

async fn verify(data: &std::path::Path, redis: &RedisServer, answered: Vec<Option<(u16, Value)>>) {
    let ok: Vec<String> = answered
        .iter()
        .flatten()
        .filter(|(status, _)| *status == 201)
        .map(|(_, body)| body["id"].as_str().unwrap().to_owned())
        .collect();
    // Restart on the same data and Redis: startup recovery commits what was cut short.
    let gw = Gateway::start(data, Some(redis));
    let store = SqliteStore::open(&data.join("gateway.sqlite3")).unwrap();
    for id in &ok {
        let row = store
            .payment(id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} was answered 201 but is not on disk"));
        assert_eq!(row.status.as_str(), "succeeded");
    }
    // Every settlement has its debit in Redis, and the balances agree.
    let stored = store.balances(None).await.unwrap();
    let on_disk = stored[0].balance_minor;
    let account = gw
        .call(
            "GET",
            "/v1/accounts/acc",
            "sk_test_alpha",
            None,
            Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(account.0, 200);
    let balance = account.1["balance"]
        .as_str()
        .unwrap()
        .replace('.', "")
        .parse::<i64>()
        .unwrap();
    assert_eq!(balance, on_disk, "Redis {balance} vs store {on_disk}");
    let captures = store
        .postings_sum_by_movement()
        .await
        .unwrap()
        .into_iter()
        .filter(|(id, _, _, sum)| id.starts_with("pay_") && *sum == 0)
        .count() as i64;
    assert_eq!(
        on_disk,
        100_000 - captures * 100,
        "each capture is 1.00, counted once"
    );
    assert!(captures >= ok.len() as i64);
    let errors = answered.iter().filter(|a| a.is_none()).count();
    eprintln!(
        "burst: {} answered 201, {} cut off, {} captures on disk after restart",
        ok.len(),
        errors,
        captures
    );
    assert!(
        !ok.is_empty(),
        "the burst must have been under way when the gateway died"
    );
    // Each settled payment is succeeded in Redis too (no settlement without its debit).
    for id in &ok {
        let read = gw
            .call(
                "GET",
                &format!("/v1/payments/{id}"),
                "sk_test_alpha",
                None,
                Value::Null,
            )
            .await
            .unwrap();
        assert_eq!(read.1["status"], "succeeded");
    }
    gw.kill();
}

#[tokio::test]
async fn the_sandbox_keeps_every_balance_across_sigkill() {
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(data.path(), None);
    fund(&gw).await;
    for i in 0..5 {
        let body = json!({"merchant_order_id": format!("o{i}"), "amount": "12.34", "currency": "CNY", "method": "balance", "account_id": "acc"});
        assert_eq!(
            gw.call(
                "POST",
                "/v1/payments",
                "sk_test_alpha",
                Some(&format!("k{i}")),
                body
            )
            .await
            .unwrap()
            .0,
            201
        );
    }
    let held = gw
        .call("POST", "/v1/payments", "sk_test_alpha", Some("hold"),
            json!({"merchant_order_id": "h", "amount": "5.00", "currency": "CNY", "method": "supplier", "account_id": "acc"}))
        .await
        .unwrap();
    assert_eq!(held.0, 201);
    let before = gw
        .call(
            "GET",
            "/v1/accounts/acc",
            "sk_test_alpha",
            None,
            Value::Null,
        )
        .await
        .unwrap()
        .1;
    assert_eq!(
        (before["balance"].as_str(), before["held"].as_str()),
        (Some("938.30"), Some("5.00"))
    );
    gw.kill();

    let gw = Gateway::start(data.path(), None);
    let after = gw
        .call(
            "GET",
            "/v1/accounts/acc",
            "sk_test_alpha",
            None,
            Value::Null,
        )
        .await
        .unwrap()
        .1;
    assert_eq!(after, before);
    let id = held.1["id"].as_str().unwrap();
    let read = gw
        .call(
            "GET",
            &format!("/v1/payments/{id}"),
            "sk_test_alpha",
            None,
            Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(read.1["status"], "pending");
    gw.kill();
}
