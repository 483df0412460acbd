//! Reporting positions: single and batch, defaults, rounding, and the out-of-order rule.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_reported_position_becomes_the_drivers_state() {
    let s = Server::start();
    let r = s
        .post_json(
            "/v1/locations",
            &json!({"driver_id": "drv-1", "latitude": 31.23045678, "longitude": 121.4737012,
                    "status": "busy", "timestamp": "2026-11-22T08:00:00.5+08:00",
                    "speed_mps": 12.5, "heading_deg": 270.25, "accuracy_m": 3, "vendor": {"x": 1}}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(json(r).await, json!({"accepted": 1}));

    let d = json(s.get("/v1/drivers/drv-1").await).await;
    assert_eq!(
        d,
        json!({"driver_id": "drv-1", "latitude": 31.230457, "longitude": 121.473701,
               "status": "busy", "timestamp": "2026-11-22T00:00:00.500Z",
               "speed_mps": 12.5, "heading_deg": 270.25, "accuracy_m": 3.0})
    );
}

#[tokio::test]
async fn defaults_are_online_and_time_of_receipt() {
    let s = Server::start();
    let before = chrono::Utc::now();
    s.report(json!({"driver_id": "d", "latitude": 1, "longitude": -2}))
        .await;
    let after = chrono::Utc::now();
    let d = json(s.get("/v1/drivers/d").await).await;
    assert_eq!(d["status"], "online");
    assert_eq!(
        (d["latitude"].as_f64(), d["longitude"].as_f64()),
        (Some(1.0), Some(-2.0))
    );
    assert!(
        d.get("speed_mps").is_none(),
        "absent optional fields stay absent: {d}"
    );
    let t = chrono::DateTime::parse_from_rfc3339(d["timestamp"].as_str().unwrap()).unwrap();
    let slack = chrono::Duration::milliseconds(1);
    assert!(
        t >= before - slack && t <= after + slack,
        "{t} not in [{before}, {after}]"
    );
}

#[tokio::test]
async fn an_older_position_is_accepted_but_does_not_replace_the_latest() {
    let s = Server::start();
    let at = |t: &str, lat: f64| json!({"driver_id": "d", "latitude": lat, "longitude": 0, "timestamp": t});
    s.report(at("2026-11-22T00:00:10Z", 1.0)).await;
    s.report(at("2026-11-22T00:00:05Z", 2.0)).await;
    let d = json(s.get("/v1/drivers/d").await).await;
    assert_eq!(d["latitude"], 1.0);
    assert_eq!(d["timestamp"], "2026-11-22T00:00:10Z");
    s.report(at("2026-11-22T00:00:11Z", 3.0)).await;
    assert_eq!(json(s.get("/v1/drivers/d").await).await["latitude"], 3.0);
    // Both stale and fresh updates count as accepted.
    assert_eq!(json(s.get("/v1/stats").await).await["updates_total"], 3);
}

#[tokio::test]
async fn batch_applies_valid_positions_and_lists_the_rest() {
    let s = Server::start();
    let r = s
        .post_json(
            "/v1/locations/batch",
            &json!({"locations": [
                {"driver_id": "a", "latitude": 10, "longitude": 10},
                {"driver_id": "b", "latitude": 95, "longitude": 10},
                "not an object",
                {"driver_id": "c", "latitude": 10, "longitude": 10.001, "status": "busy"},
                {"latitude": 10, "longitude": "x"}
            ]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let body = json(r).await;
    assert_eq!(body["accepted"], 2);
    let rejected = body["rejected"].as_array().unwrap();
    let indices: Vec<u64> = rejected
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [1, 2, 4]);
    for r in rejected {
        assert_eq!(r["error"]["code"], "validation_failed");
        assert!(r["error"]["message"].as_str().unwrap().len() > 5);
    }
    let fields: Vec<&str> = rejected[2]["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["driver_id", "longitude"]);
    assert_eq!(s.get("/v1/drivers/a").await.status(), StatusCode::OK);
    assert_eq!(json(s.get("/v1/drivers/c").await).await["status"], "busy");
    assert_eq!(s.get("/v1/drivers/b").await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn batch_of_exactly_1000_is_accepted() {
    let s = Server::start();
    let locations: Vec<_> = (0..1000)
        .map(
            |i| json!({"driver_id": format!("d{i}"), "latitude": 0.001 * i as f64, "longitude": 5}),
        )
        .collect();
    let r = s
        .post_json("/v1/locations/batch", &json!({ "locations": locations }))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(json(r).await, json!({"accepted": 1000, "rejected": []}));
    assert_eq!(
        json(s.get("/v1/stats").await).await["drivers"]["total"],
        1000
    );
}

#[tokio::test]
async fn concurrent_reports_are_all_found() {
    let s = Server::start();
    let posts = (0..50).map(|i| {
        let body = json!({"driver_id": format!("c{i}"), "latitude": 48.8566 + i as f64 * 1e-4, "longitude": 2.3522});
        let (client, url) = (s.client.clone(), s.url("/v1/locations"));
        tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap().status() })
    });
    for p in posts.collect::<Vec<_>>() {
        assert_eq!(p.await.unwrap(), StatusCode::ACCEPTED);
    }
    let found = json(
        s.get("/v1/drivers/nearby?lat=48.8566&lon=2.3522&radius_m=1000&limit=100")
            .await,
    )
    .await;
    assert_eq!(found["drivers"].as_array().unwrap().len(), 50);
}
