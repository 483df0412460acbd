//! The writer: appends are staged in memory and written to the active segment in groups by one
//! tokio task, on the runtime that serves the requests.
//!
//! An append frames its record into the staged group under a mutex (a copy of its bytes) and
//! awaits its answer. The first append of a group wakes the writer task, which yields
//! [`LINGER_YIELDS`] times, so that the requests already runnable on this worker, and those whose
//! bytes arrive meanwhile, stage their records too (a tokio yield lets the worker poll its sockets
//! before the task runs again); it then takes the whole group and writes it with one `write`.
//! Under `FsyncPolicy::Always` the writer commits the group itself with one asynchronous direct
//! write ([`super::direct`]) and answers it when the write completes; the next group stages
//! meanwhile, and goes out as soon as the write is done, without lingering (the write's flight was
//! its linger). Where the file system refuses direct I/O, the group is written to the page cache
//! and goes to the [`super::syncer`] thread, which answers it after the fsync that covers it, while
//! the next group is already being staged and written. Under `Interval` the writer writes to the
//! page cache and answers at once.
//!
//! Why a task and not a writer thread (the first design): with the server on one core, every
//! append made the request worker and a writer thread take turns — the worker ran out of work,
//! parked, the writer ran, answered a handful of requests, and so on: ~0.4 context switches and a
//! park of the worker per request. That cost ~40% of the durability-off rate even with no fsync at
//! all (`--fsync interval`); BENCHMARKS.md has the figures. Here a group is whatever the worker
//! processed since the last one, and the write happens on the same worker, without a switch.
//!
//! On the page-cache path, a small write takes microseconds, so it runs on the worker; a group past
//! [`INLINE_WRITE_BYTES`], or one that starts a new segment (an fsync of the old one and a file
//! creation), is written on the blocking pool instead. A write to the page cache can still block:
//! when the disk falls far behind, the kernel throttles writers of dirty pages, and the worker —
//! with every request it serves — would wait as long. So [`SLOW_IN_A_ROW`] inline writes that each
//! took more than [`SLOW_WRITE`] send the writes of the next [`OFFLOAD_FOR`] to the blocking pool
//! (a thread switch per group, harmless next to a disk that slow), with a warning. Direct writes
//! do the same with their submit, which blocks when the disk's queue is full ([`super::direct`]).
//!
//! The writer keeps [`PREALLOCATE_BYTES`] of zeros written ahead of the records, so that a
//! record overwrites blocks the file already has: its `fdatasync` (or `O_DSYNC` direct write) then
//! flushes the data alone, where an append that grows the file also has to write the file's new
//! size (its inode; a journal commit on a journaling file system). For direct writes the zeros are
//! fsynced when written, on the blocking pool, so no dirty cached page lies under a direct write.
//! Measured with `scripts/fsync-cost`: ~30% less CPU and wall time per `fdatasync`. The zeros are
//! cut off before a segment is followed by the next one and when the log closes; after a crash
//! the start-up scan keeps them as free space ([`super::segment`]).
//!
//! An I/O error leaves the file in an unknown state, so the first error breaks the log for good:
//! the group and every later append get [`WalError::Broken`]; a restart re-validates the files.

use super::direct::{self, DirectTail};
use super::segment::{self, HEADER_LEN};
use super::{FsyncPolicy, Lsn, Shared, WalError};
use parking_lot::MutexGuard;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub type Reply<T> = oneshot::Sender<Result<T, WalError>>;
pub type Answer<T> = oneshot::Receiver<Result<T, WalError>>;
/// Appends waiting for their answer, each with the LSN just past its record.
pub type Waiting = Vec<(Reply<Lsn>, Lsn)>;

/// Groups up to this size are written on the async worker; larger ones on the blocking pool.
pub const INLINE_WRITE_BYTES: usize = 256 << 10;
/// How many times the writer yields before taking a group (see the module docs). Fewer groups
/// mean fewer fsyncs, each ~70–100 µs of the core's time; measured at 64 connections on one core
/// (`--fsync always`, alternating runs): 0 yields ~35k req/s, 1 ~52k, 2 ~59k, 3 ~57k, 4 ~51k, and
/// yielding until a round stages nothing more ~50k.
const LINGER_YIELDS: usize = 2;
/// An inline write (or direct submit) slower than this moves the next ones off the request worker
/// (see the module docs).
pub const SLOW_WRITE: Duration = Duration::from_millis(2);
/// How many slow calls in a row move the writer off the request worker. One is not enough: a call
/// on a busy core is now and then slow for a reason that passes (the thread preempted by another of
/// the server's, a page of the log being read in under a direct write), while a disk far behind
/// makes every call slow; and the offload costs (on one core, ~20% of the single-position rate
/// with direct submits handed off).
pub const SLOW_IN_A_ROW: u32 = 3;
/// For how long, after slow inline writes or submits, the writer keeps off the request worker.
pub const OFFLOAD_FOR: Duration = Duration::from_secs(10);
/// From this many appends in a group, the writer polls for the group's direct write to complete
/// instead of sleeping ([`direct::Wait::Spin`]). A group that large means requests arrive faster
/// than one per 50 µs or so, and the next group follows at once: polling fills a gap of a few
/// hundred microseconds in which the worker would otherwise park. A smaller group (light load)
/// sleeps, so a quiet server does not spend its core polling.
pub const SPIN_MIN_GROUP: usize = 8;
/// Zeros written ahead of the records at a time (see the module docs).
pub const PREALLOCATE_BYTES: u64 = 1 << 20;
/// A staging (or direct write) buffer that grew past this is not kept for the next group.
pub const KEEP_BUFFER_BYTES: usize = 8 << 20;

/// Appends not yet written, and where the log is in its life. Behind [`Shared::stage`].
pub struct Stage {
    buf: Vec<u8>,
    /// End of the last staged record.
    end: Lsn,
    /// Where the segment the next staged record goes into starts.
    seg_start: Lsn,
    replies: Waiting,
    /// Where in `buf` a new segment starts, and its first LSN.
    breaks: Vec<(usize, Lsn)>,
    closes: Vec<Reply<()>>,
    /// No more appends: a close was asked for, or every handle is gone.
    closing: bool,
    /// The writer wrote its last group and stopped the fsync thread.
    closed: bool,
    /// Why the log stopped taking writes after an I/O error.
    pub broken: Option<String>,
    writer_started: bool,
}

impl Stage {
    /// The stage of a log whose records end at `end`, in the segment starting at `seg_start`.
    pub fn new(end: Lsn, seg_start: Lsn) -> Stage {
        Stage {
            buf: Vec::new(),
            end,
            seg_start,
            replies: Vec::new(),
            breaks: Vec::new(),
            closes: Vec::new(),
            closing: false,
            closed: false,
            broken: None,
            writer_started: false,
        }
    }

    /// Frames `body` as the next record; a record that would not fit the segment starts a new one.
    fn push(&mut self, body: &[u8], reply: Reply<Lsn>, synced: Lsn, segment_bytes: u64) {
        let lag = self.end - synced.min(self.end);
        let frame = segment::frame_len(lag, body.len());
        let used = self.end - self.seg_start;
        if used > 0 && used + frame > segment_bytes {
            self.breaks.push((self.buf.len(), self.end));
            self.seg_start = self.end;
        }
        segment::push_frame(&mut self.buf, lag, body);
        self.end += frame;
        self.replies.push((reply, self.end));
    }

    /// Takes everything staged, leaving `spare` (empty) as the next group's buffer.
    fn take(&mut self, spare: &mut Vec<u8>) -> Group {
        Group {
            buf: std::mem::replace(&mut self.buf, std::mem::take(spare)),
            breaks: std::mem::take(&mut self.breaks),
            end: self.end,
            replies: std::mem::take(&mut self.replies),
            closing: self.closing,
            released: self.closing && self.closes.is_empty(),
        }
    }

    /// Every staged append and close, to be answered `Broken`.
    fn drain(&mut self) -> (Waiting, Vec<Reply<()>>) {
        self.buf.clear();
        self.breaks.clear();
        (
            std::mem::take(&mut self.replies),
            std::mem::take(&mut self.closes),
        )
    }
}

/// One group taken from the stage.
struct Group {
    buf: Vec<u8>,
    breaks: Vec<(usize, Lsn)>,
    /// End of the group's last record.
    end: Lsn,
    replies: Waiting,
    closing: bool,
    /// Every handle is gone (no close): nobody waits for this group's answers.
    released: bool,
}

/// The segment the writer appends to.
pub struct Active {
    pub file: File,
    pub path: PathBuf,
    /// Where the next record goes.
    pub offset: u64,
    /// The file's length: past `offset` it holds zeros written ahead of the records.
    pub len: u64,
    /// The segment's size limit as a file length: no zeros are written past it.
    pub limit: u64,
}

impl Active {
    /// Whether writing `bytes` more needs more pre-allocated space first.
    fn needs_room(&self, bytes: usize) -> bool {
        self.len < self.ahead(bytes, PREALLOCATE_BYTES / 2)
    }

    /// The file length that leaves `room` of zeros after `bytes` more, within the segment.
    fn ahead(&self, bytes: usize, room: u64) -> u64 {
        let end = self.offset + bytes as u64;
        (end + room).min(self.limit.max(end))
    }
}

/// Stages one encoded batch body; the answer comes once it is durable under the policy.
pub fn append(shared: &Arc<Shared>, body: &[u8]) -> Result<Answer<Lsn>, WalError> {
    let (reply, answer) = oneshot::channel();
    let mut stage = shared.stage.lock();
    if let Some(reason) = &stage.broken {
        return Err(WalError::Broken(reason.clone()));
    }
    if stage.closing {
        return Err(WalError::Closed);
    }
    let first = stage.replies.is_empty();
    let synced = shared.synced.load(Ordering::Acquire);
    stage.push(body, reply, synced, shared.segment_bytes);
    start_writer_once(shared, stage);
    if first {
        shared.wake.notify_one();
    }
    Ok(answer)
}

/// Asks the writer to write and fsync everything staged, then stop. `None` when it already has.
pub fn close(shared: &Arc<Shared>) -> Result<Option<Answer<()>>, WalError> {
    let mut stage = shared.stage.lock();
    if let Some(reason) = &stage.broken {
        return Err(WalError::Broken(reason.clone()));
    }
    if stage.closed {
        return Ok(None);
    }
    let (reply, answer) = oneshot::channel();
    stage.closes.push(reply);
    stage.closing = true;
    start_writer_once(shared, stage);
    shared.wake.notify_one();
    Ok(Some(answer))
}

/// Releases the stage, first starting the writer task (in the caller's runtime) if this is the
/// log's first append or close.
fn start_writer_once(shared: &Arc<Shared>, mut stage: MutexGuard<'_, Stage>) {
    let start = !std::mem::replace(&mut stage.writer_started, true);
    drop(stage);
    if start {
        tokio::spawn(run(shared.clone()));
    }
}

/// Every handle is gone: no more appends. A running writer drops what is staged (no caller waits
/// for it), stops the fsync thread, which syncs what was written, and ends; without a writer,
/// dropping the log stops the fsync thread the same way.
pub fn release(shared: &Shared) {
    shared.stage.lock().closing = true;
    shared.wake.notify_one();
}

/// The writer task: take a group, write it, hand it on; until the log closes or breaks.
async fn run(shared: Arc<Shared>) {
    let mut spare = Vec::new();
    let mut offload = Offload::default();
    let mut direct = open_direct(&shared);
    let mut after_direct_write = false;
    loop {
        // Appends staged while a direct write was in flight go out at once: the write's flight
        // (hundreds of microseconds) was their linger.
        if !(after_direct_write && woken_already(&shared.wake)) {
            shared.wake.notified().await;
            for _ in 0..LINGER_YIELDS {
                tokio::task::yield_now().await;
            }
        }
        let group = {
            let mut stage = shared.stage.lock();
            if stage.broken.is_some() {
                return; // whoever broke it answered everything staged
            }
            stage.take(&mut spare)
        };
        if group.released {
            // Not written: only appends whose callers gave up can be staged now, and the
            // directory may already be open again (a restart in the same process).
            return finish(shared).await;
        }
        let closing = group.closing;
        let (committed, mut buf) = match direct.as_mut() {
            Some(tail) => commit_direct(&shared, tail, group, &mut offload).await,
            None => write_and_commit(&shared, group, &mut offload).await,
        };
        after_direct_write = direct.is_some();
        buf.clear();
        if buf.capacity() <= KEEP_BUFFER_BYTES {
            spare = buf;
        }
        if let Err(e) = committed {
            let reason = e.to_string();
            tracing::error!(error = %reason, "write-ahead log failed; refusing further writes");
            shared.break_log(&reason);
            return;
        }
        if closing {
            return finish(shared).await;
        }
    }
}

/// Whether the writer was woken while it was busy (an append started a group meanwhile); takes
/// that wake-up.
fn woken_already(wake: &tokio::sync::Notify) -> bool {
    futures_util::FutureExt::now_or_never(wake.notified()).is_some()
}

/// `FsyncPolicy::Always` where the file system takes direct I/O: the writer commits each group
/// itself with one direct write (see [`super::direct`]) instead of handing it to the fsync thread.
/// `None` under `Interval`, and where direct I/O is refused (some FUSE and network file systems;
/// tmpfs before Linux 6.6): then the log keeps the write-then-fsync path.
fn open_direct(shared: &Shared) -> Option<DirectTail> {
    if shared.policy != FsyncPolicy::Always || !shared.direct_allowed() {
        return None;
    }
    let active = shared.active.lock();
    match DirectTail::open(&active.path, active.offset) {
        Ok(tail) => {
            tracing::debug!("write-ahead log: commits are direct writes");
            #[cfg(test)]
            shared.direct_used.store(true, Ordering::Relaxed);
            Some(tail)
        }
        Err(e) => {
            tracing::info!(
                error = %e,
                "write-ahead log: no direct I/O on this file system; commits use fdatasync"
            );
            None
        }
    }
}

/// Writes a group to the page cache and passes it on to be answered (the write-then-fsync path).
async fn write_and_commit(
    shared: &Arc<Shared>,
    group: Group,
    offload: &mut Offload,
) -> (Result<(), WalError>, Vec<u8>) {
    let (written, buf) = write_group(shared, group.buf, group.breaks, offload).await;
    let committed = match written {
        Ok(()) => commit(shared, group.end, group.replies),
        Err(e) => {
            answer_broken(group.replies, &e.to_string());
            Err(e)
        }
    };
    (committed, buf)
}

/// Commits a group with a direct write and answers it: it is on disk when the write completes.
/// A group that starts a new segment (once per segment) is written through the page cache and
/// fsynced instead, and the tail moves to the new segment.
async fn commit_direct(
    shared: &Arc<Shared>,
    tail: &mut DirectTail,
    group: Group,
    offload: &mut Offload,
) -> (Result<(), WalError>, Vec<u8>) {
    let (written, buf) = if group.breaks.is_empty() {
        let wait = completion_wait(group.replies.len());
        let written = write_direct(shared, tail, &group.buf, offload, wait).await;
        (written, group.buf)
    } else {
        rotate_direct(shared, tail, group.buf, group.breaks).await
    };
    if let Err(e) = written {
        answer_broken(group.replies, &e.to_string());
        return (Err(e), buf);
    }
    shared.fsyncs.fetch_add(1, Ordering::Relaxed);
    shared.synced.fetch_max(group.end, Ordering::AcqRel);
    shared.acked.fetch_max(group.end, Ordering::AcqRel);
    answer_durable(group.replies);
    (Ok(()), buf)
}

/// How to wait for a group of `appends` written directly: polling when the group is large
/// (see [`SPIN_MIN_GROUP`]).
fn completion_wait(appends: usize) -> direct::Wait {
    if appends >= SPIN_MIN_GROUP {
        direct::Wait::Spin(direct::SPIN_FOR)
    } else {
        direct::Wait::Sleep
    }
}

/// One group after the tail, with direct I/O, after making sure zeros are on disk ahead of it.
/// Submitted off the worker while an earlier submit's slowness says the disk's queue is full;
/// its completion waited for as `wait` says.
async fn write_direct(
    shared: &Arc<Shared>,
    tail: &mut DirectTail,
    records: &[u8],
    offload: &mut Offload,
    wait: direct::Wait,
) -> Result<(), WalError> {
    #[cfg(test)]
    shared.fail_injected(tail.path())?;
    // A direct write covers whole blocks: room for the records and the rest of their last block.
    let needs_room = {
        let active = shared.active.lock();
        let end = active.offset + records.len() as u64;
        let bytes = end.next_multiple_of(direct::BLOCK as u64) - active.offset;
        active.needs_room(bytes as usize).then_some(bytes as usize)
    };
    if let Some(bytes) = needs_room {
        let for_pool = shared.clone();
        let zeroed = tokio::task::spawn_blocking(move || {
            let mut active = for_pool.active.lock();
            preallocate(&for_pool, &mut active, bytes)?;
            // On disk before the direct writes reach them: a direct write over dirty cached
            // pages would first have to write those back, inside the request worker's submit.
            active
                .file
                .sync_data()
                .map_err(segment::io_err("fsync", &active.path))
        })
        .await;
        zeroed.unwrap_or_else(|e| Err(WalError::Broken(format!("pre-allocation failed: {e}"))))?;
    }
    let how = if offload.active(shared) {
        #[cfg(test)]
        shared.off_worker_submits.fetch_add(1, Ordering::Relaxed);
        direct::Submit::OffWorker
    } else {
        direct::Submit::OnWorker
    };
    #[cfg(test)]
    if matches!(wait, direct::Wait::Spin(_)) {
        shared.polled_commits.fetch_add(1, Ordering::Relaxed);
    }
    let file_end = match tail.append(records, how, wait).await {
        Ok((end, submitted)) => {
            if how == direct::Submit::OnWorker {
                offload.took(shared, submitted.took, Blocked::DirectSubmit);
            }
            end
        }
        Err(e) => return Err(segment::io_err("write", tail.path())(e)),
    };
    let mut active = shared.active.lock();
    active.offset += records.len() as u64;
    if file_end > active.len {
        // Padding past the zeros written ahead (only near the segment's size limit).
        shared
            .disk_bytes
            .fetch_add(file_end - active.len, Ordering::Relaxed);
        active.len = file_end;
    }
    Ok(())
}

/// A group that starts a new segment: written through the page cache (rotating as it goes) and
/// fsynced on the blocking pool; then the tail is the new segment's.
async fn rotate_direct(
    shared: &Arc<Shared>,
    tail: &mut DirectTail,
    buf: Vec<u8>,
    breaks: Vec<(usize, Lsn)>,
) -> (Result<(), WalError>, Vec<u8>) {
    let for_pool = shared.clone();
    let job = tokio::task::spawn_blocking(move || {
        let result = write(&for_pool, &buf, &breaks).and_then(|()| {
            let active = for_pool.active.lock();
            for_pool.sync_file(&active.file, &active.path)?;
            DirectTail::open(&active.path, active.offset)
                .map_err(segment::io_err("open for direct writes", &active.path))
        });
        (result, buf)
    });
    match job.await {
        Ok((Ok(next), buf)) => {
            *tail = next;
            (Ok(()), buf)
        }
        Ok((Err(e), buf)) => (Err(e), buf),
        Err(e) => (Err(unfinished(e)), Vec::new()),
    }
}

/// Whether the writer keeps its blocking calls off the request worker, because calls on the
/// worker were slow: page-cache writes go to the blocking pool, direct writes are submitted off
/// the worker ([`direct::Submit::OffWorker`]). Until when is [`Shared::off_worker_until`], which
/// metrics read too.
#[derive(Default)]
struct Offload {
    /// Slow calls since the last quick one.
    slow_in_a_row: u32,
}

/// The call on the worker that was slow.
#[derive(Clone, Copy, Debug)]
enum Blocked {
    PageCacheWrite,
    DirectSubmit,
}

impl Offload {
    fn active(&self, shared: &Shared) -> bool {
        let mut until = shared.off_worker_until.lock();
        match *until {
            Some(end) if Instant::now() < end => true,
            Some(_) => {
                *until = None;
                tracing::info!("write-ahead log: writing from the request worker again");
                false
            }
            None => false,
        }
    }

    fn took(&mut self, shared: &Shared, elapsed: Duration, call: Blocked) {
        let slow = elapsed > shared.slow_write();
        if self.count(slow) {
            let offload_for = shared.offload_for();
            *shared.off_worker_until.lock() = Some(Instant::now() + offload_for);
            let what = match call {
                Blocked::PageCacheWrite => "a write to the page cache",
                Blocked::DirectSubmit => "submitting a direct write",
            };
            tracing::warn!(
                took_ms = elapsed.as_secs_f64() * 1e3,
                "write-ahead log: {what} blocked the request worker {SLOW_IN_A_ROW} times in a \
                 row (the disk is falling behind); writing off the request worker for {} s",
                offload_for.as_secs()
            );
        }
    }

    /// Counts one call; true when it makes [`SLOW_IN_A_ROW`] slow ones in a row.
    fn count(&mut self, slow: bool) -> bool {
        if !slow {
            self.slow_in_a_row = 0;
            return false;
        }
        self.slow_in_a_row += 1;
        if self.slow_in_a_row < SLOW_IN_A_ROW {
            return false;
        }
        self.slow_in_a_row = 0;
        true
    }
}

/// Writes a group: on this worker when small (and recent inline writes were quick), else on the
/// blocking pool.
async fn write_group(
    shared: &Arc<Shared>,
    buf: Vec<u8>,
    breaks: Vec<(usize, Lsn)>,
    offload: &mut Offload,
) -> (Result<(), WalError>, Vec<u8>) {
    let inline = breaks.is_empty()
        && buf.len() <= INLINE_WRITE_BYTES
        && !shared.active.lock().needs_room(buf.len())
        && !offload.active(shared);
    if inline {
        let started = Instant::now();
        let result = write(shared, &buf, &breaks);
        offload.took(shared, started.elapsed(), Blocked::PageCacheWrite);
        return (result, buf);
    }
    #[cfg(test)]
    shared.pool_writes.fetch_add(1, Ordering::Relaxed);
    let for_pool = shared.clone();
    let job = tokio::task::spawn_blocking(move || {
        let result = write(&for_pool, &buf, &breaks);
        (result, buf)
    });
    match job.await {
        Ok(done) => done,
        Err(e) => (Err(unfinished(e)), Vec::new()),
    }
}

/// Writes `buf` to the active segment, moving to a new segment at each break.
fn write(shared: &Shared, buf: &[u8], breaks: &[(usize, Lsn)]) -> Result<(), WalError> {
    let mut active = shared.active.lock();
    let mut from = 0;
    for &(at, start) in breaks {
        write_bytes(shared, &mut active, &buf[from..at])?;
        rotate(shared, &mut active, start)?;
        from = at;
    }
    write_bytes(shared, &mut active, &buf[from..])
}

fn write_bytes(shared: &Shared, active: &mut Active, bytes: &[u8]) -> Result<(), WalError> {
    if bytes.is_empty() {
        return Ok(());
    }
    if active.needs_room(bytes.len()) {
        preallocate(shared, active, bytes.len())?;
    }
    active
        .file
        .write_all_at(bytes, active.offset)
        .map_err(segment::io_err("write", &active.path))?;
    active.offset += bytes.len() as u64;
    if active.offset > active.len {
        // A record larger than the space written ahead.
        let grown = active.offset - active.len;
        shared.disk_bytes.fetch_add(grown, Ordering::Relaxed);
        active.len = active.offset;
    }
    Ok(())
}

/// Writes zeros past the end of the file, so that the next records overwrite existing blocks:
/// their `fdatasync` then only flushes data, where growing the file would also write its new
/// size each time.
fn preallocate(shared: &Shared, active: &mut Active, bytes: usize) -> Result<(), WalError> {
    let want = active.ahead(bytes, PREALLOCATE_BYTES);
    let more = want.saturating_sub(active.len);
    if more == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; usize::try_from(more).unwrap_or(usize::MAX)];
    active
        .file
        .write_all_at(&zeros, active.len)
        .map_err(segment::io_err("pre-allocate", &active.path))?;
    active.len = want;
    shared.disk_bytes.fetch_add(more, Ordering::Relaxed);
    Ok(())
}

/// Cuts the pre-allocated zeros off the active segment (durably), so that it ends at its last
/// record: before it is followed by a new segment, and when the log closes.
fn trim(shared: &Shared, active: &mut Active) -> Result<(), WalError> {
    if active.len > active.offset {
        let path = &active.path;
        active
            .file
            .set_len(active.offset)
            .map_err(segment::io_err("truncate", path))?;
        active
            .file
            .sync_all()
            .map_err(segment::io_err("fsync", path))?;
        let cut = active.len - active.offset;
        shared.disk_bytes.fetch_sub(cut, Ordering::Relaxed);
        active.len = active.offset;
    }
    Ok(())
}

/// Ends the active segment (durably: a segment is complete before its successor exists) and
/// starts the next one at `start`.
fn rotate(shared: &Shared, active: &mut Active, start: Lsn) -> Result<(), WalError> {
    trim(shared, active)?;
    shared.sync_file(&active.file, &active.path)?;
    shared.synced.fetch_max(start, Ordering::AcqRel);
    let file = segment::create(&shared.dir, start)?;
    let path = segment::path(&shared.dir, start);
    let for_syncer = file.try_clone().map_err(segment::io_err("dup", &path))?;
    shared.syncer.switch_file(for_syncer, path.clone(), start);
    shared.segments.lock().push(start);
    shared.disk_bytes.fetch_add(HEADER_LEN, Ordering::Relaxed);
    *active = Active {
        file,
        path,
        offset: HEADER_LEN,
        len: HEADER_LEN,
        limit: active.limit,
    };
    Ok(())
}

/// A written group: to the fsync thread (`Always`), or answered now (`Interval`).
fn commit(shared: &Shared, end: Lsn, replies: Waiting) -> Result<(), WalError> {
    match shared.policy {
        FsyncPolicy::Always => shared.syncer.hand_over(end, replies.into_iter()),
        FsyncPolicy::Interval(_) => {
            shared.acked.fetch_max(end, Ordering::AcqRel);
            shared.syncer.wrote(end);
            answer_durable(replies);
            Ok(())
        }
    }
}

/// The last group is written: trim the pre-allocated space if this is a close, stop the fsync
/// thread (it syncs and answers what it holds), then answer the closes.
async fn finish(shared: Arc<Shared>) {
    // Only on a close: when the handles were dropped instead, the directory may already be open
    // again (a restart in the same process), and the new log appends past this one's end.
    let closed = !shared.stage.lock().closes.is_empty();
    let for_pool = shared.clone();
    let stopped = tokio::task::spawn_blocking(move || {
        let trimmed = if closed {
            trim(&for_pool, &mut for_pool.active.lock()).map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        let stopped = for_pool.syncer.stop();
        trimmed.and(stopped)
    })
    .await;
    let result = stopped.unwrap_or_else(|e| Err(format!("the fsync thread did not stop: {e}")));
    let closes = {
        let mut stage = shared.stage.lock();
        stage.closed = true;
        if let Err(reason) = &result {
            stage.broken.get_or_insert_with(|| reason.clone());
        }
        std::mem::take(&mut stage.closes)
    };
    for close in closes {
        let _ = close.send(result.clone().map_err(WalError::Broken));
    }
}

/// A write on the blocking pool that panicked or was cancelled: the file's state is unknown.
fn unfinished(e: tokio::task::JoinError) -> WalError {
    WalError::Broken(format!("the log's write did not finish: {e}"))
}

/// Answers appends that are durable under the policy with their LSNs.
pub fn answer_durable(replies: impl IntoIterator<Item = (Reply<Lsn>, Lsn)>) {
    for (reply, lsn) in replies {
        let _ = reply.send(Ok(lsn));
    }
}

fn answer_broken(replies: Waiting, reason: &str) {
    for (reply, _) in replies {
        let _ = reply.send(Err(WalError::Broken(reason.to_string())));
    }
}

impl Shared {
    /// Breaks the log for good: later appends and closes fail, and everything staged is answered
    /// with `reason`.
    pub fn break_log(&self, reason: &str) {
        let (replies, closes) = {
            let mut stage = self.stage.lock();
            stage.broken.get_or_insert_with(|| reason.to_string());
            stage.drain()
        };
        answer_broken(replies, reason);
        for close in closes {
            let _ = close.send(Err(WalError::Broken(reason.to_string())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Offload, SLOW_IN_A_ROW};

    #[test]
    fn only_slow_calls_in_a_row_move_the_writer_off_the_worker() {
        let mut offload = Offload::default();
        // A quick call between slow ones starts the count again.
        for _ in 0..5 {
            for _ in 1..SLOW_IN_A_ROW {
                assert!(!offload.count(true));
            }
            assert!(!offload.count(false));
        }
        for _ in 1..SLOW_IN_A_ROW {
            assert!(!offload.count(true));
        }
        assert!(offload.count(true), "{SLOW_IN_A_ROW} slow calls in a row");
        assert!(
            !offload.count(true),
            "counting starts again after an offload"
        );
    }
}
