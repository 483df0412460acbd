//! The write-ahead log: every accepted position is on disk (or, under `--fsync interval:…`, in the
//! kernel) before the request is acknowledged, so a restart can rebuild what was acknowledged.
//!
//! - One record per request ([`Batch`]): the positions and their receipt time, in a compact binary
//!   encoding ([`codec`]), framed with a length and a CRC-32 ([`segment`] documents the bytes).
//! - Appends are committed in groups by one writer task ([`writer`]): concurrent appends share one
//!   disk commit, so durability costs little throughput. Under `FsyncPolicy::Always` a commit is
//!   one asynchronous direct write where the file system allows it ([`direct`]), else a `write`
//!   and an `fdatasync` on the fsync thread ([`syncer`]), which also serves `Interval`.
//! - The log is a directory of segments named by their first [`Lsn`]; a new one starts at a size
//!   limit, and [`Wal::remove_segments_before`] deletes those a snapshot and history have covered, so
//!   the log does not grow without bound.
//! - [`Wal::open`] checks every record. A torn tail (a crash mid-write) is truncated with a warning;
//!   damage anywhere else, or damage at the tail that later records prove had been synced, is an
//!   error naming the file and offset, since going on would silently lose acknowledged positions.
//!
//! Sharing one fsync is the whole point of the design: an fsync of a small append costs about as much
//! as handling tens of requests, so one per request would cap throughput at the disk's fsync rate.

pub mod codec;
mod direct;
mod reader;
mod segment;
mod syncer;
mod writer;

#[cfg(test)]
mod tests;

pub use reader::WalReader;

use crate::domain::{Micros, Position};
use parking_lot::Mutex;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use syncer::Syncer;
use tokio::sync::Notify;
use writer::{Active, Stage};

/// Log sequence number: the byte offset just past a record in the log's record stream (segment
/// headers excluded). Increases with every record; 0 is the empty log.
pub type Lsn = u64;

/// Segments start anew past this size (a segment can only be deleted whole).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// When an acknowledged append is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Acknowledged means fsynced (one fsync shared by every append of a group).
    #[default]
    Always,
    /// Acknowledged once written to the kernel; fsynced at least this often, so a power loss loses
    /// at most this window (a process crash loses nothing).
    Interval(Duration),
}

/// Why an `--fsync` value could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseFsyncPolicyError(String);

impl FromStr for FsyncPolicy {
    type Err = ParseFsyncPolicyError;

    fn from_str(text: &str) -> Result<FsyncPolicy, ParseFsyncPolicyError> {
        if text == "always" {
            return Ok(FsyncPolicy::Always);
        }
        let Some(interval) = text.strip_prefix("interval:") else {
            return Err(ParseFsyncPolicyError(format!(
                "invalid fsync policy {text:?}: expected \"always\" or \"interval:<duration>\" \
                 (e.g. interval:100ms)"
            )));
        };
        let every = humantime::parse_duration(interval).map_err(|e| {
            ParseFsyncPolicyError(format!(
                "invalid fsync interval {interval:?}: {e} (e.g. interval:100ms)"
            ))
        })?;
        if every.is_zero() {
            return Err(ParseFsyncPolicyError(
                "fsync interval must be above zero (use \"always\" to fsync every write)".into(),
            ));
        }
        Ok(FsyncPolicy::Interval(every))
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval(every) => {
                write!(f, "interval:{}", humantime::format_duration(*every))
            }
        }
    }
}

/// One request's accepted positions, with the wall-clock time the server received them.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub received_at: Micros,
    pub positions: Vec<Position>,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("write-ahead log {} is corrupt at offset {offset}: {detail}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error(
        "write-ahead log: records after LSN {after} were asked for, but the log now starts at \
         LSN {first} (older segments were removed)"
    )]
    Removed { after: Lsn, first: Lsn },
    #[error("write-ahead log: a batch of {bytes} bytes exceeds the record limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    #[error("write-ahead log is broken ({0}); it takes no more writes until a restart")]
    Broken(String),
    #[error("write-ahead log is closed")]
    Closed,
}

/// State the handles, the writer task and the fsync thread share.
struct Shared {
    dir: PathBuf,
    policy: FsyncPolicy,
    segment_bytes: u64,
    /// Start LSNs of the segments on disk, ascending; the last is the active one.
    segments: Mutex<Vec<Lsn>>,
    /// End of the last acknowledged record.
    acked: AtomicU64,
    /// End of what the last fsync covered.
    synced: AtomicU64,
    disk_bytes: AtomicU64,
    fsyncs: AtomicU64,
    /// Until when the writer keeps its disk calls off the request worker (see [`writer`]).
    off_worker_until: Mutex<Option<std::time::Instant>>,
    /// Appends waiting for the writer, and the log's life cycle.
    stage: Mutex<Stage>,
    /// Wakes the writer task when a group starts or a close is asked for.
    wake: Notify,
    /// The segment being appended to (the writer's).
    active: Mutex<Active>,
    syncer: Syncer,
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
    /// Commits take the write-then-fsync path even where direct I/O works (tests of that path).
    #[cfg(test)]
    buffered_only: std::sync::atomic::AtomicBool,
    /// The writer commits with direct writes.
    #[cfg(test)]
    direct_used: std::sync::atomic::AtomicBool,
    /// Every inline write and direct submit counts as slow (tests of the offload).
    #[cfg(test)]
    writes_are_slow: std::sync::atomic::AtomicBool,
    /// Writes go back to the worker right after a slow one (tests of the offload).
    #[cfg(test)]
    offload_briefly: std::sync::atomic::AtomicBool,
    /// Groups written on the blocking pool.
    #[cfg(test)]
    pool_writes: AtomicU64,
    /// Direct writes submitted off the request worker.
    #[cfg(test)]
    off_worker_submits: AtomicU64,
    /// Direct writes whose completion the writer polled for.
    #[cfg(test)]
    polled_commits: AtomicU64,
}

impl Shared {
    /// How long an inline write may take before writes move to the blocking pool.
    fn slow_write(&self) -> Duration {
        #[cfg(test)]
        if self.writes_are_slow.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        writer::SLOW_WRITE
    }

    /// For how long writes stay on the blocking pool after a slow one.
    fn offload_for(&self) -> Duration {
        #[cfg(test)]
        if self.offload_briefly.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        writer::OFFLOAD_FOR
    }

    /// Whether commits may be direct writes (see [`writer`]).
    fn direct_allowed(&self) -> bool {
        #[cfg(test)]
        if self.buffered_only.load(Ordering::Relaxed) {
            return false;
        }
        true
    }

    /// The failure a test asked the next commit to have, if any.
    #[cfg(test)]
    fn fail_injected(&self, path: &Path) -> Result<(), WalError> {
        if self.fail_next_sync.swap(false, Ordering::Relaxed) {
            let injected = std::io::Error::other("injected fsync failure");
            return Err(segment::io_err("fsync", path)(injected));
        }
        Ok(())
    }

    /// `fdatasync`s a segment of this log, counting it.
    fn sync_file(&self, file: &File, path: &Path) -> Result<(), WalError> {
        #[cfg(test)]
        self.fail_injected(path)?;
        file.sync_data().map_err(segment::io_err("fsync", path))?;
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A handle to the log; clones share one writer. When the last handle is dropped without
/// [`Wal::close`], what was written is still fsynced and the writer stops.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        writer::release(&self.shared);
    }
}

impl Wal {
    /// Opens (creating if needed) the log in `dir` with segments of [`DEFAULT_SEGMENT_BYTES`]; see
    /// [`Wal::open_with`].
    pub fn open(dir: &Path, policy: FsyncPolicy) -> Result<Wal, WalError> {
        Wal::open_with(dir, policy, DEFAULT_SEGMENT_BYTES)
    }

    /// Opens (creating if needed) the log in `dir`, validates every segment, truncates a torn tail
    /// of the last one (with a warning naming file, offset and bytes dropped), and errors on
    /// corruption elsewhere. A new segment starts once the active one would pass `segment_bytes`.
    pub fn open_with(dir: &Path, policy: FsyncPolicy, segment_bytes: u64) -> Result<Wal, WalError> {
        let recovered = segment::recover(dir)?;
        let active = recovered.segments.last().copied().unwrap_or(0);
        let path = segment::path(dir, active);
        let (file, len) = segment::open_write(&path)?;
        let for_syncer = file.try_clone().map_err(segment::io_err("dup", &path))?;
        let syncer = Syncer::start(policy, for_syncer, path.clone(), recovered.end)
            .map_err(segment::io_err("start the fsync thread for", dir))?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            policy,
            segment_bytes,
            segments: Mutex::new(recovered.segments),
            acked: AtomicU64::new(recovered.end),
            synced: AtomicU64::new(recovered.end),
            disk_bytes: AtomicU64::new(recovered.disk_bytes),
            fsyncs: AtomicU64::new(0),
            off_worker_until: Mutex::new(None),
            stage: Mutex::new(Stage::new(recovered.end, active)),
            wake: Notify::new(),
            active: Mutex::new(Active {
                file,
                path,
                offset: segment::HEADER_LEN + (recovered.end - active),
                len,
                limit: segment::HEADER_LEN + segment_bytes,
            }),
            syncer,
            #[cfg(test)]
            fail_next_sync: Default::default(),
            #[cfg(test)]
            buffered_only: Default::default(),
            #[cfg(test)]
            direct_used: Default::default(),
            #[cfg(test)]
            writes_are_slow: Default::default(),
            #[cfg(test)]
            offload_briefly: Default::default(),
            #[cfg(test)]
            pool_writes: Default::default(),
            #[cfg(test)]
            off_worker_submits: Default::default(),
            #[cfg(test)]
            polled_commits: Default::default(),
        });
        shared.syncer.attach(Arc::downgrade(&shared));
        Ok(Wal {
            inner: Arc::new(Inner { shared }),
        })
    }

    /// Appends one batch; resolves once it is durable under the policy (`Always`: after the group's
    /// fsync; `Interval`: once written to the file). Returns the LSN just past the record.
    pub async fn append(&self, batch: &Batch) -> Result<Lsn, WalError> {
        let len = codec::batch_len(batch);
        let limit = segment::max_body_len();
        if len > limit {
            return Err(WalError::TooLarge { bytes: len, limit });
        }
        let mut body = Vec::with_capacity(len);
        codec::encode_batch(batch, &mut body);
        let answer = writer::append(&self.inner.shared, &body)?;
        answer.await.map_err(|_| self.stopped())?
    }

    /// Every acknowledged record with an end LSN above `after`, in order, decoded; synchronous
    /// (start-up replay, followers on a blocking thread). Records acknowledged after this call are
    /// not included. Errors with [`WalError::Removed`] if `after` precedes the oldest segment kept.
    /// Do not remove segments this reader still has to read.
    pub fn read_from(&self, after: Lsn) -> Result<WalReader, WalError> {
        let shared = &self.inner.shared;
        // The end first: every segment holding records up to it is then in the list.
        let limit = shared.acked.load(Ordering::Acquire);
        let segments = shared.segments.lock().clone();
        WalReader::new(shared.dir.clone(), segments, after, limit)
    }

    /// The LSN just past the last acknowledged record.
    pub fn end_lsn(&self) -> Lsn {
        self.inner.shared.acked.load(Ordering::Acquire)
    }

    /// The LSN the oldest segment kept starts at: `read_from` accepts any `after` from here on.
    pub fn start_lsn(&self) -> Lsn {
        self.inner
            .shared
            .segments
            .lock()
            .first()
            .copied()
            .unwrap_or(0)
    }

    /// Deletes whole segments whose records all end at or before `lsn` (never the active segment);
    /// returns how many. Blocking file-system work: a few unlinks and one directory fsync.
    pub fn remove_segments_before(&self, lsn: Lsn) -> Result<usize, WalError> {
        let shared = &self.inner.shared;
        let mut segments = shared.segments.lock();
        // Segment i ends where segment i + 1 starts.
        let covered = segments.windows(2).take_while(|w| w[1] <= lsn).count();
        let mut removed = 0;
        let mut result = Ok(());
        for w in segments.windows(2).take(covered) {
            let path = segment::path(&shared.dir, w[0]);
            // Its length, not its records' size: a crash may have left it pre-allocated space.
            let bytes = std::fs::metadata(&path)
                .map(|m| m.len())
                .unwrap_or(segment::HEADER_LEN + (w[1] - w[0]));
            if let Err(e) = std::fs::remove_file(&path) {
                result = Err(segment::io_err("remove", &path)(e));
                break;
            }
            shared.disk_bytes.fetch_sub(bytes, Ordering::Relaxed);
            removed += 1;
        }
        segments.drain(..removed);
        drop(segments);
        if removed > 0 {
            // Oldest first and durable, so a crash can never leave a gap in the middle.
            segment::sync_dir(&shared.dir)?;
        }
        result.map(|()| removed)
    }

    /// Bytes the log's segments take on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.shared.disk_bytes.load(Ordering::Relaxed)
    }

    /// How many fsyncs the writer has done since open (for metrics, and to show group commit).
    pub fn fsync_count(&self) -> u64 {
        self.inner.shared.fsyncs.load(Ordering::Relaxed)
    }

    /// Whether the writer keeps its disk calls off the request worker, because recent ones on it
    /// were slow (the disk falling behind).
    pub fn writing_off_worker(&self) -> bool {
        let until = *self.inner.shared.off_worker_until.lock();
        until.is_some_and(|until| std::time::Instant::now() < until)
    }

    /// Writes and fsyncs everything appended before it, then stops the writer: later appends fail
    /// with [`WalError::Closed`]. Closing again is a no-op.
    pub async fn close(&self) -> Result<(), WalError> {
        match writer::close(&self.inner.shared)? {
            None => Ok(()),
            Some(answer) => answer.await.unwrap_or_else(|_| self.closed_result()),
        }
    }

    /// The error for a writer that is no longer running.
    fn stopped(&self) -> WalError {
        match self.inner.shared.stage.lock().broken.clone() {
            Some(reason) => WalError::Broken(reason),
            None => WalError::Closed,
        }
    }

    fn closed_result(&self) -> Result<(), WalError> {
        match self.stopped() {
            WalError::Closed => Ok(()),
            broken => Err(broken),
        }
    }

    /// Makes every inline write and direct submit count as slow, as with a disk far behind.
    #[cfg(test)]
    fn make_writes_slow(&self) {
        self.inner
            .shared
            .writes_are_slow
            .store(true, Ordering::Relaxed);
    }

    /// Ends an offload to the blocking pool as soon as it starts.
    #[cfg(test)]
    fn offload_briefly(&self) {
        self.inner
            .shared
            .offload_briefly
            .store(true, Ordering::Relaxed);
    }

    /// Groups written on the blocking pool so far.
    #[cfg(test)]
    fn pool_writes(&self) -> u64 {
        self.inner.shared.pool_writes.load(Ordering::Relaxed)
    }

    /// Direct writes submitted off the request worker so far.
    #[cfg(test)]
    fn off_worker_submits(&self) -> u64 {
        self.inner.shared.off_worker_submits.load(Ordering::Relaxed)
    }

    /// Direct writes whose completion the writer polled for so far.
    #[cfg(test)]
    fn polled_commits(&self) -> u64 {
        self.inner.shared.polled_commits.load(Ordering::Relaxed)
    }

    /// Commits through the page cache and the fsync thread even where direct I/O works; call
    /// before the first append.
    #[cfg(test)]
    fn buffered_only(&self) {
        self.inner
            .shared
            .buffered_only
            .store(true, Ordering::Relaxed);
    }

    /// Whether commits are direct writes (decided at the first append).
    #[cfg(test)]
    fn direct_commits(&self) -> bool {
        self.inner.shared.direct_used.load(Ordering::Relaxed)
    }

    /// Makes the next fsync fail, as a disk error would.
    #[cfg(test)]
    fn fail_next_sync(&self) {
        self.inner
            .shared
            .fail_next_sync
            .store(true, Ordering::Relaxed);
    }
}
