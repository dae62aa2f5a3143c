//! The same-run baseline of issue 6: a bare hyper pass-through proxy in front of the same
//! channel-sim, so that every figure of the gateway can be quoted as a ratio to what this
//! machine does for the least possible work on the same path.
//!
//! What it does per request, and nothing more: read the generator's `POST /v1/orders` body
//! (the supplier create-order JSON, written by the generator, see
//! [`crate::target::BaselineTarget`]), sign it with the supplier channel's shared secret
//! (`X-Signature`, [`crate::signing`]), send it to `{base_url}/v1/orders` of the channel on a
//! keep-alive pooled connection, and answer with the channel's status and body. No
//! authentication, no Redis, no routing, no JSON parsing, no durable write. Callbacks
//! (`POST /callback…`, the `notify_url` the generator writes) are acknowledged with the
//! supplier protocol's `200 {"received": true}` and otherwise ignored, so channel-sim's
//! auto-pay may stay on (it then pays and calls back, work the gateway's path has too).
//!
//! It signs whatever it is given with a real channel secret, so it listens on a loopback
//! address only and forwards only to the manifest's (loopback) channel. Bounded like the
//! gateway's channel client: at most `max_in_flight` forwards at once (beyond, `503` at once,
//! nothing sent), at most `max_connections` client connections, bodies up to
//! [`MAX_BODY_BYTES`], and the upstream exchange within `upstream_timeout`. Its own errors
//! are `{"error": "<code>"}` like channel-sim's: `502 upstream_connect` (nothing sent),
//! `502 upstream_io`, `504 upstream_timeout`, `503 proxy_overloaded`, `400 unreadable_body`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::client::{HttpClient, SendError};
use crate::manifest::{check_loopback_url, Manifest};
use crate::signing::{SupplierSigner, HEADER_NAME};
use crate::Error;

/// The path the generator posts orders to, and the channel's create-order path.
pub const ORDERS_PATH: &str = "/v1/orders";
/// Callbacks land here (and under `/callback/…`): acknowledged, ignored.
pub const CALLBACK_PATH: &str = "/callback";
/// The supplier channel the baseline forwards to unless told otherwise.
pub const DEFAULT_CHANNEL: &str = "supplier-main";
/// The largest request body read (a create-order body is about 200 bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Forwards in flight at once: the gateway's per-channel bound times four, so that the
/// baseline is never the one that refuses first.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1_024;
/// Client connections served at once (beyond, new ones wait in the listen backlog).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4_096;
/// The whole upstream exchange, as the sandbox's channel request timeout.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(10);

/// The supplier protocol's acknowledgement of a callback.
const RECEIVED: &str = r#"{"received":true}"#;

/// How the proxy is set up.
#[derive(Debug, Clone)]
pub struct BaselineSettings {
    /// A loopback address (port 0: any free port, read back from [`BaselineProxy::local_addr`]).
    pub listen: SocketAddr,
    /// The supplier channel forwarded to (for messages).
    pub channel_id: String,
    /// Its `base_url`, without a trailing `/`.
    pub upstream_base_url: String,
    pub signer: Arc<SupplierSigner>,
    pub max_in_flight: usize,
    pub max_connections: usize,
    pub upstream_timeout: Duration,
}

impl BaselineSettings {
    /// Forwards to supplier channel `channel_id` of `manifest`, signing with its secret.
    pub fn from_manifest(
        manifest: &Manifest,
        channel_id: &str,
        listen: SocketAddr,
    ) -> Result<Self, Error> {
        manifest.check_loopback()?;
        let channel = manifest.supplier_channel(channel_id)?;
        let secret = manifest.supplier_secret(channel_id)?;
        let signer = SupplierSigner::new(&secret).ok_or_else(|| {
            Error::Settings(format!("the secret of channel {channel_id:?} is too short"))
        })?;
        Ok(Self {
            listen,
            channel_id: channel_id.to_owned(),
            upstream_base_url: channel.base_url.trim_end_matches('/').to_owned(),
            signer: Arc::new(signer),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
        })
    }

    fn validate(&self) -> Result<Uri, Error> {
        if !self.listen.ip().is_loopback() {
            return Err(Error::Settings(format!(
                "the baseline proxy signs whatever it receives: it listens on a loopback address only, not {}",
                self.listen
            )));
        }
        check_loopback_url(
            &format!("channels.{}.base_url", self.channel_id),
            &self.upstream_base_url,
        )?;
        if !(1..=100_000).contains(&self.max_in_flight) {
            return Err(Error::Settings("--max-in-flight must be 1..=100000".into()));
        }
        if !(1..=100_000).contains(&self.max_connections) {
            return Err(Error::Settings(
                "--max-connections must be 1..=100000".into(),
            ));
        }
        if self.upstream_timeout < Duration::from_millis(1) {
            return Err(Error::Settings("--timeout-ms must be at least 1".into()));
        }
        format!("{}{ORDERS_PATH}", self.upstream_base_url)
            .parse()
            .map_err(|_| Error::Settings(format!("bad base_url {:?}", self.upstream_base_url)))
    }
}

/// A running proxy. Dropping it stops it too (its tasks end when the handle is gone);
/// [`BaselineProxy::shutdown`] also waits for them.
#[derive(Debug)]
pub struct BaselineProxy {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl BaselineProxy {
    /// Binds the listener (before serving, so the address is known), then serves in the
    /// background on the current runtime.
    pub async fn start(settings: BaselineSettings) -> Result<Self, Error> {
        let orders_uri = settings.validate()?;
        let listener = TcpListener::bind(settings.listen).await.map_err(|e| {
            Error::Setup(format!(
                "the baseline proxy cannot listen on {}: {e}",
                settings.listen
            ))
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::Setup(format!("the baseline proxy's address: {e}")))?;
        let proxy = Arc::new(Proxy {
            orders_uri,
            signer: Arc::clone(&settings.signer),
            client: HttpClient::new(settings.max_in_flight, settings.upstream_timeout),
            in_flight: Semaphore::new(settings.max_in_flight),
        });
        let (shutdown, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, proxy, settings.max_connections, stopped));
        Ok(Self {
            local_addr,
            shutdown,
            task: Some(task),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://127.0.0.1:PORT`: what [`crate::Target::baseline`] takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Stops accepting, drops open connections, and waits for the serving task.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for BaselineProxy {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// What every connection shares.
struct Proxy {
    orders_uri: Uri,
    signer: Arc<SupplierSigner>,
    client: HttpClient,
    in_flight: Semaphore,
}

async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // Asked to stop, or the handle is gone (the guard `wait_for` returns is dropped
            // inside, so the loop's future stays `Send`).
            () = async { drop(shutdown.wait_for(|down| *down).await) } => break,
            accepted = listener.accept(), if connections.len() < max_connections => {
                match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(serve_connection(stream, Arc::clone(&proxy)));
                    }
                    Err(_) => tokio::time::sleep(ACCEPT_ERROR_PAUSE).await,
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(stream: TcpStream, proxy: Arc<Proxy>) {
    // Small answers on a keep-alive connection: Nagle would hold them back.
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let proxy = Arc::clone(&proxy);
        async move { Ok::<_, Infallible>(proxy.handle(request).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn json(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Proxy {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if request.method() == Method::POST && path == ORDERS_PATH {
            return self.forward(request).await;
        }
        if path == CALLBACK_PATH || path.starts_with("/callback/") {
            // Read (and drop) the body so the connection stays usable; its content is
            // not this proxy's business.
            let _ = Limited::new(request.into_body(), MAX_BODY_BYTES)
                .collect()
                .await;
            return json(StatusCode::OK, RECEIVED);
        }
        json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#)
    }

    async fn forward(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        // Fail fast when full, like the gateway's channel client: nothing is sent.
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"proxy_overloaded"}"#,
            );
        };
        let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return json(StatusCode::BAD_REQUEST, r#"{"error":"unreadable_body"}"#),
        };
        let signature = self.signer.header(unix_seconds(), &body);
        let upstream = Request::builder()
            .method(Method::POST)
            .uri(self.orders_uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(HEADER_NAME, signature)
            .body(Full::new(body))
            .expect("a request of valid parts");
        match self.client.send(upstream).await {
            Ok(answer) => {
                let mut response = Response::new(Full::new(answer.body));
                *response.status_mut() = answer.status;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                response
            }
            Err(SendError::Timeout) => json(
                StatusCode::GATEWAY_TIMEOUT,
                r#"{"error":"upstream_timeout"}"#,
            ),
            Err(SendError::Transport {
                kind: "connect", ..
            }) => json(StatusCode::BAD_GATEWAY, r#"{"error":"upstream_connect"}"#),
            Err(SendError::Transport { .. }) => {
                json(StatusCode::BAD_GATEWAY, r#"{"error":"upstream_io"}"#)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Secret;
    use crate::signing::SupplierSigner;

    const SECRET: &str = "loadtest-test-secret-0123456789";

    /// A stand-in supplier that answers with what it received: the signature header and the
    /// body, so the test sees exactly what the proxy forwarded.
    async fn echo_upstream() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|request: Request<Incoming>| async {
                        let path = request.uri().path().to_owned();
                        let signature = request
                            .headers()
                            .get("X-Signature")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let echo = serde_json::json!({
                            "path": path,
                            "signature": signature,
                            "body": String::from_utf8_lossy(&body),
                        });
                        let mut response = Response::new(Full::new(Bytes::from(echo.to_string())));
                        *response.status_mut() = StatusCode::CREATED;
                        Ok::<_, Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, task)
    }

    fn settings(upstream: SocketAddr) -> BaselineSettings {
        BaselineSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            channel_id: "supplier-main".into(),
            upstream_base_url: format!("http://{upstream}"),
            signer: Arc::new(SupplierSigner::new(&Secret::new(SECRET)).unwrap()),
            max_in_flight: 4,
            max_connections: 16,
            upstream_timeout: Duration::from_secs(5),
        }
    }

    async fn post(client: &HttpClient, url: String, body: &'static str) -> (u16, String) {
        let request = Request::builder()
            .method(Method::POST)
            .uri(url)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let answer = client.send(request).await.unwrap();
        (
            answer.status.as_u16(),
            String::from_utf8(answer.body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn orders_are_forwarded_byte_for_byte_and_signed() {
        let (upstream, upstream_task) = echo_upstream().await;
        let proxy = BaselineProxy::start(settings(upstream)).await.unwrap();
        let client = HttpClient::new(2, Duration::from_secs(5));
        let body = r#"{"order_id":"b-1","amount":"1.00"}"#;
        let before = unix_seconds();
        let (status, answer) = post(&client, format!("{}/v1/orders", proxy.url()), body).await;
        let after = unix_seconds();
        // The upstream's status and body come back unchanged.
        assert_eq!(status, 201, "{answer}");
        let echo: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(echo["path"], "/v1/orders");
        assert_eq!(echo["body"], body);
        // The signature is the supplier protocol's over "t.body", at the time of sending.
        let signature = echo["signature"].as_str().unwrap();
        let signer = SupplierSigner::new(&Secret::new(SECRET)).unwrap();
        assert!(
            (before..=after).any(|t| signer.header(t, body.as_bytes()) == signature),
            "{signature}"
        );
        // Callbacks are acknowledged as the supplier protocol expects; nothing else is served.
        let (status, answer) =
            post(&client, format!("{}/callback", proxy.url()), "{\"x\":1}").await;
        assert_eq!((status, answer.as_str()), (200, RECEIVED));
        let (status, _) = post(&client, format!("{}/v1/other", proxy.url()), "{}").await;
        assert_eq!(status, 404);

        proxy.shutdown().await;
        upstream_task.abort();
    }

    #[tokio::test]
    async fn an_unreachable_channel_is_a_502_and_nothing_else_breaks() {
        // A port that was free a moment ago: connection refused.
        let free = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = BaselineProxy::start(settings(free)).await.unwrap();
        let client = HttpClient::new(2, Duration::from_secs(5));
        let (status, answer) = post(&client, format!("{}/v1/orders", proxy.url()), "{}").await;
        assert_eq!(status, 502);
        assert_eq!(answer, r#"{"error":"upstream_connect"}"#);
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn it_listens_on_loopback_only() {
        let mut s = settings("127.0.0.1:9".parse().unwrap());
        s.listen = "0.0.0.0:0".parse().unwrap();
        let err = BaselineProxy::start(s).await.unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        let mut s = settings("127.0.0.1:9".parse().unwrap());
        s.upstream_base_url = "http://192.168.1.1:80".into();
        assert!(BaselineProxy::start(s).await.is_err());
    }
}
