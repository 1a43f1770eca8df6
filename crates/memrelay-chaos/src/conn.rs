//! A blocking client connection speaking the memcached text protocol, with
//! a deadline on every reply (so a slow answer is measured, and a missing
//! one does not hang the tool).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

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

/// One item of a retrieval reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Val {
    pub key: String,
    pub flags: u32,
    pub data: String,
    /// The CAS unique, for `gets`.
    pub cas: Option<u64>,
}

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A one-line reply (without CRLF): STORED, DELETED, a number, an error...
    Line(String),
    /// `VALUE` blocks up to `END`.
    Values(Vec<Val>),
}

#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

pub fn is_error_line(l: &str) -> bool {
    l.starts_with("SERVER_ERROR") || l.starts_with("CLIENT_ERROR") || l == "ERROR"
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
            let parts: Vec<&str> = l.split(' ').collect();
            if parts.len() < 4 || parts.len() > 5 || parts[0] != "VALUE" {
                return Err(Fail::Garbled(format!("expected VALUE or END, got {l:?}")));
            }
            let flags: u32 = parts[2]
                .parse()
                .map_err(|_| Fail::Garbled(format!("bad flags in {l:?}")))?;
            let n: usize = parts[3]
                .parse()
                .map_err(|_| Fail::Garbled(format!("bad length in {l:?}")))?;
            if n > 1 << 20 {
                return Err(Fail::Garbled(format!("value too long in {l:?}")));
            }
            let data = self.block(n, deadline)?;
            vals.push(Val {
                key: parts[1].to_string(),
                flags,
                data: String::from_utf8_lossy(&data).into_owned(),
                cas: parts.get(4).and_then(|c| c.parse().ok()),
            });
        }
    }

    /// A meta reply: `VA <len> [f<flags>]` and its data (as one `Val` with
    /// no key), or any other line (`HD`, `EN`, `NF`, an error...).
    pub fn meta(&mut self, deadline: Instant) -> Result<Reply, Fail> {
        let l = self.line(deadline)?;
        let Some(rest) = l.strip_prefix("VA ") else {
            return Ok(Reply::Line(l));
        };
        let mut toks = rest.split(' ');
        let n: usize = toks
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| Fail::Garbled(format!("bad VA line {l:?}")))?;
        if n > 1 << 20 {
            return Err(Fail::Garbled(format!("value too long in {l:?}")));
        }
        let flags = toks
            .find_map(|t| t.strip_prefix('f').and_then(|f| f.parse().ok()))
            .unwrap_or(0);
        let data = self.block(n, deadline)?;
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
