//! The value of a chunk: one driver's points in one window, delta-encoded.
//!
//! Consecutive fixes of a vehicle differ little, so each point is written as differences from the
//! one before: the timestamp as the change of its interval (zero for a device that reports like a
//! clock), latitude and longitude as micro-degree steps (two bytes at city speeds), and speed and
//! heading as one flag bit when they repeat, else their four `f32` bytes, kept exactly. Integers are
//! zig-zag LEB128 varints. A chunk is a format byte followed by its points; the count is implied by
//! the length. Typical cost: 6–8 bytes a point with steady speed and heading, 14 with both changing
//! every fix.

use super::{HistoryError, TrackPoint};
use crate::domain::{Micros, Status};

/// First byte of every chunk; a different value means a format this build cannot read.
const FORMAT_V1: u8 = 1;

const STATUS_MASK: u8 = 0b11;
const HAS_SPEED: u8 = 1 << 2;
const SAME_SPEED: u8 = 1 << 3;
const HAS_HEADING: u8 = 1 << 4;
const SAME_HEADING: u8 = 1 << 5;

/// What the next point is encoded against.
#[derive(Debug, Clone, Copy)]
struct Previous {
    ts: Micros,
    interval: i64,
    lat_e6: i32,
    lon_e6: i32,
    speed: Option<u32>,
    heading: Option<u32>,
}

impl Previous {
    fn at(window_start: Micros) -> Previous {
        Previous {
            ts: window_start,
            interval: 0,
            lat_e6: 0,
            lon_e6: 0,
            speed: None,
            heading: None,
        }
    }
}

/// A chunk being written: the encoded bytes so far and the state to append the next point.
#[derive(Debug, Clone)]
pub struct ChunkWriter {
    window_start: Micros,
    bytes: Vec<u8>,
    previous: Previous,
    len: u32,
}

impl ChunkWriter {
    pub fn new(window_start: Micros) -> ChunkWriter {
        ChunkWriter {
            window_start,
            bytes: vec![FORMAT_V1],
            previous: Previous::at(window_start),
            len: 0,
        }
    }

    /// A chunk holding `points`, which must be in strictly increasing time order.
    pub fn from_points(window_start: Micros, points: &[TrackPoint]) -> ChunkWriter {
        let mut chunk = ChunkWriter::new(window_start);
        for point in points {
            chunk.push_newest(point);
        }
        chunk
    }

    pub fn window_start(&self) -> Micros {
        self.window_start
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Adds a point: appended in place when it is the newest (the common case), otherwise the chunk
    /// is rebuilt with the point in its time order, replacing one with the same timestamp.
    pub fn insert(&mut self, point: &TrackPoint) -> Result<(), HistoryError> {
        if self.len == 0 || point.timestamp > self.previous.ts {
            self.push_newest(point);
            return Ok(());
        }
        let merged = merge(decode(&self.bytes, self.window_start)?, &[*point]);
        *self = ChunkWriter::from_points(self.window_start, &merged);
        Ok(())
    }

    fn push_newest(&mut self, p: &TrackPoint) {
        let prev = self.previous;
        let speed = p.speed_mps.map(f32::to_bits);
        let heading = p.heading_deg.map(f32::to_bits);
        let mut flags = p.status as u8 & STATUS_MASK;
        flags |= optional_flags(speed, prev.speed, HAS_SPEED, SAME_SPEED);
        flags |= optional_flags(heading, prev.heading, HAS_HEADING, SAME_HEADING);
        self.bytes.push(flags);
        let interval = p.timestamp.wrapping_sub(prev.ts);
        put_signed(&mut self.bytes, interval.wrapping_sub(prev.interval));
        put_signed(
            &mut self.bytes,
            i64::from(p.lat_e6) - i64::from(prev.lat_e6),
        );
        put_signed(
            &mut self.bytes,
            i64::from(p.lon_e6) - i64::from(prev.lon_e6),
        );
        for (value, has, same) in [
            (speed, HAS_SPEED, SAME_SPEED),
            (heading, HAS_HEADING, SAME_HEADING),
        ] {
            if let (Some(bits), true) = (value, flags & (has | same) == has) {
                self.bytes.extend_from_slice(&bits.to_le_bytes());
            }
        }
        self.previous = Previous {
            ts: p.timestamp,
            interval,
            lat_e6: p.lat_e6,
            lon_e6: p.lon_e6,
            speed,
            heading,
        };
        self.len += 1;
    }
}

fn optional_flags(value: Option<u32>, previous: Option<u32>, has: u8, same: u8) -> u8 {
    match value {
        None => 0,
        Some(bits) if previous == Some(bits) => has | same,
        Some(_) => has,
    }
}

/// Every point of a chunk, in time order.
pub fn decode(bytes: &[u8], window_start: Micros) -> Result<Vec<TrackPoint>, HistoryError> {
    let mut points = Vec::with_capacity(bytes.len() / 6);
    decode_into(bytes, window_start, &mut points)?;
    Ok(points)
}

/// Appends the points of a chunk to `out`, in time order.
pub fn decode_into(
    bytes: &[u8],
    window_start: Micros,
    out: &mut Vec<TrackPoint>,
) -> Result<(), HistoryError> {
    let (&format, mut rest) = bytes
        .split_first()
        .ok_or(HistoryError::Corrupt("empty chunk"))?;
    if format != FORMAT_V1 {
        return Err(HistoryError::Corrupt("unknown chunk format"));
    }
    let mut prev = Previous::at(window_start);
    while let Some((&flags, tail)) = rest.split_first() {
        rest = tail;
        let interval = prev.interval.wrapping_add(take_signed(&mut rest)?);
        let ts = prev.ts.wrapping_add(interval);
        let lat_e6 = step_e6(prev.lat_e6, take_signed(&mut rest)?)?;
        let lon_e6 = step_e6(prev.lon_e6, take_signed(&mut rest)?)?;
        let speed = take_optional(&mut rest, flags, HAS_SPEED, SAME_SPEED, prev.speed)?;
        let heading = take_optional(&mut rest, flags, HAS_HEADING, SAME_HEADING, prev.heading)?;
        out.push(TrackPoint {
            lat_e6,
            lon_e6,
            timestamp: ts,
            status: Status::from_index(flags & STATUS_MASK),
            speed_mps: speed.map(f32::from_bits),
            heading_deg: heading.map(f32::from_bits),
        });
        prev = Previous {
            ts,
            interval,
            lat_e6,
            lon_e6,
            speed,
            heading,
        };
    }
    Ok(())
}

fn step_e6(previous: i32, step: i64) -> Result<i32, HistoryError> {
    i32::try_from(i64::from(previous) + step)
        .map_err(|_| HistoryError::Corrupt("coordinate out of range"))
}

fn take_optional(
    rest: &mut &[u8],
    flags: u8,
    has: u8,
    same: u8,
    previous: Option<u32>,
) -> Result<Option<u32>, HistoryError> {
    if flags & has == 0 {
        return Ok(None);
    }
    if flags & same != 0 {
        return previous
            .map(Some)
            .ok_or(HistoryError::Corrupt("repeat of a missing value"));
    }
    let (bits, tail) = rest
        .split_first_chunk::<4>()
        .ok_or(HistoryError::Corrupt("truncated chunk"))?;
    *rest = tail;
    Ok(Some(u32::from_le_bytes(*bits)))
}

fn put_signed(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push(zigzag as u8 | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

fn take_signed(rest: &mut &[u8]) -> Result<i64, HistoryError> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, tail) = rest
            .split_first()
            .ok_or(HistoryError::Corrupt("truncated chunk"))?;
        *rest = tail;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
        }
    }
    Err(HistoryError::Corrupt("varint too long"))
}

/// Merges two time-ordered lists; on equal timestamps the point from `newer` wins.
pub fn merge(older: Vec<TrackPoint>, newer: &[TrackPoint]) -> Vec<TrackPoint> {
    if newer.is_empty() {
        return older;
    }
    let mut out = Vec::with_capacity(older.len() + newer.len());
    let mut older = older.into_iter().peekable();
    for point in newer {
        while let Some(old) = older.next_if(|old| old.timestamp < point.timestamp) {
            out.push(old);
        }
        older.next_if(|old| old.timestamp == point.timestamp);
        out.push(*point);
    }
    out.extend(older);
    out
}

/// Sorts points by time and keeps the last of each timestamp (the later write wins).
pub fn sort_dedup(points: &mut Vec<TrackPoint>) {
    points.sort_by_key(|p| p.timestamp);
    let mut kept: Vec<TrackPoint> = Vec::with_capacity(points.len());
    for point in points.drain(..) {
        match kept.last_mut() {
            Some(last) if last.timestamp == point.timestamp => *last = point,
            _ => kept.push(point),
        }
    }
    *points = kept;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(ts: Micros, lat_e6: i32, speed: Option<f32>) -> TrackPoint {
        TrackPoint {
            lat_e6,
            lon_e6: -lat_e6 / 2,
            timestamp: ts,
            status: Status::Busy,
            speed_mps: speed,
            heading_deg: speed.map(|s| s * 10.0),
        }
    }

    #[test]
    fn round_trips_every_field_exactly() {
        let points = [
            point(-5, -90_000_000, Some(f32::MIN_POSITIVE)),
            point(1_999_993, 90_000_000, Some(8.53452)),
            point(4_000_001, 90_000_000, Some(8.53452)),
            point(i64::MAX, -1, None),
        ];
        let chunk = ChunkWriter::from_points(-30_000_000, &points);
        assert_eq!(
            decode(chunk.bytes(), -30_000_000).ok(),
            Some(points.to_vec())
        );
    }

    #[test]
    fn steady_fixes_cost_a_few_bytes() {
        let points: Vec<TrackPoint> = (0..15)
            .map(|i| point(i * 2_000_000, 31_000_000 + i as i32 * 150, Some(8.5)))
            .collect();
        let size = |n: usize| ChunkWriter::from_points(0, &points[..n]).bytes().len();
        // Flags, timestamp, two 2-byte coordinate steps; speed and heading repeat.
        assert_eq!(size(15) - size(5), 10 * 6);
    }

    #[test]
    fn inserts_keep_time_order_and_replace_equal_timestamps() {
        let mut chunk = ChunkWriter::new(0);
        for (ts, lat) in [(30, 1), (10, 2), (20, 3), (10, 4), (40, 5)] {
            chunk.insert(&point(ts, lat, None)).ok();
        }
        let got: Vec<(Micros, i32)> = decode(chunk.bytes(), 0)
            .unwrap_or_default()
            .iter()
            .map(|p| (p.timestamp, p.lat_e6))
            .collect();
        assert_eq!(got, [(10, 4), (20, 3), (30, 1), (40, 5)]);
    }

    #[test]
    fn corrupt_chunks_are_errors_not_panics() {
        let chunk = ChunkWriter::from_points(0, &[point(7, 123_456, Some(1.0))]);
        let bytes = chunk.bytes();
        // Cut anywhere inside the point (1 is a valid empty chunk).
        for cut in (0..1).chain(2..bytes.len()) {
            assert!(decode(&bytes[..cut], 0).is_err(), "cut at {cut}");
        }
        assert!(decode(&[9, 0], 0).is_err());
    }

    #[test]
    fn merge_and_dedup_let_the_newer_point_win() {
        let older = vec![point(1, 1, None), point(2, 1, None), point(4, 1, None)];
        let merged = merge(
            older,
            &[point(2, 2, None), point(3, 2, None), point(5, 2, None)],
        );
        let got: Vec<(Micros, i32)> = merged.iter().map(|p| (p.timestamp, p.lat_e6)).collect();
        assert_eq!(got, [(1, 1), (2, 2), (3, 2), (4, 1), (5, 2)]);
        let mut points = vec![point(3, 1, None), point(1, 1, None), point(3, 2, None)];
        sort_dedup(&mut points);
        let got: Vec<(Micros, i32)> = points.iter().map(|p| (p.timestamp, p.lat_e6)).collect();
        assert_eq!(got, [(1, 1), (3, 2)]);
    }
}
