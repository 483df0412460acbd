//! The expiry sweep: GEO members do not expire, so silent drivers are removed by a sweep.
//!
//! The meta hash expires by itself (a grace period after the TTL, see [`super::META_GRACE`]), and
//! readers treat it as gone once its `seen` is a TTL old, so `get` is exact without any sweep. The
//! GEO set and the seen sets need [`scripts::SWEEP`]: per area, atomically, it takes the entries of
//! the seen sets last seen a TTL ago or earlier, removes them from the seen set and the GEO set, and
//! returns them. Because removal and reporting are one atomic step, every instance can sweep
//! concurrently and each driver is reported by exactly one of them. Searches do not depend on the
//! sweep either (they confirm against the meta hash), so a late sweep only delays the memory
//! reclaim, the counts and the "expired" notices.
//!
//! On a single server the seen sets are refreshed at most every [`super::seen_refresh`] per driver
//! (a `ZADD` that moves a member to the tail of a 100k-member skiplist costs about 2.5 µs, a third
//! of an upsert), so a seen score can lag the last report by that much; the sweep therefore takes
//! entries older than TTL + refresh. GEO members and counts of a silent driver thus go away
//! between TTL and TTL + refresh (+ the sweep period) after its last report; `get` and searches are
//! exact regardless.
//!
//! The removed drivers' last positions come from their meta hashes. A hash that is fresh again
//! means the driver reported in the meantime (or, in a cluster, the entry was a stale duplicate): it
//! is not announced. A hash already gone (no sweep ran for TTL + grace) is not announced either.

use super::{scripts, RedisLiveError, Shared};
use crate::domain::{DriverId, Position};
use futures_util::stream::{self, StreamExt};

/// Entries removed per status per script call (keeps one call around a millisecond).
const SWEEP_LIMIT: usize = 500;
/// Areas swept concurrently.
const PARALLEL_AREAS: usize = 16;

async fn sweep_area(shared: &Shared, area: String) -> Result<Vec<DriverId>, RedisLiveError> {
    let keys = shared.layout.area_keys(&area);
    let mut removed = Vec::new();
    loop {
        let mut cmd = scripts::evalsha(&scripts::SWEEP, &keys);
        cmd.arg(shared.ttl_ms + shared.refresh_ms).arg(SWEEP_LIMIT);
        let reply = scripts::array(scripts::run(&mut shared.conn(), &scripts::SWEEP, &cmd).await?)?;
        let more = reply.first().map(scripts::int).transpose()? == Some(1);
        for pair in reply.get(1..).unwrap_or_default().chunks(2) {
            removed.push(DriverId::new(scripts::text(&pair[0])?));
        }
        if !more {
            return Ok(removed);
        }
    }
}

pub(super) async fn sweep(shared: &Shared) -> Result<Vec<Position>, RedisLiveError> {
    let areas = shared.all_areas().await?;
    let results: Vec<Result<Vec<DriverId>, RedisLiveError>> = stream::iter(areas)
        .map(|area| sweep_area(shared, area))
        .buffer_unordered(PARALLEL_AREAS)
        .collect()
        .await;
    let mut ids = Vec::new();
    for r in results {
        ids.extend(r?);
    }
    Ok(shared
        .read(&ids, true)
        .await?
        .into_iter()
        .flatten()
        .filter(|(fresh, _)| !fresh)
        .map(|(_, p)| p)
        .collect())
}
