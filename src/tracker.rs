//! The tracker applies accepted positions and answers queries: the one place every transport calls.
//!
//! A request's positions go to the live index first, then to the write-ahead log; the answer waits
//! for the log's (shared) fsync. Index first, so that a snapshot taken after reading the log's end
//! LSN can never miss a logged position (see `src/durability.rs`); a position whose log append
//! fails is answered 503 and may stay visible live until it is replaced — it was never acknowledged.
//! Stream subscribers (the hub) are sent a position once it is durable, with its acknowledgement.

use crate::domain::{DriverId, Micros, Position, Status};
use crate::durability::Durability;
use crate::history::postgres::{PgHistory, PgHistoryError, PositionStream};
use crate::history::{HistoryError, TrackPage, TrackQuery};
use crate::hub::RemovedReason;
use crate::hub::{Hub, HubConfig};
use crate::live::redis::feed::{AreaFeed, FeedEvent};
use crate::live::redis::RedisLiveError;
use crate::live::{BoxQuery, LiveStore, MemoryIndex, NearbyHit, NearbyQuery, StatusCounts, Upsert};
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
    #[error("the live store is unavailable: {0}")]
    LiveUnavailable(String),
}

/// History kept in PostgreSQL, fed through a Redis Stream.
struct PostgresHistory {
    stream: PositionStream,
    pg: Arc<PgHistory>,
}

fn live_error(e: RedisLiveError) -> TrackerError {
    TrackerError::LiveUnavailable(e.to_string())
}

/// Shared service state behind every handler.
pub struct Tracker {
    live: LiveStore,
    durability: Option<Arc<Durability>>,
    /// History in PostgreSQL: positions go to the Redis Stream the worker drains.
    postgres: Option<PostgresHistory>,
    /// Other instances' stream subscribers hear of this instance's positions through it.
    feed: Option<AreaFeed>,
    metrics: Metrics,
    hub: Arc<Hub>,
    updates_total: AtomicU64,
    ready: AtomicBool,
}

impl Tracker {
    /// A tracker over `live`; without `durability` positions live in memory only.
    pub fn new(
        live: impl Into<LiveStore>,
        durability: Option<Arc<Durability>>,
        metrics: Metrics,
    ) -> Tracker {
        Tracker {
            live: live.into(),
            durability,
            postgres: None,
            feed: None,
            hub: Arc::new(Hub::new(HubConfig::from_env(), &metrics)),
            metrics,
            updates_total: AtomicU64::new(0),
            ready: AtomicBool::new(true),
        }
    }

    /// Keeps history in PostgreSQL: accepted positions are acknowledged once the Redis Stream
    /// holds them; tracks are read from PostgreSQL.
    pub fn with_postgres_history(mut self, stream: PositionStream, pg: Arc<PgHistory>) -> Tracker {
        self.postgres = Some(PostgresHistory { stream, pg });
        self
    }

    /// Publishes applied positions and removals to the other instances.
    pub fn with_area_feed(mut self, feed: AreaFeed) -> Tracker {
        self.feed = Some(feed);
        self
    }

    /// The feed to the other instances, when the live store is shared.
    pub fn area_feed(&self) -> Option<&AreaFeed> {
        self.feed.as_ref()
    }

    /// An in-memory tracker (no log, no history).
    pub fn in_memory(driver_ttl: Duration, metrics: Metrics) -> Tracker {
        Tracker::new(MemoryIndex::new(driver_ttl), None, metrics)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The push hub: stream subscriptions and their fan-out.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The embedded index, when the live store is in this process (snapshots need it).
    pub fn memory_index(&self) -> Option<&MemoryIndex> {
        self.live.memory()
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
        let publish = self.hub.is_active();
        let applied = self.upsert(&positions, started, publish).await?;
        let mut by_status = [0u64; 3];
        for p in &positions {
            by_status[p.status as usize] += 1;
        }
        let count = positions.len() as u64;
        let batch = Batch {
            received_at,
            positions,
        };
        if let Some(durability) = &self.durability {
            durability
                .append(&batch)
                .await
                .map_err(|e| TrackerError::LogUnavailable(e.to_string()))?;
        }
        if let Some(postgres) = &self.postgres {
            postgres
                .stream
                .append(&batch)
                .await
                .map_err(|e| TrackerError::LogUnavailable(format!("history stream: {e}")))?;
        }
        self.metrics.record_store_write(started.elapsed());
        for status in Status::ALL {
            self.metrics
                .count_updates(status, by_status[status as usize]);
        }
        self.updates_total.fetch_add(count, Ordering::Relaxed);
        let applied: Vec<&Position> = applied.into_iter().map(|i| &batch.positions[i]).collect();
        if let Some(feed) = &self.feed {
            if !applied.is_empty() {
                feed.publish(&applied.iter().map(|p| (*p).clone()).collect::<Vec<_>>());
            }
        }
        self.hub.publish(applied);
        Ok(())
    }

    /// Writes positions to the live store; returns the indexes of those that became their
    /// driver's latest (collected only when `collect` is set: someone listens).
    async fn upsert(
        &self,
        positions: &[Position],
        now: Instant,
        collect: bool,
    ) -> Result<Vec<usize>, TrackerError> {
        let mut applied = Vec::new();
        match &self.live {
            LiveStore::Memory(index) => {
                for (i, p) in positions.iter().enumerate() {
                    // A stale position (older than the latest) is accepted but leaves the
                    // latest alone.
                    if index.upsert(p, now) == Upsert::Applied && collect {
                        applied.push(i);
                    }
                }
            }
            LiveStore::Redis(store) => {
                let outcomes = store.upsert(positions).await.map_err(live_error)?;
                applied.extend(
                    outcomes
                        .iter()
                        .enumerate()
                        .filter(|(_, u)| **u == Upsert::Applied)
                        .map(|(i, _)| i),
                );
            }
        }
        Ok(applied)
    }

    /// A driver's latest position, `None` when unknown or past the TTL.
    pub async fn driver(&self, id: &str) -> Result<Option<Position>, TrackerError> {
        match &self.live {
            LiveStore::Memory(index) => Ok(index.get(id, Instant::now())),
            LiveStore::Redis(store) => store.get(id).await.map_err(live_error),
        }
    }

    /// The latest positions of those of `ids` that are live.
    pub async fn drivers(&self, ids: &[DriverId]) -> Result<Vec<Position>, TrackerError> {
        Ok(self.latest_of(ids).await?.into_iter().flatten().collect())
    }

    /// The latest position of each of `ids` (aligned; `None` when unknown or expired), read in
    /// one go (one pipeline for Redis): the sanity filters compare new fixes with them.
    pub async fn latest_of(&self, ids: &[DriverId]) -> Result<Vec<Option<Position>>, TrackerError> {
        match &self.live {
            LiveStore::Memory(index) => {
                let now = Instant::now();
                Ok(ids.iter().map(|id| index.get(id, now)).collect())
            }
            LiveStore::Redis(store) => store.get_many(ids).await.map_err(live_error),
        }
    }

    /// The previous fix of each of `ids` for the sanity filters (aligned; `None` when unknown or
    /// expired): the latest one in the embedded store; in Redis, the latest this instance knows,
    /// read from Redis only when it knows none (see `live::redis::recent`).
    pub async fn previous_of(
        &self,
        ids: &[DriverId],
    ) -> Result<Vec<Option<Position>>, TrackerError> {
        match &self.live {
            LiveStore::Memory(_) => self.latest_of(ids).await,
            LiveStore::Redis(store) => store.previous_of(ids).await.map_err(live_error),
        }
    }

    /// The nearest drivers; with `prefix`, only those whose id starts with it (one tenant's).
    pub async fn nearby(
        &self,
        q: &NearbyQuery,
        prefix: Option<&str>,
    ) -> Result<Vec<NearbyHit>, TrackerError> {
        match &self.live {
            LiveStore::Memory(index) => Ok(index.nearby_in(q, prefix, Instant::now())),
            LiveStore::Redis(store) => store.nearby_in(q, prefix).await.map_err(live_error),
        }
    }

    /// Live drivers by status among those whose id starts with `prefix` (one tenant's). The
    /// embedded store counts them in one pass; Redis reads every area's status sets (O(drivers),
    /// never mixing tenants).
    pub async fn counts_in(&self, prefix: &str) -> Result<StatusCounts, TrackerError> {
        let mut counts = StatusCounts::default();
        match &self.live {
            LiveStore::Memory(index) => {
                index.for_each_live(Instant::now(), |p, _| {
                    if p.driver_id.starts_with(prefix) {
                        counts.add(p.status, 1);
                    }
                });
            }
            LiveStore::Redis(store) => {
                counts = store.counts_in(prefix).await.map_err(live_error)?;
            }
        }
        Ok(counts)
    }

    /// Every live driver inside a box (a stream subscriber's snapshot); with `prefix`, only those
    /// whose id starts with it (one tenant's).
    pub async fn within_box(
        &self,
        q: &BoxQuery,
        prefix: Option<&str>,
    ) -> Result<Vec<Position>, TrackerError> {
        match &self.live {
            LiveStore::Memory(index) => {
                let mut drivers = index.within_box(q, Instant::now());
                drivers.retain(|p| crate::domain::tenant::belongs(&p.driver_id, prefix));
                Ok(drivers)
            }
            // Filtered before the meta hashes are read.
            LiveStore::Redis(store) => store.within_box_in(q, prefix).await.map_err(live_error),
        }
    }

    /// A page of a driver's history.
    pub async fn track(&self, query: TrackQuery) -> Result<TrackPage, TrackerError> {
        if let Some(postgres) = &self.postgres {
            return postgres.pg.track(&query).await.map_err(|e| match e {
                PgHistoryError::BadCursor => TrackerError::BadCursor(e.to_string()),
                PgHistoryError::Database(_) => TrackerError::HistoryUnavailable(e.to_string()),
            });
        }
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

    /// Live drivers by status (across every instance when the store is shared).
    pub async fn counts(&self) -> Result<StatusCounts, TrackerError> {
        match &self.live {
            LiveStore::Memory(index) => Ok(index.counts()),
            LiveStore::Redis(store) => store.counts().await.map_err(live_error),
        }
    }

    pub fn updates_total(&self) -> u64 {
        self.updates_total.load(Ordering::Relaxed)
    }

    /// Removes drivers past their TTL; called by the background sweeper. Stream subscribers
    /// that were shown them are told they expired.
    pub async fn expire(self: &Arc<Self>) -> Result<usize, TrackerError> {
        match &self.live {
            LiveStore::Memory(_) => {
                let tracker = self.clone();
                tokio::task::spawn_blocking(move || tracker.expire_in_memory())
                    .await
                    .map_err(|e| TrackerError::LiveUnavailable(e.to_string()))
            }
            LiveStore::Redis(store) => {
                let removed = store.expire().await.map_err(live_error)?;
                let ids: Vec<DriverId> = removed.iter().map(|p| p.driver_id.clone()).collect();
                // Removed by this sweep: no longer current anywhere.
                self.hub.expired(&ids, |_| None);
                if let Some(feed) = &self.feed {
                    let events: Vec<_> = removed
                        .into_iter()
                        .map(|p| (p, RemovedReason::Expired))
                        .collect();
                    feed.publish_removed(&events);
                }
                Ok(ids.len())
            }
        }
    }

    /// Hands a position or removal that another instance published to this instance's
    /// subscribers.
    pub fn relay(&self, event: FeedEvent) {
        match event {
            // An offline position is a removal the hub derives itself.
            FeedEvent::Position(p)
            | FeedEvent::Removed {
                position: p,
                reason: RemovedReason::Offline,
            } => self.hub.publish([&p]),
            FeedEvent::Removed { position, .. } => {
                self.hub.expired(&[position.driver_id], |_| None)
            }
        }
    }

    /// Ready to serve: not draining, and the shared live store answers.
    pub async fn check_ready(&self) -> Result<(), String> {
        if !self.is_ready() {
            return Err("the service is draining".into());
        }
        match &self.live {
            LiveStore::Memory(_) => Ok(()),
            LiveStore::Redis(store) if store.ping().await => Ok(()),
            LiveStore::Redis(_) => Err("the live store (Redis) does not answer".into()),
        }
    }

    fn expire_in_memory(&self) -> usize {
        let Some(index) = self.live.memory() else {
            return 0;
        };
        if !self.hub.is_active() {
            return index.expire(Instant::now());
        }
        let mut expired = Vec::new();
        let removed = index.expire_each(Instant::now(), |p| expired.push(p.driver_id));
        self.hub
            .expired(&expired, |id| index.get(id, Instant::now()));
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
