//! One pipelined connection to a memcached server.
//!
//! Senders append request bytes to the connection's output queue and a
//! record to its FIFO of requests in flight, then wake the connection's task.
//! The task writes everything queued in one go (so requests from many
//! clients share a system call), reads replies, frames each one against the
//! request at the front of the FIFO, and hands it to that request's sink.
//!
//! Failure rules (a connection is never reused after any of these):
//! - connect fails or times out: every queued request fails, *unsent*;
//! - the front request's deadline passes: every request fails (timeout);
//! - the server closes, errors, or sends bytes that do not frame as the reply
//!   the front request expects (including bytes when nothing is in flight):
//!   every request fails.
//!
//! A request is *sent* once all its bytes were written; one that was only
//! partly written cannot have been executed by memcached (it waits for the
//! rest), so it counts as unsent.
//!
//! A connection whose pool was dropped (a reload removed the server, or
//! changed its address) is *retired*: it takes no new requests and closes
//! once those on it are answered.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::BytesMut;
use memrelay_protocol::response::ResponseParser;
use memrelay_protocol::Expect;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use super::health::Health;
use super::{BackendError, BackendReply, BackendSettings, Failure, ReplyTo};
use crate::net::notify::LocalNotify;
use crate::net::outqueue::OutQueue;
use crate::net::Stream;

/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Ready,
    Closed,
}

#[derive(Debug)]
struct InFlight {
    expect: Expect,
    reply: ReplyTo,
    /// When it was queued: a failure of a request sent before the server
    /// last recovered does not count against it (see `Health`).
    sent: Instant,
    deadline: Instant,
    /// Offset in the connection's byte stream just past this request.
    end: u64,
}

#[derive(Debug)]
struct Inner {
    state: Cell<State>,
    out: RefCell<OutQueue>,
    inflight: RefCell<VecDeque<InFlight>>,
    /// Bytes ever queued / ever written on this connection.
    queued: Cell<u64>,
    written: Cell<u64>,
    wake: LocalNotify,
    /// Set by `poison`: the task closes the connection at its next turn.
    poisoned: Cell<bool>,
    /// Set by `retire`: close once nothing is queued or in flight.
    retired: Cell<bool>,
    health: Arc<Health>,
    /// The worker's settings, read at each use (a reload changes them).
    settings: Rc<Cell<BackendSettings>>,
}

/// A handle to a connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Conn {
    inner: Rc<Inner>,
}

impl Conn {
    /// Starts connecting in the background; requests can be queued at once.
    pub fn open(
        addr: SocketAddr,
        health: Arc<Health>,
        settings: Rc<Cell<BackendSettings>>,
    ) -> Conn {
        let inner = Rc::new(Inner {
            state: Cell::new(State::Connecting),
            out: RefCell::new(OutQueue::new()),
            inflight: RefCell::new(VecDeque::new()),
            queued: Cell::new(0),
            written: Cell::new(0),
            wake: LocalNotify::default(),
            poisoned: Cell::new(false),
            retired: Cell::new(false),
            health,
            settings,
        });
        tokio::task::spawn_local(drive(inner.clone(), addr));
        Conn { inner }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.state.get() == State::Closed
    }

    /// The server sent something a well-behaved memcached never does (seen
    /// above the framing, e.g. a VALUE for a key nobody asked for): close
    /// the connection; whatever is still in flight on it fails.
    pub fn poison(&self) {
        self.inner.poisoned.set(true);
        self.inner.wake.notify();
    }

    /// Nobody will send on this connection again: close it once every
    /// request on it is answered (or failed).
    pub fn retire(&self) {
        self.inner.retired.set(true);
        self.inner.wake.notify();
    }

    /// Queues a request: `write` appends its line, then `value` (a storage
    /// command's data block, without `\r\n`) follows, by reference when large.
    pub fn send(
        &self,
        expect: Expect,
        reply: ReplyTo,
        write: impl FnOnce(&mut BytesMut),
        value: Option<bytes::Bytes>,
    ) -> Result<(), BackendError> {
        let inner = &self.inner;
        let settings = inner.settings.get();
        let mut inflight = inner.inflight.borrow_mut();
        if inflight.len() >= settings.max_inflight {
            return Err(BackendError::unsent(Failure::Overloaded));
        }
        let mut out = inner.out.borrow_mut();
        let before = out.len();
        out.compose(write);
        if let Some(v) = value {
            out.put_bytes(v);
            out.put_slice(b"\r\n");
        }
        if expect == Expect::MetaQuiet {
            // Closes a quiet request's reply, which may be empty.
            out.put_slice(b"mn\r\n");
        }
        let end = inner.queued.get() + (out.len() - before) as u64;
        inner.queued.set(end);
        let now = Instant::now();
        inflight.push_back(InFlight {
            expect,
            reply,
            sent: now,
            deadline: now + settings.timeout,
            end,
        });
        drop(out);
        drop(inflight);
        inner.wake.notify();
        Ok(())
    }
}

/// The connection's task: connect, then write and read until it fails.
async fn drive(inner: Rc<Inner>, addr: SocketAddr) {
    let connect_timeout = inner.settings.get().connect_timeout;
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(server = %inner.health.name, error = %e, "connect failed");
            return fail(&inner, Failure::Connect);
        }
        Err(_) => return fail(&inner, Failure::Connect),
    };
    let _ = stream.set_nodelay(true);
    inner.state.set(State::Ready);

    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut parser = ResponseParser::new();
    let timer = sleep_until(Instant::now());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;

    loop {
        if inner.retired.get()
            && inner.inflight.borrow().is_empty()
            && inner.out.borrow().is_empty()
        {
            return close_quietly(&inner);
        }
        if inner.poisoned.get() {
            return fail(
                &inner,
                Failure::Protocol(memrelay_protocol::ResponseError::Unexpected),
            );
        }
        // Write whatever is queued; most of the time the socket takes it all.
        if let Err(f) = flush(&inner, &stream) {
            return fail(&inner, f);
        }
        let want_write = !inner.out.borrow().is_empty();
        // One timer per connection, re-armed when it fires or was idle, not
        // for every batch (that would cost more than the occasional early
        // wake-up): with one timeout, deadlines only grow along the FIFO.
        // A reload that shortens the timeout gives the front an earlier
        // deadline than the one armed: then it is re-armed too. (A request
        // queued behind one sent with the longer timeout waits for that one
        // at most: replies come in order.)
        if let Some(d) = inner.inflight.borrow().front().map(|f| f.deadline) {
            if !matches!(armed, Some(a) if a <= d) {
                timer.as_mut().reset(d);
                armed = Some(d);
            }
        }
        let interest = if want_write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        tokio::select! {
            biased;
            ready = stream.ready(interest) => {
                let ready = match ready {
                    Ok(r) => r,
                    Err(_) => return fail(&inner, Failure::Io),
                };
                if ready.is_readable() {
                    match read_and_dispatch(&inner, &stream, &mut rbuf, &mut parser) {
                        Ok(true) => {}
                        Ok(false) => return close_quietly(&inner),
                        Err(f) => return fail(&inner, f),
                    }
                }
            }
            _ = inner.wake.notified() => {}
            _ = &mut timer, if armed.is_some() => {
                armed = None;
                let expired = inner.inflight.borrow().front().map(|f| f.deadline <= Instant::now()).unwrap_or(false);
                if expired {
                    return fail(&inner, Failure::Timeout);
                }
            }
        }
    }
}

/// Writes queued bytes without blocking.
fn flush(inner: &Inner, stream: &TcpStream) -> Result<(), Failure> {
    let mut out = inner.out.borrow_mut();
    if out.is_empty() {
        return Ok(());
    }
    match out.write_to(|iov| Stream::try_write_vectored(stream, iov)) {
        Ok(n) => {
            inner.written.set(inner.written.get() + n as u64);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(_) => Err(Failure::Io),
    }
}

/// Reads what is available and hands out every complete reply. Returns
/// `Ok(false)` when the server closed an idle connection cleanly.
fn read_and_dispatch(
    inner: &Inner,
    stream: &TcpStream,
    rbuf: &mut BytesMut,
    parser: &mut ResponseParser,
) -> Result<bool, Failure> {
    loop {
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        match Stream::read_drained(stream, rbuf) {
            Ok(0) => {
                if inner.inflight.borrow().is_empty() && rbuf.is_empty() {
                    return Ok(false);
                }
                return Err(Failure::Closed);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(Failure::Io),
        }
    }
    let max_value = inner.settings.get().max_value_len;
    while !rbuf.is_empty() {
        let expect = match inner.inflight.borrow().front() {
            Some(f) => f.expect,
            // Bytes nobody asked for: the stream can no longer be trusted.
            None => {
                return Err(Failure::Protocol(
                    memrelay_protocol::ResponseError::Unexpected,
                ))
            }
        };
        match parser.parse(rbuf, expect, max_value) {
            Ok(Some((kind, n))) => {
                let bytes = rbuf.split_to(n).freeze();
                let Some(f) = inner.inflight.borrow_mut().pop_front() else {
                    break;
                };
                inner.health.record_success();
                f.reply.deliver(Ok(BackendReply { kind, bytes }));
            }
            Ok(None) => break,
            Err(e) => return Err(Failure::Protocol(e)),
        }
    }
    Ok(true)
}

/// The server closed an idle connection (a restart, an idle timeout): not a
/// failure of any request.
fn close_quietly(inner: &Inner) {
    inner.state.set(State::Closed);
    inner.out.borrow_mut().clear();
}

/// Fails every request on the connection and closes it for good.
fn fail(inner: &Inner, failure: Failure) {
    inner.state.set(State::Closed);
    inner.out.borrow_mut().clear();
    let oldest = inner.inflight.borrow().front().map(|f| f.sent);
    if oldest.is_some() || failure == Failure::Connect {
        // When the oldest request went out: a server that has answered
        // since then is alive, and this failure is the tail of a stall that
        // is over (see `Health`).
        let sent = oldest.map(|t| t.into_std());
        inner
            .health
            .record_failure(inner.settings.get().failure_limit, &failure, sent);
    }
    let written = inner.written.get();
    loop {
        let Some(f) = inner.inflight.borrow_mut().pop_front() else {
            break;
        };
        let sent = failure != Failure::Connect && f.end <= written;
        f.reply.deliver(Err(BackendError { failure, sent }));
    }
}
