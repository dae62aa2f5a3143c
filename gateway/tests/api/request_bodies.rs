//! Request bodies are read into typed fields (no `Value` tree); every refusal must stay the
//! one clients know, to the byte: the field named, the message, the precedence of the checks.
//! One route after another: invalid JSON, not an object, unknown fields, wrong types, `null`
//! as absent, and a repeated key (the last one counts).

use hyper::Method;
use serde_json::{json, Value};

use crate::helpers::*;

fn refusal(field: &str, message: &str) -> Value {
    json!({"error": {"code": "invalid_request", "field": field, "message": message}})
}

async fn post(app: &TestApp, path: &str, key: &str, body: &str) -> Reply {
    app.request(
        Method::POST,
        path,
        Some(key),
        Some(&uuidish()),
        Some(body.to_owned()),
    )
    .await
}

fn assert_refused(reply: &Reply, field: &str, message: &str, body: &str) {
    assert_eq!(
        (reply.status, &reply.body),
        (400, &refusal(field, message)),
        "{body}"
    );
}

#[tokio::test]
async fn payment_bodies_are_refused_as_they_always_were() {
    let app = spawn_app(Backend::Memory).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{"amount":"#,
            "body",
            "body is not valid JSON (EOF while parsing a value at line 1 column 10)",
        ),
        (
            r#"{"amount": "1.00",}"#,
            "body",
            "body is not valid JSON (trailing comma at line 1 column 19)",
        ),
        (
            r#"{"amount": 1e400}"#,
            "body",
            "body is not valid JSON (number out of range at line 1 column 16)",
        ),
        ("[1, 2]", "body", "body must be a JSON object"),
        ("null", "body", "body must be a JSON object"),
        (
            r#"{"zz": 1, "merchant_order_id": 5, "bb": 2}"#,
            "bb",
            "bb is not a known field",
        ),
        (
            r#"{"merchant_order_id": 5}"#,
            "merchant_order_id",
            "merchant_order_id must be a string",
        ),
        (
            r#"{"merchant_order_id": null, "amount": 5}"#,
            "merchant_order_id",
            "merchant_order_id is required",
        ),
        // Checked in the handler's order, not the body's.
        (
            r#"{"amount": 5, "merchant_order_id": "o1", "method": ["balance"]}"#,
            "method",
            "method must be a string",
        ),
        (
            r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": 10}"#,
            "amount",
            "amount must be a string",
        ),
        (
            r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": "1.00", "account_id": null}"#,
            "account_id",
            "account_id is required for methods balance and supplier",
        ),
        (
            r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": "1.00", "account_id": "acc", "expires_in_seconds": -1}"#,
            "expires_in_seconds",
            "expires_in_seconds must be a non-negative integer",
        ),
        (
            r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": "1.00", "account_id": "acc", "expires_in_seconds": 60.0}"#,
            "expires_in_seconds",
            "expires_in_seconds must be a non-negative integer",
        ),
        (
            r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": "1.00", "account_id": "acc", "expires_in_seconds": "60"}"#,
            "expires_in_seconds",
            "expires_in_seconds must be an integer",
        ),
        (
            r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": "1.00", "account_id": "acc", "metadata": ["a"]}"#,
            "metadata",
            "metadata must be an object",
        ),
        (
            r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": "1.00", "account_id": "acc", "metadata": {"b": "x", "a": 1}}"#,
            "metadata.a",
            "metadata.a must be a string",
        ),
        (
            r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": "1.00", "account_id": "acc", "description": true}"#,
            "description",
            "description must be a string",
        ),
        // A repeated key: the last one counts.
        (
            r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": "1.00", "amount": 1, "account_id": "acc"}"#,
            "amount",
            "amount must be a string",
        ),
    ];
    for (body, field, message) in cases {
        let reply = post(&app, "/v1/payments", ALPHA, body).await;
        assert_refused(&reply, field, message, body);
    }
    // `null` is absent, and the last of a repeated key counts: this one is a payment.
    let body = r#"{"merchant_order_id": "o1", "method": "balance", "currency": "CNY", "amount": 1, "amount": "1.00", "account_id": "acc", "description": null, "metadata": null, "notify_url": null, "expires_in_seconds": null}"#;
    let reply = post(&app, "/v1/payments", ALPHA, body).await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(
        (
            &reply.body["amount"],
            &reply.body["description"],
            &reply.body["metadata"]
        ),
        (&json!("1.00"), &Value::Null, &Value::Null)
    );
    app.assert_account(ALPHA, "acc", "99.00", "0.00", "99.00")
        .await;
}

#[tokio::test]
async fn top_up_refund_account_and_adjustment_bodies_are_refused_as_they_always_were() {
    let app = spawn_app(Backend::Memory).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let topups = "/v1/accounts/acc/topups";
    let refunds = "/v1/payments/pay_unknown/refunds";
    let adjustments = "/v1/accounts/acc/adjustments";
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        (topups, ALPHA, "{}", "method", "method is required"),
        (
            topups,
            ALPHA,
            r#"{"method": "alipay", "amount": "1.00", "currency": 156}"#,
            "currency",
            "currency must be a string",
        ),
        (
            topups,
            ALPHA,
            r#"{"method": "alipay", "amount": "1.00", "account_id": "acc"}"#,
            "account_id",
            "account_id is not a known field",
        ),
        (
            topups,
            ALPHA,
            r#"{"method": "alipay", "amount": "1.00", "merchant_order_id": {}}"#,
            "merchant_order_id",
            "merchant_order_id must be a string",
        ),
        (refunds, ALPHA, "7", "body", "body must be a JSON object"),
        (
            refunds,
            ALPHA,
            r#"{"amount": 1}"#,
            "amount",
            "amount must be a string",
        ),
        (
            refunds,
            ALPHA,
            r#"{"reason": ["x"], "amount": "1.00"}"#,
            "reason",
            "reason must be a string",
        ),
        (
            refunds,
            ALPHA,
            r#"{"amount": "1.00", "why": "x"}"#,
            "why",
            "why is not a known field",
        ),
        (
            adjustments,
            ADMIN,
            r#"{"merchant_id": "alpha", "direction": "credit", "amount": 100, "reason": "x"}"#,
            "amount",
            "amount must be a string",
        ),
        (
            adjustments,
            ADMIN,
            r#"{"merchant_id": "alpha", "direction": "credit", "amount": "1.00", "reason": null}"#,
            "reason",
            "reason is required (say why money moves)",
        ),
        (
            adjustments,
            ADMIN,
            r#"{"merchant_id": 1, "direction": "credit"}"#,
            "merchant_id",
            "merchant_id must be a string",
        ),
    ];
    for (path, key, body, field, message) in cases {
        let reply = post(&app, path, key, body).await;
        assert_refused(&reply, field, message, body);
    }
    for (body, field, message) in [
        (
            r#"{"currency": "CNY", "credit_limit": 5}"#,
            "credit_limit",
            "credit_limit must be a string",
        ),
        (r#"{"currency": null}"#, "currency", "currency is required"),
        (
            r#"{"currency": "CNY", "limit": "5.00"}"#,
            "limit",
            "limit is not a known field",
        ),
        (
            "{\"currency\": \"CNY\"",
            "body",
            "body is not valid JSON (EOF while parsing an object at line 1 column 18)",
        ),
    ] {
        let reply = app
            .request(
                Method::PUT,
                "/v1/accounts/acc2",
                Some(ALPHA),
                None,
                Some(body.to_owned()),
            )
            .await;
        assert_refused(&reply, field, message, body);
    }
    // Nothing changed.
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
    assert_eq!(app.account(ALPHA, "acc2").await.status, 404);
}
