//! Black-box tests: each starts the real binary on an ephemeral port and speaks HTTP to it. All in
//! one test binary so the suite links once.

mod contract;
mod drivers;
mod durability;
mod errors;
mod history;
mod keys_cli;
mod lifecycle;
mod limits;
mod locations;
mod map;
mod ops;
mod scaleout;
mod simulate;
mod streams;
mod support;
mod trust;
