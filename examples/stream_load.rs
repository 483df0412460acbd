//! Load generator for the live streams (`GET /v1/stream`), used by `scripts/bench-streams`.
//!
//! ```sh
//! # N subscribers, each on its own cell of a 0.2°×0.2° box around 31.23N 121.47E, while positions
//! # are posted open-loop at RATE/s (batches of 1,000, drivers spread so each update lands in
//! # exactly one cell); latency = receive time − the message's `timestamp` (= the send time).
//! cargo run --release --example stream_load -- fanout --url http://127.0.0.1:8080 \
//!     --subscribers 1000 --rate 50000 --duration 20s
//! # N idle subscribers (tiny boxes with no drivers), held until Ctrl-C/SIGTERM or --hold.
//! cargo run --release --example stream_load -- idle --url http://127.0.0.1:8080 --connections 10000
//! ```
//! `fanout` ends with one `RESULT key=value ...` line; `idle` prints `held N` once all are open.

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Deserialize;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The city: a 0.2°×0.2° box around 31.23N 121.47E.
const WEST: f64 = 121.37;
const SOUTH: f64 = 31.13;
const SIZE: f64 = 0.2;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Subscribers on a grid of the city while positions are ingested.
    Fanout(FanoutArgs),
    /// Idle subscribers held open.
    Idle {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        connect_concurrency: usize,
        /// Exit after this long (default: wait for Ctrl-C or SIGTERM).
        #[arg(long, value_parser = humantime::parse_duration)]
        hold: Option<Duration>,
    },
}

#[derive(clap::Args)]
struct FanoutArgs {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Cells of the grid the drivers are spread over (subscriber i follows cell i).
    #[arg(long, default_value_t = 1000)]
    cells: usize,
    /// Positions per second, open loop; 0 = as fast as the server answers (closed loop).
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    #[arg(long, default_value_t = 100_000)]
    drivers: usize,
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent ingest tasks (each owns a disjoint set of drivers).
    #[arg(long, default_value_t = 4)]
    ingest_tasks: usize,
    /// Time to keep reading after the last request was answered.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    grace: Duration,
    /// Connections opened at a time.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    timestamp: Option<&'a str>,
    #[serde(default)]
    more: Option<bool>,
}

struct Grid {
    cells: usize,
    cols: usize,
    cw: f64,
    ch: f64,
}

impl Grid {
    fn new(cells: usize) -> Grid {
        let cols = (cells as f64).sqrt().ceil().max(1.0) as usize;
        let rows = cells.div_ceil(cols).max(1);
        Grid {
            cells,
            cols,
            cw: SIZE / cols as f64,
            ch: SIZE / rows as f64,
        }
    }
    /// `minLon,minLat,maxLon,maxLat` of cell `i`.
    fn bbox(&self, i: usize) -> String {
        let (x, y) = ((i % self.cols) as f64, (i / self.cols) as f64);
        let (w, s) = (WEST + x * self.cw, SOUTH + y * self.ch);
        format!("{:.6},{:.6},{:.6},{:.6}", w, s, w + self.cw, s + self.ch)
    }
    /// A random point well inside cell `i` (within ±30% of the cell around its centre).
    fn point(&self, i: usize, rng: &mut impl Rng) -> (f64, f64) {
        let (x, y) = ((i % self.cols) as f64, (i / self.cols) as f64);
        let lon = WEST + (x + 0.5 + rng.random_range(-0.3..0.3)) * self.cw;
        let lat = SOUTH + (y + 0.5 + rng.random_range(-0.3..0.3)) * self.ch;
        (lat, lon)
    }
}

fn ws_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        url.to_string()
    }
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

/// Connects and reads until the last snapshot part.
async fn subscribe(url: String) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    while let Some(message) = ws.next().await {
        if let Message::Text(text) = message? {
            let m: Incoming = serde_json::from_str(text.as_str())?;
            if m.kind == "snapshot" && m.more == Some(false) {
                return Ok(ws);
            }
        }
    }
    anyhow::bail!("closed before the snapshot")
}

/// Opens `urls` with at most `concurrency` handshakes at a time.
async fn open_all(urls: Vec<String>, concurrency: usize) -> (Vec<Ws>, usize) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for (i, url) in urls.into_iter().enumerate() {
        let permits = permits.clone();
        set.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            (i, subscribe(url).await)
        });
    }
    let mut opened = Vec::new();
    let mut failed = 0;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((_, Ok(ws))) => opened.push(ws),
            Ok((i, Err(e))) => {
                if failed < 5 {
                    eprintln!("subscriber {i}: {e}");
                }
                failed += 1;
            }
            Err(e) => {
                eprintln!("task: {e}");
                failed += 1;
            }
        }
    }
    (opened, failed)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

#[derive(Default)]
struct Received {
    latency: Option<Histogram<u64>>,
    positions: u64,
    removed: u64,
    closed_early: bool,
}

async fn read_positions(mut ws: Ws, stop: CancellationToken) -> Received {
    let mut r = Received {
        latency: Some(histogram()),
        ..Default::default()
    };
    let h = r.latency.as_mut().unwrap();
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            m = ws.next() => m,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                eprintln!("closed by server: {frame:?}");
                r.closed_early = true;
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                eprintln!("read error: {e}");
                r.closed_early = true;
                break;
            }
            None => {
                r.closed_early = true;
                break;
            }
        };
        let received = now_micros();
        let Ok(m) = serde_json::from_str::<Incoming>(text.as_str()) else {
            continue;
        };
        match m.kind {
            "position" => {
                r.positions += 1;
                if let Some(sent) = m
                    .timestamp
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                {
                    let latency = (received - sent.timestamp_micros()).max(1) as u64;
                    h.saturating_record(latency);
                }
            }
            "removed" => r.removed += 1,
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    r
}

#[derive(Default)]
struct IngestStats {
    accepted: AtomicU64,
    failed_requests: AtomicU64,
    requests: AtomicU64,
}

fn batch_body(grid: &Grid, drivers: &[usize], next: &mut usize, batch: usize) -> String {
    let mut rng = rand::rng();
    let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut body = String::with_capacity(batch * 120 + 16);
    body.push_str(r#"{"locations":["#);
    for k in 0..batch {
        let d = drivers[*next % drivers.len()];
        *next += 1;
        let (lat, lon) = grid.point(d % grid.cells, &mut rng);
        if k > 0 {
            body.push(',');
        }
        let _ = write!(
            body,
            r#"{{"driver_id":"drv-{d}","latitude":{lat:.6},"longitude":{lon:.6},"status":"online","timestamp":"{ts}"}}"#
        );
    }
    body.push_str("]}");
    body
}

async fn post(
    client: reqwest::Client,
    url: String,
    body: String,
    stats: Arc<IngestStats>,
) -> Option<u64> {
    let started = Instant::now();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let result = client
        .post(&url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match result {
        Ok(response) if response.status().as_u16() == 202 => {
            let accepted = response
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["accepted"].as_u64())
                .unwrap_or(0);
            stats.accepted.fetch_add(accepted, Ordering::Relaxed);
            Some(started.elapsed().as_micros() as u64)
        }
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            if stats.failed_requests.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("ingest: {status} {}", &text[..text.len().min(200)]);
            }
            None
        }
        Err(e) => {
            if stats.failed_requests.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("ingest: {e}");
            }
            None
        }
    }
}

async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    let FanoutArgs {
        url,
        subscribers,
        cells,
        rate,
        duration,
        drivers,
        batch,
        ingest_tasks: tasks,
        grace,
        connect_concurrency: concurrency,
    } = args;
    let url = url.trim_end_matches('/').to_string();
    let cells = cells.max(subscribers).max(1);
    let grid = Arc::new(Grid::new(cells));
    let ws = ws_url(&url);
    let urls: Vec<String> = (0..subscribers)
        .map(|i| format!("{ws}/v1/stream?bbox={}", grid.bbox(i)))
        .collect();
    let t = Instant::now();
    let (opened, failed_subscribers) = open_all(urls, concurrency).await;
    eprintln!(
        "{} subscribers open ({} failed) in {:.1} s",
        opened.len(),
        failed_subscribers,
        t.elapsed().as_secs_f64()
    );
    let stop = CancellationToken::new();
    let readers: Vec<_> = opened
        .into_iter()
        .map(|ws| tokio::spawn(read_positions(ws, stop.clone())))
        .collect();

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?;
    let stats = Arc::new(IngestStats::default());
    let tasks = tasks.max(1);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let deadline = start + duration;
    let batch_url = format!("{url}/v1/locations/batch");
    let mut ingest = JoinSet::new();
    for task in 0..tasks {
        let own: Vec<usize> = (task..drivers).step_by(tasks).collect();
        let (client, grid, stats, batch_url) = (
            client.clone(),
            grid.clone(),
            stats.clone(),
            batch_url.clone(),
        );
        ingest.spawn(async move {
            let mut latencies = histogram();
            let mut next = 0usize;
            if rate == 0 {
                tokio::time::sleep_until(start).await;
                while tokio::time::Instant::now() < deadline {
                    let body = batch_body(&grid, &own, &mut next, batch);
                    if let Some(l) =
                        post(client.clone(), batch_url.clone(), body, stats.clone()).await
                    {
                        latencies.saturating_record(l);
                    }
                }
            } else {
                let period = Duration::from_secs_f64(batch as f64 * tasks as f64 / rate as f64);
                // Spread the tasks' schedules over one period.
                let mut due = start + period.mul_f64(task as f64 / tasks as f64);
                let mut inflight = JoinSet::new();
                while due < deadline {
                    tokio::time::sleep_until(due).await;
                    let body = batch_body(&grid, &own, &mut next, batch);
                    inflight.spawn(post(client.clone(), batch_url.clone(), body, stats.clone()));
                    due += period;
                    while let Some(done) = inflight.try_join_next() {
                        if let Ok(Some(l)) = done {
                            latencies.saturating_record(l);
                        }
                    }
                }
                while let Some(done) = inflight.join_next().await {
                    if let Ok(Some(l)) = done {
                        latencies.saturating_record(l);
                    }
                }
            }
            latencies
        });
    }
    let mut request_latency = histogram();
    while let Some(h) = ingest.join_next().await {
        request_latency.add(h?)?;
    }
    let ingest_elapsed = (tokio::time::Instant::now() - start).as_secs_f64();
    let accepted = stats.accepted.load(Ordering::Relaxed);
    tokio::time::sleep(grace).await;
    stop.cancel();

    let mut latency = histogram();
    let (mut delivered, mut removed, mut closed_early) = (0u64, 0u64, 0usize);
    for reader in readers {
        let r = reader.await?;
        latency.add(r.latency.unwrap())?;
        delivered += r.positions;
        removed += r.removed;
        closed_early += r.closed_early as usize;
    }
    // Updates of drivers in followed cells (driver d is in cell d % cells).
    let followed_share = subscribers as f64 / cells as f64;
    let expected = (accepted as f64 * followed_share).round() as u64;
    let q = |h: &Histogram<u64>, p: f64| ms(h.value_at_quantile(p));
    println!(
        "RESULT subscribers={} failed_subscribers={} closed_early={} rate={} duration_s={:.1} \
         accepted={} ingest_pps={:.0} requests={} failed_requests={} \
         req_p50_ms={:.2} req_p99_ms={:.2} req_max_ms={:.2} \
         expected={} delivered={} removed={} \
         lat_p50_ms={:.2} lat_p99_ms={:.2} lat_p999_ms={:.2} lat_max_ms={:.2}",
        subscribers,
        failed_subscribers,
        closed_early,
        rate,
        ingest_elapsed,
        accepted,
        accepted as f64 / ingest_elapsed,
        stats.requests.load(Ordering::Relaxed),
        stats.failed_requests.load(Ordering::Relaxed),
        q(&request_latency, 0.5),
        q(&request_latency, 0.99),
        ms(request_latency.max()),
        expected,
        delivered,
        removed,
        q(&latency, 0.5),
        q(&latency, 0.99),
        q(&latency, 0.999),
        ms(latency.max()),
    );
    Ok(())
}

async fn idle(
    url: String,
    connections: usize,
    concurrency: usize,
    hold: Option<Duration>,
) -> anyhow::Result<()> {
    let ws = ws_url(&url);
    // Tiny boxes in the South Pacific, one per connection, where no driver is.
    let urls: Vec<String> = (0..connections)
        .map(|i| {
            let w = -150.0 + (i % 1000) as f64 * 0.01;
            let s = -50.0 + (i / 1000) as f64 * 0.01;
            format!(
                "{ws}/v1/stream?bbox={w:.6},{s:.6},{:.6},{:.6}",
                w + 0.001,
                s + 0.001
            )
        })
        .collect();
    let t = Instant::now();
    let (opened, failed) = open_all(urls, concurrency).await;
    let held = opened.len();
    let stop = CancellationToken::new();
    let closed = Arc::new(AtomicU64::new(0));
    let mut readers = JoinSet::new();
    for mut ws in opened {
        let (stop, closed) = (stop.clone(), closed.clone());
        // Keep reading so that pings are answered.
        readers.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    m = ws.next() => match m {
                        Some(Ok(_)) => {}
                        _ => { closed.fetch_add(1, Ordering::Relaxed); return; }
                    },
                }
            }
            let _ = ws.close(None).await;
        });
    }
    eprintln!(
        "opened {held} in {:.1} s ({failed} failed)",
        t.elapsed().as_secs_f64()
    );
    println!("held {held} failed {failed}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let wait = async {
        match hold {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = wait => {}
    }
    println!(
        "closing; {} closed by the server meanwhile",
        closed.load(Ordering::Relaxed)
    );
    stop.cancel();
    while readers.join_next().await.is_some() {}
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().mode {
        Mode::Fanout(args) => fanout(args).await,
        Mode::Idle {
            url,
            connections,
            connect_concurrency,
            hold,
        } => idle(url, connections, connect_concurrency.max(1), hold).await,
    }
}
