//! The sandbox manifest (DESIGN.md §10, `DIR/sandbox.json`) → [`SimConfig`], for
//! `channel-sim serve --manifest FILE`: each channel listens on the port of its `base_url`,
//! the admin API on `sim_admin_url`'s.
//!
//! Key files are read from `gateway_keys` and `channel_keys` (paths relative to the
//! manifest's directory), by these names — the first present wins:
//!
//! | role | kind | names |
//! |---|---|---|
//! | verifies the gateway's requests | alipay | `gateway_keys.app_public_key`, `gateway_keys.app_private_key` (public half used), `gateway_keys.public_key`, `gateway_keys.private_key` |
//! | verifies the gateway's requests | wechatpay | `gateway_keys.merchant_public_key`, `gateway_keys.merchant_private_key`, `gateway_keys.public_key`, `gateway_keys.private_key` |
//! | the channel's signing key | alipay | `channel_keys.alipay_private_key`, `channel_keys.private_key` |
//! | the channel's signing key | wechatpay | `channel_keys.platform_private_key`, `channel_keys.private_key` |
//! | APIv3 key (32 bytes) | wechatpay | `channel_keys.apiv3_key`, `channel_keys.api_v3_key` |
//! | shared secret | supplier | `channel_keys.supplier_secret`, `channel_keys.secret`, then the same in `gateway_keys` |
//!
//! Secret files (APIv3 key, supplier secret) are read as text with trailing whitespace
//! removed. Everything else in the manifest (merchants, admin key, priorities) is the
//! gateway's and ignored here.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ChannelIds, ChannelKind, ChannelSpec, Secret, SimConfig};
use crate::SimError;

/// The largest manifest or key file read.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

#[derive(Debug, Deserialize)]
struct Manifest {
    sim_admin_url: String,
    channels: BTreeMap<String, ManifestChannel>,
}

#[derive(Debug, Deserialize)]
struct ManifestChannel {
    kind: ChannelKind,
    base_url: String,
    #[serde(default)]
    ids: ChannelIds,
    #[serde(default)]
    gateway_keys: BTreeMap<String, PathBuf>,
    #[serde(default)]
    channel_keys: BTreeMap<String, PathBuf>,
}

fn error(message: impl Into<String>) -> SimError {
    SimError::Manifest(message.into())
}

fn read_limited(path: &Path) -> Result<String, SimError> {
    let len = std::fs::metadata(path)
        .map_err(|e| error(format!("cannot read {}: {e}", path.display())))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(error(format!(
            "{} is larger than {MAX_FILE_BYTES} bytes",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| error(format!("cannot read {}: {e}", path.display())))
}

/// Reads and converts a manifest file.
pub fn load(path: &Path) -> Result<SimConfig, SimError> {
    let text = read_limited(path)?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    parse(&text, dir)
}

/// `http://HOST:PORT[/…]` → the socket address to listen on (an IP, or `localhost`).
pub fn listen_addr(url: &str) -> Result<SocketAddr, SimError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| error(format!("`{url}` is not a URL")))?;
    if uri.scheme_str() != Some("http") {
        return Err(error(format!(
            "`{url}`: the simulator serves plain http only"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| error(format!("`{url}` has no host")))?;
    let port = uri
        .port_u16()
        .ok_or_else(|| error(format!("`{url}` has no port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if host == "localhost" {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| error(format!("`{url}`: cannot resolve `{host}`")))
}

/// Converts manifest text; key paths are relative to `dir`.
pub fn parse(text: &str, dir: &Path) -> Result<SimConfig, SimError> {
    let manifest: Manifest =
        serde_json::from_str(text).map_err(|e| error(format!("not a sandbox manifest: {e}")))?;
    let mut channels = Vec::new();
    for (id, channel) in &manifest.channels {
        channels.push(channel_spec(id, channel, dir)?);
    }
    let mut config = SimConfig::new(channels);
    config.admin_listen = Some(listen_addr(&manifest.sim_admin_url)?);
    Ok(config)
}

fn channel_spec(id: &str, channel: &ManifestChannel, dir: &Path) -> Result<ChannelSpec, SimError> {
    let mut spec = ChannelSpec::new(id, channel.kind);
    spec.listen =
        Some(listen_addr(&channel.base_url).map_err(|e| error(format!("channel `{id}`: {e}")))?);
    spec.ids = channel.ids.clone();
    let read =
        |keys: &BTreeMap<String, PathBuf>, names: &[&str]| -> Result<Option<String>, SimError> {
            for name in names {
                if let Some(path) = keys.get(*name) {
                    let path = dir.join(path);
                    return read_limited(&path)
                        .map(Some)
                        .map_err(|e| error(format!("channel `{id}`, key `{name}`: {e}")));
                }
            }
            Ok(None)
        };
    let require = |value: Option<String>, what: &str, names: &[&str]| {
        value.ok_or_else(|| {
            error(format!(
                "channel `{id}` ({}) needs {what}: one of {}",
                channel.kind.as_str(),
                names.join(", ")
            ))
        })
    };
    match channel.kind {
        ChannelKind::Alipay | ChannelKind::Wechatpay => {
            let (public_names, private_names): (&[&str], &[&str]) =
                if channel.kind == ChannelKind::Alipay {
                    (
                        &[
                            "app_public_key",
                            "app_private_key",
                            "public_key",
                            "private_key",
                        ],
                        &["alipay_private_key", "private_key"],
                    )
                } else {
                    (
                        &[
                            "merchant_public_key",
                            "merchant_private_key",
                            "public_key",
                            "private_key",
                        ],
                        &["platform_private_key", "private_key"],
                    )
                };
            spec.gateway_public_key = Some(require(
                read(&channel.gateway_keys, public_names)?,
                "gateway_keys",
                public_names,
            )?);
            spec.channel_private_key = Some(Secret::new(require(
                read(&channel.channel_keys, private_names)?,
                "channel_keys",
                private_names,
            )?));
            if channel.kind == ChannelKind::Wechatpay {
                let names = ["apiv3_key", "api_v3_key"];
                let key = require(read(&channel.channel_keys, &names)?, "channel_keys", &names)?;
                spec.apiv3_key = Some(Secret::new(key.trim_end()));
            }
        }
        ChannelKind::Supplier => {
            let names = ["supplier_secret", "secret"];
            let secret = match read(&channel.channel_keys, &names)? {
                Some(secret) => Some(secret),
                None => read(&channel.gateway_keys, &names)?,
            };
            let secret = require(secret, "channel_keys", &names)?;
            spec.supplier_secret = Some(Secret::new(secret.trim_end()));
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MERCHANT_PKCS8: &str =
        include_str!("../../gateway/tests/fixtures/keys/test-only-merchant-rsa2048.pkcs8.pem");
    const MERCHANT_SPKI: &str =
        include_str!("../../gateway/tests/fixtures/keys/test-only-merchant-rsa2048.spki.pem");
    const PLATFORM_PKCS1: &str =
        include_str!("../../gateway/tests/fixtures/keys/test-only-platform-rsa2048.pkcs1.pem");

    fn write_keys(dir: &Path) {
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        std::fs::write(dir.join("keys/app.pub.pem"), MERCHANT_SPKI).unwrap();
        std::fs::write(dir.join("keys/merchant.pem"), MERCHANT_PKCS8).unwrap();
        std::fs::write(dir.join("keys/platform.pem"), PLATFORM_PKCS1).unwrap();
        std::fs::write(
            dir.join("keys/apiv3.txt"),
            "TestOnlyApiV3Key0123456789abcdef\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("keys/supplier.txt"),
            "whsec_test_only_supplier_0123456789\n",
        )
        .unwrap();
    }

    const MANIFEST: &str = r#"{
      "merchants": {"alpha": {"api_key": "sk_test_alpha", "webhook_secret": "whsec_test_alpha"}},
      "admin_key": "sk_test_admin",
      "gateway_url": "http://127.0.0.1:8080",
      "sim_admin_url": "http://127.0.0.1:9100",
      "channels": {
        "alipay-main": {"kind": "alipay", "priority": 1, "base_url": "http://127.0.0.1:9101",
          "callback_url": "http://127.0.0.1:8080/v1/callbacks/alipay-main",
          "ids": {"app_id": "2021000000000001"},
          "gateway_keys": {"app_private_key": "keys/merchant.pem"},
          "channel_keys": {"alipay_private_key": "keys/platform.pem"}},
        "wechatpay-main": {"kind": "wechatpay", "priority": 1, "base_url": "http://localhost:9102/",
          "ids": {"mchid": "1900000109", "appid": "wxd678efh567hg6787",
                  "merchant_serial": "AA", "platform_serial": "BB"},
          "gateway_keys": {"merchant_public_key": "keys/app.pub.pem"},
          "channel_keys": {"platform_private_key": "keys/platform.pem", "apiv3_key": "keys/apiv3.txt"}},
        "supplier-main": {"kind": "supplier", "priority": 1, "base_url": "http://127.0.0.1:9103",
          "gateway_keys": {"supplier_secret": "keys/supplier.txt"}, "channel_keys": {}}
      }
    }"#;

    #[test]
    fn reads_the_sandbox_manifest() {
        let dir = tempfile::tempdir().unwrap();
        write_keys(dir.path());
        let path = dir.path().join("sandbox.json");
        std::fs::write(&path, MANIFEST).unwrap();
        let config = load(&path).unwrap();
        assert_eq!(config.admin_listen, Some("127.0.0.1:9100".parse().unwrap()));
        let ids: Vec<&str> = config.channels.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["alipay-main", "supplier-main", "wechatpay-main"]);
        let alipay = &config.channels[0];
        assert_eq!(alipay.kind, ChannelKind::Alipay);
        assert_eq!(alipay.listen, Some("127.0.0.1:9101".parse().unwrap()));
        assert_eq!(alipay.ids.app_id.as_deref(), Some("2021000000000001"));
        assert!(alipay
            .gateway_public_key
            .as_deref()
            .unwrap()
            .contains("PRIVATE KEY"));
        let supplier = &config.channels[1];
        assert_eq!(
            supplier.supplier_secret.as_ref().unwrap().expose(),
            "whsec_test_only_supplier_0123456789"
        );
        let wechat = &config.channels[2];
        assert_eq!(wechat.listen, Some("127.0.0.1:9102".parse().unwrap()));
        assert_eq!(
            wechat.apiv3_key.as_ref().unwrap().expose(),
            "TestOnlyApiV3Key0123456789abcdef"
        );
        // Secrets never show in Debug output.
        assert!(!format!("{config:?}").contains("whsec_test_only"));
    }

    #[test]
    fn refuses_bad_manifests_clearly() {
        let dir = tempfile::tempdir().unwrap();
        write_keys(dir.path());
        let parse_err = |text: &str| parse(text, dir.path()).unwrap_err().to_string();
        assert!(parse_err("{}").contains("not a sandbox manifest"));
        let no_key = MANIFEST.replace(r#""alipay_private_key": "keys/platform.pem""#, "");
        let message = parse_err(&no_key);
        assert!(
            message.contains("alipay-main") && message.contains("alipay_private_key"),
            "{message}"
        );
        let missing_file = MANIFEST.replace("keys/apiv3.txt", "keys/nope.txt");
        assert!(parse_err(&missing_file).contains("nope.txt"));
        let https = MANIFEST.replace("http://127.0.0.1:9103", "https://127.0.0.1:9103");
        assert!(parse_err(&https).contains("plain http"));
        let no_port = MANIFEST.replace("http://127.0.0.1:9103", "http://127.0.0.1");
        assert!(parse_err(&no_port).contains("no port"));
        let bad_kind = MANIFEST.replace(r#""kind": "supplier""#, r#""kind": "paypal""#);
        assert!(parse_err(&bad_kind).contains("paypal"));
    }
}
