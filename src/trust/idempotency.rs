//! `Idempotency-Key` for POST endpoints: a client that retries after a timeout must not apply a
//! write twice, and must get the answer the first attempt got.
//!
//! # Semantics
//!
//! * Entries are keyed by a **scope** and the header value. The scope should be the API key id
//!   (two devices of one tenant may both use "1", "2", ... as keys); `"open"` without auth.
//! * A **fingerprint** (SHA-256 over method, path and body, length-prefixed so fields cannot run
//!   into each other) tells a retry (same fingerprint: the first response is replayed) from a
//!   reuse of the key for another request (different fingerprint: [`Begin::Mismatch`], 422
//!   `idempotency_key_reused`).
//! * **Concurrent retry**: while the first request is still running, a second one with the same key
//!   gets [`Begin::InFlight`] at once; answer 409 `idempotency_in_flight` with `Retry-After: 1`.
//!   Waiting for the first would tie up a connection for an unbounded time and needs a wake-up
//!   channel per entry; an immediate 409 is what Stripe and the IETF draft do, and clients already
//!   retry.
//! * **What is stored**: 2xx answers and the deterministic validation failures 400 and 422 (the
//!   same body will fail the same way). Anything else — 5xx, 429, 401/403, 409 — is not stored and
//!   the in-flight marker is dropped, so a retry after a 503 does apply. A handler that ends
//!   without calling [`IdempotencyCache::complete`] (error, panic, client gone) also frees the key:
//!   dropping the [`Guard`] does it.
//! * **Expiry**: 24 h after the first response ([`DEFAULT_TTL`]).
//!
//! # Memory
//!
//! Bounded by a cap on entries and on stored bytes (keys, headers and bodies). Since every entry
//! lives equally long, insertion order is expiry order: one FIFO queue serves both expiry
//! ([`IdempotencyCache::sweep`], also done on each `begin`) and eviction when a cap is reached
//! (oldest first). An evicted key is forgotten early: a retry of it would apply again, which is
//! why the caps should be sized well above a day's keyed POSTs. In-flight markers are bounded by
//! the requests in flight.
//!
//! The cache is in memory: a restart forgets it (see the module's integration notes). One mutex
//! guards it; only requests that carry the header touch it, and each holds it for a hash-map
//! operation.

use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a stored response is replayed.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 255;
/// The header's name.
pub const HEADER: &str = "idempotency-key";
const ENTRY_OVERHEAD: usize = 160;

/// A malformed `Idempotency-Key` header (422 `validation_failed`, field `Idempotency-Key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1-255 visible ASCII characters")]
pub struct InvalidIdempotencyKey;

/// Checks a header value: 1–255 visible ASCII characters (`!`..=`~`, no spaces).
pub fn parse_key(value: &[u8]) -> Result<&str, InvalidIdempotencyKey> {
    if value.is_empty()
        || value.len() > MAX_KEY_LEN
        || !value.iter().all(|b| (0x21..=0x7e).contains(b))
    {
        return Err(InvalidIdempotencyKey);
    }
    std::str::from_utf8(value).map_err(|_| InvalidIdempotencyKey)
}

/// SHA-256 over `method`, `path` (with query, as the client sent it) and `body`.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [method.as_bytes(), path.as_bytes(), body] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Whether a response with this status is stored for replay.
pub fn is_storable(status: u16) -> bool {
    (200..300).contains(&status) || status == 400 || status == 422
}

/// The first response to a keyed request, as replayed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    /// The headers worth replaying (e.g. `content-type`, `location`); lowercase names.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

impl StoredResponse {
    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 32)
                .sum::<usize>()
    }
}

/// The outcome of [`IdempotencyCache::begin`].
pub enum Begin {
    /// First time: run the request, then [`IdempotencyCache::complete`] with its response.
    New(Guard),
    /// A retry of a completed request: answer with this.
    Replay(Arc<StoredResponse>),
    /// The key was used for a different request: 422 `idempotency_key_reused`.
    Mismatch,
    /// The first request with this key is still running: 409 `idempotency_in_flight`.
    InFlight,
}

impl fmt::Debug for Begin {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Begin::New(_) => f.write_str("New"),
            Begin::Replay(r) => write!(f, "Replay({})", r.status),
            Begin::Mismatch => f.write_str("Mismatch"),
            Begin::InFlight => f.write_str("InFlight"),
        }
    }
}

type Key = (Box<str>, Box<str>);

struct Done {
    fingerprint: [u8; 32],
    response: Arc<StoredResponse>,
    seq: u64,
    size: usize,
}

struct InFlightEntry {
    fingerprint: [u8; 32],
    token: u64,
}

struct State {
    done: HashMap<Key, Done>,
    /// (expires, seq, key) in insertion = expiry order.
    order: VecDeque<(Instant, u64, Key)>,
    inflight: HashMap<Key, InFlightEntry>,
    bytes: usize,
    next: u64,
}

impl State {
    fn pop_front(&mut self) {
        if let Some((_, seq, key)) = self.order.pop_front() {
            if self.done.get(&key).is_some_and(|d| d.seq == seq) {
                if let Some(d) = self.done.remove(&key) {
                    self.bytes -= d.size;
                }
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(exp, _, _)| *exp <= now) {
            self.pop_front();
        }
    }
}

/// Limits of the cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdempotencyConfig {
    pub ttl: Duration,
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            ttl: DEFAULT_TTL,
            max_entries: 200_000,
            max_bytes: 128 << 20,
        }
    }
}

/// The replay cache. Cloning shares it.
#[derive(Clone)]
pub struct IdempotencyCache {
    state: Arc<Mutex<State>>,
    config: IdempotencyConfig,
}

/// Marks a request as in flight; give it back through [`IdempotencyCache::complete`]. Dropping
/// it without completing frees the key for a retry.
pub struct Guard {
    state: Arc<Mutex<State>>,
    key: Key,
    fingerprint: [u8; 32],
    token: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut state = self.state.lock();
        if state
            .inflight
            .get(&self.key)
            .is_some_and(|e| e.token == self.token)
        {
            state.inflight.remove(&self.key);
        }
    }
}

impl IdempotencyCache {
    pub fn new(config: IdempotencyConfig) -> IdempotencyCache {
        IdempotencyCache {
            state: Arc::new(Mutex::new(State {
                done: HashMap::new(),
                order: VecDeque::new(),
                inflight: HashMap::new(),
                bytes: 0,
                next: 0,
            })),
            config,
        }
    }

    /// Starts a keyed request (see the module docs for the four outcomes).
    pub fn begin(&self, scope: &str, key: &str, fingerprint: [u8; 32], now: Instant) -> Begin {
        let k: Key = (scope.into(), key.into());
        let mut state = self.state.lock();
        state.expire(now);
        if let Some(done) = state.done.get(&k) {
            return if done.fingerprint == fingerprint {
                Begin::Replay(done.response.clone())
            } else {
                Begin::Mismatch
            };
        }
        if let Some(running) = state.inflight.get(&k) {
            return if running.fingerprint == fingerprint {
                Begin::InFlight
            } else {
                Begin::Mismatch
            };
        }
        state.next += 1;
        let token = state.next;
        state
            .inflight
            .insert(k.clone(), InFlightEntry { fingerprint, token });
        Begin::New(Guard {
            state: self.state.clone(),
            key: k,
            fingerprint,
            token,
        })
    }

    /// Ends a keyed request with its response; stores it for replay when [`is_storable`].
    /// Returns whether it was stored.
    pub fn complete(&self, guard: Guard, response: StoredResponse, now: Instant) -> bool {
        let mut state = self.state.lock();
        if state
            .inflight
            .get(&guard.key)
            .is_some_and(|e| e.token == guard.token)
        {
            state.inflight.remove(&guard.key);
        }
        if !is_storable(response.status) || state.done.contains_key(&guard.key) {
            return false;
        }
        let size = response.size() + guard.key.0.len() + guard.key.1.len() + ENTRY_OVERHEAD;
        state.next += 1;
        let seq = state.next;
        state
            .order
            .push_back((now + self.config.ttl, seq, guard.key.clone()));
        state.done.insert(
            guard.key.clone(),
            Done {
                fingerprint: guard.fingerprint,
                response: Arc::new(response),
                seq,
                size,
            },
        );
        state.bytes += size;
        while !state.order.is_empty()
            && (state.done.len() > self.config.max_entries.max(1)
                || (state.bytes > self.config.max_bytes && state.done.len() > 1))
        {
            state.pop_front();
        }
        true
        // `guard` drops here; its marker is already gone.
    }

    /// Drops expired entries (also done on every `begin`); returns how many remain.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut state = self.state.lock();
        state.expire(now);
        if state.order.capacity() > 4 * state.order.len().max(64) {
            state.order.shrink_to_fit();
            state.done.shrink_to_fit();
        }
        state.done.len()
    }

    /// Stored responses.
    pub fn len(&self) -> usize {
        self.state.lock().done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes accounted to stored responses.
    pub fn bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

impl Default for IdempotencyCache {
    fn default() -> Self {
        IdempotencyCache::new(IdempotencyConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fp(body: &str) -> [u8; 32] {
        fingerprint("POST", "/v1/locations", body.as_bytes())
    }

    fn response(status: u16, body: &str) -> StoredResponse {
        StoredResponse {
            status,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: Bytes::from(body.to_string()),
        }
    }

    fn new_guard(b: Begin) -> Guard {
        match b {
            Begin::New(g) => g,
            other => panic!("expected New, got {other:?}"),
        }
    }

    #[test]
    fn retry_replays_the_first_response() {
        let cache = IdempotencyCache::default();
        let t0 = Instant::now();
        let g = new_guard(cache.begin("key1", "abc", fp("{}"), t0));
        assert!(cache.complete(g, response(202, r#"{"accepted":1}"#), t0));
        match cache.begin("key1", "abc", fp("{}"), t0 + Duration::from_secs(60)) {
            Begin::Replay(r) => {
                assert_eq!(r.status, 202);
                assert_eq!(&r.body[..], br#"{"accepted":1}"#);
                assert_eq!(r.headers[0].0, "content-type");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn same_key_other_body_is_a_mismatch() {
        let cache = IdempotencyCache::default();
        let t0 = Instant::now();
        let g = new_guard(cache.begin("key1", "abc", fp("{\"a\":1}"), t0));
        assert!(matches!(
            cache.begin("key1", "abc", fp("{\"a\":2}"), t0),
            Begin::Mismatch
        ));
        cache.complete(g, response(202, "{}"), t0);
        assert!(matches!(
            cache.begin("key1", "abc", fp("{\"a\":2}"), t0),
            Begin::Mismatch
        ));
        // Another path with the same body is another request too.
        let other = fingerprint("POST", "/v1/locations/batch", b"{\"a\":1}");
        assert!(matches!(
            cache.begin("key1", "abc", other, t0),
            Begin::Mismatch
        ));
    }

    #[test]
    fn scopes_do_not_share_keys() {
        let cache = IdempotencyCache::default();
        let t0 = Instant::now();
        let g = new_guard(cache.begin("key1", "1", fp("a"), t0));
        cache.complete(g, response(202, "{}"), t0);
        assert!(matches!(
            cache.begin("key2", "1", fp("b"), t0),
            Begin::New(_)
        ));
    }

    #[test]
    fn concurrent_retry_is_in_flight_until_the_first_ends() {
        let cache = IdempotencyCache::default();
        let t0 = Instant::now();
        let g = new_guard(cache.begin("k", "x", fp("{}"), t0));
        assert!(matches!(
            cache.begin("k", "x", fp("{}"), t0),
            Begin::InFlight
        ));
        cache.complete(g, response(202, "{}"), t0);
        assert!(matches!(
            cache.begin("k", "x", fp("{}"), t0),
            Begin::Replay(_)
        ));
    }

    #[test]
    fn server_errors_are_not_stored_and_free_the_key() {
        let cache = IdempotencyCache::default();
        let t0 = Instant::now();
        for status in [500, 503, 429, 401, 403, 409] {
            let key = format!("k{status}");
            let g = new_guard(cache.begin("s", &key, fp("{}"), t0));
            assert!(!cache.complete(g, response(status, "{}"), t0), "{status}");
            let retry = new_guard(cache.begin("s", &key, fp("{}"), t0));
            assert!(cache.complete(retry, response(202, "{}"), t0));
        }
        for status in [200, 201, 202, 204, 400, 422] {
            let g = new_guard(cache.begin("t", &status.to_string(), fp("{}"), t0));
            assert!(cache.complete(g, response(status, "{}"), t0), "{status}");
        }
    }

    #[test]
    fn racing_first_attempts_run_once() {
        let cache = IdempotencyCache::default();
        let t0 = Instant::now();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, barrier) = (cache.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    match cache.begin("k", "x", fp("{}"), t0) {
                        Begin::New(g) => {
                            std::thread::sleep(Duration::from_millis(20));
                            cache.complete(g, response(202, "{}"), t0);
                            1
                        }
                        Begin::InFlight | Begin::Replay(_) => 0,
                        Begin::Mismatch => panic!("same body"),
                    }
                })
            })
            .collect();
        let ran: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(ran, 1);
    }

    #[test]
    fn dropping_the_guard_frees_the_key() {
        let cache = IdempotencyCache::default();
        let t0 = Instant::now();
        let g = new_guard(cache.begin("k", "x", fp("{}"), t0));
        drop(g);
        assert!(matches!(cache.begin("k", "x", fp("{}"), t0), Begin::New(_)));
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = IdempotencyCache::default();
        let t0 = Instant::now();
        let g = new_guard(cache.begin("k", "x", fp("{}"), t0));
        cache.complete(g, response(202, "{}"), t0);
        let almost = t0 + DEFAULT_TTL - Duration::from_secs(1);
        assert!(matches!(
            cache.begin("k", "x", fp("{}"), almost),
            Begin::Replay(_)
        ));
        assert_eq!(cache.sweep(t0 + DEFAULT_TTL), 0);
        assert_eq!(cache.bytes(), 0);
        // After expiry the key may be used for anything.
        assert!(matches!(
            cache.begin("k", "x", fp("other"), t0 + DEFAULT_TTL),
            Begin::New(_)
        ));
    }

    #[test]
    fn memory_is_capped_by_entries_and_bytes() {
        let cache = IdempotencyCache::new(IdempotencyConfig {
            ttl: DEFAULT_TTL,
            max_entries: 1000,
            max_bytes: 1 << 20,
        });
        let t0 = Instant::now();
        for i in 0..100_000u64 {
            let now = t0 + Duration::from_millis(i);
            let g = new_guard(cache.begin("s", &i.to_string(), fp("{}"), now));
            cache.complete(g, response(202, &"x".repeat(100)), now);
            assert!(cache.len() <= 1000);
        }
        assert_eq!(cache.len(), 1000);
        // The newest are kept, the oldest were evicted.
        let now = t0 + Duration::from_secs(100);
        assert!(matches!(
            cache.begin("s", "99999", fp("{}"), now),
            Begin::Replay(_)
        ));
        assert!(matches!(
            cache.begin("s", "0", fp("{}"), now),
            Begin::New(_)
        ));
        // Large bodies hit the byte cap first.
        for i in 0..100u64 {
            let g = new_guard(cache.begin("big", &i.to_string(), fp("{}"), now));
            cache.complete(g, response(202, &"y".repeat(64 << 10)), now);
            assert!(cache.bytes() <= 1 << 20);
        }
        assert!(cache.state.lock().order.len() <= 1000);
    }

    #[test]
    fn idempotency_key_format() {
        assert_eq!(parse_key(b"a"), Ok("a"));
        assert!(parse_key("k".repeat(255).as_bytes()).is_ok());
        assert!(parse_key(b"550e8400-e29b-41d4-a716-446655440000").is_ok());
        assert!(parse_key(b"!~").is_ok());
        for bad in [
            &b""[..],
            b"has space",
            b"tab\t",
            b"\x7f",
            "ümlaut".as_bytes(),
            b"nul\0",
        ] {
            assert_eq!(parse_key(bad), Err(InvalidIdempotencyKey), "{bad:?}");
        }
        assert!(parse_key("k".repeat(256).as_bytes()).is_err());
    }

    #[test]
    fn fingerprint_fields_do_not_run_together() {
        assert_ne!(
            fingerprint("POST", "/a", b"bc"),
            fingerprint("POST", "/ab", b"c")
        );
        assert_eq!(
            fingerprint("POST", "/a", b"x"),
            fingerprint("POST", "/a", b"x")
        );
    }

    proptest! {
        #[test]
        fn key_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(k) = parse_key(&bytes) {
                prop_assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN);
            }
        }
    }
}
