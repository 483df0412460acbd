//! Timestamps as microseconds since the Unix epoch: one `i64` per position, compared without
//! allocation, formatted as RFC 3339 only when a response is written.

use chrono::{DateTime, SecondsFormat, Utc};

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

/// The wall clock, in microseconds.
pub fn now_micros() -> Micros {
    Utc::now().timestamp_micros()
}

/// Parses an RFC 3339 timestamp (any offset) to microseconds; `None` when it is not one.
pub fn parse_rfc3339(text: &str) -> Option<Micros> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc).timestamp_micros())
}

/// [`parse_rfc3339`] for a value from a URL's query string, where an unencoded `+` of an offset
/// (`...T08:00:00+08:00`) arrives as a space: a space before a trailing `hh:mm` can only be that
/// `+`, so it is read as one.
pub fn parse_rfc3339_in_query(text: &str) -> Option<Micros> {
    parse_rfc3339(text).or_else(|| {
        let (time, offset) = text.rsplit_once(' ')?;
        let looks_like_offset = offset.len() == 5
            && offset.as_bytes()[2] == b':'
            && offset.bytes().filter(u8::is_ascii_digit).count() == 4;
        looks_like_offset.then(|| parse_rfc3339(&format!("{time}+{offset}")))?
    })
}

/// Formats microseconds as RFC 3339 in UTC with as many fraction digits as needed (`...Z`).
pub fn format_rfc3339(micros: Micros) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plus_offset_lost_to_query_decoding_is_read_back() {
        let east = parse_rfc3339_in_query("2026-11-22T08:00:00 08:00");
        assert_eq!(east, parse_rfc3339("2026-11-22T00:00:00Z"));
        assert_eq!(
            parse_rfc3339_in_query("2026-11-22T00:00:00-01:30"),
            parse_rfc3339("2026-11-22T01:30:00Z")
        );
        for bad in [
            "2026-11-22T08:00:00 8:00",
            "2026-11-22T08:00:00 0800",
            "yesterday 08:00",
        ] {
            assert_eq!(parse_rfc3339_in_query(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trips_with_fraction_and_offset() {
        let t = parse_rfc3339("2026-11-22T01:02:03.250+01:00").unwrap();
        assert_eq!(format_rfc3339(t), "2026-11-22T00:02:03.250Z");
        let t = parse_rfc3339("2026-11-22T00:00:00Z").unwrap();
        assert_eq!(format_rfc3339(t), "2026-11-22T00:00:00Z");
    }

    #[test]
    fn rejects_non_rfc3339() {
        for bad in [
            "",
            "yesterday",
            "2026-11-22",
            "2026-11-22 00:00:00",
            "1700000000",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
    }
}
