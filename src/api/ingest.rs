//! `GET /v1/ingest`: positions from devices that keep one WebSocket open instead of making a
//! request per report.
//!
//! Each text message is one position, or `{"locations":[...]}` (1 to 1,000), checked exactly like
//! `POST /v1/locations` and `/v1/locations/batch` (the same code). Every message gets an answer,
//! in order: `{"type":"ack","accepted":N,"rejected":[{"index","error"}]}` when it was a position or
//! a batch (an invalid single position is `rejected` at index 0), or `{"type":"error","error":
//! {...}}` with the HTTP API's codes (`malformed_json`, `validation_failed`) when it was not one.
//! An error keeps the connection open; more than 10 of them within 10 s close it (1008, "too
//! many invalid messages"). A message over 1 MiB closes it (1009), as such a body is a 413 over
//! HTTP.
//!
//! A device key with a signing secret ([`crate::trust::signing`]) signs the upgrade request, as a
//! write with an empty body: WebSocket messages carry no headers, so the connection is what is
//! signed, and a leaked bearer token alone cannot open one.

use super::auth::{verify_signature, Caller};
use super::error::ApiError;
use super::extract::{decode_object, MAX_BODY_BYTES};
use super::locations::{check_batch, summary, BatchInput, Rejected};
use super::socket::{self, ErrorMessage, Strikes};
use super::AppState;
use crate::domain::{now_micros, validate_position, PositionInput};
use crate::hub::{CloseReason, IngestResult};
use crate::trust::keys::Principal;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::time::Instant;
use utoipa::ToSchema;

/// The answer to a position or a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct IngestAck {
    /// Always `ack`.
    #[serde(rename = "type")]
    #[schema(example = "ack")]
    pub kind: &'static str,
    pub accepted: usize,
    pub rejected: Vec<Rejected>,
}

/// Report positions over one WebSocket.
#[utoipa::path(
    get, path = "/v1/ingest", tag = "locations",
    description = "Upgrades to a WebSocket. Each text message is one position (as `POST /v1/locations`) or \
        `{\"locations\":[...]}` (as `POST /v1/locations/batch`). Each is answered, in order, with \
        `{\"type\":\"ack\",\"accepted\":N,\"rejected\":[{\"index\",\"error\"}]}`, or with \
        `{\"type\":\"error\",\"error\":{\"code\",\"message\",\"details\"}}` when the message is not JSON \
        (`malformed_json`) or not a position or a batch (`validation_failed`). Errors keep the connection open; \
        more than 10 within 10 s close it with code 1008. A message over 1 MiB closes it with 1009; a draining \
        server closes it with 1001. A device key created with a signing secret must sign the upgrade request \
        (`X-Signature-Timestamp`, `X-Signature` over `\"{timestamp}.\"`, the empty body): the messages of a \
        connection opened that way count as signed.",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 401, description = "No valid key, or the key's signature is missing or wrong", body = super::error::ErrorResponse),
        (status = 426, description = "Not a WebSocket upgrade request", body = super::error::ErrorResponse),
        (status = 503, description = "The service is draining", body = super::error::ErrorResponse),
    )
)]
pub async fn ingest(
    State(state): State<AppState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Messages carry no headers: a key that signs its writes signs the connection instead, or a
    // stolen bearer token alone could report positions over this socket.
    if let Err(unsigned) = verify_signature(&state.trust, &caller, &headers, b"") {
        return unsigned.into_response();
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return socket::upgrade_required(
                rejection,
                "; POST /v1/locations takes one request per report",
            )
        }
    };
    if !state.tracker.hub().is_accepting() {
        return ApiError::NotReady("the service is not accepting connections now".into())
            .into_response();
    }
    let hub = state.tracker.hub().clone();
    socket::configure(upgrade, MAX_BODY_BYTES)
        .on_upgrade(move |socket| hub.track(run(socket, state, caller)))
}

async fn run(mut socket: WebSocket, state: AppState, caller: Principal) {
    let tracker = state.tracker.clone();
    let metrics = tracker.hub().metrics().clone();
    let closing = tracker.hub().closing();
    metrics.ingest_opened();
    let mut strikes = Strikes::default();
    let (reason, frame) = loop {
        let incoming = tokio::select! {
            incoming = socket.recv() => incoming,
            _ = closing.cancelled() => {
                break (CloseReason::Shutdown, Some(socket::close_frame(CloseReason::Shutdown)));
            }
        };
        let answer = match incoming {
            None | Some(Ok(Message::Close(_))) => break (CloseReason::Client, None),
            Some(Err(e)) => break socket::read_failure(e, MAX_BODY_BYTES),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Binary(_))) => Err(ApiError::MalformedJson(
                "binary messages are not accepted: send JSON text".into(),
            )),
            Some(Ok(Message::Text(text))) => report(&state, &caller, &text).await,
        };
        let json = match answer {
            Ok(ack) => {
                metrics.ingest_message(IngestResult::Ack);
                crate::hub::message::to_json(&ack)
            }
            Err(error) => {
                metrics.ingest_message(IngestResult::Error);
                if strikes.strike(Instant::now()) {
                    break (
                        CloseReason::Policy,
                        Some(socket::close_frame(CloseReason::Policy)),
                    );
                }
                ErrorMessage::new(&error).to_json()
            }
        };
        if socket.send(socket::text(json)).await.is_err() {
            break (CloseReason::Client, None);
        }
    };
    metrics.ingest_closed(reason);
    socket::finish(socket, frame).await;
}

/// Checks and applies one message: a batch when it has `locations`, else a single position.
async fn report(state: &AppState, caller: &Principal, text: &str) -> Result<IngestAck, ApiError> {
    let received_at = now_micros();
    super::extract::check_depth(text.as_bytes())?;
    let batch: BatchInput = decode_object(text.as_bytes()).map_err(as_message_error)?;
    let (positions, mut rejected) = if batch.locations.is_some() {
        let checked = check_batch(batch, received_at)?;
        (checked.positions, checked.rejected)
    } else {
        let input: PositionInput = decode_object(text.as_bytes()).map_err(as_message_error)?;
        match validate_position(&input, received_at) {
            Ok(position) => (vec![(0, position)], Vec::new()),
            Err(errors) => {
                let error = ApiError::validation(summary(&errors), errors).body();
                (Vec::new(), vec![Rejected { index: 0, error }])
            }
        }
    };
    let admitted = state
        .trust
        .admit(caller, positions, &state.tracker, received_at)
        .await?;
    for (index, error) in admitted.rejected {
        let error = ApiError::fields(vec![error]).body();
        rejected.push(Rejected { index, error });
    }
    rejected.sort_by_key(|r| r.index);
    if !admitted.positions.is_empty() {
        state.tracker.apply(admitted.positions, received_at).await?;
    }
    state
        .trust
        .count_accepted(&caller.tenant, admitted.accepted as u64);
    Ok(IngestAck {
        kind: "ack",
        accepted: admitted.accepted,
        rejected,
    })
}

/// The HTTP API's JSON error (400-like `malformed_json` or 422-like `validation_failed`), worded
/// for a message rather than a request body.
fn as_message_error(error: ApiError) -> ApiError {
    let reword = |m: String| m.replacen("request body", "message", 1);
    match error {
        ApiError::MalformedJson(m) => ApiError::MalformedJson(reword(m)),
        ApiError::Validation { message, details } => ApiError::Validation {
            message: reword(message),
            details,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::time::Duration;

    #[tokio::test]
    async fn single_batch_and_errors() {
        let metrics = Metrics::new();
        let (trust, _dir) = crate::api::auth::open_for_tests(&metrics);
        let tracker = crate::tracker::Tracker::in_memory(Duration::from_secs(60), metrics);
        let state = AppState {
            tracker: std::sync::Arc::new(tracker),
            trust,
        };
        let caller = Principal::open();
        let t = &state.tracker;
        let ack = report(
            &state,
            &caller,
            r#"{"driver_id":"a","latitude":1,"longitude":2}"#,
        )
        .await
        .unwrap();
        assert_eq!((ack.accepted, ack.rejected.len()), (1, 0));
        let ack = report(
            &state,
            &caller,
            r#"{"driver_id":"a","latitude":95,"longitude":2}"#,
        )
        .await
        .unwrap();
        assert_eq!((ack.accepted, ack.rejected[0].index), (0, 0));
        let ack = report(
            &state,
            &caller,
            r#"{"locations":[{"driver_id":"b","latitude":1,"longitude":2},7,{"driver_id":"c"}]}"#,
        )
        .await
        .unwrap();
        assert_eq!(ack.accepted, 1);
        let indexes: Vec<usize> = ack.rejected.iter().map(|r| r.index).collect();
        assert_eq!(indexes, [1, 2]);
        assert_eq!(t.updates_total(), 2);

        for (text, code) in [
            ("{oops", "malformed_json"),
            ("[1,2]", "validation_failed"),
            (r#"{"locations":[]}"#, "validation_failed"),
            (r#"{"locations":5}"#, "validation_failed"),
        ] {
            assert_eq!(
                report(&state, &caller, text).await.unwrap_err().code(),
                code,
                "{text}"
            );
        }
        let e = report(&state, &caller, "{oops").await.unwrap_err();
        assert!(
            e.to_string().starts_with("message is not valid JSON"),
            "{e}"
        );
        // An array would otherwise be read as a position's fields in order.
        let e = report(&state, &caller, r#"["x", 1, 2]"#).await.unwrap_err();
        assert_eq!(e.to_string(), "message must be a JSON object, got an array");
        assert_eq!(t.updates_total(), 2, "nothing applied");
    }
}
