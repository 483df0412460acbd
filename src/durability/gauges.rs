//! The durable store's Prometheus series (documented with the others in [`crate::metrics`]).
//!
//! They are read from counters the log and history keep anyway and set once a second by a
//! background job, so a request pays nothing for them. What they are for: `history_lag_bytes`
//! growing says history's follower cannot keep up (and log segments cannot be deleted meanwhile);
//! `wal_writing_off_worker` at 1 says the disk was so slow that the log writer left the request
//! worker (see `src/wal/writer.rs`); `wal_commits_total` against `driver_updates_total` shows how
//! many positions share one disk commit.

use super::Durability;
use crate::metrics::Metrics;
use metrics::{Counter, Gauge};

const COMMITS: &str = "wal_commits_total";
const WAL_BYTES: &str = "wal_disk_bytes";
const HISTORY_BYTES: &str = "history_disk_bytes";
const HISTORY_LAG: &str = "history_lag_bytes";
const OFF_WORKER: &str = "wal_writing_off_worker";

/// Handles of the durable store's series.
pub struct DurabilityGauges {
    commits: Counter,
    wal_bytes: Gauge,
    history_bytes: Gauge,
    history_lag: Gauge,
    off_worker: Gauge,
}

impl DurabilityGauges {
    pub fn new(m: &Metrics) -> DurabilityGauges {
        m.describe_counter(
            COMMITS,
            "Disk commits of the write-ahead log (each covers a group of appends)",
        );
        m.describe_gauge(WAL_BYTES, "Bytes of the write-ahead log's segments on disk");
        m.describe_gauge(HISTORY_BYTES, "Bytes of the history store on disk");
        m.describe_gauge(
            HISTORY_LAG,
            "Bytes of acknowledged log records not yet appended to history",
        );
        m.describe_gauge(
            OFF_WORKER,
            "1 while the log writer keeps its disk calls off the request worker (the disk was slow)",
        );
        DurabilityGauges {
            commits: m.counter(COMMITS, &[]),
            wal_bytes: m.gauge(WAL_BYTES, &[]),
            history_bytes: m.gauge(HISTORY_BYTES, &[]),
            history_lag: m.gauge(HISTORY_LAG, &[]),
            off_worker: m.gauge(OFF_WORKER, &[]),
        }
    }

    /// Sets every series from `durability`'s current state.
    pub fn update(&self, durability: &Durability) {
        let wal = &durability.wal;
        self.commits.absolute(wal.fsync_count());
        self.wal_bytes.set(wal.disk_bytes() as f64);
        self.history_bytes
            .set(durability.history.disk_bytes() as f64);
        self.history_lag.set(durability.history_lag_bytes() as f64);
        self.off_worker
            .set(if wal.writing_off_worker() { 1.0 } else { 0.0 });
    }
}
