//! The tracker applies accepted positions and answers queries: the one place every transport calls.
//!
//! Today a position goes to the live index only. This is the seam where later work adds the
//! durable log (append before acknowledging), history, and the fan-out hub, without touching the API.

use crate::domain::{Position, Status};
use crate::live::{MemoryIndex, NearbyHit, NearbyQuery, StatusCounts, Upsert};
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shared service state behind every handler.
pub struct Tracker {
    index: MemoryIndex,
    metrics: Metrics,
    updates_total: AtomicU64,
    ready: AtomicBool,
}

impl Tracker {
    pub fn new(driver_ttl: Duration, metrics: Metrics) -> Tracker {
        Tracker {
            index: MemoryIndex::new(driver_ttl),
            metrics,
            updates_total: AtomicU64::new(0),
            ready: AtomicBool::new(true),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Applies validated positions (one request's worth); all of them count as accepted.
    pub fn apply(&self, positions: &[Position]) {
        let started = Instant::now();
        let mut by_status = [0u64; 3];
        for p in positions {
            // A stale position (older than the latest) is accepted but leaves the latest alone.
            let _: Upsert = self.index.upsert(p, started);
            by_status[p.status as usize] += 1;
        }
        self.metrics.record_store_write(started.elapsed());
        for status in Status::ALL {
            self.metrics
                .count_updates(status, by_status[status as usize]);
        }
        self.updates_total
            .fetch_add(positions.len() as u64, Ordering::Relaxed);
    }

    pub fn driver(&self, id: &str) -> Option<Position> {
        self.index.get(id, Instant::now())
    }

    pub fn nearby(&self, q: &NearbyQuery) -> Vec<NearbyHit> {
        self.index.nearby(q, Instant::now())
    }

    pub fn counts(&self) -> StatusCounts {
        self.index.counts()
    }

    pub fn updates_total(&self) -> u64 {
        self.updates_total.load(Ordering::Relaxed)
    }

    /// Removes drivers past their TTL; called by the background sweeper.
    pub fn expire(&self) -> usize {
        self.index.expire(Instant::now())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Marks the service as draining: `/ready` answers 503 so load balancers stop sending traffic.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}
