//! Shared test support: a real `redis-server` per test on a random loopback port in a temp
//! dir, the gateway spawned in-process on port 0, and a small HTTP client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway::config::{self, Config};
use gateway::preauth::memory::MemoryStore;
use gateway::preauth::redis::RedisStore;
use gateway::preauth::BalanceStore;
use gateway::startup::Application;

pub use crate::postgres_server::PostgresServer;
pub use crate::redis_server::RedisServer;
pub use crate::sim_channels::{ChannelOptions, SimChannels};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::oneshot;

pub const ALPHA: &str = "sk_test_alpha";
pub const BETA: &str = "sk_test_beta";
pub const ADMIN: &str = "sk_test_admin";

/// The resolution loop looking often (tests that wait for it to query or close).
pub const FAST_RESOLUTION: &[(&str, &str)] = &[
    ("GATEWAY__RESOLUTION__INTERVAL_MS", "50"),
    ("GATEWAY__RESOLUTION__FIRST_CHECK_DELAY_MS", "100"),
    ("GATEWAY__RESOLUTION__BACKOFF_INITIAL_MS", "100"),
    ("GATEWAY__RESOLUTION__BACKOFF_MAX_MS", "200"),
];

/// Payments that may expire within seconds (`expires_in_seconds` ≥ 1, no hold grace), the
/// sweeper running often.
pub const QUICK_EXPIRY: &[(&str, &str)] = &[
    ("GATEWAY__PAYMENTS__MIN_EXPIRES_IN_SECONDS", "1"),
    ("GATEWAY__PREAUTH__HOLD_GRACE_SECONDS", "0"),
    ("GATEWAY__PREAUTH__SWEEP_INTERVAL_MS", "50"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
}

/// The sandbox configuration on port 0, with extra overrides.
pub fn test_config(overrides: &[(&str, &str)]) -> Config {
    let mut env = vec![(
        "GATEWAY__SERVER__LISTEN".to_owned(),
        "127.0.0.1:0".to_owned(),
    )];
    env.extend(
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    config::load(None, env).expect("test configuration")
}

pub async fn store_for(backend: Backend, redis: Option<&RedisServer>) -> Arc<dyn BalanceStore> {
    match backend {
        Backend::Memory => Arc::new(MemoryStore::new()),
        Backend::Redis => {
            let config = test_config(&[("GATEWAY__REDIS__URL", &redis.expect("redis").url())]);
            Arc::new(
                RedisStore::connect(&config.settings.redis)
                    .await
                    .expect("connect to test redis"),
            )
        }
    }
}

/// Which settlement store a test app runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// A SQLite file in the app's temp data dir.
    Sqlite,
    /// A PostgreSQL the harness starts.
    Postgres,
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The sandbox channels (channel-sim in-process) the app routes to.
    pub channels: SimChannels,
    pub redis: Option<RedisServer>,
    pub postgres: Option<PostgresServer>,
    pub data: tempfile::TempDir,
    client: Client<HttpConnector, Full<Bytes>>,
    shutdown: Option<oneshot::Sender<()>>,
}

pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, &[]).await
}

pub async fn spawn_app_with(backend: Backend, overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_on(backend, Store::Sqlite, overrides).await
}

/// The app on the chosen balance and settlement stores, with a fresh temp data dir and the
/// sandbox channels (quiet defaults).
pub async fn spawn_app_on(backend: Backend, store: Store, overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_full(backend, store, overrides, &ChannelOptions::default()).await
}

/// As [`spawn_app_on`], with the channels' options chosen.
pub async fn spawn_app_full(
    backend: Backend,
    store: Store,
    overrides: &[(&str, &str)],
    options: &ChannelOptions,
) -> TestApp {
    let channels = SimChannels::start(options).await;
    let redis = match backend {
        Backend::Redis => Some(RedisServer::start().await),
        Backend::Memory => None,
    };
    let postgres = match store {
        Store::Postgres => Some(PostgresServer::start().await),
        Store::Sqlite => None,
    };
    let data = tempfile::tempdir().expect("temp data dir");
    let data_dir = data.path().display().to_string();
    let mut all: Vec<(&str, &str)> = vec![("GATEWAY__DATA_DIR", &data_dir)];
    all.extend_from_slice(overrides);
    let url = redis.as_ref().map(RedisServer::url);
    if let Some(url) = url.as_deref() {
        all.push(("GATEWAY__REDIS__URL", url));
    }
    let pg_url = postgres.as_ref().map(PostgresServer::url);
    if let Some(url) = pg_url.as_deref() {
        all.push(("GATEWAY__STORE__URL", url));
    }
    let mut config = test_config(&all);
    // The test's own channels (from overrides) win over the sandbox's.
    for (id, settings) in &channels.settings {
        config
            .settings
            .channels
            .entry(id.clone())
            .or_insert_with(|| settings.clone());
    }
    let app = Application::build(config, gateway::startup::Mode::Sandbox)
        .await
        .expect("build the app");
    let addr = app.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    if std::env::var_os("TEST_LOG").is_some() {
        gateway::telemetry::init_tracing(&Default::default());
    }
    TestApp {
        addr,
        channels,
        redis,
        postgres,
        data,
        client: Client::builder(TokioExecutor::new()).build_http(),
        shutdown: Some(tx),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl TestApp {
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        idempotency: Option<&str>,
        body: Option<String>,
    ) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path))
            .header("content-type", "application/json");
        if let Some(key) = key {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        if let Some(idempotency) = idempotency {
            builder = builder.header("idempotency-key", idempotency);
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let response = self.client.request(request).await.expect("HTTP request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A POST with the given headers and raw body (callbacks: no API key, the channel's own
    /// content type).
    pub async fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}{}", self.addr, path));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(Bytes::from(body))).unwrap();
        let response = self.client.request(request).await.expect("HTTP request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Reply {
        self.request(Method::GET, path, Some(key), None, None).await
    }

    pub async fn post(&self, path: &str, key: &str, idempotency: &str, body: Value) -> Reply {
        self.request(
            Method::POST,
            path,
            Some(key),
            Some(idempotency),
            Some(body.to_string()),
        )
        .await
    }

    pub async fn put_account(&self, key: &str, id: &str, currency: &str, credit: &str) -> Reply {
        let body = serde_json::json!({"currency": currency, "credit_limit": credit});
        self.request(
            Method::PUT,
            &format!("/v1/accounts/{id}"),
            Some(key),
            None,
            Some(body.to_string()),
        )
        .await
    }

    pub async fn account(&self, key: &str, id: &str) -> Reply {
        self.get(&format!("/v1/accounts/{id}"), key).await
    }

    /// Credits `amount` to alpha's (or `merchant`'s) account through the admin API.
    pub async fn credit(&self, merchant: &str, account: &str, amount: &str) -> Reply {
        let body = serde_json::json!({
            "merchant_id": merchant, "direction": "credit", "amount": amount, "reason": "test funding"
        });
        let key = format!("fund-{account}-{amount}-{}", uuidish());
        self.post(
            &format!("/v1/accounts/{account}/adjustments"),
            ADMIN,
            &key,
            body,
        )
        .await
    }

    /// A fresh account of `merchant` with `balance` and `credit`.
    pub async fn funded_account(
        &self,
        key: &str,
        merchant: &str,
        id: &str,
        balance: &str,
        credit: &str,
    ) {
        let put = self.put_account(key, id, "CNY", credit).await;
        assert_eq!(put.status, 201, "{:?}", put.body);
        if balance != "0.00" {
            let credited = self.credit(merchant, id, balance).await;
            assert_eq!(credited.status, 201, "{:?}", credited.body);
        }
    }

    pub async fn pay(&self, key: &str, idempotency: &str, body: Value) -> Reply {
        self.post("/v1/payments", key, idempotency, body).await
    }

    /// Asserts the account's `balance`, `held` and `available`.
    pub async fn assert_account(
        &self,
        key: &str,
        id: &str,
        balance: &str,
        held: &str,
        available: &str,
    ) {
        let account = self.account(key, id).await;
        assert_eq!(account.status, 200, "{:?}", account.body);
        assert_eq!(
            account.body["balance"], balance,
            "balance of {id}: {:?}",
            account.body
        );
        assert_eq!(
            account.body["held"], held,
            "held of {id}: {:?}",
            account.body
        );
        assert_eq!(
            account.body["available"], available,
            "available of {id}: {:?}",
            account.body
        );
    }
}

/// A unique-enough suffix for keys within one test process.
pub fn uuidish() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn balance_payment(order: &str, account: &str, amount: &str) -> Value {
    serde_json::json!({
        "merchant_order_id": order, "amount": amount, "currency": "CNY",
        "method": "balance", "account_id": account
    })
}

pub fn supplier_payment(order: &str, account: &str, amount: &str) -> Value {
    serde_json::json!({
        "merchant_order_id": order, "amount": amount, "currency": "CNY",
        "method": "supplier", "account_id": account
    })
}

impl TestApp {
    /// A second connection to the app's settlement store, to check what is on disk.
    pub async fn settlement_store(
        &self,
    ) -> std::sync::Arc<dyn gateway::settlement::SettlementStore> {
        match &self.postgres {
            Some(pg) => std::sync::Arc::new(
                gateway::settlement::postgres::PostgresStore::connect(&pg.url(), 2, 2_000)
                    .await
                    .expect("connect to the test PostgreSQL"),
            ),
            None => std::sync::Arc::new(
                gateway::settlement::sqlite::SqliteStore::open(
                    &self.data.path().join("gateway.sqlite3"),
                )
                .expect("open the test SQLite store"),
            ),
        }
    }

    /// Polls `GET /v1/payments/{id}` (as alpha) until its status is `want` (bounded: 15 s);
    /// returns the payment.
    pub async fn wait_status(&self, id: &str, want: &str) -> Value {
        self.wait_payment(id, want, |p| p["status"] == want).await
    }

    /// Polls `GET /v1/payments/{id}` (as alpha) until `done` holds for it (bounded: 15 s);
    /// returns the payment. `what` names the wait in the panic. The status comes from the
    /// balance store at once, the attempts from the settlement store once committed: a test
    /// that reads both waits for both.
    pub async fn wait_payment(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..300 {
            let reply = self.get(&format!("/v1/payments/{id}"), ALPHA).await;
            if done(&reply.body) {
                return reply.body;
            }
            last = reply.body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("payment {id} never became {what}: {last}");
    }

    /// Polls `GET /readyz` until it answers `status` (bounded: 10 s).
    pub async fn wait_ready(&self, status: u16) {
        let mut last = 0;
        for _ in 0..200 {
            last = self
                .request(Method::GET, "/readyz", None, None, None)
                .await
                .status;
            if last == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("/readyz stayed {last}, wanted {status}");
    }
}
