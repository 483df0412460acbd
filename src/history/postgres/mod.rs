//! History in PostgreSQL (`--history-store postgres`): the scale-out alternative to the embedded
//! fjall store, for when several server instances share one history.
//!
//! # Data flow
//!
//! ```text
//! server write path ──PositionStream::append──▶ Redis Stream `positions:stream` (MAXLEN ~)
//!                                                   │  consumer group `history-writers`
//!                                                   ▼
//!                           worker (`fleettracker worker`, or `serve --embedded-worker`)
//!                            XREADGROUP / XAUTOCLAIM → decode → COPY into staging
//!                            → INSERT … ON CONFLICT into `positions` (partitioned by day)
//!                            → COMMIT → XACK
//!                                                   │
//! GET /v1/drivers/{id}/track ◀──PgHistory::track────┘
//! ```
//!
//! Why a stream between the server and PostgreSQL rather than writing from the request path: an
//! accepted position must be acknowledged in about a millisecond, PostgreSQL writes are efficient
//! only in large batches (`COPY`), and PostgreSQL may be down for maintenance. Redis takes the
//! append at once (one `XADD` per group of concurrent requests, [`stream`]); the worker turns many
//! entries into one transaction ([`writer`]); an outage of PostgreSQL only makes the stream longer
//! ([`worker`]). The consumer group gives at-least-once delivery (acknowledge after commit, reclaim
//! what a crashed worker left), and the table's primary key `(driver_id, ts)` turns that into
//! exactly-once rows.
//!
//! One concept per file: [`stream`] (producer), [`schema`] (migrations, day partitions,
//! retention), [`writer`] (one batch into PostgreSQL with `COPY`), [`worker`] (the consumer loop),
//! [`query`] (tracks read back).

pub mod exporter;
pub mod query;
pub mod schema;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod worker;
pub mod writer;

pub use query::{PgHistory, PgHistoryError};
pub use schema::RetentionSummary;
pub use stream::{PositionStream, DEFAULT_STREAM_MAX_LEN};
pub use worker::{run_worker, RetentionSettings, WorkerSettings};

use crate::domain::Micros;
use anyhow::Context;
use bytes::{BufMut, BytesMut};
use std::time::Duration;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls};

/// The Redis Stream every accepted position goes through (one key, so it works in a cluster too).
pub const STREAM_KEY: &str = "positions:stream";
/// Entries the worker could not decode are moved here (see [`worker`]).
pub const DEAD_LETTER_KEY: &str = "positions:stream:dead";
/// The consumer group of the history writers.
pub const GROUP: &str = "history-writers";
/// The field of a stream entry that holds the encoded batches.
pub const FIELD: &str = "d";

/// How long connecting to PostgreSQL may take before it counts as a failure.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens one PostgreSQL connection and drives it on a background task. `application_name` shows
/// up in `pg_stat_activity`.
pub(crate) async fn pg_connect(url: &str, application_name: &str) -> anyhow::Result<Client> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .with_context(|| "invalid --postgres-url".to_string())?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(PG_CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    config.keepalives(true);
    let (client, connection) = config
        .connect(NoTls)
        .await
        .context("cannot connect to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01T00:00:00Z).
const PG_EPOCH_OFFSET: Micros = 946_684_800_000_000;
/// PostgreSQL's first valid `timestamptz` (4714-11-24 BC) and the first past its last (294277 AD),
/// in its own µs since 2000 (`MIN_TIMESTAMP`, `END_TIMESTAMP` in its sources).
const PG_MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
const PG_END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;

/// A `timestamptz` as the service's [`Micros`], sent and read in PostgreSQL's binary form (µs
/// since 2000-01-01) without a detour through a calendar type: exact, never out of range, and
/// cheap in a `COPY` of a hundred thousand rows. Values beyond PostgreSQL's range saturate to its
/// ±infinity, which still compare correctly in range queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PgTs(pub Micros);

impl ToSql for PgTs {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let pg = self.0.saturating_sub(PG_EPOCH_OFFSET);
        // Outside PostgreSQL's range a value would be refused: send ±infinity instead.
        let pg = if pg >= PG_END_TIMESTAMP {
            i64::MAX
        } else if pg < PG_MIN_TIMESTAMP {
            i64::MIN
        } else {
            pg
        };
        out.put_i64(pg);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for PgTs {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<PgTs, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "timestamptz is not 8 bytes")?;
        Ok(PgTs(
            i64::from_be_bytes(bytes).saturating_add(PG_EPOCH_OFFSET),
        ))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}
