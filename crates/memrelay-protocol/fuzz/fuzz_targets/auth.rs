//! The input of clients that have not authenticated: framing never panics,
//! always makes progress, never reads past the input, and does not change
//! when the input arrives in pieces; credentials are what a client can send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memrelay_protocol::auth::{parse_auth, AuthError, AuthInput, AUTH_MAX_DATA};

fuzz_target!(|data: &[u8]| {
    let first = parse_auth(data);
    assert_eq!(first, parse_auth(data), "parsing is deterministic");
    let Ok(Some((input, n))) = first else {
        return;
    };
    assert!(n >= 1 && n <= data.len(), "consumed {n} of {}", data.len());
    if let AuthInput::Credentials { user, password } = input {
        for token in [user, password] {
            assert!(!token.is_empty());
            assert!(!token.iter().any(|&b| b == b' ' || b == 0));
            assert!(token.len() <= AUTH_MAX_DATA);
        }
    }
    // Any prefix of this input is incomplete, or a line already too long
    // (some 64 prefixes, and the last few bytes each).
    let cuts = (0..n).step_by((n / 64).max(1)).chain(n.saturating_sub(4)..n);
    for cut in cuts {
        match parse_auth(&data[..cut]) {
            Ok(None) | Err(AuthError::LineTooLong) => {}
            other => panic!("prefix {cut} of {n}: {other:?}"),
        }
    }
});
