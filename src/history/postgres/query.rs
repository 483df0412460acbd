//! [`PgHistory`]: tracks read back from PostgreSQL, with the same page semantics and the same
//! response as the embedded store ([`crate::history::History::track`]).
//!
//! A track is one index range scan: `WHERE driver_id = $1 AND ts BETWEEN $2 AND $3 ORDER BY ts
//! LIMIT n+1` on the primary key `(driver_id, ts)`, which PostgreSQL prunes to the day partitions
//! the range covers. The extra row says whether a next page exists. The cursor is the embedded
//! store's ([`crate::history::key::encode_cursor`]): the timestamp after the page's last point,
//! bound to the driver by a check value, so a cursor from another driver or a typo is refused
//! ([`PgHistoryError::BadCursor`], which the API answers as 422 `cursor`) and a cursor stays
//! valid when an operator switches `--history-store`.
//!
//! One connection per instance: tokio-postgres pipelines concurrent queries on it. After an
//! outage (PostgreSQL restarted, network cut) the dead connection is noticed and the next call
//! reconnects, so the service recovers without a restart; calls made while PostgreSQL is down fail
//! with [`PgHistoryError::Database`] (503 upstream).

use super::schema::{self, RetentionSummary};
use super::{pg_connect, PgTs};
use crate::domain::{Micros, Status};
use crate::history::key::decode_cursor;
use crate::history::{TrackPage, TrackPoint, TrackQuery, MAX_TRACK_LIMIT};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, Statement};

const TRACK_SQL: &str = "SELECT ts, lat_e6, lon_e6, status, speed_mps, heading_deg \
     FROM positions WHERE driver_id = $1 AND ts >= $2 AND ts <= $3 ORDER BY ts LIMIT $4";
/// How long a readiness probe waits for PostgreSQL.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PgHistoryError {
    #[error("the cursor was not issued for this track")]
    BadCursor,
    #[error("history database unavailable: {0}")]
    Database(String),
}

impl From<tokio_postgres::Error> for PgHistoryError {
    fn from(error: tokio_postgres::Error) -> PgHistoryError {
        PgHistoryError::Database(error.to_string())
    }
}

/// The query side of the PostgreSQL history. `Send + Sync`; share it in an `Arc`.
pub struct PgHistory {
    url: String,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

struct Conn {
    client: Client,
    track: Statement,
}

impl PgHistory {
    /// Connects and runs the migrations (PostgreSQL must be reachable now).
    pub async fn connect(url: &str) -> anyhow::Result<PgHistory> {
        let mut client = pg_connect(url, "fleettracker-history").await?;
        schema::migrate(&mut client).await?;
        let track = client.prepare(TRACK_SQL).await?;
        Ok(PgHistory {
            url: url.to_string(),
            conn: tokio::sync::Mutex::new(Some(Arc::new(Conn { client, track }))),
        })
    }

    /// The live connection, reconnecting when the last one died.
    async fn conn(&self) -> Result<Arc<Conn>, PgHistoryError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(conn.clone());
        }
        *slot = None;
        let client = pg_connect(&self.url, "fleettracker-history")
            .await
            .map_err(|e| PgHistoryError::Database(format!("{e:#}")))?;
        let track = client.prepare(TRACK_SQL).await?;
        let conn = Arc::new(Conn { client, track });
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// One page of a driver's track, in time order (see the module docs).
    pub async fn track(&self, q: &TrackQuery) -> Result<TrackPage, PgHistoryError> {
        let limit = q.limit.clamp(1, MAX_TRACK_LIMIT);
        let from = match &q.cursor {
            Some(cursor) => decode_cursor(&q.driver_id, cursor)
                .map_err(|_| PgHistoryError::BadCursor)?
                .max(q.from),
            None => q.from,
        };
        if from > q.to {
            return Ok(TrackPage {
                points: Vec::new(),
                next_cursor: None,
            });
        }
        let conn = self.conn().await?;
        let rows = conn
            .client
            .query(
                &conn.track,
                &[
                    &q.driver_id.as_str(),
                    &PgTs(from),
                    &PgTs(q.to),
                    &(limit as i64 + 1),
                ],
            )
            .await?;
        let points: Vec<TrackPoint> = rows
            .iter()
            .map(|row| TrackPoint {
                timestamp: row.get::<_, PgTs>(0).0,
                lat_e6: row.get(1),
                lon_e6: row.get(2),
                status: Status::from_index(u8::try_from(row.get::<_, i16>(3)).unwrap_or(2)),
                speed_mps: row.get(4),
                heading_deg: row.get(5),
            })
            .collect();
        Ok(TrackPage::of_overfetched(&q.driver_id, points, limit))
    }

    /// True when PostgreSQL answers a trivial query within a second (readiness).
    pub async fn is_ready(&self) -> bool {
        let probe = async {
            let conn = self.conn().await.ok()?;
            conn.client.simple_query("SELECT 1").await.ok()
        };
        matches!(
            tokio::time::timeout(READY_TIMEOUT, probe).await,
            Ok(Some(_))
        )
    }

    /// Runs retention once (see [`schema`]) over a connection of its own, so a long rewrite never
    /// holds up track queries.
    pub async fn apply_retention(
        &self,
        hot: Duration,
        cold: Duration,
        cold_simplify_m: f64,
        now: Micros,
    ) -> anyhow::Result<RetentionSummary> {
        let mut client = pg_connect(&self.url, "fleettracker-history-retention").await?;
        schema::apply_retention(&mut client, hot, cold, cold_simplify_m, now).await
    }
}
