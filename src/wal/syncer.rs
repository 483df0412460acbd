//! The fsync thread: the only place the log waits for the disk while requests are being served.
//!
//! A dedicated OS thread rather than a tokio task: `fdatasync` blocks for a disk round trip
//! (0.1–4 ms here), and a blocked async worker would stall unrelated requests.
//!
//! - Under `FsyncPolicy::Always`, where the log cannot use direct writes ([`super::direct`]), the
//!   [`super::writer`] hands over each group once it is written;
//!   the thread fsyncs whatever has been written by then and answers every append that fsync
//!   covered, while the writer goes on writing the next group. The group an fsync covers is
//!   whatever arrived while the previous one ran.
//! - Under `Interval` the writer answers appends itself once they are written, and this thread
//!   fsyncs `interval` after the first write that made the log dirty, so a power loss loses at
//!   most that window.
//!
//! When stopped (close, or the last handle dropped) it fsyncs what was written, answers, and ends.
//! A failed fsync may have dropped dirty pages that a retry would then report as clean, so the
//! first failure breaks the log for good (see [`super::Shared::break_log`]).

use super::writer::{answer_durable, Reply};
use super::{FsyncPolicy, Lsn, Shared, WalError};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

/// What the writer and the fsync thread share.
struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    /// The log, set once it exists. Weak: the thread must not keep the log alive, or dropping the
    /// last handle would never stop it.
    shared: OnceLock<Weak<Shared>>,
}

struct State {
    /// End of what the writer handed to the kernel.
    written: Lsn,
    /// End of what the last fsync covered.
    synced: Lsn,
    /// The active segment (a duplicate handle of the writer's) and its path.
    file: Arc<File>,
    path: PathBuf,
    /// Appends written but not yet answered, in LSN order (`Always` only).
    pending: VecDeque<(Reply<Lsn>, Lsn)>,
    stop: bool,
    /// Why an fsync failed; from then on every append is answered `Broken`.
    failed: Option<String>,
}

/// The handle on the fsync thread. Dropping it tells the thread to stop (after a last fsync).
pub struct Syncer {
    queue: Arc<Queue>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Syncer {
    /// Starts the thread for the segment `file` at `path`, everything up to `synced` already on
    /// disk. It fsyncs nothing before [`Syncer::attach`].
    pub fn start(
        policy: FsyncPolicy,
        file: File,
        path: PathBuf,
        synced: Lsn,
    ) -> std::io::Result<Syncer> {
        let queue = Arc::new(Queue {
            state: Mutex::new(State {
                written: synced,
                synced,
                file: Arc::new(file),
                path,
                pending: VecDeque::new(),
                stop: false,
                failed: None,
            }),
            wake: Condvar::new(),
            shared: OnceLock::new(),
        });
        let for_thread = queue.clone();
        let thread = std::thread::Builder::new()
            .name("wal-syncer".into())
            .spawn(move || run(&for_thread, policy))?;
        Ok(Syncer {
            queue,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Tells the thread which log it serves (once, right after the log is built).
    pub fn attach(&self, shared: Weak<Shared>) {
        let _ = self.queue.shared.set(shared);
    }

    /// `Always`: queues written appends for the next fsync. Fails (answering them `Broken`) once
    /// an fsync has failed.
    pub fn hand_over(
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

    /// `Interval`: the log is written up to `written` (the thread starts its timer if it was
    /// clean).
    pub fn wrote(&self, written: Lsn) {
        let mut state = self.queue.state.lock();
        let was_clean = state.written <= state.synced;
        state.written = written;
        if was_clean {
            self.queue.wake.notify_one();
        }
    }

    /// The writer moved to a new segment; it fsynced the old one itself, up to `synced`.
    pub fn switch_file(&self, file: File, path: PathBuf, synced: Lsn) {
        let mut state = self.queue.state.lock();
        state.file = Arc::new(file);
        state.path = path;
        state.synced = state.synced.max(synced);
    }

    /// Stops the thread after a last fsync and waits for it (blocking); the error is why the log
    /// broke, if an fsync ever failed.
    pub fn stop(&self) -> Result<(), String> {
        self.signal_stop();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
        match self.queue.state.lock().failed.clone() {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    fn signal_stop(&self) {
        self.queue.state.lock().stop = true;
        self.queue.wake.notify_one();
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// The thread body: wait for written bytes, fsync them (at once, or after the interval), answer,
/// repeat; on stop, a last fsync.
fn run(queue: &Queue, policy: FsyncPolicy) {
    loop {
        let (target, file, path) = {
            let mut state = queue.state.lock();
            while state.written <= state.synced && !state.stop {
                queue.wake.wait(&mut state);
            }
            if let FsyncPolicy::Interval(every) = policy {
                let due = Instant::now() + every;
                while !state.stop && !queue.wake.wait_until(&mut state, due).timed_out() {}
            }
            if state.written <= state.synced {
                return; // stopping, and everything handed over is answered
            }
            (state.written, state.file.clone(), state.path.clone())
        };
        let Some(shared) = queue.shared.get().and_then(Weak::upgrade) else {
            // Every handle and the writer are gone: nothing waits for an answer, but what was
            // written (and, under `Interval`, acknowledged) must still reach the disk.
            if let Err(e) = file.sync_data() {
                tracing::error!(error = %e, "write-ahead log: final fsync failed");
            }
            return;
        };
        let result = shared.sync_file(&file, &path);
        let mut state = queue.state.lock();
        if let Err(e) = result {
            let reason = e.to_string();
            state.failed = Some(reason.clone());
            let pending: Vec<_> = state.pending.drain(..).collect();
            drop(state);
            shared.break_log(&reason);
            for (reply, _) in pending {
                let _ = reply.send(Err(WalError::Broken(reason.clone())));
            }
            return;
        }
        state.synced = state.synced.max(target);
        shared.synced.fetch_max(target, Ordering::AcqRel);
        if policy == FsyncPolicy::Always {
            shared.acked.fetch_max(target, Ordering::AcqRel);
        }
        let mut done = Vec::new();
        while state.pending.front().is_some_and(|(_, lsn)| *lsn <= target) {
            done.extend(state.pending.pop_front());
        }
        drop(state);
        answer_durable(done);
    }
}
