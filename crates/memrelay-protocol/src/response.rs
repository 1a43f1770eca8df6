//! Server responses: framing and classifying what a memcached sends back.
//!
//! A response is always parsed *against the request that produced it*
//! ([`Expect`]): the proxy keeps a FIFO of requests in flight per backend
//! connection, and the front of that FIFO says what shape the next reply must
//! have. Anything else (a reply to nothing, a wrong length, a stray line) is a
//! [`ResponseError`], after which the connection must be dropped: its framing
//! can no longer be trusted.

use crate::number::{parse_u32_wrapping, parse_u64};

/// The reply shape a request calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `VALUE` blocks then `END` (get, gets, gat, gats).
    Retrieval,
    /// `STORED` / `NOT_STORED` / `EXISTS` / `NOT_FOUND`.
    Storage,
    /// `DELETED` / `NOT_FOUND`.
    Delete,
    /// A number / `NOT_FOUND`.
    Arith,
    /// `TOUCHED` / `NOT_FOUND`.
    Touch,
    /// `OK` (flush_all, verbosity).
    Ok,
    /// `VERSION ...`
    Version,
    /// A meta command (`mg`, `ms`, `md`, `ma`, `mn`): a status line, with a
    /// data block when it is `VA`.
    Meta,
    /// A quiet meta command followed by `mn`: the reply memcached did not
    /// suppress, if any, then `MN`. A suppressed reply is reported as
    /// `Meta(Mn)`; otherwise the kind is the reply's, and the bytes end with
    /// the `MN\r\n` (4 bytes) the caller strips.
    MetaQuiet,
}

/// What a complete response said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseKind {
    /// `END`, after `hits` VALUE blocks (0: every key missed).
    Values {
        hits: u32,
    },
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    Touched,
    Ok,
    /// The new value after `incr`/`decr`.
    Number(u64),
    Version,
    /// A meta reply; [`MetaStatus`] says which.
    Meta(MetaStatus),
    /// `ERROR`, `CLIENT_ERROR ...` or `SERVER_ERROR ...`: the server refused;
    /// the line is forwarded to the client as is.
    Error,
}

/// The two-letter status of a meta reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaStatus {
    /// `VA <len> <flags>*` followed by the value.
    Value,
    /// `HD <flags>*`: success without a value.
    Hd,
    /// `EN`: miss.
    En,
    /// `NF`: not found.
    Nf,
    /// `NS`: not stored.
    Ns,
    /// `EX`: exists (CAS mismatch).
    Ex,
    /// `MN`: the no-op marker.
    Mn,
    /// `ME <key> <info>`: debug output.
    Me,
}

/// A response that cannot be framed: the connection it came from is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("unexpected reply line from server")]
    Unexpected,
    #[error("malformed VALUE line from server")]
    BadValueLine,
    #[error("value from server larger than the configured limit")]
    ValueTooLarge,
    #[error("value from server not terminated by CRLF")]
    BadDataChunk,
    #[error("reply line from server too long")]
    LineTooLong,
}

/// A reply line longer than this without a newline is garbage: memcached's
/// longest legitimate line (a VALUE header with a 250-byte key) is ~300 bytes,
/// and its error lines are short.
const MAX_RESPONSE_LINE: usize = 8192;

/// Incremental response parser. A retrieval reply can be megabytes spread
/// over many reads; the parser remembers how far it has validated so each
/// byte is scanned once.
#[derive(Debug, Default, Clone)]
pub struct ResponseParser {
    scanned: usize,
    hits: u32,
}

impl ResponseParser {
    pub fn new() -> ResponseParser {
        ResponseParser::default()
    }

    /// Parses the response at the start of `buf`. On `Ok(Some((kind, n)))`
    /// the response is `buf[..n]` and the parser is ready for the next one.
    pub fn parse(
        &mut self,
        buf: &[u8],
        expect: Expect,
        max_value: usize,
    ) -> Result<Option<(ResponseKind, usize)>, ResponseError> {
        let r = match expect {
            Expect::Retrieval => self.parse_retrieval(buf, max_value),
            Expect::Meta => parse_meta_reply(buf, max_value),
            Expect::MetaQuiet => match parse_meta_reply(buf, max_value)? {
                None => Ok(None),
                Some((ResponseKind::Meta(MetaStatus::Mn), n)) => {
                    Ok(Some((ResponseKind::Meta(MetaStatus::Mn), n)))
                }
                Some((kind, n)) => match parse_meta_reply(&buf[n..], max_value)? {
                    None => Ok(None),
                    // Exactly `MN\r\n`: the caller strips those 4 bytes.
                    Some((ResponseKind::Meta(MetaStatus::Mn), 4)) => Ok(Some((kind, n + 4))),
                    Some(_) => Err(ResponseError::Unexpected),
                },
            },
            _ => parse_line_reply(buf, expect),
        };
        if !matches!(r, Ok(None)) {
            *self = ResponseParser::default();
        }
        r
    }

    /// For a retrieval reply still incomplete: how many bytes at the front
    /// of the buffer are whole VALUE blocks already validated, which the
    /// caller may now drop (the parser carries on from the new front). A
    /// reply too large to keep is framed this way to its end, so the
    /// connection stays in step, while holding at most one block.
    pub fn take_validated(&mut self) -> usize {
        std::mem::take(&mut self.scanned)
    }

    fn parse_retrieval(
        &mut self,
        buf: &[u8],
        max_value: usize,
    ) -> Result<Option<(ResponseKind, usize)>, ResponseError> {
        loop {
            let rest = &buf[self.scanned..];
            let Some(line) = line_at(rest)? else {
                return Ok(None);
            };
            let line_end = self.scanned + line.len() + 2;
            if line == b"END" {
                return Ok(Some((ResponseKind::Values { hits: self.hits }, line_end)));
            }
            if let Some(header) = line.strip_prefix(b"VALUE ") {
                let h = parse_value_header(header)?;
                if h.len > max_value {
                    return Err(ResponseError::ValueTooLarge);
                }
                let block_end = line_end + h.len + 2;
                if buf.len() < block_end {
                    return Ok(None);
                }
                if &buf[block_end - 2..block_end] != b"\r\n" {
                    return Err(ResponseError::BadDataChunk);
                }
                self.scanned = block_end;
                // Saturating: a server may stream blocks for longer than a
                // u32 counts while the caller skips a reply too large to keep.
                self.hits = self.hits.saturating_add(1);
                continue;
            }
            if is_error_line(line) {
                return Ok(Some((ResponseKind::Error, line_end)));
            }
            return Err(ResponseError::Unexpected);
        }
    }
}

/// Stateless form of [`ResponseParser::parse`], for tests and fuzzing.
pub fn parse_response(
    buf: &[u8],
    expect: Expect,
    max_value: usize,
) -> Result<Option<(ResponseKind, usize)>, ResponseError> {
    ResponseParser::new().parse(buf, expect, max_value)
}

/// The line at the start of `buf` without its `\r\n`, `None` if incomplete.
fn line_at(buf: &[u8]) -> Result<Option<&[u8]>, ResponseError> {
    match memchr::memchr(b'\n', buf) {
        Some(nl) => {
            if nl == 0 || buf[nl - 1] != b'\r' {
                return Err(ResponseError::Unexpected);
            }
            Ok(Some(&buf[..nl - 1]))
        }
        None if buf.len() > MAX_RESPONSE_LINE => Err(ResponseError::LineTooLong),
        None => Ok(None),
    }
}

fn is_error_line(line: &[u8]) -> bool {
    line == b"ERROR"
        || line.starts_with(b"ERROR ")
        || line.starts_with(b"CLIENT_ERROR ")
        || line.starts_with(b"SERVER_ERROR ")
}

fn parse_line_reply(
    buf: &[u8],
    expect: Expect,
) -> Result<Option<(ResponseKind, usize)>, ResponseError> {
    let Some(line) = line_at(buf)? else {
        return Ok(None);
    };
    let n = line.len() + 2;
    let kind = match (expect, line) {
        (Expect::Storage, b"STORED") => ResponseKind::Stored,
        (Expect::Storage, b"NOT_STORED") => ResponseKind::NotStored,
        (Expect::Storage, b"EXISTS") => ResponseKind::Exists,
        (Expect::Storage | Expect::Delete | Expect::Arith | Expect::Touch, b"NOT_FOUND") => {
            ResponseKind::NotFound
        }
        (Expect::Delete, b"DELETED") => ResponseKind::Deleted,
        (Expect::Touch, b"TOUCHED") => ResponseKind::Touched,
        (Expect::Ok, b"OK") => ResponseKind::Ok,
        (Expect::Version, l) if l.starts_with(b"VERSION ") => ResponseKind::Version,
        (_, l) if is_error_line(l) => ResponseKind::Error,
        (Expect::Arith, l) if !l.is_empty() && l.iter().all(u8::is_ascii_digit) => {
            match parse_u64(l) {
                Some(v) => ResponseKind::Number(v),
                None => return Err(ResponseError::Unexpected),
            }
        }
        _ => return Err(ResponseError::Unexpected),
    };
    Ok(Some((kind, n)))
}

/// A meta reply: a status line, and for `VA` the value after it.
fn parse_meta_reply(
    buf: &[u8],
    max_value: usize,
) -> Result<Option<(ResponseKind, usize)>, ResponseError> {
    let Some(line) = line_at(buf)? else {
        return Ok(None);
    };
    let n = line.len() + 2;
    if is_error_line(line) {
        return Ok(Some((ResponseKind::Error, n)));
    }
    let code = line.get(..2).ok_or(ResponseError::Unexpected)?;
    if line.len() > 2 && line[2] != b' ' {
        return Err(ResponseError::Unexpected);
    }
    let status = match code {
        b"VA" => {
            let len_tok = line[2..]
                .split(|&b| b == b' ')
                .find(|t| !t.is_empty())
                .ok_or(ResponseError::BadValueLine)?;
            if !len_tok.iter().all(u8::is_ascii_digit) {
                return Err(ResponseError::BadValueLine);
            }
            let len = parse_u64(len_tok).ok_or(ResponseError::BadValueLine)?;
            let len = usize::try_from(len).map_err(|_| ResponseError::ValueTooLarge)?;
            if len > max_value {
                return Err(ResponseError::ValueTooLarge);
            }
            let end = n + len + 2;
            if buf.len() < end {
                return Ok(None);
            }
            if &buf[end - 2..end] != b"\r\n" {
                return Err(ResponseError::BadDataChunk);
            }
            return Ok(Some((ResponseKind::Meta(MetaStatus::Value), end)));
        }
        code => meta_code(code).ok_or(ResponseError::Unexpected)?,
    };
    Ok(Some((ResponseKind::Meta(status), n)))
}

/// The status a meta reply's two-letter code stands for.
fn meta_code(code: &[u8]) -> Option<MetaStatus> {
    Some(match code {
        b"VA" => MetaStatus::Value,
        b"HD" => MetaStatus::Hd,
        b"EN" => MetaStatus::En,
        b"NF" => MetaStatus::Nf,
        b"NS" => MetaStatus::Ns,
        b"EX" => MetaStatus::Ex,
        b"MN" => MetaStatus::Mn,
        b"ME" => MetaStatus::Me,
        _ => return None,
    })
}

/// The return flags of a meta reply line (`VA 5 f3 t-1 c99 ...`), as far as
/// the proxy needs them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaFlags {
    /// `f`: client flags.
    pub flags: Option<u32>,
    /// `t`: remaining TTL in seconds, -1 for none.
    pub ttl: Option<i64>,
    /// `c`: CAS value.
    pub cas: Option<u64>,
    /// Offset of the data block (for `VA`), and its length.
    pub data: Option<(usize, usize)>,
}

/// Reads the return flags of a complete meta reply.
pub fn meta_flags(reply: &[u8]) -> MetaFlags {
    let mut out = MetaFlags::default();
    let Ok(Some(line)) = line_at(reply) else {
        return out;
    };
    let mut toks = line.split(|&b| b == b' ').filter(|t| !t.is_empty());
    let code = toks.next().unwrap_or(b"");
    if code == b"VA" {
        if let Some(len) = toks.next().and_then(parse_u64) {
            out.data = Some((line.len() + 2, len as usize));
        }
    }
    for t in toks {
        let (f, v) = t.split_at(1);
        match f[0] {
            b'f' => out.flags = parse_u32_wrapping(v),
            b't' => {
                out.ttl = if v == b"-1" {
                    Some(-1)
                } else {
                    // A TTL past i64 is clamped, never wrapped negative.
                    parse_u64(v).map(|x| i64::try_from(x).unwrap_or(i64::MAX))
                }
            }
            b'c' => out.cas = parse_u64(v),
            _ => {}
        }
    }
    out
}

/// The status of a complete meta reply (`HD c42\r\n` -> `Hd`), `None` for
/// a line that is not one (`SERVER_ERROR ...`).
pub fn meta_status(reply: &[u8]) -> Option<MetaStatus> {
    let line = line_at(reply).ok()??;
    if line.len() > 2 && line[2] != b' ' {
        return None;
    }
    meta_code(line.get(..2)?)
}

/// Whether `buf` holds a whole `stats` reply: through its `END`, or the
/// `ERROR` of a server that does not know the group asked for.
pub fn stats_complete(buf: &[u8]) -> bool {
    buf.ends_with(b"END\r\n") || buf.ends_with(b"ERROR\r\n")
}

/// The value of `STAT <name> <number>` in a `stats` reply, if the reply has
/// that line and its value is a number.
pub fn stat_number(reply: &[u8], name: &[u8]) -> Option<i64> {
    reply.split(|&b| b == b'\n').find_map(|l| {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        let v = l
            .strip_prefix(b"STAT ")?
            .strip_prefix(name)?
            .strip_prefix(b" ")?;
        std::str::from_utf8(v).ok()?.trim().parse().ok()
    })
}

/// Whether every line of the replies to a run of pipelined deletes (classic
/// or meta, as `compose::delete_any` writes them) says the key is gone:
/// `DELETED`, `NOT_FOUND`, `HD` or `NF`.
pub fn deletes_confirmed(replies: &[u8]) -> bool {
    replies
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .all(|l| matches!(l, b"DELETED\r" | b"NOT_FOUND\r" | b"HD\r" | b"NF\r"))
}

/// Whether a reply is exactly `OK` (`flush_all`, `verbosity`).
pub fn is_ok(reply: &[u8]) -> bool {
    reply == b"OK\r\n"
}

/// What one line of `lru_crawler metadump` output says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadumpLine {
    /// `END`: the dump is complete.
    End,
    /// `ERROR`, `BUSY ...` or `CLIENT_ERROR ...`: the server will not dump
    /// (its crawler is busy or disabled).
    Refused,
    /// An item: its key, decoded, is in the caller's buffer.
    Key,
    /// Nothing usable (no `key=`, or a key that does not decode).
    Other,
}

/// Reads one line of `lru_crawler metadump` output, without its `\n` (a
/// `\r` before it is ignored). Keys come `%xx`-encoded: an item's key is
/// decoded into `key`.
pub fn metadump_line(line: &[u8], key: &mut Vec<u8>) -> MetadumpLine {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line == b"END" {
        return MetadumpLine::End;
    }
    if line.starts_with(b"ERROR") || line.starts_with(b"BUSY") || line.starts_with(b"CLIENT_ERROR")
    {
        return MetadumpLine::Refused;
    }
    let Some(enc) = line
        .strip_prefix(b"key=")
        .and_then(|r| r.split(|&b| b == b' ').next())
    else {
        return MetadumpLine::Other;
    };
    if url_decode(enc, key) {
        MetadumpLine::Key
    } else {
        MetadumpLine::Other
    }
}

/// `%xx` decoding of metadump's keys; false for a bad escape or an empty
/// key.
fn url_decode(enc: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut i = 0;
    while i < enc.len() {
        if enc[i] == b'%' {
            let Some(h) = enc.get(i + 1..i + 3) else {
                return false;
            };
            let Ok(v) = u8::from_str_radix(std::str::from_utf8(h).unwrap_or("zz"), 16) else {
                return false;
            };
            out.push(v);
            i += 3;
        } else {
            out.push(enc[i]);
            i += 1;
        }
    }
    !out.is_empty()
}

/// The fields of a `VALUE <key> <flags> <bytes> [<cas>]` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueHeader<'a> {
    pub key: &'a [u8],
    pub flags: u32,
    pub len: usize,
    pub cas: Option<u64>,
}

/// Parses what follows `VALUE ` on a value line.
pub fn parse_value_header(header: &[u8]) -> Result<ValueHeader<'_>, ResponseError> {
    let mut it = header.split(|&b| b == b' ');
    let key = it
        .next()
        .filter(|k| !k.is_empty())
        .ok_or(ResponseError::BadValueLine)?;
    let flags = it
        .next()
        .and_then(parse_u32_wrapping)
        .ok_or(ResponseError::BadValueLine)?;
    let len = it
        .next()
        .filter(|t| !t.is_empty() && t.iter().all(u8::is_ascii_digit))
        .and_then(parse_u64)
        .ok_or(ResponseError::BadValueLine)?;
    let cas = match it.next() {
        Some(t) => Some(parse_u64(t).ok_or(ResponseError::BadValueLine)?),
        None => None,
    };
    if it.next().is_some() {
        return Err(ResponseError::BadValueLine);
    }
    let len = usize::try_from(len).map_err(|_| ResponseError::ValueTooLarge)?;
    Ok(ValueHeader {
        key,
        flags,
        len,
        cas,
    })
}

/// One `VALUE` block inside a complete retrieval response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueBlock<'a> {
    pub header: ValueHeader<'a>,
    /// Offsets of the whole block (header line through the data's `\r\n`).
    pub start: usize,
    pub end: usize,
}

/// Iterates over the VALUE blocks of a retrieval response that
/// [`ResponseParser`] already validated. Stops at `END` (or at anything
/// unexpected, which a validated response does not contain).
#[derive(Debug, Clone)]
pub struct ValueBlocks<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl ValueBlock<'_> {
    /// Where the block's data lies in the response (without its `\r\n`).
    pub fn data(&self) -> std::ops::Range<usize> {
        let end = self.end - 2;
        end - self.header.len..end
    }
}

impl<'a> ValueBlocks<'a> {
    pub fn new(buf: &'a [u8]) -> ValueBlocks<'a> {
        ValueBlocks { buf, pos: 0 }
    }
}

impl<'a> Iterator for ValueBlocks<'a> {
    type Item = ValueBlock<'a>;

    fn next(&mut self) -> Option<ValueBlock<'a>> {
        let rest = &self.buf[self.pos..];
        let line = line_at(rest).ok()??;
        let header = parse_value_header(line.strip_prefix(b"VALUE ")?).ok()?;
        let start = self.pos;
        let end = start + line.len() + 2 + header.len + 2;
        if end > self.buf.len() {
            return None;
        }
        self.pos = end;
        Some(ValueBlock { header, start, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn retrieval_frames() {
        let r = b"VALUE a 5 3\r\nabc\r\nVALUE b 0 0 77\r\n\r\nEND\r\nnext";
        assert_eq!(
            parse_response(r, Expect::Retrieval, MAX),
            Ok(Some((ResponseKind::Values { hits: 2 }, r.len() - 4)))
        );
        let blocks: Vec<_> = ValueBlocks::new(r).collect();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].header.key, b"a");
        assert_eq!(blocks[1].header.cas, Some(77));
        assert_eq!(&r[blocks[0].data()], b"abc");
        assert!(blocks[1].data().is_empty());
        assert_eq!(
            parse_response(b"END\r\n", Expect::Retrieval, MAX),
            Ok(Some((ResponseKind::Values { hits: 0 }, 5)))
        );
    }

    #[test]
    fn retrieval_incremental() {
        let full = b"VALUE a 0 10\r\n0123456789\r\nEND\r\n";
        let mut p = ResponseParser::new();
        for cut in 0..full.len() {
            assert_eq!(
                p.parse(&full[..cut], Expect::Retrieval, MAX),
                Ok(None),
                "cut {cut}"
            );
        }
        assert_eq!(
            p.parse(full, Expect::Retrieval, MAX),
            Ok(Some((ResponseKind::Values { hits: 1 }, full.len())))
        );
    }

    #[test]
    fn retrieval_skipped_block_by_block() {
        // The caller drops validated blocks as they come; the reply still
        // ends where it ends, with every block counted.
        let full = b"VALUE a 0 3\r\nabc\r\nVALUE a 0 3\r\nabc\r\nEND\r\nnext";
        let mut p = ResponseParser::new();
        let mut buf = full[..20].to_vec();
        assert_eq!(p.parse(&buf, Expect::Retrieval, MAX), Ok(None));
        let n = p.take_validated();
        assert_eq!(n, 18);
        buf.drain(..n);
        assert_eq!(p.take_validated(), 0);
        buf.extend_from_slice(&full[20..]);
        assert_eq!(
            p.parse(&buf, Expect::Retrieval, MAX),
            Ok(Some((ResponseKind::Values { hits: 2 }, buf.len() - 4)))
        );
    }

    #[test]
    fn misbehaving_servers() {
        let bad: &[(&[u8], Expect, ResponseError)] = &[
            (
                b"VALUE a 0 -1\r\n",
                Expect::Retrieval,
                ResponseError::BadValueLine,
            ),
            (
                b"VALUE a 0 3\r\nabcd\r\n",
                Expect::Retrieval,
                ResponseError::BadDataChunk,
            ),
            (
                b"VALUE a 0 99999999\r\n",
                Expect::Retrieval,
                ResponseError::ValueTooLarge,
            ),
            (b"STORED\r\n", Expect::Retrieval, ResponseError::Unexpected),
            (b"DELETED\r\n", Expect::Storage, ResponseError::Unexpected),
            (b"STORED\n", Expect::Storage, ResponseError::Unexpected),
            (b"12a\r\n", Expect::Arith, ResponseError::Unexpected),
        ];
        for (input, expect, err) in bad {
            assert_eq!(
                parse_response(input, *expect, MAX),
                Err(*err),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let junk = vec![b'x'; MAX_RESPONSE_LINE + 1];
        assert_eq!(
            parse_response(&junk, Expect::Storage, MAX),
            Err(ResponseError::LineTooLong)
        );
    }

    #[test]
    fn meta_replies() {
        let va = b"VA 3 f5 t-1 c77\r\nabc\r\nEN\r\n";
        assert_eq!(
            parse_response(va, Expect::Meta, MAX),
            Ok(Some((ResponseKind::Meta(MetaStatus::Value), 22)))
        );
        let f = meta_flags(&va[..22]);
        assert_eq!(
            (f.flags, f.ttl, f.cas, f.data),
            (Some(5), Some(-1), Some(77), Some((17, 3)))
        );
        assert_eq!(
            parse_response(b"EN\r\n", Expect::Meta, MAX),
            Ok(Some((ResponseKind::Meta(MetaStatus::En), 4)))
        );
        assert_eq!(
            parse_response(b"HD t30\r\n", Expect::Meta, MAX),
            Ok(Some((ResponseKind::Meta(MetaStatus::Hd), 8)))
        );
        assert_eq!(
            parse_response(b"VA 3\r\nabcd\r\n", Expect::Meta, MAX),
            Err(ResponseError::BadDataChunk)
        );
        assert_eq!(
            parse_response(b"XX\r\n", Expect::Meta, MAX),
            Err(ResponseError::Unexpected)
        );
        assert_eq!(parse_response(b"VA 3\r\nab", Expect::Meta, MAX), Ok(None));
    }

    /// Found by the response fuzz target: an `MN` line with more on it
    /// was taken as the end of a quiet reply, and the caller, which strips
    /// the last 4 bytes, would have forwarded the rest of it to the client.
    #[test]
    fn quiet_meta_reply_ends_with_exactly_mn() {
        assert_eq!(
            parse_response(b"HD\r\nMN    \r\n", Expect::MetaQuiet, MAX),
            Err(ResponseError::Unexpected)
        );
        assert_eq!(
            parse_response(b"HD\r\nMN\r\n", Expect::MetaQuiet, MAX),
            Ok(Some((ResponseKind::Meta(MetaStatus::Hd), 8)))
        );
    }

    #[test]
    fn quiet_meta_replies_end_with_mn() {
        assert_eq!(
            parse_response(b"MN\r\n", Expect::MetaQuiet, MAX),
            Ok(Some((ResponseKind::Meta(MetaStatus::Mn), 4)))
        );
        assert_eq!(
            parse_response(b"NS\r\nMN\r\n", Expect::MetaQuiet, MAX),
            Ok(Some((ResponseKind::Meta(MetaStatus::Ns), 8)))
        );
        assert_eq!(
            parse_response(b"VA 1\r\nx\r\nMN\r\n", Expect::MetaQuiet, MAX),
            Ok(Some((ResponseKind::Meta(MetaStatus::Value), 13)))
        );
        assert_eq!(parse_response(b"NS\r\n", Expect::MetaQuiet, MAX), Ok(None));
        assert_eq!(
            parse_response(b"NS\r\nHD\r\n", Expect::MetaQuiet, MAX),
            Err(ResponseError::Unexpected)
        );
    }

    #[test]
    fn line_replies() {
        let ok: &[(&[u8], Expect, ResponseKind)] = &[
            (b"STORED\r\n", Expect::Storage, ResponseKind::Stored),
            (b"NOT_STORED\r\n", Expect::Storage, ResponseKind::NotStored),
            (b"EXISTS\r\n", Expect::Storage, ResponseKind::Exists),
            (b"NOT_FOUND\r\n", Expect::Storage, ResponseKind::NotFound),
            (b"DELETED\r\n", Expect::Delete, ResponseKind::Deleted),
            (b"TOUCHED\r\n", Expect::Touch, ResponseKind::Touched),
            (b"OK\r\n", Expect::Ok, ResponseKind::Ok),
            (b"42\r\n", Expect::Arith, ResponseKind::Number(42)),
            (
                b"VERSION 1.6.18\r\n",
                Expect::Version,
                ResponseKind::Version,
            ),
            (
                b"SERVER_ERROR out of memory\r\n",
                Expect::Storage,
                ResponseKind::Error,
            ),
            (
                b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
                Expect::Arith,
                ResponseKind::Error,
            ),
            (b"ERROR\r\n", Expect::Touch, ResponseKind::Error),
        ];
        for (input, expect, kind) in ok {
            assert_eq!(
                parse_response(input, *expect, MAX),
                Ok(Some((*kind, input.len())))
            );
        }
    }
    #[test]
    fn meta_status_reads_the_code_of_a_whole_line() {
        assert_eq!(meta_status(b"HD c42\r\n"), Some(MetaStatus::Hd));
        assert_eq!(meta_status(b"NS\r\n"), Some(MetaStatus::Ns));
        assert_eq!(meta_status(b"VA 1\r\nx\r\n"), Some(MetaStatus::Value));
        assert_eq!(meta_status(b"HDX\r\n"), None);
        assert_eq!(meta_status(b"SERVER_ERROR out of memory\r\n"), None);
        assert_eq!(meta_status(b"HD"), None);
        assert_eq!(meta_flags(b"HD c42\r\n").cas, Some(42));
    }

    #[test]
    fn stats_replies_are_framed_and_read() {
        let r = b"STAT pid 12\r\nSTAT uptime 5\r\nSTAT time 1000\r\nEND\r\n";
        assert!(stats_complete(r));
        assert!(stats_complete(b"ERROR\r\n"));
        assert!(!stats_complete(b"STAT pid 12\r\n"));
        assert_eq!(stat_number(r, b"pid"), Some(12));
        assert_eq!(stat_number(r, b"time"), Some(1000));
        assert_eq!(stat_number(r, b"ti"), None);
        assert_eq!(stat_number(b"STAT pid x\r\n", b"pid"), None);
    }

    #[test]
    fn deletes_are_confirmed_only_by_gone_keys() {
        assert!(deletes_confirmed(b"DELETED\r\nNOT_FOUND\r\nHD\r\nNF\r\n"));
        assert!(!deletes_confirmed(b"DELETED\r\nSERVER_ERROR busy\r\n"));
        assert!(is_ok(b"OK\r\n"));
        assert!(!is_ok(b"ERROR\r\n"));
    }

    #[test]
    fn metadump_keys_are_url_decoded() {
        let mut out = Vec::new();
        assert!(url_decode(b"a%2520b", &mut out));
        assert_eq!(out, b"a%20b");
        assert!(url_decode(b"plain", &mut out));
        assert_eq!(out, b"plain");
        assert!(!url_decode(b"bad%2", &mut out));
    }

    #[test]
    fn metadump_lines_are_classified() {
        let mut key = Vec::new();
        let line = &b"key=a%20b exp=-1 la=1 cas=2 fetch=no cls=1 size=63\r"[..];
        assert_eq!(metadump_line(line, &mut key), MetadumpLine::Key);
        assert_eq!(key, b"a b");
        assert_eq!(metadump_line(b"END\r", &mut key), MetadumpLine::End);
        assert_eq!(metadump_line(b"END", &mut key), MetadumpLine::End);
        assert_eq!(
            metadump_line(b"BUSY crawler", &mut key),
            MetadumpLine::Refused
        );
        assert_eq!(metadump_line(b"ERROR\r", &mut key), MetadumpLine::Refused);
        assert_eq!(
            metadump_line(b"CLIENT_ERROR x", &mut key),
            MetadumpLine::Refused
        );
        assert_eq!(metadump_line(b"key=bad%2", &mut key), MetadumpLine::Other);
        assert_eq!(metadump_line(b"other", &mut key), MetadumpLine::Other);
    }
}
