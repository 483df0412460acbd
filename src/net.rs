//! The connection layer: accepts TCP (optionally TLS) connections and serves HTTP/1.1 on each, with
//! the limits that keep a slow or hostile client from wedging the server.
//!
//! The loop is ours rather than `axum::serve` so that every connection setting lives here:
//! - at most `--max-connections` open at once (streams included); one more gets a canned 503 and is
//!   closed at once, before anything of it is read, so a connection flood costs one accept each;
//! - a request head must arrive within `--idle-timeout` of the connection opening or of the previous
//!   response (hyper's header timer; it does not restart per byte, so a slow-loris client trickling
//!   a header is cut off), and may be at most `--max-header-bytes` (431 beyond);
//! - bodies are bounded in size and time by the JSON extractor (`--body-timeout`, 408);
//! - the TLS handshake must finish within the idle timeout too.
//!
//! Shutdown: stop accepting, let every connection finish the request in flight (at most
//! [`DRAIN_LIMIT`]), then return.

use crate::config::ConnectionLimits;
use crate::metrics::Metrics;
use anyhow::Context;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest a shutdown waits for in-flight requests before closing their connections.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// What a connection over the limit is told before it is closed.
fn over_capacity_response() -> Vec<u8> {
    let body = r#"{"error":{"code":"too_many_connections","message":"the server is at its connection limit; retry later"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The HTTP server's settings, read once at start-up.
pub struct Endpoint {
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    metrics: Metrics,
}

impl Endpoint {
    /// Reads the TLS certificate and key when configured (a bad file stops start-up).
    pub fn new(limits: &ConnectionLimits, metrics: &Metrics) -> anyhow::Result<Endpoint> {
        let tls = match (&limits.tls_cert, &limits.tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        metrics.describe_gauge(
            "http_connections",
            "Open HTTP connections (streams included).",
        );
        metrics.describe_counter(
            "http_connections_refused_total",
            "Connections closed at once because --max-connections were open.",
        );
        Ok(Endpoint {
            limits: limits.clone(),
            tls,
            metrics: metrics.clone(),
        })
    }

    /// `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Serves `app` on `listener` until `shutdown` resolves, then drains.
    pub async fn serve(
        &self,
        listener: TcpListener,
        app: crate::api::App,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let draining = CancellationToken::new();
        let connections = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(self.limits.max_connections as usize));
        let open = self.metrics.gauge("http_connections", &[]);
        let refused = self.metrics.counter("http_connections_refused_total", &[]);
        let over_capacity = over_capacity_response();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.limits.idle_timeout)
            .max_header_size(self.limits.max_header_bytes as usize);
        let http = Arc::new(http);
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused.increment(1);
                // Never waits on the client: whatever does not fit the socket buffer is dropped.
                let _ = stream.try_write(&over_capacity);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (app, http, draining, tls, open) = (
                app.clone(),
                http.clone(),
                draining.clone(),
                self.tls.clone(),
                open.clone(),
            );
            let handshake_limit = self.limits.idle_timeout;
            connections.spawn(async move {
                open.increment(1.0);
                match tls {
                    None => serve_one(&http, stream, app, draining).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(handshake_limit, acceptor.accept(stream)).await {
                            Ok(Ok(tls_stream)) => serve_one(&http, tls_stream, app, draining).await,
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                }
                open.decrement(1.0);
                drop(slot);
            });
        }
        drop(listener);
        draining.cancel();
        connections.close();
        if tokio::time::timeout(DRAIN_LIMIT, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests still running after {DRAIN_LIMIT:?}; closing them");
        }
    }
}

/// Serves HTTP/1.1 (with upgrades, for WebSocket) on one connection until it ends or, once
/// draining, until its in-flight request is answered.
async fn serve_one<IO>(
    http: &hyper::server::conn::http1::Builder,
    io: IO,
    app: crate::api::App,
    draining: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let connection = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = draining.cancelled() => {
            // Finish the request in flight, if any, then close.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A TLS acceptor from PEM files (rustls with the ring provider; TLS 1.2 and 1.3).
fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in TLS certificate {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read TLS private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not form a usable pair")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
