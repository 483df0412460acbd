//! Tracks as GeoJSON and GPX: pure functions the HTTP handler calls with a page of points.
//!
//! GeoJSON (RFC 7946) puts longitude first and allows no per-vertex properties, so timestamps travel
//! as a parallel array in `properties`. A LineString needs two positions: a one-point track is a
//! `Point`, an empty one has `null` geometry. GPX 1.1 has no speed or heading in its core schema;
//! a point carries its position and time.

use super::TrackPoint;
use crate::domain::format_rfc3339;
use serde_json::{json, Value};
use std::fmt::Write;

/// A GeoJSON Feature of the track: `[lon, lat]` coordinates, and `driver_id`, `timestamps` (RFC
/// 3339, one per coordinate), `distance_m`, `duration_s` and `next_cursor` (null on the last page)
/// in its properties.
pub fn geojson_feature(
    driver_id: &str,
    points: &[TrackPoint],
    distance_m: f64,
    duration_s: f64,
    next_cursor: Option<&str>,
) -> Value {
    let coordinates: Vec<Value> = points
        .iter()
        .map(|p| json!([degrees(p.lon_e6), degrees(p.lat_e6)]))
        .collect();
    let geometry = match coordinates.len() {
        0 => Value::Null,
        1 => json!({"type": "Point", "coordinates": coordinates[0]}),
        _ => json!({"type": "LineString", "coordinates": coordinates}),
    };
    let timestamps: Vec<String> = points.iter().map(|p| format_rfc3339(p.timestamp)).collect();
    json!({
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "driver_id": driver_id,
            "timestamps": timestamps,
            "distance_m": distance_m,
            "duration_s": duration_s,
            "next_cursor": next_cursor,
        }
    })
}

/// A GPX 1.1 document with one track of one segment, named after the driver.
pub fn gpx(driver_id: &str, points: &[TrackPoint]) -> String {
    let mut out = String::with_capacity(160 + points.len() * 80);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(
        "<gpx version=\"1.1\" creator=\"FleetTracker\" xmlns=\"http://www.topografix.com/GPX/1/1\">\n",
    );
    let _ = writeln!(
        out,
        "  <trk>\n    <name>{}</name>\n    <trkseg>",
        escape_xml(driver_id)
    );
    for p in points {
        let _ = writeln!(
            out,
            "      <trkpt lat=\"{}\" lon=\"{}\"><time>{}</time></trkpt>",
            degrees(p.lat_e6),
            degrees(p.lon_e6),
            format_rfc3339(p.timestamp)
        );
    }
    out.push_str("    </trkseg>\n  </trk>\n</gpx>\n");
    out
}

fn degrees(e6: i32) -> f64 {
    f64::from(e6) / 1e6
}

/// Text safe inside an XML element or a quoted attribute.
fn escape_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{parse_rfc3339, Status};

    fn track() -> Vec<TrackPoint> {
        let t0 = parse_rfc3339("2026-01-31T23:59:58Z").unwrap_or_default();
        [(31_230_400, 121_473_700), (-31_230_401, -121_473_701)]
            .iter()
            .enumerate()
            .map(|(i, &(lat_e6, lon_e6))| TrackPoint {
                lat_e6,
                lon_e6,
                timestamp: t0 + i as i64 * 2_500_000,
                status: Status::Busy,
                speed_mps: Some(8.5),
                heading_deg: None,
            })
            .collect()
    }

    #[test]
    fn geojson_is_a_linestring_feature_lon_first() {
        let feature = geojson_feature("drv-1", &track(), 123.5, 2.5, Some("abc"));
        assert_eq!(feature["type"], "Feature");
        assert_eq!(feature["geometry"]["type"], "LineString");
        assert_eq!(
            feature["geometry"]["coordinates"],
            json!([[121.4737, 31.2304], [-121.473701, -31.230401]])
        );
        let props = &feature["properties"];
        assert_eq!(props["driver_id"], "drv-1");
        assert_eq!(
            props["timestamps"],
            json!(["2026-01-31T23:59:58Z", "2026-02-01T00:00:00.500Z"])
        );
        assert_eq!(props["distance_m"], 123.5);
        assert_eq!(props["duration_s"], 2.5);
        assert_eq!(props["next_cursor"], "abc");
    }

    #[test]
    fn short_tracks_are_still_valid_geojson() {
        let one = geojson_feature("d", &track()[..1], 0.0, 0.0, None);
        assert_eq!(
            one["geometry"],
            json!({"type": "Point", "coordinates": [121.4737, 31.2304]})
        );
        let none = geojson_feature("d", &[], 0.0, 0.0, None);
        assert_eq!(none["geometry"], Value::Null);
        assert_eq!(none["properties"]["timestamps"], json!([]));
        assert_eq!(
            none["properties"]["next_cursor"],
            Value::Null,
            "the last page"
        );
    }

    #[test]
    fn gpx_parses_as_gpx_1_1_with_escaped_names() {
        let text = gpx("a<b>&\"c'", &track());
        let doc = roxmltree::Document::parse(&text).unwrap();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "gpx");
        assert_eq!(
            root.tag_name().namespace(),
            Some("http://www.topografix.com/GPX/1/1")
        );
        assert_eq!(root.attribute("version"), Some("1.1"));
        let name = doc.descendants().find(|n| n.has_tag_name("name")).unwrap();
        assert_eq!(name.text(), Some("a<b>&\"c'"));
        let points: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("trkpt"))
            .collect();
        assert_eq!(points.len(), 2);
        assert_eq!(points[1].attribute("lat"), Some("-31.230401"));
        assert_eq!(points[1].attribute("lon"), Some("-121.473701"));
        let time = points[1]
            .children()
            .find(|n| n.has_tag_name("time"))
            .unwrap();
        assert_eq!(time.text(), Some("2026-02-01T00:00:00.500Z"));
        assert_eq!(
            doc.descendants()
                .filter(|n| n.has_tag_name("trkseg"))
                .count(),
            1
        );
    }
}
