//! The binary's refusals (a manifest pointing off this machine is refused with exit code 2,
//! before anything is sent), and `baseline-proxy` as a process: it says where it listens,
//! answers, and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

fn loadtest(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .output()
        .expect("run loadtest")
}

/// Writes `json` as `dir/sandbox.json` and returns its path.
fn write_manifest(dir: &std::path::Path, json: &str) -> std::path::PathBuf {
    let path = dir.join("sandbox.json");
    std::fs::write(&path, json).unwrap();
    path
}

#[test]
fn a_non_loopback_gateway_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_manifest(
        dir.path(),
        r#"{"merchants": {"alpha": {"api_key": "sk_test_alpha"}}, "admin_key": null,
            "gateway_url": "http://192.168.1.20:8080", "sim_admin_url": "http://127.0.0.1:9",
            "channels": {}}"#,
    );
    let out = loadtest(&[
        "run",
        "--scenario",
        "authorize",
        "--manifest",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not on a loopback address"), "{stderr}");
}

#[test]
fn bad_arguments_and_missing_manifests_exit_2() {
    let out = loadtest(&["run", "--scenario", "outage"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = loadtest(&[
        "run",
        "--scenario",
        "authorize",
        "--manifest",
        "/nonexistent/sandbox.json",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = loadtest(&["run", "--scenario", "authorize", "--rate", "0"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = loadtest(&["run", "--scenario", "authorize", "--pid", "gateway=notapid"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Redis too must be on this machine.
    for addr in ["10.0.0.1:6379", "redis.example.com:6379", "127.0.0.1"] {
        let out = loadtest(&["run", "--scenario", "authorize", "--redis-addr", addr]);
        assert_eq!(out.status.code(), Some(2), "{addr}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("loopback"), "{addr}: {stderr}");
    }
}

#[test]
fn a_checkout_method_the_manifest_or_the_command_cannot_serve_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    // A merchant and a supplier channel only (nothing listens at the URLs: every refusal
    // below comes before anything is sent).
    let manifest = write_manifest(
        dir.path(),
        r#"{"merchants": {"alpha": {"api_key": "sk_test_alpha"}}, "admin_key": null,
            "gateway_url": "http://127.0.0.1:9", "sim_admin_url": "http://127.0.0.1:9",
            "channels": {"supplier-main": {"kind": "supplier", "priority": 1,
                "base_url": "http://127.0.0.1:9", "callback_url": "http://127.0.0.1:9/cb"}}}"#,
    );
    let manifest = manifest.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "run",
                "--scenario",
                "checkout",
                "--checkout-method",
                "wechatpay",
            ],
            "the manifest has no wechatpay channel",
        ),
        (
            &[
                "run",
                "--scenario",
                "checkout",
                "--checkout-method",
                "alipay",
                "--target",
                "baseline",
            ],
            "supplier checkouts only",
        ),
        (
            &[
                "compare",
                "--scenario",
                "checkout",
                "--checkout-method",
                "alipay",
                "--slo-p99-ms",
                "50",
            ],
            "supplier checkouts only",
        ),
        (
            &[
                "run",
                "--scenario",
                "failover",
                "--checkout-method",
                "wechatpay",
            ],
            "supplier checkouts only",
        ),
        (
            &[
                "run",
                "--scenario",
                "checkout",
                "--checkout-method",
                "balance",
            ],
            "not a checkout method",
        ),
    ];
    for (args, says) in cases {
        let mut all = args.to_vec();
        all.extend(["--manifest", manifest]);
        let out = loadtest(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// A manifest whose supplier-main channel has a secret file (nothing listens at its URLs).
fn manifest_with_secret(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::write(
        dir.join("supplier.secret"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    write_manifest(
        dir,
        r#"{"merchants": {}, "admin_key": null,
            "gateway_url": "http://127.0.0.1:9", "sim_admin_url": "http://127.0.0.1:9",
            "channels": {"supplier-main": {"kind": "supplier", "priority": 1,
                "base_url": "http://127.0.0.1:9", "callback_url": "http://127.0.0.1:9/cb",
                "channel_keys": {"supplier_secret": "supplier.secret"}}}}"#,
    )
}

#[test]
fn the_baseline_proxy_runs_as_a_process_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest_with_secret(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["baseline-proxy", "--threads", "1", "--manifest"])
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the proxy");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("baseline-proxy listening on http://127.0.0.1:"),
        "{line}"
    );
    let addr = line
        .split_whitespace()
        .nth(3)
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();

    // A callback is acknowledged as the supplier protocol expects.
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .write_all(
            b"POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(r#"{"received":true}"#), "{answer}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn the_baseline_proxy_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest_with_secret(dir.path());
    let out = loadtest(&[
        "baseline-proxy",
        "--listen",
        "0.0.0.0:0",
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = loadtest(&[
        "baseline-proxy",
        "--channel",
        "alipay-main",
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
