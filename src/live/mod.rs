//! The live index: each driver's latest position, and "who is near this point".
//!
//! [`MemoryIndex`] is the embedded store. A later Redis store will sit behind the same operations
//! (`upsert`, `get`, `nearby`, `counts`, `expire`); the API reaches the index only through
//! [`crate::tracker::Tracker`], so adding one does not touch the handlers.

mod memory;
pub mod snapshot;

pub use memory::MemoryIndex;

use crate::domain::{DriverId, Micros, Position, Status, StatusSet};

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

    fn add(&mut self, status: Status, n: u64) {
        match status {
            Status::Online => self.online += n,
            Status::Busy => self.busy += n,
            Status::Offline => self.offline += n,
        }
    }
}

/// The latest state of one driver, as `GET /v1/drivers/{id}` shows it.
pub type DriverState = Position;
