//! The manifest, `DIR/sandbox.json` (DESIGN.md §10): what it holds, how it is written, and
//! the ports an earlier one reserved.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::keys::{read_limited, write_private_file};
use super::{Added, MerchantCredentials, Sandbox, SandboxError, LOG_TARGET};
use crate::channels::ChannelKind;

/// The manifest's `ids` object: only the ids the kind has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ManifestIds {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mchid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform_serial: Option<String>,
}

/// One channel of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestChannel {
    /// `alipay`, `wechatpay` or `supplier`.
    pub kind: &'static str,
    pub priority: u32,
    pub base_url: String,
    pub callback_url: String,
    pub ids: ManifestIds,
    pub gateway_keys: BTreeMap<&'static str, PathBuf>,
    pub channel_keys: BTreeMap<&'static str, PathBuf>,
}

/// `DIR/sandbox.json` (DESIGN.md §10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub merchants: BTreeMap<String, MerchantCredentials>,
    /// `null` when the configuration does not accept the documented admin key.
    pub admin_key: Option<String>,
    pub gateway_url: String,
    pub sim_admin_url: String,
    pub channels: BTreeMap<String, ManifestChannel>,
}

/// The manifest entry of an added channel (its ids as the gateway's settings have them, so
/// an override of an id reaches the simulator too).
pub(super) fn manifest_channel(channel: &Added, callback_url: String) -> ManifestChannel {
    let s = &channel.settings;
    let ids = match s.kind {
        ChannelKind::Alipay => ManifestIds {
            app_id: s.app_id.clone(),
            ..ManifestIds::default()
        },
        ChannelKind::Wechatpay => ManifestIds {
            mchid: s.mchid.clone(),
            appid: s.appid.clone(),
            merchant_serial: s.merchant_serial.clone(),
            platform_serial: channel.keys.platform_serial.clone(),
            ..ManifestIds::default()
        },
        ChannelKind::Supplier => ManifestIds::default(),
    };
    ManifestChannel {
        kind: s.kind.as_str(),
        priority: s.priority,
        base_url: s.base_url.clone(),
        callback_url,
        ids,
        gateway_keys: channel.keys.gateway_keys.clone(),
        channel_keys: channel.keys.channel_keys.clone(),
    }
}

/// The ports of an earlier manifest (admin, channels by id); nothing when there is none or it
/// does not parse.
pub(super) fn earlier_ports(manifest_path: &Path) -> (Option<u16>, BTreeMap<String, u16>) {
    let Ok(text) = read_limited(manifest_path) else {
        return (None, BTreeMap::new());
    };
    let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
        tracing::warn!(
            target: LOG_TARGET,
            path = %manifest_path.display(),
            "the earlier sandbox manifest does not parse: choosing new ports"
        );
        return (None, BTreeMap::new());
    };
    let port = |url: &serde_json::Value| {
        url.as_str()
            .and_then(|u| channel_sim::manifest::listen_addr(u).ok())
            .map(|addr| addr.port())
            .filter(|port| *port != 0)
    };
    let admin = port(&manifest["sim_admin_url"]);
    let mut channels = BTreeMap::new();
    if let Some(entries) = manifest["channels"].as_object() {
        for (id, entry) in entries {
            if let Some(p) = port(&entry["base_url"]) {
                channels.insert(id.clone(), p);
            }
        }
    }
    (admin, channels)
}

impl Sandbox {
    /// The manifest for a gateway listening on `gateway_addr` (an unspecified address, as in
    /// `0.0.0.0:8080`, is reached on loopback).
    pub fn manifest(&self, gateway_addr: SocketAddr) -> Manifest {
        let mut addr = gateway_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        let gateway_url = format!("http://{addr}");
        let callback_base = self.public_url.as_deref().unwrap_or(&gateway_url);
        let channels = self
            .channels
            .iter()
            .map(|(id, channel)| {
                let mut channel = channel.clone();
                channel.callback_url = format!("{callback_base}/v1/callbacks/{id}");
                (id.clone(), channel)
            })
            .collect();
        Manifest {
            merchants: self.credentials.merchants.clone(),
            admin_key: self.credentials.admin_key.clone(),
            gateway_url,
            sim_admin_url: self.sim_admin_url.clone(),
            channels,
        }
    }

    /// Writes the manifest atomically (temporary file, then rename; mode 0600).
    pub fn write_manifest(&self, gateway_addr: SocketAddr) -> Result<&Path, SandboxError> {
        let mut text = serde_json::to_vec_pretty(&self.manifest(gateway_addr))
            .expect("the manifest serializes");
        text.push(b'\n');
        write_private_file(&self.manifest_path, &text)?;
        Ok(&self.manifest_path)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;

    use super::super::test_support::*;
    use super::super::{load_config, prepare, CHANNELS, MANIFEST_FILE};
    use super::*;

    #[tokio::test]
    async fn the_manifest_has_the_contract_schema_and_channel_sim_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        place_fixture_keys(dir.path());
        let (mut config, overrides) = load_config(
            None,
            env(dir.path(), &[("GATEWAY__SANDBOX__EXTERNAL_SIM", "true")]),
        )
        .unwrap();
        let sandbox = prepare(&mut config, &overrides).await.unwrap();
        assert!(!sandbox.sim_in_process());
        let gateway: SocketAddr = "127.0.0.1:8123".parse().unwrap();
        let path = sandbox.write_manifest(gateway).unwrap().to_owned();
        assert_eq!(path, dir.path().canonicalize().unwrap().join(MANIFEST_FILE));
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);

        let manifest: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let top: BTreeSet<&str> = manifest
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            top,
            BTreeSet::from([
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
        assert_eq!(manifest["gateway_url"], "http://127.0.0.1:8123");
        assert!(manifest["sim_admin_url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"));
        let channels = manifest["channels"].as_object().unwrap();
        assert_eq!(channels.len(), 5);
        for def in CHANNELS {
            let c = &channels[def.id];
            let fields: BTreeSet<&str> =
                c.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(
                fields,
                BTreeSet::from([
                    "kind",
                    "priority",
                    "base_url",
                    "callback_url",
                    "ids",
                    "gateway_keys",
                    "channel_keys"
                ]),
                "{}",
                def.id
            );
            assert_eq!(c["kind"], def.kind.as_str());
            assert_eq!(c["priority"], def.priority);
            assert_eq!(
                c["callback_url"],
                format!("http://127.0.0.1:8123/v1/callbacks/{}", def.id)
            );
            let ids: BTreeSet<&str> = c["ids"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let expected: BTreeSet<&str> = match def.kind {
                ChannelKind::Alipay => ["app_id"].into(),
                ChannelKind::Wechatpay => {
                    ["mchid", "appid", "merchant_serial", "platform_serial"].into()
                }
                ChannelKind::Supplier => BTreeSet::new(),
            };
            assert_eq!(ids, expected, "{}", def.id);
            for keys in ["gateway_keys", "channel_keys"] {
                for (_, key_path) in c[keys].as_object().unwrap() {
                    let key_path = Path::new(key_path.as_str().unwrap());
                    assert!(key_path.is_absolute() && key_path.exists());
                }
            }
            // The gateway's settings agree with the manifest.
            let settings = &config.settings.channels[def.id];
            assert_eq!(settings.base_url, c["base_url"].as_str().unwrap());
            assert_eq!(settings.priority, def.priority);
            assert_eq!(settings.methods, [def.kind.as_str()]);
        }
        assert_eq!(
            channels["wechatpay-main"]["channel_keys"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["apiv3_key", "platform_private_key", "platform_public_key"]
        );

        // `channel-sim serve --manifest` reads it: every channel on its base URL's port.
        let sim = channel_sim::manifest::load(&path).unwrap();
        assert_eq!(sim.channels.len(), 5);
        for spec in &sim.channels {
            let base_url = channels[&spec.id]["base_url"].as_str().unwrap();
            assert_eq!(
                spec.listen,
                Some(channel_sim::manifest::listen_addr(base_url).unwrap())
            );
        }
        assert_eq!(
            sim.admin_listen,
            Some(
                channel_sim::manifest::listen_addr(manifest["sim_admin_url"].as_str().unwrap())
                    .unwrap()
            )
        );

        // A later external start reuses the ports.
        let (mut again, overrides) = load_config(
            None,
            env(dir.path(), &[("GATEWAY__SANDBOX__EXTERNAL_SIM", "true")]),
        )
        .unwrap();
        let second = prepare(&mut again, &overrides).await.unwrap();
        assert_eq!(second.manifest(gateway), sandbox.manifest(gateway));
    }
}
