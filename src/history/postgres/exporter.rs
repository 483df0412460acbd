//! The worker's own `/metrics` when it runs as a process of its own (`fleettracker worker
//! --metrics-listen ADDR`).
//!
//! Inside `serve --embedded-worker` the worker's series are on the server's `/metrics`; a separate
//! worker process has no HTTP server, so without this its lag, throughput and errors could not be
//! scraped — and `history_stream_lag_entries` is what the "stream lag growing" alert watches. Two
//! routes only: `GET /metrics` (Prometheus text) and `GET /health`. No keys: bind it to an internal
//! address. The exposition also carries the server's pre-registered series at zero (one metrics
//! registry type for both), which leaves fleet-wide sums unchanged.

use crate::metrics::Metrics;
use anyhow::Context;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds `listen` (failing now if it cannot), then serves `/metrics` from `metrics` until
/// `shutdown`. Returns the bound address (port 0 picks one).
pub async fn start(
    listen: SocketAddr,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for metrics"))?;
    let address = listener.local_addr()?;
    let scrape = metrics.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = scrape.render(None);
                async move {
                    (
                        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        text,
                    )
                }
            }),
        )
        .route("/health", get(|| async { "ok" }));
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "worker metrics endpoint stopped");
        }
    });
    Ok(address)
}
