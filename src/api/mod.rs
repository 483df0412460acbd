//! The HTTP API: one file per resource, one error type ([`error::ApiError`]), extractors that map
//! every bad input to a 4xx, and the per-request observability layer. Nothing below this module
//! knows about HTTP.

pub mod anomalies;
pub mod auth;
pub mod cors;
pub mod docs;
pub mod drivers;
pub mod error;
pub mod extract;
pub mod ingest;
pub mod keys;
pub mod locations;
pub mod map;
pub mod observe;
pub mod ops;
mod socket;
pub mod stream;
pub mod track;
pub mod write_guard;

use crate::tracker::Tracker;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use tower::util::Either;
use tower_http::cors::{Cors, CorsLayer};
use utoipa_swagger_ui::SwaggerUi;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub tracker: Arc<Tracker>,
    pub trust: Arc<auth::Trust>,
}

/// The whole application behind its trust gate, ready to serve. The gate wraps the router once: a
/// route layer would be cloned and dropped with its route on every request.
pub type App = observe::Observe<Either<Cors<auth::Gate<Router>>, auth::Gate<Router>>>;

/// The whole application; `map` configures the live map page at `/`, `cors` cross-origin access
/// (see [`cors`]).
pub fn router_with(
    tracker: Arc<Tracker>,
    trust: Arc<auth::Trust>,
    map: map::MapSettings,
    cors: Option<CorsLayer>,
) -> App {
    let state = AppState { tracker, trust };
    let api = Router::new()
        .route("/v1/locations", post(locations::post_location))
        .route("/v1/locations/batch", post(locations::post_batch))
        .route("/v1/drivers/nearby", get(drivers::nearby))
        .route("/v1/drivers/{driver_id}", get(drivers::get_driver))
        .route("/v1/stream", get(stream::stream_ws))
        .route("/v1/stream/sse", get(stream::stream_sse))
        .route("/v1/ingest", get(ingest::ingest))
        .route("/v1/drivers/{driver_id}/track", get(track::track))
        .route("/v1/stats", get(ops::stats))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/v1/anomalies", get(anomalies::list))
        .route("/v1/keys", get(keys::list).post(keys::create))
        .route("/v1/keys/{key_id}", axum::routing::delete(keys::revoke))
        .with_state(state.clone());
    let router = Router::new()
        .merge(SwaggerUi::new("/docs").url("/openapi.json", docs::openapi()))
        .merge(api)
        .merge(map::routes(map))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed);
    let observe = observe::ObserveLayer {
        metrics: state.tracker.metrics().clone(),
    };
    let gated = tower::Layer::layer(&auth::TrustLayer { state }, router);
    let shared = tower::Layer::layer(&tower::util::option_layer(cors), gated);
    tower::Layer::layer(&observe, shared)
}
