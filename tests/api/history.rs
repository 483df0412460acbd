//! History over HTTP: the track endpoint, its formats and paging, and restarts.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Two hours ago, on a whole second, in µs: recent enough to be inside every retention window.
fn t0() -> i64 {
    static START: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *START.get_or_init(|| (chrono::Utc::now().timestamp() - 7200) * 1_000_000)
}

fn at(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn enc(text: &str) -> String {
    text.replace(':', "%3A").replace('+', "%2B")
}

/// Reports `n` points of driver `id` heading north, one every 2 s from t0(), in the given order.
async fn report_track(s: &Server, id: &str, order: impl Iterator<Item = i64>) {
    report_track_at(s, id, t0(), order).await
}

async fn report_track_at(s: &Server, id: &str, start: i64, order: impl Iterator<Item = i64>) {
    let locations: Vec<Value> = order
        .map(|i| {
            json!({"driver_id": id, "latitude": 10.0 + i as f64 * 1e-4, "longitude": 20.0,
                        "timestamp": at(start + i * 2_000_000), "speed_mps": 5.5})
        })
        .collect();
    for chunk in locations.chunks(1000) {
        let r = s
            .post_json("/v1/locations/batch", &json!({ "locations": chunk }))
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
}

fn window(from: i64, to: i64) -> String {
    format!("from={}&to={}", enc(&at(from)), enc(&at(to)))
}

fn timestamps(track: &Value) -> Vec<String> {
    track["points"]
        .as_array()
        .unwrap_or_else(|| panic!("{track}"))
        .iter()
        .map(|p| p["timestamp"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn track_is_in_time_order_with_late_arrivals_and_distance() {
    let s = Server::start();
    // Points 0..100, the odd ones arriving late (after all the even ones).
    report_track(
        &s,
        "t1",
        (0..100)
            .filter(|i| i % 2 == 0)
            .chain((0..100).filter(|i| i % 2 == 1)),
    )
    .await;
    report_track(&s, "t1-other", 0..10).await; // a driver whose id extends t1's: must not leak in
    let r = s
        .get(&format!(
            "/v1/drivers/t1/track?{}",
            window(t0(), t0() + 1_000_000_000)
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let track = json(r).await;
    let ts = timestamps(&track);
    assert_eq!(ts.len(), 100);
    let want: Vec<String> = (0..100).map(|i| at(t0() + i * 2_000_000)).collect();
    let parse = |t: &String| chrono::DateTime::parse_from_rfc3339(t).unwrap();
    assert_eq!(
        ts.iter().map(parse).collect::<Vec<_>>(),
        want.iter().map(parse).collect::<Vec<_>>()
    );
    assert_eq!(track["driver_id"], "t1");
    assert_eq!(track["next_cursor"], Value::Null);
    assert_eq!(track["duration_s"], 198.0);
    let expected_m = haversine_m(10.0, 20.0, 10.0099, 20.0);
    assert!(
        (track["distance_m"].as_f64().unwrap() - expected_m).abs() < 0.05,
        "{}",
        track["distance_m"]
    );
    assert_eq!(track["points"][0]["speed_mps"], 5.5);
    assert_eq!(track["points"][0]["status"], "online");
    // The window bounds are inclusive and cut the track.
    let r = json(
        s.get(&format!(
            "/v1/drivers/t1/track?{}",
            window(t0() + 2_000_000, t0() + 6_000_000)
        ))
        .await,
    )
    .await;
    assert_eq!(timestamps(&r).len(), 3);
}

#[tokio::test]
async fn paging_with_cursor_returns_every_point_once() {
    let s = Server::start();
    report_track(&s, "pager", 0..250).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut path = format!(
            "/v1/drivers/pager/track?{}&limit=100",
            window(t0(), t0() + 1_000_000_000)
        );
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", enc(c)));
        }
        let page = json(s.get(&path).await).await;
        seen.extend(timestamps(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 250);
    let mut dedup = seen.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), 250, "no point twice");
    let r = s
        .get(&format!(
            "/v1/drivers/pager/track?{}&cursor=bogus",
            window(t0(), t0() + 1)
        ))
        .await;
    let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(detail_fields(&body), ["cursor"]);
}

/// `from=...+08:00` typed into a URL unencoded arrives as a space before `08:00`: read as the `+`.
#[tokio::test]
async fn an_unencoded_plus_offset_in_the_window_is_understood() {
    let s = Server::start();
    report_track(&s, "plus", 0..10).await; // t0() .. t0() + 18 s
    let east = |micros: i64| {
        let t = chrono::DateTime::from_timestamp_micros(micros).unwrap();
        let offset = chrono::FixedOffset::east_opt(8 * 3600).unwrap();
        t.with_timezone(&offset)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
    };
    let (from, to) = (east(t0() + 4_000_000), east(t0() + 10_000_000));
    assert!(from.contains('+'), "{from}");
    let r = s
        .get(&format!("/v1/drivers/plus/track?from={from}&to={to}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(timestamps(&json(r).await).len(), 4, "points 2, 3, 4 and 5");
}

/// The path and query of a `Link: <…>; rel="next"` header.
fn next_link(header: &str) -> String {
    let inner = header
        .strip_suffix("; rel=\"next\"")
        .unwrap_or_else(|| panic!("{header}"));
    let path = inner.strip_prefix('<').and_then(|p| p.strip_suffix('>'));
    path.unwrap_or_else(|| panic!("{header}")).to_string()
}

/// GPX has no field for a cursor: every format pages by its `Link` header, which pins the window
/// (the default `to` is "now", which moves between pages) and keeps the format.
#[tokio::test]
async fn every_format_pages_by_its_link_header() {
    let s = Server::start();
    let half_an_hour_ago = (chrono::Utc::now().timestamp() - 1800) * 1_000_000;
    report_track_at(&s, "linked", half_an_hour_ago, 0..250).await;
    for format in ["json", "geojson", "gpx"] {
        let mut next = Some(format!(
            "/v1/drivers/linked/track?limit=100&format={format}"
        ));
        let (mut pages, mut points) = (0, 0);
        while let Some(path) = next.take() {
            pages += 1;
            assert!(pages <= 3, "{format}: more pages than 250 points need");
            let r = s.get(&path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            next = r
                .headers()
                .get("link")
                .map(|v| next_link(v.to_str().unwrap()));
            if let Some(link) = &next {
                assert!(link.starts_with("/v1/drivers/linked/track?from="), "{link}");
                assert!(
                    link.contains("&to=") && link.contains("&limit=100"),
                    "{link}"
                );
            }
            let body = r.text().await.unwrap();
            points += match format {
                "gpx" => body.matches("<trkpt").count(),
                _ => {
                    let value: Value = serde_json::from_str(&body).unwrap();
                    let cursor = match format {
                        "geojson" => &value["properties"]["next_cursor"],
                        _ => &value["next_cursor"],
                    };
                    assert_eq!(cursor.is_string(), next.is_some(), "{format}: {value}");
                    match format {
                        "geojson" => value["properties"]["timestamps"].as_array().unwrap().len(),
                        _ => timestamps(&value).len(),
                    }
                }
            };
        }
        assert_eq!((pages, points), (3, 250), "{format}");
    }
}

#[tokio::test]
async fn simplify_geojson_and_gpx() {
    let s = Server::start();
    report_track(&s, "shape", 0..50).await; // a straight line north
    let base = format!(
        "/v1/drivers/shape/track?{}",
        window(t0(), t0() + 1_000_000_000)
    );
    let full = json(s.get(&base).await).await;
    let simple = json(s.get(&format!("{base}&simplify_m=5")).await).await;
    assert_eq!(
        timestamps(&simple).len(),
        2,
        "a straight line simplifies to its ends"
    );
    assert_eq!(
        simple["distance_m"], full["distance_m"],
        "distance comes from the full track"
    );

    let r = s.get(&format!("{base}&format=geojson")).await;
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("geo+json"));
    let feature = json(r).await;
    assert_eq!(feature["type"], "Feature");
    assert_eq!(feature["geometry"]["type"], "LineString");
    assert_eq!(
        feature["geometry"]["coordinates"].as_array().unwrap().len(),
        50
    );
    assert_eq!(feature["geometry"]["coordinates"][0], json!([20.0, 10.0]));

    let r = s.get(&format!("{base}&format=gpx&simplify_m=5")).await;
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("gpx"));
    let gpx = r.text().await.unwrap();
    assert!(gpx.contains("http://www.topografix.com/GPX/1/1"), "{gpx}");
    assert_eq!(gpx.matches("<trkpt").count(), 2, "{gpx}");
}

#[tokio::test]
async fn track_parameter_errors_name_each_parameter() {
    let s = Server::start();
    for (query, fields) in [
        ("from=yesterday", vec!["from"]),
        ("to=2026-13-01T00:00:00Z", vec!["to"]),
        (
            "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
            vec!["from"],
        ),
        ("limit=0", vec!["limit"]),
        ("limit=100001", vec!["limit"]),
        ("simplify_m=-1", vec!["simplify_m"]),
        ("format=kml", vec!["format"]),
        ("limit=x&format=kml", vec!["limit", "format"]),
    ] {
        let r = s.get(&format!("/v1/drivers/d/track?{query}")).await;
        let body = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert_eq!(detail_fields(&body), fields, "{query}");
    }
    let r = s.get("/v1/drivers/bad%20id/track").await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    // A driver with no history in the window: an empty track, not an error.
    let empty = json(s.get("/v1/drivers/nobody/track").await).await;
    assert_eq!(empty["points"], json!([]));
    assert_eq!(empty["distance_m"], 0.0);
    // -0.0 compares equal to 0.0: check the sign a client would read.
    assert!(empty["distance_m"]
        .as_f64()
        .is_some_and(f64::is_sign_positive));
}

#[tokio::test]
async fn without_durability_history_is_unavailable() {
    let s = Server::start_with(&["--fsync", "off"], &[]);
    s.report(json!({"driver_id": "m", "latitude": 1, "longitude": 1}))
        .await;
    let r = s.get("/v1/drivers/m/track").await;
    assert_error(r, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").await;
}

#[tokio::test]
async fn a_graceful_restart_keeps_live_state_and_history() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_string();
    let args = [
        "--data-dir",
        dir.as_str(),
        "--driver-ttl",
        "1h",
        "--fsync",
        "interval:50ms",
    ];
    let mut s = Server::start_with(&args, &[]);
    report_track(&s, "keep", 0..20).await;
    s.report(json!({"driver_id": "live", "latitude": 3.5, "longitude": 4.5, "status": "busy"}))
        .await;
    s.signal("TERM");
    assert!(s.wait_exit(std::time::Duration::from_secs(20)).success());
    drop(s);
    let s = Server::start_with(&args, &[]);
    let live = json(s.get("/v1/drivers/live").await).await;
    assert_eq!(
        (live["latitude"].as_f64(), live["status"].as_str()),
        (Some(3.5), Some("busy"))
    );
    let track = json(
        s.get(&format!(
            "/v1/drivers/keep/track?{}",
            window(t0(), t0() + 1_000_000_000)
        ))
        .await,
    )
    .await;
    assert_eq!(timestamps(&track).len(), 20);
    let near = json(s.get("/v1/drivers/nearby?lat=3.5&lon=4.5").await).await;
    assert_eq!(near["drivers"][0]["driver_id"], "live");
}

#[tokio::test]
async fn retention_simplifies_then_deletes_old_history() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_string();
    let args = [
        "--data-dir",
        dir.as_str(),
        "--history-retention",
        "30d",
        "--cold-retention",
        "90d",
    ];
    let mut s = Server::start_with(&args, &[]);
    let day = 86_400 * 1_000_000i64;
    // Noon UTC, so that each track lies inside one day (retention works day by day).
    let noon = t0() - t0().rem_euclid(day) + day / 2;
    let warm = noon - 40 * day;
    let old = noon - 100 * day;
    report_track_at(&s, "aged", warm, 0..50).await;
    report_track_at(&s, "ancient", old, 0..50).await;
    s.signal("TERM");
    assert!(s.wait_exit(std::time::Duration::from_secs(20)).success());
    drop(s);
    // Retention runs at start-up (and every few minutes after).
    let s = Server::start_with(&args, &[]);
    let aged = json(
        s.get(&format!(
            "/v1/drivers/aged/track?{}",
            window(warm, warm + day / 24)
        ))
        .await,
    )
    .await;
    assert_eq!(
        timestamps(&aged).len(),
        2,
        "a straight line kept as its two ends: {aged}"
    );
    let ancient = json(
        s.get(&format!(
            "/v1/drivers/ancient/track?{}",
            window(old, old + day / 24)
        ))
        .await,
    )
    .await;
    assert_eq!(timestamps(&ancient).len(), 0, "{ancient}");
}
