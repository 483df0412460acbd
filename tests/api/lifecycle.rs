//! The process as an operator sees it: flags and environment, TTL expiry, logs, graceful shutdown.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;

#[tokio::test]
async fn silent_drivers_disappear_after_the_ttl() {
    let s = Server::start_with(&["--driver-ttl", "1s"], &[]);
    s.report(json!({"driver_id": "quiet", "latitude": 5, "longitude": 5}))
        .await;
    s.report(json!({"driver_id": "chatty", "latitude": 5, "longitude": 5.0001}))
        .await;
    assert_eq!(s.get("/v1/drivers/quiet").await.status(), StatusCode::OK);
    // Keep one driver talking while the other goes silent.
    eventually(Duration::from_secs(5), "quiet driver expires", || async {
        s.report(json!({"driver_id": "chatty", "latitude": 5, "longitude": 5.0001}))
            .await;
        s.get("/v1/drivers/quiet").await.status() == StatusCode::NOT_FOUND
    })
    .await;
    let near = json(s.get("/v1/drivers/nearby?lat=5&lon=5").await).await;
    let ids: Vec<&str> = near["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["driver_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chatty"]);
    eventually(
        Duration::from_secs(5),
        "stats drop the expired driver",
        || async { json(s.get("/v1/stats").await).await["drivers"]["total"] == 1 },
    )
    .await;
    // A driver that reports again is back.
    s.report(json!({"driver_id": "quiet", "latitude": 5, "longitude": 5}))
        .await;
    assert_eq!(s.get("/v1/drivers/quiet").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn environment_variables_configure_the_server() {
    let s = Server::start_with(
        &[],
        &[("FLEET_DRIVER_TTL", "300ms"), ("FLEET_LOG_FORMAT", "json")],
    );
    s.report(json!({"driver_id": "e", "latitude": 5, "longitude": 5}))
        .await;
    eventually(
        Duration::from_secs(5),
        "300ms TTL from the environment",
        || async { s.get("/v1/drivers/e").await.status() == StatusCode::NOT_FOUND },
    )
    .await;
    let line = s.wait_log(Duration::from_secs(5), |l| {
        l.contains("fleettracker started")
    });
    assert!(
        serde_json::from_str::<serde_json::Value>(&line).is_ok(),
        "not JSON: {line}"
    );
}

#[tokio::test]
async fn log_lines_of_a_request_carry_its_request_id() {
    let s = Server::start_with(&["--log-format", "json"], &[("RUST_LOG", "debug")]);
    let r = s
        .client
        .get(s.url("/v1/stats"))
        .header("x-request-id", "req-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let line = s.wait_log(Duration::from_secs(5), |l| l.contains("request done"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["span"]["request_id"], "req-7f3a", "{line}");
    assert_eq!(v["route"], "/v1/stats");
    assert_eq!(v["method"], "GET");
}

#[test]
fn help_documents_every_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--data-dir",
        "--driver-ttl",
        "--log-format",
        "FLEET_LISTEN",
        "FLEET_DRIVER_TTL",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args(["simulate", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--url",
        "--drivers",
        "--interval",
        "--duration",
        "--batch",
        "--rate",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn bad_flags_fail_with_a_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args(["serve", "--driver-ttl", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--driver-ttl"));
}

/// Flags that contradict each other stop start-up (status 2, like clap's own errors) before the
/// server touches its data directory.
#[test]
fn contradictory_retention_flags_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args([
            "serve",
            "--history-retention",
            "40d",
            "--cold-retention",
            "10d",
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--cold-retention (10d) must be at least --history-retention (40d)"),
        "{stderr}"
    );
    assert!(stderr.contains("Usage: fleettracker serve"), "{stderr}");
    assert!(!data.exists(), "nothing was created");
}

#[test]
fn data_dir_is_created() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("nested/data");
    let s = Server::start_with(&["--data-dir", dir.to_str().unwrap()], &[]);
    assert!(dir.is_dir());
    drop(s);
}

/// SIGTERM or SIGINT while a request is in flight: the request still completes, then the process
/// exits 0. `Expect: 100-continue` tells us exactly when the handler has started reading the body.
#[tokio::test]
async fn signals_drain_in_flight_requests_and_exit_zero() {
    for signal in ["TERM", "INT"] {
        let mut s = Server::start();
        let body = br#"{"driver_id":"late","latitude":1,"longitude":1}"#;
        let mut conn = std::net::TcpStream::connect(&s.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            conn,
            "POST /v1/locations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        let mut interim = [0u8; 25];
        conn.read_exact(&mut interim).unwrap();
        assert!(
            interim.starts_with(b"HTTP/1.1 100 Continue"),
            "{:?}",
            String::from_utf8_lossy(&interim)
        );
        s.signal(signal);
        s.wait_log(Duration::from_secs(5), |l| l.contains("shutdown requested"));
        conn.write_all(body).unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 202"), "{response}");
        let status = s.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "exit status {status:?}");
    }
}

/// One server per data directory: a second one refuses to start (it would otherwise treat the log
/// tail the first is writing as torn), and says why.
#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let first = Server::start_with(&["--data-dir", dir], &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", dir])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another fleettracker process"), "{stderr}");
    drop(first);
    // Once the first is gone, the directory is free again.
    let again = Server::start_with(&["--data-dir", dir], &[]);
    drop(again);
}
