//! Trust: who may call the API, how often, and which positions are believable.
//!
//! Each file is one building block with no knowledge of HTTP routing, so the HTTP layer (and the
//! WebSocket ingest, and the CLI) apply the same rules:
//!
//! | module | concept |
//! |---|---|
//! | [`keys`] | API keys: roles, tenants, hashed secrets, the `keys.json` store, [`keys::Principal`] |
//! | [`signing`] | optional HMAC request signing for devices (`X-Signature`) |
//! | [`limiter`] | token buckets per device key and driver, per reader key, with bounded memory |
//! | [`filters`] | GPS sanity filters: null island, future, too old, duplicates, impossible speed |
//! | [`anomalies`] | the persisted log of suspicious fixes for risk review |
//! | [`idempotency`] | `Idempotency-Key` replay cache for POST endpoints |
//! | [`metrics`] | the counters these blocks feed: rejections, rate limiting, auth failures |
//! | [`cli`] | `fleettracker keys create|list|revoke` |

//!
//! # Wiring (for the HTTP layer)
//!
//! Per request, in this order: authenticate ([`keys::KeyStore::authenticate`] → 401
//! `unauthorized`), authorise ([`keys::Principal`] → 403 `forbidden`), verify the signature when
//! the key has a signing secret ([`signing::verify`] → 401), rate-limit ([`limiter::RateLimiter`]
//! → 429 `rate_limited` + `Retry-After`), then for keyed POSTs [`idempotency::IdempotencyCache`],
//! then validation and the sanity filters per position ([`filters::SanityFilters::check`]),
//! recording anomalies ([`anomalies::AnomalyLog::record`]). Periodically: `reload_if_changed`,
//! `sweep` of the limiters, the idempotency cache and the anomaly log, `AnomalyLog::persist`.

pub mod anomalies;
pub mod cli;
pub mod filters;
pub mod idempotency;
pub mod keys;
pub mod limiter;
pub mod metrics;
mod serde_time;
pub mod signing;
