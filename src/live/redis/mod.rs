//! The live index in Redis, shared by every instance: `--live-store redis`.
//!
//! Same operations and answers as the embedded [`crate::live::MemoryIndex`] (offline drivers are
//! kept and counted but never searched; an older timestamp never replaces the latest; a driver
//! vanishes a TTL after its last report), but the state lives in Redis, so a position posted to
//! one instance is visible to nearby searches and `GET /v1/drivers/{id}` on every other one.
//!
//! One concept per file:
//! - [`keys`]: the key layout (`drivers:geo`, `driver:<id>:meta`, ...) and the cluster sharding;
//! - [`geohash`]: the area cells keys are sharded by and channels are named after;
//! - `scripts`: the Lua scripts: the compare-and-set, the clock, the sweep;
//! - `batcher`: how concurrent upserts become one script call;
//! - `upsert`: the flush itself, standalone (one atomic script) and cluster (two steps), and
//!   the cross-instance race the cluster leaves;
//! - `search`: nearby and box queries (GEOSEARCH per area, confirmed against the meta hashes);
//! - `expiry`: the sweep that removes silent drivers from the GEO sets;
//! - `recent`: the fixes this instance applied, remembered for the sanity filters;
//! - [`feed`]: cross-instance streams over Pub/Sub.
//!
//! Every call goes through one multiplexed, reconnecting connection ([`RedisConn`]); errors come
//! back as [`RedisLiveError`] (a 503 upstream) and are counted in `redis_errors_total{op}`; nothing
//! here panics or waits longer than the connection's response timeout per command.

mod batcher;
mod expiry;
pub mod feed;
pub mod geohash;
pub mod keys;
mod meta;
mod recent;
mod scripts;
mod search;
mod upsert;

#[cfg(test)]
mod tests;

pub use crate::backend::redis::RedisTarget;
pub use feed::{AreaFeed, FeedEvent};
pub use keys::Layout;

use super::{BoxQuery, NearbyHit, NearbyQuery, StatusCounts, Upsert};
use crate::backend::redis::RedisConn;
use crate::domain::{DriverId, Position, Status};
use crate::metrics::Metrics;
use futures_util::future::join_all;
use futures_util::StreamExt;
use metrics::{Counter, Histogram};
use parking_lot::Mutex;
use redis::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long a meta hash outlives the driver TTL, so that the expiry sweep can still read the last
/// position of a driver it removes (to announce it). Readers ignore it after the TTL anyway.
pub const META_GRACE: Duration = Duration::from_secs(120);

/// How long a seen score may lag a driver's last report (a tenth of the TTL, at most 5 s).
pub fn seen_refresh(driver_ttl: Duration) -> Duration {
    (driver_ttl / 10).min(Duration::from_secs(5))
}

/// What went wrong talking to Redis.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisLiveError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    #[error("the redis upsert batcher has stopped")]
    Closed,
}

/// The operations errors and latencies are labelled with (a fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Upsert,
    Get,
    Nearby,
    Box,
    Counts,
    Expire,
    Publish,
    Subscribe,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Upsert,
        Op::Get,
        Op::Nearby,
        Op::Box,
        Op::Counts,
        Op::Expire,
        Op::Publish,
        Op::Subscribe,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Get => "get",
            Op::Nearby => "nearby",
            Op::Box => "box",
            Op::Counts => "counts",
            Op::Expire => "expire",
            Op::Publish => "publish",
            Op::Subscribe => "subscribe",
        }
    }
}

pub(crate) const ERRORS: &str = "redis_errors_total";
const GEOADD_LATENCY: &str = "redis_geoadd_latency_seconds";
const COMMAND_LATENCY: &str = "redis_command_latency_seconds";

/// Handles to the Redis metrics.
#[derive(Clone)]
pub(crate) struct RedisMetrics {
    geoadd: Histogram,
    latency: Vec<Histogram>,
    errors: Vec<Counter>,
}

impl RedisMetrics {
    pub fn new(metrics: &Metrics) -> RedisMetrics {
        metrics.describe_histogram(
            GEOADD_LATENCY,
            "Round trip of one batched upsert flush to Redis (compare-and-set and GEOADD)",
        );
        metrics.describe_histogram(COMMAND_LATENCY, "Round trip of Redis reads, by operation");
        metrics.describe_counter(ERRORS, "Failed Redis operations, by operation");
        RedisMetrics {
            geoadd: metrics.histogram(GEOADD_LATENCY, &[]),
            latency: Op::ALL
                .iter()
                .map(|op| metrics.histogram(COMMAND_LATENCY, &[("op", op.as_str())]))
                .collect(),
            errors: Op::ALL
                .iter()
                .map(|op| metrics.counter(ERRORS, &[("op", op.as_str())]))
                .collect(),
        }
    }

    pub fn error(&self, op: Op) {
        self.errors[op as usize].increment(1);
    }

    /// Records the latency of `op`, or counts its error; passes the result through.
    fn observe<T>(
        &self,
        op: Op,
        started: Instant,
        result: Result<T, RedisLiveError>,
    ) -> Result<T, RedisLiveError> {
        match &result {
            Ok(_) => self.latency[op as usize].record(started.elapsed().as_secs_f64()),
            Err(_) => self.error(op),
        }
        result
    }
}

/// What the batcher task and the queries share.
pub(crate) struct Shared {
    conn: RedisConn,
    layout: Layout,
    ttl_ms: u64,
    keep_ms: u64,
    /// How stale a seen score may get before an upsert refreshes it (single server; see
    /// [`expiry`]).
    refresh_ms: u64,
    metrics: RedisMetrics,
    /// Cluster: areas this instance knows are in `drivers:areas` (forgotten every
    /// [`AREA_CACHE_TTL`], so a lost registry fills up again).
    known_areas: Mutex<(Instant, HashSet<String>)>,
}

const AREA_CACHE_TTL: Duration = Duration::from_secs(60);
/// Meta hashes read per pipeline.
const READ_CHUNK: usize = 512;
/// Read pipelines in flight at once. A large read (a stream snapshot of a whole city) sent all at
/// once would queue every pipeline behind the others in Redis, and the last ones would outlive the
/// response timeout ([`crate::backend::redis::RESPONSE_TIMEOUT`]) before Redis got to them; this
/// many full pipelines are tens of milliseconds of Redis work. Small reads in a cluster (a nearby
/// query's candidates spread over the meta buckets: dozens of pipelines of a few hashes) still go
/// out nearly all at once.
const READS_IN_FLIGHT: usize = 32;

/// The Redis live store. Cheap to clone (clones share the connection and the batcher).
#[derive(Clone)]
pub struct RedisLive {
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<batcher::Job>,
    recent: Arc<recent::RecentFixes>,
}

impl RedisLive {
    /// Connects to Redis (it must be reachable now; later outages are survived) and starts the
    /// upsert batcher. Drivers expire `driver_ttl` after their last report.
    pub async fn connect(
        target: &RedisTarget,
        driver_ttl: Duration,
        metrics: &Metrics,
    ) -> anyhow::Result<RedisLive> {
        let conn = RedisConn::connect(target).await?;
        let layout = if target.cluster {
            Layout::Cluster
        } else {
            Layout::Standalone
        };
        let ttl_ms = (driver_ttl.as_millis() as u64).max(1);
        let shared = Arc::new(Shared {
            conn,
            layout,
            ttl_ms,
            keep_ms: ttl_ms + META_GRACE.as_millis() as u64,
            refresh_ms: match layout {
                Layout::Standalone => seen_refresh(driver_ttl).as_millis() as u64,
                Layout::Cluster => 0,
            },
            metrics: RedisMetrics::new(metrics),
            known_areas: Mutex::new((Instant::now(), HashSet::new())),
        });
        let (queue, jobs) = mpsc::unbounded_channel();
        tokio::spawn(batcher::run(shared.clone(), jobs));
        let recent = Arc::new(recent::RecentFixes::new(recent::CAPACITY, driver_ttl));
        Ok(RedisLive {
            shared,
            queue,
            recent,
        })
    }

    /// The shared connection (for [`AreaFeed::new`]).
    pub fn conn(&self) -> RedisConn {
        self.shared.conn.clone()
    }

    pub fn layout(&self) -> Layout {
        self.shared.layout
    }

    /// Makes each position its driver's latest unless the driver already has a newer one; one
    /// result per position, in order. Concurrent calls are batched into one script call.
    pub async fn upsert(&self, positions: &[Position]) -> Result<Vec<Upsert>, RedisLiveError> {
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        let (done, result) = oneshot::channel();
        let job = batcher::Job {
            positions: positions.to_vec(),
            done,
        };
        if self.queue.send(job).is_err() {
            self.shared.metrics.error(Op::Upsert);
            return Err(RedisLiveError::Closed);
        }
        let results = result.await.unwrap_or(Err(RedisLiveError::Closed))?;
        let now = Instant::now();
        for (position, result) in positions.iter().zip(&results) {
            if *result == Upsert::Applied {
                self.recent.remember(position, now);
            }
        }
        Ok(results)
    }

    /// The driver's latest position (offline included), or `None` once it is past its TTL.
    pub async fn get(&self, driver_id: &str) -> Result<Option<Position>, RedisLiveError> {
        let started = Instant::now();
        let result = self.shared.read(&[DriverId::new(driver_id)], false).await;
        let result = result.map(|mut v| v.pop().flatten().map(|(_, p)| p));
        self.shared.metrics.observe(Op::Get, started, result)
    }

    /// [`RedisLive::nearby`] among the drivers whose id starts with `prefix` (a tenant's).
    pub async fn nearby_in(
        &self,
        q: &NearbyQuery,
        prefix: Option<&str>,
    ) -> Result<Vec<NearbyHit>, RedisLiveError> {
        let started = Instant::now();
        let result = search::nearby(&self.shared, q, prefix).await;
        self.shared.metrics.observe(Op::Nearby, started, result)
    }

    /// The latest positions of `ids`, aligned with them, in one pipeline.
    pub async fn get_many(
        &self,
        ids: &[DriverId],
    ) -> Result<Vec<Option<Position>>, RedisLiveError> {
        let started = Instant::now();
        let result = self.shared.read(ids, false).await;
        let result = result.map(|v| v.into_iter().map(|r| r.map(|(_, p)| p)).collect());
        self.shared.metrics.observe(Op::Get, started, result)
    }

    /// The latest fix of each of `ids` as far as the sanity filters need it, aligned with them:
    /// from what this instance remembers, Redis read (in one pipeline) only for the others. A
    /// fix applied through another instance may be missed in favour of an older one; see
    /// `recent` for why the filters may use it anyway.
    pub async fn previous_of(
        &self,
        ids: &[DriverId],
    ) -> Result<Vec<Option<Position>>, RedisLiveError> {
        let now = Instant::now();
        let mut fixes: Vec<Option<Position>> =
            ids.iter().map(|id| self.recent.get(id, now)).collect();
        let missing: Vec<usize> = (0..ids.len()).filter(|&i| fixes[i].is_none()).collect();
        if missing.is_empty() {
            return Ok(fixes);
        }
        let unknown: Vec<DriverId> = missing.iter().map(|&i| ids[i].clone()).collect();
        for (i, fix) in missing.into_iter().zip(self.get_many(&unknown).await?) {
            if let Some(fix) = &fix {
                self.recent.remember(fix, now);
            }
            fixes[i] = fix;
        }
        Ok(fixes)
    }

    /// The `limit` nearest live drivers within the radius whose status matches, nearest first
    /// (ties by id) — the same answer as [`crate::live::MemoryIndex::nearby`].
    pub async fn nearby(&self, q: &NearbyQuery) -> Result<Vec<NearbyHit>, RedisLiveError> {
        let started = Instant::now();
        let result = search::nearby(&self.shared, q, None).await;
        self.shared.metrics.observe(Op::Nearby, started, result)
    }

    /// Every live driver in the box whose status matches (never offline ones), in no particular
    /// order; boxes across the antimeridian included.
    pub async fn within_box(&self, q: &BoxQuery) -> Result<Vec<Position>, RedisLiveError> {
        self.within_box_in(q, None).await
    }

    /// [`RedisLive::within_box`] among the drivers whose id starts with `prefix` (a tenant's): other
    /// tenants' meta hashes are never read.
    pub async fn within_box_in(
        &self,
        q: &BoxQuery,
        prefix: Option<&str>,
    ) -> Result<Vec<Position>, RedisLiveError> {
        let started = Instant::now();
        let result = search::within_box(&self.shared, q, prefix).await;
        self.shared.metrics.observe(Op::Box, started, result)
    }

    /// Drivers by status across all instances, including silent ones the sweep has not removed yet
    /// (like the embedded index).
    pub async fn counts(&self) -> Result<StatusCounts, RedisLiveError> {
        let started = Instant::now();
        let result = self.shared.counts(None).await;
        self.shared.metrics.observe(Op::Counts, started, result)
    }

    /// [`RedisLive::counts`] of the drivers whose id starts with `prefix` (one tenant's).
    pub async fn counts_in(&self, prefix: &str) -> Result<StatusCounts, RedisLiveError> {
        let started = Instant::now();
        let result = self.shared.counts(Some(prefix)).await;
        self.shared.metrics.observe(Op::Counts, started, result)
    }

    /// Sweeps drivers silent for a TTL out of the GEO and seen sets; returns the last positions of
    /// those this call removed (each driver is returned by exactly one of several concurrent
    /// sweeps, since removal is atomic per area). Safe to run on every instance.
    pub async fn expire(&self) -> Result<Vec<Position>, RedisLiveError> {
        let started = Instant::now();
        let result = expiry::sweep(&self.shared).await;
        self.shared.metrics.observe(Op::Expire, started, result)
    }

    /// True when Redis answers a PING now.
    pub async fn ping(&self) -> bool {
        self.shared.conn.clone().ping().await
    }
}

impl Shared {
    fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Groups items by the hash slot of `key(item)` (one group on a single server), keeping order
    /// within a group.
    fn by_slot<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        key: impl Fn(&T) -> String,
    ) -> Vec<Vec<T>> {
        let mut groups: HashMap<Option<redis::cluster_routing::Slot>, Vec<T>> = HashMap::new();
        for item in items {
            groups
                .entry(self.layout.slot(&key(&item)))
                .or_default()
                .push(item);
        }
        groups.into_values().collect()
    }

    /// Reads the meta hashes of `ids`: per id `None` when absent (or expired, unless `raw`), else
    /// whether it is fresh and the position. One pipeline per slot and chunk: the Redis clock
    /// (`TIME`, the clock `seen` was written with) and an `HMGET` per hash.
    async fn read(
        &self,
        ids: &[DriverId],
        raw: bool,
    ) -> Result<Vec<Option<(bool, Position)>>, RedisLiveError> {
        let mut calls = Vec::new();
        for group in self.by_slot(0..ids.len(), |&i| self.layout.meta_key(&ids[i])) {
            for chunk in group.chunks(READ_CHUNK) {
                let mut pipe = redis::pipe();
                pipe.cmd("TIME");
                for &i in chunk {
                    pipe.cmd("HMGET")
                        .arg(self.layout.meta_key(&ids[i]))
                        .arg(&meta::FIELDS);
                }
                let mut conn = self.conn();
                let chunk = chunk.to_vec();
                calls.push(async move {
                    let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
                    Ok::<_, RedisLiveError>((chunk, replies))
                });
            }
        }
        let mut out = vec![None; ids.len()];
        let mut results = futures_util::stream::iter(calls).buffer_unordered(READS_IN_FLIGHT);
        while let Some(result) = results.next().await {
            let (chunk, replies) = result?;
            let Some((time, hashes)) = replies.split_first() else {
                return Err(RedisLiveError::Reply("empty meta read reply".into()));
            };
            if hashes.len() != chunk.len() {
                return Err(RedisLiveError::Reply(
                    "meta read reply of the wrong length".into(),
                ));
            }
            let now_ms = meta::time_ms(time)?;
            for (i, v) in chunk.into_iter().zip(hashes) {
                out[i] = meta::parse(&ids[i], v, now_ms, self.ttl_ms, raw)?;
            }
        }
        Ok(out)
    }

    /// The areas that exist: the global one on a single server, the registry in a cluster.
    async fn all_areas(&self) -> Result<Vec<String>, RedisLiveError> {
        match self.layout {
            Layout::Standalone => Ok(vec![String::new()]),
            Layout::Cluster => {
                let areas: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(keys::AREAS_KEY)
                    .query_async(&mut self.conn())
                    .await?;
                Ok(areas)
            }
        }
    }

    /// Drivers by status from every area: the sizes of its seen sets, or with `prefix` (one
    /// tenant's, `tenant/`) the size of that id range of its rosters.
    async fn counts(&self, prefix: Option<&str>) -> Result<StatusCounts, RedisLiveError> {
        let areas = self.all_areas().await?;
        let range = prefix.map(keys::lex_range);
        let mut calls = Vec::new();
        for group in self.by_slot(areas, |a| self.layout.geo_key(a)) {
            let mut pipe = redis::pipe();
            for area in &group {
                match &range {
                    None => {
                        for key in self.layout.seen_keys(area) {
                            pipe.cmd("ZCARD").arg(key);
                        }
                    }
                    Some((from, to)) => {
                        for key in self.layout.roster_keys(area) {
                            pipe.cmd("ZLEXCOUNT").arg(key).arg(from).arg(to);
                        }
                    }
                }
            }
            let mut conn = self.conn();
            calls.push(async move { pipe.query_async::<Vec<u64>>(&mut conn).await });
        }
        let mut counts = StatusCounts::default();
        for result in join_all(calls).await {
            for (i, n) in result?.into_iter().enumerate() {
                counts.add(Status::ALL[i % 3], n);
            }
        }
        Ok(counts)
    }

    /// Registers areas in `drivers:areas` unless this instance did so recently.
    async fn register_areas(&self, areas: &[&str]) -> Result<(), RedisLiveError> {
        let new: Vec<String> = {
            let mut known = self.known_areas.lock();
            if known.0.elapsed() > AREA_CACHE_TTL {
                *known = (Instant::now(), HashSet::new());
            }
            areas
                .iter()
                .filter(|a| !known.1.contains(**a))
                .map(|a| a.to_string())
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        let _: Value = redis::cmd("SADD")
            .arg(keys::AREAS_KEY)
            .arg(&new)
            .query_async(&mut self.conn())
            .await?;
        self.known_areas.lock().1.extend(new);
        Ok(())
    }
}
