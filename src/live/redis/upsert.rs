//! One flush of the batcher: the positions become script calls.
//!
//! **Single server**: [`scripts::UPSERT`] per [`CHUNK`] positions; compare-and-set, meta hash,
//! GEO set and seen sets change in one atomic step, so concurrent instances can never leave a
//! driver's area keys disagreeing with its meta hash.
//!
//! **Cluster**: two steps, because the meta hash and the area keys are on different slots.
//! 1. [`scripts::CAS`] per meta slot: compare-and-set on the meta hashes; returns for each applied
//!    position the driver's previous area and status.
//! 2. [`scripts::AREA`] per area slot: add the driver to its new area (GEO set or, offline, out of
//!    it; seen set of its status) and delete it from its previous area when it changed cells.
//!    Several positions of one driver in the flush are coalesced first, so the areas it passed
//!    through are cleaned and only the last one keeps it.
//!
//! ## The race the cluster leaves, and what it costs
//!
//! Step 2 is not ordered with step 1 across instances. If instance A applies `ts = 2` in cell X
//! and instance B then applies `ts = 3` in cell Y (previous area X), but A's step 2 reaches Redis
//! after B's, A re-adds the driver to X after B deleted it from X:
//! - a **stale member** in X. Searches confirm every candidate against the meta hash (the truth)
//!   and use its coordinates, so the stale member never produces a wrong hit; it may double-count
//!   in `counts` until the sweep removes it a TTL later (its seen score is never refreshed; the
//!   sweep does not announce it because the meta hash is fresh).
//! - if the two positions went X→Y and Y→X in the same microseconds, A's late delete can remove
//!   the driver from the cell it is really in: it is **invisible to searches until its next
//!   report** (typically seconds; `get` still answers from the meta hash).
//!
//! Both need the same driver reported through two instances within one flush round trip (under a
//! millisecond) while crossing a cell border (cells are about 5 km), so they are rare; the damage
//! is bounded by the report interval. A fully atomic alternative (per-area version checks) would
//! cost an extra hash write per upsert and was not worth it at this rate.

use super::batcher::CHUNK;
use super::{meta, scripts, RedisLiveError, Shared, Upsert};
use crate::domain::Position;
use futures_util::future::join_all;
use std::collections::HashMap;

/// What step 1 said about one position.
struct Cas {
    applied: bool,
    prev_area: String,
    prev_status: String,
}

impl Shared {
    /// Upserts a batch; one result per position, in order.
    pub(super) async fn flush(&self, batch: &[Position]) -> Result<Vec<Upsert>, RedisLiveError> {
        match self.layout {
            super::Layout::Standalone => self.flush_standalone(batch).await,
            super::Layout::Cluster => self.flush_cluster(batch).await,
        }
    }

    async fn flush_standalone(&self, batch: &[Position]) -> Result<Vec<Upsert>, RedisLiveError> {
        let area_keys = self.layout.area_keys("");
        let calls = batch.chunks(CHUNK).map(|chunk| {
            let mut keys: Vec<String> = Vec::with_capacity(4 + chunk.len());
            keys.extend(area_keys.iter().cloned());
            keys.extend(chunk.iter().map(|p| self.layout.meta_key(&p.driver_id)));
            let mut cmd = scripts::evalsha(&scripts::UPSERT, &keys);
            cmd.arg(self.ttl_ms).arg(self.keep_ms).arg(self.refresh_ms);
            for p in chunk {
                meta::push_args(&mut cmd, p);
            }
            let mut conn = self.conn();
            async move {
                let reply = scripts::run(&mut conn, &scripts::UPSERT, &cmd).await;
                (chunk.len(), reply)
            }
        });
        let mut out = Vec::with_capacity(batch.len());
        for (len, reply) in join_all(calls).await {
            let start = out.len();
            out.resize(start + len, Upsert::Applied);
            for v in scripts::array(reply?)? {
                // The script numbers the stale positions of its chunk from 1.
                let stale = usize::try_from(scripts::int(&v)?)
                    .ok()
                    .and_then(|n| n.checked_sub(1))
                    .filter(|&n| n < len)
                    .ok_or_else(|| RedisLiveError::Reply("stale position out of range".into()))?;
                out[start + stale] = Upsert::Stale;
            }
        }
        Ok(out)
    }

    async fn flush_cluster(&self, batch: &[Position]) -> Result<Vec<Upsert>, RedisLiveError> {
        let areas: Vec<String> = batch
            .iter()
            .map(|p| self.layout.area_of(p.lat_e6, p.lon_e6))
            .collect();
        let mut distinct: Vec<&str> = areas.iter().map(String::as_str).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let registered = self.register_areas(&distinct);

        // Step 1: compare-and-set per meta slot.
        let mut calls = Vec::new();
        for group in self.by_slot(0..batch.len(), |&i| {
            self.layout.meta_key(&batch[i].driver_id)
        }) {
            for chunk in group.chunks(CHUNK) {
                let keys: Vec<String> = chunk
                    .iter()
                    .map(|&i| self.layout.meta_key(&batch[i].driver_id))
                    .collect();
                let mut cmd = scripts::evalsha(&scripts::CAS, &keys);
                cmd.arg(self.ttl_ms).arg(self.keep_ms);
                for &i in chunk {
                    meta::push_args(&mut cmd, &batch[i]);
                    cmd.arg(&areas[i]);
                }
                let mut conn = self.conn();
                let chunk = chunk.to_vec();
                calls.push(async move {
                    let reply = scripts::run(&mut conn, &scripts::CAS, &cmd).await;
                    (chunk, reply)
                });
            }
        }
        let (cas_results, registered) = tokio::join!(join_all(calls), registered);
        registered?;
        let mut cas: Vec<Option<Cas>> = (0..batch.len()).map(|_| None).collect();
        for (chunk, reply) in cas_results {
            let reply = scripts::array(reply?)?;
            if reply.len() != 3 * chunk.len() {
                return Err(RedisLiveError::Reply(
                    "CAS reply of the wrong length".into(),
                ));
            }
            for (&i, r) in chunk.iter().zip(reply.chunks(3)) {
                cas[i] = Some(Cas {
                    applied: scripts::int(&r[0])? == 1,
                    prev_area: scripts::text(&r[1])?.to_string(),
                    prev_status: scripts::text(&r[2])?.to_string(),
                });
            }
        }
        let cas: Vec<Cas> = cas
            .into_iter()
            .map(|c| c.ok_or_else(|| RedisLiveError::Reply("missing CAS result".into())))
            .collect::<Result<_, _>>()?;

        // Step 2: area operations per area slot.
        let ops = area_ops(batch, &areas, &cas);
        let mut calls = Vec::new();
        for group in self.by_slot(ops, |op| self.layout.geo_key(op.area)) {
            let mut index: HashMap<&str, usize> = HashMap::new();
            let mut keys: Vec<String> = Vec::new();
            for op in &group {
                if !index.contains_key(op.area) {
                    index.insert(op.area, index.len() + 1);
                    keys.extend(self.layout.area_keys(op.area));
                }
            }
            let mut cmd = scripts::evalsha(&scripts::AREA, &keys);
            for op in &group {
                let p = &batch[op.position];
                cmd.arg(index[op.area])
                    .arg(p.driver_id.as_str())
                    .arg(scripts::geo_score(p.lat_e6, p.lon_e6))
                    .arg(if op.add { p.status.as_str() } else { "del" })
                    .arg(op.prev_status);
            }
            let mut conn = self.conn();
            calls.push(async move { scripts::run(&mut conn, &scripts::AREA, &cmd).await });
        }
        for reply in join_all(calls).await {
            reply?;
        }
        Ok(cas.iter().map(|c| applied(c.applied)).collect())
    }
}

fn applied(yes: bool) -> Upsert {
    if yes {
        Upsert::Applied
    } else {
        Upsert::Stale
    }
}

/// One step-2 operation: add the driver of `position` to `area`, or delete it from `area`.
struct AreaOp<'a> {
    area: &'a str,
    add: bool,
    position: usize,
    /// For adds: the driver's status in this area before ('' none, '*' unknown).
    prev_status: &'a str,
}

/// The step-2 operations of a flush: per driver, one add for its last applied position and one
/// delete for every other area it was in before or during the flush.
fn area_ops<'a>(batch: &[Position], areas: &'a [String], cas: &'a [Cas]) -> Vec<AreaOp<'a>> {
    struct Track<'a> {
        last: usize,
        first: usize,
        passed: Vec<&'a str>,
    }
    let mut order: Vec<&str> = Vec::new();
    let mut tracks: HashMap<&str, Track<'a>> = HashMap::new();
    for (i, p) in batch.iter().enumerate() {
        if !cas[i].applied {
            continue;
        }
        match tracks.get_mut(p.driver_id.as_str()) {
            Some(t) => {
                t.passed.push(&areas[t.last]);
                t.last = i;
            }
            None => {
                order.push(p.driver_id.as_str());
                tracks.insert(
                    p.driver_id.as_str(),
                    Track {
                        last: i,
                        first: i,
                        passed: Vec::new(),
                    },
                );
            }
        }
    }
    let mut ops = Vec::new();
    for id in order {
        let t = &tracks[id];
        let here: &str = &areas[t.last];
        let prev = &cas[t.first];
        let prev_status = if !t.passed.is_empty() {
            "*"
        } else if prev.prev_area == here {
            prev.prev_status.as_str()
        } else {
            ""
        };
        ops.push(AreaOp {
            area: here,
            add: true,
            position: t.last,
            prev_status,
        });
        let mut gone: Vec<&str> = t.passed.clone();
        gone.push(&prev.prev_area);
        gone.sort_unstable();
        gone.dedup();
        for area in gone {
            if !area.is_empty() && area != here {
                ops.push(AreaOp {
                    area,
                    add: false,
                    position: t.last,
                    prev_status: "",
                });
            }
        }
    }
    ops
}
