//! Concurrent upserts become one script call.
//!
//! A request does not talk to Redis itself: it queues its positions with a oneshot and waits. One
//! task per [`super::RedisLive`] takes everything queued (up to [`MAX_FLUSH`] positions), sends it
//! as one flush ([`super::upsert`]: one `EVALSHA` per [`CHUNK`] positions, per slot in a cluster,
//! all written back to back on the multiplexed connection), hands each waiter its slice of the
//! results, and only then looks at the queue again. While a flush is in flight the next one
//! accumulates, so under load each round trip carries every request that arrived during the
//! previous one — the batch size adapts to the load with no timer and no added latency when idle
//! (a lone request is sent at once).
//!
//! Cost of the design: one flush in flight at a time per instance. With Redis and the service on
//! one core that is what the core can do anyway; with Redis elsewhere, the round trip is spread over
//! every request in the flush.

use super::{Op, RedisLiveError, Shared, Upsert};
use crate::domain::Position;
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

/// The batcher task: runs until every [`super::RedisLive`] handle is dropped.
pub async fn run(shared: Arc<Shared>, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut batch: Vec<Position> = Vec::new();
    let mut waiters: Vec<(usize, Reply)> = Vec::new();
    while let Some(first) = queue.recv().await {
        let mut job = Some(first);
        while let Some(Job {
            mut positions,
            done,
        }) = job.take()
        {
            waiters.push((positions.len(), done));
            batch.append(&mut positions);
            if batch.len() < MAX_FLUSH {
                job = queue.try_recv().ok();
            }
        }
        let started = Instant::now();
        let result = shared.flush(&batch).await;
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
                for (n, done) in waiters.drain(..) {
                    let _ = done.send(Ok(results.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                for (_, done) in waiters.drain(..) {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
        batch.clear();
    }
}
