//! Nearby and box queries: `GEOSEARCH` per area finds candidates, the meta hashes confirm them.
//!
//! **Candidates.** On one server there is one GEO set; in a cluster, the geohash cells the query
//! touches (the circle's or box's bounding box, [`geohash::cover`]), each `GEOSEARCH`ed on its own
//! node concurrently, the results merged. A query touching more than [`MAX_CELLS`] cells (a huge
//! radius or box) asks the area registry instead and keeps the registered cells that intersect.
//!
//! **Confirmation.** Every candidate's meta hash is read (a pipeline of `HMGET`s per slot) and the
//! answer is computed from it, not from the GEO set: the meta hash has the exact coordinates (GEO
//! members are quantized to about half a metre), the status, the timestamp and the freshness, and it is
//! right even when a cluster race left a stale GEO member ([`super::upsert`]). The distance is the
//! same haversine, computed with the same operations, as the embedded index's, so both stores give
//! identical answers.
//!
//! **Nearest first with a limit.** Redis measures on a slightly larger sphere (6,372,797.56 m) and
//! from quantized points, so the search radius is widened by that ratio plus [`MARGIN_M`], and
//! `COUNT` is not trusted blindly: when an area returned a full `COUNT`, only hits nearer than its
//! farthest candidate (converted back, minus the margin) are certain. If fewer than `limit` are
//! certain, the search repeats with a larger `COUNT` (fourfold, or more when few of the members
//! returned were hits). Status filters and other tenants' drivers, which the GEO set cannot tell
//! apart, are handled the same way; other tenants' meta hashes are never read.
//!
//! **Growing circles.** `GEOSEARCH` gathers every member inside the radius before it sorts and
//! applies `COUNT`, so its cost is the number of drivers in the circle, whatever the limit: the
//! nearest 10 within 100 km of a city of 1,000,000 drivers blocked Redis for ~300 ms. A query
//! therefore reads a circle of [`FIRST_RADIUS_M`] first and grows it (2–4× the radius, by the
//! density seen) until it holds `limit` hits or reaches the asked radius: `limit` hits inside a
//! circle are nearer than anything outside it, so the answer is exact, and a dense city answers
//! from the first circle or two while a sparse area pays a few cheap rounds.
//!
//! **Edges of the map.** Redis does not search across the antimeridian, so the part of a circle
//! beyond it is read as a box and boxes are split there. Redis GEO only takes latitudes within
//! ±85.05112° (Web Mercator): drivers beyond are stored (and `get` answers them exactly) but their
//! GEO members are clamped to that latitude, so searches within a few hundred km of the poles can
//! miss them — a known limit of the reference design, irrelevant for road fleets.

use super::{geohash, scripts, RedisLiveError, Shared};
use crate::domain::{DriverId, Position, Status, StatusSet};
use crate::geo::{hav_to_meters, meters_to_hav, EARTH_RADIUS_M, RAD_PER_E6};
use crate::live::{BoxQuery, NearbyHit, NearbyQuery};
use futures_util::future::join_all;
use redis::Value;
use std::collections::HashSet;

/// Redis' Earth radius (`geohash_helper.c`).
const REDIS_EARTH_RADIUS_M: f64 = 6_372_797.560_856;
/// Slack for GEO quantization (under half a metre) and float differences.
const MARGIN_M: f64 = 2.0;
/// Most cells queried one by one; beyond, the area registry is filtered instead.
const MAX_CELLS: usize = 400;
/// Redis' latitude limit for GEO coordinates.
const GEO_MAX_LAT: f64 = 85.05112;
/// The first circle a nearby query reads (unless its radius is smaller); see the module docs.
const FIRST_RADIUS_M: f64 = 100.0;
/// Largest side (degrees, ~1 km) of the tiles a box is read in on a single server.
const TILE_DEG: f64 = 0.01;
/// Most tiles a box is cut into (larger boxes get larger tiles).
const MAX_TILES: usize = 1024;
/// Boxes larger than this (degrees) read whole areas instead of `GEOSEARCH BYBOX`.
const HUGE_BOX_DEG: f64 = 60.0;

/// A box in micro-degrees; `west > east` wraps around the antimeridian.
#[derive(Clone, Copy)]
struct LatLonBox {
    south: i32,
    west: i32,
    north: i32,
    east: i32,
}

impl LatLonBox {
    fn intersects_cell(&self, cell: &str) -> bool {
        let Some((s, w, n, e)) = geohash::bounds(cell) else {
            return false;
        };
        if n < self.south as f64 || s > self.north as f64 {
            return false;
        }
        let overlaps = |lo: f64, hi: f64| w <= hi && e >= lo;
        if self.west <= self.east {
            overlaps(self.west as f64, self.east as f64)
        } else {
            overlaps(self.west as f64, 180e6) || overlaps(-180e6, self.east as f64)
        }
    }
}

/// The bounding box of a circle (conservative), or the whole world's width when it contains a pole.
fn circle_box(lat_e6: i32, lon_e6: i32, radius_m: f64) -> LatLonBox {
    let d = radius_m / EARTH_RADIUS_M * 1.001 + 10.0 / EARTH_RADIUS_M;
    let lat = lat_e6 as f64 * RAD_PER_E6;
    let (south, north) = (lat - d, lat + d);
    let to_e6 = |rad: f64| (rad / RAD_PER_E6).clamp(-180e6, 180e6) as i32;
    let half_pi = std::f64::consts::FRAC_PI_2;
    let full = |s: f64, n: f64| LatLonBox {
        south: to_e6(s.max(-half_pi)),
        west: -180_000_000,
        north: to_e6(n.min(half_pi)),
        east: 180_000_000,
    };
    if north >= half_pi || south <= -half_pi {
        return full(south, north);
    }
    let ratio = d.sin() / lat.cos();
    if ratio >= 1.0 {
        return full(south, north);
    }
    let dlon = ratio.asin() / RAD_PER_E6;
    if dlon >= 180e6 {
        return full(south, north);
    }
    let mut west = lon_e6 as f64 - dlon;
    let mut east = lon_e6 as f64 + dlon;
    if west < -180e6 {
        west += 360e6;
    }
    if east > 180e6 {
        east -= 360e6;
    }
    LatLonBox {
        south: to_e6(south),
        west: west as i32,
        north: to_e6(north),
        east: east as i32,
    }
}

impl Shared {
    /// The areas whose keys may hold drivers inside `b`.
    async fn areas_for(&self, b: LatLonBox) -> Result<Vec<String>, RedisLiveError> {
        if self.layout == super::Layout::Standalone {
            return Ok(vec![String::new()]);
        }
        let precision = geohash::AREA_PRECISION;
        match geohash::cover(b.south, b.west, b.north, b.east, precision, MAX_CELLS) {
            Some(cells) => Ok(cells),
            None => Ok(self
                .all_areas()
                .await?
                .into_iter()
                .filter(|a| b.intersects_cell(a))
                .collect()),
        }
    }
}

/// Runs one command per area concurrently; returns the replies in order.
async fn per_area(
    shared: &Shared,
    areas: &[String],
    build: impl Fn(&str) -> redis::Cmd,
) -> Result<Vec<Value>, RedisLiveError> {
    let calls = areas.iter().map(|area| {
        let cmd = build(area);
        let mut conn = shared.conn();
        async move { cmd.query_async::<Value>(&mut conn).await }
    });
    let mut out = Vec::with_capacity(areas.len());
    for reply in join_all(calls).await {
        out.push(reply?);
    }
    Ok(out)
}

pub(super) async fn nearby(
    shared: &Shared,
    q: &NearbyQuery,
    prefix: Option<&str>,
) -> Result<Vec<NearbyHit>, RedisLiveError> {
    let searched = q.statuses.contains(Status::Online) || q.statuses.contains(Status::Busy);
    if !searched || q.radius_m.is_nan() || q.radius_m < 0.0 {
        return Ok(Vec::new());
    }
    if let Some(hits) = few_by_status(shared, q, prefix).await? {
        return Ok(hits);
    }
    let limit = q.limit.max(1);
    let mut radius_m = FIRST_RADIUS_M.min(q.radius_m);
    loop {
        let step = NearbyQuery { radius_m, ..*q };
        let hits = nearest_within(shared, &step, prefix).await?;
        // `limit` hits inside this circle are nearer than anything outside it: the answer.
        if hits.len() >= limit || radius_m >= q.radius_m {
            return Ok(hits);
        }
        radius_m = (radius_m * growth(limit, hits.len())).min(q.radius_m);
    }
}

/// How much the next circle's radius grows when `found` of `limit` hits were inside this one:
/// enough for about twice the missing hits at the density seen, between 2× and 4×.
fn growth(limit: usize, found: usize) -> f64 {
    ((2 * limit) as f64 / found.max(1) as f64)
        .sqrt()
        .clamp(2.0, 4.0)
}

/// The `limit` nearest hits within `q.radius_m`, exactly (fewer if fewer are there).
async fn nearest_within(
    shared: &Shared,
    q: &NearbyQuery,
    prefix: Option<&str>,
) -> Result<Vec<NearbyHit>, RedisLiveError> {
    let limit = q.limit.max(1);
    let bounds = circle_box(q.lat_e6, q.lon_e6, q.radius_m);
    let areas = shared.areas_for(bounds).await?;
    // Redis does not search across the antimeridian: the part of the circle beyond it is read
    // as a box (all of it, so it never limits what is certain).
    let beyond = (bounds.west > bounds.east).then(|| {
        let (s, n) = (bounds.south as f64 / 1e6, bounds.north as f64 / 1e6);
        if q.lon_e6 >= 0 {
            (s, -180.0, n, bounds.east as f64 / 1e6)
        } else {
            (s, bounds.west as f64 / 1e6, n, 180.0)
        }
    });
    let lat = (q.lat_e6 as f64 / 1e6).clamp(-GEO_MAX_LAT, GEO_MAX_LAT);
    let lon = q.lon_e6 as f64 / 1e6;
    let redis_radius = q.radius_m * (REDIS_EARTH_RADIUS_M / EARTH_RADIUS_M) + MARGIN_M;
    let exact = Exact::new(q);
    let mut count = Some(limit + 16);
    loop {
        let replies = per_area(shared, &areas, |area| {
            let mut cmd = redis::cmd("GEOSEARCH");
            cmd.arg(shared.layout.geo_key(area))
                .arg("FROMLONLAT")
                .arg(lon)
                .arg(lat)
                .arg("BYRADIUS")
                .arg(redis_radius)
                .arg("m")
                .arg("ASC");
            if let Some(count) = count {
                cmd.arg("COUNT").arg(count);
            }
            cmd.arg("WITHDIST");
            cmd
        })
        .await?;
        // Hits nearer than `certain` are complete; farther ones may miss candidates not returned.
        let mut certain = f64::INFINITY;
        let mut ids: Vec<DriverId> = Vec::new();
        // The area each candidate came from, for the status pre-filter.
        let mut area_of: Vec<usize> = Vec::new();
        let mut seen: HashSet<DriverId> = HashSet::new();
        let mut returned = 0;
        for (area, reply) in replies.into_iter().enumerate() {
            let items = scripts::array(reply)?;
            let full = count.is_some_and(|c| items.len() >= c);
            returned += items.len();
            let mut farthest = 0.0f64;
            for item in items {
                let pair = scripts::array(item)?;
                let (Some(member), Some(dist)) = (pair.first(), pair.get(1)) else {
                    return Err(RedisLiveError::Reply("GEOSEARCH WITHDIST item".into()));
                };
                farthest = farthest.max(scripts::float(dist)?);
                candidate(scripts::text(member)?, prefix, &mut seen, &mut ids);
                area_of.resize(ids.len(), area);
            }
            if full {
                let bound = farthest * (EARTH_RADIUS_M / REDIS_EARTH_RADIUS_M) - MARGIN_M;
                certain = certain.min(bound);
            }
        }
        if let Some((s, w, n, e)) = beyond {
            let replies = per_area(shared, &areas, |area| {
                box_search(&shared.layout.geo_key(area), s, w, n, e)
            })
            .await?;
            for (area, reply) in replies.into_iter().enumerate() {
                for member in scripts::array(reply)? {
                    candidate(scripts::text(&member)?, prefix, &mut seen, &mut ids);
                    area_of.resize(ids.len(), area);
                }
            }
        }
        let ids = with_status(shared, &areas, ids, &area_of, q.statuses).await?;
        let mut hits = measure(shared, &exact, &ids).await?;
        let sure = hits.iter().take_while(|h| h.distance_m < certain).count();
        if certain.is_infinite() || sure >= limit {
            hits.truncate(limit);
            return Ok(hits);
        }
        count = count.and_then(|c| next_count(c, limit, hits.len(), returned));
    }
}

/// Adds a GEO member to the candidates whose meta hashes are read, once, unless it is another
/// tenant's (`prefix`): other tenants' members may still bound what is certain, but their hashes
/// are never read.
fn candidate(
    id: &str,
    prefix: Option<&str>,
    seen: &mut HashSet<DriverId>,
    ids: &mut Vec<DriverId>,
) {
    if crate::domain::tenant::belongs(id, prefix) && !seen.contains(id) {
        seen.insert(DriverId::new(id));
        ids.push(DriverId::new(id));
    }
}

/// A status filter matched by at most this many drivers in the query's areas reads them all from
/// the seen sets instead of searching the GEO set (lower in tests, so that the contract tests'
/// city of ~1,000 drivers per status still takes the GEO path).
const FEW_BY_STATUS: i64 = if cfg!(test) { 700 } else { 4096 };

/// The one status a filter keeps of the two the GEO set holds (online, busy); `None` when it keeps
/// both. ([`nearby`] answers a filter that keeps neither without searching.)
fn narrow(statuses: StatusSet) -> Option<Status> {
    match (
        statuses.contains(Status::Online),
        statuses.contains(Status::Busy),
    ) {
        (true, false) => Some(Status::Online),
        (false, true) => Some(Status::Busy),
        _ => None,
    }
}

/// When few drivers have the statuses asked for, reads them all (their seen sets, then their
/// meta hashes) and measures each, instead of searching the GEO set: a filter that few drivers
/// match makes the GEO search read every driver in the circle, often several times over as the
/// circle and `COUNT` grow — `status=busy` within 10 km of 1,000,000 online drivers took 6 s of
/// Redis time even with [`with_status`]. `None` when there are too many for that.
async fn few_by_status(
    shared: &Shared,
    q: &NearbyQuery,
    prefix: Option<&str>,
) -> Result<Option<Vec<NearbyHit>>, RedisLiveError> {
    let Some(status) = narrow(q.statuses) else {
        return Ok(None);
    };
    let areas = shared
        .areas_for(circle_box(q.lat_e6, q.lon_e6, q.radius_m))
        .await?;
    let key = |area: &str| shared.layout.seen_key(area, status);
    let sizes = per_area(shared, &areas, |area| {
        let mut cmd = redis::cmd("ZCARD");
        cmd.arg(key(area));
        cmd
    })
    .await?;
    let mut total = 0;
    for size in &sizes {
        total += scripts::int(size)?;
    }
    if total > FEW_BY_STATUS {
        return Ok(None);
    }
    let members = per_area(shared, &areas, |area| {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(key(area)).arg(0).arg(-1);
        cmd
    })
    .await?;
    let (mut ids, mut seen) = (Vec::new(), HashSet::new());
    for list in members {
        for id in scripts::array(list)? {
            candidate(scripts::text(&id)?, prefix, &mut seen, &mut ids);
        }
    }
    let mut hits = measure(shared, &Exact::new(q), &ids).await?;
    hits.truncate(q.limit.max(1));
    Ok(Some(hits))
}

/// Reads the candidates' meta hashes and returns the hits among them, nearest first (ties by
/// driver id, as the embedded index).
async fn measure(
    shared: &Shared,
    exact: &Exact,
    ids: &[DriverId],
) -> Result<Vec<NearbyHit>, RedisLiveError> {
    let mut hits: Vec<NearbyHit> = shared
        .read(ids, false)
        .await?
        .into_iter()
        .flatten()
        .filter_map(|(_, p)| exact.hit(&p))
        .collect();
    hits.sort_by(|a, b| {
        a.distance_m
            .total_cmp(&b.distance_m)
            .then_with(|| a.driver_id.cmp(&b.driver_id))
    });
    Ok(hits)
}

/// Most ids per `ZMSCORE` of the status pre-filter.
const STATUS_CHECK_CHUNK: usize = 1024;

/// Drops the candidates that are not in the seen set of any status asked for, when the query asks
/// for fewer than both statuses the GEO set holds (online and busy). Without it, a filter few
/// drivers match read a meta hash per driver in the circle: `status=busy` within 10 km of a city
/// of 1,000,000 online drivers took 12 s of Redis time. A `ZMSCORE` costs Redis a hash lookup per
/// id, a fraction of an `HMGET`. The seen sets are kept with the status by the same scripts that
/// write the meta hashes, so no matching driver is dropped; the meta hash stays the truth for
/// the drivers kept.
async fn with_status(
    shared: &Shared,
    areas: &[String],
    ids: Vec<DriverId>,
    area_of: &[usize],
    statuses: StatusSet,
) -> Result<Vec<DriverId>, RedisLiveError> {
    let Some(status) = narrow(statuses) else {
        return Ok(ids);
    };
    let mut by_area: Vec<Vec<&DriverId>> = vec![Vec::new(); areas.len()];
    for (id, &area) in ids.iter().zip(area_of) {
        by_area[area].push(id);
    }
    let mut checks = Vec::new();
    for (area, members) in areas.iter().zip(&by_area) {
        let key = shared.layout.seen_key(area, status);
        for chunk in members.chunks(STATUS_CHECK_CHUNK) {
            let mut cmd = redis::cmd("ZMSCORE");
            cmd.arg(&key);
            for id in chunk {
                cmd.arg(id.as_str());
            }
            let mut conn = shared.conn();
            checks.push(async move { (chunk, cmd.query_async::<Vec<Value>>(&mut conn).await) });
        }
    }
    let mut kept = Vec::new();
    for (chunk, reply) in join_all(checks).await {
        for (id, score) in chunk.iter().zip(reply?) {
            if score != Value::Nil {
                kept.push((*id).clone());
            }
        }
    }
    Ok(kept)
}

/// The `COUNT` of the next round, `None` for no limit. Every round re-reads the whole circle inside
/// Redis (`GEOSEARCH` collects every member in the radius before it sorts and cuts), so rounds are
/// what cost: grow at least fourfold, and more when few of the members returned were hits (other
/// tenants' drivers, or statuses not asked for), so that one more round most likely suffices.
fn next_count(count: usize, limit: usize, hits: usize, returned: usize) -> Option<usize> {
    const MAX: usize = 1 << 20;
    if count >= MAX {
        return None;
    }
    let hit_share = hits.max(1) as f64 / returned.max(1) as f64;
    let wanted = (2 * limit) as f64 / hit_share;
    Some((count * 4).max(wanted as usize).min(MAX))
}

/// The embedded index's distance test, operation for operation (see `memory::Search`).
struct Exact {
    q: NearbyQuery,
    lon: f64,
    cos_lat: f64,
    radius_hav: f64,
}

impl Exact {
    fn new(q: &NearbyQuery) -> Exact {
        let lat = q.lat_e6 as f64 * RAD_PER_E6;
        Exact {
            q: *q,
            lon: q.lon_e6 as f64 * RAD_PER_E6,
            cos_lat: lat.cos(),
            radius_hav: meters_to_hav(q.radius_m),
        }
    }

    fn hit(&self, p: &Position) -> Option<NearbyHit> {
        if p.status == Status::Offline || !self.q.statuses.contains(p.status) {
            return None;
        }
        let s_lat = ((p.lat_e6 - self.q.lat_e6) as f64 * RAD_PER_E6 * 0.5).sin();
        let a = s_lat * s_lat;
        let lat = p.lat_e6 as f64 * RAD_PER_E6;
        let s_lon = ((p.lon_e6 as f64 * RAD_PER_E6 - self.lon) * 0.5).sin();
        let hav = (a + self.cos_lat * lat.cos() * s_lon * s_lon).min(1.0);
        (hav <= self.radius_hav).then(|| NearbyHit {
            driver_id: p.driver_id.clone(),
            lat_e6: p.lat_e6,
            lon_e6: p.lon_e6,
            distance_m: hav_to_meters(hav),
            status: p.status,
            timestamp: p.timestamp,
        })
    }
}

/// A `GEOSEARCH BYBOX` that covers a non-wrapping box: Redis checks the latitude distance against
/// half the height and the great-circle distance along the point's parallel against half the
/// width, so the width is taken at the box's widest parallel (the great circle is never longer
/// than the parallel's arc). Everything returned is filtered exactly afterwards.
fn box_search(key: &str, south: f64, west: f64, north: f64, east: f64) -> redis::Cmd {
    let rad = std::f64::consts::PI / 180.0;
    let center_lat = ((south + north) / 2.0).clamp(-GEO_MAX_LAT, GEO_MAX_LAT);
    let center_lon = (west + east) / 2.0;
    let widest = if south <= 0.0 && north >= 0.0 {
        0.0
    } else {
        south.abs().min(north.abs())
    };
    let half_height = REDIS_EARTH_RADIUS_M * (north - south) / 2.0 * rad
        + (center_lat - (south + north) / 2.0).abs() * rad * REDIS_EARTH_RADIUS_M;
    let half_width = REDIS_EARTH_RADIUS_M * (widest * rad).cos() * (east - west) / 2.0 * rad;
    let mut cmd = redis::cmd("GEOSEARCH");
    cmd.arg(key)
        .arg("FROMLONLAT")
        .arg(center_lon)
        .arg(center_lat)
        .arg("BYBOX")
        .arg(2.0 * (half_width + MARGIN_M))
        .arg(2.0 * (half_height + MARGIN_M))
        .arg("m");
    cmd
}

/// A box (degrees, `west <= east`) cut into equal tiles of at most [`TILE_DEG`] a side, or fewer,
/// larger ones when that would make more than [`MAX_TILES`].
fn tiles(south: f64, west: f64, north: f64, east: f64) -> Vec<(f64, f64, f64, f64)> {
    let (height, width) = (north - south, east - west);
    let side = TILE_DEG.max((height * width / MAX_TILES as f64).sqrt());
    let rows = ((height / side).ceil() as usize).max(1);
    let cols = ((width / side).ceil() as usize).max(1);
    // The i-th of n edges from `from` to `to`, the last one exactly `to`.
    let edge = |from: f64, to: f64, i: usize, n: usize| {
        if i == n {
            to
        } else {
            from + (to - from) * i as f64 / n as f64
        }
    };
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let (s, n) = (edge(south, north, r, rows), edge(south, north, r + 1, rows));
        for c in 0..cols {
            out.push((
                s,
                edge(west, east, c, cols),
                n,
                edge(west, east, c + 1, cols),
            ));
        }
    }
    out
}

pub(super) async fn within_box(
    shared: &Shared,
    q: &BoxQuery,
    prefix: Option<&str>,
) -> Result<Vec<Position>, RedisLiveError> {
    if q.statuses.is_empty() || q.south_e6 > q.north_e6 {
        return Ok(Vec::new());
    }
    let b = LatLonBox {
        south: q.south_e6,
        west: q.west_e6,
        north: q.north_e6,
        east: q.east_e6,
    };
    let areas = shared.areas_for(b).await?;
    let (s, n) = (q.south_e6 as f64 / 1e6, q.north_e6 as f64 / 1e6);
    let (w, e) = (q.west_e6 as f64 / 1e6, q.east_e6 as f64 / 1e6);
    let parts: Vec<(f64, f64)> = if w <= e {
        vec![(w, e)]
    } else {
        vec![(w, 180.0), (-180.0, e)]
    };
    let width: f64 = parts.iter().map(|(w, e)| e - w).sum();
    let huge = n - s > HUGE_BOX_DEG || width > HUGE_BOX_DEG;
    let mut replies = Vec::new();
    for &(w, e) in if huge { &parts[..1] } else { &parts[..] } {
        if huge {
            replies.extend(
                per_area(shared, &areas, |area| {
                    let mut cmd = redis::cmd("ZRANGE");
                    cmd.arg(shared.layout.geo_key(area)).arg(0).arg(-1);
                    cmd
                })
                .await?,
            );
            continue;
        }
        // One server holds the whole map in one GEO set: read a large box tile by tile, each tile
        // awaited before the next, so Redis serves other clients in between. (A cluster's GEO sets
        // hold one 5 km cell each, which bounds every search already.)
        let tiles = match shared.layout {
            super::Layout::Standalone => tiles(s, w, n, e),
            super::Layout::Cluster => vec![(s, w, n, e)],
        };
        for (ts, tw, tn, te) in tiles {
            replies.extend(
                per_area(shared, &areas, |area| {
                    box_search(&shared.layout.geo_key(area), ts, tw, tn, te)
                })
                .await?,
            );
        }
    }
    let mut ids: Vec<DriverId> = Vec::new();
    let mut seen: HashSet<DriverId> = HashSet::new();
    for reply in replies {
        for member in scripts::array(reply)? {
            candidate(scripts::text(&member)?, prefix, &mut seen, &mut ids);
        }
    }
    Ok(shared
        .read(&ids, false)
        .await?
        .into_iter()
        .flatten()
        .map(|(_, p)| p)
        .filter(|p| {
            p.status != Status::Offline
                && q.statuses.contains(p.status)
                && q.contains(p.lat_e6, p.lon_e6)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_box_exactly() {
        let t = tiles(31.0, 121.0, 31.025, 121.028);
        assert_eq!(t.len(), 3 * 3);
        assert_eq!((t[0].0, t[0].1), (31.0, 121.0));
        assert_eq!((t[8].2, t[8].3), (31.025, 121.028));
        // Neighbours share their edges: nothing falls between two tiles.
        assert_eq!(t[0].3, t[1].1);
        assert_eq!(t[0].2, t[3].0);
        assert_eq!(tiles(0.0, 0.0, 0.0, 0.0).len(), 1);
        // A large box: at most MAX_TILES.
        assert!(tiles(0.0, 0.0, 50.0, 50.0).len() <= MAX_TILES);
    }

    #[test]
    fn circles_grow_by_the_density_seen() {
        assert_eq!(growth(10, 0), 4.0);
        assert_eq!(growth(10, 9), 2.0);
        assert_eq!(growth(100, 10), 4.0);
        assert_eq!(growth(50, 10), 10f64.sqrt());
    }

    #[test]
    fn counts_grow_with_the_share_of_misses() {
        // Most returned members were hits: the usual fourfold growth.
        assert_eq!(next_count(36, 10, 30, 36), Some(144));
        // One in twenty was a hit (another tenant's city): enough for 2 × limit hits at that share.
        assert_eq!(next_count(36, 10, 2, 36), Some(360));
        assert_eq!(next_count(36, 10, 0, 36), Some(720));
        // Capped, then unlimited.
        assert_eq!(next_count(1 << 19, 10, 0, 1 << 19), Some(1 << 20));
        assert_eq!(next_count(1 << 20, 10, 0, 1 << 20), None);
    }

    #[test]
    fn circle_boxes_wrap_and_reach_the_poles() {
        let b = circle_box(0, 179_990_000, 5_000.0);
        assert!(b.west > b.east, "wraps");
        let b = circle_box(89_990_000, 0, 5_000.0);
        assert_eq!((b.west, b.east), (-180_000_000, 180_000_000));
        let b = circle_box(31_230_400, 121_473_700, 1_000.0);
        assert!(b.south < 31_221_400 && b.north > 31_239_400);
        assert!(b.west < 121_463_200 && b.east > 121_484_200);
    }
}
