//! Request extractors that turn every kind of bad input into an [`ApiError`] with the right code:
//! wrong media type (415), too large (413), not JSON at all (400), JSON of the wrong shape (422).

use super::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use serde::de::DeserializeOwned;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

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

/// Reads the whole body, refusing more than [`MAX_BODY_BYTES`] (checked while reading, so a large
/// or endless body is cut off without being buffered).
async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|e| {
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
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| json_error(e, &bytes))
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
