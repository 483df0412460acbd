//! The simulated city: a box with a regular street grid, and the virtual drivers that roam it.
//!
//! Drivers move along street lines only, so every position has one coordinate exactly on a street:
//! the traffic looks like traffic on a map, and nearby searches see the clustering real fleets show.
//! Each driver owns a random generator derived from `--seed` and its index, so the same seed drives
//! the same routes no matter how many drivers run or in which order they are advanced.

use crate::domain::Status;
use crate::geo::EARTH_RADIUS_M;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::str::FromStr;

/// Distance between neighbouring parallel streets, in metres: a typical city block.
pub const BLOCK_M: f64 = 150.0;
/// Slowest and fastest cruising speed, in metres per second (18–54 km/h).
pub const SPEED_MPS: std::ops::Range<f64> = 5.0..15.0;
/// Metres per degree of latitude on the mean sphere.
const M_PER_DEG_LAT: f64 = EARTH_RADIUS_M * std::f64::consts::PI / 180.0;

/// A box of streets: east-west streets on `rows + 1` latitudes, north-south streets on `cols + 1`
/// longitudes, the outermost ones on the box's edges.
#[derive(Debug, Clone, PartialEq)]
pub struct City {
    pub min_lat: f64,
    pub min_lon: f64,
    pub max_lat: f64,
    pub max_lon: f64,
    rows: u32,
    cols: u32,
    lat_step: f64,
    lon_step: f64,
    /// Length of a north-south block, in metres.
    block_ns_m: f64,
    /// Length of an east-west block, in metres.
    block_ew_m: f64,
}

impl City {
    /// A city on the box; streets are spaced as close to [`BLOCK_M`] as divides the box evenly.
    pub fn new(min_lat: f64, min_lon: f64, max_lat: f64, max_lon: f64) -> City {
        let m_per_deg_lon = M_PER_DEG_LAT * ((min_lat + max_lat) / 2.0).to_radians().cos();
        let ns_m = (max_lat - min_lat) * M_PER_DEG_LAT;
        let ew_m = (max_lon - min_lon) * m_per_deg_lon;
        let rows = (ns_m / BLOCK_M).round().max(1.0) as u32;
        let cols = (ew_m / BLOCK_M).round().max(1.0) as u32;
        City {
            min_lat,
            min_lon,
            max_lat,
            max_lon,
            rows,
            cols,
            lat_step: (max_lat - min_lat) / f64::from(rows),
            lon_step: (max_lon - min_lon) / f64::from(cols),
            block_ns_m: ns_m / f64::from(rows),
            block_ew_m: ew_m / f64::from(cols),
        }
    }

    /// Number of east-west and north-south streets.
    pub fn streets(&self) -> (u32, u32) {
        (self.rows + 1, self.cols + 1)
    }

    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        (self.min_lat..=self.max_lat).contains(&lat) && (self.min_lon..=self.max_lon).contains(&lon)
    }

    /// True when the point lies on a street line (within `tolerance` degrees).
    pub fn on_street(&self, lat: f64, lon: f64, tolerance: f64) -> bool {
        let near_line = |v: f64, min: f64, step: f64| {
            let k = ((v - min) / step).round();
            (v - (min + k * step)).abs() <= tolerance
        };
        near_line(lat, self.min_lat, self.lat_step) || near_line(lon, self.min_lon, self.lon_step)
    }

    fn row_lat(&self, row: u32) -> f64 {
        self.min_lat + f64::from(row) * self.lat_step
    }

    fn col_lon(&self, col: u32) -> f64 {
        self.min_lon + f64::from(col) * self.lon_step
    }

    fn block_m(&self, dir: Dir) -> f64 {
        match dir {
            Dir::North | Dir::South => self.block_ns_m,
            Dir::East | Dir::West => self.block_ew_m,
        }
    }

    /// True when a driver at intersection (`col`, `row`) can drive one block towards `dir`.
    fn can_go(&self, col: u32, row: u32, dir: Dir) -> bool {
        match dir {
            Dir::North => row < self.rows,
            Dir::South => row > 0,
            Dir::East => col < self.cols,
            Dir::West => col > 0,
        }
    }
}

/// Parses `min_lat,min_lon,max_lat,max_lon`.
impl FromStr for City {
    type Err = String;

    fn from_str(text: &str) -> Result<City, String> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let [min_lat, min_lon, max_lat, max_lon] = parts.as_slice() else {
            return Err(format!("expected 4 numbers, got {}", parts.len()));
        };
        let min_lat = coordinate("min_lat", min_lat, 90.0)?;
        let min_lon = coordinate("min_lon", min_lon, 180.0)?;
        let max_lat = coordinate("max_lat", max_lat, 90.0)?;
        let max_lon = coordinate("max_lon", max_lon, 180.0)?;
        if min_lat >= max_lat {
            return Err(format!("min_lat {min_lat} must be below max_lat {max_lat}"));
        }
        if min_lon >= max_lon {
            return Err(format!("min_lon {min_lon} must be below max_lon {max_lon}"));
        }
        Ok(City::new(min_lat, min_lon, max_lat, max_lon))
    }
}

fn coordinate(name: &str, text: &str, limit: f64) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (-limit..=limit).contains(&v) => Ok(v),
        Ok(v) => Err(format!(
            "{name} must be between -{limit} and {limit}, got {v}"
        )),
        Err(_) => Err(format!("{name} must be a number, got {text:?}")),
    }
}

/// The four ways a street grid lets a driver go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    North,
    East,
    South,
    West,
}

impl Dir {
    const ALL: [Dir; 4] = [Dir::North, Dir::East, Dir::South, Dir::West];

    fn heading_deg(self) -> f64 {
        match self {
            Dir::North => 0.0,
            Dir::East => 90.0,
            Dir::South => 180.0,
            Dir::West => 270.0,
        }
    }

    fn reverse(self) -> Dir {
        match self {
            Dir::North => Dir::South,
            Dir::East => Dir::West,
            Dir::South => Dir::North,
            Dir::West => Dir::East,
        }
    }

    /// The intersection one block further.
    fn step(self, col: u32, row: u32) -> (u32, u32) {
        match self {
            Dir::North => (col, row + 1),
            Dir::East => (col + 1, row),
            Dir::South => (col, row.saturating_sub(1)),
            Dir::West => (col.saturating_sub(1), row),
        }
    }
}

/// What a driver reports: where it is, how it moves, what it is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fix {
    pub latitude: f64,
    pub longitude: f64,
    pub status: Status,
    pub speed_mps: f64,
    pub heading_deg: f64,
}

/// Mean time a driver keeps a status, in seconds: shifts of jobs and waits, short breaks off-line.
fn mean_dwell_s(status: Status) -> f64 {
    match status {
        Status::Online => 90.0,
        Status::Busy => 120.0,
        Status::Offline => 20.0,
    }
}

/// Chance that a status change from online or busy goes offline instead.
const OFFLINE_CHANCE: f64 = 0.03;

/// One simulated vehicle: drives block by block, picks a way at every intersection, never leaves the
/// box, and now and then takes a job, finishes it, or goes off-line for a while (parked).
#[derive(Debug, Clone)]
pub struct VirtualDriver {
    id: String,
    rng: SmallRng,
    /// The intersection the current block starts at.
    col: u32,
    row: u32,
    dir: Dir,
    /// Metres driven along the current block.
    along_m: f64,
    speed_mps: f64,
    status: Status,
    /// Seconds until the status changes.
    status_left_s: f64,
    /// Seconds of simulated time this driver has been advanced to.
    clock_s: f64,
}

impl VirtualDriver {
    /// Driver number `index` of a run seeded with `seed`, somewhere on a random street.
    pub fn new(city: &City, seed: u64, index: u32) -> VirtualDriver {
        let mut rng = SmallRng::seed_from_u64(splitmix64(seed ^ splitmix64(u64::from(index))));
        let col = rng.random_range(0..=city.cols);
        let row = rng.random_range(0..=city.rows);
        let status = match rng.random::<f64>() {
            x if x < 0.02 => Status::Offline,
            x if x < 0.40 => Status::Busy,
            _ => Status::Online,
        };
        let mut driver = VirtualDriver {
            id: format!("sim-{index:06}"),
            col,
            row,
            dir: Dir::North,
            along_m: 0.0,
            speed_mps: rng.random_range(SPEED_MPS),
            status,
            status_left_s: 0.0,
            clock_s: 0.0,
            rng,
        };
        driver.dir = driver.pick_direction(city, None);
        driver.along_m = driver.rng.random::<f64>() * city.block_m(driver.dir);
        driver.status_left_s = driver.dwell(status);
        driver
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Advances the driver to `clock_s` seconds of simulated time (earlier times change nothing).
    pub fn advance_to(&mut self, city: &City, clock_s: f64) {
        let dt = clock_s - self.clock_s;
        if dt > 0.0 {
            self.advance(city, dt);
            self.clock_s = clock_s;
        }
    }

    /// Lets `secs` seconds pass: drives (unless off-line) and changes status when its time is up.
    pub fn advance(&mut self, city: &City, mut secs: f64) {
        while secs > 0.0 {
            let step = secs.min(self.status_left_s);
            if self.status != Status::Offline {
                self.drive(city, self.speed_mps * step);
            }
            secs -= step;
            self.status_left_s -= step;
            if self.status_left_s <= 0.0 {
                self.change_status();
            }
        }
    }

    /// Where the driver is now.
    pub fn fix(&self, city: &City) -> Fix {
        let (mut lat, mut lon) = (city.row_lat(self.row), city.col_lon(self.col));
        let frac = self.along_m / city.block_m(self.dir);
        match self.dir {
            Dir::North => lat += frac * city.lat_step,
            Dir::South => lat -= frac * city.lat_step,
            Dir::East => lon += frac * city.lon_step,
            Dir::West => lon -= frac * city.lon_step,
        }
        let moving = self.status != Status::Offline;
        Fix {
            latitude: lat.clamp(city.min_lat, city.max_lat),
            longitude: lon.clamp(city.min_lon, city.max_lon),
            status: self.status,
            speed_mps: if moving { self.speed_mps } else { 0.0 },
            heading_deg: self.dir.heading_deg(),
        }
    }

    /// Drives `meters` along the streets, choosing a way and a new speed at every intersection.
    fn drive(&mut self, city: &City, mut meters: f64) {
        loop {
            let left = city.block_m(self.dir) - self.along_m;
            if meters < left {
                self.along_m += meters;
                return;
            }
            meters -= left;
            (self.col, self.row) = self.dir.step(self.col, self.row);
            self.along_m = 0.0;
            self.dir = self.pick_direction(city, Some(self.dir));
            self.speed_mps = self.rng.random_range(SPEED_MPS);
        }
    }

    /// A way out of the current intersection that stays in the box: straight on half the time when
    /// possible, otherwise any way but back (back only at a dead end, which a grid does not have).
    fn pick_direction(&mut self, city: &City, coming: Option<Dir>) -> Dir {
        let back = coming.map(Dir::reverse);
        let (col, row) = (self.col, self.row);
        let options: Vec<Dir> = Dir::ALL
            .into_iter()
            .filter(|&d| city.can_go(col, row, d) && Some(d) != back)
            .collect();
        if let Some(straight) = coming.filter(|d| options.contains(d)) {
            if self.rng.random_bool(0.5) {
                return straight;
            }
        }
        match options.len() {
            0 => back.unwrap_or(Dir::North),
            n => options[self.rng.random_range(0..n)],
        }
    }

    fn change_status(&mut self) {
        let off = self.rng.random_bool(OFFLINE_CHANCE);
        self.status = match self.status {
            Status::Online if off => Status::Offline,
            Status::Online => Status::Busy,
            Status::Busy if off => Status::Offline,
            Status::Busy | Status::Offline => Status::Online,
        };
        self.status_left_s = self.dwell(self.status);
    }

    /// An exponentially distributed stay in `status`.
    fn dwell(&mut self, status: Status) -> f64 {
        let u: f64 = self.rng.random();
        -mean_dwell_s(status) * (1.0 - u).ln()
    }
}

/// A well-mixed 64-bit hash, so neighbouring seeds and indices give unrelated generators.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// About 900 m by 600 m: small enough that drivers reach the edges often.
    fn small_city() -> City {
        "31.2300,121.4700,31.2354,121.4763".parse().unwrap()
    }

    fn fleet(city: &City, seed: u64, n: u32) -> Vec<VirtualDriver> {
        (0..n).map(|i| VirtualDriver::new(city, seed, i)).collect()
    }

    #[test]
    fn parses_the_box_and_lays_streets_about_a_block_apart() {
        let city: City = "31.13,121.35,31.33,121.60".parse().unwrap();
        assert_eq!((city.min_lat, city.max_lon), (31.13, 121.60));
        let (ew, ns) = city.streets();
        assert!((140..160).contains(&ew), "{ew}");
        assert!((150..175).contains(&ns), "{ns}");
        assert!((city.block_ns_m - BLOCK_M).abs() < 5.0);
        assert!((city.block_ew_m - BLOCK_M).abs() < 5.0);
    }

    #[test]
    fn a_tiny_box_still_has_streets_on_its_edges() {
        let city: City = "10,10,10.0001,10.0001".parse().unwrap();
        assert_eq!(city.streets(), (2, 2));
    }

    #[test]
    fn rejects_malformed_boxes_with_a_reason() {
        let cases = [
            ("31.1,121.3,31.3", "expected 4 numbers, got 3"),
            ("a,121.3,31.3,121.6", "min_lat must be a number"),
            ("31.1,121.3,95,121.6", "max_lat must be between -90 and 90"),
            (
                "31.1,-181,31.3,121.6",
                "min_lon must be between -180 and 180",
            ),
            (
                "31.3,121.3,31.1,121.6",
                "min_lat 31.3 must be below max_lat 31.1",
            ),
            (
                "31.1,121.6,31.3,121.6",
                "min_lon 121.6 must be below max_lon 121.6",
            ),
            ("31.1,121.3,NaN,121.6", "max_lat must be between"),
        ];
        for (text, reason) in cases {
            let err = text.parse::<City>().unwrap_err();
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn drivers_stay_inside_the_box_on_streets_at_plausible_speeds() {
        let city = small_city();
        for mut d in fleet(&city, 7, 50) {
            for _ in 0..500 {
                d.advance(&city, 3.0);
                let f = d.fix(&city);
                assert!(city.contains(f.latitude, f.longitude), "{} {f:?}", d.id());
                assert!(city.on_street(f.latitude, f.longitude, 1e-9), "{f:?}");
                let moving = f.status != Status::Offline;
                assert!(!moving || SPEED_MPS.contains(&f.speed_mps), "{f:?}");
                assert!((0.0..360.0).contains(&f.heading_deg));
            }
        }
    }

    #[test]
    fn heading_matches_the_direction_of_movement() {
        let city = small_city();
        let (mut checked, mut samples) = (0, 0);
        for mut d in fleet(&city, 3, 20) {
            for _ in 0..200 {
                let before = d.fix(&city);
                d.advance(&city, 0.5);
                let after = d.fix(&city);
                samples += 1;
                if before.heading_deg != after.heading_deg || after.speed_mps == 0.0 {
                    continue; // turned at an intersection, or parked
                }
                let dy = after.latitude - before.latitude;
                let dx = (after.longitude - before.longitude) * before.latitude.to_radians().cos();
                let bearing = dx.atan2(dy).to_degrees().rem_euclid(360.0);
                let off = (bearing - after.heading_deg).abs() % 360.0;
                assert!(off.min(360.0 - off) < 0.5, "{before:?} -> {after:?}");
                checked += 1;
            }
        }
        assert!(checked * 10 > samples * 8, "{checked} of {samples}");
    }

    #[test]
    fn same_seed_same_routes_other_seed_other_routes() {
        let city = small_city();
        let route = |seed: u64, index: u32| {
            let mut d = VirtualDriver::new(&city, seed, index);
            (1..=100)
                .map(|t| {
                    d.advance_to(&city, f64::from(t) * 1.5);
                    d.fix(&city)
                })
                .collect::<Vec<Fix>>()
        };
        assert_eq!(route(42, 5), route(42, 5));
        assert_ne!(route(42, 5), route(43, 5));
        assert_ne!(route(42, 5), route(42, 6));
    }

    #[test]
    fn statuses_change_now_and_then_and_offline_is_rare() {
        let city = small_city();
        let mut counts = [0u32; 3];
        let mut changes = 0;
        for mut d in fleet(&city, 11, 200) {
            let mut last = d.fix(&city).status;
            for _ in 0..60 {
                d.advance(&city, 10.0);
                let status = d.fix(&city).status;
                counts[status as usize] += 1;
                changes += u32::from(status != last);
                last = status;
            }
        }
        assert!(changes > 200, "{changes}");
        assert!(
            counts[0] > counts[2] * 5 && counts[1] > counts[2] * 5,
            "{counts:?}"
        );
        assert!(counts[2] > 0, "{counts:?}");
    }

    #[test]
    fn ids_are_zero_padded() {
        let city = small_city();
        assert_eq!(VirtualDriver::new(&city, 1, 42).id(), "sim-000042");
    }
}
