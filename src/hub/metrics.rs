//! The hub's Prometheus series (documented with the others in [`crate::metrics`]). Handles are
//! registered once, so recording is an atomic add; every label comes from a fixed set.

use super::{CloseReason, Transport};
use crate::metrics::Metrics;
use metrics::{Counter, Gauge};

const SUBSCRIBERS: &str = "stream_subscribers";
const SENT: &str = "stream_messages_sent_total";
const DROPPED: &str = "stream_messages_dropped_total";
const CLOSED: &str = "stream_subscribers_closed_total";
const INGEST_CONNECTIONS: &str = "ingest_connections";
const INGEST_MESSAGES: &str = "ingest_messages_total";
const INGEST_CLOSED: &str = "ingest_connections_closed_total";

/// Why a message was never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Replaced by a newer message about the same driver while the subscriber lagged.
    Coalesced,
    /// Pending when the subscriber was closed.
    Closed,
    /// Pending about the old scope when a WebSocket client subscribed anew.
    Resubscribed,
}

impl DropReason {
    const ALL: [DropReason; 3] = [
        DropReason::Coalesced,
        DropReason::Closed,
        DropReason::Resubscribed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            DropReason::Coalesced => "coalesced",
            DropReason::Closed => "closed",
            DropReason::Resubscribed => "resubscribed",
        }
    }
}

/// How a device ingest message was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestResult {
    Ack,
    Error,
}

/// Reasons an ingest connection can end with (never `too_slow`: devices are not sent a feed).
const INGEST_CLOSE_REASONS: [CloseReason; 4] = [
    CloseReason::Client,
    CloseReason::Shutdown,
    CloseReason::Policy,
    CloseReason::Error,
];

#[derive(Clone)]
pub struct StreamMetrics {
    subscribers: [Gauge; 2],
    sent: [Counter; 2],
    dropped: [Counter; 3],
    closed: [Counter; 5],
    ingest_connections: Gauge,
    ingest_messages: [Counter; 2],
    ingest_closed: [Counter; 4],
}

impl StreamMetrics {
    pub fn new(m: &Metrics) -> StreamMetrics {
        describe(m);
        let per_transport =
            |name| Transport::ALL.map(|t| m.counter(name, &[("transport", t.as_str())]));
        StreamMetrics {
            subscribers: Transport::ALL.map(|t| m.gauge(SUBSCRIBERS, &[("transport", t.as_str())])),
            sent: per_transport(SENT),
            dropped: DropReason::ALL.map(|r| m.counter(DROPPED, &[("reason", r.as_str())])),
            closed: CloseReason::ALL.map(|r| m.counter(CLOSED, &[("reason", r.as_str())])),
            ingest_connections: m.gauge(INGEST_CONNECTIONS, &[]),
            ingest_messages: ["ack", "error"].map(|r| m.counter(INGEST_MESSAGES, &[("result", r)])),
            ingest_closed: INGEST_CLOSE_REASONS
                .map(|r| m.counter(INGEST_CLOSED, &[("reason", r.as_str())])),
        }
    }

    pub fn subscriber_opened(&self, transport: Transport) {
        self.subscribers[transport as usize].increment(1.0);
    }

    pub fn subscriber_gone(&self, transport: Transport) {
        self.subscribers[transport as usize].decrement(1.0);
    }

    pub fn sent(&self, transport: Transport, n: usize) {
        if n > 0 {
            self.sent[transport as usize].increment(n as u64);
        }
    }

    pub fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped[reason as usize].increment(n);
        }
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].increment(1);
    }

    pub fn ingest_opened(&self) {
        self.ingest_connections.increment(1.0);
    }

    pub fn ingest_message(&self, result: IngestResult) {
        self.ingest_messages[result as usize].increment(1);
    }

    pub fn ingest_closed(&self, reason: CloseReason) {
        self.ingest_connections.decrement(1.0);
        if let Some(i) = INGEST_CLOSE_REASONS.iter().position(|&r| r == reason) {
            self.ingest_closed[i].increment(1);
        }
    }
}

fn describe(m: &Metrics) {
    m.describe_gauge(SUBSCRIBERS, "Open stream subscriptions, by transport.");
    m.describe_counter(
        SENT,
        "Stream messages handed to subscribers' connections, by transport.",
    );
    m.describe_counter(
        DROPPED,
        "Stream messages never sent: replaced by a newer one while the subscriber lagged, pending when it was closed, or about a scope it replaced.",
    );
    m.describe_counter(CLOSED, "Stream subscriptions ended, by reason.");
    m.describe_gauge(
        INGEST_CONNECTIONS,
        "Open device ingest WebSocket connections.",
    );
    m.describe_counter(
        INGEST_MESSAGES,
        "Device ingest messages answered, by an ack or an error.",
    );
    m.describe_counter(INGEST_CLOSED, "Device ingest connections ended, by reason.");
}
