//! Contract tests against real Redis (a standalone server and a 3-master cluster, same bodies),
//! with the embedded [`MemoryIndex`] as the reference answer.

use super::*;
use crate::domain::StatusSet;
use crate::hub::RemovedReason;
use crate::live::MemoryIndex;
use fleettracker_testkit::{RedisCluster, RedisServer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(300);
const T0: i64 = 1_700_000_000_000_000;

fn standalone_target(server: &RedisServer) -> RedisTarget {
    RedisTarget::parse(&server.url(), false)
}

fn cluster_target(cluster: &RedisCluster) -> RedisTarget {
    RedisTarget {
        urls: cluster.urls(),
        cluster: true,
    }
}

fn pos(id: &str, lat_e6: i32, lon_e6: i32, status: Status, ts: i64) -> Position {
    Position {
        driver_id: id.into(),
        lat_e6,
        lon_e6,
        status,
        timestamp: ts,
        speed_mps: Some(12.5),
        heading_deg: None,
        accuracy_m: Some(3.25),
    }
}

/// A fresh, empty store (FLUSHALL, then a new client so no cached area registrations survive).
async fn fresh(target: &RedisTarget, ttl: Duration) -> RedisLive {
    let metrics = Metrics::new();
    let live = RedisLive::connect(target, ttl, &metrics).await.unwrap();
    let _: Value = redis::cmd("FLUSHALL")
        .query_async(&mut live.conn())
        .await
        .unwrap();
    RedisLive::connect(target, ttl, &metrics).await.unwrap()
}

/// `n` distinct timestamps after `T0`, in an order fixed by `seed`.
fn shuffled_timestamps(n: i64, seed: u64) -> Vec<i64> {
    let mut timestamps: Vec<i64> = (0..n).map(|i| T0 + 1000 + i).collect();
    timestamps.shuffle(&mut StdRng::seed_from_u64(seed));
    timestamps
}

async fn round_trip_and_stale(target: &RedisTarget) {
    let live = fresh(target, TTL).await;
    assert_eq!(live.get("nobody").await.unwrap(), None);
    let p = pos("d1", 31_230_400, 121_473_700, Status::Online, T0 + 10);
    assert_eq!(
        live.upsert(std::slice::from_ref(&p)).await.unwrap(),
        [Upsert::Applied]
    );
    assert_eq!(live.get("d1").await.unwrap(), Some(p.clone()));
    // Older: stale, not applied; equal: applied (like the embedded index).
    let older = pos("d1", 31_240_000, 121_480_000, Status::Busy, T0 + 5);
    let equal = Position {
        speed_mps: None,
        ..pos("d1", 31_230_401, 121_473_700, Status::Online, T0 + 10)
    };
    assert_eq!(
        live.upsert(&[older, equal.clone()]).await.unwrap(),
        [Upsert::Stale, Upsert::Applied]
    );
    assert_eq!(live.get("d1").await.unwrap(), Some(equal));

    // Two instances racing on one driver: the newest timestamp wins.
    let other = RedisLive::connect(target, TTL, &Metrics::new())
        .await
        .unwrap();
    let timestamps = shuffled_timestamps(400, 7);
    let tasks: Vec<_> = timestamps
        .iter()
        .enumerate()
        .map(|(i, &ts)| {
            let store = if i % 2 == 0 {
                live.clone()
            } else {
                other.clone()
            };
            // Jump between cells so cluster area updates move too.
            let lat = 31_200_000 + (ts % 7) as i32 * 40_000;
            let p = pos("racer", lat, 121_473_700, Status::Online, ts);
            tokio::spawn(async move { store.upsert(&[p]).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let max = timestamps.iter().max().copied().unwrap();
    assert_eq!(live.get("racer").await.unwrap().unwrap().timestamp, max);
    assert_eq!(other.get("racer").await.unwrap().unwrap().timestamp, max);
}

/// Batches larger than a script call, sent concurrently through one instance (several flushes in
/// flight on one server): every driver ends at its newest position, and each request gets its own
/// results (a driver's newest position is never answered stale).
async fn concurrent_batches_keep_the_newest(target: &RedisTarget) {
    const DRIVERS: i64 = 100;
    let live = fresh(target, TTL).await;
    let timestamps = shuffled_timestamps(8 * 600, 11);
    let batches: Vec<Vec<Position>> = timestamps
        .chunks(600)
        .map(|chunk| {
            chunk
                .iter()
                .map(|&ts| {
                    let lat = 31_200_000 + (ts % 7) as i32 * 40_000;
                    pos(
                        &format!("b{}", ts % DRIVERS),
                        lat,
                        121_473_700,
                        Status::Online,
                        ts,
                    )
                })
                .collect()
        })
        .collect();
    let mut newest_of: HashMap<String, i64> = HashMap::new();
    for &ts in &timestamps {
        let newest = newest_of.entry(format!("b{}", ts % DRIVERS)).or_default();
        *newest = (*newest).max(ts);
    }
    let newest = |id: &str| newest_of.get(id).copied();
    let tasks: Vec<_> = batches
        .iter()
        .cloned()
        .map(|batch| {
            let store = live.clone();
            tokio::spawn(async move { store.upsert(&batch).await })
        })
        .collect();
    for (batch, task) in batches.iter().zip(tasks) {
        let results = task.await.unwrap().unwrap();
        assert_eq!(results.len(), batch.len());
        for (p, r) in batch.iter().zip(results) {
            if Some(p.timestamp) == newest(p.driver_id.as_str()) {
                assert_eq!(
                    r,
                    Upsert::Applied,
                    "{} at {}",
                    p.driver_id.as_str(),
                    p.timestamp
                );
            }
        }
    }
    for d in 0..DRIVERS {
        let id = format!("b{d}");
        let got = live.get(&id).await.unwrap().unwrap();
        assert_eq!(Some(got.timestamp), newest(&id));
    }
}

async fn offline_is_kept_but_not_searched(target: &RedisTarget) {
    let live = fresh(target, TTL).await;
    let on = pos("d2", 31_230_400, 121_473_700, Status::Online, T0);
    live.upsert(&[on]).await.unwrap();
    let q = NearbyQuery {
        lat_e6: 31_230_400,
        lon_e6: 121_473_700,
        radius_m: 1000.0,
        limit: 10,
        statuses: StatusSet::WORKING,
    };
    assert_eq!(live.nearby(&q).await.unwrap().len(), 1);
    let off = pos("d2", 31_230_500, 121_473_700, Status::Offline, T0 + 1);
    live.upsert(std::slice::from_ref(&off)).await.unwrap();
    assert!(live.nearby(&q).await.unwrap().is_empty());
    let mut all = StatusSet::WORKING;
    all.insert(Status::Offline);
    assert!(live
        .nearby(&NearbyQuery { statuses: all, ..q })
        .await
        .unwrap()
        .is_empty());
    assert_eq!(live.get("d2").await.unwrap(), Some(off));
    let counts = live.counts().await.unwrap();
    assert_eq!((counts.online, counts.busy, counts.offline), (0, 0, 1));
    // Status changes inside one batch, then repeats within the seen refresh interval.
    let busy = |ts| pos("d2", 31_230_500, 121_473_700, Status::Busy, T0 + ts);
    let online = pos("d2", 31_230_500, 121_473_700, Status::Online, T0 + 2);
    live.upsert(&[online, busy(3), busy(4)]).await.unwrap();
    live.upsert(&[busy(5)]).await.unwrap();
    let counts = live.counts().await.unwrap();
    assert_eq!((counts.online, counts.busy, counts.offline), (0, 1, 0));
    assert_eq!(live.nearby(&q).await.unwrap().len(), 1);
}

/// The filter of one status.
fn only(status: Status) -> StatusSet {
    let mut set = StatusSet::empty();
    set.insert(status);
    set
}

/// Several reports of one driver in one script call, mixing the common report (same status, only
/// the GEO member moves) with status changes: the last report wins in every key. The places are
/// ~19 km apart, so a GEO member left at an earlier one cannot be found from the right one.
async fn reports_of_one_driver_in_one_call(target: &RedisTarget) {
    let live = fresh(target, TTL).await;
    let at = |lon_e6, status, ts| pos("d3", 31_230_400, lon_e6, status, T0 + ts);
    let near = |lon_e6, statuses| NearbyQuery {
        lat_e6: 31_230_400,
        lon_e6,
        radius_m: 300.0,
        limit: 10,
        statuses,
    };
    let found = |lon_e6, statuses| {
        let live = &live;
        async move { live.nearby(&near(lon_e6, statuses)).await.unwrap().len() }
    };
    let counts = || async { live.counts().await.unwrap() };
    let (a, b, c, d, e, f) = (
        120_500_000,
        120_700_000,
        120_900_000,
        121_100_000,
        121_300_000,
        121_500_000,
    );
    live.upsert(&[at(a, Status::Online, 1)]).await.unwrap();
    // Moves, then goes offline.
    live.upsert(&[at(b, Status::Online, 2), at(b, Status::Offline, 3)])
        .await
        .unwrap();
    assert_eq!(found(b, StatusSet::WORKING).await, 0);
    assert_eq!(counts().await.offline, 1);
    // Back online, then moves again with the same status.
    live.upsert(&[at(c, Status::Online, 4), at(d, Status::Online, 5)])
        .await
        .unwrap();
    assert_eq!(found(c, StatusSet::WORKING).await, 0);
    assert_eq!(found(d, StatusSet::WORKING).await, 1);
    // Moves, turns busy, then online again somewhere else.
    live.upsert(&[
        at(e, Status::Online, 6),
        at(e, Status::Busy, 7),
        at(f, Status::Online, 8),
    ])
    .await
    .unwrap();
    assert_eq!(found(e, StatusSet::WORKING).await, 0);
    assert_eq!(found(f, StatusSet::WORKING).await, 1);
    assert_eq!(found(f, only(Status::Online)).await, 1);
    assert_eq!(found(f, only(Status::Busy)).await, 0);
    let n = counts().await;
    assert_eq!((n.online, n.busy, n.offline), (1, 0, 0));
    assert_eq!(
        live.get("d3").await.unwrap(),
        Some(at(f, Status::Online, 8))
    );
}

/// One tenant's counts: only ids with its prefix (a `*` in it matches only itself), over sets of
/// thousands of members in several areas, after status changes and moves across areas too.
async fn tenant_counts_see_only_the_tenant(target: &RedisTarget) {
    let live = fresh(target, TTL).await;
    let mut positions = Vec::new();
    for i in 0..3000 {
        let status = Status::from_index((i % 3) as u8);
        // Spread over a few cells so the cluster counts several areas.
        let lat = 31_100_000 + (i % 50) * 4_000;
        let lon = 121_400_000 + (i / 50) * 2_000;
        let tenant = if i % 5 == 0 { "zeta" } else { "acme" };
        positions.push(pos(&format!("{tenant}/d{i}"), lat, lon, status, T0));
    }
    positions.push(pos("ac*/x", 31_100_000, 121_400_000, Status::Online, T0));
    positions.push(pos("acme", 31_100_000, 121_400_000, Status::Online, T0));
    for chunk in positions.chunks(700) {
        live.upsert(chunk).await.unwrap();
    }
    let check = |latest: Vec<Position>| {
        let live = live.clone();
        async move {
            for tenant in ["acme/", "zeta/", "ac*/", "nobody/"] {
                let mut want = StatusCounts::default();
                for p in latest.iter().filter(|p| p.driver_id.starts_with(tenant)) {
                    want.add(p.status, 1);
                }
                let got = live.counts_in(tenant).await.unwrap();
                assert_eq!(
                    (got.online, got.busy, got.offline),
                    (want.online, want.busy, want.offline),
                    "{tenant}"
                );
            }
        }
    };
    check(positions.clone()).await;
    assert_eq!(live.counts_in("acme/").await.unwrap().total(), 2400);

    // Every third driver changes status, and every seventh moves across town (another area in a
    // cluster): the counts follow.
    for (i, p) in positions.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
        p.status = Status::from_index(((i / 3) % 3) as u8);
        p.timestamp += 1;
        if i % 7 == 0 {
            p.lat_e6 += 300_000;
        }
    }
    for chunk in positions.chunks(700) {
        live.upsert(chunk).await.unwrap();
    }
    check(positions).await;
}

fn statuses(rng: &mut StdRng) -> StatusSet {
    let mut set = StatusSet::empty();
    match rng.random_range(0..4) {
        0 => set.insert(Status::Online),
        1 => set.insert(Status::Busy),
        2 => {
            set.insert(Status::Busy);
            set.insert(Status::Offline);
        }
        _ => set = StatusSet::WORKING,
    }
    set
}

/// Loads the same random city into Redis and a `MemoryIndex`; returns the latter.
async fn load_city(live: &RedisLive, rng: &mut StdRng) -> MemoryIndex {
    let memory = MemoryIndex::new(TTL);
    let mut positions = Vec::new();
    for i in 0..3000 {
        let status = Status::from_index(rng.random_range(0..3));
        let lat = 31_230_000 + rng.random_range(-120_000..120_000);
        let lon = 121_470_000 + rng.random_range(-150_000..150_000);
        // Some drivers belong to tenants (`t1/`, `t2/`), for the per-tenant queries.
        let id = i % 2200;
        let tenant = ["t1/", "t2/", "", ""][id % 4];
        positions.push(pos(
            &format!("{tenant}c{id}"),
            lat,
            lon,
            status,
            T0 + rng.random_range(0..1_000_000),
        ));
    }
    // A few drivers on both sides of the antimeridian.
    for i in 0..40 {
        let lon = if i % 2 == 0 {
            179_990_000
        } else {
            -179_990_000
        } + rng.random_range(-9_000..9_000);
        positions.push(pos(
            &format!("am{i}"),
            rng.random_range(-20_000..20_000),
            lon,
            Status::Online,
            T0,
        ));
    }
    for chunk in positions.chunks(700) {
        let got = live.upsert(chunk).await.unwrap();
        let now = Instant::now();
        let want: Vec<Upsert> = chunk.iter().map(|p| memory.upsert(p, now)).collect();
        assert_eq!(got, want);
    }
    memory
}

async fn queries_match_the_embedded_index(target: &RedisTarget) {
    let live = fresh(target, TTL).await;
    let mut rng = StdRng::seed_from_u64(42);
    let memory = load_city(&live, &mut rng).await;
    for round in 0..40 {
        let q = NearbyQuery {
            lat_e6: 31_230_000 + rng.random_range(-130_000..130_000),
            lon_e6: 121_470_000 + rng.random_range(-160_000..160_000),
            radius_m: [100.0, 800.0, 2_500.0, 6_000.0, 20_000.0][round % 5],
            limit: [1, 5, 20, 100, 500][rng.random_range(0..5)],
            statuses: statuses(&mut rng),
        };
        let want = memory.nearby(&q, Instant::now());
        let got = live.nearby(&q).await.unwrap();
        assert_eq!(got, want, "nearby {q:?}");
        let want = memory.nearby_in(&q, Some("t1/"), Instant::now());
        let got = live.nearby_in(&q, Some("t1/")).await.unwrap();
        assert_eq!(got, want, "nearby of t1/ {q:?}");
    }
    // A huge radius (cluster: the registry path) and the antimeridian.
    for (lat, lon, radius) in [
        (31_000_000, 121_000_000, 3_000_000.0),
        (0, 180_000_000, 5_000.0),
    ] {
        let q = NearbyQuery {
            lat_e6: lat,
            lon_e6: lon,
            radius_m: radius,
            limit: 30,
            statuses: StatusSet::WORKING,
        };
        assert_eq!(
            live.nearby(&q).await.unwrap(),
            memory.nearby(&q, Instant::now())
        );
    }
    let by_id = |mut v: Vec<Position>| {
        v.sort_by(|a, b| a.driver_id.cmp(&b.driver_id));
        v
    };
    let mut boxes: Vec<BoxQuery> = (0..20)
        .map(|_| {
            let south = 31_230_000 + rng.random_range(-140_000..100_000);
            let west = 121_470_000 + rng.random_range(-170_000..120_000);
            BoxQuery {
                south_e6: south,
                west_e6: west,
                north_e6: south + rng.random_range(0..100_000),
                east_e6: west + rng.random_range(0..120_000),
                statuses: statuses(&mut rng),
            }
        })
        .collect();
    let world = |south_e6, west_e6, north_e6, east_e6| BoxQuery {
        south_e6,
        west_e6,
        north_e6,
        east_e6,
        statuses: StatusSet::WORKING,
    };
    boxes.push(world(-10_000, 179_995_000, 10_000, -179_995_000)); // across the antimeridian
    boxes.push(world(-80_000_000, -180_000_000, 80_000_000, 180_000_000)); // the world
    boxes.push(world(-1_000_000, 170_000_000, 1_000_000, -170_000_000));
    for q in boxes {
        let got = by_id(live.within_box(&q).await.unwrap());
        let want = by_id(memory.within_box(&q, Instant::now()));
        let t1 = |p: &Position| p.driver_id.starts_with("t1/");
        let want_t1: Vec<Position> = want.iter().filter(|p| t1(p)).cloned().collect();
        assert_eq!(got, want, "box {q:?}");
        let got_t1 = by_id(live.within_box_in(&q, Some("t1/")).await.unwrap());
        assert_eq!(got_t1, want_t1, "box of t1/ {q:?}");
    }
    assert_eq!(live.counts().await.unwrap(), memory.counts());
}

async fn expiry_removes_silent_drivers_once(target: &RedisTarget) {
    let ttl = Duration::from_millis(800);
    let live = fresh(target, ttl).await;
    // A tenant's drivers (`t/`), so the tenant's counts are checked too.
    let old = vec![
        pos("t/e1", 31_230_400, 121_473_700, Status::Online, T0),
        pos("t/e2", 31_330_400, 121_373_700, Status::Online, T0),
        pos("t/e3", 31_130_400, 121_573_700, Status::Busy, T0),
        pos("t/e4", 31_230_400, 121_473_700, Status::Offline, T0),
    ];
    live.upsert(&old).await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let fresh_one = pos("t/e5", 31_230_400, 121_473_700, Status::Online, T0);
    live.upsert(std::slice::from_ref(&fresh_one)).await.unwrap();
    assert_eq!(live.get("t/e1").await.unwrap(), None);
    assert_eq!(live.get("t/e5").await.unwrap(), Some(fresh_one));
    let mut removed = live.expire().await.unwrap();
    removed.sort_by(|a, b| a.driver_id.cmp(&b.driver_id));
    assert_eq!(removed, old);
    assert!(live.expire().await.unwrap().is_empty(), "reported once");
    for counts in [
        live.counts().await.unwrap(),
        live.counts_in("t/").await.unwrap(),
    ] {
        assert_eq!((counts.online, counts.busy, counts.offline), (1, 0, 0));
    }
    let q = NearbyQuery {
        lat_e6: 31_230_400,
        lon_e6: 121_473_700,
        radius_m: 50_000.0,
        limit: 10,
        statuses: StatusSet::WORKING,
    };
    let hits = live.nearby(&q).await.unwrap();
    assert_eq!(hits.len(), 1);
    // The GEO sets hold only the fresh driver now.
    let mut conn = live.conn();
    let mut members = 0;
    for area in live.shared.all_areas().await.unwrap() {
        let n: u64 = redis::cmd("ZCARD")
            .arg(live.layout().geo_key(&area))
            .query_async(&mut conn)
            .await
            .unwrap();
        members += n;
    }
    assert_eq!(members, 1);
    // An expired driver starts afresh with any timestamp.
    let back = pos("t/e1", 31_230_400, 121_473_700, Status::Online, T0 - 5);
    assert_eq!(live.upsert(&[back]).await.unwrap(), [Upsert::Applied]);
}

/// A status few drivers have is read from its seen sets (`few_by_status`), not the GEO set: same
/// answers as the embedded index, for everyone and for one tenant, after status changes too.
async fn rare_statuses_match_the_embedded_index(target: &RedisTarget) {
    let live = fresh(target, TTL).await;
    let memory = MemoryIndex::new(TTL);
    let mut rng = StdRng::seed_from_u64(9);
    let mut positions = Vec::new();
    for i in 0..2500 {
        // ~1 in 40 busy; some busy drivers later report online, and the other way round.
        let status = if rng.random_range(0..40) == 0 {
            Status::Busy
        } else {
            Status::Online
        };
        let id = i % 2000;
        let tenant = ["t1/", ""][id % 2];
        positions.push(pos(
            &format!("{tenant}r{id}"),
            31_230_000 + rng.random_range(-100_000..100_000),
            121_470_000 + rng.random_range(-120_000..120_000),
            status,
            T0 + i as i64,
        ));
    }
    for chunk in positions.chunks(500) {
        live.upsert(chunk).await.unwrap();
        let now = Instant::now();
        for p in chunk {
            memory.upsert(p, now);
        }
    }
    let busy = only(Status::Busy);
    for round in 0..20 {
        let q = NearbyQuery {
            lat_e6: 31_230_000 + rng.random_range(-100_000..100_000),
            lon_e6: 121_470_000 + rng.random_range(-120_000..120_000),
            radius_m: [300.0, 3_000.0, 30_000.0][round % 3],
            limit: [1, 5, 50][rng.random_range(0..3)],
            statuses: busy,
        };
        let want = memory.nearby(&q, Instant::now());
        assert_eq!(live.nearby(&q).await.unwrap(), want, "nearby {q:?}");
        let want = memory.nearby_in(&q, Some("t1/"), Instant::now());
        let got = live.nearby_in(&q, Some("t1/")).await.unwrap();
        assert_eq!(got, want, "nearby of t1/ {q:?}");
    }
    let everyone = NearbyQuery {
        lat_e6: 31_230_000,
        lon_e6: 121_470_000,
        radius_m: 50_000.0,
        limit: 1000,
        statuses: busy,
    };
    let found = live.nearby(&everyone).await.unwrap().len();
    assert!((20..700).contains(&found), "{found} busy drivers");
}

/// Meta hashes in older layouts (a Redis written by an older build) still guard against older
/// timestamps and are rewritten by the driver's next report, whether its status changes or not:
/// - before `fix`: the position in five fields, invisible to reads;
/// - before `refreshed`: the refresh time in `indexed` (one server only: a cluster never wrote it).
async fn legacy_meta_hashes_are_rewritten(target: &RedisTarget) {
    let live = fresh(target, TTL).await;
    let time: Value = redis::cmd("TIME")
        .query_async(&mut live.conn())
        .await
        .unwrap();
    let seen = meta::time_ms(&time).unwrap().to_string();
    let unpacked: &[&str] = &[
        "lat",
        "31230400",
        "lon",
        "121473700",
        "speed",
        "",
        "heading",
        "",
    ];
    let packed: &[&str] = &["fix", "31230400,121473700,,,"];
    for (n, (fields, status)) in [
        (unpacked, Status::Busy),
        (unpacked, Status::Online),
        (packed, Status::Online),
    ]
    .into_iter()
    .enumerate()
    {
        if fields == packed && live.layout() == Layout::Cluster {
            continue;
        }
        let id = format!("old{n}");
        let key = live.layout().meta_key(&id);
        let _: Value = redis::cmd("HSET")
            .arg(&key)
            .arg(&["ts", &(T0 + 10).to_string(), "seen", &seen])
            .arg(&["status", "online", "indexed", &seen])
            .arg(fields)
            .query_async(&mut live.conn())
            .await
            .unwrap();
        if fields == unpacked {
            assert_eq!(live.get(&id).await.unwrap(), None);
        }
        let older = pos(&id, 31_240_000, 121_480_000, status, T0 + 5);
        assert_eq!(live.upsert(&[older]).await.unwrap(), [Upsert::Stale]);
        let newer = pos(&id, 31_240_000, 121_480_000, status, T0 + 20);
        assert_eq!(
            live.upsert(std::slice::from_ref(&newer)).await.unwrap(),
            [Upsert::Applied]
        );
        assert_eq!(live.get(&id).await.unwrap(), Some(newer));
        let mut fields: Vec<String> = redis::cmd("HKEYS")
            .arg(&key)
            .query_async(&mut live.conn())
            .await
            .unwrap();
        fields.sort();
        let expected: &[&str] = match live.layout() {
            Layout::Standalone => &["fix", "refreshed", "seen", "status", "ts"],
            Layout::Cluster => &["area", "fix", "seen", "status", "ts"],
        };
        assert_eq!(fields, expected, "{id}");
    }
}

async fn contract(target: &RedisTarget) {
    round_trip_and_stale(target).await;
    concurrent_batches_keep_the_newest(target).await;
    legacy_meta_hashes_are_rewritten(target).await;
    offline_is_kept_but_not_searched(target).await;
    reports_of_one_driver_in_one_call(target).await;
    tenant_counts_see_only_the_tenant(target).await;
    queries_match_the_embedded_index(target).await;
    rare_statuses_match_the_embedded_index(target).await;
    expiry_removes_silent_drivers_once(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_standalone() {
    let server = RedisServer::start();
    contract(&standalone_target(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_cluster_and_city_spreads_over_every_node() {
    let cluster = RedisCluster::start(3);
    let target = cluster_target(&cluster);
    contract(&target).await;
    // One city's area keys land on all three masters.
    let live = fresh(&target, TTL).await;
    load_city(&live, &mut StdRng::seed_from_u64(1)).await;
    for node in &cluster.nodes {
        let keys = node.cli(&["--scan", "--pattern", "drivers:geo:*"]);
        assert!(
            keys.lines().count() >= 5,
            "node {} holds {keys:?}",
            node.port()
        );
    }
}

/// Collects what a subscriber receives.
fn collector() -> (
    Arc<Mutex<Vec<FeedEvent>>>,
    impl Fn(FeedEvent) + Send + Sync + 'static,
) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let got = got.clone();
        move |e| got.lock().push(e)
    };
    (got, sink)
}

/// Publishes `p` from `feed` until `got` holds it (the subscription may not be active yet).
async fn publish_until_received(feed: &AreaFeed, p: &Position, got: &Mutex<Vec<FeedEvent>>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let want = FeedEvent::Position(p.clone());
    while !got.lock().contains(&want) {
        assert!(Instant::now() < deadline, "{p:?} never arrived");
        feed.publish(std::slice::from_ref(p));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn feed_crosses_instances(target: &RedisTarget, b_target: &RedisTarget) {
    let metrics = Metrics::new();
    let a = RedisLive::connect(target, TTL, &metrics).await.unwrap();
    let b = RedisLive::connect(b_target, TTL, &metrics).await.unwrap();
    let feed_a = AreaFeed::new(a.conn(), 1, &metrics);
    let shutdown = CancellationToken::new();
    let (got_a, sink_a) = collector();
    let (got_b, sink_b) = collector();
    let sub_a = AreaFeed::spawn_subscriber(target, 1, &metrics, sink_a, shutdown.clone());
    let sub_b = AreaFeed::spawn_subscriber(b_target, 2, &metrics, sink_b, shutdown.clone());
    let p = pos("f1", 31_230_400, 121_473_700, Status::Online, T0);
    // Posted to A: B sees it in nearby, get, and its stream.
    a.upsert(std::slice::from_ref(&p)).await.unwrap();
    publish_until_received(&feed_a, &p, &got_b).await;
    assert_eq!(b.get("f1").await.unwrap(), Some(p.clone()));
    let q = NearbyQuery {
        lat_e6: 31_230_000,
        lon_e6: 121_473_000,
        radius_m: 500.0,
        limit: 5,
        statuses: StatusSet::WORKING,
    };
    assert_eq!(b.nearby(&q).await.unwrap()[0].driver_id, "f1");
    let gone = pos("f1", 31_230_400, 121_473_700, Status::Offline, T0 + 1);
    feed_a.publish_removed(&[(gone.clone(), RemovedReason::Offline)]);
    let removed = FeedEvent::Removed {
        position: gone,
        reason: RemovedReason::Offline,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !got_b.lock().contains(&removed) {
        assert!(Instant::now() < deadline, "removal never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(got_a.lock().is_empty(), "A received its own messages");
    shutdown.cancel();
    sub_a.await.unwrap();
    sub_b.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_standalone_survives_an_outage() {
    let mut server = RedisServer::start();
    let target = standalone_target(&server);
    feed_crosses_instances(&target, &target).await;

    let metrics = Metrics::new();
    let a = RedisLive::connect(&target, TTL, &metrics).await.unwrap();
    let feed_a = AreaFeed::new(a.conn(), 1, &metrics);
    let shutdown = CancellationToken::new();
    let (got_b, sink_b) = collector();
    let sub_b = AreaFeed::spawn_subscriber(&target, 2, &metrics, sink_b, shutdown.clone());
    let p = pos("f2", 31_230_400, 121_473_700, Status::Online, T0);
    publish_until_received(&feed_a, &p, &got_b).await;
    server.stop();
    server.resume();
    let p2 = pos("f2", 31_230_400, 121_473_700, Status::Busy, T0 + 1);
    publish_until_received(&feed_a, &p2, &got_b).await;
    shutdown.cancel();
    sub_b.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_cluster_broadcasts_across_nodes() {
    let cluster = RedisCluster::start(3);
    let target = cluster_target(&cluster);
    // B's subscriber sits on another node than A's.
    let mut b_target = target.clone();
    b_target.urls.reverse();
    feed_crosses_instances(&target, &b_target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_fast_and_recovers() {
    let mut server = RedisServer::start();
    let target = standalone_target(&server);
    let live = fresh(&target, TTL).await;
    let p = pos("o1", 31_230_400, 121_473_700, Status::Online, T0);
    live.upsert(std::slice::from_ref(&p)).await.unwrap();
    server.stop();
    let q = NearbyQuery {
        lat_e6: 31_230_400,
        lon_e6: 121_473_700,
        radius_m: 500.0,
        limit: 5,
        statuses: StatusSet::WORKING,
    };
    let prompt = Duration::from_secs(5);
    let up = tokio::time::timeout(prompt, live.upsert(std::slice::from_ref(&p))).await;
    assert!(matches!(up, Ok(Err(_))), "upsert: {up:?}");
    let get = tokio::time::timeout(prompt, live.get("o1")).await;
    assert!(matches!(get, Ok(Err(_))), "get: {get:?}");
    let near = tokio::time::timeout(prompt, live.nearby(&q)).await;
    assert!(matches!(near, Ok(Err(_))), "nearby: {near:?}");
    server.resume();
    // Redis restarted empty (no persistence): the same RedisLive works again.
    let deadline = Instant::now() + Duration::from_secs(15);
    while live.upsert(std::slice::from_ref(&p)).await.is_err() {
        assert!(Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(live.get("o1").await.unwrap(), Some(p));
    assert_eq!(live.nearby(&q).await.unwrap().len(), 1);
    assert!(live.ping().await);
}

/// Script calls and meta-hash reads Redis has run so far.
async fn redis_calls(live: &RedisLive) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut live.conn())
        .await
        .unwrap();
    let calls = |command: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse::<i64>().unwrap())
    };
    calls("evalsha") + calls("hmget")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_fixes_come_from_memory_then_from_redis() {
    let server = RedisServer::start();
    let target = standalone_target(&server);
    let a = fresh(&target, TTL).await;
    let b = RedisLive::connect(&target, TTL, &Metrics::new())
        .await
        .unwrap();
    let mine = pos("p1", 31_230_400, 121_473_700, Status::Online, T0 + 10);
    a.upsert(std::slice::from_ref(&mine)).await.unwrap();
    // A stale fix applied nowhere is not remembered.
    let stale = pos("p1", 31_240_000, 121_480_000, Status::Busy, T0 + 5);
    assert_eq!(a.upsert(&[stale]).await.unwrap(), [Upsert::Stale]);

    // What A applied is answered without asking Redis.
    let before = redis_calls(&a).await;
    let ids = [DriverId::new("p1")];
    assert_eq!(a.previous_of(&ids).await.unwrap(), [Some(mine.clone())]);
    assert_eq!(redis_calls(&a).await, before);

    // A fix only B applied is read from Redis (once), unknown drivers stay unknown.
    let theirs = pos("p2", 31_230_500, 121_473_800, Status::Busy, T0 + 20);
    b.upsert(std::slice::from_ref(&theirs)).await.unwrap();
    let ids = [DriverId::new("p2"), DriverId::new("nobody")];
    let before = redis_calls(&a).await;
    assert_eq!(
        a.previous_of(&ids).await.unwrap(),
        [Some(theirs.clone()), None]
    );
    assert!(redis_calls(&a).await > before);
    let before = redis_calls(&a).await;
    assert_eq!(a.previous_of(&ids[..1]).await.unwrap(), [Some(theirs)]);
    assert_eq!(redis_calls(&a).await, before);

    // A newer fix applied through B is not seen by A's filters: A keeps judging against its own
    // (older, real) fix, which only makes them more lenient (see `recent`).
    let newer = pos("p1", 31_230_600, 121_473_900, Status::Online, T0 + 30);
    b.upsert(std::slice::from_ref(&newer)).await.unwrap();
    assert_eq!(
        a.previous_of(&[DriverId::new("p1")]).await.unwrap(),
        [Some(mine)]
    );
    assert_eq!(a.get("p1").await.unwrap(), Some(newer));
}

#[tokio::test]
async fn geo_scores_match_geoadd() {
    let server = RedisServer::start();
    let live = fresh(&standalone_target(&server), TTL).await;
    let mut conn = live.conn();
    let mut rng = StdRng::seed_from_u64(3);
    // (Exactly ±85.05112878° is an edge, like longitude 180°, where GEOADD overflows 52 bits; ours clamps to the last
    // cell instead.)
    let mut points: Vec<(i32, i32)> = vec![
        (0, 0),
        (85_000_000, 179_999_999),
        (-85_000_000, -180_000_000),
    ];
    points.extend((0..500).map(|_| {
        (
            rng.random_range(-85_000_000..85_000_000),
            rng.random_range(-180_000_000..180_000_000),
        )
    }));
    for (i, (lat, lon)) in points.into_iter().enumerate() {
        let _: Value = redis::cmd("GEOADD")
            .arg("g")
            .arg(lon as f64 / 1e6)
            .arg(lat as f64 / 1e6)
            .arg(i)
            .query_async(&mut conn)
            .await
            .unwrap();
        let score: f64 = redis::cmd("ZSCORE")
            .arg("g")
            .arg(i)
            .query_async(&mut conn)
            .await
            .unwrap();
        let ours = scripts::geo_score(lat, lon) as f64;
        // Exact or (float rounding at a cell edge) the neighbouring cell.
        assert!(
            (score - ours).abs() <= 3.0,
            "{lat},{lon}: redis {score} ours {ours}"
        );
    }
}
