//! The HTTP API end to end: the double-spend bar, idempotency under concurrency, and every
//! error this stage can produce, each with a check that nothing changed.

use hyper::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// N concurrent payments of 10.00 against an account whose balance + credit is 100.00:
/// exactly 10 succeed, the rest get 402 with exact details, and the account ends exact.
async fn double_spend(
    backend: Backend,
    balance: &str,
    credit: &str,
    method: &str,
    end_balance: &str,
    end_held: &str,
) {
    let app = std::sync::Arc::new(spawn_app(backend).await);
    app.funded_account(ALPHA, "alpha", "acc", balance, credit)
        .await;
    let n = 40;
    let mut tasks = Vec::new();
    for i in 0..n {
        let app = app.clone();
        let body = json!({
            "merchant_order_id": format!("o{i}"), "amount": "10.00", "currency": "CNY",
            "method": method, "account_id": "acc"
        });
        tasks.push(tokio::spawn(async move {
            app.pay(ALPHA, &format!("k{i}"), body).await
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            201 => ok += 1,
            402 => {
                assert_eq!(reply.code(), "insufficient_funds");
                assert_eq!(reply.body["error"]["available"], "0.00");
                assert_eq!(reply.body["error"]["shortfall"], "10.00");
                refused += 1;
            }
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    assert_eq!((ok, refused), (10, n - 10));
    app.assert_account(ALPHA, "acc", end_balance, end_held, "0.00")
        .await;
}

#[tokio::test]
async fn double_spend_with_redis_balance_only() {
    double_spend(Backend::Redis, "100.00", "0.00", "balance", "0.00", "0.00").await;
}

#[tokio::test]
async fn double_spend_with_redis_and_a_credit_line() {
    double_spend(
        Backend::Redis,
        "60.00",
        "40.00",
        "balance",
        "-40.00",
        "0.00",
    )
    .await;
}

#[tokio::test]
async fn double_spend_with_redis_holds() {
    double_spend(
        Backend::Redis,
        "60.00",
        "40.00",
        "supplier",
        "60.00",
        "100.00",
    )
    .await;
}

#[tokio::test]
async fn double_spend_in_process() {
    double_spend(
        Backend::Memory,
        "60.00",
        "40.00",
        "balance",
        "-40.00",
        "0.00",
    )
    .await;
}

#[tokio::test]
async fn concurrent_requests_with_one_key_make_one_payment_and_one_hold() {
    let app = std::sync::Arc::new(spawn_app(Backend::Redis).await);
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.pay(ALPHA, "one-key", supplier_payment("o1", "acc", "30.00"))
                .await
        }));
    }
    // While the first is being committed the others are told to retry later; none makes a
    // second payment or a second hold.
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            201 => {
                ids.insert(reply.body["id"].as_str().unwrap().to_owned());
            }
            409 => {
                assert_eq!(reply.code(), "idempotency_in_flight", "{:?}", reply.body);
                assert_eq!(reply.headers.get("retry-after").unwrap(), "1");
            }
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    assert_eq!(ids.len(), 1);
    let retry = app
        .pay(ALPHA, "one-key", supplier_payment("o1", "acc", "30.00"))
        .await;
    assert_eq!(retry.status, 201);
    assert!(ids.contains(retry.body["id"].as_str().unwrap()));
    app.assert_account(ALPHA, "acc", "100.00", "30.00", "70.00")
        .await;
}

#[tokio::test]
async fn a_payment_reads_back_and_is_found_by_order_id() {
    let app = spawn_app(Backend::Redis).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let body = json!({
        "merchant_order_id": "card-42", "amount": "12.50", "currency": "CNY", "method": "balance",
        "account_id": "acc", "description": "Game card 50", "metadata": {"sku": "gc-50"},
        "expires_in_seconds": 600
    });
    let created = app.pay(ALPHA, "k1", body).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let p = &created.body;
    assert_eq!(p["status"], "succeeded");
    assert_eq!(p["amount"], "12.50");
    assert_eq!(p["currency"], "CNY");
    assert_eq!(p["method"], "balance");
    assert_eq!(p["purpose"], "charge");
    assert_eq!(p["account_id"], "acc");
    assert_eq!(p["metadata"]["sku"], "gc-50");
    assert_eq!(p["action"], Value::Null);
    assert_eq!(p["attempts"], json!([]));
    let id = p["id"].as_str().unwrap();
    assert!(id.starts_with("pay_") && id.len() == 30, "{id}");
    let read = app.get(&format!("/v1/payments/{id}"), ALPHA).await;
    assert_eq!(read.status, 200);
    // The same payment; by now with its webhook (enqueued with its settlement).
    assert_eq!(
        read.body["webhooks"][0]["type"], "payment.succeeded",
        "{}",
        read.body
    );
    let (mut read_body, mut created_body) = (read.body.clone(), created.body.clone());
    read_body.as_object_mut().unwrap().remove("webhooks");
    created_body.as_object_mut().unwrap().remove("webhooks");
    assert_eq!(read_body, created_body);
    let found = app
        .get(
            "/v1/payments?merchant_order_id=card-42&account_id=acc",
            ALPHA,
        )
        .await;
    assert_eq!(found.status, 200);
    assert_eq!(found.body["id"], id);
    // Replaying the same request answers the same payment.
    let body = json!({
        "account_id": "acc", "merchant_order_id": "card-42", "amount": "12.5", "currency": "CNY",
        "method": "balance", "description": "Game card 50", "metadata": {"sku": "gc-50"},
        "expires_in_seconds": 600
    });
    let replay = app.pay(ALPHA, "k1", body).await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body["id"], id);
    app.assert_account(ALPHA, "acc", "87.50", "0.00", "87.50")
        .await;
    // A channel charge has no account and holds nothing.
    let alipay = json!({"merchant_order_id": "ali-1", "amount": "5.00", "currency": "CNY", "method": "alipay"});
    let created = app.pay(ALPHA, "k2", alipay).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["status"], "pending");
    assert_eq!(created.body["account_id"], Value::Null);
    let found = app.get("/v1/payments?merchant_order_id=ali-1", ALPHA).await;
    assert_eq!(found.body["id"], created.body["id"]);
}

#[tokio::test]
async fn cancel_releases_the_hold_frees_the_order_id_and_refuses_succeeded_payments() {
    let app = spawn_app(Backend::Redis).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let pending = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "40.00"))
        .await;
    assert_eq!(pending.status, 201);
    assert_eq!(pending.body["status"], "pending");
    app.assert_account(ALPHA, "acc", "100.00", "40.00", "60.00")
        .await;
    let id = pending.body["id"].as_str().unwrap();
    let cancel = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c1", json!({}))
        .await;
    assert_eq!(cancel.status, 200, "{:?}", cancel.body);
    assert_eq!(cancel.body["status"], "canceled");
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
    // Cancel again: the same answer, nothing released twice.
    let again = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c2", json!({}))
        .await;
    assert_eq!(
        (again.status, again.body["status"].as_str()),
        (200, Some("canceled"))
    );
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
    // The order id is free again.
    let reuse = app
        .pay(ALPHA, "k2", balance_payment("o1", "acc", "40.00"))
        .await;
    assert_eq!(reuse.status, 201, "{:?}", reuse.body);
    // A succeeded payment cannot be canceled.
    let done = reuse.body["id"].as_str().unwrap();
    let refused = app
        .post(
            &format!("/v1/payments/{done}/cancel"),
            ALPHA,
            "c3",
            json!({}),
        )
        .await;
    assert_eq!(refused.status, 422);
    assert_eq!(refused.code(), "invalid_state");
    assert_eq!(refused.body["error"]["status"], "succeeded");
    app.assert_account(ALPHA, "acc", "60.00", "0.00", "60.00")
        .await;
}

/// A supplier charge's hold goes with the channel's word: at expiry the order is closed, the
/// supplier confirms, the hold is released and the payment expires (the sweeper, running all
/// along, never takes it: see `arbiter::a_supplier_hold_waits_for_the_channels_word`).
#[tokio::test]
async fn an_expired_supplier_charge_is_closed_and_its_hold_released() {
    let app = spawn_app_with(
        Backend::Redis,
        &[
            crate::helpers::QUICK_EXPIRY,
            crate::helpers::FAST_RESOLUTION,
        ]
        .concat(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut body = supplier_payment("o1", "acc", "25.00");
    body["expires_in_seconds"] = json!(2);
    let pending = app.pay(ALPHA, "k1", body).await;
    assert_eq!(pending.status, 201);
    let id = pending.body["id"].as_str().unwrap().to_owned();
    // Watch the payment (a read does not release holds) until the resolution loop expires it.
    let mut status = String::new();
    for _ in 0..100 {
        status = app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"]
            .as_str()
            .unwrap()
            .to_owned();
        if status != "pending" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, "expired");
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
}

/// Every refusal before the payment logic: the right status and code, the field named, and
/// nothing changed (balance, held, no payment for the order id, the key still usable).
#[tokio::test]
async fn bad_payment_requests_are_refused_with_the_field_and_change_nothing() {
    let app = spawn_app(Backend::Redis).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let valid = balance_payment("o1", "acc", "10.00");
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    let long = "x".repeat(300);
    let cases: Vec<(Value, &str)> = vec![
        (with("amount", json!("0")), "amount"),
        (with("amount", json!("0.00")), "amount"),
        (with("amount", json!("-1.00")), "amount"),
        (with("amount", json!("1.001")), "amount"),
        (with("amount", json!("1e3")), "amount"),
        (with("amount", json!(" 1.00")), "amount"),
        (with("amount", json!("1.00 ")), "amount"),
        (with("amount", json!("NaN")), "amount"),
        (with("amount", json!("١٠")), "amount"),
        (
            with("amount", json!("99999999999999999999999.00")),
            "amount",
        ),
        (with("amount", json!("50000.01")), "amount"),
        (with("amount", json!(10)), "amount"),
        (without("amount"), "amount"),
        (with("currency", json!("XYZ")), "currency"),
        (with("currency", json!("cny")), "currency"),
        (with("currency", json!("JPY")), "currency"),
        (with("method", json!("paypal")), "method"),
        (without("account_id"), "account_id"),
        (with("account_id", json!("bad id")), "account_id"),
        (with("method", json!("alipay")), "account_id"),
        (with("merchant_order_id", json!("")), "merchant_order_id"),
        (
            with("merchant_order_id", json!("has space")),
            "merchant_order_id",
        ),
        (
            with("merchant_order_id", json!("x".repeat(65))),
            "merchant_order_id",
        ),
        (with("description", json!(long)), "description"),
        (with("notify_url", json!("ftp://x")), "notify_url"),
        // Webhooks are signed but not encrypted over plain http: only to a loopback host.
        (
            with("notify_url", json!("http://merchant.example/hooks")),
            "notify_url",
        ),
        (with("metadata", json!({"k": 1})), "metadata.k"),
        (
            with("metadata", json!({"k": "x".repeat(501)})),
            "metadata.k",
        ),
        (with("metadata", json!("not an object")), "metadata"),
        (
            with(
                "metadata",
                Value::Object((0..21).map(|i| (format!("k{i}"), json!("v"))).collect()),
            ),
            "metadata",
        ),
        (with("expires_in_seconds", json!(5)), "expires_in_seconds"),
        (with("expires_in_seconds", json!(-5)), "expires_in_seconds"),
        (with("ammount", json!("1.00")), "ammount"),
        (json!([1, 2]), "body"),
    ];
    for (body, field) in cases {
        let reply = app.pay(ALPHA, "reused-key", body.clone()).await;
        assert_eq!(reply.status, 400, "{body}: {:?}", reply.body);
        assert_eq!(reply.code(), "invalid_request", "{body}");
        assert_eq!(
            reply.body["error"]["field"], field,
            "{body}: {:?}",
            reply.body
        );
    }
    // Malformed JSON, an oversized body, a missing or bad Idempotency-Key.
    let raw = app
        .request(
            Method::POST,
            "/v1/payments",
            Some(ALPHA),
            Some("reused-key"),
            Some("{\"amount\":".into()),
        )
        .await;
    assert_eq!(
        (raw.status, raw.body["error"]["field"].as_str()),
        (400, Some("body"))
    );
    let huge = json!({"merchant_order_id": "o1", "description": "x".repeat(20_000)});
    let big = app.pay(ALPHA, "reused-key", huge).await;
    assert_eq!(
        (big.status, big.body["error"]["field"].as_str()),
        (400, Some("body"))
    );
    let no_key = app
        .request(
            Method::POST,
            "/v1/payments",
            Some(ALPHA),
            None,
            Some(valid.to_string()),
        )
        .await;
    assert_eq!(
        (no_key.status, no_key.body["error"]["field"].as_str()),
        (400, Some("Idempotency-Key"))
    );
    let bad_key = app.pay(ALPHA, &"k".repeat(256), valid.clone()).await;
    assert_eq!(
        (bad_key.status, bad_key.body["error"]["field"].as_str()),
        (400, Some("Idempotency-Key"))
    );

    // Nothing changed, and the key that saw only refusals still works.
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
    assert_eq!(
        app.get("/v1/payments?merchant_order_id=o1&account_id=acc", ALPHA)
            .await
            .status,
        404
    );
    let ok = app.pay(ALPHA, "reused-key", valid).await;
    assert_eq!(ok.status, 201, "{:?}", ok.body);
}

#[tokio::test]
async fn authentication_and_ownership_are_enforced_and_change_nothing() {
    let app = spawn_app(Backend::Redis).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let pending = app
        .pay(ALPHA, "k1", supplier_payment("o1", "acc", "10.00"))
        .await;
    let id = pending.body["id"].as_str().unwrap().to_owned();

    // 401: no key, a wrong key, a malformed header.
    for key in [None, Some("sk_test_nope"), Some("")] {
        let reply = app
            .request(
                Method::POST,
                "/v1/payments",
                key,
                Some("k9"),
                Some(balance_payment("o9", "acc", "1.00").to_string()),
            )
            .await;
        assert_eq!(
            (reply.status, reply.code()),
            (401, "unauthorized"),
            "{key:?}"
        );
        let read = app
            .request(Method::GET, "/v1/accounts/acc", key, None, None)
            .await;
        assert_eq!(read.status, 401);
    }
    // 403: beta reading or canceling alpha's payment; a merchant key on an admin route; the
    // admin key on a merchant route.
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), BETA).await.status,
        403
    );
    let cancel = app
        .post(&format!("/v1/payments/{id}/cancel"), BETA, "c1", json!({}))
        .await;
    assert_eq!((cancel.status, cancel.code()), (403, "forbidden"));
    let admin = app
        .post(
            "/v1/accounts/acc/adjustments",
            ALPHA,
            "a1",
            json!({"merchant_id": "alpha", "direction": "credit", "amount": "1.00", "reason": "x"}),
        )
        .await;
    assert_eq!((admin.status, admin.code()), (403, "forbidden"));
    assert_eq!(app.get("/v1/accounts/acc", ADMIN).await.status, 403);
    // 404: beta cannot see alpha's account (ids are per merchant); unknown and malformed ids.
    assert_eq!(app.get("/v1/accounts/acc", BETA).await.code(), "not_found");
    assert_eq!(app.get("/v1/accounts/nope", ALPHA).await.status, 404);
    assert_eq!(app.get("/v1/accounts/bad%20id", ALPHA).await.status, 404);
    assert_eq!(
        app.get("/v1/payments/pay_nonsense", ALPHA).await.status,
        404
    );
    let unknown = format!("pay_00000000AAAAAAAA{}", &id[20..]);
    assert_eq!(
        app.get(&format!("/v1/payments/{unknown}"), ALPHA)
            .await
            .status,
        404
    );
    assert_eq!(
        app.pay(BETA, "k1", balance_payment("o1", "acc", "1.00"))
            .await
            .code(),
        "not_found"
    );
    assert_eq!(app.get("/v1/nowhere", ALPHA).await.status, 404);

    app.assert_account(ALPHA, "acc", "100.00", "10.00", "90.00")
        .await;
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "pending"
    );
}

#[tokio::test]
async fn conflicts_duplicates_and_in_flight_keys_are_409_and_change_nothing() {
    let app = spawn_app(Backend::Redis).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let first = app
        .pay(ALPHA, "k1", balance_payment("o1", "acc", "10.00"))
        .await;
    assert_eq!(first.status, 201);
    let id = first.body["id"].as_str().unwrap();

    let conflict = app
        .pay(ALPHA, "k1", balance_payment("o1", "acc", "11.00"))
        .await;
    assert_eq!(
        (conflict.status, conflict.code()),
        (409, "idempotency_conflict")
    );
    let duplicate = app
        .pay(ALPHA, "k2", balance_payment("o1", "acc", "10.00"))
        .await;
    assert_eq!(
        (duplicate.status, duplicate.code()),
        (409, "duplicate_order")
    );
    assert_eq!(duplicate.body["error"]["payment_id"], id);
    // 409s are not recorded: after the duplicate, key k2 is still free for another order.
    let other = app
        .pay(ALPHA, "k2", balance_payment("o2", "acc", "5.00"))
        .await;
    assert_eq!(other.status, 201, "{:?}", other.body);

    // A committed payment whose key Redis still has in flight (its waiter is answered before
    // the batch's keys are marked settled): the retry is the store's answer, not a 409.
    let third = app
        .pay(ALPHA, "k3", balance_payment("o3", "acc", "1.00"))
        .await;
    assert_eq!(third.status, 201);
    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("i:{{{}}}:k3", acc_tag()))
        .arg("s")
        .arg("F")
        .query_async(&mut redis)
        .await
        .unwrap();
    let retried = app
        .pay(ALPHA, "k3", balance_payment("o3", "acc", "1.00"))
        .await;
    assert_eq!(retried.status, 201, "{:?}", retried.body);
    assert_eq!(retried.body, third.body, "the replay is the first answer");
    // Under another request the key is still refused.
    let changed = app
        .pay(ALPHA, "k3", balance_payment("o3", "acc", "2.00"))
        .await;
    assert_eq!(
        (changed.status, changed.code()),
        (409, "idempotency_conflict")
    );
    // A key in flight that the store does not hold (its first request has not committed):
    // k4 gets k3's record (same request hash: the same body) in flight, and k3's body is
    // retried under k4. 409, and nothing is charged.
    let record: Vec<String> = redis::cmd("HMGET")
        .arg(format!("i:{{{}}}:k3", acc_tag()))
        .arg("h")
        .arg("o")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("i:{{{}}}:k4", acc_tag()))
        .arg("h")
        .arg(&record[0])
        .arg("s")
        .arg("F")
        .arg("o")
        .arg(&record[1])
        .query_async(&mut redis)
        .await
        .unwrap();
    let in_flight = app
        .pay(ALPHA, "k4", balance_payment("o3", "acc", "1.00"))
        .await;
    assert_eq!(
        (in_flight.status, in_flight.code()),
        (409, "idempotency_in_flight"),
        "{:?}",
        in_flight.body
    );
    assert_eq!(in_flight.headers.get("retry-after").unwrap(), "1");

    app.assert_account(ALPHA, "acc", "84.00", "0.00", "84.00")
        .await;
}

/// The scope tag of ALPHA's account `acc` (its Redis keys' hash tag).
fn acc_tag() -> gateway::ids::ScopeTag {
    gateway::ids::ScopeTag::account(
        &gateway::ids::MerchantId::parse("alpha").unwrap(),
        &gateway::ids::AccountId::parse("acc").unwrap(),
    )
}

#[tokio::test]
async fn insufficient_funds_is_recorded_and_replayed_but_frees_the_order_id() {
    let app = spawn_app(Backend::Redis).await;
    app.funded_account(ALPHA, "alpha", "acc", "5.00", "0.00")
        .await;
    let refused = app
        .pay(ALPHA, "k1", balance_payment("o1", "acc", "10.00"))
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (402, "insufficient_funds")
    );
    assert_eq!(refused.body["error"]["available"], "5.00");
    assert_eq!(refused.body["error"]["shortfall"], "5.00");
    app.credit("alpha", "acc", "10.00").await;
    // Same key: the first answer stands, even though the account could pay now.
    let replay = app
        .pay(ALPHA, "k1", balance_payment("o1", "acc", "10.00"))
        .await;
    assert_eq!(
        (replay.status, replay.body["error"]["available"].as_str()),
        (402, Some("5.00"))
    );
    // The order id was not used up.
    let paid = app
        .pay(ALPHA, "k2", balance_payment("o1", "acc", "10.00"))
        .await;
    assert_eq!(paid.status, 201);
    app.assert_account(ALPHA, "acc", "5.00", "0.00", "5.00")
        .await;
}

#[tokio::test]
async fn accounts_put_get_and_adjust() {
    let app = spawn_app(Backend::Redis).await;
    let created = app.put_account(ALPHA, "acc", "CNY", "50.00").await;
    assert_eq!(created.status, 201);
    assert_eq!(
        created.body,
        json!({"id": "acc", "currency": "CNY", "balance": "0.00", "held": "0.00", "credit_limit": "50.00", "available": "50.00"})
    );
    let updated = app.put_account(ALPHA, "acc", "CNY", "20.00").await;
    assert_eq!(
        (updated.status, updated.body["credit_limit"].as_str()),
        (200, Some("20.00"))
    );
    let no_credit = app
        .request(
            Method::PUT,
            "/v1/accounts/acc2",
            Some(ALPHA),
            None,
            Some(json!({"currency": "CNY"}).to_string()),
        )
        .await;
    assert_eq!(
        (no_credit.status, no_credit.body["credit_limit"].as_str()),
        (201, Some("0.00"))
    );
    // The currency never changes (422); bad bodies are 400 naming the field.
    let usd = app.put_account(ALPHA, "acc", "USD", "0.00").await;
    assert_eq!((usd.status, usd.code()), (422, "invalid_state"));
    for (body, field) in [
        (
            json!({"currency": "CNY", "credit_limit": "-1.00"}),
            "credit_limit",
        ),
        (
            json!({"currency": "CNY", "credit_limit": "1000000.01"}),
            "credit_limit",
        ),
        (json!({"currency": "EUR"}), "currency"),
        (json!({"credit_limit": "1.00"}), "currency"),
        (json!({"currency": "CNY", "balance": "100.00"}), "balance"),
    ] {
        let reply = app
            .request(
                Method::PUT,
                "/v1/accounts/acc",
                Some(ALPHA),
                None,
                Some(body.to_string()),
            )
            .await;
        assert_eq!(
            (reply.status, reply.body["error"]["field"].as_str()),
            (400, Some(field)),
            "{body}"
        );
    }
    let bad_id = app.put_account(ALPHA, "has.dot", "CNY", "0.00").await;
    assert_eq!(
        (bad_id.status, bad_id.body["error"]["field"].as_str()),
        (400, Some("account_id"))
    );

    // Adjustments: credit, debit, never below available 0, idempotent.
    let adj = |direction: &str, amount: &str| json!({"merchant_id": "alpha", "direction": direction, "amount": amount, "reason": "support ticket 7"});
    let credit = app
        .post(
            "/v1/accounts/acc/adjustments",
            ADMIN,
            "a1",
            adj("credit", "100.00"),
        )
        .await;
    assert_eq!(credit.status, 201, "{:?}", credit.body);
    assert!(credit.body["id"].as_str().unwrap().starts_with("adj_"));
    assert_eq!(credit.body["account"]["balance"], "100.00");
    let replay = app
        .post(
            "/v1/accounts/acc/adjustments",
            ADMIN,
            "a1",
            adj("credit", "100.00"),
        )
        .await;
    assert_eq!(
        (replay.status, &replay.body["id"]),
        (201, &credit.body["id"])
    );
    let conflict = app
        .post(
            "/v1/accounts/acc/adjustments",
            ADMIN,
            "a1",
            adj("credit", "1.00"),
        )
        .await;
    assert_eq!(conflict.code(), "idempotency_conflict");
    // available = 100 + 20 credit = 120.
    let overdraw = app
        .post(
            "/v1/accounts/acc/adjustments",
            ADMIN,
            "a2",
            adj("debit", "120.01"),
        )
        .await;
    assert_eq!(
        (
            overdraw.status,
            overdraw.body["error"]["shortfall"].as_str()
        ),
        (402, Some("0.01"))
    );
    let debit = app
        .post(
            "/v1/accounts/acc/adjustments",
            ADMIN,
            "a3",
            adj("debit", "120.00"),
        )
        .await;
    assert_eq!(
        (debit.status, debit.body["account"]["balance"].as_str()),
        (201, Some("-20.00"))
    );
    for (body, field) in [
        (
            json!({"merchant_id": "gamma", "direction": "credit", "amount": "1.00", "reason": "x"}),
            "merchant_id",
        ),
        (
            json!({"merchant_id": "alpha", "direction": "sideways", "amount": "1.00", "reason": "x"}),
            "direction",
        ),
        (
            json!({"merchant_id": "alpha", "direction": "credit", "amount": "0.001", "reason": "x"}),
            "amount",
        ),
        (
            json!({"merchant_id": "alpha", "direction": "credit", "amount": "1000000.01", "reason": "x"}),
            "amount",
        ),
        (
            json!({"merchant_id": "alpha", "direction": "credit", "amount": "1.00", "reason": " "}),
            "reason",
        ),
    ] {
        let reply = app
            .post("/v1/accounts/acc/adjustments", ADMIN, "a9", body.clone())
            .await;
        assert_eq!(
            (reply.status, reply.body["error"]["field"].as_str()),
            (400, Some(field)),
            "{body}"
        );
    }
    let missing = app
        .post(
            "/v1/accounts/ghost/adjustments",
            ADMIN,
            "a9",
            adj("credit", "1.00"),
        )
        .await;
    assert_eq!(missing.status, 404);
    app.assert_account(ALPHA, "acc", "-20.00", "0.00", "0.00")
        .await;
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let app = spawn_app(Backend::Redis).await;
    app.funded_account(ALPHA, "alpha", "acc", "10.00", "0.00")
        .await;
    app.pay(ALPHA, "k1", balance_payment("o1", "acc", "1.00"))
        .await;
    assert_eq!(
        app.request(Method::GET, "/healthz", None, None, None)
            .await
            .status,
        200
    );
    let ready = app.request(Method::GET, "/readyz", None, None, None).await;
    assert_eq!(
        (ready.status, ready.body["status"].as_str()),
        (200, Some("ready"))
    );
    let metrics = app.request(Method::GET, "/metrics", None, None, None).await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains(
            "gateway_http_requests_total{route=\"/v1/payments\",method=\"POST\",status=\"201\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("gateway_preauth_total{outcome=\"created\"}"),
        "{text}"
    );
    assert!(
        text.contains("gateway_redis_round_trips_total{op=\"authorize\"}"),
        "{text}"
    );
    assert!(
        text.contains("gateway_http_request_duration_seconds_bucket"),
        "{text}"
    );
    // Every store call is timed by op; only the writes count as commits (what may fsync).
    assert_eq!(app.get("/v1/admin/flagged", ADMIN).await.status, 200);
    let metrics = app.request(Method::GET, "/metrics", None, None, None).await;
    let text = metrics.body.as_str().unwrap();
    let commits: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("gateway_store_commits_total{"))
        .collect();
    assert!(
        text.contains(
            "gateway_settlement_store_call_seconds_count{backend=\"sqlite\",op=\"flagged\"}"
        ),
        "{text}"
    );
    assert!(
        commits
            .iter()
            .any(|l| l.contains("op=\"commit_writes\"") && l.contains("backend=\"sqlite\"")),
        "{commits:?}"
    );
    assert!(
        commits
            .iter()
            .all(|l| !l.contains("op=\"flagged\"") && !l.contains("op=\"schema_version\"")),
        "{commits:?}"
    );
}
