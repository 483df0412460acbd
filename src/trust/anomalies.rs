//! The anomaly log: suspicious fixes (impossible speed, teleports) kept for risk review
//! (`GET /v1/anomalies?driver_id=&from=&to=`), e.g. to settle a dispute about a delivery or to spot
//! GPS spoofing. The data must survive restarts, so it is persisted.
//!
//! # Storage
//!
//! A fjall database of its own under `<data-dir>/anomalies` (not the history database: its
//! retention, volume and durability needs differ), with two keyspaces holding the same JSON record:
//!
//! * `by_driver`: `tenant ‖ 0 ‖ driver ‖ 0 ‖ at ‖ recorded_at` — one driver's anomalies in time order;
//! * `by_time`: `tenant ‖ 0 ‖ at ‖ driver ‖ 0 ‖ recorded_at` — a tenant's anomalies in time order,
//!   and the order the retention sweep deletes in.
//!
//! Times are 8-byte big-endian with the sign bit flipped, so byte order is time order. Tenant names
//! and driver ids never contain a 0 byte (both charsets are validated), so the separators are
//! unambiguous and every tenant's keys sort before `tenant ‖ 1`. `recorded_at` keeps two anomalies
//! of the same fix apart. Both keyspaces are written in one atomic batch.
//!
//! Anomalies are rare (one per rejected jump), so storing the record twice costs little and makes
//! both queries a single range scan. Retention (default 90 days, by the fix's timestamp) is applied
//! by [`AnomalyLog::sweep`], which the server runs periodically; queries also never return
//! anything older than the retention.
//!
//! Volume: a device could make every fix an anomaly. Records are capped per tenant and driver at
//! [`MAX_PER_DRIVER_PER_HOUR`] (a token bucket from [`super::limiter`]); beyond it
//! [`AnomalyLog::record`] drops the record and says so, so one driver cannot fill the disk
//! (at most ~130,000 records per driver over 90 days).
//!
//! Durability: each record reaches the journal (the OS) before [`AnomalyLog::record`] returns, so
//! it survives a crash of the process; [`AnomalyLog::persist`] (run periodically and at shutdown)
//! fsyncs it against power loss.

use super::filters::{Evidence, Reason};
use super::limiter::{LimitConfig, RateLimiter};
use crate::domain::{Micros, Position};
use compact_str::CompactString;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Default retention of anomaly records: 90 days.
pub const DEFAULT_RETENTION: Micros = 90 * 86_400 * 1_000_000;
/// Most anomalies recorded per tenant and driver per hour (also the burst).
pub const MAX_PER_DRIVER_PER_HOUR: u32 = 60;
/// Most records one query returns.
pub const MAX_QUERY_LIMIT: usize = 10_000;

/// What kind of suspicious jump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// Distance over time from the previous fix above the maximum speed.
    ImpossibleSpeed,
    /// Far from the previous fix at the same timestamp.
    Teleport,
}

impl AnomalyKind {
    /// The kind for a rejection reason, if it is an anomaly.
    pub fn of(reason: Reason) -> Option<AnomalyKind> {
        match reason {
            Reason::ImpossibleSpeed => Some(AnomalyKind::ImpossibleSpeed),
            Reason::Teleport => Some(AnomalyKind::Teleport),
            _ => None,
        }
    }
}

/// A point in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Point {
    pub latitude: f64,
    pub longitude: f64,
}

/// One suspicious fix, as recorded and as returned by the query endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Anomaly {
    pub tenant: String,
    pub driver_id: String,
    /// Timestamp of the rejected fix.
    #[serde(with = "super::serde_time::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: Micros,
    /// When the server saw it.
    #[serde(with = "super::serde_time::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub recorded_at: Micros,
    pub kind: AnomalyKind,
    /// Metres per second, after the accuracy allowance (see [`super::filters`]).
    pub implied_speed_mps: f64,
    pub distance_m: f64,
    /// Seconds since the previous fix (0 for a teleport).
    pub elapsed_s: f64,
    /// The previous (accepted) fix.
    pub from: Point,
    /// The rejected fix.
    pub to: Point,
}

impl Anomaly {
    /// The record for a rejection of `position`, if the reason is an anomaly.
    pub fn new(
        tenant: &str,
        position: &Position,
        reason: Reason,
        evidence: &Evidence,
        recorded_at: Micros,
    ) -> Option<Anomaly> {
        Some(Anomaly {
            tenant: tenant.to_string(),
            driver_id: position.driver_id.to_string(),
            at: position.timestamp,
            recorded_at,
            kind: AnomalyKind::of(reason)?,
            implied_speed_mps: finite(evidence.implied_speed_mps),
            distance_m: finite(evidence.distance_m),
            elapsed_s: finite(evidence.elapsed_s),
            from: Point {
                latitude: evidence.from.0,
                longitude: evidence.from.1,
            },
            to: Point {
                latitude: evidence.to.0,
                longitude: evidence.to.1,
            },
        })
    }
}

/// JSON has no infinity or NaN.
fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        f64::MAX
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnomalyError {
    #[error("anomaly store: {0}")]
    Store(#[from] fjall::Error),
    #[error("anomaly store: corrupt record: {0}")]
    Corrupt(String),
    #[error("tenant and driver id must not be empty or contain NUL bytes")]
    InvalidKey,
}

/// The persisted anomaly log.
pub struct AnomalyLog {
    db: Database,
    by_driver: Keyspace,
    by_time: Keyspace,
    retention: Micros,
    per_driver: RateLimiter<(CompactString, CompactString)>,
}

/// Byte order = time order.
fn time_key(t: Micros) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

fn valid_part(s: &str) -> bool {
    !s.is_empty() && !s.as_bytes().contains(&0)
}

fn driver_key(tenant: &str, driver: &str, at: Micros, recorded_at: Micros) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + driver.len() + 18);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(driver.as_bytes());
    k.push(0);
    k.extend_from_slice(&time_key(at));
    k.extend_from_slice(&time_key(recorded_at));
    k
}

fn tenant_time_key(tenant: &str, at: Micros, driver: &str, recorded_at: Micros) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + driver.len() + 18);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(&time_key(at));
    k.extend_from_slice(driver.as_bytes());
    k.push(0);
    k.extend_from_slice(&time_key(recorded_at));
    k
}

/// The `by_driver` key of the record stored under a `by_time` key (`tenant_len` bytes of tenant),
/// rebuilt from the key bytes alone so a record's value is never needed to delete it.
fn driver_key_of_time_key(key: &[u8], tenant_len: usize) -> Option<Vec<u8>> {
    let tenant = key.get(..tenant_len)?;
    let rest = key.get(tenant_len + 1..)?;
    let at = rest.get(..8)?;
    let tail = rest.get(8..)?;
    let (driver, recorded) = tail.split_at_checked(tail.len().checked_sub(9)?)?;
    if recorded.first() != Some(&0) {
        return None;
    }
    Some(prefix(&[tenant, &[0], driver, &[0], at, &recorded[1..]]))
}

fn prefix(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::new();
    for part in parts {
        k.extend_from_slice(part);
    }
    k
}

impl AnomalyLog {
    /// Opens (or creates) the log in `dir` (normally `<data-dir>/anomalies`). `retention` is in
    /// microseconds.
    pub fn open(dir: &Path, retention: Micros) -> Result<AnomalyLog, AnomalyError> {
        let db = Database::builder(dir).open()?;
        let by_driver = db.keyspace("by_driver", KeyspaceCreateOptions::default)?;
        let by_time = db.keyspace("by_time", KeyspaceCreateOptions::default)?;
        Ok(AnomalyLog {
            db,
            by_driver,
            by_time,
            retention: retention.max(0),
            per_driver: RateLimiter::new(LimitConfig {
                rate_per_sec: f64::from(MAX_PER_DRIVER_PER_HOUR) / 3600.0,
                burst: MAX_PER_DRIVER_PER_HOUR,
                max_entries: 100_000,
            }),
        })
    }

    /// Records one anomaly (a short blocking write). `Ok(false)`: dropped, the driver is over
    /// [`MAX_PER_DRIVER_PER_HOUR`].
    pub fn record(&self, anomaly: &Anomaly) -> Result<bool, AnomalyError> {
        if !valid_part(&anomaly.tenant) || !valid_part(&anomaly.driver_id) {
            return Err(AnomalyError::InvalidKey);
        }
        let who = (
            CompactString::new(&anomaly.tenant),
            CompactString::new(&anomaly.driver_id),
        );
        if self.per_driver.check(&who, 1, Instant::now()).is_err() {
            return Ok(false);
        }
        let value =
            serde_json::to_vec(anomaly).map_err(|e| AnomalyError::Corrupt(e.to_string()))?;
        let (t, d) = (&anomaly.tenant, &anomaly.driver_id);
        let mut batch = self.db.batch();
        batch.insert(
            &self.by_driver,
            driver_key(t, d, anomaly.at, anomaly.recorded_at),
            value.clone(),
        );
        batch.insert(
            &self.by_time,
            tenant_time_key(t, anomaly.at, d, anomaly.recorded_at),
            value,
        );
        batch.commit()?;
        Ok(true)
    }

    /// Forgets per-driver cap state that no longer matters; run with the other periodic sweeps.
    pub fn sweep_caps(&self) {
        self.per_driver.sweep(Instant::now());
    }

    /// Anomalies of `tenant` (one driver's, or all drivers') whose fix timestamp is in
    /// `from..=to`, oldest first, at most `limit` (capped at [`MAX_QUERY_LIMIT`]). `now` is the
    /// clock the retention is measured against.
    pub fn query(
        &self,
        tenant: &str,
        driver_id: Option<&str>,
        from: Micros,
        to: Micros,
        limit: usize,
        now: Micros,
    ) -> Result<Vec<Anomaly>, AnomalyError> {
        if !valid_part(tenant) || driver_id.is_some_and(|d| !valid_part(d)) {
            return Ok(Vec::new());
        }
        let from = from.max(now.saturating_sub(self.retention));
        let limit = limit.min(MAX_QUERY_LIMIT);
        if from > to || limit == 0 {
            return Ok(Vec::new());
        }
        let (lo, hi) = match driver_id {
            Some(d) => {
                let base: &[&[u8]] = &[tenant.as_bytes(), &[0], d.as_bytes(), &[0]];
                let lo = prefix(&[&prefix(base), &time_key(from)]);
                let hi = prefix(&[&prefix(base), &time_key(to), &[0xff; 8]]);
                (lo, hi)
            }
            None => {
                let base: &[&[u8]] = &[tenant.as_bytes(), &[0]];
                let lo = prefix(&[&prefix(base), &time_key(from)]);
                // Every key with `at == to` is below `to ‖ 0xff` (driver ids are ASCII).
                let hi = prefix(&[&prefix(base), &time_key(to), &[0xff]]);
                (lo, hi)
            }
        };
        let keyspace = if driver_id.is_some() {
            &self.by_driver
        } else {
            &self.by_time
        };
        let mut out = Vec::new();
        for entry in keyspace.range(lo..=hi) {
            let (_, value) = entry.into_inner()?;
            let anomaly: Anomaly =
                serde_json::from_slice(&value).map_err(|e| AnomalyError::Corrupt(e.to_string()))?;
            out.push(anomaly);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes every record whose fix is older than the retention; returns how many. Walks the
    /// tenants by skipping from one tenant's keys to the next (`tenant ‖ 1`), deleting each
    /// tenant's expired prefix.
    pub fn sweep(&self, now: Micros) -> Result<usize, AnomalyError> {
        let cutoff = now.saturating_sub(self.retention);
        let mut cursor: Vec<u8> = Vec::new();
        let mut deleted = 0;
        loop {
            let Some(first) = self.by_time.range(cursor.as_slice()..).next() else {
                break;
            };
            let key = first.key()?;
            let Some(end) = key.iter().position(|&b| b == 0) else {
                return Err(AnomalyError::Corrupt("key without tenant separator".into()));
            };
            let tenant = key[..end].to_vec();
            let lo = prefix(&[&tenant, &[0]]);
            let hi = prefix(&[&tenant, &[0], &time_key(cutoff)]);
            let mut batch = self.db.batch();
            let mut n = 0;
            for entry in self.by_time.range(lo..hi) {
                let k = entry.key()?;
                let twin = driver_key_of_time_key(&k, tenant.len())
                    .ok_or_else(|| AnomalyError::Corrupt("malformed by_time key".into()))?;
                batch.remove(&self.by_driver, twin);
                batch.remove(&self.by_time, k);
                n += 1;
            }
            if n > 0 {
                batch.commit()?;
                deleted += n;
            }
            cursor = prefix(&[&tenant, &[1]]);
        }
        Ok(deleted)
    }

    /// Makes every record so far durable against power loss.
    pub fn persist(&self) -> Result<(), AnomalyError> {
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DriverId, Status};
    use crate::trust::filters::{SanityFilters, Verdict};

    const S: Micros = 1_000_000;
    const NOW: Micros = 1_790_000_000 * S;

    fn anomaly(tenant: &str, driver: &str, at: Micros) -> Anomaly {
        Anomaly {
            tenant: tenant.into(),
            driver_id: driver.into(),
            at,
            recorded_at: at + S,
            kind: AnomalyKind::ImpossibleSpeed,
            implied_speed_mps: 120.5,
            distance_m: 7230.0,
            elapsed_s: 60.0,
            from: Point {
                latitude: 31.2,
                longitude: 121.4,
            },
            to: Point {
                latitude: 31.26,
                longitude: 121.43,
            },
        }
    }

    fn drivers(list: &[Anomaly]) -> Vec<(&str, Micros)> {
        list.iter().map(|a| (a.driver_id.as_str(), a.at)).collect()
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = anomaly("acme", "d1", NOW - 10 * S);
        {
            let log = AnomalyLog::open(dir.path(), DEFAULT_RETENTION).unwrap();
            log.record(&a).unwrap();
            log.persist().unwrap();
        }
        let log = AnomalyLog::open(dir.path(), DEFAULT_RETENTION).unwrap();
        let got = log.query("acme", Some("d1"), 0, NOW, 100, NOW).unwrap();
        assert_eq!(got, vec![a]);
    }

    #[test]
    fn queries_by_driver_and_by_tenant_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = AnomalyLog::open(dir.path(), DEFAULT_RETENTION).unwrap();
        for (t, d, at) in [
            ("acme", "d2", NOW - 5 * S),
            ("acme", "d1", NOW - 30 * S),
            ("acme", "d1", NOW - 10 * S),
            ("acme", "d10", NOW - 20 * S),
            ("globex", "d1", NOW - 15 * S),
            ("acme2", "d1", NOW - 15 * S),
        ] {
            log.record(&anomaly(t, d, at)).unwrap();
        }
        let d1 = log.query("acme", Some("d1"), 0, NOW, 100, NOW).unwrap();
        assert_eq!(drivers(&d1), [("d1", NOW - 30 * S), ("d1", NOW - 10 * S)]);
        let all = log.query("acme", None, 0, NOW, 100, NOW).unwrap();
        assert_eq!(
            drivers(&all),
            [
                ("d1", NOW - 30 * S),
                ("d10", NOW - 20 * S),
                ("d1", NOW - 10 * S),
                ("d2", NOW - 5 * S)
            ]
        );
        assert!(
            all.iter().all(|a| a.tenant == "acme"),
            "no other tenant leaks in"
        );
        // Inclusive bounds.
        let window = log
            .query("acme", None, NOW - 20 * S, NOW - 10 * S, 100, NOW)
            .unwrap();
        assert_eq!(
            drivers(&window),
            [("d10", NOW - 20 * S), ("d1", NOW - 10 * S)]
        );
        let one = log
            .query("acme", Some("d1"), NOW - 10 * S, NOW - 10 * S, 100, NOW)
            .unwrap();
        assert_eq!(one.len(), 1);
        // Limit, empty and inverted ranges, unknown tenant.
        assert_eq!(log.query("acme", None, 0, NOW, 2, NOW).unwrap().len(), 2);
        assert!(log
            .query("acme", None, NOW, 0, 100, NOW)
            .unwrap()
            .is_empty());
        assert!(log
            .query("initech", None, 0, NOW, 100, NOW)
            .unwrap()
            .is_empty());
        assert!(log
            .query("acme", Some("nobody"), 0, NOW, 100, NOW)
            .unwrap()
            .is_empty());
        assert!(log.query("", None, 0, NOW, 100, NOW).unwrap().is_empty());
    }

    #[test]
    fn negative_and_extreme_times_sort_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let log = AnomalyLog::open(dir.path(), Micros::MAX).unwrap();
        // Years ~0005 and ~9900: the extremes an RFC 3339 record can carry.
        let (early, late) = (-62_000_000_000 * S, 250_000_000_000 * S);
        for at in [-5 * S, 0, 5 * S, early, late] {
            log.record(&anomaly("acme", "d", at)).unwrap();
        }
        let got = log
            .query("acme", Some("d"), Micros::MIN, Micros::MAX, 100, NOW)
            .unwrap();
        let ats: Vec<Micros> = got.iter().map(|a| a.at).collect();
        assert_eq!(ats, [early, -5 * S, 0, 5 * S, late]);
    }

    #[test]
    fn retention_hides_and_sweeps_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let day = 86_400 * S;
        let log = AnomalyLog::open(dir.path(), 90 * day).unwrap();
        log.record(&anomaly("acme", "d1", NOW - 91 * day)).unwrap();
        log.record(&anomaly("acme", "d1", NOW - 89 * day)).unwrap();
        log.record(&anomaly("globex", "d9", NOW - 100 * day))
            .unwrap();
        log.record(&anomaly("zeta", "d9", NOW - day)).unwrap();
        assert_eq!(
            log.query("acme", Some("d1"), 0, NOW, 100, NOW)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(log.sweep(NOW).unwrap(), 2);
        assert_eq!(log.sweep(NOW).unwrap(), 0);
        let twin = driver_key_of_time_key(&tenant_time_key("acme", 7, "d1", 9), 4).unwrap();
        assert_eq!(twin, driver_key("acme", "d1", 7, 9));
        assert!(driver_key_of_time_key(b"acme\0short", 4).is_none());
        // Gone from both indexes, even with an infinite retention view.
        drop(log);
        let log = AnomalyLog::open(dir.path(), Micros::MAX).unwrap();
        assert_eq!(
            drivers(&log.query("acme", Some("d1"), 0, NOW, 100, NOW).unwrap()).len(),
            1
        );
        assert_eq!(log.query("acme", None, 0, NOW, 100, NOW).unwrap().len(), 1);
        assert!(log
            .query("globex", None, 0, NOW, 100, NOW)
            .unwrap()
            .is_empty());
        assert!(log
            .query("globex", Some("d9"), 0, NOW, 100, NOW)
            .unwrap()
            .is_empty());
        assert_eq!(log.query("zeta", None, 0, NOW, 100, NOW).unwrap().len(), 1);
    }

    #[test]
    fn one_driver_cannot_flood_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = AnomalyLog::open(dir.path(), DEFAULT_RETENTION).unwrap();
        for i in 0..MAX_PER_DRIVER_PER_HOUR {
            assert!(log
                .record(&anomaly("acme", "d1", NOW + i64::from(i)))
                .unwrap());
        }
        assert!(!log.record(&anomaly("acme", "d1", NOW + 1000)).unwrap());
        assert!(
            log.record(&anomaly("acme", "d2", NOW)).unwrap(),
            "others unaffected"
        );
        assert!(log.record(&anomaly("globex", "d1", NOW)).unwrap());
        let stored = log
            .query("acme", Some("d1"), 0, NOW + 2000, 1000, NOW)
            .unwrap();
        assert_eq!(stored.len(), MAX_PER_DRIVER_PER_HOUR as usize);
        log.sweep_caps();
    }

    #[test]
    fn invalid_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = AnomalyLog::open(dir.path(), DEFAULT_RETENTION).unwrap();
        assert!(matches!(
            log.record(&anomaly("ac\0me", "d", NOW)),
            Err(AnomalyError::InvalidKey)
        ));
        assert!(matches!(
            log.record(&anomaly("acme", "", NOW)),
            Err(AnomalyError::InvalidKey)
        ));
    }

    #[test]
    fn built_from_a_filter_verdict() {
        let prev = Position {
            driver_id: DriverId::new("d1"),
            lat_e6: 31_200_000,
            lon_e6: 121_400_000,
            status: Status::Online,
            timestamp: NOW - 10 * S,
            speed_mps: None,
            heading_deg: None,
            accuracy_m: None,
        };
        let new = Position {
            lat_e6: 48_850_000,
            lon_e6: 2_350_000,
            timestamp: NOW,
            ..prev.clone()
        };
        let Verdict::Reject {
            reason,
            evidence: Some(evidence),
        } = SanityFilters::default().check(&new, Some(&prev), NOW)
        else {
            panic!("expected an anomaly");
        };
        let a = Anomaly::new("acme", &new, reason, &evidence, NOW + 1).unwrap();
        assert_eq!(a.kind, AnomalyKind::ImpossibleSpeed);
        assert_eq!(a.at, NOW);
        assert_eq!(a.elapsed_s, 10.0);
        assert!(a.distance_m > 9_000_000.0);
        assert_eq!(
            a.to,
            Point {
                latitude: 48.85,
                longitude: 2.35
            }
        );
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["kind"], "impossible_speed");
        assert!(json["at"].as_str().unwrap().ends_with('Z'));
        assert!(Anomaly::new("acme", &new, Reason::Future, &evidence, NOW).is_none());
    }
}
