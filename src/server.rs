//! `fleettracker serve`: wires the tracker to the HTTP API, runs the background jobs, and shuts down
//! gracefully (readiness goes 503, in-flight requests finish, exit 0) on SIGINT or SIGTERM.

use crate::api;
use crate::backend::redis::{RedisConn, RedisTarget};
use crate::config::{FsyncSetting, HistoryStoreKind, LiveStoreKind, LogFormat, ServeConfig};
use crate::durability::{Durability, DurabilityGauges, Retention, FOLLOW_INTERVAL};
use crate::history::postgres::{
    run_worker, PgHistory, PositionStream, RetentionSettings, WorkerSettings,
};
use crate::live::redis::{AreaFeed, RedisLive};
use crate::live::MemoryIndex;
use crate::metrics::Metrics;
use crate::tracker::Tracker;
use anyhow::Context;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Sets up logging on stderr; `RUST_LOG` (`info` by default; `target=level` lists) sets the levels.
/// A static `Targets` filter rather than `EnvFilter`: the latter tracks every span it might match on
/// fields, which costs a lock on each enter and exit of every request's span.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let default = Targets::new().with_default(LevelFilter::INFO);
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("warning: ignoring RUST_LOG={spec:?}: {e}");
            default
        }),
        Err(_) => default,
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry.with(layer).try_init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
    };
}

/// How often silent drivers are swept out: often enough that counts lag the TTL by little.
fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let tracker = Arc::new(open_tracker(&config).await?);
    let trust = Arc::new(open_trust(&config, tracker.metrics())?);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    let endpoint = crate::net::Endpoint::new(&config.connections, tracker.metrics())?;
    api::extract::set_body_timeout(config.connections.body_timeout);
    let shutdown = shutdown_signal(tracker.clone())?;
    spawn_background_jobs(&tracker, config.driver_ttl);
    spawn_trust_jobs(&trust);
    spawn_durability_jobs(&tracker, &config);
    let scale_out = CancellationToken::new();
    spawn_scale_out_jobs(&tracker, &config, &scale_out)?;

    tracing::info!(%address, data_dir = %config.data_dir.display(), driver_ttl = ?config.driver_ttl, "fleettracker started");
    println!(
        "fleettracker listening on {}://{address}",
        endpoint.scheme()
    );
    std::io::stdout().flush().ok();

    let app = api::router_with(
        tracker.clone(),
        trust.clone(),
        api::map::MapSettings::new(&config.tile_url),
        api::cors::layer(&config.cors_origin),
    );
    endpoint.serve(listener, app, shutdown).await;
    // WebSocket streams and device connections outlive their requests; draining told them to
    // close: let their close frames go out before the process exits.
    tracker.hub().wait_closed(Duration::from_secs(5)).await;
    scale_out.cancel();
    close_durability(&tracker).await;
    tracing::info!("fleettracker stopped");
    Ok(())
}

/// The tracker over the configured stores: the live store (recovered from the data directory when
/// it is in memory and durability is on, or Redis) and history (the embedded log and history, or
/// PostgreSQL through a Redis Stream).
async fn open_tracker(config: &ServeConfig) -> anyhow::Result<Tracker> {
    let metrics = Metrics::new();
    let index = MemoryIndex::new(config.driver_ttl);
    let log_policy = match (config.history_store, config.fsync) {
        (HistoryStoreKind::Embedded, FsyncSetting::Log(policy)) => Some(policy),
        (HistoryStoreKind::Embedded, FsyncSetting::Off) => {
            tracing::warn!(
                "--fsync off: positions are kept in memory only; no log, history or snapshots"
            );
            None
        }
        // The Redis Stream is the log: acknowledged means Redis holds it.
        (HistoryStoreKind::Postgres, _) => None,
    };
    let (index, durability) = match log_policy {
        Some(policy) => {
            let (index, durability) = recover(config, index, policy).await?;
            (index, Some(Arc::new(durability)))
        }
        None => (index, None),
    };
    let redis = match (config.live_store, config.history_store) {
        (LiveStoreKind::Memory, HistoryStoreKind::Embedded) => None,
        _ => Some(redis_target(config)?),
    };
    let mut tracker = match (&redis, config.live_store) {
        (Some(target), LiveStoreKind::Redis) => {
            let store = RedisLive::connect(target, config.driver_ttl, &metrics)
                .await
                .context("cannot connect the Redis live store")?;
            let feed = AreaFeed::new(store.conn(), instance_id(), &metrics);
            Tracker::new(store, durability, metrics.clone()).with_area_feed(feed)
        }
        _ => Tracker::new(index, durability, metrics.clone()),
    };
    if let (Some(target), HistoryStoreKind::Postgres) = (&redis, config.history_store) {
        let url = postgres_url(config)?;
        let conn = RedisConn::connect(target)
            .await
            .context("cannot connect to Redis for the history stream")?;
        let stream = PositionStream::new(conn, config.stream_max_len, &metrics);
        let pg = PgHistory::connect(&url)
            .await
            .context("cannot connect the PostgreSQL history")?;
        tracker = tracker.with_postgres_history(stream, Arc::new(pg));
    }
    if config.live_store == LiveStoreKind::Memory
        && config.history_store == HistoryStoreKind::Postgres
    {
        tracing::warn!("--live-store memory with --history-store postgres: the live state is not kept across restarts (use --live-store redis)");
    }
    Ok(tracker)
}

/// API keys, limits, filters and the anomaly log; refuses open mode on a public address.
fn open_trust(config: &ServeConfig, metrics: &Metrics) -> anyhow::Result<api::auth::Trust> {
    use crate::trust::{anomalies::AnomalyLog, keys::KeyStore};
    let keys_dir = config.trust.keys_dir.as_ref().unwrap_or(&config.data_dir);
    std::fs::create_dir_all(keys_dir)
        .with_context(|| format!("cannot create the keys directory {}", keys_dir.display()))?;
    let keys = KeyStore::open(keys_dir).context("cannot open the API key store")?;
    let anomalies = AnomalyLog::open(
        &config.data_dir.join("anomalies"),
        config.trust.anomaly_retention_micros(),
    )
    .context("cannot open the anomaly log")?;
    let settings = api::auth::TrustSettings {
        metrics_key_required: config.trust.metrics_key_required,
        readers: config.trust.reader_limits(),
        devices: config.trust.device_limits(),
        filters: config.trust.sanity_filters(),
    };
    let trust = api::auth::Trust::new(keys, anomalies, settings, metrics);
    if trust.is_open() {
        anyhow::ensure!(
            config.listen.ip().is_loopback() || config.trust.allow_open,
            "no API key exists (open mode: anyone who can reach the port can read and write \
             everything), and {} is not a loopback address; create a key with \
             `fleettracker keys create`, or pass --allow-open",
            config.listen
        );
        tracing::warn!(
            "OPEN MODE: no API key exists, every request is allowed; create one with `fleettracker keys create --tenant <t> --role admin`"
        );
    }
    Ok(trust)
}

/// Loads the newest snapshot and replays the log after it.
async fn recover(
    config: &ServeConfig,
    index: MemoryIndex,
    policy: crate::wal::FsyncPolicy,
) -> anyhow::Result<(MemoryIndex, Durability)> {
    let data_dir = config.data_dir.clone();
    let (index, durability, recovered) = tokio::task::spawn_blocking(move || {
        Durability::open(&data_dir, policy, &index).map(|(d, r)| (index, d, r))
    })
    .await
    .context("recovery task failed")??;
    tracing::info!(
        snapshot_lsn = ?recovered.snapshot_lsn,
        snapshot_drivers = recovered.snapshot_drivers,
        replayed_records = recovered.replayed_records,
        history_records = recovered.history_records,
        took = ?recovered.took,
        "recovered from the data directory"
    );
    Ok((index, durability))
}

fn redis_target(config: &ServeConfig) -> anyhow::Result<RedisTarget> {
    let urls = config.backend.redis_url.as_deref().context(
        "--redis-url (FLEET_REDIS_URL) is required with --live-store redis or --history-store postgres",
    )?;
    let target = RedisTarget::parse(urls, config.backend.redis_cluster);
    anyhow::ensure!(!target.urls.is_empty(), "--redis-url is empty");
    Ok(target)
}

fn postgres_url(config: &ServeConfig) -> anyhow::Result<String> {
    config
        .backend
        .postgres_url
        .clone()
        .context("--postgres-url (FLEET_POSTGRES_URL) is required with --history-store postgres")
}

/// This process's id among the instances sharing Redis (its own feed messages are skipped).
fn instance_id() -> u64 {
    rand::random()
}

/// The scale-out jobs: the feed subscriber (other instances' positions to this one's streams) and,
/// with --embedded-worker, the history worker.
fn spawn_scale_out_jobs(
    tracker: &Arc<Tracker>,
    config: &ServeConfig,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    if let Some(feed) = tracker.area_feed() {
        let target = redis_target(config)?;
        let relay = tracker.clone();
        AreaFeed::spawn_subscriber(
            &target,
            feed.instance_id(),
            tracker.metrics(),
            move |event| relay.relay(event),
            stop.clone(),
        );
    }
    if config.embedded_worker {
        anyhow::ensure!(
            config.history_store == HistoryStoreKind::Postgres,
            "--embedded-worker needs --history-store postgres"
        );
        let mut settings = WorkerSettings::new(redis_target(config)?, postgres_url(config)?);
        settings.retention = Some(RetentionSettings::new(
            &config.retention,
            RETENTION_INTERVAL,
        ));
        let (metrics, stop) = (tracker.metrics().clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = run_worker(settings, metrics, stop).await {
                tracing::error!(error = %format!("{e:#}"), "the embedded history worker stopped");
            }
        });
    }
    Ok(())
}

/// Runs `job` on the blocking pool every `every`, logging failures (they are retried next time).
fn every(
    every: Duration,
    what: &'static str,
    job: impl Fn() -> anyhow::Result<()> + Send + Sync + 'static,
) {
    let job = Arc::new(job);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let job = job.clone();
            match tokio::task::spawn_blocking(move || job()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "{what} failed; retrying later")
                }
                Err(e) => tracing::error!(error = %e, "{what} panicked"),
            }
        }
    });
}

/// The history follower, snapshots and retention.
fn spawn_durability_jobs(tracker: &Arc<Tracker>, config: &ServeConfig) {
    let Some(durability) = tracker.durability().cloned() else {
        return;
    };
    let d = durability.clone();
    every(FOLLOW_INTERVAL, "history follower", move || {
        d.follow_once().map(|_| ())
    });
    let (d, gauges) = (durability.clone(), DurabilityGauges::new(tracker.metrics()));
    every(Duration::from_secs(1), "durability metrics", move || {
        gauges.update(&d);
        Ok(())
    });
    let (d, t) = (durability.clone(), tracker.clone());
    let empty = MemoryIndex::new(config.driver_ttl);
    every(config.snapshot_interval, "snapshot", move || {
        // With a shared live store the snapshot holds no drivers; it still marks what the log
        // covers, so that old segments can go.
        let info = d.snapshot(t.memory_index().unwrap_or(&empty))?;
        tracing::debug!(lsn = info.lsn, drivers = info.drivers, "snapshot written");
        Ok(())
    });
    let retention = Retention {
        hot: config.retention.history_retention,
        cold: config.retention.cold_retention,
        cold_simplify_m: config.retention.cold_simplify_m,
    };
    let d = durability.clone();
    if let Err(e) = d.apply_retention(retention) {
        tracing::error!(error = %format!("{e:#}"), "history retention failed; retrying later");
    }
    every(RETENTION_INTERVAL, "history retention", move || {
        d.apply_retention(retention)
    });
}

/// How often history retention runs (it is cheap when nothing is due).
const RETENTION_INTERVAL: Duration = Duration::from_secs(600);

/// At shutdown: flush the log, bring history up to date and leave a fresh snapshot, so the next
/// start replays nothing.
async fn close_durability(tracker: &Arc<Tracker>) {
    let Some(durability) = tracker.durability().cloned() else {
        return;
    };
    if let Err(e) = durability.close().await {
        tracing::error!(error = %e, "closing the log failed");
    }
    let t = tracker.clone();
    let done = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        durability.flush_history()?;
        let empty = MemoryIndex::new(Duration::from_secs(1));
        durability.snapshot(t.memory_index().unwrap_or(&empty))?;
        Ok(())
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "final snapshot failed"),
        Err(e) => tracing::error!(error = %e, "final snapshot panicked"),
    }
}

/// Reloads the key file and sweeps limiter, idempotency and anomaly state.
fn spawn_trust_jobs(trust: &Arc<api::auth::Trust>) {
    let t = trust.clone();
    every(Duration::from_secs(2), "trust upkeep", move || {
        t.upkeep();
        Ok(())
    });
    let t = trust.clone();
    every(Duration::from_secs(600), "anomaly retention", move || {
        t.anomalies.sweep(crate::domain::now_micros())?;
        t.anomalies.persist()?;
        Ok(())
    });
}

fn spawn_background_jobs(tracker: &Arc<Tracker>, ttl: Duration) {
    let sweeper = tracker.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep_interval(ttl));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match sweeper.expire().await {
                Ok(0) => {}
                Ok(removed) => tracing::debug!(removed, "expired silent drivers"),
                Err(e) => tracing::warn!(error = %e, "expiry sweep failed; retrying"),
            }
        }
    });
    tracker.metrics().spawn_upkeep();
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are registered when this is *called*, before
/// the address is printed, so a signal sent as soon as the server is up is never fatal.
fn shutdown_signal(tracker: Arc<Tracker>) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        tracker.set_ready(false);
        tracing::info!("shutdown requested: draining in-flight requests");
    })
}
