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
//! driver id) and the area keys (slot of the geohash cell) are on different slots, so an upsert is
//! two steps: [`CAS`] on the meta hashes (grouped by slot) returns whether each position applied and
//! the driver's previous area, then [`AREA`] (grouped by area slot) adds the driver to its new area
//! and removes it from the old one. See [`super::cluster_race`] for what can go wrong in between.
//!
//! Geo coordinates are clamped to ±85.05112° (Redis' GEO limit, Web Mercator); the meta hash keeps
//! the real ones.

use super::RedisLiveError;
use crate::backend::redis::RedisConn;
use redis::{Cmd, ErrorKind, Script, ServerErrorKind, Value};
use std::sync::LazyLock;

const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function geoadd(key, lat, lon, id)
  local y = tonumber(lat) / 1e6
  if y > 85.05112 then y = 85.05112 elseif y < -85.05112 then y = -85.05112 end
  redis.call('GEOADD', key, tonumber(lon) / 1e6, y, id)
end
-- The state in a meta hash, or nothing when the position is stale against it.
local function newer(meta, ts, ttl)
  local cur = redis.call('HMGET', meta, 'ts', 'seen', 'status', 'area')
  if cur[1] and cur[2] and now - tonumber(cur[2]) < ttl and tonumber(ts) < tonumber(cur[1]) then
    return nil
  end
  return cur
end
"#;

/// Standalone upsert: KEYS = geo, seen online/busy/offline, then one meta hash per position;
/// ARGV = ttl ms, meta expiry ms, then 8 per position (id ts lat lon status speed heading
/// accuracy). Returns 1 (applied) or 0 (stale) per position.
const UPSERT_BODY: &str = r#"
local ttl, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local geo = KEYS[1]
local seen = {online = KEYS[2], busy = KEYS[3], offline = KEYS[4]}
local out = {}
for i = 5, #KEYS do
  local meta = KEYS[i]
  local a = 3 + (i - 5) * 8
  local id, ts, lat, lon, st = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local cur = newer(meta, ts, ttl)
  if cur then
    redis.call('HSET', meta, 'ts', ts, 'lat', lat, 'lon', lon, 'status', st, 'speed', ARGV[a + 5],
      'heading', ARGV[a + 6], 'accuracy', ARGV[a + 7], 'seen', now)
    redis.call('PEXPIRE', meta, keep)
    if st == 'offline' then redis.call('ZREM', geo, id) else geoadd(geo, lat, lon, id) end
    if cur[3] and cur[3] ~= st and seen[cur[3]] then redis.call('ZREM', seen[cur[3]], id) end
    redis.call('ZADD', seen[st], now, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"#;

/// Cluster step 1, on one slot's meta hashes: KEYS = meta hashes; ARGV = ttl ms, meta expiry ms,
/// then 9 per position (the 8 of [`UPSERT`] and the area). Returns per position: applied (1/0),
/// previous area, previous status ('' when there was no previous state).
const CAS_BODY: &str = r#"
local ttl, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS do
  local meta = KEYS[i]
  local a = 3 + (i - 1) * 9
  local ts = ARGV[a + 1]
  local cur = newer(meta, ts, ttl)
  if cur then
    redis.call('HSET', meta, 'ts', ts, 'lat', ARGV[a + 2], 'lon', ARGV[a + 3], 'status', ARGV[a + 4],
      'speed', ARGV[a + 5], 'heading', ARGV[a + 6], 'accuracy', ARGV[a + 7], 'seen', now,
      'area', ARGV[a + 8])
    redis.call('PEXPIRE', meta, keep)
    out[#out + 1] = 1
    out[#out + 1] = cur[4] or ''
    out[#out + 1] = cur[3] or ''
  else
    out[#out + 1] = 0
    out[#out + 1] = ''
    out[#out + 1] = ''
  end
end
return out
"#;

/// Cluster step 2, on one slot's areas: KEYS = 4 per area (geo, seen online/busy/offline); ARGV = 7
/// per operation: area number (1-based), 'add' or 'del', id, lat, lon, status, previous status in
/// this area ('' none, '*' unknown). 'del' removes the driver from the area's four keys.
const AREA_BODY: &str = r#"
local names = {'online', 'busy', 'offline'}
for a = 1, #ARGV, 7 do
  local g = (tonumber(ARGV[a]) - 1) * 4
  local geo = KEYS[g + 1]
  local seen = {online = KEYS[g + 2], busy = KEYS[g + 3], offline = KEYS[g + 4]}
  local op, id, lat, lon, st, pst = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  if op == 'add' then
    if st == 'offline' then redis.call('ZREM', geo, id) else geoadd(geo, lat, lon, id) end
    if pst == '*' then
      for _, s in ipairs(names) do if s ~= st then redis.call('ZREM', seen[s], id) end end
    elseif pst ~= '' and pst ~= st and seen[pst] then
      redis.call('ZREM', seen[pst], id)
    end
    redis.call('ZADD', seen[st], now, id)
  else
    redis.call('ZREM', geo, id)
    for _, s in ipairs(names) do redis.call('ZREM', seen[s], id) end
  end
end
return 1
"#;

/// The expiry sweep of one area: KEYS = geo, seen online/busy/offline; ARGV = ttl ms, limit.
/// Removes drivers last seen a TTL ago or earlier from the seen set and the GEO set; returns
/// `{more, id, status, id, status, ...}` (more = 1 when a limit was hit). A driver that is still
/// fresh in another seen set of the area (its status changed after its meta hash was gone) stays
/// in the GEO set and is not reported.
const SWEEP_BODY: &str = r#"
local ttl, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local cutoff = now - ttl
local names = {'online', 'busy', 'offline'}
local out = {0}
for s = 1, 3 do
  local ids = redis.call('ZRANGE', KEYS[1 + s], '-inf', cutoff, 'BYSCORE', 'LIMIT', 0, limit)
  if #ids >= limit then out[1] = 1 end
  for _, id in ipairs(ids) do
    redis.call('ZREM', KEYS[1 + s], id)
    local live = false
    for o = 1, 3 do
      if o ~= s then
        local score = redis.call('ZSCORE', KEYS[1 + o], id)
        if score and tonumber(score) > cutoff then live = true end
      end
    end
    if not live then
      redis.call('ZREM', KEYS[1], id)
      out[#out + 1] = id
      out[#out + 1] = names[s]
    end
  end
end
return out
"#;

/// Reads meta hashes: KEYS = meta hashes; ARGV = ttl ms, '1' to include expired ones. Returns per
/// key 0 (absent, or expired unless asked for) or `{fresh, ts, lat, lon, status, speed, heading,
/// accuracy}`.
const READ_BODY: &str = r#"
local ttl, raw = tonumber(ARGV[1]), ARGV[2] == '1'
local out = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'seen', 'ts', 'lat', 'lon', 'status', 'speed', 'heading', 'accuracy')
  if v[1] and v[2] and v[3] and v[4] and v[5] then
    local fresh = now - tonumber(v[1]) < ttl
    if fresh or raw then
      v[1] = fresh and 1 or 0
      out[i] = v
    else
      out[i] = 0
    end
  else
    out[i] = 0
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
pub static READ: LazyLock<Script> = LazyLock::new(|| script(READ_BODY));

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
