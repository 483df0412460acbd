//! What one tenant's queries cost with the Redis live store when other tenants share the city:
//! loads DRIVERS (default 1,000,000) drivers of 20 tenants through `RedisLive::upsert`, then times
//! `counts_in` (one tenant's `/v1/stats`), `counts` (everyone's) and `nearby_in` (one tenant's
//! nearest 10 within 2 km), and reports Redis' slowest commands and memory; last, a snapshot of the
//! whole city (a stream subscriber's box) and the longest Redis command it caused.
//!
//! ```text
//! cargo run --release --example tenant_queries              # throwaway redis-server
//! cargo run --release --example tenant_queries -- redis://127.0.0.1:6390/
//! ```

use fleettracker::backend::redis::RedisTarget;
use fleettracker::domain::{now_micros, Position, Status, StatusSet};
use fleettracker::live::redis::RedisLive;
use fleettracker::live::{BoxQuery, NearbyQuery};
use fleettracker::metrics::Metrics;
use std::time::{Duration, Instant};

const TENANTS: u64 = 20;
const ROUNDS: u32 = 20;

fn position(i: u64, now: i64) -> Position {
    Position {
        driver_id: format!("fleet{}/drv-{i}", i % TENANTS).into(),
        lat_e6: 31_100_000 + (i.wrapping_mul(7919) % 250_000) as i32,
        lon_e6: 121_300_000 + (i.wrapping_mul(104_729) % 350_000) as i32,
        status: Status::from_index((i % 3) as u8),
        timestamp: now,
        speed_mps: Some(8.0),
        heading_deg: None,
        accuracy_m: None,
    }
}

/// Mean wall time of `ROUNDS` calls of `f`.
async fn time<F: std::future::Future>(mut f: impl FnMut() -> F) -> Duration {
    let started = Instant::now();
    for _ in 0..ROUNDS {
        f().await;
    }
    started.elapsed() / ROUNDS
}

async fn info_field(conn: &mut redis::aio::MultiplexedConnection, field: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or("?")
        .to_string()
}

fn main() -> anyhow::Result<()> {
    let drivers: u64 = std::env::var("DRIVERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let (url, _server) = fleettracker_testkit::RedisServer::url_or_start(std::env::args().nth(1));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let target = RedisTarget::parse(&url, false);
        let live = RedisLive::connect(&target, Duration::from_secs(3600), &Metrics::new()).await?;
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let now = now_micros();
        let loading = Instant::now();
        let ids: Vec<u64> = (0..drivers).collect();
        for chunk in ids.chunks(10_000) {
            let batch: Vec<Position> = chunk.iter().map(|&i| position(i, now)).collect();
            live.upsert(&batch).await?;
        }
        println!("loaded {drivers} drivers in {:.1?}", loading.elapsed());
        println!(
            "used_memory_human: {}",
            info_field(&mut conn, "used_memory_human").await
        );
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("slowlog-log-slower-than")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        let _: () = redis::cmd("SLOWLOG")
            .arg("RESET")
            .query_async(&mut conn)
            .await?;
        let one = time(|| live.counts_in("fleet7/")).await;
        let got = live.counts_in("fleet7/").await?;
        let all = time(|| live.counts()).await;
        println!(
            "one tenant's counts: {one:.2?} per call ({} drivers); everyone's: {all:.2?} per call",
            got.total()
        );
        let q = NearbyQuery {
            lat_e6: 31_225_000,
            lon_e6: 121_475_000,
            radius_m: 2000.0,
            limit: 10,
            statuses: StatusSet::WORKING,
        };
        let near = time(|| live.nearby_in(&q, Some("fleet7/"))).await;
        let found = live.nearby_in(&q, Some("fleet7/")).await?.len();
        println!("one tenant's nearest {found} within 2 km: {near:.2?} per call");
        for radius_m in [2000.0, 100_000.0] {
            let q = NearbyQuery { radius_m, ..q };
            let near = time(|| live.nearby(&q)).await;
            let found = live.nearby(&q).await?.len();
            println!("everyone's nearest {found} within {radius_m} m: {near:.2?} per call");
        }
        let slow: u64 = redis::cmd("SLOWLOG")
            .arg("LEN")
            .query_async(&mut conn)
            .await?;
        println!("Redis commands that took ≥ 1 ms meanwhile: {slow}");
        // A stream snapshot of the whole city (every driver), and the longest Redis stall it causes.
        let _: () = redis::cmd("SLOWLOG").arg("RESET").query_async(&mut conn).await?;
        let city = BoxQuery {
            south_e6: 30_900_000,
            west_e6: 121_100_000,
            north_e6: 31_600_000,
            east_e6: 121_900_000,
            statuses: StatusSet::WORKING,
        };
        let started = Instant::now();
        let snapshot = live.within_box(&city).await?.len();
        let took = started.elapsed();
        let entries: Vec<Vec<redis::Value>> = redis::cmd("SLOWLOG")
            .arg("GET")
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        let longest = entries
            .iter()
            .filter_map(|e| match e.get(2) {
                Some(redis::Value::Int(micros)) => Some(*micros),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        println!(
            "the whole city's snapshot ({snapshot} drivers): {took:.2?}; longest Redis command {:.1} ms",
            longest as f64 / 1000.0
        );
        Ok(())
    })
}
