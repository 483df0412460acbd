//! The write-ahead log's record decoder on arbitrary bytes (what a corrupt disk can hand it):
//! errors, never panics.
#![no_main]

use fleettracker::wal::codec::{check_batch, decode_batch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let checked = check_batch(bytes);
    let decoded = decode_batch(bytes);
    assert_eq!(checked.is_ok(), decoded.is_ok());
});
