//! The meta hash `driver:<id>:meta` as script arguments and back (see [`super::keys`]).
//!
//! Reads are plain `HMGET`s in a pipeline behind one `TIME` (the clock `seen` was written with),
//! not a script: at the centre of 1,000,000 packed drivers a nearby query (66 hashes) cost Redis
//! ~320 µs of CPU through a Lua script and ~170 µs this way (BENCHMARKS.md); each hash is still
//! read atomically, and the freshness test is the scripts' (`now - seen < TTL`).

use super::scripts::{geo_score, int, text};
use super::RedisLiveError;
use crate::domain::{DriverId, Position, Status};
use redis::{Cmd, Value};

/// Appends the 9 per-position arguments the upsert scripts take: id ts lat lon status speed
/// heading accuracy geo-score (unknown measurements as empty strings).
pub fn push_args(cmd: &mut Cmd, p: &Position) {
    cmd.arg(p.driver_id.as_str())
        .arg(p.timestamp)
        .arg(p.lat_e6)
        .arg(p.lon_e6)
        .arg(p.status.as_str());
    for v in [p.speed_mps, p.heading_deg, p.accuracy_m] {
        match v {
            Some(v) => cmd.arg(v),
            None => cmd.arg(""),
        };
    }
    cmd.arg(geo_score(p.lat_e6, p.lon_e6));
}

fn measure(v: &Value) -> Result<Option<f32>, RedisLiveError> {
    let t = text(v)?;
    if t.is_empty() {
        return Ok(None);
    }
    t.parse()
        .map(Some)
        .map_err(|_| RedisLiveError::Reply(format!("bad measurement {t:?}")))
}

/// The fields a read takes, in the order [`parse`] expects them.
pub const FIELDS: [&str; 8] = [
    "seen", "ts", "lat", "lon", "status", "speed", "heading", "accuracy",
];

/// A `TIME` reply as milliseconds.
pub fn time_ms(v: &Value) -> Result<i64, RedisLiveError> {
    match v {
        Value::Array(parts) if parts.len() == 2 => {
            Ok(int(&parts[0])? * 1000 + int(&parts[1])? / 1000)
        }
        other => Err(RedisLiveError::Reply(format!("TIME reply {other:?}"))),
    }
}

/// One `HMGET` of [`FIELDS`]: `None` when the hash is absent (or incomplete), or expired (`seen` a
/// TTL or more before `now_ms`) unless `raw`; else whether it is fresh and the position.
pub fn parse(
    driver_id: &str,
    v: &Value,
    now_ms: i64,
    ttl_ms: u64,
    raw: bool,
) -> Result<Option<(bool, Position)>, RedisLiveError> {
    let Value::Array(f) = v else {
        return Err(RedisLiveError::Reply(format!("meta reply {v:?}")));
    };
    if f.len() != FIELDS.len() {
        return Err(RedisLiveError::Reply(format!(
            "meta reply of {} fields",
            f.len()
        )));
    }
    if f[..5].iter().any(|v| matches!(v, Value::Nil)) {
        return Ok(None);
    }
    let fresh = now_ms - int(&f[0])? < ttl_ms as i64;
    if !fresh && !raw {
        return Ok(None);
    }
    let status = Status::parse(text(&f[4])?)
        .ok_or_else(|| RedisLiveError::Reply("unknown status in meta hash".into()))?;
    let position = Position {
        driver_id: DriverId::new(driver_id),
        lat_e6: int(&f[2])? as i32,
        lon_e6: int(&f[3])? as i32,
        status,
        timestamp: int(&f[1])?,
        speed_mps: measure(&f[5])?,
        heading_deg: measure(&f[6])?,
        accuracy_m: measure(&f[7])?,
    };
    Ok(Some((fresh, position)))
}
