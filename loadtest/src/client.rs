//! The HTTP client: hyper-util's pooled client with keep-alive, plain HTTP (loopback only),
//! `TCP_NODELAY`, and a timeout over the whole exchange (send, answer, body).

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The largest answer body read; a larger one is a transport error (our targets answer a
/// payment in well under 4 KiB).
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why an exchange gave no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// No complete answer within the request timeout.
    Timeout,
    /// Connection refused or reset, malformed answer, oversized body: `kind` is a short,
    /// stable label for the report (`connect`, `io`, `body`).
    Transport { kind: &'static str, detail: String },
}

/// A status and a body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    /// `connections`: idle connections kept per host (the in-flight bound decides how many
    /// are open at once: one request per HTTP/1 connection).
    pub fn new(connections: usize, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let inner = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(connections)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { inner, timeout }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `request` and reads the whole answer (at most [`MAX_ANSWER_BYTES`]), within the
    /// timeout.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer, SendError> {
        self.send_limited(request, MAX_ANSWER_BYTES).await
    }

    /// As [`HttpClient::send`], reading at most `max_answer_bytes` of the answer (channel-sim's
    /// order listings, read after a run, are larger than any payment answer).
    pub async fn send_limited(
        &self,
        request: Request<Full<Bytes>>,
        max_answer_bytes: usize,
    ) -> Result<Answer, SendError> {
        match tokio::time::timeout(self.timeout, self.exchange(request, max_answer_bytes)).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Timeout),
        }
    }

    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
        max_answer_bytes: usize,
    ) -> Result<Answer, SendError> {
        let response = self.inner.request(request).await.map_err(|e| {
            let kind = if e.is_connect() { "connect" } else { "io" };
            SendError::Transport {
                kind,
                detail: error_chain(&e),
            }
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_answer_bytes)
            .collect()
            .await
            .map_err(|e| SendError::Transport {
                kind: "body",
                detail: e.to_string(),
            })?
            .to_bytes();
        Ok(Answer { status, body })
    }
}

/// An error with its causes, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
