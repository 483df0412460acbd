//! Optional request signing for devices: proof that a request body came from the holder of the
//! key's signing secret and was made recently.
//!
//! # Wire format
//!
//! * `X-Signature-Timestamp`: the request time as Unix seconds in decimal ASCII (`1790000000`),
//!   accepted within ±5 minutes ([`MAX_SKEW_SECS`]) of the server clock.
//! * `X-Signature`: 64 hex digits (either case) of
//!   `HMAC-SHA256(key = signing secret, message = "{timestamp}.{body}")`, where `{timestamp}` is the
//!   header value byte for byte, `.` is one ASCII full stop, and `{body}` is the raw request body
//!   bytes as sent (before any decompression or JSON parsing). The HMAC key is the signing secret
//!   string exactly as printed at key creation (`fts_...`), as UTF-8 bytes.
//!
//! In shell: `printf '%s.%s' "$ts" "$body" | openssl dgst -sha256 -hmac "$secret" -hex`.
//!
//! The comparison is constant-time (`hmac`'s `verify_slice`). Errors say which part failed
//! ([`SignatureError`]) so devices with a drifting clock can be told apart from forgeries.
//!
//! Replays inside the 5-minute window are not detected here: a replayed position is a duplicate of
//! the same driver and timestamp (see [`super::filters`]) and a replayed POST with an
//! `Idempotency-Key` is answered from [`super::idempotency`].

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Header carrying the hex HMAC.
pub const SIGNATURE_HEADER: &str = "x-signature";
/// Header carrying the Unix-seconds timestamp.
pub const TIMESTAMP_HEADER: &str = "x-signature-timestamp";
/// Largest accepted difference between the signature timestamp and the server clock.
pub const MAX_SKEW_SECS: i64 = 5 * 60;

type HmacSha256 = Hmac<Sha256>;

/// Why a signature was not accepted (all are 401 `unauthorized` for the HTTP layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("X-Signature and X-Signature-Timestamp are required for this key")]
    Missing,
    #[error("X-Signature-Timestamp must be Unix seconds and X-Signature 64 hex digits")]
    Malformed,
    #[error("X-Signature-Timestamp is more than 5 minutes from the server time")]
    Stale,
    #[error("X-Signature does not match the request body")]
    Bad,
}

impl SignatureError {
    pub const ALL: [SignatureError; 4] = [
        SignatureError::Missing,
        SignatureError::Malformed,
        SignatureError::Stale,
        SignatureError::Bad,
    ];

    /// The `reason` label of `auth_failures_total`.
    pub fn reason(self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::Stale => "signature_stale",
            SignatureError::Bad => "signature_bad",
        }
    }
}

/// Parses `X-Signature-Timestamp`: 1–12 ASCII digits (no sign, no spaces).
pub fn parse_timestamp(value: &[u8]) -> Result<i64, SignatureError> {
    if value.is_empty() || value.len() > 12 || !value.iter().all(u8::is_ascii_digit) {
        return Err(SignatureError::Malformed);
    }
    Ok(value
        .iter()
        .fold(0i64, |n, &d| n * 10 + i64::from(d - b'0')))
}

/// Parses `X-Signature`: exactly 64 hex digits.
pub fn parse_signature(value: &[u8]) -> Result<[u8; 32], SignatureError> {
    let mut out = [0u8; 32];
    if value.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    hex::decode_to_slice(value, &mut out).map_err(|_| SignatureError::Malformed)?;
    Ok(out)
}

/// The HMAC over `"{timestamp}.{body}"`. HMAC takes keys of any length, so this is `None` never in
/// practice; callers treat `None` as a failed signature rather than panicking.
fn mac(secret: &[u8], timestamp: &[u8], body: &[u8]) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(secret).ok()?;
    mac.update(timestamp);
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

/// The `X-Signature` value for a request (what a device computes); lowercase hex.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    mac(secret.as_bytes(), timestamp.as_bytes(), body)
        .map(|m| hex::encode(m.finalize().into_bytes()))
        .unwrap_or_default()
}

/// Verifies a signed request. `signature` and `timestamp` are the header values (`None` when
/// absent), `now_secs` the server clock in Unix seconds. The timestamp is checked before the HMAC,
/// so a stale request costs no hashing.
pub fn verify(
    secret: &str,
    signature: Option<&[u8]>,
    timestamp: Option<&[u8]>,
    body: &[u8],
    now_secs: i64,
) -> Result<(), SignatureError> {
    let (Some(signature), Some(timestamp)) = (signature, timestamp) else {
        return Err(SignatureError::Missing);
    };
    let ts = parse_timestamp(timestamp)?;
    let expected = parse_signature(signature)?;
    if ts.abs_diff(now_secs) > MAX_SKEW_SECS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    mac(secret.as_bytes(), timestamp, body)
        .ok_or(SignatureError::Bad)?
        .verify_slice(&expected)
        .map_err(|_| SignatureError::Bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "fts_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXM";
    const NOW: i64 = 1_790_000_000;
    const BODY: &[u8] = br#"{"driver_id":"d1","latitude":31.2,"longitude":121.4}"#;

    fn check(sig: &str, ts: &str, body: &[u8]) -> Result<(), SignatureError> {
        verify(SECRET, Some(sig.as_bytes()), Some(ts.as_bytes()), body, NOW)
    }

    #[test]
    fn matches_an_independent_hmac_vector() {
        // RFC 4231 test case 2 pins the library; then `mac` must equal HMAC over "ts.body".
        let out = mac(b"Jefe", b"what do ya want for nothing", b"?").unwrap();
        let mut rfc = HmacSha256::new_from_slice(b"Jefe").unwrap();
        rfc.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(rfc.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut manual = HmacSha256::new_from_slice(b"Jefe").unwrap();
        manual.update(b"what do ya want for nothing.?");
        assert_eq!(out.finalize().into_bytes(), manual.finalize().into_bytes());
    }

    #[test]
    fn a_correct_signature_verifies() {
        let ts = NOW.to_string();
        let sig = sign(SECRET, &ts, BODY);
        assert_eq!(sig.len(), 64);
        assert_eq!(check(&sig, &ts, BODY), Ok(()));
        assert_eq!(
            check(&sig.to_uppercase(), &ts, BODY),
            Ok(()),
            "hex case-insensitive"
        );
        // The edges of the window.
        for off in [-MAX_SKEW_SECS, MAX_SKEW_SECS] {
            let ts = (NOW + off).to_string();
            assert_eq!(check(&sign(SECRET, &ts, BODY), &ts, BODY), Ok(()));
        }
        assert_eq!(check(&sign(SECRET, &ts, b""), &ts, b""), Ok(()));
    }

    #[test]
    fn missing_headers() {
        let ts = NOW.to_string();
        let sig = sign(SECRET, &ts, BODY);
        assert_eq!(
            verify(SECRET, None, Some(ts.as_bytes()), BODY, NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(SECRET, Some(sig.as_bytes()), None, BODY, NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(SECRET, None, None, BODY, NOW),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn stale_timestamps() {
        for off in [-MAX_SKEW_SECS - 1, MAX_SKEW_SECS + 1, -86_400] {
            let ts = (NOW + off).to_string();
            assert_eq!(
                check(&sign(SECRET, &ts, BODY), &ts, BODY),
                Err(SignatureError::Stale),
                "{off}"
            );
        }
    }

    #[test]
    fn bad_signatures() {
        let ts = NOW.to_string();
        let sig = sign(SECRET, &ts, BODY);
        let mut tampered = BODY.to_vec();
        tampered[5] ^= 1;
        assert_eq!(check(&sig, &ts, &tampered), Err(SignatureError::Bad));
        assert_eq!(
            verify(
                "fts_other",
                Some(sig.as_bytes()),
                Some(ts.as_bytes()),
                BODY,
                NOW
            ),
            Err(SignatureError::Bad)
        );
        // Signature for another timestamp inside the window.
        let other = (NOW + 1).to_string();
        assert_eq!(check(&sig, &other, BODY), Err(SignatureError::Bad));
        let mut flipped = sig.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            check(std::str::from_utf8(&flipped).unwrap(), &ts, BODY),
            Err(SignatureError::Bad)
        );
    }

    #[test]
    fn malformed_headers() {
        let ts = NOW.to_string();
        let sig = sign(SECRET, &ts, BODY);
        for bad_ts in [
            "",
            "-1790000000",
            "1790000000.5",
            " 1790000000",
            "17e8",
            "1234567890123",
        ] {
            assert_eq!(
                check(&sig, bad_ts, BODY),
                Err(SignatureError::Malformed),
                "{bad_ts:?}"
            );
        }
        for bad_sig in [
            "",
            &sig[..63],
            &format!("{sig}0"),
            &sig.replace(&sig[..1], "g"),
        ] {
            assert_eq!(
                check(bad_sig, &ts, BODY),
                Err(SignatureError::Malformed),
                "{bad_sig:?}"
            );
        }
        assert_eq!(
            check(&format!("sha256={}", &sig[..57]), &ts, BODY),
            Err(SignatureError::Malformed)
        );
    }

    proptest! {
        #[test]
        fn parsers_never_panic(
            sig in proptest::collection::vec(any::<u8>(), 0..80),
            ts in proptest::collection::vec(any::<u8>(), 0..20),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            now in any::<i64>(),
        ) {
            let _ = parse_signature(&sig);
            let _ = parse_timestamp(&ts);
            let _ = verify(SECRET, Some(&sig), Some(&ts), &body, now);
        }

        #[test]
        fn digit_timestamps_never_overflow(ts in "[0-9]{1,12}", now in any::<i64>()) {
            let sig = sign(SECRET, &ts, BODY);
            let _ = verify(SECRET, Some(sig.as_bytes()), Some(ts.as_bytes()), BODY, now);
        }
    }
}
