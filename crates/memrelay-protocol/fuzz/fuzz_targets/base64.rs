//! Base64 for meta keys: encoding round-trips, and decoding arbitrary bytes
//! never panics and only succeeds on well-formed input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memrelay_protocol::base64::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let mut enc = Vec::new();
    encode(data, &mut enc);
    assert_eq!(enc.len(), data.len().div_ceil(3) * 4);
    if data.is_empty() {
        // Nothing to round-trip: an empty key is not a key.
        assert_eq!(decode(&enc), None);
    } else {
        assert_eq!(decode(&enc).as_deref(), Some(data));
    }

    if let Some(dec) = decode(data) {
        assert!(!data.is_empty() && data.len() % 4 == 0);
        let pad = data.iter().rev().take_while(|&&c| c == b'=').count();
        assert!(pad <= 2);
        assert_eq!(dec.len(), data.len() / 4 * 3 - pad);
        // Decoding is lenient about the unused low bits of the last symbol,
        // so re-encoding may differ from `data`; it must decode the same.
        let mut again = Vec::new();
        encode(&dec, &mut again);
        assert_eq!(again.len(), data.len());
        assert_eq!(decode(&again), Some(dec));
    }
});
