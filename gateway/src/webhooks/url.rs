//! Which webhook URLs the gateway calls ([`check_url`]): a leaf, so the configuration checks
//! merchants' `webhook_url` by the same rules as the API checks a payment's `notify_url` and
//! the delivery worker checks both again.

use hyper::Uri;

use crate::mode::Mode;

/// A webhook URL the gateway will POST to. Merchants choose `notify_url`, and a delivery's
/// status is shown back to them, so a URL must not reach the gateway's own network:
///
/// - production: `https://` to a host that is not `localhost` (or `*.localhost`), not a
///   loopback, private, link-local, shared (100.64/10), unspecified, multicast or broadcast
///   IPv4 or IPv6 literal (IPv4-mapped IPv6 included), and not a numeric host other than a
///   dotted quad (`2130706433`, `0x7f.1`: resolvers read those as addresses);
/// - sandbox: the same, except that loopback hosts are allowed, over `http://` too (tests and
///   demos receive webhooks on 127.0.0.1).
///
/// A host *name* that resolves to an internal address is not caught here: egress goes through
/// a proxy or firewall that blocks internal addresses (config/production.example.toml).
pub fn check_url(text: &str, mode: Mode) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|e| format!("not a URL ({e})"))?;
    let host = uri.host().ok_or("no host")?;
    let loopback_allowed = mode == Mode::Sandbox;
    let target = classify_host(host);
    match target {
        Host::Loopback if loopback_allowed => {}
        Host::Loopback | Host::Internal => {
            return Err(if loopback_allowed {
                "the host is an internal address".into()
            } else {
                "the host is a loopback or internal address".into()
            })
        }
        Host::NumericName => {
            return Err("a numeric host must be a dotted-quad IPv4 or an IPv6 literal".into())
        }
        Host::Public => {}
    }
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if target == Host::Loopback && loopback_allowed => Ok(uri),
        Some("http") if loopback_allowed => {
            Err("plain http is allowed only for loopback hosts".into())
        }
        _ if loopback_allowed => Err("the scheme must be https (or http for loopback)".into()),
        _ => Err("the scheme must be https".into()),
    }
}

/// What a URL's host names, as far as can be told without resolving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Host {
    Loopback,
    Internal,
    NumericName,
    Public,
}

fn classify_host(host: &str) -> Host {
    use std::net::{IpAddr, Ipv4Addr};
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let v4 = |ip: Ipv4Addr| {
        let [a, b, ..] = ip.octets();
        if ip.is_loopback() {
            Host::Loopback
        } else if ip.is_private()
            || ip.is_link_local()
            || ip.is_unspecified()
            || ip.is_broadcast()
            || ip.is_multicast()
            || a == 0
            || (a == 100 && (64..128).contains(&b))
        {
            Host::Internal
        } else {
            Host::Public
        }
    };
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => v4(ip),
        Ok(IpAddr::V6(ip)) => {
            if let Some(mapped) = ip.to_ipv4_mapped() {
                return v4(mapped);
            }
            let first = ip.segments()[0];
            if ip.is_loopback() {
                Host::Loopback
            } else if ip.is_unspecified()
                || ip.is_multicast()
                // fe80::/10 link-local, fec0::/10 site-local, fc00::/7 unique local.
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || (first & 0xfe00) == 0xfc00
            {
                Host::Internal
            } else {
                Host::Public
            }
        }
        Err(_) if bare == "localhost" || bare.ends_with(".localhost") => Host::Loopback,
        Err(_) => {
            // A top-level label is never numeric: `2130706433`, `127.1`, `0x7f.0.0.1` and
            // the like are addresses to a resolver.
            let last = bare.rsplit('.').next().unwrap_or_default();
            if !last.is_empty()
                && (last.bytes().all(|b| b.is_ascii_digit()) || last.starts_with("0x"))
            {
                Host::NumericName
            } else {
                Host::Public
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_urls_are_https_or_loopback_http() {
        for ok in [
            "https://merchant.example/hooks?x=1",
            "http://127.0.0.1:9000/h",
            "http://[::1]:9000/h",
            "http://localhost/h",
            "https://127.0.0.1:9443/h",
        ] {
            assert!(check_url(ok, Mode::Sandbox).is_ok(), "{ok}");
        }
        for bad in [
            "http://merchant.example/h",
            "http://10.0.0.1/h",
            "https://10.0.0.1/h",
            "https://169.254.169.254/latest/meta-data",
            "ftp://127.0.0.1/h",
            "/relative",
            "not a url",
            "https://m.example/%00x\u{0}",
        ] {
            assert!(check_url(bad, Mode::Sandbox).is_err(), "{bad}");
        }
    }

    #[test]
    fn production_urls_are_https_to_public_hosts_only() {
        for ok in [
            "https://merchant.example/hooks?x=1",
            "https://8.8.8.8/h",
            "https://[2001:db8::1]/h",
            "https://shop.example.com:8443/n",
            "https://100.128.0.1/h",
            "https://172.32.0.1/h",
        ] {
            assert!(check_url(ok, Mode::Production).is_ok(), "{ok}");
        }
        for bad in [
            // Loopback, by name and literal.
            "http://localhost:8080/h",
            "https://localhost/h",
            "https://LOCALHOST./h",
            "https://api.localhost/h",
            "https://127.0.0.1/h",
            "https://127.8.9.10/h",
            "https://[::1]/h",
            "https://[::ffff:127.0.0.1]/h",
            // Private, shared and link-local.
            "https://10.1.2.3/h",
            "https://172.16.0.1/h",
            "https://172.31.255.255/h",
            "https://192.168.1.1/h",
            "https://100.64.0.1/h",
            "https://169.254.169.254/latest/meta-data",
            "https://[fe80::1]/h",
            "https://[fd00::1]/h",
            "https://[fc00::1]/h",
            "https://[::ffff:10.0.0.1]/h",
            // Unspecified, broadcast, multicast.
            "https://0.0.0.0/h",
            "https://0.1.2.3/h",
            "https://[::]/h",
            "https://255.255.255.255/h",
            "https://224.0.0.1/h",
            "https://[ff02::1]/h",
            // Numeric names a resolver reads as addresses.
            "https://2130706433/h",
            "https://0x7f000001/h",
            "https://127.1/h",
            "https://0177.0.0.1/h",
            // Plain http anywhere.
            "http://merchant.example/h",
            "http://8.8.8.8/h",
        ] {
            assert!(check_url(bad, Mode::Production).is_err(), "{bad}");
        }
    }
}
