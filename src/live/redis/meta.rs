//! The meta hash `driver:<id>:meta` as script arguments and back (see [`super::keys`]).

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

/// One entry of a READ script reply: `None` for 0 (absent), else whether it is fresh and the
/// position.
pub fn parse(driver_id: &str, v: &Value) -> Result<Option<(bool, Position)>, RedisLiveError> {
    let Value::Array(f) = v else {
        return Ok(None);
    };
    if f.len() != 8 {
        return Err(RedisLiveError::Reply(format!(
            "meta reply of {} fields",
            f.len()
        )));
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
    Ok(Some((int(&f[0])? == 1, position)))
}
