//! Durability in embedded mode: the write-ahead log, the history store fed from it, live-index
//! snapshots, and the recovery that ties them together at start-up.
//!
//! Data directory layout:
//! ```text
//! data/wal/        log segments (src/wal): every accepted position, fsynced before the 202
//! data/snapshots/  live-index snapshots (src/live/snapshot.rs)
//! data/history/    the history store (src/history), fed from the log
//! ```
//! One position takes one path: the tracker applies it to the live index, appends it to the log
//! (group commit) and answers. The *history follower* then reads the log behind the writers and
//! appends to history, persisting a checkpoint (the LSN history holds everything up to). Snapshots
//! record the LSN they cover. A log segment is deleted once both the older kept snapshot and the
//! history checkpoint are past it, so disk use is bounded without a manual compaction command.
//!
//! Recovery: load the newest valid snapshot, then replay the log after min(snapshot LSN, history
//! checkpoint): records after the snapshot go to the live index (with their original receipt time, so
//! TTLs run on), records after the checkpoint go to history. Both are idempotent.

mod gauges;

pub use gauges::DurabilityGauges;

use crate::domain::{now_micros, Micros};
use crate::history::{History, TrackPage, TrackQuery};
use crate::live::{snapshot, MemoryIndex};
use crate::wal::{Batch, FsyncPolicy, Lsn, Wal};
use anyhow::Context;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Snapshots kept on disk: the newest, and one older in case the newest turns out corrupt.
const SNAPSHOTS_KEPT: usize = 2;
/// How often the history follower looks for new log records (and so persists history at most).
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// How long history keeps what.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub hot: Duration,
    pub cold: Duration,
    pub cold_simplify_m: f64,
}

/// The durable half of the embedded store.
pub struct Durability {
    wal: Wal,
    history: Arc<History>,
    snapshots: PathBuf,
    /// One follow pass at a time (the periodic follower, track queries catching history up).
    following: Mutex<()>,
    /// The log position the follower has appended to history up to (ahead of history's durable
    /// checkpoint, which waits for open 30-second windows to be written). Written under
    /// `following`; read without it (metrics must not wait for a pass).
    followed: AtomicU64,
    /// Held for the life of the process: one server per data directory.
    _lock: File,
}

/// Takes an exclusive lock on `data_dir/LOCK`, so a second server on the same directory refuses to
/// start instead of "repairing" the log tail the first one is writing.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    let path = data_dir.join("LOCK");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another fleettracker process is using the data directory {}",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// What recovery found and did, for the start-up log line.
#[derive(Debug, Default)]
pub struct Recovered {
    pub snapshot_lsn: Option<Lsn>,
    pub snapshot_drivers: u64,
    pub replayed_records: u64,
    pub history_records: u64,
    pub took: Duration,
}

fn age_since(received_at: Micros, now: Micros) -> Duration {
    Duration::from_micros(now.saturating_sub(received_at).max(0) as u64)
}

impl Durability {
    /// Opens the log, history and snapshots under `data_dir` and recovers `index` from them.
    pub fn open(
        data_dir: &Path,
        policy: FsyncPolicy,
        index: &MemoryIndex,
    ) -> anyhow::Result<(Durability, Recovered)> {
        let started = Instant::now();
        let lock = lock_data_dir(data_dir)?;
        let wal =
            Wal::open(&data_dir.join("wal"), policy).context("opening the write-ahead log")?;
        let history =
            Arc::new(History::open(&data_dir.join("history")).context("opening history")?);
        let snapshots = data_dir.join("snapshots");
        let loaded = snapshot::load_latest(&snapshots, index).context("loading the snapshot")?;
        let snapshot_lsn = loaded.as_ref().map_or(0, |s| s.lsn);
        let checkpoint = history
            .checkpoint()
            .context("reading the history checkpoint")?;
        let covered = snapshot_lsn.max(checkpoint);
        if wal.end_lsn() < covered {
            // New records would get LSNs the snapshot or history claim to hold already, and a later
            // recovery would skip them: refuse rather than lose data silently.
            anyhow::bail!(
                "the write-ahead log in {} ends at LSN {} but the snapshot or history already cover up \
                 to {covered}: the log was removed or replaced. Restore it, or move the data directory \
                 aside to start empty.",
                data_dir.join("wal").display(),
                wal.end_lsn()
            );
        }
        let mut recovered = Recovered {
            snapshot_lsn: loaded.as_ref().map(|s| s.lsn),
            snapshot_drivers: loaded.as_ref().map_or(0, |s| s.drivers),
            ..Recovered::default()
        };
        let now_wall = now_micros();
        let now = Instant::now();
        let mut last = checkpoint;
        for record in wal
            .read_from(snapshot_lsn.min(checkpoint))
            .context("reading the log")?
        {
            let (lsn, batch) = record.context("replaying the log")?;
            if lsn > snapshot_lsn {
                let age = age_since(batch.received_at, now_wall);
                for p in &batch.positions {
                    index.restore(p, now, age);
                }
                recovered.replayed_records += 1;
            }
            if lsn > checkpoint {
                history
                    .append(&batch.positions)
                    .context("replaying into history")?;
                recovered.history_records += 1;
                last = lsn;
            }
        }
        if last > checkpoint {
            history
                .set_checkpoint(last)
                .context("saving the history checkpoint")?;
            history.persist().context("persisting history")?;
        }
        recovered.took = started.elapsed();
        Ok((
            Durability {
                wal,
                history,
                snapshots,
                following: Mutex::new(()),
                followed: AtomicU64::new(last),
                _lock: lock,
            },
            recovered,
        ))
    }

    /// Makes one request's positions durable (under the fsync policy).
    pub async fn append(&self, batch: &Batch) -> Result<Lsn, crate::wal::WalError> {
        self.wal.append(batch).await
    }

    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// Reads a track page (blocking I/O, run off the async workers). History is first brought up
    /// to the log's end, so a track shows every position acknowledged before the request.
    pub async fn track(self: &Arc<Self>, query: TrackQuery) -> anyhow::Result<TrackPage> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.follow(false)?;
            Ok(this.history.track(&query)?)
        })
        .await?
    }

    /// Appends log records not yet in history; returns how many. Then stores the checkpoint and
    /// persists history (which makes the checkpoint durable once the open windows are written).
    pub fn follow_once(&self) -> anyhow::Result<u64> {
        self.follow(true)
    }

    fn follow(&self, persist: bool) -> anyhow::Result<u64> {
        let _pass = self
            .following
            .lock()
            .map_err(|_| anyhow::anyhow!("follower poisoned"))?;
        let mut records = 0;
        let followed = self.followed.load(Ordering::Relaxed);
        let mut last = followed;
        for record in self.wal.read_from(followed)? {
            let (lsn, batch) = record?;
            self.history.append(&batch.positions)?;
            last = lsn;
            records += 1;
        }
        if records > 0 {
            self.history.set_checkpoint(last)?;
            self.followed.store(last, Ordering::Relaxed);
        }
        if persist {
            self.history.persist()?;
        }
        Ok(records)
    }

    /// Brings history fully up to date on disk (shutdown): no replay needed at the next start.
    pub fn flush_history(&self) -> anyhow::Result<()> {
        self.follow_once()?;
        self.history.flush()?;
        Ok(())
    }

    /// Writes a snapshot of `index`, prunes old ones, and deletes log segments nothing needs any more.
    pub fn snapshot(&self, index: &MemoryIndex) -> anyhow::Result<snapshot::SnapshotInfo> {
        // Read the LSN first: every record up to it was applied to the index before it was appended.
        let lsn = self.wal.end_lsn();
        let info = snapshot::write(&self.snapshots, index, lsn)?;
        snapshot::prune(&self.snapshots, SNAPSHOTS_KEPT)?;
        let oldest_kept = snapshot::oldest_lsn(&self.snapshots)?.unwrap_or(0);
        let needed = oldest_kept.min(self.history.checkpoint()?);
        let removed = self.wal.remove_segments_before(needed)?;
        if removed > 0 {
            tracing::debug!(
                removed,
                "removed log segments covered by snapshots and history"
            );
        }
        Ok(info)
    }

    pub fn apply_retention(&self, retention: Retention) -> anyhow::Result<()> {
        let report = self.history.apply_retention(
            now_micros(),
            retention.hot,
            retention.cold,
            retention.cold_simplify_m,
        )?;
        tracing::debug!(?report, "history retention applied");
        Ok(())
    }

    /// Flushes the log and history (graceful shutdown).
    pub async fn close(&self) -> anyhow::Result<()> {
        self.wal.close().await?;
        Ok(())
    }

    pub fn disk_bytes(&self) -> u64 {
        self.wal.disk_bytes() + self.history.disk_bytes()
    }

    /// Bytes of acknowledged log records the follower has not yet appended to history.
    pub fn history_lag_bytes(&self) -> u64 {
        let followed = self.followed.load(Ordering::Relaxed);
        self.wal.end_lsn().saturating_sub(followed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Position, Status};

    #[tokio::test]
    async fn history_lag_is_what_the_follower_has_not_appended_yet() {
        let dir = tempfile::tempdir().unwrap();
        let index = MemoryIndex::new(Duration::from_secs(60));
        let (durability, _) = Durability::open(dir.path(), FsyncPolicy::Always, &index).unwrap();
        assert_eq!(durability.history_lag_bytes(), 0);
        let position = Position {
            driver_id: "lag".into(),
            lat_e6: 52_500_000,
            lon_e6: 13_400_000,
            status: Status::Online,
            timestamp: now_micros(),
            speed_mps: None,
            heading_deg: None,
            accuracy_m: None,
        };
        let batch = Batch {
            received_at: now_micros(),
            positions: vec![position],
        };
        let end = durability.append(&batch).await.unwrap();
        assert_eq!(
            durability.history_lag_bytes(),
            end,
            "the whole record is behind"
        );
        assert_eq!(durability.follow_once().unwrap(), 1);
        assert_eq!(durability.history_lag_bytes(), 0, "caught up");
        durability.close().await.unwrap();
    }
}
