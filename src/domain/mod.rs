//! The vocabulary of the service: drivers, their positions and statuses, and the rules a reported
//! position must satisfy. Nothing here does I/O or knows about HTTP, so every transport (HTTP today,
//! WebSocket and Redis-fed workers later) validates positions the same way.

pub mod field;
pub mod position;
pub mod tenant;
mod time;

pub use field::{Field, NumberField, TextField};
pub use position::{
    validate_position, DriverId, FieldError, Position, PositionInput, Status, StatusSet,
    MAX_DRIVER_ID_LEN, MAX_FUTURE_SKEW_MICROS,
};
pub use time::{format_rfc3339, now_micros, parse_rfc3339, parse_rfc3339_in_query, Micros};
