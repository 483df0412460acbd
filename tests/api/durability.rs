//! Durability: what got a 202 survives `kill -9`, in the live state and in history.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What one driver's client knows: positions acknowledged, and the one in flight (if any) when the
/// server died — that one may or may not have become durable.
#[derive(Default, Clone)]
struct DriverLog {
    acked: Vec<(i64, f64)>, // (timestamp micros, latitude)
    in_flight: Option<(i64, f64)>,
}

fn ts(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn position(driver: &str, t: i64, lat: f64) -> Value {
    json!({"driver_id": driver, "latitude": lat, "longitude": 13.4, "timestamp": ts(t)})
}

/// Each worker reports its own drivers in turn, one request at a time, until stopped by the kill.
async fn worker(
    base: String,
    worker: usize,
    logs: Arc<Mutex<HashMap<String, DriverLog>>>,
    start: i64,
) {
    let client = reqwest::Client::new();
    for round in 0i64.. {
        let drivers: Vec<String> = (0..5).map(|d| format!("w{worker}-d{d}")).collect();
        let t = start + round * 1_000_000;
        let lat = 52.5 + (round as f64) * 1e-5;
        let (path, body) = if round % 3 == 0 {
            let locations: Vec<Value> = drivers.iter().map(|d| position(d, t, lat)).collect();
            ("/v1/locations/batch", json!({ "locations": locations }))
        } else {
            (
                "/v1/locations",
                position(&drivers[(round as usize) % 5], t, lat),
            )
        };
        let sent: Vec<String> = match body.get("locations") {
            Some(_) => drivers.clone(),
            None => vec![drivers[(round as usize) % 5].clone()],
        };
        {
            let mut logs = logs.lock().unwrap();
            for d in &sent {
                logs.entry(d.clone()).or_default().in_flight = Some((t, lat));
            }
        }
        let ok = match client
            .post(format!("{base}{path}"))
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r.status() == StatusCode::ACCEPTED,
            Err(_) => return, // the server is gone
        };
        if !ok {
            return;
        }
        let mut logs = logs.lock().unwrap();
        for d in &sent {
            let log = logs.entry(d.clone()).or_default();
            log.in_flight = None;
            log.acked.push((t, lat));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_position_survives_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_string();
    let args = [
        "--data-dir",
        dir.as_str(),
        "--driver-ttl",
        "1h",
        "--fsync",
        "always",
    ];
    let server = Server::start_with(&args, &[]);
    let logs = Arc::new(Mutex::new(HashMap::<String, DriverLog>::new()));
    let start = chrono::Utc::now().timestamp_micros() - 3_000_000_000; // 50 min ago, a second per round
    let workers: Vec<_> = (0..8)
        .map(|w| tokio::spawn(worker(server.base.clone(), w, logs.clone(), start)))
        .collect();
    eventually(
        Duration::from_secs(30),
        "enough acknowledged positions",
        || async {
            logs.lock()
                .unwrap()
                .values()
                .map(|l| l.acked.len())
                .sum::<usize>()
                >= 3000
        },
    )
    .await;
    server.signal("KILL");
    for w in workers {
        let _ = w.await;
    }
    drop(server);
    let logs = logs.lock().unwrap().clone();

    let server = Server::start_with(&args, &[]);
    for (driver, log) in &logs {
        let Some(&(last_t, last_lat)) = log.acked.last() else {
            continue;
        };
        let state = json(server.get(&format!("/v1/drivers/{driver}")).await).await;
        let latest = (
            chrono::DateTime::parse_from_rfc3339(state["timestamp"].as_str().unwrap())
                .unwrap()
                .timestamp_micros(),
            state["latitude"].as_f64().unwrap(),
        );
        let acceptable = [Some((last_t, last_lat)), log.in_flight];
        assert!(
            acceptable
                .iter()
                .flatten()
                .any(|&(t, lat)| t == latest.0 && (lat - latest.1).abs() < 1e-9),
            "{driver}: latest {latest:?}, last acknowledged {:?}, in flight {:?}",
            (last_t, last_lat),
            log.in_flight
        );
        let track = json(
            server
                .get(&format!(
                    "/v1/drivers/{driver}/track?from={}&to={}&limit=100000",
                    urlencode(&ts(start - 1)),
                    urlencode(&ts(last_t + 10_000_000))
                ))
                .await,
        )
        .await;
        let stored: Vec<i64> = track["points"]
            .as_array()
            .unwrap_or_else(|| panic!("{track}"))
            .iter()
            .map(|p| {
                chrono::DateTime::parse_from_rfc3339(p["timestamp"].as_str().unwrap())
                    .unwrap()
                    .timestamp_micros()
            })
            .collect();
        for (t, _) in &log.acked {
            assert!(
                stored.contains(t),
                "{driver}: acknowledged position at {} missing from history",
                ts(*t)
            );
        }
    }
}

fn urlencode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}

/// A log that went missing under a snapshot that covers more is refused at start-up, with the reason,
/// instead of handing out LSNs a later recovery would skip.
#[tokio::test]
async fn a_missing_log_under_a_newer_snapshot_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_string();
    let mut s = Server::start_with(&["--data-dir", dir.as_str()], &[]);
    s.report(json!({"driver_id": "a", "latitude": 1, "longitude": 1}))
        .await;
    s.signal("TERM");
    assert!(s.wait_exit(Duration::from_secs(20)).success());
    drop(s);
    std::fs::remove_dir_all(data.path().join("wal")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.as_str(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the log was removed or replaced"),
        "{stderr}"
    );
}
