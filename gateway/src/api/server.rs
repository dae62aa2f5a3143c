//! The HTTP/1.1 server: the accept loop and the life of each client connection.
//!
//! - **Connection cap**: at most `server.max_connections` connections are open at once. One
//!   more is answered `503 unavailable` (`reason: too_many_connections`, `Connection: close`)
//!   with a single non-blocking write and closed at once: never queued, never read from.
//!   Counted in `gateway_http_connections_refused_total`; `gateway_http_connections_open`
//!   is the gauge to alert on before the cap is reached.
//! - **Idle timeout**: a connection with no request under way (just accepted, or between
//!   keep-alive requests, including while the client does not read its last answer) is
//!   closed after `server.idle_timeout_ms` without a byte from the client.
//! - **Header-read timeout**: from the first byte of a request to the end of its headers at
//!   most `server.header_read_timeout_ms`; a client that trickles its headers is cut off.
//!   Both are watched here rather than by hyper's own `header_read_timeout`, whose clock
//!   starts when the connection becomes ready for a request, so it would make the idle and
//!   the header bound one number.
//! - **Body-read timeout** and the body limits are the request's concern, not the
//!   connection's: `api::body` reads every body completely before routing and admission.
//!
//! Timed-out connections are counted in `gateway_http_connection_timeouts_total{phase}` and
//! dropped (nothing is in flight on them by construction). A connection that ends after an
//! answer is closed with a bounded lingering close ([`linger`]), so an answer sent before the
//! client finished sending (`Connection: close`) is not destroyed by a reset. On shutdown the loop stops
//! accepting, every connection finishes its request in flight and closes (idle ones at once),
//! and the server's future completes when the last one has; the caller bounds that wait.

use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tower::Service;

use crate::api::error::ApiError;
use crate::config::ServerSettings;
use crate::telemetry;

/// The connection-level limits, from `server.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl ConnectionLimits {
    pub fn from_settings(settings: &ServerSettings) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(settings.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(settings.idle_timeout_ms),
            max_connections: settings.max_connections,
        }
    }
}

/// After an accept error that is not about one connection (out of file descriptors), wait
/// this long before accepting again rather than spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `shutdown` turns true (or its sender is dropped), then
/// waits for the open connections to finish their requests in flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    assert!(limits.max_connections >= 1, "validated at load");
    let open = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(err) if is_per_connection(&err) => continue,
            Err(err) => {
                tracing::warn!(error = %err, "accept failed; pausing before the next accept");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        // Small request/response pairs: never wait on Nagle's algorithm.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::warn!(error = %err, "cannot set TCP_NODELAY");
        }
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            telemetry::http_connection_opened();
            serve_connection(stream, app, limits, shutdown).await;
            telemetry::http_connection_closed();
            drop(permit);
        });
    }
    drop(listener);
    // Every open connection holds a permit until it is closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = open.acquire_many(all).await;
}

/// Errors of one connection that came and went before it was accepted: accept the next.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A connection over the cap: one non-blocking write of a `503` (a fresh socket's send buffer
/// takes it whole), then closed. Never read, never waited on.
fn refuse(stream: TcpStream) {
    telemetry::http_connection_refused();
    let error = ApiError::Unavailable {
        reason: "too_many_connections",
        payment_id: None,
    };
    let body = error.body().to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

/// Serves one connection until the client closes it, a timeout cuts it off, or shutdown has
/// let its request in flight finish.
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let in_flight = tracked.request_started();
        let mut app = app.clone();
        // Boxed so the connection is `Unpin` and its socket can be taken back at the end.
        Box::pin(async move {
            // The router is always ready (axum); its error type is `Infallible`.
            let response = app.call(request.map(Body::new)).await;
            drop(in_flight);
            response
        })
    });
    let mut builder = http1::Builder::new();
    // Ours below: hyper's would count idle time as header-reading time.
    builder.header_read_timeout(None).keep_alive(true);
    let mut connection = builder.serve_connection(io, service);
    let mut expired = pin!(activity.expired(limits));
    let mut draining = false;
    loop {
        let event = tokio::select! {
            result = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
                Event::Done(result)
            }
            phase = expired.as_mut() => Event::Expired(phase),
            _ = shutdown.wait_for(|stop| *stop), if !draining => Event::Drain,
        };
        match event {
            Event::Done(result) => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                let stream = connection.into_parts().io.into_inner().inner;
                linger(stream).await;
                return;
            }
            Event::Expired(phase) => {
                tracing::debug!(phase = phase.label(), "connection timed out");
                telemetry::http_connection_timeout(phase.label());
                return;
            }
            Event::Drain => {
                draining = true;
                // Idle: closes now; a request in flight: finishes, answers `Connection: close`.
                Pin::new(&mut connection).graceful_shutdown();
            }
        }
    }
}

enum Event {
    Done(hyper::Result<()>),
    Expired(Phase),
    Drain,
}

/// After the last answer on a connection, at most this long and this many bytes are read and
/// dropped before the socket is closed.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 1 << 20;

/// Closes a connection whose last answer may have come before the client finished sending
/// (a body refused from its `Content-Length`, `Connection: close`): closing a socket with
/// unread input makes the kernel send a reset, which can destroy the answer before the client
/// reads it. So: send FIN, then read and drop what still arrives until the client closes,
/// bounded in time and bytes (nginx's lingering close). A client that already closed costs
/// one read.
async fn linger(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if stream.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 8 * 1024];
        let mut dropped = 0;
        while dropped < LINGER_MAX_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => dropped += n,
            }
        }
    })
    .await;
}

/// Which bound a connection overran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Header,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Header => "header",
        }
    }
}

/// What a connection is doing, as its reads and its requests show. One connection's I/O, its
/// requests and its watchdog are all polled by that connection's task: the atomics are for
/// `Send`, not for contention.
struct Activity {
    origin: Instant,
    /// Requests whose headers were read and whose answer is not produced yet.
    in_flight: AtomicUsize,
    /// Milliseconds since `origin` when the connection last became idle.
    idle_since_ms: AtomicU64,
    /// Milliseconds since `origin` of the first byte read while idle ([`NONE`]: none yet).
    head_since_ms: AtomicU64,
    /// Wakes the watchdog when its deadline may have moved earlier.
    changed: Notify,
}

const NONE: u64 = u64::MAX;

/// A request under way: the connection is not idle until it is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since_ms
            .store(activity.now_ms(), Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        activity.changed.notify_one();
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(NONE),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// hyper has read a request's headers and calls the service.
    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since_ms.store(NONE, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Bytes arrived from the client.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == NONE
        {
            // The first byte of the next request's headers: the header clock starts.
            self.head_since_ms.store(self.now_ms(), Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    /// The deadline that applies now, if any.
    fn deadline(&self, limits: ConnectionLimits) -> Option<(Instant, Phase)> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let at = |ms: u64, limit: Duration| self.origin + Duration::from_millis(ms) + limit;
        Some(match self.head_since_ms.load(Ordering::Relaxed) {
            NONE => (
                at(
                    self.idle_since_ms.load(Ordering::Relaxed),
                    limits.idle_timeout,
                ),
                Phase::Idle,
            ),
            since => (at(since, limits.header_read_timeout), Phase::Header),
        })
    }

    /// Completes when the connection has overrun the bound of what it is doing.
    async fn expired(&self, limits: ConnectionLimits) -> Phase {
        loop {
            // Created before the state is read: a change in between leaves a permit.
            let changed = self.changed.notified();
            match self.deadline(limits) {
                None => changed.await,
                Some((at, phase)) => {
                    if Instant::now() >= at {
                        return phase;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = changed => {}
                    }
                }
            }
        }
    }
}

/// The client's socket, reporting every read to the connection's [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(1_000),
            max_connections: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_the_idle_timeout() {
        let activity = Activity::new();
        let started = Instant::now();
        assert_eq!(activity.expired(limits()).await, Phase::Idle);
        assert_eq!(started.elapsed(), Duration::from_millis(1_000));
    }

    #[tokio::test(start_paused = true)]
    async fn the_header_clock_starts_at_the_first_byte_and_stops_at_the_request() {
        let activity = Arc::new(Activity::new());
        tokio::time::advance(Duration::from_millis(500)).await;
        activity.bytes_read();
        let started = Instant::now();
        assert_eq!(activity.expired(limits()).await, Phase::Header);
        assert_eq!(started.elapsed(), Duration::from_millis(100));

        // Headers complete: no bound while the request is served (its body has its own).
        let in_flight = activity.request_started();
        assert_eq!(activity.deadline(limits()), None);
        activity.bytes_read();
        assert_eq!(activity.deadline(limits()), None);
        tokio::time::advance(Duration::from_millis(5_000)).await;
        drop(in_flight);
        // Answered: idle again, from now.
        let idle_from = Instant::now();
        assert_eq!(
            activity.deadline(limits()),
            Some((idle_from + Duration::from_millis(1_000), Phase::Idle))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_byte_moves_the_deadline_earlier_and_wakes_the_watchdog() {
        let activity = Arc::new(Activity::new());
        let origin = Instant::now();
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move { (activity.expired(limits()).await, Instant::now()) }
        });
        // The watchdog is asleep until the idle deadline (1 s) when the first byte comes.
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(10)).await;
        activity.bytes_read();
        let (phase, at) = watchdog.await.unwrap();
        assert_eq!(phase, Phase::Header);
        assert_eq!(at - origin, Duration::from_millis(110));
    }
}
