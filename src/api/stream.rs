//! `GET /v1/stream` (WebSocket) and `GET /v1/stream/sse` (Server-Sent Events): live positions of
//! the drivers in an area (a box or a circle) or in a list, from the [`crate::hub`].
//!
//! Both transports carry the same JSON messages: first a `snapshot` (in parts of up to 1,000
//! drivers), then a `position` for each accepted update in scope and a `removed` when a driver
//! leaves scope. A WebSocket client changes what it follows by sending `{"type":"subscribe",...}`
//! with the same parameters as the query; a new snapshot answers it. The query is checked before
//! the upgrade, so a bad one is an ordinary 422.
//!
//! A subscriber that cannot keep up gets the latest state per driver instead of every update,
//! and is closed if even that falls behind: WebSocket close 1013 "subscriber too slow", or SSE
//! `event: error` as the last event. Draining the server closes streams with 1001 (SSE: `event:
//! error`, code `shutting_down`). SSE sends a `: keep-alive` comment, WebSocket a ping, every
//! keep-alive period.

use super::auth::Caller;
use super::drivers::{number_param, status_param, MAX_RADIUS_M};
use super::error::ApiError;
use super::extract::QueryParams;
use super::socket::{self, ErrorMessage, Strikes};
use super::AppState;
use crate::domain::position::is_valid_driver_id;
use crate::domain::{FieldError, StatusSet};
use crate::hub::Refused;
use crate::hub::{Area, Circle, CloseReason, Feed, Scope, StreamRequest, Transport};
use crate::live::BoxQuery;
use crate::tracker::Tracker;
use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use compact_str::CompactString;
use futures_util::{FutureExt, SinkExt};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{interval_at, Instant, Interval, MissedTickBehavior};
use utoipa::IntoParams;

/// Most driver ids one subscription follows.
pub const MAX_DRIVER_IDS: usize = 1000;
/// Longest `min_interval_ms`: one hour.
pub const MAX_INTERVAL_MS: f64 = 3_600_000.0;
/// Largest message a subscriber may send (a `subscribe` with 1,000 long driver ids fits).
const MAX_CLIENT_MESSAGE: usize = 128 * 1024;
/// Most messages written per flush.
const SEND_BATCH: usize = 256;

/// What to follow, as text: each parameter is checked and reported by name. Give exactly one of
/// `bbox`, `lat` and `lon` (with `radius_m`), or `driver_id`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// A box `minLon,minLat,maxLon,maxLat`, edges included; `minLon` greater than `maxLon` crosses
    /// the antimeridian.
    #[param(value_type = Option<String>, example = "121.40,31.20,121.55,31.30")]
    pub bbox: Option<String>,
    /// Latitude of a circle's centre, −90..90.
    #[param(value_type = Option<f64>)]
    pub lat: Option<String>,
    /// Longitude of a circle's centre, −180..180.
    #[param(value_type = Option<f64>)]
    pub lon: Option<String>,
    /// Circle radius in metres, 1..100000 (default 1000).
    #[param(value_type = Option<f64>)]
    pub radius_m: Option<String>,
    /// Comma-separated driver ids, up to 1000.
    #[param(value_type = Option<String>, example = "drv-1,drv-2")]
    pub driver_id: Option<String>,
    /// Comma-separated statuses to follow (default `online,busy`). Offline drivers are never
    /// streamed: going offline is a `removed` with reason `offline`.
    #[param(value_type = Option<String>, example = "online")]
    pub status: Option<String>,
    /// Send each driver at most this often, coalescing to its latest state, 0..3600000 (default
    /// 0: every update).
    #[param(value_type = Option<u32>)]
    pub min_interval_ms: Option<String>,
}

impl StreamParams {
    /// Checks every parameter; on failure one detail per bad parameter.
    pub fn to_request(&self) -> Result<StreamRequest, ApiError> {
        let mut errors = Vec::new();
        let area = self.area(&mut errors);
        let statuses = status_param(&mut errors, self.status.as_deref());
        let interval_ms = number_param(
            &mut errors,
            "min_interval_ms",
            self.min_interval_ms.as_deref(),
            Some(0.0),
            (0.0, MAX_INTERVAL_MS),
        );
        if interval_ms.fract() != 0.0 {
            errors.push(FieldError::new("min_interval_ms", "must be a whole number"));
        }
        match area {
            Some(area) if errors.is_empty() => Ok(StreamRequest {
                scope: Scope {
                    area,
                    statuses,
                    tenant: None,
                },
                min_interval: Duration::from_millis(interval_ms as u64),
            }),
            _ => Err(validation(errors)),
        }
    }

    fn area(&self, errors: &mut Vec<FieldError>) -> Option<Area> {
        let circle = self.lat.is_some() || self.lon.is_some() || self.radius_m.is_some();
        let given: Vec<&str> = [
            ("bbox", self.bbox.is_some()),
            ("lat", circle),
            ("driver_id", self.driver_id.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect();
        match given.as_slice() {
            ["bbox"] => parse_bbox(errors, self.bbox.as_deref().unwrap_or_default()),
            ["lat"] => self.circle(errors),
            ["driver_id"] => {
                parse_driver_ids(errors, self.driver_id.as_deref().unwrap_or_default())
            }
            [] => {
                errors.push(FieldError::new(
                    "bbox",
                    "is required unless lat and lon, or driver_id, are given",
                ));
                None
            }
            [first, others @ ..] => {
                for other in others {
                    errors.push(FieldError::new(
                        other,
                        format!("cannot be combined with {first}: follow one of bbox, lat and lon, or driver_id"),
                    ));
                }
                None
            }
        }
    }

    fn circle(&self, errors: &mut Vec<FieldError>) -> Option<Area> {
        let before = errors.len();
        let lat = number_param(errors, "lat", self.lat.as_deref(), None, (-90.0, 90.0));
        let lon = number_param(errors, "lon", self.lon.as_deref(), None, (-180.0, 180.0));
        let radius_m = number_param(
            errors,
            "radius_m",
            self.radius_m.as_deref(),
            Some(1000.0),
            (1.0, MAX_RADIUS_M),
        );
        (errors.len() == before).then(|| {
            Area::Circle(Circle {
                lat_e6: to_e6(lat),
                lon_e6: to_e6(lon),
                radius_m,
            })
        })
    }

    /// The parameters of a `{"type":"subscribe",...}` message: the query's names, each a string,
    /// a number, or (`bbox`, `driver_id`, `status`) a list.
    pub fn from_message(message: &Map<String, Value>) -> Result<StreamParams, ApiError> {
        let mut errors = Vec::new();
        let mut field = |name: &str| match message.get(name) {
            None | Some(Value::Null) => None,
            Some(value) => {
                let text = as_param(value);
                if text.is_none() {
                    errors.push(FieldError::new(
                        name,
                        "must be a string, a number, or a list of them",
                    ));
                }
                text
            }
        };
        let params = StreamParams {
            bbox: field("bbox"),
            lat: field("lat"),
            lon: field("lon"),
            radius_m: field("radius_m"),
            driver_id: field("driver_id"),
            status: field("status"),
            min_interval_ms: field("min_interval_ms"),
        };
        if errors.is_empty() {
            Ok(params)
        } else {
            Err(validation(errors))
        }
    }
}

fn validation(errors: Vec<FieldError>) -> ApiError {
    ApiError::fields(errors)
}

fn to_e6(degrees: f64) -> i32 {
    (degrees * 1e6).round() as i32
}

/// A JSON value as a query parameter's text, lists joined with commas.
fn as_param(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|parts| parts.join(",")),
        _ => None,
    }
}

/// `minLon,minLat,maxLon,maxLat`.
fn parse_bbox(errors: &mut Vec<FieldError>, text: &str) -> Option<Area> {
    let fail = |errors: &mut Vec<FieldError>, message: String| {
        errors.push(FieldError::new("bbox", message));
        None
    };
    let numbers: Vec<Option<f64>> = text
        .split(',')
        .map(|part| part.trim().parse::<f64>().ok().filter(|v| v.is_finite()))
        .collect();
    let [Some(west), Some(south), Some(east), Some(north)] = numbers[..] else {
        return fail(
            errors,
            format!("must be four numbers minLon,minLat,maxLon,maxLat; got {text:?}"),
        );
    };
    if ![west, east].iter().all(|v| (-180.0..=180.0).contains(v)) {
        return fail(
            errors,
            format!("longitudes must be between -180 and 180; got {text:?}"),
        );
    }
    if ![south, north].iter().all(|v| (-90.0..=90.0).contains(v)) {
        return fail(
            errors,
            format!("latitudes must be between -90 and 90; got {text:?}"),
        );
    }
    if south > north {
        return fail(
            errors,
            format!("minLat must not be greater than maxLat; got {text:?}"),
        );
    }
    Some(Area::Box(BoxQuery {
        south_e6: to_e6(south),
        west_e6: to_e6(west),
        north_e6: to_e6(north),
        east_e6: to_e6(east),
        statuses: StatusSet::WORKING,
    }))
}

fn parse_driver_ids(errors: &mut Vec<FieldError>, text: &str) -> Option<Area> {
    let ids: Vec<&str> = text.split(',').map(str::trim).collect();
    if ids.len() > MAX_DRIVER_IDS {
        errors.push(FieldError::new(
            "driver_id",
            format!("must list at most {MAX_DRIVER_IDS} ids, got {}", ids.len()),
        ));
        return None;
    }
    if let Some(bad) = ids.iter().find(|id| !is_valid_driver_id(id)) {
        errors.push(FieldError::new(
            "driver_id",
            format!("must be a comma list of ids of 1-64 characters of A-Z a-z 0-9 _ . : @ -; got {bad:?}"),
        ));
        return None;
    }
    Some(Area::Drivers(ids.into_iter().map(Into::into).collect()))
}

/// Follow drivers over WebSocket.
#[utoipa::path(
    get, path = "/v1/stream", tag = "streams",
    params(StreamParams),
    description = "Upgrades to a WebSocket. The server sends JSON text messages: `snapshot` parts \
        (`{\"type\":\"snapshot\",\"part\",\"more\",\"drivers\":[...]}`, part 0 replaces the client's view), then \
        `{\"type\":\"position\",\"driver_id\",\"latitude\",\"longitude\",\"status\",\"timestamp\",...}` for each \
        accepted update in scope and `{\"type\":\"removed\",\"driver_id\",\"reason\"}` (`offline`, `expired`, \
        `left_area`) when a driver leaves scope. The client may send `{\"type\":\"subscribe\",...}` with the \
        query's parameters (strings, numbers or lists) to change what it follows; a bad one is answered with \
        `{\"type\":\"error\",\"error\":{...}}`. A subscriber too slow even for latest-per-driver updates is closed \
        with code 1013; a flood of invalid messages with 1008; a draining server closes with 1001.",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 422, description = "Invalid parameters, one detail per parameter", body = super::error::ErrorResponse),
        (status = 426, description = "Not a WebSocket upgrade request", body = super::error::ErrorResponse),
        (status = 503, description = "The service is draining", body = super::error::ErrorResponse),
    )
)]
pub async fn stream_ws(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(params): QueryParams<StreamParams>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let mut request = match params.to_request() {
        Ok(request) => request,
        Err(e) => return e.into_response(),
    };
    request.scope = request.scope.for_tenant(&caller.tenant);
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return socket::upgrade_required(
                rejection,
                "; GET /v1/stream/sse is the same feed over HTTP",
            )
        }
    };
    if !state.tracker.hub().is_accepting() {
        return not_accepting().into_response();
    }
    let tracker = state.tracker;
    let hub = tracker.hub().clone();
    socket::configure(upgrade, MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| hub.track(run_ws(socket, tracker, request, caller.tenant)))
}

fn not_accepting() -> ApiError {
    ApiError::NotReady("the service is not accepting stream subscriptions now".into())
}

async fn run_ws(
    socket: WebSocket,
    tracker: Arc<Tracker>,
    request: StreamRequest,
    tenant: CompactString,
) {
    let (feed, snapshot) = match Feed::open(&tracker, request, Transport::Ws).await {
        Ok(opened) => opened,
        Err(Refused::NotAccepting) => {
            return socket::close(socket, socket::close_frame(CloseReason::Shutdown)).await
        }
        Err(Refused::StoreUnavailable) => {
            return socket::close(socket, socket::store_unavailable_frame()).await
        }
    };
    let config = tracker.hub().config();
    let mut stream = WsStream {
        socket,
        feed,
        strikes: Strikes::default(),
        send_limit: config.max_lag,
        tenant,
    };
    let (reason, frame) = stream.run(snapshot, config.keepalive).await;
    stream.feed.end(reason);
    let WsStream { socket, feed, .. } = stream;
    drop(feed);
    socket::finish(socket, frame).await;
}

struct WsStream {
    socket: WebSocket,
    feed: Feed,
    strikes: Strikes,
    /// Longest one batch may take to write before the subscriber counts as too slow.
    send_limit: Duration,
    /// The subscriber's tenant: new subscriptions are scoped to it too.
    tenant: CompactString,
}

/// Why a stream's loop woke up.
enum Wake {
    Feed,
    Incoming(Option<Result<Message, axum::Error>>),
    KeepAlive,
}

/// How a stream ends: the reason, and the close frame to send (none when the client is gone).
type Ending = (CloseReason, Option<axum::extract::ws::CloseFrame>);

impl WsStream {
    async fn run(&mut self, snapshot: Vec<Bytes>, keepalive: Duration) -> Ending {
        let ending = |reason| (reason, Some(socket::close_frame(reason)));
        if let Err(ending) = self.send(snapshot).await {
            return ending;
        }
        let mut ping = keepalive_timer(keepalive);
        let mut batch = Vec::new();
        loop {
            if let Err(reason) = self.feed.ready(&mut batch, SEND_BATCH) {
                return ending(reason);
            }
            if !batch.is_empty() {
                if let Err(ending) = self.send(std::mem::take(&mut batch)).await {
                    return ending;
                }
                // However busy the feed, the client's messages are read between batches.
                if let Some(incoming) = self.socket.recv().now_or_never() {
                    if let Err(ending) = self.receive(incoming).await {
                        return ending;
                    }
                }
                continue;
            }
            let wake = tokio::select! {
                _ = self.feed.changed() => Wake::Feed,
                incoming = self.socket.recv() => Wake::Incoming(incoming),
                _ = ping.tick() => Wake::KeepAlive,
            };
            let result = match wake {
                Wake::Feed => Ok(()),
                Wake::KeepAlive => self.write(vec![Message::Ping(Bytes::new())]).await,
                Wake::Incoming(incoming) => self.receive(incoming).await,
            };
            if let Err(ending) = result {
                return ending;
            }
        }
    }

    async fn send(&mut self, messages: Vec<Bytes>) -> Result<(), Ending> {
        self.write(messages.into_iter().map(socket::text).collect())
            .await
    }

    /// Writes and flushes, within the send limit: a client that does not read for that long is
    /// too slow.
    async fn write(&mut self, messages: Vec<Message>) -> Result<(), Ending> {
        let socket = &mut self.socket;
        let written = tokio::time::timeout(self.send_limit, async move {
            for message in messages {
                socket.feed(message).await?;
            }
            socket.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err((CloseReason::Client, None)),
            Err(_) => Err((
                CloseReason::TooSlow,
                Some(socket::close_frame(CloseReason::TooSlow)),
            )),
        }
    }

    /// A message from the client: a new subscription, or an error answer (too many: closed).
    async fn receive(
        &mut self,
        incoming: Option<Result<Message, axum::Error>>,
    ) -> Result<(), Ending> {
        let error = match incoming {
            None | Some(Ok(Message::Close(_))) => return Err((CloseReason::Client, None)),
            Some(Err(e)) => return Err(socket::read_failure(e, MAX_CLIENT_MESSAGE)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(()),
            Some(Ok(Message::Binary(_))) => {
                ApiError::MalformedJson("binary messages are not accepted: send JSON text".into())
            }
            Some(Ok(Message::Text(text))) => match subscribe_request(&text) {
                Ok(mut request) => {
                    request.scope = request.scope.for_tenant(&self.tenant);
                    match self.feed.resubscribe(request).await {
                        Ok(snapshot) => return self.send(snapshot).await,
                        Err(_) => {
                            return Err((
                                CloseReason::Error,
                                Some(socket::store_unavailable_frame()),
                            ))
                        }
                    }
                }
                Err(error) => error,
            },
        };
        if self.strikes.strike(std::time::Instant::now()) {
            return Err((
                CloseReason::Policy,
                Some(socket::close_frame(CloseReason::Policy)),
            ));
        }
        self.send(vec![ErrorMessage::new(&error).to_json()]).await
    }
}

/// A `{"type":"subscribe",...}` message, checked like the query.
fn subscribe_request(text: &str) -> Result<StreamRequest, ApiError> {
    super::extract::check_depth(text.as_bytes())?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::MalformedJson(format!("message is not valid JSON: {e}")))?;
    let Value::Object(message) = value else {
        return Err(ApiError::validation(
            "message must be a JSON object",
            vec![],
        ));
    };
    if message.get("type").and_then(Value::as_str) != Some("subscribe") {
        return Err(ApiError::invalid_field("type", "must be \"subscribe\""));
    }
    StreamParams::from_message(&message)?.to_request()
}

fn keepalive_timer(period: Duration) -> Interval {
    let mut timer = interval_at(Instant::now() + period, period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer
}

/// Follow drivers as Server-Sent Events.
#[utoipa::path(
    get, path = "/v1/stream/sse", tag = "streams",
    params(StreamParams),
    description = "The same feed as `GET /v1/stream`, as `text/event-stream`: each message is one `data:` line \
        holding the same JSON (`snapshot` parts, then `position` and `removed`). A `: keep-alive` comment comes \
        every keep-alive period. A subscriber too slow even for latest-per-driver updates, or a draining server, \
        ends the stream with a final `event: error` whose data is `{\"type\":\"error\",\"error\":{\"code\":\"too_slow\"|\"shutting_down\",...}}`.",
    responses(
        (status = 200, description = "An endless event stream", content_type = "text/event-stream", body = String),
        (status = 422, description = "Invalid parameters, one detail per parameter", body = super::error::ErrorResponse),
        (status = 503, description = "The service is draining", body = super::error::ErrorResponse),
    )
)]
pub async fn stream_sse(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(params): QueryParams<StreamParams>,
) -> Result<Response, ApiError> {
    let mut request = params.to_request()?;
    request.scope = request.scope.for_tenant(&caller.tenant);
    let (feed, snapshot) = Feed::open(&state.tracker, request, Transport::Sse)
        .await
        .map_err(|refused| match refused {
            Refused::NotAccepting => not_accepting(),
            Refused::StoreUnavailable => {
                ApiError::StoreUnavailable("the live store is unavailable; retry later".into())
            }
        })?;
    let keepalive = state.tracker.hub().config().keepalive;
    let events = SseEvents {
        feed,
        snapshot,
        keepalive: keepalive_timer(keepalive),
        ended: false,
    };
    let body = futures_util::stream::unfold(events, |mut events| async move {
        let chunk = events.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), events))
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies (nginx) must not buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The state of one SSE response body.
struct SseEvents {
    feed: Feed,
    snapshot: Vec<Bytes>,
    keepalive: Interval,
    ended: bool,
}

impl SseEvents {
    /// The next piece of the body: ready messages as `data:` events, a keep-alive comment, or
    /// the final `event: error`; `None` after that. The client leaving drops the body, and with
    /// it the feed.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        if !self.snapshot.is_empty() {
            return Some(data_events(&std::mem::take(&mut self.snapshot)));
        }
        let mut batch = Vec::new();
        loop {
            if let Err(reason) = self.feed.ready(&mut batch, SEND_BATCH) {
                self.ended = true;
                return Some(error_event(reason));
            }
            if !batch.is_empty() {
                return Some(data_events(&batch));
            }
            tokio::select! {
                _ = self.feed.changed() => {}
                _ = self.keepalive.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
            }
        }
    }
}

/// One `data:` event per message, in one chunk (messages are single-line JSON).
fn data_events(messages: &[Bytes]) -> Bytes {
    let size = messages.iter().map(|m| m.len() + 8).sum();
    let mut chunk = BytesMut::with_capacity(size);
    for message in messages {
        chunk.put_slice(b"data: ");
        chunk.put_slice(message);
        chunk.put_slice(b"\n\n");
    }
    chunk.freeze()
}

fn error_event(reason: CloseReason) -> Bytes {
    let error = match reason {
        CloseReason::TooSlow => ErrorMessage::coded(
            "too_slow",
            "subscriber too slow: it fell too far behind even with latest-per-driver updates",
        ),
        CloseReason::Shutdown => {
            ErrorMessage::coded("shutting_down", "the server is shutting down")
        }
        _ => ErrorMessage::coded("closed", "the stream was closed"),
    };
    let mut chunk = BytesMut::from(&b"event: error\ndata: "[..]);
    chunk.put_slice(&error.to_json());
    chunk.put_slice(b"\n\n");
    chunk.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(query: &str) -> Result<StreamRequest, Vec<String>> {
        let p: StreamParams = serde_urlencoded::from_str(query).unwrap();
        p.to_request().map_err(|e| match e {
            ApiError::Validation { details, .. } => details.into_iter().map(|d| d.field).collect(),
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn one_area_kind_is_required() {
        assert!(matches!(
            params("bbox=121.4,31.2,121.5,31.3").unwrap().scope.area,
            Area::Box(_)
        ));
        assert!(matches!(
            params("lat=31.2&lon=121.4").unwrap().scope.area,
            Area::Circle(Circle { radius_m, .. }) if radius_m == 1000.0
        ));
        assert!(matches!(
            params("driver_id=a,b").unwrap().scope.area,
            Area::Drivers(ids) if ids.len() == 2
        ));
        assert_eq!(params("").unwrap_err(), ["bbox"]);
        assert_eq!(
            params("bbox=1,2,3,4&driver_id=a&lat=1&lon=1").unwrap_err(),
            ["lat", "driver_id"]
        );
        assert_eq!(params("radius_m=5").unwrap_err(), ["lat", "lon"]);
    }

    #[test]
    fn every_bad_parameter_is_named() {
        assert_eq!(
            params("bbox=1,2,3&status=asleep&min_interval_ms=-1").unwrap_err(),
            ["bbox", "status", "min_interval_ms"]
        );
        assert_eq!(params("bbox=0,10,1,5").unwrap_err(), ["bbox"]);
        assert_eq!(params("bbox=200,0,1,5").unwrap_err(), ["bbox"]);
        assert_eq!(params("bbox=a,b,c,d").unwrap_err(), ["bbox"]);
        assert_eq!(
            params("lat=91&lon=0&radius_m=0").unwrap_err(),
            ["lat", "radius_m"]
        );
        assert_eq!(params("driver_id=ok,bad id").unwrap_err(), ["driver_id"]);
        assert_eq!(params("driver_id=").unwrap_err(), ["driver_id"]);
        let many = (0..1001)
            .map(|i| format!("d{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            params(&format!("driver_id={many}")).unwrap_err(),
            ["driver_id"]
        );
        assert_eq!(
            params("driver_id=a&min_interval_ms=1.5").unwrap_err(),
            ["min_interval_ms"]
        );
    }

    #[test]
    fn a_box_may_cross_the_antimeridian() {
        let r = params("bbox=179.5,-1,-179.5,1").unwrap();
        let Area::Box(b) = r.scope.area else { panic!() };
        assert!(b.contains(0, 179_900_000) && b.contains(0, -179_900_000));
        assert!(!b.contains(0, 0));
    }

    #[test]
    fn subscribe_messages_take_strings_numbers_and_lists() {
        let r = subscribe_request(
            &json!({"type": "subscribe", "bbox": [121.4, 31.2, 121.5, 31.3], "status": ["online"],
                    "min_interval_ms": 500})
            .to_string(),
        )
        .unwrap();
        assert!(matches!(r.scope.area, Area::Box(_)));
        assert_eq!(r.min_interval, Duration::from_millis(500));
        let r = subscribe_request(r#"{"type":"subscribe","driver_id":"a,b","lat":null}"#).unwrap();
        assert!(matches!(r.scope.area, Area::Drivers(_)));

        let code = |text: &str| subscribe_request(text).unwrap_err().code();
        assert_eq!(code("{not json"), "malformed_json");
        assert_eq!(code("[1]"), "validation_failed");
        assert_eq!(code(r#"{"type":"unsubscribe"}"#), "validation_failed");
        assert_eq!(
            code(r#"{"type":"subscribe","lat":{"x":1},"lon":1}"#),
            "validation_failed"
        );
    }

    #[test]
    fn sse_framing() {
        let chunk = data_events(&[Bytes::from_static(b"{\"a\":1}"), Bytes::from_static(b"{}")]);
        assert_eq!(&chunk[..], b"data: {\"a\":1}\n\ndata: {}\n\n");
        let error = error_event(CloseReason::TooSlow);
        let text = std::str::from_utf8(&error).unwrap();
        assert!(text.starts_with("event: error\ndata: {\"type\":\"error\""));
        assert!(text.contains("\"code\":\"too_slow\"") && text.ends_with("\n\n"));
    }
}
