//! Key layout, and why.
//!
//! ```text
//! standalone                          cluster (hash tag in braces)
//! drivers:geo                         drivers:geo:{wtw3s}              GEO set: online + busy drivers
//! drivers:seen:online|busy|offline    drivers:seen:online:{wtw3s} ...  zset: driver → last report (ms)
//! drivers:roster:online|busy|offline  drivers:roster:online:{wtw3s} .. zset: tenants' drivers, by id
//! driver:<id>:meta                    driver:{m<b>}:<id>:meta          hash: the driver's latest state
//! -                                   drivers:areas                    set: area cells ever used
//! ```
//!
//! - **GEO set** (`drivers:geo`, the reference design's key): what `GEOSEARCH` answers nearby and
//!   box queries from. Offline drivers are not in it. Members do not expire by themselves, so the
//!   expiry sweep removes silent ones.
//! - **Seen sets**, one per status, scored by the Redis server time of the driver's last applied
//!   report: the expiry sweep takes their oldest entries (`ZRANGE .. BYSCORE`), and `counts` is
//!   three `ZCARD`s per area. One set per status instead of a status field keeps both O(log n).
//! - **Rosters**, one per status: the same members as the seen sets, but only tenants' drivers
//!   (ids `tenant/driver`, see [`crate::domain::tenant`]), all scored 0 so they are ordered by id.
//!   One tenant's counts are then a `ZLEXCOUNT` of the range `[tenant/ .. (tenant0` per status
//!   and area, O(log n). Without them, counting one tenant meant reading every member of the seen
//!   sets: at 1,000,000 drivers ~0.5 s per `/v1/stats` call, with Redis blocked for milliseconds
//!   by each read; with them ~0.15 ms (`examples/tenant_queries.rs`, BENCHMARKS.md). They cost
//!   ~130 B of Redis memory per tenant driver (+27% at 1M drivers), and nothing in open mode (no
//!   `/` in any id). The scripts write a roster wherever they write the seen set of the same
//!   status, so the two hold the same tenant members. A Redis written by a build without rosters
//!   undercounts tenants until each driver's seen entry is next refreshed (within
//!   [`super::seen_refresh`]) or swept.
//! - **Meta hash** `driver:<id>:meta`: `ts` (position timestamp, µs), `seen` (server time of the
//!   report, ms), `status`, on one server `refreshed` (when the seen set was last refreshed, see
//!   the `expiry` module), `fix` (`lat,lon,speed,heading,accuracy`: micro-degrees, exact — GEO
//!   coordinates are quantized to about 0.5 m — then the measurements, empty when unknown; one
//!   field rather than five because every field costs the upsert script a listpack search per
//!   position) and, in a cluster, `area`. Hashes written by older builds have `lat`/`lon`/
//!   `speed`/`heading`/`accuracy` instead of `fix` (readers treat them as absent until the
//!   driver's next report) or `indexed` instead of `refreshed`; the next report deletes those
//!   fields and writes the current ones (the compare-and-set still sees the old `ts`). It is
//!   the truth: `get` reads it, and nearby/box answers are confirmed against it. It expires
//!   ([`super::META_GRACE`]) a while after the driver TTL so the expiry sweep can still read the
//!   last position to announce it; readers treat it as gone once `seen` is older than the TTL.
//! - **Cluster sharding**: the area keys of one geohash-5 cell ([`super::geohash`]) share the hash
//!   tag `{cell}`, so one cell's drivers live on one node and can be updated by one script, while a
//!   city's hundreds of cells spread over all the slots and therefore all the masters. The meta
//!   hash is tagged with one of [`META_BUCKETS`] buckets picked by a fixed hash of the driver id
//!   (`{m0}` .. `{m255}`), so drivers spread evenly over the masters regardless of where they are,
//!   and a flush of thousands of positions is one compare-and-set script call per bucket. Tagged
//!   with the id itself (as before), every driver had a slot of its own, and a 1,000-position batch
//!   became ~1,000 script calls of one position each: the instance's cluster client spent ~14 µs
//!   per position routing them (BENCHMARKS.md).
//!   `drivers:areas` lists the cells that ever held a driver (for counts, the sweep and very large
//!   queries); it only grows, by at most the number of inhabited 5 km cells.

use super::geohash;
use crate::domain::Status;
use redis::cluster_routing::Slot;

/// How many hash tags the meta hashes of a cluster are spread over: enough to spread them over
/// dozens of masters, few enough that a large flush has many positions per script call.
pub const META_BUCKETS: u32 = 256;

/// The bucket of a driver's meta hash: FNV-1a of the id, so every instance and version agrees.
pub fn meta_bucket(driver_id: &str) -> u32 {
    let hash = driver_id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    hash % META_BUCKETS
}

/// The `ZRANGEBYLEX`-style range of the ids that start with `prefix`: from `[prefix` (inclusive) to
/// `(` and the prefix with its last byte incremented (exclusive). UTF-8 never holds the byte 0xFF,
/// so the increment cannot overflow; an empty prefix is the whole set.
pub fn lex_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let mut to = prefix.as_bytes().to_vec();
    match to.pop() {
        None => (b"-".to_vec(), b"+".to_vec()),
        Some(last) => {
            to.push(last + 1);
            to.insert(0, b'(');
            ([b"[", prefix.as_bytes()].concat(), to)
        }
    }
}

/// Where the keys live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One server: one GEO set for the world.
    Standalone,
    /// A cluster: area keys sharded by geohash cell.
    Cluster,
}

/// Key of the area registry (cluster only).
pub const AREAS_KEY: &str = "drivers:areas";

impl Layout {
    /// The area cell a position is stored under: empty (the one global area) on a single server.
    pub fn area_of(self, lat_e6: i32, lon_e6: i32) -> String {
        match self {
            Layout::Standalone => String::new(),
            Layout::Cluster => geohash::encode(lat_e6, lon_e6, geohash::AREA_PRECISION),
        }
    }

    pub fn geo_key(self, area: &str) -> String {
        match self {
            Layout::Standalone => "drivers:geo".to_string(),
            Layout::Cluster => format!("drivers:geo:{{{area}}}"),
        }
    }

    /// The seen sets of an area, indexed by `Status as usize`.
    pub fn seen_keys(self, area: &str) -> [String; 3] {
        Status::ALL.map(|s| self.seen_key(area, s))
    }

    /// The seen set of one status in an area.
    pub fn seen_key(self, area: &str, status: Status) -> String {
        match self {
            Layout::Standalone => format!("drivers:seen:{}", status.as_str()),
            Layout::Cluster => format!("drivers:seen:{}:{{{area}}}", status.as_str()),
        }
    }

    /// The rosters of an area (tenants' drivers by status, by id), indexed by `Status as usize`.
    pub fn roster_keys(self, area: &str) -> [String; 3] {
        Status::ALL.map(|s| match self {
            Layout::Standalone => format!("drivers:roster:{}", s.as_str()),
            Layout::Cluster => format!("drivers:roster:{}:{{{area}}}", s.as_str()),
        })
    }

    /// The keys of an area, in the order the scripts take them: GEO set, seen sets, rosters.
    pub fn area_keys(self, area: &str) -> [String; 7] {
        let [online, busy, offline] = self.seen_keys(area);
        let [r_online, r_busy, r_offline] = self.roster_keys(area);
        [
            self.geo_key(area),
            online,
            busy,
            offline,
            r_online,
            r_busy,
            r_offline,
        ]
    }

    pub fn meta_key(self, driver_id: &str) -> String {
        match self {
            Layout::Standalone => format!("driver:{driver_id}:meta"),
            Layout::Cluster => format!("driver:{{m{}}}:{driver_id}:meta", meta_bucket(driver_id)),
        }
    }

    /// The hash slot of a key: what commands must be grouped by in a cluster (a script may only
    /// touch keys of one slot). On a single server everything is one group.
    pub fn slot(self, key: &str) -> Option<Slot> {
        match self {
            Layout::Standalone => None,
            Layout::Cluster => Some(Slot::for_key(key)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_reference_design() {
        let s = Layout::Standalone;
        assert_eq!(s.geo_key(""), "drivers:geo");
        assert_eq!(s.meta_key("drv-1"), "driver:drv-1:meta");
        assert_eq!(s.seen_keys("")[1], "drivers:seen:busy");
        let c = Layout::Cluster;
        assert_eq!(c.area_of(31_230_400, 121_473_700), "wtw3s");
        assert_eq!(c.geo_key("wtw3s"), "drivers:geo:{wtw3s}");
        assert_eq!(
            c.meta_key("drv-1"),
            format!("driver:{{m{}}}:drv-1:meta", meta_bucket("drv-1"))
        );
        // A brace in an id cannot move its hash tag: the bucket's comes first.
        assert!(c.meta_key("a{x}b").starts_with("driver:{m"));
        assert_eq!(c.seen_keys("wtw3s")[2], "drivers:seen:offline:{wtw3s}");
        assert_eq!(s.roster_keys("")[0], "drivers:roster:online");
        assert_eq!(
            c.slot("drivers:geo:{wtw3s}"),
            c.slot(&c.roster_keys("wtw3s")[2])
        );
        assert_eq!(
            c.slot("drivers:geo:{wtw3s}"),
            c.slot("drivers:seen:busy:{wtw3s}")
        );
    }

    #[test]
    fn lex_range_covers_exactly_the_prefix() {
        assert_eq!(lex_range("acme/"), (b"[acme/".to_vec(), b"(acme0".to_vec()));
        assert_eq!(lex_range(""), (b"-".to_vec(), b"+".to_vec()));
    }

    #[test]
    fn meta_buckets_are_fixed_and_even() {
        // Fixed values: changing the hash would orphan every meta hash of a running cluster.
        assert_eq!(meta_bucket("drv-1"), 101);
        assert_eq!(meta_bucket(""), 0x811c_9dc5 % META_BUCKETS);
        let mut counts = vec![0u32; META_BUCKETS as usize];
        for i in 0..100_000 {
            counts[meta_bucket(&format!("drv-{i}")) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 250 && *max < 550, "uneven buckets: {min}..{max}");
    }
}
