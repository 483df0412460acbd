//! A fixed latitude/longitude grid of cells 0.002° on a side (about 220 m north–south).
//!
//! Why a plain lat/lon grid and not S2 or H3: cell lookup is two integer divisions, neighbours are
//! index arithmetic, and the nearby search only needs a safe *lower bound* on the distance from a point
//! to a cell ([`CellBounds::min_hav`]), which is exact enough on a lat/lon rectangle at any latitude.
//! Cells shrink east–west towards the poles; the search copes by switching to a scan of occupied cells
//! when the number of empty cells to visit grows past the number of occupied ones.
//!
//! At the sizes that matter (a city of 1M drivers, ~3,500 per km² at its centre) a cell holds about
//! 150 drivers, so the 50 nearest are found in the centre cell and its ring of neighbours.

use super::RAD_PER_E6;

/// Cell side in micro-degrees.
pub const CELL_E6: i32 = 2_000;
/// Rows from the south pole (row 0) to the north pole.
pub const GRID_ROWS: i32 = 180_000_000 / CELL_E6;
/// Columns from the antimeridian eastwards; column arithmetic wraps around.
pub const GRID_COLS: i32 = 360_000_000 / CELL_E6;

/// A cell by row and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cell {
    pub row: i32,
    pub col: i32,
}

impl Cell {
    /// The cell holding a point (the north pole belongs to the last row, 180° to column 0).
    #[inline]
    pub fn of(lat_e6: i32, lon_e6: i32) -> Cell {
        let row = ((lat_e6 + 90_000_000) / CELL_E6).clamp(0, GRID_ROWS - 1);
        let col = ((lon_e6 + 180_000_000) / CELL_E6).rem_euclid(GRID_COLS);
        Cell { row, col }
    }

    /// A compact key for hash maps.
    #[inline]
    pub fn key(self) -> u64 {
        ((self.row as u64) << 32) | self.col as u32 as u64
    }

    pub fn from_key(key: u64) -> Cell {
        Cell {
            row: (key >> 32) as i32,
            col: key as u32 as i32,
        }
    }

    /// Chebyshev distance in cells, with columns wrapping around the antimeridian.
    pub fn ring_distance(self, other: Cell) -> i32 {
        let dr = (self.row - other.row).abs();
        let dc = (self.col - other.col).rem_euclid(GRID_COLS);
        dr.max(dc.min(GRID_COLS - dc))
    }

    pub fn bounds(self) -> CellBounds {
        let lat_min = self.row * CELL_E6 - 90_000_000;
        let lon_min = self.col * CELL_E6 - 180_000_000;
        CellBounds {
            lat_min: lat_min as f64 * RAD_PER_E6,
            lat_max: (lat_min + CELL_E6) as f64 * RAD_PER_E6,
            lon_min: lon_min as f64 * RAD_PER_E6,
            lon_max: (lon_min + CELL_E6) as f64 * RAD_PER_E6,
        }
    }
}

/// A cell's extent in radians.
#[derive(Debug, Clone, Copy)]
pub struct CellBounds {
    pub lat_min: f64,
    pub lat_max: f64,
    pub lon_min: f64,
    pub lon_max: f64,
}

impl CellBounds {
    /// A lower bound on the haversine from (`lat`, `lon`) (radians, `cos_lat` = cos `lat`) to any
    /// point of the cell. Sound because both terms of the haversine only shrink: the latitude gap is at
    /// least the gap to the nearest edge, `cos φ` is at least its smallest value over the cell, and the
    /// longitude gap at least the gap to the nearest meridian edge.
    pub fn min_hav(&self, lat: f64, lon: f64, cos_lat: f64) -> f64 {
        let d_lat = if lat < self.lat_min {
            self.lat_min - lat
        } else if lat > self.lat_max {
            lat - self.lat_max
        } else {
            0.0
        };
        let d_lon = lon_gap(lon, self.lon_min, self.lon_max);
        let cos_min = self.lat_min.cos().min(self.lat_max.cos()).max(0.0);
        let s_lat = (d_lat * 0.5).sin();
        let s_lon = (d_lon * 0.5).sin();
        (s_lat * s_lat + cos_lat * cos_min * s_lon * s_lon).min(1.0)
    }
}

/// Smallest longitude difference (radians, 0..=π) from `lon` to the interval `[min, max]`.
fn lon_gap(lon: f64, min: f64, max: f64) -> f64 {
    use std::f64::consts::{PI, TAU};
    if lon >= min && lon <= max {
        return 0.0;
    }
    let to_min = (min - lon).rem_euclid(TAU);
    let from_max = (lon - max).rem_euclid(TAU);
    to_min.min(from_max).min(PI)
}

/// Levels of coarser blocks above the cells: a block of level `L` covers 8^L × 8^L cells (level 1
/// about 1.8 km, level 2 about 14 km, level 3 about 110 km north–south).
pub const BLOCK_LEVELS: u8 = 3;

/// A square of cells at some level, used to skip empty space quickly: the live index records, per
/// block, which of its 64 children are occupied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Block {
    pub level: u8,
    pub row: i32,
    pub col: i32,
}

impl Block {
    pub fn of_cell(cell: Cell) -> Block {
        Block {
            level: 0,
            row: cell.row,
            col: cell.col,
        }
    }

    pub fn cell(self) -> Cell {
        Cell {
            row: self.row,
            col: self.col,
        }
    }

    /// The block one level up, and this block's bit (0..64) in its parent's child mask.
    pub fn parent(self) -> (Block, u32) {
        let bit = ((self.row & 7) * 8 + (self.col & 7)) as u32;
        let parent = Block {
            level: self.level + 1,
            row: self.row >> 3,
            col: self.col >> 3,
        };
        (parent, bit)
    }

    /// The child at `bit` of this block's child mask.
    pub fn child(self, bit: u32) -> Block {
        Block {
            level: self.level - 1,
            row: self.row * 8 + (bit / 8) as i32,
            col: self.col * 8 + (bit % 8) as i32,
        }
    }

    /// Key within its level.
    pub fn key(self) -> u64 {
        self.cell().key()
    }

    pub fn from_key(level: u8, key: u64) -> Block {
        let c = Cell::from_key(key);
        Block {
            level,
            row: c.row,
            col: c.col,
        }
    }

    /// Whether the block holds any cell of the grid (edge blocks are partial, some beyond it).
    pub fn exists(self) -> bool {
        let shift = 3 * self.level as u32;
        (self.row << shift) < GRID_ROWS && (self.col << shift) < GRID_COLS
    }

    /// The block's extent, clipped to the grid.
    pub fn bounds(self) -> CellBounds {
        let shift = 3 * self.level as u32;
        let first = Cell {
            row: self.row << shift,
            col: self.col << shift,
        }
        .bounds();
        let last = Cell {
            row: (((self.row + 1) << shift) - 1).min(GRID_ROWS - 1),
            col: (((self.col + 1) << shift) - 1).min(GRID_COLS - 1),
        }
        .bounds();
        CellBounds {
            lat_min: first.lat_min,
            lat_max: last.lat_max,
            lon_min: first.lon_min,
            lon_max: last.lon_max,
        }
    }
}

/// The grid as a whole: which cells lie on a ring around a centre cell.
pub struct Grid;

impl Grid {
    /// Calls `visit` for every cell at Chebyshev distance exactly `k` from `center`, skipping rows
    /// beyond the poles and never visiting a column twice when the ring wraps the whole globe.
    pub fn for_each_on_ring(center: Cell, k: i32, mut visit: impl FnMut(Cell)) {
        if k == 0 {
            visit(center);
            return;
        }
        let cols = 2 * k + 1;
        let wraps = cols >= GRID_COLS;
        let col_at = |dc: i32| (center.col + dc).rem_euclid(GRID_COLS);
        let row_ok = |r: i32| (0..GRID_ROWS).contains(&r);
        // Top and bottom rows: every column of the ring (all columns once if it wraps).
        let (c_from, c_to) = if wraps { (0, GRID_COLS - 1) } else { (-k, k) };
        for row in [center.row - k, center.row + k] {
            if row_ok(row) {
                for dc in c_from..=c_to {
                    let col = if wraps { dc } else { col_at(dc) };
                    visit(Cell { row, col });
                }
            }
        }
        // Left and right columns, between the top and bottom rows. Once the ring is wider than the
        // globe the two columns coincide (2k = GRID_COLS) or do not exist at all.
        let sides: &[i32] = match (2 * k).cmp(&GRID_COLS) {
            std::cmp::Ordering::Less => &[-1, 1],
            std::cmp::Ordering::Equal => &[1],
            std::cmp::Ordering::Greater => &[],
        };
        for dr in (1 - k)..k {
            let row = center.row + dr;
            if row_ok(row) {
                for side in sides {
                    visit(Cell {
                        row,
                        col: col_at(side * k),
                    });
                }
            }
        }
    }

    /// How many rings around `center` can contain a cell at all (beyond that every ring is empty).
    pub fn max_ring(center: Cell) -> i32 {
        let rows = center.row.max(GRID_ROWS - 1 - center.row);
        rows.max(GRID_COLS / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::{haversine, RAD_PER_E6};
    use std::collections::HashSet;

    #[test]
    fn cells_of_edge_points() {
        assert_eq!(Cell::of(90_000_000, 0).row, GRID_ROWS - 1);
        assert_eq!(Cell::of(-90_000_000, 0).row, 0);
        assert_eq!(Cell::of(0, 180_000_000).col, Cell::of(0, -180_000_000).col);
        let c = Cell::of(31_230_000, 121_470_000);
        assert_eq!(Cell::from_key(c.key()), c);
    }

    #[test]
    fn blocks_nest() {
        let cell = Cell::of(31_230_000, 121_470_000);
        let mut block = Block::of_cell(cell);
        for level in 1..=BLOCK_LEVELS {
            let (parent, bit) = block.parent();
            assert_eq!(parent.level, level);
            assert_eq!(parent.child(bit), block);
            let (pb, bb) = (parent.bounds(), block.bounds());
            assert!(pb.lat_min <= bb.lat_min && pb.lat_max >= bb.lat_max);
            assert!(pb.lon_min <= bb.lon_min && pb.lon_max >= bb.lon_max);
            block = parent;
        }
        // Edge blocks are clipped to the grid.
        let top = Block {
            level: 3,
            row: (GRID_ROWS - 1) >> 9,
            col: (GRID_COLS - 1) >> 9,
        };
        let b = top.bounds();
        assert!((b.lat_max - std::f64::consts::FRAC_PI_2).abs() < 1e-12);
        assert!((b.lon_max - std::f64::consts::PI).abs() < 1e-12);
        assert!(!top.child(63).exists() || top.child(63).bounds().lat_max <= b.lat_max);
    }

    #[test]
    fn rings_partition_the_neighbourhood() {
        let center = Cell::of(10_000_000, 179_999_000);
        let mut seen = HashSet::new();
        for k in 0..=3 {
            Grid::for_each_on_ring(center, k, |c| {
                assert_eq!(center.ring_distance(c), k);
                assert!(seen.insert(c), "cell visited twice: {c:?}");
            });
        }
        assert_eq!(seen.len(), 49);
    }

    #[test]
    fn rings_stop_at_the_poles() {
        let center = Cell::of(89_999_999, 0);
        let mut n = 0;
        Grid::for_each_on_ring(center, 1, |_| n += 1);
        assert_eq!(n, 5); // the row above the pole does not exist
    }

    #[test]
    fn min_hav_is_a_lower_bound() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..20_000 {
            let lat_e6 = (next() % 180_000_001) as i32 - 90_000_000;
            let lon_e6 = (next() % 360_000_001) as i32 - 180_000_000;
            let cell = Cell::of(
                (lat_e6 + (next() % 4_000_001) as i32 - 2_000_000).clamp(-90_000_000, 90_000_000),
                lon_e6 + (next() % 4_000_001) as i32 - 2_000_000,
            );
            let b = cell.bounds();
            let (lat, lon) = (lat_e6 as f64 * RAD_PER_E6, lon_e6 as f64 * RAD_PER_E6);
            let bound = b.min_hav(lat, lon, lat.cos());
            // Sample points inside the cell: none may be closer than the bound.
            for (fy, fx) in [
                (0.0, 0.0),
                (1.0, 1.0),
                (0.5, 0.5),
                (0.0, 1.0),
                (1.0, 0.0),
                (0.3, 0.9),
            ] {
                let plat = b.lat_min + fy * (b.lat_max - b.lat_min);
                let plon = b.lon_min + fx * (b.lon_max - b.lon_min);
                assert!(haversine(lat, lon, plat, plon) >= bound - 1e-15, "{cell:?}");
            }
        }
    }
}
