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
//! A reply larger than `--max-reply-size` (a multi-get naming a large item
//! many times, or a server streaming VALUE blocks without end) is not
//! buffered: its request fails at once with `ReplyTooLarge`, and the rest
//! of the reply is framed as it arrives and dropped, holding at most one
//! VALUE block. Dropping the connection instead would fail every other
//! request pipelined on it, so one client's oversized get would disturb
//! other clients; skipping keeps them. The skip has the failed request's
//! deadline: a reply that has not ended by then (a server that never stops,
//! or a reply far too large to drop in time) closes the connection, failing
//! what is behind it with a timeout, but is not counted against the
//! server's health: a client must not be able to mark a healthy server
//! down by asking for huge replies.
//!
//! A connection whose pool was dropped (a reload removed the server, or
//! changed its address) is *retired*: it takes no new requests and closes
//! once those on it are answered.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use memrelay_protocol::response::ResponseParser;
use memrelay_protocol::Expect;
use tokio::io::Interest;
use tokio::time::{sleep_until, Instant};

use super::connect::{Dial, ServerStream};
use super::health::Health;
use super::{BackendError, BackendReply, BackendSettings, Failure, ReplyTo};
use crate::net::notify::LocalNotify;
use crate::net::outqueue::OutQueue;
use crate::net::Stream;

/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// Most bytes read in one turn before they are parsed. Replies are slices
/// of the read buffer, and a reply held for a slow client keeps the whole
/// allocation it was read into alive: reading in small batches keeps that
/// allocation not much larger than the reply being completed (with
/// `unshare`), so memory held follows the reply bytes the sessions count.
/// Reading up to `--max-reply-size` before parsing made each 50 KiB reply
/// pin megabytes.
const READ_BATCH: usize = 64 * 1024;

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
    /// While the rest of a reply too large to keep is read and dropped:
    /// the deadline of the request it answered.
    skipping: Cell<Option<Instant>>,
    /// Set by `retire`: close once nothing is queued or in flight.
    retired: Cell<bool>,
    health: Arc<Health>,
    /// The worker's settings, read at each use (a reload changes them).
    settings: Rc<Cell<BackendSettings>>,
    /// Over TLS: writes follow `records`' rule, cut at the ends of the
    /// requests in flight.
    records: bool,
}

/// What closes a quiet meta request's reply (which may be empty).
const MN: &[u8] = b"mn\r\n";

/// A handle to a connection; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    inner: Rc<Inner>,
}

impl Conn {
    /// Starts connecting in the background; requests can be queued at once.
    pub(crate) fn open(
        dial: Dial,
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
            skipping: Cell::new(None),
            retired: Cell::new(false),
            health,
            settings,
            records: dial.is_tls(),
        });
        tokio::task::spawn_local(drive(inner.clone(), dial));
        Conn { inner }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.inner.state.get() == State::Closed
    }

    /// The server sent something a well-behaved memcached never does (seen
    /// above the framing, e.g. a VALUE for a key nobody asked for): close
    /// the connection; whatever is still in flight on it fails.
    pub(crate) fn poison(&self) {
        self.inner.poisoned.set(true);
        self.inner.wake.notify();
    }

    /// Nobody will send on this connection again: close it once every
    /// request on it is answered (or failed).
    pub(crate) fn retire(&self) {
        self.inner.retired.set(true);
        self.inner.wake.notify();
    }

    /// Queues a request: `write` appends its line, then `value` (a storage
    /// command's data block, without `\r\n`) follows, by reference when large.
    pub(crate) fn send(
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
            out.put_slice(MN);
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
async fn drive(inner: Rc<Inner>, dial: Dial) {
    let connect_timeout = inner.settings.get().connect_timeout;
    match dial.connect(connect_timeout).await {
        Ok(ServerStream::Plain(s)) => run(inner, s).await,
        Ok(ServerStream::Tls(s)) => run(inner, *s).await,
        Err(e) => {
            // A TLS failure (an untrusted certificate, a server without
            // TLS) is worth a warning: it will not heal by itself.
            if e.kind() == std::io::ErrorKind::InvalidData {
                tracing::warn!(server = %inner.health.name, error = %e, "TLS handshake failed");
            } else {
                tracing::debug!(server = %inner.health.name, error = %e, "connect failed");
            }
            fail(&inner, Failure::Connect)
        }
    }
}

/// Writes and reads on a connected stream until it fails.
async fn run<S: Stream>(inner: Rc<Inner>, stream: S) {
    inner.state.set(State::Ready);

    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut parser = ResponseParser::new();
    let timer = sleep_until(Instant::now());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;

    loop {
        let want_write = match before_wait(&inner, &stream) {
            Ok(w) => w,
            Err(end) => return end.apply(&inner),
        };
        rearm(&inner, timer.as_mut(), &mut armed);
        let interest = if want_write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        tokio::select! {
            biased;
            ready = stream.ready(interest) => {
                let Ok(ready) = ready else {
                    return fail(&inner, Failure::Io);
                };
                if ready.is_readable() {
                    match read_and_dispatch(&inner, &stream, &mut rbuf, &mut parser) {
                        Ok(Read::Drained) => {}
                        // More is waiting: let this worker's other tasks
                        // run first, so a server streaming at full speed
                        // (a huge reply being dropped, a hostile server)
                        // does not hold up every other client.
                        Ok(Read::Batch) => tokio::task::yield_now().await,
                        Ok(Read::Idle) => return close_quietly(&inner),
                        Err(f) => return fail(&inner, f),
                    }
                }
            }
            _ = inner.wake.notified() => {}
            _ = &mut timer, if armed.is_some() => {
                armed = None;
                if let Some(end) = timer_fired(&inner, &stream) {
                    return end.apply(&inner);
                }
            }
        }
    }
}

/// How a connection's task ends.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Retired and drained: nothing is failed.
    Quietly,
    /// The connection failed: its requests fail, and the server is blamed.
    Failed(Failure),
    /// Its requests fail; the server is not blamed.
    RequestsFailed(Failure),
}

impl End {
    fn apply(self, inner: &Inner) {
        match self {
            End::Quietly => close_quietly(inner),
            End::Failed(f) => fail(inner, f),
            End::RequestsFailed(f) => fail_requests(inner, f),
        }
    }
}

/// What the task does each time before it waits: ends if it was retired
/// and has nothing left, or was poisoned; otherwise writes what is queued.
/// Returns whether bytes are left to write (the socket was full).
fn before_wait(inner: &Inner, stream: &impl Stream) -> Result<bool, End> {
    if inner.retired.get() && inner.inflight.borrow().is_empty() && inner.out.borrow().is_empty() {
        return Err(End::Quietly);
    }
    if inner.poisoned.get() {
        return Err(End::Failed(Failure::Protocol(
            memrelay_protocol::ResponseError::Unexpected,
        )));
    }
    // Write whatever is queued; most of the time the socket takes it all.
    flush(inner, stream).map_err(End::Failed)?;
    Ok(!inner.out.borrow().is_empty())
}

/// Arms the connection's timer for its oldest deadline. One timer per
/// connection, re-armed when it fired or was idle, not for every batch
/// (that would cost more than the occasional early wake-up): with one
/// timeout, deadlines only grow along the FIFO. A reload that shortens the
/// timeout gives the front an earlier deadline than the one armed: then it
/// is re-armed too. (A request queued behind one sent with the longer
/// timeout waits for that one at most: replies come in order.)
fn rearm(
    inner: &Inner,
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    armed: &mut Option<Instant>,
) {
    if let Some(d) = oldest_deadline(inner) {
        if !matches!(*armed, Some(a) if a <= d) {
            timer.reset(d);
            *armed = Some(d);
        }
    }
}

/// The timer fired: how the connection ends, if a deadline passed.
fn timer_fired(inner: &Inner, stream: &impl Stream) -> Option<End> {
    let now = Instant::now();
    if inner.skipping.get().is_some_and(|d| d <= now) {
        // A reply over the cap did not end in time. Its size is the
        // request's doing (a client could otherwise mark a healthy server
        // down with a few huge gets): the connection goes, the server is
        // not blamed.
        return Some(End::RequestsFailed(Failure::Timeout));
    }
    let expired = oldest_deadline(inner).is_some_and(|d| d <= now);
    if !expired {
        return None;
    }
    // Its requests are answered elsewhere now: what the kernel still holds
    // of them must not reach the server later (a partition that heals).
    stream.abort();
    Some(End::Failed(Failure::Timeout))
}

/// Writes queued bytes without blocking.
fn flush(inner: &Inner, stream: &impl Stream) -> Result<(), Failure> {
    let mut out = inner.out.borrow_mut();
    if out.is_empty() {
        return Ok(());
    }
    if inner.records {
        return flush_records(inner, &mut out, stream);
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

/// Over TLS: writes in `records`' cuts, each handed over whole once the
/// socket took the one before (so rustls holds one write at most). The
/// cuts are the ends of the requests not yet written, which are all still
/// in flight (a reply comes only after its request went out); a quiet
/// meta request's `mn` counts as a request of its own.
fn flush_records(inner: &Inner, out: &mut OutQueue, stream: &impl Stream) -> Result<(), Failure> {
    while !out.is_empty() && !stream.backlogged() {
        let written = inner.written.get();
        let span = out.span();
        let next = {
            let inflight = inner.inflight.borrow();
            let unwritten = inflight.partition_point(|f| f.end <= written);
            let ends = inflight.range(unwritten..).flat_map(|f| {
                let mn = (f.expect == Expect::MetaQuiet).then(|| f.end - MN.len() as u64);
                mn.into_iter().chain([f.end])
            });
            super::records::next_write(
                ends.filter(|&e| e > written)
                    .map(|e| (e - written) as usize),
                span,
            )
        };
        let len = match next {
            // Cannot happen (a request is a few pieces, and every request
            // is in flight): write what one call carries rather than stall.
            0 => span,
            n => n,
        };
        match out.write_prefix(len, |iov| stream.try_write_vectored(iov)) {
            Ok(n) => inner.written.set(written + n as u64),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(_) => return Err(Failure::Io),
        }
    }
    Ok(())
}

/// What one read turn found.
enum Read {
    /// Everything the server had sent was read.
    Drained,
    /// A full batch was read; more may be waiting.
    Batch,
    /// The server closed an idle connection cleanly.
    Idle,
}

/// Reads a batch and hands out every complete reply.
fn read_and_dispatch(
    inner: &Inner,
    stream: &impl Stream,
    rbuf: &mut BytesMut,
    parser: &mut ResponseParser,
) -> Result<Read, Failure> {
    // A batch, then parse: the socket stays readable for the next turn.
    let outcome = read_batch(inner, stream, rbuf)?;
    if !matches!(outcome, Read::Idle) {
        dispatch(inner, rbuf, parser)?;
    }
    Ok(outcome)
}

/// Reads up to `READ_BATCH` bytes into `rbuf`.
fn read_batch(inner: &Inner, stream: &impl Stream, rbuf: &mut BytesMut) -> Result<Read, Failure> {
    let mut read = 0;
    let mut outcome = Read::Batch;
    while read < READ_BATCH {
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        match Stream::read_drained(stream, rbuf) {
            Ok(0) => {
                if inner.inflight.borrow().is_empty() && rbuf.is_empty() {
                    return Ok(Read::Idle);
                }
                return Err(Failure::Closed);
            }
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                outcome = Read::Drained;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(Failure::Io),
        }
    }
    Ok(outcome)
}

/// Frames the replies `rbuf` holds and hands each to its request, in order.
fn dispatch(
    inner: &Inner,
    rbuf: &mut BytesMut,
    parser: &mut ResponseParser,
) -> Result<(), Failure> {
    let settings = inner.settings.get();
    let (max_value, max_reply) = (settings.max_value_len, settings.max_reply_len);
    while !rbuf.is_empty() {
        if inner.skipping.get().is_some() {
            // The rest of a reply too large to keep: frame it, drop it.
            match parser.parse(rbuf, Expect::Retrieval, max_value) {
                Ok(Some((_, n))) => {
                    rbuf.advance(n);
                    inner.skipping.set(None);
                    continue;
                }
                Ok(None) => {
                    rbuf.advance(parser.take_validated());
                    break;
                }
                Err(e) => return Err(Failure::Protocol(e)),
            }
        }
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
            Ok(Some((kind, n))) if n <= max_reply => {
                let bytes = take_reply(rbuf, n);
                let Some(f) = inner.inflight.borrow_mut().pop_front() else {
                    break;
                };
                inner.health.record_success();
                if let Some(h) = inner.health.latency.get(crate::stats::worker_index()) {
                    h.record(f.sent.elapsed());
                }
                f.reply.deliver(Ok(BackendReply { kind, bytes }));
            }
            Ok(Some((_, n))) => {
                // Complete, but over the cap: as if it had been skipped.
                rbuf.advance(n);
                refuse_front(inner);
            }
            Ok(None) if rbuf.len() > max_reply => {
                // Only a retrieval reply can grow past the cap (the cap
                // leaves room for one value and its lines, see config).
                if expect != Expect::Retrieval {
                    return Err(Failure::ReplyTooLarge);
                }
                if let Some(deadline) = refuse_front(inner) {
                    inner.skipping.set(Some(deadline));
                }
                rbuf.advance(parser.take_validated());
                break;
            }
            Ok(None) => break,
            Err(e) => return Err(Failure::Protocol(e)),
        }
    }
    Ok(())
}

/// The first `n` bytes of `rbuf`, a reply, as bytes of its own. A large
/// reply was read into a buffer grown for it, often to twice its size: held
/// for a slow client, a slice would keep the whole allocation, past what
/// the client's reply bytes account for. So when the buffer is much larger
/// than the reply, the reply is copied into an allocation of its size (a
/// copy of a large reply costs less than reading it did); otherwise it is
/// split off, and what follows moves to a buffer of its own.
fn take_reply(rbuf: &mut BytesMut, n: usize) -> bytes::Bytes {
    if n <= READ_CHUNK {
        return rbuf.split_to(n).freeze();
    }
    if rbuf.capacity() > n + n / 8 + READ_CHUNK {
        let bytes = bytes::Bytes::copy_from_slice(&rbuf[..n]);
        rbuf.advance(n);
        return bytes;
    }
    let bytes = rbuf.split_to(n).freeze();
    unshare(rbuf);
    bytes
}

/// After a large reply is split off, the read buffer still shares its
/// allocation: the replies read next would be slices of it too, and any one
/// of them held for a slow client would keep the whole large allocation
/// alive, beyond what the client's reply bytes account for. What follows
/// the large reply moves to a buffer of its own.
fn unshare(rbuf: &mut BytesMut) {
    let rest = std::mem::take(rbuf);
    let mut fresh = BytesMut::with_capacity(READ_CHUNK.max(rest.len()));
    fresh.extend_from_slice(&rest);
    *rbuf = fresh;
}

/// The request at the front gets `ReplyTooLarge` (without counting against
/// the server's health: the size is the request's doing). Returns its
/// deadline.
fn refuse_front(inner: &Inner) -> Option<Instant> {
    let f = inner.inflight.borrow_mut().pop_front()?;
    let deadline = f.deadline;
    f.reply.deliver(Err(BackendError {
        failure: Failure::ReplyTooLarge,
        sent: true,
    }));
    Some(deadline)
}

/// The earliest deadline the connection must meet: a reply being skipped,
/// else the oldest request in flight.
fn oldest_deadline(inner: &Inner) -> Option<Instant> {
    inner
        .skipping
        .get()
        .or_else(|| inner.inflight.borrow().front().map(|f| f.deadline))
}

/// The server closed an idle connection (a restart, an idle timeout): not a
/// failure of any request.
fn close_quietly(inner: &Inner) {
    inner.state.set(State::Closed);
    inner.out.borrow_mut().clear();
}

/// Fails every request on the connection and closes it for good.
fn fail(inner: &Inner, failure: Failure) {
    let oldest = inner.inflight.borrow().front().map(|f| f.sent);
    if oldest_deadline(inner).is_some() || failure == Failure::Connect {
        // When the oldest request went out: a server that has answered
        // since then is alive, and this failure is the tail of a stall that
        // is over (see `Health`).
        let sent = oldest.map(|t| t.into_std());
        inner
            .health
            .record_failure(inner.settings.get().failure_limit, &failure, sent);
    }
    fail_requests(inner, failure);
}

/// Fails every request on the connection and closes it for good, without
/// counting it against the server's health.
fn fail_requests(inner: &Inner, failure: Failure) {
    inner.state.set(State::Closed);
    inner.out.borrow_mut().clear();
    let written = inner.written.get();
    loop {
        let Some(f) = inner.inflight.borrow_mut().pop_front() else {
            break;
        };
        let sent = failure != Failure::Connect && f.end <= written;
        f.reply.deliver(Err(BackendError { failure, sent }));
    }
}
