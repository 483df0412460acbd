//! `fleettracker simulate`: virtual drivers that move along a street grid and post their positions
//! to a running server, then a table of what the server did under that load.
//!
//! It is two tools in one. For a new user it is the quickest way to see the server work: start
//! `serve`, start `simulate`, and `/v1/stats` and nearby searches fill with plausible traffic. For
//! whoever runs the service it is the synthetic load and the latency probe: the pacing and the
//! measurement (see [`load`]) follow the rules that keep the numbers honest.
//!
//! [`city`] moves the drivers, [`load`] paces and sends the requests, [`progress`] draws the live
//! line, [`report`] prints the final table. This file checks the settings and runs the phases:
//! check the server is there, run for `--duration` (or until Ctrl-C), drain, report.

pub mod city;
pub mod load;
mod progress;
pub mod report;

use crate::config::SimulateConfig;
use anyhow::{anyhow, bail, Context};
use city::{City, VirtualDriver};
use load::{Load, Outcome, Plan};
use progress::Progress;
use report::Summary;
use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest wait for the answers still in flight when the run ends.
const DRAIN_DEADLINE: Duration = Duration::from_secs(3);
/// Longest wait for `GET /health` before the run starts.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Highest accepted `--rate`, in requests per second.
const MAX_RATE: f64 = 1_000_000.0;

/// Runs the simulation; fails when the settings are wrong, the server cannot be reached, or no
/// request succeeded.
pub async fn run(config: SimulateConfig) -> anyhow::Result<()> {
    let base = base_url(&config.url)?;
    let city: City = config.city.parse().map_err(|e| {
        anyhow!(
            "invalid --city {:?}: {e} (expected min_lat,min_lon,max_lat,max_lon, \
             e.g. 31.13,121.35,31.33,121.60)",
            config.city
        )
    })?;
    check_pacing(&config)?;
    let concurrency = usize::try_from(config.concurrency).unwrap_or(usize::MAX);
    let client = load::client(concurrency)?;
    check_health(&client, &base).await?;

    let drivers: Vec<VirtualDriver> = (0..config.drivers)
        .map(|i| VirtualDriver::new(&city, config.seed, i))
        .collect();
    let start = Instant::now();
    let plan = Plan {
        start,
        stop: start + config.duration,
        batch: (config.batch as usize).min(drivers.len()),
        interval: config.interval,
        rate: config.rate,
    };
    let load = Arc::new(Load::new(client, &base, &plan, concurrency)?);
    let scheduler = start_load(&load, city, drivers, plan)?;

    let mut progress = Progress::new(config.quiet, config.duration);
    let interrupted = watch(&load, &mut progress, plan).await;
    let ran = start.elapsed();
    load.close();
    if let Some(thread) = scheduler {
        join(thread).await?;
    }
    drain(&load, &progress).await;
    progress.finish();

    let summary = Summary {
        mode: describe(&config, plan, interrupted),
        target_rate: target_rate(&config, plan),
        elapsed: ran,
        concurrency,
        outcome: load.outcome(),
    };
    print!("{}", report::render(&summary));
    std::io::stdout().flush().ok();
    verdict(&summary.outcome)
}

/// The server's URL without a trailing slash; only plain `http://` (this build has no TLS).
fn base_url(text: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(text).with_context(|| format!("invalid --url {text:?}"))?;
    match url.scheme() {
        "http" => Ok(text.trim_end_matches('/').to_string()),
        "https" => bail!("invalid --url {text:?}: https is not supported, use http://"),
        other => bail!("invalid --url {text:?}: the scheme must be http, got {other}"),
    }
}

fn check_pacing(config: &SimulateConfig) -> anyhow::Result<()> {
    if config.duration.is_zero() {
        bail!("--duration must be more than 0");
    }
    match config.rate {
        Some(rate) if !(rate > 0.0 && rate <= MAX_RATE) => {
            bail!(
                "--rate must be more than 0 and at most {MAX_RATE} requests per second, got {rate}"
            )
        }
        None if config.interval.is_zero() => bail!("--interval must be more than 0"),
        _ => Ok(()),
    }
}

/// Fails fast, with the reason, when nothing answers at `base`: better than a table of errors.
async fn check_health(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let response = client
        .get(format!("{base}/health"))
        .timeout(HEALTH_TIMEOUT)
        .send()
        .await
        .map_err(|e| {
            anyhow!(
                "cannot reach server at {base}: {} (is `fleettracker serve` running there?)",
                load::error_chain(&e)
            )
        })?;
    let status = response.status();
    if !status.is_success() {
        bail!("server at {base} answered GET /health with {status}");
    }
    Ok(())
}

/// Starts the request tasks; open loop also returns its scheduler thread.
fn start_load(
    load: &Arc<Load>,
    city: City,
    drivers: Vec<VirtualDriver>,
    plan: Plan,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    match plan.rate {
        Some(rate) => load::start_open(load, city, drivers, plan, rate).map(Some),
        None => {
            load::start_closed(load, &Arc::new(city), drivers, plan);
            Ok(None)
        }
    }
}

/// Redraws the progress line until the run's time is up; true when Ctrl-C ended it early.
async fn watch(load: &Load, progress: &mut Progress, plan: Plan) -> bool {
    let stop = tokio::time::Instant::from_std(plan.stop);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        progress.update(plan.start.elapsed(), &load.counters);
        let next = (tokio::time::Instant::now() + PROGRESS_EVERY).min(stop);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut ctrl_c => return true,
        }
        if next >= stop {
            progress.update(plan.start.elapsed(), &load.counters);
            return false;
        }
    }
}

async fn join(thread: JoinHandle<()>) -> anyhow::Result<()> {
    match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(())) => Ok(()),
        _ => bail!("the request scheduler stopped unexpectedly"),
    }
}

/// Waits, up to [`DRAIN_DEADLINE`], for the requests in flight to be answered.
async fn drain(load: &Load, progress: &Progress) {
    let deadline = Instant::now() + DRAIN_DEADLINE;
    while load.in_flight() > 0 && Instant::now() < deadline {
        progress.draining(load.in_flight());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How the load was paced, in words, for the table.
fn describe(config: &SimulateConfig, plan: Plan, interrupted: bool) -> String {
    let per_request = match plan.batch {
        1 => "1 position per request".to_string(),
        n => format!("{n} positions per request"),
    };
    let pacing = match plan.rate {
        Some(rate) => format!(
            "open loop, {} req/s at fixed times, {} drivers round-robin",
            report::one_decimal(rate),
            report::thousands(config.drivers.into())
        ),
        None => format!(
            "closed loop, {} drivers each every {}",
            report::thousands(config.drivers.into()),
            humantime::format_duration(config.interval)
        ),
    };
    let end = if interrupted { ", interrupted" } else { "" };
    format!("{pacing}, {per_request}{end}")
}

/// Requests per second the pacing aims at.
fn target_rate(config: &SimulateConfig, plan: Plan) -> f64 {
    match plan.rate {
        Some(rate) => rate,
        None => {
            let groups = (config.drivers as usize).div_ceil(plan.batch.max(1));
            groups as f64 / config.interval.as_secs_f64()
        }
    }
}

/// Ok unless not one request succeeded: then the exit status says so too.
fn verdict(outcome: &Outcome) -> anyhow::Result<()> {
    match (outcome.ok, outcome.sent) {
        (0, 0) => bail!("no request was sent"),
        (0, sent) => bail!("all {sent} requests failed; see the errors above"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

    fn config(args: &[&str]) -> SimulateConfig {
        let argv = ["fleettracker", "simulate"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Simulate(c) => c,
            Command::Serve(_) | Command::Keys(_) => panic!("simulate expected"),
        }
    }

    #[test]
    fn base_url_is_plain_http_without_trailing_slash() {
        assert_eq!(
            base_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(base_url("https://x")
            .unwrap_err()
            .to_string()
            .contains("https"));
        assert!(base_url("localhost:8080").is_err());
        assert!(base_url("not a url").is_err());
    }

    #[test]
    fn pacing_must_be_positive() {
        assert!(check_pacing(&config(&[])).is_ok());
        assert!(check_pacing(&config(&["--duration", "0s"])).is_err());
        assert!(check_pacing(&config(&["--interval", "0s"])).is_err());
        assert!(check_pacing(&config(&["--interval", "0s", "--rate", "5"])).is_ok());
        for bad in ["0", "-1", "NaN", "inf", "2000000"] {
            let arg = format!("--rate={bad}");
            assert!(check_pacing(&config(&[&arg])).is_err(), "{bad}");
        }
    }

    #[test]
    fn target_rate_follows_the_pacing() {
        let plan = |batch| Plan {
            start: Instant::now(),
            stop: Instant::now(),
            batch,
            interval: Duration::from_secs(2),
            rate: None,
        };
        let c = config(&["--drivers", "1000", "--interval", "2s", "--batch", "300"]);
        assert_eq!(target_rate(&c, plan(300)), 2.0); // 4 requests every 2 s
        let c = config(&["--drivers", "1000", "--interval", "2s"]);
        assert_eq!(target_rate(&c, plan(1)), 500.0);
        let mut open = plan(1);
        open.rate = Some(42.0);
        assert_eq!(target_rate(&c, open), 42.0);
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_fast_with_the_url() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let client = load::client(1).unwrap();
        let started = Instant::now();
        let err = check_health(&client, &base).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("cannot reach server at {base}: ")),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
