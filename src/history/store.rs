//! [`History`]: the day keyspaces, the open windows, appends, track queries and the checkpoint.

use super::chunk::{self, ChunkWriter};
use super::key::{
    chunk_key, day_end, day_of, day_start, decode_cursor, keyspace_name, parse_chunk_key,
    parse_keyspace_name, window_of, Tier,
};
use super::{HistoryError, TrackPage, TrackPoint, TrackQuery, MAX_TRACK_LIMIT};
use crate::domain::{DriverId, Micros, Position};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode};
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Window of a chunk in a hot day: short enough that the open windows of a million drivers stay in
/// a few hundred MB, long enough that the key and LSM overhead of a chunk is shared by ~15 points.
pub(super) const HOT_WINDOW: Micros = 30 * 1_000_000;
/// Window of a chunk in a cold day: a simplified hour is a handful of points.
pub(super) const COLD_WINDOW: Micros = 3_600 * 1_000_000;

const META: &str = "meta";
const CHECKPOINT_KEY: &[u8] = b"checkpoint";

/// The position history store. `Send + Sync`; share it in an `Arc`.
pub struct History {
    pub(super) db: Database,
    pub(super) meta: Keyspace,
    pub(super) days: RwLock<BTreeMap<i64, Arc<Day>>>,
    pub(super) writer: Mutex<Writer>,
    checkpoint: AtomicU64,
}

/// One day's keyspace.
pub(super) struct Day {
    pub day: i64,
    pub tier: Tier,
    pub keyspace: Keyspace,
    /// Length of the chunk windows in this keyspace.
    pub window: Micros,
    /// Bumped by every write into the day, so retention can see a day change while it compacts.
    pub writes: AtomicU64,
}

/// Everything appends change; one at a time.
pub(super) struct Writer {
    /// Each driver's newest window, not yet written.
    pub open: HashMap<DriverId, OpenWindow>,
    /// Appends are stamped with this; `set_checkpoint` moves it on.
    epoch: u64,
    /// `(epoch, lsn)`: `lsn` covers every point appended at or before `epoch`.
    pending: VecDeque<(u64, u64)>,
    /// The newest timestamp appended: the clock that decides when an open window is over.
    newest: Micros,
}

pub(super) struct OpenWindow {
    pub day: i64,
    pub chunk: ChunkWriter,
    /// Epoch of the oldest point in `chunk`.
    first_epoch: u64,
}

/// Points bound for one stored chunk: merged into what is stored there, newest last.
#[derive(Default)]
pub(super) struct Spill {
    /// A whole window leaving memory (encoded; written as is when nothing is stored there yet).
    chunk: Option<ChunkWriter>,
    /// Single points, in arrival order.
    points: Vec<TrackPoint>,
}

type Spills = BTreeMap<(i64, Vec<u8>), Spill>;

impl History {
    /// Opens (or creates) the history in `dir`, finishing or undoing a retention step a crash
    /// interrupted.
    pub fn open(dir: &Path) -> Result<History, HistoryError> {
        let db = Database::builder(dir).manual_journal_persist(true).open()?;
        let meta = db.keyspace(META, || {
            KeyspaceCreateOptions::default().manual_journal_persist(true)
        })?;
        let checkpoint = read_u64(&meta, CHECKPOINT_KEY)?.unwrap_or(0);
        let history = History {
            db,
            meta,
            days: RwLock::new(BTreeMap::new()),
            writer: Mutex::new(Writer {
                open: HashMap::new(),
                epoch: 0,
                pending: VecDeque::new(),
                newest: Micros::MIN,
            }),
            checkpoint: AtomicU64::new(checkpoint),
        };
        history.load_days()?;
        Ok(history)
    }

    fn load_days(&self) -> Result<(), HistoryError> {
        let mut found: BTreeMap<i64, Vec<Tier>> = BTreeMap::new();
        for name in self.db.list_keyspace_names() {
            if let Some((tier, day)) = parse_keyspace_name(&name) {
                found.entry(day).or_default().push(tier);
            }
        }
        for (day, tiers) in found {
            let cold_done = self.meta.contains_key(cold_marker(day))?;
            let tier = match (tiers.contains(&Tier::Hot), cold_done) {
                (true, true) => {
                    self.drop_keyspace(Tier::Hot, day)?;
                    Tier::Cold
                }
                (true, false) => {
                    if tiers.contains(&Tier::Cold) {
                        self.drop_keyspace(Tier::Cold, day)?; // a compaction cut short
                    }
                    Tier::Hot
                }
                (false, _) => Tier::Cold,
            };
            let day_handle = self.open_day(tier, day)?;
            self.days.write().insert(day, day_handle);
        }
        Ok(())
    }

    /// Opens or creates the keyspace of `day` in `tier`, recording its window on creation.
    pub(super) fn open_day(&self, tier: Tier, day: i64) -> Result<Arc<Day>, HistoryError> {
        let name = keyspace_name(tier, day);
        let keyspace = self.db.keyspace(&name, day_options)?;
        let window_key = window_key(&name);
        let window = match read_u64(&self.meta, &window_key)? {
            Some(window) => window as Micros,
            None => {
                let window = match tier {
                    Tier::Hot => HOT_WINDOW,
                    Tier::Cold => COLD_WINDOW,
                };
                self.meta
                    .insert(window_key, (window as u64).to_le_bytes())?;
                window
            }
        };
        Ok(Arc::new(Day {
            day,
            tier,
            keyspace,
            window,
            writes: AtomicU64::new(0),
        }))
    }

    pub(super) fn drop_keyspace(&self, tier: Tier, day: i64) -> Result<(), HistoryError> {
        let name = keyspace_name(tier, day);
        let keyspace = self.db.keyspace(&name, day_options)?;
        self.db.delete_keyspace(keyspace)?;
        self.meta.remove(window_key(&name))?;
        Ok(())
    }

    /// The day's keyspace, created hot when the day has none.
    fn day_for_write(&self, day: i64) -> Result<Arc<Day>, HistoryError> {
        if let Some(found) = self.days.read().get(&day) {
            return Ok(found.clone());
        }
        let mut days = self.days.write();
        if let Some(found) = days.get(&day) {
            return Ok(found.clone());
        }
        let created = self.open_day(Tier::Hot, day)?;
        days.insert(day, created.clone());
        Ok(created)
    }

    /// Stores a batch of positions. Idempotent per (driver, timestamp): the later write wins.
    pub fn append(&self, positions: &[Position]) -> Result<(), HistoryError> {
        let mut writer = self.writer.lock();
        let mut spills = Spills::new();
        let mut last_day: Option<Arc<Day>> = None;
        for position in positions {
            let point = TrackPoint::from(position);
            let day_number = day_of(point.timestamp);
            let day = match last_day.take() {
                Some(day) if day.day == day_number => day,
                _ => self.day_for_write(day_number)?,
            };
            writer.add(&position.driver_id, point, &day, &mut spills)?;
            last_day = Some(day);
        }
        self.write_spills(spills, None)
    }

    /// Merges each spill into its stored chunk, in one atomic batch (with the checkpoint, if any).
    pub(super) fn write_spills(
        &self,
        spills: Spills,
        checkpoint: Option<u64>,
    ) -> Result<(), HistoryError> {
        let mut batch = self.db.batch();
        let days = self.days.read().clone();
        for ((day_number, key), spill) in spills {
            let Some(day) = days.get(&day_number) else {
                continue; // dropped by retention since
            };
            let value = merge_into_stored(day, &key, spill)?;
            batch.insert(&day.keyspace, key, value);
            day.writes.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(lsn) = checkpoint {
            batch.insert(&self.meta, CHECKPOINT_KEY, lsn.to_le_bytes());
        }
        commit(batch)
    }

    /// One page of a driver's track, in time order.
    pub fn track(&self, q: &TrackQuery) -> Result<TrackPage, HistoryError> {
        let limit = q.limit.clamp(1, MAX_TRACK_LIMIT);
        let from = match &q.cursor {
            Some(cursor) => decode_cursor(&q.driver_id, cursor)?.max(q.from),
            None => q.from,
        };
        if from > q.to {
            return Ok(TrackPage {
                points: Vec::new(),
                next_cursor: None,
            });
        }
        // The open window first: a window written out meanwhile is then read twice (and merged),
        // never missed.
        let open = self.open_points(&q.driver_id, from, q.to)?;
        let stored = self.stored_points(&q.driver_id, from, q.to, limit + 1)?;
        let points = chunk::merge(stored, &open);
        Ok(TrackPage::of_overfetched(&q.driver_id, points, limit))
    }

    /// Stored points of a driver in `from..=to`, in time order, stopping once past `enough`.
    fn stored_points(
        &self,
        driver_id: &str,
        from: Micros,
        to: Micros,
        enough: usize,
    ) -> Result<Vec<TrackPoint>, HistoryError> {
        let days: Vec<Arc<Day>> = self
            .days
            .read()
            .range(day_of(from)..=day_of(to))
            .map(|(_, day)| day.clone())
            .collect();
        let mut points = Vec::new();
        for day in days {
            let lo = from.max(day_start(day.day));
            let hi = to.min(day_end(day.day));
            let keys = chunk_key(driver_id, window_of(lo, day.window))
                ..=chunk_key(driver_id, window_of(hi, day.window));
            for entry in day.keyspace.range(keys) {
                let (key, value) = entry.into_inner()?;
                let (_, window_start) =
                    parse_chunk_key(&key).ok_or(HistoryError::Corrupt("chunk key"))?;
                let before = points.len();
                chunk::decode_into(&value, window_start, &mut points)?;
                retain_between(&mut points, before, lo, hi);
                if points.len() >= enough {
                    return Ok(points);
                }
            }
        }
        Ok(points)
    }

    /// Points of a driver's open window in `from..=to`.
    fn open_points(
        &self,
        driver_id: &str,
        from: Micros,
        to: Micros,
    ) -> Result<Vec<TrackPoint>, HistoryError> {
        let chunk = match self.writer.lock().open.get(driver_id) {
            Some(open) => open.chunk.clone(),
            None => return Ok(Vec::new()),
        };
        let mut points = chunk::decode(chunk.bytes(), chunk.window_start())?;
        retain_between(&mut points, 0, from, to);
        Ok(points)
    }

    /// Writes windows that are over, stores the newest checkpoint they complete, and fsyncs.
    pub fn persist(&self) -> Result<(), HistoryError> {
        self.write_out(|open, newest| open.chunk.window_start() + 2 * HOT_WINDOW <= newest)?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Writes every open window and the last checkpoint set, fsyncs, and flushes the memtables to
    /// tables (for shutdown, and before measuring the disk).
    pub fn flush(&self) -> Result<(), HistoryError> {
        self.write_out(|_, _| true)?;
        self.db.persist(PersistMode::SyncAll)?;
        let days: Vec<Arc<Day>> = self.days.read().values().cloned().collect();
        for day in days {
            day.keyspace.rotate_memtable_and_wait()?;
        }
        // The checkpoint lives in meta; until meta is flushed too, fjall keeps every journal.
        self.meta.rotate_memtable_and_wait()?;
        Ok(())
    }

    /// Writes the open windows `done` picks, with the newest checkpoint that is then complete.
    fn write_out(&self, done: impl Fn(&OpenWindow, Micros) -> bool) -> Result<(), HistoryError> {
        let mut writer = self.writer.lock();
        let newest = writer.newest;
        let mut spills = Spills::new();
        let mut oldest_open_epoch = u64::MAX;
        writer.open.retain(|driver_id, open| {
            if done(open, newest) {
                let key = chunk_key(driver_id, open.chunk.window_start());
                let chunk = std::mem::replace(&mut open.chunk, ChunkWriter::new(0));
                spills.entry((open.day, key)).or_default().chunk = Some(chunk);
                false
            } else {
                oldest_open_epoch = oldest_open_epoch.min(open.first_epoch);
                true
            }
        });
        let mut covered = None;
        while let Some(&(epoch, lsn)) = writer.pending.front() {
            if epoch >= oldest_open_epoch {
                break;
            }
            covered = Some(lsn);
            writer.pending.pop_front();
        }
        let checkpoint = covered.filter(|&lsn| lsn > self.checkpoint.load(Ordering::Acquire));
        self.write_spills(spills, checkpoint)?;
        if let Some(lsn) = checkpoint {
            self.checkpoint.store(lsn, Ordering::Release);
        }
        Ok(())
    }

    /// The WAL position history holds everything up to, as stored by the last [`History::persist`]
    /// or [`History::flush`] (durable once that returned).
    pub fn checkpoint(&self) -> Result<u64, HistoryError> {
        Ok(self.checkpoint.load(Ordering::Acquire))
    }

    /// Records that every position appended so far came from the WAL up to `lsn`. Stored by the
    /// next [`History::persist`] that finds all of them written (see the module docs).
    pub fn set_checkpoint(&self, lsn: u64) -> Result<(), HistoryError> {
        let mut writer = self.writer.lock();
        let epoch = writer.epoch;
        writer.pending.push_back((epoch, lsn));
        writer.epoch += 1;
        Ok(())
    }

    /// Bytes on disk: day keyspaces, meta and fjall's journal.
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or_else(|_| {
            let days = self.days.read();
            days.values().map(|day| day.keyspace.disk_space()).sum()
        })
    }

    /// Number of (driver, window) chunks held in memory.
    pub fn open_windows(&self) -> usize {
        self.writer.lock().open.len()
    }
}

impl Drop for History {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            tracing::error!(%error, "history: could not write the open windows on close");
        }
    }
}

impl Writer {
    /// Puts one point into its driver's open window, or into `spills` when it belongs elsewhere.
    fn add(
        &mut self,
        driver_id: &DriverId,
        point: TrackPoint,
        day: &Day,
        spills: &mut Spills,
    ) -> Result<(), HistoryError> {
        self.newest = self.newest.max(point.timestamp);
        let window = window_of(point.timestamp, day.window);
        if day.tier == Tier::Cold {
            spill_point(spills, day.day, driver_id, window, point);
            return Ok(());
        }
        let epoch = self.epoch;
        let Some(open) = self.open.get_mut(driver_id) else {
            let mut chunk = ChunkWriter::new(window);
            chunk.insert(&point)?;
            let open = OpenWindow {
                day: day.day,
                chunk,
                first_epoch: epoch,
            };
            self.open.insert(driver_id.clone(), open);
            return Ok(());
        };
        let open_window = open.chunk.window_start();
        if window == open_window {
            open.chunk.insert(&point)?;
        } else if window > open_window {
            let key = chunk_key(driver_id, open_window);
            let done = std::mem::replace(&mut open.chunk, ChunkWriter::new(window));
            spills.entry((open.day, key)).or_default().chunk = Some(done);
            open.day = day.day;
            open.first_epoch = epoch;
            open.chunk.insert(&point)?;
        } else {
            spill_point(spills, day.day, driver_id, window, point);
        }
        Ok(())
    }
}

fn spill_point(spills: &mut Spills, day: i64, driver_id: &str, window: Micros, point: TrackPoint) {
    let key = chunk_key(driver_id, window);
    spills.entry((day, key)).or_default().points.push(point);
}

/// The value to store for `key`: the spill merged over what is stored (the spill wins ties).
fn merge_into_stored(day: &Day, key: &[u8], spill: Spill) -> Result<Vec<u8>, HistoryError> {
    let window_start = parse_chunk_key(key)
        .map(|(_, start)| start)
        .ok_or(HistoryError::Corrupt("chunk key"))?;
    let stored = day.keyspace.get(key)?;
    if let (None, Some(chunk), true) = (&stored, &spill.chunk, spill.points.is_empty()) {
        return Ok(chunk.bytes().to_vec());
    }
    let mut points = match stored {
        Some(bytes) => chunk::decode(&bytes, window_start)?,
        None => Vec::new(),
    };
    if let Some(chunk) = spill.chunk {
        points = chunk::merge(points, &chunk::decode(chunk.bytes(), window_start)?);
    }
    let mut late = spill.points;
    chunk::sort_dedup(&mut late);
    points = chunk::merge(points, &late);
    Ok(ChunkWriter::from_points(window_start, &points).into_bytes())
}

/// Keeps, of `points[from_index..]`, those with a timestamp in `lo..=hi`.
fn retain_between(points: &mut Vec<TrackPoint>, from_index: usize, lo: Micros, hi: Micros) {
    let mut kept = from_index;
    for i in from_index..points.len() {
        if (lo..=hi).contains(&points[i].timestamp) {
            points[kept] = points[i];
            kept += 1;
        }
    }
    points.truncate(kept);
}

pub(super) fn commit(batch: OwnedWriteBatch) -> Result<(), HistoryError> {
    batch.durability(None).commit()?;
    Ok(())
}

/// Options of a day keyspace: LZ4 on every level (chunks are already dense, and the journal is
/// never synced per write; see the module docs).
pub(super) fn day_options() -> KeyspaceCreateOptions {
    use fjall::config::CompressionPolicy;
    KeyspaceCreateOptions::default()
        .manual_journal_persist(true)
        .data_block_compression_policy(CompressionPolicy::all(fjall::CompressionType::Lz4))
}

pub(super) fn cold_marker(day: i64) -> Vec<u8> {
    format!("cold-done.{}", keyspace_name(Tier::Cold, day)).into_bytes()
}

pub(super) fn window_key(keyspace: &str) -> Vec<u8> {
    format!("window.{keyspace}").into_bytes()
}

fn read_u64(keyspace: &Keyspace, key: &[u8]) -> Result<Option<u64>, HistoryError> {
    match keyspace.get(key)? {
        None => Ok(None),
        Some(bytes) => {
            let raw: [u8; 8] = bytes
                .as_ref()
                .try_into()
                .map_err(|_| HistoryError::Corrupt("meta value"))?;
            Ok(Some(u64::from_le_bytes(raw)))
        }
    }
}
