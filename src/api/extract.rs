//! Request extractors that turn every kind of bad input into an [`ApiError`] with the right code:
//! wrong media type (415), too large (413), not JSON at all (400), JSON of the wrong shape (422).

use super::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long a request body may take to arrive, in milliseconds (`--body-timeout`); process-wide
/// because it is set once at start-up and read on every body.
static BODY_TIMEOUT_MS: AtomicU64 = AtomicU64::new(10_000);

/// Sets the body timeout (at start-up).
pub fn set_body_timeout(timeout: Duration) {
    BODY_TIMEOUT_MS.store(timeout.as_millis() as u64, Ordering::Relaxed);
}

fn body_timeout() -> Duration {
    Duration::from_millis(BODY_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// A JSON request body decoded as `T`.
pub struct JsonBody<T>(pub T);

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        return true;
    }
    let mime = mime.to_ascii_lowercase();
    mime.starts_with("application/") && mime.ends_with("+json")
}

/// Maps a serde_json error to 400 (not JSON) or 422 (JSON, but not the expected shape). Decoding
/// stops at the first error, so a shape error may come before a syntax error further on; the body is
/// then checked for syntax alone (only on this error path) so that broken JSON is always a 400.
pub fn json_error(e: serde_json::Error, body: &[u8]) -> ApiError {
    use serde_json::error::Category;
    let syntax = match e.classify() {
        Category::Data => match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => {
                return ApiError::validation(
                    format!("request body has the wrong shape: {e}"),
                    vec![],
                )
            }
            Err(syntax) => syntax,
        },
        Category::Syntax | Category::Eof | Category::Io => e,
    };
    ApiError::MalformedJson(format!("request body is not valid JSON: {syntax}"))
}

/// Decodes a JSON object (every body and message the API takes is one) as `T`. A valid document that
/// is not an object is refused saying what it is: serde would otherwise read an array as the
/// struct's fields in order (`["a", 1, 2]` as a position) or answer in words about our types.
pub fn decode_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if let Some(kind) = not_an_object(body) {
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
            return Err(ApiError::validation(
                format!("request body must be a JSON object, got {kind}"),
                vec![],
            ));
        }
    }
    serde_json::from_slice(body).map_err(|e| json_error(e, body))
}

/// What a document that does not start with `{` is, if it is valid JSON at all.
fn not_an_object(body: &[u8]) -> Option<&'static str> {
    match body.iter().find(|b| !b.is_ascii_whitespace())? {
        b'{' => None,
        b'[' => Some("an array"),
        b'"' => Some("a string"),
        b't' | b'f' => Some("a boolean"),
        b'n' => Some("null"),
        _ => Some("a number"),
    }
}

/// Deepest JSON nesting accepted. Our documents are at most a few levels deep; a limit far below
/// the parser's own keeps unknown fields (which are skipped, not parsed into values) from being a
/// way to make the server walk arbitrarily deep structures.
pub const MAX_JSON_DEPTH: usize = 32;

/// Refuses JSON nested deeper than [`MAX_JSON_DEPTH`] with a 400, in one pass over the bytes
/// (brackets inside strings do not count).
pub fn check_depth(body: &[u8]) -> Result<(), ApiError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(ApiError::MalformedJson(format!(
                        "JSON is nested deeper than {MAX_JSON_DEPTH} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Reads the whole body, refusing more than [`MAX_BODY_BYTES`] (checked while reading, so a large
/// or endless body is cut off without being buffered) or a body still arriving after the body
/// timeout (a client trickling bytes to hold the request open).
pub async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    read_body_of(req.into_body()).await
}

/// [`read_body`] of a body taken out of its request.
pub async fn read_body_of(body: axum::body::Body) -> Result<Bytes, ApiError> {
    let limit = body_timeout();
    let mut read = std::pin::pin!(axum::body::to_bytes(body, MAX_BODY_BYTES));
    // Usually the body came with the head: only a body still arriving gets a timer.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
    let result = match first {
        std::task::Poll::Ready(result) => result,
        std::task::Poll::Pending => tokio::time::timeout(limit, read)
            .await
            .map_err(|_| ApiError::RequestTimeout(limit))?,
    };
    result.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::PayloadTooLarge
        } else {
            ApiError::MalformedJson(format!("could not read the request body: {e}"))
        }
    })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = read_body(req).await?;
        check_depth(&bytes)?;
        decode_object(&bytes).map(JsonBody)
    }
}

/// The raw query string decoded as `T` (whose fields are usually `Option<String>`, checked by the
/// handler so that each bad parameter is named).
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(query)
            .map(QueryParams)
            .map_err(|e| ApiError::validation(format!("invalid query string: {e}"), vec![]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_type(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn nesting_depth_is_limited_outside_strings() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(check_depth(deep(MAX_JSON_DEPTH).as_bytes()).is_ok());
        assert!(check_depth(deep(MAX_JSON_DEPTH + 1).as_bytes()).is_err());
        let in_string = format!(r#"{{"a":"{}\"{}"}}"#, "[".repeat(100), "{".repeat(100));
        assert!(check_depth(in_string.as_bytes()).is_ok());
        assert!(check_depth(br#"{"a":[{"b":{"c":[1,2]}}]}"#).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn depth_check_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = check_depth(&bytes);
        }
    }

    #[test]
    fn json_media_types() {
        assert!(is_json(&with_type("application/json")));
        assert!(is_json(&with_type("Application/JSON; charset=utf-8")));
        assert!(is_json(&with_type("application/vnd.fleet+json")));
        assert!(!is_json(&with_type("text/plain")));
        assert!(!is_json(&with_type("application/x-www-form-urlencoded")));
        assert!(!is_json(&with_type("+json")));
        assert!(!is_json(&HeaderMap::new()));
    }
}
