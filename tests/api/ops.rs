//! Health, readiness, stats, Prometheus metrics, OpenAPI and the docs page.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;
use std::io::Write;
use std::time::Duration;

#[tokio::test]
async fn health_and_ready() {
    let s = Server::start();
    let r = s.get("/health").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(r).await, json!({"status": "ok"}));
    assert_eq!(s.get("/ready").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn stats_count_drivers_by_status_and_updates() {
    let s = Server::start();
    assert_eq!(
        json(s.get("/v1/stats").await).await,
        json!({"drivers": {"online": 0, "busy": 0, "offline": 0, "total": 0}, "updates_total": 0})
    );
    for (id, st) in [
        ("a", "online"),
        ("b", "online"),
        ("c", "busy"),
        ("d", "offline"),
        ("a", "busy"),
    ] {
        s.report(json!({"driver_id": id, "latitude": 1, "longitude": 1, "status": st}))
            .await;
    }
    assert_eq!(
        json(s.get("/v1/stats").await).await,
        json!({"drivers": {"online": 1, "busy": 2, "offline": 1, "total": 4}, "updates_total": 5})
    );
}

#[tokio::test]
async fn metrics_expose_the_documented_series() {
    let s = Server::start();
    s.report(json!({"driver_id": "m1", "latitude": 1, "longitude": 1, "status": "busy"}))
        .await;
    s.report(json!({"driver_id": "m2", "latitude": 1, "longitude": 1}))
        .await;
    assert_eq!(s.get("/v1/drivers/m1").await.status(), StatusCode::OK);
    assert_eq!(
        s.get("/v1/drivers/none").await.status(),
        StatusCode::NOT_FOUND
    );
    let r = s.get("/metrics").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();

    assert_eq!(
        sample(&text, r#"driver_updates_total{status="busy"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"driver_updates_total{status="online"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"drivers_active{status="online"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&text, r#"drivers_active{status="busy"}"#), Some(1.0));
    assert!(
        text.contains("# TYPE http_request_duration_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("# TYPE location_store_write_seconds histogram"));
    assert_eq!(
        sample(&text, "location_store_write_seconds_count"),
        Some(2.0)
    );
    let count = |status: &str| {
        sample(
            &text,
            &format!(
                r#"http_request_duration_seconds_count{{method="GET",route="/v1/drivers/{{driver_id}}",status="{status}"}}"#
            ),
        )
    };
    assert_eq!(count("200"), Some(1.0), "{text}");
    assert_eq!(count("404"), Some(1.0));
    assert!(text.contains(r#"le="0.001""#), "real buckets expected");
    // No driver id ever becomes a label value.
    assert!(!text.contains("m1") && !text.contains("none\""), "{text}");
}

#[tokio::test]
async fn metrics_show_the_durable_store() {
    let s = Server::start();
    for i in 0..3 {
        s.report(json!({"driver_id": format!("d{i}"), "latitude": 1, "longitude": 1}))
            .await;
    }
    // Set once a second from the log and history: wait for a round that saw the reports and a
    // follower that caught up with them.
    let shows_them = |text: String| {
        let at = |series| sample(&text, series);
        at("wal_commits_total").is_some_and(|c| c >= 1.0)
            && at("wal_disk_bytes").is_some_and(|b| b > 0.0)
            && at("history_disk_bytes").is_some_and(|b| b > 0.0)
            && at("history_lag_bytes") == Some(0.0)
            && at("wal_writing_off_worker") == Some(0.0)
    };
    eventually(Duration::from_secs(15), "the durability series", || async {
        shows_them(s.get("/metrics").await.text().await.unwrap())
    })
    .await;
    let text = s.get("/metrics").await.text().await.unwrap();
    for series in ["wal_commits_total", "history_lag_bytes"] {
        assert!(text.contains(&format!("# HELP {series} ")), "{text}");
    }
    // With durability off there is no log to describe.
    let off = Server::start_with(&["--fsync", "off"], &[]);
    off.report(json!({"driver_id": "o", "latitude": 1, "longitude": 1}))
        .await;
    let text = off.get("/metrics").await.text().await.unwrap();
    assert!(
        !text.contains("wal_") && !text.contains("history_lag"),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let s = Server::start();
    s.report(json!({"driver_id": "p", "latitude": 1, "longitude": 1}))
        .await;
    let _ = s.get("/nope").await;
    let text = s.get("/metrics").await.text().await.unwrap();
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (scripts/test installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn openapi_documents_every_endpoint() {
    let s = Server::start();
    let doc = json(s.get("/openapi.json").await).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    for (path, method) in [
        ("/v1/locations", "post"),
        ("/v1/locations/batch", "post"),
        ("/v1/drivers/nearby", "get"),
        ("/v1/drivers/{driver_id}", "get"),
        ("/v1/stats", "get"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    let params: Vec<&str> = doc["paths"]["/v1/drivers/nearby"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["lat", "lon", "radius_m", "limit", "status"]);
}

#[tokio::test]
async fn docs_page_is_served_from_the_binary() {
    let s = Server::start();
    // `/docs` redirects to `/docs/` (followed by the client).
    let r = s.client.get(s.url("/docs")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    // Every script and stylesheet is local: no CDN.
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "{html}"
    );
    let init = s
        .get("/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(init.contains("/openapi.json"), "{init}");
    assert_eq!(
        s.get("/docs/swagger-ui-bundle.js").await.status(),
        StatusCode::OK
    );
}
