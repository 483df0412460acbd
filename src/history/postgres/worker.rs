//! The history worker: moves positions from the Redis Stream into PostgreSQL, at least once per
//! entry and exactly once per row.
//!
//! Runs as `fleettracker worker` ([`run`]) or inside `serve --embedded-worker` ([`run_worker`]).
//! Any number of workers may run: they share the consumer group [`GROUP`], each under a name of its
//! own (host, pid, random), so Redis hands every entry to one of them.
//!
//! # The loop
//!
//! 1. **Reclaim** ([`XAUTOCLAIM`]): entries another consumer read but has not acknowledged for
//!    longer than `claim_idle` (30 s by default; it crashed or hangs) become ours. Scanned every
//!    `claim_idle / 2`, and before new entries, so a crash delays its entries by about
//!    `claim_idle` and never loses them.
//! 2. **Read** (`XREADGROUP … BLOCK 1000 … >`): new entries, as many as make about `batch_size`
//!    positions (the count adapts to the positions per entry seen so far).
//! 3. **Write** ([`PgWriter`]): decode, dedupe, `COPY`, `INSERT … ON CONFLICT`, commit.
//! 4. **Acknowledge** (`XACK`) — only after the commit. A crash between 3 and 4 redelivers the
//!    entries, and the primary key makes the second write a no-op.
//!
//! While PostgreSQL fails (down, restarting, a lock timeout) the worker keeps the **same** entries
//! and retries them with exponential backoff (100 ms doubling to 5 s), reconnecting when the
//! connection died; it reads nothing new meanwhile, so positions wait in the stream (the lag
//! grows, `history_worker_errors_total` counts the failures). It also re-claims its own entries
//! every `claim_idle / 3` (`XCLAIM … JUSTID`, which resets their idle time) so another worker does
//! not take them over while it is merely waiting. The worker cannot tell a transient error from a
//! permanent one, so it retries every error; a batch that can never be written (none is known:
//! positions are validated before they are accepted) would show as errors that never stop and a
//! growing lag, and is the thing to alert on.
//!
//! # Undecodable entries
//!
//! An entry that is not a well-formed batch (written by a newer or broken producer, or by hand)
//! will never decode, so retrying it would wedge the pipeline behind it forever. The worker logs
//! it with its id, counts it (`history_worker_undecodable_total`), copies it with its id and the
//! error to the dead-letter stream [`DEAD_LETTER_KEY`] (bounded at ~10,000 entries) for
//! inspection, and acknowledges it together with the rest of its batch. Nothing is dropped
//! silently, and nothing blocks the entries after it.
//!
//! Entries trimmed from the stream while pending (PostgreSQL down longer than the stream holds,
//! see [`super::stream`]) are reported by `XAUTOCLAIM` as deleted: logged and counted in
//! `history_worker_lost_entries_total`.
//!
//! # Shutdown
//!
//! On cancellation the worker finishes the batch in hand (commit and `XACK`) and returns. If
//! PostgreSQL is down at that moment it gives up the batch unacknowledged; it stays pending and
//! another worker reclaims it after `claim_idle`.
//!
//! # Retention
//!
//! When [`WorkerSettings::retention`] is set the worker also runs
//! [`super::schema::apply_retention`] every `every` on a connection of its own; a session advisory
//! lock makes one worker do it when several run. Keeping it in the worker means a deployment with
//! only stateless servers needs no extra cron job.
//!
//! # Metrics
//!
//! `history_stream_lag_entries` (entries not yet acknowledged by the group: `XINFO GROUPS` lag +
//! pending), `history_stream_length` (`XLEN`), `history_worker_positions_total` (positions
//! committed, after dedupe within a batch), `history_worker_errors_total`,
//! `history_worker_commit_seconds` (one write: `COPY` + `INSERT` + commit),
//! `history_worker_undecodable_total`, `history_worker_lost_entries_total`.
//!
//! [`XAUTOCLAIM`]: https://redis.io/docs/latest/commands/xautoclaim/

use super::schema::{self, RetentionSummary};
use super::stream::decode_entry;
use super::writer::{dedupe, PgWriter, StoredRow};
use super::{pg_connect, DEAD_LETTER_KEY, FIELD, GROUP, STREAM_KEY};
use crate::backend::redis::{RedisConn, RedisTarget};
use crate::config::WorkerConfig;
use crate::domain::now_micros;
use crate::metrics::Metrics;
use anyhow::Context;
use metrics::{Counter, Gauge, Histogram};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisError, RedisResult, Value};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Default positions per transaction.
pub const DEFAULT_BATCH_SIZE: usize = 20_000;
/// Default idle time after which another consumer's pending entries are reclaimed.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);
/// Most entries asked for in one read.
const MAX_COUNT: usize = 10_000;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How often the stream gauges are refreshed.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Consumers with nothing pending and idle this long are removed from the group (crashed
/// workers' names would otherwise pile up).
const STALE_CONSUMER: Duration = Duration::from_secs(3600);
const DEAD_LETTER_MAX_LEN: usize = 10_000;

/// Everything the worker needs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub redis: RedisTarget,
    pub postgres_url: String,
    /// Positions per transaction the worker aims for.
    pub batch_size: usize,
    /// Another consumer's entries pending longer than this are reclaimed.
    pub claim_idle: Duration,
    /// How long one read waits for new entries.
    pub block: Duration,
    /// This worker's consumer name in the group; unique per process by default.
    pub consumer: String,
    /// Run retention periodically (see the module docs); `None` leaves it to someone else.
    pub retention: Option<RetentionSettings>,
}

impl WorkerSettings {
    /// Defaults for everything but where Redis and PostgreSQL are.
    pub fn new(redis: RedisTarget, postgres_url: impl Into<String>) -> WorkerSettings {
        WorkerSettings {
            redis,
            postgres_url: postgres_url.into(),
            batch_size: DEFAULT_BATCH_SIZE,
            claim_idle: DEFAULT_CLAIM_IDLE,
            block: Duration::from_secs(1),
            consumer: unique_consumer_name(),
            retention: None,
        }
    }
}

/// Retention as the worker runs it.
#[derive(Debug, Clone)]
pub struct RetentionSettings {
    pub hot: Duration,
    pub cold: Duration,
    pub cold_simplify_m: f64,
    /// How often it runs (cheap when nothing is due).
    pub every: Duration,
}

impl RetentionSettings {
    /// The retention the flags describe, run every `every`.
    pub fn new(args: &crate::config::RetentionArgs, every: Duration) -> RetentionSettings {
        RetentionSettings {
            hot: args.history_retention,
            cold: args.cold_retention,
            cold_simplify_m: args.cold_simplify_m,
            every,
        }
    }
}

/// `host-pid-random`: unique per process, readable in `XINFO CONSUMERS`.
pub fn unique_consumer_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".to_string());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

struct WorkerMetrics {
    lag: Gauge,
    length: Gauge,
    positions: Counter,
    errors: Counter,
    commit: Histogram,
    undecodable: Counter,
    lost: Counter,
}

impl WorkerMetrics {
    fn new(metrics: &Metrics) -> WorkerMetrics {
        metrics.describe_gauge(
            "history_stream_lag_entries",
            "Stream entries the history writers have not acknowledged yet (unread + pending).",
        );
        metrics.describe_gauge(
            "history_stream_length",
            "Entries in the history stream (XLEN).",
        );
        metrics.describe_counter(
            "history_worker_positions_total",
            "Positions committed to PostgreSQL by this worker.",
        );
        metrics.describe_counter(
            "history_worker_errors_total",
            "Failed Redis or PostgreSQL operations of the history worker (each retried).",
        );
        metrics.describe_histogram(
            "history_worker_commit_seconds",
            "Time to write one batch to PostgreSQL (COPY, INSERT, commit).",
        );
        metrics.describe_counter(
            "history_worker_undecodable_total",
            "Stream entries that could not be decoded (moved to the dead-letter stream).",
        );
        metrics.describe_counter(
            "history_worker_lost_entries_total",
            "Pending stream entries trimmed before they were written (stream too short).",
        );
        WorkerMetrics {
            lag: metrics.gauge("history_stream_lag_entries", &[]),
            length: metrics.gauge("history_stream_length", &[]),
            positions: metrics.counter("history_worker_positions_total", &[]),
            errors: metrics.counter("history_worker_errors_total", &[]),
            commit: metrics.histogram("history_worker_commit_seconds", &[]),
            undecodable: metrics.counter("history_worker_undecodable_total", &[]),
            lost: metrics.counter("history_worker_lost_entries_total", &[]),
        }
    }
}

/// `fleettracker worker`: runs [`run_worker`] until SIGINT or SIGTERM.
pub async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let redis_url = config
        .backend
        .redis_url
        .clone()
        .context("--redis-url (FLEET_REDIS_URL) is required")?;
    let postgres_url = config
        .backend
        .postgres_url
        .clone()
        .context("--postgres-url (FLEET_POSTGRES_URL) is required")?;
    let mut settings = WorkerSettings::new(
        RedisTarget::parse(&redis_url, config.backend.redis_cluster),
        postgres_url,
    );
    settings.batch_size = config.batch_size;
    settings.claim_idle = config.claim_idle;
    settings.retention = (!config.no_retention)
        .then(|| RetentionSettings::new(&config.retention, config.retention_interval));
    let shutdown = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("history worker: stopping after the current batch");
        stop.cancel();
    });
    let metrics = Metrics::for_worker();
    metrics.spawn_upkeep();
    if let Some(listen) = config.metrics_listen {
        let address = super::exporter::start(listen, metrics.clone(), shutdown.clone()).await?;
        println!("fleettracker worker metrics on http://{address}/metrics");
    }
    tracing::info!(consumer = %settings.consumer, "history worker starting");
    run_worker(settings, metrics, shutdown).await
}

/// Runs the worker until `shutdown` is cancelled (see the module docs). Errors only if it cannot
/// start for a reason retrying will not fix (an invalid URL); outages are waited out.
pub async fn run_worker(
    settings: WorkerSettings,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let _: tokio_postgres::Config = settings
        .postgres_url
        .parse()
        .context("invalid --postgres-url")?;
    let metrics = WorkerMetrics::new(&metrics);
    let mut backoff = Backoff::default();
    // The worker's own connection: a blocking XREADGROUP holds up every command queued behind it
    // on a multiplexed connection, so it must not share the server's.
    let redis = loop {
        match RedisConn::connect(&settings.redis).await {
            Ok(conn) => break conn,
            Err(error) => {
                metrics.errors.increment(1);
                tracing::warn!(%error, "history worker: cannot connect to Redis; retrying");
                if !backoff.sleep(&shutdown).await {
                    return Ok(());
                }
            }
        }
    };
    let retention = settings.retention.clone().map(|r| {
        tokio::spawn(retention_loop(
            settings.postgres_url.clone(),
            r,
            shutdown.clone(),
        ))
    });
    let mut worker = Worker {
        settings,
        redis,
        writer: None,
        metrics,
        count: 100,
        claim_cursor: "0-0".to_string(),
        next_claim: Instant::now(),
        group_ready: false,
        next_stats: Instant::now(),
        next_cleanup: Instant::now(),
    };
    worker.run(&shutdown).await;
    if let Some(task) = retention {
        let _ = task.await;
    }
    Ok(())
}

struct Worker {
    settings: WorkerSettings,
    redis: RedisConn,
    writer: Option<PgWriter>,
    metrics: WorkerMetrics,
    /// Entries to ask for per read.
    count: usize,
    claim_cursor: String,
    next_claim: Instant,
    group_ready: bool,
    next_stats: Instant,
    next_cleanup: Instant,
}

/// One stream entry as read.
struct Entry {
    id: String,
    data: Option<Vec<u8>>,
}

impl Worker {
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            if Instant::now() >= self.next_stats {
                self.refresh_stats().await;
            }
            let entries = match self.next_entries().await {
                Ok(entries) => {
                    backoff.reset();
                    entries
                }
                Err(error) => {
                    self.metrics.errors.increment(1);
                    tracing::warn!(%error, "history worker: cannot read the stream; retrying");
                    self.group_ready = false;
                    backoff.sleep(shutdown).await;
                    continue;
                }
            };
            if !entries.is_empty() {
                self.process(entries, shutdown).await;
            }
        }
    }

    /// Reclaimed entries when there are any, else new ones (waiting up to `block`).
    async fn next_entries(&mut self) -> RedisResult<Vec<Entry>> {
        if !self.group_ready {
            self.ensure_group().await?;
        }
        if Instant::now() >= self.next_claim {
            let claimed = self.autoclaim().await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(self.count)
            .arg("BLOCK")
            .arg(self.settings.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(STREAM_KEY)
            .arg(">")
            .query_async(&mut self.redis)
            .await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).map(entry).collect())
            .unwrap_or_default())
    }

    async fn ensure_group(&mut self) -> RedisResult<()> {
        let created: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM_KEY)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.redis)
            .await;
        match created {
            Err(error) if error.code() != Some("BUSYGROUP") => Err(error),
            _ => {
                self.group_ready = true;
                Ok(())
            }
        }
    }

    /// One `XAUTOCLAIM` step of the scan over the group's pending entries.
    async fn autoclaim(&mut self) -> RedisResult<Vec<Entry>> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(STREAM_KEY)
            .arg(GROUP)
            .arg(&self.settings.consumer)
            .arg(self.settings.claim_idle.as_millis() as u64)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(self.count)
            .query_async(&mut self.redis)
            .await?;
        if !reply.deleted_ids.is_empty() {
            self.metrics.lost.increment(reply.deleted_ids.len() as u64);
            tracing::error!(
                entries = reply.deleted_ids.len(),
                first = %reply.deleted_ids[0],
                "history worker: pending entries were trimmed from the stream before they were \
                 written (PostgreSQL was down longer than the stream holds); their positions are \
                 lost from history"
            );
        }
        if reply.next_stream_id == "0-0" {
            self.claim_cursor = "0-0".to_string();
            self.next_claim = Instant::now() + self.settings.claim_idle / 2;
        } else {
            self.claim_cursor = reply.next_stream_id;
        }
        if !reply.claimed.is_empty() {
            tracing::info!(
                entries = reply.claimed.len(),
                "history worker: reclaimed entries another consumer left pending"
            );
        }
        Ok(reply.claimed.into_iter().map(entry).collect())
    }

    /// Decodes, writes, dead-letters and acknowledges one read's entries.
    async fn process(&mut self, entries: Vec<Entry>, shutdown: &CancellationToken) {
        let mut rows = Vec::new();
        let mut dead = Vec::new();
        for entry in &entries {
            let decoded = match &entry.data {
                Some(bytes) => decode_entry(bytes).map_err(|e| e.to_string()),
                None => Err(format!("no field `{FIELD}`")),
            };
            match decoded {
                Ok(batches) => {
                    for batch in batches {
                        rows.extend(
                            batch
                                .positions
                                .iter()
                                .map(|p| StoredRow::new(p, batch.received_at)),
                        );
                    }
                }
                Err(error) => {
                    self.metrics.undecodable.increment(1);
                    tracing::error!(entry = %entry.id, %error,
                        "history worker: undecodable stream entry; moving it to {DEAD_LETTER_KEY}");
                    dead.push((entry, error));
                }
            }
        }
        let positions_read = rows.len();
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let rows = dedupe(rows);
        if !self.write(&rows, &ids, shutdown).await {
            return;
        }
        for (entry, error) in dead {
            if !self.dead_letter(entry, &error, shutdown).await {
                return;
            }
        }
        self.ack(&ids, shutdown).await;
        self.adapt_count(entries.len(), positions_read);
    }

    /// Writes `rows` until committed; false when given up at shutdown.
    async fn write(
        &mut self,
        rows: &[StoredRow],
        ids: &[&str],
        shutdown: &CancellationToken,
    ) -> bool {
        let mut backoff = Backoff::default();
        let mut touched = Instant::now();
        loop {
            let result = match self.writer.as_mut().filter(|w| !w.is_closed()) {
                Some(writer) => {
                    let started = Instant::now();
                    let result = writer.write(rows).await;
                    if result.is_ok() {
                        self.metrics.commit.record(started.elapsed().as_secs_f64());
                    }
                    result
                }
                None => {
                    self.writer = None;
                    match connect_writer(&self.settings.postgres_url).await {
                        Ok(writer) => {
                            tracing::info!("history worker: connected to PostgreSQL");
                            self.writer = Some(writer);
                            continue;
                        }
                        Err(error) => Err(error),
                    }
                }
            };
            match result {
                Ok(()) => {
                    self.metrics.positions.increment(rows.len() as u64);
                    return true;
                }
                Err(error) => {
                    self.metrics.errors.increment(1);
                    tracing::warn!(error = %format!("{error:#}"), positions = rows.len(),
                        "history worker: PostgreSQL write failed; retrying the same entries");
                }
            }
            if !backoff.sleep(shutdown).await {
                tracing::warn!(
                    entries = ids.len(),
                    "history worker: stopping with a batch unwritten; it stays pending"
                );
                return false;
            }
            if Instant::now() >= self.next_stats {
                self.refresh_stats().await;
            }
            if touched.elapsed() >= self.settings.claim_idle / 3 {
                self.keep_claimed(ids).await;
                touched = Instant::now();
            }
        }
    }

    /// Resets the idle time of our pending entries, so nobody reclaims them while we retry.
    async fn keep_claimed(&mut self, ids: &[&str]) {
        let result: RedisResult<Value> = redis::cmd("XCLAIM")
            .arg(STREAM_KEY)
            .arg(GROUP)
            .arg(&self.settings.consumer)
            .arg(0)
            .arg(ids)
            .arg("JUSTID")
            .query_async(&mut self.redis)
            .await;
        if let Err(error) = result {
            self.metrics.errors.increment(1);
            tracing::warn!(%error, "history worker: cannot refresh the claim on pending entries");
        }
    }

    async fn dead_letter(
        &mut self,
        entry: &Entry,
        error: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut backoff = Backoff::default();
        loop {
            let result: RedisResult<Value> = redis::cmd("XADD")
                .arg(DEAD_LETTER_KEY)
                .arg("MAXLEN")
                .arg("~")
                .arg(DEAD_LETTER_MAX_LEN)
                .arg("*")
                .arg("id")
                .arg(&entry.id)
                .arg("error")
                .arg(error)
                .arg(FIELD)
                .arg(entry.data.as_deref().unwrap_or_default())
                .query_async(&mut self.redis)
                .await;
            match result {
                Ok(_) => return true,
                Err(e) => self.redis_failed("XADD to the dead-letter stream", &e),
            }
            if !backoff.sleep(shutdown).await {
                return false;
            }
        }
    }

    /// Acknowledges `ids` (after their commit), retrying through a Redis outage.
    async fn ack(&mut self, ids: &[&str], shutdown: &CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let result: RedisResult<i64> = redis::cmd("XACK")
                .arg(STREAM_KEY)
                .arg(GROUP)
                .arg(ids)
                .query_async(&mut self.redis)
                .await;
            match result {
                Ok(_) => return,
                Err(e) => self.redis_failed("XACK", &e),
            }
            if !backoff.sleep(shutdown).await {
                // Committed but not acknowledged: redelivered later, and a no-op then.
                return;
            }
        }
    }

    fn redis_failed(&self, what: &str, error: &RedisError) {
        self.metrics.errors.increment(1);
        tracing::warn!(%error, "history worker: {what} failed; retrying");
    }

    /// Sizes the next read so it holds about `batch_size` positions.
    fn adapt_count(&mut self, entries: usize, positions: usize) {
        if entries == 0 {
            return;
        }
        let per_entry = (positions / entries).max(1);
        self.count = (self.settings.batch_size / per_entry).clamp(1, MAX_COUNT);
    }

    /// Refreshes the lag and length gauges; now and then drops stale consumers.
    async fn refresh_stats(&mut self) {
        self.next_stats = Instant::now() + STATS_INTERVAL;
        let groups: RedisResult<Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(STREAM_KEY)
            .query_async(&mut self.redis)
            .await;
        let length: RedisResult<i64> = redis::cmd("XLEN")
            .arg(STREAM_KEY)
            .query_async(&mut self.redis)
            .await;
        if let Ok(length) = length {
            self.metrics.length.set(length as f64);
        }
        if let Ok(groups) = groups {
            if let Some(info) = find_record(&groups, "name", GROUP) {
                let pending = field_i64(info, "pending").unwrap_or(0);
                // `lag` is nil when Redis cannot tell (entries deleted mid-stream); count pending.
                let lag = field_i64(info, "lag").unwrap_or(0);
                self.metrics.lag.set((pending + lag) as f64);
            }
        }
        if Instant::now() >= self.next_cleanup {
            self.next_cleanup = Instant::now() + STALE_CONSUMER / 4;
            self.drop_stale_consumers().await;
        }
    }

    async fn drop_stale_consumers(&mut self) {
        let consumers: RedisResult<Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(STREAM_KEY)
            .arg(GROUP)
            .query_async(&mut self.redis)
            .await;
        let Ok(Value::Array(consumers)) = consumers else {
            return;
        };
        for consumer in &consumers {
            let name = field_str(consumer, "name");
            let idle = field_i64(consumer, "idle").unwrap_or(0);
            let pending = field_i64(consumer, "pending").unwrap_or(1);
            if let Some(name) = name {
                if pending == 0
                    && idle as u128 > STALE_CONSUMER.as_millis()
                    && name != self.settings.consumer
                {
                    let _: RedisResult<i64> = redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(STREAM_KEY)
                        .arg(GROUP)
                        .arg(&name)
                        .query_async(&mut self.redis)
                        .await;
                }
            }
        }
    }
}

fn entry(id: StreamId) -> Entry {
    let data = match id.map.get(FIELD) {
        Some(Value::BulkString(bytes)) => Some(bytes.clone()),
        _ => None,
    };
    Entry { id: id.id, data }
}

async fn connect_writer(url: &str) -> anyhow::Result<PgWriter> {
    let mut client = pg_connect(url, "fleettracker-history-migrate").await?;
    schema::migrate(&mut client).await?;
    drop(client);
    PgWriter::connect(url).await
}

/// The fields of an `XINFO` record, RESP2 (flat array) or RESP3 (map).
fn record_fields(record: &Value) -> Vec<(&Value, &Value)> {
    match record {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(flat) => flat.chunks_exact(2).map(|kv| (&kv[0], &kv[1])).collect(),
        _ => Vec::new(),
    }
}

fn value_str(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn field<'a>(record: &'a Value, name: &str) -> Option<&'a Value> {
    record_fields(record)
        .into_iter()
        .find(|(k, _)| value_str(k).as_deref() == Some(name))
        .map(|(_, v)| v)
}

fn field_str(record: &Value, name: &str) -> Option<String> {
    field(record, name).and_then(value_str)
}

fn field_i64(record: &Value, name: &str) -> Option<i64> {
    match field(record, name)? {
        Value::Int(n) => Some(*n),
        other => value_str(other)?.parse().ok(),
    }
}

/// The record of an `XINFO` list whose `key` is `value`.
fn find_record<'a>(list: &'a Value, key: &str, value: &str) -> Option<&'a Value> {
    match list {
        Value::Array(records) => records
            .iter()
            .find(|r| field_str(r, key).as_deref() == Some(value)),
        _ => None,
    }
}

/// Runs retention every `settings.every` until shutdown.
async fn retention_loop(url: String, settings: RetentionSettings, shutdown: CancellationToken) {
    loop {
        match retention_once(&url, &settings).await {
            Ok(summary) if summary != RetentionSummary::default() => {
                tracing::info!(?summary, "history retention done");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %format!("{error:#}"),
                "history retention failed; retrying later"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(settings.every) => {}
        }
    }
}

async fn retention_once(
    url: &str,
    settings: &RetentionSettings,
) -> anyhow::Result<RetentionSummary> {
    let mut client = pg_connect(url, "fleettracker-history-retention").await?;
    schema::migrate(&mut client).await?;
    schema::apply_retention(
        &mut client,
        settings.hot,
        settings.cold,
        settings.cold_simplify_m,
        now_micros(),
    )
    .await
}

/// Exponential backoff, 100 ms doubling to 5 s.
#[derive(Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    fn reset(&mut self) {
        self.next = None;
    }

    /// Sleeps the next delay; false if `shutdown` came first.
    async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next.unwrap_or(BACKOFF_FIRST);
        self.next = Some((delay * 2).min(BACKOFF_CAP));
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}
