//! The latest fix this instance knows of each driver, kept for the sanity filters.
//!
//! The speed and duplicate filters compare every new fix with the driver's previous one. Read from
//! Redis, that is one more script call per request, and in a 1,000-position batch it cost Redis
//! about as much as the compare-and-set itself (batch ingest 82k positions/s with the read,
//! 125k without, BENCHMARKS.md). So each instance remembers the fixes its own upserts applied, and
//! the fixes it had to read, in a bounded in-memory cache ([`quick_cache`], S3-FIFO eviction), and
//! asks Redis only on a miss.
//!
//! With several instances, a driver's newest fix may have been applied by another one; the cache
//! then holds an older fix of the same driver. That only makes the filters more lenient, never
//! wrongly strict, for genuine data:
//! - speed: the speed implied from an older real fix A to the new fix C is at most the larger of
//!   A→B and B→C (B the true latest: distances add up at most, times add up exactly), both of
//!   which a genuine track keeps under the limit;
//! - duplicates: a cached fix is a stored fix, so a new fix with its timestamp repeats a stored
//!   fix whichever is the latest.
//!
//! Entries older than the driver TTL are ignored, as the live store forgets such drivers. The
//! cache never answers queries: `GET /v1/drivers/{id}` and searches always read Redis.

use crate::domain::{DriverId, Position};
use quick_cache::sync::{Cache, EntryAction, EntryResult};
use quick_cache::UnitWeighter;
use std::time::{Duration, Instant};

/// How many drivers an instance remembers by default (~150 bytes each, so ~150 MB when full).
pub const CAPACITY: usize = 1_000_000;

/// A remembered fix and when this instance learned it.
type Entry = (Position, Instant);

/// The bounded cache; see the module docs.
pub struct RecentFixes {
    fixes: Cache<DriverId, Entry>,
    ttl: Duration,
}

impl RecentFixes {
    /// A cache of at most about `capacity` drivers, forgetting fixes after `ttl`. It starts small
    /// and grows with the fleet.
    pub fn new(capacity: usize, ttl: Duration) -> RecentFixes {
        let capacity = capacity.max(1);
        RecentFixes {
            fixes: Cache::with(
                capacity.min(4096),
                capacity as u64,
                UnitWeighter,
                Default::default(),
                Default::default(),
            ),
            ttl,
        }
    }

    /// The remembered fix of `id`, unless it is older than the TTL.
    pub fn get(&self, id: &DriverId, now: Instant) -> Option<Position> {
        let (fix, learned) = self.fixes.get(id)?;
        (now.saturating_duration_since(learned) < self.ttl).then_some(fix)
    }

    /// Remembers `fix` as its driver's latest unless a newer one is remembered already: one
    /// lookup that updates the entry in place (this runs for every applied position).
    pub fn remember(&self, fix: &Position, now: Instant) {
        let found = self.fixes.entry(
            &fix.driver_id,
            Some(Duration::ZERO),
            |_, (known, learned)| {
                if known.timestamp <= fix.timestamp {
                    *known = fix.clone();
                    *learned = now;
                }
                EntryAction::Retain(())
            },
        );
        // Timeout: another thread is inserting this driver right now; either fix will do.
        if let EntryResult::Vacant(slot) = found {
            let _ = slot.insert((fix.clone(), now));
        }
    }

    /// How many fixes are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.fixes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;

    fn fix(id: &str, timestamp: i64) -> Position {
        Position {
            driver_id: DriverId::new(id),
            lat_e6: 31_230_000,
            lon_e6: 121_470_000,
            status: Status::Online,
            timestamp,
            speed_mps: None,
            heading_deg: None,
            accuracy_m: None,
        }
    }

    #[test]
    fn keeps_the_newest_fix_of_each_driver() {
        let recent = RecentFixes::new(100, Duration::from_secs(60));
        let now = Instant::now();
        recent.remember(&fix("a", 2), now);
        recent.remember(&fix("a", 1), now);
        assert_eq!(recent.get(&DriverId::new("a"), now).unwrap().timestamp, 2);
        recent.remember(&fix("a", 3), now);
        assert_eq!(recent.get(&DriverId::new("a"), now).unwrap().timestamp, 3);
        assert!(recent.get(&DriverId::new("b"), now).is_none());
    }

    #[test]
    fn forgets_fixes_older_than_the_ttl() {
        let recent = RecentFixes::new(100, Duration::from_secs(60));
        let then = Instant::now();
        recent.remember(&fix("a", 1), then);
        assert!(recent
            .get(&DriverId::new("a"), then + Duration::from_secs(59))
            .is_some());
        assert!(recent
            .get(&DriverId::new("a"), then + Duration::from_secs(60))
            .is_none());
    }

    #[test]
    fn stays_within_its_capacity() {
        let recent = RecentFixes::new(1_000, Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..50_000 {
            recent.remember(&fix(&format!("d{i}"), i), now);
        }
        assert!(recent.len() <= 1_100, "{} entries", recent.len());
        assert!(recent.get(&DriverId::new("d49999"), now).is_some());
    }
}
