//! `POST /v1/locations` and `POST /v1/locations/batch`: where devices report positions.

use super::error::{ApiError, ErrorBody};
use super::extract::JsonBody;
use super::AppState;
use crate::domain::field::deserialize_object_or_kind;
use crate::domain::{now_micros, validate_position, FieldError, Micros, Position, PositionInput};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// Most positions in one batch request.
pub const MAX_BATCH: usize = 1000;

/// `{"accepted":1}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub accepted: usize,
}

/// One position of a batch that was not accepted.
#[derive(Debug, Serialize, ToSchema)]
pub struct Rejected {
    /// Position of the entry in the request's `locations` list.
    pub index: usize,
    pub error: ErrorBody,
}

/// The answer to a batch: how many were accepted, and why the others were not.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchAccepted {
    pub accepted: usize,
    pub rejected: Vec<Rejected>,
}

/// One entry of a batch: a position object, or the JSON kind that came instead.
#[derive(Debug)]
pub struct BatchEntry(Result<PositionInput, &'static str>);

impl<'de> Deserialize<'de> for BatchEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_object_or_kind(d).map(BatchEntry)
    }
}

/// `{"locations":[...]}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchInput {
    #[schema(value_type = Vec<PositionInput>, min_items = 1, max_items = 1000)]
    pub locations: Option<Vec<BatchEntry>>,
}

/// One-line summary of a position's field errors.
pub(super) fn summary(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors
        .iter()
        .map(|e| format!("{} {}", e.field, e.message))
        .collect();
    parts.join("; ")
}

/// Report one position.
#[utoipa::path(
    post, path = "/v1/locations", tag = "locations",
    request_body = PositionInput,
    responses(
        (status = 202, description = "Accepted (an older timestamp than the driver's latest is kept out of the live state)", body = Accepted),
        (status = 400, description = "Not JSON", body = super::error::ErrorResponse),
        (status = 413, description = "Body over 1 MiB", body = super::error::ErrorResponse),
        (status = 415, description = "Not application/json", body = super::error::ErrorResponse),
        (status = 422, description = "Invalid fields, one detail per field", body = super::error::ErrorResponse),
        (status = 503, description = "The position log cannot take writes now (`store_unavailable`, with Retry-After); nothing was acknowledged", body = super::error::ErrorResponse),
    )
)]
pub async fn post_location(
    State(state): State<AppState>,
    JsonBody(input): JsonBody<PositionInput>,
) -> Result<Response, ApiError> {
    let received_at = now_micros();
    let position = validate_position(&input, received_at)
        .map_err(|errors| ApiError::validation(summary(&errors), errors))?;
    state.tracker.apply(vec![position], received_at).await?;
    Ok(accepted_one())
}

/// The answer to every accepted single position, built from static bytes: this is the hottest
/// response of the service and never varies.
fn accepted_one() -> Response {
    const BODY: &[u8] = br#"{"accepted":1}"#;
    let mut response = Response::new(Body::from(Bytes::from_static(BODY)));
    *response.status_mut() = StatusCode::ACCEPTED;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Report up to 1,000 positions at once; valid ones are applied, invalid ones listed by index.
#[utoipa::path(
    post, path = "/v1/locations/batch", tag = "locations",
    request_body = BatchInput,
    responses(
        (status = 202, description = "Valid positions accepted; the others listed with their errors", body = BatchAccepted),
        (status = 400, description = "Not JSON", body = super::error::ErrorResponse),
        (status = 413, description = "Body over 1 MiB", body = super::error::ErrorResponse),
        (status = 415, description = "Not application/json", body = super::error::ErrorResponse),
        (status = 422, description = "Empty, over 1,000 entries, or no valid entry", body = super::error::ErrorResponse),
        (status = 503, description = "The position log cannot take writes now (`store_unavailable`, with Retry-After); nothing was acknowledged", body = super::error::ErrorResponse),
    )
)]
pub async fn post_batch(
    State(state): State<AppState>,
    JsonBody(input): JsonBody<BatchInput>,
) -> Result<(StatusCode, Json<BatchAccepted>), ApiError> {
    let received_at = now_micros();
    let batch = check_batch(input, received_at)?;
    if batch.positions.is_empty() {
        return Err(ApiError::validation(
            "no valid position in the batch",
            batch.errors,
        ));
    }
    let accepted = batch.positions.len();
    state.tracker.apply(batch.positions, received_at).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchAccepted {
            accepted,
            rejected: batch.rejected,
        }),
    ))
}

/// A batch checked entry by entry (shared with the device WebSocket, `ingest`).
pub(super) struct CheckedBatch {
    pub positions: Vec<Position>,
    pub rejected: Vec<Rejected>,
    /// Every field error, named `locations[i].field`.
    pub errors: Vec<FieldError>,
}

/// Checks the batch's size (1 to [`MAX_BATCH`]), then every entry.
pub(super) fn check_batch(
    input: BatchInput,
    received_at: Micros,
) -> Result<CheckedBatch, ApiError> {
    let entries = input
        .locations
        .ok_or_else(|| ApiError::invalid_field("locations", "is required"))?;
    if entries.is_empty() || entries.len() > MAX_BATCH {
        return Err(ApiError::invalid_field(
            "locations",
            format!(
                "must hold 1 to {MAX_BATCH} positions, got {}",
                entries.len()
            ),
        ));
    }
    let mut positions: Vec<Position> = Vec::with_capacity(entries.len());
    let mut rejected = Vec::new();
    let mut all_errors = Vec::new();
    for (index, BatchEntry(entry)) in entries.into_iter().enumerate() {
        let checked = match entry {
            Ok(input) => validate_position(&input, received_at),
            Err(kind) => Err(vec![FieldError::new(
                "",
                format!("must be an object, got {kind}"),
            )]),
        };
        match checked {
            Ok(p) => positions.push(p),
            Err(errors) => {
                all_errors.extend(errors.iter().map(|e| {
                    let field = match e.field.as_str() {
                        "" => format!("locations[{index}]"),
                        f => format!("locations[{index}].{f}"),
                    };
                    FieldError::new(&field, e.message.clone())
                }));
                let error = ApiError::validation(summary(&errors), errors).body();
                rejected.push(Rejected { index, error });
            }
        }
    }
    Ok(CheckedBatch {
        positions,
        rejected,
        errors: all_errors,
    })
}
