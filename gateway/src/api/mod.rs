//! The HTTP surface: routes, authentication, request limits, the JSON error model.
//! Each route's handler reads top to bottom: parse and check at the edge, one store call,
//! map the outcome.

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod body;
pub mod callbacks;
pub mod error;
pub mod extract;
pub mod health;
pub mod payments;
pub mod refunds;
mod render;
pub mod server;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;

use crate::state::Core;
use crate::telemetry;
use auth::Authenticator;
use error::ApiError;

/// What every handler shares: the payment core, and what only the HTTP layer needs.
pub struct AppState {
    /// The payment core's shared state (the handlers reach it through `Deref`).
    pub core: Arc<Core>,
    pub auth: Authenticator,
    pub metrics: PrometheusHandle,
    /// Set on shutdown: `/readyz` turns not-ready so load balancers stop sending traffic.
    pub draining: AtomicBool,
    /// Bounds the requests served at once (`server.max_in_flight_requests`).
    in_flight: Semaphore,
}

impl std::ops::Deref for AppState {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

impl AppState {
    /// The HTTP layer around the payment core.
    pub fn new(core: Core) -> Self {
        Self {
            auth: Authenticator::new(&core.config),
            in_flight: Semaphore::new(core.config.settings.server.max_in_flight_requests),
            metrics: telemetry::prometheus(),
            draining: AtomicBool::new(false),
            core: Arc::new(core),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/accounts/{id}",
            put(accounts::put_account).get(accounts::get_account),
        )
        .route("/v1/accounts/{id}/topups", post(payments::create_topup))
        .route(
            "/v1/accounts/{id}/adjustments",
            post(accounts::post_adjustment),
        )
        .route(
            "/v1/payments",
            post(payments::create_payment).get(payments::find_payment),
        )
        .route("/v1/payments/{id}", get(payments::get_payment))
        .route("/v1/payments/{id}/cancel", post(payments::cancel_payment))
        .route("/v1/payments/{id}/refunds", post(refunds::create_refund))
        .route(body::CALLBACK_ROUTE, post(callbacks::receive))
        .route("/v1/admin/flagged", get(admin::flagged))
        .route("/v1/admin/channels", get(admin::channels))
        // Only the API is shed under load: health checks and scrapes must still answer.
        // Inside `body::read_whole` (a later layer wraps an earlier one): the permit is taken
        // once the body is read.
        .route_layer(middleware::from_fn_with_state(state.clone(), admit));
    Router::new()
        .merge(v1)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Every route and both fallbacks: no answer leaves an unread body behind.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            body::read_whole,
        ))
        .layer(middleware::from_fn(measure))
        .with_state(state)
}

/// Sheds load beyond `server.max_in_flight_requests` with an immediate 503 (never an unbounded
/// queue). Runs after `body::read_whole`: a request holds a permit only while it is served.
async fn admit(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    match state.in_flight.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            telemetry::request_shed();
            ApiError::Unavailable {
                reason: "overloaded",
                payment_id: None,
            }
            .into_response()
        }
    }
}

/// Records every request's route, method, status and latency.
async fn measure(request: Request, next: Next) -> Response {
    let started = Instant::now();
    // The matched pattern is shared (no copy of the string).
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = request.method().clone();
    let response = next.run(request).await;
    telemetry::http_request(
        route.as_ref().map_or("unmatched", MatchedPath::as_str),
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}
