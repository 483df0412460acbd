//! The writer thread: the one owner of the active segment. It groups appends and answers them.
//!
//! A dedicated OS thread rather than a tokio task: `write` and `fdatasync` block, and a blocked async
//! worker would stall unrelated requests. The loop blocks for the first command, drains whatever else
//! is already queued (up to [`GROUP_BYTES`]), and writes the group with one `write`.
//!
//! Under `FsyncPolicy::Always` the fsyncs run on a second thread, the [`Syncer`]: it fsyncs whatever
//! has been written, then answers every append that fsync covered, while the writer goes on writing
//! the next groups. The group an fsync covers is whatever arrived while the previous one ran, and
//! request processing does not sit idle behind an fsync. Measured at 64 connections with the server
//! on one core: a single thread that wrote, fsynced and answered in turn reached ~40% of the
//! durability-off rate, this ~50% (BENCHMARKS.md).
//! Under `Interval` the writer answers right after the write and fsyncs when the oldest unsynced
//! write is `interval` old (waking on a timeout if nothing else arrives).
//!
//! An I/O error leaves the file in an unknown state, and a failed fsync may have dropped dirty pages
//! that a retry would then report as clean, so the first error breaks the log for good: the group and
//! every later append get [`WalError::Broken`]; a restart re-validates the files.

use super::segment::{self, HEADER_LEN};
use super::{FsyncPolicy, Lsn, Shared, WalError};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::oneshot;

/// A group is written once it holds this much (a few milliseconds of a disk's bandwidth).
pub const GROUP_BYTES: usize = 4 << 20;
/// How many times the writer yields, with nothing queued, before it closes a group.
const LINGER_YIELDS: usize = 2;

pub type Reply<T> = oneshot::Sender<Result<T, WalError>>;

pub enum Command {
    /// Log an encoded batch body; answer with its end LSN once durable under the policy.
    Append { body: Vec<u8>, reply: Reply<Lsn> },
    /// Write and fsync everything queued before this, answer, and stop.
    Close { reply: Reply<()> },
}

/// Why the loop woke up.
enum Wake {
    Command(Command),
    SyncDue,
    Disconnected,
}

pub struct Writer {
    shared: Arc<Shared>,
    policy: FsyncPolicy,
    segment_bytes: u64,
    file: File,
    path: PathBuf,
    seg_start: Lsn,
    /// End of the last staged record (in `buf` or written).
    end: Lsn,
    /// End of what was handed to the kernel.
    written: Lsn,
    /// End of what the last successful fsync covered.
    synced: Lsn,
    buf: Vec<u8>,
    /// When the oldest write not yet fsynced happened.
    dirty_since: Option<Instant>,
    /// The group's appends and the end LSN of each.
    replies: Vec<(Reply<Lsn>, Lsn)>,
    /// Under `Always`: the thread that fsyncs and answers.
    syncer: Option<SyncerHandle>,
}

impl Writer {
    /// A writer appending to `file`, the segment starting at `seg_start` and ending at `end`, all of
    /// which is already on disk.
    pub fn new(
        shared: Arc<Shared>,
        policy: FsyncPolicy,
        segment_bytes: u64,
        file: File,
        seg_start: Lsn,
        end: Lsn,
    ) -> Writer {
        let path = segment::path(&shared.dir, seg_start);
        Writer {
            shared,
            policy,
            segment_bytes,
            file,
            path,
            seg_start,
            end,
            written: end,
            synced: end,
            buf: Vec::with_capacity(64 << 10),
            dirty_since: None,
            replies: Vec::new(),
            syncer: None,
        }
    }

    /// The thread body; returns when closed, broken, or every handle is dropped.
    pub fn run(mut self, rx: Receiver<Command>) {
        if self.policy == FsyncPolicy::Always {
            match SyncerHandle::start(self.shared.clone(), &self.file, self.synced) {
                Ok(syncer) => self.syncer = Some(syncer),
                Err(e) => return self.fail(e, None),
            }
        }
        loop {
            let first = match self.wait(&rx) {
                Wake::Command(command) => command,
                Wake::SyncDue => match self.sync() {
                    Ok(()) => continue,
                    Err(e) => return self.fail(e, None),
                },
                Wake::Disconnected => return self.shut_down(),
            };
            let mut close = None;
            if let Err(e) = self
                .gather(first, &rx, &mut close)
                .and_then(|()| self.commit())
            {
                return self.fail(e, close);
            }
            if let Some(reply) = close {
                self.stop_syncer();
                let result = self.sync();
                let failed = result.as_ref().err().map(|e| e.to_string());
                let _ = reply.send(result);
                if let Some(reason) = failed {
                    *self.shared.broken.lock() = Some(reason);
                }
                return;
            }
        }
    }

    fn wait(&self, rx: &Receiver<Command>) -> Wake {
        let deadline = match (self.policy, self.dirty_since) {
            (FsyncPolicy::Interval(every), Some(since)) => since + every,
            _ => return rx.recv().map_or(Wake::Disconnected, Wake::Command),
        };
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(command) => Wake::Command(command),
            Err(RecvTimeoutError::Timeout) => Wake::SyncDue,
            Err(RecvTimeoutError::Disconnected) => Wake::Disconnected,
        }
    }

    /// Stages `first` and everything already queued behind it, up to a group's worth or a close.
    fn gather(
        &mut self,
        first: Command,
        rx: &Receiver<Command>,
        close: &mut Option<Reply<()>>,
    ) -> Result<(), WalError> {
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Append { body, reply } => self.stage(body, reply)?,
                Command::Close { reply } => {
                    *close = Some(reply);
                    break;
                }
            }
            if self.buf.len() < GROUP_BYTES {
                next = rx.try_recv().ok().or_else(|| Self::linger(rx));
            }
        }
        Ok(())
    }

    /// With the queue empty, gives the request threads a moment to finish what they are decoding
    /// before the group is closed: `yield_now` lets a request thread sharing this core run until it
    /// blocks. Without it, on one core, the first request of a burst wakes this thread, which then
    /// commits a group of one and makes the rest of the burst wait a whole extra fsync (measured:
    /// ~4 appends per fsync instead of dozens at 64 connections).
    fn linger(rx: &Receiver<Command>) -> Option<Command> {
        for _ in 0..LINGER_YIELDS {
            std::thread::yield_now();
            if let Ok(command) = rx.try_recv() {
                return Some(command);
            }
        }
        None
    }

    /// Frames one record into the group buffer, first moving to a new segment if it would not fit.
    fn stage(&mut self, body: Vec<u8>, reply: Reply<Lsn>) -> Result<(), WalError> {
        self.replies.push((reply, 0));
        let used = self.end - self.seg_start;
        if used > 0
            && used + segment::frame_len(self.end - self.synced, body.len()) > self.segment_bytes
        {
            self.rotate()?;
        }
        let synced = self
            .syncer
            .as_ref()
            .map_or(self.synced, |s| s.synced().max(self.synced));
        let lag = self.end - synced.min(self.end);
        segment::push_frame(&mut self.buf, lag, &body);
        self.end += segment::frame_len(lag, body.len());
        if let Some(last) = self.replies.last_mut() {
            last.1 = self.end;
        }
        Ok(())
    }

    /// Writes the group, fsyncs it if the policy says so, and answers it.
    fn commit(&mut self) -> Result<(), WalError> {
        self.flush()?;
        if let Some(syncer) = &self.syncer {
            return syncer.hand_over(self.written, self.replies.drain(..));
        }
        let sync_due = match self.policy {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(every) => self.dirty_since.is_some_and(|t| t.elapsed() >= every),
        };
        if sync_due {
            self.sync()?;
        }
        self.shared.acked.store(self.end, Ordering::Release);
        for (reply, lsn) in self.replies.drain(..) {
            let _ = reply.send(Ok(lsn));
        }
        Ok(())
    }

    /// Ends the active segment (durably) and starts the next one at the current end.
    fn rotate(&mut self) -> Result<(), WalError> {
        self.flush()?;
        self.sync()?;
        self.file = segment::create(&self.shared.dir, self.end)?;
        self.path = segment::path(&self.shared.dir, self.end);
        if let Some(syncer) = &self.syncer {
            let file = self
                .file
                .try_clone()
                .map_err(segment::io_err("dup", &self.path))?;
            syncer.switch_file(file);
        }
        self.seg_start = self.end;
        self.shared.segments.lock().push(self.end);
        self.shared
            .disk_bytes
            .fetch_add(HEADER_LEN, Ordering::Relaxed);
        Ok(())
    }

    /// Lets the syncer fsync and answer what was handed to it, and waits for it to end.
    fn stop_syncer(&mut self) {
        if let Some(syncer) = self.syncer.take() {
            syncer.stop();
        }
    }

    fn flush(&mut self) -> Result<(), WalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.buf)
            .map_err(segment::io_err("write", &self.path))?;
        self.shared
            .disk_bytes
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        self.written = self.end;
        self.dirty_since.get_or_insert_with(Instant::now);
        self.buf.clear();
        if self.buf.capacity() > 2 * GROUP_BYTES {
            // One huge record should not pin its buffer for the life of the process.
            self.buf = Vec::with_capacity(64 << 10);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), WalError> {
        if self.synced == self.written {
            self.dirty_since = None;
            return Ok(());
        }
        #[cfg(test)]
        if self.shared.fail_next_sync.swap(false, Ordering::Relaxed) {
            let injected = std::io::Error::other("injected fsync failure");
            return Err(segment::io_err("fsync", &self.path)(injected));
        }
        self.file
            .sync_data()
            .map_err(segment::io_err("fsync", &self.path))?;
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.synced = self.written;
        self.dirty_since = None;
        Ok(())
    }

    /// Marks the log broken and answers everything pending with the reason.
    fn fail(mut self, error: WalError, close: Option<Reply<()>>) {
        self.stop_syncer();
        let reason = error.to_string();
        tracing::error!(error = %reason, "write-ahead log failed; refusing further writes");
        *self.shared.broken.lock() = Some(reason.clone());
        for (reply, _) in self.replies.drain(..) {
            let _ = reply.send(Err(WalError::Broken(reason.clone())));
        }
        if let Some(reply) = close {
            let _ = reply.send(Err(WalError::Broken(reason)));
        }
    }

    /// Every handle is gone without a close: make what was written durable anyway.
    fn shut_down(mut self) {
        self.stop_syncer();
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "write-ahead log: final fsync failed");
        }
    }
}

/// What the writer and the syncer share under `Always`.
struct SyncQueue {
    state: Mutex<SyncState>,
    wake: Condvar,
    shared: Arc<Shared>,
}

struct SyncState {
    /// End of what the writer handed to the kernel.
    written: Lsn,
    /// End of what the last fsync covered.
    synced: Lsn,
    /// The active segment (a duplicate handle of the writer's).
    file: Arc<File>,
    /// Appends written but not yet answered, in LSN order.
    pending: VecDeque<(Reply<Lsn>, Lsn)>,
    stop: bool,
    /// Why an fsync failed; from then on every append is answered `Broken`.
    failed: Option<String>,
}

/// The writer's handle on the syncer thread.
struct SyncerHandle {
    queue: Arc<SyncQueue>,
    thread: Option<JoinHandle<()>>,
}

impl SyncerHandle {
    fn start(shared: Arc<Shared>, file: &File, synced: Lsn) -> Result<SyncerHandle, WalError> {
        let path = shared.dir.clone();
        let file = file.try_clone().map_err(segment::io_err("dup", &path))?;
        let queue = Arc::new(SyncQueue {
            state: Mutex::new(SyncState {
                written: synced,
                synced,
                file: Arc::new(file),
                pending: VecDeque::new(),
                stop: false,
                failed: None,
            }),
            wake: Condvar::new(),
            shared,
        });
        let for_thread = queue.clone();
        let thread = std::thread::Builder::new()
            .name("wal-syncer".into())
            .spawn(move || Syncer(for_thread).run())
            .map_err(|e| WalError::Broken(format!("cannot start the fsync thread: {e}")))?;
        Ok(SyncerHandle {
            queue,
            thread: Some(thread),
        })
    }

    fn synced(&self) -> Lsn {
        self.queue.state.lock().synced
    }

    /// Queues written appends for the next fsync.
    fn hand_over(
        &self,
        written: Lsn,
        replies: impl Iterator<Item = (Reply<Lsn>, Lsn)>,
    ) -> Result<(), WalError> {
        let mut state = self.queue.state.lock();
        if let Some(reason) = state.failed.clone() {
            drop(state);
            for (reply, _) in replies {
                let _ = reply.send(Err(WalError::Broken(reason.clone())));
            }
            return Err(WalError::Broken(reason));
        }
        state.written = written;
        state.pending.extend(replies);
        self.queue.wake.notify_one();
        Ok(())
    }

    /// The writer moved to a new segment (it fsynced the old one itself).
    fn switch_file(&self, file: File) {
        self.queue.state.lock().file = Arc::new(file);
    }

    fn stop(mut self) {
        self.queue.state.lock().stop = true;
        self.queue.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The fsync thread: fsync what is written, answer what that covered, repeat.
struct Syncer(Arc<SyncQueue>);

impl Syncer {
    fn run(self) {
        let queue = &self.0;
        loop {
            let (target, file) = {
                let mut state = queue.state.lock();
                while state.written <= state.synced && !state.stop {
                    queue.wake.wait(&mut state);
                }
                if state.written <= state.synced {
                    return; // stopping, and everything handed over is answered
                }
                (state.written, state.file.clone())
            };
            #[cfg(test)]
            let result = if queue.shared.fail_next_sync.swap(false, Ordering::Relaxed) {
                Err(std::io::Error::other("injected fsync failure"))
            } else {
                file.sync_data()
            };
            #[cfg(not(test))]
            let result = file.sync_data();
            let mut state = queue.state.lock();
            match result {
                Ok(()) => {
                    queue.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
                    state.synced = target;
                    queue.shared.acked.fetch_max(target, Ordering::AcqRel);
                    let mut done = Vec::new();
                    while state.pending.front().is_some_and(|(_, lsn)| *lsn <= target) {
                        done.extend(state.pending.pop_front());
                    }
                    drop(state);
                    for (reply, lsn) in done {
                        let _ = reply.send(Ok(lsn));
                    }
                }
                Err(e) => {
                    let reason = format!("fsync failed: {e}");
                    tracing::error!(error = %reason, "write-ahead log failed; refusing further writes");
                    *queue.shared.broken.lock() = Some(reason.clone());
                    state.failed = Some(reason.clone());
                    for (reply, _) in state.pending.drain(..) {
                        let _ = reply.send(Err(WalError::Broken(reason.clone())));
                    }
                    return;
                }
            }
        }
    }
}
