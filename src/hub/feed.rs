//! A subscription as its transport (WebSocket or SSE) sees it: a snapshot to send first, then
//! batches of ready messages in order, until it ends with a [`CloseReason`]. The transport only
//! moves bytes; everything about what to send and when lives here and in the hub.
//!
//! Opening a feed registers it with the hub *before* reading the snapshot, so no update can fall
//! between the two (see the hub's module docs on ordering).

use super::message::{self, Update};
use super::outbox::Outbox;
use super::pacer::Pacer;
use super::{Area, CloseReason, Hub, Scope, StreamRequest, SubId, Transport};
use crate::domain::Position;
use crate::tracker::{Tracker, TrackerError};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a feed could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The service is draining (or not ready yet).
    NotAccepting,
    /// The live store could not be read for the snapshot (a shared store's outage).
    StoreUnavailable,
}

pub struct Feed {
    tracker: Arc<Tracker>,
    hub: Arc<Hub>,
    id: SubId,
    generation: u32,
    transport: Transport,
    outbox: Arc<Outbox>,
    pacer: Pacer,
    closing: CancellationToken,
    taken: Vec<Arc<Update>>,
}

impl Feed {
    /// Registers a subscription and returns it with its snapshot messages, to be sent before
    /// anything [`Feed::ready`] gives.
    pub async fn open(
        tracker: &Arc<Tracker>,
        request: StreamRequest,
        transport: Transport,
    ) -> Result<(Feed, Vec<Bytes>), Refused> {
        let hub = tracker.hub().clone();
        if !hub.is_accepting() {
            return Err(Refused::NotAccepting);
        }
        hub.metrics().subscriber_opened(transport);
        let mut feed = Feed {
            tracker: tracker.clone(),
            id: hub.next_id(),
            generation: 0,
            transport,
            outbox: hub.new_outbox(),
            pacer: Pacer::new(request.min_interval),
            closing: hub.closing(),
            taken: Vec::new(),
            hub,
        };
        let snapshot = feed.subscribe(request).await?;
        Ok((feed, snapshot))
    }

    /// Replaces what the feed follows; returns the new snapshot, which replaces the old view.
    /// Messages still pending about the old scope are dropped.
    pub async fn resubscribe(&mut self, request: StreamRequest) -> Result<Vec<Bytes>, Refused> {
        self.generation = self.generation.wrapping_add(1);
        self.subscribe(request).await
    }

    async fn subscribe(&mut self, request: StreamRequest) -> Result<Vec<Bytes>, Refused> {
        let scope = request.scope;
        self.hub
            .register(self.id, self.generation, scope.clone(), &self.outbox);
        self.pacer.reset(request.min_interval);
        let drivers = read_snapshot(&self.tracker, &scope)
            .await
            .map_err(|_| Refused::StoreUnavailable)?;
        match self.tracker.memory_index() {
            // In process: re-read each driver under the hub's lock (see `Hub::adopt`).
            Some(index) => self.hub.adopt(self.id, self.generation, &drivers, |id| {
                index.get(id, Instant::now())
            }),
            // A shared store cannot be read under a lock; the snapshot just read stands in.
            None => {
                let read: hashbrown::HashMap<&str, &Position> =
                    drivers.iter().map(|p| (p.driver_id.as_str(), p)).collect();
                self.hub.adopt(self.id, self.generation, &drivers, |id| {
                    read.get(id).map(|p| (*p).clone())
                })
            }
        }
        let now = Instant::now();
        for d in &drivers {
            self.pacer.sent(&d.driver_id, now);
        }
        Ok(message::snapshot(&drivers))
    }

    /// Moves the messages ready now, in order (at most about `max`), into `out`; `Err` once the
    /// feed has ended (too slow, shutting down, or ended by the transport).
    pub fn ready(&mut self, out: &mut Vec<Bytes>, max: usize) -> Result<(), CloseReason> {
        if self.closing.is_cancelled() {
            self.outbox.close(CloseReason::Shutdown);
        }
        let now = Instant::now();
        let before = out.len();
        self.taken.clear();
        self.pacer.release(now, &mut self.taken);
        out.extend(self.taken.drain(..).map(|u| u.json.clone()));
        self.outbox.take(&mut self.taken, max)?;
        for update in self.taken.drain(..) {
            if let Some(update) = self.pacer.admit(update, now) {
                out.push(update.json.clone());
            }
        }
        self.hub.metrics().sent(self.transport, out.len() - before);
        Ok(())
    }

    /// Resolves when [`Feed::ready`] may have something new: a message arrived, a paced driver
    /// came due, or the feed is ending. Cancel-safe.
    pub async fn changed(&self) {
        let due = self.pacer.next_due();
        tokio::select! {
            _ = self.outbox.changed() => {}
            _ = self.closing.cancelled() => {}
            _ = sleep_until(due) => {}
        }
    }

    /// Ends the feed for a reason its transport saw (a client that left, a broken connection, a
    /// policy violation). A feed already ended keeps its first reason.
    pub fn end(&self, reason: CloseReason) {
        self.outbox.close(reason);
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.hub.unregister(self.id);
        self.outbox.close(CloseReason::Client);
        self.hub.metrics().subscriber_gone(self.transport);
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The drivers in scope now, in id order.
async fn read_snapshot(tracker: &Tracker, scope: &Scope) -> Result<Vec<Position>, TrackerError> {
    let mut drivers = match (&scope.area, scope.bounding_box()) {
        (Area::Drivers(ids), _) => {
            let ids: Vec<_> = ids.iter().cloned().collect();
            tracker.drivers(&ids).await?
        }
        (_, Some(b)) => tracker.within_box(&b, scope.tenant.as_deref()).await?,
        (_, None) => Vec::new(),
    };
    drivers.retain(|p| scope.admits(p));
    drivers.sort_unstable_by(|a, b| a.driver_id.cmp(&b.driver_id));
    Ok(drivers)
}
