//! The benchmark city, shared by the benches: N drivers packed around Shanghai's centre with the
#![allow(dead_code)] // each bench uses part of it
//! same distribution as `../shared/peers/load/load_city.py` (Gaussian, σ 0.06° lat, 0.07° lon), so
//! about 11,000 of 1,000,000 lie within 1 km of the centre.

use fleettracker::domain::{Position, Status};

pub const CENTER: (f64, f64) = (31.23, 121.47);

/// A small deterministic generator (xorshift) with Box–Muller normals: no extra dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

pub fn driver(i: usize, rng: &mut Rng) -> Position {
    let lat = CENTER.0 + rng.normal() * 0.06;
    let lon = CENTER.1 + rng.normal() * 0.07;
    Position {
        driver_id: format!("drv-{i}").into(),
        lat_e6: (lat * 1e6).round() as i32,
        lon_e6: (lon * 1e6).round() as i32,
        status: if i.is_multiple_of(5) {
            Status::Busy
        } else {
            Status::Online
        },
        timestamp: 1_790_000_000_000_000 + i as i64,
        speed_mps: None,
        heading_deg: None,
        accuracy_m: None,
    }
}

pub fn city(n: usize) -> Vec<Position> {
    let mut rng = Rng::new(1);
    (0..n).map(|i| driver(i, &mut rng)).collect()
}
