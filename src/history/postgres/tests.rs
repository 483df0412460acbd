//! The PostgreSQL history against real servers (testkit): Redis or a Redis Cluster, and PostgreSQL.
//! Every wait is a poll with a deadline.

use super::schema::{list_partitions, MIGRATIONS};
use super::stream::encode_entry;
use super::writer::{PgWriter, StoredRow};
use super::*;
use crate::backend::redis::{RedisConn, RedisTarget};
use crate::domain::{Micros, Position, Status};
use crate::history::key::MICROS_PER_DAY;
use crate::history::{History, TrackPage, TrackQuery};
use crate::metrics::Metrics;
use crate::wal::Batch;
use fleettracker_testkit::{Postgres, RedisCluster, RedisServer};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a condition may take before a test fails (not a sleep: the waits poll). Generous because
/// the suite runs two tests at a time on a 2-core machine beside their PostgreSQL and Redis servers:
/// once (a full run on 2026-11-30) 20 s were not enough for a worker's first commit, which takes
/// ~1 s alone.
const DEADLINE: Duration = Duration::from_secs(60);
/// 2026-01-31T00:00:00Z.
const DAY: Micros = 20_484 * MICROS_PER_DAY;
const SECOND: Micros = 1_000_000;

fn pos(driver: &str, ts: Micros, lat_e6: i32, lon_e6: i32) -> Position {
    Position {
        driver_id: driver.into(),
        lat_e6,
        lon_e6,
        status: Status::Busy,
        timestamp: ts,
        speed_mps: Some(7.5),
        heading_deg: None,
        accuracy_m: Some(4.0),
    }
}

fn batch(received_at: Micros, positions: Vec<Position>) -> Batch {
    Batch {
        received_at,
        positions,
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn standalone(redis: &RedisServer) -> RedisTarget {
    RedisTarget::parse(&redis.url(), false)
}

struct RunningWorker {
    metrics: Metrics,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    fn start(settings: WorkerSettings) -> RunningWorker {
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_worker(settings, metrics.clone(), stop.clone()));
        RunningWorker {
            metrics,
            stop,
            task,
        }
    }

    /// A counter's or gauge's value from the Prometheus text.
    fn metric(&self, name: &str) -> f64 {
        let text = self.metrics.render(None);
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    async fn stop(self) {
        self.stop.cancel();
        let stopped = tokio::time::timeout(DEADLINE, self.task).await;
        assert!(
            matches!(stopped, Ok(Ok(Ok(())))),
            "worker did not stop cleanly"
        );
    }
}

fn settings(target: RedisTarget, pg: &Postgres) -> WorkerSettings {
    let mut settings = WorkerSettings::new(target, pg.url());
    settings.block = Duration::from_millis(200);
    settings
}

async fn sql_client(pg: &Postgres) -> tokio_postgres::Client {
    pg_connect(&pg.url(), "test").await.unwrap()
}

/// (rows, distinct primary keys) in `positions`; (0, 0) when the table does not exist yet.
async fn row_counts(pg: &Postgres) -> (i64, i64) {
    let Ok(client) = pg_connect(&pg.url(), "test").await else {
        return (-1, -1);
    };
    match client
        .query_one(
            "SELECT count(*), count(DISTINCT (driver_id, ts)) FROM positions",
            &[],
        )
        .await
    {
        Ok(row) => (row.get(0), row.get(1)),
        Err(_) => (0, 0),
    }
}

/// Reads every entry of the stream as a consumer "crashed" that never acknowledges them, as a
/// worker that died after reading (and perhaps committing) would leave them: pending.
async fn read_as_crashed_consumer(conn: &mut RedisConn) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM_KEY)
        .arg(GROUP)
        .arg("0")
        .query_async(conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("crashed")
        .arg("STREAMS")
        .arg(STREAM_KEY)
        .arg(">")
        .query_async(conn)
        .await
        .unwrap();
}

async fn pending(conn: &mut RedisConn) -> i64 {
    let reply: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(STREAM_KEY)
        .arg(GROUP)
        .query_async(conn)
        .await;
    match reply {
        Ok(redis::Value::Array(items)) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

async fn all_pages(history: &PgHistory, driver: &str, limit: usize) -> Vec<TrackPage> {
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let q = TrackQuery {
            driver_id: driver.to_string(),
            from: DAY - MICROS_PER_DAY,
            to: DAY + MICROS_PER_DAY,
            limit,
            cursor: cursor.take(),
        };
        let page = history.track(&q).await.unwrap();
        cursor = page.next_cursor.clone();
        pages.push(page);
        if cursor.is_none() {
            return pages;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_pages_across_a_day_boundary_like_the_embedded_store() {
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let history = PgHistory::connect(&pg.url()).await.unwrap();
    let conn = RedisConn::connect(&standalone(&redis)).await.unwrap();
    let stream = PositionStream::new(conn, 1000, &Metrics::new());
    let worker = RunningWorker::start(settings(standalone(&redis), &pg));

    // 20 points of d1 from 23:59:50 to 00:00:09 (two days), appended concurrently in 4 tasks,
    // then 5 late (older) points of the first day; d2 interleaved.
    let mut expected: Vec<Position> = Vec::new();
    let mut appends = Vec::new();
    for task in 0..4 {
        let stream = stream.clone();
        let positions: Vec<Position> = (0..5)
            .map(|i| {
                let t = DAY - 10 * SECOND + (task * 5 + i) * SECOND;
                pos(
                    "d1",
                    t,
                    31_000_000 + (t / SECOND) as i32 % 1000,
                    121_000_000,
                )
            })
            .collect();
        expected.extend(positions.iter().cloned());
        appends.push(tokio::spawn(async move {
            for p in positions {
                let other = pos("d2", p.timestamp, 1, 1);
                stream.append(&batch(DAY, vec![p, other])).await.unwrap();
            }
        }));
    }
    for append in appends {
        append.await.unwrap();
    }
    let late: Vec<Position> = (0..5)
        .map(|i| {
            pos(
                "d1",
                DAY - 3600 * SECOND + i * SECOND,
                30_000_000,
                120_000_000,
            )
        })
        .collect();
    expected.extend(late.iter().cloned());
    stream.append(&batch(DAY + SECOND, late)).await.unwrap();

    eventually("all rows", || async { row_counts(&pg).await == (45, 45) }).await;
    let pages = all_pages(&history, "d1", 7).await;
    assert_eq!(
        pages.iter().map(|p| p.points.len()).collect::<Vec<_>>(),
        [7, 7, 7, 4]
    );
    let got: Vec<Micros> = pages
        .iter()
        .flat_map(|p| p.points.iter().map(|p| p.timestamp))
        .collect();
    let mut want: Vec<Micros> = expected.iter().map(|p| p.timestamp).collect();
    want.sort_unstable();
    assert_eq!(got, want);

    // The same positions in the embedded store give the very same pages, cursors included.
    let dir = tempfile::tempdir().unwrap();
    let embedded = History::open(dir.path()).unwrap();
    let mut all = expected.clone();
    all.extend(expected.iter().map(|p| pos("d2", p.timestamp, 1, 1)));
    embedded.append(&all).unwrap();
    let mut cursor = None;
    for page in &pages {
        let q = TrackQuery {
            driver_id: "d1".into(),
            from: DAY - MICROS_PER_DAY,
            to: DAY + MICROS_PER_DAY,
            limit: 7,
            cursor: cursor.take(),
        };
        let embedded_page = embedded.track(&q).unwrap();
        assert_eq!(&embedded_page, page);
        cursor = page.next_cursor.clone();
    }

    // Two day partitions; a foreign cursor is refused.
    let client = sql_client(&pg).await;
    let partitions: Vec<String> = list_partitions(&client)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(partitions, ["positions_20260130", "positions_20260131"]);
    let foreign = TrackQuery {
        driver_id: "d2".into(),
        from: 0,
        to: DAY * 2,
        limit: 10,
        cursor: pages[0].next_cursor.clone(),
    };
    assert!(matches!(
        history.track(&foreign).await,
        Err(PgHistoryError::BadCursor)
    ));
    assert!(history.is_ready().await);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_leave_one_row_and_the_later_write_wins() {
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let history = PgHistory::connect(&pg.url()).await.unwrap();
    let mut conn = RedisConn::connect(&standalone(&redis)).await.unwrap();
    let stream = PositionStream::new(conn.clone(), 1000, &Metrics::new());

    // A crashed worker committed these entries but never acknowledged them.
    let first = batch(
        DAY,
        vec![pos("d1", DAY, 1, 1), pos("d1", DAY + SECOND, 2, 2)],
    );
    stream.append(&first).await.unwrap();
    stream.append(&first).await.unwrap(); // the same position appended twice
    read_as_crashed_consumer(&mut conn).await;
    let mut writer = PgWriter::connect(&pg.url()).await.unwrap();
    let rows: Vec<StoredRow> = first
        .positions
        .iter()
        .map(|p| StoredRow::new(p, DAY))
        .collect();
    writer.write(&rows).await.unwrap();

    // Reclaimed and written again; plus a duplicate inside one batch, and a later correction.
    let mut settings = settings(standalone(&redis), &pg);
    settings.claim_idle = Duration::from_millis(300);
    let worker = RunningWorker::start(settings);
    let inside = batch(DAY, vec![pos("d1", DAY + 2 * SECOND, 3, 3); 3]);
    stream.append(&inside).await.unwrap();
    eventually("reclaimed and written", || async {
        pending(&mut conn.clone()).await == 0 && row_counts(&pg).await == (3, 3)
    })
    .await;
    let correction = batch(DAY + 10 * SECOND, vec![pos("d1", DAY, 9, 9)]);
    stream.append(&correction).await.unwrap();
    let q = TrackQuery {
        driver_id: "d1".into(),
        from: DAY,
        to: DAY,
        limit: 10,
        cursor: None,
    };
    eventually("the correction", || async {
        history.track(&q).await.unwrap().points[0].lat_e6 == 9
    })
    .await;
    // An older receipt of the same key (a stale retry) does not undo the correction.
    stream.append(&first).await.unwrap();
    eventually("stale entry acknowledged", || async {
        pending(&mut conn.clone()).await == 0 && worker.metric("history_stream_lag_entries") == 0.0
    })
    .await;
    assert_eq!(history.track(&q).await.unwrap().points[0].lat_e6, 9);
    assert_eq!(row_counts(&pg).await, (3, 3));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_crashed_consumer_are_reclaimed() {
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let mut conn = RedisConn::connect(&standalone(&redis)).await.unwrap();
    let stream = PositionStream::new(conn.clone(), 1000, &Metrics::new());
    for i in 0..20 {
        let b = batch(DAY, vec![pos(&format!("d{i}"), DAY + i * SECOND, 5, 5)]);
        stream.append(&b).await.unwrap();
    }
    // Garbage in the stream too: it must not wedge the pipeline.
    let _: String = redis::cmd("XADD")
        .arg(STREAM_KEY)
        .arg("*")
        .arg(FIELD)
        .arg(b"\x01\xff\xff\xff\xff junk".as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();
    read_as_crashed_consumer(&mut conn).await;
    assert!(pending(&mut conn).await >= 2);

    let mut settings = settings(standalone(&redis), &pg);
    settings.claim_idle = Duration::from_millis(500);
    let worker = RunningWorker::start(settings);
    eventually("reclaimed entries committed", || async {
        pending(&mut conn.clone()).await == 0 && row_counts(&pg).await == (20, 20)
    })
    .await;
    assert_eq!(worker.metric("history_worker_undecodable_total"), 1.0);
    let dead: i64 = redis::cmd("XLEN")
        .arg(DEAD_LETTER_KEY)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead, 1);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_wait_in_the_stream_while_postgres_is_down() {
    let redis = RedisServer::start();
    let mut pg = Postgres::start();
    let conn = RedisConn::connect(&standalone(&redis)).await.unwrap();
    let stream = PositionStream::new(conn, 100_000, &Metrics::new());
    let worker = RunningWorker::start(settings(standalone(&redis), &pg));
    let mut appended = 0;
    let mut append = |n: i64| {
        let start = appended;
        appended += n;
        let stream = stream.clone();
        async move {
            for i in start..start + n {
                let p = pos(&format!("d{}", i % 7), DAY + i * SECOND, 1, 1);
                stream.append(&batch(DAY, vec![p])).await.unwrap();
            }
        }
    };
    append(50).await;
    eventually("first rows", || async { row_counts(&pg).await == (50, 50) }).await;

    pg.stop();
    append(200).await; // acknowledged: they are in Redis
    eventually("errors and lag", || async {
        worker.metric("history_worker_errors_total") > 0.0
            && worker.metric("history_stream_lag_entries") > 0.0
    })
    .await;
    append(100).await;
    pg.resume();
    eventually("every acknowledged position exactly once", || async {
        row_counts(&pg).await == (350, 350)
    })
    .await;
    eventually("lag back to zero", || async {
        worker.metric("history_stream_lag_entries") == 0.0
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_simplifies_then_drops_whole_partitions() {
    let pg = Postgres::start();
    let history = PgHistory::connect(&pg.url()).await.unwrap();
    let mut writer = PgWriter::connect(&pg.url()).await.unwrap();
    let now = DAY + 12 * 3600 * SECOND;
    let old = DAY - 100 * MICROS_PER_DAY; // older than cold (90 d): dropped
    let warm = DAY - 40 * MICROS_PER_DAY; // older than hot (30 d): simplified
    let fresh = DAY; // kept as is
    let mut rows = Vec::new();
    for day in [old, warm, fresh] {
        // d1: a straight line (collapses to its ends); d2: a right angle (keeps its corner).
        for i in 0..100 {
            let t = day + 3600 * SECOND + i * 10 * SECOND;
            let p = pos("d1", t, 31_000_000 + i as i32 * 100, 121_000_000);
            rows.push(StoredRow::new(&p, now));
            let (lat, lon) = if i <= 50 {
                (31_000_000 + i as i32 * 100, 121_000_000)
            } else {
                (31_005_000, 121_000_000 + (i as i32 - 50) * 100)
            };
            rows.push(StoredRow::new(&pos("d2", t, lat, lon), now));
        }
    }
    writer.write(&rows).await.unwrap();

    let hot = Duration::from_secs(30 * 86_400);
    let cold = Duration::from_secs(90 * 86_400);
    let summary = history.apply_retention(hot, cold, 5.0, now).await.unwrap();
    assert_eq!(summary.partitions_dropped, 1);
    assert_eq!(summary.partitions_simplified, 1);
    assert_eq!((summary.rows_before, summary.rows_after), (200, 5));
    let client = sql_client(&pg).await;
    let partitions: Vec<(String, bool)> = list_partitions(&client)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.cold))
        .collect();
    assert_eq!(
        partitions,
        [
            ("positions_20251222_cold".to_string(), true),
            ("positions_20260131".to_string(), false)
        ]
    );
    let orphans: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'positions_2025%' AND relkind = 'r' \
             AND relname <> 'positions_20251222_cold'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "old partitions are dropped, not left detached");

    let track = |driver: &str| TrackQuery {
        driver_id: driver.into(),
        from: warm,
        to: warm + MICROS_PER_DAY - 1,
        limit: 1000,
        cursor: None,
    };
    let d1 = history.track(&track("d1")).await.unwrap().points;
    assert_eq!(
        d1.iter().map(|p| p.timestamp).collect::<Vec<_>>(),
        [warm + 3600 * SECOND, warm + 3600 * SECOND + 990 * SECOND]
    );
    assert_eq!(history.track(&track("d2")).await.unwrap().points.len(), 3);
    let fresh_rows = history
        .track(&TrackQuery {
            from: fresh,
            to: fresh + MICROS_PER_DAY - 1,
            ..track("d1")
        })
        .await
        .unwrap();
    assert_eq!(fresh_rows.points.len(), 100);

    // Again: nothing to do. A late point still lands in the cold day.
    let again = history.apply_retention(hot, cold, 5.0, now).await.unwrap();
    assert_eq!(again, RetentionSummary::default());
    let late = StoredRow::new(&pos("d3", warm + SECOND, 1, 1), now);
    writer.write(&[late]).await.unwrap();
    assert_eq!(history.track(&track("d3")).await.unwrap().points.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_to_race() {
    let pg = Postgres::start();
    let url = pg.url();
    let (a, b) = tokio::join!(PgHistory::connect(&url), PgHistory::connect(&url));
    a.unwrap();
    b.unwrap();
    PgHistory::connect(&pg.url()).await.unwrap();
    let client = sql_client(&pg).await;
    let versions: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, MIGRATIONS.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_works_in_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let pg = Postgres::start();
    let target = RedisTarget {
        urls: cluster.urls(),
        cluster: true,
    };
    let history = PgHistory::connect(&pg.url()).await.unwrap();
    let conn = RedisConn::connect(&target).await.unwrap();
    let stream = PositionStream::new(conn, 1000, &Metrics::new());
    let worker = RunningWorker::start(settings(target, &pg));
    let positions: Vec<Position> = (0..1000)
        .map(|i| pos(&format!("d{}", i % 10), DAY + i * SECOND, 1, 1))
        .collect();
    for chunk in positions.chunks(100) {
        stream.append(&batch(DAY, chunk.to_vec())).await.unwrap();
    }
    eventually("all rows", || async {
        row_counts(&pg).await == (1000, 1000)
    })
    .await;
    let pages = all_pages(&history, "d3", 40).await;
    assert_eq!(pages.iter().map(|p| p.points.len()).sum::<usize>(), 100);
    eventually("lag zero", || async {
        worker.metric("history_stream_lag_entries") == 0.0
    })
    .await;
    worker.stop().await;
}

#[test]
fn entries_round_trip_and_garbage_is_refused() {
    let batches = vec![
        batch(1, vec![pos("a", 2, 3, 4)]),
        batch(5, vec![pos("b", 6, 7, 8), pos("c", 9, 10, 11)]),
    ];
    let entry = encode_entry(&batches);
    let decoded = stream::decode_entry(&entry).unwrap();
    assert_eq!(decoded.len(), 2);
    assert_eq!(decoded[1].positions, batches[1].positions);
    assert!(stream::decode_entry(&[]).is_err());
    assert!(stream::decode_entry(&[2]).is_err());
    assert!(stream::decode_entry(&entry[..entry.len() - 1]).is_err());
    assert!(stream::decode_entry(b"\x01\xff\xff\xff\xff junk").is_err());
}
