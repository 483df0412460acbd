//! Rate limits: a token bucket per device key and driver, and one per reader key.
//!
//! # Why hand-rolled GCRA
//!
//! The bucket is kept as GCRA (the generic cell rate algorithm): per key one number, the
//! *theoretical arrival time* (TAT) — the instant at which the bucket would be full again. A request
//! of `cost` tokens moves the TAT `cost × interval` into the future (starting from now if the TAT is
//! already past) and is allowed while the TAT stays within `burst × interval` of now. This is exactly
//! a token bucket of `burst` tokens refilled at `rate` per second, in 8 bytes of state and no timer.
//!
//! It also makes bounded memory simple: **an entry whose TAT is in the past is a full bucket, and a
//! full bucket is the same as no entry**, so such entries can be dropped at any time without
//! changing any decision. [`RateLimiter::sweep`] (run periodically) drops them; a key idle for
//! `burst / rate` seconds (4 s at the device defaults) is always droppable.
//!
//! `governor` has keyed limiters too, but its keyed state only shrinks through `retain_recent`
//! and has no hard cap, and its per-key cost API (`check_key_n`) returns nested errors that are
//! awkward for a per-driver batch; 150 lines here give a hard bound and the exact `Retry-After`.
//!
//! Memory is bounded by a hard cap on entries (`max_entries`, split over shards, 16 by default so
//! concurrent requests rarely contend on one mutex). When a shard is full and a new key arrives, the
//! shard first drops its full entries; if that is not enough, it drops the eighth of its entries
//! that are closest to full (smallest TAT). Under a flood of distinct keys this errs on the side of
//! letting requests through (an evicted key starts with a full bucket) rather than denying keys
//! that did nothing wrong, and the work is amortised: one O(n) eviction per n/8 insertions.

use hashbrown::HashMap;
use parking_lot::Mutex;
use std::hash::{BuildHasher, Hash, RandomState};
use std::time::{Duration, Instant};

/// Rate and burst of one kind of bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitConfig {
    /// Tokens added per second (e.g. 5 position updates per second per driver).
    pub rate_per_sec: f64,
    /// Bucket size: requests allowed at once after an idle period.
    pub burst: u32,
    /// Most keys tracked at once (entries are a key plus 8 bytes).
    pub max_entries: usize,
}

impl LimitConfig {
    /// Device buckets: 5 updates/s per driver, burst 20.
    pub const DEVICE_DEFAULT: LimitConfig = LimitConfig {
        rate_per_sec: 5.0,
        burst: 20,
        max_entries: 1_000_000,
    };
    /// Reader buckets: 50 requests/s per key, burst 100.
    pub const READER_DEFAULT: LimitConfig = LimitConfig {
        rate_per_sec: 50.0,
        burst: 100,
        max_entries: 100_000,
    };
}

/// A request the limiter refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Over the rate: the same request is allowed after this long (429 with `Retry-After`).
    RetryAfter(Duration),
    /// The request costs more than a full bucket (e.g. a batch with more updates of one driver than
    /// the burst): it can never be allowed as is; answer 429 and let the client split it.
    ExceedsBurst { burst: u32 },
}

impl Limited {
    /// The `Retry-After` header value: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Limited::RetryAfter(d) => {
                let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                secs.max(1)
            }
            Limited::ExceedsBurst { .. } => 1,
        }
    }
}

const SHARDS: usize = 16;

/// Token buckets keyed by `K`: `(key id, driver id)` for devices, the key id for readers.
pub struct RateLimiter<K> {
    shards: Box<[Mutex<HashMap<K, u64>>]>,
    shard_hasher: RandomState,
    interval_ns: u64,
    tolerance_ns: u64,
    burst: u32,
    shard_cap: usize,
    epoch: Instant,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter; `rate_per_sec` is clamped to 1e-6..=1e9, `burst` to at least 1, `max_entries`
    /// to at least one entry per shard.
    pub fn new(config: LimitConfig) -> RateLimiter<K> {
        Self::with_epoch(config, Instant::now())
    }

    /// As [`RateLimiter::new`], with the instant time is measured from (tests pass their own).
    pub fn with_epoch(config: LimitConfig, epoch: Instant) -> RateLimiter<K> {
        let rate = if config.rate_per_sec.is_finite() {
            config.rate_per_sec.clamp(1e-6, 1e9)
        } else {
            1e9
        };
        let interval_ns = ((1e9 / rate).round() as u64).max(1);
        let burst = config.burst.max(1);
        RateLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shard_hasher: RandomState::new(),
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst)),
            burst,
            shard_cap: config.max_entries.div_ceil(SHARDS).max(1),
            epoch,
        }
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Nanoseconds since the epoch, offset by the tolerance so `tat - tolerance` never underflows.
    fn ns(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(since)
            .unwrap_or(u64::MAX / 2)
            .saturating_add(self.tolerance_ns)
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, u64>> {
        let i = (self.shard_hasher.hash_one(key) % SHARDS as u64) as usize;
        &self.shards[i]
    }

    /// Takes `cost` tokens from `key`'s bucket at `now`, or says how long until it could.
    /// A cost of 0 is always allowed and changes nothing.
    pub fn check(&self, key: &K, cost: u32, now: Instant) -> Result<(), Limited> {
        if cost == 0 {
            return Ok(());
        }
        if cost > self.burst {
            return Err(Limited::ExceedsBurst { burst: self.burst });
        }
        let now_ns = self.ns(now);
        let increment = self.interval_ns.saturating_mul(u64::from(cost));
        let mut shard = self.shard(key).lock();
        let tat = shard.get(key).copied().unwrap_or(now_ns).max(now_ns);
        let new_tat = tat.saturating_add(increment);
        let allow_at = new_tat.saturating_sub(self.tolerance_ns);
        if allow_at > now_ns {
            return Err(Limited::RetryAfter(Duration::from_nanos(allow_at - now_ns)));
        }
        if let Some(slot) = shard.get_mut(key) {
            *slot = new_tat;
        } else {
            if shard.len() >= self.shard_cap {
                evict(&mut shard, now_ns, self.shard_cap);
            }
            shard.insert(key.clone(), new_tat);
        }
        Ok(())
    }

    /// Drops every full bucket (nothing it remembers would change a decision). Run periodically,
    /// e.g. every 10 s; returns how many entries remain.
    pub fn sweep(&self, now: Instant) -> usize {
        let now_ns = self.ns(now);
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.lock();
                shard.retain(|_, tat| *tat > now_ns);
                if shard.capacity() > 4 * shard.len().max(64) {
                    shard.shrink_to_fit();
                }
                shard.len()
            })
            .sum()
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Upper bound on [`RateLimiter::len`].
    pub fn capacity(&self) -> usize {
        self.shard_cap * SHARDS
    }
}

/// Makes room in a full shard: drops full buckets, then if still full the eighth closest to full.
fn evict<K: Hash + Eq>(shard: &mut HashMap<K, u64>, now_ns: u64, cap: usize) {
    shard.retain(|_, tat| *tat > now_ns);
    if shard.len() < cap {
        return;
    }
    let mut tats: Vec<u64> = shard.values().copied().collect();
    let k = (tats.len() / 8).max(1) - 1;
    let (_, threshold, _) = tats.select_nth_unstable(k);
    let threshold = *threshold;
    shard.retain(|_, tat| *tat > threshold);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32, max_entries: usize) -> (RateLimiter<String>, Instant) {
        let epoch = Instant::now();
        let config = LimitConfig {
            rate_per_sec: rate,
            burst,
            max_entries,
        };
        (RateLimiter::with_epoch(config, epoch), epoch)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let (l, t0) = limiter(5.0, 20, 1000);
        let k = "dev:d1".to_string();
        for i in 0..20 {
            assert_eq!(l.check(&k, 1, t0), Ok(()), "request {i} within burst");
        }
        assert_eq!(l.check(&k, 1, t0), Err(Limited::RetryAfter(ms(200))));
        assert_eq!(
            l.check(&k, 1, t0 + ms(199)),
            Err(Limited::RetryAfter(ms(1)))
        );
        assert_eq!(l.check(&k, 1, t0 + ms(200)), Ok(()));
        assert!(l.check(&k, 1, t0 + ms(200)).is_err());
        // Idle for the full refill time: a whole burst again.
        let later = t0 + ms(200) + ms(4000);
        for _ in 0..20 {
            assert_eq!(l.check(&k, 1, later), Ok(()));
        }
        assert!(l.check(&k, 1, later).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let (l, t0) = limiter(1.0, 1, 1000);
        assert!(l.check(&"a".to_string(), 1, t0).is_ok());
        assert!(l.check(&"a".to_string(), 1, t0).is_err());
        assert!(l.check(&"b".to_string(), 1, t0).is_ok());
    }

    #[test]
    fn cost_takes_several_tokens_and_retry_after_is_exact() {
        let (l, t0) = limiter(5.0, 20, 1000);
        let k = "k".to_string();
        assert_eq!(l.check(&k, 15, t0), Ok(()));
        // 5 left; 10 needs 5 more = 1 s.
        assert_eq!(l.check(&k, 10, t0), Err(Limited::RetryAfter(ms(1000))));
        assert_eq!(l.check(&k, 5, t0), Ok(()));
        assert_eq!(
            l.check(&k, 21, t0),
            Err(Limited::ExceedsBurst { burst: 20 })
        );
        assert_eq!(
            l.check(&k, 0, t0),
            Ok(()),
            "zero cost is free even when empty"
        );
        // A denied request takes nothing.
        assert_eq!(l.check(&k, 1, t0 + ms(200)), Ok(()));
    }

    #[test]
    fn retry_after_header_rounds_up_to_whole_seconds() {
        assert_eq!(Limited::RetryAfter(ms(1)).retry_after_secs(), 1);
        assert_eq!(Limited::RetryAfter(ms(1000)).retry_after_secs(), 1);
        assert_eq!(Limited::RetryAfter(ms(1001)).retry_after_secs(), 2);
        assert_eq!(Limited::RetryAfter(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(Limited::ExceedsBurst { burst: 1 }.retry_after_secs(), 1);
    }

    #[test]
    fn reader_rate_fractions() {
        let (l, t0) = limiter(50.0, 100, 1000);
        let k = "reader".to_string();
        for _ in 0..100 {
            assert!(l.check(&k, 1, t0).is_ok());
        }
        assert_eq!(l.check(&k, 1, t0), Err(Limited::RetryAfter(ms(20))));
    }

    #[test]
    fn sweep_drops_only_full_buckets() {
        let (l, t0) = limiter(5.0, 20, 1000);
        l.check(&"busy".to_string(), 20, t0).unwrap();
        l.check(&"idle".to_string(), 1, t0).unwrap();
        assert_eq!(l.sweep(t0 + ms(100)), 2);
        // "idle" is full again after 200 ms, "busy" after 4 s.
        assert_eq!(l.sweep(t0 + ms(200)), 1);
        assert_eq!(l.check(&"busy".to_string(), 1, t0 + ms(200)), Ok(()));
        assert!(l.check(&"busy".to_string(), 1, t0 + ms(200)).is_err());
        assert_eq!(l.sweep(t0 + ms(4400)), 0);
        assert!(l.is_empty());
    }

    #[test]
    fn memory_stays_bounded_when_a_million_keys_come_and_go() {
        let cap = 10_000;
        let (l, t0) = limiter(5.0, 20, cap);
        assert!(l.capacity() >= cap && l.capacity() < cap + SHARDS);
        for i in 0..1_000_000u64 {
            // 1 µs apart: every key stays "not full" for 200 ms, so sweeping alone could not keep up
            // and the hard cap has to do the work.
            let now = t0 + Duration::from_micros(i);
            assert!(l.check(&format!("key-{i}"), 1, now).is_ok());
            if i % 100_000 == 0 {
                assert!(l.len() <= l.capacity(), "len {} at {i}", l.len());
            }
        }
        assert!(l.len() <= l.capacity());
        // The most recent keys are still limited (they were not the ones evicted).
        let last = t0 + Duration::from_micros(999_999);
        let k = "key-999999".to_string();
        assert!(l.check(&k, 19, last).is_ok());
        assert!(l.check(&k, 1, last).is_err());
        // And once time passes, a sweep frees everything.
        assert_eq!(l.sweep(last + Duration::from_secs(5)), 0);
    }

    #[test]
    fn periodic_sweep_keeps_churning_keys_small() {
        let (l, t0) = limiter(5.0, 20, 1_000_000);
        let mut peak = 0;
        for second in 0..100u64 {
            let now = t0 + Duration::from_secs(second);
            for i in 0..1000u64 {
                l.check(&format!("{second}-{i}"), 1, now).unwrap();
            }
            peak = peak.max(l.sweep(now + ms(500)));
        }
        assert_eq!(peak, 0, "a single update refills within 200 ms");
    }

    #[test]
    fn odd_configs_do_not_panic() {
        for (rate, burst) in [
            (0.0, 0),
            (f64::NAN, 5),
            (f64::INFINITY, 1),
            (-3.0, 2),
            (1e12, 1),
        ] {
            let (l, t0) = limiter(rate, burst, 0);
            let k = "k".to_string();
            let _ = l.check(&k, 1, t0);
            let _ = l.check(&k, u32::MAX, t0 + Duration::from_secs(1 << 40));
            let _ = l.check(&k, 1, t0.checked_sub(Duration::from_secs(1)).unwrap_or(t0));
            l.sweep(t0);
        }
    }
}
