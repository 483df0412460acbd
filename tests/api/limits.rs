//! Limits that hold under attack: slow-loris heads and bodies, idle connections, huge headers,
//! connection floods, deep JSON; and HTTPS. Each test also shows the server still serves others.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `limit` passes: then panics); returns what arrived.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "connection still open after {limit:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

async fn still_serves(s: &Server) {
    let r = s.get("/health").await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_slow_loris_head_is_cut_off() {
    let s = Server::start_with(&["--idle-timeout", "1s"], &[]);
    let mut stream = TcpStream::connect(&s.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/locations HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // One header byte every 100 ms: each byte would restart a per-read timer; the head timer
    // does not restart.
    let trickle = async {
        loop {
            if stream.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
    };
    trickle.await;
    let held = started.elapsed();
    assert!(held < Duration::from_secs(5), "held for {held:?}");
    still_serves(&s).await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let s = Server::start_with(&["--idle-timeout", "1s"], &[]);
    let mut stream = TcpStream::connect(&s.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // The answer, then nothing more from us: the server closes the keep-alive connection.
    let seen = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
}

#[tokio::test]
async fn a_trickled_body_times_out_with_408() {
    let s = Server::start_with(&["--body-timeout", "500ms"], &[]);
    let mut stream = TcpStream::connect(&s.addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/locations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 200\r\n\r\n{\"driver_id\":",
        )
        .await
        .unwrap();
    let seen = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(seen.starts_with("HTTP/1.1 408"), "{seen}");
    assert!(seen.contains("\"request_timeout\""), "{seen}");
    still_serves(&s).await;
}

#[tokio::test]
async fn huge_headers_are_refused_with_431() {
    let s = Server::start_with(&["--max-header-bytes", "4096"], &[]);
    let r = s
        .client
        .get(s.url("/health"))
        .header("x-padding", "a".repeat(8192))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    still_serves(&s).await;
}

#[tokio::test]
async fn connections_over_the_limit_get_503_and_the_server_recovers() {
    let s = Server::start_with(&["--max-connections", "3"], &[]);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(&s.addr).await.unwrap();
        // A full request and answer, so the slot is surely taken before the next connects.
        c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(c);
    }
    let mut extra = TcpStream::connect(&s.addr).await.unwrap();
    let seen = read_until_closed(&mut extra, Duration::from_secs(5)).await;
    assert!(seen.starts_with("HTTP/1.1 503"), "{seen}");
    let body = seen.split("\r\n\r\n").nth(1).unwrap_or_default();
    let body: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(body["error"]["code"], "too_many_connections");
    drop(held);
    eventually(Duration::from_secs(5), "a slot frees up", || async {
        let c = reqwest::Client::new();
        matches!(c.get(s.url("/health")).send().await, Ok(r) if r.status() == StatusCode::OK)
    })
    .await;
}

#[tokio::test]
async fn deeply_nested_json_is_a_400_not_a_crash() {
    let s = Server::start();
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = s
        .post_raw(
            "/v1/locations",
            Some("application/json"),
            nested.into_bytes(),
        )
        .await;
    let body = assert_error(r, StatusCode::BAD_REQUEST, "malformed_json").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nested deeper"));
    let object = format!(
        r#"{{"driver_id":"d","latitude":1,"longitude":1,"extra":{}{}}}"#,
        "{\"a\":".repeat(10_000),
        "1".to_string() + &"}".repeat(10_000)
    );
    let r = s
        .post_raw(
            "/v1/locations",
            Some("application/json"),
            object.into_bytes(),
        )
        .await;
    // Deep nesting hidden in an unknown field is refused too.
    assert_error(r, StatusCode::BAD_REQUEST, "malformed_json").await;
    still_serves(&s).await;
}

#[tokio::test]
async fn serves_https_with_the_given_certificate() {
    use tokio_rustls::rustls::{self, pki_types::ServerName};
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let s = Server::start_with(
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(&s.addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let body = json!({"driver_id": "tls1", "latitude": 31.2, "longitude": 121.4}).to_string();
    let request = format!(
        "POST /v1/locations HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.ok();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    // Plain HTTP on the TLS port is not served (and does not hurt the server).
    let mut plain = TcpStream::connect(&s.addr).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let seen = read_until_closed(&mut plain, Duration::from_secs(5)).await;
    assert!(!seen.starts_with("HTTP/1.1 200"), "{seen}");
}

#[test]
fn a_bad_certificate_path_stops_start_up_with_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args(["serve", "--listen", "127.0.0.1:0", "--fsync", "off"])
        .args([
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read TLS certificate"), "{stderr}");
}
