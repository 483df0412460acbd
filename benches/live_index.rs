//! Criterion benches of the live index's hot paths at 1,000,000 drivers packed into one city:
//! an update (a driver moving a few metres), and nearby searches.
//!
//! `cargo bench --bench live_index`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use fleettracker::domain::StatusSet;
use fleettracker::live::{MemoryIndex, NearbyQuery};
use std::time::{Duration, Instant};

#[path = "city.rs"]
mod city;

const DRIVERS: usize = 1_000_000;

fn loaded_index() -> (MemoryIndex, Vec<fleettracker::domain::Position>) {
    let index = MemoryIndex::new(Duration::from_secs(3600));
    let drivers = city::city(DRIVERS);
    let now = Instant::now();
    for p in &drivers {
        index.upsert(p, now);
    }
    (index, drivers)
}

fn query(lat: f64, lon: f64, radius_m: f64, limit: usize) -> NearbyQuery {
    NearbyQuery {
        lat_e6: (lat * 1e6) as i32,
        lon_e6: (lon * 1e6) as i32,
        radius_m,
        limit,
        statuses: StatusSet::WORKING,
    }
}

fn benches(c: &mut Criterion) {
    let (index, mut drivers) = loaded_index();
    let mut rng = city::Rng::new(7);

    c.bench_function("upsert 1M drivers (move a few metres)", |b| {
        let mut ts = 1_800_000_000_000_000i64;
        b.iter(|| {
            let i = (rng.uniform() * DRIVERS as f64) as usize;
            let p = &mut drivers[i];
            p.lat_e6 += 30;
            p.lon_e6 -= 20;
            ts += 1;
            p.timestamp = ts;
            black_box(index.upsert(p, Instant::now()))
        })
    });

    let (lat, lon) = city::CENTER;
    let cases = [
        (
            "nearby 1M centre r=1km limit=50",
            query(lat, lon, 1000.0, 50),
        ),
        (
            "nearby 1M centre r=1km limit=1000",
            query(lat, lon, 1000.0, 1000),
        ),
        (
            "nearby 1M 10km out r=5km limit=50",
            query(lat + 0.09, lon, 5000.0, 50),
        ),
        (
            "nearby 1M centre r=100km limit=50",
            query(lat, lon, 100_000.0, 50),
        ),
        (
            "nearby 1M empty area r=100km limit=50",
            query(40.0, 116.0, 100_000.0, 50),
        ),
    ];
    for (name, q) in cases {
        c.bench_function(name, |b| {
            b.iter(|| black_box(index.nearby(&q, Instant::now())))
        });
    }
}

criterion_group! {
    name = live_index;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(live_index);
