//! The HTTP client of one channel: hyper-util's pooled client over a rustls connector, with
//! every resource bounded.
//!
//! - **TLS**: rustls on the aws-lc-rs provider (the crypto the signatures already use), with
//!   Mozilla's root certificates compiled in (webpki-roots), so a machine's certificate store
//!   cannot change whom we trust. HTTP/1.1 only: every payment API here speaks it, and it keeps
//!   the connector small. Plain `http://` is accepted by the client; [`super::ChannelSettings`]
//!   allows it only for loopback hosts (the sandbox's `channel-sim`).
//! - **Pool**: keep-alive connections, at most `max_idle_per_host` idle ones kept, each for at
//!   most `idle_timeout_ms`. The default keeps as many as may be in flight: a connection a
//!   burst opened is kept, not closed when it comes back to a full pool (with 32 kept, a
//!   supplier checkout at 500/s opened and closed a connection for one call in seven:
//!   docs/PERFORMANCE.md).
//! - **Timeouts**: `connect_timeout_ms` bounds establishing a connection (TCP; the TLS
//!   handshake is inside the request timeout); `request_timeout_ms` bounds the whole call,
//!   from taking a connection to the last byte of the reply body.
//! - **In flight**: at most `max_in_flight` calls at once (a semaphore). When full, a call fails
//!   at once with [`ChannelError::Overloaded`] — nothing was sent — instead of queueing behind
//!   a slow channel: the caller fails over or answers, but does not wait.
//! - **Reply size**: bodies beyond `max_response_bytes` are cut off with
//!   [`ChannelError::ResponseTooLarge`].
//!
//! Errors are classified here, once, by what they say about the request: a connect error means
//! nothing was sent ([`ChannelError::ConnectRefused`], [`ChannelError::ConnectFailed`]); a
//! timeout or an I/O error afterwards means it may have been
//! ([`ChannelError::Timeout`], [`ChannelError::Io`]). hyper-util's client retries on its own
//! only requests that were certainly not written (a pooled connection found closed before
//! use), so it never doubles an order.
//!
//! Metrics: `gateway_channel_http_requests_total{channel, outcome}` (outcome: `ok` or the
//! error's label) and `gateway_channel_http_request_duration_seconds{channel}`.

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::{HeaderMap, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

use super::ChannelError;

/// Limits of one channel's client (units in the names). Validated by
/// [`super::ChannelSettings::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_in_flight: u32,
    pub max_idle_per_host: usize,
    pub idle_timeout_ms: u64,
    pub max_response_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1_000,
            request_timeout_ms: 5_000,
            max_in_flight: 256,
            max_idle_per_host: 256,
            idle_timeout_ms: 60_000,
            max_response_bytes: 64 * 1024,
        }
    }
}

/// A reply, read whole.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpReply {
    /// The body as UTF-8, or an unverifiable-reply error (every protocol here is UTF-8 JSON).
    pub fn text(&self) -> Result<&str, ChannelError> {
        std::str::from_utf8(&self.body)
            .map_err(|_| ChannelError::unverifiable("the reply body is not UTF-8"))
    }

    /// A header's value as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the TLS client configuration: {0}")]
pub struct ClientBuildError(String);

/// One channel's HTTP client. Cheap to share behind an `Arc`; clones share the pool and the
/// in-flight limit.
#[derive(Clone)]
pub struct HttpClient {
    channel_id: Arc<str>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    request_timeout: Duration,
    max_response_bytes: usize,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("channel_id", &self.channel_id)
            .field("max_in_flight", &self.max_in_flight)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// Builds the client; must run inside a tokio runtime only when used, not when built.
    pub fn new(channel_id: &str, settings: &HttpSettings) -> Result<Self, ClientBuildError> {
        let mut http = HttpConnector::new();
        // The https connector wraps this one; it must let `https://` through to it.
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())
            .map_err(|e| ClientBuildError(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(settings.idle_timeout_ms))
            .pool_max_idle_per_host(settings.max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        let max_in_flight = settings.max_in_flight.max(1) as usize;
        Ok(Self {
            channel_id: Arc::from(channel_id),
            client,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            request_timeout: Duration::from_millis(settings.request_timeout_ms),
            max_response_bytes: settings.max_response_bytes,
        })
    }

    /// Calls now in flight.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// Sends `request` and reads the whole reply, within the in-flight limit, the request
    /// timeout and the size limit. Any status is a reply: the protocol decides what it means.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<HttpReply, ChannelError> {
        let started = Instant::now();
        let result = self.send_bounded(request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        crate::telemetry::channel_http(&self.channel_id, outcome, started.elapsed());
        if let Err(e) = &result {
            tracing::debug!(channel = %self.channel_id, error = %e, "channel call failed");
        }
        result
    }

    async fn send_bounded(&self, request: Request<Full<Bytes>>) -> Result<HttpReply, ChannelError> {
        let _permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ChannelError::Overloaded)?;
        match tokio::time::timeout(self.request_timeout, self.exchange(request)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(ChannelError::Timeout),
        }
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<HttpReply, ChannelError> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| classify(&e))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, self.max_response_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    ChannelError::ResponseTooLarge
                } else {
                    ChannelError::Io {
                        reason: format!("reading the reply: {e}"),
                    }
                }
            })?
            .to_bytes();
        Ok(HttpReply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// What a client error says about the request (module docs).
fn classify(error: &hyper_util::client::legacy::Error) -> ChannelError {
    let io_kind = {
        let mut source = error.source();
        let mut kind = None;
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                kind = Some(io.kind());
                break;
            }
            source = e.source();
        }
        kind
    };
    if error.is_connect() {
        return match io_kind {
            Some(std::io::ErrorKind::ConnectionRefused) => ChannelError::ConnectRefused,
            Some(std::io::ErrorKind::TimedOut) => ChannelError::ConnectFailed {
                reason: "connect timeout".to_owned(),
            },
            _ => ChannelError::ConnectFailed {
                reason: error_chain(error),
            },
        };
    }
    ChannelError::Io {
        reason: error_chain(error),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    // Bounded: error chains are short, but a cycle-free chain could still be long.
    for _ in 0..8 {
        let Some(e) = source else { break };
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::Router;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    fn settings() -> HttpSettings {
        HttpSettings {
            connect_timeout_ms: 500,
            request_timeout_ms: 300,
            max_in_flight: 4,
            max_idle_per_host: 4,
            idle_timeout_ms: 10_000,
            max_response_bytes: 1024,
        }
    }

    #[test]
    fn by_default_every_connection_that_may_be_in_flight_may_stay_idle() {
        let defaults = HttpSettings::default();
        assert_eq!(defaults.max_idle_per_host, defaults.max_in_flight as usize);
    }

    fn get_request(base: &str, path: &str) -> Request<Full<Bytes>> {
        Request::get(format!("{base}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// A loopback server: `/ok`, `/big` (beyond the size limit), `/hang` (never answers until
    /// released), `/count` (answers after `release`, used for the burst).
    async fn serve(release: Arc<Notify>) -> String {
        let hang_release = release.clone();
        let app = Router::new()
            .route("/ok", get(|| async { "hello" }))
            .route("/big", get(|| async { "x".repeat(4096) }))
            .route(
                "/hang",
                get(move || {
                    let release = hang_release.clone();
                    async move {
                        release.notified().await;
                        "late"
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn reads_replies_and_keeps_the_connection() {
        let base = serve(Arc::new(Notify::new())).await;
        let client = HttpClient::new("test", &settings()).unwrap();
        for _ in 0..3 {
            let reply = client.send(get_request(&base, "/ok")).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.text().unwrap(), "hello");
        }
        assert_eq!(client.in_flight(), 0);
        let err = client.send(get_request(&base, "/big")).await.unwrap_err();
        assert_eq!(err, ChannelError::ResponseTooLarge);
        assert!(!err.certainly_not_executed());
    }

    #[tokio::test]
    async fn a_hanging_handler_times_out_as_an_unknown_outcome() {
        let base = serve(Arc::new(Notify::new())).await;
        let client = HttpClient::new("test", &settings()).unwrap();
        let started = Instant::now();
        let err = client.send(get_request(&base, "/hang")).await.unwrap_err();
        assert_eq!(err, ChannelError::Timeout);
        assert!(!err.certainly_not_executed());
        assert!(err.counts_as_failure());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
            "{elapsed:?}"
        );
        assert_eq!(client.in_flight(), 0, "the permit is given back on timeout");
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_and_certainly_not_executed() {
        // Bind then drop: the port is free and nothing listens on it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = HttpClient::new("test", &settings()).unwrap();
        let err = client
            .send(get_request(&format!("http://{addr}"), "/ok"))
            .await
            .unwrap_err();
        assert_eq!(err, ChannelError::ConnectRefused);
        assert!(err.certainly_not_executed());
        assert!(err.counts_as_failure());
    }

    #[tokio::test]
    async fn the_in_flight_limit_holds_under_a_burst() {
        let release = Arc::new(Notify::new());
        let base = serve(release.clone()).await;
        let client = HttpClient::new(
            "test",
            &HttpSettings {
                request_timeout_ms: 10_000,
                ..settings()
            },
        )
        .unwrap();
        // Four calls hang in the server and hold every permit.
        let mut hanging = Vec::new();
        for _ in 0..4 {
            let client = client.clone();
            let request = get_request(&base, "/hang");
            hanging.push(tokio::spawn(async move { client.send(request).await }));
        }
        while client.in_flight() < 4 {
            tokio::task::yield_now().await;
        }
        // A burst beyond the limit fails at once, with nothing sent.
        let burst = futures_burst(&client, &base, 50).await;
        assert!(burst
            .iter()
            .all(|r| matches!(r, Err(ChannelError::Overloaded))));
        assert!(ChannelError::Overloaded.certainly_not_executed());
        assert!(!ChannelError::Overloaded.counts_as_failure());
        assert_eq!(client.in_flight(), 4);
        // Released, the four complete and the permits come back.
        while hanging.iter().any(|h| !h.is_finished()) {
            release.notify_waiters();
            tokio::task::yield_now().await;
        }
        for handle in hanging {
            let reply = handle.await.unwrap().unwrap();
            assert_eq!(reply.text().unwrap(), "late");
        }
        assert_eq!(client.in_flight(), 0);
        assert!(client.send(get_request(&base, "/ok")).await.is_ok());
    }

    async fn futures_burst(
        client: &HttpClient,
        base: &str,
        calls: usize,
    ) -> Vec<Result<HttpReply, ChannelError>> {
        let mut handles = Vec::new();
        for _ in 0..calls {
            let client = client.clone();
            let request = get_request(base, "/ok");
            handles.push(tokio::spawn(async move { client.send(request).await }));
        }
        let mut results = Vec::new();
        for handle in handles {
            results.push(handle.await.unwrap());
        }
        results
    }
}
