//! `GET /`: the live map page, served from the binary. One HTML, one JS and one CSS file from
//! `assets/map/`, embedded at compile time (no build step, no CDN), plus `GET /map/config.json`
//! with the settings the page needs (the `--tile-url` template).
//!
//! The page draws the drivers of the visible area on a Web Mercator canvas, follows them over
//! `GET /v1/stream` (re-subscribing to the viewport's box after each pan or zoom), shows a driver's
//! recent trail from `GET /v1/drivers/{driver_id}/track`, and live counts from `GET /v1/stats`.
//!
//! Caching: the page itself is `no-cache` (revalidated by `ETag`); it links the script and the
//! stylesheet with `?v=<content hash>`, and those versioned URLs are cached for a year as
//! immutable, so a new binary's page always gets its own assets.

use axum::extract::Request;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::{Arc, LazyLock};

const INDEX_HTML: &str = include_str!("../../assets/map/index.html");
const APP_JS: &str = include_str!("../../assets/map/app.js");
const STYLE_CSS: &str = include_str!("../../assets/map/style.css");

const JS_HASH: u64 = fnv1a(APP_JS.as_bytes());
const CSS_HASH: u64 = fnv1a(STYLE_CSS.as_bytes());

/// The page's script may only come from here; tiles may come from any http(s) origin (the tile
/// server is configurable); the stream is a same-origin WebSocket.
const PAGE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data: blob: https: http:; connect-src 'self' ws: wss:; \
    frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The page with its asset links versioned by content hash.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    INDEX_HTML
        .replace("{{app_js}}", &format!("/map/app.js?v={JS_HASH:016x}"))
        .replace(
            "{{style_css}}",
            &format!("/map/style.css?v={CSS_HASH:016x}"),
        )
});
static PAGE_ETAG: LazyLock<String> = LazyLock::new(|| etag(fnv1a(PAGE.as_bytes())));

/// What the page is configured with.
#[derive(Debug, Clone)]
pub struct MapSettings {
    /// `{z}/{x}/{y}` tile URL template; `None` draws the coordinate grid only.
    pub tile_url: Option<String>,
}

impl MapSettings {
    /// From the `--tile-url` value (`none` turns tiles off).
    pub fn new(tile_url: &str) -> MapSettings {
        MapSettings {
            tile_url: (tile_url != "none").then(|| tile_url.to_string()),
        }
    }
}

impl Default for MapSettings {
    fn default() -> Self {
        MapSettings::new(crate::config::DEFAULT_TILE_URL)
    }
}

/// The page's routes: `/`, `/map/app.js`, `/map/style.css`, `/map/config.json`.
pub fn routes(settings: MapSettings) -> Router {
    let config = serde_json::json!({
        "tile_url": settings.tile_url,
        "attribution": settings.tile_url.as_deref().map(attribution),
    })
    .to_string();
    let config: Arc<str> = config.into();
    let config_etag: Arc<str> = etag(fnv1a(config.as_bytes())).into();
    Router::new()
        .route("/", get(page))
        .route("/map/app.js", get(app_js))
        .route("/map/style.css", get(style_css))
        .route(
            "/map/config.json",
            get(move |headers: HeaderMap| {
                let config = config.clone();
                let tag = config_etag.clone();
                async move {
                    asset(
                        &headers,
                        config.to_string(),
                        "application/json",
                        &tag,
                        "no-cache",
                    )
                }
            }),
        )
}

/// Attribution the tile provider requires, as plain text.
fn attribution(tile_url: &str) -> String {
    if tile_url.contains("openstreetmap.org") {
        "© OpenStreetMap contributors".into()
    } else {
        let host = tile_url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("the tile server");
        format!("Tiles: {host}")
    }
}

async fn page(headers: HeaderMap) -> Response {
    let mut response = asset(
        &headers,
        PAGE.as_str(),
        "text/html; charset=utf-8",
        &PAGE_ETAG,
        "no-cache",
    );
    response
        .headers_mut()
        .insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_CSP));
    response
}

async fn app_js(request: Request) -> Response {
    versioned(&request, APP_JS, "text/javascript; charset=utf-8", JS_HASH)
}

async fn style_css(request: Request) -> Response {
    versioned(&request, STYLE_CSS, "text/css; charset=utf-8", CSS_HASH)
}

/// A static file linked as `?v=<hash>`: cached for good under its current version, revalidated
/// under any other URL.
fn versioned(request: &Request, body: &'static str, content_type: &str, hash: u64) -> Response {
    let current = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("v=")))
        .is_some_and(|v| v == format!("{hash:016x}"));
    let cache = if current {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    asset(request.headers(), body, content_type, &etag(hash), cache)
}

/// A 200 with the body, or a 304 when the client's `If-None-Match` names this `ETag`.
fn asset(
    headers: &HeaderMap,
    body: impl IntoResponse,
    content_type: &str,
    etag: &str,
    cache: &'static str,
) -> Response {
    let fresh = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.into_response()
    };
    let h = response.headers_mut();
    if !fresh {
        if let Ok(value) = HeaderValue::from_str(content_type) {
            h.insert(CONTENT_TYPE, value);
        }
    }
    if let Ok(value) = HeaderValue::from_str(etag) {
        h.insert(ETAG, value);
    }
    h.insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

fn etag(hash: u64) -> String {
    format!("\"{hash:016x}\"")
}

/// 64-bit FNV-1a: a content hash for versions and `ETag`s, computable at compile time.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_its_assets_by_version() {
        assert!(PAGE.contains(&format!("/map/app.js?v={JS_HASH:016x}")));
        assert!(PAGE.contains(&format!("/map/style.css?v={CSS_HASH:016x}")));
        assert!(!PAGE.contains("{{"));
    }

    #[test]
    fn tiles_can_be_turned_off() {
        assert_eq!(MapSettings::new("none").tile_url, None);
        assert!(MapSettings::default()
            .tile_url
            .is_some_and(|u| u.contains("{z}")));
    }

    #[test]
    fn attribution_names_the_provider() {
        assert_eq!(
            attribution("https://tile.openstreetmap.org/{z}/{x}/{y}.png"),
            "© OpenStreetMap contributors"
        );
        assert_eq!(
            attribution("https://tiles.example.com:8443/{z}/{x}/{y}.png"),
            "Tiles: tiles.example.com:8443"
        );
    }

    #[test]
    fn hashes_differ_by_content() {
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    }
}
