//! The embedded live index: latest position per driver in memory, bucketed by grid cell.
//!
//! Layout, chosen for a million drivers on a small machine:
//! - Drivers are split over [`SHARDS`] shards by a hash of their id, each behind its own `RwLock`, so
//!   updates to different drivers rarely meet on one lock and never on a global one.
//! - A shard keeps its drivers in a slab of fixed 64-byte [`Record`]s (chunks of 4,096, so growth
//!   never copies or doubles the whole slab), a `HashTable<u32>` from id to slot (5 bytes an entry),
//!   and, per grid cell, a vector of 12-byte [`CellEntry`]s carrying the coordinates and status inline:
//!   the nearby search ranks candidates without touching their records.
//! - An update is O(1): find the slot, overwrite the record, and move one cell entry when the driver
//!   crossed a cell border (swap-remove, fixing the moved entry's back-pointer).
//! - A search visits rings of cells around the point in order of distance and stops as soon as the
//!   next ring cannot hold anything nearer than the current `limit`-th result (see [`Search`]).
//! - Expiry is checked wherever a driver is read, so a silent driver vanishes exactly at its TTL;
//!   [`MemoryIndex::expire`] reclaims the memory and the counts in the background.

use super::{BoxQuery, NearbyHit, NearbyQuery, StatusCounts, Upsert};
use crate::domain::{DriverId, Micros, Position, Status, StatusSet};
use crate::geo::{hav_to_meters, meters_to_hav, Block, Cell, Grid, BLOCK_LEVELS, RAD_PER_E6};
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use parking_lot::{RwLock, RwLockReadGuard};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

/// Number of shards (a power of two). Eight keeps per-cell vectors dense enough that their overhead
/// stays small at a million drivers, while two cores almost never contend on one shard.
pub const SHARDS: usize = 8;
const CHUNK: usize = 4096;
const NOT_IN_GRID: u32 = u32::MAX;
/// Last-seen times are kept in 10 ms ticks in a wrapping `u32` (497 days before wrap-around; ages are
/// computed with wrapping arithmetic, and the sweeper removes drivers long before that).
const TICK_MS: u128 = 10;

/// One driver's latest state. 64 bytes.
#[derive(Default)]
struct Record {
    /// Empty for a free slot.
    id: DriverId,
    timestamp: Micros,
    lat_e6: i32,
    lon_e6: i32,
    seen: u32,
    /// Index of this driver's entry in its cell's vector, or `NOT_IN_GRID` (offline drivers).
    cell_pos: u32,
    speed: f32,
    heading: f32,
    accuracy: f32,
    status: u8,
}

fn opt_to_f32(v: Option<f32>) -> f32 {
    v.unwrap_or(f32::NAN)
}
fn f32_to_opt(v: f32) -> Option<f32> {
    (!v.is_nan()).then_some(v)
}

impl Record {
    fn to_position(&self) -> Position {
        Position {
            driver_id: self.id.clone(),
            lat_e6: self.lat_e6,
            lon_e6: self.lon_e6,
            status: Status::from_index(self.status),
            timestamp: self.timestamp,
            speed_mps: f32_to_opt(self.speed),
            heading_deg: f32_to_opt(self.heading),
            accuracy_m: f32_to_opt(self.accuracy),
        }
    }
}

/// A driver's place in a cell: coordinates and status inline, plus its slot.
#[derive(Clone, Copy)]
struct CellEntry {
    lat_e6: i32,
    lon_e6: i32,
    /// `slot << 2 | status`.
    slot_status: u32,
}

impl CellEntry {
    fn new(slot: u32, p: &Position) -> CellEntry {
        CellEntry {
            lat_e6: p.lat_e6,
            lon_e6: p.lon_e6,
            slot_status: slot << 2 | p.status as u32,
        }
    }
    fn slot(self) -> u32 {
        self.slot_status >> 2
    }
    fn status(self) -> Status {
        Status::from_index((self.slot_status & 3) as u8)
    }
}

#[derive(Default)]
struct Shard {
    chunks: Vec<Vec<Record>>,
    free: Vec<u32>,
    by_id: HashTable<u32>,
    cells: HashMap<u64, Vec<CellEntry>>,
    /// Per level 1..=3, block key → mask of its occupied children (see [`Block`]).
    blocks: [HashMap<u64, u64>; BLOCK_LEVELS as usize],
    counts: [u64; 3],
}

/// Ages and TTL in ticks.
#[derive(Clone, Copy)]
struct Freshness {
    now: u32,
    ttl: u32,
}

impl Freshness {
    /// Ticks since `seen`; zero when `seen` is after `now`. That happens: a request stamps its
    /// positions with its own clock reading, which can be newer than the one a concurrent reader or
    /// the sweeper took a moment earlier — such a driver is as fresh as can be, never expired.
    /// (TTLs are at most `u32::MAX / 2` ticks, so the upper half of the range means "ahead".)
    fn age(self, seen: u32) -> u32 {
        let age = self.now.wrapping_sub(seen);
        if age > u32::MAX / 2 {
            0
        } else {
            age
        }
    }

    fn is_live(self, seen: u32) -> bool {
        self.age(seen) < self.ttl
    }
}

impl Shard {
    fn record(&self, slot: u32) -> &Record {
        &self.chunks[slot as usize / CHUNK][slot as usize % CHUNK]
    }

    fn record_mut(&mut self, slot: u32) -> &mut Record {
        &mut self.chunks[slot as usize / CHUNK][slot as usize % CHUNK]
    }

    fn find(&self, hash: u64, id: &str) -> Option<u32> {
        self.by_id
            .find(hash, |&slot| self.record(slot).id == id)
            .copied()
    }

    fn allocate(&mut self) -> u32 {
        if let Some(slot) = self.free.pop() {
            return slot;
        }
        let before = self.chunks.len().saturating_sub(1) * CHUNK;
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => {
                last.push(Record::default());
                (before + last.len() - 1) as u32
            }
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(Record::default());
                self.chunks.push(chunk);
                ((self.chunks.len() - 1) * CHUNK) as u32
            }
        }
    }

    /// `seen` is when the position was received, in ticks (now, or earlier when restoring).
    fn upsert(
        &mut self,
        hash: u64,
        p: &Position,
        fresh: Freshness,
        seen: u32,
        hasher: &DefaultHashBuilder,
    ) -> Upsert {
        let slot = match self.find(hash, &p.driver_id) {
            Some(slot) => {
                let rec = self.record(slot);
                if fresh.is_live(rec.seen) && p.timestamp < rec.timestamp {
                    return Upsert::Stale;
                }
                let old_status = rec.status as usize;
                self.counts[old_status] -= 1;
                slot
            }
            None => {
                let slot = self.allocate();
                let rec = self.record_mut(slot);
                rec.id = p.driver_id.clone();
                rec.cell_pos = NOT_IN_GRID;
                let chunks = &self.chunks;
                self.by_id.insert_unique(hash, slot, |&s| {
                    hasher.hash_one(chunks[s as usize / CHUNK][s as usize % CHUNK].id.as_str())
                });
                slot
            }
        };
        self.place(slot, p);
        let rec = self.record_mut(slot);
        rec.lat_e6 = p.lat_e6;
        rec.lon_e6 = p.lon_e6;
        rec.timestamp = p.timestamp;
        rec.status = p.status as u8;
        rec.seen = seen;
        rec.speed = opt_to_f32(p.speed_mps);
        rec.heading = opt_to_f32(p.heading_deg);
        rec.accuracy = opt_to_f32(p.accuracy_m);
        self.counts[p.status as usize] += 1;
        Upsert::Applied
    }

    /// Moves `slot`'s cell entry to where `p` says it is (before its record is overwritten).
    fn place(&mut self, slot: u32, p: &Position) {
        let rec = self.record(slot);
        let old_pos = rec.cell_pos;
        let old_cell = Cell::of(rec.lat_e6, rec.lon_e6);
        let new_cell = Cell::of(p.lat_e6, p.lon_e6);
        let indexed = p.status != Status::Offline;
        if old_pos != NOT_IN_GRID {
            if indexed && old_cell == new_cell {
                if let Some(entry) = self
                    .cells
                    .get_mut(&new_cell.key())
                    .and_then(|v| v.get_mut(old_pos as usize))
                {
                    *entry = CellEntry::new(slot, p);
                }
                return;
            }
            self.remove_from_cell(old_cell.key(), old_pos);
        }
        let new_pos = if indexed {
            let entries = match self.cells.entry(new_cell.key()) {
                hashbrown::hash_map::Entry::Occupied(e) => e.into_mut(),
                hashbrown::hash_map::Entry::Vacant(e) => {
                    mark_occupied(&mut self.blocks, new_cell);
                    e.insert(Vec::new())
                }
            };
            entries.push(CellEntry::new(slot, p));
            (entries.len() - 1) as u32
        } else {
            NOT_IN_GRID
        };
        self.record_mut(slot).cell_pos = new_pos;
    }

    fn remove_from_cell(&mut self, key: u64, pos: u32) {
        let Some(entries) = self.cells.get_mut(&key) else {
            return;
        };
        entries.swap_remove(pos as usize);
        let moved = entries.get(pos as usize).map(|e| e.slot());
        if entries.is_empty() {
            self.cells.remove(&key);
            mark_empty(&mut self.blocks, Cell::from_key(key));
        } else if entries.capacity() > 16 && entries.len() < entries.capacity() / 4 {
            entries.shrink_to(entries.capacity() / 2);
        }
        if let Some(moved) = moved {
            self.record_mut(moved).cell_pos = pos;
        }
    }

    /// Removes every driver whose TTL ran out, handing each one's last position to
    /// `removed_position`; returns how many.
    fn expire(
        &mut self,
        fresh: Freshness,
        hasher: &DefaultHashBuilder,
        removed_position: &mut impl FnMut(Position),
    ) -> usize {
        let mut removed = 0;
        for slot in 0..(self.chunks.len() * CHUNK) as u32 {
            let Some(rec) = self
                .chunks
                .get(slot as usize / CHUNK)
                .and_then(|c| c.get(slot as usize % CHUNK))
            else {
                break;
            };
            if rec.id.is_empty() || fresh.is_live(rec.seen) {
                continue;
            }
            removed_position(rec.to_position());
            let hash = hasher.hash_one(rec.id.as_str());
            let (cell, pos, status) = (Cell::of(rec.lat_e6, rec.lon_e6), rec.cell_pos, rec.status);
            if pos != NOT_IN_GRID {
                self.remove_from_cell(cell.key(), pos);
            }
            if let Ok(entry) = self.by_id.find_entry(hash, |&s| s == slot) {
                entry.remove();
            }
            self.counts[status as usize] -= 1;
            *self.record_mut(slot) = Record::default();
            self.free.push(slot);
            removed += 1;
        }
        removed
    }

    /// Live drivers of one cell that lie inside the box and match its statuses.
    fn collect_in_box(
        &self,
        entries: &[CellEntry],
        q: &BoxQuery,
        fresh: Freshness,
        found: &mut Vec<Position>,
    ) {
        for e in entries {
            if q.statuses.contains(e.status()) && q.contains(e.lat_e6, e.lon_e6) {
                let rec = self.record(e.slot());
                if fresh.is_live(rec.seen) {
                    found.push(rec.to_position());
                }
            }
        }
    }
}

/// Records that `cell` became occupied in every block above it (stops at the first block that
/// already had an occupied child: its ancestors know already).
fn mark_occupied(blocks: &mut [HashMap<u64, u64>; BLOCK_LEVELS as usize], cell: Cell) {
    let mut child = Block::of_cell(cell);
    for level_blocks in blocks.iter_mut() {
        let (parent, bit) = child.parent();
        let mask = level_blocks.entry(parent.key()).or_insert(0);
        let had_children = *mask != 0;
        *mask |= 1 << bit;
        if had_children {
            return;
        }
        child = parent;
    }
}

/// Records that `cell` became empty, clearing blocks upwards while they become empty too.
fn mark_empty(blocks: &mut [HashMap<u64, u64>; BLOCK_LEVELS as usize], cell: Cell) {
    let mut child = Block::of_cell(cell);
    for level_blocks in blocks.iter_mut() {
        let (parent, bit) = child.parent();
        let Some(mask) = level_blocks.get_mut(&parent.key()) else {
            return;
        };
        *mask &= !(1 << bit);
        if *mask != 0 {
            return;
        }
        level_blocks.remove(&parent.key());
        child = parent;
    }
}

/// The embedded live index. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct MemoryIndex {
    shards: Box<[RwLock<Shard>]>,
    hasher: DefaultHashBuilder,
    epoch: Instant,
    ttl_ticks: u32,
}

impl MemoryIndex {
    /// An empty index whose drivers disappear after `ttl` without an update.
    pub fn new(ttl: Duration) -> MemoryIndex {
        let ttl_ticks = ttl
            .as_millis()
            .div_ceil(TICK_MS)
            .clamp(1, u32::MAX as u128 / 2) as u32;
        MemoryIndex {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: DefaultHashBuilder::default(),
            epoch: Instant::now(),
            ttl_ticks,
        }
    }

    fn freshness(&self, now: Instant) -> Freshness {
        let ticks = now.saturating_duration_since(self.epoch).as_millis() / TICK_MS;
        Freshness {
            now: ticks as u32, // wraps by design
            ttl: self.ttl_ticks,
        }
    }

    fn locate(&self, id: &str) -> (u64, &RwLock<Shard>) {
        let hash = self.hasher.hash_one(id);
        // Bits 32.. pick the shard: the table inside uses the low bits for buckets and the top 7 for
        // tags, so the shard choice does not thin out either.
        (hash, &self.shards[(hash >> 32) as usize % SHARDS])
    }

    /// Makes `p` the driver's latest position unless the driver already has a newer one.
    pub fn upsert(&self, p: &Position, now: Instant) -> Upsert {
        let (hash, shard) = self.locate(&p.driver_id);
        let fresh = self.freshness(now);
        shard
            .write()
            .upsert(hash, p, fresh, fresh.now, &self.hasher)
    }

    /// Like [`MemoryIndex::upsert`] for a position received `age` ago (replaying the log, loading a
    /// snapshot): it expires when it would have had it never been interrupted. Too old: `Expired`.
    pub fn restore(&self, p: &Position, now: Instant, age: Duration) -> Upsert {
        let fresh = self.freshness(now);
        let age_ticks = (age.as_millis() / TICK_MS).min(u32::MAX as u128) as u32;
        if age_ticks >= fresh.ttl {
            return Upsert::Expired;
        }
        let (hash, shard) = self.locate(&p.driver_id);
        let seen = fresh.now.wrapping_sub(age_ticks);
        shard.write().upsert(hash, p, fresh, seen, &self.hasher)
    }

    /// Calls `visit` with every live driver's latest position and how long ago it was received,
    /// one shard at a time (each shard is read-locked only while it is visited).
    pub fn for_each_live(&self, now: Instant, mut visit: impl FnMut(&Position, Duration)) {
        let fresh = self.freshness(now);
        for shard in self.shards.iter() {
            let shard = shard.read();
            for rec in shard.chunks.iter().flatten() {
                if !rec.id.is_empty() && fresh.is_live(rec.seen) {
                    let age_ms = fresh.age(rec.seen) as u64 * TICK_MS as u64;
                    visit(&rec.to_position(), Duration::from_millis(age_ms));
                }
            }
        }
    }

    /// The driver's latest position, if it reported within the TTL.
    pub fn get(&self, id: &str, now: Instant) -> Option<Position> {
        let (hash, shard) = self.locate(id);
        let shard = shard.read();
        let rec = shard.record(shard.find(hash, id)?);
        self.freshness(now)
            .is_live(rec.seen)
            .then(|| rec.to_position())
    }

    /// Drivers by status, including those past their TTL that the sweeper has not removed yet.
    pub fn counts(&self) -> StatusCounts {
        let mut counts = StatusCounts::default();
        for shard in self.shards.iter() {
            let shard = shard.read();
            for status in Status::ALL {
                counts.add(status, shard.counts[status as usize]);
            }
        }
        counts
    }

    /// Removes drivers whose TTL ran out, one shard at a time; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        self.expire_each(now, |_| {})
    }

    /// Like [`MemoryIndex::expire`], handing each removed driver's last position to `removed`
    /// (the stream hub tells its subscribers that these drivers expired).
    pub fn expire_each(&self, now: Instant, mut removed: impl FnMut(Position)) -> usize {
        let fresh = self.freshness(now);
        self.shards
            .iter()
            .map(|s| s.write().expire(fresh, &self.hasher, &mut removed))
            .sum()
    }

    /// Every live driver inside the box whose status matches, in no particular order (offline
    /// drivers are not in the grid, so never found). Each shard visits the box's cells or its own
    /// occupied cells, whichever are fewer, so a box over a whole continent costs no more than one
    /// pass over the occupied cells.
    pub fn within_box(&self, q: &BoxQuery, now: Instant) -> Vec<Position> {
        let fresh = self.freshness(now);
        let (rows, cols) = q.cell_ranges();
        let cols: Vec<_> = cols.into_iter().flatten().collect();
        let width: u64 = cols.iter().map(|c| (c.end() - c.start() + 1) as u64).sum();
        let box_cells = (rows.end() - rows.start() + 1).max(0) as u64 * width;
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read();
            if box_cells <= shard.cells.len() as u64 {
                for row in rows.clone() {
                    for col in cols.iter().flat_map(|c| c.clone()) {
                        if let Some(entries) = shard.cells.get(&Cell { row, col }.key()) {
                            shard.collect_in_box(entries, q, fresh, &mut found);
                        }
                    }
                }
            } else {
                for (&key, entries) in &shard.cells {
                    let cell = Cell::from_key(key);
                    if rows.contains(&cell.row) && cols.iter().any(|c| c.contains(&cell.col)) {
                        shard.collect_in_box(entries, q, fresh, &mut found);
                    }
                }
            }
        }
        found
    }

    /// The `limit` nearest live drivers within the radius whose status matches, nearest first.
    pub fn nearby(&self, q: &NearbyQuery, now: Instant) -> Vec<NearbyHit> {
        self.nearby_in(q, None, now)
    }

    /// [`MemoryIndex::nearby`] among the drivers whose id starts with `prefix` (a tenant's).
    pub fn nearby_in(&self, q: &NearbyQuery, prefix: Option<&str>, now: Instant) -> Vec<NearbyHit> {
        let guards: Vec<RwLockReadGuard<'_, Shard>> =
            self.shards.iter().map(|s| s.read()).collect();
        let mut search = Search::new(q, &guards, self.freshness(now));
        search.prefix = prefix;
        search.run();
        search.into_hits()
    }
}

/// A candidate in the result heap, ordered by haversine (the heap's top is the farthest kept).
#[derive(Clone, Copy, PartialEq)]
struct Candidate {
    hav: f64,
    shard: u8,
    slot: u32,
}

impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.hav.total_cmp(&other.hav)
    }
}

/// One nearby search over read-locked shards, in two phases.
///
/// 1. Rings of cells outwards from the point's cell. A cell is scanned only if its lower bound
///    ([`crate::geo::CellBounds::min_hav`]) can beat the current bound (the radius, or the
///    `limit`-th best so far once the heap is full). The search ends after a ring whose every cell is
///    beyond the bound: any point outside the rings visited is at least as far as some cell of the
///    last ring, since the great circle to it crosses that ring. In a dense city this ends after one
///    or two rings.
/// 2. If [`RING_PHASE`] rings were not enough (sparse data, a large radius, near the poles), a
///    best-first descent through the occupied [`Block`]s, nearest lower bound first, skipping the
///    cells phase 1 scanned. Its cost follows the occupied space, not the area of the circle, so an
///    empty 100 km circle is as cheap as a small one.
struct Search<'a> {
    shards: &'a [RwLockReadGuard<'a, Shard>],
    fresh: Freshness,
    lat: f64,
    lon: f64,
    cos_lat: f64,
    lat_e6: i32,
    lon_e6: i32,
    radius_hav: f64,
    limit: usize,
    statuses: StatusSet,
    /// Only drivers whose id starts with this (a tenant's namespace).
    prefix: Option<&'a str>,
    heap: BinaryHeap<Candidate>,
}

/// Rings visited before switching to the block descent (13 × 13 cells, about 2.8 km across).
const RING_PHASE: i32 = 6;

/// A block waiting in the descent queue, nearest lower bound first.
struct Pending {
    lb: f64,
    block: Block,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.lb == other.lb
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        other.lb.total_cmp(&self.lb) // reversed: BinaryHeap pops the smallest bound first
    }
}

impl<'a> Search<'a> {
    fn new(q: &NearbyQuery, shards: &'a [RwLockReadGuard<'a, Shard>], fresh: Freshness) -> Self {
        let lat = q.lat_e6 as f64 * RAD_PER_E6;
        Search {
            shards,
            fresh,
            lat,
            lon: q.lon_e6 as f64 * RAD_PER_E6,
            cos_lat: lat.cos(),
            lat_e6: q.lat_e6,
            lon_e6: q.lon_e6,
            radius_hav: meters_to_hav(q.radius_m),
            limit: q.limit.max(1),
            statuses: q.statuses,
            prefix: None,
            heap: BinaryHeap::with_capacity(q.limit.max(1) + 1),
        }
    }

    fn bound(&self) -> f64 {
        match self.heap.peek() {
            Some(top) if self.heap.len() >= self.limit => top.hav.min(self.radius_hav),
            _ => self.radius_hav,
        }
    }

    fn run(&mut self) {
        let center = Cell::of(self.lat_e6, self.lon_e6);
        for k in 0..=RING_PHASE {
            let mut ring_min = f64::INFINITY;
            Grid::for_each_on_ring(center, k, |cell| {
                let lb = cell.bounds().min_hav(self.lat, self.lon, self.cos_lat);
                ring_min = ring_min.min(lb);
                if lb <= self.bound() {
                    for shard in 0..self.shards.len() {
                        self.scan_cell(shard, cell.key());
                    }
                }
            });
            if ring_min > self.bound() {
                return;
            }
        }
        self.descend(center, RING_PHASE);
    }

    /// Best-first through the occupied blocks, scanning cells farther than `done` rings from `center`.
    fn descend(&mut self, center: Cell, done: i32) {
        let top = BLOCK_LEVELS as usize - 1;
        let mut roots: Vec<u64> = self
            .shards
            .iter()
            .flat_map(|s| s.blocks[top].keys().copied())
            .collect();
        roots.sort_unstable();
        roots.dedup();
        let mut queue = BinaryHeap::new();
        for key in roots {
            self.enqueue(&mut queue, Block::from_key(BLOCK_LEVELS, key));
        }
        while let Some(Pending { lb, block }) = queue.pop() {
            if lb > self.bound() {
                return;
            }
            if block.level == 0 {
                if center.ring_distance(block.cell()) > done {
                    for shard in 0..self.shards.len() {
                        self.scan_cell(shard, block.key());
                    }
                }
                continue;
            }
            let level = block.level as usize - 1;
            let mut children = self
                .shards
                .iter()
                .filter_map(|s| s.blocks[level].get(&block.key()))
                .fold(0u64, |acc, m| acc | m);
            while children != 0 {
                let bit = children.trailing_zeros();
                children &= children - 1;
                self.enqueue(&mut queue, block.child(bit));
            }
        }
    }

    fn enqueue(&self, queue: &mut BinaryHeap<Pending>, block: Block) {
        let lb = block.bounds().min_hav(self.lat, self.lon, self.cos_lat);
        if lb <= self.bound() {
            queue.push(Pending { lb, block });
        }
    }

    fn scan_cell(&mut self, shard: usize, key: u64) {
        let guard = &self.shards[shard];
        let Some(entries) = guard.cells.get(&key) else {
            return;
        };
        let mut bound = self.bound();
        for e in entries {
            if !self.statuses.contains(e.status()) {
                continue;
            }
            let s_lat = ((e.lat_e6 - self.lat_e6) as f64 * RAD_PER_E6 * 0.5).sin();
            let a = s_lat * s_lat;
            if a > bound {
                continue;
            }
            let lat = e.lat_e6 as f64 * RAD_PER_E6;
            let s_lon = ((e.lon_e6 as f64 * RAD_PER_E6 - self.lon) * 0.5).sin();
            let hav = (a + self.cos_lat * lat.cos() * s_lon * s_lon).min(1.0);
            let full = self.heap.len() >= self.limit;
            if hav > bound || (full && hav >= bound) {
                continue;
            }
            let record = guard.record(e.slot());
            if !self.fresh.is_live(record.seen)
                || self.prefix.is_some_and(|p| !record.id.starts_with(p))
            {
                continue;
            }
            if full {
                self.heap.pop();
            }
            self.heap.push(Candidate {
                hav,
                shard: shard as u8,
                slot: e.slot(),
            });
            bound = self.bound();
        }
    }

    fn into_hits(self) -> Vec<NearbyHit> {
        let shards = self.shards;
        let mut hits: Vec<NearbyHit> = self
            .heap
            .into_sorted_vec()
            .into_iter()
            .map(|c| {
                let rec = shards[c.shard as usize].record(c.slot);
                NearbyHit {
                    driver_id: rec.id.clone(),
                    lat_e6: rec.lat_e6,
                    lon_e6: rec.lon_e6,
                    distance_m: hav_to_meters(c.hav),
                    status: Status::from_index(rec.status),
                    timestamp: rec.timestamp,
                }
            })
            .collect();
        // Equal distances: a stable order by id, so repeated queries answer the same.
        hits.sort_by(|a, b| {
            a.distance_m
                .total_cmp(&b.distance_m)
                .then_with(|| a.driver_id.cmp(&b.driver_id))
        });
        hits
    }
}

#[cfg(test)]
mod tests;
