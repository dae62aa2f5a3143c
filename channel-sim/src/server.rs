//! Starting and stopping the simulator: one listener per channel (so an outage is a real
//! "connection refused"), the admin API, the fault layer in front of every channel, and the
//! handle tests and the gateway hold.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::channel::{lock, Channel, PayOutcome, Runtime};
use crate::config::{ChannelKind, Faults, SimConfig};
use crate::record::OrderRecord;
use crate::{alipay, supplier, wechatpay, SimError};

/// The largest request body a channel or the admin API reads.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long re-listening after an outage keeps trying when the port is briefly taken.
const REBIND_ATTEMPTS: u32 = 100;
const REBIND_PAUSE_MS: u64 = 20;

/// The simulator.
pub struct Sim;

impl Sim {
    /// Binds every listener (before serving, so the addresses are known), then serves in the
    /// background until [`SimHandle::shutdown`].
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        config.callbacks.validate().map_err(SimError::Config)?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        let runtime = Arc::new(Runtime {
            shutdown: shutdown_rx.clone(),
            client,
            policy: config.callbacks.clone(),
            max_orders: config.max_orders_per_channel,
        });
        let mut saved = match &config.orders_file {
            Some(path) => crate::persist::load(path)?,
            None => BTreeMap::new(),
        };
        let mut channels: BTreeMap<String, Arc<Channel>> = BTreeMap::new();
        let mut listeners = Vec::new();
        for spec in &config.channels {
            if channels.contains_key(&spec.id) {
                return Err(SimError::Config(format!(
                    "channel `{}` appears twice",
                    spec.id
                )));
            }
            let channel = Arc::new(Channel::new(spec, Arc::clone(&runtime))?);
            let addr = spec
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| SimError::Bind { addr, source })?;
            if let Some(orders) = saved.remove(&spec.id) {
                channel.restore(orders);
            }
            listeners.push((Arc::clone(&channel), listener));
            channels.insert(spec.id.clone(), channel);
        }
        let admin_addr = config
            .admin_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let admin_listener =
            TcpListener::bind(admin_addr)
                .await
                .map_err(|source| SimError::Bind {
                    addr: admin_addr,
                    source,
                })?;
        let channels = Arc::new(channels);
        let mut urls = BTreeMap::new();
        let mut tasks = JoinSet::new();
        for (channel, listener) in listeners {
            let addr = listener.local_addr().map_err(|source| SimError::Bind {
                addr: admin_addr,
                source,
            })?;
            urls.insert(channel.id.clone(), format!("http://{addr}"));
            let router = channel_router(Arc::clone(&channel));
            tasks.spawn(serve_channel(
                channel,
                listener,
                addr,
                router,
                shutdown_rx.clone(),
            ));
        }
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| SimError::Bind {
                addr: admin_addr,
                source,
            })?;
        if let Some(path) = config.orders_file.clone() {
            tasks.spawn(crate::persist::keep(
                path,
                Arc::clone(&channels),
                config.orders_save_interval_ms.max(1),
                shutdown_rx.clone(),
            ));
        }
        tasks.spawn(serve_admin(
            admin_listener,
            admin_router(Arc::clone(&channels)),
            shutdown_rx,
        ));
        tracing::info!(admin = %admin_addr, channels = ?urls, "channel-sim listening");
        Ok(SimHandle {
            channels,
            urls,
            admin_url: format!("http://{admin_addr}"),
            shutdown: shutdown_tx,
            tasks,
        })
    }
}

/// A running simulator. Dropping it without [`SimHandle::shutdown`] leaves its tasks
/// running until the runtime ends.
pub struct SimHandle {
    channels: Arc<BTreeMap<String, Arc<Channel>>>,
    urls: BTreeMap<String, String>,
    admin_url: String,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl SimHandle {
    /// `http://127.0.0.1:PORT` of a channel (what the gateway's `base_url` points at).
    pub fn channel_url(&self, channel_id: &str) -> Option<&str> {
        self.urls.get(channel_id).map(String::as_str)
    }

    /// Every channel's base URL, by id.
    pub fn channel_urls(&self) -> &BTreeMap<String, String> {
        &self.urls
    }

    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Every order of a channel, oldest first (`None`: no such channel).
    pub fn orders(&self, channel_id: &str) -> Option<Vec<OrderRecord>> {
        self.channels.get(channel_id).map(|c| c.order_list())
    }

    /// One order, looked up by its channel order id across channels.
    pub fn order(&self, channel_order_id: &str) -> Option<OrderRecord> {
        self.channels
            .values()
            .find_map(|c| c.order(channel_order_id))
    }

    /// The customer pays the order (as `POST {admin}/orders/{id}/pay`).
    pub fn pay(&self, channel_order_id: &str) -> PayOutcome {
        find_and_pay(&self.channels, channel_order_id)
    }

    pub fn faults(&self, channel_id: &str) -> Option<Faults> {
        self.channels.get(channel_id).map(|c| c.faults())
    }

    /// Replaces a channel's faults at run time.
    pub fn set_faults(&self, channel_id: &str, faults: Faults) -> Result<(), SimError> {
        let channel = self
            .channels
            .get(channel_id)
            .ok_or_else(|| SimError::Config(format!("no channel `{channel_id}`")))?;
        channel.set_faults(faults).map_err(SimError::Config)
    }

    /// Stops every listener, drops open connections and pending callbacks, and waits for
    /// the serving tasks to end.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

fn find_and_pay(channels: &BTreeMap<String, Arc<Channel>>, channel_order_id: &str) -> PayOutcome {
    for channel in channels.values() {
        if channel.orders().by_id.contains_key(channel_order_id) {
            return channel.pay(channel_order_id);
        }
    }
    PayOutcome::NotFound
}

fn channel_router(channel: Arc<Channel>) -> Router {
    let router = match channel.kind {
        ChannelKind::Alipay => alipay::router(Arc::clone(&channel)),
        ChannelKind::Wechatpay => wechatpay::router(Arc::clone(&channel)),
        ChannelKind::Supplier => supplier::router(Arc::clone(&channel)),
    };
    router
        .layer(middleware::from_fn_with_state(channel, fault_layer))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Latency, jitter, hang and error rate, in front of every channel request.
async fn fault_layer(
    State(channel): State<Arc<Channel>>,
    request: Request,
    next: Next,
) -> Response {
    let faults = channel.faults();
    if faults.hang {
        // Never answer; the connection task is aborted at outage or shutdown.
        std::future::pending::<()>().await;
    }
    let (delay_ms, fail) = {
        let mut rng = lock(&channel.rng);
        let delay = faults.latency_ms + rng.up_to(faults.jitter_ms);
        (delay, rng.chance_per_million(faults.error_per_million()))
    };
    if delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
    if fail {
        return match channel.kind {
            ChannelKind::Alipay => alipay::server_error(),
            ChannelKind::Wechatpay => wechatpay::server_error(),
            ChannelKind::Supplier => supplier::server_error(),
        };
    }
    next.run(request).await
}

/// Serves one connection with `router`.
async fn serve_connection(stream: tokio::net::TcpStream, router: Router) {
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut router = router.clone();
            async move {
                let response =
                    tower::Service::call(&mut router, request.map(axum::body::Body::new))
                        .await
                        .unwrap_or_else(|never: Infallible| match never {});
                Ok::<_, Infallible>(response)
            }
        });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Accepts connections for a channel until shutdown; during an outage the listener is
/// closed (connections refused) and open connections are dropped.
async fn serve_channel(
    channel: Arc<Channel>,
    listener: TcpListener,
    addr: SocketAddr,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut faults = channel.faults.subscribe();
    let mut listener = Some(listener);
    let mut connections = JoinSet::new();
    loop {
        let outage = faults.borrow_and_update().outage;
        if outage && listener.is_some() {
            listener = None;
            connections.abort_all();
            tracing::info!(channel = %channel.id, "outage: not listening");
        }
        if !outage && listener.is_none() {
            listener = rebind(addr).await;
            if listener.is_none() {
                tracing::error!(channel = %channel.id, %addr, "cannot listen again after the outage");
                return;
            }
            tracing::info!(channel = %channel.id, "outage over: listening");
        }
        tokio::select! {
            _ = shutdown.wait_for(|down| *down) => break,
            changed = faults.changed() => if changed.is_err() { break },
            accepted = accept(listener.as_ref()) => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(serve_connection(stream, router.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn accept(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    for _ in 0..REBIND_ATTEMPTS {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return Some(listener);
        }
        tokio::time::sleep(Duration::from_millis(REBIND_PAUSE_MS)).await;
    }
    None
}

async fn serve_admin(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|down| *down) => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(serve_connection(stream, router.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

type Channels = Arc<BTreeMap<String, Arc<Channel>>>;

fn admin_router(channels: Channels) -> Router {
    Router::new()
        .route("/channels", get(admin_channels))
        .route("/channels/{id}/orders", get(admin_orders))
        .route(
            "/channels/{id}/faults",
            get(admin_faults).put(admin_set_faults),
        )
        .route("/orders/{channel_order_id}", get(admin_order))
        .route("/orders/{channel_order_id}/pay", post(admin_pay))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(channels)
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no such {what}")})),
    )
        .into_response()
}

async fn admin_channels(State(channels): State<Channels>) -> Response {
    let list: Vec<_> = channels
        .values()
        .map(|c| json!({"id": c.id, "kind": c.kind, "faults": c.faults()}))
        .collect();
    Json(list).into_response()
}

async fn admin_orders(State(channels): State<Channels>, Path(id): Path<String>) -> Response {
    match channels.get(&id) {
        Some(channel) => Json(channel.order_list()).into_response(),
        None => not_found("channel"),
    }
}

async fn admin_faults(State(channels): State<Channels>, Path(id): Path<String>) -> Response {
    match channels.get(&id) {
        Some(channel) => Json(channel.faults()).into_response(),
        None => not_found("channel"),
    }
}

async fn admin_set_faults(
    State(channels): State<Channels>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(channel) = channels.get(&id) else {
        return not_found("channel");
    };
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(faults) => faults,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("invalid faults: {e}")})),
            )
                .into_response()
        }
    };
    match channel.set_faults(faults) {
        Ok(()) => Json(channel.faults()).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    }
}

async fn admin_order(
    State(channels): State<Channels>,
    Path(channel_order_id): Path<String>,
) -> Response {
    match channels.values().find_map(|c| c.order(&channel_order_id)) {
        Some(order) => Json(order).into_response(),
        None => not_found("order"),
    }
}

async fn admin_pay(
    State(channels): State<Channels>,
    Path(channel_order_id): Path<String>,
) -> Response {
    match find_and_pay(&channels, &channel_order_id) {
        PayOutcome::Paid(order) => Json(json!({"outcome": "paid", "order": order})).into_response(),
        PayOutcome::AlreadyPaid(order) => {
            Json(json!({"outcome": "already_paid", "order": order})).into_response()
        }
        PayOutcome::Closed(order) => (
            StatusCode::CONFLICT,
            Json(json!({"outcome": "closed", "order": order})),
        )
            .into_response(),
        PayOutcome::NotFound => not_found("order"),
    }
}
