//! [`PositionStream`]: the server's write path into the Redis Stream `positions:stream`, with group
//! commit.
//!
//! Why group commit: one `XADD` per request would cost a Redis round trip and a stream entry (with
//! its ~30 bytes of overhead and its own acknowledgement by the worker) per request, so at 50,000
//! single-position requests per second Redis and the worker would spend their time on entries, not
//! positions. Instead requests hand their encoded batch to one background task, which writes
//! everything queued since its previous `XADD` as **one** entry, then answers every waiter. One
//! `XADD` is in flight at a time; the next starts when the previous returns, so the busier the
//! server, the bigger the entries (up to [`MAX_ENTRY_BYTES`]), and an idle server still answers a
//! lone request after one round trip. A caller gets `Ok` only after Redis accepted the entry; a
//! Redis error (down, timeout, out of memory) reaches every waiter of that entry as `Err`, and the
//! caller answers 503 so the client retries.
//!
//! # Entry format
//!
//! One field, `d`: a format byte (`1`), then per batch `len u32 LE | batch` where `batch` is the
//! write-ahead log's encoding ([`crate::wal::codec::encode_batch`]: receipt time, count,
//! positions). The worker decodes it with [`decode_entry`].
//!
//! # Sizing the stream (`MAXLEN ~ max_len`)
//!
//! The bound counts **entries, not positions**: Redis 7 cannot trim a stream by bytes. A position
//! encodes to about 40 bytes (a 10-character driver id, speed and heading); an entry costs its
//! positions plus ~20 bytes of framing and ~30 bytes of stream overhead. How many positions an
//! entry holds depends on the load: one request's batch on an idle server, everything that arrived
//! during one `XADD` round trip on a busy one (at 50,000 positions/s in 1,000-position batches,
//! about 50 entries/s of ~40 KB).
//!
//! Redis memory is therefore what bounds an outage of PostgreSQL: at 50,000 positions/s the stream
//! grows by about 2 MB/s, **7 GB per hour** of PostgreSQL downtime. The default
//! [`DEFAULT_STREAM_MAX_LEN`] (1,000,000 entries) is about 5.5 hours at that rate (~40 GB), and
//! 1,000,000 positions (~60–90 MB) when every entry is a single position. Size `max_len` as
//! *Redis memory you can spare ÷ bytes per entry at your load*, and give Redis `maxmemory` with
//! `noeviction` so a full Redis refuses appends (503s) rather than evicting keys.
//!
//! Plainly: if PostgreSQL is down longer than the stream holds, `XADD` trims the **oldest entries,
//! whether or not the worker has written them**. Those positions are lost from history (the live
//! view is unaffected); the worker logs and counts trimmed entries it had claimed
//! (`history_worker_lost_entries_total`), but entries trimmed before any worker read them leave no
//! trace except a drop in `history_stream_lag_entries`.

use super::{FIELD, STREAM_KEY};
use crate::backend::redis::RedisConn;
use crate::metrics::Metrics;
use crate::wal::codec::{batch_len, decode_batch, encode_batch, DecodeError};
use crate::wal::Batch;
use metrics::Counter;
use redis::{ErrorKind, RedisError};
use tokio::sync::{mpsc, oneshot};

/// Default `MAXLEN ~` of the stream, in entries (see the module docs for sizing).
pub const DEFAULT_STREAM_MAX_LEN: usize = 1_000_000;
/// An entry stops taking queued batches once it is this big (Redis handles big values well, but a
/// multi-megabyte `XADD` delays every waiter in it).
pub const MAX_ENTRY_BYTES: usize = 1 << 20;
/// The first byte of every entry.
const FORMAT_V1: u8 = 1;

/// The producer side of the stream. Cheap to clone; clones share the background task, which ends
/// when the last clone is dropped.
#[derive(Clone)]
pub struct PositionStream {
    queue: mpsc::UnboundedSender<Queued>,
}

/// One caller's batch, framed, and where its answer goes.
struct Queued {
    framed: Vec<u8>,
    done: oneshot::Sender<Result<(), RedisError>>,
}

struct StreamMetrics {
    batches: Counter,
    entries: Counter,
    errors: Counter,
}

impl PositionStream {
    /// Starts the background writer (must be called inside a Tokio runtime). `conn` is the
    /// instance's shared Redis connection; `max_len` the stream's `MAXLEN ~` in entries.
    pub fn new(conn: RedisConn, max_len: usize, metrics: &Metrics) -> PositionStream {
        let (queue, receiver) = mpsc::unbounded_channel();
        metrics.describe_counter(
            "history_stream_batches_total",
            "Position batches appended to the history stream (acknowledged by Redis).",
        );
        metrics.describe_counter(
            "history_stream_entries_total",
            "XADDs to the history stream (each holds every batch queued meanwhile).",
        );
        metrics.describe_counter(
            "history_stream_errors_total",
            "XADDs to the history stream that failed (their batches were answered with an error).",
        );
        let stream_metrics = StreamMetrics {
            batches: metrics.counter("history_stream_batches_total", &[]),
            entries: metrics.counter("history_stream_entries_total", &[]),
            errors: metrics.counter("history_stream_errors_total", &[]),
        };
        tokio::spawn(flush_loop(conn, max_len.max(1), receiver, stream_metrics));
        PositionStream { queue }
    }

    /// Appends `batch` to the stream; `Ok` once Redis holds it. Concurrent calls share one `XADD`.
    pub async fn append(&self, batch: &Batch) -> Result<(), RedisError> {
        let mut framed = Vec::with_capacity(4 + batch_len(batch));
        framed.extend_from_slice(&(batch_len(batch) as u32).to_le_bytes());
        encode_batch(batch, &mut framed);
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Queued { framed, done })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> RedisError {
    RedisError::from((ErrorKind::Client, "the history stream writer has stopped"))
}

/// Writes everything queued as one entry, answers its waiters, repeats; ends when every
/// [`PositionStream`] is gone.
async fn flush_loop(
    mut conn: RedisConn,
    max_len: usize,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    metrics: StreamMetrics,
) {
    let mut entry = Vec::new();
    let mut waiters = Vec::new();
    while let Some(first) = queue.recv().await {
        entry.clear();
        entry.push(FORMAT_V1);
        let mut next = Some(first);
        while let Some(queued) = next.take() {
            entry.extend_from_slice(&queued.framed);
            waiters.push(queued.done);
            if entry.len() < MAX_ENTRY_BYTES {
                next = queue.try_recv().ok();
            }
        }
        let result: Result<redis::Value, RedisError> = redis::cmd("XADD")
            .arg(STREAM_KEY)
            .arg("MAXLEN")
            .arg("~")
            .arg(max_len)
            .arg("*")
            .arg(FIELD)
            .arg(&entry)
            .query_async(&mut conn)
            .await;
        let result = result.map(|_| ());
        metrics.entries.increment(1);
        match &result {
            Ok(()) => metrics.batches.increment(waiters.len() as u64),
            Err(error) => {
                metrics.errors.increment(1);
                tracing::warn!(%error, batches = waiters.len(), "history stream: XADD failed");
            }
        }
        for waiter in waiters.drain(..) {
            let _ = waiter.send(result.clone()); // a caller that gave up does not care
        }
    }
}

/// Why an entry could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("empty entry")]
    Empty,
    #[error("unknown entry format {0}")]
    UnknownFormat(u8),
    #[error("batch length runs past the end of the entry")]
    Truncated,
    #[error("batch: {0}")]
    Batch(#[from] DecodeError),
}

/// Encodes batches as one entry, exactly as [`PositionStream`] writes them (tests, benchmarks).
pub fn encode_entry(batches: &[Batch]) -> Vec<u8> {
    let mut entry = vec![FORMAT_V1];
    for batch in batches {
        entry.extend_from_slice(&(batch_len(batch) as u32).to_le_bytes());
        encode_batch(batch, &mut entry);
    }
    entry
}

/// The batches of one entry, in the order they were appended.
pub fn decode_entry(bytes: &[u8]) -> Result<Vec<Batch>, EntryError> {
    let (&format, mut rest) = bytes.split_first().ok_or(EntryError::Empty)?;
    if format != FORMAT_V1 {
        return Err(EntryError::UnknownFormat(format));
    }
    let mut batches = Vec::new();
    while !rest.is_empty() {
        let (len, after) = rest.split_at_checked(4).ok_or(EntryError::Truncated)?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (batch, after) = after.split_at_checked(len).ok_or(EntryError::Truncated)?;
        batches.push(decode_batch(batch)?);
        rest = after;
    }
    Ok(batches)
}
