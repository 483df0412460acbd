//! One contract, every live store: the same black-box tests run against the embedded store and
//! against Redis (standalone and a 3-master cluster), each started for real (testkit). Whatever a
//! client can observe — latest position, the out-of-order rule, nearby answers, expiry, counts,
//! stream snapshots and live updates — must not depend on where the positions live.

use crate::streams::{next, subscribe};
use crate::support::*;
use fleettracker_testkit::{RedisCluster, RedisServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

/// Which live store a contract test runs against.
#[derive(Clone, Copy, Debug)]
pub enum Store {
    Memory,
    Redis,
    RedisCluster,
}

/// A server and the store behind it (kept alive as long as the server).
pub struct Deployment {
    pub server: Server,
    _redis: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
}

impl Store {
    /// Starts a server on this store with extra flags.
    pub fn start(self, args: &[&str]) -> Deployment {
        match self {
            Store::Memory => Deployment {
                server: Server::start_with(args, &[]),
                _redis: None,
                _cluster: None,
            },
            Store::Redis => {
                let redis = RedisServer::start();
                let url = redis.url();
                let mut all = vec!["--live-store", "redis", "--redis-url", &url];
                all.extend_from_slice(args);
                Deployment {
                    server: Server::start_with(&all, &[]),
                    _redis: Some(redis),
                    _cluster: None,
                }
            }
            Store::RedisCluster => {
                let cluster = RedisCluster::start(3);
                let urls = cluster.urls().join(",");
                let mut all = vec![
                    "--live-store",
                    "redis",
                    "--redis-cluster",
                    "--redis-url",
                    &urls,
                ];
                all.extend_from_slice(args);
                Deployment {
                    server: Server::start_with(&all, &[]),
                    _redis: None,
                    _cluster: Some(cluster),
                }
            }
        }
    }
}

/// An RFC 3339 timestamp `secs` seconds after a fixed point two minutes ago.
fn ts(secs: i64) -> String {
    let at =
        std::time::SystemTime::now() - Duration::from_secs(120) + Duration::from_secs(secs as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn position(id: &str, lat: f64, lon: f64, ts: &str) -> Value {
    json!({"driver_id": id, "latitude": lat, "longitude": lon, "timestamp": ts,
           "status": "online", "speed_mps": 8.5, "heading_deg": 270.0})
}

async fn driver(s: &Server, id: &str) -> (StatusCode, Value) {
    let r = s.get(&format!("/v1/drivers/{id}")).await;
    let status = r.status();
    (status, json(r).await)
}

pub async fn the_latest_position_is_served(store: Store) {
    let d = store.start(&[]);
    let s = &d.server;
    s.report(position("d1", 31.2304, 121.4737, &ts(0))).await;
    let latest = ts(2);
    s.report(position("d1", 31.2310, 121.4740, &latest)).await;
    let (status, body) = driver(s, "d1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["latitude"], 31.231);
    assert_eq!(body["longitude"], 121.474);
    assert_eq!(body["status"], "online");
    assert_eq!(body["speed_mps"], 8.5);
    assert_eq!(body["heading_deg"], 270.0);
    let shown = body["timestamp"].as_str().unwrap_or_default();
    assert!(
        shown.starts_with(latest.trim_end_matches('Z')),
        "{shown} vs {latest}"
    );
    assert_error(
        s.get("/v1/drivers/nobody").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

pub async fn an_older_timestamp_never_replaces_the_latest(store: Store) {
    let d = store.start(&[]);
    let s = &d.server;
    s.report(position("d1", 31.0, 121.0, &ts(10))).await;
    // Late, accepted (202) but not the latest.
    s.report(position("d1", 32.0, 122.0, &ts(5))).await;
    let (_, body) = driver(s, "d1").await;
    assert_eq!(body["latitude"], 31.0, "{body}");
    // Many concurrent writers racing on one driver: the newest timestamp wins.
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let client = s.client.clone();
        let url = s.url("/v1/locations");
        tasks.push(tokio::spawn(async move {
            let p = position("race", 30.0 + i as f64 / 100.0, 120.0, &ts(20 + i as i64));
            client.post(url).json(&p).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::ACCEPTED);
    }
    let (_, body) = driver(s, "race").await;
    assert_eq!(body["latitude"], 30.39, "{body}");
}

/// Deterministic drivers scattered over ~10 km, half of one status mix.
fn scatter(n: usize) -> Vec<(String, f64, f64, &'static str)> {
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let statuses = ["online", "busy", "online", "offline"];
    (0..n)
        .map(|i| {
            let lat = ((31.23 + next() * 0.1) * 1e6).round() / 1e6;
            let lon = ((121.47 + next() * 0.1) * 1e6).round() / 1e6;
            (format!("s{i}"), lat, lon, statuses[i % 4])
        })
        .collect()
}

pub async fn nearby_is_exact(store: Store) {
    let d = store.start(&[]);
    let s = &d.server;
    let drivers = scatter(3000);
    for chunk in drivers.chunks(500) {
        let locations: Vec<Value> = chunk
            .iter()
            .map(|(id, lat, lon, st)| json!({"driver_id": id, "latitude": lat, "longitude": lon, "status": st}))
            .collect();
        let r = s
            .post_json("/v1/locations/batch", &json!({ "locations": locations }))
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    for (lat, lon, radius, limit, statuses) in [
        (31.23, 121.47, 1000.0, 50, vec!["online", "busy"]),
        (31.25, 121.45, 3000.0, 20, vec!["busy"]),
        (31.20, 121.50, 8000.0, 500, vec!["online"]),
        (31.28, 121.52, 400.0, 10, vec!["online", "busy"]),
    ] {
        let path = format!(
            "/v1/drivers/nearby?lat={lat}&lon={lon}&radius_m={radius}&limit={limit}&status={}",
            statuses.join(",")
        );
        let body = json(s.get(&path).await).await;
        let got: Vec<(String, f64)> = body["drivers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["driver_id"].as_str().unwrap().to_string(),
                    d["distance_m"].as_f64().unwrap(),
                )
            })
            .collect();
        let mut want: Vec<(String, f64)> = drivers
            .iter()
            .filter(|(_, _, _, st)| statuses.contains(st))
            .map(|(id, la, lo, _)| (id.clone(), haversine_m(lat, lon, *la, *lo)))
            .filter(|(_, dist)| *dist <= radius)
            .collect();
        want.sort_by(|a, b| a.1.total_cmp(&b.1));
        want.truncate(limit);
        assert_eq!(got.len(), want.len(), "{path}");
        for (g, w) in got.iter().zip(&want) {
            // Same distances in the same order (ids may swap only on exact ties).
            assert!((g.1 - w.1).abs() < 0.5, "{path}: got {g:?}, want {w:?}");
        }
        let got_ids: std::collections::HashSet<_> = got.iter().map(|g| &g.0).collect();
        let missing = want.iter().filter(|w| !got_ids.contains(&w.0)).count();
        assert!(missing <= 1, "{path}: {missing} nearest drivers missing");
    }
}

pub async fn offline_drivers_are_kept_but_not_found_nearby(store: Store) {
    let d = store.start(&[]);
    let s = &d.server;
    s.report(
        json!({"driver_id": "off", "latitude": 31.23, "longitude": 121.47, "status": "offline"}),
    )
    .await;
    s.report(json!({"driver_id": "on", "latitude": 31.2301, "longitude": 121.4701}))
        .await;
    let body = json(
        s.get("/v1/drivers/nearby?lat=31.23&lon=121.47&radius_m=500&status=online,busy,offline")
            .await,
    )
    .await;
    let ids: Vec<&str> = body["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["driver_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["on"], "{body}");
    let (status, body) = driver(s, "off").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "offline");
}

pub async fn stats_count_live_drivers_by_status(store: Store) {
    let d = store.start(&[]);
    let s = &d.server;
    for (id, st) in [
        ("a", "online"),
        ("b", "online"),
        ("c", "busy"),
        ("e", "offline"),
    ] {
        s.report(json!({"driver_id": id, "latitude": 31.23, "longitude": 121.47, "status": st}))
            .await;
    }
    // A driver changing status moves between counts.
    s.report(json!({"driver_id": "b", "latitude": 31.23, "longitude": 121.47, "status": "busy"}))
        .await;
    let stats = json(s.get("/v1/stats").await).await;
    assert_eq!(
        stats["drivers"],
        json!({"online": 1, "busy": 2, "offline": 1, "total": 4}),
        "{stats}"
    );
}

pub async fn silent_drivers_expire(store: Store) {
    let d = store.start(&["--driver-ttl", "1s"]);
    let s = &d.server;
    s.report(json!({"driver_id": "quiet", "latitude": 31.23, "longitude": 121.47}))
        .await;
    assert_eq!(driver(s, "quiet").await.0, StatusCode::OK);
    eventually(Duration::from_secs(10), "the driver expires", || async {
        let gone = driver(s, "quiet").await.0 == StatusCode::NOT_FOUND;
        let nearby = json(
            s.get("/v1/drivers/nearby?lat=31.23&lon=121.47&radius_m=100")
                .await,
        )
        .await;
        let stats = json(s.get("/v1/stats").await).await;
        gone && nearby["drivers"].as_array().unwrap().is_empty() && stats["drivers"]["total"] == 0
    })
    .await;
}

pub async fn a_stream_gets_a_snapshot_then_live_positions(store: Store) {
    let d = store.start(&[]);
    let s = &d.server;
    s.report(json!({"driver_id": "before", "latitude": 31.25, "longitude": 121.47}))
        .await;
    let (mut ws, snapshot) = subscribe(s, "bbox=121.40,31.20,121.55,31.30").await;
    let ids: Vec<&str> = snapshot
        .iter()
        .map(|d| d["driver_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["before"]);
    s.report(json!({"driver_id": "outside", "latitude": 31.40, "longitude": 121.47}))
        .await;
    s.report(json!({"driver_id": "after", "latitude": 31.26, "longitude": 121.48}))
        .await;
    let m = next(&mut ws).await;
    assert_eq!(m["type"], "position", "{m}");
    assert_eq!(m["driver_id"], "after", "{m}");
}

/// Generates one `#[tokio::test]` per contract test and store.
macro_rules! contract {
    ($store:ident: $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                super::$name(super::Store::$store).await
            }
        )*
    };
}

macro_rules! every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            contract!(Memory: $($name),*);
        }
        mod redis {
            contract!(Redis: $($name),*);
        }
        mod redis_cluster {
            contract!(RedisCluster: $($name),*);
        }
    };
}

every_store!(
    the_latest_position_is_served,
    an_older_timestamp_never_replaces_the_latest,
    nearby_is_exact,
    offline_drivers_are_kept_but_not_found_nearby,
    stats_count_live_drivers_by_status,
    silent_drivers_expire,
    a_stream_gets_a_snapshot_then_live_positions,
);
