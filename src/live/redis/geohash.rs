//! Geohash cells: the unit of sharding in cluster mode and of Pub/Sub channels.
//!
//! A geohash of precision `p` interleaves `5p` bits of longitude and latitude (longitude first),
//! so every cell is a latitude/longitude rectangle and a cell's name starts with its parent's
//! name. Precision 5 (12 latitude and 13 longitude bits: 0.044° × 0.044°, about 4.9 × 4.9 km at the
//! equator and 4.2 × 4.9 km at 30°) is fine enough that a city covers dozens of cells, hence
//! dozens of hash slots spread over every master, and coarse enough that a 5 km nearby circle
//! touches at most 16 of them.
//!
//! Cells are computed from integer micro-degrees with integer arithmetic, so the cell a position
//! is stored under and the cells a query enumerates always agree, edges included. Latitude 90° and
//! longitude 180° fall into the last row / column (there is no cell beyond them).

/// Precision of the area cells keys are sharded by.
pub const AREA_PRECISION: u32 = 5;
/// Precision of the Pub/Sub channel cells (about 39 × 20 km): a prefix of the area name.
pub const CHANNEL_PRECISION: u32 = 4;

const BASE32: &[u8; 32] = b"0123456789bcdefghjkmnpqrstuvwxyz";

fn bits(precision: u32) -> (u32, u32) {
    let total = 5 * precision;
    // Longitude takes the first bit, so it gets the extra one when the total is odd.
    (total / 2, total.div_ceil(2))
}

/// Row (latitude index) of `lat_e6` among `2^lat_bits` rows.
fn row(lat_e6: i32, lat_bits: u32) -> u32 {
    let n = 1i64 << lat_bits;
    let clamped = (lat_e6 as i64).clamp(-90_000_000, 90_000_000) + 90_000_000;
    ((clamped * n) / 180_000_000).min(n - 1) as u32
}

/// Column (longitude index) of `lon_e6` among `2^lon_bits` columns.
fn col(lon_e6: i32, lon_bits: u32) -> u32 {
    let n = 1i64 << lon_bits;
    let clamped = (lon_e6 as i64).clamp(-180_000_000, 180_000_000) + 180_000_000;
    ((clamped * n) / 360_000_000).min(n - 1) as u32
}

/// The name of the cell at (`row`, `col`).
fn name(row: u32, col: u32, precision: u32) -> String {
    let (lat_bits, lon_bits) = bits(precision);
    let mut out = String::with_capacity(precision as usize);
    let (mut lat_left, mut lon_left) = (lat_bits, lon_bits);
    let mut acc = 0usize;
    for i in 0..5 * precision {
        let bit = if i.is_multiple_of(2) {
            lon_left -= 1;
            (col >> lon_left) & 1
        } else {
            lat_left -= 1;
            (row >> lat_left) & 1
        };
        acc = acc << 1 | bit as usize;
        if i % 5 == 4 {
            out.push(BASE32[acc] as char);
            acc = 0;
        }
    }
    out
}

/// The geohash of a point at `precision`.
pub fn encode(lat_e6: i32, lon_e6: i32, precision: u32) -> String {
    let (lat_bits, lon_bits) = bits(precision);
    name(row(lat_e6, lat_bits), col(lon_e6, lon_bits), precision)
}

/// The latitude/longitude bounds of a cell in micro-degrees (south, west, north, east), or `None`
/// for a string that is not a geohash.
pub fn bounds(hash: &str) -> Option<(f64, f64, f64, f64)> {
    let precision = hash.len() as u32;
    let (lat_bits, lon_bits) = bits(precision);
    let (mut row, mut col) = (0u64, 0u64);
    let mut i = 0u32;
    for c in hash.bytes() {
        let v = BASE32.iter().position(|&b| b == c)? as u64;
        for k in (0..5).rev() {
            let bit = (v >> k) & 1;
            if i.is_multiple_of(2) {
                col = col << 1 | bit;
            } else {
                row = row << 1 | bit;
            }
            i += 1;
        }
    }
    let lat_step = 180e6 / (1u64 << lat_bits) as f64;
    let lon_step = 360e6 / (1u64 << lon_bits) as f64;
    let south = -90e6 + row as f64 * lat_step;
    let west = -180e6 + col as f64 * lon_step;
    Some((south, west, south + lat_step, west + lon_step))
}

/// The cells covering a latitude/longitude box given in micro-degrees; `west > east` means the box
/// wraps around the antimeridian. `None` when there would be more than `max` of them.
pub fn cover(
    south_e6: i32,
    west_e6: i32,
    north_e6: i32,
    east_e6: i32,
    precision: u32,
    max: usize,
) -> Option<Vec<String>> {
    let (lat_bits, lon_bits) = bits(precision);
    let rows = row(south_e6, lat_bits)..=row(north_e6, lat_bits);
    let (w, e) = (col(west_e6, lon_bits), col(east_e6, lon_bits));
    let last = (1u32 << lon_bits) - 1;
    let cols: Vec<std::ops::RangeInclusive<u32>> = if west_e6 <= east_e6 {
        vec![w..=e]
    } else {
        vec![w..=last, 0..=e]
    };
    let width: usize = cols.iter().map(|c| c.clone().count()).sum();
    if rows.clone().count().saturating_mul(width) > max {
        return None;
    }
    let mut out = Vec::new();
    for r in rows {
        for c in cols.iter().flat_map(|c| c.clone()) {
            out.push(name(r, c, precision));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hashes() {
        // Reference values from the original geohash.org algorithm.
        assert_eq!(encode(57_649_110, 10_407_440, 5), "u4pru");
        assert_eq!(encode(31_230_400, 121_473_700, 5), "wtw3s");
        assert_eq!(encode(-33_868_800, 151_209_300, 4), "r3gx");
        assert_eq!(encode(90_000_000, 180_000_000, 5), "zzzzz");
        assert_eq!(encode(-90_000_000, -180_000_000, 5), "00000");
    }

    #[test]
    fn bounds_contain_the_point_and_prefixes_nest() {
        let h = encode(31_230_400, 121_473_700, 5);
        let (s, w, n, e) = bounds(&h).unwrap();
        assert!(s <= 31_230_400.0 && 31_230_400.0 < n);
        assert!(w <= 121_473_700.0 && 121_473_700.0 < e);
        assert_eq!(&h[..4], encode(31_230_400, 121_473_700, 4));
        assert!(bounds("ab!").is_none());
    }

    #[test]
    fn cover_includes_every_point_of_the_box() {
        let cells = cover(31_000_000, 121_000_000, 31_200_000, 121_300_000, 5, 1000).unwrap();
        for lat in (31_000_000..=31_200_000).step_by(7_919) {
            for lon in (121_000_000..=121_300_000).step_by(9_973) {
                assert!(cells.contains(&encode(lat, lon, 5)));
            }
        }
        // Across the antimeridian: both sides.
        let wrap = cover(-1_000_000, 179_950_000, 1_000_000, -179_950_000, 5, 1000).unwrap();
        assert!(wrap.contains(&encode(0, 179_999_000, 5)));
        assert!(wrap.contains(&encode(0, -179_999_000, 5)));
        assert!(!wrap.contains(&encode(0, 0, 5)));
        assert!(cover(-80_000_000, -170_000_000, 80_000_000, 170_000_000, 5, 1000).is_none());
    }
}
