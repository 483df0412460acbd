//! What the WebSocket endpoints (`/v1/stream`, `/v1/ingest`) share: the answer to a request that
//! is not an upgrade, socket settings, error messages on an open socket, the budget of invalid
//! messages, and a close that the client actually receives.

use super::error::{ApiError, ErrorBody, ErrorResponse};
use crate::hub::CloseReason;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures_util::SinkExt;
use serde::Serialize;
use std::time::{Duration, Instant};
use utoipa::ToSchema;

/// How long a close frame may take to get through (a slow client is still draining what was sent
/// before it) and how long the client's own close frame is then awaited.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Invalid messages tolerated per [`STRIKE_WINDOW`] before the connection is closed (1008).
pub const MAX_STRIKES: u32 = 10;
pub const STRIKE_WINDOW: Duration = Duration::from_secs(10);

/// A plain GET where a WebSocket upgrade was expected: 426 with the usual JSON error envelope
/// (axum's own rejection is plain text).
pub fn upgrade_required(rejection: WebSocketUpgradeRejection, hint: &str) -> Response {
    let body = ErrorResponse {
        error: ErrorBody {
            code: "upgrade_required",
            message: format!(
                "this endpoint speaks WebSocket only ({}){hint}",
                rejection.body_text()
            ),
            details: None,
        },
    };
    let mut response = (StatusCode::UPGRADE_REQUIRED, Json(body)).into_response();
    response.headers_mut().insert(
        axum::http::header::UPGRADE,
        axum::http::HeaderValue::from_static("websocket"),
    );
    response
}

/// Small buffers (a server may hold many thousands of idle sockets; tungstenite reserves its read
/// buffer up front) and a message size limit.
pub fn configure(upgrade: WebSocketUpgrade, max_message: usize) -> WebSocketUpgrade {
    upgrade
        .read_buffer_size(8 * 1024)
        .write_buffer_size(64 * 1024)
        .max_message_size(max_message)
        .max_frame_size(max_message)
}

/// `{"type":"error","error":{"code","message","details"?}}`: an error on an open socket, with the
/// HTTP API's error object.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorMessage {
    /// Always `error`.
    #[serde(rename = "type")]
    #[schema(example = "error")]
    pub kind: &'static str,
    pub error: ErrorBody,
}

impl ErrorMessage {
    pub fn new(error: &ApiError) -> ErrorMessage {
        ErrorMessage {
            kind: "error",
            error: error.body(),
        }
    }

    /// An error of the stream's own (`too_slow`, `shutting_down`, ...).
    pub fn coded(code: &'static str, message: impl Into<String>) -> ErrorMessage {
        ErrorMessage {
            kind: "error",
            error: ErrorBody {
                code,
                message: message.into(),
                details: None,
            },
        }
    }

    pub fn to_json(&self) -> Bytes {
        crate::hub::message::to_json(self)
    }
}

/// A text message of JSON we serialised ourselves (always UTF-8).
pub fn text(json: Bytes) -> Message {
    match Utf8Bytes::try_from(json) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Text(Utf8Bytes::from_static(
            r#"{"type":"error","error":{"code":"internal","message":"internal error"}}"#,
        )),
    }
}

/// The close code and text for why a connection ends.
pub fn close_frame(reason: CloseReason) -> CloseFrame {
    let (code, text) = match reason {
        CloseReason::TooSlow => (close_code::AGAIN, "subscriber too slow"),
        CloseReason::Shutdown => (close_code::AWAY, "server shutting down"),
        CloseReason::Policy => (close_code::POLICY, "too many invalid messages"),
        CloseReason::Client => (close_code::NORMAL, "closed"),
        CloseReason::Error => (close_code::ERROR, "internal error"),
    };
    CloseFrame {
        code,
        reason: Utf8Bytes::from_static(text),
    }
}

/// The close frame when the live store cannot be read (a shared store's outage): 1013, try later.
pub fn store_unavailable_frame() -> CloseFrame {
    CloseFrame {
        code: close_code::AGAIN,
        reason: Utf8Bytes::from_static("live store unavailable; retry later"),
    }
}

/// Ends a connection: with our close frame if there is one, else by completing the closing
/// handshake the client started (or noticing it is gone).
pub async fn finish(mut socket: WebSocket, frame: Option<CloseFrame>) {
    match frame {
        Some(frame) => close(socket, frame).await,
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.close()).await;
        }
    }
}

/// Sends a close frame and waits (boundedly) for the client's, so that the frame is not lost to
/// a reset when the client still had messages on the way.
pub async fn close(mut socket: WebSocket, frame: CloseFrame) {
    let sent = tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// What a failed read means for the connection: the reason it ends, and the close frame to send
/// (none when the peer is gone).
pub fn read_failure(error: axum::Error, max_message: usize) -> (CloseReason, Option<CloseFrame>) {
    use tungstenite::error::{Error as WsError, ProtocolError};
    let inner = error.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => {
            let text = format!("message larger than {} KiB", max_message / 1024);
            let frame = CloseFrame {
                code: close_code::SIZE,
                reason: Utf8Bytes::from(text),
            };
            (CloseReason::Policy, Some(frame))
        }
        Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))
        | Some(WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_)) => {
            (CloseReason::Client, None)
        }
        Some(WsError::Protocol(_)) | Some(WsError::Utf8(_)) => {
            let frame = CloseFrame {
                code: close_code::PROTOCOL,
                reason: Utf8Bytes::from_static("WebSocket protocol error"),
            };
            (CloseReason::Policy, Some(frame))
        }
        _ => (CloseReason::Error, None),
    }
}

/// Counts invalid messages per window; too many in one window is a flood.
pub struct Strikes {
    window_start: Instant,
    count: u32,
}

impl Default for Strikes {
    fn default() -> Self {
        Strikes {
            window_start: Instant::now(),
            count: 0,
        }
    }
}

impl Strikes {
    /// Records one invalid message; true when that makes a flood.
    pub fn strike(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window_start) > STRIKE_WINDOW {
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        self.count > MAX_STRIKES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_more_than_the_budget_within_the_window() {
        let mut s = Strikes::default();
        let t0 = Instant::now();
        for _ in 0..MAX_STRIKES {
            assert!(!s.strike(t0));
        }
        assert!(s.strike(t0));
        let later = t0 + STRIKE_WINDOW + Duration::from_millis(1);
        assert!(!s.strike(later), "a new window starts afresh");
    }
}
