//! The messages a subscriber receives, serialised once per update and shared by every subscriber
//! that gets it (each queue holds an `Arc` of the same bytes). The same JSON text is a WebSocket
//! text message and an SSE `data:` line.

use super::RemovedReason;
use crate::domain::{format_rfc3339, DriverId, Position, Status};
use bytes::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

/// One serialised message about one driver.
#[derive(Debug)]
pub struct Update {
    pub driver: DriverId,
    /// UTF-8 JSON.
    pub json: Bytes,
}

/// Most drivers in one `snapshot` message; a larger snapshot comes in parts.
pub const SNAPSHOT_PART: usize = 1000;

/// A driver's state as the API shows it: the body of `GET /v1/drivers/{driver_id}` and the driver
/// in stream messages (one shape, so clients parse both the same way).
#[derive(Debug, Serialize, ToSchema)]
pub struct DriverView<'a> {
    #[schema(value_type = String)]
    pub driver_id: &'a str,
    pub latitude: f64,
    pub longitude: f64,
    pub status: Status,
    #[schema(format = DateTime)]
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed_mps: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heading_deg: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_m: Option<f32>,
}

impl<'a> From<&'a Position> for DriverView<'a> {
    fn from(p: &'a Position) -> Self {
        DriverView {
            driver_id: crate::domain::tenant::external(&p.driver_id),
            latitude: p.latitude(),
            longitude: p.longitude(),
            status: p.status,
            timestamp: format_rfc3339(p.timestamp),
            speed_mps: p.speed_mps,
            heading_deg: p.heading_deg,
            accuracy_m: p.accuracy_m,
        }
    }
}

/// `{"type":"position",...}`: an accepted update of a driver in scope.
#[derive(Debug, Serialize, ToSchema)]
pub struct PositionMessage<'a> {
    /// Always `position`.
    #[serde(rename = "type")]
    #[schema(example = "position")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub driver: DriverView<'a>,
}

/// `{"type":"removed","driver_id","reason"}`: a driver left the subscriber's scope.
#[derive(Debug, Serialize, ToSchema)]
pub struct RemovedMessage<'a> {
    /// Always `removed`.
    #[serde(rename = "type")]
    #[schema(example = "removed")]
    pub kind: &'static str,
    #[schema(value_type = String)]
    pub driver_id: &'a str,
    pub reason: RemovedReason,
}

/// `{"type":"snapshot","part","more","drivers"}`: the drivers in scope when the subscription
/// started (or changed). Part 0 replaces whatever the client showed; `more` is false on the last.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotMessage<'a> {
    /// Always `snapshot`.
    #[serde(rename = "type")]
    #[schema(example = "snapshot")]
    pub kind: &'static str,
    pub part: usize,
    pub more: bool,
    pub drivers: Vec<DriverView<'a>>,
}

/// JSON for a message built from our own types (which always serialise); never panics.
pub fn to_json(value: &impl Serialize) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(json) => Bytes::from(json),
        Err(e) => {
            tracing::error!(error = %e, "could not serialise a stream message");
            Bytes::from_static(
                br#"{"type":"error","error":{"code":"internal","message":"internal error"}}"#,
            )
        }
    }
}

pub fn position(p: &Position) -> Update {
    let message = PositionMessage {
        kind: "position",
        driver: DriverView::from(p),
    };
    Update {
        driver: p.driver_id.clone(),
        json: to_json(&message),
    }
}

pub fn removed(driver: &DriverId, reason: RemovedReason) -> Update {
    let message = RemovedMessage {
        kind: "removed",
        driver_id: crate::domain::tenant::external(driver),
        reason,
    };
    Update {
        driver: driver.clone(),
        json: to_json(&message),
    }
}

/// The snapshot of `drivers` as one message per [`SNAPSHOT_PART`] drivers (one, empty, if none).
pub fn snapshot(drivers: &[Position]) -> Vec<Bytes> {
    let parts = drivers.len().div_ceil(SNAPSHOT_PART).max(1);
    (0..parts)
        .map(|part| {
            let from = part * SNAPSHOT_PART;
            let to = (from + SNAPSHOT_PART).min(drivers.len());
            to_json(&SnapshotMessage {
                kind: "snapshot",
                part,
                more: part + 1 < parts,
                drivers: drivers[from..to].iter().map(DriverView::from).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn driver(id: &str) -> Position {
        Position {
            driver_id: id.into(),
            lat_e6: 31_230_400,
            lon_e6: 121_473_700,
            status: Status::Busy,
            timestamp: 1_790_000_000_000_000,
            speed_mps: Some(8.5),
            heading_deg: None,
            accuracy_m: None,
        }
    }

    fn parse(bytes: &Bytes) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn position_and_removed_shapes() {
        let u = position(&driver("drv-1"));
        assert_eq!(u.driver, "drv-1");
        assert_eq!(
            parse(&u.json),
            json!({"type": "position", "driver_id": "drv-1", "latitude": 31.2304,
                   "longitude": 121.4737, "status": "busy",
                   "timestamp": "2026-09-21T14:13:20Z", "speed_mps": 8.5})
        );
        let r = removed(&"drv-1".into(), RemovedReason::LeftArea);
        assert_eq!(
            parse(&r.json),
            json!({"type": "removed", "driver_id": "drv-1", "reason": "left_area"})
        );
    }

    #[test]
    fn snapshots_come_in_parts() {
        let empty = snapshot(&[]);
        assert_eq!(empty.len(), 1);
        assert_eq!(
            parse(&empty[0]),
            json!({"type": "snapshot", "part": 0, "more": false, "drivers": []})
        );
        let many: Vec<Position> = (0..2500).map(|i| driver(&format!("d{i}"))).collect();
        let parts: Vec<Value> = snapshot(&many).iter().map(parse).collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0]["more"], true);
        assert_eq!(parts[2]["more"], false);
        assert_eq!(parts[2]["part"], 2);
        assert_eq!(parts[2]["drivers"].as_array().unwrap().len(), 500);
        assert_eq!(parts[1]["drivers"][0]["driver_id"], "d1000");
    }
}
