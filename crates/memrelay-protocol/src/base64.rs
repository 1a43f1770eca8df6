//! Standard base64 (RFC 4648, with padding), for meta commands' `b` flag:
//! the proxy routes a binary key by its decoded bytes, and writes keys it
//! must invalidate as base64 so any key survives the text protocol.
//!
//! The `base64` crate does the work. This module fixes the dialect in one
//! place: padding required, and the unused low bits of the last symbol
//! ignored rather than refused (a proxy routes the keys clients send; it
//! does not judge their encoding).

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

const META_KEYS: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical)
        .with_decode_allow_trailing_bits(true),
);

/// Decodes `input`; `None` if it is not valid padded base64 (or empty: an
/// empty key is not a key).
pub fn decode(input: &[u8]) -> Option<Vec<u8>> {
    if input.is_empty() {
        return None;
    }
    META_KEYS.decode(input).ok()
}

/// Encodes `input` with padding, appending to `out`.
pub fn encode(input: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(
        start + base64::encoded_len(input.len(), true).unwrap_or(0),
        0,
    );
    let written = META_KEYS
        .encode_slice(input, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for input in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            b"\x00\xff key\r\n",
        ] {
            let mut enc = Vec::new();
            encode(input, &mut enc);
            if !input.is_empty() {
                assert_eq!(decode(&enc).as_deref(), Some(input));
            }
        }
        let mut enc = Vec::new();
        encode(b"foobar", &mut enc);
        assert_eq!(enc, b"Zm9vYmFy");
        assert_eq!(decode(b"Zm9vYg=="), Some(b"foob".to_vec()));
        assert_eq!(decode(b"Zm9v!g=="), None);
        assert_eq!(decode(b"Zm9"), None);
        assert_eq!(decode(b"Zg==Zg=="), None);
        assert_eq!(decode(b"Zm9vYh=="), Some(b"foob".to_vec()), "trailing bits");
        assert_eq!(decode(b"Zm9vYg"), None, "padding is required");
    }
}
