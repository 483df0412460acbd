//! Position history: every position a driver reported, queried as a track over a time range, kept in
//! full for a while, then as a simplified track, then dropped.
//!
//! # Layout
//!
//! One [fjall] database in `<dir>`, with one keyspace (an LSM-tree of its own) per UTC day:
//! `hot.2026-01-31` holds every point of that day, `cold.2026-01-31` the simplified track retention
//! made of it. Retention therefore never deletes points one by one: it drops whole keyspaces, and
//! writes a day's simplified track once into a fresh keyspace. A `meta` keyspace holds the WAL
//! checkpoint, each day keyspace's window length, and a marker per finished cold day.
//!
//! Inside a day, a key is `driver id ‖ 0x00 ‖ window start` ([`key`]): one *chunk* per driver per
//! window (30 s in hot days, 1 h in cold ones), whose value is the window's points delta-encoded
//! ([`chunk`]). A track is one range scan per day from the window holding `from` to the window
//! holding `to`, so an hour of a day reads an hour's chunks, not the day.
//!
//! # Why fjall, and chunks rather than one key per point
//!
//! fjall gives a crash-safe journal, atomic batches across keyspaces (chunks and checkpoint commit
//! together), range scans in key order, compression and background compaction, and dropping a
//! keyspace is cheap; a purpose-built segment store would have to rebuild all of that. Measured with
//! fjall 3.1 on this machine (2,000 drivers × 1 h at 2 s, speed and heading changing on every fix,
//! 1000-position batches), the lead's first layout, one key per point (`id ‖ 0 ‖ ts` → 17-byte
//! value), stored 26–27 bytes a point after flush and appended ~0.8M points/s on one core, mostly
//! journal and memtable work per key: within the 32-byte budget but leaving too little of two cores
//! at 500k/s. One key per driver-window ([`chunk`]) costs one LSM write per ~15 points: 2.3–3.1M
//! points/s and 16 bytes a point in the day tables (8 when speed and heading hold steady between
//! turns); a full day of one driver reads in ~1.2 ms, an hour of it in ~45 µs
//! (`cargo bench --bench history`). The price is the open window, held in memory and below.
//!
//! # The open window and the checkpoint
//!
//! Each driver's newest window is built in memory (`Writer::open`, about 15 encoded points) and
//! written when a point of a later window arrives, or, at [`History::persist`], once it has been
//! over for a window's length of newer data. Points for older windows (late arrivals, a device
//! uploading a backlog) are merged into their stored chunk at once (read-modify-write); so is a
//! point for a timestamp already stored, the later write replacing it, which makes appends
//! idempotent per (driver, timestamp).
//!
//! fjall's own journal is never synced per write: the service's write-ahead log is the source of
//! truth and replays into history after a crash. [`History::set_checkpoint`] records the WAL
//! position that everything appended so far came from; [`History::persist`] stores, in the same
//! atomic batch as the chunks it writes, the newest such position whose points are all out of
//! memory, then fsyncs. So [`History::checkpoint`] may lag the last `set_checkpoint` by the open
//! windows (about a minute of WAL); replaying from it rewrites some stored points, which is
//! harmless. [`History::flush`] (shutdown; also done on drop) writes every open window and moves
//! the checkpoint to the last one set.
//!
//! Memory: the open windows hold about one window of every active driver (~15 points, 100–250
//! bytes encoded), a few hundred MB at a million drivers. fjall's journal is on disk beside the
//! tables until their memtables are flushed (bounded by fjall's 512 MiB journal cap).
//!
//! Not stored: `accuracy_m` (a track does not return it).
//!
//! # Retention
//!
//! [`History::apply_retention`] works in whole days: a day whose last microsecond is older than
//! `hot` is compacted to its Douglas–Peucker simplification (per driver, whole day; tolerance in
//! metres), a day whose last microsecond is older than `cold` is dropped. Data therefore lives up
//! to a day longer than configured, never shorter. Late points that land in a cold day are stored
//! as they come (not simplified again).
//!
//! [fjall]: https://docs.rs/fjall

mod chunk;
pub mod format;
mod key;
pub mod postgres;
mod retention;
mod store;
#[cfg(test)]
mod tests;

pub use format::{geojson_feature, gpx};
pub use retention::RetentionReport;
pub use store::History;

use crate::domain::{Micros, Position, Status};

/// Default number of points in one page of a track.
pub const DEFAULT_TRACK_LIMIT: usize = 10_000;
/// Most points one page of a track may hold.
pub const MAX_TRACK_LIMIT: usize = 100_000;

/// One page of one driver's track between `from` and `to` (both inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackQuery {
    pub driver_id: String,
    pub from: Micros,
    pub to: Micros,
    /// At most this many points (clamped to 1..=[`MAX_TRACK_LIMIT`]).
    pub limit: usize,
    /// `next_cursor` of the previous page; opaque.
    pub cursor: Option<String>,
}

/// A stored position: what a track returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackPoint {
    pub lat_e6: i32,
    pub lon_e6: i32,
    pub timestamp: Micros,
    pub status: Status,
    pub speed_mps: Option<f32>,
    pub heading_deg: Option<f32>,
}

impl From<&Position> for TrackPoint {
    fn from(p: &Position) -> TrackPoint {
        TrackPoint {
            lat_e6: p.lat_e6,
            lon_e6: p.lon_e6,
            timestamp: p.timestamp,
            status: p.status,
            speed_mps: p.speed_mps,
            heading_deg: p.heading_deg,
        }
    }
}

/// Points in time order; `next_cursor` is set when more points follow within the range.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackPage {
    pub points: Vec<TrackPoint>,
    pub next_cursor: Option<String>,
}

impl TrackPage {
    /// A page of at most `limit` points out of `points` read with one extra: when the extra is
    /// there, more follow and the cursor points just past the page's last point.
    pub fn of_overfetched(driver_id: &str, mut points: Vec<TrackPoint>, limit: usize) -> TrackPage {
        let next_cursor = if points.len() > limit {
            points.truncate(limit);
            points
                .last()
                .map(|p| key::encode_cursor(driver_id, p.timestamp.saturating_add(1)))
        } else {
            None
        };
        TrackPage {
            points,
            next_cursor,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history storage failed: {0}")]
    Storage(#[from] fjall::Error),
    #[error("history data is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("the cursor was not issued for this track")]
    BadCursor,
}
