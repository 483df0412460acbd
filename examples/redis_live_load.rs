//! Load generator for the Redis live store: `RedisLive::upsert` from 64 concurrent tasks, first
//! with single positions, then with 1,000-position batches, reporting upserts per second and
//! latency percentiles.
//!
//! ```text
//! taskset -c 0 redis-server --port 6390 --save '' --appendonly no &
//! taskset -c 0 cargo run --release --example redis_live_load -- redis://127.0.0.1:6390/ 10
//! ```
//!
//! Without a URL it starts a throwaway `redis-server` (unpinned). The runtime is single-threaded
//! (`WORKERS=n` for more), as the store would run pinned to one core next to Redis. 100,000
//! drivers; positions jump randomly across a city unless `WALK=1` (drivers move ~10 m/s).

use fleettracker::backend::redis::RedisTarget;
use fleettracker::domain::{now_micros, Position, Status};
use fleettracker::live::redis::RedisLive;
use fleettracker::metrics::Metrics;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TASKS: usize = 64;
const DRIVERS: u64 = 100_000;

/// Position number `n`: a pseudo-random driver; with `walk`, near its home spot (moving about
/// 10 m a second, as real drivers do), else anywhere in a 28 × 33 km city (worst case for the GEO
/// set: every report moves the member far in the sorted set).
fn position(n: u64, walk: bool) -> Position {
    let driver = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % DRIVERS;
    let seed = if walk { driver } else { n };
    let drift = if walk {
        (now_micros() / 1_000_000 % 60) as i32 * 90
    } else {
        0
    };
    Position {
        driver_id: format!("drv-{driver}").into(),
        lat_e6: 31_100_000 + (seed.wrapping_mul(7919) % 250_000) as i32 + drift,
        lon_e6: 121_300_000 + (seed.wrapping_mul(104_729) % 350_000) as i32,
        status: if n.is_multiple_of(10) {
            Status::Busy
        } else {
            Status::Online
        },
        timestamp: now_micros(),
        speed_mps: Some(8.5),
        heading_deg: Some(90.0),
        accuracy_m: None,
    }
}

async fn phase(live: &RedisLive, batch: usize, seconds: u64, walk: bool) -> (f64, Histogram<u64>) {
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let live = live.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut latencies = Histogram::<u64>::new(3).expect("histogram");
                let mut n = t as u64 * 1_000_000_007;
                while Instant::now() < deadline {
                    let positions: Vec<Position> =
                        (0..batch).map(|i| position(n + i as u64, walk)).collect();
                    n += batch as u64;
                    let sent = Instant::now();
                    match live.upsert(&positions).await {
                        Ok(_) => {
                            let _ = latencies.record(sent.elapsed().as_micros() as u64);
                            counter.fetch_add(batch as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("upsert failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        if let Ok(h) = t.await {
            let _ = all.add(h);
        }
    }
    let rate = counter.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    (rate, all)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next();
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let workers: usize = std::env::var("WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?
    };
    let (url, _server) = fleettracker_testkit::RedisServer::url_or_start(url);
    runtime.block_on(async move {
        let target = RedisTarget::parse(&url, false);
        let live = RedisLive::connect(&target, Duration::from_secs(60), &Metrics::new()).await?;
        // Warm-up: loads the scripts and creates the drivers.
        let walk = std::env::var("WALK").is_ok_and(|v| v == "1");
        phase(&live, 1000, 2, walk).await;
        for (name, batch) in [("single", 1), ("batch-1000", 1000)] {
            let (rate, lat) = phase(&live, batch, seconds, walk).await;
            println!(
                "{name:>10}: {rate:>10.0} positions/s  ({:.0} requests/s)  latency p50 {} µs  p99 {} µs  max {} µs",
                rate / batch as f64,
                lat.value_at_quantile(0.5),
                lat.value_at_quantile(0.99),
                lat.max()
            );
        }
        Ok(())
    })
}
