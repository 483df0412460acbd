//! The Lua scripts, and how they are called.
//!
//! ## The compare-and-set
//!
//! "An older timestamp never replaces the latest" must hold when several instances write the same
//! driver at once, so the comparison happens inside Redis: a script reads the meta hash's `ts`
//! and writes the new state only when the new timestamp is not older (equal timestamps apply,
//! like the embedded index), all in one atomic step. A read-then-write from the instance would let
//! two instances both read `ts = 1` and the one carrying `ts = 2` be overwritten by `ts = 3`'s
//! predecessor. An existing hash whose `seen` is older than the TTL counts as absent (the driver
//! expired; any timestamp starts it afresh), as in the embedded index.
//!
//! One script call carries a whole batch of positions (up to [`super::batcher::CHUNK`]): Redis
//! spends about a microsecond per `redis.call`, while a round trip and a command dispatch cost
//! far more, so batching is what makes tens of thousands of upserts per second fit on one core.
//! Positions of one driver inside a batch are applied in order, so the CAS holds within a batch
//! too.
//!
//! ## Clock
//!
//! "Last seen" is the Redis server clock (`TIME`), read inside the scripts: every instance then
//! agrees on when a driver was last seen and on when it expires, whatever their own clocks say,
//! and the sweep compares scores written by the same clock it reads. (In a cluster each node uses
//! its own clock for the keys it holds; nodes are NTP-synced, and a skew of a few milliseconds only
//! shifts a driver's expiry by as much.) Since Redis 7 scripts replicate their effects, so reading
//! `TIME` before writing is allowed.
//!
//! ## Single server vs cluster
//!
//! On one server, [`UPSERT`] updates the meta hash and the area keys in one script: fully atomic.
//! In a cluster a script may only touch keys of one hash slot, and the meta hash (slot of the
//! driver's meta bucket, [`super::keys::meta_bucket`]) and the area keys (slot of the geohash cell)
//! are on different slots, so an upsert is two steps: [`CAS`] on the meta hashes (grouped by slot)
//! returns whether each position applied and the driver's previous area, then [`AREA`] (grouped by
//! area slot) adds the driver to its new area and removes it from the old one. See
//! [`super::upsert`] for what can go wrong in between.
//!
//! Within a script call, the area writes are collected and sent as one multi-member `ZADD`/`ZREM`
//! per key; GEO members are written with `ZADD` and a score computed by the instance
//! ([`geo_score`], Redis' own 52-bit geohash), which is what `GEOADD` does minus its parsing: the
//! per-position cost inside Redis is then the meta hash (HMGET, HSET, PEXPIRE) and a share of
//! the set writes. Most of that is Lua, not the commands: every argument and reply element is
//! turned into a Lua string and back. So the position travels and is stored as one `fix` field
//! ([`super::meta::fix`]) rather than five, a report that keeps its status writes only what
//! changed (`ts`, `seen`, `fix`), and its GEO member goes straight into the `ZADD`'s arguments:
//! together ~25% less Redis CPU per position (BENCHMARKS.md, issue 5 section 3).
//!
//! Every write to a seen set is mirrored to the roster of the same status for
//! tenants' drivers (ids with a `/`), so the two hold the same tenant members ([`super::keys`]).

use super::RedisLiveError;
use crate::backend::redis::RedisConn;
use redis::{Cmd, ErrorKind, Script, ServerErrorKind, Value};
use std::sync::LazyLock;

const PRELUDE: &str = r#"
-- Globals as locals: a global is a table lookup on every use, and the loops below run per position.
local call, tonumber, KEYS, ARGV = redis.call, tonumber, KEYS, ARGV
local t = call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- `now` as the string every write carries: Lua would otherwise format the number anew (a
-- printf) for each argument it is passed as.
local now_s = string.format('%d', now)
-- The state in a meta hash (ts, status, then the fields named after `ttl`), or nothing when the
-- position is stale against it.
local function newer(meta, ts, ttl, ...)
  local cur = call('HMGET', meta, 'ts', 'status', ...)
  -- Arithmetic converts a numeric string once (`tonumber` parses it twice). A report is almost
  -- always newer, so `seen` (is the older state still live?) is read only when it is not.
  if cur[1] and ts - cur[1] < 0 then
    local seen = call('HGET', meta, 'seen')
    if seen and now - seen < ttl then return nil end
  end
  return cur
end
-- The fields older layouts had and this one does not (the position before it was packed into
-- `fix`, and `indexed`, the single-server refresh time before it was renamed `refreshed`).
local function drop_old_fields(meta)
  call('HDEL', meta, 'lat', 'lon', 'speed', 'heading', 'accuracy', 'indexed')
end
-- Collects area writes so that each key gets one multi-member ZADD / ZREM per script call
-- (a redis.call costs about a microsecond whatever it carries). Later writes of a driver win.
-- `moved` holds the GEO adds of the common report (same status, seen set fresh, driver not yet
-- noted in this call) as ready ZADD arguments, appended by the caller: they go first, so any
-- later note of the same driver still wins, and they skip the bookkeeping below.
local function writes()
  return {order = {}, geo = {}, status = {}, prev = {}, touch = {}, moved = {}}
end
local function note(w, id, score, st, pst, keep_seen)
  if w.status[id] == nil then w.order[#w.order + 1] = id end
  if st == 'offline' then w.geo[id] = false else w.geo[id] = score end
  w.status[id] = st
  w.touch[id] = w.touch[id] or not keep_seen
  -- Only a status change leaves something to remove (most reports keep the status: no table).
  if pst and pst ~= '' and pst ~= st then
    w.prev[id] = w.prev[id] or {}
    w.prev[id][pst] = true
  end
end
-- Whether a driver is kept in the rosters: tenants' drivers (`tenant/driver`) only.
local function rostered(id)
  return string.find(id, '/', 1, true) ~= nil
end
local function flush(w, geo, seen, roster)
  local gadd, grem = w.moved, {}
  local sadd = {online = {}, busy = {}, offline = {}}
  local srem = {online = {}, busy = {}, offline = {}}
  local radd = {online = {}, busy = {}, offline = {}}
  local rrem = {online = {}, busy = {}, offline = {}}
  for _, id in ipairs(w.order) do
    local g = w.geo[id]
    if g then gadd[#gadd + 1] = g; gadd[#gadd + 1] = id else grem[#grem + 1] = id end
    local st = w.status[id]
    if w.touch[id] then
      local a = sadd[st]
      a[#a + 1] = now_s; a[#a + 1] = id
      if rostered(id) then local r = radd[st]; r[#r + 1] = '0'; r[#r + 1] = id end
    end
    if w.prev[id] then
      local tenant = rostered(id)
      for s, _ in pairs(w.prev[id]) do
        if s ~= st and srem[s] then
          local r = srem[s]; r[#r + 1] = id
          if tenant then r = rrem[s]; r[#r + 1] = id end
        end
      end
    end
  end
  if #gadd > 0 then call('ZADD', geo, unpack(gadd)) end
  if #grem > 0 then call('ZREM', geo, unpack(grem)) end
  for s, key in pairs(seen) do
    if #srem[s] > 0 then call('ZREM', key, unpack(srem[s])) end
    if #sadd[s] > 0 then call('ZADD', key, unpack(sadd[s])) end
    if #rrem[s] > 0 then call('ZREM', roster[s], unpack(rrem[s])) end
    if #radd[s] > 0 then call('ZADD', roster[s], unpack(radd[s])) end
  end
end
-- The seen sets and rosters of the area whose keys start at KEYS[k + 1] (geo, 3 seen, 3 rosters).
local function seen_of(k)
  return {online = KEYS[k + 2], busy = KEYS[k + 3], offline = KEYS[k + 4]}
end
local function roster_of(k)
  return {online = KEYS[k + 5], busy = KEYS[k + 6], offline = KEYS[k + 7]}
end
"#;

/// Standalone upsert: KEYS = geo, seen online/busy/offline, rosters online/busy/offline, then one
/// meta hash per position;
/// ARGV = ttl ms, meta expiry ms, seen refresh ms, then 5 per position (id ts status fix geo-score,
/// see [`super::meta::push_args`]). Returns the (1-based) numbers of the stale positions, usually
/// none (one reply element per position costs Redis a conversion each).
const UPSERT_BODY: &str = r#"
local ttl, keep, refresh = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local w = writes()
local moved, m = w.moved, 0
local stale = {}
for i = 8, #KEYS do
  local meta = KEYS[i]
  local a = 4 + (i - 8) * 5
  local id, ts, st = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local cur = newer(meta, ts, ttl, 'refreshed')
  if cur then
    -- The seen set is refreshed only every `refresh` ms while the status stays the same: its
    -- score lags the truth by less than that, which the sweep allows for.
    local keep_seen = cur[2] == st and cur[3] and now - cur[3] < refresh
    if keep_seen then
      -- Status and `refreshed` stay: only what changes with every report is written.
      call('HSET', meta, 'ts', ts, 'seen', now_s, 'fix', ARGV[a + 3])
    else
      call('HSET', meta, 'ts', ts, 'seen', now_s, 'status', st, 'refreshed', now_s,
        'fix', ARGV[a + 3])
      -- Same lag for the hash's expiry: it is pushed out whenever the seen set is refreshed, so
      -- it still outlives the TTL by the grace period minus the refresh interval.
      call('PEXPIRE', meta, keep)
      -- A hash without `refreshed` was written by an older build: its old fields go (once).
      if cur[1] and not cur[3] then drop_old_fields(meta) end
    end
    if keep_seen and st ~= 'offline' and w.status[id] == nil then
      moved[m + 1] = ARGV[a + 4]; moved[m + 2] = id; m = m + 2
    else
      note(w, id, ARGV[a + 4], st, cur[2], keep_seen)
    end
  else
    stale[#stale + 1] = i - 7
  end
end
flush(w, KEYS[1], seen_of(0), roster_of(0))
return stale
"#;

/// Cluster step 1, on one slot's meta hashes: KEYS = meta hashes; ARGV = ttl ms, meta expiry ms,
/// then 6 per position (the 5 of [`UPSERT`] and the area). Returns per position: applied (1/0),
/// previous area, previous status ('' when there was no previous state).
const CAS_BODY: &str = r#"
local ttl, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS do
  local meta = KEYS[i]
  local a = 3 + (i - 1) * 6
  local ts = ARGV[a + 1]
  local cur = newer(meta, ts, ttl, 'area', 'lat')
  if cur then
    -- Every cluster report rewrites the whole state, so an older layout shows by its fields.
    if cur[4] then drop_old_fields(meta) end
    call('HSET', meta, 'ts', ts, 'seen', now_s, 'status', ARGV[a + 2], 'fix', ARGV[a + 3],
      'area', ARGV[a + 5])
    call('PEXPIRE', meta, keep)
    out[#out + 1] = 1
    out[#out + 1] = cur[3] or ''
    out[#out + 1] = cur[2] or ''
  else
    out[#out + 1] = 0
    out[#out + 1] = ''
    out[#out + 1] = ''
  end
end
return out
"#;

/// Cluster step 2, on one slot's areas: KEYS = 7 per area (geo, seen sets, rosters); ARGV = 5
/// per operation: area number (1-based), id, geo score, status, previous status in this area
/// ('' none, '*' unknown); status 'del' removes the driver from the area's keys.
const AREA_BODY: &str = r#"
local names = {'online', 'busy', 'offline'}
local areas = {}
for a = 1, #ARGV, 5 do
  local g = tonumber(ARGV[a])
  local id, score, st, pst = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local k = (g - 1) * 7
  if st == 'del' then
    -- Open-mode ids are in no roster: they skip the three calls.
    local last = rostered(id) and 7 or 4
    for s = 1, last do call('ZREM', KEYS[k + s], id) end
  else
    areas[g] = areas[g] or writes()
    if pst == '*' then
      for _, s in ipairs(names) do note(areas[g], id, score, st, s) end
    end
    note(areas[g], id, score, st, pst)
  end
end
for g, w in pairs(areas) do
  local k = (g - 1) * 7
  flush(w, KEYS[k + 1], seen_of(k), roster_of(k))
end
return 1
"#;

/// The expiry sweep of one area: KEYS = geo, seen sets, rosters; ARGV = age ms (the TTL plus
/// the seen refresh interval), limit. Removes drivers whose seen score is that old or older from the seen set and the GEO set; returns
/// `{more, id, status, id, status, ...}` (more = 1 when a limit was hit). A driver that is still
/// fresh in another seen set of the area (its status changed after its meta hash was gone) stays
/// in the GEO set and is not reported.
const SWEEP_BODY: &str = r#"
local ttl, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local cutoff = now - ttl
local names = {'online', 'busy', 'offline'}
local out = {0}
for s = 1, 3 do
  local ids = call('ZRANGE', KEYS[1 + s], '-inf', cutoff, 'BYSCORE', 'LIMIT', 0, limit)
  if #ids >= limit then out[1] = 1 end
  for _, id in ipairs(ids) do
    call('ZREM', KEYS[1 + s], id)
    if rostered(id) then call('ZREM', KEYS[4 + s], id) end
    local live = false
    for o = 1, 3 do
      if o ~= s then
        local score = call('ZSCORE', KEYS[1 + o], id)
        if score and tonumber(score) > cutoff then live = true end
      end
    end
    if not live then
      call('ZREM', KEYS[1], id)
      out[#out + 1] = id
      out[#out + 1] = names[s]
    end
  end
end
return out
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

pub static UPSERT: LazyLock<Script> = LazyLock::new(|| script(UPSERT_BODY));
pub static CAS: LazyLock<Script> = LazyLock::new(|| script(CAS_BODY));
pub static AREA: LazyLock<Script> = LazyLock::new(|| script(AREA_BODY));
pub static SWEEP: LazyLock<Script> = LazyLock::new(|| script(SWEEP_BODY));

/// An `EVALSHA` of `script` with `keys`; the caller appends the arguments.
pub fn evalsha<S: AsRef<str>>(script: &Script, keys: &[S]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(key.as_ref());
    }
    cmd
}

/// Runs an `EVALSHA` built by [`evalsha`]; when Redis does not know the script (first use, or
/// after a restart emptied its script cache) loads it — on every master in a cluster — and retries.
pub async fn run(
    conn: &mut RedisConn,
    script: &Script,
    cmd: &Cmd,
) -> Result<Value, RedisLiveError> {
    match cmd.query_async::<Value>(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            Ok(cmd.query_async::<Value>(conn).await?)
        }
        other => Ok(other?),
    }
}

/// The elements of an array reply.
pub fn array(value: Value) -> Result<Vec<Value>, RedisLiveError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(RedisLiveError::Reply(format!(
            "expected an array, got {other:?}"
        ))),
    }
}

/// An integer reply (or a string holding one).
pub fn int(value: &Value) -> Result<i64, RedisLiveError> {
    match value {
        Value::Int(n) => Ok(*n),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| RedisLiveError::Reply("expected an integer".into())),
        other => Err(RedisLiveError::Reply(format!(
            "expected an integer, got {other:?}"
        ))),
    }
}

/// A string reply (empty for nil).
pub fn text(value: &Value) -> Result<&str, RedisLiveError> {
    match value {
        Value::BulkString(b) => {
            std::str::from_utf8(b).map_err(|_| RedisLiveError::Reply("reply is not UTF-8".into()))
        }
        Value::SimpleString(s) => Ok(s),
        Value::Nil => Ok(""),
        other => Err(RedisLiveError::Reply(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

/// A float reply (GEOSEARCH distances come as strings).
pub fn float(value: &Value) -> Result<f64, RedisLiveError> {
    match value {
        Value::Double(d) => Ok(*d),
        Value::Int(n) => Ok(*n as f64),
        other => text(other)?
            .parse()
            .map_err(|_| RedisLiveError::Reply("expected a number".into())),
    }
}

/// Redis' GEO latitude limit (Web Mercator).
const GEO_LAT_LIMIT: f64 = 85.051_128_78;

/// The score `GEOADD` would give a point: Redis' 52-bit geohash (`geohashEncodeWGS84`: 26 bits
/// each, latitude bits interleaved at even positions, longitude at odd ones). Latitudes beyond
/// ±85.05112878° are clamped, as Redis cannot store them.
pub fn geo_score(lat_e6: i32, lon_e6: i32) -> u64 {
    const STEP: u32 = 26;
    let lat = (lat_e6 as f64 / 1e6).clamp(-GEO_LAT_LIMIT, GEO_LAT_LIMIT);
    let lon = (lon_e6 as f64 / 1e6).clamp(-180.0, 180.0);
    let max = (1u64 << STEP) - 1;
    let lat_offset = (lat + GEO_LAT_LIMIT) / (2.0 * GEO_LAT_LIMIT) * (1u64 << STEP) as f64;
    let lon_offset = (lon + 180.0) / 360.0 * (1u64 << STEP) as f64;
    let y = (lat_offset as u64).min(max);
    let x = (lon_offset as u64).min(max);
    spread(y) | spread(x) << 1
}

/// Spreads the low 32 bits of `v` to the even bit positions.
fn spread(v: u64) -> u64 {
    let mut v = v & 0xFFFF_FFFF;
    v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
    v = (v | (v << 8)) & 0x00FF_00FF_00FF_00FF;
    v = (v | (v << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
    v = (v | (v << 2)) & 0x3333_3333_3333_3333;
    (v | (v << 1)) & 0x5555_5555_5555_5555
}
