//! The real `gateway` binary: the README's sandbox walk-through exactly as documented, a
//! graceful SIGTERM, and `check-config`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use hyper::Method;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

#[tokio::test]
async fn the_sandbox_serves_the_readme_walkthrough_and_stops_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--sandbox",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data.path())
        .env_remove("GATEWAY__REDIS__URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let mut addr = None;
    for _ in 0..20 {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        banner.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("gateway listening on http://") {
            addr = Some(rest.to_owned());
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no listening line in {banner:?}"));
    for needle in ["sk_test_alpha", "sk_test_beta", "sk_test_admin"] {
        assert!(
            banner.contains(needle),
            "the banner prints {needle}: {banner}"
        );
    }

    let app = Remote(addr);
    // The README's walk-through, step by step.
    let acc = app
        .call(
            Method::PUT,
            "/v1/accounts/acc_1",
            "sk_test_alpha",
            None,
            json!({"currency": "CNY", "credit_limit": "0.00"}),
        )
        .await;
    assert_eq!(acc.0, 201, "{:?}", acc.1);
    let credit = app.call(Method::POST, "/v1/accounts/acc_1/adjustments", "sk_test_admin", Some("fund-1"),
        json!({"merchant_id": "alpha", "direction": "credit", "amount": "100.00", "reason": "opening balance"})).await;
    assert_eq!(
        (credit.0, credit.1["account"]["available"].as_str()),
        (201, Some("100.00"))
    );
    let pay = app.call(Method::POST, "/v1/payments", "sk_test_alpha", Some("order-1001"),
        json!({"merchant_order_id": "1001", "amount": "90.00", "currency": "CNY", "method": "balance", "account_id": "acc_1"})).await;
    assert_eq!((pay.0, pay.1["status"].as_str()), (201, Some("succeeded")));
    let id = pay.1["id"].as_str().unwrap();
    let read = app
        .call(
            Method::GET,
            &format!("/v1/payments/{id}"),
            "sk_test_alpha",
            None,
            json!(null),
        )
        .await;
    assert_eq!((read.0, read.1["amount"].as_str()), (200, Some("90.00")));
    let account = app
        .call(
            Method::GET,
            "/v1/accounts/acc_1",
            "sk_test_alpha",
            None,
            json!(null),
        )
        .await;
    assert_eq!(account.1["balance"], "10.00");
    let short = app.call(Method::POST, "/v1/payments", "sk_test_alpha", Some("order-1002"),
        json!({"merchant_order_id": "1002", "amount": "20.00", "currency": "CNY", "method": "balance", "account_id": "acc_1"})).await;
    assert_eq!(
        (short.0, short.1["error"]["shortfall"].as_str()),
        (402, Some("10.00"))
    );
    let again = app.call(Method::POST, "/v1/payments", "sk_test_alpha", Some("order-1001"),
        json!({"merchant_order_id": "1001", "amount": "95.00", "currency": "CNY", "method": "balance", "account_id": "acc_1"})).await;
    assert_eq!(
        (again.0, again.1["error"]["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );

    // SIGTERM: a clean exit within the grace period.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("the gateway exits after SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn check_config_accepts_good_files_and_names_bad_fields() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let ok = Command::new(BIN)
        .args(["check-config", &format!("{root}/config/sandbox.toml")])
        .env_remove("GATEWAY__REDIS__URL")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = Command::new(BIN)
        .args(["check-config", &format!("{root}/config/sandbox.toml")])
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

struct Remote(String);

impl Remote {
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: &str,
        idempotency: Option<&str>,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        use http_body_util::{BodyExt, Full};
        use hyper::body::Bytes;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.0, path))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json");
        if let Some(k) = idempotency {
            request = request.header("idempotency-key", k);
        }
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let response = client
            .request(request.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }
}
