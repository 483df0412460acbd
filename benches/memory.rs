//! Memory per driver at 1,000,000 drivers: the RSS growth of loading the benchmark city into a
//! `MemoryIndex`, divided by the number of drivers. The positions are generated one at a time, so
//! only the index itself is measured.
//!
//! `cargo bench --bench memory`

use fleettracker::live::MemoryIndex;
use std::time::{Duration, Instant};

#[path = "city.rs"]
mod city;

/// The server's allocator, so the figure is the server's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let n = std::env::var("DRIVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000usize);
    let before = rss_bytes();
    let index = MemoryIndex::new(Duration::from_secs(3600));
    let mut rng = city::Rng::new(1);
    let now = Instant::now();
    let started = Instant::now();
    for i in 0..n {
        index.upsert(&city::driver(i, &mut rng), now);
    }
    let load = started.elapsed();
    let after = rss_bytes();
    let per_driver = (after - before) as f64 / n as f64;
    println!("drivers          {n}");
    println!("rss before       {:.1} MiB", before as f64 / 1048576.0);
    println!("rss after        {:.1} MiB", after as f64 / 1048576.0);
    println!("bytes per driver {per_driver:.1}");
    println!(
        "load time        {load:.2?} ({:.0} upserts/s, one thread)",
        n as f64 / load.as_secs_f64()
    );
    assert_eq!(index.counts().total(), n as u64);
}
