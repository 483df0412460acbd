//! Per-request observability, as one tower layer around every route: the `X-Request-ID` (the
//! caller's, else a new one) on every response and in every log line of the request (a `request`
//! span), the `http_request_duration_seconds` histogram labelled by route *template*, and a panic
//! turned into a logged 500 JSON answer instead of a dropped connection.
//!
//! A hand-written layer rather than `axum::middleware::from_fn`: it runs on every request, and this
//! form costs one allocation instead of several.

use super::error::ApiError;
use crate::metrics::Metrics;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Route templates, so the metric's `route` label is a `&'static str` from a fixed set.
const ROUTES: &[&str] = &[
    "/v1/locations",
    "/v1/locations/batch",
    "/v1/drivers/nearby",
    "/v1/drivers/{driver_id}",
    "/v1/stream",
    "/v1/stream/sse",
    "/v1/ingest",
    "/v1/drivers/{driver_id}/track",
    "/v1/stats",
    "/v1/anomalies",
    "/v1/keys",
    "/v1/keys/{key_id}",
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/",
    "/docs/{*rest}",
    "/",
    "/map/app.js",
    "/map/style.css",
    "/map/config.json",
];

/// The route template a path falls under, matched like the router does (the layer runs outside
/// the router, before it has matched anything). Paths no route takes are `unmatched`.
fn route_label(path: &str) -> &'static str {
    if let Some(exact) = ROUTES.iter().find(|r| **r == path) {
        return exact;
    }
    let segment = |s: &str| !s.is_empty() && !s.contains('/');
    if let Some(rest) = path.strip_prefix("/v1/drivers/") {
        if segment(rest) {
            return "/v1/drivers/{driver_id}";
        }
        if rest.strip_suffix("/track").is_some_and(segment) {
            return "/v1/drivers/{driver_id}/track";
        }
    }
    if path.strip_prefix("/v1/keys/").is_some_and(segment) {
        return "/v1/keys/{key_id}";
    }
    if path.starts_with("/docs/") {
        return "/docs/{*rest}";
    }
    "unmatched"
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A caller's id is kept when it is short printable ASCII; anything else is replaced.
fn caller_request_id(value: Option<&HeaderValue>) -> Option<HeaderValue> {
    let value = value?;
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.as_bytes().iter().all(|b| b.is_ascii_graphic());
    ok.then(|| value.clone())
}

/// A new id: a per-process random prefix and a counter, unique without a random draw per request
/// and formatted without allocating a `String`.
fn new_request_id() -> HeaderValue {
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let prefix = *PREFIX.get_or_init(rand::random);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut text = [b'-'; 21]; // 8 hex digits, '-', 12 hex digits
    for i in 0..8 {
        text[i] = HEX[(prefix >> (28 - 4 * i)) as usize & 15];
    }
    for i in 0..12 {
        text[9 + i] = HEX[(n >> (44 - 4 * i)) as usize & 15];
    }
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Wraps every route in [`Observe`].
#[derive(Clone)]
pub struct ObserveLayer {
    pub metrics: Metrics,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B> Service<axum::http::Request<B>> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let request = request.map(axum::body::Body::new);
        let started = Instant::now();
        let id =
            caller_request_id(request.headers().get(&REQUEST_ID)).unwrap_or_else(new_request_id);
        let method = method_label(request.method());
        let route = route_label(request.uri().path());
        // Display (`%`), not Debug: Debug escapes the text char by char, measurably on this path.
        let span = tracing::info_span!("request", request_id = %id.to_str().unwrap_or(""));
        let handled = AssertUnwindSafe(self.inner.call(request)).catch_unwind();
        let metrics = self.metrics.clone();
        let observed = async move {
            let mut response = match handled.await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    tracing::error!(method, route, "handler panicked");
                    ApiError::Internal.into_response()
                }
            };
            let status = response.status();
            let code = status.as_u16();
            if status.is_server_error() {
                tracing::error!(method, route, status = code, "request failed");
            } else {
                tracing::debug!(method, route, status = code, "request done");
            }
            response.headers_mut().insert(REQUEST_ID.clone(), id);
            metrics.record_http(method, route, code, started.elapsed());
            Ok(response)
        };
        Box::pin(observed.instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_ids_are_kept_only_when_sane() {
        let ok = HeaderValue::from_static("abc-123");
        assert_eq!(caller_request_id(Some(&ok)), Some(ok));
        assert_eq!(
            caller_request_id(Some(&HeaderValue::from_static("has space"))),
            None
        );
        let long = HeaderValue::from_str(&"x".repeat(129)).unwrap();
        assert_eq!(caller_request_id(Some(&long)), None);
        assert_eq!(caller_request_id(None), None);
    }

    #[test]
    fn paths_fall_under_their_route_templates() {
        assert_eq!(route_label("/v1/locations"), "/v1/locations");
        assert_eq!(route_label("/v1/drivers/nearby"), "/v1/drivers/nearby");
        assert_eq!(route_label("/v1/drivers/d-7"), "/v1/drivers/{driver_id}");
        assert_eq!(
            route_label("/v1/drivers/d-7/track"),
            "/v1/drivers/{driver_id}/track"
        );
        assert_eq!(route_label("/v1/keys/abc"), "/v1/keys/{key_id}");
        assert_eq!(route_label("/docs/index.html"), "/docs/{*rest}");
        assert_eq!(route_label("/v1/drivers/"), "unmatched");
        assert_eq!(route_label("/v1/drivers/a/b"), "unmatched");
        assert_eq!(route_label("/nope"), "unmatched");
    }

    #[test]
    fn new_ids_differ() {
        assert_ne!(new_request_id(), new_request_id());
    }
}
