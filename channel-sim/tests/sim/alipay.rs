use std::collections::BTreeMap;

use channel_sim::clock::format_alipay_time;
use channel_sim::{CloseReason, OrderStatus};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::helpers::*;

/// A signed `gateway.do` form.
pub fn form(method: &str, biz: &Value, notify_url: &str, app_id: &str) -> String {
    let mut params: Vec<(String, String)> = vec![
        ("app_id".into(), app_id.into()),
        ("method".into(), method.into()),
        ("format".into(), "JSON".into()),
        ("charset".into(), "utf-8".into()),
        ("sign_type".into(), "RSA2".into()),
        ("timestamp".into(), format_alipay_time(now() as i64)),
        ("version".into(), "1.0".into()),
        ("notify_url".into(), notify_url.into()),
        ("biz_content".into(), biz.to_string()),
    ];
    let mut sorted: Vec<&(String, String)> = params.iter().filter(|(_, v)| !v.is_empty()).collect();
    sorted.sort();
    let content: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let sign = merchant_signer().sign_base64(content.join("&").as_bytes());
    params.push(("sign".into(), sign));
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

/// Calls a method; returns the verified response object (the signature is checked over the
/// exact text of the object in the body, with Alipay's — the platform — public key).
pub async fn call(base: &str, method: &str, biz: Value, notify_url: &str) -> Value {
    call_as(base, method, biz, notify_url, APP_ID).await
}

async fn call_as(base: &str, method: &str, biz: Value, notify_url: &str, app_id: &str) -> Value {
    let body = form(method, &biz, notify_url, app_id);
    let reply = send(
        "POST",
        &format!("{base}/gateway.do"),
        &[(
            "content-type",
            "application/x-www-form-urlencoded;charset=utf-8".into(),
        )],
        body,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    verified_object(
        &reply.body,
        &format!("{}_response", method.replace('.', "_")),
    )
}

fn verified_object(body: &str, key: &str) -> Value {
    let top: BTreeMap<String, Box<RawValue>> = serde_json::from_str(body).unwrap();
    let text = top[key].get();
    let sign: String = serde_json::from_str(top["sign"].get()).unwrap();
    assert!(
        rsa_verify(PLATFORM_SPKI, text.as_bytes(), &sign),
        "reply signature: {body}"
    );
    serde_json::from_str(text).unwrap()
}

/// Checks an Alipay notice as the gateway must: without `sign` and `sign_type`, sorted.
fn verified_notice(body: &str) -> BTreeMap<String, String> {
    let params: BTreeMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(params["sign_type"], "RSA2");
    let content: Vec<String> = params
        .iter()
        .filter(|(k, v)| k.as_str() != "sign" && k.as_str() != "sign_type" && !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    assert!(
        rsa_verify(PLATFORM_SPKI, content.join("&").as_bytes(), &params["sign"]),
        "notice signature: {body}"
    );
    params
}

#[tokio::test]
async fn precreate_query_pay_notify_close_refund_round_trip() {
    let sim = start_sim().await;
    let base = sim.channel_url("alipay").unwrap();
    // The first notice is answered `fail`, so it is retried; then `success`.
    let receiver = Receiver::start(vec![(200, "fail")], (200, "success")).await;
    let no = "att_ali_round_trip_01";
    let biz = json!({"out_trade_no": no, "total_amount": "88.88", "subject": "Top-up 充值", "timeout_express": "15m"});
    let created = call(base, "alipay.trade.precreate", biz.clone(), &receiver.url).await;
    assert_eq!(created["code"], "10000");
    assert_eq!(created["out_trade_no"], no);
    let qr = created["qr_code"].as_str().unwrap().to_owned();
    assert!(qr.starts_with("https://qr.alipay.com/"));
    // A repeat of the same order answers the same code and creates nothing.
    let again = call(base, "alipay.trade.precreate", biz, &receiver.url).await;
    assert_eq!(again["qr_code"], qr.as_str());

    // Not scanned yet: the trade does not exist for query.
    let queried = call(base, "alipay.trade.query", json!({"out_trade_no": no}), "").await;
    assert_eq!(queried["code"], "40004");
    assert_eq!(queried["sub_code"], "ACQ.TRADE_NOT_EXIST");

    let paid = admin_pay(&sim, no).await;
    assert_eq!(paid.status, 200, "{}", paid.body);
    assert_eq!(paid.json()["outcome"], "paid");
    assert_eq!(admin_pay(&sim, no).await.json()["outcome"], "already_paid");

    // Attempt 1 (fail), attempt 2 (success), then TRADE_FINISHED.
    let notices = receiver.wait_for(3).await;
    let first = verified_notice(&notices[0].body);
    let second = verified_notice(&notices[1].body);
    assert_eq!(first["notify_id"], second["notify_id"]);
    assert_eq!(second["trade_status"], "TRADE_SUCCESS");
    assert_eq!(second["app_id"], APP_ID);
    assert_eq!(second["out_trade_no"], no);
    assert_eq!(second["total_amount"], "88.88");
    let finished = verified_notice(&notices[2].body);
    assert_eq!(finished["trade_status"], "TRADE_FINISHED");
    assert_eq!(finished["trade_no"], second["trade_no"]);

    let queried = call(base, "alipay.trade.query", json!({"out_trade_no": no}), "").await;
    assert_eq!(queried["code"], "10000");
    assert_eq!(queried["trade_status"], "TRADE_SUCCESS");
    assert_eq!(queried["trade_no"], second["trade_no"].as_str());

    // A paid trade cannot be closed.
    let closed = call(base, "alipay.trade.close", json!({"out_trade_no": no}), "").await;
    assert_eq!(closed["sub_code"], "ACQ.TRADE_STATUS_ERROR");

    // Refunds: once per out_request_no, never more than paid.
    let refund = json!({"out_trade_no": no, "refund_amount": "50.00", "out_request_no": "R1"});
    let first = call(base, "alipay.trade.refund", refund.clone(), "").await;
    assert_eq!(
        (first["code"].as_str(), first["fund_change"].as_str()),
        (Some("10000"), Some("Y"))
    );
    assert_eq!(first["refund_fee"], "50.00");
    let repeat = call(base, "alipay.trade.refund", refund, "").await;
    assert_eq!(
        (
            repeat["fund_change"].as_str(),
            repeat["refund_fee"].as_str()
        ),
        (Some("N"), Some("50.00"))
    );
    let too_much = json!({"out_trade_no": no, "refund_amount": "38.89", "out_request_no": "R2"});
    let refused = call(base, "alipay.trade.refund", too_much, "").await;
    assert_eq!(refused["sub_code"], "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL");

    let record = sim.order(no).unwrap();
    assert_eq!(record.pay_count, 1);
    assert_eq!(record.create_requests, 2);
    assert_eq!(record.refunded_cents, 5000);
    assert_eq!(record.refunds.len(), 1);
    assert_eq!(record.refunds[0].requests, 2);
    let attempts: Vec<(String, u32, bool)> = record
        .callbacks
        .iter()
        .map(|c| (c.event.clone(), c.attempt, c.acknowledged))
        .collect();
    assert_eq!(
        attempts,
        [
            ("TRADE_SUCCESS".into(), 1, false),
            ("TRADE_SUCCESS".into(), 2, true),
            ("TRADE_FINISHED".into(), 1, true)
        ]
    );
    // The admin API shows the same record.
    let listed = send(
        "GET",
        &format!("{}/channels/alipay/orders", sim.admin_url()),
        &[],
        "",
    )
    .await
    .unwrap()
    .json();
    assert_eq!(listed[0]["channel_order_id"], no);
    assert_eq!(listed[0]["pay_count"], 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn refuses_bad_signatures_and_foreign_app_ids_with_signed_errors() {
    let sim = start_sim().await;
    let base = sim.channel_url("alipay").unwrap();
    let biz = json!({"out_trade_no": "att_ali_bad_sig", "total_amount": "1.00", "subject": "x"});
    // Tamper with the amount after signing.
    let body = form("alipay.trade.precreate", &biz, "", APP_ID).replace("1.00", "9.00");
    let reply = send(
        "POST",
        &format!("{base}/gateway.do"),
        &[("content-type", "application/x-www-form-urlencoded".into())],
        body,
    )
    .await
    .unwrap();
    let object = verified_object(&reply.body, "alipay_trade_precreate_response");
    assert_eq!(object["code"], "40002");
    assert_eq!(object["sub_code"], "isv.invalid-signature");

    let foreign = call_as(base, "alipay.trade.precreate", biz, "", "2021999999999999").await;
    assert_eq!(foreign["sub_code"], "isv.invalid-app-id");
    assert!(
        sim.orders("alipay").unwrap().is_empty(),
        "nothing was created"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn an_expired_order_cannot_be_paid_and_is_closed() {
    let sim = start_sim().await;
    let base = sim.channel_url("alipay").unwrap();
    let no = "att_ali_expiry";
    let expire = format_alipay_time(now() as i64 + 1);
    let biz =
        json!({"out_trade_no": no, "total_amount": "10.00", "subject": "x", "time_expire": expire});
    assert_eq!(
        call(base, "alipay.trade.precreate", biz, "").await["code"],
        "10000"
    );
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let refused = admin_pay(&sim, no).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let record = sim.order(no).unwrap();
    assert_eq!(
        (record.status, record.close_reason),
        (OrderStatus::Closed, Some(CloseReason::Expired))
    );
    assert_eq!(record.pay_count, 0);
    // Close confirms it is not paid.
    let closed = call(base, "alipay.trade.close", json!({"out_trade_no": no}), "").await;
    assert_eq!(closed["code"], "10000");
    sim.shutdown().await;
}
