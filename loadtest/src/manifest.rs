//! The sandbox manifest `DIR/sandbox.json` (DESIGN.md §10): where the gateway and
//! channel-sim listen and the keys to talk to them, and the rule that every URL in it must
//! be on a loopback address — this tool sends load only to the machine it runs on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use hyper::Uri;
use serde::Deserialize;

use crate::Error;

/// A key or secret: `Debug` prints `***`, the value only through [`Secret::expose`].
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A merchant's credentials.
#[derive(Debug, Clone, Deserialize)]
pub struct MerchantCredentials {
    pub api_key: Secret,
    #[serde(default)]
    pub webhook_secret: Option<Secret>,
}

/// One channel of the manifest: only what the load generator reads (the key files and ids
/// are for tools that play the channel).
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestChannel {
    /// `alipay`, `wechatpay` or `supplier`.
    pub kind: String,
    pub priority: u32,
    pub base_url: String,
    pub callback_url: String,
}

/// `DIR/sandbox.json`, as `gateway serve --sandbox` writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub merchants: BTreeMap<String, MerchantCredentials>,
    /// `null` when the configuration does not accept the documented admin key.
    pub admin_key: Option<Secret>,
    pub gateway_url: String,
    pub sim_admin_url: String,
    #[serde(default)]
    pub channels: BTreeMap<String, ManifestChannel>,
}

impl Manifest {
    /// Reads and parses the manifest, then checks that every URL in it is on loopback.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read(path).map_err(|e| Error::Manifest {
            path: path.to_owned(),
            message: format!(
                "{e} (start the gateway with `gateway serve --sandbox --data-dir DIR`; it writes DIR/sandbox.json)"
            ),
        })?;
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| Error::Manifest {
            path: path.to_owned(),
            message: format!("not a sandbox manifest: {e}"),
        })?;
        manifest.check_loopback()?;
        Ok(manifest)
    }

    /// Refuses any URL in the manifest whose host is not a loopback address.
    pub fn check_loopback(&self) -> Result<(), Error> {
        check_loopback_url("gateway_url", &self.gateway_url)?;
        check_loopback_url("sim_admin_url", &self.sim_admin_url)?;
        for (id, channel) in &self.channels {
            check_loopback_url(&format!("channels.{id}.base_url"), &channel.base_url)?;
        }
        Ok(())
    }
}

/// Accepts `http://` URLs whose host is `localhost`, an IPv4 address in 127.0.0.0/8 or `::1`
/// (no name is resolved: a name other than `localhost` could point anywhere). `what` names
/// the field in the error.
pub fn check_loopback_url(what: &str, url: &str) -> Result<(), Error> {
    let refuse = || Error::NotLoopback {
        what: what.to_owned(),
        url: url.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| refuse())?;
    if uri.scheme_str() != Some("http") {
        return Err(refuse());
    }
    let host = uri.host().ok_or_else(refuse)?;
    if is_loopback_host(host) {
        Ok(())
    } else {
        Err(refuse())
    }
}

fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_accepted() {
        for url in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://127.1.2.3:1",
            "http://localhost:9000",
            "http://LOCALHOST",
            "http://[::1]:8080",
        ] {
            assert!(check_loopback_url("gateway_url", url).is_ok(), "{url}");
        }
    }

    #[test]
    fn other_hosts_are_refused_with_exit_code_2() {
        for url in [
            "http://10.0.0.1:8080",
            "http://192.168.1.10",
            "http://8.8.8.8",
            "http://0.0.0.0:8080",
            "http://[::]:80",
            "http://[2001:db8::1]:80",
            "http://example.com",
            "http://localhost.example.com",
            "http://127.0.0.1.nip.io",
            "https://127.0.0.1:8443",
            "127.0.0.1:8080",
            "",
        ] {
            let err = check_loopback_url("gateway_url", url).expect_err(url);
            assert!(matches!(err, Error::NotLoopback { .. }), "{url}: {err}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn a_manifest_with_a_remote_channel_is_refused() {
        let text = r#"{
            "merchants": {"alpha": {"api_key": "sk_test_alpha", "webhook_secret": "w"}},
            "admin_key": "sk_test_admin",
            "gateway_url": "http://127.0.0.1:1",
            "sim_admin_url": "http://127.0.0.1:2",
            "channels": {"supplier-main": {"kind": "supplier", "priority": 1,
                "base_url": "http://10.1.1.1:3", "callback_url": "http://127.0.0.1:1/v1/callbacks/supplier-main",
                "ids": {}, "gateway_keys": {}, "channel_keys": {}}}
        }"#;
        let manifest: Manifest = serde_json::from_str(text).unwrap();
        let err = manifest.check_loopback().unwrap_err();
        assert!(
            err.to_string().contains("channels.supplier-main.base_url"),
            "{err}"
        );
        // Secrets never show in Debug.
        let debug = format!("{manifest:?}");
        assert!(!debug.contains("sk_test_alpha"), "{debug}");
        assert!(!debug.contains("sk_test_admin"), "{debug}");
    }
}
