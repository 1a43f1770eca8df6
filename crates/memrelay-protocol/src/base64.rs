//! Standard base64 (RFC 4648, with padding), for meta commands' `b` flag:
//! the proxy routes a binary key by its decoded bytes, and writes keys it
//! must invalidate as base64 so any key survives the text protocol.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn value(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

/// Decodes `input`; `None` if it is not valid padded base64.
pub fn decode(input: &[u8]) -> Option<Vec<u8>> {
    if input.is_empty() || input.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    for (n, chunk) in input.chunks(4).enumerate() {
        let last = n == input.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut v = 0u32;
        for &c in &chunk[..4 - pad] {
            v = (v << 6) | value(c)?;
        }
        v <<= 6 * pad as u32;
        let bytes = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Encodes `input` with padding.
pub fn encode(input: &[u8], out: &mut Vec<u8>) {
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
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
    }
}
