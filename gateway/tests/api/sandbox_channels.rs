//! `gateway serve --sandbox` and its channels (DESIGN.md §10), with the real binary: keys made
//! on the first start and kept, every field of the manifest, the in-process simulator, and the
//! external one (`GATEWAY__SANDBOX__EXTERNAL_SIM=true`) served from the manifest as
//! `channel-sim serve --manifest` serves it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::channels::keys::{RsaPrivateKey, RsaPublicKey};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::Value;

use crate::binary::{Gateway, BIN};

const CHANNELS: [(&str, &str, u64); 5] = [
    ("alipay-main", "alipay", 1),
    ("alipay-backup", "alipay", 2),
    ("wechatpay-main", "wechatpay", 1),
    ("supplier-main", "supplier", 1),
    ("supplier-backup", "supplier", 2),
];

#[tokio::test]
async fn the_first_start_makes_keys_and_the_manifest_and_a_restart_keeps_the_keys() {
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(data.path(), None);
    let dir = data.path().canonicalize().unwrap();
    let manifest_path = dir.join("sandbox.json");
    let manifest = read_json(&manifest_path);
    check_manifest(&manifest, &gw.addr);

    // The banner names the manifest, the simulator and every channel's URL.
    assert!(
        gw.banner.contains(&manifest_path.display().to_string()),
        "{}",
        gw.banner
    );
    let sim_admin = manifest["sim_admin_url"].as_str().unwrap().to_owned();
    assert!(gw.banner.contains(&sim_admin), "{}", gw.banner);
    for (id, _, _) in CHANNELS {
        let base_url = manifest["channels"][id]["base_url"].as_str().unwrap();
        assert!(gw.banner.contains(base_url), "{id}: {}", gw.banner);
    }

    // Everything the manifest points at answers.
    let gateway_url = manifest["gateway_url"].as_str().unwrap();
    assert_eq!(http("GET", &format!("{gateway_url}/healthz")).await.0, 200);
    let (status, listed) = http("GET", &format!("{sim_admin}/channels")).await;
    assert_eq!(status, 200, "{listed}");
    let simulated: BTreeSet<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(simulated, CHANNELS.iter().map(|c| c.0).collect());
    let (status, body) = http("POST", &format!("{sim_admin}/orders/no_such_order/pay")).await;
    assert_eq!(status, 404, "{body}");
    // The gateway built the five channels.
    let (status, body) = gw
        .call(
            "GET",
            "/v1/admin/channels",
            "sk_test_admin",
            None,
            Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let configured: BTreeMap<&str, (&str, u64)> = body["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap(),
                (c["kind"].as_str().unwrap(), c["priority"].as_u64().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        configured,
        CHANNELS.iter().map(|(id, k, p)| (*id, (*k, *p))).collect()
    );

    // A restart in the same directory reuses every key as it is.
    let keys = files_under(&dir.join("keys"));
    // Four PEM files per RSA channel, the APIv3 key, a secret per supplier.
    assert_eq!(keys.len(), 3 * 4 + 1 + 2, "{:?}", keys.keys());
    let status = gw.terminate().await;
    assert!(status.success(), "{status:?}");
    let gw = Gateway::start(data.path(), None);
    assert_eq!(files_under(&dir.join("keys")), keys);
    let again = read_json(&manifest_path);
    check_manifest(&again, &gw.addr);
    for (id, _, _) in CHANNELS {
        let (before, after) = (&manifest["channels"][id], &again["channels"][id]);
        assert_eq!(before["ids"], after["ids"], "{id}");
        assert_eq!(before["gateway_keys"], after["gateway_keys"], "{id}");
        assert_eq!(before["channel_keys"], after["channel_keys"], "{id}");
    }
    let status = gw.terminate().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn with_an_external_simulator_the_manifest_is_what_channel_sim_serves() {
    let data = tempfile::tempdir().unwrap();
    let gw = start_with_env(data.path(), &[("GATEWAY__SANDBOX__EXTERNAL_SIM", "true")]);
    let manifest_path = data.path().canonicalize().unwrap().join("sandbox.json");
    let manifest = read_json(&manifest_path);
    check_manifest(&manifest, &gw.addr);
    assert!(
        gw.banner.contains("channel-sim serve --manifest"),
        "{}",
        gw.banner
    );

    // Nothing serves the channels yet.
    let sim_admin = manifest["sim_admin_url"].as_str().unwrap();
    for (id, _, _) in CHANNELS {
        let base_url = manifest["channels"][id]["base_url"].as_str().unwrap();
        assert!(refuses(base_url).await, "{id} at {base_url}");
    }
    assert!(refuses(sim_admin).await);

    // What `channel-sim serve --manifest` does: every channel on its base URL's port.
    let config = channel_sim::manifest::load(&manifest_path).unwrap();
    let sim = channel_sim::Sim::start(config).await.unwrap();
    assert_eq!(sim.admin_url(), sim_admin);
    for (id, _, _) in CHANNELS {
        assert_eq!(
            sim.channel_url(id),
            manifest["channels"][id]["base_url"].as_str()
        );
    }
    let (status, listed) = http("GET", &format!("{sim_admin}/channels")).await;
    assert_eq!(
        (status, listed.as_array().map(Vec::len)),
        (200, Some(5)),
        "{listed}"
    );

    // A gateway restart keeps the ports, so the running simulator stays valid.
    let status = gw.terminate().await;
    assert!(status.success(), "{status:?}");
    let gw = start_with_env(data.path(), &[("GATEWAY__SANDBOX__EXTERNAL_SIM", "true")]);
    let again = read_json(&manifest_path);
    check_manifest(&again, &gw.addr);
    assert_eq!(again["sim_admin_url"], manifest["sim_admin_url"]);
    for (id, _, _) in CHANNELS {
        assert_eq!(
            again["channels"][id]["base_url"],
            manifest["channels"][id]["base_url"]
        );
    }
    let status = gw.terminate().await;
    assert!(status.success(), "{status:?}");
    sim.shutdown().await;
}

// --- Helpers ---------------------------------------------------------------------------------

/// Checks every field of the manifest's schema (DESIGN.md §10) for a gateway on `addr`.
fn check_manifest(manifest: &Value, addr: &str) {
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object()
            .unwrap_or_else(|| panic!("an object: {v}"))
            .keys()
            .cloned()
            .collect()
    };
    let set =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|s| s.to_string()).collect() };
    assert_eq!(
        keys(manifest),
        set(&[
            "merchants",
            "admin_key",
            "gateway_url",
            "sim_admin_url",
            "channels"
        ])
    );
    assert_eq!(
        manifest["merchants"],
        serde_json::json!({
            "alpha": {"api_key": "sk_test_alpha", "webhook_secret": "whsec_test_alpha"},
            "beta": {"api_key": "sk_test_beta", "webhook_secret": "whsec_test_beta"},
        })
    );
    assert_eq!(manifest["admin_key"], "sk_test_admin");
    let gateway_url = format!("http://{addr}");
    assert_eq!(manifest["gateway_url"], gateway_url.as_str());
    assert!(manifest["sim_admin_url"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    let channels = &manifest["channels"];
    assert_eq!(keys(channels), set(&CHANNELS.map(|c| c.0)));
    for (id, kind, priority) in CHANNELS {
        let c = &channels[id];
        assert_eq!(
            keys(c),
            set(&[
                "kind",
                "priority",
                "base_url",
                "callback_url",
                "ids",
                "gateway_keys",
                "channel_keys"
            ]),
            "{id}"
        );
        assert_eq!(
            (c["kind"].as_str(), c["priority"].as_u64()),
            (Some(kind), Some(priority))
        );
        assert!(c["base_url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"));
        assert_eq!(
            c["callback_url"],
            format!("{gateway_url}/v1/callbacks/{id}").as_str()
        );
        let (ids, gateway_keys, channel_keys): (&[&str], &[&str], &[&str]) = match kind {
            "alipay" => (
                &["app_id"],
                &["app_private_key", "app_public_key"],
                &["alipay_private_key", "alipay_public_key"],
            ),
            "wechatpay" => (
                &["appid", "mchid", "merchant_serial", "platform_serial"],
                &["merchant_private_key", "merchant_public_key"],
                &["apiv3_key", "platform_private_key", "platform_public_key"],
            ),
            _ => (&[], &[], &["supplier_secret"]),
        };
        assert_eq!(keys(&c["ids"]), set(ids), "{id}");
        if kind == "wechatpay" {
            let serial = c["ids"]["platform_serial"].as_str().unwrap();
            assert!(
                serial.len() == 40 && serial.bytes().all(|b| b.is_ascii_hexdigit()),
                "{serial}"
            );
        }
        assert_eq!(keys(&c["gateway_keys"]), set(gateway_keys), "{id}");
        assert_eq!(keys(&c["channel_keys"]), set(channel_keys), "{id}");
        for (name, path) in c["gateway_keys"]
            .as_object()
            .unwrap()
            .iter()
            .chain(c["channel_keys"].as_object().unwrap())
        {
            let path = PathBuf::from(path.as_str().unwrap());
            assert!(path.is_absolute(), "{id}.{name}: {}", path.display());
            check_key_file(name, &path);
        }
    }
}

/// A key file parses as what its name says.
fn check_key_file(name: &str, path: &Path) {
    if name.ends_with("_private_key") {
        RsaPrivateKey::from_pem_file(path).unwrap_or_else(|e| panic!("{name}: {e}"));
    } else if name.ends_with("_public_key") {
        RsaPublicKey::from_pem_file(path).unwrap_or_else(|e| panic!("{name}: {e}"));
    } else {
        let text = std::fs::read_to_string(path).unwrap();
        match name {
            "apiv3_key" => assert_eq!(text.trim().len(), 32),
            _ => assert!(text.trim().len() >= 32, "{name}"),
        }
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{} after the start: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    files
}

/// A request without a body; the answer's status and JSON body (`Null` when not JSON).
async fn http(method: &str, url: &str) -> (u16, Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = hyper::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .unwrap_or_else(|_| panic!("{method} {url} timed out"))
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Whether nothing listens at `url`'s address.
async fn refuses(url: &str) -> bool {
    let addr = channel_sim::manifest::listen_addr(url).unwrap();
    tokio::net::TcpStream::connect(addr).await.is_err()
}

/// [`Gateway::start`] with environment variables of its own.
fn start_with_env(data: &Path, env: &[(&str, &str)]) -> Gateway {
    let mut command = Command::new(BIN);
    command
        .args([
            "serve",
            "--sandbox",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data)
        .env_remove("GATEWAY__STORE__URL")
        .env_remove("GATEWAY__REDIS__URL")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    // Drain both pipes for the process's whole life (a full pipe would block it).
    let output = Arc::new(Mutex::new(String::new()));
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (out, err) = (output.clone(), output.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            out.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = lines_tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            err.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
    let mut gateway = Gateway {
        child,
        addr: String::new(),
        banner: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        gateway.banner.push_str(&format!("{line}\n"));
        if let Some(addr) = line.trim().strip_prefix("gateway listening on http://") {
            gateway.addr = addr.to_owned();
            return gateway;
        }
    }
    let _ = gateway.child.kill();
    let _ = gateway.child.wait();
    std::thread::sleep(Duration::from_millis(100)); // let the drain threads finish
    panic!(
        "the gateway did not start; it printed:\n{}",
        output.lock().unwrap()
    );
}

/// The simulator keeps its orders across a restart of the sandbox, as a real channel does: a
/// supplier charge made before the restart is paid at the channel afterwards, its callback
/// reaches the restarted gateway, and the payment succeeds (its hold captured).
#[tokio::test]
async fn a_channel_order_made_before_a_restart_is_paid_after_it() {
    let data = tempfile::tempdir().unwrap();
    // The same gateway address after the restart: the order's notify URL names it.
    let listen = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let manual = [("GATEWAY__SANDBOX__AUTO_PAY", "false")];
    let gw = Gateway::start_with(data.path(), None, &listen, &manual);
    let (status, body) = gw
        .call(
            "PUT",
            "/v1/accounts/acc",
            "sk_test_alpha",
            None,
            serde_json::json!({"currency": "CNY"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = gw
        .call(
            "POST",
            "/v1/accounts/acc/adjustments",
            "sk_test_admin",
            Some("fund"),
            serde_json::json!({"merchant_id": "alpha", "direction": "credit", "amount": "50.00", "reason": "test"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, payment) = gw
        .call(
            "POST",
            "/v1/payments",
            "sk_test_alpha",
            Some("charge"),
            serde_json::json!({
                "merchant_order_id": "o-restart", "amount": "20.00", "currency": "CNY",
                "method": "supplier", "account_id": "acc"
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, payment["status"].as_str()),
        (201, Some("pending")),
        "{payment}"
    );
    let id = payment["id"].as_str().unwrap().to_owned();
    let order = payment["attempts"][0]["channel_order_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let status = gw.terminate().await;
    assert!(status.success(), "{status:?}");
    assert!(
        data.path().join("channel-sim-orders.json").exists(),
        "the simulator kept its orders"
    );

    let gw = Gateway::start_with(data.path(), None, &listen, &manual);
    let manifest = read_json(&data.path().join("sandbox.json"));
    let sim_admin = manifest["sim_admin_url"].as_str().unwrap();
    let (status, paid) = http("POST", &format!("{sim_admin}/orders/{order}/pay")).await;
    assert_eq!(status, 200, "the channel still knows {order}: {paid}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let (_, view) = gw
            .call(
                "GET",
                &format!("/v1/payments/{id}"),
                "sk_test_alpha",
                None,
                Value::Null,
            )
            .await
            .unwrap();
        if view["status"] == "succeeded" || Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view["status"], "succeeded", "{view}");
    let (_, account) = gw
        .call(
            "GET",
            "/v1/accounts/acc",
            "sk_test_alpha",
            None,
            Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(
        (&account["balance"], &account["held"]),
        (&serde_json::json!("30.00"), &serde_json::json!("0.00")),
        "{account}"
    );
    let status = gw.terminate().await;
    assert!(status.success(), "{status:?}");
}
