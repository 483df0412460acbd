//! Prometheus metrics. Names and labels are part of the API (dashboards and alerts use them):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `driver_updates_total` | counter | `status` |
//! | `http_request_duration_seconds` | histogram | `method`, `route` (template), `status` (code) |
//! | `location_store_write_seconds` | histogram | — |
//! | `drivers_active` | gauge | `status` |
//! | `stream_subscribers` | gauge | `transport` (`ws`, `sse`) |
//! | `stream_messages_sent_total` | counter | `transport` |
//! | `stream_messages_dropped_total` | counter | `reason` (`coalesced`, `closed`, `resubscribed`) |
//! | `stream_subscribers_closed_total` | counter | `reason` (`client`, `too_slow`, `shutdown`, `policy`, `error`) |
//! | `ingest_connections` | gauge | — |
//! | `ingest_messages_total` | counter | `result` (`ack`, `error`) |
//! | `ingest_connections_closed_total` | counter | `reason` (`client`, `shutdown`, `policy`, `error`) |
//! | `wal_commits_total`, `wal_disk_bytes`, `history_disk_bytes`, `history_lag_bytes`, `wal_writing_off_worker` | counter, gauges | — |
//!
//! The stream and ingest series are registered (through [`Metrics::counter`] and
//! [`Metrics::gauge`]) by [`crate::hub`], which keeps their handles; the log and history series by
//! [`crate::durability::DurabilityGauges`], only when there is a log (not with `--fsync off`).
//!
//! No label carries a driver id or any other unbounded value: routes are templates, unknown paths
//! are `unmatched`, unknown methods `other`.
//!
//! The recorder is owned, not installed globally, so several servers can live in one process (tests)
//! and hot paths hold ready-made handles instead of looking metrics up by name per request.

use crate::domain::Status;
use crate::live::StatusCounts;
use hashbrown::HashMap;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use parking_lot::RwLock;
use std::sync::Arc;
use std::time::Duration;

const HTTP_DURATION: &str = "http_request_duration_seconds";
const STORE_WRITE: &str = "location_store_write_seconds";
const UPDATES: &str = "driver_updates_total";
const ACTIVE: &str = "drivers_active";
/// Latency histograms of calls to a backing store (Redis, PostgreSQL); they share one bucket list.
const BACKEND_LATENCIES: &[&str] = &[
    "redis_geoadd_latency_seconds",
    "redis_command_latency_seconds",
    "history_worker_commit_seconds",
];

const HTTP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const STORE_BUCKETS: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.01,
    0.1,
];

static METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

/// Labels of one HTTP histogram series.
type HttpSeries = (&'static str, &'static str, u16);

/// Handles to every metric the service records.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    updates: [Counter; 3],
    active: [Gauge; 3],
    store_write: Histogram,
    http: RwLock<HashMap<HttpSeries, Histogram>>,
}

fn status_labels(name: &'static str) -> [Key; 3] {
    Status::ALL.map(|s| Key::from_parts(name, vec![Label::new("status", s.as_str())]))
}

impl Metrics {
    /// The metrics of a server: every series of the table above.
    pub fn new() -> Metrics {
        Metrics::build(true)
    }

    /// The metrics of a process that serves no API (`fleettracker worker`): the server's own
    /// series (driver updates and gauges, store writes) are not registered, so its `/metrics`
    /// holds only what it records itself instead of also showing those at zero — a
    /// `drivers_active 0` from a worker target would read as "no drivers" on a dashboard.
    pub fn for_worker() -> Metrics {
        Metrics::build(false)
    }

    fn build(server: bool) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), HTTP_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(STORE_WRITE.into()), STORE_BUCKETS)
            })
            .and_then(|b| {
                BACKEND_LATENCIES.iter().try_fold(b, |b, name| {
                    b.set_buckets_for_metric(Matcher::Full((*name).into()), HTTP_BUCKETS)
                })
            })
            .expect("bucket lists are non-empty constants")
            .build_recorder();
        describe(&recorder);
        let handle = recorder.handle();
        let (updates, active, store_write) = if server {
            (
                status_labels(UPDATES).map(|k| recorder.register_counter(&k, &METADATA)),
                status_labels(ACTIVE).map(|k| recorder.register_gauge(&k, &METADATA)),
                recorder.register_histogram(&Key::from_name(STORE_WRITE), &METADATA),
            )
        } else {
            (
                [(); 3].map(|()| Counter::noop()),
                [(); 3].map(|()| Gauge::noop()),
                Histogram::noop(),
            )
        };
        Metrics {
            inner: Arc::new(Inner {
                recorder,
                handle,
                updates,
                active,
                store_write,
                http: RwLock::new(HashMap::new()),
            }),
        }
    }

    pub fn count_updates(&self, status: Status, n: u64) {
        if n > 0 {
            self.inner.updates[status as usize].increment(n);
        }
    }

    pub fn record_store_write(&self, took: Duration) {
        self.inner.store_write.record(took.as_secs_f64());
    }

    /// Records one HTTP request; `route` must be a template (bounded), never a raw path.
    pub fn record_http(
        &self,
        method: &'static str,
        route: &'static str,
        status: u16,
        took: Duration,
    ) {
        let series = (method, route, status);
        if let Some(histogram) = self.inner.http.read().get(&series) {
            histogram.record(took.as_secs_f64());
            return;
        }
        let histogram = {
            let labels = vec![
                Label::new("method", method),
                Label::new("route", route),
                Label::new("status", status.to_string()),
            ];
            let key = Key::from_parts(HTTP_DURATION, labels);
            let h = self.inner.recorder.register_histogram(&key, &METADATA);
            self.inner.http.write().entry(series).or_insert(h).clone()
        };
        histogram.record(took.as_secs_f64());
    }

    /// Registers a counter series whose handle the caller keeps (for metrics recorded outside
    /// this module, like the stream hub's). Label values must come from a fixed set.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        let key = series_key(name, labels);
        self.inner.recorder.register_counter(&key, &METADATA)
    }

    /// Registers a gauge series whose handle the caller keeps (see [`Metrics::counter`]).
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        let key = series_key(name, labels);
        self.inner.recorder.register_gauge(&key, &METADATA)
    }

    /// Registers a histogram series whose handle the caller keeps (see [`Metrics::counter`]).
    /// Latency histograms of backing stores get fine buckets when listed in `BACKEND_LATENCIES`.
    pub fn histogram(
        &self,
        name: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Histogram {
        let key = series_key(name, labels);
        self.inner.recorder.register_histogram(&key, &METADATA)
    }

    /// The `# HELP` text of a histogram registered through [`Metrics::histogram`].
    pub fn describe_histogram(&self, name: &'static str, help: &'static str) {
        self.inner
            .recorder
            .describe_histogram(name.into(), Some(Unit::Seconds), help.into());
    }

    /// The `# HELP` text of a counter registered through [`Metrics::counter`].
    pub fn describe_counter(&self, name: &'static str, help: &'static str) {
        self.inner
            .recorder
            .describe_counter(name.into(), None, help.into());
    }

    /// The `# HELP` text of a gauge registered through [`Metrics::gauge`].
    pub fn describe_gauge(&self, name: &'static str, help: &'static str) {
        self.inner
            .recorder
            .describe_gauge(name.into(), None, help.into());
    }

    /// The Prometheus text exposition, with the driver gauges refreshed from `counts` if given.
    pub fn render(&self, counts: Option<StatusCounts>) -> String {
        if let Some(counts) = counts {
            for status in Status::ALL {
                self.inner.active[status as usize].set(counts.get(status) as f64);
            }
        }
        self.inner.handle.render()
    }

    /// Folds recorded histogram samples into their buckets; run periodically to bound memory.
    pub fn run_upkeep(&self) {
        self.inner.handle.run_upkeep();
    }

    /// Runs [`Metrics::run_upkeep`] every second for as long as the runtime lives: samples are
    /// otherwise held until the next scrape, without bound in a process nobody scrapes.
    pub fn spawn_upkeep(&self) {
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                metrics.run_upkeep();
            }
        });
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn series_key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|&(k, v)| Label::new(k, v)).collect();
    Key::from_parts(name, labels)
}

fn describe(recorder: &PrometheusRecorder) {
    recorder.describe_counter(
        UPDATES.into(),
        None,
        "Accepted driver position updates, by the status they reported.".into(),
    );
    recorder.describe_histogram(
        HTTP_DURATION.into(),
        Some(Unit::Seconds),
        "HTTP request latency by method, route template and status code.".into(),
    );
    recorder.describe_histogram(
        STORE_WRITE.into(),
        Some(Unit::Seconds),
        "Time to apply one request's positions to the location store.".into(),
    );
    recorder.describe_gauge(
        ACTIVE.into(),
        None,
        "Drivers currently tracked (reported within the TTL), by status.".into(),
    );
}
