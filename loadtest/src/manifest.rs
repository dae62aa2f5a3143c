//! The sandbox manifest `DIR/sandbox.json` (DESIGN.md §10): where the gateway and
//! channel-sim listen and the keys to talk to them, and the rule that every URL in it must
//! be on a loopback address — this tool sends load only to the machine it runs on.
//!
//! The baseline proxy also reads one key file through it: a supplier channel's shared
//! secret (`channel_keys.supplier_secret`, as channel-sim looks it up).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

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

/// One channel of the manifest: only what the load generator reads (the ids are for tools
/// that play the channel).
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestChannel {
    /// `alipay`, `wechatpay` or `supplier`.
    pub kind: String,
    pub priority: u32,
    pub base_url: String,
    pub callback_url: String,
    /// Key files by name, absolute or relative to the manifest's directory.
    #[serde(default)]
    pub gateway_keys: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub channel_keys: BTreeMap<String, PathBuf>,
}

/// The most bytes of a secret file read (a supplier secret is 64 hex characters).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;
/// The names a supplier secret may have, first found wins (channel-sim's order).
const SUPPLIER_SECRET_NAMES: [&str; 2] = ["supplier_secret", "secret"];

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
    /// The manifest's directory, against which relative key paths are read (set by
    /// [`Manifest::load`]; `None`: the working directory).
    #[serde(skip)]
    pub dir: Option<PathBuf>,
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
        let mut manifest = manifest;
        manifest.dir = path.parent().map(Path::to_owned);
        manifest.check_loopback()?;
        Ok(manifest)
    }

    /// The channel `id`, which must be a supplier channel.
    pub fn supplier_channel(&self, id: &str) -> Result<&ManifestChannel, Error> {
        let channel = self
            .channels
            .get(id)
            .ok_or_else(|| Error::Settings(format!("no channel {id:?} in the manifest")))?;
        if channel.kind != "supplier" {
            return Err(Error::Settings(format!(
                "channel {id:?} is {}, not a supplier channel",
                channel.kind
            )));
        }
        Ok(channel)
    }

    /// The shared secret of supplier channel `id`, read from its key file
    /// (`channel_keys.supplier_secret`, `channel_keys.secret`, then the same names under
    /// `gateway_keys`), trailing whitespace removed. Errors name the file, never its content.
    pub fn supplier_secret(&self, id: &str) -> Result<Secret, Error> {
        let channel = self.supplier_channel(id)?;
        let path = [&channel.channel_keys, &channel.gateway_keys]
            .into_iter()
            .flat_map(|keys| SUPPLIER_SECRET_NAMES.iter().filter_map(|n| keys.get(*n)))
            .next()
            .ok_or_else(|| {
                Error::Settings(format!(
                    "channel {id:?} has no channel_keys.supplier_secret in the manifest"
                ))
            })?;
        let path = match &self.dir {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.clone(),
        };
        let fail = |message: String| Error::Manifest {
            path: path.clone(),
            message,
        };
        let file = std::fs::File::open(&path).map_err(|e| fail(e.to_string()))?;
        let mut text = String::new();
        file.take(MAX_SECRET_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| fail(format!("not a text secret: {e}")))?;
        if text.len() as u64 > MAX_SECRET_FILE_BYTES {
            return Err(fail(format!(
                "larger than {MAX_SECRET_FILE_BYTES} bytes: not a secret"
            )));
        }
        let secret = text.trim_end();
        if secret.len() < crate::signing::MIN_SECRET_BYTES {
            return Err(fail(format!(
                "a supplier secret is at least {} bytes",
                crate::signing::MIN_SECRET_BYTES
            )));
        }
        Ok(Secret::new(secret))
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

    #[test]
    fn a_supplier_secret_is_read_relative_to_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        std::fs::write(
            dir.path().join("keys/supplier.txt"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("keys/short.txt"), "short\n").unwrap();
        let path = dir.path().join("sandbox.json");
        std::fs::write(
            &path,
            r#"{
            "merchants": {}, "admin_key": null,
            "gateway_url": "http://127.0.0.1:1", "sim_admin_url": "http://127.0.0.1:2",
            "channels": {
              "supplier-main": {"kind": "supplier", "priority": 1, "base_url": "http://127.0.0.1:3",
                "callback_url": "http://127.0.0.1:1/v1/callbacks/supplier-main",
                "channel_keys": {"supplier_secret": "keys/supplier.txt"}},
              "supplier-short": {"kind": "supplier", "priority": 2, "base_url": "http://127.0.0.1:4",
                "callback_url": "http://127.0.0.1:1/v1/callbacks/supplier-short",
                "gateway_keys": {"secret": "keys/short.txt"}},
              "alipay-main": {"kind": "alipay", "priority": 1, "base_url": "http://127.0.0.1:5",
                "callback_url": "http://127.0.0.1:1/v1/callbacks/alipay-main"}
            }}"#,
        )
        .unwrap();
        let manifest = Manifest::load(&path).unwrap();
        let secret = manifest.supplier_secret("supplier-main").unwrap();
        assert_eq!(secret.expose(), "0123456789abcdef0123456789abcdef");
        let err = manifest.supplier_secret("supplier-short").unwrap_err();
        assert!(err.to_string().contains("at least 16 bytes"), "{err}");
        assert!(!err.to_string().contains("short\n"), "{err}");
        assert!(manifest.supplier_secret("alipay-main").is_err());
        assert!(manifest.supplier_secret("nope").is_err());
    }
}
