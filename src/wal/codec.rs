//! The binary encoding of a [`Batch`] (a log record's body) and of one [`Position`] (shared with
//! live-index snapshots).
//!
//! Plain fixed-width little-endian fields, no deltas and no compression: encoding a 1,000-position
//! batch must cost microseconds, and a format this simple is easy to check by hand in a hex dump.
//! Lengths that can exceed a byte are LEB128 varints, so encoding never fails and a normal driver id
//! costs one length byte.
//!
//! ```text
//! batch    = received_at i64 | count u32 | position × count
//! position = id_len varint | id (UTF-8) | flags u8 | lat_e6 i32 | lon_e6 i32 | timestamp i64
//!            | speed f32 (if flags bit 2) | heading f32 (bit 3) | accuracy f32 (bit 4)
//! flags    = status in bits 0–1 (0 online, 1 busy, 2 offline); bits 5–7 must be zero
//! ```
//!
//! Decoding checks every length against the bytes that remain and every tag against the known
//! values, so garbage yields a [`DecodeError`], never a panic or a huge allocation.

use super::Batch;
use crate::domain::{DriverId, Position, Status};

const SPEED: u8 = 1 << 2;
const HEADING: u8 = 1 << 3;
const ACCURACY: u8 = 1 << 4;
const STATUS_MASK: u8 = 0b11;
const KNOWN_FLAGS: u8 = STATUS_MASK | SPEED | HEADING | ACCURACY;
/// The smallest encoded position: empty id, no optional fields.
const MIN_POSITION_LEN: usize = 1 + 1 + 4 + 4 + 8;
/// Bytes before the first position of a batch.
pub const BATCH_HEADER_LEN: usize = 8 + 4;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: {0} runs past the end of the record")]
    Truncated(&'static str),
    #[error("malformed varint")]
    BadVarint,
    #[error("unknown status {0}")]
    BadStatus(u8),
    #[error("unknown flag bits {0:#04x}")]
    BadFlags(u8),
    #[error("driver id is not UTF-8")]
    BadDriverId,
    #[error("{0} bytes left over after the last position")]
    TrailingBytes(usize),
}

/// Bytes [`encode_position`] writes for `p`.
pub fn position_len(p: &Position) -> usize {
    let id = p.driver_id.len();
    let optional = [p.speed_mps, p.heading_deg, p.accuracy_m]
        .iter()
        .filter(|v| v.is_some())
        .count();
    varint_len(id as u64) + id + 1 + 16 + 4 * optional
}

/// Bytes [`encode_batch`] writes for `batch`.
pub fn batch_len(batch: &Batch) -> usize {
    BATCH_HEADER_LEN + batch.positions.iter().map(position_len).sum::<usize>()
}

/// Appends the encoding of `p` to `out`.
pub fn encode_position(p: &Position, out: &mut Vec<u8>) {
    put_varint(out, p.driver_id.len() as u64);
    out.extend_from_slice(p.driver_id.as_bytes());
    let mut flags = p.status as u8 & STATUS_MASK;
    for (value, bit) in [
        (p.speed_mps, SPEED),
        (p.heading_deg, HEADING),
        (p.accuracy_m, ACCURACY),
    ] {
        if value.is_some() {
            flags |= bit;
        }
    }
    out.push(flags);
    out.extend_from_slice(&p.lat_e6.to_le_bytes());
    out.extend_from_slice(&p.lon_e6.to_le_bytes());
    out.extend_from_slice(&p.timestamp.to_le_bytes());
    for value in [p.speed_mps, p.heading_deg, p.accuracy_m]
        .into_iter()
        .flatten()
    {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// Decodes one position from the front of `bytes`; returns it and the bytes after it.
pub fn decode_position(mut bytes: &[u8]) -> Result<(Position, &[u8]), DecodeError> {
    let position = read_position(&mut bytes)?;
    Ok((position, bytes))
}

/// Appends the encoding of `batch` to `out`.
pub fn encode_batch(batch: &Batch, out: &mut Vec<u8>) {
    out.reserve(batch_len(batch));
    out.extend_from_slice(&batch.received_at.to_le_bytes());
    out.extend_from_slice(&(batch.positions.len() as u32).to_le_bytes());
    for p in &batch.positions {
        encode_position(p, out);
    }
}

/// Decodes a whole batch; every byte must belong to it.
pub fn decode_batch(mut bytes: &[u8]) -> Result<Batch, DecodeError> {
    let received_at = i64::from_le_bytes(array(&mut bytes, "receipt time")?);
    let count = u32::from_le_bytes(array(&mut bytes, "position count")?) as usize;
    // Never trust the count for the allocation: garbage could claim four billion positions.
    let mut positions = Vec::with_capacity(count.min(bytes.len() / MIN_POSITION_LEN));
    for _ in 0..count {
        positions.push(read_position(&mut bytes)?);
    }
    if !bytes.is_empty() {
        return Err(DecodeError::TrailingBytes(bytes.len()));
    }
    Ok(Batch {
        received_at,
        positions,
    })
}

/// Checks that `bytes` is exactly one well-formed batch without building it: no allocation, and it
/// fails within a few bytes on most garbage (used to search damaged bytes for intact records).
pub fn check_batch(mut bytes: &[u8]) -> Result<(), DecodeError> {
    take(&mut bytes, 8, "receipt time")?;
    let count = u32::from_le_bytes(array(&mut bytes, "position count")?);
    for _ in 0..count {
        let (_, _, flags) = read_id_and_flags(&mut bytes)?;
        let optional = (flags & (SPEED | HEADING | ACCURACY)).count_ones() as usize;
        take(&mut bytes, 16 + 4 * optional, "position")?;
    }
    match bytes.len() {
        0 => Ok(()),
        left => Err(DecodeError::TrailingBytes(left)),
    }
}

/// Reads the id, status and flags that start every position.
fn read_id_and_flags<'a>(bytes: &mut &'a [u8]) -> Result<(&'a str, Status, u8), DecodeError> {
    let id_len = get_varint(bytes)?;
    let id_len = usize::try_from(id_len).map_err(|_| DecodeError::Truncated("driver id"))?;
    let id = take(bytes, id_len, "driver id")?;
    let id = std::str::from_utf8(id).map_err(|_| DecodeError::BadDriverId)?;
    let [flags] = array(bytes, "flags")?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError::BadFlags(flags & !KNOWN_FLAGS));
    }
    let status = match flags & STATUS_MASK {
        0 => Status::Online,
        1 => Status::Busy,
        2 => Status::Offline,
        other => return Err(DecodeError::BadStatus(other)),
    };
    Ok((id, status, flags))
}

fn read_position(bytes: &mut &[u8]) -> Result<Position, DecodeError> {
    let (id, status, flags) = read_id_and_flags(bytes)?;
    let lat_e6 = i32::from_le_bytes(array(bytes, "latitude")?);
    let lon_e6 = i32::from_le_bytes(array(bytes, "longitude")?);
    let timestamp = i64::from_le_bytes(array(bytes, "timestamp")?);
    let mut optional = |bit: u8, what| -> Result<Option<f32>, DecodeError> {
        if flags & bit == 0 {
            return Ok(None);
        }
        Ok(Some(f32::from_le_bytes(array(bytes, what)?)))
    };
    Ok(Position {
        driver_id: DriverId::new(id),
        lat_e6,
        lon_e6,
        status,
        timestamp,
        speed_mps: optional(SPEED, "speed")?,
        heading_deg: optional(HEADING, "heading")?,
        accuracy_m: optional(ACCURACY, "accuracy")?,
    })
}

/// Splits `n` bytes off the front of `bytes`.
fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
    let (head, rest) = bytes
        .split_at_checked(n)
        .ok_or(DecodeError::Truncated(what))?;
    *bytes = rest;
    Ok(head)
}

fn array<const N: usize>(bytes: &mut &[u8], what: &'static str) -> Result<[u8; N], DecodeError> {
    let mut out = [0; N];
    out.copy_from_slice(take(bytes, N, what)?);
    Ok(out)
}

/// Bytes [`put_varint`] writes for `v`.
pub(crate) fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends `v` as an LEB128 varint (7 bits a byte, low first, high bit = more follows).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an LEB128 varint of at most 10 bytes that fits in a `u64`.
pub(crate) fn get_varint(bytes: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for i in 0..10 {
        let [b] = array(bytes, "varint")?;
        if i == 9 && b > 1 {
            return Err(DecodeError::BadVarint);
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(DecodeError::BadVarint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MAX_DRIVER_ID_LEN;
    use proptest::prelude::*;

    fn pos(id: &str) -> Position {
        Position {
            driver_id: id.into(),
            lat_e6: -89_999_999,
            lon_e6: 179_999_999,
            status: Status::Busy,
            timestamp: 1_790_000_000_123_456,
            speed_mps: None,
            heading_deg: None,
            accuracy_m: None,
        }
    }

    fn round_trip(batch: &Batch) -> Batch {
        let mut buf = Vec::new();
        encode_batch(batch, &mut buf);
        assert_eq!(buf.len(), batch_len(batch));
        decode_batch(&buf).unwrap()
    }

    #[test]
    fn batch_round_trips_with_every_optional_combination() {
        let mut positions = Vec::new();
        for mask in 0..8u8 {
            let mut p = pos(&format!("drv-{mask}"));
            p.status = Status::from_index(mask % 3);
            p.speed_mps = (mask & 1 != 0).then_some(12.5);
            p.heading_deg = (mask & 2 != 0).then_some(359.99);
            p.accuracy_m = (mask & 4 != 0).then_some(0.0);
            positions.push(p);
        }
        let batch = Batch {
            received_at: -5,
            positions,
        };
        assert_eq!(round_trip(&batch), batch);
    }

    #[test]
    fn empty_batch_and_extreme_values_round_trip() {
        let empty = Batch {
            received_at: i64::MAX,
            positions: Vec::new(),
        };
        assert_eq!(round_trip(&empty), empty);
        let mut p = pos("x");
        (p.lat_e6, p.lon_e6, p.timestamp) = (i32::MIN, i32::MAX, i64::MIN);
        let batch = Batch {
            received_at: 0,
            positions: vec![p],
        };
        assert_eq!(round_trip(&batch), batch);
    }

    #[test]
    fn max_length_and_longer_ids_round_trip() {
        for len in [1, 24, 25, MAX_DRIVER_ID_LEN, 127, 128, 300] {
            let p = pos(&"a".repeat(len));
            let mut buf = Vec::new();
            encode_position(&p, &mut buf);
            assert_eq!(buf.len(), position_len(&p), "id of {len}");
            let (back, rest) = decode_position(&buf).unwrap();
            assert_eq!(back, p);
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn a_typical_position_is_compact() {
        let mut buf = Vec::new();
        encode_position(&pos("drv-000042"), &mut buf);
        assert_eq!(buf.len(), 1 + 10 + 1 + 16);
    }

    #[test]
    fn decode_position_returns_the_rest() {
        let mut buf = Vec::new();
        encode_position(&pos("a"), &mut buf);
        encode_position(&pos("b"), &mut buf);
        let (first, rest) = decode_position(&buf).unwrap();
        let (second, rest) = decode_position(rest).unwrap();
        assert_eq!(
            (first.driver_id.as_str(), second.driver_id.as_str()),
            ("a", "b")
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        let mut buf = Vec::new();
        encode_batch(
            &Batch {
                received_at: 1,
                positions: vec![pos("abc")],
            },
            &mut buf,
        );
        let flags_at = BATCH_HEADER_LEN + 1 + 3;
        let mut bad = buf.clone();
        bad[flags_at] = 3;
        assert_eq!(decode_batch(&bad), Err(DecodeError::BadStatus(3)));
        bad[flags_at] = 0x80;
        assert_eq!(decode_batch(&bad), Err(DecodeError::BadFlags(0x80)));
        let mut bad = buf.clone();
        bad[BATCH_HEADER_LEN + 1] = 0xff;
        assert_eq!(decode_batch(&bad), Err(DecodeError::BadDriverId));
        let mut bad = buf.clone();
        bad.push(0);
        assert_eq!(decode_batch(&bad), Err(DecodeError::TrailingBytes(1)));
        assert!(matches!(
            decode_batch(&buf[..buf.len() - 1]),
            Err(DecodeError::Truncated(_))
        ));
        let mut huge_count = buf.clone();
        huge_count[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_batch(&huge_count),
            Err(DecodeError::Truncated(_))
        ));
    }

    #[test]
    fn varints_round_trip_and_reject_overlong() {
        for v in [0, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v));
            let mut slice = buf.as_slice();
            assert_eq!(get_varint(&mut slice), Ok(v));
            assert!(slice.is_empty());
        }
        let mut eleven = [0x80u8; 11].as_slice();
        assert_eq!(get_varint(&mut eleven), Err(DecodeError::BadVarint));
        let mut too_big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02].as_slice();
        assert_eq!(get_varint(&mut too_big), Err(DecodeError::BadVarint));
    }

    fn any_position() -> impl Strategy<Value = Position> {
        (
            "[A-Za-z0-9_.:@-]{1,64}",
            any::<i32>(),
            any::<i32>(),
            0u8..3,
            any::<i64>(),
            proptest::option::of(0f32..1e6),
            proptest::option::of(0f32..360.0),
            proptest::option::of(0f32..1e4),
        )
            .prop_map(
                |(id, lat, lon, status, ts, speed, heading, accuracy)| Position {
                    driver_id: id.into(),
                    lat_e6: lat,
                    lon_e6: lon,
                    status: Status::from_index(status),
                    timestamp: ts,
                    speed_mps: speed,
                    heading_deg: heading,
                    accuracy_m: accuracy,
                },
            )
    }

    proptest! {
        #[test]
        fn any_batch_round_trips(
            received_at in any::<i64>(),
            positions in proptest::collection::vec(any_position(), 0..50),
        ) {
            let batch = Batch { received_at, positions };
            let mut buf = Vec::new();
            encode_batch(&batch, &mut buf);
            prop_assert_eq!(check_batch(&buf), Ok(()));
            prop_assert_eq!(round_trip(&batch), batch);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let decoded = decode_batch(&bytes);
            prop_assert_eq!(check_batch(&bytes), decoded.map(|_| ()));
            let _ = decode_position(&bytes);
        }

        #[test]
        fn mutated_batches_never_panic(
            positions in proptest::collection::vec(any_position(), 1..5),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut buf = Vec::new();
            encode_batch(&Batch { received_at: 7, positions }, &mut buf);
            let i = at.index(buf.len());
            buf[i] = byte;
            prop_assert_eq!(check_batch(&buf), decode_batch(&buf).map(|_| ()));
        }
    }
}
