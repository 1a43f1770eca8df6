//! Number parsing with memcached's exact acceptance rules.
//!
//! memcached parses numeric tokens with `strtol`/`strtoul` wrappers
//! (`safe_strtol`, `safe_strtoul`, `safe_strtoull` in util.c): leading
//! whitespace and a sign are allowed, the digits must be followed by the end of
//! the token or by a whitespace byte (anything after that is ignored), a value
//! out of range fails, and an unsigned parse fails on a negative number. We
//! reproduce those rules so a token memcached accepts is accepted here and one
//! it rejects gets the same error.

fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Splits a token into (negative, digits) following `strtol`'s grammar, and
/// checks that what follows the digits is acceptable to memcached.
fn split(tok: &[u8]) -> Option<(bool, &[u8])> {
    let mut i = 0;
    while i < tok.len() && is_c_space(tok[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < tok.len() && (tok[i] == b'+' || tok[i] == b'-') {
        neg = tok[i] == b'-';
        i += 1;
    }
    let start = i;
    while i < tok.len() && tok[i].is_ascii_digit() {
        i += 1;
    }
    if i == start {
        return None;
    }
    if i < tok.len() && !is_c_space(tok[i]) {
        return None;
    }
    Some((neg, &tok[start..i]))
}

fn digits_u64(d: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &b in d {
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// `safe_strtoull`: a 64-bit unsigned number; negative numbers are rejected.
pub fn parse_u64(tok: &[u8]) -> Option<u64> {
    let (neg, d) = split(tok)?;
    let v = digits_u64(d)?;
    if neg {
        // strtoull negates; memcached rejects the result when it looks
        // negative as a signed number and a '-' was present. "-0" stays 0.
        return if v == 0 { Some(0) } else { None };
    }
    Some(v)
}

/// `safe_strtoul` into a `uint32_t`: memcached parses with `strtoul` (64-bit on
/// Linux) and stores into 32 bits, so larger values wrap. Negative numbers are
/// rejected unless their magnitude is small enough that strtoul's negation
/// does not look negative (never for 64-bit longs), so: rejected.
pub fn parse_u32_wrapping(tok: &[u8]) -> Option<u32> {
    let v = parse_u64(tok)?;
    Some(v as u32)
}

/// `safe_strtol` into an `int32_t`: out of the 32-bit range fails.
pub fn parse_i32(tok: &[u8]) -> Option<i32> {
    let (neg, d) = split(tok)?;
    let v = digits_u64(d)?;
    if neg {
        if v > (i32::MAX as u64) + 1 {
            return None;
        }
        Some((-(v as i64)) as i32)
    } else {
        if v > i32::MAX as u64 {
            return None;
        }
        Some(v as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memcached_acceptance_rules() {
        assert_eq!(parse_u64(b"123"), Some(123));
        assert_eq!(parse_u64(b"+7"), Some(7));
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"-0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"12a"), None);
        assert_eq!(parse_u64(b"12\r"), Some(12));
        assert_eq!(parse_u64(b"12\tjunk"), Some(12));
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"abc"), None);
        assert_eq!(parse_i32(b"-1"), Some(-1));
        assert_eq!(parse_i32(b"2147483647"), Some(i32::MAX));
        assert_eq!(parse_i32(b"2147483648"), None);
        assert_eq!(parse_i32(b"-2147483648"), Some(i32::MIN));
        assert_eq!(parse_i32(b"-2147483649"), None);
        assert_eq!(parse_u32_wrapping(b"4294967296"), Some(0));
    }
}
