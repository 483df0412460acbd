//! Concurrent upserts become one script call.
//!
//! A request does not talk to Redis itself: it queues its positions with a oneshot and waits. One
//! task per [`super::RedisLive`] takes everything queued (up to [`MAX_FLUSH`] positions), sends it
//! as one flush ([`super::upsert`]: one `EVALSHA` per [`CHUNK`] positions, per slot in a cluster,
//! all written back to back on the multiplexed connection) and hands each waiter its slice of the
//! results. While a flush is in flight the next one accumulates, so under load each round trip
//! carries every request that arrived during the previous one — the batch size adapts to the load
//! with no timer and no added latency when idle (a lone request is sent at once).
//!
//! ## Two flushes in flight (one server)
//!
//! With one flush at a time, Redis idles while the instance reads a flush's replies, answers its
//! waiters and encodes the next one: for 1,000-position batches with Redis on its own core that
//! was about a tenth of Redis' time. So on a single server a second flush is sent while the first
//! is in flight, once at least a [`CHUNK`] is waiting (smaller groups keep waiting, as before, so
//! single-position requests still share script calls). Both go down the same connection, so Redis
//! runs them in order; and the compare-and-set on timestamps makes the result independent of the
//! order anyway. In a cluster an upsert is two steps ([`super::upsert`]), and two flushes could
//! interleave them for one driver, so a cluster keeps one flush at a time.

use super::{Layout, Op, RedisLiveError, Shared, Upsert};
use crate::domain::Position;
use futures_util::stream::{FuturesOrdered, StreamExt};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Positions per script call: long enough to amortize the call, short enough that a script
/// (which blocks Redis while it runs) stays around a millisecond.
pub const CHUNK: usize = 256;
/// Positions taken from the queue for one flush.
pub const MAX_FLUSH: usize = 16 * CHUNK;

/// Where one request's results go.
pub type Reply = oneshot::Sender<Result<Vec<Upsert>, RedisLiveError>>;

/// One request's positions and where its results go.
pub struct Job {
    pub positions: Vec<Position>,
    pub done: Reply,
}

/// Positions taken from the queue, not yet sent.
#[derive(Default)]
struct Pending {
    batch: Vec<Position>,
    waiters: Vec<(usize, Reply)>,
}

impl Pending {
    fn add(&mut self, mut job: Job) {
        self.waiters.push((job.positions.len(), job.done));
        self.batch.append(&mut job.positions);
    }

    /// Takes whatever is queued, up to a full flush.
    fn fill(&mut self, queue: &mut mpsc::UnboundedReceiver<Job>) {
        while self.batch.len() < MAX_FLUSH {
            match queue.try_recv() {
                Ok(job) => self.add(job),
                Err(_) => break,
            }
        }
    }
}

/// How many flushes may be in flight at once (see the module docs).
fn depth(layout: Layout) -> usize {
    match layout {
        Layout::Standalone => 2,
        Layout::Cluster => 1,
    }
}

/// The batcher task: runs until every [`super::RedisLive`] handle is dropped and everything queued
/// has been answered.
pub async fn run(shared: Arc<Shared>, mut queue: mpsc::UnboundedReceiver<Job>) {
    let depth = depth(shared.layout);
    let mut in_flight = FuturesOrdered::new();
    let mut pending = Pending::default();
    let mut open = true;
    loop {
        pending.fill(&mut queue);
        let send = !pending.batch.is_empty()
            && (in_flight.is_empty() || (in_flight.len() < depth && pending.batch.len() >= CHUNK));
        if send {
            in_flight.push_back(flush(shared.clone(), std::mem::take(&mut pending)));
        }
        tokio::select! {
            // Flushes first: a new one is polled (its commands written) right away.
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            job = queue.recv(), if open && pending.batch.len() < MAX_FLUSH => match job {
                Some(job) => pending.add(job),
                None => open = false,
            },
            else => {
                if pending.batch.is_empty() {
                    break;
                }
            }
        }
    }
}

/// Sends one flush and answers its waiters.
async fn flush(shared: Arc<Shared>, pending: Pending) {
    let started = Instant::now();
    let result = shared.flush(&pending.batch).await;
    match &result {
        Ok(_) => shared
            .metrics
            .geoadd
            .record(started.elapsed().as_secs_f64()),
        Err(_) => shared.metrics.error(Op::Upsert),
    }
    match result {
        Ok(results) => {
            let mut results = results.into_iter();
            for (n, done) in pending.waiters {
                let _ = done.send(Ok(results.by_ref().take(n).collect()));
            }
        }
        Err(e) => {
            for (_, done) in pending.waiters {
                let _ = done.send(Err(e.clone()));
            }
        }
    }
}
