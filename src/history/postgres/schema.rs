//! The PostgreSQL schema: migrations run at start-up, one partition per UTC day created on demand,
//! and retention that only ever rewrites or drops whole partitions.
//!
//! # Migrations
//!
//! [`migrate`] applies the numbered statements of [`MIGRATIONS`] that `schema_migrations` does not
//! list yet, all in one transaction that first takes `pg_advisory_xact_lock`: two instances that
//! start together queue on the lock, and the second finds everything applied. Running it again
//! changes nothing. A migration is never edited once released; a change is a new number.
//!
//! # Partitions
//!
//! `positions` is `PARTITION BY RANGE (ts)`, one partition per UTC day named `positions_YYYYMMDD`
//! (`positions_YYYYMMDD_cold` once retention simplified it). Why days: a track query prunes to
//! the days it covers, and retention works on whole days, so it never deletes row by row (no
//! bloat, no vacuum debt). [`Partitions`] caches the days known to exist and creates missing ones
//! under an advisory lock (two workers may meet a new day at once).
//!
//! `driver_id` is `text COLLATE "C"`: ids are ASCII and only compared for equality, and byte order
//! makes the primary-key index cheaper to build and search than a linguistic collation.
//!
//! # Retention
//!
//! [`apply_retention`] (run by the worker, see [`super::worker`]): a partition whose day ended more
//! than `hot` ago is replaced by its Douglas–Peucker simplification (per driver, whole day,
//! tolerance in metres; first and last point of each driver's day kept), one ended more than
//! `cold` ago is dropped. Like the embedded store, data lives up to a day longer than configured,
//! never shorter.
//!
//! A rewrite happens in one transaction: `LOCK … IN SHARE MODE` on the partition (reads go on,
//! writes of late points to that day wait), read it in primary-key order through a portal, `COPY`
//! the kept rows into a new table `positions_YYYYMMDD_cold` (with the partition's `CHECK`, so
//! attaching it needs no scan), then detach and drop the old partition and attach the new one.
//! A crash anywhere rolls all of it back. `lock_timeout` bounds every wait: if a worker is writing
//! a late point into that day (it holds the parent's lock and waits on the partition's; we need the
//! parent's to detach) one of the two fails, the worker retries its batch and retention defers the
//! day to its next run ([`RetentionSummary::partitions_deferred`]). A session advisory lock keeps
//! two workers from running retention at once. Late points that land in a cold day afterwards are
//! stored as they come (not simplified again).

use super::writer::{copy_rows, StoredRow};
use super::PgTs;
use crate::domain::Micros;
use crate::geo::simplify_indices;
use crate::history::key::{day_of, day_start, MICROS_PER_DAY};
use anyhow::Context;
use chrono::DateTime;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::time::Duration;
use tokio_postgres::{Client, Transaction};

/// Advisory lock keys (arbitrary constants, unique to this service).
const MIGRATION_LOCK: i64 = 0x466c_6565_7401;
const PARTITION_LOCK: i64 = 0x466c_6565_7402;
const RETENTION_LOCK: i64 = 0x466c_6565_7403;

/// The schema, version by version.
pub const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE positions (
        driver_id   text COLLATE \"C\" NOT NULL,
        ts          timestamptz NOT NULL,
        lat_e6      integer NOT NULL,
        lon_e6      integer NOT NULL,
        status      smallint NOT NULL,
        speed_mps   real,
        heading_deg real,
        accuracy_m  real,
        received_at timestamptz NOT NULL,
        PRIMARY KEY (driver_id, ts)
    ) PARTITION BY RANGE (ts);",
)];

/// Applies the migrations not applied yet (see the module docs). Idempotent and safe to run from
/// several instances at once.
pub async fn migrate(client: &mut Client) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let applied: HashSet<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version} failed"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tracing::info!(version, "history: applied PostgreSQL migration");
    }
    tx.commit().await?;
    Ok(())
}

/// One partition of `positions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    /// UTC day number (days since 1970-01-01).
    pub day: i64,
    /// Simplified by retention.
    pub cold: bool,
}

/// `positions_YYYYMMDD`, with `_cold` once simplified.
pub fn partition_name(day: i64, cold: bool) -> String {
    let date = DateTime::from_timestamp(day.saturating_mul(86_400), 0)
        .map(|t| t.date_naive().format("%Y%m%d").to_string())
        .unwrap_or_else(|| format!("d{day}"));
    let suffix = if cold { "_cold" } else { "" };
    format!("positions_{date}{suffix}")
}

/// The day and tier of a partition's name; `None` for a table that is not ours.
pub fn parse_partition_name(name: &str) -> Option<Partition> {
    let rest = name.strip_prefix("positions_")?;
    let (date, cold) = match rest.strip_suffix("_cold") {
        Some(date) => (date, true),
        None => (rest, false),
    };
    let date = chrono::NaiveDate::parse_from_str(date, "%Y%m%d").ok()?;
    let midnight = date.and_hms_opt(0, 0, 0)?.and_utc().timestamp();
    Some(Partition {
        name: name.to_string(),
        day: midnight.div_euclid(86_400),
        cold,
    })
}

/// Every partition attached to `positions`, oldest day first.
pub async fn list_partitions(client: &Client) -> Result<Vec<Partition>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'positions'::regclass",
            &[],
        )
        .await?;
    let mut partitions: Vec<Partition> = rows
        .iter()
        .filter_map(|row| parse_partition_name(row.get::<_, &str>(0)))
        .collect();
    partitions.sort_by_key(|p| p.day);
    Ok(partitions)
}

/// `FOR VALUES FROM (…) TO (…)` of a day.
fn day_bounds(day: i64) -> String {
    format!(
        "FROM ('{}') TO ('{}')",
        rfc3339(day_start(day)),
        rfc3339(day_start(day.saturating_add(1)))
    )
}

fn rfc3339(ts: Micros) -> String {
    DateTime::from_timestamp_micros(ts)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_else(|| "infinity".to_string())
}

/// The days known to have a partition, so a batch only asks PostgreSQL about new days.
#[derive(Default)]
pub struct Partitions {
    known: Mutex<HashSet<i64>>,
}

impl Partitions {
    /// Creates the partitions of `days` that do not exist yet.
    pub async fn ensure(&self, client: &mut Client, days: &[i64]) -> anyhow::Result<()> {
        let missing: Vec<i64> = {
            let known = self.known.lock();
            days.iter()
                .copied()
                .filter(|d| !known.contains(d))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
            .await?;
        let existing: HashSet<i64> = list_partitions(tx.client())
            .await?
            .into_iter()
            .map(|p| p.day)
            .collect();
        for &day in &missing {
            if existing.contains(&day) {
                continue;
            }
            let sql = format!(
                "CREATE TABLE {} PARTITION OF positions FOR VALUES {}",
                partition_name(day, false),
                day_bounds(day)
            );
            tx.batch_execute(&sql)
                .await
                .with_context(|| format!("cannot create partition for day {day}"))?;
        }
        tx.commit().await?;
        let mut known = self.known.lock();
        known.extend(existing);
        known.extend(missing);
        Ok(())
    }

    /// Forgets what is known (after an error: retention may have dropped a day meanwhile).
    pub fn forget(&self) {
        self.known.lock().clear();
    }
}

/// What one retention run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionSummary {
    /// Partitions replaced by their simplified tracks.
    pub partitions_simplified: usize,
    /// Partitions dropped for being older than the cold retention.
    pub partitions_dropped: usize,
    /// Partitions that could not be rewritten now (lock timeout, conflict); retried next run.
    pub partitions_deferred: usize,
    /// Rows of the simplified partitions before and after.
    pub rows_before: u64,
    pub rows_after: u64,
    /// Another instance was running retention; nothing was done.
    pub skipped: bool,
}

/// How long retention waits for a lock before it defers the partition.
const RETENTION_LOCK_TIMEOUT: &str = "5s";
/// Rows fetched per round trip while rewriting a partition.
const FETCH_ROWS: i32 = 20_000;

/// Simplifies partitions whose day ended more than `hot` before `now`, drops those that ended more
/// than `cold` before it (see the module docs). Running it again changes nothing.
pub async fn apply_retention(
    client: &mut Client,
    hot: Duration,
    cold: Duration,
    cold_simplify_m: f64,
    now: Micros,
) -> anyhow::Result<RetentionSummary> {
    let mut summary = RetentionSummary::default();
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK])
        .await?
        .get(0);
    if !locked {
        summary.skipped = true;
        return Ok(summary);
    }
    let result = retention_pass(client, hot, cold, cold_simplify_m, now, &mut summary).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
        .await;
    result?;
    unlocked?;
    Ok(summary)
}

async fn retention_pass(
    client: &mut Client,
    hot: Duration,
    cold: Duration,
    cold_simplify_m: f64,
    now: Micros,
    summary: &mut RetentionSummary,
) -> anyhow::Result<()> {
    let hot_cutoff = now.saturating_sub(to_micros(hot));
    let cold_cutoff = now.saturating_sub(to_micros(cold));
    for partition in list_partitions(client).await? {
        let day_end = day_start(partition.day).saturating_add(MICROS_PER_DAY - 1);
        if day_end < cold_cutoff {
            let tx = client.transaction().await?;
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = '{RETENTION_LOCK_TIMEOUT}'; DROP TABLE {}",
                partition.name
            ))
            .await?;
            tx.commit().await?;
            summary.partitions_dropped += 1;
            tracing::info!(partition = %partition.name, "history: dropped expired partition");
        } else if !partition.cold && day_end < hot_cutoff {
            match simplify_partition(client, &partition, cold_simplify_m).await {
                Ok((before, after)) => {
                    summary.partitions_simplified += 1;
                    summary.rows_before += before;
                    summary.rows_after += after;
                    tracing::info!(partition = %partition.name, before, after,
                        "history: simplified partition");
                }
                Err(error) => {
                    summary.partitions_deferred += 1;
                    tracing::warn!(partition = %partition.name, error = %format!("{error:#}"),
                        "history: could not simplify partition now; retrying on the next run");
                }
            }
        }
    }
    Ok(())
}

/// Rewrites one partition to its simplified tracks (one transaction); rows before and after.
async fn simplify_partition(
    client: &mut Client,
    partition: &Partition,
    tolerance_m: f64,
) -> anyhow::Result<(u64, u64)> {
    let cold_name = partition_name(partition.day, true);
    let lo = rfc3339(day_start(partition.day));
    let hi = rfc3339(day_start(partition.day.saturating_add(1)));
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{RETENTION_LOCK_TIMEOUT}';
         LOCK TABLE {old} IN SHARE MODE;
         DROP TABLE IF EXISTS {cold_name};
         CREATE TABLE {cold_name} (LIKE positions INCLUDING DEFAULTS,
             PRIMARY KEY (driver_id, ts),
             CHECK (ts >= '{lo}' AND ts < '{hi}'));",
        old = partition.name
    ))
    .await?;
    let (before, after) = copy_simplified(&tx, &partition.name, &cold_name, tolerance_m).await?;
    tx.batch_execute(&format!(
        "ALTER TABLE positions DETACH PARTITION {old};
         DROP TABLE {old};
         ALTER TABLE positions ATTACH PARTITION {cold_name} FOR VALUES {bounds};",
        old = partition.name,
        bounds = day_bounds(partition.day)
    ))
    .await?;
    tx.commit().await?;
    Ok((before, after))
}

/// Reads `from` driver by driver in time order and copies each driver's simplified day into `to`.
async fn copy_simplified(
    tx: &Transaction<'_>,
    from: &str,
    to: &str,
    tolerance_m: f64,
) -> anyhow::Result<(u64, u64)> {
    let select = format!(
        "SELECT driver_id, ts, lat_e6, lon_e6, status, speed_mps, heading_deg, accuracy_m, \
         received_at FROM {from} ORDER BY driver_id, ts"
    );
    let statement = tx.prepare(&select).await?;
    let portal = tx.bind(&statement, &[]).await?;
    let (mut before, mut after) = (0u64, 0u64);
    let mut driver: Vec<StoredRow> = Vec::new();
    let mut kept: Vec<StoredRow> = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, FETCH_ROWS).await?;
        let done = rows.len() < FETCH_ROWS as usize;
        for row in rows {
            let stored = StoredRow {
                driver_id: row.get::<_, &str>(0).into(),
                ts: row.get::<_, PgTs>(1).0,
                lat_e6: row.get(2),
                lon_e6: row.get(3),
                status: row.get(4),
                speed_mps: row.get(5),
                heading_deg: row.get(6),
                accuracy_m: row.get(7),
                received_at: row.get::<_, PgTs>(8).0,
            };
            before += 1;
            if driver
                .last()
                .is_some_and(|d| d.driver_id != stored.driver_id)
            {
                simplify_into(&mut driver, tolerance_m, &mut kept);
            }
            driver.push(stored);
        }
        if done {
            simplify_into(&mut driver, tolerance_m, &mut kept);
        }
        if done || kept.len() >= FETCH_ROWS as usize {
            after += kept.len() as u64;
            copy_rows(tx, to, &kept).await?;
            kept.clear();
        }
        if done {
            break;
        }
    }
    Ok((before, after))
}

/// Moves the points of one driver's day that the simplification keeps into `kept`.
fn simplify_into(driver: &mut Vec<StoredRow>, tolerance_m: f64, kept: &mut Vec<StoredRow>) {
    let coords: Vec<(i32, i32)> = driver.iter().map(|r| (r.lat_e6, r.lon_e6)).collect();
    let keep = simplify_indices(&coords, tolerance_m);
    let mut next = keep.iter().peekable();
    for (i, row) in driver.drain(..).enumerate() {
        if next.peek() == Some(&&i) {
            next.next();
            kept.push(row);
        }
    }
}

fn to_micros(duration: Duration) -> Micros {
    Micros::try_from(duration.as_micros()).unwrap_or(Micros::MAX)
}

/// The UTC days a set of timestamps falls on, each once.
pub fn days_of(timestamps: impl Iterator<Item = Micros>) -> Vec<i64> {
    let mut days: Vec<i64> = timestamps.map(day_of).collect();
    days.sort_unstable();
    days.dedup();
    days
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn partition_names_round_trip() {
        for day in [0, 20_454, -1] {
            for cold in [false, true] {
                let name = partition_name(day, cold);
                let parsed = parse_partition_name(&name);
                assert_eq!(parsed.map(|p| (p.day, p.cold)), Some((day, cold)), "{name}");
            }
        }
        assert_eq!(partition_name(0, false), "positions_19700101");
        assert_eq!(partition_name(1, true), "positions_19700102_cold");
        assert!(parse_partition_name("positions_staging").is_none());
        assert_eq!(
            day_bounds(0),
            "FROM ('1970-01-01T00:00:00.000000Z') TO ('1970-01-02T00:00:00.000000Z')"
        );
    }
}
