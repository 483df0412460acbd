//! What a subscriber follows: an area (a box, a circle) or a list of drivers, and which statuses.
//!
//! A scope answers two questions. [`Scope::admits`]: does this position belong in the feed (exact:
//! the same haversine test as the nearby search for circles, edges included for boxes)?
//! [`Scope::placement`]: under which coarse blocks does the hub file the subscriber, so that a
//! position only meets the subscribers whose blocks contain it?

use crate::domain::{DriverId, Position, Status, StatusSet};
use crate::geo::{haversine, Block, Cell, EARTH_RADIUS_M, RAD_PER_E6};
use crate::live::BoxQuery;
use hashbrown::HashSet;
use std::time::Duration;

/// Most blocks a subscriber is filed under; a larger area moves up a level (8× coarser), and one
/// too large for the coarsest level is filed under "everywhere".
pub const MAX_BLOCKS: u64 = 256;

/// A subscription: what to follow, and how often each driver may be sent.
#[derive(Debug, Clone)]
pub struct StreamRequest {
    pub scope: Scope,
    /// Each driver at most this often, coalesced to its latest state (zero: every update).
    pub min_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct Scope {
    pub area: Area,
    /// Statuses followed; offline drivers are never in scope (going offline is a `removed`).
    pub statuses: StatusSet,
    /// Only drivers whose id starts with this: the subscriber's tenant (see
    /// [`crate::domain::tenant`]); `None` in open mode.
    pub tenant: Option<DriverId>,
}

#[derive(Debug, Clone)]
pub enum Area {
    /// A latitude/longitude box, edges included (its `statuses` are ignored: the scope's count).
    Box(BoxQuery),
    Circle(Circle),
    Drivers(HashSet<DriverId>),
}

/// A circle on the sphere, compared as haversines like the nearby search.
#[derive(Debug, Clone, Copy)]
pub struct Circle {
    pub lat_e6: i32,
    pub lon_e6: i32,
    pub radius_m: f64,
}

/// Where the hub files a subscriber.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// Under these block keys of one level (1..=3, see [`Block`]).
    Blocks { level: u8, keys: Vec<u64> },
    /// Offered every position (areas too large for the coarsest level).
    Everywhere,
    /// Under these driver ids.
    Drivers(Vec<DriverId>),
}

impl Scope {
    /// The scope as a tenant's subscriber means it: only the tenant's drivers, and driver ids in
    /// the tenant's namespace. Open mode (empty tenant) leaves it as it is.
    pub fn for_tenant(mut self, tenant: &str) -> Scope {
        use crate::domain::tenant;
        if tenant.is_empty() {
            return self;
        }
        self.tenant = tenant::prefix(tenant).map(|p| DriverId::from(p.as_str()));
        if let Area::Drivers(ids) = &mut self.area {
            *ids = ids.iter().map(|id| tenant::internal(tenant, id)).collect();
        }
        self
    }

    /// Whether a position belongs in this subscriber's feed.
    pub fn admits(&self, p: &Position) -> bool {
        p.status != Status::Offline
            && self.statuses.contains(p.status)
            && crate::domain::tenant::belongs(&p.driver_id, self.tenant.as_deref())
            && self.area.contains(p)
    }

    pub fn placement(&self) -> Placement {
        match &self.area {
            Area::Drivers(ids) => Placement::Drivers(ids.iter().cloned().collect()),
            Area::Box(b) => place_box(b),
            Area::Circle(c) => place_box(&c.bounding_box()),
        }
    }

    /// The box to read the snapshot from (every driver in scope lies inside it), if an area.
    pub fn bounding_box(&self) -> Option<BoxQuery> {
        let b = match &self.area {
            Area::Box(b) => *b,
            Area::Circle(c) => c.bounding_box(),
            Area::Drivers(_) => return None,
        };
        Some(BoxQuery {
            statuses: self.statuses,
            ..b
        })
    }
}

impl Area {
    pub fn contains(&self, p: &Position) -> bool {
        match self {
            Area::Box(b) => b.contains(p.lat_e6, p.lon_e6),
            Area::Circle(c) => c.contains(p.lat_e6, p.lon_e6),
            Area::Drivers(ids) => ids.contains(p.driver_id.as_str()),
        }
    }
}

impl Circle {
    fn radius_hav(&self) -> f64 {
        crate::geo::meters_to_hav(self.radius_m)
    }

    pub fn contains(&self, lat_e6: i32, lon_e6: i32) -> bool {
        let hav = haversine(
            self.lat_e6 as f64 * RAD_PER_E6,
            self.lon_e6 as f64 * RAD_PER_E6,
            lat_e6 as f64 * RAD_PER_E6,
            lon_e6 as f64 * RAD_PER_E6,
        );
        hav <= self.radius_hav()
    }

    /// The smallest latitude/longitude box holding the circle, widened by a micro-degree on each
    /// side against rounding. The east–west half-width of a spherical cap of angular radius δ at
    /// latitude φ is asin(sin δ / cos φ); a cap over a pole spans every longitude.
    pub fn bounding_box(&self) -> BoxQuery {
        const FULL: i32 = 180_000_000;
        let delta = (self.radius_m / EARTH_RADIUS_M).min(std::f64::consts::PI);
        let lat = self.lat_e6 as f64 * RAD_PER_E6;
        let delta_e6 = delta / RAD_PER_E6;
        let south = (self.lat_e6 as f64 - delta_e6).floor() as i64 - 1;
        let north = (self.lat_e6 as f64 + delta_e6).ceil() as i64 + 1;
        let half_width = if south <= -90_000_000 || north >= 90_000_000 {
            None
        } else {
            let s = delta.sin() / lat.cos();
            (s < 1.0).then(|| s.asin() / RAD_PER_E6)
        };
        let (west, east) = match half_width {
            Some(w) if w * 2.0 < 359_000_000.0 => {
                let west = (self.lon_e6 as f64 - w).floor() as i64 - 1;
                let east = (self.lon_e6 as f64 + w).ceil() as i64 + 1;
                (wrap_lon(west), wrap_lon(east))
            }
            _ => (-FULL, FULL),
        };
        BoxQuery {
            south_e6: south.max(-90_000_000) as i32,
            west_e6: west,
            north_e6: north.min(90_000_000) as i32,
            east_e6: east,
            statuses: StatusSet::WORKING,
        }
    }
}

/// A longitude in micro-degrees brought back into −180°..180°.
fn wrap_lon(lon_e6: i64) -> i32 {
    const FULL: i64 = 180_000_000;
    if lon_e6 > FULL {
        (lon_e6 - 2 * FULL) as i32
    } else if lon_e6 < -FULL {
        (lon_e6 + 2 * FULL) as i32
    } else {
        lon_e6 as i32
    }
}

/// The finest block level at which the box spans at most [`MAX_BLOCKS`] blocks.
fn place_box(b: &BoxQuery) -> Placement {
    let (rows, cols) = b.cell_ranges();
    let cols: Vec<_> = cols.into_iter().flatten().collect();
    for level in 1..=crate::geo::BLOCK_LEVELS {
        let shift = 3 * level as u32;
        let span = |from: i32, to: i32| ((to >> shift) - (from >> shift) + 1) as u64;
        let height = span(*rows.start(), *rows.end());
        let width: u64 = cols.iter().map(|c| span(*c.start(), *c.end())).sum();
        if height * width > MAX_BLOCKS {
            continue;
        }
        let mut keys = Vec::with_capacity((height * width) as usize);
        for row in (rows.start() >> shift)..=(rows.end() >> shift) {
            for c in &cols {
                for col in (c.start() >> shift)..=(c.end() >> shift) {
                    keys.push(Block { level, row, col }.key());
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        return Placement::Blocks { level, keys };
    }
    Placement::Everywhere
}

/// The key of the block of `level` holding the position's cell (see [`Placement::Blocks`]).
pub fn block_key(cell: Cell, level: u8) -> u64 {
    let shift = 3 * level as u32;
    Block {
        level,
        row: cell.row >> shift,
        col: cell.col >> shift,
    }
    .key()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::distance_m;

    fn at(lat: f64, lon: f64) -> Position {
        Position {
            driver_id: "d".into(),
            lat_e6: (lat * 1e6).round() as i32,
            lon_e6: (lon * 1e6).round() as i32,
            status: Status::Online,
            timestamp: 0,
            speed_mps: None,
            heading_deg: None,
            accuracy_m: None,
        }
    }

    fn circle(lat: f64, lon: f64, radius_m: f64) -> Circle {
        Circle {
            lat_e6: (lat * 1e6).round() as i32,
            lon_e6: (lon * 1e6).round() as i32,
            radius_m,
        }
    }

    #[test]
    fn circles_agree_with_distance_and_fit_their_box() {
        let mut seed = 7u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 2_000_001) as f64 / 1e6 - 1.0
        };
        for (lat, lon, radius) in [
            (31.23, 121.47, 2_000.0),
            (0.0, 179.99, 5_000.0),
            (-33.9, -179.995, 80_000.0),
            (89.9, 10.0, 50_000.0),
            (60.0, 0.0, 100_000.0),
        ] {
            let c = circle(lat, lon, radius);
            let b = c.bounding_box();
            let scale = radius / 111_195.0 * 1.5;
            for _ in 0..4000 {
                let p = at(
                    (lat + next() * scale).clamp(-90.0, 90.0),
                    ((lon + next() * scale * 3.0 + 180.0).rem_euclid(360.0)) - 180.0,
                );
                let d = distance_m(lat, lon, p.latitude(), p.longitude());
                let inside = c.contains(p.lat_e6, p.lon_e6);
                if (d - radius).abs() > 0.01 {
                    assert_eq!(inside, d < radius, "{lat},{lon} r={radius}: {d}");
                }
                if inside {
                    assert!(b.contains(p.lat_e6, p.lon_e6), "box {b:?} misses {p:?}");
                }
            }
        }
    }

    #[test]
    fn small_areas_sit_on_fine_blocks_and_huge_ones_everywhere() {
        let scope = |area| Scope {
            area,
            statuses: StatusSet::WORKING,
            tenant: None,
        };
        let city = scope(Area::Circle(circle(31.23, 121.47, 2_000.0)));
        let Placement::Blocks { level, keys } = city.placement() else {
            panic!("blocks expected")
        };
        assert_eq!(level, 1);
        assert!((4..=16).contains(&keys.len()), "{}", keys.len());
        // The position's own block is among them.
        let key = block_key(Cell::of(31_230_000, 121_470_000), 1);
        assert!(keys.contains(&key));

        let region = scope(Area::Circle(circle(48.0, 2.0, 50_000.0)));
        assert!(matches!(
            region.placement(),
            Placement::Blocks { level: 2, .. }
        ));

        let world = scope(Area::Box(BoxQuery {
            south_e6: -90_000_000,
            west_e6: -180_000_000,
            north_e6: 90_000_000,
            east_e6: 180_000_000,
            statuses: StatusSet::WORKING,
        }));
        assert_eq!(world.placement(), Placement::Everywhere);
    }

    #[test]
    fn boxes_across_the_antimeridian_cover_both_sides() {
        let b = BoxQuery {
            south_e6: -1_000_000,
            west_e6: 179_990_000,
            north_e6: 1_000_000,
            east_e6: -179_990_000,
            statuses: StatusSet::WORKING,
        };
        let scope = Scope {
            area: Area::Box(b),
            statuses: StatusSet::WORKING,
            tenant: None,
        };
        let Placement::Blocks { level, keys } = scope.placement() else {
            panic!("blocks expected")
        };
        for lon in [179_995_000, 180_000_000, -179_995_000] {
            let p = at(0.0, lon as f64 / 1e6);
            assert!(scope.admits(&p), "{lon}");
            assert!(keys.contains(&block_key(Cell::of(p.lat_e6, p.lon_e6), level)));
        }
        assert!(!scope.admits(&at(0.0, 0.0)));
    }

    #[test]
    fn offline_and_filtered_statuses_are_never_admitted() {
        let mut online = StatusSet::empty();
        online.insert(Status::Online);
        let scope = Scope {
            area: Area::Drivers(["d".into()].into_iter().collect()),
            statuses: online,
            tenant: None,
        };
        let mut p = at(1.0, 1.0);
        assert!(scope.admits(&p));
        p.status = Status::Busy;
        assert!(!scope.admits(&p));
        p.status = Status::Offline;
        assert!(!scope.admits(&p));
        p.status = Status::Online;
        p.driver_id = "other".into();
        assert!(!scope.admits(&p));
    }
}
