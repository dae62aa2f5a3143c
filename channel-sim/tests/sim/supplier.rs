use aws_lc_rs::hmac;
use channel_sim::clock::format_rfc3339_beijing;
use channel_sim::OrderStatus;
use serde_json::json;

use crate::helpers::*;

/// `t=<t>,v1=<hex HMAC-SHA256("<t>.<body>")>`, with aws-lc-rs directly.
pub fn signature(t: u64, body: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, SUPPLIER_SECRET.as_bytes());
    let tag = hmac::sign(&key, format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(tag.as_ref()))
}

fn assert_signed(headers: &http::HeaderMap, body: &str) {
    let header = headers
        .get("x-signature")
        .expect("X-Signature")
        .to_str()
        .unwrap();
    let t: u64 = header
        .strip_prefix("t=")
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(t.abs_diff(now()) <= 300);
    assert_eq!(header, signature(t, body), "signature over {body}");
}

pub async fn call(base: &str, method: &str, path: &str, body: &str) -> Reply {
    let reply = send(
        method,
        &format!("{base}{path}"),
        &[
            ("x-signature", signature(now(), body)),
            ("content-type", "application/json".into()),
        ],
        body.to_owned(),
    )
    .await
    .unwrap();
    assert_signed(&reply.headers, &reply.body);
    reply
}

pub fn order(id: &str, amount: &str, expire_in_seconds: i64, notify_url: &str) -> String {
    json!({
        "order_id": id,
        "amount": amount,
        "currency": "CNY",
        "notify_url": notify_url,
        "expires_at": format_rfc3339_beijing(now() as i64 + expire_in_seconds),
    })
    .to_string()
}

#[tokio::test]
async fn create_query_pay_notify_close_refund_round_trip() {
    let sim = start_sim().await;
    let base = sim.channel_url("supplier").unwrap();
    // A 200 without `{"received": true}` is not an acknowledgement.
    let receiver = Receiver::start(vec![(200, "ok")], (200, r#"{"received": true}"#)).await;
    let id = "att_sup_round_trip";
    let created = call(
        base,
        "POST",
        "/v1/orders",
        &order(id, "88.88", 900, &receiver.url),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let created = created.json();
    assert_eq!(
        (created["order_id"].as_str(), created["status"].as_str()),
        (Some(id), Some("accepted"))
    );
    let supplier_order_id = created["supplier_order_id"].as_str().unwrap().to_owned();

    let path = format!("/v1/orders/{id}");
    assert_eq!(
        call(base, "GET", &path, "").await.json()["status"],
        "accepted"
    );
    assert_eq!(admin_pay(&sim, id).await.status, 200);
    let callbacks = receiver.wait_for(2).await;
    for callback in &callbacks {
        assert_signed(&callback.headers, &callback.body);
    }
    let body: serde_json::Value = serde_json::from_str(&callbacks[1].body).unwrap();
    assert_eq!(
        body,
        json!({"order_id": id, "supplier_order_id": supplier_order_id, "status": "succeeded", "amount": "88.88", "currency": "CNY"})
    );
    assert_eq!(
        call(base, "GET", &path, "").await.json()["status"],
        "succeeded"
    );

    let closed = call(base, "POST", &format!("{path}/close"), "").await;
    assert_eq!(closed.status, 409);
    assert_eq!(
        closed.json(),
        json!({"error": "order_paid", "status": "succeeded"})
    );

    let refund = json!({"refund_id": "RF1", "amount": "80.00"}).to_string();
    let first = call(base, "POST", &format!("{path}/refunds"), &refund).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let repeat = call(base, "POST", &format!("{path}/refunds"), &refund).await;
    assert_eq!(repeat.json(), first.json());
    let too_much = json!({"refund_id": "RF2", "amount": "8.89"}).to_string();
    assert_eq!(
        call(base, "POST", &format!("{path}/refunds"), &too_much)
            .await
            .status,
        422
    );

    let record = sim.order(id).unwrap();
    assert_eq!(
        (
            record.pay_count,
            record.refunded_cents,
            record.refunds.len()
        ),
        (1, 8000, 1)
    );
    let acks: Vec<bool> = record.callbacks.iter().map(|c| c.acknowledged).collect();
    assert_eq!(acks, [false, true]);
    sim.shutdown().await;
}

#[tokio::test]
async fn refuses_bad_and_stale_signatures() {
    let sim = start_sim().await;
    let base = sim.channel_url("supplier").unwrap();
    let body = order("att_sup_bad", "1.00", 900, "http://127.0.0.1:1/cb");
    for header in [
        signature(now(), "{}"),
        signature(now() - 301, &body),
        "t=1,v1=zz".to_owned(),
    ] {
        let reply = send(
            "POST",
            &format!("{base}/v1/orders"),
            &[("x-signature", header)],
            body.clone(),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, 401);
        assert_eq!(reply.json(), json!({"error": "bad signature"}));
        assert_signed(&reply.headers, &reply.body);
    }
    assert!(sim.orders("supplier").unwrap().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn expiry_and_close_are_honored() {
    let sim = start_sim().await;
    let base = sim.channel_url("supplier").unwrap();
    let closing = "att_sup_closing";
    call(
        base,
        "POST",
        "/v1/orders",
        &order(closing, "5.00", 900, "http://127.0.0.1:1/cb"),
    )
    .await;
    let closed = call(base, "POST", &format!("/v1/orders/{closing}/close"), "").await;
    assert_eq!(closed.json()["status"], "closed");
    assert_eq!(admin_pay(&sim, closing).await.status, 409);

    let expiring = "att_sup_expiring";
    call(
        base,
        "POST",
        "/v1/orders",
        // Two seconds: enough for the create to arrive before it expires on a loaded machine.
        &order(expiring, "5.00", 2, "http://127.0.0.1:1/cb"),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(3_100)).await;
    assert_eq!(admin_pay(&sim, expiring).await.status, 409);
    assert_eq!(
        call(base, "GET", &format!("/v1/orders/{expiring}"), "")
            .await
            .json()["status"],
        "closed"
    );
    assert!(sim
        .orders("supplier")
        .unwrap()
        .iter()
        .all(|o| o.status == OrderStatus::Closed && o.pay_count == 0));
    sim.shutdown().await;
}

/// A signed GET whose status is returned without checking the reply signature (injected
/// server errors are not signed).
pub async fn call_unchecked(base: &str, path: &str) -> u16 {
    send(
        "GET",
        &format!("{base}{path}"),
        &[("x-signature", signature(now(), ""))],
        "",
    )
    .await
    .unwrap()
    .status
}
