//! `GET /v1/drivers/{driver_id}/track`: where a driver went, for playback, distance and disputes.
//!
//! Paging: a page that is not the last carries `next_cursor` (in the JSON body, and in the GeoJSON
//! Feature's properties) and, in every format, a `Link: <…>; rel="next"` header (RFC 8288) naming
//! the next page's request with the window pinned, since a GPX document has nowhere to put a
//! cursor and a default `to` of "now" would move between pages.

use super::auth::Caller;
use super::drivers::check_driver_id;
use super::error::ApiError;
use super::extract::QueryParams;
use super::AppState;
use crate::domain::{
    format_rfc3339, now_micros, parse_rfc3339_in_query, FieldError, Micros, Status,
};
use crate::geo::{parse_tolerance_m, simplify_indices, track_distance_m, TOLERANCE_EXPECTED};
use crate::history::{format as track_format, TrackPoint, TrackQuery};
use axum::extract::{OriginalUri, Path, State};
use axum::http::header::{CONTENT_TYPE, LINK};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub const DEFAULT_TRACK_LIMIT: usize = 10_000;
pub const MAX_TRACK_LIMIT: usize = 100_000;
const HOUR_MICROS: Micros = 3_600 * 1_000_000;

/// Query parameters of a track request, as text: each is checked and reported by name.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TrackParams {
    /// Start of the window, RFC 3339 (default: one hour before `to`).
    #[param(value_type = Option<String>, format = DateTime)]
    pub from: Option<String>,
    /// End of the window, RFC 3339, inclusive (default: now).
    #[param(value_type = Option<String>, format = DateTime)]
    pub to: Option<String>,
    /// Most points returned, 1..100000 (default 10000); continue with `cursor`.
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Douglas–Peucker tolerance in metres (distance is still measured on the full track).
    #[param(value_type = Option<f64>)]
    pub simplify_m: Option<String>,
    /// `json` (default), `geojson` (a GeoJSON Feature) or `gpx` (GPX 1.1).
    #[param(value_type = Option<String>, example = "json")]
    pub format: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Json,
    GeoJson,
    Gpx,
}

impl Format {
    const ALL: [Format; 3] = [Format::Json, Format::GeoJson, Format::Gpx];

    fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::GeoJson => "geojson",
            Format::Gpx => "gpx",
        }
    }
}

/// One point of a track.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrackPointBody {
    pub latitude: f64,
    pub longitude: f64,
    #[schema(format = DateTime)]
    pub timestamp: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed_mps: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heading_deg: Option<f32>,
}

/// A page of a driver's track, in time order.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrackResponse {
    pub driver_id: String,
    #[schema(format = DateTime)]
    pub from: String,
    #[schema(format = DateTime)]
    pub to: String,
    pub points: Vec<TrackPointBody>,
    /// Great-circle length of this page's full (unsimplified) track, metres.
    pub distance_m: f64,
    /// Seconds from this page's first point to its last.
    pub duration_s: f64,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

struct Checked {
    query: TrackQuery,
    shape: Shape,
}

/// How the points are given back.
struct Shape {
    simplify_m: Option<f64>,
    format: Format,
}

fn time_param(
    errors: &mut Vec<FieldError>,
    name: &str,
    value: Option<&str>,
    default: Micros,
) -> Micros {
    match value {
        None => default,
        Some(text) => parse_rfc3339_in_query(text).unwrap_or_else(|| {
            errors.push(FieldError::new(name, "must be an RFC 3339 date-time"));
            default
        }),
    }
}

impl TrackParams {
    fn check(&self, driver_id: String) -> Result<Checked, ApiError> {
        let mut errors = Vec::new();
        let to = time_param(&mut errors, "to", self.to.as_deref(), now_micros());
        let from = time_param(&mut errors, "from", self.from.as_deref(), to - HOUR_MICROS);
        if from > to {
            errors.push(FieldError::new("from", "must not be after `to`"));
        }
        let limit = match self.limit.as_deref().map(|t| t.trim().parse::<usize>()) {
            None => DEFAULT_TRACK_LIMIT,
            Some(Ok(n)) if (1..=MAX_TRACK_LIMIT).contains(&n) => n,
            Some(_) => {
                errors.push(FieldError::new(
                    "limit",
                    format!("must be a whole number from 1 to {MAX_TRACK_LIMIT}"),
                ));
                DEFAULT_TRACK_LIMIT
            }
        };
        let simplify_m = match self.simplify_m.as_deref().map(parse_tolerance_m) {
            None => None,
            Some(Some(m)) => Some(m),
            Some(None) => {
                errors.push(FieldError::new(
                    "simplify_m",
                    format!("must be {TOLERANCE_EXPECTED}"),
                ));
                None
            }
        };
        let named = |text| Format::ALL.into_iter().find(|f| f.name() == text);
        let format = match self.format.as_deref().map(named) {
            None => Format::Json,
            Some(Some(format)) => format,
            Some(None) => {
                errors.push(FieldError::new(
                    "format",
                    "must be one of json, geojson, gpx",
                ));
                Format::Json
            }
        };
        if !errors.is_empty() {
            return Err(ApiError::fields(errors));
        }
        let query = TrackQuery {
            driver_id,
            from,
            to,
            limit,
            cursor: self.cursor.clone(),
        };
        Ok(Checked {
            query,
            shape: Shape { simplify_m, format },
        })
    }
}

fn point_body(p: &TrackPoint) -> TrackPointBody {
    TrackPointBody {
        latitude: p.lat_e6 as f64 / 1e6,
        longitude: p.lon_e6 as f64 / 1e6,
        timestamp: format_rfc3339(p.timestamp),
        status: p.status,
        speed_mps: p.speed_mps,
        heading_deg: p.heading_deg,
    }
}

/// The `Link` header value naming the page after this one: the same path, the window this page was
/// cut from (explicit, so "now" does not move), the same limit, format and tolerance, and `cursor`.
fn next_link(path: &str, query: &TrackQuery, shape: &Shape, cursor: &str) -> String {
    let mut link = format!(
        "<{path}?from={}&to={}&limit={}&cursor={cursor}",
        format_rfc3339(query.from),
        format_rfc3339(query.to),
        query.limit,
    );
    if shape.format != Format::Json {
        link.push_str("&format=");
        link.push_str(shape.format.name());
    }
    if let Some(m) = shape.simplify_m {
        link.push_str(&format!("&simplify_m={m}"));
    }
    link.push_str(">; rel=\"next\"");
    link
}

fn with_type(body: impl IntoResponse, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A driver's positions over a time window, in time order, paged, optionally simplified.
#[utoipa::path(
    get, path = "/v1/drivers/{driver_id}/track", tag = "drivers",
    params(("driver_id" = String, Path, description = "The driver's id"), TrackParams),
    responses(
        (status = 200, description = "The track (JSON; `format=geojson` gives a GeoJSON Feature, `format=gpx` GPX 1.1). A page with more after it has a `Link: <…>; rel=\"next\"` header in every format", body = TrackResponse,
            headers(("Link" = String, description = "`<next page's path and query>; rel=\"next\"`, only when more points follow"))),
        (status = 422, description = "Invalid parameters or cursor, one detail per parameter", body = super::error::ErrorResponse),
        (status = 503, description = "History is not available (durability is off)", body = super::error::ErrorResponse),
    )
)]
pub async fn track(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(driver_id): Path<String>,
    OriginalUri(uri): OriginalUri,
    QueryParams(params): QueryParams<TrackParams>,
) -> Result<Response, ApiError> {
    check_driver_id(&driver_id)?;
    let Checked { mut query, shape } = params.check(driver_id)?;
    let mut stored = query.clone();
    stored.driver_id = crate::domain::tenant::internal(&caller.tenant, &query.driver_id).into();
    let page = state.tracker.track(stored).await?;
    let link = page
        .next_cursor
        .as_deref()
        .map(|c| next_link(uri.path(), &query, &shape, c));
    // The cursor names the stored (tenant's) id; the answer shows the tenant's own.
    query.driver_id = crate::domain::tenant::external(&query.driver_id).to_string();
    let coords: Vec<(i32, i32)> = page.points.iter().map(|p| (p.lat_e6, p.lon_e6)).collect();
    let distance_m = (track_distance_m(&coords) * 100.0).round() / 100.0;
    let duration_s = match (page.points.first(), page.points.last()) {
        (Some(a), Some(b)) => (b.timestamp - a.timestamp) as f64 / 1e6,
        _ => 0.0,
    };
    let points: Vec<TrackPoint> = match shape.simplify_m {
        Some(m) if m > 0.0 => simplify_indices(&coords, m)
            .into_iter()
            .map(|i| page.points[i])
            .collect(),
        _ => page.points,
    };
    let mut response = match shape.format {
        Format::GeoJson => with_type(
            Json(track_format::geojson_feature(
                &query.driver_id,
                &points,
                distance_m,
                duration_s,
                page.next_cursor.as_deref(),
            )),
            "application/geo+json",
        ),
        Format::Gpx => with_type(
            track_format::gpx(&query.driver_id, &points),
            "application/gpx+xml",
        ),
        Format::Json => Json(TrackResponse {
            driver_id: query.driver_id,
            from: format_rfc3339(query.from),
            to: format_rfc3339(query.to),
            points: points.iter().map(point_body).collect(),
            distance_m,
            duration_s,
            next_cursor: page.next_cursor,
        })
        .into_response(),
    };
    if let Some(value) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(LINK, value);
    }
    Ok(response)
}
