//! The tracker applies accepted positions and answers queries: the one place every transport calls.
//!
//! A request's positions go to the live index first, then to the write-ahead log; the answer waits
//! for the log's (shared) fsync. Index first, so that a snapshot taken after reading the log's end
//! LSN can never miss a logged position (see `src/durability.rs`); a position whose log append
//! fails is answered 503 and may stay visible live until it is replaced — it was never acknowledged.

use crate::domain::{Micros, Position, Status};
use crate::durability::Durability;
use crate::history::{HistoryError, TrackPage, TrackQuery};
use crate::live::{MemoryIndex, NearbyHit, NearbyQuery, StatusCounts, Upsert};
use crate::metrics::Metrics;
use crate::wal::Batch;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a write or a history read could not be served.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("the position log is unavailable: {0}")]
    LogUnavailable(String),
    #[error("history is disabled (the server runs with --fsync off)")]
    HistoryDisabled,
    #[error("{0}")]
    BadCursor(String),
    #[error("history is unavailable: {0}")]
    HistoryUnavailable(String),
}

/// Shared service state behind every handler.
pub struct Tracker {
    index: MemoryIndex,
    durability: Option<Arc<Durability>>,
    metrics: Metrics,
    updates_total: AtomicU64,
    ready: AtomicBool,
}

impl Tracker {
    /// A tracker over `index`; without `durability` positions live in memory only.
    pub fn new(
        index: MemoryIndex,
        durability: Option<Arc<Durability>>,
        metrics: Metrics,
    ) -> Tracker {
        Tracker {
            index,
            durability,
            metrics,
            updates_total: AtomicU64::new(0),
            ready: AtomicBool::new(true),
        }
    }

    /// An in-memory tracker (no log, no history).
    pub fn in_memory(driver_ttl: Duration, metrics: Metrics) -> Tracker {
        Tracker::new(MemoryIndex::new(driver_ttl), None, metrics)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn index(&self) -> &MemoryIndex {
        &self.index
    }

    pub fn durability(&self) -> Option<&Arc<Durability>> {
        self.durability.as_ref()
    }

    /// Applies one request's validated positions, received at `received_at`, and makes them durable.
    /// When this returns `Ok`, they may be acknowledged.
    pub async fn apply(
        &self,
        positions: Vec<Position>,
        received_at: Micros,
    ) -> Result<(), TrackerError> {
        let started = Instant::now();
        let mut by_status = [0u64; 3];
        for p in &positions {
            // A stale position (older than the latest) is accepted but leaves the latest alone.
            let _: Upsert = self.index.upsert(p, started);
            by_status[p.status as usize] += 1;
        }
        let count = positions.len() as u64;
        if let Some(durability) = &self.durability {
            let batch = Batch {
                received_at,
                positions,
            };
            durability
                .append(&batch)
                .await
                .map_err(|e| TrackerError::LogUnavailable(e.to_string()))?;
        }
        self.metrics.record_store_write(started.elapsed());
        for status in Status::ALL {
            self.metrics
                .count_updates(status, by_status[status as usize]);
        }
        self.updates_total.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    pub fn driver(&self, id: &str) -> Option<Position> {
        self.index.get(id, Instant::now())
    }

    pub fn nearby(&self, q: &NearbyQuery) -> Vec<NearbyHit> {
        self.index.nearby(q, Instant::now())
    }

    /// A page of a driver's history.
    pub async fn track(&self, query: TrackQuery) -> Result<TrackPage, TrackerError> {
        let durability = self
            .durability
            .as_ref()
            .ok_or(TrackerError::HistoryDisabled)?;
        durability
            .track(query)
            .await
            .map_err(|e| match e.downcast_ref::<HistoryError>() {
                Some(HistoryError::BadCursor) => TrackerError::BadCursor(e.to_string()),
                _ => TrackerError::HistoryUnavailable(format!("{e:#}")),
            })
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
