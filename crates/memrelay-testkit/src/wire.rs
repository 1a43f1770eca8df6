//! Reading memcached's replies as a test sees them: items, `VALUE` blocks,
//! `mg` replies, `stats` lines, and bytes rendered for a failure message.
//!
//! Pure functions over bytes; the clients (`client`, `conn`) read from
//! sockets and call these. The proxy's own parser (memrelay-protocol) is
//! deliberately not used: the tests check that parser, so they read
//! replies with code of their own.

use std::collections::HashMap;

/// Renders bytes for a failure message: printable ASCII as is, the rest
/// escaped, `\r\n` kept visible. Long inputs are cut in the middle.
pub fn escape(bytes: &[u8]) -> String {
    escape_max(bytes, 4000)
}

/// `escape`, keeping at most about `max` input bytes (head and tail).
pub fn escape_max(bytes: &[u8], max: usize) -> String {
    let max = max.max(2);
    let render = |b: &[u8]| -> String {
        let mut s = String::new();
        for &c in b {
            match c {
                b'\r' => s.push_str("\\r"),
                b'\n' => s.push_str("\\n\n"),
                b'\\' => s.push_str("\\\\"),
                0x20..=0x7e => s.push(c as char),
                _ => s.push_str(&format!("\\x{c:02x}")),
            }
        }
        s
    };
    if bytes.len() <= max {
        render(bytes)
    } else {
        format!(
            "{}\n... [{} bytes omitted] ...\n{}",
            render(&bytes[..max / 2]),
            bytes.len() - max / 2 * 2,
            render(&bytes[bytes.len() - max / 2..])
        )
    }
}

/// A one-line reply that reports a failure.
pub fn is_error_line(l: &str) -> bool {
    l.starts_with("SERVER_ERROR") || l.starts_with("CLIENT_ERROR") || l == "ERROR"
}

/// Where the first `\r\n` of `b` starts.
fn line_end(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// One item of a retrieval reply (or of an `mg` hit, with no key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Val {
    pub key: String,
    pub flags: u32,
    pub data: String,
    /// The CAS unique, for `gets`.
    pub cas: Option<u64>,
}

/// A `VALUE <key> <flags> <len> [<cas>]` line (without its CRLF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueHeader {
    pub key: String,
    pub flags: u32,
    pub len: usize,
    pub cas: Option<u64>,
}

/// Parses a `VALUE` line; Err names what is wrong with it.
pub fn value_header(line: &str) -> Result<ValueHeader, String> {
    let parts: Vec<&str> = line.split(' ').collect();
    if parts.len() < 4 || parts.len() > 5 || parts[0] != "VALUE" {
        return Err(format!("expected VALUE or END, got {line:?}"));
    }
    Ok(ValueHeader {
        key: parts[1].to_string(),
        flags: parts[2]
            .parse()
            .map_err(|_| format!("bad flags in {line:?}"))?,
        len: parts[3]
            .parse()
            .map_err(|_| format!("bad length in {line:?}"))?,
        cas: parts.get(4).and_then(|c| c.parse().ok()),
    })
}

/// Reads `get`-style replies: true once `buf` holds a complete reply that
/// ends with `END\r\n` (data blocks are skipped by their length) or an error
/// line. A malformed `VALUE` line counts as complete: the caller compares
/// what it got.
pub fn complete_retrieval(buf: &[u8]) -> bool {
    let mut pos = 0;
    loop {
        let Some(nl) = line_end(&buf[pos..]) else {
            return false;
        };
        let line = &buf[pos..pos + nl];
        pos += nl + 2;
        if line == b"END" {
            return pos == buf.len();
        }
        if line.starts_with(b"VALUE ") {
            let Ok(h) = value_header(&String::from_utf8_lossy(line)) else {
                return true;
            };
            pos += h.len + 2;
            if pos > buf.len() {
                return false;
            }
        } else {
            return pos == buf.len(); // an error line
        }
    }
}

/// Parses a whole retrieval reply, `VALUE` blocks up to `END`, with
/// nothing after it.
pub fn parse_values(b: &[u8]) -> Result<Vec<Val>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let nl = line_end(&b[pos..]).ok_or_else(|| format!("incomplete reply: {}", escape(b)))?;
        let line = String::from_utf8_lossy(&b[pos..pos + nl]).into_owned();
        pos += nl + 2;
        if line == "END" {
            if pos != b.len() {
                return Err(format!("bytes after END: {}", escape(b)));
            }
            return Ok(out);
        }
        let h = value_header(&line).map_err(|e| format!("{e} in {}", escape(b)))?;
        if pos + h.len + 2 > b.len() {
            return Err(format!("short data block: {}", escape(b)));
        }
        out.push(Val {
            key: h.key,
            flags: h.flags,
            data: String::from_utf8_lossy(&b[pos..pos + h.len]).into_owned(),
            cas: h.cas,
        });
        pos += h.len + 2;
    }
}

/// A `VA <len> <flags>...` line's length, client flags (`f`, 0 when not
/// asked) and TTL (`t`, -1 when not asked or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaHeader {
    pub len: usize,
    pub flags: u32,
    pub ttl: i64,
}

/// Parses a `VA` line (without its CRLF).
pub fn va_header(line: &str) -> Result<VaHeader, String> {
    let mut toks = line.split(' ');
    if toks.next() != Some("VA") {
        return Err(format!("not a VA line: {line:?}"));
    }
    let len = toks
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("bad length in {line:?}"))?;
    let (mut flags, mut ttl) = (0, -1);
    for t in toks {
        if let Some(f) = t.strip_prefix('f') {
            flags = f.parse().map_err(|_| format!("bad flags in {line:?}"))?;
        } else if let Some(v) = t.strip_prefix('t') {
            ttl = v.parse().map_err(|_| format!("bad ttl in {line:?}"))?;
        }
    }
    Ok(VaHeader { len, flags, ttl })
}

/// One complete meta reply: a line, or `VA <len> ...` and its data block.
pub fn meta_done(b: &[u8]) -> bool {
    let Some(nl) = line_end(b) else {
        return false;
    };
    if !b.starts_with(b"VA ") {
        return b.len() == nl + 2;
    }
    let len = va_header(&String::from_utf8_lossy(&b[..nl]))
        .map(|h| h.len)
        .unwrap_or(0);
    b.len() >= nl + 2 + len + 2
}

/// An item as memcached holds it: value, client flags, TTL (-1: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub value: String,
    pub flags: u32,
    pub ttl: i64,
}

/// The same item, allowing two seconds of TTL drift (memcached's clock
/// ticks in seconds, and copies are made a moment apart).
pub fn same_item(a: &Option<Item>, b: &Option<Item>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.value == b.value
                && a.flags == b.flags
                && (a.ttl == b.ttl || (a.ttl >= 0 && b.ttl >= 0 && (a.ttl - b.ttl).abs() <= 2))
        }
        _ => false,
    }
}

/// The item of an `mg <key> v f t` reply (`EN`: none).
pub fn parse_mg(b: &[u8]) -> Result<Option<Item>, String> {
    if b == b"EN\r\n" {
        return Ok(None);
    }
    let nl = line_end(b).ok_or_else(|| format!("no line: {}", escape(b)))?;
    let head = String::from_utf8_lossy(&b[..nl]).into_owned();
    if !head.starts_with("VA ") {
        return Err(format!("unexpected mg reply: {}", escape(b)));
    }
    let h = va_header(&head)?;
    let data = b
        .get(nl + 2..nl + 2 + h.len)
        .ok_or_else(|| format!("short data block: {}", escape(b)))?;
    Ok(Some(Item {
        value: String::from_utf8_lossy(data).into_owned(),
        flags: h.flags,
        ttl: h.ttl,
    }))
}

/// A `stats` reply's `STAT name value` lines, as a map.
pub fn parse_stats(reply: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(reply)
        .lines()
        .filter_map(|l| {
            let mut t = l.strip_prefix("STAT ")?.splitn(2, ' ');
            Some((t.next()?.to_string(), t.next()?.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrieval_replies_are_complete_only_at_their_end() {
        assert!(!complete_retrieval(b"VALUE k 0 3\r\nab"));
        assert!(complete_retrieval(b"VALUE k 0 3\r\nabc\r\nEND\r\n"));
        assert!(!complete_retrieval(b"END\r\nx"));
        assert!(complete_retrieval(b"SERVER_ERROR down\r\n"));
    }

    #[test]
    fn values_and_meta_items_parse() {
        let v = parse_values(b"VALUE a 5 2 9\r\nhi\r\nVALUE b 0 0\r\n\r\nEND\r\n");
        assert_eq!(
            v,
            Ok(vec![
                Val {
                    key: "a".into(),
                    flags: 5,
                    data: "hi".into(),
                    cas: Some(9)
                },
                Val {
                    key: "b".into(),
                    flags: 0,
                    data: String::new(),
                    cas: None
                },
            ])
        );
        assert!(parse_values(b"VALUE a 5 9\r\nhi\r\nEND\r\n").is_err());
        assert_eq!(
            parse_mg(b"VA 2 f7 t-1\r\nhi\r\n"),
            Ok(Some(Item {
                value: "hi".into(),
                flags: 7,
                ttl: -1
            }))
        );
        assert_eq!(parse_mg(b"EN\r\n"), Ok(None));
        assert!(meta_done(b"VA 2 f7\r\nhi\r\n"));
        assert!(!meta_done(b"VA 2 f7\r\nh"));
    }
}
