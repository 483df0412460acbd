//! The push hub: who follows which drivers, and the fan-out of every applied position to them.
//!
//! [`Hub::publish`] runs on the ingest path, synchronously, after the live index has applied a
//! request's positions. It must stay cheap whatever the subscribers do, so:
//! - With no subscriber it returns at once (one atomic load).
//! - Subscribers are filed by area: each under the blocks (of [`crate::geo::Block`] levels 1–3,
//!   about 1.8 km, 14 km and 110 km) that cover its area, at the finest level where that takes at
//!   most [`scope::MAX_BLOCKS`] blocks; driver-id subscribers under their ids. A position meets
//!   only the subscribers filed under its own blocks or its id, so subscribers elsewhere cost it
//!   nothing, and the exact test ([`Scope::admits`]) runs on those few.
//! - Each message is serialised once and shared ([`message::Update`] behind an `Arc`).
//! - A push never waits: it goes into the subscriber's bounded [`outbox::Outbox`], which
//!   coalesces or closes a subscriber that cannot keep up (see there). Locks are held for
//!   microseconds and never across an await.
//!
//! **Leaving scope.** The hub remembers, for each driver that some subscriber is currently shown,
//! which subscribers those are (the *watchers*, sharded by driver id). Memory follows what is
//! watched, not the fleet, and no previous position is needed: when a position of a watched driver
//! is no longer admitted by a watcher, that watcher gets `removed` with reason `offline` (the
//! driver went offline) or `left_area` (it left the area, or the subscriber's status filter).
//! Drivers swept out by the index's TTL sweeper are handed to [`Hub::expired`] (reason
//! `expired`); the tracker calls it from `expire`.
//!
//! **Ordering.** Per driver, messages reach a subscriber in the order the watchers shard saw them;
//! a position older than the last one shown (two concurrent reports of one driver) is skipped,
//! as the index skips it. A new subscription is registered first, then reads its snapshot, then
//! *adopts* the snapshot's drivers: each is re-read under its watchers lock and, if it left scope
//! meanwhile, a `removed` follows the snapshot. So a client never keeps a driver it should not,
//! though it may see a `removed` for a driver it was never shown, or a position twice.

mod config;
mod feed;
pub mod message;
mod metrics;
mod outbox;
mod pacer;
pub mod scope;

pub use config::HubConfig;
pub use feed::{Feed, Refused};
pub use metrics::{IngestResult, StreamMetrics};
pub use scope::{Area, Circle, Scope, StreamRequest};

use crate::domain::{DriverId, Position, Status};
use crate::geo::{Cell, BLOCK_LEVELS};
use crate::metrics::Metrics;
use hashbrown::{DefaultHashBuilder, HashMap};
use message::Update;
use outbox::{Limits, Outbox};
use parking_lot::{Mutex, RwLock};
use scope::Placement;
use serde::Serialize;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TrackedFuture;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;

/// Watchers shards (a power of two): publishes of different drivers rarely meet on one lock.
const WATCH_SHARDS: usize = 16;

/// How a subscriber is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws = 0,
    Sse = 1,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Ws, Transport::Sse];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// Why a subscription (or an ingest connection) ended; a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed or went away.
    Client = 0,
    /// It could not keep up (backlog over the limit, or nothing taken for too long).
    TooSlow = 1,
    /// The server is shutting down.
    Shutdown = 2,
    /// It broke a rule: a flood of invalid messages, a message too large.
    Policy = 3,
    /// The connection failed.
    Error = 4,
}

impl CloseReason {
    pub const ALL: [CloseReason; 5] = [
        CloseReason::Client,
        CloseReason::TooSlow,
        CloseReason::Shutdown,
        CloseReason::Policy,
        CloseReason::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::TooSlow => "too_slow",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Policy => "policy",
            CloseReason::Error => "error",
        }
    }
}

/// Why a driver left a subscriber's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RemovedReason {
    /// It reported status `offline`.
    Offline,
    /// It was silent for longer than the driver TTL.
    Expired,
    /// It moved out of the area, or to a status the subscription does not follow.
    LeftArea,
}

impl RemovedReason {
    fn of(p: &Position) -> RemovedReason {
        if p.status == Status::Offline {
            RemovedReason::Offline
        } else {
            RemovedReason::LeftArea
        }
    }
}

type SubId = u64;

/// One registered subscription: immutable; a new scope replaces it with a new generation.
struct Entry {
    id: SubId,
    generation: u32,
    scope: Scope,
    outbox: Arc<Outbox>,
}

/// Where subscribers are filed (see the module docs).
#[derive(Default)]
struct Registry {
    entries: HashMap<SubId, Arc<Entry>>,
    /// Per block level 1..=3: block key → subscribers filed under it.
    blocks: [HashMap<u64, Vec<Arc<Entry>>>; BLOCK_LEVELS as usize],
    everywhere: Vec<Arc<Entry>>,
    drivers: HashMap<DriverId, Vec<Arc<Entry>>>,
}

impl Registry {
    fn insert(&mut self, entry: Arc<Entry>, placement: &Placement) {
        match placement {
            Placement::Blocks { level, keys } => {
                let blocks = &mut self.blocks[*level as usize - 1];
                for key in keys {
                    blocks.entry(*key).or_default().push(entry.clone());
                }
            }
            Placement::Everywhere => self.everywhere.push(entry.clone()),
            Placement::Drivers(ids) => {
                for id in ids {
                    self.drivers
                        .entry(id.clone())
                        .or_default()
                        .push(entry.clone());
                }
            }
        }
        self.entries.insert(entry.id, entry);
    }

    fn remove(&mut self, id: SubId) -> Option<Arc<Entry>> {
        let entry = self.entries.remove(&id)?;
        let unfile = |list: &mut Vec<Arc<Entry>>| list.retain(|e| e.id != id);
        match entry.scope.placement() {
            Placement::Blocks { level, keys } => {
                let blocks = &mut self.blocks[level as usize - 1];
                for key in keys {
                    if let Some(list) = blocks.get_mut(&key) {
                        unfile(list);
                        if list.is_empty() {
                            blocks.remove(&key);
                        }
                    }
                }
            }
            Placement::Everywhere => unfile(&mut self.everywhere),
            Placement::Drivers(ids) => {
                for driver in ids {
                    if let Some(list) = self.drivers.get_mut(driver.as_str()) {
                        unfile(list);
                        if list.is_empty() {
                            self.drivers.remove(driver.as_str());
                        }
                    }
                }
            }
        }
        Some(entry)
    }

    /// The subscribers that admit `p` (each at most once: a subscriber is filed at one level,
    /// under distinct blocks).
    fn admitting<'r>(&'r self, p: &Position, out: &mut Vec<&'r Arc<Entry>>) {
        out.clear();
        if p.status == Status::Offline {
            return;
        }
        let mut offer = |list: &'r Vec<Arc<Entry>>| {
            out.extend(list.iter().filter(|e| e.scope.admits(p)));
        };
        let cell = Cell::of(p.lat_e6, p.lon_e6);
        for (i, blocks) in self.blocks.iter().enumerate() {
            if !blocks.is_empty() {
                if let Some(list) = blocks.get(&scope::block_key(cell, i as u8 + 1)) {
                    offer(list);
                }
            }
        }
        offer(&self.everywhere);
        if !self.drivers.is_empty() {
            if let Some(list) = self.drivers.get(p.driver_id.as_str()) {
                offer(list);
            }
        }
    }

    /// The subscription `(id, generation)` if it is still the current one.
    fn current(&self, id: SubId, generation: u32) -> Option<&Arc<Entry>> {
        self.entries.get(&id).filter(|e| e.generation == generation)
    }
}

/// A driver some subscribers are shown: who, and the timestamp of the last position shown.
struct Watch {
    timestamp: crate::domain::Micros,
    subs: Vec<(SubId, u32)>,
}

type WatchShard = Mutex<HashMap<DriverId, Watch>>;

/// Subscriptions and fan-out; one per tracker.
pub struct Hub {
    config: HubConfig,
    metrics: StreamMetrics,
    registry: RwLock<Registry>,
    watchers: Box<[WatchShard]>,
    hasher: DefaultHashBuilder,
    /// Registered subscriptions: `publish` does nothing at all while this is zero.
    registered: AtomicUsize,
    next_id: AtomicU64,
    accepting: AtomicBool,
    /// Cancelled when the service stops accepting: every open feed ends.
    closing: Mutex<CancellationToken>,
    /// Open WebSocket connections (streams and ingest), which outlive their HTTP requests: a
    /// shutdown waits for them to say goodbye (see [`Hub::wait_closed`]).
    sockets: TaskTracker,
}

impl Hub {
    pub fn new(config: HubConfig, metrics: &Metrics) -> Hub {
        Hub {
            config,
            metrics: StreamMetrics::new(metrics),
            registry: RwLock::new(Registry::default()),
            watchers: (0..WATCH_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: DefaultHashBuilder::default(),
            registered: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            accepting: AtomicBool::new(true),
            closing: Mutex::new(CancellationToken::new()),
            sockets: TaskTracker::new(),
        }
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    pub fn metrics(&self) -> &StreamMetrics {
        &self.metrics
    }

    /// Whether any subscription is registered (callers may skip collecting what to publish).
    pub fn is_active(&self) -> bool {
        self.registered.load(Ordering::Relaxed) > 0
    }

    /// Whether new subscriptions (and ingest connections) are accepted.
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    /// Stops accepting and ends every open feed and ingest connection (`false`, when the service
    /// drains), or accepts again (`true`).
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::Relaxed);
        let mut closing = self.closing.lock();
        if accepting {
            if closing.is_cancelled() {
                *closing = CancellationToken::new();
            }
        } else {
            closing.cancel();
        }
    }

    /// Cancelled once the service stops accepting (see [`Hub::set_accepting`]).
    pub fn closing(&self) -> CancellationToken {
        self.closing.lock().clone()
    }

    /// Counts a WebSocket connection's task among those [`Hub::wait_closed`] waits for.
    pub fn track<F: Future>(&self, connection: F) -> TrackedFuture<F> {
        self.sockets.track_future(connection)
    }

    /// Waits (at most `limit`) for every WebSocket connection to end; call after
    /// `set_accepting(false)`, which tells them to close, so that their close frames go out
    /// before the process exits. True if they all ended.
    pub async fn wait_closed(&self, limit: Duration) -> bool {
        self.sockets.close();
        let ended = tokio::time::timeout(limit, self.sockets.wait())
            .await
            .is_ok();
        self.sockets.reopen();
        ended
    }

    fn watch_shard(&self, driver: &str) -> &WatchShard {
        &self.watchers[self.hasher.hash_one(driver) as usize % WATCH_SHARDS]
    }

    /// Fans out positions just applied to the live index (only those that became a driver's
    /// latest). Never waits on a subscriber. Lock order, everywhere: the registry, then one
    /// watchers shard, then an outbox.
    pub fn publish<'p>(&self, positions: impl IntoIterator<Item = &'p Position>) {
        if !self.is_active() {
            return;
        }
        let registry = self.registry.read();
        let mut targets = Vec::new();
        for p in positions {
            registry.admitting(p, &mut targets);
            self.publish_one(&registry, p, &targets);
        }
    }

    fn publish_one(&self, registry: &Registry, p: &Position, targets: &[&Arc<Entry>]) {
        // Serialised before taking the lock, which then stays short.
        let position = (!targets.is_empty()).then(|| Arc::new(message::position(p)));
        let mut shard = self.watch_shard(&p.driver_id).lock();
        let watch = shard.get_mut(p.driver_id.as_str());
        let previous = match watch {
            None if targets.is_empty() => return,
            Some(w) if p.timestamp < w.timestamp => return,
            Some(w) => std::mem::take(&mut w.subs),
            None => Vec::new(),
        };
        let mut removed: [Option<Arc<Update>>; 2] = [None, None];
        for (id, generation) in previous {
            if targets
                .iter()
                .any(|e| e.id == id && e.generation == generation)
            {
                continue;
            }
            if let Some(entry) = registry.current(id, generation) {
                let reason = RemovedReason::of(p);
                let slot = &mut removed[(reason == RemovedReason::LeftArea) as usize];
                let update =
                    slot.get_or_insert_with(|| Arc::new(message::removed(&p.driver_id, reason)));
                entry.outbox.push(update.clone());
            }
        }
        let Some(update) = position else {
            shard.remove(p.driver_id.as_str());
            return;
        };
        for entry in targets {
            entry.outbox.push(update.clone());
        }
        let subs = targets.iter().map(|e| (e.id, e.generation)).collect();
        let watch = Watch {
            timestamp: p.timestamp,
            subs,
        };
        shard.insert(p.driver_id.clone(), watch);
    }

    /// Tells the watchers of drivers the TTL sweeper removed that they expired. `current` reads a
    /// driver from the live index: one that reported again meanwhile is left alone.
    pub fn expired(&self, drivers: &[DriverId], current: impl Fn(&str) -> Option<Position>) {
        if !self.is_active() || drivers.is_empty() {
            return;
        }
        for driver in drivers {
            // Held per driver, not for the whole list: a subscription waiting to register would
            // otherwise hold up every publish behind it. Always the registry before a shard.
            let registry = self.registry.read();
            let mut shard = self.watch_shard(driver).lock();
            if !shard.contains_key(driver.as_str()) || current(driver).is_some() {
                continue;
            }
            let Some(watch) = shard.remove(driver.as_str()) else {
                continue;
            };
            let update = Arc::new(message::removed(driver, RemovedReason::Expired));
            for (id, generation) in watch.subs {
                if let Some(entry) = registry.current(id, generation) {
                    entry.outbox.push(update.clone());
                }
            }
        }
    }

    fn new_outbox(&self) -> Arc<Outbox> {
        let limits = Limits {
            queue: self.config.queue,
            backlog: self.config.backlog,
            max_lag: self.config.max_lag,
        };
        Arc::new(Outbox::new(limits, self.metrics.clone()))
    }

    /// Files a subscription (replacing its previous generation, whose pending messages are
    /// forgotten). From now on positions in scope reach its outbox.
    fn register(&self, id: SubId, generation: u32, scope: Scope, outbox: &Arc<Outbox>) {
        let placement = scope.placement();
        let entry = Arc::new(Entry {
            id,
            generation,
            scope,
            outbox: outbox.clone(),
        });
        let mut registry = self.registry.write();
        if registry.remove(id).is_none() {
            self.registered.fetch_add(1, Ordering::Relaxed);
        }
        outbox.clear();
        registry.insert(entry, &placement);
    }

    fn unregister(&self, id: SubId) {
        if self.registry.write().remove(id).is_some() {
            self.registered.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Makes the subscription a watcher of the drivers its snapshot showed. Each is re-read
    /// (`current`) under its watchers lock: one that left scope since the snapshot was read gets a
    /// `removed` now, unless a publish already handled it.
    fn adopt(
        &self,
        id: SubId,
        generation: u32,
        snapshot: &[Position],
        current: impl Fn(&str) -> Option<Position>,
    ) {
        // Not held during the loop (a large snapshot would hold up registrations, and publishes
        // queued behind them); the watchers locks order this against publishes.
        let Some(entry) = self.registry.read().current(id, generation).cloned() else {
            return;
        };
        for shown in snapshot {
            let driver = &shown.driver_id;
            let mut shard = self.watch_shard(driver).lock();
            let watched = shard
                .get(driver.as_str())
                .is_some_and(|w| w.subs.contains(&(id, generation)));
            if watched {
                continue;
            }
            match current(driver) {
                Some(now) if entry.scope.admits(&now) => {
                    let watch = shard.entry(driver.clone()).or_insert_with(|| Watch {
                        timestamp: now.timestamp,
                        subs: Vec::new(),
                    });
                    watch.subs.push((id, generation));
                }
                now => {
                    let reason = now
                        .as_ref()
                        .map_or(RemovedReason::Expired, RemovedReason::of);
                    entry
                        .outbox
                        .push(Arc::new(message::removed(driver, reason)));
                }
            }
        }
    }

    fn next_id(&self) -> SubId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
