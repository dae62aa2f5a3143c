//! The binary's refusals: a manifest pointing off this machine is refused with exit code 2,
//! before anything is sent.

use std::process::Command;

fn loadtest(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .output()
        .expect("run loadtest")
}

#[test]
fn a_non_loopback_gateway_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandbox.json");
    std::fs::write(
        &path,
        r#"{"merchants": {"alpha": {"api_key": "sk_test_alpha"}}, "admin_key": null,
            "gateway_url": "http://192.168.1.20:8080", "sim_admin_url": "http://127.0.0.1:9",
            "channels": {}}"#,
    )
    .unwrap();
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
    let out = loadtest(&["run", "--scenario", "failover"]);
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
}
