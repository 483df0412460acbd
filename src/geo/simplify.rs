//! Track simplification (Douglas–Peucker) with a tolerance in metres, and track length.
//!
//! Why not the `geo` crate's `SimplifyIdx`: it works in the plane of the coordinates it is given, so a
//! tolerance in metres would need one projection for the whole track, which stretches with latitude
//! and breaks across the antimeridian; it recurses once per kept point, and a day's track of 43,200
//! points can be one long curve; and it would add a large dependency tree for thirty lines. Here each
//! candidate point is measured against its segment in a local equirectangular frame centred on that
//! segment (metres east and north of its start), exact enough at the scale of a city street and still
//! sound for long gaps, and the work list is an explicit stack.

use super::{distance_m, EARTH_RADIUS_M};

/// The tolerances accepted, in metres (a track query's `simplify_m`, `--cold-simplify-m`), and what
/// to say of any other.
const TOLERANCE_RANGE_M: std::ops::RangeInclusive<f64> = 0.0..=100_000.0;
pub const TOLERANCE_EXPECTED: &str = "a number of metres from 0 to 100000";

/// A tolerance in metres from text, if it is a number in [`TOLERANCE_RANGE_M`].
pub fn parse_tolerance_m(text: &str) -> Option<f64> {
    let m = text.trim().parse::<f64>().ok()?;
    TOLERANCE_RANGE_M.contains(&m).then_some(m)
}

/// Indices of the points a Douglas–Peucker simplification with `tolerance_m` keeps, ascending. The
/// first and last points are always kept; every dropped point lies within `tolerance_m` of the
/// segment between the kept points around it. Points are `(lat_e6, lon_e6)`.
pub fn simplify_indices(points: &[(i32, i32)], tolerance_m: f64) -> Vec<usize> {
    if points.len() <= 2 {
        return (0..points.len()).collect();
    }
    let tolerance_m = if tolerance_m >= 0.0 { tolerance_m } else { 0.0 };
    let mut keep = vec![false; points.len()];
    keep[0] = true;
    keep[points.len() - 1] = true;
    let mut spans = vec![(0, points.len() - 1)];
    while let Some((first, last)) = spans.pop() {
        if let Some((farthest, dist)) = farthest_from_segment(points, first, last) {
            if dist > tolerance_m {
                keep[farthest] = true;
                spans.push((first, farthest));
                spans.push((farthest, last));
            }
        }
    }
    keep.iter()
        .enumerate()
        .filter_map(|(i, &k)| k.then_some(i))
        .collect()
}

/// The point strictly between `first` and `last` farthest from their segment, with its distance.
fn farthest_from_segment(points: &[(i32, i32)], first: usize, last: usize) -> Option<(usize, f64)> {
    let segment = LocalSegment::new(points[first], points[last]);
    (first + 1..last)
        .map(|i| (i, segment.distance_m(points[i])))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// Distance in metres from `point` to the segment from `a` to `b` (all `(lat_e6, lon_e6)`).
pub fn distance_to_segment_m(point: (i32, i32), a: (i32, i32), b: (i32, i32)) -> f64 {
    LocalSegment::new(a, b).distance_m(point)
}

/// A segment in metres east (`x`) and north (`y`) of its start, on the plane tangent near it.
struct LocalSegment {
    origin: (i32, i32),
    /// Metres per radian of longitude at the segment's mean latitude.
    m_per_rad_lon: f64,
    end: (f64, f64),
}

impl LocalSegment {
    fn new(a: (i32, i32), b: (i32, i32)) -> LocalSegment {
        let mean_lat = (e6_to_rad(a.0) + e6_to_rad(b.0)) * 0.5;
        let mut segment = LocalSegment {
            origin: a,
            m_per_rad_lon: EARTH_RADIUS_M * mean_lat.cos(),
            end: (0.0, 0.0),
        };
        segment.end = segment.project(b);
        segment
    }

    /// `p` in local metres; longitude differences wrap so the antimeridian is a short hop.
    fn project(&self, p: (i32, i32)) -> (f64, f64) {
        let d_lon_e6 = (i64::from(p.1) - i64::from(self.origin.1) + 180_000_000)
            .rem_euclid(360_000_000)
            - 180_000_000;
        let x = d_lon_e6 as f64 * RAD_PER_E6 * self.m_per_rad_lon;
        let y = (i64::from(p.0) - i64::from(self.origin.0)) as f64 * RAD_PER_E6 * EARTH_RADIUS_M;
        (x, y)
    }

    fn distance_m(&self, p: (i32, i32)) -> f64 {
        let (px, py) = self.project(p);
        let (ex, ey) = self.end;
        let len2 = ex * ex + ey * ey;
        let t = if len2 > 0.0 {
            ((px * ex + py * ey) / len2).clamp(0.0, 1.0)
        } else {
            0.0
        };
        (px - t * ex).hypot(py - t * ey)
    }
}

const RAD_PER_E6: f64 = super::RAD_PER_E6;

fn e6_to_rad(v: i32) -> f64 {
    f64::from(v) * RAD_PER_E6
}

/// Length of the track in metres: the sum of the great-circle distances between consecutive points.
pub fn track_distance_m(points: &[(i32, i32)]) -> f64 {
    points
        .windows(2)
        .map(|leg| {
            distance_m(
                f64::from(leg[0].0) / 1e6,
                f64::from(leg[0].1) / 1e6,
                f64::from(leg[1].0) / 1e6,
                f64::from(leg[1].1) / 1e6,
            )
        })
        // Not `.sum()`: a float sum of nothing is -0.0, which clients would see as "-0.0".
        .fold(0.0, |total, leg| total + leg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metres per micro-degree of latitude.
    const M_PER_E6: f64 = EARTH_RADIUS_M * RAD_PER_E6;

    #[test]
    fn a_track_without_legs_has_a_distance_of_plus_zero() {
        for points in [&[][..], &[(31_200_000, 121_400_000)][..]] {
            let d = track_distance_m(points);
            assert!(d == 0.0 && d.is_sign_positive(), "{points:?}: {d:?}");
        }
    }

    #[test]
    fn short_tracks_are_kept_whole() {
        assert!(simplify_indices(&[], 5.0).is_empty());
        assert_eq!(simplify_indices(&[(1, 1)], 5.0), [0]);
        assert_eq!(simplify_indices(&[(1, 1), (2, 2)], 5.0), [0, 1]);
    }

    #[test]
    fn straight_line_collapses_to_its_ends() {
        let line: Vec<(i32, i32)> = (0..1000)
            .map(|i| (31_000_000 + i * 10, 121_000_000 + i * 7))
            .collect();
        assert_eq!(simplify_indices(&line, 1.0), [0, 999]);
    }

    #[test]
    fn right_angle_keeps_its_corner() {
        let mut track: Vec<(i32, i32)> = (0..=100)
            .map(|i| (31_000_000 + i * 100, 121_000_000))
            .collect();
        track.extend((1..=100).map(|i| (31_010_000, 121_000_000 + i * 100)));
        assert_eq!(simplify_indices(&track, 5.0), [0, 100, 200]);
    }

    #[test]
    fn tolerance_decides_what_a_bump_is_worth() {
        // A 10 m bump in the middle of a 2 km straight road.
        let bump_e6 = (10.0 / M_PER_E6).round() as i32;
        let track: Vec<(i32, i32)> = (0..=200)
            .map(|i| (if i == 100 { bump_e6 } else { 0 }, i * 90))
            .collect();
        assert_eq!(simplify_indices(&track, 15.0), [0, 200]);
        assert_eq!(simplify_indices(&track, 5.0), [0, 99, 100, 101, 200]);
    }

    #[test]
    fn every_dropped_point_is_within_tolerance() {
        // A wiggly track: a spiral with noise-like jitter from a fixed formula.
        let track: Vec<(i32, i32)> = (0..5000)
            .map(|i| {
                let a = f64::from(i) * 0.01;
                let r = 200.0 + f64::from(i) * 0.3;
                let jitter = f64::from((i * 7919) % 13) - 6.0;
                (
                    31_000_000 + ((r * a.sin() + jitter) / M_PER_E6) as i32,
                    121_000_000 + ((r * a.cos()) / M_PER_E6 / 0.857) as i32,
                )
            })
            .collect();
        for tolerance in [1.0, 5.0, 25.0] {
            let kept = simplify_indices(&track, tolerance);
            assert!(kept.len() < track.len() && kept.len() > 2);
            assert_eq!((kept[0], kept[kept.len() - 1]), (0, track.len() - 1));
            for pair in kept.windows(2) {
                for p in &track[pair[0] + 1..pair[1]] {
                    let d = distance_to_segment_m(*p, track[pair[0]], track[pair[1]]);
                    assert!(d <= tolerance, "{d} > {tolerance}");
                }
            }
        }
    }

    #[test]
    fn antimeridian_segments_are_short() {
        let track = [(0, 179_999_000), (5, -179_999_900), (0, -179_999_000)];
        // The middle point is half a metre off a 220 m segment that crosses 180°.
        assert_eq!(simplify_indices(&track, 2.0), [0, 2]);
        assert!(distance_to_segment_m(track[1], track[0], track[2]) < 1.0);
    }

    #[test]
    fn distance_sums_haversine_legs() {
        let track = [(0, 0), (1_000_000, 0), (1_000_000, 1_000_000)];
        let expected = distance_m(0.0, 0.0, 1.0, 0.0) + distance_m(1.0, 0.0, 1.0, 1.0);
        assert!((track_distance_m(&track) - expected).abs() < 1e-6);
        assert_eq!(track_distance_m(&track[..1]), 0.0);
        assert_eq!(track_distance_m(&[]), 0.0);
    }
}
