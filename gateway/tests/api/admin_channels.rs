//! Channels in the configuration, built at start, and what `GET /v1/admin/channels` shows.

use std::io::Write;

use crate::helpers::*;

/// A supplier channel configured through environment overrides (as an operator would), with
/// its HMAC secret in a file.
fn supplier_channel(secret_file: &std::path::Path, base_url: &str) -> Vec<(String, String)> {
    let p = "GATEWAY__CHANNELS__SUPPLIER_MAIN__";
    [
        ("KIND", "supplier".to_owned()),
        ("BASE_URL", base_url.to_owned()),
        ("PRIORITY", "1".to_owned()),
        ("METHODS", "[\"supplier\"]".to_owned()),
        ("CURRENCIES", "[\"CNY\"]".to_owned()),
        ("MIN_AMOUNT", "0.01".to_owned()),
        ("MAX_AMOUNT", "50000.00".to_owned()),
        (
            "KEYS__SUPPLIER_SECRET__FILE",
            secret_file.display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{p}{k}"), v))
    .collect()
}

#[tokio::test]
async fn configured_channels_are_built_at_start_and_listed_for_the_admin() {
    let mut secret = tempfile::NamedTempFile::new().unwrap();
    write!(secret, "supplier-test-secret-0123456789").unwrap();
    let env = supplier_channel(secret.path(), "http://127.0.0.1:9");
    let overrides: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let app = spawn_app_with(Backend::Memory, &overrides).await;

    let listed = app.get("/v1/admin/channels", ADMIN).await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    let channels = listed.body["channels"].as_array().unwrap();
    // The sandbox's five channels and this test's own.
    assert_eq!(channels.len(), 6, "{channels:?}");
    let c = channels
        .iter()
        .find(|c| c["id"] == "supplier_main")
        .expect("the configured channel is listed");
    assert_eq!(c["id"], "supplier_main");
    assert_eq!(c["kind"], "supplier");
    assert_eq!(c["priority"], 1);
    assert_eq!(c["state"], "closed");
    assert_eq!(c["admits"], true);
    assert_eq!(c["in_flight"], 0);
    assert_eq!(app.get("/v1/admin/channels", ALPHA).await.status, 403);
    assert_eq!(
        app.request(hyper::Method::GET, "/v1/admin/channels", None, None, None)
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn a_channel_that_cannot_be_built_stops_the_start_and_a_bad_one_is_named() {
    // The key file does not exist: the start fails, naming the channel.
    let env = supplier_channel(
        std::path::Path::new("/nonexistent/secret"),
        "http://127.0.0.1:9",
    );
    let mut overrides: Vec<(String, String)> = env;
    let data = tempfile::tempdir().unwrap();
    overrides.push((
        "GATEWAY__DATA_DIR".into(),
        data.path().display().to_string(),
    ));
    let refs: Vec<(&str, &str)> = overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let err =
        gateway::startup::Application::build(test_config(&refs), gateway::startup::Mode::Sandbox)
            .await
            .err()
            .expect("refused");
    assert!(err.to_string().contains("supplier_main"), "{err}");

    // A channel with no base URL never gets past validation, which names it.
    let mut secret = tempfile::NamedTempFile::new().unwrap();
    write!(secret, "supplier-test-secret-0123456789").unwrap();
    let env = supplier_channel(secret.path(), "ftp://nowhere");
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut all = vec![(
        "GATEWAY__SERVER__LISTEN".to_owned(),
        "127.0.0.1:0".to_owned(),
    )];
    all.extend(refs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let err = gateway::config::load(None, all).unwrap_err();
    assert!(
        err.0.iter().any(|e| e.field == "channels.supplier_main"),
        "{err}"
    );
}
