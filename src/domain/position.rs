//! A reported GPS position and the rules it must satisfy before the service accepts it.
//!
//! Coordinates are stored as integer micro-degrees (`lat_e6`): the API rounds to 6 decimals anyway
//! (about 11 cm), integers compare exactly, and two `i32` take half the memory of two `f64` in an index
//! that holds a million drivers.

use super::field::{NumberField, TextField};
use super::time::{parse_rfc3339, Micros};
use super::Field;
use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest accepted driver id, in bytes (all accepted characters are ASCII).
pub const MAX_DRIVER_ID_LEN: usize = 64;
/// A timestamp further ahead of the server clock than this is rejected as a broken device clock.
/// Hard bound on timestamps ahead of the server clock, whatever the filters say: beyond it a fix
/// is refused by validation (the `future` sanity filter, 5 minutes by default, is the usual limit).
pub const MAX_FUTURE_SKEW_MICROS: Micros = 24 * 3600 * 1_000_000;

/// A driver's id: 1–64 characters of `A-Z a-z 0-9 _ . : @ -`, inline for up to 24 bytes.
pub type DriverId = CompactString;

/// What a driver is doing: free for work, on a job, or off shift (never returned by nearby search).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Status {
    Online = 0,
    Busy = 1,
    Offline = 2,
}

impl Status {
    pub const ALL: [Status; 3] = [Status::Online, Status::Busy, Status::Offline];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Busy => "busy",
            Status::Offline => "offline",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        match text {
            "online" => Some(Status::Online),
            "busy" => Some(Status::Busy),
            "offline" => Some(Status::Offline),
            _ => None,
        }
    }

    pub fn from_index(i: u8) -> Status {
        match i {
            0 => Status::Online,
            1 => Status::Busy,
            _ => Status::Offline,
        }
    }
}

/// A set of statuses as a bit mask, for filters evaluated per candidate in the hot loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSet(u8);

impl StatusSet {
    /// The nearby search default: drivers who are working.
    pub const WORKING: StatusSet = StatusSet(0b011);

    pub fn empty() -> StatusSet {
        StatusSet(0)
    }
    pub fn insert(&mut self, s: Status) {
        self.0 |= 1 << s as u8;
    }
    pub fn contains(self, s: Status) -> bool {
        self.0 & (1 << s as u8) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// A position as it arrives on the wire. Every field is lenient (see [`Field`]) so that validation
/// can report all bad fields at once; unknown fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = LocationInput)]
pub struct PositionInput {
    /// 1–64 characters of `A-Z a-z 0-9 _ . : @ -`.
    #[serde(default)]
    #[schema(value_type = String, example = "drv-42")]
    pub driver_id: TextField,
    /// Degrees, −90..90; rounded to 6 decimals.
    #[serde(default)]
    #[schema(value_type = f64, example = 31.2304)]
    pub latitude: NumberField,
    /// Degrees, −180..180; rounded to 6 decimals.
    #[serde(default)]
    #[schema(value_type = f64, example = 121.4737)]
    pub longitude: NumberField,
    /// `online` (default), `busy` or `offline`.
    #[serde(default)]
    #[schema(value_type = Option<Status>)]
    pub status: TextField,
    /// RFC 3339; defaults to the time of receipt. More than `--max-ahead` (default 5 minutes) in the
    /// future is rejected.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub timestamp: TextField,
    /// Metres per second, ≥ 0.
    #[serde(default)]
    #[schema(value_type = Option<f64>)]
    pub speed_mps: NumberField,
    /// Degrees clockwise from north, 0 ≤ x < 360.
    #[serde(default)]
    #[schema(value_type = Option<f64>)]
    pub heading_deg: NumberField,
    /// Horizontal accuracy in metres, ≥ 0.
    #[serde(default)]
    #[schema(value_type = Option<f64>)]
    pub accuracy_m: NumberField,
}

/// A validated position. Optional measurements are `f32`: a device's speed or heading carries far
/// fewer than 7 significant digits.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub driver_id: DriverId,
    pub lat_e6: i32,
    pub lon_e6: i32,
    pub status: Status,
    pub timestamp: Micros,
    pub speed_mps: Option<f32>,
    pub heading_deg: Option<f32>,
    pub accuracy_m: Option<f32>,
}

impl Position {
    pub fn latitude(&self) -> f64 {
        self.lat_e6 as f64 / 1e6
    }
    pub fn longitude(&self) -> f64 {
        self.lon_e6 as f64 / 1e6
    }
}

/// One invalid field, named as the client spelled it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Collects the errors of one position while its fields are checked.
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    fn wrong_type(&mut self, field: &str, expected: &str, got: &str) {
        self.fail(field, format!("must be {expected}, got {got}"));
    }

    fn required_number(&mut self, field: &str, value: &NumberField, min: f64, max: f64) -> f64 {
        match *value {
            Field::Value(v) if (min..=max).contains(&v) => return v,
            Field::Value(v) => {
                self.fail(field, format!("must be between {min} and {max}, got {v}"))
            }
            Field::Missing => self.fail(field, "is required"),
            Field::WrongType(got) => self.wrong_type(field, "a number", got),
        }
        0.0
    }

    fn optional_measure(&mut self, field: &str, value: &NumberField, max_excl: f64) -> Option<f32> {
        match *value {
            Field::Value(v) if v >= 0.0 && v < max_excl => Some(v as f32),
            Field::Value(v) if max_excl.is_finite() => {
                self.fail(
                    field,
                    format!("must be at least 0 and below {max_excl}, got {v}"),
                );
                None
            }
            Field::Value(v) => {
                self.fail(field, format!("must be at least 0, got {v}"));
                None
            }
            Field::Missing => None,
            Field::WrongType(got) => {
                self.wrong_type(field, "a number", got);
                None
            }
        }
    }

    fn driver_id(&mut self, value: &TextField) -> DriverId {
        match value {
            Field::Value(id) if is_valid_driver_id(id) => return id.clone(),
            Field::Value(_) => self.fail(
                "driver_id",
                "must be 1-64 characters of A-Z a-z 0-9 _ . : @ -",
            ),
            Field::Missing => self.fail("driver_id", "is required"),
            Field::WrongType(got) => self.wrong_type("driver_id", "a string", got),
        }
        DriverId::default()
    }

    fn status(&mut self, value: &TextField) -> Status {
        match value {
            Field::Value(s) => match Status::parse(s) {
                Some(status) => return status,
                None => self.fail("status", "must be one of online, busy, offline"),
            },
            Field::Missing => return Status::Online,
            Field::WrongType(got) => self.wrong_type("status", "a string", got),
        }
        Status::Online
    }

    fn timestamp(&mut self, value: &TextField, received_at: Micros) -> Micros {
        match value {
            Field::Value(text) => match parse_rfc3339(text) {
                Some(t) if t - received_at > MAX_FUTURE_SKEW_MICROS => {
                    self.fail("timestamp", "is more than 24 hours in the future")
                }
                Some(t) => return t,
                None => self.fail("timestamp", "must be an RFC 3339 date-time"),
            },
            Field::Missing => {}
            Field::WrongType(got) => self.wrong_type("timestamp", "a string", got),
        }
        received_at
    }
}

/// True for 1–64 characters of `A-Z a-z 0-9 _ . : @ -`.
pub fn is_valid_driver_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DRIVER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

/// Rounds degrees to integer micro-degrees (6 decimals).
fn to_e6(degrees: f64) -> i32 {
    (degrees * 1e6).round() as i32
}

/// Checks every field of `input`; on success the position, else one error per bad field.
/// `received_at` is the default timestamp and the reference for the future-skew rule.
pub fn validate_position(
    input: &PositionInput,
    received_at: Micros,
) -> Result<Position, Vec<FieldError>> {
    let mut c = Checker { errors: Vec::new() };
    let driver_id = c.driver_id(&input.driver_id);
    let latitude = c.required_number("latitude", &input.latitude, -90.0, 90.0);
    let longitude = c.required_number("longitude", &input.longitude, -180.0, 180.0);
    let status = c.status(&input.status);
    let timestamp = c.timestamp(&input.timestamp, received_at);
    let speed_mps = c.optional_measure("speed_mps", &input.speed_mps, f64::INFINITY);
    let heading_deg = c.optional_measure("heading_deg", &input.heading_deg, 360.0);
    let accuracy_m = c.optional_measure("accuracy_m", &input.accuracy_m, f64::INFINITY);
    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    Ok(Position {
        driver_id,
        lat_e6: to_e6(latitude),
        lon_e6: to_e6(longitude),
        status,
        timestamp,
        speed_mps,
        heading_deg,
        accuracy_m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_rfc3339;

    const NOW: Micros = 1_790_000_000_000_000;

    fn check(json: &str) -> Result<Position, Vec<FieldError>> {
        let input: PositionInput = serde_json::from_str(json).unwrap();
        validate_position(&input, NOW)
    }

    fn fields(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn minimal_position_gets_defaults_and_rounding() {
        let p =
            check(r#"{"driver_id":"d-1","latitude":31.2304567,"longitude":-121.4737}"#).unwrap();
        assert_eq!(p.driver_id, "d-1");
        assert_eq!((p.lat_e6, p.lon_e6), (31_230_457, -121_473_700));
        assert_eq!(p.status, Status::Online);
        assert_eq!(p.timestamp, NOW);
        assert_eq!(
            (p.speed_mps, p.heading_deg, p.accuracy_m),
            (None, None, None)
        );
    }

    #[test]
    fn full_position_keeps_every_field() {
        let p = check(
            r#"{"driver_id":"A.b:c@d_e-9","latitude":-90,"longitude":180,"status":"busy",
                "timestamp":"2026-01-01T00:00:00Z","speed_mps":0,"heading_deg":359.9,
                "accuracy_m":4.5,"vendor":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(p.status, Status::Busy);
        assert_eq!(p.timestamp, parse_rfc3339("2026-01-01T00:00:00Z").unwrap());
        assert_eq!(p.heading_deg, Some(359.9));
        assert_eq!(p.accuracy_m, Some(4.5));
        assert_eq!(p.speed_mps, Some(0.0));
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = check(
            r#"{"driver_id":"bad id!","latitude":91,"longitude":"east","status":"asleep",
                "timestamp":"soon","speed_mps":-1,"heading_deg":360,"accuracy_m":true}"#,
        )
        .unwrap_err();
        assert_eq!(
            fields(errors),
            [
                "driver_id",
                "latitude",
                "longitude",
                "status",
                "timestamp",
                "speed_mps",
                "heading_deg",
                "accuracy_m"
            ]
        );
    }

    #[test]
    fn required_fields_are_required() {
        assert_eq!(
            fields(check("{}").unwrap_err()),
            ["driver_id", "latitude", "longitude"]
        );
    }

    #[test]
    fn driver_id_length_limits() {
        let ok = format!(
            r#"{{"driver_id":"{}","latitude":0,"longitude":0}}"#,
            "a".repeat(64)
        );
        assert!(check(&ok).is_ok());
        let long = format!(
            r#"{{"driver_id":"{}","latitude":0,"longitude":0}}"#,
            "a".repeat(65)
        );
        assert_eq!(fields(check(&long).unwrap_err()), ["driver_id"]);
        let empty = r#"{"driver_id":"","latitude":0,"longitude":0}"#;
        assert_eq!(fields(check(empty).unwrap_err()), ["driver_id"]);
        let unicode = r#"{"driver_id":"drïver","latitude":0,"longitude":0}"#;
        assert_eq!(fields(check(unicode).unwrap_err()), ["driver_id"]);
    }

    #[test]
    fn future_timestamps_beyond_a_day_are_rejected_by_validation() {
        let at = |offset_s: i64| {
            let t = crate::domain::format_rfc3339(NOW + offset_s * 1_000_000);
            check(&format!(
                r#"{{"driver_id":"d","latitude":0,"longitude":0,"timestamp":"{t}"}}"#
            ))
        };
        assert!(at(86_399).is_ok());
        assert_eq!(fields(at(86_401).unwrap_err()), ["timestamp"]);
        assert!(at(-86_400 * 365).is_ok());
    }
}
