//! The one error type of the HTTP API and its JSON shape:
//! `{"error":{"code":"...","message":"...","details":[...]}}`. Codes are stable; clients branch on
//! them, never on messages.

use crate::domain::FieldError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    #[error("request body is larger than 1 MiB")]
    PayloadTooLarge,
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("{message}")]
    Validation {
        message: String,
        details: Vec<FieldError>,
    },
    #[error("{0}")]
    NotReady(String),
    /// A store the request needs (the log, history) cannot take it now; retry later.
    #[error("{0}")]
    StoreUnavailable(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    IdempotencyInFlight,
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn validation(message: impl Into<String>, details: Vec<FieldError>) -> ApiError {
        ApiError::Validation {
            message: message.into(),
            details,
        }
    }

    /// A validation error naming every bad field: the message joins them (`a must ...; b is ...`).
    pub fn fields(details: Vec<FieldError>) -> ApiError {
        let message = details
            .iter()
            .map(|e| format!("{} {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError::validation(message, details)
    }

    /// A validation error about one field.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> ApiError {
        let detail = FieldError::new(field, message);
        ApiError::validation(format!("{} {}", detail.field, detail.message), vec![detail])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotReady(_) | ApiError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::IdempotencyInFlight => StatusCode::CONFLICT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Validation { .. } => "validation_failed",
            ApiError::NotReady(_) => "not_ready",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::IdempotencyInFlight => "idempotency_key_in_flight",
            ApiError::Internal => "internal",
        }
    }

    /// The body's `error` object.
    pub fn body(&self) -> ErrorBody {
        let details = match self {
            ApiError::Validation { details, .. } if !details.is_empty() => Some(details.clone()),
            _ => None,
        };
        ErrorBody {
            code: self.code(),
            message: self.to_string(),
            details,
        }
    }
}

/// `{"code","message","details"?}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `validation_failed`.
    #[schema(value_type = String, example = "validation_failed")]
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// For validation errors: one entry per bad field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<FieldError>>,
}

/// The envelope every error response has.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

impl From<crate::tracker::TrackerError> for ApiError {
    fn from(e: crate::tracker::TrackerError) -> ApiError {
        use crate::tracker::TrackerError;
        match e {
            TrackerError::BadCursor(why) => ApiError::invalid_field("cursor", why),
            TrackerError::LogUnavailable(_)
            | TrackerError::HistoryDisabled
            | TrackerError::HistoryUnavailable(_)
            | TrackerError::LiveUnavailable(_) => ApiError::StoreUnavailable(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            ApiError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            ApiError::IdempotencyInFlight => Some(1),
            _ => None,
        };
        let unauthorized = matches!(self, ApiError::Unauthorized(_));
        let mut response = (status, Json(ErrorResponse { error: self.body() })).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(secs));
        }
        if unauthorized {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The client may still be trickling the body: end the connection with the answer.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}
