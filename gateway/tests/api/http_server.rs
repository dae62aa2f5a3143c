//! The HTTP server's connection handling, seen from raw sockets so that connection reuse and
//! closing are observable: slow senders cut off by the header-read, body-read and idle
//! timeouts; a keep-alive connection that stays usable after early answers (`401`, `403`,
//! `404`, `405`, `409`, a load-shed `503`) when the body follows the headers a few ms later,
//! as from real clients; the connection cap; the callback route's 64 KiB limit before reading.
//! Timeouts in the tests are generous bounds, never pass criteria.

use std::net::SocketAddr;
use std::time::Duration;

use channel_sim::Faults;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;
use crate::sim_channels::SUPPLIER_MAIN;

/// The longest any step here may take before the test fails.
const BOUND: Duration = Duration::from_secs(10);

/// How long a client leaves between its headers and its body (what reproduced the reset).
const BODY_DELAY: Duration = Duration::from_millis(20);

/// A parsed response read off a raw connection.
#[derive(Debug)]
struct RawReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl RawReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// One client connection, read and written by hand.
struct Raw {
    stream: TcpStream,
    buffer: Vec<u8>,
}

/// A request's head and body, written separately.
type RawRequest = (String, Vec<u8>);

fn request(
    method: &str,
    path: &str,
    key: Option<&str>,
    idempotency: Option<&str>,
    body: &str,
) -> RawRequest {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n",
        body.len()
    );
    if let Some(key) = key {
        head.push_str(&format!("authorization: Bearer {key}\r\n"));
    }
    if let Some(idempotency) = idempotency {
        head.push_str(&format!("idempotency-key: {idempotency}\r\n"));
    }
    head.push_str("\r\n");
    (head, body.as_bytes().to_vec())
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buffer: Vec::new(),
        }
    }

    /// Writes the head, then the body [`BODY_DELAY`] later.
    async fn send(&mut self, (head, body): RawRequest) {
        self.stream.write_all(head.as_bytes()).await.unwrap();
        if !body.is_empty() {
            tokio::time::sleep(BODY_DELAY).await;
            self.stream.write_all(&body).await.unwrap();
        }
    }

    /// Sends and reads the answer on this same connection.
    async fn exchange(&mut self, request: RawRequest) -> RawReply {
        self.send(request).await;
        self.response()
            .await
            .expect("an answer on the same connection")
    }

    /// The next response; `None` when the connection ended (EOF or reset) before one.
    async fn response(&mut self) -> Option<RawReply> {
        read_reply(&mut self.stream, &mut self.buffer).await
    }

    /// True once the server has closed the connection (EOF or reset), with nothing sent.
    async fn closed_without_answer(&mut self) -> bool {
        tokio::time::timeout(BOUND, async {
            let mut chunk = [0u8; 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => true,
                Ok(_) => false,
            }
        })
        .await
        .expect("the server closes the connection in time")
    }
}

/// Reads the next response from `read` (bytes already read first in `buffer`); `None` when
/// the connection ended (EOF or reset) before a whole one.
async fn read_reply(
    read: &mut (impl tokio::io::AsyncRead + Unpin),
    buffer: &mut Vec<u8>,
) -> Option<RawReply> {
    tokio::time::timeout(BOUND, async {
        loop {
            if let Some(reply) = parse(buffer) {
                return Some(reply);
            }
            let mut chunk = [0u8; 4096];
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("an answer or the end of the connection in time")
}

/// One whole response off the front of `buffer`, if it holds one.
fn parse(buffer: &mut Vec<u8>) -> Option<RawReply> {
    let end = buffer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if buffer.len() < end + 4 + length {
        return None;
    }
    let body: Vec<u8> = buffer.drain(..end + 4 + length).skip(end + 4).collect();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Some(RawReply {
        status,
        headers,
        body,
    })
}

async fn healthy(raw: &mut Raw) {
    let reply = raw
        .exchange(request("GET", "/healthz", None, None, ""))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test]
async fn a_keep_alive_connection_survives_early_answers() {
    let app = spawn_app(Backend::Memory).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let first = app
        .pay(ALPHA, "k1", balance_payment("o1", "acc", "10.00"))
        .await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let payment = balance_payment("o2", "acc", "10.00").to_string();
    let conflicting = balance_payment("o1", "acc", "20.00").to_string();
    let cases: [(&str, RawRequest, u16, &str); 5] = [
        (
            "no API key",
            request("POST", "/v1/payments", None, Some("k2"), &payment),
            401,
            "unauthorized",
        ),
        (
            "the admin key on a merchant route",
            request("POST", "/v1/payments", Some(ADMIN), Some("k2"), &payment),
            403,
            "forbidden",
        ),
        (
            "a key reused with another request",
            request(
                "POST",
                "/v1/payments",
                Some(ALPHA),
                Some("k1"),
                &conflicting,
            ),
            409,
            "idempotency_conflict",
        ),
        (
            "no such route",
            request("POST", "/v1/nowhere", Some(ALPHA), None, &payment),
            404,
            "not_found",
        ),
        (
            "another method",
            request("DELETE", "/v1/payments", Some(ALPHA), None, &payment),
            405,
            "invalid_request",
        ),
    ];
    let mut raw = Raw::connect(app.addr).await;
    for (what, early, status, code) in cases {
        let reply = raw.exchange(early).await;
        assert_eq!(
            (reply.status, reply.code()),
            (status, code),
            "{what}: {reply:?}"
        );
        assert_eq!(reply.header("connection"), None, "{what}: {reply:?}");
        // The next request on the same socket gets its own, proper answer.
        let next = raw
            .exchange(request("GET", "/v1/accounts/acc", Some(ALPHA), None, ""))
            .await;
        assert_eq!(next.status, 200, "after {what}: {next:?}");
        assert_eq!(next.body["balance"], "90.00", "after {what}: {next:?}");
    }
}

#[tokio::test]
async fn a_keep_alive_connection_survives_load_shedding() {
    let app = spawn_app_with(
        Backend::Memory,
        &[("GATEWAY__SERVER__MAX_IN_FLIGHT_REQUESTS", "1")],
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    // One slow payment holds the only admission permit.
    app.channels.set_faults(
        SUPPLIER_MAIN,
        Faults {
            latency_ms: 1_500,
            ..Faults::default()
        },
    );
    let app = std::sync::Arc::new(app);
    let slow = tokio::spawn({
        let app = app.clone();
        async move {
            app.pay(ALPHA, "slow", supplier_payment("slow", "acc", "10.00"))
                .await
        }
    });
    let mut raw = Raw::connect(app.addr).await;
    // Malformed on purpose: answered 400 while the slow payment is not admitted yet, 503 once
    // it is; both keep the connection.
    let mut shed = None;
    for _ in 0..200 {
        let reply = raw
            .exchange(request(
                "POST",
                "/v1/payments",
                Some(ALPHA),
                Some("x"),
                "{}",
            ))
            .await;
        if reply.status == 503 {
            shed = Some(reply);
            break;
        }
        assert_eq!(reply.status, 400, "{reply:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shed = shed.expect("a request shed while the slow payment holds the permit");
    assert_eq!(shed.code(), "unavailable");
    assert_eq!(shed.body["error"]["reason"], "overloaded");
    assert_eq!(shed.header("connection"), None, "{shed:?}");
    // Health checks are never shed: answered on the same connection at once.
    healthy(&mut raw).await;
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 201, "{:?}", slow.body);
    let account = raw
        .exchange(request("GET", "/v1/accounts/acc", Some(ALPHA), None, ""))
        .await;
    assert_eq!(account.status, 200, "{account:?}");
    assert_eq!(account.body["held"], "10.00", "{account:?}");
}

#[tokio::test]
async fn a_slow_body_does_not_hold_an_admission_permit() {
    let app = spawn_app_with(
        Backend::Memory,
        &[("GATEWAY__SERVER__MAX_IN_FLIGHT_REQUESTS", "1")],
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    // A client sends its headers and only part of its body, and waits.
    let mut stalled = Raw::connect(app.addr).await;
    let body = balance_payment("o1", "acc", "10.00").to_string();
    let (head, bytes) = request("POST", "/v1/payments", Some(ALPHA), Some("k1"), &body);
    stalled.stream.write_all(head.as_bytes()).await.unwrap();
    stalled.stream.write_all(&bytes[..10]).await.unwrap();
    // Meanwhile other requests are admitted (with one permit, a held one would shed them).
    let mut raw = Raw::connect(app.addr).await;
    for _ in 0..3 {
        let account = raw
            .exchange(request("GET", "/v1/accounts/acc", Some(ALPHA), None, ""))
            .await;
        assert_eq!(account.status, 200, "{account:?}");
    }
    // The stalled body completes and is served.
    stalled.stream.write_all(&bytes[10..]).await.unwrap();
    let paid = stalled.response().await.expect("an answer");
    assert_eq!(paid.status, 201, "{paid:?}");
}

#[tokio::test]
async fn a_trickled_header_is_cut_off_by_the_header_read_timeout() {
    let app = spawn_app_with(
        Backend::Memory,
        &[("GATEWAY__SERVER__HEADER_READ_TIMEOUT_MS", "300")],
    )
    .await;
    let raw = Raw::connect(app.addr).await;
    let (mut read, mut write) = raw.stream.into_split();
    // One header byte every 50 ms, for far longer than the timeout, unless cut off.
    let trickle = tokio::spawn(async move {
        write
            .write_all(b"GET /healthz HTTP/1.1\r\nx-slow: ")
            .await?;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            write.write_all(b"a").await?;
        }
        write.write_all(b"\r\n\r\n").await
    });
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(BOUND, read.read(&mut chunk))
        .await
        .expect("cut off in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without an answer: {read:?} {:?}",
        String::from_utf8_lossy(&chunk)
    );
    trickle.abort();
    // A prompt client is still served.
    let mut raw = Raw::connect(app.addr).await;
    healthy(&mut raw).await;
}

#[tokio::test]
async fn a_trickled_body_is_cut_off_by_the_body_read_timeout() {
    let app = spawn_app_with(
        Backend::Memory,
        &[("GATEWAY__SERVER__BODY_READ_TIMEOUT_MS", "300")],
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let body = balance_payment("o1", "acc", "10.00").to_string();
    let (head, bytes) = request("POST", "/v1/payments", Some(ALPHA), Some("k1"), &body);
    let mut raw = Raw::connect(app.addr).await;
    raw.stream.write_all(head.as_bytes()).await.unwrap();
    let reply = {
        let Raw { stream, buffer } = &mut raw;
        let (mut read, mut write) = stream.split();
        // One body byte every 50 ms: the whole body would take seconds.
        let trickle = async {
            for byte in bytes {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if write.write_all(&[byte]).await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            reply = read_reply(&mut read, buffer) => reply,
            _ = trickle => unreachable!("the trickle never ends by itself"),
        }
    };
    let reply = reply.expect("an answer before the connection closes");
    assert_eq!(reply.status, 408, "{reply:?}");
    assert_eq!(reply.code(), "invalid_request");
    assert_eq!(reply.body["error"]["field"], "body");
    assert_eq!(reply.header("connection"), Some("close"), "{reply:?}");
    assert!(raw.closed_without_answer().await);
    // Nothing was paid.
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let app = spawn_app_with(
        Backend::Memory,
        &[("GATEWAY__SERVER__IDLE_TIMEOUT_MS", "300")],
    )
    .await;
    // Idle after an answer.
    let mut raw = Raw::connect(app.addr).await;
    healthy(&mut raw).await;
    assert!(raw.closed_without_answer().await);
    // Idle from the start: never sends a byte.
    let mut silent = Raw::connect(app.addr).await;
    assert!(silent.closed_without_answer().await);
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_at_once() {
    let app = spawn_app_with(
        Backend::Memory,
        &[("GATEWAY__SERVER__MAX_CONNECTIONS", "2")],
    )
    .await;
    let mut first = Raw::connect(app.addr).await;
    let mut second = Raw::connect(app.addr).await;
    healthy(&mut first).await;
    healthy(&mut second).await;
    // A third gets an answer without sending anything, and the connection ends.
    let mut third = Raw::connect(app.addr).await;
    let refused = third.response().await.expect("an answer");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.code(), "unavailable");
    assert_eq!(refused.body["error"]["reason"], "too_many_connections");
    assert_eq!(refused.header("connection"), Some("close"));
    assert!(third.closed_without_answer().await);
    // The two are still served.
    healthy(&mut first).await;
    healthy(&mut second).await;
    // Once one closes, its place is free again (the server sees the close shortly after).
    drop(first);
    let mut served = None;
    for _ in 0..200 {
        let mut next = Raw::connect(app.addr).await;
        next.send(request("GET", "/healthz", None, None, "")).await;
        match next.response().await {
            Some(reply) if reply.status == 200 => {
                served = Some(next);
                break;
            }
            Some(reply) => assert_eq!(reply.status, 503, "{reply:?}"),
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut served = served.expect("a freed place is taken again");
    let metrics = served
        .exchange(request("GET", "/metrics", None, None, ""))
        .await;
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains("gateway_http_connections_refused_total"),
        "{text}"
    );
}

#[tokio::test]
async fn a_callback_body_over_64_kib_is_refused_before_it_is_read() {
    let app = spawn_app(Backend::Memory).await;
    let path = format!("/v1/callbacks/{SUPPLIER_MAIN}");
    // Declared 3 MB, of which only 1 KiB is ever sent: the answer cannot wait for the rest.
    let mut raw = Raw::connect(app.addr).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
         content-length: 3000000\r\n\r\n"
    );
    raw.stream.write_all(head.as_bytes()).await.unwrap();
    raw.stream.write_all(&[b' '; 1024]).await.unwrap();
    let reply = raw.response().await.expect("an answer");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.code(), "invalid_request");
    assert_eq!(reply.body["error"]["field"], "body");
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(raw.closed_without_answer().await);

    // Chunked, without a length: refused once 64 KiB + 1 have arrived, not 2 MB.
    let mut raw = Raw::connect(app.addr).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    raw.stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = [b' '; 16 * 1024];
    for _ in 0..5 {
        raw.stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        raw.stream.write_all(&chunk).await.unwrap();
        raw.stream.write_all(b"\r\n").await.unwrap();
    }
    let reply = raw.response().await.expect("an answer");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.body["error"]["field"], "body");
    assert_eq!(reply.header("connection"), Some("close"));

    // Exactly the limit is read and handed to the channel's verification (refused there in
    // the supplier's own form, `{"error": "<text>"}`: no signature).
    let reply = app
        .post_raw(
            &path,
            &[("content-type", "application/json")],
            vec![b' '; 64 * 1024],
        )
        .await;
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    assert!(reply.body["error"].is_string(), "{:?}", reply.body);
}
