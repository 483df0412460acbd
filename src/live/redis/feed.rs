//! Cross-instance streams over Redis Pub/Sub: one channel per area cell.
//!
//! An instance that applies a position publishes it on `positions:<geohash-4>` (cells of about
//! 39 × 20 km) with [`AreaFeed::publish`]; removals (offline, expired) go the same way with
//! [`AreaFeed::publish_removed`]. Every other instance's subscriber ([`AreaFeed::spawn_subscriber`])
//! receives them and feeds its local stream hub, so a WebSocket/SSE client on instance B sees
//! drivers reported to instance A.
//!
//! - **Batched**: publishing only queues; one task per feed takes everything queued, packs it into
//!   one message per channel (`PUBLISH` per channel, written back to back on the multiplexed
//!   connection), and repeats. A 1,000-position request costs a handful of `PUBLISH`es, a single
//!   position a share of one.
//! - **Fire-and-forget**: Pub/Sub has no delivery guarantee anyway (a subscriber that is
//!   disconnected misses messages; stream clients get a fresh snapshot from the live store when
//!   they resubscribe), so failures are counted (`redis_errors_total{op="publish"}`), never
//!   retried, and a full queue drops instead of slowing requests down.
//! - **Payload**: `version u8 (1) | instance id u64 LE | (kind u8 | position)*` with the WAL's
//!   compact position codec ([`crate::wal::codec`]); kind 0 = position, 1 = removed offline,
//!   2 = removed expired, 3 = left area. The instance id lets a subscriber skip its own messages
//!   (its hub already had them).
//! - **Pattern subscription**: each subscriber `PSUBSCRIBE`s `positions:*`, so every instance
//!   receives every area's updates. That is fine up to a handful of instances at the ingest rates
//!   this service targets; the per-area channel names allow subscribing to only the cells that have
//!   local stream subscribers later, without changing publishers. In a cluster, classic Pub/Sub
//!   messages are broadcast to every node, so the subscriber connects to any one node (the first
//!   that answers) and publishers publish through any node.
//! - **Outages**: the subscriber pings its connection every few seconds and, when it breaks,
//!   reconnects (trying each configured node in turn, with backoff) and subscribes again.

use super::geohash;
use super::{Op, RedisMetrics, RedisTarget};
use crate::backend::redis::{RedisConn, CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use crate::domain::Position;
use crate::hub::RemovedReason;
use crate::metrics::Metrics;
use crate::wal::codec::{decode_position, encode_position};
use futures_util::future::join_all;
use futures_util::StreamExt;
use redis::Value;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Channel name prefix; the pattern subscribers use is `positions:*`.
pub const CHANNEL_PREFIX: &str = "positions:";
const VERSION: u8 = 1;
/// Calls to `publish` that may wait for the publisher task before new ones are dropped.
const QUEUE: usize = 8192;
/// Entries taken from the queue for one round of `PUBLISH`es.
const MAX_ROUND: usize = 16_384;
const PING_EVERY: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a subscriber hands its sink.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedEvent {
    /// A position another instance applied.
    Position(Position),
    /// A driver another instance saw go offline or expire.
    Removed {
        position: Position,
        reason: RemovedReason,
    },
}

fn kind_of(reason: Option<RemovedReason>) -> u8 {
    match reason {
        None => 0,
        Some(RemovedReason::Offline) => 1,
        Some(RemovedReason::Expired) => 2,
        Some(RemovedReason::LeftArea) => 3,
    }
}

/// The channel of a position's area cell.
pub fn channel_of(p: &Position) -> String {
    let cell = geohash::encode(p.lat_e6, p.lon_e6, geohash::CHANNEL_PRECISION);
    format!("{CHANNEL_PREFIX}{cell}")
}

/// Decodes one message; `None` for one this instance published or one that is not ours.
pub fn decode(payload: &[u8], own_instance_id: u64) -> Option<Vec<FeedEvent>> {
    let (&version, rest) = payload.split_first()?;
    if version != VERSION || rest.len() < 8 {
        return None;
    }
    let (instance, mut rest) = rest.split_at(8);
    if u64::from_le_bytes(instance.try_into().ok()?) == own_instance_id {
        return None;
    }
    let mut events = Vec::new();
    while let Some((&kind, after)) = rest.split_first() {
        let (position, after) = decode_position(after).ok()?;
        rest = after;
        events.push(match kind {
            0 => FeedEvent::Position(position),
            1 => FeedEvent::Removed {
                position,
                reason: RemovedReason::Offline,
            },
            2 => FeedEvent::Removed {
                position,
                reason: RemovedReason::Expired,
            },
            3 => FeedEvent::Removed {
                position,
                reason: RemovedReason::LeftArea,
            },
            _ => return None,
        });
    }
    Some(events)
}

type Entry = (Option<RemovedReason>, Position);

/// Publishes this instance's updates on the area channels.
#[derive(Clone)]
pub struct AreaFeed {
    queue: mpsc::Sender<Vec<Entry>>,
    metrics: RedisMetrics,
    instance_id: u64,
}

impl AreaFeed {
    /// A feed publishing through `conn` (see [`super::RedisLive::conn`]) as `instance_id`.
    pub fn new(conn: RedisConn, instance_id: u64, metrics: &Metrics) -> AreaFeed {
        let metrics = RedisMetrics::new(metrics);
        let (queue, entries) = mpsc::channel(QUEUE);
        tokio::spawn(publisher(conn, instance_id, metrics.clone(), entries));
        AreaFeed {
            queue,
            metrics,
            instance_id,
        }
    }

    /// The id this instance publishes under (its subscriber skips these messages).
    pub fn instance_id(&self) -> u64 {
        self.instance_id
    }

    fn enqueue(&self, entries: Vec<Entry>) {
        if !entries.is_empty() && self.queue.try_send(entries).is_err() {
            self.metrics.error(Op::Publish);
        }
    }

    /// Publishes applied positions (fire-and-forget).
    pub fn publish(&self, positions: &[Position]) {
        self.enqueue(positions.iter().map(|p| (None, p.clone())).collect());
    }

    /// Publishes drivers that went offline or expired (fire-and-forget).
    pub fn publish_removed(&self, removed: &[(Position, RemovedReason)]) {
        self.enqueue(removed.iter().map(|(p, r)| (Some(*r), p.clone())).collect());
    }

    /// Starts a subscriber: a dedicated Pub/Sub connection on `positions:*` that hands every
    /// event published by another instance to `sink`, until `shutdown`.
    pub fn spawn_subscriber(
        target: &RedisTarget,
        own_instance_id: u64,
        metrics: &Metrics,
        sink: impl Fn(FeedEvent) + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let urls = target.urls.clone();
        let metrics = RedisMetrics::new(metrics);
        tokio::spawn(subscriber(urls, own_instance_id, metrics, sink, shutdown))
    }
}

async fn publisher(
    conn: RedisConn,
    instance_id: u64,
    metrics: RedisMetrics,
    mut queue: mpsc::Receiver<Vec<Entry>>,
) {
    while let Some(first) = queue.recv().await {
        let mut messages: HashMap<String, Vec<u8>> = HashMap::new();
        let mut taken = 0;
        let mut next = Some(first);
        while let Some(entries) = next.take() {
            taken += entries.len();
            for (reason, p) in entries {
                let payload = messages.entry(channel_of(&p)).or_insert_with(|| {
                    let mut m = Vec::with_capacity(64);
                    m.push(VERSION);
                    m.extend_from_slice(&instance_id.to_le_bytes());
                    m
                });
                payload.push(kind_of(reason));
                encode_position(&p, payload);
            }
            if taken < MAX_ROUND {
                next = queue.try_recv().ok();
            }
        }
        let sends = messages.into_iter().map(|(channel, payload)| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(payload)
                    .query_async::<Value>(&mut conn)
                    .await
            }
        });
        for result in join_all(sends).await {
            if result.is_err() {
                metrics.error(Op::Publish);
            }
        }
    }
}

async fn subscriber(
    urls: Vec<String>,
    own_instance_id: u64,
    metrics: RedisMetrics,
    sink: impl Fn(FeedEvent) + Send + Sync + 'static,
    shutdown: CancellationToken,
) {
    if urls.is_empty() {
        return;
    }
    let mut attempt = 0usize;
    let mut backoff = Duration::from_millis(100);
    loop {
        let url = &urls[attempt % urls.len()];
        let connect = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(format!("{CHANNEL_PREFIX}*")).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => r,
        };
        match connected {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                let (mut control, mut messages) = pubsub.split();
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        msg = messages.next() => match msg {
                            Some(msg) => {
                                for event in decode(msg.get_payload_bytes(), own_instance_id)
                                    .unwrap_or_default()
                                {
                                    sink(event);
                                }
                            }
                            None => break,
                        },
                        _ = ping.tick() => {
                            let pong =
                                tokio::time::timeout(RESPONSE_TIMEOUT, control.ping::<Value>()).await;
                            if !matches!(pong, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                // The connection broke: count it, then reconnect.
                metrics.error(Op::Subscribe);
            }
            _ => {
                metrics.error(Op::Subscribe);
                attempt += 1;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;

    fn position(id: &str) -> Position {
        Position {
            driver_id: id.into(),
            lat_e6: 31_230_400,
            lon_e6: 121_473_700,
            status: Status::Online,
            timestamp: 1_700_000_000_000_000,
            speed_mps: Some(3.5),
            heading_deg: None,
            accuracy_m: Some(4.0),
        }
    }

    #[test]
    fn payload_round_trip_skips_own_messages() {
        let mut m = vec![VERSION];
        m.extend_from_slice(&7u64.to_le_bytes());
        m.push(0);
        encode_position(&position("a"), &mut m);
        m.push(2);
        encode_position(&position("b"), &mut m);
        let events = decode(&m, 8).unwrap();
        assert_eq!(events[0], FeedEvent::Position(position("a")));
        assert_eq!(
            events[1],
            FeedEvent::Removed {
                position: position("b"),
                reason: RemovedReason::Expired
            }
        );
        assert!(decode(&m, 7).is_none());
        assert!(decode(&m[..m.len() - 1], 8).is_none());
        assert_eq!(channel_of(&position("a")), "positions:wtw3");
    }
}
