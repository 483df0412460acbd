//! The tracker applies accepted positions and answers queries: the one place every transport calls.
//!
//! Today a position goes to the live index only. This is the seam where later work adds the
//! durable log (append before acknowledging), history, and the fan-out hub, without touching the API.

use crate::domain::{Position, Status};
use crate::hub::{Hub, HubConfig};
use crate::live::{BoxQuery, MemoryIndex, NearbyHit, NearbyQuery, StatusCounts, Upsert};
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shared service state behind every handler.
pub struct Tracker {
    index: MemoryIndex,
    metrics: Metrics,
    hub: Arc<Hub>,
    updates_total: AtomicU64,
    ready: AtomicBool,
}

impl Tracker {
    pub fn new(driver_ttl: Duration, metrics: Metrics) -> Tracker {
        Tracker {
            index: MemoryIndex::new(driver_ttl),
            hub: Arc::new(Hub::new(HubConfig::from_env(), &metrics)),
            metrics,
            updates_total: AtomicU64::new(0),
            ready: AtomicBool::new(true),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The push hub: stream subscriptions and their fan-out.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Applies validated positions (one request's worth); all of them count as accepted.
    pub fn apply(&self, positions: &[Position]) {
        let started = Instant::now();
        let mut by_status = [0u64; 3];
        let mut applied = Vec::new();
        for p in positions {
            // A stale position (older than the latest) is accepted but leaves the latest alone.
            let outcome: Upsert = self.index.upsert(p, started);
            if outcome == Upsert::Applied && self.hub.is_active() {
                applied.push(p);
            }
            by_status[p.status as usize] += 1;
        }
        self.metrics.record_store_write(started.elapsed());
        for status in Status::ALL {
            self.metrics
                .count_updates(status, by_status[status as usize]);
        }
        self.updates_total
            .fetch_add(positions.len() as u64, Ordering::Relaxed);
        self.hub.publish(applied);
    }

    pub fn driver(&self, id: &str) -> Option<Position> {
        self.index.get(id, Instant::now())
    }

    pub fn nearby(&self, q: &NearbyQuery) -> Vec<NearbyHit> {
        self.index.nearby(q, Instant::now())
    }

    /// Every live driver inside a box (a stream subscriber's snapshot).
    pub fn within_box(&self, q: &BoxQuery) -> Vec<Position> {
        self.index.within_box(q, Instant::now())
    }

    pub fn counts(&self) -> StatusCounts {
        self.index.counts()
    }

    pub fn updates_total(&self) -> u64 {
        self.updates_total.load(Ordering::Relaxed)
    }

    /// Removes drivers past their TTL; called by the background sweeper. Stream subscribers
    /// that were shown them are told they expired.
    pub fn expire(&self) -> usize {
        if !self.hub.is_active() {
            return self.index.expire(Instant::now());
        }
        let mut expired = Vec::new();
        let removed = self
            .index
            .expire_each(Instant::now(), |p| expired.push(p.driver_id));
        self.hub.expired(&expired, |id| self.driver(id));
        removed
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Marks the service as draining: `/ready` answers 503 so load balancers stop sending traffic.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        // Streams are long-lived: draining ends them (they would hold the shutdown otherwise).
        self.hub.set_accepting(ready);
    }
}
