//! Drain rate of the PostgreSQL history worker, and its lag under a steady producer.
//!
//! Starts a throwaway Redis and PostgreSQL (testkit: PostgreSQL with `fsync=off`,
//! `synchronous_commit=off` server-wide; the worker's own session forces `synchronous_commit=on`),
//! then:
//!
//! * `drain`: fills `positions:stream` with `--positions` positions (once as single-position
//!   entries, once as 1,000-position entries), starts one worker and times it until every position
//!   is committed (positions/s = positions ÷ time from worker start to the last commit).
//! * `steady`: a producer appends `--rate` positions/s through `PositionStream` (batches of
//!   `--batch` positions, open loop) for `--duration`, with a worker running; prints the stream
//!   lag every 2 s.
//!
//! ```sh
//! cargo build --release --example pg_drain
//! taskset -c 0 target/release/examples/pg_drain all --positions 1000000 --rate 50000 --duration 30s
//! ```
//! Each phase ends with a `RESULT key=value ...` line.

use clap::{Parser, ValueEnum};
use fleettracker::backend::redis::{RedisConn, RedisTarget};
use fleettracker::domain::{Micros, Position, Status};
use fleettracker::history::postgres::stream::encode_entry;
use fleettracker::history::postgres::{
    run_worker, PositionStream, WorkerSettings, FIELD, STREAM_KEY,
};
use fleettracker::metrics::Metrics;
use fleettracker::wal::Batch;
use fleettracker_testkit::{Postgres, RedisServer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(value_enum, default_value_t = Phase::All)]
    phase: Phase,
    /// Positions to drain per entry shape.
    #[arg(long, default_value_t = 1_000_000)]
    positions: usize,
    /// Worker batch size (positions per transaction).
    #[arg(long, default_value_t = 20_000)]
    batch_size: usize,
    /// Steady producer rate, positions/s.
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Positions per append in the steady phase.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Distinct drivers.
    #[arg(long, default_value_t = 10_000)]
    drivers: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    All,
    Drain,
    Steady,
}

/// 2026-02-01T00:00:00Z.
const START: Micros = 1_769_904_000_000_000;

/// The `n`-th position of a fleet of `drivers` reporting every 2 s, moving a little each time.
fn position(n: usize, drivers: usize) -> Position {
    let driver = n % drivers;
    let step = (n / drivers) as i64;
    Position {
        driver_id: format!("drv-{driver:06}").into(),
        lat_e6: 31_130_000 + (driver as i32 * 37) % 200_000 + (step as i32 * 13) % 5_000,
        lon_e6: 121_350_000 + (driver as i32 * 91) % 250_000 + (step as i32 * 7) % 5_000,
        status: Status::Busy,
        timestamp: START + step * 2_000_000 + (driver as i64 % 2_000) * 1_000,
        speed_mps: Some(8.5),
        heading_deg: Some((step % 360) as f32),
        accuracy_m: Some(5.0),
    }
}

fn metric(metrics: &Metrics, name: &str) -> f64 {
    metrics
        .render(None)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn start_worker(
    redis: &RedisServer,
    pg: &Postgres,
    batch_size: usize,
) -> (Metrics, CancellationToken, tokio::task::JoinHandle<()>) {
    let mut settings = WorkerSettings::new(RedisTarget::parse(&redis.url(), false), pg.url());
    settings.batch_size = batch_size;
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let task = {
        let (metrics, stop) = (metrics.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = run_worker(settings, metrics, stop).await {
                eprintln!("worker failed: {e:#}");
            }
        })
    };
    (metrics, stop, task)
}

async fn drain(args: &Args, per_entry: usize) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let mut conn = RedisConn::connect(&RedisTarget::parse(&redis.url(), false)).await?;
    let filled = Instant::now();
    let entries_per_pipe = (10_000 / per_entry).max(1);
    let mut n = 0;
    while n < args.positions {
        let mut pipe = redis::pipe();
        for _ in 0..entries_per_pipe {
            if n >= args.positions {
                break;
            }
            let count = per_entry.min(args.positions - n);
            let positions = (n..n + count).map(|i| position(i, args.drivers)).collect();
            n += count;
            let batch = Batch {
                received_at: START,
                positions,
            };
            pipe.cmd("XADD")
                .arg(STREAM_KEY)
                .arg("*")
                .arg(FIELD)
                .arg(encode_entry(&[batch]))
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
    }
    let fill_secs = filled.elapsed().as_secs_f64();
    let (metrics, stop, task) = start_worker(&redis, &pg, args.batch_size);
    let started = Instant::now();
    let target = args.positions as f64;
    while metric(&metrics, "history_worker_positions_total") < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "drain too slow"
        );
    }
    let secs = started.elapsed().as_secs_f64();
    stop.cancel();
    task.await?;
    let rows = pg.psql("SELECT count(*) FROM positions");
    println!(
        "RESULT phase=drain positions_per_entry={per_entry} positions={} rows={rows} fill_s={fill_secs:.2} \
         drain_s={secs:.2} positions_per_s={:.0} commits={} errors={}",
        args.positions,
        target / secs,
        histogram_count(&metrics),
        metric(&metrics, "history_worker_errors_total"),
    );
    Ok(())
}

fn histogram_count(metrics: &Metrics) -> f64 {
    metric(metrics, "history_worker_commit_seconds_count")
}

async fn steady(args: &Args) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let conn = RedisConn::connect(&RedisTarget::parse(&redis.url(), false)).await?;
    let producer_metrics = Metrics::new();
    let stream = PositionStream::new(conn, 1_000_000, &producer_metrics);
    let (metrics, stop, task) = start_worker(&redis, &pg, args.batch_size);
    let appends_per_s = (args.rate as f64 / args.batch as f64).max(1.0);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / appends_per_s));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let failed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut next_sample = Duration::from_secs(2);
    let mut samples = Vec::new();
    let mut n = 0usize;
    while started.elapsed() < args.duration {
        ticker.tick().await;
        let positions: Vec<Position> = (n..n + args.batch)
            .map(|i| position(i, args.drivers))
            .collect();
        n += args.batch;
        let batch = Batch {
            received_at: START,
            positions,
        };
        let (stream, failed_count, sent_count) = (stream.clone(), failed.clone(), sent.clone());
        tokio::spawn(async move {
            match stream.append(&batch).await {
                Ok(()) => sent_count.fetch_add(batch.positions.len() as u64, Ordering::Relaxed),
                Err(_) => failed_count.fetch_add(1, Ordering::Relaxed),
            };
        });
        if started.elapsed() >= next_sample {
            next_sample += Duration::from_secs(2);
            let lag = metric(&metrics, "history_stream_lag_entries");
            let committed = metric(&metrics, "history_worker_positions_total");
            let appended = sent.load(Ordering::Relaxed) as f64;
            samples.push(format!("{lag:.0}"));
            println!(
                "t={:>4.1}s appended={appended:.0} committed={committed:.0} behind_positions={:.0} lag_entries={lag:.0}",
                started.elapsed().as_secs_f64(),
                appended - committed,
            );
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let appended = sent.load(Ordering::Relaxed);
    let drained = Instant::now();
    while metric(&metrics, "history_worker_positions_total") < appended as f64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        anyhow::ensure!(
            drained.elapsed() < Duration::from_secs(120),
            "never caught up"
        );
    }
    let entries = metric(&producer_metrics, "history_stream_entries_total");
    println!(
        "RESULT phase=steady rate={} achieved_positions_per_s={:.0} failed_appends={} xadds={entries:.0} \
         positions_per_xadd={:.1} catch_up_after_stop_s={:.2} lag_entries_samples={}",
        args.rate,
        appended as f64 / elapsed,
        failed.load(Ordering::Relaxed),
        appended as f64 / entries.max(1.0),
        drained.elapsed().as_secs_f64(),
        samples.join(","),
    );
    stop.cancel();
    task.await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if matches!(args.phase, Phase::All | Phase::Drain) {
        drain(&args, 1).await?;
        drain(&args, 1000).await?;
    }
    if matches!(args.phase, Phase::All | Phase::Steady) {
        steady(&args).await?;
    }
    Ok(())
}
