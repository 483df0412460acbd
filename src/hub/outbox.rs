//! One subscriber's outgoing messages: the hub pushes, the subscriber's writer takes.
//!
//! Ingestion must never wait for a subscriber, so a push never blocks: it takes a mutex held only
//! for a few instructions by either side, and never awaits. The outbox has three modes:
//! - **Queued**: messages in order, up to `queue` of them.
//! - **Lagging** (the queue was full): new messages go to a map of the latest message per driver
//!   instead, replacing older ones (each replaced message is counted as dropped, reason
//!   `coalesced`). The writer sends the queue first, then the whole map; once it has taken the
//!   map, new messages are queued again. Per driver, order is kept: while lagging, every message
//!   goes to the map, which is sent after everything queued before it.
//! - **Closed**: a lagging subscriber whose map holds more than `backlog` drivers, or whose writer
//!   has not taken anything for `max_lag`, is closed as too slow; pending messages are dropped
//!   (reason `closed`) and the writer is woken to say why to its client.

use super::message::Update;
use super::metrics::{DropReason, StreamMetrics};
use super::CloseReason;
use crate::domain::DriverId;
use hashbrown::HashMap;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// When a subscriber counts as too slow.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub queue: usize,
    pub backlog: usize,
    pub max_lag: Duration,
}

pub struct Outbox {
    state: Mutex<State>,
    wake: Notify,
    limits: Limits,
    metrics: StreamMetrics,
}

struct State {
    queue: VecDeque<Arc<Update>>,
    /// Latest message per driver while lagging.
    lagging: Option<HashMap<DriverId, Arc<Update>>>,
    /// When the writer last took messages (or the outbox was created).
    last_taken: Instant,
    closed: Option<CloseReason>,
}

impl Outbox {
    pub fn new(limits: Limits, metrics: StreamMetrics) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                lagging: None,
                last_taken: Instant::now(),
                closed: None,
            }),
            wake: Notify::new(),
            limits,
            metrics,
        }
    }

    /// Adds a message without ever waiting; switches to lagging or closes as described above.
    pub fn push(&self, update: Arc<Update>) {
        let mut s = self.state.lock();
        if s.closed.is_some() {
            return;
        }
        let Some(latest) = s.lagging.as_mut() else {
            if s.queue.len() < self.limits.queue {
                let was_empty = s.queue.is_empty();
                s.queue.push_back(update);
                drop(s);
                if was_empty {
                    self.wake.notify_one();
                }
            } else {
                let mut latest = HashMap::new();
                latest.insert(update.driver.clone(), update);
                s.lagging = Some(latest);
                drop(s);
                self.wake.notify_one();
            }
            return;
        };
        if latest.insert(update.driver.clone(), update).is_some() {
            self.metrics.dropped(DropReason::Coalesced, 1);
        }
        let too_many = latest.len() > self.limits.backlog;
        if too_many || s.last_taken.elapsed() > self.limits.max_lag {
            self.close_locked(&mut s, CloseReason::TooSlow);
            drop(s);
            self.wake.notify_one();
        }
    }

    /// Moves up to `max` messages, oldest first, into `out`; `Err` once closed.
    pub fn take(&self, out: &mut Vec<Arc<Update>>, max: usize) -> Result<(), CloseReason> {
        let mut s = self.state.lock();
        if let Some(reason) = s.closed {
            return Err(reason);
        }
        s.last_taken = Instant::now();
        if !s.queue.is_empty() {
            let n = s.queue.len().min(max);
            out.extend(s.queue.drain(..n));
        } else if let Some(latest) = s.lagging.take() {
            out.extend(latest.into_values());
        }
        Ok(())
    }

    /// Closes the outbox; true if this call closed it (each subscriber is counted once).
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut s = self.state.lock();
        let closed = self.close_locked(&mut s, reason);
        drop(s);
        self.wake.notify_one();
        closed
    }

    fn close_locked(&self, s: &mut State, reason: CloseReason) -> bool {
        if s.closed.is_some() {
            return false;
        }
        s.closed = Some(reason);
        let pending = s.queue.len() + s.lagging.as_ref().map_or(0, |m| m.len());
        s.queue = VecDeque::new();
        s.lagging = None;
        self.metrics.dropped(DropReason::Closed, pending as u64);
        self.metrics.closed(reason);
        true
    }

    /// Forgets everything pending (the subscription changed and a new snapshot follows).
    pub fn clear(&self) {
        let mut s = self.state.lock();
        let pending = s.queue.len() + s.lagging.as_ref().map_or(0, |m| m.len());
        self.metrics
            .dropped(DropReason::Resubscribed, pending as u64);
        s.queue.clear();
        s.lagging = None;
        s.last_taken = Instant::now();
    }

    #[cfg(test)]
    pub fn closed(&self) -> Option<CloseReason> {
        self.state.lock().closed
    }

    /// Resolves after a push into an empty queue, a switch to lagging, or a close since the last
    /// call (a wake-up that came while nobody waited is kept for the next call).
    pub async fn changed(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn update(driver: &str, n: u32) -> Arc<Update> {
        Arc::new(Update {
            driver: driver.into(),
            json: format!("{driver}:{n}").into(),
        })
    }

    fn outbox(queue: usize, backlog: usize, max_lag: Duration) -> Outbox {
        let limits = Limits {
            queue,
            backlog,
            max_lag,
        };
        Outbox::new(limits, StreamMetrics::new(&Metrics::new()))
    }

    fn texts(updates: &[Arc<Update>]) -> Vec<String> {
        let mut t: Vec<String> = updates
            .iter()
            .map(|u| String::from_utf8_lossy(&u.json).into_owned())
            .collect();
        t.sort();
        t
    }

    #[test]
    fn in_order_until_full_then_latest_per_driver() {
        let o = outbox(3, 100, Duration::from_secs(60));
        for n in 0..3 {
            o.push(update("a", n));
        }
        // Full: from now on the latest per driver, sent after the queue.
        o.push(update("a", 3));
        o.push(update("b", 0));
        o.push(update("a", 4));
        let mut out = Vec::new();
        o.take(&mut out, 2).unwrap();
        assert_eq!(texts(&out), ["a:0", "a:1"]);
        out.clear();
        o.take(&mut out, 10).unwrap();
        assert_eq!(texts(&out), ["a:2"]);
        out.clear();
        o.take(&mut out, 10).unwrap();
        assert_eq!(texts(&out), ["a:4", "b:0"]);
        // The map was taken: back to queueing.
        out.clear();
        o.push(update("c", 0));
        o.take(&mut out, 10).unwrap();
        assert_eq!(texts(&out), ["c:0"]);
    }

    #[test]
    fn too_many_pending_drivers_close_it() {
        let o = outbox(1, 2, Duration::from_secs(60));
        o.push(update("a", 0));
        o.push(update("b", 0));
        o.push(update("c", 0));
        assert_eq!(o.closed(), None);
        o.push(update("d", 0));
        assert_eq!(o.closed(), Some(CloseReason::TooSlow));
        let mut out = Vec::new();
        assert_eq!(o.take(&mut out, 10), Err(CloseReason::TooSlow));
        assert!(out.is_empty());
        // Closing again does not count again.
        assert!(!o.close(CloseReason::Client));
        assert_eq!(o.closed(), Some(CloseReason::TooSlow));
    }

    #[test]
    fn a_writer_that_stops_taking_is_closed() {
        let o = outbox(1, 100, Duration::from_millis(20));
        o.push(update("a", 0));
        o.push(update("b", 0));
        std::thread::sleep(Duration::from_millis(30));
        o.push(update("c", 0));
        assert_eq!(o.closed(), Some(CloseReason::TooSlow));
    }

    #[test]
    fn a_writer_that_keeps_taking_is_not() {
        let o = outbox(1, 100, Duration::from_millis(500));
        let mut out = Vec::new();
        for n in 0..5 {
            o.push(update("a", n));
            o.push(update("b", n));
            std::thread::sleep(Duration::from_millis(10));
            o.take(&mut out, 10).unwrap();
        }
        assert_eq!(o.closed(), None);
    }

    #[test]
    fn clear_forgets_pending_messages() {
        let o = outbox(1, 100, Duration::from_secs(60));
        o.push(update("a", 0));
        o.push(update("b", 0));
        o.clear();
        let mut out = Vec::new();
        o.take(&mut out, 10).unwrap();
        assert!(out.is_empty());
    }
}
