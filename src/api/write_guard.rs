//! What a POST must pass before its handler runs: the device's request signature (when its key has
//! a signing secret) and the `Idempotency-Key` replay check.
//!
//! Both need the raw body, so this middleware buffers it (within the same size and time limits as
//! the JSON extractor) only when one of them applies, and hands the handler an identical body.
//!
//! Idempotency: a POST with `Idempotency-Key: <1–255 visible ASCII>` is fingerprinted (method, path,
//! body) under the caller's key. The first request runs and its answer (2xx, 400 and 422 only —
//! a 503 or 429 must stay retryable) is kept for 24 h; a retry with the same key and body gets that
//! answer again (`idempotent-replayed: true`) without applying anything twice; the same key with a
//! different request is 422 `idempotency_key_reused`; a retry while the first is still running is
//! 409 `idempotency_key_in_flight` with `Retry-After: 1`. The cache is in memory: a restart forgets
//! it (the position store's out-of-order rule and history's one-row-per-timestamp still make a
//! replayed position harmless).

use super::auth::verify_signature;
use super::error::ApiError;
use super::extract::read_body_of;
use super::AppState;
use crate::trust::idempotency::{fingerprint, is_storable, parse_key, Begin, StoredResponse};
use crate::trust::keys::Principal;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::time::Instant;
use tower::Service;

/// The request header naming a retry-safe POST.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header marking an answer replayed from the idempotency cache.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Largest answer kept for replay (ours are small JSON documents).
const MAX_STORED_BODY: usize = 256 * 1024;

pub async fn guard_writes<S>(
    state: &AppState,
    request: Request,
    mut next: S,
) -> Result<Response, ApiError>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    if request.method() != Method::POST {
        return Ok(run(&mut next, request).await);
    }
    let caller = request.extensions().get::<Principal>().cloned();
    let idempotency_key = match request.headers().get(&IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => Some(
            parse_key(value.as_bytes())
                .map_err(|_| {
                    ApiError::invalid_field(
                        "Idempotency-Key",
                        "must be 1 to 255 visible ASCII characters",
                    )
                })?
                .to_string(),
        ),
    };
    let signed = caller.as_ref().is_some_and(|c| c.signing_secret.is_some());
    if idempotency_key.is_none() && !signed {
        return Ok(run(&mut next, request).await);
    }
    let (parts, body) = request.into_parts();
    let bytes = read_body_of(body).await?;
    if let Some(caller) = &caller {
        verify_signature(&state.trust, caller, &parts.headers, &bytes)?;
    }
    let Some(key) = idempotency_key else {
        return Ok(run(&mut next, Request::from_parts(parts, Body::from(bytes))).await);
    };
    let scope = caller.as_ref().map_or("open", |c| c.key_id.as_str());
    let print = fingerprint(parts.method.as_str(), parts.uri.path(), &bytes);
    let cache = &state.trust.idempotency;
    let guard = match cache.begin(scope, &key, print, Instant::now()) {
        Begin::New(guard) => guard,
        Begin::Replay(stored) => return Ok(replay(&stored)),
        Begin::Mismatch => return Err(ApiError::IdempotencyKeyReused),
        Begin::InFlight => return Err(ApiError::IdempotencyInFlight),
    };
    let response = run(&mut next, Request::from_parts(parts, Body::from(bytes))).await;
    let status = response.status().as_u16();
    if !is_storable(status) {
        return Ok(response); // the guard drops: a retry may run again
    }
    let (head, body) = response.into_parts();
    let body = axum::body::to_bytes(body, MAX_STORED_BODY)
        .await
        .map_err(|_| ApiError::Internal)?;
    let headers = head
        .headers
        .iter()
        .filter(|(name, _)| name.as_str() == "content-type" || name.as_str() == "location")
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect();
    let stored = StoredResponse {
        status,
        headers,
        body: body.clone(),
    };
    cache.complete(guard, stored, Instant::now());
    Ok(Response::from_parts(head, Body::from(body)))
}

/// Calls the wrapped service (its errors are `Infallible`).
async fn run<S>(service: &mut S, request: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    match service.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

fn replay(stored: &StoredResponse) -> Response {
    let mut response = Response::new(Body::from(stored.body.clone()));
    *response.status_mut() =
        axum::http::StatusCode::from_u16(stored.status).unwrap_or(axum::http::StatusCode::OK);
    for (name, value) in &stored.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::try_from(name.as_str()),
            HeaderValue::from_bytes(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response.headers_mut().insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    response.into_response()
}
