//! The live map page at `/`: served from the binary with its assets, content types and cache
//! headers, configured by `--tile-url`; other unknown paths stay JSON 404s. (The page itself is
//! tested in a real browser by tests/browser/map.test.mjs.)

use crate::support::*;
use reqwest::StatusCode;

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary() {
    let s = Server::start();
    let r = s.get("/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&r, "cache-control"), "no-cache");
    assert!(header(&r, "content-security-policy").contains("script-src 'self'"));
    assert!(r.headers().contains_key("x-request-id"));
    let etag = header(&r, "etag");
    assert!(etag.starts_with('"'), "{etag}");
    let html = r.text().await.unwrap();
    assert!(html.contains("<canvas id=\"canvas\""), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no CDN: {html}"
    );

    // The page revalidates: the same ETag is a 304.
    let r = s
        .client
        .get(s.url("/"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

    // The assets it links are versioned and cached for good.
    for (kind, content_type) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
    ] {
        let start = html
            .find(&format!("/map/{kind}?v="))
            .unwrap_or_else(|| panic!("{kind} not linked"));
        let link = &html[start..html[start..].find('"').unwrap() + start];
        let r = s.get(link).await;
        assert_eq!(r.status(), StatusCode::OK, "{link}");
        assert_eq!(header(&r, "content-type"), content_type);
        assert_eq!(
            header(&r, "cache-control"),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        assert!(!r.text().await.unwrap().is_empty());
        // An unversioned or outdated link is revalidated instead.
        let r = s.get(&format!("/map/{kind}?v=0")).await;
        assert_eq!(header(&r, "cache-control"), "no-cache");
    }

    // The default tiles are OpenStreetMap's, with their attribution.
    let config = json(s.get("/map/config.json").await).await;
    assert_eq!(
        config["tile_url"],
        "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
    );
    assert_eq!(config["attribution"], "© OpenStreetMap contributors");

    // The page's routes are labelled by template in the metrics.
    let metrics = s.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"route="/map/config.json""#),
        "route label missing"
    );
}

#[tokio::test]
async fn the_tile_url_is_configurable_and_can_be_turned_off() {
    let s = Server::start_with(
        &["--tile-url", "https://tiles.example.com/{z}/{x}/{y}.png"],
        &[],
    );
    let config = json(s.get("/map/config.json").await).await;
    assert_eq!(
        config["tile_url"],
        "https://tiles.example.com/{z}/{x}/{y}.png"
    );
    assert_eq!(config["attribution"], "Tiles: tiles.example.com");
    drop(s);

    let s = Server::start_with(&[], &[("FLEET_TILE_URL", "none")]);
    let config = json(s.get("/map/config.json").await).await;
    assert!(config["tile_url"].is_null(), "{config}");
}

#[test]
fn a_bad_tile_url_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleettracker"))
        .args(["serve", "--tile-url", "https://tiles.example.com/{z}.png"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tile-url"), "{stderr}");
}

#[tokio::test]
async fn other_unknown_paths_are_still_json_404s() {
    let s = Server::start();
    for path in ["/index.html", "/map", "/map/", "/map/other.js", "/v1"] {
        assert_error(s.get(path).await, StatusCode::NOT_FOUND, "not_found").await;
    }
    let r = s.post_json("/", &serde_json::json!({})).await;
    assert_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}
