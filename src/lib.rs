//! FleetTracker: a real-time location service for fleets.
//!
//! Data flows one way: `api` (decode, validate) → `tracker` (apply) → `live` (latest position per
//! driver, by grid cell). `domain` and `geo` hold the vocabulary and the math and do no I/O.
//!
//! The module docs explain a design down to its private parts and link to them: read them with
//! `cargo doc --no-deps --document-private-items --open`, where every link resolves.
#![allow(rustdoc::private_intra_doc_links)]

pub mod api;
pub mod backend;
pub mod config;
pub mod domain;
pub mod durability;
pub mod geo;
pub mod history;
pub mod hub;
pub mod live;
pub mod metrics;
pub mod net;
pub mod server;
pub mod sim;
pub mod tracker;
pub mod trust;
pub mod wal;
