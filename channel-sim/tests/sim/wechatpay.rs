use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use channel_sim::clock::format_rfc3339_beijing;
use channel_sim::OrderStatus;
use serde_json::{json, Value};

use crate::helpers::*;

/// `Authorization` for a request, signed over `METHOD\nURL\nTIMESTAMP\nNONCE\nBODY\n`.
pub fn authorization(method: &str, target: &str, timestamp: u64, body: &str) -> String {
    let nonce = "C0FFEE0123456789ABCDEF0123456789";
    let message = format!("{method}\n{target}\n{timestamp}\n{nonce}\n{body}\n");
    let signature = merchant_signer().sign_base64(message.as_bytes());
    format!(
        "WECHATPAY2-SHA256-RSA2048 mchid=\"{MCHID}\",nonce_str=\"{nonce}\",signature=\"{signature}\",timestamp=\"{timestamp}\",serial_no=\"{MERCHANT_SERIAL}\""
    )
}

/// Sends a signed request and checks the reply's platform signature.
pub async fn call(base: &str, method: &str, target: &str, body: &str) -> Reply {
    let auth = authorization(method, target, now(), body);
    call_with(base, method, target, body, auth).await
}

async fn call_with(base: &str, method: &str, target: &str, body: &str, auth: String) -> Reply {
    let reply = send(
        method,
        &format!("{base}{target}"),
        &[
            ("authorization", auth),
            ("content-type", "application/json".into()),
            ("accept", "application/json".into()),
        ],
        body.to_owned(),
    )
    .await
    .unwrap();
    assert_signed(&reply.headers, &reply.body);
    reply
}

/// The platform signature over `TIMESTAMP\nNONCE\nBODY\n`, checked with aws-lc-rs.
fn assert_signed(headers: &http::HeaderMap, body: &str) {
    let h = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name}"))
            .to_str()
            .unwrap()
    };
    assert_eq!(h("wechatpay-serial"), PLATFORM_SERIAL);
    assert_eq!(h("wechatpay-signature-type"), "WECHATPAY2-SHA256-RSA2048");
    let timestamp: u64 = h("wechatpay-timestamp").parse().unwrap();
    assert!(timestamp.abs_diff(now()) <= 300);
    let message = format!(
        "{}\n{}\n{body}\n",
        h("wechatpay-timestamp"),
        h("wechatpay-nonce")
    );
    assert!(
        rsa_verify(PLATFORM_SPKI, message.as_bytes(), h("wechatpay-signature")),
        "platform signature over {body}"
    );
}

fn order_body(no: &str, total: u64, expire_in_seconds: i64, notify_url: &str) -> String {
    json!({
        "appid": APPID,
        "mchid": MCHID,
        "description": "Top-up",
        "out_trade_no": no,
        "time_expire": format_rfc3339_beijing(now() as i64 + expire_in_seconds),
        "notify_url": notify_url,
        "amount": {"total": total, "currency": "CNY"},
    })
    .to_string()
}

fn decrypt(resource: &Value) -> Value {
    assert_eq!(resource["algorithm"], "AEAD_AES_256_GCM");
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, API_V3_KEY.as_bytes()).unwrap());
    let nonce =
        Nonce::try_assume_unique_for_key(resource["nonce"].as_str().unwrap().as_bytes()).unwrap();
    let mut data = STANDARD
        .decode(resource["ciphertext"].as_str().unwrap())
        .unwrap();
    let aad = Aad::from(resource["associated_data"].as_str().unwrap().as_bytes());
    let plaintext = key.open_in_place(nonce, aad, &mut data).unwrap();
    serde_json::from_slice(plaintext).unwrap()
}

#[tokio::test]
async fn native_query_pay_notify_close_refund_round_trip() {
    let sim = start_sim().await;
    let base = sim.channel_url("wechatpay").unwrap();
    let receiver = Receiver::start(
        vec![(500, r#"{"code":"FAIL","message":"busy"}"#)],
        (204, ""),
    )
    .await;
    let no = "att_wx_round_trip_01";
    let body = order_body(no, 8888, 900, &receiver.url);
    let created = call(base, "POST", "/v3/pay/transactions/native", &body).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let code_url = created.json()["code_url"].as_str().unwrap().to_owned();
    assert!(code_url.starts_with("weixin://wxpay/bizpayurl?pr="));

    let target = format!("/v3/pay/transactions/out-trade-no/{no}?mchid={MCHID}");
    let queried = call(base, "GET", &target, "").await;
    assert_eq!(queried.json()["trade_state"], "NOTPAY");

    assert_eq!(admin_pay(&sim, no).await.status, 200);
    let callbacks = receiver.wait_for(2).await;
    for callback in &callbacks {
        assert_signed(&callback.headers, &callback.body);
    }
    let event: Value = serde_json::from_str(&callbacks[1].body).unwrap();
    assert_eq!(event["event_type"], "TRANSACTION.SUCCESS");
    assert_eq!(event["resource_type"], "encrypt-resource");
    assert_eq!(event["resource"]["original_type"], "transaction");
    let transaction = decrypt(&event["resource"]);
    assert_eq!(transaction["out_trade_no"], no);
    assert_eq!(transaction["mchid"], MCHID);
    assert_eq!(transaction["appid"], APPID);
    assert_eq!(transaction["trade_state"], "SUCCESS");
    assert_eq!(transaction["amount"]["total"], 8888);
    assert_eq!(transaction["amount"]["payer_total"], 8888);
    assert_eq!(transaction["amount"]["currency"], "CNY");

    let queried = call(base, "GET", &target, "").await.json();
    assert_eq!(queried["trade_state"], "SUCCESS");
    assert_eq!(queried["transaction_id"], transaction["transaction_id"]);

    let close_target = format!("/v3/pay/transactions/out-trade-no/{no}/close");
    let closed = call(
        base,
        "POST",
        &close_target,
        &json!({"mchid": MCHID}).to_string(),
    )
    .await;
    assert_eq!(
        (closed.status, closed.json()["code"].as_str()),
        (400, Some("ORDERPAID"))
    );

    let refund = json!({"out_trade_no": no, "out_refund_no": "RF1", "amount": {"refund": 1000, "total": 8888, "currency": "CNY"}}).to_string();
    let first = call(base, "POST", "/v3/refund/domestic/refunds", &refund).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let repeat = call(base, "POST", "/v3/refund/domestic/refunds", &refund).await;
    assert_eq!(repeat.json()["refund_id"], first.json()["refund_id"]);
    let too_much = json!({"out_trade_no": no, "out_refund_no": "RF2", "amount": {"refund": 7889, "total": 8888, "currency": "CNY"}}).to_string();
    assert_eq!(
        call(base, "POST", "/v3/refund/domestic/refunds", &too_much)
            .await
            .status,
        400
    );

    let record = sim.order(no).unwrap();
    assert_eq!((record.pay_count, record.refunded_cents), (1, 1000));
    assert_eq!(record.refunds[0].requests, 2);
    let attempts: Vec<(u32, Option<u16>, bool)> = record
        .callbacks
        .iter()
        .map(|c| (c.attempt, c.status, c.acknowledged))
        .collect();
    assert_eq!(attempts, [(1, Some(500), false), (2, Some(204), true)]);
    sim.shutdown().await;
}

#[tokio::test]
async fn refuses_bad_signatures_missing_query_and_stale_timestamps() {
    let sim = start_sim().await;
    let base = sim.channel_url("wechatpay").unwrap();
    let body = order_body("att_wx_bad_sig", 100, 900, "http://127.0.0.1:1/cb");
    // Signed over another body.
    let auth = authorization("POST", "/v3/pay/transactions/native", now(), "{}");
    let refused = call_with(base, "POST", "/v3/pay/transactions/native", &body, auth).await;
    assert_eq!(
        (refused.status, refused.json()["code"].as_str()),
        (401, Some("SIGN_ERROR"))
    );
    // Stale by more than 5 minutes.
    let auth = authorization("POST", "/v3/pay/transactions/native", now() - 301, &body);
    assert_eq!(
        call_with(base, "POST", "/v3/pay/transactions/native", &body, auth)
            .await
            .status,
        401
    );
    // A GET signed without its query string (the classic mistake).
    let path = "/v3/pay/transactions/out-trade-no/att_wx_bad_sig";
    let auth = authorization("GET", path, now(), "");
    let target = format!("{path}?mchid={MCHID}");
    assert_eq!(call_with(base, "GET", &target, "", auth).await.status, 401);
    // Wrong serial.
    let auth = authorization("POST", "/v3/pay/transactions/native", now(), &body)
        .replace(MERCHANT_SERIAL, "0000");
    assert_eq!(
        call_with(base, "POST", "/v3/pay/transactions/native", &body, auth)
            .await
            .status,
        401
    );
    assert!(sim.orders("wechatpay").unwrap().is_empty());
    // Correctly signed, it is accepted.
    assert_eq!(
        call(base, "POST", "/v3/pay/transactions/native", &body)
            .await
            .status,
        200
    );
    let unknown = call(
        base,
        "GET",
        &format!("/v3/pay/transactions/out-trade-no/nope123?mchid={MCHID}"),
        "",
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.json()["code"].as_str()),
        (404, Some("ORDER_NOT_EXIST"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn expiry_close_and_duplicated_callbacks() {
    let sim = start_sim().await;
    let base = sim.channel_url("wechatpay").unwrap();
    let receiver = Receiver::start(vec![], (200, "")).await;

    // Expiry: a pay after time_expire is refused, the order closed.
    let expiring = "att_wx_expiring";
    let created = call(
        base,
        "POST",
        "/v3/pay/transactions/native",
        &order_body(expiring, 100, 1, &receiver.url),
    )
    .await;
    assert_eq!(created.status, 200);
    // Close: a closed order cannot be paid.
    let closing = "att_wx_closing";
    call(
        base,
        "POST",
        "/v3/pay/transactions/native",
        &order_body(closing, 100, 900, &receiver.url),
    )
    .await;
    let closed = call(
        base,
        "POST",
        &format!("/v3/pay/transactions/out-trade-no/{closing}/close"),
        &json!({"mchid": MCHID}).to_string(),
    )
    .await;
    assert_eq!((closed.status, closed.body.as_str()), (204, ""));
    assert_eq!(admin_pay(&sim, closing).await.status, 409);

    // Duplicate: the acknowledged callback is sent once more; the order is paid once.
    admin_set_faults(&sim, "wechatpay", json!({"callback_duplicate": true})).await;
    let duplicated = "att_wx_duplicated";
    call(
        base,
        "POST",
        "/v3/pay/transactions/native",
        &order_body(duplicated, 100, 900, &receiver.url),
    )
    .await;
    assert_eq!(admin_pay(&sim, duplicated).await.status, 200);
    let callbacks = receiver.wait_for(2).await;
    assert_eq!(callbacks[0].body, callbacks[1].body);
    let record = eventually(|| sim.order(duplicated).filter(|o| o.callbacks.len() == 2)).await;
    assert_eq!(record.pay_count, 1);
    assert!(record.callbacks[1].duplicate && record.callbacks[1].acknowledged);

    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    assert_eq!(admin_pay(&sim, expiring).await.status, 409);
    let queried = call(
        base,
        "GET",
        &format!("/v3/pay/transactions/out-trade-no/{expiring}?mchid={MCHID}"),
        "",
    )
    .await;
    assert_eq!(queried.json()["trade_state"], "CLOSED");
    let orders = sim.orders("wechatpay").unwrap();
    let states: Vec<(&str, OrderStatus)> = orders
        .iter()
        .map(|o| (o.channel_order_id.as_str(), o.status))
        .collect();
    assert_eq!(
        states,
        [
            (expiring, OrderStatus::Closed),
            (closing, OrderStatus::Closed),
            (duplicated, OrderStatus::Paid)
        ]
    );
    assert_eq!(
        receiver.received().len(),
        2,
        "no callback for unpaid orders"
    );
    sim.shutdown().await;
}
