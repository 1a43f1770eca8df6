//! A blocking connection that reads parsed replies (lines, `VALUE` blocks,
//! meta replies), with a deadline on every reply (so a slow answer is
//! measured, and a missing one does not hang the reader). Replies to a
//! pipelined batch are read one by one from its buffer: the model checker
//! reads through this, the byte-for-byte tests through `client::Client`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::wire::{is_error_line, va_header, value_header, Val};

/// Why no reply could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    /// Nothing (complete) arrived before the deadline.
    Timeout,
    /// The peer closed the connection, or an I/O error.
    Closed(String),
    /// Bytes that are not a memcached reply to what was asked.
    Garbled(String),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Timeout => write!(f, "no reply before the client deadline"),
            Fail::Closed(e) => write!(f, "connection closed: {e}"),
            Fail::Garbled(e) => write!(f, "garbled reply: {e}"),
        }
    }
}

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A one-line reply (without CRLF): STORED, DELETED, a number, an error...
    Line(String),
    /// `VALUE` blocks up to `END`.
    Values(Vec<Val>),
}

/// Longest value the reader accepts: the tests' values are short, and a
/// length past this is a framing error, not a value to wait for.
const MAX_VALUE: usize = 1 << 20;

#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

impl Conn {
    pub fn connect(addr: &str) -> Result<Conn, String> {
        let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let stream = TcpStream::connect_timeout(&sa, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
            pos: 0,
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        self.stream
            .write_all(bytes)
            .map_err(|e| Fail::Closed(e.to_string()))
    }

    /// Reads more bytes into the buffer, waiting at most until `deadline`.
    fn fill(&mut self, deadline: Instant) -> Result<(), Fail> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Fail::Timeout);
        }
        let _ = self
            .stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(Fail::Closed("EOF".into())),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(Fail::Timeout)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(Fail::Closed(e.to_string())),
        }
    }

    /// One line, without its CRLF.
    pub fn line(&mut self, deadline: Instant) -> Result<String, Fail> {
        loop {
            if let Some(i) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[self.pos..self.pos + i]).into_owned();
                self.pos += i + 2;
                return Ok(l);
            }
            if self.buf.len() - self.pos > 64 * 1024 {
                return Err(Fail::Garbled("line longer than 64 KiB".into()));
            }
            self.fill(deadline)?;
        }
    }

    /// Exactly `n` bytes followed by CRLF.
    fn block(&mut self, n: usize, deadline: Instant) -> Result<Vec<u8>, Fail> {
        while self.buf.len() - self.pos < n + 2 {
            self.fill(deadline)?;
        }
        let data = self.buf[self.pos..self.pos + n].to_vec();
        if &self.buf[self.pos + n..self.pos + n + 2] != b"\r\n" {
            return Err(Fail::Garbled("data block not followed by CRLF".into()));
        }
        self.pos += n + 2;
        Ok(data)
    }

    /// A retrieval reply: `VALUE` blocks up to `END`, or an error line
    /// (returned as `Reply::Line`).
    pub fn retrieval(&mut self, deadline: Instant) -> Result<Reply, Fail> {
        let mut vals = Vec::new();
        loop {
            let l = self.line(deadline)?;
            if l == "END" {
                return Ok(Reply::Values(vals));
            }
            if is_error_line(&l) {
                return Ok(Reply::Line(l));
            }
            let h = value_header(&l).map_err(Fail::Garbled)?;
            if h.len > MAX_VALUE {
                return Err(Fail::Garbled(format!("value too long in {l:?}")));
            }
            let data = self.block(h.len, deadline)?;
            vals.push(Val {
                key: h.key,
                flags: h.flags,
                data: String::from_utf8_lossy(&data).into_owned(),
                cas: h.cas,
            });
        }
    }

    /// A meta reply: `VA <len> [f<flags>]` and its data (as one `Val` with
    /// no key), or any other line (`HD`, `EN`, `NF`, an error...).
    pub fn meta(&mut self, deadline: Instant) -> Result<Reply, Fail> {
        let l = self.line(deadline)?;
        if !l.starts_with("VA ") {
            return Ok(Reply::Line(l));
        }
        let h = va_header(&l).map_err(Fail::Garbled)?;
        if h.len > MAX_VALUE {
            return Err(Fail::Garbled(format!("value too long in {l:?}")));
        }
        let flags = h.flags;
        let data = self.block(h.len, deadline)?;
        Ok(Reply::Values(vec![Val {
            key: String::new(),
            flags,
            data: String::from_utf8_lossy(&data).into_owned(),
            cas: None,
        }]))
    }

    /// `stats` as (name, value) pairs.
    pub fn stats(&mut self, deadline: Instant) -> Result<Vec<(String, String)>, Fail> {
        self.send(b"stats\r\n")?;
        let mut out = Vec::new();
        loop {
            let l = self.line(deadline)?;
            if l == "END" {
                return Ok(out);
            }
            let mut it = l.splitn(3, ' ');
            match (it.next(), it.next(), it.next()) {
                (Some("STAT"), Some(k), Some(v)) => out.push((k.to_string(), v.to_string())),
                _ => return Err(Fail::Garbled(format!("stats line {l:?}"))),
            }
        }
    }
}
