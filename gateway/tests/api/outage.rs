//! Redis down: fail closed (503, never an authorization), `/readyz` not ready; Redis back:
//! the same gateway recovers without a restart.

use std::time::Duration;

use hyper::Method;

use crate::helpers::*;

#[tokio::test]
async fn redis_down_fails_closed_and_recovers_without_restart() {
    let mut app = spawn_app_with(
        Backend::Redis,
        &[
            ("GATEWAY__REDIS__COMMAND_TIMEOUT_MS", "300"),
            ("GATEWAY__REDIS__CONNECT_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let paid = app
        .pay(ALPHA, "k1", balance_payment("o1", "acc", "10.00"))
        .await;
    assert_eq!(paid.status, 201);

    app.redis.as_mut().unwrap().stop();
    let refused = app
        .pay(ALPHA, "k2", balance_payment("o2", "acc", "10.00"))
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (503, "unavailable"),
        "{:?}",
        refused.body
    );
    assert_eq!(refused.headers.get("retry-after").unwrap(), "1");
    assert_eq!(app.account(ALPHA, "acc").await.status, 503);
    let ready = app.request(Method::GET, "/readyz", None, None, None).await;
    assert_eq!(
        (ready.status, ready.body["status"].as_str()),
        (503, Some("not_ready"))
    );
    assert_eq!(
        app.request(Method::GET, "/healthz", None, None, None)
            .await
            .status,
        200
    );

    app.redis.as_mut().unwrap().restart().await;
    let mut ready = 0;
    for _ in 0..100 {
        ready = app
            .request(Method::GET, "/readyz", None, None, None)
            .await
            .status;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 200, "the gateway reconnects by itself");
    // The refused request moved nothing; its key (503 is never recorded) works now.
    app.assert_account(ALPHA, "acc", "90.00", "0.00", "90.00")
        .await;
    let retried = app
        .pay(ALPHA, "k2", balance_payment("o2", "acc", "10.00"))
        .await;
    assert_eq!(retried.status, 201, "{:?}", retried.body);
    app.assert_account(ALPHA, "acc", "80.00", "0.00", "80.00")
        .await;
}

#[tokio::test]
async fn a_redis_that_may_evict_keys_is_refused_at_start() {
    let server = RedisServer::start().await;
    let mut conn = server.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut conn)
        .await
        .unwrap();
    let config = test_config(&[("GATEWAY__REDIS__URL", &server.url())]);
    let err = gateway::startup::Application::build(config, gateway::startup::Mode::Sandbox)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("noeviction"), "{err}");
}

#[tokio::test]
async fn production_mode_refuses_an_unmigrated_settlement_store() {
    let server = RedisServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().display().to_string();
    let config = test_config(&[
        ("GATEWAY__REDIS__URL", &server.url()),
        ("GATEWAY__DATA_DIR", &dir),
    ]);
    let err = gateway::startup::Application::build(config, gateway::startup::Mode::Production)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("gateway migrate"), "{err}");
}

#[tokio::test]
async fn production_mode_refuses_the_in_process_store() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().display().to_string();
    let config = test_config(&[("GATEWAY__DATA_DIR", &dir)]);
    let err = gateway::startup::Application::build(config, gateway::startup::Mode::Production)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("redis.url"), "{err}");
}
