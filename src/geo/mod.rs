//! Geometry on the sphere: great-circle distance and the grid of cells the live index buckets drivers
//! into.
//!
//! Distances are compared as *haversines* (`hav(d/R) = sin²(Δφ/2) + cos φ1 cos φ2 sin²(Δλ/2)`), which
//! grow monotonically with distance, so ranking needs no `asin`/`sqrt` per candidate; metres are
//! computed only for the drivers that are returned.

mod grid;
mod simplify;

pub use grid::{Block, Cell, CellBounds, Grid, BLOCK_LEVELS, CELL_E6, GRID_COLS, GRID_ROWS};
pub use simplify::{
    distance_to_segment_m, parse_tolerance_m, simplify_indices, track_distance_m,
    TOLERANCE_EXPECTED,
};

/// Mean Earth radius (IUGG), in metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Radians per micro-degree.
pub const RAD_PER_E6: f64 = std::f64::consts::PI / 180.0 / 1e6;

/// Haversine of the central angle between two points given in radians.
#[inline]
pub fn haversine(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let s_lat = ((lat2 - lat1) * 0.5).sin();
    let s_lon = ((lon2 - lon1) * 0.5).sin();
    (s_lat * s_lat + lat1.cos() * lat2.cos() * s_lon * s_lon).min(1.0)
}

/// Metres for a haversine value.
#[inline]
pub fn hav_to_meters(hav: f64) -> f64 {
    2.0 * EARTH_RADIUS_M * hav.clamp(0.0, 1.0).sqrt().asin()
}

/// Haversine value for a distance in metres (distances beyond half the circumference give 1).
#[inline]
pub fn meters_to_hav(meters: f64) -> f64 {
    let half_angle = (meters / EARTH_RADIUS_M * 0.5).min(std::f64::consts::FRAC_PI_2);
    let s = half_angle.sin();
    s * s
}

/// Great-circle distance in metres between two points in degrees.
pub fn distance_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    hav_to_meters(haversine(
        lat1.to_radians(),
        lon1.to_radians(),
        lat2.to_radians(),
        lon2.to_radians(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn known_distances() {
        // One degree of latitude on the mean sphere.
        assert!(close(distance_m(0.0, 0.0, 1.0, 0.0), 111_195.08, 0.01));
        // Paris to London on the same sphere (reference computed independently in Python).
        assert!(close(
            distance_m(48.8566, 2.3522, 51.5074, -0.1278),
            343_556.5,
            1.0
        ));
        // Antipodes: half the circumference.
        let half = std::f64::consts::PI * EARTH_RADIUS_M;
        assert!(close(distance_m(0.0, 0.0, 0.0, 180.0), half, 1e-6));
        assert!(close(distance_m(90.0, 0.0, -90.0, 0.0), half, 1e-6));
    }

    #[test]
    fn antimeridian_and_poles_are_short_hops() {
        assert!(close(distance_m(0.0, 179.9995, 0.0, -179.9995), 111.2, 0.1));
        assert!(close(distance_m(89.9999, 0.0, 89.9999, 180.0), 22.24, 0.01));
        assert_eq!(distance_m(12.5, 33.0, 12.5, 33.0), 0.0);
    }

    #[test]
    fn hav_and_meters_round_trip() {
        for m in [0.0, 1.0, 1000.0, 100_000.0, 10_000_000.0] {
            assert!(close(hav_to_meters(meters_to_hav(m)), m, 1e-6 * m.max(1.0)));
        }
    }
}
