//! Request decoding and validation on arbitrary bytes: the single and batch bodies, exactly as the
//! POST endpoints decode them. Must never panic; whatever is refused is a 4xx.
#![no_main]

use fleettracker::api::locations::{decode_batch, decode_single};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_790_000_000_000_000;

fuzz_target!(|body: &[u8]| {
    if let Err(e) = decode_single(body, NOW) {
        assert!(e.status().is_client_error());
    }
    if let Err(e) = decode_batch(body, NOW) {
        assert!(e.status().is_client_error());
    }
});
