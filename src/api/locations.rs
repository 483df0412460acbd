//! `POST /v1/locations` and `POST /v1/locations/batch`: where devices report positions.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::JsonBody;
use super::AppState;
use crate::domain::field::deserialize_object_or_kind;
use crate::domain::{now_micros, validate_position, FieldError, Micros, Position, PositionInput};
use crate::trust::keys::Principal;
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
    Caller(caller): Caller,
    JsonBody(input): JsonBody<PositionInput>,
) -> Result<Response, ApiError> {
    let received_at = now_micros();
    let position = validate_position(&input, received_at)
        .map_err(|errors| ApiError::validation(summary(&errors), errors))?;
    if let Some(position) = state
        .trust
        .admit_one(&caller, position, &state.tracker, received_at)
        .await?
    {
        state.tracker.apply(vec![position], received_at).await?;
    }
    state.trust.count_accepted(&caller.tenant, 1);
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
    Caller(caller): Caller,
    JsonBody(input): JsonBody<BatchInput>,
) -> Result<(StatusCode, Json<BatchAccepted>), ApiError> {
    let received_at = now_micros();
    let batch = check_batch(input, received_at)?;
    let (accepted, rejected) = admit_batch(&state, &caller, batch, received_at).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchAccepted { accepted, rejected }),
    ))
}

/// Runs a checked batch through the trust checks and applies what they admit; returns how many
/// were accepted and the rejections (validation and sanity filters) in index order. A batch with
/// nothing accepted is a 422 with every error.
pub(super) async fn admit_batch(
    state: &AppState,
    caller: &Principal,
    batch: CheckedBatch,
    received_at: Micros,
) -> Result<(usize, Vec<Rejected>), ApiError> {
    let CheckedBatch {
        positions,
        mut rejected,
        mut errors,
    } = batch;
    let admitted = state
        .trust
        .admit(caller, positions, &state.tracker, received_at)
        .await?;
    for (index, error) in admitted.rejected {
        errors.push(FieldError::new(
            &format!("locations[{index}].{}", error.field),
            error.message.clone(),
        ));
        let body = ApiError::fields(vec![error]).body();
        rejected.push(Rejected { index, error: body });
    }
    rejected.sort_by_key(|r| r.index);
    if admitted.accepted == 0 {
        return Err(ApiError::validation(
            "no valid position in the batch",
            errors,
        ));
    }
    if !admitted.positions.is_empty() {
        state.tracker.apply(admitted.positions, received_at).await?;
    }
    state
        .trust
        .count_accepted(&caller.tenant, admitted.accepted as u64);
    Ok((admitted.accepted, rejected))
}

/// Decodes and checks a `POST /v1/locations` body exactly as the endpoint does (depth limit, JSON,
/// field validation), without applying it: the entry point of the fuzz target and property tests.
pub fn decode_single(body: &[u8], received_at: Micros) -> Result<Position, ApiError> {
    super::extract::check_depth(body)?;
    let input: PositionInput = super::extract::decode_object(body)?;
    validate_position(&input, received_at)
        .map_err(|errors| ApiError::validation(summary(&errors), errors))
}

/// Decodes and checks a `POST /v1/locations/batch` body as the endpoint does (see
/// [`decode_single`]).
pub fn decode_batch(body: &[u8], received_at: Micros) -> Result<CheckedBatch, ApiError> {
    super::extract::check_depth(body)?;
    let input: BatchInput = super::extract::decode_object(body)?;
    check_batch(input, received_at)
}

/// A batch checked entry by entry (shared with the device WebSocket, `ingest`).
pub struct CheckedBatch {
    /// Valid entries with their index in the request.
    pub positions: Vec<(usize, Position)>,
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
    let mut positions: Vec<(usize, Position)> = Vec::with_capacity(entries.len());
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
            Ok(p) => positions.push((index, p)),
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

#[cfg(test)]
mod tests {
    //! Property tests of request decoding: no input, however broken, makes decoding panic, and
    //! whatever is accepted is a valid position.
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW: Micros = 1_790_000_000_000_000;

    /// Arbitrary JSON values, nested a little, with the field names our inputs use.
    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            Just(json!("2026-11-22T10:00:00Z")),
            Just(json!("online")),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            let key = prop_oneof![
                Just("driver_id".to_string()),
                Just("latitude".to_string()),
                Just("longitude".to_string()),
                Just("timestamp".to_string()),
                Just("status".to_string()),
                Just("speed_mps".to_string()),
                Just("heading_deg".to_string()),
                Just("accuracy_m".to_string()),
                Just("locations".to_string()),
                ".{0,8}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map(key, inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn assert_valid(p: &Position) {
        assert!((-90_000_000..=90_000_000).contains(&p.lat_e6));
        assert!((-180_000_000..=180_000_000).contains(&p.lon_e6));
        assert!(!p.driver_id.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_single(&body, NOW);
            let _ = decode_batch(&body, NOW);
        }

        #[test]
        fn arbitrary_json_is_decoded_or_refused_with_a_4xx(value in any_json()) {
            let body = serde_json::to_vec(&value).unwrap();
            match decode_single(&body, NOW) {
                Ok(p) => assert_valid(&p),
                Err(e) => prop_assert!(e.status().is_client_error(), "{e:?}"),
            }
            let batch = serde_json::to_vec(&json!({"locations": [value]})).unwrap();
            match decode_batch(&batch, NOW) {
                Ok(checked) => checked.positions.iter().for_each(|(_, p)| assert_valid(p)),
                Err(e) => prop_assert!(e.status().is_client_error(), "{e:?}"),
            }
        }

        #[test]
        fn near_valid_positions_are_decoded_or_refused(
            id in "[a-zA-Z0-9_-]{0,70}",
            lat in prop_oneof![-100.0f64..100.0, any::<f64>()],
            lon in prop_oneof![-200.0f64..200.0, any::<f64>()],
            status in prop_oneof![Just("online".to_string()), Just("busy".to_string()), ".{0,8}"],
            speed in proptest::option::of(any::<f64>()),
        ) {
            let body = json!({"driver_id": id, "latitude": lat, "longitude": lon,
                              "status": status, "speed_mps": speed});
            let bytes = serde_json::to_vec(&body).unwrap();
            match decode_single(&bytes, NOW) {
                Ok(p) => {
                    assert_valid(&p);
                    prop_assert_eq!(p.driver_id.as_str(), id.as_str());
                }
                Err(e) => prop_assert!(e.status().is_client_error()),
            }
        }
    }
}
