//! The store against real files: ordering, bounds, paging, idempotence, isolation between drivers,
//! day boundaries, retention and reopening.

use super::*;
use crate::domain::{parse_rfc3339, Status};
use crate::geo::distance_to_segment_m;
use std::time::Duration;
use tempfile::TempDir;

const SEC: Micros = 1_000_000;
const DAY: Micros = 86_400 * SEC;

fn t0() -> Micros {
    parse_rfc3339("2026-03-10T08:00:00Z").unwrap()
}

fn position(driver: &str, ts: Micros, lat_e6: i32) -> Position {
    Position {
        driver_id: driver.into(),
        lat_e6,
        lon_e6: 121_000_000 + lat_e6 % 1000,
        status: Status::Busy,
        timestamp: ts,
        speed_mps: Some(8.25),
        heading_deg: None,
        accuracy_m: Some(3.0),
    }
}

/// `n` fixes every 2 s from `start`, latitude growing with the index.
fn drive(driver: &str, start: Micros, n: i32) -> Vec<Position> {
    (0..n)
        .map(|i| position(driver, start + i64::from(i) * 2 * SEC, 31_000_000 + i * 100))
        .collect()
}

fn open() -> (TempDir, History) {
    let dir = tempfile::tempdir().unwrap();
    let history = History::open(dir.path()).unwrap();
    (dir, history)
}

fn query(driver: &str, from: Micros, to: Micros) -> TrackQuery {
    TrackQuery {
        driver_id: driver.into(),
        from,
        to,
        limit: MAX_TRACK_LIMIT,
        cursor: None,
    }
}

fn times(history: &History, driver: &str, from: Micros, to: Micros) -> Vec<Micros> {
    let page = history.track(&query(driver, from, to)).unwrap();
    assert_eq!(page.next_cursor, None);
    page.points.iter().map(|p| p.timestamp).collect()
}

fn all_times(positions: &[Position]) -> Vec<Micros> {
    let mut ts: Vec<Micros> = positions.iter().map(|p| p.timestamp).collect();
    ts.sort_unstable();
    ts
}

#[test]
fn history_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<History>();
}

#[test]
fn track_is_in_time_order_including_late_arrivals() {
    let (_dir, history) = open();
    let fixes = drive("d1", t0(), 300);
    history.append(&fixes[..100]).unwrap();
    history.append(&fixes[200..]).unwrap();
    history.persist().unwrap();
    // Late: older windows, some already written, one batch out of order.
    let mut late: Vec<Position> = fixes[100..200].to_vec();
    late.reverse();
    history.append(&late).unwrap();
    let expected = all_times(&fixes);
    assert_eq!(times(&history, "d1", t0(), t0() + DAY), expected);
    let page = history.track(&query("d1", t0(), t0() + DAY)).unwrap();
    assert_eq!(page.points[150], TrackPoint::from(&fixes[150]));
    history.flush().unwrap();
    assert_eq!(times(&history, "d1", t0(), t0() + DAY), expected);
}

#[test]
fn from_and_to_are_inclusive() {
    let (_dir, history) = open();
    let fixes = drive("d1", t0(), 100);
    history.append(&fixes).unwrap();
    let (from, to) = (fixes[10].timestamp, fixes[20].timestamp);
    assert_eq!(times(&history, "d1", from, to), all_times(&fixes[10..=20]));
    assert_eq!(
        times(&history, "d1", from + 1, to - 1),
        all_times(&fixes[11..20])
    );
    assert_eq!(times(&history, "d1", to, from), Vec::<Micros>::new());
    history.flush().unwrap();
    assert_eq!(times(&history, "d1", from, to), all_times(&fixes[10..=20]));
}

#[test]
fn pages_return_every_point_exactly_once() {
    let (_dir, history) = open();
    let fixes = drive("d1", t0(), 1000);
    history.append(&fixes[..900]).unwrap();
    history.persist().unwrap();
    history.append(&fixes[900..]).unwrap(); // the last windows stay open in memory
    let mut q = TrackQuery {
        limit: 97,
        ..query("d1", t0(), t0() + DAY)
    };
    let mut seen = Vec::new();
    loop {
        let page = history.track(&q).unwrap();
        assert!(page.points.len() <= 97);
        seen.extend(page.points.iter().map(|p| p.timestamp));
        match page.next_cursor {
            Some(cursor) => q.cursor = Some(cursor),
            None => break,
        }
    }
    assert_eq!(seen, all_times(&fixes));
}

#[test]
fn a_cursor_it_did_not_make_is_refused() {
    let (_dir, history) = open();
    history.append(&drive("d1", t0(), 10)).unwrap();
    history.append(&drive("d2", t0(), 10)).unwrap();
    let page = history
        .track(&TrackQuery {
            limit: 3,
            ..query("d1", t0(), t0() + DAY)
        })
        .unwrap();
    let cursor = page.next_cursor.unwrap();
    let foreign = TrackQuery {
        cursor: Some(cursor),
        ..query("d2", t0(), t0() + DAY)
    };
    assert!(matches!(
        history.track(&foreign),
        Err(HistoryError::BadCursor)
    ));
    let junk = TrackQuery {
        cursor: Some("next-please".into()),
        ..query("d1", t0(), t0() + DAY)
    };
    assert!(matches!(history.track(&junk), Err(HistoryError::BadCursor)));
}

#[test]
fn the_same_driver_and_timestamp_twice_leaves_one_point() {
    let (_dir, history) = open();
    let ts = t0();
    history
        .append(&[position("d1", ts, 1), position("d1", ts, 2)])
        .unwrap();
    history.append(&[position("d1", ts, 3)]).unwrap();
    let page = history.track(&query("d1", ts, ts)).unwrap();
    assert_eq!(page.points.len(), 1);
    assert_eq!(page.points[0].lat_e6, 3);
    // Again once the point is stored, from a later batch that moved on meanwhile.
    history
        .append(&[position("d1", ts + 120 * SEC, 9)])
        .unwrap();
    history
        .append(&[position("d1", ts, 4), position("d1", ts, 5)])
        .unwrap();
    history.flush().unwrap();
    history
        .append(&[position("d1", ts + 120 * SEC, 10)])
        .unwrap();
    let page = history.track(&query("d1", ts, ts + DAY)).unwrap();
    let got: Vec<(Micros, i32)> = page
        .points
        .iter()
        .map(|p| (p.timestamp, p.lat_e6))
        .collect();
    assert_eq!(got, [(ts, 5), (ts + 120 * SEC, 10)]);
}

#[test]
fn other_drivers_never_leak_into_a_track() {
    let (_dir, history) = open();
    for (i, driver) in ["a", "a-1", "ab", "a.", "A", "b", "a0"].iter().enumerate() {
        history.append(&drive(driver, t0() + i as i64, 50)).unwrap();
    }
    history.persist().unwrap();
    let expected = all_times(&drive("a", t0(), 50));
    assert_eq!(times(&history, "a", t0() - DAY, t0() + DAY), expected);
    history.flush().unwrap();
    assert_eq!(times(&history, "a", t0() - DAY, t0() + DAY), expected);
    assert_eq!(
        times(&history, "a-", t0() - DAY, t0() + DAY),
        Vec::<Micros>::new()
    );
}

#[test]
fn tracks_span_midnight() {
    let (_dir, history) = open();
    let midnight = parse_rfc3339("2026-03-11T00:00:00Z").unwrap();
    let fixes = drive("d1", midnight - 60 * SEC, 61);
    history.append(&fixes).unwrap();
    history.flush().unwrap();
    assert_eq!(history.days.read().len(), 2);
    assert_eq!(
        times(&history, "d1", midnight - DAY, midnight + DAY),
        all_times(&fixes)
    );
    assert_eq!(
        times(&history, "d1", midnight - 1, midnight),
        vec![midnight]
    );
    let mut q = TrackQuery {
        limit: 7,
        ..query("d1", midnight - DAY, midnight + DAY)
    };
    let mut seen = Vec::new();
    while let Ok(page) = history.track(&q) {
        seen.extend(page.points.iter().map(|p| p.timestamp));
        let Some(cursor) = page.next_cursor else {
            break;
        };
        q.cursor = Some(cursor);
    }
    assert_eq!(seen, all_times(&fixes));
}

/// A driver zig-zagging for two hours: simplification has something to keep and something to drop.
fn zigzag(driver: &str, start: Micros) -> Vec<Position> {
    (0..3600)
        .map(|i: i32| {
            let wiggle = [0, 30, 60, 30][(i / 25 % 4) as usize] + (i * 7919) % 5;
            let mut p = position(driver, start + i64::from(i) * 2 * SEC, 31_000_000 + i * 100);
            p.lon_e6 = 121_000_000 + wiggle * 10;
            p
        })
        .collect()
}

#[test]
fn retention_simplifies_hot_days_then_drops_cold_ones() {
    let (dir, history) = open();
    let now = t0() + 100 * DAY;
    let (hot, cold) = (
        Duration::from_secs(30 * 86_400),
        Duration::from_secs(90 * 86_400),
    );
    let recent = drive("recent", now - DAY, 500);
    let older = zigzag("older", now - 60 * DAY);
    let ancient = drive("ancient", now - 95 * DAY, 500);
    for fixes in [&ancient, &older, &recent] {
        history.append(fixes).unwrap();
    }
    history.persist().unwrap(); // writes the windows that are over
    let report = history.apply_retention(now, hot, cold, 5.0).unwrap();
    assert_eq!(
        (
            report.days_compacted,
            report.days_deleted,
            report.days_deferred
        ),
        (1, 1, 0)
    );
    assert_eq!(report.points_before, older.len() as u64);

    assert_eq!(times(&history, "ancient", 0, now), Vec::<Micros>::new());
    assert_eq!(times(&history, "recent", 0, now), all_times(&recent));
    let simplified = history.track(&query("older", 0, now)).unwrap().points;
    assert_eq!(report.points_after, simplified.len() as u64);
    assert!(
        simplified.len() > 2 && simplified.len() < older.len() / 4,
        "{}",
        simplified.len()
    );
    assert_eq!(simplified[0], TrackPoint::from(&older[0]));
    assert_eq!(
        simplified[simplified.len() - 1],
        TrackPoint::from(&older[older.len() - 1])
    );
    let mut kept = simplified.iter().peekable();
    let mut segment = (simplified[0], simplified[1]);
    for p in &older {
        if kept.peek().is_some_and(|k| k.timestamp == p.timestamp) {
            let start = kept.next().copied().unwrap();
            segment = (start, kept.peek().copied().copied().unwrap_or(start));
            continue;
        }
        let d = distance_to_segment_m(
            (p.lat_e6, p.lon_e6),
            (segment.0.lat_e6, segment.0.lon_e6),
            (segment.1.lat_e6, segment.1.lon_e6),
        );
        assert!(d <= 5.0, "{d} m off the simplified track");
    }

    let again = history.apply_retention(now, hot, cold, 5.0).unwrap();
    assert_eq!(again, RetentionReport::default());
    drop(history);
    let history = History::open(dir.path()).unwrap();
    assert_eq!(
        history.track(&query("older", 0, now)).unwrap().points,
        simplified
    );
    assert_eq!(
        history.apply_retention(now, hot, cold, 5.0).unwrap(),
        RetentionReport::default()
    );
}

#[test]
fn checkpoint_covers_only_points_out_of_memory() {
    let (_dir, history) = open();
    history.append(&drive("d1", t0(), 1)).unwrap();
    history.set_checkpoint(1).unwrap();
    history.persist().unwrap();
    assert_eq!(history.checkpoint().unwrap(), 0, "the window is still open");
    history.append(&drive("d1", t0() + 120 * SEC, 1)).unwrap(); // writes the first window
    history.set_checkpoint(2).unwrap();
    history.persist().unwrap();
    assert_eq!(history.checkpoint().unwrap(), 1);
    history.flush().unwrap();
    assert_eq!(history.checkpoint().unwrap(), 2);
}

#[test]
fn reopening_keeps_data_and_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let fixes = drive("d1", t0(), 200);
    {
        let history = History::open(dir.path()).unwrap();
        history.append(&fixes).unwrap();
        history.set_checkpoint(42).unwrap();
        history.persist().unwrap();
    }
    let history = History::open(dir.path()).unwrap();
    assert_eq!(history.checkpoint().unwrap(), 42);
    assert_eq!(times(&history, "d1", 0, t0() + DAY), all_times(&fixes));
    assert!(history.disk_bytes() > 0);
}
