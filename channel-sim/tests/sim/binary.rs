//! `channel-sim serve --manifest FILE` as a process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::json;

use crate::helpers::*;
use crate::supplier;

fn free_port() -> u16 {
    // Bound and released: a small race with other processes, acceptable in tests.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn serves_the_channels_of_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("supplier.secret"),
        format!("{SUPPLIER_SECRET}\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("merchant.pem"), MERCHANT_PKCS8).unwrap();
    std::fs::write(dir.path().join("platform.pem"), PLATFORM_PKCS1).unwrap();
    let (admin, supplier_port, alipay_port) = (free_port(), free_port(), free_port());
    let manifest = json!({
        "merchants": {}, "admin_key": "sk_test_admin", "gateway_url": "http://127.0.0.1:1",
        "sim_admin_url": format!("http://127.0.0.1:{admin}"),
        "channels": {
            "supplier-main": {"kind": "supplier", "priority": 1,
                "base_url": format!("http://127.0.0.1:{supplier_port}"),
                "callback_url": "http://127.0.0.1:1/v1/callbacks/supplier-main",
                "ids": {}, "gateway_keys": {}, "channel_keys": {"supplier_secret": "supplier.secret"}},
            "alipay-main": {"kind": "alipay", "priority": 1,
                "base_url": format!("http://127.0.0.1:{alipay_port}"),
                "ids": {"app_id": APP_ID},
                "gateway_keys": {"app_private_key": "merchant.pem"},
                "channel_keys": {"alipay_private_key": "platform.pem"}}
        }
    });
    let path = dir.path().join("sandbox.json");
    std::fs::write(&path, manifest.to_string()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_channel-sim"))
        .args(["serve", "--manifest"])
        .arg(&path)
        .args(["--auto-pay", "false"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first line is printed once every listener is bound.
    let stdout = child.stdout.take().unwrap();
    let first_line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let first_line = tokio::time::timeout(WAIT, first_line)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first_line.trim(),
        format!("channel-sim admin: http://127.0.0.1:{admin}")
    );

    let base = format!("http://127.0.0.1:{supplier_port}");
    let id = "att_bin_01";
    let created = supplier::call(
        &base,
        "POST",
        "/v1/orders",
        &supplier::order(id, "2.00", 900, "http://127.0.0.1:1/cb"),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let order = send(
        "GET",
        &format!("http://127.0.0.1:{admin}/orders/{id}"),
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(order.json()["channel_id"], "supplier-main");
    assert_eq!(order.json()["status"], "unpaid");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn refuses_a_bad_manifest_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.json");
    std::fs::write(&path, r#"{"sim_admin_url": "http://127.0.0.1:1", "channels": {"s": {"kind": "supplier", "base_url": "http://127.0.0.1:2"}}}"#).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_channel-sim"))
        .args(["serve", "--manifest"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("channel `s`") && stderr.contains("supplier_secret"),
        "{stderr}"
    );
}
