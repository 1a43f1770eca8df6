//! CAS uniques that cannot lie across replicas and restarts.
//!
//! A memcached's CAS unique is a counter of that process: a restarted
//! server counts from 1 again, and the primary and its backup count
//! independently. A unique a client got before a failover or a restart
//! could therefore match an item written since, and a `cas` would
//! overwrite a write the client never saw. So the uniques memrelay hands
//! out (`gets`, `gats`, `mg ... c`) carry a 16-bit stamp of the server and
//! process that issued them, above the server's own 48 bits:
//!
//! `token = stamp << 48 | unique`
//!
//! The stamp hashes the server's name with its pid and start time (read by
//! the prober), so every memrelay in front of the same servers hands out
//! the same tokens. A `cas` (or `C<token>`) is sent to its replica with the
//! server's own unique only if the stamp is that replica's current one;
//! otherwise with [`NO_ITEM`], a unique memcached's counter never reaches
//! (not 0: `ma ... C0` means "no compare"): the server then answers
//! `EXISTS` or `NOT_FOUND` itself, exactly as for any stale unique, and
//! never stores. A unique too large for 48 bits (one set by a client
//! with the meta `E` flag) is handed out as a token that never matches.

/// Bits of the server's own unique kept in a token.
const RAW_BITS: u32 = 48;
const RAW_MASK: u64 = (1 << RAW_BITS) - 1;
/// A stamp no server has: tokens that must never match.
const NEVER: u16 = 0xffff;
/// The unique sent for a token that is not the replica's: no item has it.
pub(crate) const NO_ITEM: u64 = u64::MAX;

/// The stamp of a server process: its name, pid and start time.
pub fn stamp(name: &str, pid: u64, boot: i64) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name
        .bytes()
        .chain(pid.to_le_bytes())
        .chain(boot.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let s = (h ^ (h >> 16) ^ (h >> 32) ^ (h >> 48)) as u16;
    if s == NEVER {
        NEVER - 1
    } else {
        s
    }
}

/// The token a client gets for `unique` issued by the server with `stamp`.
pub fn token(stamp: u16, unique: u64) -> u64 {
    if unique > RAW_MASK {
        return u64::from(NEVER) << RAW_BITS;
    }
    u64::from(stamp) << RAW_BITS | unique
}

/// The unique to send to the server with `stamp` for a client's `token`:
/// the server's own when the token is its, else [`NO_ITEM`].
pub(crate) fn unique_for(token: u64, stamp: u16) -> u64 {
    let issued = (token >> RAW_BITS) as u16;
    if issued == stamp && issued != NEVER {
        token & RAW_MASK
    } else {
        NO_ITEM
    }
}

/// Rewrites the `c<unique>` flag of a meta reply's first line into a token
/// (`None` when the reply has none, or is not a meta reply line).
pub(crate) fn meta_reply_with_token(reply: &[u8], stamp: u16) -> Option<Vec<u8>> {
    let line_end = reply.windows(2).position(|w| w == b"\r\n")?;
    let line = &reply[..line_end];
    let mut out = Vec::with_capacity(reply.len() + 8);
    let mut found = false;
    for (i, tok) in line.split(|&b| b == b' ').enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        let unique = (i > 0 && tok.first() == Some(&b'c'))
            .then(|| memrelay_protocol::number::parse_u64(&tok[1..]))
            .flatten();
        match unique {
            Some(u) if !found => {
                found = true;
                out.push(b'c');
                out.extend_from_slice(token(stamp, u).to_string().as_bytes());
            }
            _ => out.extend_from_slice(tok),
        }
    }
    if !found {
        return None;
    }
    out.extend_from_slice(&reply[line_end..]);
    Some(out)
}

/// Whether a meta request asks for the CAS unique back (`c`).
pub(crate) fn asks_cas(flags: &[u8]) -> bool {
    flags.split(|&b| b == b' ').any(|t| t == b"c")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_its_issuer() {
        let a = stamp("10.0.0.1:11211", 42, 1_700_000_000);
        let restarted = stamp("10.0.0.1:11211", 43, 1_700_000_100);
        let backup = stamp("10.0.0.2:11211", 42, 1_700_000_000);
        assert_ne!(a, restarted);
        assert_ne!(a, backup);
        let t = token(a, 7);
        assert_eq!(unique_for(t, a), 7);
        assert_eq!(unique_for(t, restarted), NO_ITEM, "issued before a restart");
        assert_eq!(unique_for(t, backup), NO_ITEM, "issued by another replica");
        // A client's own number, never handed out by memrelay.
        assert_eq!(unique_for(7, a), NO_ITEM);
    }

    #[test]
    fn a_unique_past_48_bits_never_matches() {
        let a = stamp("s", 1, 1);
        let t = token(a, 1 << 50);
        assert_eq!(unique_for(t, a), NO_ITEM);
        assert_eq!(unique_for(t, NEVER), NO_ITEM);
    }

    #[test]
    fn the_meta_c_flag_is_rewritten() {
        let s = stamp("s", 1, 1);
        let got = meta_reply_with_token(b"VA 2 f5 c17 t-1\r\nhi\r\n", s).unwrap();
        assert_eq!(
            got,
            format!("VA 2 f5 c{} t-1\r\nhi\r\n", token(s, 17)).into_bytes()
        );
        assert_eq!(
            meta_reply_with_token(b"HD c3\r\n", s).unwrap(),
            format!("HD c{}\r\n", token(s, 3)).into_bytes()
        );
        assert!(meta_reply_with_token(b"HD f3\r\n", s).is_none());
        assert!(meta_reply_with_token(b"EN\r\n", s).is_none());
        assert!(asks_cas(b"v c t"));
        assert!(!asks_cas(b"v C12 t"));
    }
}
