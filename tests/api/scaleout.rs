//! Scale-out mode from outside: several instances on one Redis, Redis and PostgreSQL outages, and
//! history in PostgreSQL answering like the embedded store. Real servers (testkit), real binaries.

use crate::streams::{next, subscribe};
use crate::support::*;
use fleettracker_testkit::{Postgres, RedisServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn on_redis(redis: &RedisServer, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--live-store", "redis", "--redis-url", url.as_str()];
    args.extend_from_slice(extra);
    Server::start_with(&args, &[])
}

#[tokio::test]
async fn two_instances_share_positions_queries_and_streams() {
    let redis = RedisServer::start();
    let a = on_redis(&redis, &[]);
    let b = on_redis(&redis, &[]);
    let (mut ws, snapshot) = subscribe(&b, "bbox=121.40,31.20,121.55,31.30").await;
    assert!(snapshot.is_empty());

    a.report(json!({"driver_id": "shared", "latitude": 31.25, "longitude": 121.47}))
        .await;
    let seen = json(b.get("/v1/drivers/shared").await).await;
    assert_eq!(seen["latitude"], 31.25, "{seen}");
    let near = json(
        b.get("/v1/drivers/nearby?lat=31.25&lon=121.47&radius_m=100")
            .await,
    )
    .await;
    assert_eq!(near["drivers"][0]["driver_id"], "shared", "{near}");
    // B's subscriber hears of A's position through Redis Pub/Sub.
    let m = next(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["driver_id"].as_str()),
        (Some("position"), Some("shared")),
        "{m}"
    );

    // Going offline on A is a removal for B's subscriber.
    a.report(
        json!({"driver_id": "shared", "latitude": 31.25, "longitude": 121.47, "status": "offline"}),
    )
    .await;
    let m = next(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["reason"].as_str()),
        (Some("removed"), Some("offline")),
        "{m}"
    );
    let stats = json(b.get("/v1/stats").await).await;
    assert_eq!(stats["drivers"]["offline"], 1, "{stats}");
}

#[tokio::test]
async fn sanity_filters_judge_against_fixes_of_every_instance() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--live-store", "redis", "--redis-url", url.as_str()];
    let a = Server::start_filtered(&args, &[]);
    let b = Server::start_filtered(&args, &[]);
    let now = chrono::Utc::now();
    let ts = |secs: i64| (now + chrono::Duration::seconds(secs)).to_rfc3339();
    let jump =
        json!({"driver_id": "car", "latitude": 31.65, "longitude": 121.4, "timestamp": ts(-10)});
    a.report(
        json!({"driver_id": "car", "latitude": 31.2, "longitude": 121.4, "timestamp": ts(-20)}),
    )
    .await;
    // 50 km in 10 s: refused by the instance that took the first fix (from what it remembers) and
    // by the one that never saw the driver (from Redis), single and in a batch.
    for s in [&a, &b] {
        let r = s.post_json("/v1/locations", &jump).await;
        let single = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        let r = s
            .post_json("/v1/locations/batch", &json!({"locations": [jump.clone()]}))
            .await;
        let batch = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        for body in [single, batch] {
            let text = body["error"].to_string();
            assert!(text.contains("km/h"), "{body}");
        }
    }
    // A plausible fix through B, then one more through A measured from it.
    b.report(
        json!({"driver_id": "car", "latitude": 31.2005, "longitude": 121.4, "timestamp": ts(-5)}),
    )
    .await;
    a.report(
        json!({"driver_id": "car", "latitude": 31.2010, "longitude": 121.4, "timestamp": ts(-1)}),
    )
    .await;
    let car = json(b.get("/v1/drivers/car").await).await;
    assert_eq!(car["latitude"], 31.201, "{car}");
}

#[tokio::test]
async fn a_redis_outage_is_503_then_service_resumes_by_itself() {
    let mut redis = RedisServer::start();
    let s = on_redis(&redis, &[]);
    s.report(json!({"driver_id": "before", "latitude": 1.0, "longitude": 1.0}))
        .await;
    redis.stop();

    let r = s
        .post_json(
            "/v1/locations",
            &json!({"driver_id": "during", "latitude": 1.0, "longitude": 1.0}),
        )
        .await;
    assert!(r.headers().contains_key("retry-after"));
    assert_error(r, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
    assert_error(
        s.get("/v1/drivers/before").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    )
    .await;
    assert_error(
        s.get("/ready").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
    )
    .await;
    // Still alive: liveness and metrics answer, under the issue's metric names: the upsert
    // latency histogram (the report before the outage) and the Redis error counter (the reads
    // during it).
    assert_eq!(s.get("/health").await.status(), StatusCode::OK);
    let r = s.get("/metrics").await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("# TYPE redis_geoadd_latency_seconds histogram"),
        "{text}"
    );
    assert!(sample(&text, "redis_geoadd_latency_seconds_count").unwrap_or(0.0) >= 1.0);
    let errors: f64 = ["get", "upsert"]
        .iter()
        .filter_map(|op| sample(&text, &format!(r#"redis_errors_total{{op="{op}"}}"#)))
        .sum();
    assert!(errors >= 1.0, "{text}");

    redis.resume();
    eventually(WAIT, "writes succeed again", || async {
        let r = s
            .post_json(
                "/v1/locations",
                &json!({"driver_id": "after", "latitude": 2.0, "longitude": 2.0}),
            )
            .await;
        r.status() == StatusCode::ACCEPTED
    })
    .await;
    assert_eq!(s.get("/ready").await.status(), StatusCode::OK);
    let after = json(s.get("/v1/drivers/after").await).await;
    assert_eq!(after["latitude"], 2.0, "{after}");
}

/// A track of `n` points every 2 s from two hours ago, posted out of order (the last ten first).
fn track_batch(id: &str, n: i64) -> Vec<Value> {
    let start = chrono::Utc::now().timestamp() - 7200;
    let mut order: Vec<i64> = (n - 10..n).chain(0..n - 10).collect();
    order.dedup();
    order
        .into_iter()
        .map(|i| {
            let at = chrono::DateTime::from_timestamp(start + i * 2, 0).unwrap();
            json!({"driver_id": id, "latitude": 31.2 + i as f64 * 1e-4, "longitude": 121.4,
                   "timestamp": at.to_rfc3339(), "speed_mps": 5.5, "heading_deg": 0.0})
        })
        .collect()
}

async fn post_all(s: &Server, positions: &[Value]) {
    for chunk in positions.chunks(500) {
        let r = s
            .post_json("/v1/locations/batch", &json!({ "locations": chunk }))
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
}

fn on_postgres(redis: &RedisServer, pg: &Postgres, extra: &[&str]) -> Server {
    let (redis_url, pg_url) = (redis.url(), pg.url());
    let mut args = vec![
        "--live-store",
        "redis",
        "--redis-url",
        redis_url.as_str(),
        "--history-store",
        "postgres",
        "--postgres-url",
        pg_url.as_str(),
    ];
    args.extend_from_slice(extra);
    Server::start_with(&args, &[])
}

fn track_path(id: &str) -> String {
    let from = chrono::Utc::now() - chrono::Duration::hours(3);
    format!(
        "/v1/drivers/{id}/track?from={}",
        from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

#[tokio::test]
async fn postgres_history_answers_like_the_embedded_store() {
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let scaled = on_postgres(&redis, &pg, &["--embedded-worker"]);
    let embedded = Server::start();
    let positions = track_batch("trk", 300);
    post_all(&scaled, &positions).await;
    post_all(&embedded, &positions).await;
    let path = track_path("trk");
    eventually(WAIT, "the worker wrote every point", || async {
        let page = json(scaled.get(&path).await).await;
        page["points"].as_array().is_some_and(|p| p.len() == 300)
    })
    .await;
    let from_pg = json(scaled.get(&path).await).await;
    let from_embedded = json(embedded.get(&path).await).await;
    for field in [
        "driver_id",
        "points",
        "distance_m",
        "duration_s",
        "next_cursor",
    ] {
        assert_eq!(from_pg[field], from_embedded[field], "{field} differs");
    }
    // Paging and formats come from the same code: spot-check one of each.
    let page = json(scaled.get(&format!("{path}&limit=100")).await).await;
    assert_eq!(page["points"].as_array().unwrap().len(), 100);
    assert!(page["next_cursor"].is_string());
    let gpx = scaled.get(&format!("{path}&format=gpx")).await;
    assert_eq!(gpx.status(), StatusCode::OK);
    assert_eq!(
        pg.psql("select count(*) from positions where driver_id = 'trk'"),
        "300"
    );
}

#[tokio::test]
async fn a_postgres_outage_delays_history_and_loses_nothing() {
    let redis = RedisServer::start();
    let mut pg = Postgres::start();
    let s = on_postgres(&redis, &pg, &["--embedded-worker"]);
    let positions = track_batch("outage", 200);
    post_all(&s, &positions[..100]).await;
    eventually(WAIT, "the first half is in PostgreSQL", || async {
        pg.psql("select count(*) from positions") == "100"
    })
    .await;
    pg.stop();
    // Writes are still acknowledged: they wait in the Redis Stream.
    post_all(&s, &positions[100..]).await;
    // Reading history needs PostgreSQL: a clear 503 meanwhile.
    assert_error(
        s.get(&track_path("outage")).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    )
    .await;
    // The same positions again (a client retrying): still one row each.
    post_all(&s, &positions[150..]).await;
    pg.resume();
    eventually(
        Duration::from_secs(40),
        "the backlog is written",
        || async { pg.psql("select count(*) from positions") == "200" },
    )
    .await;
    assert_eq!(
        pg.psql("select count(distinct (driver_id, ts)) from positions"),
        "200"
    );
    let track = json(s.get(&track_path("outage")).await).await;
    assert_eq!(track["points"].as_array().unwrap().len(), 200);
}

#[tokio::test]
async fn a_separate_worker_process_drains_the_stream() {
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let s = on_postgres(&redis, &pg, &[]);
    post_all(&s, &track_batch("separate", 50)).await;
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args([
            "worker",
            "--redis-url",
            &redis.url(),
            "--postgres-url",
            &pg.url(),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the worker");
    // Its own /metrics, at the address it prints.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(worker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let metrics_url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    eventually(WAIT, "the worker wrote the positions", || async {
        pg.psql("select count(*) from positions") == "50"
    })
    .await;
    let metrics_text = || async {
        reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    eventually(WAIT, "the worker's metrics show them", || async {
        let text = metrics_text().await;
        text.lines()
            .any(|l| l == "history_worker_positions_total 50")
            && text.lines().any(|l| l == "history_stream_lag_entries 0")
    })
    .await;
    // Only the worker's own series: none of the server's at zero.
    let text = metrics_text().await;
    for server_series in [
        "drivers_active",
        "driver_updates_total",
        "location_store_write",
    ] {
        assert!(!text.contains(server_series), "{server_series} in {text}");
    }
    let _ = worker.kill();
    let _ = worker.wait();
}
