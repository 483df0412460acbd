//! Operations endpoints: `/health`, `/ready`, `/metrics`, `/v1/stats`, and the 404/405 fallbacks.

use super::auth::Caller;
use super::error::ApiError;
use super::AppState;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok` while the process runs; `ready` / `not_ready` on `/ready`.
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DriverCounts {
    pub online: u64,
    pub busy: u64,
    pub offline: u64,
    pub total: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatsResponse {
    /// Drivers currently tracked, by status.
    pub drivers: DriverCounts,
    /// Positions accepted since start-up.
    pub updates_total: u64,
}

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/health", tag = "ops",
    responses((status = 200, description = "The process is alive", body = HealthResponse)))]
pub async fn health() -> Json<HealthResponse> {
    Json(HealthResponse { status: "ok" })
}

/// Readiness: 200 when the service can serve, 503 while starting or draining.
#[utoipa::path(get, path = "/ready", tag = "ops",
    responses(
        (status = 200, description = "Ready to serve", body = HealthResponse),
        (status = 503, description = "Not ready (starting up, shutting down, or the shared live store does not answer)", body = super::error::ErrorResponse),
    ))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<HealthResponse>, ApiError> {
    match state.tracker.check_ready().await {
        Ok(()) => Ok(Json(HealthResponse { status: "ready" })),
        Err(why) => Err(ApiError::NotReady(format!(
            "the service is not ready to serve: {why}"
        ))),
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    // Without the live store (an outage) the driver gauges keep their last values.
    let counts = state.tracker.counts().await.ok();
    let text = state.tracker.metrics().render(counts);
    let mut response = text.into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Drivers by status and positions accepted so far.
#[utoipa::path(get, path = "/v1/stats", tag = "ops",
    responses((status = 200, description = "Counts", body = StatsResponse)))]
pub async fn stats(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Result<Json<StatsResponse>, ApiError> {
    // A tenant sees its own drivers and updates only; open mode sees everything.
    let (c, updates_total) = match crate::domain::tenant::prefix(&caller.tenant) {
        None => (state.tracker.counts().await?, state.tracker.updates_total()),
        Some(prefix) => (
            state.tracker.counts_in(&prefix).await?,
            state.trust.accepted(&caller.tenant),
        ),
    };
    Ok(Json(StatsResponse {
        drivers: DriverCounts {
            online: c.online,
            busy: c.busy,
            offline: c.offline,
            total: c.total(),
        },
        updates_total,
    }))
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no resource at {}", uri.path()))
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
