//! The push layer from outside: WebSocket and SSE subscribers of `/v1/stream`, and devices on
//! `/v1/ingest`. Every wait has a deadline; "nothing else arrived" is shown by a later message
//! arriving first (a subscriber's messages are in order).

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Longest wait for any one message.
const WAIT: Duration = Duration::from_secs(10);

/// A box around central Shanghai, and points inside and outside it.
const CITY: &str = "bbox=121.40,31.20,121.55,31.30";
const IN: (f64, f64) = (31.25, 121.47);
const OUT: (f64, f64) = (31.40, 121.47);

fn at(id: &str, (lat, lon): (f64, f64)) -> Value {
    json!({"driver_id": id, "latitude": lat, "longitude": lon})
}

fn with_status(mut position: Value, status: &str) -> Value {
    position["status"] = json!(status);
    position
}

pub(crate) async fn connect(s: &Server, path: &str) -> Ws {
    let (ws, response) = connect_async(format!("ws://{}{path}", s.addr))
        .await
        .unwrap_or_else(|e| panic!("connect {path}: {e}"));
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Connects to `/v1/stream?query` and reads the whole snapshot.
pub(crate) async fn subscribe(s: &Server, query: &str) -> (Ws, Vec<Value>) {
    let mut ws = connect(s, &format!("/v1/stream?{query}")).await;
    let snapshot = read_snapshot(&mut ws).await;
    (ws, snapshot)
}

/// The next text message as JSON (pings skipped); panics on anything else or at the deadline.
pub(crate) async fn next(ws: &mut Ws) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no message within the deadline")
            .expect("the stream ended")
            .expect("WebSocket error");
        match message {
            Message::Text(text) => {
                return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// Every part of a snapshot, as one list of drivers.
pub(crate) async fn read_snapshot(ws: &mut Ws) -> Vec<Value> {
    let mut drivers = Vec::new();
    for part in 0.. {
        let m = next(ws).await;
        assert_eq!(m["type"], "snapshot", "{m}");
        assert_eq!(m["part"], part, "{m}");
        drivers.extend(m["drivers"].as_array().unwrap().iter().cloned());
        if m["more"] == false {
            break;
        }
    }
    drivers
}

/// Skips messages until the close frame; its code and reason.
async fn close_of(ws: &mut Ws) -> (CloseCode, String) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no close frame within the deadline");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => return (frame.code, frame.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

fn ids(drivers: &[Value]) -> Vec<&str> {
    drivers
        .iter()
        .map(|d| d["driver_id"].as_str().unwrap())
        .collect()
}

/// `type:driver_id[:reason]`, for compact assertions.
fn summary(m: &Value) -> String {
    let mut s = format!(
        "{}:{}",
        m["type"].as_str().unwrap_or("?"),
        m["driver_id"].as_str().unwrap_or("?")
    );
    if let Some(reason) = m["reason"].as_str() {
        s = format!("{s}:{reason}");
    }
    s
}

async fn send_json(ws: &mut Ws, value: &Value) {
    ws.send(Message::text(value.to_string()))
        .await
        .expect("send");
}

/// A sample's value in the Prometheus text of `/metrics` (0 when absent).
async fn metric(s: &Server, series: &str) -> f64 {
    let text = s.get("/metrics").await.text().await.unwrap();
    sample(&text, series).unwrap_or(0.0)
}

#[tokio::test]
async fn a_box_subscriber_gets_a_snapshot_then_live_positions() {
    let s = Server::start();
    s.report(
        json!({"driver_id": "inside", "latitude": 31.25, "longitude": 121.47,
                    "status": "busy", "speed_mps": 8.5}),
    )
    .await;
    s.report(at("outside", OUT)).await;
    s.report(with_status(at("off", IN), "offline")).await;
    let (mut ws, snapshot) = subscribe(&s, CITY).await;
    assert_eq!(ids(&snapshot), ["inside"]);
    let d = &snapshot[0];
    assert_eq!(
        (d["latitude"].as_f64(), d["longitude"].as_f64()),
        (Some(31.25), Some(121.47))
    );
    assert_eq!(
        (d["status"].as_str(), d["speed_mps"].as_f64()),
        (Some("busy"), Some(8.5))
    );
    assert!(d["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));

    s.report(
        json!({"driver_id": "new", "latitude": 31.26, "longitude": 121.48,
                    "timestamp": "2026-01-02T03:04:05Z", "heading_deg": 90}),
    )
    .await;
    let m = next(&mut ws).await;
    assert_eq!(
        m,
        json!({"type": "position", "driver_id": "new", "latitude": 31.26, "longitude": 121.48,
               "status": "online", "timestamp": "2026-01-02T03:04:05Z", "heading_deg": 90.0})
    );
    s.report(at("outside", (31.41, 121.47))).await;
    s.report(at("inside", (31.251, 121.47))).await;
    // The driver outside the box was never sent: the next message is the one inside.
    assert_eq!(summary(&next(&mut ws).await), "position:inside");
}

#[tokio::test]
async fn circle_and_driver_id_subscriptions() {
    let s = Server::start();
    s.report(at("near", (31.2301, 121.4701))).await;
    s.report(at("far", (31.25, 121.47))).await;
    let (mut circle, snapshot) = subscribe(&s, "lat=31.23&lon=121.47&radius_m=500").await;
    assert_eq!(ids(&snapshot), ["near"]);
    let (mut listed, snapshot) = subscribe(&s, "driver_id=far,ghost").await;
    assert_eq!(ids(&snapshot), ["far"]);

    s.report(at("far", (31.26, 121.47))).await;
    s.report(at("other", (31.2302, 121.4702))).await;
    s.report(at("ghost", (1.0, 1.0))).await;
    assert_eq!(summary(&next(&mut circle).await), "position:other");
    assert_eq!(summary(&next(&mut listed).await), "position:far");
    assert_eq!(summary(&next(&mut listed).await), "position:ghost");
}

#[tokio::test]
async fn leaving_the_area_or_going_offline_is_a_removed() {
    let s = Server::start();
    let (mut ws, _) = subscribe(&s, CITY).await;
    s.report(at("mover", IN)).await;
    s.report(at("quitter", IN)).await;
    assert_eq!(summary(&next(&mut ws).await), "position:mover");
    assert_eq!(summary(&next(&mut ws).await), "position:quitter");
    s.report(at("mover", OUT)).await;
    assert_eq!(
        next(&mut ws).await,
        json!({"type": "removed", "driver_id": "mover", "reason": "left_area"})
    );
    s.report(with_status(at("quitter", IN), "offline")).await;
    assert_eq!(
        next(&mut ws).await,
        json!({"type": "removed", "driver_id": "quitter", "reason": "offline"})
    );
    // Coming back is a position again.
    s.report(at("mover", IN)).await;
    assert_eq!(summary(&next(&mut ws).await), "position:mover");
}

#[tokio::test]
async fn a_silent_driver_expires_from_the_stream() {
    let s = Server::start_with(&["--driver-ttl", "1s"], &[]);
    let (mut ws, _) = subscribe(&s, CITY).await;
    s.report(at("quiet", IN)).await;
    assert_eq!(summary(&next(&mut ws).await), "position:quiet");
    let started = Instant::now();
    assert_eq!(
        next(&mut ws).await,
        json!({"type": "removed", "driver_id": "quiet", "reason": "expired"})
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "expired too early"
    );
}

#[tokio::test]
async fn the_status_filter_decides_who_is_in_scope() {
    let s = Server::start();
    let (mut ws, _) = subscribe(&s, &format!("{CITY}&status=busy")).await;
    s.report(at("free", IN)).await;
    s.report(with_status(at("hired", IN), "busy")).await;
    assert_eq!(summary(&next(&mut ws).await), "position:hired");
    // Free again: out of this subscriber's scope.
    s.report(at("hired", IN)).await;
    assert_eq!(summary(&next(&mut ws).await), "removed:hired:left_area");
}

#[tokio::test]
async fn min_interval_coalesces_to_the_latest_position() {
    let s = Server::start();
    let (mut ws, _) = subscribe(&s, "driver_id=busy-bee&min_interval_ms=1000").await;
    let last = 30;
    for i in 0..=last {
        s.report(at("busy-bee", (31.25, 121.40 + i as f64 * 0.001)))
            .await;
    }
    let latest = 121.40 + last as f64 * 0.001;
    let mut received = 0;
    loop {
        let m = next(&mut ws).await;
        assert_eq!(m["type"], "position");
        received += 1;
        if (m["longitude"].as_f64().unwrap() - latest).abs() < 1e-9 {
            break;
        }
    }
    assert!(
        received <= 5,
        "{received} messages for {} updates",
        last + 1
    );
}

#[tokio::test]
async fn a_websocket_client_changes_its_area_without_reconnecting() {
    let s = Server::start();
    s.report(at("in-paris", (48.8566, 2.3522))).await;
    let (mut ws, _) = subscribe(&s, CITY).await;
    s.report(at("in-shanghai", IN)).await;
    assert_eq!(summary(&next(&mut ws).await), "position:in-shanghai");

    send_json(
        &mut ws,
        &json!({"type": "subscribe", "lat": 48.8566, "lon": 2.3522, "radius_m": 2000}),
    )
    .await;
    assert_eq!(ids(&read_snapshot(&mut ws).await), ["in-paris"]);
    s.report(at("in-shanghai", (31.251, 121.47))).await;
    s.report(at("in-paris", (48.857, 2.3522))).await;
    assert_eq!(summary(&next(&mut ws).await), "position:in-paris");

    // A bad subscription is answered with an error, and the current one goes on.
    send_json(&mut ws, &json!({"type": "subscribe", "bbox": "1,2,3"})).await;
    let error = next(&mut ws).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "validation_failed");
    assert_eq!(error["error"]["details"][0]["field"], "bbox");
    ws.send(Message::text("{not json")).await.unwrap();
    assert_eq!(next(&mut ws).await["error"]["code"], "malformed_json");
    s.report(at("in-paris", (48.858, 2.3522))).await;
    assert_eq!(summary(&next(&mut ws).await), "position:in-paris");
}

/// An SSE response read event by event.
pub(crate) struct Sse {
    response: reqwest::Response,
    buffer: String,
}

/// One SSE block: a comment, or an event (name, if any, and its data).
#[derive(Debug)]
enum Event {
    Comment(String),
    Data(Option<String>, Value),
}

impl Sse {
    // (used by the trust tests too)
    pub(crate) async fn open(s: &Server, query: &str) -> Sse {
        let response = s.get(&format!("/v1/stream/sse?{query}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Sse {
            response,
            buffer: String::new(),
        }
    }

    /// The next block, or `None` when the stream ended.
    async fn next_event(&mut self) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return Some(parse_block(block.trim_end()));
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("no event within the deadline")
                .expect("read error")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// The next `data:` message (comments skipped).
    pub(crate) async fn next(&mut self) -> Value {
        loop {
            match self.next_event().await.expect("the stream ended") {
                Event::Data(None, data) => return data,
                Event::Data(Some(name), data) => panic!("unexpected event {name}: {data}"),
                Event::Comment(_) => continue,
            }
        }
    }
}

fn parse_block(block: &str) -> Event {
    if let Some(comment) = block.strip_prefix(':') {
        return Event::Comment(comment.trim().to_string());
    }
    let mut name = None;
    let mut data = None;
    for line in block.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = Some(n.to_string());
        } else if let Some(d) = line.strip_prefix("data: ") {
            data = Some(serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")));
        } else {
            panic!("unexpected line {line:?}");
        }
    }
    Event::Data(name, data.expect("an event without data"))
}

#[tokio::test]
async fn sse_carries_the_same_feed_with_keep_alives() {
    let s = Server::start_with(&[], &[("FLEET_STREAM_KEEPALIVE", "200ms")]);
    s.report(at("early", IN)).await;
    let mut sse = Sse::open(&s, CITY).await;
    let snapshot = sse.next().await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(ids(snapshot["drivers"].as_array().unwrap()), ["early"]);
    s.report(at("late", IN)).await;
    assert_eq!(summary(&sse.next().await), "position:late");
    s.report(at("late", OUT)).await;
    assert_eq!(summary(&sse.next().await), "removed:late:left_area");
    let mut comments = 0;
    while comments < 2 {
        match sse.next_event().await.expect("the stream ended") {
            Event::Comment(text) => {
                assert_eq!(text, "keep-alive");
                comments += 1;
            }
            other => panic!("expected a keep-alive, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn invalid_parameters_are_422_before_any_upgrade() {
    let s = Server::start();
    let r = s.get("/v1/stream?bbox=1,2,3&status=asleep").await;
    let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(detail_fields(&body), ["bbox", "status"]);
    let r = s.get("/v1/stream/sse?lat=91&lon=0&min_interval_ms=x").await;
    let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(detail_fields(&body), ["lat", "min_interval_ms"]);
    let r = s.get("/v1/stream/sse?bbox=1,2,3,4&driver_id=a").await;
    let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(detail_fields(&body), ["driver_id"]);
    let body = assert_error(
        s.get("/v1/stream").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_fields(&body), ["bbox"]);

    // A WebSocket handshake with a bad query gets the same 422 instead of an upgrade.
    let err = connect_async(format!("ws://{}/v1/stream?radius_m=5", s.addr))
        .await
        .expect_err("no upgrade");
    let tokio_tungstenite::tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP answer, got {err}")
    };
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
    assert_eq!(detail_fields(&body), ["lat", "lon"]);

    // A valid query without an upgrade: 426, JSON.
    assert_error(
        s.get(&format!("/v1/stream?{CITY}")).await,
        StatusCode::UPGRADE_REQUIRED,
        "upgrade_required",
    )
    .await;
    assert_error(
        s.get("/v1/ingest").await,
        StatusCode::UPGRADE_REQUIRED,
        "upgrade_required",
    )
    .await;
}

#[tokio::test]
async fn a_subscriber_that_does_not_read_is_closed_and_counted_while_ingestion_goes_on() {
    // A batch fits in the queue and the backlog: only not reading for a second closes `slow`.
    let s = Server::start_with(
        &[],
        &[
            ("FLEET_STREAM_QUEUE", "256"),
            ("FLEET_STREAM_BACKLOG", "5000"),
            ("FLEET_STREAM_MAX_LAG", "1s"),
        ],
    );
    let (mut slow, _) = subscribe(&s, "bbox=121.0,31.0,122.0,32.0").await;
    let (mut healthy, _) = subscribe(&s, "driver_id=d0").await;
    // `slow` reads nothing from now on, until it has been closed.
    let deadline = Instant::now() + Duration::from_secs(60);
    for round in 0.. {
        let locations: Vec<Value> = (0..200)
            .map(|i| {
                at(
                    &format!("d{i}"),
                    (31.5 + round as f64 * 1e-5, 121.5 + i as f64 * 1e-4),
                )
            })
            .collect();
        let started = Instant::now();
        let r = s
            .post_json("/v1/locations/batch", &json!({ "locations": locations }))
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "ingestion waited {:?}",
            started.elapsed()
        );
        // A subscriber that reads is unaffected.
        assert_eq!(summary(&next(&mut healthy).await), "position:d0");
        if metric(&s, r#"stream_subscribers_closed_total{reason="too_slow"}"#).await >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow subscriber was never closed"
        );
    }
    let (code, reason) = close_of(&mut slow).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Again, "subscriber too slow")
    );
    assert!(metric(&s, r#"stream_messages_dropped_total{reason="coalesced"}"#).await > 0.0);
    eventually(WAIT, "the closed subscriber leaves the gauge", || async {
        metric(&s, r#"stream_subscribers{transport="ws"}"#).await == 1.0
    })
    .await;
    assert_eq!(
        metric(&s, r#"stream_subscribers_closed_total{reason="too_slow"}"#).await,
        1.0
    );
}

#[tokio::test]
async fn devices_report_over_a_websocket() {
    let s = Server::start();
    let (mut watcher, _) = subscribe(&s, CITY).await;
    let mut device = connect(&s, "/v1/ingest").await;
    send_json(&mut device, &at("dev-1", IN)).await;
    assert_eq!(
        next(&mut device).await,
        json!({"type": "ack", "accepted": 1, "rejected": []})
    );
    assert_eq!(s.get("/v1/drivers/dev-1").await.status(), StatusCode::OK);
    assert_eq!(summary(&next(&mut watcher).await), "position:dev-1");

    send_json(
        &mut device,
        &json!({"locations": [at("dev-2", IN), {"driver_id": "dev-3", "latitude": 95, "longitude": 0}]}),
    )
    .await;
    let ack = next(&mut device).await;
    assert_eq!(
        (ack["type"].as_str(), ack["accepted"].as_u64()),
        (Some("ack"), Some(1))
    );
    assert_eq!(ack["rejected"][0]["index"], 1);
    assert_eq!(ack["rejected"][0]["error"]["code"], "validation_failed");
    assert_eq!(
        ack["rejected"][0]["error"]["details"][0]["field"],
        "latitude"
    );

    // Malformed messages are answered, and the connection stays open.
    device.send(Message::text("{oops")).await.unwrap();
    let error = next(&mut device).await;
    assert_eq!(
        (error["type"].as_str(), error["error"]["code"].as_str()),
        (Some("error"), Some("malformed_json"))
    );
    send_json(&mut device, &json!({"locations": []})).await;
    assert_eq!(
        next(&mut device).await["error"]["code"],
        "validation_failed"
    );
    send_json(&mut device, &at("dev-1", (31.26, 121.47))).await;
    assert_eq!(next(&mut device).await["accepted"], 1);
    device.close(None).await.unwrap();

    // A flood of them closes the connection with a reason.
    let mut flooder = connect(&s, "/v1/ingest").await;
    for _ in 0..20 {
        if flooder.send(Message::text("not json")).await.is_err() {
            break;
        }
    }
    let (code, reason) = close_of(&mut flooder).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Policy, "too many invalid messages")
    );
    eventually(WAIT, "the flood is counted", || async {
        metric(&s, r#"ingest_connections_closed_total{reason="policy"}"#).await == 1.0
    })
    .await;
}

#[tokio::test]
async fn draining_closes_streams_with_a_reason_and_does_not_hold_the_shutdown() {
    let mut s = Server::start();
    let (mut ws, _) = subscribe(&s, CITY).await;
    let mut device = connect(&s, "/v1/ingest").await;
    let mut sse = Sse::open(&s, CITY).await;
    assert_eq!(sse.next().await["type"], "snapshot");
    let started = Instant::now();
    s.signal("TERM");
    assert_eq!(close_of(&mut ws).await.0, CloseCode::Away);
    assert_eq!(close_of(&mut device).await.0, CloseCode::Away);
    // Reading on sends the clients' half of the closing handshake, which the server waits for.
    for socket in [&mut ws, &mut device] {
        let _ = tokio::time::timeout(WAIT, async { while socket.next().await.is_some() {} }).await;
    }
    match sse.next_event().await {
        Some(Event::Data(Some(name), data)) => {
            assert_eq!(name, "error");
            assert_eq!(data["error"]["code"], "shutting_down");
        }
        other => panic!("expected the final error event, got {other:?}"),
    }
    assert!(
        sse.next_event().await.is_none(),
        "the stream ends after the error event"
    );
    assert!(s.wait_exit(Duration::from_secs(10)).success());
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn the_push_endpoints_are_documented() {
    let s = Server::start();
    let doc = json(s.get("/openapi.json").await).await;
    for path in ["/v1/stream", "/v1/stream/sse", "/v1/ingest"] {
        let get = &doc["paths"][path]["get"];
        assert!(
            get["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{path}"
        );
    }
    let params: Vec<&str> = doc["paths"]["/v1/stream"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        params,
        [
            "bbox",
            "lat",
            "lon",
            "radius_m",
            "driver_id",
            "status",
            "min_interval_ms"
        ]
    );
    assert!(doc["components"]["schemas"]["PositionMessage"].is_object());
}
