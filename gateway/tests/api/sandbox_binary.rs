//! The real `gateway` binary: the README's sandbox walk-through exactly as documented, a
//! graceful SIGTERM, and `check-config`.

use std::process::Command;

use serde_json::json;

use crate::binary::{Gateway, BIN};

#[tokio::test]
async fn the_sandbox_serves_the_readme_walkthrough_and_stops_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(data.path(), None);
    for needle in ["sk_test_alpha", "sk_test_beta", "sk_test_admin"] {
        assert!(
            gw.banner.contains(needle),
            "the banner prints {needle}: {}",
            gw.banner
        );
    }
    // Its log lines, written to a pipe, carry no ANSI colour codes.
    assert!(gw.banner.contains(" INFO "), "{}", gw.banner);
    assert!(
        !gw.banner.contains('\u{1b}'),
        "colours in a pipe: {:?}",
        gw.banner
    );

    // The README's walk-through, step by step.
    let acc = gw
        .call(
            "PUT",
            "/v1/accounts/acc_1",
            "sk_test_alpha",
            None,
            json!({"currency": "CNY", "credit_limit": "0.00"}),
        )
        .await
        .unwrap();
    assert_eq!(acc.0, 201, "{:?}", acc.1);
    let credit = gw.call("POST", "/v1/accounts/acc_1/adjustments", "sk_test_admin", Some("fund-1"),
        json!({"merchant_id": "alpha", "direction": "credit", "amount": "100.00", "reason": "opening balance"})).await.unwrap();
    assert_eq!(
        (credit.0, credit.1["account"]["available"].as_str()),
        (201, Some("100.00"))
    );
    let pay = gw.call("POST", "/v1/payments", "sk_test_alpha", Some("order-1001"),
        json!({"merchant_order_id": "1001", "amount": "90.00", "currency": "CNY", "method": "balance", "account_id": "acc_1"})).await.unwrap();
    assert_eq!((pay.0, pay.1["status"].as_str()), (201, Some("succeeded")));
    let id = pay.1["id"].as_str().unwrap();
    let read = gw
        .call(
            "GET",
            &format!("/v1/payments/{id}"),
            "sk_test_alpha",
            None,
            json!(null),
        )
        .await
        .unwrap();
    assert_eq!((read.0, read.1["amount"].as_str()), (200, Some("90.00")));
    let account = gw
        .call(
            "GET",
            "/v1/accounts/acc_1",
            "sk_test_alpha",
            None,
            json!(null),
        )
        .await
        .unwrap();
    assert_eq!(account.1["balance"], "10.00");
    let short = gw.call("POST", "/v1/payments", "sk_test_alpha", Some("order-1002"),
        json!({"merchant_order_id": "1002", "amount": "20.00", "currency": "CNY", "method": "balance", "account_id": "acc_1"})).await.unwrap();
    assert_eq!(
        (short.0, short.1["error"]["shortfall"].as_str()),
        (402, Some("10.00"))
    );
    let again = gw.call("POST", "/v1/payments", "sk_test_alpha", Some("order-1001"),
        json!({"merchant_order_id": "1001", "amount": "95.00", "currency": "CNY", "method": "balance", "account_id": "acc_1"})).await.unwrap();
    assert_eq!(
        (again.0, again.1["error"]["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );

    // SIGTERM: a clean exit within the grace period.
    let status = gw.terminate().await;
    assert!(status.success(), "{status:?}");
}

#[test]
fn check_config_accepts_good_files_and_names_bad_fields() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let ok = Command::new(BIN)
        .args([
            "check-config",
            "--sandbox",
            &format!("{root}/config/sandbox.toml"),
        ])
        .env_remove("GATEWAY__REDIS__URL")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // By the production rules, the sandbox's published keys and secrets stop it, each named.
    let production = Command::new(BIN)
        .args(["check-config", &format!("{root}/config/sandbox.toml")])
        .env_remove("GATEWAY__REDIS__URL")
        .output()
        .unwrap();
    assert!(!production.status.success());
    let stderr = String::from_utf8_lossy(&production.stderr);
    for field in [
        "admin.api_key_sha256[0]",
        "merchants.alpha.api_key_sha256[0]",
        "merchants.beta.webhook_secret",
    ] {
        assert!(stderr.contains(field), "{field}: {stderr}");
    }
    let bad = Command::new(BIN)
        .args([
            "check-config",
            "--sandbox",
            &format!("{root}/config/sandbox.toml"),
        ])
        .env("GATEWAY__PREAUTH__LAZY_RELEASE_MAX", "0")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("preauth.lazy_release_max"), "{stderr}");
    let missing = Command::new(BIN)
        .args(["check-config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
}
