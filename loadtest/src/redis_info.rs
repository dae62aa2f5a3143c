//! Redis's own count of the commands it ran (`INFO commandstats`), read at the edges of the
//! measured window: the cross-check of the gateway's `gateway_redis_round_trips_total`.
//!
//! One plain TCP exchange in RESP, written by hand (no Redis client library for one command):
//! the request `*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n`, the answer a bulk string
//! `$<len>\r\n<text>\r\n` whose lines are `cmdstat_<name>:calls=N,usec=…,…`.
//!
//! Two things to know when reading the figures:
//! - commands a Lua script runs are counted too (an `evalsha` that does three `hset` counts
//!   four calls), so the total is Redis's work, not the gateway's round trips;
//! - a pipeline of N `evalsha` is one round trip for the gateway and N calls for Redis (the
//!   gateway's `mark_settled` sends one script per settled payment in one pipeline).
//!
//! Loopback only, like every other address this tool talks to.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `INFO commandstats` as a RESP array of two bulk strings.
pub const INFO_COMMANDSTATS: &[u8] = b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n";
/// The largest answer read (Redis has ~240 commands; each line is under 150 bytes).
pub const MAX_INFO_BYTES: usize = 1024 * 1024;
/// Connect, send and read the whole answer within this.
pub const INFO_TIMEOUT: Duration = Duration::from_secs(2);
/// The commands that run a script or a function: what one gateway operation calls.
pub const SCRIPT_COMMANDS: [&str; 6] = [
    "evalsha",
    "eval",
    "evalsha_ro",
    "eval_ro",
    "fcall",
    "fcall_ro",
];
/// Our own probe, left out of the total (each reading counts the one before it).
const OWN_COMMAND: &str = "info";

/// `HOST:PORT` of `--redis-addr`: an IPv4 address in 127.0.0.0/8, `[::1]`, or `localhost`
/// (taken as 127.0.0.1; no name is resolved, as for the manifest's URLs).
pub fn parse_redis_addr(text: &str) -> Result<SocketAddr, String> {
    let refuse = || {
        format!("--redis-addr {text:?} is not a loopback HOST:PORT: loadtest only talks to this machine")
    };
    let addr = match text.strip_prefix("localhost:") {
        Some(port) => SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port.parse().map_err(|_| refuse())?,
        ),
        None => text.parse::<SocketAddr>().map_err(|_| refuse())?,
    };
    if addr.ip().is_loopback() && addr.port() != 0 {
        Ok(addr)
    } else {
        Err(refuse())
    }
}

/// Calls per command, from one `INFO commandstats` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandStats(pub BTreeMap<String, u64>);

impl CommandStats {
    /// Parses the text of the answer: `cmdstat_<name>:calls=N,…` lines (names as Redis writes
    /// them, e.g. `evalsha`, `script|load`); other lines are skipped.
    pub fn parse(text: &str) -> Self {
        let mut calls = BTreeMap::new();
        for line in text.lines() {
            let Some((name, fields)) = line
                .trim_end()
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let count = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok());
            if let (false, Some(count)) = (name.is_empty(), count) {
                calls.insert(name.to_ascii_lowercase(), count);
            }
        }
        Self(calls)
    }

    /// Calls of every command since `before`, by command (a command absent `before` counts
    /// from 0). `Err` when a count went down: the stats were reset (`CONFIG RESETSTAT`) or
    /// Redis restarted during the window.
    pub fn since(&self, before: &CommandStats) -> Result<BTreeMap<String, u64>, String> {
        let mut delta = BTreeMap::new();
        for (name, &calls) in &self.0 {
            let start = before.0.get(name).copied().unwrap_or(0);
            let moved = calls.checked_sub(start).ok_or_else(|| {
                format!("Redis's {name} calls went from {start} to {calls}: its stats were reset (or it restarted) during the window")
            })?;
            if moved > 0 {
                delta.insert(name.clone(), moved);
            }
        }
        if let Some(gone) = before.0.keys().find(|n| !self.0.contains_key(*n)) {
            return Err(format!(
                "Redis's {gone} stats disappeared during the window: reset, or restarted"
            ));
        }
        Ok(delta)
    }
}

/// The script calls (`evalsha` + `eval` + … of [`SCRIPT_COMMANDS`]) and every command but
/// our own `INFO`, of a delta from [`CommandStats::since`].
pub fn script_and_total(delta: &BTreeMap<String, u64>) -> (BTreeMap<String, u64>, u64) {
    let scripts = delta
        .iter()
        .filter(|(name, _)| SCRIPT_COMMANDS.contains(&name.as_str()))
        .map(|(name, &calls)| (name.clone(), calls))
        .collect();
    let total = delta
        .iter()
        .filter(|(name, _)| name.as_str() != OWN_COMMAND)
        .map(|(_, &calls)| calls)
        .sum();
    (scripts, total)
}

/// The bulk string at the start of `buf`: `Ok(None)` while incomplete, `Err` for a Redis
/// error (`-ERR …`, `-NOAUTH …`) or anything else than a bulk string.
pub fn parse_bulk(buf: &[u8]) -> Result<Option<&[u8]>, String> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > 32 {
            Err("not a RESP answer".into())
        } else {
            Ok(None)
        };
    };
    let header = std::str::from_utf8(&buf[..line_end]).map_err(|_| "not a RESP answer")?;
    if let Some(error) = header.strip_prefix('-') {
        return Err(format!("Redis answered: {error}"));
    }
    let len: usize = header
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("expected a bulk string, got {header:?}"))?;
    if len > MAX_INFO_BYTES {
        return Err(format!(
            "an answer of {len} bytes is more than {MAX_INFO_BYTES}"
        ));
    }
    let body = line_end + 2;
    if buf.len() < body + len + 2 {
        return Ok(None);
    }
    if &buf[body + len..body + len + 2] != b"\r\n" {
        return Err("the bulk string does not end with CRLF".into());
    }
    Ok(Some(&buf[body..body + len]))
}

/// Sends `INFO commandstats` to `addr` and parses the answer, within [`INFO_TIMEOUT`].
pub async fn commandstats(addr: SocketAddr) -> Result<CommandStats, String> {
    match tokio::time::timeout(INFO_TIMEOUT, exchange(addr)).await {
        Ok(result) => result.map_err(|e| format!("INFO commandstats at {addr}: {e}")),
        Err(_) => Err(format!(
            "INFO commandstats at {addr}: no answer within {} ms",
            INFO_TIMEOUT.as_millis()
        )),
    }
}

async fn exchange(addr: SocketAddr) -> Result<CommandStats, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(INFO_COMMANDSTATS)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(text) = parse_bulk(&buf)? {
            let text = std::str::from_utf8(text).map_err(|_| "the answer is not UTF-8")?;
            return Ok(CommandStats::parse(text));
        }
        if buf.len() > MAX_INFO_BYTES + 64 {
            return Err(format!("an answer larger than {MAX_INFO_BYTES} bytes"));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the connection closed before the whole answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis 7.0's answer, shortened.
    const INFO: &str = "# Commandstats\r\ncmdstat_evalsha:calls=50991,usec=4630116,usec_per_call=90.80,rejected_calls=0,failed_calls=0\r\ncmdstat_hset:calls=120332,usec=454925,usec_per_call=3.78,rejected_calls=0,failed_calls=0\r\ncmdstat_script|load:calls=15,usec=3455,usec_per_call=230.33,rejected_calls=0,failed_calls=0\r\ncmdstat_info:calls=2,usec=144,usec_per_call=72.00,rejected_calls=0,failed_calls=0\r\ncmdstat_broken:usec=1\r\n";

    #[test]
    fn commandstats_are_parsed() {
        let stats = CommandStats::parse(INFO);
        assert_eq!(stats.0["evalsha"], 50_991);
        assert_eq!(stats.0["hset"], 120_332);
        assert_eq!(stats.0["script|load"], 15);
        assert_eq!(stats.0["info"], 2);
        assert!(!stats.0.contains_key("broken"));
        assert_eq!(stats.0.len(), 4);
        assert_eq!(CommandStats::parse(""), CommandStats::default());
    }

    #[test]
    fn deltas_split_scripts_from_the_total_and_leave_out_our_info() {
        let before = CommandStats::parse(INFO);
        let after = CommandStats::parse(
            "cmdstat_evalsha:calls=51991,usec=1\r\ncmdstat_eval:calls=5,usec=1\r\ncmdstat_hset:calls=123332,usec=1\r\ncmdstat_script|load:calls=15,usec=1\r\ncmdstat_info:calls=3,usec=1\r\n",
        );
        let delta = after.since(&before).unwrap();
        assert_eq!(delta["evalsha"], 1_000);
        assert_eq!(delta["eval"], 5);
        assert!(!delta.contains_key("script|load"));
        let (scripts, total) = script_and_total(&delta);
        assert_eq!(scripts.values().sum::<u64>(), 1_005);
        assert_eq!(total, 1_000 + 5 + 3_000);
        // A reset in between is refused, not reported as a huge or negative delta.
        assert!(before.since(&after).is_err());
        assert!(CommandStats::default().since(&before).is_err());
    }

    #[test]
    fn bulk_strings_are_framed() {
        assert_eq!(parse_bulk(b"$5\r\nhello\r\n"), Ok(Some(&b"hello"[..])));
        assert_eq!(parse_bulk(b"$5\r\nhel"), Ok(None));
        assert_eq!(parse_bulk(b"$5"), Ok(None));
        assert_eq!(parse_bulk(b"$0\r\n\r\n"), Ok(Some(&b""[..])));
        assert!(parse_bulk(b"-NOAUTH Authentication required.\r\n")
            .unwrap_err()
            .contains("NOAUTH"));
        assert!(parse_bulk(b"+OK\r\n").is_err());
        assert!(parse_bulk(b"$5\r\nhelloXY").is_err());
        assert!(parse_bulk(b"$99999999999\r\n").is_err());
    }

    #[test]
    fn only_loopback_addresses_are_accepted() {
        for ok in [
            "127.0.0.1:6379",
            "127.3.2.1:1",
            "[::1]:6379",
            "localhost:6380",
        ] {
            assert!(parse_redis_addr(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            parse_redis_addr("localhost:6380").unwrap(),
            "127.0.0.1:6380".parse().unwrap()
        );
        for bad in [
            "10.0.0.1:6379",
            "0.0.0.0:6379",
            "[::]:6379",
            "redis.example.com:6379",
            "localhost.example.com:6379",
            "127.0.0.1",
            "127.0.0.1:0",
            "localhost:",
            "",
        ] {
            assert!(parse_redis_addr(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn info_is_asked_and_read_over_tcp() {
        // A stand-in Redis that answers in two pieces.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; INFO_COMMANDSTATS.len()];
            socket.read_exact(&mut request).await.unwrap();
            assert_eq!(request, INFO_COMMANDSTATS);
            let answer = format!("${}\r\n{INFO}\r\n", INFO.len());
            let (a, b) = answer.as_bytes().split_at(40);
            socket.write_all(a).await.unwrap();
            socket.flush().await.unwrap();
            tokio::task::yield_now().await;
            socket.write_all(b).await.unwrap();
        });
        let stats = commandstats(addr).await.unwrap();
        assert_eq!(stats.0["evalsha"], 50_991);
        server.await.unwrap();
        // Nothing listening: an error to report, not a panic.
        drop(stats);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(commandstats(closed).await.is_err());
    }
}
