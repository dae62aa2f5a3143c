//! Shared test support: the fixture keys, a simulator with one channel of each kind, an
//! HTTP client, independent signature checks (aws-lc-rs directly), and a callback receiver.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use channel_sim::crypto::RsaSigner;
use channel_sim::{
    CallbackPolicy, ChannelIds, ChannelKind, ChannelSpec, Secret, Sim, SimConfig, SimHandle,
};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

pub const MERCHANT_PKCS8: &str =
    include_str!("../../../gateway/tests/fixtures/keys/test-only-merchant-rsa2048.pkcs8.pem");
pub const MERCHANT_SPKI: &str =
    include_str!("../../../gateway/tests/fixtures/keys/test-only-merchant-rsa2048.spki.pem");
pub const PLATFORM_PKCS1: &str =
    include_str!("../../../gateway/tests/fixtures/keys/test-only-platform-rsa2048.pkcs1.pem");
pub const PLATFORM_SPKI: &str =
    include_str!("../../../gateway/tests/fixtures/keys/test-only-platform-rsa2048.spki.pem");

pub const APP_ID: &str = "2021000000000001";
pub const MCHID: &str = "1900000109";
pub const APPID: &str = "wxd678efh567hg6787";
pub const MERCHANT_SERIAL: &str = "3775B6A45ACD588826D15E583A95F5DD0FFB9C4E";
pub const PLATFORM_SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";
pub const API_V3_KEY: &str = "TestOnlyApiV3Key0123456789abcdef";
pub const SUPPLIER_SECRET: &str = "whsec_test_only_supplier_0123456789";

/// The longest any test waits for an event.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn spec(id: &str, kind: ChannelKind) -> ChannelSpec {
    let mut spec = ChannelSpec::new(id, kind);
    match kind {
        ChannelKind::Alipay => {
            spec.ids = ChannelIds {
                app_id: Some(APP_ID.into()),
                ..ChannelIds::default()
            };
            spec.gateway_public_key = Some(MERCHANT_SPKI.into());
            spec.channel_private_key = Some(Secret::new(PLATFORM_PKCS1));
        }
        ChannelKind::Wechatpay => {
            spec.ids = ChannelIds {
                mchid: Some(MCHID.into()),
                appid: Some(APPID.into()),
                merchant_serial: Some(MERCHANT_SERIAL.into()),
                platform_serial: Some(PLATFORM_SERIAL.into()),
                ..ChannelIds::default()
            };
            spec.gateway_public_key = Some(MERCHANT_SPKI.into());
            spec.channel_private_key = Some(Secret::new(PLATFORM_PKCS1));
            spec.apiv3_key = Some(Secret::new(API_V3_KEY));
        }
        ChannelKind::Supplier => spec.supplier_secret = Some(Secret::new(SUPPLIER_SECRET)),
    }
    spec
}

/// A simulator with `alipay`, `wechatpay` and `supplier`, fast callback retries.
pub async fn start_sim() -> SimHandle {
    start_with(vec![
        spec("alipay", ChannelKind::Alipay),
        spec("wechatpay", ChannelKind::Wechatpay),
        spec("supplier", ChannelKind::Supplier),
    ])
    .await
}

pub async fn start_with(channels: Vec<ChannelSpec>) -> SimHandle {
    let mut config = SimConfig::new(channels);
    config.callbacks = CallbackPolicy {
        max_attempts: 4,
        initial_backoff_ms: 20,
        max_backoff_ms: 100,
        attempt_timeout_ms: 2_000,
        trade_finished_delay_ms: Some(50),
    };
    Sim::start(config).await.expect("the simulator starts")
}

pub fn now() -> u64 {
    channel_sim::clock::now_unix_seconds()
}

pub fn merchant_signer() -> RsaSigner {
    RsaSigner::from_pem(MERCHANT_PKCS8).unwrap()
}

/// RSA-SHA256 verification with aws-lc-rs directly, the key from its SPKI PEM.
pub fn rsa_verify(spki_pem: &str, message: &[u8], signature_b64: &str) -> bool {
    let body: String = spki_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(body).unwrap();
    let Ok(signature) = STANDARD.decode(signature_b64) else {
        return false;
    };
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
        .verify(message, &signature)
        .is_ok()
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

pub type HttpError = hyper_util::client::legacy::Error;

/// One request on a fresh connection (so an outage is seen at once).
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> Result<Reply, HttpError> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let mut request = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = client
        .request(request.body(Full::new(body.into())).unwrap())
        .await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    })
}

pub async fn admin_pay(sim: &SimHandle, channel_order_id: &str) -> Reply {
    send(
        "POST",
        &format!("{}/orders/{channel_order_id}/pay", sim.admin_url()),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap()
}

pub async fn admin_set_faults(sim: &SimHandle, channel: &str, faults: serde_json::Value) {
    let reply = send(
        "PUT",
        &format!("{}/channels/{channel}/faults", sim.admin_url()),
        &[("content-type", "application/json".into())],
        faults.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// A callback request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: http::HeaderMap,
    pub body: String,
}

/// A small axum server standing in for the gateway's callback endpoint: answers from a
/// script, then with `default`.
pub struct Receiver {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    notify: Arc<Notify>,
}

impl Receiver {
    pub async fn start(script: Vec<(u16, &'static str)>, default: (u16, &'static str)) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let (r, n) = (Arc::clone(&received), Arc::clone(&notify));
        let app = axum::Router::new().fallback(move |headers: http::HeaderMap, body: Bytes| {
            let (r, n, script) = (Arc::clone(&r), Arc::clone(&n), Arc::clone(&script));
            async move {
                r.lock().unwrap().push(Received {
                    headers,
                    body: String::from_utf8(body.to_vec()).unwrap(),
                });
                n.notify_waiters();
                let (status, body) = script.lock().unwrap().pop_front().unwrap_or(default);
                (http::StatusCode::from_u16(status).unwrap(), body)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/callback", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            received,
            notify,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (at most [`WAIT`]) until `count` callbacks arrived.
    pub async fn wait_for(&self, count: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.notify.notified();
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "only {} of {count} callbacks arrived",
                    self.received().len()
                );
            }
        }
    }
}

/// Polls `check` every 10 ms, at most [`WAIT`]; for state the simulator changes
/// asynchronously (records of callback attempts).
pub async fn eventually<T>(mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
