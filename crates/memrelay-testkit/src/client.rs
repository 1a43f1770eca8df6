//! A blocking client whose every read and write has a deadline, so a test
//! cannot hang on a server that stops answering. It returns the bytes it
//! read, for tests that compare replies byte for byte; `conn::Conn` reads
//! parsed replies for the model checker.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::resolve;
use crate::wire::{escape, parse_stats};

/// Default deadline for one exchange (request written, whole reply read).
pub const IO_DEADLINE: Duration = Duration::from_secs(5);

/// The item `Client::exchange` reads after each request: its reply marks
/// where the request's own reply ended.
const SENTINEL_KEY: &str = "__sentinel__";
const SENTINEL_VALUE: &str = "memrelay-harness-sentinel-7c1e0f93";

/// `stats` of a memcached or of the proxy, as a map. (The deadline allows
/// for a proxy under a hostile load.)
pub fn stats(addr: &str) -> HashMap<String, String> {
    let mut c = Client::connect(addr);
    c.set_deadline(Duration::from_secs(10));
    let r = c.send_until(b"stats\r\n", |b| b.ends_with(b"END\r\n"));
    assert_eq!(
        r.end,
        End::Complete,
        "stats from {addr}: {}",
        escape(&r.bytes)
    );
    parse_stats(&r.bytes)
}

/// One number from `stats`.
pub fn stat_u64(addr: &str, name: &str) -> u64 {
    let s = stats(addr);
    s.get(name)
        .unwrap_or_else(|| panic!("stats of {addr} has no {name}: {s:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("stats {name} of {addr} is not a number: {s:?}"))
}

/// `get key` on a connection of its own: the whole reply, as text.
pub fn get_text(addr: &str, key: &str) -> String {
    let r = Client::connect(addr).send_until(format!("get {key}\r\n").as_bytes(), |b| {
        b.ends_with(b"END\r\n")
    });
    String::from_utf8_lossy(&r.bytes).to_string()
}

/// `set key 0 0 <len>` on a connection of its own: the reply, as text.
pub fn set_text(addr: &str, key: &str, value: &str) -> String {
    let r = Client::connect(addr).send_until(
        format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()).as_bytes(),
        |b| b.ends_with(b"\r\n"),
    );
    String::from_utf8_lossy(&r.bytes).to_string()
}

/// The reply to a `get` that finds `key` holding `value` (flags 0).
pub fn hit_text(key: &str, value: &str) -> String {
    format!("VALUE {key} 0 {}\r\n{value}\r\nEND\r\n", value.len())
}

/// A plain HTTP GET (the metrics endpoint): status code and body. The
/// server closes the connection after its reply.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_DEADLINE)).expect("read timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap_or_else(|e| panic!("write to {addr}: {e}"));
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)
        .unwrap_or_else(|e| panic!("read from {addr}: {e}"));
    let text = String::from_utf8(reply).expect("an HTTP reply in UTF-8");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// How the reading of a reply stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The reply is complete: the sentinel reply arrived (it is stripped),
    /// or the caller's completion test said so.
    Complete,
    /// The server closed the connection (EOF or reset).
    Closed,
    /// The deadline passed with the connection still open.
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub end: End,
}

/// A blocking client. Every read and write has a deadline, so a test can
/// not hang on a server that stops answering.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    addr: String,
    deadline: Duration,
    sentinel_ready: bool,
}

impl Client {
    pub fn connect(addr: &str) -> Client {
        let sa = resolve(addr);
        let stream = TcpStream::connect_timeout(&sa, IO_DEADLINE)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_write_timeout(Some(IO_DEADLINE))
            .expect("write timeout");
        Client {
            stream,
            addr: addr.to_string(),
            deadline: IO_DEADLINE,
            sentinel_ready: false,
        }
    }

    /// Connects and stores the sentinel item through this connection, so
    /// that `exchange` can tell where replies end.
    pub fn with_sentinel(addr: &str) -> Client {
        let mut c = Client::connect(addr);
        c.store_sentinel();
        c
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn set_deadline(&mut self, d: Duration) {
        self.deadline = d;
    }

    fn sentinel_set_request() -> Vec<u8> {
        format!(
            "set {SENTINEL_KEY} 0 0 {}\r\n{SENTINEL_VALUE}\r\n",
            SENTINEL_VALUE.len()
        )
        .into_bytes()
    }

    fn sentinel_get_request() -> Vec<u8> {
        format!("get {SENTINEL_KEY}\r\n").into_bytes()
    }

    fn sentinel_reply() -> Vec<u8> {
        format!(
            "VALUE {SENTINEL_KEY} 0 {}\r\n{SENTINEL_VALUE}\r\nEND\r\n",
            SENTINEL_VALUE.len()
        )
        .into_bytes()
    }

    /// (Re)stores the sentinel item; panics if the server does not say STORED.
    pub fn store_sentinel(&mut self) {
        let r = self.send_and_read(&[&Self::sentinel_set_request()], |b| b.ends_with(b"\r\n"));
        assert!(
            r.bytes == b"STORED\r\n",
            "storing the sentinel on {} failed: {:?} {}",
            self.addr,
            r.end,
            escape(&r.bytes)
        );
        self.sentinel_ready = true;
    }

    /// Sends `req` then the sentinel `get`, and returns exactly the reply
    /// bytes to `req` (sentinel stripped), or what came before the server
    /// closed the connection / the deadline passed.
    ///
    /// The request and the sentinel `get` go out in one write, as a client
    /// that pipelines everything and then waits would send them: a server
    /// that only makes progress when more bytes arrive must not be rescued
    /// by a later sentinel write.
    pub fn exchange(&mut self, req: &[u8]) -> Reply {
        assert!(self.sentinel_ready, "exchange needs Client::with_sentinel");
        let mut all = req.to_vec();
        all.extend_from_slice(&Self::sentinel_get_request());
        let tail = Self::sentinel_reply();
        let r = self.send_and_read(&[&all], |b| b.ends_with(&tail));
        Self::finish_sentinel(r)
    }

    /// Like `exchange`, with the request sent as separate writes (the
    /// sentinel `get` in a write of its own).
    pub fn exchange_split(&mut self, chunks: &[&[u8]]) -> Reply {
        assert!(self.sentinel_ready, "exchange needs Client::with_sentinel");
        let get = Self::sentinel_get_request();
        let mut all: Vec<&[u8]> = chunks.to_vec();
        all.push(&get);
        let tail = Self::sentinel_reply();
        let r = self.send_and_read(&all, |b| b.ends_with(&tail));
        Self::finish_sentinel(r)
    }

    /// Like `exchange`, but stores the sentinel again after `req` (for
    /// requests such as flush_all that remove it). The extra `STORED` is
    /// stripped as well.
    pub fn exchange_resentinel(&mut self, req: &[u8]) -> Reply {
        let set = Self::sentinel_set_request();
        let get = Self::sentinel_get_request();
        let mut tail = b"STORED\r\n".to_vec();
        tail.extend_from_slice(&Self::sentinel_reply());
        let all = [req, &set, &get].concat();
        let r = self.send_and_read(&[&all], |b| b.ends_with(&tail));
        if r.end == End::Complete {
            let n = r.bytes.len() - tail.len();
            Reply {
                bytes: r.bytes[..n].to_vec(),
                end: End::Complete,
            }
        } else {
            r
        }
    }

    fn finish_sentinel(r: Reply) -> Reply {
        if r.end == End::Complete {
            let n = r.bytes.len() - Self::sentinel_reply().len();
            Reply {
                bytes: r.bytes[..n].to_vec(),
                end: End::Complete,
            }
        } else {
            r
        }
    }

    /// Sends `req` (no sentinel) and reads until the server closes the
    /// connection or the deadline passes.
    pub fn send_until_close(&mut self, req: &[u8]) -> Reply {
        self.send_and_read(&[req], |_| false)
    }

    /// Sends `req` (no sentinel) and reads until `done(reply so far)`.
    pub fn send_until(&mut self, req: &[u8], done: impl Fn(&[u8]) -> bool) -> Reply {
        self.send_and_read(&[req], done)
    }

    /// Writes raw bytes (one write, flushed). No reading.
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write to {}: {e}", self.addr));
        self.stream.flush().expect("flush");
    }

    /// Reads until `done(reply so far)`, EOF, or the deadline.
    pub fn read_until(&mut self, done: impl Fn(&[u8]) -> bool) -> Reply {
        self.send_and_read(&[], done)
    }

    /// Half-closes the write side (the server sees EOF).
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Writes the chunks as separate writes (TCP_NODELAY, flushed; a short
    /// pause between chunks makes separate segments likely, but nothing
    /// depends on it) on a helper thread, while this thread reads until
    /// `done`, EOF or the deadline. Writing and reading concurrently means a
    /// large request can never deadlock against a large reply.
    fn send_and_read(&mut self, chunks: &[&[u8]], done: impl Fn(&[u8]) -> bool) -> Reply {
        let end_at = Instant::now() + self.deadline;
        let mut writer = self.stream.try_clone().expect("clone stream");
        let owned: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        thread::scope(|scope| {
            let w = scope.spawn(move || {
                let n = owned.len();
                for (i, c) in owned.iter().enumerate() {
                    if writer.write_all(c).and_then(|_| writer.flush()).is_err() {
                        // The server closed the connection; the reader sees it.
                        return;
                    }
                    if i + 1 < n {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            });
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            let end = loop {
                if !buf.is_empty() && done(&buf) {
                    break End::Complete;
                }
                let now = Instant::now();
                if now >= end_at {
                    break End::Timeout;
                }
                self.stream
                    .set_read_timeout(Some(end_at - now))
                    .expect("read timeout");
                match self.stream.read(&mut chunk) {
                    Ok(0) => break End::Closed,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break End::Timeout
                    }
                    // Reset / aborted: the server closed with data unread.
                    Err(_) => break End::Closed,
                }
            };
            if end == End::Timeout && !w.is_finished() {
                // Unblock a writer stuck on a server that stopped reading
                // (the connection is then half-closed). Otherwise the
                // connection stays usable after a timeout.
                let _ = self.stream.shutdown(Shutdown::Write);
            }
            let _ = w.join();
            Reply { bytes: buf, end }
        })
    }
}
