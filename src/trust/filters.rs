//! GPS sanity filters: positions a device can send but nobody should believe.
//!
//! Field validation ([`crate::domain::validate_position`]) answers "is this a well-formed
//! position?"; these filters answer "is it plausible?", which depends on the server clock and on the
//! driver's previous fix, and which operators need to tune (a fleet of ferries or a test rig with
//! (0,0) fixtures). Every filter can be switched off on its own.
//!
//! | reason | rule (defaults) | anomaly? |
//! |---|---|---|
//! | `null_island` | exactly (0, 0) after rounding to 6 decimals: a GPS chip with no fix | no |
//! | `future` | timestamp more than 5 min ahead of the server clock | no |
//! | `too_old` | timestamp more than 24 h behind the server clock | no |
//! | `impossible_speed` | distance ÷ time from the previous fix above 250 km/h | yes |
//! | `teleport` | same timestamp as the previous fix, but farther away than 1 s at max speed | yes |
//!
//! Duplicates (same driver and timestamp as the previous fix, close to it) are not rejections:
//! [`Verdict::Duplicate`] means "answer as accepted, store nothing".
//!
//! # How the speed check treats time
//!
//! * It compares a fix only with the driver's **latest** fix (`previous`), and only when the new
//!   fix is **newer**. A late arrival (older than the latest) is accepted unchecked: it does not
//!   replace the latest position, and comparing it with a later fix would measure nothing useful.
//! * The elapsed time has a floor of 1 s ([`MIN_ELAPSED_S`]), so two fixes 100 ms apart with 10 m of
//!   GPS jitter are not "360 km/h".
//! * Reported accuracies are subtracted from the distance (a fix ±50 m from one ±50 m away may be
//!   the same place), so poor fixes need a bigger jump to count.
//! * Fixes more than [`SanityFilters::speed_window`] (1 h) after the previous one are not checked.
//!   Otherwise one rejected-but-real move (a ferry, a tow truck, a device reset) would pin a driver
//!   to the old place forever: every later fix would be compared with the same stale latest fix.
//!
//! The filter is pure: the caller passes the previous fix and the clock, records anomalies
//! ([`super::anomalies`]) and counts rejections ([`super::metrics`]).

use crate::domain::{FieldError, Micros, Position};
use crate::geo::distance_m;
use serde::Serialize;

const SECOND: Micros = 1_000_000;
/// Floor of the elapsed time in the speed check, in seconds.
pub const MIN_ELAPSED_S: f64 = 1.0;

/// The sanity filters; `None` or `false` switches one off.
#[derive(Debug, Clone, PartialEq)]
pub struct SanityFilters {
    /// Reject (0, 0).
    pub reject_null_island: bool,
    /// Reject timestamps further ahead of the server clock than this.
    pub max_ahead: Option<Micros>,
    /// Reject timestamps further behind the server clock than this.
    pub max_age: Option<Micros>,
    /// Reject (and record) fixes implying a higher speed than this, in metres per second.
    pub max_speed_mps: Option<f64>,
    /// Only fixes at most this long after the previous one are speed-checked.
    pub speed_window: Micros,
    /// Treat a fix with the previous fix's timestamp as a duplicate (accepted, not stored).
    pub duplicates: bool,
}

impl Default for SanityFilters {
    fn default() -> Self {
        SanityFilters {
            reject_null_island: true,
            max_ahead: Some(5 * 60 * SECOND),
            max_age: Some(24 * 3600 * SECOND),
            max_speed_mps: Some(kmh_to_mps(250.0)),
            speed_window: 3600 * SECOND,
            duplicates: true,
        }
    }
}

impl SanityFilters {
    /// Every filter off: every well-formed position is accepted.
    pub fn off() -> SanityFilters {
        SanityFilters {
            reject_null_island: false,
            max_ahead: None,
            max_age: None,
            max_speed_mps: None,
            speed_window: 3600 * SECOND,
            duplicates: false,
        }
    }
}

/// km/h to m/s.
pub fn kmh_to_mps(kmh: f64) -> f64 {
    kmh / 3.6
}

/// Why a position was rejected; the `reason` label of `positions_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    NullIsland,
    Future,
    TooOld,
    ImpossibleSpeed,
    Teleport,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::NullIsland,
        Reason::Future,
        Reason::TooOld,
        Reason::ImpossibleSpeed,
        Reason::Teleport,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NullIsland => "null_island",
            Reason::Future => "future",
            Reason::TooOld => "too_old",
            Reason::ImpossibleSpeed => "impossible_speed",
            Reason::Teleport => "teleport",
        }
    }

    /// Suspicious rejections are recorded for risk review ([`super::anomalies`]).
    pub fn is_anomaly(self) -> bool {
        matches!(self, Reason::ImpossibleSpeed | Reason::Teleport)
    }

    /// The field a 422 detail names.
    pub fn field(self) -> &'static str {
        match self {
            Reason::Future | Reason::TooOld => "timestamp",
            Reason::NullIsland | Reason::ImpossibleSpeed | Reason::Teleport => "latitude",
        }
    }

    /// A client-facing explanation.
    pub fn message(self) -> &'static str {
        match self {
            Reason::NullIsland => "is 0,0 (no GPS fix)",
            Reason::Future => "is too far in the future",
            Reason::TooOld => "is too old",
            Reason::ImpossibleSpeed => "implies an impossible speed since the previous position",
            Reason::Teleport => "is far from the previous position at the same timestamp",
        }
    }

    /// The 422 detail for this rejection.
    pub fn field_error(self) -> FieldError {
        FieldError::new(self.field(), self.message())
    }
}

/// What a suspicious jump measured, for the anomaly log.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// Great-circle distance between the fixes, in metres (before the accuracy allowance).
    pub distance_m: f64,
    /// Seconds between the fixes (0 for a teleport).
    pub elapsed_s: f64,
    /// Distance (less the accuracy allowance) over elapsed time (floored at 1 s), in m/s.
    pub implied_speed_mps: f64,
    /// The previous fix, degrees.
    pub from: (f64, f64),
    /// The rejected fix, degrees.
    pub to: (f64, f64),
}

/// The outcome of [`SanityFilters::check`].
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Store it.
    Accept,
    /// Same driver and timestamp as the previous fix: answer as accepted, store nothing.
    Duplicate,
    /// Do not store it; `evidence` is set for anomalies ([`Reason::is_anomaly`]).
    Reject {
        reason: Reason,
        evidence: Option<Evidence>,
    },
}

impl Verdict {
    fn reject(reason: Reason) -> Verdict {
        Verdict::Reject {
            reason,
            evidence: None,
        }
    }
}

impl SanityFilters {
    /// The 422 detail for a rejection, naming the configured limit, e.g. `timestamp` "is more than
    /// 5m in the future".
    pub fn field_error(&self, reason: Reason) -> FieldError {
        let span = |micros: Option<Micros>| {
            let d = std::time::Duration::from_micros(micros.unwrap_or(0).max(0).unsigned_abs());
            humantime::format_duration(d).to_string()
        };
        let message = match reason {
            Reason::Future => format!("is more than {} in the future", span(self.max_ahead)),
            Reason::TooOld => format!("is more than {} old", span(self.max_age)),
            Reason::ImpossibleSpeed => format!(
                "implies more than {:.0} km/h since the previous position",
                self.max_speed_mps.unwrap_or(0.0) * 3.6
            ),
            other => other.message().to_string(),
        };
        FieldError::new(reason.field(), message)
    }

    /// Whether any filter compares a fix with the driver's previous one (speed, duplicates): when
    /// none does, the caller need not read it.
    pub fn needs_previous(&self) -> bool {
        self.max_speed_mps.is_some() || self.duplicates
    }

    /// Judges `new` given the driver's latest stored fix (`previous`, ignored if it belongs to
    /// another driver) and the server clock `now`. Pure and panic-free for any input.
    pub fn check(&self, new: &Position, previous: Option<&Position>, now: Micros) -> Verdict {
        if self.reject_null_island && new.lat_e6 == 0 && new.lon_e6 == 0 {
            return Verdict::reject(Reason::NullIsland);
        }
        if let Some(max_ahead) = self.max_ahead {
            if new.timestamp.saturating_sub(now) > max_ahead {
                return Verdict::reject(Reason::Future);
            }
        }
        if let Some(max_age) = self.max_age {
            if now.saturating_sub(new.timestamp) > max_age {
                return Verdict::reject(Reason::TooOld);
            }
        }
        let Some(prev) = previous.filter(|p| p.driver_id == new.driver_id) else {
            return Verdict::Accept;
        };
        let elapsed = new.timestamp.saturating_sub(prev.timestamp);
        if elapsed < 0 {
            return Verdict::Accept; // a late arrival: see the module docs
        }
        let measure = || {
            let distance = distance_m(
                prev.latitude(),
                prev.longitude(),
                new.latitude(),
                new.longitude(),
            );
            let allowance = accuracy(prev) + accuracy(new);
            let elapsed_s = elapsed as f64 / 1e6;
            Evidence {
                distance_m: distance,
                elapsed_s,
                implied_speed_mps: (distance - allowance).max(0.0) / elapsed_s.max(MIN_ELAPSED_S),
                from: (prev.latitude(), prev.longitude()),
                to: (new.latitude(), new.longitude()),
            }
        };
        let too_fast = |e: &Evidence| {
            self.max_speed_mps
                .is_some_and(|max| e.implied_speed_mps > max)
        };
        if elapsed == 0 {
            let evidence = measure();
            if too_fast(&evidence) {
                return Verdict::Reject {
                    reason: Reason::Teleport,
                    evidence: Some(evidence),
                };
            }
            return if self.duplicates {
                Verdict::Duplicate
            } else {
                Verdict::Accept
            };
        }
        if elapsed > self.speed_window || self.max_speed_mps.is_none() {
            return Verdict::Accept;
        }
        let evidence = measure();
        if too_fast(&evidence) {
            return Verdict::Reject {
                reason: Reason::ImpossibleSpeed,
                evidence: Some(evidence),
            };
        }
        Verdict::Accept
    }
}

/// A fix's reported accuracy in metres, if plausible (ignored above 10 km or if not finite).
fn accuracy(p: &Position) -> f64 {
    match p.accuracy_m {
        Some(a) if a.is_finite() && (0.0..=10_000.0).contains(&a) => f64::from(a),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DriverId, Status};
    use proptest::prelude::*;

    const NOW: Micros = 1_790_000_000_000_000;

    fn pos(driver: &str, lat: f64, lon: f64, ts: Micros) -> Position {
        Position {
            driver_id: DriverId::new(driver),
            lat_e6: (lat * 1e6).round() as i32,
            lon_e6: (lon * 1e6).round() as i32,
            status: Status::Online,
            timestamp: ts,
            speed_mps: None,
            heading_deg: None,
            accuracy_m: None,
        }
    }

    fn reason(v: Verdict) -> Option<Reason> {
        match v {
            Verdict::Reject { reason, .. } => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn null_island_is_exactly_zero_zero() {
        let f = SanityFilters::default();
        assert_eq!(
            reason(f.check(&pos("d", 0.0, 0.0, NOW), None, NOW)),
            Some(Reason::NullIsland)
        );
        assert_eq!(
            f.check(&pos("d", 0.000001, 0.0, NOW), None, NOW),
            Verdict::Accept
        );
        assert_eq!(
            f.check(&pos("d", 0.0, -0.000001, NOW), None, NOW),
            Verdict::Accept
        );
        let off = SanityFilters {
            reject_null_island: false,
            ..SanityFilters::default()
        };
        assert_eq!(
            off.check(&pos("d", 0.0, 0.0, NOW), None, NOW),
            Verdict::Accept
        );
    }

    #[test]
    fn future_boundary_is_inclusive() {
        let f = SanityFilters::default();
        let at = |off: Micros| f.check(&pos("d", 1.0, 1.0, NOW + off), None, NOW);
        assert_eq!(at(300 * SECOND), Verdict::Accept);
        assert_eq!(reason(at(300 * SECOND + 1)), Some(Reason::Future));
        let lenient = SanityFilters {
            max_ahead: Some(3600 * SECOND),
            ..SanityFilters::default()
        };
        assert_eq!(
            lenient.check(&pos("d", 1.0, 1.0, NOW + 3000 * SECOND), None, NOW),
            Verdict::Accept
        );
        let off = SanityFilters {
            max_ahead: None,
            ..SanityFilters::default()
        };
        assert_eq!(
            off.check(&pos("d", 1.0, 1.0, i64::MAX), None, NOW),
            Verdict::Accept
        );
    }

    #[test]
    fn too_old_boundary_is_inclusive() {
        let f = SanityFilters::default();
        let day = 86_400 * SECOND;
        let at = |off: Micros| f.check(&pos("d", 1.0, 1.0, NOW - off), None, NOW);
        assert_eq!(at(day), Verdict::Accept);
        assert_eq!(reason(at(day + 1)), Some(Reason::TooOld));
        let off = SanityFilters {
            max_age: None,
            ..SanityFilters::default()
        };
        assert_eq!(
            off.check(&pos("d", 1.0, 1.0, 0), None, NOW),
            Verdict::Accept
        );
    }

    #[test]
    fn duplicates_are_same_driver_and_timestamp() {
        let f = SanityFilters::default();
        let prev = pos("d", 31.2, 121.4, NOW - SECOND);
        assert_eq!(f.check(&prev.clone(), Some(&prev), NOW), Verdict::Duplicate);
        // Same timestamp, a few metres of jitter: still the same fix.
        let jitter = pos("d", 31.20005, 121.4, NOW - SECOND);
        assert_eq!(f.check(&jitter, Some(&prev), NOW), Verdict::Duplicate);
        // Another driver's fix is no reference.
        let other = pos("e", 31.2, 121.4, NOW - SECOND);
        assert_eq!(f.check(&other, Some(&prev), NOW), Verdict::Accept);
        // One microsecond later is a new fix.
        let next = pos("d", 31.2, 121.4, NOW - SECOND + 1);
        assert_eq!(f.check(&next, Some(&prev), NOW), Verdict::Accept);
        let off = SanityFilters {
            duplicates: false,
            ..SanityFilters::default()
        };
        assert_eq!(off.check(&prev.clone(), Some(&prev), NOW), Verdict::Accept);
    }

    #[test]
    fn teleport_is_a_far_fix_at_the_same_timestamp() {
        let f = SanityFilters::default();
        let prev = pos("d", 31.2, 121.4, NOW);
        let far = pos("d", 31.3, 121.4, NOW); // ~11 km
        match f.check(&far, Some(&prev), NOW) {
            Verdict::Reject {
                reason: Reason::Teleport,
                evidence: Some(e),
            } => {
                assert!((e.distance_m - 11_119.5).abs() < 1.0, "{}", e.distance_m);
                assert_eq!(e.elapsed_s, 0.0);
                assert!(
                    (e.implied_speed_mps - e.distance_m).abs() < 1e-9,
                    "floor of 1 s"
                );
                assert_eq!(e.from, (31.2, 121.4));
                assert_eq!(e.to, (31.3, 121.4));
            }
            other => panic!("{other:?}"),
        }
        assert!(Reason::Teleport.is_anomaly());
    }

    #[test]
    fn impossible_speed_boundary() {
        let f = SanityFilters::default();
        let max = kmh_to_mps(250.0);
        let prev = pos("d", 0.0, 10.0, NOW - 60 * SECOND);
        // One micro-degree of longitude at the equator is ~0.111 m; 60 s at 250 km/h = 4166.7 m.
        let metres_per_e6 = distance_m(0.0, 10.0, 0.0, 10.000001);
        let limit_e6 = (max * 60.0 / metres_per_e6).floor() as i32;
        let at = |e6: i32| {
            let mut p = pos("d", 0.0, 10.0, NOW);
            p.lon_e6 = 10_000_000 + e6;
            f.check(&p, Some(&prev), NOW)
        };
        assert_eq!(at(limit_e6), Verdict::Accept);
        match at(limit_e6 + 1) {
            Verdict::Reject {
                reason: Reason::ImpossibleSpeed,
                evidence: Some(e),
            } => {
                assert!(e.implied_speed_mps > max && e.implied_speed_mps < max + 0.01);
                assert_eq!(e.elapsed_s, 60.0);
            }
            other => panic!("{other:?}"),
        }
        assert!(Reason::ImpossibleSpeed.is_anomaly());
        assert!(!Reason::Future.is_anomaly() && !Reason::TooOld.is_anomaly());
    }

    #[test]
    fn speed_check_edges() {
        let f = SanityFilters::default();
        let prev = pos("d", 31.2, 121.4, NOW - 10 * SECOND);
        let paris = |ts| pos("d", 48.85, 2.35, ts);
        assert_eq!(
            reason(f.check(&paris(NOW), Some(&prev), NOW)),
            Some(Reason::ImpossibleSpeed)
        );
        // Late arrival (older than the latest): not speed-checked.
        assert_eq!(
            f.check(&paris(NOW - 20 * SECOND), Some(&prev), NOW),
            Verdict::Accept
        );
        // Beyond the speed window: accepted so a driver is never pinned to a stale fix.
        let stale_prev = pos("d", 31.2, 121.4, NOW - 3601 * SECOND);
        assert_eq!(
            f.check(&paris(NOW), Some(&stale_prev), NOW),
            Verdict::Accept
        );
        // Speed filter off.
        let off = SanityFilters {
            max_speed_mps: None,
            ..SanityFilters::default()
        };
        assert_eq!(off.check(&paris(NOW), Some(&prev), NOW), Verdict::Accept);
        assert_eq!(
            off.check(&paris(NOW - 10 * SECOND), Some(&prev), NOW),
            Verdict::Duplicate
        );
        // Sub-second jitter is not speed: 10 m in 100 ms is measured over 1 s.
        let a = pos("d", 31.2, 121.4, NOW);
        let b = pos("d", 31.20009, 121.4, NOW + 100_000);
        assert_eq!(f.check(&b, Some(&a), NOW), Verdict::Accept);
    }

    #[test]
    fn accuracy_is_an_allowance() {
        let f = SanityFilters::default();
        let mut prev = pos("d", 31.2, 121.4, NOW - SECOND);
        let mut new = pos("d", 31.201, 121.4, NOW); // ~111 m in 1 s = 400 km/h
        assert_eq!(
            reason(f.check(&new, Some(&prev), NOW)),
            Some(Reason::ImpossibleSpeed)
        );
        prev.accuracy_m = Some(30.0);
        new.accuracy_m = Some(30.0); // 111 - 60 = 51 m/s = 184 km/h
        assert_eq!(f.check(&new, Some(&prev), NOW), Verdict::Accept);
        new.accuracy_m = Some(f32::INFINITY); // implausible accuracy is ignored, not trusted
        prev.accuracy_m = None;
        assert_eq!(
            reason(f.check(&new, Some(&prev), NOW)),
            Some(Reason::ImpossibleSpeed)
        );
    }

    #[test]
    fn all_off_accepts_everything_well_formed() {
        let f = SanityFilters::off();
        let prev = pos("d", 31.2, 121.4, NOW);
        assert_eq!(
            f.check(&pos("d", 0.0, 0.0, i64::MIN), Some(&prev), NOW),
            Verdict::Accept
        );
        assert_eq!(
            f.check(&pos("d", -60.0, 0.0, NOW), Some(&prev), NOW),
            Verdict::Accept
        );
    }

    #[test]
    fn reasons_have_stable_labels_and_details() {
        let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "null_island",
                "future",
                "too_old",
                "impossible_speed",
                "teleport"
            ]
        );
        assert_eq!(Reason::Future.field_error().field, "timestamp");
        let f = SanityFilters::default();
        assert_eq!(
            f.field_error(Reason::Future).message,
            "is more than 5m in the future"
        );
        assert_eq!(
            f.field_error(Reason::TooOld).message,
            "is more than 1day old"
        );
        assert_eq!(
            f.field_error(Reason::ImpossibleSpeed).message,
            "implies more than 250 km/h since the previous position"
        );
        assert_eq!(f.field_error(Reason::NullIsland).field, "latitude");
        assert_eq!(
            serde_json::to_string(&Reason::ImpossibleSpeed).unwrap(),
            r#""impossible_speed""#
        );
    }

    fn any_position() -> impl Strategy<Value = Position> {
        (
            prop_oneof![Just("d"), Just("e")],
            any::<i32>(),
            any::<i32>(),
            any::<i64>(),
            proptest::option::of(any::<f32>()),
        )
            .prop_map(|(d, lat, lon, ts, acc)| Position {
                driver_id: DriverId::new(d),
                lat_e6: lat,
                lon_e6: lon,
                status: Status::Online,
                timestamp: ts,
                speed_mps: None,
                heading_deg: None,
                accuracy_m: acc,
            })
    }

    proptest! {
        #[test]
        fn never_panics(
            new in any_position(),
            prev in proptest::option::of(any_position()),
            now in any::<i64>(),
            speed in proptest::option::of(any::<f64>()),
        ) {
            let f = SanityFilters { max_speed_mps: speed, ..SanityFilters::default() };
            let v = f.check(&new, prev.as_ref(), now);
            if let Verdict::Reject { reason, evidence } = v {
                prop_assert_eq!(reason.is_anomaly(), evidence.is_some());
            }
        }
    }
}
