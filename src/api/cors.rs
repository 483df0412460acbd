//! Cross-origin access, for a browser app served from another origin than the API (a dispatch
//! screen on the fleet's own site calling FleetTracker directly). Off unless `--cors-origin` names
//! the origins allowed (or `*`): without it no CORS header is sent and browsers keep other origins
//! out, which is the safe default for an API that takes bearer keys.
//!
//! tower-http's layer answers preflights itself, before the trust gate (a preflight carries no
//! `Authorization`), and adds the headers to every other answer; the gate still checks the key of
//! the real request. Allowed: the methods the API has, the request headers clients send
//! (`Authorization`, `Content-Type`, `Idempotency-Key`, `X-Request-ID`, `X-Signature`,
//! `X-Signature-Timestamp`), and the response headers a client reads exposed (`X-Request-ID`, `Link`,
//! `Retry-After`, `Idempotent-Replayed`).

use super::observe::REQUEST_ID;
use super::write_guard::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use axum::http::{HeaderName, HeaderValue, Method};
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(3600);

/// The layer for `origins` (each `*` or `scheme://host[:port]`, already checked by the command
/// line), or `None` when there are none.
pub fn layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let header = HeaderName::from_static;
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
                IDEMPOTENCY_KEY.clone(),
                REQUEST_ID.clone(),
                header(crate::trust::signing::SIGNATURE_HEADER),
                header(crate::trust::signing::TIMESTAMP_HEADER),
            ])
            .expose_headers([
                REQUEST_ID.clone(),
                axum::http::header::LINK,
                axum::http::header::RETRY_AFTER,
                IDEMPOTENT_REPLAYED.clone(),
            ])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}
