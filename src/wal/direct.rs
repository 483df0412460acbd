//! Durable writes without an fsync thread: the active segment's tail written with direct I/O
//! (`O_DIRECT | O_DSYNC`) through Linux native AIO, completion signalled on an eventfd the request
//! runtime polls.
//!
//! Why: under `--fsync always` the cost of a commit was not the disk but the server's core. A
//! `write` + `fdatasync` makes the calling thread sleep twice (the data, then the disk cache flush)
//! and wake twice, each time preempting the request worker, and the worker's caches come back
//! cold. An asynchronous direct write hands the whole commit to the kernel: the worker submits one
//! request and goes on serving; the block layer issues the data write, and the flush that `O_DSYNC`
//! asks for runs in the kernel's I/O completion work, where the disk interrupt is handled. Measured
//! with a probe (`BENCHMARKS.md`, issue 3): ~20 µs of the submitting core per commit against
//! 62–76 µs for `pwrite` + `fdatasync` from a thread on that core.
//!
//! Direct I/O writes whole 4 KiB blocks from a 4 KiB-aligned buffer, so each commit rewrites the
//! log's last, partial block with the records already in it (kept in memory, [`DirectTail`]) and
//! the new ones after them, padded with zeros up to the block's end. The bytes already on disk are
//! rewritten unchanged, so a torn write leaves each sector old or new, both holding them; the pad is
//! zeros over the zeros written ahead of the records (free space to the start-up scan).
//!
//! One write is in flight at a time: the next group waits for it, as the next fsync used to. Two
//! could land in either order, and both rewrite the same tail block.
//!
//! Readers (history's follower, track queries) read the log through the page cache meanwhile. That
//! stays coherent: a direct write invalidates the cached pages it covers when it completes (waiting
//! for a page being read in), readers never read past the acknowledged end, and nothing writes the
//! tail through the cache (the zeros ahead are fsynced before a direct write reaches them).
//!
//! While a write of a large group is in flight, the writer polls for its completion instead of
//! sleeping on the eventfd ([`Wait::Spin`], for at most [`SPIN_FOR`]): it peeks at the AIO
//! context's completion ring, which the kernel maps into our memory, and requeues itself behind the
//! worker's other tasks. Why: under load, the worker often runs out of requests while the write is
//! in flight (every connection waits on it or on its client), and a write takes far longer under
//! load than alone: ~500 µs on average in the benchmark against ~110 µs for the same write on an
//! idle machine (`fio`), because its completion (the cache flush `O_DSYNC` asks for) runs in a
//! kernel worker on the core that takes the disk's interrupts, which the load keeps busy (traced:
//! the data and the flush take ~150 µs; the rest is that worker's second turn, after the flush, to
//! post the completion). A synchronous `pwrite` would issue and wait for the flush in our own
//! thread, with no kernel worker, but it blocks the request worker, or needs a second thread taking
//! turns with it on the core: both measured worse (BENCHMARKS.md, issue 3). Sleeping then parks the
//! worker, and on a virtual machine halts the virtual CPU: the wake-up costs a VM exit, and the
//! core comes back with its caches cooled by whatever the host ran meanwhile. Measured with 64
//! connections on one core (BENCHMARKS.md, issue 3): +6–9% requests/s. A small group (light load)
//! sleeps as before, so a quiet server does not burn its core polling.
//!
//! `io_submit` normally returns in microseconds, but it blocks when the disk's request queue is
//! full (another process, or our own snapshot's writeback, saturating the disk), and the request
//! worker would wait with it. So each submit is timed, and after a few slow ones in a row the
//! writer submits [`Submit::OffWorker`] for a while (`writer::Offload`, as the page-cache path
//! does with its writes): the worker's other tasks move to another thread first
//! (`block_in_place`), and the requests go on being served while the submit waits for room in the
//! queue.

use super::writer::KEEP_BUFFER_BYTES;
use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::{Handle, RuntimeFlavor};

/// Direct I/O's unit: offsets, lengths and the buffer's address are multiples of it.
pub const BLOCK: usize = 4096;
/// The tail's write buffer: a group of single positions takes a few KiB; a larger group grows it.
const TAIL_BUFFER_BYTES: usize = 256 << 10;

/// Where a direct write is handed to the kernel (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// On the request worker, inline: the usual case.
    OnWorker,
    /// After handing the worker's other tasks to another thread, because a recent submit blocked.
    OffWorker,
}

/// How the writer waits for a direct write to complete (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Sleeps until the kernel signals the eventfd: the worker parks if it has nothing else to do.
    Sleep,
    /// Polls the completion ring between the worker's other tasks, for up to this long (the
    /// writer's is [`SPIN_FOR`]), then sleeps.
    Spin(Duration),
}

/// The longest the writer's [`Wait::Spin`] polls before sleeping. Under the benchmark's load about
/// two commits in three complete within it (a probe in the writer, BENCHMARKS.md); polling 1 ms
/// measured no better, and a disk slower than that is not worth a core's time.
pub const SPIN_FOR: Duration = Duration::from_micros(500);

/// A started direct write: the submit is done, the write may still be in flight.
pub struct Submitted {
    /// How long `io_submit` took: a slow one means the disk's queue is full.
    pub took: Duration,
}

/// A zero-initialised, block-aligned byte buffer (direct I/O reads the caller's memory itself).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer owns its allocation; nothing else aliases it.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// At least `cap` bytes, a whole number of blocks. Fails only for an impossible size.
    pub fn with_capacity(cap: usize) -> io::Result<AlignedBuf> {
        let layout = Layout::from_size_align(round_up(cap.max(BLOCK)), BLOCK)
            .map_err(|e| io::Error::other(format!("a {cap}-byte write buffer: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `capacity` initialised bytes (zeroed at allocation) owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `with_capacity` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// `n` rounded up to a whole number of blocks.
pub fn round_up(n: usize) -> usize {
    n.div_ceil(BLOCK) * BLOCK
}

// Linux native AIO (include/uapi/linux/aio_abi.h); the libc crate has the syscall numbers only.
type AioContext = libc::c_ulong;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_FLAG_RESFD: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct IoCb {
    data: u64,
    key: u32,
    rw_flags: i32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// A segment opened for direct, synchronous-data writes, with its own AIO context and eventfd.
pub struct DirectFile {
    file: File,
    ctx: AioContext,
    /// The context's completion ring, where the kernel's layout is the one we know.
    ring: Option<CompletionRing>,
    done: AsyncFd<OwnedFd>,
}

impl DirectFile {
    /// Opens `path` for `O_DIRECT | O_DSYNC` writes. Fails (`EINVAL`) where the file system has
    /// no direct I/O (some FUSE and network file systems): the caller then keeps the fsync thread.
    pub fn open(path: &Path) -> io::Result<DirectFile> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)?;
        check_alignment(&file)?;
        // SAFETY: plain syscalls; `eventfd` returns a new descriptor we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ctx: AioContext = 0;
        // SAFETY: io_setup writes the new context id into `ctx`.
        let rc = unsafe { libc::syscall(libc::SYS_io_setup, 1 as libc::c_long, &mut ctx) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the eventfd, which stays open until the AsyncFd is dropped.
        let registered = unsafe { AsyncFd::register_with_interest(eventfd, Interest::READABLE) };
        let done = match registered {
            Ok(done) => done,
            Err(e) => {
                destroy(ctx);
                return Err(e.into_parts().1);
            }
        };
        // SAFETY: `ctx` is a live context; the DirectFile keeps it (and so its ring) alive.
        let ring = unsafe { CompletionRing::of(ctx) };
        Ok(DirectFile {
            file,
            ctx,
            ring,
            done,
        })
    }

    /// Writes `buf[..len]` at `offset` (`len` and `offset` whole blocks), submitted as `how` says,
    /// and waits for it to be on disk as `wait` says. Cancel-safe for memory: dropping the future
    /// mid-write blocks until the kernel is done with the buffer.
    pub async fn write_at(
        &self,
        buf: &AlignedBuf,
        len: usize,
        offset: u64,
        how: Submit,
        wait: Wait,
    ) -> io::Result<Submitted> {
        debug_assert!(
            len.is_multiple_of(BLOCK)
                && offset.is_multiple_of(BLOCK as u64)
                && len <= buf.capacity()
        );
        let mut cb = IoCb {
            opcode: IOCB_CMD_PWRITE,
            fildes: self.file.as_raw_fd() as u32,
            buf: buf.as_slice().as_ptr() as u64,
            nbytes: len as u64,
            offset: offset as i64,
            flags: IOCB_FLAG_RESFD,
            resfd: self.done.get_ref().as_raw_fd() as u32,
            ..IoCb::default()
        };
        let started = Instant::now();
        let rc = match how {
            Submit::OnWorker => submit(self.ctx, &mut cb),
            Submit::OffWorker => off_worker(|| submit(self.ctx, &mut cb)),
        };
        let submitted = Submitted {
            took: started.elapsed(),
        };
        if rc != 1 {
            return Err(if rc < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::other("io_submit took no request")
            });
        }
        let mut flight = InFlight {
            ctx: self.ctx,
            done: false,
        };
        let spun = match (wait, &self.ring) {
            (Wait::Spin(budget), Some(ring)) => ring.poll(&mut flight, budget).await?,
            _ => None,
        };
        let event = match spun {
            Some(event) => event,
            None => self.sleep_until_done(&mut flight).await?,
        };
        if event.res < 0 {
            return Err(io::Error::from_raw_os_error((-event.res) as i32));
        }
        if event.res as usize != len {
            return Err(io::Error::other(format!(
                "short direct write: {} of {len} bytes",
                event.res
            )));
        }
        Ok(submitted)
    }

    /// Waits for the eventfd, drains it, then reaps. Each step is one syscall, and none is spent
    /// before the kernel has signalled. (A completion that polling reaped leaves its signal behind:
    /// it reads as a stale readiness here, drained, and the loop waits again.)
    async fn sleep_until_done(&self, flight: &mut InFlight) -> io::Result<IoEvent> {
        loop {
            let mut ready = self.done.readable().await?;
            let drained = self.drain_signals();
            // Drained (or never signalled): the next signal is a new readiness event.
            ready.clear_ready();
            if let Err(e) = drained {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(e);
            }
            if let Some(event) = flight.reap(false)? {
                return Ok(event);
            }
        }
    }

    /// Reads and resets the eventfd's count of completions signalled (non-blocking: `WouldBlock`
    /// when none is).
    fn drain_signals(&self) -> io::Result<u64> {
        let mut count = [0u8; 8];
        // SAFETY: reads the eventfd's 8-byte counter into `count`.
        let n = unsafe {
            libc::read(
                self.done.get_ref().as_raw_fd(),
                count.as_mut_ptr().cast(),
                8,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(u64::from_ne_bytes(count))
    }
}

/// The completion ring of an AIO context: the kernel maps it into the process at the context's
/// address and appends each completion to it; `io_getevents` consumes from it. Its header
/// (`struct aio_ring` in fs/aio.c, the layout libaio also reads) is eight `u32`s; the kernel moves
/// `tail` past each new event, the consumer moves `head`.
struct CompletionRing {
    header: NonNull<AtomicU32>,
}

// SAFETY: only atomic loads through the pointer, which stays valid while the context lives (its
// owner, the DirectFile, holds both).
unsafe impl Send for CompletionRing {}
// SAFETY: as above.
unsafe impl Sync for CompletionRing {}

impl CompletionRing {
    const HEAD: usize = 2;
    const TAIL: usize = 3;
    const MAGIC: usize = 4;
    const INCOMPAT_FEATURES: usize = 6;
    const AIO_RING_MAGIC: u32 = 0xa10a_10a1;

    /// The ring of `ctx`, if it has the layout we know (else completions are only waited for).
    ///
    /// # Safety
    /// `ctx` is a live context from `io_setup`, and the ring is not used after it is destroyed.
    unsafe fn of(ctx: AioContext) -> Option<CompletionRing> {
        let header = NonNull::new(ctx as *mut AtomicU32)?;
        let ring = CompletionRing { header };
        let known = ring.load(Self::MAGIC) == Self::AIO_RING_MAGIC
            && ring.load(Self::INCOMPAT_FEATURES) == 0;
        known.then_some(ring)
    }

    fn load(&self, field: usize) -> u32 {
        // SAFETY: `field` < 8, within the header the kernel mapped (see `of`).
        unsafe { self.header.add(field).as_ref().load(Ordering::Acquire) }
    }

    /// Whether a completion waits to be reaped.
    fn has_completion(&self) -> bool {
        self.load(Self::HEAD) != self.load(Self::TAIL)
    }

    /// Polls for `flight`'s completion between the worker's other tasks, for up to `budget`;
    /// `None` when it has not completed by then.
    async fn poll(&self, flight: &mut InFlight, budget: Duration) -> io::Result<Option<IoEvent>> {
        let until = Instant::now() + budget;
        loop {
            if self.has_completion() {
                if let Some(event) = flight.reap(false)? {
                    return Ok(Some(event));
                }
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            requeue().await;
        }
    }
}

/// Lets every task queued on this worker run, then goes on. (`tokio::task::yield_now` waits longer:
/// until the worker runs dry or polls its sockets, up to 61 tasks later.)
async fn requeue() {
    let mut queued = false;
    std::future::poll_fn(|cx| {
        if queued {
            return Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Submits `cb`; returns how many requests the kernel took (1), or -1 with `errno` set.
fn submit(ctx: AioContext, cb: &mut IoCb) -> libc::c_long {
    // SAFETY: the kernel copies the iocb during the call; the buffer it points to outlives the
    // request: the caller's `InFlight` waits for its completion before the borrow ends, even when
    // its future is dropped.
    unsafe {
        let mut list = [cb as *mut IoCb];
        libc::syscall(
            libc::SYS_io_submit,
            ctx,
            1 as libc::c_long,
            list.as_mut_ptr(),
        )
    }
}

/// Runs `blocking` with the worker's other tasks handed to another thread first, where the
/// runtime has other threads to hand them to (a multi-thread one; tests also use single-threaded
/// runtimes, where it simply runs).
fn off_worker<T>(blocking: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(blocking)
        }
        _ => blocking(),
    }
}

/// Refuses a file whose direct I/O needs a coarser alignment than [`BLOCK`] (or none at all), as
/// far as the kernel says (`statx` with `STATX_DIOALIGN`, Linux 6.1+; older kernels say nothing
/// and the file is taken).
fn check_alignment(file: &File) -> io::Result<()> {
    // SAFETY: `statx` is plain data; all zeros is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: fills `stx` for the open descriptor (empty path with AT_EMPTY_PATH).
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(());
    }
    let fits = |align: u32| align != 0 && BLOCK.is_multiple_of(align as usize);
    if fits(stx.stx_dio_offset_align) && fits(stx.stx_dio_mem_align) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "direct I/O needs offsets aligned to {} and memory to {} bytes",
                stx.stx_dio_offset_align, stx.stx_dio_mem_align
            ),
        ))
    }
}

impl Drop for DirectFile {
    fn drop(&mut self) {
        destroy(self.ctx);
    }
}

fn destroy(ctx: AioContext) {
    // SAFETY: `ctx` came from io_setup and is destroyed once.
    unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
}

/// The one request in flight on a context; waits for it on drop if nobody reaped it.
struct InFlight {
    ctx: AioContext,
    done: bool,
}

impl InFlight {
    /// The completion, if there is one (`block`: wait for it).
    fn reap(&mut self, block: bool) -> io::Result<Option<IoEvent>> {
        let mut event = IoEvent::default();
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let timeout: *const libc::timespec = if block { std::ptr::null() } else { &zero };
        loop {
            // SAFETY: room for one event; `timeout` is null or points at `zero`.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    1 as libc::c_long,
                    1 as libc::c_long,
                    &mut event,
                    timeout,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 1 {
                self.done = true;
                return Ok(Some(event));
            }
            return Ok(None);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.reap(true);
        }
    }
}

/// The log's last partial block, kept to be rewritten with the next records (see the module
/// docs), and the direct file it goes to.
pub struct DirectTail {
    file: DirectFile,
    /// The segment's path, for errors.
    path: PathBuf,
    buf: AlignedBuf,
    /// File offset of the tail block (a multiple of [`BLOCK`]).
    block_at: u64,
    /// Record bytes at the start of `buf` that belong to the tail block.
    held: usize,
}

impl DirectTail {
    /// The tail of the segment at `path` whose records end at file offset `end`.
    pub fn open(path: &Path, end: u64) -> io::Result<DirectTail> {
        let file = DirectFile::open(path)?;
        let block_at = end - end % BLOCK as u64;
        let held = (end - block_at) as usize;
        let mut buf = AlignedBuf::with_capacity(TAIL_BUFFER_BYTES)?;
        // The records already in the tail block, read through the page cache (once per segment).
        File::open(path)?.read_exact_at(&mut buf.as_mut_slice()[..held], block_at)?;
        Ok(DirectTail {
            file,
            path: path.to_path_buf(),
            buf,
            block_at,
            held,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `records` after the tail (durably, submitted as `how` says) and keeps the new tail;
    /// returns the file offset the write reached (its last block's end) and how the submit went.
    pub async fn append(
        &mut self,
        records: &[u8],
        how: Submit,
        wait: Wait,
    ) -> io::Result<(u64, Submitted)> {
        let total = self.held + records.len();
        if round_up(total) > self.buf.capacity() {
            let mut bigger = AlignedBuf::with_capacity(total * 2)?;
            bigger.as_mut_slice()[..self.held].copy_from_slice(&self.buf.as_slice()[..self.held]);
            self.buf = bigger;
        }
        let padded = round_up(total);
        let slice = self.buf.as_mut_slice();
        slice[self.held..total].copy_from_slice(records);
        slice[total..padded].fill(0);
        let submitted = self
            .file
            .write_at(&self.buf, padded, self.block_at, how, wait)
            .await?;
        let reached = self.block_at + padded as u64;
        let whole = total - total % BLOCK;
        self.held = total - whole;
        self.block_at += whole as u64;
        if self.buf.capacity() > KEEP_BUFFER_BYTES {
            // A large batch grew it: keep the partial block in a buffer of the usual size.
            let mut usual = AlignedBuf::with_capacity(TAIL_BUFFER_BYTES)?;
            usual.as_mut_slice()[..self.held].copy_from_slice(&self.buf.as_slice()[whole..total]);
            self.buf = usual;
        } else {
            self.buf.as_mut_slice().copy_within(whole..total, 0);
        }
        Ok((reached, submitted))
    }
}

#[cfg(test)]
mod tests {
    use super::{
        off_worker, AioContext, AlignedBuf, CompletionRing, DirectFile, InFlight, Submit, Wait,
        BLOCK,
    };
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn off_worker_lets_the_workers_other_tasks_run_meanwhile() {
        // On the only worker: a task queued behind the blocking call runs while it blocks, which
        // it could not if the call held the worker.
        let on_worker = tokio::spawn(async {
            let ran = Arc::new(AtomicBool::new(false));
            let flag = ran.clone();
            tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
            off_worker(|| {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !ran.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                ran.load(Ordering::SeqCst)
            })
        });
        assert!(on_worker.await.unwrap(), "the queued task never ran");
    }

    /// A file of `blocks` blocks of zeros, open for direct writes (this machine's file system
    /// takes them).
    fn direct_file(dir: &Path, blocks: usize) -> (PathBuf, DirectFile) {
        let path = dir.join("segment");
        std::fs::write(&path, vec![0u8; blocks * BLOCK]).unwrap();
        let file = DirectFile::open(&path).expect("this file system takes direct I/O");
        (path, file)
    }

    /// A buffer of one block of `byte`.
    fn block_of(byte: u8) -> AlignedBuf {
        let mut buf = AlignedBuf::with_capacity(BLOCK).unwrap();
        buf.as_mut_slice().fill(byte);
        buf
    }

    /// What the eventfd holds now: completions signalled and not drained (0 when drained).
    fn undrained_signals(file: &DirectFile) -> u64 {
        file.drain_signals().unwrap_or(0)
    }

    #[tokio::test]
    async fn a_polled_write_is_reaped_from_the_ring_and_a_slept_one_from_the_eventfd() {
        let dir = tempfile::tempdir().unwrap();
        let (path, file) = direct_file(dir.path(), 3);
        assert!(
            file.ring.is_some(),
            "this kernel's AIO ring has the layout we read"
        );
        let ample = Wait::Spin(Duration::from_secs(10));
        file.write_at(&block_of(1), BLOCK, 0, Submit::OnWorker, ample)
            .await
            .unwrap();
        // Reaped by polling: the eventfd's signal is still there, nobody slept on it.
        assert_eq!(undrained_signals(&file), 1);
        // A sleeping wait after a polled one: the stale signal left behind must not end it early.
        file.write_at(&block_of(2), BLOCK, 0, Submit::OnWorker, ample)
            .await
            .unwrap();
        file.write_at(
            &block_of(3),
            BLOCK,
            BLOCK as u64,
            Submit::OnWorker,
            Wait::Sleep,
        )
        .await
        .unwrap();
        assert_eq!(
            undrained_signals(&file),
            0,
            "a sleeping wait drains the eventfd"
        );
        // A poll that runs out of time sleeps instead, and still sees its write complete.
        file.write_at(
            &block_of(4),
            BLOCK,
            2 * BLOCK as u64,
            Submit::OnWorker,
            Wait::Spin(Duration::ZERO),
        )
        .await
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let blocks: Vec<u8> = bytes.chunks(BLOCK).map(|b| b[0]).collect();
        assert_eq!(blocks, [2, 3, 4]);
        assert!(bytes.chunks(BLOCK).all(|b| b.iter().all(|&x| x == b[0])));
        assert!(
            !file.ring.as_ref().unwrap().has_completion(),
            "every completion was reaped"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn polling_lets_the_threads_other_tasks_run_and_sees_what_they_signal() {
        // A stand-in ring header (the kernel's layout) whose tail another task on this thread
        // moves, as the kernel would on a completion: the poll sees it only if it lets that task
        // run between its checks (a busy loop would spin out its whole budget). Seeing it, the
        // poll reaps, which fails here: the stand-in is no AIO context.
        let header: Arc<[AtomicU32; 8]> = Arc::new(Default::default());
        header[CompletionRing::MAGIC].store(CompletionRing::AIO_RING_MAGIC, Ordering::SeqCst);
        let ctx = header.as_ptr() as AioContext;
        // SAFETY: `header` outlives the ring and holds the eight fields it reads.
        let ring = unsafe { CompletionRing::of(ctx) }.expect("the stand-in has the layout");
        assert!(!ring.has_completion());
        let kernel = header.clone();
        tokio::spawn(async move { kernel[CompletionRing::TAIL].store(1, Ordering::SeqCst) });
        let mut flight = InFlight { ctx, done: true };
        let budget = Duration::from_secs(5);
        let started = Instant::now();
        let polled = ring.poll(&mut flight, budget).await;
        assert!(
            polled.is_err(),
            "the poll never saw the completion: {polled:?}"
        );
        assert!(started.elapsed() < budget);
    }

    #[tokio::test]
    async fn off_worker_runs_in_place_on_a_single_threaded_runtime() {
        assert_eq!(off_worker(|| 7), 7);
    }
}
