//! Retention: hot days become simplified cold days, cold days expire. Whole days only, so the work
//! is one pass over a day that is written once and a keyspace dropped, never deletes point by point.
//!
//! A compaction writes the cold keyspace beside the hot one, then, under the writer lock, checks the
//! hot day did not change meanwhile (a late point, an open window of a driver silent for a month)
//! and swaps: a marker in `meta` says the cold day is complete, the hot keyspace is dropped. A crash
//! before the marker leaves a partial cold keyspace that `History::open` drops; after it, a hot one
//! that `open` drops. A day that changed is left hot and tried again on the next run.

use super::chunk::{self, ChunkWriter};
use super::key::{chunk_key, day_end, keyspace_name, parse_chunk_key, window_of, Tier};
use super::store::{cold_marker, commit, Day, History};
use super::{HistoryError, TrackPoint};
use crate::domain::Micros;
use crate::geo::simplify_indices;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// What one retention run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Hot days replaced by their simplified tracks.
    pub days_compacted: usize,
    /// Days dropped for being older than the cold retention.
    pub days_deleted: usize,
    /// Days that changed while being compacted; tried again on the next run.
    pub days_deferred: usize,
    /// Points in the compacted days before and after simplification.
    pub points_before: u64,
    pub points_after: u64,
}

/// Chunks written per batch while compacting a day.
const COMPACTION_BATCH: usize = 1024;

impl History {
    /// Compacts every hot day that ended more than `hot` before `now` to its simplified tracks
    /// (tolerance `cold_simplify_m` metres), and drops every day that ended more than `cold` before
    /// `now`. Running it again with the same arguments changes nothing.
    pub fn apply_retention(
        &self,
        now: Micros,
        hot: Duration,
        cold: Duration,
        cold_simplify_m: f64,
    ) -> Result<RetentionReport, HistoryError> {
        let hot_cutoff = now.saturating_sub(to_micros(hot));
        let cold_cutoff = now.saturating_sub(to_micros(cold));
        let days: Vec<Arc<Day>> = self.days.read().values().cloned().collect();
        let mut report = RetentionReport::default();
        for day in days {
            if day_end(day.day) < cold_cutoff {
                self.delete_day(&day)?;
                report.days_deleted += 1;
            } else if day.tier == Tier::Hot && day_end(day.day) < hot_cutoff {
                match self.compact_day(&day, cold_simplify_m)? {
                    Some((before, after)) => {
                        report.days_compacted += 1;
                        report.points_before += before;
                        report.points_after += after;
                    }
                    None => report.days_deferred += 1,
                }
            }
        }
        Ok(report)
    }

    fn delete_day(&self, day: &Day) -> Result<(), HistoryError> {
        let mut writer = self.writer.lock();
        writer.open.retain(|_, open| open.day != day.day);
        self.days.write().remove(&day.day);
        drop(writer);
        self.db.delete_keyspace(day.keyspace.clone())?;
        self.meta.remove(window_key(day))?;
        self.meta.remove(cold_marker(day.day))?;
        Ok(())
    }

    /// Writes the day's simplified tracks into its cold keyspace and swaps it in; `None` when the
    /// hot day changed meanwhile. Returns the points before and after.
    fn compact_day(
        &self,
        hot: &Arc<Day>,
        tolerance_m: f64,
    ) -> Result<Option<(u64, u64)>, HistoryError> {
        let writes_before = hot.writes.load(Ordering::Acquire);
        if self.db.keyspace_exists(&keyspace_name(Tier::Cold, hot.day)) {
            self.drop_keyspace(Tier::Cold, hot.day)?;
        }
        let cold = self.open_day(Tier::Cold, hot.day)?;
        let counts = self.simplify_day(hot, &cold, tolerance_m)?;
        let writer = self.writer.lock();
        let still_open = writer.open.values().any(|open| open.day == hot.day);
        if still_open || hot.writes.load(Ordering::Acquire) != writes_before {
            drop(writer);
            self.drop_keyspace(Tier::Cold, hot.day)?;
            return Ok(None);
        }
        let mut marker = self.db.batch();
        marker.insert(&self.meta, cold_marker(hot.day), [1u8]);
        commit(marker)?;
        self.days.write().insert(hot.day, cold);
        drop(writer);
        self.db.delete_keyspace(hot.keyspace.clone())?;
        self.meta.remove(window_key(hot))?;
        Ok(Some(counts))
    }

    /// Reads the hot day driver by driver and writes each driver's simplified day into `cold`.
    fn simplify_day(
        &self,
        hot: &Day,
        cold: &Day,
        tolerance_m: f64,
    ) -> Result<(u64, u64), HistoryError> {
        let mut batch = self.db.batch();
        let mut driver: Vec<u8> = Vec::new();
        let mut points: Vec<TrackPoint> = Vec::new();
        let (mut before, mut after) = (0u64, 0u64);
        for entry in hot.keyspace.iter() {
            let (key, value) = entry.into_inner()?;
            let (id, window_start) =
                parse_chunk_key(&key).ok_or(HistoryError::Corrupt("chunk key"))?;
            if id.as_bytes() != driver.as_slice() {
                after += write_simplified(&mut batch, cold, &driver, &points, tolerance_m)?;
                before += points.len() as u64;
                points.clear();
                driver = id.as_bytes().to_vec();
            }
            chunk::decode_into(&value, window_start, &mut points)?;
            if batch.len() >= COMPACTION_BATCH {
                commit(std::mem::replace(&mut batch, self.db.batch()))?;
            }
        }
        after += write_simplified(&mut batch, cold, &driver, &points, tolerance_m)?;
        before += points.len() as u64;
        commit(batch)?;
        Ok((before, after))
    }
}

/// Adds one driver's simplified day to `batch`, one chunk per cold window; returns points kept.
fn write_simplified(
    batch: &mut fjall::OwnedWriteBatch,
    cold: &Day,
    driver: &[u8],
    points: &[TrackPoint],
    tolerance_m: f64,
) -> Result<u64, HistoryError> {
    if points.is_empty() {
        return Ok(0);
    }
    let driver = std::str::from_utf8(driver).map_err(|_| HistoryError::Corrupt("driver id"))?;
    let coords: Vec<(i32, i32)> = points.iter().map(|p| (p.lat_e6, p.lon_e6)).collect();
    let kept: Vec<TrackPoint> = simplify_indices(&coords, tolerance_m)
        .into_iter()
        .map(|i| points[i])
        .collect();
    for window in kept
        .chunk_by(|a, b| window_of(a.timestamp, cold.window) == window_of(b.timestamp, cold.window))
    {
        let start = window_of(window[0].timestamp, cold.window);
        let chunk = ChunkWriter::from_points(start, window);
        batch.insert(&cold.keyspace, chunk_key(driver, start), chunk.into_bytes());
    }
    cold.writes.fetch_add(1, Ordering::Relaxed);
    Ok(kept.len() as u64)
}

fn window_key(day: &Day) -> Vec<u8> {
    super::store::window_key(&keyspace_name(day.tier, day.day))
}

fn to_micros(duration: Duration) -> Micros {
    Micros::try_from(duration.as_micros()).unwrap_or(Micros::MAX)
}
