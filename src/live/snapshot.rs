//! Snapshots of the live index, so a restart loads one file instead of replaying the whole log.
//!
//! A snapshot holds every live driver's latest position and how long ago it was received, and the
//! log position (LSN) it covers: start-up loads the newest valid snapshot, then replays the log after
//! that LSN. Replay is idempotent (the newer timestamp wins), so a snapshot may also contain updates
//! from after its LSN; it must never miss one from before. The tracker guarantees that by applying a
//! position to the index before appending it to the log and by reading the LSN before copying.
//!
//! File `snapshot-<lsn, 20 digits>.snap`, written to a temporary name, fsynced and renamed, so a crash
//! mid-write leaves the previous snapshot in place:
//! `magic "FTSNAP01" | lsn u64 | written_at i64 (µs) | records… | count u64 | crc32 u32` (little-endian;
//! the CRC covers everything before it). A record is `age_ms u32` followed by a position encoded with
//! [`crate::wal::codec`].

use super::MemoryIndex;
use crate::domain::{now_micros, Micros};
use crate::wal::codec::{decode_position, encode_position};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"FTSNAP01";
const TRAILER: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// What a snapshot covers.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    /// Every log record ending at or before this LSN is reflected in the snapshot.
    pub lsn: u64,
    pub drivers: u64,
    pub written_at: Micros,
}

fn file_name(lsn: u64) -> String {
    format!("snapshot-{lsn:020}.snap")
}

fn lsn_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("snapshot-")?
        .strip_suffix(".snap")?
        .parse()
        .ok()
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a snapshot of `index` covering the log up to `lsn`; returns what it wrote.
pub fn write(dir: &Path, index: &MemoryIndex, lsn: u64) -> Result<SnapshotInfo, SnapshotError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let written_at = now_micros();
    let mut buf = Vec::with_capacity(1 << 20);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.extend_from_slice(&written_at.to_le_bytes());
    let mut drivers = 0u64;
    index.for_each_live(Instant::now(), |p, age| {
        let age_ms = age.as_millis().min(u32::MAX as u128) as u32;
        buf.extend_from_slice(&age_ms.to_le_bytes());
        encode_position(p, &mut buf);
        drivers += 1;
    });
    buf.extend_from_slice(&drivers.to_le_bytes());
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());

    let path = dir.join(file_name(lsn));
    let tmp = dir.join(format!("{}.tmp", file_name(lsn)));
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(&buf).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(SnapshotInfo {
        path,
        lsn,
        drivers,
        written_at,
    })
}

/// Snapshot files in `dir`, newest (highest LSN) first.
fn list(dir: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| lsn_of(p).is_some())
        .collect();
    paths.sort_by_key(|p| std::cmp::Reverse(lsn_of(p)));
    Ok(paths)
}

/// Loads the newest valid snapshot into `index`. A corrupt one is reported and the next older one
/// tried (the log still holds what it covered, as segments are only removed once a newer snapshot
/// exists). `None` when there is no snapshot at all.
pub fn load_latest(dir: &Path, index: &MemoryIndex) -> Result<Option<SnapshotInfo>, SnapshotError> {
    for path in list(dir)? {
        match load(&path, index) {
            Ok(info) => return Ok(Some(info)),
            Err(e @ SnapshotError::Corrupt { .. }) => {
                tracing::warn!(error = %e, "skipping corrupt snapshot; trying an older one")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

fn load(path: &Path, index: &MemoryIndex) -> Result<SnapshotInfo, SnapshotError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let corrupt = |reason: &str| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < MAGIC.len() + 16 + TRAILER || &bytes[..8] != MAGIC {
        return Err(corrupt("not a snapshot (bad magic or too short)"));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_le_bytes(trailer.try_into().map_err(|_| corrupt("short trailer"))?);
    if crc32fast::hash(body) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let read_u64 = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
    let lsn = read_u64(8);
    let written_at = read_u64(16) as i64;
    let count = read_u64(body.len() - 8);
    let mut records = &body[24..body.len() - 8];
    // Ages count from when the snapshot was written; the downtime since then adds to them.
    let downtime = Duration::from_micros(now_micros().saturating_sub(written_at).max(0) as u64);
    let now = Instant::now();
    let mut drivers = 0u64;
    while !records.is_empty() {
        let (age_bytes, rest) = records
            .split_at_checked(4)
            .ok_or_else(|| corrupt("truncated record"))?;
        let age_ms = u32::from_le_bytes(age_bytes.try_into().unwrap_or([0; 4]));
        let (position, rest) = decode_position(rest).map_err(|e| corrupt(&e.to_string()))?;
        index.restore(
            &position,
            now,
            Duration::from_millis(age_ms as u64) + downtime,
        );
        drivers += 1;
        records = rest;
    }
    if drivers != count {
        return Err(corrupt("record count mismatch"));
    }
    Ok(SnapshotInfo {
        path: path.to_path_buf(),
        lsn,
        drivers,
        written_at,
    })
}

/// The LSN of the oldest snapshot on disk: the log must be kept from there on, in case every newer
/// snapshot turns out corrupt.
pub fn oldest_lsn(dir: &Path) -> Result<Option<u64>, SnapshotError> {
    Ok(list(dir)?.last().and_then(|p| lsn_of(p)))
}

/// Deletes snapshots older than the newest `keep` ones; returns how many.
pub fn prune(dir: &Path, keep: usize) -> Result<usize, SnapshotError> {
    let mut removed = 0;
    for path in list(dir)?.into_iter().skip(keep) {
        fs::remove_file(&path).map_err(io_err(&path))?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Position, Status};

    fn pos(id: &str, lat_e6: i32) -> Position {
        Position {
            driver_id: id.into(),
            lat_e6,
            lon_e6: 2,
            status: Status::Busy,
            timestamp: 42,
            speed_mps: Some(3.5),
            heading_deg: None,
            accuracy_m: Some(1.0),
        }
    }

    #[test]
    fn round_trip_keeps_positions_and_ages() {
        let dir = tempfile::tempdir().unwrap();
        let index = MemoryIndex::new(Duration::from_secs(60));
        let now = Instant::now();
        index.upsert(&pos("a", 1), now);
        index.restore(&pos("b", 2), now, Duration::from_secs(30));
        let info = write(dir.path(), &index, 777).unwrap();
        assert_eq!((info.lsn, info.drivers), (777, 2));

        let restored = MemoryIndex::new(Duration::from_secs(60));
        let loaded = load_latest(dir.path(), &restored).unwrap().unwrap();
        assert_eq!((loaded.lsn, loaded.drivers), (777, 2));
        assert_eq!(restored.get("a", Instant::now()), Some(pos("a", 1)));
        assert_eq!(restored.get("b", Instant::now()), Some(pos("b", 2)));
        // "b" was received 30 s before the snapshot: it expires 30 s early.
        assert!(restored
            .get("b", Instant::now() + Duration::from_secs(31))
            .is_none());
        assert!(restored
            .get("a", Instant::now() + Duration::from_secs(31))
            .is_some());
    }

    #[test]
    fn corrupt_newest_falls_back_to_older() {
        let dir = tempfile::tempdir().unwrap();
        let index = MemoryIndex::new(Duration::from_secs(60));
        index.upsert(&pos("a", 1), Instant::now());
        write(dir.path(), &index, 10).unwrap();
        index.upsert(&pos("a", 5), Instant::now());
        let newest = write(dir.path(), &index, 20).unwrap();
        let mut bytes = fs::read(&newest.path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        fs::write(&newest.path, bytes).unwrap();

        let restored = MemoryIndex::new(Duration::from_secs(60));
        let loaded = load_latest(dir.path(), &restored).unwrap().unwrap();
        assert_eq!(loaded.lsn, 10);
        assert_eq!(restored.get("a", Instant::now()).unwrap().lat_e6, 1);
    }

    #[test]
    fn no_snapshot_is_none_and_prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let index = MemoryIndex::new(Duration::from_secs(60));
        assert_eq!(load_latest(dir.path(), &index).unwrap(), None);
        for lsn in [1, 2, 3] {
            write(dir.path(), &index, lsn).unwrap();
        }
        assert_eq!(prune(dir.path(), 2).unwrap(), 1);
        let left: Vec<u64> = list(dir.path())
            .unwrap()
            .iter()
            .filter_map(|p| lsn_of(p))
            .collect();
        assert_eq!(left, [3, 2]);
    }
}
