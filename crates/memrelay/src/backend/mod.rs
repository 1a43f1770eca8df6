//! Connections to memcached servers.
//!
//! Each worker thread keeps, per server, a few persistent connections
//! ([`ServerPool`]); each connection carries many requests at once
//! (pipelined) and matches replies to a FIFO of requests in flight
//! ([`conn`]), plain or over TLS ([`connect`]). A connection that saw an error, a timeout or stray bytes is
//! closed and never reused. Whether a server is up is shared by all workers
//! ([`health`]), so a dead server is failed fast everywhere at once.

pub(crate) mod conn;
pub(crate) mod connect;
pub(crate) mod health;
pub(crate) mod probe;
pub(crate) mod records;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use memrelay_protocol::{Expect, ResponseError, ResponseKind};

use self::conn::Conn;
use self::connect::Dial;
use self::health::Health;

/// A complete reply from a server.
#[derive(Debug, Clone)]
pub(crate) struct BackendReply {
    pub kind: ResponseKind,
    /// The reply exactly as the server sent it.
    pub bytes: Bytes,
}

/// Why a request to a server failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Failure {
    #[error("server is marked down")]
    Down,
    #[error("cannot connect to server")]
    Connect,
    #[error("server timed out")]
    Timeout,
    #[error("server closed the connection")]
    Closed,
    #[error("{0}")]
    Protocol(ResponseError),
    #[error("network error talking to server")]
    Io,
    #[error("too many requests queued for server")]
    Overloaded,
    /// The reply to this request is larger than `--max-reply-size` (one
    /// server's reply, or all of a multi-get's replies together). Not the
    /// server's fault: it does not count against its health, and a read is
    /// not retried elsewhere, where it would be just as large.
    #[error("reply larger than --max-reply-size")]
    ReplyTooLarge,
    /// The client is already owed `--max-client-buffer` plus
    /// `--max-reply-size` bytes of replies it has not read: a read's reply
    /// that arrives then is dropped instead of held.
    #[error("client owes too many reply bytes")]
    ClientBehind,
}

impl Failure {
    /// A read refused for its size (the request's or its client's), never
    /// for the server's health: answered with an error, not failed over.
    pub(crate) fn is_oversize(self) -> bool {
        matches!(self, Failure::ReplyTooLarge | Failure::ClientBehind)
    }
}

/// A failed request, classified for retry decisions: a request that was
/// never (fully) sent cannot have been applied, so it is always safe to send
/// elsewhere; one that was sent may have been applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackendError {
    pub failure: Failure,
    pub sent: bool,
}

impl BackendError {
    pub(crate) fn unsent(failure: Failure) -> BackendError {
        BackendError {
            failure,
            sent: false,
        }
    }

    /// The `SERVER_ERROR` line a client gets for this failure.
    pub(crate) fn reply(&self) -> &'static [u8] {
        match self.failure {
            Failure::Down => b"SERVER_ERROR server is marked down\r\n",
            Failure::Connect => b"SERVER_ERROR cannot connect to server\r\n",
            Failure::Timeout => b"SERVER_ERROR server timed out\r\n",
            Failure::Closed => b"SERVER_ERROR server closed the connection\r\n",
            Failure::Protocol(_) => b"SERVER_ERROR bad reply from server\r\n",
            Failure::Io => b"SERVER_ERROR network error talking to server\r\n",
            Failure::Overloaded => b"SERVER_ERROR too many requests queued for server\r\n",
            Failure::ReplyTooLarge => b"SERVER_ERROR reply too large\r\n",
            // memcached's words when it cannot buffer a get's reply.
            Failure::ClientBehind => b"SERVER_ERROR out of memory writing get response\r\n",
        }
    }
}

pub(crate) type BackendResult = Result<BackendReply, BackendError>;

/// Where a reply goes. The session (or a background task) that sent the
/// request implements it; `token` and `part` say which request and which of
/// its sub-requests the reply belongs to.
pub(crate) trait Sink {
    fn deliver(&self, token: u64, part: u32, result: BackendResult);
}

#[derive(Clone)]
pub(crate) struct ReplyTo {
    pub sink: Rc<dyn Sink>,
    pub token: u64,
    pub part: u32,
}

impl std::fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplyTo({}, {})", self.token, self.part)
    }
}

impl ReplyTo {
    pub(crate) fn deliver(self, result: BackendResult) {
        self.sink.deliver(self.token, self.part, result);
    }
}

/// Settings every connection to servers needs. A worker thread keeps one
/// copy in a shared `Cell` that its pools and connections read at each use,
/// so a reload changes them in place for connections already open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BackendSettings {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub failure_limit: u32,
    /// Largest value accepted in a reply (a bigger one is a broken server).
    pub max_value_len: usize,
    /// Largest reply buffered for one request (`--max-reply-size`); the
    /// rest of a larger one is read and dropped (see `conn`).
    pub max_reply_len: usize,
    /// Most requests queued or in flight on one connection.
    pub max_inflight: usize,
}

/// Requests in flight on one server connection before it refuses more.
const MAX_INFLIGHT: usize = 100_000;
/// Reply bytes past `--max-value-size` a server's VALUE may carry (its
/// header) before the reply counts as broken.
const VALUE_SLACK: usize = 1024;

impl BackendSettings {
    /// The settings a configuration gives.
    pub(crate) fn of(cfg: &crate::config::Config) -> BackendSettings {
        BackendSettings {
            connect_timeout: cfg.connect_timeout,
            timeout: cfg.timeout,
            failure_limit: cfg.failure_limit,
            max_value_len: cfg.limits.max_value_len + VALUE_SLACK,
            max_reply_len: cfg.max_reply_size,
            max_inflight: MAX_INFLIGHT,
        }
    }
}

/// One server as seen by one worker thread: its connections and shared health.
///
/// A reload that keeps the server (same name, same address) hands the same
/// pool to the new configuration, so a key's requests stay on one connection
/// across the reload and reach the server in the order they were sent. When
/// no configuration uses a pool any more, it is dropped and its connections
/// close once the requests on them are answered.
#[derive(Debug)]
pub(crate) struct ServerPool {
    pub name: String,
    dial: RefCell<Dial>,
    conns: RefCell<Vec<Option<Conn>>>,
    nconns: usize,
    next: Cell<usize>,
    health: Arc<Health>,
    settings: Rc<Cell<BackendSettings>>,
}

impl Drop for ServerPool {
    fn drop(&mut self) {
        for c in self.conns.borrow().iter().flatten() {
            c.retire();
        }
    }
}

impl ServerPool {
    pub(crate) fn new(
        name: String,
        dial: Dial,
        nconns: usize,
        health: Arc<Health>,
        settings: Rc<Cell<BackendSettings>>,
    ) -> ServerPool {
        ServerPool {
            name,
            dial: RefCell::new(dial),
            conns: RefCell::new((0..nconns.max(1)).map(|_| None).collect()),
            nconns: nconns.max(1),
            next: Cell::new(0),
            health,
            settings,
        }
    }

    /// Where its connections go (resolved when the configuration was read).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.dial.borrow().addr
    }

    /// How new connections reach the server from now on (a reload read the
    /// TLS files again); open ones go on as they are.
    pub(crate) fn redial(&self, dial: Dial) {
        *self.dial.borrow_mut() = dial;
    }

    /// Queues a request: `write` appends its bytes. Fails at once, with
    /// nothing sent, when the server is marked down or overloaded; otherwise
    /// the reply (or failure) reaches `reply` later.
    pub(crate) fn send(
        &self,
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) -> Result<(), BackendError> {
        let i = self.next.get();
        self.next.set(i.wrapping_add(1));
        self.send_on(i, expect, reply, write, value)
    }

    /// Like `send`, but every request for the same key uses the same
    /// connection, so writes to one key reach the server in the order they
    /// were sent (with several connections per server, round-robin could
    /// reorder them, and a primary and its backup could apply two writes
    /// in different orders).
    pub(crate) fn send_for_key(
        &self,
        key: &[u8],
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) -> Result<(), BackendError> {
        let i = if self.nconns == 1 {
            0
        } else {
            key.iter().fold(0x811c_9dc5u32, |h, &b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            }) as usize
        };
        self.send_on(i, expect, reply, write, value)
    }

    fn send_on(
        &self,
        i: usize,
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<Bytes>,
    ) -> Result<(), BackendError> {
        if self.health.is_down() {
            return Err(BackendError::unsent(Failure::Down));
        }
        self.conn(i % self.nconns).send(expect, reply, write, value)
    }

    /// The server misbehaved above the framing: count a failure and close
    /// this worker's connections to it (new ones are opened on demand).
    pub(crate) fn poison(&self, why: &str) {
        self.health
            .record_failure(self.settings.get().failure_limit, &why, None);
        for c in self.conns.borrow().iter().flatten() {
            c.poison();
        }
    }

    /// Connection `i`, replaced by a new one if it was closed.
    fn conn(&self, i: usize) -> Conn {
        let mut conns = self.conns.borrow_mut();
        match &conns[i] {
            Some(c) if !c.is_closed() => c.clone(),
            _ => {
                let c = Conn::open(
                    self.dial.borrow().clone(),
                    self.health.clone(),
                    self.settings.clone(),
                );
                conns[i] = Some(c.clone());
                c
            }
        }
    }
}
