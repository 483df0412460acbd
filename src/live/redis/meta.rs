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

/// Appends the 5 per-position arguments the upsert scripts take: id, ts, status, fix (see
/// [`fix`]) and geo score.
pub fn push_args(cmd: &mut Cmd, p: &Position) {
    cmd.arg(p.driver_id.as_str())
        .arg(p.timestamp)
        .arg(p.status.as_str())
        .arg(fix(p))
        .arg(geo_score(p.lat_e6, p.lon_e6));
}

/// The `fix` field: `lat,lon,speed,heading,accuracy` (micro-degrees, then the measurements, each
/// empty when unknown). One field instead of five: every field costs the scripts a listpack
/// search and a Lua string per position (BENCHMARKS.md, issue 5 section 3).
pub fn fix(p: &Position) -> String {
    use std::fmt::Write;
    let mut out = format!("{},{}", p.lat_e6, p.lon_e6);
    for v in [p.speed_mps, p.heading_deg, p.accuracy_m] {
        out.push(',');
        if let Some(v) = v {
            // Into the same buffer: this runs for every position of every batch.
            let _ = write!(out, "{v}");
        }
    }
    out
}

/// The position fields of a `fix`: lat, lon, speed, heading, accuracy.
fn parse_fix(fix: &str) -> Result<(i32, i32, [Option<f32>; 3]), RedisLiveError> {
    let bad = || RedisLiveError::Reply(format!("bad fix {fix:?} in meta hash"));
    let mut parts = fix.split(',');
    let mut coordinate = || -> Result<i32, RedisLiveError> {
        parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)
    };
    let (lat, lon) = (coordinate()?, coordinate()?);
    let mut measures = [None; 3];
    for m in &mut measures {
        let v = parts.next().ok_or_else(bad)?;
        if !v.is_empty() {
            *m = Some(v.parse().map_err(|_| bad())?);
        }
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok((lat, lon, measures))
}

/// The fields a read takes, in the order [`parse`] expects them.
pub const FIELDS: [&str; 4] = ["seen", "ts", "status", "fix"];

/// A `TIME` reply as milliseconds.
pub fn time_ms(v: &Value) -> Result<i64, RedisLiveError> {
    match v {
        Value::Array(parts) if parts.len() == 2 => {
            Ok(int(&parts[0])? * 1000 + int(&parts[1])? / 1000)
        }
        other => Err(RedisLiveError::Reply(format!("TIME reply {other:?}"))),
    }
}

/// One `HMGET` of [`FIELDS`]: `None` when the hash is absent (or incomplete: a hash of the layout
/// before `fix`, see [`super::keys`]), or expired (`seen` a TTL or more before `now_ms`) unless
/// `raw`; else whether it is fresh and the position.
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
    if f.iter().any(|v| matches!(v, Value::Nil)) {
        return Ok(None);
    }
    let fresh = now_ms - int(&f[0])? < ttl_ms as i64;
    if !fresh && !raw {
        return Ok(None);
    }
    let status = Status::parse(text(&f[2])?)
        .ok_or_else(|| RedisLiveError::Reply("unknown status in meta hash".into()))?;
    let (lat_e6, lon_e6, [speed_mps, heading_deg, accuracy_m]) = parse_fix(text(&f[3])?)?;
    let position = Position {
        driver_id: DriverId::new(driver_id),
        lat_e6,
        lon_e6,
        status,
        timestamp: int(&f[1])?,
        speed_mps,
        heading_deg,
        accuracy_m,
    };
    Ok(Some((fresh, position)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixes_round_trip_exactly() {
        let mut p = Position {
            driver_id: DriverId::new("d"),
            lat_e6: -33_868_820,
            lon_e6: 151_209_296,
            status: Status::Busy,
            timestamp: 1,
            speed_mps: Some(0.1),
            heading_deg: None,
            accuracy_m: Some(3.25),
        };
        assert_eq!(fix(&p), "-33868820,151209296,0.1,,3.25");
        assert_eq!(
            parse_fix(&fix(&p)).unwrap(),
            (-33_868_820, 151_209_296, [Some(0.1), None, Some(3.25)])
        );
        p.speed_mps = None;
        p.accuracy_m = None;
        assert_eq!(fix(&p), "-33868820,151209296,,,");
        assert_eq!(
            parse_fix(&fix(&p)).unwrap().2,
            [None, None, None],
            "unknown measurements stay unknown"
        );
    }

    #[test]
    fn malformed_fixes_are_errors() {
        for bad in ["", "1", "1,2", "1,2,,", "1,2,,,,", "x,2,,,", "1,2,fast,,"] {
            assert!(parse_fix(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
