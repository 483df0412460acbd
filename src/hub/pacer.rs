//! `min_interval_ms`: each driver sent at most once per interval, the rest coalesced to its latest
//! message, which goes out when the interval has passed. Runs in the subscriber's own task, after
//! the outbox, so it costs the ingest path nothing.

use super::message::Update;
use crate::domain::DriverId;
use hashbrown::HashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Pacer {
    interval: Duration,
    /// When each driver was last sent (pruned once older than the interval).
    last_sent: HashMap<DriverId, Instant>,
    /// The latest message of each driver sent too recently, and when it becomes due.
    held: HashMap<DriverId, Arc<Update>>,
    due: BinaryHeap<Reverse<(Instant, DriverId)>>,
}

impl Pacer {
    pub fn new(interval: Duration) -> Pacer {
        Pacer {
            interval,
            last_sent: HashMap::new(),
            held: HashMap::new(),
            due: BinaryHeap::new(),
        }
    }

    /// The message if it may go now, else `None` (held, replacing an older held one).
    pub fn admit(&mut self, update: Arc<Update>, now: Instant) -> Option<Arc<Update>> {
        if self.interval.is_zero() {
            return Some(update);
        }
        if let Some(held) = self.held.get_mut(&update.driver) {
            *held = update;
            return None;
        }
        match self.last_sent.get(&update.driver) {
            Some(&at) if now < at + self.interval => {
                self.due
                    .push(Reverse((at + self.interval, update.driver.clone())));
                self.held.insert(update.driver.clone(), update);
                None
            }
            _ => {
                self.sent(&update.driver, now);
                Some(update)
            }
        }
    }

    /// Records that a driver was just sent (snapshots count too).
    pub fn sent(&mut self, driver: &DriverId, now: Instant) {
        if !self.interval.is_zero() {
            self.last_sent.insert(driver.clone(), now);
        }
    }

    /// Moves every held message that has come due into `out`.
    pub fn release(&mut self, now: Instant, out: &mut Vec<Arc<Update>>) {
        while let Some(Reverse((at, _))) = self.due.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, driver))) = self.due.pop() else {
                break;
            };
            if let Some(update) = self.held.remove(&driver) {
                self.last_sent.insert(driver, now);
                out.push(update);
            }
        }
        if self.last_sent.len() > 2 * self.held.len() + 1024 {
            let interval = self.interval;
            self.last_sent.retain(|_, at| now < *at + interval);
        }
    }

    /// When the next held message comes due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    /// Forgets everything (the subscription changed).
    pub fn reset(&mut self, interval: Duration) {
        *self = Pacer::new(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(driver: &str, n: u32) -> Arc<Update> {
        Arc::new(Update {
            driver: driver.into(),
            json: format!("{n}").into(),
        })
    }

    fn text(u: &Arc<Update>) -> String {
        String::from_utf8_lossy(&u.json).into_owned()
    }

    #[test]
    fn zero_interval_sends_everything() {
        let mut p = Pacer::new(Duration::ZERO);
        let now = Instant::now();
        for n in 0..5 {
            assert!(p.admit(update("a", n), now).is_some());
        }
        assert_eq!(p.next_due(), None);
    }

    #[test]
    fn one_per_interval_per_driver_and_the_last_one_wins() {
        let mut p = Pacer::new(Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(text(&p.admit(update("a", 0), t0).unwrap()), "0");
        assert!(
            p.admit(update("b", 0), t0).is_some(),
            "drivers are paced apart"
        );
        for n in 1..10 {
            assert!(p
                .admit(update("a", n), t0 + Duration::from_millis(n as u64))
                .is_none());
        }
        assert_eq!(p.next_due(), Some(t0 + Duration::from_millis(100)));
        let mut out = Vec::new();
        p.release(t0 + Duration::from_millis(99), &mut out);
        assert!(out.is_empty());
        p.release(t0 + Duration::from_millis(100), &mut out);
        assert_eq!(out.iter().map(text).collect::<Vec<_>>(), ["9"]);
        assert_eq!(p.next_due(), None);
        // Sent at 100 ms: the next one waits until 200 ms.
        assert!(p
            .admit(update("a", 10), t0 + Duration::from_millis(150))
            .is_none());
        out.clear();
        p.release(t0 + Duration::from_millis(200), &mut out);
        assert_eq!(out.iter().map(text).collect::<Vec<_>>(), ["10"]);
    }

    #[test]
    fn snapshot_sends_count() {
        let mut p = Pacer::new(Duration::from_secs(1));
        let t0 = Instant::now();
        p.sent(&"a".into(), t0);
        assert!(p.admit(update("a", 1), t0).is_none());
        assert!(p
            .admit(update("a", 2), t0 + Duration::from_secs(2))
            .is_none());
        let mut out = Vec::new();
        p.release(t0 + Duration::from_secs(2), &mut out);
        assert_eq!(out.iter().map(text).collect::<Vec<_>>(), ["2"]);
    }
}
