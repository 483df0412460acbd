//! Where a point lives: its UTC day (one keyspace per day), its chunk window inside the day, and the
//! chunk key `driver id ‖ 0x00 ‖ window start`; plus the opaque paging cursor.
//!
//! The window start is big-endian with the sign bit flipped, so keys sort by driver, then time, and
//! negative timestamps sort before positive ones. Driver ids never contain 0x00, so the separator
//! ends every id: `a\0…` sorts before `a-1\0…` and `ab\0…`, and a scan over `a\0`‥`a\0\xff…` never
//! reaches another driver.

use super::HistoryError;
use crate::domain::Micros;
use chrono::{DateTime, NaiveDate};

pub const MICROS_PER_DAY: Micros = 86_400 * 1_000_000;

/// The UTC day number (days since 1970-01-01) of a timestamp.
pub fn day_of(ts: Micros) -> i64 {
    ts.div_euclid(MICROS_PER_DAY)
}

pub fn day_start(day: i64) -> Micros {
    day.saturating_mul(MICROS_PER_DAY)
}

/// The last microsecond of a day.
pub fn day_end(day: i64) -> Micros {
    day_start(day).saturating_add(MICROS_PER_DAY - 1)
}

/// Start of the window of length `window` (which divides a day) holding `ts`.
pub fn window_of(ts: Micros, window: Micros) -> Micros {
    ts - ts.rem_euclid(window)
}

/// Which of the two kinds of day keyspace a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Every point, in short windows.
    Hot,
    /// A simplified track, in long windows.
    Cold,
}

impl Tier {
    fn prefix(self) -> &'static str {
        match self {
            Tier::Hot => "hot.",
            Tier::Cold => "cold.",
        }
    }
}

/// Keyspace name of a day: `hot.2026-01-31` or `cold.2026-01-31`.
pub fn keyspace_name(tier: Tier, day: i64) -> String {
    let date = DateTime::from_timestamp(day.saturating_mul(86_400), 0)
        .map(|t| t.date_naive().format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| format!("day{day}"));
    format!("{}{date}", tier.prefix())
}

/// The tier and day of a day keyspace's name; `None` for any other keyspace.
pub fn parse_keyspace_name(name: &str) -> Option<(Tier, i64)> {
    let (tier, date) = if let Some(date) = name.strip_prefix(Tier::Hot.prefix()) {
        (Tier::Hot, date)
    } else {
        (Tier::Cold, name.strip_prefix(Tier::Cold.prefix())?)
    };
    let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let midnight = date.and_hms_opt(0, 0, 0)?.and_utc().timestamp();
    Some((tier, midnight.div_euclid(86_400)))
}

fn ordered(ts: Micros) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

/// The key of `driver_id`'s chunk whose window starts at `window_start`.
pub fn chunk_key(driver_id: &str, window_start: Micros) -> Vec<u8> {
    let mut key = Vec::with_capacity(driver_id.len() + 9);
    key.extend_from_slice(driver_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&ordered(window_start));
    key
}

/// The driver id and window start of a chunk key.
pub fn parse_chunk_key(key: &[u8]) -> Option<(&str, Micros)> {
    let split = key.len().checked_sub(9)?;
    let (id, rest) = key.split_at(split);
    if rest[0] != 0 {
        return None;
    }
    let bits = u64::from_be_bytes(rest[1..].try_into().ok()?);
    Some((std::str::from_utf8(id).ok()?, (bits ^ (1 << 63)) as i64))
}

/// Where the next page starts, bound to the driver it was made for. Text form: 32 hex digits, the
/// next timestamp (ordered bytes) and a check over both, so a cursor from another driver or a typo
/// is refused rather than silently paging from the wrong place.
pub fn encode_cursor(driver_id: &str, next: Micros) -> String {
    let check = cursor_check(driver_id, next);
    let mut text = String::with_capacity(32);
    for byte in ordered(next).iter().chain(check.to_be_bytes().iter()) {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// The timestamp a cursor resumes at, or [`HistoryError::BadCursor`].
pub fn decode_cursor(driver_id: &str, text: &str) -> Result<Micros, HistoryError> {
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(HistoryError::BadCursor);
    }
    let number = |range: std::ops::Range<usize>| {
        u64::from_str_radix(&text[range], 16).map_err(|_| HistoryError::BadCursor)
    };
    let next = (number(0..16)? ^ (1 << 63)) as i64;
    if number(16..32)? != cursor_check(driver_id, next) {
        return Err(HistoryError::BadCursor);
    }
    Ok(next)
}

/// FNV-1a over the driver id and the timestamp: stable across builds and processes.
fn cursor_check(driver_id: &str, next: Micros) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ 0x5eed_c0de;
    for byte in driver_id.bytes().chain(next.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_driver_then_time_with_negatives_first() {
        let keys = [
            chunk_key("a", -60_000_000),
            chunk_key("a", 0),
            chunk_key("a", 60_000_000),
            chunk_key("a-1", i64::MIN),
            chunk_key("ab", -60_000_000),
        ];
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(parse_chunk_key(&keys[0]), Some(("a", -60_000_000)));
        assert_eq!(parse_chunk_key(&keys[3]), Some(("a-1", i64::MIN)));
    }

    #[test]
    fn days_and_windows_floor_towards_the_past() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(-1), -1);
        assert_eq!(day_of(MICROS_PER_DAY), 1);
        assert_eq!(day_end(0), MICROS_PER_DAY - 1);
        assert_eq!(window_of(-1, 30_000_000), -30_000_000);
        assert_eq!(window_of(59_999_999, 30_000_000), 30_000_000);
    }

    #[test]
    fn keyspace_names_round_trip() {
        for day in [-1, 0, 20_454, 2_900_000] {
            for tier in [Tier::Hot, Tier::Cold] {
                let name = keyspace_name(tier, day);
                assert_eq!(parse_keyspace_name(&name), Some((tier, day)), "{name}");
            }
        }
        assert_eq!(keyspace_name(Tier::Hot, 0), "hot.1970-01-01");
        assert_eq!(parse_keyspace_name("meta"), None);
        assert_eq!(parse_keyspace_name("hot.yesterday"), None);
    }

    #[test]
    fn cursors_round_trip_and_refuse_strangers() {
        let cursor = encode_cursor("drv-1", 1_790_000_000_123_456);
        assert_eq!(
            decode_cursor("drv-1", &cursor).ok(),
            Some(1_790_000_000_123_456)
        );
        assert!(matches!(
            decode_cursor("drv-2", &cursor),
            Err(HistoryError::BadCursor)
        ));
        let mut tampered = cursor.clone().into_bytes();
        tampered[15] = if tampered[15] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap_or_default();
        assert!(matches!(
            decode_cursor("drv-1", &tampered),
            Err(HistoryError::BadCursor)
        ));
        for junk in ["", "zz", "not a cursor at all, not at all!"] {
            assert!(matches!(
                decode_cursor("drv-1", junk),
                Err(HistoryError::BadCursor)
            ));
        }
    }
}
