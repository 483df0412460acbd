//! Queries: nearby search (checked against brute force), status filters, and driver state.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Deterministic pseudo-random drivers around a centre, loaded through the batch endpoint.
async fn load_cluster(
    s: &Server,
    n: usize,
    lat: f64,
    lon: f64,
    spread: f64,
) -> Vec<(String, f64, f64, &'static str)> {
    let mut seed = 42u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let statuses = ["online", "online", "busy", "offline"];
    let drivers: Vec<_> = (0..n)
        .map(|i| {
            let la = ((lat + next() * spread) * 1e6).round() / 1e6;
            let lo = ((lon + next() * spread) * 1e6).round() / 1e6;
            (format!("d{i}"), la, lo, statuses[i % 4])
        })
        .collect();
    for chunk in drivers.chunks(1000) {
        let locations: Vec<Value> = chunk
            .iter()
            .map(|(id, la, lo, st)| json!({"driver_id": id, "latitude": la, "longitude": lo, "status": st}))
            .collect();
        let r = s
            .post_json("/v1/locations/batch", &json!({ "locations": locations }))
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    drivers
}

#[tokio::test]
async fn nearby_returns_exactly_the_nearest_matching_drivers() {
    let s = Server::start();
    let drivers = load_cluster(&s, 5000, 31.23, 121.47, 0.05).await;
    for (lat, lon, radius, limit, status) in [
        (31.23, 121.47, 1000.0, 50, None),
        (31.23, 121.47, 300.0, 1000, None),
        (31.24, 121.46, 2500.0, 7, Some("busy")),
        (31.22, 121.49, 5000.0, 20, Some("online")),
        (31.23, 121.47, 100000.0, 1, Some("online,busy,offline")),
    ] {
        let mut path =
            format!("/v1/drivers/nearby?lat={lat}&lon={lon}&radius_m={radius}&limit={limit}");
        if let Some(st) = status {
            path.push_str(&format!("&status={st}"));
        }
        let r = s.get(&path).await;
        assert_eq!(r.status(), StatusCode::OK);
        let got = json(r).await;
        let got = got["drivers"].as_array().unwrap();

        let allowed: Vec<&str> = status.unwrap_or("online,busy").split(',').collect();
        let mut want: Vec<(f64, &str)> = drivers
            .iter()
            .filter(|d| d.3 != "offline" && allowed.contains(&d.3))
            .map(|d| (haversine_m(lat, lon, d.1, d.2), d.0.as_str()))
            .filter(|(dist, _)| *dist <= radius)
            .collect();
        want.sort_by(|a, b| a.0.total_cmp(&b.0));
        want.truncate(limit);
        assert_eq!(got.len(), want.len(), "{path}");
        let mut last = 0.0;
        for (hit, (dist, _)) in got.iter().zip(&want) {
            let d = hit["distance_m"].as_f64().unwrap();
            assert!((d - dist).abs() < 0.011, "{path}: {d} vs {dist}");
            assert!(d >= last, "nearest first");
            last = d;
            assert_ne!(hit["status"], "offline");
            for field in ["driver_id", "latitude", "longitude", "status", "timestamp"] {
                assert!(hit.get(field).is_some(), "{field} missing in {hit}");
            }
        }
    }
}

#[tokio::test]
async fn default_status_filter_is_online_and_busy_and_offline_never_shows() {
    let s = Server::start();
    for (id, st) in [("on", "online"), ("busy", "busy"), ("off", "offline")] {
        s.report(json!({"driver_id": id, "latitude": 40.0, "longitude": -3.0, "status": st}))
            .await;
    }
    let ids = |v: Value| -> Vec<String> {
        let mut ids: Vec<String> = v["drivers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["driver_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let all = json(s.get("/v1/drivers/nearby?lat=40&lon=-3").await).await;
    assert_eq!(ids(all), ["busy", "on"]);
    let off = json(
        s.get("/v1/drivers/nearby?lat=40&lon=-3&status=offline")
            .await,
    )
    .await;
    assert!(ids(off).is_empty());
    let busy = json(s.get("/v1/drivers/nearby?lat=40&lon=-3&status=busy").await).await;
    assert_eq!(ids(busy), ["busy"]);
    // Going offline removes a driver from search but not from GET.
    s.report(json!({"driver_id": "on", "latitude": 40.0, "longitude": -3.0, "status": "offline"}))
        .await;
    assert_eq!(
        ids(json(s.get("/v1/drivers/nearby?lat=40&lon=-3").await).await),
        ["busy"]
    );
    assert_eq!(
        json(s.get("/v1/drivers/on").await).await["status"],
        "offline"
    );
}

#[tokio::test]
async fn radius_and_limit_bound_the_answer() {
    // A driver exactly at 0,0 is this test's reference point: the null-island filter is off.
    let s = Server::start_with(&["--no-filter", "null-island,too-old,speed"], &[]);
    // Drivers due north every ~111 m.
    for i in 0..10 {
        s.report(
            json!({"driver_id": format!("n{i}"), "latitude": i as f64 * 0.001, "longitude": 0}),
        )
        .await;
    }
    let r = json(s.get("/v1/drivers/nearby?lat=0&lon=0&radius_m=500").await).await;
    let ds: Vec<f64> = r["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["distance_m"].as_f64().unwrap())
        .collect();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds[0], 0.0);
    assert!((ds[1] - 111.2).abs() < 0.1);
    let r = json(
        s.get("/v1/drivers/nearby?lat=0&lon=0&radius_m=100000&limit=3")
            .await,
    )
    .await;
    let ids: Vec<&str> = r["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["driver_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["n0", "n1", "n2"]);
}

#[tokio::test]
async fn nearby_parameter_errors_name_each_parameter() {
    let s = Server::start();
    for (query, fields) in [
        ("", vec!["lat", "lon"]),
        ("lat=abc&lon=1", vec!["lat"]),
        ("lat=91&lon=181", vec!["lat", "lon"]),
        ("lat=NaN&lon=inf", vec!["lat", "lon"]),
        ("lat=1&lon=1&radius_m=0", vec!["radius_m"]),
        ("lat=1&lon=1&radius_m=100001", vec!["radius_m"]),
        ("lat=1&lon=1&limit=0", vec!["limit"]),
        ("lat=1&lon=1&limit=1001", vec!["limit"]),
        ("lat=1&lon=1&limit=2.5", vec!["limit"]),
        ("lat=1&lon=1&status=online,sleeping", vec!["status"]),
        (
            "lat=1&lon=1&radius_m=-5&limit=x&status=",
            vec!["radius_m", "limit", "status"],
        ),
    ] {
        let r = s.get(&format!("/v1/drivers/nearby?{query}")).await;
        let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert_eq!(detail_fields(&body), fields, "{query}: {body}");
    }
    // Edges of the ranges are valid.
    let r = s
        .get("/v1/drivers/nearby?lat=-90&lon=180&radius_m=100000&limit=1000")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .get("/v1/drivers/nearby?lat=90&lon=-180&radius_m=1&limit=1")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn unknown_and_invalid_driver_ids() {
    let s = Server::start();
    let r = s.get("/v1/drivers/nobody").await;
    assert_error(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = s.get("/v1/drivers/bad%20id").await;
    let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(detail_fields(&body), ["driver_id"]);
    let long = "x".repeat(65);
    let r = s.get(&format!("/v1/drivers/{long}")).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
}
