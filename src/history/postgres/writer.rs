//! [`PgWriter`]: one batch of positions into `positions`, in one transaction, with `COPY`.
//!
//! Why `COPY` into a staging table and then `INSERT … SELECT`: `COPY` is PostgreSQL's fast path
//! (binary rows streamed without a statement per row, several times the rate of multi-row
//! `INSERT`s), but `COPY` into `positions` itself would fail the whole batch on the first
//! duplicate key, and duplicates are expected: the stream delivers at least once (a worker that
//! crashed after its commit but before its `XACK` has its entries delivered again). So the batch
//! goes into `positions_staging`, a session-local `TEMP` table (`ON COMMIT DELETE ROWS`: no WAL,
//! emptied by every commit), and one `INSERT … SELECT … ON CONFLICT (driver_id, ts)` moves it.
//!
//! The session forces `synchronous_commit = on`: the worker acknowledges stream entries as soon
//! as the commit returns, so the commit must be durable then. With the server's
//! `synchronous_commit = off` a crash could lose the last commits after their entries were
//! acknowledged (the outage test caught exactly that against the test server, which runs with it
//! off). One WAL flush per transaction of ~20,000 rows costs nothing measurable.
//!
//! # Duplicates: later write wins
//!
//! Same rule as the embedded store: one row per (driver, timestamp), the later write wins.
//! Inside a batch, [`dedupe`] keeps the last occurrence in stream order (`ON CONFLICT` cannot touch
//! the same row twice in one statement). Across batches, `ON CONFLICT DO UPDATE … WHERE
//! positions.received_at < EXCLUDED.received_at`: a newer receipt replaces the row, while a
//! re-delivered entry (same `received_at`) or an older one arriving late changes nothing and
//! leaves no dead tuple. Two different batches received in the same microsecond with the same
//! (driver, timestamp) keep the first one written.

use super::schema::{days_of, Partitions};
use super::PgTs;
use crate::domain::{DriverId, Micros, Position};
use hashbrown::HashMap;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};

/// One row of `positions`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub driver_id: DriverId,
    pub ts: Micros,
    pub lat_e6: i32,
    pub lon_e6: i32,
    pub status: i16,
    pub speed_mps: Option<f32>,
    pub heading_deg: Option<f32>,
    pub accuracy_m: Option<f32>,
    pub received_at: Micros,
}

impl StoredRow {
    pub fn new(position: &Position, received_at: Micros) -> StoredRow {
        StoredRow {
            driver_id: position.driver_id.clone(),
            ts: position.timestamp,
            lat_e6: position.lat_e6,
            lon_e6: position.lon_e6,
            status: i16::from(position.status as u8),
            speed_mps: position.speed_mps,
            heading_deg: position.heading_deg,
            accuracy_m: position.accuracy_m,
            received_at,
        }
    }
}

const COLUMNS: &str =
    "driver_id, ts, lat_e6, lon_e6, status, speed_mps, heading_deg, accuracy_m, received_at";
const TYPES: [Type; 9] = [
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::INT4,
    Type::INT4,
    Type::INT2,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::TIMESTAMPTZ,
];

/// Streams `rows` into `table` with one binary `COPY`.
pub async fn copy_rows(
    client: &Transaction<'_>,
    table: &str,
    rows: &[StoredRow],
) -> Result<u64, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let sink = client
        .copy_in(&format!("COPY {table} ({COLUMNS}) FROM STDIN BINARY"))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &TYPES);
    let mut writer = std::pin::pin!(writer);
    for row in rows {
        let driver_id: &str = row.driver_id.as_str();
        writer
            .as_mut()
            .write(&[
                &driver_id,
                &PgTs(row.ts),
                &row.lat_e6,
                &row.lon_e6,
                &row.status,
                &row.speed_mps,
                &row.heading_deg,
                &row.accuracy_m,
                &PgTs(row.received_at),
            ])
            .await?;
    }
    writer.finish().await
}

/// Keeps the last row of each (driver, timestamp), in the order the rows came.
pub fn dedupe(rows: Vec<StoredRow>) -> Vec<StoredRow> {
    let keep: Vec<bool> = {
        let mut last: HashMap<(&str, Micros), usize> = HashMap::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            last.insert((row.driver_id.as_str(), row.ts), i);
        }
        if last.len() == rows.len() {
            None
        } else {
            let mut keep = vec![false; rows.len()];
            for &i in last.values() {
                keep[i] = true;
            }
            Some(keep)
        }
    }
    .unwrap_or_default();
    if keep.is_empty() {
        return rows;
    }
    rows.into_iter()
        .zip(keep)
        .filter_map(|(row, keep)| keep.then_some(row))
        .collect()
}

/// Writes batches into `positions` over its own connection.
pub struct PgWriter {
    client: Client,
    partitions: Partitions,
}

impl PgWriter {
    /// Connects and prepares the session (staging table). Run [`super::schema::migrate`] first.
    pub async fn connect(url: &str) -> anyhow::Result<PgWriter> {
        let client = super::pg_connect(url, "fleettracker-history-writer").await?;
        client
            .batch_execute(
                "CREATE TEMP TABLE IF NOT EXISTS positions_staging (
                    driver_id text COLLATE \"C\", ts timestamptz, lat_e6 integer,
                    lon_e6 integer, status smallint, speed_mps real, heading_deg real,
                    accuracy_m real, received_at timestamptz
                 ) ON COMMIT DELETE ROWS;
                 SET synchronous_commit = on",
            )
            .await?;
        Ok(PgWriter {
            client,
            partitions: Partitions::default(),
        })
    }

    /// True once the connection is gone (reconnect with [`PgWriter::connect`]).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Writes `rows` (deduplicated already, see [`dedupe`]) in one transaction; returns once
    /// committed. On error nothing was written, and the partition cache is reset.
    pub async fn write(&mut self, rows: &[StoredRow]) -> anyhow::Result<()> {
        let result = self.try_write(rows).await;
        if result.is_err() {
            self.partitions.forget();
        }
        result
    }

    async fn try_write(&mut self, rows: &[StoredRow]) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let days = days_of(rows.iter().map(|r| r.ts));
        self.partitions.ensure(&mut self.client, &days).await?;
        let tx = self.client.transaction().await?;
        copy_rows(&tx, "positions_staging", rows).await?;
        insert_from_staging(&tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_from_staging(tx: &Transaction<'_>) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        &format!(
            "INSERT INTO positions ({COLUMNS}) SELECT {COLUMNS} FROM positions_staging
             ON CONFLICT (driver_id, ts) DO UPDATE SET
                lat_e6 = EXCLUDED.lat_e6, lon_e6 = EXCLUDED.lon_e6, status = EXCLUDED.status,
                speed_mps = EXCLUDED.speed_mps, heading_deg = EXCLUDED.heading_deg,
                accuracy_m = EXCLUDED.accuracy_m, received_at = EXCLUDED.received_at
             WHERE positions.received_at < EXCLUDED.received_at"
        ),
        &[],
    )
    .await
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::domain::Status;

    fn row(id: &str, ts: Micros, lat: i32) -> StoredRow {
        let p = Position {
            driver_id: id.into(),
            lat_e6: lat,
            lon_e6: 0,
            status: Status::Online,
            timestamp: ts,
            speed_mps: None,
            heading_deg: None,
            accuracy_m: None,
        };
        StoredRow::new(&p, 0)
    }

    #[test]
    fn dedupe_keeps_the_last_write_in_order() {
        let rows = vec![
            row("a", 1, 1),
            row("b", 1, 2),
            row("a", 1, 3),
            row("a", 2, 4),
        ];
        let kept: Vec<i32> = dedupe(rows).iter().map(|r| r.lat_e6).collect();
        assert_eq!(kept, [2, 3, 4]);
    }
}
