//! Position history figures: append throughput, bytes per stored position, track query latency.
//!
//! `cargo bench --bench history` (release build, real files in a temp dir). Prints:
//! 1. appends of 2,000 drivers × 1 h at 2 s (3.6M positions) in batches of 1,000, time-major like
//!    live traffic, for fixes whose speed and heading change every time (`noisy`, the worst case
//!    for the encoding) and for fixes that keep them between turns (`steady`, like the simulator);
//! 2. bytes per stored position after everything is written and flushed to tables;
//! 3. one driver's full day (43,200 fixes at 2 s) queried whole, and one hour of it.

use fleettracker::domain::{Position, Status};
use fleettracker::history::{History, TrackQuery};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

const SEC: i64 = 1_000_000;
/// 2026-03-10T00:00:00Z.
const DAY0: i64 = 1_773_100_800 * SEC;

/// A vehicle wandering a city with GPS noise; `noisy` varies speed and heading on every fix.
struct Vehicle {
    id: String,
    lat: f64,
    lon: f64,
    heading: f64,
    speed: f64,
}

impl Vehicle {
    fn new(index: usize, rng: &mut SmallRng) -> Vehicle {
        Vehicle {
            id: format!("drv-{index:06}"),
            lat: 31.1 + rng.random::<f64>() * 0.2,
            lon: 121.3 + rng.random::<f64>() * 0.2,
            heading: f64::from(rng.random_range(0..4u8)) * 90.0,
            speed: rng.random_range(5.0..15.0),
        }
    }

    fn fix(&mut self, ts: i64, noisy: bool, rng: &mut SmallRng) -> Position {
        if noisy {
            self.heading = (self.heading + rng.random_range(-5.0..5.0)).rem_euclid(360.0);
            self.speed = (self.speed + rng.random_range(-0.5..0.5)).clamp(0.0, 20.0);
        } else if rng.random::<f64>() < 0.05 {
            self.heading = f64::from(rng.random_range(0..4u8)) * 90.0;
            self.speed = rng.random_range(5.0..15.0);
        }
        let step = self.speed * 2.0;
        self.lat += step * self.heading.to_radians().cos() / 111_195.0;
        self.lon += step * self.heading.to_radians().sin() / 95_000.0;
        let noise = |rng: &mut SmallRng| rng.random_range(-1.5e-5..1.5e-5);
        Position {
            driver_id: self.id.as_str().into(),
            lat_e6: ((self.lat + noise(rng)) * 1e6).round() as i32,
            lon_e6: ((self.lon + noise(rng)) * 1e6).round() as i32,
            status: if rng.random::<f64>() < 0.4 {
                Status::Busy
            } else {
                Status::Online
            },
            timestamp: ts + rng.random_range(0..1000),
            speed_mps: Some(self.speed as f32),
            heading_deg: Some(self.heading as f32),
            accuracy_m: Some(5.0),
        }
    }
}

/// `drivers` vehicles reporting every 2 s for `seconds`, in arrival (time-major) order.
fn traffic(drivers: usize, seconds: i64, noisy: bool) -> Vec<Position> {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut fleet: Vec<Vehicle> = (0..drivers).map(|i| Vehicle::new(i, &mut rng)).collect();
    let mut out = Vec::with_capacity(drivers * (seconds / 2) as usize);
    for step in 0..seconds / 2 {
        let ts = DAY0 + 8 * 3600 * SEC + step * 2 * SEC;
        for vehicle in &mut fleet {
            out.push(vehicle.fix(ts, noisy, &mut rng));
        }
    }
    out
}

fn append_and_size(label: &str, noisy: bool) -> Result<(), Box<dyn std::error::Error>> {
    let positions = traffic(2000, 3600, noisy);
    let dir = tempfile::tempdir()?;
    let history = History::open(dir.path())?;
    let started = Instant::now();
    for batch in positions.chunks(1000) {
        history.append(batch)?;
    }
    let took = started.elapsed();
    let open = history.open_windows();
    history.persist()?;
    let persisted = started.elapsed();
    history.flush()?;
    let n = positions.len() as f64;
    println!(
        "{label:>6}: append {} positions in {:.2?} = {:.2} M positions/s (incl. persist: {:.2} M/s; {open} open windows)",
        positions.len(),
        took,
        n / took.as_secs_f64() / 1e6,
        n / persisted.as_secs_f64() / 1e6,
    );
    let tables = dir_bytes(&dir.path().join("keyspaces"));
    println!(
        "{label:>6}: disk after flush: {:.1} B/position in day tables ({} bytes), {:.1} B/position with journal (disk_bytes {})",
        tables as f64 / n,
        tables,
        history.disk_bytes() as f64 / n,
        history.disk_bytes(),
    );
    Ok(())
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn median_of(runs: usize, mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut times = Vec::with_capacity(runs);
    let mut n = 0;
    for _ in 0..runs {
        let started = Instant::now();
        n = f();
        times.push(started.elapsed());
    }
    times.sort();
    (times[runs / 2], n)
}

fn query_day() -> Result<(), Box<dyn std::error::Error>> {
    // 20 drivers × a full day: the queried driver's keys sit among others', as in production.
    let mut rng = SmallRng::seed_from_u64(11);
    let mut fleet: Vec<Vehicle> = (0..20).map(|i| Vehicle::new(i, &mut rng)).collect();
    let dir = tempfile::tempdir()?;
    let history = History::open(dir.path())?;
    let mut batch = Vec::with_capacity(1000);
    for step in 0..43_200 {
        for vehicle in &mut fleet {
            batch.push(vehicle.fix(DAY0 + step * 2 * SEC, true, &mut rng));
        }
        if batch.len() >= 1000 {
            history.append(&batch)?;
            batch.clear();
        }
    }
    history.append(&batch)?;
    history.flush()?;
    let whole = TrackQuery {
        driver_id: "drv-000007".into(),
        from: DAY0,
        to: DAY0 + 86_400 * SEC - 1,
        limit: 100_000,
        cursor: None,
    };
    let hour = TrackQuery {
        from: DAY0 + 12 * 3600 * SEC,
        to: DAY0 + 13 * 3600 * SEC - 1,
        ..whole.clone()
    };
    for (label, q) in [("full day", &whole), ("one hour", &hour)] {
        let (took, n) = median_of(21, || history.track(q).map(|p| p.points.len()).unwrap_or(0));
        println!("query {label}: {n} points in {took:.2?} (median of 21, warm cache)");
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` asks for a list; there is nothing to run quickly
    }
    append_and_size("noisy", true)?;
    append_and_size("steady", false)?;
    query_day()?;
    Ok(())
}
