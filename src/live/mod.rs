//! The live index: each driver's latest position, and "who is near this point".
//!
//! [`MemoryIndex`] is the embedded store. [`LiveStore`] puts the stores behind the same operations
//! (`upsert`, `get`, `nearby`, `within_box`, `counts`, `expire`); the API reaches them only through
//! [`crate::tracker::Tracker`], so a store does not touch the handlers.

mod memory;
pub mod redis;
pub mod snapshot;

pub use memory::MemoryIndex;

use crate::domain::{DriverId, Micros, Position, Status, StatusSet};

/// Where the latest positions live: in this process, or shared by every instance.
pub enum LiveStore {
    Memory(MemoryIndex),
    Redis(redis::RedisLive),
}

impl LiveStore {
    /// The embedded index, if that is the store.
    pub fn memory(&self) -> Option<&MemoryIndex> {
        match self {
            LiveStore::Memory(index) => Some(index),
            LiveStore::Redis(_) => None,
        }
    }
}

impl From<redis::RedisLive> for LiveStore {
    fn from(store: redis::RedisLive) -> LiveStore {
        LiveStore::Redis(store)
    }
}

impl From<MemoryIndex> for LiveStore {
    fn from(index: MemoryIndex) -> LiveStore {
        LiveStore::Memory(index)
    }
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// The position is now the driver's latest.
    Applied,
    /// The driver already has a newer position; this one was accepted but is not the latest.
    Stale,
    /// Restored from before a restart but older than the TTL: not live any more.
    Expired,
}

/// A nearby search: the `limit` nearest drivers within `radius_m` of a point whose status is in
/// `statuses` (offline drivers are never indexed for search).
#[derive(Debug, Clone, Copy)]
pub struct NearbyQuery {
    pub lat_e6: i32,
    pub lon_e6: i32,
    pub radius_m: f64,
    pub limit: usize,
    pub statuses: StatusSet,
}

/// Every live driver inside a latitude/longitude box (edges included) whose status is in
/// `statuses`. A west edge east of the east edge means the box crosses the antimeridian, as in
/// GeoJSON. Used for the snapshot a stream subscriber receives first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxQuery {
    pub south_e6: i32,
    pub west_e6: i32,
    pub north_e6: i32,
    pub east_e6: i32,
    pub statuses: StatusSet,
}

/// Rows and up to two column ranges (inclusive) of grid cells.
pub type CellRanges = (
    std::ops::RangeInclusive<i32>,
    [Option<std::ops::RangeInclusive<i32>>; 2],
);

impl BoxQuery {
    pub fn contains(&self, lat_e6: i32, lon_e6: i32) -> bool {
        let lon_in = if self.west_e6 <= self.east_e6 {
            (self.west_e6..=self.east_e6).contains(&lon_e6)
        } else {
            lon_e6 >= self.west_e6 || lon_e6 <= self.east_e6
        };
        lon_in && (self.south_e6..=self.north_e6).contains(&lat_e6)
    }

    /// The grid cells the box touches: a row range and one or two column ranges (two when it
    /// wraps around the antimeridian, where 180° belongs to column 0 like −180°).
    pub fn cell_ranges(&self) -> CellRanges {
        use crate::geo::{Cell, CELL_E6, GRID_COLS};
        let rows = Cell::of(self.south_e6, 0).row..=Cell::of(self.north_e6, 0).row;
        // Columns counted from −180° without wrapping, so that 180° is GRID_COLS, not 0.
        let unwrapped = |lon_e6: i32| (lon_e6 + 180_000_000) / CELL_E6;
        let west = unwrapped(self.west_e6);
        let mut east = unwrapped(self.east_e6);
        if self.west_e6 > self.east_e6 {
            east += GRID_COLS;
        }
        let cols = if east - west + 1 >= GRID_COLS {
            [Some(0..=GRID_COLS - 1), None]
        } else if east < GRID_COLS {
            [Some(west..=east), None]
        } else if west >= GRID_COLS {
            [Some(west - GRID_COLS..=east - GRID_COLS), None]
        } else {
            [Some(west..=GRID_COLS - 1), Some(0..=east - GRID_COLS)]
        };
        (rows, cols)
    }
}

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct NearbyHit {
    pub driver_id: DriverId,
    pub lat_e6: i32,
    pub lon_e6: i32,
    pub distance_m: f64,
    pub status: Status,
    pub timestamp: Micros,
}

/// Drivers currently known, by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub online: u64,
    pub busy: u64,
    pub offline: u64,
}

impl StatusCounts {
    pub fn total(&self) -> u64 {
        self.online + self.busy + self.offline
    }

    pub fn get(&self, status: Status) -> u64 {
        match status {
            Status::Online => self.online,
            Status::Busy => self.busy,
            Status::Offline => self.offline,
        }
    }

    pub fn add(&mut self, status: Status, n: u64) {
        match status {
            Status::Online => self.online += n,
            Status::Busy => self.busy += n,
            Status::Offline => self.offline += n,
        }
    }
}

/// The latest state of one driver, as `GET /v1/drivers/{id}` shows it.
pub type DriverState = Position;
