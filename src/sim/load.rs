//! The load generator: turns driver positions into HTTP requests, paces them, and records what came
//! back.
//!
//! Two pacings. Closed loop (default): every group of `--batch` drivers reports once per
//! `--interval`, and waits for its answer before the next report, like real devices do; latency is
//! the request's own time. Open loop (`--rate`): requests are due at fixed times whatever the server
//! does, and latency counts from the time a request was *due*, so a server that stalls cannot hide
//! the queue it causes (no coordinated omission). The open-loop schedule runs on its own thread:
//! tokio's timer has 1 ms granularity, which would add up to a millisecond to every measurement.
//!
//! `--concurrency` caps requests in flight with a semaphore. A request waiting for a slot is not
//! dropped: it is sent late (and its latency shows it), or, if the run ends first, counted as not
//! sent.

use super::city::{City, VirtualDriver};
use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;

/// A request gets this long to be answered before it counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The open-loop scheduler spins rather than sleeps this close to a due time.
const SPIN: Duration = Duration::from_micros(100);
/// The open-loop scheduler checks this often whether the run was interrupted.
const WAKE_EVERY: Duration = Duration::from_millis(50);
/// Longest error detail kept per error kind.
const MAX_DETAIL: usize = 300;

/// When the run happens and how requests are shaped.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub start: Instant,
    pub stop: Instant,
    /// Positions per request.
    pub batch: usize,
    /// Closed loop: how often each driver reports.
    pub interval: Duration,
    /// Open loop: requests per second.
    pub rate: Option<f64>,
}

/// Why a request failed, as shown in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    Http(u16),
    Connect,
    Timeout,
    Transport,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Http(code) => write!(f, "HTTP {code}"),
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Transport => f.write_str("transport"),
        }
    }
}

/// How often one kind of error happened, and what the first one said.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorTally {
    pub count: u64,
    pub first: String,
}

/// One failed request.
struct Failure {
    kind: ErrorKind,
    detail: String,
}

impl Failure {
    fn transport(e: &reqwest::Error) -> Failure {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_connect() {
            ErrorKind::Connect
        } else {
            ErrorKind::Transport
        };
        Failure {
            kind,
            detail: error_chain(e),
        }
    }

    fn http(status: reqwest::StatusCode, body: &[u8]) -> Failure {
        Failure {
            kind: ErrorKind::Http(status.as_u16()),
            detail: String::from_utf8_lossy(body).into_owned(),
        }
    }
}

/// An error and its causes on one line (`a: b: c`), as reqwest hides the useful part in sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Running totals, readable while the run goes on.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests that were due (scheduled).
    pub due: AtomicU64,
    /// Requests that went out.
    pub sent: AtomicU64,
    /// Positions in the requests that went out.
    pub positions: AtomicU64,
    /// Requests answered with 2xx.
    pub ok: AtomicU64,
    /// Requests answered otherwise or failed in transport.
    pub failed: AtomicU64,
}

/// What was measured, copied out at the end.
pub struct Outcome {
    pub due: u64,
    pub sent: u64,
    pub positions: u64,
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<ErrorKind, ErrorTally>,
    /// Latency of 2xx answers, in microseconds.
    pub latency: Histogram<u64>,
}

struct Recorded {
    latency: Histogram<u64>,
    errors: BTreeMap<ErrorKind, ErrorTally>,
}

/// One request, ready to go.
struct Prepared {
    body: Vec<u8>,
    positions: u64,
}

/// Everything the request tasks share.
pub struct Load {
    client: reqwest::Client,
    url: String,
    gate: Semaphore,
    slots: usize,
    open_loop: bool,
    pub counters: Counters,
    recorded: Mutex<Recorded>,
}

/// The HTTP client every request shares: one connection pool, sized to the concurrency cap.
pub fn client(concurrency: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")
}

impl Load {
    /// `base` is the server's URL without a trailing slash.
    pub fn new(
        client: reqwest::Client,
        base: &str,
        plan: &Plan,
        slots: usize,
    ) -> anyhow::Result<Load> {
        let latency = Histogram::new(3).context("cannot create the latency histogram")?;
        let path = if plan.batch > 1 {
            "/v1/locations/batch"
        } else {
            "/v1/locations"
        };
        Ok(Load {
            client,
            url: format!("{base}{path}"),
            gate: Semaphore::new(slots),
            slots,
            open_loop: plan.rate.is_some(),
            counters: Counters::default(),
            recorded: Mutex::new(Recorded {
                latency,
                errors: BTreeMap::new(),
            }),
        })
    }

    /// Ends the run: requests still waiting for a slot give up (they count as not sent).
    pub fn close(&self) {
        self.gate.close();
    }

    /// Requests out and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.slots.saturating_sub(self.gate.available_permits())
    }

    /// The totals and histogram; call after the run has drained.
    pub fn outcome(&self) -> Outcome {
        let c = &self.counters;
        let recorded = self.recorded.lock();
        Outcome {
            due: c.due.load(Relaxed),
            sent: c.sent.load(Relaxed),
            positions: c.positions.load(Relaxed),
            ok: c.ok.load(Relaxed),
            failed: c.failed.load(Relaxed),
            errors: recorded.errors.clone(),
            latency: recorded.latency.clone(),
        }
    }

    /// Sends one request (the caller holds a slot) and records its answer. `due` is when the
    /// schedule wanted it sent; only open loop measures from there.
    async fn send(&self, request: Prepared, due: Instant) {
        self.counters.sent.fetch_add(1, Relaxed);
        self.counters
            .positions
            .fetch_add(request.positions, Relaxed);
        let started = if self.open_loop { due } else { Instant::now() };
        let result = self.post(request.body).await;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(()) => {
                self.counters.ok.fetch_add(1, Relaxed);
                record_latency(&mut self.recorded.lock().latency, micros);
            }
            Err(failure) => {
                self.counters.failed.fetch_add(1, Relaxed);
                self.record_failure(failure);
            }
        }
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), Failure> {
        let response = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::transport(&e))?;
        let status = response.status();
        // Read the whole answer, so the connection goes back to the pool.
        let answer = response.bytes().await.map_err(|e| Failure::transport(&e))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure::http(status, &answer))
        }
    }

    fn record_failure(&self, failure: Failure) {
        let mut recorded = self.recorded.lock();
        let tally = recorded
            .errors
            .entry(failure.kind)
            .or_insert_with(|| ErrorTally {
                count: 0,
                first: truncate(failure.detail, MAX_DETAIL),
            });
        tally.count += 1;
    }
}

/// Records one latency, growing the histogram as needed (`saturating_record` would clamp to the
/// histogram's current, small, upper bound instead).
fn record_latency(histogram: &mut Histogram<u64>, micros: u64) {
    if histogram.record(micros).is_err() {
        histogram.saturating_record(micros);
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// One position on the wire, in the shape `POST /v1/locations` takes.
#[derive(Serialize)]
struct WirePosition<'a> {
    driver_id: &'a str,
    latitude: f64,
    longitude: f64,
    status: &'static str,
    timestamp: &'a str,
    speed_mps: f64,
    heading_deg: f64,
}

#[derive(Serialize)]
struct WireBatch<'a> {
    locations: &'a [WirePosition<'a>],
}

/// Rounds to 6 decimals (about 11 cm), what the server keeps.
fn round6(degrees: f64) -> f64 {
    (degrees * 1e6).round() / 1e6
}

/// Advances `drivers` to `clock_s` and encodes their positions: one object for a single driver, a
/// `{"locations":[...]}` batch otherwise (the URL was chosen by the batch size, so they agree).
fn encode<'a>(
    city: &City,
    drivers: impl Iterator<Item = &'a mut VirtualDriver>,
    clock_s: f64,
    at: DateTime<Utc>,
    batch: bool,
) -> Prepared {
    let timestamp = at.to_rfc3339_opts(SecondsFormat::Millis, true);
    let positions: Vec<WirePosition> = drivers
        .map(|d| {
            d.advance_to(city, clock_s);
            let fix = d.fix(city);
            WirePosition {
                driver_id: d.id(),
                latitude: round6(fix.latitude),
                longitude: round6(fix.longitude),
                status: fix.status.as_str(),
                timestamp: &timestamp,
                speed_mps: (fix.speed_mps * 10.0).round() / 10.0,
                heading_deg: fix.heading_deg,
            }
        })
        .collect();
    // Serializing plain structs cannot fail; were it to, the empty body would show as an HTTP 400.
    let body = match (batch, positions.as_slice()) {
        (false, [one]) => serde_json::to_vec(one),
        _ => serde_json::to_vec(&WireBatch {
            locations: &positions,
        }),
    };
    Prepared {
        body: body.unwrap_or_default(),
        positions: positions.len() as u64,
    }
}

/// Closed loop: one task per group of `plan.batch` drivers, first reports spread evenly over one
/// interval so the server sees a steady stream rather than a thundering herd.
pub fn start_closed(load: &Arc<Load>, city: &Arc<City>, drivers: Vec<VirtualDriver>, plan: Plan) {
    let groups = drivers.len().div_ceil(plan.batch.max(1));
    let mut drivers = drivers.into_iter();
    for g in 0..groups {
        let group: Vec<VirtualDriver> = drivers.by_ref().take(plan.batch).collect();
        let first = plan.start + plan.interval.mul_f64(g as f64 / groups as f64);
        tokio::spawn(closed_group(load.clone(), city.clone(), group, first, plan));
    }
}

async fn closed_group(
    load: Arc<Load>,
    city: Arc<City>,
    mut drivers: Vec<VirtualDriver>,
    first: Instant,
    plan: Plan,
) {
    let mut ticker = tokio::time::interval_at(first.into(), plan.interval);
    // After a slow answer, skip the missed reports instead of bursting to catch up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let stop = tokio::time::Instant::from_std(plan.stop);
    let batch = plan.batch > 1;
    while let Ok(due) = tokio::time::timeout_at(stop, ticker.tick()).await {
        if due >= stop || load.gate.is_closed() {
            return;
        }
        load.counters.due.fetch_add(1, Relaxed);
        let Ok(_slot) = load.gate.acquire().await else {
            return; // the run ended while waiting for a slot
        };
        let clock_s = plan.start.elapsed().as_secs_f64();
        let request = encode(&city, drivers.iter_mut(), clock_s, Utc::now(), batch);
        load.send(request, due.into_std()).await;
    }
}

/// Open loop: a thread that makes request `i` due at `start + i / rate`, each carrying the next
/// `plan.batch` drivers round-robin, and hands it to the runtime. Returns when the run's time is up.
pub fn start_open(
    load: &Arc<Load>,
    city: City,
    drivers: Vec<VirtualDriver>,
    plan: Plan,
    rate: f64,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::current();
    let load = load.clone();
    std::thread::Builder::new()
        .name("sim-schedule".into())
        .spawn(move || open_schedule(&load, &runtime, &city, drivers, plan, rate))
        .context("cannot start the scheduler thread")
}

fn open_schedule(
    load: &Arc<Load>,
    runtime: &tokio::runtime::Handle,
    city: &City,
    mut drivers: Vec<VirtualDriver>,
    plan: Plan,
    rate: f64,
) {
    let batch = plan.batch.min(drivers.len());
    let planned = due_before(plan.stop, plan.start, rate);
    let mut next = 0usize;
    for i in 0..planned {
        if load.gate.is_closed() || Instant::now() >= plan.stop {
            // Ended (Ctrl-C) or fell behind: what was due by now and not made counts as not sent.
            let overdue = due_before(Instant::now(), plan.start, rate).min(planned);
            load.counters
                .due
                .fetch_add(overdue.saturating_sub(i), Relaxed);
            return;
        }
        let due = plan.start + Duration::from_secs_f64(i as f64 / rate);
        // Encode ahead, for the due time, so that only the sending counts in the latency.
        let ahead = due.saturating_duration_since(Instant::now());
        let at = Utc::now() + chrono::Duration::from_std(ahead).unwrap_or_default();
        let clock_s = due.duration_since(plan.start).as_secs_f64();
        let drivers_now = round_robin(&mut drivers, next, batch);
        let request = encode(city, drivers_now, clock_s, at, batch > 1);
        next = (next + batch) % drivers.len().max(1);
        if !wait_until(due, &load.gate) {
            return; // interrupted before this one was due
        }
        load.counters.due.fetch_add(1, Relaxed);
        runtime.spawn(open_request(load.clone(), request, due));
    }
}

/// Sleeps until shortly before `time`, then spins: a plain sleep wakes tens of microseconds late
/// (timer slack), which would show in every open-loop latency. Sleeps in short steps so that an
/// interrupted run (the gate closed) ends at once even at a low rate; false when it was.
fn wait_until(time: Instant, gate: &Semaphore) -> bool {
    while let Some(wait) = time.checked_duration_since(Instant::now() + SPIN) {
        if gate.is_closed() {
            return false;
        }
        std::thread::sleep(wait.min(WAKE_EVERY));
    }
    while Instant::now() < time {
        std::hint::spin_loop();
    }
    !gate.is_closed()
}

/// How many requests of the schedule `start + i / rate` are due before `time`.
fn due_before(time: Instant, start: Instant, rate: f64) -> u64 {
    (time.saturating_duration_since(start).as_secs_f64() * rate).ceil() as u64
}

/// `count` drivers starting at `from`, wrapping around the end.
fn round_robin(
    drivers: &mut [VirtualDriver],
    from: usize,
    count: usize,
) -> impl Iterator<Item = &mut VirtualDriver> {
    let (head, tail) = drivers.split_at_mut(from.min(drivers.len()));
    tail.iter_mut().chain(head.iter_mut()).take(count)
}

async fn open_request(load: Arc<Load>, request: Prepared, due: Instant) {
    // Waiting here is part of the measured latency: the request was due at `due`.
    if let Ok(_slot) = load.gate.acquire().await {
        load.send(request, due).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{now_micros, validate_position, PositionInput};

    fn city() -> City {
        "31.2300,121.4700,31.2354,121.4763".parse().unwrap()
    }

    fn fleet(city: &City, n: u32) -> Vec<VirtualDriver> {
        (0..n).map(|i| VirtualDriver::new(city, 9, i)).collect()
    }

    fn accepted_by_the_server(value: serde_json::Value) {
        let input: PositionInput = serde_json::from_value(value.clone()).unwrap();
        let position = validate_position(&input, now_micros());
        assert!(position.is_ok(), "{value}: {position:?}");
    }

    #[test]
    fn a_single_position_is_one_valid_object() {
        let city = city();
        let mut drivers = fleet(&city, 1);
        let request = encode(&city, drivers.iter_mut(), 2.0, Utc::now(), false);
        let value: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(request.positions, 1);
        assert_eq!(value["driver_id"], "sim-000000");
        assert!(value["timestamp"].as_str().unwrap().ends_with('Z'));
        accepted_by_the_server(value);
    }

    #[test]
    fn a_batch_holds_valid_positions_of_distinct_drivers() {
        let city = city();
        let mut drivers = fleet(&city, 5);
        let request = encode(
            &city,
            round_robin(&mut drivers, 3, 4),
            1.0,
            Utc::now(),
            true,
        );
        let value: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let locations = value["locations"].as_array().unwrap();
        let ids: Vec<&str> = locations
            .iter()
            .map(|l| l["driver_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            ["sim-000003", "sim-000004", "sim-000000", "sim-000001"]
        );
        assert_eq!(request.positions, 4);
        for location in locations {
            accepted_by_the_server(location.clone());
        }
    }

    #[test]
    fn the_open_schedule_counts_requests_due_strictly_before_a_time() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(due_before(at(0), start, 100.0), 0);
        assert_eq!(due_before(at(1), start, 100.0), 1); // request 0, due at 0 ms
        assert_eq!(due_before(at(1_000), start, 100.0), 100);
        assert_eq!(due_before(at(1_001), start, 100.0), 101);
    }

    #[test]
    fn latencies_of_any_size_are_kept_to_three_figures() {
        let mut h = Histogram::new(3).unwrap();
        for micros in [0, 150, 2_500, 10_000_000, u64::MAX] {
            record_latency(&mut h, micros);
        }
        assert_eq!(h.len(), 5);
        assert_eq!(h.value_at_quantile(0.5), 2_501);
        let ten_s = h.value_at_quantile(0.7);
        assert!(ten_s.abs_diff(10_000_000) < 10_000, "{ten_s}");
    }

    #[test]
    fn coordinates_have_at_most_six_decimals() {
        assert_eq!(round6(31.230_456_789), 31.230_457);
        assert_eq!(round6(-121.1), -121.1);
    }

    #[test]
    fn long_error_details_are_cut_on_a_char_boundary() {
        assert_eq!(truncate("héllo".into(), 2), "h…");
        assert_eq!(truncate("short".into(), 10), "short");
    }
}
