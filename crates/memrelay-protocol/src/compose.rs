//! Writing canonical request lines for the servers.
//!
//! The proxy never forwards a client's line verbatim: it re-writes it from
//! the parsed fields. That normalises spacing and trailing junk memcached
//! would ignore, never passes on bytes the proxy did not understand, and
//! drops `noreply` (the proxy always wants the server's answer, to keep its
//! FIFO of requests in step and to know what to mirror).

use bytes::BufMut;

use crate::request::Command;

fn put_num<B: BufMut>(out: &mut B, n: impl itoa::Integer) {
    let mut b = itoa::Buffer::new();
    out.put_slice(b.format(n).as_bytes());
}

/// `get|gets|gat|gats [exptime] k1 k2 ...\r\n`
pub fn retrieval<'k, B: BufMut>(
    out: &mut B,
    command: Command,
    exptime: i32,
    keys: impl IntoIterator<Item = &'k [u8]>,
) {
    out.put_slice(command.name());
    if matches!(command, Command::Gat | Command::Gats) {
        out.put_u8(b' ');
        put_num(out, exptime);
    }
    for k in keys {
        out.put_u8(b' ');
        out.put_slice(k);
    }
    out.put_slice(b"\r\n");
}

/// `<cmd> <key> <flags> <exptime> <bytes> [<cas>]\r\n` (the data follows).
pub fn storage_line<B: BufMut>(
    out: &mut B,
    command: Command,
    key: &[u8],
    flags: u32,
    exptime: i32,
    len: usize,
    cas: u64,
) {
    out.put_slice(command.name());
    out.put_u8(b' ');
    out.put_slice(key);
    out.put_u8(b' ');
    put_num(out, flags);
    out.put_u8(b' ');
    put_num(out, exptime);
    out.put_u8(b' ');
    put_num(out, len);
    if command == Command::Cas {
        out.put_u8(b' ');
        put_num(out, cas);
    }
    out.put_slice(b"\r\n");
}

/// `delete <key>\r\n`
pub fn delete<B: BufMut>(out: &mut B, key: &[u8]) {
    out.put_slice(b"delete ");
    out.put_slice(key);
    out.put_slice(b"\r\n");
}

/// Whether `key` can be written in a classic command (`delete <key>`):
/// otherwise it must go through a meta command in base64 (a binary key
/// from a meta `b` request).
pub fn is_text_key(key: &[u8]) -> bool {
    !key.is_empty()
        && key.len() <= crate::KEY_MAX_LENGTH
        && !key.iter().any(|&b| matches!(b, b' ' | b'\r' | b'\n' | 0))
}

/// Deletes any key: `delete <key>` when it can travel in a classic
/// command, `md <base64> b` when it cannot. Returns the reply shape to
/// expect. (The one way memrelay deletes a key it did not get from a
/// client's delete: invalidations, mirrors, repairs.)
pub fn delete_any<B: BufMut>(out: &mut B, key: &[u8]) -> crate::Expect {
    if is_text_key(key) {
        delete(out, key);
        crate::Expect::Delete
    } else {
        let mut enc = Vec::with_capacity(key.len() * 4 / 3 + 4);
        crate::base64::encode(key, &mut enc);
        meta_line(out, Command::MetaDelete, &enc, None, b"b");
        crate::Expect::Meta
    }
}

/// `stats [group]\r\n`: the server's general figures, or one group of
/// them (`items`, `slabs`).
pub fn stats<B: BufMut>(out: &mut B, group: Option<&[u8]>) {
    out.put_slice(b"stats");
    if let Some(g) = group {
        out.put_u8(b' ');
        out.put_slice(g);
    }
    out.put_slice(b"\r\n");
}

/// `lru_crawler metadump hash\r\n`: every key the server holds, one
/// `key=<url-encoded> ...` line each, then `END`.
pub fn metadump_all<B: BufMut>(out: &mut B) {
    out.put_slice(b"lru_crawler metadump hash\r\n");
}

/// Writes `key` as a meta command's key: as is when it can travel in text,
/// in base64 otherwise. Returns whether the line needs the `b` flag (a
/// binary key from a meta `b` request).
pub fn meta_key<B: BufMut>(out: &mut B, key: &[u8]) -> bool {
    if is_text_key(key) {
        out.put_slice(key);
        false
    } else {
        let mut enc = Vec::with_capacity(key.len() * 4 / 3 + 4);
        crate::base64::encode(key, &mut enc);
        out.put_slice(&enc);
        true
    }
}

/// `mg <key> v f t\r\n` (`mg <base64> b v f t` for a binary key): an
/// item's value, client flags and remaining TTL, all a copy of it needs.
pub fn meta_get_item<B: BufMut>(out: &mut B, key: &[u8]) {
    out.put_slice(b"mg ");
    let b64 = meta_key(out, key);
    out.put_slice(if b64 { b" b v f t\r\n" } else { b" v f t\r\n" });
}

/// `ms <key> <len> F<flags> T<ttl> ME c\r\n<value>\r\n` (`... c b` for a
/// binary key): stores a copy of an item only where the key has none
/// (`ME`: mode add, so a newer client write is never overwritten), and asks
/// for the CAS value the copy gets (so it can be undone exactly).
pub fn meta_add_copy<B: BufMut>(out: &mut B, key: &[u8], value: &[u8], flags: u32, ttl: i64) {
    out.put_slice(b"ms ");
    let b64 = meta_key(out, key);
    out.put_u8(b' ');
    put_num(out, value.len());
    out.put_slice(b" F");
    put_num(out, flags);
    out.put_slice(b" T");
    put_num(out, ttl);
    out.put_slice(if b64 { b" ME c b\r\n" } else { b" ME c\r\n" });
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// `md <key> C<cas>\r\n` (`... b` for a binary key): deletes the item only
/// while its CAS value is still `cas`, so a write made since is kept.
pub fn meta_delete_if_cas<B: BufMut>(out: &mut B, key: &[u8], cas: u64) {
    out.put_slice(b"md ");
    let b64 = meta_key(out, key);
    out.put_slice(b" C");
    put_num(out, cas);
    out.put_slice(if b64 { b" b\r\n" } else { b"\r\n" });
}

/// `incr|decr <key> <delta>\r\n`
pub fn arith<B: BufMut>(out: &mut B, command: Command, key: &[u8], delta: u64) {
    out.put_slice(command.name());
    out.put_u8(b' ');
    out.put_slice(key);
    out.put_u8(b' ');
    put_num(out, delta);
    out.put_slice(b"\r\n");
}

/// `touch <key> <exptime>\r\n`
pub fn touch<B: BufMut>(out: &mut B, key: &[u8], exptime: i32) {
    out.put_slice(b"touch ");
    out.put_slice(key);
    out.put_u8(b' ');
    put_num(out, exptime);
    out.put_slice(b"\r\n");
}

/// `flush_all [delay]\r\n`
pub fn flush_all<B: BufMut>(out: &mut B, delay: Option<i32>) {
    out.put_slice(b"flush_all");
    if let Some(d) = delay {
        out.put_u8(b' ');
        put_num(out, d);
    }
    out.put_slice(b"\r\n");
}

/// `mg <key> <flags>\r\n`, flags given as the raw text after the key
/// (e.g. `v f t c`), plus an optional `T<ttl>` to touch.
pub fn meta_get<B: BufMut>(out: &mut B, key: &[u8], flags: &[u8], touch: Option<i32>) {
    out.put_slice(b"mg ");
    out.put_slice(key);
    out.put_u8(b' ');
    out.put_slice(flags);
    if let Some(t) = touch {
        out.put_slice(b" T");
        put_num(out, t);
    }
    out.put_slice(b"\r\n");
}

/// A meta command line as the client sent it, with single spaces. `flags`
/// is the flag region of the request, kept as is (`q` included: a quiet
/// request is followed by `mn` on the wire, see `Expect::MetaQuiet`); `len`
/// is the data length for `ms`.
pub fn meta_line<B: BufMut>(
    out: &mut B,
    command: Command,
    key: &[u8],
    len: Option<usize>,
    flags: &[u8],
) {
    meta_line_filtered(out, command, key, len, flags, |_| true, b"");
}

/// Like [`meta_line`], but keeps only the flags `keep` accepts, then adds
/// `extra` (e.g. ` v`). For mirrors (a backup must not compare CAS values
/// that are the primary's) and to ask for what the proxy needs.
pub fn meta_line_filtered<B: BufMut>(
    out: &mut B,
    command: Command,
    key: &[u8],
    len: Option<usize>,
    flags: &[u8],
    keep: impl Fn(&[u8]) -> bool,
    extra: &[u8],
) {
    out.put_slice(command.name());
    out.put_u8(b' ');
    out.put_slice(key);
    if let Some(n) = len {
        out.put_u8(b' ');
        put_num(out, n);
    }
    for tok in flags
        .split(|&b| b == b' ')
        .filter(|t| !t.is_empty() && keep(t))
    {
        out.put_u8(b' ');
        out.put_slice(tok);
    }
    out.put_slice(extra);
    out.put_slice(b"\r\n");
}

/// `VALUE <key> <flags> <bytes> [<cas>]\r\n`, the header of a value block.
pub fn value_header<B: BufMut>(out: &mut B, key: &[u8], flags: u32, len: usize, cas: Option<u64>) {
    out.put_slice(b"VALUE ");
    out.put_slice(key);
    out.put_u8(b' ');
    put_num(out, flags);
    out.put_u8(b' ');
    put_num(out, len);
    if let Some(c) = cas {
        out.put_u8(b' ');
        put_num(out, c);
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::{parse_request, Limits};

    /// Composing a parsed request reproduces an equivalent request.
    #[test]
    fn parse_then_compose_round_trips() {
        let input = b"cas  k   1 2 3 44 noreply\r\nabc\r\n";
        let (req, _) = parse_request(input, &Limits::default()).unwrap().unwrap();
        let mut out = Vec::new();
        storage_line(
            &mut out,
            req.command,
            req.key.of(input),
            req.flags,
            req.exptime,
            req.value.len as usize,
            req.cas,
        );
        assert_eq!(out, b"cas k 1 2 3 44\r\n");
        let mut out = Vec::new();
        retrieval(&mut out, Command::Gat, -1, [&b"a"[..], b"b"]);
        assert_eq!(out, b"gat -1 a b\r\n");
        let mut out = Vec::new();
        flush_all(&mut out, Some(10));
        assert_eq!(out, b"flush_all 10\r\n");
    }

    #[test]
    fn any_key_is_deleted_as_text_or_as_base64_meta() {
        let mut out = Vec::new();
        assert_eq!(delete_any(&mut out, b"k1"), crate::Expect::Delete);
        assert_eq!(out, b"delete k1\r\n");
        let mut out = Vec::new();
        assert_eq!(delete_any(&mut out, b"a b"), crate::Expect::Meta);
        assert_eq!(out, b"md YSBi b\r\n");
        assert!(!is_text_key(b""));
        assert!(!is_text_key(&[b'x'; 251]));
        assert!(is_text_key(&[b'x'; 250]));
    }
    /// The resync's meta lines, byte for byte as memrelay wrote them with
    /// `format!` before they moved here.
    #[test]
    fn resync_lines_keep_their_bytes() {
        for (key, wire, b) in [(&b"k1"[..], &b"k1"[..], ""), (b"a b", b"YSBi", " b")] {
            let w = String::from_utf8_lossy(wire);
            let mut out = Vec::new();
            meta_get_item(&mut out, key);
            let old = format!("mg {w}{} v f t\r\n", b);
            assert_eq!(out, old.as_bytes());
            let mut out = Vec::new();
            meta_add_copy(&mut out, key, b"hello", 7, -1);
            let old = format!("ms {w} {} F{} T{} ME c{}\r\nhello\r\n", 5, 7, -1, b);
            assert_eq!(out, old.as_bytes());
            let mut out = Vec::new();
            meta_delete_if_cas(&mut out, key, 99);
            let old = format!("md {w} C{}{}\r\n", 99, b);
            assert_eq!(out, old.as_bytes());
        }
        let mut out = Vec::new();
        stats(&mut out, None);
        stats(&mut out, Some(b"items"));
        assert_eq!(out, b"stats\r\nstats items\r\n");
        let mut out = Vec::new();
        metadump_all(&mut out);
        assert_eq!(out, b"lru_crawler metadump hash\r\n");
    }
}
