use super::*;
use crate::geo::distance_m;
use proptest::prelude::*;

const TTL: Duration = Duration::from_secs(60);

fn pos(id: &str, lat: f64, lon: f64, status: Status, ts: Micros) -> Position {
    Position {
        driver_id: id.into(),
        lat_e6: (lat * 1e6).round() as i32,
        lon_e6: (lon * 1e6).round() as i32,
        status,
        timestamp: ts,
        speed_mps: None,
        heading_deg: None,
        accuracy_m: None,
    }
}

fn query(lat: f64, lon: f64, radius_m: f64, limit: usize) -> NearbyQuery {
    NearbyQuery {
        lat_e6: (lat * 1e6).round() as i32,
        lon_e6: (lon * 1e6).round() as i32,
        radius_m,
        limit,
        statuses: StatusSet::WORKING,
    }
}

/// The answer by definition: every matching driver's distance, sorted, cut at `limit`.
fn brute_force(drivers: &[Position], q: &NearbyQuery) -> Vec<f64> {
    let (lat, lon) = (q.lat_e6 as f64 / 1e6, q.lon_e6 as f64 / 1e6);
    let mut d: Vec<f64> = drivers
        .iter()
        .filter(|p| q.statuses.contains(p.status) && p.status != Status::Offline)
        .map(|p| distance_m(lat, lon, p.latitude(), p.longitude()))
        .filter(|&d| d <= q.radius_m)
        .collect();
    d.sort_by(f64::total_cmp);
    d.truncate(q.limit);
    d
}

fn assert_same_distances(got: &[NearbyHit], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "result count");
    for (hit, w) in got.iter().zip(want) {
        assert!(
            (hit.distance_m - w).abs() < 1e-6,
            "{} vs {w}",
            hit.distance_m
        );
    }
}

#[test]
fn latest_wins_and_stale_is_ignored() {
    let index = MemoryIndex::new(TTL);
    let now = Instant::now();
    assert_eq!(
        index.upsert(&pos("a", 1.0, 1.0, Status::Online, 200), now),
        Upsert::Applied
    );
    assert_eq!(
        index.upsert(&pos("a", 2.0, 2.0, Status::Busy, 100), now),
        Upsert::Stale
    );
    let got = index.get("a", now).unwrap();
    assert_eq!(
        (got.lat_e6, got.timestamp, got.status),
        (1_000_000, 200, Status::Online)
    );
    assert_eq!(
        index.upsert(&pos("a", 3.0, 3.0, Status::Busy, 300), now),
        Upsert::Applied
    );
    assert_eq!(index.get("a", now).unwrap().lat_e6, 3_000_000);
    assert_eq!(
        index.counts(),
        StatusCounts {
            online: 0,
            busy: 1,
            offline: 0
        }
    );
    assert!(index.get("b", now).is_none());
}

#[test]
fn optional_fields_survive() {
    let index = MemoryIndex::new(TTL);
    let now = Instant::now();
    let mut p = pos("a", 1.0, 1.0, Status::Online, 1);
    p.speed_mps = Some(12.5);
    p.heading_deg = Some(90.0);
    index.upsert(&p, now);
    assert_eq!(index.get("a", now).unwrap(), p);
}

#[test]
fn moving_between_cells_keeps_the_grid_consistent() {
    let index = MemoryIndex::new(TTL);
    let now = Instant::now();
    // Many drivers in one cell, then move them out one by one; each search must see exactly the rest.
    for i in 0..50 {
        index.upsert(
            &pos(
                &format!("d{i}"),
                10.0001 + i as f64 * 1e-5,
                20.0001,
                Status::Online,
                1,
            ),
            now,
        );
    }
    for i in 0..50 {
        index.upsert(&pos(&format!("d{i}"), 11.0, 21.0, Status::Online, 2), now);
        let near_old = index.nearby(&query(10.0, 20.0, 5_000.0, 100), now);
        assert_eq!(near_old.len(), 49 - i);
        let near_new = index.nearby(&query(11.0, 21.0, 5_000.0, 100), now);
        assert_eq!(near_new.len(), i + 1);
    }
}

#[test]
fn offline_drivers_are_never_found_but_can_be_read() {
    let index = MemoryIndex::new(TTL);
    let now = Instant::now();
    index.upsert(&pos("a", 1.0, 1.0, Status::Online, 1), now);
    index.upsert(&pos("a", 1.0, 1.0, Status::Offline, 2), now);
    let mut q = query(1.0, 1.0, 1_000.0, 10);
    q.statuses.insert(Status::Offline);
    assert!(index.nearby(&q, now).is_empty());
    assert_eq!(index.get("a", now).unwrap().status, Status::Offline);
    index.upsert(&pos("a", 1.0, 1.0, Status::Busy, 3), now);
    assert_eq!(index.nearby(&q, now).len(), 1);
}

#[test]
fn status_filter_applies() {
    let index = MemoryIndex::new(TTL);
    let now = Instant::now();
    index.upsert(&pos("on", 1.0, 1.0, Status::Online, 1), now);
    index.upsert(&pos("busy", 1.0, 1.0001, Status::Busy, 1), now);
    let mut q = query(1.0, 1.0, 1_000.0, 10);
    q.statuses = StatusSet::empty();
    q.statuses.insert(Status::Busy);
    let hits = index.nearby(&q, now);
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].driver_id, "busy");
}

#[test]
fn ttl_hides_then_expire_reclaims() {
    let index = MemoryIndex::new(Duration::from_secs(2));
    let t0 = Instant::now();
    index.upsert(&pos("old", 1.0, 1.0, Status::Online, 1), t0);
    let t1 = t0 + Duration::from_millis(1500);
    index.upsert(&pos("new", 1.0, 1.0, Status::Online, 1), t1);
    let t2 = t0 + Duration::from_millis(2100);
    assert!(index.get("old", t2).is_none());
    assert!(index.get("new", t2).is_some());
    let hits = index.nearby(&query(1.0, 1.0, 100.0, 10), t2);
    assert_eq!(
        hits.iter()
            .map(|h| h.driver_id.as_str())
            .collect::<Vec<_>>(),
        ["new"]
    );
    assert_eq!(index.counts().total(), 2);
    assert_eq!(index.expire(t2), 1);
    assert_eq!(index.counts().total(), 1);
    // The freed slot is reused, and an expired driver that reports again starts afresh.
    index.upsert(&pos("old", 5.0, 5.0, Status::Busy, 0), t2);
    assert_eq!(index.get("old", t2).unwrap().lat_e6, 5_000_000);
    assert_eq!(
        index.counts(),
        StatusCounts {
            online: 1,
            busy: 1,
            offline: 0
        }
    );
}

#[test]
fn expired_driver_reporting_an_older_timestamp_is_applied() {
    let index = MemoryIndex::new(Duration::from_secs(1));
    let t0 = Instant::now();
    index.upsert(&pos("a", 1.0, 1.0, Status::Online, 500), t0);
    let t1 = t0 + Duration::from_secs(2);
    assert_eq!(
        index.upsert(&pos("a", 2.0, 2.0, Status::Online, 100), t1),
        Upsert::Applied
    );
    assert_eq!(index.get("a", t1).unwrap().timestamp, 100);
}

#[test]
fn exactly_the_nearest_in_a_dense_cluster() {
    let index = MemoryIndex::new(TTL);
    let now = Instant::now();
    let mut rng = 7u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    let drivers: Vec<Position> = (0..20_000)
        .map(|i| {
            let status = if i % 7 == 0 {
                Status::Busy
            } else {
                Status::Online
            };
            pos(
                &format!("d{i}"),
                31.2 + next() * 0.06,
                121.45 + next() * 0.06,
                status,
                1,
            )
        })
        .collect();
    for p in &drivers {
        index.upsert(p, now);
    }
    for (lat, lon, r, limit) in [
        (31.23, 121.48, 1_000.0, 50),
        (31.23, 121.48, 100.0, 1_000),
        (31.2, 121.45, 3_000.0, 7),
        (31.3, 121.6, 20_000.0, 10),
        (31.0, 121.0, 100_000.0, 1),
        (30.0, 120.0, 1_000.0, 50),
    ] {
        let q = query(lat, lon, r, limit);
        assert_same_distances(&index.nearby(&q, now), &brute_force(&drivers, &q));
    }
}

#[test]
fn antimeridian_and_pole_neighbours_are_found() {
    let index = MemoryIndex::new(TTL);
    let now = Instant::now();
    let drivers = vec![
        pos("east", 0.0, 179.9999, Status::Online, 1),
        pos("west", 0.0, -179.9999, Status::Online, 1),
        pos("pole-a", 89.9999, 0.0, Status::Online, 1),
        pos("pole-b", 89.9999, 180.0, Status::Online, 1),
        pos("pole-c", 89.9, 90.0, Status::Online, 1),
    ];
    for p in &drivers {
        index.upsert(p, now);
    }
    for q in [
        query(0.0, 180.0, 1_000.0, 10),
        query(0.0, -179.99, 5_000.0, 10),
        query(90.0, 0.0, 50_000.0, 10),
        query(89.95, -90.0, 100_000.0, 2),
    ] {
        assert_same_distances(&index.nearby(&q, now), &brute_force(&drivers, &q));
    }
}

fn wrap_lon(lon: f64) -> f64 {
    (lon + 180.0).rem_euclid(360.0) - 180.0
}

/// An index holding drivers at `center + spot * spread` (latitude clamped, longitude wrapped),
/// statuses from the spots; for the property tests.
fn scatter(
    spots: &[(f64, f64, u8)],
    center_lat: f64,
    center_lon: f64,
    spread: f64,
) -> (MemoryIndex, Vec<Position>, Instant) {
    let index = MemoryIndex::new(TTL);
    let now = Instant::now();
    let drivers: Vec<Position> = spots
        .iter()
        .enumerate()
        .map(|(i, &(dy, dx, s))| {
            let lat = (center_lat + dy * spread).clamp(-90.0, 90.0);
            pos(
                &format!("d{i}"),
                lat,
                wrap_lon(center_lon + dx * spread),
                Status::from_index(s),
                1,
            )
        })
        .collect();
    for p in &drivers {
        index.upsert(p, now);
    }
    (index, drivers, now)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the drivers, point, radius and limit: the index answers what brute force answers.
    #[test]
    fn nearby_matches_brute_force(
        spots in prop::collection::vec((-1.0f64..1.0, -1.0f64..1.0, 0u8..3), 1..300),
        center_lat in -89.0f64..89.0,
        center_lon in -180.0f64..180.0,
        spread in prop_oneof![Just(0.001f64), Just(0.02), Just(0.5), Just(3.0)],
        q_offset in (-1.0f64..1.0, -1.0f64..1.0),
        radius in 1.0f64..100_000.0,
        limit in 1usize..60,
    ) {
        let (index, drivers, now) = scatter(&spots, center_lat, center_lon, spread);
        let q = query((center_lat + q_offset.0 * spread).clamp(-90.0, 90.0),
                      wrap_lon(center_lon + q_offset.1 * spread), radius, limit);
        let got = index.nearby(&q, now);
        let want = brute_force(&drivers, &q);
        prop_assert_eq!(got.len(), want.len());
        for (hit, w) in got.iter().zip(&want) {
            prop_assert!((hit.distance_m - w).abs() < 1e-6);
        }
    }
}

#[test]
fn restored_positions_keep_their_age() {
    let index = MemoryIndex::new(Duration::from_secs(10));
    let now = Instant::now() + Duration::from_secs(3600);
    assert_eq!(
        index.restore(
            &pos("young", 1.0, 1.0, Status::Online, 1),
            now,
            Duration::from_secs(4)
        ),
        Upsert::Applied
    );
    assert_eq!(
        index.restore(
            &pos("old", 1.0, 1.0, Status::Online, 1),
            now,
            Duration::from_secs(11)
        ),
        Upsert::Expired
    );
    assert!(index.get("old", now).is_none());
    assert!(index.get("young", now + Duration::from_secs(5)).is_some());
    assert!(index.get("young", now + Duration::from_secs(7)).is_none());
    let mut seen = Vec::new();
    index.for_each_live(now + Duration::from_secs(1), |p, age| {
        seen.push((p.driver_id.to_string(), age))
    });
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "young");
    assert!(
        seen[0].1 >= Duration::from_millis(4990) && seen[0].1 <= Duration::from_millis(5010),
        "{:?}",
        seen[0].1
    );
}

fn box_query(south: f64, west: f64, north: f64, east: f64) -> BoxQuery {
    let e6 = |v: f64| (v * 1e6).round() as i32;
    BoxQuery {
        south_e6: e6(south),
        west_e6: e6(west),
        north_e6: e6(north),
        east_e6: e6(east),
        statuses: StatusSet::WORKING,
    }
}

/// The ids `within_box` finds, sorted.
fn ids_within(index: &MemoryIndex, q: &BoxQuery, now: Instant) -> Vec<String> {
    let mut ids: Vec<String> = index
        .within_box(q, now)
        .into_iter()
        .map(|p| p.driver_id.to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn within_box_includes_edges_and_skips_offline_filtered_and_expired() {
    let index = MemoryIndex::new(Duration::from_secs(2));
    let t0 = Instant::now();
    for (id, lat, lon, status) in [
        ("corner", 31.0, 121.0, Status::Online),
        ("inside", 31.1, 121.2, Status::Busy),
        ("edge", 31.2, 121.3, Status::Online),
        ("outside", 31.2, 121.300001, Status::Online),
        ("off", 31.1, 121.1, Status::Offline),
    ] {
        index.upsert(&pos(id, lat, lon, status, 1), t0);
    }
    let q = box_query(31.0, 121.0, 31.2, 121.3);
    assert_eq!(ids_within(&index, &q, t0), ["corner", "edge", "inside"]);
    let busy_only = BoxQuery {
        statuses: {
            let mut s = StatusSet::empty();
            s.insert(Status::Busy);
            s
        },
        ..q
    };
    assert_eq!(ids_within(&index, &busy_only, t0), ["inside"]);
    index.upsert(
        &pos("inside", 31.1, 121.2, Status::Busy, 2),
        t0 + Duration::from_secs(1),
    );
    assert_eq!(
        ids_within(&index, &q, t0 + Duration::from_millis(2500)),
        ["inside"]
    );
}

#[test]
fn within_box_across_the_antimeridian_and_at_180() {
    let index = MemoryIndex::new(TTL);
    let now = Instant::now();
    for (id, lon) in [
        ("east", 179.9),
        ("at180", 180.0),
        ("west", -179.9),
        ("far", 0.0),
    ] {
        index.upsert(&pos(id, 0.0, lon, Status::Online, 1), now);
    }
    let wrapping = box_query(-1.0, 179.5, 1.0, -179.5);
    assert_eq!(
        ids_within(&index, &wrapping, now),
        ["at180", "east", "west"]
    );
    let up_to_180 = box_query(-1.0, 179.5, 1.0, 180.0);
    assert_eq!(ids_within(&index, &up_to_180, now), ["at180", "east"]);
    let world = box_query(-90.0, -180.0, 90.0, 180.0);
    assert_eq!(
        ids_within(&index, &world, now),
        ["at180", "east", "far", "west"]
    );
}

#[test]
fn expire_each_reports_the_removed_positions() {
    let index = MemoryIndex::new(Duration::from_secs(1));
    let t0 = Instant::now();
    index.upsert(&pos("gone", 1.0, 2.0, Status::Busy, 7), t0);
    index.upsert(
        &pos("stays", 1.0, 2.0, Status::Online, 7),
        t0 + Duration::from_millis(800),
    );
    let mut removed = Vec::new();
    let n = index.expire_each(t0 + Duration::from_millis(1500), |p| removed.push(p));
    assert_eq!(n, 1);
    assert_eq!(removed.len(), 1);
    assert_eq!(
        (
            removed[0].driver_id.as_str(),
            removed[0].lat_e6,
            removed[0].status
        ),
        ("gone", 1_000_000, Status::Busy)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any box, small or huge, wrapping the antimeridian or not: exactly the drivers inside it.
    #[test]
    fn within_box_matches_brute_force(
        spots in prop::collection::vec((-1.0f64..1.0, -1.0f64..1.0, 0u8..3), 1..300),
        center_lat in -89.0f64..89.0,
        center_lon in -180.0f64..180.0,
        spread in prop_oneof![Just(0.001f64), Just(0.02), Just(0.5), Just(3.0)],
        corners in ((-1.0f64..1.0, -1.0f64..1.0), (0.0f64..2.0, 0.0f64..2.0)),
        scale in prop_oneof![Just(1.0f64), Just(40.0)],
    ) {
        let (index, drivers, now) = scatter(&spots, center_lat, center_lon, spread);
        let ((dy, dx), (h, w)) = corners;
        let south = (center_lat + dy * spread).clamp(-90.0, 90.0);
        let north = (south + h * spread * scale).min(90.0);
        let west = wrap_lon(center_lon + dx * spread);
        let east = wrap_lon(west + (w * spread * scale).min(359.0));
        let q = box_query(south, west, north, east);
        let mut want: Vec<String> = drivers
            .iter()
            .filter(|p| p.status != Status::Offline && q.contains(p.lat_e6, p.lon_e6))
            .map(|p| p.driver_id.to_string())
            .collect();
        want.sort();
        prop_assert_eq!(ids_within(&index, &q, now), want);
    }
}

/// Regression: the sweeper reads the clock, then a request stamps a driver with a newer reading
/// before the sweeper reaches its shard. That driver is fresh and must survive the sweep (it used to
/// look infinitely old through the wrapping tick arithmetic and was dropped under load).
#[test]
fn a_driver_stamped_after_the_sweep_began_is_not_expired() {
    let index = MemoryIndex::new(Duration::from_secs(3600));
    let sweep_started = Instant::now() + Duration::from_secs(10);
    let request_clock = sweep_started + Duration::from_millis(50);
    index.upsert(&pos("racer", 1.0, 1.0, Status::Online, 1), request_clock);
    assert_eq!(index.expire(sweep_started), 0);
    assert!(index.get("racer", sweep_started).is_some());
    let hits = index.nearby(&query(1.0, 1.0, 100.0, 10), sweep_started);
    assert_eq!(hits.len(), 1);
    let mut ages = Vec::new();
    index.for_each_live(sweep_started, |_, age| ages.push(age));
    assert_eq!(ages, [Duration::ZERO]);
}
