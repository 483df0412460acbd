//! `fleettracker serve`: wires the tracker to the HTTP API, runs the background jobs, and shuts down
//! gracefully (readiness goes 503, in-flight requests finish, exit 0) on SIGINT or SIGTERM.

use crate::api;
use crate::config::{LogFormat, ServeConfig};
use crate::metrics::Metrics;
use crate::tracker::Tracker;
use anyhow::Context;
use axum::serve::ListenerExt;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Sets up logging; `RUST_LOG` overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// How often silent drivers are swept out: often enough that counts lag the TTL by little.
fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let tracker = Arc::new(Tracker::new(config.driver_ttl, Metrics::new()));
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    let shutdown = shutdown_signal(tracker.clone())?;
    spawn_background_jobs(&tracker, config.driver_ttl);

    tracing::info!(%address, data_dir = %config.data_dir.display(), driver_ttl = ?config.driver_ttl, "fleettracker started");
    println!("fleettracker listening on http://{address}");
    std::io::stdout().flush().ok();

    let app = api::router(tracker.clone());
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("server error")?;
    tracing::info!("fleettracker stopped");
    Ok(())
}

fn spawn_background_jobs(tracker: &Arc<Tracker>, ttl: Duration) {
    let sweeper = tracker.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep_interval(ttl));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let t = sweeper.clone();
            let removed = tokio::task::spawn_blocking(move || t.expire())
                .await
                .unwrap_or(0);
            if removed > 0 {
                tracing::debug!(removed, "expired silent drivers");
            }
        }
    });
    let upkeep = tracker.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            upkeep.metrics().run_upkeep();
        }
    });
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are registered when this is *called*, before
/// the address is printed, so a signal sent as soon as the server is up is never fatal.
fn shutdown_signal(tracker: Arc<Tracker>) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        tracker.set_ready(false);
        tracing::info!("shutdown requested: draining in-flight requests");
    })
}
