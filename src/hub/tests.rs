//! The hub's matching: who gets a position, who is told a driver left, and that each update is
//! serialised once. Coalescing is tested with the outbox and the pacer.

use super::*;
use crate::domain::{Micros, StatusSet};
use crate::live::BoxQuery;
use serde_json::Value;

fn hub() -> Hub {
    Hub::new(HubConfig::default(), &Metrics::new())
}

fn at(id: &str, lat: f64, lon: f64, status: Status, timestamp: Micros) -> Position {
    Position {
        driver_id: id.into(),
        lat_e6: (lat * 1e6).round() as i32,
        lon_e6: (lon * 1e6).round() as i32,
        status,
        timestamp,
        speed_mps: None,
        heading_deg: None,
        accuracy_m: None,
    }
}

fn online(id: &str, lat: f64, lon: f64, timestamp: Micros) -> Position {
    at(id, lat, lon, Status::Online, timestamp)
}

fn boxed(south: f64, west: f64, north: f64, east: f64) -> Scope {
    let e6 = |v: f64| (v * 1e6).round() as i32;
    Scope {
        area: Area::Box(BoxQuery {
            south_e6: e6(south),
            west_e6: e6(west),
            north_e6: e6(north),
            east_e6: e6(east),
            statuses: StatusSet::WORKING,
        }),
        statuses: StatusSet::WORKING,
        tenant: None,
    }
}

fn circle(lat: f64, lon: f64, radius_m: f64) -> Scope {
    Scope {
        area: Area::Circle(Circle {
            lat_e6: (lat * 1e6).round() as i32,
            lon_e6: (lon * 1e6).round() as i32,
            radius_m,
        }),
        statuses: StatusSet::WORKING,
        tenant: None,
    }
}

fn drivers(ids: &[&str]) -> Scope {
    Scope {
        area: Area::Drivers(ids.iter().map(|&id| id.into()).collect()),
        statuses: StatusSet::WORKING,
        tenant: None,
    }
}

/// A registered subscription and what it has received.
struct Sub {
    id: SubId,
    outbox: Arc<Outbox>,
}

impl Sub {
    fn new(hub: &Hub, scope: Scope) -> Sub {
        let sub = Sub {
            id: hub.next_id(),
            outbox: hub.new_outbox(),
        };
        hub.register(sub.id, 0, scope, &sub.outbox);
        sub
    }

    fn updates(&self) -> Vec<Arc<Update>> {
        let mut out = Vec::new();
        self.outbox.take(&mut out, usize::MAX).unwrap();
        out
    }

    /// Received messages as `type:driver[:reason]`.
    fn received(&self) -> Vec<String> {
        self.updates()
            .iter()
            .map(|u| {
                let v: Value = serde_json::from_slice(&u.json).unwrap();
                let mut s = format!("{}:{}", v["type"].as_str().unwrap(), u.driver);
                if let Some(reason) = v["reason"].as_str() {
                    s = format!("{s}:{reason}");
                }
                s
            })
            .collect()
    }
}

#[test]
fn without_subscribers_publish_does_nothing() {
    let hub = hub();
    assert!(!hub.is_active());
    hub.publish(&[online("a", 31.2, 121.4, 1)]);
    assert!(hub.watchers.iter().all(|s| s.lock().is_empty()));
}

#[test]
fn each_subscriber_gets_what_its_area_admits() {
    let hub = hub();
    let city = Sub::new(&hub, boxed(31.0, 121.0, 31.5, 121.8));
    let corner = Sub::new(&hub, circle(31.23, 121.47, 500.0));
    let elsewhere = Sub::new(&hub, circle(48.85, 2.35, 5_000.0));
    let ids = Sub::new(&hub, drivers(&["far"]));
    let world = Sub::new(&hub, boxed(-90.0, -180.0, 90.0, 180.0));
    hub.publish(&[
        online("near", 31.231, 121.471, 1),
        online("edge", 31.5, 121.8, 1),
        online("far", 10.0, 10.0, 1),
    ]);
    assert_eq!(city.received(), ["position:near", "position:edge"]);
    assert_eq!(corner.received(), ["position:near"]);
    assert!(elsewhere.received().is_empty());
    assert_eq!(ids.received(), ["position:far"]);
    assert_eq!(world.received().len(), 3);
}

#[test]
fn an_update_is_serialised_once_and_shared() {
    let hub = hub();
    let a = Sub::new(&hub, circle(31.23, 121.47, 500.0));
    let b = Sub::new(&hub, boxed(31.0, 121.0, 31.5, 121.8));
    hub.publish(&[online("x", 31.23, 121.47, 1)]);
    let (ua, ub) = (a.updates(), b.updates());
    assert!(Arc::ptr_eq(&ua[0], &ub[0]));
}

#[test]
fn leaving_the_area_going_offline_or_out_of_the_filter_removes() {
    let hub = hub();
    let mut online_only = StatusSet::empty();
    online_only.insert(Status::Online);
    let area = Sub::new(
        &hub,
        Scope {
            statuses: online_only,
            ..circle(31.23, 121.47, 1_000.0)
        },
    );
    hub.publish(&[
        online("mover", 31.23, 121.47, 1),
        online("quitter", 31.23, 121.47, 1),
        online("hired", 31.23, 121.47, 1),
    ]);
    assert_eq!(area.received().len(), 3);
    hub.publish(&[
        online("mover", 31.30, 121.47, 2),
        at("quitter", 31.23, 121.47, Status::Offline, 2),
        at("hired", 31.23, 121.47, Status::Busy, 2),
    ]);
    assert_eq!(
        area.received(),
        [
            "removed:mover:left_area",
            "removed:quitter:offline",
            "removed:hired:left_area"
        ]
    );
    // Told once: further updates outside the scope are nobody's business.
    hub.publish(&[online("mover", 31.31, 121.47, 3)]);
    assert!(area.received().is_empty());
    assert!(hub.watchers.iter().all(|s| s.lock().is_empty()));
    // Coming back is a position again.
    hub.publish(&[online("mover", 31.23, 121.47, 4)]);
    assert_eq!(area.received(), ["position:mover"]);
}

#[test]
fn an_older_position_than_the_one_shown_is_skipped() {
    let hub = hub();
    let sub = Sub::new(&hub, circle(31.23, 121.47, 1_000.0));
    hub.publish(&[online("a", 31.23, 121.47, 10)]);
    hub.publish(&[online("a", 40.0, 0.0, 5)]);
    assert_eq!(sub.received(), ["position:a"]);
}

#[test]
fn expiry_removes_unless_the_driver_is_back() {
    let hub = hub();
    let sub = Sub::new(&hub, drivers(&["gone", "back", "never"]));
    hub.publish(&[online("gone", 1.0, 1.0, 1), online("back", 1.0, 1.0, 1)]);
    sub.updates();
    let back = online("back", 1.0, 1.0, 2);
    hub.expired(&["gone".into(), "back".into(), "never".into()], |id| {
        (id == "back").then(|| back.clone())
    });
    assert_eq!(sub.received(), ["removed:gone:expired"]);
}

#[test]
fn adopting_a_snapshot_catches_drivers_that_left_meanwhile() {
    let hub = hub();
    let sub = Sub::new(&hub, circle(31.23, 121.47, 1_000.0));
    let snapshot = [
        online("stays", 31.23, 121.47, 1),
        online("left", 31.23, 121.47, 1),
        online("expired", 31.23, 121.47, 1),
        online("off", 31.23, 121.47, 1),
    ];
    hub.adopt(sub.id, 0, &snapshot, |id| match id {
        "stays" => Some(online("stays", 31.231, 121.47, 2)),
        "left" => Some(online("left", 35.0, 121.47, 2)),
        "off" => Some(at("off", 31.23, 121.47, Status::Offline, 2)),
        _ => None,
    });
    assert_eq!(
        sub.received(),
        [
            "removed:left:left_area",
            "removed:expired:expired",
            "removed:off:offline"
        ]
    );
    // The driver that stayed is watched: leaving now is reported.
    hub.publish(&[online("stays", 40.0, 0.0, 3)]);
    assert_eq!(sub.received(), ["removed:stays:left_area"]);
}

#[test]
fn a_new_scope_replaces_the_old_one() {
    let hub = hub();
    let sub = Sub::new(&hub, circle(31.23, 121.47, 1_000.0));
    hub.publish(&[online("a", 31.23, 121.47, 1)]);
    hub.register(sub.id, 1, circle(48.85, 2.35, 1_000.0), &sub.outbox);
    // Pending messages of the old scope are forgotten; the old scope's drivers are not followed.
    assert!(sub.received().is_empty());
    hub.publish(&[online("a", 31.24, 121.47, 2), online("b", 48.85, 2.35, 2)]);
    assert_eq!(sub.received(), ["position:b"]);
    assert_eq!(hub.registry.read().entries.len(), 1);
    hub.unregister(sub.id);
    assert!(!hub.is_active());
    let registry = hub.registry.read();
    assert!(registry.blocks.iter().all(|b| b.is_empty()));
}

#[test]
fn a_closed_subscriber_costs_nothing_and_others_go_on() {
    let hub = Hub::new(
        HubConfig {
            queue: 1,
            backlog: 1,
            ..HubConfig::default()
        },
        &Metrics::new(),
    );
    let slow = Sub::new(&hub, circle(31.23, 121.47, 1_000.0));
    let ok = Sub::new(&hub, drivers(&["d0"]));
    for i in 0..10 {
        hub.publish(&[online(&format!("d{i}"), 31.23, 121.47, 1)]);
        if i == 0 {
            assert_eq!(ok.received(), ["position:d0"]);
        }
    }
    assert_eq!(slow.outbox.closed(), Some(CloseReason::TooSlow));
    hub.publish(&[online("d0", 31.23, 121.47, 2)]);
    assert_eq!(ok.received(), ["position:d0"]);
}
